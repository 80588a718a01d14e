//! Transient failures go through the retry tiers and come back; the last tier gives up into the
//! dead letters.

mod common;

use std::time::Duration;

use common::{TestEnv, sample, wait_until};
use lapin::types::{AMQPValue, FieldTable};
use portals_crm::amqp::{self, header_str};
use serde_json::json;

/// Waits for the message's dead letter to be counted, and checks it was retried once before.
/// The dead letter is in its queue once its publish is confirmed; the message is counted after
/// its ack, a moment later.
async fn retried_once_then_dead_lettered(env: &TestEnv) {
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
}

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
    retried_once_then_dead_lettered(&env).await;
    env.finish().await;
}

/// A publisher's headers near the broker's frame (RabbitMQ's default `frame_max`, 131,072
/// bytes), many of a few hundred bytes each: the retry copy, which adds portals-crm's headers,
/// would not fit one frame, and the broker would close the worker's connection for it
/// (`FRAME_ERROR`), every time. Leaving off only enough to get under the frame would not do
/// either: the tier adds `x-death` when it hands the copy back, and lapin closes the connection
/// on a frame over `frame_max` it receives. The copy leaves off enough headers to keep the
/// broker's headroom and names them; the retry and the dead letter go through on one
/// connection, and `dlq` reads the dead letter.
#[tokio::test]
async fn headers_near_the_frame_limit_are_left_off_the_retry_and_the_dead_letter() {
    let env = TestEnv::start_with("bigheader", |c| c.retry.tiers_secs = vec![1]).await;
    env.post_json(
        "/__emulator/faults",
        json!({"error_rate": 1.0, "errors": ["UNABLE_TO_LOCK_ROW"]}),
    )
    .await;
    let mut properties = amqp::event_properties(Some("acme"));
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );
    // The original takes all but about 300 bytes of the frame: less than portals-crm's
    // headers, in pieces small enough that leaving off just enough would end near the limit.
    let limit = env.publisher.frame_max() as usize - 300;
    for n in 0.. {
        let mut more = headers.clone();
        more.insert(
            format!("x-trace-{n:03}").into(),
            AMQPValue::LongString("t".repeat(300).into()),
        );
        if amqp::header_frame_size(&properties.clone().with_headers(more.clone())) > limit {
            break;
        }
        headers = more;
    }
    properties = properties.with_headers(headers);
    env.publisher
        .publish_republishing(
            &env.topology.exchange,
            "meeting.booked",
            &sample("booked"),
            properties,
        )
        .await
        .expect("the original fits one frame and is taken");
    wait_until("the dead letter", Duration::from_secs(30), || async {
        match env.list_dead_letters().await.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{} dead letters", other.len())),
        }
    })
    .await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "retries_exhausted", "{:?}", dead[0].message);
    assert!(
        dead[0].message.contains("gave up after 2 attempts"),
        "{}",
        dead[0].message
    );
    let headers = Some(&dead[0].headers);
    let dropped = header_str(headers, "x-portals-dropped-headers").unwrap_or_default();
    let dropped: Vec<&str> = dropped.split(',').collect();
    assert!(
        dropped.len() > 10 && dropped.iter().all(|n| n.starts_with("x-trace-")),
        "{dropped:?}"
    );
    for name in &dropped {
        assert_eq!(header_str(headers, name), None, "{name} left off");
    }
    assert!(
        header_str(headers, "traceparent").is_some(),
        "small headers stay"
    );
    assert_eq!(dead[0].body, sample("booked"));
    retried_once_then_dead_lettered(&env).await;
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains("portals_crm_amqp_reconnects_total 0"),
        "the connection stayed up: {metrics}"
    );
    env.finish().await;
}

/// The publisher's check: properties over one frame are refused unsent, and the connection
/// stays usable (lapin would send the frame and the broker close the connection).
#[tokio::test]
async fn properties_over_one_frame_are_refused_unsent() {
    let env = TestEnv::start("overframe").await;
    let mut headers = FieldTable::default();
    headers.insert(
        "x-debug-dump".into(),
        AMQPValue::LongString("d".repeat(140_000).into()),
    );
    let properties = amqp::event_properties(Some("acme")).with_headers(headers);
    let refused = env
        .publisher
        .publish(&env.topology.exchange, "meeting.booked", b"{}", properties)
        .await;
    match refused {
        Err(amqp::PublishError::HeaderFrameTooLarge { size, frame_max }) => {
            assert!(size > 140_000, "{size}");
            assert_eq!(frame_max, env.publisher.frame_max());
        }
        other => panic!("expected HeaderFrameTooLarge, got {other:?}"),
    }
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(env.outcomes().get("written"), Some(&1));
    env.finish().await;
}

/// A tenant file naming an API version its org does not offer: the org answers 404 to every
/// request, which alone would read as `NOT_FOUND` and dead-letter each booking. The version list
/// names the fault; the booking waits without spending attempts, and is written once the file
/// is fixed and reloaded.
#[tokio::test]
async fn an_api_version_the_org_does_not_offer_parks_bookings_until_the_file_is_fixed() {
    // One-second tiers: the five-minute wait takes the longest, and a booking whose waits
    // counted as attempts would be dead-lettered (retries_exhausted) after its third.
    let env = TestEnv::start_custom(
        "version",
        |c| c.retry.tiers_secs = vec![1, 1, 1],
        |tenants| {
            for tenant in tenants {
                tenant.org.api_version = "99.0".into();
            }
        },
    )
    .await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_outcome("retried", 4).await;
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "waiting spent no attempt: {:?}",
        env.outcomes()
    );
    assert!(env.records("Event").await.is_empty());
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(
            "portals_crm_salesforce_requests_total{kind=\"versions\",status=\"200\",tenant=\"acme\"} 1"
        ),
        "the version list is read once, not per request: {metrics}"
    );
    assert!(
        metrics.contains("portals_crm_salesforce_api_version_not_offered{tenant=\"acme\"} 1"),
        "the alert's gauge: {metrics}"
    );

    let fixed: Vec<_> = env
        .tenants
        .iter()
        .cloned()
        .map(|mut t| {
            t.org.api_version = "66.0".into();
            t
        })
        .collect();
    env.service().tenants.replace(fixed).await.unwrap();
    env.wait_records("Event", 1).await;
    wait_until("the gauge cleared", Duration::from_secs(10), || async {
        let metrics = env.metrics().await;
        if metrics.contains("portals_crm_salesforce_api_version_not_offered{tenant=\"acme\"} 0") {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;
    env.finish().await;
}
