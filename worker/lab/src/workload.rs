//! Work items without a mailbox, for the lifecycle tests and the work bench: a pilot row and
//! messages inserted in bulk. Items of one call enter their queue one millisecond apart, in
//! id order, so claim order is known.

use ccmail::store::{Db, StoreError};

/// Creates a USER/PASS pilot feeding `queue` (no worker polls it) and returns its id.
pub async fn pilot(db: &Db, queue: &str) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "insert into pilots (queue, mailbox, host, port, tls, auth, username, password_credential) \
         values ($1, $1 || '@example.test', '127.0.0.1', 995, 'implicit', 'user_pass', $1, 'env:UNUSED') \
         returning id",
    )
    .bind(queue)
    .fetch_one(db.pool())
    .await?)
}

/// Stores `n` small messages of `pilot`, each with a queued work item in `queue`; their ids
/// in claim order.
pub async fn items(db: &Db, pilot: i64, queue: &str, n: i64) -> Result<Vec<i64>, StoreError> {
    let tag = format!("{:016x}", fastrand::u64(..));
    Ok(sqlx::query_scalar(
        "with m as ( \
             insert into messages (pilot_id, uidl, raw, sha256, size, subject, from_addrs) \
             select $1, $3 || '-' || i, convert_to('Subject: item ' || i || E'\\r\\n\\r\\nbody\\r\\n', 'UTF8'), \
                 sha256(convert_to($3 || i, 'UTF8')), 30, 'item ' || i, \
                 '[{\"name\": \"Customer\", \"email\": \"customer@example.test\"}]'::jsonb \
             from generate_series(1, $4) i returning id, size \
         ) \
         insert into work_items (message_id, queue, enqueued_at) \
         select id, $2, clock_timestamp() - make_interval(secs => 3600) \
             + make_interval(secs => (row_number() over (order by id))::float8 / 1000) \
         from m order by id returning id",
    )
    .bind(pilot)
    .bind(queue)
    .bind(&tag)
    .bind(n)
    .fetch_all(db.pool())
    .await?)
}
