//! The awkward-mail corpus: real-world-shaped messages that break naive parsers and stores
//! (empty and whitespace-only messages, binary garbage, truncations, 100 000 header lines,
//! deep MIME nesting, NUL bytes, invalid UTF-8 in every header, bare CR / LF line endings,
//! floods of parts, addresses, parameters and encoded words, hostile HTML …).
//!
//! The files are committed under `tests/fixtures/awkward/` so the corpus is visible and
//! stable; this module is their generator. A test checks that the files are exactly what the
//! generator writes; after an intended change run
//! `UPDATE_AWKWARD=1 cargo test --test it awkward_corpus_files` and commit the result.

use std::fmt::Write as _;
use std::path::PathBuf;

/// One corpus message.
pub struct Awkward {
    /// File name under `tests/fixtures/awkward/`.
    pub name: &'static str,
    pub raw: Vec<u8>,
    /// Whether its work item must carry the `parse_error` flag (`None`: either is right).
    pub flagged: Option<bool>,
}

/// Where the corpus is committed.
pub fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/awkward")
}

const HEAD: &str = "From: Anna Example <anna@example.com>\r\n\
To: support@contoso.test\r\n\
Date: Tue, 04 Jun 2024 09:12:00 +0200\r\n\
MIME-Version: 1.0\r\n";

fn message(name: &'static str, flagged: Option<bool>, raw: impl Into<Vec<u8>>) -> Awkward {
    Awkward {
        name,
        raw: raw.into(),
        flagged,
    }
}

fn with_head(subject: &str, rest: &str) -> Vec<u8> {
    format!("{HEAD}Subject: {subject}\r\nMessage-ID: <awkward@example.com>\r\n{rest}").into_bytes()
}

/// The corpus, in a fixed order. Deterministic: the same bytes on every call.
pub fn corpus() -> Vec<Awkward> {
    let mut rng = fastrand::Rng::with_seed(0xA3C0_2025);
    let mut all = Vec::new();

    all.push(message("empty.eml", Some(true), Vec::new()));
    all.push(message(
        "blank_lines_only.eml",
        Some(true),
        b"\r\n\r\n\r\n\r\n".to_vec(),
    ));
    let garbage: Vec<u8> = std::iter::once(0u8)
        .chain((0..4095).map(|_| rng.u8(..)))
        .collect();
    all.push(message("binary_garbage.eml", Some(true), garbage));
    all.push(message(
        "no_header_section.eml",
        Some(true),
        b"Hello,\r\nplease call me back about order 8841.\r\nThanks, Anna\r\n".to_vec(),
    ));
    all.push(message(
        "mbox_from_line_first.eml",
        Some(true),
        [
            &b"From anna@example.com Tue Jun  4 09:12:00 2024\r\n"[..],
            &with_head("mbox", "\r\nExported from a mailbox file.\r\n"),
        ]
        .concat(),
    ));
    all.push(message(
        "headers_without_body.eml",
        None,
        format!("{HEAD}Subject: headers only, no blank line, no final newline"),
    ));
    all.push(message(
        "truncated_mid_header.eml",
        None,
        "From: Anna Example <anna@example.com>\r\nTo: support@contoso.test\r\nSubj",
    ));

    // A multipart cut inside a base64 attachment: no closing boundaries.
    let mut cut = with_head(
        "truncated attachment",
        "Content-Type: multipart/mixed; boundary=\"cut\"\r\n\r\n--cut\r\n\
         Content-Type: text/plain\r\n\r\nSee the attached invoice.\r\n--cut\r\n\
         Content-Type: application/pdf; name=\"invoice.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n",
    );
    for _ in 0..40 {
        let line: String = (0..76)
            .map(|_| {
                char::from(
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                        [rng.usize(..64)],
                )
            })
            .collect();
        cut.extend_from_slice(line.as_bytes());
        cut.extend_from_slice(b"\r\n");
    }
    cut.extend_from_slice(b"JVBERi0xLj");
    all.push(message("truncated_base64_attachment.eml", None, cut));

    // 100 000 header lines before the real ones.
    let mut many = Vec::with_capacity(700_000);
    for i in 0..100_000u32 {
        many.extend_from_slice(format!("X:{}\r\n", i % 10).as_bytes());
    }
    many.extend_from_slice(&with_head(
        "one hundred thousand header lines",
        "\r\nbody\r\n",
    ));
    all.push(message("many_header_lines.eml", Some(false), many));

    let huge_subject = "Sehr geehrte Damen und Herren ".repeat(3_000);
    all.push(message(
        "one_huge_header_line.eml",
        Some(false),
        with_head(
            &huge_subject,
            "\r\nA subject of 90 000 characters on one line.\r\n",
        ),
    ));
    let long_line = "0123456789".repeat(20_000);
    all.push(message(
        "long_body_line.eml",
        Some(false),
        with_head(
            "long line",
            &format!("Content-Type: text/plain\r\n\r\n{long_line}"),
        ),
    ));

    // 1 000 nested multiparts, each opening the next.
    let depth = 1_000;
    let mut nested = String::from("Content-Type: multipart/mixed; boundary=\"b0\"\r\n\r\n");
    for level in 0..depth {
        let _ = write!(
            nested,
            "--b{level}\r\nContent-Type: multipart/mixed; boundary=\"b{}\"\r\n\r\n",
            level + 1
        );
    }
    let _ = write!(
        nested,
        "--b{depth}\r\nContent-Type: text/plain\r\n\r\ndeep inside\r\n"
    );
    for level in (0..=depth).rev() {
        let _ = write!(nested, "--b{level}--\r\n");
    }
    all.push(message(
        "deep_multipart_nesting.eml",
        None,
        with_head("deep multipart", &nested),
    ));

    // 100 forwarded messages inside each other.
    let mut inner =
        "Subject: innermost\r\nFrom: x@example.com\r\n\r\nthe original text\r\n".to_owned();
    for level in 0..100 {
        inner = format!(
            "Subject: Fwd {level}\r\nFrom: fwd{level}@example.com\r\n\
             Content-Type: message/rfc822\r\n\r\n{inner}"
        );
    }
    all.push(message(
        "deep_rfc822_nesting.eml",
        None,
        with_head(
            "deep forward",
            &format!("Content-Type: message/rfc822\r\n\r\n{inner}"),
        ),
    ));

    let mut parts = String::from("Content-Type: multipart/mixed; boundary=\"p\"\r\n\r\n");
    for i in 0..2_000 {
        let _ = write!(
            parts,
            "--p\r\nContent-Type: application/octet-stream; name=\"f{i}.bin\"\r\n\
             Content-Disposition: attachment\r\n\r\n{i}\r\n"
        );
    }
    parts.push_str("--p--\r\n");
    all.push(message(
        "many_parts.eml",
        None,
        with_head("2000 parts", &parts),
    ));

    all.push(message(
        "nul_bytes.eml",
        None,
        b"From: An\0na <anna\0@example.com>\r\nTo: support@contoso.test\r\n\
Subject: nul\0 in the subject\r\nMessage-ID: <nul\0@example.com>\r\n\
Content-Type: multipart/mixed; boundary=\"n\"\r\n\r\n--n\r\nContent-Type: text/plain\r\n\r\n\
body with \0 NUL \0\0 bytes\r\n--n\r\nContent-Type: text/plain; name=\"a\0b.txt\"\r\n\
Content-Disposition: attachment; filename=\"a\0b.txt\"\r\n\r\n\0\0\0\r\n--n--\r\n"
            .to_vec(),
    ));

    let mut spoiled = Vec::new();
    for header in [
        "From: J\u{fc}rgen <juergen@example.com>",
        "To: support@contoso.test",
        "Cc: Kollege <kollege@example.com>",
        "Reply-To: juergen@example.com",
        "Subject: Lieferung",
        "Date: Tue, 04 Jun 2024 09:12:00 +0200",
        "Message-ID: <spoiled@example.com>",
        "In-Reply-To: <earlier@example.com>",
        "References: <earlier@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ] {
        let (name, value) = header.split_once(": ").unwrap_or((header, ""));
        spoiled.extend_from_slice(name.as_bytes());
        spoiled.extend_from_slice(b": \xff\xfe\xc3\x28 ");
        spoiled.extend_from_slice(value.as_bytes());
        spoiled.extend_from_slice(b" \xe2\x82\r\n");
    }
    spoiled.extend_from_slice(b"\r\nGr\xfc\xdfe \xc3\x28 invalid UTF-8 in the body too\r\n");
    all.push(message(
        "invalid_utf8_every_header.eml",
        Some(false),
        spoiled,
    ));

    all.push(message(
        "bare_lf.eml",
        Some(false),
        "From: a@example.com\nSubject: bare LF\nContent-Type: text/plain\n\nline one\nline two\n",
    ));
    all.push(message(
        "bare_cr.eml",
        None,
        "From: a@example.com\rSubject: bare CR\rContent-Type: text/plain\r\rline one\rline two\r",
    ));
    all.push(message(
        "mixed_line_endings.eml",
        Some(false),
        "From: a@example.com\r\nSubject: mixed\nContent-Type: text/plain\r\n\nCRLF\r\nLF\nCR\rend\r\n",
    ));
    all.push(message(
        "dot_lines.eml",
        Some(false),
        with_head(
            "dots",
            "Content-Type: text/plain\r\n\r\n.\r\n..\r\n...\r\n. \r\n.\r\n\r\n.\r\n.end\r\n",
        ),
    ));

    let mut dup = String::new();
    for i in 0..50 {
        let _ = write!(
            dup,
            "From: sender{i} <s{i}@example.com>\r\nSubject: duplicate {i}\r\n\
             Content-Type: text/{}\r\n",
            if i % 2 == 0 { "plain" } else { "html" }
        );
    }
    dup.push_str("\r\n<p>which one?</p>\r\n");
    all.push(message("duplicate_headers.eml", Some(false), dup));

    all.push(message(
        "bad_charsets_and_encodings.eml",
        None,
        with_head(
            "=?x-unknown?B?###?= =?utf-8?Q?caf=C3=A9?= =?utf-8?B?invalid base64?=",
            "Content-Type: multipart/mixed; boundary=\"e\"\r\n\r\n--e\r\n\
             Content-Type: text/plain; charset=x-unknown-charset\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\r\nbroken =ZZ escapes =\r\nand a soft break=\r\n\
             --e\r\nContent-Type: text/plain; charset=utf-16\r\n\
             Content-Transfer-Encoding: base64\r\n\r\nAAEC=\r\n\
             --e\r\nContent-Type: application/octet-stream\r\n\
             Content-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 x\r\nend\r\n--e--\r\n",
        ),
    ));

    let words: Vec<String> = (0..5_000)
        .map(|i| format!("=?utf-8?B?{}?=", ["w6k=", "4pyT", "8J+Ygg=="][i % 3]))
        .collect();
    all.push(message(
        "encoded_word_flood.eml",
        Some(false),
        with_head(&words.join(" "), "\r\nsubject of 5 000 encoded words\r\n"),
    ));

    let addresses: Vec<String> = (0..5_000).map(|i| format!("u{i}@example.com")).collect();
    all.push(message(
        "address_flood.eml",
        Some(false),
        format!(
            "From: Anna <anna@example.com>\r\nTo: {}\r\nSubject: 5000 recipients\r\n\r\nhi\r\n",
            addresses.join(", ")
        ),
    ));

    all.push(message(
        "boundary_chaos.eml",
        None,
        with_head(
            "boundaries",
            "Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\nContent-Type: text/plain\r\n\r\n\
             empty boundary\r\n--\r\n\
             Content-Type: multipart/alternative\r\n\r\nno boundary parameter\r\n------\r\n--x--\r\n",
        ),
    ));

    let params: String = (0..2_000).map(|i| format!("; p{i}=\"v{i}\"")).collect();
    all.push(message(
        "content_type_parameter_flood.eml",
        Some(false),
        with_head(
            "parameters",
            &format!("Content-Type: text/plain{params}\r\n\r\nbody\r\n"),
        ),
    ));

    let html = format!(
        "<html><body onload=\"steal()\"><script>alert(1)</script>{}deep{}\
         <img src=\"http://tracker.example/p.gif\"><a href=\"javascript:alert(2)\">x</a></body></html>",
        "<div>".repeat(10_000),
        "</div>".repeat(10_000)
    );
    all.push(message(
        "html_hostile.eml",
        Some(false),
        with_head(
            "hostile html",
            &format!("Content-Type: text/html; charset=utf-8\r\n\r\n{html}\r\n"),
        ),
    ));

    all.push(message(
        "date_and_address_garbage.eml",
        Some(false),
        "From: <<<@@@>>> \"unterminated\r\nTo: ,,,;;;:@\r\nDate: 99 Foo 99999 99:99:99 +9999\r\n\
         Subject: garbage values\r\nMessage-ID: no brackets at all\r\nReferences: <a> <b <c>>\r\n\r\nbody\r\n",
    ));
    all
}

/// The bytes the POP3 simulator serves for `raw` (and so the bytes ccmail stores).
pub use ccmail_lab::sim::pop3::as_served;
