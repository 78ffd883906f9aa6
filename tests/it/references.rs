//! Stored credentials that cannot be turned against the master key, by someone who may add apps
//! and pilots (through the CLI or straight in the database) but does not hold the key:
//! `env:` references to ccmail's own settings or the database login, `file:` references to
//! `/proc` or outside the secrets directory, token authorities outside the allow-list, plaintext
//! POP3 to a remote host, and settings files whose parse errors would quote their content.
//!
//! The CLI refuses each early with a clear message; the worker refuses rows written straight
//! into the database where it resolves them, and sends nothing.

use std::time::Duration;

use anyhow::{Context, ensure};
use secrecy::ExposeSecret;

use ccmail::sim::entra::EntraSim;
use ccmail::sim::mailgen::{Kind, MailGen};
use ccmail::store::{self, testing::TestDb};

use crate::admin::Cli;
use crate::metrics::wait_for;
use crate::support::child::CcmailChild;
use crate::support::pipeline::{Ledger, SimWorld};

const TENANT: &str = "8f2c1a9e-1111-4222-8333-944455556666";
const CLIENT: &str = "0a1b2c3d-aaaa-4bbb-8ccc-ddddeeeeffff";

fn app_add<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "app",
        "add",
        "--name",
        name,
        "--tenant",
        TENANT,
        "--client-id",
        CLIENT,
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test]
async fn the_cli_refuses_references_to_ccmail_settings_process_secrets_and_special_files() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    for name in [
        "CCMAIL_MASTER_KEY",
        "CCMAIL_SECRETS_MASTER_KEY_FILE",
        "ccmail_master_key",
        "DATABASE_URL",
        "PGPASSWORD",
    ] {
        let (_, err) = cli.fails(&app_add("a", &["--secret-env", name]), None);
        assert!(
            err.contains(&format!("env:{name}")) && err.contains("refused"),
            "{name}: {err}"
        );
        let (_, err) = cli.fails(
            &[
                "pilot",
                "add",
                "--queue",
                "billing",
                "--mailbox",
                "billing@mail.example",
                "--host",
                "pop.mail.example",
                "--secret-env",
                name,
            ],
            None,
        );
        assert!(
            err.contains(&format!("env:{name}")) && err.contains("refused"),
            "{name}: {err}"
        );
    }
    // Reading a process's environment (or any special file) and sealing it is refused too.
    for path in ["/proc/self/environ", "/proc/1/cmdline", "/dev/zero"] {
        let (_, err) = cli.fails(&app_add("a", &["--secret-file", path]), None);
        assert!(err.contains(path) && err.contains("refused"), "{err}");
    }
    let dir = cli.dir.path().display().to_string();
    let (_, err) = cli.fails(&app_add("a", &["--secret-file", &dir]), None);
    assert!(err.contains("not a regular file"), "{err}");
    let big = cli.path("big.secret", &"x".repeat(200 * 1024));
    let (_, err) = cli.fails(&app_add("a", &["--secret-file", &big]), None);
    assert!(err.contains("larger than"), "{err}");
    assert_eq!(cli.json(&["app", "list", "--json"]), serde_json::json!([]));

    // A variable of its own is fine.
    cli.ok(&app_add("a", &["--secret-env", "SUPPORT_APP_SECRET"]), None);
    let shown = cli.json(&["app", "show", "a", "--json"]);
    assert_eq!(shown["stored_as"], "env:SUPPORT_APP_SECRET");
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn the_cli_refuses_a_token_authority_outside_the_allow_list() {
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    let attacker = "https://login.attacker.example";
    let (_, err) = cli.fails(
        &app_add(
            "a",
            &["--authority", attacker, "--secret-env", "APP_SECRET"],
        ),
        None,
    );
    assert!(
        err.contains(attacker) && err.contains("oauth.allowed_authorities"),
        "{err}"
    );
    // Tricks on the URL do not get past it.
    for trick in [
        "https://login.microsoftonline.com.attacker.example",
        "https://login.microsoftonline.com@attacker.example",
        "https://login.microsoftonline.com:8443",
    ] {
        let (_, err) = cli.fails(
            &app_add("a", &["--authority", trick, "--secret-env", "APP_SECRET"]),
            None,
        );
        assert!(err.contains("oauth.allowed_authorities"), "{trick}: {err}");
    }
    // Every preset cloud is allowed by default.
    cli.ok(
        &app_add("a", &["--cloud", "china", "--secret-env", "APP_SECRET"]),
        None,
    );
    let (_, err) = cli.fails(&["app", "update", "a", "--authority", attacker], None);
    assert!(err.contains("oauth.allowed_authorities"), "{err}");
    cli.env.push((
        "CCMAIL_OAUTH_ALLOWED_AUTHORITIES".into(),
        format!("https://login.microsoftonline.com,{attacker}"),
    ));
    cli.ok(&["app", "update", "a", "--authority", attacker], None);
    assert_eq!(
        cli.json(&["app", "show", "a", "--json"])["authority"],
        attacker
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn dangerous_plaintext_is_for_loopback_only_unless_the_settings_file_allows_more() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    let add = |host: &'static str, mailbox: &'static str| {
        vec![
            "pilot",
            "add",
            "--queue",
            "lab",
            "--mailbox",
            mailbox,
            "--host",
            host,
            "--port",
            "110",
            "--tls",
            "dangerous_plaintext",
            "--secret-stdin",
        ]
    };
    let (_, err) = cli.fails(&add("pop.contoso.com", "a@contoso.com"), Some("pw\n"));
    assert!(
        err.contains("pop.contoso.com")
            && err.contains("pop3.dangerous_allow_plaintext_to_remote_hosts"),
        "{err}"
    );
    assert_eq!(
        cli.json(&["pilot", "list", "--json"]),
        serde_json::json!([])
    );

    let out = cli.run(&add("127.0.0.1", "b@contoso.com"), Some("pw\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARNING") && stderr.contains("without TLS"),
        "{stderr}"
    );

    // The second switch lives in the settings file (never in the database).
    let config = cli.path(
        "ccmail.toml",
        "[pop3]\ndangerous_allow_plaintext_to_remote_hosts = true\n",
    );
    let mut args = vec!["--config", config.as_str()];
    args.extend(add("pop.contoso.com", "c@contoso.com"));
    let out = cli.run(&args, Some("pw\n"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARNING") && stderr.contains("pop.contoso.com"),
        "{stderr}"
    );
    db.drop_db().await.unwrap();
}

#[tokio::test]
async fn a_settings_file_error_names_file_line_and_column_and_quotes_nothing() {
    let db = TestDb::new().await.unwrap();
    let cli = Cli::new(&db);
    const SECRET: &str = "Hunter2-Very-Secret";
    for (name, text, line) in [
        (
            "unterminated.toml",
            format!(
                "[log]\nlevel = \"info\"\n\n[database]\nurl = \"postgres://svc:{SECRET}@db/ccmail\n"
            ),
            5,
        ),
        (
            "wrong-type.toml",
            format!("[worker]\nbatch_messages = 5\nmax_retr_attempts = \"{SECRET}\"\n"),
            3,
        ),
        (
            "unknown-key.toml",
            format!("[secrets]\nmaster_key = \"{SECRET}\"\n"),
            2,
        ),
    ] {
        let path = cli.path(name, &text);
        let (_, err) = cli.fails(&["--config", &path, "pilot", "list"], None);
        assert!(!err.contains(SECRET), "{name} quoted the file: {err}");
        assert!(
            err.contains(name) && err.contains(&format!("line {line}")) && err.contains("column"),
            "{name}: {err}"
        );
    }
    db.drop_db().await.unwrap();
}

/// Rows an attacker could write straight into the database: a foreign authority for an app
/// with a real sealed secret, and USER/PASS pilots whose password names the master key, the
/// database URL or a process's environment. The worker resolves none of them, sends nothing
/// to anyone, records why on each pilot, and keeps ingesting for the pilot that is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_resolves_no_reference_or_authority_that_would_leak_a_secret()
-> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    // The attacker's token endpoint: TLS the worker trusts, an authority no operator allowed.
    let attacker = EntraSim::start(&world.ca).await?;
    let mut conn = world.db.pool().acquire().await?;
    // As rows from before the schema refused reserved names.
    for (table, constraint) in [
        ("oauth_apps", "oauth_apps_credential_env_not_reserved"),
        ("pilots", "pilots_password_env_not_reserved"),
    ] {
        sqlx::query(&format!(
            "alter table {table} drop constraint if exists {constraint}"
        ))
        .execute(&mut *conn)
        .await?;
    }
    let mut foreign_app = store::NewApp::new(
        "foreign",
        &world.app.tenant,
        &world.app.client_id,
        world
            .key
            .seal(&secrecy::SecretString::from(world.client_secret.clone()))?,
    );
    foreign_app.authority = attacker.authority();
    let foreign_app = store::insert_app(&mut conn, &foreign_app).await?;
    let foreign = world
        .add_pilot("foreign", |p| {
            p.auth = store::PilotAuth::XOAuth2 {
                app_id: foreign_app.id,
            }
        })
        .await?;
    let mut refused = vec![(foreign.id, "oauth.allowed_authorities")];
    for (local, reference, reason) in [
        ("keypass", "env:CCMAIL_MASTER_KEY", "CCMAIL_MASTER_KEY"),
        ("dbpass", "env:DATABASE_URL", "DATABASE_URL"),
        ("environ", "file:/proc/self/environ", "secrets.dir"),
    ] {
        let row = world.add_user_pass_pilot(local, "unused", |_| {}).await?;
        sqlx::query("update pilots set password_credential = $2 where id = $1")
            .bind(row.id)
            .bind(reference)
            .execute(&mut *conn)
            .await?;
        refused.push((row.id, reason));
    }
    let good = world
        .add_user_pass_pilot("good", "good-password-1", |_| {})
        .await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0x7e5);
    ledger.deliver(
        &world.pop,
        &good.mailbox,
        mails.message(&good.mailbox, Kind::Plain),
    )?;

    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\ninitial_backoff_secs = 1\nmax_backoff_secs = 2\n\
             permanent_retry_secs = 1\n\n[oauth]\nextra_ca_file = {:?}\n\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string()
        ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    let mut child = CcmailChild::spawn(
        world.dir(),
        "run",
        &["--config", &config_arg, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
    )?;
    let ids: Vec<i64> = refused.iter().map(|(id, _)| *id).collect();
    let pool = world.db.pool().clone();
    let errors = wait_for(
        "every refused pilot to show its error and the good one to ingest",
        Duration::from_secs(60),
        || {
            let (pool, ids, pop, mailbox) = (
                pool.clone(),
                ids.clone(),
                world.pop.clone(),
                good.mailbox.clone(),
            );
            async move {
                let mut conn = pool.acquire().await.ok()?;
                let pilots = store::list_pilots(&mut conn).await.ok()?;
                let errors: Vec<(i64, String)> = pilots
                    .iter()
                    .filter(|p| ids.contains(&p.id))
                    .filter_map(|p| p.last_error.clone().map(|e| (p.id, e)))
                    .collect();
                (errors.len() == ids.len() && pop.messages(&mailbox).is_empty()).then_some(errors)
            }
        },
    )
    .await
    .with_context(|| child.output())?;
    child.assert_running()?;
    for (id, reason) in &refused {
        let (_, error) = errors
            .iter()
            .find(|(e, _)| e == id)
            .context("a refused pilot without an error")?;
        ensure!(
            error.contains(reason),
            "pilot {id}: expected {reason:?} in {error:?}"
        );
    }
    ensure!(
        attacker.token_requests() == 0,
        "the worker sent {} token request(s) to an authority outside the allow-list",
        attacker.token_requests()
    );
    ensure!(
        world.pop.auth_failures() == 0,
        "the worker sent {} wrong password(s): a reference was resolved",
        world.pop.auth_failures()
    );
    ledger
        .check(&world.heads(&[good.id]).await?)
        .assert_exactly_once()?;
    let output = child.output();
    ensure!(
        !output.contains(key.expose_secret()) && !output.contains(&world.client_secret),
        "a secret reached the log"
    );
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    drop(conn);
    attacker.shutdown();
    world.finish().await
}

/// The supervisor's resolver under the policies the settings can give: the authority allow-list,
/// plaintext only to loopback (or everywhere with the second switch), `file:` only inside the
/// secrets directory, reserved `env:` names never.
#[tokio::test]
async fn resolve_pilot_applies_the_credential_policy_of_the_settings() -> anyhow::Result<()> {
    use crate::support::pipeline::test_timeouts;
    use ccmail::ingest::poller::PilotAuth as Login;
    use ccmail::ingest::supervisor::resolve_pilot;
    use ccmail::pop3::TlsMode;
    use ccmail::secrets::CredentialPolicy;

    let world = SimWorld::start().await?;
    let allowed = world.credential_policy();
    let xoauth2 = world.add_pilot("support", |_| {}).await?;
    resolve_pilot(
        &xoauth2,
        Some(&world.app),
        Some(&world.key),
        &allowed,
        test_timeouts(),
    )?;
    let err = resolve_pilot(
        &xoauth2,
        Some(&world.app),
        Some(&world.key),
        &CredentialPolicy::default(),
        test_timeouts(),
    )
    .unwrap_err();
    ensure!(
        err.to_string().contains("oauth.allowed_authorities"),
        "{err}"
    );
    ensure!(err.hint().is_some(), "a refusal says what to do");

    let remote = world
        .add_user_pass_pilot("lab", "lab-password", |p| {
            p.host = "pop.lab.example".to_owned();
            p.tls = TlsMode::DangerousPlaintext;
            p.ca_bundle = None;
        })
        .await?;
    let err =
        resolve_pilot(&remote, None, Some(&world.key), &allowed, test_timeouts()).unwrap_err();
    ensure!(
        err.to_string()
            .contains("pop3.dangerous_allow_plaintext_to_remote_hosts"),
        "{err}"
    );
    let mut lab = allowed.clone();
    lab.plaintext_to_remote_hosts = true;
    resolve_pilot(&remote, None, Some(&world.key), &lab, test_timeouts())?;
    let mut loopback = remote.clone();
    loopback.host = "127.0.0.1".to_owned();
    resolve_pilot(&loopback, None, Some(&world.key), &allowed, test_timeouts())?;

    // file: inside the secrets directory only, symlinks followed.
    let secrets = world.dir().join("secrets");
    std::fs::create_dir(&secrets)?;
    std::fs::write(secrets.join("lab.secret"), "from-a-file\n")?;
    std::fs::write(world.dir().join("outside.secret"), "outside\n")?;
    std::os::unix::fs::symlink(
        world.dir().join("outside.secret"),
        secrets.join("escape.secret"),
    )?;
    let mut in_dir = allowed.clone();
    in_dir.references.dir = Some(secrets.clone());
    let with = |credential: &str| {
        let mut row = loopback.clone();
        row.auth = store::PilotAuth::UserPass {
            username: "lab@contoso.test".to_owned(),
            credential: credential.to_owned(),
        };
        row
    };
    let pilot = resolve_pilot(
        &with("file:lab.secret"),
        None,
        None,
        &in_dir,
        test_timeouts(),
    )?;
    let Login::UserPass { password, .. } = &pilot.auth else {
        anyhow::bail!("a USER/PASS pilot resolved to another login");
    };
    ensure!(password.expose_secret() == "from-a-file");
    for (credential, policy, reason) in [
        (
            "file:escape.secret",
            &in_dir,
            "not inside the secrets directory",
        ),
        ("file:lab.secret", &allowed, "secrets.dir"),
        ("file:/proc/self/environ", &in_dir, "/proc"),
        ("env:CCMAIL_MASTER_KEY", &in_dir, "CCMAIL_MASTER_KEY"),
        ("env:PGPASSWORD", &in_dir, "PGPASSWORD"),
    ] {
        let err =
            resolve_pilot(&with(credential), None, None, policy, test_timeouts()).unwrap_err();
        ensure!(err.to_string().contains(reason), "{credential}: {err}");
    }
    world.finish().await
}
