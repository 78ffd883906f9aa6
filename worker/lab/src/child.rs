//! The one way to run a program of this project (the `ccmail` worker, or `ccmail-lab`) as a
//! child process of a test or of the soak: its output captured to a log file, and a guard that
//! kills it (SIGKILL, by PID) when the owner ends without having reaped it, including when an
//! assertion fails halfway. The caller names the executable (tests pass
//! `env!("CARGO_BIN_EXE_ccmail")`, the soak its `--worker` path); the PID stays the program's
//! own (also under an open-file limit, set by `sh` which then `exec`s it), so it can be
//! signalled at a chosen moment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running child. Dropping it kills the process if it is still running.
pub struct Child {
    /// Behind a lock so that [`Child::assert_running`] works through `&self` (from
    /// inside a polled condition).
    child: std::sync::Mutex<tokio::process::Child>,
    output: PathBuf,
    /// The executable's file name, for messages.
    name: String,
}

/// How a [`Child`] is started beyond its executable, arguments and environment.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// The open-file limit `(soft, hard)` of the child.
    pub nofile: Option<(u64, u64)>,
    /// Start from an empty environment (nothing inherited: no `DATABASE_URL`, no `CCMAIL_*`).
    pub clear_env: bool,
    /// The child's working directory; the owner's when `None`.
    pub current_dir: Option<PathBuf>,
    /// Give the child a pipe as stdin, held open as long as the [`Child`] lives (instead of
    /// `/dev/null`): a child that serves until its stdin closes then ends with its owner, also
    /// when the owner itself is killed.
    pub stdin_pipe: bool,
}

impl Child {
    /// Starts `exe args…` in `dir` with `env` added to the owner's environment (minus
    /// `RUST_LOG`, so the settings decide the log level). Stdout and stderr go to
    /// `dir/<name>.log`.
    pub fn spawn(
        exe: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Child> {
        Child::spawn_with(exe, dir, name, args, env, SpawnOptions::default())
    }

    /// As [`Child::spawn`], as `options` say (an open-file limit, a cleared environment);
    /// the working directory is `dir` and the log `dir/<name>.log` whatever `options` hold.
    pub fn spawn_with(
        exe: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        options: SpawnOptions,
    ) -> anyhow::Result<Child> {
        let options = SpawnOptions {
            current_dir: Some(dir.to_owned()),
            ..options
        };
        Child::start(exe, &dir.join(format!("{name}.log")), args, env, &options)
    }

    /// Starts `exe args…` with `env` added (minus `RUST_LOG`; plus `CCMAIL_API_LISTEN` on a
    /// free port unless `env` names it), stdout and stderr appended to a fresh file at `log`,
    /// as `options` say.
    pub fn start(
        exe: &Path,
        log: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        options: &SpawnOptions,
    ) -> anyhow::Result<Child> {
        let output = log.to_owned();
        let out = std::fs::File::create(&output)
            .with_context(|| format!("creating {}", output.display()))?;
        let err = out.try_clone()?;
        let mut command = match options.nofile {
            None => tokio::process::Command::new(exe),
            Some((soft, hard)) => {
                let mut sh = tokio::process::Command::new("sh");
                sh.arg("-c")
                    .arg(format!(
                        "ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\" \"$@\""
                    ))
                    .arg(exe);
                sh
            }
        };
        if options.clear_env {
            command.env_clear();
        }
        if let Some(dir) = &options.current_dir {
            command.current_dir(dir);
        }
        command
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(if options.stdin_pipe {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Belt and braces: tokio kills it too if the guard's handle is dropped.
            .kill_on_drop(true);
        // Why: the agents' API listens on a fixed port by default; two workers of parallel
        // tests would fight over it. A caller that wants it elsewhere names it.
        if !env.iter().any(|(k, _)| *k == "CCMAIL_API_LISTEN") {
            command.env("CCMAIL_API_LISTEN", "127.0.0.1:0");
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let name = exe.file_name().map_or_else(
            || exe.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Child {
            child: std::sync::Mutex::new(child),
            output,
            name,
        })
    }

    /// The child's process id (the program's own, also when started through `sh`).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.lock()?.id().context("the child was already reaped")
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, tokio::process::Child>> {
        self.child
            .lock()
            .map_err(|_| anyhow::anyhow!("the child's lock is poisoned"))
    }

    /// The file the child's output goes to.
    pub fn log_path(&self) -> &Path {
        &self.output
    }

    /// Everything the child printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// The address the worker's HTTP listener bound, read from its `serving /metrics` log line
    /// (`listen = addr`), waiting at most `within`. Settings with `http.listen = "127.0.0.1:0"`
    /// let the worker pick a free port itself: no port is chosen, released and handed to the
    /// child, so another process cannot take it in between.
    pub async fn listen_addr(&self, within: Duration) -> anyhow::Result<SocketAddr> {
        crate::wait::poll(
            "the worker's `serving /metrics` log line",
            within,
            || async {
                self.assert_running()?;
                Ok(listen_addr_in(&self.output()))
            },
            || format!("its output:\n{}", self.output()),
        )
        .await
    }

    /// The address the worker's agents' API bound, read from its `serving the agents' API`
    /// log line, waiting at most `within` (settings with `api.listen = "127.0.0.1:0"`).
    pub async fn api_addr(&self, within: Duration) -> anyhow::Result<SocketAddr> {
        crate::wait::poll(
            "the worker's `serving the agents' API` log line",
            within,
            || async {
                self.assert_running()?;
                Ok(addr_in(&self.output(), "serving the agents' API"))
            },
            || format!("its output:\n{}", self.output()),
        )
        .await
    }

    /// Fails (with the end of the child's log) if the child has already exited.
    pub fn assert_running(&self) -> anyhow::Result<()> {
        if let Some(status) = self.exited()? {
            bail!(
                "{} exited early with {status}; {}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last few KiB of the child's log, with where the whole of it is: enough to see why
    /// it failed without burying a test's report under a long run's log.
    pub fn log_tail(&self) -> String {
        const TAIL_BYTES: usize = 4000;
        let log = self.output();
        let start = log.len().saturating_sub(TAIL_BYTES);
        let start = (start..log.len())
            .find(|i| log.is_char_boundary(*i))
            .unwrap_or(log.len());
        format!(
            "the end of its log ({}):\n{}",
            self.output.display(),
            &log[start..]
        )
    }

    /// Sends SIGTERM, as a service manager does to stop the worker.
    pub fn terminate(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Sends `signal` to the child's PID (and to nothing else), e.g. the soak's SIGKILL.
    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let pid = i32::try_from(pid).context("PID out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal}"))?;
        Ok(())
    }

    /// The child's exit status if it has exited, `None` while it runs.
    pub fn exited(&self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.lock()?.try_wait()?)
    }

    /// Waits for the child to exit, however long that takes (the caller bounds it).
    async fn reap(&mut self) -> anyhow::Result<ExitStatus> {
        let child = self
            .child
            .get_mut()
            .map_err(|_| anyhow::anyhow!("the child's lock is poisoned"))?;
        Ok(child.wait().await?)
    }

    /// Waits for the child to exit, at most `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(deadline, self.reap()).await {
            Ok(status) => status,
            Err(_) => bail!(
                "{} did not exit within {deadline:?}; {}",
                self.name,
                self.log_tail()
            ),
        }
    }
}

/// The `listen` address of the first `serving /metrics` line of a worker's log (JSON or text,
/// with or without ANSI colours).
fn listen_addr_in(log: &str) -> Option<SocketAddr> {
    addr_in(log, "serving /metrics")
}

/// The `listen` address of the first log line containing `marker`.
fn addr_in(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines().filter(|l| l.contains(marker)).find_map(|line| {
        let plain = strip_ansi(line);
        let (_, after) = plain.split_once("listen")?;
        let start = after.find(|c: char| c.is_ascii_digit())?;
        let addr: String = after[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        addr.parse().ok()
    })
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut()
            && let Ok(None) = child.try_wait()
        {
            // SIGKILL to this PID only; tokio reaps it in the background.
            let _ = child.start_kill();
        }
    }
}
