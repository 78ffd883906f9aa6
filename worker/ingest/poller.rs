//! One poll of one mailbox pilot: list, download, store, delete — in the order that makes loss
//! and duplicates impossible (RELIABILITY.md, "Guarantees" and "Crash matrix").
//!
//! 1. The token is obtained *before* the connection is opened (Exchange drops idle
//!    unauthenticated connections after about a minute; a slow token endpoint must not eat it).
//! 2. `UIDL` lists the maildrop; UIDLs already stored are never downloaded again. Stored
//!    messages still listed (an earlier session never reached QUIT) are checked, deleted and
//!    QUIT in a session of their own before anything is downloaded.
//! 3. New messages are downloaded (`RETR`, bounded by the pilot's size limit; one the `LIST`
//!    shows far over it is not downloaded) and parsed, and a batch of them is stored in one
//!    transaction: message, attachments, work item, UIDL.
//! 4. Only after that commit is acknowledged are they marked with `DELE`.
//! 5. `QUIT` applies the deletions; only after its `+OK` are the rows marked deleted. Any
//!    failure before QUIT drops the connection without QUIT, so the server deletes nothing and
//!    the next session finds those UIDLs stored and only deletes them (RELIABILITY.md,
//!    "Progress is never undone by a fault").
//!
//! A message over the size limit gets a work item with its headers (`TOP n 0`) and stays on the
//! server; a message whose download keeps failing is flagged the same way after
//! `max_retr_attempts` and tried again after `refetch_after`. Neither blocks the rest of the
//! mailbox.
//!
//! The server is not trusted to name messages truthfully:
//! - a message is deleted only when this session stored it, or found it stored with the same
//!   bytes or the same identity (`ingest::identity`); a stored message found again after an
//!   interrupted poll is checked with `TOP n 0` before its DELE, so a server that gives a stored
//!   message's UIDL to new mail cannot make ccmail delete that mail;
//! - a message whose UIDL is malformed or shared with another listed message is known by its
//!   identity instead (stored under a derived key that no UIDL can equal); a listing line that
//!   cannot be read affects only its message;
//! - a message whose parsed fields the database refuses is stored raw and flagged, and the rest
//!   of its batch is stored as usual;
//! - the whole poll has a deadline, after which it stops between messages (and the session is
//!   cut if a server keeps it in one response).

use std::collections::VecDeque;
use std::time::Duration;

use crate::store::Db;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ingest::classify;
use crate::ingest::identity::{self, Identity};
use crate::ingest::parse::{self, ParseLimits, ParsedMail};
use crate::model::triage::{LoopTrip, MailClass, SenderRate, Triage};
use crate::model::{Flag, defaults};
use crate::oauth::{OAuthError, TokenCache};
use crate::pop3::{self, Client, Session, Stream};
use crate::store::{self, Inserted, KnownUidl, StoreError, StoredCopy};
use crate::telemetry as metrics;

pub use crate::ingest::pilot::{Login, Login as PilotAuth, Pilot};

/// Per-poll bounds.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_messages_per_poll: usize,
    pub batch_messages: usize,
    pub batch_bytes: usize,
    /// Failed RETRs (counted across polls) after which a message is given up on: the poll
    /// that sees the last failure stores its headers as a `fetch_failed` work item.
    pub max_retr_attempts: u32,
    /// Batches being committed while the next one downloads.
    pub commit_concurrency: usize,
    /// Messages being parsed (on parser threads) while the next one downloads.
    pub parse_ahead: usize,
    /// A poll stops taking new messages after this long (it commits, deletes and QUITs what it
    /// has); a server that holds it in one response is cut off a little later.
    pub max_poll_duration: Duration,
    /// UIDL listing entries looked at per poll; a larger maildrop drains over several polls.
    pub max_listing_entries: usize,
    /// Bounds of parsing one message (parts, depth, sanitising, time).
    pub parse: ParseLimits,
    /// A message stored as headers only because its download kept failing is downloaded
    /// again this long after the last try, and completed in place when it arrives whole.
    pub refetch_after: Duration,
    /// The loop breaker's rate rule (`[classify]`).
    pub sender_rate: SenderRate,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_messages_per_poll: defaults::MAX_MESSAGES_PER_POLL,
            batch_messages: defaults::BATCH_MESSAGES,
            batch_bytes: defaults::BATCH_BYTES,
            max_retr_attempts: defaults::MAX_RETR_ATTEMPTS,
            commit_concurrency: defaults::COMMIT_CONCURRENCY,
            parse_ahead: defaults::PARSE_AHEAD,
            max_poll_duration: defaults::MAX_POLL_DURATION,
            max_listing_entries: defaults::MAX_LISTING_ENTRIES,
            parse: ParseLimits::default(),
            refetch_after: defaults::REFETCH_AFTER,
            sender_rate: SenderRate {
                max_messages: defaults::LOOP_MAX_MESSAGES,
                window: defaults::LOOP_WINDOW,
            },
        }
    }
}

/// What one poll did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Messages in the maildrop at the start.
    pub on_server: usize,
    /// Octets the server reported at STAT (an estimate on Exchange Online).
    pub server_octets: u64,
    /// New messages stored (work items created).
    pub stored: usize,
    /// Octets downloaded by RETR and stored.
    pub stored_octets: u64,
    /// Messages that were already stored (found again after an interrupted poll).
    pub already_stored: usize,
    /// Messages deleted from the server at QUIT.
    pub deleted: usize,
    /// Messages over the size limit, stored as headers and flagged.
    pub oversize: usize,
    /// Messages that could not be parsed (stored raw and flagged).
    pub parse_errors: usize,
    /// RETR failures in this poll.
    pub retr_failures: usize,
    /// Messages given up on after repeated RETR failures (stored as headers and flagged).
    pub skipped: usize,
    /// The per-poll cap (or the poll deadline) left new messages behind: poll again at once.
    pub more_waiting: bool,
    /// Messages whose UIDL could not be trusted (malformed, shared with another message, or
    /// reused for a message other than the one stored under it): handled by their identity.
    pub untrusted_uidls: usize,
    /// Listing lines without a usable message number: those messages cannot be addressed and
    /// stay on the server.
    pub unaddressable: usize,
    /// Messages whose parsed fields the database refused: stored raw and flagged.
    pub store_fallbacks: usize,
    /// Headers-only messages (their download had kept failing) downloaded whole at last and
    /// completed in place (their work item kept, not doubled).
    pub completed: usize,
    /// POP3 sessions this poll used (more than one when it first made earlier deletions stick,
    /// or when it ran in short sessions after an interrupted poll).
    pub sessions: usize,
    /// Sessions of this poll whose connection broke after they had downloaded messages (the
    /// poll went on in a new session).
    pub interruptions: usize,
}

/// How the supervisor asks a poll to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollMode {
    /// At most this many downloads per POP3 session: then the session commits, deletes and
    /// QUITs, and the poll goes on in a new one (`None`: one session for all of it). Used after
    /// an interrupted poll, so a link that keeps dropping still shrinks the mailbox with every
    /// session.
    pub session_messages: Option<usize>,
}

/// What a poll did, whether or not it ended in an error: a failed poll may have stored and
/// deleted messages before the failure.
#[derive(Debug)]
pub struct PollOutcome {
    pub report: PollReport,
    pub result: Result<(), PollError>,
    /// Messages downloaded in the session that failed, before it failed.
    pub downloaded_before_failure: usize,
}

impl PollOutcome {
    /// The poll stored or deleted something (so a failure at its end undid no progress).
    pub fn progressed(&self) -> bool {
        self.report.stored + self.report.deleted + self.report.completed > 0
    }
}

/// Why a poll stopped early. The connection has been dropped without QUIT.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no access token: {0}")]
    Token(#[from] OAuthError),
    #[error("{0}")]
    Pop3(#[from] pop3::Error),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// A background parse or commit task died (a bug); the poll is retried.
    #[error("ingest task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// This replica's lease of the pilot is gone or too old to vouch for: it stops before the
    /// next login, RETR, DELE or commit (the holder polls the mailbox).
    #[error(
        "this replica no longer holds the lease of pilot {pilot} (taken over, released, or not \
         renewed in time); it stops before touching the mailbox or the store again"
    )]
    LeaseLost { pilot: i64 },
}

impl PollError {
    /// The supervisor's decision: each layer's own (see [`crate::model::retry`]); a task that
    /// died is retried soon.
    pub fn retry(&self) -> crate::model::retry::Retry {
        match self {
            PollError::Token(e) => e.retry(),
            PollError::Pop3(e) => e.retry(),
            PollError::Store(e) => e.retry(),
            PollError::Task(_) | PollError::LeaseLost { .. } => crate::model::retry::Retry::Soon,
        }
    }

    /// The fix to show next to the error.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            PollError::Token(e) => e.fix(),
            PollError::Pop3(e) => e.hint(),
            PollError::Store(_) | PollError::Task(_) | PollError::LeaseLost { .. } => None,
        }
    }

    /// A short, fixed reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PollError::Token(_) => "token",
            PollError::Pop3(pop3::Error::AuthRejected { .. })
            | PollError::Pop3(pop3::Error::TokenTooLong { .. }) => "auth",
            PollError::Pop3(pop3::Error::Timeout { .. }) => "timeout",
            PollError::Pop3(pop3::Error::TlsCertificate { .. })
            | PollError::Pop3(pop3::Error::TlsHandshake { .. }) => "tls",
            PollError::Pop3(_) => "pop3",
            PollError::Store(StoreError::Fenced { .. }) | PollError::LeaseLost { .. } => "lease",
            PollError::Store(_) => "database",
            PollError::Task(_) => "internal",
        }
    }
}

/// A downloaded message on its way to a batch.
struct Fetched {
    number: u32,
    /// The key it is stored under: its UIDL, or a derived key when the UIDL is not trusted.
    key: String,
    raw: Bytes,
    identity: Option<Identity>,
    /// Already parsed (headers-only items); `None`: parsed before it joins a batch.
    parsed: Option<ParsedMail>,
    flag: Option<Flag>,
    headers_only: bool,
    /// The UIDL was not trusted: if the key turns out to be taken by other mail, the message
    /// is not stored under a second derived key.
    untrusted: bool,
    /// It is stored as headers only (`fetch_failed`): this whole copy completes that row.
    completes: bool,
}

/// A message parsed and ready to be stored.
struct Ready {
    fetched: Fetched,
    parsed: ParsedMail,
    sha256: [u8; 32],
    /// Its class and Outlook threading facts (`classify`).
    triage: Triage,
}

impl Ready {
    /// Bytes this message holds in memory: what a batch's budget counts.
    fn footprint(&self) -> usize {
        self.fetched.raw.len() + self.parsed.heap_bytes()
    }
}

/// A message at least this large is parsed alone (RELIABILITY.md, "Memory"): a parse may take
/// several times its input (decoded text, the sanitiser's tree), so large ones never overlap.
const PARSE_ALONE_BYTES: usize = 1024 * 1024;

/// What a committed batch allows and reports.
struct Committed {
    /// (message number, key) of messages that may now be deleted from the server.
    deletable: Vec<(u32, String)>,
    stored: usize,
    stored_octets: u64,
    parse_errors: usize,
    oversize: usize,
    store_fallbacks: usize,
    completed: usize,
    /// Class, threading and loop-breaker trip of each message stored new (for the metrics).
    triaged: Vec<Triaged>,
}

/// What the store decided for one new message, as the metrics count it.
#[derive(Debug, Clone, Copy)]
struct Triaged {
    class: MailClass,
    threaded: store::Threaded,
    loop_trip: Option<LoopTrip>,
}

impl Triaged {
    fn of(inserted: &Inserted) -> Option<Triaged> {
        match inserted {
            Inserted::New {
                class,
                threaded,
                loop_trip,
                ..
            } => Some(Triaged {
                class: *class,
                threaded: *threaded,
                loop_trip: *loop_trip,
            }),
            Inserted::Existing(_) => None,
        }
    }
}

/// How one listed message is handled in this poll.
enum Plan {
    /// Not stored yet: download it and store it under its UIDL (`attempts` downloads of it
    /// failed in earlier polls; `too_large`: one ran far past the size limit).
    Fetch {
        uidl: String,
        attempts: u32,
        too_large: bool,
    },
    /// Stored as headers only because its download kept failing, and due to be tried again:
    /// download it and complete the stored row.
    Refetch { uidl: String },
    /// The server's UIDL for it cannot be trusted (malformed, or shared with another listed
    /// message): it is known by its identity.
    Untrusted { why: String },
    /// Listed under a stored message's UIDL, but a different message: download it and store
    /// it under a key derived from its identity or bytes.
    Derived,
}

/// What `TOP n 0` and the store say about a message whose UIDL is not trusted.
enum Resolution {
    /// Stored already (whole): delete it.
    Delete { key: String },
    /// Stored already as headers only, or kept on the server: leave it.
    Leave,
    /// Not stored: download it and store it under this key (`None`: derived from the bytes).
    Fetch { key: Option<String> },
}

/// Logs in as the pilot says. The token comes first, before any connection exists.
async fn open_session(pilot: &Pilot, tokens: &TokenCache) -> Result<Session<Stream>, PollError> {
    match &pilot.auth {
        Login::XOAuth2 { app, .. } => {
            // Why first: an unauthenticated POP3 connection is dropped by Exchange after about
            // a minute, and a token request may take up to its own deadline.
            let token = tokens.token(app).await?;
            let client = timed(pilot, "connect", Client::connect(&pilot.server)).await?;
            let session = timed(
                pilot,
                "auth",
                client.auth_xoauth2(&pilot.mailbox, token.secret()),
            )
            .await;
            if let Err(pop3::Error::AuthRejected { .. }) = &session {
                tracing::warn!(
                    pilot = pilot.id,
                    token_length = token.len(),
                    "XOAUTH2 rejected by the server"
                );
            }
            Ok(session?)
        }
        Login::UserPass { username, password } => {
            let client = timed(pilot, "connect", Client::connect(&pilot.server)).await?;
            Ok(timed(pilot, "auth", client.auth_user_pass(username, password)).await?)
        }
    }
}

/// The listing as this session sees it, in server order within each group. Stored messages
/// to verify and delete come first, in a session of their own (see [`poll`]); then new mail
/// (messages that failed before after the others, so one bad message never holds up the
/// rest), then the untrusted UIDLs, so neither a backlog of checks nor a hostile listing can
/// keep new mail waiting.
struct Listed {
    verifies: Vec<(u32, String, StoredCopy)>,
    fetches: Vec<(u32, Plan)>,
    untrusted: Vec<(u32, Plan)>,
    /// The listing was cut at `max_listing_entries`.
    truncated: bool,
}

/// Reads the UIDL listing and decides, per message, what this session does with it.
async fn plan_listing(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    pool: &Db,
    limits: &IngestLimits,
    report: &mut PollReport,
) -> Result<Listed, PollError> {
    let listing = timed(
        pilot,
        "uidl",
        session.uidl_listing(limits.max_listing_entries),
    )
    .await?;
    report.unaddressable = listing.unreadable_lines;
    if listing.unreadable_lines > 0 {
        tracing::warn!(
            pilot = pilot.id,
            lines = listing.unreadable_lines,
            "UIDL listing lines without a usable message number; those messages stay on the server"
        );
    }
    let present: Vec<String> = listing
        .entries
        .iter()
        .filter_map(|e| match &e.uidl {
            pop3::ListedUidl::Unique(u) => Some(u.clone()),
            _ => None,
        })
        .collect();
    let truncated = listing.truncated;
    let (known, refetch) = pool
        .with_conn("what the store knows of the listing", async |conn| {
            if !pilot.keep_on_server && !truncated {
                // Bookkeeping only: a QUIT applied without its reply left rows unmarked.
                store::mark_vanished(conn, pilot.id, &present).await?;
            }
            let known = store::known_uidls(conn, pilot.id, &present).await?;
            let headers_only: Vec<String> = known
                .iter()
                .filter(|(_, k)| matches!(k, KnownUidl::Stored { copy, .. } if copy.headers_only))
                .map(|(uidl, _)| uidl.clone())
                .collect();
            let refetch = if headers_only.is_empty() {
                Default::default()
            } else {
                store::refetch_due(conn, pilot.id, &headers_only, limits.refetch_after).await?
            };
            Ok((known, refetch))
        })
        .await?;
    let mut listed = Listed {
        verifies: Vec::new(),
        fetches: Vec::new(),
        untrusted: Vec::new(),
        truncated: listing.truncated,
    };
    let (mut failed_before, mut refetches) = (Vec::new(), Vec::new());
    let (mut shared, mut invalid) = (0usize, 0usize);
    for entry in listing.entries {
        let number = entry.number;
        match entry.uidl {
            pop3::ListedUidl::Unique(uidl) => match known.get(&uidl) {
                Some(KnownUidl::Stored { copy, .. }) => {
                    report.already_stored += 1;
                    if copy.headers_only {
                        // Flagged headers-only messages stay on the server for a person; one
                        // whose download kept failing is tried again now and then.
                        if refetch.contains(&uidl) {
                            refetches.push((number, Plan::Refetch { uidl }));
                        }
                        continue;
                    }
                    if pilot.keep_on_server {
                        continue;
                    }
                    listed.verifies.push((number, uidl, *copy));
                }
                Some(KnownUidl::Failing {
                    attempts,
                    connection_failures,
                    too_large,
                }) => failed_before.push((
                    number,
                    Plan::Fetch {
                        uidl,
                        attempts: *attempts,
                        too_large: *too_large,
                    },
                    *attempts + *connection_failures,
                )),
                None => listed.fetches.push((
                    number,
                    Plan::Fetch {
                        uidl,
                        attempts: 0,
                        too_large: false,
                    },
                )),
            },
            pop3::ListedUidl::Shared(uidl) => {
                shared += 1;
                listed.untrusted.push((
                    number,
                    Plan::Untrusted {
                        why: format!("UIDL {uidl:?} is listed for more than one message"),
                    },
                ));
            }
            pop3::ListedUidl::Invalid { reason, excerpt } => {
                invalid += 1;
                listed.untrusted.push((
                    number,
                    Plan::Untrusted {
                        why: format!("unusable UIDL line ({reason}): {excerpt}"),
                    },
                ));
            }
        }
    }
    // Fewest failures first: a message that keeps breaking the connection goes last.
    failed_before.sort_by_key(|(_, _, failures)| *failures);
    listed
        .fetches
        .extend(failed_before.into_iter().map(|(n, plan, _)| (n, plan)));
    listed.fetches.extend(refetches);
    if shared + invalid > 0 {
        tracing::warn!(
            pilot = pilot.id,
            shared,
            malformed = invalid,
            "the server lists messages whose UIDL cannot be trusted; they are known by their identity"
        );
    }
    Ok(listed)
}

/// A message whose listed size is over this is not downloaded: its headers are stored and it
/// is flagged oversize. Exchange Online's `LIST` sizes are estimates a few percent above the
/// real size, so the margin is wide: half the limit again plus 64 KiB. Anything listed below it
/// is downloaded with the bounded RETR, which stays the truth (it stops storing at the limit).
fn listed_size_limit(max_message_bytes: usize) -> u64 {
    let limit = max_message_bytes as u64;
    limit.saturating_add(limit / 2).saturating_add(64 * 1024)
}

/// `LIST` sizes by message number, when the server gives them: an empty map when it refuses
/// the command or lists too many messages (the bounded RETR then decides alone). A `LIST`
/// that breaks the connection fails this session, and later polls of the pilot do without it,
/// so a server with a broken `LIST` costs one poll, not the mailbox.
async fn listed_sizes(
    session: &mut Session<Stream>,
    pilot: &Pilot,
) -> Result<std::collections::HashMap<u32, u64>, PollError> {
    if pilot.quirks.list_broken() {
        return Ok(Default::default());
    }
    match timed(pilot, "list", session.list_all()).await {
        Ok(sizes) => Ok(sizes.into_iter().collect()),
        Err(e) if !e.poisons_connection() => {
            tracing::debug!(pilot = pilot.id, error = %e, "no LIST sizes; RETR alone decides what is oversize");
            Ok(Default::default())
        }
        Err(e) => {
            tracing::warn!(pilot = pilot.id, error = %e, "the LIST answer broke the connection; polls of this pilot go on without listed sizes");
            pilot.quirks.set_list_broken();
            Err(e.into())
        }
    }
}

/// One poll of `pilot` in one session (see [`poll`]): the report, or the error that ended it.
pub async fn poll_once(
    pilot: &Pilot,
    pool: &Db,
    tokens: &TokenCache,
    limits: &IngestLimits,
    cancel: &CancellationToken,
) -> Result<PollReport, PollError> {
    let outcome = poll(pilot, pool, tokens, limits, cancel, PollMode::default()).await;
    outcome.result.map(|()| outcome.report)
}

/// The poll-wide counters the sessions of one poll share.
#[derive(Default)]
struct Progress {
    report: PollReport,
    /// Downloads (and header fetches) so far, against `max_messages_per_poll`.
    fetched: usize,
    /// Checks (TOP n 0) so far, against the same cap.
    checked: usize,
    checks_progressed: bool,
    /// Messages downloaded in the current session.
    in_session: usize,
}

/// What a session leaves for the poll to do next.
enum Next {
    Done,
    /// The session QUIT with work left (deletions made to stick first, or the session budget
    /// of [`PollMode::session_messages`] used up): go on in a new session.
    AnotherSession,
}

/// One poll of `pilot`. Cancellation is honoured between messages, never inside a command:
/// what was downloaded is committed, deleted and QUIT before returning.
///
/// Sessions (RELIABILITY.md, "A link that keeps dropping"): when the listing shows messages
/// stored by an earlier session that never reached QUIT, the session only checks and deletes
/// those and QUITs, so that those deletions stick before any download can be cut off; the
/// downloads follow in a new session. With `mode.session_messages`, each session downloads at
/// most that many messages, then commits, deletes and QUITs. When a connection breaks after
/// its session downloaded messages, the poll goes on in a new session (which deletes those
/// first) with sessions half as long; one that breaks before its first download ends the poll.
///
/// Downloading, parsing and storing overlap: while message n+1 downloads, message n is parsed
/// on a parser thread and batch k is committed by a background task (on its own database
/// connection). Memory is bounded by the budgets, counted in parsed bytes (raw message plus
/// what parsing made of it): `limits.parse_ahead` messages being parsed, one batch filling up
/// to `batch_bytes`, and at most `limits.commit_concurrency` batches committing. A message of
/// [`PARSE_ALONE_BYTES`] or more is parsed alone, and one whose parsed footprint exceeds
/// half a batch is committed alone, after everything else in flight, so a large message never
/// shares memory with other parses or full batches (RELIABILITY.md, "Memory").
pub async fn poll(
    pilot: &Pilot,
    pool: &Db,
    tokens: &TokenCache,
    limits: &IngestLimits,
    cancel: &CancellationToken,
    mode: PollMode,
) -> PollOutcome {
    let deadline = Instant::now() + limits.max_poll_duration;
    let mut progress = Progress::default();
    let mut mode = mode;
    // Whether the session before this one downloaded or deleted anything.
    let mut last_progressed = false;
    loop {
        let before = (progress.report.stored, progress.report.deleted);
        progress.in_session = 0;
        progress.report.sessions += 1;
        let next = session(
            pilot,
            pool,
            tokens,
            limits,
            cancel,
            deadline,
            mode,
            &mut progress,
        )
        .await;
        let go_on = !cancel.is_cancelled() && Instant::now() < deadline;
        let progressed =
            progress.in_session > 0 || (progress.report.stored, progress.report.deleted) != before;
        let reconnect = std::mem::replace(&mut last_progressed, progressed) || progressed;
        match next {
            Ok(Next::AnotherSession) if go_on => {}
            Ok(Next::AnotherSession) => {
                progress.report.more_waiting = true;
                break;
            }
            Ok(Next::Done) => break,
            // The connection broke, and this session or the one before it got somewhere: go
            // on at once in a new session, which first deletes what is stored, in sessions half
            // as long as the last one that broke. Two sessions in a row that get nowhere end the
            // poll (the supervisor's backoff takes over), so a dead link costs one failed poll,
            // not a reconnect loop.
            Err(PollError::Pop3(e)) if go_on && e.poisons_connection() && reconnect => {
                let shorter = match progress.in_session {
                    0 => mode.session_messages.unwrap_or(limits.batch_messages),
                    n => (n / 2).max(1),
                };
                tracing::warn!(
                    pilot = pilot.id,
                    error = %e,
                    downloaded = progress.in_session,
                    next_session_messages = shorter,
                    "connection lost after downloads; reconnecting to delete what is stored and go on in shorter sessions"
                );
                progress.report.interruptions += 1;
                mode.session_messages = Some(shorter);
            }
            Err(e) => {
                return PollOutcome {
                    downloaded_before_failure: progress.in_session,
                    report: progress.report,
                    result: Err(e),
                };
            }
        }
    }
    PollOutcome {
        report: progress.report,
        result: Ok(()),
        downloaded_before_failure: 0,
    }
}

/// One POP3 session of a poll: log in, STAT, list, then verify-and-delete or download.
#[allow(clippy::too_many_arguments)]
async fn session(
    pilot: &Pilot,
    pool: &Db,
    tokens: &TokenCache,
    limits: &IngestLimits,
    cancel: &CancellationToken,
    deadline: Instant,
    mode: PollMode,
    progress: &mut Progress,
) -> Result<Next, PollError> {
    let first = progress.report.sessions == 1;
    hold(pilot)?;
    let mut session = open_session(pilot, tokens).await?;
    // Past the deadline the poll stops between messages; a server that keeps it inside one
    // response longer than that is cut off (the connection is dropped without QUIT).
    session.set_deadline(Some(deadline + pilot.server.timeouts.command * 2));
    let (count, octets) = timed(pilot, "stat", session.stat()).await?;
    pilot.metrics.messages_on_server(count as usize);
    if first {
        progress.report.on_server = count as usize;
        progress.report.server_octets = octets;
    }
    if count == 0 {
        timed(pilot, "quit", session.quit()).await?;
        if !pilot.keep_on_server {
            pool.with_conn("mark vanished messages", async |conn| {
                store::mark_vanished(conn, pilot.id, &[]).await
            })
            .await?;
        }
        return Ok(Next::Done);
    }
    let report = &mut progress.report;
    let mut listed = plan_listing(&mut session, pilot, pool, limits, report).await?;
    if listed.truncated {
        report.more_waiting = true;
        if first {
            tracing::info!(
                pilot = pilot.id,
                looked_at = listed.verifies.len() + listed.fetches.len() + listed.untrusted.len(),
                "the UIDL listing is longer than worker.max_listing_entries; the rest waits for later polls"
            );
        }
    }

    // Stored by an earlier session that never reached QUIT: delete those first, and QUIT, so
    // the mailbox shrinks even if the downloads that follow are cut off again.
    let mut deleted: Vec<String> = Vec::new();
    let mut checks_left = false;
    for (number, uidl, copy) in std::mem::take(&mut listed.verifies) {
        if cancel.is_cancelled() || Instant::now() >= deadline {
            break;
        }
        if progress.checked >= limits.max_messages_per_poll {
            checks_left = true;
            break;
        }
        progress.checked += 1;
        match verify_stored(&mut session, pilot, pool, number, &uidl, &copy).await? {
            Some(true) => {
                progress.checks_progressed = true;
                hold(pilot)?;
                timed(pilot, "dele", session.dele(number)).await?;
                deleted.push(uidl);
            }
            // Could not tell: leave it on the server.
            None => {}
            Some(false) => {
                progress.checks_progressed = true;
                progress.report.untrusted_uidls += 1;
                pilot.metrics.ingest_error("untrusted_uidl");
                tracing::warn!(pilot = pilot.id, uidl = %uidl, "the server lists a stored message's UIDL for different mail; storing that mail by its identity");
                listed.untrusted.insert(0, (number, Plan::Derived));
            }
        }
    }
    progress.report.more_waiting |= checks_left && progress.checks_progressed;
    if !deleted.is_empty() {
        quit_and_record(session, pilot, pool, &deleted, &mut progress.report).await?;
        return Ok(
            if listed.fetches.is_empty() && listed.untrusted.is_empty() {
                Next::Done
            } else {
                Next::AnotherSession
            },
        );
    }

    let sizes = if listed.fetches.is_empty() {
        Default::default()
    } else {
        listed_sizes(&mut session, pilot).await?
    };
    let mut pipeline = Pipeline::new(pool, pilot, limits);
    let mut to_delete: Vec<(u32, String)> = Vec::new();
    let mut session_full = false;
    let budget = mode.session_messages.map(|n| n.max(1));

    let plans: Vec<(u32, Plan)> = listed.fetches.into_iter().chain(listed.untrusted).collect();
    // The messages this loop will certainly RETR (if nothing else happens first), by position:
    // under PIPELINING these are sent ahead. One sent ahead but then not asked for is read and
    // thrown away by the session, so a wrong guess costs bandwidth, never correctness.
    let foreseen: Vec<Option<u32>> = plans
        .iter()
        .map(|(number, plan)| {
            let over_listing = sizes
                .get(number)
                .is_some_and(|size| *size > listed_size_limit(pilot.max_message_bytes));
            match plan {
                Plan::Fetch {
                    attempts,
                    too_large: false,
                    ..
                } if *attempts < limits.max_retr_attempts && !over_listing => Some(*number),
                Plan::Refetch { .. } if !over_listing => Some(*number),
                _ => None,
            }
        })
        .collect();
    let mut next_ahead = 0usize;

    let transfer: Result<(), PollError> = async {
        for (position, (number, plan)) in plans.into_iter().enumerate() {
            if cancel.is_cancelled() {
                break;
            }
            if Instant::now() >= deadline {
                progress.report.more_waiting = true;
                tracing::warn!(pilot = pilot.id, "poll deadline reached; the rest waits for the next poll");
                break;
            }
            // Nothing more for a replica that lost the pilot: no RETR, no DELE.
            hold(pilot)?;
            // DELE what finished committing meanwhile (never before its commit).
            pipeline.dele_finished(&mut session, &mut progress.report).await?;
            let (key, attempts, untrusted, too_large, completes) = match plan {
                Plan::Fetch {
                    uidl,
                    attempts,
                    too_large,
                } => (Some(uidl), attempts, false, too_large, false),
                Plan::Refetch { uidl } => (Some(uidl), 0, false, false, true),
                Plan::Derived => (None, 0, true, false, false),
                Plan::Untrusted { .. } if progress.checked >= limits.max_messages_per_poll =>
                {
                    // Poll again soon only if the checks are getting somewhere (a keep-on-server
                    // pilot with many untrusted UIDLs would otherwise poll in a tight loop).
                    progress.report.more_waiting |= progress.checks_progressed;
                    continue;
                }
                Plan::Untrusted { why } => {
                    progress.report.untrusted_uidls += 1;
                    pilot.metrics.ingest_error("untrusted_uidl");
                    tracing::debug!(pilot = pilot.id, message = number, problem = %why, "UIDL not trusted; the message is known by its identity");
                    // Only a check that leads somewhere counts against the budget: messages of a
                    // keep-on-server pilot, stored already, must not crowd out the others.
                    match resolve_untrusted(&mut session, pilot, pool, number).await? {
                        Resolution::Delete { key } => {
                            progress.checked += 1;
                            progress.checks_progressed = true;
                            to_delete.push((number, key));
                            continue;
                        }
                        Resolution::Leave => continue,
                        Resolution::Fetch { key } => {
                            progress.checked += 1;
                            progress.checks_progressed = true;
                            (key, 0, true, false, false)
                        }
                    }
                }
            };
            if progress.fetched >= limits.max_messages_per_poll {
                progress.report.more_waiting = true;
                continue;
            }
            if budget.is_some_and(|b| progress.in_session >= b) {
                // The rest goes to the next session, after this one's deletions stick.
                session_full = true;
                break;
            }
            let listed_size = sizes.get(&number).copied();
            let over_listing =
                listed_size.is_some_and(|size| size > listed_size_limit(pilot.max_message_bytes));
            if completes && over_listing {
                // Still too large to try: wait for the next refetch.
                record_refetch_failure(pool, pilot, key.as_deref()).await?;
                continue;
            }
            progress.fetched += 1;
            let item = if too_large || over_listing {
                progress.report.oversize += 1;
                if over_listing {
                    tracing::warn!(pilot = pilot.id, key = ?key, listed = listed_size, limit = pilot.max_message_bytes, "the server lists this message far over the size limit; storing its headers without downloading it");
                }
                headers_only(&mut session, pilot, number, key, Flag::Oversize, untrusted).await?
            } else if attempts >= limits.max_retr_attempts {
                progress.report.skipped += 1;
                tracing::warn!(pilot = pilot.id, key = ?key, attempts, "the server keeps refusing to send this message; storing the headers and leaving the message on the server");
                headers_only(&mut session, pilot, number, key, Flag::FetchFailed, untrusted).await?
            } else {
                hold(pilot)?;
                if session.pipelining() && foreseen[position].is_some() && !cancel.is_cancelled() {
                    // RFC 2449 PIPELINING: keep the window of RETRs full, this one first, so the
                    // server streams the next messages while this one is parsed and stored.
                    // Never past what this poll and session may still fetch.
                    let may_fetch = limits
                        .max_messages_per_poll
                        .saturating_sub(progress.fetched - 1)
                        .min(budget.map_or(usize::MAX, |b| b.saturating_sub(progress.in_session)));
                    next_ahead = next_ahead.max(position);
                    while next_ahead < foreseen.len()
                        && session.in_flight() < pop3::client::PIPELINE_WINDOW
                        && session.retrs_in_flight().count() < may_fetch
                    {
                        if let Some(ahead) = foreseen[next_ahead] {
                            session.send_retr(ahead, pilot.max_message_bytes).await?;
                        }
                        next_ahead += 1;
                    }
                }
                match timed(pilot, "retr", session.retr(number, pilot.max_message_bytes)).await {
                    Ok(raw) => {
                        progress.in_session += 1;
                        let identity = identity::identity(&raw);
                        let raw = Bytes::from(raw);
                        let key = key.unwrap_or_else(|| content_key(identity.as_ref(), &raw));
                        Fetched {
                            number,
                            key,
                            raw,
                            identity,
                            parsed: None,
                            flag: None,
                            headers_only: false,
                            untrusted,
                            completes,
                        }
                    }
                    Err(pop3::Error::TooLarge { .. } | pop3::Error::ResponseTooLong { .. })
                        if completes =>
                    {
                        // Stored as headers already; it has grown past the limit meanwhile.
                        record_refetch_failure(pool, pilot, key.as_deref()).await?;
                        continue;
                    }
                    Err(pop3::Error::TooLarge { limit, received }) => {
                        progress.report.oversize += 1;
                        tracing::warn!(pilot = pilot.id, key = ?key, received, limit, "message over the size limit; storing its headers and leaving it on the server");
                        headers_only(&mut session, pilot, number, key, Flag::Oversize, untrusted).await?
                    }
                    Err(e @ pop3::Error::ResponseTooLong { .. }) => {
                        // Far past the limit: the rest could not be drained, so the connection
                        // is gone. The next poll stores its headers without downloading it.
                        progress.report.oversize += 1;
                        tracing::warn!(pilot = pilot.id, key = ?key, error = %e, "message far over the size limit; its headers will be stored by the next poll");
                        if let Some(key) = &key {
                            let why = e.to_string();
                            pool.with_conn("record a message far over the size limit", async |conn| {
                                store::record_too_large(conn, pilot.id, key, &why).await
                            })
                            .await?;
                        }
                        pipeline.flush_without_session(&mut progress.report).await?;
                        return Err(e.into());
                    }
                    Err(e) => {
                        progress.report.retr_failures += 1;
                        pilot.metrics.ingest_error("retr");
                        let network = e.poisons_connection();
                        // The connection broke after other downloads of this session went
                        // through, or in a poll whose connections broke before: the link's
                        // failure as likely as the message's, so it is noted (the message is
                        // fetched after the others next time), not counted. First in a fresh
                        // session of a poll without breaks (the login and listings had just
                        // worked), it counts: so a message that always breaks the connection
                        // is given up on, and one that a flaky link hits now and then is not.
                        let held_against_it = !network
                            || (progress.in_session == 0 && progress.report.interruptions == 0);
                        let attempts = match (&key, completes, held_against_it) {
                            (Some(_), true, _) => {
                                record_refetch_failure(pool, pilot, key.as_deref()).await?;
                                0
                            }
                            (Some(key), false, false) => {
                                let why = e.to_string();
                                pool.with_conn("record a broken download", async |conn| {
                                    store::record_connection_failure(conn, pilot.id, key, &why).await
                                })
                                .await?;
                                0
                            }
                            (Some(key), false, true) => {
                                let why = e.to_string();
                                pool.with_conn("record a failed download", async |conn| {
                                    store::record_fetch_failure(conn, pilot.id, key, &why).await
                                })
                                .await?
                            }
                            // Its key depends on its bytes: nothing to count the failure under.
                            (None, ..) => 1,
                        };
                        if network {
                            // The connection is gone. What is already downloaded is stored (no
                            // DELE: that needs a live session); the next poll deletes it first.
                            pipeline.flush_without_session(&mut progress.report).await?;
                            return Err(e.into());
                        }
                        if completes || attempts < limits.max_retr_attempts {
                            tracing::warn!(pilot = pilot.id, key = ?key, error = %e, attempts, "RETR refused; continuing with the next message");
                            continue;
                        }
                        // That was the last allowed attempt: give up now, while the session is
                        // alive, rather than costing the message one more poll.
                        progress.report.skipped += 1;
                        tracing::warn!(pilot = pilot.id, key = ?key, error = %e, attempts, "the server keeps refusing to send this message; storing the headers and leaving the message on the server");
                        headers_only(&mut session, pilot, number, key, Flag::FetchFailed, untrusted).await?
                    }
                }
            };
            pipeline.push(item, &mut session, &mut progress.report).await?;
        }
        pipeline.finish(&mut session, &mut progress.report).await?;
        for (number, key) in to_delete {
            hold(pilot)?;
            timed(pilot, "dele", session.dele(number)).await?;
            pipeline.deleted.push(key);
        }
        Ok(())
    }
    .await;
    if let Err(e) = transfer {
        // Let what is already downloaded be stored (not deleted) rather than abort it
        // mid-transaction; the connection is dropped without QUIT.
        if let Err(drain) = pipeline.finish_without_dele(&mut progress.report).await {
            tracing::warn!(pilot = pilot.id, error = %drain, "a background commit failed too");
        }
        return Err(e);
    }
    let deleted = std::mem::take(&mut pipeline.deleted);
    quit_and_record(session, pilot, pool, &deleted, &mut progress.report).await?;
    Ok(if session_full {
        Next::AnotherSession
    } else {
        Next::Done
    })
}

/// Notes a failed try of a headers-only message, so the next waits the refetch interval.
async fn record_refetch_failure(
    pool: &Db,
    pilot: &Pilot,
    key: Option<&str>,
) -> Result<(), PollError> {
    let Some(key) = key else {
        return Ok(());
    };
    pool.with_conn("record a failed refetch", async |conn| {
        store::record_refetch_failure(conn, pilot.id, key).await
    })
    .await?;
    Ok(())
}

/// QUIT (which applies the deletions, RFC 1939 §6), then records the deleted keys.
async fn quit_and_record(
    mut session: Session<Stream>,
    pilot: &Pilot,
    pool: &Db,
    deleted: &[String],
    report: &mut PollReport,
) -> Result<(), PollError> {
    // The session got here in time; QUIT has its own deadline.
    session.set_deadline(None);
    timed(pilot, "quit", session.quit()).await?;
    if !deleted.is_empty() {
        pool.with_conn("mark deleted messages", async |conn| {
            store::mark_deleted(conn, pilot.id, deleted).await
        })
        .await?;
    }
    report.deleted += deleted.len();
    Ok(())
}

/// The key of a message whose UIDL is not trusted, from what was downloaded: its identity, or
/// the hash of its bytes when its header section names nothing.
fn content_key(identity: Option<&Identity>, raw: &[u8]) -> String {
    match identity {
        Some(identity) => identity::derived_key(identity),
        None => identity::derived_key(&Sha256::digest(raw).into()),
    }
}

/// Whether the message listed as `number` is the one stored under `uidl`: `Some(true)` the
/// same (its identity, or when neither has one, its bytes), `Some(false)` different mail under
/// a reused UIDL, `None` when it cannot be told (an `-ERR`, or too large to compare): the
/// message is then left on the server.
async fn verify_stored(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    pool: &Db,
    number: u32,
    uidl: &str,
    copy: &StoredCopy,
) -> Result<Option<bool>, PollError> {
    let stored_identity = match copy.identity {
        Some(identity) => Some(identity),
        // Stored before identities were recorded: compute it from the stored header section.
        None => pool
            .with_conn("a stored header section", async |conn| {
                store::stored_head(conn, pilot.id, uidl, identity::MAX_HEADER_BYTES).await
            })
            .await?
            .and_then(|head| identity::identity(&head)),
    };
    if let Some(stored_identity) = stored_identity {
        return Ok(match top_identity(session, pilot, number).await? {
            Some(Some(now)) => Some(now == stored_identity),
            // The header section on the server names nothing: not the stored message.
            Some(None) => Some(false),
            None => None,
        });
    }
    // Neither names itself: compare the bytes.
    match timed(pilot, "retr", session.retr(number, pilot.max_message_bytes)).await {
        Ok(raw) => Ok(Some(<[u8; 32]>::from(Sha256::digest(&raw)) == copy.sha256)),
        Err(e) if !e.poisons_connection() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `TOP n 0` and the identity of its header section: `None` when the server refused it.
async fn top_identity(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    number: u32,
) -> Result<Option<Option<Identity>>, PollError> {
    match timed(pilot, "top", session.top(number, 0, header_limit(pilot))).await {
        Ok(head) => Ok(Some(identity::identity(&head))),
        Err(e) if !e.poisons_connection() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Decides what to do with a message whose UIDL is not trusted, from its identity.
async fn resolve_untrusted(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    pool: &Db,
    number: u32,
) -> Result<Resolution, PollError> {
    let Some(top) = top_identity(session, pilot, number).await? else {
        return Ok(Resolution::Leave);
    };
    let Some(identity) = top else {
        // Nothing to know it by before downloading it: its bytes decide its key.
        return Ok(Resolution::Fetch { key: None });
    };
    let stored = pool
        .with_conn("stored identities", async |conn| {
            store::stored_identities(conn, pilot.id, &[identity]).await
        })
        .await?;
    Ok(match stored.get(&identity) {
        Some(false) if !pilot.keep_on_server => Resolution::Delete {
            key: identity::derived_key(&identity),
        },
        Some(_) => Resolution::Leave,
        None => Resolution::Fetch {
            key: Some(identity::derived_key(&identity)),
        },
    })
}

/// How much `TOP n 0` may return.
fn header_limit(pilot: &Pilot) -> usize {
    const HEADER_LIMIT: usize = 1024 * 1024;
    HEADER_LIMIT.min(pilot.max_message_bytes.max(64 * 1024))
}

/// Headers via `TOP n 0` for a message that is not downloaded whole; flagged, kept on server.
async fn headers_only(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    number: u32,
    key: Option<String>,
    flag: Flag,
    untrusted: bool,
) -> Result<Fetched, PollError> {
    let (raw, parsed) = match timed(pilot, "top", session.top(number, 0, header_limit(pilot))).await
    {
        Ok(headers) => {
            // Only the header section was fetched: no body is made up from the missing one.
            let parsed = parse::parse_header_section(&headers);
            (Bytes::from(headers), parsed)
        }
        Err(e) if !e.poisons_connection() => (
            Bytes::new(),
            ParsedMail {
                parse_error: Some(format!("headers unavailable: {e}")),
                ..ParsedMail::default()
            },
        ),
        Err(e) => return Err(e.into()),
    };
    let identity = identity::identity(&raw);
    let key = key.unwrap_or_else(|| content_key(identity.as_ref(), &raw));
    Ok(Fetched {
        number,
        key,
        raw,
        identity,
        parsed: Some(parsed),
        flag: Some(flag),
        headers_only: true,
        untrusted,
        completes: false,
    })
}

/// The messages being parsed, the batch filling up, the batches being committed, and what may
/// be deleted. See [`poll_once`] for the memory rule.
struct Pipeline<'a> {
    pool: &'a Db,
    pilot: &'a Pilot,
    limits: &'a IngestLimits,
    parsing: VecDeque<(Fetched, Option<tokio::task::JoinHandle<ParsedMail>>)>,
    batch: Vec<Ready>,
    batch_bytes: usize,
    inflight: tokio::task::JoinSet<Result<Committed, PollError>>,
    /// Keys marked with DELE in this session (deleted at QUIT).
    deleted: Vec<String>,
}

impl<'a> Pipeline<'a> {
    fn new(pool: &'a Db, pilot: &'a Pilot, limits: &'a IngestLimits) -> Pipeline<'a> {
        Pipeline {
            pool,
            pilot,
            limits,
            parsing: VecDeque::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            inflight: tokio::task::JoinSet::new(),
            deleted: Vec::new(),
        }
    }

    /// Takes a downloaded message: parsing starts at once; the oldest parsed message joins the
    /// batch when more than `parse_ahead` are waiting.
    async fn push(
        &mut self,
        fetched: Fetched,
        session: &mut Session<Stream>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        // A large message is parsed alone: what parsing takes grows with the message (see
        // RELIABILITY.md, "Memory"), so it never overlaps other parses.
        let alone = fetched.raw.len() >= PARSE_ALONE_BYTES;
        if alone {
            while !self.parsing.is_empty() {
                self.take_parsed(Some(&mut *session), report).await?;
            }
        }
        let task = fetched.parsed.is_none().then(|| {
            let (raw, limits) = (fetched.raw.clone(), self.limits.parse.clone());
            // On a parser thread with a known stack and a time budget (see `parse_bounded`).
            tokio::spawn(async move { parse::parse_bounded(raw, &limits).await })
        });
        self.parsing.push_back((fetched, task));
        while self.parsing.len() > self.limits.parse_ahead || (alone && !self.parsing.is_empty()) {
            self.take_parsed(Some(&mut *session), report).await?;
        }
        Ok(())
    }

    /// Moves the oldest parsed message into the batch, committing the batch when full.
    async fn take_parsed(
        &mut self,
        mut session: Option<&mut Session<Stream>>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        let Some((mut fetched, task)) = self.parsing.pop_front() else {
            return Ok(());
        };
        let parsed = match (fetched.parsed.take(), task) {
            (Some(parsed), _) => parsed,
            (None, Some(task)) => task.await.unwrap_or_else(|e| ParsedMail {
                parse_error: Some(format!(
                    "the parser did not finish ({e}); the raw message is kept"
                )),
                ..ParsedMail::default()
            }),
            (None, None) => ParsedMail::default(),
        };
        let sha256 = Sha256::digest(&fetched.raw).into();
        let triage = classify::classify(&fetched.raw, &parsed, &self.pilot.mailbox);
        let ready = Ready {
            fetched,
            parsed,
            sha256,
            triage,
        };
        let size = ready.footprint();
        let budget = self.limits.batch_bytes.max(1);
        if size > budget / 2 {
            // A huge message is committed alone, once nothing else holds memory.
            self.commit_batch(session.as_deref_mut(), report).await?;
            self.drain(session.as_deref_mut(), report).await?;
            self.spawn(vec![ready]);
            return self.drain(session, report).await;
        }
        if !self.batch.is_empty() && self.batch_bytes + size > budget {
            self.commit_batch(session.as_deref_mut(), report).await?;
        }
        self.batch_bytes += size;
        self.batch.push(ready);
        if self.batch.len() >= self.limits.batch_messages {
            self.commit_batch(session, report).await?;
        }
        Ok(())
    }

    /// Hands the batch to a committer, after waiting for a free slot (DELE-ing what finishes).
    async fn commit_batch(
        &mut self,
        mut session: Option<&mut Session<Stream>>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        while self.inflight.len() >= self.limits.commit_concurrency.max(1) {
            if let Some(done) = self.inflight.join_next().await {
                self.settle(done, session.as_deref_mut(), report).await?;
            }
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.spawn(batch);
        Ok(())
    }

    fn spawn(&mut self, batch: Vec<Ready>) {
        let pool = self.pool.clone();
        let target = Target {
            pilot_id: self.pilot.id,
            queue: self.pilot.queue.clone(),
            keep_on_server: self.pilot.keep_on_server,
            metrics: self.pilot.metrics.clone(),
            sender_rate: self.limits.sender_rate,
            lease: self.pilot.lease.clone(),
        };
        self.inflight.spawn(commit_batch(pool, target, batch));
    }

    /// Waits for every batch in flight, DELE-ing each as it commits (when there is a session).
    async fn drain(
        &mut self,
        mut session: Option<&mut Session<Stream>>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        while let Some(done) = self.inflight.join_next().await {
            self.settle(done, session.as_deref_mut(), report).await?;
        }
        Ok(())
    }

    /// DELE the batches that have committed so far, without waiting for the others.
    async fn dele_finished(
        &mut self,
        session: &mut Session<Stream>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        while let Some(done) = self.inflight.try_join_next() {
            self.settle(done, Some(&mut *session), report).await?;
        }
        Ok(())
    }

    /// Parses and stores everything downloaded, DELE-ing each batch after its commit.
    async fn finish(
        &mut self,
        session: &mut Session<Stream>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        while !self.parsing.is_empty() {
            self.take_parsed(Some(&mut *session), report).await?;
        }
        self.commit_batch(Some(&mut *session), report).await?;
        self.drain(Some(session), report).await
    }

    /// The connection is gone: store everything downloaded so far, delete nothing.
    async fn flush_without_session(&mut self, report: &mut PollReport) -> Result<(), PollError> {
        while !self.parsing.is_empty() {
            self.take_parsed(None, report).await?;
        }
        self.commit_batch(None, report).await
    }

    /// After a failure: let what is downloaded be stored, delete nothing.
    async fn finish_without_dele(&mut self, report: &mut PollReport) -> Result<(), PollError> {
        while !self.parsing.is_empty() {
            self.take_parsed(None, report).await?;
        }
        self.commit_batch(None, report).await?;
        self.drain(None, report).await
    }

    async fn settle(
        &mut self,
        done: Result<Result<Committed, PollError>, tokio::task::JoinError>,
        session: Option<&mut Session<Stream>>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        // An error means the commit's outcome is unknown: nothing of that batch is deleted,
        // and returning drops the connection without QUIT (the other DELEs are void too).
        let committed = done.map_err(PollError::Task)??;
        report.stored += committed.stored;
        report.stored_octets += committed.stored_octets;
        report.parse_errors += committed.parse_errors;
        report.store_fallbacks += committed.store_fallbacks;
        report.completed += committed.completed;
        if let Some(session) = session {
            if !committed.deletable.is_empty() {
                hold(self.pilot)?;
            }
            for (number, key) in committed.deletable {
                // Why here: the batch's commit has been acknowledged.
                timed(self.pilot, "dele", session.dele(number)).await?;
                self.deleted.push(key);
            }
        }
        Ok(())
    }
}

/// Where a batch goes.
struct Target {
    pilot_id: i64,
    queue: String,
    keep_on_server: bool,
    metrics: metrics::PilotMetrics,
    sender_rate: SenderRate,
    /// The lease the batch must be stored under (see [`store::leases::check_fence`]).
    lease: Option<crate::ingest::leasing::LeaseGuard>,
}

/// Stores a batch in one transaction. An error means the commit's outcome is unknown: the
/// caller must not DELE anything from this batch.
///
/// A message the database refuses (a value it cannot index or hold) would fail the whole batch
/// on every poll. So when a batch fails with such an error, it is stored again with a savepoint
/// per message: a refused message is stored raw and flagged `store_error`, the others as usual.
/// The first attempt has no savepoints, so the common case costs nothing extra.
///
/// Each attempt has a deadline of [`BATCH_STEPS`] database operation deadlines: a connection
/// that goes silent in the middle of an insert (no answer, not even the server's statement
/// timeout) fails the batch as transient instead of holding the poll.
async fn commit_batch(pool: Db, target: Target, batch: Vec<Ready>) -> Result<Committed, PollError> {
    let attempt = |isolate| {
        pool.within_steps(
            "store a batch of messages",
            BATCH_STEPS,
            store_batch(&pool, &target, &batch, isolate),
        )
    };
    let committed = match attempt(false).await {
        Err(e @ StoreError::Fenced { .. }) => return Err(e.into()),
        Err(e) if !e.is_transient() => {
            tracing::warn!(pilot = target.pilot_id, error = %e, "a message of the batch was refused by the database; storing the batch message by message");
            attempt(true).await?
        }
        other => other?,
    };
    // Counted here, at the commit, so a poll that fails later neither loses nor doubles them.
    target.metrics.messages_stored(
        committed.stored,
        committed.stored_octets,
        committed.parse_errors,
        committed.oversize,
    );
    for t in &committed.triaged {
        target.metrics.message_triaged(
            t.class.as_str(),
            t.threaded.as_str(),
            t.loop_trip.map(LoopTrip::as_str),
        );
    }
    Ok(committed)
}

/// Operation deadlines (`database.operation_timeout_secs`) one batch may take in all.
const BATCH_STEPS: u32 = 4;

async fn store_batch(
    pool: &Db,
    target: &Target,
    batch: &[Ready],
    isolate: bool,
) -> Result<Committed, StoreError> {
    let mut tx = pool.begin().await?;
    if let Some(guard) = &target.lease {
        // First in the transaction: the lease row stays locked until the commit, so no
        // takeover happens between this check and the commit.
        let lease = guard.current().ok_or(StoreError::Fenced {
            pilot: target.pilot_id,
        })?;
        store::leases::check_fence(&mut tx, &lease, guard.holder()).await?;
    }
    let mut out = Committed {
        deletable: Vec::new(),
        stored: 0,
        stored_octets: 0,
        parse_errors: 0,
        oversize: 0,
        store_fallbacks: 0,
        completed: 0,
        triaged: Vec::new(),
    };
    for ready in batch {
        let outcome = if isolate {
            let mut savepoint = tx.savepoint().await?;
            match store_one(&mut savepoint, target, ready).await {
                Ok(outcome) => {
                    savepoint.commit().await?;
                    outcome
                }
                Err(e) if !e.is_transient() => {
                    savepoint.rollback().await?;
                    out.store_fallbacks += 1;
                    target.metrics.ingest_error("store");
                    tracing::warn!(pilot = target.pilot_id, key = %ready.fetched.key, error = %e, "the database refused this message's parsed fields; storing it raw and flagged");
                    store_raw(&mut tx, target, ready, &e).await?
                }
                Err(e) => return Err(e),
            }
        } else {
            store_one(&mut tx, target, ready).await?
        };
        let m = &ready.fetched;
        match outcome {
            Stored::New(triaged) => {
                out.triaged.extend(triaged);
                out.stored += 1;
                out.stored_octets += m.raw.len() as u64;
                if ready.parsed.parse_error.is_some() && !m.headers_only {
                    out.parse_errors += 1;
                }
                out.oversize += usize::from(m.flag == Some(Flag::Oversize));
            }
            Stored::Completed => {
                out.completed += 1;
                out.stored_octets += m.raw.len() as u64;
            }
            Stored::Already => {}
            Stored::Refused => continue,
        }
        if let Stored::New(_) | Stored::Completed | Stored::Already = outcome
            && !m.headers_only
            && !target.keep_on_server
        {
            out.deletable.push((m.number, m.key.clone()));
        }
    }
    // Why before DELE: a DELE is an external action; it may only follow a durable commit.
    tx.commit().await?;
    Ok(out)
}

/// What storing one message came to.
enum Stored {
    /// Stored now (with what the store decided about it).
    New(Option<Triaged>),
    /// A headers-only row was completed with this whole message (its work item kept).
    Completed,
    /// This very message was stored already (same bytes or identity): it may be deleted.
    Already,
    /// Not stored: the key holds other mail. It stays on the server.
    Refused,
}

/// Stores one message under its key. When the key already holds *other* mail (the server gave
/// a stored message's UIDL to a new one), the new one is stored under its derived key instead.
async fn store_one(
    conn: &mut store::Tx<'_>,
    target: &Target,
    ready: &Ready,
) -> Result<Stored, StoreError> {
    let m = &ready.fetched;
    let flags: Vec<Flag> = m.flag.into_iter().collect();
    let mut new = store::NewMessage {
        pilot_id: target.pilot_id,
        queue: &target.queue,
        uidl: &m.key,
        raw: &m.raw,
        parsed: &ready.parsed,
        headers_only: m.headers_only,
        flags: &flags,
        identity: m.identity,
        triage: Some(&ready.triage),
        sender_rate: Some(target.sender_rate),
        sha256: Some(ready.sha256),
    };
    if m.completes {
        // Completed, or left alone when the row is no longer headers-only (completed by a
        // concurrent poll; a later poll's check deletes it) or the download is other mail.
        return Ok(match store::complete_message(conn, &new).await? {
            Some(_) => Stored::Completed,
            None => {
                tracing::warn!(pilot = target.pilot_id, key = %m.key, "the download does not match the stored headers of this UIDL (or they were completed meanwhile); it stays on the server");
                Stored::Refused
            }
        });
    }
    let copy = match store::insert_message(conn, &new).await? {
        inserted @ Inserted::New { .. } => return Ok(Stored::New(Triaged::of(&inserted))),
        Inserted::Existing(copy) => copy,
    };
    if copy.matches(&ready.sha256, m.identity.as_ref()) || m.untrusted {
        return Ok(already(&copy, ready));
    }
    tracing::warn!(pilot = target.pilot_id, key = %m.key, "this UIDL is stored for different mail; storing the message by its identity");
    let derived = content_key(m.identity.as_ref(), &m.raw);
    new.uidl = &derived;
    Ok(match store::insert_message(conn, &new).await? {
        inserted @ Inserted::New { .. } => Stored::New(Triaged::of(&inserted)),
        Inserted::Existing(copy) => already(&copy, ready),
    })
}

/// A stored copy was found for `ready`: it is this message only if it matches, and only a
/// whole stored copy makes the message deletable.
fn already(copy: &StoredCopy, ready: &Ready) -> Stored {
    let m = &ready.fetched;
    if !copy.matches(&ready.sha256, m.identity.as_ref()) || (copy.headers_only && !m.headers_only) {
        Stored::Refused
    } else {
        Stored::Already
    }
}

/// Stores `ready` with only its raw bytes (and the error that kept its parsed fields out),
/// flagged `store_error`. Returns `Refused` if even that fails: the message then stays on the
/// server and its failure is recorded.
async fn store_raw(
    tx: &mut store::Tx<'_>,
    target: &Target,
    ready: &Ready,
    error: &StoreError,
) -> Result<Stored, StoreError> {
    let m = &ready.fetched;
    let parsed = ParsedMail {
        parse_error: Some(format!(
            "the database refused this message's parsed fields ({error}); the raw message is \
             stored whole: open it to read the message"
        )),
        ..ParsedMail::default()
    };
    let raw_only = Ready {
        fetched: Fetched {
            number: m.number,
            key: m.key.clone(),
            raw: m.raw.clone(),
            identity: m.identity,
            parsed: None,
            flag: Some(Flag::StoreError),
            headers_only: m.headers_only,
            untrusted: m.untrusted,
            completes: m.completes,
        },
        parsed,
        sha256: ready.sha256,
        triage: ready.triage.clone(),
    };
    let mut savepoint = tx.savepoint().await?;
    match store_one(&mut savepoint, target, &raw_only).await {
        Ok(outcome) => {
            savepoint.commit().await?;
            Ok(outcome)
        }
        Err(e) if !e.is_transient() => {
            savepoint.rollback().await?;
            tracing::error!(pilot = target.pilot_id, key = %m.key, error = %e, "the database refused this message even raw; it stays on the server");
            store::record_fetch_failure(tx, target.pilot_id, &m.key, &e.to_string()).await?;
            Ok(Stored::Refused)
        }
        Err(e) => Err(e),
    }
}

/// `Ok` while this replica may act on `pilot`'s mailbox: always for a poll outside the
/// supervisor, else while its lease guard vouches for the lease (see [`crate::ingest::leasing`]).
fn hold(pilot: &Pilot) -> Result<(), PollError> {
    match &pilot.lease {
        Some(guard) if guard.current().is_none() => Err(PollError::LeaseLost { pilot: pilot.id }),
        _ => Ok(()),
    }
}

/// Runs one POP3 step and records its latency under `command` (one of
/// [`metrics::POP3_COMMANDS`]). Measured here rather than in the sans-IO client so the
/// protocol layers stay free of metrics and the pilot label is at hand.
async fn timed<T>(pilot: &Pilot, command: &str, step: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = step.await;
    pilot.metrics.pop3_command(command, started.elapsed());
    out
}
