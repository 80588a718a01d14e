//! Record-level security (sharing): recognising a write that the integration user's sharing
//! refused, and what the customer's Salesforce admin must change. The dead-letter message, the
//! `doctor` and the Management console all take their text from [`SharingProblem`].
//!
//! Salesforce evaluates record access after object and field permissions: a user sees and
//! edits the records it owns, and others' records as the object's org-wide default (Private,
//! Public Read Only, Public Read/Write), sharing rules, or the object permissions "View All" /
//! "Modify All" allow (<https://help.salesforce.com/s/articleView?id=sf.security_data_access.htm>).
//! What it answers when sharing refuses a write of the shipped mapping:
//!
//! | condition | Salesforce answers (HTTP 400, in a graph: the failing node) | reason code | fix |
//! |---|---|---|---|
//! | an upsert by external id of a record the user cannot see | the match runs under sharing, so it inserts; the unique key collides: `DUPLICATE_VALUE` "duplicate value found: `<key field>` duplicates value on record with id: `<id>`" | `salesforce_sharing_record_not_visible` | share the object's records owned by others with the integration user, Read/Write |
//! | an update (or delete) of a record it sees read-only | `INSUFFICIENT_ACCESS_OR_READONLY` "insufficient access rights on object id" | `salesforce_sharing_record_read_only` | the same |
//! | a lookup (`WhoId`, a reference field) to a record it cannot see | `INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY` "insufficient access rights on cross-reference id: `<15-char id>`" | `salesforce_sharing_reference_not_visible` | share the referenced object's records, Read at least |
//!
//! The upsert docs say why a unique external id answers `DUPLICATE_VALUE` rather than creating a
//! second record: "The Unique attribute prevents the creation of duplicates" (a non-unique one
//! needs "View All Data") —
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_sobject_upsert_patch.htm>.
//! The same error codes have other causes, so [`diagnose`] names the sharing tier only when the
//! other tiers are ruled out: the object is editable in the integration user's describe (object
//! level), and a `DUPLICATE_VALUE` on the upsert's own key names a record a query cannot return
//! (a record it can see would have been matched, or was inserted by a concurrent request).

use std::fmt;

use crate::enrich::Caches;
use crate::salesforce::SalesforceClient;
use crate::salesforce::model::{ApiError, GraphResult, Subrequest};

/// The security tier, as the security note and the docs name it.
pub const TIER: &str = "record-level security (sharing)";

/// A write refused by record-level security: the condition, with what names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharingProblem {
    /// An upsert by external id did not see the existing record `record_id` of `sobject`
    /// (owned by someone else, not shared), inserted, and collided on `key_field`.
    RecordNotVisible {
        /// The sObject upserted.
        sobject: String,
        /// The upsert's external id field.
        key_field: String,
        /// The hidden record.
        record_id: String,
    },
    /// A record of `sobject` is visible but read-only.
    RecordReadOnly {
        /// The sObject written.
        sobject: String,
    },
    /// A record of `sobject` refers to `record_id`, which the user cannot see.
    ReferenceNotVisible {
        /// The sObject written.
        sobject: String,
        /// The referenced record (15 characters, as Salesforce names it).
        record_id: String,
        /// The referenced record's sObject, when its key prefix is one of the mapped objects.
        referenced: Option<String>,
    },
}

impl SharingProblem {
    /// What the Salesforce admin must change (the one text the dead letter, `doctor` and the
    /// Management console show).
    pub fn fix(&self) -> String {
        match self {
            Self::RecordNotVisible { sobject, .. } | Self::RecordReadOnly { sobject } => {
                share_fix(sobject, "Read/Write")
            }
            Self::ReferenceNotVisible {
                referenced: Some(referenced),
                ..
            } => share_fix(referenced, "Read Only (or Read/Write)"),
            Self::ReferenceNotVisible {
                referenced: None,
                record_id,
                ..
            } => format!(
                "share the record {record_id} (and its object's records owned by others) with \
                 the integration user: a sharing rule, or \"View All\" on its object in the \
                 BookMe Integration User permission set"
            ),
        }
    }
}

/// The fix text for records of `sobject` that the integration user must reach at `level`.
fn share_fix(sobject: &str, level: &str) -> String {
    format!(
        "give the integration user {level} access to {sobject} records owned by other users: \
         a sharing rule on {sobject} that shares records owned by all internal users with it \
         ({level}), or \"Modify All\" on {sobject} in the BookMe Integration User permission \
         set (or the org-wide default Public Read/Write for {sobject})"
    )
}

impl SharingProblem {
    /// What was refused, naming the tier, without the fix.
    pub fn condition(&self) -> String {
        match self {
            Self::RecordNotVisible {
                sobject,
                key_field,
                record_id,
            } => format!(
                "{TIER}: the {sobject} {record_id} with this {key_field} exists but is not \
                 shared with the integration user, so the upsert could not see it \
                 (DUPLICATE_VALUE)"
            ),
            Self::RecordReadOnly { sobject } => format!(
                "{TIER}: the integration user can see this {sobject} but not edit it \
                 (INSUFFICIENT_ACCESS_OR_READONLY)"
            ),
            Self::ReferenceNotVisible {
                sobject,
                record_id,
                referenced,
            } => format!(
                "{TIER}: the {sobject} refers to {} {record_id}, which the integration user \
                 cannot see (INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY)",
                referenced.as_deref().unwrap_or("record")
            ),
        }
    }
}

impl SharingProblem {
    /// The problem a dead letter's message states (its [`fmt::Display`], `condition; fix: …`),
    /// for re-checking it against the org later; None when the message is not one of ours.
    pub fn from_message(message: &str) -> Option<Self> {
        let rest = message.strip_prefix(TIER)?.strip_prefix(": ")?;
        let condition = rest.split("; fix: ").next().unwrap_or(rest);
        let words: Vec<&str> = condition.split(' ').collect();
        match words.as_slice() {
            [
                "the",
                sobject,
                record_id,
                "with",
                "this",
                key_field,
                "exists",
                ..,
            ] => Some(Self::RecordNotVisible {
                sobject: (*sobject).to_owned(),
                key_field: (*key_field).to_owned(),
                record_id: (*record_id).to_owned(),
            }),
            [
                "the",
                "integration",
                "user",
                "can",
                "see",
                "this",
                sobject,
                "but",
                ..,
            ] => Some(Self::RecordReadOnly {
                sobject: (*sobject).to_owned(),
            }),
            ["the", sobject, "refers", "to", referenced, record_id, ..] => {
                Some(Self::ReferenceNotVisible {
                    sobject: (*sobject).to_owned(),
                    record_id: record_id.trim_end_matches(',').to_owned(),
                    referenced: (*referenced != "record").then(|| (*referenced).to_owned()),
                })
            }
            _ => None,
        }
    }
}

/// A sharing problem asked of the org as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// The integration user still cannot see the record.
    StillThere,
    /// It sees the record now.
    Gone,
    /// The org cannot be asked about this one without writing: why.
    CannotCheck(String),
}

/// Asks the org whether the integration user sees the record the problem names, now: a query
/// runs under the user's sharing, so it returns a record only once shared. A read-only record
/// cannot be asked about: the error names no record, and edit access is granted per record.
pub async fn recheck(
    client: &SalesforceClient,
    problem: &SharingProblem,
) -> Result<Recheck, crate::salesforce::SalesforceError> {
    let (sobject, record_id) = match problem {
        SharingProblem::RecordNotVisible {
            sobject, record_id, ..
        } => (sobject.clone(), record_id),
        SharingProblem::ReferenceNotVisible {
            record_id,
            referenced,
            ..
        } => {
            let referenced = match referenced {
                Some(name) => Some(name.clone()),
                None => client
                    .describe_global()
                    .await?
                    .sobjects
                    .into_iter()
                    .find(|o| {
                        o.key_prefix
                            .as_deref()
                            .is_some_and(|p| record_id.starts_with(p))
                    })
                    .map(|o| o.name),
            };
            match referenced {
                Some(name) => (name, record_id),
                None => {
                    return Ok(Recheck::CannotCheck(format!(
                        "the integration user sees no object whose ids start like {record_id}"
                    )));
                }
            }
        }
        SharingProblem::RecordReadOnly { sobject } => {
            return Ok(Recheck::CannotCheck(format!(
                "Salesforce's error names no {sobject} record, and edit access is granted per \
                 record, so it cannot be asked without writing"
            )));
        }
    };
    let soql = format!(
        "SELECT Id FROM {sobject} WHERE Id = {}",
        crate::enrich::soql_quote(record_id)
    );
    Ok(if client.query(&soql).await?.is_empty() {
        Recheck::StillThere
    } else {
        Recheck::Gone
    })
}

/// The dead-letter message: the condition, then the fix.
impl fmt::Display for SharingProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; fix: {}", self.condition(), self.fix())
    }
}

/// The sObject and, for an upsert by external id, the key field of a node's URL
/// (`…/sobjects/{O}/{Field}/{value}`).
fn node_target(node: &Subrequest) -> (String, Option<String>) {
    let rest = node.url.split("/sobjects/").nth(1).unwrap_or_default();
    let mut parts = rest.split('/');
    let sobject = parts.next().unwrap_or("?").to_owned();
    let key_field = match (parts.next(), parts.next()) {
        (Some(field), Some(_)) => Some(field.to_owned()),
        _ => None,
    };
    (sobject, key_field)
}

/// The failing node of a rolled-back graph and its error (the first error that is not the
/// `PROCESSING_HALTED` of the nodes rolled back with it).
fn failing_node<'a>(
    result: &GraphResult,
    nodes: &'a [Subrequest],
) -> Option<(&'a Subrequest, ApiError)> {
    result
        .graph_response
        .composite_response
        .iter()
        .find_map(|n| {
            let error = n.node_error().filter(|e| !e.is_placeholder())?;
            let node = nodes.iter().find(|s| s.reference_id == n.reference_id)?;
            Some((node, error))
        })
}

/// The id in `… id: <id>` at the end of a message.
fn trailing_id(message: &str) -> Option<String> {
    let id = message.rsplit(": ").next()?.trim();
    (matches!(id.len(), 15 | 18) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| id.to_owned())
}

/// True when the integration user's describe says it may edit `sobject` (so an access error
/// is not the object tier's).
async fn editable(client: &SalesforceClient, caches: &Caches, sobject: &str) -> bool {
    matches!(
        caches.describe(client, sobject).await,
        Ok(Some(d)) if d.updateable
    )
}

/// Diagnoses a rolled-back graph: the sharing problem that failed it, or None when it failed
/// for another reason (see the module table). Costs a query only for a `DUPLICATE_VALUE` on
/// the upsert's own key; describes come from the cache.
pub async fn diagnose(
    client: &SalesforceClient,
    caches: &Caches,
    result: &GraphResult,
    nodes: &[Subrequest],
) -> Option<SharingProblem> {
    let (node, error) = failing_node(result, nodes)?;
    let (sobject, key_field) = node_target(node);
    match error.error_code.as_str() {
        "DUPLICATE_VALUE" => {
            let key_field = key_field?;
            let record_id = trailing_id(&error.message)?;
            let on_key = error
                .message
                .strip_prefix("duplicate value found: ")
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|field| field.eq_ignore_ascii_case(&key_field));
            if !on_key || node.method != "PATCH" {
                return None;
            }
            // A record the user can see would have been matched: if the query returns it, a
            // concurrent request inserted it, which is not a sharing problem.
            let soql = format!("SELECT Id FROM {sobject} WHERE Id = '{record_id}'");
            match client.query(&soql).await {
                Ok(rows) if rows.is_empty() => Some(SharingProblem::RecordNotVisible {
                    sobject,
                    key_field,
                    record_id,
                }),
                _ => None,
            }
        }
        "INSUFFICIENT_ACCESS_OR_READONLY" => editable(client, caches, &sobject)
            .await
            .then_some(SharingProblem::RecordReadOnly { sobject }),
        "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY" => {
            let record_id = trailing_id(&error.message)?;
            let mut referenced = None;
            for node in nodes {
                let (object, _) = node_target(node);
                if let Ok(Some(describe)) = caches.describe(client, &object).await
                    && describe
                        .key_prefix
                        .as_deref()
                        .is_some_and(|p| record_id.starts_with(p))
                {
                    referenced = Some(describe.name);
                    break;
                }
            }
            Some(SharingProblem::ReferenceNotVisible {
                sobject,
                record_id,
                referenced,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(reference: &str, method: &str, url: &str) -> Subrequest {
        Subrequest {
            method: method.into(),
            url: url.into(),
            reference_id: reference.into(),
            body: None,
        }
    }

    #[test]
    fn problems_name_the_tier_and_fixes_name_the_object() {
        let hidden = SharingProblem::RecordNotVisible {
            sobject: "Lead".into(),
            key_field: "BookMe__Lead_Key__c".into(),
            record_id: "00Q5g00000000AAAAA".into(),
        };
        let text = hidden.to_string();
        assert!(
            text.starts_with("record-level security (sharing): "),
            "{text}"
        );
        assert!(text.contains("00Q5g00000000AAAAA"), "{text}");
        assert!(
            hidden.fix().contains("sharing rule on Lead"),
            "{}",
            hidden.fix()
        );
        assert!(
            hidden.fix().contains("\"Modify All\" on Lead"),
            "{}",
            hidden.fix()
        );
        let reference = SharingProblem::ReferenceNotVisible {
            sobject: "Event".into(),
            record_id: "00Q5g00000000AA".into(),
            referenced: Some("Lead".into()),
        };
        assert!(
            reference.fix().contains("to Lead records"),
            "{}",
            reference.fix()
        );
    }

    #[test]
    fn a_dead_letters_message_reads_back_as_its_problem() {
        for problem in [
            SharingProblem::RecordNotVisible {
                sobject: "Event".into(),
                key_field: "BookMe__Booking_Id__c".into(),
                record_id: "00U5g00000000AAAAA".into(),
            },
            SharingProblem::RecordReadOnly {
                sobject: "Event".into(),
            },
            SharingProblem::ReferenceNotVisible {
                sobject: "Event".into(),
                record_id: "00Q5g0000000001".into(),
                referenced: Some("Lead".into()),
            },
            SharingProblem::ReferenceNotVisible {
                sobject: "Event".into(),
                record_id: "00Q5g0000000001".into(),
                referenced: None,
            },
        ] {
            assert_eq!(
                SharingProblem::from_message(&problem.to_string()),
                Some(problem.clone()),
                "{problem}"
            );
        }
        assert_eq!(
            SharingProblem::from_message("Unable to create/update fields"),
            None
        );
    }

    #[test]
    fn the_failing_node_and_its_target_are_found() {
        let result: GraphResult = serde_json::from_str(
            r#"{"graphId":"g","isSuccessful":false,"graphResponse":{"compositeResponse":[
              {"body":[{"errorCode":"PROCESSING_HALTED","message":"The transaction was rolled back since another operation in the same transaction failed."}],"httpHeaders":{},"httpStatusCode":400,"referenceId":"lead_0"},
              {"body":[{"errorCode":"INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY","fields":[],"message":"insufficient access rights on cross-reference id: 00Q5g0000000001"}],"httpHeaders":{},"httpStatusCode":400,"referenceId":"event"}]}}"#,
        )
        .unwrap();
        let nodes = [
            node(
                "lead_0",
                "PATCH",
                "/services/data/v66.0/sobjects/Lead/BookMe__Lead_Key__c/acme:a@b.example",
            ),
            node(
                "event",
                "PATCH",
                "/services/data/v66.0/sobjects/Event/BookMe__Booking_Id__c/bk_1",
            ),
        ];
        let (found, error) = failing_node(&result, &nodes).unwrap();
        assert_eq!(found.reference_id, "event");
        assert_eq!(
            trailing_id(&error.message).as_deref(),
            Some("00Q5g0000000001")
        );
        assert_eq!(
            node_target(&nodes[0]),
            ("Lead".to_owned(), Some("BookMe__Lead_Key__c".to_owned()))
        );
        assert_eq!(
            node_target(&node(
                "x",
                "PATCH",
                "/services/data/v66.0/sobjects/Lead/00Q5g0000000001AAA"
            )),
            ("Lead".to_owned(), None)
        );
        assert_eq!(trailing_id("insufficient access rights on object id"), None);
    }
}
