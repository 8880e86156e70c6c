//! Heartbeats in etcd into MonitorNode status, in one direction:
//!
//! [`heartbeats`] (list + watch `/monitor/heartbeat/`) -> [`liveness`] (the rules: Alive, Dead
//! or Unknown, pure) -> [`record`] (each node's verdict and what was written) -> [`render`] (the
//! status a record calls for) -> [`writer`] (when each status is written) -> [`apply`] (the
//! server-side apply), with [`events`] (the transitions' Events) and [`node_condition`] (the
//! `NodePulseHeartbeat` condition on the Node) going out with the writes. [`elections`] (etcd's
//! raft term, and the leases of the nodes a leader change put in doubt) feeds [`liveness`]
//! beside [`heartbeats`]. [`tracker`] is the task that moves the events through;
//! [`orphans`] deletes the MonitorNodes of names with no Node once their heartbeat is long gone.

pub mod apply;
pub mod elections;
pub mod events;
pub mod heartbeats;
pub mod liveness;
pub mod node_condition;
pub mod orphans;
pub mod record;
pub mod render;
pub mod tracker;
pub mod writer;
