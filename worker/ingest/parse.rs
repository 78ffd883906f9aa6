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
//! * **Header sections are repaired first** (`sections.rs`) where `mail-parser` reads them
//!   differently from the RFCs and loses text: a header section ends at its first line that
//!   is not a header field (RFC 5322), blank line or not; adjacent encoded words of one
//!   charset are joined before decoding (RFC 2047 §6.2), so a character split across two
//!   survives; a Content-Type without a complete `type/subtype` (`text`) is read as
//!   `text/plain` with its parameters (RFC 2045 §5.2). Repairs that change the structure
//!   are listed in `defects`.
//! * **Legacy 8-bit headers are decoded.** In header lines that are not valid UTF-8, the
//!   valid UTF-8 sequences stay UTF-8 and the other bytes are decoded with the charset of
//!   the top-level `Content-Type` (what the sending client used), or windows-1252 when none
//!   is declared, instead of becoming U+FFFD (`decode_mixed`).
//! * **Bodies**: `text_body` joins every inline text part (HTML-only mail gets text derived
//!   from the HTML); `html_body` is `None` unless the message has a real `text/html` part.
//!   A `text/plain` part with a file name (`filename=` or `name=`, inline or not) is a file:
//!   it is an attachment with that name and not part of `text_body`, unless the message has
//!   no other body text (e.g. the whole message is that part), when it is both.
//! * **Attachments** are every non-body part, in MIME order, with transfer-decoded bytes
//!   (text attachments keep their original charset bytes). A nested `message/rfc822` is one
//!   attachment holding the nested message's raw bytes. File names are made safe to offer
//!   as download names (no directories, control or bidirectional characters, device names,
//!   at most 255 bytes).
//!
//! **Hostile input is bounded** ([`ParseLimits`]): before `mail-parser` allocates anything,
//! a census walks the message with `mail-parser`'s own tokenizer and counts the parts, the
//! nesting of messages and the memory its header fields will need (`census.rs`). Past a
//! limit only the prefix of the message up to the first part (or header field) over it is
//! parsed: the agent sees the body and the first attachments, the work item is flagged
//! [`FLAG_MIME_TRUNCATED`], the raw message is stored whole by the caller. The parsed tree is
//! taken apart without recursion (`Tree`), HTML is sanitised only when its size and
//! nesting keep ammonia's cost small (`html.rs`; otherwise the text body stands alone,
//! [`FLAG_HTML_NOT_SANITIZED`]), and [`parse_bounded`] runs all of it on a thread with a
//! known stack and a deadline.
//!
//! Memory: a parse of `n` raw bytes peaks at about `k·n + C` (measured figures in
//! RELIABILITY.md): the input and its decoded bodies and attachments are a few copies of
//! `n`; the parser's bookkeeping is at most [`ParseLimits::max_structure_bytes`] and the
//! sanitiser's document tree is bounded by [`ParseLimits::max_sanitize_elements`].
//!
//! Golden tests: every `tests/fixtures/mail/NAME.eml` is parsed and compared with
//! `NAME.json`. After an intended change run `UPDATE_GOLDEN=1 cargo test --lib golden` to
//! rewrite the `.json` files, then review the diff before committing it.

mod census;
mod filename;
mod html;
mod sections;

pub use filename::safe_filename;

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use mail_parser::decoders::charsets::map::charset_decoder;
use mail_parser::decoders::{base64::base64_decode, quoted_printable::quoted_printable_decode};
use mail_parser::{
    Encoding, HeaderName, HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType,
};

pub use crate::model::mail::{
    Address, Attachment, FLAG_HTML_NOT_SANITIZED, FLAG_MIME_TOO_DEEP, FLAG_MIME_TRUNCATED,
    FLAG_PARSE_SKIPPED, FLAG_PARSE_TIMEOUT, FLAGS, ParseLimits, ParsedMail,
};

use self::census::{Census, CutReason};
use crate::model::{Flag, text};

/// Nesting beyond which a message is flagged [`FLAG_MIME_TOO_DEEP`]. Real mail stays far
/// below it (a forward of a forward of a reply is about 6 levels).
pub const SUSPICIOUS_DEPTH: usize = 100;

/// The census's caps from the parse limits.
fn caps(limits: &ParseLimits) -> census::Caps {
    census::Caps {
        parts: limits.max_parts,
        message_depth: limits.max_message_depth,
        structure_bytes: limits.max_structure_bytes,
    }
}

impl From<&crate::config::ParseConfig> for ParseLimits {
    /// The `[parse]` bounds; the rest keep their defaults.
    fn from(parse: &crate::config::ParseConfig) -> ParseLimits {
        ParseLimits {
            max_parts: parse.max_parts,
            time_base: parse.time_base_secs,
            time_per_mib: parse.time_per_mib_ms,
            max_abandoned: parse.max_abandoned,
            ..ParseLimits::default()
        }
    }
}

/// How many defects are listed; a hostile message could otherwise produce one per part.
const MAX_DEFECTS: usize = 20;

/// Header section bytes parsed by [`parse_header_section`]: far above any real header
/// section, small enough to parse in milliseconds on any thread.
const HEADER_SECTION_LIMIT: usize = 256 * 1024;

/// Parses `raw` with the default [`ParseLimits`] on the calling thread. See the module
/// documentation. Recursion is bounded by the limits, so a 2 MiB stack is enough; prefer
/// [`parse_bounded`] for mail from outside, which also bounds the time.
pub fn parse(raw: &[u8]) -> ParsedMail {
    parse_with_limits(raw, &ParseLimits::default())
}

/// [`parse`] with explicit limits.
pub fn parse_with_limits(raw: &[u8], limits: &ParseLimits) -> ParsedMail {
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
    match std::panic::catch_unwind(|| parse_checked(raw, limits)) {
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

/// Parses only the header section of `raw` (at most its first 256 KiB): the fields, no body
/// and no attachments. Cheap and bounded on any thread; used when the whole message is not
/// available (`TOP n 0`) or cannot be parsed in time.
pub fn parse_header_section(raw: &[u8]) -> ParsedMail {
    let whole = header_end(raw);
    let mut end = whole.min(HEADER_SECTION_LIMIT);
    if end < whole {
        // Whole lines only: a field cut in half would be parsed as a different value.
        end = raw[..end]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(end, |lf| lf + 1);
    }
    let mut section = raw[..end].to_vec();
    if !section.ends_with(b"\n\n") && !section.ends_with(b"\r\n\r\n") {
        // A header section without its blank line: end it, so nothing after it is a body.
        section.extend_from_slice(b"\r\n\r\n");
    }
    let mut parsed = parse(&section);
    // Whatever the parser made of the missing body is not the message's content.
    parsed.attachments.clear();
    parsed.text_body = None;
    parsed.html_body = None;
    parsed.html_sanitized = None;
    parsed.flags.retain(|f| *f != FLAG_HTML_NOT_SANITIZED);
    if end < whole {
        parsed.defects.insert(
            0,
            format!("the header section is {whole} bytes; only its first {end} bytes were parsed"),
        );
    }
    parsed
}

/// Parses already stored mail from outside: on a thread of its own with
/// [`ParseLimits::stack_bytes`] of stack, waiting at most [`ParseLimits::time_budget`].
///
/// Past the budget the caller gets the header section ([`parse_header_section`]) with
/// `parse_error` set and [`FLAG_PARSE_TIMEOUT`]; the thread is left to finish on its own
/// (the limits bound its work) and is counted until it does ([`abandoned_parses`]). While
/// [`ParseLimits::max_abandoned`] such threads run, or when no thread can be started, the
/// header section is all that is parsed ([`FLAG_PARSE_SKIPPED`]). Dropping the returned
/// future before it completes also leaves the thread to finish on its own.
pub async fn parse_bounded(raw: bytes::Bytes, limits: &ParseLimits) -> ParsedMail {
    let budget = limits.time_budget(raw.len());
    let running = ABANDONED.load(Ordering::Acquire);
    if running >= limits.max_abandoned {
        return header_fallback(
            &raw,
            FLAG_PARSE_SKIPPED,
            format!(
                "the message was not parsed: {running} earlier messages are still being \
                 parsed past their time budget; only the header section is shown, the raw \
                 message is stored whole"
            ),
        );
    }
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let job = Arc::new(AtomicU8::new(JOB_RUNNING));
    let watch = Watch(Arc::clone(&job));
    let input = raw.clone();
    let thread_limits = limits.clone();
    let spawned = std::thread::Builder::new()
        .name("ccmail-parse".to_owned())
        .stack_size(limits.stack_bytes)
        .spawn(move || {
            let finish = Finish(job);
            let parsed = parse_with_limits(&input, &thread_limits);
            drop(finish);
            // The receiver is gone when the caller gave up; the result is then unused.
            let _ = tx.send(parsed);
        });
    if let Err(e) = spawned {
        watch.disarm();
        return header_fallback(
            &raw,
            FLAG_PARSE_SKIPPED,
            format!(
                "the message was not parsed: no parse thread could be started ({e}); only \
                 the header section is shown, the raw message is stored whole"
            ),
        );
    }
    let outcome = tokio::time::timeout(budget, &mut rx).await;
    let parsed = match outcome {
        Ok(Ok(parsed)) => Some(parsed),
        // The thread finished just as the budget ran out.
        Err(_) => rx.try_recv().ok(),
        Ok(Err(_)) => {
            watch.disarm();
            return header_fallback(
                &raw,
                FLAG_PARSE_SKIPPED,
                "the message was not parsed: the parse thread ended without a result; only \
                 the header section is shown, the raw message is stored whole"
                    .to_owned(),
            );
        }
    };
    match parsed {
        Some(parsed) => {
            watch.disarm();
            parsed
        }
        None => {
            // `watch` counts the thread as abandoned when dropped here.
            drop(watch);
            header_fallback(
                &raw,
                FLAG_PARSE_TIMEOUT,
                format!(
                    "parsing did not finish within {:.1} s (the budget for {} bytes); only the \
                     header section is shown, the raw message is stored whole",
                    budget.as_secs_f64(),
                    raw.len()
                ),
            )
        }
    }
}

/// What [`parse`] would make of a message's MIME structure, counted without building it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MimeCensus {
    /// Parts `mail-parser` creates for the parsed prefix (every part, nested included).
    pub parts: usize,
    /// Deepest nesting of messages in the parsed prefix (the message itself is 1).
    pub message_depth: usize,
    /// Deepest MIME nesting in the parsed prefix ([`ParsedMail::mime_depth`]).
    pub depth: usize,
    /// Where parsing stops when a limit is passed: only `raw[..cut]` is parsed.
    pub cut: Option<usize>,
}

/// Counts `raw`'s MIME structure against `limits` the way [`parse_with_limits`] does before
/// it parses (without its header-section repairs and 8-bit header transcoding), for
/// diagnostics and the fuzzer.
pub fn mime_census(raw: &[u8], limits: &ParseLimits) -> MimeCensus {
    let census = census::census(raw, caps(limits));
    MimeCensus {
        parts: census.parts,
        message_depth: census.message_depth,
        depth: census.depth,
        cut: census.cut.map(|c| c.offset),
    }
}

/// Parse threads still running after their caller stopped waiting (see [`parse_bounded`]).
pub fn abandoned_parses() -> usize {
    ABANDONED.load(Ordering::Acquire)
}

static ABANDONED: AtomicUsize = AtomicUsize::new(0);
const JOB_RUNNING: u8 = 0;
const JOB_DONE: u8 = 1;
const JOB_ABANDONED: u8 = 2;

/// Held by the waiting side of [`parse_bounded`]: dropped while the job still runs, it
/// counts the job as abandoned.
struct Watch(Arc<AtomicU8>);

impl Watch {
    /// The job finished or never started: nothing to count.
    fn disarm(self) {
        self.0.store(JOB_DONE, Ordering::Release);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.0.load(Ordering::Acquire) != JOB_RUNNING {
            return;
        }
        // Count first, so the thread's decrement can never run before this increment.
        ABANDONED.fetch_add(1, Ordering::AcqRel);
        if self
            .0
            .compare_exchange(
                JOB_RUNNING,
                JOB_ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            ABANDONED.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Held by the parse thread, also while unwinding: marks the job done and, if its caller
/// had given up, stops counting it.
struct Finish(Arc<AtomicU8>);

impl Drop for Finish {
    fn drop(&mut self) {
        if self.0.swap(JOB_DONE, Ordering::AcqRel) == JOB_ABANDONED {
            ABANDONED.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn header_fallback(raw: &[u8], flag: Flag, why: String) -> ParsedMail {
    let mut parsed = parse_header_section(raw);
    parsed.parse_error = Some(why);
    parsed.flag(flag);
    parsed
}

/// Sanitises HTML for display (see [`ParsedMail::html_sanitized`] for the policy). Unbounded:
/// [`parse`] calls it only for HTML within [`ParseLimits`].
pub fn sanitize_html(html: &str) -> String {
    html::policy().clean(html).to_string()
}

/// Owns `mail-parser`'s tree and takes it apart without recursion: nested messages are
/// moved onto a heap stack before their parent is dropped, so no nesting depth can exhaust
/// the stack, also while unwinding from a panic.
struct Tree<'x>(Option<Message<'x>>);

impl Drop for Tree<'_> {
    fn drop(&mut self) {
        let mut pending: Vec<Message<'_>> = self.0.take().into_iter().collect();
        while let Some(mut message) = pending.pop() {
            for part in &mut message.parts {
                if let PartType::Message(nested) = std::mem::take(&mut part.body) {
                    pending.push(nested);
                }
            }
        }
    }
}

fn parse_checked(raw: &[u8], limits: &ParseLimits) -> ParsedMail {
    let repaired = sections::repair(raw);
    let transcoded = transcode_8bit_headers(&repaired.bytes);
    let whole: &[u8] = transcoded.as_deref().unwrap_or(&repaired.bytes);
    let census = census::census(whole, caps(limits));
    let input = match census.cut {
        Some(cut) => &whole[..cut.offset.min(whole.len())],
        None => whole,
    };

    let mut tree = Tree(MessageParser::default().parse(input));
    let Some(message) = tree.0.as_mut() else {
        let mut parsed = ParsedMail {
            parse_error: Some(if census.cut.is_some() {
                format!(
                    "the header section alone exceeds the parser's limits ({}); the message \
                     is stored unparsed, open the raw message to read it",
                    truncation_reason(&census, limits, whole.len())
                )
            } else {
                "no header section found: the bytes do not start with RFC 5322 header fields \
                 (`Name: value` lines)"
                    .to_owned()
            }),
            ..ParsedMail::default()
        };
        if census.cut.is_some() {
            parsed.flag(FLAG_MIME_TRUNCATED);
        }
        return parsed;
    };

    let mut parsed = ParsedMail {
        message_id: message.message_id().map(clean),
        subject: message.subject().map(clean),
        from: addresses(message, HeaderName::From),
        to: addresses(message, HeaderName::To),
        cc: addresses(message, HeaderName::Cc),
        reply_to: addresses(message, HeaderName::ReplyTo),
        date: message
            .date()
            .filter(|d| d.is_valid())
            .and_then(|d| DateTime::<Utc>::from_timestamp(d.to_timestamp(), 0)),
        in_reply_to: ids(message.in_reply_to()),
        references: ids(message.references()),
        mime_depth: census.depth,
        ..ParsedMail::default()
    };
    let mut notes = repaired.notes;
    if census.cut.is_some() {
        parsed.flag(FLAG_MIME_TRUNCATED);
        notes.push(truncation_reason(&census, limits, whole.len()));
    }
    if census.deepest > SUSPICIOUS_DEPTH {
        parsed.flag(FLAG_MIME_TOO_DEEP);
        notes.push(format!(
            "the MIME structure is nested {}{} levels deep (more than {SUSPICIOUS_DEPTH}); no \
             mail client writes that",
            if census.cut.is_some() {
                "at least "
            } else {
                ""
            },
            census.deepest
        ));
    }

    // Decided before any body is moved out of the tree (a moved-out body reads as a
    // multipart).
    let found = defects(input, message, census.cut.is_none());
    let text_parts: HashSet<u32> = message.text_body.iter().copied().collect();
    let html_parts: HashSet<u32> = message.html_body.iter().copied().collect();
    // A text part the sender gave a file name is a file, also when mail-parser took it as
    // body text (inline, or the whole message): it is kept as an attachment with its name.
    let named_texts: HashSet<u32> = message
        .text_body
        .iter()
        .copied()
        .filter(|&id| {
            message
                .part(id)
                .is_some_and(|p| matches!(p.body, PartType::Text(_)) && has_filename(input, p))
        })
        .collect();
    // Its text is not shown as body too, unless the message has no other body text: an
    // agent must not get an empty body for a message that has text.
    let named_in_body = message.text_body.iter().all(|id| named_texts.contains(id));
    let mut attachment_parts: Vec<usize> = message
        .attachments
        .iter()
        .filter(|&&id| match message.part(id).map(|p| &p.body) {
            Some(PartType::Text(_)) => !text_parts.contains(&id),
            Some(PartType::Html(_)) => !html_parts.contains(&id),
            Some(_) => true,
            None => false,
        })
        .chain(&named_texts)
        .map(|&id| id as usize)
        .collect();
    // MIME order: part ids grow in the order parts appear.
    attachment_parts.sort_unstable();
    attachment_parts.dedup();

    // Bodies are moved out of the tree, not copied: a 48 MB text would otherwise be held
    // three times (decoded by mail-parser, copied, joined).
    let mut texts = Vec::new();
    for i in 0..message.text_body.len() {
        let id = message.text_body[i];
        let named = named_texts.contains(&id);
        if named && !named_in_body {
            continue;
        }
        // A named part shown as body is an attachment too: its text is copied, not moved.
        let once = !named && message.text_body.iter().filter(|&&t| t == id).count() == 1;
        let piece = match message.parts.get_mut(id as usize) {
            Some(part) if once && matches!(part.body, PartType::Text(_)) => {
                match std::mem::take(&mut part.body) {
                    PartType::Text(text) => Some(text),
                    _ => None,
                }
            }
            _ => message.body_text(i).map(|t| Cow::Owned(t.into_owned())),
        };
        texts.extend(piece);
    }
    parsed.text_body = joined(texts);
    // mail-parser lists text parts as HTML bodies too (converted) when there is no HTML;
    // an agent should see only HTML the sender wrote.
    let mut htmls = Vec::new();
    for &id in &message.html_body {
        if let Some(part) = message.parts.get_mut(id as usize)
            && matches!(part.body, PartType::Html(_))
            && let PartType::Html(html) = std::mem::take(&mut part.body)
        {
            htmls.push(html);
        }
    }
    if let Some(html) = joined(htmls) {
        match sanitizable(&html, limits) {
            Ok(()) => parsed.html_sanitized = Some(sanitize_html(&html)),
            Err(why) => {
                parsed.flag(FLAG_HTML_NOT_SANITIZED);
                notes.push(why);
            }
        }
        parsed.html_body = Some(html);
    }

    // Offsets name bytes of the stored raw message only when nothing was repaired or
    // transcoded before parsing.
    let in_raw = std::ptr::eq(input.as_ptr(), raw.as_ptr());
    for id in attachment_parts {
        if let Some(part) = message.parts.get_mut(id) {
            parsed.attachments.push(attachment(input, part, in_raw));
        }
    }
    notes.extend(found);
    parsed.defects = capped(notes);

    if !starts_with_header_field(input) {
        parsed.parse_error = Some(
            "the message does not start with a header section (the first line is not a \
             `Name: value` field); the fields shown may be guesses"
                .to_owned(),
        );
    }
    parsed
}

/// Why the census stopped, for `defects` and `parse_error`.
fn truncation_reason(census: &Census, limits: &ParseLimits, len: usize) -> String {
    let Some(cut) = census.cut else {
        return String::new();
    };
    let rest = format!(
        "bytes {} to {len} are not shown; the raw message, stored whole, has them",
        cut.offset
    );
    match cut.reason {
        CutReason::Parts => format!(
            "the message has more than {} MIME parts; only the first {} are shown ({rest})",
            limits.max_parts, census.parts
        ),
        CutReason::Depth => format!(
            "messages are nested more than {} levels deep; the deeper levels are not shown \
             ({rest})",
            limits.max_message_depth
        ),
        CutReason::Structure => format!(
            "the message's header fields and parts need more than {} MiB to parse ({rest})",
            limits.max_structure_bytes / (1024 * 1024)
        ),
    }
}

/// Whether `html` is small and shallow enough for the sanitiser; otherwise why not.
fn sanitizable(html: &str, limits: &ParseLimits) -> Result<(), String> {
    if html.len() > limits.max_sanitize_bytes {
        return Err(format!(
            "the HTML body ({} bytes) is larger than the {} bytes that are sanitised for \
             display; it is kept as received, the text body is shown",
            html.len(),
            limits.max_sanitize_bytes
        ));
    }
    let shape = html::shape(
        html,
        limits.max_sanitize_elements,
        limits.max_sanitize_depth,
    );
    if shape.elements > limits.max_sanitize_elements {
        return Err(format!(
            "the HTML body has more than {} elements, too many to sanitise for display; it \
             is kept as received, the text body is shown",
            limits.max_sanitize_elements
        ));
    }
    if shape.depth > limits.max_sanitize_depth {
        return Err(format!(
            "the HTML body is nested more than {} elements deep, too deep to sanitise for \
             display; it is kept as received, the text body is shown",
            limits.max_sanitize_depth
        ));
    }
    Ok(())
}

fn capped(mut found: Vec<String>) -> Vec<String> {
    if found.len() > MAX_DEFECTS {
        let more = found.len() - MAX_DEFECTS;
        found.truncate(MAX_DEFECTS);
        found.push(format!("… and {more} more problems of the same kinds"));
    }
    found
}

/// The pieces joined with line feeds, NUL replaced ([`crate::model::text`]); `None` for no
/// pieces. A single piece is moved, not copied.
fn joined(pieces: Vec<Cow<'_, str>>) -> Option<String> {
    let mut pieces = pieces.into_iter();
    let first = pieces.next()?;
    let mut out = match first {
        Cow::Owned(piece) => text::into_nul_free(piece),
        Cow::Borrowed(piece) => text::nul_free(piece).into_owned(),
    };
    for piece in pieces {
        out.push('\n');
        text::push_nul_free(&mut out, &piece);
    }
    Some(out)
}

/// `s` made storable by the model's one NUL rule.
fn clean(s: &str) -> String {
    text::nul_free(s).into_owned()
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

/// Builds the attachment for `part`, moving its decoded bytes out of the tree where they
/// are used as they are.
/// Attachments smaller than this keep their bytes: a range saves little on them and costs a
/// second decode.
const RANGE_MIN_BYTES: usize = 4096;

/// The range of `input` holding `part`'s base64 body, if decoding exactly that range gives
/// exactly `bytes` (mail-parser decodes while it searches for the boundary; its slice
/// decoder on the recorded range agrees on well-formed bodies, and anything else keeps its
/// bytes).
fn base64_range(input: &[u8], part: &MessagePart<'_>, bytes: &[u8]) -> Option<(u32, u32)> {
    if part.encoding != Encoding::Base64
        || part.is_encoding_problem
        || bytes.len() < RANGE_MIN_BYTES
    {
        return None;
    }
    let body = slice(input, part.offset_body, part.offset_end)?;
    (base64_decode(body).as_deref() == Some(bytes)).then_some((part.offset_body, part.offset_end))
}

fn attachment(input: &[u8], part: &mut MessagePart<'_>, in_raw: bool) -> Attachment {
    let content_type = content_type(part);
    let mut filename =
        rfc2231_continued_filename(input, part).or_else(|| non_empty(part.attachment_name()));
    let content_id = non_empty(
        part.content_id()
            .map(|id| id.trim().trim_start_matches('<').trim_end_matches('>')),
    );
    let inline = part.content_disposition().is_some_and(|d| d.is_inline());
    let bytes = if let PartType::Message(nested) = &mut part.body {
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
            std::mem::take(&mut nested.raw_message).into_owned()
        }
    } else if part.is_encoding_problem {
        // A truncated base64 part (missing boundary) comes back as raw text; an agent is
        // better served by the bytes that did arrive than by base64 in a `.pdf`.
        salvage_base64(part).unwrap_or_else(|| take_contents(part))
    } else if matches!(part.body, PartType::Text(_) | PartType::Html(_)) {
        // Text attachments are decoded to UTF-8 by mail-parser; a file must keep the bytes
        // its sender wrote, so undo only the transfer encoding.
        let bytes = original_bytes(input, part).unwrap_or_else(|| part.contents().to_vec());
        // The decoded text is not needed any more.
        part.body = PartType::default();
        bytes
    } else {
        take_contents(part)
    };
    let raw_range = in_raw.then(|| base64_range(input, part, &bytes)).flatten();
    Attachment {
        filename: filename.as_deref().and_then(safe_filename),
        content_type,
        content_id,
        inline,
        bytes,
        raw_range,
    }
}

/// The part's contents, moved out of the tree when mail-parser decoded them.
fn take_contents(part: &mut MessagePart<'_>) -> Vec<u8> {
    match &part.body {
        PartType::Text(_) | PartType::Html(_) | PartType::Binary(_) | PartType::InlineBinary(_) => {
            match std::mem::take(&mut part.body) {
                PartType::Text(text) | PartType::Html(text) => text.into_owned().into_bytes(),
                PartType::Binary(bytes) | PartType::InlineBinary(bytes) => bytes.into_owned(),
                _ => Vec::new(),
            }
        }
        _ => part.contents().to_vec(),
    }
}

/// Whether the part carries a file name (Content-Disposition `filename`, Content-Type
/// `name`, RFC 2231 continuations included).
fn has_filename(input: &[u8], part: &MessagePart<'_>) -> bool {
    non_empty(part.attachment_name()).is_some() || rfc2231_continued_filename(input, part).is_some()
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

/// Problems `mail-parser` recovered from. `check_closings`: whether missing closing
/// boundaries are worth reporting (not when the input was cut on purpose).
fn defects(input: &[u8], message: &Message<'_>, check_closings: bool) -> Vec<String> {
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
        if check_closings
            && part.is_multipart()
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
    let single_byte = is_single_byte(decode);
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 8);
    for line in head.split_inclusive(|&b| b == b'\n') {
        match std::str::from_utf8(line) {
            Ok(_) => out.extend_from_slice(line),
            Err(_) => out.extend_from_slice(decode_mixed(line, decode, single_byte).as_bytes()),
        }
    }
    out.extend_from_slice(&raw[end..]);
    Some(out)
}

/// Whether `decode` reads one byte as one character: decoding the 128 high bytes together
/// gives what decoding them one by one gives (a multi-byte charset pairs them up).
fn is_single_byte(decode: fn(&[u8]) -> String) -> bool {
    let high: Vec<u8> = (0x80..=0xFF).collect();
    let each: String = high
        .iter()
        .map(|b| decode(std::slice::from_ref(b)))
        .collect();
    decode(&high) == each
}

/// A header line that is not valid UTF-8, decoded: its valid UTF-8 sequences as UTF-8 (a
/// client that writes UTF-8 raw, RFC 6532, may still paste in a stray legacy byte), the
/// other bytes with the legacy charset `decode`. With a single-byte charset that is byte by
/// byte (each invalid byte is one character of it, not U+FFFD: the sender's text is
/// recovered, and the raw message keeps the bytes anyway). A multi-byte charset needs its
/// byte sequences whole, so there it decodes each run between white space that is not
/// UTF-8 (none of those charsets uses the bytes of a space or tab inside a character).
fn decode_mixed(line: &[u8], decode: fn(&[u8]) -> String, single_byte: bool) -> String {
    let mut out = String::with_capacity(line.len() + line.len() / 2);
    if !single_byte {
        let mut rest = line;
        while !rest.is_empty() {
            let split = rest
                .iter()
                .position(|&b| b == b' ' || b == b'\t')
                .unwrap_or(rest.len());
            let (run, after) = rest.split_at(split);
            match std::str::from_utf8(run) {
                Ok(text) => out.push_str(text),
                Err(_) => out.push_str(&decode(run)),
            }
            if let Some((&sep, after)) = after.split_first() {
                out.push(char::from(sep));
                rest = after;
            } else {
                rest = after;
            }
        }
        return out;
    }
    let mut rest = line;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(text) => {
                out.push_str(text);
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                if let Ok(text) = std::str::from_utf8(valid) {
                    out.push_str(text);
                }
                let bad = e.error_len().unwrap_or(after.len()).min(after.len());
                out.push_str(&decode(&after[..bad]));
                rest = &after[bad..];
            }
        }
    }
    out
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

// The lab's hostile-mail generators, compiled for the tests below only: the product does not
// depend on the lab (the lab depends on the product).
#[cfg(test)]
#[path = "../lab/src/sim/hostile.rs"]
#[allow(dead_code)] // the tests use some of the generators
mod hostile;

#[cfg(test)]
mod tests {
    use super::hostile;
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::{Path, PathBuf};

    #[test]
    fn parse_settings_default_to_the_default_limits() {
        let from_settings = ParseLimits::from(&crate::config::ParseConfig::default());
        assert_eq!(from_settings, ParseLimits::default());
    }

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
    fn utf8_and_stray_8bit_bytes_in_one_header_both_decode() {
        let mixed = fixture("header_mixed_utf8_and_8bit");
        assert_eq!(
            mixed.subject.as_deref(),
            Some("Grüße 😀 aus der Straße, Preis 10 €")
        );
        assert_eq!(mixed.from[0].name.as_deref(), Some("Jürgen Müller"));
        // A multi-byte legacy charset decodes its runs whole; UTF-8 runs stay UTF-8.
        let mut raw = "Subject: Grüße ".as_bytes().to_vec();
        raw.extend_from_slice(
            b"\x8e\x52\x93\x63\r\nContent-Type: text/plain; charset=shift_jis\r\n\r\nx\r\n",
        );
        assert_eq!(parse(&raw).subject.as_deref(), Some("Grüße 山田"));
        let sjis = charset_decoder(b"shift_jis").unwrap();
        assert!(!is_single_byte(sjis));
        assert!(is_single_byte(charset_decoder(b"windows-1252").unwrap()));
    }

    #[test]
    fn nul_bytes_never_reach_text_fields() {
        let parsed = fixture("nul_and_invalid_utf8_headers");
        let json = serde_json::to_string(&parsed).unwrap();
        assert!(!json.contains("\\u0000"), "{json}");
        assert!(
            parsed
                .subject
                .unwrap()
                .starts_with("NUL\u{FFFD} in subject")
        );
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
    fn a_header_section_without_its_blank_line_keeps_the_body() {
        let top = fixture("headers_without_blank_line");
        let text = top.text_body.unwrap_or_default();
        assert!(text.starts_with("Hello team,\r\nNote: this line"), "{text}");
        let parts = fixture("part_headers_without_blank_line");
        assert_eq!(
            parts.text_body.as_deref(),
            Some("Der Text beginnt direkt nach den Feldern.")
        );
        let names: Vec<_> = parts
            .attachments
            .iter()
            .map(|a| a.filename.clone())
            .collect();
        assert_eq!(names, [Some("leer.csv".into()), Some("rest.txt".into())]);
        assert!(parts.attachments[0].bytes.is_empty());
        assert_eq!(
            parts.attachments[1].bytes,
            b"the message ends inside this part"
        );
    }

    #[test]
    fn a_named_text_part_is_an_attachment_not_body_text() {
        let parsed = fixture("inline_text_part_with_filename");
        assert_eq!(
            parsed.text_body.as_deref(),
            Some("The log files are attached.")
        );
        let notes = &parsed.attachments[0];
        assert_eq!(notes.filename.as_deref(), Some("notes.txt"));
        assert!(notes.inline);
        assert_eq!(notes.bytes, b"notes: caf\xe9");
        assert_eq!(
            parsed.attachments[1].filename.as_deref(),
            Some("server.log")
        );
        // The only text of the message is both: the agent still sees it.
        let single = fixture("single_part_text_with_filename");
        assert!(single.text_body.unwrap_or_default().contains("3 Stück"));
        assert_eq!(
            single.attachments[0].filename.as_deref(),
            Some("bestellung.txt")
        );
        assert_eq!(
            single.attachments[0].bytes,
            "Bestellung 4711: 3 Stück\r\n".as_bytes()
        );
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

    /// Parts and message nesting of `mail-parser`'s tree, counted without recursion.
    /// `None` when `mail-parser` panics (its debug assertions; release builds go on).
    fn tree_counts(input: &[u8]) -> Option<(usize, usize)> {
        let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(input)).ok()?;
        let tree = Tree(parsed);
        let Some(message) = tree.0.as_ref() else {
            return Some((0, 0));
        };
        let mut parts = 0;
        let mut deepest = 0;
        let mut pending = vec![(message, 1)];
        while let Some((message, depth)) = pending.pop() {
            parts += message.parts.len();
            deepest = deepest.max(depth);
            for part in &message.parts {
                if let PartType::Message(nested) = &part.body {
                    pending.push((nested, depth + 1));
                }
            }
        }
        Some((parts, deepest))
    }

    fn unlimited() -> census::Caps {
        census::Caps {
            parts: usize::MAX,
            message_depth: usize::MAX,
            structure_bytes: usize::MAX,
        }
    }

    fn assert_census_agrees(name: &str, input: &[u8]) {
        let census = census::census(input, unlimited());
        let (parts, message_depth) = tree_counts(input).unwrap();
        assert_eq!(census.cut, None, "{name}");
        assert_eq!(census.parts, parts, "{name}: parts");
        if parts > 0 {
            assert_eq!(census.message_depth, message_depth, "{name}: message depth");
        }
    }

    #[test]
    fn census_counts_what_mail_parser_builds() {
        let mut dirs = vec![fixtures_dir()];
        dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/awkward"));
        for dir in dirs {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_some_and(|e| e == "eml") {
                    assert_census_agrees(
                        &path.display().to_string(),
                        &std::fs::read(&path).unwrap(),
                    );
                }
            }
        }
        let names = hostile::hostile_filenames();
        for (name, raw) in [
            ("nested_rfc822", hostile::nested_rfc822("m", 60)),
            (
                "nested_rfc822_base64",
                hostile::nested_rfc822_base64("m", 40),
            ),
            ("nested_multipart", hostile::nested_multipart("m", 60)),
            ("part_flood", hostile::part_flood("m", 500, 4)),
            ("filename_attacks", hostile::filename_attacks("m", &names)),
            ("html_trackers", hostile::html_trackers("m")),
            ("many_recipients", hostile::many_recipients("m", 100)),
        ] {
            assert_census_agrees(name, &raw);
        }
    }

    /// Fragments that exercise every structural decision: boundaries (also mid-line and
    /// followed by white space or a form feed), nested and encoded messages, digests,
    /// missing blank lines, folded and colon-less header lines.
    fn fragment() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "Content-Type: multipart/mixed; boundary=a\r\n",
            "Content-Type: multipart/alternative; boundary=\"b\"\r\n",
            "Content-Type: multipart/digest; boundary=a\r\n",
            "Content-Type: message/rfc822\r\n",
            "Content-Type: message/global\r\n",
            "Content-Type: text/html\r\n",
            "Content-Type: multipart/mixed\r\n",
            "Content-Transfer-Encoding: base64\r\n",
            "Content-Transfer-Encoding: quoted-printable\r\n",
            "Subject: x\r\n",
            "To: a@b, c@d\r\n",
            " folded\r\n",
            "no colon here\r\n",
            "\r\n",
            "\n",
            "--a\r\n",
            "--b\r\n",
            "--a--\r\n",
            "--b--\r\n",
            "x--a\r\n",
            "--a \x0c\n",
            "--a\t\r\n",
            "body text\r\n",
            "QmFzZTY0IQ==\r\n",
            "U3ViamVjdDogaQ0KDQpoaQ0K\r\n",
            "=41=42=\r\n",
            "-\r\n",
            "\x0c",
        ])
    }

    proptest::proptest! {
        // Under 10% of cases make mail-parser's debug assertions panic (they are skipped);
        // a change that makes most of them panic fails here.
        #![proptest_config(proptest::test_runner::Config {
            cases: 2048,
            max_global_rejects: 200,
            failure_persistence: None,
            ..proptest::test_runner::Config::default()
        })]
        #[test]
        fn census_matches_mail_parser_on_mime_shaped_input(
            pieces in proptest::collection::vec(fragment(), 1..60)
        ) {
            let raw = pieces.concat();
            let census = census::census(raw.as_bytes(), unlimited());
            let counted = tree_counts(raw.as_bytes());
            proptest::prop_assume!(counted.is_some());
            let Some((parts, message_depth)) = counted else {
                return Ok(());
            };
            // mail-parser drops a nested message it built when a multipart ends inside it
            // without its parent's boundary; the census counted its parts as allocated.
            proptest::prop_assert!(census.parts >= parts, "{} < {} in {:?}", census.parts, parts, raw);
            if parts > 0 {
                proptest::prop_assert!(census.message_depth >= message_depth, "{:?}", raw);
            }
        }

        #[test]
        fn a_cut_input_stays_within_the_limits(
            pieces in proptest::collection::vec(fragment(), 1..80),
            max_parts in 1usize..12,
            max_depth in 1usize..4,
        ) {
            let raw = pieces.concat();
            let caps = census::Caps { parts: max_parts, message_depth: max_depth, structure_bytes: usize::MAX };
            let census = census::census(raw.as_bytes(), caps);
            let input = census.cut.map_or(raw.as_bytes(), |c| &raw.as_bytes()[..c.offset]);
            let Some((parts, message_depth)) = tree_counts(input) else {
                return Ok(());
            };
            proptest::prop_assert!(parts <= max_parts, "{} parts in {:?}", parts, input);
            proptest::prop_assert!(message_depth <= max_depth, "depth {} in {:?}", message_depth, input);
        }
    }

    #[test]
    fn census_counts_a_nested_message_mail_parser_builds_and_drops() {
        // Found by the fuzzer: the message/rfc822 part at offset 95 is parsed (and
        // allocated), then dropped with its nested message when the multipart ends.
        let raw =
            b".0\nContent-Type: multipart/d;boundary=b1_rfc2231\"\r\n\n--b1_rfc2231Content-Type: \
message/rfc822\r\n\nF\r\nContent-Type:message/rfc822\r\n\r\n\x00\x00\x00\nContent-Type: \
message/rfc822\r\n\n\n--b1_rfc2231--\r\n";
        let census = census::census(raw, unlimited());
        assert_eq!(tree_counts(raw), Some((4, 3)));
        assert_eq!((census.parts, census.message_depth), (5, 4));
    }

    #[test]
    fn a_cut_inside_the_top_header_block_counts_the_part_it_leaves() {
        // Found by the fuzzer: the fields before the cut become one part.
        let mut raw = b"Subject: kept\r\nFrom: a@b\r\nTo: ".to_vec();
        raw.extend(std::iter::repeat_n(b"a@b,".as_slice(), 5_000).flatten());
        raw.extend_from_slice(b"\r\n\r\nbody\r\n");
        let caps = census::Caps {
            structure_bytes: 4096,
            ..unlimited()
        };
        let census = census::census(&raw, caps);
        let cut = census.cut.map(|c| c.offset).unwrap_or_default();
        assert_eq!(&raw[..cut], b"Subject: kept\r\nFrom: a@b\r\n");
        assert_eq!(tree_counts(&raw[..cut]), Some((1, 1)));
        assert_eq!((census.parts, census.message_depth), (1, 1));
    }

    #[test]
    fn a_deep_tree_is_taken_apart_without_recursion() {
        // 200,000 levels would overflow any stack in a recursive drop.
        let raw = hostile::nested_rfc822("m", 200_000);
        let message = MessageParser::default().parse(&raw);
        let depth = {
            let mut depth = 0;
            let mut current = message.as_ref();
            while let Some(m) = current {
                depth += 1;
                current = m.parts.iter().find_map(|p| match &p.body {
                    PartType::Message(n) => Some(n),
                    _ => None,
                });
            }
            depth
        };
        assert!(depth > 100_000, "{depth}");
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || drop(Tree(message)))
                .unwrap()
                .join()
                .unwrap();
        });
    }

    #[test]
    fn heap_bytes_counts_what_the_value_holds() {
        let parsed = fixture("outlook_related_inline_image");
        let floor = parsed.text_body.as_ref().map_or(0, String::len)
            + parsed.html_body.as_ref().map_or(0, String::len)
            + parsed.html_sanitized.as_ref().map_or(0, String::len)
            + parsed
                .attachments
                .iter()
                .map(|a| a.bytes.len())
                .sum::<usize>();
        assert!(
            parsed.heap_bytes() >= floor,
            "{} < {floor}",
            parsed.heap_bytes()
        );
        assert!(
            parsed.heap_bytes() < floor * 2 + 4096,
            "{}",
            parsed.heap_bytes()
        );
        assert_eq!(ParsedMail::default().heap_bytes(), 0);
    }

    #[test]
    fn limits_cut_parts_depth_and_header_memory() {
        let small = ParseLimits {
            max_parts: 50,
            ..ParseLimits::default()
        };
        let flood = parse_with_limits(&hostile::part_flood("m", 500, 4), &small);
        // The multipart itself, the text body and 48 attachments.
        assert_eq!(flood.attachments.len(), 48);
        assert_eq!(flood.text_body.as_deref(), Some("the body comes first"));
        assert_eq!(flood.flags, [FLAG_MIME_TRUNCATED]);
        assert!(
            flood.defects[0].contains("more than 50 MIME parts"),
            "{:?}",
            flood.defects
        );

        let shallow = ParseLimits {
            max_message_depth: 3,
            ..ParseLimits::default()
        };
        let deep = parse_with_limits(&hostile::nested_rfc822("m", 10), &shallow);
        assert_eq!(deep.subject.as_deref(), Some("nested messages"));
        assert_eq!(deep.flags, [FLAG_MIME_TRUNCATED]);
        assert!(
            deep.defects[0].contains("nested more than 3 levels"),
            "{:?}",
            deep.defects
        );
        let forwarded = &deep.attachments[0].bytes;
        assert!(forwarded.starts_with(b"From: <level0@hostile.test>"));

        let lean = ParseLimits {
            max_structure_bytes: 1024 * 1024,
            ..ParseLimits::default()
        };
        let crowd = parse_with_limits(&hostile::many_recipients("m", 100_000), &lean);
        assert_eq!(crowd.subject.as_deref(), Some("many recipients"));
        assert_eq!(
            crowd.to.len(),
            1,
            "only the To before the 100,000 is parsed"
        );
        assert_eq!(crowd.flags, [FLAG_MIME_TRUNCATED]);
        assert!(
            crowd.defects[0].contains("need more than 1 MiB"),
            "{:?}",
            crowd.defects
        );
    }

    #[test]
    fn a_header_section_over_the_limits_is_reported_not_parsed() {
        let lean = ParseLimits {
            max_structure_bytes: 1024,
            ..ParseLimits::default()
        };
        let mut raw = b"To: ".to_vec();
        raw.extend(std::iter::repeat_n(b"a@b,".as_slice(), 1_000).flatten());
        raw.extend_from_slice(b"\r\n\r\nbody\r\n");
        let parsed = parse_with_limits(&raw, &lean);
        assert!(
            parsed
                .parse_error
                .unwrap()
                .contains("header section alone exceeds")
        );
        assert_eq!(parsed.flags, [FLAG_MIME_TRUNCATED]);
    }

    #[test]
    fn header_section_parse_ignores_the_body() {
        let raw = hostile::part_flood("m", 1_000, 4);
        let parsed = parse_header_section(&raw);
        assert_eq!(parsed.subject.as_deref(), Some("part flood"));
        assert_eq!(parsed.text_body, None);
        assert!(parsed.attachments.is_empty());
        assert!(parsed.flags.is_empty(), "{:?}", parsed.flags);
        let huge = hostile::many_recipients("m", 100_000);
        let parsed = parse_header_section(&huge);
        assert_eq!(parsed.subject.as_deref(), Some("many recipients"));
        assert!(parsed.to.len() < 10_000, "{}", parsed.to.len());
        assert!(
            parsed.defects[0].contains("only its first 262"),
            "{:?}",
            parsed.defects
        );
    }
}
