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

use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::{self, PublishError, Publisher, Topology};
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
    /// Stable id: the event id, else a hash of the body.
    pub id: String,
    /// Tenant (`unknown` when not configured or not decodable).
    pub tenant: String,
    /// Reason code.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// Salesforce error code, when Salesforce refused.
    pub salesforce_error: Option<String>,
    /// Salesforce error fields.
    pub salesforce_fields: Option<String>,
    /// Booking id.
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
    /// Broker trouble.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
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
    /// No dead letter has this id.
    #[error("no dead letter with id {0}")]
    NotFound(String),
}

/// FNV-1a: a stable, dependency-free hash for ids of bodies without an event id.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let headers = DeadLetterHeaders::read(message.delivery.properties.headers().as_ref());
    let id = headers
        .event_id
        .unwrap_or_else(|| format!("body-{:016x}", fnv1a(&message.delivery.data)));
    DeadLetter {
        id,
        tenant: headers.tenant.unwrap_or_else(|| "unknown".into()),
        reason: headers
            .reason
            .unwrap_or_else(|| crate::outcome::Reason::DeliveryLimit.label()),
        message: headers
            .message
            .unwrap_or_else(|| "dead-lettered by the broker (delivery limit reached)".into()),
        salesforce_error: headers.salesforce_error,
        salesforce_fields: headers.salesforce_fields,
        booking_id: headers.booking_id,
        attempts: headers.attempts,
        first_failure: headers.first_failure,
        last_failure: headers.last_failure,
        routing_key: headers.routing_key,
        body: String::from_utf8_lossy(&message.delivery.data).into_owned(),
    }
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
}

impl Fetched {
    async fn release(self) {
        let _ = self.channel.close(200, "dlq operation done".into()).await;
    }
}

impl Dlq {
    /// Connects and makes sure the topology exists.
    pub async fn open(url: &secrecy::SecretString, topology: Topology) -> Result<Self, DlqError> {
        let connection = amqp::connect(url, 30, "portals-crm dlq").await?;
        let publisher = Publisher::open(&connection).await?;
        topology.declare(publisher.channel()).await?;
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
        while let Some(message) = channel
            .basic_get(
                self.topology.dead_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        {
            let letter = describe(&message);
            if filter.matches(&letter) && filter.limit.is_none_or(|n| chosen.len() < n) {
                chosen.push((message, letter));
            }
        }
        Ok(Fetched { channel, chosen })
    }

    /// Dead letters matching `filter`; nothing is removed.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
        let fetched = self.select(filter).await?;
        let letters = fetched.chosen.iter().map(|(_, l)| l.clone()).collect();
        fetched.release().await;
        Ok(letters)
    }

    /// Publishes matching dead letters back to the work queue (attempts reset) and removes each
    /// only after its copy was confirmed and routed. With `dry_run`, only reports what it would do.
    pub async fn replay(
        &self,
        filter: &Filter,
        dry_run: bool,
    ) -> Result<Vec<DeadLetter>, DlqError> {
        let mut fetched = self.select(filter).await?;
        if dry_run {
            let letters = fetched.chosen.iter().map(|(_, l)| l.clone()).collect();
            fetched.release().await;
            return Ok(letters);
        }
        let chosen = std::mem::take(&mut fetched.chosen);
        let result = self.republish(chosen).await;
        fetched.release().await;
        result
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
                .publish("", &self.topology.work_queue, &delivery.data, properties)
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

    /// Removes matching dead letters.
    pub async fn purge(&self, filter: &Filter) -> Result<Vec<DeadLetter>, DlqError> {
        let mut fetched = self.select(filter).await?;
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
        result.map(|()| purged)
    }

    /// Disconnects.
    pub async fn close(self) {
        let _ = self.connection.close(200, "dlq done".into()).await;
    }
}

/// A table for people.
pub fn table(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<28} {:<10} {:<36} {:>3} {:<25} MESSAGE",
        "ID", "TENANT", "REASON", "TRY", "LAST FAILURE"
    );
    for l in letters {
        let message: String = crate::telemetry::logging::redact(&l.message)
            .chars()
            .take(80)
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:<10} {:<36} {:>3} {:<25} {message}",
            l.id,
            l.tenant,
            l.reason,
            l.attempts,
            l.last_failure.as_deref().unwrap_or("-")
        );
    }
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for l in letters {
        *by_reason.entry(l.reason.as_str()).or_default() += 1;
    }
    let _ = write!(out, "{} dead letters", letters.len());
    for (reason, n) in by_reason {
        let _ = write!(out, "; {reason}: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
