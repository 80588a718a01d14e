//! Plan: a tenant's mapping, compiled once, rendered into the nodes of one Composite Graph per
//! booking. Pure: no I/O.
//!
//! Templates run in minijinja's sandbox: they see only the context built here (the event, the
//! enrichment) and can reach nothing outside it. Undefined names are errors, so a typo in a
//! mapping fails at compile or render time instead of writing an empty field.
//!
//! What a template may cost is bounded, because each customer edits their own templates and a
//! worker renders every tenant's: each render runs with minijinja's fuel limit
//! ([`TEMPLATE_FUEL`] instructions) and its output is capped at [`MAX_RENDERED_BYTES`]. A
//! template over either fails that booking alone (a permanent `mapping_error` naming the field);
//! on the built-in sample events it is a validation problem ([`samples`]).

pub mod duplicates;
pub mod invalid_values;
pub mod org_settings;
pub mod relations;
pub mod samples;
pub mod validate;

use std::cell::OnceCell;

use serde::Serialize;
use serde_json::Value;
use validate::MappingProblem;

use crate::config::{Action, TenantConfig};
use crate::enrich::Enrichment;
use crate::event::{Attendee, BookingEvent};
use crate::salesforce::client::encode_segment;
use crate::salesforce::model::{Body, Subrequest};

/// Instructions one render of a field template (or one `when`) may execute: minijinja's fuel,
/// reset for every render. The shipped mappings use well under a thousand per field; two nested
/// `range(100000)` loops (10^10 iterations) stop here within milliseconds.
/// <https://docs.rs/minijinja/latest/minijinja/struct.Environment.html#method.set_fuel>
pub const TEMPLATE_FUEL: u64 = 200_000;

/// Bytes one field may render to. The longest Salesforce text field (Long Text Area) holds
/// 131,072 characters, at most 4 bytes each in UTF-8; anything longer could never be written.
/// <https://help.salesforce.com/s/articleView?id=sf.custom_field_types.htm>
pub const MAX_RENDERED_BYTES: usize = 131_072 * 4;

/// A mapping that cannot render for this event; dead-lettered as `mapping_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping {record}.{field}: {message}")]
pub struct PlanError {
    /// The record's reference name.
    pub record: String,
    /// The field (or `external_id` / `when`).
    pub field: String,
    /// What went wrong.
    pub message: String,
}

#[derive(Debug, Clone)]
enum FieldTemplate {
    /// A TOML constant, or a string without template syntax (including `@{ref.id}`).
    Constant(Value),
    /// A template made of one `{{ expression }}`: keeps the expression's type. Compiled once as
    /// the template named here, which renders the value as JSON.
    Expression(String),
    /// Any other template: renders to a string.
    Template(String),
    /// An [`Expression`](FieldTemplate::Expression) that is only a path into the context
    /// (`booking.title`, `attendee.email`), maybe through `| lower`: read without running a
    /// template, which is most fields of a mapping and most of the cost of planning a booking.
    /// A path that does not end in a scalar (a string, for `lower`; or not within the size cap)
    /// falls back to the template, so errors and values are exactly the template's.
    Path {
        /// The context's keys, from the root (`attendee`, `email`).
        path: Vec<String>,
        /// Through minijinja's `lower` filter.
        lower: bool,
        /// The compiled template of the same expression.
        template: String,
    },
    /// A [`Template`](FieldTemplate::Template) made only of text and such paths
    /// (`{{ tenant }}:{{ attendee.email | lower }}`): joined without running the template when
    /// every path ends in a string, else rendered by it (same fallback as `Path`).
    Text {
        /// The text and the paths, in order.
        pieces: Vec<Piece>,
        /// The compiled template of the same text.
        template: String,
    },
    /// An [`Expression`](FieldTemplate::Expression) `path or path` / `path or 'text'`
    /// (`attendee.company or 'Unknown'`, `host_user_id or integration_user_id`): read without
    /// running the template when the left path ends in a string or none and the right one in a
    /// string or none, else rendered by it (same fallback as `Path`; an undefined name's error
    /// under strict undefined behaviour stays the template's).
    Or {
        /// The left path, from the root.
        left: Vec<String>,
        /// What `or` gives when the left is empty or none.
        right: Alternative,
        /// The compiled template of the same expression.
        template: String,
    },
}

/// The right side of a [`FieldTemplate::Or`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Alternative {
    /// Another path.
    Path(Vec<String>),
    /// A quoted string, as written between its quotes.
    Literal(String),
}

/// `expr` as `path or path` or `path or 'text'` (a string without quotes or backslashes inside).
fn or_expression(expr: &str) -> Option<(Vec<String>, Alternative)> {
    let (left, right) = expr.split_once(" or ")?;
    let left = plain_path(left)?;
    let right = right.trim();
    let quoted = ['\'', '"']
        .iter()
        .find_map(|&q| right.strip_prefix(q)?.strip_suffix(q))
        .filter(|text| !text.contains(['\'', '"', '\\']));
    let right = match quoted {
        Some(text) => Alternative::Literal(text.to_owned()),
        None => Alternative::Path(plain_path(right)?),
    };
    Some((left, right))
}

/// What `left or right` gives, as its template would render it, when the left path ends in a
/// string or none and the right in a string or none (within [`MAX_RENDERED_BYTES`]); `None`
/// otherwise (the template then answers).
fn read_or(ctx: &impl Lookup, left: &[String], right: &Alternative) -> Option<Value> {
    use minijinja::value::ValueKind;
    let scalar = |found: Found<'_>| -> Option<Value> {
        match found {
            Found::Null => Some(Value::Null),
            Found::Str(text) => {
                (text.len() <= MAX_RENDERED_BYTES).then(|| Value::String(text.to_owned()))
            }
            Found::Number(_) => None,
            Found::Template(value) => match value.kind() {
                ValueKind::None => Some(Value::Null),
                ValueKind::String => value
                    .as_str()
                    .filter(|s| s.len() <= MAX_RENDERED_BYTES)
                    .map(|s| Value::String(s.to_owned())),
                _ => None,
            },
        }
    };
    match scalar(ctx.lookup(left)?)? {
        Value::String(text) if !text.is_empty() => Some(Value::String(text)),
        _ => match right {
            Alternative::Literal(text) => Some(Value::String(text.clone())),
            Alternative::Path(path) => scalar(ctx.lookup(path)?),
        },
    }
}

/// One piece of a [`FieldTemplate::Text`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text as written.
    Literal(String),
    /// `{{ path }}` or `{{ path | lower }}`.
    Path {
        /// The context's keys, from the root.
        path: Vec<String>,
        /// Through `lower`.
        lower: bool,
    },
}

/// `expr` as a plain path, maybe through `| lower` (`attendee.email | lower`).
fn path_expression(expr: &str) -> Option<(Vec<String>, bool)> {
    match expr.split_once('|') {
        None => Some((plain_path(expr)?, false)),
        Some((path, filter)) if filter.trim() == "lower" => Some((plain_path(path)?, true)),
        Some(_) => None,
    }
}

/// The pieces of a template made only of text and `{{ path }}` / `{{ path | lower }}`; `None`
/// for anything else: tags, comments, whitespace control (`{{-`), or a final newline (which
/// minijinja drops), so that joining the pieces is exactly what the template renders.
fn text_pieces(text: &str) -> Option<Vec<Piece>> {
    if text.contains("{%") || text.contains("{#") || text.ends_with('\n') {
        return None;
    }
    let mut pieces = Vec::new();
    let literal = |text: &str, pieces: &mut Vec<Piece>| {
        (!text.contains("}}")).then(|| {
            if !text.is_empty() {
                pieces.push(Piece::Literal(text.to_owned()));
            }
        })
    };
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        literal(&rest[..start], &mut pieces)?;
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        let expr = &after[..end];
        if expr.starts_with(['-', '+']) || expr.ends_with(['-', '+']) {
            return None;
        }
        let (path, lower) = path_expression(expr)?;
        pieces.push(Piece::Path { path, lower });
        rest = &after[end + 2..];
    }
    literal(rest, &mut pieces)?;
    Some(pieces)
}

/// The value at `path` in `ctx`, `None` when a segment is undefined.
fn value_at(ctx: &minijinja::Value, path: &[String]) -> Option<minijinja::Value> {
    let mut value = ctx.clone();
    for segment in path {
        value = value.get_attr(segment).ok()?;
        if value.is_undefined() {
            return None;
        }
    }
    Some(value)
}

/// A value read at a path of the context: a field of the event as it is, or a template value.
#[derive(Debug)]
enum Found<'a> {
    /// A string field.
    Str(&'a str),
    /// An optional field that is absent (the template's `none`).
    Null,
    /// A number field.
    Number(u64),
    /// Anything else, read from the template context.
    Template(minijinja::Value),
}

impl Found<'_> {
    /// The text of a string, whichever way it was read.
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(text) => Some(text),
            Self::Template(value) => value.as_str(),
            Self::Null | Self::Number(_) => None,
        }
    }
}

/// Reads a path of the context (`None`: undefined there).
trait Lookup {
    fn lookup(&self, path: &[String]) -> Option<Found<'_>>;
}

/// A bare template context, as the tests of the readers build one.
#[cfg(test)]
impl Lookup for minijinja::Value {
    fn lookup(&self, path: &[String]) -> Option<Found<'_>> {
        value_at(self, path).map(Found::Template)
    }
}

/// The event's values as the templates see them, converted to template values only when a
/// template runs, and then once for all the booking's records.
struct EventValues<'a> {
    event: &'a BookingEvent,
    /// `event.time`, canonical, formatted when a template or a read needs it.
    time: OnceCell<String>,
    /// The fields of `booking` the mapping's templates read; `None`: all of them.
    booking_fields: Option<&'a [&'static str]>,
    event_value: OnceCell<minijinja::Value>,
    /// `booking` with the fields of `booking_fields` only.
    booking_read: OnceCell<minijinja::Value>,
    booking_whole: OnceCell<minijinja::Value>,
}

impl<'a> EventValues<'a> {
    fn new(event: &'a BookingEvent, booking_fields: Option<&'a [&'static str]>) -> Self {
        Self {
            event,
            time: OnceCell::new(),
            booking_fields,
            event_value: OnceCell::new(),
            booking_read: OnceCell::new(),
            booking_whole: OnceCell::new(),
        }
    }

    /// `event.time`, canonical.
    fn time(&self) -> &str {
        self.time
            .get_or_init(|| crate::event::timestamp::canonical(self.event.time))
    }

    /// `event` as a template value.
    fn event_value(&self) -> &minijinja::Value {
        self.event_value.get_or_init(|| {
            to_value(&EventContext {
                id: &self.event.id,
                event_type: self.event.kind.cloudevents_type(),
                time: self.time(),
                source: &self.event.source,
            })
        })
    }

    /// `booking` as a template value: all of it when `whole`, else the fields the mapping's
    /// templates read.
    fn booking(&self, whole: bool) -> &minijinja::Value {
        let booking = &self.event.booking;
        match self.booking_fields {
            Some(fields) if !whole => self.booking_read.get_or_init(|| {
                minijinja::Value::from_pairs(
                    fields
                        .iter()
                        .map(|&name| (name, booking_field(booking, name))),
                )
            }),
            _ => self.booking_whole.get_or_init(|| to_value(booking)),
        }
    }
}

/// The fields of [`crate::event::Booking`] in the order it serialises them (a test holds the
/// two together).
const BOOKING_FIELDS: [&str; 13] = [
    "booking_id",
    "version",
    "status",
    "title",
    "starts_at",
    "ends_at",
    "timezone",
    "location",
    "portal",
    "host",
    "attendees",
    "answers",
    "cancel_reason",
];

/// The statements with which a template reaches its context in ways
/// `undeclared_variables` does not report (see [`booking_fields_read`]).
const CONTEXT_STATEMENTS: [&str; 9] = [
    "set", "with", "macro", "call", "block", "include", "extends", "import", "from",
];

/// The keyword of each statement tag (`{% set …`, `{%- include …`) in a template's source.
fn statements(source: &str) -> impl Iterator<Item = &str> {
    source.split("{%").skip(1).map(|tag| {
        let tag = tag.trim_start_matches(['-', '+']).trim_start();
        let end = tag
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tag.len());
        &tag[..end]
    })
}

/// One field of `booking` as the template context holds it: what converting the whole
/// booking gives for that field.
fn booking_field(booking: &crate::event::Booking, name: &str) -> minijinja::Value {
    match name {
        "booking_id" => to_value(&booking.booking_id),
        "version" => to_value(&booking.version),
        "status" => to_value(&booking.status),
        "title" => to_value(&booking.title),
        "starts_at" => to_value(&booking.starts_at),
        "ends_at" => to_value(&booking.ends_at),
        "timezone" => to_value(&booking.timezone),
        "location" => to_value(&booking.location),
        "portal" => to_value(&booking.portal),
        "host" => to_value(&booking.host),
        "attendees" => to_value(&booking.attendees),
        "answers" => to_value(&booking.answers),
        "cancel_reason" => to_value(&booking.cancel_reason),
        _ => minijinja::Value::UNDEFINED,
    }
}

/// The fields of `booking` read by the templates that always run through minijinja (a record's
/// `when`, and fields that are neither a plain path, an `or` of paths nor text with paths), in
/// [`BOOKING_FIELDS`] order; `None` when one uses `booking` as a whole (`booking | tojson`,
/// `booking[key]`, `{% set b = booking %}`) or names a field it does not have, so that the whole
/// booking is converted and the template sees (and fails on) exactly what it would anyway. The
/// templates behind the direct reads ([`FieldTemplate::Path`] …) run only when a read cannot
/// answer, and then see the whole booking.
///
/// Why: converting the whole booking (its attendees, answers, host and portal) into template
/// values cost about a third of planning a booking, and a mapping's templates read two or three
/// of its fields. minijinja lists the variables a template reads, with their attribute paths
/// (`Template::undeclared_variables(true)`), from the template alone — but not every way a
/// template reaches the context: an assignment marks its target before reading its value, so
/// `{% set booking = booking.host %}` reads `booking` unreported (as do `with`, a macro's
/// defaults and a block `set`); `include`, `extends` and `import` run another template (one of
/// the mapping's, by its name) on this context; `debug()` prints the whole context. A template
/// with any of those statements ([`CONTEXT_STATEMENTS`]) or calling `debug` gets the whole booking.
fn booking_fields_read(
    env: &minijinja::Environment<'_>,
    records: &[CompiledRecord],
) -> Option<Vec<&'static str>> {
    let run = records.iter().flat_map(|record| {
        let templates = std::iter::once(&record.external_id)
            .chain(record.fields.iter().map(|(_, template)| template))
            .filter_map(|template| match template {
                FieldTemplate::Expression(name) | FieldTemplate::Template(name) => Some(name),
                _ => None,
            });
        record.when.iter().chain(templates)
    });
    let mut read = Vec::new();
    for name in run {
        let template = env.get_template(name).ok()?;
        if statements(template.source()).any(|s| CONTEXT_STATEMENTS.contains(&s)) {
            return None;
        }
        for variable in template.undeclared_variables(true) {
            if variable == "booking" || variable == "debug" {
                return None;
            }
            let Some(path) = variable.strip_prefix("booking.") else {
                continue;
            };
            let field = path.split('.').next().unwrap_or_default();
            let known = BOOKING_FIELDS.iter().find(|&&f| f == field)?;
            if !read.contains(known) {
                read.push(*known);
            }
        }
    }
    read.sort_by_key(|f| BOOKING_FIELDS.iter().position(|k| k == f));
    Some(read)
}

/// What the templates of one record see: `tenant`, `event`, `booking`, `attendee` (per-attendee
/// records), `attendee_index`, `host_user_id` and `integration_user_id`. A path that names a
/// field of the event (`booking.title`, `attendee.email`) is read from it directly, which is
/// most of a mapping; the template context is built only when a template runs or another path
/// is read (`booking.answers.…`), the first time it is needed.
struct Scope<'a> {
    tenant: &'a str,
    values: &'a EventValues<'a>,
    attendee: Option<&'a Attendee>,
    attendee_index: usize,
    enrichment: &'a Enrichment,
    ctx: OnceCell<minijinja::Value>,
    whole_ctx: OnceCell<minijinja::Value>,
}

impl<'a> Scope<'a> {
    /// The template context, with the whole booking or (unless `whole`) the fields of it the
    /// mapping's templates read ([`booking_fields_read`]).
    fn ctx(&self, whole: bool) -> &minijinja::Value {
        let whole = whole || self.values.booking_fields.is_none();
        let cell = if whole { &self.whole_ctx } else { &self.ctx };
        cell.get_or_init(|| {
            minijinja::context! {
                tenant => self.tenant,
                event => self.values.event_value().clone(),
                booking => self.values.booking(whole).clone(),
                attendee => self.attendee.map(to_value),
                attendee_index => self.attendee_index,
                host_user_id => self.enrichment.host_user_id.as_deref(),
                integration_user_id => &self.enrichment.integration_user_id,
            }
        })
    }

    /// The field of the event or of the enrichment at `path`, as the template context holds
    /// it (a string, none or a number); `None` for any other path.
    fn field(&self, path: &[String]) -> Option<Found<'a>> {
        let text = |s: &'a str| Some(Found::Str(s));
        let optional = |s: &'a Option<String>| Some(s.as_deref().map_or(Found::Null, Found::Str));
        let event = self.values.event;
        let booking = &event.booking;
        // At most three segments name a field; kept on the stack (this runs for most fields of
        // every record).
        let mut segments = [""; 3];
        if path.len() > segments.len() {
            return None;
        }
        for (segment, name) in segments.iter_mut().zip(path) {
            *segment = name;
        }
        match &segments[..path.len()] {
            ["tenant"] => text(self.tenant),
            ["attendee_index"] => Some(Found::Number(self.attendee_index as u64)),
            ["host_user_id"] => optional(&self.enrichment.host_user_id),
            ["integration_user_id"] => text(&self.enrichment.integration_user_id),
            ["event", "id"] => text(&event.id),
            ["event", "type"] => text(event.kind.cloudevents_type()),
            ["event", "time"] => text(self.values.time()),
            ["event", "source"] => text(&event.source),
            ["booking", "booking_id"] => text(&booking.booking_id),
            ["booking", "version"] => Some(Found::Number(booking.version)),
            ["booking", "status"] => text(&booking.status),
            ["booking", "title"] => text(&booking.title),
            ["booking", "starts_at"] => text(&booking.starts_at),
            ["booking", "ends_at"] => text(&booking.ends_at),
            ["booking", "timezone"] => text(&booking.timezone),
            ["booking", "location"] => optional(&booking.location),
            ["booking", "cancel_reason"] => optional(&booking.cancel_reason),
            ["booking", "portal", "id"] => text(&booking.portal.id),
            ["booking", "portal", "name"] => text(&booking.portal.name),
            ["booking", "host", "email"] => text(&booking.host.email),
            ["booking", "host", "name"] => text(&booking.host.name),
            ["attendee", name] => {
                let attendee = self.attendee?;
                match *name {
                    "email" => text(&attendee.email),
                    "first_name" => optional(&attendee.first_name),
                    "last_name" => text(&attendee.last_name),
                    "company" => optional(&attendee.company),
                    "phone" => optional(&attendee.phone),
                    "title" => optional(&attendee.title),
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl Lookup for Scope<'_> {
    fn lookup(&self, path: &[String]) -> Option<Found<'_>> {
        self.field(path)
            .or_else(|| value_at(self.ctx(true), path).map(Found::Template))
    }
}

/// What the template of `pieces` renders, when every path ends in a string and the whole is
/// within [`MAX_RENDERED_BYTES`]; `None` otherwise (the template then answers).
fn join_pieces(ctx: &impl Lookup, pieces: &[Piece]) -> Option<String> {
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Literal(text) => out.push_str(text),
            Piece::Path { path, lower } => {
                let value = ctx.lookup(path)?;
                let text = value.as_str()?;
                if *lower {
                    out.push_str(&text.to_lowercase());
                } else {
                    out.push_str(text);
                }
            }
        }
        if out.len() > MAX_RENDERED_BYTES {
            return None;
        }
    }
    Some(out)
}

/// The segments of `expr` when it is a plain dotted path of names (`attendee.email`).
fn plain_path(expr: &str) -> Option<Vec<String>> {
    let segments: Vec<String> = expr.trim().split('.').map(str::to_owned).collect();
    let name = |s: &String| {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !matches!(
                s.as_str(),
                "none" | "true" | "false" | "None" | "True" | "False"
            )
    };
    segments.iter().all(name).then_some(segments)
}

#[derive(Debug, Clone)]
struct CompiledRecord {
    reference: String,
    sobject: String,
    delete: bool,
    per_attendee: bool,
    /// The template of its `when`: renders `1` when the record is written.
    when: Option<String>,
    external_id_field: String,
    external_id: FieldTemplate,
    fields: Vec<(String, FieldTemplate)>,
    invalid_value: crate::config::InvalidValue,
    invalid_value_fields: std::collections::BTreeMap<String, crate::config::InvalidValue>,
}

/// A tenant's mapping, compiled.
pub struct CompiledMapping {
    tenant: String,
    api_version: String,
    env: minijinja::Environment<'static>,
    records: Vec<CompiledRecord>,
    relations: Option<relations::RelationSpec>,
    /// The fields of `booking` the templates read (see [`booking_fields_read`]).
    booking_fields: Option<Vec<&'static str>>,
}

impl std::fmt::Debug for CompiledMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledMapping")
            .field("tenant", &self.tenant)
            .field("records", &self.records.len())
            .finish()
    }
}

#[derive(Serialize)]
struct EventContext<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    time: &'a str,
    source: &'a str,
}

/// Filters the mapping language adds to minijinja's builtins (`lower`, `upper`, `default`,
/// `replace`, …) and minijinja-contrib's (`truncate`, …).
mod filters {
    use minijinja::{Error, ErrorKind};
    use time::OffsetDateTime;

    /// `"+47 555 01234"` → `"+4755501234"`: digits, with the leading `+` kept.
    pub fn phone(value: Option<String>) -> Option<String> {
        let value = value?;
        let digits: String = value.chars().filter(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return None;
        }
        Some(if value.trim_start().starts_with('+') {
            format!("+{digits}")
        } else {
            digits
        })
    }

    /// The decoder's reader, so a template accepts the same RFC 3339 spellings as an event.
    fn parse(value: &str) -> Result<OffsetDateTime, Error> {
        crate::event::timestamp::parse(value)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
    }

    fn format(at: OffsetDateTime, pattern: &str) -> Result<String, Error> {
        let description = time::format_description::parse_borrowed::<2>(pattern).map_err(|e| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("bad format {pattern:?}: {e}"),
            )
        })?;
        at.format(&description)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
    }

    /// A timestamp in UTC, formatted (default `[year]-[month]-[day] [hour]:[minute] UTC`).
    pub fn datetime(value: String, pattern: Option<String>) -> Result<String, Error> {
        let at = parse(&value)?.to_offset(time::UtcOffset::UTC);
        format(
            at,
            pattern
                .as_deref()
                .unwrap_or("[year]-[month]-[day] [hour]:[minute] UTC"),
        )
    }

    /// A single-expression field's value as JSON, keeping its type; an undefined value is an
    /// error (unlike `tojson`, which would turn a typo into null).
    pub fn typed(value: minijinja::Value) -> Result<String, Error> {
        if value.is_undefined() {
            return Err(Error::new(
                ErrorKind::UndefinedError,
                "the expression is undefined for this event",
            ));
        }
        serde_json::to_string(&value)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
    }

    /// The calendar date of a timestamp in UTC (`[year]-[month]-[day]`), like every date the
    /// product writes.
    pub fn date(value: String) -> Result<String, Error> {
        format(
            parse(&value)?.to_offset(time::UtcOffset::UTC),
            "[year]-[month]-[day]",
        )
    }
}

/// A render's output, refusing to grow past [`MAX_RENDERED_BYTES`].
#[derive(Default)]
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered size cap"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A template error for people: running out of fuel is said in the mapping's terms.
fn bounded_message(error: &minijinja::Error) -> String {
    if error.kind() == minijinja::ErrorKind::OutOfFuel {
        format!(
            "the template takes more than {TEMPLATE_FUEL} steps (the limit on one field's work); \
             simplify its loops"
        )
    } else {
        error.to_string()
    }
}

/// The fix of a template that does not compile.
const SYNTAX_FIX: &str =
    "correct the template (minijinja syntax: {{ expression }}, {% if … %}…{% endif %})";

/// A serializable value as a template value.
fn to_value<T: Serialize>(value: &T) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(value))
}

fn valid_reference(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 30
}

/// A single `{{ expression }}` with nothing around it.
fn single_expression(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}") && !inner.contains("{%")).then_some(inner)
}

fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%")
}

/// The scalar at `path` in `ctx` as JSON, as the `portals_crm_typed` filter would give it
/// (after `lower`, when `lower`: then only a string is read); `None` when the path is
/// undefined, not such a scalar, or a string over the size cap (the template then answers,
/// with its error).
fn read_path(ctx: &impl Lookup, path: &[String], lower: bool) -> Option<Value> {
    use minijinja::value::ValueKind;
    let found = ctx.lookup(path)?;
    if lower {
        return found
            .as_str()
            .filter(|s| s.len() <= MAX_RENDERED_BYTES)
            .map(|s| Value::String(s.to_lowercase()));
    }
    let value = match found {
        Found::Str(text) => {
            return (text.len() <= MAX_RENDERED_BYTES).then(|| Value::String(text.to_owned()));
        }
        Found::Null => return Some(Value::Null),
        Found::Number(n) => return Some(Value::from(n)),
        Found::Template(value) => value,
    };
    match value.kind() {
        ValueKind::String
            if value
                .as_str()
                .is_some_and(|s| s.len() <= MAX_RENDERED_BYTES) =>
        {
            serde_json::to_value(&value).ok()
        }
        ValueKind::None | ValueKind::Bool | ValueKind::Number => serde_json::to_value(&value).ok(),
        _ => None,
    }
}

/// `@{name.` references inside a constant.
fn references(text: &str) -> Vec<&str> {
    text.match_indices("@{")
        .filter_map(|(at, _)| {
            let rest = &text[at + 2..];
            let end = rest.find(['.', '}'])?;
            Some(&rest[..end])
        })
        .collect()
}

impl CompiledMapping {
    /// Compiles a tenant's mapping; every problem is reported, naming tenant, record and field.
    pub fn compile(tenant: &TenantConfig) -> Result<Self, Vec<String>> {
        Self::check(tenant).map_err(|found| found.iter().map(ToString::to_string).collect())
    }

    /// As [`CompiledMapping::compile`], each problem structured (record, `Object.field`, problem,
    /// fix) as the validator answers, for the console to show beside the field it concerns.
    pub fn check(tenant: &TenantConfig) -> Result<Self, Vec<MappingProblem>> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_filter("phone", filters::phone);
        env.add_filter("datetime", filters::datetime);
        env.add_filter("date", filters::date);
        env.add_filter("portals_crm_typed", filters::typed);
        let mut problems = Vec::new();
        let mut records = Vec::new();
        let mut known: Vec<(String, bool)> = Vec::new();
        let t = &tenant.tenant;
        if tenant.records.is_empty() {
            problems.push(MappingProblem {
                tenant: t.clone(),
                record: String::new(),
                target: String::new(),
                problem: "the mapping lists no records".into(),
                fix: "add a record (one per Salesforce record to write)".into(),
            });
        }
        for (index, record) in tenant.records.iter().enumerate() {
            let name = &record.reference;
            let at = |field: &str, problem: String, fix: &str| MappingProblem {
                tenant: t.clone(),
                record: name.clone(),
                target: if field.is_empty() {
                    record.sobject.clone()
                } else {
                    format!("{}.{field}", record.sobject)
                },
                problem,
                fix: fix.to_owned(),
            };
            if !valid_reference(name) {
                problems.push(at(
                    "ref",
                    "ref must start with a letter and hold only letters, digits and _ (at most 30)"
                        .into(),
                    "rename the record",
                ));
            }
            if known.iter().any(|(k, _)| k == name) {
                problems.push(at(
                    "ref",
                    "ref is used twice".into(),
                    "give each record its own ref",
                ));
            }
            let per_attendee = match record.for_each.as_deref() {
                None => false,
                Some("attendees") => true,
                Some(other) => {
                    problems.push(at(
                        "for_each",
                        format!("for_each must be \"attendees\", not {other:?}"),
                        "set for_each to \"attendees\" or leave it out",
                    ));
                    false
                }
            };
            if record.external_id_field.trim().is_empty() {
                problems.push(at(
                    "external_id_field",
                    "external_id_field is empty".into(),
                    "pick the External ID field that keys the upsert",
                ));
            }
            let mut compile_value =
                |field: &str, value: &Value, env: &mut minijinja::Environment<'static>| {
                    let Value::String(text) = value else {
                        return Some(FieldTemplate::Constant(value.clone()));
                    };
                    if !is_template(text) {
                        for target in references(text) {
                            let ok = known.iter().any(|(k, each)| {
                                if *each {
                                    target
                                        .strip_prefix(k.as_str())
                                        .and_then(|rest| rest.strip_prefix('_'))
                                        .is_some_and(|n| n.parse::<usize>().is_ok())
                                } else {
                                    target == k
                                }
                            });
                            if !ok {
                                problems.push(at(
                                    field,
                                    format!("@{{{target}…}} refers to no earlier record"),
                                    "refer to a record listed above this one",
                                ));
                            }
                        }
                        return Some(FieldTemplate::Constant(value.clone()));
                    }
                    let template_name = format!("{index}.{name}.{field}");
                    if let Some(expr) = single_expression(text) {
                        if let Err(e) = env.compile_expression(expr) {
                            problems.push(at(field, e.to_string(), SYNTAX_FIX));
                            return None;
                        }
                        return match env.add_template_owned(
                            template_name.clone(),
                            format!("{{{{ ({expr}) | portals_crm_typed }}}}"),
                        ) {
                            Ok(()) => Some(match (path_expression(expr), or_expression(expr)) {
                                (Some((path, lower)), _) => FieldTemplate::Path {
                                    path,
                                    lower,
                                    template: template_name,
                                },
                                (None, Some((left, right))) => FieldTemplate::Or {
                                    left,
                                    right,
                                    template: template_name,
                                },
                                (None, None) => FieldTemplate::Expression(template_name),
                            }),
                            Err(e) => {
                                problems.push(at(field, e.to_string(), SYNTAX_FIX));
                                None
                            }
                        };
                    }
                    match env.add_template_owned(template_name.clone(), text.clone()) {
                        Ok(()) => Some(match text_pieces(text) {
                            Some(pieces) => FieldTemplate::Text {
                                pieces,
                                template: template_name,
                            },
                            None => FieldTemplate::Template(template_name),
                        }),
                        Err(e) => {
                            problems.push(at(field, e.to_string(), SYNTAX_FIX));
                            None
                        }
                    }
                };
            let external_id = compile_value(
                "external_id",
                &Value::String(record.external_id.clone()),
                &mut env,
            );
            let mut fields = Vec::new();
            for (field, value) in &record.fields {
                if let Some(template) = compile_value(field, value, &mut env) {
                    fields.push((field.clone(), template));
                }
            }
            if record.action == Action::Delete && !record.fields.is_empty() {
                problems.push(at(
                    "",
                    "a delete record takes no fields".into(),
                    "remove its fields, or make it an upsert",
                ));
            }
            // Compiled once, here, as a template that renders `1` when the expression is true
            // (an expression compiled per booking would be parsed again for every one).
            let when = record.when.as_ref().and_then(|when| {
                let compiled = env.compile_expression(when).map(drop).and_then(|()| {
                    let name = format!("{index}.{name}.when");
                    env.add_template_owned(
                        name.clone(),
                        format!("{{% if ({when}) %}}1{{% endif %}}"),
                    )
                    .map(|()| name)
                });
                compiled
                    .map_err(|e| problems.push(at("when", e.to_string(), SYNTAX_FIX)))
                    .ok()
            });
            known.push((name.clone(), per_attendee));
            if let Some(external_id) = external_id {
                records.push(CompiledRecord {
                    reference: name.clone(),
                    sobject: record.sobject.clone(),
                    delete: record.action == Action::Delete,
                    per_attendee,
                    when,
                    external_id_field: record.external_id_field.clone(),
                    external_id,
                    fields,
                    invalid_value: record.invalid_value,
                    invalid_value_fields: record.invalid_value_fields.clone(),
                });
            }
        }
        if let Some(mapping) = &tenant.relations {
            problems.extend(check_relations(t, mapping, &tenant.records));
        }
        if problems.is_empty() {
            Ok(Self {
                tenant: tenant.tenant.clone(),
                api_version: tenant.org.api_version.clone(),
                booking_fields: booking_fields_read(&env, &records),
                env,
                records,
                relations: tenant.relations.as_ref().map(relations::RelationSpec::from),
            })
        } else {
            Err(problems)
        }
    }

    fn render(
        &self,
        record: &CompiledRecord,
        field: &str,
        template: &FieldTemplate,
        ctx: &Scope<'_>,
    ) -> Result<Value, PlanError> {
        let fail = |message: String| PlanError {
            record: record.reference.clone(),
            field: field.to_owned(),
            message,
        };
        match template {
            FieldTemplate::Constant(value) => Ok(value.clone()),
            FieldTemplate::Path {
                path,
                lower,
                template,
            } => match read_path(ctx, path, *lower) {
                Some(value) => Ok(value),
                None => self
                    .render_expression(template, ctx.ctx(true))
                    .map_err(fail),
            },
            FieldTemplate::Or {
                left,
                right,
                template,
            } => match read_or(ctx, left, right) {
                Some(value) => Ok(value),
                None => self
                    .render_expression(template, ctx.ctx(true))
                    .map_err(fail),
            },
            FieldTemplate::Text { pieces, template } => match join_pieces(ctx, pieces) {
                Some(text) => Ok(Value::String(text)),
                None => self
                    .render_bounded(template, ctx.ctx(true))
                    .map(Value::String)
                    .map_err(fail),
            },
            FieldTemplate::Expression(name) => {
                self.render_expression(name, ctx.ctx(false)).map_err(fail)
            }
            FieldTemplate::Template(name) => self
                .render_bounded(name, ctx.ctx(false))
                .map(Value::String)
                .map_err(fail),
        }
    }

    /// The typed value an expression's template renders (as JSON, [`filters::typed`]). Strict
    /// undefined behaviour makes an unknown name an error here, not a null.
    fn render_expression(&self, name: &str, ctx: &minijinja::Value) -> Result<Value, String> {
        let json = self.render_bounded(name, ctx)?;
        serde_json::from_str(&json).map_err(|e| e.to_string())
    }

    /// What the mapping says happens to a value of `field` the org refuses, for the graph node
    /// `reference_id` (`lead_0` is a record of `ref = "lead"` with `for_each`). A node no
    /// mapping record wrote (an EventRelation) fails.
    pub fn invalid_value_for(
        &self,
        reference_id: &str,
        field: &str,
    ) -> crate::config::InvalidValue {
        self.records
            .iter()
            .find(|r| {
                if r.per_attendee {
                    reference_id
                        .strip_prefix(r.reference.as_str())
                        .and_then(|rest| rest.strip_prefix('_'))
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                } else {
                    reference_id == r.reference
                }
            })
            .map_or(crate::config::InvalidValue::Fail, |r| {
                r.invalid_value_fields
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(field))
                    .map_or(r.invalid_value, |(_, treatment)| *treatment)
            })
    }

    /// The relations mapping, if the tenant relates records to the Event.
    pub fn relations(&self) -> Option<&relations::RelationSpec> {
        self.relations.as_ref()
    }

    /// The REST API version the nodes' URLs use.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// Renders template `name` within [`TEMPLATE_FUEL`] and [`MAX_RENDERED_BYTES`]; the error
    /// says which bound was hit.
    fn render_bounded(&self, name: &str, ctx: &minijinja::Value) -> Result<String, String> {
        let template = self.env.get_template(name).map_err(|e| e.to_string())?;
        let mut out = CappedOutput::default();
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|e| e.to_string()),
            Err(_) if out.overflowed => Err(format!(
                "renders more than {MAX_RENDERED_BYTES} bytes (the cap on one field's value)"
            )),
            Err(e) => Err(bounded_message(&e)),
        }
    }

    /// Renders the graph nodes for one booking: upserts in mapping order, then deletes — after
    /// the version-guarded booking record, so a stale snapshot deletes nothing.
    pub fn build_graph(
        &self,
        event: &BookingEvent,
        enrichment: &Enrichment,
    ) -> Result<Vec<Subrequest>, PlanError> {
        let mut deletes = Vec::new();
        // Everything but the attendee is the same for every record: converted once, if at all.
        let values = EventValues::new(event, self.booking_fields.as_deref());
        let mut nodes = Vec::new();
        for record in &self.records {
            let attendees: Vec<(usize, Option<&Attendee>)> = if record.per_attendee {
                event
                    .booking
                    .attendees
                    .iter()
                    .map(Some)
                    .enumerate()
                    .collect()
            } else {
                vec![(0, None)]
            };
            for (index, attendee) in attendees {
                let ctx = Scope {
                    tenant: &self.tenant,
                    values: &values,
                    attendee,
                    attendee_index: index,
                    enrichment,
                    ctx: OnceCell::new(),
                    whole_ctx: OnceCell::new(),
                };
                if let Some(when) = &record.when {
                    let keep = self
                        .render_bounded(when, ctx.ctx(false))
                        .map_err(|message| PlanError {
                            record: record.reference.clone(),
                            field: "when".into(),
                            message,
                        })?;
                    if keep.is_empty() {
                        continue;
                    }
                }
                let key = match self.render(record, "external_id", &record.external_id, &ctx)? {
                    Value::String(s) => s,
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                if key.trim().is_empty() {
                    return Err(PlanError {
                        record: record.reference.clone(),
                        field: "external_id".into(),
                        message: "renders empty".into(),
                    });
                }
                let reference = if record.per_attendee {
                    format!("{}_{index}", record.reference)
                } else {
                    record.reference.clone()
                };
                let url = format!(
                    "/services/data/v{}/sobjects/{}/{}/{}",
                    self.api_version,
                    record.sobject,
                    record.external_id_field,
                    encode_segment(&key)
                );
                if record.delete {
                    deletes.push(Subrequest {
                        method: "DELETE".into(),
                        url,
                        reference_id: reference,
                        body: None,
                    });
                    continue;
                }
                let mut fields = Vec::with_capacity(record.fields.len());
                for (field, template) in &record.fields {
                    fields.push((field.as_str(), self.render(record, field, template, &ctx)?));
                }
                let body = Body::fields(&fields).map_err(|e| PlanError {
                    record: record.reference.clone(),
                    field: "body".into(),
                    message: e.to_string(),
                })?;
                nodes.push(Subrequest {
                    method: "PATCH".into(),
                    url,
                    reference_id: reference,
                    body: Some(body),
                });
            }
        }
        nodes.extend(deletes);
        Ok(nodes)
    }

    /// The graph a first write of `event` sends: [`CompiledMapping::build_graph`]'s nodes, then,
    /// when the tenant relates records to the Event (`[relations]`), an `EventRelation` create
    /// for every attendee's record ([`relations::changes`] with none existing yet), as the
    /// batcher appends them. What the previews show: the worker reads the Event's relations
    /// first, so a later version of a booking sends only what changed.
    ///
    /// # Errors
    /// As [`CompiledMapping::build_graph`].
    pub fn first_write_graph(
        &self,
        event: &BookingEvent,
        enrichment: &Enrichment,
    ) -> Result<Vec<Subrequest>, PlanError> {
        let mut nodes = self.build_graph(event, enrichment)?;
        if let Some(wanted) = self
            .relations
            .as_ref()
            .and_then(|spec| spec.wanted(&nodes, &[]))
        {
            let created = relations::changes(&self.api_version, &wanted, &[]);
            nodes.extend(created.into_iter().filter_map(|change| change.node));
        }
        Ok(nodes)
    }
}

/// The problems of a `[relations]` mapping: it must name an Event record and a per-attendee
/// record, and the Event may not also set its Who (`WhoId`) when a parent relation does.
fn check_relations(
    t: &str,
    mapping: &crate::config::RelationsMapping,
    records: &[crate::config::RecordMapping],
) -> Vec<MappingProblem> {
    let problem = |record: &str, target: &str, problem: String, fix: &str| MappingProblem {
        tenant: t.to_owned(),
        record: record.to_owned(),
        target: target.to_owned(),
        problem,
        fix: fix.to_owned(),
    };
    let mut problems = Vec::new();
    let upsert = |name: &str| {
        records
            .iter()
            .find(|r| r.reference == name && r.action == Action::Upsert)
    };
    match upsert(&mapping.event) {
        None => problems.push(problem(
            "relations",
            "event",
            format!("no upsert record has ref {:?}", mapping.event),
            "name the ref of the Event record in relations.event",
        )),
        Some(event) if event.sobject != "Event" => problems.push(problem(
            "relations",
            "event",
            format!(
                "record {} writes {}, not Event",
                event.reference, event.sobject
            ),
            "name the ref of the Event record in relations.event",
        )),
        Some(event)
            if mapping.parent == crate::config::Parent::First
                && event.fields.keys().any(|f| f.eq_ignore_ascii_case("WhoId")) =>
        {
            problems.push(problem(
                &event.reference,
                "Event.WhoId",
                "the parent relation sets the Event's Who".into(),
                "remove WhoId (or set relations.parent = \"none\")",
            ));
        }
        Some(_) => {}
    }
    match upsert(&mapping.records) {
        None => problems.push(problem(
            "relations",
            "records",
            format!("no upsert record has ref {:?}", mapping.records),
            "name the ref of the attendees' records in relations.records",
        )),
        Some(record) if record.for_each.is_none() => problems.push(problem(
            "relations",
            "records",
            format!("record {} is written once per booking", record.reference),
            "give that record for_each = \"attendees\"",
        )),
        Some(record) if !["Lead", "Contact", "User"].contains(&record.sobject.as_str()) => {
            problems.push(problem(
                "relations",
                "records",
                format!(
                    "record {} writes {}; an Event relates people (Lead, Contact, User)",
                    record.reference, record.sobject
                ),
                "relate the Lead, Contact or User records of the attendees",
            ));
        }
        Some(_) => {}
    }
    if mapping.parent == crate::config::Parent::None && !mapping.invitees {
        problems.push(problem(
            "relations",
            "relations",
            "neither parent nor invitees: nothing to relate".into(),
            "set relations.parent = \"first\" or relations.invitees = true, or remove [relations]",
        ));
    }
    problems
}

/// The sObject of a node's URL (`/services/data/v66.0/sobjects/Lead/…` → `Lead`).
pub fn sobject_of(url: &str) -> &str {
    url.split("/sobjects/")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DEFAULT_MAX_BODY_BYTES, decode};

    fn acme() -> TenantConfig {
        let mut tenant: TenantConfig =
            toml::from_str(include_str!("../../config/tenants/acme.toml")).unwrap();
        tenant.tenant = "acme".into();
        tenant
    }

    fn event(name: &str) -> BookingEvent {
        let text = std::fs::read_to_string(format!("tests/fixtures/events/{name}.json")).unwrap();
        decode(text.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap()
    }

    /// The fields converted for the templates are those they read, in the booking's order.
    #[test]
    fn only_the_booking_fields_the_templates_read_are_converted() {
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        assert_eq!(
            mapping.booking_fields.as_deref(),
            Some(&["status", "title", "answers", "cancel_reason"][..])
        );
    }

    /// A template that uses `booking` as a whole, or a field it lacks, gets all of it.
    #[test]
    fn a_template_using_the_whole_booking_gets_all_of_it() {
        for text in [
            "{{ booking | tojson }}",
            "{{ booking['title'] }}",
            "{% set b = booking %}{{ b.title }}",
            "{% for key in booking %}{{ key }}{% endfor %}",
            "{{ booking.no_such_field | upper }}",
        ] {
            let mut tenant = acme();
            tenant.records[1]
                .fields
                .insert("Subject".into(), Value::String(text.into()));
            let mapping = CompiledMapping::compile(&tenant).unwrap();
            assert_eq!(mapping.booking_fields, None, "{text}");
        }
    }

    /// Templates that reach the context in ways `undeclared_variables` does not report (found
    /// by a review: each rendered differently, or failed, with the booking trimmed) get the
    /// whole booking, and render as they would with it; the others render the same either way.
    #[test]
    fn a_template_reaching_the_context_unreported_gets_the_whole_booking() {
        let unreported = [
            "{% set booking = booking %}{{ booking | tojson }}",
            "{% set booking = booking.host %}{{ booking.name }}",
            "{% with booking = booking %}{{ booking.host.name }}{% endwith %}",
            "{% with booking = booking.portal %}{{ booking.name }}{% endwith %}",
            "{% set booking %}{{ booking.host.name }}{% endset %}{{ booking }}",
            "{% macro m(booking=booking) %}{{ booking.host.name }}{% endmacro %}{{ m() }}",
            "{%- set a, booking = 1, booking %}{{ booking.location }}",
            "{% include '2.booking.BookMe__Portal__c' %}",
            "{% include '1.event.Location' %}",
            "{% extends '2.booking.BookMe__Portal__c' %}",
            "{% import '2.booking.BookMe__Portal__c' as m %}x",
            "{% from '2.booking.BookMe__Portal__c' import nothing %}x",
            "{{ debug() }}",
            "{{ 'Europe/Oslo' in debug() }}",
        ];
        let reported = [
            "{% for a in booking.attendees %}{{ a.email }}{{ loop.index }}{% endfor %}",
            "{% for booking in booking.attendees %}{{ booking.email }}{% endfor %}",
            "{{ booking.attendees | map(attribute='email') | join(',') }}",
            "{{ booking.answers.items() | list }}",
            "{{ booking.get('title') }}",
            "{{ booking.title ~ booking.host.name }}",
            "{{ [booking][0].host.name }}",
            "{% filter upper %}{{ booking.host.name }}{% endfilter %}",
        ];
        for (text, unreported) in unreported
            .iter()
            .map(|t| (t, true))
            .chain(reported.iter().map(|t| (t, false)))
        {
            let mut tenant = acme();
            tenant.records[1]
                .fields
                .insert("Subject".into(), Value::String((*text).into()));
            let mapping = CompiledMapping::compile(&tenant).unwrap();
            if unreported {
                assert_eq!(mapping.booking_fields, None, "{text}");
            }
            // The whole dump also lists the environment's templates, in hash order: it differs
            // between two compilations of one mapping, trimmed or not.
            if *text == "{{ debug() }}" {
                continue;
            }
            let mut whole = CompiledMapping::compile(&tenant).unwrap();
            whole.booking_fields = None;
            for name in ["booked", "booked-group", "cancelled", "rescheduled"] {
                let event = event(name);
                let enrichment = Enrichment::default();
                let render = |m: &CompiledMapping| {
                    m.build_graph(&event, &enrichment)
                        .map_err(|e| e.to_string())
                };
                assert_eq!(render(&mapping), render(&whole), "{text} on {name}");
            }
        }
        let mut tenant = acme();
        tenant.records[1].when = Some("'Europe/Oslo' in debug()".into());
        assert_eq!(
            CompiledMapping::compile(&tenant).unwrap().booking_fields,
            None
        );
    }

    #[test]
    fn statement_keywords_are_read_from_every_tag() {
        let found: Vec<&str> =
            statements("a {% if x %}{%- set y = 1 %}{%+ include 'n' %}{%endif%}{{ z }}").collect();
        assert_eq!(found, ["if", "set", "include", "endif"]);
    }

    /// [`BOOKING_FIELDS`] is the booking's serialisation order, and [`booking_field`] gives
    /// what converting the whole booking gives at each field.
    #[test]
    fn each_booking_field_is_what_the_whole_booking_holds() {
        for name in ["booked", "booked-group", "cancelled", "rescheduled"] {
            let booking = event(name).booking;
            let whole = to_value(&booking);
            let keys: Vec<String> = whole
                .try_iter()
                .unwrap()
                .map(|k| k.as_str().unwrap().to_owned())
                .collect();
            assert_eq!(keys, BOOKING_FIELDS);
            for field in BOOKING_FIELDS {
                assert_eq!(
                    booking_field(&booking, field),
                    whole.get_attr(field).unwrap(),
                    "{name}: {field}"
                );
            }
        }
    }

    /// Converting only the fields read renders the same graph as converting them all.
    #[test]
    fn the_graph_is_the_same_with_the_booking_trimmed() {
        let trimmed = CompiledMapping::compile(&acme()).unwrap();
        let mut whole = CompiledMapping::compile(&acme()).unwrap();
        whole.booking_fields = None;
        for name in ["booked", "booked-group", "cancelled", "rescheduled"] {
            let event = event(name);
            let enrichment = Enrichment::default();
            assert_eq!(
                trimmed.build_graph(&event, &enrichment).unwrap(),
                whole.build_graph(&event, &enrichment).unwrap(),
                "{name}"
            );
        }
    }

    /// Every path a [`Scope`] reads from the event itself gives what the template context
    /// holds at that path (rendered through the typed filter, so types count), for every
    /// sample event, each attendee and none, with and without a host user.
    #[test]
    fn fields_read_from_the_event_are_what_the_template_context_holds() {
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let paths = [
            "tenant",
            "attendee_index",
            "host_user_id",
            "integration_user_id",
            "event.id",
            "event.type",
            "event.time",
            "event.source",
            "booking.booking_id",
            "booking.version",
            "booking.status",
            "booking.title",
            "booking.starts_at",
            "booking.ends_at",
            "booking.timezone",
            "booking.location",
            "booking.cancel_reason",
            "booking.portal.id",
            "booking.portal.name",
            "booking.host.email",
            "booking.host.name",
            "attendee.email",
            "attendee.first_name",
            "attendee.last_name",
            "attendee.company",
            "attendee.phone",
            "attendee.title",
        ];
        let mut compared = 0;
        for name in ["booked", "booked-group", "cancelled", "rescheduled"] {
            let event = event(name);
            let values = EventValues::new(&event, None);
            for host_user_id in [None, Some("005000000000001AAA".to_owned())] {
                let enrichment = Enrichment {
                    host_user_id,
                    integration_user_id: "005000000000002AAA".into(),
                };
                let attendees = event.booking.attendees.iter().map(Some).chain([None]);
                for (index, attendee) in attendees.enumerate() {
                    let scope = Scope {
                        tenant: "acme",
                        values: &values,
                        attendee,
                        attendee_index: index,
                        enrichment: &enrichment,
                        ctx: OnceCell::new(),
                        whole_ctx: OnceCell::new(),
                    };
                    for expr in paths {
                        let path = plain_path(expr).unwrap();
                        let Some(found) = scope.field(&path) else {
                            assert!(attendee.is_none() && expr.starts_with("attendee."));
                            continue;
                        };
                        let typed = match found {
                            Found::Str(text) => Value::String(text.to_owned()),
                            Found::Null => Value::Null,
                            Found::Number(n) => Value::from(n),
                            Found::Template(_) => panic!("{expr} read from the context"),
                        };
                        let template = format!("{{{{ ({expr}) | portals_crm_typed }}}}");
                        let rendered: Value = serde_json::from_str(
                            &mapping.env.render_str(&template, scope.ctx(true)).unwrap(),
                        )
                        .unwrap();
                        assert_eq!(typed, rendered, "{name}: {expr}");
                        compared += 1;
                    }
                    // Other paths are read from the template context.
                    let answers = plain_path("booking.answers").unwrap();
                    assert!(matches!(scope.lookup(&answers), Some(Found::Template(_))));
                }
            }
        }
        assert!(compared > 200, "{compared}");
    }

    /// The previews' graph is the booking's nodes, then one EventRelation create per attendee
    /// (the first as the Who, every one an invitee, under acme's `[relations]`); a mapping
    /// without `[relations]` previews its nodes alone.
    #[test]
    fn a_first_write_graph_relates_every_attendee_to_the_event() {
        let enrichment = Enrichment {
            host_user_id: None,
            integration_user_id: "005000000000001AAA".into(),
        };
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let nodes = mapping
            .first_write_graph(&event("booked-group"), &enrichment)
            .unwrap();
        let refs: Vec<&str> = nodes.iter().map(|n| n.reference_id.as_str()).collect();
        assert_eq!(
            refs,
            [
                "lead_0",
                "lead_1",
                "event",
                "booking",
                "rel_lead_0",
                "rel_lead_1"
            ]
        );
        for (node, (lead, parent)) in nodes[4..].iter().zip([("lead_0", true), ("lead_1", false)]) {
            assert_eq!(
                (node.method.as_str(), node.url.as_str()),
                ("POST", "/services/data/v66.0/sobjects/EventRelation")
            );
            let body = node.body.as_ref().unwrap().value();
            assert_eq!(body["EventId"], "@{event.id}");
            assert_eq!(body["RelationId"], format!("@{{{lead}.id}}"));
            assert_eq!(body["IsParent"], parent);
            assert_eq!(body["IsInvitee"], true);
        }
        let mut unrelated = acme();
        unrelated.relations = None;
        let plain = CompiledMapping::compile(&unrelated).unwrap();
        assert_eq!(
            plain.first_write_graph(&event("booked-group"), &enrichment),
            plain.build_graph(&event("booked-group"), &enrichment)
        );
    }

    #[test]
    fn acme_mapping_renders_the_group_booking() {
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let nodes = mapping
            .build_graph(
                &event("booked-group"),
                &Enrichment {
                    host_user_id: None,
                    integration_user_id: "005000000000001AAA".into(),
                },
            )
            .unwrap();
        let refs: Vec<&str> = nodes.iter().map(|n| n.reference_id.as_str()).collect();
        assert_eq!(refs, ["lead_0", "lead_1", "event", "booking"]);
        assert_eq!(
            nodes[0].url,
            "/services/data/v66.0/sobjects/Lead/BookMe__Lead_Key__c/acme:marie.curie@initech.example"
        );
        let lead = nodes[0].body.as_ref().unwrap().value();
        assert_eq!(lead["Phone"], Value::Null);
        assert_eq!(lead["Email"], "marie.curie@initech.example");
        let ev = nodes[2].body.as_ref().unwrap().value();
        assert_eq!(ev["OwnerId"], "005000000000001AAA");
        assert!(
            ev.get("WhoId").is_none(),
            "the parent relation sets the Who"
        );
        let booking = nodes[3].body.as_ref().unwrap().value();
        assert_eq!(booking["BookMe__Version__c"], 1);
    }

    #[test]
    fn templates_see_every_datetime_in_the_canonical_form() {
        let text = include_str!("../../tests/fixtures/events/booked.json")
            .replace("2026-11-20T10:15:00Z", "2026-11-20 11:15:00.5+01:00")
            .replace("2026-12-01T14:00:00Z", "2026-12-01t15:00:00+01:00")
            .replace("2026-12-01T14:30:00Z", "2026-12-01 14:30:00.123456z");
        let event = decode(text.as_bytes(), DEFAULT_MAX_BODY_BYTES).unwrap();
        let mut tenant = acme();
        tenant.records[1]
            .fields
            .insert("Description".into(), "{{ event.time }}".into());
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let nodes = mapping.build_graph(&event, &Enrichment::default()).unwrap();
        let ev = nodes[1].body.as_ref().unwrap().value();
        assert_eq!(ev["StartDateTime"], "2026-12-01T14:00:00.000Z");
        assert_eq!(ev["EndDateTime"], "2026-12-01T14:30:00.123Z");
        assert_eq!(ev["Description"], "2026-11-20T10:15:00.500Z");
        let booking = nodes[2].body.as_ref().unwrap().value();
        assert_eq!(booking["BookMe__Starts_At__c"], "2026-12-01T14:00:00.000Z");
    }

    #[test]
    fn a_plain_path_reads_what_its_template_renders() {
        assert_eq!(
            plain_path(" attendee.email "),
            Some(vec!["attendee".to_owned(), "email".to_owned()])
        );
        assert_eq!(plain_path("attendee.email | lower"), None);
        assert_eq!(plain_path("booking.answers['x']"), None);
        assert_eq!(plain_path("none"), None);
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let event = event("booked-group");
        let booking = to_value(&event.booking);
        for attendee in &event.booking.attendees {
            let ctx = minijinja::context! {
                booking => booking.clone(),
                attendee => to_value(attendee),
            };
            for expr in [
                "attendee.email",
                "attendee.phone",
                "attendee.company",
                "booking.version",
                "booking.title",
                "booking.portal.name",
            ] {
                let template = format!("{{{{ ({expr}) | portals_crm_typed }}}}");
                let rendered: Value =
                    serde_json::from_str(&mapping.env.render_str(&template, &ctx).unwrap())
                        .unwrap();
                let path = plain_path(expr).unwrap();
                assert_eq!(read_path(&ctx, &path, false), Some(rendered), "{expr}");
            }
            for unread in ["attendee.nickname", "booking.portal", "booking.attendees"] {
                assert_eq!(
                    read_path(&ctx, &plain_path(unread).unwrap(), false),
                    None,
                    "{unread}"
                );
            }
        }
    }

    #[test]
    fn or_reads_what_its_template_renders() {
        assert_eq!(
            or_expression(" attendee.company or 'Unknown' "),
            Some((
                vec!["attendee".to_owned(), "company".to_owned()],
                Alternative::Literal("Unknown".to_owned())
            ))
        );
        assert_eq!(
            or_expression("host_user_id or integration_user_id"),
            Some((
                vec!["host_user_id".to_owned()],
                Alternative::Path(vec!["integration_user_id".to_owned()])
            ))
        );
        for not_or in [
            "a or b or c",
            "a or 'it''s'",
            "a or 'x\\'",
            "a | lower or b",
            "a or b | upper",
            "a or 3",
            "a and b",
        ] {
            assert_eq!(or_expression(not_or), None, "{not_or}");
        }
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let typed = |expr: &str, ctx: &minijinja::Value| -> Value {
            let rendered = mapping
                .env
                .render_str(&format!("{{{{ ({expr}) | portals_crm_typed }}}}"), ctx)
                .unwrap();
            serde_json::from_str(&rendered).unwrap()
        };
        let ctx = minijinja::context! {
            host_user_id => (),
            integration_user_id => "0055g0000000001AAA",
            attendee => minijinja::context! {
                company => "Initech",
                empty => "",
                nothing => (),
                seats => 3,
                flag => false,
            },
        };
        for expr in [
            "attendee.company or 'Unknown'",
            "attendee.empty or 'Unknown'",
            "attendee.nothing or 'Unknown'",
            "attendee.nothing or attendee.nothing",
            "attendee.empty or attendee.company",
            "host_user_id or integration_user_id",
            "integration_user_id or host_user_id",
        ] {
            let (left, right) = or_expression(expr).unwrap();
            assert_eq!(
                read_or(&ctx, &left, &right),
                Some(typed(expr, &ctx)),
                "{expr}"
            );
        }
        // Not a string or none on the side read: the template answers.
        for expr in [
            "attendee.seats or 'x'",
            "attendee.flag or 'x'",
            "attendee.nothing or attendee.seats",
            "attendee.nickname or 'x'",
        ] {
            let (left, right) = or_expression(expr).unwrap();
            assert_eq!(read_or(&ctx, &left, &right), None, "{expr}");
        }
    }

    #[test]
    fn text_and_lower_paths_join_to_what_their_template_renders() {
        assert_eq!(
            path_expression(" attendee.email | lower "),
            Some((vec!["attendee".to_owned(), "email".to_owned()], true))
        );
        assert_eq!(path_expression("attendee.email | upper"), None);
        assert_eq!(path_expression("attendee.email | lower | trim"), None);
        for not_text in [
            "{% if x %}a{% endif %}",
            "{{ a }}{# note #}",
            "{{- a }}",
            "{{ a -}}",
            "{{ a }}\n",
            "{{ a ~ b }}",
            "{{ a or 'x' }}:{{ b }}",
            "a }} b {{ c }}",
            "{{ a",
        ] {
            assert_eq!(text_pieces(not_text), None, "{not_text}");
        }
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let ctx = minijinja::context! {
            tenant => "acme",
            attendee => minijinja::context! {
                email => "Ann.ÖBERG@Globex.Example",
                first_name => "Ann",
                phone => (),
                seats => 3,
            },
        };
        for text in [
            "{{ tenant }}:{{ attendee.email | lower }}",
            "{{attendee.first_name}} <{{ attendee.email }}>",
            "Dear {{ attendee.first_name }}, {{ attendee.email|lower }} ok",
        ] {
            let pieces = text_pieces(text).unwrap();
            assert_eq!(
                join_pieces(&ctx, &pieces),
                Some(mapping.env.render_str(text, &ctx).unwrap()),
                "{text}"
            );
        }
        // Not a string: the template answers (`none`, a number, an undefined name's error).
        for text in [
            "{{ tenant }}:{{ attendee.phone }}",
            "{{ attendee.seats }} seats",
            "{{ attendee.nickname }}!",
        ] {
            assert_eq!(
                join_pieces(&ctx, &text_pieces(text).unwrap()),
                None,
                "{text}"
            );
        }
        let lowered: Value = serde_json::from_str(
            &mapping
                .env
                .render_str("{{ (attendee.email | lower) | portals_crm_typed }}", &ctx)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            read_path(
                &ctx,
                &path_expression("attendee.email | lower").unwrap().0,
                true
            ),
            Some(lowered)
        );
        assert_eq!(
            read_path(
                &ctx,
                &path_expression("attendee.phone | lower").unwrap().0,
                true
            ),
            None
        );
    }

    #[test]
    fn cancellation_prefixes_the_subject() {
        let mapping = CompiledMapping::compile(&acme()).unwrap();
        let nodes = mapping
            .build_graph(
                &event("cancelled"),
                &Enrichment {
                    host_user_id: Some("005000000000002AAA".into()),
                    integration_user_id: "005000000000001AAA".into(),
                },
            )
            .unwrap();
        let ev = nodes[1].body.as_ref().unwrap().value();
        assert_eq!(ev["Subject"], "Cancelled: Intro call");
        assert_eq!(ev["OwnerId"], "005000000000002AAA");
        assert!(
            ev["Description"]
                .as_str()
                .unwrap()
                .contains("Customer asked to postpone")
        );
    }

    #[test]
    fn filters_normalise_phones_and_format_dates() {
        let mut tenant = acme();
        tenant.records[0]
            .fields
            .insert("Phone".into(), "{{ attendee.phone | phone }}".into());
        tenant.records[1].fields.insert(
            "Description".into(),
            "{{ booking.starts_at | date }} / {{ booking.starts_at | datetime }} / {{ booking.title | upper | truncate(length=8) }} / {{ booking.answers.budget | default('n/a') }}".into(),
        );
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let nodes = mapping
            .build_graph(&event("booked-group"), &Enrichment::default())
            .unwrap();
        assert_eq!(
            nodes[0].body.as_ref().unwrap().value()["Phone"],
            Value::Null
        );
        assert_eq!(
            nodes[1].body.as_ref().unwrap().value()["Phone"],
            "+33400000000"
        );
        assert_eq!(
            nodes[2].body.as_ref().unwrap().value()["Description"],
            "2026-12-03 / 2026-12-03 12:00 UTC / DÉMO... / n/a"
        );
    }

    #[test]
    fn when_conditions_select_records_per_event() {
        let mut tenant = acme();
        tenant.records[1].when = Some("booking.status != 'cancelled'".into());
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let refs = |name: &str| -> Vec<String> {
            mapping
                .build_graph(&event(name), &Enrichment::default())
                .unwrap()
                .iter()
                .map(|n| n.reference_id.clone())
                .collect()
        };
        assert_eq!(refs("booked"), ["lead_0", "event", "booking"]);
        assert_eq!(refs("cancelled"), ["lead_0", "booking"]);
    }

    #[test]
    fn deletes_come_after_the_guarded_upserts() {
        let mut tenant = acme();
        tenant.records[1].when = Some("booking.status != 'cancelled'".into());
        let mut delete = tenant.records[1].clone();
        delete.reference = "event_gone".into();
        delete.action = Action::Delete;
        delete.fields.clear();
        delete.when = Some("booking.status == 'cancelled'".into());
        tenant.records.insert(2, delete);
        tenant.records[3].fields.insert(
            "BookMe__Event_Id__c".into(),
            "{% if booking.status != 'cancelled' %}@{event.id}{% endif %}".into(),
        );
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let nodes = mapping
            .build_graph(&event("cancelled"), &Enrichment::default())
            .unwrap();
        let shape: Vec<(&str, &str)> = nodes
            .iter()
            .map(|n| (n.reference_id.as_str(), n.method.as_str()))
            .collect();
        assert_eq!(
            shape,
            [
                ("lead_0", "PATCH"),
                ("booking", "PATCH"),
                ("event_gone", "DELETE")
            ]
        );
        assert!(nodes[2].body.is_none());
        assert!(
            nodes[2]
                .url
                .ends_with("/sobjects/Event/BookMe__Booking_Id__c/bk_7Q2M9")
        );
        let mut bad = tenant.clone();
        bad.records[2].fields.insert("Subject".into(), "x".into());
        assert!(CompiledMapping::compile(&bad).unwrap_err()[0].contains("takes no fields"));
    }

    #[test]
    fn compile_reports_every_problem() {
        let mut tenant = acme();
        tenant.records[1]
            .fields
            .insert("Subject".into(), "{{ booking.title ".into());
        tenant.records[2]
            .fields
            .insert("BookMe__Lead_Id__c".into(), "@{nobody.id}".into());
        tenant.records[2].for_each = Some("hosts".into());
        tenant.records[0].when = Some("booking.status ==".into());
        let problems = CompiledMapping::compile(&tenant).unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems.iter().any(|p| p.contains(".when")),
            "{problems:#?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("record event, Event.Subject"))
        );
        assert!(problems.iter().any(|p| p.contains("@{nobody…}")));
    }

    #[test]
    fn runaway_templates_fail_the_field_not_the_worker() {
        let mut tenant = acme();
        tenant.records[1].fields.insert(
            "Description".into(),
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
                .into(),
        );
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let error = mapping
            .build_graph(&event("booked"), &Enrichment::default())
            .unwrap_err();
        assert_eq!(
            (error.record.as_str(), error.field.as_str()),
            ("event", "Description")
        );
        assert!(error.message.contains("steps"), "{error}");

        tenant.records[1]
            .fields
            .insert("Description".into(), "{{ 'x' * 600000 }}".into());
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let error = mapping
            .build_graph(&event("booked"), &Enrichment::default())
            .unwrap_err();
        assert_eq!(error.field, "Description");
        assert!(error.message.contains("bytes"), "{error}");
    }

    #[test]
    fn unknown_names_fail_at_render() {
        let mut tenant = acme();
        tenant.records[1]
            .fields
            .insert("Location".into(), "{{ booking.no_such_field }}".into());
        let mapping = CompiledMapping::compile(&tenant).unwrap();
        let error = mapping
            .build_graph(&event("booked"), &Enrichment::default())
            .unwrap_err();
        assert_eq!(error.field, "Location");
    }
}
