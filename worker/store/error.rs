//! The store layer's one error type and its retry predicate.
//!
//! Invariants: messages name what is wrong and how to fix it; they never contain a database
//! password (connection targets are printed as `user@host:port/database`) nor a stored
//! credential. Whether an error is worth retrying is decided here, once: `is_transient` for
//! the store's own retries, `retry()` for the supervisor ([`crate::model::retry`]).

use sqlx::error::DatabaseError;

/// PostgreSQL SQLSTATE codes the store reacts to (Appendix A of the PostgreSQL manual).
pub(crate) mod sqlstate {
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    pub const CHECK_VIOLATION: &str = "23514";
    pub const SERIALIZATION_FAILURE: &str = "40001";
    pub const DEADLOCK_DETECTED: &str = "40P01";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CRASH_SHUTDOWN: &str = "57P02";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `statement_timeout` (or a cancel request) ended the statement.
    pub const QUERY_CANCELED: &str = "57014";
    /// `lock_timeout` expired, or `NOWAIT` found the lock taken.
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// `idle_in_transaction_session_timeout` ended the session.
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const DUPLICATE_DATABASE: &str = "42P04";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// Class 08: connection exceptions.
    pub const CONNECTION_EXCEPTION_CLASS: &str = "08";
}

/// Everything that can go wrong in the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL is invalid: {reason}; expected postgres://user@host:port/database")]
    InvalidUrl { reason: String },
    #[error(
        "cannot reach PostgreSQL at {target}: {source}; check that the server is running and \
         that the database URL names the right host and port"
    )]
    Unreachable {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "PostgreSQL at {target} refused the login: {source}; check the user name and password \
         in the database URL and pg_hba.conf"
    )]
    LoginRefused {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database does not exist at {target}; create it with `ccmail migrate`")]
    DatabaseMissing { target: String },
    #[error("database migration failed: {0}; the schema is left at the last applied migration")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "{entity} with {field} {value} already exists; choose another {field} or change the existing {entity}"
    )]
    Duplicate {
        entity: &'static str,
        field: &'static str,
        value: String,
    },
    #[error("{entity} {key} not found")]
    NotFound { entity: &'static str, key: String },
    #[error("{entity} {key} is still in use: {detail}")]
    InUse {
        entity: &'static str,
        key: String,
        /// Who uses it and what to do instead.
        detail: String,
    },
    #[error("{entity} is invalid: {explanation} (constraint {constraint})")]
    Constraint {
        entity: &'static str,
        constraint: String,
        explanation: &'static str,
    },
    #[error("{field} is invalid: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error(
        "column {column} holds an unexpected value {value:?}; the schema and ccmail disagree, run `ccmail migrate` with a matching version"
    )]
    UnexpectedValue { column: &'static str, value: String },
    #[error(
        "the database did not answer a {operation} within {}s; the connection is abandoned and \
         the work is retried (check the network to PostgreSQL and the server's load, or raise \
         database.operation_timeout_secs)",
        after.as_secs()
    )]
    Deadline {
        operation: &'static str,
        after: std::time::Duration,
    },
    #[error(
        "this replica no longer holds the lease of pilot {pilot} (another replica took it over, \
         or it expired while this one was stalled); the batch is not stored here and nothing is \
         deleted, the holder polls the mailbox"
    )]
    Fenced { pilot: i64 },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// True when retrying the same operation later may succeed: the connection dropped, timed
    /// out or spoke garbage (a restart seen through a TCP relay answers the TLS request with a
    /// stray byte: sqlx reports a protocol error), the pool had no free connection or is
    /// closing, the server is shutting down or starting,
    /// a statement or lock wait ran into its timeout (a busy or locked table clears), or the
    /// transaction lost a serialization race. Everything else needs a change first.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } | StoreError::Deadline { .. } => true,
            StoreError::Database(err) => sqlx_is_transient(err),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(err)) => {
                sqlx_is_transient(err)
            }
            _ => false,
        }
    }

    /// The supervisor's decision (see [`crate::model::retry`]): [`Retry::Soon`] when
    /// [`StoreError::is_transient`], else [`Retry::Slowly`] (a refused login, a missing
    /// database or schema needs an operator, who fixes it outside the pilot's settings).
    ///
    /// [`Retry::Soon`]: crate::model::retry::Retry::Soon
    /// [`Retry::Slowly`]: crate::model::retry::Retry::Slowly
    pub fn retry(&self) -> crate::model::retry::Retry {
        if self.is_transient() {
            crate::model::retry::Retry::Soon
        } else {
            crate::model::retry::Retry::Slowly
        }
    }

    /// The opposite of [`StoreError::is_transient`].
    pub fn is_permanent(&self) -> bool {
        !self.is_transient()
    }
}

fn sqlx_is_transient(err: &sqlx::Error) -> bool {
    match err {
        // Connection-level failures: the next connection may well work.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            matches!(
                code,
                sqlstate::SERIALIZATION_FAILURE
                    | sqlstate::DEADLOCK_DETECTED
                    | sqlstate::ADMIN_SHUTDOWN
                    | sqlstate::CRASH_SHUTDOWN
                    | sqlstate::CANNOT_CONNECT_NOW
                    | sqlstate::TOO_MANY_CONNECTIONS
                    | sqlstate::QUERY_CANCELED
                    | sqlstate::LOCK_NOT_AVAILABLE
                    | sqlstate::IDLE_IN_TRANSACTION_TIMEOUT
            ) || code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
        }
        _ => false,
    }
}

/// The SQLSTATE and constraint name of a database error, if it is one.
pub(crate) fn db_error(err: &sqlx::Error) -> Option<(&dyn DatabaseError, String)> {
    let db = err.as_database_error()?;
    let code = db.code()?.into_owned();
    Some((db, code))
}

/// What a violated constraint means, for messages an admin can act on.
pub(crate) fn explain_constraint(name: &str) -> &'static str {
    match name {
        "pilots_port_range" => "port must be between 1 and 65535",
        "pilots_tls_mode" => "tls must be implicit, starttls or dangerous_plaintext",
        "pilots_auth_kind" => "auth must be xoauth2 or user_pass",
        "pilots_auth_consistent" => {
            "xoauth2 pilots need an app and no username/password; user_pass pilots need a \
             username and a password credential and no app"
        }
        "pilots_password_not_plaintext" | "oauth_apps_credential_not_plaintext" => {
            "credentials must be sealed (enc:v2:...) or a reference (env:NAME, file:PATH), \
             never plaintext"
        }
        "pilots_poll_interval_positive" => "poll interval must be at least one second",
        "pilots_max_message_bytes_positive" => "max message size must be positive",
        "pilots_queue_not_blank" => "queue must not be blank",
        "pilots_mailbox_not_blank" => "mailbox must not be blank",
        "pilots_host_not_blank" => "host must not be blank",
        "oauth_apps_name_not_blank" => "name must not be blank",
        "oauth_apps_tenant_not_blank" => "tenant must not be blank",
        "oauth_apps_client_id_not_blank" => "client id must not be blank",
        "oauth_apps_certificate_consistent" => {
            "a certificate credential needs both the certificate and its algorithm (RS256 or PS256)"
        }
        "api_keys_role" => "role must be agent, supervisor or admin",
        "api_keys_name_form" => {
            "name must be 1 to 100 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        }
        "api_keys_agent_queues" => "an agent key must name at least one queue (--queue)",
        "users_role" => "role must be agent, supervisor or admin",
        "users_name_form" => {
            "name must be 1 to 100 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
        }
        "users_agent_queues" => "an agent must work at least one queue (--queue)",
        "users_password_is_argon2id" => "a password is stored only as an argon2id hash",
        "work_items_queue_length" => "queue must be 1 to 200 bytes",
        "work_items_reason_length" | "work_item_events_reason_length" => {
            "a reason must be at most 1000 bytes"
        }
        "work_items_status" => "status must be queued, offered, accepted, done, cancelled or held",
        "pilots_queue_limits" => "queue must be at most 100 characters, without control characters",
        "pilots_mailbox_limits" | "pilots_username_limits" => {
            "mailbox and username must be at most 320 characters, without control characters"
        }
        "pilots_host_limits" => "host must be at most 253 characters, without control characters",
        "pilots_ca_bundle_limits" => {
            "CA bundle path must be at most 4096 characters, without control characters"
        }
        "oauth_apps_name_limits" => {
            "app name must be at most 100 characters, without control characters"
        }
        "oauth_apps_tenant_limits" => {
            "tenant must be at most 253 characters, without control characters"
        }
        "oauth_apps_client_id_limits" => {
            "client id must be at most 100 characters, without control characters"
        }
        "oauth_apps_authority_limits" | "oauth_apps_scope_limits" => {
            "authority and scope must be at most 200 characters, without control characters"
        }
        "oauth_apps_credential_env_not_reserved" | "pilots_password_env_not_reserved" => {
            "an env: credential may not name CCMAIL_* (ccmail's settings and master key), \
             DATABASE_URL or PG* (the database login)"
        }
        "messages_defects_limits" => "at most 21 parser defects of at most 1000 bytes each",
        _ => "see the constraint definition in migrations/",
    }
}

/// Maps a check violation to [`StoreError::Constraint`]; other errors pass through.
pub(crate) fn map_check(err: sqlx::Error, entity: &'static str) -> StoreError {
    if let Some((db, code)) = db_error(&err)
        && code == sqlstate::CHECK_VIOLATION
    {
        let constraint = db.constraint().unwrap_or("unknown").to_owned();
        let explanation = explain_constraint(&constraint);
        return StoreError::Constraint {
            entity,
            constraint,
            explanation,
        };
    }
    StoreError::Database(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_and_permanent_are_classified_once() {
        let io = StoreError::Database(sqlx::Error::Io(std::io::Error::other("reset")));
        assert!(io.is_transient());
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!StoreError::Database(sqlx::Error::RowNotFound).is_transient());
        let dup = StoreError::Duplicate {
            entity: "app",
            field: "name",
            value: "\"x\"".into(),
        };
        assert!(dup.is_permanent());
    }

    #[test]
    fn connection_level_failures_are_transient() {
        use crate::model::retry::Retry;
        // What a PostgreSQL restart behind a TCP relay looks like to sqlx.
        let relay = sqlx::Error::Protocol("unexpected response from SSLRequest: 0x00".into());
        let tls = sqlx::Error::Tls("handshake eof".into());
        for err in [
            relay,
            tls,
            sqlx::Error::PoolClosed,
            sqlx::Error::PoolTimedOut,
        ] {
            let err = StoreError::Database(err);
            assert!(err.is_transient(), "{err}");
            assert_eq!(err.retry(), Retry::Soon, "{err}");
        }
        let late = StoreError::Deadline {
            operation: "commit",
            after: std::time::Duration::from_secs(30),
        };
        assert!(late.is_transient());
        let text = late.to_string();
        assert!(text.contains("commit") && text.contains("30s"), "{text}");
        assert!(text.contains("database.operation_timeout_secs"), "{text}");
    }
}
