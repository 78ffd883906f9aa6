//! Text that came from outside (a server's reply, an error carrying it, a value written
//! straight into the database) made safe for a terminal and for a text log.
//!
//! Control characters (C0 including line breaks, DEL, C1) and the bidirectional embedding,
//! override and isolate characters become visible escapes like `\u{1b}`, so no such text can
//! move the cursor, clear the screen, retitle a window, forge a log line or make a line read
//! backwards. JSON output needs none of this: serde escapes control characters itself.
//!
//! Used where such text is stored (`store::record_poll_error`), shown (`admin` tables and
//! `key: value` views) and logged ([`EscapedFields`] for text logs).

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// Whether `c` must not reach a terminal as it is.
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` with every unsafe character (see [`is_unsafe`]) written as `\u{…}`.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        let _ = push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_escaped(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    if is_unsafe(c) {
        write!(out, "\\u{{{:x}}}", u32::from(c))
    } else {
        out.write_char(c)
    }
}

/// `text` escaped line by line: its line breaks stay, everything else unsafe is escaped (for
/// multi-line reports that quote a server, such as `ccmail doctor`'s).
pub fn escape_lines(text: &str) -> String {
    text.split('\n')
        .map(|line| escape(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// At most `max_chars` characters of `text`; a cut is marked with `…` (within the limit).
pub fn truncate(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => Cow::Borrowed(text),
        Some(_) => {
            let keep = max_chars.saturating_sub(1);
            let mut out: String = text.chars().take(keep).collect();
            out.push('…');
            Cow::Owned(out)
        }
    }
}

/// Field formatting for text logs: like tracing-subscriber's default (`message` as text, other
/// fields as `name=value`, `log.*` bridge metadata left out), with every value escaped.
/// tracing-subscriber 0.3.23 escapes the `message` field and `std::error::Error` values, but
/// writes `%display` and `?debug` values of other fields raw, and that is where error text
/// from a server lands (`error = %e`).
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'writer> {
    writer: Writer<'writer>,
    first: bool,
    result: fmt::Result,
}

/// Escapes what is written through it into the log writer.
struct Escaping<'a, 'writer>(&'a mut Writer<'writer>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            push_escaped(self.0, c)?;
        }
        Ok(())
    }
}

impl EscapingVisitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        let name = field.name();
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let result = (|| {
            if !self.first {
                self.writer.write_char(' ')?;
            }
            if name != "message" {
                write!(self.writer, "{}=", name.strip_prefix("r#").unwrap_or(name))?;
            }
            Escaping(&mut self.writer).write_fmt(value)
        })();
        self.first = false;
        self.result = result;
    }
}

impl Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"));
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.field(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::{Arc, Mutex};

    const HOSTILE: &str = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u{202e}desrever\r\nFAKE line";

    #[test]
    fn escapes_control_and_bidi_characters_and_keeps_the_rest() {
        assert!(matches!(escape("plain Grüße 漢字"), Cow::Borrowed(_)));
        let shown = escape(HOSTILE);
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(
            shown,
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{1b}[31mred\\u{202e}desrever\\u{d}\\u{a}FAKE line"
        );
        assert_eq!(
            escape_lines("[PASS] greeting +OK \x1b[2J\n[FAIL] login\n"),
            "[PASS] greeting +OK \\u{1b}[2J\n[FAIL] login\n"
        );
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
        assert_eq!(truncate("äöüß", 3), "äö…");
    }

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_logs_escape_every_field_value() {
        struct Failure;
        impl fmt::Display for Failure {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "server said {HOSTILE}")
            }
        }
        let buffer = Buffer::default();
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("poll", queue = %HOSTILE);
            let _entered = span.enter();
            tracing::warn!(
                error = %Failure,
                reply = ?HOSTILE,
                text = HOSTILE,
                "poll failed: {}",
                HOSTILE
            );
        });
        let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            !log.trim_end_matches('\n').chars().any(is_unsafe),
            "{log:?}"
        );
        assert!(log.contains("error=server said \\u{1b}]0;owned"), "{log}");
        assert!(log.contains("poll failed: \\u{1b}"), "{log}");
        assert!(log.contains("poll{queue=\\u{1b}"), "{log}");
    }
}
