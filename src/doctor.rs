//! `portals-crm doctor`: checks a tenant end to end before go-live — sign-in, API access, object
//! and field permissions of the mapping, external ids, the version guard, record-level sharing,
//! quota headroom — and says, for each miss, what the Salesforce admin must do.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;
use serde_json::json;

use crate::config::TenantConfig;
use crate::enrich::Caches;
use crate::enrich::Enrichment;
use crate::plan::CompiledMapping;
use crate::plan::validate::validate;
use crate::salesforce::client::encode_segment;
use crate::salesforce::model::{Body, Graph, GraphRequest, Subrequest};
use crate::salesforce::{SalesforceClient, SalesforceError};

/// One line of the checklist.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed. False also for a skipped check: it did not pass, it was not run.
    pub ok: bool,
    /// Not run, because a check it needs failed (`detail` says which); not counted as a fix.
    pub skipped: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: true,
        skipped: false,
        detail: detail.into(),
        fix: None,
    }
}

/// A check that was not run, so that the checklist never drops a line silently and a report
/// whose other misses are fixed does not read as complete.
fn skip(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: false,
        skipped: true,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok: false,
        skipped: false,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// The checklist of one tenant.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Tenant.
    pub tenant: String,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "tenant {}", self.tenant)?;
        for check in &self.checks {
            let mark = match (check.ok, check.skipped) {
                (true, _) => "ok  ",
                (false, true) => "skip",
                (false, false) => "MISS",
            };
            writeln!(f, "  [{mark}] {}: {}", check.name, check.detail)?;
            if let Some(fix) = &check.fix {
                writeln!(f, "         fix: {fix}")?;
            }
        }
        let misses = self.checks.iter().filter(|c| !c.ok && !c.skipped).count();
        let skipped = self.checks.iter().filter(|c| c.skipped).count();
        let n = self.checks.len();
        write!(
            f,
            "  {n} check{}, {misses} to fix",
            if n == 1 { "" } else { "s" }
        )?;
        if skipped > 0 {
            write!(f, ", {skipped} not run")?;
        }
        Ok(())
    }
}

/// The fix for a failed sign-in: a refusal's own fix (see `salesforce::signin`), or the
/// tenant's settings and the network otherwise.
fn token_fix(error: &SalesforceError) -> String {
    if let Some(refused) = error.sign_in_refused() {
        return refused.fix().to_owned();
    }
    match error {
        SalesforceError::Refused(_) => {
            "fix the tenant's auth settings (key file or env var)".into()
        }
        _ => "check the login URL and that the org is reachable from here".into(),
    }
}

/// The version guard, probed without writing anything: one graph upserts a probe booking at
/// version 2, then at version 1, then writes a field that does not exist. The graph always
/// rolls back; which node fails tells whether the validation rule is active.
async fn version_guard(client: &SalesforceClient) -> Check {
    let name = "version guard (BookMe_Version_Must_Not_Decrease)";
    let url = format!(
        "{}/sobjects/BookMe__Booking__c/BookMe__Booking_Id__c/{}",
        client.data_path(),
        encode_segment("portals-crm-doctor-probe")
    );
    let node = |reference: &str, body: serde_json::Value| Subrequest {
        method: "PATCH".into(),
        url: url.clone(),
        reference_id: reference.into(),
        body: Some(body.into()),
    };
    let request = GraphRequest {
        graphs: vec![Graph {
            graph_id: "doctor".into(),
            composite_request: vec![
                node(
                    "newer",
                    json!({"Name": "doctor probe", "BookMe__Version__c": 2}),
                ),
                node("older", json!({"BookMe__Version__c": 1})),
                node("rollback", json!({"PortalsCrmDoctorNoSuchField__c": 1})),
            ],
        }],
    };
    match client.composite_graph(&request).await {
        Ok(response) => {
            let error = response.graphs.first().and_then(|g| g.root_error());
            match error {
                Some(e) if e.message.contains("STALE_BOOKING_VERSION") => pass(
                    name,
                    "an older version is rejected (probe rolled back, nothing written)",
                ),
                Some(e) if e.error_code == "INVALID_FIELD" => fail(
                    name,
                    "an older version was accepted: the rule is missing or inactive (probe rolled back)",
                    "deploy deploy/salesforce (validation rule BookMe_Version_Must_Not_Decrease) and activate it",
                ),
                Some(e) => fail(
                    name,
                    format!("the probe failed with {}: {}", e.error_code, e.message),
                    "fix the BookMe Booking object's permissions (see the checks above), then run doctor again",
                ),
                None => fail(
                    name,
                    "the probe was not rolled back as expected",
                    "check the BookMe Booking object in Setup",
                ),
            }
        }
        Err(error) => fail(name, error.to_string(), "fix the checks above first"),
    }
}

/// The tenant's answer to the org's duplicate rules. A new org has the standard Lead duplicate
/// rule active (allow, with an alert), which refuses a Lead matching an existing Lead or
/// Contact with `DUPLICATES_DETECTED` unless the request says `allowSave=true`.
fn duplicate_rule_choice(tenant: &TenantConfig) -> Check {
    use crate::config::DuplicateRulePolicy;
    let name = "duplicate rules";
    match tenant.org.duplicate_rule {
        DuplicateRulePolicy::SaveAnyway => pass(
            name,
            "duplicate_rule = \"save_anyway\": records an alerting duplicate rule matches (the \
             standard Lead rule of a new org) are saved and show in the org's duplicate reports; \
             a rule set to Block still fails the booking (salesforce_duplicates_detected)",
        ),
        DuplicateRulePolicy::RelateToExisting => pass(
            name,
            "duplicate_rule = \"relate_to_existing\": a booking whose Lead an active duplicate \
             rule matches is written related to the matched Lead (or Contact) instead, and no \
             new Lead is created; counted in portals_crm_duplicates_related_total",
        ),
        DuplicateRulePolicy::Fail => pass(
            name,
            "duplicate_rule = \"fail\": a booking whose Lead an active duplicate rule matches \
             (the standard Lead rule is on in a new org) is dead-lettered as \
             salesforce_duplicates_detected naming the matched records",
        ),
    }
}

/// The org's active duplicate rules on the objects the mapping writes, and what the tenant's
/// choice does with each. They are read from the setup object `DuplicateRule` (`DeveloperName`,
/// `MasterLabel`, `SobjectType`, `IsActive`: API 35.0 and later), which only a user with "View
/// Setup and Configuration" may query; for anyone else Salesforce answers 400 `INVALID_TYPE`, and
/// the rules are then the admin's to check in Setup → Duplicate Rules. The object does not say
/// whether a rule blocks or alerts (that is in its metadata), so both outcomes are named.
/// <https://developer.salesforce.com/docs/atlas.en-us.object_reference.meta/object_reference/sforce_api_objects_duplicaterule.htm>
async fn duplicate_rules(tenant: &TenantConfig, client: &SalesforceClient) -> Vec<Check> {
    use crate::config::{Action, DuplicateRulePolicy};
    let mut objects: Vec<&str> = Vec::new();
    for record in tenant.records.iter().filter(|r| r.action == Action::Upsert) {
        if !objects.contains(&record.sobject.as_str()) {
            objects.push(&record.sobject);
        }
    }
    if objects.is_empty() {
        return Vec::new();
    }
    let list: Vec<String> = objects
        .iter()
        .map(|o| crate::enrich::soql_quote(o))
        .collect();
    let soql = format!(
        "SELECT DeveloperName, MasterLabel, SobjectType FROM DuplicateRule \
         WHERE IsActive = true AND SobjectType IN ({})",
        list.join(", ")
    );
    let rows = match client.query(&soql).await {
        Ok(rows) => rows,
        Err(SalesforceError::Api { errors, .. })
            if errors.iter().any(|e| e.error_code == "INVALID_TYPE") =>
        {
            return vec![pass(
                "active duplicate rules",
                "the integration user cannot read the org's duplicate rules (the DuplicateRule \
                 object needs \"View Setup and Configuration\"); the choice above applies to \
                 whatever rules Setup → Duplicate Rules shows active for Lead (a new org has the \
                 standard Lead rule on)",
            )];
        }
        Err(error) => {
            return vec![fail(
                "active duplicate rules",
                error.to_string(),
                "retry; if it persists, check the org's status",
            )];
        }
    };
    let text = |row: &serde_json::Map<String, serde_json::Value>, field: &str| {
        row.get(field)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    if rows.is_empty() {
        return vec![pass(
            "active duplicate rules",
            format!(
                "none on {}: no booking meets a duplicate rule",
                objects.join(", ")
            ),
        )];
    }
    rows.iter()
        .map(|row| {
            let sobject = text(row, "SobjectType");
            let effect = match tenant.org.duplicate_rule {
                DuplicateRulePolicy::SaveAnyway => format!(
                    "save_anyway: a {sobject} it matches is saved anyway if the rule alerts; if \
                     it blocks, the booking is dead-lettered (salesforce_duplicates_detected)"
                ),
                DuplicateRulePolicy::RelateToExisting
                    if crate::plan::duplicates::WHO_TYPES.contains(&sobject.as_str()) =>
                {
                    format!(
                        "relate_to_existing: a {sobject} it matches is not created; the booking \
                         is written related to the matched {sobject} (or, failing that, the \
                         matched Lead or Contact); the integration user needs Read on the \
                         matched object"
                    )
                }
                DuplicateRulePolicy::RelateToExisting => format!(
                    "relate_to_existing: a {sobject} it matches is written as the matched \
                     {sobject}; a match of another object fails the booking, naming it"
                ),
                DuplicateRulePolicy::Fail => format!(
                    "fail: a booking whose {sobject} it matches is dead-lettered \
                     (salesforce_duplicates_detected) naming the matched records"
                ),
            };
            pass(
                format!("duplicate rule {}", text(row, "DeveloperName")),
                format!(
                    "\"{}\" is active on {sobject}; {effect}",
                    text(row, "MasterLabel")
                ),
            )
        })
        .collect()
}

/// One line for the checks a failed first check leaves out (objects, mapping, version guard,
/// duplicate rules, sharing, quota): each needs `what`.
fn the_rest_not_run(what: &str) -> Check {
    skip(
        "the other checks",
        format!(
            "objects, mapping, version guard, duplicate rules, record sharing and API quota each need {what}"
        ),
    )
}

/// The name of the record-sharing check, run or skipped.
const SHARING: &str = "record sharing (records owned by other users)";

/// A booking the sharing probe renders through the tenant's own mapping (never committed).
fn probe_event(tenant: &str) -> Option<crate::event::BookingEvent> {
    let body = json!({
        "specversion": "1.0",
        "id": "portals-crm-doctor-sharing-probe",
        "source": "portals-crm/doctor",
        "type": "com.bookme.meeting.booked.v1",
        "time": "2026-01-01T00:00:00Z",
        "tenantid": tenant,
        "data": {
            "booking_id": "portals-crm-doctor-sharing-probe",
            "version": 1,
            "status": "booked",
            "title": "portals-crm doctor probe",
            "starts_at": "2026-01-01T10:00:00Z",
            "ends_at": "2026-01-01T10:30:00Z",
            "timezone": "UTC",
            "location": "nowhere",
            "portal": {"id": "doctor", "name": "portals-crm doctor"},
            "host": {"email": "doctor-probe-host@portals-crm.invalid", "name": "Probe Host"},
            "attendees": [{"email": "doctor-probe@portals-crm.invalid", "first_name": "Probe",
                           "last_name": "Doctor", "company": "portals-crm"}],
            "answers": {},
            "cancel_reason": null
        }
    });
    crate::event::decode(body.to_string().as_bytes(), usize::MAX).ok()
}

/// Record-level security, probed without writing anything: one graph writes the mapping's
/// records for a probe booking, each owned by another active user, then writes them all again
/// (as a replay or a reschedule would, once the records belong to the host or a sales rep), then
/// a field that does not exist. The graph always rolls back; the node that fails first says
/// which object's records the integration user cannot see or edit, and [`crate::sharing`]
/// names the fix.
async fn sharing(
    tenant: &TenantConfig,
    client: &SalesforceClient,
    caches: &Caches,
    me: &str,
) -> Check {
    let name = SHARING;
    let others = client
        .query(&format!(
            "SELECT Id FROM User WHERE IsActive = true AND Id != '{me}' LIMIT 1"
        ))
        .await;
    let other = match others {
        Ok(rows) => match rows
            .first()
            .and_then(|r| r.get("Id"))
            .and_then(|v| v.as_str())
        {
            Some(id) => id.to_owned(),
            None => {
                return pass(name, "no other active user can own records");
            }
        },
        Err(error) => return fail(name, error.to_string(), "fix the checks above first"),
    };
    let (Ok(mapping), Some(event)) = (
        CompiledMapping::compile(tenant),
        probe_event(&tenant.tenant),
    ) else {
        return fail(
            name,
            "the mapping does not render a probe booking",
            "fix the mapping (portals-crm mapping validate)",
        );
    };
    let enrichment = Enrichment {
        host_user_id: Some(other.clone()),
        integration_user_id: me.to_owned(),
    };
    let mut nodes = match mapping.build_graph(&event, &enrichment) {
        Ok(nodes) => nodes,
        Err(error) => return fail(name, error.to_string(), "fix the mapping"),
    };
    nodes.retain(|n| n.method == "PATCH");
    let mut owned_by_other = Vec::new();
    for node in &mut nodes {
        let sobject = node
            .url
            .split("/sobjects/")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_owned();
        let ownable = matches!(
            caches.describe(client, &sobject).await,
            Ok(Some(d)) if d.field("OwnerId").is_some_and(|f| f.createable)
        );
        if let (true, Some(body)) = (ownable, node.body.as_mut().and_then(Body::object_mut)) {
            body.insert("OwnerId".into(), other.clone().into());
            if !owned_by_other.contains(&sobject) {
                owned_by_other.push(sobject);
            }
        }
    }
    let again: Vec<Subrequest> = nodes
        .iter()
        .map(|n| Subrequest {
            reference_id: format!("{}_again", n.reference_id),
            ..n.clone()
        })
        .collect();
    let Some(first) = nodes.first() else {
        return pass(name, "the mapping upserts nothing");
    };
    let rollback = Subrequest {
        method: "PATCH".into(),
        url: first.url.clone(),
        reference_id: "rollback".into(),
        body: Some(json!({"PortalsCrmDoctorNoSuchField__c": 1}).into()),
    };
    let mut sent = nodes;
    sent.extend(again);
    sent.push(rollback);
    let request = GraphRequest {
        graphs: vec![Graph {
            graph_id: "doctor_sharing".into(),
            composite_request: sent.clone(),
        }],
    };
    match client.composite_graph(&request).await {
        Ok(response) => {
            let Some(result) = response.graphs.first() else {
                return fail(name, "no graph in the answer", "run doctor again");
            };
            if let Some(problem) = crate::sharing::diagnose(client, caches, result, &sent).await {
                return fail(name, problem.condition(), problem.fix());
            }
            match result.root_error() {
                Some(e) if e.message.contains("PortalsCrmDoctorNoSuchField__c") => pass(
                    name,
                    format!(
                        "the integration user sees and edits {} records owned by another user \
                         (probe rolled back, nothing written)",
                        owned_by_other.join(", ")
                    ),
                ),
                Some(e) => fail(
                    name,
                    format!("the probe failed with {}: {}", e.error_code, e.message),
                    "fix the checks above, then run doctor again",
                ),
                None => fail(
                    name,
                    "the probe was not rolled back as expected",
                    "check the mapped objects in Setup",
                ),
            }
        }
        Err(error) => fail(name, error.to_string(), "fix the checks above first"),
    }
}

/// Runs every check for one tenant.
pub async fn check_tenant(
    tenant: &TenantConfig,
    client: &SalesforceClient,
    caches: &Caches,
) -> Report {
    let mut checks = Vec::new();
    let me = match client.token().await {
        Ok(token) => {
            checks.push(pass(
                "sign-in",
                format!("token for the integration user (User Id {})", token.user_id),
            ));
            token.user_id.clone()
        }
        Err(error) => {
            let detail = match error.sign_in_refused() {
                Some(refused) => refused.to_string(),
                None => error.to_string(),
            };
            checks.push(fail("sign-in", detail, token_fix(&error)));
            checks.push(the_rest_not_run("a session, and the sign-in failed"));
            return Report {
                tenant: tenant.tenant.clone(),
                checks,
            };
        }
    };
    match client.check_api_version().await {
        Ok(()) => checks.push(pass(
            "API version",
            format!("{} is offered by the org", client.api_version()),
        )),
        Err(error) => {
            let (fix, stop) = match &error {
                SalesforceError::VersionNotOffered { offered, .. } => (
                    format!(
                        "set org.api_version in the tenant file to a version the org offers{}",
                        offered
                            .last()
                            .map_or_else(String::new, |v| format!(", e.g. \"{v}\""))
                    ),
                    true,
                ),
                _ => (
                    "retry; if it persists, check the org's status".to_owned(),
                    false,
                ),
            };
            checks.push(fail("API version", error.to_string(), fix));
            // Every other check would fail with the same 404.
            if stop {
                checks.push(the_rest_not_run("an API version the org offers"));
                return Report {
                    tenant: tenant.tenant.clone(),
                    checks,
                };
            }
        }
    }
    let global = match client.describe_global().await {
        Ok(global) => {
            checks.push(pass(
                "API access",
                format!("{} objects visible", global.sobjects.len()),
            ));
            global
        }
        Err(error) => {
            checks.push(fail(
                "API access",
                error.to_string(),
                "enable \"API Enabled\" for the integration user (permission set or profile)",
            ));
            checks.push(the_rest_not_run("API access"));
            return Report {
                tenant: tenant.tenant.clone(),
                checks,
            };
        }
    };
    let mut describes = HashMap::new();
    let mut objects: Vec<&str> = tenant.records.iter().map(|r| r.sobject.as_str()).collect();
    objects.dedup();
    for object in objects {
        let entry = global.sobjects.iter().find(|o| o.name == object);
        let name = format!("object {object}");
        match entry {
            Some(o) if o.createable && o.updateable => {
                checks.push(pass(name, "read, create and edit"));
            }
            Some(_) => checks.push(fail(
                name,
                "visible but not both creatable and editable",
                format!("grant Create and Edit on {object} to the integration user's permission set"),
            )),
            None => checks.push(fail(
                name,
                "not visible to the integration user",
                format!("install deploy/salesforce if {object} is a BookMe object, and grant Read, Create, Edit on it"),
            )),
        }
        match caches.describe(client, object).await {
            Ok(Some(describe)) => {
                describes.insert(object.to_owned(), describe);
            }
            Ok(None) => {}
            Err(error) => checks.push(fail(
                format!("describe {object}"),
                error.to_string(),
                "retry; if it persists, check the org's status",
            )),
        }
    }
    // Only for the mapping's checks (its parent needs `IsParent`, see `validate`): relations
    // follow the Event's permissions, checked above.
    if tenant.described_sobjects().contains(&"EventRelation")
        && let Ok(Some(describe)) = caches.describe(client, "EventRelation").await
    {
        // Off, `validate` names it with its fixes; on, say so, as the other org settings are.
        if describe.field("IsParent").is_some() {
            checks.push(pass(
                "org setting Shared Activities",
                "on: EventRelation has IsParent, which relations.parent = \"first\" writes",
            ));
        }
        describes.insert("EventRelation".to_owned(), describe);
    }
    for warning in crate::plan::org_settings::warnings(tenant, &describes) {
        checks.push(pass(
            format!("org setting {}", warning.setting),
            warning.to_string(),
        ));
    }
    let problems = validate(tenant, &describes);
    let mapping_ok = problems.is_empty();
    if problems.is_empty() {
        let fields: usize = tenant.records.iter().map(|r| r.fields.len()).sum();
        checks.push(pass(
            "mapping",
            format!(
                "{fields} mapped fields writable, external ids present, required fields mapped"
            ),
        ));
    }
    for problem in problems {
        checks.push(fail(
            format!("mapping {}.{}", problem.record, problem.target),
            problem.problem,
            problem.fix,
        ));
    }
    if describes.contains_key("BookMe__Booking__c") {
        checks.push(version_guard(client).await);
    }
    checks.push(duplicate_rule_choice(tenant));
    checks.extend(duplicate_rules(tenant, client).await);
    if mapping_ok {
        checks.push(sharing(tenant, client, caches, &me).await);
    } else {
        // The probe writes through the mapping; with a mapping miss it would only repeat it.
        checks.push(skip(
            SHARING,
            "its probe writes through the mapping, which has a miss above",
        ));
    }
    match client.limits().await {
        Ok(limits) => match limits.get("DailyApiRequests") {
            Some(daily) if daily.max > 0 => {
                let used = (daily.max - daily.remaining) as f64 / daily.max as f64;
                let share = tenant.limits.api_quota_share;
                let detail = format!(
                    "{} of {} daily API requests left; portals-crm may use up to {:.0} %",
                    daily.remaining,
                    daily.max,
                    share * 100.0
                );
                if used < share {
                    checks.push(pass("API quota headroom", detail));
                } else {
                    checks.push(fail(
                        "API quota headroom",
                        detail,
                        "raise limits.api_quota_share, reduce other integrations' usage, or buy API add-ons",
                    ));
                }
            }
            _ => checks.push(fail(
                "API quota headroom",
                "no DailyApiRequests in /limits",
                "grant \"View Setup and Configuration\" so the integration user can read /limits",
            )),
        },
        Err(error) => checks.push(fail(
            "API quota headroom",
            error.to_string(),
            "grant \"View Setup and Configuration\" so the integration user can read /limits",
        )),
    }
    Report {
        tenant: tenant.tenant.clone(),
        checks,
    }
}

/// The rollback probe for a mapping not yet live: `nodes` (a graph the mapping built for a
/// sample event) sent as one Composite Graph with a last node that writes a field no org has,
/// so the graph always rolls back and nothing is written. Every mapping node passed when the
/// graph failed at that last node; otherwise the first node that failed is named with
/// Salesforce's error.
/// <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_graph_introduction.htm>
pub async fn probe_mapping(client: &SalesforceClient, mut nodes: Vec<Subrequest>) -> Check {
    let name = "test against the org (rolled back, nothing written)";
    let url = format!(
        "{}/sobjects/BookMe__Booking__c/BookMe__Booking_Id__c/{}",
        client.data_path(),
        encode_segment("portals-crm-console-probe")
    );
    nodes.push(Subrequest {
        method: "PATCH".into(),
        url,
        reference_id: "portals_crm_rollback".into(),
        body: Some(json!({"PortalsCrmDoctorNoSuchField__c": 1}).into()),
    });
    let count = nodes.len() - 1;
    let request = GraphRequest {
        graphs: vec![Graph {
            graph_id: "console_probe".into(),
            composite_request: nodes,
        }],
    };
    let response = match client.composite_graph(&request).await {
        Ok(response) => response,
        Err(error) => {
            return fail(
                name,
                error.to_string(),
                "fix the sign-in and API checks first",
            );
        }
    };
    let Some(graph) = response.graphs.first() else {
        return fail(name, "the org answered no graph", "run the checks page");
    };
    let failed = graph
        .graph_response
        .composite_response
        .iter()
        .find(|node| node.node_error().is_some_and(|e| !e.is_placeholder()));
    match failed {
        Some(node) if node.reference_id == "portals_crm_rollback" => pass(
            name,
            format!("all {count} records of the graph were accepted, then rolled back"),
        ),
        Some(node) => {
            let error = node.node_error();
            let (code, message) =
                error.map_or_else(Default::default, |e| (e.error_code, e.message));
            // A relation node is no record of the editor: say where it comes from.
            let fix = if node
                .reference_id
                .starts_with(crate::plan::relations::NODE_PREFIX)
            {
                "this is an EventRelation that [relations] creates: with parent = \"first\" the \
                 org needs Shared Activities (its IsParent field; the mapping check names it), \
                 and relations follow the Event's permissions (Edit Events)"
            } else {
                "fix the field the message names (see the problems at that record), then test again"
            };
            fail(
                name,
                format!(
                    "record {} was refused: {code}: {message}",
                    node.reference_id
                ),
                fix,
            )
        }
        None => fail(
            name,
            "the probe was not rolled back as expected",
            "check the BookMe Booking object in Setup",
        ),
    }
}
