//! The pipeline end to end: sample events through real RabbitMQ into the emulated org.

mod common;

use common::{TestEnv, sample};
use serde_json::Value;

fn find<'a>(records: &'a [Value], field: &str, value: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r[field].as_str() == Some(value))
        .unwrap_or_else(|| panic!("no record with {field} = {value} in {records:#?}"))
}

async fn user_id(env: &TestEnv, email: &str) -> String {
    let users = env.records("User").await;
    find(&users, "Email", email)["Id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn samples_become_exact_records_and_follow_reschedule_then_cancel() {
    let env = TestEnv::start("samples").await;

    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    let stats = env.get_json("/__emulator/stats").await;
    assert_eq!(
        stats["requests"]["graph"], 1,
        "a lone booking on an idle queue: one request, at once"
    );
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 1);
    let lead = &leads[0];
    assert_eq!(lead["BookMe__Lead_Key__c"], "acme:jane.doe@globex.example");
    assert_eq!(lead["LastName"], "Doe");
    assert_eq!(lead["FirstName"], "Jane");
    assert_eq!(lead["Company"], "Globex");
    assert_eq!(lead["Email"], "jane.doe@globex.example");
    assert_eq!(lead["Phone"], "+47 555 01234");
    assert_eq!(lead["Title"], "CTO");
    assert_eq!(lead["LeadSource"], "BookMe");
    let lead_id = lead["Id"].as_str().unwrap().to_owned();
    assert!(lead_id.starts_with("00Q") && lead_id.len() == 18);

    let sara = user_id(&env, "sara.rep@acme.example").await;
    let events = env.records("Event").await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event["BookMe__Booking_Id__c"], "bk_7Q2M9");
    assert_eq!(event["Subject"], "Intro call");
    assert_eq!(event["StartDateTime"], "2026-12-01T14:00:00.000+0000");
    assert_eq!(event["EndDateTime"], "2026-12-01T14:30:00.000+0000");
    assert_eq!(event["Location"], "https://meet.example/abc-defg");
    assert_eq!(
        event["Description"],
        "interest: Enterprise plan\nteam_size: 50-100\n"
    );
    assert_eq!(event["WhoId"], lead_id.as_str());
    assert_eq!(event["OwnerId"], sara.as_str());
    let event_id = event["Id"].as_str().unwrap().to_owned();

    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings.len(), 1);
    let booking = &bookings[0];
    assert_eq!(booking["BookMe__Booking_Id__c"], "bk_7Q2M9");
    assert_eq!(booking["BookMe__Version__c"], 1);
    assert_eq!(booking["BookMe__Status__c"], "booked");
    assert_eq!(booking["BookMe__Portal__c"], "Partner Portal EMEA");
    assert_eq!(booking["BookMe__Event_Id__c"], event_id.as_str());
    assert_eq!(booking["BookMe__Lead_Id__c"], lead_id.as_str());

    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    let events = env.records("Event").await;
    assert_eq!(events.len(), 1, "a reschedule updates, never duplicates");
    assert_eq!(events[0]["Id"], event_id.as_str());
    assert_eq!(events[0]["StartDateTime"], "2026-12-02T09:00:00.000+0000");
    assert_eq!(events[0]["EndDateTime"], "2026-12-02T09:45:00.000+0000");
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings[0]["BookMe__Version__c"], 2);
    assert_eq!(bookings[0]["BookMe__Status__c"], "rescheduled");

    env.publish("meeting.cancelled", &sample("cancelled")).await;
    env.wait_settled(3).await;
    let events = env.records("Event").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["Subject"], "Cancelled: Intro call");
    assert!(
        events[0]["Description"]
            .as_str()
            .unwrap()
            .ends_with("Cancellation reason: Customer asked to postpone to Q1")
    );
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings[0]["BookMe__Version__c"], 3);
    assert_eq!(bookings[0]["BookMe__Status__c"], "cancelled");
    assert_eq!(env.records("Lead").await.len(), 1);

    env.publish("meeting.booked", &sample("booked-group")).await;
    env.wait_settled(4).await;
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 3, "the group booking adds its two attendees");
    let marie = find(
        &leads,
        "BookMe__Lead_Key__c",
        "acme:marie.curie@initech.example",
    );
    assert_eq!(marie["Email"], "marie.curie@initech.example");
    assert_eq!(marie["Phone"], Value::Null);
    assert_eq!(marie["Title"], "Directrice achats");
    let pierre = find(
        &leads,
        "BookMe__Lead_Key__c",
        "acme:p.dupont@initech.example",
    );
    assert_eq!(pierre["Title"], Value::Null);
    let events = env.records("Event").await;
    let group = find(&events, "BookMe__Booking_Id__c", "bk_K3Z81");
    assert_eq!(group["WhoId"], marie["Id"]);
    assert_eq!(
        group["OwnerId"],
        user_id(&env, "luc.vendeur@acme.example").await.as_str()
    );
    assert_eq!(group["Subject"], "Démo produit — équipe achats");
    assert_eq!(group["StartDateTime"], "2026-12-03T12:00:00.000+0000");
    assert_eq!(env.outcomes().get("written"), Some(&4));
    env.finish().await;
}

#[tokio::test]
async fn duplicates_and_older_versions_leave_the_newest_once() {
    let env = TestEnv::start("idempotent").await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    assert_eq!(env.outcomes().get("written"), Some(&2));
    let before = (
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
        env.records("Lead").await,
    );

    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(4).await;
    let after = (
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
        env.records("Lead").await,
    );
    assert_eq!(
        before, after,
        "a duplicate or an older snapshot changes nothing"
    );
    assert_eq!(after.1[0]["BookMe__Version__c"], 2);
    assert_eq!(env.outcomes().get("superseded"), Some(&2));
    env.finish().await;
}

#[tokio::test]
async fn salesforce_version_guard_holds_when_the_cache_is_lost() {
    let env = TestEnv::start("guard").await;
    env.publish("meeting.cancelled", &sample("cancelled")).await;
    env.wait_settled(1).await;
    let before = (
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
    );
    assert_eq!(before.1[0]["BookMe__Version__c"], 3);

    // A second worker with an empty cache: only Salesforce's validation rule can stop the stale
    // snapshot, and the graph must roll back whole (the Event node comes before the guard).
    let mut env = env;
    env.restart_service_without_cache().await;
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(1).await;
    assert_eq!(env.outcomes().get("superseded"), Some(&1));
    let after = (
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
    );
    assert_eq!(before, after, "the stale graph rolled back every node");
    env.finish().await;
}

#[tokio::test]
async fn a_mapping_can_delete_the_event_on_cancel_and_replays_stay_idempotent() {
    let mut env = TestEnv::start_custom(
        "delete",
        |_| {},
        |tenants| {
            let acme = tenants.iter_mut().find(|t| t.tenant == "acme").unwrap();
            acme.records[1].when = Some("booking.status != 'cancelled'".into());
            let mut delete = acme.records[1].clone();
            delete.reference = "event_gone".into();
            delete.action = portals_crm::config::Action::Delete;
            delete.fields.clear();
            delete.when = Some("booking.status == 'cancelled'".into());
            acme.records.insert(2, delete);
            acme.records[3].fields.insert(
                "BookMe__Event_Id__c".into(),
                "{% if booking.status != 'cancelled' %}@{event.id}{% endif %}".into(),
            );
        },
    )
    .await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(env.records("Event").await.len(), 1);
    env.publish("meeting.cancelled", &sample("cancelled")).await;
    env.wait_settled(2).await;
    assert!(
        env.records("Event").await.is_empty(),
        "the cancellation deleted the Event"
    );
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings[0]["BookMe__Status__c"], "cancelled");
    assert_eq!(bookings[0]["BookMe__Version__c"], 3);

    // The same cancellation again, by a worker that lost its cache: the Event is already gone,
    // which must not dead-letter the booking.
    env.restart_service_without_cache().await;
    env.publish("meeting.cancelled", &sample("cancelled")).await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    assert!(env.records("Event").await.is_empty());
    assert_eq!(env.records("BookMe__Booking__c").await.len(), 1);
    env.finish().await;
}

/// Issue 12 B4: an upsert whose external id matches several records answers 300; inside the
/// graph the other nodes carry PROCESSING_HALTED placeholders. The booking is dead-lettered at
/// once, naming the multiple match and the matching ids, never retried.
#[tokio::test]
async fn an_external_id_matching_two_records_is_dead_lettered_with_their_ids() {
    let env = TestEnv::start_org(
        "multiple-match",
        |org| {
            // An admin made the Lead key External ID without Unique: two Leads can share it.
            let lead = org.sobjects.iter_mut().find(|o| o.name == "Lead").unwrap();
            let key = lead
                .fields
                .iter_mut()
                .find(|f| f.name == "BookMe__Lead_Key__c")
                .unwrap();
            key.unique = false;
        },
        |_| {},
        |_| {},
    )
    .await;
    let mut ids = Vec::new();
    for company in ["Globex", "Globex Nordics"] {
        let id = env
            .create_record(
                "Lead",
                serde_json::json!({"LastName": "Doe", "Company": company,
                    "BookMe__Lead_Key__c": "acme:jane.doe@globex.example"}),
            )
            .await;
        ids.push(id);
    }

    env.publish("meeting.booked", &sample("booked")).await;
    let dead = env.wait_dead_letters(1).await;
    // The dead letter is in its queue before the original is acked and counted.
    env.wait_settled(1).await;
    assert_eq!(dead[0].reason, "salesforce_multiple_choices", "{dead:#?}");
    assert_eq!(dead[0].sf_error_code.as_deref(), Some("MULTIPLE_CHOICES"));
    for id in &ids {
        assert!(dead[0].message.contains(id.as_str()), "{}", dead[0].message);
    }
    assert!(dead[0].message.contains("lead_0"), "{}", dead[0].message);
    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("dead_lettered"), Some(&1), "{outcomes:?}");
    assert_eq!(outcomes.get("retried"), None, "permanent: never retried");
    assert!(
        env.records("Event").await.is_empty(),
        "the graph rolled back"
    );
    env.finish().await;
}

/// A Lead a sales rep typed in by hand before the booking came: same name and email.
async fn typed_in_lead(env: &TestEnv) -> String {
    env.create_record(
        "Lead",
        serde_json::json!({"FirstName": "Jane", "LastName": "Doe", "Company": "Globex",
            "Email": "jane.doe@globex.example"}),
    )
    .await
}

/// Issue 12 B6: the demo org, like a new org, has the standard Lead duplicate rule on. By
/// default (`duplicate_rule = "save_anyway"`) the booking is written beside the typed-in Lead.
#[tokio::test]
async fn a_lead_matching_a_duplicate_rule_is_saved_by_default() {
    let env = TestEnv::start("duplicate-save").await;
    let typed = typed_in_lead(&env).await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 2, "{leads:#?}");
    assert!(leads.iter().any(|l| l["Id"] == typed.as_str()));
    assert_eq!(env.records("Event").await.len(), 1);
    env.finish().await;
}

/// With `duplicate_rule = "fail"` the match fails the booking at once, naming the matched Lead.
#[tokio::test]
async fn a_lead_matching_a_duplicate_rule_fails_when_the_tenant_says_so() {
    let env = TestEnv::start_custom(
        "duplicate-fail",
        |_| {},
        |tenants| {
            for tenant in tenants {
                tenant.org.duplicate_rule = portals_crm::config::DuplicateRulePolicy::Fail;
            }
        },
    )
    .await;
    let typed = typed_in_lead(&env).await;
    env.publish("meeting.booked", &sample("booked")).await;
    let dead = env.wait_dead_letters(1).await;
    // The dead letter is in its queue before the original is acked and counted.
    env.wait_settled(1).await;
    assert_eq!(
        dead[0].reason, "salesforce_duplicates_detected",
        "{dead:#?}"
    );
    assert!(
        dead[0].message.contains(&format!(
            "Standard_Lead_Duplicate_Rule matched Lead {typed}"
        )),
        "{}",
        dead[0].message
    );
    assert_eq!(
        env.outcomes().get("retried"),
        None,
        "permanent: never retried"
    );
    assert_eq!(env.records("Lead").await.len(), 1, "nothing written");
    env.finish().await;
}
