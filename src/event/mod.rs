//! The event contract (DESIGN.md §3): a structured-mode CloudEvents 1.0 envelope carrying a full
//! booking snapshot (<https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/spec.md>,
//! JSON format: <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>).
//!
//! A tolerant reader: what the product needs is checked and every error names the field it is
//! about, because that text ends up in a dead letter someone has to act on; what it does not
//! know is ignored and counted ([`unknown_fields`]); spellings the standards allow are read and
//! normalised (media types: [`media_type`], timestamps: [`timestamp`]). README's "event
//! contract" table lists what is accepted, normalised and rejected.

pub mod media_type;
pub mod timestamp;
pub mod unknown_fields;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

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
pub struct Portal {
    /// Portal id.
    pub id: String,
    /// Display name.
    pub name: String,
}

/// The host (a sales rep) of the meeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Email, matched against Salesforce users.
    pub email: String,
    /// Display name.
    pub name: String,
}

/// One attendee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct Booking {
    /// Stable booking id.
    pub booking_id: String,
    /// Grows by one with every change.
    pub version: u64,
    /// `booked`, `rescheduled` or `cancelled`; matches the event type.
    pub status: String,
    /// Meeting title.
    pub title: String,
    /// Start: any RFC 3339 spelling on the way in, the canonical `YYYY-MM-DDTHH:MM:SS.sssZ`
    /// once decoded ([`timestamp`]).
    pub starts_at: String,
    /// End, after the start; as `starts_at`.
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

/// The CloudEvents envelope as it arrives. A `null` optional attribute is the same as an absent
/// one (JSON format §2.2). Any other member is an extension attribute the product does not use:
/// ignored and counted.
#[derive(Debug, Clone, Deserialize)]
struct Envelope {
    specversion: String,
    id: String,
    source: String,
    #[serde(rename = "type")]
    event_type: String,
    /// Optional in CloudEvents, required by this contract: the lag metric and `event.time` in
    /// the mappings are measured from it.
    time: String,
    subject: Option<String>,
    /// Unused, but a context attribute of the spec: read as a string, so it is not counted as
    /// unknown.
    #[serde(default)]
    dataschema: Option<String>,
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
    /// Fields the contract does not know, ignored: normalised paths
    /// ([`unknown_fields::normalise`]), each once.
    #[serde(skip)]
    pub unknown_fields: Vec<String>,
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
    timestamp::parse(value).map_err(|e| invalid(field, e.to_string()))
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
    let mut unknown = Vec::new();
    let mut collect = |path: serde_ignored::Path<'_>| {
        let field = unknown_fields::normalise(&path);
        if !unknown.contains(&field) {
            unknown.push(field);
        }
    };
    // Most events decode: read them without tracking the path (which costs about as much as
    // the decoding itself); only a body that fails is read again, to name the field.
    let json = &mut serde_json::Deserializer::from_str(text);
    let decoded: Result<Envelope, _> = serde_ignored::deserialize(&mut *json, &mut collect)
        .and_then(|envelope| {
            // Nothing but whitespace may follow the event (RFC 8259 §2: one JSON text).
            json.end()?;
            Ok(envelope)
        });
    let envelope = match decoded {
        Ok(envelope) => envelope,
        Err(error) => return Err(locate(text, error)),
    };
    validate(envelope, unknown)
}

/// The error of a body that did not decode, naming the field it failed at (read again with
/// the path tracked); `$` when it failed after the event, on trailing characters.
fn locate(text: &str, error: serde_json::Error) -> InvalidEvent {
    let json = &mut serde_json::Deserializer::from_str(text);
    let mut ignore = |_: serde_ignored::Path<'_>| {};
    let deserializer = serde_ignored::Deserializer::new(json, &mut ignore);
    match serde_path_to_error::deserialize::<_, Envelope>(deserializer) {
        Ok(_) => invalid("$", error.to_string()),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." || path == "?" || path.is_empty() {
                "$".to_owned()
            } else {
                path
            };
            invalid(field, e.into_inner().to_string())
        }
    }
}

fn validate(envelope: Envelope, unknown_fields: Vec<String>) -> Result<BookingEvent, InvalidEvent> {
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
    // Absent means JSON in the JSON format (§3.1); `data` is decoded as JSON whatever it says,
    // so anything that is not JSON is refused rather than misread.
    if let Some(content_type) = &envelope.datacontenttype {
        media_type::require_json(content_type)
            .map_err(|e| invalid("datacontenttype", e.to_string()))?;
    }
    for (field, value) in [
        ("id", Some(&envelope.id)),
        ("source", Some(&envelope.source)),
        ("tenantid", Some(&envelope.tenantid)),
        ("subject", envelope.subject.as_ref()),
        ("dataschema", envelope.dataschema.as_ref()),
    ] {
        if value.is_some_and(|v| v.trim().is_empty()) {
            return Err(invalid(field, "must not be empty"));
        }
    }
    let time = parse_time("time", &envelope.time)?;
    let mut booking = envelope.data;
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
    let starts = timestamp::to_millis(parse_time("data.starts_at", &booking.starts_at)?);
    let ends = timestamp::to_millis(parse_time("data.ends_at", &booking.ends_at)?);
    if ends <= starts {
        return Err(invalid("data.ends_at", "must be after data.starts_at"));
    }
    // Whatever RFC 3339 spelling came in, the mappings and Salesforce see one form.
    booking.starts_at = timestamp::canonical(starts);
    booking.ends_at = timestamp::canonical(ends);
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
        unknown_fields,
        subject: envelope.subject,
        tenant: envelope.tenantid,
        booking,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
    fn one_json_text_only_and_the_error_names_where() {
        // RFC 8259 §2: a body is one JSON text; what follows it is not part of the event.
        let trailing = format!("{BOOKED} {{\"id\": \"another\"}}");
        let error = decode(trailing.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap_err();
        assert_eq!(error.field, "$");
        assert!(error.reason.contains("trailing characters"), "{error}");
        assert!(decode(format!("{BOOKED}\n\n").as_bytes(), DEFAULT_MAX_BODY_BYTES).is_ok());
        // The fast path's error is replaced by the tracked one: it names the nested field.
        let wrong = BOOKED.replace("\"version\": 1", "\"version\": \"one\"");
        assert_ne!(wrong, BOOKED);
        let error = decode(wrong.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap_err();
        assert_eq!(error.field, "data.version");
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

    fn decoded(body: &[u8]) -> BookingEvent {
        decode(body, DEFAULT_MAX_BODY_BYTES).unwrap()
    }

    #[test]
    fn datacontenttype_is_a_media_type() {
        for content_type in [
            json!("application/json; charset=utf-8"),
            json!("Application/JSON"),
            json!("application/vnd.bookme.booking+json"),
            Value::Null,
        ] {
            let body = mutate(|v| v["datacontenttype"] = content_type.clone());
            assert_eq!(
                decoded(&body).booking.booking_id,
                "bk_7Q2M9",
                "{content_type}"
            );
        }
        let error = decode(
            &mutate(|v| v["datacontenttype"] = json!("application/xml")),
            DEFAULT_MAX_BODY_BYTES,
        )
        .unwrap_err();
        assert_eq!(error.field, "datacontenttype");
        assert!(error.reason.contains("not JSON"), "{error}");
    }

    #[test]
    fn unknown_fields_are_ignored_and_reported_once_with_normalised_paths() {
        let body = mutate(|v| {
            v["data"]["attendees"][0]["locale"] = json!("nb-NO");
            v["data"]["attendees"]
                .as_array_mut()
                .unwrap()
                .push(json!({"email": "b@x.example", "last_name": "B", "locale": "sv-SE"}));
            v["data"]["portal"]["region"] = json!({"code": "eu", "nested": [1, 2]});
            v["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            v["data"]["recording"] = json!(null);
        });
        let event = decoded(&body);
        // Each name once, though two attendees carry `locale`.
        let mut found = event.unknown_fields.clone();
        found.sort();
        assert_eq!(
            found,
            [
                "data.attendees[].locale",
                "data.portal.region",
                "data.recording",
                "traceparent"
            ]
        );
        assert_eq!(event.booking.attendees.len(), 2);
        assert!(decoded(BOOKED.as_bytes()).unknown_fields.is_empty());
    }

    /// Property: an unknown member added to any object of the sample changes nothing but the
    /// reported unknown fields.
    #[test]
    fn an_unknown_member_anywhere_changes_nothing_else() {
        fn objects(value: &Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
            match value {
                Value::Object(map) => {
                    out.push(path.clone());
                    for (key, child) in map {
                        let mut child_path = path.clone();
                        child_path.push(key.clone());
                        objects(child, child_path, out);
                    }
                }
                Value::Array(items) => {
                    for (i, child) in items.iter().enumerate() {
                        let mut child_path = path.clone();
                        child_path.push(i.to_string());
                        objects(child, child_path, out);
                    }
                }
                _ => {}
            }
        }
        let original: Value = serde_json::from_str(BOOKED).unwrap();
        let expected = decoded(BOOKED.as_bytes());
        let mut paths = Vec::new();
        objects(&original, Vec::new(), &mut paths);
        for path in paths {
            if path.first().is_some_and(|p| p == "data")
                && path.get(1).is_some_and(|p| p == "answers")
            {
                continue; // free-form by contract: every key is known
            }
            for extra in [
                json!("x"),
                json!(7),
                json!(null),
                json!({"a": [1]}),
                json!([true]),
            ] {
                let mut value = original.clone();
                let mut target = &mut value;
                for key in &path {
                    target = match target {
                        Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
                        other => &mut other[key.as_str()],
                    };
                }
                target["zz_new_field"] = extra.clone();
                let event = decoded(&serde_json::to_vec(&value).unwrap());
                assert_eq!(event.booking, expected.booking, "{path:?}");
                assert_eq!(event.unknown_fields.len(), 1, "{path:?}");
                assert!(
                    event.unknown_fields[0].ends_with("zz_new_field"),
                    "{path:?}"
                );
            }
        }
    }

    #[test]
    fn a_needed_field_missing_or_ill_typed_still_names_it() {
        let body = mutate(|v| {
            v["data"]["attendees"][0]["locale"] = json!("nb-NO");
            v["data"]["attendees"][0]["last_name"] = json!(42);
        });
        assert_eq!(field_of(&body), "data.attendees[0].last_name");
        assert_eq!(field_of(&mutate(|v| v["time"] = Value::Null)), "time");
        assert_eq!(field_of(&mutate(|v| v["subject"] = json!(""))), "subject");
        assert_eq!(
            field_of(&mutate(|v| v["dataschema"] = json!(3))),
            "dataschema"
        );
    }

    #[test]
    fn every_datetime_leaves_in_the_canonical_form() {
        let body = mutate(|v| {
            v["time"] = json!("2026-11-20 11:15:00.123456+01:00");
            v["data"]["starts_at"] = json!("2026-12-01 14:00:00Z");
            v["data"]["ends_at"] = json!("2026-12-01t15:30:00.5+01:00");
        });
        let event = decoded(&body);
        assert_eq!(event.booking.starts_at, "2026-12-01T14:00:00.000Z");
        assert_eq!(event.booking.ends_at, "2026-12-01T14:30:00.500Z");
        assert_eq!(timestamp::canonical(event.time), "2026-11-20T10:15:00.123Z");
        let error = decode(
            &mutate(|v| v["data"]["starts_at"] = json!("2026-12-01T14:00:00")),
            DEFAULT_MAX_BODY_BYTES,
        )
        .unwrap_err();
        assert_eq!(error.field, "data.starts_at");
        assert!(error.reason.contains("no UTC offset"), "{error}");
        // Equal once cut to the canonical precision: the end is not after the start.
        let body = mutate(|v| {
            v["data"]["starts_at"] = json!("2026-12-01T14:00:00.0001Z");
            v["data"]["ends_at"] = json!("2026-12-01T14:00:00.0009Z");
        });
        assert_eq!(field_of(&body), "data.ends_at");
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
