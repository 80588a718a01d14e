//! Org-level security: Login IP Ranges on the integration user's profile, the connected app's IP
//! Relaxation, and what a refused sign-in does to a tenant (paused, no attempt spent, named in
//! `/readyz`, resumed once the org is fixed).

mod common;

use std::time::Duration;

use common::{TestEnv, sample, wait_until};
use serde_json::{Value, json};

const PROFILE: &str = "BookMe Integration";
const APP: &str = "BookMe Portals CRM";

/// Login IP Ranges that leave out 127.0.0.1, where the tests run.
fn elsewhere() -> Value {
    json!({"profile": PROFILE, "login_ip_ranges": [{"start": "203.0.113.10", "end": "203.0.113.20"}]})
}

async fn token_request(base: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{base}/services/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn a_token_request_from_outside_the_login_ip_ranges_gets_salesforces_error() {
    let env = TestEnv::start("ip-ranges").await;
    let base = env.emulator.base_url.clone();
    assert_eq!(token_request(&base).await.0, 200, "no ranges: any address");

    assert_eq!(env.post_json("/__emulator/org", elsewhere()).await, 200);
    let (status, body) = token_request(&base).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "IP restricted or invalid login hours"})
    );

    let inside = json!({"profile": PROFILE, "login_ip_ranges": [{"start": "127.0.0.1", "end": "127.0.0.1"}]});
    assert_eq!(env.post_json("/__emulator/org", inside).await, 200);
    assert_eq!(token_request(&base).await.0, 200, "127.0.0.1 in range");

    assert_eq!(env.post_json("/__emulator/org", elsewhere()).await, 200);
    let relax = json!({"connected_app": APP, "ip_relaxation": "relax"});
    assert_eq!(env.post_json("/__emulator/org", relax).await, 200);
    assert_eq!(
        token_request(&base).await.0,
        200,
        "the app relaxes IP restrictions"
    );

    let inactive = json!({"user": "integration@bookme-demo.example", "active": false});
    assert_eq!(env.post_json("/__emulator/org", inactive).await, 200);
    assert_eq!(
        token_request(&base).await,
        (
            400,
            json!({"error": "inactive_user", "error_description": "user is inactive"})
        )
    );
    env.finish().await;
}

async fn readyz(env: &TestEnv) -> (u16, String) {
    let response = reqwest::get(format!("http://{}/readyz", env.service().http_addr))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn a_refused_sign_in_pauses_the_tenant_without_spending_attempts_until_the_org_is_fixed() {
    // Three one-second tiers: a booking whose waits counted as attempts would be dead-lettered
    // (retries_exhausted) after its third retry.
    let env = TestEnv::start_with("signin", |c| {
        c.retry.tiers_secs = vec![1, 1, 1];
        c.salesforce.circuit_cooldown_secs = 1;
    })
    .await;
    assert_eq!(env.post_json("/__emulator/org", elsewhere()).await, 200);
    assert_eq!(
        env.post_json("/__emulator/faults", json!({"expire_tokens": true}))
            .await,
        200
    );
    env.publish("meeting.booked", &sample("booked")).await;

    let metrics = &env.service().metrics;
    wait_until(
        "the tenant paused for its sign-in",
        Duration::from_secs(30),
        || async {
            // Both shipped tenants sign in as the integration user; `demo` is paused too once
            // its start-up check meets the refusal.
            let refused = metrics.sign_in_refused();
            let acme = (
                "acme".to_owned(),
                "salesforce_auth_invalid_grant".to_owned(),
            );
            if refused.contains(&acme) {
                Ok(())
            } else {
                Err(format!("{refused:?}"))
            }
        },
    )
    .await;
    // Ready (200) once connected: one customer's connected app does not gate a rollout.
    wait_until(
        "readyz naming the tenant",
        Duration::from_secs(30),
        || async {
            match readyz(&env).await {
                (200, body)
                    if body.contains(
                        "tenant acme cannot sign in to Salesforce (salesforce_auth_invalid_grant)",
                    ) =>
                {
                    Ok(())
                }
                seen => Err(format!("{seen:?}")),
            }
        },
    )
    .await;
    env.wait_outcome("retried", 6).await;
    assert!(
        env.drain_dead_letters().await.is_empty(),
        "waiting spent no attempt: {:?}",
        env.outcomes()
    );
    assert!(env.records("Event").await.is_empty());
    assert!(
        metrics
            .render()
            .contains("portals_crm_salesforce_auth_refused{reason=\"salesforce_auth_invalid_grant\",tenant=\"acme\"} 1")
    );

    let relax = json!({"connected_app": APP, "ip_relaxation": "relax"});
    assert_eq!(env.post_json("/__emulator/org", relax).await, 200);
    env.wait_records("Event", 1).await;
    // `demo` had no booking to probe with: it stays flagged until its next one.
    let refused = metrics.sign_in_refused();
    assert!(refused.iter().all(|(t, _)| t != "acme"), "{refused:?}");
    let (status, body) = readyz(&env).await;
    assert!(status == 200 && !body.contains("tenant acme"), "{body}");
    env.finish().await;
}
