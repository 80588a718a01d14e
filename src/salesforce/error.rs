//! Salesforce errors and their classification.

use std::time::Duration;

use super::model::{ApiError, HTTP_STATUS_CODE_PREFIX};
use super::signin::SignInRefused;

/// What a Salesforce result means for the message that caused it.
///
/// | class | codes / conditions | why |
/// |---|---|---|
/// | `Success` | 2xx; graph `isSuccessful` | written |
/// | `Superseded` | `FIELD_CUSTOM_VALIDATION_EXCEPTION` whose message is `STALE_BOOKING_VERSION` | the org already holds a newer snapshot; applying ours would regress it |
/// | `Transient` | timeouts and connection errors; HTTP 5xx (also a graph node's `HTTP_5xx`); `SERVER_UNAVAILABLE`, `UNKNOWN_EXCEPTION`, `UNABLE_TO_LOCK_ROW`, `QUERY_TIMEOUT`, `REQUEST_LIMIT_EXCEEDED`, `INVALID_SESSION_ID` (after the one replay with a fresh token), token endpoint failures, a graph whose every node is the `PROCESSING_HALTED` placeholder (never run: Salesforce stops after 14 failed graphs), an undecodable 2xx body | the same request can succeed later, unchanged |
/// | paused (not a class of the message) | the token endpoint refused the grant with an OAuth error (`SalesforceError::sign_in_refused`) | a configuration fault of the tenant's org: the tenant is paused and its bookings wait without spending attempts (`signin`) |
/// | `Permanent` | every other error code, notably `INVALID_FIELD`, `REQUIRED_FIELD_MISSING`, `FIELD_CUSTOM_VALIDATION_EXCEPTION`, `INSUFFICIENT_ACCESS*`, `STRING_TOO_LONG`, `MALFORMED_ID`, `INVALID_CROSS_REFERENCE_KEY`, `DUPLICATE_VALUE`, `NOT_FOUND`, `INVALID_EMAIL_ADDRESS`, `MULTIPLE_CHOICES` (an upsert's 300: the external id matches several records), a `PROCESSING_HALTED` that is not the placeholder (an unresolvable reference), a graph node's `HTTP_4xx` (no error in its body); HTTP 4xx without a known transient code; a request the client refuses to build | retrying the same payload fails the same way: it needs a mapping, data or permission fix, then a replay |
///
/// In a failed graph the classified error is the first node's own error
/// ([`crate::salesforce::model::GraphResult::root_error`]), never a placeholder of the nodes
/// rolled back with it.
///
/// Salesforce publishes no retryability flag per code; this table follows the fact sheet
/// (`salesforce-api.md` §6). An unknown code is permanent, so a surprise lands in the dead
/// letters where ops see it instead of looping through the retry tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Written.
    Success,
    /// Older than what the org holds; drop and count.
    Superseded,
    /// Retry later, no sooner than `retry_after` when Salesforce said so.
    Transient {
        /// From the `Retry-After` header.
        retry_after: Option<Duration>,
    },
    /// Dead-letter.
    Permanent,
}

/// The message of the BookMe package's version-guard validation rule.
pub const STALE_BOOKING_VERSION: &str = "STALE_BOOKING_VERSION";

/// Classifies one Salesforce error object (see the table on [`Class`]).
pub fn classify_api_error(error: &ApiError) -> Class {
    match error.error_code.as_str() {
        "FIELD_CUSTOM_VALIDATION_EXCEPTION" if error.message.contains(STALE_BOOKING_VERSION) => {
            Class::Superseded
        }
        "SERVER_UNAVAILABLE"
        | "UNKNOWN_EXCEPTION"
        | "UNABLE_TO_LOCK_ROW"
        | "QUERY_TIMEOUT"
        | "REQUEST_LIMIT_EXCEEDED"
        | "INVALID_SESSION_ID" => Class::Transient { retry_after: None },
        // Only a placeholder reaches here when the graph was never run (14 failed graphs
        // halted the request): the same graph can succeed later. Any other PROCESSING_HALTED
        // ("Invalid reference specified …") is the node's own, permanent error.
        "PROCESSING_HALTED" if error.is_placeholder() => Class::Transient { retry_after: None },
        code if http_status_of(code).is_some_and(|status| status >= 500) => {
            Class::Transient { retry_after: None }
        }
        _ => Class::Permanent,
    }
}

/// The status of a product-named `HTTP_<status>` code (a node without a Salesforce error).
fn http_status_of(code: &str) -> Option<u16> {
    code.strip_prefix(HTTP_STATUS_CODE_PREFIX)?.parse().ok()
}

/// Classifies an HTTP error response by status and body.
pub fn classify_http(status: u16, errors: &[ApiError], retry_after: Option<Duration>) -> Class {
    if status >= 500 {
        return Class::Transient { retry_after };
    }
    match errors.first().map(classify_api_error) {
        Some(Class::Transient { .. }) => Class::Transient { retry_after },
        Some(class) => class,
        None => Class::Permanent,
    }
}

/// A transport error's text for [`SalesforceError::Transport`]: reqwest's own (`error sending
/// request`), where it went (the origin: scheme, host and port; not the path, which may hold an
/// external id such as an attendee's email, nor the query, which may hold a SOQL query's
/// values), and the causes beneath it (`client error (Connect)`,
/// `tcp connect error`, `Connection refused (os error 111)`), which reqwest's text leaves out
/// and which tell an unreachable org from a refused TLS handshake or a timeout.
pub fn transport_message(error: reqwest::Error) -> String {
    let at = error.url().map(|url| url.origin().ascii_serialization());
    let mut causes: Vec<String> = Vec::new();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        let text = cause.to_string();
        if causes.last() != Some(&text) {
            causes.push(text);
        }
        source = cause.source();
    }
    let mut message = error.without_url().to_string();
    if let Some(at) = at {
        message.push_str(" to ");
        message.push_str(&at);
    }
    for cause in causes {
        message.push_str(": ");
        message.push_str(&cause);
    }
    message
}

/// A failed Salesforce call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SalesforceError {
    /// The request did not complete (connect error, timeout, broken body).
    #[error("{kind} request to Salesforce failed: {message}")]
    Transport {
        /// What the request was for.
        kind: &'static str,
        /// The transport error, without URL query strings or headers ([`transport_message`]).
        message: String,
    },
    /// Salesforce answered with an error status.
    #[error("Salesforce answered {status} to a {kind} request: {}", describe_errors(.errors))]
    Api {
        /// What the request was for.
        kind: &'static str,
        /// HTTP status.
        status: u16,
        /// The error objects of the body.
        errors: Vec<ApiError>,
        /// From `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// The token endpoint refused the grant.
    #[error("Salesforce token request failed ({status}): {error}: {description}")]
    Token {
        /// HTTP status.
        status: u16,
        /// OAuth error code.
        error: String,
        /// OAuth error description.
        description: String,
    },
    /// A 2xx whose body is not what the API documents.
    #[error("unexpected {kind} response body from Salesforce: {message}")]
    Decode {
        /// What the request was for.
        kind: &'static str,
        /// The serde error.
        message: String,
    },
    /// The client refused to send a request (limits, insecure URL, bad credentials reference).
    #[error("refused to send: {0}")]
    Refused(String),
    /// The tenant's `org.api_version` is not among the versions the org offers (`GET
    /// /services/data/`): every resource under it answers 404 `NOT_FOUND` "The requested
    /// resource does not exist", exactly as a missing record or object does, so only the list
    /// tells the two apart (REST API Developer Guide, "Versions").
    #[error(
        "the org does not offer REST API version {version} (org.api_version in the tenant file); it offers {}",
        offered_range(.offered)
    )]
    VersionNotOffered {
        /// The configured version, e.g. `99.0`.
        version: String,
        /// The versions the org lists, oldest first.
        offered: Vec<String>,
    },
}

/// `50.0 to 66.0` for a list of versions, oldest first.
fn offered_range(offered: &[String]) -> String {
    match (offered.first(), offered.last()) {
        (Some(first), Some(last)) if first != last => format!("{first} to {last}"),
        (Some(only), _) => only.clone(),
        _ => "none".to_owned(),
    }
}

impl SalesforceError {
    /// The class of this error (see the table on [`Class`]).
    pub fn class(&self) -> Class {
        match self {
            Self::Transport { .. } | Self::Token { .. } | Self::Decode { .. } => {
                Class::Transient { retry_after: None }
            }
            Self::Api {
                status,
                errors,
                retry_after,
                ..
            } => classify_http(*status, errors, *retry_after),
            Self::Refused(_) | Self::VersionNotOffered { .. } => Class::Permanent,
        }
    }

    /// The first Salesforce error object, when there is one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Self::Api { errors, .. } => errors.first(),
            _ => None,
        }
    }

    /// The refused sign-in, when the token endpoint refused the grant with an OAuth error
    /// (a 4xx with an OAuth body). Checked before [`Self::class`]: a refusal pauses the tenant.
    pub fn sign_in_refused(&self) -> Option<SignInRefused> {
        match self {
            Self::Token {
                status,
                error,
                description,
            } => SignInRefused::from_token_response(*status, error, description),
            _ => None,
        }
    }

    /// True for 401 INVALID_SESSION_ID: the token must be re-minted.
    pub fn is_invalid_session(&self) -> bool {
        matches!(self, Self::Api { status: 401, .. })
    }
}

fn describe_errors(errors: &[ApiError]) -> String {
    if errors.is_empty() {
        return "no error body".to_owned();
    }
    errors
        .iter()
        .map(|e| {
            if e.fields.is_empty() {
                format!("{}: {}", e.error_code, e.message)
            } else {
                format!("{}: {} [{}]", e.error_code, e.message, e.fields.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An org that cannot be reached is named with where the request went and why it failed
    /// (here: refused), without the path or the query, which may hold personal data.
    #[tokio::test]
    async fn a_transport_error_says_where_and_why_and_nothing_personal() {
        // Bound, never listening, held until the end: connections to it are refused.
        let refusing = tokio::net::TcpSocket::new_v4().unwrap();
        refusing.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = refusing.local_addr().unwrap().port();
        for path in [
            "/services/data/v66.0/query?q=SELECT+Id+FROM+Lead+WHERE+Email='jane@globex.example'",
            "/services/data/v66.0/sobjects/Lead/BookMe__Lead_Key__c/acme:jane@globex.example",
        ] {
            let error = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
                .await
                .unwrap_err();
            let message = transport_message(error);
            assert!(
                message.starts_with(&format!(
                    "error sending request to http://127.0.0.1:{port}: "
                )),
                "{message}"
            );
            assert!(message.contains("Connection refused"), "{message}");
            assert!(!message.contains("jane"), "{message}");
        }
    }

    fn err(code: &str, message: &str) -> ApiError {
        ApiError::new(code, message, vec![])
    }

    #[test]
    fn classification_table() {
        let transient = Class::Transient { retry_after: None };
        let cases = [
            (err("UNABLE_TO_LOCK_ROW", "locked"), transient),
            (
                err("REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded."),
                transient,
            ),
            (err("SERVER_UNAVAILABLE", "down"), transient),
            (err("INVALID_FIELD", "No such column"), Class::Permanent),
            (err("REQUIRED_FIELD_MISSING", "LastName"), Class::Permanent),
            (err("STRING_TOO_LONG", "too long"), Class::Permanent),
            (
                err("INSUFFICIENT_ACCESS_OR_READONLY", "no"),
                Class::Permanent,
            ),
            (
                err("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Budget too low"),
                Class::Permanent,
            ),
            (
                err("FIELD_CUSTOM_VALIDATION_EXCEPTION", STALE_BOOKING_VERSION),
                Class::Superseded,
            ),
            (err("SOMETHING_NEW", "?"), Class::Permanent),
            (err("MULTIPLE_CHOICES", "2 records"), Class::Permanent),
            (
                err(
                    "PROCESSING_HALTED",
                    crate::salesforce::model::ROLLED_BACK_MESSAGE,
                ),
                transient,
            ),
            (
                err(
                    "PROCESSING_HALTED",
                    "Invalid reference specified. No value for a.id",
                ),
                Class::Permanent,
            ),
            (err("HTTP_404", "no body"), Class::Permanent),
            (err("HTTP_503", "no body"), transient),
        ];
        for (error, expected) in cases {
            assert_eq!(classify_api_error(&error), expected, "{}", error.error_code);
        }
    }

    #[test]
    fn http_status_classification_honours_retry_after() {
        let wait = Some(Duration::from_secs(7));
        assert_eq!(
            classify_http(503, &[], wait),
            Class::Transient { retry_after: wait }
        );
        assert_eq!(
            classify_http(403, &[err("REQUEST_LIMIT_EXCEEDED", "x")], wait),
            Class::Transient { retry_after: wait }
        );
        assert_eq!(
            classify_http(404, &[err("NOT_FOUND", "x")], None),
            Class::Permanent
        );
    }
}
