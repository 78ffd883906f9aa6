//! Threading, the class policy and the loop breaker against a real PostgreSQL: messages go
//! through the real parser and classifier into `insert_message`, as a poller stores them.

use std::time::Duration;

use secrecy::SecretString;
use sha2::Digest as _;
use sqlx::PgConnection;

use ccmail::ingest::classify::classify;
use ccmail::ingest::parse::parse;
use ccmail::model::triage::{Action, MailClass, SenderRate};
use ccmail::secrets::{MasterKey, Owner};
use ccmail::store::*;
use ccmail_lab::testdb::TestDb;

const CLASSIFY_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/classify");

async fn app(conn: &mut PgConnection, name: &str, tenant: &str) -> AppRow {
    let key = MasterKey::generate();
    let owner = Owner::app(DEFAULT_AUTHORITY, tenant, name, false);
    let credential = key
        .seal(&SecretString::from("s3cr3t".to_owned()), &owner)
        .unwrap();
    insert_app(conn, &NewApp::new(name, tenant, name, credential))
        .await
        .unwrap()
}

async fn pilot(conn: &mut PgConnection, queue: &str, mailbox: &str, app_id: i64) -> PilotRow {
    let new = NewPilot::new(queue, mailbox, PilotAuth::XOAuth2 { app_id });
    insert_pilot(conn, &new).await.unwrap()
}

/// What one stored message came to.
#[derive(Debug)]
struct Stored {
    work_item: i64,
    conversation: i64,
    rule: String,
    evidence: serde_json::Value,
    class: String,
    status: String,
    held_reason: Option<String>,
    flags: Vec<String>,
}

/// Parses, classifies and stores `raw` for `pilot` under `uidl`, as the poller does.
async fn ingest(
    conn: &mut PgConnection,
    pilot: &PilotRow,
    uidl: &str,
    raw: &[u8],
    rate: Option<SenderRate>,
) -> Stored {
    let parsed = parse(raw);
    let triage = classify(raw, &parsed, &pilot.mailbox);
    let identity = ccmail::ingest::identity::identity(raw);
    let new = NewMessage {
        pilot_id: pilot.id,
        queue: &pilot.queue,
        uidl,
        raw,
        parsed: &parsed,
        headers_only: false,
        flags: &[],
        identity,
        triage: Some(&triage),
        sender_rate: rate,
        sha256: None,
    };
    let inserted = insert_message(conn, &new).await.unwrap();
    let work_item = inserted.work_item().expect("a new work item");
    stored(conn, work_item).await
}

async fn stored(conn: &mut PgConnection, work_item: i64) -> Stored {
    let e = explain(conn, work_item).await.unwrap().unwrap();
    Stored {
        work_item,
        conversation: e.conversation_id.unwrap(),
        rule: e.thread_rule.unwrap(),
        evidence: e.thread_evidence.unwrap(),
        class: e.class.unwrap(),
        status: e.status,
        held_reason: e.held_reason,
        flags: e.flags,
    }
}

fn mail(headers: &str) -> Vec<u8> {
    format!(
        "{}\r\n\r\nBody text.\r\n",
        headers.trim().replace('\n', "\r\n")
    )
    .into_bytes()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{CLASSIFY_FIXTURES}/{name}.eml")).unwrap()
}

async fn setup() -> (TestDb, PilotRow) {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let a = app(&mut conn, "support-app", "contoso.onmicrosoft.com").await;
    let p = pilot(&mut conn, "support", "support@contoso.com", a.id).await;
    drop(conn);
    (db, p)
}

const INVOICE: &str = "From: Ana Silva <ana.silva@example.org>
To: support@contoso.com
Subject: Invoice 4471 is wrong
Message-ID: <CAF1a2b3c4@mail.example.org>";

#[tokio::test]
async fn conversations_a_reply_by_in_reply_to_continues_the_conversation() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;
    assert_eq!(
        (first.rule.as_str(), first.class.as_str()),
        ("new", "human")
    );
    assert_eq!(first.status, "queued");
    let reply = mail(
        "From: Ana Silva <ana.silva@example.org>
To: support@contoso.com
Subject: AW: Invoice 4471 is wrong
Message-ID: <CAF1a2b3c5@mail.example.org>
In-Reply-To: <CAF1a2b3c4@mail.example.org>",
    );
    let second = ingest(&mut conn, &p, "2", &reply, None).await;
    assert_eq!(second.conversation, first.conversation);
    assert_eq!(second.rule, "in_reply_to");
    assert_eq!(second.evidence["message_id"], "CAF1a2b3c4@mail.example.org");
    let (count, last, participants): (i32, i64, Vec<String>) = sqlx::query_as(
        "select message_count, last_message_id, participants from conversations where id = $1",
    )
    .bind(first.conversation)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(count, 2);
    let last_item: i64 = sqlx::query_scalar("select id from work_items where message_id = $1")
        .bind(last)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(last_item, second.work_item);
    // The pilot's own mailbox never counts as a participant (a forged From must not pass).
    assert_eq!(participants, vec!["ana.silva@example.org".to_owned()]);
}

#[tokio::test]
async fn conversations_remember_the_agent_who_completed_an_item() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;
    sqlx::query(
        "update work_items set status = 'done', done_at = now(), done_by = 'agent-7' where id = $1",
    )
    .bind(first.work_item)
    .execute(&mut *conn)
    .await
    .unwrap();
    let e = explain(&mut conn, first.work_item).await.unwrap().unwrap();
    assert_eq!(e.last_completed_by.as_deref(), Some("agent-7"));
}

#[tokio::test]
async fn conversations_re_invoice_from_a_stranger_opens_a_new_conversation() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;

    // Subject alone never threads.
    let stranger = mail(
        "From: Eve <eve@elsewhere.example>
To: support@contoso.com
Subject: Re: Invoice 4471 is wrong
Message-ID: <eve-1@elsewhere.example>",
    );
    let s = ingest(&mut conn, &p, "2", &stranger, None).await;
    assert_ne!(s.conversation, first.conversation);
    assert_eq!(s.rule, "new");

    // A stored id in References with another subject from a non-participant: rejected.
    let guessed = mail(
        "From: Eve <eve@elsewhere.example>
To: support@contoso.com
Subject: Re: Please pay this instead
Message-ID: <eve-2@elsewhere.example>
References: <CAF1a2b3c4@mail.example.org>",
    );
    let g = ingest(&mut conn, &p, "3", &guessed, None).await;
    assert_ne!(g.conversation, first.conversation);
    assert_eq!(g.rule, "new");
    assert_eq!(g.evidence["rejected"][0]["header"], "References");

    // The same id with the same normalised subject passes the guard, newest id first.
    let cc_reply = mail(
        "From: Bruno <bruno@example.org>
To: support@contoso.com
Subject: RE: Fwd: Invoice 4471 is wrong
Message-ID: <bruno-1@example.org>
References: <CAF1a2b3c4@mail.example.org> <not-stored@example.org>",
    );
    let c = ingest(&mut conn, &p, "4", &cc_reply, None).await;
    assert_eq!(c.conversation, first.conversation);
    assert_eq!(c.rule, "references");
    assert_eq!(c.evidence["guard"], "same_subject");

    // A participant passes the guard whatever the subject.
    let participant = mail(
        "From: Ana Silva <ana.silva@example.org>
To: support@contoso.com
Subject: one more thing
Message-ID: <CAF1a2b3c9@mail.example.org>
References: <CAF1a2b3c4@mail.example.org>",
    );
    let a = ingest(&mut conn, &p, "5", &participant, None).await;
    assert_eq!(a.conversation, first.conversation);
    assert_eq!(a.evidence["guard"], "sender_is_participant");
}

#[tokio::test]
async fn conversations_an_empty_subject_is_no_guard() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = mail(
        "From: Ana Silva <ana.silva@example.org>
To: support@contoso.com
Message-ID: <no-subject-1@example.org>",
    );
    let f = ingest(&mut conn, &p, "1", &first, None).await;
    let stranger = mail(
        "From: Eve <eve@elsewhere.example>
To: support@contoso.com
Subject: Re:
Message-ID: <eve-4@elsewhere.example>
References: <no-subject-1@example.org>",
    );
    let e = ingest(&mut conn, &p, "2", &stranger, None).await;
    assert_ne!(e.conversation, f.conversation);
    assert_eq!(e.rule, "new");
}

#[tokio::test]
async fn conversations_outlook_reply_with_only_thread_index_continues_by_thread_index() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    // The conversation's first message, as Outlook writes it: Thread-Index is the root alone.
    let first = mail(
        "From: Bruno Keller <bruno.keller@fabrikam.example>
To: support@contoso.com
Subject: Your case 10250
Thread-Topic: Your case 10250
Thread-Index: AdoIweCjXzyaHitNTo+aCxwtPk9QYQ==
Message-ID: <DB7PR04MB1111-first@DB7PR04MB1111.eurprd04.prod.outlook.com>",
    );
    let f = ingest(&mut conn, &p, "1", &first, None).await;
    let reply = ingest(
        &mut conn,
        &p,
        "2",
        &fixture("outlook_reply_thread_index_only"),
        None,
    )
    .await;
    assert_eq!(reply.conversation, f.conversation);
    assert_eq!(reply.rule, "thread_index");
    assert_eq!(reply.evidence["guard"], "same_thread_topic");

    // The same root with another topic from a stranger: rejected, a new conversation.
    let forged = mail(
        "From: Eve <eve@elsewhere.example>
To: support@contoso.com
Subject: Payment details changed
Thread-Topic: Payment details changed
Thread-Index: AdoIweCjXzyaHitNTo+aCxwtPk9QYQAAobLD
Message-ID: <eve-3@elsewhere.example>",
    );
    let e = ingest(&mut conn, &p, "3", &forged, None).await;
    assert_ne!(e.conversation, f.conversation);
    assert_eq!(e.evidence["rejected"][0]["header"], "Thread-Index");
}

#[tokio::test]
async fn conversations_are_shared_within_a_tenant_only() {
    let (db, support) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let same_tenant_app = app(&mut conn, "sales-app", "contoso.onmicrosoft.com").await;
    let sales = pilot(&mut conn, "sales", "sales@contoso.com", same_tenant_app.id).await;
    let other_app = app(&mut conn, "other-app", "fabrikam.onmicrosoft.com").await;
    let other = pilot(&mut conn, "other", "help@fabrikam.example", other_app.id).await;
    let first = ingest(&mut conn, &support, "1", &mail(INVOICE), None).await;
    let reply = mail(
        "From: Ana Silva <ana.silva@example.org>
To: sales@contoso.com, help@fabrikam.example
Subject: Re: Invoice 4471 is wrong
Message-ID: <CAF1a2b3d0@mail.example.org>
In-Reply-To: <CAF1a2b3c4@mail.example.org>",
    );
    let in_sales = ingest(&mut conn, &sales, "1", &reply, None).await;
    assert_eq!(in_sales.conversation, first.conversation);
    let in_other = ingest(&mut conn, &other, "1", &reply, None).await;
    assert_ne!(in_other.conversation, first.conversation);
    assert_eq!(in_other.rule, "new");
}

#[tokio::test]
async fn conversations_a_bounce_attaches_to_the_conversation_of_the_bounced_reply() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    set_class_policy(
        &mut conn,
        p.id,
        MailClass::Bounce,
        Some(Action::RouteFlagged),
    )
    .await
    .unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;
    // Our reply to it bounced; the report returns the reply's headers (In-Reply-To: the
    // customer's message).
    let bounce = ingest(&mut conn, &p, "2", &fixture("postfix_ndr"), None).await;
    assert_eq!(bounce.class, "bounce");
    assert_eq!(bounce.conversation, first.conversation);
    assert_eq!(bounce.rule, "report_original");
    assert_eq!(bounce.status, "queued");
    assert!(bounce.flags.contains(&"automatic".to_owned()));
    let e = explain(&mut conn, bounce.work_item).await.unwrap().unwrap();
    let evidence = e.class_evidence.unwrap();
    assert_eq!(evidence["recipients"][0]["status"], "5.1.1");
    assert_eq!(evidence["rule"], "dsn_failed");
}

#[tokio::test]
async fn conversations_loop_breaker_rate_rule_trips_after_the_limit_and_stores_everything() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    set_class_policy(&mut conn, p.id, MailClass::Loop, Some(Action::RouteFlagged))
        .await
        .unwrap();
    let rate = SenderRate {
        max_messages: 3,
        window: Duration::from_secs(600),
    };
    let mut classes = Vec::new();
    for n in 0..5 {
        let raw = mail(&format!(
            "From: robot@partner.example
To: support@contoso.com
Subject: Re: Re: Ticket {n}
Message-ID: <robot-{n}@partner.example>"
        ));
        let s = ingest(&mut conn, &p, &format!("u{n}"), &raw, Some(rate)).await;
        classes.push(s.class);
    }
    assert_eq!(classes, ["human", "human", "human", "loop", "loop"]);
    let stored: i64 = sqlx::query_scalar("select count(*) from work_items")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(stored, 5);
    // Another sender is not affected.
    let other = mail(
        "From: ana.silva@example.org
To: support@contoso.com
Subject: Hello
Message-ID: <ana-x@example.org>",
    );
    assert_eq!(
        ingest(&mut conn, &p, "other", &other, Some(rate))
            .await
            .class,
        "human"
    );
}

#[tokio::test]
async fn conversations_a_message_seen_before_is_a_loop() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    set_class_policy(&mut conn, p.id, MailClass::Loop, Some(Action::Route))
        .await
        .unwrap();
    let raw = mail(INVOICE);
    assert_eq!(ingest(&mut conn, &p, "1", &raw, None).await.class, "human");
    // The same message under another UIDL (a loop brought it back).
    let again = ingest(&mut conn, &p, "2", &raw, None).await;
    assert_eq!(again.class, "loop");
    let e = explain(&mut conn, again.work_item).await.unwrap().unwrap();
    assert_eq!(e.class_evidence.unwrap()["rule"], "seen_before");
    let sha: Vec<u8> = sqlx::query_scalar("select sha256 from messages where uidl = '2'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(sha, sha2::Sha256::digest(&raw).to_vec());
}

/// Held mail needs the `held` work-item status (schema version 11).
#[tokio::test]
async fn conversations_default_policy_holds_automatic_mail_with_its_class_as_reason() {
    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;
    assert_eq!(first.status, "queued");
    for (uidl, name, class) in [
        ("2", "gmail_vacation", "auto_reply"),
        ("3", "read_receipt_mdn", "receipt"),
        ("4", "postfix_ndr", "bounce"),
        ("5", "x_loop_this_mailbox", "loop"),
    ] {
        let s = ingest(&mut conn, &p, uidl, &fixture(name), None).await;
        assert_eq!(s.class, class, "{name}");
        assert_eq!(s.status, "held", "{name}");
        assert_eq!(s.held_reason.as_deref(), Some(class), "{name}");
    }
    let events: Vec<(String, String)> =
        sqlx::query_as("select action, reason from work_item_events order by id")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[0].0, "held");
    assert!(
        events[0].1.contains("auto_submitted_auto_replied"),
        "{events:?}"
    );
    let list = ingest(&mut conn, &p, "6", &fixture("mailing_list_post"), None).await;
    assert_eq!(
        (list.status.as_str(), list.class.as_str()),
        ("queued", "auto_generated")
    );
    assert!(list.flags.contains(&"automatic".to_owned()));
    let policies = class_policies(&mut conn, p.id).await.unwrap();
    assert!(policies.iter().all(|(_, _, default)| *default));
}

/// Two mailboxes whose careless auto-responders answer each other: every reply lands in the
/// other mailbox, both polled by ccmail. The loop breaker's rate rule turns the excess into
/// `loop` (held, never offered); every message is stored exactly once, and the whole storm is
/// one conversation across the two pilots (one tenant).
#[tokio::test]
async fn conversations_two_auto_responding_mailboxes_are_stopped_by_the_loop_breaker()
-> anyhow::Result<()> {
    use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld, small_limits};
    use ccmail_lab::sim::mailgen::careless_auto_reply;

    let world = PipelineWorld::start().await?;
    let a_row = world.add_pilot("alpha", |_| {}).await?;
    let b_row = world.add_pilot("beta", |_| {}).await?;
    let (a, b) = (format!("alpha@{DOMAIN}"), format!("beta@{DOMAIN}"));
    let (alpha, beta) = (world.resolve(&a_row).await?, world.resolve(&b_row).await?);
    let limits = ccmail::ingest::poller::IngestLimits {
        sender_rate: SenderRate {
            max_messages: 4,
            window: Duration::from_secs(3600),
        },
        ..small_limits()
    };
    let mut ledger = Ledger::default();
    // A customer's first message to alpha starts it; each responder answers what it got.
    let mut last_to_a = careless_auto_reply(&format!("customer@{DOMAIN}"), &mail(INVOICE), 0);
    ledger.deliver(&world.pop, &a, last_to_a.clone())?;
    let rounds = 10;
    for n in 1..=rounds {
        world.poll(&alpha, &limits).await?;
        let to_b = careless_auto_reply(&a, &last_to_a, n);
        ledger.deliver(&world.pop, &b, to_b.clone())?;
        world.poll(&beta, &limits).await?;
        last_to_a = careless_auto_reply(&b, &to_b, n);
        ledger.deliver(&world.pop, &a, last_to_a.clone())?;
    }
    world.poll(&alpha, &limits).await?;

    let heads = world.heads(&[a_row.id, b_row.id]).await?;
    ledger.check(&heads).assert_exactly_once()?;
    let mut conn = world.db.pool().acquire().await?;
    let rows: Vec<(i64, String, String, Option<String>, i64)> = sqlx::query_as(
        "select m.pilot_id, m.class, w.status, w.held_reason, m.conversation_id \
         from messages m join work_items w on w.message_id = m.id order by m.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    assert_eq!(rows.len(), ledger.len());
    // alpha: the customer's message and 10 replies from beta; beta: 10 replies from alpha.
    // Per pilot, the responder's first 4 are within the rate and routed, the other 6 loop.
    for (pilot, routed_expected) in [(a_row.id, 5), (b_row.id, 4)] {
        let mine: Vec<_> = rows.iter().filter(|r| r.0 == pilot).collect();
        let loops = mine.iter().filter(|r| r.1 == "loop").count();
        let held = mine
            .iter()
            .filter(|r| r.2 == "held" && r.3.as_deref() == Some("loop"))
            .count();
        let routed = mine.iter().filter(|r| r.2 == "queued").count();
        assert_eq!(
            (loops, held, routed),
            (6, 6, routed_expected),
            "pilot {pilot}: {mine:?}"
        );
    }
    let conversations: std::collections::HashSet<i64> = rows.iter().map(|r| r.4).collect();
    assert_eq!(conversations.len(), 1, "{rows:?}");
    drop(conn);
    world.finish().await
}

/// `ccmail work backfill` classes and threads messages stored before conversations existed,
/// once (a second run finds nothing), without touching their work items; `ccmail work
/// explain` shows the result; `ccmail work policy` shows and sets the class policy.
#[tokio::test]
async fn conversations_backfill_explain_and_policy_commands() {
    use crate::admin::Cli;

    let (db, p) = setup().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let first = ingest(&mut conn, &p, "1", &mail(INVOICE), None).await;
    let reply = mail(
        "From: Ana Silva <ana.silva@example.org>
To: support@contoso.com
Subject: Re: Invoice 4471 is wrong
Message-ID: <CAF1a2b3c5@mail.example.org>
In-Reply-To: <CAF1a2b3c4@mail.example.org>",
    );
    let second = ingest(&mut conn, &p, "2", &reply, None).await;
    let vacation = ingest(&mut conn, &p, "3", &fixture("gmail_vacation"), None).await;
    // As stored before schema version 12: no conversation, no class; every item queued.
    sqlx::query(
        "update messages set conversation_id = null, thread_rule = null, thread_evidence = null, \
         class = null, class_evidence = null",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("delete from conversations")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("update work_items set status = 'queued', held_reason = null")
        .execute(&mut *conn)
        .await
        .unwrap();

    let cli = Cli::new(&db);
    let out = cli.ok(&["work", "backfill", "--batch", "2"], None);
    assert!(out.contains("backfilled 3 messages"), "{out}");
    let out = cli.ok(&["work", "backfill"], None);
    assert!(out.contains("backfilled 0 messages"), "{out}");

    let (a, b, v) = (
        stored(&mut conn, first.work_item).await,
        stored(&mut conn, second.work_item).await,
        stored(&mut conn, vacation.work_item).await,
    );
    assert_eq!(b.conversation, a.conversation);
    assert_eq!(b.rule, "in_reply_to");
    assert_eq!(v.class, "auto_reply");
    assert_eq!(
        v.status, "queued",
        "the backfill leaves work items as they are"
    );

    let text = cli.ok(&["work", "explain", &v.work_item.to_string()], None);
    for expected in [
        "class                  auto_reply",
        "auto_submitted_auto_replied",
        "threading rule",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let json = cli.json(&["work", "explain", &b.work_item.to_string(), "--json"]);
    assert_eq!(json["thread_rule"], "in_reply_to");
    assert_eq!(json["conversation_id"], a.conversation);
    let (_, err) = cli.fails(&["work", "explain", "999999"], None);
    assert!(err.contains("no work item 999999"), "{err}");

    let pilot = p.id.to_string();
    let table = cli.ok(&["work", "policy", "--pilot", &pilot], None);
    assert!(
        table.contains("auto_reply") && table.contains("hold"),
        "{table}"
    );
    let set = cli.json(&[
        "work",
        "policy",
        "--pilot",
        &pilot,
        "--class",
        "auto_reply",
        "--action",
        "route",
        "--json",
    ]);
    let row = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["class"] == "auto_reply")
            .cloned()
            .unwrap()
    };
    assert_eq!(row(&set)["action"], "route");
    assert_eq!(row(&set)["default"], false);
    let (_, err) = cli.fails(
        &[
            "work", "policy", "--pilot", &pilot, "--class", "spam", "--action", "hold",
        ],
        None,
    );
    assert!(err.contains("unknown class \"spam\""), "{err}");
    let reset = cli.json(&[
        "work",
        "policy",
        "--pilot",
        &pilot,
        "--class",
        "auto_reply",
        "--default",
        "--json",
    ]);
    assert_eq!(row(&reset)["action"], "hold");
}
