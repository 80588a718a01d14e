//! One tenant's slow org does not hold the prefetch window every tenant shares: a tenant at its
//! limit of messages in flight has the rest of its messages parked in the first retry tier
//! (`tenant_busy`, no attempt spent), so another tenant's bookings, published behind a backlog
//! of the slow one's, are written while the slow org still answers nothing; once the slow org
//! answers, every one of its bookings is written exactly once.

mod common;

use std::time::Duration;

use common::{TestEnv, wait_until};
use portals_crm::demo::simple_booking;
use portals_crm::emulator::{self, FaultSpec, OrgSpec};
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

#[tokio::test]
async fn a_slow_org_does_not_hold_up_the_other_tenants() {
    const SLOW: usize = 120;
    const FAST: usize = 40;
    // The slow tenant's org answers data requests after an hour, i.e. not during this test,
    // until the test lowers the latency (which applies to the requests already waiting).
    let slow = emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        OrgSpec::demo(),
        &FaultSpec {
            latency_ms: Some(3_600_000),
            ..FaultSpec::default()
        },
    )
    .await
    .unwrap();
    let slow_url = slow.base_url.clone();
    let env = TestEnv::start_custom(
        "fairness",
        |c| {
            // Per tenant (1 + 1) × 5 = 10 messages in flight, out of 20 for the worker: without
            // the limit the slow tenant's backlog would take all 20 and keep them.
            c.batch.max_graphs = 5;
            c.batch.max_in_flight = 1;
            c.worker.concurrency = 20;
            c.amqp.prefetch = 20;
            c.retry.tiers_secs = vec![1, 2, 3];
            c.salesforce.timeout_secs = 3600;
        },
        |tenants| {
            for t in tenants.iter_mut().filter(|t| t.tenant == "demo") {
                t.org.login_url = slow_url.clone();
            }
        },
    )
    .await;

    for i in 0..SLOW {
        env.publish("meeting.booked", &simple_booking("slow", i, "demo"))
            .await;
    }
    for i in 0..FAST {
        env.publish("meeting.booked", &simple_booking("fast", i, "acme"))
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

    let released = reqwest::Client::new()
        .post(format!("{slow_url}/__emulator/faults"))
        .json(&json!({"latency_ms": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(released.status(), 200);
    wait_until(
        "the slow tenant's bookings written once its org answers",
        Duration::from_secs(120),
        || async {
            match settled(&env, "demo", "written") {
                n if n == SLOW as u64 => Ok(()),
                n => Err(format!("{n} written: {:?}", env.outcomes())),
            }
        },
    )
    .await;
    let records: Value = reqwest::get(format!("{slow_url}/__emulator/records/Event"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records.as_array().unwrap().len(), SLOW);
    // Exactly once: no booking was written twice (a second write would settle as superseded)
    // and none dead-lettered; parking spent no attempt.
    assert_eq!(settled(&env, "demo", "superseded"), 0);
    assert_eq!(settled(&env, "acme", "superseded"), 0);
    assert!(env.drain_dead_letters().await.is_empty());
    env.finish().await;
    slow.stop().await;
}
