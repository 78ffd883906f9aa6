//! A private PostgreSQL cluster for tests that stop, crash and restart the database server.
//!
//! `initdb` makes it in a temporary directory owned by the `postgres` OS user (PostgreSQL
//! refuses to run as root; the tests run as root and use `runuser -u postgres --`). It listens
//! on its own port on 127.0.0.1 only, with its Unix socket inside its directory, so it never
//! touches the machine's shared server. [`PgCluster::stop_immediate`] is `pg_ctl -m immediate`
//! (no checkpoint, like a crash: recovery replays the WAL at the next start).
//!
//! Dropping the cluster stops it (immediate) and removes its directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};

/// Where Debian's PostgreSQL 15 server binaries live.
const BIN: &str = "/usr/lib/postgresql/15/bin";

/// See the module documentation.
pub struct PgCluster {
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

impl PgCluster {
    /// Creates and starts a cluster; `settings` are extra `postgresql.conf` lines
    /// (`name = value`), e.g. `synchronous_commit = off`.
    pub async fn start(settings: &[&str]) -> anyhow::Result<PgCluster> {
        let dir = tempfile::Builder::new().prefix("ccmail-pg-").tempdir()?;
        let owner = nix::unistd::User::from_name("postgres")?
            .context("the postgres OS user is missing (install postgresql-15)")?;
        nix::unistd::chown(dir.path(), Some(owner.uid), Some(owner.gid))?;
        let port = super::ports::free_port()?;
        let mut cluster = PgCluster {
            dir,
            port,
            running: false,
        };
        let data = cluster.data_dir();
        cluster
            .as_postgres(
                "initdb",
                &[
                    "-D",
                    path_str(&data)?,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
            )
            .await?;
        let mut conf = format!(
            "\n# ccmail test cluster\nlisten_addresses = '127.0.0.1'\nport = {port}\n\
             unix_socket_directories = '{}'\nmax_connections = 40\nfsync = on\n\
             log_min_messages = warning\n",
            path_str(cluster.dir.path())?
        );
        for line in settings {
            conf.push_str(line);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = tokio::fs::read_to_string(&conf_path).await?;
        existing.push_str(&conf);
        tokio::fs::write(&conf_path, existing).await?;
        cluster.start_server().await?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// URL of the cluster's `postgres` maintenance database (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the stopped server and waits until it accepts connections (after recovery).
    pub async fn start_server(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                path_str(&data)?,
                "-l",
                path_str(&log)?,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m immediate`: every backend is killed without a checkpoint, as in a crash;
    /// connections see their socket closed, new ones are refused.
    pub async fn stop_immediate(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.as_postgres(
            "pg_ctl",
            &["-D", path_str(&data)?, "-m", "immediate", "-w", "stop"],
        )
        .await?;
        self.running = false;
        Ok(())
    }

    /// An immediate stop followed by a start (crash recovery included).
    pub async fn restart_immediate(&mut self) -> anyhow::Result<()> {
        self.stop_immediate().await?;
        self.start_server().await
    }

    /// Stops (SIGSTOP) the cluster's WAL writer process, so asynchronous commits stay in
    /// shared memory until the next stop; [`PgCluster::stop_immediate`] then kills it (the
    /// postmaster SIGKILLs children that ignore its SIGQUIT for 5 s). For negative controls.
    pub async fn freeze_wal_writer(&mut self) -> anyhow::Result<()> {
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&self.url()).await?;
        let pid: i32 =
            sqlx::query_scalar("select pid from pg_stat_activity where backend_type = 'walwriter'")
                .fetch_one(&mut conn)
                .await
                .context("finding the WAL writer")?;
        let _ = sqlx::Connection::close(conn).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .context("stopping the WAL writer")?;
        Ok(())
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Runs one of the server binaries as the `postgres` user and fails with its output.
    async fn as_postgres(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let output = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/{program}")])
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running {program} as postgres"))?;
        if !output.status.success() {
            bail!(
                "{program} {args:?} failed ({}): {}{}\nserver log:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    /// Stops a running server (immediate) so no postgres process outlives the test; the
    /// temporary directory is removed afterwards by its own drop.
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.data_dir();
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{BIN}/pg_ctl"), "-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!(
                "could not stop the test cluster in {}; stop it with pg_ctl -D {} -m immediate stop",
                self.dir.path().display(),
                data.display()
            );
        }
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}
