//! nodepulse-agent: parse flags, set up logging, run the library.

use clap::Parser;
use nodepulse_runtime::{LogStream, init_logging};

fn main() -> std::process::ExitCode {
    let args = nodepulse_agent::Args::parse();
    init_logging(args.log_format, LogStream::Stdout, false);
    // One thread is plenty for three light jobs and keeps the footprint small. Nothing on it
    // blocks: log lines go to a thread of their own, the collectors' reads to the blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(nodepulse_agent::collect::deadline::BLOCKING_THREADS)
        .thread_keep_alive(std::time::Duration::from_secs(120))
        .build();
    let result = match runtime {
        Ok(rt) => {
            let result = rt.block_on(nodepulse_agent::run(args));
            // A collector hung on a mount still holds a blocking thread: exit without it.
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        }
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
