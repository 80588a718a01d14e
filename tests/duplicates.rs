//! Issue 12 B6, the third tenant choice: `duplicate_rule = "relate_to_existing"`. The demo org,
//! like a new org, has the standard Lead duplicate rule on; an attendee a sales rep already
//! typed in (a Lead or a Contact) refuses the booking's new Lead with DUPLICATES_DETECTED, and
//! the booking is written related to the existing record instead — end to end against the real
//! broker and the emulator, the next version too. `doctor` lists the org's active rules.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{TestEnv, sample};
use portals_crm::config::{DuplicateRulePolicy, TenantConfig};
use portals_crm::doctor::check_tenant;
use portals_crm::emulator::{self, FaultSpec, OrgSpec};
use portals_crm::enrich::Caches;
use portals_crm::telemetry::metrics::Metrics;
use portals_crm::tenants::load_tenants;
use serde_json::{Value, json};

async fn relating(name: &str) -> TestEnv {
    TestEnv::start_custom(
        name,
        |_| {},
        |tenants| {
            for tenant in tenants {
                tenant.org.duplicate_rule = DuplicateRulePolicy::RelateToExisting;
            }
        },
    )
    .await
}

/// The sample booking's attendee (`tests/fixtures/events/booked.json`) as a sales rep typed
/// them in by hand: same name and email.
fn jane() -> Value {
    json!({"FirstName": "Jane", "LastName": "Doe", "Email": "jane.doe@globex.example"})
}

async fn relations(env: &TestEnv) -> Vec<Value> {
    env.records("EventRelation").await
}

#[tokio::test]
async fn a_booking_of_a_typed_in_lead_is_related_to_it_and_so_is_its_next_version() {
    let env = relating("dup-relate-lead").await;
    let mut lead = jane();
    lead["Company"] = json!("Globex");
    let typed = env.create_record("Lead", lead).await;

    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    let leads = env.records("Lead").await;
    assert_eq!(leads.len(), 1, "no new Lead: {leads:#?}");
    assert_eq!(leads[0]["Id"], typed.as_str());
    let events = env.records("Event").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["WhoId"], typed.as_str(), "{events:#?}");
    let rels = relations(&env).await;
    assert_eq!(rels.len(), 1, "{rels:#?}");
    assert_eq!(rels[0]["RelationId"], typed.as_str());
    assert_eq!(rels[0]["EventId"], events[0]["Id"]);
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings.len(), 1);
    assert_eq!(bookings[0]["BookMe__Lead_Id__c"], typed.as_str());
    assert_eq!(bookings[0]["BookMe__Event_Id__c"], events[0]["Id"]);

    // The next version leaves the Lead out from the start (the choice is remembered) and keeps
    // the one relation.
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&2),
        "{:?}",
        env.outcomes()
    );
    assert_eq!(env.records("Lead").await.len(), 1);
    let rels = relations(&env).await;
    assert_eq!(rels.len(), 1, "{rels:#?}");
    assert_eq!(rels[0]["RelationId"], typed.as_str());
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings[0]["BookMe__Version__c"].as_f64(), Some(2.0));
    let text = env.metrics().await;
    let line = "portals_crm_duplicates_related_total{sobject=\"Lead\",tenant=\"acme\"} 2";
    assert!(text.contains(line), "{line} in\n{text}");
    // Three graphs in all: version 1 refused, then related; version 2 related at once.
    let graphs =
        "portals_crm_salesforce_requests_total{kind=\"graph\",status=\"200\",tenant=\"acme\"} 3";
    assert!(text.contains(graphs), "{graphs} in\n{text}");
    env.finish().await;
}

#[tokio::test]
async fn a_booking_of_a_typed_in_contact_is_related_to_the_contact() {
    let env = relating("dup-relate-contact").await;
    // The admin lets the integration user read Contacts (needed to relate an Event to one);
    // create access only to type the Contact in here.
    let grant = |access: &str| json!({"permission_set": "BookMe_Integration_User", "object": "Contact", "access": access});
    assert_eq!(env.post_json("/__emulator/org", grant("CR")).await, 200);
    env.field_access("Contact.FirstName", "edit").await;
    env.field_access("Contact.Email", "edit").await;
    let typed = env.create_record("Contact", jane()).await;
    assert_eq!(env.post_json("/__emulator/org", grant("R")).await, 200);

    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&1),
        "{:?}",
        env.outcomes()
    );
    assert!(env.records("Lead").await.is_empty(), "no new Lead");
    let events = env.records("Event").await;
    assert_eq!(events[0]["WhoId"], typed.as_str(), "{events:#?}");
    let rels = relations(&env).await;
    assert_eq!(rels.len(), 1, "{rels:#?}");
    assert_eq!(rels[0]["RelationId"], typed.as_str());
    // BookMe__Lead_Id__c looks up Leads only: there is no Lead, so it stays empty.
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings.len(), 1);
    assert_eq!(bookings[0]["BookMe__Lead_Id__c"], Value::Null);
    assert_eq!(bookings[0]["BookMe__Event_Id__c"], events[0]["Id"]);

    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&2),
        "{:?}",
        env.outcomes()
    );
    assert!(env.records("Lead").await.is_empty());
    let rels = relations(&env).await;
    assert_eq!(rels.len(), 1, "{rels:#?}");
    assert_eq!(rels[0]["RelationId"], typed.as_str());
    let text = env.metrics().await;
    let line = "portals_crm_duplicates_related_total{sobject=\"Contact\",tenant=\"acme\"} 2";
    assert!(text.contains(line), "{line} in\n{text}");
    env.finish().await;
}

#[tokio::test]
async fn the_emulator_answers_duplicates_detected_inside_a_graph_with_the_matches() {
    let env = relating("dup-shape").await;
    let mut lead = jane();
    lead["Company"] = json!("Globex");
    let typed = env.create_record("Lead", lead.clone()).await;
    // A second identical Lead through the REST API, without the header: the rule's answer.
    let token = env.token().await;
    let graph = json!({"graphs": [{"graphId": "g0", "compositeRequest": [
        {"method": "POST", "url": "/services/data/v66.0/sobjects/Lead", "referenceId": "lead_0", "body": lead},
        {"method": "POST", "url": "/services/data/v66.0/sobjects/Event", "referenceId": "event",
         "body": {"Subject": "x", "StartDateTime": "2026-12-01T14:00:00.000Z", "EndDateTime": "2026-12-01T14:30:00.000Z", "WhoId": "@{lead_0.id}"}}
    ]}]});
    let answer: Value = reqwest::Client::new()
        .post(format!(
            "{}/services/data/v66.0/composite/graph",
            env.emulator.base_url
        ))
        .bearer_auth(token)
        .json(&graph)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let node = &answer["graphs"][0]["graphResponse"]["compositeResponse"][0];
    assert_eq!(node["httpStatusCode"], 400, "{answer:#}");
    let error = &node["body"][0];
    assert_eq!(error["errorCode"], "DUPLICATES_DETECTED");
    assert_eq!(error["message"], "Use one of these records?");
    let result = &error["duplicateResult"];
    assert_eq!(result["duplicateRule"], "Standard_Lead_Duplicate_Rule");
    assert_eq!(result["duplicateRuleEntityType"], "Lead");
    assert_eq!(result["allowSave"], true);
    let matched = &result["matchResults"][0];
    assert_eq!(matched["entityType"], "Lead");
    assert_eq!(matched["rule"], "Standard_Lead_Match_Rule_v1_0");
    assert_eq!(matched["size"], 1);
    let record = &matched["matchRecords"][0]["record"];
    assert_eq!(record["Id"], typed.as_str());
    assert_eq!(record["attributes"]["type"], "Lead");
    assert_eq!(
        record["attributes"]["url"],
        format!("/services/data/v66.0/sobjects/Lead/{typed}")
    );
    let placeholder = &answer["graphs"][0]["graphResponse"]["compositeResponse"][1]["body"][0];
    assert_eq!(placeholder["errorCode"], "PROCESSING_HALTED");
    env.finish().await;
}

#[tokio::test]
async fn doctor_lists_the_active_duplicate_rules_and_what_the_choice_does() {
    let doctor = |view_setup: bool, policy: DuplicateRulePolicy| async move {
        let mut org = OrgSpec::demo();
        if view_setup {
            // "View Setup and Configuration", which lets a user query DuplicateRule.
            for set in &mut org.permission_sets {
                set.objects.insert("DuplicateRule".into(), "R".into());
            }
        }
        let emulator = emulator::start("127.0.0.1:0".parse().unwrap(), org, &FaultSpec::default())
            .await
            .unwrap();
        let mut tenant = TenantConfig::load(Path::new("config/tenants/acme.toml")).unwrap();
        tenant.org.login_url = emulator.base_url.clone();
        tenant.org.duplicate_rule = policy;
        let metrics = Arc::new(Metrics::new());
        let loaded = load_tenants(vec![tenant], Duration::from_secs(10), &metrics)
            .unwrap()
            .remove(0);
        let caches = Caches::temporary(metrics).unwrap();
        let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
        emulator.stop().await;
        report
    };
    let report = doctor(true, DuplicateRulePolicy::RelateToExisting).await;
    let text = report.to_string();
    assert!(report.ok(), "{text}");
    assert!(
        text.contains(
            "[ok  ] duplicate rule Standard_Lead_Duplicate_Rule: \"Standard Lead Duplicate Rule\" \
             is active on Lead; relate_to_existing: a Lead it matches is not created"
        ),
        "{text}"
    );
    let text = doctor(true, DuplicateRulePolicy::Fail).await.to_string();
    assert!(
        text.contains("is active on Lead; fail: a booking whose Lead it matches is dead-lettered"),
        "{text}"
    );
    let report = doctor(false, DuplicateRulePolicy::SaveAnyway).await;
    let text = report.to_string();
    assert!(report.ok(), "{text}");
    assert!(
        text.contains("[ok  ] active duplicate rules: the integration user cannot read"),
        "{text}"
    );
}
