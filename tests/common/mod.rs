//! Shared test environment: the emulator on port 0, the service with unique queue names on the
//! real local broker, and helpers that poll instead of sleeping.

#![allow(dead_code)]

pub mod browser;

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions};
use portals_crm::amqp::{self, Publisher, Topology, header_str};
use portals_crm::config::{Config, TenantConfig};
use portals_crm::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec};
use portals_crm::salesforce::SalesforceClient;
use portals_crm::service::Service;
use portals_crm::tenants::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The sample events, as shipped in `tests/fixtures/events`.
pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(format!("tests/fixtures/events/{name}.json")).expect("sample event exists")
}

/// Polls `check` until it returns Some, or panics with what it last saw.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last saw: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A dead letter as the tests read it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: String,
    pub message: String,
    pub tenant: String,
    pub body: Vec<u8>,
    pub sf_error_code: Option<String>,
    /// Every header, as the dead letter carries them.
    pub headers: lapin::types::FieldTable,
}

/// One isolated environment.
pub struct TestEnv {
    pub emulator: EmulatorHandle,
    pub service: Option<Service>,
    pub config: Config,
    pub tenants: Vec<TenantConfig>,
    pub topology: Topology,
    pub publisher: Publisher,
    connection: lapin::Connection,
    http: reqwest::Client,
    cache_dir: std::path::PathBuf,
    leftovers: Leftovers,
}

/// What a test declared on the shared broker, deleted when it is dropped armed: a test that
/// panics before [`TestEnv::finish`] (an assertion failed) would otherwise leave its queues and
/// exchanges on the broker for every later run.
struct Leftovers {
    url: secrecy::SecretString,
    topology: Topology,
    /// Each service the test ran: its tenants, by a weak handle (a strong one would keep its sled
    /// database locked against a restart), and the token that stops it.
    services: Vec<(Weak<Registry>, CancellationToken)>,
    /// Tenants of the services already stopped, and the configured ones.
    tenants: Vec<String>,
    cache_dir: std::path::PathBuf,
    armed: bool,
}

impl Leftovers {
    fn watch(&mut self, service: &Service) {
        self.services
            .push((Arc::downgrade(&service.tenants), service.stop_token()));
    }
}

/// How long the clean-up may take: a broker that accepts the connection and then stalls must
/// not hang the test run.
const CLEAN_UP_WITHIN: Duration = Duration::from_secs(15);

impl Drop for Leftovers {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut tenants = std::mem::take(&mut self.tenants);
        for (registry, stop) in &self.services {
            // Stopped first, so that no consumer declares the topology again once it is gone.
            stop.cancel();
            if let Some(registry) = registry.upgrade() {
                tenants.extend(registry.all().iter().map(|t| t.config.tenant.clone()));
            }
        }
        let _ = std::fs::remove_dir_all(&self.cache_dir);
        let (url, topology) = (self.url.clone(), self.topology.clone());
        // The test's own runtime is unwinding: a thread with a runtime of its own deletes them.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the clean-up");
            // The timer is made inside the runtime: it needs one to exist.
            runtime.block_on(async {
                tokio::time::timeout(CLEAN_UP_WITHIN, async {
                    let connection = amqp::connect(&url, 30, "portals-crm test clean-up").await?;
                    let channel = connection.create_channel().await?;
                    topology
                        .delete_tenants(&channel, tenants.iter().map(String::as_str))
                        .await?;
                    topology.delete(&channel).await?;
                    connection.close(200, "test clean-up".into()).await?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
                })
                .await
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(Ok(())))) {
            eprintln!(
                "could not delete the failed test's queues and exchanges (exchange {}): {deleted:?}",
                self.topology.exchange
            );
        }
    }
}

impl TestEnv {
    /// Emulator + service with the shipped config and tenants, unique names everywhere.
    pub async fn start(name: &str) -> Self {
        Self::start_with(name, |_| {}).await
    }

    /// As [`TestEnv::start`], letting the test adjust the config first.
    pub async fn start_with(name: &str, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_custom(name, adjust, |_| {}).await
    }

    /// As [`TestEnv::start_with`], also adjusting the tenants (already pointed at the emulator).
    pub async fn start_custom(
        name: &str,
        adjust: impl FnOnce(&mut Config),
        adjust_tenants: impl FnOnce(&mut [TenantConfig]),
    ) -> Self {
        Self::start_org(name, |_| {}, adjust, adjust_tenants).await
    }

    /// As [`TestEnv::start_custom`], also adjusting the emulated org (the demo org) first.
    pub async fn start_org(
        name: &str,
        adjust_org: impl FnOnce(&mut OrgSpec),
        adjust: impl FnOnce(&mut Config),
        adjust_tenants: impl FnOnce(&mut [TenantConfig]),
    ) -> Self {
        let mut org = OrgSpec::demo();
        adjust_org(&mut org);
        let emulator = emulator::start("127.0.0.1:0".parse().unwrap(), org, &FaultSpec::default())
            .await
            .expect("emulator starts");
        let suffix = format!("test-{name}-{:x}", rand::random::<u32>());
        let text = std::fs::read_to_string("config/portals-crm.toml").unwrap();
        let mut config = Config::from_toml(&text, std::env::vars()).unwrap();
        config.amqp.exchange = format!("bookings.{suffix}");
        config.amqp.work_queue = format!("crm.sync.{suffix}");
        config.amqp.dead_letter_queue = format!("crm.dead.{suffix}");
        config.amqp.retry_queue_prefix = format!("crm.retry.{suffix}");
        config.http.listen = "127.0.0.1:0".into();
        let cache_dir = std::env::temp_dir().join(format!("portals-crm-{suffix}"));
        config.cache.path = cache_dir.clone();
        config.tenants.watch_secs = 0;
        adjust(&mut config);
        let mut tenants = TenantConfig::load_dir(std::path::Path::new("config/tenants")).unwrap();
        for tenant in &mut tenants {
            tenant.org.login_url = emulator.base_url.clone();
        }
        adjust_tenants(&mut tenants);
        let topology = Topology::new(&config.amqp, &config.retry_tiers());
        let connection = amqp::connect(&config.amqp.url, 30, "portals-crm test")
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (see README)");
        let publisher = Publisher::open(&connection).await.unwrap();
        topology.declare(publisher.channel()).await.unwrap();
        let mut leftovers = Leftovers {
            url: config.amqp.url.clone(),
            topology: topology.clone(),
            services: Vec::new(),
            tenants: tenants.iter().map(|t| t.tenant.clone()).collect(),
            cache_dir: cache_dir.clone(),
            armed: true,
        };
        let service = Service::start(&config, tenants.clone()).await.unwrap();
        leftovers.watch(&service);
        Self {
            emulator,
            service: Some(service),
            config,
            tenants,
            topology,
            publisher,
            connection,
            http: reqwest::Client::new(),
            cache_dir,
            leftovers,
        }
    }

    /// As [`TestEnv::start`], the service loading its tenants from files in a directory of
    /// its own (so the console can edit and save them), pointed at this emulator.
    pub async fn start_from_files(
        name: &str,
        org: OrgSpec,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        let mut env = Self::start_org(name, move |o| *o = org, adjust, |_| {}).await;
        env.stop_service().await;
        env.config.tenants.dir = env.write_tenant_files();
        let service = Service::start_from_dir(&env.config).await.unwrap();
        env.run_service(service);
        env
    }

    /// As [`TestEnv::start_from_files`] on the demo org, listening off loopback (`0.0.0.0`) with
    /// the admin token `token` in a file of its own (returned, for the test to remove).
    pub async fn start_off_loopback(name: &str, token: &str) -> (Self, std::path::PathBuf) {
        let token_file =
            std::env::temp_dir().join(format!("portals-crm-token-{:x}", rand::random::<u32>()));
        std::fs::write(&token_file, format!("{token}\n")).unwrap();
        let file = token_file.clone();
        let env = Self::start_from_files(name, OrgSpec::demo(), move |config| {
            config.http.listen = "0.0.0.0:0".into();
            config.http.admin_token_file = Some(file);
        })
        .await;
        (env, token_file)
    }

    /// The base URL of the service's HTTP port (the admin API and the console).
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.service().http_addr.port())
    }

    /// Stops the in-process service (its queues stay).
    pub async fn stop_service(&mut self) {
        if let Some(service) = self.service.take() {
            self.leftovers.tenants.extend(
                service
                    .tenants
                    .all()
                    .iter()
                    .map(|t| t.config.tenant.clone()),
            );
            service.shutdown().await;
        }
    }

    /// Runs `service` as the test's worker (deleted with the test's queues if the test fails).
    pub fn run_service(&mut self, service: Service) {
        self.leftovers.watch(&service);
        self.service = Some(service);
    }

    /// A new worker in place of the running one, its sled cache deleted (so only Salesforce
    /// knows what was written).
    pub async fn restart_service_without_cache(&mut self) {
        self.stop_service().await;
        let _ = std::fs::remove_dir_all(&self.config.cache.path);
        let service = Service::start(&self.config, self.tenants.clone())
            .await
            .unwrap();
        self.run_service(service);
    }

    /// Another in-process worker on the same queues, with its own cache and HTTP port.
    pub async fn extra_worker(&self, n: usize) -> Service {
        let mut config = self.config.clone();
        config.cache.path = self.cache_dir.join(format!("worker-{n}"));
        Service::start(&config, self.tenants.clone()).await.unwrap()
    }

    /// Environment variables that point the binary at this environment's queues.
    pub fn binary_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "PORTALS_CRM_AMQP_EXCHANGE".into(),
                self.topology.exchange.clone(),
            ),
            (
                "PORTALS_CRM_AMQP_WORK_QUEUE".into(),
                self.topology.work_queue.clone(),
            ),
            (
                "PORTALS_CRM_AMQP_DEAD_LETTER_QUEUE".into(),
                self.topology.dead_queue.clone(),
            ),
            (
                "PORTALS_CRM_AMQP_RETRY_QUEUE_PREFIX".into(),
                self.config.amqp.retry_queue_prefix.clone(),
            ),
            ("PORTALS_CRM_HTTP_LISTEN".into(), "127.0.0.1:0".into()),
            (
                "PORTALS_CRM_CACHE_PATH".into(),
                self.cache_dir.join("binary").display().to_string(),
            ),
        ]
    }

    /// Tenant files pointing at this environment's emulator, for the binary.
    pub fn write_tenant_files(&self) -> std::path::PathBuf {
        let dir = self.cache_dir.join("tenants");
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["acme", "demo"] {
            let text = std::fs::read_to_string(format!("config/tenants/{name}.toml")).unwrap();
            let text = text.replace("http://127.0.0.1:7800", &self.emulator.base_url);
            // Key paths are relative to the tenant file; these copies live elsewhere.
            let keys = std::fs::canonicalize("config/keys").unwrap();
            let text = text.replace("\"../keys/", &format!("\"{}/", keys.display()));
            std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
        }
        dir
    }

    pub fn service(&self) -> &Service {
        self.service.as_ref().expect("service running")
    }

    /// Publishes like the booking platform does: the body's `tenantid` as the tenant header
    /// too (none on a body without one).
    pub async fn publish(&self, routing_key: &str, body: &[u8]) {
        let tenant = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["tenantid"].as_str().map(str::to_owned));
        self.publish_with(routing_key, body, tenant.as_deref())
            .await;
    }

    /// Publishes with the tenant header `tenant`, or none; a message the broker nacks is
    /// republished, as the booking platform does.
    pub async fn publish_with(&self, routing_key: &str, body: &[u8], tenant: Option<&str>) {
        let properties = amqp::event_properties(tenant);
        self.publisher
            .publish_republishing(&self.topology.exchange, routing_key, body, properties)
            .await
            .expect("publish confirmed and routed");
    }

    /// Messages ready in `queue` and its consumers (a passive declare on a channel of its own).
    pub async fn queue_state(&self, queue: &str) -> (u32, u32) {
        self.queue_exists(queue)
            .await
            .unwrap_or_else(|| panic!("queue {queue} exists"))
    }

    /// As [`TestEnv::queue_state`], `None` if there is no such queue.
    pub async fn queue_exists(&self, queue: &str) -> Option<(u32, u32)> {
        let channel = self.connection.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .ok()?;
        let _ = channel.close(200, "read".into()).await;
        Some((declared.message_count(), declared.consumer_count()))
    }

    /// The channels open on the worker's connection, as the broker counts them
    /// (`rabbitmqctl list_connections client_properties channels`, the connection found by the
    /// `connection_name` the worker gives it); `None` while the worker has no connection.
    pub fn worker_channels(&self) -> Option<u64> {
        let output = std::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "-q",
                "--formatter",
                "json",
                "client_properties",
                "channels",
            ])
            .output()
            .expect("rabbitmqctl runs (.ci/run installs RabbitMQ)");
        assert!(output.status.success(), "rabbitmqctl list_connections");
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&output.stdout).expect("rabbitmqctl's JSON");
        let name = format!("portals-crm worker {}", self.topology.work_queue);
        rows.iter()
            .find(|row| {
                row["client_properties"]
                    .as_array()
                    .is_some_and(|properties| {
                        properties
                            .iter()
                            .any(|p| p[0] == "connection_name" && p[2] == name.as_str())
                    })
            })
            .and_then(|row| row["channels"].as_u64())
    }

    /// Settled events so far (all outcomes).
    pub fn settled(&self) -> u64 {
        self.service().metrics.settled_by_outcome().values().sum()
    }

    /// Settled events by outcome.
    pub fn outcomes(&self) -> std::collections::BTreeMap<String, u64> {
        self.service().metrics.settled_by_outcome()
    }

    /// Waits until at least `n` messages were settled with `outcome` (`retried`, `written` …).
    pub async fn wait_outcome(&self, outcome: &str, n: u64) {
        wait_until(
            &format!("{n} messages {outcome}"),
            Duration::from_secs(60),
            || async {
                if self.outcomes().get(outcome).copied().unwrap_or(0) >= n {
                    Ok(())
                } else {
                    Err(format!("{:?}", self.outcomes()))
                }
            },
        )
        .await;
    }

    /// Waits until the org holds exactly `n` records of `sobject`.
    pub async fn wait_records(&self, sobject: &str, n: usize) {
        wait_until(
            &format!("{n} {sobject} records in the org"),
            Duration::from_secs(60),
            || async {
                let held = self.records(sobject).await.len();
                if held == n {
                    Ok(())
                } else {
                    Err(format!("{held} records; {:?}", self.outcomes()))
                }
            },
        )
        .await;
    }

    /// Waits until `n` events have been settled.
    pub async fn wait_settled(&self, n: u64) {
        wait_until(
            &format!("{n} settled events"),
            Duration::from_secs(30),
            || async {
                let settled = self.settled();
                if settled >= n {
                    Ok(())
                } else {
                    Err(format!("{settled} settled: {:?}", self.outcomes()))
                }
            },
        )
        .await
    }

    /// Records of an sObject in the emulated org.
    pub async fn records(&self, sobject: &str) -> Vec<Value> {
        self.get_json(&format!("/__emulator/records/{sobject}"))
            .await
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.emulator.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// GET `path` of the service's HTTP port (the admin API), as JSON.
    pub async fn admin_get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.http_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POST `body` to `path` of the service's HTTP port: the status and the JSON answer.
    pub async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        let answer = self
            .http
            .post(format!("{}{path}", self.http_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = answer.status().as_u16();
        (status, answer.json().await.unwrap())
    }

    /// Activates or deactivates the integration user (Setup → Users); deactivating also expires
    /// the tokens issued, so the next request must sign in again and meets the refusal.
    pub async fn integration_user_active(&self, active: bool) {
        let user = serde_json::json!({"user": "integration@bookme-demo.example", "active": active});
        assert_eq!(self.post_json("/__emulator/org", user).await, 200);
        if !active {
            let expire = serde_json::json!({"expire_tokens": true});
            assert_eq!(self.post_json("/__emulator/faults", expire).await, 200);
        }
    }

    pub async fn post_json(&self, path: &str, body: Value) -> reqwest::StatusCode {
        self.http
            .post(format!("{}{path}", self.emulator.base_url))
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
    }

    /// Creates a record as the demo org's integration user (a record "a sales rep typed in"),
    /// through the REST API; returns its id.
    pub async fn create_record(&self, sobject: &str, fields: Value) -> String {
        let token = self.token().await;
        let response = self
            .http
            .post(format!(
                "{}/services/data/v66.0/sobjects/{sobject}",
                self.emulator.base_url
            ))
            .bearer_auth(token)
            .json(&fields)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// An access token of the demo org's integration user (client credentials).
    pub async fn token(&self) -> String {
        let token: Value = self
            .http
            .post(format!("{}/services/oauth2/token", self.emulator.base_url))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        token["access_token"].as_str().unwrap().to_owned()
    }

    /// The service's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.http_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sets the integration user's access (`none`, `read`, `edit`) to `field` (`Object.Field`) in
    /// the shipped permission set, as the customer's Salesforce admin would.
    pub async fn field_access(&self, field: &str, access: &str) {
        let status = self
            .post_json(
                "/__emulator/org",
                serde_json::json!({"permission_set": "BookMe_Integration_User", "field": field, "access": access}),
            )
            .await;
        assert_eq!(status, 200);
    }

    /// The dead-letter queue as it is, read without consuming (as `portals-crm dlq list`).
    pub async fn list_dead_letters(&self) -> Vec<portals_crm::dlq::DeadLetter> {
        let dlq = portals_crm::dlq::Dlq::open(&self.config.amqp.url, self.topology.clone())
            .await
            .unwrap();
        let letters = dlq
            .list(&portals_crm::dlq::Filter::default())
            .await
            .unwrap();
        dlq.close().await;
        letters
    }

    /// Takes every message from the dead-letter queue.
    pub async fn drain_dead_letters(&self) -> Vec<DeadLetter> {
        let channel = self.publisher.channel();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.topology.dead_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            let headers = message.delivery.properties.headers().clone();
            let h = |name: &str| header_str(headers.as_ref(), name);
            out.push(DeadLetter {
                reason: h("x-portals-reason").unwrap_or_default(),
                message: h("x-portals-message").unwrap_or_default(),
                tenant: h("x-portals-tenant").unwrap_or_default(),
                body: message.delivery.data.clone(),
                sf_error_code: h("x-portals-sf-error-code"),
                headers: headers.clone().unwrap_or_default(),
            });
            message
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
        }
        out
    }

    /// Waits until `n` dead letters are there and takes them.
    pub async fn wait_dead_letters(&self, n: usize) -> Vec<DeadLetter> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut all = Vec::new();
        loop {
            all.extend(self.drain_dead_letters().await);
            if all.len() >= n {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} dead letters; saw {all:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops everything and deletes what the test created.
    pub async fn finish(mut self) {
        let mut tenants: Vec<String> = self.tenants.iter().map(|t| t.tenant.clone()).collect();
        if let Some(service) = self.service.take() {
            tenants.extend(
                service
                    .tenants
                    .all()
                    .iter()
                    .map(|t| t.config.tenant.clone()),
            );
            service.shutdown().await;
        }
        self.topology
            .delete_tenants(self.publisher.channel(), tenants.iter().map(String::as_str))
            .await
            .unwrap();
        self.topology
            .delete(self.publisher.channel())
            .await
            .unwrap();
        let _ = self.connection.close(200, "test done".into()).await;
        self.emulator.stop().await;
        let _ = std::fs::remove_dir_all(&self.cache_dir);
        self.leftovers.armed = false;
    }
}

/// One REST call to the emulator as `client`'s user: status and JSON body (null if none).
pub async fn raw(
    emulator: &EmulatorHandle,
    client: &SalesforceClient,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = client.token().await.unwrap();
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", emulator.base_url))
        .bearer_auth(secrecy::ExposeSecret::expose_secret(&token.value));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
