//! Opening a connection to the broker, and saying what to check when it does not open.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// How long opening a connection may take: name resolution, TCP, TLS and the AMQP handshake
/// together. A port that accepts the connection and never answers (another service waiting for
/// its client to speak first) would otherwise hold the caller for ever: lapin's own
/// `connection_timeout` does not bound its asynchronous connect. RabbitMQ allows 5 s for a TLS
/// handshake and 10 s for the AMQP one (`ssl_handshake_timeout`, `handshake_timeout`); the rest
/// is room for a busy broker's accept backlog.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Set when a connect timed out, cleared when one opens. A timed-out lapin connect leaves its
/// I/O thread and socket waiting for the peer to close, which a silent port never does; while
/// this is set, a connect first asks the port with a socket of its own ([`answers`]) and lets
/// lapin in only once the port answers, so a retry loop against such a port holds nothing (a
/// broker that answers the probe logs its connection as closed by the client, or for a TLS
/// listener a failed handshake, once per connect until one opens). One flag per process: a
/// process talks to one broker.
static LAST_TIMED_OUT: AtomicBool = AtomicBool::new(false);

/// Connects with heartbeats (added to the URL unless its query sets them), within
/// [`CONNECT_TIMEOUT`]. The URL holds a password, so it never appears in an error: lapin's
/// errors do not include it, and neither do ours.
///
/// # Errors
/// [`ConnectError`]: the connection did not open, with what to check first.
pub async fn connect(
    url: &SecretString,
    heartbeat_secs: u16,
    name: &str,
) -> Result<Connection, ConnectError> {
    let url = url.expose_secret();
    let timed_out = || -> lapin::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within {} s (name resolution, TCP, TLS and the AMQP handshake)",
                CONNECT_TIMEOUT.as_secs()
            ),
        )
        .into()
    };
    if LAST_TIMED_OUT.load(Ordering::Relaxed)
        && let Some((host, port, _)) = endpoint(url)
        && let Err(error) = answers(&host, port, CONNECT_TIMEOUT).await
    {
        let error = if error.kind() == std::io::ErrorKind::TimedOut {
            timed_out()
        } else {
            error.into()
        };
        return Err(ConnectError::new(url, error));
    }
    let uri = with_heartbeat(url, heartbeat_secs);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let opened =
        match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&uri, properties)).await {
            Ok(opened) => opened,
            Err(_) => {
                LAST_TIMED_OUT.store(true, Ordering::Relaxed);
                Err(timed_out())
            }
        };
    if opened.is_ok() {
        LAST_TIMED_OUT.store(false, Ordering::Relaxed);
    }
    opened.map_err(|error| ConnectError::new(url, error))
}

/// Whether the port at `host:port` answers the AMQP protocol header within `wait`: connects,
/// sends `AMQP 0 0 9 1` (AMQP 0-9-1 §4.2.2) and waits for any answer — the first byte, or the
/// peer closing the connection. An AMQP listener answers with its `connection.start` (or its
/// own header); a TLS listener, which the header is not a handshake to, with an alert or by
/// closing; a silent port not at all. The socket is closed when this returns, whatever
/// happened.
async fn answers(host: &str, port: u16, wait: Duration) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let asked = async {
        let mut socket = tokio::net::TcpStream::connect((host, port)).await?;
        socket.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut first = [0u8; 1];
        socket.read(&mut first).await.map(drop)
    };
    tokio::time::timeout(wait, asked)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The host, port (the scheme's default when the URL names none) and TLS-ness of an AMQP URL.
fn endpoint(url: &str) -> Option<(String, u16, bool)> {
    let tls = url
        .get(..6)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps:"));
    let parsed = url::Url::parse(url).ok()?;
    let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
    let host = parsed.host_str().unwrap_or("localhost");
    // A bracketed IPv6 literal is connected to without its brackets.
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Some((host, port, tls))
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

/// A connection to the broker that did not open: where to (`host:port`, never the credentials),
/// lapin's error, and what an operator should check first for that kind of failure.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to the broker at {endpoint}: {error} — check: {check}")]
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
        let (endpoint, tls) = match endpoint(url) {
            Some((host, port, tls)) if host.contains(':') => (format!("[{host}]:{port}"), tls),
            Some((host, port, tls)) => (format!("{host}:{port}"), tls),
            None => ("the configured amqp.url".to_owned(), false),
        };
        Self {
            endpoint,
            check: connect_check(tls, &error),
            error,
        }
    }
}

/// What to check first when a connection with a TLS (`amqps://`) or plain URL failed with
/// `error`, by kind:
/// - nothing listening (TCP refused) or no answer (timeouts, unreachable networks);
/// - a plain client on a TLS or non-AMQP port: lapin cannot parse the answer (a TLS alert, an
///   HTTP status line); a TLS client on a plain port: rustls reads the broker's protocol header
///   as a corrupt record, or the broker resets the connection — every TLS failure reaches us as
///   an `InvalidData` I/O error carrying the [`rustls::Error`] (rustls-connector's
///   documentation), which tells a port that is not TLS from a refused certificate;
/// - the broker closing the connection with `ACCESS_REFUSED` (403: user name or password) or
///   `NOT_ALLOWED` (530: the virtual host does not exist, the user has no permissions on it, or a
///   connection limit of the vhost or user is reached; the broker's text says which) —
///   RabbitMQ's <https://www.rabbitmq.com/docs/troubleshooting-networking>,
///   <https://www.rabbitmq.com/docs/access-control> and
///   <https://www.rabbitmq.com/docs/vhosts#limits>.
pub fn connect_check(tls: bool, error: &lapin::Error) -> &'static str {
    use lapin::ErrorKind;
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use std::io::ErrorKind as Io;
    match error.kind() {
        ErrorKind::IOError(e) => match e.kind() {
            Io::ConnectionRefused => {
                "nothing listens at that port: is RabbitMQ running (README, set-up), and is the port its AMQP listener, 5672, or 5671 for amqps://?"
            }
            Io::InvalidData if tls => tls_check(e),
            Io::TimedOut | Io::HostUnreachable | Io::NetworkUnreachable => {
                "no answer in time: is the port RabbitMQ's AMQP listener (5672, or 5671 for amqps://) and the host reachable through any firewall between?"
            }
            Io::ConnectionReset | Io::ConnectionAborted | Io::UnexpectedEof | Io::BrokenPipe => {
                if tls {
                    NOT_TLS
                } else {
                    "the server closed the connection as it opened: is the port RabbitMQ's AMQP listener, 5672? A TLS listener needs amqps://"
                }
            }
            _ => "the host name and port in amqp.url",
        },
        ErrorKind::ParsingError(_) | ErrorKind::InvalidProtocolVersion(_) => {
            if tls {
                "the server does not speak AMQP 0-9-1 over TLS: is the port the broker's TLS listener, 5671 by default?"
            } else {
                "the server's answer is not AMQP 0-9-1: is the port RabbitMQ's AMQP listener, 5672? A TLS listener needs amqps://"
            }
        }
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                "the broker refused the user name or password in amqp.url; RabbitMQ's log says why"
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => {
                "the broker's text says which: a virtual host in amqp.url's path that does not exist or on which the user has no permissions (rabbitmqctl list_vhosts, list_permissions -p VHOST), or a connection limit of the vhost or user"
            }
            _ => "the broker refused the connection: its log says why",
        },
        ErrorKind::AuthProviderError(_) => "check the credentials in amqp.url",
        _ => "see the broker's log",
    }
}

/// A TLS client whose peer does not speak TLS.
const NOT_TLS: &str = "the port did not answer TLS: amqps:// needs the broker's TLS listener, 5671 by default; a plain listener, 5672, needs amqp://";

/// The check for a TLS handshake that failed with `error` (an `InvalidData` I/O error).
fn tls_check(error: &std::io::Error) -> &'static str {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. },
        ) => NOT_TLS,
        Some(rustls::Error::InvalidCertificate(_)) => {
            "the broker's TLS certificate was refused: the host in amqp.url must be a name in the certificate, the certificate must be valid today, and its CA trusted by this machine"
        }
        Some(rustls::Error::AlertReceived(_) | rustls::Error::PeerIncompatible(_)) => {
            "the broker refused the TLS handshake: compare its listener's TLS versions, ciphers and client-certificate settings with this client's"
        }
        _ => "the TLS handshake failed: the error says why",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> lapin::Error {
        std::io::Error::from(kind).into()
    }

    fn tls(error: rustls::Error) -> lapin::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, error).into()
    }

    #[test]
    fn a_connect_error_names_the_endpoint_without_credentials_and_the_check_by_kind() {
        let refused = ConnectError::new(
            "AMQPS://user:hunter2@broker.example",
            io(std::io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(refused.endpoint, "broker.example:5671");
        assert!(refused.check.starts_with("nothing listens at that port"));
        assert!(!refused.to_string().contains("hunter2"), "{refused}");

        let reset = ConnectError::new(
            "amqps://u:p@10.0.0.1:5672/%2f",
            io(std::io::ErrorKind::ConnectionReset),
        );
        assert_eq!(
            (reset.endpoint.as_str(), reset.check),
            ("10.0.0.1:5672", NOT_TLS)
        );
        let plain_reset = connect_check(false, &io(std::io::ErrorKind::ConnectionReset));
        assert!(plain_reset.contains("A TLS listener needs amqps://"));

        let login = lapin::Error::from(lapin::ErrorKind::ProtocolError(
            lapin::protocol::AMQPError::new(
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED),
                "ACCESS_REFUSED - Login was refused".into(),
            ),
        ));
        assert!(connect_check(false, &login).contains("user name or password"));

        let unparsable = ConnectError::new("not a url", io(std::io::ErrorKind::TimedOut));
        assert_eq!(unparsable.endpoint, "the configured amqp.url");
        let v6 = ConnectError::new("amqp://[::1]", io(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(v6.endpoint, "[::1]:5672");
        assert!(unparsable.check.starts_with("no answer in time"));
    }

    #[test]
    fn a_tls_failure_is_told_from_a_port_that_is_not_tls() {
        let corrupt = tls(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(connect_check(true, &corrupt), NOT_TLS);
        let certificate = tls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert!(connect_check(true, &certificate).starts_with("the broker's TLS certificate"));
        let alert = tls(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure,
        ));
        assert!(connect_check(true, &alert).starts_with("the broker refused the TLS handshake"));
        let other = tls(rustls::Error::General("x".into()));
        assert_eq!(
            connect_check(true, &other),
            "the TLS handshake failed: the error says why"
        );
    }

    #[tokio::test]
    async fn a_port_is_asked_for_an_answer_on_a_socket_of_its_own() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_port = silent.local_addr().unwrap().port();
        let answering = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let answering_port = answering.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
            }
        });
        let heard = tokio::spawn(async move {
            let (mut socket, _) = answering.accept().await.unwrap();
            let mut header = [0u8; 8];
            socket.read_exact(&mut header).await.unwrap();
            socket.write_all(b"\x01").await.unwrap();
            header
        });
        let wait = Duration::from_millis(300);
        let silence = answers("127.0.0.1", silent_port, wait).await.unwrap_err();
        assert_eq!(silence.kind(), std::io::ErrorKind::TimedOut);
        answers("127.0.0.1", answering_port, wait).await.unwrap();
        assert_eq!(&heard.await.unwrap(), b"AMQP\x00\x00\x09\x01");
        // Bound and never listening, held until the end: a freed port could be taken by a
        // listener of a test running beside this one.
        let held = tokio::net::TcpSocket::new_v4().unwrap();
        held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let closed = held.local_addr().unwrap().port();
        // A port that closes on the header (as a TLS listener may) has answered.
        let closing = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closing_port = closing.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = closing.accept().await.unwrap();
            let mut header = [0u8; 8];
            let _ = socket.read_exact(&mut header).await;
        });
        answers("127.0.0.1", closing_port, wait).await.unwrap();
        let refused = answers("127.0.0.1", closed, wait).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(
            endpoint("amqp://u:p@[::1]:5673/%2f"),
            Some(("::1".to_owned(), 5673, false))
        );
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
