//! Event relations: which `EventRelation` records a booking's graph must create, update or
//! delete so that its Event is related to exactly the attendees of the newest version. Pure: the
//! relations already in the org come in (from the sled cache or one batched query, see
//! `enrich::relations`), nodes go out.
//!
//! `EventRelation` has no custom fields, so no external id and no upsert: a relation is created
//! once (`POST`), changed by id (`PATCH`) and removed by id (`DELETE`). Salesforce rejects a
//! second relation of the same person to an event, so a stale view of what exists makes the graph
//! fail (and roll back) instead of writing a duplicate.
//! Source: https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_eventattendee.htm

use serde::{Deserialize, Serialize};

use super::duplicates::Related;
use crate::config::{Parent, RelationsMapping};
use crate::salesforce::model::Subrequest;

/// Reference-id prefix of the relation nodes of a graph.
pub const NODE_PREFIX: &str = "rel_";

/// A tenant's relations mapping, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationSpec {
    /// The `ref` of the Event record.
    pub event: String,
    /// The `ref` of the per-attendee records related to it.
    pub records: String,
    /// The first record is the Event's Who (`IsParent`).
    pub parent_first: bool,
    /// Every record is an invitee (`IsInvitee`).
    pub invitees: bool,
}

impl From<&RelationsMapping> for RelationSpec {
    fn from(mapping: &RelationsMapping) -> Self {
        Self {
            event: mapping.event.clone(),
            records: mapping.records.clone(),
            parent_first: mapping.parent == Parent::First,
            invitees: mapping.invitees,
        }
    }
}

/// A record of the graph: its sObject, external id field and key (as in the node's URL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyed {
    /// sObject, e.g. `Lead`.
    pub sobject: String,
    /// External id field, e.g. `BookMe__Lead_Key__c`.
    pub field: String,
    /// The key, percent-decoded.
    pub key: String,
}

/// What a booking's graph wants related to its Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The Event node's reference id.
    pub event_ref: String,
    /// The Event, by external id (to find its relations in the org).
    pub event: Keyed,
    /// One per related record, in attendee order.
    pub relations: Vec<WantedRelation>,
    /// The mapping names a parent (`parent = "first"`), so `IsParent` is read and written. That
    /// field exists only with Shared Activities; without a parent the relations are invitees
    /// and never name it, so that they work in an org without Shared Activities too.
    pub with_parent: bool,
}

/// One relation a graph wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedRelation {
    /// The related record's node reference id (`lead_1`).
    pub reference: String,
    /// The related record, by external id.
    pub record: Keyed,
    /// `IsParent`.
    pub is_parent: bool,
    /// `IsInvitee`.
    pub is_invitee: bool,
    /// The existing record related in place of the mapping's (a duplicate rule's match, see
    /// [`super::duplicates`]): its id, written as the relation's `RelationId`.
    pub existing_id: Option<String>,
}

/// A relation that exists in the org. Kept in the booking's ledger entry, whose stored layout
/// is positional: a change of these fields needs a new format in `crate::enrich` (see its
/// `COMPACT`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Existing {
    /// The EventRelation's id.
    pub id: String,
    /// The related record's external id key (empty when it is not a record of the mapping:
    /// a user, a contact added by hand).
    pub key: String,
    /// `IsParent`.
    pub is_parent: bool,
    /// `IsInvitee`.
    pub is_invitee: bool,
    /// The related record's id (`RelationId`); empty in a cache entry written before it was
    /// kept, or for a relation created to a node of the graph.
    #[serde(default)]
    pub relation_id: String,
}

/// The node of a graph for one relation change, and what exists after it commits.
#[derive(Debug, Clone)]
pub struct Change {
    /// The graph node; `None` when the relation stays as it is.
    pub node: Option<Subrequest>,
    /// The relation after the change (`id` empty for a create until Salesforce answers);
    /// `None` for a delete.
    pub after: Option<Existing>,
}

/// `/services/data/vXX.X/sobjects/{O}/{Field}/{key}` → (O, Field, decoded key).
pub(crate) fn keyed(url: &str) -> Option<Keyed> {
    let rest = url.split("/sobjects/").nth(1)?;
    let mut parts = rest.splitn(3, '/');
    let (sobject, field, key) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Keyed {
        sobject: sobject.to_owned(),
        field: field.to_owned(),
        key: percent_encoding::percent_decode_str(key)
            .decode_utf8_lossy()
            .into_owned(),
    })
}

impl RelationSpec {
    /// What `nodes` (a booking's planned graph) want related, with `related` (records of the
    /// mapping written as existing ones, left out of `nodes`) in their attendee's place; `None`
    /// when the graph does not upsert the Event (not written, or deleted — its relations go
    /// with it).
    pub fn wanted(&self, nodes: &[Subrequest], related: &[Related]) -> Option<Wanted> {
        let event = nodes
            .iter()
            .find(|n| n.reference_id == self.event && n.method == "PATCH")?;
        let prefix = format!("{}_", self.records);
        let index =
            |reference: &str| -> Option<usize> { reference.strip_prefix(&prefix)?.parse().ok() };
        let mut relations: Vec<(usize, WantedRelation)> = nodes
            .iter()
            .filter(|n| n.method == "PATCH")
            .filter_map(|n| {
                Some((
                    index(&n.reference_id)?,
                    n.reference_id.clone(),
                    keyed(&n.url)?,
                    None,
                ))
            })
            .chain(related.iter().filter_map(|r| {
                Some((
                    index(&r.reference_id)?,
                    r.reference_id.clone(),
                    r.record.clone(),
                    Some(r.id.clone()),
                ))
            }))
            .map(|(index, reference, record, existing_id)| {
                let relation = WantedRelation {
                    reference,
                    record,
                    is_parent: self.parent_first && index == 0,
                    is_invitee: self.invitees,
                    existing_id,
                };
                (index, relation)
            })
            .filter(|(_, r)| r.is_parent || r.is_invitee)
            .collect();
        relations.sort_by_key(|(index, _)| *index);
        let relations = relations.into_iter().map(|(_, r)| r).collect();
        Some(Wanted {
            event_ref: event.reference_id.clone(),
            event: keyed(&event.url)?,
            relations,
            with_parent: self.parent_first,
        })
    }
}

/// The relation nodes that turn `existing` into `wanted`: deletes first (a parent removed
/// before another is set, as Salesforce allows one lead as parent), then updates, then creates.
/// Two wanted records with one key (an attendee listed twice), or written as one existing
/// record (two attendees a duplicate rule matched to the same Contact), get one relation.
pub fn changes(api_version: &str, wanted: &Wanted, existing: &[Existing]) -> Vec<Change> {
    let base = format!("/services/data/v{api_version}/sobjects/EventRelation");
    let event_ref = &wanted.event_ref;
    let with_parent = wanted.with_parent;
    // `IsParent` only when the mapping names a parent (see `Wanted::with_parent`), or to clear
    // it on a relation that has it (left by a mapping that named one: the org has the field).
    let flags = |w: &WantedRelation, was_parent: bool| {
        let mut body = serde_json::Map::new();
        if with_parent || was_parent {
            body.insert("IsParent".into(), w.is_parent.into());
        }
        body.insert("IsInvitee".into(), w.is_invitee.into());
        body
    };
    let mut seen: Vec<&str> = Vec::new();
    let mut seen_ids: Vec<&str> = Vec::new();
    let wanted: Vec<&WantedRelation> = wanted
        .relations
        .iter()
        .filter(|r| {
            let first = !seen.iter().any(|k| k.eq_ignore_ascii_case(&r.record.key))
                && r.existing_id
                    .as_deref()
                    .is_none_or(|id| !seen_ids.contains(&id));
            seen.push(&r.record.key);
            seen_ids.extend(r.existing_id.as_deref());
            first
        })
        .collect();
    // A relation to an existing record (a duplicate rule's match) is known by that record's
    // id: the record has the mapping's key only if the mapping wrote it.
    let is = |w: &WantedRelation, e: &Existing| {
        (!e.key.is_empty() && w.record.key.eq_ignore_ascii_case(&e.key))
            || (!e.relation_id.is_empty() && w.existing_id.as_deref() == Some(&e.relation_id))
    };
    let find = |current: &Existing| wanted.iter().find(|w| is(w, current));
    let mut deletes = Vec::new();
    let mut updates = Vec::new();
    let mut creates = Vec::new();
    for (n, current) in existing.iter().enumerate() {
        match find(current) {
            None if !current.key.is_empty() => deletes.push(Change {
                node: Some(Subrequest {
                    method: "DELETE".into(),
                    url: format!("{base}/{}", current.id),
                    reference_id: format!("{NODE_PREFIX}gone_{n}"),
                    body: None,
                }),
                after: None,
            }),
            None => {}
            Some(w) if w.is_parent == current.is_parent && w.is_invitee == current.is_invitee => {
                updates.push(Change {
                    node: None,
                    after: Some(current.clone()),
                });
            }
            Some(w) => updates.push(Change {
                node: Some(Subrequest {
                    method: "PATCH".into(),
                    url: format!("{base}/{}", current.id),
                    reference_id: format!("{NODE_PREFIX}{}", w.reference),
                    body: Some(serde_json::Value::Object(flags(w, current.is_parent)).into()),
                }),
                after: Some(Existing {
                    key: w.record.key.clone(),
                    is_parent: w.is_parent,
                    is_invitee: w.is_invitee,
                    ..current.clone()
                }),
            }),
        }
    }
    for w in &wanted {
        if existing.iter().any(|e| is(w, e)) {
            continue;
        }
        let relation = w
            .existing_id
            .clone()
            .unwrap_or_else(|| format!("@{{{}.id}}", w.reference));
        creates.push(Change {
            node: Some(Subrequest {
                method: "POST".into(),
                url: base.clone(),
                reference_id: format!("{NODE_PREFIX}{}", w.reference),
                body: Some({
                    let mut body = serde_json::Map::new();
                    body.insert("EventId".into(), format!("@{{{event_ref}.id}}").into());
                    body.insert("RelationId".into(), relation.into());
                    body.extend(flags(w, false));
                    serde_json::Value::Object(body).into()
                }),
            }),
            after: Some(Existing {
                id: String::new(),
                key: w.record.key.clone(),
                is_parent: w.is_parent,
                is_invitee: w.is_invitee,
                relation_id: w.existing_id.clone().unwrap_or_default(),
            }),
        });
    }
    deletes.into_iter().chain(updates).chain(creates).collect()
}

/// The SOQL query that reads the relations of several bookings' Events at once (one API call
/// per Composite Graph request on a cache miss): each row names its Event's key and, through
/// `TYPEOF`, the related record's key. `Relation` is polymorphic (User, Contact, Lead), so only
/// `TYPEOF` reaches a custom field of one of its types
/// (https://developer.salesforce.com/docs/atlas.en-us.soql_sosl.meta/soql_sosl/sforce_api_calls_soql_select_typeof.htm).
/// Needs API v46.0 or later (TYPEOF's GA). `IsParent` is selected only `with_parent` (see
/// [`Wanted::with_parent`]).
pub fn lookup_query(
    event: &Keyed,
    records: &[(String, String)],
    event_keys: &[String],
    with_parent: bool,
) -> String {
    let mut whens = String::new();
    for (sobject, field) in records {
        whens.push_str(&format!(" WHEN {sobject} THEN {field}"));
    }
    let keys: Vec<String> = event_keys
        .iter()
        .map(|k| crate::enrich::soql_quote(k))
        .collect();
    let relation = if whens.is_empty() {
        String::new()
    } else {
        format!(", TYPEOF Relation{whens} END")
    };
    format!(
        "SELECT Id, RelationId, {parent}IsInvitee, Event.{field}{relation} FROM EventRelation \
         WHERE Event.{field} IN ({})",
        keys.join(", "),
        parent = if with_parent { "IsParent, " } else { "" },
        field = event.field,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The JSON body of a change's node.
    fn body_of(change: &Change) -> serde_json::Value {
        let node = change.node.as_ref().expect("the change sends a node");
        node.body
            .as_ref()
            .expect("the node has a body")
            .value()
            .into_owned()
    }

    fn node(method: &str, reference: &str, url: &str) -> Subrequest {
        Subrequest {
            method: method.into(),
            url: url.into(),
            reference_id: reference.into(),
            body: Some(json!({}).into()),
        }
    }

    fn graph(emails: &[&str]) -> Vec<Subrequest> {
        let mut nodes: Vec<Subrequest> = emails
            .iter()
            .enumerate()
            .map(|(i, e)| {
                node(
                    "PATCH",
                    &format!("lead_{i}"),
                    &format!("/services/data/v66.0/sobjects/Lead/BookMe__Lead_Key__c/acme:{e}"),
                )
            })
            .collect();
        nodes.push(node(
            "PATCH",
            "event",
            "/services/data/v66.0/sobjects/Event/BookMe__Booking_Id__c/bk_1",
        ));
        nodes
    }

    fn spec() -> RelationSpec {
        RelationSpec {
            event: "event".into(),
            records: "lead".into(),
            parent_first: true,
            invitees: true,
        }
    }

    fn existing(id: &str, email: &str, is_parent: bool) -> Existing {
        Existing {
            id: id.into(),
            key: format!("acme:{email}"),
            is_parent,
            is_invitee: true,
            relation_id: String::new(),
        }
    }

    fn shape(changes: &[Change]) -> Vec<(String, String)> {
        changes
            .iter()
            .filter_map(|c| c.node.as_ref())
            .map(|n| (n.method.clone(), n.reference_id.clone()))
            .collect()
    }

    #[test]
    fn a_new_group_booking_creates_one_relation_per_attendee_the_first_as_parent() {
        let wanted = spec().wanted(&graph(&["a@x", "b@x", "c@x"]), &[]).unwrap();
        assert_eq!(wanted.event.key, "bk_1");
        let changes = changes("66.0", &wanted, &[]);
        assert_eq!(
            shape(&changes),
            [
                ("POST".into(), "rel_lead_0".into()),
                ("POST".into(), "rel_lead_1".into()),
                ("POST".into(), "rel_lead_2".into())
            ]
        );
        let first = body_of(&changes[0]);
        assert_eq!(
            first,
            json!({"EventId": "@{event.id}", "RelationId": "@{lead_0.id}", "IsParent": true, "IsInvitee": true})
        );
        assert!(!changes[1].after.as_ref().unwrap().is_parent);
    }

    #[test]
    fn the_same_attendees_need_no_node() {
        let wanted = spec().wanted(&graph(&["a@x", "b@x"]), &[]).unwrap();
        let now = [
            existing("0RE1", "a@x", true),
            existing("0RE2", "b@x", false),
        ];
        let changes = changes("66.0", &wanted, &now);
        assert!(shape(&changes).is_empty());
        assert_eq!(changes.len(), 2, "both kept");
    }

    #[test]
    fn a_reschedule_deletes_the_removed_moves_the_parent_and_adds_the_new() {
        let wanted = spec().wanted(&graph(&["b@x", "c@x"]), &[]).unwrap();
        let now = [
            existing("0RE1", "a@x", true),
            existing("0RE2", "B@X", false),
        ];
        let changes = changes("66.0", &wanted, &now);
        assert_eq!(
            shape(&changes),
            [
                ("DELETE".into(), "rel_gone_0".into()),
                ("PATCH".into(), "rel_lead_0".into()),
                ("POST".into(), "rel_lead_1".into())
            ]
        );
        assert!(
            changes[0]
                .node
                .as_ref()
                .unwrap()
                .url
                .ends_with("/EventRelation/0RE1")
        );
        assert!(changes[0].after.is_none());
        assert_eq!(changes[1].after.as_ref().unwrap().id, "0RE2");
    }

    #[test]
    fn relations_the_mapping_did_not_make_are_left_alone() {
        let wanted = spec().wanted(&graph(&["a@x"]), &[]).unwrap();
        let now = [
            existing("0RE1", "a@x", true),
            Existing {
                id: "0RE9".into(),
                key: String::new(),
                is_parent: false,
                is_invitee: true,
                relation_id: "003000000000009AAA".into(),
            },
        ];
        assert!(shape(&changes("66.0", &wanted, &now)).is_empty());
    }

    #[test]
    fn an_existing_record_in_an_attendees_place_is_related_by_its_id_once() {
        let mut nodes = graph(&["a@x", "b@x"]);
        let lead_0 = nodes.remove(0);
        let related = [Related {
            reference_id: "lead_0".into(),
            record: keyed(&lead_0.url).unwrap(),
            sobject: "Contact".into(),
            id: "003000000000001AAA".into(),
            rule: "Standard_Lead_Duplicate_Rule".into(),
            cleared: vec![],
        }];
        let wanted = spec().wanted(&nodes, &related).unwrap();
        assert_eq!(
            wanted
                .relations
                .iter()
                .map(|r| (r.reference.as_str(), r.is_parent))
                .collect::<Vec<_>>(),
            [("lead_0", true), ("lead_1", false)],
            "in attendee order, the first still the Who"
        );
        let created = changes("66.0", &wanted, &[]);
        let body = body_of(&created[0]);
        assert_eq!(body["RelationId"], "003000000000001AAA");
        assert_eq!(created[0].after.as_ref().unwrap().key, "acme:a@x");
        // Read back from the org the relation has no key of the mapping, only its RelationId.
        let now = [Existing {
            id: "0RE1".into(),
            key: String::new(),
            is_parent: true,
            is_invitee: true,
            relation_id: "003000000000001AAA".into(),
        }];
        assert_eq!(
            shape(&changes("66.0", &wanted, &now)),
            [("POST".into(), "rel_lead_1".into())]
        );
        // Two attendees matched to the same Contact: one relation.
        let lead_1 = nodes.remove(0);
        let mut both = related.to_vec();
        both.push(Related {
            reference_id: "lead_1".into(),
            record: keyed(&lead_1.url).unwrap(),
            ..related[0].clone()
        });
        let wanted = spec().wanted(&nodes, &both).unwrap();
        assert_eq!(
            shape(&changes("66.0", &wanted, &[])),
            [("POST".into(), "rel_lead_0".into())]
        );
    }

    #[test]
    fn an_attendee_listed_twice_gets_one_relation() {
        let wanted = spec().wanted(&graph(&["a@x", "A@x"]), &[]).unwrap();
        assert_eq!(shape(&changes("66.0", &wanted, &[])).len(), 1);
    }

    #[test]
    fn no_event_upsert_means_no_relations() {
        let mut nodes = graph(&["a@x"]);
        nodes.last_mut().unwrap().method = "DELETE".into();
        assert_eq!(spec().wanted(&nodes, &[]), None);
    }

    #[test]
    fn the_lookup_reads_every_booking_in_one_query() {
        let wanted = spec().wanted(&graph(&["a@x"]), &[]).unwrap();
        let q = lookup_query(
            &wanted.event,
            &[("Lead".into(), "BookMe__Lead_Key__c".into())],
            &["bk_1".into(), "o'k".into()],
            true,
        );
        assert_eq!(
            q,
            "SELECT Id, RelationId, IsParent, IsInvitee, Event.BookMe__Booking_Id__c, TYPEOF \
             Relation WHEN \
             Lead THEN BookMe__Lead_Key__c END FROM EventRelation WHERE \
             Event.BookMe__Booking_Id__c IN ('bk_1', 'o\\'k')"
        );
    }

    /// Invitees only (`parent = "none"`): no node and no query names `IsParent`, which an org
    /// without Shared Activities does not have.
    #[test]
    fn invitees_only_never_name_is_parent() {
        let invitees = RelationSpec {
            parent_first: false,
            ..spec()
        };
        let wanted = invitees.wanted(&graph(&["a@x", "b@x"]), &[]).unwrap();
        assert!(!wanted.with_parent);
        let now = [Existing {
            is_invitee: false,
            ..existing("0RE1", "a@x", false)
        }];
        let changes_of = |wanted: &Wanted, now: &[Existing]| changes("66.0", wanted, now);
        let changes = changes_of(&wanted, &now);
        assert_eq!(
            shape(&changes),
            [
                ("PATCH".into(), "rel_lead_0".into()),
                ("POST".into(), "rel_lead_1".into())
            ]
        );
        assert_eq!(body_of(&changes[0]), json!({"IsInvitee": true}));
        assert_eq!(
            body_of(&changes[1]),
            json!({"EventId": "@{event.id}", "RelationId": "@{lead_1.id}", "IsInvitee": true})
        );
        // A parent left by an earlier mapping that named one is cleared (the org has the field).
        let was_parent = changes_of(&wanted, &[existing("0RE1", "a@x", true)]);
        assert_eq!(
            body_of(&was_parent[0]),
            json!({"IsParent": false, "IsInvitee": true})
        );
        let q = lookup_query(&wanted.event, &[], &["bk_1".into()], wanted.with_parent);
        assert!(!q.contains("IsParent"), "{q}");
        assert!(
            q.starts_with("SELECT Id, RelationId, IsInvitee, Event."),
            "{q}"
        );
    }
}
