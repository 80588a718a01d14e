//! Outcome: the only code that acks, schedules a retry or dead-letters a message. A message is
//! acked only after its outcome is durable: Salesforce committed it, or the retry or
//! dead-letter copy was confirmed by the broker *and* routed to a queue.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::amqp::{PublishError, Publisher, Topology, header_int, header_str};
use crate::salesforce::model::ApiError;

/// Headers portals-crm writes on retried and dead-lettered copies.
pub mod headers {
    /// Attempts so far (our own count: `x-delivery-count` resets on every dead-letter cycle).
    pub const ATTEMPT: &str = "x-portals-attempt";
    /// Reason code of the last failure.
    pub const REASON: &str = "x-portals-reason";
    /// Human-readable message of the last failure.
    pub const MESSAGE: &str = "x-portals-message";
    /// Salesforce error code, when Salesforce refused.
    pub const SF_ERROR_CODE: &str = "x-portals-sf-error-code";
    /// Salesforce error fields, comma-separated.
    pub const SF_FIELDS: &str = "x-portals-sf-fields";
    /// Tenant of the event.
    pub const TENANT: &str = "x-portals-tenant";
    /// Booking id.
    pub const BOOKING_ID: &str = "x-portals-booking-id";
    /// CloudEvents id.
    pub const EVENT_ID: &str = "x-portals-event-id";
    /// First failure, RFC 3339.
    pub const FIRST_FAILURE: &str = "x-portals-first-failure";
    /// Last failure, RFC 3339.
    pub const LAST_FAILURE: &str = "x-portals-last-failure";
    /// Routing key the booking platform used.
    pub const ROUTING_KEY: &str = "x-portals-routing-key";
}

/// Why a message failed; `code` is a bounded label for metrics and alerts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `invalid_event`, `unknown_tenant`, `mapping_error`, `salesforce_<code>`,
    /// `salesforce_unavailable`, `retries_exhausted`.
    pub code: String,
    /// What happened, for people.
    pub message: String,
    /// Salesforce's error, when it refused.
    pub salesforce: Option<ApiError>,
}

/// What should happen to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Salesforce committed it: ack.
    Written,
    /// Older than what is applied (or a newer version in the same batch): ack and count.
    Superseded,
    /// Transient failure: next retry tier, no sooner than `retry_after`.
    Retry {
        /// The failure.
        failure: Failure,
        /// Salesforce's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Permanent failure: dead letter.
    DeadLetter(Failure),
    /// The tenant is paused for a fault no retry of this message can fix (Salesforce refuses
    /// its sign-in): to the first tier that lasts `retry_after`, the attempt count unchanged,
    /// so a pause spends no attempt and never ends in `retries_exhausted`.
    Wait {
        /// Why the tenant is paused.
        failure: Failure,
        /// Until the tenant's next probe.
        retry_after: Option<Duration>,
    },
}

/// Where a message ended up (the `outcome` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked after the write.
    Written,
    /// Acked as superseded.
    Superseded,
    /// Published to a retry tier, then acked.
    Retried {
        /// Tier index.
        tier: usize,
    },
    /// Published to the dead letters, then acked.
    DeadLettered,
}

impl Settled {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Superseded => "superseded",
            Self::Retried { .. } => "retried",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Identity of the message for dead-letter headers.
#[derive(Debug, Clone, Default)]
pub struct MessageInfo {
    /// Tenant, or `unknown`.
    pub tenant: String,
    /// Booking id, when the event decoded.
    pub booking_id: Option<String>,
    /// Event id, when the event decoded.
    pub event_id: Option<String>,
}

/// A message could not be settled; it was handed back to the queue (or will be redelivered when
/// the channel closes).
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The retry or dead-letter copy did not become durable.
    #[error("could not publish the {target} copy: {source}")]
    Publish {
        /// `retry` or `dead-letter`.
        target: &'static str,
        /// Why.
        source: PublishError,
    },
    /// The ack (or nack) itself failed: the channel is gone and the broker will redeliver.
    #[error("could not acknowledge: {0}")]
    Ack(#[from] lapin::Error),
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn set(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(name.into(), AMQPValue::LongString(value.into()));
}

/// Settles deliveries: the topology says where retries and dead letters go.
#[derive(Clone)]
pub struct Settler {
    publisher: Publisher,
    topology: std::sync::Arc<Topology>,
}

impl Settler {
    /// A settler publishing through `publisher`.
    pub fn new(publisher: Publisher, topology: std::sync::Arc<Topology>) -> Self {
        Self {
            publisher,
            topology,
        }
    }

    /// Carries out `disposition` for `delivery`.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        disposition: Disposition,
    ) -> Result<Settled, SettleError> {
        match disposition {
            Disposition::Written => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                Ok(Settled::Written)
            }
            Disposition::Superseded => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
                Ok(Settled::Superseded)
            }
            Disposition::Retry {
                failure,
                retry_after,
            } => self.retry(delivery, info, failure, retry_after, 1).await,
            Disposition::Wait {
                failure,
                retry_after,
            } => self.retry(delivery, info, failure, retry_after, 0).await,
            Disposition::DeadLetter(failure) => self.dead_letter(delivery, info, &failure).await,
        }
    }

    fn attempts_so_far(delivery: &Delivery) -> i64 {
        header_int(delivery.properties.headers().as_ref(), headers::ATTEMPT).unwrap_or(0)
    }

    /// The tier for this attempt: the attempt's own tier, or a later one when Salesforce asked
    /// for a longer wait.
    fn pick_tier(&self, attempt: usize, retry_after: Option<Duration>) -> Option<usize> {
        let tiers = &self.topology.tiers;
        let wanted = retry_after.unwrap_or_default();
        (attempt.saturating_sub(1)..tiers.len()).find(|&i| tiers[i].delay >= wanted)
    }

    fn annotated(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        failure: &Failure,
        attempts: i64,
    ) -> BasicProperties {
        let original = delivery.properties.headers().clone().unwrap_or_default();
        let mut table = original.clone();
        let now = now_rfc3339();
        table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(attempts));
        set(&mut table, headers::REASON, &failure.code);
        set(&mut table, headers::MESSAGE, &failure.message);
        set(&mut table, headers::TENANT, &info.tenant);
        if let Some(id) = &info.booking_id {
            set(&mut table, headers::BOOKING_ID, id);
        }
        if let Some(id) = &info.event_id {
            set(&mut table, headers::EVENT_ID, id);
        }
        if let Some(error) = &failure.salesforce {
            set(&mut table, headers::SF_ERROR_CODE, &error.error_code);
            set(&mut table, headers::SF_FIELDS, &error.fields.join(","));
        }
        if header_str(Some(&original), headers::FIRST_FAILURE).is_none() {
            set(&mut table, headers::FIRST_FAILURE, &now);
        }
        set(&mut table, headers::LAST_FAILURE, &now);
        if header_str(Some(&original), headers::ROUTING_KEY).is_none() {
            set(
                &mut table,
                headers::ROUTING_KEY,
                delivery.routing_key.as_str(),
            );
        }
        let mut properties = delivery.properties.clone().with_headers(table);
        if properties.content_type().is_none() {
            properties = properties.with_content_type("application/cloudevents+json".into());
        }
        properties
    }

    async fn hand_back(
        delivery: &Delivery,
        target: &'static str,
        source: PublishError,
    ) -> SettleError {
        // Requeue so another attempt settles it; the delivery limit stops a loop.
        if let Err(error) = delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
        {
            return SettleError::Ack(error);
        }
        SettleError::Publish { target, source }
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        failure: Failure,
        retry_after: Option<Duration>,
        counted: i64,
    ) -> Result<Settled, SettleError> {
        let attempt = Self::attempts_so_far(delivery) + counted;
        // A wait is placed by its duration alone, from the first tier.
        let from = if counted == 0 { 1 } else { attempt as usize };
        let tier = match self.pick_tier(from, retry_after) {
            // A wait outlasting every tier takes the longest one.
            None if counted == 0 => self.topology.tiers.len().checked_sub(1),
            tier => tier,
        };
        let Some(tier) = tier else {
            let exhausted = Failure {
                code: "retries_exhausted".into(),
                message: format!(
                    "gave up after {} attempts; last failure {}: {}",
                    attempt, failure.code, failure.message
                ),
                salesforce: failure.salesforce,
            };
            return self.dead_letter(delivery, info, &exhausted).await;
        };
        let tier_delay = self.topology.tiers[tier].delay;
        let properties = self
            .annotated(delivery, info, &failure, attempt)
            .with_expiration(
                crate::retry_policy::jittered(tier_delay)
                    .as_millis()
                    .to_string()
                    .into(),
            );
        let queue = &self.topology.tiers[tier].queue;
        if let Err(source) = self
            .publisher
            .publish("", queue, &delivery.data, properties)
            .await
        {
            return Err(Self::hand_back(delivery, "retry", source).await);
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(Settled::Retried { tier })
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        failure: &Failure,
    ) -> Result<Settled, SettleError> {
        let attempts = Self::attempts_so_far(delivery) + 1;
        let properties = self.annotated(delivery, info, failure, attempts);
        if let Err(source) = self
            .publisher
            .publish("", &self.topology.dead_queue, &delivery.data, properties)
            .await
        {
            return Err(Self::hand_back(delivery, "dead-letter", source).await);
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        Ok(Settled::DeadLettered)
    }
}
