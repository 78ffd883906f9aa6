//! Every metric ccmail exports, declared once, and the HTTP listener that serves them.
//!
//! **The declarations** ([`ALL`]) are the single source of truth for each metric's name, kind,
//! unit, help text, label names and histogram buckets. Names follow the Prometheus rules: the
//! `ccmail_` prefix, base units (seconds, bytes) spelled at the end, `_total` on counters. The
//! dashboards and alert rules in `dashboards/` use only these names; an integration test checks
//! every name they mention against a running worker's `/metrics`.
//!
//! **Labels** come only from small fixed sets: the pilot id, the queue, the app's name, a
//! fixed reason/result/command/status word, a mail class or threading outcome word, and the
//! build version. Never a mailbox address,
//! subject, UIDL or error text: those belong in logs, and would make every series unique.
//!
//! **Recording** goes through a `metrics-exporter-prometheus` recorder owned by [`Metrics`]
//! (the process-wide one is [`global()`]; it is not installed as the `metrics` global
//! recorder, so tests can make their own). [`Metrics::new`] describes every declared metric
//! on it and sets each histogram's buckets. A pilot's series are a [`PilotMetrics`] handle,
//! built once with the pilot's id and queue and registered at zero, so a rate or an alert
//! works before the first message; the poller and the supervisor record through it. They
//! show in `/metrics` while the supervisor has the pilot loaded ([`Metrics::pilot_loaded`])
//! and are left out once it is disabled or deleted ([`Metrics::retain_pilots`]): the exporter
//! cannot delete series, so [`Metrics::render`] filters its output (see [`Metrics`]). Token
//! series are labelled with the app's name ([`Metrics::app_loaded`]).
//!
//! **Layering**: this module imports no other module of the crate but `config` (the `[http]`
//! settings of the listener). Callers hand it what it
//! labels with: an app is an opaque id (the token cache's key, rendered by its owner) plus a
//! name; work-item gauges and client-secret expiry arrive as plain values from the periodic
//! database read in `ingest::observe`, never read on a scrape, so Prometheus cannot load the
//! database.
//!
//! **HTTP** ([`http`]): `GET /metrics`, `GET /healthz`, `GET /readyz` on a hardened listener,
//! and the probe client of `ccmail healthcheck`.

pub mod http;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::WorkItemStatus;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub use http::{
    HttpLimits, ProbeError, Readiness, ReadyFuture, probe, probe_address, router, serve,
    serve_router,
};

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
/// Whether the pilot's login has been refused persistently.
pub const LOGIN_REFUSED: MetricDef = MetricDef {
    name: "ccmail_pilot_login_refused",
    kind: Kind::Gauge,
    unit: "",
    help: "1 while the mailbox server keeps refusing the pilot's login with its generic answer (3 or more refusals over worker.login_refusal_grace_secs): check permissions; 0 otherwise. Shorter refusals (another session on the mailbox, a permission still propagating) are retried quickly and stay 0.",
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
    help: "Work items in the database, by queue and status (queued, offered, accepted, done, cancelled, held).",
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

/// Poll outcomes (success or error) that could not be written to the pilot's row.
pub const STATUS_RECORD_ERRORS: MetricDef = MetricDef {
    name: "ccmail_status_record_errors_total",
    kind: Kind::Counter,
    unit: "",
    help: "Poll outcomes that could not be recorded on the pilot's row (the row shows an older outcome; the log has the error).",
    labels: &[],
    buckets: &[],
};

/// Live replicas (heartbeat younger than the lease TTL), as this replica last read them.
pub const REPLICAS_ALIVE: MetricDef = MetricDef {
    name: "ccmail_replicas_alive",
    kind: Kind::Gauge,
    unit: "",
    help: "Replicas whose heartbeat is younger than the lease TTL, as this replica last read them (every replica reports the same number).",
    labels: &[],
    buckets: &[],
};

/// Pilot leases this replica holds.
pub const LEASES_HELD: MetricDef = MetricDef {
    name: "ccmail_pilot_leases_held",
    kind: Kind::Gauge,
    unit: "",
    help: "Pilots whose lease this replica holds (it polls exactly these); summed over replicas it equals the enabled pilots.",
    labels: &[],
    buckets: &[],
};

/// Enabled pilots without a live lease, as this replica last counted them.
pub const PILOTS_UNHELD: MetricDef = MetricDef {
    name: "ccmail_pilots_without_holder",
    kind: Kind::Gauge,
    unit: "",
    help: "Enabled pilots that no replica holds a live lease of (nobody polls them), as this replica last counted them; every replica reports the same number.",
    labels: &[],
    buckets: &[],
};

/// Leases this replica took from another holder (or took again after they expired).
pub const LEASE_TAKEOVERS: MetricDef = MetricDef {
    name: "ccmail_pilot_lease_takeovers_total",
    kind: Kind::Counter,
    unit: "",
    help: "Pilot leases this replica took over after another holder released them or let them expire.",
    labels: &[],
    buckets: &[],
};

/// Leases this replica found gone at renewal.
pub const LEASES_LOST: MetricDef = MetricDef {
    name: "ccmail_pilot_leases_lost_total",
    kind: Kind::Counter,
    unit: "",
    help: "Pilot leases this replica could not renew (taken over while it was stalled, or expired): its poller of that pilot stopped.",
    labels: &[],
    buckets: &[],
};

/// New messages by class.
pub const MESSAGES_BY_CLASS: MetricDef = MetricDef {
    name: "ccmail_messages_classified_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages stored new, by class (human, auto_reply, auto_generated, bounce, receipt, loop; see RELIABILITY.md \"Automatic mail\").",
    labels: &[L_PILOT, L_QUEUE, "class"],
    buckets: &[],
};
/// New messages by threading outcome.
pub const CONVERSATIONS: MetricDef = MetricDef {
    name: "ccmail_conversation_messages_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages stored new, by whether they started a conversation (created) or continued a stored one (continued).",
    labels: &[L_PILOT, L_QUEUE, "outcome"],
    buckets: &[],
};
/// Loop-breaker trips.
pub const LOOP_TRIPS: MetricDef = MetricDef {
    name: "ccmail_loop_breaker_trips_total",
    kind: Kind::Counter,
    unit: "",
    help: "Messages the loop breaker classed as loop (held by default, still stored), by reason (x_loop, seen_before, sender_rate).",
    labels: &[L_PILOT, L_QUEUE, "reason"],
    buckets: &[],
};

/// Values of the `class` label of [`MESSAGES_BY_CLASS`].
pub const CLASSES: &[&str] = &[
    "human",
    "auto_reply",
    "auto_generated",
    "bounce",
    "receipt",
    "loop",
];
/// Values of the `outcome` label of [`CONVERSATIONS`].
pub const CONVERSATION_OUTCOMES: &[&str] = &["created", "continued"];
/// Values of the `reason` label of [`LOOP_TRIPS`].
pub const LOOP_REASONS: &[&str] = &["x_loop", "seen_before", "sender_rate"];
/// Waits of work items, from seconds to hours.
const WAIT_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 86400.0,
];

/// Items offered to agents by claims.
pub const WORK_CLAIMS: MetricDef = MetricDef {
    name: "ccmail_work_claims_total",
    kind: Kind::Counter,
    unit: "",
    help: "Work items offered to an agent by a claim (a batch claim counts each item).",
    labels: &[L_QUEUE],
    buckets: &[],
};
/// Transitions of work items by what happened.
pub const WORK_TRANSITIONS: MetricDef = MetricDef {
    name: "ccmail_work_transitions_total",
    kind: Kind::Counter,
    unit: "",
    help: "Work-item transitions by action: accepted, rejected, released, completed, transferred, cancelled, requeued (claims are ccmail_work_claims_total; expiries are counted by their own metrics).",
    labels: &[L_QUEUE, "action"],
    buckets: &[],
};
/// Offers that expired before the agent accepted.
pub const WORK_OFFER_TIMEOUTS: MetricDef = MetricDef {
    name: "ccmail_work_offer_timeouts_total",
    kind: Kind::Counter,
    unit: "",
    help: "Offers not accepted in time, put back in their queue by the rescue step.",
    labels: &[L_QUEUE],
    buckets: &[],
};
/// Leases that expired: the agent is taken as lost.
pub const WORK_LEASE_EXPIRIES: MetricDef = MetricDef {
    name: "ccmail_work_lease_expiries_total",
    kind: Kind::Counter,
    unit: "",
    help: "Accepted items whose agent stopped renewing the lease (reason agent_lost), put back in their queue.",
    labels: &[L_QUEUE],
    buckets: &[],
};
/// Items held for a supervisor after too many offers.
pub const WORK_OFFER_LIMIT_HOLDS: MetricDef = MetricDef {
    name: "ccmail_work_offer_limit_holds_total",
    kind: Kind::Counter,
    unit: "",
    help: "Items that came back after api.max_offers offers and were held for a supervisor instead of being offered again.",
    labels: &[L_QUEUE],
    buckets: &[],
};
/// Agents' steps refused because the claim was no longer theirs.
pub const WORK_STALE_STEPS: MetricDef = MetricDef {
    name: "ccmail_work_stale_steps_total",
    kind: Kind::Counter,
    unit: "",
    help: "Agents' steps refused with no change because the claim token or the state was no longer current (409).",
    labels: &["step"],
    buckets: &[],
};
/// From entering the queue to the first offer.
pub const WORK_TIME_TO_OFFER: MetricDef = MetricDef {
    name: "ccmail_work_time_to_first_offer_seconds",
    kind: Kind::Histogram,
    unit: "seconds",
    help: "Time from a work item entering its queue to its first offer.",
    labels: &[L_QUEUE],
    buckets: WAIT_BUCKETS,
};
/// From entering the queue to the first accept.
pub const WORK_TIME_TO_ACCEPT: MetricDef = MetricDef {
    name: "ccmail_work_time_to_accept_seconds",
    kind: Kind::Histogram,
    unit: "seconds",
    help: "Time from a work item entering its queue to an agent first accepting it.",
    labels: &[L_QUEUE],
    buckets: WAIT_BUCKETS,
};
/// From accept to completion.
pub const WORK_HANDLE_TIME: MetricDef = MetricDef {
    name: "ccmail_work_handle_seconds",
    kind: Kind::Histogram,
    unit: "seconds",
    help: "Time an agent held a work item, from accepting to completing it.",
    labels: &[L_QUEUE],
    buckets: WAIT_BUCKETS,
};

/// Values of the `action` label of [`WORK_TRANSITIONS`].
pub const WORK_ACTIONS: &[&str] = &[
    "accepted",
    "rejected",
    "released",
    "completed",
    "transferred",
    "cancelled",
    "requeued",
];

/// Values of the `step` label of [`WORK_STALE_STEPS`].
pub const WORK_STEPS: &[&str] = &[
    "accept",
    "heartbeat",
    "release",
    "complete",
    "transfer",
    "cancel",
    "requeue",
];

/// Every metric, in the order `/metrics` lists them.
pub const ALL: &[&MetricDef] = &[
    &BUILD_INFO,
    &PILOT_UP,
    &LOGIN_REFUSED,
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
    &STATUS_RECORD_ERRORS,
    &REPLICAS_ALIVE,
    &LEASES_HELD,
    &PILOTS_UNHELD,
    &LEASE_TAKEOVERS,
    &LEASES_LOST,
    &MESSAGES_BY_CLASS,
    &CONVERSATIONS,
    &LOOP_TRIPS,
    &WORK_CLAIMS,
    &WORK_TRANSITIONS,
    &WORK_OFFER_TIMEOUTS,
    &WORK_LEASE_EXPIRIES,
    &WORK_OFFER_LIMIT_HOLDS,
    &WORK_STALE_STEPS,
    &WORK_TIME_TO_OFFER,
    &WORK_TIME_TO_ACCEPT,
    &WORK_HANDLE_TIME,
];

/// Values of the `reason` label of [`INGEST_ERRORS`]: the poll errors of
/// `ingest::poller::PollError::reason`, `retr` for one message's failed download, and
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
    "connect", "auth", "stat", "uidl", "list", "retr", "top", "dele", "quit",
];
/// Values of the `result` label of [`TOKEN_REQUESTS`].
pub const TOKEN_RESULTS: &[&str] = &["success", "transient_error", "permanent_error"];

/// The per-pilot handles: every series of one pilot, built once with its labels and
/// registered at zero, so a rate or an alert works before the first message.
#[derive(Clone)]
pub struct PilotMetrics {
    recorder: Arc<PrometheusRecorder>,
    id: String,
    queue: String,
    up: Gauge,
    login_refused: Gauge,
    last_success: Gauge,
    /// What `last_success` was last set to (f64 bits): gauges cannot be read back.
    last_success_value: Arc<AtomicU64>,
    messages: Counter,
    bytes: Counter,
    oversize: Counter,
    parse_errors: Counter,
    poll_duration: Histogram,
    on_server: Gauge,
}

impl std::fmt::Debug for PilotMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PilotMetrics")
            .field("pilot", &self.id)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl PilotMetrics {
    fn new(recorder: Arc<PrometheusRecorder>, pilot: i64, queue: &str) -> PilotMetrics {
        let id = pilot.to_string();
        let p = [id.as_str(), queue];
        let m = PilotMetrics {
            up: gauge(&recorder, &PILOT_UP, &p),
            login_refused: gauge(&recorder, &LOGIN_REFUSED, &p),
            last_success: gauge(&recorder, &LAST_SUCCESS, &p),
            last_success_value: Arc::new(AtomicU64::new(0f64.to_bits())),
            messages: counter(&recorder, &MESSAGES_INGESTED, &p),
            bytes: counter(&recorder, &BYTES_INGESTED, &p),
            oversize: counter(&recorder, &OVERSIZE, &p),
            parse_errors: counter(&recorder, &PARSE_ERRORS, &p),
            poll_duration: histogram(&recorder, &POLL_DURATION, &p),
            on_server: gauge(&recorder, &MESSAGES_ON_SERVER, &p),
            queue: queue.to_owned(),
            id,
            recorder,
        };
        for reason in ERROR_REASONS {
            m.error_counter(reason).increment(0);
        }
        for command in POP3_COMMANDS {
            let _registered = m.command_histogram(command);
        }
        for class in CLASSES {
            m.labelled(&MESSAGES_BY_CLASS, class).increment(0);
        }
        for outcome in CONVERSATION_OUTCOMES {
            m.labelled(&CONVERSATIONS, outcome).increment(0);
        }
        for reason in LOOP_REASONS {
            m.labelled(&LOOP_TRIPS, reason).increment(0);
        }
        m
    }

    /// The pilot's counter of `def` with its third label set to `word`.
    fn labelled(&self, def: &MetricDef, word: &str) -> Counter {
        counter(&self.recorder, def, &[&self.id, &self.queue, word])
    }

    /// A new message was committed: its class (a word of [`CLASSES`]), whether it started
    /// or continued a conversation ([`CONVERSATION_OUTCOMES`]), and why the loop breaker
    /// tripped on it, if it did ([`LOOP_REASONS`]).
    pub fn message_triaged(&self, class: &str, outcome: &str, loop_reason: Option<&str>) {
        self.labelled(&MESSAGES_BY_CLASS, class).increment(1);
        self.labelled(&CONVERSATIONS, outcome).increment(1);
        if let Some(reason) = loop_reason {
            self.labelled(&LOOP_TRIPS, reason).increment(1);
        }
    }

    fn set_last_success(&self, at: f64) {
        self.last_success_value
            .store(at.to_bits(), Ordering::Relaxed);
        self.last_success.set(at);
    }

    fn error_counter(&self, reason: &str) -> Counter {
        counter(
            &self.recorder,
            &INGEST_ERRORS,
            &[&self.id, &self.queue, reason],
        )
    }

    fn command_histogram(&self, command: &str) -> Histogram {
        histogram(
            &self.recorder,
            &POP3_COMMAND_DURATION,
            &[&self.id, &self.queue, command],
        )
    }

    /// A poll finished. `error_reason` is `None` on success, else a word of
    /// [`ERROR_REASONS`]; `on_server` is the message count of the STAT, when one was made.
    pub fn poll_finished(
        &self,
        took: Duration,
        on_server: Option<usize>,
        error_reason: Option<&str>,
    ) {
        self.poll_duration.record(took.as_secs_f64());
        if let Some(n) = on_server {
            self.on_server.set(n as f64);
        }
        match error_reason {
            None => {
                self.up.set(1.0);
                self.set_last_success(unix_seconds(SystemTime::now()));
            }
            Some(reason) => {
                self.up.set(0.0);
                self.error_counter(reason).increment(1);
            }
        }
    }

    /// Whether the pilot's login is refused persistently (see [`LOGIN_REFUSED`]).
    pub fn login_refused(&self, persistent: bool) {
        self.login_refused.set(if persistent { 1.0 } else { 0.0 });
    }

    /// A STAT answered: `messages` are waiting in the mailbox (before this session's deletions).
    /// Set at every STAT, whether or not the poll then succeeds.
    pub fn messages_on_server(&self, messages: usize) {
        self.on_server.set(messages as f64);
    }

    /// A failure outside a whole poll: one message could not be downloaded (`retr`, the poll
    /// goes on) or the pilot cannot start (`config`).
    pub fn ingest_error(&self, reason: &str) {
        self.error_counter(reason).increment(1);
    }

    /// A batch was committed: `messages` new work items of `bytes` octets, of which
    /// `parse_errors` unparseable and `oversize` over the size limit.
    pub fn messages_stored(
        &self,
        messages: usize,
        bytes: u64,
        parse_errors: usize,
        oversize: usize,
    ) {
        self.messages.increment(messages as u64);
        self.bytes.increment(bytes);
        self.parse_errors.increment(parse_errors as u64);
        self.oversize.increment(oversize as u64);
    }

    /// One POP3 step took `took` (`command` from [`POP3_COMMANDS`]).
    pub fn pop3_command(&self, command: &str, took: Duration) {
        self.command_histogram(command).record(took.as_secs_f64());
    }
}

fn key(def: &MetricDef, labels: &[&str]) -> Key {
    // A wrong label count is a programming error in this module.
    debug_assert_eq!(labels.len(), def.labels.len(), "labels of {}", def.name);
    let labels: Vec<Label> = def
        .labels
        .iter()
        .zip(labels)
        .map(|(k, v)| Label::new(*k, (*v).to_owned()))
        .collect();
    Key::from_parts(def.name, labels)
}

const METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

fn counter(r: &PrometheusRecorder, def: &MetricDef, labels: &[&str]) -> Counter {
    r.register_counter(&key(def, labels), &METADATA)
}

fn gauge(r: &PrometheusRecorder, def: &MetricDef, labels: &[&str]) -> Gauge {
    r.register_gauge(&key(def, labels), &METADATA)
}

fn histogram(r: &PrometheusRecorder, def: &MetricDef, labels: &[&str]) -> Histogram {
    r.register_histogram(&key(def, labels), &METADATA)
}

/// Metrics replaced wholesale by each database refresh: their series of a vanished queue or
/// app must disappear, which the exporter cannot do, so they are kept and rendered here.
fn is_refreshed(def: &MetricDef) -> bool {
    [WORK_ITEMS.name, OLDEST_QUEUED_AGE.name, SECRET_EXPIRY.name].contains(&def.name)
}

type Series = BTreeMap<Vec<String>, f64>;

#[derive(Default)]
struct State {
    /// The loaded pilots' handles. Only rendering reads it: series of a pilot that is not
    /// here (disabled, deleted, or relabelled with another queue) are left out of `/metrics`.
    pilots: HashMap<i64, PilotMetrics>,
    /// The name of each app registration by its opaque id, for the `app` label.
    apps: HashMap<String, String>,
    /// The series of the [`is_refreshed`] metrics.
    refreshed: HashMap<&'static str, Series>,
}

/// The registry of the metrics in [`ALL`], on a `metrics-exporter-prometheus` recorder. The
/// worker uses [`global()`]; tests may make their own.
///
/// The exporter cannot delete a series, and a pilot's series must go when the pilot is
/// disabled or deleted (a dashboard would otherwise show it forever, and its last
/// `ccmail_pilot_up` 0 would keep an alert firing). An idle timeout does not fit (a healthy
/// idle pilot records nothing for long stretches), so the exporter's output is filtered when
/// rendered: a line labelled with a pilot is kept only if that pilot is loaded with that
/// queue. Its counters stay in the exporter's registry, so a pilot enabled again continues
/// them, which keeps them monotonic.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    refresh_errors: Counter,
    status_record_errors: Counter,
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

/// One app registration as the periodic database read sees it.
#[derive(Debug, Clone)]
pub struct AppInfo {
    /// The opaque id the token cache reports it by (see [`Metrics::app_loaded`]).
    pub id: String,
    /// Its name: the `app` label.
    pub name: String,
    /// When its client secret expires, if known.
    pub secret_expires_at: Option<SystemTime>,
}

/// The number of work items of one queue in one status.
#[derive(Debug, Clone)]
pub struct QueueCount {
    pub queue: String,
    pub status: WorkItemStatus,
    pub count: i64,
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
    /// An empty registry with every metric described, `ccmail_build_info` set and the
    /// refresh error counter at zero.
    pub fn new() -> Metrics {
        let mut builder = PrometheusBuilder::new();
        for def in ALL.iter().filter(|d| !d.buckets.is_empty()) {
            // Fails only for an empty bucket list, which the filter excludes.
            builder = match builder
                .set_buckets_for_metric(Matcher::Full(def.name.to_owned()), def.buckets)
            {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
        }
        let recorder = Arc::new(builder.build_recorder());
        for def in ALL.iter().filter(|d| !is_refreshed(d)) {
            let unit = match def.unit {
                "seconds" => Some(Unit::Seconds),
                "bytes" => Some(Unit::Bytes),
                _ => None,
            };
            let name = KeyName::from(def.name);
            let help = SharedString::const_str(def.help);
            match def.kind {
                Kind::Counter => recorder.describe_counter(name, unit, help),
                Kind::Gauge => recorder.describe_gauge(name, unit, help),
                Kind::Histogram => recorder.describe_histogram(name, unit, help),
            }
        }
        gauge(&recorder, &BUILD_INFO, &[env!("CARGO_PKG_VERSION")]).set(1.0);
        let refresh_errors = counter(&recorder, &REFRESH_ERRORS, &[]);
        refresh_errors.increment(0);
        let status_record_errors = counter(&recorder, &STATUS_RECORD_ERRORS, &[]);
        status_record_errors.increment(0);
        for step in WORK_STEPS {
            counter(&recorder, &WORK_STALE_STEPS, &[step]).increment(0);
        }
        counter(&recorder, &LEASE_TAKEOVERS, &[]).increment(0);
        counter(&recorder, &LEASES_LOST, &[]).increment(0);
        gauge(&recorder, &LEASES_HELD, &[]).set(0.0);
        Metrics {
            handle: recorder.handle(),
            recorder,
            refresh_errors,
            status_record_errors,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a single map operation: a panic elsewhere cannot leave a half-written
        // value behind, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value of a series as `/metrics` shows it, if it shows it (for tests and
    /// `doctor`); for a histogram, its count.
    pub fn value(&self, def: &MetricDef, labels: &[&str]) -> Option<f64> {
        if is_refreshed(def) {
            let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
            return self.lock().refreshed.get(def.name)?.get(&key).copied();
        }
        let name = match def.kind {
            Kind::Histogram => format!("{}_count", def.name),
            _ => def.name.to_owned(),
        };
        let want: Vec<(&str, String)> = def
            .labels
            .iter()
            .zip(labels)
            .map(|(k, v)| (*k, escape_label(v)))
            .collect();
        let text = self.render();
        text.lines().find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            if n != name {
                return None;
            }
            let got = parse_labels(rest.strip_suffix('}')?);
            (got == want
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>())
            .then(|| value.parse().ok())
            .flatten()
        })
    }

    // ---- work items (the agents' API and the rescue step) ----

    /// A claim offered `count` items of `queue`; `first_offer_waits` are the waits of those
    /// offered for the first time.
    pub fn work_claimed(&self, queue: &str, count: u64, first_offer_waits: &[f64]) {
        counter(&self.recorder, &WORK_CLAIMS, &[queue]).increment(count);
        let h = histogram(&self.recorder, &WORK_TIME_TO_OFFER, &[queue]);
        for wait in first_offer_waits {
            h.record(*wait);
        }
    }

    /// A transition of an item of `queue` (`action` one of [`WORK_ACTIONS`]), with the wait
    /// until its first accept or the time it was handled when the step knows them.
    pub fn work_moved(
        &self,
        queue: &str,
        action: &str,
        first_accept_wait: Option<f64>,
        handled: Option<f64>,
    ) {
        counter(&self.recorder, &WORK_TRANSITIONS, &[queue, action]).increment(1);
        if let Some(wait) = first_accept_wait {
            histogram(&self.recorder, &WORK_TIME_TO_ACCEPT, &[queue]).record(wait);
        }
        if let Some(secs) = handled {
            histogram(&self.recorder, &WORK_HANDLE_TIME, &[queue]).record(secs);
        }
    }

    /// The rescue step put back items of `queue`.
    pub fn work_rescued(&self, queue: &str, offers_expired: u64, leases_expired: u64, held: u64) {
        counter(&self.recorder, &WORK_OFFER_TIMEOUTS, &[queue]).increment(offers_expired);
        counter(&self.recorder, &WORK_LEASE_EXPIRIES, &[queue]).increment(leases_expired);
        counter(&self.recorder, &WORK_OFFER_LIMIT_HOLDS, &[queue]).increment(held);
    }

    /// An agent's `step` was refused as stale.
    pub fn work_stale(&self, step: &str) {
        counter(&self.recorder, &WORK_STALE_STEPS, &[step]).increment(1);
    }

    /// Registers the work series of `queue` at zero, so rates and alerts work before the
    /// first claim (called for every queue the gauge refresh sees).
    pub fn work_queue_seen(&self, queue: &str) {
        self.work_claimed(queue, 0, &[]);
        self.work_rescued(queue, 0, 0, 0);
        for action in WORK_ACTIONS {
            counter(&self.recorder, &WORK_TRANSITIONS, &[queue, action]).increment(0);
        }
        for def in [&WORK_TIME_TO_OFFER, &WORK_TIME_TO_ACCEPT, &WORK_HANDLE_TIME] {
            let _registered = histogram(&self.recorder, def, &[queue]);
        }
    }

    // ---- pilots (the supervisor and the poller) ----

    /// The supervisor loaded `pilot` (it may still fail to start): its series exist from now
    /// on, at zero, and `ccmail_last_successful_poll_timestamp_seconds` starts from the
    /// database's `last_success_at`. Calling it again for a running pilot keeps its counters.
    /// The returned handle records for the pilot.
    pub fn pilot_loaded(
        &self,
        pilot: i64,
        queue: &str,
        last_success: Option<SystemTime>,
    ) -> PilotMetrics {
        let mut state = self.lock();
        let handle = match state.pilots.get(&pilot) {
            Some(loaded) if loaded.queue == queue => loaded.clone(),
            _ => self.pilot_metrics(pilot, queue),
        };
        let known = f64::from_bits(handle.last_success_value.load(Ordering::Relaxed));
        let from_db = last_success.map(unix_seconds).unwrap_or(0.0);
        handle.set_last_success(known.max(from_db));
        state.pilots.insert(pilot, handle.clone());
        handle
    }

    /// Leaves out of `/metrics` the series of every pilot not in `loaded` (disabled or
    /// deleted pilots).
    pub fn retain_pilots(&self, loaded: &HashSet<i64>) {
        self.lock().pilots.retain(|id, _| loaded.contains(id));
    }

    /// The handle of `pilot`'s series labelled with `queue`, for the code that records them.
    /// They show in `/metrics` while [`Metrics::pilot_loaded`] has loaded the pilot with
    /// that queue.
    pub fn pilot_metrics(&self, pilot: i64, queue: &str) -> PilotMetrics {
        PilotMetrics::new(self.recorder.clone(), pilot, queue)
    }

    // ---- apps (the token cache and the database refresh) ----

    /// Names the app registration `id` (the `app` label) and creates its token series. `id`
    /// is opaque here: the token cache's key as its owner renders it.
    pub fn app_loaded(&self, id: &str, name: &str) {
        self.lock().apps.insert(id.to_owned(), name.to_owned());
        for result in TOKEN_RESULTS {
            counter(&self.recorder, &TOKEN_REQUESTS, &[name, result]).increment(0);
        }
        gauge(&self.recorder, &TOKEN_FAILURES, &[name]).increment(0.0);
    }

    /// The `app` label of `id`: its name, or `client_id` for an app no pilot has named
    /// (a token requested outside the supervisor, e.g. by a diagnostic command).
    fn app_label(&self, id: &str, client_id: &str) -> String {
        self.lock()
            .apps
            .get(id)
            .cloned()
            .unwrap_or_else(|| client_id.to_owned())
    }

    /// The token cache asked the endpoint for a token of the app `id` (client `client_id`);
    /// `consecutive_failures` is the cache's count after this request (0 after a success).
    pub fn token_request(
        &self,
        id: &str,
        client_id: &str,
        outcome: TokenOutcome,
        consecutive_failures: u32,
    ) {
        let app = self.app_label(id, client_id);
        let result = match outcome {
            TokenOutcome::Issued(expires) => {
                gauge(&self.recorder, &TOKEN_EXPIRY, &[&app]).set(unix_seconds(expires));
                "success"
            }
            TokenOutcome::Failed { transient: true } => "transient_error",
            TokenOutcome::Failed { transient: false } => "permanent_error",
        };
        counter(&self.recorder, &TOKEN_REQUESTS, &[&app, result]).increment(1);
        gauge(&self.recorder, &TOKEN_FAILURES, &[&app]).set(f64::from(consecutive_failures));
    }

    /// Replaces the client-secret expiry gauges and app names with what `apps` says.
    pub fn apps_refreshed(&self, apps: &[AppInfo]) {
        let mut expiries = Series::new();
        let mut state = self.lock();
        for a in apps {
            state.apps.insert(a.id.clone(), a.name.clone());
            if let Some(at) = a.secret_expires_at {
                expiries.insert(vec![a.name.clone()], unix_seconds(at));
            }
        }
        state.refreshed.insert(SECRET_EXPIRY.name, expiries);
    }

    /// Replaces the work-item gauges. Every queue of a loaded pilot gets every status and an
    /// age, at zero when the database has none (so a backlog panel shows 0, not "no data").
    pub fn queues_refreshed(&self, counts: &[QueueCount], oldest: &[(String, Duration)]) {
        let mut state = self.lock();
        let mut queues: HashSet<String> = state.pilots.values().map(|p| p.queue.clone()).collect();
        queues.extend(counts.iter().map(|c| c.queue.clone()));
        queues.extend(oldest.iter().map(|(q, _)| q.clone()));
        let mut items = Series::new();
        let mut ages = Series::new();
        for q in &queues {
            for s in WorkItemStatus::ALL {
                items.insert(vec![q.clone(), s.as_str().to_owned()], 0.0);
            }
            ages.insert(vec![q.clone()], 0.0);
        }
        for c in counts {
            items.insert(
                vec![c.queue.clone(), c.status.as_str().to_owned()],
                c.count as f64,
            );
        }
        for (q, age) in oldest {
            ages.insert(vec![q.clone()], age.as_secs_f64());
        }
        state.refreshed.insert(WORK_ITEMS.name, items);
        state.refreshed.insert(OLDEST_QUEUED_AGE.name, ages);
        drop(state);
        for q in &queues {
            self.work_queue_seen(q);
        }
    }

    /// Folds the histogram samples recorded since the last scrape into their buckets. The
    /// exporter keeps raw samples until then, so without a scrape they would pile up; the
    /// gauge refresh calls this on every tick.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// A periodic database read failed.
    pub fn refresh_failed(&self) {
        self.refresh_errors.increment(1);
    }

    /// The live replicas this replica counts.
    pub fn replicas_alive(&self, n: usize) {
        gauge(&self.recorder, &REPLICAS_ALIVE, &[]).set(n as f64);
    }

    /// The pilot leases this replica holds.
    pub fn leases_held(&self, n: usize) {
        gauge(&self.recorder, &LEASES_HELD, &[]).set(n as f64);
    }

    /// Enabled pilots nobody holds a live lease of.
    pub fn pilots_unheld(&self, n: i64) {
        gauge(&self.recorder, &PILOTS_UNHELD, &[]).set(n as f64);
    }

    /// A lease taken from another holder (or again after it expired).
    pub fn lease_takeover(&self) {
        counter(&self.recorder, &LEASE_TAKEOVERS, &[]).increment(1);
    }

    /// A lease found gone at renewal.
    pub fn lease_lost(&self) {
        counter(&self.recorder, &LEASES_LOST, &[]).increment(1);
    }

    /// A poll's outcome could not be written to its pilot's row.
    pub fn status_record_failed(&self) {
        self.status_record_errors.increment(1);
    }

    // ---- exposition ----

    /// The Prometheus text exposition (format 0.0.4): the exporter's output without the
    /// series of pilots that are not loaded, then the database-refreshed gauges.
    pub fn render(&self) -> String {
        let exported = self.handle.render();
        let state = self.lock();
        let live: HashSet<String> = state
            .pilots
            .values()
            .map(|p| format!("pilot=\"{}\",queue=\"{}\"", p.id, escape_label(&p.queue)))
            .collect();
        let mut out = String::with_capacity(exported.len() + 4 * 1024);
        for line in exported.lines() {
            let keep = line.starts_with('#')
                || !line.contains("{pilot=\"")
                || line
                    .split_once('{')
                    .and_then(|(_, rest)| {
                        // `pilot` and `queue` are the first two labels of every pilot metric.
                        let end = rest.find("\",")?;
                        let q = rest[end + 2..].strip_prefix("queue=\"")?;
                        let qend = find_unescaped_quote(q)?;
                        Some(&rest[..end + 2 + "queue=\"".len() + qend + 1])
                    })
                    .is_some_and(|pair| live.contains(pair));
            if keep && !line.is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
        // The exporter writes a family only once it has a series; every declared family is
        // described, so a scrape shows what exists before any pilot is loaded.
        for def in ALL.iter().filter(|d| !is_refreshed(d)) {
            if !exported.contains(&format!("# TYPE {} ", def.name)) {
                let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(def.help));
                let _ = writeln!(out, "# TYPE {} {}", def.name, def.kind.as_str());
            }
        }
        for def in ALL.iter().filter(|d| is_refreshed(d)) {
            // Writing into a String cannot fail; the results are ignored for that reason.
            let _ = writeln!(out, "# HELP {} {}", def.name, escape_help(def.help));
            let _ = writeln!(out, "# TYPE {} {}", def.name, def.kind.as_str());
            let Some(series) = state.refreshed.get(def.name) else {
                continue;
            };
            for (labels, value) in series {
                let _ = writeln!(
                    out,
                    "{}{} {}",
                    def.name,
                    label_set(def.labels, labels),
                    number(*value)
                );
            }
        }
        out
    }
}

/// The byte offset of the first `"` in `s` not escaped by a backslash.
fn find_unescaped_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// The `name="value"` pairs of a rendered label set (values as escaped in the text).
fn parse_labels(mut s: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    while let Some((k, rest)) = s.split_once("=\"") {
        let Some(end) = find_unescaped_quote(rest) else {
            break;
        };
        out.push((k, &rest[..end]));
        s = rest[end + 1..].strip_prefix(',').unwrap_or("");
    }
    out
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

fn label_set(names: &[&str], values: &[String]) -> String {
    let pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape_label(v)))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
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
                        "pilot", "queue", "app", "reason", "result", "command", "status",
                        "version", "action", "step", "class", "outcome"
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
        let p1 = m.pilot_loaded(1, "q", None);
        p1.poll_finished(Duration::from_millis(70), Some(3), None);
        p1.poll_finished(Duration::from_secs(400), Some(0), Some("timeout"));
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
        m.pilot_loaded(3, "sales", None)
            .messages_stored(2, 100, 1, 0);
        m.pilot_loaded(3, "sales", None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "sales"]), Some(2.0));
        m.pilot_loaded(3, "support", None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "sales"]), None);
        assert_eq!(m.value(&MESSAGES_INGESTED, &["3", "support"]), Some(0.0));
    }

    #[test]
    fn a_reload_does_not_move_the_last_success_back_to_the_database_value() {
        let m = Metrics::new();
        m.pilot_loaded(5, "q", None)
            .poll_finished(Duration::from_millis(1), Some(0), None);
        let polled = m.value(&LAST_SUCCESS, &["5", "q"]).unwrap_or(0.0);
        assert!(polled > 1e9, "{polled}");
        m.pilot_loaded(5, "q", Some(UNIX_EPOCH + Duration::from_secs(1000)));
        assert_eq!(m.value(&LAST_SUCCESS, &["5", "q"]), Some(polled));
    }

    #[test]
    fn token_requests_are_labelled_with_the_app_name() {
        let m = Metrics::new();
        let key = "https://login.example|t|c|s";
        m.app_loaded(key, "contoso");
        m.token_request(key, "c", TokenOutcome::Failed { transient: false }, 1);
        m.token_request(
            key,
            "c",
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
    fn a_refreshed_queue_has_its_work_series_at_zero() {
        let m = Metrics::new();
        m.queues_refreshed(
            &[QueueCount {
                queue: "support".to_owned(),
                status: WorkItemStatus::Queued,
                count: 3,
            }],
            &[],
        );
        let text = m.render();
        assert!(
            text.contains("ccmail_work_items{queue=\"support\",status=\"queued\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("ccmail_work_claims_total{queue=\"support\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("ccmail_work_handle_seconds_bucket{queue=\"support\""),
            "{text}"
        );
        assert!(
            text.contains("ccmail_work_stale_steps_total{step=\"accept\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.pilot_loaded(1, "a\"b\\c\nd", None);
        assert!(m.render().contains("queue=\"a\\\"b\\\\c\\nd\""));
    }
}
