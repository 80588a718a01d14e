//! Tenant health for the Operations console: per tenant, written / retried / dead-lettered per
//! minute, event lag p50/p99, circuit state and next probe, API quota used, the last write seen;
//! and the depth and consumers of the work queue, each retry tier and the dead-letter queue.
//!
//! Rates come from the service's own counters ([`Metrics`]), sampled in memory each time the
//! health is asked (the page asks every 5 s) and kept for [`KEEP`]: a rate is the growth since
//! the sample nearest a minute ago. Lag quantiles are estimated from the
//! `portals_crm_event_lag_seconds` buckets the way Prometheus' `histogram_quantile` does (linear
//! within the bucket, <https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile>),
//! over the samples kept when events arrived in that window, else since start. Queue depths come
//! from a passive `queue.declare`, whose `declare-ok` carries the message and consumer counts
//! without changing the queue (<https://www.rabbitmq.com/amqp-0-9-1-reference#queue.declare.passive>).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use prometheus::core::{Collector, Metric};
use serde::Serialize;

use super::dead_letters::DlqSource;
use crate::telemetry::metrics::Metrics;
use crate::tenants::Registry;

/// How long samples are kept.
pub const KEEP: Duration = Duration::from_secs(600);

/// The counters of one tenant at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    written: u64,
    retried: u64,
    dead: u64,
    /// Cumulative lag bucket counts, in the order of `bounds`.
    lag: Vec<u64>,
    lag_total: u64,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    tenants: BTreeMap<String, Counts>,
}

/// Samples of the counters, kept in memory.
#[derive(Debug, Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<Sample>>,
    /// Per tenant: when a sample last saw `written` grow (RFC 3339), and the count then.
    last_write: Mutex<BTreeMap<String, (u64, Option<String>)>>,
}

/// The sum of `counters`' series whose `tenant` label is `tenant` (and `label` = `value` when
/// given).
fn sum_for(counters: &prometheus::IntCounterVec, tenant: &str, only: Option<(&str, &str)>) -> u64 {
    let mut total = 0;
    for family in counters.collect() {
        for metric in family.get_metric() {
            let has = |name: &str, value: &str| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == name && l.value() == value)
            };
            if has("tenant", tenant) && only.is_none_or(|(n, v)| has(n, v)) {
                total += metric.get_counter().get_value() as u64;
            }
        }
    }
    total
}

/// The lag histogram's bucket bounds and cumulative counts, and its total count.
fn lag_buckets(metrics: &Metrics, tenant: &str) -> (Vec<f64>, Vec<u64>, u64) {
    let proto = metrics.lag_seconds.with_label_values(&[tenant]).metric();
    let histogram = proto.get_histogram();
    let (bounds, counts) = histogram
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .unzip();
    (bounds, counts, histogram.get_sample_count())
}

/// The `q` quantile (0–1) of a histogram with cumulative `counts` at `bounds` and `total`
/// observations; `None` without observations. Past the last bound: the last bound.
pub fn quantile(q: f64, bounds: &[f64], counts: &[u64], total: u64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut previous = (0.0, 0u64);
    for (&bound, &count) in bounds.iter().zip(counts) {
        if count as f64 >= rank {
            let (low, below) = previous;
            let inside = (count - below) as f64;
            if inside == 0.0 {
                return Some(bound);
            }
            return Some(low + (bound - low) * (rank - below as f64) / inside);
        }
        previous = (bound, count);
    }
    bounds.last().copied()
}

/// The observations at or under `bound`.
fn counts_within(bounds: &[f64], counts: &[u64], bound: f64) -> u64 {
    bounds
        .iter()
        .zip(counts)
        .filter(|(b, _)| **b <= bound)
        .map(|(_, c)| *c)
        .max()
        .unwrap_or(0)
}

/// One tenant's health.
#[derive(Debug, Serialize)]
pub struct TenantRates {
    /// Tenant id.
    pub tenant: String,
    /// Bookings written per minute (settled `written`).
    pub written_per_min: Option<f64>,
    /// Retries per minute (every tier).
    pub retried_per_min: Option<f64>,
    /// Dead letters per minute.
    pub dead_lettered_per_min: Option<f64>,
    /// Over how many seconds the rates were measured (none: not yet two samples).
    pub rate_window_secs: Option<f64>,
    /// Event lag p50, seconds (CloudEvent `time` to settled).
    pub lag_p50_secs: Option<f64>,
    /// Event lag p99, seconds.
    pub lag_p99_secs: Option<f64>,
    /// `window` (the samples kept) or `since start`.
    pub lag_over: &'static str,
    /// The histogram's last bucket bound (300 s), when a quantile lies beyond it: the lag is
    /// then at least this, not this.
    pub lag_beyond_secs: Option<f64>,
    /// `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    /// While open: seconds until the next probe may go.
    pub next_probe_in_secs: Option<f64>,
    /// While the org refuses the sign-in: `salesforce_auth_<error>`.
    pub sign_in_refused: Option<&'static str>,
    /// Share of the org's daily API requests used (0–1), as last reported by the org.
    pub api_used: Option<f64>,
    /// Bookings written since start.
    pub written_total: u64,
    /// The sample that first saw the latest write (RFC 3339): the last write happened at most
    /// one polling interval before it. None: none seen since this service started.
    pub last_write_seen: Option<String>,
}

/// A queue's depth, from a passive declare.
#[derive(Debug, Serialize)]
pub struct QueueDepth {
    /// `work`, `retry <delay>` or `dead letters`.
    pub role: String,
    /// Queue name.
    pub queue: String,
    /// Messages ready (not counting those delivered and unacknowledged).
    pub messages: Option<u32>,
    /// Consumers.
    pub consumers: Option<u32>,
    /// Why it could not be read.
    pub error: Option<String>,
}

/// Everything the health page shows.
#[derive(Debug, Serialize)]
pub struct Health {
    /// Per tenant.
    pub tenants: Vec<TenantRates>,
    /// The work queue, each retry tier, the dead-letter queue.
    pub queues: Vec<QueueDepth>,
    /// When this was read (RFC 3339).
    pub at: String,
}

fn now_text() -> String {
    crate::event::timestamp::canonical(time::OffsetDateTime::now_utc())
}

impl Sampler {
    /// Takes a sample of every tenant's counters now and answers their health.
    pub fn read(&self, metrics: &Metrics, registry: &Registry) -> Vec<TenantRates> {
        let now = Instant::now();
        let mut bounds_of = BTreeMap::new();
        let mut current = BTreeMap::new();
        for tenant in registry.all() {
            let name = tenant.config.tenant.clone();
            let (bounds, lag, lag_total) = lag_buckets(metrics, &name);
            bounds_of.insert(name.clone(), bounds);
            current.insert(
                name.clone(),
                Counts {
                    written: sum_for(&metrics.events_settled, &name, Some(("outcome", "written"))),
                    retried: sum_for(&metrics.retries, &name, None),
                    dead: sum_for(&metrics.dead_letters, &name, None),
                    lag,
                    lag_total,
                },
            );
        }
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples
            .front()
            .is_some_and(|s| now.duration_since(s.at) > KEEP)
        {
            samples.pop_front();
        }
        // The sample nearest a minute ago: the newest at least 60 s old, else the oldest.
        let base = samples
            .iter()
            .rev()
            .find(|s| now.duration_since(s.at) >= Duration::from_secs(60))
            .or_else(|| samples.front());
        let oldest = samples.front();
        let mut last_write = self.last_write.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for tenant in registry.all() {
            let name = tenant.config.tenant.clone();
            let counts = &current[&name];
            let window = base
                .filter(|b| b.tenants.contains_key(&name))
                .map(|b| (now.duration_since(b.at).as_secs_f64(), &b.tenants[&name]))
                .filter(|(secs, _)| *secs >= 1.0);
            let rate = |pick: fn(&Counts) -> u64| {
                window.map(|(secs, then)| {
                    pick(counts).saturating_sub(pick(then)) as f64 * 60.0 / secs
                })
            };
            let bounds = &bounds_of[&name];
            let windowed = oldest
                .and_then(|o| o.tenants.get(&name))
                .filter(|o| counts.lag_total > o.lag_total && o.lag.len() == counts.lag.len());
            let (lag, lag_total, lag_over) = match windowed {
                Some(o) => (
                    counts
                        .lag
                        .iter()
                        .zip(&o.lag)
                        .map(|(a, b)| a.saturating_sub(*b))
                        .collect(),
                    counts.lag_total - o.lag_total,
                    "window",
                ),
                None => (counts.lag.clone(), counts.lag_total, "since start"),
            };
            let seen = last_write.entry(name.clone()).or_insert((0, None));
            if counts.written > seen.0 {
                *seen = (counts.written, Some(now_text()));
            }
            let status = tenant.breaker.status();
            let beyond = bounds
                .last()
                .copied()
                .filter(|last| lag_total > counts_within(bounds, &lag, *last));
            out.push(TenantRates {
                written_per_min: rate(|c| c.written),
                retried_per_min: rate(|c| c.retried),
                dead_lettered_per_min: rate(|c| c.dead),
                rate_window_secs: window.map(|(secs, _)| secs),
                lag_p50_secs: quantile(0.5, bounds, &lag, lag_total),
                lag_p99_secs: quantile(0.99, bounds, &lag, lag_total),
                lag_over,
                lag_beyond_secs: beyond,
                circuit: status.state,
                next_probe_in_secs: status.next_probe_in.map(|d| d.as_secs_f64()),
                sign_in_refused: status.sign_in_refused,
                api_used: tenant.client.api_usage().map(|u| u.ratio()),
                written_total: counts.written,
                last_write_seen: seen.1.clone(),
                tenant: name,
            });
        }
        // One sample per second is plenty for per-minute rates.
        if samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= Duration::from_secs(1))
        {
            samples.push_back(Sample {
                at: now,
                tenants: current,
            });
        }
        out
    }
}

/// The depth and consumers of every queue of the topology, the queues of `tenants` included,
/// by passive declares on a connection opened for this and closed after.
pub async fn queues(source: &DlqSource, tenants: &[String]) -> Vec<QueueDepth> {
    let topology = &source.topology;
    let mut wanted = vec![("work".to_owned(), topology.work_queue.clone())];
    for tenant in tenants {
        if let Some(queue) = topology.tenant_queue(tenant) {
            wanted.push((format!("tenant {tenant}"), queue));
        }
    }
    for tier in &topology.tiers {
        wanted.push((
            format!("retry {}", crate::amqp::topology::delay_label(tier.delay)),
            tier.queue.clone(),
        ));
    }
    wanted.push(("dead letters".to_owned(), topology.dead_queue.clone()));
    let connection = match crate::amqp::connect(&source.url, 30, "portals-crm console").await {
        Ok(c) => c,
        Err(e) => {
            return wanted
                .into_iter()
                .map(|(role, queue)| QueueDepth {
                    role,
                    queue,
                    messages: None,
                    consumers: None,
                    error: Some(e.to_string()),
                })
                .collect();
        }
    };
    let mut out = Vec::new();
    for (role, queue) in wanted {
        // A channel per queue: a failed passive declare closes its channel.
        let declared = match connection.create_channel().await {
            Ok(channel) => {
                let answer = channel
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await;
                let _ = channel.close(200, "depth read".into()).await;
                answer
            }
            Err(e) => Err(e),
        };
        out.push(match declared {
            Ok(q) => QueueDepth {
                role,
                queue,
                messages: Some(q.message_count()),
                consumers: Some(q.consumer_count()),
                error: None,
            },
            Err(e) => QueueDepth {
                role,
                queue,
                messages: None,
                consumers: None,
                error: Some(e.to_string()),
            },
        });
    }
    let _ = connection.close(200, "depth read".into()).await;
    out
}

/// The health now: a sample of every tenant, and the queues.
pub async fn health(
    sampler: &Sampler,
    metrics: &Metrics,
    registry: &Registry,
    source: &DlqSource,
) -> Health {
    let tenants = sampler.read(metrics, registry);
    let names = registry.watch_names().borrow().clone();
    Health {
        tenants,
        queues: queues(source, &names).await,
        at: now_text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_histogram_quantile() {
        let bounds = [0.1, 1.0, 10.0];
        // 10 under 0.1 s, 10 more under 1 s, none beyond.
        let counts = [10, 20, 20];
        assert_eq!(quantile(0.5, &bounds, &counts, 20), Some(0.1));
        let p75 = quantile(0.75, &bounds, &counts, 20).unwrap();
        assert!((p75 - 0.55).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.5, &bounds, &counts, 0), None);
        // Past the last bucket (+Inf): the last bound.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 1], 4), Some(10.0));
        assert_eq!(
            counts_within(&bounds, &[0, 0, 1], 10.0),
            1,
            "3 of 4 lie beyond 10 s"
        );
    }
}
