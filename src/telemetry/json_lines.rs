//! JSON log lines written in one pass: the lines `tracing-subscriber`'s JSON format writes
//! (flattened event fields, the target, the current span), without its detours.
//!
//! A worker writes an audit record per Salesforce write, thousands a second, and the stock
//! formatter cost about a tenth of the worker's CPU: it serialises through an `io::Write`
//! adapter that checks every fragment is UTF-8, formats the timestamp field by field, and
//! parses the current span's stored JSON fields back into a map to write them again
//! (tokio-rs/tracing#391). Here the line is built in a buffer of the thread's and written in one
//! call, each value is escaped straight into it (runs of plain bytes copied at once), the
//! timestamp's date and time of day are formatted once a second, and the span's fields (already
//! a JSON object, stored by [`JsonFields`] when the span was created) are copied as they are.
//!
//! The shape, field for field (`tests::writes_what_the_stock_json_format_writes` compares the
//! two): `{"timestamp":"2026-11-30T18:20:01.123456Z","level":"INFO","message":"…",<event
//! fields>,"target":"portals_crm::audit","span":{<span fields>,"name":"message"}}`.

use std::cell::RefCell;
use std::fmt::{self, Write as _};

use time::OffsetDateTime;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event formatter for `--log-format json`; span fields are stored by [`JsonFields`].
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The line is built in a buffer of this thread's and handed to `writer` in one call:
        // `writer` is a `dyn fmt::Write`, and writing each quote, colon and fragment through it
        // cost more than the text. A line logged while one is being built (a field's `Debug`
        // that logs) gets a buffer of its own.
        LINE.with(|cell| {
            let mut held = cell.try_borrow_mut();
            let mut own = String::new();
            let line = match held.as_deref_mut() {
                Ok(line) => {
                    line.clear();
                    line
                }
                Err(_) => &mut own,
            };
            write_line(line, ctx, event)?;
            writer.write_str(line)
        })
    }
}

thread_local! {
    /// The line being built on this thread (its capacity is kept from line to line).
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Writes `event` as one JSON line (the module documentation's shape) to `line`.
fn write_line<S>(
    line: &mut String,
    ctx: &FmtContext<'_, S, JsonFields>,
    event: &Event<'_>,
) -> fmt::Result
where
    S: Subscriber + for<'lookup> LookupSpan<'lookup>,
{
    // A `log` record (sled, reqwest, rustls log through the `log` crate) arrives as an event
    // of target `log`; its own target, level and place are in its normalised metadata.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    line.push_str("{\"timestamp\":\"");
    write_timestamp(line, OffsetDateTime::now_utc())?;
    line.push_str("\",\"level\":\"");
    line.push_str(meta.level().as_str());
    line.push('"');
    let mut fields = Fields {
        out: line,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    line.push_str(",\"target\":");
    push_json_str(line, meta.target());
    let span = event
        .parent()
        .and_then(|id| ctx.span(id))
        .or_else(|| ctx.lookup_current());
    if let Some(span) = span {
        line.push_str(",\"span\":{");
        let extensions = span.extensions();
        // Written by `JsonFields` as one JSON object; an empty span stores `{}` or nothing.
        let stored = extensions
            .get::<FormattedFields<JsonFields>>()
            .map_or("", |fields| fields.fields.trim());
        let inner = stored
            .strip_prefix('{')
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or("")
            .trim();
        if !inner.is_empty() {
            line.push_str(inner);
            line.push(',');
        }
        line.push_str("\"name\":");
        push_json_str(line, span.metadata().name());
        line.push('}');
    }
    line.push_str("}\n");
    Ok(())
}

/// Writes each event field as `,"name":value` (numbers and booleans bare, everything else a
/// JSON string), keeping the first error (only a `Debug` or `Display` implementation fails).
struct Fields<'a> {
    out: &'a mut String,
    result: fmt::Result,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) {
        self.out.push(',');
        push_json_str(self.out, field.name());
        self.out.push(':');
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        push_json_str(self.out, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        self.out.push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        // Spelt as serde_json spells it (`1e+16`); NaN and the infinities have no JSON form.
        match serde_json::Number::from_f64(value) {
            Some(number) => {
                if self.result.is_ok() {
                    self.result = write!(self.out, "{number}");
                }
            }
            None => self.out.push_str("null"),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.out.push('"');
        if self.result.is_ok() {
            self.result = write!(Escaping(self.out), "{value:?}");
        }
        self.out.push('"');
    }
}

/// `text` as a JSON string.
fn push_json_str(out: &mut String, text: &str) {
    out.push('"');
    push_escaped(out, text);
    out.push('"');
}

/// What a byte of a JSON string is written as (RFC 8259 §7, as serde_json writes it): `0` for
/// itself, `u` for `\u00XX`, else the letter after the backslash.
static ESCAPE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Escapes `text` as the inside of a JSON string, as serde_json does: quote, backslash and the
/// control characters; everything else as it is, in runs.
fn push_escaped(out: &mut String, text: &str) {
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        let escape = ESCAPE[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        // Every byte escaped is ASCII, so `i` is a character boundary.
        out.push_str(&text[start..i]);
        out.push('\\');
        if escape == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push(char::from(escape));
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
}

/// [`push_escaped`] for what a `Debug` implementation writes.
struct Escaping<'a>(&'a mut String);

impl fmt::Write for Escaping<'_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        push_escaped(self.0, text);
        Ok(())
    }
}

thread_local! {
    /// The Unix second last formatted on this thread and its `yyyy-MM-ddTHH:mm:ss`.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// `at` as tracing-subscriber's `SystemTime` timer writes it: RFC 3339 in UTC with
/// microseconds, `2026-11-30T18:20:01.123456Z`.
fn write_timestamp(out: &mut impl fmt::Write, at: OffsetDateTime) -> fmt::Result {
    let at = at.to_offset(time::UtcOffset::UTC);
    SECOND.with_borrow_mut(|(second, text)| {
        let now = at.unix_timestamp();
        if *second != now {
            text.clear();
            write!(
                text,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                at.year(),
                u8::from(at.month()),
                at.day(),
                at.hour(),
                at.minute(),
                at.second()
            )?;
            *second = now;
        }
        out.write_str(text)?;
        write!(out, ".{:06}Z", at.microsecond())
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Lines written, shared with the test.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Lines {
        fn parsed(&self) -> Vec<Value> {
            let bytes = self.0.lock().unwrap();
            std::str::from_utf8(&bytes)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    /// Events of every field type, with awkward text, inside and outside a span.
    fn log_events() {
        tracing::info!(target: "portals_crm::audit", tenant = %"acme", version = 3u64,
            delta = -2i64, ratio = 0.25, large = 1e16, small = 0.00001, created = true,
            nan = f64::NAN,
            record_id = "00U\"x\\y\n\u{1}é", cleared = ?vec!["Lead.Email"], "salesforce write");
        let span = tracing::info_span!("message", event_id = "e-1", tenant = "acme", attempt = 2);
        let _entered = span.enter();
        tracing::warn!(error = %"quote \" tab \t", "retrying {} in {}ms", "e-1", 250);
        let empty = tracing::info_span!("nothing");
        let _inner = empty.enter();
        tracing::error!("no fields");
        // A record of the `log` crate, as `LogTracer` turns it into an event.
        tracing_log::format_trace(
            &log::Record::builder()
                .level(log::Level::Warn)
                .target("sled::pagecache")
                .file(Some("src/pagecache/mod.rs"))
                .line(Some(42))
                .args(format_args!("io error, retrying"))
                .build(),
        )
        .unwrap();
    }

    #[test]
    fn writes_what_the_stock_json_format_writes() {
        let ours = Lines::default();
        let stock = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .with_writer(ours.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log_events);
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .with_writer(stock.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, log_events);
        let (mut ours, mut stock) = (ours.parsed(), stock.parsed());
        assert_eq!(ours.len(), 4);
        for line in ours.iter_mut().chain(stock.iter_mut()) {
            let stamp = line["timestamp"].as_str().unwrap().to_owned();
            assert!(
                time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339)
                    .is_ok()
                    && stamp.len() == "2026-11-30T18:20:01.123456Z".len(),
                "{stamp}"
            );
            line["timestamp"] = Value::Null;
        }
        assert_eq!(ours, stock);
        assert_eq!(ours[0]["record_id"], "00U\"x\\y\n\u{1}é");
        assert_eq!(ours[1]["span"]["attempt"], 2);
        assert_eq!(ours[1]["message"], "retrying e-1 in 250ms");
        assert_eq!(ours[2]["span"]["name"], "nothing");
        assert_eq!(ours[3]["target"], "sled::pagecache");
        assert_eq!(ours[3]["level"], "WARN");
    }

    #[test]
    fn every_character_is_escaped_as_serde_json_escapes_it() {
        let mut text: String = (0u8..0x80).map(char::from).collect();
        text.push_str("é€😀\u{7f}\u{2028}");
        for piece in [text.as_str(), "", "plain", "\"", "end\\"] {
            let mut ours = String::new();
            push_json_str(&mut ours, piece);
            assert_eq!(ours, serde_json::to_string(piece).unwrap(), "{piece:?}");
        }
    }

    #[test]
    fn the_timestamp_is_utc_with_microseconds() {
        let at = time::macros::datetime!(2026-11-30 18:20:01.000_042 +01:00);
        let mut text = String::new();
        write_timestamp(&mut text, at).unwrap();
        assert_eq!(text, "2026-11-30T17:20:01.000042Z");
        // The same second again comes from the cached prefix.
        text.clear();
        write_timestamp(&mut text, at + time::Duration::microseconds(5)).unwrap();
        assert_eq!(text, "2026-11-30T17:20:01.000047Z");
    }
}
