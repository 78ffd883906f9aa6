//! The `ccmail` command line: the clap definitions and one handler per command. Handlers
//! parse and check what the user typed, call the library, and print; `run` hands over to
//! [`crate::app`]. `main.rs` only parses and dispatches.
//!
//! Invariants: a secret never comes from the command line (`secret_input`); interactive
//! commands log warnings to stderr only, so their stdout stays a clean report.

mod admin;
mod explain;
mod logs;
mod secret_input;
mod work;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::oauth;
use crate::ops::admin::Cloud;
use crate::pop3::TlsMode;
use crate::secrets::MasterKey;
use crate::store;

use logs::init_logs;
use secret_input::{read_secret, seal_for, secret_input, stored_input, stored_secret};

#[derive(Parser)]
#[command(
    name = "ccmail",
    version,
    about = "Contact-center mailboxes into PostgreSQL work items"
)]
pub struct Cli {
    /// Settings file (default: config/ccmail.toml in the working directory, when it exists).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply database migrations.
    Migrate,
    /// Poll every enabled pilot until SIGTERM/SIGINT.
    Run,
    /// OAuth app registrations.
    #[command(subcommand)]
    App(AppCommand),
    /// Mailbox pilots.
    #[command(subcommand)]
    Pilot(PilotCommand),
    /// Check a pilot, an app or explicit settings step by step, with the fix for each failure.
    Doctor(Box<DoctorArgs>),
    /// Master key for secrets stored in the database.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Work items: list, show, requeue, cancel, events.
    #[command(subcommand)]
    Work(work::WorkCommand),
    /// Keys for the agents' HTTP API.
    #[command(subcommand, name = "api-key")]
    ApiKey(work::ApiKeyCommand),
    /// Web console accounts.
    #[command(subcommand)]
    User(work::UserCommand),
    /// Probe a running worker's HTTP listener (container health checks): exit 0 when healthy.
    Healthcheck {
        /// Probe /readyz (database reachable, migrations applied) instead of /healthz.
        #[arg(long)]
        ready: bool,
        /// Address to probe (default: http.listen; 0.0.0.0 is probed on 127.0.0.1).
        #[arg(long)]
        addr: Option<String>,
        #[arg(long, default_value_t = 5)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a new random master key (base64); keep it in CCMAIL_MASTER_KEY or a key file.
    Generate,
    /// Re-seal every stored secret from the configured master key to a new one, in one
    /// transaction, bound to its row (enc:v2; with the current key as the new one, this
    /// upgrades enc:v1 values). Stop the workers first; start them again with the new key.
    Rotate {
        /// File holding the new key (base64 text or 32 raw bytes), e.g. from `key generate`.
        #[arg(long, value_name = "PATH")]
        new_key_file: PathBuf,
    },
}

/// Where a secret comes from. Never the command line: it would land in shell history and `ps`.
#[derive(Args, Debug)]
#[group(required = false, multiple = false)]
struct SecretSource {
    /// Read the secret from standard input (one line).
    #[arg(long)]
    secret_stdin: bool,
    /// Read the secret from this file (trailing newline ignored); it is sealed into the database.
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Store a reference to this environment variable instead of the secret itself.
    #[arg(long, value_name = "NAME")]
    secret_env: Option<String>,
    /// Refused: a secret on the command line leaks into shell history and process lists.
    #[arg(long, hide = true, value_name = "VALUE")]
    secret: Option<String>,
}

/// Where a USER/PASS pilot's password comes from: the same sources as [`SecretSource`], under
/// flags named for the password (`--password-stdin` …; the `--secret-*` names still work),
/// with help that speaks of the password.
#[derive(Args, Debug)]
#[group(required = false, multiple = false)]
struct PasswordSource {
    /// Read the USER/PASS password from standard input (one line).
    #[arg(long = "password-stdin", visible_alias = "secret-stdin")]
    secret_stdin: bool,
    /// Read the USER/PASS password from this file (trailing newline ignored); it is sealed
    /// into the database.
    #[arg(
        long = "password-file",
        visible_alias = "secret-file",
        value_name = "PATH"
    )]
    secret_file: Option<PathBuf>,
    /// Store a reference to this environment variable, which holds the USER/PASS password.
    #[arg(
        long = "password-env",
        visible_alias = "secret-env",
        value_name = "NAME"
    )]
    secret_env: Option<String>,
    /// Refused: a password on the command line leaks into shell history and process lists.
    #[arg(long = "password", alias = "secret", hide = true, value_name = "VALUE")]
    secret: Option<String>,
}

impl From<PasswordSource> for SecretSource {
    fn from(p: PasswordSource) -> SecretSource {
        SecretSource {
            secret_stdin: p.secret_stdin,
            secret_file: p.secret_file,
            secret_env: p.secret_env,
            secret: p.secret,
        }
    }
}

/// A certificate credential instead of a client secret (docs/exchange-online.md, "Certificate
/// credentials").
#[derive(Args, Debug)]
struct CertificateSource {
    /// PEM certificate uploaded to the app registration (Certificates & secrets).
    #[arg(long, value_name = "PEM", requires = "private_key_file")]
    certificate: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8 or PKCS#1 RSA); sealed into the database.
    #[arg(long, value_name = "PEM", requires = "certificate")]
    private_key_file: Option<PathBuf>,
    /// Client-assertion signature: RS256 (header x5t = SHA-1 thumbprint) or PS256 (x5t#S256).
    #[arg(long, default_value_t = oauth::AssertionAlg::Rs256, value_parser = parse_alg)]
    alg: oauth::AssertionAlg,
}

fn parse_alg(s: &str) -> Result<oauth::AssertionAlg, String> {
    oauth::AssertionAlg::parse(s).ok_or_else(|| format!("{s:?}: use RS256 or PS256"))
}

/// Where the token endpoint is.
#[derive(Args, Debug, Default)]
struct CloudArgs {
    /// Microsoft cloud: sets the authority, scope and POP host presets.
    #[arg(long, value_enum)]
    cloud: Option<Cloud>,
    /// Token authority (overrides the cloud preset), e.g. https://login.microsoftonline.com.
    #[arg(long)]
    authority: Option<String>,
    /// Token scope (overrides the cloud preset); must end in /.default.
    #[arg(long)]
    scope: Option<String>,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Register an app: tenant + client id + a client secret or a certificate.
    Add {
        /// A short unique name to refer to the app.
        #[arg(long)]
        name: String,
        /// Tenant id (GUID) or verified domain; not `common`.
        #[arg(long)]
        tenant: String,
        /// Application (client) ID, from the app registration's overview page.
        #[arg(long)]
        client_id: String,
        #[command(flatten)]
        cloud: CloudArgs,
        /// When the client secret (or certificate) expires (YYYY-MM-DD), for the expiry warnings.
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
        #[command(flatten)]
        secret: SecretSource,
        #[command(flatten)]
        certificate: CertificateSource,
    },
    /// List apps (credentials are never shown).
    List {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one app (by name or id).
    Show {
        /// The app's name or id.
        app: String,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change an app's name, tenant, client id, cloud, authority, scope or expiry date.
    Update {
        /// The app's name or id.
        app: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New tenant id (GUID) or verified domain; not `common`.
        #[arg(long)]
        tenant: Option<String>,
        /// New Application (client) ID, from the app registration's overview page.
        #[arg(long)]
        client_id: Option<String>,
        #[command(flatten)]
        cloud: CloudArgs,
        /// When the client secret (or certificate) expires (YYYY-MM-DD), for the expiry warnings.
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
    },
    /// Store a new client secret, or switch to (or renew) a certificate credential.
    RotateSecret {
        /// The app's name or id.
        app: String,
        /// When the new client secret (or certificate) expires (YYYY-MM-DD).
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
        #[command(flatten)]
        secret: SecretSource,
        #[command(flatten)]
        certificate: CertificateSource,
    },
    /// Remove an app that no pilot uses.
    Remove {
        /// The app's name or id.
        app: String,
    },
}

/// Pilot settings shared by `add` and `update` (all optional for `update`).
#[derive(Args, Debug)]
struct PilotSettings {
    /// POP3 server (default: the app's cloud POP host, outlook.office365.com).
    #[arg(long)]
    host: Option<String>,
    /// POP3 port (default 995).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// implicit (port 995, the default), starttls, or dangerous_plaintext (tests only).
    #[arg(long, value_parser = parse_tls)]
    tls: Option<TlsMode>,
    /// Extra PEM CA bundle for this server (on-premises, private CA).
    #[arg(long, value_name = "PEM")]
    ca_bundle: Option<PathBuf>,
    /// Seconds between polls (default 60).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    poll_interval: Option<u64>,
    /// Leave messages on the server after storing them (true/false; default false).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    keep_on_server: Option<bool>,
    /// Largest message downloaded whole, in octets (default 50 MiB); larger ones are stored
    /// as headers and flagged.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_message_bytes: Option<u64>,
}

fn parse_tls(s: &str) -> Result<TlsMode, String> {
    TlsMode::parse(s).ok_or_else(|| format!("{s:?}: use implicit, starttls or dangerous_plaintext"))
}

#[derive(Subcommand)]
enum PilotCommand {
    /// Add a mailbox pilot (Exchange Online defaults: outlook.office365.com:995, implicit TLS).
    Add {
        /// Queue its work items go to.
        #[arg(long)]
        queue: String,
        /// Mailbox address (the XOAUTH2 user).
        #[arg(long)]
        mailbox: String,
        /// App name for XOAUTH2 (Exchange Online). Without it, USER/PASS is used.
        #[arg(long)]
        app: Option<String>,
        /// USER/PASS login name (defaults to the mailbox).
        #[arg(long)]
        username: Option<String>,
        #[command(flatten)]
        settings: PilotSettings,
        #[command(flatten)]
        secret: PasswordSource,
        /// Run `ccmail doctor` against the pilot first and save it only if every step passes.
        #[arg(long)]
        check: bool,
        /// Save it disabled.
        #[arg(long)]
        disabled: bool,
        /// Print the saved pilot as JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// List pilots with their last poll outcome.
    List {
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one pilot (by id or mailbox).
    Show {
        /// The pilot's id or mailbox.
        pilot: String,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a pilot; a running worker restarts its poller within seconds.
    Update {
        /// The pilot's id or mailbox.
        pilot: String,
        /// New queue for its work items.
        #[arg(long)]
        queue: Option<String>,
        /// New mailbox address (the XOAUTH2 user).
        #[arg(long)]
        mailbox: Option<String>,
        /// Log in with this app (XOAUTH2 pilots).
        #[arg(long)]
        app: Option<String>,
        /// Forget the pilot's CA bundle.
        #[arg(long, conflicts_with = "ca_bundle")]
        no_ca_bundle: bool,
        #[command(flatten)]
        settings: PilotSettings,
        #[command(flatten)]
        secret: PasswordSource,
    },
    /// Start polling a pilot again.
    Enable {
        /// The pilot's id or mailbox.
        pilot: String,
    },
    /// Stop polling a pilot (its stored mail stays).
    Disable {
        /// The pilot's id or mailbox.
        pilot: String,
    },
    /// Remove a pilot that has no stored mail (disable it otherwise).
    Remove {
        /// The pilot's id or mailbox.
        pilot: String,
    },
}

#[derive(Args)]
#[command(after_help = crate::ops::doctor::EXIT_CODES)]
struct DoctorArgs {
    /// Check this stored pilot (id or mailbox).
    #[arg(long, conflicts_with_all = ["app", "tenant"])]
    pilot: Option<String>,
    /// Use this stored app (with --mailbox and the server flags).
    #[arg(long, conflicts_with = "tenant")]
    app: Option<String>,
    /// Explicit app: tenant id or domain (with --client-id and a secret or certificate).
    #[arg(long, requires = "client_id")]
    tenant: Option<String>,
    /// Explicit app: the application (client) id (with --tenant).
    #[arg(long)]
    client_id: Option<String>,
    #[command(flatten)]
    cloud: CloudArgs,
    #[command(flatten)]
    secret: DoctorSecret,
    #[command(flatten)]
    certificate: DoctorCertificate,
    /// Mailbox to log into (required unless --pilot).
    #[arg(long)]
    mailbox: Option<String>,
    /// USER/PASS login name instead of XOAUTH2 (with a password source).
    #[arg(long)]
    username: Option<String>,
    #[command(flatten)]
    server: DoctorServer,
    /// Fetch and parse message N after login, without deleting it.
    #[arg(long, value_name = "N")]
    retr: Option<u32>,
    /// Seconds to wait for each network step (default: the [pop3] settings).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Seconds to wait for the server's greeting once connected (default 10).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    greeting_timeout: Option<u64>,
    /// Seconds to wait before a second login after Exchange's generic authentication failure,
    /// to tell a momentary refusal from a persistent one (default 5; 0: no second login).
    #[arg(long, value_name = "SECS")]
    login_retry_pause: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The secret doctor uses once (never stored).
#[derive(Args, Debug)]
#[group(required = false, multiple = false)]
struct DoctorSecret {
    /// Read the client secret or password from standard input (one line).
    #[arg(long)]
    secret_stdin: bool,
    /// Read the client secret or password from this file (trailing newline ignored).
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Read the client secret or password from this environment variable.
    #[arg(long, value_name = "NAME")]
    secret_env: Option<String>,
    /// Refused: a secret on the command line leaks into shell history and process lists.
    #[arg(long, hide = true, value_name = "VALUE")]
    secret: Option<String>,
}

impl DoctorSecret {
    fn source(&self) -> SecretSource {
        SecretSource {
            secret_stdin: self.secret_stdin,
            secret_file: self.secret_file.clone(),
            secret_env: self.secret_env.clone(),
            secret: self.secret.clone(),
        }
    }
}

/// A certificate credential doctor uses once (never stored).
#[derive(Args, Debug)]
struct DoctorCertificate {
    /// PEM certificate uploaded to the app registration (Certificates & secrets).
    #[arg(long, value_name = "PEM", requires = "private_key_file")]
    certificate: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8 or PKCS#1 RSA); read, never stored.
    #[arg(long, value_name = "PEM", requires = "certificate")]
    private_key_file: Option<PathBuf>,
    /// Client-assertion signature: RS256 (header x5t = SHA-1 thumbprint) or PS256 (x5t#S256).
    #[arg(long, default_value_t = oauth::AssertionAlg::Rs256, value_parser = parse_alg)]
    alg: oauth::AssertionAlg,
}

impl DoctorCertificate {
    fn source(&self) -> CertificateSource {
        CertificateSource {
            certificate: self.certificate.clone(),
            private_key_file: self.private_key_file.clone(),
            alg: self.alg,
        }
    }
}

/// The server settings doctor checks (the pilot's, replaced where given).
#[derive(Args, Debug)]
struct DoctorServer {
    /// POP3 server (default: the pilot's, else the app's cloud POP host, outlook.office365.com).
    #[arg(long)]
    host: Option<String>,
    /// POP3 port (default: the pilot's, else 995).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// implicit (port 995, the default), starttls, or dangerous_plaintext (tests only).
    #[arg(long, value_parser = parse_tls)]
    tls: Option<TlsMode>,
    /// Extra PEM CA bundle for this server (on-premises, private CA).
    #[arg(long, value_name = "PEM")]
    ca_bundle: Option<PathBuf>,
    /// Largest message --retr downloads, in octets (default: the pilot's, else 50 MiB).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_message_bytes: Option<u64>,
}

impl DoctorServer {
    fn settings(&self) -> PilotSettings {
        PilotSettings {
            host: self.host.clone(),
            port: self.port,
            tls: self.tls,
            ca_bundle: self.ca_bundle.clone(),
            poll_interval: None,
            keep_on_server: None,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

/// Ends the process with this exit code after the output is written (doctor, `pilot add --check`).
#[derive(Debug)]
pub struct ExitWith(pub u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// Runs `command` to completion on a multi-threaded runtime and turns its outcome into the
/// process's exit code: 0, the code an [`ExitWith`] carries (the command printed its own
/// report), or 1 with the error and its causes on stderr. Shared by the `ccmail` and
/// `ccmail-lab` binaries.
pub fn exit_code_of(command: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ExitWith>() {
            Some(ExitWith(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // A new key needs no settings: it is how an admin replaces a key they cannot load.
        Command::Key(KeyCommand::Generate) => print_new_key(),
        command => with_settings(Config::load(cli.config.as_deref())?, command).await,
    }
}

/// `ccmail key generate`: a new random master key on stdout.
fn print_new_key() -> anyhow::Result<()> {
    println!("{}", MasterKey::generate().to_base64().expose_secret());
    Ok(())
}

/// Runs a command that needs the settings.
async fn with_settings(config: Config, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            init_logs(&config, true);
            store::ensure_database(&config.database.url).await?;
            let pool = store::connect(&config.database.url, 1).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run => run(config).await,
        Command::App(cmd) => admin::app_command(&config, cmd).await,
        Command::Pilot(cmd) => admin::pilot_command(&config, cmd).await,
        Command::Doctor(args) => admin::doctor_command(&config, *args).await,
        Command::Work(cmd) => work::work_command(&config, cmd).await,
        Command::ApiKey(cmd) => work::api_key_command(&config, cmd).await,
        Command::User(cmd) => work::user_command(&config, cmd).await,
        Command::Healthcheck {
            ready,
            addr,
            timeout_secs,
        } => {
            let addr = addr.unwrap_or_else(|| crate::telemetry::probe_address(&config.http.listen));
            let path = if ready { "/readyz" } else { "/healthz" };
            let body =
                crate::telemetry::probe(&addr, path, Duration::from_secs(timeout_secs)).await?;
            println!("{body}");
            Ok(())
        }
        Command::Key(KeyCommand::Generate) => print_new_key(),
        Command::Key(KeyCommand::Rotate { new_key_file }) => {
            init_logs(&config, true);
            let Some(old) = config.master_key() else {
                bail!(
                    "no current master key: set {} (or secrets.master_key_file) to the key the secrets are sealed with",
                    crate::config::MASTER_KEY_ENV
                );
            };
            let new = MasterKey::from_file(&new_key_file)?;
            let pool = store::connect(&config.database.url, 1).await?;
            store::migrate(&pool).await?;
            let mut tx = pool.begin().await?;
            // Every value comes out as enc:v2 bound to its row, so rotating to the current key
            // upgrades the enc:v1 values at once, without a worker.
            let changed = store::reseal_credentials(&mut tx, |owner, stored| {
                crate::secrets::reseal(stored, &old, &new, owner).map_err(|e| e.to_string())
            })
            .await?;
            tx.commit().await?;
            println!(
                "{changed} secret(s) re-sealed from key {} to key {}; start the workers with the new key",
                old.key_id(),
                new.key_id()
            );
            Ok(())
        }
    }
}

/// Raises the soft open-file limit to the hard one: every mailbox, database connection and
/// HTTP client takes a descriptor, and the soft default (often 1,024) is a per-shell habit,
/// not a limit the administrator chose.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit")
            }
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open-file limit is at its hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// `ccmail run`: the service's logs, the open-file limit, then the worker until SIGTERM/SIGINT.
async fn run(config: Config) -> anyhow::Result<()> {
    init_logs(&config, false);
    raise_open_file_limit();
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    // Registered here, before anything starts: a SIGTERM from now on is a clean shutdown,
    // even one that arrives while the worker is still starting.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        wait_for_signal(term).await;
        tracing::info!("shutdown requested; finishing the current messages");
        signals.cancel();
    });
    crate::app::run(&config, shutdown).await
}

async fn wait_for_signal(term: std::io::Result<tokio::signal::unix::Signal>) {
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the worker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
