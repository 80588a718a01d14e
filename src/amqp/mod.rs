//! AMQP: connection, topology, a publisher with confirms and routing checks, and consumer
//! acknowledgements sent in runs ([`Acks`]). The consumer loop lives in [`crate::consumer`],
//! which owns reconnection.

pub mod acks;
pub mod connection;
pub mod topology;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

pub use acks::{Acks, Unsettled};
pub use connection::{ConnectError, connect};
pub use topology::{Refused, RetryTier, Topology};

/// A publish that did not become durable on the broker.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("broker error while publishing: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the message (e.g. `reject-publish` overflow).
    #[error("the broker nacked the publish")]
    Nacked,
    /// `mandatory` publish that no queue took.
    #[error("the broker returned the message as unroutable: {0}")]
    Unroutable(String),
    /// The message's properties (its headers, mostly) do not fit one frame of the connection:
    /// not sent, as the broker would close the whole connection for it ([`header_frame_size`]).
    #[error(
        "the message's properties take a header frame of {size} bytes, over the connection's frame_max of {frame_max} bytes; not sent (the broker would close the connection with FRAME_ERROR)"
    )]
    HeaderFrameTooLarge {
        /// Bytes of the content header frame.
        size: usize,
        /// The connection's negotiated `frame_max`.
        frame_max: u32,
    },
}

/// Bytes of a content header frame besides its properties: the frame's type (1), channel (2),
/// size (4) and end marker (1), and the payload's class id (2), weight (2) and body size (8)
/// (AMQP 0-9-1 §4.2.3 and §4.2.6.1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// The size in bytes of the content header frame that carries `properties`. A message's
/// properties travel in that one frame, which cannot be split: over the connection's
/// negotiated `frame_max` (RabbitMQ's default: 131,072 bytes) the broker closes the whole
/// connection with `FRAME_ERROR` (`frame_too_large`), failing every channel on it —
/// <https://github.com/rabbitmq/rabbitmq-java-client/pull/363>, where the Java client added the
/// same check; lapin sends such a frame as it is.
pub fn header_frame_size(properties: &BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_or(usize::MAX, |bytes| bytes.len() + HEADER_FRAME_OVERHEAD)
}

/// How long [`Publisher::publish_republishing`] keeps republishing a message the broker nacks.
const REPUBLISH_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A channel in confirm mode; every publish waits for the broker's confirm and checks routing.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    frame_max: u32,
}

impl Publisher {
    /// Opens a channel on `connection` and enables publisher confirms.
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            frame_max: connection.configuration().frame_max(),
        })
    }

    /// A publisher on `channel`, which must be in confirm mode already, of a connection whose
    /// negotiated `frame_max` is `frame_max` (or more).
    pub fn on(channel: Channel, frame_max: u32) -> Self {
        Self { channel, frame_max }
    }

    /// The connection's negotiated `frame_max`, in bytes: the most one frame may take, and so
    /// the most a message's properties may take ([`header_frame_size`]).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The underlying channel (for declarations and `basic_get`).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Asks the broker whether this user may publish to the default exchange, which retries,
    /// parked messages and dead letters go through: an empty, non-mandatory message to the
    /// routing key `""`, which names no queue, so the broker drops it after checking the write
    /// permission on `amq.default` (<https://www.rabbitmq.com/docs/access-control>). Without
    /// it the broker closes this channel with `ACCESS_REFUSED` on the first retry instead.
    ///
    /// # Errors
    /// The broker's refusal, or a failed channel.
    pub async fn check_default_exchange(&self) -> Result<(), lapin::Error> {
        self.channel
            .basic_publish(
                "".into(),
                "".into(),
                BasicPublishOptions::default(),
                &[],
                BasicProperties::default(),
            )
            .await?
            .await
            .map(drop)
    }

    /// Publishes persistently with `mandatory`, and returns only once the broker confirmed it
    /// and a queue took it. "Acked" is not "routed": an unroutable mandatory message is acked
    /// too, and comes back as a returned message. Properties over one frame are refused
    /// unsent ([`PublishError::HeaderFrameTooLarge`]).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let properties = properties.with_delivery_mode(2);
        let size = header_frame_size(&properties);
        if size > self.frame_max as usize {
            return Err(PublishError::HeaderFrameTooLarge {
                size,
                frame_max: self.frame_max,
            });
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(PublishError::Nacked);
        }
        if let Some(returned) = confirm.take_message() {
            return Err(PublishError::Unroutable(returned.reply_text.to_string()));
        }
        Ok(())
    }

    /// As [`Publisher::publish`], republishing a message the broker nacks, with exponential
    /// backoff (10 ms doubling, jittered) for up to 10 s, as a publisher with confirms must: a
    /// `basic.nack` says the broker did not take the message ("only on internal queue error",
    /// <https://www.rabbitmq.com/docs/confirms#server-sent-nacks>), such as a quorum queue that is
    /// being created or deleted as the message is routed to it (rabbitmq-server#15333) or a
    /// `reject-publish` queue at its length limit. The booking platform publishes this way
    /// (README, "How the booking platform publishes"), and so do the demo and the tests that
    /// stand in for it, and a dead-letter replay. A republished message may arrive twice; the
    /// version guard makes that harmless. Errors: the last [`PublishError::Nacked`] when the
    /// broker still refuses after 10 s; any other error at once.
    pub async fn publish_republishing(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let mut backoff = crate::retry_policy::Republish::new(
            std::time::Duration::from_millis(10),
            std::time::Duration::from_secs(1),
            REPUBLISH_FOR,
        );
        loop {
            match self
                .publish(exchange, routing_key, body, properties.clone())
                .await
            {
                Err(PublishError::Nacked) => match backoff.next_delay() {
                    Some(wait) => {
                        tracing::warn!(
                            exchange,
                            routing_key,
                            "the broker nacked a publish; republishing"
                        );
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(PublishError::Nacked),
                },
                other => return other,
            }
        }
    }
}

/// The properties of a booking event as the booking platform publishes it (README, "How the
/// booking platform publishes"): the structured-mode content type and, when the publisher knows
/// the tenant, the tenant header the broker routes on ([`topology::TENANT_HEADER`]).
pub fn event_properties(tenant: Option<&str>) -> BasicProperties {
    let properties =
        BasicProperties::default().with_content_type("application/cloudevents+json".into());
    match tenant {
        Some(tenant) => {
            let mut headers = FieldTable::default();
            headers.insert(
                topology::TENANT_HEADER.into(),
                AMQPValue::LongString(tenant.into()),
            );
            properties.with_headers(headers)
        }
        None => properties,
    }
}

/// A string header, whether sent as a long or short string.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header, whatever integer width the publisher chose.
pub fn header_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}
