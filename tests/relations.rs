//! Event relations end to end: a group booking relates every attendee's Lead to its Event
//! exactly once, through replays, reschedules, stale versions and a worker that lost its cache;
//! and the emulator's EventRelation rules over HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestEnv;
use portals_crm::demo::booking_event;
use portals_crm::emulator::{self, FaultSpec, OrgSpec};
use portals_crm::salesforce::{Credentials, OrgEndpoint, SalesforceClient};
use portals_crm::telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;

fn attendee(name: &str) -> Value {
    json!({"email": format!("{name}@globex.example"), "first_name": name, "last_name": "Group", "company": "Globex", "phone": null, "title": null})
}

fn event(booking: &str, version: u64, names: &[&str]) -> Vec<u8> {
    let starts = OffsetDateTime::now_utc() + time::Duration::days(2);
    let status = if version == 1 {
        "booked"
    } else {
        "rescheduled"
    };
    serde_json::to_vec(&booking_event(
        "acme",
        booking,
        version,
        status,
        starts,
        "sara.rep@acme.example",
        names.iter().map(|n| attendee(n)).collect(),
        OffsetDateTime::now_utc(),
    ))
    .unwrap()
}

/// The Event's relations as (attendee name, IsParent, IsInvitee), sorted; and its WhoId's name.
async fn relations(env: &TestEnv) -> (Vec<(String, bool, bool)>, Option<String>) {
    let leads = env.records("Lead").await;
    let name = |id: &Value| {
        leads
            .iter()
            .find(|l| &l["Id"] == id)
            .map(|l| l["FirstName"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| format!("not a lead: {id}"))
    };
    let events = env.records("Event").await;
    assert_eq!(events.len(), 1, "one Event: {events:#?}");
    let mut found: Vec<(String, bool, bool)> = env
        .records("EventRelation")
        .await
        .iter()
        .map(|r| {
            assert_eq!(r["EventId"], events[0]["Id"]);
            (
                name(&r["RelationId"]),
                r["IsParent"] == true,
                r["IsInvitee"] == true,
            )
        })
        .collect();
    found.sort();
    let who = (!events[0]["WhoId"].is_null()).then(|| name(&events[0]["WhoId"]));
    (found, who)
}

fn rel(name: &str, parent: bool) -> (String, bool, bool) {
    (name.to_owned(), parent, true)
}

async fn queries(env: &TestEnv) -> u64 {
    env.get_json("/__emulator/stats").await["requests"]["query"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn every_attendee_is_related_once_through_replays_reschedules_and_lost_caches() {
    let mut env = TestEnv::start("relations").await;

    env.publish("meeting.booked", &event("bk_rel", 1, &["ann", "bob", "cy"]))
        .await;
    env.wait_settled(1).await;
    assert_eq!(env.records("Lead").await.len(), 3);
    assert_eq!(
        relations(&env).await,
        (
            vec![rel("ann", true), rel("bob", false), rel("cy", false)],
            Some("ann".into())
        ),
        "the first attendee is the Who, everyone an invitee"
    );
    assert_eq!(
        queries(&env).await,
        1,
        "the host's user lookup only: a first version reads no relations"
    );

    // A duplicate of the same event: nothing new.
    env.publish("meeting.booked", &event("bk_rel", 1, &["ann", "bob", "cy"]))
        .await;
    env.wait_settled(2).await;
    assert_eq!(env.records("EventRelation").await.len(), 3);

    // A reschedule drops ann (the Who) and adds dee: planned from the cache, no query.
    let before = queries(&env).await;
    env.publish(
        "meeting.rescheduled",
        &event("bk_rel", 2, &["bob", "cy", "dee"]),
    )
    .await;
    env.wait_settled(3).await;
    assert_eq!(queries(&env).await, before, "steady state: no lookup");
    assert_eq!(
        relations(&env).await,
        (
            vec![rel("bob", true), rel("cy", false), rel("dee", false)],
            Some("bob".into())
        )
    );
    assert_eq!(env.records("Lead").await.len(), 4, "ann's Lead stays");

    // A stale version changes nothing.
    env.publish("meeting.booked", &event("bk_rel", 1, &["ann", "bob", "cy"]))
        .await;
    env.wait_settled(4).await;
    assert_eq!(
        relations(&env).await.0,
        vec![rel("bob", true), rel("cy", false), rel("dee", false)]
    );

    // A worker without its cache (its counters start again): the relations are read from the
    // org, one query.
    env.restart_service_without_cache().await;
    env.publish("meeting.rescheduled", &event("bk_rel", 3, &["cy", "dee"]))
        .await;
    env.wait_settled(1).await;
    assert_eq!(
        relations(&env).await,
        (vec![rel("cy", true), rel("dee", false)], Some("cy".into()))
    );

    // Again without a cache, the same version replayed: read, nothing to change.
    env.restart_service_without_cache().await;
    env.publish("meeting.rescheduled", &event("bk_rel", 3, &["cy", "dee"]))
        .await;
    env.wait_settled(1).await;
    assert_eq!(env.records("EventRelation").await.len(), 2);
    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("dead_lettered"), None, "{outcomes:?}");
    env.finish().await;
}

/// An org without Shared Activities has no `EventRelation.IsParent`. Invitees only
/// (`parent = "none"`): every attendee is related as an invitee, through a reschedule that
/// reads the relations (a worker without its cache), with no write or query naming the field;
/// the Event names its Who itself (`WhoId`).
/// (`parent = "first"` in such an org: `tests/mapping.rs`.)
#[tokio::test]
async fn without_shared_activities_invitees_only_relations_are_written() {
    let mut env = TestEnv::start_custom(
        "relations-nosa",
        |_| {},
        |tenants| {
            for tenant in tenants {
                if let Some(relations) = tenant.relations.as_mut() {
                    relations.parent = portals_crm::config::Parent::None;
                    // The Event names its one Who itself, as such an org relates a lead.
                    let event = relations.event.clone();
                    let record = tenant.records.iter_mut().find(|r| r.reference == event);
                    record
                        .unwrap()
                        .fields
                        .insert("WhoId".into(), json!("@{lead_0.id}"));
                }
            }
        },
    )
    .await;
    let off = env
        .post_json("/__emulator/org", json!({"shared_activities": false}))
        .await;
    assert_eq!(off, 200);
    env.publish("meeting.booked", &event("bk_nosa", 1, &["ann", "bob"]))
        .await;
    env.wait_settled(1).await;
    let invitees = |found: Vec<Value>| {
        let mut names: Vec<(String, bool)> = found
            .iter()
            .map(|r| {
                assert!(r.get("IsParent").is_none_or(Value::is_null), "{r}");
                (
                    r["RelationId"].as_str().unwrap().to_owned(),
                    r["IsInvitee"] == true,
                )
            })
            .collect();
        names.sort();
        names
    };
    let first = invitees(env.records("EventRelation").await);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(first.iter().all(|(_, invitee)| *invitee));
    env.restart_service_without_cache().await;
    env.publish("meeting.rescheduled", &event("bk_nosa", 2, &["bob", "cy"]))
        .await;
    env.wait_settled(1).await;
    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("written"), Some(&1), "{outcomes:?}");
    let leads = env.records("Lead").await;
    let lead_of = |name: &str| {
        leads
            .iter()
            .find(|l| l["FirstName"] == name)
            .map(|l| l["Id"].as_str().unwrap().to_owned())
            .unwrap()
    };
    let mut want = vec![(lead_of("bob"), true), (lead_of("cy"), true)];
    want.sort();
    assert_eq!(invitees(env.records("EventRelation").await), want);
    assert_eq!(
        env.records("Event").await[0]["WhoId"].as_str(),
        Some(lead_of("bob").as_str()),
        "the Who the Event maps, which the relations leave as it is"
    );

    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("dead_lettered"), None, "{outcomes:?}");

    // What `parent = "first"` would meet: Salesforce's answers for a field the org lacks.
    let http = reqwest::Client::new();
    let token = env.token().await;
    let data = format!("{}/services/data/v66.0", env.emulator.base_url);
    let event_id = env.records("Event").await[0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let write = http
        .post(format!("{data}/sobjects/EventRelation"))
        .bearer_auth(&token)
        .json(&json!({"EventId": event_id, "RelationId": lead_of("ann"), "IsParent": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 400);
    let refused: Value = write.json().await.unwrap();
    assert_eq!(
        refused,
        json!([{"errorCode": "INVALID_FIELD", "message": "No such column 'IsParent' on sobject of type EventRelation", "fields": []}])
    );
    let query = http
        .get(format!("{data}/query"))
        .query(&[("q", "SELECT Id, IsParent FROM EventRelation")])
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(query.status(), 400);
    let refused: Value = query.json().await.unwrap();
    assert_eq!(refused[0]["errorCode"], "INVALID_FIELD");
    assert_eq!(
        refused[0]["message"],
        "No such column 'IsParent' on entity 'EventRelation'."
    );
    env.finish().await;
}

#[tokio::test]
async fn a_version_one_replayed_by_a_worker_without_its_cache_fails_on_the_duplicate_and_rereads() {
    let mut env = TestEnv::start("relations-dup").await;
    env.publish("meeting.booked", &event("bk_dup", 1, &["eve", "fay"]))
        .await;
    env.wait_settled(1).await;
    // The ledger is gone, so version 1 is planned on no relations: its creates meet Salesforce's
    // duplicate error, the graph rolls back, the relations are read and the graph goes again.
    env.restart_service_without_cache().await;
    env.publish("meeting.booked", &event("bk_dup", 1, &["eve", "fay"]))
        .await;
    env.wait_settled(1).await;
    assert_eq!(
        relations(&env).await,
        (
            vec![rel("eve", true), rel("fay", false)],
            Some("eve".into())
        )
    );
    let outcomes = env.outcomes();
    assert_eq!(outcomes.get("written"), Some(&1), "{outcomes:?}");
    env.finish().await;
}

#[tokio::test]
async fn emulator_event_relation_rules_and_cascade() {
    use reqwest::Method;
    let emulator = emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        OrgSpec::demo(),
        &FaultSpec::default(),
    )
    .await
    .unwrap();
    let client = SalesforceClient::new(
        OrgEndpoint {
            tenant: "test".into(),
            login_url: emulator.base_url.clone(),
            api_version: "66.0".into(),
            credentials: Credentials::ClientCredentials {
                client_id: "demo-client".into(),
                client_secret: SecretString::from("demo-secret".to_owned()),
            },
            timeout: Duration::from_secs(10),
            duplicate_rule: Default::default(),
            ca_certificate: None,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let call = |method: Method, path: &str, body: Option<Value>| {
        let (emulator, client, path) = (&emulator, &client, format!("/services/data/v66.0{path}"));
        async move { common::raw(emulator, client, method, &path, body).await }
    };
    let id = |v: &Value| v["id"].as_str().unwrap().to_owned();
    let (_, a) = call(
        Method::POST,
        "/sobjects/Lead",
        Some(json!({"LastName": "A", "Company": "X"})),
    )
    .await;
    let (_, b) = call(
        Method::POST,
        "/sobjects/Lead",
        Some(json!({"LastName": "B", "Company": "X"})),
    )
    .await;
    let (_, ev) = call(Method::POST, "/sobjects/Event", Some(json!({"Subject": "Call", "StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z"}))).await;
    let (a, b, ev) = (id(&a), id(&b), id(&ev));

    let (status, first) = call(
        Method::POST,
        "/sobjects/EventRelation",
        Some(json!({"EventId": ev, "RelationId": a, "IsParent": true, "IsInvitee": true})),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (_, event) = call(Method::GET, &format!("/sobjects/Event/{ev}"), None).await;
    assert_eq!(event["WhoId"], a.as_str(), "the parent relation is the Who");

    // Defaults: only RelationId given → an invitee, status New.
    let (status, invitee) = call(
        Method::POST,
        "/sobjects/EventRelation",
        Some(json!({"EventId": ev, "RelationId": b})),
    )
    .await;
    assert_eq!(status, 201, "{invitee}");
    let (_, stored) = call(
        Method::GET,
        &format!("/sobjects/EventRelation/{}", id(&invitee)),
        None,
    )
    .await;
    assert_eq!(
        (
            stored["IsInvitee"].clone(),
            stored["IsParent"].clone(),
            stored["Status"].clone()
        ),
        (json!(true), json!(false), json!("New"))
    );

    let (status, duplicate) = call(
        Method::POST,
        "/sobjects/EventRelation",
        Some(json!({"EventId": ev, "RelationId": a, "IsInvitee": true})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(duplicate[0]["errorCode"], "DUPLICATE_VALUE");
    assert_eq!(
        duplicate[0]["message"],
        format!(
            "duplicate value found: RelationId duplicates value on record with id: {}",
            id(&first)
        )
    );

    let (status, second_lead) = call(
        Method::PATCH,
        &format!("/sobjects/EventRelation/{}", id(&invitee)),
        Some(json!({"IsParent": true})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(second_lead[0]["errorCode"], "FIELD_INTEGRITY_EXCEPTION");
    assert_eq!(second_lead[0]["fields"], json!(["RelationId"]));

    let (status, missing) = call(
        Method::POST,
        "/sobjects/EventRelation",
        Some(json!({"EventId": ev, "RelationId": emulator::store::make_id("00Q", 999_999)})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(missing[0]["errorCode"], "INVALID_CROSS_REFERENCE_KEY");
    assert_eq!(missing[0]["fields"], json!(["RelationId"]));

    let (status, immutable) = call(
        Method::PATCH,
        &format!("/sobjects/EventRelation/{}", id(&invitee)),
        Some(json!({"RelationId": a})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(immutable[0]["errorCode"], "INVALID_FIELD_FOR_INSERT_UPDATE");

    // The lookup the service sends on a cache miss.
    let rows = client
        .query(&format!("SELECT Id, IsParent, IsInvitee, Event.Subject, TYPEOF Relation WHEN Lead THEN LastName END FROM EventRelation WHERE EventId = '{ev}'"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["Event"]["Subject"], "Call");
    assert_eq!(rows[0]["Relation"]["LastName"], "A");
    assert_eq!(rows[0]["Relation"]["attributes"]["type"], "Lead");
    let (status, polymorphic) = call(
        Method::GET,
        "/query?q=SELECT+Relation.LastName+FROM+EventRelation",
        None,
    )
    .await;
    assert_eq!(
        (status, polymorphic[0]["errorCode"].clone()),
        (400, json!("INVALID_FIELD"))
    );

    // A graph that removes the parent relation and then fails is rolled back whole: the
    // relation is back and so is the Who it had set.
    let rollback = json!({"graphs": [{"graphId": "g1", "compositeRequest": [
        {"method": "DELETE", "url": format!("/services/data/v66.0/sobjects/EventRelation/{}", id(&first)), "referenceId": "unparent"},
        {"method": "POST", "url": "/services/data/v66.0/sobjects/Lead", "referenceId": "no_name", "body": {"Company": "X"}}
    ]}]});
    let (status, answer) = call(Method::POST, "/composite/graph", Some(rollback)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["graphs"][0]["isSuccessful"], false, "{answer}");
    let (_, event) = call(Method::GET, &format!("/sobjects/Event/{ev}"), None).await;
    assert_eq!(
        event["WhoId"],
        a.as_str(),
        "the Who is restored with the relation"
    );
    let (status, _) = call(
        Method::GET,
        &format!("/sobjects/EventRelation/{}", id(&first)),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // Deleting the parent relation clears the Who; deleting the Event deletes its relations.
    let (status, _) = call(
        Method::DELETE,
        &format!("/sobjects/EventRelation/{}", id(&first)),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (_, event) = call(Method::GET, &format!("/sobjects/Event/{ev}"), None).await;
    assert_eq!(event["WhoId"], Value::Null);
    let (status, _) = call(Method::DELETE, &format!("/sobjects/Event/{ev}"), None).await;
    assert_eq!(status, 204);
    let (status, gone) = call(
        Method::GET,
        &format!("/sobjects/EventRelation/{}", id(&invitee)),
        None,
    )
    .await;
    assert_eq!(
        (status, gone[0]["errorCode"].clone()),
        (404, json!("NOT_FOUND"))
    );
}
