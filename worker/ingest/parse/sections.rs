//! Header sections repaired before `mail-parser` reads them, where its reading loses text
//! the RFCs keep. One linear pass finds the header section of the message and of each of its
//! MIME parts and rewrites only what needs it. Nested messages (`message/rfc822` bodies) are
//! not entered: their bytes become an attachment kept as received, and they are repaired
//! when that attachment is parsed.
//!
//! * **Where a header section ends** (RFC 5322 §2.1, §3.5): at the first line that is
//!   neither a header field nor a continuation line; what follows is the body, blank line
//!   or not. `mail-parser` instead skips such lines and reads on to the next blank line,
//!   taking body lines for fields (or the rest of the message). The missing blank line is
//!   inserted before that line. A message whose first line is not a field is left alone:
//!   it has no header section to repair (the parse reports it).
//!
//! * **Adjacent encoded words of one charset** are joined before they are decoded
//!   ([`join_encoded_words`]), so a character split across two of them survives.
//!
//! * **An incomplete Content-Type** (`text`, `text/`, none at all) is completed to
//!   `text/plain` ([`complete_content_type`]), so the part is a body, not a nameless file.
//!
//! Bounds: every byte is looked at a fixed number of times; at most [`MAX_BOUNDARIES`]
//! nested multiparts are followed (from a deeper one on, the rest of the message is left as
//! `mail-parser` reads it); the
//! output is at most the input plus the inserted line breaks and a third for re-encoded
//! words (joined words hold at most [`MAX_JOINED`] bytes each).

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::HeaderValue;
use mail_parser::parsers::MessageStream;

/// Nested multiparts followed at once; deeper ones are left as `mail-parser` reads them.
const MAX_BOUNDARIES: usize = 64;
/// Decoded bytes one joined encoded word may hold; a longer run is joined in pieces.
const MAX_JOINED: usize = 16 * 1024;
/// Bytes of a Content-Type field read to learn a part's boundary; longer ones are left.
const MAX_CONTENT_TYPE: usize = 16 * 1024;

/// The message as `mail-parser` should read it, and what was changed.
pub(super) struct Repaired<'a> {
    pub bytes: Cow<'a, [u8]>,
    /// One sentence per kind of repair made, for the parse's defects.
    pub notes: Vec<String>,
}

/// Repairs `raw`; see the module documentation.
pub(super) fn repair(raw: &[u8]) -> Repaired<'_> {
    let mut walk = Walk {
        raw,
        edits: Vec::new(),
        boundaries: Vec::new(),
        missing_blank_lines: 0,
        incomplete_types: 0,
    };
    walk.run();
    let mut notes = Vec::new();
    if walk.missing_blank_lines > 0 {
        notes.push(format!(
            "{} header section{} without the blank line that must end {}: the body is taken \
             to start at the first line that is not a header field (RFC 5322 §2.1)",
            walk.missing_blank_lines,
            if walk.missing_blank_lines == 1 {
                " ends"
            } else {
                "s end"
            },
            if walk.missing_blank_lines == 1 {
                "it"
            } else {
                "them"
            },
        ));
    }
    if walk.incomplete_types > 0 {
        notes.push(format!(
            "{} Content-Type field{} no type/subtype: read as text/plain with {} \
             parameters (RFC 2045 §5.2)",
            walk.incomplete_types,
            if walk.incomplete_types == 1 {
                " has"
            } else {
                "s have"
            },
            if walk.incomplete_types == 1 {
                "its"
            } else {
                "their"
            },
        ));
    }
    Repaired {
        bytes: apply(raw, walk.edits),
        notes,
    }
}

/// Replace `at` with `with`. Edits are made in order and never overlap.
struct Edit {
    at: Range<usize>,
    with: Vec<u8>,
}

fn apply(raw: &[u8], edits: Vec<Edit>) -> Cow<'_, [u8]> {
    if edits.is_empty() {
        return Cow::Borrowed(raw);
    }
    let grown: usize = edits.iter().map(|e| e.with.len()).sum();
    let mut out = Vec::with_capacity(raw.len() + grown);
    let mut pos = 0;
    for edit in edits {
        out.extend_from_slice(&raw[pos..edit.at.start]);
        out.extend_from_slice(&edit.with);
        pos = edit.at.end;
    }
    out.extend_from_slice(&raw[pos..]);
    Cow::Owned(out)
}

/// How a header section ended.
enum End {
    /// At a blank line; the body starts after it.
    Blank(usize),
    /// At a line that is not a header field; the body starts with it.
    Missing(usize),
    /// At the end of the input.
    Eof,
}

struct Walk<'a> {
    raw: &'a [u8],
    edits: Vec<Edit>,
    /// Boundaries of the open multiparts, innermost last.
    boundaries: Vec<Vec<u8>>,
    missing_blank_lines: usize,
    incomplete_types: usize,
}

impl Walk<'_> {
    fn run(&mut self) {
        let raw = self.raw;
        let Some(mut pos) = self.section(0, true) else {
            return;
        };
        // Only the innermost multipart's delimiters count, as in `mail-parser`: a part
        // ends at its parent's boundary, never at an ancestor's.
        while pos < raw.len() {
            let Some(boundary) = self.boundaries.last() else {
                return;
            };
            let end = line_end(raw, pos);
            let line = &raw[pos..end];
            pos = end;
            match delimiter(line, boundary) {
                Some(Delimiter::Close) => {
                    self.boundaries.pop();
                }
                Some(Delimiter::Part) => match self.section(end, false) {
                    Some(body) => pos = body,
                    None => return,
                },
                None => {}
            }
        }
    }

    /// Walks the header section at `start`, records its repairs and, for a multipart,
    /// opens its boundary. Returns where its body starts; `None` leaves the message alone.
    fn section(&mut self, start: usize, top: bool) -> Option<usize> {
        let raw = self.raw;
        let boundary = self.boundaries.last().cloned();
        let mut content_type: Option<Vec<u8>> = None;
        let mut edits = Vec::new();
        let mut incomplete_types = 0;
        let end = fields(raw, start, top, boundary.as_deref(), |field| {
            let bytes = &raw[field.clone()];
            let mut changed = join_encoded_words(bytes);
            if is_named(bytes, b"content-type") {
                if let Some(completed) = complete_content_type(changed.as_deref().unwrap_or(bytes))
                {
                    changed = Some(completed);
                    incomplete_types += 1;
                }
                let done = changed.as_deref().unwrap_or(bytes);
                content_type = (done.len() <= MAX_CONTENT_TYPE).then(|| done.to_vec());
            }
            if let Some(with) = changed {
                edits.push(Edit { at: field, with });
            }
        })?;
        self.edits.append(&mut edits);
        self.incomplete_types += incomplete_types;
        let body = match end {
            End::Blank(body) => body,
            End::Missing(at) => {
                let newline: &[u8] = if raw[..at].ends_with(b"\r\n") {
                    b"\r\n"
                } else {
                    b"\n"
                };
                self.edits.push(Edit {
                    at: at..at,
                    with: newline.to_vec(),
                });
                self.missing_blank_lines += 1;
                at
            }
            End::Eof => raw.len(),
        };
        if let Some(field) = content_type
            && let Some(boundary) = multipart_boundary(&field)
        {
            if self.boundaries.len() == MAX_BOUNDARIES {
                // Deeper parts cannot be told apart from their parents' any more (a
                // boundary may be a prefix of another): the rest is left as it is.
                return None;
            }
            self.boundaries.push(boundary);
        }
        Some(body)
    }
}

/// Calls `each` with the byte range of every field (continuation lines included) of the
/// header section at `start`, and says how the section ends. `None` for a top-level
/// section whose first line is not a field (nothing to repair). `boundary`: the enclosing
/// multipart's, whose delimiter line ends a part's header section.
fn fields(
    raw: &[u8],
    start: usize,
    top: bool,
    boundary: Option<&[u8]>,
    mut each: impl FnMut(Range<usize>),
) -> Option<End> {
    let mut pos = start;
    let mut field: Option<Range<usize>> = None;
    loop {
        if pos >= raw.len() {
            if let Some(open) = field.take() {
                each(open);
            }
            return Some(End::Eof);
        }
        let end = line_end(raw, pos);
        let line = &raw[pos..end];
        let kind = if boundary.is_some_and(|b| delimiter(line, b).is_some()) {
            Line::Other
        } else {
            match (classify(line), &field) {
                // mail-parser skips white space before a section's first field.
                (Line::Continuation, None) => match line.iter().position(|b| !is_wsp(*b)) {
                    Some(first) => classify(&line[first..]),
                    None => Line::Blank,
                },
                (kind, _) => kind,
            }
        };
        match kind {
            Line::Continuation => {
                if let Some(open) = &mut field {
                    open.end = end;
                }
            }
            Line::Field => {
                if let Some(open) = field.replace(pos..end) {
                    each(open);
                }
            }
            Line::Blank => {
                if let Some(open) = field.take() {
                    each(open);
                }
                return Some(End::Blank(end));
            }
            Line::Other => {
                let seen = match field.take() {
                    Some(open) => {
                        each(open);
                        true
                    }
                    None => pos > start,
                };
                if top && !seen {
                    return None;
                }
                return Some(End::Missing(pos));
            }
        }
        pos = end;
    }
}

enum Line {
    Blank,
    Continuation,
    Field,
    Other,
}

/// RFC 5322 §2.2: a field is a name of printable ASCII other than `:`, then `:` (after
/// optional white space, RFC 5322 §4.5.4's obsolete form); a continuation line starts with
/// white space. A line of white space not starting with a space or tab ends the section,
/// as it does in `mail-parser`.
fn classify(line: &[u8]) -> Line {
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    match content.first() {
        None => Line::Blank,
        Some(b' ' | b'\t') => Line::Continuation,
        Some(_) if content.iter().all(u8::is_ascii_whitespace) => Line::Blank,
        Some(_) => {
            let Some(colon) = content.iter().position(|&b| b == b':') else {
                return Line::Other;
            };
            let name = content[..colon].trim_ascii_end();
            if !name.is_empty() && name.iter().all(|b| (33..=126).contains(b)) {
                Line::Field
            } else {
                Line::Other
            }
        }
    }
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Offset just past the line starting at `pos` (its line feed included).
fn line_end(raw: &[u8], pos: usize) -> usize {
    raw[pos..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(raw.len(), |lf| pos + lf + 1)
}

enum Delimiter {
    Part,
    Close,
}

/// RFC 2046 §5.1.1: `--boundary` starts a part, `--boundary--` closes the multipart.
/// Like `mail-parser`, whatever follows the boundary on the line is not checked.
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<Delimiter> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    Some(if rest.starts_with(b"--") {
        Delimiter::Close
    } else {
        Delimiter::Part
    })
}

/// Whether the field's name is `name` (lowercase).
fn is_named(field: &[u8], name: &[u8]) -> bool {
    field
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|colon| field[..colon].trim_ascii_end().eq_ignore_ascii_case(name))
}

/// The field's value, after its colon.
fn value(field: &[u8]) -> &[u8] {
    field
        .iter()
        .position(|&b| b == b':')
        .map_or(&[][..], |colon| &field[colon + 1..])
}

/// RFC 2045 §5.2: a Content-Type field without a complete `type/subtype` (`text`,
/// `text/`, `/plain`, nothing) is read as `text/plain`; its parameters (charset, name) are
/// kept, the charset defaulting to what an undeclared one is (UTF-8 read leniently, a
/// superset of the RFC's US-ASCII). `mail-parser` instead reads `text` as an unnamed
/// non-body part. A bare `multipart` (with its boundary) becomes `multipart/mixed`, what
/// RFC 2046 §5.1.7 makes of any multipart it does not know. `None` when the type is
/// complete.
fn complete_content_type(field: &[u8]) -> Option<Vec<u8>> {
    let colon = field.iter().position(|&b| b == b':')?;
    let value = &field[colon + 1..];
    let lead = value.iter().take_while(|b| b.is_ascii_whitespace()).count();
    let type_len = value[lead..]
        .iter()
        .position(|&b| b == b';')
        .unwrap_or(value.len() - lead);
    let written = value[lead..lead + type_len].trim_ascii_end();
    if written.contains(&b'(') {
        // A comment (RFC 2045 §5.1 allows them): left to mail-parser.
        return None;
    }
    let complete = written
        .iter()
        .position(|&b| b == b'/')
        .is_some_and(|slash| {
            !written[..slash].trim_ascii().is_empty()
                && !written[slash + 1..].trim_ascii().is_empty()
        });
    if complete {
        return None;
    }
    let replacement: &[u8] = if written.eq_ignore_ascii_case(b"multipart") {
        b"multipart/mixed"
    } else {
        b"text/plain"
    };
    let mut out = Vec::with_capacity(field.len() + replacement.len() + 1);
    if written.is_empty() && value[..lead].contains(&b'\n') {
        // `Content-Type:` without a value: the type goes on the field's own line.
        out.extend_from_slice(&field[..colon + 1]);
        out.push(b' ');
        out.extend_from_slice(replacement);
        out.extend_from_slice(value);
    } else {
        out.extend_from_slice(&field[..colon + 1 + lead]);
        out.extend_from_slice(replacement);
        out.extend_from_slice(&value[lead + written.len()..]);
    }
    Some(out)
}

/// RFC 2047 §6.2: white space between adjacent encoded words is not displayed, and a
/// character may be split across two words (RFC 2047 §5 asks senders not to, mailers do:
/// some split base64 by length). `mail-parser` decodes each word to text on its own, so a
/// split character becomes U+FFFD. Here each run of adjacent words of one charset (only
/// white space and line folds between them) becomes one base64 word holding their joined
/// bytes, which `mail-parser` then decodes once. Works for B and Q words and for every
/// charset, multi-byte and stateful ones included. Returns `None` when nothing was joined.
fn join_encoded_words(field: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut copied = 0;
    let mut pos = 0;
    while let Some(found) = find(&field[pos..], b"=?") {
        let start = pos + found;
        let Some(first) = encoded_word(field, start) else {
            pos = start + 2;
            continue;
        };
        let charset = first.charset(field);
        let mut joined = first.bytes;
        let mut words = 1;
        let mut end = first.end;
        loop {
            let next = end
                + field[end..]
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
                    .count();
            let Some(word) = encoded_word(field, next) else {
                break;
            };
            if !word.charset(field).eq_ignore_ascii_case(charset)
                || joined.len() + word.bytes.len() > MAX_JOINED
            {
                break;
            }
            joined.extend_from_slice(&word.bytes);
            words += 1;
            end = word.end;
        }
        if words > 1 {
            out.extend_from_slice(&field[copied..start]);
            out.extend_from_slice(b"=?");
            out.extend_from_slice(&field[first.label]);
            out.extend_from_slice(b"?B?");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&joined)
                    .as_bytes(),
            );
            out.extend_from_slice(b"?=");
            copied = end;
        }
        pos = end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&field[copied..]);
    Some(out)
}

/// One RFC 2047 encoded word, decoded to its charset's bytes.
struct Word {
    /// The charset label as written, `*language` included (RFC 2231 §5).
    label: Range<usize>,
    end: usize,
    bytes: Vec<u8>,
}

impl Word {
    fn charset<'f>(&self, field: &'f [u8]) -> &'f [u8] {
        let label = &field[self.label.clone()];
        label.split(|&b| b == b'*').next().unwrap_or(label)
    }
}

/// The encoded word `=?charset?B|Q?text?=` at `start`, decoded with `mail-parser`'s own
/// word decoders. RFC 2047 §2: no white space or `?` inside; the charset is at most 64
/// bytes here (the longest registered name is 45). Each call looks at most at the bytes up
/// to the word's end or the next `?` or white space, so a scan stays linear.
fn encoded_word(field: &[u8], start: usize) -> Option<Word> {
    let rest = field.get(start..)?.strip_prefix(b"=?")?;
    let label_len = rest
        .iter()
        .take(65)
        .position(|&b| b == b'?')
        .filter(|&n| n > 0 && n <= 64)?;
    let label = &rest[..label_len];
    if label.iter().any(|b| !(33..=126).contains(b)) {
        return None;
    }
    let after = &rest[label_len + 1..];
    let (&encoding, after) = after.split_first()?;
    let text = after.strip_prefix(b"?")?;
    let text_len = text
        .iter()
        .position(|&b| b == b'?' || b.is_ascii_whitespace())?;
    if !text[text_len..].starts_with(b"?=") {
        return None;
    }
    let text_start = start + 2 + label_len + 3;
    let end = text_start + text_len + 2;
    let mut stream = MessageStream::new(&field[text_start..end]);
    let bytes = match encoding {
        b'B' | b'b' => stream.decode_base64_word(),
        b'Q' | b'q' => stream.decode_quoted_printable_word(),
        _ => None,
    }?;
    Some(Word {
        label: start + 2..start + 2 + label_len,
        end,
        bytes,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The boundary of a `multipart/*` Content-Type field, as `mail-parser` reads it.
fn multipart_boundary(field: &[u8]) -> Option<Vec<u8>> {
    let value = value(field);
    if value.len() > MAX_CONTENT_TYPE {
        return None;
    }
    let mut line = value.to_vec();
    if !line.ends_with(b"\n") {
        line.push(b'\n');
    }
    match MessageStream::new(&line).parse_content_type() {
        HeaderValue::ContentType(ct) if ct.ctype().eq_ignore_ascii_case("multipart") => ct
            .attribute("boundary")
            .filter(|b| !b.is_empty())
            .map(|b| b.as_bytes().to_vec()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repaired(raw: &[u8]) -> String {
        String::from_utf8_lossy(&repair(raw).bytes).into_owned()
    }

    #[test]
    fn a_section_ends_at_its_first_line_that_is_not_a_field() {
        assert_eq!(
            repaired(b"Subject: x\r\n folded\r\nHello: there\r\nbody line\r\nA: b\r\n"),
            "Subject: x\r\n folded\r\nHello: there\r\n\r\nbody line\r\nA: b\r\n"
        );
        assert_eq!(
            repaired(b"Subject: x\nNot a field\n"),
            "Subject: x\n\nNot a field\n"
        );
        // A line of white space continues the field, as mail-parser reads it.
        assert_eq!(
            repaired(b"Subject: x\r\n   \r\nbody\r\n"),
            "Subject: x\r\n   \r\n\r\nbody\r\n"
        );
        // Complete sections and messages without any field are left as they are.
        for raw in [
            &b"Subject: x\r\n\r\nbody\r\n"[..],
            b"Subject: x\r\n",
            b"just text\r\nSubject: x\r\n\r\n",
        ] {
            assert!(matches!(repair(raw).bytes, Cow::Borrowed(_)), "{raw:?}");
        }
    }

    #[test]
    fn part_sections_end_at_a_body_line_or_a_delimiter() {
        let raw = b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
Content-Type: text/plain\r\ntext\r\n--b\r\nContent-Type: text/csv\r\n--b\r\n\
just body\r\n--b--\r\nepilogue: not a part\r\n";
        let out = repair(raw);
        assert_eq!(
            String::from_utf8_lossy(&out.bytes),
            "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\ntext\r\n--b\r\nContent-Type: text/csv\r\n\r\n--b\r\n\
\r\njust body\r\n--b--\r\nepilogue: not a part\r\n"
        );
        assert!(
            out.notes[0].starts_with("3 header sections end"),
            "{:?}",
            out.notes
        );
    }

    #[test]
    fn only_the_innermost_boundary_delimits() {
        // An inner part's line that looks like the outer delimiter is body, as in
        // mail-parser; after the inner multipart closes, the outer delimiter counts again.
        let raw = b"Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\n\
Content-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\nContent-Type: text/plain\r\n\r\n\
--o\r\nnot a header\r\n--i--\r\n--o\r\nContent-Type: text/plain\r\nlate body\r\n--o--\r\n";
        let out = repaired(raw);
        assert!(out.contains("--o\r\nnot a header"), "{out}");
        assert!(out.contains("text/plain\r\n\r\nlate body"), "{out}");
    }

    #[test]
    fn adjacent_encoded_words_of_one_charset_are_joined() {
        let joined = |field: &[u8]| {
            join_encoded_words(field).map(|f| String::from_utf8_lossy(&f).into_owned())
        };
        // "ü" split between two B words, then a folded Q word of the same charset.
        assert_eq!(
            joined(b"Subject: =?UTF-8?B?R3LD?=\r\n =?utf-8?B?vA==?= =?UTF-8?Q?e_x?=\r\n")
                .as_deref(),
            Some("Subject: =?UTF-8?B?R3LDvGUgeA==?=\r\n")
        );
        // Different charsets, a single word, malformed words: nothing to join.
        for field in [
            &b"Cc: =?ISO-8859-1?Q?caf=E9?= =?UTF-8?Q?_=E2=82=AC?= <a@b>\r\n"[..],
            b"Subject: =?UTF-8?B?R3LDvA==?= plain\r\n",
            b"Subject: =?UTF-8?B?R3LD?= x =?UTF-8?B?vA==?=\r\n",
            b"Subject: =?=?=?=?UTF-8?Q?a b?= =?UTF-8?Q??=\r\n",
        ] {
            assert_eq!(joined(field), None, "{field:?}");
        }
    }

    #[test]
    fn joining_stays_bounded_on_hostile_fields() {
        // 200,000 adjacent words: joined in pieces of at most MAX_JOINED bytes.
        let mut field = b"Subject:".to_vec();
        for _ in 0..200_000 {
            field.extend_from_slice(b" =?UTF-8?Q?ab?=");
        }
        field.extend_from_slice(b"\r\n");
        let out = join_encoded_words(&field).unwrap_or_default();
        let words = out.windows(3).filter(|w| w == b"?B?").count();
        assert_eq!(words, 400_000 / MAX_JOINED + 1);
        // Many starts that never complete.
        let field = [b"Subject: ".as_slice(), &b"=?".repeat(300_000)].concat();
        assert_eq!(join_encoded_words(&field), None);
    }

    #[test]
    fn an_incomplete_content_type_becomes_text_plain() {
        let completed = |field: &[u8]| {
            complete_content_type(field).map(|f| String::from_utf8_lossy(&f).into_owned())
        };
        for (field, expected) in [
            (
                &b"Content-Type: text\r\n"[..],
                "Content-Type: text/plain\r\n",
            ),
            (
                b"Content-Type: text; charset=utf-8\r\n",
                "Content-Type: text/plain; charset=utf-8\r\n",
            ),
            (b"content-type:text/\n", "content-type:text/plain\n"),
            (
                b"Content-Type: /html ; x=y\r\n",
                "Content-Type: text/plain ; x=y\r\n",
            ),
            (
                b"Content-Type: ; charset=us-ascii\r\n",
                "Content-Type: text/plain; charset=us-ascii\r\n",
            ),
            (b"Content-Type:\r\n", "Content-Type: text/plain\r\n"),
            (
                b"Content-Type:\r\n text;\r\n charset=x\r\n",
                "Content-Type:\r\n text/plain;\r\n charset=x\r\n",
            ),
            (
                b"Content-Type: multipart; boundary=b\r\n",
                "Content-Type: multipart/mixed; boundary=b\r\n",
            ),
        ] {
            assert_eq!(completed(field).as_deref(), Some(expected), "{field:?}");
        }
        for field in [
            &b"Content-Type: text/plain\r\n"[..],
            b"Content-Type: TEXT / HTML; charset=utf-8\r\n",
            b"Content-Type: text/plain (a comment)\r\n",
            b"Content-Type: (comment) text\r\n",
        ] {
            assert_eq!(completed(field), None, "{field:?}");
        }
    }

    #[test]
    fn nesting_past_the_tracked_depth_is_left_alone() {
        let mut raw = String::from("Subject: deep\r\n");
        for level in 0..=MAX_BOUNDARIES {
            raw.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n"
            ));
        }
        // A part past the cap that the walk would otherwise repair.
        raw.push_str("Content-Type: text/plain\r\nno blank line\r\n--b64--\r\n");
        assert!(matches!(repair(raw.as_bytes()).bytes, Cow::Borrowed(_)));
    }
}
