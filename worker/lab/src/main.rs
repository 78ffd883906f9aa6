//! `ccmail-lab`: the demo, the bench and the soak test, run against the simulators.
//!
//! Not shipped: the product binary `ccmail` has none of these subcommands. `soak` drives the
//! real `ccmail` binary as a child (by default the one next to this binary, as `cargo build`
//! leaves it); `bench` starts this binary again as `sim-serve` so the simulator runs in its own
//! process.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use ccmail::config::Config;

#[derive(Parser)]
#[command(
    name = "ccmail-lab",
    version,
    about = "ccmail against simulators of Exchange Online and Entra ID"
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
    /// Run the whole pipeline against built-in simulators of Exchange Online and Entra ID.
    Demo {
        /// Messages per demo mailbox.
        #[arg(long, default_value_t = 40)]
        messages: usize,
    },
    /// Measure the pipeline against a raw POP3 download of the same mail.
    Bench(ccmail_lab::bench::BenchArgs),
    /// Measure how fast agents take work: store-level and HTTP claim/accept/complete cycles.
    BenchWork(ccmail_lab::work_bench::WorkBenchArgs),
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
}

/// `ccmail-lab soak` options (the defaults are the CI short form).
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
    /// The ccmail binary to kill (default: `ccmail` next to this binary).
    #[arg(long)]
    worker: Option<PathBuf>,
}

fn main() -> ExitCode {
    ccmail::tls::install_crypto_provider();
    let cli = Cli::parse();
    ccmail::cli::exit_code_of(dispatch(cli))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Demo { messages } => {
            init_logs();
            let options = ccmail_lab::demo::DemoOptions {
                messages_per_mailbox: messages,
                ..Default::default()
            };
            ccmail_lab::demo::run(&config, &options).await.map(drop)
        }
        Command::Bench(args) => ccmail_lab::bench::run(&config, &args).await,
        Command::BenchWork(args) => ccmail_lab::work_bench::run(&args).await,
        Command::Soak(args) => soak(&config, args).await,
        Command::SimServe { messages, seed } => ccmail_lab::bench::serve_sim(messages, seed).await,
    }
}

/// Text logs on stderr, warnings only unless RUST_LOG says otherwise; field values escaped
/// ([`ccmail::display::EscapedFields`]) because error text may quote a server.
fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .fmt_fields(ccmail::display::EscapedFields)
        .init();
}

/// The `ccmail` binary next to this one (`cargo build` puts both in the same directory).
fn sibling_worker() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the ccmail-lab binary")?;
    let worker = exe.with_file_name("ccmail");
    anyhow::ensure!(
        worker.is_file(),
        "no ccmail binary at {}; run `cargo build` first or pass --worker",
        worker.display()
    );
    Ok(worker)
}

async fn soak(config: &Config, args: SoakArgs) -> anyhow::Result<()> {
    init_logs();
    let exe = match args.worker {
        Some(path) => path,
        None => sibling_worker()?,
    };
    let mut options = ccmail_lab::soak::SoakOptions::short(exe, config.database.url.clone());
    options.messages = args.messages;
    options.kills = args.kills;
    options.seed = args.seed;
    options.log_level = args.log_level;
    options.log_dir = args.log_dir;
    let report = ccmail_lab::soak::run(&options).await?;
    println!("{}", report.summary());
    println!("{}", report.kill_points_line());
    report.check()
}
