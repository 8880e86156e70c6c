//! `nodepulsectl`: parse flags, set up diagnostics, run the command, map the outcome to an exit
//! code (documented in `--help`).

use std::process::ExitCode;

use clap::Parser;
use nodepulse_runtime::{LogStream, ShutdownSignals, init_logging};
use nodepulsectl::cli::Cli;
use nodepulsectl::error::{EXIT_OK, Error};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format, LogStream::Stderr, false);
    let outcome = match ShutdownSignals::install() {
        Ok(mut signals) => tokio::select! {
            r = nodepulsectl::run(cli.global, cli.command) => r,
            // Ctrl-C or SIGTERM is how `watch` normally ends.
            _ = signals.recv() => Ok(()),
        },
        // Without the handlers the default action (exit) still stops `watch`.
        Err(_) => nodepulsectl::run(cli.global, cli.command).await,
    };
    nodepulse_runtime::flush_logs();
    match outcome {
        Ok(()) => ExitCode::from(EXIT_OK),
        // `nodepulsectl watch | head -3`: the reader left, which is not an error worth a message.
        Err(Error::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(EXIT_OK)
        }
        Err(e) => {
            eprintln!("nodepulsectl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
