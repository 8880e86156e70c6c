//! `nodepulsectl`: parse flags, set up diagnostics, run the command, map the outcome to an exit
//! code (documented in `--help`).

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nodepulsectl::cli::{Cli, LogFormat};
use nodepulsectl::error::{EXIT_OK, Error};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let outcome = tokio::select! {
        r = nodepulsectl::run(cli.command) => r,
        // Ctrl-C or SIGTERM is how `watch` normally ends.
        _ = shutdown_signal() => Ok(()),
    };
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

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        // Without a SIGTERM handler the default action (exit) is still fine.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
