//! Builds every component from [`Config`] (everything that can fail at start-up fails here),
//! runs the consumer until cancelled, and shuts down in order: stop consuming, drain in-flight
//! messages within the deadline, close the broker connection (handing back the rest), flush.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::{self, Publisher, Topology};
use crate::batch::{BatchLimits, Batcher, GraphOutcome};
use crate::config::{Config, TenantConfig};
use crate::enrich::{Caches, LedgerEntry, enrich};
use crate::event::{self, BookingEvent};
use crate::outcome::{Disposition, Failure, MessageInfo, Settled, Settler, headers};
use crate::plan::CompiledMapping;
use crate::plan::validate::{MappingProblem, validate};
use crate::retry_policy::Reconnect;
use crate::salesforce::model::{ApiError, GraphResult, Subrequest};
use crate::salesforce::{CircuitBreaker, Class, SalesforceClient, SalesforceError};
use crate::telemetry::admin::AdminAccess;
use crate::telemetry::http::Readiness;
use crate::telemetry::logging::redact;
use crate::telemetry::metrics::Metrics;

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

/// One configured tenant, ready to process events.
pub struct Tenant {
    /// Its configuration.
    pub config: TenantConfig,
    /// Its compiled mapping.
    pub mapping: CompiledMapping,
    /// Its org's client.
    pub client: Arc<SalesforceClient>,
    batcher: Batcher,
    breaker: CircuitBreaker,
}

impl Tenant {
    /// Feeds the breaker with what a Salesforce call showed about the org.
    fn observe(&self, failed: Option<&SalesforceError>) {
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
        SalesforceError::Decode { .. } | SalesforceError::Refused(_) => false,
    }
}

/// How the pipeline batches, pauses tenants and bounds bodies.
#[derive(Debug, Clone, Copy)]
pub struct PipelineSettings {
    /// Batch formation.
    pub batch: BatchLimits,
    /// Consecutive failed requests that open a tenant's circuit.
    pub circuit_failures: u32,
    /// First cool-down of an open circuit.
    pub circuit_cooldown: Duration,
    /// Bodies over this are dead-lettered unread.
    pub max_body_bytes: usize,
}

impl PipelineSettings {
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
            max_body_bytes: config.worker.max_body_bytes,
        }
    }
}

/// Everything a message needs on its way through decode → enrich → plan → batch.
pub struct Pipeline {
    /// Swapped whole by a reload. A std RwLock: held only to clone an `Arc`, never across an
    /// await; a message keeps the tenant it started with until it settles.
    tenants: std::sync::RwLock<HashMap<String, Arc<Tenant>>>,
    caches: Caches,
    metrics: Arc<Metrics>,
    settings: PipelineSettings,
    timeout: Duration,
    tracker: TaskTracker,
    batch_stop: CancellationToken,
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
    let client = tenant
        .endpoint(timeout)
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
    dir: &std::path::Path,
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
            Err(found) => match last_good(&file, caches, timeout, metrics) {
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

/// The last good copy of tenant file `file`, loaded, if the cache has one that still loads.
fn last_good(
    file: &str,
    caches: &Caches,
    timeout: Duration,
    metrics: &Arc<Metrics>,
) -> Option<LoadedTenant> {
    let source = caches.tenant_get(file)?;
    let mut config = TenantConfig::parse(source, &format!("{file} (last good copy)")).ok()?;
    // Already kept: starting from it must not count as a fresh good copy.
    config.source = None;
    load_tenant(config, timeout, metrics).ok()
}

/// The result of processing one message, before it is settled.
struct Processed {
    info: MessageInfo,
    type_label: &'static str,
    disposition: Disposition,
}

fn failure(code: impl Into<String>, message: impl Into<String>, sf: Option<ApiError>) -> Failure {
    Failure {
        code: code.into(),
        message: message.into(),
        salesforce: sf,
    }
}

/// Maps a Salesforce class and error to what happens to the message.
fn disposition_for(class: Class, error: Option<ApiError>, message: String) -> Disposition {
    let code = error
        .as_ref()
        .map(|e| format!("salesforce_{}", e.error_code.to_ascii_lowercase()))
        .unwrap_or_else(|| "salesforce_unavailable".into());
    match class {
        Class::Success => Disposition::Written,
        Class::Superseded => Disposition::Superseded,
        Class::Transient { retry_after } => Disposition::Retry {
            failure: failure(code, message, error),
            retry_after,
        },
        Class::Permanent => Disposition::DeadLetter(failure(code, message, error)),
    }
}

fn error_disposition(error: &SalesforceError) -> Disposition {
    if let Some(refused) = error.sign_in_refused() {
        return Disposition::Wait {
            failure: failure(refused.reason_code(), refused.to_string(), None),
            retry_after: None,
        };
    }
    disposition_for(error.class(), error.api_error().cloned(), error.to_string())
}

fn shutting_down(stopped: &crate::batch::BatcherStopped) -> Disposition {
    Disposition::Retry {
        failure: failure("shutting_down", stopped.to_string(), None),
        retry_after: None,
    }
}

/// True when a graph failed only because a record it deletes does not exist (any more).
fn already_deleted(result: &GraphResult, deletes: &[Subrequest]) -> bool {
    !result.is_successful
        && result.graph_response.composite_response.iter().any(|node| {
            deletes.iter().any(|d| d.reference_id == node.reference_id)
                && node.http_status_code == 404
        })
        && result
            .root_error()
            .is_some_and(|e| e.error_code == "NOT_FOUND")
}

fn sobject_of(url: &str) -> &str {
    url.split("/sobjects/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("?")
}

impl Pipeline {
    /// Builds the pipeline: one client, batcher and circuit breaker per tenant.
    pub fn new(
        tenants: Vec<LoadedTenant>,
        caches: Caches,
        metrics: Arc<Metrics>,
        settings: PipelineSettings,
        timeout: Duration,
        tracker: &TaskTracker,
        batch_stop: &CancellationToken,
    ) -> Self {
        let pipeline = Self {
            tenants: std::sync::RwLock::default(),
            caches,
            metrics,
            settings,
            timeout,
            tracker: tracker.clone(),
            batch_stop: batch_stop.clone(),
        };
        let built = pipeline.build(tenants);
        *pipeline.tenants.write().unwrap_or_else(|e| e.into_inner()) = built;
        pipeline
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
                let batcher = Batcher::spawn(
                    client.clone(),
                    self.settings.batch,
                    &self.tracker,
                    self.batch_stop.clone(),
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
                let tenant = Tenant {
                    config,
                    mapping,
                    client,
                    batcher,
                    breaker,
                };
                (tenant.config.tenant.clone(), Arc::new(tenant))
            })
            .collect()
    }

    /// The tenant with this id.
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every configured tenant, sorted by id.
    pub fn tenants(&self) -> Vec<Arc<Tenant>> {
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

    /// The caches (the admin API reads describes from them).
    pub fn caches(&self) -> &Caches {
        &self.caches
    }

    /// Problems of `tenant`'s mapping against its org, as the integration user sees it. `Err`
    /// when the org could not be asked (the mapping is then neither accepted nor refused).
    pub async fn check_against_org(
        &self,
        config: &TenantConfig,
        client: &SalesforceClient,
    ) -> Result<Vec<MappingProblem>, SalesforceError> {
        let mut describes = HashMap::new();
        for record in &config.records {
            if let Some(describe) = self.caches.describe(client, &record.sobject).await? {
                describes.insert(record.sobject.clone(), describe);
            }
        }
        Ok(validate(config, &describes))
    }

    /// Replaces every tenant at once with `configs`, after compiling each mapping and checking
    /// it against its org. Any problem rejects the whole change and the running tenants stay.
    /// An org that cannot be reached does not block a reload (its mapping is checked when the
    /// org answers: a write error dead-letters with the field).
    pub async fn reload(&self, configs: Vec<TenantConfig>) -> Result<Vec<String>, Vec<String>> {
        let loaded = load_tenants(configs, self.timeout, &self.metrics)?;
        let mut problems = Vec::new();
        for tenant in &loaded {
            match self.check_against_org(&tenant.config, &tenant.client).await {
                Ok(found) => problems.extend(found.iter().map(ToString::to_string)),
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
        let names: Vec<String> = loaded.iter().map(|t| t.config.tenant.clone()).collect();
        let built = self.build(loaded);
        *self.tenants.write().unwrap_or_else(|e| e.into_inner()) = built;
        Ok(names)
    }

    /// Flushes the caches (shutdown).
    pub fn flush(&self) {
        self.caches.flush();
    }

    fn tenant_label(&self, tenant: Option<&str>) -> String {
        match tenant {
            Some(t) if self.tenant(t).is_some() => t.to_owned(),
            _ => "unknown".to_owned(),
        }
    }

    async fn process(&self, body: &[u8]) -> Processed {
        let event = match event::decode(body, self.settings.max_body_bytes) {
            Ok(event) => event,
            Err(invalid) => {
                let tenant = self.tenant_label(event::peek_tenant(body).as_deref());
                self.metrics
                    .events_received
                    .with_label_values(&[tenant.as_str(), "invalid"])
                    .inc();
                return Processed {
                    info: MessageInfo {
                        tenant,
                        ..MessageInfo::default()
                    },
                    type_label: "invalid",
                    disposition: Disposition::DeadLetter(failure(
                        "invalid_event",
                        invalid.to_string(),
                        None,
                    )),
                };
            }
        };
        let tenant_label = self.tenant_label(Some(&event.tenant));
        let type_label = event.kind.as_str();
        self.metrics
            .events_received
            .with_label_values(&[tenant_label.as_str(), type_label])
            .inc();
        let info = MessageInfo {
            tenant: tenant_label,
            booking_id: Some(event.booking.booking_id.clone()),
            event_id: Some(event.id.clone()),
        };
        let disposition = match self.tenant(&event.tenant) {
            None => Disposition::DeadLetter(failure(
                "unknown_tenant",
                format!("tenant {:?} is not configured", event.tenant),
                None,
            )),
            Some(tenant) => self.write(&tenant, &event).await,
        };
        Processed {
            info,
            type_label,
            disposition,
        }
    }

    async fn write(&self, tenant: &Tenant, event: &BookingEvent) -> Disposition {
        let booking = &event.booking;
        if let Some(applied) = self.caches.ledger_get(&event.tenant, &booking.booking_id)
            && applied.version >= booking.version
        {
            return Disposition::Superseded;
        }
        if let Err(open) = tenant.breaker.allow() {
            if let Some(reason) = open.sign_in {
                return Disposition::Wait {
                    failure: failure(reason, open.to_string(), None),
                    retry_after: Some(open.retry_in),
                };
            }
            // Wait at least until the next probe: an earlier return would only spend an attempt.
            return Disposition::Retry {
                failure: failure("circuit_open", open.to_string(), None),
                retry_after: Some(open.retry_in),
            };
        }
        let enrichment = match enrich(event, &tenant.client, &self.caches).await {
            Ok(e) => e,
            Err(error) => {
                tenant.observe(Some(&error));
                return error_disposition(&error);
            }
        };
        let nodes = match tenant.mapping.build_graph(event, &enrichment) {
            Ok(nodes) => nodes,
            Err(error) => {
                return Disposition::DeadLetter(failure("mapping_error", error.to_string(), None));
            }
        };
        let sobjects: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n.reference_id.clone(), sobject_of(&n.url).to_owned()))
            .collect();
        let deletes: Vec<Subrequest> = nodes
            .iter()
            .filter(|n| n.method == "DELETE")
            .cloned()
            .collect();
        let mut outcome = match tenant
            .batcher
            .submit(&booking.booking_id, booking.version, nodes.clone())
            .await
        {
            Ok(outcome) => outcome,
            Err(stopped) => return shutting_down(&stopped),
        };
        if let GraphOutcome::Answered(result) = &outcome
            && already_deleted(result, &deletes)
        {
            // A replay: what the mapping deletes is gone already, which rolled the graph back.
            // Write the rest without the deletes.
            let rest: Vec<Subrequest> =
                nodes.into_iter().filter(|n| n.method != "DELETE").collect();
            outcome = match tenant
                .batcher
                .submit(&booking.booking_id, booking.version, rest)
                .await
            {
                Ok(outcome) => outcome,
                Err(stopped) => return shutting_down(&stopped),
            };
        }
        match &outcome {
            GraphOutcome::RequestFailed(error) => tenant.observe(Some(error)),
            GraphOutcome::Answered(_) => tenant.observe(None),
            GraphOutcome::Collapsed => {}
        }
        match outcome {
            GraphOutcome::Collapsed => Disposition::Superseded,
            GraphOutcome::RequestFailed(error) => error_disposition(&error),
            GraphOutcome::Answered(result) if result.is_successful => {
                self.record_write(event, &result, &sobjects);
                Disposition::Written
            }
            GraphOutcome::Answered(result) => {
                let error = result.root_error();
                let class = error
                    .as_ref()
                    .map(crate::salesforce::error::classify_api_error)
                    .unwrap_or(Class::Transient { retry_after: None });
                let message = error
                    .as_ref()
                    .map(|e| {
                        format!(
                            "Salesforce rolled the booking back: {}: {}{}",
                            e.error_code,
                            e.message,
                            if e.fields.is_empty() {
                                String::new()
                            } else {
                                format!(" [{}]", e.fields.join(", "))
                            }
                        )
                    })
                    .unwrap_or_else(|| "Salesforce rolled the booking back".into());
                disposition_for(class, error, message)
            }
        }
    }

    fn record_write(
        &self,
        event: &BookingEvent,
        result: &GraphResult,
        sobjects: &[(String, String)],
    ) {
        let booking = &event.booking;
        let mut record_ids = Vec::new();
        for node in &result.graph_response.composite_response {
            let Some(id) = node.record_id() else { continue };
            let sobject = sobjects
                .iter()
                .find(|(r, _)| *r == node.reference_id)
                .map(|(_, s)| s.as_str())
                .unwrap_or("?");
            tracing::info!(
                target: "portals_crm::audit",
                tenant = %event.tenant,
                booking_id = %booking.booking_id,
                version = booking.version,
                sobject,
                record_id = id,
                created = node.created().unwrap_or(false),
                "salesforce write"
            );
            record_ids.push((node.reference_id.clone(), id.to_owned()));
        }
        self.caches.ledger_put(
            &event.tenant,
            &booking.booking_id,
            &LedgerEntry {
                version: booking.version,
                record_ids,
            },
        );
        let lag = (OffsetDateTime::now_utc() - event.time)
            .as_seconds_f64()
            .max(0.0);
        self.metrics
            .lag_seconds
            .with_label_values(&[event.tenant.as_str()])
            .observe(lag);
    }

    /// Processes one delivery and settles it; the only caller of [`Settler::settle`].
    async fn handle(&self, delivery: Delivery, settler: &Settler) {
        let started = Instant::now();
        self.metrics.inflight.inc();
        let attempt = amqp::header_int(delivery.properties.headers().as_ref(), headers::ATTEMPT)
            .unwrap_or(0)
            + 1;
        let span = tracing::info_span!(
            "message",
            event_id = tracing::field::Empty,
            tenant = tracing::field::Empty,
            booking_id = tracing::field::Empty,
            attempt
        );
        async {
            let processed = self.process(&delivery.data).await;
            let span = tracing::Span::current();
            span.record("tenant", processed.info.tenant.as_str());
            if let Some(id) = &processed.info.event_id {
                span.record("event_id", id.as_str());
            }
            if let Some(id) = &processed.info.booking_id {
                span.record("booking_id", id.as_str());
            }
            if let Disposition::Retry { failure, .. } | Disposition::DeadLetter(failure) =
                &processed.disposition
            {
                tracing::warn!(reason = %failure.code, message = %redact(&failure.message), "booking not written");
            }
            let dead_reason = match &processed.disposition {
                Disposition::DeadLetter(f) => Some(f.code.clone()),
                _ => None,
            };
            match settler
                .settle(&delivery, &processed.info, processed.disposition)
                .await
            {
                Ok(settled) => {
                    let tenant = processed.info.tenant.as_str();
                    self.metrics
                        .events_settled
                        .with_label_values(&[tenant, processed.type_label, settled.label()])
                        .inc();
                    match settled {
                        Settled::Retried { tier } => self
                            .metrics
                            .retries
                            .with_label_values(&[tenant, &tier.to_string()])
                            .inc(),
                        Settled::DeadLettered => {
                            let reason = dead_reason.unwrap_or_else(|| "retries_exhausted".into());
                            self.metrics
                                .dead_letters
                                .with_label_values(&[tenant, reason.as_str()])
                                .inc();
                        }
                        Settled::Written | Settled::Superseded => {}
                    }
                    self.metrics
                        .processing(tenant)
                        .observe(started.elapsed().as_secs_f64());
                }
                Err(error) => tracing::error!(%error, "message not settled; the broker will redeliver it"),
            }
        }
        .instrument(span)
        .await;
        self.metrics.inflight.dec();
    }
}

/// Reloads the tenant files into a running pipeline: one reload at a time, from the admin API,
/// SIGHUP, or the directory watcher.
#[derive(Clone)]
pub struct Reloader {
    pipeline: Arc<Pipeline>,
    dir: std::path::PathBuf,
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
}

impl Reloader {
    /// A reloader of `dir` into `pipeline`.
    pub fn new(pipeline: Arc<Pipeline>, dir: std::path::PathBuf) -> Self {
        Self {
            pipeline,
            dir,
            one_at_a_time: Arc::default(),
        }
    }

    /// Loads, compiles and checks every tenant file, and swaps them in — or keeps the running
    /// tenants and returns every problem.
    pub async fn reload(&self) -> Result<Vec<String>, Vec<String>> {
        let _one = self.one_at_a_time.lock().await;
        let configs = TenantConfig::load_dir(&self.dir)?;
        let result = self.pipeline.reload(configs).await;
        match &result {
            Ok(names) => tracing::info!(tenants = ?names, "tenants reloaded"),
            Err(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "tenant change rejected; the running mapping stays");
                }
            }
        }
        result
    }

    /// What the directory holds now: names, sizes and modification times of the tenant files.
    fn fingerprint(&self) -> Vec<(std::path::PathBuf, u64, Option<std::time::SystemTime>)> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
            .map(|e| {
                let meta = e.metadata().ok();
                (
                    e.path(),
                    meta.as_ref().map_or(0, std::fs::Metadata::len),
                    meta.and_then(|m| m.modified().ok()),
                )
            })
            .collect();
        files.sort();
        files
    }

    /// Reloads whenever the tenant files change, until `cancel`.
    pub async fn watch(self, every: Duration, cancel: CancellationToken) {
        let mut seen = self.fingerprint();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = cancel.cancelled() => return,
            }
            let now = self.fingerprint();
            if now != seen {
                seen = now;
                // A rejected change is logged by `reload`; it is retried when the files change again.
                let _ = self.reload().await;
            }
        }
    }
}

/// Checks every tenant's mapping against its org at start and then every `every` (describes
/// revalidated with If-Modified-Since, so mostly 304s), and logs what a Salesforce admin would
/// have to fix — a permission revoked in the org shows up here before writes fail. A start
/// never waits for (or fails on) an org.
async fn watch_orgs(pipeline: Arc<Pipeline>, every: Option<Duration>, cancel: CancellationToken) {
    loop {
        check_tenants_against_orgs(&pipeline).await;
        let Some(every) = every else { return };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Removes ledger entries older than `ttl`, one bounded slice a minute, so the ledger on disk
/// stops growing with every booking ever written and a large one never costs a long pause.
async fn expire_ledger(caches: Caches, ttl: Duration, cancel: CancellationToken) {
    const SLICE: usize = 50_000;
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = cancel.cancelled() => return,
        }
        let cutoff = std::time::SystemTime::now()
            .checked_sub(ttl)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let slice = caches.clone();
        let from = cursor.take();
        let Ok((removed, next)) = tokio::task::spawn_blocking(move || {
            slice.ledger_expire(cutoff, from.as_deref(), SLICE)
        })
        .await
        else {
            return;
        };
        if removed > 0 {
            tracing::info!(removed, "expired ledger entries");
        }
        cursor = next;
    }
}

async fn check_tenants_against_orgs(pipeline: &Pipeline) {
    for tenant in pipeline.tenants() {
        match pipeline
            .check_against_org(&tenant.config, &tenant.client)
            .await
        {
            Ok(problems) if problems.is_empty() => {
                tracing::info!(tenant = %tenant.config.tenant, "mapping valid against the org");
            }
            Ok(problems) => {
                for problem in problems {
                    tracing::error!(%problem, "mapping problem: writes will be dead-lettered until it is fixed");
                }
            }
            Err(error) => match error.sign_in_refused() {
                // Paused now rather than at its first booking, which would meet the same refusal.
                Some(refused) => tenant.breaker.refuse_sign_in(&refused),
                None => {
                    tracing::warn!(tenant = %tenant.config.tenant, %error, "mapping not checked: org unreachable")
                }
            },
        }
    }
}

/// Worker settings taken from [`Config`].
#[derive(Clone)]
pub struct WorkerSettings {
    /// Broker URL.
    pub url: secrecy::SecretString,
    /// Heartbeat interval.
    pub heartbeat_secs: u16,
    /// Per-consumer prefetch.
    pub prefetch: u16,
    /// Messages processed at once.
    pub concurrency: usize,
    /// Drain deadline on shutdown.
    pub drain: Duration,
}

/// Consumes the work queue until `cancel`: connects (with backoff), declares the topology,
/// consumes with manual acks and per-consumer prefetch, and reconnects on loss. In-flight
/// messages of a lost connection are simply redelivered: every write is an idempotent upsert.
pub async fn run_consumer(
    settings: WorkerSettings,
    topology: Arc<Topology>,
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    cancel: CancellationToken,
) {
    let mut backoff = Reconnect::new(Duration::from_millis(200), Duration::from_secs(30));
    let permits = Arc::new(Semaphore::new(settings.concurrency));
    let mut first = true;
    while !cancel.is_cancelled() {
        if !first {
            metrics.amqp_reconnects.inc();
        }
        first = false;
        let session = consume_once(
            &settings,
            &topology,
            &pipeline,
            &metrics,
            &readiness,
            &permits,
            &cancel,
            &mut backoff,
        )
        .await;
        readiness.set_broker(false);
        metrics.amqp_connected.set(0);
        if let Err(error) = session {
            let delay = backoff.next_delay();
            tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "broker connection lost");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => {}
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn consume_once(
    settings: &WorkerSettings,
    topology: &Topology,
    pipeline: &Arc<Pipeline>,
    metrics: &Metrics,
    readiness: &Readiness,
    permits: &Arc<Semaphore>,
    cancel: &CancellationToken,
    backoff: &mut Reconnect,
) -> Result<(), lapin::Error> {
    // The queue in the name tells ops (and `rabbitmqctl list_connections`) which worker it is.
    let name = format!("portals-crm worker {}", topology.work_queue);
    let connection = amqp::connect(&settings.url, settings.heartbeat_secs, &name).await?;
    let publisher = Publisher::open(&connection).await?;
    topology.declare(publisher.channel()).await?;
    let channel = connection.create_channel().await?;
    // Per-consumer QoS: global QoS on a quorum queue closes the connection.
    channel
        .basic_qos(settings.prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            topology.work_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    readiness.set_broker(true);
    metrics.amqp_connected.set(1);
    backoff.reset();
    tracing::info!(queue = %topology.work_queue, prefetch = settings.prefetch, "consuming");
    let settler = Settler::new(publisher, Arc::new(topology.clone()));
    let in_flight = TaskTracker::new();
    let result = loop {
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else { break Ok(()) };
                    let pipeline = pipeline.clone();
                    let settler = settler.clone();
                    in_flight.spawn(async move {
                        pipeline.handle(delivery, &settler).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => break Err(error),
                None => break Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                    lapin::ConnectionState::Closed,
                ))),
            }
        }
    };
    if cancel.is_cancelled() {
        // Stop deliveries first so nothing new starts while the rest drains.
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
    }
    in_flight.close();
    if tokio::time::timeout(settings.drain, in_flight.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "drain deadline passed; unsettled messages go back to the queue with the connection"
        );
    }
    let _ = connection
        .close(200, "portals-crm shutting down".into())
        .await;
    result
}

/// A running service: where its HTTP port is, and how to stop it.
pub struct Service {
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The pipeline (tests and the demo read its tenants).
    pub pipeline: Arc<Pipeline>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Reloads the tenant files (SIGHUP, the admin API).
    pub reloader: Reloader,
    cancel: CancellationToken,
    batch_stop: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
}

impl Service {
    /// Builds every component from `config` and starts consuming. `tenants` overrides the
    /// tenant directory (the demo points them at its in-process emulator).
    pub async fn start(config: &Config, tenants: Vec<TenantConfig>) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_secs(config.salesforce.timeout_secs);
        let tenants = load_tenants(tenants, timeout, &metrics).map_err(BuildError::Tenants)?;
        let caches = Caches::open(&config.cache, metrics.clone())?;
        Self::start_loaded(config, tenants, caches, metrics).await
    }

    /// Starts from the tenant directory of `config`; a broken tenant file falls back to its
    /// last good copy (see [`load_dir_with_fallback`]).
    pub async fn start_from_dir(config: &Config) -> Result<Self, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let timeout = Duration::from_secs(config.salesforce.timeout_secs);
        let caches = Caches::open(&config.cache, metrics.clone())?;
        let tenants = load_dir_with_fallback(&config.tenants.dir, &caches, timeout, &metrics)
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
        let timeout = Duration::from_secs(config.salesforce.timeout_secs);
        let cancel = CancellationToken::new();
        // Batchers stop only after the consumer has drained: in-flight messages still need them.
        let batch_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let pipeline = Arc::new(Pipeline::new(
            tenants,
            caches,
            metrics.clone(),
            PipelineSettings::from_config(config),
            timeout,
            &tracker,
            &batch_stop,
        ));
        readiness.set_tenants(true);
        let reloader = Reloader::new(pipeline.clone(), config.tenants.dir.clone());
        let listen: SocketAddr = config.http.listen.parse().map_err(|_| BuildError::Listen {
            addr: config.http.listen.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address"),
        })?;
        let token = config
            .http
            .admin_token_env
            .as_ref()
            .and_then(|name| std::env::var(name).ok())
            .or_else(|| {
                let path = config.http.admin_token_file.as_ref()?;
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let access = match (token, listen.ip().is_loopback()) {
            (Some(token), _) => AdminAccess::Token(Arc::new(secrecy::SecretString::from(token))),
            (None, true) => AdminAccess::Local,
            (None, false) => AdminAccess::Disabled,
        };
        let admin = crate::telemetry::admin::router(pipeline.clone(), reloader.clone(), access);
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
            tracker.spawn(expire_ledger(
                pipeline.caches().clone(),
                Duration::from_secs(config.cache.ledger_ttl_days * 86_400),
                cancel.clone(),
            ));
        }
        let refresh = config.cache.describe_refresh_secs;
        tracker.spawn(watch_orgs(
            pipeline.clone(),
            (refresh > 0).then(|| Duration::from_secs(refresh)),
            cancel.clone(),
        ));
        if config.tenants.watch_secs > 0 {
            tracker.spawn(reloader.clone().watch(
                Duration::from_secs(config.tenants.watch_secs),
                cancel.clone(),
            ));
        }
        let topology = Arc::new(Topology::new(&config.amqp, &config.retry_tiers()));
        let settings = WorkerSettings {
            url: config.amqp.url.clone(),
            heartbeat_secs: config.amqp.heartbeat_secs,
            prefetch: config.amqp.prefetch,
            concurrency: config.worker.concurrency,
            drain: Duration::from_secs(config.worker.drain_secs),
        };
        let consumer = tracker.spawn(run_consumer(
            settings,
            topology,
            pipeline.clone(),
            metrics.clone(),
            readiness,
            cancel.clone(),
        ));
        Ok(Self {
            http_addr,
            pipeline,
            metrics,
            reloader,
            cancel,
            batch_stop,
            consumer,
            tracker,
        })
    }

    /// Stops consuming, drains, closes, flushes.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if let Err(error) = self.consumer.await {
            tracing::error!(%error, "consumer task failed");
        }
        self.batch_stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.pipeline.flush();
    }
}
