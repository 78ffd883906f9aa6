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
