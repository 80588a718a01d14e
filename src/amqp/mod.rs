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

/// Connects with heartbeats (added to the URL unless its query sets them). The URL holds a
/// password, so it never appears in an error: lapin's errors do not include it, and neither do
/// ours.
///
/// # Errors
/// [`ConnectError`]: the connection did not open, with what to check first.
pub async fn connect(
    url: &SecretString,
    heartbeat_secs: u16,
    name: &str,
) -> Result<Connection, ConnectError> {
    let uri = with_heartbeat(url.expose_secret(), heartbeat_secs);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&uri, properties)
        .await
        .map_err(|error| ConnectError::new(url.expose_secret(), error))
}

/// A connection to the broker that did not open: where to (`host:port`, never the credentials),
/// lapin's error, and what an operator should check first for that kind of failure.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to the broker at {endpoint}: {error}. Check: {check}")]
pub struct ConnectError {
    /// `host:port` from the URL (the scheme's default port when it names none).
    pub endpoint: String,
    /// What to check first ([`connect_check`]).
    pub check: &'static str,
    /// What lapin reported (in the message, not as its source: the message already says it).
    pub error: lapin::Error,
}

impl ConnectError {
    fn new(url: &str, error: lapin::Error) -> Self {
        let tls = url
            .get(..6)
            .is_some_and(|s| s.eq_ignore_ascii_case("amqps:"));
        let endpoint = url::Url::parse(url).map_or_else(
            |_| "the configured amqp.url".to_owned(),
            |u| {
                let port = u.port().unwrap_or(if tls { 5671 } else { 5672 });
                format!("{}:{port}", u.host_str().unwrap_or("localhost"))
            },
        );
        Self {
            endpoint,
            check: connect_check(tls, &error),
            error,
        }
    }
}

/// A plain client's check when the port answered something that is not AMQP 0-9-1.
const NOT_AMQP: &str = "the server's answer is not AMQP 0-9-1: is the port RabbitMQ's AMQP listener, 5672? A TLS listener needs amqps://";

/// What to check first when a connection with a TLS (`amqps://`) or plain URL failed with
/// `error`. The kinds: nothing listening (TCP refused); a TLS client on a plain AMQP port (the
/// broker answers the TLS hello with its protocol header, which rustls reports as a corrupt
/// record, `InvalidData`) or a plain client on a TLS or non-AMQP port (lapin cannot parse the
/// answer); the broker refusing the login (`ACCESS_REFUSED`, 403) or the virtual host
/// (`NOT_ALLOWED`, 530: "vhost … not found", or no permissions on it) — RabbitMQ's
/// <https://www.rabbitmq.com/docs/troubleshooting-networking> and
/// <https://www.rabbitmq.com/docs/access-control>.
pub fn connect_check(tls: bool, error: &lapin::Error) -> &'static str {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use std::io::ErrorKind as Io;
    match error.kind() {
        ErrorKind::IOError(e) => match e.kind() {
            Io::ConnectionRefused => {
                "nothing listens at that port: is RabbitMQ running (README, set-up), and is the port its AMQP listener, 5672, or 5671 for amqps://?"
            }
            Io::InvalidData if tls => {
                "the port did not answer TLS: amqps:// needs the broker's TLS listener, 5671 by default; a plain listener, 5672, needs amqp://"
            }
            Io::InvalidData => NOT_AMQP,
            Io::TimedOut | Io::HostUnreachable | Io::NetworkUnreachable => {
                "no answer from the host: check the host name, the port and any firewall between"
            }
            Io::ConnectionReset | Io::ConnectionAborted | Io::UnexpectedEof | Io::BrokenPipe => {
                "the server closed the connection while it opened: a TLS listener needs amqps://; RabbitMQ also closes it when its connection limit is reached, which its log says"
            }
            _ => "check the host name and port in amqp.url",
        },
        ErrorKind::ParsingError(_) | ErrorKind::InvalidProtocolVersion(_) => {
            if tls {
                "the server does not speak AMQP 0-9-1 over TLS: is the port the broker's TLS listener, 5671 by default?"
            } else {
                NOT_AMQP
            }
        }
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                "the broker refused the user name or password in amqp.url; RabbitMQ's log says why"
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                "the virtual host in amqp.url's path does not exist, or the user has no permissions on it: rabbitmqctl list_vhosts, list_permissions -p VHOST"
            }
            _ => "the broker refused the connection: its log says why",
        },
        ErrorKind::AuthProviderError(_) => "check the credentials in amqp.url",
        _ => "see the broker's log",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_error_names_the_endpoint_without_credentials_and_the_check_by_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let error = ConnectError::new("AMQPS://user:hunter2@broker.example", refused.into());
        assert_eq!(error.endpoint, "broker.example:5671");
        assert!(error.check.starts_with("nothing listens at that port"));
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = ConnectError::new(
            "amqp://u:p@10.0.0.1:5673/%2f",
            std::io::Error::from(std::io::ErrorKind::InvalidData).into(),
        );
        assert_eq!(
            (error.endpoint.as_str(), error.check),
            ("10.0.0.1:5673", NOT_AMQP)
        );
        let tls = ConnectError::new(
            "amqps://u:p@10.0.0.1:5672/%2f",
            std::io::Error::from(std::io::ErrorKind::InvalidData).into(),
        );
        assert!(tls.check.starts_with("the port did not answer TLS"));
        let refused_login = lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused".into(),
            ),
        ));
        assert!(connect_check(false, &refused_login).contains("user name or password"));
        let unparsable = ConnectError::new(
            "not a url",
            std::io::Error::from(std::io::ErrorKind::TimedOut).into(),
        );
        assert_eq!(unparsable.endpoint, "the configured amqp.url");
        assert!(unparsable.check.starts_with("no answer from the host"));
    }

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
