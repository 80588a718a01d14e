//! The broker topology of DESIGN.md §4, declared idempotently by every worker.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpConfig;

/// One delayed-retry tier queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryTier {
    /// Queue name, e.g. `crm.retry.30s`.
    pub queue: String,
    /// How long a message waits in it.
    pub delay: Duration,
}

/// Names and limits of every exchange and queue portals-crm uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange the booking platform publishes to.
    pub exchange: String,
    /// Binding of the work queue.
    pub binding_key: String,
    /// The quorum work queue.
    pub work_queue: String,
    /// The dead-letter queue.
    pub dead_queue: String,
    /// Retry tiers, shortest first.
    pub tiers: Vec<RetryTier>,
    /// The work queue's delivery limit.
    pub delivery_limit: u32,
}

/// `5s`, `2m`, `1h` — short names for tier queues.
pub fn delay_label(delay: Duration) -> String {
    let secs = delay.as_secs();
    if secs >= 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs >= 60 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

impl Topology {
    /// The topology named by the configuration.
    pub fn new(amqp: &AmqpConfig, tiers: &[Duration]) -> Self {
        Self {
            exchange: amqp.exchange.clone(),
            binding_key: amqp.binding_key.clone(),
            work_queue: amqp.work_queue.clone(),
            dead_queue: amqp.dead_letter_queue.clone(),
            tiers: tiers
                .iter()
                .map(|delay| RetryTier {
                    queue: format!("{}.{}", amqp.retry_queue_prefix, delay_label(*delay)),
                    delay: *delay,
                })
                .collect(),
            delivery_limit: amqp.delivery_limit,
        }
    }

    /// Arguments shared by the quorum queues that dead-letter somewhere: at-least-once
    /// dead-lettering so a message is never dropped in transit, which RabbitMQ only allows with
    /// `overflow = reject-publish`.
    fn quorum_args(dead_letter_to: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long_string("quorum"));
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(dead_letter_to),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Declares everything; safe to repeat. A queue that exists with other arguments makes the
    /// broker close the channel with PRECONDITION_FAILED, which the caller reports.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        // Dead letters: a classic durable queue, so that inspecting them (get + requeue) can
        // never trip a delivery limit.
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut work = Self::quorum_args(&self.dead_queue);
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        channel
            .queue_declare(self.work_queue.as_str().into(), durable, work)
            .await?;
        channel
            .queue_bind(
                self.work_queue.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for tier in &self.tiers {
            let mut args = Self::quorum_args(&self.work_queue);
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(tier.delay.as_millis() as i64),
            );
            channel
                .queue_declare(tier.queue.as_str().into(), durable, args)
                .await?;
        }
        Ok(())
    }

    /// Deletes every queue and the exchange (tests and the demo clean up after themselves).
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let queues = std::iter::once(&self.work_queue)
            .chain(std::iter::once(&self.dead_queue))
            .chain(self.tiers.iter().map(|t| &t.queue));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_labels() {
        assert_eq!(delay_label(Duration::from_secs(5)), "5s");
        assert_eq!(delay_label(Duration::from_secs(120)), "2m");
        assert_eq!(delay_label(Duration::from_secs(3600)), "1h");
        assert_eq!(delay_label(Duration::from_secs(90)), "90s");
    }
}
