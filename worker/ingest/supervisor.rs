//! Runs one poller task per enabled pilot and keeps that set in step with the database.
//!
//! Pilots and apps are data: the supervisor reads them at start, again whenever PostgreSQL
//! sends a `ccmail_config` notification (a wake-up hint), and every `reload_interval` (the
//! truth, in case a notification was missed). A pilot whose row or app changed is restarted
//! between polls; a disabled or removed one is stopped.
//!
//! Credentials sealed in the old form `enc:v1` (bound to no row) are sealed again as `enc:v2`
//! for the row they are in at the start of every reconciliation, before the rows are read
//! ([`store::upgrade_unbound_credentials`]; not by a supervisor restricted to some pilots, such
//! as the demo's, which leaves other rows alone); the pollers then never open a v1 value, so
//! one the upgrade left alone (held by several rows: a copy) is refused, not sent.
//!
//! Replicas (RELIABILITY.md, "Several replicas"): every `ccmail run` is a replica with its own
//! id. Every `lease_ttl / 3` (and on a notification) it renews its heartbeat row and every
//! lease it holds in one statement each, reads the live replicas, and places the enabled
//! pilots over them ([`Replicas::assign`]). It starts pollers only for pilots placed on it
//! whose lease it could take, stops those placed elsewhere and releases their leases once they
//! stopped, and stops at once a poller whose lease was not renewed (taken over: another
//! replica polls it now). Pollers started together spread their first polls over their
//! interval instead of all logging in at once.
//!
//! Shutdown: cancelling the token stops every poller between two messages; each finishes the
//! message in hand, commits, sends DELE and QUIT, and exits. The supervisor waits for them at
//! most `shutdown_grace`, then returns anyway (a poller cut off there loses nothing: it never
//! sent QUIT, so the server deleted nothing), after releasing its leases and removing its
//! heartbeat so the other replicas take its pilots at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::ingest::leasing::LeaseGuard;
use crate::ingest::pacing::{Pacing, PacingSettings};
pub use crate::ingest::pilot::{ResolveError, app_credentials, resolve_pilot};
use crate::ingest::placement::Replicas;
use crate::ingest::poller::{self, IngestLimits, Pilot, PollError, PollReport};
use crate::oauth::TokenCache;
use crate::pop3::Timeouts;
use crate::secrets::{self, CredentialPolicy, MasterKey};
use crate::store::leases::{self, Lease, ReplicaInfo};
use crate::store::{self, AppRow, ConfigListener, Db, PilotRow};
use crate::telemetry as metrics;

/// Pacing and limits for every poller.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    pub limits: IngestLimits,
    pub timeouts: Timeouts,
    pub reload_interval: Duration,
    pub poll_jitter: f64,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub permanent_retry: Duration,
    /// How long refused logins are retried quickly before they count as persistent.
    pub login_refusal_grace: Duration,
    pub shutdown_grace: Duration,
    /// How long a pilot's lease lasts without renewal: a replica that stops renewing (frozen,
    /// killed, cut off) loses its pilots after this long. Renewals run every third of it.
    pub lease_ttl: Duration,
    /// Where credentials may come from and go to (from the settings, never the database).
    /// The supervisor clears its `open_unbound_v1`: it upgrades such values instead.
    pub credentials: CredentialPolicy,
}

impl SupervisorSettings {
    /// From the loaded settings.
    pub fn from_config(config: &crate::config::Config) -> SupervisorSettings {
        let w = &config.worker;
        SupervisorSettings {
            limits: IngestLimits {
                max_messages_per_poll: w.max_messages_per_poll,
                batch_messages: w.batch_messages,
                batch_bytes: w.batch_bytes,
                max_retr_attempts: w.max_retr_attempts,
                commit_concurrency: w.commit_concurrency,
                parse_ahead: w.parse_ahead,
                max_poll_duration: w.max_poll_secs,
                max_listing_entries: w.max_listing_entries,
                parse: crate::ingest::parse::ParseLimits::from(&config.parse),
                refetch_after: w.refetch_failed_secs,
                sender_rate: crate::model::triage::SenderRate {
                    max_messages: config.classify.loop_max_messages,
                    window: config.classify.loop_window_secs,
                },
            },
            timeouts: crate::pop3::Timeouts::from(&config.pop3),
            reload_interval: w.reload_interval_secs,
            poll_jitter: w.poll_jitter,
            initial_backoff: w.initial_backoff_secs,
            max_backoff: w.max_backoff_secs,
            permanent_retry: w.permanent_retry_secs,
            login_refusal_grace: w.login_refusal_grace_secs,
            shutdown_grace: w.shutdown_grace_secs,
            lease_ttl: w.lease_ttl_secs,
            credentials: config.credential_policy(),
        }
    }
}

impl SupervisorSettings {
    /// What the pilot loop's [`Pacing`] reads, for a pilot polled every `poll_interval`.
    pub fn pacing(&self, poll_interval: Duration) -> PacingSettings {
        PacingSettings {
            poll_interval,
            poll_jitter: self.poll_jitter,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            permanent_retry: self.permanent_retry,
            login_refusal_grace: self.login_refusal_grace,
        }
    }
}

/// The latest outcome of each pilot, for the demo, `/metrics` and tests.
#[derive(Debug, Clone, Default)]
pub struct PilotStatus {
    pub polls: u64,
    pub last_report: Option<PollReport>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
}

/// Shared view of the pollers' progress.
pub type StatusBoard = Arc<Mutex<HashMap<i64, PilotStatus>>>;

/// Owns the poller tasks.
pub struct Supervisor {
    pool: Db,
    tokens: Arc<TokenCache>,
    settings: SupervisorSettings,
    master_key: Option<MasterKey>,
    /// Only these pilots (the demo runs its own pilots beside any others in the database).
    only: Option<HashSet<i64>>,
    status: StatusBoard,
    /// What the last upgrade pass warned about, so an unchanged problem is logged once.
    upgrade_warnings: Mutex<Vec<String>>,
    /// This replica's id: the lease holder's name in `pilot_leases` and `replicas`.
    replica: Arc<str>,
    /// The host name its heartbeat row shows (read once).
    host: String,
}

struct Running {
    fingerprint: String,
    cancel: CancellationToken,
    /// The lease the poller runs under (also kept for a pilot that cannot start, so its error
    /// is written by one replica only).
    guard: LeaseGuard,
    /// Wakes the poller for a "Poll now".
    poke: Arc<Notify>,
    /// The latest poll request the poller was woken for.
    poll_requested: Option<DateTime<Utc>>,
    /// The poller's task (`None` for a pilot that cannot start).
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A replica id nobody else has: host, process and a random suffix (a restarted process is a
/// new replica; it takes its pilots back when the old leases expire).
fn new_replica_id(host: &str) -> String {
    format!("{host}-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
                .take(100)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned())
}

impl Supervisor {
    /// A supervisor over the pilots in `pool`.
    pub fn new(
        pool: Db,
        tokens: Arc<TokenCache>,
        settings: SupervisorSettings,
        master_key: Option<MasterKey>,
    ) -> Supervisor {
        let mut settings = settings;
        // Every v1 value is upgraded before the rows are read; one still in v1 form then is
        // one that must not be sent.
        settings.credentials.open_unbound_v1 = false;
        let host = hostname();
        Supervisor {
            pool,
            tokens,
            settings,
            master_key,
            only: None,
            status: StatusBoard::default(),
            upgrade_warnings: Mutex::new(Vec::new()),
            replica: new_replica_id(&host).into(),
            host,
        }
    }

    /// Names this replica `id` instead of a generated one (tests running several replicas in
    /// one process; ids must differ between replicas).
    pub fn replica_id(mut self, id: &str) -> Supervisor {
        self.replica = id.into();
        self
    }

    /// Restricts the supervisor to these pilot ids.
    pub fn only_pilots(mut self, ids: impl IntoIterator<Item = i64>) -> Supervisor {
        self.only = Some(ids.into_iter().collect());
        self
    }

    /// The progress board, readable while [`Supervisor::run`] runs.
    pub fn status(&self) -> StatusBoard {
        self.status.clone()
    }

    /// Runs until `shutdown` is cancelled, then drains the pollers (bounded by the grace).
    pub async fn run(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut running: HashMap<i64, Running> = HashMap::new();
        // Pollers told to stop whose pilot may start again here (changed, or its lease lost
        // and taken again): the next poller of that pilot waits for its predecessor to end.
        let mut draining: HashMap<i64, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut listener = self.listen().await;
        loop {
            // Bounded by the store's deadlines, and cut short by a shutdown.
            let reconciled = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.reconcile(&tracker, &shutdown, &mut running, &mut draining) => r,
            };
            if let Err(e) = reconciled {
                tracing::warn!(error = %e, "could not read pilots; keeping the current set");
            }
            let wait = tokio::time::sleep(self.tick());
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wait => {}
                notified = recv(&mut listener) => {
                    if !notified {
                        // The listening connection broke; periodic reloads still work.
                        listener = self.listen().await;
                    }
                }
            }
        }
        for r in running.values() {
            r.cancel.cancel();
        }
        tracker.close();
        let grace = self.settings.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "pollers still busy after the shutdown grace; exiting without their QUIT (nothing is deleted)"
            );
        } else {
            tracing::info!("all pollers stopped");
        }
        // A poller still busy past the grace acts on nothing more: its lease is given up now.
        for r in running.values() {
            r.guard.lose();
        }
        self.leave().await;
    }

    /// How often leases are renewed and the pilots placed: a third of the lease TTL, or the
    /// reload interval when that is shorter.
    fn tick(&self) -> Duration {
        (self.settings.lease_ttl / 3)
            .min(self.settings.reload_interval)
            .max(Duration::from_millis(100))
    }

    /// Releases every lease and removes the heartbeat row, so the other replicas take the
    /// pilots at their next tick instead of after the TTL.
    async fn leave(&self) {
        let me = self.replica.clone();
        let left = self
            .pool
            .with_conn("release this replica's leases", async |conn| {
                let released = leases::release_all(conn, &me).await?;
                leases::remove_replica(conn, &me).await?;
                Ok(released)
            })
            .await;
        match left {
            Ok(released) => {
                tracing::info!(replica = %me, released, "released this replica's pilot leases")
            }
            Err(e) => {
                tracing::warn!(replica = %me, error = %e, "could not release the pilot leases; the other replicas take the pilots when they expire")
            }
        }
    }

    async fn listen(&self) -> Option<ConfigListener> {
        match ConfigListener::connect(&self.pool).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for pilot changes; relying on periodic reloads");
                None
            }
        }
    }

    async fn reconcile(
        &self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        running: &mut HashMap<i64, Running>,
        draining: &mut HashMap<i64, tokio::task::JoinHandle<()>>,
    ) -> Result<(), store::StoreError> {
        draining.retain(|_, task| !task.is_finished());
        let ttl = self.settings.lease_ttl;
        let me = self.replica.clone();
        let info = ReplicaInfo {
            id: &me,
            hostname: &self.host,
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            version: env!("CARGO_PKG_VERSION"),
        };
        let held: Vec<Lease> = running.values().map(|r| r.guard.last_known()).collect();
        let sent = Instant::now();
        let (rows, live, renewed, unheld) = self
            .pool
            .with_conn("renew leases and read the pilots", async |conn| {
                // A supervisor restricted to some pilots (the demo) leaves other rows alone.
                if let (Some(key), None) = (&self.master_key, &self.only) {
                    self.upgrade_unbound(conn, key).await;
                }
                leases::heartbeat_replica(conn, &info).await?;
                let renewed = leases::renew_leases(conn, &held, &me, ttl).await?;
                let live = leases::live_replicas(conn, ttl).await?;
                let rows = store::enabled_pilots_with_apps(conn).await?;
                let unheld = leases::unheld_pilots(conn).await?;
                Ok((rows, live, renewed, unheld))
            })
            .await?;
        // A pilot between two holders (a takeover in progress) counts for a tick; the alert
        // waits minutes on top.
        metrics::global().pilots_unheld(unheld);
        let renewed: HashMap<i64, Lease> = renewed.into_iter().map(|l| (l.pilot_id, l)).collect();
        running.retain(|id, r| {
            match renewed.get(id) {
                Some(lease) => {
                    r.guard.renewed(*lease, sent, ttl);
                    true
                }
                None => {
                    tracing::warn!(pilot = id, replica = %me, "lost the pilot's lease (another replica took it over, or it expired before this one renewed it); stopping its poller");
                    metrics::global().lease_lost();
                    r.guard.lose();
                    r.cancel.cancel();
                    if let Some(task) = r.task.take() {
                        draining.insert(*id, task);
                    }
                    false
                }
            }
        });
        let mut replicas = live;
        if !replicas.iter().any(|r| **r == *me) {
            replicas.push(me.to_string());
        }
        metrics::global().replicas_alive(replicas.len());

        let mut wanted: HashMap<i64, (String, PilotRow, Option<AppRow>, metrics::PilotMetrics)> =
            HashMap::new();
        for (pilot, app) in rows {
            if self.only.as_ref().is_some_and(|o| !o.contains(&pilot.id)) {
                continue;
            }
            let fingerprint = fingerprint(&pilot, app.as_ref());
            // Series exist from the moment the pilot is loaded, even if it cannot start.
            let handle = metrics::global().pilot_loaded(
                pilot.id,
                &pilot.queue,
                pilot.last_success_at.map(std::time::SystemTime::from),
            );
            if let Some(app) = &app {
                metrics::global().app_loaded(&app.token_key().telemetry_id(), &app.name);
            }
            wanted.insert(pilot.id, (fingerprint, pilot, app, handle));
        }
        metrics::global().retain_pilots(&wanted.keys().copied().collect());
        let ids: Vec<i64> = wanted.keys().copied().collect();
        let placement = Replicas::new(&replicas);
        let assigned = placement.assign(&ids);
        let mine: HashSet<i64> = ids
            .iter()
            .copied()
            .filter(|id| assigned.get(id).is_some_and(|r| *r == &*me))
            .collect();

        // Keep what is unchanged and placed here; stop the rest. A changed pilot placed here
        // keeps its lease for the new poller; one placed elsewhere (or gone) is released once
        // its poller has stopped, so the next holder never overlaps it.
        let mut carried: HashMap<i64, LeaseGuard> = HashMap::new();
        let mut stopped: Vec<i64> = Vec::new();
        for (id, r) in running.iter_mut() {
            let entry = wanted.get(id);
            let same = entry.is_some_and(|(f, ..)| *f == r.fingerprint);
            if same && mine.contains(id) {
                let requested = entry.and_then(|(_, row, ..)| row.poll_requested_at);
                if requested > r.poll_requested {
                    tracing::info!(pilot = id, "poll requested; polling now");
                    r.poll_requested = requested;
                    r.poke.notify_one();
                }
                continue;
            }
            r.cancel.cancel();
            stopped.push(*id);
            if entry.is_some() && mine.contains(id) {
                tracing::info!(pilot = id, "restarting poller (pilot or app changed)");
                carried.insert(*id, r.guard.clone());
                if let Some(task) = r.task.take() {
                    draining.insert(*id, task);
                }
                continue;
            }
            tracing::info!(
                pilot = id,
                to = entry
                    .and_then(|_| assigned.get(id).copied())
                    .unwrap_or("nobody"),
                "stopping poller (pilot disabled, removed or placed on another replica)"
            );
            let (pool, guard, task, me) = (
                self.pool.clone(),
                r.guard.clone(),
                r.task.take(),
                me.clone(),
            );
            tracker.spawn(async move {
                if let Some(task) = task {
                    let _ = task.await;
                }
                let lease = guard.last_known();
                guard.lose();
                let released = pool
                    .with_conn("release a pilot lease", async |conn| {
                        leases::release_lease(conn, &lease, &me).await
                    })
                    .await;
                if let Err(e) = released {
                    tracing::warn!(pilot = lease.pilot_id, error = %e, "could not release the pilot's lease; it expires on its own");
                }
            });
        }
        for id in stopped {
            running.remove(&id);
        }

        let mut to_start: Vec<i64> = mine
            .iter()
            .copied()
            .filter(|id| !running.contains_key(id))
            .collect();
        to_start.sort_unstable();
        let need: Vec<i64> = to_start
            .iter()
            .copied()
            .filter(|id| !carried.contains_key(id))
            .collect();
        let sent = Instant::now();
        let taken = if need.is_empty() {
            Vec::new()
        } else {
            self.pool
                .with_conn("take pilot leases", async |conn| {
                    leases::acquire_leases(conn, &need, &me, ttl).await
                })
                .await?
        };
        for lease in taken {
            if lease.fence > 1 {
                metrics::global().lease_takeover();
            }
            carried.insert(
                lease.pilot_id,
                LeaseGuard::new(me.clone(), lease, sent, ttl),
            );
        }
        let starting: Vec<i64> = to_start
            .into_iter()
            .filter(|id| carried.contains_key(id))
            .collect();
        let count = starting.len() as u32;
        for (n, id) in starting.into_iter().enumerate() {
            let (Some(guard), Some((fingerprint, row, app, handle))) =
                (carried.remove(&id), wanted.remove(&id))
            else {
                continue;
            };
            let pilot = match resolve_pilot(
                &row,
                app.as_ref(),
                self.master_key.as_ref(),
                &self.settings.credentials,
                self.settings.timeouts,
            ) {
                // The loaded handle: the one that remembers the last success across reloads.
                Ok(p) => Pilot {
                    metrics: handle.clone(),
                    lease: Some(guard.clone()),
                    ..p
                },
                Err(e) => {
                    tracing::error!(pilot = id, error = %e, retry = ?e.retry(), "pilot cannot start");
                    handle.ingest_error("config");
                    // A row that breaks the schema's limits cannot even take its error: log
                    // it and go on, so one bad row never keeps the other pilots from starting.
                    let (text, hint) = (e.to_string(), e.hint());
                    let recorded = self
                        .pool
                        .with_conn("record why a pilot cannot start", async |conn| {
                            store::record_poll_error(conn, id, &text, hint).await
                        })
                        .await;
                    if let Err(record) = recorded {
                        tracing::warn!(pilot = id, error = %record, "could not record why the pilot cannot start");
                    }
                    // Remember the fingerprint so the error is not rewritten every reload.
                    running.insert(
                        id,
                        Running {
                            fingerprint,
                            cancel: CancellationToken::new(),
                            guard,
                            poke: Arc::new(Notify::new()),
                            poll_requested: row.poll_requested_at,
                            task: None,
                        },
                    );
                    continue;
                }
            };
            // Pollers started together (start-up, a takeover, a reload) spread their first
            // polls evenly over their interval; a pilot started alone polls at once.
            let first_in = if count > 1 {
                pilot
                    .poll_interval
                    .mul_f64(f64::from(n as u32) / f64::from(count))
            } else {
                Duration::ZERO
            };
            let cancel = shutdown.child_token();
            let poke = Arc::new(Notify::new());
            tracing::info!(pilot = id, queue = %pilot.queue, fence = guard.last_known().fence, first_poll_in_ms = first_in.as_millis() as u64, "starting poller");
            let start = Start {
                after: draining.remove(&id),
                first_in,
                poke: poke.clone(),
            };
            let task = tracker.spawn(pilot_loop(
                pilot,
                self.pool.clone(),
                self.tokens.clone(),
                self.settings.clone(),
                cancel.clone(),
                self.status.clone(),
                start,
            ));
            running.insert(
                id,
                Running {
                    fingerprint,
                    cancel,
                    guard,
                    poke,
                    poll_requested: row.poll_requested_at,
                    task: Some(task),
                },
            );
        }
        // Leases taken for pilots that were not started after all are given back.
        let unused: Vec<Lease> = carried.values().map(LeaseGuard::last_known).collect();
        if !unused.is_empty() {
            let released = self
                .pool
                .with_conn("release unused leases", async |conn| {
                    for lease in &unused {
                        leases::release_lease(conn, lease, &me).await?;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = released {
                tracing::warn!(error = %e, "could not release unused pilot leases; they expire on their own");
            }
        }
        metrics::global().leases_held(running.len());
        Ok(())
    }
}

impl Supervisor {
    /// Seals every `enc:v1` credential sealed with `key` again as `enc:v2` for its row, and
    /// logs what it did: how many it upgraded (info), and each value it left alone (warn, once
    /// while the problem stays the same). A database error leaves the v1 values in place; the
    /// pilots using them are refused until a later pass upgrades them.
    async fn upgrade_unbound(&self, conn: &mut store::Conn, key: &MasterKey) {
        let report = match store::upgrade_unbound_credentials(conn, |owner, stored| {
            secrets::upgrade(stored, key, owner).map_err(|e| e.to_string())
        })
        .await
        {
            Ok(report) => report,
            Err(e) => {
                tracing::warn!(error = %e, "could not seal enc:v1 credentials again as enc:v2; pilots using them stay refused");
                return;
            }
        };
        if report.upgraded > 0 {
            tracing::info!(
                upgraded = report.upgraded,
                "sealed credentials of the old form enc:v1 again as enc:v2, bound to their rows"
            );
        }
        let mut warnings: Vec<String> = report
            .shared
            .iter()
            .map(|group| {
                format!(
                    "{} hold the very same enc:v1 sealed value, so all but one are copies; none \
                     is upgraded or used: store the secret again for each",
                    group
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .chain(report.failed.iter().map(|(holder, reason)| {
                format!("the enc:v1 credential of {holder} cannot be sealed again: {reason}")
            }))
            .collect();
        warnings.sort();
        let mut last = self
            .upgrade_warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if *last != warnings {
            for warning in &warnings {
                tracing::warn!(problem = %warning, "credential left in the unbound form enc:v1");
            }
            *last = warnings;
        }
    }
}

/// Waits for a notification; `false` when the listener is gone or broken.
async fn recv(listener: &mut Option<ConfigListener>) -> bool {
    match listener {
        Some(l) => match l.changed().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "pilot change listener failed");
                false
            }
        },
        None => std::future::pending().await,
    }
}

/// Everything that, when changed, means the poller must restart.
fn fingerprint(pilot: &PilotRow, app: Option<&AppRow>) -> String {
    format!(
        "{}|{}|{:?}",
        pilot.updated_at.timestamp_micros(),
        app.map(|a| a.updated_at.timestamp_micros()).unwrap_or(0),
        app.map(|a| a.id)
    )
}

/// Polls one pilot until cancelled: interval with jitter after success, at once when the
/// per-poll cap left messages behind; after a failure, what [`Pacing`] decides.
/// (See [`crate::ingest::pacing`].)
/// How a poller starts: after its predecessor for the same pilot has ended (so the two never
/// hold sessions at once), then after `first_in` (or a "Poll now", `poke`, which also wakes
/// it between polls).
struct Start {
    after: Option<tokio::task::JoinHandle<()>>,
    first_in: Duration,
    poke: Arc<Notify>,
}

async fn pilot_loop(
    pilot: Pilot,
    pool: Db,
    tokens: Arc<TokenCache>,
    settings: SupervisorSettings,
    cancel: CancellationToken,
    status: StatusBoard,
    start: Start,
) {
    let Start {
        after,
        first_in,
        poke,
    } = start;
    if let Some(predecessor) = after {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = predecessor => {}
        }
    }
    if !first_in.is_zero() {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(first_in) => {}
            _ = poke.notified() => {}
        }
    }
    let mut pacing = Pacing::default();
    while !cancel.is_cancelled() {
        // Instrumented, not entered: a guard held across an await would tag other tasks' logs.
        let span = tracing::info_span!("poll", pilot = pilot.id, queue = %pilot.queue);
        let started = std::time::Instant::now();
        let mode = pacing.mode();
        let outcome = poller::poll(&pilot, &pool, &tokens, &settings.limits, &cancel, mode)
            .instrument(span)
            .await;
        let took = started.elapsed();
        let progressed = outcome.progressed();
        let decision = pacing.next(
            &outcome,
            &settings.pacing(pilot.poll_interval),
            tokio::time::Instant::now(),
        );
        let report = outcome.report;
        if report.stored > 0 || report.deleted > 0 || report.completed > 0 {
            tracing::info!(
                pilot = pilot.id,
                stored = report.stored,
                deleted = report.deleted,
                completed = report.completed,
                oversize = report.oversize,
                parse_errors = report.parse_errors,
                skipped = report.skipped,
                on_server = report.on_server,
                sessions = report.sessions,
                "poll done"
            );
        }
        pilot.metrics.login_refused(decision.login_refused());
        let delay = match outcome.result {
            Ok(()) => {
                pilot.metrics.poll_finished(took, None, None);
                record(&pool, pilot.id, None).await;
                update(&status, pilot.id, |s| {
                    s.last_report = Some(report);
                    s.last_error = None;
                    s.consecutive_failures = 0;
                });
                decision.delay
            }
            Err(
                e @ (PollError::LeaseLost { .. }
                | PollError::Store(store::StoreError::Fenced { .. })),
            ) => {
                // Not the pilot's fault, so not written on its row: the supervisor stops this
                // poller (taken over) or renews the lease (a slow renewal), and then it goes on.
                tracing::info!(pilot = pilot.id, error = %e, "poll stopped: the lease is not vouched for");
                update(&status, pilot.id, |s| s.last_report = Some(report));
                decision.delay
            }
            Err(e) => {
                pilot.metrics.poll_finished(took, None, Some(e.reason()));
                let text = match &decision.refusal {
                    Some(refusal) => refusal.describe(&e, decision.delay),
                    None => e.to_string(),
                };
                tracing::warn!(
                    pilot = pilot.id,
                    error = %text,
                    fix = e.hint().unwrap_or(""),
                    retry = ?e.retry(),
                    progressed,
                    retry_in_s = decision.delay.map(|d| d.as_secs()),
                    "poll failed"
                );
                record(&pool, pilot.id, Some((&text, e.hint()))).await;
                update(&status, pilot.id, |s| {
                    s.last_report = Some(report);
                    s.last_error = Some(text);
                    s.consecutive_failures = pacing.failures();
                });
                decision.delay
            }
        };
        // None: not until the pilot's settings change (the reload that brings the change
        // cancels this loop and starts a new one).
        let Some(delay) = delay else {
            cancel.cancelled().await;
            break;
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
            _ = poke.notified() => {}
        }
    }
    tracing::info!(pilot = pilot.id, "poller stopped");
}

fn update(status: &StatusBoard, id: i64, f: impl FnOnce(&mut PilotStatus)) {
    let mut board = status.lock().unwrap_or_else(|p| p.into_inner());
    let entry = board.entry(id).or_default();
    entry.polls += 1;
    f(entry);
}

/// Records the poll's outcome on the pilot row: `None` for success, else the error's text and
/// its fix.
async fn record(pool: &Db, id: i64, error: Option<(&str, Option<&str>)>) {
    let attempt = || {
        pool.within("poll outcome record", async {
            let mut conn = pool.acquire().await?;
            match error {
                None => store::record_poll_success(&mut conn, id).await,
                Some((text, hint)) => store::record_poll_error(&mut conn, id, text, hint).await,
            }
        })
    };
    // Why a second attempt: the poll's own failure often broke the connection it used (a
    // restart, a relay cut), and the pool hands out a fresh one the second time.
    let result = match attempt().await {
        Err(e) if e.is_transient() => attempt().await,
        other => other,
    };
    if let Err(e) = result {
        metrics::global().status_record_failed();
        tracing::warn!(pilot = id, error = %e, "could not record the poll outcome on the pilot's row");
    }
}
