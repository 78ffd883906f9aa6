//! `ccmail api-key …` and `ccmail work …` run as the binary: a key printed once and stored as
//! a hash, refused without queues for an agent, revoked; the operator's list, show, events,
//! cancel and requeue, with the operator named in the events.

use ccmail::store::{self, lifecycle};
use ccmail_lab::testdb::TestDb;

use crate::admin::Cli;
use crate::support::work;

#[tokio::test]
async fn api_keys_are_printed_once_stored_as_a_hash_and_revoked() {
    let db = TestDb::new().await.unwrap();
    work::pilot(db.db(), "support").await;
    let cli = Cli::new(&db);
    let (_, err) = cli.fails(
        &["api-key", "create", "--name", "ann", "--role", "agent"],
        None,
    );
    assert!(err.contains("--queue"), "{err}");
    let (_, err) = cli.fails(
        &[
            "api-key", "create", "--name", "ann", "--role", "agent", "--queue", "nowhere",
        ],
        None,
    );
    assert!(err.contains("no queue \"nowhere\""), "{err}");
    let key = cli.ok(
        &[
            "api-key", "create", "--name", "ann", "--role", "agent", "--queue", "support",
        ],
        None,
    );
    let key = key.trim();
    assert!(key.starts_with("ccm_") && key.len() > 40, "{key}");
    let stored: Vec<u8> = sqlx::query_scalar("select key_hash from api_keys where name = 'ann'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        stored,
        ccmail::api::hash_key(key).to_vec(),
        "only the hash is kept"
    );
    let (_, err) = cli.fails(
        &["api-key", "create", "--name", "ann", "--role", "admin"],
        None,
    );
    assert!(err.contains("already exists"), "{err}");
    let list = cli.ok(&["api-key", "list"], None);
    assert!(list.contains("ann") && list.contains("support"), "{list}");
    assert!(!list.contains(key), "a listing never shows the key");
    cli.ok(&["api-key", "revoke", "ann"], None);
    let mut conn = db.db().acquire().await.unwrap();
    assert!(
        store::authenticate_api_key(&mut conn, &ccmail::api::hash_key(key))
            .await
            .unwrap()
            .is_none(),
        "a revoked key no longer authenticates"
    );
    let (_, err) = cli.fails(&["api-key", "revoke", "ann"], None);
    assert!(err.contains("no live API key"), "{err}");
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn operators_list_show_cancel_requeue_and_read_the_events() {
    let db = TestDb::new().await.unwrap();
    let pilot = work::pilot(db.db(), "support").await;
    let ids = work::items(db.db(), pilot, "support", 2).await;
    let mut conn = db.db().acquire().await.unwrap();
    let c = lifecycle::claim(
        &mut conn,
        "support",
        "ann",
        1,
        std::time::Duration::from_secs(30),
    )
    .await
    .unwrap();
    drop(conn);
    let cli = Cli::new(&db);
    let list = cli.ok(&["work", "list", "--status", "offered"], None);
    assert!(list.contains("ann") && list.contains("item 1"), "{list}");
    assert!(!list.contains("item 2"), "{list}");
    let show = cli.ok(&["work", "show", &ids[0].to_string()], None);
    assert!(
        show.contains("offered") && show.contains("customer@example.test"),
        "{show}"
    );
    // A requeue that expects the wrong state changes nothing and says so.
    let (_, err) = cli.fails(
        &["work", "requeue", &ids[0].to_string(), "--expect", "held"],
        None,
    );
    assert!(err.contains("is offered"), "{err}");
    let out = cli.ok(
        &["work", "cancel", &ids[0].to_string(), "--reason", "spam"],
        None,
    );
    assert!(out.contains("offered → cancelled"), "{out}");
    let mut conn = db.db().acquire().await.unwrap();
    assert!(matches!(
        lifecycle::accept(
            &mut conn,
            ids[0],
            &c[0].claim_token,
            "ann",
            std::time::Duration::from_secs(60)
        )
        .await
        .unwrap(),
        lifecycle::Step::Refused(_)
    ));
    drop(conn);
    cli.ok(
        &[
            "work",
            "requeue",
            &ids[0].to_string(),
            "--reason",
            "not spam",
        ],
        None,
    );
    let events = cli.ok(&["work", "events", &ids[0].to_string()], None);
    for word in [
        "offered",
        "cancelled",
        "requeued",
        "spam",
        "not spam",
        "cli:",
    ] {
        assert!(events.contains(word), "{word} missing:\n{events}");
    }
    let (_, err) = cli.fails(&["work", "show", "999999"], None);
    assert!(err.contains("no work item 999999"), "{err}");
    let json: serde_json::Value = cli.json(&["work", "list", "--json"]);
    assert_eq!(json.as_array().unwrap().len(), 2);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn console_accounts_take_a_password_from_stdin_only_and_store_argon2id() {
    let db = TestDb::new().await.unwrap();
    work::pilot(db.db(), "support").await;
    let cli = Cli::new(&db);
    let (_, err) = cli.fails(
        &[
            "user",
            "add",
            "--name",
            "ann",
            "--role",
            "agent",
            "--password-stdin",
        ],
        Some("long enough password\n"),
    );
    assert!(err.contains("--queue"), "{err}");
    let (_, err) = cli.fails(
        &[
            "user",
            "add",
            "--name",
            "ann",
            "--role",
            "agent",
            "--queue",
            "support",
            "--password-stdin",
        ],
        Some("short\n"),
    );
    assert!(err.contains("at least 12"), "{err}");
    let out = cli.ok(
        &[
            "user",
            "add",
            "--name",
            "ann",
            "--role",
            "agent",
            "--queue",
            "support",
            "--password-stdin",
        ],
        Some("correct horse battery staple\n"),
    );
    assert!(out.contains("created"), "{out}");
    let hash: String = sqlx::query_scalar("select password_hash from users where name = 'ann'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("correct horse"));
    assert!(
        ccmail::web::session::verify_password("correct horse battery staple".into(), hash.clone())
            .await
    );
    assert!(!ccmail::web::session::verify_password("wrong".into(), hash).await);
    let audited: i64 =
        sqlx::query_scalar("select count(*) from audit_log where action = 'user.add'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audited, 1);
    db.drop_db().await.unwrap();
}
