//! The service's HTTP port: `/metrics`, `/healthz` (alive), `/readyz` (broker connected and
//! tenants loaded, with the reason when not).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    broker: AtomicBool,
    tenants: AtomicBool,
    /// Why the last session with the broker ended (a connect that failed, a topology the broker
    /// refused), until a session starts consuming.
    down: std::sync::Mutex<Option<String>>,
}

impl Readiness {
    /// Broker connection state; connected clears the reason a connect failed.
    pub fn set_broker(&self, connected: bool) {
        self.broker.store(connected, Ordering::Relaxed);
        if connected {
            *self.lock_down() = None;
        }
    }

    /// Not consuming, and why (what failed and what to check, never the URL's credentials):
    /// the reason `/readyz` gives until a session starts consuming.
    pub fn set_broker_down(&self, why: String) {
        self.broker.store(false, Ordering::Relaxed);
        *self.lock_down() = Some(why);
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tenants loaded and compiled.
    pub fn set_tenants(&self, loaded: bool) {
        self.tenants.store(loaded, Ordering::Relaxed);
    }

    /// `Ok` when ready, else every reason it is not.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if !self.broker.load(Ordering::Relaxed) {
            reasons.push(match &*self.lock_down() {
                Some(why) => why.clone(),
                None => "not connected to the broker".to_owned(),
            });
        }
        if !self.tenants.load(Ordering::Relaxed) {
            reasons.push("tenants not loaded".to_owned());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

async fn render_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 503 with every reason while the broker is not connected or the tenants are not loaded.
/// A tenant whose sign-in Salesforce refuses is named (`degraded: tenant T cannot sign in to
/// Salesforce (salesforce_auth_…)`) but keeps the pod ready: this service receives no traffic
/// through its Service, so readiness only gates a rollout, and one customer's connected app
/// must not block every rollout (nor would a new pod fix it). The pause is alerted on through
/// `portals_crm_salesforce_auth_refused`.
async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let degraded: Vec<String> = state
        .metrics
        .sign_in_refused()
        .into_iter()
        .map(|(tenant, reason)| format!("tenant {tenant} cannot sign in to Salesforce ({reason})"))
        .collect();
    let degraded = if degraded.is_empty() {
        String::new()
    } else {
        format!("degraded: {}\n", degraded.join("; "))
    };
    match state.readiness.check() {
        Ok(()) => (StatusCode::OK, format!("ready\n{degraded}")),
        Err(reasons) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n{degraded}", reasons.join("; ")),
        ),
    }
}

/// Binds `listen` and serves until `cancel`, with `admin` merged in; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    admin: Router,
    cancel: CancellationToken,
    tracker: &tokio_util::task::TaskTracker,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, readiness })
        .merge(admin);
    tracker.spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(cancel.cancelled_owned())
            .await
        {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    Ok(addr)
}
