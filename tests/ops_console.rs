//! The Operations console's dead letters in a real browser (Chromium through chromedriver) and
//! over HTTP: a booking dead-lettered for a field the integration user cannot write, grouped with
//! its fix; replay blocked until the Salesforce admin grants it, then replayed into the org and
//! gone from the queue; a superseded dead letter marked and replayed as a no-op; markup in a body
//! shown as text; purge only with its typed confirmation; off loopback, nothing without the token.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::{TestEnv, sample, wait_until};
use fantoccini::Locator;
use portals_crm::dlq::DeadLetter;
use portals_crm::emulator::OrgSpec;
use serde_json::{Value, json};

/// Saves a screenshot for the README when `PORTALS_CRM_SCREENSHOTS` is set.
async fn shot(browser: &Browser, name: &str) {
    if std::env::var_os("PORTALS_CRM_SCREENSHOTS").is_some() {
        browser
            .screenshot(&format!("tests/screenshots/{name}.png"))
            .await;
    }
}

async fn phone_access(env: &TestEnv, access: &str) {
    env.field_access("Lead.Phone", access).await;
}

async fn dead_letters(env: &TestEnv) -> Vec<DeadLetter> {
    env.list_dead_letters().await
}

/// GET `url`, answered as JSON.
async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// POST `body` as JSON to `url`: the status and the JSON answer.
async fn post(http: &reqwest::Client, url: String, body: Value) -> (u16, Value) {
    let answer = http.post(url).json(&body).send().await.unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap())
}

async fn wait_dead_letters(env: &TestEnv, n: usize) -> Vec<DeadLetter> {
    wait_until("dead letters", Duration::from_secs(30), || async {
        let letters = dead_letters(env).await;
        if letters.len() == n {
            Ok(letters)
        } else {
            Err(format!("{letters:#?}"))
        }
    })
    .await
}

async fn booking_version(env: &TestEnv) -> serde_json::Value {
    let bookings = env.records("BookMe__Booking__c").await;
    assert_eq!(bookings.len(), 1, "{bookings:?}");
    bookings[0]["BookMe__Version__c"].clone()
}

/// Version 2 of the sample booking is dead-lettered (Lead.Phone not writable); version 3 is
/// written after the grant.
async fn supersede_v2_with_v3(env: &TestEnv) {
    phone_access(env, "none").await;
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    wait_dead_letters(env, 1).await;
    phone_access(env, "edit").await;
    env.publish("meeting.cancelled", &sample("cancelled")).await;
    wait_until("version 3 in the org", Duration::from_secs(20), || async {
        let bookings = env.records("BookMe__Booking__c").await;
        match bookings.first() {
            Some(b) if b["BookMe__Version__c"] == 3 => Ok(()),
            _ => Err(format!("{bookings:?}")),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ops_find_why_fix_it_and_replay_exactly_what_now_succeeds() {
    let env = TestEnv::start_from_files("ops-dlq", OrgSpec::demo(), |_| {}).await;
    let Some(browser) = Browser::start("ops_dead_letters").await else {
        env.finish().await;
        return;
    };
    let base = env.http_url();
    let c = &browser.client;

    // The integration user cannot write Lead.Phone: the booking is dead-lettered.
    phone_access(&env, "none").await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.publish("meeting.booked", b"<b id=injected>not an event</b>")
        .await;
    wait_dead_letters(&env, 2).await;

    c.goto(&format!("{base}/ui/dead-letters")).await.unwrap();
    let group = browser
        .wait_text("#groups tbody tr:first-child", "Lead.Phone")
        .await;
    assert!(group.contains("salesforce_invalid_field"), "{group}");
    assert!(group.contains("Still there"), "{group}");
    assert!(
        group.contains("Fix: grant Edit on Lead.Phone"),
        "the fix text of mapping validate: {group}"
    );
    // A cause the org cannot tell about says so, rather than passing for fixed.
    let groups = browser.wait_text("#groups", "Cannot be re-checked").await;
    assert!(groups.contains("the event itself is invalid"), "{groups}");
    shot(&browser, "dead-letters").await;
    // Looking consumed nothing.
    assert_eq!(dead_letters(&env).await.len(), 2);

    // Replay is blocked while the permission is missing.
    browser
        .click("#groups tbody tr:first-child [data-replay]")
        .await;
    let blocked = browser
        .wait_text("#dlq-result", "Blocked evt_01JD6Q7M1V3S6")
        .await;
    assert!(
        blocked.contains("Fix: grant Edit on Lead.Phone"),
        "{blocked}"
    );
    assert_eq!(
        dead_letters(&env).await.len(),
        2,
        "a blocked replay keeps it"
    );
    assert!(env.records("Lead").await.is_empty());

    // One in full: headers, the Salesforce error, the body pretty and masked.
    c.goto(&format!("{base}/ui/dead-letters/evt_01JD6Q7M1V3S6"))
        .await
        .unwrap();
    let error = browser.wait_text("#sf-error", "INVALID_FIELD").await;
    assert!(error.contains("No such column 'Phone'"), "{error}");
    let body = browser.text("#body").await;
    assert!(body.contains("j***@globex.example"), "{body}");
    assert!(!body.contains("jane.doe@"), "{body}");
    assert!(body.contains("[phone]"), "{body}");
    let headers = browser.text("#headers").await;
    assert!(
        headers.contains("x-portals-booking-id bk_7Q2M9"),
        "{headers}"
    );
    shot(&browser, "dead-letter").await;
    browser.click("#reveal").await;
    browser.wait_text("#body", "jane.doe@globex.example").await;

    // The Salesforce admin grants it; the page says the cause is gone; replay goes.
    phone_access(&env, "edit").await;
    c.goto(&format!(
        "{base}/ui/dead-letters?reason=salesforce_invalid_field"
    ))
    .await
    .unwrap();
    browser
        .wait_text("#groups tbody tr:first-child", "Fixed")
        .await;
    browser
        .click("#groups tbody tr:first-child [data-replay]")
        .await;
    browser
        .wait_text("#dlq-result", "Replayed 1 (confirmed by the broker")
        .await;
    let lead = wait_until("the Lead in the org", Duration::from_secs(20), || async {
        let leads = env.records("Lead").await;
        leads
            .iter()
            .find(|l| l["Email"] == "jane.doe@globex.example")
            .cloned()
            .ok_or_else(|| format!("{leads:?}"))
    })
    .await;
    assert_eq!(lead["Phone"], "+47 555 01234");
    let left = dead_letters(&env).await;
    assert_eq!(left.len(), 1, "{left:#?}");
    assert_eq!(left[0].reason, "invalid_event");

    // Markup in a body shows as text; purge needs its confirmation.
    c.goto(&format!("{base}/ui/dead-letters/{}", left[0].id))
        .await
        .unwrap();
    browser
        .wait_text("#body", "<b id=injected>not an event</b>")
        .await;
    assert!(c.find(Locator::Id("injected")).await.is_err());
    c.goto(&format!("{base}/ui/dead-letters")).await.unwrap();
    browser.click("#letters input[name=pick]").await;
    browser.click("#purge-selected").await;
    browser
        .wait_text("#dlq-result", "Not purged: confirm: type \"purge 1\"")
        .await;
    assert_eq!(dead_letters(&env).await.len(), 1);
    browser.type_into("#purge-confirm", "purge 1").await;
    browser.click("#purge-selected").await;
    browser.wait_text("#dlq-result", "Purged 1").await;
    assert!(dead_letters(&env).await.is_empty());

    // A dead letter superseded by a newer version.
    supersede_v2_with_v3(&env).await;
    let records_before = (
        env.records("Lead").await,
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
    );
    c.goto(&format!("{base}/ui/dead-letters")).await.unwrap();
    browser
        .wait_text("#groups tbody tr:first-child", "1 superseded")
        .await;
    c.goto(&format!("{base}/ui/dead-letters/evt_01JD6RB2K8Q0T"))
        .await
        .unwrap();
    browser
        .wait_text(
            "main",
            "superseded by v3 (the org holds it): replay changes nothing",
        )
        .await;
    shot(&browser, "dead-letter-superseded").await;
    browser.click("[data-replay]").await;
    browser
        .wait_text("#dlq-result", "Already superseded by a newer version")
        .await;
    wait_until("the replay settled", Duration::from_secs(20), || async {
        let outcomes = env.outcomes();
        match outcomes.get("superseded") {
            Some(1) => Ok(()),
            _ => Err(format!("{outcomes:?}")),
        }
    })
    .await;
    assert!(dead_letters(&env).await.is_empty());
    assert_eq!(booking_version(&env).await, 3);
    let records_after = (
        env.records("Lead").await,
        env.records("Event").await,
        env.records("BookMe__Booking__c").await,
    );
    assert_eq!(records_before, records_after, "the replay changed nothing");

    browser.close().await;
    env.finish().await;
}

/// The body of a GET, as text.
async fn text(http: &reqwest::Client, url: String) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn the_json_twins_list_show_and_refuse_a_purge_without_confirmation() {
    let env = TestEnv::start_from_files("ops-api", OrgSpec::demo(), |_| {}).await;
    phone_access(&env, "none").await;
    env.publish("meeting.booked", &sample("booked")).await;
    wait_dead_letters(&env, 1).await;
    let base = env.http_url();
    let http = reqwest::Client::new();

    let listing = get(
        &http,
        format!("{base}/admin/dead-letters?tenant=acme&q=bk_7Q2M9"),
    )
    .await;
    assert_eq!(listing["groups"][0]["field"], "Lead.Phone", "{listing}");
    assert_eq!(listing["groups"][0]["cause"]["state"], "still_there");
    assert_eq!(listing["letters"][0]["version"], 1);
    assert!(
        listing["cli"]
            .as_str()
            .unwrap()
            .starts_with("portals-crm dlq list --tenant acme --json")
    );
    let none = get(&http, format!("{base}/admin/dead-letters?q=bk_other")).await;
    assert_eq!(none["letters"], json!([]));
    // A reason that is no reason code matches nothing: named, with the codes it resembles,
    // as `dlq --reason` does; the page says it above the filters.
    let typo = http
        .get(format!(
            "{base}/admin/dead-letters?reason=salesforce_invalid_feild"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);
    let said = typo.text().await.unwrap();
    assert!(
        said.contains("reason: not a reason code (did you mean salesforce_invalid_field?)"),
        "{said}"
    );
    let page = text(
        &http,
        format!("{base}/ui/dead-letters?reason=salesforce_invalid_feild"),
    )
    .await;
    assert!(
        page.contains("Nothing can match this filter:")
            && page.contains("did you mean salesforce_invalid_field?")
            && !page.contains("id=\"no-dead-letters\""),
        "{page}"
    );

    let shown = get(
        &http,
        format!("{base}/admin/dead-letters/evt_01JD6Q7M1V3S6"),
    )
    .await;
    assert!(
        shown["body"]
            .as_str()
            .unwrap()
            .contains("j***@globex.example")
    );
    assert_eq!(shown["headers"]["x-portals-sf-error-code"], "INVALID_FIELD");
    assert_eq!(shown["with_id"], 1, "{shown}");

    let export = text(
        &http,
        format!("{base}/admin/dead-letters/export?ids=evt_01JD6Q7M1V3S6"),
    )
    .await;
    assert_eq!(export.lines().count(), 1);
    let line: Value = serde_json::from_str(export.lines().next().unwrap()).unwrap();
    assert_eq!(line["booking_id"], "bk_7Q2M9");

    let (status, refused) = post(
        &http,
        format!("{base}/admin/dead-letters/purge"),
        json!({"ids": ["evt_01JD6Q7M1V3S6"], "confirm": "yes"}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    // An id gone meanwhile (replayed or purged by someone else) is named, not passed over.
    let (status, gone) = post(
        &http,
        format!("{base}/admin/dead-letters/purge"),
        json!({"ids": ["evt_gone_meanwhile"], "confirm": "purge 1"}),
    )
    .await;
    assert_eq!(status, 200, "{gone}");
    assert_eq!(
        gone,
        json!({"purged": [], "missing": ["evt_gone_meanwhile"]})
    );
    let (_, blocked) = post(
        &http,
        format!("{base}/admin/dead-letters/replay"),
        json!({"ids": ["evt_01JD6Q7M1V3S6"]}),
    )
    .await;
    assert_eq!(blocked["replayed"], json!([]), "{blocked}");
    assert_eq!(blocked["blocked"][0]["id"], "evt_01JD6Q7M1V3S6");
    assert_eq!(
        dead_letters(&env).await.len(),
        1,
        "looking and refusals kept it"
    );

    // The override replays despite the cause: it fails again and is dead-lettered again.
    let (_, forced) = post(
        &http,
        format!("{base}/admin/dead-letters/replay"),
        json!({"ids": ["evt_01JD6Q7M1V3S6"], "override": true}),
    )
    .await;
    assert_eq!(forced["replayed"], json!(["evt_01JD6Q7M1V3S6"]), "{forced}");
    env.wait_settled(2).await;
    wait_dead_letters(&env, 1).await;
    env.finish().await;
}

#[tokio::test]
async fn off_loopback_the_dead_letters_need_the_token() {
    let (env, token_file) = TestEnv::start_off_loopback("ops-login", "ops-s3cret").await;
    let base = env.http_url();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/ui/dead-letters", "/ui/dead-letters/evt_01JD6Q7M1V3S6"] {
        let answer = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
        assert_eq!(answer.headers()["location"], "/ui/login");
    }
    for path in [
        "/admin/dead-letters",
        "/admin/dead-letters/export",
        "/admin/dead-letters/evt_01JD6Q7M1V3S6",
    ] {
        let answer = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 401, "{path}");
    }
    for path in ["/admin/dead-letters/replay", "/admin/dead-letters/purge"] {
        let answer = http
            .post(format!("{base}{path}"))
            .header("origin", &base)
            .json(&json!({"ids": ["x"], "confirm": "purge 1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 401, "{path}");
    }
    let _ = std::fs::remove_file(token_file);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_health_refreshes_live_with_rates_lag_circuit_and_queues() {
    let env = TestEnv::start_from_files("ops-health", OrgSpec::demo(), |_| {}).await;
    let base = env.http_url();
    let http = reqwest::Client::new();
    // The worker attaches to the work queue shortly after the start.
    let health = wait_until("the worker consuming", Duration::from_secs(30), || async {
        let health = get(&http, format!("{base}/admin/health")).await;
        if health["queues"][0]["consumers"].as_u64() >= Some(1) {
            Ok(health)
        } else {
            Err(health.to_string())
        }
    })
    .await;
    let acme = health["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tenant"] == "acme")
        .cloned()
        .unwrap();
    assert_eq!(acme["circuit"], "closed", "{acme}");
    assert_eq!(acme["last_write_seen"], Value::Null);
    let queues = health["queues"].as_array().unwrap();
    assert_eq!(queues[0]["role"], "work");
    assert_eq!(queues[0]["queue"], env.topology.work_queue.as_str());
    let tenant_queues: Vec<&Value> = queues
        .iter()
        .filter(|q| q["role"].as_str().is_some_and(|r| r.starts_with("tenant ")))
        .collect();
    let acme_queue = env.topology.tenant_queue("acme").unwrap();
    assert!(
        tenant_queues
            .iter()
            .any(|q| q["queue"] == acme_queue.as_str()),
        "acme's own queue is listed: {queues:?}"
    );
    assert_eq!(
        queues.len(),
        env.topology.tiers.len() + 2 + tenant_queues.len(),
        "work, each tenant's queue, each retry tier, dead letters"
    );
    assert_eq!(queues.last().unwrap()["messages"], 0);

    let Some(browser) = Browser::start("ops_health").await else {
        env.finish().await;
        return;
    };
    let c = &browser.client;
    c.goto(&format!("{base}/ui/health")).await.unwrap();
    let row = "#tenant-health tr[data-tenant=acme]";
    browser
        .wait_text(
            &format!("{row} [data-k=last_write_seen]"),
            "none since start",
        )
        .await;
    // Without reloading the page: a booking is written, another dead-lettered.
    env.publish("meeting.booked", &sample("booked")).await;
    env.publish("meeting.booked", b"not an event").await;
    env.wait_settled(2).await;
    let written = wait_until("a live write rate", Duration::from_secs(30), || async {
        let text = browser
            .text(&format!("{row} [data-k=written_per_min]"))
            .await;
        match text.parse::<f64>() {
            Ok(rate) if rate > 0.0 => Ok(rate),
            _ => Err(text),
        }
    })
    .await;
    assert!(written > 0.0);
    let seen = browser
        .text(&format!("{row} [data-k=last_write_seen]"))
        .await;
    assert!(seen.starts_with("20"), "a timestamp: {seen}");
    // The sample event's time is days old: past the last bucket, the lag is shown as a floor.
    let lag = browser.text(&format!("{row} [data-k=lag_p99_secs]")).await;
    assert_eq!(lag, "≥ 300 s");
    let dead_row = format!(
        "#queues tr[data-queue=\"{}\"] [data-k=messages]",
        env.topology.dead_queue
    );
    browser.wait_text(&dead_row, "1").await;
    shot(&browser, "health").await;
    browser.close().await;
    env.finish().await;
}

/// Publishes `body` straight into the dead-letter queue with `x-portals-*` headers, as the
/// worker would have dead-lettered it.
async fn plant_dead_letter(env: &TestEnv, headers: &[(&str, &str)], body: &[u8]) {
    let mut table = lapin::types::FieldTable::default();
    for (name, value) in headers {
        table.insert(
            (*name).into(),
            lapin::types::AMQPValue::LongString((*value).into()),
        );
    }
    let properties = lapin::BasicProperties::default()
        .with_content_type("application/cloudevents+json".into())
        .with_headers(table);
    env.publisher
        .publish("", &env.topology.dead_queue, body, properties)
        .await
        .expect("planted dead letter confirmed and routed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_superseded_when_the_org_holds_a_newer_version_the_ledger_never_saw() {
    let mut env = TestEnv::start_from_files("ops-org-version", OrgSpec::demo(), |_| {}).await;
    supersede_v2_with_v3(&env).await;
    // A fresh worker: its ledger never saw version 3; only the org knows.
    env.restart_service_without_cache().await;
    let listing = env.admin_get("/admin/dead-letters").await;
    let letter = &listing["letters"][0];
    assert_eq!(letter["id"], "evt_01JD6RB2K8Q0T", "{listing}");
    assert_eq!(letter["version"], 2, "{listing}");
    assert_eq!(letter["superseded_by"], 3, "{listing}");
    assert_eq!(letter["superseded_in"], "org", "{listing}");
    assert_eq!(listing["groups"][0]["superseded"], 1, "{listing}");
    assert_eq!(listing["groups"][0]["versions_unasked"], Value::Null);

    if let Some(browser) = Browser::start("ops_org_version").await {
        let base = env.http_url();
        browser
            .client
            .goto(&format!("{base}/ui/dead-letters"))
            .await
            .unwrap();
        let row = browser
            .wait_text("#letters tbody", "superseded by v3 (in the org)")
            .await;
        assert!(row.contains("replay changes nothing"), "{row}");
        browser
            .wait_text("#groups tbody tr:first-child", "1 superseded")
            .await;
        shot(&browser, "dead-letters-superseded-in-org").await;
        browser.close().await;
    }

    let (_, replayed) = env
        .admin_post(
            "/admin/dead-letters/replay",
            json!({"ids": ["evt_01JD6RB2K8Q0T"]}),
        )
        .await;
    assert_eq!(
        replayed["superseded"],
        json!(["evt_01JD6RB2K8Q0T"]),
        "{replayed}"
    );
    env.wait_settled(1).await;
    assert_eq!(
        booking_version(&env).await,
        3,
        "the org's version guard kept version 3"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_sharing_cause_is_rechecked_against_the_org_before_a_replay() {
    let env = TestEnv::start("ops-sharing").await;
    let org_change = |change: Value| env.post_json("/__emulator/org", change);
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    // Private: the reschedule's Event upsert cannot see the host's Event.
    let private = json!({"sobject": "Event", "sharing_model": "Private"});
    assert_eq!(org_change(private).await, 200);
    env.publish("meeting.rescheduled", &sample("rescheduled"))
        .await;
    env.wait_settled(2).await;
    wait_dead_letters(&env, 1).await;
    let listing = env.admin_get("/admin/dead-letters").await;
    let group = &listing["groups"][0];
    assert_eq!(
        group["reason"], "salesforce_sharing_record_not_visible",
        "{listing}"
    );
    assert_eq!(group["cause"]["state"], "still_there", "{listing}");
    let fix = group["cause"]["problems"][0]["fix"].as_str().unwrap();
    assert!(fix.contains("\"Modify All\" on Event"), "{fix}");
    let (_, blocked) = env
        .admin_post("/admin/dead-letters/replay", json!({"ids": group["ids"]}))
        .await;
    assert_eq!(blocked["replayed"], json!([]), "{blocked}");
    assert_eq!(blocked["blocked"].as_array().unwrap().len(), 1, "{blocked}");

    // The Salesforce admin shares the records: the query now returns the Event.
    let modify_all =
        json!({"permission_set": "BookMe_Integration_User", "object": "Event", "access": "CRUDM"});
    assert_eq!(org_change(modify_all).await, 200);
    let listing = env.admin_get("/admin/dead-letters").await;
    assert_eq!(listing["groups"][0]["cause"]["state"], "gone", "{listing}");
    let ids = json!({"ids": listing["groups"][0]["ids"]});
    let (_, replayed) = env.admin_post("/admin/dead-letters/replay", ids).await;
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        1,
        "{replayed}"
    );
    env.wait_settled(3).await;
    assert_eq!(
        env.outcomes().get("written"),
        Some(&2),
        "{:?}",
        env.outcomes()
    );
    assert!(dead_letters(&env).await.is_empty());
    env.finish().await;
}

#[tokio::test]
async fn a_refused_sign_in_is_tried_again_before_a_replay_and_unknown_causes_say_so() {
    let env = TestEnv::start_from_files("ops-signin", OrgSpec::demo(), |_| {}).await;
    plant_dead_letter(
        &env,
        &[
            ("x-portals-reason", "salesforce_auth_inactive_user"),
            (
                "x-portals-message",
                "Salesforce refuses the sign-in: user is inactive",
            ),
            ("x-portals-tenant", "acme"),
            ("x-portals-event-id", "evt_signin"),
        ],
        &sample("booked"),
    )
    .await;
    plant_dead_letter(
        &env,
        &[
            (
                "x-portals-reason",
                "salesforce_field_custom_validation_exception",
            ),
            (
                "x-portals-message",
                "event: Subject must not say <b>urgent</b>",
            ),
            ("x-portals-tenant", "acme"),
            ("x-portals-event-id", "evt_validation"),
        ],
        &sample("booked"),
    )
    .await;
    wait_dead_letters(&env, 2).await;
    let group_of = |listing: &Value, reason: &str| {
        listing["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["reason"] == reason)
            .cloned()
            .unwrap_or_else(|| panic!("no group {reason}: {listing}"))
    };

    // The sign-in works: the cause is gone.
    let listing = env.admin_get("/admin/dead-letters").await;
    let signin = group_of(&listing, "salesforce_auth_inactive_user");
    assert_eq!(signin["cause"]["state"], "gone", "{signin}");
    let validation = group_of(&listing, "salesforce_field_custom_validation_exception");
    assert_eq!(validation["cause"]["state"], "cannot_check", "{validation}");

    // The user is deactivated and its token expired: tried now, refused, with the fix.
    env.integration_user_active(false).await;
    let listing = env.admin_get("/admin/dead-letters").await;
    let signin = group_of(&listing, "salesforce_auth_inactive_user");
    assert_eq!(signin["cause"]["state"], "still_there", "{signin}");
    let problem = &signin["cause"]["problems"][0];
    assert!(
        problem["problem"]
            .as_str()
            .unwrap()
            .contains("user is inactive"),
        "{problem}"
    );
    assert_eq!(
        problem["fix"],
        "reactivate the integration user (Setup → Users)"
    );
    let (_, blocked) = env
        .admin_post("/admin/dead-letters/replay", json!({"ids": ["evt_signin"]}))
        .await;
    assert_eq!(blocked["blocked"][0]["id"], "evt_signin", "{blocked}");

    // In the browser: the cause that cannot be checked says so, its markup inert.
    if let Some(browser) = Browser::start("ops_cannot_check").await {
        let base = env.http_url();
        browser
            .client
            .goto(&format!("{base}/ui/dead-letters"))
            .await
            .unwrap();
        let groups = browser.wait_text("#groups", "Cannot be re-checked").await;
        assert!(groups.contains("Still there"), "{groups}");
        assert!(
            groups.contains("reactivate the integration user"),
            "{groups}"
        );
        let letters = browser.wait_text("#letters", "<b>urgent</b>").await;
        assert!(letters.contains("evt_validation"), "{letters}");
        assert!(
            browser
                .client
                .find(Locator::Css("#letters b"))
                .await
                .is_err()
        );
        browser.close().await;
    }
    assert_eq!(
        dead_letters(&env).await.len(),
        2,
        "looking consumed nothing"
    );
    env.integration_user_active(true).await;
    env.finish().await;
}

/// The same event dead-lettered twice: the detail says how many dead letters share its id,
/// and its page says that a replay acts on all of them and links to their list. A CloudEvents
/// id may be any string: the detail and the replay compare it whole, never as the list
/// filter's comma-separated `ids` (which would also take the letter `v2` here), and the page's
/// "Script this" command, copied into a shell, shows exactly these two.
#[tokio::test]
async fn a_detail_says_how_many_dead_letters_share_its_id() {
    const ID: &str = "evt twice,$(echo v2)";
    const IN_PATH: &str = "evt%20twice%2C%24%28echo%20v2%29";
    let env = TestEnv::start("ops-same-id").await;
    let planted = |id: &'static str| {
        let headers = [
            ("x-portals-reason", "invalid_event"),
            ("x-portals-message", "data.version: missing field"),
            ("x-portals-tenant", "acme"),
            ("x-portals-event-id", id),
        ];
        let body = json!({ "id": id }).to_string();
        let env = &env;
        async move { plant_dead_letter(env, &headers, body.as_bytes()).await }
    };
    planted(ID).await;
    planted(ID).await;
    planted("v2").await;
    wait_dead_letters(&env, 3).await;
    let shown = env
        .admin_get(&format!("/admin/dead-letters/{IN_PATH}"))
        .await;
    assert_eq!(shown["with_id"], 2, "{shown}");
    assert_eq!(shown["summary"]["id"], ID, "{shown}");

    let http = reqwest::Client::new();
    let page = text(
        &http,
        format!("{}/ui/dead-letters/{IN_PATH}", env.http_url()),
    )
    .await;
    assert!(
        page.contains("2 dead letters have this id")
            && page.contains("A replay of this id replays all 2"),
        "{page}"
    );
    // The banner's link lists the two (its JSON twin, with the same query string).
    let link = page
        .split("href=\"/ui/dead-letters?")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("{page}"))
        .replace("&amp;", "&");
    let listed = get(
        &http,
        format!("{}/admin/dead-letters?{link}", env.http_url()),
    )
    .await;
    assert_eq!(
        listed["letters"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    // The export of a selection sends one `id=` each (the console's script does): whole.
    let export = text(
        &http,
        format!("{}/admin/dead-letters/export?id={IN_PATH}", env.http_url()),
    )
    .await;
    assert_eq!(export.lines().count(), 2, "{export}");
    assert!(!export.contains("\"id\":\"v2\""), "{export}");
    // "Script this", pasted into a shell: the id is one argument, nothing of it runs.
    let unescaped = page
        .replace("&#x27;", "'")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    let command = unescaped
        .lines()
        .find_map(|line| line.strip_prefix("<pre>portals-crm dlq show "))
        .unwrap_or_else(|| panic!("{page}"));
    let output = std::process::Command::new("sh")
        .args(["-c", &format!("\"$PORTALS_CRM\" dlq show {command}")])
        .env("PORTALS_CRM", env!("CARGO_BIN_EXE_portals-crm"))
        .envs(env.binary_env())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{command}: {said}");
    let letters: Vec<Value> = serde_json::Deserializer::from_slice(&output.stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(letters.len(), 2, "{command}: {said}");
    assert!(letters.iter().all(|l| l["id"] == ID), "{letters:#?}");

    let (status, replayed) = env
        .admin_post("/admin/dead-letters/replay", json!({"ids": [ID]}))
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(
        replayed["replayed"],
        json!([ID, ID]),
        "both, and not v2: {replayed}"
    );
    // Replayed, the two bodies are no events and come back; `v2` never left.
    env.wait_settled(2).await;
    wait_dead_letters(&env, 3).await;

    // Two letters of one id whose causes differ: the one still there (Lead.Phone not
    // editable) holds back a replay of the id, the other included, and the detail shows it.
    phone_access(&env, "none").await;
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(3).await;
    wait_dead_letters(&env, 4).await;
    let headers = [
        ("x-portals-reason", "invalid_event"),
        ("x-portals-message", "data.version: missing field"),
        ("x-portals-tenant", "acme"),
        ("x-portals-event-id", "evt_01JD6Q7M1V3S6"),
    ];
    plant_dead_letter(&env, &headers, b"{}").await;
    wait_dead_letters(&env, 5).await;
    let shown = env.admin_get("/admin/dead-letters/evt_01JD6Q7M1V3S6").await;
    assert_eq!(shown["with_id"], 2, "{shown}");
    assert_eq!(shown["cause"]["state"], "still_there", "{shown}");
    assert_eq!(shown["with_id_groups"].as_array().map(Vec::len), Some(2));
    let (status, replayed) = env
        .admin_post(
            "/admin/dead-letters/replay",
            json!({"ids": ["evt_01JD6Q7M1V3S6"]}),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], json!([]), "{replayed}");
    assert_eq!(
        replayed["blocked"][0]["id"], "evt_01JD6Q7M1V3S6",
        "{replayed}"
    );
    assert_eq!(dead_letters(&env).await.len(), 5, "nothing left the queue");

    // On the list the two go together: ticking one ticks the other.
    if let Some(browser) = Browser::start("ops_same_id").await {
        browser
            .client
            .goto(&format!(
                "{}/ui/dead-letters?id=evt_01JD6Q7M1V3S6",
                env.http_url()
            ))
            .await
            .unwrap();
        browser
            .wait_text(
                "#chosen-ids",
                "Only the dead letters with id evt_01JD6Q7M1V3S6",
            )
            .await;
        browser.click("input[name=pick]").await;
        let ticked = browser
            .client
            .execute(
                "return Array.from(document.querySelectorAll('input[name=pick]')).map(b => b.checked)",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(ticked, json!([true, true]));
        browser.close().await;
    }
    // A purge of the id counts its letters: "purge 1" for one id that selects two is refused.
    let (status, refused) = env
        .admin_post(
            "/admin/dead-letters/purge",
            json!({"ids": ["evt_01JD6Q7M1V3S6"], "confirm": "purge 1"}),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"].as_str().is_some_and(
            |e| e.starts_with("confirm: type \"purge 2\" to purge; these ids select 2")
        ),
        "{refused}"
    );
    let (status, purged) = env
        .admin_post(
            "/admin/dead-letters/purge",
            json!({"ids": ["evt_01JD6Q7M1V3S6"], "confirm": "purge 2"}),
        )
        .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(
        purged["purged"],
        json!(["evt_01JD6Q7M1V3S6", "evt_01JD6Q7M1V3S6"])
    );
    assert_eq!(dead_letters(&env).await.len(), 3);
    env.finish().await;
}
