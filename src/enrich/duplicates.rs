//! The records a tenant writes as existing ones because a duplicate rule matched them
//! (`duplicate_rule = "relate_to_existing"`, see [`crate::plan::duplicates`]), remembered per
//! record of the mapping (tenant + sObject + external id field + key): the next version of the
//! booking, or the next booking of the same attendee, leaves the record out from the start
//! and does not meet the rule again. Losing the tree costs one refused graph per attendee.

use serde::{Deserialize, Serialize};

use super::{Caches, key};
use crate::plan::duplicates::Related;
use crate::plan::relations::Keyed;

/// The existing record a record of the mapping is written as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    /// Its sObject.
    pub sobject: String,
    /// Its id.
    pub id: String,
    /// The duplicate rule that matched it.
    pub rule: String,
    /// Lookups (`(node, field)`) that could not point at it, written empty.
    #[serde(default)]
    pub cleared: Vec<(String, String)>,
}

fn record_key(tenant: &str, record: &Keyed) -> Vec<u8> {
    key(
        tenant,
        &format!("{}/{}/{}", record.sobject, record.field, record.key),
    )
}

impl Caches {
    /// The existing record `record` was written as, if one was chosen.
    pub fn duplicate_get(&self, tenant: &str, record: &Keyed) -> Option<Choice> {
        let choice = self
            .duplicates
            .get(record_key(tenant, record))
            .ok()
            .flatten()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        self.metrics.cache("duplicates", choice.is_some());
        choice
    }

    /// Remembers that `related.record` is written as `related`'s existing record.
    pub fn duplicate_put(&self, tenant: &str, related: &Related) {
        let choice = Choice {
            sobject: related.sobject.clone(),
            id: related.id.clone(),
            rule: related.rule.clone(),
            cleared: related.cleared.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&choice)
            && let Err(error) = self
                .duplicates
                .insert(record_key(tenant, &related.record), bytes)
        {
            tracing::warn!(%error, "duplicates cache update failed");
        }
    }

    /// Forgets a choice (its record was refused: deleted or merged since).
    pub fn duplicate_forget(&self, tenant: &str, record: &Keyed) {
        if let Err(error) = self.duplicates.remove(record_key(tenant, record)) {
            tracing::warn!(%error, "duplicates cache update failed");
        }
    }
}
