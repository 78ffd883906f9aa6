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
//! both), `messages` (messages, attachments, fetch failures), `work_items` (read-only queue
//! views), `text_limits` (admin-set text rules, mirrored by migration 0007), `words` (enum
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
         last_success_at, last_error, last_error_hint, last_error_at, created_at, updated_at"
    };
}

mod apps;
mod credentials;
mod error;
mod messages;
mod pilots;
mod text_limits;
mod words;
mod work_items;

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Postgres, Transaction};

/// The store's handle on its database: the pool behind every connection, transaction and
/// LISTEN ccmail opens. Cheap to clone (clones share the pool). Callers name only [`Db`],
/// [`Conn`], [`Tx`] and [`ConfigListener`]; sqlx stays inside `store/`.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
}

impl Db {
    /// Opens a pool of at most `max_connections` and checks that the server answers
    /// (see [`connect`]).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, StoreError> {
        connect(url, max_connections).await
    }

    /// Wraps an existing pool: for the lab's test databases, which build their own.
    pub fn from_pool(pool: PgPool) -> Db {
        Db { pool }
    }

    /// The pool itself: for the lab and tests, whose raw queries check the schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A pooled connection, returned to the pool on drop.
    pub async fn acquire(&self) -> Result<Conn, StoreError> {
        Ok(Conn(self.pool.acquire().await?))
    }

    /// Begins a transaction on a pooled connection.
    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        Ok(Tx(self.pool.begin().await?))
    }

    /// Opens a dedicated connection that listens on [`CONFIG_CHANNEL`].
    pub async fn listen(&self) -> Result<ConfigListener, StoreError> {
        ConfigListener::connect(self).await
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
#[derive(Debug)]
pub struct Tx<'c>(Transaction<'c, Postgres>);

impl Tx<'_> {
    /// Commits (or releases the savepoint).
    pub async fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }

    /// Rolls back (to the savepoint, for a savepoint).
    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.0.rollback().await?)
    }

    /// Begins a savepoint inside this transaction: rolling it back undoes only what ran since.
    pub async fn savepoint(&mut self) -> Result<Tx<'_>, StoreError> {
        Ok(Tx(sqlx::Connection::begin(&mut *self.0).await?))
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0
    }
}

pub use apps::{
    AppRow, DEFAULT_AUTHORITY, DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_INTERVAL,
    DEFAULT_PORT, DEFAULT_SCOPE, NewApp, StoredCertificate, delete_app, get_app, get_app_by_name,
    insert_app, list_apps, set_app_certificate, set_app_credential, update_app,
    update_app_resealed,
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
    record_poll_error, record_poll_success, set_pilot_enabled, update_pilot,
};
pub use text_limits::{TextLimit, limits};
pub use work_items::{
    QueueCount, WorkItemView, oldest_queued_age, queue_counts, recent_work_items,
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

/// How long to wait for a pooled connection (and for the first connection at start-up).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Opens a connection pool of at most `max_connections` and checks that the server answers.
///
/// When nothing answers, the error names `user@host:port/database` (never the password).
pub async fn connect(url: &str, max_connections: u32) -> Result<Db, StoreError> {
    if max_connections == 0 {
        return Err(StoreError::InvalidInput {
            field: "max_connections",
            reason: "must be at least 1".to_owned(),
        });
    }
    let options = parse_url(url)?;
    let target = describe_target(&options);
    // One direct connection first: the pool would retry a refused connection until its
    // acquire timeout and then report only "timed out", hiding the cause.
    let probe = options
        .connect()
        .await
        .map_err(|err| connect_error(err, target))?;
    // A failed close of a healthy probe only costs a server-side session cleanup.
    let _ = sqlx::Connection::close(probe).await;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_lazy_with(options);
    Ok(Db { pool })
}

/// Applies the migrations in `migrations/` that are not applied yet. Safe to run from several
/// replicas at once (sqlx takes an advisory lock) and a no-op when the schema is current.
pub async fn migrate(db: &Db) -> Result<(), StoreError> {
    sqlx::migrate!("./migrations").run(&db.pool).await?;
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
