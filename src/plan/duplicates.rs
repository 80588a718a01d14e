//! A record an org's duplicate rule refused, replaced by the existing record it matched
//! (tenant choice `duplicate_rule = "relate_to_existing"`). Pure: the refused graph and its
//! nodes in, the nodes to send again out.
//!
//! The kind: a duplicate rule refuses a save that matches existing records with 400
//! `DUPLICATES_DETECTED`, message the rule's alert text, and a `duplicateResult` naming the
//! matches — `{"duplicateRule", "duplicateRuleEntityType", "allowSave", "errorMessage",
//! "matchResults": [{"entityType", "rule", "matchRecords": [{"record": {"attributes": {"type",
//! "url"}, "Id"}, "matchConfidence", …}], …}]}` (DuplicateError / DuplicateResult:
//! <https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_objects_duplicateerror.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api.meta/api/sforce_api_objects_duplicateresult.htm>).
//! Inside a Composite Graph it is the refused node's body; every other node is rolled back.
//! A new org's standard Lead rule compares a Lead with Leads and Contacts, so the attendee a
//! sales rep typed in by hand, as a Lead or as a Contact, refuses the booking's new Lead.
//!
//! Which match is taken (README "Duplicate rules"), in this order:
//! 1. a match of the refused record's own object: it can stand in wherever the new record
//!    would (a Lead lookup takes a Lead), so nothing of the booking changes type;
//! 2. for a Lead or a Contact, a match of the other of the two: both can be an Event's Who
//!    (`WhoId`) and an `EventRelation`'s `RelationId`
//!    (<https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_eventrelation.htm>);
//!    a lookup of the mapping that cannot point at it (`BookMe__Lead_Id__c`, a Lead lookup)
//!    is written empty, as no record of its type exists;
//! 3. within one object, the rule's first match (Salesforce lists them by match confidence).
//!
//! A match of no such type (a rule on another object, an Account) cannot take the record's
//! place: the booking fails as under `fail`, naming the matched ids.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::relations::{Keyed, keyed};
use crate::salesforce::model::{ApiError, Body, GraphResult, Subrequest};

/// The error code of a duplicate rule's refusal.
pub const DUPLICATES_DETECTED: &str = "DUPLICATES_DETECTED";

/// Objects that can each stand in for the other as the person a meeting is with: the Who of
/// an Event and the `RelationId` of an `EventRelation` take either.
pub const WHO_TYPES: &[&str] = &["Lead", "Contact"];

/// A record of the mapping written as an existing record a duplicate rule matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Related {
    /// The node it replaces (`lead_0`).
    pub reference_id: String,
    /// The record the mapping would have written, by external id.
    pub record: Keyed,
    /// The existing record's sObject (`Contact`).
    pub sobject: String,
    /// The existing record's id.
    pub id: String,
    /// The duplicate rule that matched it.
    pub rule: String,
    /// Lookups of other nodes (`(node, field)`) that cannot point at it, written empty.
    pub cleared: Vec<(String, String)>,
}

/// The first node of `result` refused by a duplicate rule, and its error.
pub fn refused(result: &GraphResult) -> Option<(String, ApiError)> {
    result.node_error_of(&[DUPLICATES_DETECTED])
}

/// The match to relate a refused record of `own` to, by the order of the module doc; `None`
/// when no match can take its place.
pub fn choose(own: &str, matches: &[(String, String)]) -> Option<(String, String)> {
    let own_match = matches.iter().find(|(sobject, _)| sobject == own);
    let other = || {
        WHO_TYPES
            .contains(&own)
            .then(|| {
                matches
                    .iter()
                    .find(|(sobject, _)| sobject != own && WHO_TYPES.contains(&sobject.as_str()))
            })
            .flatten()
    };
    own_match.or_else(other).cloned()
}

/// The duplicate rule a `DUPLICATES_DETECTED` names.
pub fn rule_of(error: &ApiError) -> String {
    error
        .duplicate_result
        .as_ref()
        .and_then(|d| d.get("duplicateRule"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The fields of other nodes whose whole value is a reference to `reference`'s id
/// (`BookMe__Lead_Id__c = "@{lead_0.id}"`): `(node, sObject, field)`.
pub fn referring_fields(nodes: &[Subrequest], reference: &str) -> Vec<(String, String, String)> {
    let placeholder = format!("@{{{reference}.id}}");
    nodes
        .iter()
        .filter(|n| n.reference_id != reference)
        .filter_map(|n| Some((n, n.body.as_ref()?.value())))
        .flat_map(|(n, body)| {
            body.as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| v.as_str() == Some(placeholder.as_str()))
                .map(|(field, _)| {
                    (
                        n.reference_id.clone(),
                        super::sobject_of(&n.url).to_owned(),
                        field.clone(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `nodes` with the upsert `reference` left out and every `@{reference.id}` in the others
/// replaced by `id`; `cleared` fields (`(node, field)`) are written empty. `None` when
/// `reference` is not an upsert by external id of the graph.
pub fn relate(
    nodes: &[Subrequest],
    reference: &str,
    existing: (&str, &str),
    rule: &str,
    cleared: &[(String, String)],
) -> Option<(Vec<Subrequest>, Related)> {
    let (sobject, id) = existing;
    let node = nodes
        .iter()
        .find(|n| n.reference_id == reference && n.method == "PATCH")?;
    let mut related = Related {
        reference_id: reference.to_owned(),
        record: keyed(&node.url)?,
        sobject: sobject.to_owned(),
        id: id.to_owned(),
        rule: rule.to_owned(),
        cleared: Vec::new(),
    };
    let placeholder = format!("@{{{reference}.id}}");
    let mut out: Vec<Subrequest> = nodes
        .iter()
        .filter(|n| n.reference_id != reference)
        .cloned()
        .collect();
    for node in &mut out {
        if let Some(fields) = node.body.as_mut().and_then(Body::object_mut) {
            fields
                .values_mut()
                .for_each(|v| replace(v, &placeholder, id));
            for (_, field) in cleared.iter().filter(|(r, _)| *r == node.reference_id) {
                if fields.contains_key(field) {
                    fields.insert(field.clone(), Value::Null);
                    related
                        .cleared
                        .push((node.reference_id.clone(), field.clone()));
                }
            }
        }
    }
    Some((out, related))
}

fn replace(value: &mut Value, placeholder: &str, id: &str) {
    match value {
        Value::String(s) if s.contains(placeholder) => *s = s.replace(placeholder, id),
        Value::Array(items) => items.iter_mut().for_each(|v| replace(v, placeholder, id)),
        Value::Object(map) => map.values_mut().for_each(|v| replace(v, placeholder, id)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A Composite Graph answer as Salesforce writes it when the standard Lead rule refuses
    /// `lead_0`: its own error with the duplicate result, a placeholder on every other node.
    fn refused_graph() -> GraphResult {
        serde_json::from_str(&json!({
            "graphId": "g0",
            "isSuccessful": false,
            "graphResponse": {"compositeResponse": [
                {"referenceId": "lead_0", "httpStatusCode": 400, "httpHeaders": {}, "body": [{
                    "errorCode": "DUPLICATES_DETECTED",
                    "message": "Use one of these records?",
                    "fields": [],
                    "duplicateResult": {
                        "allowSave": true,
                        "duplicateRule": "Standard_Lead_Duplicate_Rule",
                        "duplicateRuleEntityType": "Lead",
                        "errorMessage": "Use one of these records?",
                        "matchResults": [
                            {"entityType": "Lead", "errors": [], "matchEngine": "FuzzyMatchEngine",
                             "rule": "Standard_Lead_Match_Rule_v1_0", "size": 1, "success": true,
                             "matchRecords": [{"additionalInformation": [], "fieldDiffs": [],
                                "matchConfidence": 100.0,
                                "record": {"attributes": {"type": "Lead", "url": "/services/data/v66.0/sobjects/Lead/00Q000000000001AAA"},
                                           "Id": "00Q000000000001AAA"}}]},
                            {"entityType": "Contact", "errors": [], "matchEngine": "FuzzyMatchEngine",
                             "rule": "Standard_Contact_Match_Rule_v1_1", "size": 2, "success": true,
                             "matchRecords": [
                                {"matchConfidence": 95.0, "record": {"attributes": {"type": "Contact"}, "Id": "003000000000001AAA"}},
                                {"matchConfidence": 90.0, "record": {"Id": "003000000000002AAA"}}]}
                        ]
                    }
                }]},
                {"referenceId": "event", "httpStatusCode": 400, "httpHeaders": {}, "body": [{
                    "errorCode": "PROCESSING_HALTED",
                    "message": "The transaction was rolled back since another operation in the same transaction failed."
                }]}
            ]}
        }).to_string())
        .expect("a graph result")
    }

    fn nodes() -> Vec<Subrequest> {
        vec![
            Subrequest {
                method: "PATCH".into(),
                url: "/services/data/v66.0/sobjects/Lead/BookMe__Lead_Key__c/acme:jane%40x".into(),
                reference_id: "lead_0".into(),
                body: Some(json!({"LastName": "Doe"}).into()),
            },
            Subrequest {
                method: "PATCH".into(),
                url: "/services/data/v66.0/sobjects/Event/BookMe__Booking_Id__c/bk_1".into(),
                reference_id: "event".into(),
                body: Some(json!({"Subject": "Intro", "Description": "Lead @{lead_0.id}"}).into()),
            },
            Subrequest {
                method: "PATCH".into(),
                url: "/services/data/v66.0/sobjects/BookMe__Booking__c/BookMe__Booking_Id__c/bk_1"
                    .into(),
                reference_id: "booking".into(),
                body: Some(
                    json!({"BookMe__Event_Id__c": "@{event.id}", "BookMe__Lead_Id__c": "@{lead_0.id}"})
                        .into(),
                ),
            },
        ]
    }

    #[test]
    fn the_duplicate_result_names_the_node_the_rule_and_the_matches_in_order() {
        let (reference, error) = refused(&refused_graph()).expect("a refused node");
        assert_eq!(reference, "lead_0");
        assert_eq!(rule_of(&error), "Standard_Lead_Duplicate_Rule");
        assert_eq!(
            error.duplicate_matches(),
            [
                ("Lead".to_owned(), "00Q000000000001AAA".to_owned()),
                ("Contact".to_owned(), "003000000000001AAA".to_owned()),
                // No attributes: the match result's entity type.
                ("Contact".to_owned(), "003000000000002AAA".to_owned()),
            ]
        );
    }

    #[test]
    fn the_own_object_comes_first_then_the_other_who_type_then_nothing() {
        let m = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(s, i)| ((*s).to_owned(), (*i).to_owned()))
                .collect()
        };
        let both = m(&[("Contact", "003a"), ("Lead", "00Qa"), ("Lead", "00Qb")]);
        assert_eq!(choose("Lead", &both), Some(("Lead".into(), "00Qa".into())));
        assert_eq!(
            choose("Contact", &both),
            Some(("Contact".into(), "003a".into()))
        );
        let contacts = m(&[("Contact", "003a"), ("Contact", "003b")]);
        assert_eq!(
            choose("Lead", &contacts),
            Some(("Contact".into(), "003a".into()))
        );
        assert_eq!(choose("Lead", &m(&[("Account", "001a")])), None);
        assert_eq!(choose("BookMe__Booking__c", &contacts), None);
        assert_eq!(choose("Lead", &[]), None);
    }

    #[test]
    fn the_refused_node_is_left_out_and_its_references_point_at_the_match() {
        let nodes = nodes();
        assert_eq!(
            referring_fields(&nodes, "lead_0"),
            [(
                "booking".to_owned(),
                "BookMe__Booking__c".to_owned(),
                "BookMe__Lead_Id__c".to_owned()
            )]
        );
        let (out, related) = relate(
            &nodes,
            "lead_0",
            ("Lead", "00Qa"),
            "Standard_Lead_Duplicate_Rule",
            &[],
        )
        .expect("related");
        assert_eq!(
            out.iter()
                .map(|n| n.reference_id.as_str())
                .collect::<Vec<_>>(),
            ["event", "booking"]
        );
        assert_eq!(
            out[0].body.as_ref().unwrap().value()["Description"],
            "Lead 00Qa"
        );
        assert_eq!(
            out[1].body.as_ref().unwrap().value()["BookMe__Lead_Id__c"],
            "00Qa"
        );
        assert_eq!(
            out[1].body.as_ref().unwrap().value()["BookMe__Event_Id__c"],
            "@{event.id}"
        );
        assert_eq!(related.record.key, "acme:jane@x");
        assert_eq!(
            (related.sobject.as_str(), related.id.as_str()),
            ("Lead", "00Qa")
        );
    }

    #[test]
    fn a_lookup_that_cannot_point_at_the_match_is_written_empty() {
        let cleared = [("booking".to_owned(), "BookMe__Lead_Id__c".to_owned())];
        let (out, related) =
            relate(&nodes(), "lead_0", ("Contact", "003a"), "r", &cleared).unwrap();
        assert_eq!(
            out[1].body.as_ref().unwrap().value()["BookMe__Lead_Id__c"],
            Value::Null
        );
        assert_eq!(related.cleared, cleared);
        assert!(relate(&nodes(), "nobody", ("Contact", "003a"), "r", &[]).is_none());
    }
}
