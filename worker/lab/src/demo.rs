//! `ccmail-lab demo`: the whole pipeline on one machine, with nothing but PostgreSQL.
//!
//! It starts the lab's [`World`] (the Entra and Exchange simulators), registers an app and two mailbox pilots
//! (support@ and sales@ of a demo tenant), fills both mailboxes with realistic generated mail
//! (multipart/alternative, attachments, non-ASCII names and subjects, replies, one malformed
//! message and one over the size limit), runs the real supervisor until the mailboxes are
//! drained, and prints what agents would see. Each run uses fresh simulators and fresh UIDLs,
//! so running it again adds that run's messages and never doubles earlier ones; the demo checks
//! its own run (every delivered message stored exactly once) before it reports success.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use crate::sim::mailgen::{self, MailGen};
use crate::world::World;
use ccmail::config::Config;
use ccmail::ingest::supervisor::{Supervisor, SupervisorSettings};
use ccmail::secrets::MasterKey;
use ccmail::store;

/// Demo sizes.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Messages per mailbox (besides the malformed and the oversize one).
    pub messages_per_mailbox: usize,
    /// Give up if the mailboxes are not drained within this time.
    pub deadline: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            messages_per_mailbox: 40,
            deadline: Duration::from_secs(120),
        }
    }
}

/// What a demo run did, for the printout and for tests.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    pub delivered: usize,
    pub stored_once: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub left_on_server: usize,
    pub token_requests: u64,
    pub elapsed: Duration,
}

const DEMO_DOMAIN: &str = "contoso.test";
const OVERSIZE_LIMIT: u64 = 2 * 1024 * 1024;

/// Runs the demo against the database in `config` and prints its report.
pub async fn run(config: &Config, options: &DemoOptions) -> anyhow::Result<DemoOutcome> {
    let url = &config.database.url;
    match store::ensure_database(url).await {
        Ok(true) => println!("created database {}", store::redacted_url(url)),
        Ok(false) => {}
        Err(store::StoreError::Unreachable { .. }) => bail!(
            "PostgreSQL is not answering at {}: start it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` or set DATABASE_URL",
            store::redacted_url(url)
        ),
        Err(e) => return Err(e).context("preparing the demo database"),
    }
    let pool = store::connect(url, config.database.max_connections).await?;
    store::migrate(&pool).await?;

    let started = std::time::Instant::now();
    let run_id = format!("{:08x}", fastrand::u32(..));
    let client_id = format!("{:08x}-demo-app-{run_id}", fastrand::u32(..));
    let world = World::builder()
        .ca_name("ccmail demo CA")
        .domain(DEMO_DOMAIN)
        .client_id(&client_id)
        .client_secret(&format!("demo~{:032x}", fastrand::u128(..)))
        .start()
        .await?;
    let pop = &world.pop;
    let entra = &world.entra;

    // The demo's own master key: the client secret is sealed with it like any other.
    let key = MasterKey::generate();
    let mut conn = pool.acquire().await?;
    let app = world
        .insert_app(&mut conn, &format!("demo-{run_id}"), &key)
        .await?;

    let addr = pop.tls_addr();
    let mut pilots = Vec::new();
    let mut mails = MailGen::new(fastrand::u64(..));
    let mut markers: HashMap<String, usize> = HashMap::new();
    let mut delivered = 0;
    for (queue, local) in [("support", "support"), ("sales", "sales")] {
        let mailbox = format!("{local}+{run_id}@{DEMO_DOMAIN}");
        pop.add_mailbox(&mailbox);
        let mut pilot = world.new_pilot(queue, &mailbox, app.id);
        pilot.max_message_bytes = OVERSIZE_LIMIT;
        let row = store::insert_pilot(&mut conn, &pilot).await?;
        pilots.push(row.id);
        let mut batch: Vec<Vec<u8>> = (0..options.messages_per_mailbox)
            .map(|_| mails.mixed(&mailbox))
            .collect();
        batch.push(mails.malformed(&mailbox));
        batch.push(mails.oversize(&mailbox, OVERSIZE_LIMIT as usize + 512 * 1024));
        for raw in batch {
            if let Some(m) = mailgen::marker(&raw) {
                markers.insert(m, 0);
            }
            pop.deliver(&mailbox, raw);
            delivered += 1;
        }
    }
    drop(conn);
    println!(
        "demo: {delivered} messages delivered to 2 simulated Exchange Online mailboxes ({DEMO_DOMAIN}, app {client_id})"
    );

    let tokens = Arc::new(world.cache()?);
    let mut settings = SupervisorSettings::from_config(config);
    // The demo's token endpoint is its own simulator: allowed for this run only.
    settings.credentials.allow_authority(&entra.authority())?;
    settings
        .credentials
        .allow_xoauth2_host(&addr.ip().to_string());
    let supervisor =
        Supervisor::new(pool.clone(), tokens, settings, Some(key)).only_pilots(pilots.clone());
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(supervisor.run(shutdown.clone()));

    // Drained: only the oversize messages remain (they stay on the server by design).
    let mailboxes: Vec<String> = ["support", "sales"]
        .iter()
        .map(|l| format!("{l}+{run_id}@{DEMO_DOMAIN}"))
        .collect();
    let deadline = tokio::time::Instant::now() + options.deadline;
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        ticker.tick().await;
        let left: usize = mailboxes.iter().map(|m| pop.messages(m).len()).sum();
        if left <= mailboxes.len() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            let _ = worker.await;
            bail!(
                "the demo mailboxes were not drained within {:?}; {left} messages left",
                options.deadline
            );
        }
    }
    shutdown.cancel();
    worker.await.context("worker task")?;
    let elapsed = started.elapsed();

    // Check this run: every delivered message stored exactly once.
    let mut conn = pool.acquire().await?;
    for head in store::message_heads(&mut conn, &pilots).await? {
        if let Some(count) = mailgen::marker(&head).and_then(|m| markers.get_mut(&m)) {
            *count += 1;
        }
    }
    let stored_once = markers.values().filter(|c| **c == 1).count();
    let lost = markers.values().filter(|c| **c == 0).count();
    let duplicated = markers.values().filter(|c| **c > 1).count();
    let left_on_server = mailboxes.iter().map(|m| pop.messages(m).len()).sum();
    for id in &pilots {
        // The simulators stop with the demo; a later `ccmail run` must not poll them.
        store::set_pilot_enabled(&mut conn, *id, false).await?;
    }

    println!();
    println!("work items per queue (whole database):");
    for c in store::queue_counts(&mut conn).await? {
        println!("  {:<12} {:<10} {:>6}", c.queue, c.status, c.count);
    }
    println!();
    println!("latest work items:");
    for w in store::recent_work_items(&mut conn, 6).await? {
        let flags = if w.flags.is_empty() {
            String::new()
        } else {
            let words: Vec<&str> = w.flags.iter().map(|f| f.as_str()).collect();
            format!(" [{}]", words.join(", "))
        };
        println!(
            "  #{:<6} {:<8} {:<40.40} from {:<30.30} {} attachment(s){}",
            w.id,
            w.queue,
            w.subject.as_deref().unwrap_or("(no subject)"),
            w.from
                .first()
                .and_then(|a| a.name.clone().or_else(|| a.email.clone()))
                .unwrap_or_else(|| "(unknown)".to_owned()),
            w.attachments,
            flags
        );
    }
    let outcome = DemoOutcome {
        delivered,
        stored_once,
        lost,
        duplicated,
        left_on_server,
        token_requests: entra.token_requests(),
        elapsed,
    };
    println!();
    println!(
        "this run: delivered {} | stored exactly once {} | lost {} | duplicated {} | left on server (oversize, flagged) {} | token requests {} | {:.1} s",
        outcome.delivered,
        outcome.stored_once,
        outcome.lost,
        outcome.duplicated,
        outcome.left_on_server,
        outcome.token_requests,
        outcome.elapsed.as_secs_f64()
    );
    world.stop(Duration::from_secs(30)).await?;
    if lost > 0 || duplicated > 0 {
        bail!("the demo found {lost} lost and {duplicated} duplicated messages");
    }
    Ok(outcome)
}
