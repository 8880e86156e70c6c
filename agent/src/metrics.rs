//! The agent's Prometheus registry: its own figures (heartbeat, configuration, sampling), and
//! the node figures of the latest sample, which each collector exports itself
//! ([`crate::collect`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use nodepulse_crd::wire::Metric;

use crate::collect::Sample;

/// 0.1 ms doubling up to 204.8 ms. Written out rather than computed with
/// `exponential_buckets`, whose `powf` was the only function the agent took from libm: without
/// it the C math library is not loaded at all (0.4 MiB of the agent's resident memory).
const SAMPLE_DURATION_BUCKETS: [f64; 12] = [
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
];

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
    /// Per collector, in `Metric::ALL`'s order.
    collector_timeouts: [Counter; 5],
    latest: Arc<LatestSample>,
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
            sample_duration: Histogram::new(SAMPLE_DURATION_BUCKETS),
            collector_timeouts: Default::default(),
            latest: Arc::default(),
        });
        let mut r = Registry::default();
        r.register_collector(Box::new(NodeFigures(m.latest.clone())));
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
        a.register_collector(Box::new(CollectorFigures(m.latest.clone())));
        a.register_collector(Box::new(CollectorTimeouts(m.collector_timeouts.clone())));
        a.register_collector(Box::new(LogLinesDropped));
        (m, r)
    }

    /// Records the configuration in force: the config key's `mod_revision` (0 on defaults) and
    /// the sampling interval.
    pub fn set_config(&self, revision: i64, interval_seconds: u32) {
        self.config_revision.set(revision);
        self.config_interval.set(interval_seconds.into());
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

    /// Records a sample: its duration, and the figures `/metrics` serves until the next one.
    pub fn record_sample(&self, sample: Arc<Sample>) {
        self.sample_duration.observe(sample.duration.as_secs_f64());
        self.record_timeouts(&sample);
        *self.latest.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(sample);
    }
}

impl AgentMetrics {
    /// Counts the collectors that ran past their deadline in `sample`; for a sample that is not
    /// recorded otherwise (the one that primes the counters rates need).
    pub fn record_timeouts(&self, sample: &Sample) {
        for m in &sample.timed_out {
            self.collector_timeouts[crate::collect::slot(*m)].inc();
        }
    }
}

/// The latest sample. Its figures are encoded at scrape time, so that a metric taken out of the
/// config, or a device that went away, disappears from `/metrics` too.
#[derive(Debug, Default)]
struct LatestSample(Mutex<Option<Arc<Sample>>>);

impl LatestSample {
    fn get(&self) -> Option<Arc<Sample>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The node figures, as each collector exports them.
#[derive(Debug)]
struct NodeFigures(Arc<LatestSample>);

impl Collector for NodeFigures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        match self.0.get() {
            Some(sample) => sample.encode(&mut enc),
            None => Ok(()),
        }
    }
}

/// How each collector fared in the latest sample.
#[derive(Debug)]
struct CollectorFigures(Arc<LatestSample>);

impl Collector for CollectorFigures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(sample) = self.0.get() else {
            return Ok(());
        };
        let mut duration = enc.encode_descriptor(
            "collector_duration_seconds",
            "Wall time of each collector in the latest sample.",
            None,
            MetricType::Gauge,
        )?;
        for (m, d) in &sample.durations {
            let label = [("collector", m.as_str())];
            ConstGauge::new(d.as_secs_f64()).encode(duration.encode_family(&label)?)?;
        }
        let mut success = enc.encode_descriptor(
            "collector_success",
            "1 when the collector worked in the latest sample.",
            None,
            MetricType::Gauge,
        )?;
        for (m, _) in &sample.durations {
            let label = [("collector", m.as_str())];
            let ok = !sample.errors.iter().any(|(e, _)| e == m);
            ConstGauge::new(i64::from(ok)).encode(success.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// Collectors that ran past their deadline, each counted once per hang (not once per sample it
/// then misses), every collector from 0.
#[derive(Debug)]
struct CollectorTimeouts([Counter; 5]);

impl Collector for CollectorTimeouts {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut timeouts = enc.encode_descriptor(
            "collector_timeouts",
            "Collectors that did not answer within their deadline (a hung mount or /proc read).",
            None,
            MetricType::Counter,
        )?;
        for (m, count) in Metric::ALL.iter().zip(&self.0) {
            let label = [("collector", m.as_str())];
            ConstCounter::new(count.get()).encode(timeouts.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// Log lines dropped because the output (a container log pipe) did not keep up: the agent drops
/// lines rather than let a stalled pipe stop its keep-alives.
#[derive(Debug)]
struct LogLinesDropped;

impl Collector for LogLinesDropped {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let dropped = enc.encode_descriptor(
            "log_lines_dropped",
            "Log lines dropped because the log output did not keep up.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(nodepulse_runtime::log_lines_dropped()).encode(dropped)
    }
}
