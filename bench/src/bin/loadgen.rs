//! `loadgen`: many simulated nodepulse agents in one process (see `bench::loadgen`).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = bench::loadgen::LoadgenArgs::parse();
    match bench::loadgen::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
