//! `nodepulse-demo`, which `make demo` runs: the env's scenario on one machine
//! (`testkit::demo`).

use std::process::ExitCode;

use clap::Parser;
use clap::builder::BoolishValueParser;
use testkit::demo::{self, Error, Interrupt, Options};

/// The env's scenario on one machine, against a real etcd on loopback: `nodepulsectl watch`, an
/// agent, a live config push and a kill -9. Ctrl-C stops everything it started.
#[derive(Parser)]
#[command(version)]
struct Flags {
    /// Add kube-apiserver, the CRDs and nodepulse-controller: the config goes in as a
    /// MonitorConfig, and `kubectl get monitornodes` is shown at each step
    #[arg(long, env = "DEMO_K8S", value_parser = BoolishValueParser::new())]
    k8s: bool,
    /// The agent's heartbeat lease TTL, in seconds
    #[arg(long, env = "DEMO_TTL", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    ttl: u64,
    /// Keep every process's output in a directory at the end (kept anyway when the demo fails)
    #[arg(long, env = "DEMO_KEEP", value_parser = BoolishValueParser::new())]
    keep: bool,
    /// The log filter of the processes the demo starts
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    // First, before any thread starts: the signal mask is inherited.
    let interrupt = match Interrupt::install() {
        Ok(interrupt) => interrupt,
        Err(e) => {
            eprintln!("[demo] FAILED: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        k8s: flags.k8s,
        ttl: flags.ttl,
        keep: flags.keep,
        log: flags.log,
    };
    match demo::run(&options, &interrupt) {
        Ok(()) => ExitCode::SUCCESS,
        // As a shell reports a command ended by SIGINT.
        Err(Error::Interrupted) => ExitCode::from(130),
        Err(_) => ExitCode::FAILURE,
    }
}
