//! `portals-crm bench`: the end-to-end load bench. One run measures, against the local broker
//! and the in-process emulator, with the worker as a child process (the real binary, so its
//! memory is its own):
//!
//! 1. a bare lapin consumer's consume + ack rate on a quorum queue with the same prefetch — the
//!    limit the broker sets;
//! 2. portals-crm's sustained bookings/s with a zero-latency emulator;
//! 3. the same with 100 ms of emulator latency;
//! 4. API calls per booking at saturation;
//! 5. p50/p99 publish-to-commit latency at a fixed 200 bookings/s;
//! 6. the worker's peak RSS with a backlog of 200,000 bookings;
//! 7. fairness: the time one tenant's 3,000 bookings take alone, and published behind 12,000
//!    bookings of a tenant whose org answers in 2 s (an emulator of its own);
//! 8. CPU time per booking of the worker process and of the emulator, in the zero-latency run
//!    (the emulator runs on a runtime of its own, whose threads are named `emulator`, so its CPU
//!    time is read apart from the bench's).
//!
//! Results go to a table and `target/bench/pipeline.json`. Nothing is asserted: the figures are
//! reported, and README's performance section quotes a run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::amqp::{self, Topology};
use crate::config::{Config, TenantConfig};
use crate::demo::simple_booking;
use crate::emulator::{self, EmulatorHandle, FaultSpec, OrgSpec};

/// How big each measurement is.
#[derive(Debug, Clone, Copy)]
pub struct BenchSizes {
    /// Messages for the bare consumer.
    pub bare: usize,
    /// Bookings for the saturation runs.
    pub saturation: usize,
    /// Seconds of the fixed-rate latency run.
    pub latency_secs: u64,
    /// Backlog for the memory run.
    pub backlog: usize,
    /// The fast tenant's bookings in the fairness run.
    pub fair_fast: usize,
    /// The slow tenant's backlog in front of them.
    pub fair_slow: usize,
}

impl Default for BenchSizes {
    fn default() -> Self {
        Self {
            bare: 50_000,
            saturation: 30_000,
            latency_secs: 15,
            backlog: 200_000,
            fair_fast: 3_000,
            fair_slow: 12_000,
        }
    }
}

/// The six figures, under the keys issue 7 names.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Bare lapin consume + ack rate (messages/s).
    pub bare_consume_ack_per_s: f64,
    /// The bare consumer's CPU time per message (µs; user + system of the bench process while
    /// it consumed, no emulator running).
    pub bare_cpu_us_per_message: f64,
    /// portals-crm bookings/s, zero-latency emulator.
    pub bookings_per_s: f64,
    /// portals-crm bookings/s, 100 ms emulator latency.
    pub bookings_per_s_100ms: f64,
    /// Salesforce API calls per booking at saturation.
    pub api_calls_per_booking: f64,
    /// Worker CPU time per booking in the zero-latency run (µs; user + system, cold start
    /// included).
    pub worker_cpu_us_per_booking: f64,
    /// Emulator CPU time per booking in the zero-latency run (µs).
    pub emulator_cpu_us_per_booking: f64,
    /// Median publish-to-commit latency at 200 bookings/s.
    pub p50_ms: f64,
    /// 99th percentile publish-to-commit latency at 200 bookings/s.
    pub p99_ms: f64,
    /// Worker peak RSS with the backlog waiting.
    pub peak_rss_mb: f64,
    /// Zero-latency run: from spawning the worker to its first booking in the org.
    pub cold_start_ms: f64,
    /// 100 ms run: from spawning the worker to its first booking in the org.
    pub cold_start_100ms_ms: f64,
    /// Bookings waiting in the memory run.
    pub backlog: usize,
    /// The fairness run.
    pub fairness: Fairness,
    /// The machine, for the README.
    pub machine: String,
}

/// The bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The connection did not open.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// Broker trouble.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// Emulator, worker process or files.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The worker did not finish in time.
    #[error("{0}")]
    Stalled(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// The body's `tenantid`, which the bench publishes as the tenant header too, as the booking
/// platform does (README, "How the booking platform publishes").
fn tenant_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Tenant {
        tenantid: Option<String>,
    }
    serde_json::from_slice::<Tenant>(body).ok()?.tenantid
}

/// Publishes with confirms, a window of 1,000 messages in flight at a time; a message the broker
/// nacks is published again, as the booking platform does
/// ([`amqp::Publisher::publish_republishing`]).
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> Result<usize, BenchError> {
    let properties = |body: &[u8]| amqp::event_properties(tenant_of(body).as_deref());
    let mut pending = Vec::with_capacity(1000);
    let mut count = 0;
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties(&body).with_delivery_mode(2),
            )
            .await?;
        pending.push((confirm, body));
        count += 1;
        if pending.len() == 1000 {
            let nacked = confirmed(&mut pending).await?;
            republish(channel, exchange, routing_key, nacked, properties).await?;
        }
    }
    let nacked = confirmed(&mut pending).await?;
    republish(channel, exchange, routing_key, nacked, properties).await?;
    Ok(count)
}

/// Waits for the confirms of `pending`; returns the bodies the broker nacked.
async fn confirmed(
    pending: &mut Vec<(lapin::PublisherConfirm, Vec<u8>)>,
) -> Result<Vec<Vec<u8>>, BenchError> {
    let mut nacked = Vec::new();
    for (confirm, body) in pending.drain(..) {
        if confirm.await?.is_nack() {
            nacked.push(body);
        }
    }
    Ok(nacked)
}

async fn republish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    nacked: Vec<Vec<u8>>,
    properties: impl Fn(&[u8]) -> lapin::BasicProperties,
) -> Result<(), BenchError> {
    // The bench's events carry one short header: the smallest frame_max any connection has
    // is room enough for them.
    let publisher =
        amqp::Publisher::on(channel.clone(), lapin::protocol::constants::FRAME_MIN_SIZE);
    for body in nacked {
        publisher
            .publish_republishing(exchange, routing_key, &body, properties(&body))
            .await
            .map_err(|e| BenchError::Stalled(format!("publishing: {e}")))?;
    }
    Ok(())
}

/// The bare consumer's rate (messages/s) and its CPU time per message (seconds).
struct Bare {
    rate: f64,
    cpu_per_message: f64,
}

/// A lapin consumer that only acks, on a quorum queue with the worker's prefetch: the limit of
/// the broker on this machine, and (its CPU per message) the floor of any lapin consumer's.
async fn bare_consume_ack(
    config: &Config,
    channel: &Channel,
    run: &str,
    n: usize,
) -> Result<Bare, BenchError> {
    let queue = format!("bench.bare.{run}");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    let body = simple_booking(run, 0, "acme");
    publish_all(channel, "", &queue, std::iter::repeat_n(body, n)).await?;
    let connection = amqp::connect(&config.amqp.url, 30, "portals-crm bench bare consumer").await?;
    let consumer_channel = connection.create_channel().await?;
    consumer_channel
        .basic_qos(config.amqp.prefetch, BasicQosOptions { global: false })
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let started = Instant::now();
    // No emulator runs yet: the process's CPU is the consumer's (its task and lapin's I/O
    // thread).
    let cpu_before = cpu::stat_secs("/proc/self/stat");
    let mut seen = 0;
    while seen < n {
        match consumer.next().await {
            Some(Ok(delivery)) => {
                delivery.ack(BasicAckOptions::default()).await?;
                seen += 1;
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    let cpu_per_message = (cpu::stat_secs("/proc/self/stat") - cpu_before) / seen.max(1) as f64;
    let _ = connection.close(200, "bench".into()).await;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(Bare {
        rate,
        cpu_per_message,
    })
}

/// A worker process on the bench's queues.
struct Worker {
    child: tokio::process::Child,
    http: SocketAddr,
}

impl Worker {
    fn spawn(exe: &Path, env: &[(String, String)]) -> Result<Self, BenchError> {
        // A port of its own, known in advance, so the bench can read the worker's metrics.
        let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = tokio::process::Command::new(exe)
            // As the production image runs it (deploy/Dockerfile).
            .args(["--log-format", "json", "run"])
            .envs(env.iter().cloned())
            .env("PORTALS_CRM_HTTP_LISTEN", http.to_string())
            // The audit trail is part of the work measured: one record per write, as in production.
            .env("RUST_LOG", "warn,portals_crm::audit=info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child, http })
    }

    /// The mean of a histogram on the worker's `/metrics`, over all its label sets.
    async fn mean(&self, http: &reqwest::Client, histogram: &str) -> Option<f64> {
        let text = http
            .get(format!("http://{}/metrics", self.http))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let total = |suffix: &str| -> f64 {
            let name = format!("{histogram}_{suffix}");
            text.lines()
                .filter(|l| l.starts_with(&name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let count = total("count");
        (count > 0.0).then(|| total("sum") / count)
    }

    /// CPU time (user + system) the process has spent so far, in seconds.
    fn cpu_secs(&self) -> f64 {
        self.child
            .id()
            .map_or(0.0, |pid| cpu::stat_secs(&format!("/proc/{pid}/stat")))
    }

    /// Peak resident set size so far, from the kernel's VmHWM.
    fn peak_rss_mb(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

async fn stats(http: &reqwest::Client, emulator: &EmulatorHandle) -> Value {
    match http
        .get(format!("{}/__emulator/stats", emulator.base_url))
        .send()
        .await
    {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// When the first of the awaited bookings showed up in the org, and how many had by then.
struct FirstCommit {
    at: Instant,
    events: u64,
}

/// Polls the org until `target` Events exist; returns when the first one was seen.
async fn wait_for_events(
    http: &reqwest::Client,
    emulator: &EmulatorHandle,
    target: u64,
    timeout: Duration,
) -> Result<FirstCommit, BenchError> {
    let deadline = Instant::now() + timeout;
    let mut first: Option<FirstCommit> = None;
    loop {
        let events = stats(http, emulator).await["records"]["Event"]
            .as_u64()
            .unwrap_or(0);
        if events > 0 && first.is_none() {
            first = Some(FirstCommit {
                at: Instant::now(),
                events,
            });
        }
        if events >= target {
            return Ok(first.unwrap_or(FirstCommit {
                at: Instant::now(),
                events,
            }));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Stalled(format!(
                "{events} of {target} bookings written before the timeout"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One measurement's environment: its own emulator, queues and tenant files.
struct Stage {
    emulator: EmulatorHandle,
    topology: Topology,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Stage {
    async fn start(bench: &Bench<'_>, name: &str, faults: FaultSpec) -> Result<Self, BenchError> {
        let (config, channel) = (bench.config, &bench.channel);
        let emulator = bench.emulator(faults).await?;
        let mut amqp = config.amqp.clone();
        amqp.exchange = format!("bench.{name}");
        amqp.work_queue = format!("bench.{name}.sync");
        amqp.dead_letter_queue = format!("bench.{name}.dead");
        amqp.retry_queue_prefix = format!("bench.{name}.retry");
        let topology = Topology::new(&amqp, &config.retry_tiers());
        topology.declare(channel).await?;
        let dir = std::env::temp_dir().join(format!("portals-crm-bench-{name}"));
        let tenants = dir.join("tenants");
        std::fs::create_dir_all(&tenants)?;
        // The tenant files name their keys relative to themselves (`../keys/…`): the copies
        // find them through a link to the originals.
        let keys = config.tenants.dir.join("../keys");
        let link = dir.join("keys");
        if keys.is_dir() && !link.exists() {
            std::os::unix::fs::symlink(std::fs::canonicalize(&keys)?, &link)?;
        }
        for entry in std::fs::read_dir(&config.tenants.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path)?;
                let text = text.replace("http://127.0.0.1:7800", &emulator.base_url);
                std::fs::write(tenants.join(path.file_name().unwrap_or_default()), text)?;
            }
        }
        // A service that ran before has declared its tenants' queues: the bookings published
        // below are routed to them as in production, not to the shared queue.
        for tenant in TenantConfig::load_dir(&tenants).unwrap_or_default() {
            topology.declare_tenant(channel, &tenant.tenant).await?;
        }
        let env = vec![
            ("PORTALS_CRM_AMQP_EXCHANGE".into(), amqp.exchange.clone()),
            (
                "PORTALS_CRM_AMQP_WORK_QUEUE".into(),
                amqp.work_queue.clone(),
            ),
            (
                "PORTALS_CRM_AMQP_DEAD_LETTER_QUEUE".into(),
                amqp.dead_letter_queue.clone(),
            ),
            (
                "PORTALS_CRM_AMQP_RETRY_QUEUE_PREFIX".into(),
                amqp.retry_queue_prefix.clone(),
            ),
            (
                "PORTALS_CRM_CACHE_PATH".into(),
                dir.join("cache").display().to_string(),
            ),
            (
                "PORTALS_CRM_TENANTS_DIR".into(),
                tenants.display().to_string(),
            ),
        ];
        Ok(Self {
            emulator,
            topology,
            env,
            dir,
        })
    }

    async fn finish(self, channel: &Channel) {
        let tenants = TenantConfig::load_dir(&self.dir.join("tenants")).unwrap_or_default();
        let _ = self
            .topology
            .delete_tenants(channel, tenants.iter().map(|t| t.tenant.as_str()))
            .await;
        let _ = self.topology.delete(channel).await;
        self.emulator.stop().await;
        let _ = std::fs::remove_dir_all(self.dir);
    }
}

/// What every measurement runs against: the config, the portals-crm binary the workers run, a
/// connection and confirm-mode channel for the bench's own publishing, an HTTP client for the
/// emulator and the workers, this run's id (in every queue name, so runs never collide), and
/// the runtime the emulators run on: two threads named [`cpu::EMULATOR_THREAD`], so that their
/// CPU time is the emulator's alone.
struct Bench<'a> {
    config: &'a Config,
    exe: &'a Path,
    connection: lapin::Connection,
    channel: Channel,
    http: reqwest::Client,
    run: String,
    emulators: Option<tokio::runtime::Runtime>,
}

impl<'a> Bench<'a> {
    async fn open(config: &'a Config, exe: &'a Path) -> Result<Self, BenchError> {
        let connection = amqp::connect(&config.amqp.url, 30, "portals-crm bench").await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let emulators = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(cpu::EMULATOR_THREAD)
            .enable_all()
            .build()?;
        Ok(Self {
            config,
            exe,
            connection,
            channel,
            http: reqwest::Client::new(),
            run: format!("{:x}", rand::random::<u32>()),
            emulators: Some(emulators),
        })
    }

    /// An emulator of the demo org on the emulator runtime.
    async fn emulator(&self, faults: FaultSpec) -> Result<EmulatorHandle, BenchError> {
        let Some(runtime) = &self.emulators else {
            return Err(BenchError::Stalled("the bench is closed".into()));
        };
        let started = runtime.spawn(async move {
            emulator::start(
                "127.0.0.1:0".parse().expect("a literal address"),
                OrgSpec::demo(),
                &faults,
            )
            .await
        });
        started
            .await
            .map_err(|e| BenchError::Stalled(format!("the emulator did not start: {e}")))?
            .map_err(BenchError::from)
    }

    async fn close(self) {
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

impl Drop for Bench<'_> {
    /// A runtime may not be dropped inside another one's async context (it would block on its
    /// threads), which is where a bench ends, closed or cut short by an error.
    fn drop(&mut self) {
        if let Some(runtime) = self.emulators.take() {
            runtime.shutdown_background();
        }
    }
}

/// What a saturation run measured.
struct Saturation {
    /// Sustained bookings/s: from the first booking in the org to the last, so the workers'
    /// cold start (process, broker, token, describes) is not averaged in.
    rate: f64,
    /// From spawning the workers to the first booking in the org.
    cold_start_ms: f64,
    /// Salesforce API calls per booking, cold start included.
    calls_per_booking: f64,
    /// CPU seconds the worker processes spent, per booking (cold start included).
    worker_cpu_per_booking: f64,
    /// CPU seconds the emulator's threads spent, per booking.
    emulator_cpu_per_booking: f64,
}

/// Saturation: publish `n` bookings, start `workers` worker processes on the queue, time until
/// all bookings are in the org.
async fn saturation(
    bench: &Bench<'_>,
    run: &str,
    n: usize,
    workers: usize,
    faults: FaultSpec,
) -> Result<Saturation, BenchError> {
    let (channel, exe, http) = (&bench.channel, bench.exe, &bench.http);
    let stage = Stage::start(bench, run, faults).await?;
    let bodies = (0..n).map(|i| simple_booking(run, i, if i % 2 == 0 { "acme" } else { "demo" }));
    publish_all(channel, &stage.topology.exchange, "meeting.booked", bodies).await?;
    let before = stats(http, &stage.emulator).await["api_calls"]
        .as_u64()
        .unwrap_or(0);
    let emulator_cpu_before = cpu::emulator_secs();
    let started = Instant::now();
    let mut running = Vec::with_capacity(workers);
    for w in 0..workers {
        let mut env = stage.env.clone();
        env.push((
            "PORTALS_CRM_CACHE_PATH".into(),
            stage.dir.join(format!("cache-{w}")).display().to_string(),
        ));
        running.push(Worker::spawn(exe, &env)?);
    }
    let waited = wait_for_events(http, &stage.emulator, n as u64, Duration::from_secs(600)).await;
    let finished = Instant::now();
    if let Some(worker) = running.first() {
        let graphs = worker
            .mean(http, "portals_crm_salesforce_graphs_per_request")
            .await;
        let request = worker
            .mean(http, "portals_crm_salesforce_request_seconds")
            .await;
        let processing = worker
            .mean(http, "portals_crm_event_processing_seconds")
            .await;
        let acks = "portals_crm_amqp_acks_total";
        let in_run = counter(http, worker, acks, "in_run").await;
        let alone = counter(http, worker, acks, "alone").await;
        eprintln!(
            "  worker 1: {:.1} graphs per request, {:.1} ms per request, {:.1} ms per event from delivery to settled, acks {in_run} in runs and {alone} alone",
            graphs.unwrap_or(f64::NAN),
            request.unwrap_or(f64::NAN) * 1000.0,
            processing.unwrap_or(f64::NAN) * 1000.0
        );
    }
    let calls = stats(http, &stage.emulator).await["api_calls"]
        .as_u64()
        .unwrap_or(0)
        - before;
    let emulator_cpu = cpu::emulator_secs() - emulator_cpu_before;
    let worker_cpu: f64 = running.iter().map(Worker::cpu_secs).sum();
    eprintln!(
        "  CPU per booking: workers {:.1} µs, emulator {:.1} µs",
        worker_cpu / n as f64 * 1e6,
        emulator_cpu / n as f64 * 1e6
    );
    for worker in running {
        worker.stop().await;
    }
    stage.finish(channel).await;
    let first = waited?;
    let steady = finished.duration_since(first.at).as_secs_f64().max(1e-3);
    Ok(Saturation {
        rate: (n as u64 - first.events.min(n as u64)) as f64 / steady,
        cold_start_ms: first.at.duration_since(started).as_secs_f64() * 1000.0,
        calls_per_booking: calls as f64 / n as f64,
        worker_cpu_per_booking: worker_cpu / n as f64,
        emulator_cpu_per_booking: emulator_cpu / n as f64,
    })
}

/// Sustained bookings/s with 1, 2 and 3 worker processes on one queue, the emulator answering
/// after `latency_ms`.
pub async fn scaling(
    config: &Config,
    exe: &Path,
    n: usize,
    latency_ms: u64,
) -> Result<Vec<(usize, f64)>, BenchError> {
    let bench = Bench::open(config, exe).await?;
    let run = &bench.run;
    let mut rates = Vec::new();
    for workers in 1..=3 {
        eprintln!("{workers} worker(s), {n} bookings");
        let measured = saturation(
            &bench,
            &format!("{run}-w{workers}"),
            n,
            workers,
            FaultSpec {
                latency_ms: Some(latency_ms),
                ..FaultSpec::default()
            },
        )
        .await?;
        eprintln!(
            "  first booking committed {:.0} ms after start",
            measured.cold_start_ms
        );
        rates.push((workers, measured.rate.round()));
    }
    bench.close().await;
    Ok(rates)
}

/// Fixed rate: 200 bookings/s; latency = Event.CreatedDate − publish time.
async fn latency(bench: &Bench<'_>, run: &str, secs: u64) -> Result<(f64, f64), BenchError> {
    let (channel, exe, http) = (&bench.channel, bench.exe, &bench.http);
    let stage = Stage::start(bench, run, FaultSpec::default()).await?;
    let worker = Worker::spawn(exe, &stage.env)?;
    // Let the worker connect and warm its token and user caches before the clock starts.
    publish_all(
        channel,
        &stage.topology.exchange,
        "meeting.booked",
        std::iter::once(simple_booking(run, 999_999, "acme")),
    )
    .await?;
    wait_for_events(http, &stage.emulator, 1, Duration::from_secs(30)).await?;
    let n = (secs * 200) as usize;
    let mut published_at = Vec::with_capacity(n);
    let mut ticker = tokio::time::interval(Duration::from_millis(5));
    for i in 0..n {
        ticker.tick().await;
        published_at.push(now_ms());
        let properties = amqp::event_properties(Some("acme")).with_delivery_mode(2);
        channel
            .basic_publish(
                stage.topology.exchange.as_str().into(),
                "meeting.booked".into(),
                BasicPublishOptions::default(),
                &simple_booking(run, i, "acme"),
                properties,
            )
            .await?;
    }
    wait_for_events(
        http,
        &stage.emulator,
        n as u64 + 1,
        Duration::from_secs(120),
    )
    .await?;
    let records: Vec<Value> = http
        .get(format!(
            "{}/__emulator/records/Event",
            stage.emulator.base_url
        ))
        .send()
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))?
        .json()
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))?;
    let mut lags: Vec<f64> = records
        .iter()
        .filter_map(|r| {
            let id = r["BookMe__Booking_Id__c"].as_str()?;
            let i: usize = id.rsplit('_').next()?.parse().ok()?;
            let published = *published_at.get(i)?;
            let created = OffsetDateTime::parse(
                &r["CreatedDate"].as_str()?.replace("+0000", "Z"),
                &time::format_description::well_known::Rfc3339,
            )
            .ok()?;
            let created_ms = created.unix_timestamp_nanos() / 1_000_000;
            Some((created_ms - i128::from(published)) as f64)
        })
        .collect();
    worker.stop().await;
    stage.finish(channel).await;
    lags.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((pick(0.5), pick(0.99)))
}

/// Memory: publish the backlog first, then let a worker chew on it and read its peak RSS.
async fn backlog_rss(bench: &Bench<'_>, run: &str, n: usize) -> Result<f64, BenchError> {
    let (channel, exe, http) = (&bench.channel, bench.exe, &bench.http);
    let stage = Stage::start(bench, run, FaultSpec::default()).await?;
    let bodies = (0..n).map(|i| simple_booking(run, i, if i % 2 == 0 { "acme" } else { "demo" }));
    publish_all(channel, &stage.topology.exchange, "meeting.booked", bodies).await?;
    let worker = Worker::spawn(exe, &stage.env)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stats(http, &stage.emulator).await;
    }
    let rss = worker.peak_rss_mb();
    worker.stop().await;
    stage.finish(channel).await;
    Ok(rss)
}

/// Latency of the slow tenant's org in the fairness run.
const SLOW_ORG_MS: u64 = 2_000;

/// What the fairness run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Fairness {
    /// The fast tenant's bookings.
    pub fast: usize,
    /// The slow tenant's bookings published before them.
    pub slow: usize,
    /// From the worker's start to the fast tenant's last booking in its org, alone (ms).
    pub alone_ms: f64,
    /// The same, behind the slow tenant's backlog (ms).
    pub behind_ms: f64,
    /// The slow tenant's bookings written per second meanwhile (its org answers in 2 s).
    pub slow_per_s: f64,
    /// Messages parked in the first retry tier (`portals_crm_tenant_busy_total`) by then.
    pub parked: u64,
}

/// A counter's total on the worker's `/metrics`, over the label sets containing `labels`.
async fn counter(http: &reqwest::Client, worker: &Worker, name: &str, labels: &str) -> u64 {
    let Ok(response) = http
        .get(format!("http://{}/metrics", worker.http))
        .send()
        .await
    else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// One half of the fairness run: `slow` bookings of `demo` (its org answering in
/// [`SLOW_ORG_MS`]), then `fast` of `acme`; a worker started on them; the time until acme's are
/// all in its org, demo's written by then, and the messages parked.
async fn fast_tenant(
    bench: &Bench<'_>,
    run: &str,
    fast: usize,
    slow: usize,
) -> Result<(f64, u64, u64), BenchError> {
    let (channel, exe, http) = (&bench.channel, bench.exe, &bench.http);
    let stage = Stage::start(bench, run, FaultSpec::default()).await?;
    let slow_org = bench
        .emulator(FaultSpec {
            latency_ms: Some(SLOW_ORG_MS),
            ..FaultSpec::default()
        })
        .await?;
    let demo_file = stage.dir.join("tenants").join("demo.toml");
    let text = std::fs::read_to_string(&demo_file)?;
    std::fs::write(
        &demo_file,
        text.replace(&stage.emulator.base_url, &slow_org.base_url),
    )?;
    let slow_bodies = (0..slow).map(|i| simple_booking(run, i, "demo"));
    publish_all(
        channel,
        &stage.topology.exchange,
        "meeting.booked",
        slow_bodies,
    )
    .await?;
    let fast_bodies = (0..fast).map(|i| simple_booking(run, i, "acme"));
    publish_all(
        channel,
        &stage.topology.exchange,
        "meeting.booked",
        fast_bodies,
    )
    .await?;
    let started = Instant::now();
    let worker = Worker::spawn(exe, &stage.env)?;
    let waited =
        wait_for_events(http, &stage.emulator, fast as u64, Duration::from_secs(600)).await;
    let took = started.elapsed().as_secs_f64() * 1000.0;
    let slow_written = stats(http, &slow_org).await["records"]["Event"]
        .as_u64()
        .unwrap_or(0);
    let parked = counter(http, &worker, "portals_crm_tenant_busy_total", "demo").await;
    worker.stop().await;
    stage.finish(channel).await;
    slow_org.stop().await;
    waited?;
    Ok((took, slow_written, parked))
}

/// Fairness: the fast tenant's time alone, then behind the slow tenant's backlog.
async fn fairness(bench: &Bench<'_>, run: &str, sizes: BenchSizes) -> Result<Fairness, BenchError> {
    let (alone_ms, _, _) = fast_tenant(bench, &format!("{run}-alone"), sizes.fair_fast, 0).await?;
    eprintln!("  alone: {alone_ms:.0} ms");
    let (behind_ms, slow_written, parked) = fast_tenant(
        bench,
        &format!("{run}-behind"),
        sizes.fair_fast,
        sizes.fair_slow,
    )
    .await?;
    eprintln!(
        "  behind {} slow bookings: {behind_ms:.0} ms; {slow_written} slow written, {parked} parked meanwhile",
        sizes.fair_slow
    );
    Ok(Fairness {
        fast: sizes.fair_fast,
        slow: sizes.fair_slow,
        alone_ms: alone_ms.round(),
        behind_ms: behind_ms.round(),
        slow_per_s: (slow_written as f64 / (behind_ms / 1000.0).max(1e-3)).round(),
        parked,
    })
}

/// Only the fairness run (`portals-crm bench --fairness`).
pub async fn fairness_only(
    config: &Config,
    exe: &Path,
    sizes: BenchSizes,
) -> Result<Fairness, BenchError> {
    let bench = Bench::open(config, exe).await?;
    let run = bench.run.clone();
    let result = fairness(&bench, &format!("{run}-fair"), sizes).await;
    bench.close().await;
    result
}

/// Steps 1 and 2 of the full run, which `--cpu` runs alone: the bare consumer, then the
/// zero-latency saturation run.
async fn bare_and_zero_latency(
    config: &Config,
    bench: &Bench<'_>,
    sizes: BenchSizes,
) -> Result<(Bare, Saturation), BenchError> {
    let run = &bench.run;
    eprintln!("1/7 bare lapin consume + ack, {} messages", sizes.bare);
    let bare = bare_consume_ack(config, &bench.channel, run, sizes.bare).await?;
    eprintln!(
        "2/7 saturation, {} bookings, zero-latency emulator",
        sizes.saturation
    );
    let fast = saturation(
        bench,
        &format!("{run}-sat"),
        sizes.saturation,
        1,
        FaultSpec::default(),
    )
    .await?;
    Ok((bare, fast))
}

/// Only the CPU figures (`portals-crm bench --cpu`): the bare consumer, then one zero-latency
/// saturation run; a table of rates and CPU per message.
pub async fn cpu_only(
    config: &Config,
    exe: &Path,
    sizes: BenchSizes,
) -> Result<String, BenchError> {
    let bench = Bench::open(config, exe).await?;
    let result = async {
        let (bare, fast) = bare_and_zero_latency(config, &bench, sizes).await?;
        Ok(format!(
            "| measurement | value |\n|---|---|\n\
             | bare lapin consume+ack | {:.0} msg/s, {:.1} µs CPU per message |\n\
             | portals-crm, zero-latency emulator | {:.0} bookings/s ({:.2} × bare) |\n\
             | worker CPU per booking | {:.1} µs ({:.2} × bare's per message) |\n\
             | emulator CPU per booking | {:.1} µs ({:.2} × bare's per message) |\n\
             | API calls per booking | {:.4} |",
            bare.rate,
            bare.cpu_per_message * 1e6,
            fast.rate,
            fast.rate / bare.rate.max(1.0),
            fast.worker_cpu_per_booking * 1e6,
            fast.worker_cpu_per_booking / bare.cpu_per_message.max(1e-9),
            fast.emulator_cpu_per_booking * 1e6,
            fast.emulator_cpu_per_booking / bare.cpu_per_message.max(1e-9),
            fast.calls_per_booking,
        ))
    }
    .await;
    bench.close().await;
    result
}

impl std::fmt::Display for Fairness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "| fast tenant's {} bookings alone vs behind {} of a neighbour whose org answers in {} s | \
             {:.0} ms alone, {:.0} ms behind ({:.2} ×); neighbour meanwhile {:.0} bookings/s, {} parked | ≤ 2 × |",
            self.fast,
            self.slow,
            SLOW_ORG_MS / 1000,
            self.alone_ms,
            self.behind_ms,
            self.behind_ms / self.alone_ms.max(1.0),
            self.slow_per_s,
            self.parked
        )
    }
}

/// CPU time from procfs: `utime` and `stime`, fields 14 and 15 of `/proc/<pid>/stat` (and of
/// `/proc/<pid>/task/<tid>/stat` for one thread), in clock ticks of `USER_HZ`, which is 100 on
/// Linux whatever the kernel's own tick (proc(5)).
mod cpu {
    /// The emulator runtime's thread name (see [`super::Bench`]).
    pub const EMULATOR_THREAD: &str = "emulator";

    const USER_HZ: f64 = 100.0;

    /// User + system seconds of the process or thread whose `stat` file this is.
    pub fn stat_secs(path: &str) -> f64 {
        std::fs::read_to_string(path).map_or(0.0, |stat| parse(&stat))
    }

    /// `stat`'s second field, the command, is in parentheses and may hold spaces: the fields
    /// are counted from after its closing parenthesis (field 3 is the first one there).
    fn parse(stat: &str) -> f64 {
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return 0.0;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        match (ticks(14), ticks(15)) {
            (Some(user), Some(system)) => (user + system) / USER_HZ,
            _ => 0.0,
        }
    }

    /// User + system seconds spent so far by this process's emulator threads.
    pub fn emulator_secs() -> f64 {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0.0;
        };
        tasks
            .flatten()
            .filter(|task| {
                std::fs::read_to_string(task.path().join("comm"))
                    .is_ok_and(|comm| comm.trim() == EMULATOR_THREAD)
            })
            .map(|task| stat_secs(&task.path().join("stat").display().to_string()))
            .sum()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn user_and_system_ticks_are_read_after_the_command() {
            let stat = "4242 (tokio (worker) 1) S 1 4242 4242 0 -1 4194560 9 0 0 0 250 50 0 0 \
                        20 0 3 0 100 1000 200";
            assert!((super::parse(stat) - 3.0).abs() < 1e-9);
            assert_eq!(super::parse("garbage"), 0.0);
        }
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {memory} RAM")
}

/// Runs every measurement; `exe` is the portals-crm binary the workers run.
pub async fn run(config: &Config, exe: &Path, sizes: BenchSizes) -> Result<Report, BenchError> {
    let bench = Bench::open(config, exe).await?;
    let run = &bench.run;
    let (bare, fast) = bare_and_zero_latency(config, &bench, sizes).await?;
    eprintln!(
        "  first booking committed {:.0} ms after start",
        fast.cold_start_ms
    );
    eprintln!(
        "3/7 saturation, {} bookings, 100 ms emulator latency",
        sizes.saturation
    );
    let latency_100ms = FaultSpec {
        latency_ms: Some(100),
        ..FaultSpec::default()
    };
    let slow = saturation(
        &bench,
        &format!("{run}-slow"),
        sizes.saturation,
        1,
        latency_100ms,
    )
    .await?;
    eprintln!(
        "  first booking committed {:.0} ms after start",
        slow.cold_start_ms
    );
    eprintln!("4/7 (API calls per booking come from run 2)");
    eprintln!("5/7 latency at 200 bookings/s for {} s", sizes.latency_secs);
    let (p50, p99) = latency(&bench, &format!("{run}-lat"), sizes.latency_secs).await?;
    eprintln!("6/7 peak RSS with a backlog of {} bookings", sizes.backlog);
    let rss = backlog_rss(&bench, &format!("{run}-rss"), sizes.backlog).await?;
    eprintln!(
        "7/7 fairness: {} bookings alone, then behind {} of a slow neighbour",
        sizes.fair_fast, sizes.fair_slow
    );
    let fairness = fairness(&bench, &format!("{run}-fair"), sizes).await?;
    bench.close().await;
    let report = Report {
        bare_consume_ack_per_s: bare.rate.round(),
        bare_cpu_us_per_message: (bare.cpu_per_message * 1e7).round() / 10.0,
        bookings_per_s: fast.rate.round(),
        bookings_per_s_100ms: slow.rate.round(),
        api_calls_per_booking: (fast.calls_per_booking * 10_000.0).round() / 10_000.0,
        worker_cpu_us_per_booking: (fast.worker_cpu_per_booking * 1e7).round() / 10.0,
        emulator_cpu_us_per_booking: (fast.emulator_cpu_per_booking * 1e7).round() / 10.0,
        p50_ms: p50.round(),
        p99_ms: p99.round(),
        peak_rss_mb: (rss * 10.0).round() / 10.0,
        cold_start_ms: fast.cold_start_ms.round(),
        cold_start_100ms_ms: slow.cold_start_ms.round(),
        backlog: sizes.backlog,
        fairness,
        machine: machine(),
    };
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/pipeline.json",
        serde_json::to_string_pretty(&report).unwrap_or_default(),
    )?;
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bare = self.bare_consume_ack_per_s.max(1.0);
        writeln!(f, "| measurement | value | target |")?;
        writeln!(f, "|---|---|---|")?;
        writeln!(
            f,
            "| bare lapin consume+ack (quorum, same prefetch) | {:.0} msg/s | the limit |",
            self.bare_consume_ack_per_s
        )?;
        writeln!(
            f,
            "| bare consumer's CPU per message | {:.1} µs | (a lapin consumer's floor) |",
            self.bare_cpu_us_per_message
        )?;
        writeln!(
            f,
            "| portals-crm, zero-latency emulator | {:.0} bookings/s ({:.2} × bare) | ≥ 0.75 × bare |",
            self.bookings_per_s,
            self.bookings_per_s / bare
        )?;
        writeln!(
            f,
            "| portals-crm, 100 ms emulator latency | {:.0} bookings/s ({:.2} × bare) | ≥ 0.70 × bare |",
            self.bookings_per_s_100ms,
            self.bookings_per_s_100ms / bare
        )?;
        // Against the bare consumer's CPU per message in the same run: this machine's speed
        // drifts by a third from one minute to the next, and both move with it.
        let of_bare = self.bare_cpu_us_per_message.max(1e-3);
        writeln!(
            f,
            "| worker CPU per booking (zero latency) | {:.1} µs ({:.2} × bare's per message) | ≤ 50 µs |",
            self.worker_cpu_us_per_booking,
            self.worker_cpu_us_per_booking / of_bare
        )?;
        writeln!(
            f,
            "| emulator CPU per booking (zero latency) | {:.1} µs ({:.2} × bare's per message) | ≤ 50 µs |",
            self.emulator_cpu_us_per_booking,
            self.emulator_cpu_us_per_booking / of_bare
        )?;
        writeln!(
            f,
            "| API calls per booking at saturation | {:.4} | ≤ 0.015 |",
            self.api_calls_per_booking
        )?;
        writeln!(
            f,
            "| publish→commit latency at 200 bookings/s | p50 {:.0} ms, p99 {:.0} ms | p99 ≤ 50 ms |",
            self.p50_ms, self.p99_ms
        )?;
        writeln!(
            f,
            "| worker peak RSS, {} bookings waiting | {:.1} MB | ≤ 100 MB |",
            self.backlog, self.peak_rss_mb
        )?;
        writeln!(f, "{}", self.fairness)?;
        writeln!(
            f,
            "worker cold start to first commit: {:.0} ms (zero latency), {:.0} ms (100 ms latency); \
             rates are sustained, from first commit to last",
            self.cold_start_ms, self.cold_start_100ms_ms
        )?;
        write!(f, "machine: {}", self.machine)
    }
}
