//! The parsed view of one message: what the parser builds and the store keeps.
//!
//! Plain data, no I/O. Invariant: text in these values holds no NUL character (PostgreSQL
//! `text` rejects U+0000); the parser builds every string through [`crate::model::text`]'s
//! one rule, and the store applies the same rule to values built by hand.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::work_item::Flag;

const MIB: usize = 1024 * 1024;

/// Only a prefix of the message was parsed: it has more parts, deeper nesting of messages,
/// or larger header fields than [`ParseLimits`] allow. Fields, bodies and attachments come
/// from the part of the message before that point; `defects` says which limit. The raw
/// message holds everything.
pub const FLAG_MIME_TRUNCATED: Flag = Flag::MimeTruncated;
/// The MIME structure is nested more than `ingest::parse::SUSPICIOUS_DEPTH` levels deep (multiparts and
/// nested messages together). No mail client writes that; expect a crafted message.
pub const FLAG_MIME_TOO_DEEP: Flag = Flag::MimeTooDeep;
/// The HTML body is too large or too deeply nested to sanitise affordably: `html_body` is
/// kept as received, `html_sanitized` is `None`, agents see `text_body`.
pub const FLAG_HTML_NOT_SANITIZED: Flag = Flag::HtmlNotSanitized;
/// Parsing did not finish within its time budget ([`ParseLimits::time_budget`]): only the
/// header section was parsed; `parse_error` says so.
pub const FLAG_PARSE_TIMEOUT: Flag = Flag::ParseTimeout;
/// The full parse did not run or did not deliver (too many earlier parses still running
/// past their budget, no thread could be started): only the header section was parsed;
/// `parse_error` says why.
pub const FLAG_PARSE_SKIPPED: Flag = Flag::ParseSkipped;
/// Every flag [`ParsedMail::flags`] can hold.
pub const FLAGS: [Flag; 5] = [
    FLAG_MIME_TRUNCATED,
    FLAG_MIME_TOO_DEEP,
    FLAG_HTML_NOT_SANITIZED,
    FLAG_PARSE_TIMEOUT,
    FLAG_PARSE_SKIPPED,
];

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
    /// RFC 2047 decoded); for a nested message without one, its subject plus `.eml`. Made
    /// safe as a download name; `None` when nothing usable is left.
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
    /// Where `bytes` lie base64-encoded in the raw message (`start..end`, octets), when
    /// decoding exactly that range gives exactly `bytes` (checked by the parser): the store
    /// then keeps the range instead of a second copy.
    #[serde(skip)]
    pub raw_range: Option<(u32, u32)>,
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
    /// no styles, no remote or relative images; `cid:` images kept). `None` when there is
    /// no HTML, or it was not sanitised ([`FLAG_HTML_NOT_SANITIZED`]).
    #[serde(default)]
    pub html_sanitized: Option<String>,
    /// Every part that is not the chosen body, in MIME order.
    pub attachments: Vec<Attachment>,
    /// Set when the bytes could not be parsed as a message; the raw bytes are still stored.
    pub parse_error: Option<String>,
    /// Problems the parser recovered from (undecodable transfer encoding, a multipart without
    /// its closing boundary, a limit that stopped parsing). The content is still shown;
    /// these explain why it may look odd.
    #[serde(default)]
    pub defects: Vec<String>,
    /// Work-item flags from [`FLAGS`], each at most once, for the store to copy.
    #[serde(default, skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<Flag>,
    /// Deepest MIME nesting: 1 for a single-part message, one more per multipart or nested
    /// message level (counted up to where parsing stopped); 0 when nothing was parsed.
    #[serde(default)]
    pub mime_depth: usize,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("filename", &self.filename)
            .field("content_type", &self.content_type)
            .field("content_id", &self.content_id)
            .field("inline", &self.inline)
            .field("size", &self.bytes.len())
            .field("raw_range", &self.raw_range)
            .finish()
    }
}

impl ParsedMail {
    /// Bytes this value holds on the heap (strings, vectors, attachment bytes), for memory
    /// accounting: a batch that counts raw bytes only underestimates a parsed message by
    /// its decoded copies.
    pub fn heap_bytes(&self) -> usize {
        fn text(s: &Option<String>) -> usize {
            s.as_ref().map_or(0, String::capacity)
        }
        fn addresses(list: &Vec<Address>) -> usize {
            list.capacity() * std::mem::size_of::<Address>()
                + list
                    .iter()
                    .map(|a| text(&a.name) + text(&a.email))
                    .sum::<usize>()
        }
        fn strings(list: &Vec<String>) -> usize {
            list.capacity() * std::mem::size_of::<String>()
                + list.iter().map(String::capacity).sum::<usize>()
        }
        let attachments = self.attachments.capacity() * std::mem::size_of::<Attachment>()
            + self
                .attachments
                .iter()
                .map(|a| {
                    text(&a.filename)
                        + a.content_type.capacity()
                        + text(&a.content_id)
                        + a.bytes.capacity()
                })
                .sum::<usize>();
        text(&self.message_id)
            + text(&self.subject)
            + addresses(&self.from)
            + addresses(&self.to)
            + addresses(&self.cc)
            + addresses(&self.reply_to)
            + strings(&self.in_reply_to)
            + strings(&self.references)
            + text(&self.text_body)
            + text(&self.html_body)
            + text(&self.html_sanitized)
            + attachments
            + text(&self.parse_error)
            + strings(&self.defects)
            + self.flags.capacity() * std::mem::size_of::<Flag>()
    }

    /// Adds `flag` unless it is already set.
    pub(crate) fn flag(&mut self, flag: Flag) {
        if !self.flags.contains(&flag) {
            self.flags.push(flag);
        }
    }
}

/// What a parse may cost. The defaults keep a message of the 50 MiB default size limit
/// within the memory bound stated in RELIABILITY.md while every real message parses whole:
/// see each field for what happens past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLimits {
    /// MIME parts (every part, nested messages' parts included). Past it, parsing stops at
    /// the first part over the limit ([`FLAG_MIME_TRUNCATED`]).
    pub max_parts: usize,
    /// Nesting of messages (`message/rfc822` in `message/rfc822` …, the message itself is
    /// 1). Past it, the deeper levels are not parsed ([`FLAG_MIME_TRUNCATED`]). It also
    /// bounds the recursion inside `mail-parser` for encoded nested messages.
    pub max_message_depth: usize,
    /// Estimated bytes of `mail-parser`'s bookkeeping (parts, header fields, their tokens and
    /// addresses, copies of decoded nested messages). Past it, parsing stops before the
    /// part or header field that would pass it ([`FLAG_MIME_TRUNCATED`]).
    pub max_structure_bytes: usize,
    /// HTML larger than this is not sanitised ([`FLAG_HTML_NOT_SANITIZED`]).
    pub max_sanitize_bytes: usize,
    /// HTML with more elements than this is not sanitised.
    pub max_sanitize_elements: usize,
    /// HTML nested deeper than this is not sanitised.
    pub max_sanitize_depth: usize,
    /// Stack of the thread `parse_bounded` parses on.
    pub stack_bytes: usize,
    /// Time a parse may take, whatever the size ([`ParseLimits::time_budget`]).
    pub time_base: Duration,
    /// Time a parse may take per MiB of input, on top of `time_base`.
    pub time_per_mib: Duration,
    /// Parses still running past their budget at the same time; while this many are,
    /// `parse_bounded` parses only the header section ([`FLAG_PARSE_SKIPPED`]).
    pub max_abandoned: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_parts: super::defaults::PARSE_MAX_PARTS,
            max_message_depth: 128,
            max_structure_bytes: 64 * MIB,
            max_sanitize_bytes: 4 * MIB,
            max_sanitize_elements: 250_000,
            max_sanitize_depth: 512,
            stack_bytes: 16 * MIB,
            time_base: super::defaults::PARSE_TIME_BASE,
            time_per_mib: super::defaults::PARSE_TIME_PER_MIB,
            max_abandoned: super::defaults::PARSE_MAX_ABANDONED,
        }
    }
}

impl ParseLimits {
    /// How long `parse_bounded` waits for a message of `len` bytes:
    /// `time_base + time_per_mib × len / MiB`.
    pub fn time_budget(&self, len: usize) -> Duration {
        let per_byte = self.time_per_mib.as_secs_f64() / MIB as f64;
        self.time_base + Duration::from_secs_f64(per_byte * len as f64)
    }
}
