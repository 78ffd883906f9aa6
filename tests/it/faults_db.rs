//! The database behind a TCP relay (`support::fault_proxy`, as an HAProxy or a cloud load
//! balancer sits in front of PostgreSQL), on a private cluster: restarted, frozen mid-commit,
//! frozen while `/readyz` is asked, and down when `ccmail run` starts. Each recovers within a
//! stated bound with nothing lost and nothing stored twice (messages stored vs delivered).
//!
//! Bounds (also in RELIABILITY.md): a restart or a frozen commit is recovered from — every
//! delivered message stored once, the mailbox empty — within [`RECOVERY`]; `/readyz` turns
//! red within [`READY_RED`] of a freeze; a worker started while the database is down ingests
//! within [`RECOVERY`] of the database coming up.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use ccmail::store::{Db, DbSettings, PilotRow};
use ccmail::telemetry;
use secrecy::ExposeSecret;

use crate::support::child::CcmailChild;
use crate::support::fault_proxy::{CommitCut, FaultProxy};
use crate::support::pg_cluster::PgCluster;
use crate::support::pipeline::{Ledger, PipelineWorld, small_limits};
use crate::support::scenario::{Running, fill, summary};
use crate::support::wait::wait_until;

/// Time to recover from each fault: every delivered message stored once, mailboxes empty.
const RECOVERY: Duration = Duration::from_secs(60);
/// Time for `/readyz` to turn red once the database is frozen (its check gives up after 3 s).
const READY_RED: Duration = Duration::from_secs(15);

/// Deadlines short enough for a test to see them expire, long enough for a loaded machine.
fn quick_settings() -> DbSettings {
    DbSettings {
        max_connections: 8,
        statement_timeout: Duration::from_secs(10),
        idle_in_transaction_timeout: Duration::from_secs(2),
        acquire_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(3),
        tcp_keepalive: Duration::from_secs(5),
    }
}

/// `url` with its `host:port` replaced by the relay's address.
fn through(proxy: &FaultProxy, url: &str) -> anyhow::Result<String> {
    let (scheme_user, rest) = url.split_once('@').context("a URL with a user")?;
    let (_, path) = rest.split_once('/').context("a URL with a database")?;
    Ok(format!("{scheme_user}@{}/{path}", proxy.addr()))
}

/// The cluster's `127.0.0.1:port`, for the relay to forward to.
fn upstream(cluster: &PgCluster) -> anyhow::Result<std::net::SocketAddr> {
    let url = cluster.url();
    let (_, rest) = url.split_once('@').context("a URL with a user")?;
    let (addr, _) = rest.split_once('/').context("a URL with a database")?;
    Ok(addr.parse()?)
}

/// Waits (at most [`RECOVERY`]) until every pilot's mailbox is empty and every delivered
/// message is stored.
async fn recovered(
    world: &PipelineWorld,
    rows: &[PilotRow],
    ledger: &Ledger,
    board: impl Fn() -> String,
) -> anyhow::Result<()> {
    wait_until(
        "every message stored and every mailbox empty",
        RECOVERY,
        || async {
            Ok(rows
                .iter()
                .all(|r| world.pop.messages(&r.mailbox).is_empty())
                && world.work_items().await? >= ledger.len() as i64)
        },
        board,
    )
    .await
}

#[tokio::test]
async fn a_restart_behind_a_tcp_relay_is_retried_soon_and_stores_everything_once()
-> anyhow::Result<()> {
    let mut cluster = PgCluster::start(&[]).await?;
    let proxy = FaultProxy::start_postgres(upstream(&cluster)?).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let mut rows = Vec::new();
    let mut ledger = Ledger::default();
    for (i, name) in ["support", "sales"].into_iter().enumerate() {
        let row = world.add_pilot(name, |_| {}).await?;
        fill(&world, &mut ledger, &row, 30, 0xd0_0000 + i as u64)?;
        rows.push(row);
    }
    // Slow bytes spread the ingest over a few seconds, so the restart lands in the middle.
    world
        .pop
        .set_fault(Some(ccmail_lab::sim::pop3::Fault::Slow {
            chunk: 1024,
            delay: Duration::from_millis(3),
        }));
    let pool = Db::connect_lazy(&through(&proxy, world.db.url())?, &quick_settings())?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let running = Running::start(&world, pool, &ids, small_limits())?;
    wait_until(
        "the first work items",
        RECOVERY,
        || async { Ok(world.work_items().await? >= 6) },
        || running.board(),
    )
    .await?;
    cluster.restart_immediate().await?;
    let at_restart = world.work_items().await?;
    ensure!(
        at_restart < ledger.len() as i64,
        "the restart must land in the middle of ingest ({at_restart} of {} stored)",
        ledger.len()
    );
    world.pop.clear_faults();
    // The fast settings retry permanent errors after 1 s too, so the bound alone would not
    // show the classification: the pilot rows must never show a permanent store error.
    recovered(&world, &rows, &ledger, || running.board()).await?;
    running.stop().await?;

    let tally = ledger.check(&world.heads(&ids).await?);
    summary("db_restart_behind_relay", 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    ensure!(world.work_items().await? == ledger.len() as i64);
    ensure!(
        proxy.connections() > 1,
        "the pool reconnected through the relay"
    );
    world.finish().await
}

/// Where a test freezes one database connection, keeping its sockets open.
#[derive(Clone, Copy)]
enum FreezeAt {
    /// At the next `COMMIT`, before forwarding it.
    Commit,
    /// At the next statement inside a transaction (an insert of a batch).
    Statement,
}

/// Freezes one connection at `at` while a supervisor stores 8 messages through the relay, then
/// checks that everything is stored exactly once (within [`RECOVERY`]).
async fn a_frozen_connection_is_recovered_from(
    at: FreezeAt,
    name: &str,
    seed: u64,
) -> anyhow::Result<()> {
    let cluster = PgCluster::start(&[]).await?;
    let proxy = FaultProxy::start_postgres(upstream(&cluster)?).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 8, seed)?;
    match at {
        FreezeAt::Commit => proxy.cut_next_commit(CommitCut::Freeze),
        FreezeAt::Statement => proxy.freeze_next_statement_in_transaction(),
    }
    let pool = Db::connect_lazy(&through(&proxy, world.db.url())?, &quick_settings())?;
    let running = Running::start(&world, pool, &[row.id], small_limits())?;
    recovered(&world, std::slice::from_ref(&row), &ledger, || {
        running.board()
    })
    .await?;
    running.stop().await?;
    ensure!(
        proxy.faults() == 1,
        "{name}: exactly one connection was frozen"
    );
    if let FreezeAt::Commit = at {
        ensure!(
            proxy.cut_transactions().len() == 1,
            "the frozen transaction was recorded"
        );
    }
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary(name, 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    ensure!(world.work_items().await? == ledger.len() as i64);
    world.finish().await
}

#[tokio::test]
async fn a_connection_frozen_mid_commit_fails_within_its_deadline_and_the_retry_stores_once()
-> anyhow::Result<()> {
    a_frozen_connection_is_recovered_from(FreezeAt::Commit, "db_frozen_mid_commit", 0xd1_0000).await
}

/// The connection goes silent in the middle of a batch's inserts (after `BEGIN`, no answer to
/// the statement, not even the server's statement timeout): the batch's own deadline
/// (`database.operation_timeout_secs` × 4 plus one acquire: 15 s here) fails it as transient,
/// nothing of it is deleted from the server, and the retry stores everything once.
#[tokio::test]
async fn a_connection_frozen_mid_insert_fails_within_the_batch_deadline_and_the_retry_stores_once()
-> anyhow::Result<()> {
    a_frozen_connection_is_recovered_from(FreezeAt::Statement, "db_frozen_mid_insert", 0xd1_0100)
        .await
}

/// `/readyz`'s status code (200 or 503), or an error when nothing answers.
async fn readyz(addr: &str) -> anyhow::Result<u16> {
    match telemetry::probe(addr, "/readyz", Duration::from_secs(10)).await {
        Ok(_) => Ok(200),
        Err(telemetry::ProbeError::Status { status, .. }) => Ok(status),
        Err(e) => bail!("/readyz did not answer: {e}"),
    }
}

#[tokio::test]
async fn run_waits_for_a_database_that_is_down_and_readyz_is_red_while_it_is_frozen()
-> anyhow::Result<()> {
    let mut cluster = PgCluster::start(&[]).await?;
    let proxy = FaultProxy::start_postgres(upstream(&cluster)?).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 6, 0xd2_0000)?;
    cluster.stop_immediate().await?;

    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        world
            .worker_toml(&through(&proxy, world.db.url())?, "127.0.0.1:0")
            .replace(
                "[database]\n",
                "[database]\nacquire_timeout_secs = 3\noperation_timeout_secs = 3\n\
                 idle_in_transaction_timeout_secs = 2\n",
            ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config_arg, "run"],
        &[("CCMAIL_MASTER_KEY", key.expose_secret())],
    )?;
    let addr = child
        .listen_addr(Duration::from_secs(30))
        .await?
        .to_string();
    wait_until(
        "the worker logging that it waits for the database",
        RECOVERY,
        || async {
            child.assert_running()?;
            Ok(child.output().contains("waiting for the database"))
        },
        || child.log_tail(),
    )
    .await?;
    ensure!(
        readyz(&addr).await? == 503,
        "not ready while the database is down"
    );
    child.assert_running()?;

    cluster.start_server().await?;
    recovered(&world, std::slice::from_ref(&row), &ledger, || {
        child.log_tail()
    })
    .await?;
    ensure!(readyz(&addr).await? == 200, "ready once the database is up");

    proxy.freeze();
    wait_until(
        "/readyz red while the database is frozen",
        READY_RED,
        || async { Ok(readyz(&addr).await? == 503) },
        || child.log_tail(),
    )
    .await?;
    proxy.thaw();
    wait_until(
        "/readyz green again after the freeze",
        RECOVERY,
        || async { Ok(readyz(&addr).await? == 200) },
        || child.log_tail(),
    )
    .await?;

    child.terminate()?;
    let status = child.wait(Duration::from_secs(30)).await?;
    ensure!(
        status.success(),
        "exit status {status}:\n{}",
        child.log_tail()
    );
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary("db_down_at_start", 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    world.finish().await
}

#[tokio::test]
async fn every_pooled_session_carries_the_server_side_timeouts_and_migrations_are_exempt()
-> anyhow::Result<()> {
    let db = ccmail_lab::testdb::TestDb::new().await?;
    let pool = Db::connect_lazy(db.url(), &quick_settings())?;
    let shown: (String, String, String) = sqlx::query_as(
        "select current_setting('statement_timeout'), \
         current_setting('idle_in_transaction_session_timeout'), \
         current_setting('tcp_keepalives_idle')",
    )
    .fetch_one(pool.pool())
    .await?;
    ensure!(
        shown == ("10s".to_owned(), "2s".to_owned(), "5".to_owned()),
        "{shown:?}"
    );
    // A migration may run longer than an ingest statement: `migrate` lifts the limit for
    // itself and gives the connection back with the session's own value.
    pool.migrate().await?;
    let after: String = sqlx::query_scalar("select current_setting('statement_timeout')")
        .fetch_one(pool.pool())
        .await?;
    ensure!(after == "10s", "{after}");
    pool.ping().await?;
    pool.close().await;

    let zero = DbSettings {
        operation_timeout: Duration::ZERO,
        ..quick_settings()
    };
    let refused = Db::connect_lazy(db.url(), &zero)
        .err()
        .context("a zero deadline is refused")?;
    ensure!(
        refused.to_string().contains("operation_timeout"),
        "{refused}"
    );
    db.drop_db().await?;
    Ok(())
}

/// The value of the unlabelled counter `name` in this process's exposition.
fn counter_value(name: &str) -> f64 {
    telemetry::global()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_poll_outcome_that_cannot_be_recorded_is_counted_and_ingest_resumes_after_a_freeze()
-> anyhow::Result<()> {
    const RECORD_ERRORS: &str = "ccmail_status_record_errors_total";
    let cluster = PgCluster::start(&[]).await?;
    let proxy = FaultProxy::start_postgres(upstream(&cluster)?).await?;
    let world = PipelineWorld::start_on(&cluster.url()).await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let mut ledger = Ledger::default();
    fill(&world, &mut ledger, &row, 3, 0xd3_0000)?;
    let pool = Db::connect_lazy(&through(&proxy, world.db.url())?, &quick_settings())?;
    let running = Running::start(&world, pool, &[row.id], small_limits())?;
    recovered(&world, std::slice::from_ref(&row), &ledger, || {
        running.board()
    })
    .await?;
    let before = counter_value(RECORD_ERRORS);

    // Every connection goes silent: polls fail on their deadlines, and so does writing that
    // failure to the pilot's row, which must be counted rather than lost without a trace.
    proxy.freeze();
    wait_until(
        "a failed status record counted",
        RECOVERY,
        || async { Ok(counter_value(RECORD_ERRORS) > before) },
        || running.board(),
    )
    .await?;
    proxy.thaw();
    fill(&world, &mut ledger, &row, 3, 0xd3_0001)?;
    recovered(&world, std::slice::from_ref(&row), &ledger, || {
        running.board()
    })
    .await?;
    running.stop().await?;
    let tally = ledger.check(&world.heads(&[row.id]).await?);
    summary("db_frozen_status_record", 1, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    world.finish().await
}
