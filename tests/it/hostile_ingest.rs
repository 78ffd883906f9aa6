//! Hostile input through the whole pipeline (simulator, real PostgreSQL): what a sender or a
//! POP3 server writes may make one message odd, never stop the mailbox, lose a message or
//! delete one that was not stored.

use anyhow::ensure;
use ccmail::ingest::poller::IngestLimits;

use crate::support::pipeline::{DOMAIN, Ledger, SimWorld, small_limits};

/// A small plain message carrying `marker` (in its subject too) and this Message-ID.
fn mail(marker: &str, message_id: &str) -> Vec<u8> {
    format!(
        "From: Ann Customer <ann@example.net>\r\nTo: support@{DOMAIN}\r\n\
         Subject: {marker}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Tue, 03 Nov 2026 10:00:00 +0000\r\nX-Ccmail-Marker: {marker}\r\n\
         Content-Type: text/plain\r\n\r\nHello from {marker}.\r\n"
    )
    .into_bytes()
}

fn random_text(len: usize) -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(len)
        .collect()
}

/// A Message-ID longer than a btree entry can hold (~2,700 bytes) used to fail its whole batch,
/// on every poll, so nothing of that mailbox was stored again.
#[tokio::test]
async fn a_huge_message_id_is_stored_with_the_rest_of_the_mailbox() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    let long_id = format!("{}@example.net", random_text(10_000));
    ledger.deliver(
        &world.pop,
        &row.mailbox,
        mail("before", "before@example.net"),
    )?;
    ledger.deliver(&world.pop, &row.mailbox, mail("huge-id", &long_id))?;
    ledger.deliver(&world.pop, &row.mailbox, mail("after", "after@example.net"))?;

    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!((report.stored, report.deleted), (3, 3), "{report:?}");
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    assert!(world.pop.messages(&row.mailbox).is_empty());

    let (stored_id, flags): (String, Vec<String>) = sqlx::query_as(
        "select m.message_id, w.flags from messages m join work_items w on w.message_id = m.id \
         where m.subject = 'huge-id'",
    )
    .fetch_one(world.db.pool())
    .await?;
    assert!(
        long_id.starts_with(&stored_id) && stored_id.len() <= 998,
        "{}",
        stored_id.len()
    );
    assert_eq!(flags, ["header_truncated"]);
    world.finish().await
}

/// Installs a trigger that refuses, as a data error, every message whose subject contains
/// `refused-by-db`, and (when `raw_too`) every message whose raw bytes contain `refuse-raw`:
/// a stand-in for whatever a future sender finds that the database cannot hold.
async fn refuse_messages(world: &SimWorld, raw_too: bool) -> anyhow::Result<()> {
    let raw_rule = if raw_too {
        "or position('refuse-raw'::bytea in new.raw) > 0"
    } else {
        ""
    };
    sqlx::query(&format!(
        "create function refuse_in_test() returns trigger language plpgsql as $$ begin \
           if new.subject like '%refused-by-db%' {raw_rule} then \
             raise exception 'refused by the test trigger' using errcode = '22023'; \
           end if; return new; end $$"
    ))
    .execute(world.db.pool())
    .await?;
    sqlx::query(
        "create trigger refuse_in_test before insert on messages \
         for each row execute function refuse_in_test()",
    )
    .execute(world.db.pool())
    .await?;
    Ok(())
}

/// One message the database refuses used to fail its batch on every poll: now it is stored raw
/// and flagged, and the rest of the batch is stored and deleted as usual.
#[tokio::test]
async fn a_message_the_database_refuses_is_stored_raw_and_the_batch_goes_on() -> anyhow::Result<()>
{
    let world = SimWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    refuse_messages(&world, false).await?;
    let mut ledger = Ledger::default();
    for marker in ["m1", "m2", "refused-by-db", "m4", "m5"] {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(marker, &format!("{marker}@x")),
        )?;
    }
    let limits = IngestLimits {
        batch_messages: 50,
        ..small_limits()
    };

    let report = world.poll(&pilot, &limits).await?;
    assert_eq!(
        (report.stored, report.deleted, report.store_fallbacks),
        (5, 5, 1),
        "{report:?}"
    );
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    assert!(world.pop.messages(&row.mailbox).is_empty());
    let refused: Vec<(Option<String>, Vec<String>)> = sqlx::query_as(
        "select m.parse_error, w.flags from messages m join work_items w on w.message_id = m.id \
         where 'store_error' = any(w.flags)",
    )
    .fetch_all(world.db.pool())
    .await?;
    ensure!(refused.len() == 1, "{refused:?}");
    let error = refused[0].0.clone().unwrap_or_default();
    assert!(error.contains("refused by the test trigger"), "{error}");
    assert!(refused[0].1.contains(&"parse_error".to_owned()));
    world.finish().await
}

/// A message the database refuses even raw stays on the server, with its failure recorded;
/// the others are stored and deleted.
#[tokio::test]
async fn a_message_refused_even_raw_stays_on_the_server_and_the_rest_drains() -> anyhow::Result<()>
{
    let world = SimWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    refuse_messages(&world, true).await?;
    let mut ledger = Ledger::default();
    for marker in ["m1", "refused-by-db refuse-raw", "m3"] {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(marker, &format!("{}@x", marker.len())),
        )?;
    }
    let limits = IngestLimits {
        batch_messages: 50,
        ..small_limits()
    };

    let report = world.poll(&pilot, &limits).await?;
    assert_eq!((report.stored, report.deleted), (2, 2), "{report:?}");
    let left = world.pop.messages(&row.mailbox);
    assert_eq!(left.len(), 1);
    assert!(String::from_utf8_lossy(&left[0].1).contains("refuse-raw"));
    let recorded: (i32, String) =
        sqlx::query_as("select attempts, last_error from fetch_failures where pilot_id = $1")
            .bind(row.id)
            .fetch_one(world.db.pool())
            .await?;
    assert!(
        recorded.1.contains("refused by the test trigger"),
        "{recorded:?}"
    );
    // The next poll tries it again and still drains nothing else twice.
    let again = world.poll(&pilot, &limits).await?;
    assert_eq!((again.stored, again.deleted), (0, 0), "{again:?}");
    assert_eq!(world.work_items().await?, 2);
    world.finish().await
}
