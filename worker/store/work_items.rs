//! Read-only views of the work-item queues, for metrics, the CLI and the demo.
//!
//! Invariant: nothing here writes; every query is served by an index or a small aggregate
//! (`work_items_queued_idx` covers the "oldest queued item per queue" question).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use sqlx::types::Json;

use super::error::StoreError;
use super::words;
use crate::model::{Address, Flag, WorkItemStatus};

/// Number of work items of one queue in one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCount {
    pub queue: String,
    pub status: WorkItemStatus,
    pub count: i64,
}

/// A work item with the message fields an overview shows.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItemView {
    pub id: i64,
    pub queue: String,
    pub status: WorkItemStatus,
    pub flags: Vec<Flag>,
    pub subject: Option<String>,
    pub from: Vec<Address>,
    pub enqueued_at: DateTime<Utc>,
    /// Number of attachments (inline parts included).
    pub attachments: i64,
    /// Problems the parser recovered from (why the message may look odd); empty for clean
    /// mail and for messages stored before defects were kept.
    pub defects: Vec<String>,
}

#[derive(sqlx::FromRow)]
struct WorkItemRecord {
    id: i64,
    queue: String,
    status: String,
    flags: Vec<String>,
    subject: Option<String>,
    from_addrs: Json<Vec<Address>>,
    enqueued_at: DateTime<Utc>,
    attachments: i64,
    defects: Vec<String>,
}

/// Work items per queue and status, ordered by queue then status. Combinations with no
/// items are absent.
pub async fn queue_counts(conn: &mut PgConnection) -> Result<Vec<QueueCount>, StoreError> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "select queue, status, count(*) as count from work_items \
         group by queue, status order by queue, status",
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(queue, status, count)| {
            Ok(QueueCount {
                queue,
                status: words::status(&status)?,
                count,
            })
        })
        .collect()
}

/// The `limit` most recently enqueued work items, newest first.
pub async fn recent_work_items(
    conn: &mut PgConnection,
    limit: u32,
) -> Result<Vec<WorkItemView>, StoreError> {
    let records: Vec<WorkItemRecord> = sqlx::query_as(
        "select w.id, w.queue, w.status, w.flags, m.subject, m.from_addrs, w.enqueued_at, \
         (select count(*) from attachments a where a.message_id = m.id) as attachments, \
         m.defects \
         from work_items w join messages m on m.id = w.message_id \
         order by w.enqueued_at desc, w.id desc limit $1",
    )
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await?;
    records
        .into_iter()
        .map(|r| {
            Ok(WorkItemView {
                id: r.id,
                queue: r.queue,
                status: words::status(&r.status)?,
                flags: r
                    .flags
                    .iter()
                    .map(|w| words::flag(w))
                    .collect::<Result<_, _>>()?,
                subject: r.subject,
                from: r.from_addrs.0,
                enqueued_at: r.enqueued_at,
                attachments: r.attachments,
                defects: r.defects,
            })
        })
        .collect()
}

/// For each queue with queued work items, how long its oldest queued item has waited,
/// ordered by queue. Measured against the database clock, so replicas agree.
pub async fn oldest_queued_age(
    conn: &mut PgConnection,
) -> Result<Vec<(String, Duration)>, StoreError> {
    let rows: Vec<(String, f64)> = sqlx::query_as(
        "select queue, greatest(extract(epoch from clock_timestamp() - min(enqueued_at)), 0)::float8 \
         from work_items where status = 'queued' group by queue order by queue",
    )
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(queue, secs)| {
            let age =
                Duration::try_from_secs_f64(secs).map_err(|_| StoreError::UnexpectedValue {
                    column: "work_items.enqueued_at",
                    value: format!("age of {secs} seconds"),
                })?;
            Ok((queue, age))
        })
        .collect()
}

/// A work item's life fields, as a claim, a step or a view shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItemState {
    pub id: i64,
    pub queue: String,
    pub status: WorkItemStatus,
    pub priority: i16,
    pub flags: Vec<Flag>,
    /// Who holds it (offered, accepted).
    pub agent: Option<String>,
    pub offers: i32,
    pub enqueued_at: DateTime<Utc>,
    pub offer_expires_at: Option<DateTime<Utc>>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub done_at: Option<DateTime<Utc>>,
    pub done_by: Option<String>,
    pub held_reason: Option<String>,
    pub cancel_reason: Option<String>,
}

/// One attachment as a listing shows it (not its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentInfo {
    /// Position in the message, from 0; the attachment's address under its work item.
    pub ordinal: i32,
    pub filename: Option<String>,
    pub content_type: String,
    pub size: i64,
    pub inline: bool,
    pub content_id: Option<String>,
}

/// A work item with its whole message (not the raw bytes and not the attachments' bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItemDetail {
    pub state: WorkItemState,
    pub message_id: i64,
    /// The message's own `Message-ID`.
    pub internet_message_id: Option<String>,
    pub subject: Option<String>,
    pub from: Vec<Address>,
    pub to: Vec<Address>,
    pub cc: Vec<Address>,
    pub reply_to: Vec<Address>,
    pub sent_at: Option<DateTime<Utc>>,
    pub fetched_at: DateTime<Utc>,
    pub text: Option<String>,
    /// The sanitised HTML only: the sender's HTML as written is never handed out.
    pub html_sanitized: Option<String>,
    pub size: i64,
    pub headers_only: bool,
    pub parse_error: Option<String>,
    pub defects: Vec<String>,
    pub attachments: Vec<AttachmentInfo>,
}

#[derive(sqlx::FromRow)]
struct StateRecord {
    id: i64,
    queue: String,
    status: String,
    priority: i16,
    flags: Vec<String>,
    agent: Option<String>,
    offers: i32,
    enqueued_at: DateTime<Utc>,
    offer_expires_at: Option<DateTime<Utc>>,
    lease_expires_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    done_by: Option<String>,
    held_reason: Option<String>,
    cancel_reason: Option<String>,
}

impl StateRecord {
    fn into_state(self) -> Result<WorkItemState, StoreError> {
        Ok(WorkItemState {
            id: self.id,
            status: words::status(&self.status)?,
            flags: self
                .flags
                .iter()
                .map(|w| words::flag(w))
                .collect::<Result<_, _>>()?,
            queue: self.queue,
            priority: self.priority,
            agent: self.agent,
            offers: self.offers,
            enqueued_at: self.enqueued_at,
            offer_expires_at: self.offer_expires_at,
            lease_expires_at: self.lease_expires_at,
            done_at: self.done_at,
            done_by: self.done_by,
            held_reason: self.held_reason,
            cancel_reason: self.cancel_reason,
        })
    }
}

/// The `work_items` columns [`StateRecord`] reads, with the table aliased `w`.
macro_rules! state_columns {
    () => {
        "w.id, w.queue, w.status, w.priority, w.flags, w.agent, w.offers, w.enqueued_at, \
         w.offer_expires_at, w.lease_expires_at, w.done_at, w.done_by, w.held_reason, \
         w.cancel_reason"
    };
}

/// Work item `id`'s life fields.
pub async fn work_item_state(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<WorkItemState>, StoreError> {
    let row: Option<StateRecord> = sqlx::query_as(concat!(
        "select ",
        state_columns!(),
        " from work_items w where w.id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(StateRecord::into_state).transpose()
}

#[derive(sqlx::FromRow)]
struct DetailRecord {
    message_id: i64,
    internet_message_id: Option<String>,
    subject: Option<String>,
    from_addrs: Json<Vec<Address>>,
    to_addrs: Json<Vec<Address>>,
    cc_addrs: Json<Vec<Address>>,
    reply_to_addrs: Json<Vec<Address>>,
    sent_at: Option<DateTime<Utc>>,
    fetched_at: DateTime<Utc>,
    text_body: Option<String>,
    html_sanitized: Option<String>,
    size: i64,
    headers_only: bool,
    parse_error: Option<String>,
    defects: Vec<String>,
}

/// Work item `id` with its message and the list of its attachments.
pub async fn work_item_detail(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Option<WorkItemDetail>, StoreError> {
    let Some(state) = work_item_state(&mut *conn, id).await? else {
        return Ok(None);
    };
    let record: Option<DetailRecord> = sqlx::query_as(
        "select m.id as message_id, m.message_id as internet_message_id, m.subject, \
         m.from_addrs, m.to_addrs, m.cc_addrs, m.reply_to_addrs, m.sent_at, m.fetched_at, \
         m.text_body, m.html_sanitized, m.size, m.headers_only, m.parse_error, m.defects \
         from work_items w join messages m on m.id = w.message_id where w.id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = record else { return Ok(None) };
    let attachments: Vec<AttachmentRecord> = sqlx::query_as(
        "select ordinal, filename, content_type, size, inline, content_id from attachments \
         where message_id = $1 order by ordinal",
    )
    .bind(r.message_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Some(WorkItemDetail {
        state,
        message_id: r.message_id,
        internet_message_id: r.internet_message_id,
        subject: r.subject,
        from: r.from_addrs.0,
        to: r.to_addrs.0,
        cc: r.cc_addrs.0,
        reply_to: r.reply_to_addrs.0,
        sent_at: r.sent_at,
        fetched_at: r.fetched_at,
        text: r.text_body,
        html_sanitized: r.html_sanitized,
        size: r.size,
        headers_only: r.headers_only,
        parse_error: r.parse_error,
        defects: r.defects,
        attachments: attachments
            .into_iter()
            .map(AttachmentRecord::into_info)
            .collect(),
    }))
}

/// An attachment's bytes with what a download needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentContent {
    pub info: AttachmentInfo,
    pub bytes: Vec<u8>,
}

#[derive(sqlx::FromRow)]
struct AttachmentRecord {
    ordinal: i32,
    filename: Option<String>,
    content_type: String,
    size: i64,
    inline: bool,
    content_id: Option<String>,
}

impl AttachmentRecord {
    fn into_info(self) -> AttachmentInfo {
        AttachmentInfo {
            ordinal: self.ordinal,
            filename: self.filename,
            content_type: self.content_type,
            size: self.size,
            inline: self.inline,
            content_id: self.content_id,
        }
    }
}

/// Attachment `ordinal` of work item `id`'s message.
pub async fn attachment_content(
    conn: &mut PgConnection,
    id: i64,
    ordinal: i32,
) -> Result<Option<AttachmentContent>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        info: AttachmentRecord,
        bytes: Option<Vec<u8>>,
        encoded: Option<Vec<u8>>,
    }
    // An attachment stored as a range of the raw message (schema 13) is decoded from it.
    let row: Option<Row> = sqlx::query_as(&format!(
        "select a.ordinal, a.filename, a.content_type, a.size, a.inline, a.content_id, \
         a.bytes, {} as encoded from work_items w join attachments a on a.message_id = w.message_id \
         join messages m on m.id = a.message_id where w.id = $1 and a.ordinal = $2",
        super::messages::ATTACHMENT_RANGE_SQL
    ))
    .bind(id)
    .bind(ordinal)
    .fetch_optional(conn)
    .await?;
    row.map(|r| {
        Ok(AttachmentContent {
            info: r.info.into_info(),
            bytes: super::messages::attachment_bytes(r.bytes, r.encoded)?,
        })
    })
    .transpose()
}

/// The message of work item `id` exactly as downloaded (the `.eml`).
pub async fn raw_message(conn: &mut PgConnection, id: i64) -> Result<Option<Vec<u8>>, StoreError> {
    let raw: Option<Vec<u8>> = sqlx::query_scalar(
        "select m.raw from work_items w join messages m on m.id = w.message_id where w.id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    Ok(raw)
}

/// Which work items a listing shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkFilter {
    /// Only these queues (all when empty).
    pub queues: Vec<String>,
    pub status: Option<WorkItemStatus>,
    /// Only items with a smaller id (paging: pass the last id of the previous page).
    pub before_id: Option<i64>,
    pub limit: u32,
}

/// Work items matching `filter`, newest first, with the message fields an overview shows.
pub async fn list_work_items(
    conn: &mut PgConnection,
    filter: &WorkFilter,
) -> Result<Vec<(WorkItemState, WorkItemView)>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        #[sqlx(flatten)]
        state: StateRecord,
        subject: Option<String>,
        from_addrs: Json<Vec<Address>>,
        attachments: i64,
        defects: Vec<String>,
    }
    let rows: Vec<Row> = sqlx::query_as(concat!(
        "select ",
        state_columns!(),
        ", m.subject, m.from_addrs, m.defects, \
         (select count(*) from attachments a where a.message_id = m.id) as attachments \
         from work_items w join messages m on m.id = w.message_id \
         where (cardinality($1::text[]) = 0 or w.queue = any($1)) \
         and ($2::text is null or w.status = $2) and ($3::bigint is null or w.id < $3) \
         order by w.id desc limit $4"
    ))
    .bind(&filter.queues)
    .bind(filter.status.map(WorkItemStatus::as_str))
    .bind(filter.before_id)
    .bind(i64::from(filter.limit))
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let state = r.state.into_state()?;
            let view = WorkItemView {
                id: state.id,
                queue: state.queue.clone(),
                status: state.status,
                flags: state.flags.clone(),
                subject: r.subject,
                from: r.from_addrs.0,
                enqueued_at: state.enqueued_at,
                attachments: r.attachments,
                defects: r.defects,
            };
            Ok((state, view))
        })
        .collect()
}

/// A queue's counts by state and how long its oldest waiting item has waited.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSummary {
    pub queue: String,
    /// Items per state; states without items are absent.
    pub counts: Vec<(WorkItemStatus, i64)>,
    /// Seconds the oldest queued item has waited (database clock); none when nothing waits.
    pub oldest_waiting_secs: Option<f64>,
}

/// Every queue a pilot feeds or an item is in, with its counts, ordered by name.
pub async fn queue_summaries(conn: &mut PgConnection) -> Result<Vec<QueueSummary>, StoreError> {
    let names: Vec<String> = sqlx::query_scalar(
        "select queue from pilots union select distinct queue from work_items order by 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let counts = queue_counts(&mut *conn).await?;
    let oldest = oldest_queued_age(&mut *conn).await?;
    Ok(names
        .into_iter()
        .map(|queue| QueueSummary {
            counts: counts
                .iter()
                .filter(|c| c.queue == queue)
                .map(|c| (c.status, c.count))
                .collect(),
            oldest_waiting_secs: oldest
                .iter()
                .find(|(q, _)| *q == queue)
                .map(|(_, age)| age.as_secs_f64()),
            queue,
        })
        .collect())
}

/// Whether `queue` is a queue: a pilot feeds it (enabled or not) or an item is in it.
pub async fn queue_exists(conn: &mut PgConnection, queue: &str) -> Result<bool, StoreError> {
    let found: bool = sqlx::query_scalar(
        "select exists (select 1 from pilots where queue = $1) \
         or exists (select 1 from work_items where queue = $1)",
    )
    .bind(queue)
    .fetch_one(conn)
    .await?;
    Ok(found)
}

/// The claim token of item `id` while `agent` holds it (offered or accepted).
pub async fn claim_token_of(
    conn: &mut PgConnection,
    id: i64,
    agent: &str,
) -> Result<Option<String>, StoreError> {
    let token: Option<Option<String>> = sqlx::query_scalar(
        "select claim_token from work_items where id = $1 and agent = $2 \
         and status in ('offered', 'accepted')",
    )
    .bind(id)
    .bind(agent)
    .fetch_optional(conn)
    .await?;
    Ok(token.flatten())
}
