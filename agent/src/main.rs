//! nodepulse-agent: parse flags, set up logging, run the library.

use clap::Parser;
use nodepulse_runtime::{LogStream, init_logging};

fn main() -> std::process::ExitCode {
    let args = nodepulse_agent::Args::parse();
    init_logging(args.log_format, LogStream::Stdout, false);
    // One thread is plenty for three light jobs and keeps the footprint small; samples run on
    // it too (the blocking pool is left to name resolution).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .thread_keep_alive(std::time::Duration::from_secs(120))
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(nodepulse_agent::run(args)),
        Err(e) => {
            tracing::error!("start the async runtime: {e}");
            nodepulse_runtime::flush_logs();
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    };
    nodepulse_runtime::flush_logs();
    code
}
