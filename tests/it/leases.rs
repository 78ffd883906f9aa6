//! Pilot leases and replica heartbeats on a real PostgreSQL: one live holder per pilot, the
//! fence rising on every takeover, a stale holder's renewal, release and fence check failing,
//! and a batch transaction that holds its fence keeping a takeover out until it ends.

use std::time::Duration;

use ccmail::store::StoreError;
use ccmail::store::leases::{self, ReplicaInfo};
use ccmail_lab::testdb::TestDb;

use crate::support::wait::wait_until;
use crate::support::work;

const TTL: Duration = Duration::from_secs(30);

async fn expire_lease(db: &TestDb, pilot: i64) {
    sqlx::query(
        "update pilot_leases set expires_at = now() - interval '1 second' where pilot_id = $1",
    )
    .bind(pilot)
    .execute(db.pool())
    .await
    .unwrap();
}

#[tokio::test]
async fn a_lease_changes_hands_only_after_it_expired_and_the_stale_holder_is_fenced_out() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    let mut conn = db.db().acquire().await.unwrap();
    let a = leases::acquire_lease(&mut conn, pilot, "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.fence, 1);
    assert!(
        leases::acquire_lease(&mut conn, pilot, "replica-b", TTL)
            .await
            .unwrap()
            .is_none(),
        "a live lease is not taken"
    );
    let again = leases::acquire_lease(&mut conn, pilot, "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.fence, 1,
        "keeping one's own lease does not raise the fence"
    );
    assert!(
        leases::renew_lease(&mut conn, &a, "replica-a", TTL)
            .await
            .unwrap()
            .is_some()
    );
    expire_lease(&db, pilot).await;
    assert!(
        leases::renew_lease(&mut conn, &a, "replica-a", TTL)
            .await
            .unwrap()
            .is_none(),
        "an expired lease is not renewed"
    );
    let b = leases::acquire_lease(&mut conn, pilot, "replica-b", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.fence, 2, "a takeover raises the fence");
    // Replica A wakes up: everything it tries with its old lease fails.
    assert!(
        leases::renew_lease(&mut conn, &a, "replica-a", TTL)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        !leases::release_lease(&mut conn, &a, "replica-a")
            .await
            .unwrap()
    );
    let mut tx = db.db().begin().await.unwrap();
    let fenced = leases::check_fence(&mut tx, &a, "replica-a")
        .await
        .unwrap_err();
    assert!(
        matches!(fenced, StoreError::Fenced { pilot: p } if p == pilot),
        "{fenced}"
    );
    assert!(
        fenced.to_string().contains("nothing is deleted"),
        "{fenced}"
    );
    tx.rollback().await.unwrap();
    // B releases: A (or anyone) can take it at once, with a higher fence.
    assert!(
        leases::release_lease(&mut conn, &b, "replica-b")
            .await
            .unwrap()
    );
    let a2 = leases::acquire_lease(&mut conn, pilot, "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a2.fence, 3);
    let holders = leases::lease_holders(&mut conn).await.unwrap();
    assert_eq!(holders.len(), 1);
    assert_eq!(
        (holders[0].holder.as_str(), holders[0].live),
        ("replica-a", true)
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_batch_holding_its_fence_keeps_a_takeover_waiting_until_it_commits() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    let mut conn = db.db().acquire().await.unwrap();
    let a = leases::acquire_lease(&mut conn, pilot, "replica-a", TTL)
        .await
        .unwrap()
        .unwrap();
    drop(conn);
    let mut batch = db.db().begin().await.unwrap();
    leases::check_fence(&mut batch, &a, "replica-a")
        .await
        .unwrap();
    // Another session tries to end the lease while the batch is open: it must wait.
    let pool = db.db().clone();
    let ender = tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(
            "update pilot_leases set expires_at = now() - interval '1 second' where pilot_id = $1",
        )
        .bind(pilot)
        .execute(&mut *conn)
        .await
        .unwrap();
    });
    wait_until(
        "the takeover to wait on the batch's lock",
        Duration::from_secs(20),
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where datname = current_database() \
                 and wait_event_type = 'Lock' and query like 'update pilot_leases%'",
            )
            .fetch_one(db.pool())
            .await?;
            Ok(waiting == 1)
        },
        String::new,
    )
    .await
    .unwrap();
    assert!(!ender.is_finished());
    batch.commit().await.unwrap();
    ender.await.unwrap();
    let mut conn = db.db().acquire().await.unwrap();
    let b = leases::acquire_lease(&mut conn, pilot, "replica-b", TTL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.fence, 2);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn replicas_alive_are_those_with_a_recent_heartbeat() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.db().acquire().await.unwrap();
    for id in ["r-1", "r-2", "r-3"] {
        leases::heartbeat_replica(
            &mut conn,
            &ReplicaInfo {
                id,
                hostname: "host",
                pid: 1,
                version: "test",
            },
        )
        .await
        .unwrap();
    }
    sqlx::query("update replicas set heartbeat_at = now() - interval '1 minute' where id = 'r-2'")
        .execute(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        leases::live_replicas(&mut conn, TTL).await.unwrap(),
        ["r-1", "r-3"]
    );
    leases::remove_replica(&mut conn, "r-3").await.unwrap();
    assert_eq!(
        leases::live_replicas(&mut conn, TTL).await.unwrap(),
        ["r-1"]
    );
    sqlx::query("update replicas set heartbeat_at = now() - interval '1 hour' where id = 'r-2'")
        .execute(&mut *conn)
        .await
        .unwrap();
    leases::live_replicas(&mut conn, TTL).await.unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from replicas")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(rows, 1, "long-dead replicas are cleaned up");
    drop(conn);
    db.drop_db().await.unwrap();
}
