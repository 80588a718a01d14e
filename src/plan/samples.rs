//! The built-in sample events (the fixtures the tests and README use), and what a mapping does
//! with them: a mapping that cannot render one of them — a template over its fuel or size
//! bound, an unknown name — is a validation problem before it can reach a real booking.

use crate::config::TenantConfig;
use crate::enrich::Enrichment;
use crate::event::{BookingEvent, DEFAULT_MAX_BODY_BYTES, decode};

use super::CompiledMapping;
use super::validate::MappingProblem;

/// The samples, by name: `(name, CloudEvent JSON)`.
pub const SAMPLES: [(&str, &str); 4] = [
    (
        "booked",
        include_str!("../../tests/fixtures/events/booked.json"),
    ),
    (
        "booked-group",
        include_str!("../../tests/fixtures/events/booked-group.json"),
    ),
    (
        "rescheduled",
        include_str!("../../tests/fixtures/events/rescheduled.json"),
    ),
    (
        "cancelled",
        include_str!("../../tests/fixtures/events/cancelled.json"),
    ),
];

/// The sample called `name`, decoded.
pub fn sample(name: &str) -> Option<BookingEvent> {
    SAMPLES
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, text)| decode(text.as_bytes(), DEFAULT_MAX_BODY_BYTES).ok())
}

/// The enrichment a preview without an org uses: no host user, a placeholder integration user.
pub fn sample_enrichment() -> Enrichment {
    Enrichment {
        host_user_id: None,
        integration_user_id: "005000000000000AAA".into(),
    }
}

/// Problems of rendering `tenant`'s mapping for every sample: one per record and field that
/// fails, naming the sample. A mapping that does not compile has none here (its compile
/// problems are reported where it is compiled).
pub fn sample_problems(tenant: &TenantConfig) -> Vec<MappingProblem> {
    let Ok(mapping) = CompiledMapping::compile(tenant) else {
        return Vec::new();
    };
    let mut problems: Vec<MappingProblem> = Vec::new();
    for (name, _) in SAMPLES {
        let Some(event) = sample(name) else { continue };
        let Err(error) = mapping.build_graph(&event, &sample_enrichment()) else {
            continue;
        };
        let sobject = tenant
            .records
            .iter()
            .find(|r| r.reference == error.record)
            .map_or("", |r| r.sobject.as_str());
        let target = format!("{sobject}.{}", error.field);
        // The first sample that shows a field's problem is enough.
        if problems
            .iter()
            .any(|p| p.record == error.record && p.target == target)
        {
            continue;
        }
        problems.push(MappingProblem {
            tenant: tenant.tenant.clone(),
            record: error.record.clone(),
            target: target.clone(),
            problem: format!("fails on the sample event {name:?}: {}", error.message),
            fix: format!("change the template of {target} so it renders for every booking"),
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sample_decodes_and_the_shipped_mapping_renders_them() {
        for (name, _) in SAMPLES {
            assert!(sample(name).is_some(), "{name}");
        }
        let mut tenant: TenantConfig =
            toml::from_str(include_str!("../../config/tenants/acme.toml")).unwrap();
        tenant.tenant = "acme".into();
        assert_eq!(sample_problems(&tenant), []);
        tenant.records[1].fields.insert(
            "Location".into(),
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                .into(),
        );
        let problems = sample_problems(&tenant);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].record, "event");
        assert_eq!(problems[0].target, "Event.Location");
        assert!(problems[0].problem.contains("steps"));
    }
}
