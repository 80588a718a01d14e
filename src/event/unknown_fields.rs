//! Fields the event contract does not know (yet): a tolerant reader ignores them, so a release
//! of the booking platform that adds a field does not dead-letter every event. They are counted
//! per field name and each name is logged once, so the contract can catch up.
//!
//! Field names come from producers, so the label set is bounded twice: array indices are folded
//! (`data.attendees[0].locale` and `data.attendees[3].locale` are both
//! `data.attendees[].locale`), and after [`MAX_FIELDS`] distinct names every new one is counted
//! as [`OTHER`].

use std::collections::HashSet;
use std::sync::Mutex;

use prometheus::{IntCounterVec, Opts, Registry};

/// Distinct field names counted before new ones are folded into [`OTHER`].
pub const MAX_FIELDS: usize = 100;

/// The label of every unknown field past [`MAX_FIELDS`].
pub const OTHER: &str = "_other";

/// The longest field path kept in a label or log line, in characters; longer ones are cut and
/// end in `…`.
const MAX_PATH_CHARS: usize = 120;

/// The normalised JSON path of an ignored field: object keys joined by `.`, arrays as `[]`.
pub fn normalise(path: &serde_ignored::Path<'_>) -> String {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut String) {
        use serde_ignored::Path;
        match path {
            Path::Root => {}
            Path::Seq { parent, .. } => {
                walk(parent, out);
                out.push_str("[]");
            }
            Path::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    if out.chars().count() > MAX_PATH_CHARS {
        out = out.chars().take(MAX_PATH_CHARS - 1).collect();
        out.push('…');
    }
    out
}

/// `portals_crm_event_unknown_fields_total{field}`: events that carried a field the contract
/// does not know, by normalised field path.
pub struct UnknownFields {
    counter: IntCounterVec,
    seen: Mutex<HashSet<String>>,
}

impl UnknownFields {
    /// Creates the counter and registers it.
    ///
    /// Errors: the registry's, when the name is already registered.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let counter = IntCounterVec::new(
            Opts::new(
                "portals_crm_event_unknown_fields_total",
                "Events carrying a field the event contract does not know (ignored), by field path.",
            ),
            &["field"],
        )?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Self {
            counter,
            seen: Mutex::new(HashSet::new()),
        })
    }

    /// Counts the unknown fields of one decoded event; the first sighting of each name is
    /// logged with the event and tenant it came in.
    pub fn observe(&self, tenant: &str, event_id: &str, fields: &[String]) {
        for field in fields {
            let label = {
                let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                if seen.contains(field) {
                    field.as_str()
                } else if seen.len() < MAX_FIELDS {
                    seen.insert(field.clone());
                    tracing::info!(
                        field = %field,
                        tenant,
                        event_id,
                        "event field not in the contract, ignored (logged once per field)"
                    );
                    field.as_str()
                } else {
                    OTHER
                }
            };
            self.counter.with_label_values(&[label]).inc();
        }
    }

    /// Counts by field label, e.g. for a test or a summary.
    pub fn by_field(&self) -> std::collections::BTreeMap<String, u64> {
        use prometheus::core::Collector;
        let mut out = std::collections::BTreeMap::new();
        for family in self.counter.collect() {
            for metric in family.get_metric() {
                let field = metric
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "field")
                    .map(|l| l.value().to_owned())
                    .unwrap_or_default();
                *out.entry(field).or_default() += metric.get_counter().get_value() as u64;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cardinality_is_capped() {
        let registry = Registry::new();
        let unknown = UnknownFields::register(&registry).unwrap();
        let fields: Vec<String> = (0..MAX_FIELDS + 5).map(|i| format!("data.x{i}")).collect();
        unknown.observe("acme", "evt_1", &fields);
        unknown.observe("acme", "evt_2", &fields[..1]);
        let counts = unknown.by_field();
        assert_eq!(counts.len(), MAX_FIELDS + 1);
        assert_eq!(counts.get(OTHER), Some(&5));
        assert_eq!(counts.get("data.x0"), Some(&2));
    }
}
