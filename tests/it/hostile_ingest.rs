//! Hostile input through the whole pipeline (simulator, real PostgreSQL): what a sender or a
//! POP3 server writes may make one message odd, never stop the mailbox, lose a message or
//! delete one that was not stored.

use anyhow::ensure;
use ccmail::ingest::poller::IngestLimits;
use ccmail_lab::sim::pop3::Fault;

use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld, small_limits};

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

/// Every delivered message stored exactly once, and the mailbox empty.
async fn assert_drained(
    world: &PipelineWorld,
    ledger: &Ledger,
    row: &ccmail::store::PilotRow,
) -> anyhow::Result<()> {
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let left = world.pop.messages(&row.mailbox).len();
    ensure!(left == 0, "{left} messages left on the server");
    Ok(())
}

/// A poll that stores what it downloads but whose QUIT is never applied (the connection drops
/// after the command): everything stays on the server, stored.
async fn interrupted_poll(
    world: &PipelineWorld,
    pilot: &ccmail::ingest::poller::Pilot,
) -> anyhow::Result<()> {
    world.pop.set_fault(Some(Fault::DropAfterCommand {
        command: "QUIT".to_owned(),
    }));
    ensure!(
        world.poll(pilot, &small_limits()).await.is_err(),
        "the poll should have failed"
    );
    world.pop.clear_faults();
    Ok(())
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
    let world = PipelineWorld::start().await?;
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
    assert_drained(&world, &ledger, &row).await?;

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
async fn refuse_messages(world: &PipelineWorld, raw_too: bool) -> anyhow::Result<()> {
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
    let world = PipelineWorld::start().await?;
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
    assert_drained(&world, &ledger, &row).await?;
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
    let world = PipelineWorld::start().await?;
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

/// Polls until a poll stores nothing new and leaves nothing waiting (errors allowed: a hostile
/// server breaks sessions), at most `polls` times; returns how many polls ran.
async fn poll_until_quiet(
    world: &PipelineWorld,
    pilot: &ccmail::ingest::poller::Pilot,
    limits: &IngestLimits,
    polls: usize,
) -> anyhow::Result<usize> {
    for n in 1..=polls {
        match world.poll(pilot, limits).await {
            Ok(r) if r.stored == 0 && r.deleted == 0 && !r.more_waiting => return Ok(n),
            Ok(_) | Err(_) => {}
        }
    }
    anyhow::bail!("the mailbox did not settle within {polls} polls")
}

/// Two different messages under one UIDL: the second used to be downloaded, not stored
/// (`on conflict do nothing`), then deleted. Both are stored now, and deleted only after.
#[tokio::test]
async fn two_messages_sharing_a_uidl_are_both_stored_before_either_is_deleted() -> anyhow::Result<()>
{
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    for (uidl, marker) in [("SAME", "first"), ("OTHER", "plain"), ("SAME", "second")] {
        let raw = mail(marker, &format!("{marker}@x"));
        ledger.note(&raw)?;
        world.pop.deliver_with_uidl(&row.mailbox, uidl, raw);
    }

    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!(
        (report.stored, report.deleted, report.untrusted_uidls),
        (3, 3, 2),
        "{report:?}"
    );
    assert_drained(&world, &ledger, &row).await?;
    // Nothing more to do, and nothing stored twice on a second look.
    assert_eq!(
        poll_until_quiet(&world, &pilot, &small_limits(), 3).await?,
        1
    );
    world.finish().await
}

/// RFC 1939 §7 allows identical copies to share a UIDL: they are one work item, and both
/// leave the server.
#[tokio::test]
async fn identical_copies_sharing_a_uidl_are_one_work_item() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let raw = mail("copy", "copy@x");
    world
        .pop
        .deliver_with_uidl(&row.mailbox, "TWIN", raw.clone());
    world.pop.deliver_with_uidl(&row.mailbox, "TWIN", raw);

    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!((report.stored, report.deleted), (1, 2), "{report:?}");
    assert_eq!(world.work_items().await?, 1);
    assert!(world.pop.messages(&row.mailbox).is_empty());
    world.finish().await
}

/// UIDLs with spaces (only the first word used to be kept, so `abc def` and `abc xyz` were one
/// message and the second was deleted unstored), with terminal escapes, 4 KB long, and a line
/// with no message number: each affects only its own message, and nothing is lost.
#[tokio::test]
async fn malformed_uidl_lines_affect_only_their_own_messages() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    let long = "L".repeat(4_000);
    for (uidl, marker) in [
        ("abc def", "spaces-1"),
        ("abc xyz", "spaces-2"),
        ("esc\u{1b}[31mred\u{7}", "escapes"),
        (long.as_str(), "four-kb"),
        ("GOOD-1", "good"),
    ] {
        let raw = mail(marker, &format!("{marker}@x"));
        ledger.note(&raw)?;
        world.pop.deliver_with_uidl(&row.mailbox, uidl, raw);
    }
    world.pop.add_fault(Fault::ListingLine {
        command: "UIDL".to_owned(),
        at: 2,
        line: b"no number here".to_vec(),
    });

    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!((report.stored, report.deleted), (5, 5), "{report:?}");
    assert_eq!(
        (report.untrusted_uidls, report.unaddressable),
        (4, 1),
        "{report:?}"
    );
    assert_drained(&world, &ledger, &row).await?;
    world.finish().await
}

/// A poll stores a message but its QUIT never arrives (nothing is deleted); then the server
/// gives that UIDL to different mail. The next poll used to delete the new mail without
/// downloading it ("already stored"); now TOP shows it is not the stored message, and it is
/// stored before it is deleted.
#[tokio::test]
async fn a_reused_uidl_cannot_make_ccmail_delete_unseen_mail() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    let uidl = ledger.deliver(&world.pop, &row.mailbox, mail("original", "original@x"))?;
    world.pop.set_fault(Some(Fault::DropAfterCommand {
        command: "QUIT".to_owned(),
    }));
    assert!(world.poll(&pilot, &small_limits()).await.is_err());
    assert_eq!(
        world.pop.messages(&row.mailbox).len(),
        1,
        "QUIT was not applied"
    );
    world.pop.clear_faults();

    let replacement = mail("replacement", "replacement@x");
    ledger.note(&replacement)?;
    assert!(world.pop.replace_message(&row.mailbox, &uidl, replacement));
    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!(
        (report.stored, report.deleted, report.untrusted_uidls),
        (1, 1, 1),
        "{report:?}"
    );
    assert_drained(&world, &ledger, &row).await?;
    world.finish().await
}

/// A stored message found again after an interrupted poll is deleted only after `TOP n 0`
/// shows it is the same message: the check costs one TOP, no download.
#[tokio::test]
async fn a_stored_message_found_again_is_checked_with_top_before_its_dele() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    ledger.deliver(&world.pop, &row.mailbox, mail("once", "once@x"))?;
    interrupted_poll(&world, &pilot).await?;
    world.pop.clear_commands();

    let report = world.poll(&pilot, &small_limits()).await?;
    assert_eq!((report.stored, report.deleted), (0, 1), "{report:?}");
    let verbs: Vec<String> = world
        .pop
        .commands()
        .iter()
        .filter_map(|c| c.split(' ').next().map(str::to_owned))
        .filter(|v| ["TOP", "RETR", "DELE"].contains(&v.as_str()))
        .collect();
    assert_eq!(verbs, ["TOP", "DELE"]);
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}

/// A RETR answered with an endless body used to hold the poller forever. Now it ends at the
/// body's wire limit, the message's headers are stored (flagged oversize, left on the server)
/// and the rest of the mailbox drains.
#[tokio::test]
async fn an_endless_retr_ends_and_the_rest_of_the_mailbox_drains() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("support", |p| p.max_message_bytes = 256 * 1024)
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    // The endless one first: its number stays 1 while the others are deleted around it.
    for marker in ["endless", "m2", "m3"] {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(marker, &format!("{marker}@x")),
        )?;
    }
    world.pop.set_fault(Some(Fault::Endless {
        command: "RETR 1".to_owned(),
    }));
    // Generous: this is "it ended", not a timing goal.
    let polls = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        poll_until_quiet(&world, &pilot, &small_limits(), 6),
    )
    .await??;
    assert!(polls <= 4, "{polls} polls");
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let left = world.pop.messages(&row.mailbox);
    assert_eq!(left.len(), 1, "only the endless one stays");
    let stored = world.stored(&[row.id]).await?;
    let endless = stored
        .iter()
        .find(|m| m.headers_only)
        .expect("headers stored");
    assert_eq!(endless.flags, ["oversize"]);
    world.finish().await
}

/// A RETR trickled at one byte per second used to hold the poller forever (each read came
/// within the idle deadline). The minimum rate cuts it; after the retry limit the message is
/// stored as headers and the rest of the mailbox drains.
#[tokio::test]
async fn a_trickled_retr_is_cut_by_the_minimum_rate_and_the_rest_drains() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let timeouts = ccmail::pop3::Timeouts {
        command: std::time::Duration::from_secs(2),
        ..crate::support::pipeline::test_timeouts()
    };
    let pilot = world.resolve_with(&row, timeouts).await?;
    let mut ledger = Ledger::default();
    // The trickled one first: its number stays 1 while the others are deleted around it.
    for marker in ["trickled", "m2", "m3"] {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(marker, &format!("{marker}@x")),
        )?;
    }
    world.pop.set_fault(Some(Fault::Trickle {
        command: "RETR 1".to_owned(),
        bytes_per_second: 1,
    }));
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        poll_until_quiet(&world, &pilot, &small_limits(), 8),
    )
    .await??;
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let stored = world.stored(&[row.id]).await?;
    let trickled = stored
        .iter()
        .find(|m| m.headers_only)
        .expect("headers stored");
    assert_eq!(trickled.flags, ["fetch_failed"]);
    assert_eq!(world.pop.messages(&row.mailbox).len(), 1);
    world.finish().await
}

/// A poll stops taking messages at its deadline, stores and deletes what it has, and says
/// more is waiting; the next polls finish the mailbox.
#[tokio::test]
async fn the_poll_deadline_ends_a_poll_between_messages() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    for i in 0..8 {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(&format!("m{i}"), &format!("m{i}@x")),
        )?;
    }
    // Each RETR answer takes about 0.3 s to arrive.
    world.pop.set_fault(Some(Fault::Slow {
        chunk: 64,
        delay: std::time::Duration::from_millis(50),
    }));
    let limits = IngestLimits {
        max_poll_duration: std::time::Duration::from_millis(900),
        ..small_limits()
    };
    let first = world.poll(&pilot, &limits).await?;
    assert!(first.more_waiting, "{first:?}");
    assert!(first.stored >= 1 && first.stored < 8, "{first:?}");
    assert_eq!(first.deleted, first.stored, "{first:?}");
    poll_until_quiet(&world, &pilot, &limits, 20).await?;
    assert_drained(&world, &ledger, &row).await?;
    world.finish().await
}

/// A maildrop of 700,000 messages used to exceed the listing cap on every poll ("message is
/// larger"), so nothing was stored. Now the listing is read in bounded memory and the mailbox
/// drains in capped polls.
#[tokio::test]
async fn a_huge_maildrop_drains_in_capped_polls() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    for i in 0..12 {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(&format!("m{i}"), &format!("m{i}@x")),
        )?;
    }
    // The virtual entries come after the real ones and cannot be retrieved.
    world
        .pop
        .set_fault(Some(Fault::VirtualEntries { count: 700_000 }));
    let limits = IngestLimits {
        max_listing_entries: 5,
        ..small_limits()
    };
    let first = world.poll(&pilot, &limits).await?;
    assert_eq!((first.stored, first.deleted), (5, 5), "{first:?}");
    assert!(first.more_waiting, "{first:?}");
    let second = world.poll(&pilot, &limits).await?;
    assert_eq!((second.stored, second.deleted), (5, 5), "{second:?}");
    let third = world.poll(&pilot, &limits).await?;
    assert_eq!(third.stored, 2, "{third:?}");
    assert_drained(&world, &ledger, &row).await?;
    world.finish().await
}

/// New mail is fetched before the checks, and a keep-on-server pilot whose server lists
/// untrusted UIDLs neither polls in a tight loop nor leaves some of them unstored for ever.
#[tokio::test]
async fn untrusted_uidls_of_a_keep_on_server_pilot_neither_starve_nor_spin() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("support", |p| p.keep_on_server = true)
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    for i in 0..4 {
        let raw = mail(&format!("shared-{i}"), &format!("shared-{i}@x"));
        ledger.note(&raw)?;
        world.pop.deliver_with_uidl(&row.mailbox, "SHARED", raw);
    }
    for i in 0..2 {
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mail(&format!("new-{i}"), &format!("new-{i}@x")),
        )?;
    }
    let limits = IngestLimits {
        max_messages_per_poll: 2,
        ..small_limits()
    };
    let first = world.poll(&pilot, &limits).await?;
    // The two ordinary new messages come first, though the server lists them last.
    let stored: Vec<String> = world
        .heads(&[row.id])
        .await?
        .iter()
        .filter_map(|h| ccmail_lab::sim::mailgen::marker(h))
        .collect();
    assert_eq!(stored, ["new-0", "new-1"], "{first:?}");
    assert!(first.more_waiting, "{first:?}");
    let mut polls = 1;
    loop {
        let report = world.poll(&pilot, &limits).await?;
        polls += 1;
        if !report.more_waiting {
            break;
        }
        anyhow::ensure!(
            polls < 10,
            "still more waiting after {polls} polls: {report:?}"
        );
    }
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    assert_eq!(
        world.pop.messages(&row.mailbox).len(),
        6,
        "kept on the server"
    );
    // Settled: another poll stores nothing and does not ask to poll again at once.
    let again = world.poll(&pilot, &limits).await?;
    assert_eq!((again.stored, again.more_waiting), (0, false), "{again:?}");
    world.finish().await
}
