//! Wall time and peak memory of parsing each hostile message, for RELIABILITY.md.
//!
//! `cargo run --example hostile_figures [CASE…]` prints a Markdown table. Each case runs in
//! a child process of its own (peak RSS is the child's `VmHWM`, which includes the generated
//! input, so the RSS before parsing is shown too), under `ulimit -v 8 GiB` and `timeout 120`,
//! parsing on a thread with a 2 MiB stack, as the poller's blocking pool does. A crash or a
//! timeout is reported as such. Figures, not assertions: nothing here fails on a number.

use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use ccmail::ingest::parse::parse;
use ccmail_lab::sim::hostile;

const CASES: &[&str] = &[
    "rfc822_40k",
    "rfc822_100k",
    "rfc822_base64_40k",
    "multipart_5k",
    "multipart_100k",
    "div_200k",
    "parts_330k",
    "subject_1mb",
    "to_100k",
    "message_id_10k",
    "references_5k",
    "header_fields_1m",
    "base64_attachment_48mb",
    "koi8_text_48mb",
    "thai_text_48mb",
    "html_48mb",
    "html_4mb_235k_elements",
    "html_480_blocks_500_deep",
];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        let case = args.get(2).context("child needs a case")?;
        return child(case);
    }
    let wanted: Vec<&str> = if args.len() > 1 {
        args[1..].iter().map(String::as_str).collect()
    } else {
        CASES.to_vec()
    };
    let exe = std::env::current_exe()?;
    println!("| case | raw MB | RSS before parse MiB | peak RSS MiB | parse s | result |");
    println!("|---|---|---|---|---|---|");
    for case in wanted {
        let started = Instant::now();
        let output = Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 8388608; exec timeout 120 \"$0\" child \"$1\"")
            .arg(&exe)
            .arg(case)
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        match stdout.lines().find(|l| l.starts_with('|')) {
            Some(row) if output.status.success() => println!("{row}"),
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let cause = match output.status.code() {
                    Some(124) => "timeout: killed after 120 s".to_owned(),
                    Some(code) => format!("exit {code}"),
                    None => "killed by a signal".to_owned(),
                };
                let detail = stderr
                    .lines()
                    .filter(|l| l.contains("overflow") || l.contains("memory"))
                    .take(1)
                    .collect::<String>();
                println!(
                    "| {case} | | | | {:.1} | {cause} {detail} |",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn child(case: &str) -> anyhow::Result<()> {
    let raw = generate(case)?;
    let before = status_kib("VmRSS")?;
    let len = raw.len();
    let started = Instant::now();
    let summary = std::thread::Builder::new()
        .stack_size(2 * 1024 * 1024)
        .spawn(move || {
            let parsed = parse(&raw);
            format!(
                "{} attachments, text {} B, html sanitised: {}, error: {}",
                parsed.attachments.len(),
                parsed.text_body.as_ref().map_or(0, String::len),
                parsed.html_sanitized.is_some(),
                parsed.parse_error.is_some(),
            )
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("the parse thread panicked"))?;
    let secs = started.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM")?;
    println!(
        "| {case} | {:.1} | {:.0} | {:.0} | {secs:.2} | {summary} |",
        len as f64 / 1e6,
        before as f64 / 1024.0,
        peak as f64 / 1024.0,
    );
    Ok(())
}

fn status_kib(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unreadable {line}"))?;
    Ok(kib)
}

fn generate(case: &str) -> anyhow::Result<Vec<u8>> {
    Ok(match case {
        "rfc822_40k" => hostile::nested_rfc822("fig", 40_000),
        "rfc822_100k" => hostile::nested_rfc822("fig", 100_000),
        "rfc822_base64_40k" => hostile::nested_rfc822_base64("fig", 40_000),
        "multipart_5k" => hostile::nested_multipart("fig", 5_000),
        "multipart_100k" => hostile::nested_multipart("fig", 100_000),
        "div_200k" => hostile::nested_html("fig", 200_000),
        "parts_330k" => hostile::part_flood("fig", 330_000, 36),
        "subject_1mb" => hostile::long_subject("fig", 1_000_000),
        "to_100k" => hostile::many_recipients("fig", 100_000),
        "message_id_10k" => hostile::long_message_id("fig", 10_000, 1),
        "references_5k" => hostile::many_references("fig", 5_000),
        "header_fields_1m" => {
            let mut raw = b"Subject: many fields\r\n".to_vec();
            for _ in 0..1_000_000 {
                raw.extend_from_slice(b"a:b\r\n");
            }
            raw.extend_from_slice(b"\r\nbody\r\n");
            raw
        }
        "base64_attachment_48mb" => large_attachment(36_000_000),
        "koi8_text_48mb" => large_text(48_000_000, "koi8-r", 0xC0),
        "thai_text_48mb" => large_text(48_000_000, "windows-874", 0xA1),
        "html_48mb" => large_html(
            48_000_000,
            "<p>Lorem ipsum dolor sit amet, <b>consectetur</b></p>\r\n",
        ),
        "html_4mb_235k_elements" => large_html(4_000_000, "<i>abcdefghij</i><br>abcdefghijk\r\n"),
        // Within the sanitiser's caps, as slow as it gets: 240,000 elements 500 deep.
        "html_480_blocks_500_deep" => {
            let block = format!("{}x{}", "<div>".repeat(500), "</div>".repeat(500));
            large_html(2_640_000, &block)
        }
        other => anyhow::bail!("unknown case {other}; cases: {}", CASES.join(", ")),
    })
}

const HEAD: &str = "From: a@example.com\r\nTo: support@contoso.com\r\nSubject: large\r\n\
MIME-Version: 1.0\r\n";

/// A text body and one base64 attachment of `size` bytes (its encoding is 4/3 larger).
fn large_attachment(size: usize) -> Vec<u8> {
    use base64::Engine as _;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut out = format!(
        "{HEAD}Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n\
Content-Type: text/plain\r\n\r\nsee attached\r\n--b\r\nContent-Type: application/pdf\r\n\
Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"big.pdf\"\r\n\r\n"
    )
    .into_bytes();
    for line in encoded.as_bytes().chunks(76) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--b--\r\n");
    out
}

/// A text body of `size` bytes in a single-byte `charset`, letters from `first` on: each
/// becomes two (Cyrillic) or three (Thai) UTF-8 bytes.
fn large_text(size: usize, charset: &str, first: u8) -> Vec<u8> {
    let mut out = format!("{HEAD}Content-Type: text/plain; charset={charset}\r\n\r\n").into_bytes();
    let line: Vec<u8> = (0..70)
        .map(|i| first + (i % 32) as u8)
        .chain(*b"\r\n")
        .collect();
    while out.len() < size {
        out.extend_from_slice(&line);
    }
    out
}

/// An HTML-only body of `size` bytes repeating `unit`.
fn large_html(size: usize, unit: &str) -> Vec<u8> {
    let mut out =
        format!("{HEAD}Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>").into_bytes();
    while out.len() < size {
        out.extend_from_slice(unit.as_bytes());
    }
    out.extend_from_slice(b"</body></html>\r\n");
    out
}
