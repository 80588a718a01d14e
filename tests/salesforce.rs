//! The Salesforce client against the emulator over real HTTP: every resource, every error class,
//! both OAuth flows, faults, and the emulator's bodies compared with Salesforce's documented ones.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use portals_crm::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec, org::DEMO_ORG_TOML};
use portals_crm::salesforce::model::{
    ApiError, CompositeRequest, Graph, GraphRequest, Subrequest, UpsertOutcome,
};
use portals_crm::salesforce::{
    Class, Credentials, Described, OrgEndpoint, SalesforceClient, SalesforceError,
};
use portals_crm::telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::{Value, json};

mod common;

use common::raw;

const V: &str = "/services/data/v66.0";

async fn start(org: OrgSpec) -> EmulatorHandle {
    emulator::start("127.0.0.1:0".parse().unwrap(), org, &FaultSpec::default())
        .await
        .unwrap()
}

fn client_with(emulator: &EmulatorHandle, credentials: Credentials) -> SalesforceClient {
    SalesforceClient::new(
        OrgEndpoint {
            duplicate_rule: Default::default(),
            tenant: "test".into(),
            login_url: emulator.base_url.clone(),
            api_version: "66.0".into(),
            credentials,
            timeout: Duration::from_secs(10),
            ca_certificate: emulator
                .certificate
                .as_ref()
                .map(|p| std::fs::read(p).unwrap()),
        },
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn client_credentials(secret: &str) -> Credentials {
    Credentials::ClientCredentials {
        client_id: "demo-client".into(),
        client_secret: SecretString::from(secret.to_owned()),
    }
}

fn demo_jwt(username: &str) -> Credentials {
    Credentials::JwtBearer {
        consumer_key: "demo-client".into(),
        username: username.into(),
        private_key: SecretString::from(
            std::fs::read_to_string("config/keys/demo-jwt.key").unwrap(),
        ),
    }
}

fn client(emulator: &EmulatorHandle) -> SalesforceClient {
    client_with(emulator, client_credentials("demo-secret"))
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// Keys and JSON types of `expected` (recursively, first array element) match `actual`.
fn shape_diff(expected: &Value, actual: &Value, path: &str, out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let mut ek: Vec<_> = e.keys().collect();
            let mut ak: Vec<_> = a.keys().collect();
            ek.sort();
            ak.sort();
            if ek != ak {
                out.push(format!("{path}: keys {ek:?} vs {ak:?}"));
            }
            for (k, v) in e {
                if let Some(av) = a.get(k) {
                    shape_diff(v, av, &format!("{path}.{k}"), out);
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if let (Some(e0), Some(a0)) = (e.first(), a.first()) {
                shape_diff(e0, a0, &format!("{path}[0]"), out);
            }
        }
        (e, a) if std::mem::discriminant(e) != std::mem::discriminant(a) => {
            out.push(format!("{path}: {e} vs {a}"));
        }
        _ => {}
    }
}

fn assert_shape(fixture: &str, actual: &Value) {
    let text = std::fs::read_to_string(format!("tests/fixtures/salesforce/{fixture}")).unwrap();
    let expected: Value = serde_json::from_str(&text).unwrap();
    let mut diff = Vec::new();
    shape_diff(&expected, actual, "$", &mut diff);
    assert!(
        diff.is_empty(),
        "{fixture} differs from the emulator's body: {diff:#?}\n{actual:#}"
    );
}

fn lead(key: &str, last: &str) -> Subrequest {
    Subrequest {
        method: "PATCH".into(),
        url: format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/{key}"),
        reference_id: "lead".into(),
        body: Some(json!({"LastName": last, "Company": "Globex"}).into()),
    }
}

fn api_error(error: &SalesforceError) -> &ApiError {
    error
        .api_error()
        .unwrap_or_else(|| panic!("no API error in {error:?}"))
}

#[tokio::test]
async fn client_credentials_token_and_documented_shapes() {
    let emulator = start(OrgSpec::demo()).await;
    let token: Value = reqwest::Client::new()
        .post(format!("{}/services/oauth2/token", emulator.base_url))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["id"].as_str().unwrap().contains("/id/00D"));
    let bad = reqwest::Client::new()
        .post(format!("{}/services/oauth2/token", emulator.base_url))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "nope"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["error"],
        "invalid_client"
    );

    let client = client(&emulator);
    let integration = client.integration_user_id().await.unwrap();
    assert!(integration.starts_with("005"));
    assert_eq!(
        client
            .upsert(
                "Lead",
                "BookMe__Lead_Key__c",
                "t:a@x.example",
                &json!({"LastName": "A", "Company": "X"})
            )
            .await
            .unwrap(),
        UpsertOutcome::Created(
            client.query("SELECT Id FROM Lead").await.unwrap()[0]["Id"]
                .as_str()
                .unwrap()
                .to_owned()
        )
    );
    let (_, created) = raw(
        &emulator,
        &client,
        reqwest::Method::PATCH,
        &format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/t:b@x.example"),
        Some(json!({"LastName": "B", "Company": "X"})),
    )
    .await;
    assert_shape("upsert-created.json", &created);
    let (status, updated) = raw(
        &emulator,
        &client,
        reqwest::Method::PATCH,
        &format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/t:b@x.example"),
        Some(json!({"LastName": "B2"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_shape("upsert-updated.json", &updated);
    assert_eq!(created["id"], updated["id"], "the same record, updated");
    // The key field in the body, in any case, is the URL's: never written from the body.
    for (body_key, method) in [
        ("BookMe__Lead_Key__c", "update"),
        ("bookme__lead_key__c", "update"),
        ("BOOKME__LEAD_KEY__C", "insert"),
    ] {
        let url_key = if method == "update" {
            "t:b@x.example"
        } else {
            "t:c@x.example"
        };
        let (status, answer) = raw(
            &emulator,
            &client,
            reqwest::Method::PATCH,
            &format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/{url_key}"),
            Some(json!({"LastName": "C", "Company": "X", body_key: "t:changed@x.example"})),
        )
        .await;
        assert_eq!(
            status,
            if method == "update" { 200 } else { 201 },
            "{answer}"
        );
        let keys = client
            .query(&format!(
                "SELECT BookMe__Lead_Key__c FROM Lead WHERE Id = '{}'",
                answer["id"].as_str().unwrap()
            ))
            .await
            .unwrap();
        assert_eq!(
            keys[0]["BookMe__Lead_Key__c"], url_key,
            "{body_key} on {method}"
        );
    }
    let (status, malformed) = raw(&emulator, &client, reqwest::Method::PATCH, &format!("{V}/sobjects/Event/BookMe__Booking_Id__c/bk1"), Some(json!({"WhoId": "001900K0001pPuOAAU", "StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z"}))).await;
    assert_eq!(status, 400);
    assert_shape("error-malformed-id.json", &malformed);
    assert_eq!(malformed[0]["errorCode"], "MALFORMED_ID");
    let (_, query) = raw(
        &emulator,
        &client,
        reqwest::Method::GET,
        &format!("{V}/query?q=SELECT+Id+FROM+Lead+LIMIT+1"),
        None,
    )
    .await;
    assert_shape("query-response.json", &query);
    let (_, limits) = raw(
        &emulator,
        &client,
        reqwest::Method::GET,
        &format!("{V}/limits"),
        None,
    )
    .await;
    assert_shape("limits-response.json", &limits);
    emulator.stop().await;
}

#[tokio::test]
async fn jwt_bearer_with_a_key_generated_here() {
    use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
    use aws_lc_rs::signature::KeyPair as _;
    let key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private: Pkcs8V1Der = key.as_der().unwrap();
    let public: PublicKeyX509Der = key.public_key().as_der().unwrap();
    let org_text = DEMO_ORG_TOML.replace(
        "certificate = \"builtin:demo\"",
        &format!("certificate = '''{}'''", pem("PUBLIC KEY", public.as_ref())),
    );
    let emulator = start(OrgSpec::parse(&org_text).unwrap()).await;
    let private_pem = pem("PRIVATE KEY", private.as_ref());
    let jwt = |user: &str, key: &str| Credentials::JwtBearer {
        consumer_key: "demo-client".into(),
        username: user.into(),
        private_key: SecretString::from(key.to_owned()),
    };
    let ok = client_with(
        &emulator,
        jwt("integration@bookme-demo.example", &private_pem),
    );
    let token = ok.token().await.unwrap();
    assert!(token.user_id.starts_with("005"));
    let body: Value = reqwest::Client::new()
        .post(format!("{}/services/oauth2/token", emulator.base_url))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
            ),
            (
                "assertion",
                portals_crm::salesforce::auth::jwt_assertion(
                    "demo-client",
                    "integration@bookme-demo.example",
                    &emulator.base_url,
                    &SecretString::from(private_pem.clone()),
                )
                .unwrap(),
            ),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_shape("token-response-jwt.json", &body);

    let wrong_key = client_with(&emulator, demo_jwt("integration@bookme-demo.example"));
    let error = wrong_key.token().await.unwrap_err();
    assert!(
        matches!(&error, SalesforceError::Token { error, .. } if error == "invalid_grant"),
        "{error:?}"
    );
    let unapproved = client_with(&emulator, jwt("sara.rep@acme.example", &private_pem));
    let error = unapproved.token().await.unwrap_err();
    assert!(error.to_string().contains("hasn't approved"), "{error}");
    let expired = portals_crm::salesforce::auth::jwt_assertion(
        "demo-client",
        "integration@bookme-demo.example",
        "https://elsewhere.example",
        &SecretString::from(private_pem.clone()),
    )
    .unwrap();
    let response: Value = reqwest::Client::new()
        .post(format!("{}/services/oauth2/token", emulator.base_url))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", expired.as_str()),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(response["error_description"], "audience is invalid");
    emulator.stop().await;
}

#[tokio::test]
async fn graph_commits_good_graphs_and_rolls_back_a_failed_one_whole() {
    let emulator = start(OrgSpec::demo()).await;
    let client = client(&emulator);
    let good = |n: u32| {
        Graph {
        graph_id: format!("g{n}"),
        composite_request: vec![
            lead(&format!("t:{n}@x.example"), "Good"),
            Subrequest {
                method: "PATCH".into(),
                url: format!("{V}/sobjects/Event/BookMe__Booking_Id__c/bk{n}"),
                reference_id: "event".into(),
                body: Some(
                    json!({"Subject": "Call", "StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z", "WhoId": "@{lead.id}"}).into(),
                ),
            },
        ],
    }
    };
    let mut failing = good(9);
    failing.composite_request.push(Subrequest {
        method: "PATCH".into(),
        url: format!("{V}/sobjects/BookMe__Booking__c/BookMe__Booking_Id__c/bk9"),
        reference_id: "booking".into(),
        body: Some(
            json!({"Name": "bk9", "BookMe__Version__c": 1, "BookMe__Status__c": "teleported"})
                .into(),
        ),
    });
    let response = client
        .composite_graph(&GraphRequest {
            graphs: vec![good(1), failing, good(2)],
        })
        .await
        .unwrap();
    assert!(response.graphs[0].is_successful && response.graphs[2].is_successful);
    let failed = &response.graphs[1];
    assert!(!failed.is_successful);
    assert!(
        failed
            .graph_response
            .composite_response
            .iter()
            .all(|n| n.http_status_code == 400)
    );
    assert_eq!(
        failed.root_error().unwrap().error_code,
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    );
    assert_eq!(
        failed.graph_response.composite_response[0].errors()[0].error_code,
        "PROCESSING_HALTED"
    );
    let as_json = serde_json::to_value(&portals_crm::salesforce::model::GraphResponse {
        graphs: vec![failed.clone()],
    })
    .unwrap();
    assert_shape("graph-response-error.json", &as_json);
    let create = GraphRequest {
        graphs: vec![Graph {
            graph_id: "1".into(),
            composite_request: vec![Subrequest {
                method: "POST".into(),
                url: format!("{V}/sobjects/Lead/"),
                reference_id: "reference_id_lead_1".into(),
                body: Some(json!({"LastName": "Created", "Company": "Cloudy Consulting"}).into()),
            }],
        }],
    };
    let (status, created) = raw(
        &emulator,
        &client,
        reqwest::Method::POST,
        &format!("{V}/composite/graph"),
        Some(serde_json::to_value(&create).unwrap()),
    )
    .await;
    assert_eq!(status, 200);
    assert_shape("graph-response-success.json", &created);

    let leads = client.query("SELECT Id, LastName FROM Lead").await.unwrap();
    assert_eq!(
        leads.len(),
        3,
        "nothing of the failed graph is stored (two upserts, one create)"
    );
    let events = client.query("SELECT Id, WhoId FROM Event").await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| leads.iter().any(|l| l["Id"] == e["WhoId"])),
        "references resolved"
    );

    let too_many = GraphRequest {
        graphs: (0..76).map(good).collect(),
    };
    assert!(matches!(
        client.composite_graph(&too_many).await,
        Err(SalesforceError::Refused(_))
    ));
    let (status, body) = raw(
        &emulator,
        &client,
        reqwest::Method::POST,
        &format!("{V}/composite/graph"),
        Some(serde_json::to_value(&too_many).unwrap()),
    )
    .await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (400, Some("LIMIT_EXCEEDED"))
    );
    emulator.stop().await;
}

#[tokio::test]
async fn version_guard_rolls_back_the_graph_and_classifies_superseded() {
    let emulator = start(OrgSpec::demo()).await;
    let client = client(&emulator);
    let graph = |version: u32, subject: &str| {
        GraphRequest {
        graphs: vec![Graph {
            graph_id: "g0".into(),
            composite_request: vec![
                Subrequest {
                    method: "PATCH".into(),
                    url: format!("{V}/sobjects/Event/BookMe__Booking_Id__c/bk1"),
                    reference_id: "event".into(),
                    body: Some(
                        json!({"Subject": subject, "StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z"}).into(),
                    ),
                },
                Subrequest {
                    method: "PATCH".into(),
                    url: format!("{V}/sobjects/BookMe__Booking__c/BookMe__Booking_Id__c/bk1"),
                    reference_id: "booking".into(),
                    body: Some(
                        json!({"Name": "bk1", "BookMe__Version__c": version, "BookMe__Event_Id__c": "@{event.id}"}).into(),
                    ),
                },
            ],
        }],
    }
    };
    assert!(
        client
            .composite_graph(&graph(3, "v3"))
            .await
            .unwrap()
            .graphs[0]
            .is_successful
    );
    let stale = client.composite_graph(&graph(2, "v2")).await.unwrap();
    let error = stale.graphs[0].root_error().unwrap();
    assert_eq!(error.error_code, "FIELD_CUSTOM_VALIDATION_EXCEPTION");
    assert_eq!(error.message, "STALE_BOOKING_VERSION");
    assert_eq!(
        portals_crm::salesforce::error::classify_api_error(&error),
        Class::Superseded
    );
    let events = client.query("SELECT Subject FROM Event").await.unwrap();
    assert_eq!(
        events[0]["Subject"], "v3",
        "the Event node before the guard was rolled back"
    );
    assert!(
        client
            .composite_graph(&graph(3, "v3 again"))
            .await
            .unwrap()
            .graphs[0]
            .is_successful,
        "the same version replays"
    );
    emulator.stop().await;
}

#[tokio::test]
async fn composite_all_or_none_and_its_limit() {
    let emulator = start(OrgSpec::demo()).await;
    let client = client(&emulator);
    let mut bad = lead("t:bad@x.example", "Bad");
    bad.reference_id = "newContact".into();
    bad.body = Some(json!({"LastName": "x".repeat(81), "Company": "X"}).into());
    let request = CompositeRequest {
        all_or_none: true,
        collate_subrequests: Some(false),
        composite_request: vec![lead("t:ok@x.example", "Ok"), bad],
    };
    let response = client.composite(&request).await.unwrap();
    let results = &response.composite_response;
    assert_eq!(results[1].errors()[0].error_code, "STRING_TOO_LONG");
    assert_eq!(results[1].errors()[0].fields, ["LastName"]);
    let halted = serde_json::to_value(&results[0]).unwrap();
    let mut expected_like = halted.clone();
    expected_like["referenceId"] = json!("newContact");
    assert_shape("composite-allornone-halted.json", &expected_like);
    assert_eq!(results[0].errors()[0].error_code, "PROCESSING_HALTED");
    assert!(
        client
            .query("SELECT Id FROM Lead")
            .await
            .unwrap()
            .is_empty(),
        "all rolled back"
    );

    let partial = CompositeRequest {
        all_or_none: false,
        ..request.clone()
    };
    let response = client.composite(&partial).await.unwrap();
    assert!(response.composite_response[0].is_success());
    assert_eq!(client.query("SELECT Id FROM Lead").await.unwrap().len(), 1);

    let too_many = CompositeRequest {
        all_or_none: false,
        collate_subrequests: None,
        composite_request: (0..26)
            .map(|i| {
                let mut l = lead(&format!("t:{i}@x.example"), "L");
                l.reference_id = format!("l{i}");
                l
            })
            .collect(),
    };
    assert!(matches!(
        client.composite(&too_many).await,
        Err(SalesforceError::Refused(_))
    ));
    emulator.stop().await;
}

#[tokio::test]
async fn field_level_security_and_write_errors() {
    let emulator = start(OrgSpec::demo()).await;
    let admin = client(&emulator);
    let limited = client_with(&emulator, demo_jwt("limited@bookme-demo.example"));
    let Described::Fresh { describe, .. } = limited.describe("Lead", None).await.unwrap() else {
        panic!("first describe is fresh")
    };
    assert!(
        describe.field("Phone").is_none(),
        "invisible to the limited user"
    );
    assert!(describe.field("Email").unwrap().createable);
    let Described::Fresh {
        describe: event, ..
    } = limited.describe("Event", None).await.unwrap()
    else {
        panic!()
    };
    assert!(
        !event.field("Description").unwrap().updateable,
        "read-only for the limited user"
    );

    let write = |c: &'static str| json!({"LastName": "Doe", "Company": "Globex", "Phone": c});
    let error = limited
        .upsert("Lead", "BookMe__Lead_Key__c", "t:l@x.example", &write("1"))
        .await
        .unwrap_err();
    assert_eq!(api_error(&error).error_code, "INVALID_FIELD");
    assert_eq!(error.class(), Class::Permanent);
    let cases: Vec<(Value, &str)> = vec![
        (json!({"Company": "Globex"}), "REQUIRED_FIELD_MISSING"),
        (
            json!({"LastName": "x".repeat(81), "Company": "G"}),
            "STRING_TOO_LONG",
        ),
        (
            json!({"LastName": "D", "Company": "G", "Email": "not-an-email"}),
            "INVALID_EMAIL_ADDRESS",
        ),
        (
            json!({"LastName": "D", "Company": "G", "OwnerId": "00Q5g0000000001AAA"}),
            "MALFORMED_ID",
        ),
        (
            json!({"LastName": "D", "Company": "G", "OwnerId": "0055g00000009ZZAAY"}),
            "INVALID_CROSS_REFERENCE_KEY",
        ),
        (
            json!({"LastName": "D", "Company": "G", "CreatedDate": "2026-01-01T00:00:00Z"}),
            "INVALID_FIELD_FOR_INSERT_UPDATE",
        ),
        (
            json!({"LastName": "D", "Company": "G", "NoSuch__c": "x"}),
            "INVALID_FIELD",
        ),
    ];
    for (body, code) in cases {
        let error = admin
            .upsert("Lead", "BookMe__Lead_Key__c", "t:case@x.example", &body)
            .await
            .unwrap_err();
        assert_eq!(api_error(&error).error_code, code, "{body}");
        assert_eq!(error.class(), Class::Permanent);
    }
    let error = limited
        .upsert(
            "BookMe__Booking__c",
            "BookMe__Booking_Id__c",
            "bk1",
            &json!({"Name": "bk1", "BookMe__Version__c": 1, "BookMe__Portal__c": "P"}),
        )
        .await
        .unwrap_err();
    assert_eq!(api_error(&error).error_code, "INVALID_FIELD");
    // Event: end before start, and a Lead WhoId forbids a WhatId.
    admin
        .upsert(
            "Lead",
            "BookMe__Lead_Key__c",
            "t:who@x.example",
            &json!({"LastName": "W", "Company": "C"}),
        )
        .await
        .unwrap();
    let lead_id = admin
        .query("SELECT Id FROM Lead WHERE BookMe__Lead_Key__c = 't:who@x.example'")
        .await
        .unwrap()[0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    let error = admin.upsert("Event", "BookMe__Booking_Id__c", "bk2", &json!({"StartDateTime": "2026-12-01T11:00:00Z", "EndDateTime": "2026-12-01T10:00:00Z"})).await.unwrap_err();
    assert_eq!(api_error(&error).error_code, "FIELD_INTEGRITY_EXCEPTION");
    admin
        .upsert(
            "BookMe__Booking__c",
            "BookMe__Booking_Id__c",
            "bk3",
            &json!({"Name": "bk3", "BookMe__Version__c": 1}),
        )
        .await
        .unwrap();
    let booking = admin
        .query("SELECT Id FROM BookMe__Booking__c")
        .await
        .unwrap()[0]["Id"]
        .as_str()
        .unwrap()
        .to_owned();
    // WhatId is not part of least privilege; grant it at run time for this rule.
    let granted = reqwest::Client::new()
        .post(format!("{}/__emulator/org", emulator.base_url))
        .json(&json!({"permission_set": "BookMe_Integration_User", "field": "Event.WhatId", "access": "edit"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(granted, 200);
    let error = admin.upsert("Event", "BookMe__Booking_Id__c", "bk3", &json!({"StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z", "WhoId": lead_id, "WhatId": booking})).await.unwrap_err();
    assert_eq!(api_error(&error).error_code, "FIELD_INTEGRITY_EXCEPTION");
    // DUPLICATE_VALUE: a plain create with an external id another record has.
    let (status, body) = raw(
        &emulator,
        &admin,
        reqwest::Method::POST,
        &format!("{V}/sobjects/Lead"),
        Some(json!({"LastName": "W", "Company": "C", "BookMe__Lead_Key__c": "t:who@x.example"})),
    )
    .await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (400, Some("DUPLICATE_VALUE"))
    );
    // Unknown external id field → 404 NOT_FOUND.
    let error = admin
        .upsert("Lead", "NoSuch__c", "x", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SalesforceError::Api { status: 404, .. }),
        "{error:?}"
    );
    emulator.stop().await;
}

#[tokio::test]
async fn describe_caching_query_paging_and_limits() {
    let org =
        OrgSpec::parse(&DEMO_ORG_TOML.replace("query_batch_size = 2000", "query_batch_size = 2"))
            .unwrap();
    let emulator = start(org).await;
    let client = client(&emulator);
    let Described::Fresh {
        last_modified,
        describe,
    } = client.describe("Lead", None).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(describe.name, "Lead");
    let since = last_modified.expect("Last-Modified header");
    assert!(matches!(
        client.describe("Lead", Some(&since)).await.unwrap(),
        Described::NotModified
    ));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let status = reqwest::Client::new()
        .post(format!("{}/__emulator/org", emulator.base_url))
        .json(&json!({"permission_set": "BookMe_Integration_User", "field": "Lead.Phone", "access": "none"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let Described::Fresh { describe, .. } = client.describe("Lead", Some(&since)).await.unwrap()
    else {
        panic!("a permission change invalidates the cached describe")
    };
    assert!(describe.field("Phone").is_none());

    let global = client.describe_global().await.unwrap();
    assert!(
        global
            .sobjects
            .iter()
            .any(|o| o.name == "BookMe__Booking__c")
    );
    assert!(
        global.sobjects.iter().any(|o| o.name == "EventRelation"),
        "EventRelation has no permissions of its own: it follows Event's"
    );

    let users = client.query("SELECT Id, Email FROM User").await.unwrap();
    assert_eq!(
        users.len(),
        6,
        "three pages of two, followed through nextRecordsUrl"
    );
    let active = client.query("SELECT Id FROM User WHERE Email IN ('sara.rep@acme.example', 'former.rep@acme.example') AND IsActive = true").await.unwrap();
    assert_eq!(active.len(), 1);
    let error = client
        .query("SELECT Id FROM User WHERE Email LIKE 'x%'")
        .await
        .unwrap_err();
    assert_eq!(api_error(&error).error_code, "MALFORMED_QUERY");

    let limits = client.limits().await.unwrap();
    let daily = limits["DailyApiRequests"];
    let usage = client.api_usage().unwrap();
    assert_eq!(usage.max, daily.max);
    assert!(usage.used >= 1 && daily.remaining < daily.max);
    emulator.stop().await;
}

#[tokio::test]
async fn faults_and_their_classes() {
    let emulator = start(OrgSpec::demo()).await;
    let client = client(&emulator);
    let http = reqwest::Client::new();
    let faults = |body: Value| {
        let http = http.clone();
        let url = format!("{}/__emulator/faults", emulator.base_url);
        async move { http.post(url).json(&body).send().await.unwrap().status() }
    };
    let body = json!({"LastName": "F", "Company": "C"});
    client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap();

    assert_eq!(faults(json!({"expire_tokens": true})).await, 200);
    client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .expect("re-minted and replayed once");
    let stats: Value = http
        .get(format!("{}/__emulator/stats", emulator.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"]["token"], 2);

    faults(json!({"error_rate": 1.0, "errors": ["503"]})).await;
    let error = client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap_err();
    assert!(
        matches!(error.class(), Class::Transient { .. }),
        "{error:?}"
    );
    faults(json!({"errors": ["UNABLE_TO_LOCK_ROW"]})).await;
    let error = client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap_err();
    assert_eq!(api_error(&error).error_code, "UNABLE_TO_LOCK_ROW");
    assert!(matches!(error.class(), Class::Transient { .. }));
    let graph = client
        .composite_graph(&GraphRequest {
            graphs: vec![Graph {
                graph_id: "g0".into(),
                composite_request: vec![lead("t:g@x.example", "G")],
            }],
        })
        .await
        .unwrap();
    assert_eq!(
        graph.graphs[0].root_error().unwrap().error_code,
        "UNABLE_TO_LOCK_ROW"
    );
    let cleared = http
        .delete(format!("{}/__emulator/faults", emulator.base_url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(cleared, 204);

    faults(json!({"api_quota_remaining": 0})).await;
    let error = client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap_err();
    assert_eq!(api_error(&error).error_code, "REQUEST_LIMIT_EXCEEDED");
    assert!(matches!(error.class(), Class::Transient { .. }));
    faults(json!({"api_quota_remaining": 1000})).await;

    faults(json!({"latency_ms": 150})).await;
    let started = std::time::Instant::now();
    client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    faults(json!({"latency_ms": 0, "outage_seconds": 30})).await;
    let error = client
        .upsert("Lead", "BookMe__Lead_Key__c", "t:f@x.example", &body)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SalesforceError::Api { status: 503, .. }),
        "{error:?}"
    );
    assert_eq!(faults(json!({"errors": ["418"]})).await, 400);
    emulator.stop().await;
}

#[tokio::test]
async fn secrets_never_reach_errors_or_debug_output() {
    let emulator = start(OrgSpec::demo()).await;
    let secret = "s3cr3t-never-printed";
    let client = client_with(&emulator, client_credentials(secret));
    let error = client.token().await.unwrap_err();
    let printed = format!("{error} {error:?} {client:?}");
    assert!(!printed.contains(secret), "{printed}");
    let good = self::client(&emulator);
    let token = good.token().await.unwrap();
    let value = secrecy::ExposeSecret::expose_secret(&token.value).to_owned();
    let printed = format!("{token:?} {good:?} {:?}", demo_jwt("x"));
    assert!(!printed.contains(&value), "{printed}");
    assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    let error = good
        .upsert(
            "Lead",
            "BookMe__Lead_Key__c",
            "t:x@x.example",
            &json!({"Nope": 1}),
        )
        .await
        .unwrap_err();
    assert!(!format!("{error} {error:?}").contains(&value));
    assert!(
        SalesforceClient::new(
            OrgEndpoint {
                duplicate_rule: Default::default(),
                tenant: "t".into(),
                login_url: "http://login.salesforce.com".into(),
                api_version: "66.0".into(),
                credentials: client_credentials("x"),
                timeout: Duration::from_secs(1),
                ca_certificate: None,
            },
            Arc::new(Metrics::new()),
        )
        .is_err(),
        "plain http to a non-loopback host is refused"
    );
    emulator.stop().await;
}

#[tokio::test]
async fn tls_emulator_speaks_https_with_a_certificate_clients_can_trust() {
    let dir = std::env::temp_dir().join(format!("portals-crm-tls-{:x}", rand::random::<u32>()));
    let emulator = emulator::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        OrgSpec::demo(),
        &FaultSpec::default(),
        &dir,
    )
    .await
    .unwrap();
    assert!(emulator.base_url.starts_with("https://"));
    let trusted = client(&emulator);
    let Described::Fresh { describe, .. } = trusted.describe("Lead", None).await.unwrap() else {
        panic!()
    };
    assert_eq!(describe.name, "Lead");
    assert!(
        trusted
            .token()
            .await
            .unwrap()
            .instance_url
            .starts_with("https://")
    );
    let untrusting = SalesforceClient::new(
        OrgEndpoint {
            duplicate_rule: Default::default(),
            tenant: "t".into(),
            login_url: emulator.base_url.clone(),
            api_version: "66.0".into(),
            credentials: client_credentials("demo-secret"),
            timeout: Duration::from_secs(5),
            ca_certificate: None,
        },
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let error = untrusting.token().await.unwrap_err();
    assert!(
        matches!(error, SalesforceError::Transport { .. }),
        "a self-signed certificate is not trusted by default: {error:?}"
    );
    emulator.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn records_by_id_by_external_id_and_several_matches() {
    let mut org = OrgSpec::demo();
    // A non-unique External ID (as Activity fields are): two records may share a value.
    let contact = org
        .sobjects
        .iter_mut()
        .find(|o| o.name == "Contact")
        .unwrap();
    contact.fields.push(portals_crm::emulator::org::FieldSpec {
        name: "Legacy_Id__c".into(),
        label: "Legacy Id".into(),
        field_type: "string".into(),
        length: 40,
        nillable: true,
        createable: true,
        updateable: true,
        defaulted_on_create: false,
        external_id: true,
        unique: false,
        custom: true,
        reference_to: vec![],
        picklist: vec![],
        restricted: false,
    });
    let set = org
        .permission_sets
        .iter_mut()
        .find(|p| p.name == "BookMe_Integration_User")
        .unwrap();
    set.objects.insert("Contact".into(), "CRUD".into());
    set.grant_field("Contact.Legacy_Id__c", "edit");
    let emulator = start(org).await;
    let client = client(&emulator);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = raw(
            &emulator,
            &client,
            reqwest::Method::POST,
            &format!("{V}/sobjects/Contact"),
            Some(json!({"LastName": "Twin", "Legacy_Id__c": "L1"})),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let (status, body) = raw(
        &emulator,
        &client,
        reqwest::Method::PATCH,
        &format!("{V}/sobjects/Contact/Legacy_Id__c/L1"),
        Some(json!({"LastName": "Which"})),
    )
    .await;
    assert_eq!(status, 300, "several matches: nothing written");
    assert_eq!(body.as_array().unwrap().len(), 2);
    let error = client
        .upsert(
            "Contact",
            "Legacy_Id__c",
            "L1",
            &json!({"LastName": "Which"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SalesforceError::Api { status: 300, .. }),
        "{error:?}"
    );

    let path = format!("{V}/sobjects/Contact/{}", ids[0]);
    let (status, record) = raw(&emulator, &client, reqwest::Method::GET, &path, None).await;
    assert_eq!((status, record["LastName"].as_str()), (200, Some("Twin")));
    assert_eq!(record["attributes"]["type"], "Contact");
    let (status, _) = raw(
        &emulator,
        &client,
        reqwest::Method::PATCH,
        &path,
        Some(json!({"LastName": "Renamed"})),
    )
    .await;
    assert_eq!(status, 204);
    let (_, record) = raw(&emulator, &client, reqwest::Method::GET, &path, None).await;
    assert_eq!(record["LastName"], "Renamed");
    let (status, _) = raw(&emulator, &client, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    let (status, body) = raw(&emulator, &client, reqwest::Method::GET, &path, None).await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (404, Some("NOT_FOUND"))
    );

    client
        .upsert(
            "Lead",
            "BookMe__Lead_Key__c",
            "t:keep@x.example",
            &json!({"LastName": "K", "Company": "C"}),
        )
        .await
        .unwrap();
    let lead_path = format!("{V}/sobjects/Lead/BookMe__Lead_Key__c/t:keep@x.example");
    let (status, lead) = raw(&emulator, &client, reqwest::Method::GET, &lead_path, None).await;
    assert_eq!((status, lead["LastName"].as_str()), (200, Some("K")));
    let (status, body) = raw(
        &emulator,
        &client,
        reqwest::Method::DELETE,
        &lead_path,
        None,
    )
    .await;
    assert_eq!(
        (status, body[0]["errorCode"].as_str()),
        (400, Some("INSUFFICIENT_ACCESS_OR_READONLY")),
        "no Delete on Lead"
    );
    client.upsert("Event", "BookMe__Booking_Id__c", "bk_del", &json!({"StartDateTime": "2026-12-01T10:00:00Z", "EndDateTime": "2026-12-01T11:00:00Z"})).await.unwrap();
    let event_path = format!("{V}/sobjects/Event/BookMe__Booking_Id__c/bk_del");
    assert_eq!(
        raw(
            &emulator,
            &client,
            reqwest::Method::DELETE,
            &event_path,
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        raw(&emulator, &client, reqwest::Method::GET, &event_path, None)
            .await
            .0,
        404
    );

    reqwest::Client::new()
        .post(format!("{}/__emulator/faults", emulator.base_url))
        .json(&json!({"error_rate": 1.0, "errors": ["500"]}))
        .send()
        .await
        .unwrap();
    let error = client.limits().await.unwrap_err();
    assert!(
        matches!(&error, SalesforceError::Api { status: 500, .. }),
        "{error:?}"
    );
    assert_eq!(api_error(&error).error_code, "UNKNOWN_EXCEPTION");
    assert!(matches!(error.class(), Class::Transient { .. }));
    emulator.stop().await;
}

#[tokio::test]
async fn only_real_token_requests_are_counted() {
    let emulator = start(OrgSpec::demo()).await;
    let metrics = Arc::new(Metrics::new());
    let client = SalesforceClient::new(
        OrgEndpoint {
            duplicate_rule: Default::default(),
            tenant: "test".into(),
            login_url: emulator.base_url.clone(),
            api_version: "66.0".into(),
            credentials: client_credentials("demo-secret"),
            timeout: Duration::from_secs(10),
            ca_certificate: None,
        },
        metrics.clone(),
    )
    .unwrap();
    for _ in 0..3 {
        client.limits().await.unwrap();
    }
    let text = metrics.render();
    assert!(
        text.contains(
            "portals_crm_salesforce_requests_total{kind=\"token\",status=\"200\",tenant=\"test\"} 1"
        ),
        "{text}"
    );
    assert!(text.contains("portals_crm_salesforce_requests_total{kind=\"limits\",status=\"200\",tenant=\"test\"} 3"), "{text}");
    emulator.stop().await;
}

/// Issue 12 B6: the standard Lead duplicate rule of a new org, with Salesforce's body: 400, an
/// error array whose DUPLICATES_DETECTED carries the duplicateResult (rule, matched records),
/// and `Sforce-Duplicate-Rule-Header: allowSave=true` saving past the alert.
#[tokio::test]
async fn the_standard_lead_duplicate_rule_refuses_unless_allow_save() {
    let emulator = start(OrgSpec::demo()).await;
    let client = client(&emulator);
    let jane = json!({"FirstName": "Jane", "LastName": "Doe", "Company": "Globex",
        "Email": "Jane.Doe@globex.example"});
    let path = format!("{V}/sobjects/Lead");
    let (status, first) = raw(
        &emulator,
        &client,
        reqwest::Method::POST,
        &path,
        Some(jane.clone()),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let mut same = jane.clone();
    same["Email"] = json!("jane.doe@globex.example");
    let (status, body) = raw(
        &emulator,
        &client,
        reqwest::Method::POST,
        &path,
        Some(same.clone()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error: Vec<ApiError> = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(error[0].error_code, "DUPLICATES_DETECTED");
    assert_eq!(error[0].message, "Use one of these records?");
    let result = &body[0]["duplicateResult"];
    assert_eq!(result["duplicateRule"], "Standard_Lead_Duplicate_Rule");
    assert_eq!(result["duplicateRuleEntityType"], "Lead");
    assert_eq!(result["allowSave"], true);
    let matched = &result["matchResults"][0];
    assert_eq!(matched["entityType"], "Lead");
    assert_eq!(matched["rule"], "Standard_Lead_Match_Rule_v1_0");
    assert_eq!(matched["matchRecords"][0]["record"]["Id"], first["id"]);
    assert_eq!(
        error[0].duplicate_matches(),
        [("Lead".to_owned(), first["id"].as_str().unwrap().to_owned())]
    );

    let token = client.token().await.unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}{path}", emulator.base_url))
        .bearer_auth(secrecy::ExposeSecret::expose_secret(&token.value))
        .header(
            "Sforce-Duplicate-Rule-Header",
            "allowSave=true; includeRecordDetails=false; runAsCurrentUser=true",
        )
        .json(&same)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "allowSave saves past the alert");
    emulator.stop().await;
}
