//! Measures etcd put -> config applied (the agent's "config updated" line) over 200 changes,
//! against a real etcd and the real agent binary.
//!
//! `cargo build -p nodepulse-agent && cargo run -p nodepulse-agent --example config_latency`

use std::time::{Duration, Instant};

use testkit::{Etcd, Launch};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let changes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = Launch::agent("latency-1").etcd(&etcd.endpoint).spawn();
    agent.wait_for_line(Duration::from_secs(10), "lease granted", |l| {
        l.contains("heartbeat lease granted")
    });
    let mut latencies = Vec::with_capacity(changes);
    for i in 0..changes {
        let interval = 2 + i % 50;
        let value = format!(r#"{{"interval": {interval}, "metrics": ["cpu", "memory"]}}"#);
        let from = agent.line_count();
        let put_at = Instant::now();
        let rev = client
            .put("/monitor/config/latency-1", value, None)
            .await
            .expect("put")
            .header()
            .expect("header")
            .revision();
        let want = format!("(revision {rev})");
        let (_, line) = agent.wait_for_line_from(from, Duration::from_secs(5), "applied", |l| {
            l.contains("config updated") && l.contains(&want)
        });
        latencies.push(line.at.saturating_duration_since(put_at));
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)];
    println!(
        "{changes} config changes, put -> applied: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
}
