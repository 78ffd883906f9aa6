//! The one simulated world that demo, bench, soak and the tests run against: a fresh
//! [`TestCa`], an [`EntraSim`] with one app registration for a tenant's verified domain, a
//! [`Pop3Sim`] that trusts that Entra simulator and holds the world's mailboxes (each with the
//! requested number of generated messages), and a temporary directory holding the CA's PEM
//! bundle that pilots point at.
//!
//! Built by [`World::builder`]; the database side (the app row with its client secret sealed
//! under a master key, XOAUTH2 pilots on the simulator's implicit-TLS port, the worker's
//! settings) is added by the caller through [`World::insert_app`], [`World::new_pilot`] and
//! [`World::worker_toml`], because each caller owns its own database (a fresh [`TestDb`], the
//! demo's configured one, the bench's private one).
//!
//! Invariants: every mailbox is `local@domain` of the registered tenant, so the app's token
//! opens it; [`World::stop`] stops both simulators and waits until their tasks have ended; the
//! CA bundle file lives as long as the world.
//!
//! [`TestDb`]: crate::testdb::TestDb

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ccmail::oauth::{
    AppCredentials, AppKey, CachePolicy, DEFAULT_SCOPE, TokenCache, TokenSource, TokenSourceOptions,
};
use ccmail::pop3::{ServerSpec, Timeouts, TlsMode};
use ccmail::secrets::MasterKey;
use ccmail::store::{self, AppRow, NewPilot};
use secrecy::SecretString;

use crate::sim::cert::TestCa;
use crate::sim::entra::{EntraSim, SimApp};
use crate::sim::mailgen::MailGen;
use crate::sim::pop3::Pop3Sim;

/// What a world is made of; see [`World::builder`].
#[derive(Debug, Clone)]
pub struct WorldBuilder {
    ca_name: String,
    tenant: String,
    domain: String,
    client_id: String,
    client_secret: String,
    mailboxes: Vec<String>,
    messages: usize,
    seed: u64,
}

impl WorldBuilder {
    /// The test CA's common name (shows up in TLS errors).
    pub fn ca_name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.ca_name);
        self
    }

    /// The tenant id of the app registration (default: a random GUID).
    pub fn tenant(mut self, tenant: &str) -> Self {
        tenant.clone_into(&mut self.tenant);
        self
    }

    /// The tenant's verified domain (default `contoso.test`).
    pub fn domain(mut self, domain: &str) -> Self {
        domain.clone_into(&mut self.domain);
        self
    }

    /// The app registration's client id (default: random).
    pub fn client_id(mut self, client_id: &str) -> Self {
        client_id.clone_into(&mut self.client_id);
        self
    }

    /// The app registration's client secret (default: random).
    pub fn client_secret(mut self, secret: &str) -> Self {
        secret.clone_into(&mut self.client_secret);
        self
    }

    /// Mailboxes created on the POP3 simulator: a local part gets `@domain` appended, a full
    /// address is taken as is.
    pub fn mailboxes<I, S>(mut self, mailboxes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.mailboxes = mailboxes
            .into_iter()
            .map(|m| m.as_ref().to_owned())
            .collect();
        self
    }

    /// Generated ([`MailGen::mixed`]) messages delivered to every mailbox at start.
    pub fn messages(mut self, per_mailbox: usize) -> Self {
        self.messages = per_mailbox;
        self
    }

    /// The seed of the message generator (default: random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Starts both simulators, registers the app, creates the mailboxes and delivers the
    /// messages.
    pub async fn start(self) -> anyhow::Result<World> {
        ccmail::tls::install_crypto_provider();
        let ca = TestCa::new(&self.ca_name).context("creating the test CA")?;
        let entra = EntraSim::start(&ca).await.context("starting EntraSim")?;
        entra.register_app(SimApp {
            tenant: self.tenant.clone(),
            tenant_domain: self.domain.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            secret_expired: false,
        });
        let pop = Pop3Sim::start(&ca, entra.clone())
            .await
            .context("starting Pop3Sim")?;
        let dir = tempfile::Builder::new()
            .prefix("ccmail-world-")
            .tempdir()
            .context("creating the world's directory")?;
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).context("writing ca.pem")?;
        let mut mails = MailGen::new(self.seed);
        let mut mailboxes = Vec::new();
        for m in &self.mailboxes {
            let mailbox = if m.contains('@') {
                m.clone()
            } else {
                format!("{m}@{}", self.domain)
            };
            pop.add_mailbox(&mailbox);
            for _ in 0..self.messages {
                pop.deliver(&mailbox, mails.mixed(&mailbox));
            }
            mailboxes.push(mailbox);
        }
        Ok(World {
            ca,
            entra,
            pop,
            tenant: self.tenant,
            domain: self.domain,
            client_id: self.client_id,
            client_secret: self.client_secret,
            mailboxes,
            mails,
            dir,
        })
    }
}

/// A running simulated world; see the module documentation.
pub struct World {
    /// The CA that signed both simulators' certificates.
    pub ca: TestCa,
    pub entra: EntraSim,
    pub pop: Pop3Sim,
    /// The app registration's tenant id.
    pub tenant: String,
    /// The tenant's verified domain.
    pub domain: String,
    pub client_id: String,
    /// The registered client secret (for "never logged" checks).
    pub client_secret: String,
    /// The mailboxes created at start, as full addresses, in the builder's order.
    pub mailboxes: Vec<String>,
    /// The generator the start messages came from (continue with it for unique markers).
    pub mails: MailGen,
    dir: tempfile::TempDir,
}

impl World {
    /// A builder with random tenant, client id and secret, domain `contoso.test`, no mailboxes.
    pub fn builder() -> WorldBuilder {
        WorldBuilder {
            ca_name: "ccmail lab CA".to_owned(),
            tenant: random_guid(),
            domain: "contoso.test".to_owned(),
            client_id: format!("lab-app-{:08x}", fastrand::u32(..)),
            client_secret: format!("lab~secret~{:032x}", fastrand::u128(..)),
            mailboxes: Vec::new(),
            messages: 0,
            seed: fastrand::u64(..),
        }
    }

    /// The PEM file of the CA that signed both simulators' certificates.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The world's temporary directory (removed with it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The registered app's credentials, pointing at the simulated authority.
    pub fn credentials(&self) -> AppCredentials {
        AppCredentials::with_secret(
            AppKey {
                authority: self.entra.authority(),
                tenant: self.tenant.clone(),
                client_id: self.client_id.clone(),
                scope: DEFAULT_SCOPE.to_owned(),
            },
            SecretString::from(self.client_secret.clone()),
        )
    }

    /// The real HTTP token source with `options`, trusting the test CA in addition.
    pub fn token_source(&self, options: TokenSourceOptions) -> anyhow::Result<TokenSource> {
        let mut options = options;
        options.extra_roots.push(self.ca.cert_der().clone());
        Ok(TokenSource::new(options)?)
    }

    /// A cache over the real HTTP token source with default settings.
    pub fn cache(&self) -> anyhow::Result<TokenCache> {
        let source = self.token_source(TokenSourceOptions::default())?;
        Ok(TokenCache::new(Arc::new(source), CachePolicy::default()))
    }

    /// The POP3 simulator as a pilot would see it: implicit TLS on its TLS port, `StartTls`
    /// (or plaintext) on its plain port, verified against the test CA.
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

    /// Stores the registered app as `name` in the database behind `conn`, its client secret
    /// sealed with `key` and its authority the simulator's.
    pub async fn insert_app(
        &self,
        conn: &mut sqlx::PgConnection,
        name: &str,
        key: &MasterKey,
    ) -> anyhow::Result<AppRow> {
        let mut app = store::NewApp::new(name, &self.tenant, &self.client_id, String::new());
        app.authority = self.entra.authority();
        app.seal_credential(key, &SecretString::from(self.client_secret.clone()))?;
        Ok(store::insert_app(conn, &app).await?)
    }

    /// A new XOAUTH2 pilot named `queue` for `mailbox` through `app_id` on the simulator's
    /// implicit-TLS port, trusting the world's CA bundle, polled every second (not yet stored).
    pub fn new_pilot(&self, queue: &str, mailbox: &str, app_id: i64) -> NewPilot {
        let mut pilot = NewPilot::new(queue, mailbox, store::PilotAuth::XOAuth2 { app_id });
        let addr = self.pop.tls_addr();
        pilot.host = addr.ip().to_string();
        pilot.port = addr.port();
        pilot.tls = TlsMode::Implicit;
        pilot.ca_bundle = Some(self.ca_path().display().to_string());
        pilot.poll_interval = Duration::from_secs(1);
        pilot
    }

    /// Worker settings (TOML) for this world: `database_url`, HTTP on `listen`, the agents' API
    /// on a port of its own choosing, the CA trusted
    /// for tokens, the simulator's authority and host allowed, quick reloads and backoffs,
    /// JSON logs at info. Callers append sections of their own.
    pub fn worker_toml(&self, database_url: &str, listen: &str) -> String {
        format!(
            "[database]\nurl = {:?}\n\n[http]\nlisten = {listen:?}\ngauge_refresh_secs = 1\n\n\
             [api]\nlisten = \"127.0.0.1:0\"\n\n\
             [oauth]\nextra_ca_file = {:?}\nallowed_authorities = [{:?}]\n\n\
             [pop3]\nallowed_xoauth2_hosts = [\"127.0.0.1\"]\n\n\
             [worker]\nreload_interval_secs = 1\nlease_ttl_secs = 3\ninitial_backoff_secs = 1\nmax_backoff_secs = 2\n\n\
             [log]\nformat = \"json\"\nlevel = \"info\"\n",
            database_url,
            self.ca_path().display().to_string(),
            self.entra.authority()
        )
    }

    /// Stops both simulators and waits (at most `deadline` each) until their tasks have ended.
    pub async fn stop(self, deadline: Duration) -> anyhow::Result<()> {
        self.pop.shutdown();
        self.entra.shutdown();
        tokio::time::timeout(deadline, self.pop.stopped())
            .await
            .context("the POP3 simulator did not stop in time")?;
        tokio::time::timeout(deadline, self.entra.stopped())
            .await
            .context("the Entra simulator did not stop in time")?;
        Ok(())
    }
}

/// A random GUID-shaped tenant id.
pub fn random_guid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        fastrand::u16(..0x1000),
        fastrand::u64(..0x1_0000_0000_0000)
    )
}
