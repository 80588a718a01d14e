//! The admin API and the Management console on the service port, above the pipeline.
//!
//! JSON routes under `/admin` (each the twin of a CLI command, see README) and the console's
//! pages under `/ui` ([`console`]). Who may call them, and the Origin check every
//! state-changing request passes, are in [`access`]. Request bodies are limited to
//! [`MAX_BODY_BYTES`].

pub mod access;
pub mod causes;
pub mod console;
pub mod dead_letters;
pub mod health;
pub mod mapping_file;
pub mod superseded;
pub mod twin;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use access::AdminAccess;

use crate::config::TenantConfig;
use crate::doctor::{self, Check};
use crate::plan::CompiledMapping;
use crate::plan::samples;
use crate::plan::validate::{MappingProblem, constant_problem};
use crate::salesforce::model::{Body, Graph, GraphRequest};
use crate::salesforce::signin::SignInRefused;
use crate::telemetry::logging::mask_email;
use crate::telemetry::metrics::Metrics;
use crate::tenants::{Registry, Reloader, Tenant, check_against_org, recheck};
use mapping_file::MappingModel;

/// The largest request body the admin API and the console accept: a tenant file or a pasted
/// event is a few KiB; an event is at most the worker's 256 KiB.
pub const MAX_BODY_BYTES: usize = 512 * 1024;

/// What the admin routes and the console share.
#[derive(Clone)]
pub struct AdminState {
    tenants: Arc<Registry>,
    reloader: Reloader,
    metrics: Arc<Metrics>,
    tenants_dir: PathBuf,
    gate: access::Gate,
    dlq: dead_letters::DlqSource,
    sampler: Arc<health::Sampler>,
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

/// A refused admin request: its status and why, answered as `{"error": …}`.
pub struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl AdminState {
    fn tenant(&self, name: &str) -> Result<Arc<Tenant>, Refusal> {
        self.tenants
            .get(name)
            .ok_or_else(|| Refusal(StatusCode::NOT_FOUND, format!("no tenant {name}")))
    }

    /// The file the running tenant came from, if it came from one.
    fn file_of(&self, tenant: &Tenant) -> Option<PathBuf> {
        let source = tenant.config.source.as_ref()?;
        Some(self.tenants_dir.join(format!("{}.toml", source.file)))
    }
}

/// A refused sign-in, as the overview shows it.
#[derive(Debug, Serialize)]
pub struct SignInView {
    /// `salesforce_auth_<error>` (the reason label of `portals_crm_salesforce_auth_refused`).
    pub reason: &'static str,
    /// Salesforce's `error_description`, verbatim.
    pub description: String,
    /// What to do: the fix `portals-crm doctor` gives.
    pub fix: &'static str,
}

impl From<SignInRefused> for SignInView {
    fn from(refused: SignInRefused) -> Self {
        Self {
            reason: refused.reason_code(),
            fix: refused.fix(),
            description: refused.description,
        }
    }
}

/// One tenant's health, as the overview shows it.
#[derive(Debug, Serialize)]
pub struct TenantHealth {
    /// Tenant id.
    pub tenant: String,
    /// OAuth login URL.
    pub login_url: String,
    /// `jwt_bearer` or `client_credentials`.
    pub flow: &'static str,
    /// REST API version.
    pub api_version: String,
    /// `ref → sObject` of each record, in order.
    pub records: Vec<(String, String)>,
    /// The file on disk does not load: the problems, while the running (last good) copy stays.
    pub rejected_file: Vec<String>,
    /// The mapping's problems against the org (permission drift) at the last check.
    pub drift: Vec<MappingProblem>,
    /// The org could not be asked at the last check.
    pub org_error: Option<String>,
    /// When the org was last checked (UTC, RFC 3339): at start, by the periodic re-check
    /// (`cache.describe_refresh_secs`), at a reload, or on demand.
    pub checked_at: String,
    /// The tenant's circuit is open (paused).
    pub circuit_open: bool,
    /// Salesforce refuses the integration user's sign-in (the tenant is paused until it works).
    pub sign_in_refused: Option<SignInView>,
    /// Share of the org's daily API requests used, as last reported by the org (0–1).
    pub api_used: Option<f64>,
    /// The share above which the tenant is paused.
    pub api_quota_share: f64,
}

/// The health of every tenant: file state, drift (the last check against the org, which runs
/// once here only for a tenant not checked since the start), circuit, refused sign-in, quota.
pub async fn overview(state: &AdminState) -> Vec<TenantHealth> {
    let mut out = Vec::new();
    for tenant in state.tenants.all() {
        let config = &tenant.config;
        let rejected_file = match state.file_of(&tenant) {
            Some(path) => match TenantConfig::load(&path) {
                Ok(on_disk) => CompiledMapping::compile(&on_disk).err().unwrap_or_default(),
                Err(problem) => vec![problem],
            },
            None => Vec::new(),
        };
        let last = match state.tenants.org_checks().get(&config.tenant) {
            Some(last) => last,
            None => recheck(&state.tenants, &tenant).await,
        };
        out.push(TenantHealth {
            tenant: config.tenant.clone(),
            login_url: config.org.login_url.clone(),
            flow: match config.auth {
                crate::config::AuthConfig::JwtBearer { .. } => "jwt_bearer",
                crate::config::AuthConfig::ClientCredentials { .. } => "client_credentials",
            },
            api_version: config.org.api_version.clone(),
            records: config
                .records
                .iter()
                .map(|r| (r.reference.clone(), r.sobject.clone()))
                .collect(),
            rejected_file,
            drift: last.problems,
            org_error: last.org_error,
            checked_at: last.at,
            circuit_open: state
                .metrics
                .circuit_open
                .with_label_values(&[config.tenant.as_str()])
                .get()
                > 0,
            sign_in_refused: tenant.breaker.refused_sign_in().map(SignInView::from),
            api_used: tenant.client.api_usage().map(|u| u.ratio()),
            api_quota_share: config.limits.api_quota_share,
        });
    }
    out
}

/// `POST /admin/tenants/{tenant}/recheck`: checks the tenant's mapping against its org now
/// (the overview otherwise shows the last periodic check); the new last check.
async fn recheck_tenant(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let last = recheck(&state.tenants, &t).await;
    axum::Json(json!({
        "tenant": tenant,
        "checked_at": last.at,
        "valid": last.org_error.is_none() && last.problems.is_empty(),
        "problems": last.problems.iter().map(ProblemView::from).collect::<Vec<_>>(),
        "org_error": last.org_error,
        "sign_in_refused": t.breaker.refused_sign_in().map(SignInView::from),
    }))
    .into_response()
}

async fn list_tenants(State(state): State<AdminState>) -> Response {
    axum::Json(overview(&state).await).into_response()
}

async fn sobjects(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match t.client.describe_global().await {
        Ok(global) => axum::Json(global.sobjects).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

async fn fields(
    State(state): State<AdminState>,
    Path((tenant, sobject)): Path<(String, String)>,
) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    match state.tenants.caches().describe(&t.client, &sobject).await {
        Ok(Some(describe)) => axum::Json(describe.fields).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("the integration user of {tenant} cannot see {sobject}"),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// The editor's view of a tenant's mapping.
async fn mapping(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let Some(source) = &t.config.source else {
        return error(
            StatusCode::CONFLICT,
            "this tenant was not loaded from a file, so there is no file to edit",
        );
    };
    match mapping_file::read(&source.text) {
        Ok(model) => axum::Json(json!({"mapping": model, "file": source.text})).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

/// A proposed mapping: the running file with the editor's records.
struct Proposal {
    text: String,
    config: TenantConfig,
}

fn propose(state: &AdminState, tenant: &Tenant, model: &MappingModel) -> Result<Proposal, Refusal> {
    let Some(source) = &tenant.config.source else {
        return Err(Refusal(
            StatusCode::CONFLICT,
            "this tenant was not loaded from a file, so there is no file to edit".into(),
        ));
    };
    let text = mapping_file::write(&source.text, model)
        .map_err(|e| Refusal(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let mut config = TenantConfig::parse(
        crate::config::TenantSource {
            file: source.file.clone(),
            text: text.clone(),
        },
        &format!("{}.toml (proposed)", source.file),
    )
    .map_err(|e| Refusal(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    config.resolve_paths(&state.tenants_dir);
    Ok(Proposal { text, config })
}

/// A problem as the console and scripts read it: the record, the field, what, the fix.
#[derive(Debug, Clone, Serialize)]
pub struct ProblemView {
    /// Record ref (empty: the whole mapping).
    pub record: String,
    /// The field of the record, if the problem is about one.
    pub field: Option<String>,
    /// `Object.Field`.
    pub target: String,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

impl From<&MappingProblem> for ProblemView {
    fn from(p: &MappingProblem) -> Self {
        Self {
            record: p.record.clone(),
            field: p.field().map(str::to_owned),
            target: p.target.clone(),
            problem: p.problem.clone(),
            fix: p.fix.clone(),
        }
    }
}

/// Every problem of `config`: compile, then against the org (which includes the samples).
/// `Err` when the org could not be asked.
async fn problems_of(
    state: &AdminState,
    tenant: &Tenant,
    config: &TenantConfig,
) -> Result<Vec<MappingProblem>, String> {
    let mut problems = CompiledMapping::check(config).err().unwrap_or_default();
    let found = check_against_org(state.tenants.caches(), config, &tenant.client)
        .await
        .map_err(|e| format!("the org could not be asked: {e}"))?;
    problems.extend(found);
    Ok(problems)
}

fn problems_answer(problems: &[MappingProblem]) -> Value {
    json!({
        "valid": problems.is_empty(),
        "problems": problems.iter().map(ProblemView::from).collect::<Vec<_>>(),
    })
}

/// Body: a proposed tenant file (TOML), or the editor's mapping (JSON). Answer: every problem,
/// each with record, field, problem and fix.
async fn validate(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let config = if json_body {
        let model: MappingModel = match serde_json::from_str(&body) {
            Ok(m) => m,
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        match propose(&state, &t, &model) {
            Ok(p) => p.config,
            Err(response) => return response.into_response(),
        }
    } else {
        match toml::from_str::<TenantConfig>(&body) {
            Ok(mut c) => {
                c.tenant = tenant.clone();
                c
            }
            Err(e) => {
                return axum::Json(json!({"valid": false, "problems": [{
                    "record": "", "field": null, "target": "", "problem": e.to_string(),
                    "fix": "correct the TOML"}]}))
                .into_response();
            }
        }
    };
    match problems_of(&state, &t, &config).await {
        Ok(problems) => axum::Json(problems_answer(&problems)).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

/// The body of preview, probe, diff and save.
#[derive(Debug, Deserialize)]
struct Proposed {
    /// The editor's mapping; the running one when absent.
    #[serde(default)]
    mapping: Option<MappingModel>,
    /// A built-in sample event's name (`booked`, `booked-group`, `rescheduled`, `cancelled`).
    #[serde(default)]
    sample: Option<String>,
    /// A pasted CloudEvent (JSON text), instead of a sample.
    #[serde(default)]
    event: Option<String>,
    /// The id of one of the tenant's dead letters: its body is the event (read without
    /// consuming it). Preview only.
    #[serde(default)]
    dead_letter: Option<String>,
    /// Show a dead letter's emails and phone numbers in the preview unmasked.
    #[serde(default)]
    reveal: bool,
}

fn proposed_config(state: &AdminState, t: &Tenant, body: &Proposed) -> Result<Proposal, Refusal> {
    match &body.mapping {
        Some(model) => propose(state, t, model),
        None => Ok(Proposal {
            text: t
                .config
                .source
                .as_ref()
                .map(|s| s.text.clone())
                .unwrap_or_default(),
            config: t.config.clone(),
        }),
    }
}

/// The tenant and its proposed mapping, compiled; the answer to give when either fails.
fn compiled_proposal(
    state: &AdminState,
    tenant: &str,
    body: &Proposed,
) -> Result<(Arc<Tenant>, CompiledMapping), Box<Response>> {
    let t = state
        .tenant(tenant)
        .map_err(|r| Box::new(r.into_response()))?;
    let proposal = proposed_config(state, &t, body).map_err(|r| Box::new(r.into_response()))?;
    match CompiledMapping::check(&proposal.config) {
        Ok(mapping) => Ok((t, mapping)),
        Err(problems) => Err(Box::new(
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(problems_answer(&problems)),
            )
                .into_response(),
        )),
    }
}

/// The graph of the proposed mapping for the chosen event, with each value checked against
/// its field's describe.
async fn preview(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    axum::Json(body): axum::Json<Proposed>,
) -> Response {
    let (t, mapping) = match compiled_proposal(&state, &tenant, &body) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let chosen = match chosen_event(&state, &tenant, &body).await {
        Ok(chosen) => chosen,
        Err(refused) => return refused.into_response(),
    };
    let mut event = chosen.event;
    event.tenant = tenant.clone();
    let enrichment = crate::enrich::enrich(&event, &t.client, state.tenants.caches())
        .await
        .unwrap_or_else(|_| samples::sample_enrichment());
    let nodes = match mapping.first_write_graph(&event, &enrichment) {
        Ok(nodes) => nodes,
        Err(e) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"error": e.to_string(), "record": e.record, "field": e.field})),
            )
                .into_response();
        }
    };
    let mut records = Vec::new();
    let mut nodes = nodes;
    for node in &mut nodes {
        let sobject = node.url.split('/').nth(5).unwrap_or_default().to_owned();
        let describe = state
            .tenants
            .caches()
            .describe(&t.client, &sobject)
            .await
            .ok()
            .flatten();
        let mut fields = Vec::new();
        if let Some(body) = node.body.as_mut().and_then(Body::object_mut) {
            for (name, value) in body.iter_mut() {
                let field = describe.as_ref().and_then(|d| d.field(name));
                let reference = value.as_str().is_some_and(|s| s.starts_with("@{"));
                let problem = match field {
                    None => Some("the integration user cannot see this field".to_owned()),
                    Some(_) if reference => None,
                    Some(f) => constant_problem(f, value),
                };
                // Judged on the real value, shown masked when it is a real booking's.
                if chosen.masked && !reference {
                    *value = masked(value, field.map(|f| f.field_type.as_str()));
                }
                fields.push(json!({
                    "field": name,
                    "value": value,
                    "type": field.map(|f| f.field_type.clone()),
                    "length": field.map(|f| f.length),
                    "fits": problem.is_none(),
                    "why": problem,
                }));
            }
        }
        if chosen.masked {
            node.url = mask_emails(&node.url, '/');
        }
        records.push(json!({
            "reference_id": node.reference_id,
            "method": node.method,
            "url": node.url,
            "sobject": sobject,
            "fields": fields,
        }));
    }
    let graph = GraphRequest {
        graphs: vec![Graph {
            graph_id: "g0".into(),
            composite_request: nodes,
        }],
    };
    axum::Json(json!({
        "records": records,
        "graph": graph,
        "source": chosen.source,
        "masked": chosen.masked,
    }))
    .into_response()
}

/// A dead letter's rendered value as the preview shows it: a dead letter is a customer's real
/// booking, so (as on the dead-letter page) a phone field's value is masked whole and any email
/// address in text is masked; dates and numbers stay readable.
fn masked(value: &Value, field_type: Option<&str>) -> Value {
    match (value, field_type) {
        (Value::String(_), Some("phone")) => json!("[phone]"),
        (Value::String(text), _) => json!(mask_emails(text, ' ')),
        _ => value.clone(),
    }
}

/// `text` with each `separator`-separated part that holds an email address masked (a URL's
/// external-id segment, a word).
fn mask_emails(text: &str, separator: char) -> String {
    text.split(separator)
        .map(|part| {
            if part.contains('@') {
                mask_email(part)
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(&separator.to_string())
}

/// The event a preview renders, and where it came from.
struct ChosenEvent {
    event: crate::event::BookingEvent,
    /// In words, for the page: "sample booked", "the pasted event", "dead letter <id> …".
    source: String,
    /// Whether the rendered values are to be masked (a dead letter's, unless revealed).
    masked: bool,
}

/// The preview's event: a dead letter of `tenant` (read without consuming), a pasted event, or
/// a built-in sample (`booked` when none is named).
async fn chosen_event(
    state: &AdminState,
    tenant: &str,
    body: &Proposed,
) -> Result<ChosenEvent, Refusal> {
    let decode = |text: &str, what: &str| {
        crate::event::decode(text.as_bytes(), crate::event::DEFAULT_MAX_BODY_BYTES)
            .map_err(|e| Refusal(StatusCode::UNPROCESSABLE_ENTITY, format!("{what}: {e}")))
    };
    if let Some(id) = body.dead_letter.as_deref().filter(|id| !id.is_empty()) {
        let letter = dead_letters::with_ids(&state.dlq, Some(tenant), &[id.to_owned()])
            .await
            .map_err(|e| Refusal(StatusCode::BAD_GATEWAY, e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Refusal(
                    StatusCode::NOT_FOUND,
                    format!("no dead letter {id} of tenant {tenant} (replayed or purged since?)"),
                )
            })?;
        return Ok(ChosenEvent {
            event: decode(&letter.body, &format!("the body of dead letter {id}"))?,
            source: format!(
                "the body of dead letter {id} ({}, last failed {}){}",
                letter.reason,
                letter
                    .last_failure
                    .as_deref()
                    .unwrap_or("at an unknown time"),
                if body.reveal {
                    ""
                } else {
                    "; emails and phone numbers masked"
                }
            ),
            masked: !body.reveal,
        });
    }
    if let Some(text) = &body.event {
        return Ok(ChosenEvent {
            event: decode(text, "the event")?,
            source: "the pasted event".into(),
            masked: false,
        });
    }
    let name = body.sample.as_deref().unwrap_or("booked");
    match samples::sample(name) {
        Some(event) => Ok(ChosenEvent {
            event,
            source: format!("sample {name}"),
            masked: false,
        }),
        None => Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("no sample event {name:?}"),
        )),
    }
}

/// The doctor's rollback probe for the proposed mapping and a sample event: nothing written.
async fn probe(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    axum::Json(body): axum::Json<Proposed>,
) -> Response {
    let (t, mapping) = match compiled_proposal(&state, &tenant, &body) {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let name = body.sample.as_deref().unwrap_or("booked");
    let Some(mut event) = samples::sample(name) else {
        return error(StatusCode::NOT_FOUND, format!("no sample event {name:?}"));
    };
    event.tenant = tenant.clone();
    // Its own booking id: the probe never meets a real booking's version guard.
    event.booking.booking_id = "portals-crm-console-probe".into();
    let enrichment = crate::enrich::enrich(&event, &t.client, state.tenants.caches())
        .await
        .unwrap_or_else(|_| samples::sample_enrichment());
    // As a first write sends it: with the relation creates of `[relations]`, so that the
    // probe meets what the org refuses of those too (no Shared Activities, no Edit Events).
    let check: Check = match mapping.first_write_graph(&event, &enrichment) {
        Ok(nodes) => doctor::probe_mapping(&t.client, nodes).await,
        Err(e) => Check {
            name: "test against the org".into(),
            ok: false,
            skipped: false,
            detail: e.to_string(),
            fix: Some(format!("fix record {}, field {}", e.record, e.field)),
        },
    };
    axum::Json(check).into_response()
}

/// The diff proposed vs running, and the proposal's problems.
async fn diff(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    axum::Json(body): axum::Json<Proposed>,
) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let proposal = match proposed_config(&state, &t, &body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let running = t
        .config
        .source
        .as_ref()
        .map(|s| s.text.as_str())
        .unwrap_or_default();
    let mut answer = match problems_of(&state, &t, &proposal.config).await {
        Ok(problems) => problems_answer(&problems),
        Err(e) => return error(StatusCode::BAD_GATEWAY, e),
    };
    answer["diff"] = json!(mapping_file::diff(running, &proposal.text));
    answer["file"] = json!(proposal.text);
    axum::Json(answer).into_response()
}

/// Saves the proposed mapping (refused while it has problems), then reloads every tenant.
async fn save(
    State(state): State<AdminState>,
    Path(tenant): Path<String>,
    axum::Json(body): axum::Json<Proposed>,
) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    if body.mapping.is_none() {
        return error(StatusCode::BAD_REQUEST, "mapping: required");
    }
    let proposal = match proposed_config(&state, &t, &body) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    match problems_of(&state, &t, &proposal.config).await {
        Ok(problems) if problems.is_empty() => {}
        Ok(problems) => {
            let mut answer = problems_answer(&problems);
            answer["saved"] = json!(false);
            return (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(answer)).into_response();
        }
        Err(e) => return error(StatusCode::BAD_GATEWAY, format!("not saved: {e}")),
    }
    let Some(path) = state.file_of(&t) else {
        return error(
            StatusCode::CONFLICT,
            "this tenant was not loaded from a file",
        );
    };
    if let Err(e) = mapping_file::save(&path, &proposal.text) {
        let status = if e.read_only() {
            StatusCode::CONFLICT
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return (
            status,
            axum::Json(json!({
                "saved": false,
                "read_only": e.read_only(),
                "why": format!("the tenants directory cannot be written ({e}); it is probably mounted read-only (a Kubernetes ConfigMap): download the file and apply it where the directory comes from"),
                "file": proposal.text,
            })),
        )
            .into_response();
    }
    match state.reloader.reload().await {
        Ok(names) => axum::Json(json!({"saved": true, "reloaded": names})).into_response(),
        Err(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"saved": true, "reloaded": [], "reload_problems": problems})),
        )
            .into_response(),
    }
}

async fn doctor_report(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let report = doctor::check_tenant(&t.config, &t.client, state.tenants.caches()).await;
    axum::Json(json!({"tenant": report.tenant, "ok": report.ok(), "checks": report.checks}))
        .into_response()
}

async fn reload(State(state): State<AdminState>) -> Response {
    match state.reloader.reload().await {
        Ok(names) => axum::Json(json!({"reloaded": names})).into_response(),
        Err(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"reloaded": [], "problems": problems})),
        )
            .into_response(),
    }
}

/// `GET /admin/dead-letters?tenant=&reason=&since=&until=&q=&ids=`: the groups with their
/// causes re-checked against the org, and the dead letters; nothing is consumed.
async fn dead_letter_list(
    State(state): State<AdminState>,
    Query(query): Query<dead_letters::Query>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = query.with_id_pairs(raw.as_deref());
    if let Err(problem) = query.check() {
        return error(StatusCode::BAD_REQUEST, problem);
    }
    match dead_letters::matching(&state.dlq, &query).await {
        Ok(letters) => {
            let listing = dead_letters::listing(&state, &letters).await;
            axum::Json(json!({
                "groups": listing.groups,
                "letters": listing.letters,
                "cli": dead_letters::cli_twin("list", &query),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `GET /admin/dead-letters/export?…`: the matching dead letters as JSON lines, whole (as
/// `portals-crm dlq export` writes them); nothing is consumed.
async fn dead_letter_export(
    State(state): State<AdminState>,
    Query(query): Query<dead_letters::Query>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = query.with_id_pairs(raw.as_deref());
    if let Err(problem) = query.check() {
        return error(StatusCode::BAD_REQUEST, problem);
    }
    match dead_letters::matching(&state.dlq, &query).await {
        Ok(letters) => {
            let mut out = String::new();
            for letter in &letters {
                if let Ok(line) = serde_json::to_string(letter) {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            (
                [
                    (header::CONTENT_TYPE, "application/x-ndjson"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"dead-letters.jsonl\"",
                    ),
                ],
                out,
            )
                .into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

#[derive(Debug, Deserialize)]
struct Reveal {
    #[serde(default)]
    reveal: Option<String>,
}

impl Reveal {
    fn asked(&self) -> bool {
        matches!(self.reveal.as_deref(), Some("1" | "true" | "yes"))
    }
}

/// `GET /admin/dead-letters/{id}?reveal=1`: one dead letter in full, its body masked unless
/// `reveal`.
async fn dead_letter_show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(reveal): Query<Reveal>,
) -> Response {
    match dead_letters::detail(&state, &state.dlq, &id, reveal.asked()).await {
        Ok(detail) => axum::Json(detail).into_response(),
        Err(crate::dlq::DlqError::NotFound(id)) => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {id}"),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `POST /admin/dead-letters/replay {"ids": […], "override": false}`: re-checks each cause,
/// replays those whose cause is gone (all with the override).
async fn dead_letter_replay(
    State(state): State<AdminState>,
    axum::Json(request): axum::Json<dead_letters::ReplayRequest>,
) -> Response {
    match dead_letters::replay(&state, &state.dlq, &request).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `POST /admin/dead-letters/purge {"ids": […], "confirm": "purge <n>"}`.
async fn dead_letter_purge(
    State(state): State<AdminState>,
    axum::Json(request): axum::Json<dead_letters::PurgeRequest>,
) -> Response {
    if request.ids.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "ids: choose at least one dead letter",
        );
    }
    let selected = match dead_letters::with_ids(&state.dlq, None, &request.ids).await {
        Ok(letters) => letters.len(),
        Err(e) => return error(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    let expected = request.expected(selected);
    if request.confirm.trim() != expected {
        let shared = if selected > request.ids.len() {
            format!(
                "; these ids select {selected} dead letters now (some share an id, also with letters the page's filter hid)"
            )
        } else {
            String::new()
        };
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("confirm: type \"{expected}\" to purge{shared}; purging cannot be undone"),
        );
    }
    match dead_letters::purge(&state.dlq, request.ids).await {
        Ok((purged, missing)) => {
            axum::Json(json!({"purged": purged, "missing": missing})).into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// `GET /admin/health`: per tenant the rates, lag, circuit, quota and last write; the queues'
/// depths and consumers.
async fn health_report(State(state): State<AdminState>) -> Response {
    axum::Json(health::health(&state.sampler, &state.metrics, &state.tenants, &state.dlq).await)
        .into_response()
}

/// The admin API and the console, behind the access rule and the Origin check. `dlq` is where
/// the dead-letter queue is (a connection is opened per request that needs it).
pub fn router(
    tenants: Arc<Registry>,
    reloader: Reloader,
    metrics: Arc<Metrics>,
    tenants_dir: PathBuf,
    access: AdminAccess,
    dlq: dead_letters::DlqSource,
) -> Router {
    let gate = access::Gate::new(access);
    let state = AdminState {
        tenants,
        reloader,
        metrics,
        tenants_dir,
        gate: gate.clone(),
        dlq,
        sampler: Arc::new(health::Sampler::default()),
    };
    Router::new()
        .route("/admin/tenants", get(list_tenants))
        .route("/admin/tenants/{tenant}/sobjects", get(sobjects))
        .route(
            "/admin/tenants/{tenant}/sobjects/{sobject}/fields",
            get(fields),
        )
        .route("/admin/tenants/{tenant}/mapping", get(mapping).post(save))
        .route("/admin/tenants/{tenant}/validate", post(validate))
        .route("/admin/tenants/{tenant}/preview", post(preview))
        .route("/admin/tenants/{tenant}/probe", post(probe))
        .route("/admin/tenants/{tenant}/diff", post(diff))
        .route("/admin/tenants/{tenant}/doctor", get(doctor_report))
        .route("/admin/tenants/{tenant}/recheck", post(recheck_tenant))
        .route("/admin/reload", post(reload))
        .route("/admin/health", get(health_report))
        .route("/admin/dead-letters", get(dead_letter_list))
        .route("/admin/dead-letters/export", get(dead_letter_export))
        .route("/admin/dead-letters/replay", post(dead_letter_replay))
        .route("/admin/dead-letters/purge", post(dead_letter_purge))
        .route("/admin/dead-letters/{id}", get(dead_letter_show))
        .merge(console::routes())
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(gate, access::guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}
