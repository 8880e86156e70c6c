//! Watches the heartbeat prefix in etcd and turns it into liveness events: a full snapshot on
//! start and after every watch failure, then one event per put or delete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::Client;
use nodepulse_crd::etcd::Backoff;
use nodepulse_crd::watch::{EtcdWatcher, WatchEvent, WatcherSettings};
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, Heartbeat, node_of_heartbeat_key, validate_node_name};
use tokio::sync::mpsc;

/// What the heartbeat prefix says about the nodes.
#[derive(Debug)]
pub enum HeartbeatEvent {
    /// Every heartbeat key present at one revision: nodes absent from it are not alive.
    Snapshot {
        /// The keys present, by node.
        heartbeats: BTreeMap<String, Option<Heartbeat>>,
        /// The store is not the one seen before (its revision went back: etcd rebuilt or
        /// restored): a key absent from it may not have been written again yet by a live agent.
        store_replaced: bool,
    },
    /// A node's heartbeat key was written (`None`: its value does not parse, but the key, and
    /// so the lease, is there).
    Put {
        /// The node.
        node: String,
        /// The value written.
        heartbeat: Option<Heartbeat>,
    },
    /// A node's heartbeat key was deleted: its lease expired or was revoked, or, when
    /// `lease_left` says the lease still lives, someone deleted the key by hand.
    Delete {
        /// The node.
        node: String,
        /// The value just before the delete, when etcd still had it.
        last: Option<Heartbeat>,
        /// How long the key's lease still lives, if it does: the agent holding it writes the
        /// key again within a third of its TTL, so the node is not dead (yet).
        lease_left: Option<Duration>,
        /// When the delete event arrived, to measure how fast the status follows.
        seen_at: Instant,
    },
    /// The watch broke: until the next snapshot, the controller cannot see the heartbeats.
    Interrupted {
        /// When it broke.
        since: Instant,
    },
}

/// Lists and watches `/monitor/heartbeat/`, forever.
pub struct HeartbeatWatcher {
    etcd: Client,
    events: mpsc::Sender<HeartbeatEvent>,
}

impl HeartbeatWatcher {
    /// A watcher sending to `events`.
    pub fn new(etcd: Client, events: mpsc::Sender<HeartbeatEvent>) -> Self {
        HeartbeatWatcher { etcd, events }
    }

    /// Lists, then watches from the list's revision + 1; after any failure (etcd away, stream
    /// broken, revision compacted, etcd rebuilt) lists again, so no delete can slip through
    /// unnoticed. Returns only when the receiver is gone.
    pub async fn run(self) {
        let settings = WatcherSettings {
            // The controller trusts a fresh list, not its memory of the events.
            relist_after_break: true,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_millis(2500)),
            ..WatcherSettings::prefix("heartbeat watch")
        };
        let mut watcher = EtcdWatcher::new(self.etcd.clone(), HEARTBEAT_PREFIX, settings);
        let mut revision = 0;
        loop {
            let event = watcher.next().await;
            let store_replaced = match &event {
                WatchEvent::Listed { revision: r, .. } => std::mem::replace(&mut revision, *r) > *r,
                WatchEvent::Put(kv) => {
                    revision = revision.max(kv.mod_revision);
                    false
                }
                WatchEvent::Delete { revision: r, .. } => {
                    revision = revision.max(*r);
                    false
                }
                WatchEvent::Interrupted => false,
            };
            let lease = match &event {
                WatchEvent::Delete { prev: Some(kv), .. } => kv.lease,
                _ => 0,
            };
            let Some(mut event) = liveness_event(event) else {
                continue;
            };
            match &mut event {
                HeartbeatEvent::Delete { lease_left, .. } if lease != 0 => {
                    *lease_left = self.lease_left(lease).await;
                }
                HeartbeatEvent::Snapshot {
                    store_replaced: r, ..
                } => *r = store_replaced,
                _ => {}
            }
            if self.events.send(event).await.is_err() {
                return;
            }
        }
    }
}

impl HeartbeatWatcher {
    /// How long `lease` still lives, if it does. A key whose lease expired is deleted with the
    /// lease, so a lease that lives past its key's delete means the key was deleted by hand.
    /// No answer counts as expired: the node is then judged as before, by the delete.
    async fn lease_left(&self, lease: i64) -> Option<Duration> {
        let mut etcd = self.etcd.clone();
        let asked = etcd.lease_time_to_live(lease, None);
        match tokio::time::timeout(Duration::from_secs(1), asked).await {
            Ok(Ok(r)) if r.ttl() > 0 => Some(Duration::from_secs(r.ttl().unsigned_abs())),
            _ => None,
        }
    }
}

/// What one watch event says about the nodes (`None`: nothing, e.g. a key no agent writes).
fn liveness_event(event: WatchEvent) -> Option<HeartbeatEvent> {
    Some(match event {
        WatchEvent::Listed { revision, kvs } => {
            let mut snapshot = BTreeMap::new();
            for kv in &kvs {
                if let Some(node) = heartbeat_node(&kv.key) {
                    snapshot.insert(node.to_string(), parse(node, &kv.value));
                }
            }
            tracing::debug!(revision, nodes = snapshot.len(), "listed heartbeats");
            HeartbeatEvent::Snapshot {
                heartbeats: snapshot,
                store_replaced: false,
            }
        }
        WatchEvent::Put(kv) => {
            let node = heartbeat_node(&kv.key)?.to_string();
            HeartbeatEvent::Put {
                heartbeat: parse(&node, &kv.value),
                node,
            }
        }
        WatchEvent::Delete { key, prev, .. } => {
            let node = heartbeat_node(&key)?.to_string();
            HeartbeatEvent::Delete {
                last: prev.and_then(|prev| parse(&node, &prev.value)),
                lease_left: None,
                node,
                seen_at: Instant::now(),
            }
        }
        WatchEvent::Interrupted => HeartbeatEvent::Interrupted {
            since: Instant::now(),
        },
    })
}

/// The node of a key under the heartbeat prefix, or `None` (logged) for a key no agent writes:
/// a nested path or a name that cannot be a node (and so could never be a MonitorNode).
fn heartbeat_node(key: &[u8]) -> Option<&str> {
    let shown = || {
        String::from_utf8_lossy(key)
            .chars()
            .take(300)
            .collect::<String>()
    };
    let Some(node) = node_of_heartbeat_key(key) else {
        tracing::warn!(key = %shown(), "ignoring a key under the heartbeat prefix that is not /monitor/heartbeat/<node>");
        return None;
    };
    if let Err(e) = validate_node_name(node) {
        tracing::warn!(key = %shown(), error = %e, "ignoring a heartbeat key whose name cannot be a node");
        return None;
    }
    Some(node)
}

fn parse(node: &str, value: &[u8]) -> Option<Heartbeat> {
    match Heartbeat::parse(value) {
        Ok(hb) => Some(hb),
        Err(e) => {
            // Not written by an agent: the key exists, so the node counts as alive, but none
            // of the value is used.
            tracing::warn!(node, bytes = value.len(), error = %e, "heartbeat value does not parse; using the key alone (alive), ignoring the value");
            None
        }
    }
}
