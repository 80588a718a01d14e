//! Micro-benches of the CPU-bound stages: decode, plan, classify.
//! `cargo bench --bench pipeline`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use portals_crm::config::TenantConfig;
use portals_crm::enrich::Enrichment;
use portals_crm::event::{DEFAULT_MAX_BODY_BYTES, decode};
use portals_crm::plan::CompiledMapping;
use portals_crm::salesforce::error::classify_api_error;
use portals_crm::salesforce::model::{ApiError, GraphResponse};

const BOOKED: &[u8] = include_bytes!("../tests/fixtures/events/booked.json");
const GROUP: &[u8] = include_bytes!("../tests/fixtures/events/booked-group.json");
const FAILED_GRAPH: &str = include_str!("../tests/fixtures/salesforce/graph-response-error.json");

fn benches(c: &mut Criterion) {
    c.bench_function("decode booked.json", |b| {
        b.iter(|| decode(black_box(BOOKED), DEFAULT_MAX_BODY_BYTES).unwrap())
    });
    let mut tenant: TenantConfig =
        toml::from_str(include_str!("../config/tenants/acme.toml")).unwrap();
    tenant.tenant = "acme".into();
    let mapping = CompiledMapping::compile(&tenant).unwrap();
    let event = decode(GROUP, DEFAULT_MAX_BODY_BYTES).unwrap();
    let enrichment = Enrichment {
        host_user_id: Some("0055g0000000003AAA".into()),
        integration_user_id: "0055g0000000001AAA".into(),
    };
    c.bench_function("plan group booking (4 nodes)", |b| {
        b.iter(|| mapping.build_graph(black_box(&event), &enrichment).unwrap())
    });
    let response: GraphResponse = serde_json::from_str(FAILED_GRAPH).unwrap();
    c.bench_function("classify a failed graph", |b| {
        b.iter(|| {
            let error = black_box(&response.graphs[0]).root_error().unwrap();
            classify_api_error(&error)
        })
    });
    let stale = ApiError::new(
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "STALE_BOOKING_VERSION",
        vec![],
    );
    c.bench_function("classify one error", |b| {
        b.iter(|| classify_api_error(black_box(&stale)))
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
