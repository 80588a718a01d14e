//! Why a message was not written: one bounded set of reason codes, shared by the dead-letter
//! headers (`x-portals-reason`), the `reason` label of `portals_crm_dead_letters_total`, the
//! alert rules and README's reason table. Strings exist only at those edges: [`Reason::label`]
//! renders one, [`Reason::parse`] reads one back from a dead letter.

use std::fmt;

use crate::salesforce::signin::OAuthErrorCode;

/// Salesforce error codes that get a reason of their own (`salesforce_<code>` in lower case).
/// Salesforce's list of `StatusCode` values runs to several hundred and grows with each release;
/// a code outside this list is reported as `salesforce_other` (the code itself still travels in
/// `x-portals-sf-error-code` and in the message), so a label set stays bounded for Prometheus.
/// Source: the codes the fact sheet (`salesforce-api.md` §6) classifies, and the ones the
/// emulator reproduces.
const SALESFORCE_CODES: &[&str] = &[
    "API_CURRENTLY_DISABLED",
    "API_DISABLED_FOR_ORG",
    "CANNOT_INSERT_UPDATE_ACTIVATE_ENTITY",
    "DUPLICATE_VALUE",
    "DUPLICATES_DETECTED",
    "ENTITY_IS_DELETED",
    "FIELD_CUSTOM_VALIDATION_EXCEPTION",
    "FIELD_INTEGRITY_EXCEPTION",
    "HTTP_ERROR",
    "INSUFFICIENT_ACCESS",
    "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
    "INSUFFICIENT_ACCESS_OR_READONLY",
    "INVALID_CROSS_REFERENCE_KEY",
    "INVALID_EMAIL_ADDRESS",
    "INVALID_FIELD",
    "INVALID_FIELD_FOR_INSERT_UPDATE",
    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
    "INVALID_SESSION_ID",
    "INVALID_TYPE",
    "JSON_PARSER_ERROR",
    "MALFORMED_ID",
    "MULTIPLE_CHOICES",
    "NOT_FOUND",
    "NUMBER_OUTSIDE_VALID_RANGE",
    "PROCESSING_HALTED",
    "QUERY_TIMEOUT",
    "REQUEST_LIMIT_EXCEEDED",
    "REQUIRED_FIELD_MISSING",
    "SERVER_UNAVAILABLE",
    "STORAGE_LIMIT_EXCEEDED",
    "STRING_TOO_LONG",
    "UNABLE_TO_LOCK_ROW",
    "UNKNOWN_EXCEPTION",
];

/// A Salesforce error code from the bounded list above, or `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SalesforceCode {
    /// One of the listed codes (upper case, as Salesforce writes it).
    Known(&'static str),
    /// Any other code.
    Other,
}

impl SalesforceCode {
    /// The bounded code for Salesforce's `errorCode`. A node answered with a bare HTTP status
    /// (`HTTP_<status>`, see [`crate::salesforce::model::SubrequestResult::node_error`]) counts
    /// as `HTTP_ERROR`, whatever the status.
    pub fn of(error_code: &str) -> Self {
        if error_code.starts_with("HTTP_") {
            return Self::Known("HTTP_ERROR");
        }
        SALESFORCE_CODES
            .iter()
            .find(|known| known.eq_ignore_ascii_case(error_code))
            .map_or(Self::Other, |known| Self::Known(known))
    }
}

/// Why a message was retried or dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The body is not a valid booking event (`invalid_event`).
    InvalidEvent,
    /// The event's tenant is not configured (`unknown_tenant`).
    UnknownTenant,
    /// The tenant's mapping cannot render this event (`mapping_error`).
    MappingError,
    /// The tenant's org is paused by its circuit breaker (`circuit_open`).
    CircuitOpen,
    /// The worker stopped before the booking was sent (`shutting_down`).
    ShuttingDown,
    /// The org could not be reached or answered without an error code (`salesforce_unavailable`).
    SalesforceUnavailable,
    /// Salesforce refused with this error code (`salesforce_<code>`).
    Salesforce(SalesforceCode),
    /// Salesforce's token endpoint refuses the integration user's sign-in
    /// (`salesforce_auth_<OAuth error>`): the tenant is paused.
    SignInRefused(OAuthErrorCode),
    /// The tenant's `org.api_version` is not a version its org offers
    /// (`salesforce_api_version_not_offered`): every request answers 404, so the tenant's
    /// bookings wait in the retry tiers, spending no attempt, until the tenant file is fixed.
    ApiVersionNotOffered,
    /// Record-level security: an upsert by external id did not see the record it should update
    /// (owned by someone else, not shared) and collided inserting a new one
    /// (`salesforce_sharing_record_not_visible`).
    SharingRecordNotVisible,
    /// Record-level security: the record is visible but read-only
    /// (`salesforce_sharing_record_read_only`).
    SharingRecordReadOnly,
    /// Record-level security: a lookup names a record the user cannot see
    /// (`salesforce_sharing_reference_not_visible`).
    SharingReferenceNotVisible,
    /// The tenant had its limit of messages in flight in this worker (`tenant_busy`): the
    /// message is parked in the first retry tier without spending an attempt, so that one
    /// tenant's slow org cannot hold the prefetch window every tenant shares.
    TenantBusy,
    /// Every retry tier was used (`retries_exhausted`).
    RetriesExhausted,
    /// The broker dead-lettered the message itself at the queue's delivery limit
    /// (`delivery_limit`; no portals-crm header on it).
    DeliveryLimit,
    /// The broker dead-lettered it: a consumer rejected it without requeue (`broker_rejected`).
    BrokerRejected,
    /// The broker dead-lettered it: its TTL ran out (`broker_expired`).
    BrokerExpired,
    /// The broker dead-lettered it: the queue was over its length limit (`broker_maxlen`).
    BrokerMaxlen,
    /// The broker dead-lettered it for a reason newer than this list (`broker_other`).
    BrokerOther,
    /// A message in the dead-letter queue that neither portals-crm nor the broker annotated
    /// (`unknown`): someone published it there.
    Unrecognised,
}

impl Reason {
    /// The reason for Salesforce's `errorCode`.
    pub fn salesforce(error_code: &str) -> Self {
        Self::Salesforce(SalesforceCode::of(error_code))
    }

    /// The label: a header value and metric label.
    pub fn label(self) -> String {
        match self {
            Self::InvalidEvent => "invalid_event".into(),
            Self::UnknownTenant => "unknown_tenant".into(),
            Self::MappingError => "mapping_error".into(),
            Self::CircuitOpen => "circuit_open".into(),
            Self::ShuttingDown => "shutting_down".into(),
            Self::SalesforceUnavailable => "salesforce_unavailable".into(),
            Self::Salesforce(SalesforceCode::Known(code)) => {
                format!("salesforce_{}", code.to_ascii_lowercase())
            }
            Self::Salesforce(SalesforceCode::Other) => "salesforce_other".into(),
            Self::SignInRefused(code) => code.reason_code().into(),
            Self::ApiVersionNotOffered => "salesforce_api_version_not_offered".into(),
            Self::SharingRecordNotVisible => "salesforce_sharing_record_not_visible".into(),
            Self::SharingRecordReadOnly => "salesforce_sharing_record_read_only".into(),
            Self::SharingReferenceNotVisible => "salesforce_sharing_reference_not_visible".into(),
            Self::TenantBusy => "tenant_busy".into(),
            Self::RetriesExhausted => "retries_exhausted".into(),
            Self::DeliveryLimit => "delivery_limit".into(),
            Self::BrokerRejected => "broker_rejected".into(),
            Self::BrokerExpired => "broker_expired".into(),
            Self::BrokerMaxlen => "broker_maxlen".into(),
            Self::BrokerOther => "broker_other".into(),
            Self::Unrecognised => "unknown".into(),
        }
    }

    /// Every label, for README's table and the tests.
    pub fn all() -> Vec<Self> {
        let mut all = vec![
            Self::InvalidEvent,
            Self::UnknownTenant,
            Self::MappingError,
            Self::CircuitOpen,
            Self::ShuttingDown,
            Self::SalesforceUnavailable,
            Self::TenantBusy,
            Self::RetriesExhausted,
            Self::DeliveryLimit,
            Self::BrokerRejected,
            Self::BrokerExpired,
            Self::BrokerMaxlen,
            Self::BrokerOther,
            Self::Unrecognised,
            Self::Salesforce(SalesforceCode::Other),
            Self::ApiVersionNotOffered,
            Self::SharingRecordNotVisible,
            Self::SharingRecordReadOnly,
            Self::SharingReferenceNotVisible,
        ];
        all.extend(OAuthErrorCode::ALL.into_iter().map(Self::SignInRefused));
        all.extend(
            SALESFORCE_CODES
                .iter()
                .map(|c| Self::Salesforce(SalesforceCode::Known(c))),
        );
        all
    }

    /// The reason a label names, if it is one of ours.
    pub fn parse(label: &str) -> Option<Self> {
        Self::all().into_iter().find(|r| r.label() == label)
    }

    /// Whether `value`, typed by someone to filter dead letters (`dlq --reason`, the
    /// console's filter), is a label; if not, the error says which labels it resembles: a near
    /// miss, Salesforce's code as a message shows it (`INVALID_FIELD`), or a part of a label
    /// (`rejected`, `sharing_record`).
    ///
    /// # Errors
    /// `not a reason code (did you mean …?); …`, for people.
    pub fn check_label(value: &str) -> Result<(), String> {
        if Self::parse(value).is_some() {
            return Ok(());
        }
        let typed = value.trim().to_ascii_lowercase();
        let labels: Vec<String> = Self::all().into_iter().map(Self::label).collect();
        let mut close: Vec<&str> = labels
            .iter()
            .filter(|label| {
                label.strip_prefix("salesforce_") == Some(typed.as_str())
                    || strsim::damerau_levenshtein(&typed, label) <= 2
                    || (typed.len() >= 5 && label.contains(&typed))
            })
            .map(String::as_str)
            .collect();
        close.sort_by_key(|label| (label.len(), *label));
        close.truncate(5);
        let hint = if !close.is_empty() {
            format!(" (did you mean {}?)", close.join(", "))
        } else if typed.starts_with("salesforce_") {
            " (a Salesforce error code without a label of its own is dead-lettered as \
             salesforce_other, with the code in its message)"
                .to_owned()
        } else {
            String::new()
        };
        Err(format!(
            "not a reason code{hint}; README's reason table lists them, e.g. invalid_event, mapping_error, salesforce_invalid_field, delivery_limit"
        ))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_are_unique() {
        let all = Reason::all();
        let mut labels: Vec<String> = all.iter().map(|r| r.label()).collect();
        for reason in &all {
            assert_eq!(Reason::parse(&reason.label()), Some(*reason));
        }
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn readme_lists_every_reason() {
        let readme = include_str!("../../README.md");
        for reason in Reason::all() {
            let label = format!("`{}`", reason.label());
            assert!(readme.contains(&label), "README lacks {label}");
        }
    }

    #[test]
    fn unknown_salesforce_codes_share_one_label() {
        assert_eq!(
            Reason::salesforce("INVALID_FIELD").label(),
            "salesforce_invalid_field"
        );
        assert_eq!(
            Reason::salesforce("SOMETHING_NEW_IN_WINTER_27").label(),
            "salesforce_other"
        );
        assert_eq!(Reason::parse("no_such_reason"), None);
    }
}
