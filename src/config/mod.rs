//! Service configuration: `config/portals-crm.toml`, overlaid by `PORTALS_CRM_<SECTION>_<KEY>`
//! environment variables, validated with every problem reported at once.

pub mod tenant;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use tenant::{
    Action, AuthConfig, DuplicateRulePolicy, InvalidValue, Parent, RecordMapping, RelationsMapping,
    TenantConfig, TenantSource,
};

/// Why `url` cannot reach the intended broker, if it cannot, naming the part at fault: checked
/// part by part as lapin reads it when it connects (`lapin::uri::AMQPUri`; the RabbitMQ URI
/// specification, <https://www.rabbitmq.com/docs/uri-spec>, and its query parameters), so a URL
/// that could never connect stops the service at start instead of being retried for ever. The
/// URL may hold a password: no part of it is ever quoted, only the names of its parts.
fn amqp_url_problem(url: &str) -> Option<String> {
    // A scheme is case-insensitive (RFC 3986 §3.1): lapin reads `AMQPS://` as `amqps://`.
    let known = url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("amqp") || scheme.eq_ignore_ascii_case("amqps")
    });
    if !known {
        return Some("must start with amqp:// or amqps://".to_owned());
    }
    // `url`'s parse errors name the fault (`invalid port number`, `empty host`) without the text.
    let parsed = match url::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(error) => return Some(format!("not a URL ({error}){AMQP_URL_FORM}")),
    };
    match parsed.host() {
        None => return Some(format!("has no host{AMQP_URL_FORM}")),
        // lapin reads the host as a domain name only, and connects to `localhost` when it is an
        // address in brackets: the URL would silently reach another broker.
        Some(url::Host::Ipv6(_)) => {
            return Some(
                "an IPv6 address is not supported as the host (the AMQP client would connect to localhost instead): use a host name".to_owned(),
            );
        }
        Some(url::Host::Domain(_) | url::Host::Ipv4(_)) => {}
    }
    let vhost = parsed.path().get(1..).unwrap_or_default();
    for (part, text) in [
        ("user name", parsed.username()),
        ("password", parsed.password().unwrap_or_default()),
        ("host", parsed.host_str().unwrap_or_default()),
        ("vhost", vhost),
    ] {
        if percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .is_err()
        {
            return Some(format!("the {part} is not UTF-8 once percent-decoded"));
        }
    }
    for (key, value) in parsed.query_pairs() {
        let largest = match &*key {
            "heartbeat" | "channel_max" => u64::from(u16::MAX),
            "frame_max" => u64::from(u32::MAX),
            "connection_timeout" => u64::MAX,
            "auth_mechanism" => {
                if value.parse::<lapin::uri::SASLMechanism>().is_err() {
                    return Some(
                        "auth_mechanism must be one of PLAIN, AMQPLAIN, EXTERNAL, ANONYMOUS or RABBIT-CR-DEMO".to_owned(),
                    );
                }
                continue;
            }
            // lapin ignores the parameters it does not use (`cacertfile`, `verify`, …).
            _ => continue,
        };
        if value.parse::<u64>().map_or(true, |n| n > largest) {
            return Some(format!(
                "the query parameter {key} must be a whole number from 0 to {largest}"
            ));
        }
    }
    // Whatever else lapin refuses; its reasons may quote parts of the URL, so none is shown.
    url.parse::<lapin::uri::AMQPUri>()
        .err()
        .map(|_| format!("does not parse as an AMQP URI{AMQP_URL_FORM}"))
}

/// The form of an AMQP URL, for the messages of [`amqp_url_problem`].
const AMQP_URL_FORM: &str = "; the form is amqp://user:password@host:port/vhost?heartbeat=30, with the vhost percent-encoded (%2f for /)";

/// A TOML syntax error by its line, column and reason, without the line itself, which toml's
/// own message quotes: the line may be `amqp.url`'s, password included.
fn syntax_problem(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return format!("TOML parse error: {}", error.message());
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before[before.rfind('\n').map_or(0, |at| at + 1)..]
        .chars()
        .count()
        + 1;
    format!(
        "TOML parse error at line {line}, column {column}: {}",
        error.message().trim_end()
    )
}

/// Every problem found in a configuration, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker and topology.
    pub amqp: AmqpConfig,
    /// Retry tiers.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Consumer workers.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Batching into Composite Graph requests.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Salesforce client settings.
    #[serde(default)]
    pub salesforce: SalesforceConfig,
    /// The HTTP port (metrics, probes).
    #[serde(default)]
    pub http: HttpConfig,
    /// The sled cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Where tenant files live.
    #[serde(default)]
    pub tenants: TenantsConfig,
}

/// Broker connection and topology names (DESIGN.md §4).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`. Holds a password, hence secret.
    pub url: SecretString,
    /// Heartbeat interval negotiated with the broker.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u16,
    /// Topic exchange the booking platform publishes to.
    #[serde(default = "default_exchange")]
    pub exchange: String,
    /// Binding of the work queue.
    #[serde(default = "default_binding")]
    pub binding_key: String,
    /// The quorum work queue.
    #[serde(default = "default_work_queue")]
    pub work_queue: String,
    /// Dead letters.
    #[serde(default = "default_dead_queue")]
    pub dead_letter_queue: String,
    /// Prefix of the retry tier queues (`<prefix>.<delay>`).
    #[serde(default = "default_retry_prefix")]
    pub retry_queue_prefix: String,
    /// Deliveries after which the broker dead-letters a message that keeps crashing workers.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Unacked messages per consumer.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

/// Delayed retry tiers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tier delays in seconds, shortest first; after the last, a dead letter.
    #[serde(default = "default_tiers")]
    pub tiers_secs: Vec<u64>,
}

/// Consumer workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Messages processed at once by this process.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bodies over this size are dead-lettered unread.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for in-flight messages before handing them back.
    #[serde(default = "default_drain")]
    pub drain_secs: u64,
}

/// Batching (DESIGN.md §5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Graphs per Composite Graph request (Salesforce allows 75).
    #[serde(default = "default_max_graphs")]
    pub max_graphs: usize,
    /// Nodes per request (Salesforce allows 500).
    #[serde(default = "default_max_nodes")]
    pub max_nodes: usize,
    /// While a request is in flight, how long a non-full batch waits for more graphs.
    #[serde(default = "default_linger")]
    pub linger_ms: u64,
    /// Requests in flight per tenant (Salesforce allows 25 long-running per org).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
}

/// Salesforce client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// Timeout of every request.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Consecutive failed requests that pause a tenant (circuit breaker).
    #[serde(default = "default_circuit_failures")]
    pub circuit_failures: u32,
    /// How long a paused tenant waits before a probe; doubles after a failed probe.
    #[serde(default = "default_circuit_cooldown")]
    pub circuit_cooldown_secs: u64,
}

/// The HTTP port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address of /metrics, /healthz, /readyz and the admin API.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the admin API's bearer token (required off loopback).
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Or a file holding it.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
}

/// The sled cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory of the sled database.
    #[serde(default = "default_cache_path")]
    pub path: PathBuf,
    /// How long a host's User Id stays cached.
    #[serde(default = "default_user_ttl")]
    pub user_ttl_secs: u64,
    /// How long "no such user" stays cached.
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl_secs: u64,
    /// How often describes are revalidated and mappings re-checked against the orgs (0: off).
    #[serde(default = "default_describe_refresh")]
    pub describe_refresh_secs: u64,
    /// Memory for sled's page cache, in MiB. The ledger grows by one entry per booking, on
    /// disk; this caps what of it stays in memory (sled's footprint is about twice this).
    #[serde(default = "default_cache_memory")]
    pub memory_mb: u64,
    /// Ledger entries older than this many days are removed (0: kept forever). Without its
    /// entry a booking is still safe: the org's version guard rejects older versions.
    #[serde(default = "default_ledger_ttl")]
    pub ledger_ttl_days: u64,
}

/// Where tenant files live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// Directory of `<tenant>.toml` files.
    #[serde(default = "default_tenants_dir")]
    pub dir: PathBuf,
    /// How often to look for changed tenant files (0: only on SIGHUP or the admin API).
    #[serde(default = "default_watch")]
    pub watch_secs: u64,
}

fn default_heartbeat() -> u16 {
    30
}
fn default_exchange() -> String {
    "bookings".into()
}
fn default_binding() -> String {
    "meeting.#".into()
}
fn default_work_queue() -> String {
    "crm.sync".into()
}
fn default_dead_queue() -> String {
    "crm.dead".into()
}
fn default_retry_prefix() -> String {
    "crm.retry".into()
}
fn default_delivery_limit() -> u32 {
    10
}
fn default_prefetch() -> u16 {
    1500
}
fn default_tiers() -> Vec<u64> {
    vec![5, 30, 120, 600, 3600]
}
fn default_concurrency() -> usize {
    2300
}
fn default_max_body() -> usize {
    crate::event::DEFAULT_MAX_BODY_BYTES
}
fn default_drain() -> u64 {
    20
}
fn default_max_graphs() -> usize {
    75
}
fn default_max_nodes() -> usize {
    500
}
fn default_linger() -> u64 {
    20
}
fn default_in_flight() -> usize {
    14
}
fn default_timeout() -> u64 {
    30
}
fn default_circuit_failures() -> u32 {
    5
}
fn default_circuit_cooldown() -> u64 {
    30
}
fn default_listen() -> String {
    "127.0.0.1:9898".into()
}
fn default_cache_path() -> PathBuf {
    "data/portals-crm.sled".into()
}
fn default_user_ttl() -> u64 {
    3600
}
fn default_negative_ttl() -> u64 {
    300
}
fn default_watch() -> u64 {
    5
}
fn default_describe_refresh() -> u64 {
    900
}
fn default_cache_memory() -> u64 {
    4
}
fn default_ledger_ttl() -> u64 {
    90
}
fn default_tenants_dir() -> PathBuf {
    "config/tenants".into()
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            tiers_secs: default_tiers(),
        }
    }
}
impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: default_concurrency(),
            max_body_bytes: default_max_body(),
            drain_secs: default_drain(),
        }
    }
}
impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_graphs: default_max_graphs(),
            max_nodes: default_max_nodes(),
            linger_ms: default_linger(),
            max_in_flight: default_in_flight(),
        }
    }
}
impl Default for SalesforceConfig {
    fn default() -> Self {
        Self {
            timeout_secs: default_timeout(),
            circuit_failures: default_circuit_failures(),
            circuit_cooldown_secs: default_circuit_cooldown(),
        }
    }
}
impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            admin_token_env: None,
            admin_token_file: None,
        }
    }
}
impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            path: default_cache_path(),
            user_ttl_secs: default_user_ttl(),
            negative_ttl_secs: default_negative_ttl(),
            describe_refresh_secs: default_describe_refresh(),
            memory_mb: default_cache_memory(),
            ledger_ttl_days: default_ledger_ttl(),
        }
    }
}
impl Default for TenantsConfig {
    fn default() -> Self {
        Self {
            dir: default_tenants_dir(),
            watch_secs: default_watch(),
        }
    }
}

const SECTIONS: &[&str] = &[
    "amqp",
    "retry",
    "worker",
    "batch",
    "salesforce",
    "http",
    "cache",
    "tenants",
];

/// Applies `PORTALS_CRM_<SECTION>_<KEY>=value` overrides to a parsed TOML document. A value that
/// parses as a TOML literal (number, bool, array) keeps that type; anything else is a string.
fn overlay_env(
    document: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, value) in vars {
        let Some(rest) = name.strip_prefix("PORTALS_CRM_") else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        else {
            continue;
        };
        let key = &lower[section.len() + 1..];
        if key.is_empty() {
            problems.push(format!("{name}: names no setting"));
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let table = document
            .entry((*section).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table.as_table_mut() {
            Some(table) => {
                table.insert(key.to_owned(), parsed);
            }
            None => problems.push(format!("[{section}] is not a table")),
        }
    }
    problems
}

/// The process environment, as [`Config::from_toml`] takes it. `std::env::vars` panics on a
/// variable that is not UTF-8 and prints its value, which for `PORTALS_CRM_AMQP_URL` holds a
/// password: here a `PORTALS_CRM_` variable that is not UTF-8 is a problem named without its
/// value, and any other such variable is not ours and is left out.
fn environment() -> Result<std::vec::IntoIter<(String, String)>, ConfigError> {
    let (vars, problems) = utf8_vars(std::env::vars_os());
    if problems.is_empty() {
        Ok(vars.into_iter())
    } else {
        Err(ConfigError(problems))
    }
}

/// The variables of `vars` that are UTF-8, and a problem for each `PORTALS_CRM_` one that is not.
fn utf8_vars(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> (Vec<(String, String)>, Vec<String>) {
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for (name, value) in vars {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => kept.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with("PORTALS_CRM_") => {
                problems.push(format!("{name}: is not UTF-8 (its value is not shown)"));
            }
            _ => {}
        }
    }
    (kept, problems)
}

impl Config {
    /// Loads `path`, overlays the process environment, validates, and resolves the relative
    /// paths it names (tenants directory, cache, admin token file) against the directory of
    /// `path` (see [`Config::resolve_paths`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![format!("{}: {e}", path.display())]))?;
        let mut config = Self::from_toml(&text, environment()?)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Makes the relative paths of the configuration relative to `base`, the directory of the
    /// file that names them, as Prometheus and most services do: `portals-crm run --config
    /// /etc/portals-crm/portals-crm.toml` finds its tenants from any working directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        resolve(&mut self.cache.path);
        resolve(&mut self.tenants.dir);
        if let Some(path) = &mut self.http.admin_token_file {
            resolve(path);
        }
    }

    /// Parses TOML text with the given environment overlay, then validates.
    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut document: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError(vec![syntax_problem(text, &e)]))?;
        let problems = overlay_env(&mut document, env);
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let config: Config = toml::Value::Table(document)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError(vec![e.to_string()]))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting and reports all problems together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Some(problem) = amqp_url_problem(self.amqp.url.expose_secret()) {
            problems.push(format!("amqp.url: {problem}"));
        }
        for (name, value) in [
            ("amqp.exchange", &self.amqp.exchange),
            ("amqp.work_queue", &self.amqp.work_queue),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.retry_queue_prefix", &self.amqp.retry_queue_prefix),
            ("amqp.binding_key", &self.amqp.binding_key),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("{name}: must not be empty"));
            }
        }
        // The work queue's name is the stem of the route exchange's and the tenant queues'
        // (`<work_queue>.shared`, `<work_queue>.t.<tenant>`), which RabbitMQ limits to 255 bytes.
        if self.amqp.work_queue.len() + ".shared".len() > crate::amqp::topology::MAX_NAME_BYTES {
            problems.push("amqp.work_queue: at most 248 bytes (names are built on it)".into());
        }
        if self.amqp.prefetch == 0 {
            problems.push("amqp.prefetch: must be at least 1".into());
        }
        if self.amqp.delivery_limit == 0 {
            problems.push("amqp.delivery_limit: must be at least 1".into());
        }
        if self.retry.tiers_secs.is_empty() {
            problems.push("retry.tiers_secs: list at least one tier".into());
        }
        if self.retry.tiers_secs.windows(2).any(|w| w[0] >= w[1]) {
            problems.push("retry.tiers_secs: delays must increase".into());
        }
        if self.retry.tiers_secs.contains(&0) {
            problems.push("retry.tiers_secs: a delay of 0 is not a delay".into());
        }
        if self.worker.concurrency == 0 {
            problems.push("worker.concurrency: must be at least 1".into());
        }
        if self.worker.max_body_bytes < 1024 {
            problems.push("worker.max_body_bytes: must be at least 1024".into());
        }
        if !(1..=75).contains(&self.batch.max_graphs) {
            problems.push("batch.max_graphs: must be within 1..=75 (Salesforce's limit)".into());
        }
        if !(1..=500).contains(&self.batch.max_nodes) {
            problems.push("batch.max_nodes: must be within 1..=500 (Salesforce's limit)".into());
        }
        if !(1..=25).contains(&self.batch.max_in_flight) {
            problems.push(
                "batch.max_in_flight: must be within 1..=25 per worker (Salesforce's limit of concurrent long-running requests per org)"
                    .into(),
            );
        }
        if self.salesforce.circuit_failures == 0 || self.salesforce.circuit_cooldown_secs == 0 {
            problems.push(
                "salesforce.circuit_failures and circuit_cooldown_secs: must be at least 1".into(),
            );
        }
        if self.salesforce.timeout_secs == 0 {
            problems.push("salesforce.timeout_secs: must be at least 1".into());
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            problems.push(format!(
                "http.listen: {:?} is not an address like 127.0.0.1:9898",
                self.http.listen
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The retry tiers as durations.
    pub fn retry_tiers(&self) -> Vec<Duration> {
        self.retry
            .tiers_secs
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_resolve_against_the_config_file() {
        let dir = std::env::temp_dir().join(format!("portals-crm-paths-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("portals-crm.toml");
        std::fs::write(&file, SHIPPED).unwrap();
        let config = Config::load(&file).unwrap();
        assert_eq!(config.cache.path, dir.join("../data/portals-crm.sled"));
        assert_eq!(config.tenants.dir, dir.join("tenants"));
        let mut absolute = Config::from_toml(SHIPPED, std::iter::empty()).unwrap();
        absolute.tenants.dir = "/etc/portals-crm/tenants".into();
        absolute.resolve_paths(&dir);
        assert_eq!(
            absolute.tenants.dir,
            Path::new("/etc/portals-crm/tenants"),
            "absolute paths stay"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tenant_key_files_resolve_against_the_tenant_file() {
        let tenant = TenantConfig::load(Path::new("config/tenants/demo.toml")).unwrap();
        let AuthConfig::ClientCredentials {
            client_secret_file: Some(path),
            ..
        } = &tenant.auth
        else {
            panic!("the demo tenant signs in with client credentials from a file")
        };
        assert_eq!(path, Path::new("config/tenants/../keys/demo-client-secret"));
        assert!(path.exists());
    }

    const SHIPPED: &str = include_str!("../../config/portals-crm.toml");

    #[test]
    fn shipped_config_is_valid() {
        let config = Config::from_toml(SHIPPED, std::iter::empty()).unwrap();
        assert_eq!(config.amqp.work_queue, "crm.sync");
    }

    #[test]
    fn environment_overrides_settings() {
        let env = [
            ("PORTALS_CRM_AMQP_URL", "amqp://u:p@broker:5672/%2f"),
            ("PORTALS_CRM_AMQP_PREFETCH", "50"),
            ("PORTALS_CRM_HTTP_LISTEN", "0.0.0.0:9000"),
            ("UNRELATED", "x"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::from_toml(SHIPPED, env.into_iter()).unwrap();
        assert_eq!(config.amqp.prefetch, 50);
        assert_eq!(config.http.listen, "0.0.0.0:9000");
        assert!(config.amqp.url.expose_secret().contains("broker"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let env = [
            ("PORTALS_CRM_AMQP_URL", "http://nope"),
            ("PORTALS_CRM_AMQP_PREFETCH", "0"),
            ("PORTALS_CRM_BATCH_MAX_GRAPHS", "100"),
            ("PORTALS_CRM_HTTP_LISTEN", "nowhere"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let error = Config::from_toml(SHIPPED, env.into_iter()).unwrap_err();
        assert_eq!(error.0.len(), 4, "{error}");
    }

    /// Each URL that lapin would refuse on every connection attempt, or would send to another
    /// broker, and the part named; the password (`hunter2`) never shown.
    #[test]
    fn an_amqp_url_that_cannot_connect_is_refused_naming_the_part_and_not_the_password() {
        for (url, part) in [
            (
                "amqp://u:hunter2@broker:notaport/%2f",
                "invalid port number",
            ),
            ("amqp://u:hunter2@broker:99999/%2f", "invalid port number"),
            (
                "amqp://u:hunter2@broker/%2f?heartbeat=soon",
                "heartbeat must be a whole number from 0 to 65535",
            ),
            (
                "amqp://u:hunter2@broker/%2f?heartbeat=70000",
                "heartbeat must be",
            ),
            (
                "amqp://u:hunter2@broker/%2f?heartbeat=",
                "heartbeat must be",
            ),
            (
                "amqp://u:hunter2@broker/%2f?channel_max=-1",
                "channel_max must be a whole number from 0 to 65535",
            ),
            (
                "amqp://u:hunter2@broker/%2f?frame_max=99999999999",
                "frame_max must be a whole number from 0 to 4294967295",
            ),
            (
                "amqp://u:hunter2@broker/%2f?connection_timeout=abc",
                "connection_timeout must be",
            ),
            (
                "amqp://u:hunter2@broker/%2f?auth_mechanism=kerberos",
                "auth_mechanism must be one of",
            ),
            (
                "amqp://u:5672?auth_mechanism=hunter2@broker/%2f",
                "auth_mechanism must be one of",
            ),
            (
                "amqp://u:hunter2%ff@broker/%2f",
                "the password is not UTF-8",
            ),
            (
                "amqp://u%ff:hunter2@broker/%2f",
                "the user name is not UTF-8",
            ),
            ("amqp://u:hunter2@bro%ffker/%2f", "the host is not UTF-8"),
            ("amqp://u:hunter2@broker/%ff", "the vhost is not UTF-8"),
            (
                "amqp://u:hunter2@[2001:db8::1]:5672/%2f",
                "IPv6 address is not supported",
            ),
            ("amqp://u:hunter2@[::1/%2f", "invalid IPv6 address"),
            ("amqp://u:hunter2@ /%2f", "invalid domain character"),
            ("amqp://u:hunter2@/%2f", "empty host"),
            (
                "http://u:hunter2@broker/%2f",
                "must start with amqp:// or amqps://",
            ),
            ("amqpx://u:hunter2@broker/%2f", "must start with amqp://"),
            ("u:hunter2@broker:5672", "must start with amqp://"),
        ] {
            let env = [("PORTALS_CRM_AMQP_URL", url)].map(|(k, v)| (k.to_owned(), v.to_owned()));
            let error = Config::from_toml(SHIPPED, env.into_iter()).unwrap_err();
            assert_eq!(error.0.len(), 1, "{url}: {error}");
            assert!(error.0[0].starts_with("amqp.url: "), "{url}: {error}");
            assert!(error.0[0].contains(part), "{url}: {error}");
            assert!(!error.to_string().contains("hunter2"), "{url}: {error}");
        }
    }

    #[test]
    fn a_variable_that_is_not_utf8_is_named_without_its_value() {
        use std::os::unix::ffi::OsStringExt;
        let bytes = |b: &[u8]| std::ffi::OsString::from_vec(b.to_vec());
        let (kept, problems) = utf8_vars(
            [
                (
                    bytes(b"PORTALS_CRM_AMQP_URL"),
                    bytes(b"amqp://u:hunter2@h/\xff"),
                ),
                (bytes(b"SOME_OTHER"), bytes(b"\xff")),
                (bytes(b"PORTALS_CRM_\xff"), bytes(b"x")),
                (bytes(b"PORTALS_CRM_HTTP_LISTEN"), bytes(b"127.0.0.1:9000")),
            ]
            .into_iter(),
        );
        assert_eq!(
            kept,
            vec![(
                "PORTALS_CRM_HTTP_LISTEN".to_owned(),
                "127.0.0.1:9000".to_owned()
            )]
        );
        assert_eq!(
            problems,
            vec!["PORTALS_CRM_AMQP_URL: is not UTF-8 (its value is not shown)".to_owned()]
        );
    }

    #[test]
    fn every_url_form_lapin_accepts_is_accepted() {
        for url in [
            "amqp://u:p@broker:5672/%2f",
            "amqps://u:p@broker/%2f?heartbeat=10&connection_timeout=5000&frame_max=131072&channel_max=2047",
            "amqp://broker",
            "amqp://u:p@127.0.0.1:5672/vhost?auth_mechanism=external",
            "amqp://u:p@broker/%2f?auth_mechanism=AMQPLAIN&cacertfile=/etc/ca.pem&verify=verify_peer",
            "AMQP://u:p@broker:5672/%2f",
            "AmQpS://broker/%2f",
        ] {
            assert!(url.parse::<lapin::uri::AMQPUri>().is_ok(), "lapin: {url}");
            assert_eq!(amqp_url_problem(url), None, "{url}");
        }
    }

    /// A TOML syntax error on the broker URL's line names the line and column, not its text.
    #[test]
    fn a_toml_error_does_not_quote_the_line() {
        let text = SHIPPED.replacen(
            "[amqp]\n",
            "[amqp]\nurl = \"amqp://u:hunter2@broker/%2f\\q\"\n",
            1,
        );
        let error = Config::from_toml(&text, std::iter::empty()).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("line ") && message.contains("column "),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[test]
    fn debug_output_hides_the_broker_password() {
        let env = [("PORTALS_CRM_AMQP_URL", "amqp://u:hunter2@broker/%2f")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let config = Config::from_toml(SHIPPED, env.into_iter()).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
