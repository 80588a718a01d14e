//! One tenant's org in an outage does not hold up another tenant: the broken tenant's circuit
//! opens, its events wait in the retry tiers, and they flow once the org is back.

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, wait_until};
use portals_crm::demo::simple_booking;
use portals_crm::emulator::{self, FaultSpec, OrgSpec};
use serde_json::{Value, json};

fn booking(tenant: &str, i: usize) -> Vec<u8> {
    simple_booking(tenant, i, tenant)
}

fn written(env: &TestEnv, tenant: &str) -> u64 {
    let text = env.service().metrics.render();
    let needle = format!(
        "portals_crm_events_settled_total{{outcome=\"written\",tenant=\"{tenant}\",type=\"booked\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn an_org_outage_pauses_only_its_tenant() {
    let down = emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        OrgSpec::demo(),
        &FaultSpec {
            outage_seconds: Some(3600),
            ..FaultSpec::default()
        },
    )
    .await
    .unwrap();
    let down_url = down.base_url.clone();
    let env = TestEnv::start_custom(
        "isolation",
        |c| {
            c.retry.tiers_secs = vec![1, 2, 3, 4, 5, 6, 7, 8];
            c.salesforce.circuit_failures = 2;
            c.salesforce.circuit_cooldown_secs = 1;
        },
        |tenants| {
            for t in tenants.iter_mut().filter(|t| t.tenant == "demo") {
                t.org.login_url = down_url.clone();
            }
        },
    )
    .await;

    for i in 0..20 {
        env.publish("meeting.booked", &booking("demo", i)).await;
    }
    let started = Instant::now();
    for i in 0..20 {
        env.publish("meeting.booked", &booking("acme", i)).await;
    }
    // The bound: the healthy tenant's 20 bookings are all in its org within 5 s of publishing,
    // while the other tenant's org answers nothing but 503.
    wait_until(
        "acme's bookings written",
        Duration::from_secs(5),
        || async {
            match written(&env, "acme") {
                20 => Ok(()),
                n => Err(format!("{n} written: {:?}", env.outcomes())),
            }
        },
    )
    .await;
    eprintln!(
        "acme: 20 bookings written in {:?} during demo's outage",
        started.elapsed()
    );
    assert_eq!(written(&env, "demo"), 0);
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains("portals_crm_circuit_open{tenant=\"demo\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portals_crm_circuit_open{tenant=\"acme\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portals_crm_retries_total{tenant=\"demo\""),
        "{metrics}"
    );

    let stats: Value = reqwest::get(format!("{}/__emulator/stats", down.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let calls: u64 = stats["requests"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(
        calls < 20,
        "the paused tenant's events did not each call its org: {stats}"
    );

    let cleared = reqwest::Client::new()
        .delete(format!("{}/__emulator/faults", down.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 204);
    wait_until(
        "demo's bookings written after the outage",
        Duration::from_secs(40),
        || async {
            match written(&env, "demo") {
                20 => Ok(()),
                n => Err(format!("{n} written: {:?}", env.outcomes())),
            }
        },
    )
    .await;
    let records: Value = reqwest::get(format!("{}/__emulator/records/Event", down.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(records.as_array().unwrap().len(), 20);
    assert!(
        env.service()
            .metrics
            .render()
            .contains("portals_crm_circuit_open{tenant=\"demo\"} 0")
    );
    env.finish().await;
    down.stop().await;
}

#[tokio::test]
async fn a_tenant_over_its_quota_share_is_paused() {
    let env = TestEnv::start_with("quota", |c| {
        c.retry.tiers_secs = vec![30];
        c.salesforce.circuit_cooldown_secs = 30;
    })
    .await;
    // 60 % of the daily requests already used; acme may use 50 %.
    env.post_json("/__emulator/faults", json!({"api_quota_remaining": 40_000}))
        .await;
    env.publish("meeting.booked", &booking("acme", 0)).await;
    env.wait_settled(1).await;
    let calls_before: Value = env.get_json("/__emulator/stats").await;
    for i in 1..=10 {
        env.publish("meeting.booked", &booking("acme", i)).await;
    }
    env.wait_settled(11).await;
    assert_eq!(written(&env, "acme"), 1, "{:?}", env.outcomes());
    assert_eq!(env.outcomes().get("retried"), Some(&10));
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains("portals_crm_circuit_open{tenant=\"acme\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portals_crm_salesforce_api_usage_ratio{tenant=\"acme\"} 0.6"),
        "{metrics}"
    );
    let calls_after: Value = env.get_json("/__emulator/stats").await;
    assert_eq!(
        calls_before["api_calls"], calls_after["api_calls"],
        "paused: no calls to the org"
    );
    env.finish().await;
}
