//! No secret reaches the logs: a full flow against the simulators (token request, XOAUTH2
//! login, UIDL, RETR, DELE, QUIT, a USER/PASS login) plus the failures an admin produces (a
//! wrong client secret, a bad token, a wrong password) runs with every target logging at
//! TRACE, including rustls (through the `log` bridge), hyper and reqwest; then the captured
//! text is searched for each secret.
//!
//! The subscriber is the process-wide default (`try_init`), not a thread-local one: a
//! thread-local default lets tracing cache "never enabled" for callsites that other threads
//! (the runtime's workers) hit first, and the capture would silently miss them. Nextest runs
//! each test in its own process, so this global subscriber is this test's alone.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail, ensure};
use ccmail::oauth::{CachePolicy, TokenCache, TokenSourceOptions};
use ccmail::pop3::{Client, TlsMode};
use secrecy::{ExposeSecret, SecretString};
use tracing_subscriber::fmt::MakeWriter;

use crate::support::sim_world::{
    self, CLIENT_ID, CLIENT_SECRET, MAILBOX, TENANT, TEST_DEADLINE, app_credentials,
    relaxed_timeouts, within,
};

/// The mailbox's USER/PASS password in the simulator.
const PASSWORD: &str = "Pop3-Password-ccmail-it2-5f2b9c";
/// A client secret that is not the app's (an admin pasted the Secret ID).
const WRONG_SECRET: &str = "Wrong~SecretId.ccmail-it2-9e107d9d372bb682";
/// A password that is not the mailbox's.
const WRONG_PASSWORD: &str = "Wrong-Pop3-Password-it2-7d793037a076";
/// A bearer token Entra never issued.
const BAD_TOKEN: &str = "EwB-bogus-token-ccmail-it2-e4d909c290d0fb1c";

/// Everything written by the subscriber, shared with the test.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("capture lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;

    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_in_a_trace_level_log_of_a_full_flow() -> anyhow::Result<()> {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(capture.clone())
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the capturing subscriber: {e}"))?;

    let world = sim_world::start().await?;
    world.pop.set_password(MAILBOX, PASSWORD);
    world.pop.deliver(
        MAILBOX,
        b"Subject: hello\r\n\r\n.dot line\r\nbody\r\n".to_vec(),
    );
    let cache = world.cache()?;
    let app = world.credentials();

    // The happy path: token, XOAUTH2, UIDL, RETR, DELE, QUIT.
    let token = within("token", cache.token(&app)).await??;
    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::Implicit, relaxed_timeouts())?),
    )
    .await??;
    let mut session = within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??;
    let uidl = within("UIDL", session.uidl_all()).await??;
    ensure!(uidl.len() == 1, "UIDL {uidl:?}");
    let body = within("RETR", session.retr(1, 1 << 20)).await??;
    ensure!(body.ends_with(b"body\r\n"), "RETR body");
    within("DELE", session.dele(1)).await??;
    within("QUIT", session.quit()).await??;
    ensure!(
        world.pop.messages(MAILBOX).is_empty(),
        "DELE + QUIT left the message"
    );

    // USER/PASS over STLS.
    let stls = world.spec(TlsMode::StartTls, relaxed_timeouts())?;
    let client = within("connect", Client::connect(&stls)).await??;
    let password = SecretString::from(PASSWORD);
    let mut session = within("USER/PASS", client.auth_user_pass(MAILBOX, &password)).await??;
    within("STAT", session.stat()).await??;
    within("QUIT", session.quit()).await??;

    // The failures, logged the way the worker logs them (the error's Display).
    let wrong_app = app_credentials(&world.entra, TENANT, CLIENT_ID, WRONG_SECRET);
    let fresh_cache = TokenCache::new(
        Arc::new(world.token_source(TokenSourceOptions::default())?),
        CachePolicy::default(),
    );
    match within("token", fresh_cache.token(&wrong_app)).await? {
        Ok(_) => bail!("a wrong client secret got a token"),
        Err(e) => {
            ensure!(e.aadsts() == Some(7000215), "{e}");
            tracing::error!(error = %e, ?e, "token request failed");
        }
    }
    let bad = SecretString::from(BAD_TOKEN);
    let client = within("connect", Client::connect(&stls)).await??;
    match within("login", client.auth_xoauth2(MAILBOX, &bad)).await? {
        Ok(_) => bail!("a bad token logged in"),
        Err(e) => tracing::error!(error = %e, ?e, "login failed"),
    }
    let client = within("connect", Client::connect(&stls)).await??;
    let wrong = SecretString::from(WRONG_PASSWORD);
    match within("login", client.auth_user_pass(MAILBOX, &wrong)).await? {
        Ok(_) => bail!("a wrong password logged in"),
        Err(e) => tracing::error!(error = %e, ?e, "login failed"),
    }
    tracing::debug!(
        ?app,
        ?wrong_app,
        ?token,
        ?cache,
        "state at the end of the flow"
    );
    ensure!(
        world.pop.auth_failures() == 2,
        "{}",
        world.pop.auth_failures()
    );
    world.stop(TEST_DEADLINE).await?;

    let log = capture.text();
    // The capture works and saw the flow, down to the libraries.
    ensure!(
        log.contains("AUTH XOAUTH2"),
        "the POP3 trace is missing:\n{log}"
    );
    ensure!(
        log.contains("PASS <redacted>"),
        "the USER/PASS trace is missing"
    );
    ensure!(
        log.contains("access token obtained"),
        "the token trace is missing"
    );
    ensure!(
        log.contains("AADSTS7000215"),
        "the token failure is missing"
    );
    ensure!(
        log.contains("rustls"),
        "rustls' log records were not captured"
    );

    let good_blob = ccmail::pop3::sasl::xoauth2_response(MAILBOX, token.secret());
    let bad_blob = ccmail::pop3::sasl::xoauth2_response(MAILBOX, &bad);
    let secrets = [
        ("client secret", CLIENT_SECRET),
        // The distinctive middle survives any URL or JSON escaping of the secret.
        ("client secret (core)", "simSecretValue"),
        ("wrong client secret", WRONG_SECRET),
        ("wrong client secret (core)", "SecretId.ccmail"),
        ("access token", token.secret().expose_secret()),
        ("bad token", BAD_TOKEN),
        ("XOAUTH2 blob", good_blob.expose_secret()),
        ("XOAUTH2 blob of the bad token", bad_blob.expose_secret()),
        ("password", PASSWORD),
        ("wrong password", WRONG_PASSWORD),
    ];
    for (what, secret) in secrets {
        if let Some(at) = log.find(secret) {
            let line = log[..at].rsplit('\n').next().unwrap_or_default();
            bail!("the {what} appears in the log, in the line starting: {line:?}");
        }
    }
    // A token is opaque but long: no 32-character piece of it may appear either.
    let token_text = token.secret().expose_secret();
    let pieces = token_text.len().saturating_sub(32) + 1;
    for start in (0..pieces).step_by(8) {
        let piece = token_text.get(start..start + 32).context("token slice")?;
        ensure!(
            !log.contains(piece),
            "part of the access token appears in the log"
        );
    }
    Ok(())
}
