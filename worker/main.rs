//! The `ccmail` binary: parses the command line and dispatches to [`ccmail::cli`].

use std::process::ExitCode;

use clap::Parser;

use ccmail::cli::{Cli, ExitWith};

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
    match runtime.block_on(ccmail::cli::dispatch(cli)) {
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
