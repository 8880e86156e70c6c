//! Measures what one full sample (all five metrics) costs in CPU time, on this machine's /proc.
//!
//! `cargo run --release -p nodepulse-agent --example sample_cost [-- <samples> [proc root]]`

use std::time::Instant;

use nodepulse_agent::collect::{HostPaths, Sampler};
use nodepulse_crd::wire::MetricSet;

/// CPU time this thread has used, in nanoseconds (first field of schedstat).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let root = args.next().unwrap_or_else(|| "/proc".into());
    let mut sampler = Sampler::new(HostPaths::new(root, "/"));
    let all = MetricSet::all();
    // Warm up: the first sample has no previous counters.
    let first = sampler.sample(&all);
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let wall = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut line_len = 0;
    for _ in 0..n {
        let s = sampler.sample(&all);
        line_len += s.log_line(&all).len();
    }
    let cpu = thread_cpu_ns() - cpu0;
    let wall = wall.elapsed();
    println!(
        "{n} samples of all five metrics: {:.1} us CPU per sample, {:.1} us wall per sample (log line ~{} bytes)",
        cpu as f64 / n as f64 / 1000.0,
        wall.as_secs_f64() * 1e6 / n as f64,
        line_len / n as usize
    );
}
