//! The real HTTP token source and the token cache against the simulated Entra ID: one request
//! per app however many callers ask at once, the old token served while a refresh fails (with
//! the failure visible and the retries paced), every AADSTS answer mapped to its code,
//! permanence and fix, `expires_in` as a string, and transport-level trouble as transient.
//!
//! Refresh timing is driven with tokio's clock (`pause` / `advance` / `resume` between
//! requests), never by sleeping: the cache reads tokio's clock, the simulator's token validity
//! the wall clock, so an advanced tokio clock reaches the refresh window while the old token is
//! still genuinely valid.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ccmail::oauth::{
    AccessToken, AppCredentials, CachePolicy, OAuthError, TokenCache, TokenSourceOptions,
    aadsts_fix,
};
use ccmail_lab::sim::entra::{SimApp, TokenFailure};
use secrecy::ExposeSecret;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::support::sim_world::{
    self, CLIENT_ID, CLIENT_SECRET, DOMAIN, TENANT, TEST_DEADLINE, app_credentials, within,
};
use ccmail_lab::world::World;

/// Calls `cache.token(app)` from `callers` tasks released together, and returns the tokens.
async fn concurrent_tokens(
    cache: &Arc<TokenCache>,
    apps: &[AppCredentials],
    callers: usize,
) -> anyhow::Result<Vec<(usize, AccessToken)>> {
    let barrier = Arc::new(Barrier::new(apps.len() * callers));
    let mut tasks = JoinSet::new();
    for (i, app) in apps.iter().enumerate() {
        for _ in 0..callers {
            let (cache, app, barrier) = (cache.clone(), app.clone(), barrier.clone());
            tasks.spawn(async move {
                barrier.wait().await;
                cache.token(&app).await.map(|t| (i, t))
            });
        }
    }
    let mut tokens = Vec::new();
    while let Some(joined) = within("token callers", tasks.join_next()).await? {
        tokens.push(joined.context("a token caller panicked")??);
    }
    Ok(tokens)
}

fn secret(t: &AccessToken) -> &str {
    t.secret().expose_secret()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_callers_make_one_request() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    let cache = Arc::new(world.cache()?);
    let tokens = concurrent_tokens(&cache, &[world.credentials()], 200).await?;
    assert_eq!(tokens.len(), 200);
    let first = secret(&tokens[0].1).to_owned();
    assert!(tokens.iter().all(|(_, t)| secret(t) == first));
    assert!(
        world.entra.validate(&first).is_some(),
        "Entra must know the token"
    );
    assert_eq!(world.entra.token_requests(), 1);
    world.stop(TEST_DEADLINE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_with_a_hundred_callers_each_make_two_requests() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    const OTHER_TENANT: &str = "0f0f0f0f-0000-4000-8000-0000000000f0";
    world.entra.register_app(SimApp {
        tenant: OTHER_TENANT.to_owned(),
        tenant_domain: "fabrikam.test".to_owned(),
        client_id: "other-app".to_owned(),
        client_secret: "other-secret".to_owned(),
        secret_expired: false,
    });
    let apps = [
        world.credentials(),
        app_credentials(&world.entra, OTHER_TENANT, "other-app", "other-secret"),
    ];
    let cache = Arc::new(world.cache()?);
    let tokens = concurrent_tokens(&cache, &apps, 100).await?;
    assert_eq!(tokens.len(), 200);
    for (i, domain) in [(0, DOMAIN), (1, "fabrikam.test")] {
        let mine: Vec<&AccessToken> = tokens
            .iter()
            .filter(|(a, _)| *a == i)
            .map(|(_, t)| t)
            .collect();
        assert_eq!(mine.len(), 100);
        assert!(mine.iter().all(|t| secret(t) == secret(mine[0])));
        let grant = world
            .entra
            .validate(secret(mine[0]))
            .context("unknown token")?;
        assert_eq!(grant.tenant_domain, domain, "each app gets its own token");
    }
    assert_eq!(world.entra.token_requests(), 2);
    world.stop(TEST_DEADLINE).await
}

/// Moves tokio's clock forward by `by` without sleeping (the runtime must be current-thread).
async fn advance_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

#[tokio::test]
async fn a_failed_refresh_serves_the_old_token_and_backs_off() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    // Lifetime 400 s, refresh 300 s ahead: the refresh window opens at 200 s.
    world.entra.set_expires_in(400);
    let source = world.token_source(TokenSourceOptions {
        refresh_ahead: Duration::from_secs(300),
        ..TokenSourceOptions::default()
    })?;
    // A backoff far above the time this test takes in real time, so the count is exact.
    let policy = CachePolicy {
        min_validity: Duration::from_secs(30),
        transient_backoff: Duration::from_secs(60),
        permanent_backoff: Duration::from_secs(60),
        max_backoff: Duration::from_secs(600),
    };
    let cache = Arc::new(TokenCache::new(Arc::new(source), policy));
    let app = world.credentials();

    let old = within("first token", cache.token(&app)).await??;
    assert_eq!(world.entra.token_requests(), 1);
    // Not yet in the refresh window: served from the cache.
    within("cached token", cache.token(&app)).await??;
    assert_eq!(world.entra.token_requests(), 1);

    advance_clock(Duration::from_secs(250)).await;
    world.entra.fail_next(usize::MAX, TokenFailure::Status(503));
    let tokens = concurrent_tokens(&cache, std::slice::from_ref(&app), 50).await?;
    for _ in 0..50 {
        let t = within("token", cache.token(&app)).await??;
        assert_eq!(secret(&t), secret(&old));
    }
    assert!(tokens.iter().all(|(_, t)| secret(t) == secret(&old)));
    // One refresh attempt for 100 callers; the rest wait for the backoff.
    assert_eq!(world.entra.token_requests(), 2);

    let status = cache.status();
    assert_eq!(status.len(), 1);
    let s = &status[0];
    assert_eq!(s.key, app.key);
    assert_eq!(s.consecutive_failures, 1);
    assert_eq!(s.expires_at, Some(old.expires_at_wall));
    match &s.last_error {
        Some(e @ OAuthError::Http { status: 503, .. }) => assert!(e.is_transient()),
        other => bail!("expected the 503 in the status, got {other:?}"),
    }

    // After the backoff (at most 60 s for the first failure): one more attempt, old token.
    advance_clock(Duration::from_secs(70)).await;
    let t = within("token", cache.token(&app)).await??;
    assert_eq!(secret(&t), secret(&old));
    within("token", cache.token(&app)).await??;
    assert_eq!(world.entra.token_requests(), 3);
    assert_eq!(cache.status()[0].consecutive_failures, 2);

    // Entra recovers; past the second backoff (at most 120 s) the old token has expired, so
    // the next caller gets a new one and the status is clean again.
    world.entra.clear_failures();
    advance_clock(Duration::from_secs(130)).await;
    let new = within("new token", cache.token(&app)).await??;
    assert_ne!(secret(&new), secret(&old));
    assert!(world.entra.validate(secret(&new)).is_some());
    assert_eq!(world.entra.token_requests(), 4);
    let s = &cache.status()[0];
    assert!(
        s.last_error.is_none() && s.consecutive_failures == 0,
        "{s:?}"
    );
    world.stop(TEST_DEADLINE).await
}

/// One token request with `app`, expected to fail.
async fn refused(world: &World, app: &AppCredentials) -> anyhow::Result<OAuthError> {
    let source = world.token_source(TokenSourceOptions::default())?;
    match within("token request", source.request(app)).await? {
        Ok(_) => bail!("{} got a token", app.key),
        Err(e) => Ok(e),
    }
}

/// Checks an AADSTS answer: code, permanence, and the fix from the AADSTS table
/// (docs/exchange-online.md) (which must mention `keyword`).
fn check_aadsts(e: &OAuthError, code: u32, permanent: bool, keyword: &str) -> anyhow::Result<()> {
    ensure!(
        matches!(e, OAuthError::Entra(_)),
        "AADSTS{code}: expected Entra, got {e:?}"
    );
    ensure!(e.aadsts() == Some(code), "expected AADSTS{code}, got {e}");
    ensure!(
        e.is_permanent() == permanent,
        "AADSTS{code}: permanent should be {permanent}: {e}"
    );
    ensure!(
        e.is_transient() != permanent,
        "AADSTS{code}: transient/permanent both {permanent}"
    );
    let fix = e
        .fix()
        .with_context(|| format!("AADSTS{code} has no fix"))?;
    ensure!(Some(fix) == aadsts_fix(code), "AADSTS{code}: fix {fix:?}");
    ensure!(
        fix.contains(keyword),
        "AADSTS{code}: fix {fix:?} lacks {keyword:?}"
    );
    let text = e.to_string();
    ensure!(text.contains(&format!("AADSTS{code}")), "{text}");
    // Support needs Entra's ids; they are in the message.
    ensure!(
        text.contains("trace id") && text.contains("correlation id"),
        "{text}"
    );
    ensure!(
        !text.contains(CLIENT_SECRET),
        "the secret leaked into {text}"
    );
    Ok(())
}

#[tokio::test]
async fn each_aadsts_answer_maps_to_its_code_permanence_and_fix() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    world.entra.register_app(SimApp {
        tenant: TENANT.to_owned(),
        tenant_domain: DOMAIN.to_owned(),
        client_id: "expired-app".to_owned(),
        client_secret: "expired-secret".to_owned(),
        secret_expired: true,
    });
    let with = |tenant: &str, client: &str, secret: &str, scope: Option<&str>| {
        let mut app = app_credentials(&world.entra, tenant, client, secret);
        if let Some(scope) = scope {
            app.key.scope = scope.to_owned();
        }
        app
    };
    // What the simulated directory answers to real configuration mistakes.
    let cases = [
        (
            with(TENANT, CLIENT_ID, "the-secret-id-not-its-value", None),
            7000215,
            "Value",
        ),
        (
            with(TENANT, "expired-app", "expired-secret", None),
            7000222,
            "new secret",
        ),
        (with(TENANT, CLIENT_ID, "", None), 7000218, "credential"),
        (
            with(TENANT, "no-such-app", CLIENT_SECRET, None),
            700016,
            "client id",
        ),
        (
            with("nowhere.example", CLIENT_ID, CLIENT_SECRET, None),
            90002,
            "tenant id",
        ),
        (
            with("common", CLIENT_ID, CLIENT_SECRET, None),
            9001023,
            "common",
        ),
        (
            with(
                TENANT,
                CLIENT_ID,
                CLIENT_SECRET,
                Some("https://outlook.office365.com"),
            ),
            1002012,
            "/.default",
        ),
        (
            with(
                TENANT,
                CLIENT_ID,
                CLIENT_SECRET,
                Some("https://graph.example/.default"),
            ),
            500011,
            "Exchange Online",
        ),
    ];
    for (app, code, keyword) in &cases {
        let e = refused(&world, app).await?;
        check_aadsts(&e, *code, true, keyword)?;
    }

    // Answers Entra gives for reasons outside the request: injected.
    let injected = [
        (400, "unauthorized_client", 7000112, true, "enable"),
        (400, "invalid_request", 53003, true, "Conditional Access"),
        (400, "invalid_request", 50196, false, "back off"),
        (429, "invalid_request", 90055, false, "back off"),
    ];
    for (status, error, code, permanent, keyword) in injected {
        world.entra.fail_next(
            1,
            TokenFailure::Aadsts {
                status,
                error: error.to_owned(),
                code,
            },
        );
        let e = refused(&world, &world.credentials()).await?;
        check_aadsts(&e, code, permanent, keyword)?;
    }
    // `temporarily_unavailable` is transient whatever its code.
    world.entra.fail_next(
        1,
        TokenFailure::Aadsts {
            status: 400,
            error: "temporarily_unavailable".to_owned(),
            code: 90033,
        },
    );
    let e = refused(&world, &world.credentials()).await?;
    ensure!(e.aadsts() == Some(90033) && e.is_transient(), "{e:?}");

    // Every request was made once: the source itself never retries.
    assert_eq!(
        world.entra.token_requests(),
        (cases.len() + injected.len() + 1) as u64
    );
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn expires_in_as_a_string_is_understood() -> anyhow::Result<()> {
    let world = sim_world::start().await?;
    world.entra.set_expires_in_as_string(true);
    world.entra.set_expires_in(1234);
    let source = world.token_source(TokenSourceOptions::default())?;
    let token = within("token", source.request(&world.credentials())).await??;
    let left = token
        .expires_at
        .saturating_duration_since(tokio::time::Instant::now());
    assert!(
        left <= Duration::from_secs(1234) && left > Duration::from_secs(1200),
        "expires in {left:?}"
    );
    assert!(world.entra.validate(secret(&token)).is_some());
    world.stop(TEST_DEADLINE).await
}

#[tokio::test]
async fn server_trouble_and_hangs_are_transient() -> anyhow::Result<()> {
    // Long enough for a TLS handshake on a loaded machine (the first failures are real answers),
    // short enough that the hang ends quickly.
    const TOTAL: Duration = Duration::from_secs(2);
    /// Slack for a loaded machine; this checks the deadline is applied, not its precision.
    const SLACK: Duration = Duration::from_secs(5);

    let world = sim_world::start().await?;
    let source = world.token_source(TokenSourceOptions {
        total_timeout: TOTAL,
        ..TokenSourceOptions::default()
    })?;
    let app = world.credentials();
    for failure in [
        TokenFailure::Status(500),
        TokenFailure::Status(503),
        TokenFailure::EmptyStatus(502),
        TokenFailure::Malformed,
        TokenFailure::Hang,
    ] {
        world.entra.fail_next(1, failure.clone());
        let started = Instant::now();
        let e = match within("token request", source.request(&app)).await? {
            Ok(_) => bail!("{failure:?}: got a token"),
            Err(e) => e,
        };
        let elapsed = started.elapsed();
        match (&failure, &e) {
            (
                TokenFailure::Status(s) | TokenFailure::EmptyStatus(s),
                OAuthError::Http { status, .. },
            ) => {
                assert_eq!(status, s)
            }
            (TokenFailure::Malformed, OAuthError::Malformed(_)) => {}
            (TokenFailure::Hang, OAuthError::Timeout { after, .. }) => {
                assert_eq!(*after, TOTAL);
                assert!(elapsed < TOTAL + SLACK, "gave up after {elapsed:?}");
            }
            _ => bail!("{failure:?} gave {e:?}"),
        }
        assert!(e.is_transient() && !e.is_permanent(), "{failure:?}: {e}");
        assert!(e.aadsts().is_none());
        assert!(e.fix().is_some(), "{failure:?}: no fix");
    }
    // The endpoint works again after the faults.
    within("token", source.request(&app)).await??;
    assert_eq!(world.entra.token_requests(), 6);
    world.stop(TEST_DEADLINE).await
}
