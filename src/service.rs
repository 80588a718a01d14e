//! The service: builds every component from [`Config`] (everything that can fail at start-up
//! fails here), runs them tracked, and shuts down in order (see [`Service::shutdown`]) — and
//! exits within `worker.drain_secs` + [`STOP_GRACE`] whatever the orgs do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::AdminAccess;
use crate::amqp::Topology;
use crate::config::{Config, TenantConfig};
use crate::consumer::{Consumer, WorkerSettings};
use crate::enrich::Caches;
use crate::pipeline::Pipeline;
use crate::telemetry::http::Readiness;
use crate::telemetry::metrics::Metrics;
use crate::tenants::{self, LoadedTenant, Registry, Reloader, TenantSettings};

/// How long a shutdown waits, after the drain deadline, for the requests already sent to
/// Salesforce (the connection stays open, so a graph committed then is still acked), the settle
/// barrier and the close ([`crate::consumer::CLOSE_BUDGET`] of it), and the background tasks;
/// what is still running then is abandoned (its messages were handed back with the connection
/// and are redelivered, which is safe: every write is an upsert).
pub const STOP_GRACE: Duration = Duration::from_secs(4);

/// Start-up failed; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Tenant files or mappings are invalid.
    #[error("tenants:\n  - {}", .0.join("\n  - "))]
    Tenants(Vec<String>),
    /// The cache could not be opened.
    #[error(transparent)]
    Cache(#[from] crate::enrich::CacheError),
    /// The HTTP port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A running service: where its HTTP port is, and how to stop it.
pub struct Service {
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The running tenants (tests and the demo read them).
    pub tenants: Arc<Registry>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Reloads the tenant files (SIGHUP, the admin API).
    pub reloader: Reloader,
    cancel: CancellationToken,
    batch_stop: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
    drain: Duration,
}

/// The admin token, from the environment variable or file the config names.
fn admin_token(config: &Config) -> Option<secrecy::SecretString> {
    config
        .http
        .admin_token_env
        .as_ref()
        .and_then(|name| std::env::var(name).ok())
        .or_else(|| {
            let path = config.http.admin_token_file.as_ref()?;
            std::fs::read_to_string(path).ok()
        })
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(secrecy::SecretString::from)
}

impl Service {
    /// Builds every component from `config` and starts consuming. `tenants` overrides the
    /// tenant directory (the demo points them at its in-process emulator).
    pub async fn start(config: &Config, tenants: Vec<TenantConfig>) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_secs(config.salesforce.timeout_secs);
        let tenants =
            tenants::load_tenants(tenants, timeout, &metrics).map_err(BuildError::Tenants)?;
        let caches = Caches::open(&config.cache, metrics.clone())?;
        Self::start_loaded(config, tenants, caches, metrics).await
    }

    /// Starts from the tenant directory of `config`; a broken tenant file falls back to its
    /// last good copy (see [`tenants::load_dir_with_fallback`]).
    pub async fn start_from_dir(config: &Config) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_secs(config.salesforce.timeout_secs);
        let caches = Caches::open(&config.cache, metrics.clone())?;
        let tenants =
            tenants::load_dir_with_fallback(&config.tenants.dir, &caches, timeout, &metrics)
                .map_err(BuildError::Tenants)?;
        Self::start_loaded(config, tenants, caches, metrics).await
    }

    async fn start_loaded(
        config: &Config,
        tenants: Vec<LoadedTenant>,
        caches: Caches,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let readiness = Arc::new(Readiness::default());
        let cancel = CancellationToken::new();
        // Batchers stop only after the consumer has drained: in-flight messages still need them.
        let batch_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let registry = Arc::new(Registry::new(
            tenants,
            caches,
            metrics.clone(),
            TenantSettings::from_config(config),
            &tracker,
            &batch_stop,
        ));
        readiness.set_tenants(true);
        let reloader = Reloader::new(registry.clone(), config.tenants.dir.clone());
        let listen: SocketAddr = config.http.listen.parse().map_err(|_| BuildError::Listen {
            addr: config.http.listen.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address"),
        })?;
        let access = match (admin_token(config), listen.ip().is_loopback()) {
            (Some(token), _) => AdminAccess::Token(Arc::new(token)),
            (None, true) => AdminAccess::Local,
            (None, false) => AdminAccess::Disabled,
        };
        let admin = crate::admin::router(
            registry.clone(),
            reloader.clone(),
            metrics.clone(),
            config.tenants.dir.clone(),
            access,
            crate::admin::dead_letters::DlqSource {
                url: config.amqp.url.clone(),
                topology: Topology::new(&config.amqp, &config.retry_tiers()),
            },
        );
        let http_addr = crate::telemetry::http::serve(
            listen,
            metrics.clone(),
            readiness.clone(),
            admin,
            cancel.clone(),
            &tracker,
        )
        .await
        .map_err(|source| BuildError::Listen {
            addr: config.http.listen.clone(),
            source,
        })?;
        if config.cache.ledger_ttl_days > 0 {
            tracker.spawn(crate::enrich::expire_ledger(
                registry.caches().clone(),
                Duration::from_secs(config.cache.ledger_ttl_days * 86_400),
                cancel.clone(),
            ));
        }
        let refresh = config.cache.describe_refresh_secs;
        tracker.spawn(tenants::org_check::watch_orgs(
            registry.clone(),
            (refresh > 0).then(|| Duration::from_secs(refresh)),
            cancel.clone(),
        ));
        if config.tenants.watch_secs > 0 {
            tracker.spawn(reloader.clone().watch(
                Duration::from_secs(config.tenants.watch_secs),
                cancel.clone(),
            ));
        }
        let consumer = Consumer {
            topology: Arc::new(Topology::new(&config.amqp, &config.retry_tiers())),
            pipeline: Arc::new(Pipeline::new(
                registry.clone(),
                metrics.clone(),
                config.worker.max_body_bytes,
            )),
            metrics: metrics.clone(),
            readiness,
        };
        let settings = WorkerSettings {
            url: config.amqp.url.clone(),
            heartbeat_secs: config.amqp.heartbeat_secs,
            prefetch: config.amqp.prefetch,
            concurrency: config.worker.concurrency,
            drain: Duration::from_secs(config.worker.drain_secs),
            grace: STOP_GRACE,
        };
        let drain = settings.drain;
        let consumer = tracker.spawn(consumer.run(settings, cancel.clone(), batch_stop.clone()));
        Ok(Self {
            http_addr,
            tenants: registry,
            metrics,
            reloader,
            cancel,
            batch_stop,
            consumer,
            tracker,
            drain,
        })
    }

    /// The token whose cancellation starts the shutdown [`Self::shutdown`] waits for, for code
    /// that must stop the service without awaiting it (a `Drop`): the consumer stops taking
    /// deliveries and stops reconnecting.
    pub fn stop_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops gracefully, within `worker.drain_secs` + [`STOP_GRACE`] whatever the orgs do:
    ///
    /// 1. stop consuming (`basic.cancel`: the broker sends no more);
    /// 2. drain: messages already taken are processed and settled until `worker.drain_secs`;
    /// 3. past that deadline, stop the batchers and keep the connection open for the requests
    ///    already sent to Salesforce, until the stop grace (less the close budget);
    /// 4. the settle barrier: a synchronous round trip through the work queue, answered only once
    ///    the queue has taken in every ack sent before it;
    /// 5. close the broker connection, handing back every message not acked;
    /// 6. stop the batchers and the background tasks (until the same deadline), flush the cache.
    ///
    /// Guarantee: every message whose graph Salesforce answered as committed is acked at the
    /// queue before the connection closes, so none of them is redelivered after the restart. A
    /// request still unanswered when the grace ends is abandoned; its message is redelivered and
    /// written again idempotently. Steps 1–5 are [`Consumer::run`]'s, see [`crate::consumer`].
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.drain + STOP_GRACE;
        self.cancel.cancel();
        if let Err(error) = self.consumer.await {
            tracing::error!(%error, "consumer task failed");
        }
        self.batch_stop.cancel();
        self.tracker.close();
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "requests to Salesforce still open at the stop deadline were abandoned; their messages are redelivered"
            );
        }
        self.tenants.caches().flush();
    }
}
