//! Settings of an org that change what the API takes, end to end against the real broker and
//! the emulator: Email Address Internationalization off (the demo org) refuses non-ASCII
//! addresses with INVALID_EMAIL_ADDRESS, and the booking is still written: the internationalized
//! domain punycoded, a non-ASCII local part left out and counted, or, where the mapping says
//! `fail`, dead-lettered naming the field.

mod common;

use common::TestEnv;
use portals_crm::config::InvalidValue;
use portals_crm::demo::booking_event;
use serde_json::{Value, json};
use time::OffsetDateTime;

fn booking(id: &str, emails: &[&str]) -> Vec<u8> {
    let attendees = emails
        .iter()
        .enumerate()
        .map(|(i, email)| json!({"email": email, "first_name": format!("Guest{i}"), "last_name": "Intl", "company": "Bücher GmbH", "phone": null, "title": null}))
        .collect();
    serde_json::to_vec(&booking_event(
        "acme",
        id,
        1,
        "booked",
        OffsetDateTime::now_utc() + time::Duration::days(3),
        "sara.rep@acme.example",
        attendees,
        OffsetDateTime::now_utc(),
    ))
    .unwrap()
}

fn lead_email(leads: &[Value], first_name: &str) -> Value {
    leads
        .iter()
        .find(|l| l["FirstName"] == first_name)
        .unwrap_or_else(|| panic!("no Lead {first_name}: {leads:#?}"))["Email"]
        .clone()
}

#[tokio::test]
async fn internationalized_addresses_keep_the_booking_punycoded_or_without_the_field() {
    let env = TestEnv::start("eai-drop").await;
    env.publish(
        "meeting.booked",
        &booking("bk_eai_1", &["josé@example.org", "ann@bücher.example"]),
    )
    .await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 2);
    assert_eq!(lead_email(&leads, "Guest0"), Value::Null, "josé: dropped");
    assert_eq!(lead_email(&leads, "Guest1"), "ann@xn--bcher-kva.example");
    assert_eq!(env.records("Event").await.len(), 1);
    assert_eq!(env.records("BookMe__Booking__c").await.len(), 1);
    let text = env.metrics().await;
    for treatment in ["dropped", "punycoded"] {
        let line = format!(
            "portals_crm_refused_values_total{{field=\"Email\",sobject=\"Lead\",tenant=\"acme\",treatment=\"{treatment}\"}} 1"
        );
        assert!(text.contains(&line), "{line} in\n{text}");
    }

    // With Email Address Internationalization on, the org takes both as they are.
    let on = json!({"email_address_internationalization": true});
    assert_eq!(env.post_json("/__emulator/org", on).await, 200);
    env.publish(
        "meeting.booked",
        &booking("bk_eai_2", &["zoë@example.org", "bea@bücher.example"]),
    )
    .await;
    env.wait_settled(2).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&2),
        "{:?}",
        env.outcomes()
    );
    let leads = env.records("Lead").await;
    let emails: Vec<&Value> = leads.iter().map(|l| &l["Email"]).collect();
    assert!(emails.contains(&&json!("zoë@example.org")), "{emails:?}");
    assert!(emails.contains(&&json!("bea@bücher.example")), "{emails:?}");
    env.finish().await;
}

#[tokio::test]
async fn the_fail_choice_dead_letters_the_booking_naming_the_field() {
    let env = TestEnv::start_custom(
        "eai-fail",
        |_| {},
        |tenants| {
            for tenant in tenants {
                for record in &mut tenant.records {
                    if record.sobject == "Lead" {
                        record
                            .invalid_value_fields
                            .insert("Email".into(), InvalidValue::Fail);
                    }
                }
            }
        },
    )
    .await;
    env.publish(
        "meeting.booked",
        &booking("bk_eai_3", &["josé@example.org"]),
    )
    .await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "salesforce_invalid_email_address");
    assert_eq!(
        dead[0].sf_error_code.as_deref(),
        Some("INVALID_EMAIL_ADDRESS")
    );
    assert!(dead[0].message.contains("Email"), "{}", dead[0].message);
    assert!(env.records("Lead").await.is_empty(), "rolled back whole");
    assert!(env.records("Event").await.is_empty());

    // The domain alone is still repaired under `fail`: punycode makes the address valid.
    env.publish(
        "meeting.booked",
        &booking("bk_eai_4", &["ann@bücher.example"]),
    )
    .await;
    env.wait_settled(2).await;
    let leads = env.records("Lead").await;
    assert_eq!(lead_email(&leads, "Guest0"), "ann@xn--bcher-kva.example");
    env.finish().await;
}

#[tokio::test]
async fn a_multiday_booking_needs_multiday_events_in_the_org() {
    let env = TestEnv::start("multiday").await;
    let two_days = |id: &str| {
        let mut v: Value = serde_json::from_slice(&booking(id, &["max@globex.example"])).unwrap();
        let starts = OffsetDateTime::parse(
            v["data"]["starts_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let ends = (starts + time::Duration::days(2))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        v["data"]["ends_at"] = json!(ends);
        serde_json::to_vec(&v).unwrap()
    };
    env.publish("meeting.booked", &two_days("bk_multi_1")).await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead[0].reason, "salesforce_field_integrity_exception");
    assert!(
        dead[0]
            .message
            .contains("Duration must be between 0 and 1440 minutes"),
        "{}",
        dead[0].message
    );
    assert!(env.records("Event").await.is_empty());

    let on = json!({"multiday_events": true});
    assert_eq!(env.post_json("/__emulator/org", on).await, 200);
    env.publish("meeting.booked", &two_days("bk_multi_2")).await;
    env.wait_settled(2).await;
    assert_eq!(env.records("Event").await.len(), 1);
    env.finish().await;
}
