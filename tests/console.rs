//! The Management console in a real browser (Chromium through chromedriver) and over HTTP:
//! the admin's whole path from a read-only field to a booking written with it, escaping of
//! what the org says, the Origin check, and the login off loopback.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::{TestEnv, sample, wait_until};
use fantoccini::Locator;
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

/// The demo org with one more Lead field, `Website`, that the mapping does not use yet.
fn org_with_website() -> OrgSpec {
    let mut org = OrgSpec::demo();
    let lead = org.sobjects.iter_mut().find(|o| o.name == "Lead").unwrap();
    let mut website = lead
        .fields
        .iter()
        .find(|f| f.name == "Title")
        .unwrap()
        .clone();
    website.name = "Website".into();
    website.label = "Website".into();
    website.field_type = "url".into();
    website.length = 255;
    lead.fields.push(website);
    org
}

/// Sets the integration user's access to Lead.Website, as a Salesforce admin would.
async fn grant_website(env: &TestEnv, access: &str) {
    let status = env
        .post_json(
            "/__emulator/org",
            json!({"permission_set": "BookMe_Integration_User", "field": "Lead.Website", "access": access}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_maps_a_field_validates_previews_tests_and_saves_it() {
    let env = TestEnv::start_from_files("console-path", org_with_website(), |_| {}).await;
    let Some(browser) = Browser::start("admin_maps_a_field").await else {
        env.finish().await;
        return;
    };
    // The integration user may only read Lead.Website.
    grant_website(&env, "read").await;
    let base = env.http_url();
    let c = &browser.client;

    c.goto(&format!("{base}/ui")).await.unwrap();
    browser
        .wait_text("main", "Mapping valid against the org")
        .await;
    shot(&browser, "overview").await;

    c.goto(&format!("{base}/ui/tenants/acme/objects/Lead"))
        .await
        .unwrap();
    let table = browser.text("#fields-table").await;
    assert!(table.contains("BookMe__Lead_Key__c"), "{table}");
    shot(&browser, "fields").await;

    c.goto(&format!("{base}/ui/tenants/acme/mapping"))
        .await
        .unwrap();
    browser.wait_text("#status", "Valid against the org").await;
    // The first record is the Lead: add a row for Website.
    let lead = c
        .find(Locator::Css("#records [data-record]:first-child"))
        .await
        .unwrap();
    assert!(lead.text().await.unwrap().contains("lead → Lead"));
    browser
        .click("#records [data-record]:first-child [data-act=row-add]")
        .await;
    let row = "#records [data-record]:first-child tbody tr:last-child";
    browser
        .type_into(&format!("{row} [name=field]"), "Website")
        .await;
    browser
        .type_into(&format!("{row} [name=value]"), "https://initech.example")
        .await;
    let problem = browser
        .wait_text(&format!("{row} [data-problem]"), "read-only")
        .await;
    assert!(
        problem
            .contains("Fix: grant Edit on Lead.Website to the integration user's permission set"),
        "{problem}"
    );
    browser.wait_text("#status", "problem(s) to fix").await;
    shot(&browser, "mapping-problem").await;

    // The Salesforce admin grants it; the next check finds the problem gone.
    grant_website(&env, "edit").await;
    browser
        .type_into(&format!("{row} [name=value]"), "/\u{e003}")
        .await;
    browser.wait_text("#status", "Valid against the org").await;
    assert_eq!(browser.text(&format!("{row} [data-problem]")).await, "");

    browser.click("#preview").await;
    let preview = browser
        .wait_text("#preview-out", "https://initech.example")
        .await;
    assert!(preview.contains("lead_0 — PATCH Lead"), "{preview}");
    // The relations acme's mapping gives the Event, as a first write creates them.
    assert!(
        preview.contains("rel_lead_0 — POST EventRelation"),
        "{preview}"
    );
    assert!(preview.contains("url (255)"), "{preview}");
    assert!(!preview.contains("does not fit"), "{preview}");
    shot(&browser, "mapping-preview").await;

    browser.click("#probe").await;
    browser
        .wait_text("#probe-result", "accepted, then rolled back")
        .await;

    browser.click("#review").await;
    browser
        .wait_text("#diff", "+Website = \"https://initech.example\"")
        .await;
    browser.wait_text("#save-result", "changed line").await;
    browser.click("#save:enabled").await;
    browser.wait_text("#save-result", "Saved").await;
    let file = std::fs::read_to_string(env.config.tenants.dir.join("acme.toml")).unwrap();
    assert!(file.contains("# Tenant \"acme\""), "comments kept");
    assert!(env.config.tenants.dir.join("acme.toml.bak").exists());

    c.goto(&format!("{base}/ui/tenants/acme/checks"))
        .await
        .unwrap();
    browser.wait_text("main", "Every check passed").await;
    shot(&browser, "checks").await;
    browser.close().await;

    // A booking published now is written with the new field.
    env.publish("meeting.booked", &sample("booked")).await;
    let lead = wait_until(
        "the Lead with its Website",
        Duration::from_secs(20),
        || async {
            let leads = env.records("Lead").await;
            leads
                .iter()
                .find(|l| l["Website"] == "https://initech.example")
                .cloned()
                .ok_or_else(|| format!("{leads:?}"))
        },
    )
    .await;
    assert_eq!(lead["LeadSource"], "BookMe");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn markup_in_an_orgs_labels_renders_as_text() {
    let mut org = OrgSpec::demo();
    let lead = org.sobjects.iter_mut().find(|o| o.name == "Lead").unwrap();
    let phone = lead.fields.iter_mut().find(|f| f.name == "Phone").unwrap();
    phone.label = "<img id=injected src=x onerror=\"document.title='owned'\">Phone".into();
    let env = TestEnv::start_from_files("console-markup", org, |_| {}).await;
    let base = env.http_url();
    let html = reqwest::get(format!("{base}/ui/tenants/acme/objects/Lead"))
        .await
        .unwrap();
    let csp = html.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = html.text().await.unwrap();
    assert!(
        html.contains("&lt;img id=injected"),
        "escaped in the HTML: {html}"
    );
    if let Some(browser) = Browser::start("markup_in_labels").await {
        let c = &browser.client;
        c.goto(&format!("{base}/ui/tenants/acme/objects/Lead"))
            .await
            .unwrap();
        let table = browser.text("#fields-table").await;
        assert!(table.contains("<img id=injected"), "shown as text: {table}");
        assert!(
            c.find(Locator::Id("injected")).await.is_err(),
            "no element made of it"
        );
        assert_ne!(c.title().await.unwrap(), "owned");
        // The editor's field picker carries the label too.
        c.goto(&format!("{base}/ui/tenants/acme/mapping"))
            .await
            .unwrap();
        browser.wait_text("#status", "Valid").await;
        assert!(c.find(Locator::Id("injected")).await.is_err());
        browser.close().await;
    }
    env.finish().await;
}

/// "Test against the org" sends the graph a first write sends, the relation creates included:
/// in an org without Shared Activities the first relation is the record refused, with
/// Salesforce's error; with the setting on, every record is accepted and rolled back.
#[tokio::test]
async fn the_probe_tests_the_relations_a_first_write_creates() {
    let mut org = OrgSpec::demo();
    org.set_shared_activities(false);
    let env = TestEnv::start_from_files("console-probe-rel", org, |_| {}).await;
    let probe = || {
        env.admin_post(
            "/admin/tenants/acme/probe",
            json!({"sample": "booked-group"}),
        )
    };
    let (status, refused) = probe().await;
    assert_eq!(status, 200, "{refused}");
    assert_eq!(refused["ok"], false, "{refused}");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(
        detail
            .starts_with("record rel_lead_0 was refused: INVALID_FIELD: No such column 'IsParent'"),
        "{refused}"
    );
    assert!(
        refused["fix"]
            .as_str()
            .is_some_and(|f| f.contains("[relations]") && f.contains("Shared Activities")),
        "{refused}"
    );
    let on = env
        .post_json("/__emulator/org", json!({"shared_activities": true}))
        .await;
    assert_eq!(on, 200);
    let (_, accepted) = probe().await;
    assert_eq!(accepted["ok"], true, "{accepted}");
    assert!(
        accepted["detail"]
            .as_str()
            .is_some_and(|d| d.ends_with("records of the graph were accepted, then rolled back")),
        "{accepted}"
    );
    assert!(env.records("EventRelation").await.is_empty(), "rolled back");
    env.finish().await;
}

#[tokio::test]
async fn a_post_with_a_foreign_origin_is_refused() {
    let env = TestEnv::start_from_files("console-origin", OrgSpec::demo(), |_| {}).await;
    let base = env.http_url();
    let http = reqwest::Client::new();
    let post = |path: &str, origin: Option<String>| {
        let mut request = http.post(format!("{base}{path}")).json(&json!({}));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    for path in [
        "/admin/reload",
        "/admin/tenants/acme/probe",
        "/admin/tenants/acme/recheck",
        "/ui/logout",
    ] {
        let refused = post(path, Some("https://evil.example".into()))
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        assert!(
            refused
                .text()
                .await
                .unwrap()
                .contains("Origin https://evil.example")
        );
    }
    let own = post("/admin/reload", Some(base.clone())).await.unwrap();
    assert_eq!(own.status(), 200);
    // Bodies are limited.
    let big = http
        .post(format!("{base}/admin/tenants/acme/validate"))
        .body(vec![b'#'; 600 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn off_loopback_nothing_opens_without_the_token() {
    let token_file =
        std::env::temp_dir().join(format!("portals-crm-token-{:x}", rand::random::<u32>()));
    std::fs::write(&token_file, "console-s3cret\n").unwrap();
    let file = token_file.clone();
    let env = TestEnv::start_from_files("console-login", OrgSpec::demo(), move |config| {
        config.http.listen = "0.0.0.0:0".into();
        config.http.admin_token_file = Some(file);
    })
    .await;
    let base = env.http_url();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for path in ["/ui", "/ui/tenants/acme/mapping", "/ui/tenants/acme/checks"] {
        let answer = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(answer.status(), 303, "{path}");
        assert_eq!(answer.headers()["location"], "/ui/login");
    }
    for path in ["/admin/tenants", "/admin/tenants/acme/mapping"] {
        assert_eq!(
            http.get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );
    }
    let wrong = http
        .post(format!("{base}/ui/login"))
        .form(&[("token", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = http
        .post(format!("{base}/ui/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", "console-s3cret")])
        .send()
        .await
        .unwrap();
    let cookie = right.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly; SameSite=Strict") && cookie.ends_with("; Secure"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap().to_owned();
    let login = http.get(format!("{base}/ui/login")).send().await.unwrap();
    assert_eq!(login.status(), 200, "{:?}", login.text().await);
    let inside = http
        .get(format!("{base}/ui"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(inside.status(), 200, "{:?}", inside.text().await);

    if let Some(browser) = Browser::start("off_loopback_login").await {
        let c = &browser.client;
        c.goto(&format!("{base}/ui/tenants/acme/mapping"))
            .await
            .unwrap();
        browser.wait_text("h1", "Log in").await;
        shot(&browser, "login").await;
        browser.type_into("#token", "console-s3cret").await;
        browser.click("form.login button").await;
        browser.wait_text("h1", "Tenants").await;
        browser.close().await;
    }
    let _ = std::fs::remove_file(token_file);
    env.finish().await;
}

/// Every request the emulator answered so far, all endpoints.
async fn org_requests(env: &TestEnv) -> u64 {
    let stats = env.get_json("/__emulator/stats").await;
    stats["requests"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_overview_shows_the_last_check_and_a_refused_sign_in_with_its_fix() {
    let env = TestEnv::start_from_files("console-signin", OrgSpec::demo(), |_| {}).await;
    let base = env.http_url();
    let acme_of = |tenants: Value| {
        tenants
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tenant"] == "acme")
            .cloned()
            .unwrap()
    };
    let acme = acme_of(env.admin_get("/admin/tenants").await);
    assert!(
        acme["checked_at"].as_str().unwrap().starts_with("20"),
        "{acme}"
    );
    assert_eq!(acme["sign_in_refused"], Value::Null);
    // Page loads show the last check: they ask no org. Measured once the other tenants' start-up
    // checks, which ask the same org in the background, have finished (on a loaded machine
    // they can still be running when acme's is done).
    let mut before = org_requests(&env).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = org_requests(&env).await;
        if now == before {
            break;
        }
        before = now;
    }
    env.admin_get("/admin/tenants").await;
    env.admin_get("/admin/tenants").await;
    assert_eq!(
        org_requests(&env).await,
        before,
        "no org asked on a page load"
    );
    let (status, rechecked) = env
        .admin_post("/admin/tenants/acme/recheck", json!({}))
        .await;
    assert_eq!(status, 200, "{rechecked}");
    assert_eq!(rechecked["valid"], true, "{rechecked}");
    assert!(
        org_requests(&env).await > before,
        "the re-check asked the org"
    );

    // The integration user is deactivated (and its session ends): the re-check meets the
    // refused sign-in and the overview shows it with Salesforce's words and the fix.
    env.integration_user_active(false).await;
    let Some(browser) = Browser::start("overview_sign_in").await else {
        env.finish().await;
        return;
    };
    let c = &browser.client;
    c.goto(&format!("{base}/ui")).await.unwrap();
    browser
        .wait_text("main", "Mapping valid against the org")
        .await;
    assert!(
        c.find(Locator::Css("[data-sign-in-refused]"))
            .await
            .is_err()
    );
    browser.click("[data-recheck=acme]").await;
    let banner = browser
        .wait_text(
            "section:has([data-recheck=acme]) [data-sign-in-refused]",
            "user is inactive",
        )
        .await;
    assert!(banner.contains("salesforce_auth_inactive_user"), "{banner}");
    assert!(
        banner.contains("Fix: reactivate the integration user (Setup → Users)"),
        "the doctor's fix: {banner}"
    );
    browser.wait_text("main", "refused by Salesforce").await;
    shot(&browser, "overview-sign-in-refused").await;
    let acme = acme_of(env.admin_get("/admin/tenants").await);
    assert_eq!(
        acme["sign_in_refused"]["reason"], "salesforce_auth_inactive_user",
        "{acme}"
    );
    assert_eq!(acme["sign_in_refused"]["description"], "user is inactive");
    assert!(
        env.service()
            .metrics
            .render()
            .contains("portals_crm_salesforce_auth_refused{reason=\"salesforce_auth_inactive_user\",tenant=\"acme\"} 1")
    );
    browser.close().await;
    env.integration_user_active(true).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_preview_renders_a_recent_dead_letters_body_without_consuming_it() {
    let env = TestEnv::start_from_files("console-dlq-preview", OrgSpec::demo(), |_| {}).await;
    // The integration user cannot write Lead.Phone: the booking is dead-lettered.
    env.field_access("Lead.Phone", "none").await;
    env.publish("meeting.booked", &sample("booked")).await;
    wait_until("the dead letter", Duration::from_secs(30), || async {
        match env.list_dead_letters().await.len() {
            1 => Ok(()),
            n => Err(format!("{n} dead letters")),
        }
    })
    .await;
    env.field_access("Lead.Phone", "edit").await;
    let base = env.http_url();
    let preview = |body: Value| env.admin_post("/admin/tenants/acme/preview", body);
    let (status, masked) = preview(json!({"dead_letter": "evt_01JD6Q7M1V3S6"})).await;
    assert_eq!(status, 200, "{masked}");
    assert!(
        masked["source"]
            .as_str()
            .unwrap()
            .contains("dead letter evt_01JD6Q7M1V3S6"),
        "{masked}"
    );
    let text = masked.to_string();
    assert!(text.contains("j***@globex.example"), "{text}");
    assert!(!text.contains("jane.doe@"), "masked: {text}");
    assert!(!text.contains("555 01234"), "masked: {text}");
    let (_, revealed) = preview(json!({"dead_letter": "evt_01JD6Q7M1V3S6", "reveal": true})).await;
    assert!(revealed.to_string().contains("jane.doe@globex.example"));
    let (status, missing) = preview(json!({"dead_letter": "evt_nope"})).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(
        env.list_dead_letters().await.len(),
        1,
        "looking consumed nothing"
    );

    let Some(browser) = Browser::start("preview_dead_letter").await else {
        env.finish().await;
        return;
    };
    let c = &browser.client;
    c.goto(&format!("{base}/ui/tenants/acme/mapping"))
        .await
        .unwrap();
    browser.wait_text("#status", "Valid against the org").await;
    let choice = c.find(Locator::Css("#dead-letter")).await.unwrap();
    assert!(
        choice
            .text()
            .await
            .unwrap()
            .contains("evt_01JD6Q7M1V3S6 — salesforce_invalid_field, booking bk_7Q2M9"),
    );
    choice.select_by_value("evt_01JD6Q7M1V3S6").await.unwrap();
    browser.click("#preview").await;
    let out = browser
        .wait_text(
            "#preview-out",
            "Event: the body of dead letter evt_01JD6Q7M1V3S6",
        )
        .await;
    assert!(out.contains("lead_0 — PATCH Lead"), "{out}");
    assert!(out.contains("\"[phone]\""), "{out}");
    assert!(out.contains("j***@globex.example"), "{out}");
    assert!(!out.contains("does not fit"), "{out}");
    shot(&browser, "mapping-preview-dead-letter").await;
    browser.close().await;
    assert_eq!(env.list_dead_letters().await.len(), 1, "still there");
    env.finish().await;
}
