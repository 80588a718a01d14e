//! Tenants: each tenant file loaded and compiled into a running [`Tenant`] (its org client,
//! batcher and circuit breaker), the [`Registry`] the pipeline looks them up in, the start-up
//! fallback to a file's last good copy, reloads ([`reload`]) and the periodic check of every
//! mapping against its org ([`org_check`]).

pub mod org_check;
pub mod reload;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{BatchLimits, Batcher, Relater};
use crate::config::{Config, TenantConfig};
use crate::enrich::Caches;
use crate::plan::CompiledMapping;
use crate::salesforce::{CircuitBreaker, OrgEndpoint, SalesforceClient, SalesforceError};
use crate::telemetry::metrics::Metrics;

pub use org_check::{LastCheck, OrgChecks, check_against_org, org_setting_warnings, recheck};
pub use reload::Reloader;

/// One configured tenant, ready to process events.
pub struct Tenant {
    /// Its configuration.
    pub config: TenantConfig,
    /// Its compiled mapping.
    pub mapping: CompiledMapping,
    /// Its org's client.
    pub client: Arc<SalesforceClient>,
    /// Collects its graphs into Composite Graph requests.
    pub batcher: Batcher,
    /// Pauses it while its org fails or its API quota share is used up.
    pub breaker: CircuitBreaker,
    /// Its `portals_crm_salesforce_api_version_not_offered` series, set by [`Tenant::observe`].
    version_not_offered: prometheus::IntGauge,
    /// Its messages in flight in this worker, at most [`BatchLimits::tenant_in_flight`]: one
    /// tenant whose org answers slowly holds no more than this of the shared prefetch window
    /// and concurrency permits.
    slots: Arc<Semaphore>,
    slot_limit: usize,
}

/// The tenant has its limit of messages in flight in this worker; the message is parked in the
/// first retry tier (attempt not counted) so the shared prefetch window keeps moving for the
/// other tenants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the tenant has {limit} bookings in flight in this worker, its limit; parked in the first retry tier"
)]
pub struct TenantBusy {
    /// The tenant's limit of messages in flight.
    pub limit: usize,
}

/// What a message does when its tenant already has its limit of messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Answer [`TenantBusy`] at once, so the message is parked: for the shared queue, where
    /// waiting would hold up the other tenants' messages behind it.
    Park,
    /// Wait for a slot: for a tenant's own queue, whose consumer's prefetch (the tenant's
    /// limit) already bounds how many wait. Parking it would move the tenant's backlog to the
    /// shared queue, where it holds up everyone again.
    Wait,
}

impl Tenant {
    /// A slot for one message in flight, held until the message's write is answered; without
    /// waiting: a tenant at its limit answers [`TenantBusy`] at once.
    pub fn try_slot(&self) -> Result<OwnedSemaphorePermit, TenantBusy> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| self.busy())
    }

    /// A slot as `admission` says: at once or [`TenantBusy`], or once one is free (slots are
    /// returned as writes are answered, which needs no other slot, so the wait ends).
    pub async fn slot(&self, admission: Admission) -> Result<OwnedSemaphorePermit, TenantBusy> {
        match admission {
            Admission::Park => self.try_slot(),
            Admission::Wait => self
                .slots
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| self.busy()),
        }
    }

    fn busy(&self) -> TenantBusy {
        TenantBusy {
            limit: self.slot_limit,
        }
    }

    /// Feeds the breaker with what a Salesforce call showed about the org: a request limit hit
    /// or the quota share used up trips it at once; an org-level failure counts toward opening.
    pub fn observe(&self, failed: Option<&SalesforceError>) {
        // Any other answer came from a request under the version, or never reached the org:
        // only a success clears it.
        match failed {
            Some(SalesforceError::VersionNotOffered { .. }) => self.version_not_offered.set(1),
            None => self.version_not_offered.set(0),
            Some(_) => {}
        }
        if let Some(refused) = failed.and_then(SalesforceError::sign_in_refused) {
            self.breaker.refuse_sign_in(&refused);
            return;
        }
        let limit_hit = failed
            .and_then(SalesforceError::api_error)
            .is_some_and(|e| e.error_code == "REQUEST_LIMIT_EXCEEDED");
        let over_share = self
            .client
            .api_usage()
            .is_some_and(|u| u.ratio() > self.config.limits.api_quota_share);
        if limit_hit || over_share {
            self.breaker.trip();
            return;
        }
        match failed {
            Some(error) if org_unavailable(error) => self.breaker.record_failure(),
            _ => self.breaker.record_success(),
        }
    }
}

/// True when the error says the org (not the record) is the problem.
fn org_unavailable(error: &SalesforceError) -> bool {
    match error {
        SalesforceError::Transport { .. } | SalesforceError::Token { .. } => true,
        SalesforceError::Api { status, .. } => *status >= 500 || *status == 401,
        SalesforceError::Decode { .. }
        | SalesforceError::Refused(_)
        | SalesforceError::VersionNotOffered { .. } => false,
    }
}

/// How every tenant's batcher and breaker are built.
#[derive(Debug, Clone, Copy)]
pub struct TenantSettings {
    /// Batch formation.
    pub batch: BatchLimits,
    /// Consecutive failed requests that open a tenant's circuit.
    pub circuit_failures: u32,
    /// First cool-down of an open circuit.
    pub circuit_cooldown: Duration,
    /// Timeout of one Salesforce request.
    pub timeout: Duration,
}

impl TenantSettings {
    /// The settings of `config`.
    pub fn from_config(config: &Config) -> Self {
        Self {
            batch: BatchLimits {
                max_graphs: config.batch.max_graphs,
                max_nodes: config.batch.max_nodes,
                linger: Duration::from_millis(config.batch.linger_ms),
                max_in_flight: config.batch.max_in_flight,
            },
            circuit_failures: config.salesforce.circuit_failures,
            circuit_cooldown: Duration::from_secs(config.salesforce.circuit_cooldown_secs),
            timeout: Duration::from_secs(config.salesforce.timeout_secs),
        }
    }
}

/// A tenant file, compiled, with its org's client.
pub struct LoadedTenant {
    /// The file.
    pub config: TenantConfig,
    /// Its compiled mapping.
    pub mapping: CompiledMapping,
    /// Its org's client.
    pub client: Arc<SalesforceClient>,
}

/// Compiles every tenant file and builds its client; reports every problem at once.
pub fn load_tenants(
    tenants: Vec<TenantConfig>,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Result<Vec<LoadedTenant>, Vec<String>> {
    let mut problems = Vec::new();
    let mut built = Vec::new();
    for tenant in tenants {
        match load_tenant(tenant, timeout, metrics) {
            Ok(loaded) => built.push(loaded),
            Err(found) => problems.extend(found),
        }
    }
    all_or_problems(built, problems)
}

/// The tenants, unless there were problems (or no tenant at all).
fn all_or_problems(
    built: Vec<LoadedTenant>,
    mut problems: Vec<String>,
) -> Result<Vec<LoadedTenant>, Vec<String>> {
    if built.is_empty() && problems.is_empty() {
        problems.push("no tenant files found".into());
    }
    if problems.is_empty() {
        Ok(built)
    } else {
        Err(problems)
    }
}

/// Compiles one tenant's mapping and builds its org client.
fn load_tenant(
    tenant: TenantConfig,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Result<LoadedTenant, Vec<String>> {
    let mut problems = Vec::new();
    let mapping = CompiledMapping::compile(&tenant).map_err(|p| problems.extend(p));
    let client = OrgEndpoint::for_tenant(&tenant, timeout)
        .and_then(|e| SalesforceClient::new(e, metrics.clone()).map_err(|e| e.to_string()))
        .map_err(|e| problems.push(format!("tenant {}: {e}", tenant.tenant)));
    match (mapping, client) {
        (Ok(mapping), Ok(client)) => Ok(LoadedTenant {
            config: tenant,
            mapping,
            client: Arc::new(client),
        }),
        _ => Err(problems),
    }
}

/// Loads the tenant directory at start-up. A file that does not load or compile is replaced by
/// its last good copy from the cache, so one broken edit does not keep every tenant down across
/// a restart; the problem is logged as an error and `portals_crm_tenant_file_rejected` is set.
/// A broken file with no good copy fails the start, with every problem listed.
pub fn load_dir_with_fallback(
    dir: &Path,
    caches: &Caches,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Result<Vec<LoadedTenant>, Vec<String>> {
    let files = TenantConfig::load_each(dir).map_err(|e| vec![e])?;
    let mut built = Vec::new();
    let mut problems = Vec::new();
    for (file, loaded) in files {
        let current = loaded
            .map_err(|e| vec![e])
            .and_then(|tenant| load_tenant(tenant, timeout, metrics));
        match current {
            Ok(tenant) => built.push(tenant),
            Err(found) => match last_good(dir, &file, caches, timeout, metrics) {
                Some(tenant) => {
                    for problem in &found {
                        tracing::error!(
                            tenant = %tenant.config.tenant,
                            %problem,
                            "tenant file rejected; running its last good copy from the cache"
                        );
                    }
                    metrics
                        .tenant_file_rejected
                        .with_label_values(&[tenant.config.tenant.as_str()])
                        .set(1);
                    built.push(tenant);
                }
                None => problems.extend(found),
            },
        }
    }
    all_or_problems(built, problems)
}

/// The last good copy of tenant file `file` of `dir`, loaded, if the cache has one that still
/// loads. Its relative paths resolve against `dir`, as the file's own would.
fn last_good(
    dir: &Path,
    file: &str,
    caches: &Caches,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Option<LoadedTenant> {
    let source = caches.tenant_get(file)?;
    let mut config = TenantConfig::parse(source, &format!("{file} (last good copy)")).ok()?;
    config.resolve_paths(dir);
    // Already kept: starting from it must not count as a fresh good copy.
    config.source = None;
    load_tenant(config, timeout, metrics).ok()
}

/// The running tenants, swapped whole by a reload.
pub struct Registry {
    /// A std RwLock: held only to clone an `Arc`, never across an await; a message keeps the
    /// tenant it started with until it settles.
    tenants: std::sync::RwLock<HashMap<String, Arc<Tenant>>>,
    caches: Caches,
    org_checks: OrgChecks,
    metrics: Arc<Metrics>,
    settings: TenantSettings,
    tracker: TaskTracker,
    batch_stop: CancellationToken,
    /// The configured tenant ids, sorted: the consumer follows it to consume one queue per
    /// tenant ([`crate::consumer`]).
    names: tokio::sync::watch::Sender<Vec<String>>,
}

impl Registry {
    /// Builds one batcher and circuit breaker per tenant. Batchers are spawned on `tracker` and
    /// stop at `batch_stop`.
    pub fn new(
        tenants: Vec<LoadedTenant>,
        caches: Caches,
        metrics: Arc<Metrics>,
        settings: TenantSettings,
        tracker: &TaskTracker,
        batch_stop: &CancellationToken,
    ) -> Self {
        let registry = Self {
            tenants: std::sync::RwLock::default(),
            caches,
            org_checks: OrgChecks::default(),
            metrics,
            settings,
            tracker: tracker.clone(),
            batch_stop: batch_stop.clone(),
            names: tokio::sync::watch::Sender::new(Vec::new()),
        };
        let built = registry.build(tenants);
        registry.swap(built);
        registry
    }

    /// Installs `built` as the running tenants and announces their ids.
    fn swap(&self, built: HashMap<String, Arc<Tenant>>) {
        let mut names: Vec<String> = built.keys().cloned().collect();
        names.sort();
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = built;
        self.names.send_replace(names);
    }

    /// The configured tenant ids (sorted), now and after every reload.
    pub fn watch_names(&self) -> tokio::sync::watch::Receiver<Vec<String>> {
        self.names.subscribe()
    }

    /// Each tenant's limit of messages in flight in this worker (the same for every tenant).
    pub fn in_flight_limit(&self) -> usize {
        self.settings.batch.tenant_in_flight()
    }

    fn build(&self, tenants: Vec<LoadedTenant>) -> HashMap<String, Arc<Tenant>> {
        tenants
            .into_iter()
            .map(|loaded| {
                let LoadedTenant {
                    config,
                    mapping,
                    client,
                } = loaded;
                if let Some(source) = &config.source {
                    self.caches.tenant_put(source);
                    self.metrics
                        .tenant_file_rejected
                        .with_label_values(&[config.tenant.as_str()])
                        .set(0);
                }
                let relater = mapping.relations().map(|spec| Relater {
                    spec: spec.clone(),
                    api_version: mapping.api_version().to_owned(),
                    caches: self.caches.clone(),
                });
                let batcher = Batcher::spawn_relating(
                    client.clone(),
                    self.settings.batch,
                    &self.tracker,
                    self.batch_stop.clone(),
                    relater,
                );
                let gauge = self
                    .metrics
                    .circuit_open
                    .with_label_values(&[config.tenant.as_str()]);
                let breaker = CircuitBreaker::new(
                    self.settings.circuit_failures,
                    self.settings.circuit_cooldown,
                    gauge,
                )
                .reporting_sign_in(&config.tenant, self.metrics.salesforce_auth_refused.clone());
                let slot_limit = self.settings.batch.tenant_in_flight();
                let version_not_offered = self
                    .metrics
                    .salesforce_api_version_not_offered
                    .with_label_values(&[config.tenant.as_str()]);
                let tenant = Tenant {
                    version_not_offered,
                    config,
                    mapping,
                    client,
                    batcher,
                    breaker,
                    slots: Arc::new(Semaphore::new(slot_limit)),
                    slot_limit,
                };
                (tenant.config.tenant.clone(), Arc::new(tenant))
            })
            .collect()
    }

    /// The tenant with this id.
    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every configured tenant, sorted by id.
    pub fn all(&self) -> Vec<Arc<Tenant>> {
        let mut all: Vec<Arc<Tenant>> = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.config.tenant.cmp(&b.config.tenant));
        all
    }

    /// The caches (describes, users, ledger, tenant copies).
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Each tenant's last check of its mapping against its org.
    pub fn org_checks(&self) -> &OrgChecks {
        &self.org_checks
    }

    /// Replaces every tenant at once with `configs`, after compiling each mapping and checking
    /// it against its org. Any problem (an API version the org does not offer is one) rejects the
    /// whole change and the running tenants stay.
    /// An org that cannot be reached does not block a reload (its mapping is checked when the
    /// org answers: a write error dead-letters with the field).
    pub async fn replace(&self, configs: Vec<TenantConfig>) -> Result<Vec<String>, Vec<String>> {
        let loaded = load_tenants(configs, self.settings.timeout, &self.metrics)?;
        let mut problems = Vec::new();
        let mut checked = Vec::new();
        for tenant in &loaded {
            let result = check_against_org(&self.caches, &tenant.config, &tenant.client).await;
            checked.push((tenant.config.tenant.clone(), result.clone()));
            match result {
                Ok(found) => problems.extend(found.iter().map(ToString::to_string)),
                // The org answered: this file's version would fail every write.
                Err(error @ SalesforceError::VersionNotOffered { .. }) => {
                    problems.push(format!("tenant {}: {error}", tenant.config.tenant));
                }
                Err(error) => tracing::warn!(
                    tenant = %tenant.config.tenant,
                    %error,
                    "mapping not checked against the org (unreachable); loading it anyway"
                ),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        // Only an accepted change replaces the last checks: a refused one leaves the running
        // mappings, whose checks still hold.
        for (tenant, result) in &checked {
            self.org_checks.record(tenant, result);
        }
        let names: Vec<String> = loaded.iter().map(|t| t.config.tenant.clone()).collect();
        let built = self.build(loaded);
        self.swap(built);
        Ok(names)
    }
}
