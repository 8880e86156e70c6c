//! `/metrics` (Prometheus text), `/healthz` and `/readyz` (ready = heartbeat lease held).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::StatusCode;
use axum::routing::get;
use nodepulse_crd::runtime::{healthz, openmetrics, serve_admin};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::collect::Sample;
use crate::config::AppliedState;
use crate::error::{Error, Result};

type CollectorLabel = [(&'static str, &'static str); 1];

/// The agent's own figures, and the latest sample the node figures are served from.
#[derive(Debug)]
pub struct AgentMetrics {
    /// Heartbeat sessions that ended in an error (etcd away, a put or keep-alive failing).
    pub heartbeat_failures: Counter,
    /// Leases granted again after the previous one was lost.
    pub lease_regrants: Counter,
    /// Config values rejected.
    pub config_rejected: Counter,
    config_revision: Gauge,
    config_interval: Gauge,
    lease_held_gauge: Gauge,
    lease_held: AtomicBool,
    sample_duration: Histogram,
    collector_duration: Family<CollectorLabel, Gauge<f64, AtomicU64>>,
    collector_success: Family<CollectorLabel, Gauge>,
    node: Arc<NodeFigures>,
}

impl AgentMetrics {
    /// Creates the metrics and the registry that serves them.
    pub fn new() -> (Arc<Self>, Registry) {
        let m = Arc::new(AgentMetrics {
            heartbeat_failures: Counter::default(),
            lease_regrants: Counter::default(),
            config_rejected: Counter::default(),
            config_revision: Gauge::default(),
            config_interval: Gauge::default(),
            lease_held_gauge: Gauge::default(),
            lease_held: AtomicBool::new(false),
            sample_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 12)),
            collector_duration: Family::default(),
            collector_success: Family::default(),
            node: Arc::new(NodeFigures::default()),
        });
        let mut r = Registry::default();
        let a = r.sub_registry_with_prefix("nodepulse_agent");
        a.register(
            "heartbeat_failures",
            "Heartbeat sessions that ended in an error (etcd away, a put or keep-alive failing)",
            m.heartbeat_failures.clone(),
        );
        a.register(
            "lease_regrants",
            "Heartbeat leases granted again after the previous one was lost",
            m.lease_regrants.clone(),
        );
        a.register(
            "config_rejected",
            "Config values rejected (the last good one was kept)",
            m.config_rejected.clone(),
        );
        a.register(
            "config_revision",
            "mod_revision of the config key applied (0 on defaults)",
            m.config_revision.clone(),
        );
        a.register(
            "config_interval_seconds",
            "Sampling interval in force",
            m.config_interval.clone(),
        );
        a.register(
            "lease_held",
            "1 while the heartbeat lease is held",
            m.lease_held_gauge.clone(),
        );
        a.register(
            "sample_duration_seconds",
            "Wall time of one sample of the configured metrics",
            m.sample_duration.clone(),
        );
        a.register(
            "collector_duration_seconds",
            "Wall time of each collector in the latest sample",
            m.collector_duration.clone(),
        );
        a.register(
            "collector_success",
            "1 when the collector worked in the latest sample",
            m.collector_success.clone(),
        );
        r.register_collector(Box::new(m.node.clone()));
        (m, r)
    }

    /// Records the configuration in force.
    pub fn set_config(&self, c: &AppliedState) {
        self.config_revision.set(c.revision);
        self.config_interval.set(c.value.interval.into());
    }

    /// Records whether the lease is held (what `/readyz` answers).
    pub fn set_lease_held(&self, held: bool) {
        self.lease_held.store(held, Ordering::Relaxed);
        self.lease_held_gauge.set(held.into());
    }

    /// Whether the lease is held.
    pub fn lease_held(&self) -> bool {
        self.lease_held.load(Ordering::Relaxed)
    }

    /// Records a sample: the agent's timings, and the node figures `/metrics` serves.
    pub fn record_sample(&self, sample: Arc<Sample>) {
        self.sample_duration.observe(sample.duration.as_secs_f64());
        self.collector_duration.clear();
        self.collector_success.clear();
        for (m, d) in &sample.durations {
            let label = [("collector", m.as_str())];
            self.collector_duration
                .get_or_create(&label)
                .set(d.as_secs_f64());
            let ok = !sample.errors.iter().any(|(e, _)| e == m);
            self.collector_success.get_or_create(&label).set(ok.into());
        }
        *self
            .node
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sample);
    }
}

/// The node figures, encoded at scrape time from the latest sample, so that a metric taken out
/// of the config, or a device that went away, disappears from `/metrics` too.
#[derive(Debug, Default)]
struct NodeFigures {
    latest: Mutex<Option<Arc<Sample>>>,
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let me = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(me)
}

fn gauges<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    items: impl Iterator<Item = (&'a str, f64)>,
) -> std::fmt::Result {
    let mut items = items.peekable();
    if items.peek().is_none() {
        return Ok(());
    }
    let mut me = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in items {
        let labels = [(label, value)];
        ConstGauge::new(v).encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeFigures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(s) = self
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        else {
            return Ok(());
        };
        let e = &mut enc;
        if let Some(c) = &s.cpu {
            gauge(
                e,
                "nodepulse_node_cpu_busy_percent",
                "Busy CPU, % of all cores",
                c.busy_percent,
            )?;
            let cores: Vec<(String, f64)> =
                c.cores.iter().map(|(n, p)| (n.to_string(), *p)).collect();
            gauges(
                e,
                "nodepulse_node_cpu_core_busy_percent",
                "Busy % of each core",
                "core",
                cores.iter().map(|(n, p)| (n.as_str(), *p)),
            )?;
        }
        if let Some(m) = &s.memory {
            gauge(
                e,
                "nodepulse_node_memory_total_bytes",
                "Physical memory",
                m.total_bytes as f64,
            )?;
            gauge(
                e,
                "nodepulse_node_memory_available_bytes",
                "Memory available without swapping",
                m.available_bytes as f64,
            )?;
            gauge(
                e,
                "nodepulse_node_memory_used_percent",
                "Memory in use, %",
                m.used_percent,
            )?;
            gauge(
                e,
                "nodepulse_node_swap_total_bytes",
                "Swap space",
                m.swap_total_bytes as f64,
            )?;
            gauge(
                e,
                "nodepulse_node_swap_used_bytes",
                "Swap in use",
                m.swap_used_bytes as f64,
            )?;
        }
        if let Some(d) = &s.disk {
            if let Some(r) = &d.root {
                gauge(
                    e,
                    "nodepulse_node_filesystem_used_percent",
                    "Host root filesystem used, %",
                    r.used_percent,
                )?;
                gauge(
                    e,
                    "nodepulse_node_filesystem_size_bytes",
                    "Host root filesystem size",
                    r.size_bytes as f64,
                )?;
                gauge(
                    e,
                    "nodepulse_node_filesystem_available_bytes",
                    "Host root filesystem space available to users",
                    r.available_bytes as f64,
                )?;
            }
            let dev = || d.devices.iter();
            gauges(
                e,
                "nodepulse_node_disk_read_bytes_per_second",
                "Bytes read per second",
                "device",
                dev().map(|x| (x.name.as_str(), x.read_bytes_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_disk_written_bytes_per_second",
                "Bytes written per second",
                "device",
                dev().map(|x| (x.name.as_str(), x.write_bytes_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_disk_reads_per_second",
                "Reads completed per second (IOPS)",
                "device",
                dev().map(|x| (x.name.as_str(), x.reads_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_disk_writes_per_second",
                "Writes completed per second (IOPS)",
                "device",
                dev().map(|x| (x.name.as_str(), x.writes_per_sec)),
            )?;
        }
        if let Some(n) = &s.network {
            let ifs = || n.interfaces.iter();
            gauges(
                e,
                "nodepulse_node_network_receive_bytes_per_second",
                "Bytes received per second",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.rx_bytes_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_network_transmit_bytes_per_second",
                "Bytes sent per second",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.tx_bytes_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_network_receive_packets_per_second",
                "Packets received per second",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.rx_packets_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_network_transmit_packets_per_second",
                "Packets sent per second",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.tx_packets_per_sec)),
            )?;
            gauges(
                e,
                "nodepulse_node_network_receive_errors",
                "Receive errors since boot",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.rx_errors as f64)),
            )?;
            gauges(
                e,
                "nodepulse_node_network_transmit_errors",
                "Transmit errors since boot",
                "interface",
                ifs().map(|x| (x.name.as_str(), x.tx_errors as f64)),
            )?;
        }
        if let Some(l) = &s.load {
            gauge(e, "nodepulse_node_load1", "One-minute load average", l.one)?;
            gauge(
                e,
                "nodepulse_node_load5",
                "Five-minute load average",
                l.five,
            )?;
            gauge(
                e,
                "nodepulse_node_load15",
                "Fifteen-minute load average",
                l.fifteen,
            )?;
            gauge(
                e,
                "nodepulse_node_tasks_runnable",
                "Runnable tasks",
                l.runnable.into(),
            )?;
            gauge(e, "nodepulse_node_tasks", "All tasks", l.tasks.into())?;
        }
        Ok(())
    }
}

async fn readyz(metrics: Arc<AgentMetrics>) -> (StatusCode, &'static str) {
    if metrics.lease_held() {
        (StatusCode::OK, "ok: heartbeat lease held\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no heartbeat lease held\n",
        )
    }
}

/// Binds the listener now, so that a taken port fails the start rather than later.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    registry: Registry,
) {
    let registry = Arc::new(registry);
    let routes = vec![
        (
            "/metrics",
            get(move || std::future::ready(openmetrics(&registry))),
        ),
        ("/healthz", get(healthz)),
        ("/readyz", get(move || readyz(metrics.clone()))),
    ];
    if let Err(e) = serve_admin(listener, routes).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
