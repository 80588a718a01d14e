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
//! 6. the worker's peak RSS with a backlog of 200,000 bookings.
//!
//! Results go to a table and `target/bench/pipeline.json`. Nothing is asserted: the figures are
//! reported, and README's performance section quotes a run.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::amqp::{self, Topology};
use crate::config::Config;
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
}

impl Default for BenchSizes {
    fn default() -> Self {
        Self {
            bare: 50_000,
            saturation: 30_000,
            latency_secs: 15,
            backlog: 200_000,
        }
    }
}

/// The six figures, under the keys issue 7 names.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Bare lapin consume + ack rate (messages/s).
    pub bare_consume_ack_per_s: f64,
    /// portals-crm bookings/s, zero-latency emulator.
    pub bookings_per_s: f64,
    /// portals-crm bookings/s, 100 ms emulator latency.
    pub bookings_per_s_100ms: f64,
    /// Salesforce API calls per booking at saturation.
    pub api_calls_per_booking: f64,
    /// Median publish-to-commit latency at 200 bookings/s.
    pub p50_ms: f64,
    /// 99th percentile publish-to-commit latency at 200 bookings/s.
    pub p99_ms: f64,
    /// Worker peak RSS with the backlog waiting.
    pub peak_rss_mb: f64,
    /// Machine and sizes, for the README.
    pub machine: String,
}

/// The bench could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
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

/// Publishes with confirms, a window of messages in flight at a time.
async fn publish_all(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
) -> Result<usize, BenchError> {
    let mut pending = Vec::with_capacity(1000);
    let mut count = 0;
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/cloudevents+json".into()),
            )
            .await?;
        pending.push(confirm);
        count += 1;
        if pending.len() == 1000 {
            for confirm in pending.drain(..) {
                confirm.await?;
            }
        }
    }
    for confirm in pending {
        confirm.await?;
    }
    Ok(count)
}

async fn bare_consume_ack(
    config: &Config,
    channel: &Channel,
    run: &str,
    n: usize,
) -> Result<f64, BenchError> {
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
    let _ = connection.close(200, "bench".into()).await;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(rate)
}

/// A worker process on the bench's queues.
struct Worker {
    child: tokio::process::Child,
}

impl Worker {
    fn spawn(exe: &Path, env: &[(String, String)]) -> Result<Self, BenchError> {
        let child = tokio::process::Command::new(exe)
            .arg("run")
            .envs(env.iter().cloned())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Self { child })
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

async fn wait_for_events(
    http: &reqwest::Client,
    emulator: &EmulatorHandle,
    target: u64,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = stats(http, emulator).await["records"]["Event"]
            .as_u64()
            .unwrap_or(0);
        if events >= target {
            return Ok(());
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
    async fn start(
        config: &Config,
        channel: &Channel,
        name: &str,
        faults: FaultSpec,
    ) -> Result<Self, BenchError> {
        let emulator = emulator::start(
            "127.0.0.1:0".parse().expect("a literal address"),
            OrgSpec::demo(),
            &faults,
        )
        .await?;
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
        for entry in std::fs::read_dir(&config.tenants.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path)?;
                let text = text.replace("http://127.0.0.1:7800", &emulator.base_url);
                std::fs::write(tenants.join(path.file_name().unwrap_or_default()), text)?;
            }
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
            ("PORTALS_CRM_HTTP_LISTEN".into(), "127.0.0.1:0".into()),
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
        let _ = self.topology.delete(channel).await;
        self.emulator.stop().await;
        let _ = std::fs::remove_dir_all(self.dir);
    }
}

/// Saturation: publish `n` bookings, start `workers` worker processes on the queue, time until
/// all bookings are in the org.
#[allow(clippy::too_many_arguments)]
async fn saturation(
    config: &Config,
    channel: &Channel,
    exe: &Path,
    run: &str,
    n: usize,
    workers: usize,
    faults: FaultSpec,
    http: &reqwest::Client,
) -> Result<(f64, f64), BenchError> {
    let stage = Stage::start(config, channel, run, faults).await?;
    let bodies = (0..n).map(|i| simple_booking(run, i, if i % 2 == 0 { "acme" } else { "demo" }));
    publish_all(channel, &stage.topology.exchange, "meeting.booked", bodies).await?;
    let before = stats(http, &stage.emulator).await["api_calls"]
        .as_u64()
        .unwrap_or(0);
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
    let elapsed = started.elapsed().as_secs_f64();
    let calls = stats(http, &stage.emulator).await["api_calls"]
        .as_u64()
        .unwrap_or(0)
        - before;
    for worker in running {
        worker.stop().await;
    }
    stage.finish(channel).await;
    waited?;
    Ok((n as f64 / elapsed, calls as f64 / n as f64))
}

/// Sustained bookings/s with 1, 2 and 3 worker processes on one queue, the emulator answering
/// after `latency_ms`.
pub async fn scaling(
    config: &Config,
    exe: &Path,
    n: usize,
    latency_ms: u64,
) -> Result<Vec<(usize, f64)>, BenchError> {
    let run = format!("{:x}", rand::random::<u32>());
    let (connection, channel) = open_channel(config).await?;
    let http = reqwest::Client::new();
    let mut rates = Vec::new();
    for workers in 1..=3 {
        eprintln!("{workers} worker(s), {n} bookings");
        let (rate, _) = saturation(
            config,
            &channel,
            exe,
            &format!("{run}-w{workers}"),
            n,
            workers,
            FaultSpec {
                latency_ms: Some(latency_ms),
                ..FaultSpec::default()
            },
            &http,
        )
        .await?;
        rates.push((workers, rate.round()));
    }
    let _ = connection.close(200, "bench done".into()).await;
    Ok(rates)
}

/// Fixed rate: 200 bookings/s; latency = Event.CreatedDate − publish time.
async fn latency(
    config: &Config,
    channel: &Channel,
    exe: &Path,
    run: &str,
    secs: u64,
    http: &reqwest::Client,
) -> Result<(f64, f64), BenchError> {
    let stage = Stage::start(config, channel, run, FaultSpec::default()).await?;
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
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/cloudevents+json".into());
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
async fn backlog_rss(
    config: &Config,
    channel: &Channel,
    exe: &Path,
    run: &str,
    n: usize,
    http: &reqwest::Client,
) -> Result<f64, BenchError> {
    let stage = Stage::start(config, channel, run, FaultSpec::default()).await?;
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

/// A connection and a channel in confirm mode for the bench's own publishing.
async fn open_channel(config: &Config) -> Result<(lapin::Connection, Channel), BenchError> {
    let connection = amqp::connect(&config.amqp.url, 30, "portals-crm bench").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Runs every measurement; `exe` is the portals-crm binary the workers run.
pub async fn run(config: &Config, exe: &Path, sizes: BenchSizes) -> Result<Report, BenchError> {
    let run = format!("{:x}", rand::random::<u32>());
    let (connection, channel) = open_channel(config).await?;
    let http = reqwest::Client::new();
    eprintln!("1/6 bare lapin consume + ack, {} messages", sizes.bare);
    let bare = bare_consume_ack(config, &channel, &run, sizes.bare).await?;
    eprintln!(
        "2/6 saturation, {} bookings, zero-latency emulator",
        sizes.saturation
    );
    let (rate, calls) = saturation(
        config,
        &channel,
        exe,
        &format!("{run}-sat"),
        sizes.saturation,
        1,
        FaultSpec::default(),
        &http,
    )
    .await?;
    eprintln!(
        "3/6 saturation, {} bookings, 100 ms emulator latency",
        sizes.saturation
    );
    let slow = FaultSpec {
        latency_ms: Some(100),
        ..FaultSpec::default()
    };
    let (rate_100ms, _) = saturation(
        config,
        &channel,
        exe,
        &format!("{run}-slow"),
        sizes.saturation,
        1,
        slow,
        &http,
    )
    .await?;
    eprintln!("4/6 (API calls per booking come from run 2)");
    eprintln!("5/6 latency at 200 bookings/s for {} s", sizes.latency_secs);
    let (p50, p99) = latency(
        config,
        &channel,
        exe,
        &format!("{run}-lat"),
        sizes.latency_secs,
        &http,
    )
    .await?;
    eprintln!("6/6 peak RSS with a backlog of {} bookings", sizes.backlog);
    let rss = backlog_rss(
        config,
        &channel,
        exe,
        &format!("{run}-rss"),
        sizes.backlog,
        &http,
    )
    .await?;
    let _ = connection.close(200, "bench done".into()).await;
    let report = Report {
        bare_consume_ack_per_s: bare.round(),
        bookings_per_s: rate.round(),
        bookings_per_s_100ms: rate_100ms.round(),
        api_calls_per_booking: (calls * 10_000.0).round() / 10_000.0,
        p50_ms: p50.round(),
        p99_ms: p99.round(),
        peak_rss_mb: (rss * 10.0).round() / 10.0,
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
        let ratio = self.bookings_per_s / self.bare_consume_ack_per_s.max(1.0);
        writeln!(f, "| measurement | value | target |")?;
        writeln!(f, "|---|---|---|")?;
        writeln!(
            f,
            "| bare lapin consume+ack (quorum, same prefetch) | {:.0} msg/s | the limit |",
            self.bare_consume_ack_per_s
        )?;
        writeln!(
            f,
            "| portals-crm, zero-latency emulator | {:.0} bookings/s ({:.2} × bare) | ≥ 0.35 × bare |",
            self.bookings_per_s, ratio
        )?;
        writeln!(
            f,
            "| portals-crm, 100 ms emulator latency | {:.0} bookings/s | ≥ 5,000 per worker |",
            self.bookings_per_s_100ms
        )?;
        writeln!(
            f,
            "| API calls per booking at saturation | {:.4} | ≤ 0.02 |",
            self.api_calls_per_booking
        )?;
        writeln!(
            f,
            "| publish→commit latency at 200 bookings/s | p50 {:.0} ms, p99 {:.0} ms | p99 ≤ 100 ms |",
            self.p50_ms, self.p99_ms
        )?;
        writeln!(
            f,
            "| worker peak RSS, 200,000 bookings waiting | {:.1} MB | ≤ 100 MB |",
            self.peak_rss_mb
        )?;
        write!(f, "machine: {}", self.machine)
    }
}
