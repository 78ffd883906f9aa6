//! The `ccmail app` and `ccmail pilot` commands, run as the binary against a fresh database:
//! secrets never on the command line, precise validation messages, tables and `--json`,
//! update / rotate / enable / disable / remove, certificate credentials, and `pilot add --check`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use secrecy::ExposeSecret;

use ccmail::secrets::MasterKey;
use ccmail_lab::sim::entra::AppCertificate;
use ccmail_lab::testdb::TestDb;
use ccmail_lab::world::World;

const TENANT: &str = "8f2c1a9e-1111-4222-8333-944455556666";
const CLIENT: &str = "0a1b2c3d-aaaa-4bbb-8ccc-ddddeeeeffff";
const SECRET: &str = "cli~secret~value-42";

/// The `ccmail` binary run as an admin would, with its own environment and working directory.
pub(crate) struct Cli {
    pub(crate) env: Vec<(String, String)>,
    pub(crate) dir: tempfile::TempDir,
}

impl Cli {
    pub(crate) fn new(db: &TestDb) -> Cli {
        Cli {
            env: vec![
                ("DATABASE_URL".into(), db.url().to_owned()),
                (
                    "CCMAIL_MASTER_KEY".into(),
                    MasterKey::generate().to_base64().expose_secret().to_owned(),
                ),
            ],
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ccmail"))
            .args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .envs(self.env.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    pub(crate) fn ok(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "ccmail {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail; returns (exit code, stderr).
    pub(crate) fn fails(&self, args: &[&str], stdin: Option<&str>) -> (i32, String) {
        let out = self.run(args, stdin);
        assert!(!out.status.success(), "ccmail {args:?} succeeded");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args, None)).unwrap()
    }

    pub(crate) fn path(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

fn add_app(cli: &Cli, name: &str) {
    cli.ok(
        &[
            "app",
            "add",
            "--name",
            name,
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret-stdin",
            "--secret-expires",
            "2099-01-31",
        ],
        Some(&format!("{SECRET}\n")),
    );
}

#[tokio::test]
async fn a_secret_on_the_command_line_is_refused_with_how_to_pass_it() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    let (_, err) = cli.fails(
        &[
            "app",
            "add",
            "--name",
            "a",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret",
            SECRET,
        ],
        None,
    );
    assert!(
        err.contains("refusing a client secret on the command line"),
        "{err}"
    );
    assert!(
        err.contains("--secret-stdin")
            && err.contains("--secret-file")
            && err.contains("--secret-env"),
        "{err}"
    );
    assert!(
        !err.contains(SECRET),
        "the refused secret is not echoed: {err}"
    );
    assert_eq!(cli.json(&["app", "list", "--json"]), serde_json::json!([]));
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn apps_are_added_listed_shown_updated_rotated_and_removed() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    add_app(&cli, "support-app");
    let list = cli.json(&["app", "list", "--json"]);
    assert_eq!(list[0]["name"], "support-app");
    assert_eq!(list[0]["cloud"], "global");
    assert_eq!(list[0]["credential"], "client-secret");
    assert_eq!(list[0]["scope"], "https://outlook.office365.com/.default");
    assert_eq!(list[0]["expiry_status"], "ok");
    let table = cli.ok(&["app", "list"], None);
    assert!(table.starts_with("id  name"), "{table}");
    assert!(
        table.contains("support-app") && table.contains(TENANT),
        "{table}"
    );
    let shown = cli.ok(&["app", "show", "support-app"], None);
    assert!(shown.contains("sealed"), "{shown}");
    for text in [&table, &shown, &list.to_string()] {
        assert!(!text.contains(SECRET));
    }

    // Validation with precise messages.
    let (_, err) = cli.fails(
        &["app", "update", "support-app", "--tenant", "common"],
        None,
    );
    assert!(
        err.contains("AADSTS9001023") && err.contains("tenant id"),
        "{err}"
    );
    let (_, err) = cli.fails(
        &[
            "app",
            "update",
            "support-app",
            "--scope",
            "https://outlook.office365.com/POP.AccessAsApp",
        ],
        None,
    );
    assert!(err.contains("must end in /.default"), "{err}");
    let (_, err) = cli.fails(
        &[
            "app",
            "add",
            "--name",
            "x",
            "--tenant",
            "contoso",
            "--client-id",
            CLIENT,
            "--secret-env",
            "X",
        ],
        None,
    );
    assert!(err.contains("neither a GUID"), "{err}");

    // National cloud preset.
    cli.ok(&["app", "update", "support-app", "--cloud", "us-gov"], None);
    let shown = cli.json(&["app", "show", "support-app", "--json"]);
    assert_eq!(shown["cloud"], "us-gov");
    assert_eq!(shown["authority"], "https://login.microsoftonline.us");
    assert_eq!(shown["scope"], "https://outlook.office365.us/.default");

    // A pilot of a US Gov app defaults to that cloud's POP host.
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            "support@contoso.us",
            "--app",
            "support-app",
        ],
        None,
    );
    let pilot = cli.json(&["pilot", "show", "support@contoso.us", "--json"]);
    assert_eq!(pilot["host"], "outlook.office365.us");
    // The app cannot be removed while the pilot uses it.
    let (_, err) = cli.fails(&["app", "remove", "support-app"], None);
    assert!(
        err.contains("still in use") && err.contains("support@contoso.us"),
        "{err}"
    );

    // Rotation: a reference instead of a sealed secret, with a near expiry date.
    let soon = (chrono::Utc::now() + chrono::Duration::days(10))
        .date_naive()
        .to_string();
    cli.ok(
        &[
            "app",
            "rotate-secret",
            "support-app",
            "--secret-env",
            "SUPPORT_APP_SECRET",
            "--secret-expires",
            &soon,
        ],
        None,
    );
    let shown = cli.json(&["app", "show", "support-app", "--json"]);
    assert_eq!(shown["stored_as"], "env:SUPPORT_APP_SECRET");
    assert!(
        shown["expiry_status"]
            .as_str()
            .unwrap()
            .starts_with("expires in"),
        "{shown}"
    );

    cli.ok(&["pilot", "remove", "support@contoso.us"], None);
    cli.ok(&["app", "remove", "support-app"], None);
    assert_eq!(cli.json(&["app", "list", "--json"]), serde_json::json!([]));
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_certificate_credential_is_checked_and_stored() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    let cert = AppCertificate::generate("ccmail cli").unwrap();
    let other = AppCertificate::generate("other").unwrap();
    let cert_path = cli.path("app.crt", &cert.cert_pem);
    let key_path = cli.path("app.key", &cert.key_pem);
    let wrong_key = cli.path("other.key", &other.key_pem);
    let (_, err) = cli.fails(
        &[
            "app",
            "add",
            "--name",
            "cert-app",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--certificate",
            &cert_path,
            "--private-key-file",
            &wrong_key,
        ],
        None,
    );
    assert!(err.contains("does not belong to the certificate"), "{err}");
    cli.ok(
        &[
            "app",
            "add",
            "--name",
            "cert-app",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--certificate",
            &cert_path,
            "--private-key-file",
            &key_path,
            "--alg",
            "PS256",
        ],
        None,
    );
    let shown = cli.json(&["app", "show", "cert-app", "--json"]);
    assert_eq!(shown["credential"], "certificate PS256");
    assert!(!shown.to_string().contains("PRIVATE KEY"));
    // Back to a client secret.
    cli.ok(
        &["app", "rotate-secret", "cert-app", "--secret-stdin"],
        Some(SECRET),
    );
    assert_eq!(
        cli.json(&["app", "show", "cert-app", "--json"])["credential"],
        "client-secret"
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn pilots_are_validated_listed_updated_enabled_disabled_and_removed() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    add_app(&cli, "support-app");

    let (_, err) = cli.fails(
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            "support",
            "--app",
            "support-app",
        ],
        None,
    );
    assert!(err.contains("is not an e-mail address"), "{err}");
    let (_, err) = cli.fails(
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            "support@contoso.com",
            "--app",
            "nope",
        ],
        None,
    );
    assert!(
        err.contains("must exist") && err.contains("ccmail app add"),
        "{err}"
    );
    let (code, err) = cli.fails(
        &[
            "pilot",
            "add",
            "--queue",
            "q",
            "--mailbox",
            "support@contoso.com",
            "--app",
            "support-app",
            "--port",
            "0",
        ],
        None,
    );
    assert_eq!(code, 2, "usage error");
    assert!(err.contains("--port"), "{err}");
    let (_, err) = cli.fails(
        &[
            "pilot",
            "add",
            "--queue",
            "q",
            "--mailbox",
            "support@contoso.com",
            "--password",
            "x",
        ],
        None,
    );
    assert!(err.contains("--password-stdin"), "{err}");

    let added = cli.json(&[
        "pilot",
        "add",
        "--queue",
        "support",
        "--mailbox",
        "support@contoso.com",
        "--app",
        "support-app",
        "--json",
    ]);
    // The Exchange Online defaults of the seed walk-through.
    assert_eq!(added["host"], "outlook.office365.com");
    assert_eq!(added["port"], 995);
    assert_eq!(added["tls"], "implicit");
    assert_eq!(added["auth"], "xoauth2");
    assert_eq!(added["app"], "support-app");
    assert_eq!(added["poll_interval_secs"], 60);
    assert_eq!(added["keep_on_server"], false);
    assert_eq!(added["enabled"], true);
    let id = added["id"].as_i64().unwrap().to_string();

    let (_, err) = cli.fails(
        &[
            "pilot",
            "add",
            "--queue",
            "other",
            "--mailbox",
            "Support@Contoso.com",
            "--app",
            "support-app",
        ],
        None,
    );
    assert!(
        err.contains("already polls") && err.contains("pilot update"),
        "{err}"
    );

    cli.ok(
        &[
            "pilot",
            "update",
            &id,
            "--port",
            "1995",
            "--queue",
            "vip",
            "--poll-interval",
            "30",
            "--keep-on-server",
            "--max-message-bytes",
            "1048576",
        ],
        None,
    );
    let shown = cli.json(&["pilot", "show", &id, "--json"]);
    assert_eq!(shown["port"], 1995);
    assert_eq!(shown["queue"], "vip");
    assert_eq!(shown["poll_interval_secs"], 30);
    assert_eq!(shown["keep_on_server"], true);
    assert_eq!(shown["max_message_bytes"], 1_048_576);

    cli.ok(&["pilot", "disable", "support@contoso.com"], None);
    assert_eq!(
        cli.json(&["pilot", "show", &id, "--json"])["enabled"],
        false
    );
    let table = cli.ok(&["pilot", "list"], None);
    assert!(
        table.contains("support@contoso.com") && table.contains("no"),
        "{table}"
    );
    cli.ok(&["pilot", "enable", &id], None);
    assert_eq!(cli.json(&["pilot", "list", "--json"])[0]["enabled"], true);

    cli.ok(&["pilot", "remove", &id], None);
    assert_eq!(
        cli.json(&["pilot", "list", "--json"]),
        serde_json::json!([])
    );
    let (_, err) = cli.fails(&["pilot", "show", &id], None);
    assert!(err.contains("not found"), "{err}");
    db.drop_db().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_add_check_runs_doctor_and_saves_only_what_passes() {
    ccmail::tls::install_crypto_provider();
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    let world = World::builder()
        .ca_name("admin CLI CA")
        .tenant(TENANT)
        .domain("contoso.example")
        .client_id(CLIENT)
        .client_secret(SECRET)
        .mailboxes(["support@contoso.example", "sales@fabrikam.example"])
        .start()
        .await
        .unwrap();
    let (ca, entra, pop) = (&world.ca, &world.entra, &world.pop);
    let ca_path = cli.path("ca.pem", ca.cert_pem());
    cli.env
        .push(("CCMAIL_OAUTH_EXTRA_CA_FILE".into(), ca_path.clone()));
    let authority = entra.authority();
    cli.env
        .push(("CCMAIL_OAUTH_ALLOWED_AUTHORITIES".into(), authority.clone()));
    cli.env.push((
        "CCMAIL_POP3_ALLOWED_XOAUTH2_HOSTS".into(),
        "127.0.0.1".into(),
    ));
    cli.ok(
        &[
            "app",
            "add",
            "--name",
            "sim-app",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--authority",
            &authority,
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    let port = pop.tls_addr().port().to_string();
    let common = [
        "--app",
        "sim-app",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--ca-bundle",
        &ca_path,
        "--check",
    ];
    // Outside the app's tenant: Exchange's generic failure, the checklist, exit code 30.
    let mut args = vec![
        "pilot",
        "add",
        "--queue",
        "sales",
        "--mailbox",
        "sales@fabrikam.example",
    ];
    args.extend(common);
    let out = cli.run(&args, None);
    assert_eq!(out.status.code(), Some(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[FAIL] login"), "{stdout}");
    assert!(
        stdout.contains(&format!("New-ServicePrincipal -AppId {CLIENT}")),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("pilot not saved"));
    assert_eq!(
        cli.json(&["pilot", "list", "--json"]),
        serde_json::json!([])
    );

    let mut args = vec![
        "pilot",
        "add",
        "--queue",
        "support",
        "--mailbox",
        "support@contoso.example",
    ];
    args.extend(common);
    let stdout = cli.ok(&args, None);
    assert!(stdout.contains("[PASS] login"), "{stdout}");
    assert!(
        stdout.contains("pilot support@contoso.example added"),
        "{stdout}"
    );

    // doctor on the stored pilot, as JSON for scripts.
    let report = cli.json(&["doctor", "--pilot", "support@contoso.example", "--json"]);
    assert_eq!(report["failure"], serde_json::Value::Null);
    assert_eq!(report["messages"], 0);
    pop.shutdown();
    entra.shutdown();
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn key_rotate_reseals_every_secret_under_the_new_key() {
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    add_app(&cli, "rotating");
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "billing",
            "--mailbox",
            "billing@mail.example",
            "--host",
            "pop.mail.example",
            "--password-stdin",
        ],
        Some("pilot-password-7\n"),
    );
    let old = MasterKey::from_base64(&cli.env[1].1).unwrap();
    let new = MasterKey::generate();
    let new_file = cli.dir.path().join("new.key");
    std::fs::write(&new_file, new.to_base64().expose_secret()).unwrap();

    let out = cli.ok(
        &[
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.contains("2 secret(s) re-sealed"), "{out}");
    assert!(out.contains(new.key_id()), "{out}");

    let mut conn = db.pool().acquire().await.unwrap();
    let app = ccmail::store::get_app_by_name(&mut conn, "rotating")
        .await
        .unwrap();
    let pilot = &ccmail::store::list_pilots(&mut conn).await.unwrap()[0];
    let ccmail::store::PilotAuth::UserPass { credential, .. } = &pilot.auth else {
        panic!("a USER/PASS pilot was added")
    };
    let owners = [app.credential_owner(), pilot.credential_owner().unwrap()];
    for ((stored, plain), owner) in [(&app.credential, SECRET), (credential, "pilot-password-7")]
        .into_iter()
        .zip(&owners)
    {
        assert!(
            stored.starts_with(&format!("enc:v2:{}:", new.key_id())),
            "{stored}"
        );
        let policy = ccmail::secrets::ReferencePolicy::default();
        let opened = ccmail::secrets::resolve(stored, Some(&new), &policy, owner).unwrap();
        assert_eq!(opened.expose_secret(), plain);
        assert!(ccmail::secrets::resolve(stored, Some(&old), &policy, owner).is_err());
    }

    // An interrupted rotation can simply be run again: what is already under the new key
    // stays as it is.
    let out = cli.ok(
        &[
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.contains("0 secret(s) re-sealed"), "{out}");
    // With the new key configured, rotating to the same key is a no-op.
    cli.env[1].1 = new.to_base64().expose_secret().to_owned();
    let out = cli.ok(
        &[
            "key",
            "rotate",
            "--new-key-file",
            new_file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.contains("0 secret(s) re-sealed"), "{out}");
    drop(conn);
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_bad_master_key_names_the_command_that_makes_one() {
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    cli.env[1].1 = "not-a-master-key".to_owned();
    let (_, err) = cli.fails(
        &[
            "app",
            "add",
            "--name",
            "a",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret-stdin",
        ],
        Some(SECRET),
    );
    assert!(
        err.contains("ccmail key generate") && !err.contains("secrets generate-key"),
        "{err}"
    );
    // The command it names works with the bad key still set: that is how the key is replaced.
    let new_key = cli.ok(&["key", "generate"], None);
    assert!(MasterKey::from_base64(new_key.trim()).is_ok(), "{new_key}");
    db.drop_db().await.unwrap();
}

/// The SQLSTATE and constraint of a statement the schema refused.
fn refused_by(result: Result<sqlx::postgres::PgQueryResult, sqlx::Error>) -> (String, String) {
    let err = result.expect_err("the database accepted it");
    let db = err.as_database_error().expect("a database error");
    (
        db.code().unwrap_or_default().into_owned(),
        db.constraint().unwrap_or_default().to_owned(),
    )
}

#[tokio::test]
async fn every_admin_set_text_has_a_limit_in_the_cli_and_in_the_database() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    add_app(&cli, "support-app");
    let long_queue = "q".repeat(10 * 1024);
    let pilot = |queue: &str, mailbox: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "pilot",
            "add",
            "--queue",
            queue,
            "--mailbox",
            mailbox,
            "--app",
            "support-app",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let fails = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.fails(&args, None).1
    };
    let err = fails(pilot(&long_queue, "support@contoso.com", &[]));
    assert!(
        err.contains("queue") && err.contains("10240 characters") && err.contains("at most 100"),
        "{err}"
    );
    assert!(
        !err.contains(&long_queue),
        "the 10 KB value is echoed: {err}"
    );
    let err = fails(pilot("sup\u{1b}[2Jport", "support@contoso.com", &[]));
    assert!(
        err.contains("queue") && err.contains("control character"),
        "{err}"
    );
    let long_mailbox = format!("{}@contoso.com", "m".repeat(400));
    let err = fails(pilot("support", &long_mailbox, &[]));
    assert!(
        err.contains("mailbox") && err.contains("at most 320"),
        "{err}"
    );
    let long_host = format!("{}.example", "h".repeat(300));
    let err = fails(pilot(
        "support",
        "support@contoso.com",
        &["--host", &long_host],
    ));
    assert!(err.contains("host") && err.contains("at most 253"), "{err}");
    let long_path = format!("/tmp/{}", "p".repeat(5000));
    let err = fails(pilot(
        "support",
        "support@contoso.com",
        &["--ca-bundle", &long_path],
    ));
    assert!(
        err.contains("CA bundle path") && err.contains("at most 4096"),
        "{err}"
    );
    for (flag, value, field, limit) in [
        ("--name", "n".repeat(200), "app name", "at most 100"),
        (
            "--tenant",
            format!("{}.onmicrosoft.com", "t".repeat(300)),
            "tenant",
            "at most 253",
        ),
        ("--client-id", "c".repeat(200), "client id", "at most 100"),
    ] {
        let mut args = vec![
            "app",
            "add",
            "--name",
            "other-app",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret-env",
            "OTHER_APP_SECRET",
        ];
        let at = args.iter().position(|a| *a == flag).unwrap() + 1;
        args[at] = &value;
        let (_, err) = cli.fails(&args, None);
        assert!(err.contains(field) && err.contains(limit), "{flag}: {err}");
    }
    // The CLI's update goes through the same checks.
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            "support@contoso.com",
            "--app",
            "support-app",
        ],
        None,
    );
    let (_, err) = cli.fails(
        &[
            "pilot",
            "update",
            "support@contoso.com",
            "--queue",
            &long_queue,
        ],
        None,
    );
    assert!(err.contains("at most 100"), "{err}");
    assert_eq!(
        cli.json(&["pilot", "show", "support@contoso.com", "--json"])["queue"],
        "support"
    );

    // Straight into the database: the schema refuses it too.
    let mut conn = db.pool().acquire().await.unwrap();
    let app_id: i64 = sqlx::query_scalar("select id from oauth_apps where name = 'support-app'")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let insert = sqlx::query(
        "insert into pilots (queue, mailbox, auth, app_id) values ($1, 'raw@contoso.com', 'xoauth2', $2)",
    )
    .bind(&long_queue)
    .bind(app_id)
    .execute(&mut *conn)
    .await;
    assert_eq!(
        refused_by(insert),
        ("23514".to_owned(), "pilots_queue_limits".to_owned())
    );
    for (statement, constraint) in [
        (
            "update pilots set queue = repeat('q', 101)",
            "pilots_queue_limits",
        ),
        (
            "update pilots set queue = E'sup\\x1bport'",
            "pilots_queue_limits",
        ),
        (
            "update pilots set mailbox = repeat('m', 321)",
            "pilots_mailbox_limits",
        ),
        (
            "update pilots set host = repeat('h', 254)",
            "pilots_host_limits",
        ),
        (
            "update pilots set ca_bundle = repeat('p', 4097)",
            "pilots_ca_bundle_limits",
        ),
        (
            "update oauth_apps set name = repeat('n', 101)",
            "oauth_apps_name_limits",
        ),
        (
            "update oauth_apps set tenant = repeat('t', 254)",
            "oauth_apps_tenant_limits",
        ),
        (
            "update oauth_apps set client_id = repeat('c', 101)",
            "oauth_apps_client_id_limits",
        ),
    ] {
        let result = sqlx::query(statement).execute(&mut *conn).await;
        assert_eq!(
            refused_by(result),
            ("23514".to_owned(), constraint.to_owned()),
            "{statement}"
        );
    }
    drop(conn);
    db.drop_db().await.unwrap();
}

async fn app_credential(db: &TestDb, name: &str) -> String {
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query_scalar("select credential from oauth_apps where name = $1")
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

async fn pilot_credential(db: &TestDb, id: i64) -> String {
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query_scalar("select password_credential from pilots where id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
}

/// Whether `stored` opens as the credential of `owner` with the CLI's master key.
fn opens_for(cli: &Cli, stored: &str, owner: &ccmail::secrets::Owner) -> bool {
    let key = MasterKey::from_base64(&cli.env[1].1).unwrap();
    ccmail::secrets::resolve(
        stored,
        Some(&key),
        &ccmail::secrets::ReferencePolicy::default(),
        owner,
    )
    .is_ok()
}

/// A sealed credential opens only for the fields it was sealed with, so changing one of them
/// seals it again (with the master key), is refused without the key (saying how to proceed),
/// and cannot move a value copied from another row. Fields it is not bound to change freely.
#[tokio::test]
async fn changing_a_field_a_sealed_credential_is_bound_to_seals_it_again_and_needs_the_key() {
    use ccmail::pop3::TlsMode;
    use ccmail::secrets::Owner;
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    add_app(&cli, "support-app");
    let before = app_credential(&db, "support-app").await;
    let key_env = cli.env.remove(1);
    // The name is no part of the binding: no key needed, the value stays.
    cli.ok(&["app", "update", "support-app", "--name", "support"], None);
    assert_eq!(app_credential(&db, "support").await, before);
    let other_tenant = "1f2e3d4c-0000-4000-8000-000000000abc";
    let (_, err) = cli.fails(
        &["app", "update", "support", "--tenant", other_tenant],
        None,
    );
    assert!(
        err.contains("needs the master key")
            && err.contains("CCMAIL_MASTER_KEY")
            && err.contains("rotate-secret support --secret-env"),
        "{err}"
    );
    assert_eq!(
        cli.json(&["app", "show", "support", "--json"])["tenant"],
        TENANT
    );
    assert_eq!(app_credential(&db, "support").await, before);
    cli.env.insert(1, key_env);
    cli.ok(
        &["app", "update", "support", "--tenant", other_tenant],
        None,
    );
    let after = app_credential(&db, "support").await;
    assert!(after != before && after.starts_with("enc:v2:"), "{after}");
    let authority = "https://login.microsoftonline.com";
    assert!(opens_for(
        &cli,
        &after,
        &Owner::app(authority, other_tenant, CLIENT, false)
    ));
    assert!(!opens_for(
        &cli,
        &after,
        &Owner::app(authority, TENANT, CLIENT, false)
    ));

    // Pilots: host, port and TLS mode.
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "billing",
            "--mailbox",
            "billing@mail.example",
            "--host",
            "pop.mail.example",
            "--secret-stdin",
        ],
        Some("pilot-password-7\n"),
    );
    let id = cli.json(&["pilot", "list", "--json"])[0]["id"]
        .as_i64()
        .unwrap();
    let arg = id.to_string();
    let before = pilot_credential(&db, id).await;
    let at =
        |host: &str, port: u16| Owner::pilot(host, port, TlsMode::Implicit, "billing@mail.example");
    assert!(opens_for(&cli, &before, &at("pop.mail.example", 995)));
    cli.ok(&["pilot", "update", &arg, "--port", "1995"], None);
    let after = pilot_credential(&db, id).await;
    assert!(after != before && after.starts_with("enc:v2:"), "{after}");
    assert!(opens_for(&cli, &after, &at("pop.mail.example", 1995)));
    assert!(!opens_for(&cli, &after, &at("pop.mail.example", 995)));

    let key_env = cli.env.remove(1);
    cli.ok(&["pilot", "update", &arg, "--queue", "vip"], None);
    assert_eq!(pilot_credential(&db, id).await, after);
    let (_, err) = cli.fails(
        &["pilot", "update", &arg, "--host", "pop.attacker.example"],
        None,
    );
    assert!(
        err.contains("needs the master key") && err.contains("--secret-stdin"),
        "{err}"
    );
    let shown = cli.json(&["pilot", "show", &arg, "--json"]);
    assert_eq!(shown["host"], "pop.mail.example");
    assert_eq!(pilot_credential(&db, id).await, after);
    // A new password in the same command needs no re-seal (a reference needs no key).
    cli.ok(
        &[
            "pilot",
            "update",
            &arg,
            "--host",
            "pop2.mail.example",
            "--secret-env",
            "BILLING_PASSWORD",
        ],
        None,
    );
    assert_eq!(pilot_credential(&db, id).await, "env:BILLING_PASSWORD");
    cli.env.insert(1, key_env);

    // A value copied in from another pilot does not open for this one, so it cannot be
    // carried along by an update either.
    cli.ok(
        &[
            "pilot",
            "add",
            "--queue",
            "sales",
            "--mailbox",
            "sales@mail.example",
            "--host",
            "pop.mail.example",
            "--secret-stdin",
        ],
        Some("sales-password-8\n"),
    );
    let sales = cli.json(&["pilot", "show", "sales@mail.example", "--json"])["id"]
        .as_i64()
        .unwrap();
    let copied = pilot_credential(&db, sales).await;
    {
        let mut conn = db.pool().acquire().await.unwrap();
        sqlx::query("update pilots set password_credential = $2 where id = $1")
            .bind(id)
            .bind(&copied)
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let (_, err) = cli.fails(&["pilot", "update", &arg, "--port", "2995"], None);
    assert!(err.contains("sealed for another pilot"), "{err}");
    assert_eq!(pilot_credential(&db, id).await, copied);
    db.drop_db().await.unwrap();
}
