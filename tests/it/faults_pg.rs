//! PostgreSQL faults on a private cluster made by the test (issue 4, item 2): an immediate
//! restart in the middle of ingest, the server gone (connection refused) and back, a statement
//! timeout during a batch's commit. The worker retries, sends no DELE for what it has not
//! committed, and recovers without a restart.
//!
//! The negative control breaks the guarantee on purpose — the poller's sessions commit with
//! `synchronous_commit = off` and the cluster is stopped immediately after the poll's DELE and
//! QUIT — and asserts that the ledger DETECTS the loss, so a green suite means something.

use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail::ingest::poller::{self, PollError};
use ccmail::store::{Db, PilotRow};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::support::pg_cluster::PgCluster;
use crate::support::pipeline::{Ledger, PipelineWorld, small_limits};
use crate::support::scenario::{Running, fill, summary, with_verb};
use crate::support::wait::wait_until;

/// How long a scenario may take to drain its mailboxes after the fault.
const DRAIN: Duration = Duration::from_secs(60);

/// A pool on the test database that gives up on an unreachable server after one second (the
/// default waits 30 s), with extra per-session settings.
fn pool(world: &PipelineWorld, settings: &[(&str, &str)]) -> anyhow::Result<Db> {
    let options = world
        .db
        .url()
        .parse::<PgConnectOptions>()?
        .options(settings.iter().copied());
    Ok(Db::from_pool(
        PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy_with(options),
    ))
}

/// Waits until every pilot's mailbox is empty.
async fn drained(
    world: &PipelineWorld,
    rows: &[PilotRow],
    running: &Running,
) -> anyhow::Result<()> {
    wait_until(
        "draining the mailboxes",
        DRAIN,
        || async {
            Ok(rows
                .iter()
                .all(|r| world.pop.messages(&r.mailbox).is_empty()))
        },
        || running.board(),
    )
    .await
}

#[tokio::test]
async fn an_immediate_restart_during_ingest_loses_and_doubles_nothing() -> anyhow::Result<()> {
    let mut cluster = PgCluster::start(&[]).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let mut rows = Vec::new();
    let mut ledger = Ledger::default();
    for (i, name) in ["support", "sales"].into_iter().enumerate() {
        let row = world.add_pilot(name, |_| {}).await?;
        fill(&world, &mut ledger, &row, 40, 0xb0_0000 + i as u64)?;
        rows.push(row);
    }
    // Slow bytes spread the ingest over a few seconds, so the restart lands in the middle.
    world
        .pop
        .set_fault(Some(ccmail_lab::sim::pop3::Fault::Slow {
            chunk: 1024,
            delay: Duration::from_millis(3),
        }));
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let running = Running::start(&world, pool(&world, &[])?, &ids, small_limits())?;

    let stored_before = wait_until(
        "the first work items",
        DRAIN,
        || async { Ok(world.work_items().await? >= 6) },
        || running.board(),
    )
    .await;
    stored_before?;
    cluster.restart_immediate().await?;
    let at_restart = world.work_items().await?;
    ensure!(
        at_restart < ledger.len() as i64,
        "the restart must land in the middle of ingest ({at_restart} of {} stored)",
        ledger.len()
    );
    world.pop.clear_faults();
    drained(&world, &rows, &running).await?;
    running.stop().await?;

    let tally = ledger.check(&world.heads(&ids).await?);
    summary(
        "pg_immediate_restart_during_ingest",
        1,
        ledger.len(),
        &tally,
    );
    tally.assert_exactly_once()?;
    ensure!(world.work_items().await? == ledger.len() as i64);
    world.finish().await
}

#[tokio::test]
async fn the_database_refusing_connections_stops_ingest_without_dele_until_it_returns()
-> anyhow::Result<()> {
    let mut cluster = PgCluster::start(&[]).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 2, 0xb1_0000)?;
    let running = Running::start(&world, pool(&world, &[])?, &[row.id], small_limits())?;
    drained(&world, std::slice::from_ref(&row), &running).await?;

    cluster.stop_immediate().await?;
    fill(&world, &mut ledger, &row, 6, 0xb1_0001)?;
    world.pop.clear_commands();
    // Two failed polls in a row: the poller keeps retrying while the server is gone.
    wait_until(
        "two failed polls while the database is down",
        DRAIN,
        || async { Ok(running.failing(row.id) >= 2) },
        || running.board(),
    )
    .await?;
    let commands = world.pop.commands();
    ensure!(
        with_verb(&commands, "RETR").is_empty() && with_verb(&commands, "DELE").is_empty(),
        "nothing is downloaded or deleted while the database is unreachable: {commands:?}"
    );
    ensure!(world.pop.messages(&row.mailbox).len() == 6);
    let shown = running.last_error(row.id);
    ensure!(
        shown.contains("database"),
        "the poller's error names the database: {shown}"
    );

    cluster.start_server().await?;
    drained(&world, std::slice::from_ref(&row), &running).await?;
    running.stop().await?;
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary("pg_connection_refused", 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    world.finish().await
}

#[tokio::test]
async fn a_statement_timeout_during_a_commit_sends_no_dele_and_the_retry_stores_everything()
-> anyhow::Result<()> {
    let cluster = PgCluster::start(&[]).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 5, 0xb2_0000)?;
    let timed = pool(&world, &[("statement_timeout", "300")])?;
    let limits = small_limits();
    let cancel = CancellationToken::new();

    // Another session holds a lock that blocks inserting work items (reads still work), so
    // each batch's insert runs into the statement timeout.
    let mut locker = world.db.pool().begin().await?;
    sqlx::query("lock table work_items in exclusive mode")
        .execute(&mut *locker)
        .await?;
    let failed = poller::poll_once(&pilot, &timed, &world.tokens, &limits, &cancel).await;
    let error = failed
        .err()
        .context("a statement timeout must fail the poll")?;
    ensure!(
        matches!(error, PollError::Store(_)) && error.to_string().contains("statement timeout"),
        "{error}"
    );
    ensure!(
        error.retry() == ccmail::model::retry::Retry::Soon,
        "a statement timeout is retried with backoff, not treated as a configuration error: {error}"
    );
    let commands = world.pop.commands();
    ensure!(
        with_verb(&commands, "DELE").is_empty(),
        "no DELE for batches that did not commit: {commands:?}"
    );
    ensure!(world.pop.messages(&row.mailbox).len() == 5);
    locker.rollback().await?;
    ensure!(world.work_items().await? == 0);

    let report = poller::poll_once(&pilot, &timed, &world.tokens, &limits, &cancel).await?;
    ensure!((report.stored, report.deleted) == (5, 5), "{report:?}");
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary("pg_statement_timeout", 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    timed.close().await;
    world.finish().await
}

/// Negative control: with asynchronous commit the acknowledged commit is not yet durable, so
/// an immediate stop right after the poll's DELE + QUIT loses messages the server has already
/// deleted. The suite must see that loss; if it did not, its green results would prove nothing.
#[tokio::test]
async fn negative_control_async_commit_plus_crash_is_detected_as_loss() -> anyhow::Result<()> {
    // The WAL writer flushes a partial page only every 10 s: an async commit's record stays in
    // shared memory, which an immediate stop throws away.
    let mut cluster =
        PgCluster::start(&["wal_writer_delay = 10000ms", "wal_writer_flush_after = 1GB"]).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 6, 0xb3_0000)?;
    // Everything so far (schema, pilot) is made durable the normal way.
    sqlx::query("checkpoint").execute(world.db.pool()).await?;

    // The broken guarantee: the poller's sessions commit asynchronously, and the WAL writer
    // (which would write their commit records within wal_writer_delay) is frozen, so they
    // stay in shared memory that the immediate stop throws away. Without the freeze the loss
    // depends on where WAL page boundaries fall: a control must fail every time.
    cluster.freeze_wal_writer().await?;
    let unsafe_pool = pool(&world, &[("synchronous_commit", "off")])?;
    let report = poller::poll_once(
        &pilot,
        &unsafe_pool,
        &world.tokens,
        &small_limits(),
        &CancellationToken::new(),
    )
    .await?;
    ensure!((report.stored, report.deleted) == (6, 6), "{report:?}");
    let unwritten: (String, String) =
        sqlx::query_as("select pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text")
            .fetch_one(world.db.pool())
            .await?;
    eprintln!(
        "negative control: WAL inserted up to {}, written up to {}",
        unwritten.0, unwritten.1
    );
    cluster.stop_immediate().await?;
    unsafe_pool.close().await;
    ensure!(
        world.pop.messages(&row.mailbox).is_empty(),
        "the server deleted everything at QUIT"
    );
    cluster.start_server().await?;

    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary(
        "negative_control_async_commit_crash",
        1,
        ledger.len(),
        &tally,
    );
    ensure!(
        !tally.lost.is_empty(),
        "the suite must detect the loss when commits are not durable before DELE: {tally:?}"
    );
    ensure!(tally.duplicated.is_empty(), "{tally:?}");
    world.finish().await
}
