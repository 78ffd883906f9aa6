//! Token endpoint faults under running pollers (issue 4, item 4): the endpoint down, slow
//! beyond its deadline, 5xx, 429, malformed JSON, each AADSTS class, and `expires_in` tiny,
//! huge and as a string.
//!
//! Several pilots share one app and are polled by a real supervisor that retries fast (1 s), so
//! any tight loop would show as many token requests. Each case counts the requests over the
//! window it ran and checks them against the most the cache's backoff allows (whatever the
//! number of pilots), that the pilot rows show the error with its AADSTS code and fix
//! (`store::list_pilots`), and that no message is lost.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use ccmail::ingest::supervisor::{StatusBoard, Supervisor};
use ccmail::oauth::{CachePolicy, TokenCache, TokenSource, TokenSourceOptions, aadsts_fix};
use ccmail::store::{self, PilotRow};
use ccmail_lab::sim::entra::{SimApp, TokenFailure};
use ccmail_lab::sim::mailgen::{Kind, MailGen};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::{DOMAIN, Ledger, PipelineWorld, small_limits};
use crate::support::scenario::{fast_settings, summary};
use crate::support::wait::wait_until;

/// Pilots sharing the app in every case.
const PILOTS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(40);

/// Most token requests the cache may make in `elapsed` when every one fails: the first, then
/// one per backoff wait (each at least half of `base * 2^(n-1)`).
fn max_requests(base: Duration, elapsed: Duration) -> u64 {
    let (mut n, mut spent, mut wait) = (1, Duration::ZERO, base / 2);
    while spent + wait <= elapsed {
        spent += wait;
        wait *= 2;
        n += 1;
    }
    n
}

/// A fresh app registration (its own token cache entry) with `PILOTS` pilots, one message each.
async fn app_with_pilots(
    world: &PipelineWorld,
    tag: &str,
    ledger: &mut Ledger,
) -> anyhow::Result<Vec<PilotRow>> {
    let client_id = format!("it-{tag}-{:06x}", fastrand::u32(..0xff_ffff));
    let secret = format!("s~{:024x}", fastrand::u128(..));
    world.entra.register_app(SimApp {
        tenant: world.app.tenant.clone(),
        tenant_domain: DOMAIN.to_owned(),
        client_id: client_id.clone(),
        client_secret: secret.clone(),
        secret_expired: false,
    });
    let mut new_app = store::NewApp::new(tag, &world.app.tenant, &client_id, String::new());
    new_app.authority = world.entra.authority();
    new_app.seal_credential(&world.key, &SecretString::from(secret))?;
    let app = {
        let mut conn = world.db.pool().acquire().await?;
        store::insert_app(&mut conn, &new_app).await?
    };
    let mut mails = MailGen::new(fastrand::u64(..));
    let mut rows = Vec::new();
    for i in 0..PILOTS {
        let row = world
            .add_pilot(&format!("{tag}{i}"), |p| {
                p.auth = store::PilotAuth::XOAuth2 { app_id: app.id }
            })
            .await?;
        ledger.deliver(
            &world.pop,
            &row.mailbox,
            mails.message(&row.mailbox, Kind::Plain),
        )?;
        rows.push(row);
    }
    Ok(rows)
}

struct Running {
    status: StatusBoard,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(world: &PipelineWorld, rows: &[PilotRow]) -> anyhow::Result<Running> {
        let supervisor = Supervisor::new(
            world.db.db().clone(),
            Arc::clone(&world.tokens),
            fast_settings(small_limits(), world.credential_policy()),
            Some(world.master_key()?),
        )
        .only_pilots(rows.iter().map(|r| r.id));
        let status = supervisor.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervisor.run(shutdown.clone()));
        Ok(Running {
            status,
            shutdown,
            task,
        })
    }

    fn min_polls(&self, rows: &[PilotRow]) -> u64 {
        let board = self.status.lock().map(|b| b.clone()).unwrap_or_default();
        rows.iter()
            .map(|r| board.get(&r.id).map(|s| s.polls).unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    fn board(&self) -> String {
        self.status
            .lock()
            .map(|b| format!("{b:?}"))
            .unwrap_or_default()
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .context("the supervisor did not stop within 20 s")?
            .context("the supervisor panicked")?;
        Ok(())
    }
}

/// The stored rows of `rows`' pilots.
async fn pilot_rows(world: &PipelineWorld, rows: &[PilotRow]) -> anyhow::Result<Vec<PilotRow>> {
    let mut conn = world.db.pool().acquire().await?;
    let all = store::list_pilots(&mut conn).await?;
    Ok(all
        .into_iter()
        .filter(|p| rows.iter().any(|r| r.id == p.id))
        .collect())
}

/// What a failing token endpoint must produce.
struct Expect {
    /// Text the pilots' `last_error` contains.
    error: String,
    /// The pilots' `last_error_hint`, when one is due.
    hint: Option<&'static str>,
    /// Transient failures retry on the cache's 2 s base; permanent ones on 60 s.
    transient: bool,
    /// Clearing the injected failures heals the endpoint (then the mailboxes must drain).
    heals: bool,
}

/// Runs pollers against a token endpoint made to fail by `fail`, until every pilot has polled
/// three times and recorded the error; checks the request count, the recorded error and fix,
/// and that nothing was lost. Transient faults are then cleared and the mailboxes must drain.
async fn failing_endpoint(
    name: &str,
    world: &PipelineWorld,
    fail: impl FnOnce(&PipelineWorld),
    expect: Expect,
) -> anyhow::Result<()> {
    let mut ledger = Ledger::default();
    let rows = app_with_pilots(world, name, &mut ledger).await?;
    world.entra.clear_failures();
    fail(world);
    let before = world.entra.token_requests();
    let started = tokio::time::Instant::now();
    let running = Running::start(world, &rows)?;
    wait_until(
        "three failed polls of every pilot with the error recorded",
        DEADLINE,
        || async {
            let recorded = pilot_rows(world, &rows).await?;
            Ok(running.min_polls(&rows) >= 3 && recorded.iter().all(|p| p.last_error.is_some()))
        },
        || running.board(),
    )
    .await?;
    let elapsed = started.elapsed();
    // Requests that reached the endpoint; when it is down none does, and the cache's count of
    // failed attempts is what would have been sent.
    let attempts = world
        .tokens
        .status()
        .iter()
        .find(|s| {
            rows.iter()
                .all(|_| s.key.client_id.starts_with(&format!("it-{name}-")))
        })
        .map(|s| u64::from(s.consecutive_failures))
        .unwrap_or(0);
    let requests = (world.entra.token_requests() - before).max(attempts);
    let policy = CachePolicy::default();
    let base = if expect.transient {
        policy.transient_backoff
    } else {
        policy.permanent_backoff
    };
    let bound = max_requests(base, elapsed);
    let per_minute = requests as f64 * 60.0 / elapsed.as_secs_f64();
    eprintln!(
        "token case={name} pilots={PILOTS} polls>=3 token_requests={requests} in {:.1}s ({per_minute:.0}/min extrapolated) bound={bound}",
        elapsed.as_secs_f64()
    );
    ensure!(requests >= 1, "{name}: the endpoint was asked");
    ensure!(
        requests <= bound,
        "{name}: {requests} token requests in {elapsed:?} for {PILOTS} pilots; the backoff allows {bound}"
    );
    for p in pilot_rows(world, &rows).await? {
        let error = p.last_error.clone().unwrap_or_default();
        ensure!(
            error.contains(&expect.error),
            "{name}: pilot {} shows {error:?}, expected it to mention {:?}",
            p.id,
            expect.error
        );
        ensure!(
            p.last_error_hint.as_deref() == expect.hint,
            "{name}: pilot {} hint {:?}, expected {:?}",
            p.id,
            p.last_error_hint,
            expect.hint
        );
    }
    let on_server: usize = rows
        .iter()
        .map(|r| world.pop.messages(&r.mailbox).len())
        .sum();
    ensure!(
        on_server == PILOTS,
        "{name}: no token, nothing fetched or deleted"
    );

    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    if expect.heals {
        world.entra.clear_failures();
        wait_until(
            "recovery after the endpoint heals",
            DEADLINE,
            || async {
                Ok(rows
                    .iter()
                    .all(|r| world.pop.messages(&r.mailbox).is_empty()))
            },
            || running.board(),
        )
        .await?;
        running.stop().await?;
        let tally = ledger.check(&world.heads(&ids).await?);
        summary(&format!("token_{name}"), requests, ledger.len(), &tally);
        tally.assert_exactly_once()?;
    } else {
        running.stop().await?;
        // Nothing stored, everything still on the server: nothing lost, nothing doubled.
        let tally = ledger.check(&world.heads(&ids).await?);
        ensure!(tally.stored_once == 0 && tally.duplicated.is_empty());
        eprintln!(
            "scenario=token_{name} faults={requests} messages={} lost=0 duplicated=0",
            ledger.len()
        );
    }
    Ok(())
}

fn aadsts(status: u16, error: &str, code: u32) -> TokenFailure {
    TokenFailure::Aadsts {
        status,
        error: error.to_owned(),
        code,
    }
}

#[tokio::test]
async fn endpoint_down_backs_off_and_surfaces_the_error() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    // Stopping the simulator closes its listener: connection refused. The POP3 side keeps
    // validating tokens in-process, so only the token endpoint is down.
    failing_endpoint(
        "down",
        &world,
        |w| w.entra.shutdown(),
        Expect {
            error: "unreachable".into(),
            hint: Some(
                "check that this host can reach the authority over HTTPS (proxy, firewall, DNS)",
            ),
            transient: true,
            // The simulator cannot be restarted on the same port: no recovery phase here (the
            // other transient cases show it).
            heals: false,
        },
    )
    .await?;
    world.finish().await
}

/// Runs [`failing_endpoint`] for each transient case, with a one-second request deadline.
async fn transient_cases(
    cases: Vec<(&str, TokenFailure, &str, Option<&'static str>)>,
) -> anyhow::Result<()> {
    let mut world = PipelineWorld::start().await?;
    // A one-second request deadline, so "slow" costs a second, not the default 30.
    world.tokens = Arc::new(TokenCache::new(
        Arc::new(TokenSource::new(TokenSourceOptions {
            total_timeout: Duration::from_secs(1),
            extra_roots: world.ca_der()?,
            ..TokenSourceOptions::default()
        })?),
        CachePolicy::default(),
    ));
    for (name, failure, error, hint) in cases {
        failing_endpoint(
            name,
            &world,
            |w| w.entra.fail_next(usize::MAX, failure),
            Expect {
                error: error.into(),
                hint,
                transient: true,
                heals: true,
            },
        )
        .await?;
    }
    world.finish().await
}

const GATEWAY: Option<&str> =
    Some("check the authority URL; a proxy may be answering instead of Entra ID");

#[tokio::test]
async fn slow_beyond_the_deadline_5xx_and_malformed_back_off_and_recover() -> anyhow::Result<()> {
    transient_cases(vec![
        (
            "slow",
            TokenFailure::Slow(Duration::from_secs(3)),
            "did not answer within",
            Some("check that this host can reach the authority over HTTPS (proxy, firewall, DNS)"),
        ),
        ("http503", TokenFailure::Status(503), "HTTP 503", GATEWAY),
        (
            "malformed_json",
            TokenFailure::Malformed,
            "could not be read",
            GATEWAY,
        ),
    ])
    .await
}

#[tokio::test]
async fn throttling_429_and_tenant_throttling_back_off_and_recover() -> anyhow::Result<()> {
    transient_cases(vec![
        (
            "http429_throttled",
            aadsts(429, "invalid_request", 50196),
            "AADSTS50196",
            aadsts_fix(50196),
        ),
        (
            "tenant_throttling",
            aadsts(400, "invalid_request", 90055),
            "AADSTS90055",
            aadsts_fix(90055),
        ),
    ])
    .await
}

#[tokio::test]
async fn each_aadsts_configuration_error_is_shown_with_its_fix_and_asked_once() -> anyhow::Result<()>
{
    let world = PipelineWorld::start().await?;
    let cases = [
        (401, "invalid_client", 7000215),
        (401, "invalid_client", 7000222),
        (400, "unauthorized_client", 700016),
        (400, "invalid_request", 90002),
        (400, "invalid_request", 90038),
        (400, "invalid_scope", 70011),
        (400, "invalid_resource", 500011),
        (401, "invalid_client", 700027),
        (400, "unauthorized_client", 7000112),
        (400, "access_denied", 53003),
    ];
    for (status, error, code) in cases {
        failing_endpoint(
            &format!("aadsts{code}"),
            &world,
            |w| w.entra.fail_next(usize::MAX, aadsts(status, error, code)),
            Expect {
                error: format!("AADSTS{code}"),
                hint: aadsts_fix(code),
                transient: false,
                heals: false,
            },
        )
        .await?;
    }
    world.finish().await
}

/// Pollers of `rows` run until each has polled `polls` times; returns the token requests.
async fn requests_while_polling(
    world: &PipelineWorld,
    rows: &[PilotRow],
    polls: u64,
) -> anyhow::Result<(u64, Duration, Running)> {
    let before = world.entra.token_requests();
    let started = tokio::time::Instant::now();
    let running = Running::start(world, rows)?;
    wait_until(
        "polls of every pilot",
        DEADLINE,
        || async { Ok(running.min_polls(rows) >= polls) },
        || running.board(),
    )
    .await?;
    Ok((
        world.entra.token_requests() - before,
        started.elapsed(),
        running,
    ))
}

#[tokio::test]
async fn expires_in_huge_or_as_a_string_is_one_request_for_all_pilots() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    for (name, as_string, secs) in [
        ("huge", false, 10 * 365 * 24 * 3600),
        ("string", true, 3599),
    ] {
        world.entra.set_expires_in(secs);
        world.entra.set_expires_in_as_string(as_string);
        let mut ledger = Ledger::default();
        let rows = app_with_pilots(&world, &format!("exp{name}"), &mut ledger).await?;
        let (requests, elapsed, running) = requests_while_polling(&world, &rows, 3).await?;
        running.stop().await?;
        eprintln!(
            "token case=expires_in_{name} pilots={PILOTS} token_requests={requests} in {:.1}s",
            elapsed.as_secs_f64()
        );
        ensure!(
            requests == 1,
            "expires_in {name}: one token serves every pilot"
        );
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let tally = ledger.check(&world.heads(&ids).await?);
        summary(&format!("token_expires_in_{name}"), 0, ledger.len(), &tally);
        tally.assert_exactly_once()?;
    }
    world.finish().await
}

#[tokio::test]
async fn a_tiny_expires_in_is_refreshed_per_app_not_per_poll() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    world.entra.set_expires_in(4);
    let mut ledger = Ledger::default();
    let rows = app_with_pilots(&world, "exptiny", &mut ledger).await?;
    let (requests, elapsed, running) = requests_while_polling(&world, &rows, 4).await?;
    running.stop().await?;
    // A 4 s token is refreshed at half its life: one request per 2 s, whatever the pilots.
    let bound = 1 + (elapsed.as_secs_f64() / 2.0).ceil() as u64;
    eprintln!(
        "token case=expires_in_tiny pilots={PILOTS} token_requests={requests} in {:.1}s bound={bound}",
        elapsed.as_secs_f64()
    );
    ensure!(
        requests <= bound,
        "{requests} token requests in {elapsed:?}: a short-lived token must not be fetched per poll"
    );
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let tally = ledger.check(&world.heads(&ids).await?);
    summary("token_expires_in_tiny", 0, ledger.len(), &tally);
    tally.assert_exactly_once()?;
    world.finish().await
}

#[tokio::test]
async fn a_still_valid_token_keeps_pollers_working_while_its_refresh_fails() -> anyhow::Result<()> {
    let mut world = PipelineWorld::start().await?;
    // Tokens live 8 s and are refreshed from 4 s on; handed out while valid for 1 s more.
    world.tokens = Arc::new(TokenCache::new(
        Arc::new(TokenSource::new(TokenSourceOptions {
            extra_roots: world.ca_der()?,
            ..TokenSourceOptions::default()
        })?),
        CachePolicy {
            min_validity: Duration::from_secs(1),
            ..CachePolicy::default()
        },
    ));
    world.entra.set_expires_in(8);
    let mut ledger = Ledger::default();
    let rows = app_with_pilots(&world, "valid", &mut ledger).await?;
    let running = Running::start(&world, &rows)?;
    let drained = |world: &PipelineWorld, rows: &[PilotRow]| {
        rows.iter()
            .all(|r| world.pop.messages(&r.mailbox).is_empty())
    };
    wait_until(
        "the first messages",
        DEADLINE,
        || async { Ok(drained(&world, &rows)) },
        || running.board(),
    )
    .await?;
    ensure!(world.entra.token_requests() == 1);

    // From now on every refresh fails; mail that arrives after the first failed refresh is
    // still fetched with the old token.
    world.entra.fail_next(usize::MAX, TokenFailure::Status(503));
    wait_until(
        "a failed refresh",
        DEADLINE,
        || async { Ok(world.entra.token_requests() >= 2) },
        || running.board(),
    )
    .await?;
    let mut mails = MailGen::new(0x70_0001);
    for r in &rows {
        ledger.deliver(
            &world.pop,
            &r.mailbox,
            mails.message(&r.mailbox, Kind::Reply),
        )?;
    }
    wait_until(
        "the mail that arrived after the failed refresh",
        DEADLINE,
        || async { Ok(drained(&world, &rows)) },
        || running.board(),
    )
    .await?;

    // Once the old token is no longer usable the error reaches the pilots.
    wait_until(
        "the error on every pilot",
        DEADLINE,
        || async {
            Ok(pilot_rows(&world, &rows).await?.iter().all(|p| {
                p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("HTTP 503"))
            }))
        },
        || running.board(),
    )
    .await?;
    running.stop().await?;
    let requests = world.entra.token_requests();
    eprintln!("token case=still_valid_token pilots={PILOTS} token_requests={requests}");
    ensure!(
        requests <= 4,
        "{requests} requests: one token, then refreshes paced by the 2 s backoff"
    );
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let tally = ledger.check(&world.heads(&ids).await?);
    summary(
        "token_refresh_fails_old_token_serves",
        requests - 1,
        ledger.len(),
        &tally,
    );
    tally.assert_exactly_once()?;
    world.finish().await
}

/// A token endpoint (or a proxy in front of it) that answers 200 with a body that never ends:
/// the request fails on the size limit, long before its deadline, and stops reading, so the
/// simulator produced little more than the limit plus what socket buffers hold.
#[tokio::test]
async fn an_endless_token_body_fails_at_the_size_limit_and_is_not_read_on() -> anyhow::Result<()> {
    use crate::support::sim_world::{self, within};
    let world = sim_world::start().await?;
    let source = world.token_source(TokenSourceOptions::default())?;
    world.entra.fail_next(1, TokenFailure::EndlessBody);
    let err = within(
        "a token request with an endless body",
        source.request(&world.credentials()),
    )
    .await?
    .expect_err("an endless body gave a token");
    let text = err.to_string();
    ensure!(
        text.contains("larger than") && text.contains("KiB"),
        "not refused on size: {text}"
    );
    ensure!(
        err.is_transient(),
        "a misbehaving proxy is retried with backoff"
    );
    ensure!(!text.contains(sim_world::CLIENT_SECRET), "{text}");
    let sent = world.entra.body_bytes_sent();
    ensure!(
        sent < 32 * 1024 * 1024,
        "the client kept reading: the simulator sent {sent} octets"
    );
    // The next request is served normally.
    within(
        "a normal token request",
        source.request(&world.credentials()),
    )
    .await??;
    world.stop(sim_world::TEST_DEADLINE).await
}

/// A body that trickles one byte at a time ends at the request deadline, not never.
#[tokio::test]
async fn a_trickling_token_body_ends_at_the_request_deadline() -> anyhow::Result<()> {
    use crate::support::sim_world::{self, within};
    let world = sim_world::start().await?;
    let source = world.token_source(TokenSourceOptions {
        total_timeout: Duration::from_secs(2),
        ..TokenSourceOptions::default()
    })?;
    world.entra.fail_next(
        1,
        TokenFailure::SlowBody {
            interval: Duration::from_millis(50),
        },
    );
    let err = within(
        "a token request with a trickling body",
        source.request(&world.credentials()),
    )
    .await?
    .expect_err("a trickling body gave a token");
    ensure!(
        matches!(err, ccmail::oauth::OAuthError::Timeout { .. }),
        "{err}"
    );
    world.stop(sim_world::TEST_DEADLINE).await
}
