//! One tenant's slow org does not hold up the others. Events carrying the tenant header
//! (`cloudEvents_tenantid`) wait in their tenant's own queue, consumed with the tenant's
//! in-flight limit as prefetch: a neighbour's thousands of bookings wait there, not parked,
//! while the fast tenant's are written. Events without the header (or for a tenant without a
//! queue) take the shared queue, where a tenant at its limit of messages in flight has the rest
//! parked in the first retry tier (`tenant_busy`, no attempt spent). Either way, once the slow
//! org answers, every one of its bookings is written exactly once. Reloads add and remove
//! tenant queues' consumers and bindings.

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, wait_until};
use lapin::types::{AMQPValue, FieldTable};
use portals_crm::amqp::topology::TENANT_HEADER_COLON;
use portals_crm::config::{Config, TenantConfig};
use portals_crm::demo::simple_booking;
use portals_crm::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec};
use portals_crm::service::Service;
use serde_json::{Value, json};

/// `portals_crm_events_settled_total` for `tenant`'s `booked` events with `outcome`.
fn settled(env: &TestEnv, tenant: &str, outcome: &str) -> u64 {
    let text = env.service().metrics.render();
    let needle = format!(
        "portals_crm_events_settled_total{{outcome=\"{outcome}\",tenant=\"{tenant}\",type=\"booked\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn parked(env: &TestEnv, tenant: &str) -> u64 {
    let text = env.service().metrics.render();
    let needle = format!("portals_crm_tenant_busy_total{{tenant=\"{tenant}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// An org that answers data requests after an hour, i.e. not during a test, until the test
/// lowers the latency (which applies to the requests already waiting too).
async fn slow_org() -> EmulatorHandle {
    emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        OrgSpec::demo(),
        &FaultSpec {
            latency_ms: Some(3_600_000),
            ..FaultSpec::default()
        },
    )
    .await
    .unwrap()
}

/// Per tenant (1 + 1) × 5 = 10 messages in flight, out of 20 for the worker: without the limit
/// the slow tenant's backlog would take all 20 and keep them.
fn small_limits(c: &mut Config) {
    c.batch.max_graphs = 5;
    c.batch.max_in_flight = 1;
    c.worker.concurrency = 20;
    c.amqp.prefetch = 20;
    c.retry.tiers_secs = vec![1, 2, 3];
    c.salesforce.timeout_secs = 3600;
}

/// The `demo` tenant pointed at `org`.
fn demo_at(org: &EmulatorHandle) -> impl FnOnce(&mut [TenantConfig]) {
    let url = org.base_url.clone();
    move |tenants| {
        for t in tenants.iter_mut().filter(|t| t.tenant == "demo") {
            t.org.login_url = url.clone();
        }
    }
}

/// Lowers the slow org's latency to nothing, then waits for its `n` bookings, each written
/// once, none dead-lettered.
async fn release_and_check(env: &TestEnv, slow: &EmulatorHandle, n: usize) {
    let released = reqwest::Client::new()
        .post(format!("{}/__emulator/faults", slow.base_url))
        .json(&json!({"latency_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    wait_until(
        "the slow tenant's bookings written once its org answers",
        Duration::from_secs(300),
        || async {
            match settled(env, "demo", "written") {
                w if w == n as u64 => Ok(()),
                w => Err(format!("{w} written: {:?}", env.outcomes())),
            }
        },
    )
    .await;
    let records: Value = reqwest::get(format!("{}/__emulator/records/Event", slow.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records.as_array().unwrap().len(), n);
    // Exactly once: no booking was written twice (a second write would settle as superseded)
    // and none dead-lettered; parking spent no attempt.
    assert_eq!(settled(env, "demo", "superseded"), 0);
    assert_eq!(settled(env, "acme", "superseded"), 0);
    assert!(env.drain_dead_letters().await.is_empty());
}

/// Waits until `tenant`'s queue exists (the worker declares it once connected) and has
/// `consumers`.
async fn consumed_by(env: &TestEnv, tenant: &str, consumers: u32) {
    let queue = env.topology.tenant_queue(tenant).unwrap();
    wait_until(
        &format!("{consumers} consumers of {queue}"),
        Duration::from_secs(10),
        || async {
            match env.queue_exists(&queue).await {
                Some((_, n)) if n == consumers => Ok(()),
                seen => Err(format!("(ready, consumers) {seen:?}")),
            }
        },
    )
    .await;
}

/// Waits until the worker consumes every tenant's queue.
async fn tenant_queues_consumed(env: &TestEnv) {
    for tenant in ["acme", "demo"] {
        consumed_by(env, tenant, 1).await;
    }
}

/// Waits until `tenant` has `n` bookings written.
async fn written(env: &TestEnv, what: &str, tenant: &str, n: usize) {
    wait_until(what, Duration::from_secs(120), || async {
        match settled(env, tenant, "written") {
            w if w == n as u64 => Ok(()),
            w => Err(format!("{w} written: {:?}", env.outcomes())),
        }
    })
    .await;
}

#[tokio::test]
async fn with_the_tenant_header_a_neighbours_backlog_waits_in_its_own_queue() {
    const SLOW: usize = 3_000;
    const FAST: usize = 40;
    let slow = slow_org().await;
    let env = TestEnv::start_custom("fairness-queues", small_limits, demo_at(&slow)).await;
    let demo_queue = env.topology.tenant_queue("demo").unwrap();
    tenant_queues_consumed(&env).await;
    let started = Instant::now();
    for i in 0..SLOW {
        env.publish("meeting.booked", &simple_booking("slow", i, "demo"))
            .await;
    }
    for i in 0..FAST {
        env.publish("meeting.booked", &simple_booking("fast", i, "acme"))
            .await;
    }
    written(
        &env,
        "the fast tenant's bookings written beside the slow tenant's backlog",
        "acme",
        FAST,
    )
    .await;
    eprintln!(
        "fast tenant's {FAST} written {} ms after the first of {SLOW} slow bookings was published",
        started.elapsed().as_millis()
    );
    assert_eq!(
        settled(&env, "demo", "written"),
        0,
        "the slow org answered nothing yet"
    );
    let (waiting, consumers) = env.queue_state(&demo_queue).await;
    assert_eq!(consumers, 1);
    assert!(
        waiting as usize >= SLOW - 10,
        "the backlog waits in the slow tenant's queue, beyond its 10 in flight: {waiting}"
    );
    assert!(
        parked(&env, "demo") <= (SLOW / 100) as u64,
        "almost none of the backlog parked: {}",
        parked(&env, "demo")
    );
    assert_eq!(parked(&env, "acme"), 0);
    assert_eq!(env.queue_state(&env.topology.work_queue).await.0, 0);
    assert_eq!(env.records("Event").await.len(), FAST);
    release_and_check(&env, &slow, SLOW).await;
    env.finish().await;
    slow.stop().await;
}

#[tokio::test]
async fn without_the_header_a_slow_org_is_parked_on_the_shared_queue() {
    const SLOW: usize = 120;
    const FAST: usize = 40;
    let slow = slow_org().await;
    let env = TestEnv::start_custom("fairness", small_limits, demo_at(&slow)).await;

    // Header-less, as every publisher was before the header: the shared queue, as before.
    for i in 0..SLOW {
        env.publish_with("meeting.booked", &simple_booking("slow", i, "demo"), None)
            .await;
    }
    for i in 0..FAST {
        env.publish_with("meeting.booked", &simple_booking("fast", i, "acme"), None)
            .await;
    }
    wait_until(
        "the fast tenant's bookings written behind the slow tenant's backlog",
        Duration::from_secs(120),
        || async {
            match settled(&env, "acme", "written") {
                n if n == FAST as u64 => Ok(()),
                n => Err(format!("{n} written: {:?}", env.outcomes())),
            }
        },
    )
    .await;
    assert_eq!(
        settled(&env, "demo", "written"),
        0,
        "the slow org answered nothing yet"
    );
    assert!(
        parked(&env, "demo") > 0,
        "the slow tenant's excess was parked"
    );
    assert_eq!(
        parked(&env, "acme"),
        0,
        "the fast tenant never hit its limit"
    );
    assert_eq!(env.records("Event").await.len(), FAST);

    release_and_check(&env, &slow, SLOW).await;
    env.finish().await;
    slow.stop().await;
}

#[tokio::test]
async fn events_for_no_tenant_queue_take_the_shared_queue() {
    let mut env = TestEnv::start("fairness-route").await;
    tenant_queues_consumed(&env).await;
    // Stopped, so that the queues show where each event went.
    env.stop_service().await;
    let shared = env.topology.work_queue.clone();
    let acme = env.topology.tenant_queue("acme").unwrap();
    let booking = |i| simple_booking("route", i, "acme");
    env.publish_with("meeting.booked", &booking(0), Some("acme"))
        .await;
    env.publish_with("meeting.booked", &booking(1), None).await;
    // A tenant with no queue: the alternate exchange; the body's tenant decides, as today.
    env.publish_with("meeting.booked", &booking(2), Some("nobody"))
        .await;
    env.publish_with(
        "meeting.booked",
        &simple_booking("route", 3, "nobody"),
        Some("nobody"),
    )
    .await;
    // The binding's other separator.
    let mut headers = FieldTable::default();
    headers.insert(
        TENANT_HEADER_COLON.into(),
        AMQPValue::LongString("acme".into()),
    );
    env.publisher
        .publish_republishing(
            &env.topology.exchange,
            "meeting.booked",
            &booking(4),
            portals_crm::amqp::event_properties(None).with_headers(headers),
        )
        .await
        .unwrap();
    wait_until(
        "each event in its queue",
        Duration::from_secs(10),
        || async {
            match (
                env.queue_state(&acme).await.0,
                env.queue_state(&shared).await.0,
            ) {
                (2, 3) => Ok(()),
                seen => Err(format!("(tenant, shared) = {seen:?}")),
            }
        },
    )
    .await;
    env.run_service(
        Service::start(&env.config, env.tenants.clone())
            .await
            .unwrap(),
    );
    written(&env, "every acme booking written", "acme", 4).await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "unknown_tenant");
    env.finish().await;
}

#[tokio::test]
async fn a_reload_adds_and_removes_tenant_queues() {
    let env = TestEnv::start_from_files("fairness-reload", OrgSpec::demo(), |_| {}).await;
    let demo = env.topology.tenant_queue("demo").unwrap();
    tenant_queues_consumed(&env).await;
    let channels = env.worker_channels().expect("the worker's connection");
    let file = env.config.tenants.dir.join("demo.toml");
    let off = env.config.tenants.dir.join("demo.toml.off");
    std::fs::rename(&file, &off).unwrap();
    assert_eq!(
        env.service().reloader.reload().await.unwrap(),
        vec!["acme".to_owned()]
    );
    // No longer consumed, and kept.
    consumed_by(&env, "demo", 0).await;
    // Its consumer's channel closes: tenants added and removed leave no channels behind.
    wait_until(
        "the removed tenant's channel to close",
        Duration::from_secs(10),
        || async {
            match env.worker_channels() {
                Some(now) if now == channels - 1 => Ok(()),
                now => Err(format!("{now:?} channels, {channels} before the removal")),
            }
        },
    )
    .await;
    // Its binding is gone: a new event of it reaches the shared queue, as for any tenant not
    // configured.
    env.publish("meeting.booked", &simple_booking("reload", 0, "demo"))
        .await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "unknown_tenant");
    assert_eq!(env.queue_state(&demo).await.0, 0);

    std::fs::rename(&off, &file).unwrap();
    let mut names = env.service().reloader.reload().await.unwrap();
    names.sort();
    assert_eq!(names, vec!["acme".to_owned(), "demo".to_owned()]);
    consumed_by(&env, "demo", 1).await;
    assert_eq!(env.worker_channels(), Some(channels), "one channel again");
    env.publish("meeting.booked", &simple_booking("reload", 1, "demo"))
        .await;
    written(&env, "demo's booking written from its queue", "demo", 1).await;
    env.finish().await;
}
