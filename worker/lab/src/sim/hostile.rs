//! Hostile mail: messages an outsider can send to a pilot address to crash, stall or balloon
//! a parser. Used by the parser's tests, the pipeline tests and the figures in RELIABILITY.md.
//!
//! Every generator is a pure function of its parameters (random content comes from a seed)
//! and returns the message bytes. Invariants:
//! * every message carries the caller's `X-Ccmail-Marker` header in its top-level header
//!   section (read back with `mailgen::marker`), so a pipeline test can check
//!   that each one is stored exactly once;
//! * unless the attack is the `Message-ID` itself, the `Message-ID` is `<MARKER@hostile.test>`;
//! * lines end in CRLF; generation is linear in the output size (a 48 MB part flood takes well
//!   under a second in a release build).
//!
//! The file must stay self-contained (std and base64 only): ccmail's parser unit tests include
//! it with `#[path]`, since the product cannot depend on the lab.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// File names that must not reach a download dialog as written: directory traversal, CR LF
/// (header injection), terminal escapes, right-to-left override (`exe` shown as `txt`),
/// Windows device names, dots only, and a 5,000-character name.
pub fn hostile_filenames() -> Vec<String> {
    vec![
        "../../etc/passwd".to_owned(),
        "..\\..\\windows\\system32\\drivers\\etc\\hosts".to_owned(),
        "/absolute/path/report.pdf".to_owned(),
        "C:\\Users\\Public\\evil.bat".to_owned(),
        "invoice\r\nContent-Type: text/html.pdf".to_owned(),
        "\u{1b}[31mred\u{1b}[0m.txt".to_owned(),
        "invoice\u{202e}fdp.exe".to_owned(),
        "zero\u{200b}width\u{feff}.doc".to_owned(),
        "CON".to_owned(),
        "nul.txt".to_owned(),
        "COM1.log".to_owned(),
        "...".to_owned(),
        " . . ".to_owned(),
        ".hidden".to_owned(),
        "trailing.dots...".to_owned(),
        format!("{}.pdf", "A".repeat(5_000)),
        format!("{}.pdf", "é".repeat(3_000)),
    ]
}

/// The top-level header lines every generator starts with (without the blank line).
fn top_headers(out: &mut Vec<u8>, marker: &str, subject: &str) {
    out.extend_from_slice(b"From: Mallory <mallory@hostile.test>\r\n");
    out.extend_from_slice(b"To: support@contoso.com\r\n");
    out.extend_from_slice(format!("Subject: {subject}\r\n").as_bytes());
    out.extend_from_slice(format!("Message-ID: <{marker}@hostile.test>\r\n").as_bytes());
    out.extend_from_slice(b"Date: Tue, 14 May 2024 09:30:00 +0000\r\n");
    out.extend_from_slice(format!("X-Ccmail-Marker: {marker}\r\n").as_bytes());
    out.extend_from_slice(b"MIME-Version: 1.0\r\n");
}

/// `message/rfc822` nested `depth` levels deep without transfer encoding, each level with its
/// own sender and subject; the innermost message is a short text. About 85 bytes per level:
/// 40,000 levels are 3.4 MB.
pub fn nested_rfc822(marker: &str, depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 90 + 512);
    top_headers(&mut out, marker, "nested messages");
    out.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    nested_levels(&mut out, depth.saturating_sub(1));
    out
}

/// The inner levels of [`nested_rfc822`]: `levels` headers-only wrappers, then a text message.
fn nested_levels(out: &mut Vec<u8>, levels: usize) {
    for level in 0..levels {
        out.extend_from_slice(
            format!(
                "From: <level{level}@hostile.test>\r\nSubject: level {level}\r\n\
Content-Type: message/rfc822\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"Subject: innermost\r\nContent-Type: text/plain\r\n\r\ndeep\r\n");
}

/// A base64-encoded `message/rfc822` part whose decoded content is `depth` levels of unencoded
/// `message/rfc822` nesting. The nesting is invisible in the raw bytes.
pub fn nested_rfc822_base64(marker: &str, depth: usize) -> Vec<u8> {
    let mut inner = Vec::with_capacity(depth * 90 + 128);
    nested_levels(&mut inner, depth);
    let mut out = Vec::with_capacity(inner.len() * 4 / 3 + inner.len() / 38 + 1024);
    top_headers(&mut out, marker, "encoded nested messages");
    out.extend_from_slice(b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n");
    out.extend_from_slice(b"--outer\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n");
    out.extend_from_slice(
        b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n",
    );
    base64_lines(&mut out, &inner);
    out.extend_from_slice(b"--outer--\r\n");
    out
}

/// `multipart/mixed` nested `depth` levels deep, every level closed properly, a text part at
/// the bottom.
pub fn nested_multipart(marker: &str, depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 80 + 512);
    top_headers(&mut out, marker, "nested multiparts");
    for level in 0..depth {
        out.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n")
                .as_bytes(),
        );
    }
    out.extend_from_slice(b"Content-Type: text/plain\r\n\r\ndeep\r\n");
    for level in (0..depth).rev() {
        out.extend_from_slice(format!("--b{level}--\r\n").as_bytes());
    }
    out
}

/// A text body followed by `parts` tiny attachments (`att-N.bin`, each `payload` bytes of
/// text). 330,000 parts of 36 bytes are about 48 MB.
pub fn part_flood(marker: &str, parts: usize, payload: usize) -> Vec<u8> {
    let body = vec![b'x'; payload];
    let mut out = Vec::with_capacity(parts * (payload + 130) + 512);
    top_headers(&mut out, marker, "part flood");
    out.extend_from_slice(b"Content-Type: multipart/mixed; boundary=\"f\"\r\n\r\n");
    out.extend_from_slice(b"--f\r\nContent-Type: text/plain\r\n\r\nthe body comes first\r\n");
    for i in 0..parts {
        out.extend_from_slice(
            format!(
                "--f\r\nContent-Type: application/octet-stream\r\n\
Content-Disposition: attachment; filename=\"att-{i}.bin\"\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--f--\r\n");
    out
}

/// A `Message-ID` of `len` random letters and digits (seeded), e.g. 10,000.
pub fn long_message_id(marker: &str, len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let id: String = (0..len).map(|_| rng.alphanumeric()).collect();
    let mut out = Vec::with_capacity(len + 512);
    out.extend_from_slice(b"From: Mallory <mallory@hostile.test>\r\nTo: support@contoso.com\r\n");
    out.extend_from_slice(b"Subject: long message id\r\n");
    out.extend_from_slice(format!("Message-ID: <{id}@hostile.test>\r\n").as_bytes());
    out.extend_from_slice(format!("X-Ccmail-Marker: {marker}\r\n").as_bytes());
    out.extend_from_slice(b"\r\nbody\r\n");
    out
}

/// A subject of `len` bytes, folded into 76-character lines (a 1 MB subject is one header).
pub fn long_subject(marker: &str, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + len / 70 * 3 + 512);
    top_headers(&mut out, marker, "long subject follows");
    out.extend_from_slice(b"Subject:");
    let mut written = 0;
    while written < len {
        let n = (len - written).min(75);
        out.extend_from_slice(b" ");
        out.extend(std::iter::repeat_n(b'S', n.saturating_sub(1)));
        out.extend_from_slice(b"\r\n");
        written += n;
    }
    out.extend_from_slice(b"\r\nbody\r\n");
    out
}

/// One `To` header listing `count` addresses, folded one per line (100,000 are 3.3 MB).
pub fn many_recipients(marker: &str, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * 34 + 512);
    top_headers(&mut out, marker, "many recipients");
    out.extend_from_slice(b"To: ");
    for i in 0..count {
        if i > 0 {
            out.extend_from_slice(b",\r\n ");
        }
        out.extend_from_slice(format!("user{i}@recipients.test").as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\nbody\r\n");
    out
}

/// A `References` header with `count` message ids, one per folded line.
pub fn many_references(marker: &str, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * 32 + 512);
    top_headers(&mut out, marker, "many references");
    out.extend_from_slice(b"References:");
    for i in 0..count {
        out.extend_from_slice(format!(" <ref{i}@thread.test>\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\nbody\r\n");
    out
}

/// A text body and one small attachment per file name, each name given as a quoted
/// `filename` parameter (RFC 2231 percent-encoded when it contains CR, LF, `"` or non-ASCII,
/// as a sender's client would write it).
pub fn filename_attacks(marker: &str, names: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(names.iter().map(|n| n.len() * 3 + 200).sum::<usize>() + 512);
    top_headers(&mut out, marker, "file names");
    out.extend_from_slice(b"Content-Type: multipart/mixed; boundary=\"n\"\r\n\r\n");
    out.extend_from_slice(b"--n\r\nContent-Type: text/plain\r\n\r\nfiles attached\r\n");
    for (i, name) in names.iter().enumerate() {
        let plain = name
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        let param = if plain {
            format!("filename=\"{name}\"")
        } else {
            let encoded: String = name
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b".-_".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            format!("filename*=utf-8''{encoded}")
        };
        out.extend_from_slice(
            format!(
                "--n\r\nContent-Type: application/octet-stream\r\n\
Content-Disposition: attachment; {param}\r\n\r\nfile {i}\r\n"
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"--n--\r\n");
    out
}

/// An HTML-only message with `depth` nested `<div>` elements around one line of text
/// (200,000 levels are 2.2 MB).
pub fn nested_html(marker: &str, depth: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(depth * 11 + 512);
    top_headers(&mut out, marker, "nested html");
    out.extend_from_slice(b"Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>");
    for _ in 0..depth {
        out.extend_from_slice(b"<div>");
    }
    out.extend_from_slice(b"deep text");
    for _ in 0..depth {
        out.extend_from_slice(b"</div>");
    }
    out.extend_from_slice(b"</body></html>\r\n");
    out
}

/// HTML that phones home or reaches outside the message: a remote tracking pixel, a relative
/// `src`, CSS `url()` in a style attribute and a `<style>` element, a protocol-relative image,
/// plus a legitimate `cid:` image and a link. The `cid:` part is attached inline.
pub fn html_trackers(marker: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2048);
    top_headers(&mut out, marker, "tracking html");
    out.extend_from_slice(b"Content-Type: multipart/related; boundary=\"r\"\r\n\r\n");
    out.extend_from_slice(b"--r\r\nContent-Type: text/html; charset=utf-8\r\n\r\n");
    out.extend_from_slice(
        b"<html><head><style>body { background: url(https://tracker.test/css.png) }</style>\
</head><body>\r\n\
<p style=\"background-image: url('https://tracker.test/bg.png')\">Hello</p>\r\n\
<img src=\"https://tracker.test/pixel.gif?u=42\" width=\"1\" height=\"1\">\r\n\
<img src=\"//tracker.test/proto-relative.gif\">\r\n\
<img src=\"images/relative.png\">\r\n\
<img src=\"cid:logo@contoso\" alt=\"logo\">\r\n\
<a href=\"https://contoso.com/order/42\">your order</a>\r\n\
<a href=\"../relative/link\">relative link</a>\r\n\
</body></html>\r\n",
    );
    out.extend_from_slice(
        b"--r\r\nContent-Type: image/png\r\nContent-ID: <logo@contoso>\r\n\
Content-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\n",
    );
    base64_lines(&mut out, b"\x89PNG\r\n\x1a\nlogo");
    out.extend_from_slice(b"--r--\r\n");
    out
}

fn base64_lines(out: &mut Vec<u8>, data: &[u8]) {
    let encoded = B64.encode(data);
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
}
