//! Mappings validated against the org as the integration user sees it, and `doctor`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use portals_crm::config::{AuthConfig, TenantConfig};
use portals_crm::doctor::check_tenant;
use portals_crm::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec};
use portals_crm::enrich::Caches;
use portals_crm::plan::validate::{MappingProblem, validate};
use portals_crm::telemetry::metrics::Metrics;
use portals_crm::tenants::{LoadedTenant, load_tenants};
use serde_json::json;

fn acme(emulator: &EmulatorHandle) -> TenantConfig {
    let mut tenant = TenantConfig::load(Path::new("config/tenants/acme.toml")).unwrap();
    tenant.org.login_url = emulator.base_url.clone();
    tenant
}

fn as_limited_user(mut tenant: TenantConfig) -> TenantConfig {
    if let AuthConfig::JwtBearer { username, .. } = &mut tenant.auth {
        *username = "limited@bookme-demo.example".into();
    }
    tenant
}

fn load(tenant: TenantConfig) -> (LoadedTenant, Caches, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let loaded = load_tenants(vec![tenant], Duration::from_secs(10), &metrics)
        .unwrap()
        .remove(0);
    (loaded, Caches::temporary(metrics.clone()).unwrap(), metrics)
}

async fn problems(tenant: TenantConfig) -> Vec<MappingProblem> {
    let (loaded, caches, _) = load(tenant);
    let mut describes = HashMap::new();
    for record in &loaded.config.records {
        if let Some(d) = caches
            .describe(&loaded.client, &record.sobject)
            .await
            .unwrap()
        {
            describes.insert(record.sobject.clone(), d);
        }
    }
    validate(&loaded.config, &describes)
}

fn has(problems: &[MappingProblem], target: &str, fix_contains: &str) -> bool {
    problems
        .iter()
        .any(|p| p.target == target && p.fix.contains(fix_contains))
}

async fn start(org: OrgSpec) -> EmulatorHandle {
    emulator::start("127.0.0.1:0".parse().unwrap(), org, &FaultSpec::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_shipped_mapping_is_valid_and_least_privilege_gaps_are_named_with_their_fix() {
    let emulator = start(OrgSpec::demo()).await;
    assert_eq!(problems(acme(&emulator)).await, vec![]);
    let found = problems(as_limited_user(acme(&emulator))).await;
    let printed: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert!(
        has(&found, "Lead.Phone", "grant Edit on Lead.Phone"),
        "{printed:#?}"
    );
    assert!(
        has(&found, "Event.Location", "grant Edit on Event.Location"),
        "{printed:#?}"
    );
    let description = found
        .iter()
        .find(|p| p.target == "Event.Description")
        .unwrap();
    assert!(description.problem.contains("read-only"), "{description}");
    assert!(
        has(&found, "BookMe__Booking__c.BookMe__Portal__c", "grant Edit"),
        "{printed:#?}"
    );
    assert!(
        found
            .iter()
            .all(|p| p.tenant == "acme" && !p.record.is_empty())
    );
    emulator.stop().await;
}

#[tokio::test]
async fn mapping_mistakes_are_all_reported_at_once() {
    let emulator = start(OrgSpec::demo()).await;
    let mut tenant = acme(&emulator);
    tenant.records[0].fields.remove("LastName");
    tenant.records[0]
        .fields
        .insert("Status".into(), json!("Bogus"));
    tenant.records[0]
        .fields
        .insert("Title".into(), json!("x".repeat(200)));
    tenant.records[1].external_id_field = "Subject".into();
    tenant.records[2]
        .fields
        .insert("BookMe__Lead_Id__c".into(), json!("@{event.id}"));
    let found = problems(tenant).await;
    let printed: Vec<String> = found.iter().map(ToString::to_string).collect();
    assert!(
        has(&found, "Lead.LastName", "map Lead.LastName"),
        "{printed:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.target == "Lead.Status" && p.problem.contains("picklist")),
        "{printed:#?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.target == "Lead.Title" && p.problem.contains("holds 128")),
        "{printed:#?}"
    );
    assert!(has(&found, "Event.Subject", "External ID"), "{printed:#?}");
    assert!(
        found
            .iter()
            .any(|p| p.target == "BookMe__Booking__c.BookMe__Lead_Id__c"
                && p.problem.contains("refers to a Event")),
        "{printed:#?}"
    );
    assert_eq!(found.len(), 5, "{printed:#?}");
    emulator.stop().await;
}

#[tokio::test]
async fn a_delete_mapping_needs_the_delete_permission() {
    let emulator = start(OrgSpec::demo()).await;
    let with_delete = |tenant: TenantConfig| {
        let mut tenant = tenant;
        let mut delete = tenant.records[1].clone();
        delete.reference = "event_gone".into();
        delete.action = portals_crm::config::Action::Delete;
        delete.fields.clear();
        delete.when = Some("booking.status == 'cancelled'".into());
        tenant.records.push(delete);
        tenant
    };
    assert_eq!(
        problems(with_delete(acme(&emulator))).await,
        vec![],
        "the integration user may delete Events"
    );
    let found = problems(with_delete(as_limited_user(acme(&emulator)))).await;
    assert!(has(&found, "Event", "grant Delete on Event"), "{found:#?}");
    emulator.stop().await;
}

#[tokio::test]
async fn describes_are_cached_and_revalidated() {
    let emulator = start(OrgSpec::demo()).await;
    let (loaded, caches, metrics) = load(acme(&emulator));
    let first = caches
        .describe(&loaded.client, "Lead")
        .await
        .unwrap()
        .unwrap();
    let second = caches
        .describe(&loaded.client, "Lead")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first, second);
    let text = metrics.render();
    assert!(
        text.contains("portals_crm_cache_requests_total{cache=\"describe\",result=\"hit\"} 1"),
        "{text}"
    );
    let stats: serde_json::Value = reqwest::get(format!("{}/__emulator/stats", emulator.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"]["describe"], 2, "the second one was a 304");
    assert!(
        caches
            .describe(&loaded.client, "Opportunity")
            .await
            .unwrap()
            .is_none(),
        "invisible object"
    );
    emulator.stop().await;
}

#[tokio::test]
async fn doctor_passes_a_ready_tenant_and_names_every_miss_with_its_fix() {
    let emulator = start(OrgSpec::demo()).await;
    let (loaded, caches, _) = load(acme(&emulator));
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    assert!(report.ok(), "{report}");
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name.starts_with("version guard") && c.ok)
    );
    assert!(
        report.to_string().contains("org setting Shared Activities"),
        "{report}"
    );
    assert!(
        emulator_records(&emulator, "BookMe__Booking__c").await == 0,
        "the probe wrote nothing"
    );

    let (limited, caches, _) = load(as_limited_user(acme(&emulator)));
    let report = check_tenant(&limited.config, &limited.client, &caches).await;
    assert!(!report.ok());
    let text = report.to_string();
    assert!(
        text.contains("[MISS] mapping lead.Lead.Phone")
            && text.contains("fix: grant Edit on Lead.Phone"),
        "{text}"
    );
    // The sharing probe writes through the mapping: not run, and said so, not dropped.
    assert!(
        text.contains("[skip] record sharing (records owned by other users): its probe writes")
            && text.ends_with(" to fix, 1 not run"),
        "{text}"
    );
    emulator.stop().await;

    let mut org = OrgSpec::demo();
    org.validation_rules.clear();
    let emulator = start(org).await;
    let (loaded, caches, _) = load(acme(&emulator));
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    let guard = report
        .checks
        .iter()
        .find(|c| c.name.starts_with("version guard"))
        .unwrap();
    assert!(
        !guard.ok
            && guard
                .fix
                .as_deref()
                .unwrap()
                .contains("BookMe_Version_Must_Not_Decrease"),
        "{report}"
    );
    assert!(
        emulator_records(&emulator, "BookMe__Booking__c").await == 0,
        "the probe rolled back"
    );

    let mut wrong = acme(&emulator);
    let secret_file = std::env::temp_dir().join(format!(
        "portals-crm-wrong-secret-{:x}",
        rand::random::<u32>()
    ));
    std::fs::write(&secret_file, "not-the-secret").unwrap();
    wrong.auth = AuthConfig::ClientCredentials {
        client_id: "demo-client".into(),
        client_secret_file: Some(secret_file.clone()),
        client_secret_env: None,
    };
    let (loaded, caches, _) = load(wrong);
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    // The sign-in failed: the other checks are said not to run, in one line.
    assert!(!report.ok() && report.checks.len() == 2, "{report}");
    assert!(
        report.checks[1].skipped
            && report
                .to_string()
                .ends_with("2 checks, 1 to fix, 1 not run"),
        "{report}"
    );
    assert!(
        report.checks[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("consumer key"),
        "{report}"
    );
    assert!(!report.to_string().contains("not-the-secret"));
    let _ = std::fs::remove_file(secret_file);
    emulator.stop().await;
}

/// `parent = "first"` (acme's) in an org without Shared Activities, which has no
/// `EventRelation.IsParent`: doctor names the setting and both fixes; with `parent = "none"`
/// the mapping passes.
#[tokio::test]
async fn doctor_names_shared_activities_for_a_parent_in_an_org_without_it() {
    let mut org = OrgSpec::demo();
    org.set_shared_activities(false);
    let emulator = start(org).await;
    let (loaded, caches, _) = load(acme(&emulator));
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    let miss = report
        .checks
        .iter()
        .find(|c| c.name == "mapping relations.EventRelation.IsParent")
        .unwrap_or_else(|| panic!("{report}"));
    assert!(!miss.ok, "{report}");
    assert!(miss.detail.contains("Shared Activities is off"), "{report}");
    let fix = miss.fix.as_deref().unwrap_or_default();
    assert!(
        fix.contains("enable Shared Activities") && fix.contains("set parent = \"none\""),
        "{report}"
    );

    let mut invitees = acme(&emulator);
    invitees.relations.as_mut().unwrap().parent = portals_crm::config::Parent::None;
    let (loaded, caches, _) = load(invitees);
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    assert!(report.ok(), "{report}");
    emulator.stop().await;
}

async fn emulator_records(emulator: &EmulatorHandle, sobject: &str) -> usize {
    let rows: serde_json::Value = reqwest::get(format!(
        "{}/__emulator/records/{sobject}",
        emulator.base_url
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    rows.as_array().unwrap().len()
}

#[tokio::test]
async fn doctor_names_the_fix_for_a_sign_in_from_outside_the_login_ip_ranges() {
    let mut org = OrgSpec::demo();
    for profile in &mut org.profiles {
        profile.login_ip_ranges = vec![portals_crm::emulator::org::IpRange {
            start: "203.0.113.10".parse().unwrap(),
            end: "203.0.113.20".parse().unwrap(),
        }];
    }
    let emulator = start(org).await;
    let (loaded, caches, _) = load(acme(&emulator));
    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    let text = report.to_string();
    assert!(!report.ok() && report.checks.len() == 2, "{text}");
    assert!(
        text.contains("[skip] the other checks: objects, mapping, version guard"),
        "{text}"
    );
    assert!(
        text.contains("[MISS] sign-in: Salesforce refused the sign-in (salesforce_auth_invalid_grant): IP restricted or invalid login hours")
            && text.contains("fix: add BookMe's egress IP addresses to the Login IP Ranges of the integration user's profile, or set the connected app's IP Relaxation to \"Relax IP restrictions\""),
        "{text}"
    );
    emulator.stop().await;
}

/// An API version the org does not offer answers 404 `NOT_FOUND` everywhere, exactly as an
/// object the user cannot see: the version list tells them apart, so neither `doctor` nor the
/// org check reports the mapped objects as invisible (and the cached describes are kept).
#[tokio::test]
async fn an_api_version_the_org_does_not_offer_is_named_not_read_as_missing_objects() {
    let emulator = start(OrgSpec::demo()).await;
    let (loaded, caches, metrics) = load(acme(&emulator));
    let hits = || {
        metrics
            .cache_requests
            .with_label_values(&["describe", "hit"])
            .get()
    };
    let before = caches
        .describe(&loaded.client, "Lead")
        .await
        .unwrap()
        .expect("Lead visible at the shipped version");

    let mut unknown = acme(&emulator);
    unknown.org.api_version = "99.0".into();
    let (unknown, _, _) = load(unknown);
    let report = check_tenant(&unknown.config, &unknown.client, &caches).await;
    let text = report.to_string();
    let version = report
        .checks
        .iter()
        .find(|c| c.name == "API version")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!version.ok, "{text}");
    assert_eq!(
        version.detail,
        "the org does not offer REST API version 99.0 (org.api_version in the tenant file); it offers 50.0 to 67.0"
    );
    assert_eq!(
        version.fix.as_deref(),
        Some("set org.api_version in the tenant file to a version the org offers, e.g. \"67.0\"")
    );
    assert!(!text.contains("not visible"), "{text}");
    assert!(
        text.contains("each need an API version the org offers"),
        "{text}"
    );

    let checked =
        portals_crm::tenants::check_against_org(&caches, &unknown.config, &unknown.client).await;
    assert!(
        matches!(
            &checked,
            Err(portals_crm::salesforce::SalesforceError::VersionNotOffered { version, .. }) if version == "99.0"
        ),
        "{checked:?}"
    );
    let hits_before = hits();
    let kept = caches.describe(&loaded.client, "Lead").await.unwrap();
    assert_eq!(hits(), hits_before + 1, "the cached describe was kept");
    assert_eq!(kept.map(|d| d.fields.len()), Some(before.fields.len()));

    let report = check_tenant(&loaded.config, &loaded.client, &caches).await;
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "API version" && c.ok && c.detail == "66.0 is offered by the org"),
        "{report}"
    );
    emulator.stop().await;
}

/// `mapping preview` prints the graph of a first write, EventRelation creates included, also
/// when the org cannot be reached (here a port that refuses connections): the user ids are
/// placeholders then, and stderr says so.
#[tokio::test]
async fn mapping_preview_prints_the_graph_with_its_relations_without_an_org() {
    // Bound, never listening, held until the end: connections to it are refused.
    let refusing = tokio::net::TcpSocket::new_v4().unwrap();
    refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = refusing.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("portals-crm-preview-{:x}", rand::random::<u64>()));
    std::fs::create_dir_all(dir.join("tenants")).unwrap();
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    std::fs::copy("config/keys/demo-jwt.key", dir.join("keys/demo-jwt.key")).unwrap();
    let acme = std::fs::read_to_string("config/tenants/acme.toml")
        .unwrap()
        .replace("http://127.0.0.1:7800", &format!("http://127.0.0.1:{port}"));
    std::fs::write(dir.join("tenants/acme.toml"), acme).unwrap();
    // An event of another tenant is previewed under --tenant, and said to be.
    let demo_event = dir.join("demo-event.json");
    std::fs::write(
        &demo_event,
        std::fs::read_to_string("tests/fixtures/events/booked-group.json")
            .unwrap()
            .replace("\"tenantid\": \"acme\"", "\"tenantid\": \"demo\""),
    )
    .unwrap();
    let preview = |event: std::path::PathBuf| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portals-crm"))
            .args(["mapping", "preview", "--config", "config/portals-crm.toml"])
            .args(["--tenant", "acme", "--event"])
            .arg(event)
            .env("PORTALS_CRM_TENANTS_DIR", dir.join("tenants"))
            .env("PORTALS_CRM_CACHE_PATH", dir.join("cache"))
            .output()
    };
    let output = preview("tests/fixtures/events/booked-group.json".into())
        .await
        .unwrap();
    let other = preview(demo_event).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: the org's user ids could not be read"),
        "{stderr}"
    );
    assert!(!stderr.contains("the event names tenant"), "{stderr}");
    let other_stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        other_stderr
            .contains("note: the event names tenant \"demo\"; previewed with \"acme\"'s mapping"),
        "{other_stderr}"
    );
    assert_eq!(other.stdout, output.stdout, "the same graph, as acme's");
    let graph: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let nodes = graph["graphs"][0]["compositeRequest"].as_array().unwrap();
    let refs: Vec<&str> = nodes
        .iter()
        .map(|n| n["referenceId"].as_str().unwrap())
        .collect();
    assert_eq!(
        refs,
        [
            "lead_0",
            "lead_1",
            "event",
            "booking",
            "rel_lead_0",
            "rel_lead_1"
        ]
    );
    assert_eq!(nodes[4]["body"]["RelationId"], "@{lead_0.id}");
    assert_eq!(nodes[2]["body"]["OwnerId"], "005000000000000AAA");
}
