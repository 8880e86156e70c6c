//! What `/metrics` exports for one sample with every collector's figures: names, labels, types,
//! help texts and values, compared with `fixtures/metrics/exposition.txt`, the contract that
//! alerts, dashboards and scrapers are written against.
//!
//! Regenerate after a deliberate change with `NODEPULSE_BLESS=1 cargo test -p nodepulse-agent
//! --test exposition` and review the diff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nodepulse_agent::Error;
use nodepulse_agent::collect::Sample;
use nodepulse_agent::collect::cpu::CpuUsage;
use nodepulse_agent::collect::disk::{DiskRates, DiskUsage, FilesystemUsage};
use nodepulse_agent::collect::load::LoadFigures;
use nodepulse_agent::collect::memory::MemoryUsage;
use nodepulse_agent::collect::network::{InterfaceRates, NetworkUsage};
use nodepulse_agent::metrics::AgentMetrics;
use nodepulse_crd::wire::Metric;

fn disk(name: &str, k: f64) -> DiskRates {
    DiskRates {
        name: name.into(),
        read_bytes_per_sec: 4096.0 * k,
        write_bytes_per_sec: 8192.0 * k,
        reads_per_sec: k,
        writes_per_sec: 2.0 * k,
    }
}

fn interface(name: &str, k: f64) -> InterfaceRates {
    InterfaceRates {
        name: name.into(),
        rx_bytes_per_sec: 1500.0 * k,
        tx_bytes_per_sec: 500.0 * k,
        rx_packets_per_sec: k,
        tx_packets_per_sec: k / 2.0,
        rx_errors: 3,
        tx_errors: 0,
    }
}

/// A sample with every figure, the disk collector's root filesystem failing.
fn full_sample() -> Sample {
    Sample {
        cpu: Some(CpuUsage {
            busy_percent: 12.5,
            cores: vec![(0, 20.0), (2, 5.25)],
        }),
        memory: Some(MemoryUsage {
            total_bytes: 8 << 30,
            available_bytes: 6 << 30,
            used_percent: 25.0,
            swap_total_bytes: 1 << 30,
            swap_used_bytes: 1 << 20,
        }),
        disk: Some(DiskUsage {
            devices: vec![disk("nvme0n1", 1.0), disk("sda", 0.5)],
            read_bytes_per_sec: Some(6144.0),
            write_bytes_per_sec: Some(12288.0),
            root: Some(FilesystemUsage {
                size_bytes: 100 << 30,
                available_bytes: 29 << 30,
                used_percent: 71.0,
            }),
        }),
        network: Some(NetworkUsage {
            interfaces: vec![interface("ens5", 2.0), interface("eth0", 1.0)],
            rx_bytes_per_sec: Some(4500.0),
            tx_bytes_per_sec: Some(1500.0),
        }),
        load: Some(LoadFigures {
            one: 0.42,
            five: 0.35,
            fifteen: 0.3,
            runnable: 3,
            tasks: 612,
        }),
        errors: vec![(
            Metric::Load,
            Error::Read {
                path: "/proc/loadavg".into(),
                source: std::io::Error::other("gone"),
            },
        )],
        durations: vec![
            (Metric::Cpu, Duration::from_micros(250)),
            (Metric::Memory, Duration::from_micros(125)),
            (Metric::Disk, Duration::from_micros(500)),
            (Metric::Network, Duration::from_micros(375)),
            (Metric::Load, Duration::from_micros(50)),
        ],
        timed_out: Vec::new(),
        duration: Duration::from_micros(1300),
    }
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/metrics")
        .join(name)
}

fn check_golden(name: &str, got: &str) {
    let path = golden(name);
    if std::env::var_os("NODEPULSE_BLESS").is_some() {
        std::fs::write(&path, got).expect("write golden file");
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        got, want,
        "/metrics differs from {path:?}; if the change is deliberate, regenerate with NODEPULSE_BLESS=1"
    );
}

/// The exposition with each family's samples sorted: a family's series come in no fixed
/// order, and scrapers do not care about it.
fn scrape(registry: &prometheus_client::registry::Registry) -> String {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry).expect("encode");
    let mut out = String::new();
    let mut samples: Vec<&str> = Vec::new();
    for line in body.lines() {
        if line.starts_with('#') {
            for s in samples.drain(..) {
                out.push_str(s);
                out.push('\n');
            }
            samples.clear();
            out.push_str(line);
            out.push('\n');
        } else {
            samples.push(line);
            samples.sort_unstable();
        }
    }
    out
}

#[test]
fn every_collector_exports_its_figures() {
    let (metrics, registry) = AgentMetrics::new();
    metrics.record_sample(Arc::new(full_sample()));
    metrics.heartbeat_failures.inc();
    metrics.set_lease_held(true);
    check_golden("exposition.txt", &scrape(&registry));
}

#[test]
fn before_the_first_sample_only_the_agent_itself_is_exported() {
    let (_metrics, registry) = AgentMetrics::new();
    check_golden("before-first-sample.txt", &scrape(&registry));
}

#[test]
fn a_collector_switched_off_leaves_no_series() {
    let (metrics, registry) = AgentMetrics::new();
    metrics.record_sample(Arc::new(full_sample()));
    let only_load = Sample {
        load: full_sample().load,
        durations: vec![(Metric::Load, Duration::from_micros(50))],
        duration: Duration::from_micros(60),
        ..Sample::default()
    };
    metrics.record_sample(Arc::new(only_load));
    check_golden("only-load.txt", &scrape(&registry));
}
