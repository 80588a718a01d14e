//! What relations a booking's Event has in the org, for [`crate::plan::relations`]: from the
//! booking's ledger entry in the steady state (no API call; [`super::LedgerEntry::relations`]),
//! or, on a miss, from ONE SOQL query for every booking of a Composite Graph request that
//! missed.
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

use serde_json::Value;

use super::Caches;
use crate::plan::relations::{Existing, Keyed, Wanted, lookup_query};
use crate::salesforce::{SalesforceClient, SalesforceError};

impl Caches {
    /// Forgets what the ledger entry of a booking says of its Event's relations (a graph
    /// failed on them: the next plan reads the org).
    pub fn forget_relations(&self, tenant: &str, booking_id: &str) {
        let Some(mut entry) = self.ledger_get(tenant, booking_id) else {
            return;
        };
        if entry.relations.take().is_some() {
            self.ledger_put(tenant, booking_id, &entry);
        }
    }

    /// Counts a graph planned on the ledger's relations (`hit`) or on the org's.
    pub fn count_relations_hit(&self, hit: bool) {
        self.metrics.cache("relations", hit);
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
        let soql = lookup_query(&first.event, &types, &keys, first.with_parent);
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
