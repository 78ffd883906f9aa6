//! The worker in-process: `ccmail::app::run_on` with a listener the test bound on port 0 (no
//! port is chosen, released and reused), against the lab's [`World`] (one simulated mailbox
//! with N messages) and a fresh database. The test waits until the N work items exist, reads
//! `/metrics` from that listener (the pilot's `ccmail_messages_ingested_total` is N), cancels
//! the worker and checks that `run_on` returns `Ok` after draining: every message stored
//! exactly once and the mailbox empty.

use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail::config::Config;
use ccmail::secrets::MasterKey;
use ccmail::telemetry;
use ccmail_lab::testdb::TestDb;
use ccmail_lab::world::World;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::Ledger;
use crate::support::wait::wait_for;

const MESSAGES: usize = 12;
const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn run_on_ingests_a_mailbox_serves_metrics_and_drains_on_cancel() -> anyhow::Result<()> {
    let world = World::builder()
        .ca_name("ccmail in-process CA")
        .mailboxes(["support"])
        .messages(MESSAGES)
        .start()
        .await?;
    let mailbox = world.mailboxes[0].clone();
    let mut ledger = Ledger::default();
    for (_, raw) in world.pop.messages(&mailbox) {
        ledger.note(&raw)?;
    }
    ensure!(
        ledger.len() == MESSAGES,
        "the world holds {} messages",
        ledger.len()
    );

    let db = TestDb::new().await?;
    let key = MasterKey::generate();
    let pilot = {
        let mut conn = db.pool().acquire().await?;
        let app = world.insert_app(&mut conn, "in-process", &key).await?;
        let new = world.new_pilot("support", &mailbox, app.id);
        ccmail::store::insert_pilot(&mut conn, &new).await?
    };

    // The listener is bound here, on port 0, and handed over: its address is known before the
    // worker starts and no other process can take it in between.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let table: toml::Table = world
        .worker_toml(db.url(), &addr)
        .parse()
        .context("the world's worker settings")?;
    let env = [(
        "CCMAIL_MASTER_KEY".to_owned(),
        key.to_base64().expose_secret().to_owned(),
    )];
    let config = Config::from_sources(table, "world", &env)?;

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { ccmail::app::run_on(&config, listener, shutdown).await }
    });

    let pool = db.pool().clone();
    wait_for("the work items of every message", DEADLINE, || {
        let pool = pool.clone();
        async move {
            let mut conn = pool.acquire().await.ok()?;
            let n = ccmail_lab::testdb::work_item_count(&mut conn).await.ok()?;
            (n >= MESSAGES as i64).then_some(())
        }
    })
    .await?;

    let series = format!(
        "ccmail_messages_ingested_total{{pilot=\"{}\",queue=\"support\"}}",
        pilot.id
    );
    let ingested = wait_for("the pilot's ingested counter", DEADLINE, || {
        let (addr, series) = (addr.clone(), series.clone());
        async move {
            let text = telemetry::probe(&addr, "/metrics", Duration::from_secs(5))
                .await
                .ok()?;
            text.lines()
                .find(|l| l.starts_with(&series))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .filter(|v| *v >= MESSAGES as f64)
        }
    })
    .await?;
    ensure!(ingested == MESSAGES as f64, "{series} = {ingested}");

    shutdown.cancel();
    tokio::time::timeout(DEADLINE, worker)
        .await
        .context("run_on did not return after the cancel")???;

    let mut conn = db.pool().acquire().await?;
    let heads = ccmail::store::message_heads(&mut conn, &[pilot.id]).await?;
    drop(conn);
    ledger.check(&heads).assert_exactly_once()?;
    ensure!(
        world.pop.messages(&mailbox).is_empty(),
        "messages left on the server after the drain"
    );
    world.stop(DEADLINE).await?;
    db.drop_db().await?;
    Ok(())
}
