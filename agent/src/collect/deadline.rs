//! The collectors on a blocking thread, each within a deadline.
//!
//! The runtime's thread sends the heartbeat's keep-alives, so it never waits on a read. A sample
//! hands its collectors to one blocking thread, which reads them one after the other and wakes
//! the sampler once, when it has read them all: one handoff per sample, not one per collector.
//! Each collector gets [`COLLECTOR_DEADLINE`] from when its read starts. One that has not answered
//! by then (a statvfs on a hung NFS or FUSE mount never does) is reported as timed out and left
//! to its thread, and a new thread takes over the collectors still waiting; the hung collector
//! is not started again while its read lasts, so it holds one thread however many samples it
//! misses, and the other collectors go on without it. When its read ends at last, the
//! collector comes back with its counters forgotten, so that no rate spans the hang.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nodepulse_crd::wire::{Metric, MetricSet};
use tokio::sync::Notify;

use super::{Collector, Figures, HostPaths, Sample, slot};
use crate::error::{Error, Result};

/// How long the sampler waits for one collector. A whole sample takes about 0.1 ms; a collector
/// that takes a second is stuck, not slow.
pub const COLLECTOR_DEADLINE: Duration = Duration::from_secs(1);

/// The blocking threads the agent's runtime may start: one for each collector, which a hung
/// collector holds until it answers, and two for the rest (name resolution among it), so that
/// even five hung collectors starve nothing else.
pub const BLOCKING_THREADS: usize = Metric::ALL.len() + 2;

/// What became of one value's job in one round.
#[derive(Debug)]
pub enum Outcome<R> {
    /// The job answered in time: its result, and how long it took.
    Done(R, Duration),
    /// The job did not answer within the deadline. It goes on running, and nothing more is
    /// started on its value until it ends.
    TimedOut,
    /// The job of an earlier round has not ended yet, so nothing was started: how long it has
    /// been running.
    StillRunning(Duration),
    /// The job panicked; its value was made afresh.
    Panicked,
}

/// What one [`Rounds::round`] came to: an outcome per value asked for, in the order of their
/// indexes, and the values whose job had timed out in an earlier round and ended during this
/// one, with how long that job ran.
#[derive(Debug)]
pub struct Round<R> {
    /// Per value asked for.
    pub outcomes: Vec<(usize, Outcome<R>)>,
    /// Values back from a job that had timed out.
    pub late: Vec<(usize, Duration)>,
}

/// Values (the collectors), known by their index, whose jobs run in rounds on the blocking pool:
/// one thread per round while every job answers, one more for each job that does not.
pub struct Rounds<C, R> {
    shared: Arc<Shared<C, R>>,
    job: Arc<dyn Fn(&mut C) -> R + Send + Sync>,
    fresh: Box<dyn Fn(usize) -> C + Send + Sync>,
    /// The values no job has.
    idle: Vec<Option<C>>,
    /// Since when the job of each value that timed out has been running.
    hung: Vec<Option<Instant>>,
    deadline: Duration,
}

impl<C, R> std::fmt::Debug for Rounds<C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rounds")
            .field("hung", &self.hung)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// What the sampler and the threads share: the board, and the sampler's wake-up.
struct Shared<C, R> {
    board: Mutex<Board<C, R>>,
    wake: Notify,
}

/// The jobs of the rounds, under one lock, held only to move values on and off it.
struct Board<C, R> {
    /// Values whose job has not started, in the order they were asked for.
    queue: VecDeque<(usize, C)>,
    /// Jobs under way, with when each started.
    running: Vec<(usize, Instant)>,
    /// Jobs ended, with their value back, the result and how long they took.
    done: Vec<(usize, C, R, Duration)>,
    /// Jobs that panicked (their value lost with them).
    panicked: Vec<usize>,
    /// Threads taking values off the queue, or in a job.
    threads: usize,
}

impl<C, R> Shared<C, R> {
    fn board(&self) -> MutexGuard<'_, Board<C, R>> {
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<C: Send + 'static, R: Send + 'static> Rounds<C, R> {
    /// `values`, the jobs' `job`, `fresh` to make a value again after a panic, and the deadline
    /// of each job.
    pub fn new(
        values: Vec<C>,
        fresh: impl Fn(usize) -> C + Send + Sync + 'static,
        job: impl Fn(&mut C) -> R + Send + Sync + 'static,
        deadline: Duration,
    ) -> Self {
        let n = values.len();
        Rounds {
            shared: Arc::new(Shared {
                board: Mutex::new(Board {
                    queue: VecDeque::new(),
                    running: Vec::new(),
                    done: Vec::new(),
                    panicked: Vec::new(),
                    threads: 0,
                }),
                wake: Notify::new(),
            }),
            job: Arc::new(job),
            fresh: Box::new(fresh),
            idle: values.into_iter().map(Some).collect(),
            hung: vec![None; n],
            deadline,
        }
    }

    /// Value `i`, when no job has it.
    pub fn value_mut(&mut self, i: usize) -> Option<&mut C> {
        self.idle[i].as_mut()
    }

    /// Takes back the values whose timed-out job has ended since: which, and how long that job
    /// ran (its result is dropped: it comes too late).
    pub fn reclaim(&mut self) -> Vec<(usize, Duration)> {
        let shared = self.shared.clone();
        let mut board = shared.board();
        let mut late = Vec::new();
        self.take_ended(&mut board, &mut Vec::new(), &mut late);
        late
    }

    /// Runs the job of each value in `asked` (indexes), one after the other on a blocking
    /// thread, and waits for each until its deadline; a value whose job is still running from
    /// an earlier round is not started again.
    pub async fn round(&mut self, asked: &[usize]) -> Round<R> {
        let shared = self.shared.clone();
        let mut outcomes = Vec::new();
        let mut late = Vec::new();
        let mut pending = Vec::new();
        {
            let mut board = shared.board();
            self.take_ended(&mut board, &mut outcomes, &mut late);
            for &i in asked {
                if let Some(value) = self.idle[i].take() {
                    board.queue.push_back((i, value));
                    pending.push(i);
                } else if let Some(since) = self.hung[i] {
                    outcomes.push((i, Outcome::StillRunning(since.elapsed())));
                }
            }
            if !pending.is_empty() {
                self.start_thread(&mut board);
            }
        }
        // Values that never got a thread (the pool full) are given up on after as long as
        // their jobs may take together.
        let give_up = Instant::now() + self.deadline * pending.len() as u32;
        while !pending.is_empty() {
            let wake_at = {
                let mut board = shared.board();
                self.take_ended(&mut board, &mut outcomes, &mut late);
                pending.retain(|p| !outcomes.iter().any(|(i, _)| i == p));
                let now = Instant::now();
                // With no job of ours under way yet (its thread not started, or between two
                // jobs), the next one's start is not known: look again a deadline from now. A
                // round whose jobs all answer is woken once, by its thread, when they have.
                let mut wake_at = give_up.min(now + self.deadline);
                for &(i, since) in &board.running {
                    let Some(at) = pending.iter().position(|p| *p == i) else {
                        continue;
                    };
                    if now >= since + self.deadline || now >= give_up {
                        pending.swap_remove(at);
                        self.hung[i] = Some(since);
                        outcomes.push((i, Outcome::TimedOut));
                    } else {
                        wake_at = wake_at.min(since + self.deadline);
                    }
                }
                if now >= give_up {
                    for (i, value) in std::mem::take(&mut board.queue) {
                        self.idle[i] = Some(value);
                        pending.retain(|p| *p != i);
                        outcomes.push((i, Outcome::TimedOut));
                    }
                }
                // Every thread in a job that timed out: one more for the values waiting.
                let hung = board
                    .running
                    .iter()
                    .filter(|(i, _)| self.hung[*i].is_some());
                if !board.queue.is_empty() && board.threads == hung.count() {
                    self.start_thread(&mut board);
                }
                wake_at
            };
            if pending.is_empty() {
                break;
            }
            let wake_at = tokio::time::Instant::from_std(wake_at);
            let _ = tokio::time::timeout_at(wake_at, shared.wake.notified()).await;
        }
        outcomes.sort_by_key(|(i, _)| *i);
        Round { outcomes, late }
    }

    /// Moves the jobs ended from the board to the values: the outcome of those in `pending`,
    /// and the values of timed-out jobs into `late`.
    fn take_ended(
        &mut self,
        board: &mut Board<C, R>,
        outcomes: &mut Vec<(usize, Outcome<R>)>,
        late: &mut Vec<(usize, Duration)>,
    ) {
        for (i, value, result, took) in board.done.drain(..) {
            self.idle[i] = Some(value);
            if self.hung[i].take().is_some() {
                late.push((i, took));
            } else {
                outcomes.push((i, Outcome::Done(result, took)));
            }
        }
        for i in board.panicked.drain(..) {
            self.idle[i] = Some((self.fresh)(i));
            if self.hung[i].take().is_none() {
                outcomes.push((i, Outcome::Panicked));
            }
        }
    }

    /// A blocking thread that takes values off the queue and runs their jobs until the queue is
    /// empty, then wakes the round.
    fn start_thread(&self, board: &mut Board<C, R>) {
        board.threads += 1;
        let shared = self.shared.clone();
        let job = self.job.clone();
        tokio::task::spawn_blocking(move || {
            loop {
                let (i, mut value) = {
                    let mut board = shared.board();
                    let Some(next) = board.queue.pop_front() else {
                        board.threads -= 1;
                        break;
                    };
                    board.running.push((next.0, Instant::now()));
                    next
                };
                let started = Instant::now();
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut value)));
                let took = started.elapsed();
                let mut board = shared.board();
                board.running.retain(|(r, _)| *r != i);
                match result {
                    Ok(result) => board.done.push((i, value, result, took)),
                    Err(_) => board.panicked.push(i),
                }
            }
            shared.wake.notify_one();
        });
    }
}

/// The agent's sampler: the collectors of [`super::Sampler`], run in [`Rounds`] with a deadline
/// each.
#[derive(Debug)]
pub struct TimedSampler {
    /// In [`Metric::ALL`]'s order.
    collectors: Rounds<Collector, Result<Figures>>,
    deadline: Duration,
}

impl TimedSampler {
    /// A sampler with no previous counters yet, giving each collector `deadline`.
    pub fn new(paths: HostPaths, deadline: Duration) -> Self {
        let paths = Arc::new(paths);
        TimedSampler {
            collectors: Rounds::new(
                Metric::ALL.map(Collector::new).into(),
                |i| Collector::new(Metric::ALL[i]),
                move |c: &mut Collector| c.read(&paths),
                deadline,
            ),
            deadline,
        }
    }

    /// Takes one sample of `metrics`. A collector still running from an earlier sample is not
    /// waited for: it reports [`Error::CollectorTimeout`] again.
    pub async fn sample(&mut self, metrics: &MetricSet) -> Sample {
        let started = tokio::time::Instant::now();
        let mut s = Sample::default();
        for (i, ran_for) in self.collectors.reclaim() {
            self.came_back(i, ran_for);
        }
        for m in Metric::ALL {
            if !metrics.contains(m) {
                // Switched on again, its first rate would otherwise average over the time off.
                if let Some(c) = self.collectors.value_mut(slot(m)) {
                    c.forget();
                }
            }
        }
        let asked: Vec<usize> = metrics.iter().map(slot).collect();
        let round = self.collectors.round(&asked).await;
        for (i, ran_for) in round.late {
            self.came_back(i, ran_for);
        }
        let timeout = || Error::CollectorTimeout {
            after: self.deadline,
        };
        for (i, outcome) in round.outcomes {
            let m = Metric::ALL[i];
            match outcome {
                Outcome::Done(result, took) => s.record(m, result, took),
                Outcome::TimedOut => {
                    s.timed_out.push(m);
                    s.record(m, Err(timeout()), self.deadline);
                }
                Outcome::StillRunning(ran_for) => s.record(m, Err(timeout()), ran_for),
                Outcome::Panicked => s.record(m, Err(Error::CollectorPanicked), Duration::ZERO),
            }
        }
        s.duration = started.elapsed();
        s
    }

    /// A collector whose read had timed out is back: logged, its counters forgotten.
    fn came_back(&mut self, i: usize, ran_for: Duration) {
        let m = Metric::ALL[i];
        tracing::info!("sampling: the {m} collector answered at last, after {ran_for:?}");
        if let Some(c) = self.collectors.value_mut(i) {
            c.forget();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use super::*;

    /// The values' senders, the rounds, and how many jobs have started.
    type Blockers = (
        Vec<mpsc::Sender<u32>>,
        Rounds<mpsc::Receiver<u32>, u32>,
        Arc<AtomicUsize>,
    );

    /// Values whose jobs wait for a number on a channel: one that never comes is a hung read; 99
    /// makes the job panic. A fresh value has a 5 waiting.
    fn blockers(n: usize, deadline: Duration) -> Blockers {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel()).unzip();
        let started = Arc::new(AtomicUsize::new(0));
        let counted = started.clone();
        let rounds = Rounds::new(
            receivers,
            |_| {
                let (tx, rx) = mpsc::channel();
                tx.send(5).unwrap();
                rx
            },
            move |rx: &mut mpsc::Receiver<u32>| {
                counted.fetch_add(1, Ordering::SeqCst);
                match rx.recv().unwrap() {
                    99 => panic!("a bug"),
                    n => n,
                }
            },
            deadline,
        );
        (senders, rounds, started)
    }

    /// The outcomes as `d<n>` (done with n), `timeout`, `running` or `panicked`.
    fn shown(round: &Round<u32>) -> Vec<(usize, String)> {
        round
            .outcomes
            .iter()
            .map(|(i, o)| {
                let o = match o {
                    Outcome::Done(n, _) => format!("d{n}"),
                    Outcome::TimedOut => "timeout".into(),
                    Outcome::StillRunning(_) => "running".into(),
                    Outcome::Panicked => "panicked".into(),
                };
                (*i, o)
            })
            .collect()
    }

    fn outcomes(items: &[(usize, &str)]) -> Vec<(usize, String)> {
        items.iter().map(|(i, o)| (*i, o.to_string())).collect()
    }

    #[tokio::test]
    async fn jobs_that_answer_are_done_in_order() {
        let (tx, mut rounds, started) = blockers(3, Duration::from_secs(30));
        for (n, tx) in tx.iter().enumerate() {
            tx.send(n as u32 + 10).unwrap();
        }
        let round = rounds.round(&[2, 0, 1]).await;
        assert_eq!(
            shown(&round),
            outcomes(&[(0, "d10"), (1, "d11"), (2, "d12")])
        );
        assert!(round.late.is_empty());
        assert_eq!(started.load(Ordering::SeqCst), 3);
        assert!(rounds.value_mut(1).is_some());
    }

    #[tokio::test]
    async fn a_hung_job_times_out_the_others_carry_on_and_it_is_not_started_again() {
        let (tx, mut rounds, started) = blockers(3, Duration::from_millis(500));
        // Value 0 gets nothing: its job hangs ahead of the others in the queue.
        tx[1].send(11).unwrap();
        tx[2].send(12).unwrap();
        let first = rounds.round(&[0, 1, 2]).await;
        assert_eq!(
            shown(&first),
            outcomes(&[(0, "timeout"), (1, "d11"), (2, "d12")])
        );
        tx[1].send(21).unwrap();
        tx[2].send(22).unwrap();
        let second = rounds.round(&[0, 1, 2]).await;
        assert_eq!(
            shown(&second),
            outcomes(&[(0, "running"), (1, "d21"), (2, "d22")])
        );
        assert_eq!(started.load(Ordering::SeqCst), 5, "value 0 started once");
        assert!(rounds.value_mut(0).is_none());

        // It answers at last: the value comes back, and its next job runs.
        tx[0].send(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let late = rounds.reclaim();
            if !late.is_empty() {
                assert_eq!(late[0].0, 0);
                break;
            }
            assert!(Instant::now() < deadline, "never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tx[0].send(30).unwrap();
        assert_eq!(shown(&rounds.round(&[0]).await), outcomes(&[(0, "d30")]));
    }

    #[tokio::test]
    async fn a_panicking_job_gives_a_fresh_value() {
        let (tx, mut rounds, _) = blockers(2, Duration::from_secs(30));
        tx[0].send(99).unwrap();
        tx[1].send(1).unwrap();
        let round = rounds.round(&[0, 1]).await;
        assert_eq!(shown(&round), outcomes(&[(0, "panicked"), (1, "d1")]));
        assert_eq!(shown(&rounds.round(&[0]).await), outcomes(&[(0, "d5")]));
    }

    #[tokio::test]
    async fn the_timed_sampler_reads_what_the_plain_one_does() {
        let mut sampler = TimedSampler::new(HostPaths::new("/proc", "/"), Duration::from_secs(30));
        sampler.sample(&MetricSet::all()).await;
        let s = sampler.sample(&MetricSet::all()).await;
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        assert!(s.timed_out.is_empty());
        assert!(s.cpu.is_some() && s.memory.is_some() && s.load.is_some());
        assert!(s.disk.as_ref().is_some_and(|d| d.root.is_some()));
        let order: Vec<Metric> = s.durations.iter().map(|(m, _)| *m).collect();
        assert_eq!(order, Metric::ALL);
    }
}
