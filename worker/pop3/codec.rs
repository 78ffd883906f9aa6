//! Sans-IO POP3 framing: bytes in, frames out. Nothing here touches a socket or a clock.
//!
//! Every decoder works on a byte slice and reports how much of it it consumed, so the caller
//! (`connection.rs`) owns the buffer and the deadlines. Every decoder is bounded: a status line
//! longer than its limit is an error, and a multi-line body is capped at a caller-given size
//! (the rest of the body is still consumed, so the connection stays usable).
//! Line endings: servers must send CRLF; a bare LF is accepted as well and bodies come out with
//! CRLF line endings.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

/// RFC 2449 §4: a command line is at most 255 octets including the CRLF.
pub const MAX_COMMAND_LINE: usize = 255;

/// Default bound of a status line. RFC 2449 §4 allows 512 octets; SASL challenges from real
/// servers (Dovecot's base64 JSON error) are longer, so the default leaves room for those.
pub const DEFAULT_STATUS_LINE_LIMIT: usize = 8 * 1024;

/// What a decoder made of the bytes it was given.
#[derive(Debug, PartialEq, Eq)]
pub enum Decode<T> {
    /// Not enough bytes yet; nothing was consumed.
    Incomplete,
    /// A whole frame, and how many bytes it took.
    Complete { frame: T, consumed: usize },
}

/// Framing errors. Any of them means the byte stream can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("server line longer than {limit} octets")]
    LineTooLong { limit: usize },
    #[error("expected a status line (+OK or -ERR), got {excerpt:?}")]
    NotAStatus { excerpt: String },
    #[error("command line would be {len} octets; POP3 allows {MAX_COMMAND_LINE}")]
    CommandTooLong { len: usize },
    #[error("command argument contains a line break or NUL")]
    ArgumentHasLineBreak,
}

/// `+OK` or `-ERR`, with the RFC 2449 response code if there is one.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub ok: bool,
    /// The extended response code without brackets, upper-cased (`SYS/TEMP`, `IN-USE`, `AUTH`).
    pub code: Option<String>,
    /// The human-readable text after the status indicator (and code).
    pub text: String,
}

impl fmt::Debug for StatusLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", if self.ok { "+OK" } else { "-ERR" })?;
        if let Some(code) = &self.code {
            write!(f, " [{code}]")?;
        }
        if !self.text.is_empty() {
            write!(f, " {}", self.text)?;
        }
        Ok(())
    }
}

/// The server's answer during a SASL exchange (RFC 5034 §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthReply {
    /// `+ <base64>` or a bare `+`: the server wants another client response.
    Continue(String),
    /// `+OK` or `-ERR`: the exchange is over.
    Done(StatusLine),
}

/// Finds the first line in `buf` within `limit` octets (line terminator included).
/// Returns the line without CR LF / LF and the number of bytes it occupied.
fn split_line(buf: &[u8], limit: usize) -> Result<Option<(&[u8], usize)>, CodecError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(lf) if lf < limit => {
            let line = &buf[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            Ok(Some((line, lf + 1)))
        }
        Some(_) => Err(CodecError::LineTooLong { limit }),
        None if buf.len() >= limit => Err(CodecError::LineTooLong { limit }),
        None => Ok(None),
    }
}

fn excerpt(line: &[u8]) -> String {
    let shown = &line[..line.len().min(64)];
    String::from_utf8_lossy(shown).into_owned()
}

/// RFC 1939 §3: "Responses in the POP3 consist of a status indicator and a keyword possibly
/// followed by additional information. [...] There are currently two status indicators:
/// positive ("+OK") and negative ("-ERR")."
/// RFC 2449 §8: an optional response code in square brackets follows the indicator.
fn parse_status(line: &[u8]) -> Option<StatusLine> {
    let (ok, rest) = if let Some(rest) = strip_prefix_ci(line, b"+OK") {
        (true, rest)
    } else if let Some(rest) = strip_prefix_ci(line, b"-ERR") {
        (false, rest)
    } else {
        return None;
    };
    // The indicator must end the line or be followed by a space ("+OKAY" is not a status).
    let rest = match rest.first() {
        None => rest,
        Some(b' ') | Some(b'\t') => &rest[1..],
        Some(_) => return None,
    };
    let text = String::from_utf8_lossy(rest).trim().to_owned();
    let (code, text) = split_response_code(&text);
    Some(StatusLine { ok, code, text })
}

fn strip_prefix_ci<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    if line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&line[prefix.len()..])
    } else {
        None
    }
}

/// RFC 2449 §8: `[CODE]` or `[CODE/SUB]` directly after the status indicator.
fn split_response_code(text: &str) -> (Option<String>, String) {
    if let Some(inner) = text.strip_prefix('[')
        && let Some(end) = inner.find(']')
    {
        let code = &inner[..end];
        let valid = !code.is_empty()
            && code
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-' || b == b'_');
        if valid {
            return (
                Some(code.to_ascii_uppercase()),
                inner[end + 1..].trim().to_owned(),
            );
        }
    }
    (None, text.to_owned())
}

/// Decodes one status line (`+OK ...` / `-ERR ...`).
pub fn decode_status(buf: &[u8], limit: usize) -> Result<Decode<StatusLine>, CodecError> {
    let Some((line, consumed)) = split_line(buf, limit)? else {
        return Ok(Decode::Incomplete);
    };
    match parse_status(line) {
        Some(frame) => Ok(Decode::Complete { frame, consumed }),
        None => Err(CodecError::NotAStatus {
            excerpt: excerpt(line),
        }),
    }
}

/// RFC 5034 §4: during AUTH the server sends either a continuation `+ <base64 challenge>`
/// (a bare `+` or `+ ` is an empty challenge) or a final `+OK` / `-ERR`.
pub fn decode_auth_reply(buf: &[u8], limit: usize) -> Result<Decode<AuthReply>, CodecError> {
    let Some((line, consumed)) = split_line(buf, limit)? else {
        return Ok(Decode::Incomplete);
    };
    if let Some(status) = parse_status(line) {
        return Ok(Decode::Complete {
            frame: AuthReply::Done(status),
            consumed,
        });
    }
    if let Some(rest) = line.strip_prefix(b"+")
        && (rest.is_empty() || rest[0] == b' ')
    {
        let challenge = String::from_utf8_lossy(rest).trim().to_owned();
        return Ok(Decode::Complete {
            frame: AuthReply::Continue(challenge),
            consumed,
        });
    }
    Err(CodecError::NotAStatus {
        excerpt: excerpt(line),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// At the first byte of a line.
    LineStart,
    /// A line began with '.'; the next byte decides between terminator and stuffing.
    Dot,
    /// A line began with ".\r".
    DotCr,
    /// Inside a line.
    Mid,
    /// Inside a line, just after a '\r'.
    MidCr,
    /// The terminating ".CRLF" has been consumed.
    Done,
}

/// Incremental decoder for the body of a multi-line response (the lines after `+OK`).
///
/// RFC 1939 §3: "Each line is terminated by a CRLF pair. [...] If any line of the multi-line
/// response begins with the termination octet, the line is "byte-stuffed" by pre-pending the
/// termination octet to that line of the response. [...] the multi-line response is terminated
/// with the five octets "CRLF.CRLF"."
///
/// The decoder keeps its state between calls, so it never needs a whole line in the buffer:
/// memory is bounded by `limit` however long a line is. Output lines end in CRLF.
#[derive(Debug)]
pub struct MultiLine {
    out: Vec<u8>,
    limit: usize,
    /// Decoded body octets seen, including those dropped past the limit.
    seen: u64,
    state: BodyState,
}

/// Progress of a [`MultiLine`] decoder over one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    pub done: bool,
}

impl MultiLine {
    /// A decoder that keeps at most `limit` octets of body.
    pub fn new(limit: usize) -> MultiLine {
        MultiLine {
            out: Vec::new(),
            limit,
            seen: 0,
            state: BodyState::LineStart,
        }
    }

    /// Decodes as much of `buf` as belongs to this body. Bytes after the terminator are not
    /// consumed (they belong to the next response).
    pub fn decode(&mut self, buf: &[u8]) -> Progress {
        let mut i = 0;
        while i < buf.len() && self.state != BodyState::Done {
            let b = buf[i];
            match self.state {
                BodyState::LineStart => {
                    if b == b'.' {
                        self.state = BodyState::Dot;
                    } else {
                        self.state = BodyState::Mid;
                        continue; // re-read this byte as content
                    }
                }
                BodyState::Dot => match b {
                    b'\r' => self.state = BodyState::DotCr,
                    b'\n' => self.state = BodyState::Done,
                    // A stuffed line: the leading '.' was the stuffing octet, drop it.
                    _ => {
                        self.state = BodyState::Mid;
                        continue;
                    }
                },
                BodyState::DotCr => {
                    if b == b'\n' {
                        self.state = BodyState::Done;
                    } else {
                        // ".\r" followed by content: keep the CR as content of the line.
                        self.push(b"\r");
                        self.state = BodyState::Mid;
                        continue;
                    }
                }
                BodyState::Mid => {
                    // Copy the run up to the next CR or LF in one go.
                    let run = buf[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(buf.len() - i);
                    if run > 0 {
                        self.push(&buf[i..i + run]);
                        i += run;
                        continue;
                    }
                    if b == b'\r' {
                        self.state = BodyState::MidCr;
                    } else {
                        self.push(b"\r\n");
                        self.state = BodyState::LineStart;
                    }
                }
                BodyState::MidCr => {
                    if b == b'\n' {
                        self.push(b"\r\n");
                        self.state = BodyState::LineStart;
                    } else {
                        self.push(b"\r");
                        self.state = BodyState::Mid;
                        continue;
                    }
                }
                BodyState::Done => break,
            }
            i += 1;
        }
        Progress {
            consumed: i,
            done: self.state == BodyState::Done,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.seen += bytes.len() as u64;
        let room = self.limit.saturating_sub(self.out.len());
        self.out.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// Decoded octets so far, including any dropped past the limit.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Whether the body exceeded the limit (the excess was discarded).
    pub fn over_limit(&self) -> bool {
        self.seen > self.limit as u64
    }

    /// The decoded body; `Err(seen)` when it exceeded the limit.
    pub fn finish(self) -> Result<Vec<u8>, u64> {
        if self.over_limit() {
            Err(self.seen)
        } else {
            Ok(self.out)
        }
    }
}

/// A client command. `Debug` never shows credentials: `PASS` and SASL responses print as
/// `<redacted>`, in every build.
pub enum Command<'a> {
    Capa,
    Stls,
    User(&'a str),
    Pass(&'a SecretString),
    /// `AUTH <mechanism>` without an initial response (Exchange Online requires two steps).
    Auth(&'a str),
    /// A base64 SASL response line (not subject to the 255-octet command limit, RFC 5034 §4).
    SaslResponse(&'a SecretString),
    /// The `*` line that cancels a SASL exchange.
    SaslCancel,
    Stat,
    List(Option<u32>),
    Uidl(Option<u32>),
    Top(u32, u32),
    Retr(u32),
    Dele(u32),
    Rset,
    Noop,
    Quit,
}

impl Command<'_> {
    /// The command keyword, for logs, errors and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Auth(_) => "AUTH",
            Command::SaslResponse(_) => "AUTH response",
            Command::SaslCancel => "AUTH cancel",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Uidl(_) => "UIDL",
            Command::Top(..) => "TOP",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
        }
    }

    /// The octets to send, CRLF included. The buffer may hold a credential: callers drop it
    /// right after writing and never log it.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        fn arg(s: &str) -> Result<&str, CodecError> {
            if s.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                Err(CodecError::ArgumentHasLineBreak)
            } else {
                Ok(s)
            }
        }
        let line = match self {
            Command::Capa => "CAPA".to_owned(),
            Command::Stls => "STLS".to_owned(),
            Command::User(u) => format!("USER {}", arg(u)?),
            Command::Pass(p) => format!("PASS {}", arg(p.expose_secret())?),
            Command::Auth(m) => format!("AUTH {}", arg(m)?),
            Command::SaslResponse(r) => {
                let mut out = arg(r.expose_secret())?.as_bytes().to_vec();
                out.extend_from_slice(b"\r\n");
                return Ok(out);
            }
            Command::SaslCancel => "*".to_owned(),
            Command::Stat => "STAT".to_owned(),
            Command::List(None) => "LIST".to_owned(),
            Command::List(Some(n)) => format!("LIST {n}"),
            Command::Uidl(None) => "UIDL".to_owned(),
            Command::Uidl(Some(n)) => format!("UIDL {n}"),
            Command::Top(n, lines) => format!("TOP {n} {lines}"),
            Command::Retr(n) => format!("RETR {n}"),
            Command::Dele(n) => format!("DELE {n}"),
            Command::Rset => "RSET".to_owned(),
            Command::Noop => "NOOP".to_owned(),
            Command::Quit => "QUIT".to_owned(),
        };
        let len = line.len() + 2;
        if len > MAX_COMMAND_LINE {
            return Err(CodecError::CommandTooLong { len });
        }
        let mut out = line.into_bytes();
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }
}

impl fmt::Debug for Command<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::User(u) => write!(f, "USER {u}"),
            Command::Pass(_) => f.write_str("PASS <redacted>"),
            Command::Auth(m) => write!(f, "AUTH {m}"),
            Command::SaslResponse(_) => f.write_str("<redacted SASL response>"),
            Command::SaslCancel => f.write_str("*"),
            Command::List(Some(n)) => write!(f, "LIST {n}"),
            Command::Uidl(Some(n)) => write!(f, "UIDL {n}"),
            Command::Top(n, l) => write!(f, "TOP {n} {l}"),
            Command::Retr(n) => write!(f, "RETR {n}"),
            Command::Dele(n) => write!(f, "DELE {n}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The server's CAPA answer (RFC 2449 §5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Each capability: upper-cased tag and its arguments.
    pub entries: Vec<(String, Vec<String>)>,
}

impl Capabilities {
    /// Parses the body of a CAPA response: one capability per line, tag first.
    pub fn parse(body: &[u8]) -> Capabilities {
        let text = String::from_utf8_lossy(body);
        let entries = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                let tag = words.next()?.to_ascii_uppercase();
                Some((tag, words.map(str::to_owned).collect()))
            })
            .collect();
        Capabilities { entries }
    }

    /// Whether the tag is present (`TOP`, `UIDL`, `STLS`, ...).
    pub fn has(&self, tag: &str) -> bool {
        self.entries
            .iter()
            .any(|(t, _)| t.eq_ignore_ascii_case(tag))
    }

    /// Whether `SASL` lists the mechanism.
    pub fn has_sasl(&self, mechanism: &str) -> bool {
        self.entries
            .iter()
            .any(|(t, args)| t == "SASL" && args.iter().any(|a| a.eq_ignore_ascii_case(mechanism)))
    }

    /// Whether a `SASL` line is present at all.
    pub fn advertises_sasl(&self) -> bool {
        self.has("SASL")
    }
}

/// Parses a `+OK nn mm` answer to STAT (RFC 1939 §5: "the number of messages in the maildrop
/// and the size of the maildrop in octets").
pub fn parse_stat(text: &str) -> Option<(u32, u64)> {
    let mut words = text.split_whitespace();
    let count = words.next()?.parse().ok()?;
    let size = words.next()?.parse().ok()?;
    Some((count, size))
}

/// Parses one scan listing or unique-id listing line: `msg-number SP value`
/// (RFC 1939 §5 LIST, §7 UIDL).
pub fn parse_listing_line(line: &str) -> Option<(u32, &str)> {
    let mut words = line.split_whitespace();
    let n = words.next()?.parse().ok()?;
    let value = words.next()?;
    Some((n, value))
}

/// RFC 1939 §7: a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
pub fn valid_uidl(uid: &str) -> bool {
    (1..=70).contains(&uid.len()) && uid.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(line: &str) -> StatusLine {
        match decode_status(line.as_bytes(), 512) {
            Ok(Decode::Complete { frame, .. }) => frame,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn status_lines_with_and_without_codes() {
        let s = status("+OK The Microsoft Exchange POP3 service is ready. [TQBOADIA]\r\n");
        assert!(s.ok);
        assert_eq!(s.code, None);
        assert_eq!(
            s.text,
            "The Microsoft Exchange POP3 service is ready. [TQBOADIA]"
        );

        let s = status("-ERR [SYS/TEMP] Server Unavailable. 21\r\n");
        assert!(!s.ok);
        assert_eq!(s.code.as_deref(), Some("SYS/TEMP"));
        assert_eq!(s.text, "Server Unavailable. 21");

        let s = status("-ERR [in-use] locked\n");
        assert_eq!(s.code.as_deref(), Some("IN-USE"));

        let s = status("+OK\r\n");
        assert!(s.ok && s.text.is_empty());

        // A bracket that is not a valid code stays in the text.
        let s = status("-ERR [not a code] x\r\n");
        assert_eq!(s.code, None);
        assert_eq!(s.text, "[not a code] x");
    }

    #[test]
    fn status_rejects_non_status_and_long_lines() {
        assert!(matches!(
            decode_status(b"+OKAY\r\n", 512),
            Err(CodecError::NotAStatus { .. })
        ));
        assert!(matches!(
            decode_status(b"hello\r\n", 512),
            Err(CodecError::NotAStatus { .. })
        ));
        assert_eq!(decode_status(b"+OK partial", 512), Ok(Decode::Incomplete));
        let long = vec![b'a'; 600];
        assert_eq!(
            decode_status(&long, 512),
            Err(CodecError::LineTooLong { limit: 512 })
        );
        let mut long_line = vec![b'+'; 600];
        long_line.extend_from_slice(b"\r\n");
        assert_eq!(
            decode_status(&long_line, 512),
            Err(CodecError::LineTooLong { limit: 512 })
        );
    }

    #[test]
    fn auth_replies() {
        let cases: &[(&str, AuthReply)] = &[
            ("+\r\n", AuthReply::Continue(String::new())),
            ("+ \r\n", AuthReply::Continue(String::new())),
            (
                "+ eyJzdGF0dXMiOiI0MDEifQ==\r\n",
                AuthReply::Continue("eyJzdGF0dXMiOiI0MDEifQ==".into()),
            ),
            (
                "+OK User successfully authenticated.\r\n",
                AuthReply::Done(StatusLine {
                    ok: true,
                    code: None,
                    text: "User successfully authenticated.".into(),
                }),
            ),
            (
                "-ERR [AUTH] Authentication failed.\r\n",
                AuthReply::Done(StatusLine {
                    ok: false,
                    code: Some("AUTH".into()),
                    text: "Authentication failed.".into(),
                }),
            ),
        ];
        for (line, want) in cases {
            match decode_auth_reply(line.as_bytes(), 512) {
                Ok(Decode::Complete { frame, consumed }) => {
                    assert_eq!(&frame, want, "{line:?}");
                    assert_eq!(consumed, line.len());
                }
                other => panic!("{line:?}: {other:?}"),
            }
        }
        assert!(decode_auth_reply(b"+x\r\n", 512).is_err());
    }

    /// Feeds `wire` to a fresh decoder in chunks of `chunk` bytes, the way a socket would.
    fn decode_chunked(wire: &[u8], chunk: usize, limit: usize) -> (Result<Vec<u8>, u64>, usize) {
        let mut dec = MultiLine::new(limit);
        let mut pending: Vec<u8> = Vec::new();
        let mut total_consumed = 0;
        let mut fed = 0;
        loop {
            let p = dec.decode(&pending);
            total_consumed += p.consumed;
            pending.drain(..p.consumed);
            if p.done {
                break;
            }
            assert!(fed < wire.len(), "decoder wanted more than the wire holds");
            let end = (fed + chunk).min(wire.len());
            pending.extend_from_slice(&wire[fed..end]);
            fed = end;
        }
        (dec.finish(), total_consumed)
    }

    /// (wire bytes after the +OK line, expected body)
    fn table() -> Vec<(Vec<u8>, Vec<u8>)> {
        let big_line: Vec<u8> = std::iter::repeat_n(b'x', 3000).collect();
        let mut big_wire = big_line.clone();
        big_wire.extend_from_slice(b"\r\n.\r\n");
        let mut big_body = big_line.clone();
        big_body.extend_from_slice(b"\r\n");
        vec![
            (b".\r\n".to_vec(), b"".to_vec()),
            (b"a\r\n.\r\n".to_vec(), b"a\r\n".to_vec()),
            (b"\r\n\r\n.\r\n".to_vec(), b"\r\n\r\n".to_vec()),
            (
                b"Subject: x\r\n\r\n..leading dot\r\n...\r\n.\r\n".to_vec(),
                b"Subject: x\r\n\r\n.leading dot\r\n..\r\n".to_vec(),
            ),
            // Bare LF is tolerated and normalised to CRLF.
            (b"one\ntwo\n.\n".to_vec(), b"one\r\ntwo\r\n".to_vec()),
            // A lone CR inside a line is content.
            (b"a\rb\r\n.\r\n".to_vec(), b"a\rb\r\n".to_vec()),
            // ".x" where the server forgot to stuff: the dot is still removed (RFC rule).
            (b".x\r\n.\r\n".to_vec(), b"x\r\n".to_vec()),
            (big_wire, big_body),
            // Mixed line endings in one body.
            (
                b"l1\r\nl2\n..\n.\r\n".to_vec(),
                b"l1\r\nl2\r\n.\r\n".to_vec(),
            ),
        ]
    }

    #[test]
    fn multiline_table_at_every_chunk_size() {
        for (wire, want) in table() {
            // Bytes after the terminator belong to the next response and must stay.
            let mut with_tail = wire.clone();
            with_tail.extend_from_slice(b"+OK next\r\n");
            for chunk in 1..=512 {
                let (got, consumed) = decode_chunked(&with_tail, chunk, 1 << 20);
                assert_eq!(got.as_deref(), Ok(&want[..]), "chunk {chunk} wire {wire:?}");
                assert_eq!(consumed, wire.len(), "chunk {chunk}");
            }
        }
    }

    #[test]
    fn multiline_over_limit_drains_to_terminator() {
        let wire = b"0123456789\r\n0123456789\r\n.\r\n+OK after\r\n";
        for chunk in 1..=64 {
            let (got, consumed) = decode_chunked(wire, chunk, 10);
            assert_eq!(got, Err(24), "chunk {chunk}");
            assert_eq!(&wire[consumed..], b"+OK after\r\n");
        }
        // Exactly at the limit is fine.
        let (got, _) = decode_chunked(b"0123456789\r\n.\r\n", 7, 12);
        assert_eq!(got.as_deref(), Ok(&b"0123456789\r\n"[..]));
    }

    #[test]
    fn multiline_memory_is_bounded_by_the_limit() {
        let mut dec = MultiLine::new(100);
        let junk = vec![b'z'; 1 << 20];
        let p = dec.decode(&junk);
        assert_eq!(p.consumed, junk.len());
        assert!(!p.done);
        assert!(dec.out.capacity() < 4096, "{}", dec.out.capacity());
        assert!(dec.over_limit());
    }

    #[test]
    fn commands_encode_and_redact() {
        let secret = SecretString::from("hunter2");
        assert_eq!(Command::Retr(7).encode().unwrap(), b"RETR 7\r\n");
        assert_eq!(Command::Top(3, 0).encode().unwrap(), b"TOP 3 0\r\n");
        assert_eq!(
            Command::Pass(&secret).encode().unwrap(),
            b"PASS hunter2\r\n"
        );
        assert_eq!(format!("{:?}", Command::Pass(&secret)), "PASS <redacted>");
        assert!(!format!("{:?}", Command::SaslResponse(&secret)).contains("hunter2"));
        assert_eq!(
            Command::User("a\r\nDELE 1").encode(),
            Err(CodecError::ArgumentHasLineBreak)
        );
        let long = "x".repeat(300);
        assert!(matches!(
            Command::User(&long).encode(),
            Err(CodecError::CommandTooLong { .. })
        ));
        // SASL responses may be longer than 255 octets (RFC 5034 §4).
        let blob = SecretString::from("A".repeat(3000));
        assert_eq!(Command::SaslResponse(&blob).encode().unwrap().len(), 3002);
    }

    #[test]
    fn capabilities_and_listings() {
        let caps = Capabilities::parse(b"TOP\r\nUIDL\r\nSASL PLAIN XOAUTH2\r\nUSER\r\n");
        assert!(caps.has("top") && caps.has("UIDL") && caps.has("USER"));
        assert!(caps.has_sasl("xoauth2") && caps.has_sasl("PLAIN"));
        assert!(!caps.has_sasl("OAUTHBEARER"));
        assert!(!caps.has("STLS"));
        assert_eq!(parse_stat("2 320"), Some((2, 320)));
        assert_eq!(parse_stat("x"), None);
        assert_eq!(parse_listing_line("1 AAQkAD=="), Some((1, "AAQkAD==")));
        assert_eq!(parse_listing_line("x y"), None);
        assert!(valid_uidl("AAQkADk2"));
        assert!(!valid_uidl(""));
        assert!(!valid_uidl(&"a".repeat(71)));
        assert!(!valid_uidl("has space"));
    }
}
