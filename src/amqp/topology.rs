//! The broker topology of DESIGN.md §4, declared idempotently by every worker, with a queue
//! per tenant in front of the shared work queue (README, "Fairness between tenants"):
//!
//! ```text
//! bookings (topic) --meeting.#--> <work>.route (headers, alternate-exchange <work>.shared)
//!     <work>.route --x-match=all, cloudEvents_tenantid=T--> <work>.t.T   (one per tenant)
//!     <work>.route --(no binding matched)--> <work>.shared (fanout) --> <work> (shared queue)
//! ```
//!
//! The tenant header follows the CloudEvents AMQP protocol binding (§3.1.3.1: attributes,
//! extensions included, go to application properties prefixed `cloudEvents_` or `cloudEvents:`,
//! the `_` form preferred; structured mode MAY carry them, §3.2.3):
//! <https://github.com/cloudevents/spec/blob/main/cloudevents/bindings/amqp-protocol-binding.md>.
//! A headers exchange matches only the headers a binding names, `x-match=all` needing each of
//! them with an equal value; an exchange's `alternate-exchange` takes what it cannot route
//! (<https://www.rabbitmq.com/docs/exchanges#headers>, <https://www.rabbitmq.com/docs/ae>), so
//! an event without the header, or with a tenant that has no queue, reaches the shared queue
//! exactly as before. RabbitMQ delivers a message once per queue however many bindings lead to
//! it.

use std::time::Duration;

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::AmqpConfig;

/// A step of setting up the topology or a consumer that the broker refused: a channel error
/// (AMQP 0-9-1 §1.2.2, the "soft" reply codes) whose text names the queue or exchange, with
/// what to check first ([`refusal_check`]). Unlike a lost connection, trying again changes
/// nothing until someone acts on the check.
#[derive(Debug, thiserror::Error)]
#[error("{error} — check: {check}")]
pub struct Refused {
    /// What lapin reported: the broker's reply code and text.
    pub error: lapin::Error,
    /// What to check first.
    pub check: &'static str,
}

impl Refused {
    /// `error` as a refusal when it is a channel error the broker sent (a soft reply code);
    /// `Err(error)` when it is anything else (I/O, a closed connection, a connection error).
    ///
    /// # Errors
    /// `error` itself, when it is not a refusal.
    pub fn from_error(error: lapin::Error) -> Result<Self, lapin::Error> {
        match refusal_check(&error) {
            Some(check) => Ok(Self { error, check }),
            None => Err(error),
        }
    }
}

/// What to check when the broker refused to declare, bind or consume with `error`, by reply
/// code; `None` for errors that are not such a refusal. RabbitMQ's permissions per operation
/// (configure to declare or delete, write and read to bind, read to consume, write on the
/// dead-letter exchange of a queue declared with one) are in
/// <https://www.rabbitmq.com/docs/access-control>; an existing queue or exchange declared with
/// other arguments is refused with `PRECONDITION_FAILED` ("inequivalent arg"),
/// <https://www.rabbitmq.com/docs/queues#property-equivalence>.
pub fn refusal_check(error: &lapin::Error) -> Option<&'static str> {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    let lapin::ErrorKind::ProtocolError(reply) = error.kind() else {
        return None;
    };
    let AMQPErrorKind::Soft(code) = reply.kind() else {
        return None;
    };
    Some(match code {
        AMQPSoftError::ACCESSREFUSED => {
            "the broker user in amqp.url lacks a permission on the queue or exchange the broker's text names (or, \"in exclusive use\", another client consumes that queue exclusively): a worker needs configure, write and read on each of its queues and exchanges (README \"Deploying\" gives the regular expressions; rabbitmqctl list_user_permissions USER shows the user's)"
        }
        AMQPSoftError::PRECONDITIONFAILED => {
            "a queue or exchange of that name exists with other arguments or another type than this worker declares (the broker's text names which): made by hand, by another release, or under another amqp.delivery_limit. A queue: move its messages elsewhere and delete it; an exchange: delete it and restore the bindings others made to it (the booking exchange is the publishers' too); the worker then declares it again (README \"Deploying\")"
        }
        AMQPSoftError::NOTFOUND => {
            "a queue or exchange the step needs does not exist (the broker's text names it), deleted meanwhile: the next attempt declares it again"
        }
        AMQPSoftError::RESOURCELOCKED => {
            "a queue of that name is exclusive to another connection (the broker's text names it): stop the client that declared it"
        }
        _ => "the broker's text and its log say why",
    })
}

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

/// The AMQP header (application property) that carries the event's `tenantid` extension, as the
/// CloudEvents AMQP binding names it with its preferred separator.
pub const TENANT_HEADER: &str = "cloudEvents_tenantid";

/// The same attribute with the binding's other separator, which consumers SHOULD understand
/// too; each tenant queue is bound for both.
pub const TENANT_HEADER_COLON: &str = "cloudEvents:tenantid";

/// RabbitMQ's limit on a queue or exchange name, in bytes (an AMQP 0-9-1 short string).
pub const MAX_NAME_BYTES: usize = 255;

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

    /// The headers exchange that sends each event to its tenant's queue.
    pub fn route_exchange(&self) -> String {
        format!("{}.route", self.work_queue)
    }

    /// The route exchange's alternate exchange (fanout), bound to the shared work queue: it
    /// takes every event no tenant binding matched.
    pub fn shared_exchange(&self) -> String {
        format!("{}.shared", self.work_queue)
    }

    fn tenant_prefix(&self) -> String {
        format!("{}.t.", self.work_queue)
    }

    /// The queue of `tenant`, or `None` when its name would be longer than RabbitMQ allows:
    /// such a tenant's events stay on the shared queue, as header-less ones do.
    pub fn tenant_queue(&self, tenant: &str) -> Option<String> {
        let name = format!("{}{tenant}", self.tenant_prefix());
        (!tenant.is_empty() && name.len() <= MAX_NAME_BYTES).then_some(name)
    }

    /// True for the queues workers consume: the shared work queue and every tenant queue
    /// (the broker's `x-death` record names one of them when it dead-letters a message).
    pub fn is_consumed(&self, queue: &str) -> bool {
        queue == self.work_queue
            || queue
                .strip_prefix(&self.tenant_prefix())
                .is_some_and(|tenant| !tenant.is_empty())
    }

    /// Arguments of the shared work queue and of every tenant queue: the same delivery limit
    /// and dead-lettering, so a message's fate does not depend on the queue it waited in.
    fn work_args(&self) -> FieldTable {
        let mut work = Self::quorum_args(&self.dead_queue);
        work.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        work
    }

    /// Binding arguments of a tenant queue: every named header must be present and equal.
    fn tenant_binding(header: &str, tenant: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-match".into(), long_string("all"));
        args.insert(header.into(), long_string(tenant));
        args
    }

    /// Arguments of the route exchange.
    fn route_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "alternate-exchange".into(),
            long_string(&self.shared_exchange()),
        );
        args
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

    /// Declares the dead-letter queue alone: a classic durable queue, so that inspecting its
    /// messages (get, then requeue) can never trip a delivery limit. What `dlq` and the console
    /// need, so that a part of the topology they do not use (a retry tier declared with other
    /// arguments, a permission on a tenant queue) cannot keep ops from their dead letters.
    ///
    /// # Errors
    /// The broker's refusal (a queue of that name with arguments, a permission) or a failed
    /// channel.
    pub async fn declare_dead_letter_queue(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .queue_declare(
                self.dead_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(drop)
    }

    /// Declares everything but the tenant queues ([`Topology::declare_tenant`]); safe to
    /// repeat. A queue that exists with other arguments makes the broker close the channel with
    /// PRECONDITION_FAILED, which the caller reports.
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
        self.declare_dead_letter_queue(channel).await?;
        channel
            .queue_declare(self.work_queue.as_str().into(), durable, self.work_args())
            .await?;
        let exchange = |kind| ExchangeDeclareOptions {
            durable: true,
            // Internal: only the bookings exchange publishes to them (via exchange bindings).
            internal: kind,
            ..ExchangeDeclareOptions::default()
        };
        let shared = self.shared_exchange();
        let route = self.route_exchange();
        channel
            .exchange_declare(
                shared.as_str().into(),
                ExchangeKind::Fanout,
                exchange(true),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.work_queue.as_str().into(),
                shared.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                route.as_str().into(),
                ExchangeKind::Headers,
                exchange(true),
                self.route_args(),
            )
            .await?;
        channel
            .exchange_bind(
                route.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // The direct binding of earlier versions goes only now that the route reaches the
        // shared queue, so no event is unroutable in between. A worker of an earlier version
        // that declares again puts it back: an event with the tenant header then reaches both
        // the shared and its tenant queue, and the second write is an idempotent upsert
        // (superseded); one without reaches the shared queue once.
        channel
            .queue_unbind(
                self.work_queue.as_str().into(),
                self.exchange.as_str().into(),
                self.binding_key.as_str().into(),
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

    /// Declares `tenant`'s queue (the work queue's arguments) and binds it to the route
    /// exchange for both spellings of the tenant header; returns the queue, or `None` when the
    /// tenant cannot have one (see [`Topology::tenant_queue`]). Safe to repeat.
    pub async fn declare_tenant(
        &self,
        channel: &Channel,
        tenant: &str,
    ) -> Result<Option<String>, lapin::Error> {
        let Some(queue) = self.tenant_queue(tenant) else {
            return Ok(None);
        };
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.work_args(),
            )
            .await?;
        for header in [TENANT_HEADER, TENANT_HEADER_COLON] {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.route_exchange().as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    Self::tenant_binding(header, tenant),
                )
                .await?;
        }
        Ok(Some(queue))
    }

    /// Removes `tenant`'s bindings, so its new events go to the shared queue; its queue and
    /// what waits in it stay (deleting it would lose them). Safe to repeat.
    pub async fn forget_tenant(&self, channel: &Channel, tenant: &str) -> Result<(), lapin::Error> {
        let Some(queue) = self.tenant_queue(tenant) else {
            return Ok(());
        };
        for header in [TENANT_HEADER, TENANT_HEADER_COLON] {
            channel
                .queue_unbind(
                    queue.as_str().into(),
                    self.route_exchange().as_str().into(),
                    "".into(),
                    Self::tenant_binding(header, tenant),
                )
                .await?;
        }
        Ok(())
    }

    /// Deletes the queues of `tenants` (tests and the demo clean up after themselves).
    pub async fn delete_tenants<'a>(
        &self,
        channel: &Channel,
        tenants: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), lapin::Error> {
        for queue in tenants.into_iter().filter_map(|t| self.tenant_queue(t)) {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Deletes every shared queue and the exchanges (tests and the demo clean up after
    /// themselves; tenant queues: [`Topology::delete_tenants`]).
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let queues = std::iter::once(&self.work_queue)
            .chain(std::iter::once(&self.dead_queue))
            .chain(self.tiers.iter().map(|t| &t.queue));
        for queue in queues {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [
            &self.route_exchange(),
            &self.shared_exchange(),
            &self.exchange,
        ] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: lapin::protocol::AMQPErrorKind, text: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(kind, text.into())).into()
    }

    #[test]
    fn a_refusal_is_told_from_a_lost_connection_and_checked_by_reply_code() {
        use lapin::protocol::{
            AMQPErrorKind::Hard, AMQPErrorKind::Soft, AMQPHardError, AMQPSoftError,
        };
        let check = |kind, text| Refused::from_error(reply(kind, text)).map(|r| r.check);
        assert!(
            check(
                Soft(AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - access to queue 'q'"
            )
            .unwrap()
            .starts_with("the broker user in amqp.url lacks a permission")
        );
        assert!(
            check(
                Soft(AMQPSoftError::PRECONDITIONFAILED),
                "PRECONDITION_FAILED - inequivalent arg"
            )
            .unwrap()
            .contains("exists with other arguments")
        );
        assert!(
            check(Soft(AMQPSoftError::NOTFOUND), "NOT_FOUND - no exchange 'x'")
                .unwrap()
                .contains("the next attempt declares it again")
        );
        assert!(
            check(
                Soft(AMQPSoftError::RESOURCELOCKED),
                "RESOURCE_LOCKED - cannot obtain exclusive access"
            )
            .unwrap()
            .contains("exclusive to another connection")
        );
        assert_eq!(
            check(Soft(AMQPSoftError::NOROUTE), "NO_ROUTE").unwrap(),
            "the broker's text and its log say why"
        );
        // A connection error, an I/O error or a closed connection is a lost connection: the
        // error comes back as it was.
        let hard = Refused::from_error(reply(Hard(AMQPHardError::INTERNALERROR), "INTERNAL_ERROR"))
            .unwrap_err();
        assert!(hard.to_string().contains("INTERNAL_ERROR"), "{hard}");
        assert!(
            Refused::from_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset).into())
                .is_err()
        );
        let refused = Refused::from_error(reply(
            Soft(AMQPSoftError::ACCESSREFUSED),
            "ACCESS_REFUSED - access to exchange 'bookings' in vhost '/' refused for user 'u'",
        ))
        .unwrap();
        assert!(
            refused
                .to_string()
                .contains("exchange 'bookings' in vhost '/' refused for user 'u' — check: "),
            "{refused}"
        );
    }

    #[test]
    fn tier_labels() {
        assert_eq!(delay_label(Duration::from_secs(5)), "5s");
        assert_eq!(delay_label(Duration::from_secs(120)), "2m");
        assert_eq!(delay_label(Duration::from_secs(3600)), "1h");
        assert_eq!(delay_label(Duration::from_secs(90)), "90s");
    }

    fn topology() -> Topology {
        let config = crate::config::Config::from_toml(
            include_str!("../../config/portals-crm.toml"),
            std::iter::empty(),
        )
        .unwrap();
        Topology::new(&config.amqp, &[Duration::from_secs(5)])
    }

    fn text(table: &FieldTable, key: &str) -> Option<String> {
        crate::amqp::header_str(Some(table), key)
    }

    #[test]
    fn tenant_queues_have_the_work_queues_arguments() {
        let topology = topology();
        let args = topology.work_args();
        assert_eq!(text(&args, "x-queue-type").as_deref(), Some("quorum"));
        assert_eq!(text(&args, "x-dead-letter-exchange").as_deref(), Some(""));
        assert_eq!(
            text(&args, "x-dead-letter-routing-key"),
            Some(topology.dead_queue.clone())
        );
        assert_eq!(
            text(&args, "x-dead-letter-strategy").as_deref(),
            Some("at-least-once")
        );
        assert_eq!(text(&args, "x-overflow").as_deref(), Some("reject-publish"));
        assert_eq!(
            crate::amqp::header_int(Some(&args), "x-delivery-limit"),
            Some(i64::from(topology.delivery_limit))
        );
    }

    #[test]
    fn names_of_the_route_and_the_tenant_queues() {
        let topology = topology();
        assert_eq!(topology.route_exchange(), "crm.sync.route");
        assert_eq!(topology.shared_exchange(), "crm.sync.shared");
        assert_eq!(
            topology.tenant_queue("acme").as_deref(),
            Some("crm.sync.t.acme")
        );
        assert_eq!(topology.tenant_queue(""), None);
        let longest = "a".repeat(MAX_NAME_BYTES - "crm.sync.t.".len());
        assert_eq!(
            topology.tenant_queue(&longest).map(|q| q.len()),
            Some(MAX_NAME_BYTES)
        );
        assert_eq!(topology.tenant_queue(&format!("{longest}a")), None);
        // Bytes, not characters.
        let wide = "é".repeat(longest.len() / 2 + 1);
        assert_eq!(topology.tenant_queue(&wide), None);
        assert!(topology.is_consumed("crm.sync"));
        assert!(topology.is_consumed("crm.sync.t.acme"));
        assert!(!topology.is_consumed("crm.sync.t."));
        assert!(!topology.is_consumed("crm.retry.5s"));
        assert!(!topology.is_consumed("crm.dead"));
    }

    #[test]
    fn route_and_tenant_bindings() {
        let topology = topology();
        assert_eq!(
            text(&topology.route_args(), "alternate-exchange").as_deref(),
            Some("crm.sync.shared")
        );
        for header in [TENANT_HEADER, TENANT_HEADER_COLON] {
            let binding = Topology::tenant_binding(header, "acme");
            assert_eq!(text(&binding, "x-match").as_deref(), Some("all"));
            assert_eq!(text(&binding, header).as_deref(), Some("acme"));
            assert_eq!(binding.inner().len(), 2, "only the tenant is matched");
        }
    }
}
