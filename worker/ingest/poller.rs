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
    /// Failed RETRs (counted across polls) after which a message is given up on: the poll
    /// that sees the last failure stores its headers as a `fetch_failed` work item.
    pub max_retr_attempts: u32,
    /// Batches being committed while the next one downloads.
    pub commit_concurrency: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_messages_per_poll: 500,
            batch_messages: 50,
            batch_bytes: 16 * 1024 * 1024,
            max_retr_attempts: 5,
            commit_concurrency: 2,
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
    /// A background parse or commit task died (a bug); the poll is retried.
    #[error("ingest task failed: {0}")]
    Task(String),
}

impl PollError {
    /// A condition that should clear by itself (retry with backoff).
    pub fn is_transient(&self) -> bool {
        match self {
            PollError::Token(e) => e.is_transient(),
            PollError::Pop3(e) => e.is_transient(),
            PollError::Store(e) => e.is_transient(),
            PollError::Task(_) => true,
        }
    }

    /// Needs an administrator; retry slowly.
    pub fn is_permanent(&self) -> bool {
        match self {
            PollError::Token(e) => e.is_permanent(),
            PollError::Pop3(e) => e.is_permanent(),
            PollError::Store(e) => !e.is_transient(),
            PollError::Task(_) => false,
        }
    }

    /// The fix to show next to the error.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            PollError::Token(e) => e.fix(),
            PollError::Pop3(e) => e.hint(),
            PollError::Store(_) | PollError::Task(_) => None,
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
            PollError::Task(_) => "internal",
        }
    }
}

/// A downloaded message waiting for its batch to be committed.
struct Fetched {
    number: u32,
    uidl: String,
    raw: Vec<u8>,
    /// Already parsed (headers-only items); `None`: the committer parses it.
    parsed: Option<ParsedMail>,
    flag: Option<&'static str>,
    headers_only: bool,
}

/// What a committed batch allows and reports.
struct Committed {
    /// (message number, UIDL) of messages that may now be deleted from the server.
    deletable: Vec<(u32, String)>,
    stored: usize,
    stored_octets: u64,
    parse_errors: usize,
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
///
/// Downloading and storing overlap: while batch k is parsed and committed by a background
/// task (on its own database connection), batch k+1 is downloaded. At most
/// `limits.commit_concurrency` batches are in flight, which bounds memory to about
/// `(commit_concurrency + 1) × batch_bytes` plus one message.
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
        if !pilot.keep_on_server {
            let mut conn = pool.acquire().await.map_err(StoreError::from)?;
            store::mark_vanished(&mut conn, pilot.id, &[]).await?;
        }
        return Ok(report);
    }
    let listing = timed(pilot, "uidl", session.uidl_all()).await?;
    let uidls: Vec<String> = listing.iter().map(|(_, u)| u.clone()).collect();
    let known = {
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        if !pilot.keep_on_server {
            // Bookkeeping only: a QUIT applied without its reply left rows unmarked.
            store::mark_vanished(&mut conn, pilot.id, &uidls).await?;
        }
        store::known_uidls(&mut conn, pilot.id, &uidls).await?
    };

    let mut to_delete: Vec<(u32, String)> = Vec::new();
    let mut commits = Commits::new(pool, pilot, limits.commit_concurrency);
    let mut batch: Vec<Fetched> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut fetched = 0usize;

    let transfer: Result<(), PollError> = async {
        for (number, uidl) in listing {
            if cancel.is_cancelled() {
                break;
            }
            // DELE what finished committing meanwhile (never before its commit).
            commits.dele_finished(&mut session, &mut report).await?;
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
                tracing::warn!(pilot = pilot.id, uidl = %uidl, attempts, "RETR keeps failing; storing the headers and leaving the message on the server");
                headers_only(&mut session, pilot, number, uidl, "fetch_failed").await?
            } else {
                match timed(pilot, "retr", session.retr(number, pilot.max_message_bytes)).await {
                    Ok(raw) => Fetched {
                        number,
                        uidl,
                        raw,
                        parsed: None,
                        flag: None,
                        headers_only: false,
                    },
                    Err(pop3::Error::TooLarge { limit, received }) => {
                        report.oversize += 1;
                        tracing::warn!(pilot = pilot.id, uidl = %uidl, received, limit, "message over the size limit; storing its headers and leaving it on the server");
                        headers_only(&mut session, pilot, number, uidl, "oversize").await?
                    }
                    Err(e) => {
                        report.retr_failures += 1;
                        metrics::global().ingest_error(pilot.id, "retr");
                        let attempts = {
                            let mut conn = pool.acquire().await.map_err(StoreError::from)?;
                            store::record_fetch_failure(&mut conn, pilot.id, &uidl, &e.to_string())
                                .await?
                        };
                        if e.poisons_connection() {
                            // The connection is gone. What is already downloaded is stored (no
                            // DELE: that needs a live session), so the next poll makes progress.
                            commits.spawn(std::mem::take(&mut batch));
                            return Err(e.into());
                        }
                        if attempts < limits.max_retr_attempts {
                            tracing::warn!(pilot = pilot.id, uidl = %uidl, error = %e, attempts, "RETR failed; continuing with the next message");
                            continue;
                        }
                        // That was the last allowed attempt: give up now, while the session is
                        // alive, rather than costing the message one more poll.
                        report.skipped += 1;
                        tracing::warn!(pilot = pilot.id, uidl = %uidl, error = %e, attempts, "RETR keeps failing; storing the headers and leaving the message on the server");
                        headers_only(&mut session, pilot, number, uidl, "fetch_failed").await?
                    }
                }
            };
            batch_bytes += item.raw.len();
            batch.push(item);
            if batch.len() >= limits.batch_messages || batch_bytes >= limits.batch_bytes {
                commits
                    .spawn_bounded(std::mem::take(&mut batch), &mut session, &mut report)
                    .await?;
                batch_bytes = 0;
            }
        }
        commits.spawn(batch);
        commits.finish(&mut session, &mut report).await?;
        for (number, uidl) in to_delete {
            timed(pilot, "dele", session.dele(number)).await?;
            commits.deleted.push(uidl);
        }
        Ok(())
    }
    .await;
    if let Err(e) = transfer {
        // Let batches already handed to a committer finish (stored, not deleted) rather than
        // abort them mid-transaction; the connection is dropped without QUIT.
        if let Err(drain) = commits.finish_without_dele(&mut report).await {
            tracing::warn!(pilot = pilot.id, error = %drain, "a background commit failed too");
        }
        return Err(e);
    }
    // Deletions take effect only now (RFC 1939 §6).
    timed(pilot, "quit", session.quit()).await?;
    if !commits.deleted.is_empty() {
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        store::mark_deleted(&mut conn, pilot.id, &commits.deleted).await?;
    }
    report.deleted = commits.deleted.len();
    Ok(report)
}

/// Headers via `TOP n 0` for a message that is not downloaded whole; flagged, kept on server.
async fn headers_only(
    session: &mut Session<Stream>,
    pilot: &Pilot,
    number: u32,
    uidl: String,
    flag: &'static str,
) -> Result<Fetched, PollError> {
    const HEADER_LIMIT: usize = 1024 * 1024;
    let limit = HEADER_LIMIT.min(pilot.max_message_bytes.max(64 * 1024));
    let (raw, parsed) = match timed(pilot, "top", session.top(number, 0, limit)).await {
        Ok(headers) => {
            let mut parsed = parse::parse(&headers);
            // Only the header section was fetched: whatever the parser made of the missing
            // body (an empty part, a derived text) is not the message's content.
            parsed.attachments.clear();
            parsed.text_body = None;
            parsed.html_body = None;
            parsed.html_sanitized = None;
            (headers, parsed)
        }
        Err(e) if !e.poisons_connection() => (
            Vec::new(),
            ParsedMail {
                parse_error: Some(format!("headers unavailable: {e}")),
                ..ParsedMail::default()
            },
        ),
        Err(e) => return Err(e.into()),
    };
    Ok(Fetched {
        number,
        uidl,
        raw,
        parsed: Some(parsed),
        flag: Some(flag),
        headers_only: true,
    })
}

/// The batches being parsed and committed in the background, and what may be deleted.
struct Commits<'a> {
    pool: &'a PgPool,
    pilot: &'a Pilot,
    concurrency: usize,
    inflight: tokio::task::JoinSet<Result<Committed, PollError>>,
    /// UIDLs marked with DELE in this session (deleted at QUIT).
    deleted: Vec<String>,
}

impl<'a> Commits<'a> {
    fn new(pool: &'a PgPool, pilot: &'a Pilot, concurrency: usize) -> Commits<'a> {
        Commits {
            pool,
            pilot,
            concurrency: concurrency.max(1),
            inflight: tokio::task::JoinSet::new(),
            deleted: Vec::new(),
        }
    }

    fn spawn(&mut self, batch: Vec<Fetched>) {
        if batch.is_empty() {
            return;
        }
        let pool = self.pool.clone();
        let pilot_id = self.pilot.id;
        let queue = self.pilot.queue.clone();
        let keep = self.pilot.keep_on_server;
        self.inflight
            .spawn(commit_batch(pool, pilot_id, queue, keep, batch));
    }

    /// Waits for a free slot (DELE-ing what finishes), then starts committing `batch`.
    async fn spawn_bounded(
        &mut self,
        batch: Vec<Fetched>,
        session: &mut Session<Stream>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        while self.inflight.len() >= self.concurrency {
            if let Some(done) = self.inflight.join_next().await {
                self.settle(done, Some(&mut *session), report).await?;
            }
        }
        self.spawn(batch);
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

    /// Waits for every batch and DELEs them.
    async fn finish(
        &mut self,
        session: &mut Session<Stream>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        while let Some(done) = self.inflight.join_next().await {
            self.settle(done, Some(&mut *session), report).await?;
        }
        Ok(())
    }

    /// Waits for every batch after the connection failed: stored, but no DELE.
    async fn finish_without_dele(&mut self, report: &mut PollReport) -> Result<(), PollError> {
        while let Some(done) = self.inflight.join_next().await {
            self.settle(done, None, report).await?;
        }
        Ok(())
    }

    async fn settle(
        &mut self,
        done: Result<Result<Committed, PollError>, tokio::task::JoinError>,
        session: Option<&mut Session<Stream>>,
        report: &mut PollReport,
    ) -> Result<(), PollError> {
        // An error means the commit's outcome is unknown: nothing of that batch is deleted,
        // and returning drops the connection without QUIT (the other DELEs are void too).
        let committed = done.map_err(|e| PollError::Task(e.to_string()))??;
        report.stored += committed.stored;
        report.stored_octets += committed.stored_octets;
        report.parse_errors += committed.parse_errors;
        if let Some(session) = session {
            for (number, uidl) in committed.deletable {
                // Why here: the batch's commit has been acknowledged.
                timed(self.pilot, "dele", session.dele(number)).await?;
                self.deleted.push(uidl);
            }
        }
        Ok(())
    }
}

/// Parses and stores a batch in one transaction. An error means the commit's outcome is
/// unknown: the caller must not DELE anything from this batch.
async fn commit_batch(
    pool: PgPool,
    pilot_id: i64,
    queue: String,
    keep_on_server: bool,
    batch: Vec<Fetched>,
) -> Result<Committed, PollError> {
    // Parsing is CPU work: keep it off the async worker threads.
    let parsed = tokio::task::spawn_blocking(move || {
        batch
            .into_iter()
            .map(|mut m| {
                let parsed = m.parsed.take().unwrap_or_else(|| parse::parse(&m.raw));
                (m, parsed)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| PollError::Task(e.to_string()))?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let mut out = Committed {
        deletable: Vec::new(),
        stored: 0,
        stored_octets: 0,
        parse_errors: 0,
    };
    let mut oversize = 0;
    for (m, parsed) in &parsed {
        let flags: Vec<&str> = m.flag.into_iter().collect();
        let inserted = store::insert_message(
            &mut tx,
            &store::NewMessage {
                pilot_id,
                queue: &queue,
                uidl: &m.uidl,
                raw: &m.raw,
                parsed,
                headers_only: m.headers_only,
                flags: &flags,
            },
        )
        .await?;
        if inserted.is_some() {
            out.stored += 1;
            out.stored_octets += m.raw.len() as u64;
            if parsed.parse_error.is_some() && !m.headers_only {
                out.parse_errors += 1;
            }
            oversize += usize::from(m.flag == Some("oversize"));
        }
        if !m.headers_only && !keep_on_server {
            out.deletable.push((m.number, m.uidl.clone()));
        }
    }
    // Why before DELE: a DELE is an external action; it may only follow a durable commit.
    tx.commit().await.map_err(StoreError::from)?;
    // Counted here, at the commit, so a poll that fails later neither loses nor doubles them.
    metrics::global().messages_stored(
        pilot_id,
        out.stored,
        out.stored_octets,
        out.parse_errors,
        oversize,
    );
    Ok(out)
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
