//! The `ccmail` command line. Wiring only: every capability lives in the library.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use ccmail::config::{Config, LogFormat};
use ccmail::ingest::supervisor::{Supervisor, SupervisorSettings};
use ccmail::oauth::{self, CachePolicy, TokenCache, TokenSource, TokenSourceOptions};
use ccmail::pop3::TlsMode;
use ccmail::secrets::MasterKey;
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
    /// Run the whole pipeline against built-in simulators of Exchange Online and Entra ID.
    Demo {
        /// Messages per demo mailbox.
        #[arg(long, default_value_t = 40)]
        messages: usize,
    },
    /// Measure the pipeline against a raw POP3 download of the same mail.
    Bench(ccmail::bench::BenchArgs),
    /// Kill the worker with SIGKILL at random moments while mail keeps arriving, then check
    /// every delivered message was stored exactly once (uses a fresh database, dropped after).
    Soak(SoakArgs),
    /// Serve a filled simulator for `bench` (internal).
    #[command(hide = true)]
    SimServe {
        #[arg(long)]
        messages: usize,
        #[arg(long)]
        seed: u64,
    },
    /// OAuth app registrations.
    #[command(subcommand)]
    App(AppCommand),
    /// Mailbox pilots.
    #[command(subcommand)]
    Pilot(PilotCommand),
    /// Master key for secrets stored in the database.
    #[command(subcommand)]
    Key(KeyCommand),
}

/// `ccmail soak` options (the defaults are the CI short form).
#[derive(Args)]
struct SoakArgs {
    /// Messages delivered while the worker is being killed.
    #[arg(long, default_value_t = 300)]
    messages: usize,
    /// SIGKILLs, each followed by a restart.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Seed of the mail and of the kill schedule (replay a failure with the same seed).
    #[arg(long, default_value_t = 0x50A4)]
    seed: u64,
    /// The worker's log filter; `trace` also proves no secret reaches a trace-level log.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Keep the worker logs in this directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print a new random master key (base64); keep it in CCMAIL_MASTER_KEY or a key file.
    Generate,
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

// Parsed once per run: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum AppCommand {
    /// Register an app (tenant + client id + client secret).
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
        #[arg(long, default_value = oauth::DEFAULT_AUTHORITY)]
        authority: String,
        #[arg(long, default_value = oauth::DEFAULT_SCOPE)]
        scope: String,
        /// When the client secret expires (YYYY-MM-DD), for the expiry alert.
        #[arg(long, value_name = "DATE")]
        secret_expires: Option<chrono::NaiveDate>,
        #[command(flatten)]
        secret: SecretSource,
    },
    /// List apps (secrets are never shown).
    List,
}

// Parsed once per run: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum PilotCommand {
    /// Add a mailbox pilot.
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
        #[arg(long, default_value = store::DEFAULT_HOST)]
        host: String,
        #[arg(long, default_value_t = store::DEFAULT_PORT)]
        port: u16,
        /// implicit (port 995), starttls, or dangerous_plaintext (tests only).
        #[arg(long, default_value = "implicit")]
        tls: String,
        /// Extra PEM CA bundle for this server (on-premises, private CA).
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
        /// USER/PASS login name (defaults to the mailbox).
        #[arg(long)]
        username: Option<String>,
        #[arg(long, default_value_t = 60)]
        poll_interval: u64,
        /// Leave messages on the server after storing them.
        #[arg(long)]
        keep_on_server: bool,
        #[arg(long, default_value_t = store::DEFAULT_MAX_MESSAGE_BYTES)]
        max_message_bytes: u64,
        /// Password source for USER/PASS.
        #[command(flatten)]
        secret: SecretSource,
    },
    /// List pilots with their last poll outcome.
    List,
}

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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
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
        Command::Demo { messages } => {
            init_logs(&config, true);
            let options = ccmail::demo::DemoOptions {
                messages_per_mailbox: messages,
                ..Default::default()
            };
            ccmail::demo::run(&config, &options).await.map(drop)
        }
        Command::Bench(args) => ccmail::bench::run(&config, &args).await,
        Command::Soak(args) => soak(&config, args).await,
        Command::SimServe { messages, seed } => ccmail::bench::serve_sim(messages, seed).await,
        Command::App(cmd) => app_command(&config, cmd).await,
        Command::Pilot(cmd) => pilot_command(&config, cmd).await,
        Command::Key(KeyCommand::Generate) => {
            println!("{}", MasterKey::generate().to_base64().expose_secret());
            Ok(())
        }
    }
}

/// Logs go to stderr. `run` (the service) logs at the settings' level in the settings' format;
/// the interactive commands log text, warnings only unless RUST_LOG says otherwise.
fn init_logs(config: &Config, interactive: bool) {
    let (level, format) = if interactive {
        ("warn", LogFormat::Text)
    } else {
        (config.log.level.as_str(), config.log.format)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // Colours only on a terminal: escape codes in a journal or a log file get in the way of
    // anyone searching it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    init_logs(&config, false);
    let pool = store::connect(&config.database.url, config.database.max_connections).await?;
    store::migrate(&pool).await?;
    let master_key = config.master_key()?;
    let mut options = TokenSourceOptions {
        connect_timeout: Duration::from_secs(config.oauth.connect_timeout_secs),
        total_timeout: Duration::from_secs(config.oauth.total_timeout_secs),
        refresh_ahead: Duration::from_secs(config.oauth.refresh_ahead_secs),
        ..TokenSourceOptions::default()
    };
    if let Some(path) = &config.oauth.extra_ca_file {
        options.extra_roots = ccmail::tls::read_pem_bundle(path)?;
    }
    let tokens = Arc::new(TokenCache::new(
        Arc::new(TokenSource::new(options)?),
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
    Ok(())
}

async fn soak(config: &Config, args: SoakArgs) -> anyhow::Result<()> {
    init_logs(config, true);
    let exe = std::env::current_exe().context("locating the ccmail binary")?;
    let mut options = ccmail::soak::SoakOptions::short(exe, config.database.url.clone());
    options.messages = args.messages;
    options.kills = args.kills;
    options.seed = args.seed;
    options.log_level = args.log_level;
    options.log_dir = args.log_dir;
    let report = ccmail::soak::run(&options).await?;
    println!("{}", report.summary());
    println!("{}", report.kill_points_line());
    report.check()
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

/// Turns a [`SecretSource`] into what is stored: sealed with the master key, or a reference.
fn stored_secret(
    config: &Config,
    source: &SecretSource,
    what: &str,
) -> anyhow::Result<Option<String>> {
    if source.secret.is_some() {
        bail!(
            "refusing a {what} on the command line (it would stay in shell history and process lists); \
             pass it with --secret-stdin, --secret-file PATH, or --secret-env NAME"
        );
    }
    if let Some(name) = &source.secret_env {
        return Ok(Some(format!("env:{name}")));
    }
    let secret = if source.secret_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_to_string(&mut line)
            .context("reading the secret from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else if let Some(path) = &source.secret_file {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the secret from {}", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    } else {
        return Ok(None);
    };
    if secret.is_empty() {
        bail!("the {what} is empty");
    }
    let Some(key) = config.master_key()? else {
        bail!(
            "no master key to seal the {what} with: create one with `ccmail key generate` and set \
             {} (or secrets.master_key_file), or pass --secret-env NAME to store a reference instead",
            ccmail::config::MASTER_KEY_ENV
        );
    };
    Ok(Some(key.seal(&SecretString::from(secret))?))
}

async fn app_command(config: &Config, cmd: AppCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let pool = store::connect(&config.database.url, 1).await?;
    store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        AppCommand::Add {
            name,
            tenant,
            client_id,
            authority,
            scope,
            secret_expires,
            secret,
        } => {
            let Some(credential) = stored_secret(config, &secret, "client secret")? else {
                bail!(
                    "the app needs its client secret: pass --secret-stdin, --secret-file PATH or --secret-env NAME"
                );
            };
            let mut app = store::NewApp::new(&name, &tenant, &client_id, credential);
            app.authority = authority;
            app.scope = scope;
            app.secret_expires_at = secret_expires
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|d| d.and_utc());
            let row = store::insert_app(&mut conn, &app).await?;
            println!("app {} added (id {})", row.name, row.id);
            Ok(())
        }
        AppCommand::List => {
            println!(
                "{:<5} {:<20} {:<38} {:<38} {:<12}",
                "id", "name", "tenant", "client id", "secret expires"
            );
            for a in store::list_apps(&mut conn).await? {
                println!(
                    "{:<5} {:<20} {:<38} {:<38} {:<12}",
                    a.id,
                    a.name,
                    a.tenant,
                    a.client_id,
                    a.secret_expires_at
                        .map(|d| d.date_naive().to_string())
                        .unwrap_or_else(|| "-".to_owned())
                );
            }
            Ok(())
        }
    }
}

async fn pilot_command(config: &Config, cmd: PilotCommand) -> anyhow::Result<()> {
    init_logs(config, true);
    let pool = store::connect(&config.database.url, 1).await?;
    store::migrate(&pool).await?;
    let mut conn = pool.acquire().await?;
    match cmd {
        PilotCommand::Add {
            queue,
            mailbox,
            app,
            host,
            port,
            tls,
            ca_bundle,
            username,
            poll_interval,
            keep_on_server,
            max_message_bytes,
            secret,
        } => {
            let tls = TlsMode::parse(&tls).with_context(|| {
                format!("--tls {tls:?}: use implicit, starttls or dangerous_plaintext")
            })?;
            let auth = match app {
                Some(name) => {
                    let app = store::get_app_by_name(&mut conn, &name).await?;
                    store::PilotAuth::XOAuth2 { app_id: app.id }
                }
                None => {
                    let Some(credential) = stored_secret(config, &secret, "password")? else {
                        bail!(
                            "a pilot without --app logs in with USER/PASS and needs a password: \
                             --secret-stdin, --secret-file PATH or --secret-env NAME"
                        );
                    };
                    store::PilotAuth::UserPass {
                        username: username.unwrap_or_else(|| mailbox.clone()),
                        credential,
                    }
                }
            };
            if let Some(path) = &ca_bundle {
                ccmail::tls::read_pem_bundle(path)?;
            }
            let mut pilot = store::NewPilot::new(&queue, &mailbox, auth);
            pilot.host = host;
            pilot.port = port;
            pilot.tls = tls;
            pilot.ca_bundle = ca_bundle.map(|p| p.display().to_string());
            pilot.poll_interval = Duration::from_secs(poll_interval);
            pilot.keep_on_server = keep_on_server;
            pilot.max_message_bytes = max_message_bytes;
            let row = store::insert_pilot(&mut conn, &pilot).await?;
            println!(
                "pilot {} added (id {}): {} -> queue {}",
                row.mailbox, row.id, row.host, row.queue
            );
            Ok(())
        }
        PilotCommand::List => {
            println!(
                "{:<5} {:<12} {:<34} {:<26} {:<8} {:<20} last error",
                "id", "queue", "mailbox", "server", "enabled", "last success"
            );
            for p in store::list_pilots(&mut conn).await? {
                println!(
                    "{:<5} {:<12} {:<34} {:<26} {:<8} {:<20} {}",
                    p.id,
                    p.queue,
                    p.mailbox,
                    format!("{}:{}", p.host, p.port),
                    if p.enabled { "yes" } else { "no" },
                    p.last_success_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "never".to_owned()),
                    p.last_error.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}
