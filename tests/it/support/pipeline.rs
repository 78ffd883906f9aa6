//! The whole ingest pipeline wired the way `ccmail run` wires it, against the lab's [`World`]
//! (an Entra simulator token endpoint, an Exchange-like POP3 simulator, the test CA): a fresh
//! migrated database ([`TestDb`]), one OAuth app whose client secret is sealed with a [`MasterKey`],
//! and a shared [`TokenCache`]. Pilots are inserted through `ccmail::store` and turned into
//! runtime pilots by the supervisor's own `resolve_pilot`, so the tests exercise the same path
//! as production (sealed secret → decrypt → token → XOAUTH2), under the credential policy of a
//! worker whose `oauth.allowed_authorities` names the simulator.
//!
//! [`Ledger`] remembers every delivered message's `X-Ccmail-Marker` and bytes, and checks what
//! the database holds: each marker stored exactly once, full messages byte-identical.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use ccmail::ingest::poller::{self, IngestLimits, Pilot, PollError, PollReport};
use ccmail::ingest::supervisor::resolve_pilot;
use ccmail::oauth::TokenCache;
use ccmail::pop3::Timeouts;
use ccmail::secrets::{CredentialPolicy, MasterKey};
use ccmail::store::{self, AppRow, NewPilot, PilotRow};
use ccmail_lab::sim::mailgen;
use ccmail_lab::sim::pop3::Pop3Sim;
use ccmail_lab::testdb::{StoredMessage, TestDb, stored_messages, work_item_count};
use ccmail_lab::world::World;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The simulated tenant's verified domain: its app token opens every `*@DOMAIN` mailbox.
pub const DOMAIN: &str = "contoso.test";

/// Deadlines short enough that a hang fails a test in seconds, long enough for a busy machine.
pub fn test_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(10),
        tls: Duration::from_secs(10),
        command: Duration::from_secs(20),
        idle: Duration::from_secs(20),
        ..Timeouts::DEFAULT
    }
}

/// Small limits so that batching, the per-poll cap and the retry cap are all reached by a
/// handful of messages.
pub fn small_limits() -> IngestLimits {
    IngestLimits {
        max_messages_per_poll: 500,
        batch_messages: 2,
        batch_bytes: 16 * 1024 * 1024,
        max_retr_attempts: 3,
        commit_concurrency: 2,
        ..IngestLimits::default()
    }
}

/// See the module documentation. Dereferences to the lab's [`World`] (its simulators, CA,
/// client secret and directory).
pub struct PipelineWorld {
    pub db: TestDb,
    pub world: World,
    pub key: MasterKey,
    pub app: AppRow,
    pub tokens: Arc<TokenCache>,
}

impl std::ops::Deref for PipelineWorld {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

impl PipelineWorld {
    /// Starts the simulators, creates the database and registers one app.
    pub async fn start() -> anyhow::Result<PipelineWorld> {
        PipelineWorld::start_with(TestDb::new().await.context("creating the test database")?).await
    }

    /// As [`PipelineWorld::start`], with the test database created on the server of `url`
    /// (any database URL of that server, e.g. a private cluster's).
    pub async fn start_on(url: &str) -> anyhow::Result<PipelineWorld> {
        let db = TestDb::on_server(url)
            .await
            .with_context(|| format!("creating a test database on {}", store::redacted_url(url)))?;
        PipelineWorld::start_with(db).await
    }

    async fn start_with(db: TestDb) -> anyhow::Result<PipelineWorld> {
        let world = World::builder()
            .ca_name("ccmail it CA")
            .tenant("6f2c1d7e-1b2a-4c3d-8e4f-5a6b7c8d9e0f")
            .domain(DOMAIN)
            .client_id(&format!("it-app-{:08x}", fastrand::u32(..)))
            .client_secret(&format!("it~secret~{:032x}", fastrand::u128(..)))
            .start()
            .await?;
        let key = MasterKey::generate();
        let app = {
            let mut conn = db.pool().acquire().await?;
            world.insert_app(&mut conn, "it-app", &key).await?
        };
        let tokens = Arc::new(world.cache()?);
        Ok(PipelineWorld {
            db,
            world,
            key,
            app,
            tokens,
        })
    }

    /// A copy of the master key the app's secret is sealed with (for a supervisor).
    pub fn master_key(&self) -> anyhow::Result<MasterKey> {
        Ok(MasterKey::from_base64(
            self.key.to_base64().expose_secret(),
        )?)
    }

    /// The CA that signed both simulators' certificates, as DER (for a token source of a
    /// test's own).
    pub fn ca_der(&self) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        Ok(ccmail::tls::read_pem_bundle(&self.ca_path())?)
    }

    /// A new XOAUTH2 pilot for `local@DOMAIN` on the simulator's implicit-TLS port, polled
    /// every second; `edit` adjusts it before it is stored. The mailbox is created on the sim.
    pub async fn add_pilot(
        &self,
        local: &str,
        edit: impl FnOnce(&mut NewPilot),
    ) -> anyhow::Result<PilotRow> {
        let mailbox = format!("{local}@{DOMAIN}");
        self.pop.add_mailbox(&mailbox);
        let mut pilot = self.world.new_pilot(local, &mailbox, self.app.id);
        edit(&mut pilot);
        let mut conn = self.db.pool().acquire().await?;
        Ok(store::insert_pilot(&mut conn, &pilot).await?)
    }

    /// A new USER/PASS pilot for `local@DOMAIN` on the simulator's implicit-TLS port, polled
    /// every second, with `password` accepted by the simulator and stored sealed for the pilot
    /// as `edit` leaves it; `edit` adjusts it before it is stored.
    pub async fn add_user_pass_pilot(
        &self,
        local: &str,
        password: &str,
        edit: impl FnOnce(&mut NewPilot),
    ) -> anyhow::Result<PilotRow> {
        let mailbox = format!("{local}@{DOMAIN}");
        self.pop.set_password(&mailbox, password);
        let mut sealed = Ok(());
        let row = self
            .add_pilot(local, |p| {
                p.auth = store::PilotAuth::UserPass {
                    username: mailbox.clone(),
                    credential: String::new(),
                };
                edit(p);
                sealed = seal_password(p, &self.key, password);
            })
            .await;
        sealed?;
        row
    }

    /// The runtime pilot, resolved exactly as the supervisor does (secret unsealed, CA loaded).
    pub async fn resolve(&self, row: &PilotRow) -> anyhow::Result<Pilot> {
        self.resolve_with(row, test_timeouts()).await
    }

    /// As [`PipelineWorld::resolve`], with these POP3 deadlines.
    pub async fn resolve_with(&self, row: &PilotRow, timeouts: Timeouts) -> anyhow::Result<Pilot> {
        let app = {
            let mut conn = self.db.pool().acquire().await?;
            store::get_app(&mut conn, self.app.id).await?
        };
        Ok(resolve_pilot(
            row,
            Some(&app),
            Some(&self.key),
            &self.credential_policy(),
            timeouts,
        )?)
    }

    /// The credential policy of a worker configured for this world: the default one, with the
    /// Entra simulator's authority and the POP3 simulator's host allowed.
    pub fn credential_policy(&self) -> CredentialPolicy {
        let mut policy = CredentialPolicy::default();
        policy
            .allow_authority(&self.entra.authority())
            .expect("the simulator's authority is an https origin");
        policy.allow_xoauth2_host(&self.pop.tls_addr().ip().to_string());
        policy
    }

    /// One poll of `pilot`, nothing cancelled.
    pub async fn poll(
        &self,
        pilot: &Pilot,
        limits: &IngestLimits,
    ) -> Result<PollReport, PollError> {
        poller::poll_once(
            pilot,
            self.db.db(),
            &self.tokens,
            limits,
            &CancellationToken::new(),
        )
        .await
    }

    /// Every stored message of these pilots with its work item.
    pub async fn stored(&self, pilot_ids: &[i64]) -> anyhow::Result<Vec<StoredMessage>> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(stored_messages(&mut conn, pilot_ids).await?)
    }

    /// Work items in the database.
    pub async fn work_items(&self) -> anyhow::Result<i64> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(work_item_count(&mut conn).await?)
    }

    /// The first bytes of every stored message of these pilots.
    pub async fn heads(&self, pilot_ids: &[i64]) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut conn = self.db.pool().acquire().await?;
        Ok(store::message_heads(&mut conn, pilot_ids).await?)
    }

    /// Stops the simulators and drops the database.
    pub async fn finish(self) -> anyhow::Result<()> {
        self.world.stop(Duration::from_secs(30)).await?;
        self.db.drop_db().await?;
        Ok(())
    }
}

/// Seals `password` for the USER/PASS pilot `p` as it is now (a value sealed for other fields
/// would not open for it).
fn seal_password(p: &mut NewPilot, key: &MasterKey, password: &str) -> anyhow::Result<()> {
    let owner = p.credential_owner().context("a USER/PASS pilot")?;
    if let store::PilotAuth::UserPass { credential, .. } = &mut p.auth {
        *credential = key.seal(&SecretString::from(password.to_owned()), &owner)?;
    }
    Ok(())
}

/// What was delivered, by marker, to check what was stored.
#[derive(Default)]
pub struct Ledger {
    /// marker -> SHA-256 of the delivered bytes.
    delivered: HashMap<String, Vec<u8>>,
    /// The same digests, for lookups by digest.
    digests: HashSet<Vec<u8>>,
}

/// The outcome of [`Ledger::check`].
#[derive(Debug, Default)]
pub struct Tally {
    pub stored_once: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    /// Stored messages whose marker was never delivered through this ledger.
    pub unknown: usize,
}

impl Tally {
    /// Fails with the lists of lost and duplicated markers unless every delivered message
    /// was stored exactly once.
    pub fn assert_exactly_once(&self) -> anyhow::Result<()> {
        if !self.lost.is_empty() || !self.duplicated.is_empty() || self.unknown > 0 {
            bail!(
                "exactly-once violated: lost {:?}, duplicated {:?}, unknown {}",
                self.lost,
                self.duplicated,
                self.unknown
            );
        }
        Ok(())
    }
}

impl Ledger {
    /// Records `raw` as delivered; it must carry a marker no other delivered message has.
    pub fn note(&mut self, raw: &[u8]) -> anyhow::Result<()> {
        let Some(marker) = mailgen::marker(raw) else {
            bail!("a delivered test message has no X-Ccmail-Marker header");
        };
        let digest = Sha256::digest(raw).to_vec();
        self.digests.insert(digest.clone());
        if self.delivered.insert(marker.clone(), digest).is_some() {
            bail!("marker {marker} delivered twice: the test's messages must be unique");
        }
        Ok(())
    }

    /// Delivers `raw` to `mailbox` on `pop`, records it, and returns its UIDL.
    pub fn deliver(
        &mut self,
        pop: &Pop3Sim,
        mailbox: &str,
        raw: Vec<u8>,
    ) -> anyhow::Result<String> {
        self.note(&raw)?;
        Ok(pop.deliver(mailbox, raw))
    }

    /// Number of messages delivered.
    pub fn len(&self) -> usize {
        self.delivered.len()
    }

    /// Counts the stored heads (from [`store::message_heads`]) per delivered marker.
    pub fn check(&self, heads: &[Vec<u8>]) -> Tally {
        let mut counts: HashMap<&str, usize> =
            self.delivered.keys().map(|m| (m.as_str(), 0)).collect();
        let mut tally = Tally::default();
        for head in heads {
            match mailgen::marker(head).and_then(|m| counts.get_mut(m.as_str()).map(|c| *c += 1)) {
                Some(()) => {}
                None => tally.unknown += 1,
            }
        }
        for (marker, count) in counts {
            match count {
                0 => tally.lost.push(marker.to_owned()),
                1 => tally.stored_once += 1,
                _ => tally.duplicated.push(marker.to_owned()),
            }
        }
        tally.lost.sort();
        tally.duplicated.sort();
        tally
    }

    /// Whether `sha256` is the digest of a delivered message (a full download must be
    /// byte-identical: dot-stuffing undone, nothing added or lost).
    pub fn is_delivered_digest(&self, sha256: &[u8]) -> bool {
        self.digests.contains(sha256)
    }
}

/// A message with raw 8-bit (Latin-1) bytes in its headers, as old mailers send, carrying
/// `marker`.
pub fn eight_bit_header_message(to: &str, marker: &str) -> Vec<u8> {
    let mut raw = Vec::new();
    raw.extend_from_slice(b"From: J\xfcrgen Gr\xf6\xdfmann <juergen@beispiel.de>\r\n");
    raw.extend_from_slice(format!("To: {to}\r\n").as_bytes());
    raw.extend_from_slice(b"Subject: Lieferung besch\xe4digt \xb7 R\xfcckruf\r\n");
    raw.extend_from_slice(b"Date: Tue, 04 Jun 2024 09:12:00 +0200\r\n");
    raw.extend_from_slice(format!("Message-ID: <{marker}@beispiel.de>\r\n").as_bytes());
    raw.extend_from_slice(format!("X-Ccmail-Marker: {marker}\r\n").as_bytes());
    raw.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
    raw.extend_from_slice(b"Gr\xfc\xdfe aus K\xf6ln.\r\n.\r\n..\r\n. leading dot\r\n");
    raw
}
