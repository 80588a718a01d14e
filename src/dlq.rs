//! `portals-crm dlq`: inspect, replay, purge and export dead letters.
//!
//! The dead-letter queue is a classic queue, so reading it is non-destructive: messages are
//! fetched unacknowledged and handed back when the channel closes, which can never trip a
//! delivery limit. A replay removes a dead letter only after its copy on the work queue was
//! confirmed by the broker and routed.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicQosOptions};

use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::{self, PublishError, Publisher, Topology, header_str};
use crate::outcome::Reason;
use crate::outcome::dead_letter::{self, DeadLetterHeaders};

/// Which dead letters a command applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this reason code.
    pub reason: Option<String>,
    /// Only these ids.
    pub ids: Vec<String>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Every id of `ids` must match a dead letter (with the other filters), or the operation
    /// does nothing and fails with [`DlqError::NotFound`] (or [`DlqError::Excluded`], when the
    /// other filters leave it out): what a command line wants, where an
    /// id is typed by hand. The console reports ids gone meanwhile itself, and leaves it off.
    pub require_ids: bool,
}

impl Filter {
    fn matches(&self, letter: &DeadLetter) -> bool {
        self.tenant.as_ref().is_none_or(|t| &letter.tenant == t)
            && self.reason.as_ref().is_none_or(|r| &letter.reason == r)
            && (self.ids.is_empty() || self.ids.contains(&letter.id))
    }
}

/// One dead letter as ops see it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Stable id: the event id (from our header, else from the body), else a hash of the body.
    pub id: String,
    /// Tenant: from our header, else the body's `tenantid`; `unknown` when neither has one.
    pub tenant: String,
    /// Reason code: ours, or `delivery_limit` / `broker_<x-death reason>` when the broker
    /// dead-lettered it, or `unknown`.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// Salesforce error code, when Salesforce refused.
    pub salesforce_error: Option<String>,
    /// Salesforce error fields.
    pub salesforce_fields: Option<String>,
    /// Booking id: from our header, else the body's `data.booking_id`.
    pub booking_id: Option<String>,
    /// Attempts made.
    pub attempts: i64,
    /// First failure.
    pub first_failure: Option<String>,
    /// Last failure.
    pub last_failure: Option<String>,
    /// Routing key the booking platform used.
    pub routing_key: Option<String>,
    /// The body as text (lossy for non-UTF-8 bodies).
    pub body: String,
}

/// A dlq command failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The connection did not open.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// Broker trouble.
    #[error("broker: {0}")]
    Broker(lapin::Error),
    /// The broker refused a step (a permission, or a queue of that name that exists with
    /// other arguments): `step` names it, the broker's text the queue or exchange.
    #[error("the broker refused {step}: {refused}")]
    Refused {
        /// `the dead-letter queue` (declaring it) or `the operation` (reading, publishing,
        /// acknowledging).
        step: &'static str,
        /// The refusal and what to check.
        refused: amqp::Refused,
    },
    /// A replay publish did not become durable; the dead letter was kept.
    #[error("replay of {id} failed, the dead letter is kept: {source}")]
    Replay {
        /// The dead letter.
        id: String,
        /// Why.
        source: PublishError,
    },
    /// Writing the export file failed.
    #[error("export: {0}")]
    Export(#[from] std::io::Error),
    /// No dead letter has this id (or these ids, comma-separated).
    #[error("no dead letter with id {0}")]
    NotFound(String),
    /// Dead letters of the ids asked for exist, but the other filters (`--tenant`,
    /// `--reason`) leave them out: each with its tenant and reason.
    #[error("the other filters leave out the dead letters asked for by id: {0}")]
    Excluded(String),
    /// The broker's next dead letter did not arrive ([`GET_TIMEOUT`]).
    #[error(
        "the next dead letter did not arrive within {0} s: the connection was lost, or the message is over the connection's frame_max (RabbitMQ takes a frame up to 8 bytes over it from a publisher; lapin refuses it and closes the connection, logging FRAME-ERROR), which this client cannot read"
    )]
    Unreadable(u64),
}

/// A broker error of an operation: a refusal (say `ACCESS_REFUSED` for a user without the read
/// permission on the dead-letter queue) with what to check, anything else as it is.
impl From<lapin::Error> for DlqError {
    fn from(error: lapin::Error) -> Self {
        match amqp::Refused::from_error(error) {
            Ok(refused) => Self::Refused {
                step: "the operation",
                refused,
            },
            Err(error) => Self::Broker(error),
        }
    }
}

/// How long one `basic.get` may take. A dead letter whose header frame is over the connection's
/// `frame_max` makes lapin close the connection on receipt without answering the get (found
/// with a message 8 bytes over it, which RabbitMQ takes from a publisher): unbounded, `dlq`
/// would wait for ever.
const GET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// FNV-1a: a stable, dependency-free hash for ids of bodies without an event id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What the broker wrote when it dead-lettered a message itself: the `x-death` entry of the work
/// queue (<https://www.rabbitmq.com/docs/dlx#effects>: one entry per `{queue, reason}`, with
/// `queue`, `reason`, `count`, `time`, `exchange`, `routing-keys`). portals-crm publishes its own
/// dead letters and the retry tiers dead-letter into the work queue, not here, so an entry for
/// the work queue means the broker moved the message, e.g. past the quorum queue's
/// `x-delivery-limit` (reason `delivery_limit`, <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>).
#[derive(Debug, Clone, PartialEq, Eq)]
struct BrokerDeath {
    /// `delivery_limit`, `rejected`, `expired` or `maxlen`.
    reason: String,
    /// The queue it left.
    queue: String,
    /// When, RFC 3339.
    time: Option<String>,
    /// The routing key the booking platform published with.
    routing_key: Option<String>,
}

fn table_str(table: &FieldTable, name: &str) -> Option<String> {
    header_str(Some(table), name)
}

/// The broker's record of dead-lettering the message from a queue workers consume (the shared
/// work queue or a tenant queue, see [`Topology::is_consumed`]).
fn broker_death(headers: Option<&FieldTable>, topology: &Topology) -> Option<BrokerDeath> {
    let Some(AMQPValue::FieldArray(deaths)) = headers?.inner().get("x-death") else {
        return None;
    };
    deaths.as_slice().iter().find_map(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return None;
        };
        let queue = table_str(death, "queue")?;
        if !topology.is_consumed(&queue) {
            return None;
        }
        let time = match death.inner().get("time") {
            Some(AMQPValue::Timestamp(seconds)) => i64::try_from(*seconds)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .map(crate::event::timestamp::canonical),
            _ => None,
        };
        let routing_key = match death.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().iter().find_map(|k| match k {
                AMQPValue::LongString(k) => Some(k.to_string()),
                AMQPValue::ShortString(k) => Some(k.as_str().to_owned()),
                _ => None,
            }),
            _ => None,
        };
        Some(BrokerDeath {
            reason: table_str(death, "reason")?,
            queue,
            time,
            routing_key,
        })
    })
}

impl BrokerDeath {
    /// The reason: `delivery_limit`, else `broker_<reason>`.
    fn code(&self) -> Reason {
        match self.reason.as_str() {
            "delivery_limit" => Reason::DeliveryLimit,
            "rejected" => Reason::BrokerRejected,
            "expired" => Reason::BrokerExpired,
            "maxlen" => Reason::BrokerMaxlen,
            _ => Reason::BrokerOther,
        }
    }

    /// The cause in words. `limit` is the configured delivery limit, which the work queue was
    /// declared with (a different one fails the declaration). A quorum queue dead-letters a
    /// message once it has been returned more than `limit` times: on RabbitMQ 3.10 it is
    /// delivered `limit + 1` times, the last `x-delivery-count` being `limit`, and the dead
    /// letter carries no count of its own (rabbitmq-notes §1); from 4.3 on, a `basic.nack` does
    /// not count, so there may have been more deliveries.
    fn cause(&self, limit: u32) -> String {
        let queue = &self.queue;
        match self.reason.as_str() {
            "delivery_limit" => format!(
                "the broker dead-lettered it after at least {} deliveries from {queue} (its \
                 delivery limit is {limit}); on RabbitMQ before 4.3 every return counts, a worker \
                 restart or a lost connection included, so the booking itself may be fine: \
                 replay it",
                u64::from(limit) + 1
            ),
            "rejected" => format!(
                "the broker dead-lettered it: a consumer of {queue} rejected it without requeue"
            ),
            "expired" => format!("the broker dead-lettered it: its TTL ran out in {queue}"),
            "maxlen" => {
                format!("the broker dead-lettered it: {queue} was over its length limit")
            }
            other => format!("the broker dead-lettered it from {queue} ({other})"),
        }
    }
}

/// `id`, `tenantid` and `data.booking_id` read from a body, each when it is a non-empty string;
/// for messages without our headers (the broker dead-lettered them before portals-crm did).
fn ids_from_body(body: &[u8]) -> [Option<String>; 3] {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return [None, None, None];
    };
    let text = |v: &serde_json::Value| {
        v.as_str()
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
    };
    [
        text(&value["id"]),
        text(&value["tenantid"]),
        text(&value["data"]["booking_id"]),
    ]
}

/// A dead letter from its headers and body: our `x-portals-*` headers, else the body's ids;
/// the broker's cause when the work queue's `x-death` entry says the broker dead-lettered it.
fn describe(table: Option<&FieldTable>, body: &[u8], topology: &Topology) -> DeadLetter {
    let headers = DeadLetterHeaders::read(table);
    let [body_id, body_tenant, body_booking] = ids_from_body(body);
    // A header value cut to fit the frame is not the id: the body has it whole, so that
    // `dlq show <id>` and `--id` find the letter by the id the booking platform sent.
    let whole = |header: Option<String>, body: Option<String>| match header {
        Some(cut) if dead_letter::is_cut(&cut) => body.or(Some(cut)),
        header => header.or(body),
    };
    let id =
        whole(headers.event_id, body_id).unwrap_or_else(|| format!("body-{:016x}", fnv1a(body)));
    let mut letter = DeadLetter {
        id,
        tenant: whole(headers.tenant, body_tenant).unwrap_or_else(|| "unknown".into()),
        reason: headers.reason.unwrap_or_default(),
        message: headers.message.unwrap_or_default(),
        salesforce_error: headers.salesforce_error,
        salesforce_fields: headers.salesforce_fields,
        booking_id: whole(headers.booking_id, body_booking),
        attempts: headers.attempts,
        first_failure: headers.first_failure,
        last_failure: headers.last_failure,
        routing_key: headers.routing_key,
        body: String::from_utf8_lossy(body).into_owned(),
    };
    // Our headers on a message the broker dead-lettered are from an earlier retry: the broker's
    // cause comes first, the failure portals-crm saw before it is kept in the message.
    if let Some(death) = broker_death(table, topology) {
        let cause = death.cause(topology.delivery_limit);
        letter.message = if letter.reason.is_empty() {
            cause
        } else {
            format!(
                "{cause}; the failure before it: {}: {}",
                letter.reason, letter.message
            )
        };
        letter.reason = death.code().label();
        letter.last_failure = death.time.or(letter.last_failure);
        letter.routing_key = letter.routing_key.or(death.routing_key);
    } else if letter.reason.is_empty() {
        letter.reason = Reason::Unrecognised.label();
        letter.message = "no x-portals-reason header and no x-death entry of the work queue: \
                          not dead-lettered by portals-crm or by the broker from this work queue"
            .into();
    }
    letter
}

/// A session on the dead-letter queue.
pub struct Dlq {
    connection: Connection,
    publisher: Publisher,
    topology: Topology,
}

/// Dead letters fetched unacknowledged on a channel of their own; whatever an operation does
/// not remove goes back to the queue when the channel closes at the end of the operation.
struct Fetched {
    channel: Channel,
    chosen: Vec<(BasicGetMessage, DeadLetter)>,
    /// How many matched the filter, `limit` aside.
    matching: usize,
}

/// What a dead-letter id of a filter met in the queue.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// No dead letter of that id.
    Not,
    /// One that matched every filter.
    Matched,
    /// Only ones the other filters leave out: the last, as it is named in the refusal.
    Excluded(String),
}

/// The dead letters an operation found ([`Dlq::listing`]) or handled ([`Dlq::replay`],
/// [`Dlq::purge`]).
#[derive(Debug, Clone)]
pub struct Listing {
    /// The dead letters matching the filter, at most its `limit`, in queue order.
    pub letters: Vec<DeadLetter>,
    /// How many matched, `limit` aside: more than `letters.len()` when the limit cut the list.
    pub matching: usize,
}

impl Fetched {
    async fn release(self) {
        let _ = self.channel.close(200, "dlq operation done".into()).await;
    }
}

impl Dlq {
    /// Connects and makes sure the dead-letter queue exists
    /// ([`Topology::declare_dead_letter_queue`]); nothing else of the topology is declared, so
    /// none of it can stand in the way (a replay to a work queue that does not exist is
    /// refused as unroutable).
    pub async fn open(url: &secrecy::SecretString, topology: Topology) -> Result<Self, DlqError> {
        let connection = amqp::connect(url, 30, "portals-crm dlq").await?;
        let publisher = Publisher::open(&connection).await?;
        topology
            .declare_dead_letter_queue(publisher.channel())
            .await
            .map_err(|error| match amqp::Refused::from_error(error) {
                Ok(refused) => DlqError::Refused {
                    step: "the dead-letter queue",
                    refused,
                },
                Err(error) => DlqError::Broker(error),
            })?;
        Ok(Self {
            connection,
            publisher,
            topology,
        })
    }

    /// Fetches every dead letter unacknowledged and picks those matching `filter`.
    async fn select(&self, filter: &Filter) -> Result<Fetched, DlqError> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(0, BasicQosOptions { global: false })
            .await?;
        let mut chosen = Vec::new();
        let mut matching = 0;
        // Each id of the filter, with what became of the dead letters of that id (for
        // `require_ids`).
        let mut named: Vec<(&str, Seen)> = filter
            .ids
            .iter()
            .map(|id| (id.as_str(), Seen::Not))
            .collect();
        loop {
            let get = channel.basic_get(
                self.topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            );
            let Some(message) = tokio::time::timeout(GET_TIMEOUT, get)
                .await
                .map_err(|_| DlqError::Unreadable(GET_TIMEOUT.as_secs()))??
            else {
                break;
            };
            let letter = describe(
                message.delivery.properties.headers().as_ref(),
                &message.delivery.data,
                &self.topology,
            );
            let matched = filter.matches(&letter);
            if let Some((_, seen)) = named.iter_mut().find(|(id, _)| *id == letter.id)
                && *seen != Seen::Matched
            {
                *seen = if matched {
                    Seen::Matched
                } else {
                    // A header's text, printed on a terminal.
                    let safe = crate::telemetry::logging::terminal_safe;
                    Seen::Excluded(format!(
                        "{} (tenant {}, reason {})",
                        safe(&letter.id),
                        safe(&letter.tenant),
                        safe(&letter.reason)
                    ))
                };
            }
            if matched {
                matching += 1;
                if filter.limit.is_none_or(|n| chosen.len() < n) {
                    chosen.push((message, letter));
                }
            }
        }
        let fetched = Fetched {
            channel,
            chosen,
            matching,
        };
        if filter.require_ids {
            // Printed on a terminal: an id is any string, control characters included.
            let missing: Vec<std::borrow::Cow<str>> = named
                .iter()
                .filter(|(_, seen)| *seen == Seen::Not)
                .map(|(id, _)| crate::telemetry::logging::terminal_safe(id))
                .collect();
            let excluded: Vec<&str> = named
                .iter()
                .filter_map(|(_, seen)| match seen {
                    Seen::Excluded(which) => Some(which.as_str()),
                    Seen::Not | Seen::Matched => None,
                })
                .collect();
            let refused = if !missing.is_empty() {
                Some(DlqError::NotFound(missing.join(", ")))
            } else if !excluded.is_empty() {
                Some(DlqError::Excluded(excluded.join("; ")))
            } else {
                None
            };
            if let Some(refused) = refused {
                fetched.release().await;
                return Err(refused);
            }
        }
        Ok(fetched)
    }

    /// Dead letters matching `filter`; nothing is removed.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
        Ok(self.listing(filter).await?.letters)
    }

    /// Dead letters matching `filter`, with how many matched beyond its `limit`; nothing is
    /// removed.
    pub async fn listing(&self, filter: &Filter) -> Result<Listing, DlqError> {
        let fetched = self.select(filter).await?;
        let letters = fetched.chosen.iter().map(|(_, l)| l.clone()).collect();
        let matching = fetched.matching;
        fetched.release().await;
        Ok(Listing { letters, matching })
    }

    /// Publishes matching dead letters back to the work queue (attempts reset) and removes each
    /// only after its copy was confirmed and routed. With `dry_run`, only reports what it would
    /// do. `matching` is how many matched, `limit` aside.
    pub async fn replay(&self, filter: &Filter, dry_run: bool) -> Result<Listing, DlqError> {
        let mut fetched = self.select(filter).await?;
        let matching = fetched.matching;
        if dry_run {
            let letters = fetched.chosen.iter().map(|(_, l)| l.clone()).collect();
            fetched.release().await;
            return Ok(Listing { letters, matching });
        }
        let chosen = std::mem::take(&mut fetched.chosen);
        let result = self.republish(chosen).await;
        fetched.release().await;
        result.map(|letters| Listing { letters, matching })
    }

    async fn republish(
        &self,
        chosen: Vec<(BasicGetMessage, DeadLetter)>,
    ) -> Result<Vec<DeadLetter>, DlqError> {
        let mut replayed = Vec::new();
        for (message, letter) in chosen {
            let delivery = &message.delivery;
            let table = dead_letter::replay(letter.routing_key.as_deref());
            let mut properties = BasicProperties::default().with_headers(table);
            if let Some(content_type) = delivery.properties.content_type() {
                properties = properties.with_content_type(content_type.clone());
            }
            self.publisher
                .publish_republishing("", &self.topology.work_queue, &delivery.data, properties)
                .await
                .map_err(|source| DlqError::Replay {
                    id: letter.id.clone(),
                    source,
                })?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            replayed.push(letter);
        }
        Ok(replayed)
    }

    /// Removes matching dead letters. `matching` is how many matched, `limit` aside.
    pub async fn purge(&self, filter: &Filter) -> Result<Listing, DlqError> {
        let mut fetched = self.select(filter).await?;
        let matching = fetched.matching;
        let mut purged = Vec::new();
        let mut result = Ok(());
        for (message, letter) in std::mem::take(&mut fetched.chosen) {
            if let Err(error) = message.delivery.acker.ack(BasicAckOptions::default()).await {
                result = Err(error.into());
                break;
            }
            purged.push(letter);
        }
        fetched.release().await;
        result.map(|()| Listing {
            letters: purged,
            matching,
        })
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.connection.close(200, "dlq done".into()).await;
    }
}

/// `n dead letters`, or `1 dead letter`.
pub fn count(n: usize) -> String {
    format!("{n} dead letter{}", if n == 1 { "" } else { "s" })
}

/// `n` of `matching` dead letters: `2 of 7 matching dead letters (--limit)` when a limit left
/// some out, else as [`count`].
pub fn counted(n: usize, matching: usize) -> String {
    if matching > n {
        format!("{n} of {matching} matching dead letters (--limit)")
    } else {
        count(n)
    }
}

/// A table for people; `matching` is how many matched the filter, which the footer gives when
/// a `--limit` left some out (`2 of 7 matching dead letters (--limit); of those shown: …`).
pub fn table(letters: &[DeadLetter], matching: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<10} {:<36} {:>3} {:<30} MESSAGE",
        "ID", "TENANT", "REASON", "TRY", "LAST FAILURE"
    );
    for l in letters {
        let message: String = crate::telemetry::logging::redact(&l.message)
            .chars()
            .take(80)
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:<10} {:<36} {:>3} {:<30} {}",
            crate::telemetry::logging::terminal_safe(&l.id),
            crate::telemetry::logging::terminal_safe(&l.tenant),
            crate::telemetry::logging::terminal_safe(&l.reason),
            l.attempts,
            crate::telemetry::logging::terminal_safe(l.last_failure.as_deref().unwrap_or("-")),
            crate::telemetry::logging::terminal_safe(&message)
        );
    }
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for l in letters {
        *by_reason.entry(l.reason.as_str()).or_default() += 1;
    }
    out.push_str(&counted(letters.len(), matching));
    // The reasons of the rows above: when a limit cut the list, not of every match.
    let mut separator = if matching > letters.len() {
        "; shown by reason: "
    } else {
        "; "
    };
    for (reason, n) in by_reason {
        let _ = write!(out, "{separator}{reason}: {n}");
        separator = "; ";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    const BOOKED: &[u8] = include_bytes!("../tests/fixtures/events/booked.json");

    fn topology() -> Topology {
        let config = crate::config::Config::from_toml(
            include_str!("../config/portals-crm.toml"),
            std::iter::empty(),
        )
        .unwrap();
        Topology::new(&config.amqp, &config.retry_tiers())
    }

    fn text(value: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(value))
    }

    /// An `x-death` entry as RabbitMQ writes it.
    fn death(queue: &str, reason: &str) -> AMQPValue {
        let mut entry = FieldTable::default();
        entry.insert("queue".into(), text(queue));
        entry.insert("reason".into(), text(reason));
        entry.insert("count".into(), AMQPValue::LongLongInt(1));
        entry.insert("time".into(), AMQPValue::Timestamp(1_795_000_000));
        entry.insert("exchange".into(), text("bookings"));
        entry.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text("meeting.booked")])),
        );
        AMQPValue::FieldTable(entry)
    }

    fn with_deaths(mut table: FieldTable, deaths: Vec<AMQPValue>) -> FieldTable {
        table.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(deaths)),
        );
        table
    }

    #[test]
    fn a_broker_dead_letter_is_named_from_its_body_and_its_cause_given_in_words() {
        let topology = topology();
        let table = with_deaths(
            FieldTable::default(),
            vec![death(&topology.work_queue, "delivery_limit")],
        );
        let letter = describe(Some(&table), BOOKED, &topology);
        assert_eq!(letter.id, "evt_01JD6Q7M1V3S6");
        assert_eq!(letter.tenant, "acme");
        assert_eq!(letter.booking_id.as_deref(), Some("bk_7Q2M9"));
        assert_eq!(letter.reason, "delivery_limit");
        assert!(
            letter.message.starts_with(&format!(
                "the broker dead-lettered it after at least {} deliveries",
                topology.delivery_limit + 1
            )),
            "{}",
            letter.message
        );
        assert!(
            letter.message.contains("worker restart"),
            "{}",
            letter.message
        );
        assert_eq!(letter.routing_key.as_deref(), Some("meeting.booked"));
        assert_eq!(
            letter.last_failure.as_deref(),
            Some("2026-11-18T11:06:40.000Z")
        );
    }

    #[test]
    fn a_tenant_queue_dead_letter_is_the_brokers_too() {
        let topology = topology();
        let queue = topology.tenant_queue("acme").unwrap();
        let table = with_deaths(FieldTable::default(), vec![death(&queue, "delivery_limit")]);
        let letter = describe(Some(&table), BOOKED, &topology);
        assert_eq!(letter.reason, "delivery_limit");
        assert_eq!(letter.routing_key.as_deref(), Some("meeting.booked"));
    }

    #[test]
    fn the_broker_cause_comes_first_and_keeps_the_failure_before_it() {
        let topology = topology();
        let mut ours = FieldTable::default();
        for (name, value) in [
            (dead_letter::REASON, "salesforce_unavailable"),
            (dead_letter::MESSAGE, "503 from the org"),
            (dead_letter::TENANT, "acme"),
            (dead_letter::EVENT_ID, "evt_from_header"),
        ] {
            ours.insert(name.into(), text(value));
        }
        let tier = &topology.tiers[0].queue;
        let table = with_deaths(
            ours.clone(),
            vec![
                death(&topology.work_queue, "delivery_limit"),
                death(tier, "expired"),
            ],
        );
        let letter = describe(Some(&table), BOOKED, &topology);
        assert_eq!(letter.id, "evt_from_header");
        assert_eq!(letter.reason, "delivery_limit");
        assert!(
            letter.message.contains(&format!(
                "(its delivery limit is {})",
                topology.delivery_limit
            )),
            "{}",
            letter.message
        );
        assert!(
            letter
                .message
                .ends_with("the failure before it: salesforce_unavailable: 503 from the org"),
            "{}",
            letter.message
        );

        // Our own dead letter of a message that went through a retry tier: ours, untouched.
        let table = with_deaths(ours, vec![death(tier, "expired")]);
        let letter = describe(Some(&table), BOOKED, &topology);
        assert_eq!(letter.reason, "salesforce_unavailable");
        assert_eq!(letter.message, "503 from the org");
    }

    /// An event id longer than a header holds is cut in `x-portals-event-id`; the letter is
    /// named by the whole id, from the body, so a lookup by it finds it.
    #[test]
    fn a_long_id_cut_in_its_header_is_read_from_the_body() {
        let long_id = format!("evt-{}", "9".repeat(3_000));
        let body = serde_json::json!({
            "id": long_id,
            "tenantid": "acme",
            "data": {"booking_id": "bk_1"}
        })
        .to_string();
        let info = crate::pipeline::MessageInfo {
            tenant: "acme".into(),
            tenant_id: Some("acme".into()),
            booking_id: Some("bk_1".into()),
            event_id: Some(long_id.clone()),
        };
        let cause = crate::outcome::Cause {
            reason: crate::outcome::Reason::InvalidEvent,
            message: "m".into(),
            salesforce: None,
        };
        let table = dead_letter::annotate(&FieldTable::default(), &info, &cause, 1, "k", "now");
        let letter = describe(Some(&table), body.as_bytes(), &topology());
        assert_eq!(letter.id, long_id);
        assert_eq!(letter.tenant, "acme");
        assert_eq!(letter.booking_id.as_deref(), Some("bk_1"));
        // A body that does not have it either: the cut header is the best there is.
        let letter = describe(Some(&table), b"not json", &topology());
        assert!(letter.id.ends_with('…') && letter.id.starts_with("evt-999"));
    }

    #[test]
    fn a_body_with_no_ids_and_no_headers_is_named_by_its_hash() {
        let letter = describe(None, b"not json", &topology());
        assert_eq!(letter.id, format!("body-{:016x}", fnv1a(b"not json")));
        assert_eq!(letter.tenant, "unknown");
        assert_eq!(letter.reason, "unknown");
    }

    /// Headers are a publisher's or an org's text: a line break, an escape sequence or a
    /// bidirectional override in them is printed escaped, so a letter is one row as it is.
    #[test]
    fn the_table_prints_control_and_formatting_characters_escaped() {
        let letter = DeadLetter {
            id: "evt_1".into(),
            tenant: "acme\u{1b}[31m".into(),
            reason: "mapping_error".into(),
            message: "bad\r\nFAKE-ROW \u{1b}[2J".into(),
            salesforce_error: None,
            salesforce_fields: None,
            booking_id: None,
            attempts: 1,
            first_failure: None,
            last_failure: Some("2026-12-03T10:00:00Z\u{202e}".into()),
            routing_key: None,
            body: String::new(),
        };
        let table = table(&[letter], 1);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(
            table.ends_with("1 dead letter; mapping_error: 1"),
            "{table}"
        );
        assert!(
            !table
                .chars()
                .any(|c| c == '\u{1b}' || c == '\r' || c == '\u{202e}')
        );
        assert!(table.contains("acme\\u{1b}[31m"), "{table}");
        assert!(
            table.contains("bad\\u{d}\\u{a}FAKE-ROW \\u{1b}[2J"),
            "{table}"
        );
        assert!(table.contains("2026-12-03T10:00:00Z\\u{202e}"), "{table}");
    }

    /// A `--limit` that left some out says so in the footer, with how many matched.
    #[test]
    fn the_footer_counts_what_the_limit_left_out() {
        let letter = describe(None, BOOKED, &topology());
        let two = [letter.clone(), letter];
        let cut = table(&two, 7);
        assert!(
            cut.lines().last().is_some_and(
                |l| l.starts_with("2 of 7 matching dead letters (--limit); shown by reason: ")
            ),
            "{cut}"
        );
        assert!(
            table(&two, 2)
                .lines()
                .last()
                .unwrap()
                .starts_with("2 dead letters;")
        );
        assert_eq!(table(&[], 0).lines().last(), Some("0 dead letters"));
        assert_eq!(count(1), "1 dead letter");
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
