//! A count of what `mail-parser` would build for a message, taken before it builds anything.
//!
//! `mail-parser` allocates per part (~170 bytes plus its header fields) and per header field
//! (~120 bytes plus a token or address per delimiter), and for a base64 or quoted-printable
//! `message/rfc822` part it parses the decoded bytes and copies them once per nested message
//! inside (`into_owned`), recursively. None of that can be interrupted once started, so this
//! walk runs first, over the same bytes, with `mail-parser`'s own tokenizer
//! ([`MessageStream`]): the same header parser, the same boundary search, the same decoders,
//! the same state transitions as `MessageParser::parse` in mail-parser 0.11.9
//! (`parsers/message.rs`), keeping nothing but counts. Where a count passes a limit it
//! records a cut: the offset of the first part (or header field) that would pass it. Parsing
//! `input[..cut]` then builds at most the limits.
//!
//! Invariants:
//! * the walk is iterative; it recurses only into decoded message parts, at most
//!   [`MAX_NESTED_ENCODED`] levels, as `mail-parser` does;
//! * its own memory is one header field's value at a time (checked against the budget before
//!   the value is parsed), one decoded body at a time, and a stack of one small frame per open
//!   nesting level;
//! * it stops at the first cut, so a hostile message costs at most one pass up to the limits.
//!
//! When `mail-parser` is upgraded, compare `parse_` with [`Walk::run`] again; the proptest
//! `census_counts_what_mail_parser_builds` and the fuzz target check that the counts agree.

use mail_parser::parsers::MessageStream;
use mail_parser::{HeaderName, HeaderValue};

/// `mail-parser`'s own limit on decoding nested encoded messages (`MAX_NESTED_ENCODED`).
pub(super) const MAX_NESTED_ENCODED: usize = 3;

/// Estimated bytes `mail-parser` keeps per part (`MessagePart`, its `Vec` of headers, the
/// part id lists); measured ≈170 bytes for a part without headers.
const PART_COST: usize = 192;
/// Estimated bytes per header field (`Header`, its name and value); measured ≈120 bytes for
/// `a:b` lines.
const FIELD_COST: usize = 128;
/// Estimated bytes per delimiter in a header value: each may start a token (`Cow<str>`, 24
/// bytes, plus a separator token) or an address (`Addr`, 48 bytes).
const DELIMITER_COST: usize = 48;

/// What the limits allow. See `ParseLimits` for the meaning of each.
#[derive(Debug, Clone, Copy)]
pub(super) struct Caps {
    pub parts: usize,
    pub message_depth: usize,
    pub structure_bytes: usize,
}

/// Which limit a cut enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CutReason {
    /// More parts than `Caps::parts`.
    Parts,
    /// Nested messages deeper than `Caps::message_depth`.
    Depth,
    /// Estimated parser memory above `Caps::structure_bytes`.
    Structure,
}

/// Where parsing must stop and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cut {
    /// Offset in the walked bytes: parse `input[..offset]`.
    pub offset: usize,
    pub reason: CutReason,
}

/// The result of a walk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Census {
    /// Parts `mail-parser` creates (every MIME part, nested and decoded messages included),
    /// counted up to the cut.
    pub parts: usize,
    /// Header fields, counted up to the cut.
    pub fields: usize,
    /// Deepest nesting of parts: 1 for a single-part message, +1 per multipart or nested
    /// message level (counted up to the cut).
    pub depth: usize,
    /// Deepest nesting of messages: 1 for the message itself, +1 per `message/rfc822` level.
    pub message_depth: usize,
    /// Deepest nesting reached anywhere, also in what the cut leaves out.
    pub deepest: usize,
    /// Estimated bytes of parser bookkeeping, up to the cut.
    pub structure_bytes: usize,
    /// Set when a limit was reached.
    pub cut: Option<Cut>,
}

/// Walks `input` like `MessageParser::default().parse(input)` would. See the module docs.
pub(super) fn census(input: &[u8], caps: Caps) -> Census {
    let mut walk = Walk {
        caps,
        census: Census::default(),
    };
    // A stop means a cut was recorded; the counts up to it are what the caller needs.
    let _ = walk.run(input, MAX_NESTED_ENCODED, Level::TOP, None);
    walk.census
}

/// Nesting of the part being parsed.
#[derive(Debug, Clone, Copy)]
struct Level {
    depth: usize,
    message_depth: usize,
}

impl Level {
    const TOP: Level = Level {
        depth: 1,
        message_depth: 1,
    };
}

/// The walk reached a limit; the cut is recorded in the census.
struct Stop;

/// The mirror of `mail-parser`'s `MimeType`, reduced to what decides structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Digest,
    OtherMultipart,
    TextPlain,
    /// Any other leaf: text/*, image, binary, or a multipart without a usable boundary.
    Leaf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    None,
    Base64,
    QuotedPrintable,
}

/// One nesting level: `mail-parser`'s `MessageParserState`, structure fields only.
struct Frame {
    kind: Kind,
    boundary: Option<Vec<u8>>,
    level: Level,
}

/// One pushed level: the parent frame and, for a nested message, the part count of the
/// parent message (restored when the nested message ends).
struct Pushed {
    frame: Frame,
    message_parts: Option<usize>,
}

/// What a walk of one buffer produced.
struct Walked {
    /// Whether `mail-parser` returns a message for the buffer (`Some`).
    message: bool,
    /// Non-empty nested messages inside it (each a `Message` value of its own).
    nested_messages: usize,
    /// The bookkeeping estimate charged for it.
    structure_bytes: usize,
}

/// The header fields of one part that decide its structure.
#[derive(Default)]
struct Block<'x> {
    fields: usize,
    content_type: Option<HeaderValue<'x>>,
    transfer: Option<HeaderValue<'x>>,
}

struct Walk {
    caps: Caps,
    census: Census,
}

impl Walk {
    fn cut(&mut self, offset: usize, reason: CutReason) -> Stop {
        self.census.cut = Some(Cut { offset, reason });
        Stop
    }

    fn charge(&mut self, bytes: usize, offset: usize) -> Result<(), Stop> {
        let total = self.census.structure_bytes.saturating_add(bytes);
        if total > self.caps.structure_bytes {
            return Err(self.cut(offset, CutReason::Structure));
        }
        self.census.structure_bytes = total;
        Ok(())
    }

    /// The counts a cut at the current part's start must return to.
    fn snapshot(&self) -> Census {
        Census {
            cut: None,
            ..self.census.clone()
        }
    }

    /// Forgets what was counted since `snapshot` (the cut leaves it out), keeping the
    /// deepest nesting seen and the cut.
    fn restore(&mut self, snapshot: Census) {
        let deepest = self.census.deepest;
        let cut = self.census.cut;
        self.census = Census {
            deepest,
            cut,
            ..snapshot
        };
    }

    fn reach(&mut self, level: Level) {
        self.census.deepest = self.census.deepest.max(level.depth);
    }

    /// Counts one part created at `offset` (in top-level coordinates) at `level`.
    fn part(&mut self, offset: usize, level: Level) -> Result<(), Stop> {
        self.reach(level);
        if self.census.parts >= self.caps.parts {
            return Err(self.cut(offset, CutReason::Parts));
        }
        self.charge(PART_COST, offset)?;
        self.census.parts += 1;
        self.census.depth = self.census.depth.max(level.depth);
        self.census.message_depth = self.census.message_depth.max(level.message_depth);
        Ok(())
    }

    /// Mirrors `MessageParser::parse_` over `data`. `at` is the top-level offset charged for
    /// anything found in `data` when `data` is decoded content (`None` at the top level).
    fn run(
        &mut self,
        data: &[u8],
        encoded_depth: usize,
        top: Level,
        at: Option<usize>,
    ) -> Result<Walked, Stop> {
        let charged_before = self.census.structure_bytes;
        let mut stream = MessageStream::new(data);
        let mut state = Frame {
            kind: Kind::Message,
            boundary: None,
            level: top,
        };
        let mut stack: Vec<Pushed> = Vec::new();
        // Parts of the message currently being filled (`message.parts.len()`).
        let mut message_parts = 0usize;
        let mut nested_messages = 0usize;
        let mut pending_fields;

        'outer: loop {
            let offset_header = stream.offset();
            let place = at.unwrap_or(offset_header);
            // A cut at this part (in decoded content inside it) leaves the whole part out.
            let before = at.is_none().then(|| self.snapshot());
            let mut block = Block::default();
            let complete = self.header_block(data, &mut stream, &mut block, at)?;
            pending_fields = block.fields;
            if !complete {
                break;
            }
            pending_fields = 0;
            self.part(place, state.level)?;
            message_parts += 1;

            let content_type = block
                .content_type
                .as_ref()
                .and_then(|v| v.as_content_type());
            let (is_multipart, mut kind) = match content_type {
                Some(ct) => match ct.ctype() {
                    "multipart" => (
                        true,
                        if ct.subtype() == Some("digest") {
                            Kind::Digest
                        } else {
                            Kind::OtherMultipart
                        },
                    ),
                    "text" if ct.subtype() == Some("plain") => (false, Kind::TextPlain),
                    "message" if matches!(ct.subtype(), Some("rfc822" | "global")) => {
                        (false, Kind::Message)
                    }
                    _ => (false, Kind::Leaf),
                },
                None if state.kind == Kind::Digest => (false, Kind::Message),
                None => (false, Kind::TextPlain),
            };

            if is_multipart
                && let Some(boundary) = content_type.and_then(|ct| ct.attribute("boundary"))
            {
                if stream.seek_next_part(boundary.as_bytes()) {
                    let child = Frame {
                        kind,
                        boundary: Some(boundary.as_bytes().to_vec()),
                        level: Level {
                            depth: state.level.depth + 1,
                            message_depth: state.level.message_depth,
                        },
                    };
                    stack.push(Pushed {
                        frame: std::mem::replace(&mut state, child),
                        message_parts: None,
                    });
                    stream.skip_crlf();
                    continue;
                }
                kind = Kind::Leaf;
            }

            let mut transfer = match &block.transfer {
                Some(HeaderValue::Text(t)) if t.eq_ignore_ascii_case("base64") => Transfer::Base64,
                Some(HeaderValue::Text(t)) if t.eq_ignore_ascii_case("quoted-printable") => {
                    Transfer::QuotedPrintable
                }
                _ => Transfer::None,
            };

            if kind == Kind::Message && transfer == Transfer::None {
                let level = Level {
                    depth: state.level.depth + 1,
                    message_depth: state.level.message_depth + 1,
                };
                if level.message_depth > self.caps.message_depth {
                    self.reach(level);
                    return Err(self.cut(at.unwrap_or(stream.offset()), CutReason::Depth));
                }
                let child = Frame {
                    kind: Kind::Message,
                    boundary: state.boundary.take(),
                    level,
                };
                stack.push(Pushed {
                    frame: std::mem::replace(&mut state, child),
                    message_parts: Some(message_parts),
                });
                message_parts = 0;
                continue;
            }

            let boundary = state.boundary.as_deref().unwrap_or(b"");
            let decoded_needed = kind == Kind::Message && encoded_depth != 0;
            let (offset_end, bytes) = match transfer {
                // Only a nested message's decoded bytes are walked; for any other part only
                // where it ends matters, and finding that without decoding is most of the
                // census's time on mail with large attachments.
                Transfer::Base64 if !decoded_needed => {
                    (skip_base64_mime(&mut stream, boundary), Default::default())
                }
                Transfer::Base64 => stream.decode_base64_mime(boundary),
                Transfer::QuotedPrintable => stream.decode_quoted_printable_mime(boundary),
                Transfer::None => stream.mime_part(boundary),
            };
            if offset_end == usize::MAX {
                transfer = Transfer::None;
                if kind != Kind::TextPlain {
                    kind = Kind::Leaf;
                }
                let (_, found) = stream.seek_part_end(state.boundary.as_deref());
                if !found {
                    state.boundary = None;
                }
            }
            if kind == Kind::Message && transfer != Transfer::None && encoded_depth != 0 {
                let level = Level {
                    depth: state.level.depth + 1,
                    message_depth: state.level.message_depth + 1,
                };
                let outcome = if level.message_depth > self.caps.message_depth {
                    self.reach(level);
                    Err(self.cut(place, CutReason::Depth))
                } else {
                    self.run(&bytes, encoded_depth - 1, level, Some(place))
                        .and_then(|inner| {
                            if inner.message {
                                // `into_owned` copies the decoded bytes for the message and
                                // for every nested message inside it, and every header value
                                // once more.
                                let copies = bytes.len().saturating_mul(1 + inner.nested_messages);
                                self.charge(copies.saturating_add(inner.structure_bytes), place)?;
                            }
                            Ok(inner)
                        })
                };
                match outcome {
                    Ok(inner) if inner.message => nested_messages += 1 + inner.nested_messages,
                    Ok(_) => {}
                    Err(stop) => {
                        if let Some(before) = before {
                            self.restore(before);
                        }
                        return Err(stop);
                    }
                }
            }
            drop(bytes);

            if state.boundary.is_some() {
                'inner: loop {
                    if state.kind == Kind::Message {
                        // The nested message ended; back to its parent.
                        match stack.pop() {
                            Some(Pushed {
                                frame: mut parent,
                                message_parts: Some(parent_parts),
                            }) => {
                                if message_parts > 0 {
                                    nested_messages += 1;
                                }
                                message_parts = parent_parts;
                                parent.boundary = state.boundary.take();
                                state = parent;
                            }
                            _ => break 'outer,
                        }
                    }
                    if stream.is_multipart_end() {
                        if let Some(pushed) = stack.pop() {
                            state = pushed.frame;
                            if let Some(boundary) = &state.boundary
                                && stream.seek_next_part_offset(boundary).is_some()
                            {
                                continue 'inner;
                            }
                        }
                        break 'outer;
                    }
                    break 'inner;
                }
            } else if stream.offset() >= data.len() {
                break 'outer;
            }
        }

        // `mail-parser` recovers unclosed levels: each nested message with parts becomes a
        // message value of its own.
        while let Some(pushed) = stack.pop() {
            if let Some(parent_parts) = pushed.message_parts {
                if message_parts > 0 {
                    nested_messages += 1;
                }
                message_parts = parent_parts;
            }
        }
        let mut message = message_parts > 0;
        if !message && pending_fields > 0 {
            // "Message without a body": one part holding the headers.
            let place = at.unwrap_or(0);
            self.part(place, top)?;
            message = true;
        }
        Ok(Walked {
            message,
            nested_messages,
            structure_bytes: self.census.structure_bytes - charged_before,
        })
    }

    /// Mirrors `MessageStream::parse_headers` with `MessageParser::default()`: parses each
    /// field with the parser `mail-parser` uses for its name (so each field ends where it
    /// does), keeping only `Content-Type` and `Content-Transfer-Encoding`. Returns whether
    /// the block ended with its blank line (`false`: the input ended first).
    fn header_block<'x>(
        &mut self,
        data: &'x [u8],
        stream: &mut MessageStream<'x>,
        block: &mut Block<'x>,
        at: Option<usize>,
    ) -> Result<bool, Stop> {
        loop {
            loop {
                match stream.peek() {
                    Some(b'\n') => {
                        stream.next();
                        return Ok(true);
                    }
                    None => return Ok(false),
                    Some(ch) if !ch.is_ascii_whitespace() => break,
                    _ => {
                        stream.next();
                    }
                }
            }
            let offset_field = stream.offset();
            let Some(name) = stream.parse_header_name() else {
                if stream.is_eof() {
                    return Ok(false);
                }
                continue;
            };
            // Charge the field before its value is parsed: a single 50 MB `To` field is
            // refused here, before its tokens are allocated (by this walk or the parse).
            let value = field_value(data, stream.offset());
            let cost = FIELD_COST
                .saturating_add(delimiters(value).saturating_mul(DELIMITER_COST))
                .saturating_add(value.len().saturating_mul(2));
            if let Err(stop) = self.charge(cost, at.unwrap_or(offset_field)) {
                if at.is_none() && block.fields > 0 && self.census.parts == 0 {
                    // The fields before the cut become the "message without a body" part.
                    self.census.parts = 1;
                    self.census.depth = 1;
                    self.census.message_depth = 1;
                    self.reach(Level::TOP);
                }
                return Err(stop);
            }
            self.census.fields += 1;
            block.fields += 1;
            match name {
                HeaderName::ContentType => block.content_type = Some(stream.parse_content_type()),
                HeaderName::ContentTransferEncoding => {
                    block.transfer = Some(stream.parse_unstructured());
                }
                name => skip_value(stream, &name),
            }
        }
    }
}

/// Parses (and drops) a field value with the parser `MessageParser::default()` uses for
/// `name` (mail-parser 0.11.9 `parsers/header.rs`), so the stream ends where a parse's would.
/// What `skip_base64_mime` does with each byte.
const B64_PLAIN: u8 = 0;
const B64_LF: u8 = 1;
const B64_DASH: u8 = 2;
const B64_INVALID: u8 = 3;

/// Byte classes of `MessageStream::decode_base64_mime` (mail-parser 0.11.9,
/// `decoders/base64.rs`): the base64 alphabet, `=`, and the blanks ` \t\r` are consumed
/// without a decision; LF marks a possible end of the body; `-` may start a boundary; any
/// other byte makes the part an encoding problem.
static B64_CLASS: [u8; 256] = {
    let mut class = [B64_INVALID; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b' ' | b'\t' | b'\r') {
            class[b] = B64_PLAIN;
        }
        b += 1;
    }
    class[b'\n' as usize] = B64_LF;
    class[b'-' as usize] = B64_DASH;
    class
};

/// `stream.decode_base64_mime(boundary).0` without decoding: the same end offset (or
/// `usize::MAX`) and the same stream position afterwards, at a fraction of the cost, because
/// the decision points (LF, `--` + boundary, a byte outside the alphabet) depend only on the
/// byte and the two before it, never on the decoder's state. (`=` never fails there: the
/// decoder's count of pending sextets is always 0–3.)
fn skip_base64_mime(stream: &mut MessageStream<'_>, boundary: &[u8]) -> usize {
    let start = stream.offset();
    let data = stream.bytes(0..stream.len());
    stream.checkpoint();
    let mut end_pos = start;
    let mut i = start;
    while i < data.len() {
        let class = B64_CLASS[usize::from(data[i])];
        if class == B64_PLAIN {
            i += 1;
            continue;
        }
        // The decoder's `last_ch` starts as LF and `before_last_ch` as 0.
        let last = if i > start { data[i - 1] } else { b'\n' };
        let before_last = match i - start {
            0 => 0,
            1 => b'\n',
            _ => data[i - 2],
        };
        match class {
            B64_LF => end_pos = if last == b'\r' { i - 1 } else { i },
            B64_DASH if last == b'-' => {
                return if !boundary.is_empty() && data[i + 1..].starts_with(boundary) {
                    stream.skip_bytes(i + 1 + boundary.len() - start);
                    if before_last == b'\n' { end_pos } else { i - 1 }
                } else {
                    stream.restore();
                    usize::MAX
                };
            }
            B64_DASH => {}
            _ => {
                stream.restore();
                return usize::MAX;
            }
        }
        i += 1;
    }
    if boundary.is_empty() {
        stream.skip_bytes(data.len() - start);
        data.len()
    } else {
        stream.restore();
        usize::MAX
    }
}

fn skip_value(stream: &mut MessageStream<'_>, name: &HeaderName<'_>) {
    match name {
        HeaderName::Subject
        | HeaderName::Comments
        | HeaderName::ContentDescription
        | HeaderName::ContentLocation
        | HeaderName::ContentTransferEncoding => drop(stream.parse_unstructured()),
        HeaderName::From
        | HeaderName::To
        | HeaderName::Cc
        | HeaderName::Bcc
        | HeaderName::ReplyTo
        | HeaderName::Sender
        | HeaderName::ResentTo
        | HeaderName::ResentFrom
        | HeaderName::ResentBcc
        | HeaderName::ResentCc
        | HeaderName::ResentSender
        | HeaderName::ListArchive
        | HeaderName::ListHelp
        | HeaderName::ListId
        | HeaderName::ListOwner
        | HeaderName::ListPost
        | HeaderName::ListSubscribe
        | HeaderName::ListUnsubscribe => drop(stream.parse_address()),
        HeaderName::Date | HeaderName::ResentDate => drop(stream.parse_date()),
        HeaderName::MessageId
        | HeaderName::References
        | HeaderName::InReplyTo
        | HeaderName::ReturnPath
        | HeaderName::ContentId
        | HeaderName::ResentMessageId => drop(stream.parse_id()),
        HeaderName::Keywords | HeaderName::ContentLanguage => drop(stream.parse_comma_separared()),
        HeaderName::Received => drop(stream.parse_received()),
        HeaderName::ContentType | HeaderName::ContentDisposition => {
            drop(stream.parse_content_type())
        }
        _ => drop(stream.parse_raw()),
    }
}

/// The bytes of a field value starting at `start`: up to the first line feed that is not
/// followed by folding white space (RFC 5322 §2.2.3), or the end of the input.
fn field_value(data: &[u8], start: usize) -> &[u8] {
    let rest = data.get(start..).unwrap_or_default();
    let mut from = 0;
    while let Some(lf) = rest[from..].iter().position(|&b| b == b'\n') {
        let lf = from + lf;
        if !matches!(rest.get(lf + 1), Some(b' ' | b'\t')) {
            return &rest[..lf + 1];
        }
        from = lf + 1;
    }
    rest
}

/// Bytes at which `mail-parser`'s value parsers may start a new token, address or encoded
/// word.
fn delimiters(value: &[u8]) -> usize {
    value
        .iter()
        .filter(|b| {
            matches!(
                b,
                b' ' | b'\t'
                    | b'\n'
                    | b','
                    | b';'
                    | b':'
                    | b'<'
                    | b'>'
                    | b'"'
                    | b'('
                    | b')'
                    | b'='
                    | b'\\'
            )
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes drawn mostly from what decides the decoder's path.
    fn hostile_body(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
        const PICKS: &[u8] = b"AZaz09+/=== \t\r\n\n\n--\x00\xff.!";
        (0..len)
            .map(|_| {
                if rng.u8(..4) == 0 {
                    PICKS[rng.usize(..PICKS.len())]
                } else {
                    b"QUJD"[rng.usize(..4)]
                }
            })
            .collect()
    }

    #[test]
    fn base64_skip_ends_where_the_decoder_ends_and_leaves_the_stream_alike() {
        let mut rng = fastrand::Rng::with_seed(0xb64);
        let boundaries: [&[u8]; 3] = [b"", b"b1", b"=_part_0_x"];
        for round in 0..20_000 {
            let boundary = boundaries[round % boundaries.len()];
            let len = rng.usize(0..200);
            let mut data = hostile_body(&mut rng, len);
            if rng.bool() && !boundary.is_empty() {
                // A real closing or separating boundary somewhere, sometimes not after a LF.
                let at = rng.usize(0..=data.len());
                let mut tail = data.split_off(at);
                if rng.bool() {
                    data.push(b'\n');
                }
                data.extend_from_slice(b"--");
                data.extend_from_slice(boundary);
                data.append(&mut tail);
            }
            let start = rng.usize(0..=data.len().min(8));
            let mut decoding = MessageStream::new(&data);
            let mut skipping = MessageStream::new(&data);
            decoding.skip_bytes(start);
            skipping.skip_bytes(start);
            let want = decoding.decode_base64_mime(boundary).0;
            let got = skip_base64_mime(&mut skipping, boundary);
            assert_eq!(
                got, want,
                "end offset for {data:?} from {start}, boundary {boundary:?}"
            );
            assert_eq!(
                skipping.offset(),
                decoding.offset(),
                "stream offset for {data:?} from {start}, boundary {boundary:?}"
            );
            assert_eq!(skipping.peek(), decoding.peek(), "next byte for {data:?}");
        }
    }

    #[test]
    fn base64_classes_match_the_decoders_alphabet() {
        let table = mail_parser::decoders::base64::BASE64_MAP;
        for b in 0..=255u8 {
            let valid = table.iter().all(|row| row[usize::from(b)] < 0x01ff_ffff);
            let invalid = table.iter().all(|row| row[usize::from(b)] >= 0x01ff_ffff);
            assert!(valid || invalid, "byte {b} valid in some rows only");
            assert_eq!(
                valid,
                b.is_ascii_alphanumeric() || b == b'+' || b == b'/',
                "byte {b}"
            );
        }
    }
}
