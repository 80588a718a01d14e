//! Outcome: what happens to a processed message ([`decide`]: one exhaustive match), why
//! ([`Reason`]: the bounded reason codes), and the only code that acks, schedules a retry or
//! dead-letters a message ([`Settler`]). A message is acked only after its outcome is durable:
//! Salesforce committed it, or the retry or dead-letter copy was confirmed by the broker *and*
//! routed to a queue.

pub mod dead_letter;
pub mod decide;
pub mod reason;

pub use decide::{Cause, Disposition, decide};
pub use reason::Reason;

use std::time::Duration;

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::BasicNackOptions;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::amqp::{Acks, PublishError, Publisher, Topology, Unsettled};
use crate::pipeline::MessageInfo;

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
    DeadLettered {
        /// Why (`retries_exhausted` when a retry found no tier left).
        reason: Reason,
    },
}

impl Settled {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Superseded => "superseded",
            Self::Retried { .. } => "retried",
            Self::DeadLettered { .. } => "dead_lettered",
        }
    }
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
    /// lapin did not send the ack: the delivery's channel had already closed, so the
    /// broker will redeliver the message (`Acker::ack` answers `Ok(false)`,
    /// <https://docs.rs/lapin/latest/lapin/acker/struct.Acker.html>).
    #[error("not acknowledged: the delivery's channel is closed; the broker will redeliver it")]
    ChannelClosed,
}

/// Acks `delivery` (alone or in a run, [`Acks`]), or says why the broker will redeliver it;
/// calls `release` once the ack is asked for, before its answer, which may wait for a run.
/// lapin answers `Ok(false)` instead of an error when the delivery's channel closed before the
/// ack was issued: counting that as a settled message would hide a redelivery.
async fn ack(acks: &Acks, delivery: &Delivery, release: impl FnOnce()) -> Result<(), SettleError> {
    let request = acks.request(delivery);
    release();
    if request.answer().await? {
        Ok(())
    } else {
        Err(SettleError::ChannelClosed)
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// Settles the deliveries of one channel: the topology says where retries and dead letters go.
#[derive(Clone)]
pub struct Settler {
    publisher: Publisher,
    topology: std::sync::Arc<Topology>,
    acks: Acks,
}

impl Settler {
    /// A settler publishing through `publisher` and acknowledging through `acks` (the
    /// acknowledgements of the channel the deliveries came on).
    pub fn new(publisher: Publisher, topology: std::sync::Arc<Topology>, acks: Acks) -> Self {
        Self {
            publisher,
            topology,
            acks,
        }
    }

    /// Guards `delivery` while it is processed, until its outcome goes to [`Settler::settle`]
    /// ([`Acks::guard`]: a panic before that hands it back to the broker).
    pub fn guard(&self, delivery: &Delivery) -> Unsettled {
        self.acks.guard(delivery)
    }

    /// Carries out `disposition` for `delivery`. `release` is called once the outcome is
    /// durable and only the ack's answer is awaited (it may wait up to [`crate::amqp::acks::HOLD`]
    /// for a run): the caller gives back its concurrency permit there, so held acks do not hold
    /// the worker's permits. Not called when the message could not be settled.
    pub async fn settle(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        disposition: Disposition,
        release: impl FnOnce() + Send,
    ) -> Result<Settled, SettleError> {
        match disposition {
            Disposition::Written => {
                ack(&self.acks, delivery, release).await?;
                Ok(Settled::Written)
            }
            Disposition::Superseded => {
                ack(&self.acks, delivery, release).await?;
                Ok(Settled::Superseded)
            }
            // Boxed: a publish and its confirm are most of this future's size, and the future
            // is part of every message's task, held while the message waits for Salesforce.
            Disposition::Retry { cause, retry_after } => {
                Box::pin(self.retry(delivery, info, cause, retry_after, 1, release)).await
            }
            Disposition::Wait { cause, retry_after } => {
                Box::pin(self.retry(delivery, info, cause, retry_after, 0, release)).await
            }
            Disposition::DeadLetter(cause) => {
                Box::pin(self.dead_letter(delivery, info, &cause, release)).await
            }
        }
    }

    fn attempts_so_far(delivery: &Delivery) -> i64 {
        dead_letter::attempts(delivery.properties.headers().as_ref())
    }

    /// The tier for this attempt: the attempt's own tier, or a later one when Salesforce asked
    /// for a longer wait.
    fn pick_tier(&self, attempt: usize, retry_after: Option<Duration>) -> Option<usize> {
        let tiers = &self.topology.tiers;
        let wanted = retry_after.unwrap_or_default();
        (attempt.saturating_sub(1)..tiers.len()).find(|&i| tiers[i].delay >= wanted)
    }

    /// The copy's properties: the delivery's, with portals-crm's headers added, `expiration`
    /// (milliseconds, for a retry tier) when given, and the publisher's largest headers left off
    /// when the copy would not fit one frame of the connection ([`dead_letter::fit_frame`]).
    fn annotated(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        cause: &Cause,
        attempts: i64,
        expiration: Option<String>,
    ) -> BasicProperties {
        let original = delivery.properties.headers().clone().unwrap_or_default();
        let table = dead_letter::annotate(
            &original,
            info,
            cause,
            attempts,
            delivery.routing_key.as_str(),
            &now_rfc3339(),
        );
        // Persistent, as `Publisher::publish` sends it: measured as it goes out.
        let mut properties = delivery
            .properties
            .clone()
            .with_headers(table)
            .with_delivery_mode(2);
        if properties.content_type().is_none() {
            properties = properties.with_content_type("application/cloudevents+json".into());
        }
        if let Some(expiration) = expiration {
            properties = properties.with_expiration(expiration.into());
        }
        let (properties, dropped) = dead_letter::fit_frame(properties, self.publisher.frame_max());
        if !dropped.is_empty() {
            // The message's span names its tenant and event.
            tracing::warn!(
                dropped = %dropped.join(","),
                frame_max = self.publisher.frame_max(),
                "the message's own headers would not fit one frame with portals-crm's; the copy leaves them off (x-portals-dropped-headers)"
            );
        }
        properties
    }

    async fn hand_back(
        &self,
        delivery: &Delivery,
        target: &'static str,
        source: PublishError,
    ) -> SettleError {
        // Requeue so another attempt settles it; the delivery limit stops a loop.
        if let Err(error) = self
            .acks
            .nack(
                delivery,
                BasicNackOptions {
                    requeue: true,
                    multiple: false,
                },
            )
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
        cause: Cause,
        retry_after: Option<Duration>,
        counted: i64,
        release: impl FnOnce() + Send,
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
            let exhausted = Cause {
                reason: Reason::RetriesExhausted,
                message: format!(
                    "gave up after {} attempts; last failure {}: {}",
                    attempt, cause.reason, cause.message
                ),
                salesforce: cause.salesforce,
            };
            return self.dead_letter(delivery, info, &exhausted, release).await;
        };
        let tier_delay = self.topology.tiers[tier].delay;
        let expiration = crate::retry_policy::jittered(tier_delay)
            .as_millis()
            .to_string();
        let properties = self.annotated(delivery, info, &cause, attempt, Some(expiration));
        let queue = &self.topology.tiers[tier].queue;
        if let Err(source) = self
            .publisher
            .publish("", queue, &delivery.data, properties)
            .await
        {
            return Err(self.hand_back(delivery, "retry", source).await);
        }
        ack(&self.acks, delivery, release).await?;
        Ok(Settled::Retried { tier })
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        info: &MessageInfo,
        cause: &Cause,
        release: impl FnOnce() + Send,
    ) -> Result<Settled, SettleError> {
        let attempts = Self::attempts_so_far(delivery) + 1;
        let properties = self.annotated(delivery, info, cause, attempts, None);
        if let Err(source) = self
            .publisher
            .publish("", &self.topology.dead_queue, &delivery.data, properties)
            .await
        {
            return Err(self.hand_back(delivery, "dead-letter", source).await);
        }
        ack(&self.acks, delivery, release).await?;
        Ok(Settled::DeadLettered {
            reason: cause.reason,
        })
    }
}
