//! ccmail's own POP3 client against the Exchange-like simulator, with tokens from the
//! simulated Entra ID through the real HTTP token source and the cache: the two-step XOAUTH2
//! login (never the one-line form), Exchange's auth-failure text, implicit TLS and STLS,
//! certificate verification, transient server answers, and deadlines that poison the session.
//!
//! Against the simulator's hostile mode: endless and 1-byte-a-second answers end with a typed
//! error in bounded time, a session deadline cuts a hanging command, a bad listing line spoils
//! only its message, shared UIDLs identify no message, 700 000 entries are listed (whole or
//! capped) with the session still usable, and terminal escapes in error text are escaped.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ccmail::pop3::codec::MAX_LISTING_BYTES;
use ccmail::pop3::{Client, Error, ListedUidl, ListingEntry, Timeouts, TlsMode};
use ccmail_lab::sim::cert::TestCa;
use ccmail_lab::sim::pop3::{AUTH_FAILURE, Fault, RETR_FAILURE};
use secrecy::SecretString;

use crate::support::sim_world::{self, MAILBOX, TEST_DEADLINE, relaxed_timeouts, within};
use ccmail_lab::world::World;

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
async fn wait_for_command(world: &World, command: &str) -> anyhow::Result<()> {
    crate::support::wait::wait_for(
        &format!("the simulator receiving {command}"),
        TEST_DEADLINE,
        || {
            std::future::ready(
                world
                    .pop
                    .commands()
                    .iter()
                    .any(|c| c == command)
                    .then_some(()),
            )
        },
    )
    .await
}

#[tokio::test]
async fn xoauth2_over_implicit_tls_is_two_step_with_a_cached_token() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let uidl = world
        .pop
        .deliver(MAILBOX, b"Subject: hi\r\n\r\nhello\r\n".to_vec());
    let cache = world.cache()?;
    let app = world.credentials();

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
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn starttls_upgrades_then_asks_capa_again() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let cache = world.cache()?;
    let token = within("token", cache.token(&world.credentials())).await??;

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
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn a_bad_token_is_rejected_with_exchanges_text_and_is_permanent() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let spec = world.spec(TlsMode::Implicit, relaxed_timeouts())?;

    // A token the tenant never issued, then a real one revoked tenant-wide.
    let cache = world.cache()?;
    let revoked = within("token", cache.token(&world.credentials())).await??;
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
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_permanent_tls_certificate_error() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
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
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn server_unavailable_is_transient_and_keeps_the_session() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let uidl = world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());
    let token = within("token", world.cache()?.token(&world.credentials())).await??;
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
    ensure!(matches!(err, Error::ServerBusy { .. }), "{err:?}");
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
    world.stop(TEST_DEADLINE).await
}

/// A command whose answer never comes fails with `Timeout` within its deadline, poisons the
/// session, and nothing more is written to the connection.
async fn hang_poisons(command: &str) -> anyhow::Result<()> {
    const DEADLINE: Duration = Duration::from_millis(500);
    /// Slack for a loaded machine; this checks the deadline is applied, not its precision.
    const SLACK: Duration = Duration::from_secs(5);

    let world = sim_world::start().await?;
    world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());
    let token = within("token", world.cache()?.token(&world.credentials())).await??;
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
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn a_hung_stat_times_out_and_poisons_the_session() -> anyhow::Result<()> {
    hang_poisons("STAT").await
}

#[tokio::test]
async fn a_hung_retr_times_out_and_poisons_the_session() -> anyhow::Result<()> {
    hang_poisons("RETR").await
}

// ---------------------------------------------------------------------------------------------
// A hostile server: endless and trickled answers, malformed listings.
// ---------------------------------------------------------------------------------------------

/// Short deadlines for the hostile-server tests: a response must start within `command`, and
/// after that grace keep up with the default minimum rate.
fn hostile_timeouts() -> Timeouts {
    Timeouts {
        command: Duration::from_secs(2),
        idle: Duration::from_secs(2),
        ..relaxed_timeouts()
    }
}

/// "It did not hang": far above every bound these tests expect, far below forever.
const GENEROUS: Duration = Duration::from_secs(25);

async fn login(
    world: &World,
    timeouts: Timeouts,
) -> anyhow::Result<ccmail::pop3::Session<ccmail::pop3::Stream>> {
    let token = within("token", world.cache()?.token(&world.credentials())).await??;
    let client = within(
        "connect",
        Client::connect(&world.spec(TlsMode::Implicit, timeouts)?),
    )
    .await??;
    Ok(within("login", client.auth_xoauth2(MAILBOX, token.secret())).await??)
}

/// An endless multi-line answer at full speed ends with an error, in bounded time, and the
/// session is poisoned (the rest of that answer is never read as the next one).
#[tokio::test]
async fn endless_capa_uidl_and_retr_end_with_an_error_not_a_hang() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());

    world.pop.set_fault(Some(Fault::Endless {
        command: "CAPA".to_owned(),
    }));
    let started = Instant::now();
    let spec = world.spec(TlsMode::Implicit, hostile_timeouts())?;
    let connected = within("connect with an endless CAPA", Client::connect(&spec)).await?;
    let err = match connected {
        Ok(_) => bail!("an endless CAPA was accepted"),
        Err(e) => e,
    };
    assert!(started.elapsed() < GENEROUS, "{:?}", started.elapsed());
    ensure!(
        matches!(err, Error::ResponseTooLong { during: "CAPA", .. }),
        "{err:?}"
    );
    assert!(err.poisons_connection() && err.is_transient(), "{err:?}");

    for command in ["UIDL", "RETR", "TOP"] {
        world.pop.set_fault(Some(Fault::Endless {
            command: command.to_owned(),
        }));
        let mut session = login(&world, hostile_timeouts()).await?;
        let started = Instant::now();
        let result = match command {
            "UIDL" => within("endless UIDL", session.uidl_listing(1000))
                .await?
                .map(drop),
            "TOP" => within("endless TOP", session.top(1, 0, 64 * 1024))
                .await?
                .map(drop),
            _ => within("endless RETR", session.retr(1, RETR_LIMIT))
                .await?
                .map(drop),
        };
        let err = match result {
            Ok(()) => bail!("an endless {command} was accepted"),
            Err(e) => e,
        };
        assert!(
            started.elapsed() < GENEROUS,
            "{command}: {:?}",
            started.elapsed()
        );
        match (&err, command) {
            (Error::ListingTooLarge { command: c, limit }, "UIDL") => {
                assert_eq!((*c, *limit), ("UIDL", MAX_LISTING_BYTES));
                assert!(err.to_string().contains("UIDL listing"), "{err}");
                assert!(!err.to_string().contains("message"), "{err}");
            }
            (Error::ResponseTooLong { during, .. }, "RETR" | "TOP") => {
                assert_eq!(*during, command)
            }
            _ => bail!("{command}: unexpected {err:?}"),
        }
        assert!(session.is_poisoned(), "{command}: {err:?}");
    }
    world.stop(TEST_DEADLINE).await
}

/// A session deadline (the poller's per-poll deadline) cuts a command the server never
/// answers, long before the command's own deadline, and nothing more is written.
#[tokio::test]
async fn a_session_deadline_cuts_a_hanging_command() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    world
        .pop
        .deliver(MAILBOX, b"Subject: a\r\n\r\nbody\r\n".to_vec());
    world.pop.set_fault(Some(Fault::Hang {
        command: "RETR".to_owned(),
    }));
    // The command deadline alone would wait far beyond the test's patience.
    let timeouts = Timeouts {
        command: Duration::from_secs(3600),
        ..relaxed_timeouts()
    };
    let mut session = login(&world, timeouts).await?;
    let started = Instant::now();
    session.set_deadline(Some(
        tokio::time::Instant::now() + Duration::from_millis(500),
    ));
    let err = match within("RETR", session.retr(1, RETR_LIMIT)).await? {
        Ok(_) => bail!("RETR answered despite the hang"),
        Err(e) => e,
    };
    ensure!(
        matches!(err, Error::Timeout { during: "RETR", .. }),
        "{err:?}"
    );
    assert!(started.elapsed() < GENEROUS, "{:?}", started.elapsed());
    assert!(session.is_poisoned());
    wait_for_command(&world, "RETR 1").await?;
    let before = world.pop.commands();
    let quit = within("QUIT", session.quit()).await?;
    ensure!(matches!(quit, Err(Error::Poisoned)), "{quit:?}");
    assert_eq!(world.pop.commands(), before, "written after the deadline");
    assert_eq!(world.pop.messages(MAILBOX).len(), 1);
    world.stop(TEST_DEADLINE).await
}

/// A body trickled at 1 byte a second keeps the per-read idle deadline happy forever; the
/// minimum average rate ends it soon after the grace period.
#[tokio::test]
async fn a_one_byte_per_second_answer_times_out() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let big = format!("Subject: big\r\n\r\n{}\r\n", "x".repeat(64 * 1024));
    world.pop.deliver(MAILBOX, big.into_bytes());
    for command in ["CAPA", "UIDL", "RETR"] {
        world.pop.set_fault(Some(Fault::Trickle {
            command: command.to_owned(),
            bytes_per_second: 1,
        }));
        let started = Instant::now();
        let result = if command == "CAPA" {
            let spec = world.spec(TlsMode::Implicit, hostile_timeouts())?;
            within("connect with a trickled CAPA", Client::connect(&spec))
                .await?
                .map(drop)
        } else {
            let mut session = login(&world, hostile_timeouts()).await?;
            let result = match command {
                "UIDL" => within("trickled UIDL", session.uidl_all()).await?.map(drop),
                _ => within("trickled RETR", session.retr(1, RETR_LIMIT))
                    .await?
                    .map(drop),
            };
            assert!(result.is_err() == session.is_poisoned(), "{command}");
            result
        };
        let elapsed = started.elapsed();
        match result {
            Err(Error::Timeout { during, .. }) => assert_eq!(during, command),
            other => bail!("{command}: expected a Timeout, got {other:?}"),
        }
        assert!(elapsed < GENEROUS, "{command}: {elapsed:?}");
    }
    world.stop(TEST_DEADLINE).await
}

/// Messages whose listing lines are fine are listed; each bad line costs only its message.
#[tokio::test]
async fn one_bad_listing_line_spoils_only_its_own_message() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let mail = |i: usize| format!("Subject: {i}\r\n\r\n{i}\r\n").into_bytes();
    let good1 = world.pop.deliver(MAILBOX, mail(1));
    world
        .pop
        .deliver_with_uidl(MAILBOX, "esc\x1b[31mred\x07", mail(2));
    world
        .pop
        .deliver_with_uidl(MAILBOX, &"L".repeat(4096), mail(3));
    world.pop.deliver_with_uidl(MAILBOX, "abc def", mail(4));
    let good5 = world.pop.deliver(MAILBOX, mail(5));
    world.pop.set_fault(Some(Fault::ListingLine {
        command: "UIDL".to_owned(),
        at: 2,
        line: b"no-number-at-all".to_vec(),
    }));
    let mut session = login(&world, relaxed_timeouts()).await?;
    let listing = within("UIDL", session.uidl_all()).await??;
    assert_eq!(listing, vec![(1, good1.clone()), (5, good5.clone())]);
    // `1 abc def` is not UIDL `abc`.
    assert!(!listing.iter().any(|(_, u)| u == "abc"));

    let listing = within("UIDL", session.uidl_listing(100)).await??;
    assert!(!listing.truncated);
    assert_eq!(listing.unreadable_lines, 1, "the line without a number");
    let verdicts: Vec<(u32, Result<&str, &str>)> = listing
        .entries
        .iter()
        .map(|e| match &e.uidl {
            ListedUidl::Unique(u) => (e.number, Ok(u.as_str())),
            ListedUidl::Invalid { reason, .. } => (e.number, Err(*reason)),
            ListedUidl::Shared(u) => (e.number, Err(u.as_str())),
        })
        .collect();
    assert_eq!(verdicts.len(), 5, "{verdicts:?}");
    assert_eq!(verdicts[0], (1, Ok(good1.as_str())));
    assert_eq!(verdicts[4], (5, Ok(good5.as_str())));
    for (i, why) in [(1, "control"), (2, "longer than 512"), (3, "space")] {
        let (number, verdict) = &verdicts[i];
        assert_eq!(*number as usize, i + 1);
        assert!(
            verdict.is_err_and(|r| r.contains(why)),
            "message {number}: {verdict:?}"
        );
    }
    // Excerpts are escaped and short: they may be shown to a person.
    for entry in &listing.entries {
        if let ListedUidl::Invalid { excerpt, .. } = &entry.uidl {
            assert!(
                !excerpt.contains('\x1b') && excerpt.chars().count() <= 65,
                "{excerpt:?}"
            );
        }
    }
    within("NOOP", session.noop()).await??;
    world.stop(TEST_DEADLINE).await
}

/// RFC 1939 §7 lets identical copies share a UIDL, and a hostile server may lie: a UIDL
/// listed for two messages identifies neither.
#[tokio::test]
async fn a_uidl_listed_twice_identifies_neither_message() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let mail = |i: usize| format!("Subject: {i}\r\n\r\n{i}\r\n").into_bytes();
    world.pop.deliver_with_uidl(MAILBOX, "SAME", mail(1));
    let unique = world.pop.deliver(MAILBOX, mail(2));
    world.pop.deliver_with_uidl(MAILBOX, "SAME", mail(3));
    world.pop.add_fault(Fault::ListingLine {
        command: "UIDL".to_owned(),
        at: 99,
        line: format!("2 {unique}").into_bytes(),
    });
    let mut session = login(&world, relaxed_timeouts()).await?;
    let listing = within("UIDL", session.uidl_all()).await??;
    assert!(listing.is_empty(), "{listing:?}");
    let listing = within("UIDL", session.uidl_listing(100)).await??;
    let shared = |n: u32| ListingEntry {
        number: n,
        uidl: ListedUidl::Shared("SAME".to_owned()),
    };
    assert_eq!(listing.entries.len(), 4);
    assert_eq!(listing.entries[0], shared(1));
    assert_eq!(listing.entries[2], shared(3));
    // Message 2 is listed twice (the second time by the server's lie): it cannot be trusted.
    for entry in [&listing.entries[1], &listing.entries[3]] {
        assert_eq!(entry.number, 2);
        assert!(
            matches!(&entry.uidl, ListedUidl::Invalid { reason, .. } if reason.contains("more than once")),
            "{entry:?}"
        );
    }
    world.stop(TEST_DEADLINE).await
}

/// 700 000 messages (a 40 MB listing, above the old 32 MiB cap) are listed, whole or capped
/// to the entries a poll can use, and the session goes on.
#[tokio::test]
async fn a_maildrop_of_700_000_messages_is_listed() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let first = world
        .pop
        .deliver(MAILBOX, b"Subject: real\r\n\r\nreal\r\n".to_vec());
    world
        .pop
        .set_fault(Some(Fault::VirtualEntries { count: 700_000 }));
    let mut session = login(&world, relaxed_timeouts()).await?;
    let listing = within("UIDL", session.uidl_all()).await??;
    assert_eq!(listing.len(), 700_001);
    assert_eq!(listing[0], (1, first.clone()));
    drop(listing);

    let listing = within("UIDL", session.uidl_listing(1000)).await??;
    assert!(listing.truncated);
    assert_eq!(listing.entries.len(), 1000);
    assert_eq!(listing.entries[0].uidl.unique(), Some(first.as_str()));
    assert_eq!(listing.entries[999].number, 1000);
    assert!(listing.entries.iter().all(|e| e.uidl.unique().is_some()));
    // The discarded 699 001 lines were read: the next answer is the next command's.
    let body = within("RETR", session.retr(1, RETR_LIMIT)).await??;
    assert!(body.ends_with(b"real\r\n"));
    within("QUIT", session.quit()).await??;
    world.stop(TEST_DEADLINE).await
}

/// Terminal escapes and bidi controls in a server's error text never reach a person raw.
#[tokio::test]
async fn escapes_in_server_error_text_are_made_visible() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    world.pop.set_fault(Some(Fault::Err {
        command: "STAT".to_owned(),
        line: "-ERR [SYS/TEMP] \x1b[2J\x1b[31mPAY NOW\x1b[0m \u{202e}exe.gnp\u{7}".to_owned(),
    }));
    let mut session = login(&world, relaxed_timeouts()).await?;
    let err = match within("STAT", session.stat()).await? {
        Ok(_) => bail!("STAT succeeded despite the fault"),
        Err(e) => e,
    };
    let shown = err.to_string();
    for raw in ['\x1b', '\u{202e}', '\u{7}'] {
        assert!(!shown.contains(raw), "{raw:?} raw in {shown:?}");
    }
    assert!(shown.contains(r"\x1b[31mPAY NOW"), "{shown}");
    assert!(shown.contains(r"\u{202e}exe.gnp\x07"), "{shown}");
    assert!(err.is_transient(), "the response code survives: {err:?}");
    world.stop(TEST_DEADLINE).await
}
