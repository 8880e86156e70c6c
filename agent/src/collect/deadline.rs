//! Each collector on a blocking thread, within a deadline.
//!
//! The runtime's thread sends the heartbeat's keep-alives, so it never waits on a read: each
//! collector runs on a blocking thread and is waited for [`COLLECTOR_DEADLINE`] at most. One that
//! has not answered by then (a statvfs on a hung NFS or FUSE mount never does) is reported as
//! timed out and left running on its thread; it is not started again while that run lasts, so a
//! hung collector holds one thread, however many samples it misses, and the other collectors go
//! on without it. When its run ends at last, the collector comes back with its counters
//! forgotten, so that no rate spans the hang.

use std::sync::Arc;
use std::time::Duration;

use nodepulse_crd::wire::{Metric, MetricSet};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Collector, Figures, HostPaths, Sample, slot};
use crate::error::{Error, Result};

/// How long the sampler waits for one collector. A whole sample takes about 0.1 ms; a collector
/// that takes a second is stuck, not slow.
pub const COLLECTOR_DEADLINE: Duration = Duration::from_secs(1);

/// The blocking threads the agent's runtime may start: one for each collector, which a hung
/// collector holds until it answers, and two for the rest (name resolution among it), so that
/// even five hung collectors starve nothing else.
pub const BLOCKING_THREADS: usize = Metric::ALL.len() + 2;

/// What one [`OffThread::run`] came to.
#[derive(Debug)]
pub enum Outcome<R> {
    /// The job answered in time: its result, and how long it took.
    Done(R, Duration),
    /// The job did not answer within the deadline. It goes on running, and nothing more is
    /// started on the value until it ends.
    TimedOut,
    /// An earlier job has not ended yet, so nothing was started: how long it has been running.
    StillRunning(Duration),
    /// The job panicked, and the value it worked on is lost ([`OffThread::is_lost`]).
    Panicked,
}

/// A value (a collector) that jobs run on one at a time, each on a blocking thread.
#[derive(Debug)]
pub struct OffThread<C, R> {
    state: State<C, R>,
}

#[derive(Debug)]
enum State<C, R> {
    /// No job running: the value is here.
    Idle(C),
    /// A job that ran past its deadline still has the value.
    Running {
        task: JoinHandle<(C, R, Duration)>,
        since: Instant,
    },
    /// The last job panicked with the value.
    Lost,
}

impl<C: Send + 'static, R: Send + 'static> OffThread<C, R> {
    /// `value`, no job running.
    pub fn new(value: C) -> Self {
        OffThread {
            state: State::Idle(value),
        }
    }

    /// Whether the last job panicked with the value.
    pub fn is_lost(&self) -> bool {
        matches!(self.state, State::Lost)
    }

    /// The value, when no job has it.
    pub fn value_mut(&mut self) -> Option<&mut C> {
        match &mut self.state {
            State::Idle(value) => Some(value),
            _ => None,
        }
    }

    /// Takes the value back from a job that ran past its deadline and has ended since: how long
    /// that job ran (its result is dropped: it comes too late). `None` when no job had run late,
    /// or it is still running.
    pub async fn reclaim(&mut self) -> Option<Duration> {
        let State::Running { task, .. } = &mut self.state else {
            return None;
        };
        if !task.is_finished() {
            return None;
        }
        match task.await {
            Ok((value, _, ran_for)) => {
                self.state = State::Idle(value);
                Some(ran_for)
            }
            Err(_) => {
                self.state = State::Lost;
                None
            }
        }
    }

    /// Runs `job` on the value on a blocking thread and waits for it until `deadline` has
    /// passed. Starts nothing while an earlier job is still running, or the value is lost.
    pub async fn run(
        &mut self,
        deadline: Duration,
        job: impl FnOnce(&mut C) -> R + Send + 'static,
    ) -> Outcome<R> {
        self.reclaim().await;
        let mut value = match std::mem::replace(&mut self.state, State::Lost) {
            State::Idle(value) => value,
            State::Running { task, since } => {
                let ran_for = since.elapsed();
                self.state = State::Running { task, since };
                return Outcome::StillRunning(ran_for);
            }
            State::Lost => return Outcome::Panicked,
        };
        let since = Instant::now();
        let mut task = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let result = job(&mut value);
            (value, result, started.elapsed())
        });
        match tokio::time::timeout(deadline, &mut task).await {
            Ok(Ok((value, result, took))) => {
                self.state = State::Idle(value);
                Outcome::Done(result, took)
            }
            Ok(Err(_)) => Outcome::Panicked,
            Err(_) => {
                self.state = State::Running { task, since };
                Outcome::TimedOut
            }
        }
    }
}

/// The agent's sampler: the collectors of [`super::Sampler`], each run through an
/// [`OffThread`] with a deadline.
#[derive(Debug)]
pub struct TimedSampler {
    paths: Arc<HostPaths>,
    /// In [`Metric::ALL`]'s order.
    collectors: [OffThread<Collector, Result<Figures>>; 5],
    deadline: Duration,
}

impl TimedSampler {
    /// A sampler with no previous counters yet, waiting `deadline` for each collector.
    pub fn new(paths: HostPaths, deadline: Duration) -> Self {
        TimedSampler {
            paths: Arc::new(paths),
            collectors: Metric::ALL.map(|m| OffThread::new(Collector::new(m))),
            deadline,
        }
    }

    /// Takes one sample of `metrics`, one collector after the other. A collector still running
    /// from an earlier sample is not waited for: it reports [`Error::CollectorTimeout`] again.
    pub async fn sample(&mut self, metrics: &MetricSet) -> Sample {
        let started = Instant::now();
        let mut s = Sample::default();
        for m in Metric::ALL {
            let collector = &mut self.collectors[slot(m)];
            if let Some(ran_for) = collector.reclaim().await {
                tracing::info!("sampling: the {m} collector answered at last, after {ran_for:?}");
                if let Some(c) = collector.value_mut() {
                    c.forget();
                }
            }
            if collector.is_lost() {
                *collector = OffThread::new(Collector::new(m));
            }
            if !metrics.contains(m) {
                // Switched on again, its first rate would otherwise average over the time off.
                if let Some(c) = collector.value_mut() {
                    c.forget();
                }
                continue;
            }
            let paths = self.paths.clone();
            let timeout = Error::CollectorTimeout {
                after: self.deadline,
            };
            match collector.run(self.deadline, move |c| c.read(&paths)).await {
                Outcome::Done(result, took) => s.record(m, result, took),
                Outcome::TimedOut => {
                    s.timed_out.push(m);
                    s.record(m, Err(timeout), self.deadline);
                }
                Outcome::StillRunning(ran_for) => s.record(m, Err(timeout), ran_for),
                Outcome::Panicked => s.record(m, Err(Error::CollectorPanicked), Duration::ZERO),
            }
        }
        s.duration = started.elapsed();
        s
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// A value whose jobs wait for a number on a channel: one that never comes is a hung read.
    type Blocker = OffThread<mpsc::Receiver<u32>, u32>;

    const PLENTY: Duration = Duration::from_secs(30);
    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn a_job_that_answers_in_time_is_done() {
        let (tx, rx) = mpsc::channel();
        let mut off: Blocker = OffThread::new(rx);
        tx.send(7).unwrap();
        assert!(matches!(
            off.run(PLENTY, |rx| rx.recv().unwrap()).await,
            Outcome::Done(7, _)
        ));
        assert!(off.value_mut().is_some());
    }

    #[tokio::test]
    async fn a_hung_job_times_out_and_is_not_started_again_until_it_ends() {
        let (tx, rx) = mpsc::channel();
        let mut off: Blocker = OffThread::new(rx);
        let started = Arc::new(AtomicUsize::new(0));
        let job = |started: Arc<AtomicUsize>| {
            move |rx: &mut mpsc::Receiver<u32>| {
                started.fetch_add(1, Ordering::SeqCst);
                rx.recv().unwrap()
            }
        };
        // Nothing is ever sent before the deadline: the job cannot answer in time.
        assert!(matches!(
            off.run(SHORT, job(started.clone())).await,
            Outcome::TimedOut
        ));
        for _ in 0..3 {
            assert!(matches!(
                off.run(PLENTY, job(started.clone())).await,
                Outcome::StillRunning(_)
            ));
        }
        assert_eq!(started.load(Ordering::SeqCst), 1, "started once only");
        assert!(off.value_mut().is_none() && !off.is_lost());

        // It answers at last: the value comes back, and the next job runs on it.
        tx.send(1).unwrap();
        let deadline = std::time::Instant::now() + PLENTY;
        while off.reclaim().await.is_none() {
            assert!(std::time::Instant::now() < deadline, "never reclaimed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx.send(2).unwrap();
        assert!(matches!(
            off.run(PLENTY, job(started.clone())).await,
            Outcome::Done(2, _)
        ));
        assert_eq!(started.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_panicking_job_loses_the_value() {
        let (_tx, rx) = mpsc::channel();
        let mut off: Blocker = OffThread::new(rx);
        assert!(matches!(
            off.run(PLENTY, |_| panic!("a bug")).await,
            Outcome::Panicked
        ));
        assert!(off.is_lost());
        assert!(matches!(off.run(PLENTY, |_| 1).await, Outcome::Panicked));
    }

    #[tokio::test]
    async fn the_timed_sampler_reads_what_the_plain_one_does() {
        let mut sampler = TimedSampler::new(HostPaths::new("/proc", "/"), PLENTY);
        sampler.sample(&MetricSet::all()).await;
        let s = sampler.sample(&MetricSet::all()).await;
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert!(s.timed_out.is_empty());
        assert!(s.cpu.is_some() && s.memory.is_some() && s.load.is_some());
        assert!(s.disk.as_ref().is_some_and(|d| d.root.is_some()));
        assert_eq!(s.durations.len(), 5);
    }
}
