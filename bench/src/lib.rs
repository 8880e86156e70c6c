//! nodepulse's benchmarks, measured side by side in one run and written to `bench/RESULTS.md`:
//!
//! 1. [`footprint`]: the agent's CPU per sample and RSS against prometheus/node_exporter and the
//!    OpenTelemetry Collector's hostmetrics receiver;
//! 2. [`propagation`]: etcd put -> agent applied, and `kubectl apply` -> agent applied;
//! 3. [`failure`]: SIGKILL of an agent -> MonitorNode Dead, and the controller's own share;
//! 4. [`scale`]: thousands of simulated nodes ([`loadgen`]) against one etcd, the controller and
//!    a real kube-apiserver;
//! 5. [`truth`]: faults (agent crash and restart, slow etcd writes, etcd away or rebuilt, a
//!    controller restart) -> false Dead, missed Dead and the time until every status is true.
//!
//! Every phase prints a progress line so a person sees the run is alive. A phase that cannot run
//! (a binary missing, a server refusing) becomes a "not measured" row with the reason, and the
//! other phases still run.

pub mod capacity;
pub mod cluster;
pub mod failure;
pub mod footprint;
pub mod loadgen;
pub mod proc_usage;
pub mod prom;
pub mod propagation;
pub mod report;
pub mod sample_cost;
pub mod scale;
pub mod stats;
pub mod truth;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

/// Why a benchmark phase could not produce its figures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workspace binary has not been built.
    #[error("{0} is not built: run `cargo build --release --workspace --bins` first")]
    NotBuilt(String),
    /// An optional test tool that `make bench` builds has not been built on this machine.
    #[error("{0} is not built: run `hack/tools.sh {0}` (`make bench` does)")]
    ToolNotBuilt(String),
    /// Reading /proc failed (the process exited?).
    #[error("/proc: {0}")]
    Proc(String),
    /// An etcd request failed.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A Kubernetes API request failed.
    #[error("kube-apiserver: {0}")]
    Kube(String),
    /// A process did not do what the phase waited for in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A process exited or answered unexpectedly.
    #[error("{0}")]
    Unexpected(String),
}

/// Result with the bench's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Flags of the `bench` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench",
    about = "nodepulse benchmarks: footprint vs node_exporter and otelcol, config propagation, failure detection, scale, truth under faults"
)]
pub struct Options {
    /// Where to write the results table.
    #[arg(long, env = "BENCH_OUT", default_value = "bench/RESULTS.md")]
    pub out: PathBuf,
    /// Tiny sizes and few iterations (seconds, not minutes): proves every phase still produces
    /// numbers, says nothing about performance.
    #[arg(long, env = "BENCH_SMOKE")]
    pub smoke: bool,
    /// Run only these phases (comma-separated: footprint, propagation, failure, scale, truth).
    #[arg(long, env = "BENCH_ONLY", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Node counts for the scale phase.
    #[arg(
        long,
        env = "BENCH_SCALE_NODES",
        value_delimiter = ',',
        default_value = "1000,5000,10000"
    )]
    pub scale_nodes: Vec<usize>,
}

impl Options {
    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

/// Prints one progress line with the time since the run started.
pub fn progress(start: Instant, msg: impl std::fmt::Display) {
    println!("[{:>6.1}s] {msg}", start.elapsed().as_secs_f64());
}

/// Runs the selected phases and writes the report; returns the sections (the smoke test reads
/// whether each has figures).
pub async fn run(opts: &Options) -> Result<Vec<report::Section>, std::io::Error> {
    let start = Instant::now();
    let command = if opts.smoke {
        format!("bench --smoke --out {}", opts.out.display())
    } else {
        "make bench".to_string()
    };
    let env = report::Environment::detect(&command);
    progress(start, format!("bench starting ({})", env.machine));
    let mut sections = Vec::new();

    if opts.wants("footprint") {
        progress(
            start,
            "phase 1/5: agent footprint against node_exporter and otelcol",
        );
        sections.extend(footprint::run(opts, start).await);
    }
    // Phases 2 (kubectl half) and 3 share one API server and controller.
    let shared = if opts.wants("propagation") || opts.wants("failure") {
        progress(
            start,
            "starting etcd, kube-apiserver and the controller for phases 2-3",
        );
        Some(cluster::Cluster::start().await)
    } else {
        None
    };
    if opts.wants("propagation") {
        progress(start, "phase 2/5: config propagation");
        sections.extend(propagation::run(opts, start, shared.as_ref()).await);
    }
    if opts.wants("failure") {
        progress(start, "phase 3/5: failure detection");
        sections.push(failure::run(opts, start, shared.as_ref()).await);
    }
    drop(shared);
    if opts.wants("scale") {
        progress(start, "phase 4/5: scale");
        sections.push(scale::run(opts, start).await);
    }
    if opts.wants("truth") {
        progress(start, "phase 5/5: truth under faults");
        sections.push(truth::run(opts, start).await);
    }

    let intro = format!(
        "{} The whole run took {:.1} minutes.",
        intro(opts),
        start.elapsed().as_secs_f64() / 60.0
    );
    let text = report::render(&env, &intro, &sections);
    report::write(&opts.out, &text)?;
    progress(
        start,
        format!(
            "done in {:.0} s: wrote {}",
            start.elapsed().as_secs_f64(),
            opts.out.display()
        ),
    );
    Ok(sections)
}

fn intro(opts: &Options) -> String {
    let mut s = String::from(
        "All figures come from one run on one shared machine: absolute numbers move from run to run, \
         the ratios between nodepulse and the tool beside it are what counts. Every server is real \
         (etcd, kube-apiserver, node_exporter as released, the OpenTelemetry Collector built from \
         its released modules), on 127.0.0.1.",
    );
    if opts.smoke {
        s.push_str(
            " **This is a smoke run** (tiny sizes, few iterations): it proves each benchmark still \
             produces numbers and says nothing about performance.",
        );
    }
    s
}
