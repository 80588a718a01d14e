//! Nothing lost, nothing twice: broker connection loss, racing workers, a fuzzed decoder.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{TestEnv, wait_until};
use portals_crm::demo::booking_event;
use portals_crm::event::{DEFAULT_MAX_BODY_BYTES, decode};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;

fn version(tenant: &str, id: &str, v: u64) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    let status = if v == 1 { "booked" } else { "rescheduled" };
    let attendee = json!({"email": format!("{id}@race.example"), "first_name": "R", "last_name": "Racer", "company": "C", "phone": null, "title": null});
    let starts = now + time::Duration::days(1 + v as i64);
    serde_json::to_vec(&booking_event(
        tenant,
        id,
        v,
        status,
        starts,
        "sara.rep@acme.example",
        vec![attendee],
        now,
    ))
    .unwrap()
}

async fn versions_in_org(env: &TestEnv) -> BTreeMap<String, u64> {
    env.records("BookMe__Booking__c")
        .await
        .iter()
        .map(|b| {
            (
                b["BookMe__Booking_Id__c"].as_str().unwrap().to_owned(),
                b["BookMe__Version__c"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_workers_racing_reschedules_end_at_the_newest_versions() {
    let env = TestEnv::start("race").await;
    let second = env.extra_worker(2).await;
    let mut messages = Vec::new();
    for b in 0..60 {
        for v in 1..=5 {
            messages.push(version("acme", &format!("bk_race_{b}"), v));
        }
    }
    messages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    for body in &messages {
        env.publish("meeting.rescheduled", body).await;
    }
    wait_until(
        "the org at version 5 everywhere",
        Duration::from_secs(60),
        || async {
            let versions = versions_in_org(&env).await;
            if versions.len() == 60 && versions.values().all(|v| *v == 5) {
                Ok(())
            } else {
                Err(format!(
                    "{} bookings, {} at v5",
                    versions.len(),
                    versions.values().filter(|v| **v == 5).count()
                ))
            }
        },
    )
    .await;
    let settled: u64 = [env.service(), &second]
        .iter()
        .map(|s| s.metrics.settled_by_outcome().values().sum::<u64>())
        .sum();
    wait_until("every message settled", Duration::from_secs(30), || async {
        let n: u64 = [env.service(), &second]
            .iter()
            .map(|s| s.metrics.settled_by_outcome().values().sum::<u64>())
            .sum();
        if n >= messages.len() as u64 {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    assert!(settled > 0);
    assert_eq!(env.records("Event").await.len(), 60, "no duplicate Events");
    assert_eq!(env.records("Lead").await.len(), 60, "no duplicate Leads");
    second.shutdown().await;
    env.finish().await;
}

#[tokio::test]
async fn broker_connection_loss_reconnects_and_resumes() {
    let env = TestEnv::start("brokerloss").await;
    let bodies: Vec<Vec<u8>> = (0..400)
        .map(|i| version("acme", &format!("bk_loss_{i}"), 1))
        .collect();
    for body in &bodies[..200] {
        env.publish("meeting.booked", body).await;
    }
    env.wait_settled(50).await;
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    let pid = text
        .lines()
        .find(|l| l.contains(&format!("portals-crm worker {}", env.topology.work_queue)))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the worker's connection in {text}"))
        .to_owned();
    let closed = std::process::Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &pid,
            "chaos: broker closed the connection",
        ])
        .status()
        .unwrap();
    assert!(closed.success());
    let base = format!("http://{}", env.service().http_addr);
    wait_until("a reconnect", Duration::from_secs(30), || async {
        let metrics = env.service().metrics.render();
        if metrics.contains("portals_crm_amqp_reconnects_total 1") {
            Ok(())
        } else {
            Err("no reconnect yet".into())
        }
    })
    .await;
    for body in &bodies[200..] {
        env.publish("meeting.booked", body).await;
    }
    wait_until(
        "every booking written once",
        Duration::from_secs(60),
        || async {
            let n = env.records("Event").await.len();
            if n == 400 {
                Ok(())
            } else {
                Err(format!("{n} events"))
            }
        },
    )
    .await;
    assert_eq!(
        reqwest::get(format!("{base}/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        env.service()
            .metrics
            .render()
            .contains("portals_crm_amqp_connected 1")
    );
    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("dead_lettered"), None, "{outcomes:?}");
    env.finish().await;
}

/// Random mutations of the samples (bit flips, truncation, splices, duplicated spans) never
/// panic the decoder, and every rejection names a field.
#[test]
fn decoder_survives_mutated_samples() {
    let samples: Vec<Vec<u8>> = ["booked", "booked-group", "rescheduled", "cancelled"]
        .iter()
        .map(|n| std::fs::read(format!("tests/fixtures/events/{n}.json")).unwrap())
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut rejected = 0;
    for round in 0..20_000 {
        let mut body = samples[round % samples.len()].clone();
        for _ in 0..rng.gen_range(1..4) {
            match rng.gen_range(0..4) {
                0 => {
                    let i = rng.gen_range(0..body.len());
                    body[i] ^= 1 << rng.gen_range(0..8);
                }
                1 => body.truncate(rng.gen_range(0..body.len())),
                2 => {
                    let i = rng.gen_range(0..=body.len());
                    let other = &samples[rng.gen_range(0..samples.len())];
                    let j = rng.gen_range(0..other.len());
                    body.splice(i..i, other[j..(j + 20).min(other.len())].iter().copied());
                }
                _ => {
                    if body.len() > 10 {
                        let i = rng.gen_range(0..body.len() - 10);
                        let span = body[i..i + 10].to_vec();
                        body.splice(i..i, span);
                    }
                }
            }
            if body.is_empty() {
                break;
            }
        }
        if let Err(error) = decode(&body, DEFAULT_MAX_BODY_BYTES) {
            rejected += 1;
            assert!(
                !error.field.is_empty() && !error.reason.is_empty(),
                "{error:?}"
            );
        }
    }
    assert!(rejected > 10_000, "most mutations are invalid ({rejected})");
    let _: Value = serde_json::from_slice(&samples[0]).unwrap();
}

/// The poison-message fuse: a message that keeps coming back (a worker crashing on it) is
/// dead-lettered by the broker after the work queue's delivery limit, and `dlq` shows it.
#[tokio::test]
async fn the_delivery_limit_dead_letters_a_message_that_keeps_coming_back() {
    use lapin::options::{BasicGetOptions, BasicNackOptions};
    use portals_crm::dlq::{Dlq, Filter};
    let mut env = TestEnv::start_with("fuse", |c| c.amqp.delivery_limit = 2).await;
    env.stop_service().await;
    env.publish("meeting.booked", &version("acme", "bk_poison", 1))
        .await;
    let channel = env.publisher.channel();
    let mut deliveries = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match channel
            .basic_get(
                env.topology.work_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            Some(message) => {
                deliveries += 1;
                message
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
                    .unwrap();
            }
            None if deliveries > 0 => break,
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert_eq!(deliveries, 3, "delivered up to the limit, then no more");
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let letters = wait_until(
        "the broker's dead letter",
        Duration::from_secs(10),
        || async {
            let letters = dlq.list(&Filter::default()).await.unwrap();
            if letters.len() == 1 {
                Ok(letters)
            } else {
                Err(format!("{letters:?}"))
            }
        },
    )
    .await;
    assert_eq!(letters[0].reason, "delivery_limit");
    // No x-portals-* headers: the ids come from the body, the cause from the broker's x-death.
    let body: serde_json::Value = serde_json::from_str(&letters[0].body).unwrap();
    assert_eq!(letters[0].id, body["id"].as_str().unwrap());
    assert_eq!(letters[0].tenant, "acme");
    assert_eq!(letters[0].booking_id.as_deref(), Some("bk_poison"));
    assert!(
        letters[0]
            .message
            .starts_with("the broker dead-lettered it after at least 3 deliveries"),
        "{}",
        letters[0].message
    );
    dlq.close().await;
    env.finish().await;
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

/// 10 MB bodies, JSON bombs and invalid UTF-8 are dead-lettered and the worker's memory comes
/// back to where it was: nothing of them is kept.
#[tokio::test]
async fn a_flood_of_bad_input_leaves_the_worker_memory_flat() {
    let mut env = TestEnv::start("memory").await;
    env.stop_service().await;
    let tenants = env.write_tenant_files();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
        .arg("run")
        .envs(env.binary_env())
        .env("PORTALS_CRM_TENANTS_DIR", &tenants)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = worker.id().unwrap();
    env.publish("meeting.booked", &version("acme", "bk_warm", 1))
        .await;
    wait_until("the worker warmed up", Duration::from_secs(20), || async {
        if env.records("Event").await.len() == 1 {
            Ok(())
        } else {
            Err("not yet".into())
        }
    })
    .await;
    let huge = vec![b'x'; 10 * 1024 * 1024];
    let sample = String::from_utf8(common::sample("booked")).unwrap();
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bomb = sample
        .replace(
            "\"answers\": {",
            &format!("\"answers\": {{\"bomb\": {nested}, "),
        )
        .into_bytes();
    let round = |n: usize| {
        let env = &env;
        let (huge, bomb) = (&huge, &bomb);
        async move {
            for _ in 0..n {
                env.publish("meeting.booked", huge).await;
                env.publish("meeting.booked", bomb).await;
                env.publish("meeting.booked", &[0xff, 0xfe, 0xfd]).await;
            }
            let dead = env.wait_dead_letters(3 * n).await;
            assert!(dead.iter().all(|d| d.reason == "invalid_event"));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let idle = rss_mb(pid);
    // Two rounds grow buffers and the allocator's pools to their working size …
    round(10).await;
    round(10).await;
    let warmed = rss_mb(pid);
    // … after which more bad input must not grow memory: nothing of it is kept (keeping even
    // one 10 MB body per round would add 20 MB).
    round(10).await;
    round(10).await;
    let after = rss_mb(pid);
    eprintln!(
        "worker RSS: {idle:.1} MB idle, {warmed:.1} MB after 60 bad messages, {after:.1} MB after 60 more (800 MB of 10 MB bodies in all)"
    );
    assert!(
        after < warmed + 24.0,
        "memory flat: {warmed:.1} MB → {after:.1} MB"
    );
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    env.finish().await;
}
