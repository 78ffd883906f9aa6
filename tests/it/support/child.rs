//! The real `ccmail` (or `ccmail-lab`) binary as a child process of a test, with its output captured to a file
//! and a guard that kills it (SIGKILL, by PID) when the test ends without having reaped it,
//! including when an assertion fails halfway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running `ccmail` child. Dropping it kills the process if it is still running.
pub struct CcmailChild {
    /// Behind a lock so that [`CcmailChild::assert_running`] works through `&self` (from
    /// inside a polled condition).
    child: std::sync::Mutex<tokio::process::Child>,
    output: PathBuf,
}

impl CcmailChild {
    /// Starts `ccmail args…` in `dir` with `env` added to the test's environment (minus
    /// `RUST_LOG`, so the settings decide the log level). Stdout and stderr go to
    /// `dir/<name>.log`.
    pub fn spawn(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<CcmailChild> {
        CcmailChild::spawn_limited(dir, name, args, env, None)
    }

    /// As [`CcmailChild::spawn`], with the open-file limit of the child set to `(soft, hard)`
    /// first (through `sh`'s `ulimit`, which then `exec`s ccmail: the PID is ccmail's).
    pub fn spawn_limited(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> anyhow::Result<CcmailChild> {
        CcmailChild::spawn_exe(
            Path::new(env!("CARGO_BIN_EXE_ccmail")),
            dir,
            name,
            args,
            env,
            nofile,
            false,
        )
    }

    /// As [`CcmailChild::spawn`], with the child's environment `env` only (nothing inherited
    /// from the test: no `DATABASE_URL`, no `CCMAIL_*`).
    pub fn spawn_env_cleared(
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<CcmailChild> {
        CcmailChild::spawn_exe(
            Path::new(env!("CARGO_BIN_EXE_ccmail")),
            dir,
            name,
            args,
            env,
            None,
            true,
        )
    }

    fn spawn_exe(
        exe: &Path,
        dir: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
        clear_env: bool,
    ) -> anyhow::Result<CcmailChild> {
        let output = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&output)
            .with_context(|| format!("creating {}", output.display()))?;
        let err = out.try_clone()?;
        let mut command = match nofile {
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
        if clear_env {
            command.env_clear();
        }
        command
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            // Belt and braces: tokio kills it too if the guard's handle is dropped.
            .kill_on_drop(true);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        Ok(CcmailChild {
            child: std::sync::Mutex::new(child),
            output,
        })
    }

    /// The child's process id (ccmail's own, also when started through `sh`).
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.lock()?.id().context("the child was already reaped")
    }

    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, tokio::process::Child>> {
        self.child
            .lock()
            .map_err(|_| anyhow::anyhow!("the child's lock is poisoned"))
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
        super::wait::poll(
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

    /// Fails (with the child's output) if the child has already exited.
    pub fn assert_running(&self) -> anyhow::Result<()> {
        let status = self.lock()?.try_wait()?;
        if let Some(status) = status {
            bail!(
                "ccmail exited early with {status}; its output:\n{}",
                self.output()
            );
        }
        Ok(())
    }

    /// Sends SIGTERM, as a service manager does to stop the worker.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let pid = i32::try_from(pid).context("PID out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM).context("sending SIGTERM")?;
        Ok(())
    }

    /// Waits for the child to exit, at most `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let child = self
            .child
            .get_mut()
            .map_err(|_| anyhow::anyhow!("the child's lock is poisoned"))?;
        match tokio::time::timeout(deadline, child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!(
                "ccmail did not exit within {deadline:?}; its output:\n{}",
                self.output()
            ),
        }
    }
}

/// The `listen` address of the first `serving /metrics` line of a worker's log (JSON or text,
/// with or without ANSI colours).
pub fn listen_addr_in(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("serving /metrics"))
        .find_map(|line| {
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

impl Drop for CcmailChild {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut()
            && let Ok(None) = child.try_wait()
        {
            // SIGKILL to this PID only; tokio reaps it in the background.
            let _ = child.start_kill();
        }
    }
}
