//! The fate of every message, decided in one exhaustive match ([`decide`]): written and
//! superseded messages are acked, transient failures go to the next retry tier, permanent ones
//! to the dead letters.
//!
//! | outcome / failure | disposition | reason |
//! |---|---|---|
//! | written | ack | — |
//! | already applied (ledger), collapsed in the batch | ack, superseded | — |
//! | invalid event | dead letter | `invalid_event` |
//! | unknown tenant | dead letter | `unknown_tenant` |
//! | mapping cannot render | dead letter | `mapping_error` |
//! | circuit open | retry, not before the next probe | `circuit_open` |
//! | sign-in refused (token endpoint 4xx with an OAuth error), or the tenant paused for it | wait: a retry tier, attempt count unchanged | `salesforce_auth_<error>` |
//! | the tenant's `org.api_version` is not offered by its org (its requests answer 404) | wait: the first tier of at least 5 min, attempt count unchanged | `salesforce_api_version_not_offered` |
//! | the tenant has its limit of messages in flight | wait: the first retry tier, attempt count unchanged | `tenant_busy` |
//! | worker shutting down | retry | `shutting_down` |
//! | record-level security (sharing) refused a node | dead letter | `salesforce_sharing_<condition>` |
//! | Salesforce request failed / graph rolled back | by [`Class`]: success → ack; superseded (`STALE_BOOKING_VERSION`) → ack; transient → retry; permanent → dead letter | `salesforce_<code>`, or `salesforce_unavailable` without a code |

use super::reason::Reason;
use crate::pipeline::{Failure, Outcome};
use crate::salesforce::error::classify_api_error;
use crate::salesforce::model::ApiError;
use crate::salesforce::{Class, SalesforceError};
use crate::sharing::SharingProblem;

/// Why a message was retried or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The bounded reason code.
    pub reason: Reason,
    /// What happened, for people.
    pub message: String,
    /// Salesforce's error, when it refused.
    pub salesforce: Option<ApiError>,
}

impl Cause {
    /// A cause without a Salesforce error.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            salesforce: None,
        }
    }
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
        /// Why.
        cause: Cause,
        /// The earliest useful retry (Salesforce's `Retry-After`, the breaker's next probe).
        retry_after: Option<std::time::Duration>,
    },
    /// Permanent failure: dead letter.
    DeadLetter(Cause),
    /// The tenant is paused for a fault no retry of this message can fix (Salesforce refuses
    /// its sign-in): to the first tier that lasts `retry_after`, the attempt count unchanged,
    /// so a pause spends no attempt and never ends in `retries_exhausted`.
    Wait {
        /// Why the tenant is paused.
        cause: Cause,
        /// Until the tenant's next probe.
        retry_after: Option<std::time::Duration>,
    },
}

/// How long a booking waits while its tenant's API version is not offered: a tenant file is
/// fixed by a person, so the booking goes to a long tier rather than cycle every few seconds.
const VERSION_FIX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The disposition of a processed message; the one place a message's fate is decided.
pub fn decide(outcome: Outcome) -> Disposition {
    match outcome {
        Outcome::Written => Disposition::Written,
        Outcome::AlreadyApplied | Outcome::Collapsed => Disposition::Superseded,
        Outcome::Failed(failure) => match failure {
            Failure::InvalidEvent(invalid) => {
                Disposition::DeadLetter(Cause::new(Reason::InvalidEvent, invalid.to_string()))
            }
            Failure::UnknownTenant(tenant) => Disposition::DeadLetter(Cause::new(
                Reason::UnknownTenant,
                format!("tenant {tenant:?} is not configured"),
            )),
            Failure::Mapping(error) => {
                Disposition::DeadLetter(Cause::new(Reason::MappingError, error.to_string()))
            }
            Failure::CircuitOpen(open) => match open.sign_in {
                Some(code) => Disposition::Wait {
                    cause: Cause::new(Reason::SignInRefused(code), open.to_string()),
                    retry_after: Some(open.retry_in),
                },
                // Wait at least until the next probe: an earlier return would only spend an
                // attempt.
                None => Disposition::Retry {
                    cause: Cause::new(Reason::CircuitOpen, open.to_string()),
                    retry_after: Some(open.retry_in),
                },
            },
            Failure::TenantBusy(busy) => Disposition::Wait {
                cause: Cause::new(Reason::TenantBusy, busy.to_string()),
                retry_after: None,
            },
            Failure::ShuttingDown(stopped) => Disposition::Retry {
                cause: Cause::new(Reason::ShuttingDown, stopped.to_string()),
                retry_after: None,
            },
            Failure::Salesforce(error) => match error.sign_in_refused() {
                Some(refused) => Disposition::Wait {
                    cause: Cause::new(Reason::SignInRefused(refused.code), refused.to_string()),
                    retry_after: None,
                },
                // A fault of the tenant file, not of this booking: it waits for the fix.
                None if matches!(*error, SalesforceError::VersionNotOffered { .. }) => {
                    Disposition::Wait {
                        cause: Cause::new(Reason::ApiVersionNotOffered, error.to_string()),
                        retry_after: Some(VERSION_FIX_WAIT),
                    }
                }
                None => by_class(error.class(), error.api_error().cloned(), error.to_string()),
            },
            Failure::Sharing { problem, cause } => Disposition::DeadLetter(Cause {
                reason: match problem {
                    SharingProblem::RecordNotVisible { .. } => Reason::SharingRecordNotVisible,
                    SharingProblem::RecordReadOnly { .. } => Reason::SharingRecordReadOnly,
                    SharingProblem::ReferenceNotVisible { .. } => {
                        Reason::SharingReferenceNotVisible
                    }
                },
                message: problem.to_string(),
                salesforce: cause,
            }),
            Failure::Rejected { cause } => {
                // A rolled-back graph without a named error is Salesforce's trouble, not ours.
                let class = cause
                    .as_ref()
                    .map_or(Class::Transient { retry_after: None }, classify_api_error);
                let message = rolled_back_message(cause.as_ref());
                by_class(class, cause, message)
            }
        },
    }
}

fn rolled_back_message(error: Option<&ApiError>) -> String {
    match error {
        None => "Salesforce rolled the booking back".into(),
        Some(e) if e.fields.is_empty() => format!(
            "Salesforce rolled the booking back: {}: {}",
            e.error_code, e.message
        ),
        Some(e) => format!(
            "Salesforce rolled the booking back: {}: {} [{}]",
            e.error_code,
            e.message,
            e.fields.join(", ")
        ),
    }
}

/// Maps a Salesforce class and error to the disposition.
fn by_class(class: Class, error: Option<ApiError>, message: String) -> Disposition {
    let reason = error.as_ref().map_or(Reason::SalesforceUnavailable, |e| {
        Reason::salesforce(&e.error_code)
    });
    let cause = Cause {
        reason,
        message,
        salesforce: error,
    };
    match class {
        Class::Success => Disposition::Written,
        Class::Superseded => Disposition::Superseded,
        Class::Transient { retry_after } => Disposition::Retry { cause, retry_after },
        Class::Permanent => Disposition::DeadLetter(cause),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::batch::BatcherStopped;
    use crate::event::InvalidEvent;
    use crate::plan::PlanError;
    use crate::salesforce::SalesforceError;
    use crate::salesforce::circuit::CircuitOpen;
    use crate::salesforce::error::STALE_BOOKING_VERSION;
    use crate::salesforce::signin::OAuthErrorCode;

    fn request_failure(error: SalesforceError) -> Outcome {
        Outcome::Failed(Failure::Salesforce(std::sync::Arc::new(error)))
    }

    fn api(code: &str, message: &str) -> ApiError {
        ApiError::new(code, message, vec!["Email".into()])
    }

    /// What a disposition is, without its message: kind, reason label, earliest retry.
    type Shape = (&'static str, Option<String>, Option<Duration>);

    fn shape(d: &Disposition) -> Shape {
        match d {
            Disposition::Written => ("ack", None, None),
            Disposition::Superseded => ("superseded", None, None),
            Disposition::Retry { cause, retry_after } => {
                ("retry", Some(cause.reason.label()), *retry_after)
            }
            Disposition::DeadLetter(cause) => ("dead_letter", Some(cause.reason.label()), None),
            Disposition::Wait { cause, retry_after } => {
                ("wait", Some(cause.reason.label()), *retry_after)
            }
        }
    }

    #[test]
    fn every_outcome_has_its_disposition() {
        let wait = Some(Duration::from_secs(9));
        type Expected = (&'static str, Option<&'static str>, Option<Duration>);
        let cases: Vec<(Outcome, Expected)> = vec![
            (Outcome::Written, ("ack", None, None)),
            (Outcome::AlreadyApplied, ("superseded", None, None)),
            (Outcome::Collapsed, ("superseded", None, None)),
            (
                Outcome::Failed(Failure::InvalidEvent(InvalidEvent {
                    field: "data.starts_at".into(),
                    reason: "missing".into(),
                })),
                ("dead_letter", Some("invalid_event"), None),
            ),
            (
                Outcome::Failed(Failure::UnknownTenant("nobody".into())),
                ("dead_letter", Some("unknown_tenant"), None),
            ),
            (
                Outcome::Failed(Failure::Mapping(PlanError {
                    record: "lead".into(),
                    field: "LastName".into(),
                    message: "undefined".into(),
                })),
                ("dead_letter", Some("mapping_error"), None),
            ),
            (
                Outcome::Failed(Failure::TenantBusy(crate::tenants::TenantBusy {
                    limit: 600,
                })),
                ("wait", Some("tenant_busy"), None),
            ),
            (
                Outcome::Failed(Failure::CircuitOpen(CircuitOpen {
                    retry_in: Duration::from_secs(9),
                    sign_in: None,
                })),
                ("retry", Some("circuit_open"), wait),
            ),
            (
                Outcome::Failed(Failure::CircuitOpen(CircuitOpen {
                    retry_in: Duration::from_secs(9),
                    sign_in: Some(OAuthErrorCode::InactiveUser),
                })),
                ("wait", Some("salesforce_auth_inactive_user"), wait),
            ),
            (
                request_failure(SalesforceError::Token {
                    status: 400,
                    error: "invalid_grant".into(),
                    description: "user hasn't approved this consumer".into(),
                }),
                ("wait", Some("salesforce_auth_invalid_grant"), None),
            ),
            (
                request_failure(SalesforceError::Token {
                    status: 503,
                    error: "unexpected_response".into(),
                    description: "Service Unavailable".into(),
                }),
                ("retry", Some("salesforce_unavailable"), None),
            ),
            (
                request_failure(SalesforceError::VersionNotOffered {
                    version: "99.0".into(),
                    offered: vec!["50.0".into(), "67.0".into()],
                }),
                (
                    "wait",
                    Some("salesforce_api_version_not_offered"),
                    Some(VERSION_FIX_WAIT),
                ),
            ),
            (
                Outcome::Failed(Failure::ShuttingDown(BatcherStopped("acme".into()))),
                ("retry", Some("shutting_down"), None),
            ),
            (
                request_failure(SalesforceError::Transport {
                    kind: "graph",
                    message: "timed out".into(),
                }),
                ("retry", Some("salesforce_unavailable"), None),
            ),
            (
                request_failure(SalesforceError::Api {
                    kind: "graph",
                    status: 403,
                    errors: vec![api(
                        "REQUEST_LIMIT_EXCEEDED",
                        "TotalRequests Limit exceeded.",
                    )],
                    retry_after: wait,
                }),
                ("retry", Some("salesforce_request_limit_exceeded"), wait),
            ),
            (
                request_failure(SalesforceError::Api {
                    kind: "graph",
                    status: 400,
                    errors: vec![api("INVALID_FIELD", "No such column")],
                    retry_after: None,
                }),
                ("dead_letter", Some("salesforce_invalid_field"), None),
            ),
            (
                request_failure(SalesforceError::Refused("over the node limit".into())),
                ("dead_letter", Some("salesforce_unavailable"), None),
            ),
            (
                Outcome::Failed(Failure::Rejected {
                    cause: Some(api(
                        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                        STALE_BOOKING_VERSION,
                    )),
                }),
                ("superseded", None, None),
            ),
            (
                Outcome::Failed(Failure::Rejected {
                    cause: Some(api(
                        "UNABLE_TO_LOCK_ROW",
                        "unable to obtain exclusive access",
                    )),
                }),
                ("retry", Some("salesforce_unable_to_lock_row"), None),
            ),
            (
                Outcome::Failed(Failure::Rejected {
                    cause: Some(api("STRING_TOO_LONG", "Company: data value too large")),
                }),
                ("dead_letter", Some("salesforce_string_too_long"), None),
            ),
            (
                Outcome::Failed(Failure::Rejected {
                    cause: Some(api("BRAND_NEW_CODE", "?")),
                }),
                ("dead_letter", Some("salesforce_other"), None),
            ),
            (
                Outcome::Failed(Failure::Sharing {
                    problem: SharingProblem::RecordReadOnly {
                        sobject: "Event".into(),
                    },
                    cause: Some(api(
                        "INSUFFICIENT_ACCESS_OR_READONLY",
                        "insufficient access rights on object id",
                    )),
                }),
                (
                    "dead_letter",
                    Some("salesforce_sharing_record_read_only"),
                    None,
                ),
            ),
            (
                Outcome::Failed(Failure::Rejected { cause: None }),
                ("retry", Some("salesforce_unavailable"), None),
            ),
        ];
        for (outcome, (kind, reason, retry_after)) in cases {
            let name = format!("{outcome:?}");
            let decided = decide(outcome);
            assert_eq!(
                shape(&decided),
                (kind, reason.map(str::to_owned), retry_after),
                "{name}"
            );
        }
    }

    #[test]
    fn a_rolled_back_graph_names_the_error_and_its_fields() {
        let Disposition::DeadLetter(cause) = decide(Outcome::Failed(Failure::Rejected {
            cause: Some(api("INVALID_EMAIL_ADDRESS", "Email: invalid email address")),
        })) else {
            panic!("a permanent error is dead-lettered")
        };
        assert_eq!(
            cause.message,
            "Salesforce rolled the booking back: INVALID_EMAIL_ADDRESS: Email: invalid email address [Email]"
        );
        assert_eq!(
            cause.salesforce.map(|e| e.error_code),
            Some("INVALID_EMAIL_ADDRESS".to_owned())
        );
    }
}
