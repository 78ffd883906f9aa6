//! The `ccmail` binary: parses the command line and dispatches to [`ccmail::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    ccmail::tls::install_crypto_provider();
    let cli = ccmail::cli::Cli::parse();
    ccmail::cli::exit_code_of(ccmail::cli::dispatch(cli))
}
