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
//! Bounds: every byte is looked at a fixed number of times; at most [`MAX_BOUNDARIES`]
//! nested multiparts are followed (deeper ones are read by `mail-parser` as they are); the
//! output is the input plus the inserted line breaks.

use std::borrow::Cow;
use std::ops::Range;

use mail_parser::HeaderValue;
use mail_parser::parsers::MessageStream;

/// Nested multiparts followed at once; deeper ones are left as `mail-parser` reads them.
const MAX_BOUNDARIES: usize = 64;
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
        let mut content_type: Option<Range<usize>> = None;
        let end = fields(raw, start, top, boundary.as_deref(), |field| {
            if is_named(&raw[field.clone()], b"content-type") {
                content_type = Some(field);
            }
        })?;
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
            && let Some(boundary) = multipart_boundary(&raw[field])
            && self.boundaries.len() < MAX_BOUNDARIES
        {
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
}
