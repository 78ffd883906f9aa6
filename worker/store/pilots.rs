//! The `pilots` table: mailbox pilots and their last poll outcome.
//!
//! Invariants: a pilot's auth columns always agree with its auth kind (check constraint
//! `pilots_auth_consistent`); `(lower(mailbox), lower(host))` is unique; a sealed password
//! opens only for the pilot's server and user ([`PilotRow::credential_owner`]). Status writes
//! from pollers (`record_poll_*`) do not bump `updated_at` and do not fire the configuration
//! NOTIFY; the error text they store is escaped and capped, since it may quote a server.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::apps::AppRow;
use super::error::{StoreError, db_error, map_check, sqlstate};
use super::text_limits::{check_credential, limits};
use crate::model::defaults::{
    DEFAULT_HOST, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_POLL_INTERVAL, DEFAULT_PORT,
};
use crate::secrets::{Owner, describe_stored};

pub use crate::model::TlsMode;

/// How a pilot logs in.
#[derive(Clone, PartialEq, Eq)]
pub enum PilotAuth {
    /// SASL XOAUTH2 with an app-only token of the given OAuth app.
    XOAuth2 { app_id: i64 },
    /// `USER`/`PASS` (servers other than Exchange Online); the password is sealed or a reference.
    UserPass {
        username: String,
        credential: String,
    },
}

impl fmt::Debug for PilotAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PilotAuth::XOAuth2 { app_id } => {
                f.debug_struct("XOAuth2").field("app_id", app_id).finish()
            }
            PilotAuth::UserPass {
                username,
                credential,
            } => f
                .debug_struct("UserPass")
                .field("username", username)
                .field("credential", &describe_stored(credential))
                .finish(),
        }
    }
}

/// A new mailbox pilot.
#[derive(Debug, Clone)]
pub struct NewPilot {
    /// Contact-center queue the work items go to.
    pub queue: String,
    /// Mailbox address; also the XOAUTH2 `user=`.
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub auth: PilotAuth,
    /// Path of an extra PEM CA bundle to trust for this server.
    pub ca_bundle: Option<String>,
    /// Whole seconds, at least one.
    pub poll_interval: Duration,
    /// Leave messages on the server after storing them (no `DELE`).
    pub keep_on_server: bool,
    pub max_message_bytes: u64,
    pub enabled: bool,
}

impl NewPilot {
    /// An enabled Exchange Online pilot with the documented defaults.
    pub fn new(queue: &str, mailbox: &str, auth: PilotAuth) -> NewPilot {
        NewPilot {
            queue: queue.to_owned(),
            mailbox: mailbox.to_owned(),
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            tls: TlsMode::Implicit,
            auth,
            ca_bundle: None,
            poll_interval: DEFAULT_POLL_INTERVAL,
            keep_on_server: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            enabled: true,
        }
    }
}

impl NewPilot {
    /// For a USER/PASS pilot, the owner its password is sealed for: host, port, TLS mode and
    /// username. `None` for XOAUTH2 (the app holds the credential).
    pub fn credential_owner(&self) -> Option<Owner> {
        password_owner(&self.host, self.port, self.tls, &self.auth)
    }
}

fn password_owner(host: &str, port: u16, tls: TlsMode, auth: &PilotAuth) -> Option<Owner> {
    match auth {
        PilotAuth::UserPass { username, .. } => Some(Owner::pilot(host, port, tls, username)),
        PilotAuth::XOAuth2 { .. } => None,
    }
}

/// A stored mailbox pilot with its last poll outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PilotRow {
    pub id: i64,
    pub queue: String,
    pub mailbox: String,
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub auth: PilotAuth,
    pub ca_bundle: Option<String>,
    pub poll_interval: Duration,
    pub keep_on_server: bool,
    pub max_message_bytes: u64,
    pub enabled: bool,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_hint: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The latest "Poll now" ([`request_poll`]); the lease holder polls when it is newer than
    /// the last request it served.
    pub poll_requested_at: Option<DateTime<Utc>>,
}

impl PilotRow {
    /// The configurable fields of this row, as a [`NewPilot`] (what `update_pilot` takes and
    /// the pilot resolver reads).
    pub fn settings(&self) -> NewPilot {
        NewPilot {
            queue: self.queue.clone(),
            mailbox: self.mailbox.clone(),
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            auth: self.auth.clone(),
            ca_bundle: self.ca_bundle.clone(),
            poll_interval: self.poll_interval,
            keep_on_server: self.keep_on_server,
            max_message_bytes: self.max_message_bytes,
            enabled: self.enabled,
        }
    }

    /// See [`NewPilot::credential_owner`].
    pub fn credential_owner(&self) -> Option<Owner> {
        password_owner(&self.host, self.port, self.tls, &self.auth)
    }
}

/// The row as PostgreSQL returns it, before the typed conversion.
#[derive(sqlx::FromRow)]
struct PilotRecord {
    id: i64,
    queue: String,
    mailbox: String,
    host: String,
    port: i32,
    tls: String,
    auth: String,
    app_id: Option<i64>,
    username: Option<String>,
    password_credential: Option<String>,
    ca_bundle: Option<String>,
    poll_interval_secs: i32,
    keep_on_server: bool,
    max_message_bytes: i64,
    enabled: bool,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_hint: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    poll_requested_at: Option<DateTime<Utc>>,
}

impl TryFrom<PilotRecord> for PilotRow {
    type Error = StoreError;

    fn try_from(r: PilotRecord) -> Result<PilotRow, StoreError> {
        let unexpected =
            |column: &'static str, value: String| StoreError::UnexpectedValue { column, value };
        let auth = match (r.auth.as_str(), r.app_id, r.username, r.password_credential) {
            ("xoauth2", Some(app_id), None, None) => PilotAuth::XOAuth2 { app_id },
            ("user_pass", None, Some(username), Some(credential)) => PilotAuth::UserPass {
                username,
                credential,
            },
            (kind, ..) => return Err(unexpected("pilots.auth", kind.to_owned())),
        };
        Ok(PilotRow {
            id: r.id,
            port: u16::try_from(r.port)
                .map_err(|_| unexpected("pilots.port", r.port.to_string()))?,
            tls: TlsMode::parse(&r.tls).ok_or_else(|| unexpected("pilots.tls", r.tls.clone()))?,
            auth,
            poll_interval: u64::try_from(r.poll_interval_secs)
                .map(Duration::from_secs)
                .map_err(|_| {
                    unexpected(
                        "pilots.poll_interval_secs",
                        r.poll_interval_secs.to_string(),
                    )
                })?,
            max_message_bytes: u64::try_from(r.max_message_bytes).map_err(|_| {
                unexpected("pilots.max_message_bytes", r.max_message_bytes.to_string())
            })?,
            queue: r.queue,
            mailbox: r.mailbox,
            host: r.host,
            ca_bundle: r.ca_bundle,
            keep_on_server: r.keep_on_server,
            enabled: r.enabled,
            last_success_at: r.last_success_at,
            last_error: r.last_error,
            last_error_hint: r.last_error_hint,
            last_error_at: r.last_error_at,
            created_at: r.created_at,
            updated_at: r.updated_at,
            poll_requested_at: r.poll_requested_at,
        })
    }
}

/// Stores a new pilot. The same mailbox on the same host (case-insensitively) gives
/// [`StoreError::Duplicate`]; an unknown app id gives [`StoreError::NotFound`]; values the
/// schema refuses (port 0, …) give [`StoreError::Constraint`].
pub async fn insert_pilot(
    conn: &mut PgConnection,
    pilot: &NewPilot,
) -> Result<PilotRow, StoreError> {
    let values = PilotValues::of(pilot)?;
    let query = sqlx::query_as(concat!(
        "insert into pilots (queue, mailbox, host, port, tls, auth, app_id, username, \
         password_credential, ca_bundle, poll_interval_secs, keep_on_server, max_message_bytes, \
         enabled) values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) returning ",
        pilot_columns!()
    ));
    let record: PilotRecord = bind_pilot(query, pilot, &values)
        .fetch_one(conn)
        .await
        .map_err(|err| pilot_write_error(err, pilot, values.app_id))?;
    record.try_into()
}

/// A [`NewPilot`]'s values in their column types, checked.
struct PilotValues<'a> {
    kind: &'static str,
    app_id: Option<i64>,
    username: Option<&'a str>,
    credential: Option<&'a str>,
    poll_secs: i32,
    max_bytes: i64,
}

impl<'a> PilotValues<'a> {
    fn of(pilot: &'a NewPilot) -> Result<PilotValues<'a>, StoreError> {
        limits::QUEUE.enforce(&pilot.queue)?;
        limits::MAILBOX.enforce(&pilot.mailbox)?;
        limits::HOST.enforce(&pilot.host)?;
        if let Some(path) = &pilot.ca_bundle {
            limits::CA_BUNDLE.enforce(path)?;
        }
        if let PilotAuth::UserPass { username, .. } = &pilot.auth {
            limits::USERNAME.enforce(username)?;
        }
        let poll_secs = i32::try_from(pilot.poll_interval.as_secs())
            .ok()
            .filter(|secs| *secs > 0)
            .ok_or_else(|| StoreError::InvalidInput {
                field: "poll_interval",
                reason: format!(
                    "{:?} must be between 1 second and {} seconds",
                    pilot.poll_interval,
                    i32::MAX
                ),
            })?;
        let max_bytes =
            i64::try_from(pilot.max_message_bytes).map_err(|_| StoreError::InvalidInput {
                field: "max_message_bytes",
                reason: format!("{} is too large", pilot.max_message_bytes),
            })?;
        let (kind, app_id, username, credential) = match &pilot.auth {
            PilotAuth::XOAuth2 { app_id } => ("xoauth2", Some(*app_id), None, None),
            PilotAuth::UserPass {
                username,
                credential,
            } => {
                check_credential("password credential", credential)?;
                (
                    "user_pass",
                    None,
                    Some(username.as_str()),
                    Some(credential.as_str()),
                )
            }
        };
        Ok(PilotValues {
            kind,
            app_id,
            username,
            credential,
            poll_secs,
            max_bytes,
        })
    }
}

type PilotQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, PilotRecord, sqlx::postgres::PgArguments>;

/// Binds a pilot's settings as parameters $1..$14, in the column order of `insert_pilot` and
/// `update_pilot`.
fn bind_pilot<'q>(
    query: PilotQuery<'q>,
    pilot: &'q NewPilot,
    values: &PilotValues<'q>,
) -> PilotQuery<'q> {
    query
        .bind(&pilot.queue)
        .bind(&pilot.mailbox)
        .bind(&pilot.host)
        .bind(i32::from(pilot.port))
        .bind(pilot.tls.as_str())
        .bind(values.kind)
        .bind(values.app_id)
        .bind(values.username)
        .bind(values.credential)
        .bind(&pilot.ca_bundle)
        .bind(values.poll_secs)
        .bind(pilot.keep_on_server)
        .bind(values.max_bytes)
        .bind(pilot.enabled)
}

/// Maps a failed insert or update of a pilot to the error naming the clashing field.
fn pilot_write_error(err: sqlx::Error, pilot: &NewPilot, app_id: Option<i64>) -> StoreError {
    if let Some((db, code)) = db_error(&err) {
        if code == sqlstate::UNIQUE_VIOLATION && db.constraint() == Some("pilots_mailbox_host_key")
        {
            return StoreError::Duplicate {
                entity: "pilot",
                field: "mailbox and host",
                value: format!("{} on {}", pilot.mailbox, pilot.host),
            };
        }
        if code == sqlstate::FOREIGN_KEY_VIOLATION {
            return StoreError::NotFound {
                entity: "OAuth app",
                key: format!("id {}", app_id.unwrap_or_default()),
            };
        }
    }
    map_check(err, "pilot")
}

/// Changes every configurable field of pilot `id` to those of `pilot` (`enabled` included).
/// The same errors as [`insert_pilot`], plus [`StoreError::NotFound`] for an unknown id.
/// Running workers restart the pilot's poller with the new settings.
///
/// `read_password` is the password credential the caller read before building `pilot` (or
/// `None` for an XOAUTH2 pilot): the update applies only if the row still holds it, so a
/// password rotated or re-sealed meanwhile (by `ccmail key rotate`, a worker's upgrade of an
/// old sealed form, another admin) is never overwritten with the stale one.
pub async fn update_pilot(
    conn: &mut PgConnection,
    id: i64,
    pilot: &NewPilot,
    read_password: Option<&str>,
) -> Result<PilotRow, StoreError> {
    let values = PilotValues::of(pilot)?;
    let query = sqlx::query_as(concat!(
        "update pilots set queue = $1, mailbox = $2, host = $3, port = $4, tls = $5, auth = $6, \
         app_id = $7, username = $8, password_credential = $9, ca_bundle = $10, \
         poll_interval_secs = $11, keep_on_server = $12, max_message_bytes = $13, enabled = $14, \
         updated_at = now() where id = $15 and password_credential is not distinct from $16 \
         returning ",
        pilot_columns!()
    ));
    let record: Option<PilotRecord> = bind_pilot(query, pilot, &values)
        .bind(id)
        .bind(read_password)
        .fetch_optional(&mut *conn)
        .await
        .map_err(|err| pilot_write_error(err, pilot, values.app_id))?;
    if let Some(record) = record {
        return record.try_into();
    }
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pilots where id = $1)")
        .bind(id)
        .fetch_one(&mut *conn)
        .await?;
    Err(if exists {
        StoreError::InvalidInput {
            field: "password",
            reason: format!(
                "the password credential of pilot {id} changed while it was being updated \
                 (a key rotation or another admin); run the command again"
            ),
        }
    } else {
        StoreError::NotFound {
            entity: "pilot",
            key: format!("id {id}"),
        }
    })
}

/// Removes a pilot that has no stored messages. A pilot with stored mail is refused with
/// [`StoreError::InUse`]: its messages and work items must stay; disable it instead.
pub async fn delete_pilot(conn: &mut PgConnection, id: i64) -> Result<(), StoreError> {
    let done = sqlx::query("delete from pilots where id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await;
    match done {
        Ok(done) => pilot_touched(done.rows_affected(), id),
        Err(err) => match db_error(&err) {
            Some((_, code)) if code == sqlstate::FOREIGN_KEY_VIOLATION => {
                let messages: i64 =
                    sqlx::query_scalar("select count(*) from messages where pilot_id = $1")
                        .bind(id)
                        .fetch_one(&mut *conn)
                        .await?;
                Err(StoreError::InUse {
                    entity: "pilot",
                    key: format!("id {id}"),
                    detail: format!(
                        "{messages} stored messages (and their work items) belong to it; \
                         disable it with `ccmail pilot disable {id}` instead"
                    ),
                })
            }
            _ => Err(StoreError::Database(err)),
        },
    }
}

/// Pilots whose mailbox is `mailbox` (case-insensitive; one per host), by id.
pub async fn find_pilots_by_mailbox(
    conn: &mut PgConnection,
    mailbox: &str,
) -> Result<Vec<PilotRow>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where lower(mailbox) = lower($1) order by id"
    ))
    .bind(mailbox)
    .fetch_all(conn)
    .await?;
    records.into_iter().map(PilotRow::try_from).collect()
}

/// All pilots, by id.
pub async fn list_pilots(conn: &mut PgConnection) -> Result<Vec<PilotRow>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots order by id"
    ))
    .fetch_all(conn)
    .await?;
    records.into_iter().map(PilotRow::try_from).collect()
}

/// The pilot with this id, or [`StoreError::NotFound`].
pub async fn get_pilot(conn: &mut PgConnection, id: i64) -> Result<PilotRow, StoreError> {
    let record: PilotRecord = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or_else(|| StoreError::NotFound {
        entity: "pilot",
        key: format!("id {id}"),
    })?;
    record.try_into()
}

/// Every enabled pilot, by id, with the OAuth app it logs in with (`None` for `user_pass`).
/// What the supervisor reads to decide which pollers to run.
pub async fn enabled_pilots_with_apps(
    conn: &mut PgConnection,
) -> Result<Vec<(PilotRow, Option<AppRow>)>, StoreError> {
    let records: Vec<PilotRecord> = sqlx::query_as(concat!(
        "select ",
        pilot_columns!(),
        " from pilots where enabled order by id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let pilots = records
        .into_iter()
        .map(PilotRow::try_from)
        .collect::<Result<Vec<_>, _>>()?;
    let app_ids: Vec<i64> = pilots
        .iter()
        .filter_map(|p| match p.auth {
            PilotAuth::XOAuth2 { app_id } => Some(app_id),
            PilotAuth::UserPass { .. } => None,
        })
        .collect();
    let apps: Vec<AppRow> = sqlx::query_as(concat!(
        "select ",
        app_columns!(),
        " from oauth_apps where id = any($1)"
    ))
    .bind(&app_ids)
    .fetch_all(&mut *conn)
    .await?;
    pilots
        .into_iter()
        .map(|pilot| match pilot.auth {
            PilotAuth::XOAuth2 { app_id } => {
                // The foreign key (on delete restrict) keeps the app while a pilot uses it.
                let app = apps
                    .iter()
                    .find(|a| a.id == app_id)
                    .cloned()
                    .ok_or_else(|| StoreError::NotFound {
                        entity: "OAuth app",
                        key: format!("id {app_id} (used by pilot {})", pilot.id),
                    })?;
                Ok((pilot, Some(app)))
            }
            PilotAuth::UserPass { .. } => Ok((pilot, None)),
        })
        .collect()
}

/// Enables or disables a pilot; [`StoreError::NotFound`] if there is no such pilot.
pub async fn set_pilot_enabled(
    conn: &mut PgConnection,
    id: i64,
    enabled: bool,
) -> Result<(), StoreError> {
    let done = sqlx::query("update pilots set enabled = $2, updated_at = now() where id = $1")
        .bind(id)
        .bind(enabled)
        .execute(conn)
        .await?;
    pilot_touched(done.rows_affected(), id)
}

fn pilot_touched(rows: u64, id: i64) -> Result<(), StoreError> {
    if rows == 0 {
        return Err(StoreError::NotFound {
            entity: "pilot",
            key: format!("id {id}"),
        });
    }
    Ok(())
}

/// Records a successful poll and clears the last error.
pub async fn record_poll_success(conn: &mut PgConnection, pilot_id: i64) -> Result<(), StoreError> {
    let done = sqlx::query(
        "update pilots set last_success_at = now(), last_error = null, last_error_hint = null, \
         last_error_at = null where id = $1",
    )
    .bind(pilot_id)
    .execute(conn)
    .await?;
    pilot_touched(done.rows_affected(), pilot_id)
}

/// The most characters of a poll error (and of its hint) stored on a pilot.
pub const MAX_ERROR_CHARS: usize = 2000;

/// Records a failed poll: the error (never containing a secret: callers pass redacted text)
/// and an optional hint telling the admin what to fix. `last_success_at` is kept, so "failing
/// since" stays visible. Both are stored escaped ([`crate::display::escape`]) and capped at
/// [`MAX_ERROR_CHARS`]: error text may quote a server, and whatever reads the row later (a
/// terminal, a web page) should not have to trust it.
pub async fn record_poll_error(
    conn: &mut PgConnection,
    pilot_id: i64,
    error: &str,
    hint: Option<&str>,
) -> Result<(), StoreError> {
    let clean = |text: &str| {
        crate::display::truncate(&crate::display::escape(text), MAX_ERROR_CHARS).into_owned()
    };
    let error = clean(error);
    let hint = hint.map(clean);
    let done = sqlx::query(
        "update pilots set last_error = $2, last_error_hint = $3, last_error_at = now() \
         where id = $1",
    )
    .bind(pilot_id)
    .bind(error)
    .bind(hint)
    .execute(conn)
    .await?;
    pilot_touched(done.rows_affected(), pilot_id)
}

/// Asks for a poll of pilot `id` now ("Poll now"): the replica holding its lease polls it as
/// soon as it reads the pilots again (the update notifies every replica). `false` when there
/// is no such pilot. It does not touch `updated_at`, so the running poller is not restarted.
pub async fn request_poll(conn: &mut PgConnection, id: i64) -> Result<bool, StoreError> {
    let done = sqlx::query("update pilots set poll_requested_at = clock_timestamp() where id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}
