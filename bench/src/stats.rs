//! Percentiles over latency samples.

use std::time::Duration;

/// p50/p99/max of a set of latencies.
#[derive(Clone, Debug, PartialEq)]
pub struct Latencies {
    /// How many samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile (nearest rank: with fewer than 100 samples it is the maximum).
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Latencies {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Latencies> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort();
        Some(Latencies {
            count: sorted.len(),
            p50: nearest_rank(&sorted, 0.50),
            p99: nearest_rank(&sorted, 0.99),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// The nearest-rank percentile of sorted, non-empty `sorted`.
fn nearest_rank(sorted: &[Duration], q: f64) -> Duration {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A duration as milliseconds with sensible precision: `0.42 ms`, `12.3 ms`, `1520 ms`.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=200).map(Duration::from_millis).collect();
        let l = Latencies::of(&samples).unwrap();
        assert_eq!(l.count, 200);
        assert_eq!(l.p50, Duration::from_millis(100));
        assert_eq!(l.p99, Duration::from_millis(198));
        assert_eq!(l.max, Duration::from_millis(200));
        let few: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(Latencies::of(&few).unwrap().p99, Duration::from_millis(20));
        assert_eq!(Latencies::of(&[]), None);
    }

    #[test]
    fn millisecond_formatting() {
        assert_eq!(ms(Duration::from_micros(420)), "0.420 ms");
        assert_eq!(ms(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(ms(Duration::from_millis(1520)), "1520 ms");
    }
}
