//! Every SQL statement ccmail runs lives in this module.
//!
//! Conventions, so that the ingest path can compose one transaction and replicas can share a
//! database safely:
//! - runtime queries (`sqlx::query`, `query_as` with `FromRow`), lowercase SQL, only bound
//!   parameters; every statement is exercised by a test against a real PostgreSQL;
//! - functions take `&mut PgConnection` internally; callers pass a [`Conn`] or a [`Tx`] (both
//!   deref to it), so the caller decides the transaction boundaries without naming sqlx;
//! - uniqueness is enforced by the database, not by check-then-insert; state changes are
//!   guarded in their `where` clause and check `rows_affected()`;
//! - `synchronous_commit` is never turned off: a POP3 `DELE` is taken on the strength of a
//!   commit, so the commit must be durable;
//! - callers name store types only: [`Db`] owns the pool, [`Conn`] is a pooled connection,
//!   [`ConfigListener`] owns LISTEN, [`Db::begin`] / [`Tx::savepoint`] / [`Tx`] compose
//!   transactions; the model's enums become text in `words`. Nothing outside `store/` (and
//!   the lab) mentions sqlx; a test in `tests/it/layers.rs` checks it.
//!
//! One file per table family: `apps` (`oauth_apps`), `pilots`, `credentials` (secrets across
//! both), `messages` (messages, attachments, fetch failures), `work_items` (queue views and
//! the work item with its message), `lifecycle` (claims and every transition, with their
//! events), `api_keys` (API keys and kept `Idempotency-Key` answers), `leases` (replicas and pilot
//! leases with fencing), `users` (console accounts, sessions, audit log), `text_limits` (admin-set text rules, mirrored by migration 0007), `words` (enum
//! text), `error`.

/// The `oauth_apps` columns `AppRow` reads.
macro_rules! app_columns {
    () => {
        "id, name, tenant, client_id, authority, scope, credential, secret_expires_at, \
         certificate_pem, assertion_alg, created_at, updated_at"
    };
}

/// The `pilots` columns `PilotRecord` reads.
macro_rules! pilot_columns {
    () => {
        "id, queue, mailbox, host, port, tls, auth, app_id, username, password_credential, \
         ca_bundle, poll_interval_secs, keep_on_server, max_message_bytes, enabled, \
         last_success_at, last_error, last_error_hint, last_error_at, created_at, updated_at, \
         poll_requested_at"
    };
}

mod api_keys;
mod apps;
mod conversations;
mod credentials;
mod error;
pub mod leases;
pub mod lifecycle;
mod messages;
mod pilots;
mod text_limits;
pub mod users;
mod words;
mod work_items;

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

/// The deadlines of every store call (`[database]` settings; see [`DbSettings::from_config`]).
///
/// Two layers, because either alone leaves a hole: the server-side timeouts end a statement
/// that runs too long or a transaction left open (and free its locks), but they cannot help
/// when the network or the server host goes silent; the client-side deadline (acquire, begin,
/// savepoint, commit, rollback, LISTEN) ends the wait on this side whatever the server does.
/// TCP keepalive is asked of the server (`tcp_keepalives_*`, so a vanished worker's session
/// and locks are dropped); sqlx 0.8 offers no hook to set it on the client's own socket, so
/// on this side the client deadline is what bounds a silent connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbSettings {
    /// Connections in the pool at most.
    pub max_connections: u32,
    /// Server-side `statement_timeout` of every pooled session.
    pub statement_timeout: Duration,
    /// Server-side `idle_in_transaction_session_timeout` of every pooled session.
    pub idle_in_transaction_timeout: Duration,
    /// Time to get a pooled connection (including opening a new one).
    pub acquire_timeout: Duration,
    /// Client-side deadline of one transaction step (begin, savepoint, commit, rollback).
    pub operation_timeout: Duration,
    /// Idle time after which the server starts TCP keepalive probes on the session's socket.
    pub tcp_keepalive: Duration,
}

impl Default for DbSettings {
    fn default() -> Self {
        use crate::model::defaults;
        DbSettings {
            max_connections: defaults::DB_MAX_CONNECTIONS,
            statement_timeout: defaults::DB_STATEMENT_TIMEOUT,
            idle_in_transaction_timeout: defaults::DB_IDLE_IN_TRANSACTION_TIMEOUT,
            acquire_timeout: defaults::DB_ACQUIRE_TIMEOUT,
            operation_timeout: defaults::DB_OPERATION_TIMEOUT,
            tcp_keepalive: defaults::DB_TCP_KEEPALIVE,
        }
    }
}

impl DbSettings {
    /// The settings `[database]` asks for (checked to be at least 1 when they load).
    pub fn from_config(database: &crate::config::DatabaseConfig) -> DbSettings {
        DbSettings {
            max_connections: database.max_connections,
            statement_timeout: database.statement_timeout_secs,
            idle_in_transaction_timeout: database.idle_in_transaction_timeout_secs,
            acquire_timeout: database.acquire_timeout_secs,
            operation_timeout: database.operation_timeout_secs,
            tcp_keepalive: database.tcp_keepalive_secs,
        }
    }

    /// The per-session settings sent in the startup packet (no extra round trip, and a
    /// session that reconnects after a restart gets them again).
    fn session_options(&self, options: PgConnectOptions) -> PgConnectOptions {
        let millis = |d: Duration| d.as_millis().to_string();
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        // Probes every interval, dropped after `count` unanswered: about a minute after the
        // idle time for the defaults.
        let interval = (self.tcp_keepalive.as_secs() / 3).max(1).to_string();
        options.options([
            ("statement_timeout", millis(self.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(self.idle_in_transaction_timeout),
            ),
            ("tcp_keepalives_idle", secs(self.tcp_keepalive)),
            ("tcp_keepalives_interval", interval),
            ("tcp_keepalives_count", "3".to_owned()),
        ])
    }
}

/// The store's handle on its database: the pool behind every connection, transaction and
/// LISTEN ccmail opens. Cheap to clone (clones share the pool). Callers name only [`Db`],
/// [`Conn`], [`Tx`] and [`ConfigListener`]; sqlx stays inside `store/`.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    /// Client-side deadline of each transaction step, handed to every [`Tx`].
    operation_timeout: Duration,
    /// A direct connection's options, for [`Db::ping_server`].
    target: Option<(PgConnectOptions, String)>,
}

impl Db {
    /// Opens a pool of at most `max_connections` and checks that the server answers
    /// (see [`connect`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, StoreError> {
        connect(url, max_connections).await
    }

    /// A pool with `settings` whose connections open on first use: nothing is dialled yet.
    /// For `ccmail run`, which serves `/readyz` (red) while it waits for the database with
    /// [`Db::ping_server`].
    pub fn connect_lazy(url: &str, settings: &DbSettings) -> Result<Db, StoreError> {
        validate(settings)?;
        let options = parse_url(url)?;
        let target = describe_target(&options);
        let options = settings.session_options(options);
        let check = settings.operation_timeout;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(settings.acquire_timeout)
            // Why a bounded ping on release: sqlx tests a returned connection with a ping that
            // has no deadline, so a connection whose step timed out on a silent network would
            // hold its pool slot forever. One that does not answer in time is closed instead.
            .after_release(move |conn, _| {
                Box::pin(async move {
                    let answered = tokio::time::timeout(check, sqlx::Connection::ping(conn)).await;
                    Ok(matches!(answered, Ok(Ok(()))))
                })
            })
            .connect_lazy_with(options.clone());
        Ok(Db {
            pool,
            operation_timeout: settings.operation_timeout,
            target: Some((options, target)),
        })
    }

    /// Opens one direct connection (not pooled) and closes it, within the acquire timeout:
    /// the error says why the server cannot be used (refused, login, missing database), which
    /// a pool's "timed out" would hide.
    pub async fn ping_server(&self) -> Result<(), StoreError> {
        let Some((options, target)) = &self.target else {
            return self.ping().await;
        };
        let timeout = self.pool.options().get_acquire_timeout();
        let connect = tokio::time::timeout(timeout, options.connect())
            .await
            .map_err(|_| StoreError::Deadline {
                operation: "connect",
                after: timeout,
            })?;
        let probe = connect.map_err(|err| connect_error(err, target.clone()))?;
        // A failed close of a healthy probe only costs a server-side session cleanup.
        let _ = sqlx::Connection::close(probe).await;
        Ok(())
    }

    /// `select 1` on a pooled connection within the operation deadline: the cheap "does the
    /// database answer" of `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.acquire().await?;
        deadline("select 1", self.operation_timeout, async {
            sqlx::query("select 1").execute(&mut *conn).await
        })
        .await
        .inspect_err(|_| conn.0.close_on_drop())?;
        Ok(())
    }

    /// Runs a caller-composed store operation (acquire plus statements) within the
    /// client-side operation deadline: past it the operation is dropped (its connection is
    /// tested with a bounded ping on release, and closed if silent) and the caller gets the
    /// transient [`StoreError::Deadline`]. For operations outside a [`Tx`], whose statements
    /// have only the server-side `statement_timeout`, which a silent network never delivers.
    pub async fn within<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.within_steps(operation, 1, work).await
    }

    /// Acquires a connection and runs `work` on it, the whole within the operation deadline
    /// of [`Db::within`]: the way callers outside a [`Tx`] reach the database, so a silent
    /// connection cannot hold them.
    pub async fn with_conn<T>(
        &self,
        operation: &'static str,
        work: impl AsyncFnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.within(operation, async {
            let mut conn = self.acquire().await?;
            work(&mut conn).await
        })
        .await
    }

    /// As [`Db::within`] with a deadline of `steps` operation deadlines (and one acquire):
    /// for a caller-composed transaction of many statements, such as a batch of messages.
    pub async fn within_steps<T>(
        &self,
        operation: &'static str,
        steps: u32,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let after =
            self.pool.options().get_acquire_timeout() + self.operation_timeout * steps.max(1);
        match tokio::time::timeout(after, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Deadline { operation, after }),
        }
    }

    /// Wraps an existing pool: for the lab's test databases, which build their own.
    pub fn from_pool(pool: PgPool) -> Db {
        Db {
            pool,
            operation_timeout: crate::model::defaults::DB_OPERATION_TIMEOUT,
            target: None,
        }
    }

    /// The same pool with another client-side deadline per transaction step: for tests that
    /// freeze a connection and cannot wait for the default.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Db {
        self.operation_timeout = timeout;
        self
    }

    /// The pool itself: for the lab and tests, whose raw queries check the schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pooled connection, returned to the pool on drop. Bounded by the pool's acquire
    /// timeout (which includes the liveness check of an idle connection).
    pub async fn acquire(&self) -> Result<Conn, StoreError> {
        Ok(Conn(self.pool.acquire().await?))
    }

    /// Begins a transaction on a pooled connection, within the acquire timeout plus the
    /// operation deadline.
    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        let within = self.pool.options().get_acquire_timeout() + self.operation_timeout;
        let tx = deadline("begin", within, self.pool.begin()).await?;
        Ok(Tx {
            inner: tx,
            timeout: self.operation_timeout,
        })
    }

    /// Opens a dedicated connection that listens on [`CONFIG_CHANNEL`], within the acquire
    /// timeout plus the operation deadline.
    pub async fn listen(&self) -> Result<ConfigListener, StoreError> {
        let within = self.pool.options().get_acquire_timeout() + self.operation_timeout;
        match tokio::time::timeout(within, ConfigListener::connect(self)).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Deadline {
                operation: "listen",
                after: within,
            }),
        }
    }

    /// Opens a dedicated connection that listens on [`WORK_CHANNEL`], within the acquire
    /// timeout plus the operation deadline.
    pub async fn listen_work(&self) -> Result<WorkListener, StoreError> {
        let within = self.pool.options().get_acquire_timeout() + self.operation_timeout;
        let connect = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
            listener.listen(WORK_CHANNEL).await?;
            Ok(WorkListener { listener })
        };
        match tokio::time::timeout(within, connect).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Deadline {
                operation: "listen",
                after: within,
            }),
        }
    }

    /// Applies the pending migrations (see [`migrate`]).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(self).await
    }

    /// Closes the pool: waits for connections in use to come back, then closes them all.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A pooled connection: store functions take it (via `&mut conn`) outside a transaction.
#[derive(Debug)]
pub struct Conn(PoolConnection<Postgres>);

impl std::ops::Deref for Conn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

/// A transaction (or a savepoint inside one) on the store's database: what callers hold to
/// compose several store functions atomically. Dropped without [`Tx::commit`], it rolls back.
///
/// Each step (commit, rollback, savepoint) has the pool's client-side deadline, so a
/// connection that goes silent mid-commit fails the caller with [`StoreError::Deadline`]
/// (transient) instead of hanging it. The commit's outcome is then unknown: whatever the
/// caller does next must be safe either way (ingest sends no `DELE`, and the retry finds
/// what did commit by its unique key).
#[derive(Debug)]
pub struct Tx<'c> {
    inner: Transaction<'c, Postgres>,
    timeout: Duration,
}

impl Tx<'_> {
    /// Commits (or releases the savepoint), within the operation deadline.
    pub async fn commit(self) -> Result<(), StoreError> {
        deadline("commit", self.timeout, self.inner.commit()).await
    }

    /// Rolls back (to the savepoint, for a savepoint), within the operation deadline.
    pub async fn rollback(self) -> Result<(), StoreError> {
        deadline("rollback", self.timeout, self.inner.rollback()).await
    }

    /// Begins a savepoint inside this transaction: rolling it back undoes only what ran since.
    pub async fn savepoint(&mut self) -> Result<Tx<'_>, StoreError> {
        let timeout = self.timeout;
        let inner = deadline(
            "savepoint",
            timeout,
            sqlx::Connection::begin(&mut *self.inner),
        )
        .await?;
        Ok(Tx { inner, timeout })
    }
}

/// Runs one store step with a client-side deadline: past it the step's future is dropped
/// (its connection is not reused for anything else of the caller's) and the caller gets the
/// transient [`StoreError::Deadline`].
async fn deadline<T>(
    operation: &'static str,
    after: Duration,
    step: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(after, step).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(StoreError::Deadline { operation, after }),
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.inner
    }
}

/// Either a transaction or a plain pooled connection (each statement its own transaction):
/// for callers that need a transaction only sometimes, such as a request that is one
/// guarded statement unless it also keeps an idempotent answer.
pub enum Session {
    Tx(Tx<'static>),
    Conn(Conn),
}

impl Session {
    /// Commits a transaction; a plain connection has nothing to commit.
    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Session::Tx(tx) => tx.commit().await,
            Session::Conn(_) => Ok(()),
        }
    }

    /// Rolls a transaction back; a plain connection has nothing to undo.
    pub async fn rollback(self) -> Result<(), StoreError> {
        match self {
            Session::Tx(tx) => tx.rollback().await,
            Session::Conn(_) => Ok(()),
        }
    }
}

impl std::ops::Deref for Session {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        match self {
            Session::Tx(tx) => tx,
            Session::Conn(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match self {
            Session::Tx(tx) => tx,
            Session::Conn(conn) => conn,
        }
    }
}

pub use api_keys::{
    ApiKey, KeptAnswer, Role, authenticate_api_key, expire_idempotency_keys, insert_api_key,
    keep_answer, kept_answer, list_api_keys, reserve_idempotency_key, revoke_api_key,
};
pub use apps::{
    AppRow, DEFAULT_AUTHORITY, DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_INTERVAL,
    DEFAULT_PORT, DEFAULT_SCOPE, NewApp, StoredCertificate, delete_app, get_app, get_app_by_name,
    insert_app, list_apps, set_app_certificate, set_app_credential, update_app,
    update_app_resealed,
};
pub use conversations::{
    Explanation, Facts, MAX_PARTICIPANTS, Placement, Threaded, Unclassified, backfill_message,
    class_policies, explain, place, set_class_policy, unclassified,
};
pub use credentials::{
    CredentialHolder, UnboundUpgrade, reseal_credentials, upgrade_unbound_credentials,
};
pub use error::StoreError;
pub use messages::{
    FLAG_HEADER_TRUNCATED, FLAG_PARSE_ERROR, Inserted, KnownUidl, NewMessage, StoredCopy,
    clear_fetch_failure, complete_message, header_limits, insert_message, known_uidls,
    mark_deleted, mark_vanished, message_heads, record_connection_failure, record_fetch_failure,
    record_refetch_failure, record_too_large, refetch_due, stored_copy, stored_head,
    stored_identities,
};
pub use pilots::{
    MAX_ERROR_CHARS, NewPilot, PilotAuth, PilotRow, TlsMode, delete_pilot,
    enabled_pilots_with_apps, find_pilots_by_mailbox, get_pilot, insert_pilot, list_pilots,
    record_poll_error, record_poll_success, request_poll, set_pilot_enabled, update_pilot,
};
pub use text_limits::{TextLimit, limits};
pub use work_items::{
    AttachmentContent, AttachmentInfo, QueueCount, QueueSummary, WorkFilter, WorkItemDetail,
    WorkItemState, WorkItemView, attachment_content, claim_token_of, list_work_items,
    oldest_queued_age, queue_counts, queue_exists, queue_summaries, raw_message, recent_work_items,
    work_item_detail, work_item_state,
};

use error::{db_error, sqlstate};

/// The LISTEN/NOTIFY channel on which a trigger announces changes to pilots and OAuth apps.
/// The payload is JSON `{"table": "...", "op": "insert|update|delete", "id": n}`; it is a
/// wake-up hint only, the periodic re-read stays the truth.
pub const CONFIG_CHANNEL: &str = "ccmail_config";

/// A LISTEN on [`CONFIG_CHANNEL`]: the store owns the channel and the connection behind it,
/// callers only learn "something changed" (a wake-up hint; re-read the rows).
pub struct ConfigListener {
    listener: sqlx::postgres::PgListener,
}

impl ConfigListener {
    /// Opens a dedicated connection from `db` and listens on [`CONFIG_CHANNEL`].
    pub async fn connect(db: &Db) -> Result<ConfigListener, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool).await?;
        listener.listen(CONFIG_CHANNEL).await?;
        Ok(ConfigListener { listener })
    }

    /// Waits for the next change notification. An error means the connection is broken:
    /// drop this listener and connect again.
    pub async fn changed(&mut self) -> Result<(), StoreError> {
        self.listener.recv().await?;
        Ok(())
    }
}

/// The LISTEN/NOTIFY channel on which a trigger names the queue of a work item that is (or
/// becomes) queued; delivered at commit, folded per transaction. A wake-up hint for long-poll
/// claims: the claim itself decides what is there.
pub const WORK_CHANNEL: &str = "ccmail_work_queued";

/// A LISTEN on [`WORK_CHANNEL`].
pub struct WorkListener {
    listener: sqlx::postgres::PgListener,
}

impl WorkListener {
    /// Waits for the next queue that got work. An error means the connection is broken: drop
    /// this listener and connect again (notifications sent meanwhile are lost, so callers
    /// re-check every queue they wait on).
    pub async fn next_queue(&mut self) -> Result<String, StoreError> {
        let notification = self.listener.recv().await?;
        Ok(notification.payload().to_owned())
    }
}

/// Parses a database URL into connect options, without echoing the URL (it may hold a password).
fn parse_url(url: &str) -> Result<PgConnectOptions, StoreError> {
    // sqlx ignores the scheme; a mysql:// or http:// URL is almost certainly a mistake.
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(StoreError::InvalidUrl {
            reason: "the scheme must be postgres:// or postgresql://".to_owned(),
        });
    }
    PgConnectOptions::from_str(url).map_err(|err| StoreError::InvalidUrl {
        // sqlx's URL errors describe the syntax problem, not the URL itself.
        reason: err.to_string(),
    })
}

/// `user@host:port/database`, for messages: never the password.
fn describe_target(options: &PgConnectOptions) -> String {
    let database = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let place = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    format!("{}@{place}/{database}", options.get_username())
}

/// `user@host:port/database` of a database URL, safe to print (never the password).
pub fn redacted_url(url: &str) -> String {
    match parse_url(url) {
        Ok(options) => describe_target(&options),
        Err(_) => "<invalid database URL>".to_owned(),
    }
}

/// Turns a failed first connection into an error that says which server and what to check.
fn connect_error(err: sqlx::Error, target: String) -> StoreError {
    if let Some((_, code)) = db_error(&err) {
        match code.as_str() {
            sqlstate::INVALID_CATALOG_NAME => return StoreError::DatabaseMissing { target },
            sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION => {
                return StoreError::LoginRefused {
                    target,
                    source: err,
                };
            }
            _ => {}
        }
    }
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Protocol(_) => StoreError::Unreachable {
            target,
            source: err,
        },
        other => StoreError::Database(other),
    }
}

/// Opens a connection pool of at most `max_connections` (the other [`DbSettings`] at their
/// defaults) and checks that the server answers.
///
/// When nothing answers, the error names `user@host:port/database` (never the password).
pub async fn connect(url: &str, max_connections: u32) -> Result<Db, StoreError> {
    connect_with(
        url,
        &DbSettings {
            max_connections,
            ..DbSettings::default()
        },
    )
    .await
}

/// Opens a connection pool with `settings` and checks that the server answers.
pub async fn connect_with(url: &str, settings: &DbSettings) -> Result<Db, StoreError> {
    let db = Db::connect_lazy(url, settings)?;
    // One direct connection first: the pool would retry a refused connection until its
    // acquire timeout and then report only "timed out", hiding the cause.
    db.ping_server().await?;
    Ok(db)
}

/// Settings the pool cannot work with, refused before anything is dialled.
fn validate(settings: &DbSettings) -> Result<(), StoreError> {
    if settings.max_connections == 0 {
        return Err(StoreError::InvalidInput {
            field: "max_connections",
            reason: "must be at least 1".to_owned(),
        });
    }
    let durations = [
        ("statement_timeout", settings.statement_timeout),
        (
            "idle_in_transaction_timeout",
            settings.idle_in_transaction_timeout,
        ),
        ("acquire_timeout", settings.acquire_timeout),
        ("operation_timeout", settings.operation_timeout),
        ("tcp_keepalive", settings.tcp_keepalive),
    ];
    for (field, value) in durations {
        if value < Duration::from_secs(1) {
            return Err(StoreError::InvalidInput {
                field,
                reason: "must be at least 1 second".to_owned(),
            });
        }
    }
    Ok(())
}

/// Applies the migrations in `migrations/` that are not applied yet. Safe to run from several
/// replicas at once (sqlx takes an advisory lock) and a no-op when the schema is current.
pub async fn migrate(db: &Db) -> Result<(), StoreError> {
    let mut conn = db.acquire().await?;
    // Why lifted: a migration may rewrite a large table, which must not be cut off by the
    // per-statement limit meant for ingest. The session's own values come back afterwards.
    sqlx::query("set statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    let applied = sqlx::migrate!("./migrations").run_direct(&mut *conn).await;
    let restored = sqlx::query("reset statement_timeout")
        .execute(&mut *conn)
        .await;
    if restored.is_err() {
        // A connection whose limit could not be restored is not handed out again.
        conn.0.close_on_drop();
    }
    applied?;
    Ok(())
}

/// Versions of the embedded migrations that the database has not applied successfully (or
/// applied with a different checksum), in order; empty when the schema is current. Answers
/// `/readyz` without taking the migration lock.
pub async fn pending_migrations(conn: &mut PgConnection) -> Result<Vec<i64>, StoreError> {
    let migrator = sqlx::migrate!("./migrations");
    let table: Option<String> = sqlx::query_scalar("select to_regclass('_sqlx_migrations')::text")
        .fetch_one(&mut *conn)
        .await?;
    let applied: Vec<(i64, Vec<u8>)> = if table.is_some() {
        sqlx::query_as("select version, checksum from _sqlx_migrations where success")
            .fetch_all(&mut *conn)
            .await?
    } else {
        Vec::new()
    };
    Ok(migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .filter(|m| {
            !applied
                .iter()
                .any(|(v, sum)| *v == m.version && sum.as_slice() == &*m.checksum)
        })
        .map(|m| m.version)
        .collect())
}

/// Creates the database named in `url` if it does not exist, connecting to the `postgres`
/// maintenance database of the same server. Returns true when it created the database.
/// Losing a creation race to another process counts as "already existed".
pub async fn ensure_database(url: &str) -> Result<bool, StoreError> {
    let options = parse_url(url)?;
    let name = options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned();
    let admin = options.clone().database("postgres");
    let target = describe_target(&admin);
    let mut conn = admin
        .connect()
        .await
        .map_err(|err| connect_error(err, target))?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if exists {
        return Ok(false);
    }
    match create_database(&mut conn, &name).await {
        Ok(()) => Ok(true),
        Err(err) => match db_error(&err) {
            // Another process created it between the check and the create.
            Some((_, code))
                if code == sqlstate::DUPLICATE_DATABASE || code == sqlstate::UNIQUE_VIOLATION =>
            {
                Ok(false)
            }
            _ => Err(StoreError::Database(err)),
        },
    }
}

/// Quotes an SQL identifier: utility statements such as `create database` take no bound
/// parameters, so the name is quoted (embedded quotes doubled) instead. Public for the lab's
/// test databases, which create and drop databases the same way.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn create_database(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let statement = format!("create database {}", quote_ident(name));
    sqlx::query(&statement).execute(conn).await?;
    Ok(())
}

#[cfg(test)]
mod setup_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn connect_names_the_target_without_password_when_nothing_answers() {
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        let err = connect("postgres://ccmail:hunter2secret@127.0.0.1:1/ccmail_x", 1)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
        assert!(text.contains("ccmail@127.0.0.1:1/ccmail_x"), "{text}");
        assert!(
            text.to_lowercase().contains("refused"),
            "the cause is kept: {text}"
        );
        assert!(!text.contains("hunter2secret"), "{text}");
        assert!(!format!("{err:?}").contains("hunter2secret"));
        assert!(err.is_transient());
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn invalid_urls_are_refused_without_echo() {
        for url in [
            "mysql://root:pw@host/db",
            "postgres://root:pw@host:notaport/db",
        ] {
            let err = parse_url(url).unwrap_err();
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{url}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }
}
