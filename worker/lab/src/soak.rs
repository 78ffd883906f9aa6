//! `ccmail-lab soak`: the real worker as a child process, killed with SIGKILL at random moments
//! while a generator keeps delivering mail; at the end every delivered message must be stored
//! exactly once.
//!
//! The simulators (Exchange-like POP3S, Entra-like token endpoint) live in *this* process, so
//! they survive every kill: only the worker dies, exactly as when a host or container is
//! killed. Each delivered message carries a unique `X-Ccmail-Marker`; the final check counts the
//! markers in the database.
//!
//! The fault schedule is drawn from a seeded RNG, so a failing seed can be replayed. A kill is
//! only sent after the worker has made progress since its last start (or there is nothing left
//! to do), so K kills are K interrupted runs rather than K kills of a process still starting.
//! A third of the kills wait a random delay; the others wait until the server has just
//! received a chosen command (`AUTH`, `STAT`, `UIDL`, `RETR`, `DELE`, `QUIT`), which puts kills into
//! the narrow windows around commit, DELE and QUIT on purpose.
//!
//! A negative control ([`NegativeControl`]) makes the mail source itself lose or duplicate
//! messages behind the worker's back, to show that the final check detects both.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use nix::sys::signal::Signal;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::child::{Child, SpawnOptions};
use crate::sim::mailgen::{self, MailGen};
use crate::sim::pop3::Pop3Sim;
use crate::testdb::TestDb;
use crate::world::World;
use ccmail::secrets::MasterKey;
use ccmail::store;

/// The simulated tenant's domain.
const DOMAIN: &str = "contoso.test";
/// How often conditions (progress, a command seen, a drained mailbox) are checked.
const SOAK_CHECK_EVERY: Duration = Duration::from_millis(5);
/// The worker's shutdown grace in the soak settings.
const GRACE: Duration = Duration::from_secs(10);
/// How long a targeted kill waits for its command (polls start every second).
const TARGET_WAIT: Duration = Duration::from_secs(3);
/// Commands a targeted kill waits for (the server has just received one of them).
const TARGETS: [&str; 6] = ["AUTH", "STAT", "UIDL", "RETR", "DELE", "QUIT"];

/// A mail source that misbehaves on purpose, to prove the final check catches it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NegativeControl {
    /// Every n-th generated message is recorded as delivered but never reaches the mailbox.
    pub drop_every: Option<usize>,
    /// Every n-th generated message reaches the mailbox twice (two UIDLs, same bytes).
    pub duplicate_every: Option<usize>,
}

impl NegativeControl {
    fn applies(every: Option<usize>, index: usize) -> bool {
        every.is_some_and(|n| n > 0 && (index + 1).is_multiple_of(n))
    }

    /// Messages out of `messages` this control drops (dropping wins over duplicating).
    pub fn dropped(&self, messages: usize) -> usize {
        (0..messages)
            .filter(|i| Self::applies(self.drop_every, *i))
            .count()
    }

    /// Messages out of `messages` this control duplicates.
    pub fn duplicated(&self, messages: usize) -> usize {
        (0..messages)
            .filter(|i| {
                !Self::applies(self.drop_every, *i) && Self::applies(self.duplicate_every, *i)
            })
            .count()
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The `ccmail` binary that runs as the worker (`ccmail run`).
    pub worker_exe: PathBuf,
    /// Any database URL of the PostgreSQL server; a fresh `ccmail_t_…` database is created on
    /// it for the soak and dropped afterwards.
    pub database_url: String,
    /// Messages the generator delivers.
    pub messages: usize,
    /// SIGKILLs (each followed by a restart).
    pub kills: usize,
    /// Seed of the mail, the delivery pace and the kill schedule.
    pub seed: u64,
    /// The generator delivers 1..=`burst` messages every `delivery_interval`.
    pub burst: usize,
    pub delivery_interval: Duration,
    /// Upper bound of a random kill delay (after progress was seen).
    pub max_kill_delay: Duration,
    /// How long one wait (progress, a targeted command, the final drain) may take.
    pub deadline: Duration,
    /// The worker's log filter (`info`, `trace`, …).
    pub log_level: String,
    /// Where the worker's logs go (`worker-N.log` per run); a temporary directory if `None`.
    pub log_dir: Option<PathBuf>,
    /// Misbehaviour injected into the mail source (none by default).
    pub control: NegativeControl,
}

impl SoakOptions {
    /// The short form that runs in CI: 300 messages, 5 kills.
    pub fn short(worker_exe: PathBuf, database_url: String) -> SoakOptions {
        SoakOptions {
            worker_exe,
            database_url,
            messages: 300,
            kills: 5,
            seed: 0x50A4,
            burst: 8,
            delivery_interval: Duration::from_millis(100),
            max_kill_delay: Duration::from_millis(400),
            deadline: Duration::from_secs(60),
            log_level: "info".to_owned(),
            log_dir: None,
            control: NegativeControl::default(),
        }
    }
}

/// What a soak found.
#[derive(Debug, Clone, Default)]
pub struct SoakReport {
    /// Messages the generator recorded as delivered (distinct markers).
    pub delivered: usize,
    /// Messages stored for the soak's pilot (rows, duplicates included).
    pub stored: usize,
    /// Delivered markers stored exactly once.
    pub stored_once: usize,
    /// Delivered markers never stored.
    pub lost: usize,
    /// Delivered markers stored more than once.
    pub duplicated: usize,
    /// Stored messages whose marker was never delivered.
    pub unknown: usize,
    /// SIGKILLs sent.
    pub kills: usize,
    /// Where each kill landed: `at RETR` (a targeted kill sent as soon as the server had
    /// received that command) or `after QUIT` (a random kill; the last command the server had
    /// received, `none` if the worker had not yet logged in), with counts.
    pub kill_points: BTreeMap<String, usize>,
    /// Worker processes started.
    pub worker_runs: usize,
    /// POP3 sessions the server accepted.
    pub sessions: u64,
    /// Token requests the token endpoint answered.
    pub token_requests: u64,
    /// Octets of worker log written.
    pub log_bytes: u64,
    /// Secrets found in the worker's logs (what, and which log); must stay empty.
    pub leaks: Vec<String>,
    /// Wall-clock duration of the soak.
    pub elapsed: Duration,
}

impl SoakReport {
    /// The one-line summary: `soak: delivered=N stored=N lost=0 duplicated=0 kills=K seconds=S`.
    pub fn summary(&self) -> String {
        format!(
            "soak: delivered={} stored={} lost={} duplicated={} kills={} seconds={:.1}",
            self.delivered,
            self.stored,
            self.lost,
            self.duplicated,
            self.kills,
            self.elapsed.as_secs_f64()
        )
    }

    /// Where the kills landed, e.g. `kill points: at DELE=2 after QUIT=1 …`.
    pub fn kill_points_line(&self) -> String {
        let points: Vec<String> = self
            .kill_points
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!(
            "kill points: {}; worker runs={} sessions={} token requests={}",
            points.join(" "),
            self.worker_runs,
            self.sessions,
            self.token_requests
        )
    }

    /// Fails unless every delivered message was stored exactly once and no secret was logged.
    pub fn check(&self) -> anyhow::Result<()> {
        ensure!(
            self.lost == 0 && self.duplicated == 0 && self.unknown == 0,
            "exactly-once violated: {} lost, {} duplicated, {} unknown ({})",
            self.lost,
            self.duplicated,
            self.unknown,
            self.summary()
        );
        ensure!(
            self.leaks.is_empty(),
            "secrets in the worker's logs: {}",
            self.leaks.join("; ")
        );
        Ok(())
    }
}

/// Runs a soak. The database it creates is dropped at the end, and every worker process it
/// starts is gone when this returns, whatever the outcome.
pub async fn run(options: &SoakOptions) -> anyhow::Result<SoakReport> {
    ccmail::tls::install_crypto_provider();
    let db = TestDb::on_server(&options.database_url)
        .await
        .context("creating the soak database")?;
    let lab = World::builder()
        .ca_name("ccmail soak CA")
        .tenant("0c5d1e2f-3a4b-4c5d-8e6f-7a8b9c0d1e2f")
        .domain(DOMAIN)
        .client_id(&format!("soak-app-{:08x}", fastrand::u32(..)))
        .client_secret(&format!("soak~secret~{:032x}", fastrand::u128(..)))
        .start()
        .await?;
    let (pop, entra) = (&lab.pop, &lab.entra);
    let temp = tempfile::Builder::new().prefix("ccmail-soak-").tempdir()?;
    let log_dir = options
        .log_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    let world = Setup::set_up(&db, &lab, temp.path(), &log_dir).await?;
    world.write_config(&options.log_level)?;
    let result = drive(options, &world, &db, pop).await;

    pop.shutdown();
    entra.shutdown();
    let mut report = result?;
    report.sessions = pop.sessions();
    report.token_requests = entra.token_requests();
    let (log_bytes, leaks) = scan_logs(&log_dir, &world, &entra.issued_tokens())?;
    report.log_bytes = log_bytes;
    report.leaks = leaks;
    db.drop_db().await?;
    Ok(report)
}

/// The registered app, pilot and worker settings of one soak (over the lab's [`World`]).
struct Setup {
    mailbox: String,
    pilot_id: i64,
    config: PathBuf,
    /// The CA of both simulators (the pilot's bundle and the token endpoint's extra root).
    ca_path: PathBuf,
    key: SecretString,
    client_secret: String,
    log_dir: PathBuf,
    /// The Entra simulator's authority, allowed in the worker's settings.
    authority: String,
}

impl Setup {
    async fn set_up(db: &TestDb, lab: &World, dir: &Path, log_dir: &Path) -> anyhow::Result<Setup> {
        let key = MasterKey::generate();
        let ca_path = lab.ca_path();
        let mut conn = db.pool().acquire().await?;
        let app = lab.insert_app(&mut conn, "soak-app", &key).await?;
        let mailbox = format!("soak@{DOMAIN}");
        lab.pop.add_mailbox(&mailbox);
        let pilot = lab.new_pilot("soak", &mailbox, app.id);
        let pilot = store::insert_pilot(&mut conn, &pilot).await?;
        let client_secret = lab.client_secret.clone();
        let entra = &lab.entra;

        Ok(Setup {
            config: dir.join("ccmail-soak.toml"),
            ca_path,
            mailbox,
            pilot_id: pilot.id,
            key: key.to_base64(),
            client_secret,
            log_dir: log_dir.to_path_buf(),
            authority: entra.authority(),
        })
    }

    fn write_config(&self, log_level: &str) -> anyhow::Result<()> {
        // Small batches so one poll holds many commit → DELE steps for the kills to hit;
        // short backoffs so a restarted worker gets going at once.
        let text = format!(
            "[worker]\nreload_interval_secs = 1\nlease_ttl_secs = 3\nshutdown_grace_secs = {}\n\
             initial_backoff_secs = 1\nmax_backoff_secs = 2\npoll_jitter = 0.0\n\
             batch_messages = 5\n\n\
             [oauth]\nextra_ca_file = {:?}\nallowed_authorities = [{:?}]\n\n\
             [pop3]\nallowed_xoauth2_hosts = [\"127.0.0.1\"]\n\n\
             [log]\nformat = \"text\"\nlevel = {:?}\n",
            GRACE.as_secs(),
            self.ca_path.display().to_string(),
            self.authority,
            log_level
        );
        std::fs::write(&self.config, text)
            .with_context(|| format!("writing {}", self.config.display()))
    }
}

/// Starts run number `run` of the worker (the lab's [`Child`]: dropping it kills the process,
/// SIGKILL to its PID), its log in `log_dir/worker-<run>.log`.
fn start_worker(
    options: &SoakOptions,
    world: &Setup,
    run: usize,
    db_url: &str,
) -> anyhow::Result<Child> {
    let log = world.log_dir.join(format!("worker-{run}.log"));
    let config = world.config.display().to_string();
    Child::start(
        &options.worker_exe,
        &log,
        &["--config", &config, "run"],
        &[
            ("DATABASE_URL", db_url),
            (ccmail::config::MASTER_KEY_ENV, world.key.expose_secret()),
            // Any free port: another worker on this machine may hold the default one.
            ("CCMAIL_HTTP_LISTEN", "127.0.0.1:0"),
        ],
        // Only what the soak decides: no CCMAIL_* or RUST_LOG of the caller's shell.
        &SpawnOptions {
            clear_env: true,
            ..SpawnOptions::default()
        },
    )
}

/// Sends `signal` to the worker and waits for it to exit, at most `deadline`.
async fn signal_and_wait(
    worker: &mut Child,
    signal: Signal,
    deadline: Duration,
) -> anyhow::Result<ExitStatus> {
    worker
        .signal(signal)
        .with_context(|| format!("sending {signal} to the worker"))?;
    worker.wait(deadline).await
}

async fn drive(
    options: &SoakOptions,
    world: &Setup,
    db: &TestDb,
    pop: &Pop3Sim,
) -> anyhow::Result<SoakReport> {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(options.seed ^ 0x6b11_5eed);
    let stop_generator = CancellationToken::new();
    let generator = tokio::spawn(generate(
        options.clone(),
        pop.clone(),
        world.mailbox.clone(),
        stop_generator.clone(),
    ));
    // Stop the generator on every way out of this function.
    let _stop = stop_generator.clone().drop_guard();

    let mut report = SoakReport::default();
    let mut runs = 0;
    let mut worker = start_worker(options, world, runs, db.url())?;
    runs += 1;
    for _ in 0..options.kills {
        let stored_at_start = stored_count(db).await?;
        // Progress since this worker started, or nothing left to do.
        let generator = &generator;
        wait_while_running(
            &worker,
            options.deadline,
            "progress after a restart",
            || async move {
                let stored = stored_count(db).await?;
                Ok(stored > stored_at_start
                    || (generator.is_finished() && pop.messages(&world.mailbox).is_empty()))
            },
        )
        .await?;
        // A third of the kills at a random moment, the rest aimed at a protocol step.
        let point = if rng.u32(0..3) == 0 {
            let delay = options.max_kill_delay.mul_f64(rng.f64());
            tokio::time::sleep(delay).await;
            format!("after {}", last_command(pop))
        } else {
            let target = TARGETS[rng.usize(..TARGETS.len())];
            pop.clear_commands();
            let seen = wait_for_command(&worker, pop, target, TARGET_WAIT).await?;
            match seen {
                Some(command) => format!("at {command}"),
                // Nothing of the kind came (e.g. no RETR: nothing new was waiting).
                None => format!("after {} (no {target} came)", last_command(pop)),
            }
        };
        signal_and_wait(&mut worker, Signal::SIGKILL, Duration::from_secs(10)).await?;
        *report.kill_points.entry(point).or_default() += 1;
        report.kills += 1;
        pop.clear_commands();
        worker = start_worker(options, world, runs, db.url())?;
        runs += 1;
    }

    let delivered = match generator.await {
        Ok(result) => result?,
        Err(e) => bail!("the mail generator task failed: {e}"),
    };
    wait_while_running(
        &worker,
        options.deadline,
        "the mailbox to drain",
        || async move { Ok(pop.messages(&world.mailbox).is_empty()) },
    )
    .await?;
    // A worker restarted a moment ago is up before it is told to stop (its SIGTERM handler
    // is registered by then), so the exit status says how it shuts down, not how it starts.
    worker.listen_addr(options.deadline).await?;
    let status =
        signal_and_wait(&mut worker, Signal::SIGTERM, GRACE + Duration::from_secs(5)).await?;
    ensure!(
        status.success(),
        "the worker exited with {status} after SIGTERM; {}",
        worker.log_tail()
    );
    report.worker_runs = runs;
    report.elapsed = started.elapsed();
    tally(db, world.pilot_id, &delivered, &mut report).await?;
    Ok(report)
}

/// Delivers the soak's mail at its pace; returns every marker recorded as delivered.
async fn generate(
    options: SoakOptions,
    pop: Pop3Sim,
    mailbox: String,
    stop: CancellationToken,
) -> anyhow::Result<Vec<String>> {
    let mut mails = MailGen::new(options.seed);
    let mut rng = fastrand::Rng::with_seed(options.seed.wrapping_add(1));
    let mut markers = Vec::with_capacity(options.messages);
    let mut index = 0;
    while index < options.messages {
        let burst = rng.usize(1..=options.burst.max(1));
        for _ in 0..burst.min(options.messages - index) {
            // Mostly the contact-center mix, sometimes a message with broken MIME.
            let raw = if index % 25 == 24 {
                mails.malformed(&mailbox)
            } else {
                mails.mixed(&mailbox)
            };
            let marker = mailgen::marker(&raw).context("a generated message without a marker")?;
            markers.push(marker);
            let control = options.control;
            if NegativeControl::applies(control.drop_every, index) {
                // Negative control: recorded as delivered, never reaches the mailbox.
            } else if NegativeControl::applies(control.duplicate_every, index) {
                pop.deliver(&mailbox, raw.clone());
                pop.deliver(&mailbox, raw);
            } else {
                pop.deliver(&mailbox, raw);
            }
            index += 1;
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(options.delivery_interval) => {}
        }
    }
    Ok(markers)
}

/// Waits until `done` holds while the worker keeps running (the lab's one wait, checking
/// every [`SOAK_CHECK_EVERY`]).
async fn wait_while_running<F, Fut>(
    worker: &Child,
    deadline: Duration,
    what: &str,
    mut done: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    crate::wait::poll_every(
        what,
        deadline,
        SOAK_CHECK_EVERY,
        || {
            let fut = done();
            async move {
                if fut.await? {
                    return Ok(Some(()));
                }
                worker.assert_running()?;
                Ok(None)
            }
        },
        || worker.log_tail(),
    )
    .await
}

/// Waits until the server receives a command named `target`; `None` if it does not within
/// `deadline` (e.g. no RETR because nothing is waiting), which still makes a kill point.
async fn wait_for_command(
    worker: &Child,
    pop: &Pop3Sim,
    target: &str,
    deadline: Duration,
) -> anyhow::Result<Option<String>> {
    crate::wait::watch(deadline, Duration::from_millis(1), || async move {
        if let Some(seen) = pop
            .commands()
            .iter()
            .rev()
            .find(|c| command_name(c) == target)
        {
            return Ok(Some(command_name(seen).to_owned()));
        }
        worker.assert_running()?;
        Ok(None)
    })
    .await
}

fn command_name(line: &str) -> &str {
    line.split(' ').next().unwrap_or(line)
}

fn last_command(pop: &Pop3Sim) -> String {
    pop.commands()
        .last()
        .map(|c| command_name(c).to_owned())
        .unwrap_or_else(|| "none".to_owned())
}

async fn stored_count(db: &TestDb) -> anyhow::Result<i64> {
    let mut conn = db.pool().acquire().await?;
    Ok(crate::testdb::work_item_count(&mut conn).await?)
}

/// Counts the stored markers against the delivered ones.
async fn tally(
    db: &TestDb,
    pilot_id: i64,
    delivered: &[String],
    report: &mut SoakReport,
) -> anyhow::Result<()> {
    let mut counts: HashMap<&str, usize> = delivered.iter().map(|m| (m.as_str(), 0)).collect();
    let heads = {
        let mut conn = db.pool().acquire().await?;
        store::message_heads(&mut conn, &[pilot_id]).await?
    };
    report.delivered = counts.len();
    report.stored = heads.len();
    for head in &heads {
        match mailgen::marker(head).and_then(|m| counts.get_mut(m.as_str()).map(|c| *c += 1)) {
            Some(()) => {}
            None => report.unknown += 1,
        }
    }
    for count in counts.values() {
        match count {
            0 => report.lost += 1,
            1 => report.stored_once += 1,
            _ => report.duplicated += 1,
        }
    }
    Ok(())
}

/// Searches every worker log for the client secret, the master key, each token the token
/// endpoint issued and each XOAUTH2 blob made from them. Returns the log size and the leaks.
fn scan_logs(
    log_dir: &Path,
    world: &Setup,
    tokens: &[String],
) -> anyhow::Result<(u64, Vec<String>)> {
    let mut secrets: Vec<(String, String)> = vec![
        ("client secret".to_owned(), world.client_secret.clone()),
        (
            "master key".to_owned(),
            world.key.expose_secret().to_owned(),
        ),
    ];
    for (i, token) in tokens.iter().enumerate() {
        secrets.push((format!("access token #{i}"), token.clone()));
        let blob = ccmail::pop3::sasl::xoauth2_response(
            &world.mailbox,
            &SecretString::from(token.clone()),
        );
        secrets.push((
            format!("XOAUTH2 blob of token #{i}"),
            blob.expose_secret().to_owned(),
        ));
    }
    let mut bytes = 0u64;
    let mut leaks = Vec::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .with_context(|| format!("listing {}", log_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        bytes += text.len() as u64;
        let text = String::from_utf8_lossy(&text);
        for (what, secret) in &secrets {
            if !secret.is_empty() && text.contains(secret.as_str()) {
                leaks.push(format!("{what} in {}", path.display()));
            }
        }
    }
    Ok((bytes, leaks))
}
