//! The kill -9 soak (`ccmail_lab::soak`, also `ccmail-lab soak`), short form: the real `ccmail run`
//! binary ingests from the POP3 simulator in this test process while a generator keeps
//! delivering marked mail; it is SIGKILLed five times at random moments (two thirds of them
//! right after the server received AUTH, STAT, UIDL, RETR, DELE or QUIT) and restarted; then
//! the mailbox is drained, the worker stopped with SIGTERM, and every delivered marker must be
//! stored exactly once. The worker logs at TRACE level throughout, and every log is searched
//! for the client secret, the master key, each issued token and its XOAUTH2 blob.
//!
//! The negative control runs the same machinery with a mail source that silently loses some
//! messages and duplicates others, and shows the check reports exactly those.

use std::path::PathBuf;

use ccmail_lab::soak::{NegativeControl, SoakOptions, SoakReport};
use ccmail_lab::testdb::admin_url;

fn options(log_level: &str) -> SoakOptions {
    let mut options = SoakOptions::short(PathBuf::from(env!("CARGO_BIN_EXE_ccmail")), admin_url());
    // A fixed schedule, so a failure reproduces (timing still varies); CCMAIL_SOAK_SEED
    // overrides it (decimal or 0x-hex). Printed with the report, and replayable with
    // `ccmail-lab soak --seed`.
    options.seed = soak_seed();
    options.log_level = log_level.to_owned();
    options
}

/// The soak's seed: `CCMAIL_SOAK_SEED` when set, else [`DEFAULT_SEED`].
fn soak_seed() -> u64 {
    let Ok(text) = std::env::var("CCMAIL_SOAK_SEED") else {
        return DEFAULT_SEED;
    };
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|err| panic!("CCMAIL_SOAK_SEED={text:?} is not a u64: {err}"))
}

/// The seed CI runs with (the same as `ccmail-lab soak`'s default).
const DEFAULT_SEED: u64 = 0x50A4;

fn print(report: &SoakReport, seed: u64) {
    println!("{} seed={seed}", report.summary());
    println!("{}", report.kill_points_line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_while_mail_arrives_stores_every_message_exactly_once()
-> anyhow::Result<()> {
    let logs = tempfile::Builder::new()
        .prefix("ccmail-soak-it-")
        .tempdir()?;
    let mut options = options("trace");
    options.log_dir = Some(logs.path().to_path_buf());
    let report = ccmail_lab::soak::run(&options).await?;
    print(&report, options.seed);

    assert_eq!(report.kills, 5, "{}", report.summary());
    assert_eq!(report.worker_runs, 6);
    assert_eq!(report.delivered, options.messages);
    assert_eq!(report.lost, 0, "{}", report.summary());
    assert_eq!(report.duplicated, 0, "{}", report.summary());
    assert_eq!(report.unknown, 0, "{}", report.summary());
    assert_eq!(report.stored, options.messages);
    assert_eq!(report.stored_once, options.messages);
    // Runs fetched their own tokens (a killed process takes its cache with it), so there were
    // real tokens and blobs to look for in the logs. Not every run polls: one started right
    // after a kill waits for the killed replica's lease to expire (`lease_ttl_secs`, 3 s here)
    // and may be killed before that.
    assert!(report.token_requests >= 3, "{}", report.kill_points_line());

    // The scan covered real trace-level logs of every run, down to the POP3 wire.
    let mut all = String::new();
    for run in 0..report.worker_runs {
        let path = logs.path().join(format!("worker-{run}.log"));
        all.push_str(&std::fs::read_to_string(&path)?);
    }
    assert_eq!(all.len() as u64, report.log_bytes);
    for expected in [
        "TRACE",
        "pop3 send",
        "AUTH XOAUTH2",
        "<redacted SASL response>",
        "access token obtained",
    ] {
        assert!(all.contains(expected), "the trace log lacks {expected:?}");
    }
    assert!(
        report.leaks.is_empty(),
        "secrets in the logs: {:?}",
        report.leaks
    );
    report.check()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_a_lossy_and_duplicating_source_is_reported() -> anyhow::Result<()> {
    let mut options = options("info");
    options.messages = 80;
    options.kills = 2;
    options.control = NegativeControl {
        drop_every: Some(7),
        duplicate_every: Some(11),
    };
    let lost = options.control.dropped(options.messages);
    let duplicated = options.control.duplicated(options.messages);
    assert_eq!((lost, duplicated), (11, 6), "the control's own arithmetic");

    let report = ccmail_lab::soak::run(&options).await?;
    print(&report, options.seed);
    assert_eq!(report.delivered, options.messages);
    assert_eq!(report.lost, lost, "{}", report.summary());
    assert_eq!(report.duplicated, duplicated, "{}", report.summary());
    assert_eq!(report.stored, options.messages - lost + duplicated);
    assert_eq!(report.stored_once, options.messages - lost - duplicated);
    let verdict = report
        .check()
        .expect_err("the check must fail when messages were lost or doubled");
    assert!(
        verdict.to_string().contains("exactly-once violated"),
        "{verdict}"
    );
    Ok(())
}
