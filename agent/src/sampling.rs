//! The sampling loop: one sample per interval, logged in one line, published to `/metrics` and
//! to the heartbeat; the interval's sleep is cut short when the configuration changes. The reads
//! themselves run off the runtime's thread, each collector within a deadline
//! ([`crate::collect::deadline`]): a hung one costs its figures, never the heartbeat.

use std::sync::Arc;
use std::time::Duration;

use nodepulse_crd::wire::{Metric, MetricSet, UsageSummary};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::alarm::Alarm;
use crate::collect::deadline::TimedSampler;
use crate::config::SharedConfig;
use crate::metrics::AgentMetrics;

/// The first sample comes this soon after start (rates need two readings), then one per interval.
const FIRST_SAMPLE_AFTER: Duration = Duration::from_secs(1);

/// Samples until the task is dropped.
pub async fn run(
    mut sampler: TimedSampler,
    config: Arc<SharedConfig>,
    usage: watch::Sender<Option<UsageSummary>>,
    metrics: Arc<AgentMetrics>,
) {
    let mut changed = config.subscribe();
    let mut config_open = true;
    // Prime the counters rates are computed from, so the first logged sample has them all.
    let primer = sampler.sample(&MetricSet::all()).await;
    metrics.record_timeouts(&primer);
    let mut last = Instant::now();
    let mut next = last + FIRST_SAMPLE_AFTER.min(config.schedule().0);
    let mut first = true;
    let mut last_errors: Vec<(Metric, String)> = Vec::new();
    let mut alarm = Alarm::new();
    loop {
        tokio::select! {
            _ = alarm.sleep_until(next) => {}
            r = changed.changed(), if config_open => {
                config_open = r.is_ok();
                // A new interval counts from the last sample; when that moment has passed
                // already, sample at once.
                let (interval, _) = config.schedule();
                let wait = if first { FIRST_SAMPLE_AFTER.min(interval) } else { interval };
                next = (last + wait).max(Instant::now());
                continue;
            }
        }
        let (interval, metrics_set) = config.schedule();
        let sample = sampler.sample(&metrics_set).await;
        last = Instant::now();
        first = false;
        info!("{}", sample.log_line(&metrics_set));
        let errors: Vec<(Metric, String)> = sample
            .errors
            .iter()
            .map(|(m, e)| (*m, e.to_string()))
            .collect();
        if errors != last_errors {
            for (m, e) in &errors {
                warn!("sampling: {m} collector failed: {e}");
            }
            last_errors = errors;
        }
        usage.send_replace(Some(sample.summary()));
        metrics.record_sample(Arc::new(sample));
        next += interval;
        if next < last {
            // Fell behind (a suspended VM, a very slow /proc): no burst to catch up.
            next = last + interval;
        }
    }
}
