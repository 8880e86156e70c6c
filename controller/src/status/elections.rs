//! etcd's elections as the controller sees them: the raft term in etcd's response headers, and,
//! after a term change, the time-to-live of the leases of the nodes whose liveness the rules
//! doubt.
//!
//! A new etcd leader restarts every lease at its full TTL (its lessor's promotion; checkpoints
//! cover only leases with more than five minutes left), so while leaders change faster than the
//! TTL a dead agent's key never expires. The rules ([`crate::status::liveness`]) therefore doubt
//! every Alive node after a term change until its agent proves it renews its lease; this task
//! only reports what etcd says: each term, with when it was seen, and each lease's remaining TTL,
//! with when it was asked.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::StreamExt;
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, node_of_heartbeat_key};
use nodepulse_etcd::list_prefix;
use tokio::sync::{mpsc, watch};

/// How often the term is read: a term change is seen at most this late.
const TERM_PROBE: Duration = Duration::from_millis(250);

/// How often each doubted node's lease is asked for its time-to-live.
const AUDIT_ROUND: Duration = Duration::from_millis(500);

/// How long one etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Most lease lookups in flight at once.
const MAX_AUDITS: usize = 64;

/// What etcd says about its elections and the doubted nodes' leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionEvent {
    /// A response header carried `term`.
    Term {
        /// The raft term.
        term: u64,
        /// When the response arrived.
        seen_at: Instant,
    },
    /// A node's lease, as etcd's leader answered a time-to-live request for it.
    LeaseAudit {
        /// The node whose heartbeat key is on the lease.
        node: String,
        /// The lease.
        lease: i64,
        /// The raft term of the answer.
        term: u64,
        /// The remaining TTL etcd reported, in whole seconds (rounded down).
        remaining_secs: i64,
        /// When the request went out.
        sent_at: Instant,
        /// When the answer arrived.
        received_at: Instant,
    },
}

/// Reads etcd's term every [`TERM_PROBE`], and audits the leases of the nodes in `doubted`
/// every [`AUDIT_ROUND`] while there are any.
pub struct ElectionWatcher {
    etcd: Client,
    events: mpsc::Sender<ElectionEvent>,
    doubted: watch::Receiver<BTreeSet<String>>,
}

impl ElectionWatcher {
    /// A watcher sending to `events`, auditing the nodes `doubted` names.
    pub fn new(
        etcd: Client,
        events: mpsc::Sender<ElectionEvent>,
        doubted: watch::Receiver<BTreeSet<String>>,
    ) -> Self {
        ElectionWatcher {
            etcd,
            events,
            doubted,
        }
    }

    /// Runs until the receiver of its events is gone. A failed call is only logged at debug
    /// level: the heartbeat watch says when etcd is away.
    pub async fn run(mut self) {
        let mut probe = tokio::time::interval(TERM_PROBE);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut audit = tokio::time::interval(AUDIT_ROUND);
        audit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let events = tokio::select! {
                _ = probe.tick() => self.term().await.into_iter().collect(),
                _ = audit.tick() => self.audit().await,
            };
            for event in events {
                if self.events.send(event).await.is_err() {
                    return;
                }
            }
        }
    }

    /// The term, from the header of a linearizable read of one key (answered only with a
    /// leader, and allowed to a controller that may read the heartbeats).
    async fn term(&mut self) -> Option<ElectionEvent> {
        let read = self.etcd.get(HEARTBEAT_PREFIX, None);
        match tokio::time::timeout(CALL_TIMEOUT, read).await {
            Ok(Ok(resp)) => Some(ElectionEvent::Term {
                term: resp.header()?.raft_term(),
                seen_at: Instant::now(),
            }),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading etcd's term failed");
                None
            }
            Err(_) => None,
        }
    }

    /// The time-to-live of every doubted node's lease (none while no node is doubted).
    async fn audit(&mut self) -> Vec<ElectionEvent> {
        let doubted = self.doubted.borrow().clone();
        if doubted.is_empty() {
            return Vec::new();
        }
        let listed = match tokio::time::timeout(
            CALL_TIMEOUT,
            list_prefix(&mut self.etcd, HEARTBEAT_PREFIX, true),
        )
        .await
        {
            Ok(Ok(listing)) => listing,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "listing the heartbeat keys for a lease audit failed");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let leases: Vec<(String, i64)> = listed
            .kvs
            .iter()
            .filter(|kv| kv.lease() != 0)
            .filter_map(|kv| {
                let node = node_of_heartbeat_key(kv.key())?;
                doubted
                    .contains(node)
                    .then(|| (node.to_string(), kv.lease()))
            })
            .collect();
        let etcd = self.etcd.clone();
        futures::stream::iter(leases)
            .map(|(node, lease)| {
                let mut etcd = etcd.clone();
                async move {
                    let sent_at = Instant::now();
                    let asked = etcd.lease_time_to_live(lease, None);
                    let resp = tokio::time::timeout(CALL_TIMEOUT, asked).await.ok()?.ok()?;
                    Some(ElectionEvent::LeaseAudit {
                        node,
                        lease,
                        term: resp.header()?.raft_term(),
                        remaining_secs: resp.ttl(),
                        sent_at,
                        received_at: Instant::now(),
                    })
                }
            })
            .buffer_unordered(MAX_AUDITS)
            .filter_map(std::future::ready)
            .collect()
            .await
    }
}
