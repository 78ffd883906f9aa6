//! API keys (`api_keys`) and the answers kept for `Idempotency-Key` (`idempotency_keys`).
//!
//! Invariants: a key is stored only as its SHA-256 (the key is 256 random bits, so a fast
//! hash is enough: there is nothing to guess); a name is never reused, so an event's actor
//! names one key for ever; a revoked key stays (its events keep their actor) and never
//! authenticates again.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::error::{StoreError, db_error, map_check, sqlstate};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Claims and handles items of its queues.
    Agent,
    /// Views, transfers, cancels and requeues items of its queues (all queues when none are
    /// named).
    Supervisor,
    /// What a supervisor may, on every queue.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Agent, Role::Supervisor, Role::Admin];

    /// The word in `api_keys.role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
        }
    }

    pub fn parse(word: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == word)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A key as listings and authentication see it (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// Queues the key may act on; empty means all (supervisor and admin keys only).
    pub queues: Vec<String>,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Whether the key may act on `queue`.
    pub fn covers(&self, queue: &str) -> bool {
        self.role == Role::Admin
            || (self.queues.is_empty() && self.role != Role::Agent)
            || self.queues.iter().any(|q| q == queue)
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: i64,
    name: String,
    role: String,
    queues: Vec<String>,
    key_prefix: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
}

impl ApiKeyRow {
    fn into_key(self) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            role: Role::parse(&self.role).ok_or_else(|| StoreError::UnexpectedValue {
                column: "api_keys.role",
                value: self.role.clone(),
            })?,
            id: self.id,
            name: self.name,
            queues: self.queues,
            key_prefix: self.key_prefix,
            created_at: self.created_at,
            revoked_at: self.revoked_at,
            last_used_at: self.last_used_at,
        })
    }
}

const KEY_COLUMNS: &str =
    "id, name, role, queues, key_prefix, created_at, revoked_at, last_used_at";

/// Stores a new key by its hash. A name already taken (by a live or a revoked key) is a
/// [`StoreError::Conflict`].
pub async fn insert_api_key(
    conn: &mut PgConnection,
    name: &str,
    role: Role,
    queues: &[String],
    key_hash: &[u8; 32],
    key_prefix: &str,
) -> Result<ApiKey, StoreError> {
    let row: ApiKeyRow = sqlx::query_as(&format!(
        "insert into api_keys (name, role, queues, key_hash, key_prefix) \
         values ($1, $2, $3, $4, $5) returning {KEY_COLUMNS}"
    ))
    .bind(name)
    .bind(role.as_str())
    .bind(queues)
    .bind(&key_hash[..])
    .bind(key_prefix)
    .fetch_one(conn)
    .await
    .map_err(|err| {
        if let Some((db, code)) = db_error(&err)
            && code == sqlstate::UNIQUE_VIOLATION
            && db.constraint() == Some("api_keys_name_key")
        {
            return StoreError::Duplicate {
                entity: "API key",
                field: "name",
                value: format!("{name:?} (names of revoked keys are not reused)"),
            };
        }
        map_check(err, "API key")
    })?;
    row.into_key()
}

/// Every key, live and revoked, by name.
pub async fn list_api_keys(conn: &mut PgConnection) -> Result<Vec<ApiKey>, StoreError> {
    let rows: Vec<ApiKeyRow> =
        sqlx::query_as(&format!("select {KEY_COLUMNS} from api_keys order by name"))
            .fetch_all(conn)
            .await?;
    rows.into_iter().map(ApiKeyRow::into_key).collect()
}

/// Revokes the key named `name`; false when no live key has that name.
pub async fn revoke_api_key(conn: &mut PgConnection, name: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "update api_keys set revoked_at = now() where name = $1 and revoked_at is null",
    )
    .bind(name)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The live key whose hash is `key_hash`, noting its use (at most once a minute, so a busy
/// agent does not write on every request).
pub async fn authenticate_api_key(
    conn: &mut PgConnection,
    key_hash: &[u8; 32],
) -> Result<Option<ApiKey>, StoreError> {
    let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
        "select {KEY_COLUMNS} from api_keys where key_hash = $1 and revoked_at is null"
    ))
    .bind(&key_hash[..])
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    if row
        .last_used_at
        .is_none_or(|t| Utc::now().signed_duration_since(t).num_seconds() >= 60)
    {
        sqlx::query("update api_keys set last_used_at = now() where id = $1")
            .bind(row.id)
            .execute(&mut *conn)
            .await?;
    }
    row.into_key().map(Some)
}

/// A kept answer to a POST.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptAnswer {
    pub request_hash: Vec<u8>,
    pub status_code: u16,
    pub response: serde_json::Value,
}

/// Reserves `key` for this request inside the caller's transaction: true when this request
/// is the first with the key (the caller does the work, then [`keep_answer`] before commit);
/// false when an earlier request holds it (its answer is read with [`kept_answer`]). A
/// concurrent request with the same key waits here until the first commits or rolls back, so
/// two identical POSTs never both do the work.
pub async fn reserve_idempotency_key(
    conn: &mut PgConnection,
    api_key_id: i64,
    key: &str,
    request_hash: &[u8; 32],
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "insert into idempotency_keys (api_key_id, key, request_hash, status_code, response) \
         values ($1, $2, $3, 0, 'null') on conflict do nothing",
    )
    .bind(api_key_id)
    .bind(key)
    .bind(&request_hash[..])
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the answer of the request that reserved `key`.
pub async fn keep_answer(
    conn: &mut PgConnection,
    api_key_id: i64,
    key: &str,
    status_code: u16,
    response: &serde_json::Value,
) -> Result<(), StoreError> {
    let done = sqlx::query(
        "update idempotency_keys set status_code = $3, response = $4 \
         where api_key_id = $1 and key = $2 and status_code = 0",
    )
    .bind(api_key_id)
    .bind(key)
    .bind(i16::try_from(status_code).unwrap_or(i16::MAX))
    .bind(Json(response))
    .execute(conn)
    .await?;
    if done.rows_affected() != 1 {
        return Err(StoreError::UnexpectedValue {
            column: "idempotency_keys.status_code",
            value: "an answer kept twice for one key".to_owned(),
        });
    }
    Ok(())
}

/// The answer kept for `key`, if a committed request holds it.
pub async fn kept_answer(
    conn: &mut PgConnection,
    api_key_id: i64,
    key: &str,
) -> Result<Option<KeptAnswer>, StoreError> {
    let row: Option<(Vec<u8>, i16, Json<serde_json::Value>)> = sqlx::query_as(
        "select request_hash, status_code, response from idempotency_keys \
         where api_key_id = $1 and key = $2 and status_code > 0",
    )
    .bind(api_key_id)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(request_hash, status_code, response)| KeptAnswer {
        request_hash,
        status_code: u16::try_from(status_code).unwrap_or(500),
        response: response.0,
    }))
}

/// Forgets kept answers older than `max_age_secs`; the number removed.
pub async fn expire_idempotency_keys(
    conn: &mut PgConnection,
    max_age_secs: f64,
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "delete from idempotency_keys \
         where created_at < now() - make_interval(secs => $1)",
    )
    .bind(max_age_secs)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
