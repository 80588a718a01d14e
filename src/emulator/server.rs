//! The emulator's HTTP surface: Salesforce's REST endpoints plus `/__emulator/*` for faults,
//! inspection and org changes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rand::Rng;
use rand::distributions::Alphanumeric;
use serde::Deserialize;
use serde_json::{Value, json};

use super::engine::{Call, GraphReply, Meta, OrgState, Reply};
use super::faults::{FaultSpec, Faults, Injected};
use super::org::{ConnectedApp, IpRange, IpRelaxation, OrgSpec, SharingModel, SharingRule};
use crate::salesforce::model::GraphRequest;
use crate::salesforce::signin::IP_RESTRICTED;

/// API versions the emulator serves (Composite Graph needs 50.0+).
pub const VERSIONS: std::ops::RangeInclusive<u32> = 50..=67;

/// Everything behind the emulator's one lock.
pub struct Inner {
    /// The org.
    pub org: OrgState,
    /// Faults in force.
    pub faults: Faults,
    tokens: HashMap<String, String>,
    requests: BTreeMap<&'static str, u64>,
    api_calls: u64,
}

/// Shared state of one running emulator.
pub struct Shared {
    inner: Mutex<Inner>,
    scheme: &'static str,
    /// Wakes the requests sleeping out a latency whenever the faults change, so a latency
    /// lowered (or cleared) applies to the requests already waiting, as when an org recovers.
    faults_changed: tokio::sync::Notify,
}

impl Shared {
    /// A fresh emulator over `org`.
    pub fn new(org: OrgSpec, tls: bool) -> Self {
        Self {
            inner: Mutex::new(Inner {
                org: OrgState::new(org),
                faults: Faults::default(),
                tokens: HashMap::new(),
                requests: BTreeMap::new(),
                api_calls: 0,
            }),
            scheme: if tls { "https" } else { "http" },
            faults_changed: tokio::sync::Notify::new(),
        }
    }

    /// Locks the state. A poisoned lock still holds consistent data (every write completes or
    /// is rolled back before the lock is released), so it is recovered rather than propagated.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a fault spec, including its one-shot parts.
    pub fn apply_faults(&self, spec: &FaultSpec) -> Result<(), String> {
        let mut inner = self.lock();
        inner.faults.apply(spec)?;
        if spec.expire_tokens == Some(true) {
            inner.tokens.clear();
        }
        if let Some(remaining) = spec.api_quota_remaining {
            let max = inner.org.spec.org.daily_api_limit;
            inner.org.api_used = max.saturating_sub(remaining);
        }
        drop(inner);
        self.faults_changed.notify_waiters();
        Ok(())
    }

    /// Clears every fault.
    pub fn clear_faults(&self) {
        self.lock().faults = Faults::default();
        self.faults_changed.notify_waiters();
    }

    /// Sleeps out a request's latency, `first` as drawn when it arrived; when the faults change
    /// meanwhile, the latency in force then applies (counted from the arrival).
    async fn sleep_latency(&self, first: Duration) {
        let arrived = tokio::time::Instant::now();
        let mut delay = first;
        loop {
            // Created before the check, so a change made in between still wakes it.
            let changed = self.faults_changed.notified();
            let remaining = delay.saturating_sub(arrived.elapsed());
            if remaining.is_zero() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(remaining) => return,
                () = changed => delay = self.lock().faults.delay(),
            }
        }
    }
}

/// Builds the router.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/data", get(versions))
        .route("/services/data/", get(versions))
        .route("/services/data/{*rest}", any(data))
        .route("/__emulator/faults", post(set_faults).delete(clear_faults))
        .route("/__emulator/records/{sobject}", get(records))
        .route("/__emulator/stats", get(stats))
        .route("/__emulator/org", post(change_org))
        .with_state(shared)
}

fn json_response(
    status: u16,
    body: Option<impl serde::Serialize>,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        Some(json!({"error": error, "error_description": description})),
        vec![],
    )
}

fn base_url(shared: &Shared, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("{}://{host}", shared.scheme)
}

fn count(inner: &mut Inner, endpoint: &'static str) {
    *inner.requests.entry(endpoint).or_default() += 1;
}

#[derive(Deserialize)]
struct JwtClaims {
    sub: String,
    exp: u64,
}

/// The token endpoint. Refusals are Salesforce's OAuth error bodies, HTTP 400 (Salesforce Help,
/// "OAuth 2.0 Authorization Errors"): `invalid_client_id` "client identifier invalid",
/// `invalid_client` "invalid client credentials", `invalid_grant` ("audience is invalid", "user
/// hasn't approved this consumer", "IP restricted or invalid login hours", …), `inactive_user`
/// "user is inactive", `unsupported_grant_type`. The caller's address, for the profile's Login
/// IP Ranges, is the TCP peer.
async fn token(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let base = base_url(&shared, &headers);
    let mut inner = shared.lock();
    count(&mut inner, "token");
    if inner.faults.in_outage() {
        return json_response(
            503,
            Some(
                json!([{"errorCode": "SERVER_UNAVAILABLE", "message": "Service temporarily unavailable"}]),
            ),
            vec![],
        );
    }
    let client_credentials =
        form.get("grant_type").map(String::as_str) == Some("client_credentials");
    let (username, app) = match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            let id = form
                .get("client_id")
                .map(String::as_str)
                .unwrap_or_default();
            let secret = form
                .get("client_secret")
                .map(String::as_str)
                .unwrap_or_default();
            let app = inner
                .org
                .spec
                .connected_apps
                .iter()
                .find(|a| a.consumer_key == id);
            let Some(app) = app else {
                return oauth_error(400, "invalid_client_id", "client identifier invalid");
            };
            if app.client_secret.as_deref() != Some(secret) {
                return oauth_error(400, "invalid_client", "invalid client credentials");
            }
            let Some(run_as) = app.run_as.clone() else {
                return oauth_error(400, "invalid_grant", "no client credentials user enabled");
            };
            (run_as, app.clone())
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let assertion = form
                .get("assertion")
                .map(String::as_str)
                .unwrap_or_default();
            let mut audiences = inner.org.spec.org.login_audiences.clone();
            audiences.push(base.clone());
            match verify_assertion(&inner.org.spec, assertion, &audiences) {
                Ok((username, app)) => (username, app.clone()),
                Err((error, description)) => return oauth_error(400, error, description),
            }
        }
        _ => {
            return oauth_error(400, "unsupported_grant_type", "grant type not supported");
        }
    };
    let Some(user) = inner.org.spec.user(&username) else {
        return oauth_error(400, "invalid_grant", "user not found");
    };
    if !user.active {
        return oauth_error(400, "inactive_user", "user is inactive");
    }
    if !user.api_enabled {
        return oauth_error(400, "invalid_grant", "user is inactive or not API enabled");
    }
    if !inner.org.spec.login_ip_allowed(&app, &username, peer.ip()) {
        return oauth_error(400, "invalid_grant", IP_RESTRICTED);
    }
    let org_id = inner.org.org_id();
    let user_id = inner
        .org
        .user_ids
        .get(&username.to_ascii_lowercase())
        .cloned()
        .unwrap_or_default();
    let secret: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(96)
        .map(char::from)
        .collect();
    let access_token = format!("{}!{secret}", &org_id[..15]);
    inner.tokens.insert(access_token.clone(), username);
    let issued_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let mut body = json!({
        "access_token": access_token,
        "scope": "api",
        "instance_url": base,
        "id": format!("{base}/id/{org_id}/{user_id}"),
        "token_type": "Bearer",
    });
    // The client-credentials response also carries these; the JWT bearer one does not.
    if client_credentials {
        body["issued_at"] = json!(issued_at.to_string());
        body["signature"] = json!(secret.chars().rev().take(43).collect::<String>());
        body["token_format"] = json!("opaque");
    }
    json_response(200, Some(body), vec![])
}

/// Checks a JWT bearer assertion against the org's connected apps; returns the username.
fn verify_assertion<'o>(
    org: &'o OrgSpec,
    assertion: &str,
    audiences: &[String],
) -> Result<(String, &'o ConnectedApp), (&'static str, &'static str)> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| ("invalid_grant", "invalid assertion"))?;
    if header.alg != Algorithm::RS256 {
        return Err(("invalid_grant", "invalid assertion"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut seen_issuer = false;
    for app in &org.connected_apps {
        let Some(pem) = app.public_key_pem() else {
            continue;
        };
        let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) else {
            continue;
        };
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[&app.consumer_key]);
        validation.set_audience(audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        match jsonwebtoken::decode::<JwtClaims>(assertion, &key, &validation) {
            Ok(data) => {
                if data.claims.exp > now + 300 {
                    return Err(("invalid_grant", "expiration date is too far in the future"));
                }
                if !app
                    .pre_authorized
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(&data.claims.sub))
                {
                    return Err(("invalid_grant", "user hasn't approved this consumer"));
                }
                return Ok((data.claims.sub, app));
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidIssuer => continue,
                    ErrorKind::ExpiredSignature => {
                        return Err(("invalid_grant", "expired assertion"));
                    }
                    ErrorKind::InvalidAudience => {
                        return Err(("invalid_grant", "audience is invalid"));
                    }
                    _ => seen_issuer = true,
                }
            }
        }
    }
    if seen_issuer {
        Err(("invalid_grant", "invalid assertion"))
    } else {
        Err(("invalid_client_id", "client identifier invalid"))
    }
}

async fn versions() -> Response {
    let list: Vec<Value> = VERSIONS
        .map(|v| {
            json!({"label": format!("v{v}.0"), "url": format!("/services/data/v{v}.0"), "version": format!("{v}.0")})
        })
        .collect();
    json_response(200, Some(Value::Array(list)), vec![])
}

fn endpoint_name(method: &Method, rest: &str) -> &'static str {
    if rest.starts_with("composite/graph") {
        "graph"
    } else if rest.starts_with("composite") {
        "composite"
    } else if rest.starts_with("query") {
        "query"
    } else if rest.ends_with("/describe") || rest == "sobjects" || rest == "sobjects/" {
        "describe"
    } else if rest.starts_with("limits") {
        "limits"
    } else if rest.starts_with("sobjects") {
        match *method {
            Method::GET => "sobject_get",
            Method::DELETE => "sobject_delete",
            _ => "sobject_write",
        }
    } else {
        "other"
    }
}

async fn data(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_start_matches("/services/data/");
    let (version, rest) = path.split_once('/').unwrap_or((path, ""));
    let version = version.trim_start_matches('v').to_owned();
    let rest = rest.to_owned();
    let endpoint = endpoint_name(&method, &rest);
    let delay = {
        let mut inner = shared.lock();
        count(&mut inner, endpoint);
        if inner.faults.in_outage() {
            return json_response(
                503,
                Some(
                    json!([{"errorCode": "SERVER_UNAVAILABLE", "message": "Service temporarily unavailable"}]),
                ),
                vec![],
            );
        }
        inner.faults.delay()
    };
    if !delay.is_zero() {
        shared.sleep_latency(delay).await;
    }
    // A graph request (the worker's hot path) is read straight into its type; any other body,
    // or a graph body that does not read as one, goes the general way (and gets its errors).
    let graph = (endpoint == "graph"
        && method == Method::POST
        && rest.trim_matches('/') == "composite/graph")
        .then(|| serde_json::from_slice::<GraphRequest>(&body).ok())
        .flatten();
    let body: Option<Value> = if body.is_empty() || graph.is_some() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) => {
                return json_response(
                    400,
                    Some(json!([{"errorCode": "JSON_PARSER_ERROR", "message": e.to_string()}])),
                    vec![],
                );
            }
        }
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let if_modified_since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| httpdate::parse_http_date(h).ok());
    let batch_size = headers
        .get("sforce-query-options")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.split(',')
                .find_map(|p| p.trim().strip_prefix("batchSize="))
        })
        .and_then(|n| n.parse().ok());
    // "Sforce-Duplicate-Rule-Header: allowSave=true; includeRecordDetails=…; runAsCurrentUser=…"
    // (https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/headers_duplicaterules.htm).
    let allow_save = headers
        .get("sforce-duplicate-rule-header")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| {
            h.split([';', ','])
                .filter_map(|p| p.split_once('='))
                .any(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("allowSave")
                        && v.trim().eq_ignore_ascii_case("true")
                })
        });
    let mut inner = shared.lock();
    let Some(username) = inner.tokens.get(&bearer).cloned() else {
        return json_response(
            401,
            Some(
                json!([{"errorCode": "INVALID_SESSION_ID", "message": "Session expired or invalid"}]),
            ),
            vec![],
        );
    };
    let max = inner.org.spec.org.daily_api_limit;
    if inner.org.api_used >= max {
        return json_response(
            403,
            Some(
                json!([{"errorCode": "REQUEST_LIMIT_EXCEEDED", "message": "TotalRequests Limit exceeded."}]),
            ),
            vec![(
                "Sforce-Limit-Info",
                format!("api-usage={}/{max}", inner.org.api_used),
            )],
        );
    }
    inner.org.api_used += 1;
    inner.api_calls += 1;
    let limit_info = (
        "Sforce-Limit-Info",
        format!("api-usage={}/{max}", inner.org.api_used),
    );
    let versioned = version
        .split_once('.')
        .and_then(|(major, minor)| Some((major.parse::<u32>().ok()?, minor)))
        .is_some_and(|(major, minor)| VERSIONS.contains(&major) && minor == "0");
    if !versioned {
        let reply = Reply::error(404, "NOT_FOUND", "The requested resource does not exist");
        return json_response(reply.status, reply.body, vec![limit_info]);
    }
    let mut meta = Meta {
        if_modified_since,
        batch_size,
        lock_one_graph: false,
        allow_save,
    };
    match inner.faults.draw() {
        Some(Injected::Unavailable) => {
            return json_response(
                503,
                Some(
                    json!([{"errorCode": "SERVER_UNAVAILABLE", "message": "Service temporarily unavailable"}]),
                ),
                vec![limit_info],
            );
        }
        Some(Injected::Internal) => {
            return json_response(
                500,
                Some(
                    json!([{"errorCode": "UNKNOWN_EXCEPTION", "message": "An unexpected error occurred. Please include this ErrorId if you contact support: 1234567890-12345 (-123456789)"}]),
                ),
                vec![limit_info],
            );
        }
        Some(Injected::LockRow) if endpoint == "graph" => meta.lock_one_graph = true,
        Some(Injected::LockRow) => {
            return json_response(
                400,
                Some(
                    json!([{"errorCode": "UNABLE_TO_LOCK_ROW", "message": "unable to obtain exclusive access to this record or 1 records"}]),
                ),
                vec![limit_info],
            );
        }
        None => {}
    }
    let call = Call {
        method: method.as_str(),
        path: &rest,
        query: uri.query(),
        body: body.as_ref(),
    };
    let reply = match graph {
        Some(request) => match inner.org.execute_graph(&username, request, meta) {
            GraphReply::Answered(answers) => {
                drop(inner);
                return json_response(200, Some(answers), vec![limit_info]);
            }
            GraphReply::Refused(reply) => reply,
        },
        None => inner.org.execute(&username, &version, call, meta),
    };
    drop(inner);
    let mut headers = reply.headers;
    headers.push(limit_info);
    json_response(reply.status, reply.body, headers)
}

async fn set_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let spec: FaultSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => return json_response(400, Some(json!({"error": e.to_string()})), vec![]),
    };
    match shared.apply_faults(&spec) {
        Ok(()) => json_response(200, Some(json!({"applied": spec})), vec![]),
        Err(e) => json_response(400, Some(json!({"error": e})), vec![]),
    }
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> Response {
    shared.clear_faults();
    json_response(204, None::<Value>, vec![])
}

async fn records(State(shared): State<Arc<Shared>>, Path(sobject): Path<String>) -> Response {
    let inner = shared.lock();
    let rows: Vec<Value> = inner
        .org
        .store
        .all(&sobject)
        .into_iter()
        .map(|r| Value::Object(r.fields.clone()))
        .collect();
    json_response(200, Some(Value::Array(rows)), vec![])
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let inner = shared.lock();
    let records: BTreeMap<&str, usize> = inner
        .org
        .spec
        .sobjects
        .iter()
        .map(|o| (o.name.as_str(), inner.org.store.count(&o.name)))
        .collect();
    json_response(
        200,
        Some(json!({
            "records": records,
            "api_calls": inner.api_calls,
            "api_usage": {"used": inner.org.api_used, "max": inner.org.spec.org.daily_api_limit},
            "requests": inner.requests,
        })),
        vec![],
    )
}

/// One change per request; the shapes differ by their required keys.
#[derive(Deserialize)]
#[serde(untagged)]
enum OrgChange {
    /// `{"permission_set", "object" | "field", "access"}`.
    Permission {
        permission_set: String,
        object: Option<String>,
        field: Option<String>,
        access: String,
    },
    /// `{"sobject", "sharing_model": "Private" | "Read" | "ReadWrite"}`: an org-wide default.
    SharingModel {
        sobject: String,
        sharing_model: SharingModel,
    },
    /// `{"sharing_rule": {…}}`.
    SharingRule { sharing_rule: SharingRule },
    /// `{"profile", "login_ip_ranges": [{"start", "end"}]}`.
    LoginIpRanges {
        profile: String,
        login_ip_ranges: Vec<IpRange>,
    },
    /// `{"connected_app", "ip_relaxation": "enforce" | "relax"}`.
    IpRelaxation {
        connected_app: String,
        ip_relaxation: IpRelaxation,
    },
    /// `{"user", "active"}`.
    UserActive { user: String, active: bool },
    /// `{"email_address_internationalization": bool}`: Setup → Email Address
    /// Internationalization.
    EmailAddressInternationalization {
        email_address_internationalization: bool,
    },
    /// `{"multiday_events": bool}`: Setup → Activity Settings → Enable Multiday Events.
    MultidayEvents { multiday_events: bool },
    /// `{"shared_activities": bool}`: Setup → Activity Settings → Shared Activities.
    SharedActivities { shared_activities: bool },
}

async fn change_org(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let change: OrgChange = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => return json_response(400, Some(json!({"error": e.to_string()})), vec![]),
    };
    let mut inner = shared.lock();
    // Copied only if a call still holds the previous one.
    let spec = Arc::make_mut(&mut inner.org.spec);
    let changed = match change {
        OrgChange::Permission {
            permission_set,
            object,
            field,
            access,
        } => spec
            .set_permission(
                &permission_set,
                object.as_deref(),
                field.as_deref(),
                &access,
            )
            .map(|()| true),
        OrgChange::SharingModel {
            sobject,
            sharing_model,
        } => spec
            .set_sharing_model(&sobject, sharing_model)
            .map(|()| true),
        OrgChange::SharingRule { sharing_rule } => {
            spec.add_sharing_rule(sharing_rule).map(|()| true)
        }
        OrgChange::LoginIpRanges {
            profile,
            login_ip_ranges,
        } => spec
            .set_login_ip_ranges(&profile, login_ip_ranges)
            .map(|()| false),
        OrgChange::IpRelaxation {
            connected_app,
            ip_relaxation,
        } => spec
            .set_ip_relaxation(&connected_app, ip_relaxation)
            .map(|()| false),
        OrgChange::UserActive { user, active } => {
            spec.set_user_active(&user, active).map(|()| false)
        }
        OrgChange::EmailAddressInternationalization {
            email_address_internationalization,
        } => {
            spec.org.email_address_internationalization = email_address_internationalization;
            Ok(false)
        }
        OrgChange::MultidayEvents { multiday_events } => {
            spec.org.multiday_events = multiday_events;
            Ok(false)
        }
        // EventRelation's fields change: its describe does too.
        OrgChange::SharedActivities { shared_activities } => {
            spec.set_shared_activities(shared_activities);
            Ok(true)
        }
    };
    match changed {
        Ok(schema) => {
            // Permissions change what describes report; sign-in settings do not.
            if schema {
                inner.org.touch_schema();
            }
            json_response(200, Some(json!({"changed": true})), vec![])
        }
        Err(e) => json_response(400, Some(json!({"error": e})), vec![]),
    }
}
