//! The event contract (DESIGN.md §3): a structured-mode CloudEvents 1.0 envelope carrying a full
//! booking snapshot. Decoding is strict and every error names the field it is about, because
//! that text ends up in a dead letter someone has to act on.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Default cap on a message body; a booking snapshot is a few KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

/// The three kinds of booking event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// `com.bookme.meeting.booked.v1`
    Booked,
    /// `com.bookme.meeting.rescheduled.v1`
    Rescheduled,
    /// `com.bookme.meeting.cancelled.v1`
    Cancelled,
}

impl EventKind {
    /// The CloudEvents `type`.
    pub fn cloudevents_type(self) -> &'static str {
        match self {
            Self::Booked => "com.bookme.meeting.booked.v1",
            Self::Rescheduled => "com.bookme.meeting.rescheduled.v1",
            Self::Cancelled => "com.bookme.meeting.cancelled.v1",
        }
    }

    /// The snapshot `status` that goes with this type, also the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Booked => "booked",
            Self::Rescheduled => "rescheduled",
            Self::Cancelled => "cancelled",
        }
    }

    /// The routing key the booking platform publishes with.
    pub fn routing_key(self) -> String {
        format!("meeting.{}", self.as_str())
    }

    fn from_type(value: &str) -> Option<Self> {
        [Self::Booked, Self::Rescheduled, Self::Cancelled]
            .into_iter()
            .find(|k| k.cloudevents_type() == value)
    }
}

/// The portal a booking came through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Portal {
    /// Portal id.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// The host (a sales rep) of the meeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Email, matched against Salesforce users.
    pub email: String,
    /// Display name.
    pub name: String,
}

/// One attendee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attendee {
    /// Email (the Lead's identity).
    pub email: String,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: String,
    /// Company.
    pub company: Option<String>,
    /// Phone.
    pub phone: Option<String>,
    /// Job title.
    pub title: Option<String>,
}

/// The booking snapshot in `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Booking {
    /// Stable booking id.
    pub booking_id: String,
    /// Grows by one with every change.
    pub version: u64,
    /// `booked`, `rescheduled` or `cancelled`; matches the event type.
    pub status: String,
    /// Meeting title.
    pub title: String,
    /// Start, RFC 3339.
    pub starts_at: String,
    /// End, RFC 3339, after the start.
    pub ends_at: String,
    /// IANA time zone of the host.
    pub timezone: String,
    /// Room or meeting link.
    pub location: Option<String>,
    /// Where it was booked.
    pub portal: Portal,
    /// Who hosts it.
    pub host: Host,
    /// At least one attendee.
    pub attendees: Vec<Attendee>,
    /// Answers to the booking form's questions.
    #[serde(default)]
    pub answers: serde_json::Map<String, Value>,
    /// Why it was cancelled.
    pub cancel_reason: Option<String>,
}

/// The CloudEvents envelope as it arrives.
#[derive(Debug, Clone, Deserialize)]
struct Envelope {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    time: String,
    subject: Option<String>,
    tenantid: String,
    datacontenttype: Option<String>,
    data: Booking,
}

/// A decoded, validated booking event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BookingEvent {
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// The event kind.
    pub kind: EventKind,
    /// CloudEvents `time`: when the booking changed.
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// CloudEvents `subject`.
    pub subject: Option<String>,
    /// The tenant (`tenantid` extension attribute).
    pub tenant: String,
    /// The snapshot.
    pub booking: Booking,
}

/// Why a body is not a valid booking event. `field` is the JSON path, `$` for the whole body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidEvent {
    /// JSON path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidEvent {
    InvalidEvent {
        field: field.into(),
        reason: reason.into(),
    }
}

fn parse_time(field: &str, value: &str) -> Result<OffsetDateTime, InvalidEvent> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map_err(|_| invalid(field, format!("not an RFC 3339 timestamp: {value:?}")))
}

/// The tenant id of a body that may not decode, for metrics and dead-letter headers.
pub fn peek_tenant(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        tenantid: String,
    }
    serde_json::from_slice::<Peek>(body)
        .ok()
        .map(|p| p.tenantid)
}

/// Decodes and validates one message body.
pub fn decode(body: &[u8], max_bytes: usize) -> Result<BookingEvent, InvalidEvent> {
    if body.len() > max_bytes {
        return Err(invalid(
            "$",
            format!(
                "body of {} bytes is over the {max_bytes}-byte limit",
                body.len()
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| invalid("$", format!("not UTF-8: {e}")))?;
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let envelope: Envelope = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path == "?" || path.is_empty() {
            "$".to_owned()
        } else {
            path
        };
        invalid(field, e.into_inner().to_string())
    })?;
    validate(envelope)
}

fn validate(envelope: Envelope) -> Result<BookingEvent, InvalidEvent> {
    if envelope.specversion != "1.0" {
        return Err(invalid(
            "specversion",
            format!("must be \"1.0\", got {:?}", envelope.specversion),
        ));
    }
    let kind = EventKind::from_type(&envelope.event_type).ok_or_else(|| {
        invalid(
            "type",
            format!("unknown event type {:?}", envelope.event_type),
        )
    })?;
    if let Some(content_type) = &envelope.datacontenttype
        && content_type != "application/json"
    {
        return Err(invalid(
            "datacontenttype",
            format!("must be application/json, got {content_type:?}"),
        ));
    }
    for (field, value) in [
        ("id", &envelope.id),
        ("source", &envelope.source),
        ("tenantid", &envelope.tenantid),
    ] {
        if value.trim().is_empty() {
            return Err(invalid(field, "must not be empty"));
        }
    }
    let time = parse_time("time", &envelope.time)?;
    let booking = envelope.data;
    if booking.booking_id.trim().is_empty() || booking.booking_id.len() > 64 {
        return Err(invalid("data.booking_id", "must be 1 to 64 characters"));
    }
    if booking.version == 0 {
        return Err(invalid("data.version", "must be 1 or more"));
    }
    if booking.status != kind.as_str() {
        return Err(invalid(
            "data.status",
            format!(
                "{:?} does not match event type {}",
                booking.status,
                kind.cloudevents_type()
            ),
        ));
    }
    let starts = parse_time("data.starts_at", &booking.starts_at)?;
    let ends = parse_time("data.ends_at", &booking.ends_at)?;
    if ends <= starts {
        return Err(invalid("data.ends_at", "must be after data.starts_at"));
    }
    if booking.attendees.is_empty() {
        return Err(invalid("data.attendees", "must list at least one attendee"));
    }
    for (i, attendee) in booking.attendees.iter().enumerate() {
        if !attendee.email.contains('@') || attendee.email.trim() != attendee.email {
            return Err(invalid(
                format!("data.attendees[{i}].email"),
                "is not an email address",
            ));
        }
        if attendee.last_name.trim().is_empty() {
            return Err(invalid(
                format!("data.attendees[{i}].last_name"),
                "must not be empty",
            ));
        }
    }
    if !booking.host.email.contains('@') {
        return Err(invalid("data.host.email", "is not an email address"));
    }
    Ok(BookingEvent {
        id: envelope.id,
        source: envelope.source,
        kind,
        time,
        subject: envelope.subject,
        tenant: envelope.tenantid,
        booking,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKED: &str = include_str!("../../tests/fixtures/events/booked.json");

    fn mutate(f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut value: Value = serde_json::from_str(BOOKED).unwrap();
        f(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    fn field_of(body: &[u8]) -> String {
        decode(body, DEFAULT_MAX_BODY_BYTES).unwrap_err().field
    }

    #[test]
    fn samples_decode() {
        for sample in [
            BOOKED,
            include_str!("../../tests/fixtures/events/booked-group.json"),
            include_str!("../../tests/fixtures/events/rescheduled.json"),
            include_str!("../../tests/fixtures/events/cancelled.json"),
        ] {
            let event = decode(sample.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap();
            assert_eq!(event.tenant, "acme");
        }
    }

    #[test]
    fn every_bad_input_names_its_field() {
        assert_eq!(field_of(b"not json"), "$");
        assert_eq!(field_of(&[0xff, 0xfe, b'{']), "$");
        assert_eq!(
            field_of(&mutate(|v| v["specversion"] = "0.3".into())),
            "specversion"
        );
        assert_eq!(
            field_of(&mutate(|v| v["type"] = "com.bookme.x".into())),
            "type"
        );
        assert_eq!(
            field_of(&mutate(|v| v["data"]["version"] = "two".into())),
            "data.version"
        );
        assert_eq!(
            field_of(&mutate(|v| {
                v["data"].as_object_mut().unwrap().remove("title");
            })),
            "data"
        );
        assert_eq!(
            field_of(&mutate(
                |v| v["data"]["ends_at"] = "2026-12-01T13:00:00Z".into()
            )),
            "data.ends_at"
        );
        assert_eq!(
            field_of(&mutate(|v| v["data"]["attendees"] = serde_json::json!([]))),
            "data.attendees"
        );
        assert_eq!(
            field_of(&mutate(|v| v["data"]["status"] = "cancelled".into())),
            "data.status"
        );
        assert_eq!(
            field_of(&mutate(
                |v| v["data"]["attendees"][0]["email"] = "nobody".into()
            )),
            "data.attendees[0].email"
        );
        let big = mutate(|v| v["data"]["title"] = "x".repeat(DEFAULT_MAX_BODY_BYTES).into());
        assert_eq!(field_of(&big), "$");
    }

    #[test]
    fn a_json_bomb_is_rejected_not_a_crash() {
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let bomb = BOOKED.replace(
            "\"answers\": {",
            &format!("\"answers\": {{\"bomb\": {nested}, "),
        );
        let error = decode(bomb.as_bytes(), 1 << 20).unwrap_err();
        assert!(error.reason.contains("recursion limit"), "{error}");
    }

    #[test]
    fn missing_field_error_names_it() {
        let body = mutate(|v| {
            v["data"].as_object_mut().unwrap().remove("title");
        });
        let error = decode(&body, DEFAULT_MAX_BODY_BYTES).unwrap_err();
        assert!(error.reason.contains("title"), "{error}");
    }
}
