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

    // A limit that leaves some out says how many matched; a mistyped reason and an id that
    // matches nothing are errors, and a purge naming one purges nothing (the export below
    // still finds all three).
    let dlq_cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
            .arg("dlq")
            .args(args)
            .envs(env.binary_env())
            .output()
            .unwrap()
    };
    let limited = dlq_cli(&["list", "--limit", "1"]);
    let table = String::from_utf8_lossy(&limited.stdout);
    assert!(limited.status.success(), "{table}");
    assert!(
        table
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("1 of 3 matching dead letters (--limit)")),
        "{table}"
    );
    let typo = dlq_cli(&["list", "--reason", "salesforce_invalid_feild"]);
    let said = String::from_utf8_lossy(&typo.stderr);
    assert!(!typo.status.success());
    assert!(
        said.contains("not a reason code (did you mean salesforce_invalid_field?)"),
        "{said}"
    );
    // Ids are checked against every match, not only the rows the limit keeps.
    let both = dlq_cli(&[
        "list",
        "--limit",
        "1",
        "--id",
        "evt_01JD6Q7M1V3S6",
        "--id",
        "evt_01JD7A1C9XW2E",
    ]);
    let table = String::from_utf8_lossy(&both.stdout);
    assert!(both.status.success(), "{table}");
    assert!(
        table.contains("1 of 2 matching dead letters (--limit)"),
        "{table}"
    );
    let excluded = dlq_cli(&[
        "list",
        "--id",
        "evt_01JD6Q7M1V3S6",
        "--reason",
        "invalid_event",
    ]);
    let said = String::from_utf8_lossy(&excluded.stderr);
    assert!(!excluded.status.success());
    assert!(
        said.contains(
            "the other filters leave out the dead letters asked for by id: evt_01JD6Q7M1V3S6 \
             (tenant acme, reason salesforce_invalid_field)"
        ),
        "{said}"
    );
    let unknown = dlq_cli(&[
        "purge",
        "--id",
        "evt_01JD6Q7M1V3S6",
        "--id",
        "evt_nope",
        "--yes",
    ]);
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success(), "{said}");
    assert!(said.contains("no dead letter with id evt_nope"), "{said}");

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
        dlq.replay(&by_reason, true).await.unwrap().letters.len(),
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
    assert_eq!(
        dlq.replay(&by_reason, false).await.unwrap().letters.len(),
        2
    );
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
    assert_eq!(purged.letters.len(), 1);
    dlq.close().await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    assert!(dlq.list(&Filter::default()).await.unwrap().is_empty());
    dlq.close().await;
    env.finish().await;
}

/// A booking the broker dead-letters itself: the quorum work queue's delivery limit, reached by
/// returns alone (a worker that takes the message and goes away without settling it, as a
/// restart does). `dlq list` names it from its body and gives the cause; replay writes it.
#[tokio::test]
async fn a_broker_dead_letter_is_listed_with_its_ids_and_cause_and_replays() {
    use lapin::options::BasicGetOptions;
    let limit = 2;
    let mut env = TestEnv::start_with("dlqlimit", |c| c.amqp.delivery_limit = limit).await;
    env.stop_service().await;
    env.publish("meeting.booked", &sample("booked")).await;

    // Each "worker" takes the message and disappears with it: its channel closes unsettled.
    let connection = portals_crm::amqp::connect(&env.config.amqp.url, 30, "dlq test")
        .await
        .unwrap();
    let mut returns = 0;
    loop {
        let channel = connection.create_channel().await.unwrap();
        let got = channel
            .basic_get(
                env.topology.work_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap();
        let _ = channel.close(200, "worker gone".into()).await;
        if got.is_none() {
            break;
        }
        returns += 1;
        assert!(returns <= limit + 1, "the broker never dead-lettered it");
    }
    let _ = connection.close(200, "done".into()).await;
    assert_eq!(
        returns,
        limit + 1,
        "delivered limit + 1 times, then dead-lettered"
    );

    let listed = common::wait_until(
        "the broker's dead letter",
        std::time::Duration::from_secs(10),
        || async {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
                .args(["dlq", "list", "--json"])
                .envs(env.binary_env())
                .env("PORTALS_CRM_AMQP_DELIVERY_LIMIT", limit.to_string())
                .output()
                .unwrap();
            let listed: Vec<Value> = serde_json::from_slice(&output.stdout)
                .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&output.stderr)))?;
            if listed.is_empty() {
                Err("no dead letter yet".into())
            } else {
                Ok(listed)
            }
        },
    )
    .await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let letter = &listed[0];
    assert_eq!(letter["id"], "evt_01JD6Q7M1V3S6");
    assert_eq!(letter["tenant"], "acme");
    assert_eq!(letter["booking_id"], "bk_7Q2M9");
    assert_eq!(letter["reason"], "delivery_limit");
    assert_eq!(letter["routing_key"], "meeting.booked");
    let message = letter["message"].as_str().unwrap();
    assert!(
        message.starts_with("the broker dead-lettered it after at least 3 deliveries"),
        "{message}"
    );
    assert!(message.contains("worker restart"), "{message}");

    // Nothing was wrong with the booking: replayed, it is written.
    env.restart_service_without_cache().await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let replayed = dlq
        .replay(
            &Filter {
                reason: Some("delivery_limit".into()),
                ..Filter::default()
            },
            false,
        )
        .await
        .unwrap();
    assert_eq!(replayed.letters.len(), 1);
    dlq.close().await;
    env.wait_settled(1).await;
    assert_eq!(env.outcomes().get("written"), Some(&1));
    assert_eq!(env.records("Event").await.len(), 1);
    env.finish().await;
}

/// A dead letter the client cannot read (a header frame over the connection's `frame_max`,
/// which RabbitMQ takes from a publisher up to 8 bytes over): lapin closes the connection
/// without answering the `basic.get`. `dlq` says so within its time limit instead of waiting
/// for ever.
#[tokio::test]
async fn a_dead_letter_over_the_frame_is_reported_not_waited_for() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use portals_crm::amqp::header_frame_size;
    use portals_crm::dlq::DlqError;

    let env = TestEnv::start("dlqoverframe").await;
    let frame_max = env.publisher.frame_max() as usize;
    let mut headers = FieldTable::default();
    headers.insert("x-dump".into(), AMQPValue::LongString("".into()));
    let empty = header_frame_size(&lapin::BasicProperties::default().with_headers(headers.clone()));
    headers.insert(
        "x-dump".into(),
        AMQPValue::LongString("d".repeat(frame_max + 4 - empty).into()),
    );
    let properties = lapin::BasicProperties::default().with_headers(headers);
    assert_eq!(header_frame_size(&properties), frame_max + 4);
    // Past the publisher's own check, as another client would send it.
    env.publisher
        .channel()
        .basic_publish(
            "".into(),
            env.topology.dead_queue.as_str().into(),
            BasicPublishOptions::default(),
            &sample("booked"),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    match dlq.list(&Filter::default()).await {
        Err(error @ DlqError::Unreadable(_)) => {
            assert!(error.to_string().contains("frame_max"), "{error}");
        }
        other => panic!("expected Unreadable, got {other:?}"),
    }
    env.finish().await;
}

/// The same event dead-lettered twice is two letters with one id: `dlq show` shows each, as a
/// stream of JSON objects, and says on stderr that there are two.
#[tokio::test]
async fn show_shows_every_dead_letter_with_the_id() {
    let env = TestEnv::start("dlqshow").await;
    env.publish("meeting.booked", b"not an event").await;
    env.publish("meeting.booked", b"not an event").await;
    env.wait_settled(2).await;
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let all = dlq.list(&Filter::default()).await.unwrap();
    dlq.close().await;
    assert_eq!(all.len(), 2, "{all:#?}");
    assert_eq!(all[0].id, all[1].id, "one body, one id");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
        .args(["dlq", "show", &all[0].id])
        .envs(env.binary_env())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{said}");
    assert!(
        said.contains(&format!("2 dead letters have id {}", all[0].id)),
        "{said}"
    );
    let shown: Vec<Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(shown.len(), 2);
    assert!(
        shown
            .iter()
            .all(|l| l["id"] == all[0].id.as_str() && l["reason"] == "invalid_event"),
        "{shown:#?}"
    );
    env.finish().await;
}
