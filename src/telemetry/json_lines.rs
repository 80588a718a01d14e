//! JSON log lines written in one pass: the lines `tracing-subscriber`'s JSON format writes
//! (flattened event fields, the target, the current span), without its detours.
//!
//! A worker writes an audit record per Salesforce write, thousands a second, and the stock
//! formatter cost about a tenth of the worker's CPU: it serialises through an `io::Write`
//! adapter that checks every fragment is UTF-8, formats the timestamp field by field, and
//! parses the current span's stored JSON fields back into a map to write them again
//! (tokio-rs/tracing#391). Here each value is escaped straight into the line, the timestamp's
//! date and time of day are formatted once a second, and the span's fields (already a JSON
//! object, stored by [`JsonFields`] when the span was created) are copied as they are.
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
        // A `log` record (sled, reqwest, rustls log through the `log` crate) arrives as an event
        // of target `log`; its own target, level and place are in its normalised metadata.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        write_timestamp(&mut writer, OffsetDateTime::now_utc())?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = Fields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        write_str(&mut writer, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            writer.write_str(",\"span\":{")?;
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
                writer.write_str(inner)?;
                writer.write_char(',')?;
            }
            writer.write_str("\"name\":")?;
            write_str(&mut writer, span.metadata().name())?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
    }
}

/// Writes each event field as `,"name":value` (numbers and booleans bare, everything else a
/// JSON string), keeping the first error.
struct Fields<'a, W: fmt::Write> {
    out: &'a mut W,
    result: fmt::Result,
}

impl<W: fmt::Write> Fields<'_, W> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_char(',')?;
        write_str(self.out, field.name())?;
        self.out.write_char(':')
    }

    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl<W: fmt::Write> Visit for Fields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| write_str(out, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // Spelt as serde_json spells it (`1e+16`); NaN and the infinities have no JSON form.
        match serde_json::Number::from_f64(value) {
            Some(number) => self.entry(field, |out| write!(out, "{number}")),
            None => self.entry(field, |out| out.write_str("null")),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| {
            out.write_char('"')?;
            write!(Escaping(out), "{value:?}")?;
            out.write_char('"')
        });
    }
}

/// `text` as a JSON string.
fn write_str(out: &mut impl fmt::Write, text: &str) -> fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_str(text)?;
    out.write_char('"')
}

/// Escapes what passes through as the inside of a JSON string, as serde_json does (RFC 8259
/// §7): quote, backslash and the control characters; everything else as it is.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut start = 0;
        for (i, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Every byte escaped is ASCII, so `i` is a character boundary.
            self.0.write_str(&text[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&text[start..])
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
