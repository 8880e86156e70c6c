//! The heartbeat key `/monitor/heartbeat/<node>`, bound to a lease we keep alive.
//!
//! Liveness rides on the lease keep-alive, which costs etcd almost nothing; the key's value is
//! rewritten only when it has something new to say, and at most every `--heartbeat-min-interval`;
//! with nothing new, every `--heartbeat-max-interval` all the same, so that its `updatedAt` says
//! the agent is there even at an hour's sampling interval.
//! Renewals never wait for a value write: a put stuck behind a slow etcd disk runs beside them.
//! Each sample wakes the heartbeat too: a keep-alive due before the next sample, and a rewrite
//! due within a twentieth of the minimum interval, go out then, so that at short sampling
//! intervals neither wakes the agent on its own.
//!
//! A clean stop does not revoke the lease: it marks the value Stopping and lets the lease run out.
//! An agent replaced within the TTL (a rolling update, a deleted pod) takes the key over on a
//! lease of its own before the old one expires, so its node never shows Dead; an agent that does
//! not come back leaves its node Dead (agent stopped) one TTL later.
//!
//! Two parts, decisions apart from effects: [`state`] holds the rules (events and the time in,
//! decisions out, no I/O), and `task` ([`HeartbeatLease`]) does the etcd calls, the alarms and
//! the logging they decide on.

pub mod state;
mod task;

pub use task::{HeartbeatInputs, HeartbeatLease};
