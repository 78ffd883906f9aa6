//! `ccmail-lab bench`: the full pipeline (POP3S → parse → PostgreSQL → DELE) against a raw
//! protocol baseline (login + UIDL + RETR of every message, nothing stored), on the same mail.
//!
//! The simulator runs in a child process (`ccmail-lab sim-serve`), so the mailbox it holds in
//! memory does not count toward the measured process's peak RSS. Peak RSS is read from
//! `/proc/self/status` (VmHWM) and reset between the two runs through `/proc/self/clear_refs`.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::child::{Child, SpawnOptions};
use crate::world::World;
use ccmail::config::Config;
use ccmail::ingest::poller::{self, IngestLimits, Pilot, PilotAuth};
use ccmail::oauth::{
    AppCredentials, AppKey, CachePolicy, TokenCache, TokenSource, TokenSourceOptions,
};
use ccmail::pop3::{Client, ServerSpec, Timeouts, TlsMode};
use ccmail::store;

/// `ccmail-lab bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Messages in the mailbox.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Seed of the generated mail (same mail for both runs).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// What `ccmail-lab sim-serve` prints on its first stdout line.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct SimInfo {
    pub pop3_addr: String,
    pub authority: String,
    pub ca_pem: String,
    pub tenant: String,
    pub client_id: String,
    pub client_secret: String,
    pub mailbox: String,
    pub messages: usize,
    pub octets: u64,
}

const MAILBOX: &str = "bench@contoso.test";
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Serves a filled simulator until standard input closes (the parent exited or is done).
pub async fn serve_sim(messages: usize, seed: u64) -> anyhow::Result<()> {
    let mut world = World::builder()
        .ca_name("ccmail bench CA")
        .tenant("00000000-0000-4000-8000-00000000bead")
        .domain("contoso.test")
        .client_id("bench-client")
        .client_secret(&format!("bench~{:032x}", fastrand::u128(..)))
        .mailboxes([MAILBOX])
        .seed(seed)
        .start()
        .await?;
    let mut octets = 0u64;
    for _ in 0..messages {
        let raw = world.mails.bench_mix(MAILBOX);
        octets += raw.len() as u64;
        world.pop.deliver(MAILBOX, raw);
    }
    let info = SimInfo {
        pop3_addr: world.pop.tls_addr().to_string(),
        authority: world.entra.authority(),
        ca_pem: world.ca.cert_pem().to_owned(),
        tenant: world.tenant.clone(),
        client_id: world.client_id.clone(),
        client_secret: world.client_secret.clone(),
        mailbox: MAILBOX.to_owned(),
        messages,
        octets,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&info)?)?;
    out.flush()?;
    drop(out);
    // Serve until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
    })
    .await?;
    world.stop(Duration::from_secs(30)).await?;
    Ok(())
}

/// The simulator process: the lab's [`Child`] (killed by PID when dropped), its stdin a pipe
/// it serves until closed, so it also ends if the bench is killed.
struct SimChild {
    /// Held for its drop, which kills the simulator.
    _child: Child,
    info: SimInfo,
    /// Holds the simulator's log.
    _dir: tempfile::TempDir,
}

impl SimChild {
    async fn spawn(args: &BenchArgs) -> anyhow::Result<SimChild> {
        let exe = std::env::current_exe().context("locating the ccmail-lab binary")?;
        let dir = tempfile::tempdir()?;
        let child = Child::start(
            &exe,
            &dir.path().join("sim.log"),
            &[
                "sim-serve",
                "--messages",
                &args.messages.to_string(),
                "--seed",
                &args.seed.to_string(),
            ],
            &[],
            &SpawnOptions {
                stdin_pipe: true,
                ..SpawnOptions::default()
            },
        )
        .context("starting the simulator process")?;
        let info = crate::wait::poll(
            "the simulator's address line",
            Duration::from_secs(300),
            || async {
                child.assert_running()?;
                let output = child.output();
                match output.split_once('\n') {
                    None => Ok(None),
                    Some((line, _)) => Ok(Some(
                        serde_json::from_str::<SimInfo>(line)
                            .with_context(|| format!("simulator said {line:?}"))?,
                    )),
                }
            },
            || format!("its output:\n{}", child.output()),
        )
        .await?;
        Ok(SimChild {
            _child: child,
            info,
            _dir: dir,
        })
    }

    fn ca(&self) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        Ok(ccmail::tls::parse_pem_bundle(
            self.info.ca_pem.as_bytes(),
            "simulator CA",
        )?)
    }

    fn app(&self) -> AppCredentials {
        AppCredentials {
            key: AppKey {
                authority: self.info.authority.clone(),
                tenant: self.info.tenant.clone(),
                client_id: self.info.client_id.clone(),
                scope: ccmail::oauth::DEFAULT_SCOPE.to_owned(),
            },
            credential: SecretString::from(self.info.client_secret.clone()).into(),
        }
    }

    fn server(&self) -> anyhow::Result<ServerSpec> {
        let addr: std::net::SocketAddr = self.info.pop3_addr.parse()?;
        Ok(ServerSpec::new(
            addr.ip().to_string(),
            addr.port(),
            TlsMode::Implicit,
            &self.ca()?,
            Timeouts::default(),
        )?)
    }

    fn tokens(&self) -> anyhow::Result<TokenCache> {
        Ok(TokenCache::new(
            Arc::new(TokenSource::new(TokenSourceOptions {
                extra_roots: self.ca()?,
                ..TokenSourceOptions::default()
            })?),
            CachePolicy::default(),
        ))
    }
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub messages: usize,
    pub octets: u64,
    pub elapsed: Duration,
    pub peak_rss_kib: u64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    fn mb_per_s(&self) -> f64 {
        self.octets as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

fn reset_peak_rss() {
    // "5" resets VmHWM to the current RSS (Linux ≥ 4.0); without it the figure is cumulative.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn raw_baseline(sim: &SimChild) -> anyhow::Result<Figures> {
    let tokens = sim.tokens()?;
    let server = sim.server()?;
    let app = sim.app();
    reset_peak_rss();
    let started = Instant::now();
    let token = tokens.token(&app).await?;
    let client = Client::connect(&server).await?;
    let mut session = client
        .auth_xoauth2(&sim.info.mailbox, token.secret())
        .await?;
    let listing = session.uidl_all().await?;
    let mut octets = 0u64;
    for (n, _) in &listing {
        let raw = session.retr(*n, MAX_MESSAGE).await?;
        octets += raw.len() as u64;
    }
    // No DELE: QUIT leaves the maildrop as it was.
    session.quit().await?;
    Ok(Figures {
        messages: listing.len(),
        octets,
        elapsed: started.elapsed(),
        peak_rss_kib: peak_rss_kib(),
    })
}

async fn pipeline(sim: &SimChild, config: &Config, url: &str) -> anyhow::Result<Figures> {
    let pool = store::connect(url, config.database.max_connections).await?;
    store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    let mut app = store::NewApp::new(
        "bench",
        &sim.info.tenant,
        &sim.info.client_id,
        // Never resolved: the bench builds the runtime pilot with the simulator's credentials.
        "env:BENCH_UNUSED_SECRET".to_owned(),
    );
    app.authority = sim.info.authority.clone();
    let app = store::insert_app(&mut conn, &app).await?;
    let mut new_pilot = store::NewPilot::new(
        "bench",
        &sim.info.mailbox,
        store::PilotAuth::XOAuth2 { app_id: app.id },
    );
    let addr: std::net::SocketAddr = sim.info.pop3_addr.parse()?;
    new_pilot.host = addr.ip().to_string();
    new_pilot.port = addr.port();
    let row = store::insert_pilot(&mut conn, &new_pilot).await?;
    drop(conn);
    let pilot = Pilot {
        id: row.id,
        queue: row.queue.clone(),
        mailbox: row.mailbox.clone(),
        server: sim.server()?,
        auth: PilotAuth::XOAuth2 {
            app: sim.app(),
            name: None,
            expires_at: None,
        },
        keep_on_server: false,
        max_message_bytes: MAX_MESSAGE,
        poll_interval: Duration::from_secs(60),
        metrics: ccmail::telemetry::global().pilot_metrics(row.id, &row.queue),
        quirks: Default::default(),
    };
    let limits = IngestLimits {
        max_messages_per_poll: usize::MAX,
        batch_messages: config.worker.batch_messages,
        batch_bytes: config.worker.batch_bytes,
        max_retr_attempts: config.worker.max_retr_attempts,
        commit_concurrency: config.worker.commit_concurrency,
        ..IngestLimits::default()
    };
    let tokens = sim.tokens()?;
    let cancel = CancellationToken::new();
    reset_peak_rss();
    let started = Instant::now();
    let report = poller::poll_once(&pilot, &pool, &tokens, &limits, &cancel).await?;
    let elapsed = started.elapsed();
    let peak = peak_rss_kib();
    if report.stored != sim.info.messages {
        bail!(
            "pipeline stored {} of {} messages (report {report:?})",
            report.stored,
            sim.info.messages
        );
    }
    pool.close().await;
    Ok(Figures {
        messages: report.stored,
        octets: report.stored_octets,
        elapsed,
        peak_rss_kib: peak,
    })
}

/// Runs both measurements and prints them.
pub async fn run(config: &Config, args: &BenchArgs) -> anyhow::Result<()> {
    println!(
        "bench: {} messages (seed {}), simulator in a child process, PostgreSQL at {}",
        args.messages,
        args.seed,
        store::redacted_url(&config.database.url)
    );
    let baseline = {
        let sim = SimChild::spawn(args).await?;
        println!(
            "mailbox: {} messages, {:.1} MB",
            sim.info.messages,
            sim.info.octets as f64 / 1e6
        );
        raw_baseline(&sim).await?
    };
    // A fresh database for each bench run, dropped afterwards.
    let db = crate::testdb::TestDb::on_server(&config.database.url).await?;
    let full = {
        let sim = SimChild::spawn(args).await?;
        pipeline(&sim, config, db.url()).await
    };
    db.drop_db().await?;
    let full = full?;
    let line = |name: &str, f: &Figures| {
        println!(
            "{name:<28} {:>9.1} msg/s {:>8.1} MB/s  peak RSS {:>7.1} MiB  ({} messages in {:.2} s)",
            f.rate(),
            f.mb_per_s(),
            f.peak_rss_kib as f64 / 1024.0,
            f.messages,
            f.elapsed.as_secs_f64()
        );
    };
    line("raw POP3 (login+UIDL+RETR)", &baseline);
    line("ccmail pipeline (stored)", &full);
    println!(
        "ratio pipeline/raw: {:.2} (message rate)",
        full.rate() / baseline.rate()
    );
    Ok(())
}
