//! The fixed simulated tenant of the tests that drive ccmail's own clients: [`start`] builds
//! the lab's [`World`] (a fresh test CA, an Entra simulator with one app registration for the
//! domain [`DOMAIN`], and a POP3 simulator that trusts it and holds the mailbox [`MAILBOX`])
//! with well-known ids and secret, so a test can look for them in logs.
//!
//! Tokens come from the real HTTP `TokenSource` (reqwest over rustls, trusting the test CA)
//! behind a `TokenCache`, exactly as the poller gets them ([`World::cache`]). `World::stop`
//! waits (with a deadline) until every simulator task has ended.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use ccmail::oauth::{AppCredentials, AppKey, DEFAULT_SCOPE, TokenSource, TokenSourceOptions};
use ccmail::pop3::Timeouts;
use ccmail_lab::sim::cert::TestCa;
use ccmail_lab::sim::entra::EntraSim;
use ccmail_lab::world::World;
use secrecy::SecretString;

/// The simulated tenant's id.
pub const TENANT: &str = "5c1e2d3f-0000-4000-8000-00000000c0de";
/// The tenant's verified domain: its app token opens every mailbox `*@DOMAIN`.
pub const DOMAIN: &str = "contoso.test";
/// The app registration's client id.
pub const CLIENT_ID: &str = "9a8b7c6d-1111-4222-8333-444455556666";
/// The app registration's client secret (long and unusual, so a leak is unmistakable).
pub const CLIENT_SECRET: &str = "Qx7~simSecretValue.ccmail-it2-d41d8cd98f00b204";
/// A mailbox of the tenant, present in the POP3 simulator.
pub const MAILBOX: &str = "support@contoso.test";

/// How long a test waits for anything before it fails instead of hanging.
pub const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// Deadlines generous enough for a loaded two-core machine; tests that exercise a timeout set
/// their own short `command` deadline.
pub fn relaxed_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(10),
        tls: Duration::from_secs(10),
        command: Duration::from_secs(10),
        idle: Duration::from_secs(10),
        ..Timeouts::DEFAULT
    }
}

/// Runs `fut`, failing (instead of hanging the test) if it takes longer than [`TEST_DEADLINE`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .map_err(|_| anyhow!("{what} did not finish within {TEST_DEADLINE:?}"))
}

/// Starts the lab's [`World`] as this tenant: the app registered for [`DOMAIN`] with
/// [`CLIENT_ID`] and [`CLIENT_SECRET`], and [`MAILBOX`] created. Stop it with
/// `world.stop(TEST_DEADLINE)`.
pub async fn start() -> anyhow::Result<World> {
    World::builder()
        .ca_name("ccmail it CA")
        .tenant(TENANT)
        .domain(DOMAIN)
        .client_id(CLIENT_ID)
        .client_secret(CLIENT_SECRET)
        .mailboxes([MAILBOX])
        .start()
        .await
}

/// Credentials for `client_id` in `tenant` at `entra`'s authority, with the Exchange scope.
pub fn app_credentials(
    entra: &EntraSim,
    tenant: &str,
    client_id: &str,
    secret: &str,
) -> AppCredentials {
    AppCredentials::with_secret(
        AppKey {
            authority: entra.authority(),
            tenant: tenant.to_owned(),
            client_id: client_id.to_owned(),
            scope: DEFAULT_SCOPE.to_owned(),
        },
        SecretString::from(secret.to_owned()),
    )
}

/// The real HTTP token source with `options`, trusting `ca` in addition.
pub fn token_source(ca: &TestCa, options: TokenSourceOptions) -> anyhow::Result<TokenSource> {
    let mut options = options;
    options.extra_roots.push(ca.cert_der().clone());
    Ok(TokenSource::new(options)?)
}
