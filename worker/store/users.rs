//! People (`users`), their browser sessions (`web_sessions`) and the audit log.
//!
//! Invariants: a password is stored only as an argon2id PHC string (checked by the schema);
//! a session is found by the SHA-256 of its cookie, and only while it has not expired; a
//! disabled user's sessions stop working at once (the lookup checks it).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::api_keys::Role;
use super::error::{StoreError, db_error, map_check, sqlstate};

/// An account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub role: Role,
    /// The queues an agent works; empty for supervisors and admins means all.
    pub queues: Vec<String>,
    pub disabled: bool,
}

impl User {
    /// Whether the user may act on `queue`.
    pub fn covers(&self, queue: &str) -> bool {
        self.role == Role::Admin
            || (self.queues.is_empty() && self.role != Role::Agent)
            || self.queues.iter().any(|q| q == queue)
    }
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: i64,
    name: String,
    role: String,
    queues: Vec<String>,
    disabled: bool,
}

impl UserRow {
    fn into_user(self) -> Result<User, StoreError> {
        Ok(User {
            role: Role::parse(&self.role).ok_or_else(|| StoreError::UnexpectedValue {
                column: "users.role",
                value: self.role.clone(),
            })?,
            id: self.id,
            name: self.name,
            queues: self.queues,
            disabled: self.disabled,
        })
    }
}

/// Creates an account; a name already taken is a [`StoreError::Duplicate`].
pub async fn insert_user(
    conn: &mut PgConnection,
    name: &str,
    role: Role,
    queues: &[String],
    password_hash: &str,
) -> Result<User, StoreError> {
    let row: UserRow = sqlx::query_as(
        "insert into users (name, role, queues, password_hash) values ($1, $2, $3, $4) \
         returning id, name, role, queues, disabled_at is not null as disabled",
    )
    .bind(name)
    .bind(role.as_str())
    .bind(queues)
    .bind(password_hash)
    .fetch_one(conn)
    .await
    .map_err(|err| {
        if let Some((db, code)) = db_error(&err)
            && code == sqlstate::UNIQUE_VIOLATION
            && db.constraint() == Some("users_name_key")
        {
            return StoreError::Duplicate {
                entity: "user",
                field: "name",
                value: format!("{name:?}"),
            };
        }
        map_check(err, "user")
    })?;
    row.into_user()
}

/// The enabled user `name` with its password hash, for a login.
pub async fn user_for_login(
    conn: &mut PgConnection,
    name: &str,
) -> Result<Option<(User, String)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: UserRow,
        password_hash: String,
    }
    let row: Option<Row> = sqlx::query_as(
        "select id, name, role, queues, disabled_at is not null as disabled, password_hash \
         from users where name = $1 and disabled_at is null",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?;
    row.map(|r| Ok((r.user.into_user()?, r.password_hash)))
        .transpose()
}

/// Starts a session for `user` until `expires_at`.
pub async fn insert_session(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
    user: i64,
    csrf_token: &str,
    lifetime_secs: f64,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into web_sessions (token_hash, user_id, csrf_token, expires_at) \
         values ($1, $2, $3, now() + make_interval(secs => $4))",
    )
    .bind(&token_hash[..])
    .bind(user)
    .bind(csrf_token)
    .bind(lifetime_secs)
    .execute(conn)
    .await?;
    Ok(())
}

/// The live session whose cookie hashes to `token_hash`: its enabled user and CSRF token.
pub async fn session(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
) -> Result<Option<(User, String, DateTime<Utc>)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        user: UserRow,
        csrf_token: String,
        expires_at: DateTime<Utc>,
    }
    let row: Option<Row> = sqlx::query_as(
        "select u.id, u.name, u.role, u.queues, false as disabled, s.csrf_token, s.expires_at \
         from web_sessions s join users u on u.id = s.user_id \
         where s.token_hash = $1 and s.expires_at > now() and u.disabled_at is null",
    )
    .bind(&token_hash[..])
    .fetch_optional(conn)
    .await?;
    row.map(|r| Ok((r.user.into_user()?, r.csrf_token, r.expires_at)))
        .transpose()
}

/// Ends the session whose cookie hashes to `token_hash`.
pub async fn delete_session(
    conn: &mut PgConnection,
    token_hash: &[u8; 32],
) -> Result<(), StoreError> {
    sqlx::query("delete from web_sessions where token_hash = $1 or expires_at <= now()")
        .bind(&token_hash[..])
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends to the audit log.
pub async fn audit(
    conn: &mut PgConnection,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: &serde_json::Value,
) -> Result<(), StoreError> {
    sqlx::query("insert into audit_log (actor, action, target, detail) values ($1, $2, $3, $4)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(sqlx::types::Json(detail))
        .execute(conn)
        .await?;
    Ok(())
}
