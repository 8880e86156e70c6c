//! Watches the heartbeat prefix in etcd and turns it into liveness events: a full snapshot on
//! start and after every watch failure, then one event per put or delete.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use nodepulse_crd::wire::{
    HEARTBEAT_PREFIX, Heartbeat, Rejection, node_of_heartbeat_key, validate_node_name,
};
use nodepulse_etcd::watch::{EtcdWatcher, Kv, WatchEvent, WatcherSettings};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::RejectionLabel;
use nodepulse_runtime::Backoff;
use tokio::sync::{Semaphore, mpsc};

/// What the heartbeat prefix says about the nodes.
#[derive(Debug)]
pub enum HeartbeatEvent {
    /// Every heartbeat key present at one revision: nodes absent from it are not alive.
    Snapshot {
        /// The keys present, by node.
        heartbeats: BTreeMap<String, Heartbeat>,
        /// The store is not the one seen before (its revision went back: etcd rebuilt or
        /// restored): a key absent from it may not have been written again yet by a live agent.
        store_replaced: bool,
    },
    /// A node's heartbeat key was written by its agent.
    Put {
        /// The node.
        node: String,
        /// The value written.
        heartbeat: Heartbeat,
    },
    /// A node's heartbeat key was written with something that is not its agent's heartbeat (see
    /// [`Rejection`]): the node has none, as if the key were gone.
    Rejected {
        /// The node.
        node: String,
        /// Why the value does not count.
        rejection: Rejection,
        /// When the write was seen.
        seen_at: Instant,
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

/// Most lease lookups in flight at once: a mass failure deletes hundreds of keys within a
/// second, and each delete's lease is looked up before its node is judged.
const MAX_LEASE_LOOKUPS: usize = 64;

/// Lists and watches `/monitor/heartbeat/`, forever.
pub struct HeartbeatWatcher {
    etcd: Client,
    events: mpsc::Sender<HeartbeatEvent>,
    rejected: Family<RejectionLabel, Counter>,
}

impl HeartbeatWatcher {
    /// A watcher sending to `events`, counting the keys it rejects in `rejected`.
    pub fn new(
        etcd: Client,
        events: mpsc::Sender<HeartbeatEvent>,
        rejected: Family<RejectionLabel, Counter>,
    ) -> Self {
        HeartbeatWatcher {
            etcd,
            events,
            rejected,
        }
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
        // The watch reads on while deletes wait for their lease lookups.
        let (watched, received) = mpsc::channel(1024);
        let watch = async move { while watched.send(watcher.next().await).await.is_ok() {} };
        tokio::select! {
            () = watch => {}
            () = self.relay(received) => {}
        }
    }

    /// Turns watch events into liveness events and sends them on, a node's in the order etcd
    /// sent them: a delete whose lease may still live waits for its lookup, and the node's later
    /// events wait behind it, while other nodes' go on. A snapshot goes out once nothing older
    /// is held back.
    async fn relay(&self, mut received: mpsc::Receiver<WatchEvent>) {
        let permits = Arc::new(Semaphore::new(MAX_LEASE_LOOKUPS));
        let etcd = self.etcd.clone();
        let mut held = HeldDeletes::new(move |lease| {
            let (mut etcd, permits) = (etcd.clone(), permits.clone());
            async move {
                let _permit = permits.acquire_owned().await;
                lease_left(&mut etcd, lease).await
            }
            .boxed()
        });
        let mut snapshot = None;
        let mut admission = Admission::new(self.rejected.clone());
        loop {
            let ready = tokio::select! {
                (node, lease_left) = held.answered() => held.release(&node, lease_left),
                event = received.recv(), if snapshot.is_none() => {
                    let Some(event) = event else { return };
                    let lease = match &event {
                        WatchEvent::Delete { prev: Some(kv), .. } => kv.lease,
                        _ => 0,
                    };
                    match admission.liveness_event(event) {
                        Some(event @ HeartbeatEvent::Snapshot { .. }) => {
                            snapshot = Some(event);
                            Vec::new()
                        }
                        Some(event) => held.hold(event, lease).into_iter().collect(),
                        None => Vec::new(),
                    }
                }
            };
            for event in ready {
                if self.events.send(event).await.is_err() {
                    return;
                }
            }
            if held.is_empty()
                && let Some(event) = snapshot.take()
                && self.events.send(event).await.is_err()
            {
                return;
            }
        }
    }
}

/// How long a lease still lives, if it does: a lookup in etcd.
type LeaseLookup = Box<dyn Fn(i64) -> BoxFuture<'static, Option<Duration>> + Send + Sync>;

/// A lease lookup's answer: the node, and how long its lease still lives, if it does.
type LeaseAnswer = (String, Option<Duration>);

/// Deletes whose lease is being looked up, each with the events of its node that came after it.
struct HeldDeletes {
    lookup: LeaseLookup,
    lookups: FuturesUnordered<BoxFuture<'static, LeaseAnswer>>,
    /// By node: the delete waiting for its answer first, then the node's later events, each with
    /// its delete's lease (0 for the others).
    held: HashMap<String, VecDeque<(HeartbeatEvent, i64)>>,
}

impl HeldDeletes {
    fn new(
        lookup: impl Fn(i64) -> BoxFuture<'static, Option<Duration>> + Send + Sync + 'static,
    ) -> Self {
        HeldDeletes {
            lookup: Box::new(lookup),
            lookups: FuturesUnordered::new(),
            held: HashMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The event, if it can go out now; otherwise it is held (behind its node's earlier events,
    /// or until its own lease lookup answers).
    fn hold(&mut self, event: HeartbeatEvent, lease: i64) -> Option<HeartbeatEvent> {
        let node = match &event {
            HeartbeatEvent::Put { node, .. }
            | HeartbeatEvent::Rejected { node, .. }
            | HeartbeatEvent::Delete { node, .. } => node.clone(),
            _ => return Some(event),
        };
        if let Some(queue) = self.held.get_mut(&node) {
            queue.push_back((event, lease));
            return None;
        }
        if lease == 0 {
            return Some(event);
        }
        self.look_up(&node, lease);
        self.held.insert(node, VecDeque::from([(event, lease)]));
        None
    }

    /// The next lookup's answer; pending while none is under way.
    async fn answered(&mut self) -> LeaseAnswer {
        match self.lookups.next().await {
            Some(answer) => answer,
            None => std::future::pending().await,
        }
    }

    /// `node`'s delete with its answer, and the node's events after it up to the next delete
    /// that needs a lookup of its own.
    fn release(&mut self, node: &str, left: Option<Duration>) -> Vec<HeartbeatEvent> {
        let Some(mut queue) = self.held.remove(node) else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        if let Some((mut delete, _)) = queue.pop_front() {
            if let HeartbeatEvent::Delete { lease_left, .. } = &mut delete {
                *lease_left = left;
            }
            ready.push(delete);
        }
        while let Some((event, lease)) = queue.pop_front() {
            if lease != 0 {
                self.look_up(node, lease);
                queue.push_front((event, lease));
                self.held.insert(node.to_string(), queue);
                break;
            }
            ready.push(event);
        }
        ready
    }

    fn look_up(&mut self, node: &str, lease: i64) {
        let asked = (self.lookup)(lease);
        let node = node.to_string();
        self.lookups
            .push(async move { (node, asked.await) }.boxed());
    }
}

/// How long `lease` still lives, if it does. A key whose lease expired is deleted with the
/// lease, so a lease that lives past its key's delete means the key was deleted by hand. No
/// answer counts as expired: the node is then judged as before, by the delete.
async fn lease_left(etcd: &mut Client, lease: i64) -> Option<Duration> {
    let asked = etcd.lease_time_to_live(lease, None);
    match tokio::time::timeout(Duration::from_secs(1), asked).await {
        Ok(Ok(r)) if r.ttl() > 0 => Some(Duration::from_secs(r.ttl().unsigned_abs())),
        _ => None,
    }
}

/// Checks each heartbeat key, remembers which lease carries which node's heartbeat, and logs a
/// rejection once per node and reason (counted every time).
struct Admission {
    /// The node whose heartbeat each lease carries, and the other way round.
    lease_node: HashMap<i64, String>,
    node_lease: HashMap<String, i64>,
    logged: HashSet<(String, Rejection)>,
    rejected: Family<RejectionLabel, Counter>,
}

impl Admission {
    fn new(rejected: Family<RejectionLabel, Counter>) -> Self {
        Admission {
            lease_node: HashMap::new(),
            node_lease: HashMap::new(),
            logged: HashSet::new(),
            rejected,
        }
    }

    /// What one watch event says about the nodes (`None`: nothing, e.g. a key no agent writes).
    fn liveness_event(&mut self, event: WatchEvent) -> Option<HeartbeatEvent> {
        Some(match event {
            WatchEvent::Listed {
                revision,
                mut kvs,
                replaced,
            } => {
                self.lease_node.clear();
                self.node_lease.clear();
                // Of two keys on one lease, the older one keeps it: the agent's own key was
                // there before anyone attached another.
                kvs.sort_by_key(|kv| kv.create_revision);
                let mut snapshot = BTreeMap::new();
                for kv in &kvs {
                    if let Some(node) = heartbeat_node(&kv.key)
                        && let Ok(hb) = self.admit(node, kv)
                    {
                        snapshot.insert(node.to_string(), hb);
                    }
                }
                tracing::debug!(revision, nodes = snapshot.len(), "listed heartbeats");
                HeartbeatEvent::Snapshot {
                    heartbeats: snapshot,
                    store_replaced: replaced,
                }
            }
            WatchEvent::Put(kv) => {
                let node = heartbeat_node(&kv.key)?.to_string();
                match self.admit(&node, &kv) {
                    Ok(heartbeat) => HeartbeatEvent::Put { node, heartbeat },
                    Err(rejection) => HeartbeatEvent::Rejected {
                        node,
                        rejection,
                        seen_at: Instant::now(),
                    },
                }
            }
            WatchEvent::Delete { key, prev, .. } => {
                let node = heartbeat_node(&key)?.to_string();
                self.forget(&node);
                HeartbeatEvent::Delete {
                    last: prev.and_then(|prev| Heartbeat::parse(&prev.value).ok()),
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

    /// `kv`'s heartbeat, if it counts as `node`'s.
    fn admit(&mut self, node: &str, kv: &Kv) -> Result<Heartbeat, Rejection> {
        match self.check(node, kv) {
            Ok(hb) => {
                if let Some(old) = self.node_lease.insert(node.to_string(), kv.lease)
                    && old != kv.lease
                {
                    self.lease_node.remove(&old);
                }
                self.lease_node.insert(kv.lease, node.to_string());
                self.logged.retain(|(n, _)| n != node);
                Ok(hb)
            }
            Err(rejection) => {
                self.rejected
                    .get_or_create(&RejectionLabel {
                        reason: rejection.label(),
                    })
                    .inc();
                if self.logged.insert((node.to_string(), rejection)) {
                    tracing::warn!(
                        node,
                        reason = rejection.label(),
                        lease = kv.lease,
                        bytes = kv.value.len(),
                        "not a heartbeat: the node counts as having none until its agent writes one"
                    );
                }
                // The key no longer carries this node's heartbeat.
                if self.node_lease.get(node) == Some(&kv.lease) {
                    self.forget(node);
                }
                Err(rejection)
            }
        }
    }

    fn check(&self, node: &str, kv: &Kv) -> Result<Heartbeat, Rejection> {
        let hb = Heartbeat::admit(node, kv.lease, &kv.value)?;
        match self.lease_node.get(&kv.lease) {
            Some(holder) if holder != node => Err(Rejection::SharedLease),
            _ => Ok(hb),
        }
    }

    fn forget(&mut self, node: &str) {
        if let Some(lease) = self.node_lease.remove(node) {
            self.lease_node.remove(&lease);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn put(node: &str) -> HeartbeatEvent {
        HeartbeatEvent::Put {
            node: node.into(),
            heartbeat: Heartbeat::running(node, 10, k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn delete(node: &str) -> HeartbeatEvent {
        HeartbeatEvent::Delete {
            node: node.into(),
            last: None,
            lease_left: None,
            seen_at: Instant::now(),
        }
    }

    fn shown(events: &[HeartbeatEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                HeartbeatEvent::Put { node, .. } => format!("put {node}"),
                HeartbeatEvent::Delete {
                    node, lease_left, ..
                } => format!("delete {node} {lease_left:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Answers the test gives, by lease.
    type Answers =
        std::sync::Arc<std::sync::Mutex<HashMap<i64, oneshot::Sender<Option<Duration>>>>>;

    /// Lookups that answer when the test says so.
    fn controlled() -> (HeldDeletes, Answers) {
        let answers = Answers::default();
        let shared = answers.clone();
        let held = HeldDeletes::new(move |lease| {
            let (tx, rx) = oneshot::channel();
            shared.lock().unwrap().insert(lease, tx);
            async move { rx.await.ok().flatten() }.boxed()
        });
        (held, answers)
    }

    #[tokio::test]
    async fn a_node_waits_for_its_delete_others_do_not_and_lookups_overlap() {
        let (mut held, answers) = controlled();
        // Two deletes on leases that may live: both lookups start at once.
        assert!(held.hold(delete("a"), 1).is_none());
        assert!(held.hold(delete("b"), 2).is_none());
        assert_eq!(answers.lock().unwrap().len(), 2, "lookups run side by side");
        // a's agent writes its key again: that put waits behind a's delete.
        assert!(held.hold(put("a"), 0).is_none());
        // Another node's events and a delete without a lease go out at once.
        assert_eq!(shown(&[held.hold(put("c"), 0).unwrap()]), ["put c"]);
        assert_eq!(
            shown(&[held.hold(delete("d"), 0).unwrap()]),
            ["delete d None"]
        );
        // b answers first (expired): its delete goes out, a's still waits.
        let _ = answers.lock().unwrap().remove(&2).unwrap().send(None);
        let (node, left) = held.answered().await;
        assert_eq!(shown(&held.release(&node, left)), ["delete b None"]);
        assert!(!held.is_empty());
        // a's lease lives: its delete says so, then its put follows, in that order.
        let _ = answers
            .lock()
            .unwrap()
            .remove(&1)
            .unwrap()
            .send(Some(Duration::from_secs(4)));
        let (node, left) = held.answered().await;
        assert_eq!(
            shown(&held.release(&node, left)),
            ["delete a Some(4s)", "put a"]
        );
        assert!(held.is_empty());
    }

    #[tokio::test]
    async fn a_second_delete_behind_the_first_gets_its_own_lookup() {
        let (mut held, answers) = controlled();
        assert!(held.hold(delete("a"), 1).is_none());
        assert!(held.hold(put("a"), 0).is_none());
        assert!(held.hold(delete("a"), 7).is_none());
        assert!(held.hold(put("a"), 0).is_none());
        let _ = answers.lock().unwrap().remove(&1).unwrap().send(None);
        let (node, left) = held.answered().await;
        assert_eq!(
            shown(&held.release(&node, left)),
            ["delete a None", "put a"]
        );
        // The second delete's lookup started only now, in order.
        let _ = answers.lock().unwrap().remove(&7).unwrap().send(None);
        let (node, left) = held.answered().await;
        assert_eq!(
            shown(&held.release(&node, left)),
            ["delete a None", "put a"]
        );
        assert!(held.is_empty());
    }
}
