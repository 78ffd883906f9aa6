//! A private Dovecot POP3 server for the interop tests and `ccmail-lab bench --server dovecot`:
//! a real POP3 implementation that no one on this project wrote, running as an ordinary child
//! process.
//!
//! Each [`Dovecot`] owns a temporary directory under `/tmp` holding its configuration, TLS
//! certificate (a fresh [`TestCa`] and a leaf for `localhost` + `127.0.0.1`), passwd file,
//! `base_dir`, `state_dir`, log and Maildirs. It listens on 127.0.0.1 only, on two ports
//! picked at start (plain POP3 offering STLS, and implicit-TLS POP3S), under its own
//! `instance_name`, so several instances run side by side in one test process.
//!
//! Invariants:
//! - The master runs in the foreground (`dovecot -F`) as *our* child, so that stopping it also
//!   reaps it: no zombie is left for an init that may not reap orphans. Its PID is the one
//!   Dovecot writes to `base_dir/master.pid` (checked at start).
//! - Mail processes run as `nobody`/`nogroup` (65534): every Maildir file and directory is
//!   owned by that user and the instance directory is world-traversable (0755).
//! - [`Dovecot::start`] returns only once the instance answers its own greeting (which names
//!   the instance, so a foreign server that grabbed the port is never mistaken for ours).
//! - The master leads its own process group, which holds every process of the instance.
//!   Dropping a [`Dovecot`] stops that group (SIGTERM, then SIGKILL after a grace period),
//!   reaps the master and removes the directory, exactly like [`Dovecot::stop`].
//!
//! Authentication: an `oauth2` passdb (XOAUTH2 / OAUTHBEARER) that validates every token by
//! POST introspection, and a `passwd-file` passdb for USER/PASS and SASL PLAIN. With
//! [`DovecotOptions::oauth_domain_format`] the oauth2 passdb uses `username_format = %d`:
//! Dovecot then applies `%d` to *both* the login user and the introspected `username`, so
//! the introspection endpoint must answer a username that has a domain part (for example
//! `pop-app@contoso.test`); a bare `contoso.test` expands to the empty string and never
//! matches (seen with Dovecot 2.3.19).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::sim::cert::TestCa;
use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

/// The unprivileged system user and group (`nobody`/`nogroup`) that owns the mail.
const MAIL_UID: u32 = 65534;
const MAIL_GID: u32 = 65534;

/// How Dovecot gets onto a fresh machine; named in every "not installed" error.
const INSTALL_HINT: &str = "install Dovecot with: printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; \
     apt-get install -y dovecot-core dovecot-pop3d \
     (policy-rc.d stops the package from starting the system instance on ports 110/995)";

/// The DH parameters shipped by dovecot-core; Dovecot refuses to start SSL without them.
const DH_PEM: &str = "/usr/share/dovecot/dh.pem";

/// How long start-up may take before we give up (the machine is small and shared).
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Interval between readiness probes while the master starts.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);
/// How long the master gets to shut down after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often SIGTERM is repeated to the instance's process group while it shuts down.
const SIGTERM_REPEAT: Duration = Duration::from_millis(200);
/// Poll interval while waiting for killed instance processes to terminate.
const SIGKILL_POLL: Duration = Duration::from_millis(10);
/// Start attempts when a chosen port was taken by someone else in the meantime.
const PORT_ATTEMPTS: usize = 5;

/// What the private Dovecot should trust and how it maps OAuth identities.
pub struct DovecotOptions {
    /// The OAuth 2.0 token introspection endpoint (RFC 7662, POST form `token=…`) that the
    /// `oauth2` passdb asks about every XOAUTH2 / OAUTHBEARER token.
    pub introspection_url: String,
    /// `username_format = %d` in the oauth2 passdb: one app token whose introspected
    /// `username` is in a domain logs into every mailbox of that domain, like an app-only
    /// token on Exchange Online. Without it the introspected `username` must equal the login.
    pub oauth_domain_format: bool,
}

/// A running private Dovecot instance; see the module documentation.
pub struct Dovecot {
    /// `None` once stopped; the directory is removed when this is taken and closed.
    dir: Option<tempfile::TempDir>,
    /// `None` once stopped.
    child: Option<Child>,
    pid: u32,
    paths: Paths,
    pop3: SocketAddr,
    pop3s: SocketAddr,
    ca_pem: String,
    /// passwd-file entries, user -> password; the file is rewritten from this on every change.
    users: Mutex<BTreeMap<String, String>>,
}

/// Every file and directory of one instance, all under its temporary directory.
#[derive(Clone)]
struct Paths {
    root: PathBuf,
    config: PathBuf,
    passwd: PathBuf,
    mail: PathBuf,
    log: PathBuf,
    /// The master's stdout/stderr: errors before the log process runs (bind failures) land here.
    console: PathBuf,
    base_dir: PathBuf,
}

/// Why one start attempt failed; a port conflict is retried with fresh ports.
enum AttemptError {
    PortConflict(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Dovecot {
    /// Writes a fresh configuration, validates it with `doveconf -n`, starts the master and
    /// waits until the plain port answers this instance's greeting and the POP3S port accepts.
    pub async fn start(opts: DovecotOptions) -> anyhow::Result<Dovecot> {
        let dovecot_bin = find_binary("dovecot", &["/usr/sbin/dovecot", "/usr/bin/dovecot"])?;
        let doveconf_bin = find_binary("doveconf", &["/usr/bin/doveconf", "/usr/sbin/doveconf"])?;
        if !Path::new(DH_PEM).is_file() {
            bail!("{DH_PEM} is missing, so Dovecot cannot serve TLS; {INSTALL_HINT}");
        }

        let dir = tempfile::Builder::new()
            .prefix("ccmail-dovecot-")
            .tempdir_in("/tmp")
            .context("creating the Dovecot instance directory under /tmp")?;
        // The mail user (65534) must traverse this directory to reach its Maildirs.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .context("making the Dovecot instance directory traversable")?;
        let root = dir.path().to_path_buf();
        let paths = Paths {
            config: root.join("dovecot.conf"),
            passwd: root.join("passwd"),
            mail: root.join("mail"),
            log: root.join("dovecot.log"),
            console: root.join("master-console.log"),
            base_dir: root.join("run"),
            root,
        };
        for sub in [&paths.mail, &paths.base_dir, &paths.root.join("state")] {
            fs::create_dir(sub).with_context(|| format!("creating {}", sub.display()))?;
            fs::set_permissions(sub, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting permissions on {}", sub.display()))?;
        }

        let ca = TestCa::new("ccmail Dovecot test CA").context("creating the test CA")?;
        let leaf = ca
            .server_cert(&["localhost", "127.0.0.1"])
            .context("issuing the Dovecot server certificate")?;
        write_file(
            &paths.root.join("cert.pem"),
            leaf.cert_pem.as_bytes(),
            0o644,
        )?;
        write_file(&paths.root.join("key.pem"), leaf.key_pem.as_bytes(), 0o600)?;
        write_file(&paths.passwd, b"", 0o644)?;
        write_file(
            &paths.root.join("oauth2.conf"),
            oauth2_args(&opts).as_bytes(),
            0o644,
        )?;

        let instance = unique_instance_name();
        let mut last_conflict = None;
        for _ in 0..PORT_ATTEMPTS {
            let ports = reserve_ports(2)?;
            let pop3 = loopback(ports[0]);
            let pop3s = loopback(ports[1]);
            let config = config_text(&paths, &instance, pop3.port(), pop3s.port());
            write_file(&paths.config, config.as_bytes(), 0o644)?;
            validate_config(&doveconf_bin, &paths.config)?;
            match start_attempt(&dovecot_bin, &paths, &instance, pop3, pop3s).await {
                Ok(child) => {
                    let pid = child.id();
                    return Ok(Dovecot {
                        dir: Some(dir),
                        child: Some(child),
                        pid,
                        paths,
                        pop3,
                        pop3s,
                        ca_pem: ca.cert_pem().to_owned(),
                        users: Mutex::new(BTreeMap::new()),
                    });
                }
                Err(AttemptError::PortConflict(e)) => last_conflict = Some(e),
                Err(AttemptError::Fatal(e)) => return Err(e),
            }
        }
        Err(last_conflict
            .unwrap_or_else(|| anyhow!("no start attempt was made"))
            .context(format!(
                "Dovecot could not bind free ports in {PORT_ATTEMPTS} attempts"
            )))
    }

    /// The plain POP3 port; it offers STLS (Dovecot also accepts plaintext auth on it because
    /// it treats 127.0.0.1 as a secure network).
    pub fn pop3_addr(&self) -> SocketAddr {
        self.pop3
    }

    /// The implicit-TLS POP3S port.
    pub fn pop3s_addr(&self) -> SocketAddr {
        self.pop3s
    }

    /// The PEM of the CA that signed the server certificate (valid for `localhost` and
    /// `127.0.0.1`); trust it to verify the server.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The PID of the Dovecot master process (also in `base_dir/master.pid`).
    pub fn master_pid(&self) -> u32 {
        self.pid
    }

    /// The instance's temporary directory (removed by [`Dovecot::stop`] and on drop).
    pub fn root_dir(&self) -> &Path {
        &self.paths.root
    }

    /// Adds (or replaces) a passwd-file entry for USER/PASS and SASL PLAIN, and creates the
    /// user's Maildir. `user` is a full address (`alice@contoso.test`); Dovecot lowercases
    /// login names, so it is stored lowercased. Mailboxes used only with XOAUTH2 need this
    /// too (any password): it creates the Maildir, which Dovecot cannot create itself under
    /// the root-owned domain directory.
    pub fn add_user(&self, user: &str, password: &str) -> anyhow::Result<()> {
        let user = normalise_user(user)?;
        if password.is_empty() || password.contains([':', '\n', '\r', '\0']) {
            bail!(
                "password for {user} must be non-empty and free of ':', CR, LF and NUL (passwd-file syntax)"
            );
        }
        self.create_maildir(&user)?;
        let mut users = self
            .users
            .lock()
            .map_err(|_| anyhow!("the passwd-file lock is poisoned by an earlier panic"))?;
        users.insert(user, password.to_owned());
        let mut text = String::new();
        for (name, pass) in users.iter() {
            writeln!(text, "{name}:{{PLAIN}}{pass}").context("formatting the passwd file")?;
        }
        // Write beside and rename, so Dovecot never reads a half-written file.
        let tmp = self.paths.root.join("passwd.new");
        write_file(&tmp, text.as_bytes(), 0o644)?;
        fs::rename(&tmp, &self.paths.passwd)
            .with_context(|| format!("replacing {}", self.paths.passwd.display()))?;
        Ok(())
    }

    /// Delivers `raw` as one new message into the user's `Maildir/new` (written in `tmp` and
    /// renamed, the Maildir way), owned by the mail user. The bytes are stored as given;
    /// Dovecot sends bare LF as CRLF on the wire. Returns the file's path.
    pub fn deliver(&self, user: &str, raw: &[u8]) -> anyhow::Result<PathBuf> {
        let user = normalise_user(user)?;
        let maildir = self.maildir(&user)?;
        if !maildir.join("new").is_dir() {
            bail!("no Maildir for {user}: call add_user(\"{user}\", …) before deliver");
        }
        // The Maildir name (seconds, zero-padded microseconds, pid, sequence) is unique and
        // sorts in delivery order, which Dovecot follows when it numbers new messages.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("system clock is before 1970")?;
        let name = format!(
            "{}.M{:06}P{}Q{}.ccmail-it",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = maildir.join("tmp").join(&name);
        write_file(&tmp, raw, 0o600)?;
        chown(&tmp, Some(MAIL_UID), Some(MAIL_GID))
            .with_context(|| format!("chown {} to {MAIL_UID}:{MAIL_GID}", tmp.display()))?;
        let dest = maildir.join("new").join(&name);
        fs::rename(&tmp, &dest)
            .with_context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
        Ok(dest)
    }

    /// Every message file in the user's `Maildir/new` and `Maildir/cur` (Dovecot moves
    /// messages to `cur` once a session has seen them), sorted by path, with its bytes.
    pub fn maildir_messages(&self, user: &str) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
        let user = normalise_user(user)?;
        let maildir = self.maildir(&user)?;
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let dir = maildir.join(sub);
            let entries =
                fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?;
            for entry in entries {
                let path = entry
                    .with_context(|| format!("listing {}", dir.display()))?
                    .path();
                if path.is_file() {
                    let bytes =
                        fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                    out.push((path, bytes));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Dovecot's log (and anything the master printed before its log process ran), for
    /// failure messages.
    pub fn log(&self) -> String {
        read_logs(&self.paths)
    }

    /// Stops the master and every process of this instance (SIGTERM to its process group, a
    /// grace period, then SIGKILL), reaps the master and removes the instance directory.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(child) = self.child.take() {
            terminate(child);
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!(
                    "warning: could not remove Dovecot directory {}: {e}",
                    path.display()
                );
            }
        }
    }

    fn maildir(&self, user: &str) -> anyhow::Result<PathBuf> {
        let (local, domain) = user
            .split_once('@')
            .ok_or_else(|| anyhow!("user {user:?} is not a full address"))?;
        Ok(self.paths.mail.join(domain).join(local).join("Maildir"))
    }

    /// Creates `mail/<domain>/<local>/Maildir/{cur,new,tmp}`; the home and Maildir belong to
    /// the mail user (Dovecot writes its index files there), the domain level only needs to
    /// be traversable.
    fn create_maildir(&self, user: &str) -> anyhow::Result<()> {
        let maildir = self.maildir(user)?;
        let home = maildir
            .parent()
            .ok_or_else(|| anyhow!("Maildir path {} has no parent", maildir.display()))?;
        let domain_dir = home
            .parent()
            .ok_or_else(|| anyhow!("home {} has no parent", home.display()))?;
        fs::create_dir_all(domain_dir)
            .with_context(|| format!("creating {}", domain_dir.display()))?;
        fs::set_permissions(domain_dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting permissions on {}", domain_dir.display()))?;
        let owned = [
            home.to_path_buf(),
            maildir.clone(),
            maildir.join("cur"),
            maildir.join("new"),
            maildir.join("tmp"),
        ];
        for dir in &owned {
            if !dir.is_dir() {
                fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting permissions on {}", dir.display()))?;
            chown(dir, Some(MAIL_UID), Some(MAIL_GID))
                .with_context(|| format!("chown {} to {MAIL_UID}:{MAIL_GID}", dir.display()))?;
        }
        Ok(())
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Finds a Dovecot binary at its Debian path or on `PATH` (cargo may run without /usr/sbin).
fn find_binary(name: &str, candidates: &[&str]) -> anyhow::Result<PathBuf> {
    if let Some(found) = candidates.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(found.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| anyhow!("`{name}` not found: Dovecot is not installed; {INSTALL_HINT}"))
}

/// Accepts `local@domain` with characters that are safe both as path components and in
/// passwd-file syntax; returns it lowercased, as Dovecot's default `auth_username_format`.
fn normalise_user(user: &str) -> anyhow::Result<String> {
    let lower = user.to_ascii_lowercase();
    let valid_part = |part: &str, extra: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c) || extra.contains(c))
    };
    match lower.split_once('@') {
        Some((local, domain)) if valid_part(local, "_+") && valid_part(domain, "") => Ok(lower),
        _ => bail!(
            "user {user:?} must be a full address like alice@contoso.test (letters, digits, '.', '-', '_', '+')"
        ),
    }
}

fn unique_instance_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "ccmail-it-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Picks `n` free loopback ports by binding port 0, never handing out a port twice in this
/// process (parallel tests). Another process can still take one before Dovecot binds it;
/// `start` then retries with fresh ports.
fn reserve_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT
        .lock()
        .map_err(|_| anyhow!("the port registry lock is poisoned by an earlier panic"))?;
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    // Keep every probe socket open until all ports are chosen so the kernel cannot return
    // the same port twice in this loop.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding 127.0.0.1:0 to find a free port")?;
        let port = listener
            .local_addr()
            .context("reading the probe socket's port")?
            .port();
        if handed_out.insert(port) {
            ports.push(port);
        }
        held.push(listener);
        if held.len() > 1000 {
            bail!("could not find {n} unused loopback ports");
        }
    }
    Ok(ports)
}

fn oauth2_args(opts: &DovecotOptions) -> String {
    let mut args = format!(
        "introspection_mode = post\n\
         introspection_url = {}\n\
         force_introspection = yes\n\
         username_attribute = username\n\
         active_attribute = active\n\
         active_value = true\n",
        opts.introspection_url
    );
    if opts.oauth_domain_format {
        args.push_str("username_format = %d\n");
    }
    args
}

fn config_text(paths: &Paths, instance: &str, pop3_port: u16, pop3s_port: u16) -> String {
    let root = paths.root.display();
    let mail = paths.mail.display();
    format!(
        "# Private Dovecot for ccmail interop tests; nothing here reads /etc/dovecot.
instance_name = {instance}
base_dir = {base_dir}
state_dir = {root}/state
log_path = {log}
listen = 127.0.0.1
protocols = pop3
# The greeting names the instance so start() recognises its own server.
login_greeting = {instance} ready.
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
ssl_dh = <{DH_PEM}
first_valid_uid = {MAIL_UID}
first_valid_gid = {MAIL_GID}
mail_location = maildir:{mail}/%d/%n/Maildir
pop3_uidl_format = %08Xu%08Xv
auth_mechanisms = plain xoauth2 oauthbearer
auth_verbose = yes
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf
}}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_GID} home={mail}/%d/%n allow_all_users=yes
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s_port}
    ssl = yes
  }}
}}
",
        base_dir = paths.base_dir.display(),
        log = paths.log.display(),
        passwd = paths.passwd.display(),
    )
}

/// `doveconf -n -c FILE` parses the configuration the way the master will; its complaint is
/// far clearer than a master that exits at start.
fn validate_config(doveconf: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(doveconf)
        .arg("-n")
        .arg("-c")
        .arg(config)
        .output()
        .with_context(|| format!("running {} -n -c {}", doveconf.display(), config.display()))?;
    if !out.status.success() {
        bail!(
            "doveconf rejected {} ({}): {}",
            config.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts the master with the current configuration and waits until it is ready. On any
/// failure the master is stopped and reaped before returning.
async fn start_attempt(
    dovecot: &Path,
    paths: &Paths,
    instance: &str,
    pop3: SocketAddr,
    pop3s: SocketAddr,
) -> Result<Child, AttemptError> {
    let console = fs::File::create(&paths.console)
        .with_context(|| format!("creating {}", paths.console.display()))
        .map_err(AttemptError::Fatal)?;
    let console_err = console
        .try_clone()
        .context("duplicating the console file handle")
        .map_err(AttemptError::Fatal)?;
    // Foreground (-F) keeps the master our child, so stop() can reap it; its own process
    // group lets stop() end every Dovecot process of this instance, and only those.
    let child = Command::new(dovecot)
        .process_group(0)
        .arg("-F")
        .arg("-c")
        .arg(&paths.config)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .spawn()
        .with_context(|| {
            format!(
                "spawning {} -F -c {}",
                dovecot.display(),
                paths.config.display()
            )
        })
        .map_err(AttemptError::Fatal)?;

    // From here on, an error or a dropped `start` future stops the master.
    let mut guard = StartingMaster(Some(child));
    let ready = match guard.0.as_mut() {
        Some(child) => wait_ready(child, paths, instance, pop3, pop3s).await,
        None => Err(anyhow!(
            "the Dovecot master handle vanished during start-up"
        )),
    };
    let failure = match ready {
        Ok(()) => match guard.0.take() {
            Some(child) => return Ok(child),
            None => anyhow!("the Dovecot master handle vanished during start-up"),
        },
        Err(e) => e,
    };
    drop(guard);
    let logs = read_logs(paths);
    let conflict = [&logs, &format!("{failure:#}")]
        .iter()
        .any(|text| text.contains("Address already in use") || text.contains("Address in use"));
    let e = failure.context(format!("Dovecot log:\n{logs}"));
    if conflict {
        Err(AttemptError::PortConflict(e))
    } else {
        Err(AttemptError::Fatal(e))
    }
}

/// Owns the master while it starts; dropping it (on error, or when the `start` future is
/// dropped mid-way) stops and reaps the master, so an abandoned start leaks no process.
struct StartingMaster(Option<Child>);

impl Drop for StartingMaster {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            terminate(child);
        }
    }
}

/// Polls until the plain port greets with this instance's greeting, the POP3S port accepts a
/// connection and `master.pid` names our child. Fails as soon as the master exits.
async fn wait_ready(
    child: &mut Child,
    paths: &Paths,
    instance: &str,
    pop3: SocketAddr,
    pop3s: SocketAddr,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    let mut last_probe = String::from("no probe yet");
    loop {
        if let Some(status) = child.try_wait().context("polling the Dovecot master")? {
            bail!("the Dovecot master exited during start-up ({status}); last probe: {last_probe}");
        }
        match probe(paths, instance, pop3, pop3s, child.id()).await {
            Ok(()) => return Ok(()),
            Err(Probe::Foreign(greeting)) => {
                bail!("port {pop3} answers another server's greeting {greeting:?}: Address in use")
            }
            Err(Probe::NotYet(why)) => last_probe = why,
        }
        if Instant::now() >= deadline {
            bail!(
                "Dovecot did not become ready within {START_DEADLINE:?}; last probe: {last_probe}"
            );
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

enum Probe {
    NotYet(String),
    Foreign(String),
}

async fn probe(
    paths: &Paths,
    instance: &str,
    pop3: SocketAddr,
    pop3s: SocketAddr,
    child_pid: u32,
) -> Result<(), Probe> {
    let io_deadline = Duration::from_secs(5);
    let stream = tokio::time::timeout(io_deadline, tokio::net::TcpStream::connect(pop3))
        .await
        .map_err(|_| Probe::NotYet(format!("connect to {pop3} timed out")))?
        .map_err(|e| Probe::NotYet(format!("connect to {pop3}: {e}")))?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut greeting = String::new();
    tokio::time::timeout(io_deadline, reader.read_line(&mut greeting))
        .await
        .map_err(|_| Probe::NotYet(format!("no greeting on {pop3} within {io_deadline:?}")))?
        .map_err(|e| Probe::NotYet(format!("reading the greeting on {pop3}: {e}")))?;
    if greeting.is_empty() {
        return Err(Probe::NotYet(format!("{pop3} closed before greeting")));
    }
    if !(greeting.starts_with("+OK") && greeting.contains(instance)) {
        return Err(Probe::Foreign(greeting.trim_end().to_owned()));
    }
    tokio::time::timeout(io_deadline, tokio::net::TcpStream::connect(pop3s))
        .await
        .map_err(|_| Probe::NotYet(format!("connect to {pop3s} timed out")))?
        .map_err(|e| Probe::NotYet(format!("connect to {pop3s}: {e}")))?;
    let pid_file = paths.base_dir.join("master.pid");
    let pid = fs::read_to_string(&pid_file)
        .map_err(|e| Probe::NotYet(format!("reading {}: {e}", pid_file.display())))?;
    if pid.trim() != child_pid.to_string() {
        return Err(Probe::NotYet(format!(
            "{} holds {:?}, expected our child {child_pid}",
            pid_file.display(),
            pid.trim()
        )));
    }
    Ok(())
}

/// Stops the whole instance: SIGTERM to the master's process group (master, log, auth,
/// login and mail processes), repeated until the master exits, SIGKILL to the group after
/// [`STOP_GRACE`], a final SIGKILL sweep while the exited master still reserves the group id,
/// then reap.
///
/// Why the group and the repeats: a login process that was being forked when the SIGTERM
/// came can miss it (the signal lands in the master's handler copied into the child before
/// exec); it then outlives the master, which waits about 6 s for it and exits leaving it
/// orphaned. A repeated SIGTERM reaches it once it runs.
fn terminate(mut child: Child) {
    let Ok(raw) = i32::try_from(child.id()) else {
        // A PID beyond i32 cannot be signalled; fall back to the standard library's SIGKILL.
        let _ = child.kill();
        let _ = child.wait();
        return;
    };
    let group = Pid::from_raw(raw);
    // waitid blocks, so it runs on a thread and we wait on a channel with a deadline.
    // WNOWAIT leaves the master a zombie, so its PID (= the group id) cannot be reused
    // before the sweep below.
    let (tx, rx) = mpsc::channel::<()>();
    let waiter = std::thread::spawn(move || {
        while let Err(nix::errno::Errno::EINTR) =
            waitid(Id::Pid(group), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT)
        {}
        let _ = tx.send(());
    });
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        // ESRCH only means everything is already gone; the reaping below happens either way.
        let _ = killpg(group, Signal::SIGTERM);
        match rx.recv_timeout(SIGTERM_REPEAT) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                eprintln!(
                    "Dovecot master {raw} ignored SIGTERM for {STOP_GRACE:?}; sending SIGKILL"
                );
                let _ = killpg(group, Signal::SIGKILL);
                let _ = rx.recv();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = waiter.join();
    // The master has exited but is not reaped yet, so the group id cannot be reused: make
    // sure no process of the instance outlives it (a mail process busy in the kernel may
    // take a moment to act on its signal).
    let sweep_deadline = Instant::now() + STOP_GRACE;
    loop {
        let alive = live_group_members(raw);
        if alive.iter().all(|&pid| pid == raw) {
            break;
        }
        if Instant::now() >= sweep_deadline {
            eprintln!("Dovecot processes {alive:?} of group {raw} survived SIGKILL");
            break;
        }
        let _ = killpg(group, Signal::SIGKILL);
        std::thread::sleep(SIGKILL_POLL);
    }
    let _ = child.wait();
}

/// Processes of group `pgid` that have not terminated (zombies are dead already; whoever
/// parents them reaps them), from `/proc/<pid>/stat`: `pid (comm) state ppid pgrp …`.
fn live_group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            // The process may be gone between read_dir and read: then it is not alive.
            let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(") ")?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let group: i32 = fields.nth(1)?.parse().ok()?;
            (group == pgid && state != "Z" && state != "X").then_some(pid)
        })
        .collect()
}

fn read_logs(paths: &Paths) -> String {
    let mut text = match fs::read_to_string(&paths.log) {
        Ok(log) => log,
        Err(e) => format!("(cannot read {}: {e})\n", paths.log.display()),
    };
    if let Ok(console) = fs::read_to_string(&paths.console)
        && !console.trim().is_empty()
    {
        text.push_str("--- master console ---\n");
        text.push_str(&console);
    }
    text
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file =
        fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dovecot_missing_binary_names_the_apt_get_command() {
        let Err(e) = find_binary("ccmail-no-such-dovecot-binary", &[]) else {
            panic!("a binary that does not exist was found");
        };
        let message = e.to_string();
        assert!(
            message.contains("apt-get install -y dovecot-core dovecot-pop3d"),
            "{message}"
        );
        assert!(
            message.contains("ccmail-no-such-dovecot-binary"),
            "{message}"
        );
    }

    #[test]
    fn dovecot_config_validation_reports_doveconfs_complaint() -> anyhow::Result<()> {
        let doveconf = find_binary("doveconf", &["/usr/bin/doveconf", "/usr/sbin/doveconf"])?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("dovecot.conf");
        fs::write(&config, "protocols = pop3\nno_such_setting_here = 1\n")?;
        let Err(e) = validate_config(&doveconf, &config) else {
            panic!("doveconf accepted an unknown setting");
        };
        let message = format!("{e:#}");
        assert!(message.contains("no_such_setting_here"), "{message}");
        Ok(())
    }

    #[test]
    fn dovecot_users_must_be_full_safe_addresses() {
        assert_eq!(
            normalise_user("Alice@Contoso.TEST").ok().as_deref(),
            Some("alice@contoso.test")
        );
        for bad in [
            "alice",
            "@contoso.test",
            "a:b@contoso.test",
            "../x@contoso.test",
            "a@b/c",
        ] {
            assert!(normalise_user(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn dovecot_reserved_ports_are_distinct_across_calls() -> anyhow::Result<()> {
        let mut seen = HashSet::new();
        for _ in 0..20 {
            for port in reserve_ports(2)? {
                assert!(seen.insert(port), "port {port} handed out twice");
            }
        }
        Ok(())
    }
}
