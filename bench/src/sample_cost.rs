//! The CPU cost of one full sample of all five metrics, measured in-process around the agent's
//! own sampling code (`nodepulse_agent::collect::Sampler`), with the thread's CPU clock.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use nodepulse_agent::collect::{HostPaths, Sampler};
use nodepulse_crd::wire::MetricSet;

use crate::stats::Latencies;
use crate::{Error, Result};

/// CPU time and wall time of `samples` consecutive full samples of the host's /proc (after one
/// warm-up sample, so rates are computed as in production).
pub fn measure(samples: usize) -> Result<(Latencies, Latencies)> {
    let mut sampler = Sampler::new(HostPaths::new("/proc", "/"));
    let all = MetricSet::all();
    let warm = sampler.sample(&all);
    if let Some((metric, e)) = warm.errors.first() {
        return Err(Error::Unexpected(format!("agent sampler: {metric}: {e}")));
    }
    let mut cpu = Vec::with_capacity(samples);
    let mut wall = Vec::with_capacity(samples);
    for _ in 0..samples {
        let before = thread_cpu()?;
        let s = sampler.sample(&all);
        let after = thread_cpu()?;
        cpu.push(after.saturating_sub(before));
        wall.push(s.duration);
    }
    match (Latencies::of(&cpu), Latencies::of(&wall)) {
        (Some(c), Some(w)) => Ok((c, w)),
        _ => Err(Error::Unexpected("no samples taken".into())),
    }
}

fn thread_cpu() -> Result<Duration> {
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_err(|e| Error::Proc(format!("clock_gettime(CLOCK_THREAD_CPUTIME_ID): {e}")))?;
    Ok(Duration::from(t))
}
