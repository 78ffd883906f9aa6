//! Several replicas on one database (in one process, each a supervisor with its own replica
//! id): every pilot is polled by one replica at a time, the pilots spread evenly, a replica
//! that leaves hands its pilots over at once, and a replica whose lease was taken over touches
//! neither the mailbox nor the store again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ccmail::ingest::poller::IngestLimits;
use ccmail::ingest::supervisor::{Supervisor, SupervisorSettings};
use ccmail::store::PilotRow;
use ccmail::store::leases;
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::{Ledger, PipelineWorld};
use crate::support::scenario::{fast_settings, with_verb};
use crate::support::wait::poll;

const TTL: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(120);

fn settings(credentials: ccmail::secrets::CredentialPolicy) -> SupervisorSettings {
    SupervisorSettings {
        lease_ttl: TTL,
        ..fast_settings(IngestLimits::default(), credentials)
    }
}

struct Replica {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Replica {
    fn start(world: &PipelineWorld, id: &str, pilots: &[i64]) -> anyhow::Result<Replica> {
        let supervisor = Supervisor::new(
            world.db.db().clone(),
            Arc::clone(&world.tokens),
            settings(world.credential_policy()),
            Some(world.master_key()?),
        )
        .only_pilots(pilots.iter().copied())
        .replica_id(id);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervisor.run(shutdown.clone()));
        Ok(Replica { shutdown, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("a replica did not stop within 30 s")?
            .context("a replica's task panicked")
    }
}

/// Live leases by holder.
async fn holders(world: &PipelineWorld) -> anyhow::Result<HashMap<String, usize>> {
    let mut conn = world.db.pool().acquire().await?;
    let mut counts = HashMap::new();
    for lease in leases::lease_holders(&mut conn).await? {
        if lease.live {
            *counts.entry(lease.holder).or_default() += 1;
        }
    }
    Ok(counts)
}

/// Waits until the live leases are exactly `want` (holder → pilots).
async fn wait_for_spread(
    world: &PipelineWorld,
    what: &str,
    want: &[(&str, usize)],
) -> anyhow::Result<()> {
    let want: HashMap<String, usize> = want.iter().map(|(h, n)| (h.to_string(), *n)).collect();
    let last = std::sync::Mutex::new(HashMap::new());
    poll(
        what,
        DEADLINE,
        || async {
            let now = holders(world).await?;
            let done = now == want;
            *last.lock().unwrap() = now;
            Ok(done.then_some(()))
        },
        || format!("live leases by holder: {:?}", last.lock().unwrap()),
    )
    .await
}

async fn add_pilots(world: &PipelineWorld, n: usize) -> anyhow::Result<Vec<PilotRow>> {
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        rows.push(
            world
                .add_pilot(&format!("pilot{i:03}"), |p| {
                    p.poll_interval = Duration::from_secs(5)
                })
                .await?,
        );
    }
    Ok(rows)
}

/// Waits until every message of `ledger` is stored once, then checks it.
async fn wait_stored(world: &PipelineWorld, ids: &[i64], ledger: &Ledger) -> anyhow::Result<()> {
    let want = ledger.len();
    poll(
        "every delivered message stored",
        DEADLINE,
        || async {
            let n = world.heads(ids).await?.len();
            Ok((n >= want).then_some(()))
        },
        String::new,
    )
    .await?;
    ledger.check(&world.heads(ids).await?).assert_exactly_once()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_300_pilots_evenly_one_session_per_mailbox_and_hand_over_on_leaving()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let rows = add_pilots(&world, 300).await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let mut replicas = vec![
        Replica::start(&world, "replica-a", &ids)?,
        Replica::start(&world, "replica-b", &ids)?,
        Replica::start(&world, "replica-c", &ids)?,
    ];
    wait_for_spread(
        &world,
        "300 pilots spread 100/100/100 over three replicas",
        &[("replica-a", 100), ("replica-b", 100), ("replica-c", 100)],
    )
    .await?;

    let mut mails = MailGen::new(0x3e91_1ca5);
    let mut ledger = Ledger::default();
    for (i, row) in rows.iter().enumerate() {
        let raw = mails.message(&row.mailbox, Kind::ALL[i % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    wait_stored(&world, &ids, &ledger).await?;

    // One replica leaves: its pilots go to the other two at once (it released its leases),
    // and mail delivered to them is stored.
    let leaving = replicas.pop().context("three replicas")?;
    leaving.stop().await?;
    wait_for_spread(
        &world,
        "the leaving replica's pilots taken over by the other two",
        &[("replica-a", 150), ("replica-b", 150)],
    )
    .await?;
    for (i, row) in rows.iter().enumerate() {
        let raw = mails.message(&row.mailbox, Kind::ALL[(i + 1) % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    wait_stored(&world, &ids, &ledger).await?;
    for replica in replicas {
        replica.stop().await?;
    }

    let crowded: Vec<(&str, usize)> = rows
        .iter()
        .map(|r| (r.mailbox.as_str(), world.pop.peak_sessions(&r.mailbox)))
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        crowded.is_empty(),
        "mailboxes with more than one session at a time: {crowded:?}"
    );
    assert!(
        holders(&world).await?.is_empty(),
        "every lease was released on shutdown"
    );
    world.finish().await
}

#[tokio::test]
async fn a_replica_whose_lease_was_taken_over_sends_no_retr_or_dele_and_commits_nothing()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("taken", |_| {}).await?;
    let replica = Replica::start(&world, "replica-stale", &[row.id])?;
    wait_for_spread(
        &world,
        "the replica holds the pilot",
        &[("replica-stale", 1)],
    )
    .await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0x57a1e);
    ledger.deliver(
        &world.pop,
        &row.mailbox,
        mails.message(&row.mailbox, Kind::Plain),
    )?;
    wait_stored(&world, &[row.id], &ledger).await?;

    // Another holder takes the lease, as a replica would after this one stalled past its TTL:
    // the fence rises. From here on the old holder must not touch the mailbox or the store.
    sqlx::query(
        "update pilot_leases set holder = 'replica-new', fence = fence + 1, \
         expires_at = now() + interval '1 hour' where pilot_id = $1",
    )
    .bind(row.id)
    .execute(world.db.pool())
    .await?;
    let lost = || {
        ccmail::telemetry::global()
            .value(&ccmail::telemetry::LEASES_LOST, &[])
            .unwrap_or(0.0)
    };
    poll(
        "the old holder notices it lost the lease",
        DEADLINE,
        || async { Ok((lost() >= 1.0).then_some(())) },
        String::new,
    )
    .await?;
    world.pop.clear_commands();
    let logins_before = world.pop.logins();
    ledger.deliver(
        &world.pop,
        &row.mailbox,
        mails.message(&row.mailbox, Kind::Plain),
    )?;
    // The old holder's supervisor goes on ticking (renewing nothing, taking nothing: the lease
    // is live and someone else's); after several ticks nothing has touched the mailbox.
    let first = heartbeat(&world).await?;
    poll(
        "three more heartbeats of the old holder",
        DEADLINE,
        || async {
            let now = heartbeat(&world).await?;
            Ok((now - first >= chrono::Duration::seconds(3)).then_some(()))
        },
        String::new,
    )
    .await?;
    let commands = world.pop.commands();
    assert!(
        with_verb(&commands, "RETR").is_empty() && with_verb(&commands, "DELE").is_empty(),
        "the replica that lost the lease sent {commands:?}"
    );
    assert_eq!(world.pop.logins(), logins_before, "no login either");
    assert_eq!(
        world.heads(&[row.id]).await?.len(),
        1,
        "nothing stored after the takeover"
    );
    replica.stop().await?;
    world.finish().await
}

async fn heartbeat(world: &PipelineWorld) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    Ok(
        sqlx::query_scalar("select heartbeat_at from replicas where id = 'replica-stale'")
            .fetch_one(world.db.pool())
            .await?,
    )
}
