//! Every class of bad input (DESIGN.md §3) lands in the dead-letter queue with a reason that
//! names the field, and the worker keeps processing: a valid booking published right after it
//! is written.

mod common;

use common::{TestEnv, sample};
use serde_json::{Value, json};

fn booked() -> Value {
    serde_json::from_slice(&sample("booked")).unwrap()
}

fn with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = booked();
    f(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// Publishes `body`, then a valid booking; expects one dead letter with `reason` whose message
/// contains `mentions`, and the valid booking written.
async fn dead_lettered(name: &str, body: Vec<u8>, reason: &str, mentions: &str) {
    let env = TestEnv::start(name).await;
    env.publish("meeting.booked", &body).await;
    env.publish("meeting.booked", &sample("booked-group")).await;
    env.wait_settled(2).await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].reason, reason, "{dead:#?}");
    assert!(
        dead[0].message.contains(mentions),
        "dead letter message {:?} should mention {mentions:?}",
        dead[0].message
    );
    assert_eq!(dead[0].body, body, "the body is dead-lettered untouched");
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "the worker kept processing"
    );
    assert_eq!(env.records("Event").await.len(), 1);
    env.finish().await;
}

#[tokio::test]
async fn not_json() {
    dead_lettered("notjson", b"{not json".to_vec(), "invalid_event", "$").await;
}

#[tokio::test]
async fn invalid_utf8() {
    dead_lettered(
        "utf8",
        vec![0xff, 0xfe, 0xfd, b'{', b'}'],
        "invalid_event",
        "UTF-8",
    )
    .await;
}

#[tokio::test]
async fn wrong_specversion() {
    dead_lettered(
        "spec",
        with(|v| v["specversion"] = json!("0.3")),
        "invalid_event",
        "specversion",
    )
    .await;
}

#[tokio::test]
async fn unknown_type() {
    dead_lettered(
        "type",
        with(|v| v["type"] = json!("com.bookme.meeting.moved.v1")),
        "invalid_event",
        "type",
    )
    .await;
}

/// The failure message quotes the type; a type of 200 KB (the body is under the 256 KiB limit)
/// would make the dead letter's headers one frame larger than the 128 KiB the connection agreed,
/// which the broker answers by closing the connection (and the booking would come back, again
/// and again). The message is cut.
#[tokio::test]
async fn an_unknown_type_of_200_kb_is_dead_lettered_with_its_message_cut() {
    let long = format!("com.bookme.{}", "x".repeat(200_000));
    dead_lettered(
        "longtype",
        with(|v| v["type"] = json!(long)),
        "invalid_event",
        "unknown event type",
    )
    .await;
}

#[tokio::test]
async fn missing_required_field() {
    let body = with(|v| {
        v["data"].as_object_mut().unwrap().remove("starts_at");
    });
    dead_lettered("missing", body, "invalid_event", "starts_at").await;
}

#[tokio::test]
async fn ill_typed_field() {
    dead_lettered(
        "typed",
        with(|v| v["data"]["version"] = json!("one")),
        "invalid_event",
        "data.version",
    )
    .await;
}

#[tokio::test]
async fn ends_before_it_starts() {
    let body = with(|v| v["data"]["ends_at"] = v["data"]["starts_at"].clone());
    dead_lettered("ends", body, "invalid_event", "data.ends_at").await;
}

#[tokio::test]
async fn no_attendee() {
    dead_lettered(
        "attendees",
        with(|v| v["data"]["attendees"] = json!([])),
        "invalid_event",
        "data.attendees",
    )
    .await;
}

#[tokio::test]
async fn status_does_not_match_type() {
    dead_lettered(
        "status",
        with(|v| v["data"]["status"] = json!("cancelled")),
        "invalid_event",
        "data.status",
    )
    .await;
}

#[tokio::test]
async fn body_over_the_size_limit() {
    let body = with(|v| v["data"]["title"] = json!("x".repeat(10 * 1024 * 1024)));
    dead_lettered("huge", body, "invalid_event", "limit").await;
}

#[tokio::test]
async fn json_bomb() {
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = String::from_utf8(sample("booked")).unwrap();
    let body = text
        .replace(
            "\"answers\": {",
            &format!("\"answers\": {{\"bomb\": {nested}, "),
        )
        .into_bytes();
    dead_lettered("bomb", body, "invalid_event", "recursion limit").await;
}

/// The dead letter names the tenant the event named, not `unknown`: once `initech` is
/// configured, `dlq replay --tenant initech` finds it.
#[tokio::test]
async fn unknown_tenant() {
    let env = TestEnv::start("tenant").await;
    let body = with(|v| v["tenantid"] = json!("initech"));
    env.publish("meeting.booked", &body).await;
    env.wait_settled(1).await;
    let letters = env.list_dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    assert_eq!(letters[0].tenant, "initech");
    assert_eq!(letters[0].reason, "unknown_tenant");
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].tenant, "initech");
    assert!(dead[0].message.contains("initech"), "{}", dead[0].message);
    assert_eq!(dead[0].body, body);
    // Metric labels stay bounded: counted under `unknown`.
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains(
            "portals_crm_dead_letters_total{reason=\"unknown_tenant\",tenant=\"unknown\"} 1"
        ),
        "{metrics}"
    );
    env.finish().await;
}

#[tokio::test]
async fn salesforce_rejects_the_data() {
    // An address the org refuses (INVALID_EMAIL_ADDRESS): the shipped mappings say
    // `invalid_value = "drop"`, so the booking is written without it (tests/org_defaults.rs has
    // the `fail` choice, which dead-letters salesforce_invalid_email_address).
    let body = with(|v| v["data"]["attendees"][0]["email"] = json!("jane@localhost"));
    let env = written("sfreject", body).await;
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 1);
    assert_eq!(leads[0]["Email"], Value::Null, "{leads:#?}");
    env.finish().await;
}

/// What producers send that the CloudEvents and RFC 3339 specs allow (issue 12, A): each is
/// written, not dead-lettered.
async fn written(name: &str, body: Vec<u8>) -> TestEnv {
    let env = TestEnv::start(name).await;
    env.publish("meeting.booked", &body).await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    assert!(env.drain_dead_letters().await.is_empty());
    env
}

#[tokio::test]
async fn datacontenttype_with_parameters_is_json() {
    let env = written(
        "ctype",
        with(|v| v["datacontenttype"] = json!("application/json; charset=utf-8")),
    )
    .await;
    assert_eq!(env.records("Event").await.len(), 1);
    env.finish().await;
}

#[tokio::test]
async fn a_field_the_contract_does_not_know_is_ignored_and_counted() {
    let env = written(
        "unknownfield",
        with(|v| v["data"]["attendees"][0]["locale"] = json!("nb-NO")),
    )
    .await;
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 1);
    assert_eq!(leads[0]["Email"], "jane.doe@globex.example");
    let metrics = env.service().metrics.render();
    assert!(
        metrics.contains(
            "portals_crm_event_unknown_fields_total{field=\"data.attendees[].locale\"} 1"
        ),
        "{metrics}"
    );
    env.finish().await;
}

#[tokio::test]
async fn every_rfc3339_spelling_reaches_salesforce_as_one_instant() {
    let env = written(
        "datetimes",
        with(|v| {
            v["data"]["starts_at"] = json!("2026-12-01 14:00:00Z");
            v["data"]["ends_at"] = json!("2026-12-01t15:30:00.250+01:00");
        }),
    )
    .await;
    let events = env.records("Event").await;
    assert_eq!(events[0]["StartDateTime"], "2026-12-01T14:00:00.000+0000");
    assert_eq!(events[0]["EndDateTime"], "2026-12-01T14:30:00.250+0000");
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(
        bookings[0]["BookMe__Starts_At__c"],
        "2026-12-01T14:00:00.000+0000"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_datetime_without_an_offset_names_its_field() {
    dead_lettered(
        "nooffset",
        with(|v| v["data"]["starts_at"] = json!("2026-12-01T14:00:00")),
        "invalid_event",
        "data.starts_at: not an RFC 3339 date-time",
    )
    .await;
}

#[tokio::test]
async fn datacontenttype_that_is_not_json_names_its_field() {
    dead_lettered(
        "ctypexml",
        with(|v| v["datacontenttype"] = json!("application/xml")),
        "invalid_event",
        "datacontenttype",
    )
    .await;
}
