//! Network faults between the poller and its servers (issue 4, item 1).
//!
//! POP3 side: a [`FaultProxy`] between the poller and the POP3 simulator resets the connection
//! in the middle of a RETR, stalls it, or caps its bandwidth; the simulator's own knobs cut the
//! session at a given command (DELE, QUIT before and after it is applied, a hanging or failing
//! RETR). PostgreSQL side: a proxy in front of the database cuts the connection at the poller's
//! `COMMIT`, before forwarding it or after the server has committed, so the poller cannot know
//! the outcome: it must send no DELE for that batch, and the next poll must end exactly-once.
//!
//! Every scenario ends with a clean poll and the ledger's exactly-once check, and prints
//! `scenario=… faults=… messages=… lost=… duplicated=…`.

use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail::ingest::poller::{self, IngestLimits, Pilot, PollError};
use ccmail::pop3::Timeouts;
use ccmail::store;
use ccmail::store::Db;
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use ccmail_lab::sim::pop3::Fault;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use tokio_util::sync::CancellationToken;

use crate::support::fault_proxy::{CommitCut, FaultProxy, Knobs};
use crate::support::pipeline::{Ledger, PipelineWorld, small_limits};
use crate::support::scenario::{summary, with_verb};

/// Messages big enough that a reset or stall at [`CUT_AT`] bytes lands inside the first RETR.
const BIG: usize = 150 * 1024;
/// Downstream bytes after which the proxy cuts: well past the TLS handshake and login.
const CUT_AT: u64 = 64 * 1024;

/// Deadlines short enough that a stalled connection fails the poll in about a second.
fn short_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        tls: Duration::from_secs(5),
        command: Duration::from_secs(2),
        idle: Duration::from_secs(1),
        ..Timeouts::DEFAULT
    }
}

/// A world whose pilot `support` reaches the POP3 simulator through a fault proxy, with
/// `count` messages of at least [`BIG`] bytes delivered.
async fn proxied_world(
    count: usize,
    timeouts: Timeouts,
) -> anyhow::Result<(PipelineWorld, FaultProxy, Pilot, Ledger)> {
    let world = PipelineWorld::start().await?;
    let proxy = FaultProxy::start(world.pop.tls_addr()).await?;
    let row = world
        .add_pilot("support", |p| {
            p.port = proxy.addr().port();
            p.max_message_bytes = 4 * 1024 * 1024;
        })
        .await?;
    let pilot = world.resolve_with(&row, timeouts).await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xfa17_0001);
    for _ in 0..count {
        let raw = mails.oversize(&row.mailbox, BIG);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    Ok((world, proxy, pilot, ledger))
}

/// Polls until the mailbox is empty (at most `polls` clean polls), then checks exactly-once.
async fn recover_and_check(
    world: &PipelineWorld,
    pilot: &Pilot,
    ledger: &Ledger,
    limits: &IngestLimits,
    name: &str,
    faults: u64,
) -> anyhow::Result<()> {
    for _ in 0..3 {
        world.poll(pilot, limits).await?;
        if world.pop.messages(&pilot.mailbox).is_empty() {
            break;
        }
    }
    let tally = ledger.check(&world.heads(&[pilot.id]).await?);
    summary(name, faults, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    ensure!(
        world.pop.messages(&pilot.mailbox).is_empty(),
        "{name}: the mailbox must end empty"
    );
    Ok(())
}

#[tokio::test]
async fn reset_in_the_middle_of_retr_sends_no_dele_and_the_next_poll_recovers() -> anyhow::Result<()>
{
    let (world, proxy, pilot, ledger) = proxied_world(4, short_timeouts()).await?;
    let limits = small_limits();
    proxy.set(Knobs {
        reset_after_downstream: Some(CUT_AT),
        ..Knobs::default()
    });
    let failed = world.poll(&pilot, &limits).await;
    let error = failed
        .err()
        .context("a reset mid-RETR must fail the poll")?;
    ensure!(
        error.retry() == ccmail::model::retry::Retry::Soon,
        "a reset is transient: {error}"
    );
    ensure!(proxy.faults() == 1, "the reset fired once");
    let commands = world.pop.commands();
    ensure!(
        !with_verb(&commands, "RETR").is_empty(),
        "the reset hit a RETR: {commands:?}"
    );
    ensure!(
        with_verb(&commands, "DELE").is_empty() && with_verb(&commands, "QUIT").is_empty(),
        "nothing is deleted after a reset: {commands:?}"
    );
    ensure!(world.pop.messages(&pilot.mailbox).len() == 4);

    proxy.clear();
    recover_and_check(&world, &pilot, &ledger, &limits, "pop3_reset_mid_retr", 1).await?;
    world.finish().await
}

#[tokio::test]
async fn a_stalled_connection_hits_the_idle_deadline_without_dele_and_recovers()
-> anyhow::Result<()> {
    let (world, proxy, pilot, ledger) = proxied_world(3, short_timeouts()).await?;
    let limits = small_limits();
    proxy.set(Knobs {
        stall_after_downstream: Some(CUT_AT),
        ..Knobs::default()
    });
    let failed = world.poll(&pilot, &limits).await;
    let error = failed.err().context("a stall must fail the poll")?;
    ensure!(
        matches!(error, PollError::Pop3(ccmail::pop3::Error::Timeout { .. })),
        "a stall ends at a deadline: {error}"
    );
    ensure!(
        error.retry() == ccmail::model::retry::Retry::Soon,
        "{error}"
    );
    let commands = world.pop.commands();
    ensure!(
        with_verb(&commands, "DELE").is_empty(),
        "nothing is deleted after a stall: {commands:?}"
    );
    ensure!(world.pop.messages(&pilot.mailbox).len() == 3);

    proxy.clear();
    recover_and_check(
        &world,
        &pilot,
        &ledger,
        &limits,
        "pop3_stall",
        proxy.faults(),
    )
    .await?;
    world.finish().await
}

#[tokio::test]
async fn a_bandwidth_cap_slows_the_poll_but_it_completes_exactly_once() -> anyhow::Result<()> {
    // Idle deadline 1 s, link 512 KiB/s: slow but steady bytes never trip a deadline.
    let (world, proxy, pilot, ledger) = proxied_world(4, short_timeouts()).await?;
    let limits = small_limits();
    proxy.set(Knobs {
        downstream_bytes_per_sec: Some(512 * 1024),
        ..Knobs::default()
    });
    let report = world.poll(&pilot, &limits).await?;
    ensure!(
        (report.stored, report.deleted) == (4, 4),
        "a slow link still stores and deletes everything: {report:?}"
    );
    ensure!(
        proxy.downstream_bytes() > 4 * BIG as u64,
        "the messages went through the capped proxy"
    );
    recover_and_check(
        &world,
        &pilot,
        &ledger,
        &limits,
        "pop3_bandwidth_cap",
        proxy.connections(),
    )
    .await?;
    world.finish().await
}

/// The simulator's command-level faults, each on its own pilot: cut at DELE, at QUIT before
/// and after it is applied, in the middle of a RETR; a RETR that hangs or fails; slow bytes.
#[tokio::test]
async fn command_level_cuts_including_quit_lose_and_double_nothing() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let limits = small_limits();
    let cases: Vec<(&str, Fault, bool)> = vec![
        ("pop3_cut_mid_retr", Fault::DropAfterRetrBytes(300), true),
        (
            "pop3_cut_at_dele",
            Fault::DropAfterCommand {
                command: "DELE".into(),
            },
            true,
        ),
        (
            "pop3_cut_during_quit_unapplied",
            Fault::DropAfterCommand {
                command: "QUIT".into(),
            },
            true,
        ),
        (
            "pop3_cut_during_quit_applied",
            Fault::DropBeforeReply {
                command: "QUIT".into(),
            },
            true,
        ),
        (
            "pop3_retr_hangs",
            Fault::Hang {
                command: "RETR".into(),
            },
            true,
        ),
        (
            "pop3_retr_sys_temp",
            Fault::Err {
                command: "RETR".into(),
                line: "-ERR [SYS/TEMP] Server Unavailable. 21".into(),
            },
            false,
        ),
        (
            "pop3_slow_bytes",
            Fault::Slow {
                chunk: 512,
                delay: Duration::from_millis(1),
            },
            false,
        ),
    ];
    for (i, (name, fault, fails)) in cases.into_iter().enumerate() {
        let row = world.add_pilot(&format!("case{i}"), |_| {}).await?;
        let pilot = world.resolve_with(&row, short_timeouts()).await?;
        let mut ledger = Ledger::default();
        let mut mails = MailGen::new(0xfa17_0100 + i as u64);
        for k in 0..5 {
            let raw = mails.message(&row.mailbox, Kind::ALL[k % Kind::ALL.len()]);
            ledger.deliver(&world.pop, &row.mailbox, raw)?;
        }
        world.pop.set_fault(Some(fault.clone()));
        let first = world.poll(&pilot, &limits).await;
        ensure!(
            first.is_err() == fails,
            "{name}: expected the poll to {}: {first:?}",
            if fails { "fail" } else { "complete" }
        );
        world.pop.clear_faults();
        recover_and_check(&world, &pilot, &ledger, &limits, name, 1).await?;
    }
    world.finish().await
}

/// A pool that reaches the test database through `proxy` (no TLS, so the proxy can read the
/// protocol), failing fast when the proxy cuts.
fn pool_through(world: &PipelineWorld, proxy: &FaultProxy) -> anyhow::Result<Db> {
    let options: PgConnectOptions = world
        .db
        .url()
        .parse::<PgConnectOptions>()?
        .host("127.0.0.1")
        .port(proxy.addr().port())
        .ssl_mode(PgSslMode::Disable);
    Ok(Db::from_pool(
        PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options),
    ))
}

/// The shared server's address, from the test database URL.
fn database_addr(world: &PipelineWorld) -> anyhow::Result<std::net::SocketAddr> {
    let options: PgConnectOptions = world.db.url().parse()?;
    let host = match options.get_host() {
        "localhost" => "127.0.0.1",
        other => other,
    };
    Ok(format!("{host}:{}", options.get_port()).parse()?)
}

/// Cuts the poller's first COMMIT (`cut`), then checks: the poll fails, no DELE names a
/// message of the cut batch, the batch is stored exactly when the server got the COMMIT, and
/// the next poll ends exactly-once (deleting, not re-downloading, what was committed).
async fn commit_outcome_unknown(cut: CommitCut, name: &str) -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let proxy = FaultProxy::start_postgres(database_addr(&world)?).await?;
    let pool = pool_through(&world, &proxy)?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xfa17_0200);
    for k in 0..6 {
        let raw = mails.message(&row.mailbox, Kind::ALL[k % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    // Message numbers of this session, as the simulator numbers them (maildrop order).
    let numbered: Vec<(u32, String)> = world
        .pop
        .messages(&row.mailbox)
        .into_iter()
        .enumerate()
        .map(|(i, (uidl, _))| (i as u32 + 1, uidl))
        .collect();
    let limits = small_limits();
    let cancel = CancellationToken::new();

    proxy.cut_next_commit(cut);
    let failed = poller::poll_once(&pilot, &pool, &world.tokens, &limits, &cancel).await;
    let error = failed
        .err()
        .context("a commit cut must fail the poll: its outcome is unknown")?;
    ensure!(
        error.retry() == ccmail::model::retry::Retry::Soon,
        "{name}: {error}"
    );
    let cut_tx = proxy.cut_transactions();
    ensure!(cut_tx.len() == 1, "exactly one commit was cut");
    let in_cut: Vec<&(u32, String)> = numbered
        .iter()
        .filter(|(_, uidl)| cut_tx[0].windows(uidl.len()).any(|w| w == uidl.as_bytes()))
        .collect();
    ensure!(
        !in_cut.is_empty(),
        "{name}: the cut transaction carried messages"
    );
    let commands = world.pop.commands();
    for (number, uidl) in &in_cut {
        let dele = format!("DELE {number}");
        ensure!(
            !commands.contains(&dele),
            "{name}: {dele} ({uidl}) sent although its commit's outcome was unknown: {commands:?}"
        );
    }
    ensure!(
        with_verb(&commands, "QUIT").is_empty(),
        "{name}: a failed poll never sends QUIT: {commands:?}"
    );
    ensure!(
        world.pop.messages(&row.mailbox).len() == 6,
        "{name}: nothing left the server"
    );
    let cut_uidls: Vec<String> = in_cut.iter().map(|(_, u)| u.clone()).collect();
    let known = {
        let mut conn = world.db.pool().acquire().await?;
        store::known_uidls(&mut conn, pilot.id, &cut_uidls).await?
    };
    let expect_stored = cut == CommitCut::AfterReply;
    ensure!(
        known.len() == if expect_stored { cut_uidls.len() } else { 0 },
        "{name}: the cut batch is stored iff the server received COMMIT ({} of {} known)",
        known.len(),
        cut_uidls.len()
    );

    // The next poll finds what committed and only deletes it (in a session of its own, so
    // those deletions stick first; the maildrop is numbered afresh after it); the rest is
    // downloaded: exactly the cut batch when its commit was lost, nothing when it was applied.
    world.pop.clear_commands();
    let report = poller::poll_once(&pilot, &pool, &world.tokens, &limits, &cancel).await?;
    let commands = world.pop.commands();
    let retrs = with_verb(&commands, "RETR").len();
    let expect_retrs = if expect_stored { 0 } else { in_cut.len() };
    ensure!(
        retrs == expect_retrs,
        "{name}: {expect_retrs} downloads expected (the cut batch is downloaded again iff its \
         commit was lost), {retrs} made: {commands:?}"
    );
    ensure!(report.deleted == 6, "{name}: {report:?}");
    ensure!(world.pop.messages(&row.mailbox).is_empty());
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary(name, proxy.faults(), ledger.len(), &tally);
    tally.assert_exactly_once()?;
    pool.close().await;
    world.finish().await
}

#[tokio::test]
async fn commit_applied_but_unacknowledged_sends_no_dele_and_ends_exactly_once()
-> anyhow::Result<()> {
    commit_outcome_unknown(CommitCut::AfterReply, "pg_commit_cut_after_server_commit").await
}

#[tokio::test]
async fn commit_lost_before_the_server_sends_no_dele_and_ends_exactly_once() -> anyhow::Result<()> {
    commit_outcome_unknown(CommitCut::BeforeForward, "pg_commit_cut_before_server").await
}
