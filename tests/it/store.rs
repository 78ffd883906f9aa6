//! Store tests against a real PostgreSQL: one fresh database per test.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use sha2::Digest as _;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio::sync::Barrier;

use std::str::FromStr as _;

use ccmail::model::{Address, Attachment, ParsedMail};
use ccmail::secrets::{MasterKey, Owner};
use ccmail::store::*;
use ccmail_lab::testdb::{self as testing, TestDb};
use sqlx::ConnectOptions as _;
use sqlx::postgres::PgConnectOptions;

/// Generous upper bound for a notification to arrive; it normally takes milliseconds.
const NOTIFY_DEADLINE: Duration = Duration::from_secs(10);

/// `secret` sealed for the app `support-app` of the tests (global authority,
/// contoso.onmicrosoft.com, client id cid-1).
fn sealed(key: &MasterKey, secret: &str) -> String {
    let owner = Owner::app(DEFAULT_AUTHORITY, "contoso.onmicrosoft.com", "cid-1", false);
    key.seal(&SecretString::from(secret.to_owned()), &owner)
        .unwrap()
}

async fn app(conn: &mut PgConnection, name: &str) -> AppRow {
    let key = MasterKey::generate();
    let new = NewApp::new(
        name,
        "contoso.onmicrosoft.com",
        name,
        sealed(&key, "s3cr3t"),
    );
    insert_app(conn, &new).await.unwrap()
}

async fn pilot(conn: &mut PgConnection, queue: &str, mailbox: &str, app_id: i64) -> PilotRow {
    let new = NewPilot::new(queue, mailbox, PilotAuth::XOAuth2 { app_id });
    insert_pilot(conn, &new).await.unwrap()
}

fn parsed_mail() -> ParsedMail {
    ParsedMail {
        defects: Vec::new(),
        message_id: Some("<m1@contoso.com>".into()),
        subject: Some("Order 42 is late".into()),
        from: vec![Address {
            name: Some("Ann Customer".into()),
            email: Some("ann@example.com".into()),
        }],
        to: vec![Address {
            name: None,
            email: Some("support@contoso.com".into()),
        }],
        cc: vec![],
        reply_to: vec![],
        date: Some(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
        in_reply_to: vec!["<m0@contoso.com>".into()],
        references: vec!["<m-1@contoso.com>".into(), "<m0@contoso.com>".into()],
        text_body: Some("Where is my order?".into()),
        html_body: Some("<p onclick=\"steal()\">Where is my order?</p>".into()),
        html_sanitized: Some("<p>Where is my order?</p>".into()),
        attachments: vec![
            Attachment {
                filename: Some("invoice.pdf".into()),
                content_type: "application/pdf".into(),
                content_id: None,
                inline: false,
                bytes: b"%PDF-1.4 fake".to_vec(),
                raw_range: None,
            },
            Attachment {
                filename: None,
                content_type: "image/png".into(),
                content_id: Some("<logo>".into()),
                inline: true,
                bytes: vec![0x89, b'P', b'N', b'G'],
                raw_range: None,
            },
        ],
        parse_error: None,
        ..ParsedMail::default()
    }
}

async fn count(conn: &mut PgConnection, table: &'static str) -> i64 {
    let sql = format!("select count(*) from {table}");
    sqlx::query_scalar(&sql).fetch_one(conn).await.unwrap()
}

fn message<'a>(pilot: &'a PilotRow, uidl: &'a str, parsed: &'a ParsedMail) -> NewMessage<'a> {
    NewMessage {
        pilot_id: pilot.id,
        queue: &pilot.queue,
        uidl,
        raw: b"Subject: Order 42 is late\r\n\r\nWhere is my order?\r\n",
        parsed,
        headers_only: false,
        flags: &[],
        identity: None,
        triage: None,
        sender_rate: None,
        sha256: None,
    }
}

#[tokio::test]
async fn apps_insert_list_get_and_refuse_duplicates() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let key = MasterKey::generate();
    let mut new = NewApp::new(
        "support-app",
        "contoso.onmicrosoft.com",
        "cid-1",
        sealed(&key, "v"),
    );
    new.secret_expires_at = Some(chrono::DateTime::from_timestamp(1_900_000_000, 0).unwrap());
    let row = insert_app(&mut conn, &new).await.unwrap();
    assert_eq!(row.name, "support-app");
    assert_eq!(row.authority, DEFAULT_AUTHORITY);
    assert_eq!(row.scope, DEFAULT_SCOPE);
    assert_eq!(row.credential, new.credential);
    assert_eq!(row.secret_expires_at, new.secret_expires_at);
    let env_app = NewApp::new(
        "env-app",
        "fabrikam.com",
        "cid-2",
        "env:FABRIKAM_SECRET".into(),
    );
    insert_app(&mut conn, &env_app).await.unwrap();

    let names: Vec<String> = list_apps(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["env-app", "support-app"]);
    assert_eq!(get_app(&mut conn, row.id).await.unwrap(), row);
    assert_eq!(
        get_app_by_name(&mut conn, "support-app").await.unwrap(),
        row
    );
    assert!(matches!(
        get_app(&mut conn, row.id + 100).await,
        Err(StoreError::NotFound { .. })
    ));
    let err = get_app_by_name(&mut conn, "nope").await.unwrap_err();
    assert!(err.to_string().contains("\"nope\""), "{err}");

    // Same name, different identity.
    let mut same_name = NewApp::new("support-app", "other", "cid-9", "env:X".into());
    same_name.scope = DEFAULT_SCOPE.into();
    let err = insert_app(&mut conn, &same_name).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Duplicate { field: "name", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("support-app"), "{err}");
    // Same identity, different name.
    let same_identity = NewApp::new(
        "other-name",
        "contoso.onmicrosoft.com",
        "cid-1",
        "env:X".into(),
    );
    let err = insert_app(&mut conn, &same_identity).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Duplicate {
                field: "authority, tenant, client id and scope",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(list_apps(&mut conn).await.unwrap().len(), 2);

    // Debug shows the key id, never the ciphertext.
    let data = row.credential.rsplit_once(':').unwrap().1.to_owned();
    let debug = format!("{row:?} {new:?}");
    assert!(!debug.contains(&data), "{debug}");
    assert!(debug.contains(key.key_id()), "{debug}");

    // New credential and expiry; guarded by id.
    let other = MasterKey::generate();
    let resealed =
        ccmail::secrets::reseal(&row.credential, &key, &other, &row.credential_owner()).unwrap();
    set_app_credential(&mut conn, row.id, &resealed, None)
        .await
        .unwrap();
    let updated = get_app(&mut conn, row.id).await.unwrap();
    assert_eq!(updated.credential, resealed);
    assert_eq!(updated.secret_expires_at, None);
    assert!(updated.updated_at >= row.updated_at);
    assert!(matches!(
        set_app_credential(&mut conn, row.id + 100, &resealed, None).await,
        Err(StoreError::NotFound { .. })
    ));
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn plaintext_credentials_are_refused_by_code_and_by_schema() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let new = NewApp::new("a", "t", "c", "my-plain-secret".into());
    let err = insert_app(&mut conn, &new).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::InvalidInput {
                field: "credential",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("my-plain-secret"));

    // Bypassing the code, the check constraint still refuses it.
    let err = sqlx::query(
        "insert into oauth_apps (name, tenant, client_id, credential) values ('a', 't', 'c', $1)",
    )
    .bind("my-plain-secret")
    .execute(&mut *conn)
    .await
    .unwrap_err();
    let db_err = err.as_database_error().unwrap();
    assert_eq!(
        db_err.constraint(),
        Some("oauth_apps_credential_not_plaintext")
    );

    let mut user_pass = NewPilot::new(
        "q",
        "u@x",
        PilotAuth::UserPass {
            username: "u".into(),
            credential: "hunter2".into(),
        },
    );
    let err = insert_pilot(&mut conn, &user_pass).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"));
    user_pass.auth = PilotAuth::UserPass {
        username: "u".into(),
        credential: "file:/run/pw".into(),
    };
    insert_pilot(&mut conn, &user_pass).await.unwrap();
    let err =
        sqlx::query("update pilots set password_credential = 'hunter2' where auth = 'user_pass'")
            .execute(&mut *conn)
            .await
            .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().constraint(),
        Some("pilots_password_not_plaintext")
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn pilots_insert_list_and_refuse_case_insensitive_duplicates() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "support-app").await;
    let xo = pilot(&mut conn, "support", "Support@Contoso.com", app.id).await;
    assert_eq!(xo.host, DEFAULT_HOST);
    assert_eq!(xo.port, 995);
    assert_eq!(xo.tls, TlsMode::Implicit);
    assert_eq!(xo.auth, PilotAuth::XOAuth2 { app_id: app.id });
    assert_eq!(xo.poll_interval, Duration::from_secs(60));
    assert_eq!(xo.max_message_bytes, 50 * 1024 * 1024);
    assert!(xo.enabled && !xo.keep_on_server);
    assert_eq!(xo.last_success_at, None);

    let mut up = NewPilot::new(
        "lab",
        "lab@dovecot.test",
        PilotAuth::UserPass {
            username: "lab".into(),
            credential: "env:LAB_PASSWORD".into(),
        },
    );
    up.host = "127.0.0.1".into();
    up.port = 10995;
    up.tls = TlsMode::StartTls;
    up.ca_bundle = Some("/etc/ccmail/lab-ca.pem".into());
    up.poll_interval = Duration::from_secs(5);
    up.keep_on_server = true;
    up.max_message_bytes = 1024;
    up.enabled = false;
    let up_row = insert_pilot(&mut conn, &up).await.unwrap();
    assert_eq!(up_row.port, 10995);
    assert_eq!(up_row.tls, TlsMode::StartTls);
    assert_eq!(up_row.ca_bundle.as_deref(), Some("/etc/ccmail/lab-ca.pem"));
    assert_eq!(up_row.poll_interval, Duration::from_secs(5));
    assert!(up_row.keep_on_server && !up_row.enabled);
    assert_eq!(up_row.max_message_bytes, 1024);
    // References are shown (they are not secrets); sealed data never is.
    assert!(format!("{up_row:?}").contains("env:LAB_PASSWORD"));
    let key = MasterKey::generate();
    let sealed_password = sealed(&key, "pw");
    let sealed_auth = PilotAuth::UserPass {
        username: "lab".into(),
        credential: sealed_password.clone(),
    };
    let debug = format!("{sealed_auth:?}");
    assert!(
        !debug.contains(sealed_password.rsplit_once(':').unwrap().1),
        "{debug}"
    );
    assert!(debug.contains(key.key_id()), "{debug}");

    let listed = list_pilots(&mut conn).await.unwrap();
    assert_eq!(listed, vec![xo.clone(), up_row.clone()]);
    assert_eq!(get_pilot(&mut conn, up_row.id).await.unwrap(), up_row);
    assert!(matches!(
        get_pilot(&mut conn, 9999).await,
        Err(StoreError::NotFound { .. })
    ));

    // Same mailbox and host in another case: refused, with a message naming both.
    let mut dup = NewPilot::new(
        "sales",
        "support@contoso.COM",
        PilotAuth::XOAuth2 { app_id: app.id },
    );
    dup.host = "Outlook.Office365.com".into();
    let err = insert_pilot(&mut conn, &dup).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Duplicate {
                entity: "pilot",
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("support@contoso.COM") && text.contains("mailbox and host"),
        "{text}"
    );
    assert_eq!(count(&mut conn, "pilots").await, 2);

    // Same mailbox on another host is a different pilot.
    dup.host = "pop.contoso.com".into();
    insert_pilot(&mut conn, &dup).await.unwrap();
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn pilot_check_constraints_and_unknown_app_are_reported() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;

    let mut bad_port = NewPilot::new("q", "p0@x", PilotAuth::XOAuth2 { app_id: app.id });
    bad_port.port = 0;
    let err = insert_pilot(&mut conn, &bad_port).await.unwrap_err();
    match &err {
        StoreError::Constraint { constraint, .. } => assert_eq!(constraint, "pilots_port_range"),
        other => panic!("expected a constraint error, got {other:?}"),
    }
    assert!(err.to_string().contains("between 1 and 65535"), "{err}");

    let mut zero_poll = NewPilot::new("q", "p1@x", PilotAuth::XOAuth2 { app_id: app.id });
    zero_poll.poll_interval = Duration::from_millis(500);
    assert!(matches!(
        insert_pilot(&mut conn, &zero_poll).await,
        Err(StoreError::InvalidInput {
            field: "poll_interval",
            ..
        })
    ));

    let mut blank = NewPilot::new(" ", "p2@x", PilotAuth::XOAuth2 { app_id: app.id });
    blank.max_message_bytes = 0;
    assert!(matches!(
        insert_pilot(&mut conn, &blank).await,
        Err(StoreError::Constraint { .. })
    ));

    let orphan = NewPilot::new(
        "q",
        "p3@x",
        PilotAuth::XOAuth2 {
            app_id: app.id + 1000,
        },
    );
    let err = insert_pilot(&mut conn, &orphan).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "OAuth app",
                ..
            }
        ),
        "{err:?}"
    );

    // The typed API cannot express an inconsistent auth; the schema refuses it anyway.
    for (auth, app_id, username, password) in [
        ("xoauth2", None, None, None),
        ("xoauth2", Some(app.id), Some("u"), None),
        ("user_pass", Some(app.id), Some("u"), Some("env:P")),
        ("user_pass", None, None, Some("env:P")),
    ] {
        let err = sqlx::query(
            "insert into pilots (queue, mailbox, auth, app_id, username, password_credential) \
             values ('q', 'raw@x', $1, $2, $3, $4)",
        )
        .bind(auth)
        .bind(app_id)
        .bind(username)
        .bind(password)
        .execute(&mut *conn)
        .await
        .unwrap_err();
        assert_eq!(
            err.as_database_error().unwrap().constraint(),
            Some("pilots_auth_consistent"),
            "{auth} {app_id:?} {username:?}"
        );
    }
    let err = sqlx::query("update pilots set tls = 'ssl3'")
        .execute(&mut *conn)
        .await;
    // No pilot exists yet, so the update touches nothing; insert one and retry.
    assert_eq!(err.unwrap().rows_affected(), 0);
    pilot(&mut conn, "q", "ok@x", app.id).await;
    let err = sqlx::query("update pilots set tls = 'ssl3'")
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().constraint(),
        Some("pilots_tls_mode")
    );
    assert_eq!(count(&mut conn, "pilots").await, 1);

    // An app in use cannot be deleted from under its pilots.
    let err = sqlx::query("delete from oauth_apps where id = $1")
        .bind(app.id)
        .execute(&mut *conn)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("23503")
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn enabled_pilots_come_with_their_apps_and_status_is_recorded() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app_a = app(&mut conn, "a").await;
    let app_b = app(&mut conn, "b").await;
    let p1 = pilot(&mut conn, "support", "s@x", app_a.id).await;
    let p2 = pilot(&mut conn, "sales", "sales@x", app_b.id).await;
    let p3 = pilot(&mut conn, "billing", "b@x", app_a.id).await;
    let lab = NewPilot::new(
        "lab",
        "lab@x",
        PilotAuth::UserPass {
            username: "lab".into(),
            credential: "env:P".into(),
        },
    );
    let p4 = insert_pilot(&mut conn, &lab).await.unwrap();
    set_pilot_enabled(&mut conn, p2.id, false).await.unwrap();

    let enabled = enabled_pilots_with_apps(&mut conn).await.unwrap();
    let summary: Vec<(i64, Option<i64>)> = enabled
        .iter()
        .map(|(p, a)| (p.id, a.as_ref().map(|a| a.id)))
        .collect();
    assert_eq!(
        summary,
        vec![
            (p1.id, Some(app_a.id)),
            (p3.id, Some(app_a.id)),
            (p4.id, None)
        ]
    );
    assert_eq!(enabled[0].1.as_ref().unwrap().name, "a");

    assert!(matches!(
        set_pilot_enabled(&mut conn, 9999, true).await,
        Err(StoreError::NotFound {
            entity: "pilot",
            ..
        })
    ));

    record_poll_error(
        &mut conn,
        p1.id,
        "-ERR Authentication failure",
        Some("grant POP.AccessAsApp"),
    )
    .await
    .unwrap();
    let failed = get_pilot(&mut conn, p1.id).await.unwrap();
    assert_eq!(
        failed.last_error.as_deref(),
        Some("-ERR Authentication failure")
    );
    assert_eq!(
        failed.last_error_hint.as_deref(),
        Some("grant POP.AccessAsApp")
    );
    assert!(failed.last_error_at.is_some());
    assert_eq!(
        failed.updated_at, p1.updated_at,
        "status writes are not config changes"
    );

    record_poll_success(&mut conn, p1.id).await.unwrap();
    let ok = get_pilot(&mut conn, p1.id).await.unwrap();
    assert!(ok.last_success_at.is_some());
    assert_eq!(
        (ok.last_error, ok.last_error_hint, ok.last_error_at),
        (None, None, None)
    );

    assert!(matches!(
        record_poll_success(&mut conn, 9999).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        record_poll_error(&mut conn, 9999, "e", None).await,
        Err(StoreError::NotFound { .. })
    ));
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn insert_message_stores_everything_once() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let parsed = parsed_mail();
    let new = message(&p, "UID-1", &parsed);

    let mut tx = conn.begin().await.unwrap();
    let item = insert_message(&mut tx, &new).await.unwrap();
    tx.commit().await.unwrap();
    let item = item.work_item().expect("first insert creates a work item");

    type Stored = (
        String,
        Vec<u8>,
        Vec<u8>,
        Option<String>,
        Option<String>,
        sqlx::types::Json<Vec<Address>>,
    );
    let row: Stored = sqlx::query_as(
        "select m.uidl, m.raw, m.sha256, m.subject, m.message_id, m.from_addrs from messages m \
         join work_items w on w.message_id = m.id where w.id = $1",
    )
    .bind(item)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(row.0, "UID-1");
    assert_eq!(row.1, new.raw);
    use sha2::Digest;
    assert_eq!(row.2, sha2::Sha256::digest(new.raw).to_vec());
    assert_eq!(row.3.as_deref(), Some("Order 42 is late"));
    assert_eq!(row.4.as_deref(), Some("<m1@contoso.com>"));
    assert_eq!(row.5.0, parsed.from);
    let threading: (
        Vec<String>,
        Vec<String>,
        Option<chrono::DateTime<chrono::Utc>>,
        i64,
        bool,
    ) = sqlx::query_as(
        "select in_reply_to, \"references\", sent_at, size, headers_only from messages",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(threading.0, parsed.in_reply_to);
    assert_eq!(threading.1, parsed.references);
    assert_eq!(threading.2, parsed.date);
    assert_eq!(threading.3, new.raw.len() as i64);
    assert!(!threading.4);
    let bodies: (Option<String>, Option<String>, Option<String>) =
        sqlx::query_as("select text_body, html_body, html_sanitized from messages")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(bodies.0, parsed.text_body);
    assert_eq!(bodies.1, parsed.html_body, "HTML is kept as received");
    assert_eq!(bodies.2.as_deref(), Some("<p>Where is my order?</p>"));
    type AttachmentRow = (
        i32,
        Option<String>,
        String,
        i64,
        Option<String>,
        bool,
        Vec<u8>,
    );
    let attachments: Vec<AttachmentRow> = sqlx::query_as(
        "select ordinal, filename, content_type, size, content_id, inline, bytes \
             from attachments order by ordinal",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[0].1.as_deref(), Some("invoice.pdf"));
    assert_eq!(attachments[0].6, parsed.attachments[0].bytes);
    assert_eq!(attachments[1].0, 1);
    assert_eq!(attachments[1].4.as_deref(), Some("<logo>"));
    assert!(attachments[1].5);
    assert_eq!(attachments[1].3, 4);
    let work: (String, String, Vec<String>) =
        sqlx::query_as("select queue, status, flags from work_items where id = $1")
            .bind(item)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(work, ("support".into(), "queued".into(), vec![]));

    // The same (pilot, uidl) again: nothing at all is added.
    let mut tx = conn.begin().await.unwrap();
    assert_eq!(
        insert_message(&mut tx, &new).await.unwrap().work_item(),
        None
    );
    tx.commit().await.unwrap();
    assert_eq!(count(&mut conn, "messages").await, 1);
    assert_eq!(count(&mut conn, "attachments").await, 2);
    assert_eq!(count(&mut conn, "work_items").await, 1);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn unparsable_oversize_and_nul_laden_messages_are_still_stored() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;

    let broken = ParsedMail {
        subject: Some("bad\0subject".into()),
        text_body: Some("body with \0 NUL".into()),
        from: vec![Address {
            name: Some("N\0L".into()),
            email: Some("n@x".into()),
        }],
        parse_error: Some("no header/body separator".into()),
        ..ParsedMail::default()
    };
    let mut new = message(&p, "UID-broken", &broken);
    new.raw = b"\0\0garbage";
    new.flags = &[
        ccmail::model::Flag::Oversize,
        ccmail::model::Flag::ParseError,
    ];
    new.headers_only = true;
    let item = insert_message(&mut conn, &new)
        .await
        .unwrap()
        .work_item()
        .unwrap();
    let (flags, subject, body, from, headers_only): (
        Vec<String>,
        String,
        String,
        sqlx::types::Json<Vec<Address>>,
        bool,
    ) = sqlx::query_as(
        "select w.flags, m.subject, m.text_body, m.from_addrs, m.headers_only \
             from work_items w join messages m on m.id = w.message_id where w.id = $1",
    )
    .bind(item)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(flags, ["oversize", "parse_error"], "flags are deduplicated");
    assert_eq!(subject, "bad\u{FFFD}subject");
    assert_eq!(body, "body with \u{FFFD} NUL");
    assert_eq!(from.0[0].name.as_deref(), Some("N\u{FFFD}L"));
    assert!(headers_only);

    // parse_error is flagged even when the caller passes no flags.
    let mut plain = message(&p, "UID-broken-2", &broken);
    plain.flags = &[];
    let item = insert_message(&mut conn, &plain)
        .await
        .unwrap()
        .work_item()
        .unwrap();
    let flags: Vec<String> = sqlx::query_scalar("select flags from work_items where id = $1")
        .bind(item)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(flags, [FLAG_PARSE_ERROR]);

    // A message for a pilot that does not exist is refused with a clear error.
    let ghost = PilotRow {
        id: 9999,
        ..p.clone()
    };
    let err = insert_message(&mut conn, &message(&ghost, "U", &broken))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NotFound {
                entity: "pilot",
                ..
            }
        ),
        "{err:?}"
    );
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn fifty_concurrent_inserts_of_one_uidl_store_exactly_one_message() {
    const RACERS: usize = 50;
    let db = TestDb::new().await.unwrap();
    let p = {
        let mut conn = db.pool().acquire().await.unwrap();
        let app = app(&mut conn, "a").await;
        pilot(&mut conn, "support", "s@x", app.id).await
    };
    // Separate connections, opened up front so the race starts with all of them ready.
    let mut connections = Vec::with_capacity(RACERS);
    for _ in 0..RACERS {
        connections.push(PgConnection::connect(db.url()).await.unwrap());
    }
    let barrier = Arc::new(Barrier::new(RACERS));
    let parsed = Arc::new(parsed_mail());
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in connections {
        let barrier = Arc::clone(&barrier);
        let parsed = Arc::clone(&parsed);
        let p = p.clone();
        tasks.spawn(async move {
            let mut tx = conn.begin().await.unwrap();
            barrier.wait().await;
            let result = insert_message(&mut tx, &message(&p, "UID-race", &parsed))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            conn.close().await.unwrap();
            result
        });
    }
    let mut created = Vec::new();
    while let Some(result) = tasks.join_next().await {
        if let Some(id) = result.unwrap().work_item() {
            created.push(id);
        }
    }
    assert_eq!(created.len(), 1, "exactly one racer creates the work item");
    let mut conn = db.pool().acquire().await.unwrap();
    assert_eq!(count(&mut conn, "messages").await, 1);
    assert_eq!(count(&mut conn, "work_items").await, 1);
    assert_eq!(count(&mut conn, "attachments").await, 2);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn known_uidls_mark_deleted_and_fetch_failures() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let other = pilot(&mut conn, "sales", "sales@x", app.id).await;
    let parsed = parsed_mail();
    insert_message(&mut conn, &message(&p, "A", &parsed))
        .await
        .unwrap()
        .work_item()
        .unwrap();
    let mut headers = message(&p, "B", &parsed);
    headers.headers_only = true;
    insert_message(&mut conn, &headers)
        .await
        .unwrap()
        .work_item()
        .unwrap();
    // Same UIDL on another pilot is a different message.
    insert_message(&mut conn, &message(&other, "C", &parsed))
        .await
        .unwrap()
        .work_item()
        .unwrap();

    assert_eq!(
        record_fetch_failure(&mut conn, p.id, "D", "connection reset")
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        record_fetch_failure(&mut conn, p.id, "D", "timed out")
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        record_fetch_failure(&mut conn, p.id, "D", "timed out again")
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        record_fetch_failure(&mut conn, p.id, "E", "reset")
            .await
            .unwrap(),
        1
    );
    let last: (String, i32) =
        sqlx::query_as("select last_error, attempts from fetch_failures where uidl = 'D'")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(last, ("timed out again".into(), 3));
    assert!(matches!(
        record_fetch_failure(&mut conn, 9999, "X", "e").await,
        Err(StoreError::NotFound { .. })
    ));

    let asked: Vec<String> = ["A", "B", "C", "D", "Z"].map(String::from).to_vec();
    let known = known_uidls(&mut conn, p.id, &asked).await.unwrap();
    assert_eq!(known.len(), 3);
    assert!(matches!(
        known["A"],
        KnownUidl::Stored {
            copy: StoredCopy {
                headers_only: false,
                ..
            },
            deleted: false
        }
    ));
    assert!(matches!(
        known["B"],
        KnownUidl::Stored {
            copy: StoredCopy {
                headers_only: true,
                ..
            },
            deleted: false
        }
    ));
    assert_eq!(
        known["D"],
        KnownUidl::Failing {
            attempts: 3,
            connection_failures: 0,
            too_large: false
        }
    );
    assert!(!known.contains_key("C"), "C belongs to another pilot");

    // Deletion is recorded once; repeating it (or naming unknown UIDLs) changes nothing.
    let to_delete: Vec<String> = ["A", "B", "Z"].map(String::from).to_vec();
    assert_eq!(mark_deleted(&mut conn, p.id, &to_delete).await.unwrap(), 2);
    assert_eq!(mark_deleted(&mut conn, p.id, &to_delete).await.unwrap(), 0);
    assert_eq!(
        mark_deleted(&mut conn, other.id, &to_delete).await.unwrap(),
        0
    );
    let known = known_uidls(&mut conn, p.id, &asked).await.unwrap();
    assert!(matches!(
        known["A"],
        KnownUidl::Stored {
            copy: StoredCopy {
                headers_only: false,
                ..
            },
            deleted: true
        }
    ));

    // A failing message that finally downloads: the failure record goes with the insert.
    insert_message(&mut conn, &message(&p, "D", &parsed))
        .await
        .unwrap()
        .work_item()
        .unwrap();
    let known = known_uidls(&mut conn, p.id, &asked).await.unwrap();
    assert!(matches!(
        known["D"],
        KnownUidl::Stored {
            copy: StoredCopy {
                headers_only: false,
                ..
            },
            deleted: false
        }
    ));
    assert_eq!(count(&mut conn, "fetch_failures").await, 1);

    assert!(clear_fetch_failure(&mut conn, p.id, "E").await.unwrap());
    assert!(!clear_fetch_failure(&mut conn, p.id, "E").await.unwrap());
    assert_eq!(count(&mut conn, "fetch_failures").await, 0);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn queue_views_count_and_age_work_items() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    assert!(queue_counts(&mut conn).await.unwrap().is_empty());
    assert!(oldest_queued_age(&mut conn).await.unwrap().is_empty());
    let app = app(&mut conn, "a").await;
    let support = pilot(&mut conn, "support", "s@x", app.id).await;
    let sales = pilot(&mut conn, "sales", "sales@x", app.id).await;
    let parsed = parsed_mail();
    let mut items = Vec::new();
    for uidl in ["1", "2", "3"] {
        // Three different messages (the same one again would be held as a loop).
        let parsed = ParsedMail {
            message_id: Some(format!("m{uidl}@contoso.com")),
            ..parsed_mail()
        };
        items.push(
            insert_message(&mut conn, &message(&support, uidl, &parsed))
                .await
                .unwrap()
                .work_item()
                .unwrap(),
        );
    }
    let sales_item = insert_message(&mut conn, &message(&sales, "1", &parsed))
        .await
        .unwrap()
        .work_item()
        .unwrap();
    // Make ages deterministic: the oldest queued support item waited 5 minutes, sales 1 minute.
    sqlx::query("update work_items set enqueued_at = now() - interval '5 minutes' where id = $1")
        .bind(items[1])
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("update work_items set enqueued_at = now() - interval '1 hour', status = 'done', done_at = now() where id = $1")
        .bind(items[0])
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("update work_items set enqueued_at = now() - interval '1 minute' where id = $1")
        .bind(sales_item)
        .execute(&mut *conn)
        .await
        .unwrap();

    let counts = queue_counts(&mut conn).await.unwrap();
    let counts: Vec<(&str, &str, i64)> = counts
        .iter()
        .map(|c| (c.queue.as_str(), c.status.as_str(), c.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("sales", "queued", 1),
            ("support", "done", 1),
            ("support", "queued", 2)
        ]
    );

    let ages = oldest_queued_age(&mut conn).await.unwrap();
    assert_eq!(ages.len(), 2);
    assert_eq!(ages[0].0, "sales");
    assert!(
        ages[0].1 >= Duration::from_secs(60) && ages[0].1 < Duration::from_secs(120),
        "{ages:?}"
    );
    assert_eq!(ages[1].0, "support");
    // The done item is older but no longer queued: it does not count.
    assert!(
        ages[1].1 >= Duration::from_secs(300) && ages[1].1 < Duration::from_secs(360),
        "{ages:?}"
    );

    let recent = recent_work_items(&mut conn, 2).await.unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[0].id, items[2], "newest first");
    assert_eq!(recent[0].queue, "support");
    assert_eq!(recent[0].status, "queued");
    assert_eq!(recent[0].subject.as_deref(), Some("Order 42 is late"));
    assert_eq!(recent[0].from, parsed.from);
    assert_eq!(recent[0].attachments, 2);
    assert_eq!(recent[1].id, sales_item);
    assert_eq!(recent_work_items(&mut conn, 10).await.unwrap().len(), 4);
    drop(conn);
    db.drop_db().await.unwrap();
}

async fn next_notification(listener: &mut PgListener) -> serde_json::Value {
    let n = tokio::time::timeout(NOTIFY_DEADLINE, listener.recv())
        .await
        .expect("a notification within the deadline")
        .unwrap();
    assert_eq!(n.channel(), CONFIG_CHANNEL);
    serde_json::from_str(n.payload()).unwrap()
}

#[tokio::test]
async fn config_changes_notify_listeners_but_poll_status_does_not() {
    let db = TestDb::new().await.unwrap();
    let mut listener = PgListener::connect(db.url()).await.unwrap();
    listener.listen(CONFIG_CHANNEL).await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();

    let app = app(&mut conn, "a").await;
    let payload = next_notification(&mut listener).await;
    assert_eq!(
        payload,
        serde_json::json!({"table": "oauth_apps", "op": "insert", "id": app.id})
    );

    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let payload = next_notification(&mut listener).await;
    assert_eq!(
        payload,
        serde_json::json!({"table": "pilots", "op": "insert", "id": p.id})
    );

    // Status writes happen on every poll; they must not wake every worker. Notifications are
    // delivered in commit order, so if these had notified, they would arrive before the next.
    record_poll_success(&mut conn, p.id).await.unwrap();
    record_poll_error(&mut conn, p.id, "e", None).await.unwrap();
    set_pilot_enabled(&mut conn, p.id, false).await.unwrap();
    let payload = next_notification(&mut listener).await;
    assert_eq!(
        payload,
        serde_json::json!({"table": "pilots", "op": "update", "id": p.id})
    );

    sqlx::query("delete from pilots where id = $1")
        .bind(p.id)
        .execute(&mut *conn)
        .await
        .unwrap();
    let payload = next_notification(&mut listener).await;
    assert_eq!(
        payload,
        serde_json::json!({"table": "pilots", "op": "delete", "id": p.id})
    );
    drop(conn);
    drop(listener);
    db.drop_db().await.unwrap();
}

async fn database_exists(name: &str) -> bool {
    let mut admin = PgConnection::connect(&testing::admin_url()).await.unwrap();
    sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .unwrap()
}

#[tokio::test]
async fn test_databases_are_removed_explicitly_and_on_drop() {
    let db = TestDb::new().await.unwrap();
    let name = db.name().to_owned();
    assert!(name.starts_with("ccmail_t_"));
    assert!(database_exists(&name).await);
    db.drop_db().await.unwrap();
    assert!(!database_exists(&name).await);

    let db = TestDb::new().await.unwrap();
    let name = db.name().to_owned();
    let held = db.pool().acquire().await.unwrap();
    assert!(database_exists(&name).await);
    // The session still open is terminated by the cleanup, not waited for.
    drop(db);
    assert!(!database_exists(&name).await);
    drop(held);
}

#[tokio::test]
async fn an_existing_copy_is_described_and_derived_keys_meet_by_identity() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let parsed = parsed_mail();
    let identity = [7u8; 32];
    let mut first = message(&p, "U1", &parsed);
    first.identity = Some(identity);
    assert!(
        insert_message(&mut conn, &first)
            .await
            .unwrap()
            .work_item()
            .is_some()
    );

    // The same key again: nothing written, the stored copy described.
    let again = insert_message(&mut conn, &first).await.unwrap();
    let Inserted::Existing(copy) = again else {
        panic!("expected the existing copy, got {again:?}");
    };
    let sha: [u8; 32] = sha2::Sha256::digest(first.raw).into();
    assert_eq!(
        (copy.sha256, copy.identity, copy.headers_only),
        (sha, Some(identity), false)
    );
    assert!(copy.matches(&sha, None));
    assert!(copy.matches(&[0; 32], Some(&identity)));
    assert!(!copy.matches(&[0; 32], Some(&[8; 32])));
    assert!(!copy.matches(&[0; 32], None));

    // A derived key is known by its identity, under whatever key that identity is stored.
    let derived_key = format!("~ {}", hex::encode(identity));
    let mut derived = message(&p, &derived_key, &parsed);
    derived.identity = Some(identity);
    assert!(matches!(
        insert_message(&mut conn, &derived).await.unwrap(),
        Inserted::Existing(StoredCopy { identity: Some(i), .. }) if i == identity
    ));
    // A new identity under a derived key is stored; a trusted UIDL with that identity then
    // meets it.
    let other = [9u8; 32];
    let other_key = format!("~ {}", hex::encode(other));
    let mut derived = message(&p, &other_key, &parsed);
    derived.identity = Some(other);
    assert!(
        insert_message(&mut conn, &derived)
            .await
            .unwrap()
            .work_item()
            .is_some()
    );
    let mut trusted = message(&p, "U2", &parsed);
    trusted.identity = Some(other);
    assert!(matches!(
        insert_message(&mut conn, &trusted).await.unwrap(),
        Inserted::Existing(_)
    ));
    // Two trusted UIDLs with one identity are two work items (a handled message moved back
    // into the inbox is work again).
    let mut copy_back = message(&p, "U3", &parsed);
    copy_back.identity = Some(identity);
    assert!(
        insert_message(&mut conn, &copy_back)
            .await
            .unwrap()
            .work_item()
            .is_some()
    );
    assert_eq!(count(&mut conn, "work_items").await, 3);
    let found = stored_identities(&mut conn, p.id, &[identity, other, [1; 32]])
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn header_values_beyond_the_limits_are_cut_and_flagged() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let mut parsed = parsed_mail();
    parsed.message_id = Some(format!("{}@x", "é".repeat(3_000)));
    parsed.subject = Some("s".repeat(1_000_000));
    parsed.to = (0..100_000)
        .map(|i| Address {
            name: None,
            email: Some(format!("u{i}@example.com")),
        })
        .collect();
    parsed.references = (0..5_000).map(|i| format!("r{i}@x")).collect();
    let item = insert_message(&mut conn, &message(&p, "U", &parsed))
        .await
        .unwrap()
        .work_item()
        .unwrap();
    type Row = (String, String, i32, Vec<String>, Vec<String>);
    let row: Row = sqlx::query_as(
        "select m.message_id, m.subject, jsonb_array_length(m.to_addrs), m.\"references\", \
         w.flags from messages m join work_items w on w.message_id = m.id where w.id = $1",
    )
    .bind(item)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(row.0.len() <= header_limits::ID_BYTES && row.0.starts_with('é'));
    assert_eq!(row.1.len(), header_limits::SUBJECT_BYTES);
    assert_eq!(row.2 as usize, header_limits::ADDRESSES);
    assert_eq!(row.3.len(), header_limits::REFERENCES_IDS);
    // The thread's root and the newest references are the ones kept.
    assert_eq!(row.3.first().map(String::as_str), Some("r0@x"));
    assert_eq!(row.3.last().map(String::as_str), Some("r4999@x"));
    assert_eq!(row.4, [FLAG_HEADER_TRUNCATED]);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn the_schema_takes_both_sealed_forms_and_still_no_plaintext() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let key = MasterKey::generate();
    let secret = SecretString::from("s3cr3t".to_owned());
    let v1 = key.seal_v1(&secret).unwrap();
    let v2 = sealed(&key, "s3cr3t");
    for (i, value) in [&v1, &v2].into_iter().enumerate() {
        sqlx::query(
            "insert into oauth_apps (name, tenant, client_id, credential) values ($1, 't', $1, $2)",
        )
        .bind(format!("app-{i}"))
        .bind(value)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    for bad in [
        "enc:v3:00000000:AAAA",
        "enc:v2:nothex00:AAAA",
        "enc:v2:0000000:AAAA",
    ] {
        let err = sqlx::query(
            "insert into oauth_apps (name, tenant, client_id, credential) values ('x', 't', 'x', $1)",
        )
        .bind(bad)
        .execute(&mut *conn)
        .await
        .unwrap_err();
        assert_eq!(
            err.as_database_error().unwrap().constraint(),
            Some("oauth_apps_credential_not_plaintext"),
            "{bad}"
        );
    }
    drop(conn);
    db.drop_db().await.unwrap();
}

/// A USER/PASS pilot `local` on pop.contoso.com whose password is `credential`, stored as it is.
async fn user_pass_pilot(conn: &mut PgConnection, local: &str, credential: &str) -> PilotRow {
    let mut new = NewPilot::new(
        local,
        &format!("{local}@contoso.com"),
        PilotAuth::UserPass {
            username: local.to_owned(),
            credential: credential.to_owned(),
        },
    );
    new.host = "pop.contoso.com".to_owned();
    insert_pilot(conn, &new).await.unwrap()
}

fn password_of(pilot: &PilotRow) -> &str {
    match &pilot.auth {
        PilotAuth::UserPass { credential, .. } => credential,
        PilotAuth::XOAuth2 { .. } => panic!("a USER/PASS pilot"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_credentials_are_upgraded_for_their_rows_once_and_copies_are_left_alone() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let key = MasterKey::generate();
    let v1 = |secret: &str| key.seal_v1(&SecretString::from(secret.to_owned())).unwrap();
    let app_row = {
        let new = NewApp::new("support-app", "contoso.onmicrosoft.com", "cid-1", v1("app"));
        insert_app(&mut conn, &new).await.unwrap()
    };
    let alone = user_pass_pilot(&mut conn, "alone", &v1("pw-alone")).await;
    let shared = v1("pw-shared");
    let original = user_pass_pilot(&mut conn, "original", &shared).await;
    let copy = user_pass_pilot(&mut conn, "copy", &shared).await;
    let foreign = MasterKey::generate();
    let other_key = user_pass_pilot(
        &mut conn,
        "otherkey",
        &foreign
            .seal_v1(&SecretString::from("pw".to_owned()))
            .unwrap(),
    )
    .await;
    let reference = user_pass_pilot(&mut conn, "reference", "env:LAB_PASSWORD").await;

    let upgrade = |owner: &Owner, stored: &str| {
        ccmail::secrets::upgrade(stored, &key, owner).map_err(|e| e.to_string())
    };
    let report = upgrade_unbound_credentials(&mut conn, upgrade)
        .await
        .unwrap();
    assert_eq!(report.upgraded, 2, "{report:?}");
    assert_eq!(
        report.shared,
        vec![vec![
            CredentialHolder::Pilot { id: original.id },
            CredentialHolder::Pilot { id: copy.id }
        ]]
    );
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(
        report.failed[0].0,
        CredentialHolder::Pilot { id: other_key.id }
    );
    assert!(report.failed[0].1.contains(foreign.key_id()), "{report:?}");
    assert_eq!(report.raced, 0);

    // Each upgraded value now opens for its own row only, and the row's configuration did not
    // change (no restart of its poller, no "updated" time).
    let app_now = get_app(&mut conn, app_row.id).await.unwrap();
    assert!(
        app_now.credential.starts_with("enc:v2:"),
        "{}",
        app_now.credential
    );
    assert_eq!(app_now.updated_at, app_row.updated_at);
    let policy = ccmail::secrets::ReferencePolicy::default();
    let opened = ccmail::secrets::resolve(
        &app_now.credential,
        Some(&key),
        &policy,
        &app_now.credential_owner(),
    )
    .unwrap();
    assert_eq!(opened.expose_secret(), "app");
    let alone_now = get_pilot(&mut conn, alone.id).await.unwrap();
    let owner = alone_now.credential_owner().unwrap();
    let opened =
        ccmail::secrets::resolve(password_of(&alone_now), Some(&key), &policy, &owner).unwrap();
    assert_eq!(opened.expose_secret(), "pw-alone");
    assert!(
        ccmail::secrets::resolve(
            password_of(&alone_now),
            Some(&key),
            &policy,
            &original.credential_owner().unwrap()
        )
        .is_err()
    );
    // Copies, foreign keys and references stay exactly as they were.
    for (row, before) in [
        (&original, shared.as_str()),
        (&copy, shared.as_str()),
        (&other_key, password_of(&other_key)),
        (&reference, "env:LAB_PASSWORD"),
    ] {
        assert_eq!(
            password_of(&get_pilot(&mut conn, row.id).await.unwrap()),
            before
        );
    }

    // A second pass has nothing left to upgrade, and still reports the copies.
    let again = upgrade_unbound_credentials(&mut conn, upgrade)
        .await
        .unwrap();
    assert_eq!(again.upgraded, 0);
    assert_eq!(again.shared, report.shared);

    // The write is guarded: a value replaced between reading and writing is left to the
    // next pass (here the replacement happens inside `upgrade`, on a second connection).
    let racy = user_pass_pilot(&mut conn, "racy", &v1("pw-racy")).await;
    let mut other = db.pool().acquire().await.unwrap();
    let replacement = sealed(&key, "new");
    let mut raced_once = false;
    let report = upgrade_unbound_credentials(&mut conn, |owner, stored| {
        if !raced_once && stored == password_of(&racy) {
            raced_once = true;
            replace_password_now(&mut other, racy.id, &replacement);
        }
        upgrade(owner, stored)
    })
    .await
    .unwrap();
    assert_eq!((report.upgraded, report.raced), (0, 1), "{report:?}");
    assert_eq!(
        password_of(&get_pilot(&mut conn, racy.id).await.unwrap()),
        replacement
    );
    drop((conn, other));
    db.drop_db().await.unwrap();
}

/// Replaces pilot `id`'s password on `conn` from inside a synchronous closure (the upgrade's
/// callback), as a concurrent admin would.
fn replace_password_now(conn: &mut PgConnection, id: i64, credential: &str) {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async {
            sqlx::query("update pilots set password_credential = $2 where id = $1")
                .bind(id)
                .bind(credential)
                .execute(&mut *conn)
                .await
                .unwrap();
        })
    });
}

#[tokio::test]
async fn rotation_refuses_copies_and_an_app_resealed_on_update_is_guarded() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let key = MasterKey::generate();
    let new_key = MasterKey::generate();
    let shared = key.seal_v1(&SecretString::from("pw".to_owned())).unwrap();
    let a = user_pass_pilot(&mut conn, "a", &shared).await;
    let b = user_pass_pilot(&mut conn, "b", &shared).await;
    let err = reseal_credentials(&mut conn, |owner, stored| {
        ccmail::secrets::reseal(stored, &key, &new_key, owner).map_err(|e| e.to_string())
    })
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("pilot {}", a.id))
            && text.contains(&format!("pilot {}", b.id))
            && text.contains("copies"),
        "{text}"
    );
    assert_eq!(
        password_of(&get_pilot(&mut conn, a.id).await.unwrap()),
        shared
    );

    // update_app_resealed writes the new value only over the one it was made from.
    let mut new = NewApp::new(
        "support-app",
        "contoso.onmicrosoft.com",
        "cid-1",
        String::new(),
    );
    new.seal_credential(&key, &SecretString::from("app".to_owned()))
        .unwrap();
    let row = insert_app(&mut conn, &new).await.unwrap();
    let mut moved = new.clone();
    moved.tenant = "fabrikam.onmicrosoft.com".to_owned();
    moved.credential = ccmail::secrets::rebind(
        &row.credential,
        &key,
        &row.credential_owner(),
        &moved.credential_owner(),
    )
    .unwrap();
    let err = update_app_resealed(&mut conn, row.id, &moved, "env:SOMETHING_ELSE")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run the command again"), "{err}");
    assert_eq!(get_app(&mut conn, row.id).await.unwrap(), row);
    let updated = update_app_resealed(&mut conn, row.id, &moved, &row.credential)
        .await
        .unwrap();
    assert_eq!(updated.tenant, "fabrikam.onmicrosoft.com");
    assert_eq!(updated.credential, moved.credential);
    let policy = ccmail::secrets::ReferencePolicy::default();
    assert!(
        ccmail::secrets::resolve(
            &updated.credential,
            Some(&key),
            &policy,
            &updated.credential_owner()
        )
        .is_ok()
    );
    assert!(matches!(
        update_app_resealed(&mut conn, row.id + 100, &moved, &row.credential).await,
        Err(StoreError::NotFound { .. })
    ));
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_pilot_update_made_from_a_stale_password_fails_and_changes_nothing() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let read = user_pass_pilot(&mut conn, "p", "env:POP_PASSWORD_OLD").await;
    // Meanwhile another actor (a key rotation, another admin) replaces the password.
    let rotated =
        sqlx::query("update pilots set password_credential = 'env:POP_PASSWORD_NEW' where id = $1")
            .bind(read.id)
            .execute(&mut *conn)
            .await
            .unwrap();
    assert_eq!(rotated.rows_affected(), 1);

    let mut edited = NewPilot::new(
        "other-queue",
        &read.mailbox,
        PilotAuth::UserPass {
            username: "p".to_owned(),
            credential: password_of(&read).to_owned(),
        },
    );
    edited.host = read.host.clone();
    let err = update_pilot(&mut conn, read.id, &edited, Some(password_of(&read)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run the command again"), "{err}");
    let now = get_pilot(&mut conn, read.id).await.unwrap();
    assert_eq!(
        (now.queue.as_str(), password_of(&now)),
        ("p", "env:POP_PASSWORD_NEW")
    );

    // Made from what the row holds now, it applies.
    let mut fresh = edited.clone();
    fresh.auth = now.auth.clone();
    let updated = update_pilot(&mut conn, read.id, &fresh, Some(password_of(&now)))
        .await
        .unwrap();
    assert_eq!(updated.queue, "other-queue");
    assert!(matches!(
        update_pilot(&mut conn, 999_999, &fresh, None).await,
        Err(StoreError::NotFound { .. })
    ));
    drop(conn);
    db.drop_db().await.unwrap();
}

// Moved from the store module's own tests: they need a test database.

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_twice_is_a_no_op() {
    let db = TestDb::new().await.unwrap();
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(applied >= 1);
    migrate(db.db()).await.unwrap();
    let again: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(applied, again);
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables \
         where table_schema = 'public' and table_name <> '_sqlx_migrations' order by 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "api_keys",
            "attachments",
            "audit_log",
            "conversations",
            "fetch_failures",
            "idempotency_keys",
            "messages",
            "oauth_apps",
            "pilot_class_policies",
            "pilot_leases",
            "pilots",
            "replicas",
            "users",
            "web_sessions",
            "work_item_events",
            "work_items"
        ]
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn connect_reports_a_missing_database() {
    let base = ccmail_lab::testdb::admin_url();
    let mut options = PgConnectOptions::from_str(&base).unwrap();
    options = options.database("ccmail_t_does_not_exist_42");
    let url = options.to_url_lossy().to_string();
    let err = connect(&url, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::DatabaseMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("ccmail_t_does_not_exist_42"));
}

#[tokio::test]
async fn ensure_database_creates_once() {
    let name = format!("ccmail_t_ensure_{}", fastrand::u64(..));
    let options = PgConnectOptions::from_str(&ccmail_lab::testdb::admin_url())
        .unwrap()
        .database(&name);
    let url = options.to_url_lossy().to_string();
    assert!(ensure_database(&url).await.unwrap());
    assert!(!ensure_database(&url).await.unwrap());
    let pool = connect(&url, 1).await.unwrap();
    migrate(&pool).await.unwrap();
    pool.close().await;
    let mut admin = PgConnectOptions::from_str(&ccmail_lab::testdb::admin_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn parser_defects_are_stored_capped_and_shown_with_the_work_item() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = insert_app(
        &mut conn,
        &NewApp::new(
            "a",
            "contoso.onmicrosoft.com",
            "cid",
            "env:APP_SECRET".into(),
        ),
    )
    .await
    .unwrap();
    let pilot = insert_pilot(
        &mut conn,
        &NewPilot::new("support", "s@x", PilotAuth::XOAuth2 { app_id: app.id }),
    )
    .await
    .unwrap();
    let mut defects: Vec<String> = (0..30).map(|i| format!("defect {i}\0")).collect();
    defects[0] = "x".repeat(5000);
    let parsed = ParsedMail {
        defects,
        ..ParsedMail::default()
    };
    let new = NewMessage {
        pilot_id: pilot.id,
        queue: &pilot.queue,
        uidl: "UID-1",
        raw: b"Subject: x\r\n\r\nbody\r\n",
        parsed: &parsed,
        headers_only: false,
        flags: &[],
        identity: None,
        triage: None,
        sender_rate: None,
        sha256: None,
    };
    insert_message(&mut conn, &new).await.unwrap();
    let view = recent_work_items(&mut conn, 1).await.unwrap();
    let shown = &view[0].defects;
    assert_eq!(shown.len(), 21, "the parser's cap, and the schema's");
    assert_eq!(shown[0].len(), 1000, "each defect capped");
    assert_eq!(shown[1], "defect 1\u{FFFD}", "the one NUL rule");
    assert_eq!(view[0].status, ccmail::model::WorkItemStatus::Queued);
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_defect_of_nul_bytes_is_capped_after_the_nul_rule_and_the_message_is_stored() {
    // U+FFFD takes three bytes where NUL took one: capping before the replacement stored up to
    // three times the cap, which the schema's limit refuses, losing the whole message.
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let pilot = insert_pilot(
        &mut conn,
        &NewPilot::new(
            "support",
            "s@x",
            PilotAuth::UserPass {
                username: "s".into(),
                credential: "env:POP_PASSWORD".into(),
            },
        ),
    )
    .await
    .unwrap();
    let parsed = ParsedMail {
        defects: vec!["\0".repeat(5000); 21],
        message_id: Some(format!("<{}@x>", "\0".repeat(2000))),
        ..ParsedMail::default()
    };
    let new = NewMessage {
        pilot_id: pilot.id,
        queue: &pilot.queue,
        uidl: "UID-NUL",
        raw: b"Subject: x\r\n\r\nbody\r\n",
        parsed: &parsed,
        headers_only: false,
        flags: &[],
        identity: None,
        triage: None,
        sender_rate: None,
        sha256: None,
    };
    insert_message(&mut conn, &new).await.unwrap();
    let view = recent_work_items(&mut conn, 1).await.unwrap();
    let shown = &view[0].defects;
    assert_eq!(shown.len(), 21);
    for defect in shown {
        assert!(defect.len() <= 1000, "{} bytes", defect.len());
        assert!(defect.chars().all(|c| c == '\u{FFFD}'));
    }
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_base64_attachment_is_stored_once_and_read_back_byte_for_byte() {
    let db = TestDb::new().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let app = app(&mut conn, "a").await;
    let p = pilot(&mut conn, "support", "s@x", app.id).await;
    let mut rng = fastrand::Rng::with_seed(0xa77);
    let big: Vec<u8> = (0..100_000).map(|_| rng.u8(..)).collect();
    let small = b"short note".to_vec();
    let qp_text = "caf\u{e9} ".repeat(2_000);
    let encode = |bytes: &[u8]| {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        lines.join("\r\n")
    };
    let raw = format!(
        "From: c@example.net\r\nSubject: files\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"big.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"small.bin\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8; name=\"note.txt\"\r\n\
         Content-Disposition: attachment; filename=\"note.txt\"\r\n\
         Content-Transfer-Encoding: quoted-printable\r\n\r\n{}\r\n--b1--\r\n",
        encode(&big),
        encode(&small),
        qp_text.replace('\u{e9}', "=C3=A9")
    )
    .into_bytes();
    let parsed = ccmail::ingest::parse::parse(&raw);
    assert_eq!(parsed.attachments.len(), 3, "{parsed:?}");
    assert!(parsed.attachments[0].raw_range.is_some(), "{parsed:?}");
    assert!(
        parsed.attachments[1].raw_range.is_none(),
        "small ones keep their bytes"
    );
    assert!(
        parsed.attachments[2].raw_range.is_none(),
        "quoted-printable keeps its bytes"
    );
    let mut new = message(&p, "UID-ATT", &parsed);
    new.raw = &raw;
    let item = insert_message(&mut conn, &new)
        .await
        .unwrap()
        .work_item()
        .unwrap();
    let stored: Vec<(Option<Vec<u8>>, Option<i64>, i64)> =
        sqlx::query_as("select bytes, raw_start, size from attachments order by ordinal")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert!(
        stored[0].0.is_none() && stored[0].1.is_some(),
        "the big one is a range"
    );
    assert_eq!(stored[0].2, big.len() as i64);
    assert_eq!(stored[1].0.as_deref(), Some(&small[..]));
    for (ordinal, want) in [(0, &big), (1, &small), (2, &parsed.attachments[2].bytes)] {
        let content = attachment_content(&mut conn, item, ordinal)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&content.bytes, want, "attachment {ordinal}");
    }
    // The schema refuses an attachment with neither bytes nor a range.
    let err =
        sqlx::query("update attachments set raw_start = null, raw_end = null where bytes is null")
            .execute(&mut *conn)
            .await
            .unwrap_err();
    assert!(
        err.to_string().contains("attachments_bytes_or_range"),
        "{err}"
    );
}
