//! Work items without a mailbox: a pilot row and messages inserted in bulk, for the
//! lifecycle and API tests. Items of one call enter their queue one millisecond apart, in
//! id order, so claim order is known.

use ccmail::store::Db;

/// Creates a USER/PASS pilot feeding `queue` (no worker polls it) and returns its id.
pub async fn pilot(db: &Db, queue: &str) -> i64 {
    sqlx::query_scalar(
        "insert into pilots (queue, mailbox, host, port, tls, auth, username, password_credential) \
         values ($1, $1 || '@example.test', '127.0.0.1', 995, 'implicit', 'user_pass', $1, 'env:UNUSED') \
         returning id",
    )
    .bind(queue)
    .fetch_one(db.pool())
    .await
    .unwrap()
}

/// Stores `n` messages of `pilot` with a queued work item each in `queue`; their ids in
/// claim order. `subject_prefix` names them.
pub async fn items(db: &Db, pilot: i64, queue: &str, n: i64) -> Vec<i64> {
    let tag = format!("{:016x}", fastrand::u64(..));
    sqlx::query_scalar(
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
    .await
    .unwrap()
}

/// Makes item `id`'s offer or lease expire now (as if its time had passed).
pub async fn expire(db: &Db, id: i64) {
    let done = sqlx::query(
        "update work_items set offer_expires_at = case when status = 'offered' \
             then now() - interval '1 second' end, \
         lease_expires_at = case when status = 'accepted' then now() - interval '1 second' end \
         where id = $1 and status in ('offered', 'accepted')",
    )
    .bind(id)
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(
        done.rows_affected(),
        1,
        "item {id} is neither offered nor accepted"
    );
}

/// Item `id`'s status, agent and claim token as the database has them.
pub async fn row(db: &Db, id: i64) -> (String, Option<String>, Option<String>) {
    sqlx::query_as("select status, agent, claim_token from work_items where id = $1")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// Item `id`'s event actions, oldest first.
pub async fn actions(db: &Db, id: i64) -> Vec<String> {
    sqlx::query_scalar("select action from work_item_events where work_item_id = $1 order by id")
        .bind(id)
        .fetch_all(db.pool())
        .await
        .unwrap()
}
