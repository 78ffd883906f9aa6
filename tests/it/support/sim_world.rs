//! A simulated tenant for the tests that drive ccmail's own clients: a fresh [`TestCa`], an
//! [`EntraSim`] with one app registration for the domain [`DOMAIN`], and a [`Pop3Sim`] that
//! trusts that Entra simulator and holds the mailbox [`MAILBOX`].
//!
//! Tokens come from the real HTTP [`TokenSource`] (reqwest over rustls, trusting the test CA)
//! behind a [`TokenCache`], exactly as the poller gets them. Every simulator is stopped by
//! [`SimWorld::stop`], which waits (with a deadline) until their tasks have ended.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use ccmail::oauth::{
    AppCredentials, AppKey, CachePolicy, DEFAULT_SCOPE, TokenCache, TokenSource, TokenSourceOptions,
};
use ccmail::pop3::{ServerSpec, Timeouts, TlsMode};
use ccmail_lab::sim::cert::TestCa;
use ccmail_lab::sim::entra::{EntraSim, SimApp};
use ccmail_lab::sim::pop3::Pop3Sim;
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

/// A running simulated tenant; see the module documentation.
pub struct SimWorld {
    pub ca: TestCa,
    pub entra: EntraSim,
    pub pop: Pop3Sim,
}

impl SimWorld {
    /// Starts both simulators, registers the app and creates [`MAILBOX`].
    pub async fn start() -> anyhow::Result<SimWorld> {
        let ca = TestCa::new("ccmail it CA").context("creating the test CA")?;
        let entra = EntraSim::start(&ca).await.context("starting EntraSim")?;
        entra.register_app(SimApp {
            tenant: TENANT.to_owned(),
            tenant_domain: DOMAIN.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            secret_expired: false,
        });
        let pop = Pop3Sim::start(&ca, entra.clone())
            .await
            .context("starting Pop3Sim")?;
        pop.add_mailbox(MAILBOX);
        Ok(SimWorld { ca, entra, pop })
    }

    /// The registered app's credentials, pointing at the simulated authority.
    pub fn app(&self) -> AppCredentials {
        app_credentials(&self.entra, TENANT, CLIENT_ID, CLIENT_SECRET)
    }

    /// The real HTTP token source, trusting the test CA.
    pub fn token_source(&self, options: TokenSourceOptions) -> anyhow::Result<TokenSource> {
        token_source(&self.ca, options)
    }

    /// A cache over the real HTTP token source with default settings.
    pub fn cache(&self) -> anyhow::Result<TokenCache> {
        let source = self.token_source(TokenSourceOptions::default())?;
        Ok(TokenCache::new(Arc::new(source), CachePolicy::default()))
    }

    /// The POP3 simulator as a pilot would see it: implicit TLS on its TLS port, `StartTls` on
    /// its plain port, verified against the test CA.
    pub fn spec(&self, tls: TlsMode, timeouts: Timeouts) -> anyhow::Result<ServerSpec> {
        let addr = match tls {
            TlsMode::Implicit => self.pop.tls_addr(),
            TlsMode::StartTls | TlsMode::DangerousPlaintext => self.pop.plain_addr(),
        };
        Ok(ServerSpec::new(
            "127.0.0.1",
            addr.port(),
            tls,
            &[self.ca.cert_der().clone()],
            timeouts,
        )?)
    }

    /// Stops both simulators and waits until every one of their tasks has ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.pop.shutdown();
        self.entra.shutdown();
        within("stopping the POP3 simulator", self.pop.stopped()).await?;
        within("stopping the Entra simulator", self.entra.stopped()).await?;
        Ok(())
    }
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
