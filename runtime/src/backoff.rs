//! Retrying: every loop that retries etcd or the API server waits the same way.

use std::time::Duration;

use rand::Rng;

/// Capped exponential backoff with jitter, for every loop that retries etcd.
///
/// Kept rather than `backon`: its jitter adds up to a whole delay on top of the cap, and the
/// retry caps are promises (at most 2.5 s between watch retries, TTL/3 for the heartbeat).
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s: quick to recover from a blip, gentle on a dead etcd.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// A backoff starting at `min` and doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt: uniformly random in [next/2, next], so that a fleet of
    /// agents cut off together does not come back in lockstep.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = cap / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays {
            assert!(*d <= Duration::from_secs(1), "{d:?}");
        }
        assert!(delays[7] >= Duration::from_millis(500), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
