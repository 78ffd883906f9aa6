//! The README's demo, run as a newcomer runs it: the `ccmail-lab demo` binary twice against one
//! database. It lives in the lab package because only a package's own tests get its binary
//! (`CARGO_BIN_EXE_ccmail-lab`), built before they run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use ccmail_lab::testdb::{TestDb, work_item_count};

/// Runs `ccmail-lab demo` in `dir` against `database_url`; returns its exit status and
/// everything it printed. The child is killed (by its PID, `kill_on_drop`) if it outlives
/// `limit`, so a hung demo fails the test instead of stalling it.
async fn run_demo(
    dir: &std::path::Path,
    database_url: &str,
    messages: usize,
    limit: Duration,
) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ccmail-lab"))
        .args(["demo", "--messages", &messages.to_string()])
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("the demo did not finish within {limit:?}"))
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

#[tokio::test]
async fn demo_twice_adds_exactly_its_own_messages_each_time() {
    const PER_MAILBOX: usize = 4;
    // Two mailboxes, each with PER_MAILBOX messages plus one malformed and one oversize.
    const PER_RUN: i64 = 2 * (PER_MAILBOX as i64 + 2);
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::Builder::new()
        .prefix("ccmail-demo-it-")
        .tempdir()
        .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    for run in 1..=2 {
        let (status, output) =
            run_demo(dir.path(), db.url(), PER_MAILBOX, Duration::from_secs(150)).await;
        assert!(
            status.success(),
            "demo run {run}: {status}; output:\n{output}"
        );
        assert!(
            output.contains(&format!(
                "stored exactly once {PER_RUN} | lost 0 | duplicated 0"
            )),
            "demo run {run} output:\n{output}"
        );
        let items = work_item_count(&mut conn).await.unwrap();
        assert_eq!(items, PER_RUN * run, "after demo run {run}");
    }
    drop(conn);
    db.drop_db().await.unwrap();
}
