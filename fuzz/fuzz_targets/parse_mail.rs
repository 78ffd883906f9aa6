//! Parses arbitrary bytes and checks what ccmail promises about every parse: it returns, its
//! text is storable, its flags are known, its file names are safe, HTML is sanitised only
//! within the limits, and `mail-parser` never builds more than the limits allow for the
//! prefix the census chose. The first input byte picks default or tiny limits, so cuts are
//! exercised too.

#![no_main]

use ccmail::ingest::parse::{
    FLAG_HTML_NOT_SANITIZED, FLAGS, ParseLimits, ParsedMail, mime_census, parse_with_limits,
};
use libfuzzer_sys::fuzz_target;
use mail_parser::{Message, MessageParser, PartType};

fuzz_target!(|data: &[u8]| {
    quiet_caught_panics();
    let limits = if data.first().is_some_and(|b| b & 1 == 1) {
        ParseLimits {
            max_parts: 16,
            max_message_depth: 4,
            max_structure_bytes: 64 * 1024,
            max_sanitize_bytes: 4 * 1024,
            max_sanitize_elements: 64,
            max_sanitize_depth: 16,
            ..ParseLimits::default()
        }
    } else {
        ParseLimits::default()
    };
    let parsed = parse_with_limits(data, &limits);
    check_parsed(&parsed, &limits);
    check_census(data, &limits);
});

/// `mail-parser`'s debug assertions panic inside `parse`'s `catch_unwind`, which handles
/// them; libFuzzer's hook would abort on them. A panic that escapes `parse` still aborts
/// (libfuzzer-sys catches it around this target), with its message printed here.
fn quiet_caught_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    });
}

fn check_parsed(parsed: &ParsedMail, limits: &ParseLimits) {
    let mut texts: Vec<&str> = Vec::new();
    texts.extend(parsed.message_id.as_deref());
    texts.extend(parsed.subject.as_deref());
    for a in parsed
        .from
        .iter()
        .chain(&parsed.to)
        .chain(&parsed.cc)
        .chain(&parsed.reply_to)
    {
        texts.extend(a.name.as_deref());
        texts.extend(a.email.as_deref());
    }
    texts.extend(parsed.in_reply_to.iter().map(String::as_str));
    texts.extend(parsed.references.iter().map(String::as_str));
    texts.extend(parsed.text_body.as_deref());
    texts.extend(parsed.html_body.as_deref());
    texts.extend(parsed.html_sanitized.as_deref());
    texts.extend(parsed.parse_error.as_deref());
    texts.extend(parsed.defects.iter().map(String::as_str));
    for a in &parsed.attachments {
        texts.push(&a.content_type);
        texts.extend(a.content_id.as_deref());
        if let Some(name) = &a.filename {
            assert!(!name.is_empty() && name.len() <= 255, "{name:?}");
            assert!(!name.contains(['/', '\\']), "{name:?}");
            assert!(!name.chars().any(char::is_control), "{name:?}");
            assert!(
                !name.contains(['\u{202E}', '\u{2066}', '\u{200B}']),
                "{name:?}"
            );
        }
    }
    for text in texts {
        assert!(!text.contains('\0'), "NUL in {text:?}");
    }
    for (i, flag) in parsed.flags.iter().enumerate() {
        assert!(FLAGS.contains(flag), "unknown flag {flag}");
        assert!(!parsed.flags[..i].contains(flag), "duplicate flag {flag}");
    }
    assert!(
        parsed.defects.len() <= 21,
        "{} defects",
        parsed.defects.len()
    );
    assert!(parsed.attachments.len() <= limits.max_parts);
    match (&parsed.html_body, &parsed.html_sanitized) {
        (None, Some(_)) => panic!("sanitised HTML without HTML"),
        (Some(html), Some(_)) => assert!(html.len() <= limits.max_sanitize_bytes),
        (Some(_), None) => assert!(parsed.flags.contains(&FLAG_HTML_NOT_SANITIZED)),
        (None, None) => {}
    }
    let bytes: usize = parsed.attachments.iter().map(|a| a.bytes.len()).sum();
    assert!(parsed.heap_bytes() >= bytes);
}

/// The prefix the census lets through builds at most the limits, and the census counted at
/// least what `mail-parser` builds.
fn check_census(data: &[u8], limits: &ParseLimits) {
    let census = mime_census(data, limits);
    let prefix = &data[..census.cut.unwrap_or(data.len())];
    let Ok(message) = std::panic::catch_unwind(|| MessageParser::default().parse(prefix)) else {
        return;
    };
    let (parts, depth) = counts(message);
    assert!(parts <= limits.max_parts, "{parts} parts");
    assert!(depth <= limits.max_message_depth, "message depth {depth}");
    // The census counts every part mail-parser allocates, also those of a nested message
    // it drops again (a multipart that ends inside it), so it may count more, never less.
    assert!(
        census.parts >= parts,
        "census {} < {parts} parts",
        census.parts
    );
    if parts > 0 {
        assert!(
            census.message_depth >= depth,
            "census depth {}",
            census.message_depth
        );
    }
}

/// Parts and message depth, taking the tree apart without recursion.
fn counts(message: Option<Message<'_>>) -> (usize, usize) {
    let (mut parts, mut deepest) = (0, 0);
    let mut pending: Vec<(Message<'_>, usize)> = message.into_iter().map(|m| (m, 1)).collect();
    while let Some((mut message, depth)) = pending.pop() {
        parts += message.parts.len();
        deepest = deepest.max(depth);
        for part in &mut message.parts {
            if let PartType::Message(nested) = std::mem::take(&mut part.body) {
                pending.push((nested, depth + 1));
            }
        }
    }
    (parts, deepest)
}
