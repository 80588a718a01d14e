//! Logging: JSON in production, pretty for people; PII masked before it reaches a log line.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FmtSpan, JsonFields};

use super::json_lines::JsonLines;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Pretty,
}

/// Lines the logging thread may have queued before a logger waits for it. The queue is a
/// crossbeam array channel, whose slots (32 bytes each) are all written when it is created:
/// tracing-appender's default of 128,000 lines kept 4 MB resident in every process, a worker's
/// memory for some 250 messages in flight. 16,384 lines are a quarter of a second of audit
/// records at saturation; a full queue makes loggers wait for the writer, it drops nothing.
const QUEUED_LINES: usize = 16_384;

/// Installs the global subscriber, writing to stderr, or to the file `to` (created or
/// appended) when given — the demo keeps its terminal for the progress bar and the summary.
/// The level comes from `RUST_LOG` (default `info`).
///
/// Lines are formatted where they are logged and written by a thread of their own, through a
/// buffer flushed whenever that thread has caught up: a worker writing thousands of audit
/// records a second makes a few `write(2)` calls instead of one per line, and never waits on a
/// slow terminal or log collector unless the queue of lines ([`QUEUED_LINES`]) is full. It is
/// not lossy: a full queue makes the logger wait, since the audit trail must be complete. Keep
/// the guard until the process ends; dropping it writes out what is queued.
pub fn init(format: LogFormat, to: Option<&Path>) -> std::io::Result<WorkerGuard> {
    let sink: Box<dyn Write + Send> = match to {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            Box::new(BufWriter::new(file))
        }
        None => Box::new(BufWriter::new(std::io::stderr())),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("portals-crm-log")
        .finish(sink);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        // Colours only for a person at a terminal: escape codes in a file or a container's log
        // are noise to whoever reads it, and cost a formatting pass per field.
        .with_ansi(to.is_none() && std::io::stderr().is_terminal())
        .with_writer(writer);
    let _ = match format {
        // The current span (a message's event id, tenant, booking, attempt) on every line;
        // not the list of enclosing spans as well, which repeated it (a message has one span).
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    Ok(guard)
}

/// `jane.doe@globex.example` → `j***@globex.example`.
pub fn mask_email(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first = local.chars().next().unwrap_or('*');
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// Masks every email address and every phone number in free text, such as a Salesforce error
/// message that quotes the value it refused. An email address is a word holding `@` (words end at
/// whitespace and at `,;<>()[]"`). A phone number is a run of digits (any script's) with
/// separators between them — spaces of any kind, `-`, `.`, `/`, `_`, `(`, `)` — maybe after a
/// `+`, holding 6 or more digits and not inside an ASCII word. Not masked: digits inside such a
/// word, as in a record id (`00Q5g0000000001`), and ISO 8601 dates with a real month and day
/// (`2026-12-01`, also as the start of a dateTime), which a dead letter's booking and
/// Salesforce's messages about a date hold and which are not personal data. Masking errs on
/// the side of privacy: an IP address or a date written `12/01/2026` is masked too.
pub fn redact(text: &str) -> String {
    mask_phones(&mask_emails(text))
}

/// The email half of [`redact`].
fn mask_emails(text: &str) -> String {
    let ends_word = |c: char| c.is_whitespace() || ",;<>()[]\"".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest.find(ends_word).unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        if word.contains('@') {
            out.push_str(&mask_email(word));
        } else {
            out.push_str(word);
        }
        let mut separators = after.chars();
        if let Some(separator) = separators.next() {
            out.push(separator);
        }
        rest = separators.as_str();
    }
    out
}

/// A digit of any script (`5`, `５`, `٥`).
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

/// What may stand between the digits of a phone number.
fn joins_digits(c: char) -> bool {
    c.is_whitespace() || matches!(c, '-' | '.' | '/' | '_' | '(' | ')' | '\u{2011}')
}

/// The phone-number half of [`redact`].
fn mask_phones(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut result = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts_word = i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_');
        let starts_number =
            is_digit(c) || (c == '+' && chars.get(i + 1).copied().is_some_and(is_digit));
        if !(starts_word && starts_number) {
            result.push(c);
            i += 1;
            continue;
        }
        if is_iso_date(&chars[i..]) {
            result.extend(&chars[i..i + ISO_DATE.len()]);
            i += ISO_DATE.len();
            continue;
        }
        // The run ends at its last digit: a space or bracket after it is not part of it.
        let mut end = i + 1;
        let mut after_last_digit = end;
        while let Some(&next) = chars.get(end) {
            if is_digit(next) {
                after_last_digit = end + 1;
            } else if !joins_digits(next) {
                break;
            }
            end += 1;
        }
        let run = &chars[i..after_last_digit];
        if run.iter().filter(|c| is_digit(**c)).count() >= 6
            && !is_quantity(&chars[after_last_digit..])
        {
            result.push_str("[phone]");
        } else {
            result.extend(run);
        }
        i = after_last_digit;
    }
    result
}

/// Units a number in the service's own messages is counted in: a number followed by one of
/// them (`1048577 bytes`, `the 1048576-byte limit`, `120000 ms`) is a quantity, not a phone.
const UNITS: [&str; 14] = [
    "b", "byte", "bytes", "kb", "kib", "mb", "mib", "gb", "gib", "ms", "µs", "us", "ns", "seconds",
];

/// True when `after`, what follows a run of digits, starts with a unit of [`UNITS`] (after at
/// most one space or hyphen) that ends there.
fn is_quantity(after: &[char]) -> bool {
    let after = match after {
        [' ' | '-' | '\u{a0}', rest @ ..] => rest,
        _ => after,
    };
    let word: String = after
        .iter()
        .take_while(|c| c.is_alphabetic())
        .flat_map(|c| c.to_lowercase())
        .collect();
    UNITS.contains(&word.as_str())
}

/// The shape of an ISO 8601 calendar date, `9` standing for a digit.
const ISO_DATE: &str = "9999-99-99";

/// True when `chars` starts with an ISO 8601 date (month 01–12, day 01–31) that no other digit
/// or separator-and-digit follows (`0800-12-34 5678` is a phone number).
fn is_iso_date(chars: &[char]) -> bool {
    let Some(head) = chars.get(..ISO_DATE.len()) else {
        return false;
    };
    let shaped = ISO_DATE.chars().zip(head).all(|(shape, c)| {
        if shape == '9' {
            c.is_ascii_digit()
        } else {
            *c == shape
        }
    });
    let number = |from: usize| -> u32 {
        head[from..from + 2]
            .iter()
            .filter_map(|c| c.to_digit(10))
            .fold(0, |n, d| n * 10 + d)
    };
    let after = &chars[ISO_DATE.len()..];
    // A dateTime's time follows `T`, or a space and `HH:`; digits after a separator otherwise
    // make it part of a longer number.
    let continues_as_number = match after {
        [c, ..] if c.is_ascii_digit() => true,
        [sep, d1, d2, rest @ ..] if joins_digits(*sep) && d1.is_ascii_digit() => {
            !(d2.is_ascii_digit() && rest.first() == Some(&':'))
        }
        [sep, d, ..] if joins_digits(*sep) && d.is_ascii_digit() => true,
        _ => false,
    };
    shaped && (1..=12).contains(&number(5)) && (1..=31).contains(&number(8)) && !continues_as_number
}

/// `text` as a table printed to a terminal shows it (`dlq list`, `mapping fields`): every
/// control character (a line break, an ANSI escape sequence's `ESC`) and every invisible
/// formatting character (the bidirectional overrides U+202A–U+202E and U+2066–U+2069,
/// zero-width characters) written as its `\u{…}` escape. A dead letter's headers come from
/// publishers and orgs, a describe's labels from the org: printed raw, they could add rows,
/// clear the operator's screen or reorder what the terminal shows.
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
    };
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    text.chars()
        .map(|c| {
            if unsafe_char(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_safe_escapes_only_what_a_terminal_would_act_on() {
        assert_eq!(terminal_safe("Café — plain"), "Café — plain");
        assert_eq!(terminal_safe("a\u{1b}[2J\nb"), "a\\u{1b}[2J\\u{a}b");
        assert_eq!(terminal_safe("x\u{202e}y\u{200b}"), "x\\u{202e}y\\u{200b}");
    }

    #[test]
    fn emails_and_phones_are_masked() {
        assert_eq!(mask_email("jane.doe@globex.example"), "j***@globex.example");
        let text =
            redact("Email: invalid email address: jane.doe@globex.example, call +47 555 01234");
        assert!(!text.contains("jane.doe"), "{text}");
        assert!(!text.contains("555"), "{text}");
        assert!(text.contains("[phone]"), "{text}");
        assert_eq!(redact("version 3 of bk_7Q2M9"), "version 3 of bk_7Q2M9");
        assert_eq!(
            redact("jane@x.com,john.smith@y.com\n<ann.lee@z.org>"),
            "j***@x.com,j***@y.com\n<a***@z.org>"
        );
    }

    /// The service's own quantities (a body's size against its limit, in the dead-letter table
    /// and the logs) stay readable; a phone number before another word is still masked.
    #[test]
    fn quantities_with_their_unit_are_not_phones() {
        for (text, shown) in [
            (
                "body of 1048577 bytes is over the 1048576-byte limit",
                "body of 1048577 bytes is over the 1048576-byte limit",
            ),
            ("waited 120000 ms", "waited 120000 ms"),
            ("a 5242880B body", "a 5242880B body"),
            ("200000 µs", "200000 µs"),
            ("call 5550123456 bytesize", "call [phone] bytesize"),
            ("call +47 555 01234 by noon", "call [phone] by noon"),
            ("call 5550123456 - bye", "call [phone] - bye"),
        ] {
            assert_eq!(redact(text), shown, "{text}");
        }
    }

    #[test]
    fn phones_are_masked_but_not_dates_or_record_ids() {
        for (text, masked) in [
            ("call +47 555 01234 now", "call [phone] now"),
            ("(555) 123-4567.", "([phone]."),
            ("tel:5550123456x12", "tel:[phone]x12"),
            ("+4755501234", "[phone]"),
            (
                "StartDateTime: value 2026-12-01T14:00:00.000+0000 is invalid",
                "StartDateTime: value 2026-12-01T14:00:00.000+0000 is invalid",
            ),
            ("starts 2026-12-01 14:00:00Z", "starts 2026-12-01 14:00:00Z"),
            (
                "insufficient access rights on cross-reference id: 00Q5g0000000001",
                "insufficient access rights on cross-reference id: 00Q5g0000000001",
            ),
            // Not a date: more digits follow, so it is read as a number.
            ("2026-12-011234", "[phone]"),
            ("version 12345 of 20", "version 12345 of 20"),
            ("call 555.123.4567 now", "call [phone] now"),
            ("call +1.555.123.4567 now", "call [phone] now"),
            ("call +49 30/1234567", "call [phone]"),
            ("+33\u{a0}1\u{a0}23\u{a0}45\u{a0}67\u{a0}89", "[phone]"),
            ("+47\u{202f}555\u{202f}01234", "[phone]"),
            ("555\t123\t4567", "[phone]"),
            ("555_123_4567", "[phone]"),
            ("５５５１２３４５６７", "[phone]"),
            ("٠١٢٣٤٥٦٧٨٩", "[phone]"),
            ("日本5550123456", "日本[phone]"),
            ("call 0800-12-34 5678", "call [phone]"),
            ("call 1234-56-78 90", "call [phone]"),
            ("call 2026-12-01 5678", "call [phone]"),
            ("", ""),
            ("+", "+"),
            ("é1é2é3é4é5é6", "é1é2é3é4é5é6"),
        ] {
            assert_eq!(redact(text), masked, "{text}");
        }
    }
}
