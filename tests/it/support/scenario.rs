//! Shared pieces of the fault-injection scenarios (`faults_*.rs`): fast supervisor settings,
//! mailboxes filled with every kind of mail, a supervisor running on a pool of the test's
//! choosing, counting POP3 commands, and the one summary line
//! each scenario prints:
//!
//! `scenario=<name> faults=<n> messages=<n> lost=<n> duplicated=<n>`

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ccmail::ingest::poller::IngestLimits;
use ccmail::ingest::supervisor::{StatusBoard, Supervisor, SupervisorSettings};
use ccmail::secrets::CredentialPolicy;
use ccmail::store::{Db, PilotRow};
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use tokio_util::sync::CancellationToken;

use super::pipeline::{Ledger, PipelineWorld};

use super::pipeline::{Tally, test_timeouts};

/// Supervisor settings that retry fast, so a scenario's recovery takes seconds; `credentials`
/// allow the world's simulators.
pub fn fast_settings(limits: IngestLimits, credentials: CredentialPolicy) -> SupervisorSettings {
    SupervisorSettings {
        limits,
        timeouts: test_timeouts(),
        reload_interval: Duration::from_secs(1),
        poll_jitter: 0.0,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(2),
        permanent_retry: Duration::from_secs(1),
        login_refusal_grace: ccmail::model::defaults::LOGIN_REFUSAL_GRACE,
        shutdown_grace: Duration::from_secs(10),
        lease_ttl: Duration::from_secs(30),
        credentials,
    }
}

/// Command lines of `commands` whose verb is `verb` (`"DELE"`, `"RETR"` …).
pub fn with_verb<'a>(commands: &'a [String], verb: &str) -> Vec<&'a String> {
    commands
        .iter()
        .filter(|c| {
            c.split(' ')
                .next()
                .is_some_and(|v| v.eq_ignore_ascii_case(verb))
        })
        .collect()
}

/// Prints the scenario's summary line (visible with `cargo nextest run --no-capture`).
pub fn summary(name: &str, faults: u64, messages: usize, tally: &Tally) {
    eprintln!(
        "scenario={name} faults={faults} messages={messages} lost={} duplicated={}",
        tally.lost.len(),
        tally.duplicated.len()
    );
}

/// Delivers `count` messages, every kind in turn, to the pilot's mailbox (noted in `ledger`).
pub fn fill(
    world: &PipelineWorld,
    ledger: &mut Ledger,
    row: &PilotRow,
    count: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let mut mails = MailGen::new(seed);
    for k in 0..count {
        let raw = mails.message(&row.mailbox, Kind::ALL[k % Kind::ALL.len()]);
        ledger.deliver(&world.pop, &row.mailbox, raw)?;
    }
    Ok(())
}

/// A supervisor over some pilots, running with [`fast_settings`] on a pool of the test's
/// choosing (a private cluster's, one behind a fault relay).
pub struct Running {
    status: StatusBoard,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn start(
        world: &PipelineWorld,
        pool: Db,
        pilots: &[i64],
        limits: IngestLimits,
    ) -> anyhow::Result<Running> {
        let supervisor = Supervisor::new(
            pool,
            Arc::clone(&world.tokens),
            fast_settings(limits, world.credential_policy()),
            Some(world.master_key()?),
        )
        .only_pilots(pilots.iter().copied());
        let status = supervisor.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervisor.run(shutdown.clone()));
        Ok(Running {
            status,
            shutdown,
            task,
        })
    }

    /// The pollers' status, for failure messages.
    pub fn board(&self) -> String {
        self.status
            .lock()
            .map(|b| format!("{b:?}"))
            .unwrap_or_default()
    }

    /// The consecutive failures of pilot `id` now.
    pub fn failing(&self, id: i64) -> u32 {
        self.status
            .lock()
            .ok()
            .and_then(|b| b.get(&id).map(|s| s.consecutive_failures))
            .unwrap_or(0)
    }

    /// The last error pilot `id` recorded, or "" when it has none.
    pub fn last_error(&self, id: i64) -> String {
        self.status
            .lock()
            .ok()
            .and_then(|b| b.get(&id).and_then(|s| s.last_error.clone()))
            .unwrap_or_default()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("the supervisor did not stop within 20 s")?
            .context("the supervisor panicked")?;
        Ok(())
    }
}
