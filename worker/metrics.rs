//! Every metric ccmail exports, declared once, and the HTTP listener that serves them.
//!
//! **The declarations** ([`ALL`]) are the single source of truth for each metric's name, kind,
//! unit, help text, label names and histogram buckets. Names follow the Prometheus rules: the
//! `ccmail_` prefix, base units (seconds, bytes) spelled at the end, `_total` on counters. The
//! dashboards and alert rules in `dashboards/` use only these names; an integration test checks
//! every name they mention against a running worker's `/metrics`.
//!
//! **Labels** come only from small fixed sets: the pilot id, the queue, the app's name, a
//! fixed reason/result/command/status word, and the build version. Never a mailbox address,
//! subject, UIDL or error text: those belong in logs, and would make every series unique.
//!
//! **Recording** goes through the typed methods of [`Metrics`] (one per event the worker knows
//! about), on the process-wide registry [`global()`]. Series of a pilot are created at zero as
//! soon as the supervisor loads the pilot ([`Metrics::pilot_loaded`]), so a rate or an alert
//! works before the first message, and removed when the pilot is disabled or deleted.
//! Work-item gauges and client-secret expiry are read from the database every
//! `refresh` interval ([`refresh_loop`]), never on a scrape, so Prometheus cannot load the
//! database.
//!
//! **HTTP** ([`router`], [`serve`]): `GET /metrics` (Prometheus text format 0.0.4), `GET
//! /healthz` (the process answers), `GET /readyz` (the database answers and every embedded
//! migration is applied). The listener cannot be exhausted by clients that connect and wait
//! ([`HttpLimits`]): it holds at most `max_connections` (beyond that, the one waiting longest
//! without a request in progress is closed to make room, so a probe always gets through
//! unless every connection is busy), a request head must arrive within
//! `header_read_timeout`, a kept-alive connection is closed after `idle_timeout` without a
//! request, and every connection after `max_connection_lifetime`. Its file descriptors are
//! therefore bounded, and ingestion never runs out of them because of idle HTTP clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State as Shared;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::oauth::AppKey;
use crate::store::{self, AppRow, StoreError};

/// What kind of series a metric has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets when the process restarts).
    Counter,
    /// A value that is set.
    Gauge,
    /// Observations counted into buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// The declaration of one metric.
#[derive(Debug, PartialEq)]
pub struct MetricDef {
    /// Full name as exported (for a histogram, the base of `_bucket`, `_sum`, `_count`).
    pub name: &'static str,
    pub kind: Kind,
    /// Base unit (`seconds`, `bytes`), empty for plain counts. The name ends with it.
    pub unit: &'static str,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Label names, in the order the recording methods pass their values.
    pub labels: &'static [&'static str],
    /// Upper bounds of histogram buckets (ascending; `+Inf` is implied). Empty otherwise.
    pub buckets: &'static [f64],
}

/// Label: pilot id.
pub const L_PILOT: &str = "pilot";
/// Label: queue name.
pub const L_QUEUE: &str = "queue";
/// Label: OAuth app name.
pub const L_APP: &str = "app";

/// Poll durations: from a quick empty mailbox to a large backlog download.
const POLL_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// POP3 command round trips: milliseconds on a LAN, seconds for a large RETR.
const COMMAND_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// `ccmail_build_info{version}`: always 1; the version of the running binary.
pub const BUILD_INFO: MetricDef = MetricDef {
    name: "ccmail_build_info",
    kind: Kind::Gauge,
    unit: "",
    help: "Always 1; the version label names the running ccmail build.",
    labels: &["version"],
    buckets: &[],
};
/// Whether the pilot's last poll succeeded.
pub const PILOT_UP: MetricDef = MetricDef {
    name: "ccmail_pilot_up",
    kind: Kind::Gauge,
    unit: "",
    help: "1 when the pilot's last poll succeeded, 0 when it failed or has not completed yet.",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Wall-clock time of the last successful poll.
pub const LAST_SUCCESS: MetricDef = MetricDef {
    name: "ccmail_last_successful_poll_timestamp_seconds",
    kind: Kind::Gauge,
    unit: "seconds",
    help: "Unix time of the pilot's last successful poll (from the database at load; 0 = never).",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Messages stored as new work items.
pub const MESSAGES_INGESTED: MetricDef = MetricDef {
    name: "ccmail_messages_ingested_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages stored as new work items (counted at the database commit).",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Octets stored.
pub const BYTES_INGESTED: MetricDef = MetricDef {
    name: "ccmail_ingested_bytes_total",
    kind: Kind::Counter,
    unit: "bytes",
    help: "Octets of raw messages stored (headers only for oversize messages).",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Failures, by a fixed reason word (see [`ERROR_REASONS`]).
pub const INGEST_ERRORS: MetricDef = MetricDef {
    name: "ccmail_ingest_errors_total",
    kind: Kind::Counter,
    unit: "",
    help: "Failed polls and failed message downloads, by reason (token, auth, timeout, tls, pop3, database, retr, config); untrusted_uidl: a message the server lists with a malformed, shared or reused UIDL (handled by its identity); store: a message whose parsed fields could not be stored (kept raw and flagged).",
    labels: &[L_PILOT, L_QUEUE, "reason"],
    buckets: &[],
};
/// Messages over the pilot's size limit.
pub const OVERSIZE: MetricDef = MetricDef {
    name: "ccmail_oversize_messages_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages over the pilot's size limit, stored as headers, flagged and left on the server.",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Messages that could not be parsed.
pub const PARSE_ERRORS: MetricDef = MetricDef {
    name: "ccmail_parse_errors_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages that could not be parsed, stored raw and flagged for attention.",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Poll duration.
pub const POLL_DURATION: MetricDef = MetricDef {
    name: "ccmail_poll_duration_seconds",
    kind: Kind::Histogram,
    unit: "seconds",
    help: "Duration of one poll of one pilot (token, login, download, store, delete, quit), failed polls included.",
    labels: &[L_PILOT, L_QUEUE],
    buckets: POLL_BUCKETS,
};
/// POP3 command latency.
pub const POP3_COMMAND_DURATION: MetricDef = MetricDef {
    name: "ccmail_pop3_command_duration_seconds",
    kind: Kind::Histogram,
    unit: "seconds",
    help: "Round trip of one POP3 step (connect covers TCP and TLS; retr covers the whole download), by command.",
    labels: &[L_PILOT, L_QUEUE, "command"],
    buckets: COMMAND_BUCKETS,
};
/// Maildrop size at the last STAT.
pub const MESSAGES_ON_SERVER: MetricDef = MetricDef {
    name: "ccmail_messages_on_server",
    kind: Kind::Gauge,
    unit: "",
    help: "Messages in the mailbox at the pilot's last STAT (before this poll's deletions).",
    labels: &[L_PILOT, L_QUEUE],
    buckets: &[],
};
/// Token endpoint requests.
pub const TOKEN_REQUESTS: MetricDef = MetricDef {
    name: "ccmail_token_requests_total",
    kind: Kind::Counter,
    unit: "",
    help: "Requests to the OAuth token endpoint, by app and result (success, transient_error, permanent_error).",
    labels: &[L_APP, "result"],
    buckets: &[],
};
/// Expiry of the cached access token.
pub const TOKEN_EXPIRY: MetricDef = MetricDef {
    name: "ccmail_token_expiry_timestamp_seconds",
    kind: Kind::Gauge,
    unit: "seconds",
    help: "Unix time at which the app's cached access token expires (absent until the first token).",
    labels: &[L_APP],
    buckets: &[],
};
/// Token refresh failures in a row.
pub const TOKEN_FAILURES: MetricDef = MetricDef {
    name: "ccmail_token_refresh_consecutive_failures",
    kind: Kind::Gauge,
    unit: "",
    help: "Token requests of the app that failed since its last successful one (0 = healthy).",
    labels: &[L_APP],
    buckets: &[],
};
/// Client secret expiry.
pub const SECRET_EXPIRY: MetricDef = MetricDef {
    name: "ccmail_client_secret_expiry_timestamp_seconds",
    kind: Kind::Gauge,
    unit: "seconds",
    help: "Unix time at which the app's client secret expires (oauth_apps.secret_expires_at; absent when unknown).",
    labels: &[L_APP],
    buckets: &[],
};
/// Work items by queue and status.
pub const WORK_ITEMS: MetricDef = MetricDef {
    name: "ccmail_work_items",
    kind: Kind::Gauge,
    unit: "",
    help: "Work items in the database, by queue and status (queued, assigned, done).",
    labels: &[L_QUEUE, "status"],
    buckets: &[],
};
/// Age of the oldest queued work item.
pub const OLDEST_QUEUED_AGE: MetricDef = MetricDef {
    name: "ccmail_oldest_queued_work_item_age_seconds",
    kind: Kind::Gauge,
    unit: "seconds",
    help: "How long the oldest queued work item of the queue has waited (0 when none is queued).",
    labels: &[L_QUEUE],
    buckets: &[],
};
/// Failed database reads of the periodic gauge refresh.
pub const REFRESH_ERRORS: MetricDef = MetricDef {
    name: "ccmail_metrics_refresh_errors_total",
    kind: Kind::Counter,
    unit: "",
    help: "Periodic reads of work-item and app gauges from the database that failed (the gauges keep their last values).",
    labels: &[],
    buckets: &[],
};

/// Every metric, in the order `/metrics` lists them.
pub const ALL: &[&MetricDef] = &[
    &BUILD_INFO,
    &PILOT_UP,
    &LAST_SUCCESS,
    &MESSAGES_INGESTED,
    &BYTES_INGESTED,
    &INGEST_ERRORS,
    &OVERSIZE,
    &PARSE_ERRORS,
    &POLL_DURATION,
    &POP3_COMMAND_DURATION,
    &MESSAGES_ON_SERVER,
    &TOKEN_REQUESTS,
    &TOKEN_EXPIRY,
    &TOKEN_FAILURES,
    &SECRET_EXPIRY,
    &WORK_ITEMS,
    &OLDEST_QUEUED_AGE,
    &REFRESH_ERRORS,
];

/// Values of the `reason` label of [`INGEST_ERRORS`]: the poll errors of
/// [`crate::ingest::poller::PollError::reason`], `retr` for one message's failed download, and
/// `config` for a pilot that cannot start (missing app, unreadable secret or CA bundle).
pub const ERROR_REASONS: &[&str] = &[
    "token",
    "auth",
    "timeout",
    "tls",
    "pop3",
    "database",
    "retr",
    "config",
    "untrusted_uidl",
    "store",
];
/// Values of the `command` label of [`POP3_COMMAND_DURATION`].
pub const POP3_COMMANDS: &[&str] = &[
    "connect", "auth", "stat", "uidl", "retr", "top", "dele", "quit",
];
/// Values of the `result` label of [`TOKEN_REQUESTS`].
pub const TOKEN_RESULTS: &[&str] = &["success", "transient_error", "permanent_error"];
/// Values of the `status` label of [`WORK_ITEMS`] (the `work_items_status` constraint).
pub const WORK_ITEM_STATUSES: &[&str] = &["queued", "assigned", "done"];

#[derive(Debug, Clone)]
enum Value {
    Scalar(f64),
    Histogram {
        /// Per bucket (not cumulative); the last slot is `+Inf`.
        counts: Vec<u64>,
        sum: f64,
        count: u64,
    },
}

impl Value {
    fn zero(def: &MetricDef) -> Value {
        match def.kind {
            Kind::Histogram => Value::Histogram {
                counts: vec![0; def.buckets.len() + 1],
                sum: 0.0,
                count: 0,
            },
            Kind::Counter | Kind::Gauge => Value::Scalar(0.0),
        }
    }
}

type Series = BTreeMap<Vec<String>, Value>;

#[derive(Default)]
struct State {
    families: HashMap<&'static str, Series>,
    /// Pilots with series, and the queue their series are labelled with.
    pilots: HashMap<i64, String>,
    /// The name of each app registration, for the `app` label.
    apps: HashMap<AppKey, String>,
}

/// A registry of the metrics in [`ALL`]. The worker uses [`global()`]; tests may make their own.
pub struct Metrics {
    state: Mutex<State>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static GLOBAL: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide registry that the worker records into and `/metrics` serves.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// The outcome of one token request, as [`Metrics::token_request`] records it.
#[derive(Debug, Clone, Copy)]
pub enum TokenOutcome {
    /// A token was issued; it expires at this moment.
    Issued(SystemTime),
    /// The request failed; `transient` says whether retrying may help.
    Failed { transient: bool },
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// An empty registry with `ccmail_build_info` set.
    pub fn new() -> Metrics {
        let m = Metrics {
            state: Mutex::new(State::default()),
        };
        m.set(&BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
        m.touch(&REFRESH_ERRORS, &[]);
        m
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single map operation: a panic elsewhere cannot leave a half-written
        // value behind, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_value(&self, def: &'static MetricDef, labels: &[&str], f: impl FnOnce(&mut Value)) {
        // A wrong label count is a programming error in this module; dropping the sample keeps
        // the exposition valid instead of crashing the worker over a metric.
        debug_assert_eq!(labels.len(), def.labels.len(), "labels of {}", def.name);
        if labels.len() != def.labels.len() {
            return;
        }
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let mut state = self.lock();
        let value = state
            .families
            .entry(def.name)
            .or_default()
            .entry(key)
            .or_insert_with(|| Value::zero(def));
        f(value);
    }

    fn inc(&self, def: &'static MetricDef, labels: &[&str], by: f64) {
        self.with_value(def, labels, |v| {
            if let Value::Scalar(x) = v {
                *x += by;
            }
        });
    }

    fn set(&self, def: &'static MetricDef, labels: &[&str], to: f64) {
        self.with_value(def, labels, |v| {
            if let Value::Scalar(x) = v {
                *x = to;
            }
        });
    }

    /// Creates the series at zero if it does not exist; leaves an existing one alone.
    fn touch(&self, def: &'static MetricDef, labels: &[&str]) {
        self.with_value(def, labels, |_| {});
    }

    fn observe(&self, def: &'static MetricDef, labels: &[&str], value: f64) {
        self.with_value(def, labels, |v| {
            if let Value::Histogram { counts, sum, count } = v {
                let slot = def
                    .buckets
                    .iter()
                    .position(|b| value <= *b)
                    .unwrap_or(def.buckets.len());
                if let Some(c) = counts.get_mut(slot) {
                    *c += 1;
                }
                *sum += value;
                *count += 1;
            }
        });
    }

    /// The value of a counter or gauge series, if it exists (for tests and `doctor`).
    pub fn value(&self, def: &MetricDef, labels: &[&str]) -> Option<f64> {
        let state = self.lock();
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        match state.families.get(def.name)?.get(&key)? {
            Value::Scalar(x) => Some(*x),
            Value::Histogram { count, .. } => Some(*count as f64),
        }
    }

    // ---- pilots (the supervisor and the poller) ----

    /// The supervisor loaded `pilot` (it may still fail to start): its series exist from now
    /// on, at zero, and `ccmail_last_successful_poll_timestamp_seconds` starts from the
    /// database's `last_success_at`. Calling it again for a running pilot keeps its counters.
    pub fn pilot_loaded(&self, pilot: i64, queue: &str, last_success: Option<SystemTime>) {
        let previous = self.lock().pilots.insert(pilot, queue.to_owned());
        if previous.as_deref().is_some_and(|q| q != queue) {
            // The queue label changed: the old series would never be updated again.
            self.remove_pilot_series(pilot);
        }
        let id = pilot.to_string();
        let p = [id.as_str(), queue];
        self.touch(&PILOT_UP, &p);
        self.touch(&MESSAGES_INGESTED, &p);
        self.touch(&BYTES_INGESTED, &p);
        self.touch(&OVERSIZE, &p);
        self.touch(&PARSE_ERRORS, &p);
        self.touch(&POLL_DURATION, &p);
        self.touch(&MESSAGES_ON_SERVER, &p);
        for reason in ERROR_REASONS {
            self.touch(&INGEST_ERRORS, &[&id, queue, reason]);
        }
        for command in POP3_COMMANDS {
            self.touch(&POP3_COMMAND_DURATION, &[&id, queue, command]);
        }
        let known = self.value(&LAST_SUCCESS, &p).unwrap_or(0.0);
        let from_db = last_success.map(unix_seconds).unwrap_or(0.0);
        self.set(&LAST_SUCCESS, &p, known.max(from_db));
    }

    /// Removes the series of every pilot not in `loaded` (disabled or deleted pilots).
    pub fn retain_pilots(&self, loaded: &HashSet<i64>) {
        let gone: Vec<i64> = self
            .lock()
            .pilots
            .keys()
            .filter(|id| !loaded.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove_pilot_series(id);
            self.lock().pilots.remove(&id);
        }
    }

    fn remove_pilot_series(&self, pilot: i64) {
        let id = pilot.to_string();
        let mut state = self.lock();
        for def in ALL {
            if def.labels.first() == Some(&L_PILOT)
                && let Some(series) = state.families.get_mut(def.name)
            {
                series.retain(|labels, _| labels.first() != Some(&id));
            }
        }
    }

    fn pilot_labels(&self, pilot: i64) -> (String, String) {
        let queue = self.lock().pilots.get(&pilot).cloned().unwrap_or_default();
        (pilot.to_string(), queue)
    }

    /// A poll of `pilot` finished. `error_reason` is `None` on success, else a word of
    /// [`ERROR_REASONS`]; `on_server` is the message count of the STAT, when one was made.
    pub fn poll_finished(
        &self,
        pilot: i64,
        took: Duration,
        on_server: Option<usize>,
        error_reason: Option<&str>,
    ) {
        let (id, queue) = self.pilot_labels(pilot);
        let p = [id.as_str(), queue.as_str()];
        self.observe(&POLL_DURATION, &p, took.as_secs_f64());
        if let Some(n) = on_server {
            self.set(&MESSAGES_ON_SERVER, &p, n as f64);
        }
        match error_reason {
            None => {
                self.set(&PILOT_UP, &p, 1.0);
                self.set(&LAST_SUCCESS, &p, unix_seconds(SystemTime::now()));
            }
            Some(reason) => {
                self.set(&PILOT_UP, &p, 0.0);
                self.inc(&INGEST_ERRORS, &[&id, &queue, reason], 1.0);
            }
        }
    }

    /// A failure of `pilot` outside a whole poll: one message could not be downloaded (`retr`,
    /// the poll goes on) or the pilot cannot start (`config`).
    pub fn ingest_error(&self, pilot: i64, reason: &str) {
        let (id, queue) = self.pilot_labels(pilot);
        self.inc(&INGEST_ERRORS, &[&id, &queue, reason], 1.0);
    }

    /// A batch of `pilot` was committed: `messages` new work items of `bytes` octets, of which
    /// `parse_errors` unparseable and `oversize` over the size limit.
    pub fn messages_stored(
        &self,
        pilot: i64,
        messages: usize,
        bytes: u64,
        parse_errors: usize,
        oversize: usize,
    ) {
        let (id, queue) = self.pilot_labels(pilot);
        let p = [id.as_str(), queue.as_str()];
        self.inc(&MESSAGES_INGESTED, &p, messages as f64);
        self.inc(&BYTES_INGESTED, &p, bytes as f64);
        self.inc(&PARSE_ERRORS, &p, parse_errors as f64);
        self.inc(&OVERSIZE, &p, oversize as f64);
    }

    /// One POP3 step of `pilot` took `took` (`command` from [`POP3_COMMANDS`]).
    pub fn pop3_command(&self, pilot: i64, command: &str, took: Duration) {
        let (id, queue) = self.pilot_labels(pilot);
        self.observe(
            &POP3_COMMAND_DURATION,
            &[&id, &queue, command],
            took.as_secs_f64(),
        );
    }

    // ---- apps (the token cache and the database refresh) ----

    /// Names the app registration `key` (the `app` label) and creates its token series.
    pub fn app_loaded(&self, key: &AppKey, name: &str) {
        self.lock().apps.insert(key.clone(), name.to_owned());
        for result in TOKEN_RESULTS {
            self.touch(&TOKEN_REQUESTS, &[name, result]);
        }
        self.touch(&TOKEN_FAILURES, &[name]);
    }

    /// The `app` label of `key`: its name, or its client id for an app no pilot has named
    /// (a token requested outside the supervisor, e.g. by a diagnostic command).
    fn app_label(&self, key: &AppKey) -> String {
        self.lock()
            .apps
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.client_id.clone())
    }

    /// The token cache asked the endpoint for a token of `key`; `consecutive_failures` is the
    /// cache's count after this request (0 after a success).
    pub fn token_request(&self, key: &AppKey, outcome: TokenOutcome, consecutive_failures: u32) {
        let app = self.app_label(key);
        let result = match outcome {
            TokenOutcome::Issued(expires) => {
                self.set(&TOKEN_EXPIRY, &[&app], unix_seconds(expires));
                "success"
            }
            TokenOutcome::Failed { transient: true } => "transient_error",
            TokenOutcome::Failed { transient: false } => "permanent_error",
        };
        self.inc(&TOKEN_REQUESTS, &[&app, result], 1.0);
        self.set(&TOKEN_FAILURES, &[&app], f64::from(consecutive_failures));
    }

    /// Replaces the client-secret expiry gauges and app names with what `apps` says.
    pub fn apps_refreshed(&self, apps: &[AppRow]) {
        let mut expiries = Series::new();
        {
            let mut state = self.lock();
            for a in apps {
                state.apps.insert(a.token_key(), a.name.clone());
                if let Some(at) = a.secret_expires_at {
                    expiries.insert(
                        vec![a.name.clone()],
                        Value::Scalar(at.timestamp_millis() as f64 / 1000.0),
                    );
                }
            }
            state.families.insert(SECRET_EXPIRY.name, expiries);
        }
    }

    /// Replaces the work-item gauges. Every queue of a loaded pilot gets every status and an
    /// age, at zero when the database has none (so a backlog panel shows 0, not "no data").
    pub fn queues_refreshed(&self, counts: &[store::QueueCount], oldest: &[(String, Duration)]) {
        let mut state = self.lock();
        let mut queues: HashSet<String> = state.pilots.values().cloned().collect();
        queues.extend(counts.iter().map(|c| c.queue.clone()));
        queues.extend(oldest.iter().map(|(q, _)| q.clone()));
        let mut items = Series::new();
        let mut ages = Series::new();
        for q in &queues {
            for s in WORK_ITEM_STATUSES {
                items.insert(vec![q.clone(), (*s).to_owned()], Value::Scalar(0.0));
            }
            ages.insert(vec![q.clone()], Value::Scalar(0.0));
        }
        for c in counts {
            items.insert(
                vec![c.queue.clone(), c.status.to_string()],
                Value::Scalar(c.count as f64),
            );
        }
        for (q, age) in oldest {
            ages.insert(vec![q.clone()], Value::Scalar(age.as_secs_f64()));
        }
        state.families.insert(WORK_ITEMS.name, items);
        state.families.insert(OLDEST_QUEUED_AGE.name, ages);
    }

    /// A periodic database read failed.
    pub fn refresh_failed(&self) {
        self.inc(&REFRESH_ERRORS, &[], 1.0);
    }

    // ---- exposition ----

    /// The Prometheus text exposition (format 0.0.4) of every declared metric.
    pub fn render(&self) -> String {
        let state = self.lock();
        let mut out = String::with_capacity(16 * 1024);
        for def in ALL {
            // Writing into a String cannot fail; the results are ignored for that reason.
            let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(def.help));
            let _ = writeln!(out, "# TYPE {} {}", def.name, def.kind.as_str());
            let Some(series) = state.families.get(def.name) else {
                continue;
            };
            for (labels, value) in series {
                match value {
                    Value::Scalar(x) => {
                        let _ = writeln!(
                            out,
                            "{}{} {}",
                            def.name,
                            label_set(def.labels, labels, None),
                            number(*x)
                        );
                    }
                    Value::Histogram { counts, sum, count } => {
                        let mut cumulative = 0u64;
                        for (i, c) in counts.iter().enumerate() {
                            cumulative += c;
                            let le = def.buckets.get(i).map_or("+Inf".to_owned(), |b| number(*b));
                            let _ = writeln!(
                                out,
                                "{}_bucket{} {}",
                                def.name,
                                label_set(def.labels, labels, Some(&le)),
                                cumulative
                            );
                        }
                        let set = label_set(def.labels, labels, None);
                        let _ = writeln!(out, "{}_sum{} {}", def.name, set, number(*sum));
                        let _ = writeln!(out, "{}_count{} {}", def.name, set, count);
                    }
                }
            }
        }
        out
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn number(x: f64) -> String {
    if x.is_nan() {
        "NaN".to_owned()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{x}")
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_set(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape_label(v)))
        .collect();
    if let Some(le) = le {
        pairs.push(format!("le=\"{le}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

// ---- periodic database reads ----

/// Reads the work-item gauges and the apps (names, client-secret expiry) once.
pub async fn refresh_from_database(pool: &PgPool, metrics: &Metrics) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    let apps = store::list_apps(&mut conn).await?;
    let counts = store::queue_counts(&mut conn).await?;
    let oldest = store::oldest_queued_age(&mut conn).await?;
    metrics.apps_refreshed(&apps);
    metrics.queues_refreshed(&counts, &oldest);
    Ok(())
}

/// Refreshes the database gauges of [`global()`] every `interval` until `cancel`.
pub async fn refresh_loop(pool: PgPool, interval: Duration, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = refresh_from_database(&pool, global()).await {
            global().refresh_failed();
            tracing::warn!(error = %e, "could not read work-item gauges from the database");
        }
    }
}

// ---- HTTP ----

/// How long `/readyz` waits for the database before answering "not ready".
const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The routes `/metrics`, `/healthz` and `/readyz` over `pool`.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(pool)
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        global().render(),
    )
}

async fn ready_handler(Shared(pool): Shared<PgPool>) -> (StatusCode, String) {
    match tokio::time::timeout(READY_TIMEOUT, readiness(&pool)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the database did not answer within {}s\n",
                READY_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// Why the worker is not ready, in words for the `/readyz` body.
async fn readiness(pool: &PgPool) -> Result<(), String> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| format!("database unreachable: {e}"))?;
    let pending = store::pending_migrations(&mut conn)
        .await
        .map_err(|e| format!("cannot read the migration table: {e}"))?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "migrations not applied: {} (run `ccmail migrate`)",
            pending
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Limits of the HTTP listener (`[http]` settings; see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections held at most.
    pub max_connections: usize,
    /// Time for a complete request head, from connecting or from its first byte.
    pub header_read_timeout: Duration,
    /// A kept-alive connection without a request is closed after this.
    pub idle_timeout: Duration,
    /// Every connection is closed after this (once its current request is answered).
    pub max_connection_lifetime: Duration,
}

impl From<&crate::config::HttpConfig> for HttpLimits {
    /// The `[http]` limits (checked to be at least 1 when the settings load).
    fn from(http: &crate::config::HttpConfig) -> HttpLimits {
        HttpLimits {
            max_connections: http.max_connections,
            header_read_timeout: http.header_read_timeout_secs,
            idle_timeout: http.idle_timeout_secs,
            max_connection_lifetime: http.max_connection_lifetime_secs,
        }
    }
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 128,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_lifetime: Duration::from_secs(600),
        }
    }
}

/// Where a connection is in its life, for its deadlines and for choosing whom to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connected, the first request head not complete yet (header-read deadline from connect).
    Fresh,
    /// A response was handed over; waiting for the next request (idle deadline).
    Idle,
    /// The first byte of a next request arrived (header-read deadline from that byte).
    ReadingHead,
    /// A request is being answered (bounded by the connection lifetime only).
    Busy,
}

/// One connection's phase, shared by its I/O wrapper, its service and its watchdog.
struct Watch {
    state: Mutex<(Phase, Instant)>,
    changed: tokio::sync::Notify,
    /// Cancelled when the connection is closed to make room for a new one.
    evict: CancellationToken,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            state: Mutex::new((Phase::Fresh, Instant::now())),
            changed: tokio::sync::Notify::new(),
            evict: CancellationToken::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, (Phase, Instant)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.state() = (phase, Instant::now());
        self.changed.notify_one();
    }

    /// Bytes arrived: on an idle connection that starts the header-read deadline.
    fn on_read(&self) {
        if self.state().0 == Phase::Idle {
            self.set(Phase::ReadingHead);
        }
    }

    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        let (phase, since) = *self.state();
        match phase {
            Phase::Fresh | Phase::ReadingHead => Some(since + limits.header_read_timeout),
            Phase::Idle => Some(since + limits.idle_timeout),
            Phase::Busy => None,
        }
    }

    /// Since when it has been waiting for a request, unless one is in progress.
    fn waiting_since(&self) -> Option<Instant> {
        let (phase, since) = *self.state();
        (phase != Phase::Busy).then_some(since)
    }
}

/// The stream of one connection, telling its [`Watch`] when bytes arrive.
struct Watched {
    stream: tokio::net::TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.watch.on_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The open connections, by id.
#[derive(Default)]
struct Open {
    next_id: AtomicU64,
    watches: Mutex<HashMap<u64, Arc<Watch>>>,
}

/// Removes a connection from [`Open`] when its task ends, however it ends.
struct Registered {
    open: Arc<Open>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock_map(&self.open.watches).remove(&self.id);
    }
}

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Open {
    /// Makes room for a new connection: under the cap it is simply added; at the cap the
    /// connection waiting longest without a request in progress is evicted in its favour;
    /// when every one is busy there is no room (`None`).
    fn admit(self: &Arc<Self>, max: usize) -> Option<(Arc<Watch>, Registered, bool)> {
        let mut watches = lock_map(&self.watches);
        let mut evicted = false;
        if watches.len() >= max {
            let victim = watches
                .iter()
                .filter_map(|(id, w)| w.waiting_since().map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(w) = watches.remove(&victim) {
                w.evict.cancel();
                evicted = true;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch::new());
        watches.insert(id, watch.clone());
        Some((
            watch,
            Registered {
                open: self.clone(),
                id,
            },
            evicted,
        ))
    }

    fn evict_all(&self) {
        for w in lock_map(&self.watches).values() {
            w.evict.cancel();
        }
    }
}

/// Serves [`router`] on `listener` within `limits` until `shutdown` is cancelled; then lets
/// requests in progress finish (bounded by the header-read timeout) and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    pool: PgPool,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let service = hyper_util::service::TowerToHyperService::new(router(pool));
    let open = Arc::new(Open::default());
    let tracker = TaskTracker::new();
    let mut warned_at: Option<Instant> = None;
    let mut warn = |what: &str, error: &dyn std::fmt::Display| {
        // At most one warning a minute: a flood must not flood the log as well.
        if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            warned_at = Some(Instant::now());
            tracing::warn!(error = %error, max_connections = limits.max_connections, "{what}");
        }
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or a connection reset before accept): the pending
                // connection stays queued; try again shortly instead of spinning.
                warn("HTTP listener cannot accept a connection; retrying", &e);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some((watch, registered, evicted)) = open.admit(limits.max_connections) else {
            // Every connection is answering a request: close this one at once.
            drop(stream);
            warn(
                "HTTP connection closed at once: every connection is busy",
                &"connection cap reached",
            );
            continue;
        };
        if evicted {
            tracing::debug!("HTTP connection cap reached; closed the longest-waiting idle one");
        }
        let _ = stream.set_nodelay(true);
        tracker.spawn(serve_connection(
            Watched {
                stream,
                watch: watch.clone(),
            },
            watch,
            registered,
            service.clone(),
            limits,
            shutdown.clone(),
        ));
    }
    tracker.close();
    if tokio::time::timeout(limits.header_read_timeout, tracker.wait())
        .await
        .is_err()
    {
        open.evict_all();
        tracker.wait().await;
    }
    Ok(())
}

/// One connection: HTTP/1.1 by hyper, with the deadlines of its [`Watch`] and the lifetime.
async fn serve_connection<S>(
    io: Watched,
    watch: Arc<Watch>,
    _registered: Registered,
    service: S,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    S: hyper::service::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let hooks = watch.clone();
    let service = hyper::service::service_fn(move |request| {
        hooks.set(Phase::Busy);
        let answer = service.call(request);
        let hooks = hooks.clone();
        async move {
            let response = answer.await;
            hooks.set(Phase::Idle);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The watchdog below owns the header-read deadline (hyper's would also end idle waits).
    builder.header_read_timeout(None).keep_alive(true);
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(limits.max_connection_lifetime);
    tokio::pin!(lifetime);
    let mut closing = false;
    loop {
        let deadline = watch.deadline(&limits);
        let expiry = async move {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            // Dropping the connection closes the socket.
            _ = watch.evict.cancelled() => return,
            _ = expiry => {
                if watch.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                    return;
                }
            }
            _ = watch.changed.notified() => {}
            _ = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut lifetime, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

// ---- probing (`ccmail healthcheck`) ----

/// Why a probe of the HTTP listener failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(
        "cannot connect to the ccmail HTTP listener at {addr}: {reason} (is `ccmail run` running, and is http.listen the same address?)"
    )]
    Connect {
        addr: String,
        reason: std::io::Error,
    },
    #[error("the ccmail HTTP listener at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("the ccmail HTTP listener at {addr} answered something that is not HTTP: {line:?}")]
    Malformed { addr: String, line: String },
    #[error("{path} answered HTTP {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
}

/// The address to probe for a listener bound to `listen`: an unspecified address (`0.0.0.0`,
/// `[::]`) is reached through the loopback address of its family.
pub fn probe_address(listen: &str) -> String {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(mut a) if a.ip().is_unspecified() => {
            a.set_ip(match a {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
            a.to_string()
        }
        _ => listen.to_owned(),
    }
}

/// `GET path` on the listener at `addr` (plain HTTP/1.1); the body when the status is 2xx.
pub async fn probe(addr: &str, path: &str, timeout: Duration) -> Result<String, ProbeError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// Answers of /healthz and /readyz are a line; a larger one is cut, not buffered.
    const MAX_ANSWER: u64 = 64 * 1024;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|reason| ProbeError::Connect {
                addr: addr.to_owned(),
                reason,
            })?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let io = |reason| ProbeError::Connect {
            addr: addr.to_owned(),
            reason,
        };
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, ProbeError>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout {
            addr: addr.to_owned(),
            after: timeout,
        })??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| ProbeError::Malformed {
            addr: addr.to_owned(),
            line: status_line.chars().take(80).collect(),
        })?;
    let body = body.trim().to_owned();
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(ProbeError::Status {
            path: path.to_owned(),
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_follow_the_naming_rules() {
        let mut names = HashSet::new();
        for def in ALL {
            assert!(def.name.starts_with("ccmail_"), "{}", def.name);
            assert!(names.insert(def.name), "{} declared twice", def.name);
            let base = def.name.strip_suffix("_total").unwrap_or(def.name);
            assert_eq!(
                def.kind == Kind::Counter,
                base != def.name,
                "{}: counters and only counters end in _total",
                def.name
            );
            if !def.unit.is_empty() {
                assert!(
                    base.ends_with(&format!("_{}", def.unit)),
                    "{} does not end with its unit {}",
                    def.name,
                    def.unit
                );
            }
            assert_eq!(def.kind == Kind::Histogram, !def.buckets.is_empty());
            assert!(def.buckets.windows(2).all(|w| w[0] < w[1]), "{}", def.name);
            assert!(!def.help.is_empty());
            for label in def.labels {
                assert!(
                    [
                        "pilot", "queue", "app", "reason", "result", "command", "status", "version"
                    ]
                    .contains(label),
                    "{}: label {label} is not from the fixed sets",
                    def.name
                );
            }
        }
    }

    #[test]
    fn pilot_series_exist_at_zero_once_loaded_and_go_when_removed() {
        let m = Metrics::new();
        m.pilot_loaded(7, "support", None);
        let text = m.render();
        assert!(text.contains("ccmail_pilot_up{pilot=\"7\",queue=\"support\"} 0\n"));
        assert!(text.contains(
            "ccmail_ingest_errors_total{pilot=\"7\",queue=\"support\",reason=\"auth\"} 0\n"
        ));
        assert!(text.contains(
            "ccmail_poll_duration_seconds_bucket{pilot=\"7\",queue=\"support\",le=\"+Inf\"} 0\n"
        ));
        m.retain_pilots(&HashSet::new());
        assert!(!m.render().contains("pilot=\"7\""));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new();
        m.pilot_loaded(1, "q", None);
        m.poll_finished(1, Duration::from_millis(70), Some(3), None);
        m.poll_finished(1, Duration::from_secs(400), Some(0), Some("timeout"));
        let text = m.render();
        let p = "pilot=\"1\",queue=\"q\"";
        assert!(text.contains(&format!(
            "ccmail_poll_duration_seconds_bucket{{{p},le=\"0.05\"}} 0\n"
        )));
        assert!(text.contains(&format!(
            "ccmail_poll_duration_seconds_bucket{{{p},le=\"0.1\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "ccmail_poll_duration_seconds_bucket{{{p},le=\"300\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "ccmail_poll_duration_seconds_bucket{{{p},le=\"+Inf\"}} 2\n"
        )));
        assert!(text.contains(&format!("ccmail_poll_duration_seconds_count{{{p}}} 2\n")));
        assert!(text.contains(&format!("ccmail_pilot_up{{{p}}} 0\n")));
        assert!(text.contains(&format!("ccmail_messages_on_server{{{p}}} 0\n")));
        assert_eq!(m.value(&INGEST_ERRORS, &["1", "q", "timeout"]), Some(1.0));
    }

    #[test]
    fn a_reloaded_pilot_keeps_its_counters_and_a_new_queue_drops_the_old_series() {
        let m = Metrics::new();
        m.pilot_loaded(3, "sales", None);
        m.messages_stored(3, 2, 100, 1, 0);
        m.pilot_loaded(3, "sales", None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "sales"]), Some(2.0));
        m.pilot_loaded(3, "support", None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "sales"]), None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "support"]), Some(0.0));
    }

    #[test]
    fn token_requests_are_labelled_with_the_app_name() {
        let m = Metrics::new();
        let key = AppKey {
            authority: "https://login.example".into(),
            tenant: "t".into(),
            client_id: "c".into(),
            scope: "s".into(),
        };
        m.app_loaded(&key, "contoso");
        m.token_request(&key, TokenOutcome::Failed { transient: false }, 1);
        m.token_request(
            &key,
            TokenOutcome::Issued(UNIX_EPOCH + Duration::from_secs(5000)),
            0,
        );
        assert_eq!(
            m.value(&TOKEN_REQUESTS, &["contoso", "permanent_error"]),
            Some(1.0)
        );
        assert_eq!(m.value(&TOKEN_REQUESTS, &["contoso", "success"]), Some(1.0));
        assert_eq!(m.value(&TOKEN_EXPIRY, &["contoso"]), Some(5000.0));
        assert_eq!(m.value(&TOKEN_FAILURES, &["contoso"]), Some(0.0));
    }

    #[test]
    fn an_unspecified_listen_address_is_probed_on_loopback() {
        assert_eq!(probe_address("0.0.0.0:9898"), "127.0.0.1:9898");
        assert_eq!(probe_address("[::]:9898"), "[::1]:9898");
        assert_eq!(probe_address("10.1.2.3:80"), "10.1.2.3:80");
        assert_eq!(probe_address("localhost:9898"), "localhost:9898");
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.pilot_loaded(1, "a\"b\\c\nd", None);
        assert!(m.render().contains("queue=\"a\\\"b\\\\c\\nd\""));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_longest_waiting_makes_room_unless_every_connection_is_busy() {
        let open = Arc::new(Open::default());
        let (first, first_reg, evicted) = open.admit(2).unwrap();
        assert!(!evicted);
        tokio::time::advance(Duration::from_secs(1)).await;
        let (second, second_reg, _) = open.admit(2).unwrap();
        // A connection that just finished a request waits from then on.
        tokio::time::advance(Duration::from_secs(1)).await;
        first.set(Phase::Busy);
        first.set(Phase::Idle);
        let (third, _third_reg, evicted) = open.admit(2).unwrap();
        assert!(evicted);
        assert!(second.evict.is_cancelled(), "the longest waiting is closed");
        assert!(!first.evict.is_cancelled());
        drop(second_reg);
        assert_eq!(lock_map(&open.watches).len(), 2);

        first.set(Phase::Busy);
        third.set(Phase::Busy);
        assert!(
            open.admit(2).is_none(),
            "all busy: the new one is closed at once"
        );
        third.set(Phase::Idle);
        assert!(open.admit(2).is_some());
        drop(first_reg);
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_has_its_deadline() {
        let limits = HttpLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_lifetime: Duration::from_secs(600),
        };
        let watch = Watch::new();
        let start = Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + limits.header_read_timeout)
        );
        // Bytes of the first head do not extend its deadline.
        tokio::time::advance(Duration::from_secs(3)).await;
        watch.on_read();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + limits.header_read_timeout)
        );
        watch.set(Phase::Busy);
        assert_eq!(watch.deadline(&limits), None);
        watch.set(Phase::Idle);
        let idle_since = Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(idle_since + limits.idle_timeout)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        watch.on_read();
        assert_eq!(
            watch.deadline(&limits),
            Some(Instant::now() + limits.header_read_timeout)
        );
    }
}
