//! The admin API on the service port, above the pipeline: what the Management UI uses: tenants, the fields of an
//! sObject as the integration user may use them, validation of a proposed mapping, reload.
//!
//! Bound to loopback it is open to local callers; bound elsewhere it requires
//! `Authorization: Bearer <token>` with the token from the environment variable named by
//! `http.admin_token_env`, and without one it is off.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::TenantConfig;
use crate::plan::CompiledMapping;
use crate::tenants::{Registry, Reloader, check_against_org};

/// Who may call the admin API.
#[derive(Clone)]
pub enum AdminAccess {
    /// Loopback listener and no token configured: local callers only, by construction.
    Local,
    /// A bearer token is required.
    Token(Arc<SecretString>),
    /// Non-loopback listener without a token: the admin API is off.
    Disabled,
}

#[derive(Clone)]
struct AdminState {
    tenants: Arc<Registry>,
    reloader: Reloader,
    access: AdminAccess,
}

/// Whether the bearer token `given` is `token`, compared in constant time: how long a refusal
/// takes must not tell how much of a guess was right.
fn token_matches(given: Option<&str>, token: &SecretString) -> bool {
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.expose_secret().as_bytes())))
}

/// The refusal for a caller who may not use the admin API, if any.
fn denial(state: &AdminState, headers: &HeaderMap) -> Option<Response> {
    match &state.access {
        AdminAccess::Local => None,
        AdminAccess::Disabled => Some((
            StatusCode::FORBIDDEN,
            "admin API disabled: the service listens beyond loopback and http.admin_token_env is not set\n",
        )
            .into_response()),
        AdminAccess::Token(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if token_matches(given, token) {
                None
            } else {
                Some((StatusCode::UNAUTHORIZED, "bearer token required\n").into_response())
            }
        }
    }
}

async fn list_tenants(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = denial(&state, &headers) {
        return denied;
    }
    let list: Vec<_> = state
        .tenants
        .all()
        .iter()
        .map(|t| {
            json!({
                "tenant": t.config.tenant,
                "login_url": t.config.org.login_url,
                "api_version": t.config.org.api_version,
                "api_quota_share": t.config.limits.api_quota_share,
                "records": t.config.records.iter().map(|r| json!({"ref": r.reference, "sobject": r.sobject})).collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(list).into_response()
}

async fn fields(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path((tenant, sobject)): Path<(String, String)>,
) -> Response {
    if let Some(denied) = denial(&state, &headers) {
        return denied;
    }
    let Some(t) = state.tenants.get(&tenant) else {
        return (StatusCode::NOT_FOUND, format!("no tenant {tenant}\n")).into_response();
    };
    match state.tenants.caches().describe(&t.client, &sobject).await {
        Ok(Some(describe)) => axum::Json(describe.fields).into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            format!("the integration user of {tenant} cannot see {sobject}\n"),
        )
            .into_response(),
        Err(error) => (StatusCode::BAD_GATEWAY, format!("{error}\n")).into_response(),
    }
}

/// Body: a proposed tenant file (TOML). Answer: every problem, compile and org-side.
async fn validate(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Path(tenant): Path<String>,
    body: String,
) -> Response {
    if let Some(denied) = denial(&state, &headers) {
        return denied;
    }
    let Some(current) = state.tenants.get(&tenant) else {
        return (StatusCode::NOT_FOUND, format!("no tenant {tenant}\n")).into_response();
    };
    let mut proposed: TenantConfig = match toml::from_str(&body) {
        Ok(p) => p,
        Err(e) => {
            return axum::Json(json!({"valid": false, "problems": [e.to_string()]}))
                .into_response();
        }
    };
    proposed.tenant = tenant;
    let mut problems: Vec<String> = CompiledMapping::compile(&proposed)
        .err()
        .unwrap_or_default();
    match check_against_org(state.tenants.caches(), &proposed, &current.client).await {
        Ok(found) => problems.extend(found.iter().map(ToString::to_string)),
        Err(error) => {
            return (
                StatusCode::BAD_GATEWAY,
                format!("the org could not be asked: {error}\n"),
            )
                .into_response();
        }
    }
    axum::Json(json!({"valid": problems.is_empty(), "problems": problems})).into_response()
}

async fn reload(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    if let Some(denied) = denial(&state, &headers) {
        return denied;
    }
    match state.reloader.reload().await {
        Ok(names) => axum::Json(json!({"reloaded": names})).into_response(),
        Err(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"reloaded": [], "problems": problems})),
        )
            .into_response(),
    }
}

/// The admin routes.
pub fn router(tenants: Arc<Registry>, reloader: Reloader, access: AdminAccess) -> Router {
    Router::new()
        .route("/admin/tenants", get(list_tenants))
        .route(
            "/admin/tenants/{tenant}/sobjects/{sobject}/fields",
            get(fields),
        )
        .route("/admin/tenants/{tenant}/validate", post(validate))
        .route("/admin/reload", post(reload))
        .with_state(AdminState {
            tenants,
            reloader,
            access,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        let token = SecretString::from("s3cret-token");
        assert!(token_matches(Some("s3cret-token"), &token));
        for wrong in ["s3cret-toke", "s3cret-token2", "S3CRET-TOKEN", ""] {
            assert!(!token_matches(Some(wrong), &token), "{wrong:?}");
        }
        assert!(!token_matches(None, &token));
    }
}
