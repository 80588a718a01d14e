//! Transient failures go through the retry tiers and come back; the last tier gives up into the
//! dead letters.

mod common;

use std::time::Duration;

use common::{TestEnv, sample, wait_until};
use serde_json::json;

#[tokio::test]
async fn a_transient_failure_is_retried_through_a_tier_and_then_written() {
    let env = TestEnv::start_with("retry", |c| c.retry.tiers_secs = vec![1, 2]).await;
    assert_eq!(
        env.post_json(
            "/__emulator/faults",
            json!({"error_rate": 1.0, "errors": ["503"]})
        )
        .await,
        200
    );
    env.publish("meeting.booked", &sample("booked")).await;
    wait_until("a retry", Duration::from_secs(20), || async {
        match env.outcomes().get("retried") {
            Some(n) if *n >= 1 => Ok(()),
            _ => Err(format!("{:?}", env.outcomes())),
        }
    })
    .await;
    assert!(env.records("Event").await.is_empty());
    let cleared = reqwest::Client::new()
        .delete(format!("{}/__emulator/faults", env.emulator.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), 204);
    wait_until(
        "the retried booking written",
        Duration::from_secs(20),
        || async {
            match env.outcomes().get("written") {
                Some(1) => Ok(()),
                _ => Err(format!("{:?}", env.outcomes())),
            }
        },
    )
    .await;
    assert_eq!(env.records("Event").await.len(), 1);
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains("portals_crm_retries_total{tenant=\"acme\",tier=\"0\"}"),
        "{metrics}"
    );
    env.finish().await;
}

#[tokio::test]
async fn after_the_last_tier_the_booking_is_dead_lettered_with_its_history() {
    let env = TestEnv::start_with("exhausted", |c| c.retry.tiers_secs = vec![1]).await;
    env.post_json(
        "/__emulator/faults",
        json!({"error_rate": 1.0, "errors": ["UNABLE_TO_LOCK_ROW"]}),
    )
    .await;
    env.publish("meeting.booked", &sample("booked")).await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "retries_exhausted");
    assert!(
        dead[0].message.contains("gave up after 2 attempts"),
        "{}",
        dead[0].message
    );
    assert!(
        dead[0].message.contains("UNABLE_TO_LOCK_ROW"),
        "{}",
        dead[0].message
    );
    assert_eq!(dead[0].body, sample("booked"));
    // The dead letter is in its queue once its publish is confirmed; the message is counted
    // after its ack, a moment later.
    wait_until(
        "the retry and the dead letter counted",
        Duration::from_secs(10),
        || async {
            let outcomes = env.outcomes();
            if outcomes.contains_key("dead_lettered") {
                Ok(())
            } else {
                Err(format!("{outcomes:?}"))
            }
        },
    )
    .await;
    assert_eq!(env.outcomes().get("retried"), Some(&1));
    assert_eq!(env.outcomes().get("dead_lettered"), Some(&1));
    env.finish().await;
}
