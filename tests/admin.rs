//! Hot reload and the admin API: an invalid change is rejected and the running mapping stays; a
//! valid one is swapped in; the admin API serves tenants, fields and validation, and needs a
//! token off loopback.

mod common;

use std::time::Duration;

use common::{TestEnv, sample, wait_until};
use serde_json::{Value, json};

fn rewrite(dir: &std::path::Path, from: &str, to: &str) {
    let path = dir.join("acme.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(from), "{from} in acme.toml");
    std::fs::write(&path, text.replace(from, to)).unwrap();
}

#[tokio::test]
async fn tenant_changes_are_validated_and_swapped_atomically() {
    let mut env = TestEnv::start("reload").await;
    let dir = env.write_tenant_files();
    env.stop_service().await;
    env.config.tenants.dir = dir.clone();
    env.config.tenants.watch_secs = 1;
    env.run_service(
        portals_crm::service::Service::start(&env.config, env.tenants.clone())
            .await
            .unwrap(),
    );
    let base = format!("http://{}", env.service().http_addr);
    let http = reqwest::Client::new();

    let tenants: Value = http
        .get(format!("{base}/admin/tenants"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tenants.as_array().unwrap().len(), 2);
    let fields: Value = http
        .get(format!("{base}/admin/tenants/acme/sobjects/Lead/fields"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        fields
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "Phone" && f["updateable"] == true)
    );

    let proposed = std::fs::read_to_string(dir.join("acme.toml"))
        .unwrap()
        .replace("LeadSource = \"BookMe\"", "Bogus__c = \"x\"");
    let verdict: Value = http
        .post(format!("{base}/admin/tenants/acme/validate"))
        .body(proposed)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(verdict["valid"], false);
    let problem = &verdict["problems"][0];
    assert_eq!(
        (&problem["record"], &problem["field"], &problem["target"]),
        (&json!("lead"), &json!("Bogus__c"), &json!("Lead.Bogus__c")),
        "{verdict}"
    );
    assert!(
        problem["fix"]
            .as_str()
            .unwrap()
            .contains("grant Edit on Lead.Bogus__c")
    );

    let reload = || async {
        let answer = http
            .post(format!("{base}/admin/reload"))
            .send()
            .await
            .unwrap();
        (answer.status(), answer.text().await.unwrap())
    };

    // An API version the org does not offer: the org answered, so the change is rejected.
    rewrite(&dir, "api_version = \"66.0\"", "api_version = \"99.0\"");
    let (status, answer) = reload().await;
    assert_eq!(status, 422);
    assert!(
        answer.contains("tenant acme: the org does not offer REST API version 99.0"),
        "{answer}"
    );
    rewrite(&dir, "api_version = \"99.0\"", "api_version = \"66.0\"");

    // An invalid change on disk: the watcher rejects it, the running mapping keeps writing.
    rewrite(&dir, "LeadSource = \"BookMe\"", "Bogus__c = \"x\"");
    assert_eq!(reload().await.0, 422);
    env.publish("meeting.booked", &sample("booked")).await;
    env.wait_settled(1).await;
    assert_eq!(env.records("Lead").await[0]["LeadSource"], "BookMe");

    // A valid change: picked up by the watcher.
    rewrite(
        &dir,
        "Bogus__c = \"x\"",
        "LeadSource = \"Partner Referral\"",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reloaded: Value = http
        .post(format!("{base}/admin/reload"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        reloaded["reloaded"].as_array().unwrap().len(),
        2,
        "{reloaded}"
    );
    env.publish("meeting.booked", &sample("booked-group")).await;
    env.wait_settled(2).await;
    wait_until(
        "the new mapping in use",
        Duration::from_secs(10),
        || async {
            let leads = env.records("Lead").await;
            let marie = leads
                .iter()
                .find(|l| l["BookMe__Lead_Key__c"] == "acme:marie.curie@initech.example");
            match marie {
                Some(l) if l["LeadSource"] == "Partner Referral" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    env.finish().await;
}

#[tokio::test]
async fn off_loopback_the_admin_api_needs_a_token() {
    let token_file = std::env::temp_dir().join(format!(
        "portals-crm-admin-token-{:x}",
        rand::random::<u32>()
    ));
    std::fs::write(&token_file, "s3cret-admin-token\n").unwrap();
    let env = TestEnv::start_with("admintoken", |c| {
        c.http.listen = "0.0.0.0:0".into();
        c.http.admin_token_file = Some(token_file.clone());
    })
    .await;
    let base = format!("http://127.0.0.1:{}", env.service().http_addr.port());
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/admin/tenants"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let wrong = http
        .get(format!("{base}/admin/tenants"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = http
        .get(format!("{base}/admin/tenants"))
        .bearer_auth("s3cret-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        http.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "metrics stay open"
    );
    env.finish().await;

    let env = TestEnv::start_with("admintokenless", |c| c.http.listen = "0.0.0.0:0".into()).await;
    let base = format!("http://127.0.0.1:{}", env.service().http_addr.port());
    assert_eq!(
        http.get(format!("{base}/admin/tenants"))
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    env.finish().await;
    let _ = std::fs::remove_file(token_file);
}

#[tokio::test]
async fn describes_are_revalidated_on_a_schedule() {
    let env = TestEnv::start_with("refresh", |c| c.cache.describe_refresh_secs = 1).await;
    // Two tenants × three mapped objects per round: two rounds within a few seconds.
    wait_until(
        "two rounds of describe revalidation",
        Duration::from_secs(10),
        || async {
            let stats = env.get_json("/__emulator/stats").await;
            match stats["requests"]["describe"].as_u64() {
                Some(n) if n >= 12 => Ok(()),
                other => Err(format!("{other:?} describe requests")),
            }
        },
    )
    .await;
    env.finish().await;
}
