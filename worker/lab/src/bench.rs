//! `ccmail-lab bench`: the full pipeline (POP3S → parse → PostgreSQL → DELE) against two raw
//! protocol baselines on the same mail (login + UIDL + RETR of every message, nothing stored):
//! one RETR at a time, and with up to [`PIPELINE_WINDOW`] RETRs in flight when the server
//! offers PIPELINING (RFC 2449), which is what a fast client does against such a server. The
//! ratio that counts is ccmail's MB/s over the pipelined baseline's.
//!
//! Two servers: the in-repo simulator of Exchange Online (`--server sim`, no PIPELINING, as
//! Exchange Online), run in a child process (`ccmail-lab sim-serve`) so the mailbox it holds
//! in memory does not count toward the measured process's peak RSS; or a private Dovecot
//! (`--server dovecot`, [`crate::dovecot`]), a real server that offers PIPELINING, validating
//! the XOAUTH2 token at the in-process Entra simulator. Each measurement gets a freshly filled
//! mailbox (the same seed, so the same mail).
//!
//! Figures per run: wall time, message and MB rates, peak RSS (`/proc/self/status` VmHWM,
//! reset between runs through `/proc/self/clear_refs`), this process's CPU time
//! (`/proc/self/stat` utime + stime) and, for the pipeline, the CPU time of the PostgreSQL
//! backends serving the bench's database (their `/proc/<pid>/stat`, pids from
//! `pg_stat_activity`), each also per MB. The server's own CPU is not counted.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::child::{Child, SpawnOptions};
use crate::dovecot::{Dovecot, DovecotOptions};
use crate::world::World;
use ccmail::config::Config;
use ccmail::ingest::poller::{self, IngestLimits, Pilot, PilotAuth};
use ccmail::oauth::{
    AppCredentials, AppKey, CachePolicy, TokenCache, TokenSource, TokenSourceOptions,
};
use ccmail::pop3::client::PIPELINE_WINDOW;
use ccmail::pop3::{Client, ServerSpec, Timeouts, TlsMode};
use ccmail::store;

/// `ccmail-lab bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Messages in the mailbox.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Seed of the generated mail (same mail for every measurement).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The POP3 server: the in-repo simulator of Exchange Online, or a private Dovecot
    /// (needs the Debian packages dovecot-core and dovecot-pop3d).
    #[arg(long, value_enum, default_value_t = BenchServer::Sim)]
    pub server: BenchServer,
    /// Rounds of the three measurements; the summary gives each figure's median.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// ccmail leaves the mail on the server (no DELE), like the raw baselines.
    #[arg(long)]
    pub keep_on_server: bool,
    /// Measure only the ccmail pipeline, once (for a profiler attached to this process and
    /// to the PostgreSQL backends, whose pids it prints).
    #[arg(long)]
    pub pipeline_only: bool,
}

/// Which POP3 server the bench runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchServer {
    Sim,
    Dovecot,
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
}

/// A filled mailbox on one server, and how to log into it.
struct Source {
    /// Keeps the simulator process or the Dovecot instance (and its Entra simulator) alive.
    _server: Box<dyn std::any::Any + Send>,
    host: String,
    port: u16,
    ca_pem: String,
    authority: String,
    tenant: String,
    client_id: String,
    client_secret: String,
    mailbox: String,
    messages: usize,
    octets: u64,
}

impl Source {
    async fn start(args: &BenchArgs) -> anyhow::Result<Source> {
        match args.server {
            BenchServer::Sim => {
                let sim = SimChild::spawn(args).await?;
                let addr: std::net::SocketAddr = sim.info.pop3_addr.parse()?;
                let info = &sim.info;
                Ok(Source {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    ca_pem: info.ca_pem.clone(),
                    authority: info.authority.clone(),
                    tenant: info.tenant.clone(),
                    client_id: info.client_id.clone(),
                    client_secret: info.client_secret.clone(),
                    mailbox: info.mailbox.clone(),
                    messages: info.messages,
                    octets: info.octets,
                    _server: Box::new(sim),
                })
            }
            BenchServer::Dovecot => Source::dovecot(args).await,
        }
    }

    /// A private Dovecot whose `oauth2` passdb asks the in-process Entra simulator about each
    /// token (`username_format = %d`: the app's token opens every mailbox of its domain).
    async fn dovecot(args: &BenchArgs) -> anyhow::Result<Source> {
        let mut world = World::builder()
            .ca_name("ccmail bench CA")
            .tenant("00000000-0000-4000-8000-00000000bead")
            .domain("contoso.test")
            .client_id("bench-client")
            .client_secret(&format!("bench~{:032x}", fastrand::u128(..)))
            .mailboxes([MAILBOX])
            .seed(args.seed)
            .start()
            .await?;
        let dovecot = Dovecot::start(DovecotOptions {
            introspection_url: world.entra.introspection_url(),
            oauth_domain_format: true,
        })
        .await?;
        dovecot.add_user(MAILBOX, "unused-the-token-opens-it")?;
        let mut octets = 0u64;
        for _ in 0..args.messages {
            let raw = world.mails.bench_mix(MAILBOX);
            octets += raw.len() as u64;
            dovecot.deliver(MAILBOX, &raw)?;
        }
        let addr = dovecot.pop3s_addr();
        // The world's own CA signed the Entra simulator; Dovecot has a CA of its own.
        let mut ca_pem = dovecot.ca_pem().to_owned();
        ca_pem.push_str(world.ca.cert_pem());
        Ok(Source {
            host: addr.ip().to_string(),
            port: addr.port(),
            ca_pem,
            authority: world.entra.authority(),
            tenant: world.tenant.clone(),
            client_id: world.client_id.clone(),
            client_secret: world.client_secret.clone(),
            mailbox: MAILBOX.to_owned(),
            messages: args.messages,
            octets,
            _server: Box::new((dovecot, world)),
        })
    }

    fn ca(&self) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
        Ok(ccmail::tls::parse_pem_bundle(
            self.ca_pem.as_bytes(),
            "bench CA",
        )?)
    }

    fn app(&self) -> AppCredentials {
        AppCredentials {
            key: AppKey {
                authority: self.authority.clone(),
                tenant: self.tenant.clone(),
                client_id: self.client_id.clone(),
                scope: ccmail::oauth::DEFAULT_SCOPE.to_owned(),
            },
            credential: SecretString::from(self.client_secret.clone()).into(),
        }
    }

    fn server(&self) -> anyhow::Result<ServerSpec> {
        Ok(ServerSpec::new(
            self.host.clone(),
            self.port,
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

/// One measurement's figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub messages: usize,
    pub octets: u64,
    pub elapsed: Duration,
    pub peak_rss_kib: u64,
    /// This process's CPU time (user + system) during the measurement.
    pub cpu: Duration,
    /// The CPU time of the PostgreSQL backends serving the bench's database, when readable.
    pub pg_cpu: Option<Duration>,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
    fn mb(&self) -> f64 {
        self.octets as f64 / 1e6
    }
    fn mb_per_s(&self) -> f64 {
        self.mb() / self.elapsed.as_secs_f64()
    }
    fn cpu_ms_per_mb(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e3 / self.mb()
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

/// utime + stime of a process from `/proc/<pid>/stat` (fields 14 and 15, after the command
/// name in parentheses, which may itself hold spaces), in the kernel's fixed USER_HZ of 100.
fn process_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn own_cpu() -> Duration {
    process_cpu("self").unwrap_or_default()
}

/// CPU time of every client backend connected to the database behind `pool`, by pid.
async fn backend_cpu(pool: &sqlx::PgPool) -> anyhow::Result<Vec<(i32, Option<Duration>)>> {
    let pids: Vec<i32> = sqlx::query_scalar(
        "select pid from pg_stat_activity where datname = current_database() and backend_type = 'client backend'",
    )
    .fetch_all(pool)
    .await
    .context("listing the bench database's PostgreSQL backends")?;
    Ok(pids
        .into_iter()
        .map(|pid| (pid, process_cpu(&pid.to_string())))
        .collect())
}

/// CPU the backends spent between two snapshots; `None` if no backend's `/proc` was readable
/// (PostgreSQL on another machine or in another PID namespace).
fn backend_delta(
    before: &[(i32, Option<Duration>)],
    after: &[(i32, Option<Duration>)],
) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut readable = false;
    for (pid, cpu) in after {
        let Some(cpu) = cpu else { continue };
        readable = true;
        let earlier = before
            .iter()
            .find(|(p, _)| p == pid)
            .and_then(|(_, c)| *c)
            .unwrap_or_default();
        total += cpu.saturating_sub(earlier);
    }
    readable.then_some(total)
}

/// Login, UIDL, then RETR of every message, nothing stored and nothing deleted. `pipelined`:
/// up to [`PIPELINE_WINDOW`] RETRs in flight when the server offers PIPELINING.
async fn raw_baseline(src: &Source, pipelined: bool) -> anyhow::Result<Figures> {
    let tokens = src.tokens()?;
    let server = src.server()?;
    let app = src.app();
    reset_peak_rss();
    let cpu = own_cpu();
    let started = Instant::now();
    let token = tokens.token(&app).await?;
    let client = Client::connect(&server).await?;
    let mut session = client.auth_xoauth2(&src.mailbox, token.secret()).await?;
    session.set_pipelining(pipelined);
    let listing = session.uidl_all().await?;
    let numbers: Vec<u32> = listing.iter().map(|(n, _)| *n).collect();
    let mut octets = 0u64;
    let mut next = 0;
    for (i, n) in numbers.iter().enumerate() {
        if session.pipelining() {
            next = next.max(i);
            while next < numbers.len() && session.in_flight() < PIPELINE_WINDOW {
                session.send_retr(numbers[next], MAX_MESSAGE).await?;
                next += 1;
            }
        }
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
        cpu: own_cpu().saturating_sub(cpu),
        pg_cpu: None,
    })
}

async fn pipeline(
    src: &Source,
    config: &Config,
    url: &str,
    keep_on_server: bool,
) -> anyhow::Result<Figures> {
    let pool = store::connect(url, config.database.max_connections).await?;
    store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    let mut app = store::NewApp::new(
        "bench",
        &src.tenant,
        &src.client_id,
        // Never resolved: the bench builds the runtime pilot with the source's credentials.
        "env:BENCH_UNUSED_SECRET".to_owned(),
    );
    app.authority = src.authority.clone();
    let app = store::insert_app(&mut conn, &app).await?;
    let mut new_pilot = store::NewPilot::new(
        "bench",
        &src.mailbox,
        store::PilotAuth::XOAuth2 { app_id: app.id },
    );
    new_pilot.host = src.host.clone();
    new_pilot.port = src.port;
    let row = store::insert_pilot(&mut conn, &new_pilot).await?;
    drop(conn);
    let pilot = Pilot {
        id: row.id,
        queue: row.queue.clone(),
        mailbox: row.mailbox.clone(),
        server: src.server()?,
        auth: PilotAuth::XOAuth2 {
            app: src.app(),
            name: None,
            expires_at: None,
        },
        keep_on_server,
        max_message_bytes: MAX_MESSAGE,
        poll_interval: Duration::from_secs(60),
        metrics: ccmail::telemetry::global().pilot_metrics(row.id, &row.queue),
        quirks: Default::default(),
        lease: None,
    };
    let limits = IngestLimits {
        max_messages_per_poll: usize::MAX,
        batch_messages: config.worker.batch_messages,
        batch_bytes: config.worker.batch_bytes,
        max_retr_attempts: config.worker.max_retr_attempts,
        commit_concurrency: config.worker.commit_concurrency,
        ..IngestLimits::default()
    };
    let tokens = src.tokens()?;
    let cancel = CancellationToken::new();
    // A pool of our own for the backends' pids, so listing them does not disturb the one
    // measured (its connections are the ones whose CPU is counted).
    let watch = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .context("connecting to the bench database")?;
    let pg_before = backend_cpu(&watch).await?;
    reset_peak_rss();
    let cpu = own_cpu();
    let started = Instant::now();
    let report = poller::poll_once(&pilot, &pool, &tokens, &limits, &cancel).await?;
    let elapsed = started.elapsed();
    let cpu = own_cpu().saturating_sub(cpu);
    let peak = peak_rss_kib();
    let pg_after = backend_cpu(&watch).await?;
    println!(
        "PostgreSQL backends of this run: pids {}",
        pg_after
            .iter()
            .map(|(pid, _)| pid.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    if report.stored != src.messages {
        bail!(
            "pipeline stored {} of {} messages (report {report:?})",
            report.stored,
            src.messages
        );
    }
    pool.close().await;
    watch.close().await;
    Ok(Figures {
        messages: report.stored,
        octets: report.stored_octets,
        elapsed,
        peak_rss_kib: peak,
        cpu,
        pg_cpu: backend_delta(&pg_before, &pg_after),
    })
}

/// One round: both baselines and the pipeline, each on a freshly filled mailbox.
struct Round {
    serial: Figures,
    pipelined: Figures,
    full: Figures,
    server_pipelines: bool,
}

async fn round(config: &Config, args: &BenchArgs, first: bool) -> anyhow::Result<Round> {
    let (serial, offered) = {
        let src = Source::start(args).await?;
        if first {
            println!(
                "mailbox: {} messages, {:.1} MB",
                src.messages,
                src.octets as f64 / 1e6
            );
        }
        let offered = {
            let client = Client::connect(&src.server()?).await?;
            client.capabilities().is_some_and(|c| c.has("PIPELINING"))
        };
        (raw_baseline(&src, false).await?, offered)
    };
    let pipelined = {
        let src = Source::start(args).await?;
        raw_baseline(&src, true).await?
    };
    // A fresh database for each pipeline run, dropped afterwards.
    let db = crate::testdb::TestDb::on_server(&config.database.url).await?;
    let full = {
        let src = Source::start(args).await?;
        pipeline(&src, config, db.url(), args.keep_on_server).await
    };
    db.drop_db().await?;
    Ok(Round {
        serial,
        pipelined,
        full: full?,
        server_pipelines: offered,
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_figures(name: &str, f: &Figures) {
    let pg = f.pg_cpu.map_or_else(
        || "-".to_owned(),
        |pg| format!("{:.0}", f.cpu_ms_per_mb(pg)),
    );
    println!(
        "{name:<32} {:>7.1} msg/s {:>6.1} MB/s  RSS {:>6.1} MiB  CPU ms/MB: own {:>5.0} PostgreSQL {:>5}  ({} msgs in {:.2} s)",
        f.rate(),
        f.mb_per_s(),
        f.peak_rss_kib as f64 / 1024.0,
        f.cpu_ms_per_mb(f.cpu),
        pg,
        f.messages,
        f.elapsed.as_secs_f64()
    );
}

/// Runs the rounds and prints every measurement, then the medians.
pub async fn run(config: &Config, args: &BenchArgs) -> anyhow::Result<()> {
    let server = match args.server {
        BenchServer::Sim => "the Exchange Online simulator in a child process",
        BenchServer::Dovecot => "a private Dovecot",
    };
    println!(
        "bench: {} messages (seed {}), {} round(s) against {server}, PostgreSQL at {}{}",
        args.messages,
        args.seed,
        args.runs,
        store::redacted_url(&config.database.url),
        if args.keep_on_server {
            ", ccmail keeps mail on the server"
        } else {
            ", ccmail deletes after storing"
        }
    );
    if args.pipeline_only {
        let db = crate::testdb::TestDb::on_server(&config.database.url).await?;
        let full = {
            let src = Source::start(args).await?;
            println!("bench process pid {}; measuring now", std::process::id());
            pipeline(&src, config, db.url(), args.keep_on_server).await
        };
        db.drop_db().await?;
        print_figures("ccmail pipeline (stored)", &full?);
        return Ok(());
    }
    let mut rounds = Vec::new();
    for i in 0..args.runs.max(1) {
        let r = round(config, args, i == 0).await?;
        println!("round {}:", i + 1);
        print_figures("  raw POP3, one RETR at a time", &r.serial);
        print_figures(
            if r.server_pipelines {
                "  raw POP3, pipelined RETRs"
            } else {
                "  raw POP3 (no PIPELINING offered)"
            },
            &r.pipelined,
        );
        print_figures("  ccmail pipeline (stored)", &r.full);
        println!(
            "  ratio ccmail/pipelined raw: {:.2} (MB/s), ccmail/one-at-a-time raw: {:.2}",
            r.full.mb_per_s() / r.pipelined.mb_per_s(),
            r.full.mb_per_s() / r.serial.mb_per_s()
        );
        rounds.push(r);
    }
    let med = |f: &dyn Fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    println!(
        "median of {}: raw one-at-a-time {:.1} MB/s, raw pipelined {:.1} MB/s, ccmail {:.1} MB/s; \
         ratio to pipelined {:.2}; ccmail CPU {:.0} ms/MB, PostgreSQL backends {} ms/MB; peak RSS {:.1} MiB",
        rounds.len(),
        med(&|r| r.serial.mb_per_s()),
        med(&|r| r.pipelined.mb_per_s()),
        med(&|r| r.full.mb_per_s()),
        med(&|r| r.full.mb_per_s() / r.pipelined.mb_per_s()),
        med(&|r| r.full.cpu_ms_per_mb(r.full.cpu)),
        if rounds.iter().all(|r| r.full.pg_cpu.is_some()) {
            format!(
                "{:.0}",
                med(&|r| r.full.cpu_ms_per_mb(r.full.pg_cpu.unwrap_or_default()))
            )
        } else {
            "-".to_owned()
        },
        med(&|r| r.full.peak_rss_kib as f64 / 1024.0),
    );
    Ok(())
}
