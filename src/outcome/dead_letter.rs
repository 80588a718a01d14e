//! The headers portals-crm writes on retried and dead-lettered copies, and reads back from
//! dead letters (`dlq`): the only module that knows their names.

use lapin::types::{AMQPValue, FieldTable};

use super::decide::Cause;
use crate::amqp::{header_int, header_str};
use crate::pipeline::MessageInfo;

/// Attempts so far (our own count: `x-delivery-count` resets on every dead-letter cycle).
pub const ATTEMPT: &str = "x-portals-attempt";
/// Reason code of the last failure ([`super::Reason`] label).
pub const REASON: &str = "x-portals-reason";
/// Human-readable message of the last failure.
pub const MESSAGE: &str = "x-portals-message";
/// Salesforce error code, when Salesforce refused.
pub const SF_ERROR_CODE: &str = "x-portals-sf-error-code";
/// Salesforce error fields, comma-separated.
pub const SF_FIELDS: &str = "x-portals-sf-fields";
/// Tenant of the event.
pub const TENANT: &str = "x-portals-tenant";
/// Booking id.
pub const BOOKING_ID: &str = "x-portals-booking-id";
/// CloudEvents id.
pub const EVENT_ID: &str = "x-portals-event-id";
/// First failure, RFC 3339.
pub const FIRST_FAILURE: &str = "x-portals-first-failure";
/// Last failure, RFC 3339.
pub const LAST_FAILURE: &str = "x-portals-last-failure";
/// Routing key the booking platform used.
pub const ROUTING_KEY: &str = "x-portals-routing-key";

/// The most bytes of a header value portals-crm writes. Why: a message's headers travel in one
/// frame, which must fit the connection's `frame_max` (RabbitMQ's default: 128 KiB) or the broker
/// closes the connection, and several values repeat what an event said (an unknown `type` or a
/// tenant id is quoted in the message) however long it was, up to `worker.max_body_bytes`.
pub const HEADER_VALUE_MAX: usize = 1024;

fn set(table: &mut FieldTable, name: &str, value: &str) {
    let value = if value.len() > HEADER_VALUE_MAX {
        let mut end = HEADER_VALUE_MAX - '…'.len_utf8();
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &value[..end])
    } else {
        value.to_owned()
    };
    table.insert(name.into(), AMQPValue::LongString(value.into()));
}

/// Attempts recorded on a delivery's headers (0 for a first delivery).
pub fn attempts(headers: Option<&FieldTable>) -> i64 {
    header_int(headers, ATTEMPT).unwrap_or(0)
}

/// `original` plus what a retry or dead letter carries: attempts, cause, identity, failure
/// times (the first one kept from an earlier failure) and the original routing key.
pub fn annotate(
    original: &FieldTable,
    info: &MessageInfo,
    cause: &Cause,
    attempts: i64,
    routing_key: &str,
    now: &str,
) -> FieldTable {
    let mut table = original.clone();
    table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(attempts));
    set(&mut table, REASON, &cause.reason.label());
    set(&mut table, MESSAGE, &cause.message);
    set(&mut table, TENANT, &info.tenant);
    if let Some(id) = &info.booking_id {
        set(&mut table, BOOKING_ID, id);
    }
    if let Some(id) = &info.event_id {
        set(&mut table, EVENT_ID, id);
    }
    if let Some(error) = &cause.salesforce {
        set(&mut table, SF_ERROR_CODE, &error.error_code);
        set(&mut table, SF_FIELDS, &error.fields.join(","));
    }
    if header_str(Some(original), FIRST_FAILURE).is_none() {
        set(&mut table, FIRST_FAILURE, now);
    }
    set(&mut table, LAST_FAILURE, now);
    if header_str(Some(original), ROUTING_KEY).is_none() {
        set(&mut table, ROUTING_KEY, routing_key);
    }
    table
}

/// The headers of a replayed copy: only the original routing key, so the replay starts with
/// a fresh attempt count.
pub fn replay(routing_key: Option<&str>) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(key) = routing_key {
        set(&mut table, ROUTING_KEY, key);
    }
    table
}

/// What a dead letter's headers say; every field is absent on a message the broker
/// dead-lettered itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterHeaders {
    /// Reason code.
    pub reason: Option<String>,
    /// Message.
    pub message: Option<String>,
    /// Salesforce error code.
    pub salesforce_error: Option<String>,
    /// Salesforce error fields, comma-separated (absent when empty).
    pub salesforce_fields: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
    /// Booking id.
    pub booking_id: Option<String>,
    /// Event id.
    pub event_id: Option<String>,
    /// Attempts made.
    pub attempts: i64,
    /// First failure, RFC 3339.
    pub first_failure: Option<String>,
    /// Last failure, RFC 3339.
    pub last_failure: Option<String>,
    /// The booking platform's routing key.
    pub routing_key: Option<String>,
}

impl DeadLetterHeaders {
    /// Reads them from a dead letter's header table.
    pub fn read(table: Option<&FieldTable>) -> Self {
        let h = |name: &str| header_str(table, name);
        Self {
            reason: h(REASON),
            message: h(MESSAGE),
            salesforce_error: h(SF_ERROR_CODE),
            salesforce_fields: h(SF_FIELDS).filter(|f| !f.is_empty()),
            tenant: h(TENANT),
            booking_id: h(BOOKING_ID),
            event_id: h(EVENT_ID),
            attempts: attempts(table),
            first_failure: h(FIRST_FAILURE),
            last_failure: h(LAST_FAILURE),
            routing_key: h(ROUTING_KEY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Reason;
    use crate::salesforce::model::ApiError;

    #[test]
    fn a_long_value_is_cut_to_fit_a_frame() {
        let info = MessageInfo {
            tenant: "acme".into(),
            booking_id: Some("bk_1".into()),
            event_id: Some("é".repeat(40_000)),
        };
        let cause = Cause {
            reason: Reason::InvalidEvent,
            message: format!("unknown event type {:?}", "x".repeat(40_000)),
            salesforce: None,
        };
        let table = annotate(&FieldTable::default(), &info, &cause, 1, "k", "now");
        for name in [MESSAGE, EVENT_ID] {
            let value = header_str(Some(&table), name).expect("the header is written");
            assert!(
                value.len() <= HEADER_VALUE_MAX,
                "{name}: {} bytes",
                value.len()
            );
            assert!(value.ends_with('…'), "{name} says it was cut");
        }
        let message = header_str(Some(&table), MESSAGE).unwrap_or_default();
        assert!(message.starts_with("unknown event type \"xxx"), "{message}");
        assert_eq!(header_str(Some(&table), TENANT).as_deref(), Some("acme"));
    }

    #[test]
    fn what_is_written_reads_back() {
        let info = MessageInfo {
            tenant: "acme".into(),
            booking_id: Some("bk_1".into()),
            event_id: Some("evt_1".into()),
        };
        let cause = Cause {
            reason: Reason::salesforce("INVALID_FIELD"),
            message: "No such column".into(),
            salesforce: Some(ApiError::new(
                "INVALID_FIELD",
                "No such column",
                vec!["A__c".into(), "B__c".into()],
            )),
        };
        let first = annotate(
            &FieldTable::default(),
            &info,
            &cause,
            1,
            "meeting.booked",
            "2026-11-30T10:00:00Z",
        );
        let second = annotate(&first, &info, &cause, 2, "ignored", "2026-11-30T10:05:00Z");
        let read = DeadLetterHeaders::read(Some(&second));
        assert_eq!(
            read,
            DeadLetterHeaders {
                reason: Some("salesforce_invalid_field".into()),
                message: Some("No such column".into()),
                salesforce_error: Some("INVALID_FIELD".into()),
                salesforce_fields: Some("A__c,B__c".into()),
                tenant: Some("acme".into()),
                booking_id: Some("bk_1".into()),
                event_id: Some("evt_1".into()),
                attempts: 2,
                first_failure: Some("2026-11-30T10:00:00Z".into()),
                last_failure: Some("2026-11-30T10:05:00Z".into()),
                routing_key: Some("meeting.booked".into()),
            }
        );
        assert_eq!(
            DeadLetterHeaders::read(Some(&replay(Some("meeting.booked")))).attempts,
            0
        );
    }
}
