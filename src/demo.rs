//! `portals-crm demo`: the emulator in-process, the topology on the local broker (under names of
//! its own, so it never touches a real deployment's queues), a realistic stream of bookings,
//! the real service processing them, and a summary.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::amqp::{self, Publisher, Topology};
use crate::config::{Config, TenantConfig};
use crate::emulator::{self, FaultSpec, OrgSpec};
use crate::service::{BuildError, Service};

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    /// Routing key on the bookings exchange.
    pub routing_key: String,
    /// The body.
    pub body: Vec<u8>,
}

const ACME_HOSTS: &[&str] = &[
    "sara.rep@acme.example",
    "luc.vendeur@acme.example",
    "new.hire@acme.example",
];
const DEMO_HOSTS: &[&str] = &["olivia.host@demo.example", "former.rep@acme.example"];
const FIRST: &[&str] = &[
    "Jane", "Marie", "Pierre", "Aiko", "Omar", "Ingrid", "Luis", "Chen",
];
const LAST: &[&str] = &[
    "Doe", "Curie", "Dupont", "Tanaka", "Haddad", "Berg", "García", "Wei",
];
const COMPANIES: &[&str] = &["Globex", "Initech", "Umbrella", "Hooli", "Stark Industries"];

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// A booking event body with the sample events' shape.
#[allow(clippy::too_many_arguments)]
pub fn booking_event(
    tenant: &str,
    booking_id: &str,
    version: u64,
    status: &str,
    starts_at: OffsetDateTime,
    host: &str,
    attendees: Vec<Value>,
    event_time: OffsetDateTime,
) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("evt_{booking_id}_v{version}"),
        "source": "bookme/partner-portal",
        "type": format!("com.bookme.meeting.{status}.v1"),
        "time": rfc3339(event_time),
        "subject": format!("booking/{booking_id}"),
        "tenantid": tenant,
        "datacontenttype": "application/json",
        "data": {
            "booking_id": booking_id,
            "version": version,
            "status": status,
            "title": "Intro call",
            "starts_at": rfc3339(starts_at),
            "ends_at": rfc3339(starts_at + time::Duration::minutes(30)),
            "timezone": "Europe/Oslo",
            "location": "https://meet.example/demo",
            "portal": {"id": "pp_emea", "name": "Partner Portal EMEA"},
            "host": {"email": host, "name": "Host"},
            "attendees": attendees,
            "answers": {"team_size": "10-50"},
            "cancel_reason": if status == "cancelled" { json!("Customer asked to postpone") } else { Value::Null }
        }
    })
}

/// A one-attendee booking `bk_{run}_{i}` at version 1, hosted by a user the demo org has: the
/// unit of the load bench and of tests that need many distinct bookings.
pub fn simple_booking(run: &str, i: usize, tenant: &str) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    let attendee = json!({"email": format!("a{i}@{run}.example"), "first_name": "A", "last_name": format!("Attendee{i}"), "company": "Bench", "phone": null, "title": null});
    let host = if tenant == "acme" {
        "sara.rep@acme.example"
    } else {
        "olivia.host@demo.example"
    };
    serde_json::to_vec(&booking_event(
        tenant,
        &format!("bk_{run}_{i}"),
        1,
        "booked",
        now + time::Duration::days(3),
        host,
        vec![attendee],
        now,
    ))
    .unwrap_or_default()
}

/// A realistic stream of about `events` messages for the `acme` and `demo` tenants: single and
/// group bookings, reschedules, cancellations, duplicates, a few out of order, a few malformed.
pub fn scenario(events: usize, run_id: &str, seed: u64) -> Vec<Message> {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = OffsetDateTime::now_utc();
    let mut out: Vec<Message> = Vec::new();
    let malformed = (events / 50).max(7);
    let mut booking = 0usize;
    while out.len() + malformed < events {
        booking += 1;
        let tenant = if booking.is_multiple_of(3) {
            "demo"
        } else {
            "acme"
        };
        let id = format!("bk_{run_id}_{booking}");
        let hosts = if tenant == "acme" {
            ACME_HOSTS
        } else {
            DEMO_HOSTS
        };
        let host = hosts[rng.gen_range(0..hosts.len())];
        let group = rng.gen_bool(0.2);
        let attendees: Vec<Value> = (0..if group { rng.gen_range(2..=3) } else { 1 })
            .map(|a| {
                let first = FIRST[rng.gen_range(0..FIRST.len())];
                let last = LAST[rng.gen_range(0..LAST.len())];
                json!({
                    "email": format!("{}.{}.{booking}.{a}@{}.example", first.to_lowercase(), last.to_lowercase(), run_id),
                    "first_name": first,
                    "last_name": last,
                    "company": COMPANIES[rng.gen_range(0..COMPANIES.len())],
                    "phone": if rng.gen_bool(0.7) { json!(format!("+47 555 {:05}", rng.gen_range(0..99999))) } else { Value::Null },
                    "title": "Buyer",
                })
            })
            .collect();
        let starts = now + time::Duration::days(rng.gen_range(1..30));
        let mut versions = vec![booking_event(
            tenant,
            &id,
            1,
            "booked",
            starts,
            host,
            attendees.clone(),
            now,
        )];
        if rng.gen_bool(0.35) {
            versions.push(booking_event(
                tenant,
                &id,
                2,
                "rescheduled",
                starts + time::Duration::days(1),
                host,
                attendees.clone(),
                now,
            ));
        }
        if rng.gen_bool(0.15) {
            let v = versions.len() as u64 + 1;
            versions.push(booking_event(
                tenant,
                &id,
                v,
                "cancelled",
                starts + time::Duration::days(1),
                host,
                attendees.clone(),
                now,
            ));
        }
        if versions.len() > 1 && rng.gen_bool(0.1) {
            versions.swap(0, 1);
        }
        if rng.gen_bool(0.05) {
            let again = versions[versions.len() - 1].clone();
            versions.push(again);
        }
        for v in versions {
            let status = v["data"]["status"].as_str().unwrap_or("booked").to_owned();
            out.push(Message {
                routing_key: format!("meeting.{status}"),
                body: serde_json::to_vec(&v).unwrap_or_default(),
            });
        }
    }
    let base = booking_event(
        "acme",
        &format!("bk_{run_id}_bad"),
        1,
        "booked",
        now + time::Duration::days(2),
        "sara.rep@acme.example",
        vec![
            json!({"email": "x@y.example", "first_name": "X", "last_name": "Y", "company": "Z", "phone": null, "title": null}),
        ],
        now,
    );
    let bad: Vec<Vec<u8>> = vec![
        b"this is not JSON".to_vec(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["specversion"] = json!("0.3");
            v
        })
        .unwrap_or_default(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["type"] = json!("com.bookme.meeting.teleported.v1");
            v
        })
        .unwrap_or_default(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["data"]["ends_at"] = v["data"]["starts_at"].clone();
            v
        })
        .unwrap_or_default(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["data"]["attendees"] = json!([]);
            v
        })
        .unwrap_or_default(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["tenantid"] = json!("nobody");
            v
        })
        .unwrap_or_default(),
        serde_json::to_vec(&{
            let mut v = base.clone();
            v["data"]["booking_id"] = json!(format!("bk_{run_id}_bademail"));
            v["data"]["attendees"][0]["email"] = json!("broken@localhost");
            v
        })
        .unwrap_or_default(),
    ];
    for body in bad.into_iter().cycle().take(malformed) {
        let at = rng.gen_range(0..=out.len());
        out.insert(
            at,
            Message {
                routing_key: "meeting.booked".into(),
                body,
            },
        );
    }
    // Interleave bookings a little, as concurrent users would, without reordering one booking.
    out.chunks_mut(8).for_each(|chunk| {
        if rng.gen_bool(0.3) {
            chunk.shuffle(&mut rng);
        }
    });
    out
}

/// What the demo did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Messages published.
    pub published: u64,
    /// Settled messages by outcome.
    pub outcomes: BTreeMap<String, u64>,
    /// Records in the org by sObject.
    pub records: BTreeMap<String, u64>,
    /// Dead letters by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// API calls the org counted.
    pub api_calls: u64,
    /// Requests the org served, by endpoint.
    pub requests: BTreeMap<String, u64>,
    /// Bookings written (events settled as written).
    pub written: u64,
    /// Wall time from first publish to last settle.
    pub elapsed: Duration,
}

impl Summary {
    /// True when every published message was settled.
    pub fn all_settled(&self) -> bool {
        self.outcomes.values().sum::<u64>() >= self.published
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settled: u64 = self.outcomes.values().sum();
        writeln!(f, "\nportals-crm demo summary")?;
        writeln!(f, "  events published        {}", self.published)?;
        writeln!(f, "  events settled          {settled}")?;
        for (outcome, n) in &self.outcomes {
            writeln!(f, "    {outcome:<22}{n}")?;
        }
        writeln!(f, "  records in Salesforce")?;
        for (sobject, n) in &self.records {
            writeln!(f, "    {sobject:<22}{n}")?;
        }
        writeln!(f, "  dead letters by reason")?;
        for (reason, n) in &self.dead_letters {
            writeln!(f, "    {reason:<40}{n}")?;
        }
        writeln!(f, "  Salesforce API calls    {}", self.api_calls)?;
        for (endpoint, n) in &self.requests {
            writeln!(f, "    {endpoint:<22}{n}")?;
        }
        let per_booking = if self.written == 0 {
            0.0
        } else {
            self.api_calls as f64 / self.written as f64
        };
        writeln!(f, "  API calls per booking   {per_booking:.3}")?;
        let rate = settled as f64 / self.elapsed.as_secs_f64().max(0.001);
        write!(
            f,
            "  throughput              {rate:.0} events/s ({:.2} s)",
            self.elapsed.as_secs_f64()
        )
    }
}

/// The demo failed to run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The emulator did not start.
    #[error("emulator: {0}")]
    Emulator(std::io::Error),
    /// The service did not start.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// Tenant files are broken.
    #[error("tenants:\n  - {}", .0.join("\n  - "))]
    Tenants(Vec<String>),
    /// The connection did not open.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// The broker refused something.
    #[error("broker at the configured amqp.url: {0}")]
    Broker(String),
    /// Reading the emulator's inspection endpoints failed.
    #[error("emulator inspection: {0}")]
    Inspect(String),
}

async fn inspect(client: &reqwest::Client, url: &str) -> Result<Value, DemoError> {
    client
        .get(url)
        .send()
        .await
        .map_err(|e| DemoError::Inspect(e.to_string()))?
        .json()
        .await
        .map_err(|e| DemoError::Inspect(e.to_string()))
}

/// Runs the demo; with `keep_running`, waits for `stop` before tearing down.
pub async fn run(
    config: &Config,
    events: usize,
    keep_running: bool,
    stop: impl Future<Output = ()>,
) -> Result<Summary, DemoError> {
    let run_id: String = format!("{:x}", rand::random::<u32>());
    let emulator = emulator::start(
        "127.0.0.1:0".parse().expect("a literal address"),
        OrgSpec::demo(),
        &FaultSpec::default(),
    )
    .await
    .map_err(DemoError::Emulator)?;
    let mut config = config.clone();
    let suffix = format!("demo-{run_id}");
    config.amqp.exchange = format!("{}.{suffix}", config.amqp.exchange);
    config.amqp.work_queue = format!("{}.{suffix}", config.amqp.work_queue);
    config.amqp.dead_letter_queue = format!("{}.{suffix}", config.amqp.dead_letter_queue);
    config.amqp.retry_queue_prefix = format!("{}.{suffix}", config.amqp.retry_queue_prefix);
    let cache_dir = std::env::temp_dir().join(format!("portals-crm-{suffix}"));
    config.cache.path = cache_dir.clone();
    // The demo's tenants point at its in-process emulator, not at what the files say.
    config.tenants.watch_secs = 0;
    let mut tenants = TenantConfig::load_dir(&config.tenants.dir).map_err(DemoError::Tenants)?;
    for tenant in &mut tenants {
        tenant.org.login_url = emulator.base_url.clone();
    }
    let topology = Topology::new(&config.amqp, &config.retry_tiers());
    let connection = amqp::connect(
        &config.amqp.url,
        config.amqp.heartbeat_secs,
        "portals-crm demo publisher",
    )
    .await?;
    let publisher = Publisher::open(&connection)
        .await
        .map_err(|e| DemoError::Broker(e.to_string()))?;
    topology.declare(publisher.channel()).await.map_err(
        |e| match crate::amqp::Refused::from_error(e) {
            Ok(refused) => DemoError::Broker(format!("the broker refused the topology: {refused}")),
            Err(e) => DemoError::Broker(e.to_string()),
        },
    )?;
    let service = match Service::start(&config, tenants.clone()).await {
        Ok(service) => service,
        Err(BuildError::Listen { .. }) => {
            config.http.listen = "127.0.0.1:0".into();
            Service::start(&config, tenants).await?
        }
        Err(other) => return Err(other.into()),
    };
    println!("Salesforce emulator: {}", emulator.base_url);
    println!("metrics:             http://{}/metrics", service.http_addr);
    println!("console:             http://{}/ui", service.http_addr);
    println!("work queue:          {}", topology.work_queue);
    let messages = scenario(events, &run_id, rand::random());
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(messages.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} events settled {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for message in &messages {
        // As the platform would: the tenant header beside the body's `tenantid` (none on a
        // body that is not JSON, which reaches the shared queue).
        let tenant = serde_json::from_slice::<serde_json::Value>(&message.body)
            .ok()
            .and_then(|v| v["tenantid"].as_str().map(str::to_owned));
        let properties = amqp::event_properties(tenant.as_deref());
        publisher
            .publish_republishing(
                &topology.exchange,
                &message.routing_key,
                &message.body,
                properties,
            )
            .await
            .map_err(|e| DemoError::Broker(e.to_string()))?;
    }
    let published = messages.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let settled: u64 = service.metrics.settled_by_outcome().values().sum();
        bar.set_position(settled.min(published));
        if settled >= published || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = started.elapsed();
    bar.finish();
    let http = reqwest::Client::new();
    let mut records = BTreeMap::new();
    for sobject in ["Lead", "Event", "BookMe__Booking__c"] {
        let rows = inspect(
            &http,
            &format!("{}/__emulator/records/{sobject}", emulator.base_url),
        )
        .await?;
        records.insert(
            sobject.to_owned(),
            rows.as_array().map_or(0, Vec::len) as u64,
        );
    }
    let stats = inspect(&http, &format!("{}/__emulator/stats", emulator.base_url)).await?;
    let outcomes = service.metrics.settled_by_outcome();
    let summary = Summary {
        published,
        written: outcomes.get("written").copied().unwrap_or(0),
        outcomes,
        records,
        dead_letters: service.metrics.dead_letters_by_reason(),
        api_calls: stats["api_calls"].as_u64().unwrap_or(0),
        requests: serde_json::from_value(stats["requests"].clone()).unwrap_or_default(),
        elapsed,
    };
    if keep_running {
        println!("{summary}");
        println!(
            "\nstill running — records at {}/__emulator/records/Lead; Ctrl-C to stop",
            emulator.base_url
        );
        stop.await;
    }
    let tenant_ids: Vec<String> = service
        .tenants
        .all()
        .iter()
        .map(|t| t.config.tenant.clone())
        .collect();
    service.shutdown().await;
    let _ = topology
        .delete_tenants(publisher.channel(), tenant_ids.iter().map(String::as_str))
        .await;
    let _ = topology.delete(publisher.channel()).await;
    let _ = connection.close(200, "demo done".into()).await;
    emulator.stop().await;
    let _ = std::fs::remove_dir_all(cache_dir);
    Ok(summary)
}
