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

/// Installs the global subscriber, writing to stderr, or to the file `to` (created or
/// appended) when given — the demo keeps its terminal for the progress bar and the summary.
/// The level comes from `RUST_LOG` (default `info`).
///
/// Lines are formatted where they are logged and written by a thread of their own, through a
/// buffer flushed whenever that thread has caught up: a worker writing thousands of audit
/// records a second makes a few `write(2)` calls instead of one per line, and never waits on a
/// slow terminal or log collector unless the queue of lines is full. It is not lossy: a full
/// queue makes the logger wait, since the audit trail must be complete. Keep the guard until
/// the process ends; dropping it writes out what is queued.
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

/// Masks every email address and every run of 6+ digits (phone numbers) in free text, such as
/// a Salesforce error message that quotes the value it refused.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.contains('@') {
            out.push_str(&mask_email(word));
        } else {
            out.push_str(word);
        }
    }
    let mut result = String::with_capacity(out.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, result: &mut String| {
        let count = digits.chars().filter(char::is_ascii_digit).count();
        if count >= 6 {
            result.push_str("[phone]");
        } else {
            result.push_str(digits);
        }
        digits.clear();
    };
    for c in out.chars() {
        let in_number =
            c.is_ascii_digit() || (!digits.is_empty() && matches!(c, ' ' | '-' | '(' | ')'));
        if in_number || (c == '+' && digits.is_empty()) {
            digits.push(c);
        } else {
            flush(&mut digits, &mut result);
            result.push(c);
        }
    }
    flush(&mut digits, &mut result);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_phones_are_masked() {
        assert_eq!(mask_email("jane.doe@globex.example"), "j***@globex.example");
        let text =
            redact("Email: invalid email address: jane.doe@globex.example, call +47 555 01234");
        assert!(!text.contains("jane.doe"), "{text}");
        assert!(!text.contains("555"), "{text}");
        assert!(text.contains("[phone]"), "{text}");
        assert_eq!(redact("version 3 of bk_7Q2M9"), "version 3 of bk_7Q2M9");
    }
}
