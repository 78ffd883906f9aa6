//! The work-item lifecycle in the store, on a real PostgreSQL: claims never take an item
//! twice, every step is fenced by its claim token, expired claims come back in their place,
//! items offered too often are held, every transition leaves an event, and version 11 of the
//! schema brings old `assigned` items back.

use std::sync::Arc;
use std::time::Duration;

use ccmail::model::WorkItemStatus;
use ccmail::store::lifecycle::{self, Override, Step};
use ccmail_lab::testdb::TestDb;

use crate::support::work;

const OFFER: Duration = Duration::from_secs(30);
const LEASE: Duration = Duration::from_secs(300);

fn done(step: Step) -> lifecycle::Moved {
    match step {
        Step::Done(m) => m,
        other => panic!("expected the step to go through, got {other:?}"),
    }
}

fn refused(step: Step) -> lifecycle::Current {
    match step {
        Step::Refused(c) => c,
        other => panic!("expected the step to be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn fifty_claimers_at_once_take_each_item_exactly_once() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "sales").await;
    let ids = work::items(db.db(), pilot, "sales", 400).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for agent in 0..50 {
        let (pool, barrier) = (db.db().clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            loop {
                let mut conn = pool.acquire().await.unwrap();
                let claims =
                    lifecycle::claim(&mut conn, "sales", &format!("agent-{agent}"), 3, OFFER)
                        .await
                        .unwrap();
                if claims.is_empty() {
                    return mine;
                }
                mine.extend(claims.iter().map(|c| c.id));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, ids, "every item claimed, none twice");
    let offered: i64 =
        sqlx::query_scalar("select count(*) from work_item_events where action = 'offered'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(offered, 400, "one event per offer");
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_stale_claimant_changes_nothing_after_its_offer_passed_to_another() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    let id = work::items(db.db(), pilot, "q", 1).await[0];
    let mut conn = db.db().acquire().await.unwrap();
    let first = lifecycle::claim(&mut conn, "q", "ann", 1, OFFER)
        .await
        .unwrap();
    let ann = first[0].claim_token.clone();
    work::expire(db.db(), id).await;
    // Not yet rescued: the expired offer can no longer be accepted all the same.
    let c = refused(
        lifecycle::accept(&mut conn, id, &ann, "ann", LEASE)
            .await
            .unwrap(),
    );
    assert!(c.expired && c.token_matches, "{c:?}");
    let rescued = lifecycle::rescue(&mut conn, 5, 100).await.unwrap();
    assert_eq!(rescued[0].1.offers_expired, 1);
    let second = lifecycle::claim(&mut conn, "q", "bob", 1, OFFER)
        .await
        .unwrap();
    let bob = second[0].claim_token.clone();
    assert_ne!(ann, bob, "a new claim draws a new token");
    let before = work::row(db.db(), id).await;
    for step in [
        lifecycle::accept(&mut conn, id, &ann, "ann", LEASE)
            .await
            .unwrap(),
        lifecycle::heartbeat(&mut conn, id, &ann, "ann", LEASE)
            .await
            .unwrap(),
        lifecycle::complete(&mut conn, id, &ann, "ann", None)
            .await
            .unwrap(),
        lifecycle::release(&mut conn, id, &ann, "ann", None, 5)
            .await
            .unwrap(),
        lifecycle::transfer(&mut conn, id, &ann, "ann", "other")
            .await
            .unwrap(),
    ] {
        let c = refused(step);
        assert_eq!(c.status, WorkItemStatus::Offered);
        assert_eq!(c.agent.as_deref(), Some("bob"));
        assert!(!c.token_matches);
    }
    // Ann's name with Bob's token is refused too: the token belongs to Bob's claim.
    refused(
        lifecycle::accept(&mut conn, id, &bob, "ann", LEASE)
            .await
            .unwrap(),
    );
    assert_eq!(work::row(db.db(), id).await, before, "nothing changed");
    let accepted = done(
        lifecycle::accept(&mut conn, id, &bob, "bob", LEASE)
            .await
            .unwrap(),
    );
    assert_eq!(accepted.to, WorkItemStatus::Accepted);
    let completed = done(
        lifecycle::complete(&mut conn, id, &bob, "bob", None)
            .await
            .unwrap(),
    );
    assert_eq!(completed.to, WorkItemStatus::Done);
    assert!(completed.handle_secs.is_some());
    assert_eq!(
        work::actions(db.db(), id).await,
        [
            "offered",
            "offer_expired",
            "offered",
            "accepted",
            "completed"
        ]
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn expired_offers_and_leases_come_back_ahead_of_later_items() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    let first = work::items(db.db(), pilot, "q", 3).await;
    let mut conn = db.db().acquire().await.unwrap();
    let a = lifecycle::claim(&mut conn, "q", "ann", 1, OFFER)
        .await
        .unwrap();
    done(
        lifecycle::accept(&mut conn, a[0].id, &a[0].claim_token, "ann", LEASE)
            .await
            .unwrap(),
    );
    let b = lifecycle::claim(&mut conn, "q", "bob", 1, OFFER)
        .await
        .unwrap();
    assert_eq!((a[0].id, b[0].id), (first[0], first[1]));
    let later = work::items(db.db(), pilot, "q", 2).await;
    work::expire(db.db(), a[0].id).await;
    work::expire(db.db(), b[0].id).await;
    let rescued = lifecycle::rescue(&mut conn, 5, 100).await.unwrap();
    assert_eq!(
        (rescued[0].1.offers_expired, rescued[0].1.leases_expired),
        (1, 1)
    );
    let again = lifecycle::claim(&mut conn, "q", "cat", 10, OFFER)
        .await
        .unwrap();
    let order: Vec<i64> = again.iter().map(|c| c.id).collect();
    assert_eq!(order, [first[0], first[1], first[2], later[0], later[1]]);
    assert_eq!(again[0].offers, 2, "offers are counted");
    let lost: Option<String> = sqlx::query_scalar(
        "select reason from work_item_events where work_item_id = $1 and action = 'lease_expired'",
    )
    .bind(a[0].id)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(lost.as_deref(), Some("agent_lost"));
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn an_item_offered_too_often_is_held_for_a_supervisor_and_released_by_one() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    let id = work::items(db.db(), pilot, "q", 1).await[0];
    let mut conn = db.db().acquire().await.unwrap();
    for round in 1..=3 {
        let c = lifecycle::claim(&mut conn, "q", "ann", 1, OFFER)
            .await
            .unwrap();
        assert_eq!(c.len(), 1, "round {round}");
        let moved = done(
            lifecycle::release(&mut conn, id, &c[0].claim_token, "ann", Some("busy"), 3)
                .await
                .unwrap(),
        );
        let want = if round < 3 {
            WorkItemStatus::Queued
        } else {
            WorkItemStatus::Held
        };
        assert_eq!(moved.to, want, "round {round}");
    }
    assert!(
        lifecycle::claim(&mut conn, "q", "ann", 1, OFFER)
            .await
            .unwrap()
            .is_empty(),
        "a held item is never offered"
    );
    let state = ccmail::store::work_item_state(&mut conn, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.held_reason.as_deref(), Some("offer_limit"));
    // A supervisor acting on what they saw: the item must still be held.
    refused(
        lifecycle::override_step(
            &mut conn,
            id,
            "sue",
            Override::Requeue,
            None,
            Some(WorkItemStatus::Accepted),
        )
        .await
        .unwrap(),
    );
    let moved = done(
        lifecycle::override_step(
            &mut conn,
            id,
            "sue",
            Override::Requeue,
            Some("checked"),
            Some(WorkItemStatus::Held),
        )
        .await
        .unwrap(),
    );
    assert_eq!(moved.to, WorkItemStatus::Queued);
    let c = lifecycle::claim(&mut conn, "q", "ann", 1, OFFER)
        .await
        .unwrap();
    assert_eq!(
        c[0].offers, 1,
        "a supervisor's requeue counts offers afresh"
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn supervisor_steps_end_the_agents_claim_and_are_logged() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    work::pilot(db.db(), "billing").await;
    let ids = work::items(db.db(), pilot, "q", 2).await;
    let mut conn = db.db().acquire().await.unwrap();
    let c = lifecycle::claim(&mut conn, "q", "ann", 2, OFFER)
        .await
        .unwrap();
    done(
        lifecycle::accept(&mut conn, ids[0], &c[0].claim_token, "ann", LEASE)
            .await
            .unwrap(),
    );
    let moved = done(
        lifecycle::override_step(
            &mut conn,
            ids[0],
            "sue",
            Override::Transfer {
                to_queue: "billing",
            },
            None,
            None,
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        (moved.to, moved.queue.as_str()),
        (WorkItemStatus::Queued, "billing")
    );
    refused(
        lifecycle::complete(&mut conn, ids[0], &c[0].claim_token, "ann", None)
            .await
            .unwrap(),
    );
    let cancelled = done(
        lifecycle::override_step(
            &mut conn,
            ids[1],
            "sue",
            Override::Cancel { reason: "spam" },
            None,
            None,
        )
        .await
        .unwrap(),
    );
    assert_eq!(cancelled.to, WorkItemStatus::Cancelled);
    refused(
        lifecycle::accept(&mut conn, ids[1], &c[1].claim_token, "ann", LEASE)
            .await
            .unwrap(),
    );
    let (from_q, to_q): (Option<String>, Option<String>) = sqlx::query_as(
        "select from_queue, to_queue from work_item_events where work_item_id = $1 \
         and action = 'transferred'",
    )
    .bind(ids[0])
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        (from_q.as_deref(), to_q.as_deref()),
        (Some("q"), Some("billing"))
    );
    let messages: i64 = sqlx::query_scalar("select count(*) from messages")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(messages, 2, "a cancelled item's mail stays stored");
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn schema_version_11_returns_assigned_items_to_their_queue_with_an_event() {
    use sqlx::Connection as _;
    let admin = ccmail_lab::testdb::admin_url();
    let name = format!("ccmail_t_{:016x}", fastrand::u64(..));
    let mut server = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(&format!("create database {name}"))
        .execute(&mut server)
        .await
        .unwrap();
    let url = {
        let (base, _) = admin.rsplit_once('/').unwrap();
        format!("{base}/{name}")
    };
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut old = sqlx::migrate!("./migrations");
    old.migrations = std::borrow::Cow::Owned(
        old.migrations
            .iter()
            .filter(|m| m.version < 11)
            .cloned()
            .collect(),
    );
    old.run_direct(&mut conn).await.unwrap();
    sqlx::query(
        "insert into pilots (queue, mailbox, host, port, tls, auth, username, password_credential) \
         values ('q', 'q@x', 'h', 995, 'implicit', 'user_pass', 'q', 'env:P')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "insert into messages (pilot_id, uidl, raw, sha256, size) \
         select id, 'u' || i, 'x', sha256(('x' || i)::bytea), 1 from pilots, generate_series(1, 3) i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "insert into work_items (message_id, queue, status) \
         select id, 'q', (array['queued', 'assigned', 'done'])[id] from messages",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    sqlx::migrate!("./migrations")
        .run_direct(&mut conn)
        .await
        .unwrap();
    let statuses: Vec<String> =
        sqlx::query_scalar("select status from work_items order by message_id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(statuses, ["queued", "queued", "done"]);
    let events: Vec<(String, Option<String>)> =
        sqlx::query_as("select action, from_status from work_item_events")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        events,
        [("requeued".to_owned(), Some("assigned".to_owned()))]
    );
    conn.close().await.unwrap();
    sqlx::query(&format!("drop database {name} with (force)"))
        .execute(&mut server)
        .await
        .unwrap();
}

#[tokio::test]
async fn rescuers_running_at_once_put_each_expired_claim_back_exactly_once() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "q").await;
    work::items(db.db(), pilot, "q", 300).await;
    let mut conn = db.db().acquire().await.unwrap();
    let claims = lifecycle::claim(&mut conn, "q", "ann", 300, OFFER)
        .await
        .unwrap();
    for c in claims.iter().take(100) {
        done(
            lifecycle::accept(&mut conn, c.id, &c.claim_token, "ann", LEASE)
                .await
                .unwrap(),
        );
    }
    sqlx::query(
        "update work_items set offer_expires_at = case when status = 'offered' then now() - interval '1 second' end, \
         lease_expires_at = case when status = 'accepted' then now() - interval '1 second' end",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let barrier = Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pool, barrier) = (db.db().clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut moved = (0, 0);
            loop {
                let mut conn = pool.acquire().await.unwrap();
                let r = lifecycle::rescue(&mut conn, 5, 25).await.unwrap();
                if r.is_empty() {
                    return moved;
                }
                for (_, r) in r {
                    moved.0 += r.offers_expired;
                    moved.1 += r.leases_expired;
                }
            }
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let m = t.await.unwrap();
        total = (total.0 + m.0, total.1 + m.1);
    }
    assert_eq!(total, (200, 100), "offers and leases, each once");
    let (queued, rescued): (i64, i64) = sqlx::query_as(
        "select (select count(*) from work_items where status = 'queued'), \
         (select count(*) from work_item_events where action in ('offer_expired', 'lease_expired'))",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((queued, rescued), (300, 300));
    db.drop_db().await.unwrap();
}
