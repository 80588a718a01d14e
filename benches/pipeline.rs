//! Micro-benches of the CPU-bound stages: decode, plan, classify; and the emulator's side of a
//! Composite Graph request, so its CPU per booking can be compared between builds.
//! `cargo bench --bench pipeline`.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use portals_crm::config::TenantConfig;
use portals_crm::emulator::OrgSpec;
use portals_crm::emulator::engine::{GraphReply, Meta, OrgState};
use portals_crm::emulator::store::Store;
use portals_crm::enrich::Enrichment;
use portals_crm::event::{DEFAULT_MAX_BODY_BYTES, decode};
use portals_crm::plan::CompiledMapping;
use portals_crm::salesforce::error::classify_api_error;
use portals_crm::salesforce::model::{ApiError, Graph, GraphRequest, GraphResponse};
use portals_crm::telemetry::json_lines::JsonLines;
use tracing_subscriber::fmt::format::JsonFields;

/// The allocator the service runs with (src/main.rs), so that what is timed here is what the
/// worker and the emulator spend: with glibc's, malloc and free were a third of the emulator's
/// time in this bench.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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

/// The emulator answering one request of 75 new group bookings (300 nodes: two Leads, the Event,
/// the BookMe record and their relations each), on a fresh demo org each time, with the
/// duplicate-rule header the worker sends by default (`allowSave=true`): the body read from its
/// bytes and the answer written to bytes, as the server does.
fn emulator(c: &mut Criterion) {
    const INTEGRATION: &str = "integration@bookme-demo.example";
    let mut tenant: TenantConfig =
        toml::from_str(include_str!("../config/tenants/acme.toml")).unwrap();
    tenant.tenant = "acme".into();
    let mapping = CompiledMapping::compile(&tenant).unwrap();
    let org = OrgSpec::demo();
    let integration_user_id = Store::with_users(&org).1[INTEGRATION].clone();
    let enrichment = Enrichment {
        host_user_id: Some(integration_user_id.clone()),
        integration_user_id,
    };
    let graphs = (0..75)
        .map(|i| {
            let mut event: serde_json::Value = serde_json::from_slice(GROUP).unwrap();
            event["data"]["booking_id"] = format!("bk_bench{i}").into();
            for (n, attendee) in event["data"]["attendees"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .enumerate()
            {
                // Unique people: the demo org's duplicate rule matches Leads by name too.
                attendee["email"] = format!("a{n}.b{i}@bench.example").into();
                attendee["last_name"] = format!("Bench{i}x{n}").into();
            }
            let event =
                decode(&serde_json::to_vec(&event).unwrap(), DEFAULT_MAX_BODY_BYTES).unwrap();
            Graph {
                graph_id: format!("g{i}"),
                composite_request: mapping.build_graph(&event, &enrichment).unwrap(),
            }
        })
        .collect();
    let request = GraphRequest { graphs };
    let meta = Meta {
        allow_save: true,
        ..Meta::default()
    };
    let reply = OrgState::new(org.clone())
        .execute_graph(INTEGRATION, request.clone(), meta)
        .into_reply();
    let answer = reply.body.expect("a Composite Graph answer");
    let failed = answer["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["isSuccessful"] != true);
    assert!(failed.is_none(), "every graph is written: {failed:?}");
    let body = serde_json::to_vec(&request).unwrap();
    c.bench_function("emulator: Composite Graph of 75 new group bookings", |b| {
        b.iter_batched(
            || OrgState::new(org.clone()),
            |mut state| {
                let request: GraphRequest = serde_json::from_slice(black_box(&body)).unwrap();
                let GraphReply::Answered(answers) = state.execute_graph(INTEGRATION, request, meta)
                else {
                    panic!("the request is refused");
                };
                let answer = serde_json::to_vec(&answers).unwrap();
                (state, answer)
            },
            BatchSize::LargeInput,
        )
    });
}

/// One audit record as the worker writes it per Salesforce write (`Pipeline::record_write`):
/// formatted as a JSON line inside the message's span, into a writer that drops it, so what is
/// timed is the formatting the worker's threads do (the log thread's `write(2)` is not).
fn audit(c: &mut Criterion) {
    let subscriber = tracing_subscriber::fmt()
        .fmt_fields(JsonFields::new())
        .event_format(JsonLines)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!(
            "message",
            event_id = "9a7c1e52-3c1f-4e0e-9d7f-2f1d6f1b9a01",
            tenant = "acme",
            booking_id = "bk_2026_000123",
            attempt = 1
        );
        let _entered = span.enter();
        c.bench_function("audit record (one JSON line)", |b| {
            b.iter(|| {
                tracing::info!(
                    target: "portals_crm::audit",
                    tenant = black_box("acme"),
                    booking_id = black_box("bk_2026_000123"),
                    version = black_box(3u64),
                    sobject = black_box("Lead"),
                    record_id = black_box("00Q5g00000AbCdEFGH"),
                    created = black_box(true),
                    "salesforce write"
                );
            })
        });
    });
}

criterion_group!(micro, benches, emulator, audit);
criterion_main!(micro);
