//! The heartbeat's rules, apart from etcd and the clock.
//!
//! A state machine, as kube-runtime's watcher `State` is: what happened goes in as an [`Event`]
//! with the instant it happened at, what to do comes out as [`Decisions`], and the instants to
//! wake at as [`Deadlines`]. No etcd client, no timer and no clock inside: the task around it
//! ([`HeartbeatLease`](crate::heartbeat::HeartbeatLease)) calls etcd, arms the alarms and feeds
//! the answers back, so every rule below is tested with made-up instants.
//!
//! The rules:
//! - a keep-alive every third of the TTL (in milliseconds), so that two may be lost before the
//!   lease expires. One due before the next sample goes out with that sample, never more than a
//!   sixth of the TTL early, and the next one a whole third later; one late (a busy thread) keeps
//!   the original schedule;
//! - a keep-alive still unanswered a third of the TTL after it went out, and [`HUNG_GRACE`] more,
//!   means a hung member (it fails no request, and its HTTP/2 ping would notice only after the
//!   lease ran out): the session leaves it. The deadline counts from the oldest unanswered
//!   keep-alive, is set once a second one goes out unanswered, and yields to an answer already
//!   there. No answer for a whole TTL ends the session all the same;
//! - the value is written at once on a new (or resumed) lease, then again when there is news, at
//!   most every `--heartbeat-min-interval` counted from start to start; a sample within a
//!   twentieth of that counts as due, and a rewrite's own deadline waits that twentieth longer,
//!   so that the sample due with it comes first. With no news, the same value every
//!   `--heartbeat-max-interval`. A value equal to the last one written (but for `updatedAt`) is
//!   not written; one write at a time; a failed write waits from its answer;
//! - the key deleted while the lease lives is written again at once; an older agent's value on
//!   it is overwritten; a newer agent's makes this one stop writing it;
//! - etcd failing ends the session: retries back off from 100 ms doubling up to a third of the
//!   TTL (at most 5 s), and an outage is logged once. A set-up call unanswered leaves its member.
//!   A lease etcd no longer has is granted anew at once, and counted as a re-grant; one it still
//!   has is resumed;
//! - on shutdown, the lease held (if any) is marked Stopping and left to expire.

use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use nodepulse_crd::wire::Heartbeat;
use nodepulse_runtime::Backoff;

/// How long a keep-alive answer may still come once the member looks hung.
pub const HUNG_GRACE: Duration = Duration::from_millis(200);

/// Something that happened to the heartbeat, as the task saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A session is being set up, its calls going to `member` (`None`: no other to go to).
    SetUp {
        /// The member the set-up calls go to.
        member: Option<usize>,
    },
    /// etcd no longer has the lease that was to be resumed.
    LeaseNotFound,
    /// etcd granted a lease.
    LeaseGranted {
        /// The lease.
        id: i64,
        /// The TTL etcd gave it, in seconds.
        ttl: i64,
    },
    /// The keep-alive stream and the watch on the key are open: the lease is held.
    SessionStarted,
    /// A keep-alive was answered with the seconds the lease has left (0: it is gone).
    KeepAliveAnswered {
        /// The TTL left.
        ttl: i64,
    },
    /// The keep-alive deadline came.
    KeepAliveDue,
    /// The hung-member deadline came.
    HungDeadline,
    /// A sample was published, at the sampling interval in force.
    Sample {
        /// The sampling interval.
        interval: Duration,
    },
    /// The configuration changed: news for the value.
    ConfigChanged,
    /// The rewrite deadline came.
    RewriteDue,
    /// Someone deleted the key.
    KeyDeleted,
    /// A value was put on the key.
    KeyPut {
        /// The lease the key is on now.
        lease: i64,
        /// The value.
        value: &'a [u8],
    },
    /// etcd stored the value written.
    WriteAnswered,
    /// The value write failed.
    WriteFailed {
        /// etcd answered that the lease does not exist.
        lease_not_found: bool,
    },
    /// An etcd call failed or a stream ended; `timed_out` when a call went unanswered.
    Failed {
        /// The call got no answer in time.
        timed_out: bool,
    },
    /// The agent stops.
    Shutdown,
}

/// How to get a lease for a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseRequest {
    /// Keep this lease alive again: etcd may still have it.
    Resume(i64),
    /// Grant a new one.
    Grant,
}

/// Why the rules ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// etcd says the lease is gone: a new one is granted at once.
    LeaseLost {
        /// The lease.
        lease: i64,
    },
    /// No keep-alive answer for a whole TTL: etcd may have let the lease go.
    Unanswered {
        /// The lease.
        lease: i64,
    },
    /// The member the session is on looks hung: it is left for the next.
    MemberHung {
        /// The lease.
        lease: i64,
        /// How long since the last keep-alive answer.
        silent: Duration,
    },
}

/// A change worth a log line or a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A new lease; `regranted` when it replaces one etcd let go.
    Granted {
        /// The lease.
        id: i64,
        /// Its TTL, as etcd gave it.
        ttl: i64,
        /// The previous lease was lost.
        regranted: bool,
    },
    /// The lease held before is still alive and held again.
    Resumed {
        /// The lease.
        id: i64,
    },
    /// etcd failed the heartbeat (every one counted); `first` of an outage (logged).
    Failed {
        /// No failure since the lease was last held.
        first: bool,
    },
    /// The key was deleted while the lease lives: it is written again.
    KeyDeleted {
        /// Our lease.
        lease: i64,
    },
    /// A newer agent for this node holds the key: this one stops writing it.
    Superseded {
        /// When the newer agent started.
        by: Timestamp,
    },
}

/// What to do after an event: log, leave the member, end the session, or else renew the lease
/// and write the value, in that order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// What to log or count.
    pub transition: Option<Transition>,
    /// How to get the lease, during a set-up.
    pub lease: Option<LeaseRequest>,
    /// Send requests from now on to the member after this one.
    pub leave_member: Option<usize>,
    /// The session is over.
    pub end: Option<SessionEnd>,
    /// After a failure: set the next session up at this instant.
    pub retry_at: Option<Instant>,
    /// Send a keep-alive.
    pub keep_alive: bool,
    /// Build the value and hand it to [`HeartbeatState::start_write`].
    pub write: bool,
    /// On shutdown: mark the value Stopping on this lease.
    pub mark_stopping: Option<i64>,
}

/// When the task must wake during a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// The next keep-alive ([`Event::KeepAliveDue`]).
    pub keep_alive: Instant,
    /// The next rewrite ([`Event::RewriteDue`]); `None` while a write is in flight or a newer
    /// agent holds the key.
    pub rewrite: Option<Instant>,
    /// When the member counts as hung ([`Event::HungDeadline`]).
    pub hung: Option<Instant>,
}

/// Retries after an etcd failure: doubling from 100 ms up to a third of the TTL (at most 5 s),
/// like the keep-alives. etcd resets a lease's TTL when it comes back, so a retry pace slower
/// than that would lose the lease of a short-TTL agent after an outage that etcd survived.
fn retry_backoff(every: Duration) -> Backoff {
    Backoff::new(
        Duration::from_millis(100),
        every.min(Duration::from_secs(5)),
    )
}

/// The heartbeat's state: the lease, the session on it, and the pacing of keep-alives and
/// writes.
#[derive(Debug)]
pub struct HeartbeatState {
    ttl: Duration,
    /// The keep-alive period: a third of the TTL, so that two may be lost.
    every: Duration,
    /// Value rewrites: at most every `start()` (news waits), at least every `end()` (no news).
    rewrite: RangeInclusive<Duration>,
    /// How early a sample may bring a rewrite, and how late a rewrite's own deadline is.
    slack: Duration,
    /// This agent's start, in its value; of two agents for a node, the newer holds the key.
    started_at: Timestamp,
    /// The lease we hold (or held before etcd went away).
    lease: Option<i64>,
    /// Set when the previous lease is known to be gone, so the next grant is a re-grant.
    lease_lost: bool,
    /// The start of a newer agent for this node that holds the key on a lease of its own (a
    /// rolling update with surge, a pod replaced while this one stops): this one stops writing
    /// the key so that the two do not move it back and forth between their leases.
    superseded_by: Option<Timestamp>,
    /// A failure was logged since the lease was last held.
    outage: bool,
    backoff: Backoff,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// No lease held: a session is being set up, or soon will be.
    SettingUp {
        member: Option<usize>,
        resuming: bool,
    },
    /// Boxed: the values it keeps make it large, and a session starts seldom.
    Holding(Box<Session>),
    Stopped,
}

/// One stretch of holding the lease.
#[derive(Debug)]
struct Session {
    lease: i64,
    /// The member the session's streams are on, to leave it if it hangs.
    member: Option<usize>,
    next_keep_alive: Instant,
    last_ack: Instant,
    unanswered_since: Option<Instant>,
    hung_at: Option<Instant>,
    /// News not written yet.
    pending: bool,
    /// The last value written, with `updated_at` cleared, to tell whether there is news.
    last_written: Option<Heartbeat>,
    last_write_at: Option<Instant>,
    /// The value being written, with `updated_at` cleared.
    writing: Option<Heartbeat>,
}

impl HeartbeatState {
    /// The rules for a lease of `ttl` seconds, the value rewritten within the `rewrite` range of
    /// intervals, by an agent started at `started_at`.
    pub fn new(ttl: u32, rewrite: RangeInclusive<Duration>, started_at: Timestamp) -> Self {
        let every = Duration::from_millis(u64::from(ttl) * 1000 / 3);
        HeartbeatState {
            ttl: Duration::from_secs(ttl.into()),
            every,
            slack: *rewrite.start() / 20,
            rewrite,
            started_at,
            lease: None,
            lease_lost: false,
            superseded_by: None,
            outage: false,
            backoff: retry_backoff(every),
            phase: Phase::SettingUp {
                member: None,
                resuming: false,
            },
        }
    }

    /// Takes in what happened at `now`; returns what to do.
    pub fn step(&mut self, event: Event<'_>, now: Instant) -> Decisions {
        let mut d = Decisions::default();
        match (event, &mut self.phase) {
            (_, Phase::Stopped) => {}
            (Event::Shutdown, _) => {
                self.phase = Phase::Stopped;
                d.mark_stopping = self.lease;
            }
            (Event::SetUp { member }, _) => {
                self.phase = Phase::SettingUp {
                    member,
                    resuming: self.lease.is_some(),
                };
                d.lease = Some(self.lease.map_or(LeaseRequest::Grant, LeaseRequest::Resume));
            }
            (Event::LeaseNotFound, Phase::SettingUp { resuming, .. }) => {
                *resuming = false;
                self.lease = None;
                self.lease_lost = true;
                d.lease = Some(LeaseRequest::Grant);
            }
            (Event::LeaseGranted { id, ttl }, Phase::SettingUp { resuming, .. }) => {
                *resuming = false;
                self.lease = Some(id);
                d.transition = Some(Transition::Granted {
                    id,
                    ttl,
                    regranted: std::mem::take(&mut self.lease_lost),
                });
            }
            (Event::SessionStarted, &mut Phase::SettingUp { member, resuming }) => {
                let Some(lease) = self.lease else {
                    return d;
                };
                self.outage = false;
                self.backoff.reset();
                if resuming {
                    d.transition = Some(Transition::Resumed { id: lease });
                }
                self.phase = Phase::Holding(Box::new(Session {
                    lease,
                    member,
                    next_keep_alive: now + self.every,
                    last_ack: now,
                    unanswered_since: None,
                    hung_at: None,
                    // The key goes on the new (or resumed) lease at once.
                    pending: true,
                    last_written: None,
                    last_write_at: None,
                    writing: None,
                }));
            }
            (Event::Failed { timed_out }, Phase::SettingUp { member, .. }) => {
                // A set-up call that went unanswered that long: the member may be hung.
                let leave = if timed_out { *member } else { None };
                return self.fail(None, leave, now);
            }
            (Event::Failed { .. }, Phase::Holding(_)) => return self.fail(None, None, now),
            (event, Phase::Holding(_)) => return self.step_session(event, now),
            (_, Phase::SettingUp { .. }) => {}
        }
        d
    }

    /// The events of a session held.
    fn step_session(&mut self, event: Event<'_>, now: Instant) -> Decisions {
        let mut d = Decisions::default();
        let Phase::Holding(s) = &mut self.phase else {
            return d;
        };
        let (mut renew, mut write) = (false, false);
        match event {
            Event::KeepAliveAnswered { ttl } if ttl > 0 => {
                s.last_ack = now;
                s.unanswered_since = None;
                s.hung_at = None;
            }
            Event::KeepAliveAnswered { .. } => return self.lose_lease(),
            Event::KeepAliveDue => renew = true,
            Event::HungDeadline => {
                if s.hung_at.is_none_or(|at| at > now) {
                    // An answer came first, and cleared it.
                    return d;
                }
                let end = SessionEnd::MemberHung {
                    lease: s.lease,
                    silent: now.saturating_duration_since(s.last_ack),
                };
                let member = s.member;
                return self.fail(Some(end), member, now);
            }
            Event::Sample { interval } => {
                s.pending = true;
                renew = s.next_keep_alive <= now + interval.min(self.every / 2);
                write = s
                    .last_write_at
                    .is_none_or(|t| t + *self.rewrite.start() <= now + self.slack);
            }
            Event::ConfigChanged => s.pending = true,
            Event::RewriteDue => {
                if s.writing.is_some() || self.superseded_by.is_some() {
                    return d;
                }
                if !s.pending {
                    // Nothing new for a while: the same value with a fresh `updatedAt`.
                    s.last_written = None;
                    s.pending = true;
                }
                write = true;
            }
            Event::KeyDeleted => {
                // Deleted by hand, or a newer agent's lease expired: while our lease lives,
                // the node is alive; put the key back now.
                d.transition = Some(Transition::KeyDeleted { lease: s.lease });
                self.superseded_by = None;
                s.last_written = None;
                s.last_write_at = None;
                s.pending = true;
            }
            Event::KeyPut { lease, value } => {
                if lease == s.lease {
                    return d;
                }
                let Ok(other) = Heartbeat::parse(value) else {
                    return d;
                };
                if other.started_at > self.started_at {
                    if self.superseded_by != Some(other.started_at) {
                        d.transition = Some(Transition::Superseded {
                            by: other.started_at,
                        });
                        self.superseded_by = Some(other.started_at);
                    }
                } else if other.started_at < self.started_at && self.superseded_by.is_none() {
                    // An older agent wrote over ours: take the key back now.
                    s.last_written = None;
                    s.pending = true;
                }
            }
            Event::WriteAnswered => {
                if let Some(value) = s.writing.take() {
                    s.last_written = Some(value);
                }
            }
            Event::WriteFailed { lease_not_found } => {
                if s.writing.take().is_none() {
                    return d;
                }
                if lease_not_found {
                    return self.lose_lease();
                }
                // The lease is what keeps the node alive; the value is tried again after the
                // usual pause, and the keep-alives tell whether etcd is gone.
                s.last_write_at = Some(now);
                s.pending = true;
            }
            Event::SetUp { .. }
            | Event::LeaseNotFound
            | Event::LeaseGranted { .. }
            | Event::SessionStarted
            | Event::Failed { .. }
            | Event::Shutdown => {}
        }
        if renew {
            // Early with a sample: the next one a whole period later; late (a busy thread): on
            // the original schedule.
            s.next_keep_alive = s.next_keep_alive.min(now) + self.every;
            if now.saturating_duration_since(s.last_ack) > self.ttl {
                let end = SessionEnd::Unanswered { lease: s.lease };
                return self.fail(Some(end), None, now);
            }
            if let (None, Some(_), Some(since)) = (s.hung_at, s.member, s.unanswered_since) {
                s.hung_at = Some(since + self.every + HUNG_GRACE);
            }
            s.unanswered_since.get_or_insert(now);
            d.keep_alive = true;
        }
        d.write = write && s.writing.is_none() && self.superseded_by.is_none();
        d
    }

    /// The value built for a [`Decisions::write`], at `now`: returns the lease to put it on, or
    /// `None` when it says nothing new (it equals the last one written but for `updatedAt`).
    pub fn start_write(&mut self, value: &Heartbeat, now: Instant) -> Option<i64> {
        let Phase::Holding(s) = &mut self.phase else {
            return None;
        };
        if s.writing.is_some() || self.superseded_by.is_some() {
            return None;
        }
        s.pending = false;
        let mut comparable = value.clone();
        comparable.updated_at = self.started_at;
        if s.last_written.as_ref() == Some(&comparable) {
            return None;
        }
        s.writing = Some(comparable);
        // Rewrites are spaced from start to start, as samples are.
        s.last_write_at = Some(now);
        Some(s.lease)
    }

    /// When to wake during a session (`now` stands for a rewrite due at once); `None` when no
    /// lease is held.
    pub fn deadlines(&self, now: Instant) -> Option<Deadlines> {
        let Phase::Holding(s) = &self.phase else {
            return None;
        };
        let rewrite = (s.writing.is_none() && self.superseded_by.is_none()).then(|| {
            // News waits for the shortest rewrite interval; no news, for the longest.
            let after = if s.pending {
                *self.rewrite.start()
            } else {
                *self.rewrite.end()
            };
            s.last_write_at.map_or(now, |t| t + after + self.slack)
        });
        Some(Deadlines {
            keep_alive: s.next_keep_alive,
            rewrite,
            hung: s.hung_at,
        })
    }

    /// etcd says the lease is gone: granted again right away, the node must not look dead
    /// longer than needed.
    fn lose_lease(&mut self) -> Decisions {
        let lease = self.lease.take();
        self.lease_lost = true;
        self.phase = Phase::SettingUp {
            member: None,
            resuming: false,
        };
        Decisions {
            end: lease.map(|lease| SessionEnd::LeaseLost { lease }),
            ..Decisions::default()
        }
    }

    /// etcd failed: the session (if any) is over, and the next one waits a backoff.
    fn fail(&mut self, end: Option<SessionEnd>, leave: Option<usize>, now: Instant) -> Decisions {
        let first = !self.outage;
        self.outage = true;
        self.phase = Phase::SettingUp {
            member: None,
            resuming: false,
        };
        Decisions {
            transition: Some(Transition::Failed { first }),
            leave_member: leave,
            end,
            retry_at: Some(now + self.backoff.next_delay()),
            ..Decisions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use jiff::SignedDuration;
    use nodepulse_crd::wire::UsageSummary;

    use super::*;

    /// Keep-alives every 3 s, at most 1.5 s early; a hung member after 3.2 s.
    const TTL: u32 = 9;
    const LEASE: i64 = 0x42;
    const NO: Decisions = Decisions {
        transition: None,
        lease: None,
        leave_member: None,
        end: None,
        retry_at: None,
        keep_alive: false,
        write: false,
        mark_stopping: None,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn started() -> Timestamp {
        Timestamp::from_second(1_800_000_000).expect("a valid timestamp")
    }

    /// Rewrites at most every 5 s (a sample 250 ms early counts), at least every 60 s.
    fn rules() -> HeartbeatState {
        HeartbeatState::new(TTL, secs(5)..=secs(60), started())
    }

    /// Rules holding `LEASE`, newly granted at the instant returned, the streams on `member`.
    fn holding(member: Option<usize>) -> (HeartbeatState, Instant) {
        let t0 = Instant::now();
        let mut s = rules();
        s.step(Event::SetUp { member }, t0);
        s.step(Event::LeaseGranted { id: LEASE, ttl: 9 }, t0);
        s.step(Event::SessionStarted, t0);
        (s, t0)
    }

    /// The value with the load average `load1`, written `at` seconds after the start.
    fn value(load1: f64, at: i64) -> Heartbeat {
        let mut v = Heartbeat::running("worker-1", TTL, started());
        v.updated_at = started() + SignedDuration::from_secs(at);
        v.usage = Some(UsageSummary {
            load1: Some(load1),
            ..UsageSummary::default()
        });
        v
    }

    /// Another agent's value for the node, that agent started `offset` seconds from ours.
    fn other_agent(offset: i64) -> Vec<u8> {
        Heartbeat::running(
            "worker-1",
            TTL,
            started() + SignedDuration::from_secs(offset),
        )
        .to_json()
        .into_bytes()
    }

    fn sample(interval: Duration) -> Event<'static> {
        Event::Sample { interval }
    }

    fn answer() -> Event<'static> {
        Event::KeepAliveAnswered { ttl: 9 }
    }

    /// Writes `v` at `at`, as the task does on a rewrite due then, and has etcd answer at once.
    fn write(s: &mut HeartbeatState, v: &Heartbeat, at: Instant) {
        assert!(s.step(Event::RewriteDue, at).write, "a rewrite is due");
        assert_eq!(s.start_write(v, at), Some(LEASE));
        s.step(Event::WriteAnswered, at);
    }

    fn rewrite_at(s: &HeartbeatState, now: Instant) -> Option<Instant> {
        s.deadlines(now).expect("a session").rewrite
    }

    fn hung_at(s: &HeartbeatState) -> Option<Instant> {
        s.deadlines(Instant::now()).expect("a session").hung
    }

    fn next_keep_alive(s: &HeartbeatState) -> Instant {
        s.deadlines(Instant::now()).expect("a session").keep_alive
    }

    /// `retry_at` is a backoff of at most `cap` (and at least half of it) after `now`.
    fn assert_retry_within(d: &Decisions, now: Instant, cap: Duration) {
        let wait = d.retry_at.expect("a retry") - now;
        assert!(
            wait >= cap / 2 && wait <= cap,
            "{wait:?} for a cap of {cap:?}"
        );
    }

    #[test]
    fn keep_alives_go_out_every_third_of_the_ttl_in_milliseconds() {
        let t0 = Instant::now();
        let mut s = HeartbeatState::new(10, secs(5)..=secs(60), started());
        s.step(Event::SetUp { member: None }, t0);
        s.step(Event::LeaseGranted { id: LEASE, ttl: 10 }, t0);
        s.step(Event::SessionStarted, t0);
        assert_eq!(next_keep_alive(&s), t0 + ms(3333));

        let (mut s, t0) = holding(None);
        assert_eq!(next_keep_alive(&s), t0 + secs(3));
        let d = s.step(Event::KeepAliveDue, t0 + secs(3));
        assert_eq!(
            d,
            Decisions {
                keep_alive: true,
                ..NO
            }
        );
        assert_eq!(next_keep_alive(&s), t0 + secs(6));
    }

    #[test]
    fn a_keep_alive_due_before_the_next_sample_goes_out_with_it() {
        let (mut s, t0) = holding(None);
        // Due at 3 s; the next sample at 1.9 + 1 s would still come before it.
        assert!(!s.step(sample(secs(1)), t0 + ms(1900)).keep_alive);
        assert_eq!(next_keep_alive(&s), t0 + secs(3));
        // At 2 s, the next sample comes just as it is due: it goes now.
        assert!(s.step(sample(secs(1)), t0 + secs(2)).keep_alive);
        // The next one a whole period after the early one.
        assert_eq!(next_keep_alive(&s), t0 + secs(5));
    }

    #[test]
    fn a_keep_alive_goes_out_no_more_than_a_sixth_of_the_ttl_early() {
        let (mut s, t0) = holding(None);
        // At a 10 s interval every sample comes before the next keep-alive: at most 1.5 s early.
        assert!(!s.step(sample(secs(10)), t0 + ms(1499)).keep_alive);
        assert!(s.step(sample(secs(10)), t0 + ms(1500)).keep_alive);
        assert_eq!(next_keep_alive(&s), t0 + ms(4500));
    }

    #[test]
    fn a_late_keep_alive_keeps_the_original_schedule() {
        let (mut s, t0) = holding(None);
        // The thread was busy: the alarm read 400 ms late.
        assert!(s.step(Event::KeepAliveDue, t0 + ms(3400)).keep_alive);
        assert_eq!(next_keep_alive(&s), t0 + secs(6));
        // A sample that comes after the next one was due, before its alarm is read, sends it.
        assert!(s.step(sample(secs(1)), t0 + ms(6500)).keep_alive);
        assert_eq!(next_keep_alive(&s), t0 + secs(9));
    }

    #[test]
    fn no_keep_alive_answer_for_a_whole_ttl_ends_the_session() {
        let (mut s, t0) = holding(None);
        for at in [3, 6, 9] {
            // 9 s without an answer is not more than the TTL yet.
            assert!(
                s.step(Event::KeepAliveDue, t0 + secs(at)).keep_alive,
                "{at}"
            );
        }
        let now = t0 + secs(12);
        let d = s.step(Event::KeepAliveDue, now);
        assert_eq!(d.end, Some(SessionEnd::Unanswered { lease: LEASE }));
        assert_eq!(d.transition, Some(Transition::Failed { first: true }));
        assert!(!d.keep_alive && d.leave_member.is_none());
        assert_retry_within(&d, now, ms(100));
        assert_eq!(s.deadlines(now), None, "no lease held");

        // An answer starts the count again.
        let (mut s, t0) = holding(None);
        s.step(Event::KeepAliveDue, t0 + secs(3));
        s.step(answer(), t0 + secs(8));
        for at in [6, 9, 12, 15] {
            assert!(
                s.step(Event::KeepAliveDue, t0 + secs(at)).keep_alive,
                "{at}"
            );
        }
        assert!(s.step(Event::KeepAliveDue, t0 + secs(18)).end.is_some());
    }

    #[test]
    fn a_hung_member_is_left_a_third_of_the_ttl_after_the_oldest_unanswered_keep_alive() {
        let (mut s, t0) = holding(Some(1));
        s.step(Event::KeepAliveDue, t0 + secs(3));
        // One keep-alive unanswered is no sign yet.
        assert_eq!(hung_at(&s), None);
        s.step(Event::KeepAliveDue, t0 + secs(6));
        assert_eq!(hung_at(&s), Some(t0 + ms(6200)));
        // Exactly at the deadline, with no answer there.
        let now = t0 + ms(6200);
        let d = s.step(Event::HungDeadline, now);
        assert_eq!(d.leave_member, Some(1));
        assert_eq!(
            d.end,
            Some(SessionEnd::MemberHung {
                lease: LEASE,
                silent: ms(6200)
            })
        );
        assert_eq!(d.transition, Some(Transition::Failed { first: true }));
        assert_retry_within(&d, now, ms(100));
        // The lease is resumed on the next member, not granted again.
        let d = s.step(Event::SetUp { member: Some(2) }, now);
        assert_eq!(d.lease, Some(LeaseRequest::Resume(LEASE)));
    }

    #[test]
    fn the_hung_deadline_counts_from_the_oldest_keep_alive_however_early_the_next() {
        let (mut s, t0) = holding(Some(0));
        s.step(Event::KeepAliveDue, t0 + secs(3));
        // The next one goes 1 s early with a sample; the deadline still counts from 3 s.
        assert!(s.step(sample(secs(1)), t0 + secs(5)).keep_alive);
        assert_eq!(hung_at(&s), Some(t0 + ms(6200)));
        // A third unanswered one leaves it where it is.
        s.step(Event::KeepAliveDue, t0 + secs(8));
        assert_eq!(hung_at(&s), Some(t0 + ms(6200)));
    }

    #[test]
    fn an_answer_there_at_the_hung_deadline_wins() {
        let (mut s, t0) = holding(Some(1));
        s.step(Event::KeepAliveDue, t0 + secs(3));
        s.step(Event::KeepAliveDue, t0 + secs(6));
        // The answer and the deadline at the same instant: the task reads the answer first.
        let at = t0 + ms(6200);
        assert_eq!(s.step(answer(), at), NO);
        assert_eq!(s.step(Event::HungDeadline, at), NO);
        assert_eq!(hung_at(&s), None);
        // The next unanswered pair counts from the first of them.
        s.step(Event::KeepAliveDue, t0 + secs(9));
        s.step(Event::KeepAliveDue, t0 + secs(12));
        assert_eq!(hung_at(&s), Some(t0 + ms(12200)));
        // A deadline read a hair early (it was moved) does nothing.
        assert_eq!(s.step(Event::HungDeadline, t0 + ms(12199)), NO);
    }

    #[test]
    fn with_no_other_member_nothing_counts_as_hung() {
        let (mut s, t0) = holding(None);
        for at in [3, 6, 9] {
            s.step(Event::KeepAliveDue, t0 + secs(at));
            assert_eq!(hung_at(&s), None);
        }
        assert_eq!(s.step(Event::HungDeadline, t0 + secs(10)), NO);
    }

    #[test]
    fn a_lease_gone_while_a_keep_alive_is_in_flight_is_granted_again_at_once() {
        let (mut s, t0) = holding(Some(0));
        assert!(s.step(Event::KeepAliveDue, t0 + secs(3)).keep_alive);
        // etcd answers it with TTL 0: the lease expired meanwhile.
        let d = s.step(Event::KeepAliveAnswered { ttl: 0 }, t0 + ms(3100));
        assert_eq!(
            d,
            Decisions {
                end: Some(SessionEnd::LeaseLost { lease: LEASE }),
                ..NO
            },
            "no backoff, no failure, no member left"
        );
        let d = s.step(Event::SetUp { member: Some(0) }, t0 + ms(3100));
        assert_eq!(d.lease, Some(LeaseRequest::Grant));
        let d = s.step(Event::LeaseGranted { id: 0x43, ttl: 9 }, t0 + ms(3200));
        assert_eq!(
            d.transition,
            Some(Transition::Granted {
                id: 0x43,
                ttl: 9,
                regranted: true
            })
        );
        assert_eq!(s.step(Event::SessionStarted, t0 + ms(3300)), NO);
        assert_eq!(
            s.step(Event::Shutdown, t0 + secs(4)).mark_stopping,
            Some(0x43)
        );
    }

    #[test]
    fn the_first_set_up_grants_and_a_later_one_resumes_the_lease_held() {
        let t0 = Instant::now();
        let mut s = rules();
        assert_eq!(s.deadlines(t0), None);
        let d = s.step(Event::SetUp { member: None }, t0);
        assert_eq!(
            d,
            Decisions {
                lease: Some(LeaseRequest::Grant),
                ..NO
            }
        );
        let d = s.step(Event::LeaseGranted { id: LEASE, ttl: 9 }, t0);
        assert_eq!(
            d.transition,
            Some(Transition::Granted {
                id: LEASE,
                ttl: 9,
                regranted: false
            })
        );
        assert_eq!(s.step(Event::SessionStarted, t0), NO);
        // etcd goes away: the lease may outlive the outage.
        s.step(Event::Failed { timed_out: false }, t0 + secs(1));
        let d = s.step(Event::SetUp { member: None }, t0 + secs(2));
        assert_eq!(d.lease, Some(LeaseRequest::Resume(LEASE)));
        let d = s.step(Event::SessionStarted, t0 + secs(2));
        assert_eq!(d.transition, Some(Transition::Resumed { id: LEASE }));
    }

    #[test]
    fn a_lease_etcd_no_longer_has_is_replaced_and_counted_as_a_regrant() {
        let (mut s, t0) = holding(None);
        s.step(Event::Failed { timed_out: false }, t0 + secs(1));
        s.step(Event::SetUp { member: None }, t0 + secs(20));
        let d = s.step(Event::LeaseNotFound, t0 + secs(20));
        assert_eq!(
            d,
            Decisions {
                lease: Some(LeaseRequest::Grant),
                ..NO
            }
        );
        let d = s.step(Event::LeaseGranted { id: 0x43, ttl: 9 }, t0 + secs(20));
        assert_eq!(
            d.transition,
            Some(Transition::Granted {
                id: 0x43,
                ttl: 9,
                regranted: true
            })
        );
        // Not a resume: nothing to say once the stream is open.
        assert_eq!(s.step(Event::SessionStarted, t0 + secs(20)), NO);
        // The next set-up resumes the new lease, and a later grant is no regrant.
        s.step(Event::Failed { timed_out: false }, t0 + secs(21));
        let d = s.step(Event::SetUp { member: None }, t0 + secs(22));
        assert_eq!(d.lease, Some(LeaseRequest::Resume(0x43)));
    }

    #[test]
    fn failures_back_off_up_to_a_third_of_the_ttl_and_an_outage_is_logged_once() {
        let t0 = Instant::now();
        let mut s = rules();
        for n in 0..8u32 {
            let now = t0 + secs(n.into());
            s.step(Event::SetUp { member: None }, now);
            let d = s.step(Event::Failed { timed_out: false }, now);
            assert_eq!(d.transition, Some(Transition::Failed { first: n == 0 }));
            // 100 ms doubling, up to a third of the 9 s TTL.
            assert_retry_within(&d, now, (ms(100) * 2u32.pow(n)).min(secs(3)));
        }
        // Held again: the next outage is logged, and backs off from the start.
        s.step(Event::SetUp { member: None }, t0 + secs(10));
        s.step(Event::LeaseGranted { id: LEASE, ttl: 9 }, t0 + secs(10));
        s.step(Event::SessionStarted, t0 + secs(10));
        let d = s.step(Event::Failed { timed_out: true }, t0 + secs(11));
        assert_eq!(d.transition, Some(Transition::Failed { first: true }));
        assert_retry_within(&d, t0 + secs(11), ms(100));

        // Never more than 5 s, however long the TTL.
        let mut s = HeartbeatState::new(60, secs(5)..=secs(60), started());
        let mut last = Decisions::default();
        for _ in 0..10 {
            s.step(Event::SetUp { member: None }, t0);
            last = s.step(Event::Failed { timed_out: false }, t0);
        }
        assert_retry_within(&last, t0, secs(5));
    }

    #[test]
    fn a_set_up_call_unanswered_leaves_its_member() {
        let t0 = Instant::now();
        let mut s = rules();
        s.step(Event::SetUp { member: Some(2) }, t0);
        let d = s.step(Event::Failed { timed_out: true }, t0);
        assert_eq!(d.leave_member, Some(2));
        // A refusal is no hang.
        s.step(Event::SetUp { member: Some(0) }, t0);
        assert_eq!(
            s.step(Event::Failed { timed_out: false }, t0).leave_member,
            None
        );
        // No other member to go to.
        s.step(Event::SetUp { member: None }, t0);
        assert_eq!(
            s.step(Event::Failed { timed_out: true }, t0).leave_member,
            None
        );
        // Within a session, the keep-alives' own deadline says when the member is hung.
        let (mut s, t0) = holding(Some(1));
        let d = s.step(Event::Failed { timed_out: true }, t0 + secs(1));
        assert_eq!(d.leave_member, None);
        assert_eq!(d.end, None, "the task ended the session itself");
    }

    #[test]
    fn the_value_goes_on_a_new_or_resumed_lease_at_once() {
        let (mut s, t0) = holding(None);
        assert_eq!(rewrite_at(&s, t0), Some(t0), "due now");
        let d = s.step(Event::RewriteDue, t0);
        assert_eq!(d, Decisions { write: true, ..NO });
        let v = value(0.5, 0);
        assert_eq!(s.start_write(&v, t0), Some(LEASE));
        s.step(Event::WriteAnswered, t0 + ms(10));
        // Resumed after an outage: the same value is written again, it may have been lost.
        s.step(Event::Failed { timed_out: false }, t0 + secs(1));
        s.step(Event::SetUp { member: None }, t0 + secs(2));
        s.step(Event::SessionStarted, t0 + secs(2));
        assert_eq!(rewrite_at(&s, t0 + secs(2)), Some(t0 + secs(2)));
        assert!(s.step(Event::RewriteDue, t0 + secs(2)).write);
        assert_eq!(s.start_write(&v, t0 + secs(2)), Some(LEASE));
    }

    #[test]
    fn news_waits_for_the_min_interval_counted_start_to_start() {
        let (mut s, t0) = holding(None);
        assert!(s.step(Event::RewriteDue, t0).write);
        assert_eq!(s.start_write(&value(0.5, 0), t0), Some(LEASE));
        // A slow disk: etcd answers 3 s later; the interval still counts from the start.
        s.step(Event::WriteAnswered, t0 + secs(3));
        assert!(!s.step(sample(secs(1)), t0 + ms(4749)).write);
        // Within a twentieth of the 5 s: this sample brings the write.
        let d = s.step(sample(secs(1)), t0 + ms(4750));
        assert!(d.write);
        assert_eq!(s.start_write(&value(0.6, 4), t0 + ms(4750)), Some(LEASE));
    }

    #[test]
    fn a_rewrite_of_its_own_waits_a_twentieth_past_the_min_interval() {
        let (mut s, t0) = holding(None);
        write(&mut s, &value(0.5, 0), t0);
        // News with no sample to carry it (a new configuration).
        assert_eq!(s.step(Event::ConfigChanged, t0 + secs(1)), NO);
        assert_eq!(rewrite_at(&s, t0 + secs(1)), Some(t0 + ms(5250)));
        assert!(s.step(Event::RewriteDue, t0 + ms(5250)).write);
    }

    #[test]
    fn with_nothing_new_the_same_value_goes_out_every_max_interval() {
        let (mut s, t0) = holding(None);
        let v = value(0.5, 0);
        write(&mut s, &v, t0);
        assert_eq!(rewrite_at(&s, t0), Some(t0 + ms(60_250)));
        let later = t0 + ms(60_250);
        assert!(s.step(Event::RewriteDue, later).write);
        // The same value but for `updatedAt` is written all the same: it refreshes `updatedAt`.
        assert_eq!(s.start_write(&value(0.5, 60), later), Some(LEASE));
    }

    #[test]
    fn a_value_with_nothing_new_is_not_written() {
        let (mut s, t0) = holding(None);
        write(&mut s, &value(0.5, 0), t0);
        // A sample is taken as news until the value is built.
        assert!(s.step(sample(secs(5)), t0 + secs(5)).write);
        assert_eq!(s.start_write(&value(0.5, 5), t0 + secs(5)), None);
        // Nothing pending: the refresh counts from the last write.
        assert_eq!(rewrite_at(&s, t0 + secs(5)), Some(t0 + ms(60_250)));
    }

    #[test]
    fn one_write_at_a_time() {
        let (mut s, t0) = holding(None);
        assert!(s.step(Event::RewriteDue, t0).write);
        assert_eq!(s.start_write(&value(0.5, 0), t0), Some(LEASE));
        assert_eq!(rewrite_at(&s, t0 + secs(1)), None, "no rewrite deadline");
        // A slow disk: the min interval passes with the write still in flight.
        assert!(s.step(Event::KeepAliveDue, t0 + secs(3)).keep_alive);
        s.step(answer(), t0 + ms(3010));
        assert!(!s.step(sample(secs(10)), t0 + secs(6)).write);
        assert_eq!(s.step(Event::RewriteDue, t0 + secs(6)), NO);
        assert_eq!(s.start_write(&value(0.6, 6), t0 + secs(6)), None);
        // Answered: the news of the sample is due at once.
        s.step(Event::WriteAnswered, t0 + secs(7));
        assert_eq!(rewrite_at(&s, t0 + secs(7)), Some(t0 + ms(5250)));
    }

    #[test]
    fn a_failed_write_is_tried_again_the_min_interval_after_its_answer() {
        let (mut s, t0) = holding(None);
        let v = value(0.5, 0);
        assert!(s.step(Event::RewriteDue, t0).write);
        s.start_write(&v, t0);
        let d = s.step(
            Event::WriteFailed {
                lease_not_found: false,
            },
            t0 + secs(2),
        );
        assert_eq!(
            d, NO,
            "the session goes on: the keep-alives tell whether etcd is gone"
        );
        assert_eq!(rewrite_at(&s, t0 + secs(2)), Some(t0 + ms(7250)));
        assert!(s.step(Event::RewriteDue, t0 + ms(7250)).write);
        assert_eq!(
            s.start_write(&v, t0 + ms(7250)),
            Some(LEASE),
            "never written"
        );
    }

    #[test]
    fn a_write_etcd_refuses_for_a_lease_gone_brings_a_new_lease() {
        let (mut s, t0) = holding(None);
        s.step(Event::RewriteDue, t0);
        s.start_write(&value(0.5, 0), t0);
        let d = s.step(
            Event::WriteFailed {
                lease_not_found: true,
            },
            t0 + secs(1),
        );
        assert_eq!(
            d,
            Decisions {
                end: Some(SessionEnd::LeaseLost { lease: LEASE }),
                ..NO
            }
        );
        let d = s.step(Event::SetUp { member: None }, t0 + secs(1));
        assert_eq!(d.lease, Some(LeaseRequest::Grant));
    }

    #[test]
    fn a_failure_during_a_write_ends_the_session_and_its_answer_counts_for_nothing() {
        let (mut s, t0) = holding(None);
        let v = value(0.5, 0);
        s.step(Event::RewriteDue, t0);
        s.start_write(&v, t0);
        let d = s.step(Event::Failed { timed_out: false }, t0 + secs(1));
        assert_eq!(d.transition, Some(Transition::Failed { first: true }));
        assert_eq!(s.step(Event::WriteAnswered, t0 + secs(2)), NO);
        assert_eq!(s.start_write(&v, t0 + secs(2)), None, "no session");
        s.step(Event::SetUp { member: None }, t0 + secs(3));
        s.step(Event::SessionStarted, t0 + secs(3));
        assert!(s.step(Event::RewriteDue, t0 + secs(3)).write);
        assert_eq!(s.start_write(&v, t0 + secs(3)), Some(LEASE));
    }

    #[test]
    fn a_key_deleted_by_hand_is_written_again_at_once() {
        let (mut s, t0) = holding(None);
        let v = value(0.5, 0);
        write(&mut s, &v, t0);
        let now = t0 + secs(1);
        let d = s.step(Event::KeyDeleted, now);
        assert_eq!(
            d,
            Decisions {
                transition: Some(Transition::KeyDeleted { lease: LEASE }),
                ..NO
            }
        );
        assert_eq!(rewrite_at(&s, now), Some(now));
        assert!(s.step(Event::RewriteDue, now).write);
        assert_eq!(
            s.start_write(&v, now),
            Some(LEASE),
            "the same value, put back"
        );
    }

    #[test]
    fn a_newer_agents_value_on_the_key_stops_the_writes_until_the_key_is_deleted() {
        let (mut s, t0) = holding(None);
        write(&mut s, &value(0.5, 0), t0);
        let newer = other_agent(30);
        let put = Event::KeyPut {
            lease: 0x99,
            value: &newer,
        };
        let d = s.step(put, t0 + secs(1));
        assert_eq!(
            d.transition,
            Some(Transition::Superseded {
                by: started() + SignedDuration::from_secs(30)
            })
        );
        assert_eq!(s.step(put, t0 + secs(2)), NO, "said once");
        assert_eq!(rewrite_at(&s, t0 + secs(2)), None);
        // The keep-alives go on: the lease is still ours to mark Stopping.
        assert!(s.step(Event::KeepAliveDue, t0 + secs(3)).keep_alive);
        s.step(answer(), t0 + ms(3010));
        assert!(!s.step(sample(secs(10)), t0 + secs(6)).write);
        assert_eq!(s.step(Event::RewriteDue, t0 + secs(6)), NO);
        assert_eq!(s.start_write(&value(0.6, 6), t0 + secs(6)), None);
        // The newer agent's lease expired: the key is ours again.
        s.step(Event::KeyDeleted, t0 + secs(7));
        assert_eq!(rewrite_at(&s, t0 + secs(7)), Some(t0 + secs(7)));
    }

    #[test]
    fn an_older_agents_value_is_overwritten_and_our_own_is_no_news() {
        let (mut s, t0) = holding(None);
        let v = value(0.5, 0);
        write(&mut s, &v, t0);
        let ours = v.to_json().into_bytes();
        let own = Event::KeyPut {
            lease: LEASE,
            value: &ours,
        };
        assert_eq!(s.step(own, t0 + ms(10)), NO);
        assert_eq!(rewrite_at(&s, t0), Some(t0 + ms(60_250)));
        let junk = Event::KeyPut {
            lease: 0x99,
            value: b"not json",
        };
        assert_eq!(s.step(junk, t0 + ms(20)), NO);
        assert_eq!(rewrite_at(&s, t0), Some(t0 + ms(60_250)));
        // An older agent (a stopping pod) wrote over ours.
        let older = other_agent(-30);
        let put = Event::KeyPut {
            lease: 0x77,
            value: &older,
        };
        assert_eq!(s.step(put, t0 + secs(1)), NO);
        assert_eq!(rewrite_at(&s, t0), Some(t0 + ms(5250)));
        assert!(s.step(Event::RewriteDue, t0 + ms(5250)).write);
        assert_eq!(s.start_write(&v, t0 + ms(5250)), Some(LEASE), "taken back");
    }

    #[test]
    fn shutdown_mid_write_marks_the_lease_stopping_and_ignores_what_comes_after() {
        let (mut s, t0) = holding(Some(1));
        s.step(Event::RewriteDue, t0);
        s.start_write(&value(0.5, 0), t0);
        let d = s.step(Event::Shutdown, t0 + secs(1));
        assert_eq!(
            d,
            Decisions {
                mark_stopping: Some(LEASE),
                ..NO
            }
        );
        assert_eq!(s.deadlines(t0 + secs(1)), None);
        for event in [
            Event::WriteAnswered,
            Event::KeyDeleted,
            Event::KeepAliveDue,
            Event::HungDeadline,
            Event::Failed { timed_out: true },
            Event::SetUp { member: Some(1) },
            Event::Shutdown,
        ] {
            assert_eq!(s.step(event, t0 + secs(2)), NO, "{event:?}");
        }
    }

    #[test]
    fn shutdown_marks_a_lease_held_before_an_outage_and_nothing_without_a_lease() {
        let t0 = Instant::now();
        let mut s = rules();
        assert_eq!(
            s.step(Event::Shutdown, t0).mark_stopping,
            None,
            "etcd never reached"
        );
        // etcd away: the lease may still be alive, and the key on it.
        let (mut s, t0) = holding(None);
        s.step(Event::Failed { timed_out: false }, t0 + secs(1));
        assert_eq!(
            s.step(Event::Shutdown, t0 + secs(2)).mark_stopping,
            Some(LEASE)
        );
        // A lease etcd let go is not marked.
        let (mut s, t0) = holding(None);
        s.step(Event::KeepAliveAnswered { ttl: 0 }, t0 + secs(1));
        assert_eq!(s.step(Event::Shutdown, t0 + secs(2)).mark_stopping, None);
    }
}
