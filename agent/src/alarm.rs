//! A deadline that wakes the agent's thread once, when it comes.
//!
//! tokio's timer wheel files a deadline seconds away in a coarse slot and wakes the thread at the
//! start of that slot (up to 4 s early), again at the start of a 64 ms one, and then at the
//! deadline: three wake-ups where one would do, for every sample and every lease keep-alive. A
//! timerfd armed for the deadline wakes the thread once. The agent's periodic deadlines (the next
//! sample, the next keep-alive) use an [`Alarm`]; timeouts, which seldom fire, stay on tokio's
//! timers.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

/// One deadline at a time, on a timerfd; on tokio's timer if the system refused the timerfd.
#[derive(Debug)]
pub struct Alarm {
    timer: Option<AsyncFd<Timer>>,
    /// The deadline the timerfd is armed for.
    armed: Option<Instant>,
}

/// The timerfd, as tokio's reactor wants it.
#[derive(Debug)]
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Alarm {
    /// An alarm not set yet. Must be called on the runtime.
    pub fn new() -> Alarm {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            // SAFETY: `Timer` owns the descriptor and closes it only when the `AsyncFd` drops it.
            unsafe { AsyncFd::register_with_interest(Timer(fd), Interest::READABLE) }
                .map_err(std::io::Error::from)
        });
        if let Err(e) = &timer {
            tracing::debug!("timerfd unavailable ({e}); deadlines use tokio's timer");
        }
        Alarm {
            timer: timer.ok(),
            armed: None,
        }
    }

    /// Waits until `deadline`; returns at once when it has passed. Cancel-safe: dropped and
    /// called again with the same deadline, it keeps waiting for that deadline.
    pub async fn sleep_until(&mut self, deadline: Instant) {
        let Some(timer) = &self.timer else {
            return tokio::time::sleep_until(deadline).await;
        };
        if self.armed != Some(deadline) {
            let delay = deadline.saturating_duration_since(Instant::now());
            if delay.is_zero() {
                return;
            }
            // Arming again also clears an expiry of the previous deadline not read yet.
            let set = timer.get_ref().0.set(
                Expiration::OneShot(TimeSpec::from_duration(delay)),
                TimerSetTimeFlags::empty(),
            );
            if let Err(e) = set {
                tracing::debug!("arm the timerfd: {e}; this deadline uses tokio's timer");
                self.armed = None;
                return tokio::time::sleep_until(deadline).await;
            }
            self.armed = Some(deadline);
        }
        loop {
            let Ok(mut ready) = timer.readable().await else {
                return tokio::time::sleep_until(deadline).await;
            };
            // The read says whether the timer expired (it is non-blocking): readiness may be
            // left over from an earlier deadline.
            match ready.try_io(|t| t.get_ref().0.wait().map_err(std::io::Error::from)) {
                Ok(_) => {
                    // The expiry is read, so the timerfd is no longer readable: say so now,
                    // or the next deadline would first try a read bound to fail.
                    ready.clear_ready();
                    self.armed = None;
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// Forgets the deadline armed, so that a deadline nobody waits for any more does not wake
    /// the thread.
    pub fn disarm(&mut self) {
        if let (Some(timer), Some(_)) = (&self.timer, self.armed.take())
            && let Err(e) = timer.get_ref().0.unset()
        {
            tracing::debug!("disarm the timerfd: {e}");
        }
    }
}

impl Default for Alarm {
    fn default() -> Self {
        Alarm::new()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn wakes_at_the_deadline_not_before() {
        let mut alarm = Alarm::new();
        assert!(alarm.timer.is_some(), "a timerfd on Linux");
        let start = Instant::now();
        alarm.sleep_until(start + Duration::from_millis(50)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
        // A deadline already past returns at once, without waiting for a timer.
        alarm.sleep_until(start).await;
    }

    /// Arms `alarm` for `deadline` the way a `select!` that takes another branch does: polls it
    /// once, then drops it.
    async fn arm(alarm: &mut Alarm, deadline: Instant) {
        tokio::select! {
            biased;
            _ = alarm.sleep_until(deadline) => {}
            _ = std::future::ready(()) => {}
        }
    }

    #[tokio::test]
    async fn a_new_deadline_replaces_the_one_armed() {
        let mut alarm = Alarm::new();
        let start = Instant::now();
        arm(&mut alarm, start + Duration::from_secs(3600)).await;
        alarm.sleep_until(start + Duration::from_millis(30)).await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_disarmed_alarm_does_not_expire() {
        let mut alarm = Alarm::new();
        arm(&mut alarm, Instant::now() + Duration::from_secs(3600)).await;
        let setting = |a: &Alarm| {
            let timer = &a.timer.as_ref().expect("a timerfd on Linux").get_ref().0;
            timer.get().expect("timerfd_gettime")
        };
        assert!(setting(&alarm).is_some(), "armed");
        alarm.disarm();
        assert_eq!(setting(&alarm), None, "disarmed");
    }

    #[tokio::test]
    async fn an_expiry_not_read_in_time_still_counts() {
        let mut alarm = Alarm::new();
        let deadline = Instant::now() + Duration::from_millis(20);
        arm(&mut alarm, deadline).await;
        tokio::time::sleep(Duration::from_millis(40)).await;
        // The timerfd expired while nobody waited: the same deadline returns at once.
        tokio::time::timeout(Duration::from_millis(500), alarm.sleep_until(deadline))
            .await
            .expect("the expiry was kept");
    }
}
