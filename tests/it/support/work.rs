//! Work items without a mailbox (the lab's `workload`, unwrapped for tests) and reads of
//! an item's row and events.

use ccmail::store::Db;

/// Creates a USER/PASS pilot feeding `queue` (no worker polls it) and returns its id.
pub async fn pilot(db: &Db, queue: &str) -> i64 {
    ccmail_lab::workload::pilot(db, queue).await.unwrap()
}

/// Stores `n` messages of `pilot` with a queued work item each in `queue`; their ids in
/// claim order.
pub async fn items(db: &Db, pilot: i64, queue: &str, n: i64) -> Vec<i64> {
    ccmail_lab::workload::items(db, pilot, queue, n)
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
