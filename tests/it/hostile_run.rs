//! `ccmail run` (the real binary, as a child process) with one pilot fed every hostile message
//! and hostile UIDL listing there is, beside a pilot receiving ordinary mail: the other pilot
//! keeps being served, every message is stored exactly once, the process survives, and its
//! peak memory stays under the bound RELIABILITY.md states.

use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail_lab::sim::hostile;
use secrecy::ExposeSecret;

use crate::support::child::CcmailChild;
use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld};
use crate::support::wait::poll;

const MIB: u64 = 1024 * 1024;
/// "Not blocked" bounds, generous for a busy 2-core machine; not timing goals.
const SERVED_WITHIN: Duration = Duration::from_secs(60);
const DRAINED_WITHIN: Duration = Duration::from_secs(300);

/// Every hostile message the parser and the store are defended against, each with its marker.
fn hostile_mail() -> Vec<Vec<u8>> {
    vec![
        hostile::nested_rfc822("rfc822-40k", 40_000),
        hostile::nested_rfc822("rfc822-100k", 100_000),
        hostile::nested_rfc822_base64("rfc822-base64-40k", 40_000),
        hostile::nested_multipart("multipart-5k", 5_000),
        hostile::nested_html("div-200k", 200_000),
        hostile::part_flood("parts-330k", 330_000, 36),
        hostile::long_message_id("message-id-10k", 10_000, 7),
        hostile::long_subject("subject-1mb", 1_000_000),
        hostile::many_recipients("to-100k", 100_000),
        hostile::many_references("references-5k", 5_000),
        hostile::filename_attacks("filenames", &hostile::hostile_filenames()),
        hostile::html_trackers("trackers"),
    ]
}

fn plain(marker: &str) -> Vec<u8> {
    format!(
        "From: Ann <ann@example.net>\r\nTo: bystander@{DOMAIN}\r\nSubject: {marker}\r\n\
         Message-ID: <{marker}@example.net>\r\nDate: Tue, 03 Nov 2026 10:00:00 +0000\r\n\
         X-Ccmail-Marker: {marker}\r\n\r\nAn ordinary question.\r\n"
    )
    .into_bytes()
}

/// The child's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kib * 1024)
}

/// RELIABILITY.md, "Memory": a pilot's peak is at most `max(7n + 175 MiB, 410 MiB)` for its
/// largest message of `n` octets (a message of 1 MiB or more is parsed and committed alone:
/// the parser's `5n + 175 MiB` plus the bytes handed to PostgreSQL; smaller ones share at most
/// three parses of `≤ 120 MiB` and three batches of `worker.batch_bytes`), and the process adds
/// its base.
fn pilot_bound(largest_message: u64) -> u64 {
    (7 * largest_message + 175 * MIB).max(410 * MIB)
}

const PROCESS_BASE: u64 = 64 * MIB;

#[tokio::test]
async fn run_keeps_serving_other_pilots_while_one_is_fed_every_hostile_message()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let victim = world.add_pilot("victim", |_| {}).await?;
    let bystander = world.add_pilot("bystander", |_| {}).await?;
    let mut ledger = Ledger::default();
    let mut largest = 0u64;
    for raw in hostile_mail() {
        largest = largest.max(raw.len() as u64);
        ledger.deliver(&world.pop, &victim.mailbox, raw)?;
    }
    // And a listing no UIDL of which can be trusted as written.
    for (uidl, marker) in [
        ("SHARED", "shared-1"),
        ("SHARED", "shared-2"),
        ("with space", "space"),
        ("esc\u{1b}[2J", "escape"),
    ] {
        let raw = plain(marker);
        ledger.note(&raw)?;
        world.pop.deliver_with_uidl(&victim.mailbox, uidl, raw);
    }

    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\nlease_ttl_secs = 3\nshutdown_grace_secs = 10\n\
             initial_backoff_secs = 1\nmax_backoff_secs = 2\npoll_jitter = 0.0\n\n\
             [pop3]\nallowed_xoauth2_hosts = [\"127.0.0.1\"]\n\n\
             [oauth]\nextra_ca_file = {:?}\nallowed_authorities = [{:?}]\n\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string(),
            world.entra.authority()
        ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config_arg, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
    )?;
    let pid = child.pid()?;

    // While the victim's mailbox is worked through, the bystander's mail keeps arriving and
    // keeps being stored.
    let mut served = Ledger::default();
    for i in 0..5 {
        let marker = format!("bystander-{i}");
        served.deliver(&world.pop, &bystander.mailbox, plain(&marker))?;
        let (child, served, world) = (&child, &served, &world);
        poll(
            &format!("{marker} to be stored"),
            SERVED_WITHIN,
            || async move {
                child.assert_running()?;
                let tally = served.check(&world.heads(&[bystander.id]).await?);
                Ok((tally.stored_once == served.len()).then_some(()))
            },
            || format!("ccmail's output:\n{}", child.output()),
        )
        .await?;
    }

    let last = std::sync::Mutex::new(String::new());
    let (child_ref, ledger_ref, world_ref, last_ref, victim_ref) =
        (&child, &ledger, &world, &last, &victim);
    poll(
        "the victim's mailbox to drain",
        DRAINED_WITHIN,
        || async move {
            let (child, ledger, world, last, victim) =
                (child_ref, ledger_ref, world_ref, last_ref, victim_ref);
            child.assert_running()?;
            let tally = ledger.check(&world.heads(&[victim.id]).await?);
            let done =
                tally.stored_once == ledger.len() && world.pop.messages(&victim.mailbox).is_empty();
            if done {
                tally.assert_exactly_once()?;
            }
            if let Ok(mut l) = last.lock() {
                *l = format!("{tally:?}");
            }
            Ok(done.then_some(()))
        },
        || {
            let tally = last.lock().map(|l| l.clone()).unwrap_or_default();
            format!("{tally}; ccmail's output:\n{}", child.output())
        },
    )
    .await?;
    served
        .check(&world.heads(&[bystander.id]).await?)
        .assert_exactly_once()?;

    let peak = peak_rss(pid)?;
    // Both pilots' bounds: the bystander only ever gets small mail.
    let bound = PROCESS_BASE + pilot_bound(largest) + pilot_bound(0);
    println!(
        "peak RSS {} MiB with the largest message {} MiB; documented bound {} MiB",
        peak / MIB,
        largest / MIB,
        bound / MIB
    );
    ensure!(
        peak <= bound,
        "peak RSS {} MiB over the documented bound {} MiB",
        peak / MIB,
        bound / MIB
    );

    child.terminate()?;
    let status = child.wait(Duration::from_secs(30)).await?;
    ensure!(status.success(), "ccmail exited with {status}");
    world.finish().await
}
