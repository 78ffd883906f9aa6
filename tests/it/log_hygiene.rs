//! What reaches logs and the admin's terminal: trace logs do not copy mail content (while
//! ccmail's own trace events stay), and server text carrying terminal escapes is stored,
//! shown by `pilot show` / `pilot list` and written to text logs escaped, never raw.

use std::time::Duration;

use anyhow::{Context, ensure};
use secrecy::ExposeSecret;

use ccmail::store;
use ccmail_lab::sim::pop3::Fault;

use crate::support::child::CcmailChild;
use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld};
use crate::support::wait::wait_for;

/// A word that appears only in the mail's HTML text.
const CONTENT_WORD: &str = "Quokkaparagraph";

/// An HTML mail of about `size` octets whose text repeats [`CONTENT_WORD`].
fn html_mail(to: &str, marker: &str, size: usize) -> Vec<u8> {
    let mut raw = format!(
        "From: Big Sender <big@fabrikam.example>\r\nTo: {to}\r\nSubject: a large HTML mail\r\n\
         Date: Tue, 04 Jun 2024 09:12:00 +0200\r\nMessage-ID: <{marker}@fabrikam.example>\r\n\
         X-Ccmail-Marker: {marker}\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/html; charset=utf-8\r\n\r\n<html><body>\r\n"
    )
    .into_bytes();
    let mut n = 0;
    while raw.len() < size {
        raw.extend_from_slice(
            format!(
                "<p class=\"c{}\">{CONTENT_WORD} {n}: <b>bold</b> and <i>italic</i> text.</p>\r\n",
                n % 7
            )
            .as_bytes(),
        );
        n += 1;
    }
    raw.extend_from_slice(b"</body></html>\r\n");
    raw
}

fn worker_config(world: &PipelineWorld, level: &str) -> anyhow::Result<String> {
    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\ninitial_backoff_secs = 1\nmax_backoff_secs = 2\n\
             permanent_retry_secs = 1\n\n[oauth]\nextra_ca_file = {:?}\n\n\
             [log]\nformat = \"text\"\nlevel = \"{level}\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string()
        ),
    )?;
    Ok(config.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_keep_ccmails_events_and_copy_no_mail_content() -> anyhow::Result<()> {
    const MAIL_SIZE: usize = 256 * 1024;
    let world = PipelineWorld::start().await?;
    let pilot = world
        .add_user_pass_pilot("support", "support-password-1", |_| {})
        .await?;
    let mut ledger = Ledger::default();
    ledger.deliver(
        &world.pop,
        &pilot.mailbox,
        html_mail(&pilot.mailbox, "trace-html-1", MAIL_SIZE),
    )?;
    let config = worker_config(&world, "info")?;
    let key = world.key.to_base64();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
            ("RUST_LOG", "trace"),
        ],
    )?;
    let pool = world.db.pool().clone();
    wait_for(
        "the HTML mail to be stored",
        Duration::from_secs(120),
        || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await.ok()?;
                let heads = store::message_heads(&mut conn, &[pilot.id]).await.ok()?;
                (!heads.is_empty()).then_some(())
            }
        },
    )
    .await
    .with_context(|| format!("log so far: {} octets", child.output().len()))?;
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    let log = child.output();
    ensure!(
        log.contains("pop3 send") && log.contains("pop3 recv"),
        "ccmail's own trace events are missing"
    );
    let copies = log.matches(CONTENT_WORD).count();
    ensure!(
        copies == 0,
        "the trace log ({} octets for a {MAIL_SIZE}-octet mail) copies mail content {copies} times",
        log.len()
    );
    ensure!(
        log.len() < 4 * MAIL_SIZE,
        "the trace log holds {} octets for one {MAIL_SIZE}-octet mail",
        log.len()
    );
    ledger
        .check(&world.heads(&[pilot.id]).await?)
        .assert_exactly_once()?;
    world.finish().await
}

/// Terminal control: set the window title, clear the screen, red text, a bell, and a
/// right-to-left override that makes text read backwards.
const HOSTILE: &str = "\x1b]0;owned\x07\x1b[2J\x1b[31mAuthentication failed\u{202e}desrever";

fn has_terminal_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\n' || ('\u{202a}'..='\u{202e}').contains(&c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_text_with_terminal_escapes_is_stored_shown_and_logged_escaped() -> anyhow::Result<()>
{
    let world = PipelineWorld::start().await?;
    let pilot = world
        .add_user_pass_pilot("support", "support-password-1", |_| {})
        .await?;
    world.pop.set_fault(Some(Fault::Err {
        command: "PASS".to_owned(),
        line: format!("-ERR {HOSTILE}"),
    }));
    let config = worker_config(&world, "info")?;
    let key = world.key.to_base64();
    let mut child = CcmailChild::spawn(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
    )?;
    let pool = world.db.pool().clone();
    let error = wait_for(
        "the login failure to be recorded",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await.ok()?;
                store::get_pilot(&mut conn, pilot.id).await.ok()?.last_error
            }
        },
    )
    .await
    .with_context(|| child.output())?;
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    // Whether the POP3 layer keeps the server's words (escaped) or refuses the line, nothing
    // raw reaches the row or the log.
    ensure!(!has_terminal_control(&error), "stored raw: {error:?}");
    let log = child.output();
    ensure!(
        log.contains("poll failed"),
        "the failure is not logged:\n{log}"
    );
    ensure!(!has_terminal_control(&log), "logged raw: {log:?}");

    // A row written by anything else is still shown escaped.
    let mut conn = world.db.pool().acquire().await?;
    sqlx::query("update pilots set last_error = $2, last_error_hint = $2 where id = $1")
        .bind(pilot.id)
        .bind(HOSTILE)
        .execute(&mut *conn)
        .await?;
    let id = pilot.id.to_string();
    let mailbox = format!("support@{DOMAIN}");
    for args in [
        vec!["pilot", "show", id.as_str()],
        vec!["pilot", "show", mailbox.as_str()],
        vec!["pilot", "list"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ccmail"))
            .args(&args)
            .current_dir(world.dir())
            .env("DATABASE_URL", world.db.url())
            .env_remove("RUST_LOG")
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            stdout.contains("Authentication failed"),
            "{args:?}: {stdout}"
        );
        ensure!(
            !has_terminal_control(&stdout),
            "{args:?} printed raw: {stdout:?}"
        );
    }
    drop(conn);
    world.finish().await
}
