//! Test support: a fresh, migrated PostgreSQL database per test.
//!
//! Lives in the lab, not in the product: integration tests, the demo and the bench use it.
//! The server is taken from `CCMAIL_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each [`TestDb`] creates `ccmail_t_<random>`
//! on it and drops it again, by [`TestDb::drop_db`] or, best effort, when dropped.
//! It never reconfigures or restarts the server. [`stored_messages`] and [`work_item_count`]
//! are read-only views for end-to-end tests (exactly-once and flag checks).

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use std::str::FromStr as _;

use ccmail::store::{Db, StoreError, migrate, quote_ident};
use sqlx::postgres::PgConnection;

fn parse_url(url: &str) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url).map_err(|err| StoreError::InvalidUrl {
        reason: err.to_string(),
    })
}

/// The server a connection failure is about, without the password.
fn connect_error(err: sqlx::Error, admin: &PgConnectOptions) -> StoreError {
    StoreError::Unreachable {
        target: format!(
            "{}@{}:{}",
            admin.get_username(),
            admin.get_host(),
            admin.get_port()
        ),
        source: err,
    }
}

async fn create_database(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let statement = format!("create database {}", quote_ident(name));
    sqlx::query(&statement).execute(conn).await?;
    Ok(())
}

/// Drops a database, terminating its sessions first (PostgreSQL 13+ `with (force)`).
async fn drop_database(conn: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    let statement = format!("drop database if exists {} with (force)", quote_ident(name));
    sqlx::query(&statement).execute(conn).await?;
    Ok(())
}

/// Server used when `CCMAIL_TEST_DATABASE_URL` is not set.
pub const DEFAULT_TEST_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Connections in a test database's pool; tests that need more open their own.
const POOL_SIZE: u32 = 8;

/// URL of the maintenance database test databases are created from.
pub fn admin_url() -> String {
    std::env::var("CCMAIL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| DEFAULT_TEST_DATABASE_URL.to_owned())
}

/// A freshly created and migrated database that is dropped at the end of the test.
pub struct TestDb {
    db: Db,
    url: String,
    name: String,
    admin: PgConnectOptions,
    dropped: bool,
}

impl TestDb {
    /// Creates `ccmail_t_<random>`, applies the migrations and opens a small pool on it.
    pub async fn new() -> Result<TestDb, StoreError> {
        TestDb::on_server(&admin_url()).await
    }

    /// Creates `ccmail_t_<random>` on the server of `url` (any database URL of that server).
    pub async fn on_server(url: &str) -> Result<TestDb, StoreError> {
        let admin = parse_url(url)?;
        let name = format!("ccmail_t_{:016x}", fastrand::u64(..));
        let mut conn = admin
            .connect()
            .await
            .map_err(|err| connect_error(err, &admin))?;
        create_database(&mut conn, &name).await?;
        // A failed close only leaks a session of the maintenance database.
        let _ = sqlx::Connection::close(conn).await;

        let options = admin.clone().database(&name);
        let url = options.to_url_lossy().to_string();
        let db = TestDb {
            db: Db::from_pool(
                PgPoolOptions::new()
                    .max_connections(POOL_SIZE)
                    .connect_lazy_with(options),
            ),
            url,
            name,
            admin,
            dropped: false,
        };
        // From here on, Drop removes the database if migrating fails.
        migrate(&db.db).await?;
        Ok(db)
    }

    /// The pool of the test database.
    pub fn pool(&self) -> &PgPool {
        self.db.pool()
    }

    /// The store's handle on the test database, for the product code under test.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The URL of the test database, for code that opens its own connections.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name (`ccmail_t_…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database, ending any session still connected to it.
    pub async fn drop_db(mut self) -> Result<(), StoreError> {
        self.db.close().await;
        let mut conn = self
            .admin
            .connect()
            .await
            .map_err(|err| connect_error(err, &self.admin))?;
        drop_database(&mut conn, &self.name).await?;
        self.dropped = true;
        let _ = sqlx::Connection::close(conn).await;
        Ok(())
    }
}

impl Drop for TestDb {
    /// Best-effort cleanup when a test ends without `drop_db` (or panics). Drop cannot await,
    /// and blocking on the test's own runtime would deadlock, so a separate thread with its
    /// own small runtime does the work while this one waits for it.
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let admin = self.admin.clone();
        let name = self.name.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| err.to_string())?;
            runtime.block_on(async {
                let mut conn = admin.connect().await.map_err(|err| err.to_string())?;
                drop_database(&mut conn, &name)
                    .await
                    .map_err(|err| err.to_string())
            })
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("could not drop test database {}: {err}", self.name),
            Err(_) => eprintln!("test database cleanup of {} panicked", self.name),
        }
    }
}

/// One stored message with its work item, as end-to-end tests check it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredMessage {
    pub pilot_id: i64,
    pub uidl: String,
    /// SHA-256 of the stored bytes (the whole message, or only its headers when `headers_only`).
    pub sha256: Vec<u8>,
    pub size: i64,
    pub headers_only: bool,
    pub parse_error: Option<String>,
    /// Flags of the message's work item (empty when it has none, which must never happen).
    pub flags: Vec<String>,
    /// Work items pointing at this message (the schema allows at most one).
    pub work_items: i64,
    pub attachments: i64,
    /// Whether a poll recorded the message as deleted from the server (after its QUIT).
    pub deleted_from_server: bool,
}

/// Every stored message of these pilots with its work item, oldest first. Read-only; for tests
/// that check "exactly once" and flags without loading whole messages.
pub async fn stored_messages(
    conn: &mut sqlx::PgConnection,
    pilot_ids: &[i64],
) -> Result<Vec<StoredMessage>, StoreError> {
    Ok(sqlx::query_as(
        "select m.pilot_id, m.uidl, m.sha256, m.size, m.headers_only, m.parse_error, \
         coalesce((select w.flags from work_items w where w.message_id = m.id limit 1), '{}') \
           as flags, \
         (select count(*) from work_items w where w.message_id = m.id) as work_items, \
         (select count(*) from attachments a where a.message_id = m.id) as attachments, \
         m.deleted_from_server_at is not null as deleted_from_server \
         from messages m where m.pilot_id = any($1) order by m.id",
    )
    .bind(pilot_ids)
    .fetch_all(conn)
    .await?)
}

/// Number of work items in the whole database.
pub async fn work_item_count(conn: &mut sqlx::PgConnection) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("select count(*) from work_items")
        .fetch_one(conn)
        .await?)
}
