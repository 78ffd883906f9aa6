//! The ingest statements: what a poller runs, inside one transaction per message, between
//! `UIDL` and `DELE`.
//!
//! Invariants: `(pilot_id, uidl)` is unique and a message has exactly one work item, both
//! enforced by the database; [`insert_message`] stores a message, its attachments and its work
//! item together or not at all (`on conflict do nothing` makes a repeated delivery a no-op,
//! even when two pollers race). Text PostgreSQL cannot hold (NUL characters) is replaced, never
//! a reason to lose a message.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::conversations::{self, Facts, Threaded};
use super::error::{StoreError, db_error, sqlstate};
use crate::model::triage::{Action, LoopTrip, MailClass, SenderRate, Triage};
use crate::model::{Address, Flag, ParsedMail};

/// Work-item flag added when the message could not be parsed.
pub const FLAG_PARSE_ERROR: Flag = Flag::ParseError;
/// Work-item flag added when a header value was longer than the store keeps (the raw message
/// is stored whole; see [`header_limits`]).
pub const FLAG_HEADER_TRUNCATED: Flag = Flag::HeaderTruncated;

/// What the store keeps of sender-written header values. The raw message is always stored
/// whole; these bound the parsed copies that are indexed, listed and shown, so that no sender
/// can make a row too large for an index or a page unreadable.
pub mod header_limits {
    /// `Message-ID`, each `In-Reply-To` / `References` id (RFC 5322 §2.1.1's line limit).
    pub const ID_BYTES: usize = 998;
    /// `In-Reply-To` ids kept (the first ones).
    pub const IN_REPLY_TO_IDS: usize = 20;
    /// `References` ids kept: the first (the thread's root) and the newest.
    pub const REFERENCES_IDS: usize = 100;
    /// The subject.
    pub const SUBJECT_BYTES: usize = 4 * 1024;
    /// A display name or an address.
    pub const ADDRESS_PART_BYTES: usize = 998;
    /// Addresses kept per field (`From`, `To`, `Cc`, `Reply-To`).
    pub const ADDRESSES: usize = 1_000;
    /// An attachment's file name, content type or content id.
    pub const ATTACHMENT_FIELD_BYTES: usize = 998;
    /// Parser defects kept (the parser lists at most 20 and a summary line).
    pub const DEFECTS: usize = 21;
    /// One parser defect (its text may quote the message).
    pub const DEFECT_BYTES: usize = 1000;
}

/// What the store already knows about a UIDL of a pilot's maildrop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownUidl {
    /// The message is stored: do not download it again; delete it from the server (once its
    /// identity is checked) unless `deleted` (already done) or the pilot keeps mail on the
    /// server.
    Stored { copy: StoredCopy, deleted: bool },
    /// Not stored; `attempts` failed downloads are held against it so far, and
    /// `connection_failures` more that were not (the connection broke after other downloads);
    /// `too_large`: a download ran far past the size limit (store its headers instead of
    /// trying again).
    Failing {
        attempts: u32,
        connection_failures: u32,
        too_large: bool,
    },
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
    /// automatically when `parsed.parse_error` is set, and so are the parser's own flags
    /// (`parsed.flags`).
    pub flags: &'a [Flag],
    /// The message's identity (`ingest::identity`), when its header section has one.
    pub identity: Option<[u8; 32]>,
    /// Its class and Outlook threading facts (`ingest::classify`); `None`: a person's mail.
    pub triage: Option<&'a Triage>,
    /// The loop breaker's rate rule (`[classify]`); `None`: none.
    pub sender_rate: Option<SenderRate>,
    /// SHA-256 of `raw` when the caller has computed it already (hashing a large message
    /// again costs a pass over its bytes); computed here when `None`.
    pub sha256: Option<[u8; 32]>,
}

/// What [`insert_message`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored now, with this work item, in this class, starting or continuing a conversation;
    /// `loop_trip` says why the loop breaker made it `loop`.
    New {
        work_item_id: i64,
        class: MailClass,
        threaded: Threaded,
        loop_trip: Option<LoopTrip>,
    },
    /// This `(pilot, key)` was already stored (an earlier poll, or a concurrent poller);
    /// nothing was written. What is stored, so the caller can tell the same message from a
    /// different one under a reused UIDL.
    Existing(StoredCopy),
}

impl Inserted {
    /// The new work item, if one was created.
    pub fn work_item(&self) -> Option<i64> {
        match self {
            Inserted::New { work_item_id, .. } => Some(*work_item_id),
            Inserted::Existing(_) => None,
        }
    }
}

/// The stored copy of a message, as far as identity checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredCopy {
    /// SHA-256 of the stored bytes (the header section only when `headers_only`).
    pub sha256: [u8; 32],
    /// Its identity, when known (`None` for rows older than identities, and for messages whose
    /// header section names nothing).
    pub identity: Option<[u8; 32]>,
    pub headers_only: bool,
}

impl StoredCopy {
    /// Whether downloaded bytes `raw` with identity `identity` are this stored message: the same
    /// bytes, or the same identity (a server that renders MIME on download may change the bytes
    /// of one message, never its identity fields).
    pub fn matches(&self, sha256: &[u8; 32], identity: Option<&[u8; 32]>) -> bool {
        self.sha256 == *sha256 || (identity.is_some() && self.identity.as_ref() == identity)
    }
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
            .field("identity", &self.identity.map(hex::encode))
            .finish_non_exhaustive()
    }
}

/// PostgreSQL `text` and `jsonb` cannot hold U+0000; mail can. The model's one rule
/// ([`crate::model::text`]) again, for values not built by the parser.
fn pg_text(text: &str) -> Cow<'_, str> {
    crate::model::text::nul_free(text)
}

fn pg_opt(text: &Option<String>) -> Option<String> {
    text.as_deref().map(|t| pg_text(t).into_owned())
}

/// Keeps at most `max` bytes of `text` (on a character boundary), NUL replaced; notes in
/// `cut` when anything was dropped. The replacement comes first: U+FFFD takes three bytes
/// where NUL took one, so cutting first could store three times the cap, over the schema's
/// limits, and refuse the whole message.
fn capped(text: &str, max: usize, cut: &mut bool) -> String {
    let text = pg_text(text);
    let mut end = text.len();
    if end > max {
        *cut = true;
        end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
    }
    text[..end].to_owned()
}

/// The parser's defects as the `messages.defects` column keeps them (see [`header_limits`]).
fn stored_defects(defects: &[String]) -> Vec<String> {
    let mut cut = false;
    defects
        .iter()
        .take(header_limits::DEFECTS)
        .map(|d| capped(d, header_limits::DEFECT_BYTES, &mut cut))
        .collect()
}

fn capped_opt(text: &Option<String>, max: usize, cut: &mut bool) -> Option<String> {
    text.as_deref().map(|t| capped(t, max, cut))
}

/// At most `max` ids, each capped; for `References` the first and the newest are kept, since
/// threading looks for the root and the latest replies.
fn capped_ids(
    ids: &[String],
    max: usize,
    keep_first_and_last: bool,
    cut: &mut bool,
) -> Vec<String> {
    let picked: Vec<&String> = if ids.len() <= max {
        ids.iter().collect()
    } else {
        *cut = true;
        if keep_first_and_last && max > 1 {
            ids[..1]
                .iter()
                .chain(&ids[ids.len() - (max - 1)..])
                .collect()
        } else {
            ids[..max].iter().collect()
        }
    };
    picked
        .into_iter()
        .map(|id| capped(id, header_limits::ID_BYTES, cut))
        .collect()
}

fn pg_addresses(addresses: &[Address], cut: &mut bool) -> Json<Vec<Address>> {
    if addresses.len() > header_limits::ADDRESSES {
        *cut = true;
    }
    Json(
        addresses
            .iter()
            .take(header_limits::ADDRESSES)
            .map(|a| Address {
                name: capped_opt(&a.name, header_limits::ADDRESS_PART_BYTES, cut),
                email: capped_opt(&a.email, header_limits::ADDRESS_PART_BYTES, cut),
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
/// failures of that key. Returns [`Inserted::New`] with the work item, or
/// [`Inserted::Existing`] when this `(pilot, uidl)` is already stored, in which case nothing at
/// all is written and the stored copy is described so the caller can compare.
///
/// Messages whose UIDL the poller does not trust are stored under a derived key (`~ <hex>`) and
/// known by their identity: such a message is also `Existing` when its identity is stored under
/// any key, and a message with a trusted UIDL is `Existing` when its identity is stored under a
/// derived key. (Two copies with trusted UIDLs and the same identity are two work items, as
/// when someone moves a handled message back into the inbox.)
///
/// Header values longer than [`header_limits`] are cut (the work item is flagged
/// [`FLAG_HEADER_TRUNCATED`]); the raw bytes are stored whole.
///
/// Call it inside the caller's transaction and `DELE` only after that transaction commits.
pub async fn insert_message(
    conn: &mut PgConnection,
    message: &NewMessage<'_>,
) -> Result<Inserted, StoreError> {
    let mut cut = false;
    let columns = MessageColumns::of(message, &mut cut)?;
    // Why first: the row is written with its conversation and class; deciding them only reads.
    let placement = conversations::place(
        conn,
        &Facts {
            pilot_id: message.pilot_id,
            parsed: message.parsed,
            sha256: &columns.sha256,
            identity: message.identity.as_ref(),
            triage: message.triage,
            sender_rate: message.sender_rate,
            stored_row: None,
        },
    )
    .await?;
    // The work item's flags are known before anything is written: the attachments' values
    // are capped by the same rule when they are inserted below.
    let attachments_cut = would_cut_attachments(message.parsed);
    let mut flags = work_item_flags(message, cut || attachments_cut);
    if placement.action == Action::RouteFlagged {
        flags.push(Flag::Automatic.as_str().to_owned());
    }
    // Held mail is stored and counted like any other, and never offered (`held_reason`
    // names its class so a supervisor sees why).
    let held = (placement.action == Action::Hold).then(|| placement.class().as_str());
    // One statement writes the row, its conversation's side (a new conversation, or the
    // continued one's last message, count and participants), its work item (and the event of
    // a held one) and forgets the key's fetch failures, so a message that turns out to be
    // stored already writes none of them. The pilot's own mailbox is never a participant.
    let rows: Option<Vec<i64>> = columns
        .bind(sqlx::query_scalar(
            "with m as (insert into messages (pilot_id, uidl, raw, sha256, message_id, subject, \
             from_addrs, to_addrs, cc_addrs, reply_to_addrs, sent_at, in_reply_to, \"references\", \
             text_body, html_body, parse_error, size, headers_only, html_sanitized, identity, \
             defects, conversation_id, thread_rule, thread_evidence, class, class_evidence) \
             select $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21, $22, $23, $24, $25, $26 \
             where not exists (select 1 from messages where pilot_id = $1 and identity = $20 \
                               and ($2 like '~ %' or uidl like '~ %')) \
             on conflict (pilot_id, uidl) do nothing returning id), \
             own as (select lower(mailbox) as mailbox from pilots where id = $1), \
             created as (insert into conversations (id, pilot_id, queue, subject_key, subject, \
                 participants, thread_index, first_message_id, last_message_id) \
                 select $22, $1, $28, $29, left($6, 300), \
                     array(select p from unnest($30::text[]) p where p <> (select mailbox from own) limit 100), \
                     $31, m.id, m.id from m where $27), \
             continued as (update conversations c set last_message_id = greatest(c.last_message_id, m.id), \
                 message_count = c.message_count + 1, updated_at = now(), \
                 thread_index = coalesce(c.thread_index, $31), \
                 participants = array(select p from (select distinct p from unnest(c.participants || $30::text[]) p) d \
                     where p <> (select mailbox from own) order by p limit 100) \
                 from m where c.id = $22 and not $27), \
             w as (insert into work_items (message_id, queue, flags, status, held_reason) \
                 select m.id, $28, $32, $33, $34 from m returning id), \
             e as (insert into work_item_events (work_item_id, actor, action, to_status, reason) \
                 select id, 'system', 'held', 'held', $35 from w where $34::text is not null), \
             f as (delete from fetch_failures where pilot_id = $1 and uidl = $2 \
                 and exists (select 1 from m)) \
             select array[m.id, w.id] from m, w",
        ))
        .bind(placement.conversation_id)
        .bind(placement.rule.as_str())
        .bind(Json(&placement.thread_evidence))
        .bind(placement.class().as_str())
        .bind(Json(&placement.classification))
        .bind(placement.threaded == Threaded::Created)
        .bind(message.queue)
        .bind(placement.subject_key())
        .bind(placement.participants())
        .bind(placement.thread_index())
        .bind(&flags)
        .bind(if held.is_some() { "held" } else { "queued" })
        .bind(held)
        .bind(format!(
            "class {} by rule {}: the pilot's policy holds it",
            placement.class(),
            placement.classification.rule
        ))
        .fetch_optional(&mut *conn)
        .await
        .map_err(|err| unknown_pilot(err, message.pilot_id))?;
    let Some(&[message_row, work_item_id]) = rows.as_deref() else {
        // Already stored by an earlier poll or a concurrent poller: nothing else to write.
        let mut stored = stored_copy(conn, message.pilot_id, message.uidl).await?;
        if stored.is_none()
            && let Some(identity) = &message.identity
        {
            stored = stored_copy_by_identity(conn, message.pilot_id, identity).await?;
        }
        return Ok(Inserted::Existing(stored.ok_or_else(|| {
            StoreError::UnexpectedValue {
                column: "messages.uidl",
                value: "a conflicting row that cannot be read back".to_owned(),
            }
        })?));
    };
    insert_attachments(
        conn,
        message_row,
        message.raw.len(),
        message.parsed,
        &mut cut,
    )
    .await?;
    Ok(Inserted::New {
        work_item_id,
        class: placement.class(),
        threaded: placement.threaded,
        loop_trip: placement.loop_trip,
    })
}

/// Completes a message stored as headers only (flagged `fetch_failed`) with the whole message,
/// downloaded at last: the message row gets the bytes and what was parsed from them, the
/// attachments are stored, and its work item, kept as it is (state, queue, place), loses the
/// `fetch_failed` flag and gains the parser's. No second work item is made. Returns the work
/// item, or `None` when there is no such headers-only message (completed already, or never
/// stored that way) or when the download is not that message: nothing of it is written then,
/// and the row's next refetch waits the interval again.
///
/// The download completes the row only when it is the same message: the same identity, or
/// (for a header section that names nothing) starting with the stored header bytes. A server
/// that lists other mail under the stored UIDL cannot overwrite the stored row, and that mail
/// is not deleted for it.
///
/// Call it inside the caller's transaction and `DELE` only after that transaction commits.
pub async fn complete_message(
    conn: &mut PgConnection,
    message: &NewMessage<'_>,
) -> Result<Option<i64>, StoreError> {
    let mut cut = false;
    let columns = MessageColumns::of(message, &mut cut)?;
    let message_row: Option<i64> = columns
        .bind(sqlx::query_scalar(
            "update messages set raw = $3, sha256 = $4, message_id = $5, subject = $6, \
             from_addrs = $7, to_addrs = $8, cc_addrs = $9, reply_to_addrs = $10, sent_at = $11, \
             in_reply_to = $12, \"references\" = $13, text_body = $14, html_body = $15, \
             parse_error = $16, size = $17, headers_only = $18, html_sanitized = $19, \
             identity = coalesce($20, identity), defects = $21, refetch_attempted_at = null \
             where pilot_id = $1 and uidl = $2 and headers_only \
             and (identity = $20 or substring($3 from 1 for octet_length(raw)) = raw) \
             returning id",
        ))
        .fetch_optional(&mut *conn)
        .await?;
    let Some(message_row) = message_row else {
        record_refetch_failure(conn, message.pilot_id, message.uidl).await?;
        return Ok(None);
    };
    sqlx::query("delete from attachments where message_id = $1")
        .bind(message_row)
        .execute(&mut *conn)
        .await?;
    insert_attachments(
        conn,
        message_row,
        message.raw.len(),
        message.parsed,
        &mut cut,
    )
    .await?;
    let flags = work_item_flags(message, cut);
    let work_item_id: i64 = sqlx::query_scalar(
        "update work_items set flags = array(select distinct f from unnest(flags || $2) f \
         where f <> $3 order by f) where message_id = $1 returning id",
    )
    .bind(message_row)
    .bind(&flags)
    .bind(Flag::FetchFailed.as_str())
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("delete from fetch_failures where pilot_id = $1 and uidl = $2")
        .bind(message.pilot_id)
        .bind(message.uidl)
        .execute(&mut *conn)
        .await?;
    Ok(Some(work_item_id))
}

/// The values of a `messages` row, capped to the schema's limits, in the order
/// `$1`…`$21` of [`insert_message`] and [`complete_message`].
struct MessageColumns<'a> {
    message: &'a NewMessage<'a>,
    size: i64,
    sha256: [u8; 32],
    message_id: Option<String>,
    subject: Option<String>,
    from: Json<Vec<Address>>,
    to: Json<Vec<Address>>,
    cc: Json<Vec<Address>>,
    reply_to: Json<Vec<Address>>,
    in_reply_to: Vec<String>,
    references: Vec<String>,
}

impl<'a> MessageColumns<'a> {
    fn of(message: &'a NewMessage<'a>, cut: &mut bool) -> Result<Self, StoreError> {
        let parsed = message.parsed;
        Ok(MessageColumns {
            message,
            size: i64::try_from(message.raw.len())
                .map_err(|_| too_large("raw", message.raw.len()))?,
            sha256: message
                .sha256
                .unwrap_or_else(|| Sha256::digest(message.raw).into()),
            message_id: capped_opt(&parsed.message_id, header_limits::ID_BYTES, cut),
            subject: capped_opt(&parsed.subject, header_limits::SUBJECT_BYTES, cut),
            from: pg_addresses(&parsed.from, cut),
            to: pg_addresses(&parsed.to, cut),
            cc: pg_addresses(&parsed.cc, cut),
            reply_to: pg_addresses(&parsed.reply_to, cut),
            in_reply_to: capped_ids(
                &parsed.in_reply_to,
                header_limits::IN_REPLY_TO_IDS,
                false,
                cut,
            ),
            references: capped_ids(&parsed.references, header_limits::REFERENCES_IDS, true, cut),
        })
    }

    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        let (message, parsed) = (self.message, self.message.parsed);
        query
            .bind(message.pilot_id)
            .bind(message.uidl)
            .bind(message.raw)
            .bind(&self.sha256[..])
            .bind(self.message_id.as_deref())
            .bind(self.subject.as_deref())
            .bind(&self.from)
            .bind(&self.to)
            .bind(&self.cc)
            .bind(&self.reply_to)
            .bind(parsed.date)
            .bind(&self.in_reply_to)
            .bind(&self.references)
            .bind(pg_opt(&parsed.text_body))
            .bind(pg_opt(&parsed.html_body))
            .bind(pg_opt(&parsed.parse_error))
            .bind(self.size)
            .bind(message.headers_only)
            .bind(pg_opt(&parsed.html_sanitized))
            .bind(message.identity.as_ref().map(|i| &i[..]))
            .bind(stored_defects(&parsed.defects))
    }
}

/// Whether storing `parsed`'s attachments cuts any of their values (what
/// [`insert_attachments`] will find), so the work item's flags can be written first.
fn would_cut_attachments(parsed: &ParsedMail) -> bool {
    let mut cut = false;
    for attachment in &parsed.attachments {
        let _ = capped_opt(
            &attachment.filename,
            header_limits::ATTACHMENT_FIELD_BYTES,
            &mut cut,
        );
        let _ = capped(
            &attachment.content_type,
            header_limits::ATTACHMENT_FIELD_BYTES,
            &mut cut,
        );
        let _ = capped_opt(
            &attachment.content_id,
            header_limits::ATTACHMENT_FIELD_BYTES,
            &mut cut,
        );
    }
    cut
}

/// All attachments of a message in one statement (one round trip however many there are):
/// parallel arrays, one element per attachment, unnested into rows.
async fn insert_attachments(
    conn: &mut PgConnection,
    message_row: i64,
    message_raw_len: usize,
    parsed: &ParsedMail,
    cut: &mut bool,
) -> Result<(), StoreError> {
    let attachments = &parsed.attachments;
    if attachments.is_empty() {
        return Ok(());
    }
    let n = attachments.len();
    let (mut ordinals, mut filenames, mut content_types, mut sizes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut content_ids, mut inlines, mut bytes) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut starts, mut ends) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (index, attachment) in attachments.iter().enumerate() {
        ordinals.push(i32::try_from(index).map_err(|_| too_large("attachment count", index))?);
        sizes.push(
            i64::try_from(attachment.bytes.len())
                .map_err(|_| too_large("attachment", attachment.bytes.len()))?,
        );
        filenames.push(capped_opt(
            &attachment.filename,
            header_limits::ATTACHMENT_FIELD_BYTES,
            cut,
        ));
        content_types.push(capped(
            &attachment.content_type,
            header_limits::ATTACHMENT_FIELD_BYTES,
            cut,
        ));
        content_ids.push(capped_opt(
            &attachment.content_id,
            header_limits::ATTACHMENT_FIELD_BYTES,
            cut,
        ));
        inlines.push(attachment.inline);
        // Written once: a base64 attachment the parser found verbatim in the raw message is
        // read back from there (`attachment_bytes`).
        match attachment.raw_range {
            Some((start, end)) if end as usize <= message_raw_len => {
                bytes.push(None);
                starts.push(Some(i64::from(start)));
                ends.push(Some(i64::from(end)));
            }
            _ => {
                bytes.push(Some(attachment.bytes.as_slice()));
                starts.push(None);
                ends.push(None);
            }
        }
    }
    sqlx::query(
        "insert into attachments (message_id, ordinal, filename, content_type, size, \
         content_id, inline, bytes, raw_start, raw_end) \
         select $1, a.ordinal, a.filename, a.content_type, a.size, a.content_id, a.inline, \
         a.bytes, a.raw_start, a.raw_end \
         from unnest($2::int4[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::bool[], \
         $8::bytea[], $9::int8[], $10::int8[]) \
         as a(ordinal, filename, content_type, size, content_id, inline, bytes, raw_start, raw_end)",
    )
    .bind(message_row)
    .bind(&ordinals)
    .bind(&filenames)
    .bind(&content_types)
    .bind(&sizes)
    .bind(&content_ids)
    .bind(&inlines)
    .bind(&bytes)
    .bind(&starts)
    .bind(&ends)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The bytes of a stored attachment from its row: `bytes` when it has them, else the decoded
/// `encoded` range of the raw message (see [`ATTACHMENT_RANGE_SQL`]). A range that does not
/// decode (the row was edited by hand) is an error naming the attachment, never wrong bytes
/// served silently.
pub(super) fn attachment_bytes(
    bytes: Option<Vec<u8>>,
    encoded: Option<Vec<u8>>,
) -> Result<Vec<u8>, StoreError> {
    match (bytes, encoded) {
        (Some(bytes), _) => Ok(bytes),
        (None, Some(encoded)) => mail_parser::decoders::base64::base64_decode(&encoded).ok_or(
            StoreError::UnexpectedValue {
                column: "attachments.raw_start",
                value: "a range of the raw message that is not base64".to_owned(),
            },
        ),
        (None, None) => Err(StoreError::UnexpectedValue {
            column: "attachments.bytes",
            value: "null without a range of the raw message".to_owned(),
        }),
    }
}

/// The SQL expression for an attachment's encoded range (`a` the attachment, `m` its
/// message), null when it has its own bytes; read with [`attachment_bytes`].
pub(super) const ATTACHMENT_RANGE_SQL: &str = "case when a.bytes is null then \
     substring(m.raw from (a.raw_start + 1)::int for (a.raw_end - a.raw_start)::int) end";

/// The work item's flags: the caller's, `parse_error` when parsing failed, the parser's own,
/// and `header_truncated` when a value was cut; each once.
fn work_item_flags(message: &NewMessage<'_>, cut: bool) -> Vec<String> {
    let parsed = message.parsed;
    let mut flags: Vec<String> = Vec::with_capacity(message.flags.len() + 2);
    let parse_flag = parsed.parse_error.is_some().then_some(FLAG_PARSE_ERROR);
    let cut_flag = cut.then_some(FLAG_HEADER_TRUNCATED);
    for flag in message
        .flags
        .iter()
        .copied()
        .chain(parse_flag)
        .chain(parsed.flags.iter().copied())
        .chain(cut_flag)
    {
        if !flags.iter().any(|f| *f == flag) {
            flags.push(flag.as_str().to_owned());
        }
    }
    flags
}

/// The stored copy under `(pilot, key)`, if any.
pub async fn stored_copy(
    conn: &mut PgConnection,
    pilot_id: i64,
    key: &str,
) -> Result<Option<StoredCopy>, StoreError> {
    let row: Option<(Vec<u8>, Option<Vec<u8>>, bool)> = sqlx::query_as(
        "select sha256, identity, headers_only from messages where pilot_id = $1 and uidl = $2",
    )
    .bind(pilot_id)
    .bind(key)
    .fetch_optional(conn)
    .await?;
    row.map(|(sha256, identity, headers_only)| {
        Ok(StoredCopy {
            sha256: digest(sha256, "messages.sha256")?,
            identity: identity
                .map(|i| digest(i, "messages.identity"))
                .transpose()?,
            headers_only,
        })
    })
    .transpose()
}

/// A stored copy with this identity, of this pilot, preferring whole copies.
async fn stored_copy_by_identity(
    conn: &mut PgConnection,
    pilot_id: i64,
    identity: &[u8; 32],
) -> Result<Option<StoredCopy>, StoreError> {
    let row: Option<(Vec<u8>, bool)> = sqlx::query_as(
        "select sha256, headers_only from messages where pilot_id = $1 and identity = $2 \
         order by headers_only, id limit 1",
    )
    .bind(pilot_id)
    .bind(&identity[..])
    .fetch_optional(conn)
    .await?;
    row.map(|(sha256, headers_only)| {
        Ok(StoredCopy {
            sha256: digest(sha256, "messages.sha256")?,
            identity: Some(*identity),
            headers_only,
        })
    })
    .transpose()
}

fn digest(bytes: Vec<u8>, column: &'static str) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| StoreError::UnexpectedValue {
        column,
        value: format!("{} bytes", bytes.len()),
    })
}

/// Which of these identities this pilot has stored, under any key, and whether that copy holds
/// only the headers. Serves the messages whose UIDL cannot be trusted: they are known by their
/// identity instead.
pub async fn stored_identities(
    conn: &mut PgConnection,
    pilot_id: i64,
    identities: &[[u8; 32]],
) -> Result<HashMap<[u8; 32], bool>, StoreError> {
    let wanted: Vec<&[u8]> = identities.iter().map(|i| &i[..]).collect();
    let rows: Vec<(Vec<u8>, bool)> = sqlx::query_as(
        "select identity, bool_and(headers_only) from messages \
         where pilot_id = $1 and identity = any($2) group by identity",
    )
    .bind(pilot_id)
    .bind(&wanted)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(identity, headers_only)| Ok((digest(identity, "messages.identity")?, headers_only)))
        .collect()
}

/// The first `max_bytes` of a stored message (its header section, in practice), to compute
/// the identity of rows stored before identities were recorded.
pub async fn stored_head(
    conn: &mut PgConnection,
    pilot_id: i64,
    key: &str,
    max_bytes: usize,
) -> Result<Option<Vec<u8>>, StoreError> {
    let max = i32::try_from(max_bytes).unwrap_or(i32::MAX);
    Ok(sqlx::query_scalar(
        "select substring(raw from 1 for $3) from messages where pilot_id = $1 and uidl = $2",
    )
    .bind(pilot_id)
    .bind(key)
    .bind(max)
    .fetch_optional(conn)
    .await?)
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
    let failing: Vec<(String, i32, i32, bool)> = sqlx::query_as(
        "select uidl, attempts, connection_failures, too_large from fetch_failures \
         where pilot_id = $1 and uidl = any($2)",
    )
    .bind(pilot_id)
    .bind(uidls)
    .fetch_all(&mut *conn)
    .await?;
    /// uidl, sha256, identity, headers_only, deleted
    type Row = (String, Vec<u8>, Option<Vec<u8>>, bool, bool);
    let stored: Vec<Row> = sqlx::query_as(
        "select uidl, sha256, identity, headers_only, deleted_from_server_at is not null \
         from messages where pilot_id = $1 and uidl = any($2)",
    )
    .bind(pilot_id)
    .bind(uidls)
    .fetch_all(&mut *conn)
    .await?;
    let mut known = HashMap::with_capacity(failing.len() + stored.len());
    for (uidl, attempts, connection_failures, too_large) in failing {
        let count = |column, value: i32| {
            u32::try_from(value).map_err(|_| StoreError::UnexpectedValue {
                column,
                value: value.to_string(),
            })
        };
        known.insert(
            uidl,
            KnownUidl::Failing {
                attempts: count("fetch_failures.attempts", attempts)?,
                connection_failures: count(
                    "fetch_failures.connection_failures",
                    connection_failures,
                )?,
                too_large,
            },
        );
    }
    // A stored message wins over a failure record of the same UIDL.
    for (uidl, sha256, identity, headers_only, deleted) in stored {
        let copy = StoredCopy {
            sha256: digest(sha256, "messages.sha256")?,
            identity: identity
                .map(|i| digest(i, "messages.identity"))
                .transpose()?,
            headers_only,
        };
        known.insert(uidl, KnownUidl::Stored { copy, deleted });
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
/// unmarked, and so do messages stored under a derived key (they are never listed by UIDL).
/// Returns how many were marked.
pub async fn mark_vanished(
    conn: &mut PgConnection,
    pilot_id: i64,
    present: &[String],
) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "update messages set deleted_from_server_at = now() \
         where pilot_id = $1 and deleted_from_server_at is null and not headers_only \
         and uidl <> all($2) and uidl not like '~ %'",
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
    note_failure(conn, pilot_id, uidl, error, Failure::HeldAgainstIt).await
}

/// Which counter of `fetch_failures` a failed download adds to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// `attempts`: held against the message.
    HeldAgainstIt,
    /// `connection_failures`: the connection broke, not held against it.
    Connection,
    /// `attempts`, and `too_large` set: it ran far past the size limit.
    TooLarge,
}

/// Adds one failure of `kind` to `uidl`'s row (made if needed) and returns its `attempts`.
async fn note_failure(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
    error: &str,
    kind: Failure,
) -> Result<u32, StoreError> {
    let held = i32::from(kind != Failure::Connection);
    let attempts: i32 = sqlx::query_scalar(
        "insert into fetch_failures \
         (pilot_id, uidl, last_error, attempts, connection_failures, too_large) \
         values ($1, $2, $3, $4, 1 - $4, $5) \
         on conflict (pilot_id, uidl) do update \
         set attempts = fetch_failures.attempts + $4, \
         connection_failures = fetch_failures.connection_failures + 1 - $4, \
         too_large = fetch_failures.too_large or $5, \
         last_error = excluded.last_error, last_failed_at = now() \
         returning attempts",
    )
    .bind(pilot_id)
    .bind(uidl)
    .bind(pg_text(error).as_ref())
    .bind(held)
    .bind(kind == Failure::TooLarge)
    .fetch_one(conn)
    .await
    .map_err(|err| unknown_pilot(err, pilot_id))?;
    u32::try_from(attempts).map_err(|_| StoreError::UnexpectedValue {
        column: "fetch_failures.attempts",
        value: attempts.to_string(),
    })
}

/// Records that the connection broke while `uidl` was downloading (reset, timeout, TLS
/// error) in a way not held against the message: it does not count toward giving up, it is
/// only noted, so the next polls fetch it after the rest of the mailbox.
pub async fn record_connection_failure(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
    error: &str,
) -> Result<(), StoreError> {
    note_failure(conn, pilot_id, uidl, error, Failure::Connection).await?;
    Ok(())
}

/// Of these stored UIDLs, the headers-only messages flagged `fetch_failed` that are due to be
/// downloaded again: not tried for `after` (since they were stored, or since the last try).
pub async fn refetch_due(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidls: &[String],
    after: std::time::Duration,
) -> Result<HashSet<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "select m.uidl from messages m join work_items w on w.message_id = m.id \
         where m.pilot_id = $1 and m.uidl = any($2) and m.headers_only \
         and $3 = any(w.flags) \
         and coalesce(m.refetch_attempted_at, m.fetched_at) <= now() - make_interval(secs => $4)",
    )
    .bind(pilot_id)
    .bind(uidls)
    .bind(Flag::FetchFailed.as_str())
    .bind(after.as_secs_f64())
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(uidl,)| uidl).collect())
}

/// Notes that a headers-only message was tried again and still could not be downloaded: the
/// next try waits the refetch interval again.
pub async fn record_refetch_failure(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "update messages set refetch_attempted_at = now() where pilot_id = $1 and uidl = $2",
    )
    .bind(pilot_id)
    .bind(uidl)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records that a download of `uidl` ran far past the size limit (the connection had to be
/// dropped): the next poll stores its headers instead of downloading it again.
pub async fn record_too_large(
    conn: &mut PgConnection,
    pilot_id: i64,
    uidl: &str,
    error: &str,
) -> Result<(), StoreError> {
    note_failure(conn, pilot_id, uidl, error, Failure::TooLarge).await?;
    Ok(())
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
