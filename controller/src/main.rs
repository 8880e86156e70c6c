//! nodepulse-controller's entry point: flags, logging, then the library.

use clap::Parser;
use nodepulse_controller::Args;
use nodepulse_runtime::{LogStream, init_logging};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_logging(args.log_format, LogStream::Stdout, true);
    let code = match nodepulse_controller::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    };
    nodepulse_runtime::flush_logs();
    code
}
