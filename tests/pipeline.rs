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
