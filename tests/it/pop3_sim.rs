//! ccmail's own POP3 client against the Exchange-like simulator, with tokens from the
//! simulated Entra ID through the real HTTP token source and the cache: the two-step XOAUTH2
//! login (never the one-line form), Exchange's auth-failure text, implicit TLS and STLS,
//! certificate verification, transient server answers, and deadlines that poison the session.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ccmail::pop3::{Client, Error, Timeouts, TlsMode};
use ccmail::sim::cert::TestCa;
use ccmail::sim::pop3::{AUTH_FAILURE, Fault, RETR_FAILURE};
use secrecy::SecretString;

use crate::support::sim_world::{MAILBOX, SimWorld, relaxed_timeouts, within};

/// Generous: the limit for any RETR in these tests.
const RETR_LIMIT: usize = 16 * 1024 * 1024;

/// `-ERR` lines carry this after the status indicator; the client's error keeps only the text.
fn err_text(line: &str) -> &str {
    line.strip_prefix("-ERR ").unwrap_or(line)
}

/// Asserts that XOAUTH2 was sent only in the two-step form Exchange Online accepts.
fn assert_two_step_auth(commands: &[String]) {
    assert!(
        !commands.iter().any(|c| c.starts_with("AUTH XOAUTH2 ")),
        "one-line AUTH XOAUTH2 sent: {commands:?}"
    );
    let at = commands
        .iter()
        .position(|c| c == "AUTH XOAUTH2")
        .unwrap_or_else(|| panic!("no AUTH XOAUTH2 in {commands:?}"));
    assert_eq!(
        commands.get(at + 1).map(String::as_str),
        Some("<redacted>"),
        "the SASL response must follow AUTH XOAUTH2 on its own line: {commands:?}"
    );
}

/// Waits until the simulator has recorded `command` (it records before acting on it).
async fn wait_for_command(world: &SimWorld, command: &str) -> anyhow::Result<()> {
    within(&format!("the simulator receiving {command}"), async {
        while !world.pop.commands().iter().any(|c| c == command) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

#[tokio::test]
async fn xoauth2_over_implicit_tls_is_two_step_with_a_cached_token() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let uidl = world
        .pop
        .deliver(MAILBOX, b"Subject: hi\r\n\r\nhello\r\n".to_vec());
    let cache = world.cache()?;
    let app = world.app();

    let token = within("token", cache.token(&app)).await??;
    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::Implicit, relaxed_timeouts())?),
    )
    .await??;
    assert!(client.is_secure());
    assert!(
        client.capabilities().is_some_and(|c| c.has_sasl("XOAUTH2")),
        "CAPA must have been asked and list SASL XOAUTH2"
    );
    let mut session = within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??;
    let (count, _size) = within("STAT", session.stat()).await??;
    assert_eq!(count, 1);
    assert_eq!(within("UIDL", session.uidl_all()).await??, vec![(1, uidl)]);
    within("QUIT", session.quit()).await??;

    // A second login for the same app reuses the cached token: one request in all.
    let again = within("token", cache.token(&app)).await??;
    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::Implicit, relaxed_timeouts())?),
    )
    .await??;
    let session = within("login", client.auth_xoauth2(MAILBOX, again.secret())).await??;
    within("QUIT", session.quit()).await??;
    assert_eq!(world.entra.token_requests(), 1);
    assert_eq!(world.pop.logins(), 2);

    let commands = world.pop.commands();
    assert_eq!(
        commands[..6],
        ["CAPA", "AUTH XOAUTH2", "<redacted>", "STAT", "UIDL", "QUIT"],
        "{commands:?}"
    );
    assert_two_step_auth(&commands);
    world.stop().await
}

#[tokio::test]
async fn starttls_upgrades_then_asks_capa_again() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let cache = world.cache()?;
    let token = within("token", cache.token(&world.app())).await??;

    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::StartTls, relaxed_timeouts())?),
    )
    .await??;
    assert!(
        client.is_secure(),
        "the connection must be encrypted after STLS"
    );
    let caps = client.capabilities().context("CAPA after STLS")?;
    // RFC 2595 §4: the pre-TLS list offered STLS; the list asked after the upgrade does not.
    assert!(
        !caps.has("STLS"),
        "capabilities from before the upgrade were kept: {caps:?}"
    );
    assert!(caps.has_sasl("XOAUTH2"));
    let mut session = within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??;
    assert_eq!(within("STAT", session.stat()).await??.0, 0);
    within("QUIT", session.quit()).await??;

    let commands = world.pop.commands();
    assert_eq!(
        commands,
        [
            "CAPA",
            "STLS",
            "CAPA",
            "AUTH XOAUTH2",
            "<redacted>",
            "STAT",
            "QUIT"
        ]
    );
    assert_two_step_auth(&commands);
    world.stop().await
}

#[tokio::test]
async fn a_bad_token_is_rejected_with_exchanges_text_and_is_permanent() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let spec = world.spec(TlsMode::Implicit, relaxed_timeouts())?;

    // A token the tenant never issued, then a real one revoked tenant-wide.
    let cache = world.cache()?;
    let revoked = within("token", cache.token(&world.app())).await??;
    world.entra.revoke_all();
    for token in [
        SecretString::from("not-a-token-from-entra"),
        revoked.secret().clone(),
    ] {
        let client = within("connect", Client::connect(&spec)).await??;
        let err = match within("login", client.auth_xoauth2(MAILBOX, &token)).await? {
            Ok(_) => bail!("a bad token logged in"),
            Err(e) => e,
        };
        match &err {
            Error::AuthRejected {
                mechanism, text, ..
            } => {
                assert_eq!(*mechanism, "XOAUTH2");
                assert_eq!(
                    text,
                    "Authentication failure: unknown user name or bad password."
                );
                assert_eq!(text, err_text(AUTH_FAILURE));
            }
            other => bail!("expected AuthRejected, got {other:?}"),
        }
        assert!(err.is_permanent() && !err.is_transient(), "{err}");
        let hint = err
            .hint()
            .context("an XOAUTH2 rejection needs the admin checklist")?;
        assert!(hint.contains("POP.AccessAsApp"), "{hint}");
    }
    assert_eq!(world.pop.auth_failures(), 2);
    assert_eq!(world.pop.logins(), 0);
    assert_two_step_auth(&world.pop.commands());
    world.stop().await
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_permanent_tls_certificate_error() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let other_ca = TestCa::new("some other CA")?;
    for tls in [TlsMode::Implicit, TlsMode::StartTls] {
        let addr = match tls {
            TlsMode::Implicit => world.pop.tls_addr(),
            _ => world.pop.plain_addr(),
        };
        // Only the public roots, then a private CA that did not sign the simulator's cert.
        for roots in [vec![], vec![other_ca.cert_der().clone()]] {
            let spec = ccmail::pop3::ServerSpec::new(
                "127.0.0.1",
                addr.port(),
                tls,
                &roots,
                relaxed_timeouts(),
            )?;
            let err = match within("connect", Client::connect(&spec)).await? {
                Ok(_) => bail!("{tls}: an untrusted certificate was accepted"),
                Err(e) => e,
            };
            ensure!(
                matches!(err, Error::TlsCertificate { .. }),
                "{tls}: expected TlsCertificate, got {err:?}"
            );
            assert!(err.is_permanent() && !err.is_transient(), "{err}");
            assert!(err.hint().is_some_and(|h| h.contains("ca_bundle")), "{err}");
        }
    }
    // No credential ever reached the server.
    assert_eq!(world.pop.logins() + world.pop.auth_failures(), 0);
    assert!(!world.pop.commands().iter().any(|c| c.starts_with("AUTH")));
    world.stop().await
}

#[tokio::test]
async fn server_unavailable_is_transient_and_keeps_the_session() -> anyhow::Result<()> {
    let world = SimWorld::start().await?;
    let uidl = world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());
    let token = within("token", world.cache()?.token(&world.app())).await??;
    let spec = world.spec(TlsMode::Implicit, relaxed_timeouts())?;

    // At login (Exchange answers this without a response code).
    world.pop.set_fault(Some(Fault::Err {
        command: "AUTH".to_owned(),
        line: "-ERR Server Unavailable. 21".to_owned(),
    }));
    let client = within("connect", Client::connect(&spec)).await??;
    let err = match within("login", client.auth_xoauth2(MAILBOX, token.secret())).await? {
        Ok(_) => bail!("login succeeded despite the fault"),
        Err(e) => e,
    };
    ensure!(matches!(err, Error::AuthRejected { .. }), "{err:?}");
    assert!(err.is_transient() && !err.is_permanent(), "{err}");

    // In the transaction state, with the RFC 2449 code.
    world.pop.set_fault(Some(Fault::Err {
        command: "STAT".to_owned(),
        line: RETR_FAILURE.to_owned(),
    }));
    world.pop.fail_retr(&uidl, 1);
    let client = within("connect", Client::connect(&spec)).await??;
    let mut session = within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??;
    let err = match within("STAT", session.stat()).await? {
        Ok(_) => bail!("STAT succeeded despite the fault"),
        Err(e) => e,
    };
    match &err {
        Error::Server {
            command,
            code,
            text,
        } => {
            assert_eq!(*command, "STAT");
            assert_eq!(code.as_deref(), Some("SYS/TEMP"));
            assert_eq!(text, "Server Unavailable. 21");
        }
        other => bail!("expected Server, got {other:?}"),
    }
    assert!(err.is_transient() && !err.is_permanent(), "{err}");
    assert!(
        !session.is_poisoned(),
        "a server answer leaves the connection usable"
    );

    let err = match within("RETR", session.retr(1, RETR_LIMIT)).await? {
        Ok(_) => bail!("RETR succeeded despite fail_retr"),
        Err(e) => e,
    };
    assert!(err.is_transient(), "{err}");
    // The failure was used up: the same session retrieves the message now.
    let body = within("RETR", session.retr(1, RETR_LIMIT)).await??;
    assert!(body.ends_with(b"body\r\n"));
    within("QUIT", session.quit()).await??;
    world.stop().await
}

/// A command whose answer never comes fails with `Timeout` within its deadline, poisons the
/// session, and nothing more is written to the connection.
async fn hang_poisons(command: &str) -> anyhow::Result<()> {
    const DEADLINE: Duration = Duration::from_millis(500);
    /// Slack for a loaded machine; this checks the deadline is applied, not its precision.
    const SLACK: Duration = Duration::from_secs(5);

    let world = SimWorld::start().await?;
    world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());
    let token = within("token", world.cache()?.token(&world.app())).await??;
    world.pop.set_fault(Some(Fault::Hang {
        command: command.to_owned(),
    }));
    let timeouts = Timeouts {
        command: DEADLINE,
        ..relaxed_timeouts()
    };
    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::Implicit, timeouts)?),
    )
    .await??;
    let mut session = within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??;

    let started = Instant::now();
    let result = match command {
        "STAT" => within(command, session.stat()).await?.map(|_| ()),
        _ => within(command, session.retr(1, RETR_LIMIT))
            .await?
            .map(|_| ()),
    };
    let elapsed = started.elapsed();
    let err = match result {
        Ok(()) => bail!("{command} answered despite the hang"),
        Err(e) => e,
    };
    match &err {
        Error::Timeout { during, after } => {
            assert_eq!(*during, command);
            assert_eq!(*after, DEADLINE);
        }
        other => bail!("expected Timeout, got {other:?}"),
    }
    assert!(
        elapsed < DEADLINE + SLACK,
        "{command} gave up after {elapsed:?}, deadline {DEADLINE:?}"
    );
    assert!(err.is_transient(), "{err}");
    assert!(session.is_poisoned());

    let line = if command == "STAT" { "STAT" } else { "RETR 1" };
    wait_for_command(&world, line).await?;
    let before = world.pop.commands();
    let next = within("UIDL", session.uidl_all()).await?;
    ensure!(matches!(next, Err(Error::Poisoned)), "{next:?}");
    let next = within("DELE", session.dele(1)).await?;
    ensure!(matches!(next, Err(Error::Poisoned)), "{next:?}");
    let quit = within("QUIT", session.quit()).await?;
    ensure!(matches!(quit, Err(Error::Poisoned)), "{quit:?}");
    assert_eq!(
        world.pop.commands(),
        before,
        "a poisoned session wrote to the server"
    );
    assert_eq!(
        world.pop.messages(MAILBOX).len(),
        1,
        "nothing may be deleted"
    );
    world.stop().await
}

#[tokio::test]
async fn a_hung_stat_times_out_and_poisons_the_session() -> anyhow::Result<()> {
    hang_poisons("STAT").await
}

#[tokio::test]
async fn a_hung_retr_times_out_and_poisons_the_session() -> anyhow::Result<()> {
    hang_poisons("RETR").await
}
