//! Watches the heartbeat prefix in etcd and turns it into liveness events: a full snapshot on
//! start and after every watch failure, then one event per put or delete.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use nodepulse_crd::etcd::Backoff;
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, Heartbeat, node_of_heartbeat_key, validate_node_name};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// What the heartbeat prefix says about the nodes.
#[derive(Debug)]
pub enum LivenessEvent {
    /// Every heartbeat key present at one revision: nodes absent from it are not alive.
    Snapshot(BTreeMap<String, Option<Heartbeat>>),
    /// A node's heartbeat key was written (`None`: its value does not parse, but the key, and
    /// so the lease, is there).
    Put {
        /// The node.
        node: String,
        /// The value written.
        heartbeat: Option<Heartbeat>,
    },
    /// A node's heartbeat key was deleted: its lease expired or was revoked.
    Delete {
        /// The node.
        node: String,
        /// The value just before the delete, when etcd still had it.
        last: Option<Heartbeat>,
        /// When the delete event arrived, to measure how fast the status follows.
        seen_at: Instant,
    },
}

/// Lists and watches `/monitor/heartbeat/`, forever.
pub struct HeartbeatWatcher {
    etcd: Client,
    events: mpsc::Sender<LivenessEvent>,
}

impl HeartbeatWatcher {
    /// A watcher sending to `events`.
    pub fn new(etcd: Client, events: mpsc::Sender<LivenessEvent>) -> Self {
        HeartbeatWatcher { etcd, events }
    }

    /// Lists, then watches from the list's revision + 1; on any failure (etcd away, stream
    /// broken, revision compacted) waits with backoff and starts over with a new list, so no
    /// delete can slip through unnoticed. Returns only when the receiver is gone.
    pub async fn run(mut self) {
        // At most 2.5 s between retries: the watch must be back within 5 s of etcd's return,
        // and a retry is due at most one cap after the last failure.
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(2500));
        loop {
            match self.list_and_watch(&mut backoff).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "heartbeat watch interrupted; re-listing after backoff");
                    backoff.wait().await;
                }
            }
        }
    }

    async fn list_and_watch(&mut self, backoff: &mut Backoff) -> Result<()> {
        let list = self
            .etcd
            .get(HEARTBEAT_PREFIX, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(Error::etcd(format!("list {HEARTBEAT_PREFIX}")))?;
        let revision = list.header().map_or(0, |h| h.revision());
        let mut snapshot = BTreeMap::new();
        for kv in list.kvs() {
            if let Some(node) = heartbeat_node(kv.key()) {
                snapshot.insert(node.to_string(), parse(node, kv.value()));
            }
        }
        tracing::debug!(revision, nodes = snapshot.len(), "listed heartbeats");
        let mut stream = self
            .etcd
            .watch(
                HEARTBEAT_PREFIX,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_prev_key()
                        .with_start_revision(revision + 1),
                ),
            )
            .await
            .map_err(Error::etcd(format!(
                "watch {HEARTBEAT_PREFIX} from revision {}",
                revision + 1
            )))?;
        // The snapshot goes out only once the watch is in place, so nothing falls in between.
        if self
            .events
            .send(LivenessEvent::Snapshot(snapshot))
            .await
            .is_err()
        {
            return Ok(());
        }
        backoff.reset();
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(Error::WatchEnded {
                        prefix: HEARTBEAT_PREFIX,
                        reason: "stream closed".into(),
                    });
                }
                Err(e) => {
                    return Err(Error::WatchEnded {
                        prefix: HEARTBEAT_PREFIX,
                        reason: e.to_string(),
                    });
                }
            };
            if resp.compact_revision() > 0 {
                return Err(Error::WatchEnded {
                    prefix: HEARTBEAT_PREFIX,
                    reason: format!("revision compacted up to {}", resp.compact_revision()),
                });
            }
            if resp.canceled() {
                return Err(Error::WatchEnded {
                    prefix: HEARTBEAT_PREFIX,
                    reason: format!("cancelled by etcd: {}", resp.cancel_reason()),
                });
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(node) = heartbeat_node(kv.key()) else {
                    continue;
                };
                let node = node.to_string();
                let liveness = match event.event_type() {
                    EventType::Put => LivenessEvent::Put {
                        heartbeat: parse(&node, kv.value()),
                        node,
                    },
                    EventType::Delete => LivenessEvent::Delete {
                        last: event.prev_kv().and_then(|prev| parse(&node, prev.value())),
                        node,
                        seen_at: Instant::now(),
                    },
                };
                if self.events.send(liveness).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
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
