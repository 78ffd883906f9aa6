//! Classifies a message as a person's mail or an automatic one, from its header section and
//! MIME tree, and reads Outlook's threading header. A pure function: same bytes, same
//! verdict, no I/O. The loop rules that need stored mail (seen before, too many from one
//! sender) are the store's (`store::conversations`).
//!
//! Every sender-written byte is hostile: the header section is read only up to
//! [`HEADER_SECTION_LIMIT`], values kept as evidence are cut to
//! [`EVIDENCE_VALUE_CHARS`] characters with control characters replaced, and a report's
//! per-recipient blocks are read up to [`DSN_RECIPIENTS`].
//!
//! The rule table, strongest first; the first row that matches decides, every other match
//! is kept as evidence too:
//!
//! | rule | reads | class |
//! |---|---|---|
//! | `x_loop_this_mailbox` | `X-Loop` naming the pilot's mailbox | loop |
//! | `dsn_failed`, `dsn_delayed` | RFC 3464 `multipart/report; report-type=delivery-status` or a `message/delivery-status` part, any recipient `Action: failed`/`delayed` (or none readable) | bounce |
//! | `dsn_delivered` | the same report with every recipient `delivered`/`relayed`/`expanded` (a delivery receipt) | receipt |
//! | `mdn` | RFC 8098 `report-type=disposition-notification` or a `message/disposition-notification` part (read receipts, Exchange's included) | receipt |
//! | `exchange_ndr` | `X-MS-Exchange-Message-Is-Ndr` | bounce |
//! | `auto_submitted_auto_replied` | RFC 3834 `Auto-Submitted: auto-replied` | auto_reply |
//! | `exchange_oof` | `X-MS-Exchange-Inbox-Rules-Loop` with an automatic `Auto-Submitted`, or an out-of-office subject prefix (`Automatic reply:` …) with `X-Auto-Response-Suppress` | auto_reply |
//! | `x_autoreply`, `x_autorespond`, `precedence_auto_reply` | `X-Autoreply`, `X-Autorespond`, `Precedence: auto_reply` | auto_reply |
//! | `mailer_daemon_sender` | `From` local part `mailer-daemon` or `postmaster` | bounce |
//! | `null_return_path` | `Return-Path: <>` | bounce |
//! | `auto_submitted_auto_generated` | `Auto-Submitted` any other value but `no` | auto_generated |
//! | `precedence_bulk` | `Precedence` / `X-Precedence`: `bulk`, `junk`, `list` | auto_generated |
//! | `list_id`, `list_unsubscribe` | `List-Id`, `List-Unsubscribe` | auto_generated |
//! | `default_human` | nothing above | human |
//!
//! Negative rules, recorded under `not_automatic` and never deciding: `auto_submitted_no`
//! (`Auto-Submitted: no` says a person sent it, RFC 3834 §5) and
//! `x_auto_response_suppress` (it asks the receiver not to answer automatically; Exchange
//! puts it on ordinary mail, so alone it says nothing about the sender).
//!
//! Golden tests: every `tests/fixtures/classify/NAME.eml` is parsed and classified for the
//! mailbox `support@contoso.com` and compared with `NAME.json`. After an intended change run
//! `UPDATE_GOLDEN=1 cargo test --lib classify` and review the diff.

use mail_parser::decoders::base64::base64_decode;

use crate::model::ParsedMail;
pub use crate::model::triage::{
    Classification, DSN_RECIPIENTS, DsnRecipient, EVIDENCE_VALUE_CHARS, Finding, MailClass,
    OriginalMessage, ThreadIndex, Triage,
};

/// Bytes of a header section read: far above any real one, and small enough that a hostile
/// message cannot make classification expensive.
pub const HEADER_SECTION_LIMIT: usize = 256 * 1024;

/// Header fields read from one section: a hostile message may have millions.
const MAX_FIELDS: usize = 2_000;

/// Subject prefixes of out-of-office replies that mail systems write (Exchange, Outlook and
/// their translations). Never enough alone: only with `X-Auto-Response-Suppress`.
const OOF_SUBJECT_PREFIXES: [&str; 12] = [
    "automatic reply:",
    "auto:",
    "autosvar:",
    "automatisk svar:",
    "automatisch antwoord:",
    "automatische antwort:",
    "abwesenheitsnotiz:",
    "réponse automatique:",
    "respuesta automática:",
    "risposta automatica:",
    "out of office:",
    "out of office reply:",
];

/// Classifies `raw` (the bytes as downloaded, or only the header section) with its parse
/// `parsed`, for the pilot whose mailbox is `mailbox`. See the module documentation.
pub fn classify(raw: &[u8], parsed: &ParsedMail, mailbox: &str) -> Triage {
    let headers = Headers::read(raw);
    let mut hits: Vec<Hit> = Vec::new();
    let mut not_automatic: Vec<Finding> = Vec::new();
    let mut recipients = Vec::new();
    let mut original = None;
    let mailbox = mailbox.trim().to_ascii_lowercase();

    // Loop: a mail system that stamps this mailbox into X-Loop has handled this message
    // already (RFC 3834 §5 points at X-Loop for exactly that).
    for value in headers.all("x-loop") {
        if !mailbox.is_empty() && value.to_ascii_lowercase().contains(&mailbox) {
            hits.push(hit(
                MailClass::Loop,
                0,
                "x_loop_this_mailbox",
                "X-Loop",
                value,
            ));
        }
    }

    let content_type = headers.first("content-type").map(ContentType::parse);
    let report_type = content_type
        .as_ref()
        .filter(|ct| ct.mime == "multipart/report")
        .and_then(|ct| ct.param("report-type"));

    // RFC 3464: the delivery-status part says per recipient what happened.
    let dsn_part = parsed.attachments.iter().find(|a| {
        a.content_type == "message/delivery-status"
            || a.content_type == "message/global-delivery-status"
    });
    let is_dsn = report_type.as_deref().is_some_and(|t| {
        t.eq_ignore_ascii_case("delivery-status")
            || t.eq_ignore_ascii_case("global-delivery-status")
    }) || dsn_part.is_some();
    if is_dsn {
        recipients = dsn_part
            .map(|p| dsn_recipients(&p.bytes))
            .unwrap_or_default();
        let source = if report_type.is_some() {
            "Content-Type"
        } else {
            "message/delivery-status"
        };
        let summary = recipients
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}",
                    r.final_recipient.as_deref().unwrap_or("?"),
                    r.action.as_deref().unwrap_or("?"),
                    r.status.as_deref().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let action = |word: &str| {
            recipients.iter().any(|r| {
                r.action
                    .as_deref()
                    .is_some_and(|a| a.eq_ignore_ascii_case(word))
            })
        };
        let delivered_only = !recipients.is_empty()
            && recipients.iter().all(|r| {
                r.action.as_deref().is_some_and(|a| {
                    ["delivered", "relayed", "expanded"]
                        .iter()
                        .any(|w| a.eq_ignore_ascii_case(w))
                })
            });
        let value = if summary.is_empty() {
            "no readable recipient".to_owned()
        } else {
            summary
        };
        if delivered_only {
            hits.push(hit(MailClass::Receipt, 1, "dsn_delivered", source, &value));
        } else if action("delayed") && !action("failed") {
            hits.push(hit(MailClass::Bounce, 1, "dsn_delayed", source, &value));
        } else {
            hits.push(hit(MailClass::Bounce, 1, "dsn_failed", source, &value));
        }
        original = returned_message(parsed);
    }

    // RFC 8098: a message disposition notification (a read receipt).
    let mdn_part = parsed
        .attachments
        .iter()
        .find(|a| a.content_type == "message/disposition-notification");
    let is_mdn = report_type
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("disposition-notification"))
        || mdn_part.is_some();
    if is_mdn {
        let fields = mdn_part
            .map(|p| Headers::read_block(&p.bytes))
            .unwrap_or_default();
        let disposition = fields
            .first("disposition")
            .unwrap_or("no Disposition field");
        hits.push(hit(
            MailClass::Receipt,
            1,
            "mdn",
            "message/disposition-notification",
            disposition,
        ));
        let mut found = returned_message(parsed).unwrap_or_default();
        if found.message_id.is_none() {
            found.message_id = fields
                .first("original-message-id")
                .and_then(|v| message_ids(v).into_iter().next());
        }
        if found != OriginalMessage::default() {
            original = Some(found);
        }
    }

    if let Some(value) = headers.first("x-ms-exchange-message-is-ndr") {
        hits.push(hit(
            MailClass::Bounce,
            1,
            "exchange_ndr",
            "X-MS-Exchange-Message-Is-Ndr",
            value,
        ));
    }

    // RFC 3834 §5: the first token of Auto-Submitted; `no` means a person sent it.
    let mut auto_submitted_automatic = false;
    for value in headers.all("auto-submitted") {
        let token = first_token(value);
        if token == "no" {
            not_automatic.push(finding("auto_submitted_no", "Auto-Submitted", value));
        } else if token == "auto-replied" {
            auto_submitted_automatic = true;
            hits.push(hit(
                MailClass::AutoReply,
                2,
                "auto_submitted_auto_replied",
                "Auto-Submitted",
                value,
            ));
        } else if !token.is_empty() {
            auto_submitted_automatic = true;
            hits.push(hit(
                MailClass::AutoGenerated,
                4,
                "auto_submitted_auto_generated",
                "Auto-Submitted",
                value,
            ));
        }
    }

    let suppress = headers.first("x-auto-response-suppress");
    let subject = parsed.subject.as_deref().unwrap_or("").trim_start();
    let oof_subject = OOF_SUBJECT_PREFIXES
        .iter()
        .any(|p| starts_with_ignore_case(subject, p));
    if let Some(value) = headers.first("x-ms-exchange-inbox-rules-loop")
        && auto_submitted_automatic
    {
        hits.push(hit(
            MailClass::AutoReply,
            2,
            "exchange_oof",
            "X-MS-Exchange-Inbox-Rules-Loop",
            value,
        ));
    }
    if let Some(value) = suppress {
        if oof_subject {
            hits.push(hit(
                MailClass::AutoReply,
                2,
                "exchange_oof",
                "Subject + X-Auto-Response-Suppress",
                &format!("{subject} | {value}"),
            ));
        }
        not_automatic.push(finding(
            "x_auto_response_suppress",
            "X-Auto-Response-Suppress",
            value,
        ));
    }
    for (name, rule) in [
        ("x-autoreply", "x_autoreply"),
        ("x-autorespond", "x_autorespond"),
    ] {
        if let Some(value) = headers.first(name) {
            let token = first_token(value);
            if token == "no" || token == "false" {
                not_automatic.push(finding(rule, name, value));
            } else {
                hits.push(hit(
                    MailClass::AutoReply,
                    2,
                    rule,
                    display_name(name),
                    value,
                ));
            }
        }
    }

    for name in ["precedence", "x-precedence"] {
        for value in headers.all(name) {
            match first_token(value).as_str() {
                "auto_reply" => hits.push(hit(
                    MailClass::AutoReply,
                    2,
                    "precedence_auto_reply",
                    display_name(name),
                    value,
                )),
                "bulk" | "junk" | "list" => hits.push(hit(
                    MailClass::AutoGenerated,
                    4,
                    "precedence_bulk",
                    display_name(name),
                    value,
                )),
                _ => {}
            }
        }
    }

    for address in &parsed.from {
        let Some(email) = address.email.as_deref() else {
            continue;
        };
        let local = email.split('@').next().unwrap_or("").to_ascii_lowercase();
        if local == "mailer-daemon" || local == "postmaster" {
            hits.push(hit(
                MailClass::Bounce,
                3,
                "mailer_daemon_sender",
                "From",
                email,
            ));
        }
    }
    if let Some(value) = headers.first("return-path")
        && value.trim() == "<>"
    {
        hits.push(hit(
            MailClass::Bounce,
            3,
            "null_return_path",
            "Return-Path",
            value,
        ));
    }

    if let Some(value) = headers.first("list-id") {
        hits.push(hit(
            MailClass::AutoGenerated,
            4,
            "list_id",
            "List-Id",
            value,
        ));
    }
    if let Some(value) = headers.first("list-unsubscribe") {
        hits.push(hit(
            MailClass::AutoGenerated,
            4,
            "list_unsubscribe",
            "List-Unsubscribe",
            value,
        ));
    }

    // The strongest row decides; among rows of one strength, the one listed first.
    hits.sort_by_key(|h| h.rank);
    let (class, rule) = hits
        .first()
        .map(|h| (h.class, h.finding.rule.clone()))
        .unwrap_or((MailClass::Human, "default_human".to_owned()));
    recipients.truncate(DSN_RECIPIENTS);
    Triage {
        classification: Classification {
            class,
            rule,
            evidence: hits.into_iter().map(|h| h.finding).collect(),
            not_automatic,
            recipients: if matches!(class, MailClass::Bounce | MailClass::Receipt) {
                recipients
            } else {
                Vec::new()
            },
            original: original.filter(|_| matches!(class, MailClass::Bounce | MailClass::Receipt)),
        },
        thread_index: thread_index(&headers),
    }
}

/// A matching rule: its class, its strength (0 strongest) and what it saw.
struct Hit {
    class: MailClass,
    rank: u8,
    finding: Finding,
}

fn hit(class: MailClass, rank: u8, rule: &str, source: &str, value: &str) -> Hit {
    Hit {
        class,
        rank,
        finding: finding(rule, source, value),
    }
}

fn finding(rule: &str, source: &str, value: &str) -> Finding {
    Finding {
        rule: rule.to_owned(),
        source: source.to_owned(),
        value: evidence_text(value),
    }
}

/// A header name as the rule table writes it, for evidence.
fn display_name(lower: &str) -> &'static str {
    match lower {
        "x-autoreply" => "X-Autoreply",
        "x-autorespond" => "X-Autorespond",
        "precedence" => "Precedence",
        "x-precedence" => "X-Precedence",
        _ => "header",
    }
}

/// `value` made safe to keep and show: control characters become spaces, runs of white
/// space one space, at most [`EVIDENCE_VALUE_CHARS`] characters.
pub fn evidence_text(value: &str) -> String {
    let mut out = String::new();
    let mut space = false;
    for c in value.trim().chars() {
        if out.chars().count() >= EVIDENCE_VALUE_CHARS {
            out.push('…');
            break;
        }
        if c.is_whitespace() || crate::display::is_unsafe(c) {
            if !space {
                out.push(' ');
            }
            space = true;
        } else {
            out.push(c);
            space = false;
        }
    }
    out.trim_end().to_owned()
}

/// The first token of a structured value, lowercase (`auto-replied; owner=...` →
/// `auto-replied`), comments dropped.
fn first_token(value: &str) -> String {
    let value = value.trim();
    let value = value.split('(').next().unwrap_or("");
    value
        .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
        .find(|t| !t.is_empty())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Whether `text` starts with the lowercase `prefix`, ignoring case (only the first
/// characters are folded: a subject may be long).
fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    let head: String = text.chars().take(prefix.chars().count() + 8).collect();
    head.to_lowercase().starts_with(prefix)
}

/// Ids in angle brackets (`<a@b> <c@d>`), without the brackets, in order.
fn message_ids(value: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('<') {
        let after = &rest[start + 1..];
        let Some(end) = after.find('>') else { break };
        let id = after[..end].trim();
        if !id.is_empty() && id.len() <= 998 && !id.chars().any(crate::display::is_unsafe) {
            ids.push(id.to_owned());
        }
        rest = &after[end + 1..];
        if ids.len() >= 100 {
            break;
        }
    }
    ids
}

/// The headers of the message a bounce or receipt returns: a `text/rfc822-headers` part or
/// a nested `message/rfc822` (RFC 3462 / RFC 6522 §3).
fn returned_message(parsed: &ParsedMail) -> Option<OriginalMessage> {
    let part = parsed.attachments.iter().find(|a| {
        matches!(
            a.content_type.as_str(),
            "text/rfc822-headers" | "message/rfc822" | "message/global-headers" | "message/global"
        )
    })?;
    let fields = Headers::read(&part.bytes);
    let mut ancestors: Vec<String> = Vec::new();
    if let Some(v) = fields.first("in-reply-to") {
        ancestors.extend(message_ids(v));
    }
    if let Some(v) = fields.first("references") {
        let mut refs = message_ids(v);
        refs.reverse();
        for id in refs.into_iter().take(50) {
            if !ancestors.contains(&id) {
                ancestors.push(id);
            }
        }
    }
    let found = OriginalMessage {
        message_id: fields
            .first("message-id")
            .and_then(|v| message_ids(v).into_iter().next()),
        ancestors,
        subject: fields.first("subject").map(evidence_text),
    };
    (found != OriginalMessage::default()).then_some(found)
}

/// RFC 3464 §2.3: the per-recipient blocks of a delivery-status part (after the
/// per-message block, each separated by a blank line).
fn dsn_recipients(bytes: &[u8]) -> Vec<DsnRecipient> {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(HEADER_SECTION_LIMIT)]);
    let text = text.replace("\r\n", "\n");
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let fields = Headers::read_block(block.as_bytes());
        let Some(recipient) = fields
            .first("final-recipient")
            .or_else(|| fields.first("original-recipient"))
        else {
            continue;
        };
        // `rfc822; user@host`: the address type comes first.
        let address = recipient
            .split_once(';')
            .map_or(recipient, |(_, address)| address)
            .trim();
        out.push(DsnRecipient {
            final_recipient: Some(evidence_text(address)),
            action: fields
                .first("action")
                .map(|v| evidence_text(&first_token(v))),
            status: fields
                .first("status")
                .map(|v| evidence_text(&first_token(v))),
            diagnostic: fields.first("diagnostic-code").map(evidence_text),
        });
        if out.len() >= DSN_RECIPIENTS {
            break;
        }
    }
    out
}

/// MS-OXOMSG §2.2.1.3: `Thread-Index` is base64 of a 22-byte header (FILETIME + GUID) that
/// names the conversation, followed by one 5-byte block per reply.
fn thread_index(headers: &Headers) -> Option<ThreadIndex> {
    let value = headers.first("thread-index")?;
    let compact: Vec<u8> = value
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .take(4096)
        .collect();
    let bytes = base64_decode(&compact)?;
    if bytes.len() < 22 {
        return None;
    }
    Some(ThreadIndex {
        root: hex::encode(&bytes[..22]),
        depth: (bytes.len() - 22) / 5,
        topic: headers.first("thread-topic").map(evidence_text),
    })
}

/// `type/subtype` and parameters of a `Content-Type` value.
struct ContentType {
    mime: String,
    params: Vec<(String, String)>,
}

impl ContentType {
    fn parse(value: &str) -> ContentType {
        let mut pieces = value.split(';');
        let mime = pieces.next().unwrap_or("").trim().to_ascii_lowercase();
        let params = pieces
            .take(50)
            .filter_map(|p| {
                let (name, value) = p.split_once('=')?;
                Some((
                    name.trim().to_ascii_lowercase(),
                    value.trim().trim_matches('"').to_owned(),
                ))
            })
            .collect();
        ContentType { mime, params }
    }

    fn param(&self, name: &str) -> Option<String> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

/// Unfolded header fields of one section: lowercase names, values as lossy UTF-8.
#[derive(Default)]
struct Headers {
    fields: Vec<(String, String)>,
}

impl Headers {
    /// The header section of a message: up to the first empty line, at most
    /// [`HEADER_SECTION_LIMIT`] bytes.
    fn read(raw: &[u8]) -> Headers {
        let raw = &raw[..raw.len().min(HEADER_SECTION_LIMIT)];
        Headers::read_block(&raw[..header_end(raw)])
    }

    /// A block of `Name: value` lines (a header section, a report's field block).
    fn read_block(block: &[u8]) -> Headers {
        let block = &block[..block.len().min(HEADER_SECTION_LIMIT)];
        let text = String::from_utf8_lossy(block);
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.trim().is_empty() {
                if fields.is_empty() {
                    continue;
                }
                break;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut()
                    && value.len() < HEADER_SECTION_LIMIT / 4
                {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                continue;
            }
            if fields.len() >= MAX_FIELDS {
                break;
            }
            fields.push((name.to_ascii_lowercase(), value.trim().to_owned()));
        }
        Headers { fields }
    }

    fn first(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where the header section of `raw` ends: at its first empty line (CRLF or bare LF), read
/// line by line so that only the header section is looked at, however large the body.
fn header_end(raw: &[u8]) -> usize {
    let mut start = 0;
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' {
            let line = &raw[start..i];
            if line.is_empty() || line == b"\r" {
                return start;
            }
            start = i + 1;
        }
    }
    raw.len()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::ingest::parse::parse;

    const MAILBOX: &str = "support@contoso.com";

    fn fixtures_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/classify")
    }

    fn classify_file(path: &Path) -> Triage {
        let raw = std::fs::read(path).unwrap();
        classify(&raw, &parse(&raw), MAILBOX)
    }

    fn fixture(name: &str) -> Triage {
        classify_file(&fixtures_dir().join(format!("{name}.eml")))
    }

    #[test]
    fn classify_golden_fixtures_match() {
        let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
        let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        names.sort();
        assert!(names.len() >= 20, "found {} fixtures", names.len());
        let mut mismatches = Vec::new();
        for eml in &names {
            let mut actual = serde_json::to_string_pretty(&classify_file(eml)).unwrap();
            actual.push('\n');
            let json = eml.with_extension("json");
            if update {
                std::fs::write(&json, &actual).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&json).unwrap_or_default();
            if expected != actual {
                mismatches.push(format!(
                    "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
                    eml.display()
                ));
            }
        }
        assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    }

    /// The class each fixture must get, independent of the golden files (so a golden
    /// rewritten by mistake cannot hide a wrong class).
    #[test]
    fn classify_each_rule_row_decides_its_fixture() {
        use MailClass::*;
        let table = [
            ("x_loop_this_mailbox", Loop, "x_loop_this_mailbox"),
            ("x_loop_other_mailbox", Human, "default_human"),
            ("postfix_ndr", Bounce, "dsn_failed"),
            ("exchange_ndr", Bounce, "dsn_failed"),
            ("dsn_delayed", Bounce, "dsn_delayed"),
            ("exchange_delivery_receipt", Receipt, "dsn_delivered"),
            ("read_receipt_mdn", Receipt, "mdn"),
            ("exchange_ndr_header_only", Bounce, "exchange_ndr"),
            ("gmail_vacation", AutoReply, "auto_submitted_auto_replied"),
            ("exchange_oof", AutoReply, "exchange_oof"),
            ("outlook_oof_subject_suppress", AutoReply, "exchange_oof"),
            ("x_autoreply", AutoReply, "x_autoreply"),
            ("x_autorespond", AutoReply, "x_autorespond"),
            ("precedence_auto_reply", AutoReply, "precedence_auto_reply"),
            ("mailer_daemon_sender", Bounce, "mailer_daemon_sender"),
            ("null_return_path", Bounce, "null_return_path"),
            (
                "auto_submitted_auto_generated",
                AutoGenerated,
                "auto_submitted_auto_generated",
            ),
            ("precedence_bulk", AutoGenerated, "precedence_bulk"),
            ("mailing_list_post", AutoGenerated, "list_id"),
            (
                "list_unsubscribe_newsletter",
                AutoGenerated,
                "list_unsubscribe",
            ),
            ("auto_submitted_no", Human, "default_human"),
            ("lone_x_auto_response_suppress", Human, "default_human"),
            ("outlook_reply_thread_index_only", Human, "default_human"),
            ("human_plain", Human, "default_human"),
        ];
        for (name, class, rule) in table {
            let triage = fixture(name);
            assert_eq!(
                (
                    triage.classification.class,
                    triage.classification.rule.as_str()
                ),
                (class, rule),
                "{name}"
            );
        }
    }

    #[test]
    fn classify_negative_rules_are_recorded_not_obeyed() {
        let no = fixture("auto_submitted_no").classification;
        assert_eq!(no.not_automatic[0].rule, "auto_submitted_no");
        let suppress = fixture("lone_x_auto_response_suppress").classification;
        assert_eq!(suppress.not_automatic[0].rule, "x_auto_response_suppress");
        assert!(suppress.evidence.is_empty());
    }

    #[test]
    fn classify_reads_every_dsn_recipient_and_the_returned_message() {
        let ndr = fixture("postfix_ndr").classification;
        assert_eq!(ndr.recipients.len(), 2);
        assert_eq!(ndr.recipients[0].action.as_deref(), Some("failed"));
        assert_eq!(ndr.recipients[0].status.as_deref(), Some("5.1.1"));
        assert_eq!(
            ndr.original.and_then(|o| o.message_id).as_deref(),
            Some("reply-7781@contoso.com")
        );
    }

    #[test]
    fn classify_reads_outlook_thread_index() {
        let reply = fixture("outlook_reply_thread_index_only");
        let index = reply.thread_index.unwrap();
        assert_eq!(index.root.len(), 44);
        assert_eq!(index.depth, 1);
    }

    #[test]
    fn classify_survives_hostile_headers() {
        let mut raw =
            b"From: a@b\r\nContent-Type: multipart/report; report-type=delivery-status\r\nX-Loop: "
                .to_vec();
        raw.extend(std::iter::repeat_n(b'x', 1_000_000));
        raw.extend(b" support@contoso.com\r\n\r\n");
        let triage = classify(&raw, &ParsedMail::default(), MAILBOX);
        assert_eq!(triage.classification.class, MailClass::Bounce);
        assert_eq!(triage.classification.rule, "dsn_failed");
        let raw = b"Auto-Submitted: \x00\x1b[31mauto-replied\r\n\r\n";
        let triage = classify(raw, &ParsedMail::default(), MAILBOX);
        assert!(!triage.classification.evidence[0].value.contains('\x1b'));
        let empty = classify(b"", &ParsedMail::default(), MAILBOX);
        assert_eq!(empty.classification.class, MailClass::Human);
    }
}
