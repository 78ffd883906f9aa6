//! End-to-end ingest against the simulators and a real PostgreSQL (a fresh database per test):
//! the poller's order of operations (store, commit, DELE, QUIT) checked from the outside.
//!
//! Every test counts what matters to agents: each delivered message (by its
//! `X-Ccmail-Marker`) stored exactly once, full downloads byte-identical to what was delivered,
//! and the server left holding exactly the messages that must stay there (oversize, failing,
//! keep-on-server). Crash points are injected with the POP3 simulator's faults and followed by
//! a normal poll.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail::ingest::poller::IngestLimits;
use ccmail::ingest::supervisor::{StatusBoard, Supervisor, SupervisorSettings};
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use ccmail_lab::sim::pop3::Fault;
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::{
    Ledger, PipelineWorld, eight_bit_header_message, small_limits, test_timeouts,
};

/// How long a supervisor may take to drain the test mailboxes before the test fails.
const DRAIN_DEADLINE: Duration = Duration::from_secs(90);

fn settings(
    limits: IngestLimits,
    credentials: ccmail::secrets::CredentialPolicy,
) -> SupervisorSettings {
    SupervisorSettings {
        limits,
        timeouts: test_timeouts(),
        reload_interval: Duration::from_secs(1),
        poll_jitter: 0.0,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(2),
        permanent_retry: Duration::from_secs(5),
        login_refusal_grace: ccmail::model::defaults::LOGIN_REFUSAL_GRACE,
        shutdown_grace: Duration::from_secs(10),
        lease_ttl: Duration::from_secs(30),
        credentials,
    }
}

/// Waits until `done` holds, failing after `deadline` with `what` and the pollers' status.
async fn wait_until(
    what: &str,
    deadline: Duration,
    status: &StatusBoard,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    crate::support::wait::wait_until(
        what,
        deadline,
        || std::future::ready(Ok(done())),
        || {
            let board = status.lock().map(|b| format!("{b:?}")).unwrap_or_default();
            format!("pollers: {board}")
        },
    )
    .await
}

/// Runs a supervisor over `pilots` until `done` holds, then shuts it down and waits for it.
async fn supervise_until(
    world: &PipelineWorld,
    pilots: &[i64],
    what: &str,
    done: impl FnMut(&StatusBoard) -> bool,
) -> anyhow::Result<StatusBoard> {
    let supervisor = Supervisor::new(
        world.db.db().clone(),
        Arc::clone(&world.tokens),
        settings(IngestLimits::default(), world.credential_policy()),
        Some(world.master_key()?),
    )
    .only_pilots(pilots.iter().copied());
    let status = supervisor.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(supervisor.run(shutdown.clone()));
    let mut done = done;
    let waited = wait_until(what, DRAIN_DEADLINE, &status, || done(&status)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .context("the supervisor did not stop within 20 s of shutdown")?
        .context("the supervisor task panicked")?;
    waited?;
    Ok(status)
}

#[tokio::test]
async fn two_pilots_sharing_one_app_store_500_messages_exactly_once() -> anyhow::Result<()> {
    const LIMIT: u64 = 1024 * 1024;
    let world = PipelineWorld::start().await?;
    let support = world
        .add_pilot("support", |p| p.max_message_bytes = LIMIT)
        .await?;
    let sales = world
        .add_pilot("sales", |p| p.max_message_bytes = LIMIT)
        .await?;
    let (support_box, sales_box) = (support.mailbox.clone(), sales.mailbox.clone());

    let mut mails = MailGen::new(0x5eed_0500);
    let mut ledger = Ledger::default();
    // Every kind in turn (dot-stuffed lines, encoded words, attachments, replies…), plus the
    // odd ones: raw 8-bit headers and broken MIME in one mailbox, an oversize one in the other.
    for i in 0..248 {
        let raw = mails.message(&support_box, Kind::ALL[i % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &support_box, raw)?;
    }
    ledger.deliver(
        &world.pop,
        &support_box,
        eight_bit_header_message(&support_box, "it-8bit-1"),
    )?;
    let malformed = mails.malformed(&support_box);
    ledger.deliver(&world.pop, &support_box, malformed)?;
    for _ in 0..249 {
        let raw = mails.mixed(&sales_box);
        ledger.deliver(&world.pop, &sales_box, raw)?;
    }
    let oversize = mails.oversize(&sales_box, LIMIT as usize + 256 * 1024);
    let oversize_uidl = ledger.deliver(&world.pop, &sales_box, oversize)?;
    ensure!(ledger.len() == 500, "the test delivers 500 messages");

    let pilots = [support.id, sales.id];
    let pop = world.pop.clone();
    supervise_until(&world, &pilots, "draining both mailboxes", |_| {
        pop.messages(&support_box).is_empty() && pop.messages(&sales_box).len() == 1
    })
    .await?;

    assert_eq!(world.work_items().await?, 500);
    ledger
        .check(&world.heads(&pilots).await?)
        .assert_exactly_once()?;
    assert_eq!(
        world.entra.token_requests(),
        1,
        "two pilots of one app share one token"
    );
    assert!(world.pop.messages(&support_box).is_empty());
    let left: Vec<String> = world
        .pop
        .messages(&sales_box)
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(
        left,
        [oversize_uidl.as_str()],
        "only the oversize message stays"
    );

    let stored = world.stored(&pilots).await?;
    assert_eq!(stored.len(), 500);
    for m in &stored {
        assert_eq!(m.work_items, 1, "{m:?}");
        if m.uidl == oversize_uidl {
            assert!(m.headers_only, "{m:?}");
            assert_eq!(m.flags, ["oversize"], "{m:?}");
            assert!(m.size < LIMIT as i64, "only the headers are stored: {m:?}");
        } else {
            assert!(!m.headers_only, "{m:?}");
            assert!(
                ledger.is_delivered_digest(&m.sha256),
                "stored bytes differ from the delivered message (dot-stuffing?): {m:?}"
            );
        }
    }
    assert!(
        stored.iter().any(|m| m.attachments > 0),
        "attachments are stored"
    );

    // A second run finds nothing new: same work items, same single token, oversize stays.
    let status = supervise_until(&world, &pilots, "one more poll of each pilot", |s| {
        let board = s.lock().map(|b| b.clone()).unwrap_or_default();
        pilots
            .iter()
            .all(|id| board.get(id).is_some_and(|p| p.last_report.is_some()))
    })
    .await?;
    let board = status.lock().map(|b| b.clone()).unwrap_or_default();
    for id in pilots {
        let report = board
            .get(&id)
            .and_then(|s| s.last_report.clone())
            .context("a report of the second run")?;
        assert_eq!(report.stored, 0, "{report:?}");
    }
    assert_eq!(world.work_items().await?, 500);
    assert_eq!(world.entra.token_requests(), 1);
    assert_eq!(world.pop.messages(&sales.mailbox).len(), 1);
    world.finish().await
}

/// Delivers `count` messages of every kind to `mailbox`.
fn fill(
    world: &PipelineWorld,
    ledger: &mut Ledger,
    mailbox: &str,
    count: usize,
    seed: u64,
) -> anyhow::Result<Vec<String>> {
    let mut mails = MailGen::new(seed);
    (0..count)
        .map(|i| {
            ledger.deliver(
                &world.pop,
                mailbox,
                mails.message(mailbox, Kind::ALL[i % 8]),
            )
        })
        .collect()
}

/// A poll interrupted by `fault`, then a normal poll: nothing lost, nothing doubled, the
/// server ends empty. `stored_at_crash` and `left_at_crash` are what the interrupted poll
/// must have achieved (the commit happens before DELE; the server deletes only at QUIT).
async fn crash_then_recover(
    fault: Fault,
    stored_at_crash: usize,
    left_at_crash: usize,
) -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row.mailbox, 5, 7)?;
    let limits = small_limits();

    world.pop.set_fault(Some(fault.clone()));
    let crashed = world.poll(&pilot, &limits).await;
    assert!(
        crashed.is_err(),
        "{fault:?} must fail the poll: {crashed:?}"
    );
    // Batches commit in the background while the next downloads, so a crash may find more
    // than the first batch committed; never less, and never anything deleted that was not.
    let stored_then = world.work_items().await? as usize;
    assert!(
        stored_then >= stored_at_crash,
        "{fault:?}: {stored_then} stored, expected at least {stored_at_crash}"
    );
    assert_eq!(
        world.pop.messages(&row.mailbox).len(),
        left_at_crash,
        "{fault:?}"
    );

    world.pop.clear_faults();
    let report = world.poll(&pilot, &limits).await?;
    assert_eq!(report.stored, 5 - stored_then, "{fault:?}: {report:?}");
    assert!(world.pop.messages(&row.mailbox).is_empty(), "{fault:?}");
    assert_eq!(world.work_items().await?, 5, "{fault:?}");
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;

    let again = world.poll(&pilot, &limits).await?;
    assert_eq!((again.on_server, again.stored), (0, 0), "{again:?}");
    assert_eq!(world.work_items().await?, 5);
    // Bookkeeping caught up too, even where the QUIT's reply was lost.
    let stored = world.stored(&[row.id]).await?;
    assert!(
        stored.iter().all(|m| m.deleted_from_server),
        "{fault:?}: {stored:?}"
    );
    world.finish().await
}

#[tokio::test]
async fn connection_dropped_in_the_middle_of_retr_loses_and_doubles_nothing() -> anyhow::Result<()>
{
    crash_then_recover(Fault::DropAfterRetrBytes(200), 0, 5).await
}

#[tokio::test]
async fn connection_dropped_after_commit_before_dele_loses_and_doubles_nothing()
-> anyhow::Result<()> {
    // Batches of two: the first batch is committed, its first DELE never arrives.
    crash_then_recover(
        Fault::DropAfterCommand {
            command: "DELE".to_owned(),
        },
        2,
        5,
    )
    .await
}

#[tokio::test]
async fn connection_dropped_after_dele_before_quit_loses_and_doubles_nothing() -> anyhow::Result<()>
{
    crash_then_recover(
        Fault::DropAfterCommand {
            command: "QUIT".to_owned(),
        },
        5,
        5,
    )
    .await
}

#[tokio::test]
async fn quit_applied_but_unanswered_loses_and_doubles_nothing() -> anyhow::Result<()> {
    crash_then_recover(
        Fault::DropBeforeReply {
            command: "QUIT".to_owned(),
        },
        5,
        0,
    )
    .await
}

fn count_commands(world: &PipelineWorld, verb: &str) -> usize {
    world
        .pop
        .commands()
        .iter()
        .filter(|c| c.split(' ').next() == Some(verb))
        .count()
}

#[tokio::test]
async fn a_message_whose_retr_always_fails_is_flagged_after_max_attempts_without_blocking_others()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    let uidls = fill(&world, &mut ledger, &row.mailbox, 5, 11)?;
    let failing = uidls[1].clone();
    world.pop.fail_retr(&failing, usize::MAX);
    let limits = small_limits();
    let max = limits.max_retr_attempts as usize;

    // First poll: the others are stored and deleted in the same poll.
    let first = world.poll(&pilot, &limits).await?;
    assert_eq!((first.stored, first.retr_failures), (4, 1), "{first:?}");
    let left: Vec<String> = world
        .pop
        .messages(&row.mailbox)
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(left, [failing.as_str()]);
    assert_eq!(world.work_items().await?, 4);

    // Attempts 2..max: each poll tries once more; the last one gives up and stores the headers.
    let mut failures = first.retr_failures;
    for attempt in 2..=max {
        let report = world.poll(&pilot, &limits).await?;
        failures += report.retr_failures;
        let expect_skip = attempt == max;
        assert_eq!(report.skipped, usize::from(expect_skip), "{report:?}");
        assert_eq!(report.stored, usize::from(expect_skip), "{report:?}");
    }
    assert_eq!(
        failures, max,
        "RETR is tried exactly max_retr_attempts times"
    );
    assert_eq!(world.work_items().await?, 5);
    let stored = world.stored(&[row.id]).await?;
    let flagged = stored
        .iter()
        .find(|m| m.uidl == failing)
        .context("the failing message has a work item")?;
    assert!(flagged.headers_only, "{flagged:?}");
    assert_eq!(flagged.flags, ["fetch_failed"], "{flagged:?}");
    assert!(
        flagged.size > 0,
        "its headers were fetched with TOP: {flagged:?}"
    );
    assert_eq!(
        world.pop.messages(&row.mailbox).len(),
        1,
        "it stays on the server"
    );
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;

    // Later polls neither download it nor add anything.
    world.pop.clear_commands();
    for _ in 0..2 {
        let report = world.poll(&pilot, &limits).await?;
        assert_eq!((report.stored, report.already_stored), (0, 1), "{report:?}");
    }
    assert_eq!(
        count_commands(&world, "RETR") + count_commands(&world, "TOP"),
        0
    );
    assert_eq!(count_commands(&world, "DELE"), 0);
    assert_eq!(world.work_items().await?, 5);
    world.finish().await
}

#[tokio::test]
async fn an_oversize_message_becomes_one_flagged_headers_only_work_item_and_stays()
-> anyhow::Result<()> {
    const LIMIT: u64 = 128 * 1024;
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("support", |p| p.max_message_bytes = LIMIT)
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row.mailbox, 2, 13)?;
    let mut mails = MailGen::new(14);
    let big = mails.oversize(&row.mailbox, LIMIT as usize * 2);
    let big_uidl = ledger.deliver(&world.pop, &row.mailbox, big)?;
    let limits = small_limits();

    let first = world.poll(&pilot, &limits).await?;
    assert_eq!(
        (first.stored, first.oversize, first.deleted),
        (3, 1, 2),
        "{first:?}"
    );
    assert!(
        world
            .pop
            .commands()
            .iter()
            .any(|c| c.starts_with("TOP ") && c.ends_with(" 0")),
        "headers come from TOP n 0"
    );
    let stored = world.stored(&[row.id]).await?;
    let flagged = stored
        .iter()
        .find(|m| m.uidl == big_uidl)
        .context("the oversize message has a work item")?;
    assert!(flagged.headers_only && flagged.size > 0 && flagged.size < LIMIT as i64);
    assert_eq!(flagged.flags, ["oversize"]);
    assert_eq!(flagged.work_items, 1);
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;

    world.pop.clear_commands();
    for _ in 0..2 {
        let report = world.poll(&pilot, &limits).await?;
        assert_eq!(
            (report.stored, report.oversize, report.already_stored),
            (0, 0, 1),
            "{report:?}"
        );
    }
    assert_eq!(
        count_commands(&world, "RETR") + count_commands(&world, "TOP"),
        0
    );
    let left: Vec<String> = world
        .pop
        .messages(&row.mailbox)
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(left, [big_uidl]);
    assert_eq!(world.work_items().await?, 3);
    world.finish().await
}

#[tokio::test]
async fn a_keep_on_server_pilot_stores_once_and_deletes_nothing() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("archive", |p| p.keep_on_server = true)
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row.mailbox, 4, 17)?;
    let limits = small_limits();

    let first = world.poll(&pilot, &limits).await?;
    assert_eq!((first.stored, first.deleted), (4, 0), "{first:?}");
    let second = world.poll(&pilot, &limits).await?;
    assert_eq!(
        (second.stored, second.already_stored, second.deleted),
        (0, 4, 0),
        "{second:?}"
    );
    assert_eq!(count_commands(&world, "DELE"), 0);
    assert_eq!(
        count_commands(&world, "RETR"),
        4,
        "each message downloaded once"
    );
    assert_eq!(world.pop.messages(&row.mailbox).len(), 4);
    assert_eq!(world.work_items().await?, 4);
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}

#[tokio::test]
async fn the_per_poll_cap_leaves_more_waiting_and_the_next_poll_finishes() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row.mailbox, 5, 19)?;
    let limits = IngestLimits {
        max_messages_per_poll: 3,
        ..small_limits()
    };

    let first = world.poll(&pilot, &limits).await?;
    assert_eq!((first.stored, first.deleted), (3, 3), "{first:?}");
    assert!(first.more_waiting, "{first:?}");
    assert_eq!(world.pop.messages(&row.mailbox).len(), 2);
    let second = world.poll(&pilot, &limits).await?;
    assert_eq!((second.stored, second.deleted), (2, 2), "{second:?}");
    assert!(!second.more_waiting, "{second:?}");
    assert!(world.pop.messages(&row.mailbox).is_empty());
    assert_eq!(world.work_items().await?, 5);
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}
