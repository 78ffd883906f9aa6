//! Sans-IO POP3 framing: bytes in, frames out. Nothing here touches a socket or a clock.
//!
//! Every decoder works on a byte slice and reports how much of it it consumed, so the caller
//! (`connection.rs`) owns the buffer and the deadlines. Every decoder is bounded:
//! - a status line longer than its limit is an error;
//! - a multi-line body is kept up to a caller-given size (the rest is still consumed, so the
//!   connection stays usable) and read up to a wire limit, past which it is endless: an error;
//! - a listing is decoded one line at a time, each line bounded, into at most a caller-given
//!   number of entries; a bad line is one bad entry, never a broken listing.
//!
//! Text from the server that may reach a person (status text, SASL challenge details, listing
//! excerpts, capabilities) passes [`escape_controls`] here, where it enters: terminal escapes
//! and bidi controls never reach a log or a terminal raw.
//!
//! Line endings: servers must send CRLF; a bare LF is accepted as well and bodies come out with
//! CRLF line endings.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

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
    /// A multi-line body went on past its wire limit without a terminator.
    #[error("multi-line response longer than {limit} octets")]
    ResponseTooLong { limit: u64 },
    /// A listing went on past its wire limit without a terminator.
    #[error("listing longer than {limit} octets")]
    ListingTooLong { limit: u64 },
}

/// `+OK` or `-ERR`, with the RFC 2449 response code if there is one.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub ok: bool,
    /// The extended response code without brackets, upper-cased (`SYS/TEMP`, `IN-USE`, `AUTH`).
    pub code: Option<String>,
    /// The human-readable text after the status indicator (and code), escaped
    /// ([`escape_controls`]).
    pub text: String,
    /// Whether escaping changed the text: it is then not the server's text byte for byte (and
    /// cannot hold a valid unique-id, say).
    pub escaped: bool,
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

/// At most 64 octets of a server line, escaped for people.
fn excerpt(line: &[u8]) -> String {
    let shown = &line[..line.len().min(64)];
    escape_controls(&String::from_utf8_lossy(shown))
}

/// Whether a character must not reach a terminal or a log raw: C0 and C1 controls, DEL (all
/// `Cc`, ESC included), the bidi embedding, override and isolate controls (which reorder what
/// a person reads: `\u{202e}exe.gnp`), and the Unicode line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// Server text made safe to show: C0 and C1 controls, DEL, ESC, the bidi controls and the
/// Unicode line separators become visible escapes (`\x1b`, `\u{202e}`); everything else, any
/// valid UTF-8 text, is kept as it is.
pub fn escape_controls(text: &str) -> String {
    if !text.chars().any(needs_escape) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if c.is_ascii() {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    out
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
    let lossy = String::from_utf8_lossy(rest);
    let raw = lossy.trim();
    let escaped = raw.chars().any(needs_escape);
    let (code, text) = split_response_code(&escape_controls(raw));
    Some(StatusLine {
        ok,
        code,
        text,
        escaped,
    })
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
        let challenge = escape_controls(String::from_utf8_lossy(rest).trim());
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

/// Where the framer delivers a body: runs of line content, and line ends.
trait LineSink {
    fn content(&mut self, bytes: &[u8]);
    fn line_end(&mut self);
}

/// The multi-line framing (RFC 1939 §3) as a state machine over bytes, shared by every body
/// decoder.
///
/// RFC 1939 §3: "Each line is terminated by a CRLF pair. [...] If any line of the multi-line
/// response begins with the termination octet, the line is "byte-stuffed" by pre-pending the
/// termination octet to that line of the response. [...] the multi-line response is terminated
/// with the five octets "CRLF.CRLF"."
///
/// It also counts the wire octets it consumed and refuses to go past `wire_limit` of them
/// without seeing the terminator: an endless body ends in an error instead of being drained
/// forever.
#[derive(Debug)]
struct Framer {
    state: BodyState,
    wire: u64,
    wire_limit: u64,
}

impl Framer {
    fn new(wire_limit: u64) -> Framer {
        Framer {
            state: BodyState::LineStart,
            wire: 0,
            wire_limit,
        }
    }

    fn done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Feeds `buf` to `sink` up to the terminator; bytes after it are not consumed.
    /// `Err(wire_limit)` when the body goes on past `wire_limit` octets.
    fn run(&mut self, buf: &[u8], sink: &mut impl LineSink) -> Result<Progress, u64> {
        let room = usize::try_from(self.wire_limit.saturating_sub(self.wire)).unwrap_or(usize::MAX);
        let allowed = &buf[..buf.len().min(room)];
        let consumed = self.frame(allowed, sink);
        self.wire += consumed as u64;
        if !self.done() && buf.len() > allowed.len() {
            return Err(self.wire_limit);
        }
        Ok(Progress {
            consumed,
            done: self.done(),
        })
    }

    fn frame(&mut self, buf: &[u8], sink: &mut impl LineSink) -> usize {
        let mut i = 0;
        while i < buf.len() && self.state != BodyState::Done {
            let b = buf[i];
            match self.state {
                BodyState::LineStart => {
                    if b == b'.' {
                        self.state = BodyState::Dot;
                    } else {
                        self.state = BodyState::Mid;
                        continue;
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
                        sink.content(b"\r");
                        self.state = BodyState::Mid;
                        continue;
                    }
                }
                BodyState::Mid => {
                    // The common case, a whole line in the buffer: its LF found at once and
                    // its content (without the CR of a CRLF; a CR elsewhere in the line is
                    // content) handed over in one go.
                    if let Some(lf) = memchr::memchr(b'\n', &buf[i..]) {
                        let end = i + lf;
                        let content_end = if lf > 0 && buf[end - 1] == b'\r' {
                            end - 1
                        } else {
                            end
                        };
                        if content_end > i {
                            sink.content(&buf[i..content_end]);
                        }
                        sink.line_end();
                        i = end + 1;
                        self.state = BodyState::LineStart;
                        continue;
                    }
                    // Copy the run up to the next CR or LF in one go.
                    let run = buf[i..]
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(buf.len() - i);
                    if run > 0 {
                        sink.content(&buf[i..i + run]);
                        i += run;
                        continue;
                    }
                    if b == b'\r' {
                        self.state = BodyState::MidCr;
                    } else {
                        sink.line_end();
                        self.state = BodyState::LineStart;
                    }
                }
                BodyState::MidCr => {
                    if b == b'\n' {
                        sink.line_end();
                        self.state = BodyState::LineStart;
                    } else {
                        sink.content(b"\r");
                        self.state = BodyState::Mid;
                        continue;
                    }
                }
                BodyState::Done => break,
            }
            i += 1;
        }
        i
    }
}

/// Octets of wire a [`MultiLine`] body may take before it is abandoned as endless: twice the
/// kept limit plus 1 MiB. A message somewhat over the limit is still drained (the session stays
/// usable for its headers); a body far beyond it is not a message but an attack.
pub fn default_wire_limit(limit: usize) -> u64 {
    (limit as u64).saturating_mul(2).saturating_add(1 << 20)
}

/// Incremental decoder for the body of a multi-line response (the lines after `+OK`), framed
/// per RFC 1939 §3 (see `Framer`).
///
/// The decoder keeps its state between calls, so it never needs a whole line in the buffer:
/// memory is bounded by `limit` however long a line is. Output lines end in CRLF. Past `limit`
/// the body is still consumed (and dropped) up to its wire limit, so the connection stays
/// usable; past the wire limit decoding fails with [`CodecError::ResponseTooLong`].
#[derive(Debug)]
pub struct MultiLine {
    out: Vec<u8>,
    limit: usize,
    /// Decoded body octets seen, including those dropped past the limit.
    seen: u64,
    framer: Framer,
}

/// Progress of a body decoder over one slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    pub done: bool,
}

struct KeepBounded<'a> {
    out: &'a mut Vec<u8>,
    limit: usize,
    seen: &'a mut u64,
}

impl KeepBounded<'_> {
    fn push(&mut self, bytes: &[u8]) {
        *self.seen += bytes.len() as u64;
        let room = self.limit.saturating_sub(self.out.len());
        self.out.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl LineSink for KeepBounded<'_> {
    fn content(&mut self, bytes: &[u8]) {
        self.push(bytes);
    }
    fn line_end(&mut self) {
        self.push(b"\r\n");
    }
}

impl MultiLine {
    /// A decoder that keeps at most `limit` octets of body and reads at most
    /// [`default_wire_limit`]`(limit)` octets of it.
    pub fn new(limit: usize) -> MultiLine {
        MultiLine::with_wire_limit(limit, default_wire_limit(limit))
    }

    /// A decoder that keeps at most `limit` octets of body and reads at most `wire_limit`
    /// octets of it.
    pub fn with_wire_limit(limit: usize, wire_limit: u64) -> MultiLine {
        MultiLine {
            out: Vec::new(),
            limit,
            seen: 0,
            framer: Framer::new(wire_limit),
        }
    }

    /// Decodes as much of `buf` as belongs to this body. Bytes after the terminator are not
    /// consumed (they belong to the next response).
    pub fn decode(&mut self, buf: &[u8]) -> Result<Progress, CodecError> {
        let mut sink = KeepBounded {
            out: &mut self.out,
            limit: self.limit,
            seen: &mut self.seen,
        };
        self.framer
            .run(buf, &mut sink)
            .map_err(|limit| CodecError::ResponseTooLong { limit })
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

/// A decoder for the body of a multi-line response; the connection feeds it what arrives.
pub trait BodyDecoder {
    /// Decodes as much of `buf` as belongs to the body; bytes after its terminator are not
    /// consumed.
    fn decode_body(&mut self, buf: &[u8]) -> Result<Progress, CodecError>;
}

impl BodyDecoder for MultiLine {
    fn decode_body(&mut self, buf: &[u8]) -> Result<Progress, CodecError> {
        self.decode(buf)
    }
}

/// Longest listing line kept whole, terminator excluded. RFC 1939 §7 allows
/// `msg-number SP unique-id` = at most 10 + 1 + 70 octets; the rest is slack for sloppy
/// whitespace. A longer line is one bad entry, not a broken listing.
pub const MAX_LISTING_LINE: usize = 512;

/// Wire bound of a whole UIDL or LIST listing: 128 MiB, more than 1.6 million messages at 80
/// octets a line (a 70-character unique-id and a 7-digit number). Only the entries a caller
/// asks for are kept, so this bounds time (an endless listing at full speed), not memory.
pub const MAX_LISTING_BYTES: u64 = 128 << 20;

/// A multi-line body split into lines of at most `line_limit` octets (RFC 1939 §3 framing, see
/// `Framer`). Each line is handed over as it completes with its full length; a longer line is
/// handed over cut to `line_limit`, the rest of it discarded. Memory: one line.
#[derive(Debug)]
pub struct LineDecoder {
    framer: Framer,
    line: Vec<u8>,
    /// Octets of the current line, including those past `line_limit`.
    line_octets: u64,
    line_limit: usize,
}

struct LineCollector<'a, F> {
    line: &'a mut Vec<u8>,
    line_octets: &'a mut u64,
    line_limit: usize,
    each: &'a mut F,
}

impl<F: FnMut(&[u8], u64)> LineSink for LineCollector<'_, F> {
    fn content(&mut self, bytes: &[u8]) {
        *self.line_octets += bytes.len() as u64;
        let room = self.line_limit.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
    fn line_end(&mut self) {
        (self.each)(self.line, *self.line_octets);
        self.line.clear();
        *self.line_octets = 0;
    }
}

impl LineDecoder {
    /// Lines of at most `line_limit` octets, at most `wire_limit` octets in all.
    pub fn new(line_limit: usize, wire_limit: u64) -> LineDecoder {
        LineDecoder {
            framer: Framer::new(wire_limit),
            line: Vec::new(),
            line_octets: 0,
            line_limit,
        }
    }

    /// Decodes as much of `buf` as belongs to this body, calling `each(line, octets)` for every
    /// line completed (`octets > line.len()` when the line was cut). Past the wire limit:
    /// [`CodecError::ListingTooLong`].
    pub fn decode(
        &mut self,
        buf: &[u8],
        mut each: impl FnMut(&[u8], u64),
    ) -> Result<Progress, CodecError> {
        let mut sink = LineCollector {
            line: &mut self.line,
            line_octets: &mut self.line_octets,
            line_limit: self.line_limit,
            each: &mut each,
        };
        self.framer
            .run(buf, &mut sink)
            .map_err(|limit| CodecError::ListingTooLong { limit })
    }
}

/// A unique-id listing (the answer to `UIDL` without argument), entry by entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// In server order, at most the `max_entries` asked for.
    pub entries: Vec<ListingEntry>,
    /// More entries followed; they were read and discarded (a later poll sees them once the
    /// maildrop has shrunk).
    pub truncated: bool,
    /// Lines with no usable message number: the messages they stand for cannot be addressed.
    pub unreadable_lines: usize,
}

/// One message of a [`Listing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListingEntry {
    pub number: u32,
    pub uidl: ListedUidl,
}

/// What a listing says about one message's unique-id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListedUidl {
    /// Valid (RFC 1939 §7) and listed for this message only.
    Unique(String),
    /// Valid, but listed for several message numbers. RFC 1939 §7 allows identical copies to
    /// share one; a hostile server may lie. Either way it does not identify one message.
    Shared(String),
    /// A malformed line, or a message number listed more than once: `reason` says which, and
    /// `excerpt` shows the line (escaped, at most 64 octets of it).
    Invalid {
        reason: &'static str,
        excerpt: String,
    },
}

impl ListedUidl {
    /// The UIDL if it identifies exactly one message.
    pub fn unique(&self) -> Option<&str> {
        match self {
            ListedUidl::Unique(uidl) => Some(uidl),
            _ => None,
        }
    }
}

const REASON_LINE_TOO_LONG: &str = "the line is longer than 512 octets";
const REASON_NO_UIDL: &str = "no unique-id after the message number";
const REASON_UIDL_TOO_LONG: &str = "the unique-id is longer than 70 characters";
const REASON_UIDL_SPACE: &str =
    "the unique-id contains a space (RFC 1939: the whole rest of the line is the unique-id)";
const REASON_UIDL_CHARACTER: &str =
    "the unique-id contains a control or non-ASCII character (RFC 1939 allows 0x21 to 0x7E)";
const REASON_NUMBER_TWICE: &str = "the message number is listed more than once";

/// What one listing line says.
#[derive(Debug, PartialEq, Eq)]
enum UidlLine<'a> {
    /// Empty or only whitespace: no message.
    Blank,
    /// No usable message number.
    Unreadable,
    Entry {
        number: u32,
        uidl: Result<&'a str, &'static str>,
    },
}

/// RFC 1939 §5: message numbers are decimal, starting at 1.
fn message_number(line: &[u8]) -> Option<(u32, &[u8])> {
    let digits = line.iter().take_while(|b| b.is_ascii_digit()).count();
    let (number, rest) = line.split_at(digits);
    if digits == 0 || !(rest.is_empty() || rest[0] == b' ' || rest[0] == b'\t') {
        return None;
    }
    let number: u32 = std::str::from_utf8(number).ok()?.parse().ok()?;
    (number > 0).then_some((number, rest))
}

fn trim_blanks(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 1939 §7: "the response [to UIDL] is a multi-line response [...] each line consisting of
/// the message-number of the message, followed by a single space and the unique-id", and "The
/// unique-id of a message is an arbitrary server-determined string, consisting of one to 70
/// characters in the range 0x21 to 0x7E". The whole rest of the line is the unique-id, so
/// `1 abc def` is invalid, not `abc`. Leading and trailing blanks and several blanks after the
/// number are tolerated. `octets` is the line's full length (more than `line.len()` when cut).
fn parse_uidl_line(line: &[u8], octets: u64) -> UidlLine<'_> {
    let line = trim_blanks(line);
    if line.is_empty() && octets <= MAX_LISTING_LINE as u64 {
        return UidlLine::Blank;
    }
    let Some((number, rest)) = message_number(line) else {
        return UidlLine::Unreadable;
    };
    let uidl = if octets > MAX_LISTING_LINE as u64 {
        Err(REASON_LINE_TOO_LONG)
    } else {
        validate_uidl(trim_blanks(rest))
    };
    UidlLine::Entry { number, uidl }
}

fn validate_uidl(uid: &[u8]) -> Result<&str, &'static str> {
    if uid.is_empty() {
        return Err(REASON_NO_UIDL);
    }
    if uid.iter().any(|&b| b == b' ' || b == b'\t') {
        return Err(REASON_UIDL_SPACE);
    }
    if !uid.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(REASON_UIDL_CHARACTER);
    }
    if uid.len() > 70 {
        return Err(REASON_UIDL_TOO_LONG);
    }
    std::str::from_utf8(uid).map_err(|_| REASON_UIDL_CHARACTER)
}

/// A line of a listing as people may see it: escaped, at most 64 octets, `…` when cut.
fn listing_excerpt(line: &[u8], octets: u64) -> String {
    let mut shown = excerpt(line);
    if octets > 64 {
        shown.push('…');
    }
    shown
}

#[derive(Debug)]
struct PendingEntry {
    number: u32,
    uidl: Result<String, (&'static str, String)>,
}

/// Decodes a unique-id listing (RFC 1939 §7) line by line into a [`Listing`].
///
/// Bounded in every direction: one line of at most [`MAX_LISTING_LINE`] octets is held at a
/// time (the rest of a longer line is discarded, and the line becomes one invalid entry); at
/// most `max_entries` entries are kept (later lines are still read, so the connection stays
/// usable, and only checked against the kept ones for duplicates); the whole listing may take
/// at most `wire_limit` octets. Memory is O(`max_entries`) whatever the listing's size.
///
/// Duplicates are found with a keyed 64-bit hash of each kept UIDL: a collision can only make
/// a unique UIDL look shared (it is then not trusted), never hide a duplicate.
#[derive(Debug)]
pub struct ListingDecoder {
    lines: LineDecoder,
    max_entries: usize,
    entries: Vec<PendingEntry>,
    /// Kept entries' UIDL hashes, with how often each was listed (by any line).
    uidls: HashMap<u64, u32>,
    /// Kept entries' message numbers, with how often each was listed (by any line).
    numbers: HashMap<u32, u32>,
    hasher: RandomState,
    truncated: bool,
    unreadable_lines: usize,
}

impl ListingDecoder {
    /// Keeps at most `max_entries` entries of a listing of at most `wire_limit` octets.
    pub fn new(max_entries: usize, wire_limit: u64) -> ListingDecoder {
        ListingDecoder {
            lines: LineDecoder::new(MAX_LISTING_LINE, wire_limit),
            max_entries,
            entries: Vec::new(),
            uidls: HashMap::new(),
            numbers: HashMap::new(),
            hasher: RandomState::new(),
            truncated: false,
            unreadable_lines: 0,
        }
    }

    /// Decodes as much of `buf` as belongs to the listing. Bytes after the terminator are not
    /// consumed. Past the wire limit: [`CodecError::ListingTooLong`].
    pub fn decode(&mut self, buf: &[u8]) -> Result<Progress, CodecError> {
        let Self {
            lines,
            max_entries,
            entries,
            uidls,
            numbers,
            hasher,
            truncated,
            unreadable_lines,
        } = self;
        lines.decode(buf, |line, octets| {
            let (number, uidl) = match parse_uidl_line(line, octets) {
                UidlLine::Blank => return,
                UidlLine::Unreadable => {
                    *unreadable_lines += 1;
                    return;
                }
                UidlLine::Entry { number, uidl } => (number, uidl),
            };
            let hash = uidl.ok().map(|u| hasher.hash_one(u));
            if entries.len() < *max_entries {
                *numbers.entry(number).or_default() += 1;
                if let Some(hash) = hash {
                    *uidls.entry(hash).or_default() += 1;
                }
                entries.push(PendingEntry {
                    number,
                    uidl: uidl
                        .map(str::to_owned)
                        .map_err(|reason| (reason, listing_excerpt(line, octets))),
                });
            } else {
                // Only what concerns a kept entry is remembered: memory stays O(max_entries).
                *truncated = true;
                if let Some(count) = numbers.get_mut(&number) {
                    *count += 1;
                }
                if let Some(count) = hash.and_then(|h| uidls.get_mut(&h)) {
                    *count += 1;
                }
            }
        })
    }

    /// The listing: each kept entry with its verdict.
    pub fn finish(self) -> Listing {
        let ListingDecoder {
            entries,
            uidls,
            numbers,
            hasher,
            truncated,
            unreadable_lines,
            ..
        } = self;
        let entries = entries
            .into_iter()
            .map(|PendingEntry { number, uidl }| {
                let uidl = match uidl {
                    _ if numbers.get(&number).copied().unwrap_or(0) > 1 => {
                        let excerpt = match &uidl {
                            Ok(u) => escape_controls(&format!("{number} {u}")),
                            Err((_, excerpt)) => excerpt.clone(),
                        };
                        ListedUidl::Invalid {
                            reason: REASON_NUMBER_TWICE,
                            excerpt,
                        }
                    }
                    Ok(u) if uidls.get(&hasher.hash_one(&u)).copied().unwrap_or(0) > 1 => {
                        ListedUidl::Shared(u)
                    }
                    Ok(u) => ListedUidl::Unique(u),
                    Err((reason, excerpt)) => ListedUidl::Invalid { reason, excerpt },
                };
                ListingEntry { number, uidl }
            })
            .collect();
        Listing {
            entries,
            truncated,
            unreadable_lines,
        }
    }
}

impl BodyDecoder for ListingDecoder {
    fn decode_body(&mut self, buf: &[u8]) -> Result<Progress, CodecError> {
        self.decode(buf)
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
                let line = escape_controls(line);
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

/// Parses one scan listing line, `msg-number SP size` (RFC 1939 §5 LIST: "This memo makes no
/// requirement on what follows the message size in the scan listing", so later words are
/// ignored). Not for unique-id listings: there the whole rest of the line is the unique-id
/// ([`parse_uidl_answer`]).
pub fn parse_listing_line(line: &str) -> Option<(u32, &str)> {
    let mut words = line.split_whitespace();
    let n = words.next()?.parse().ok()?;
    let value = words.next()?;
    Some((n, value))
}

/// The text of a `+OK` answer to `UIDL n` (RFC 1939 §7: `msg-number SP unique-id`, the whole
/// rest of the line): the number and the unique-id, or why it is not one.
pub fn parse_uidl_answer(text: &str) -> Result<(u32, &str), &'static str> {
    match parse_uidl_line(text.as_bytes(), text.len() as u64) {
        UidlLine::Entry { number, uidl } => uidl.map(|u| (number, u)),
        UidlLine::Blank | UidlLine::Unreadable => Err("no message number"),
    }
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
                    escaped: false,
                }),
            ),
            (
                "-ERR [AUTH] Authentication failed.\r\n",
                AuthReply::Done(StatusLine {
                    ok: false,
                    code: Some("AUTH".into()),
                    text: "Authentication failed.".into(),
                    escaped: false,
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
            let p = dec.decode(&pending).unwrap();
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
        let p = dec.decode(&junk).unwrap();
        assert_eq!(p.consumed, junk.len());
        assert!(!p.done);
        assert!(dec.out.capacity() < 4096, "{}", dec.out.capacity());
        assert!(dec.over_limit());
    }

    #[test]
    fn an_endless_body_stops_at_its_wire_limit_at_every_chunk_size() {
        // Within the wire limit the terminator may come in the very last octets.
        let wire = b"0123456789\r\n.\r\n";
        for chunk in 1..=wire.len() {
            let mut dec = MultiLine::with_wire_limit(4, wire.len() as u64);
            let mut done = false;
            for piece in wire.chunks(chunk) {
                done = dec.decode(piece).unwrap().done;
            }
            assert!(done, "chunk {chunk}");
            assert_eq!(dec.finish(), Err(12));
        }
        // One octet more without a terminator is an endless body, however it is cut.
        let endless = vec![b'a'; 4096];
        for chunk in [1, 7, 100, 4096] {
            let mut dec = MultiLine::with_wire_limit(10, 1000);
            let mut fed = 0;
            let err = loop {
                match dec.decode(&endless[fed..(fed + chunk).min(endless.len())]) {
                    Ok(p) => {
                        assert!(!p.done);
                        fed += p.consumed;
                    }
                    Err(e) => break e,
                }
            };
            assert_eq!(err, CodecError::ResponseTooLong { limit: 1000 });
            // Not one octet past the wire limit was taken.
            assert_eq!(dec.framer.wire, 1000, "chunk {chunk}");
            assert!(fed <= 1000);
        }
        assert_eq!(default_wire_limit(10), 20 + (1 << 20));
        assert_eq!(default_wire_limit(usize::MAX), u64::MAX);
    }

    #[test]
    fn control_characters_from_the_server_are_escaped_where_they_enter() {
        assert_eq!(
            escape_controls("caf\u{e9} \u{1b}[31mred\u{7} \u{202e}exe.gnp\u{85}\u{7f}\t"),
            "caf\u{e9} \\x1b[31mred\\x07 \\u{202e}exe.gnp\\u{85}\\x7f\\x09"
        );
        assert_eq!(escape_controls("plain text, 日本語"), "plain text, 日本語");
        let s = status("-ERR [SYS/TEMP] \u{1b}[2Jgone \u{2067}x\r\n");
        assert_eq!(s.code.as_deref(), Some("SYS/TEMP"));
        assert_eq!(s.text, "\\x1b[2Jgone \\u{2067}x");
        assert!(s.escaped);
        assert!(!status("+OK fine\r\n").escaped);
        match decode_auth_reply(b"+ a\x1bb\r\n", 512) {
            Ok(Decode::Complete {
                frame: AuthReply::Continue(c),
                ..
            }) => assert_eq!(c, "a\\x1bb"),
            other => panic!("{other:?}"),
        }
        match decode_status(b"\x1b[31mnot a status\r\n", 512) {
            Err(CodecError::NotAStatus { excerpt }) => {
                assert_eq!(excerpt, "\\x1b[31mnot a status")
            }
            other => panic!("{other:?}"),
        }
        let caps = Capabilities::parse(b"SASL\x1b[2J XOAUTH2\r\n");
        assert_eq!(caps.entries[0].0, "SASL\\X1B[2J");
    }

    /// Feeds `wire` to a fresh listing decoder in chunks of `chunk` bytes.
    fn listing_chunked(wire: &[u8], chunk: usize, max_entries: usize) -> (Listing, usize) {
        let mut dec = ListingDecoder::new(max_entries, MAX_LISTING_BYTES);
        let mut consumed = 0;
        for piece in wire.chunks(chunk) {
            let p = dec.decode(piece).unwrap();
            consumed += p.consumed;
            if p.done {
                break;
            }
            assert_eq!(p.consumed, piece.len());
        }
        (dec.finish(), consumed)
    }

    fn unique(number: u32, uidl: &str) -> ListingEntry {
        ListingEntry {
            number,
            uidl: ListedUidl::Unique(uidl.to_owned()),
        }
    }

    fn invalid(number: u32, reason: &'static str, excerpt: &str) -> ListingEntry {
        ListingEntry {
            number,
            uidl: ListedUidl::Invalid {
                reason,
                excerpt: excerpt.to_owned(),
            },
        }
    }

    #[test]
    fn listing_lines_are_judged_one_by_one_at_every_chunk_size() {
        let long = "L".repeat(4096);
        let wire = format!(
            "1 AAQkAD1\r\n\
             2 abc def\r\n\
             3 esc\x1b[31m\r\n\
             4 {long}\r\n\
             no-number\r\n\
             \r\n\
             5 SAME\r\n\
             6\tSAME \r\n\
             7 {seventy_one}\r\n\
             8\r\n\
             0 zero\r\n\
             99999999999 overflow\r\n\
             9 dup-number-a\r\n\
             9 dup-number-b\r\n\
             10 caf\u{e9}\r\n\
             ..11 stuffed\r\n\
             12 last\n\
             .\r\n+OK next\r\n",
            seventy_one = "x".repeat(71)
        );
        let wire = wire.as_bytes();
        let body_len = wire.len() - b"+OK next\r\n".len();
        let want = vec![
            unique(1, "AAQkAD1"),
            invalid(2, REASON_UIDL_SPACE, "2 abc def"),
            invalid(3, REASON_UIDL_CHARACTER, "3 esc\\x1b[31m"),
            invalid(4, REASON_LINE_TOO_LONG, &format!("4 {}…", &long[..62])),
            ListingEntry {
                number: 5,
                uidl: ListedUidl::Shared("SAME".to_owned()),
            },
            ListingEntry {
                number: 6,
                uidl: ListedUidl::Shared("SAME".to_owned()),
            },
            invalid(7, REASON_UIDL_TOO_LONG, &format!("7 {}…", "x".repeat(62))),
            invalid(8, REASON_NO_UIDL, "8"),
            invalid(9, REASON_NUMBER_TWICE, "9 dup-number-a"),
            invalid(9, REASON_NUMBER_TWICE, "9 dup-number-b"),
            invalid(10, REASON_UIDL_CHARACTER, "10 caf\u{e9}"),
            // "..11 stuffed" is unstuffed to ".11 stuffed": no message number.
            unique(12, "last"),
        ];
        for chunk in 1..=300 {
            let (listing, consumed) = listing_chunked(wire, chunk, usize::MAX);
            assert_eq!(listing.entries, want, "chunk {chunk}");
            // no-number, 0, 99999999999 and .11; the blank line is no message at all.
            assert_eq!(listing.unreadable_lines, 4, "chunk {chunk}");
            assert!(!listing.truncated);
            assert_eq!(consumed, body_len, "chunk {chunk}");
        }
        assert!(REASON_LINE_TOO_LONG.contains(&MAX_LISTING_LINE.to_string()));
    }

    #[test]
    fn entries_past_max_entries_are_discarded_but_still_expose_duplicates() {
        let wire = b"1 A\r\n2 B\r\n3 C\r\n4 D\r\n5 A\r\n2 E\r\nbad\r\n.\r\n";
        for chunk in 1..=wire.len() {
            let (listing, consumed) = listing_chunked(wire, chunk, 3);
            assert_eq!(consumed, wire.len());
            assert!(listing.truncated);
            assert_eq!(listing.unreadable_lines, 1);
            assert_eq!(
                listing.entries,
                vec![
                    // Listed again for message 5, past the kept entries.
                    ListingEntry {
                        number: 1,
                        uidl: ListedUidl::Shared("A".to_owned())
                    },
                    // Message 2 listed again (as E), past the kept entries.
                    invalid(2, REASON_NUMBER_TWICE, "2 B"),
                    unique(3, "C"),
                ],
                "chunk {chunk}"
            );
        }
        // Exactly max_entries entries: nothing is truncated.
        let (listing, _) = listing_chunked(b"1 A\r\n2 B\r\n.\r\n", 5, 2);
        assert!(!listing.truncated);
        assert_eq!(listing.entries.len(), 2);
        let (listing, _) = listing_chunked(b"1 A\r\n.\r\n", 5, 0);
        assert!(listing.truncated && listing.entries.is_empty());
    }

    /// 700 000 lines, 40 MB: memory stays with the kept entries, not the listing.
    #[test]
    fn a_700_000_line_listing_decodes_in_bounded_memory() {
        const LINES: u32 = 700_000;
        const KEEP: usize = 1000;
        let mut dec = ListingDecoder::new(KEEP, MAX_LISTING_BYTES);
        let mut octets = 0u64;
        let mut chunk = Vec::with_capacity(70_000);
        let mut n = 1;
        while n <= LINES {
            chunk.clear();
            while chunk.len() < 64 * 1024 && n <= LINES {
                chunk.extend_from_slice(format!("{n} AAQkADvirtual{n:035}\r\n").as_bytes());
                n += 1;
            }
            if n > LINES {
                chunk.extend_from_slice(b".\r\n");
            }
            let p = dec.decode(&chunk).unwrap();
            assert_eq!(p.consumed, chunk.len());
            assert_eq!(p.done, n > LINES);
            octets += chunk.len() as u64;
            // The decoder's own memory: kept entries and their indexes, one line.
            assert!(
                dec.entries.capacity() <= 2 * KEEP,
                "{}",
                dec.entries.capacity()
            );
            assert!(dec.uidls.capacity() <= 4 * KEEP, "{}", dec.uidls.capacity());
            assert!(
                dec.numbers.capacity() <= 4 * KEEP,
                "{}",
                dec.numbers.capacity()
            );
            assert!(dec.lines.line.capacity() <= 2 * MAX_LISTING_LINE);
        }
        assert!(octets > 39_000_000, "{octets}");
        let listing = dec.finish();
        assert_eq!(listing.entries.len(), KEEP);
        assert!(listing.truncated);
        assert_eq!(listing.unreadable_lines, 0);
        assert_eq!(
            listing.entries[999],
            unique(1000, &format!("AAQkADvirtual{:035}", 1000))
        );
        assert!(listing.entries.iter().all(|e| e.uidl.unique().is_some()));
    }

    #[test]
    fn an_endless_listing_stops_at_its_wire_limit() {
        let mut dec = ListingDecoder::new(10, 1000);
        let line = b"1 AAA\r\n";
        let mut fed = 0usize;
        let err = loop {
            match dec.decode(line) {
                Ok(p) => fed += p.consumed,
                Err(e) => break e,
            }
            assert!(fed <= 1000);
        };
        assert_eq!(err, CodecError::ListingTooLong { limit: 1000 });
        assert!(err.to_string().contains("listing"));
    }

    #[test]
    fn uidl_answers_take_the_whole_rest_of_the_line() {
        assert_eq!(parse_uidl_answer("2 AAQkAD=="), Ok((2, "AAQkAD==")));
        assert_eq!(parse_uidl_answer("1 abc def"), Err(REASON_UIDL_SPACE));
        assert_eq!(parse_uidl_answer("x y").map(drop), Err("no message number"));
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
