//! Record-level security (sharing): what the emulator answers, as Salesforce does, when the
//! integration user writes records owned by others that are not shared with it; how the
//! service dead-letters each case with a reason naming the tier; what `doctor` says; and that a
//! replay lands once the admin shares the records.

mod common;

use common::{TestEnv, sample};
use portals_crm::dlq::{DeadLetter, Dlq, Filter};
use portals_crm::doctor::check_tenant;
use portals_crm::emulator::{self, FaultSpec, OrgSpec};
use portals_crm::enrich::Caches;
use portals_crm::telemetry::metrics::Metrics;
use portals_crm::tenants::load_tenants;
use serde_json::{Value, json};

const V: &str = "/services/data/v66.0";
const INTEGRATION: &str = "integration@bookme-demo.example";

/// The emulator's REST API as the integration user (a client-credentials token).
struct Api {
    base: String,
    token: String,
}

impl Api {
    async fn sign_in(base: &str) -> Self {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        let answer = reqwest::Client::new()
            .post(format!("{base}/services/oauth2/token"))
            .form(&form)
            .send()
            .await
            .unwrap();
        let token: Value = answer.json().await.unwrap();
        Self {
            base: base.to_owned(),
            token: token["access_token"].as_str().unwrap().to_owned(),
        }
    }

    /// One request: (status, JSON body).
    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

async fn org_change(base: &str, change: Value) {
    let status = reqwest::Client::new()
        .post(format!("{base}/__emulator/org"))
        .json(&change)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200, "{change}");
}

/// Sets `sobject`'s org-wide default.
async fn org_default(base: &str, sobject: &str, model: &str) {
    org_change(base, json!({"sobject": sobject, "sharing_model": model})).await;
}

/// Sets the integration user's object permission letters on `sobject` (`M`: Modify All).
async fn object_access(base: &str, sobject: &str, letters: &str) {
    org_change(
        base,
        json!({"permission_set": "BookMe_Integration_User", "object": sobject, "access": letters}),
    )
    .await;
}

async fn user_id(base: &str, username: &str) -> String {
    let users: Vec<Value> = reqwest::get(format!("{base}/__emulator/records/User"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    users
        .iter()
        .find(|u| u["Username"] == username)
        .and_then(|u| u["Id"].as_str())
        .unwrap()
        .to_owned()
}

/// The emulator over the demo org (Public Read/Write everywhere), on a free port.
async fn demo_emulator() -> emulator::EmulatorHandle {
    let any_port = "127.0.0.1:0".parse().unwrap();
    emulator::start(any_port, OrgSpec::demo(), &FaultSpec::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_emulator_answers_sharing_refusals_as_salesforce_does() {
    let emulator = demo_emulator().await;
    let base = emulator.base_url.clone();
    let api = Api::sign_in(&base).await;
    let sara = user_id(&base, "sara.rep@acme.example").await;
    let key = format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/t:hidden@x.example");
    let lead = json!({"LastName": "Hidden", "Company": "X", "OwnerId": sara});
    let (status, created) = api
        .send(reqwest::Method::PATCH, &key, Some(lead.clone()))
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let event = |who: &str| json!({"StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z", "WhoId": who});
    let event_url = format!("{V}/sobjects/Event/BookMe__Booking_Id__c/bk_share");

    // Private: the record is invisible. Reads answer 404, queries skip it, the upsert does not
    // match it and collides on the unique key, and a lookup to it is refused.
    org_default(&base, "Lead", "Private").await;
    let (status, body) = api
        .send(
            reqwest::Method::GET,
            &format!("{V}/sobjects/Lead/{id}"),
            None,
        )
        .await;
    assert_eq!(
        (status, &body[0]["errorCode"]),
        (404, &json!("NOT_FOUND")),
        "{body}"
    );
    let (_, rows) = api
        .send(
            reqwest::Method::GET,
            &format!("{V}/query?q=SELECT+Id+FROM+Lead"),
            None,
        )
        .await;
    assert_eq!(rows["totalSize"], 0, "{rows}");
    let (status, body) = api
        .send(reqwest::Method::PATCH, &key, Some(lead.clone()))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!([{"errorCode": "DUPLICATE_VALUE", "fields": [],
                "message": format!("duplicate value found: BookMe__Lead_Key__c duplicates value on record with id: {id}")}])
    );
    let (status, body) = api
        .send(reqwest::Method::PATCH, &event_url, Some(event(&id)))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!([{"errorCode": "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY", "fields": [],
                "message": format!("insufficient access rights on cross-reference id: {}", &id[..15])}])
    );

    // The same answers inside a Composite Graph: the failing node carries them, the graph rolls
    // back.
    let graph = json!({"graphs": [{"graphId": "g1", "compositeRequest": [
        {"method": "PATCH", "url": key, "referenceId": "lead", "body": lead}]}]});
    let (status, body) = api
        .send(
            reqwest::Method::POST,
            &format!("{V}/composite/graph"),
            Some(graph),
        )
        .await;
    assert_eq!(status, 200);
    let node = &body["graphs"][0]["graphResponse"]["compositeResponse"][0];
    assert_eq!(body["graphs"][0]["isSuccessful"], false);
    assert_eq!(
        (
            node["httpStatusCode"].as_u64(),
            node["body"][0]["errorCode"].as_str()
        ),
        (Some(400), Some("DUPLICATE_VALUE"))
    );

    // Public Read Only: visible, a lookup to it is fine, an update is refused.
    org_default(&base, "Lead", "Read").await;
    let (status, _) = api
        .send(
            reqwest::Method::GET,
            &format!("{V}/sobjects/Lead/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = api
        .send(reqwest::Method::PATCH, &key, Some(lead.clone()))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!([{"errorCode": "INSUFFICIENT_ACCESS_OR_READONLY", "fields": [], "message": "insufficient access rights on object id"}])
    );
    let (status, body) = api
        .send(reqwest::Method::PATCH, &event_url, Some(event(&id)))
        .await;
    assert_eq!(status, 201, "{body}");

    // Modify All in the permission set: every record, whatever its sharing.
    org_default(&base, "Lead", "Private").await;
    object_access(&base, "Lead", "CRUM").await;
    let (status, body) = api.send(reqwest::Method::PATCH, &key, Some(lead)).await;
    assert_eq!(
        (status, body["created"].as_bool()),
        (200, Some(false)),
        "{body}"
    );
    emulator.stop().await;
}

async fn dead_letters(env: &TestEnv) -> Vec<DeadLetter> {
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let letters = dlq.list(&Filter::default()).await.unwrap();
    dlq.close().await;
    letters
}

async fn replay(env: &TestEnv, reason: &str) {
    let dlq = Dlq::open(&env.config.amqp.url, env.topology.clone())
        .await
        .unwrap();
    let filter = Filter {
        reason: Some(reason.into()),
        ..Filter::default()
    };
    assert_eq!(dlq.replay(&filter, false).await.unwrap().letters.len(), 1);
    dlq.close().await;
}

/// The one dead letter there is: its reason, and a message that names the tier and the fix.
async fn only_dead_letter(env: &TestEnv, reason: &str, sf_error: &str, fix: &str) {
    let letters = dead_letters(env).await;
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, reason, "{letter:#?}");
    assert_eq!(letter.salesforce_error.as_deref(), Some(sf_error));
    assert!(
        letter
            .message
            .starts_with("record-level security (sharing): "),
        "{}",
        letter.message
    );
    assert!(letter.message.contains(fix), "{}", letter.message);
    assert!(
        !env.outcomes().contains_key("retried"),
        "permanent: no retries; {:?}",
        env.outcomes()
    );
}

/// Shares `sobject`'s records with the integration user (a Read/Write sharing rule), replays
/// the dead letters of `reason`, and waits until the replay is written.
async fn share_and_replay(env: &TestEnv, sobject: &str, reason: &str, written: u64) {
    org_change(
        &env.emulator.base_url,
        json!({"sharing_rule": {"sobject": sobject, "shared_with": INTEGRATION, "access_level": "Edit"}}),
    )
    .await;
    let settled = env.settled();
    replay(env, reason).await;
    env.wait_settled(settled + 1).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&written),
        "{:?}",
        env.outcomes()
    );
    assert!(dead_letters(env).await.is_empty());
}

#[tokio::test]
async fn events_of_other_owners_not_shared_are_dead_lettered_and_land_once_shared() {
    let env = TestEnv::start("sharing").await;
    let base = env.emulator.base_url.clone();
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    let event = &env.records("Event").await[0];
    assert_eq!(
        event["OwnerId"],
        user_id(&base, "sara.rep@acme.example").await.as_str(),
        "the host owns it"
    );

    // Private: the reschedule's Event upsert cannot see Sara's Event.
    org_default(&base, "Event", "Private").await;
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    only_dead_letter(
        &env,
        "salesforce_sharing_record_not_visible",
        "DUPLICATE_VALUE",
        "\"Modify All\" on Event",
    )
    .await;
    object_access(&base, "Event", "CRUDM").await;
    replay(&env, "salesforce_sharing_record_not_visible").await;
    env.wait_settled(3).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&2),
        "{:?}",
        env.outcomes()
    );
    assert_eq!(
        env.records("Event").await.len(),
        1,
        "updated, not duplicated"
    );

    // Public Read Only: the cancellation may see Sara's Event but not edit it.
    object_access(&base, "Event", "CRUD").await;
    org_default(&base, "Event", "Read").await;
    env.publish("meeting.cancelled", &sample("cancelled")).await;
    env.wait_settled(4).await;
    only_dead_letter(
        &env,
        "salesforce_sharing_record_read_only",
        "INSUFFICIENT_ACCESS_OR_READONLY",
        "sharing rule on Event",
    )
    .await;
    share_and_replay(&env, "Event", "salesforce_sharing_record_read_only", 3).await;
    let event = &env.records("Event").await[0];
    assert!(
        event["Subject"]
            .as_str()
            .unwrap()
            .starts_with("Cancelled: "),
        "{event}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_lead_assigned_to_the_host_and_not_shared_cannot_be_referenced_until_shared() {
    // A mapping that assigns each Lead to the host: under a Private Lead default the Event's
    // WhoId then refers to a Lead the integration user cannot see.
    let env = TestEnv::start_custom(
        "sharing-ref",
        |_| {},
        |tenants| {
            for tenant in tenants {
                tenant.records[0].fields.insert(
                    "OwnerId".into(),
                    json!("{{ host_user_id or integration_user_id }}"),
                );
            }
        },
    )
    .await;
    let base = env.emulator.base_url.clone();
    org_default(&base, "Lead", "Private").await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    only_dead_letter(
        &env,
        "salesforce_sharing_reference_not_visible",
        "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
        "access to Lead records owned by other users",
    )
    .await;
    assert!(env.records("Lead").await.is_empty(), "rolled back");
    share_and_replay(&env, "Lead", "salesforce_sharing_reference_not_visible", 1).await;
    let lead = &env.records("Lead").await[0];
    assert_eq!(
        lead["OwnerId"],
        user_id(&base, "sara.rep@acme.example").await.as_str()
    );
    env.finish().await;
}

#[tokio::test]
async fn doctor_probes_sharing_and_names_the_fix() {
    let emulator = demo_emulator().await;
    let base = emulator.base_url.clone();
    let mut tenant =
        portals_crm::config::TenantConfig::load_dir(std::path::Path::new("config/tenants"))
            .unwrap()
            .into_iter()
            .find(|t| t.tenant == "acme")
            .unwrap();
    tenant.org.login_url = base.clone();
    let metrics = std::sync::Arc::new(Metrics::new());
    let loaded = load_tenants(vec![tenant], std::time::Duration::from_secs(10), &metrics)
        .unwrap()
        .remove(0);
    let caches = Caches::temporary(metrics.clone()).unwrap();
    let sharing_check = |report: &portals_crm::doctor::Report| {
        report
            .checks
            .iter()
            .find(|c| c.name.starts_with("record sharing"))
            .cloned()
            .unwrap_or_else(|| panic!("no sharing check in {report}"))
    };

    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    assert!(report.ok(), "{report}");
    assert!(
        sharing_check(&report)
            .detail
            .contains("Lead, Event, BookMe__Booking__c"),
        "{report}"
    );

    let cases = [
        (
            "Event",
            "Private",
            "not shared with the integration user",
            "\"Modify All\" on Event",
        ),
        (
            "Event",
            "Read",
            "can see this Event but not edit it",
            "sharing rule on Event",
        ),
        (
            "Lead",
            "Private",
            "refers to Lead",
            "to Lead records owned by other users",
        ),
    ];
    for (sobject, model, condition, fix) in cases {
        org_default(&base, sobject, model).await;
        let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
        let check = sharing_check(&report);
        assert!(!check.ok, "{report}");
        assert!(
            check
                .detail
                .starts_with("record-level security (sharing): ")
                && check.detail.contains(condition),
            "{report}"
        );
        assert!(check.fix.as_deref().unwrap().contains(fix), "{report}");
        org_default(&base, sobject, "ReadWrite").await;
    }
    org_default(&base, "Event", "Private").await;
    object_access(&base, "Event", "CRUDM").await;
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    assert!(report.ok(), "Modify All fixes it: {report}");
    for sobject in ["Lead", "Event", "BookMe__Booking__c"] {
        let rows: Vec<Value> = reqwest::get(format!("{base}/__emulator/records/{sobject}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(rows.is_empty(), "the probes wrote no {sobject}");
    }
    emulator.stop().await;
}
