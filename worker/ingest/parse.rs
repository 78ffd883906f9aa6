//! Turns raw RFC 5322 bytes into the fields a work item shows. Never fails: a message the
//! parser cannot make sense of still yields a [`ParsedMail`] with `parse_error` set.
//!
//! The heavy lifting is done by `mail-parser` (Stalwart); this module chooses which of its
//! views a contact-center agent sees and makes the result safe to store:
//!
//! * **Never panics, never fails.** Empty input, bytes without a header section and anything
//!   `mail-parser` rejects produce a `ParsedMail` whose `parse_error` says what is wrong;
//!   whatever could be recovered is still filled in. A panic inside the parser is caught and
//!   reported the same way, so one hostile message cannot take a poller down.
//! * **Text is PostgreSQL-safe.** Every string is valid UTF-8 without NUL characters
//!   (PostgreSQL `text` rejects U+0000), so storing a `ParsedMail` cannot fail on content.
//! * **Legacy 8-bit headers are decoded.** Header lines that are not valid UTF-8 are decoded
//!   with the charset of the top-level `Content-Type` (what the sending client used), or
//!   windows-1252 when none is declared, instead of becoming U+FFFD.
//! * **Bodies**: `text_body` joins every inline text part (HTML-only mail gets text derived
//!   from the HTML); `html_body` is `None` unless the message has a real `text/html` part.
//! * **Attachments** are every non-body part, in MIME order, with transfer-decoded bytes
//!   (text attachments keep their original charset bytes). A nested `message/rfc822` is one
//!   attachment holding the nested message's raw bytes.
//! * **Bounded**: the work is linear in the size of the input (no per-part rescans), so a
//!   message with 100 000 header lines or 10 000 parts still returns.
//!
//! Golden tests: every `tests/fixtures/mail/NAME.eml` is parsed and compared with
//! `NAME.json`. After an intended change run `UPDATE_GOLDEN=1 cargo test --lib golden` to
//! rewrite the `.json` files, then review the diff before committing it.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::{base64::base64_decode, quoted_printable::quoted_printable_decode};
use mail_parser::{
    Encoding, HeaderName, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType,
};

/// A mailbox in an address header, decoded (encoded words resolved).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Address {
    /// Display name, if the header had one.
    pub name: Option<String>,
    /// The address as written (no case folding).
    pub email: Option<String>,
}

/// One attachment or inline part, decoded from its transfer encoding.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// File name from `Content-Disposition: filename` or `Content-Type: name` (RFC 2231 and
    /// RFC 2047 decoded); for a nested message without one, its subject plus `.eml`.
    pub filename: Option<String>,
    /// `type/subtype`, lowercase, without parameters.
    pub content_type: String,
    /// `Content-ID` without angle brackets, for `cid:` references from the HTML body.
    pub content_id: Option<String>,
    /// `Content-Disposition: inline`.
    pub inline: bool,
    /// The part's bytes after base64 / quoted-printable decoding.
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

/// The parsed view of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParsedMail {
    /// `Message-ID` without angle brackets.
    pub message_id: Option<String>,
    /// Decoded subject.
    pub subject: Option<String>,
    /// `From` (all mailboxes; groups flattened).
    pub from: Vec<Address>,
    /// `To` (every `To` field; groups flattened).
    pub to: Vec<Address>,
    /// `Cc` (every `Cc` field; groups flattened).
    pub cc: Vec<Address>,
    /// `Reply-To` (groups flattened).
    pub reply_to: Vec<Address>,
    /// `Date`, converted to UTC; `None` when missing or invalid.
    pub date: Option<DateTime<Utc>>,
    /// `In-Reply-To` ids without angle brackets.
    pub in_reply_to: Vec<String>,
    /// `References` ids without angle brackets, oldest first as written.
    pub references: Vec<String>,
    /// All inline text parts joined; derived from the HTML when there is no text part.
    pub text_body: Option<String>,
    /// All inline `text/html` parts joined, as received; `None` for text-only mail.
    pub html_body: Option<String>,
    /// `html_body` sanitised for display to agents (ammonia: no scripts, no event handlers,
    /// no styles that can exfiltrate; `cid:` links to inline parts kept).
    #[serde(default)]
    pub html_sanitized: Option<String>,
    /// Every part that is not the chosen body, in MIME order.
    pub attachments: Vec<Attachment>,
    /// Set when the bytes could not be parsed as a message; the raw bytes are still stored.
    pub parse_error: Option<String>,
    /// Problems the parser recovered from (undecodable transfer encoding, a multipart without
    /// its closing boundary). The content is still shown; these explain why it may look odd.
    #[serde(default)]
    pub defects: Vec<String>,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("content_id", &self.content_id)
            .field("inline", &self.inline)
            .field("size", &self.bytes.len())
            .finish()
    }
}

/// How many defects are listed; a hostile message could otherwise produce one per part.
const MAX_DEFECTS: usize = 20;

/// Parses `raw`. See the module documentation.
pub fn parse(raw: &[u8]) -> ParsedMail {
    if raw.iter().all(|b| b.is_ascii_whitespace()) {
        return ParsedMail {
            parse_error: Some(format!(
                "the message is empty ({} bytes, no header fields)",
                raw.len()
            )),
            ..ParsedMail::default()
        };
    }
    // mail-parser is written not to panic, but it contains debug assertions and index
    // arithmetic; one hostile message must not take the poller down with it.
    match std::panic::catch_unwind(|| parse_checked(raw)) {
        Ok(parsed) => parsed,
        Err(_) => ParsedMail {
            parse_error: Some(
                "the MIME parser crashed on this message; it is stored unparsed, open the raw \
                 message to read it"
                    .to_owned(),
            ),
            ..ParsedMail::default()
        },
    }
}

/// Sanitises HTML for display: ammonia's allow-list, plus `cid:` URLs so inline images that
/// reference their MIME part still resolve.
pub fn sanitize_html(html: &str) -> String {
    let mut schemes = std::collections::HashSet::new();
    for scheme in ["http", "https", "mailto", "tel", "cid"] {
        schemes.insert(scheme);
    }
    ammonia::Builder::default()
        .url_schemes(schemes)
        .clean(html)
        .to_string()
}

fn parse_checked(raw: &[u8]) -> ParsedMail {
    let transcoded = transcode_8bit_headers(raw);
    let input: &[u8] = transcoded.as_deref().unwrap_or(raw);

    let Some(message) = MessageParser::default().parse(input) else {
        return ParsedMail {
            parse_error: Some(
                "no header section found: the bytes do not start with RFC 5322 header fields \
                 (`Name: value` lines)"
                    .to_owned(),
            ),
            ..ParsedMail::default()
        };
    };

    let mut parsed = ParsedMail {
        message_id: message.message_id().map(clean),
        subject: message.subject().map(clean),
        from: addresses(&message, HeaderName::From),
        to: addresses(&message, HeaderName::To),
        cc: addresses(&message, HeaderName::Cc),
        reply_to: addresses(&message, HeaderName::ReplyTo),
        date: message
            .date()
            .filter(|d| d.is_valid())
            .and_then(|d| DateTime::<Utc>::from_timestamp(d.to_timestamp(), 0)),
        in_reply_to: ids(message.in_reply_to()),
        references: ids(message.references()),
        ..ParsedMail::default()
    };

    let text_parts: HashSet<u32> = message.text_body.iter().copied().collect();
    let html_parts: HashSet<u32> = message.html_body.iter().copied().collect();

    let texts: Vec<String> = (0..message.text_body.len())
        .filter_map(|i| message.body_text(i))
        .map(|t| clean(&t))
        .collect();
    if !texts.is_empty() {
        parsed.text_body = Some(texts.join("\n"));
    }
    // mail-parser lists text parts as HTML bodies too (converted) when there is no HTML;
    // an agent should see only HTML the sender wrote.
    let htmls: Vec<String> = message
        .html_body
        .iter()
        .filter_map(|&id| match message.part(id).map(|p| &p.body) {
            Some(PartType::Html(html)) => Some(clean(html)),
            _ => None,
        })
        .collect();
    if !htmls.is_empty() {
        let html = htmls.join("\n");
        parsed.html_sanitized = Some(sanitize_html(&html));
        parsed.html_body = Some(html);
    }

    for &id in &message.attachments {
        let Some(part) = message.part(id) else {
            continue;
        };
        let is_body = match part.body {
            PartType::Text(_) => text_parts.contains(&id),
            PartType::Html(_) => html_parts.contains(&id),
            _ => false,
        };
        if !is_body {
            parsed.attachments.push(attachment(input, part));
        }
    }

    parsed.defects = defects(input, &message);
    if !starts_with_header_field(input) {
        parsed.parse_error = Some(
            "the message does not start with a header section (the first line is not a \
             `Name: value` field); the fields shown may be guesses"
                .to_owned(),
        );
    }
    parsed
}

/// Removes NUL characters, which PostgreSQL `text` cannot store.
fn clean(s: &str) -> String {
    s.replace('\0', "")
}

fn non_empty(s: Option<&str>) -> Option<String> {
    s.map(|s| clean(s.trim())).filter(|s| !s.is_empty())
}

fn addresses(message: &Message<'_>, name: HeaderName<'static>) -> Vec<Address> {
    message
        .header_values(name)
        .filter_map(|v| v.as_address())
        .flat_map(|a| a.iter())
        .map(|a| Address {
            name: non_empty(a.name()),
            email: non_empty(a.address()),
        })
        .filter(|a| a.name.is_some() || a.email.is_some())
        .collect()
}

fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(id) => non_empty(Some(id)).into_iter().collect(),
        HeaderValue::TextList(list) => list.iter().filter_map(|id| non_empty(Some(id))).collect(),
        _ => Vec::new(),
    }
}

fn content_type(part: &MessagePart<'_>) -> String {
    match part.content_type() {
        Some(ct) => {
            let main = clean(&ct.ctype().to_ascii_lowercase());
            match ct.subtype() {
                Some(sub) => format!("{main}/{}", clean(&sub.to_ascii_lowercase())),
                None if main == "text" => "text/plain".to_owned(),
                None => "application/octet-stream".to_owned(),
            }
        }
        // RFC 2045 §5.2 default; RFC 2046 §5.1.5 default inside multipart/digest.
        None if part.is_message() => "message/rfc822".to_owned(),
        None => "text/plain".to_owned(),
    }
}

fn attachment(input: &[u8], part: &MessagePart<'_>) -> Attachment {
    let content_type = content_type(part);
    let mut filename =
        rfc2231_continued_filename(input, part).or_else(|| non_empty(part.attachment_name()));
    let bytes = match &part.body {
        PartType::Message(nested) => {
            if filename.is_none() {
                filename = nested.subject().and_then(eml_name);
            }
            if part.encoding == Encoding::None {
                // An unencoded nested message is parsed in place: mail-parser hands it the
                // whole outer buffer, so its own bytes are the part's body range.
                slice(input, part.offset_body, part.offset_end)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_else(|| nested.raw_message().to_vec())
            } else {
                nested.raw_message().to_vec()
            }
        }
        // A truncated base64 part (missing boundary) comes back as raw text; an agent is
        // better served by the bytes that did arrive than by base64 in a `.pdf`.
        _ if part.is_encoding_problem => {
            salvage_base64(part).unwrap_or_else(|| part.contents().to_vec())
        }
        // Text attachments are decoded to UTF-8 by mail-parser; a file must keep the bytes
        // its sender wrote, so undo only the transfer encoding.
        PartType::Text(_) | PartType::Html(_) => {
            original_bytes(input, part).unwrap_or_else(|| part.contents().to_vec())
        }
        _ => part.contents().to_vec(),
    };
    Attachment {
        filename,
        content_type,
        content_id: non_empty(
            part.content_id()
                .map(|id| id.trim().trim_start_matches('<').trim_end_matches('>')),
        ),
        inline: part.content_disposition().is_some_and(|d| d.is_inline()),
        bytes,
    }
}

/// RFC 2231 §3-4 file name split into `filename*0*`, `filename*1*` … continuations.
///
/// mail-parser decodes each continuation separately, so a UTF-8 character split across two
/// pieces (some clients split by byte count) turns into U+FFFD. The RFC says to join the
/// percent-decoded bytes first and decode the charset once; this does that from the raw
/// header. Returns `None` when the part has no such continuation.
fn rfc2231_continued_filename(input: &[u8], part: &MessagePart<'_>) -> Option<String> {
    [
        (HeaderName::ContentDisposition, "filename"),
        (HeaderName::ContentType, "name"),
    ]
    .into_iter()
    .find_map(|(header, param)| {
        let header = part.headers.iter().rev().find(|h| h.name == header)?;
        let raw = slice(input, header.offset_start, header.offset_end)?;
        join_continuations(&String::from_utf8_lossy(raw), param)
    })
}

fn join_continuations(value: &str, param: &str) -> Option<String> {
    let unfolded: String = value.chars().filter(|&c| c != '\r' && c != '\n').collect();
    let mut pieces: Vec<(usize, bool, String)> = Vec::new();
    for item in split_params(&unfolded) {
        let Some((key, val)) = item.split_once('=') else {
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let Some(rest) = key.strip_prefix(param).and_then(|r| r.strip_prefix('*')) else {
            continue;
        };
        let (index, encoded) = match rest.strip_suffix('*') {
            Some(index) => (index, true),
            None => (rest, false),
        };
        let Ok(index) = index.parse::<usize>() else {
            continue;
        };
        let val = val.trim();
        let val = val
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(val);
        pieces.push((index, encoded, val.to_owned()));
    }
    if pieces.len() < 2 {
        return None;
    }
    pieces.sort_by_key(|(index, _, _)| *index);
    let mut charset = None;
    let mut bytes = Vec::new();
    for (position, (_, encoded, val)) in pieces.iter().enumerate() {
        let mut val = val.as_str();
        if position == 0 && *encoded {
            // charset'language'value
            let mut fields = val.splitn(3, '\'');
            if let (Some(cs), Some(_), Some(rest)) = (fields.next(), fields.next(), fields.next()) {
                charset = Some(cs.to_owned());
                val = rest;
            }
        }
        if *encoded {
            bytes.extend(percent_decode(val));
        } else {
            bytes.extend_from_slice(val.as_bytes());
        }
    }
    let text = match charset
        .as_deref()
        .and_then(|cs| charset_decoder(cs.as_bytes()))
    {
        Some(decode) => decode(&bytes),
        None => String::from_utf8_lossy(&bytes).into_owned(),
    };
    non_empty(Some(&text))
}

/// Splits `type/sub; a=b; c="d;e"` at semicolons outside quotes.
fn split_params(value: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&value[start..]);
    items
}

fn percent_decode(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| {
            std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        });
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn salvage_base64(part: &MessagePart<'_>) -> Option<Vec<u8>> {
    let declared = part.content_transfer_encoding()?;
    if !declared.trim().eq_ignore_ascii_case("base64") {
        return None;
    }
    let text = part.contents();
    // Drop a trailing incomplete group so the decoder sees only whole 4-character groups.
    let significant: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let whole = significant.len() - significant.len() % 4;
    base64_decode(&significant[..whole])
}

fn slice(input: &[u8], start: u32, end: u32) -> Option<&[u8]> {
    input.get(start as usize..end as usize)
}

fn original_bytes(input: &[u8], part: &MessagePart<'_>) -> Option<Vec<u8>> {
    if part.is_encoding_problem {
        return None;
    }
    let body = slice(input, part.offset_body, part.offset_end)?;
    match part.encoding {
        Encoding::Base64 => base64_decode(body),
        Encoding::QuotedPrintable => quoted_printable_decode(body),
        Encoding::None => Some(body.to_vec()),
    }
}

/// A file name for a nested message from its subject, without path separators or control
/// characters (it ends up as a download name).
fn eml_name(subject: &str) -> Option<String> {
    let stem: String = subject
        .chars()
        .map(|c| match c {
            '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|' => '_',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    let stem = stem.trim();
    (!stem.is_empty()).then(|| format!("{stem}.eml"))
}

fn defects(input: &[u8], message: &Message<'_>) -> Vec<String> {
    let mut found = Vec::new();
    // Closing delimiters of every multipart, checked in one pass over the lines so the cost
    // stays linear however deeply the multiparts nest.
    let mut closings: Vec<(usize, Vec<u8>)> = Vec::new();
    for (index, part) in message.parts.iter().enumerate() {
        if part.is_encoding_problem && index != 0 {
            found.push(format!(
                "part {index} ({}): its content could not be decoded completely (truncated or \
                 invalid transfer encoding)",
                content_type(part)
            ));
        }
        if part.is_multipart()
            && let Some(boundary) = part.content_type().and_then(|ct| ct.attribute("boundary"))
        {
            closings.push((index, format!("--{boundary}--").into_bytes()));
        }
    }
    let wanted: HashSet<&[u8]> = closings.iter().map(|(_, c)| c.as_slice()).collect();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    for line in input.split(|&b| b == b'\n') {
        let line = line.trim_ascii_end();
        if line.starts_with(b"--") && line.ends_with(b"--") && wanted.contains(line) {
            seen.insert(line);
        }
    }
    for (index, closing) in &closings {
        if !seen.contains(closing.as_slice()) {
            found.push(format!(
                "part {index} ({}): the closing boundary is missing, the message may be truncated",
                message
                    .parts
                    .get(*index)
                    .map(content_type)
                    .unwrap_or_default()
            ));
        }
    }
    if found.len() > MAX_DEFECTS {
        let more = found.len() - MAX_DEFECTS;
        found.truncate(MAX_DEFECTS);
        found.push(format!("… and {more} more problems of the same kinds"));
    }
    found
}

/// RFC 5322 §2.2: a header field is a name of printable ASCII except `:` followed by `:`.
fn starts_with_header_field(input: &[u8]) -> bool {
    let start = input
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(input.len());
    let rest = &input[start..];
    let Some(colon) = rest.iter().take(1000).position(|&b| b == b':') else {
        return false;
    };
    colon > 0 && rest[..colon].iter().all(|&b| (33..=126).contains(&b))
}

/// Returns a copy of `raw` whose top-level header lines are UTF-8, when some are not.
///
/// RFC 6532 allows only UTF-8 in headers, but old clients write their local charset raw.
/// The best guess for that charset is the one the same client declared for the body.
fn transcode_8bit_headers(raw: &[u8]) -> Option<Vec<u8>> {
    let end = header_end(raw);
    let head = &raw[..end];
    if std::str::from_utf8(head).is_ok() {
        return None;
    }
    let decode = body_charset(head)
        .and_then(|cs| charset_decoder(cs.as_bytes()))
        .or_else(|| charset_decoder(b"windows-1252"))?;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 8);
    for line in head.split_inclusive(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(_) => out.extend_from_slice(line),
            Err(_) => out.extend_from_slice(decode(line).as_bytes()),
        }
    }
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

/// Offset just past the blank line that ends the header section (or the whole input).
fn header_end(raw: &[u8]) -> usize {
    let mut pos = 0;
    for line in raw.split_inclusive(|&b| b == b'\n') {
        pos += line.len();
        if line == b"\n" || line == b"\r\n" {
            return pos;
        }
    }
    raw.len()
}

/// The `charset` parameter of the top-level Content-Type, if declared and not UTF-8/ASCII.
fn body_charset(head: &[u8]) -> Option<String> {
    let headers = MessageParser::default().parse_headers(head)?;
    let charset = headers.content_type()?.attribute("charset")?;
    let lower = charset.to_ascii_lowercase();
    (!matches!(lower.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii")).then_some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::{Path, PathBuf};

    /// What a golden `.json` holds: the `ParsedMail` with each attachment's bytes replaced by
    /// their size and SHA-256, so the files stay readable while the bytes are still checked.
    #[derive(serde::Serialize)]
    struct GoldenAttachment<'a> {
        filename: &'a Option<String>,
        content_type: &'a str,
        content_id: &'a Option<String>,
        inline: bool,
        size: usize,
        sha256: String,
    }

    fn golden_json(parsed: &ParsedMail) -> String {
        let mut value = serde_json::to_value(parsed).unwrap_or_default();
        let attachments: Vec<GoldenAttachment<'_>> = parsed
            .attachments
            .iter()
            .map(|a| GoldenAttachment {
                filename: &a.filename,
                content_type: &a.content_type,
                content_id: &a.content_id,
                inline: a.inline,
                size: a.bytes.len(),
                sha256: hex::encode(Sha256::digest(&a.bytes)),
            })
            .collect();
        value["attachments"] = serde_json::to_value(attachments).unwrap_or_default();
        let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
        text.push('\n');
        text
    }

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mail")
    }

    fn fixture(name: &str) -> ParsedMail {
        let raw = std::fs::read(fixtures_dir().join(format!("{name}.eml"))).unwrap();
        parse(&raw)
    }

    #[test]
    fn golden_fixtures_match() {
        let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
        let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        assert!(
            names.len() >= 15,
            "expected at least 15 fixtures, found {}",
            names.len()
        );
        let mut mismatches = Vec::new();
        for eml in &names {
            let raw = std::fs::read(eml).unwrap();
            let actual = golden_json(&parse(&raw));
            let json = eml.with_extension("json");
            if update {
                std::fs::write(&json, &actual).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&json).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run with UPDATE_GOLDEN=1 to create it",
                    json.display()
                )
            });
            if expected != actual {
                mismatches.push(format!(
                    "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
                    eml.display()
                ));
            }
        }
        assert!(
            mismatches.is_empty(),
            "golden mismatch (UPDATE_GOLDEN=1 rewrites after review):\n{}",
            mismatches.join("\n")
        );
    }

    #[test]
    fn empty_and_headerless_input_report_a_parse_error() {
        for raw in [&b""[..], b"\r\n\r\n", b"   "] {
            let parsed = parse(raw);
            assert!(parsed.parse_error.unwrap().contains("empty"));
        }
        let parsed = fixture("garbage_no_headers");
        assert!(parsed.parse_error.is_some());
        let parsed = fixture("text_without_headers");
        assert!(parsed.parse_error.is_some());
        assert_eq!(parsed.subject, None);
    }

    #[test]
    fn legacy_charsets_decode_to_unicode() {
        let jp = fixture("subject_iso2022jp");
        assert_eq!(
            jp.subject.as_deref(),
            Some("お問い合わせ：注文番号 8841 の配送について")
        );
        assert_eq!(jp.from[0].name.as_deref(), Some("山田 太郎"));
        assert!(jp.text_body.unwrap().contains("配送状況"));

        let latin = fixture("latin1_8bit_headers");
        assert_eq!(
            latin.subject.as_deref(),
            Some("Reclamación: pedido nº 5521 está dañado")
        );
        assert_eq!(latin.from[0].name.as_deref(), Some("José Müller"));
        assert!(latin.text_body.unwrap().contains("¿Pueden"));

        let koi = fixture("legacy_charsets_koi8r_cp1252");
        assert_eq!(koi.subject.as_deref(), Some("Жалоба на доставку"));
        assert!(koi.text_body.unwrap().contains("повреждённой"));
        assert!(
            koi.html_body
                .unwrap()
                .contains("“Quoted” text costs 10€ – thanks")
        );
    }

    #[test]
    fn nul_bytes_never_reach_text_fields() {
        let parsed = fixture("nul_and_invalid_utf8_headers");
        let json = serde_json::to_string(&parsed).unwrap();
        assert!(!json.contains("\\u0000"), "{json}");
        assert!(parsed.subject.unwrap().starts_with("NUL in subject"));
    }

    #[test]
    fn rfc2231_and_encoded_word_filenames_decode() {
        let parsed = fixture("rfc2231_filename_continuation");
        let names: Vec<_> = parsed
            .attachments
            .iter()
            .map(|a| a.filename.clone())
            .collect();
        assert_eq!(
            names,
            [
                Some("Übersicht Größen 2024.xlsx".to_owned()),
                Some("Rechnung N° 4711.pdf".to_owned())
            ]
        );
        assert!(parsed.attachments[1].bytes.starts_with(b"%PDF-1.7\n"));
        assert!(parsed.attachments[1].bytes.ends_with(b"%%EOF\n"));
    }

    #[test]
    fn rfc2231_continuation_split_inside_a_utf8_character_is_joined_first() {
        let raw = b"From: a@example.com\r\nSubject: split\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"s\"\r\n\r\n--s\r\n\
Content-Type: text/plain\r\n\r\nsee file\r\n--s\r\n\
Content-Type: application/pdf\r\n\
Content-Disposition: attachment;\r\n\tfilename*0*=utf-8''%D0%A1%D1%87%D1%91%D1%82-%D1%84%D0%B0%D0;\r\n\tfilename*1*=%BA%D1%82%D1%83%D1%80%D0%B0.pdf\r\n\r\n%PDF\r\n--s--\r\n";
        let parsed = parse(raw);
        assert_eq!(
            parsed.attachments[0].filename.as_deref(),
            Some("Счёт-фактура.pdf")
        );
        assert_eq!(
            join_continuations("attachment; filename=\"a;b.txt\"", "filename"),
            None
        );
        assert_eq!(
            join_continuations("x; name*0=\"plain \"; name*1=\"name.txt\"", "name").as_deref(),
            Some("plain name.txt")
        );
    }

    #[test]
    fn forwarded_message_is_one_attachment_with_its_raw_bytes() {
        let raw = std::fs::read(fixtures_dir().join("forwarded_rfc822.eml")).unwrap();
        let parsed = parse(&raw);
        assert_eq!(parsed.attachments.len(), 1);
        let fwd = &parsed.attachments[0];
        assert_eq!(fwd.content_type, "message/rfc822");
        assert_eq!(
            fwd.filename.as_deref(),
            Some("Beschwerde_ unfreundliche Beratung.eml")
        );
        assert!(
            fwd.bytes
                .starts_with(b"From: Kunde <kunde@example.net>\r\n")
        );
        assert!(fwd.bytes.ends_with(b"--inner-orig--\r\n"));
        let nested = parse(&fwd.bytes);
        assert_eq!(nested.message_id.as_deref(), Some("orig-0001@example.net"));
        assert_eq!(
            nested.attachments[0].filename.as_deref(),
            Some("kassenbon.pdf")
        );

        let wrapped = fixture("base64_encoded_rfc822");
        assert_eq!(
            wrapped.attachments[0].filename.as_deref(),
            Some("original.eml")
        );
        assert_eq!(
            parse(&wrapped.attachments[0].bytes).subject.as_deref(),
            Some("Inner base64 message")
        );
    }

    #[test]
    fn inline_image_keeps_content_id_and_body_choice() {
        let parsed = fixture("outlook_related_inline_image");
        assert!(parsed.text_body.unwrap().contains("beschädigten"));
        assert!(
            parsed
                .html_body
                .unwrap()
                .contains("cid:image001.png@01DAFDE2.6C5B1E30")
        );
        assert_eq!(parsed.attachments.len(), 1);
        let image = &parsed.attachments[0];
        assert_eq!(image.content_type, "image/png");
        assert_eq!(
            image.content_id.as_deref(),
            Some("image001.png@01DAFDE2.6C5B1E30")
        );
        assert!(image.inline);
        assert!(image.bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
    }

    #[test]
    fn truncated_base64_attachment_keeps_the_bytes_that_arrived() {
        let parsed = fixture("broken_mime_missing_end");
        assert_eq!(parsed.parse_error, None);
        assert_eq!(parsed.defects.len(), 2, "{:?}", parsed.defects);
        let pdf = &parsed.attachments[0];
        assert_eq!(pdf.bytes.len(), 183);
        assert!(pdf.bytes.starts_with(b"%PDF-1.7\n"));
    }

    #[test]
    fn text_attachment_keeps_its_original_bytes() {
        let parsed = fixture("text_attachment_latin1_bytes");
        let csv = &parsed.attachments[0];
        assert_eq!(csv.content_type, "text/csv");
        assert_eq!(
            csv.bytes,
            b"name;city\r\nM\xfcller;K\xf6ln\r\nDupr\xe9;Besan\xe7on\r\n"
        );
    }

    #[test]
    fn html_only_gets_derived_text_and_text_only_has_no_html() {
        let html = fixture("html_only_newsletter");
        assert!(html.html_body.is_some());
        let text = html.text_body.unwrap();
        assert!(text.contains("Rabatt auf alle Jacken"), "{text}");
        assert!(!text.contains("<b>"));

        let plain = fixture("plain_text_only");
        assert_eq!(plain.html_body, None);
        assert!(plain.text_body.unwrap().contains("40 licences"));
    }

    #[test]
    fn huge_header_section_still_returns() {
        let mut raw = Vec::new();
        for i in 0..100_000 {
            raw.extend_from_slice(format!("X-Trace-{i}: hop {i}\r\n").as_bytes());
        }
        raw.extend_from_slice(b"Subject: many headers\r\n\r\nbody\r\n");
        let parsed = parse(&raw);
        assert_eq!(parsed.subject.as_deref(), Some("many headers"));
        assert_eq!(parsed.parse_error, None);
    }

    #[test]
    fn ten_thousand_parts_still_return() {
        let mut raw = b"Subject: many parts\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"p\"\r\n\r\n"
            .to_vec();
        for i in 0..10_000 {
            raw.extend_from_slice(
                format!(
                    "--p\r\nContent-Type: application/octet-stream; name=\"f{i}.bin\"\r\n\
Content-Disposition: attachment; filename=\"f{i}.bin\"\r\n\r\npart {i}\r\n"
                )
                .as_bytes(),
            );
        }
        raw.extend_from_slice(b"--p--\r\n");
        let parsed = parse(&raw);
        assert_eq!(parsed.attachments.len(), 10_000);
        assert_eq!(parsed.attachments[9_999].bytes, b"part 9999");
    }

    #[test]
    fn deeply_nested_multiparts_still_return() {
        let depth = 5_000;
        let mut raw = b"Subject: nested\r\nMIME-Version: 1.0\r\n".to_vec();
        for i in 0..depth {
            raw.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        raw.extend_from_slice(b"Content-Type: text/plain\r\n\r\ndeep\r\n");
        let parsed = parse(&raw);
        assert_eq!(parsed.subject.as_deref(), Some("nested"));
        // Unclosed nesting is recovered as best it can be: the innermost text survives,
        // as body or as a part, and the missing boundaries are reported.
        let in_body = parsed.text_body.unwrap_or_default().contains("deep");
        let in_part = parsed
            .attachments
            .iter()
            .any(|a| a.bytes.windows(4).any(|w| w == b"deep"));
        assert!(in_body || in_part);
        assert!(!parsed.defects.is_empty());
    }

    #[test]
    fn html_is_kept_as_received_and_sanitised_for_display() {
        let raw = b"From: a@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n\
Content-Type: text/html; charset=utf-8\r\n\r\n\
<p onclick=\"steal()\">Hi<script>alert(1)</script><img src=\"cid:logo\"> \
<a href=\"javascript:evil()\">x</a></p>\r\n";
        let parsed = parse(raw);
        let html = parsed.html_body.unwrap();
        assert!(html.contains("<script>") && html.contains("onclick"));
        let safe = parsed.html_sanitized.unwrap();
        assert!(
            !safe.contains("script") && !safe.contains("onclick"),
            "{safe}"
        );
        assert!(!safe.contains("javascript:"), "{safe}");
        assert!(safe.contains("cid:logo"), "{safe}");
    }
}
