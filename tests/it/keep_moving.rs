//! Every mailbox keeps moving under the failures real links and servers produce: a link that
//! keeps dropping, oversize mail, messages whose download failed before. Through the whole
//! pipeline (simulator, real PostgreSQL), poll by poll with the supervisor's own pacing rules.

use std::time::Duration;

use anyhow::ensure;
use ccmail::ingest::pacing::{Pacing, PacingSettings};
use ccmail::ingest::poller::{self, IngestLimits, PollOutcome};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld};

/// A plain message carrying `marker`, padded to about `size` bytes of body.
fn mail(marker: &str, size: usize) -> Vec<u8> {
    let mut raw = format!(
        "From: Ann Customer <ann@example.net>\r\nTo: support@{DOMAIN}\r\n\
         Subject: {marker}\r\nMessage-ID: <{marker}@example.net>\r\n\
         Date: Tue, 03 Nov 2026 10:00:00 +0000\r\nX-Ccmail-Marker: {marker}\r\n\
         Content-Type: text/plain\r\n\r\nHello from {marker}.\r\n"
    )
    .into_bytes();
    let line = b"the quick brown fox jumps over the lazy dog, again and again and again\r\n";
    while raw.len() < size {
        raw.extend_from_slice(line);
    }
    raw
}

fn pacing_settings() -> PacingSettings {
    PacingSettings {
        poll_interval: Duration::from_secs(5),
        poll_jitter: 0.0,
        initial_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(300),
        permanent_retry: Duration::from_secs(900),
        login_refusal_grace: Duration::from_secs(600),
    }
}

async fn poll(
    world: &PipelineWorld,
    pilot: &poller::Pilot,
    limits: &IngestLimits,
    pacing: &Pacing,
) -> PollOutcome {
    poller::poll(
        pilot,
        world.db.db(),
        &world.tokens,
        limits,
        &CancellationToken::new(),
        pacing.mode(),
    )
    .await
}

/// The connection drops in the middle of every 7th RETR, counted across sessions. Each
/// session first deletes what the one before it stored, so the mailbox shrinks with every
/// session that gets through its QUIT; a drop ends only its session, not the poll; nothing is
/// held against the messages the drops hit. Bound: the first poll drains the mailbox (72
/// messages need 72 + 12 RETRs, well inside the per-poll cap); 2 polls are allowed.
#[tokio::test]
async fn a_link_that_drops_every_seventh_retr_drains_the_mailbox_session_by_session()
-> anyhow::Result<()> {
    const MESSAGES: usize = 72;
    const POLL_BOUND: usize = 2;
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    for i in 0..MESSAGES {
        ledger.deliver(&world.pop, &row.mailbox, mail(&format!("m{i:02}"), 2_000))?;
    }
    world.pop.drop_every_nth_retr(7);
    world.pop.clear_commands();
    let (limits, settings) = (IngestLimits::default(), pacing_settings());
    let mut pacing = Pacing::default();
    let mut on_server = vec![world.pop.messages(&row.mailbox).len()];
    let mut polls = 0;
    while on_server.last() != Some(&0) {
        polls += 1;
        ensure!(
            polls <= POLL_BOUND,
            "not drained in {POLL_BOUND} polls: {on_server:?}"
        );
        let outcome = poll(&world, &pilot, &limits, &pacing).await;
        on_server.push(world.pop.messages(&row.mailbox).len());
        let decision = pacing.next(&outcome, &settings, Instant::now());
        if outcome.result.is_err() && outcome.progressed() {
            let delay = decision.delay.unwrap_or(Duration::MAX);
            ensure!(
                delay <= settings.initial_backoff,
                "a poll that made progress backs off {delay:?}"
            );
        }
        ensure!(
            on_server[polls] < on_server[polls - 1],
            "the mailbox did not shrink in poll {polls}: {on_server:?} ({:?})",
            outcome.result
        );
        ensure!(
            outcome.report.interruptions > 0,
            "no drop was seen: {:?}",
            outcome.report
        );
    }
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let stored = world.stored(&[row.id]).await?;
    ensure!(
        stored.len() == MESSAGES && stored.iter().all(|m| !m.headers_only && m.flags.is_empty())
    );

    // Session by session: every session that reached QUIT had deleted messages, and the drops
    // cost no message a counted attempt.
    let commands = world.pop.commands();
    let mut sessions: Vec<Vec<&str>> = Vec::new();
    for line in &commands {
        let verb = line
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        if verb == "AUTH" {
            sessions.push(Vec::new());
        }
        if let Some(session) = sessions.last_mut() {
            session.push(match verb.as_str() {
                "DELE" => "DELE",
                "QUIT" => "QUIT",
                "RETR" => "RETR",
                _ => "other",
            });
        }
    }
    let quit_sessions: Vec<&Vec<&str>> = sessions.iter().filter(|s| s.contains(&"QUIT")).collect();
    ensure!(quit_sessions.len() >= 2, "{sessions:?}");
    ensure!(
        quit_sessions.iter().all(|s| s.contains(&"DELE")),
        "a session QUIT without deleting anything: {sessions:?}"
    );
    let mut conn = world.db.pool().acquire().await?;
    let counted: i64 = sqlx::query_scalar("select coalesce(sum(attempts), 0) from fetch_failures")
        .fetch_one(&mut *conn)
        .await?;
    ensure!(
        counted == 0,
        "{counted} attempts held against messages the link dropped"
    );
    drop(conn);
    world.finish().await
}

/// A 4 MB message with a 1 MB limit: the listing says so, so it is not downloaded at all; its
/// headers are stored (flagged oversize) and it stays on the server; the rest drains.
#[tokio::test]
async fn an_oversize_message_listed_as_such_is_never_downloaded() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("support", |p| p.max_message_bytes = 1024 * 1024)
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    ledger.deliver(&world.pop, &row.mailbox, mail("small-1", 3_000))?;
    ledger.deliver(&world.pop, &row.mailbox, mail("huge", 4 * 1024 * 1024))?;
    let big = world.pop.messages(&row.mailbox)[1].0.clone();
    ledger.deliver(&world.pop, &row.mailbox, mail("small-2", 3_000))?;
    world.pop.clear_commands();
    let report = world.poll(&pilot, &IngestLimits::default()).await?;
    ensure!(report.oversize == 1 && report.stored == 3, "{report:?}");
    let commands = world.pop.commands();
    let retrs: Vec<&String> = commands.iter().filter(|c| c.starts_with("RETR")).collect();
    ensure!(
        retrs.len() == 2,
        "the huge one was downloaded: {commands:?}"
    );
    ensure!(commands.iter().any(|c| c == "TOP 2 0"), "{commands:?}");
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let stored = world.stored(&[row.id]).await?;
    let huge = stored.iter().find(|m| m.uidl == big).expect("stored");
    ensure!(huge.headers_only && huge.flags == ["oversize"], "{huge:?}");
    ensure!(
        huge.size < 4096,
        "{} bytes stored for the headers",
        huge.size
    );
    let left: Vec<String> = world
        .pop
        .messages(&row.mailbox)
        .into_iter()
        .map(|(uidl, _)| uidl)
        .collect();
    ensure!(left == [big], "{left:?}");
    world.finish().await
}

/// A message the server kept refusing is stored as headers only (`fetch_failed`); once its
/// refetch interval has passed and the server sends it, the same work item is completed with
/// the whole message (not a second one) and the message is deleted from the server.
#[tokio::test]
async fn a_fetch_failed_message_is_completed_in_place_when_it_downloads_later() -> anyhow::Result<()>
{
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    ledger.deliver(&world.pop, &row.mailbox, mail("refused", 5_000))?;
    let uidl = world.pop.messages(&row.mailbox)[0].0.clone();
    let limits = IngestLimits {
        max_retr_attempts: 2,
        ..IngestLimits::default()
    };
    world.pop.fail_retr(&uidl, 2);
    world.poll(&pilot, &limits).await?;
    let report = world.poll(&pilot, &limits).await?;
    ensure!(report.skipped == 1, "{report:?}");
    let stored = world.stored(&[row.id]).await?;
    ensure!(stored.len() == 1 && stored[0].headers_only && stored[0].flags == ["fetch_failed"]);
    let mut conn = world.db.pool().acquire().await?;
    let item_before: i64 = sqlx::query_scalar("select id from work_items")
        .fetch_one(&mut *conn)
        .await?;
    drop(conn);

    // Not due yet: left alone.
    let report = world.poll(&pilot, &limits).await?;
    ensure!(
        report.completed == 0 && world.pop.messages(&row.mailbox).len() == 1,
        "{report:?}"
    );

    // Due (interval zero): downloaded whole, the row completed, the message deleted.
    let due = IngestLimits {
        refetch_after: Duration::ZERO,
        ..limits
    };
    let report = world.poll(&pilot, &due).await?;
    ensure!(
        report.completed == 1 && report.stored == 0 && report.deleted == 1,
        "{report:?}"
    );
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    let stored = world.stored(&[row.id]).await?;
    ensure!(stored.len() == 1, "{stored:?}");
    ensure!(
        !stored[0].headers_only && stored[0].flags.is_empty(),
        "{:?}",
        stored[0]
    );
    ensure!(
        stored[0].work_items == 1 && stored[0].deleted_from_server,
        "{:?}",
        stored[0]
    );
    let mut conn = world.db.pool().acquire().await?;
    let item_after: i64 = sqlx::query_scalar("select id from work_items")
        .fetch_one(&mut *conn)
        .await?;
    ensure!(item_before == item_after, "the work item was replaced");
    drop(conn);
    ensure!(world.pop.messages(&row.mailbox).is_empty());
    world.finish().await
}

/// A server whose `LIST` never ends: the sizes are only a shortcut, so after the one poll that
/// `LIST` breaks, the pilot's polls go on without it and the mailbox drains. The failed poll
/// still sets `ccmail_messages_on_server` from its STAT.
#[tokio::test]
async fn an_endless_list_costs_one_poll_not_the_mailbox() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    // Loaded the way the supervisor loads it, so /metrics shows its series.
    let pilot = poller::Pilot {
        metrics: ccmail::telemetry::global().pilot_loaded(row.id, &row.queue, None),
        ..world.resolve(&row).await?
    };
    let mut ledger = Ledger::default();
    for i in 0..3 {
        ledger.deliver(&world.pop, &row.mailbox, mail(&format!("m{i}"), 2_000))?;
    }
    world
        .pop
        .set_fault(Some(ccmail_lab::sim::pop3::Fault::Endless {
            command: "LIST".to_owned(),
        }));
    let limits = IngestLimits::default();
    let first = world.poll(&pilot, &limits).await;
    ensure!(first.is_err(), "{first:?}");
    // The gauge follows every STAT, not only successful polls.
    let id = row.id.to_string();
    let on_server = ccmail::telemetry::global()
        .value(&ccmail::telemetry::MESSAGES_ON_SERVER, &[&id, &row.queue]);
    ensure!(
        on_server == Some(3.0),
        "ccmail_messages_on_server {on_server:?} after a failed poll"
    );
    let report = world.poll(&pilot, &limits).await?;
    ensure!(report.stored == 3 && report.deleted == 3, "{report:?}");
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}

/// Another session holds the mailbox for 100 s (Exchange limits sessions per mailbox and
/// answers a login beyond the limit with its generic authentication failure). The supervisor
/// polls every 5 s; its refused logins are retried after 15 s, 30 s, then every 60 s, so the
/// first message is stored within 60 s (plus the poll itself, 10 s allowed) of the other
/// session ending — not after `permanent_retry_secs` (900 s). Meanwhile the pilot's error names
/// another session as a cause, and the login is not reported as persistently refused.
#[tokio::test]
async fn a_mailbox_held_by_another_session_is_polled_within_a_minute_of_its_release()
-> anyhow::Result<()> {
    use ccmail::ingest::poller::PilotAuth;
    use ccmail::ingest::supervisor::{Supervisor, SupervisorSettings};

    const HOLD: Duration = Duration::from_secs(100);
    const AFTER_RELEASE: Duration = Duration::from_secs(70);
    let world = PipelineWorld::start().await?;
    let row = world
        .add_pilot("support", |p| p.poll_interval = Duration::from_secs(5))
        .await?;
    let pilot = world.resolve(&row).await?;
    let mut ledger = Ledger::default();
    ledger.deliver(&world.pop, &row.mailbox, mail("waiting", 2_000))?;
    world
        .pop
        .set_session_limit(Some(1), ccmail_lab::sim::pop3::AUTH_FAILURE);

    // The other session: logged in and idle.
    let PilotAuth::XOAuth2 { app, .. } = &pilot.auth else {
        anyhow::bail!("the pilot logs in with XOAUTH2");
    };
    let token = world.tokens.token(app).await?;
    let held = ccmail::pop3::Client::connect(&pilot.server)
        .await?
        .auth_xoauth2(&pilot.mailbox, token.secret())
        .await?;
    let held_since = Instant::now();
    ensure!(world.pop.active_sessions(&row.mailbox) == 1);

    let settings = SupervisorSettings {
        limits: IngestLimits::default(),
        timeouts: crate::support::pipeline::test_timeouts(),
        reload_interval: Duration::from_secs(30),
        poll_jitter: 0.0,
        initial_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(300),
        permanent_retry: Duration::from_secs(900),
        login_refusal_grace: Duration::from_secs(600),
        shutdown_grace: Duration::from_secs(10),
        lease_ttl: Duration::from_secs(30),
        credentials: world.credential_policy(),
    };
    let supervisor = Supervisor::new(
        world.db.db().clone(),
        std::sync::Arc::clone(&world.tokens),
        settings,
        Some(world.master_key()?),
    )
    .only_pilots([row.id]);
    let status = supervisor.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(supervisor.run(shutdown.clone()));

    let outcome = async {
        // The refusal is recorded on the pilot row with the passing causes first.
        let db = world.db.db().clone();
        let id = row.id;
        crate::support::wait::wait_until(
            "the refused login recorded on the pilot",
            HOLD,
            || {
                let db = db.clone();
                async move {
                    let mut conn = db.acquire().await?;
                    let row = ccmail::store::get_pilot(&mut conn, id).await?;
                    Ok(row
                        .last_error
                        .is_some_and(|e| e.contains("another session")))
                }
            },
            || format!("{:?}", status.lock().map(|b| format!("{b:?}"))),
        )
        .await?;
        ensure!(
            world.pop.messages(&row.mailbox).len() == 1,
            "mail was taken while the mailbox was held"
        );
        let text = format!("{:?}", status.lock().map(|b| format!("{b:?}")));
        ensure!(!text.contains("persistent"), "{text}");

        tokio::time::sleep_until(held_since + HOLD).await;
        held.quit().await?;
        let released = Instant::now();
        let pop = world.pop.clone();
        let mailbox = row.mailbox.clone();
        crate::support::wait::wait_until(
            "the first message stored after the other session ended",
            AFTER_RELEASE,
            || std::future::ready(Ok(pop.messages(&mailbox).is_empty())),
            || format!("{:?}", status.lock().map(|b| format!("{b:?}"))),
        )
        .await?;
        let waited = released.elapsed();
        eprintln!("stored {waited:?} after the other session ended");
        anyhow::Ok(())
    }
    .await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task).await??;
    outcome?;
    ledger
        .check(&world.heads(&[row.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}

/// A server that lists other mail under the UIDL of a stored headers-only message: the refetch
/// does not overwrite the stored row with it and does not delete it; the next try waits the
/// refetch interval again.
#[tokio::test]
async fn a_refetch_that_brings_other_mail_under_the_uidl_completes_nothing() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let row = world.add_pilot("support", |_| {}).await?;
    let pilot = world.resolve(&row).await?;
    world.pop.deliver(&row.mailbox, mail("refused", 5_000));
    let uidl = world.pop.messages(&row.mailbox)[0].0.clone();
    let limits = IngestLimits {
        max_retr_attempts: 1,
        ..IngestLimits::default()
    };
    world.pop.fail_retr(&uidl, 1);
    let report = world.poll(&pilot, &limits).await?;
    ensure!(report.skipped == 1, "{report:?}");
    let before = world.stored(&[row.id]).await?;
    ensure!(before.len() == 1 && before[0].headers_only);

    ensure!(
        world
            .pop
            .replace_message(&row.mailbox, &uidl, mail("intruder", 5_000))
    );
    let due = IngestLimits {
        refetch_after: Duration::ZERO,
        ..limits.clone()
    };
    let report = world.poll(&pilot, &due).await?;
    ensure!(report.completed == 0 && report.deleted == 0, "{report:?}");
    let after = world.stored(&[row.id]).await?;
    ensure!(
        after.len() == 1 && after[0].headers_only && after[0].sha256 == before[0].sha256,
        "the stored row changed: {after:?}"
    );
    ensure!(
        world.pop.messages(&row.mailbox).len() == 1,
        "the other mail was deleted"
    );
    // Noted as a failed try: with the default interval it is not due again.
    world.pop.clear_commands();
    world.poll(&pilot, &limits).await?;
    ensure!(
        !world.pop.commands().iter().any(|c| c.starts_with("RETR")),
        "tried again at once: {:?}",
        world.pop.commands()
    );
    world.finish().await
}
