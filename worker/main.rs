//! The `ccmail` command line. Wiring only: every capability lives in the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod admin_cli;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use ccmail::admin::Cloud;
use ccmail::config::{Config, LogFormat};
use ccmail::ingest::supervisor::{Supervisor, SupervisorSettings};
use ccmail::oauth::{self, CachePolicy, TokenCache, TokenSource};
use ccmail::pop3::TlsMode;
use ccmail::secrets::{CredentialPolicy, MasterKey, Owner};
use ccmail::store;

#[derive(Parser)]
#[command(
    name = "ccmail",
    version,
    about = "Contact-center mailboxes into PostgreSQL work items"
)]
struct Cli {
    /// Settings file (default: config/ccmail.toml when it exists).
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

/// A certificate credential instead of a client secret (EXCHANGE.md, "Certificate credentials").
#[derive(Args, Debug)]
struct CertificateSource {
    /// PEM certificate uploaded to the app registration (Certificates & secrets).
    #[arg(long, value_name = "PEM", requires = "private_key_file")]
    certificate: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8 or PKCS#1 RSA); sealed into the database.
    #[arg(long, value_name = "PEM", requires = "certificate")]
    private_key_file: Option<PathBuf>,
    /// Client-assertion signature: RS256 (header x5t = SHA-1 thumbprint) or PS256 (x5t#S256).
    #[arg(long, default_value = "RS256", value_parser = parse_alg)]
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
        /// Application (client) id.
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
        #[arg(long)]
        json: bool,
    },
    /// Show one app (by name or id).
    Show {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Change an app's name, tenant, client id, cloud, authority, scope or expiry date.
    Update {
        app: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        client_id: Option<String>,
        #[command(flatten)]
        cloud: CloudArgs,
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
    },
    /// Store a new client secret, or switch to (or renew) a certificate credential.
    RotateSecret {
        app: String,
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
        #[command(flatten)]
        secret: SecretSource,
        #[command(flatten)]
        certificate: CertificateSource,
    },
    /// Remove an app that no pilot uses.
    Remove { app: String },
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
        /// Password source for USER/PASS.
        #[command(flatten)]
        secret: SecretSource,
        /// Run `ccmail doctor` against the pilot first and save it only if every step passes.
        #[arg(long)]
        check: bool,
        /// Save it disabled.
        #[arg(long)]
        disabled: bool,
        #[arg(long)]
        json: bool,
    },
    /// List pilots with their last poll outcome.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one pilot (by id or mailbox).
    Show {
        pilot: String,
        #[arg(long)]
        json: bool,
    },
    /// Change a pilot; a running worker restarts its poller within seconds.
    Update {
        pilot: String,
        #[arg(long)]
        queue: Option<String>,
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
        /// New password source (USER/PASS pilots).
        #[command(flatten)]
        secret: SecretSource,
    },
    /// Start polling a pilot again.
    Enable { pilot: String },
    /// Stop polling a pilot (its stored mail stays).
    Disable { pilot: String },
    /// Remove a pilot that has no stored mail (disable it otherwise).
    Remove { pilot: String },
}

#[derive(Args)]
#[command(after_help = ccmail::doctor::EXIT_CODES)]
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
    #[arg(long)]
    client_id: Option<String>,
    #[command(flatten)]
    cloud: CloudArgs,
    #[command(flatten)]
    secret: SecretSource,
    #[command(flatten)]
    certificate: CertificateSource,
    /// Mailbox to log into (required unless --pilot).
    #[arg(long)]
    mailbox: Option<String>,
    /// USER/PASS login name instead of XOAUTH2 (with a password source).
    #[arg(long)]
    username: Option<String>,
    #[command(flatten)]
    settings: PilotSettings,
    /// Fetch and parse message N after login, without deleting it.
    #[arg(long, value_name = "N")]
    retr: Option<u32>,
    /// Seconds to wait for each network step (default: the [pop3] settings).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    #[arg(long)]
    json: bool,
}

/// Ends the process with this exit code after the output is written (doctor, `pilot add --check`).
#[derive(Debug)]
struct ExitWith(u8);

impl std::fmt::Display for ExitWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

fn main() -> ExitCode {
    ccmail::tls::install_crypto_provider();
    let cli = Cli::parse();
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
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ExitWith>() {
            // The command printed its own report; only the code is left to pass on.
            Some(ExitWith(code)) => ExitCode::from(*code),
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => {
            init_logs(&config, true);
            store::ensure_database(&config.database.url).await?;
            let pool = store::connect(&config.database.url, 1).await?;
            store::migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Run => run(config).await,
        Command::App(cmd) => admin_cli::app_command(&config, cmd).await,
        Command::Pilot(cmd) => admin_cli::pilot_command(&config, cmd).await,
        Command::Doctor(args) => admin_cli::doctor_command(&config, *args).await,
        Command::Healthcheck {
            ready,
            addr,
            timeout_secs,
        } => {
            let addr = addr.unwrap_or_else(|| ccmail::metrics::probe_address(&config.http.listen));
            let path = if ready { "/readyz" } else { "/healthz" };
            let body =
                ccmail::metrics::probe(&addr, path, Duration::from_secs(timeout_secs)).await?;
            println!("{body}");
            Ok(())
        }
        Command::Key(KeyCommand::Generate) => {
            println!("{}", MasterKey::generate().to_base64().expose_secret());
            Ok(())
        }
        Command::Key(KeyCommand::Rotate { new_key_file }) => {
            init_logs(&config, true);
            let Some(old) = config.master_key()? else {
                bail!(
                    "no current master key: set {} (or secrets.master_key_file) to the key the secrets are sealed with",
                    ccmail::config::MASTER_KEY_ENV
                );
            };
            let new = MasterKey::from_file(&new_key_file)?;
            let pool = store::connect(&config.database.url, 1).await?;
            store::migrate(&pool).await?;
            let mut tx = pool.begin().await?;
            // Every value comes out as enc:v2 bound to its row, so rotating to the current key
            // upgrades the enc:v1 values at once, without a worker.
            let changed = store::reseal_credentials(&mut tx, |owner, stored| {
                ccmail::secrets::reseal(stored, &old, &new, owner).map_err(|e| e.to_string())
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

/// Libraries whose debug and trace events copy mail content: html5ever (through the `log`
/// bridge) logs every token and text node the sanitiser parses, 100 times the mail's size.
/// They are held at `warn` whatever the level, unless the filter names them itself.
const CONTENT_COPYING_TARGETS: [&str; 2] = ["html5ever", "markup5ever"];

/// The log filter: `RUST_LOG`, else `level`, with [`CONTENT_COPYING_TARGETS`] capped at `warn`
/// unless the filter mentions them.
fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let named = filter.to_string();
    for target in CONTENT_COPYING_TARGETS {
        if !named.contains(target)
            && let Ok(directive) = format!("{target}=warn").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Logs go to stderr. `run` (the service) logs at the settings' level in the settings' format;
/// the interactive commands log text, warnings only unless RUST_LOG says otherwise. Text logs
/// escape every field value ([`ccmail::display::EscapedFields`]): error text may quote a
/// server. JSON needs no help (control characters are escaped by the JSON encoder).
fn init_logs(config: &Config, interactive: bool) {
    let (level, format) = if interactive {
        ("warn", LogFormat::Text)
    } else {
        (config.log.level.as_str(), config.log.format)
    };
    // Colours only on a terminal: escape codes in a journal or a log file get in the way of
    // anyone searching it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(level))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.fmt_fields(ccmail::display::EscapedFields).init(),
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

async fn run(config: Config) -> anyhow::Result<()> {
    init_logs(&config, false);
    raise_open_file_limit();
    let pool = store::connect(&config.database.url, config.database.max_connections).await?;
    // Bound before migrating so a container probe sees the process alive during a long
    // migration, and a port conflict is reported before any work starts.
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} for /metrics, /healthz and /readyz (set http.listen or CCMAIL_HTTP_LISTEN to a free address)",
                config.http.listen
            )
        })?;
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener has no local address"),
    }
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(ccmail::metrics::serve(
        listener,
        pool.clone(),
        config.http_limits(),
        http_stop.clone(),
    ));
    tokio::spawn(ccmail::metrics::refresh_loop(
        pool.clone(),
        Duration::from_secs(15),
        http_stop.clone(),
    ));
    store::migrate(&pool).await?;
    let master_key = config.master_key()?;
    let tokens = Arc::new(TokenCache::new(
        Arc::new(TokenSource::new(config.token_source_options()?)?),
        CachePolicy::default(),
    ));
    let supervisor = Supervisor::new(
        pool,
        tokens,
        SupervisorSettings::from_config(&config),
        master_key,
    );
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing the current messages");
        signals.cancel();
    });
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "ccmail worker started");
    supervisor.run(shutdown).await;
    // Metrics stay available until the pollers have drained.
    http_stop.cancel();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP listener failed"),
        Err(e) => tracing::warn!(error = %e, "HTTP listener task failed"),
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
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

/// What a [`SecretSource`] gave: a reference to keep as it is, or the secret itself.
pub(crate) enum SecretInput {
    Reference(String),
    Value(SecretString),
}

/// Reads a [`SecretSource`]: refuses a secret on the command line, reads stdin or a file
/// (trailing newline dropped; never a special file such as `/proc/self/environ`, never more
/// than a secret's size), or names an environment variable that `policy` allows. `None` when
/// none was given.
pub(crate) fn secret_input(
    source: &SecretSource,
    what: &str,
    policy: &CredentialPolicy,
) -> anyhow::Result<Option<SecretInput>> {
    if source.secret.is_some() {
        bail!(
            "refusing a {what} on the command line (it would stay in shell history and process lists); \
             pass it with --secret-stdin, --secret-file PATH, or --secret-env NAME"
        );
    }
    if let Some(name) = &source.secret_env {
        policy.references.check_env(name)?;
        return Ok(Some(SecretInput::Reference(format!("env:{name}"))));
    }
    let secret = if source.secret_stdin {
        let mut line = String::new();
        std::io::stdin()
            .take(ccmail::secrets::MAX_SECRET_FILE_BYTES + 1)
            .read_to_string(&mut line)
            .context("reading the secret from standard input")?;
        if line.len() as u64 > ccmail::secrets::MAX_SECRET_FILE_BYTES {
            bail!(
                "the {what} on standard input is larger than {} KiB; a secret is a few KiB",
                ccmail::secrets::MAX_SECRET_FILE_BYTES / 1024
            );
        }
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else if let Some(path) = &source.secret_file {
        ccmail::secrets::read_secret_file(path, None)?
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    } else {
        return Ok(None);
    };
    if secret.is_empty() {
        bail!("the {what} is empty");
    }
    Ok(Some(SecretInput::Value(SecretString::from(secret))))
}

/// Turns a [`SecretSource`] into what is stored for `owner`: sealed with the master key for
/// it, or a reference.
fn stored_secret(
    config: &Config,
    source: &SecretSource,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<Option<String>> {
    match secret_input(source, what, &config.credential_policy())? {
        None => Ok(None),
        Some(input) => stored_input(config, input, what, owner).map(Some),
    }
}

/// What is stored for `input`: the reference as it is, or the secret sealed for `owner`.
fn stored_input(
    config: &Config,
    input: SecretInput,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<String> {
    match input {
        SecretInput::Reference(reference) => Ok(reference),
        SecretInput::Value(secret) => seal_for(config, &secret, what, owner),
    }
}

/// `secret` sealed for `owner` with the configured master key.
fn seal_for(
    config: &Config,
    secret: &SecretString,
    what: &str,
    owner: &Owner,
) -> anyhow::Result<String> {
    let Some(key) = config.master_key()? else {
        bail!(
            "no master key to seal the {what} with: create one with `ccmail key generate` and set \
             {} (or secrets.master_key_file), or pass --secret-env NAME to store a reference instead",
            ccmail::config::MASTER_KEY_ENV
        );
    };
    Ok(key.seal(secret, owner)?)
}

/// A secret for immediate use (doctor): read or resolved under `policy`, never stored.
fn read_secret(
    source: &SecretSource,
    what: &str,
    policy: &CredentialPolicy,
) -> anyhow::Result<Option<SecretString>> {
    Ok(match secret_input(source, what, policy)? {
        None => None,
        Some(SecretInput::Reference(reference)) => Some(
            ccmail::secrets::SecretRef::parse(&reference)?.resolve_reference(&policy.references)?,
        ),
        Some(SecretInput::Value(secret)) => Some(secret),
    })
}
