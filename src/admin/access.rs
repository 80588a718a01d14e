//! Who may use the admin API and the console, and what every request must carry.
//!
//! - On a loopback listener without a token: open to local callers.
//! - With a token: `Authorization: Bearer <token>` (scripts) or a console session, which the
//!   login page gives for the token: a cookie `HttpOnly; SameSite=Strict; Path=/`, `Secure` when
//!   the request came over TLS (`X-Forwarded-Proto: https` from the terminating proxy), expiring
//!   after [`SESSION_TTL`].
//! - Off loopback without a token: off.
//!
//! Everywhere, loopback included, a state-changing request (anything but GET/HEAD) whose
//! `Origin` is not this listener's own, or whose `Sec-Fetch-Site` says `cross-site`, is refused:
//! a page on any website can make the admin's browser post to 127.0.0.1.
//! <https://developer.mozilla.org/en-US/docs/Web/HTTP/Headers/Origin>,
//! <https://cheatsheetseries.owasp.org/cheatsheets/Cross-Site_Request_Forgery_Prevention_Cheat_Sheet.html>

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// How long a console session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "portals_crm_session";

/// Who may call the admin API.
#[derive(Clone)]
pub enum AdminAccess {
    /// Loopback listener and no token configured: local callers only, by construction.
    Local,
    /// A bearer token (or a console session obtained with it) is required.
    Token(Arc<SecretString>),
    /// Non-loopback listener without a token: the admin API is off.
    Disabled,
}

/// The access rule and the live console sessions.
#[derive(Clone)]
pub struct Gate {
    access: AdminAccess,
    sessions: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Gate {
    /// A gate for `access`.
    pub fn new(access: AdminAccess) -> Self {
        Self {
            access,
            sessions: Arc::default(),
        }
    }

    /// True when `given` is the admin token (compared in constant time: how long a refusal
    /// takes must not tell how much of a guess was right).
    pub fn token_matches(&self, given: &str) -> bool {
        match &self.access {
            AdminAccess::Token(token) => {
                bool::from(given.as_bytes().ct_eq(token.expose_secret().as_bytes()))
            }
            _ => false,
        }
    }

    /// True when the console needs a login (a token is configured).
    pub fn needs_login(&self) -> bool {
        matches!(self.access, AdminAccess::Token(_))
    }

    /// A new session id, valid for [`SESSION_TTL`].
    pub fn open_session(&self) -> String {
        let id: [u8; 32] = rand::random();
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        sessions.retain(|_, expires| *expires > now);
        sessions.insert(id.clone(), now + SESSION_TTL);
        id
    }

    fn session_valid(&self, headers: &HeaderMap) -> bool {
        let Some(id) = cookie(headers, SESSION_COOKIE) else {
            return false;
        };
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(id)
            .is_some_and(|expires| *expires > Instant::now())
    }

    /// Ends the session the request carries.
    pub fn close_session(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        }
    }

    /// Whether this request may pass; the refusal otherwise.
    fn admit(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        match &self.access {
            AdminAccess::Local => Ok(()),
            AdminAccess::Disabled => Err(
                "admin API disabled: the service listens beyond loopback and http.admin_token_env is not set",
            ),
            AdminAccess::Token(_) => {
                let bearer = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if bearer.is_some_and(|g| self.token_matches(g)) || self.session_valid(headers) {
                    Ok(())
                } else {
                    Err("bearer token or console login required")
                }
            }
        }
    }
}

/// The value of cookie `name` in the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// True when the request came over TLS (terminated by a proxy in front of the listener).
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value of a session.
pub fn session_cookie(id: &str, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    )
}

/// Why a state-changing request is refused, if it is: its `Origin` is another site's.
pub fn foreign_origin(method: &Method, headers: &HeaderMap) -> Option<String> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site");
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let own = match (origin, host) {
        // No Origin: not a browser's cross-origin request (curl, the CLI, a script).
        (None, _) => true,
        (Some(origin), Some(host)) => origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|rest| rest.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
    };
    (!own || cross_site).then(|| {
        format!(
            "refused: Origin {} is not this service's own; state-changing requests must come from the console itself",
            origin.unwrap_or("(cross-site)")
        )
    })
}

/// The middleware in front of `/admin` and `/ui`: the Origin check on every state-changing
/// request, then the access rule (the login page and the console's static files excepted).
pub async fn guard(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let Some(refusal) = foreign_origin(request.method(), headers) {
        return (StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response();
    }
    let path = request.uri().path();
    let public = path == "/ui/login" || path.starts_with("/ui/assets/");
    if !public && let Err(refusal) = gate.admit(headers) {
        if path.starts_with("/ui") && gate.needs_login() {
            return Redirect::to("/ui/login").into_response();
        }
        let status = if gate.needs_login() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::FORBIDDEN
        };
        return (status, format!("{refusal}\n")).into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_a_foreign_origin_is_refused_and_only_for_state_changes() {
        let own = headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
        ]);
        let foreign = headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "https://evil.example"),
        ]);
        let script = headers(&[("host", "127.0.0.1:9090")]);
        assert!(foreign_origin(&Method::POST, &own).is_none());
        assert!(foreign_origin(&Method::POST, &script).is_none());
        assert!(foreign_origin(&Method::POST, &foreign).is_some());
        assert!(foreign_origin(&Method::GET, &foreign).is_none());
        let cross = headers(&[("host", "127.0.0.1:9090"), ("sec-fetch-site", "cross-site")]);
        assert!(foreign_origin(&Method::POST, &cross).is_some());
    }

    #[test]
    fn sessions_admit_until_closed() {
        let gate = Gate::new(AdminAccess::Token(Arc::new("s3cret".to_owned().into())));
        assert!(gate.admit(&HeaderMap::new()).is_err());
        assert!(
            gate.admit(&headers(&[("authorization", "Bearer s3cret")]))
                .is_ok()
        );
        assert!(
            gate.admit(&headers(&[("authorization", "Bearer s3cre")]))
                .is_err()
        );
        let id = gate.open_session();
        let with = headers(&[("cookie", &format!("a=b; {SESSION_COOKIE}={id}"))]);
        assert!(gate.admit(&with).is_ok());
        gate.close_session(&with);
        assert!(gate.admit(&with).is_err());
        assert!(session_cookie(&id, true).ends_with("; Secure"));
        assert!(session_cookie(&id, false).contains("HttpOnly; SameSite=Strict"));
    }
}
