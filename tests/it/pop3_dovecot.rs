//! ccmail's own POP3 client against a real Dovecot (a POP3 server no one on this project
//! wrote), with XOAUTH2 tokens issued by the Entra simulator and checked by Dovecot through
//! the simulator's introspection endpoint: logins over implicit TLS and STLS, UIDL, RETR of
//! dot-stuffed and large mail byte for byte against the Maildir file, RFC 1939 deletion rules,
//! and a bad token rejected cleanly and within the command deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ccmail::oauth::{AccessToken, TokenCache};
use ccmail::pop3::{Client, Error, ServerSpec, Session, Stream, Timeouts, TlsMode};
use ccmail_lab::sim::cert::TestCa;
use ccmail_lab::sim::entra::{EntraSim, SimApp};
use secrecy::SecretString;

use crate::support::dovecot::{Dovecot, DovecotOptions};
use crate::support::sim_world::{
    CLIENT_ID, CLIENT_SECRET, DOMAIN, MAILBOX, TENANT, app_credentials, relaxed_timeouts,
    token_source, within,
};

/// The mailbox's USER/PASS password in Dovecot's passwd-file.
const PASSWORD: &str = "dovecot-mailbox-password";
/// Large enough for the 5 MB attachment message.
const RETR_LIMIT: usize = 32 * 1024 * 1024;

/// A running Dovecot whose oauth2 passdb introspects tokens at a running Entra simulator, and
/// the cache that gets tokens from that simulator.
struct DovecotWorld {
    dovecot: Dovecot,
    entra: EntraSim,
    cache: TokenCache,
}

impl DovecotWorld {
    async fn start() -> anyhow::Result<DovecotWorld> {
        let ca = TestCa::new("ccmail it CA").context("creating the test CA")?;
        let entra = EntraSim::start(&ca).await.context("starting EntraSim")?;
        // The app's tenant domain is the mailbox domain: its token opens every mailbox there.
        entra.register_app(SimApp {
            tenant: TENANT.to_owned(),
            tenant_domain: DOMAIN.to_owned(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: CLIENT_SECRET.to_owned(),
            secret_expired: false,
        });
        let dovecot = Dovecot::start(DovecotOptions {
            introspection_url: entra.introspection_url(),
            oauth_domain_format: true,
        })
        .await?;
        dovecot.add_user(MAILBOX, PASSWORD)?;
        let source = token_source(&ca, Default::default())?;
        let cache = TokenCache::new(std::sync::Arc::new(source), Default::default());
        Ok(DovecotWorld {
            dovecot,
            entra,
            cache,
        })
    }

    async fn token(&self) -> anyhow::Result<AccessToken> {
        let app = app_credentials(&self.entra, TENANT, CLIENT_ID, CLIENT_SECRET);
        Ok(within("token", self.cache.token(&app)).await??)
    }

    fn spec(&self, tls: TlsMode, timeouts: Timeouts) -> anyhow::Result<ServerSpec> {
        let addr = match tls {
            TlsMode::Implicit => self.dovecot.pop3s_addr(),
            TlsMode::StartTls | TlsMode::DangerousPlaintext => self.dovecot.pop3_addr(),
        };
        let roots =
            ccmail::tls::parse_pem_bundle(self.dovecot.ca_pem().as_bytes(), "Dovecot's CA")?;
        Ok(ServerSpec::new(
            "127.0.0.1",
            addr.port(),
            tls,
            &roots,
            timeouts,
        )?)
    }

    async fn xoauth2(&self, tls: TlsMode) -> anyhow::Result<Session<Stream>> {
        let token = self.token().await?;
        let client = within(
            "connect",
            Client::connect(&self.spec(tls, relaxed_timeouts())?),
        )
        .await??;
        ensure!(client.is_secure(), "{tls}: connection not encrypted");
        Ok(within(
            "XOAUTH2 login",
            client.auth_xoauth2(MAILBOX, token.secret()),
        )
        .await??)
    }

    async fn user_pass(&self, tls: TlsMode) -> anyhow::Result<Session<Stream>> {
        let client = within(
            "connect",
            Client::connect(&self.spec(tls, relaxed_timeouts())?),
        )
        .await??;
        ensure!(client.is_secure(), "{tls}: connection not encrypted");
        let password = SecretString::from(PASSWORD);
        Ok(within("USER/PASS login", client.auth_user_pass(MAILBOX, &password)).await??)
    }

    /// Runs `body`; on failure attaches Dovecot's log. Then stops Dovecot and the simulator.
    async fn run(
        self,
        body: impl AsyncFnOnce(&DovecotWorld) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let result = body(&self).await;
        let result = result.map_err(|e| e.context(format!("Dovecot log:\n{}", self.dovecot.log())));
        let DovecotWorld { dovecot, entra, .. } = self;
        dovecot.stop();
        entra.shutdown();
        within("stopping the Entra simulator", entra.stopped()).await?;
        result
    }
}

/// Line endings as CRLF whatever they were (Dovecot stores as delivered, sends CRLF).
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 50);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// The Maildir file Dovecot made of the delivery at `delivered` (it moves `new/x` to
/// `cur/x:2,…` once a session has seen it).
fn maildir_file(dovecot: &Dovecot, delivered: &Path) -> anyhow::Result<Vec<u8>> {
    let name = delivered
        .file_name()
        .and_then(|n| n.to_str())
        .context("delivered file has no name")?;
    let files = dovecot.maildir_messages(MAILBOX)?;
    let mut matching = files.into_iter().filter(|(path, _)| {
        path.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == name || n.starts_with(&format!("{name}:")))
    });
    let (_, bytes) = matching
        .next()
        .with_context(|| format!("{name} is not in the Maildir"))?;
    Ok(bytes)
}

/// A customer mail with lines that need dot-stuffing and a 5 MB base64 attachment.
fn big_message_with_dot_lines() -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(0x2dd0_7c0e);
    let attachment: Vec<u8> = (0..5 * 1024 * 1024).map(|_| rng.u8(..)).collect();
    let encoded = B64.encode(&attachment);
    let mut m = String::new();
    m.push_str("From: Customer <customer@example.net>\n");
    m.push_str("To: support@contoso.test\n");
    m.push_str("Subject: Invoice with a leading dot\n");
    m.push_str("Message-ID: <big-1@example.net>\n");
    m.push_str("MIME-Version: 1.0\n");
    m.push_str("Content-Type: multipart/mixed; boundary=\"b1\"\n\n");
    m.push_str("--b1\nContent-Type: text/plain; charset=utf-8\n\n");
    m.push_str("Hello,\n.a line that starts with a dot\n..and one with two\n.\n. \nRegards\n");
    m.push_str("--b1\nContent-Type: application/octet-stream; name=\"invoice.bin\"\n");
    m.push_str("Content-Transfer-Encoding: base64\n");
    m.push_str("Content-Disposition: attachment; filename=\"invoice.bin\"\n\n");
    for line in encoded.as_bytes().chunks(76) {
        m.push_str(std::str::from_utf8(line).unwrap_or_default());
        m.push('\n');
    }
    m.push_str("--b1--\n");
    m.into_bytes()
}

#[tokio::test]
async fn xoauth2_and_user_pass_log_in_over_implicit_tls_and_stls() -> anyhow::Result<()> {
    let world = DovecotWorld::start().await?;
    world
        .run(async |w| {
            w.dovecot.deliver(MAILBOX, b"Subject: one\n\nhello\n")?;
            for tls in [TlsMode::Implicit, TlsMode::StartTls] {
                let before = w.entra.introspections();
                let mut session = w.xoauth2(tls).await?;
                ensure!(within("STAT", session.stat()).await??.0 == 1, "{tls}: STAT");
                within("QUIT", session.quit()).await??;
                ensure!(
                    w.entra.introspections() > before,
                    "{tls}: Dovecot did not introspect the token"
                );

                let mut session = w.user_pass(tls).await?;
                ensure!(within("STAT", session.stat()).await??.0 == 1, "{tls}: STAT");
                within("QUIT", session.quit()).await??;
            }
            // One token served all the XOAUTH2 logins.
            ensure!(
                w.entra.token_requests() == 1,
                "{}",
                w.entra.token_requests()
            );
            Ok(())
        })
        .await
}

#[tokio::test]
async fn uidl_and_retr_match_the_maildir_byte_for_byte() -> anyhow::Result<()> {
    let world = DovecotWorld::start().await?;
    world
        .run(async |w| {
            let small = b"From: a@example.net\nSubject: small\n\n.\n..\nend\n".to_vec();
            let big = big_message_with_dot_lines();
            ensure!(
                big.len() > 5 * 1024 * 1024,
                "the big message is {} octets",
                big.len()
            );
            let delivered = [
                (w.dovecot.deliver(MAILBOX, &small)?, small),
                (w.dovecot.deliver(MAILBOX, &big)?, big),
            ];

            let mut session = w.xoauth2(TlsMode::Implicit).await?;
            let uidl = within("UIDL", session.uidl_all()).await??;
            ensure!(
                uidl.iter().map(|(n, _)| *n).collect::<Vec<_>>() == [1, 2],
                "UIDL {uidl:?}"
            );
            ensure!(uidl[0].1 != uidl[1].1, "UIDs not unique: {uidl:?}");
            for (n, uid) in &uidl {
                // RFC 1939 §7: 1-70 characters in 0x21..=0x7E.
                ensure!(
                    (1..=70).contains(&uid.len())
                        && uid.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                    "UID {uid:?}"
                );
                ensure!(
                    &within("UIDL n", session.uidl(*n)).await?? == uid,
                    "UIDL {n}"
                );
            }

            for (n, (path, raw)) in (1u32..).zip(&delivered) {
                let body = within("RETR", session.retr(n, RETR_LIMIT)).await??;
                let file = maildir_file(&w.dovecot, path)?;
                ensure!(file == *raw, "the Maildir file is not what was delivered");
                ensure!(
                    crlf(&body) == crlf(&file),
                    "RETR {n} ({} octets) differs from the Maildir file ({} octets)",
                    body.len(),
                    file.len()
                );
            }
            within("QUIT", session.quit()).await??;

            // UIDs are stable across sessions.
            let mut session = w.user_pass(TlsMode::StartTls).await?;
            ensure!(
                within("UIDL", session.uidl_all()).await?? == uidl,
                "UIDL changed"
            );
            within("QUIT", session.quit()).await??;
            Ok(())
        })
        .await
}

#[tokio::test]
async fn pipelined_retr_and_dele_match_the_maildir_and_delete_only_at_quit() -> anyhow::Result<()> {
    let world = DovecotWorld::start().await?;
    world
        .run(async |w| {
            let mut delivered = Vec::new();
            for i in 0..40u32 {
                let raw = if i == 7 {
                    big_message_with_dot_lines()
                } else {
                    format!("From: c{i}@example.net\nSubject: n{i}\n\n.dot {i}\n..two\nend\n")
                        .into_bytes()
                };
                delivered.push((w.dovecot.deliver(MAILBOX, &raw)?, raw));
            }
            let mut session = w.xoauth2(TlsMode::Implicit).await?;
            ensure!(session.pipelining(), "Dovecot's CAPA lists PIPELINING");
            let numbers: Vec<u32> = within("UIDL", session.uidl_all())
                .await??
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            ensure!(numbers.len() == delivered.len(), "UIDL {numbers:?}");
            // C: RETR 1 … RETR 16 before any answer; each answer read in turn, the window
            // topped up; DELE of every even message joins the RETRs in flight.
            let mut next = 0;
            for (i, n) in numbers.iter().enumerate() {
                next = usize::max(next, i);
                while next < numbers.len()
                    && session.in_flight() < ccmail::pop3::client::PIPELINE_WINDOW
                {
                    within(
                        "RETR sent ahead",
                        session.send_retr(numbers[next], RETR_LIMIT),
                    )
                    .await??;
                    next += 1;
                }
                let body = within("RETR", session.retr(*n, RETR_LIMIT)).await??;
                let (path, raw) = &delivered[i];
                ensure!(
                    crlf(&body) == crlf(raw),
                    "pipelined RETR {n} ({} octets) differs from delivery {} ({} octets)",
                    body.len(),
                    path.display(),
                    raw.len()
                );
                if n % 2 == 0 {
                    within("DELE", session.dele(*n)).await??;
                }
            }
            ensure!(session.in_flight() > 0, "no DELE was pipelined");
            // Nothing is deleted before QUIT, which reads every DELE's answer first.
            ensure!(
                w.dovecot.maildir_messages(MAILBOX)?.len() == 40,
                "deleted before QUIT"
            );
            within("QUIT", session.quit()).await??;
            ensure!(
                w.dovecot.maildir_messages(MAILBOX)?.len() == 20,
                "QUIT did not delete the 20 marked messages"
            );
            Ok(())
        })
        .await
}

#[tokio::test]
async fn dele_removes_only_at_quit() -> anyhow::Result<()> {
    let world = DovecotWorld::start().await?;
    world
        .run(async |w| {
            let first = b"Subject: first\n\nfirst\n".to_vec();
            let second = b"Subject: second\n\nsecond\n".to_vec();
            w.dovecot.deliver(MAILBOX, &first)?;
            w.dovecot.deliver(MAILBOX, &second)?;

            // DELE, then the session ends without QUIT (RFC 1939 §6: nothing is removed).
            let mut session = w.xoauth2(TlsMode::Implicit).await?;
            within("DELE", session.dele(1)).await??;
            drop(session);
            // Wait until Dovecot has ended that session: its mail process logs the disconnect
            // with the number of messages it removed.
            let ended = within("Dovecot ending the dropped session", async {
                loop {
                    let log = w.dovecot.log();
                    if let Some(line) = log.lines().find(|l| {
                        l.contains(&format!("pop3({MAILBOX})")) && l.contains("Disconnected")
                    }) {
                        return line.to_owned();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await?;
            ensure!(ended.contains("del=0/2"), "Dovecot removed mail: {ended}");
            let mut session = w.xoauth2(TlsMode::Implicit).await?;
            ensure!(
                within("STAT", session.stat()).await??.0 == 2,
                "a message vanished"
            );
            ensure!(
                w.dovecot.maildir_messages(MAILBOX)?.len() == 2,
                "a file vanished"
            );

            // DELE + QUIT removes exactly the marked message.
            within("DELE", session.dele(1)).await??;
            within("QUIT", session.quit()).await??;
            let left = w.dovecot.maildir_messages(MAILBOX)?;
            ensure!(left.len() == 1, "{} files left", left.len());
            ensure!(left[0].1 == second, "the wrong message was removed");
            Ok(())
        })
        .await
}

#[tokio::test]
async fn a_bad_token_is_rejected_cleanly_within_the_command_deadline() -> anyhow::Result<()> {
    /// Dovecot delays a failed authentication by about 2 s; the client must wait for it and
    /// report the rejection, not a timeout.
    const COMMAND: Duration = Duration::from_secs(8);
    let world = DovecotWorld::start().await?;
    world
        .run(async |w| {
            let timeouts = Timeouts {
                command: COMMAND,
                ..relaxed_timeouts()
            };
            let client = within(
                "connect",
                Client::connect(&w.spec(TlsMode::Implicit, timeouts)?),
            )
            .await??;
            let started = Instant::now();
            let bad = SecretString::from("EwB-not-a-token-entra-issued");
            let result = within("login", client.auth_xoauth2(MAILBOX, &bad)).await?;
            let elapsed = started.elapsed();
            let err = match result {
                Ok(_) => bail!("a bad token logged in"),
                Err(e) => e,
            };
            match &err {
                Error::AuthRejected {
                    mechanism, detail, ..
                } => {
                    ensure!(*mechanism == "XOAUTH2");
                    // Dovecot's error challenge, decoded: {"status":"401",…}.
                    let detail = detail.as_deref().context("no decoded challenge")?;
                    let json: serde_json::Value =
                        serde_json::from_str(detail).context("challenge is not JSON")?;
                    ensure!(json["status"] == "401", "challenge {detail}");
                }
                other => bail!("expected AuthRejected, got {other:?}"),
            }
            ensure!(err.is_permanent() && !err.is_transient(), "{err}");
            ensure!(err.to_string().contains("challenge"), "{err}");
            // The three SASL steps each have the command deadline; the whole login took less
            // than one of them.
            ensure!(elapsed < COMMAND, "login failure took {elapsed:?}");
            ensure!(
                w.entra.introspections() >= 1,
                "the token was not introspected"
            );
            Ok(())
        })
        .await
}
