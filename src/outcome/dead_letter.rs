//! The headers portals-crm writes on retried and dead-lettered copies, and reads back from
//! dead letters (`dlq`): the only module that knows their names.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

use super::decide::Cause;
use crate::amqp::topology::{TENANT_HEADER, TENANT_HEADER_COLON};
use crate::amqp::{header_frame_size, header_int, header_str};
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

/// The names of the publisher's own headers left off a retried or dead-lettered copy because
/// with them its properties would not fit one frame ([`fit_frame`]), comma-separated.
pub const DROPPED_HEADERS: &str = "x-portals-dropped-headers";

/// The most bytes of a header value portals-crm writes. Why: a message's headers travel in one
/// frame, which must fit the connection's `frame_max` (RabbitMQ's default: 128 KiB) or the broker
/// closes the connection, and several values repeat what an event said (an unknown `type` or a
/// tenant id is quoted in the message) however long it was, up to `worker.max_body_bytes`.
pub const HEADER_VALUE_MAX: usize = 1024;

/// `value` cut to at most [`HEADER_VALUE_MAX`] bytes, at a character boundary, ending in `…`
/// when cut: what a header or a log line quotes of a value an event made as long as it liked
/// (an event id, an unknown `type`).
pub fn cut(value: &str) -> std::borrow::Cow<'_, str> {
    cut_to(value, HEADER_VALUE_MAX)
}

/// `value` cut to at most `max` bytes (at least 4), as [`cut`].
fn cut_to(value: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if value.len() <= max {
        return value.into();
    }
    let mut end = max - '…'.len_utf8();
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end]).into()
}

fn set(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(
        name.into(),
        AMQPValue::LongString(cut(value).into_owned().into()),
    );
}

/// True when `value` is a header value [`cut`] to [`HEADER_VALUE_MAX`] bytes: the whole
/// value is elsewhere (an event id or tenant in the body), and a lookup by it must read it there.
pub fn is_cut(value: &str) -> bool {
    // `cut` backs off at most three bytes to a character boundary before the ellipsis.
    value.len() + 3 >= HEADER_VALUE_MAX && value.ends_with('…')
}

/// Attempts recorded on a delivery's headers (0 for a first delivery).
pub fn attempts(headers: Option<&FieldTable>) -> i64 {
    header_int(headers, ATTEMPT).unwrap_or(0)
}

/// `original` plus what a retry or dead letter carries: attempts, cause, identity (the event's
/// own tenant id, configured or not), failure times (the first one kept from an earlier
/// failure) and the original routing key.
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
    set(
        &mut table,
        TENANT,
        info.tenant_id.as_deref().unwrap_or(&info.tenant),
    );
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

/// Bytes of a frame a copy leaves free for what the broker adds when it dead-letters it (a retry
/// tier's expiry, the delivery limit): an `x-death` entry per queue and reason, the
/// `x-first-death-*` and `x-last-death-*` headers, `x-delivery-count` — a few hundred bytes a
/// hop (<https://www.rabbitmq.com/docs/dlx#effects>). A copy filled to the frame would come back
/// over it, and lapin closes the whole connection on a frame it receives over `frame_max`.
pub const BROKER_HEADROOM: usize = 4096;

/// The headers portals-crm writes on a copy: never left off (a publisher's header that merely
/// starts with `x-portals-` is not one of them).
const OURS: [&str; 12] = [
    ATTEMPT,
    REASON,
    MESSAGE,
    SF_ERROR_CODE,
    SF_FIELDS,
    TENANT,
    BOOKING_ID,
    EVENT_ID,
    FIRST_FAILURE,
    LAST_FAILURE,
    ROUTING_KEY,
    DROPPED_HEADERS,
];

/// What portals-crm's own values are cut to when the copy does not fit even without the
/// publisher's headers (only with a `frame_max` near lapin's floor of 8 KiB and long ids).
const SHORT_VALUE_MAX: usize = 128;

/// `properties` made to fit one frame of `frame_max` bytes ([`header_frame_size`]) with
/// [`BROKER_HEADROOM`] to spare, and the names of the headers left off for it. The original
/// message reached portals-crm within the broker's frame, but its copy carries portals-crm's
/// headers too (up to about 12 KiB), so a publisher's headers near the limit would make the
/// copy's frame too large: the broker would close the connection and the message would come
/// back, again and again. The publisher's own headers are left off, largest first and the tenant
/// headers last (nothing routes a copy by them, but they say whose it is), until the copy fits;
/// their names are added to [`DROPPED_HEADERS`] (after those an earlier copy left off). Should
/// portals-crm's own headers still not fit, their values are cut to 128 bytes. Properties that
/// fit are returned unchanged, with no name.
pub fn fit_frame(properties: BasicProperties, frame_max: u32) -> (BasicProperties, Vec<String>) {
    let budget = (frame_max as usize).saturating_sub(BROKER_HEADROOM);
    if header_frame_size(&properties) <= budget {
        return (properties, Vec::new());
    }
    let mut table = properties.headers().clone().unwrap_or_default();
    let earlier = header_str(Some(&table), DROPPED_HEADERS);
    let mut sheddable: Vec<(bool, usize, String)> = table
        .inner()
        .iter()
        .filter(|(name, _)| !OURS.contains(&name.as_str()))
        .map(|(name, value)| {
            let mut one = FieldTable::default();
            one.insert(name.clone(), value.clone());
            let size = header_frame_size(&BasicProperties::default().with_headers(one));
            let routing = name.as_str() == TENANT_HEADER || name.as_str() == TENANT_HEADER_COLON;
            (!routing, size, name.as_str().to_owned())
        })
        .collect();
    // Popped from the end: the tenant headers last, else the largest first; equal sizes by
    // name, so the choice does not depend on the table's order.
    sheddable.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then_with(|| b.2.cmp(&a.2)));
    let mut dropped = Vec::new();
    let mut fitted = properties;
    while header_frame_size(&fitted) > budget {
        let Some((_, _, name)) = sheddable.pop() else {
            break;
        };
        let mut kept = FieldTable::default();
        for (key, value) in table.inner() {
            if key.as_str() != name {
                kept.insert(key.clone(), value.clone());
            }
        }
        table = kept;
        dropped.push(name);
        let names = earlier.iter().chain(&dropped).cloned();
        set(
            &mut table,
            DROPPED_HEADERS,
            &names.collect::<Vec<_>>().join(","),
        );
        fitted = fitted.with_headers(table.clone());
    }
    if header_frame_size(&fitted) > budget {
        for name in OURS {
            if let Some(value) = header_str(Some(&table), name) {
                let short = cut_to(&value, SHORT_VALUE_MAX).into_owned();
                table.insert(name.into(), AMQPValue::LongString(short.into()));
            }
        }
        fitted = fitted.with_headers(table);
    }
    (fitted, dropped)
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

    /// A publisher's header near the broker's frame: left off the copy, named in
    /// `x-portals-dropped-headers`; portals-crm's headers, the tenant header and the
    /// publisher's small headers stay; a copy that fits is left as it is.
    #[test]
    fn a_copy_over_one_frame_leaves_the_publishers_largest_headers_off() {
        const FRAME_MAX: u32 = 131_072;
        let mut original = FieldTable::default();
        original.insert(
            "traceparent".into(),
            AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        );
        original.insert(
            "x-debug-dump".into(),
            AMQPValue::LongString("d".repeat(129_000).into()),
        );
        original.insert(TENANT_HEADER.into(), AMQPValue::LongString("acme".into()));
        let original_properties = BasicProperties::default().with_headers(original.clone());
        assert!(header_frame_size(&original_properties) <= FRAME_MAX as usize);
        let info = MessageInfo {
            tenant: "acme".into(),
            tenant_id: Some("acme".into()),
            booking_id: Some("bk_1".into()),
            event_id: Some("e".repeat(5_000)),
        };
        let cause = Cause {
            reason: Reason::InvalidEvent,
            message: "m".repeat(5_000),
            salesforce: None,
        };
        let table = annotate(&original, &info, &cause, 1, "meeting.booked", "now");
        let copy = BasicProperties::default()
            .with_content_type("application/cloudevents+json".into())
            .with_headers(table);
        assert!(header_frame_size(&copy) > FRAME_MAX as usize);

        let (fitted, dropped) = fit_frame(copy, FRAME_MAX);
        assert_eq!(dropped, ["x-debug-dump"]);
        assert!(header_frame_size(&fitted) <= FRAME_MAX as usize - BROKER_HEADROOM);
        let headers = fitted.headers().as_ref();
        assert_eq!(
            header_str(headers, DROPPED_HEADERS).as_deref(),
            Some("x-debug-dump")
        );
        assert_eq!(header_str(headers, "x-debug-dump"), None);
        assert!(header_str(headers, "traceparent").is_some());
        assert_eq!(header_str(headers, TENANT_HEADER).as_deref(), Some("acme"));
        assert_eq!(
            header_str(headers, REASON).as_deref(),
            Some("invalid_event")
        );
        assert_eq!(
            fitted.content_type().as_ref().map(|c| c.as_str()),
            Some("application/cloudevents+json")
        );

        let small = BasicProperties::default().with_headers(original_small());
        let (same, none) = fit_frame(small.clone(), FRAME_MAX);
        assert!(none.is_empty());
        assert_eq!(same, small);
    }

    fn original_small() -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(TENANT_HEADER.into(), AMQPValue::LongString("acme".into()));
        table
    }

    /// A copy that fits the frame but not its headroom is fitted too: what the broker adds when
    /// it dead-letters the copy must still fit. The tenant headers go last, a publisher's
    /// `x-portals-…` header is not portals-crm's, and names left off earlier are kept.
    #[test]
    fn the_headroom_is_kept_the_tenant_headers_go_last_and_earlier_names_stay() {
        const FRAME_MAX: u32 = 16_384;
        let mut table = FieldTable::default();
        table.insert(
            TENANT_HEADER.into(),
            AMQPValue::LongString("t".repeat(4_500).into()),
        );
        table.insert(
            "x-portals-custom".into(),
            AMQPValue::LongString("c".repeat(5_000).into()),
        );
        table.insert("small".into(), AMQPValue::LongString("s".into()));
        table.insert(DROPPED_HEADERS.into(), AMQPValue::LongString("x-a".into()));
        table.insert(REASON.into(), AMQPValue::LongString("invalid_event".into()));
        table.insert(
            "x-late".into(),
            AMQPValue::LongString("l".repeat(5_500).into()),
        );
        let properties = BasicProperties::default().with_headers(table);
        let size = header_frame_size(&properties);
        assert!(size < FRAME_MAX as usize, "under the frame: {size}");
        let (fitted, dropped) = fit_frame(properties, FRAME_MAX);
        assert_eq!(dropped, ["x-late"]);
        let headers = fitted.headers().as_ref();
        assert_eq!(
            header_str(headers, DROPPED_HEADERS).as_deref(),
            Some("x-a,x-late")
        );
        assert!(header_str(headers, TENANT_HEADER).is_some());
        assert!(header_frame_size(&fitted) <= FRAME_MAX as usize - BROKER_HEADROOM);

        // Tighter: the publisher's `x-portals-custom` next, then the small one, the tenant
        // header only after every other.
        let (fitted, dropped) = fit_frame(fitted, 8_192);
        assert_eq!(dropped, ["x-portals-custom", "small", TENANT_HEADER]);
        let headers = fitted.headers().as_ref();
        assert_eq!(
            header_str(headers, DROPPED_HEADERS).as_deref(),
            Some(format!("x-a,x-late,x-portals-custom,small,{TENANT_HEADER}").as_str())
        );
        assert_eq!(
            header_str(headers, REASON).as_deref(),
            Some("invalid_event")
        );
    }

    /// At lapin's smallest frame, ids of 1 KiB each do not fit even alone: portals-crm's
    /// values are cut short, the reason kept whole.
    #[test]
    fn at_the_smallest_frame_long_values_of_our_own_are_cut_short() {
        let info = MessageInfo {
            tenant: "unknown".into(),
            tenant_id: Some("t".repeat(5_000)),
            booking_id: Some("b".repeat(5_000)),
            event_id: Some("e".repeat(5_000)),
        };
        let cause = Cause {
            reason: Reason::InvalidEvent,
            message: "m".repeat(5_000),
            salesforce: None,
        };
        let table = annotate(
            &FieldTable::default(),
            &info,
            &cause,
            1,
            &"k".repeat(300),
            "now",
        );
        let (fitted, dropped) = fit_frame(BasicProperties::default().with_headers(table), 8_192);
        assert!(dropped.is_empty());
        assert!(header_frame_size(&fitted) <= 8_192 - BROKER_HEADROOM);
        let headers = fitted.headers().as_ref();
        assert_eq!(
            header_str(headers, REASON).as_deref(),
            Some("invalid_event")
        );
        let event_id = header_str(headers, EVENT_ID).unwrap_or_default();
        assert!(
            event_id.len() <= 128 && event_id.ends_with('…'),
            "{event_id}"
        );
        assert_eq!(attempts(headers), 1);
    }

    /// Several large headers: the largest go first, and only as many as needed.
    #[test]
    fn only_as_many_headers_as_needed_are_left_off() {
        let mut table = FieldTable::default();
        for (name, size) in [("a", 3_000), ("b", 10_000), ("c", 1_000)] {
            table.insert(name.into(), AMQPValue::LongString("v".repeat(size).into()));
        }
        let properties = BasicProperties::default().with_headers(table);
        let (fitted, dropped) = fit_frame(properties, 16_384);
        assert_eq!(dropped, ["b"]);
        let headers = fitted.headers().as_ref();
        assert!(header_str(headers, "a").is_some() && header_str(headers, "c").is_some());
        assert!(header_frame_size(&fitted) <= 16_384 - BROKER_HEADROOM);
    }

    #[test]
    fn a_long_value_is_cut_to_fit_a_frame() {
        let info = MessageInfo {
            tenant: "acme".into(),
            tenant_id: Some("acme".into()),
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
        for name in [MESSAGE, EVENT_ID] {
            assert!(is_cut(&header_str(Some(&table), name).unwrap_or_default()));
        }
        assert!(!is_cut("acme") && !is_cut("a value that ends in …"));
        assert_eq!(header_str(Some(&table), TENANT).as_deref(), Some("acme"));
    }

    #[test]
    fn what_is_written_reads_back() {
        let info = MessageInfo {
            tenant: "acme".into(),
            tenant_id: Some("acme".into()),
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
