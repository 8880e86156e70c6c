//! The sampling loop: one sample per interval, logged in one line, published to `/metrics` and
//! to the heartbeat; the interval's sleep is cut short when the configuration changes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use nodepulse_crd::wire::{Metric, MetricSet, UsageSummary};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::alarm::Alarm;
use crate::collect::{Sample, Sampler};
use crate::config::SharedConfig;
use crate::metrics::AgentMetrics;

/// The first sample comes this soon after start (rates need two readings), then one per interval.
const FIRST_SAMPLE_AFTER: Duration = Duration::from_secs(1);

/// Samples until the task is dropped.
pub async fn run(
    mut sampler: Sampler,
    config: Arc<SharedConfig>,
    usage: watch::Sender<Option<UsageSummary>>,
    metrics: Arc<AgentMetrics>,
) {
    let mut changed = config.subscribe();
    let mut config_open = true;
    // Prime the counters rates are computed from, so the first logged sample has them all.
    take_sample(&mut sampler, &MetricSet::all());
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
        let sample = take_sample(&mut sampler, &metrics_set);
        last = Instant::now();
        first = false;
        let Some(sample) = sample else {
            warn!("sampling: a sample failed unexpectedly; starting over with fresh counters");
            sampler = Sampler::new(sampler.paths().clone());
            next = last + interval;
            continue;
        };
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

/// Takes one sample on the runtime's own thread. The /proc files are made by the kernel from
/// memory and the root filesystem's statvfs answers from its superblock: a whole sample costs
/// about 0.1 ms and never waits on a disk, while handing it to a blocking thread and back cost
/// two thread wake-ups, more than the reads. `None` when the sample panicked (a bug).
fn take_sample(sampler: &mut Sampler, metrics: &MetricSet) -> Option<Sample> {
    std::panic::catch_unwind(AssertUnwindSafe(|| sampler.sample(metrics))).ok()
}
