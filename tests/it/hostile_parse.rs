//! Hostile mail against the parser: every message an outsider can send returns, within its
//! limits and flagged, and what is shown to agents is safe.
//!
//! Each case used to crash the process (stack overflow in `mail-parser`'s recursive drop or
//! `into_owned`), run for minutes (HTML sanitising), keep every one of 330,000 parts, or
//! hand the sender's file names and tracking pixels to agents. The generators are in
//! `ccmail_lab::sim::hostile`; the memory and time figures come from
//! `cargo run --example hostile_figures`.

use std::time::Duration;

use ccmail::ingest::parse::{
    FLAG_HTML_NOT_SANITIZED, FLAG_MIME_TOO_DEEP, FLAG_MIME_TRUNCATED, FLAG_PARSE_SKIPPED,
    FLAG_PARSE_TIMEOUT, ParseLimits, ParsedMail, parse, parse_bounded,
};
use ccmail_lab::sim::hostile;

/// Runs [`parse`] on a thread of the default 2 MiB test stack and fails if it has not
/// returned after `limit` (a bound proving it did not hang, not a timing goal).
fn parse_within(raw: Vec<u8>, limit: Duration) -> ParsedMail {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(parse(&raw));
    });
    match rx.recv_timeout(limit) {
        Ok(parsed) => parsed,
        Err(e) => panic!("parse did not return within {limit:?}: {e}"),
    }
}

const GENEROUS: Duration = Duration::from_secs(60);

#[test]
fn rfc822_nested_40_000_and_100_000_deep_parses_truncated_and_flagged() {
    for depth in [40_000, 100_000] {
        let parsed = parse_within(hostile::nested_rfc822("deep", depth), GENEROUS);
        assert_eq!(
            parsed.subject.as_deref(),
            Some("nested messages"),
            "{depth}"
        );
        assert_eq!(parsed.parse_error, None);
        assert_eq!(parsed.flags, [FLAG_MIME_TRUNCATED, FLAG_MIME_TOO_DEEP]);
        assert!(
            parsed.defects[0].contains("nested more than 128 levels deep"),
            "{:?}",
            parsed.defects
        );
        // Parsed down to the limit: one level per message, the message itself included.
        assert_eq!(parsed.mime_depth, 128);
        // The forwarded message is one attachment, its own bytes up to the cut.
        assert_eq!(parsed.attachments.len(), 1);
        let forwarded = &parsed.attachments[0];
        assert_eq!(forwarded.content_type, "message/rfc822");
        assert_eq!(forwarded.filename.as_deref(), Some("level 0.eml"));
        assert!(
            forwarded
                .bytes
                .starts_with(b"From: <level0@hostile.test>\r\n")
        );
    }
}

#[test]
fn rfc822_nesting_hidden_in_a_base64_part_parses_without_it() {
    let parsed = parse_within(hostile::nested_rfc822_base64("b64", 40_000), GENEROUS);
    assert_eq!(parsed.subject.as_deref(), Some("encoded nested messages"));
    assert_eq!(parsed.text_body.as_deref(), Some("see attached"));
    assert_eq!(parsed.flags, [FLAG_MIME_TRUNCATED, FLAG_MIME_TOO_DEEP]);
    assert_eq!(parsed.mime_depth, 2, "the multipart and its text part");
    assert!(parsed.attachments.is_empty(), "{:?}", parsed.attachments);
    assert!(parsed.defects[0].contains("nested more than 128 levels"));
}

#[test]
fn multipart_nested_100_000_deep_parses_and_is_flagged() {
    let parsed = parse_within(hostile::nested_multipart("mp", 100_000), GENEROUS);
    assert_eq!(parsed.subject.as_deref(), Some("nested multiparts"));
    assert!(
        parsed.flags.contains(&FLAG_MIME_TOO_DEEP),
        "{:?}",
        parsed.flags
    );
    // 100,000 levels are 100,000 parts: cut at the part limit, before the text.
    assert!(
        parsed.flags.contains(&FLAG_MIME_TRUNCATED),
        "{:?}",
        parsed.flags
    );
    assert_eq!(parsed.mime_depth, 20_000);

    let parsed = parse_within(hostile::nested_multipart("mp", 5_000), GENEROUS);
    assert_eq!(parsed.flags, [FLAG_MIME_TOO_DEEP]);
    assert_eq!(parsed.mime_depth, 5_001);
    assert_eq!(parsed.text_body.as_deref(), Some("deep"));
}

#[test]
fn html_nested_200_000_deep_is_kept_unsanitised_with_its_text() {
    let parsed = parse_within(hostile::nested_html("html", 200_000), GENEROUS);
    assert_eq!(parsed.flags, [FLAG_HTML_NOT_SANITIZED]);
    assert_eq!(parsed.html_sanitized, None);
    let html = parsed.html_body.as_deref().unwrap_or_default();
    assert!(
        html.starts_with("<html><body><div><div>"),
        "{}",
        &html[..40]
    );
    assert!(parsed.text_body.unwrap_or_default().contains("deep text"));
    assert!(
        parsed.defects[0].contains("nested more than 512 elements deep"),
        "{:?}",
        parsed.defects
    );
}

#[test]
fn part_flood_of_330_000_is_cut_at_20_000_parts_body_first() {
    let raw = hostile::part_flood("flood", 330_000, 36);
    assert!(raw.len() > 47_000_000, "{}", raw.len());
    let parsed = parse_within(raw, GENEROUS);
    assert_eq!(parsed.subject.as_deref(), Some("part flood"));
    assert_eq!(parsed.text_body.as_deref(), Some("the body comes first"));
    assert_eq!(parsed.flags, [FLAG_MIME_TRUNCATED]);
    // The multipart itself, the text body, then the attachments up to the limit.
    assert_eq!(parsed.attachments.len(), 19_998);
    let last = &parsed.attachments[19_997];
    assert_eq!(last.filename.as_deref(), Some("att-19997.bin"));
    assert_eq!(last.bytes, vec![b'x'; 36]);
    assert!(
        parsed.defects[0].contains("more than 20000 MIME parts"),
        "{:?}",
        parsed.defects
    );
}

#[test]
fn long_header_values_parse_whole() {
    let id = parse_within(hostile::long_message_id("id", 10_000, 7), GENEROUS);
    assert_eq!(
        id.message_id.map(|m| m.len()),
        Some(10_000 + "@hostile.test".len())
    );

    let subject = parse_within(hostile::long_subject("subj", 1_000_000), GENEROUS);
    let text = subject.subject.unwrap_or_default();
    assert!(
        text.len() > 990_000 && text.starts_with("SSSS"),
        "{}",
        text.len()
    );

    let crowd = parse_within(hostile::many_recipients("to", 100_000), GENEROUS);
    assert_eq!(crowd.to.len(), 100_001, "support@ plus the 100,000");
    assert_eq!(
        crowd.to[100_000].email.as_deref(),
        Some("user99999@recipients.test")
    );

    let thread = parse_within(hostile::many_references("refs", 5_000), GENEROUS);
    assert_eq!(thread.references.len(), 5_000);
    for parsed in [crowd, thread] {
        assert!(parsed.flags.is_empty(), "{:?}", parsed.flags);
    }
}

#[test]
fn hostile_attachment_names_become_safe_download_names() {
    let names = hostile::hostile_filenames();
    let parsed = parse(&hostile::filename_attacks("names", &names));
    let got: Vec<Option<String>> = parsed
        .attachments
        .iter()
        .map(|a| a.filename.clone())
        .collect();
    let long_a = format!("{}.pdf", "A".repeat(251));
    let long_e = format!("{}.pdf", "é".repeat(125));
    let expected: Vec<Option<&str>> = vec![
        Some("passwd"),
        Some("hosts"),
        Some("report.pdf"),
        Some("evil.bat"),
        Some("html.pdf"),
        Some("[31mred[0m.txt"),
        Some("invoicefdp.exe"),
        Some("zerowidth.doc"),
        Some("_CON"),
        Some("_nul.txt"),
        Some("_COM1.log"),
        None,
        None,
        Some("hidden"),
        Some("trailing.dots"),
        Some(&long_a),
        Some(&long_e),
    ];
    assert_eq!(got.len(), names.len());
    for ((name, got), expected) in names.iter().zip(&got).zip(&expected) {
        assert_eq!(got.as_deref(), *expected, "{name:?}");
    }
}

#[test]
fn tracking_pixels_relative_urls_and_css_urls_are_removed() {
    let parsed = parse(&hostile::html_trackers("html"));
    let safe = parsed.html_sanitized.unwrap_or_default();
    for gone in [
        "tracker.test",
        "images/relative.png",
        "../relative/link",
        "url(",
    ] {
        assert!(!safe.contains(gone), "{gone} survived: {safe}");
    }
    assert!(safe.contains("<img src=\"cid:logo@contoso\""), "{safe}");
    assert!(
        safe.contains("<a href=\"https://contoso.com/order/42\" rel=\"noopener noreferrer\">"),
        "{safe}"
    );
    // Received HTML is kept as it was, for the record.
    assert!(
        parsed
            .html_body
            .unwrap_or_default()
            .contains("tracker.test/pixel.gif")
    );
    assert_eq!(
        parsed.attachments[0].content_id.as_deref(),
        Some("logo@contoso")
    );
}

#[tokio::test]
async fn bounded_parse_matches_the_plain_parse() {
    let raw = hostile::html_trackers("same");
    let bounded = parse_bounded(raw.clone().into(), &ParseLimits::default()).await;
    assert_eq!(bounded, parse(&raw));
    let deep = hostile::nested_rfc822("deep", 40_000);
    let bounded = parse_bounded(deep.clone().into(), &ParseLimits::default()).await;
    assert_eq!(bounded, parse(&deep));
}

#[tokio::test]
async fn bounded_parse_past_its_budget_returns_the_headers_flagged() {
    let limits = ParseLimits {
        time_base: Duration::ZERO,
        time_per_mib: Duration::ZERO,
        ..ParseLimits::default()
    };
    let raw = hostile::part_flood("late", 330_000, 36);
    let parsed = parse_bounded(raw.into(), &limits).await;
    assert_eq!(parsed.flags, [FLAG_PARSE_TIMEOUT]);
    assert!(
        parsed
            .parse_error
            .as_deref()
            .is_some_and(|e| e.contains("did not finish within 0.0 s")),
        "{:?}",
        parsed.parse_error
    );
    assert_eq!(parsed.subject.as_deref(), Some("part flood"));
    assert_eq!(parsed.text_body, None);
    assert!(parsed.attachments.is_empty());
}

#[tokio::test]
async fn bounded_parse_with_too_many_abandoned_or_no_thread_parses_headers_only() {
    let raw = hostile::html_trackers("skip");
    let none_allowed = ParseLimits {
        max_abandoned: 0,
        ..ParseLimits::default()
    };
    let parsed = parse_bounded(raw.clone().into(), &none_allowed).await;
    assert_eq!(parsed.flags, [FLAG_PARSE_SKIPPED]);
    assert!(
        parsed
            .parse_error
            .unwrap_or_default()
            .contains("still being parsed")
    );
    assert_eq!(parsed.subject.as_deref(), Some("tracking html"));
    assert_eq!(parsed.html_body, None);

    // A stack no system can map: the thread cannot start, the message is not lost.
    let unstartable = ParseLimits {
        stack_bytes: 1 << 62,
        ..ParseLimits::default()
    };
    let parsed = parse_bounded(raw.into(), &unstartable).await;
    assert_eq!(parsed.flags, [FLAG_PARSE_SKIPPED]);
    assert!(
        parsed
            .parse_error
            .unwrap_or_default()
            .contains("no parse thread could be started"),
    );
    assert_eq!(parsed.subject.as_deref(), Some("tracking html"));
}

/// The generators themselves (the parser's tests above use them on ccmail's side).
mod generators {
    use ccmail_lab::sim::hostile::*;
    use ccmail_lab::sim::mailgen::marker;

    #[test]
    fn every_generator_carries_the_marker_and_the_intended_size() {
        let names = hostile_filenames();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("nested_rfc822", nested_rfc822("m1", 40_000)),
            ("nested_rfc822_base64", nested_rfc822_base64("m2", 1_000)),
            ("nested_multipart", nested_multipart("m3", 100)),
            ("part_flood", part_flood("m4", 330_000, 36)),
            ("long_message_id", long_message_id("m5", 10_000, 1)),
            ("long_subject", long_subject("m6", 1_000_000)),
            ("many_recipients", many_recipients("m7", 100_000)),
            ("many_references", many_references("m8", 5_000)),
            ("filename_attacks", filename_attacks("m9", &names)),
            ("nested_html", nested_html("m10", 200_000)),
            ("html_trackers", html_trackers("m11")),
        ];
        for (i, (name, raw)) in cases.iter().enumerate() {
            assert_eq!(
                marker(raw).as_deref(),
                Some(format!("m{}", i + 1).as_str()),
                "{name}"
            );
            assert!(
                raw.windows(2)
                    .filter(|w| w[1] == b'\n')
                    .all(|w| w[0] == b'\r'),
                "{name}: bare LF"
            );
        }
        let size = |name: &str| cases.iter().find(|c| c.0 == name).map(|c| c.1.len());
        assert!(size("nested_rfc822").is_some_and(|n| (3_000_000..3_800_000).contains(&n)));
        assert!(size("part_flood").is_some_and(|n| (40_000_000..56_000_000).contains(&n)));
        assert!(size("long_subject").is_some_and(|n| n > 1_000_000));
        assert!(size("nested_html").is_some_and(|n| (2_100_000..2_400_000).contains(&n)));
    }

    #[test]
    fn generators_are_deterministic() {
        assert_eq!(long_message_id("m", 100, 3), long_message_id("m", 100, 3));
        assert_ne!(long_message_id("m", 100, 3), long_message_id("m", 100, 4));
    }
}
