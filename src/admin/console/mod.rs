//! The Management console: server-rendered pages under `/ui` (minijinja in an environment of
//! its own with auto-escaping on, so anything from an org, a tenant file or an event renders as
//! text), one CSS and one small script embedded in the binary, served with a
//! Content-Security-Policy that allows no inline script. The pages call the `/admin` JSON
//! routes with `fetch`; each page shows the route and the CLI command it matches.

use std::sync::LazyLock;

use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use minijinja::{Environment, context};
use serde::Deserialize;

use super::{AdminState, access, dead_letters, mapping_file, overview};
use crate::plan::samples::SAMPLES;

/// No inline script or style, nothing from elsewhere, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

static PAGES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    // Auto-escaping by file name: every page is .html, so every value is HTML-escaped.
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            minijinja::AutoEscape::Html
        } else {
            minijinja::AutoEscape::None
        }
    });
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    // "Script this": a value in a command is one shell word (`{{ id | sh }}`), see `twin`.
    env.add_filter("sh", |value: &str| super::twin::shell_word(value));
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("login.html", include_str!("templates/login.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("objects.html", include_str!("templates/objects.html")),
        ("fields.html", include_str!("templates/fields.html")),
        ("mapping.html", include_str!("templates/mapping.html")),
        ("checks.html", include_str!("templates/checks.html")),
        ("health.html", include_str!("templates/health.html")),
        (
            "dead_letters.html",
            include_str!("templates/dead_letters.html"),
        ),
        (
            "dead_letter.html",
            include_str!("templates/dead_letter.html"),
        ),
    ] {
        env.add_template(name, source)
            .expect("the console's templates compile");
    }
    env
});

/// A page with the console's security headers.
fn page(name: &str, ctx: minijinja::Value) -> Response {
    match PAGES.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => secured(Html(html).into_response()),
        Err(e) => secured(
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("page {name}: {e}\n"),
            )
                .into_response(),
        ),
    }
}

fn ser<T: serde::Serialize>(value: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secured(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("console.css"))
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("console.js"))
}

async fn login_page(State(state): State<AdminState>) -> Response {
    page(
        "login.html",
        context! { needs_login => state.gate.needs_login(), error => "", logout => false },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if !state.gate.token_matches(form.token.trim()) {
        let mut response = page(
            "login.html",
            context! { needs_login => state.gate.needs_login(), error => "That is not the admin token.", logout => false },
        );
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let id = state.gate.open_session();
    let mut response = Redirect::to("/ui").into_response();
    if let Ok(value) =
        HeaderValue::from_str(&access::session_cookie(&id, access::over_tls(&headers)))
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    secured(response)
}

async fn logout(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    state.gate.close_session(&headers);
    Redirect::to("/ui/login").into_response()
}

async fn overview_page(State(state): State<AdminState>) -> Response {
    let tenants = overview(&state).await;
    page(
        "overview.html",
        context! { tenants => ser(&tenants), logout => state.gate.needs_login() },
    )
}

async fn objects_page(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let (objects, error) = match t.client.describe_global().await {
        Ok(global) => (global.sobjects, String::new()),
        Err(e) => (Vec::new(), e.to_string()),
    };
    page(
        "objects.html",
        context! { tenant, objects => ser(&objects), error, logout => state.gate.needs_login() },
    )
}

async fn fields_page(
    State(state): State<AdminState>,
    Path((tenant, sobject)): Path<(String, String)>,
) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let (describe, error) = match state.tenants.caches().describe(&t.client, &sobject).await {
        Ok(Some(d)) => (Some(d), String::new()),
        Ok(None) => (None, format!("The integration user cannot see {sobject}.")),
        Err(e) => (None, e.to_string()),
    };
    // What the running mapping needs of this object that the user cannot see or write.
    let needed: Vec<super::ProblemView> =
        super::check_against_org(state.tenants.caches(), &t.config, &t.client)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|p| p.target.split('.').next() == Some(sobject.as_str()))
            .map(super::ProblemView::from)
            .collect();
    page(
        "fields.html",
        context! { tenant, sobject, describe => ser(&describe), error, needed => ser(&needed), logout => state.gate.needs_login() },
    )
}

async fn mapping_page(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let model = t
        .config
        .source
        .as_ref()
        .map(|s| mapping_file::read(&s.text));
    let (records, error) = match model {
        Some(Ok(m)) => (m.records, String::new()),
        Some(Err(e)) => (Vec::new(), e.to_string()),
        None => (
            Vec::new(),
            "This tenant was not loaded from a file, so there is no file to edit.".into(),
        ),
    };
    // Each mapped object's fields the integration user may write, for the field pickers.
    let mut writable = std::collections::BTreeMap::new();
    let mut sobjects: Vec<&str> = records.iter().map(|r| r.sobject.as_str()).collect();
    sobjects.dedup();
    for sobject in sobjects {
        if let Ok(Some(d)) = state.tenants.caches().describe(&t.client, sobject).await {
            let names: Vec<(String, String, String)> = d
                .fields
                .iter()
                .filter(|f| f.createable || f.updateable)
                .map(|f| (f.name.clone(), f.label.clone(), f.field_type.clone()))
                .collect();
            writable.insert(sobject.to_owned(), names);
        }
    }
    let samples: Vec<&str> = SAMPLES.iter().map(|(n, _)| *n).collect();
    let (recent, recent_error) = match dead_letters::recent(&state.dlq, &tenant).await {
        Ok(recent) => (recent, String::new()),
        Err(e) => (Vec::new(), e.to_string()),
    };
    page(
        "mapping.html",
        context! {
            tenant, records => ser(&records), writable, samples, recent => ser(&recent), recent_error,
            error, logout => state.gate.needs_login()
        },
    )
}

async fn checks_page(State(state): State<AdminState>, Path(tenant): Path<String>) -> Response {
    let t = match state.tenant(&tenant) {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let report = crate::doctor::check_tenant(&t.config, &t.client, state.tenants.caches()).await;
    page(
        "checks.html",
        context! { tenant, ok => report.ok(), checks => ser(&report.checks), logout => state.gate.needs_login() },
    )
}

async fn dead_letters_page(
    State(state): State<AdminState>,
    Query(query): Query<dead_letters::Query>,
    RawQuery(raw): RawQuery,
) -> Response {
    let query = query.with_id_pairs(raw.as_deref());
    let filter_error = query.check().err().unwrap_or_default();
    let (listing, error) = if !filter_error.is_empty() {
        (None, String::new())
    } else {
        match dead_letters::matching(&state.dlq, &query).await {
            Ok(letters) => (
                Some(dead_letters::listing(&state, &letters).await),
                String::new(),
            ),
            Err(e) => (None, e.to_string()),
        }
    };
    let (groups, letters) = listing.map(|l| (l.groups, l.letters)).unwrap_or_default();
    let query_string = query.to_query_string();
    let filtered = [
        &query.tenant,
        &query.reason,
        &query.since,
        &query.until,
        &query.q,
        &query.ids,
    ]
    .iter()
    .any(|v| v.as_deref().is_some_and(|v| !v.is_empty()))
        || !query.id.is_empty();
    // The ids a link chose (`id=`, `ids=`): kept by the filter form, shown above it.
    let chosen = query.chosen_ids();
    page(
        "dead_letters.html",
        context! {
            query => ser(&query), query_string, filtered, chosen, id_pairs => query.id.clone(), groups => ser(&groups), letters => ser(&letters),
            cli_list => dead_letters::cli_twin("list", &query), error, filter_error,
            logout => state.gate.needs_login()
        },
    )
}

#[derive(Deserialize)]
struct Reveal {
    #[serde(default)]
    reveal: Option<String>,
}

async fn dead_letter_page(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(reveal): Query<Reveal>,
) -> Response {
    let reveal = matches!(reveal.reveal.as_deref(), Some("1" | "true" | "yes"));
    let (detail, error) = match dead_letters::detail(&state, &state.dlq, &id, reveal).await {
        Ok(d) => (Some(d), String::new()),
        Err(e) => (None, e.to_string()),
    };
    let mut response = page(
        "dead_letter.html",
        context! { id, d => ser(&detail), error, logout => state.gate.needs_login() },
    );
    if detail.is_none() {
        *response.status_mut() = StatusCode::NOT_FOUND;
    }
    response
}

/// The health page: the first reading server-rendered, then refreshed by the script from
/// `/admin/health`.
async fn health_page(State(state): State<AdminState>) -> Response {
    let health =
        super::health::health(&state.sampler, &state.metrics, &state.tenants, &state.dlq).await;
    page(
        "health.html",
        context! { h => ser(&health), logout => state.gate.needs_login() },
    )
}

/// The console's routes.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/ui", get(overview_page))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", axum::routing::post(logout))
        .route("/ui/assets/console.css", get(css))
        .route("/ui/assets/console.js", get(js))
        .route("/ui/tenants/{tenant}/objects", get(objects_page))
        .route("/ui/tenants/{tenant}/objects/{sobject}", get(fields_page))
        .route("/ui/tenants/{tenant}/mapping", get(mapping_page))
        .route("/ui/tenants/{tenant}/checks", get(checks_page))
        .route("/ui/health", get(health_page))
        .route("/ui/dead-letters", get(dead_letters_page))
        .route("/ui/dead-letters/{id}", get(dead_letter_page))
}
