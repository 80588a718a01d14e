//! Dead letters for ops: list without removing, replay after fixing the cause, purge.

mod common;

use common::{TestEnv, sample};
use portals_crm::dlq::{Dlq, Filter};
use serde_json::{Value, json};

async fn phone_access(env: &TestEnv, access: &str) {
    let status = env
        .post_json(
            "/__emulator/org",
            json!({"permission_set": "BookMe_Integration_User", "field": "Lead.Phone", "access": access}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn replay_after_granting_the_missing_permission_empties_the_dead_letters() {
    let env = TestEnv::start("dlq").await;
    phone_access(&env, "none").await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.publish("meeting.booked", &sample("booked-group")).await;
    env.publish("meeting.booked", b"not an event").await;
    env.wait_settled(3).await;
    assert_eq!(env.outcomes().get("dead_lettered"), Some(&3));
    assert!(env.records("Lead").await.is_empty());

    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let all = dlq.list(&Filter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    let sf: Vec<_> = all
        .iter()
        .filter(|l| l.reason == "salesforce_invalid_field")
        .collect();
    assert_eq!(sf.len(), 2, "{all:#?}");
    assert!(
        sf.iter()
            .all(|l| l.salesforce_error.as_deref() == Some("INVALID_FIELD") && l.tenant == "acme")
    );
    assert!(
        sf.iter()
            .any(|l| l.id == "evt_01JD6Q7M1V3S6" && l.booking_id.as_deref() == Some("bk_7Q2M9"))
    );
    dlq.close().await;

    // Listing is non-destructive: the binary sees the same three.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
        .args([
            "dlq",
            "list",
            "--json",
            "--reason",
            "salesforce_invalid_field",
        ])
        .envs(env.binary_env())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(listed.len(), 2);

    let export = std::env::temp_dir().join(format!(
        "portals-crm-dlq-export-{:x}.jsonl",
        rand::random::<u32>()
    ));
    let exported = std::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
        .args(["dlq", "export", export.to_str().unwrap()])
        .envs(env.binary_env())
        .output()
        .unwrap();
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let lines: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one JSON line per dead letter");
    assert!(
        lines
            .iter()
            .any(|l| l["reason"] == "invalid_event" && l["body"] == "not an event")
    );
    let _ = std::fs::remove_file(export);

    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let by_reason = Filter {
        reason: Some("salesforce_invalid_field".into()),
        ..Filter::default()
    };
    assert_eq!(
        dlq.replay(&by_reason, true).await.unwrap().len(),
        2,
        "dry run"
    );
    dlq.close().await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    assert_eq!(
        dlq.list(&Filter::default()).await.unwrap().len(),
        3,
        "a dry run removes nothing"
    );
    dlq.close().await;

    phone_access(&env, "edit").await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    assert_eq!(dlq.replay(&by_reason, false).await.unwrap().len(), 2);
    dlq.close().await;
    env.wait_settled(5).await;
    assert_eq!(env.outcomes().get("written"), Some(&2));
    assert_eq!(env.records("Lead").await.len(), 3);
    assert_eq!(env.records("Event").await.len(), 2);

    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let left = dlq.list(&Filter::default()).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].reason, "invalid_event");
    let purged = dlq
        .purge(&Filter {
            reason: Some("invalid_event".into()),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(purged.len(), 1);
    dlq.close().await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    assert!(dlq.list(&Filter::default()).await.unwrap().is_empty());
    dlq.close().await;
    env.finish().await;
}
