//! One poll of one mailbox pilot: list, download, store, delete — in the order that makes loss
//! and duplicates impossible (DESIGN.md, "Order of operations per message").
//!
//! 1. The token is obtained *before* the connection is opened (Exchange drops idle
//!    unauthenticated connections after about a minute; a slow token endpoint must not eat it).
//! 2. `UIDL` lists the maildrop; UIDLs already stored are never downloaded again.
//! 3. New messages are downloaded (`RETR`, bounded by the pilot's size limit) and parsed, and a
//!    batch of them is stored in one transaction: message, attachments, work item, UIDL.
//! 4. Only after that commit is acknowledged are they marked with `DELE`.
//! 5. `QUIT` applies the deletions; only after its `+OK` are the rows marked deleted. Any
//!    failure before QUIT drops the connection without QUIT, so the server deletes nothing and
//!    the next poll finds those UIDLs stored and only deletes them.
//!
//! A message over the size limit gets a work item with its headers (`TOP n 0`) and stays on the
//! server; a message whose RETR keeps failing is flagged the same way after
//! `max_retr_attempts`. Neither blocks the rest of the mailbox.

use std::time::Duration;

use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ingest::parse::{self, ParsedMail};
use crate::metrics;
use crate::oauth::{AppCredentials, OAuthError, TokenCache};
use crate::pop3::{self, Client, ServerSpec, Session, Stream};
use crate::store::{self, KnownUidl, StoreError};

/// How a pilot logs in.
#[derive(Debug, Clone)]
pub enum PilotAuth {
    /// SASL XOAUTH2 with an app-only token (Exchange Online).
    XOAuth2(AppCredentials),
    /// USER / PASS (other servers).
    UserPass {
        username: String,
        password: SecretString,
    },
}

/// Everything a poller needs about its pilot, resolved (secrets decrypted, TLS set up).
#[derive(Debug, Clone)]
pub struct Pilot {
    pub id: i64,
    pub queue: String,
    pub mailbox: String,
    pub server: ServerSpec,
    pub auth: PilotAuth,
    pub keep_on_server: bool,
    pub max_message_bytes: usize,
    pub poll_interval: Duration,
}

/// Per-poll bounds.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_messages_per_poll: usize,
    pub batch_messages: usize,
    pub batch_bytes: usize,
    pub max_retr_attempts: u32,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_messages_per_poll: 500,
            batch_messages: 50,
            batch_bytes: 16 * 1024 * 1024,
            max_retr_attempts: 5,
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
    /// The per-poll cap left new messages behind: poll again at once.
    pub more_waiting: bool,
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
}

impl PollError {
    /// A condition that should clear by itself (retry with backoff).
    pub fn is_transient(&self) -> bool {
        match self {
            PollError::Token(e) => e.is_transient(),
            PollError::Pop3(e) => e.is_transient(),
            PollError::Store(e) => e.is_transient(),
        }
    }

    /// Needs an administrator; retry slowly.
    pub fn is_permanent(&self) -> bool {
        match self {
            PollError::Token(e) => e.is_permanent(),
            PollError::Pop3(e) => e.is_permanent(),
            PollError::Store(e) => !e.is_transient(),
        }
    }

    /// The fix to show next to the error.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            PollError::Token(e) => e.fix(),
            PollError::Pop3(e) => e.hint(),
            PollError::Store(_) => None,
        }
    }

    /// A short, fixed reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            PollError::Token(_) => "token",
            PollError::Pop3(pop3::Error::AuthRejected { .. }) => "auth",
            PollError::Pop3(pop3::Error::Timeout { .. }) => "timeout",
            PollError::Pop3(pop3::Error::TlsCertificate { .. })
            | PollError::Pop3(pop3::Error::TlsHandshake { .. }) => "tls",
            PollError::Pop3(_) => "pop3",
            PollError::Store(_) => "database",
        }
    }
}

/// A downloaded message waiting for its batch to be committed.
struct Fetched {
    number: u32,
    uidl: String,
    raw: Vec<u8>,
    parsed: ParsedMail,
    flags: Vec<&'static str>,
    headers_only: bool,
}

/// Parses off the async threads when the message is big enough to matter.
async fn parse_message(raw: Vec<u8>) -> (Vec<u8>, ParsedMail) {
    const INLINE_LIMIT: usize = 64 * 1024;
    if raw.len() <= INLINE_LIMIT {
        let parsed = parse::parse(&raw);
        return (raw, parsed);
    }
    match tokio::task::spawn_blocking(move || {
        let parsed = parse::parse(&raw);
        (raw, parsed)
    })
    .await
    {
        Ok(done) => done,
        // The parser panicked (it must not; mail-parser is defensive). The raw bytes are gone
        // with the task, so the message is simply fetched again on the next poll.
        Err(e) => (
            Vec::new(),
            ParsedMail {
                parse_error: Some(format!("parser crashed: {e}")),
                ..ParsedMail::default()
            },
        ),
    }
}

/// Logs in as the pilot says. The token comes first, before any connection exists.
async fn open_session(pilot: &Pilot, tokens: &TokenCache) -> Result<Session<Stream>, PollError> {
    match &pilot.auth {
        PilotAuth::XOAuth2(app) => {
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
        PilotAuth::UserPass { username, password } => {
            let client = timed(pilot, "connect", Client::connect(&pilot.server)).await?;
            Ok(timed(pilot, "auth", client.auth_user_pass(username, password)).await?)
        }
    }
}

/// One poll of `pilot`. Cancellation is honoured between messages, never inside a command:
/// what was downloaded is committed, deleted and QUIT before returning.
pub async fn poll_once(
    pilot: &Pilot,
    pool: &PgPool,
    tokens: &TokenCache,
    limits: &IngestLimits,
    cancel: &CancellationToken,
) -> Result<PollReport, PollError> {
    let mut session = open_session(pilot, tokens).await?;
    let mut report = PollReport::default();
    let (count, octets) = timed(pilot, "stat", session.stat()).await?;
    report.on_server = count as usize;
    report.server_octets = octets;
    if count == 0 {
        timed(pilot, "quit", session.quit()).await?;
        return Ok(report);
    }
    let listing = timed(pilot, "uidl", session.uidl_all()).await?;
    let uidls: Vec<String> = listing.iter().map(|(_, u)| u.clone()).collect();
    let known = {
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        store::known_uidls(&mut conn, pilot.id, &uidls).await?
    };

    let mut to_delete: Vec<(u32, String)> = Vec::new();
    let mut batch: Vec<Fetched> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut fetched = 0usize;
    let mut deleted_uidls: Vec<String> = Vec::new();

    for (number, uidl) in listing {
        if cancel.is_cancelled() {
            break;
        }
        let mut attempts = 0;
        match known.get(&uidl) {
            Some(KnownUidl::Stored { headers_only, .. }) => {
                // Stored by an earlier poll that ended before QUIT: delete without
                // downloading. Flagged headers-only messages stay on the server for a person.
                if !headers_only && !pilot.keep_on_server {
                    to_delete.push((number, uidl));
                }
                report.already_stored += 1;
                continue;
            }
            Some(KnownUidl::Failing { attempts: n }) => attempts = *n,
            None => {}
        }
        if fetched >= limits.max_messages_per_poll {
            report.more_waiting = true;
            continue;
        }
        fetched += 1;
        let item = if attempts >= limits.max_retr_attempts {
            report.skipped += 1;
            let why = format!("RETR failed {attempts} times; left on the server");
            headers_only(&mut session, pilot, number, uidl, "fetch_failed", why).await?
        } else {
            match timed(pilot, "retr", session.retr(number, pilot.max_message_bytes)).await {
                Ok(raw) => {
                    let (raw, parsed) = parse_message(raw).await;
                    let mut flags = Vec::new();
                    if parsed.parse_error.is_some() {
                        flags.push("parse_error");
                        report.parse_errors += 1;
                    }
                    Fetched {
                        number,
                        uidl,
                        raw,
                        parsed,
                        flags,
                        headers_only: false,
                    }
                }
                Err(pop3::Error::TooLarge { limit, received }) => {
                    report.oversize += 1;
                    let why = format!(
                        "message of {received} octets exceeds the pilot's limit of {limit}; left on the server"
                    );
                    headers_only(&mut session, pilot, number, uidl, "oversize", why).await?
                }
                Err(e) => {
                    report.retr_failures += 1;
                    metrics::global().ingest_error(pilot.id, "retr");
                    {
                        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
                        store::record_fetch_failure(&mut conn, pilot.id, &uidl, &e.to_string())
                            .await?;
                    }
                    if e.poisons_connection() {
                        // The connection is gone. What is already downloaded is stored (no
                        // DELE: that needs a live session), so the next poll makes progress.
                        commit_batch(pool, pilot, &mut batch, &mut report).await?;
                        return Err(e.into());
                    }
                    tracing::warn!(pilot = pilot.id, uidl = %uidl, error = %e, "RETR failed; continuing with the next message");
                    continue;
                }
            }
        };
        batch_bytes += item.raw.len();
        batch.push(item);
        if batch.len() >= limits.batch_messages || batch_bytes >= limits.batch_bytes {
            let committed = commit_batch(pool, pilot, &mut batch, &mut report).await?;
            batch_bytes = 0;
            dele_all(&mut session, pilot, committed, &mut deleted_uidls).await?;
        }
    }
    let committed = commit_batch(pool, pilot, &mut batch, &mut report).await?;
    dele_all(&mut session, pilot, committed, &mut deleted_uidls).await?;
    for (number, uidl) in to_delete {
        timed(pilot, "dele", session.dele(number)).await?;
        deleted_uidls.push(uidl);
    }
    // Deletions take effect only now (RFC 1939 §6).
    timed(pilot, "quit", session.quit()).await?;
    if !deleted_uidls.is_empty() {
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        store::mark_deleted(&mut conn, pilot.id, &deleted_uidls).await?;
    }
    report.deleted = deleted_uidls.len();
    Ok(report)
}

/// Headers via `TOP n 0` for a message that is not downloaded whole; flagged, kept on server.
async fn headers_only(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    number: u32,
    uidl: String,
    flag: &'static str,
    why: String,
) -> Result<Fetched, PollError> {
    const HEADER_LIMIT: usize = 1024 * 1024;
    let limit = HEADER_LIMIT.min(pilot.max_message_bytes.max(64 * 1024));
    let (raw, parsed) = match timed(pilot, "top", session.top(number, 0, limit)).await {
        Ok(headers) => parse_message(headers).await,
        Err(e) if !e.poisons_connection() => (
            Vec::new(),
            ParsedMail {
                parse_error: Some(format!("headers unavailable: {e}")),
                ..ParsedMail::default()
            },
        ),
        Err(e) => return Err(e.into()),
    };
    // The body is missing by design, not broken: the flag says why, parse_error stays for
    // real parse failures of the headers.
    tracing::warn!(pilot = pilot.id, uidl = %uidl, flag, "{why}");
    Ok(Fetched {
        number,
        uidl,
        raw,
        parsed,
        flags: vec![flag],
        headers_only: true,
    })
}

/// Stores the batch in one transaction. Returns the (number, uidl) of messages that may now be
/// deleted from the server. An error here means the commit's outcome is unknown: the caller
/// must not DELE anything from this batch.
async fn commit_batch(
    pool: &PgPool,
    pilot: &Pilot,
    batch: &mut Vec<Fetched>,
    report: &mut PollReport,
) -> Result<Vec<(u32, String)>, PollError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let mut deletable = Vec::new();
    let mut stored = 0;
    let mut octets = 0u64;
    let (mut parse_errors, mut oversize) = (0, 0);
    for m in batch.iter() {
        let flags: Vec<&str> = m.flags.to_vec();
        let inserted = store::insert_message(
            &mut tx,
            &store::NewMessage {
                pilot_id: pilot.id,
                queue: &pilot.queue,
                uidl: &m.uidl,
                raw: &m.raw,
                parsed: &m.parsed,
                headers_only: m.headers_only,
                flags: &flags,
            },
        )
        .await?;
        if inserted.is_some() {
            stored += 1;
            octets += m.raw.len() as u64;
            parse_errors += usize::from(m.flags.contains(&"parse_error"));
            oversize += usize::from(m.flags.contains(&"oversize"));
        }
        if !m.headers_only && !pilot.keep_on_server {
            deletable.push((m.number, m.uidl.clone()));
        }
    }
    // Why before DELE: a DELE is an external action; it may only follow a durable commit.
    tx.commit().await.map_err(StoreError::from)?;
    // Counted here, at the commit, so a poll that fails later neither loses nor doubles them.
    metrics::global().messages_stored(pilot.id, stored, octets, parse_errors, oversize);
    report.stored += stored;
    report.stored_octets += octets;
    batch.clear();
    Ok(deletable)
}

async fn dele_all(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    committed: Vec<(u32, String)>,
    deleted: &mut Vec<String>,
) -> Result<(), PollError> {
    if pilot.keep_on_server {
        return Ok(());
    }
    for (number, uidl) in committed {
        timed(pilot, "dele", session.dele(number)).await?;
        deleted.push(uidl);
    }
    Ok(())
}

/// Runs one POP3 step and records its latency under `command` (one of
/// [`metrics::POP3_COMMANDS`]). Measured here rather than in the sans-IO client so the
/// protocol layers stay free of metrics and the pilot label is at hand.
async fn timed<T>(pilot: &Pilot, command: &str, step: impl Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = step.await;
    metrics::global().pop3_command(pilot.id, command, started.elapsed());
    out
}
