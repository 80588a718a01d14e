//! What relations a booking's Event has in the org, for [`crate::plan::relations`]: from the
//! sled `relations` tree in the steady state (no API call), or, on a miss, from ONE SOQL query
//! for every booking of a Composite Graph request that missed.
//!
//! Why this keeps relations exactly once without an external id:
//! - Version 1 is planned on no relations: only a graph of version 1 can have related the new
//!   Event, and a second one of those fails on the duplicate below.
//! - A cached entry is the org's state after the graph of version `v` committed (written only
//!   then). It is used only for version `v + 1`: the version guard makes the org's booking
//!   version at least `v`, and if it is exactly `v` its relations are what that graph left. If
//!   another worker wrote a version in between, the cache is not used and the org is read.
//! - Whatever the view, the graph that acts on it is all-or-nothing and carries the version
//!   guard: a stale version rolls the relation changes back with the rest.
//! - A view that is wrong anyway (two workers writing the same version at once) makes the graph
//!   fail instead of duplicating: Salesforce refuses a second relation of a person to an event
//!   (`DUPLICATE_VALUE`), and a relation deleted meanwhile answers 404 to its `DELETE`. The
//!   batcher then forgets the entry, re-reads the org and sends the graph once more.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Caches, key};
use crate::plan::relations::{Existing, Keyed, Wanted, lookup_query};
use crate::salesforce::{SalesforceClient, SalesforceError};

/// A booking's relations as the last graph written left them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelationsEntry {
    /// The booking version of that graph.
    pub version: u64,
    /// The relations.
    pub relations: Vec<Existing>,
}

impl Caches {
    /// The relations to plan version `version` on: the cached entry of version `version - 1`.
    pub fn relations_for(
        &self,
        tenant: &str,
        booking_id: &str,
        version: u64,
    ) -> Option<Vec<Existing>> {
        let entry = self
            .relations
            .get(key(tenant, booking_id))
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<RelationsEntry>(&bytes).ok())
            .filter(|e| e.version + 1 == version);
        self.metrics.cache("relations", entry.is_some());
        entry.map(|e| e.relations)
    }

    /// Records the relations a committed graph left (`None`: unknown, the entry is dropped).
    pub fn relations_put(&self, tenant: &str, booking_id: &str, entry: Option<&RelationsEntry>) {
        let k = key(tenant, booking_id);
        let result = match entry.map(serde_json::to_vec) {
            Some(Ok(bytes)) => self.relations.insert(k, bytes).map(drop),
            Some(Err(_)) | None => self.relations.remove(k).map(drop),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "relations cache update failed");
        }
    }

    /// Reads the relations of several bookings' Events with one query. `wanted` gives each
    /// booking's Event key; the answer is in the same order.
    pub async fn read_relations(
        &self,
        client: &SalesforceClient,
        wanted: &[&Wanted],
    ) -> Result<Vec<Vec<Existing>>, SalesforceError> {
        let Some(first) = wanted.first() else {
            return Ok(Vec::new());
        };
        let mut types: Vec<(String, String)> = Vec::new();
        for w in wanted {
            for r in &w.relations {
                let t = (r.record.sobject.clone(), r.record.field.clone());
                if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        let keys: Vec<String> = wanted.iter().map(|w| w.event.key.clone()).collect();
        let soql = lookup_query(&first.event, &types, &keys);
        let rows = client.query(&soql).await?;
        Ok(wanted
            .iter()
            .map(|w| {
                rows.iter()
                    .filter(|row| {
                        event_key(row, &w.event)
                            .is_some_and(|k| k.eq_ignore_ascii_case(&w.event.key))
                    })
                    .map(|row| Existing {
                        id: text(row.get("Id")),
                        key: relation_key(row, &types),
                        relation_id: text(row.get("RelationId")),
                        is_parent: row.get("IsParent") == Some(&Value::Bool(true)),
                        is_invitee: row.get("IsInvitee") == Some(&Value::Bool(true)),
                    })
                    .collect()
            })
            .collect())
    }
}

fn text(value: Option<&Value>) -> String {
    value.and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn event_key<'a>(row: &'a serde_json::Map<String, Value>, event: &Keyed) -> Option<&'a str> {
    row.get("Event")?.get(&event.field)?.as_str()
}

/// The related record's key through `TYPEOF` (empty for a type the mapping does not write).
fn relation_key(row: &serde_json::Map<String, Value>, types: &[(String, String)]) -> String {
    let Some(relation) = row.get("Relation") else {
        return String::new();
    };
    let sobject = relation
        .pointer("/attributes/type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    types
        .iter()
        .find(|(t, _)| t == sobject)
        .map(|(_, field)| text(relation.get(field)))
        .unwrap_or_default()
}
