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

use ccmail::secrets::MasterKey;
use ccmail::store;
use ccmail_lab::sim::entra::EntraSim;
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use ccmail_lab::sim::pop3::Pop3Sim;
use ccmail_lab::testdb::TestDb;

use crate::admin::Cli;
use crate::support::child::CcmailChild;
use crate::support::pipeline::{Ledger, PipelineWorld};
use crate::support::wait::wait_for;

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

/// Fails when the attacker's POP3 server received any PASS command or login (`what` says which
/// password would have leaked).
fn no_password_reached(attacker: &Pop3Sim, what: &str) -> anyhow::Result<()> {
    let passes = attacker
        .commands()
        .iter()
        .filter(|c| c.starts_with("PASS"))
        .count();
    ensure!(
        passes == 0 && attacker.logins() == 0,
        "the attacker's server received {passes} PASS command(s) and {} successful login(s): {what}",
        attacker.logins()
    );
    Ok(())
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
    let world = PipelineWorld::start().await?;
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
        String::new(),
    );
    foreign_app.authority = attacker.authority();
    // Sealed for this very app: only the allow-list stands in the way.
    foreign_app.seal_credential(
        &world.key,
        &secrecy::SecretString::from(world.client_secret.clone()),
    )?;
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
             [pop3]\nallowed_xoauth2_hosts = [\"127.0.0.1\"]\n\n\
             [log]\nformat = \"text\"\nlevel = \"info\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string()
        ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
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

    let world = PipelineWorld::start().await?;
    let allowed = world.credential_policy();
    let xoauth2 = world.add_pilot("support", |_| {}).await?;
    resolve_pilot(
        &xoauth2,
        Some(&world.app),
        Some(&world.key),
        &allowed,
        test_timeouts(),
    )?;
    // The default settings send a token to Exchange Online's hosts only: the simulator's host
    // is refused before the app is looked at.
    let err = resolve_pilot(
        &xoauth2,
        Some(&world.app),
        Some(&world.key),
        &CredentialPolicy::default(),
        test_timeouts(),
    )
    .unwrap_err();
    ensure!(
        err.to_string().contains("pop3.allowed_xoauth2_hosts"),
        "{err}"
    );
    let mut default_authorities = CredentialPolicy::default();
    default_authorities.allow_xoauth2_host("127.0.0.1");
    let err = resolve_pilot(
        &xoauth2,
        Some(&world.app),
        Some(&world.key),
        &default_authorities,
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
    // The same password left behind a changed host does not open: it was sealed for the old.
    let mut moved = remote.clone();
    moved.host = "127.0.0.1".to_owned();
    let err = resolve_pilot(&moved, None, Some(&world.key), &lab, test_timeouts()).unwrap_err();
    ensure!(
        err.to_string().contains("sealed for another pilot"),
        "{err}"
    );
    let loopback = world
        .add_user_pass_pilot("loopback", "lab-password", |p| {
            p.tls = TlsMode::DangerousPlaintext;
            p.ca_bundle = None;
        })
        .await?;
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

/// `ccmail run` against `world`'s database, trusting its CA, retrying and reloading every
/// second, sending credentials to `authorities` (the defaults when empty), with `pop3` added to
/// its `[pop3]` section. Holds the master key the world sealed its secrets with.
fn start_worker(
    world: &PipelineWorld,
    authorities: &[String],
    pop3: &str,
) -> anyhow::Result<CcmailChild> {
    let allowed = if authorities.is_empty() {
        String::new()
    } else {
        format!("allowed_authorities = {authorities:?}\n")
    };
    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\ninitial_backoff_secs = 1\nmax_backoff_secs = 2\n\
             permanent_retry_secs = 1\n\n[oauth]\nextra_ca_file = {:?}\n{allowed}\n\
             [pop3]\n{pop3}\n\n[log]\nformat = \"text\"\nlevel = \"info\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string()
        ),
    )?;
    let key = world.key.to_base64();
    let config_arg = config.display().to_string();
    CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config_arg, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
    )
}

/// Waits until the good pilot's mail has been taken from the server and each of `watched` has
/// either failed or polled successfully; returns the watched pilots' rows.
async fn settled(
    world: &PipelineWorld,
    good_mailbox: &str,
    watched: &[i64],
) -> anyhow::Result<Vec<store::PilotRow>> {
    let pool = world.db.pool().clone();
    wait_for(
        "the good pilot to ingest and every watched pilot to fail or succeed",
        Duration::from_secs(60),
        || {
            let (pool, pop, mailbox) = (pool.clone(), world.pop.clone(), good_mailbox.to_owned());
            async move {
                let mut conn = pool.acquire().await.ok()?;
                let rows: Vec<store::PilotRow> = store::list_pilots(&mut conn)
                    .await
                    .ok()?
                    .into_iter()
                    .filter(|p| watched.contains(&p.id))
                    .collect();
                let done = rows.len() == watched.len()
                    && rows
                        .iter()
                        .all(|p| p.last_error.is_some() || p.last_success_at.is_some());
                (done && pop.messages(&mailbox).is_empty()).then_some(rows)
            }
        },
    )
    .await
}

/// The `last_error` of pilot `id` among `rows`, which must mention `reason`.
fn refused_with(rows: &[store::PilotRow], id: i64, reason: &str) -> anyhow::Result<()> {
    let row = rows
        .iter()
        .find(|p| p.id == id)
        .context("a watched pilot is missing")?;
    ensure!(
        row.last_success_at.is_none(),
        "pilot {id} ({}) polled successfully",
        row.mailbox
    );
    let error = row.last_error.as_deref().unwrap_or_default();
    ensure!(
        error.contains(reason),
        "pilot {id}: expected {reason:?} in {error:?}"
    );
    Ok(())
}

/// A USER/PASS password sealed for one pilot opens only for that pilot, as it was when sealed:
/// copied into a pilot of the attacker's that points at the attacker's server (a certificate
/// the worker trusts, the password it would accept), or left in a pilot whose port was changed
/// straight in the database, it is never sent. Each such pilot shows why; the original keeps
/// ingesting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_password_copied_or_left_behind_a_changed_server_is_never_sent()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let attacker = Pop3Sim::start(&world.ca, world.entra.clone()).await?;
    let alpha = world
        .add_user_pass_pilot("alpha", "alpha-password-1", |_| {})
        .await?;
    let bravo = world
        .add_user_pass_pilot("bravo", "bravo-password-2", |_| {})
        .await?;
    let store::PilotAuth::UserPass {
        credential: alpha_sealed,
        ..
    } = &alpha.auth
    else {
        anyhow::bail!("a USER/PASS pilot without a password");
    };
    let copy = world
        .add_user_pass_pilot("mallory", "unused", |p| {
            p.port = attacker.tls_addr().port();
        })
        .await?;
    let mut conn = world.db.pool().acquire().await?;
    sqlx::query("update pilots set password_credential = $2 where id = $1")
        .bind(copy.id)
        .bind(alpha_sealed)
        .execute(&mut *conn)
        .await?;
    sqlx::query("update pilots set port = $2 where id = $1")
        .bind(bravo.id)
        .bind(i32::from(attacker.tls_addr().port()))
        .execute(&mut *conn)
        .await?;
    attacker.set_password(&copy.mailbox, "alpha-password-1");
    attacker.set_password(&bravo.mailbox, "bravo-password-2");
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xb1d);
    ledger.deliver(
        &world.pop,
        &alpha.mailbox,
        mails.message(&alpha.mailbox, Kind::Plain),
    )?;

    let mut child = start_worker(&world, &[], "")?;
    let rows = settled(&world, &alpha.mailbox, &[copy.id, bravo.id])
        .await
        .with_context(|| child.output())?;
    child.assert_running()?;
    no_password_reached(
        &attacker,
        "a copied or left-behind sealed password was sent",
    )?;
    refused_with(&rows, copy.id, "sealed for another pilot")?;
    refused_with(&rows, bravo.id, "sealed for another pilot")?;
    ledger
        .check(&world.heads(&[alpha.id]).await?)
        .assert_exactly_once()?;
    let output = child.output();
    ensure!(
        !output.contains("alpha-password-1") && !output.contains("bravo-password-2"),
        "a password reached the log"
    );
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    drop(conn);
    attacker.shutdown();
    world.finish().await
}

/// An app's sealed client secret opens only for that app registration: copied into an app of
/// another tenant and client id at an authority the settings allow, or left in an app whose
/// authority was changed straight in the database, it is never sent to a token endpoint. The
/// pilots of those apps show why; the rest keeps ingesting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_client_secret_copied_or_left_behind_a_changed_authority_is_never_sent()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    // A second identity provider the operator allowed, which the attacker can read.
    let attacker = EntraSim::start(&world.ca).await?;
    let mut conn = world.db.pool().acquire().await?;
    let mut copied = store::NewApp::new(
        "mallory-app",
        "0badc0de-0000-4000-8000-000000000bad",
        "mallory-client",
        world.app.credential.clone(),
    );
    copied.authority = attacker.authority();
    let copied = store::insert_app(&mut conn, &copied).await?;
    let mut moved = store::NewApp::new(
        "moved-app",
        &world.app.tenant,
        "moved-client",
        String::new(),
    );
    moved.authority = world.entra.authority();
    moved.seal_credential(
        &world.key,
        &secrecy::SecretString::from(world.client_secret.clone()),
    )?;
    let moved = store::insert_app(&mut conn, &moved).await?;
    sqlx::query("update oauth_apps set authority = $2 where id = $1")
        .bind(moved.id)
        .bind(attacker.authority())
        .execute(&mut *conn)
        .await?;
    let on_copied = world
        .add_pilot("mallory", |p| {
            p.auth = store::PilotAuth::XOAuth2 { app_id: copied.id }
        })
        .await?;
    let on_moved = world
        .add_pilot("moved", |p| {
            p.auth = store::PilotAuth::XOAuth2 { app_id: moved.id }
        })
        .await?;
    let good = world
        .add_user_pass_pilot("good", "good-password-1", |_| {})
        .await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xb1e);
    ledger.deliver(
        &world.pop,
        &good.mailbox,
        mails.message(&good.mailbox, Kind::Plain),
    )?;

    // The pilots' host is allowed: only the binding stands in the way.
    let mut child = start_worker(
        &world,
        &[world.entra.authority(), attacker.authority()],
        "allowed_xoauth2_hosts = [\"127.0.0.1\"]",
    )?;
    let rows = settled(&world, &good.mailbox, &[on_copied.id, on_moved.id])
        .await
        .with_context(|| child.output())?;
    child.assert_running()?;
    ensure!(
        attacker.token_requests() == 0,
        "the attacker's token endpoint received {} request(s): a copied or left-behind sealed \
         client secret was sent",
        attacker.token_requests()
    );
    refused_with(&rows, on_copied.id, "sealed for another app")?;
    refused_with(&rows, on_moved.id, "sealed for another app")?;
    ledger
        .check(&world.heads(&[good.id]).await?)
        .assert_exactly_once()?;
    ensure!(
        !child.output().contains(&world.client_secret),
        "the client secret reached the log"
    );
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    drop(conn);
    attacker.shutdown();
    world.finish().await
}

/// An XOAUTH2 pilot pointing at a POP3 host outside `pop3.allowed_xoauth2_hosts` (by default
/// Exchange Online's hosts only) gets no token: none is requested and none reaches the host,
/// though its app and authority are fine and the host's certificate is valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xoauth2_pilot_on_a_host_outside_the_allow_list_gets_no_token() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    // A server that would accept the tenant's token (it validates against the same Entra).
    let attacker = Pop3Sim::start(&world.ca, world.entra.clone()).await?;
    attacker.add_mailbox(&format!("support@{}", crate::support::pipeline::DOMAIN));
    let hostile = world
        .add_pilot("support", |p| p.port = attacker.tls_addr().port())
        .await?;
    let good = world
        .add_user_pass_pilot("good", "good-password-1", |_| {})
        .await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xb1f);
    ledger.deliver(
        &world.pop,
        &good.mailbox,
        mails.message(&good.mailbox, Kind::Plain),
    )?;

    let mut child = start_worker(&world, &[world.entra.authority()], "")?;
    let rows = settled(&world, &good.mailbox, &[hostile.id])
        .await
        .with_context(|| child.output())?;
    child.assert_running()?;
    let auths = attacker
        .commands()
        .iter()
        .filter(|c| c.starts_with("AUTH"))
        .count();
    ensure!(
        world.entra.token_requests() == 0 && auths == 0,
        "{} token request(s) were made and the host outside the allow-list received {auths} \
         AUTH command(s)",
        world.entra.token_requests()
    );
    refused_with(&rows, hostile.id, "pop3.allowed_xoauth2_hosts")?;
    ledger
        .check(&world.heads(&[good.id]).await?)
        .assert_exactly_once()?;
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    attacker.shutdown();
    world.finish().await
}

/// The CLI refuses an XOAUTH2 pilot on a host outside `pop3.allowed_xoauth2_hosts`, on add, on
/// update and in `ccmail doctor`, before any token is asked for; the setting lets it through.
#[tokio::test]
async fn the_cli_refuses_an_xoauth2_host_outside_the_allow_list() {
    let db = TestDb::new().await.unwrap();
    let mut cli = Cli::new(&db);
    cli.ok(&app_add("a", &["--secret-env", "APP_SECRET"]), None);
    let add = |host: &'static str| {
        vec![
            "pilot",
            "add",
            "--queue",
            "support",
            "--mailbox",
            "support@contoso.com",
            "--app",
            "a",
            "--host",
            host,
        ]
    };
    let (_, err) = cli.fails(&add("pop.attacker.example"), None);
    assert!(
        err.contains("pop.attacker.example") && err.contains("pop3.allowed_xoauth2_hosts"),
        "{err}"
    );
    assert_eq!(
        cli.json(&["pilot", "list", "--json"]),
        serde_json::json!([])
    );
    // The default host of the app's cloud is allowed.
    cli.ok(&add("outlook.office365.com"), None);
    let (_, err) = cli.fails(
        &[
            "pilot",
            "update",
            "support@contoso.com",
            "--host",
            "outlook.office365.com.attacker.example",
        ],
        None,
    );
    assert!(err.contains("pop3.allowed_xoauth2_hosts"), "{err}");
    let (_, err) = cli.fails(
        &[
            "doctor",
            "--app",
            "a",
            "--mailbox",
            "support@contoso.com",
            "--host",
            "pop.attacker.example",
        ],
        None,
    );
    assert!(err.contains("pop3.allowed_xoauth2_hosts"), "{err}");
    cli.env
        .push(("APP_SECRET".into(), "app-secret-value".into()));
    let (_, err) = cli.fails(
        &[
            "doctor",
            "--tenant",
            TENANT,
            "--client-id",
            CLIENT,
            "--secret-env",
            "APP_SECRET",
            "--mailbox",
            "support@contoso.com",
            "--host",
            "pop.attacker.example",
        ],
        None,
    );
    assert!(err.contains("pop3.allowed_xoauth2_hosts"), "{err}");
    cli.env.push((
        "CCMAIL_POP3_ALLOWED_XOAUTH2_HOSTS".into(),
        "outlook.office365.com, pop.contoso.example".into(),
    ));
    cli.ok(
        &[
            "pilot",
            "update",
            "support@contoso.com",
            "--host",
            "POP.contoso.example",
        ],
        None,
    );
    assert_eq!(
        cli.json(&["pilot", "show", "support@contoso.com", "--json"])["host"],
        "POP.contoso.example"
    );
    db.drop_db().await.unwrap();
}

/// `secret` sealed in the old form `enc:v1` with `key`, as ccmail wrote it before sealed values
/// were bound to their rows; built here from the format itself (AES-256-GCM, a 96-bit nonce in
/// front, the `enc:v1:<key id>` header as associated data).
fn legacy_v1(key: &MasterKey, secret: &str) -> anyhow::Result<String> {
    use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
    use base64::Engine as _;
    let base64 = base64::engine::general_purpose::STANDARD;
    let raw = base64.decode(key.to_base64().expose_secret())?;
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(&raw)
        .map_err(|_| anyhow::anyhow!("a master key is 32 bytes"))?;
    let header = format!("enc:v1:{}", key.key_id());
    let nonce = aes_gcm::Aes256Gcm::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: secret.as_bytes(),
                aad: header.as_bytes(),
            },
        )
        .map_err(|_| anyhow::anyhow!("AES-GCM failed"))?;
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&sealed);
    Ok(format!("{header}:{}", base64.encode(blob)))
}

/// Credentials sealed in the old form `enc:v1` (bound to no row) keep working: the worker seals
/// each again as `enc:v2` for the row it is in when it starts, and says how many. A v1 value
/// that several rows hold (copied before the upgrade: every seal draws a fresh nonce) is bound
/// to none of them and sent by none; both pilots show why, and the attacker's server sees no
/// PASS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_v1_credentials_are_upgraded_at_start_and_a_copied_one_is_never_sent()
-> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let attacker = Pop3Sim::start(&world.ca, world.entra.clone()).await?;
    let alpha = world
        .add_user_pass_pilot("alpha", "alpha-password-1", |_| {})
        .await?;
    let bravo = world
        .add_user_pass_pilot("bravo", "bravo-password-2", |_| {})
        .await?;
    let copy = world
        .add_user_pass_pilot("mallory", "unused", |p| {
            p.port = attacker.tls_addr().port();
        })
        .await?;
    let alpha_v1 = legacy_v1(&world.key, "alpha-password-1")?;
    let bravo_v1 = legacy_v1(&world.key, "bravo-password-2")?;
    let mut conn = world.db.pool().acquire().await?;
    for (id, value) in [
        (alpha.id, &alpha_v1),
        (bravo.id, &bravo_v1),
        (copy.id, &bravo_v1),
    ] {
        sqlx::query("update pilots set password_credential = $2 where id = $1")
            .bind(id)
            .bind(value)
            .execute(&mut *conn)
            .await?;
    }
    attacker.set_password(&copy.mailbox, "bravo-password-2");
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0xb20);
    ledger.deliver(
        &world.pop,
        &alpha.mailbox,
        mails.message(&alpha.mailbox, Kind::Plain),
    )?;

    let mut child = start_worker(&world, &[], "")?;
    let rows = settled(&world, &alpha.mailbox, &[bravo.id, copy.id])
        .await
        .with_context(|| child.output())?;
    child.assert_running()?;
    no_password_reached(
        &attacker,
        "a v1 password copied before the upgrade was sent",
    )?;
    refused_with(&rows, bravo.id, "enc:v1")?;
    refused_with(&rows, copy.id, "enc:v1")?;
    let stored = |id: i64| {
        let pool = world.db.pool().clone();
        async move {
            let mut conn = pool.acquire().await?;
            let value: String =
                sqlx::query_scalar("select password_credential from pilots where id = $1")
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await?;
            anyhow::Ok(value)
        }
    };
    let alpha_now = stored(alpha.id).await?;
    ensure!(
        alpha_now.starts_with(&format!("enc:v2:{}:", world.key.key_id())),
        "alpha's password was not sealed again as enc:v2"
    );
    ensure!(stored(bravo.id).await? == bravo_v1 && stored(copy.id).await? == bravo_v1);
    ledger
        .check(&world.heads(&[alpha.id]).await?)
        .assert_exactly_once()?;
    let output = child.output();
    ensure!(
        output.contains("upgraded=1") && output.contains("enc:v2"),
        "the upgrade is not logged with its count: {output}"
    );
    ensure!(
        output.contains(&format!("pilot {}, pilot {}", bravo.id, copy.id)),
        "the copies are not named in the log: {output}"
    );
    ensure!(
        !output.contains("alpha-password-1") && !output.contains("bravo-password-2"),
        "a password reached the log"
    );
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    drop(conn);
    attacker.shutdown();
    world.finish().await
}
