//! The HTTP listener (/metrics, /healthz, /readyz) cannot be exhausted and does not share
//! fate with ingestion: `ccmail run` with the open-file limit of a small container (1,024)
//! keeps answering `/healthz` and keeps ingesting while more idle connections than it may
//! keep are held open against it; and it raises a low soft open-file limit to the hard one.

use std::time::Duration;

use anyhow::{Context, ensure};
use secrecy::ExposeSecret;

use ccmail::telemetry;
use ccmail_lab::sim::mailgen::{Kind, MailGen};

use ccmail_lab::child::SpawnOptions;

use crate::support::child::CcmailChild;
use crate::support::pipeline::{Ledger, PipelineWorld};
use crate::support::wait::wait_for;

/// Idle connections the test holds: more than the worker's file descriptors allow.
const IDLE_CONNECTIONS: usize = 1_100;
/// The worker's open-file limit in the flood test (soft and hard), a common default.
const WORKER_NOFILE: u64 = 1_024;

/// Writes the settings of a worker whose HTTP listener binds a port of its own choosing.
fn write_config(world: &PipelineWorld) -> anyhow::Result<String> {
    let config = world.dir().join("ccmail.toml");
    std::fs::write(
        &config,
        format!(
            "[worker]\nreload_interval_secs = 1\ninitial_backoff_secs = 1\nmax_backoff_secs = 2\n\n\
             [oauth]\nextra_ca_file = {:?}\n\n[log]\nformat = \"text\"\nlevel = \"info\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n",
            world.ca_path().display().to_string()
        ),
    )?;
    Ok(config.display().to_string())
}

/// Raises this test process's soft open-file limit to its hard limit (it holds the flood).
fn raise_own_nofile(needed: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    ensure!(
        hard >= needed,
        "this test needs {needed} open files, the hard limit is {hard}"
    );
    Ok(())
}

fn open_fds(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_cap_exhaust_nothing_and_stop_neither_health_nor_ingest()
-> anyhow::Result<()> {
    raise_own_nofile(IDLE_CONNECTIONS as u64 + 256)?;
    let world = PipelineWorld::start().await?;
    let pilot = world
        .add_user_pass_pilot("support", "support-password-1", |_| {})
        .await?;
    let mut ledger = Ledger::default();
    let mut mails = MailGen::new(0x4771);
    ledger.deliver(
        &world.pop,
        &pilot.mailbox,
        mails.message(&pilot.mailbox, Kind::Plain),
    )?;
    let config = write_config(&world)?;
    let key = world.key.to_base64();
    let mut child = CcmailChild::spawn_with(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
        SpawnOptions {
            nofile: Some((WORKER_NOFILE, WORKER_NOFILE)),
            ..SpawnOptions::default()
        },
    )?;
    let addr = child
        .listen_addr(Duration::from_secs(30))
        .await?
        .to_string();
    let pop = world.pop.clone();
    let mailbox = pilot.mailbox.clone();
    wait_for(
        "the first message to be ingested",
        Duration::from_secs(60),
        || {
            let (pop, mailbox) = (pop.clone(), mailbox.clone());
            async move { pop.messages(&mailbox).is_empty().then_some(()) }
        },
    )
    .await
    .with_context(|| child.output())?;

    // The flood: connections that never send a byte.
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for i in 0..IDLE_CONNECTIONS {
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        .with_context(|| format!("connection {i} did not connect"))??;
        idle.push(stream);
    }
    child.assert_running()?;

    let health = telemetry::probe(&addr, "/healthz", Duration::from_secs(10))
        .await
        .with_context(|| format!("/healthz during the flood; output:\n{}", child.output()))?;
    ensure!(health == "ok", "{health}");
    ledger.deliver(
        &world.pop,
        &pilot.mailbox,
        mails.message(&pilot.mailbox, Kind::Alternative),
    )?;
    wait_for(
        "a message delivered during the flood to be ingested",
        Duration::from_secs(60),
        || {
            let (pop, mailbox) = (pop.clone(), mailbox.clone());
            async move { pop.messages(&mailbox).is_empty().then_some(()) }
        },
    )
    .await
    .with_context(|| child.output())?;
    let fds = open_fds(child.pid()?)?;
    ensure!(
        fds < WORKER_NOFILE as usize / 2,
        "the worker holds {fds} file descriptors while {IDLE_CONNECTIONS} idle clients wait"
    );
    drop(idle);
    ledger
        .check(&world.heads(&[pilot.id]).await?)
        .assert_exactly_once()?;
    let output = child.output();
    ensure!(
        !output.contains("Too many open files"),
        "the worker ran out of file descriptors:\n{output}"
    );
    child.terminate()?;
    let status = child.wait(Duration::from_secs(30)).await?;
    ensure!(
        status.success(),
        "exit {status}; output:\n{}",
        child.output()
    );
    world.finish().await
}

#[tokio::test]
async fn a_low_soft_open_file_limit_is_raised_to_the_hard_limit_at_start() -> anyhow::Result<()> {
    let world = PipelineWorld::start().await?;
    let config = write_config(&world)?;
    let key = world.key.to_base64();
    let mut child = CcmailChild::spawn_with(
        crate::support::child::ccmail(),
        world.dir(),
        "run",
        &["--config", &config, "run"],
        &[
            ("DATABASE_URL", world.db.url()),
            ("CCMAIL_MASTER_KEY", key.expose_secret()),
        ],
        SpawnOptions {
            nofile: Some((256, 4096)),
            ..SpawnOptions::default()
        },
    )?;
    let addr = child
        .listen_addr(Duration::from_secs(30))
        .await?
        .to_string();
    wait_for("/healthz", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move {
            telemetry::probe(&addr, "/healthz", Duration::from_secs(2))
                .await
                .ok()
        }
    })
    .await
    .with_context(|| child.output())?;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.pid()?))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open-file line in /proc/PID/limits")?;
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    ensure!(numbers == ["4096", "4096"], "{line}");
    let output = child.output();
    ensure!(
        output.contains("open-file limit") && output.contains("4096"),
        "the raise is not logged:\n{output}"
    );
    child.terminate()?;
    child.wait(Duration::from_secs(30)).await?;
    world.finish().await
}

/// The listener of [`telemetry::serve`] on an ephemeral port with `limits`, over a fresh
/// database; `stop` ends it.
struct Listener {
    addr: String,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    db: ccmail_lab::testdb::TestDb,
}

impl Listener {
    async fn start(limits: telemetry::HttpLimits) -> anyhow::Result<Listener> {
        let db = ccmail_lab::testdb::TestDb::new().await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(telemetry::serve(
            listener,
            ccmail::ingest::observe::readiness(db.db().clone()),
            limits,
            stop.clone(),
        ));
        Ok(Listener {
            addr,
            stop,
            task,
            db,
        })
    }

    async fn healthz(&self) -> anyhow::Result<()> {
        let body = telemetry::probe(&self.addr, "/healthz", Duration::from_secs(10)).await?;
        ensure!(body == "ok", "{body}");
        Ok(())
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.stop.cancel();
        crate::support::sim_world::within("the listener to stop", self.task).await???;
        self.db.drop_db().await?;
        Ok(())
    }
}

fn limits(header_read: u64, idle: u64, lifetime: u64, max: usize) -> telemetry::HttpLimits {
    telemetry::HttpLimits {
        max_connections: max,
        header_read_timeout: Duration::from_secs(header_read),
        idle_timeout: Duration::from_secs(idle),
        max_connection_lifetime: Duration::from_secs(lifetime),
    }
}

/// Waits until the server closes `stream` (end of file or reset), at most 30 s: a bound that
/// proves "closed by a deadline of a second or two", not "eventually".
async fn closed_by_server(stream: &mut tokio::net::TcpStream, what: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    crate::support::sim_world::within(what, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_silent_or_dripping_client_is_closed_at_the_header_read_timeout() -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    // Idle and lifetime far beyond the 30 s bound: only the header-read deadline can act.
    let server = Listener::start(limits(1, 600, 600, 16)).await?;
    let mut silent = tokio::net::TcpStream::connect(&server.addr).await?;
    closed_by_server(&mut silent, "closing a connection that never sends a byte").await?;

    let mut dripping = tokio::net::TcpStream::connect(&server.addr).await?;
    dripping.write_all(b"GET /healthz HTTP/1.1\r\n").await?;
    let (mut read, mut write) = dripping.into_split();
    let drip = tokio::spawn(async move {
        // One header line every 200 ms, never the blank line that ends the head.
        for i in 0u32.. {
            if write
                .write_all(format!("X-Drip-{i}: x\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    crate::support::sim_world::within("closing a client that drips its head", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while let Ok(n) = read.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await?;
    drip.abort();
    server.healthz().await?;
    server.finish().await
}

#[tokio::test]
async fn idle_keep_alive_connections_and_old_ones_are_closed() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    async fn answered(stream: &mut tokio::net::TcpStream) -> anyhow::Result<()> {
        stream.write_all(REQUEST).await?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.ends_with(b"ok\n") {
            let n = stream.read(&mut buf).await?;
            ensure!(n > 0, "closed before the answer: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        ensure!(seen.starts_with(b"HTTP/1.1 200"), "{seen:?}");
        Ok(())
    }

    // Only the idle deadline is short: a kept-alive connection is closed after its answer.
    let server = Listener::start(limits(600, 1, 600, 16)).await?;
    let mut kept = tokio::net::TcpStream::connect(&server.addr).await?;
    answered(&mut kept).await?;
    closed_by_server(&mut kept, "closing an idle kept-alive connection").await?;
    server.finish().await?;

    // Only the lifetime is short: a busy connection that is never idle is still closed, each
    // of its requests answered.
    let server = Listener::start(limits(600, 600, 2, 16)).await?;
    let mut busy = tokio::net::TcpStream::connect(&server.addr).await?;
    let outcome =
        crate::support::sim_world::within("closing a connection at its lifetime", async {
            let mut answers = 0u32;
            while answered(&mut busy).await.is_ok() {
                answers += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answers
        })
        .await?;
    ensure!(outcome > 0, "no request was answered");
    server.healthz().await?;
    server.finish().await
}

#[tokio::test]
async fn at_the_cap_the_longest_waiting_connection_makes_room_for_a_new_one() -> anyhow::Result<()>
{
    let server = Listener::start(limits(600, 600, 600, 2)).await?;
    let mut oldest = tokio::net::TcpStream::connect(&server.addr).await?;
    // Connections are accepted in the order they arrive, so the probe comes third: at the cap
    // it closes `oldest`, the one waiting longest, instead of being turned away.
    let newer = tokio::net::TcpStream::connect(&server.addr).await?;
    server.healthz().await?;
    closed_by_server(
        &mut oldest,
        "closing the longest-waiting connection at the cap",
    )
    .await?;
    server.healthz().await?;
    drop(newer);
    server.finish().await
}
