//! The ingest statements: what a poller runs, inside one transaction per message, between
//! `UIDL` and `DELE`.
//!
//! Invariants: `(pilot_id, uidl)` is unique and a message has exactly one work item, both
//! enforced by the database; [`insert_message`] stores a message, its attachments and its work
//! item together or not at all (`on conflict do nothing` makes a repeated delivery a no-op,
//! even when two pollers race). Text PostgreSQL cannot hold (NUL characters) is replaced, never
//! a reason to lose a message.

use std::borrow::Cow;
use std::collections::HashMap;

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::error::{StoreError, db_error, sqlstate};
use crate::ingest::parse::{Address, ParsedMail};

/// Work-item flag added when the message could not be parsed.
pub const FLAG_PARSE_ERROR: &str = "parse_error";

/// What the store already knows about a UIDL of a pilot's maildrop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownUidl {
    /// The message is stored: do not download it again; delete it from the server unless
    /// `deleted` (already done) or the pilot keeps mail on the server.
    Stored { headers_only: bool, deleted: bool },
    /// Not stored; downloading it has failed `attempts` times so far.
    Failing { attempts: u32 },
}

/// One downloaded message, ready to be stored. `Debug` shows sizes, not mail content.
#[derive(Clone, Copy)]
pub struct NewMessage<'a> {
    pub pilot_id: i64,
    /// Queue of the pilot, copied onto the work item.
    pub queue: &'a str,
    pub uidl: &'a str,
    /// The bytes as downloaded (only the headers when `headers_only`).
    pub raw: &'a [u8],
    pub parsed: &'a ParsedMail,
    /// True when `raw` holds only the headers (oversize, or the download kept failing).
    pub headers_only: bool,
    /// Work-item flags such as `oversize` or `fetch_failed`; `parse_error` is added
    /// automatically when `parsed.parse_error` is set.
    pub flags: &'a [&'a str],
}

impl std::fmt::Debug for NewMessage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewMessage")
            .field("pilot_id", &self.pilot_id)
            .field("queue", &self.queue)
            .field("uidl", &self.uidl)
            .field("raw_len", &self.raw.len())
            .field("attachments", &self.parsed.attachments.len())
            .field("headers_only", &self.headers_only)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// PostgreSQL `text` and `jsonb` cannot hold U+0000; mail can. Replace it rather than fail.
fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

fn pg_opt(text: &Option<String>) -> Option<String> {
    text.as_deref().map(|t| pg_text(t).into_owned())
}

fn pg_vec(items: &[String]) -> Vec<String> {
    items.iter().map(|t| pg_text(t).into_owned()).collect()
}

fn pg_addresses(addresses: &[Address]) -> Json<Vec<Address>> {
    Json(
        addresses
            .iter()
            .map(|a| Address {
                name: pg_opt(&a.name),
                email: pg_opt(&a.email),
            })
            .collect(),
    )
}

fn too_large(field: &'static str, len: usize) -> StoreError {
    StoreError::InvalidInput {
        field,
        reason: format!("{len} is too large to store"),
    }
}

/// Stores a message, its attachments and its work item, and forgets any recorded fetch
/// failures of that UIDL. Returns the work item id, or `None` when this `(pilot, uidl)` is
/// already stored, in which case nothing at all is written.
///
/// Call it inside the caller's transaction and `DELE` only after that transaction commits.
pub async fn insert_message(
    conn: &mut PgConnection,
    message: &NewMessage<'_>,
) -> Result<Option<i64>, StoreError> {
    let parsed = message.parsed;
    let size = i64::try_from(message.raw.len()).map_err(|_| too_large("raw", message.raw.len()))?;
    let sha256 = Sha256::digest(message.raw).to_vec();
    let message_id: Option<i64> = sqlx::query_scalar(
        "insert into messages (pilot_id, uidl, raw, sha256, message_id, subject, from_addrs, \
         to_addrs, cc_addrs, reply_to_addrs, sent_at, in_reply_to, \"references\", text_body, \
         html_body, parse_error, size, headers_only, html_sanitized) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
         $19) \
         on conflict (pilot_id, uidl) do nothing returning id",
    )
    .bind(message.pilot_id)
    .bind(message.uidl)
    .bind(message.raw)
    .bind(sha256)
    .bind(pg_opt(&parsed.message_id))
    .bind(pg_opt(&parsed.subject))
    .bind(pg_addresses(&parsed.from))
    .bind(pg_addresses(&parsed.to))
    .bind(pg_addresses(&parsed.cc))
    .bind(pg_addresses(&parsed.reply_to))
    .bind(parsed.date)
    .bind(pg_vec(&parsed.in_reply_to))
    .bind(pg_vec(&parsed.references))
    .bind(pg_opt(&parsed.text_body))
    .bind(pg_opt(&parsed.html_body))
    .bind(pg_opt(&parsed.parse_error))
    .bind(size)
    .bind(message.headers_only)
    .bind(pg_opt(&parsed.html_sanitized))
    .fetch_optional(&mut *conn)
    .await
    .map_err(|err| unknown_pilot(err, message.pilot_id))?;
    let Some(message_id) = message_id else {
        // Already stored by an earlier poll or a concurrent poller: nothing else to write.
        return Ok(None);
    };

    for (index, attachment) in parsed.attachments.iter().enumerate() {
        let ordinal = i32::try_from(index).map_err(|_| too_large("attachment count", index))?;
        let size = i64::try_from(attachment.bytes.len())
            .map_err(|_| too_large("attachment", attachment.bytes.len()))?;
        sqlx::query(
            "insert into attachments (message_id, ordinal, filename, content_type, size, \
             content_id, inline, bytes) values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(message_id)
        .bind(ordinal)
        .bind(pg_opt(&attachment.filename))
        .bind(pg_text(&attachment.content_type).as_ref())
        .bind(size)
        .bind(pg_opt(&attachment.content_id))
        .bind(attachment.inline)
        .bind(&attachment.bytes)
        .execute(&mut *conn)
        .await?;
    }

    let mut flags: Vec<String> = Vec::with_capacity(message.flags.len() + 1);
    let parse_flag = parsed.parse_error.is_some().then_some(FLAG_PARSE_ERROR);
    for flag in message.flags.iter().copied().chain(parse_flag) {
        if !flags.iter().any(|f| f == flag) {
            flags.push(pg_text(flag).into_owned());
        }
    }
    let work_item_id: i64 = sqlx::query_scalar(
        "insert into work_items (message_id, queue, flags) values ($1, $2, $3) returning id",
    )
    .bind(message_id)
    .bind(message.queue)
    .bind(&flags)
    .fetch_one(&mut *conn)
    .await?;

    sqlx::query("delete from fetch_failures where pilot_id = $1 and uidl = $2")
        .bind(message.pilot_id)
        .bind(message.uidl)
        .execute(&mut *conn)
        .await?;
    Ok(Some(work_item_id))
}

fn unknown_pilot(err: sqlx::Error, pilot_id: i64) -> StoreError {
    if let Some((_, code)) = db_error(&err)
        && code == sqlstate::FOREIGN_KEY_VIOLATION
    {
        return StoreError::NotFound {
            entity: "pilot",
            key: format!("id {pilot_id}"),
        };
    }
    StoreError::Database(err)
}

/// What the store knows about these UIDLs of a pilot: stored messages and download failures.
/// UIDLs it knows nothing about are absent from the map.
pub async fn known_uidls(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidls: &[String],
) -> Result<HashMap<String, KnownUidl>, StoreError> {
    let failing: Vec<(String, i32)> = sqlx::query_as(
        "select uidl, attempts from fetch_failures where pilot_id = $1 and uidl = any($2)",
    )
    .bind(pilot_id)
    .bind(uidls)
    .fetch_all(&mut *conn)
    .await?;
    let stored: Vec<(String, bool, bool)> = sqlx::query_as(
        "select uidl, headers_only, deleted_from_server_at is not null from messages \
         where pilot_id = $1 and uidl = any($2)",
    )
    .bind(pilot_id)
    .bind(uidls)
    .fetch_all(&mut *conn)
    .await?;
    let mut known = HashMap::with_capacity(failing.len() + stored.len());
    for (uidl, attempts) in failing {
        let attempts = u32::try_from(attempts).map_err(|_| StoreError::UnexpectedValue {
            column: "fetch_failures.attempts",
            value: attempts.to_string(),
        })?;
        known.insert(uidl, KnownUidl::Failing { attempts });
    }
    // A stored message wins over a failure record of the same UIDL.
    for (uidl, headers_only, deleted) in stored {
        known.insert(
            uidl,
            KnownUidl::Stored {
                headers_only,
                deleted,
            },
        );
    }
    Ok(known)
}

/// Records that these stored messages were deleted from the server (after `QUIT` succeeded).
/// Only messages not yet marked change; returns how many did.
pub async fn mark_deleted(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidls: &[String],
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "update messages set deleted_from_server_at = now() \
         where pilot_id = $1 and uidl = any($2) and deleted_from_server_at is null",
    )
    .bind(pilot_id)
    .bind(uidls)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Marks as deleted the stored, unmarked messages of a pilot that are no longer on the server
/// (`present` is the server's current UIDL listing): their QUIT was applied but its reply never
/// arrived, or someone removed them. Headers-only messages are never deleted by ccmail and stay
/// unmarked. Returns how many were marked.
pub async fn mark_vanished(
    conn: &mut PgConnection,
    pilot_id: i64,
    present: &[String],
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "update messages set deleted_from_server_at = now() \
         where pilot_id = $1 and deleted_from_server_at is null and not headers_only \
         and uidl <> all($2)",
    )
    .bind(pilot_id)
    .bind(present)
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}

/// Counts one more failed download of `uidl` and returns the number of attempts so far, so
/// the poller can give up on a message that keeps failing (and store its headers instead).
pub async fn record_fetch_failure(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
    error: &str,
) -> Result<u32, StoreError> {
    let attempts: i32 = sqlx::query_scalar(
        "insert into fetch_failures (pilot_id, uidl, last_error) values ($1, $2, $3) \
         on conflict (pilot_id, uidl) do update \
         set attempts = fetch_failures.attempts + 1, last_error = excluded.last_error, \
         last_failed_at = now() \
         returning attempts",
    )
    .bind(pilot_id)
    .bind(uidl)
    .bind(pg_text(error).as_ref())
    .fetch_one(conn)
    .await
    .map_err(|err| unknown_pilot(err, pilot_id))?;
    u32::try_from(attempts).map_err(|_| StoreError::UnexpectedValue {
        column: "fetch_failures.attempts",
        value: attempts.to_string(),
    })
}

/// Forgets the failed downloads of `uidl` (it downloaded after all, or vanished from the
/// server). Returns whether there was anything to forget.
pub async fn clear_fetch_failure(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query("delete from fetch_failures where pilot_id = $1 and uidl = $2")
        .bind(pilot_id)
        .bind(uidl)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// The first 16 KiB of every stored message of these pilots (the header section, in practice):
/// enough for checks that read a header, without loading whole messages.
pub async fn message_heads(
    conn: &mut PgConnection,
    pilot_ids: &[i64],
) -> Result<Vec<Vec<u8>>, StoreError> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
        "select substring(raw from 1 for 16384) from messages where pilot_id = any($1) order by id",
    )
    .bind(pilot_ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(head,)| head).collect())
}
