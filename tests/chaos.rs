//! Chaos: 5,000 bookings (with reschedules and duplicates) through worker processes that are
//! SIGKILLed and restarted, a broker that closes their connection, 10 % 503 / UNABLE_TO_LOCK_ROW,
//! a token expiry and a 20 s outage. At the end every booking is in the org exactly once at its
//! newest version, or its newest version is in the dead letters with a reason.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::TestEnv;
use portals_crm::demo::scenario;
use serde_json::{Value, json};

/// Short retry tiers, so retried bookings come back within the test. The environment declares
/// (and at the end deletes) the same tier queues as the worker.
const TIERS_SECS: [u64; 6] = [1, 2, 4, 8, 16, 32];

fn spawn_worker(env: &TestEnv, tenants: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
        .arg("run")
        .envs(env.binary_env())
        .env("PORTALS_CRM_TENANTS_DIR", tenants)
        .env("PORTALS_CRM_RETRY_TIERS_SECS", format!("{TIERS_SECS:?}"))
        .env("PORTALS_CRM_SALESFORCE_CIRCUIT_COOLDOWN_SECS", "2")
        .env("PORTALS_CRM_WORKER_DRAIN_SECS", "5")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn close_worker_connection(env: &TestEnv) -> bool {
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    let Some(pid) = text
        .lines()
        .find(|l| l.contains(&format!("portals-crm worker {}", env.topology.work_queue)))
        .and_then(|l| l.split_whitespace().next())
    else {
        return false;
    };
    std::process::Command::new("rabbitmqctl")
        .args(["close_connection", pid, "chaos"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lost_nothing_twice_under_chaos() {
    let mut env = TestEnv::start_with("chaos", |c| c.retry.tiers_secs = TIERS_SECS.to_vec()).await;
    env.stop_service().await;
    let tenants = env.write_tenant_files();
    let messages = scenario(7_800, "chaos", 99);
    let mut newest: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
    for m in &messages {
        if portals_crm::event::decode(&m.body, 1 << 20).is_err() {
            continue;
        }
        let v: Value = serde_json::from_slice(&m.body).unwrap();
        let id = v["data"]["booking_id"].as_str().unwrap().to_owned();
        let version = v["data"]["version"].as_u64().unwrap();
        if newest.get(&id).is_none_or(|(n, _)| version > *n) {
            newest.insert(id, (version, m.body.clone()));
        }
    }
    eprintln!("{} messages, {} bookings", messages.len(), newest.len());
    env.post_json(
        "/__emulator/faults",
        json!({"error_rate": 0.1, "errors": ["503", "UNABLE_TO_LOCK_ROW"]}),
    )
    .await;

    let mut worker = spawn_worker(&env, &tenants);
    let publisher = env.publisher.clone();
    let exchange = env.topology.exchange.clone();
    let to_publish = messages.clone();
    let publishing = tokio::spawn(async move {
        for m in to_publish {
            let properties = lapin::BasicProperties::default()
                .with_content_type("application/cloudevents+json".into());
            publisher
                .publish_republishing(&exchange, &m.routing_key, &m.body, properties)
                .await
                .unwrap();
        }
    });
    let started = Instant::now();
    for (at, step) in [
        (2, "kill"),
        (4, "kill"),
        (6, "close"),
        (7, "expire"),
        (8, "outage"),
    ] {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            started + Duration::from_secs(at),
        ))
        .await;
        match step {
            "kill" => {
                worker.start_kill().unwrap();
                worker.wait().await.unwrap();
                eprintln!("t={at}s SIGKILL, restart");
                worker = spawn_worker(&env, &tenants);
            }
            "close" => eprintln!(
                "t={at}s broker closes the connection: {}",
                close_worker_connection(&env)
            ),
            "expire" => {
                env.post_json("/__emulator/faults", json!({"expire_tokens": true}))
                    .await;
                eprintln!("t={at}s tokens expired");
            }
            _ => {
                env.post_json("/__emulator/faults", json!({"outage_seconds": 20}))
                    .await;
                eprintln!("t={at}s 20 s outage");
            }
        }
    }
    publishing.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(240);
    let mut dead: Vec<common::DeadLetter> = Vec::new();
    let (written, dead_newest) = loop {
        dead.extend(env.drain_dead_letters().await);
        let dead_bodies: BTreeSet<&[u8]> = dead.iter().map(|d| d.body.as_slice()).collect();
        let org: BTreeMap<String, u64> = env
            .records("BookMe__Booking__c")
            .await
            .iter()
            .map(|b| {
                (
                    b["BookMe__Booking_Id__c"].as_str().unwrap().to_owned(),
                    b["BookMe__Version__c"].as_u64().unwrap(),
                )
            })
            .collect();
        let written = newest
            .iter()
            .filter(|(id, (v, _))| org.get(*id) == Some(v))
            .count();
        let dead_newest = newest
            .iter()
            .filter(|(id, (v, body))| {
                org.get(*id) != Some(v) && dead_bodies.contains(body.as_slice())
            })
            .count();
        if written + dead_newest == newest.len() {
            break (written, dead_newest);
        }
        assert!(
            Instant::now() < deadline,
            "after 240 s: {written} written at their newest version, {dead_newest} dead-lettered, of {}",
            newest.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let events = env.records("Event").await;
    let distinct: BTreeSet<&str> = events
        .iter()
        .map(|e| e["BookMe__Booking_Id__c"].as_str().unwrap())
        .collect();
    assert_eq!(events.len(), distinct.len(), "no booking has two Events");
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &dead {
        *reasons.entry(d.reason.as_str()).or_default() += 1;
        assert!(
            !d.reason.is_empty() && !d.message.is_empty(),
            "every dead letter has its reason"
        );
    }
    eprintln!(
        "bookings {}: {written} in the org at their newest version exactly once, {dead_newest} dead-lettered at their newest version; dead letters by reason {reasons:?}; lost 0",
        newest.len()
    );
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    env.finish().await;
}
