//! AMQP: connection, topology, a publisher with confirms and routing checks, and consumer
//! acknowledgements sent in runs ([`Acks`]). The consumer loop lives in [`crate::consumer`],
//! which owns reconnection.

pub mod acks;
pub mod topology;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

pub use acks::{Acks, Unsettled};
pub use topology::{RetryTier, Topology};

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
}

/// Connects with heartbeats (added to the URL unless its query sets them). The URL holds a
/// password, so it never appears in an error: lapin's errors do not include it, and neither do
/// ours.
pub async fn connect(
    url: &SecretString,
    heartbeat_secs: u16,
    name: &str,
) -> Result<Connection, lapin::Error> {
    let uri = with_heartbeat(url.expose_secret(), heartbeat_secs);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&uri, properties).await
}

/// `url` with a `heartbeat` query parameter added unless its query sets one (a URL that does not
/// parse is left as it is, for lapin to refuse).
fn with_heartbeat(url: &str, heartbeat_secs: u16) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    if !parsed.query_pairs().any(|(key, _)| key == "heartbeat") {
        parsed
            .query_pairs_mut()
            .append_pair("heartbeat", &heartbeat_secs.to_string());
    }
    parsed.into()
}

/// How long [`Publisher::publish_republishing`] keeps republishing a message the broker nacks.
const REPUBLISH_FOR: std::time::Duration = std::time::Duration::from_secs(10);

/// A channel in confirm mode; every publish waits for the broker's confirm and checks routing.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Opens a channel on `connection` and enables publisher confirms.
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// A publisher on `channel`, which must be in confirm mode already.
    pub fn on(channel: Channel) -> Self {
        Self { channel }
    }

    /// The underlying channel (for declarations and `basic_get`).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes persistently with `mandatory`, and returns only once the broker confirmed it
    /// and a queue took it. "Acked" is not "routed": an unroutable mandatory message is acked
    /// too, and comes back as a returned message.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
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
                properties.with_delivery_mode(2),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_is_added_unless_the_url_query_sets_one() {
        assert_eq!(
            with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f", 30),
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=131072", 30),
            "amqp://h/%2f?frame_max=131072&heartbeat=30"
        );
        assert_eq!(
            with_heartbeat("amqp://u:heartbeat%3D1@h/%2f", 30),
            "amqp://u:heartbeat%3D1@h/%2f?heartbeat=30",
            "only the query's keys count"
        );
        let parsed: lapin::uri::AMQPUri = with_heartbeat("amqp://h/%2f?heartbeat=5", 30)
            .parse()
            .expect("a valid AMQP URI");
        assert_eq!(parsed.query.heartbeat, Some(5));
    }
}
