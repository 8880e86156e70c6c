//! `bench`: runs nodepulse's benchmarks and writes `bench/RESULTS.md` (see the `bench` library).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let opts = bench::Options::parse();
    match bench::run(&opts).await {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: writing {}: {e}", opts.out.display());
            std::process::ExitCode::FAILURE
        }
    }
}
