//! Watches the heartbeat prefix in etcd and turns it into liveness events: a full snapshot on
//! start and after every watch failure, then one event per put or delete.
//!
//! A key counts as its node's heartbeat only when it proves what an agent's does
//! ([`Heartbeat::admit`]), judged with the TTL its lease was granted with
//! ([`Heartbeat::on_lease`]): the watch looks each new lease up once (etcd's LeaseTimeToLive),
//! keeps its TTL while keys ride it, and forgets it with its last key. Names with no Node object
//! count only up to a cap ([`WithoutNode`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use etcd_client::Client;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt, TryStreamExt};
use nodepulse_crd::wire::{
    HEARTBEAT_PREFIX, Heartbeat, Rejection, node_of_heartbeat_key, validate_node_name,
};
use nodepulse_etcd::watch::{EtcdWatcher, Kv, WatchEvent, WatcherSettings};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::inventory::Inventory;
use crate::metrics::RejectionLabel;
use nodepulse_runtime::Backoff;
use tokio::sync::{Semaphore, mpsc, watch};

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

/// Most granted-TTL lookups in flight at once, and most events waiting for theirs: when a
/// partition heals, every agent cut off writes its key on a new lease within a second, and each
/// lookup waits for etcd's read index (tens of milliseconds while etcd is busy).
const MAX_TTL_LOOKUPS: usize = 256;
const MAX_EVENTS_JUDGED: usize = 16384;

/// How long a lease's TTL lookup is retried before the watch gives up and lists again.
const LOOKUP_PATIENCE: Duration = Duration::from_secs(10);

/// Lists and watches `/monitor/heartbeat/`, forever.
pub struct HeartbeatWatcher {
    etcd: Client,
    events: mpsc::Sender<HeartbeatEvent>,
    rejected: Family<RejectionLabel, Counter>,
    without_node: WithoutNode,
}

impl HeartbeatWatcher {
    /// A watcher sending to `events`, counting the keys it rejects in `rejected`, taking
    /// heartbeats for names with no Node as `without_node` allows.
    pub fn new(
        etcd: Client,
        events: mpsc::Sender<HeartbeatEvent>,
        rejected: Family<RejectionLabel, Counter>,
        without_node: WithoutNode,
    ) -> Self {
        HeartbeatWatcher {
            etcd,
            events,
            rejected,
            without_node,
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
        // The watch reads on while new leases are looked up, and while deletes wait for theirs.
        let (raw, unjudged) = mpsc::channel(1024);
        let relist = Arc::new(AtomicBool::new(false));
        let relist_asked = relist.clone();
        let watch = async move {
            loop {
                if relist_asked.swap(false, Ordering::SeqCst) {
                    watcher.relist();
                }
                if raw.send(watcher.next().await).await.is_err() {
                    return;
                }
            }
        };
        let (watched, received) = mpsc::channel(1024);
        let leases = LeaseTtls::new(self.etcd.clone());
        let relay = self.relay(received);
        tokio::select! {
            () = watch => {}
            () = leases.run(unjudged, watched, relist) => {}
            () = relay => {}
        }
    }

    /// Turns watch events into liveness events and sends them on, a node's in the order etcd
    /// sent them: a delete whose lease may still live waits for its lookup, and the node's later
    /// events wait behind it, while other nodes' go on. A snapshot goes out once nothing older
    /// is held back.
    async fn relay(self, mut received: mpsc::Receiver<(WatchEvent, GrantedTtls)>) {
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
        let mut admission = Admission::new(self.rejected.clone(), self.without_node);
        loop {
            let ready = tokio::select! {
                (node, lease_left) = held.answered() => held.release(&node, lease_left),
                event = received.recv(), if snapshot.is_none() => {
                    let Some((event, granted)) = event else { return };
                    let lease = match &event {
                        WatchEvent::Delete { prev: Some(kv), .. } => kv.lease,
                        _ => 0,
                    };
                    match admission.liveness_event(event, &granted) {
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

/// The TTL each of an event's leases was granted with; `None`: etcd has no such lease any more
/// (it expired or was revoked, and its keys went with it).
type GrantedTtls = HashMap<i64, Option<i64>>;

/// The TTL each lease carrying a heartbeat key was granted with: looked up once per lease (a
/// lease's TTL never changes), forgotten when the last key on it goes.
struct LeaseTtls {
    etcd: Client,
    granted: HashMap<i64, i64>,
    /// Each heartbeat key's lease, and how many keys each lease carries.
    key_lease: HashMap<Vec<u8>, i64>,
    keys_on: HashMap<i64, usize>,
}

impl LeaseTtls {
    fn new(etcd: Client) -> Self {
        LeaseTtls {
            etcd,
            granted: HashMap::new(),
            key_lease: HashMap::new(),
            keys_on: HashMap::new(),
        }
    }

    /// Passes the watch's events on, each with the granted TTLs of its leases: those known at
    /// once, the others once looked up, up to [`MAX_TTL_LOOKUPS`] at a time across events (a
    /// partition that heals has every agent cut off grant a new lease at once). A key's events
    /// keep their order, and a list goes out after everything before it and before anything
    /// after it; other keys' events do not wait for a key's lookup (a delete behind a burst of
    /// new leases is judged at once). A lookup that fails for [`LOOKUP_PATIENCE`] stops the
    /// events: an interruption goes out, the watch is asked to list again, and nothing is
    /// passed on until that list.
    async fn run(
        mut self,
        mut unjudged: mpsc::Receiver<WatchEvent>,
        judged: mpsc::Sender<(WatchEvent, GrantedTtls)>,
        relist: Arc<AtomicBool>,
    ) {
        let permits = Arc::new(Semaphore::new(MAX_TTL_LOOKUPS));
        let mut lanes = KeyLanes::default();
        let mut lookups = FuturesUnordered::new();
        // A list waiting for its lookups, then for the events before it.
        let mut barrier: Option<BoxFuture<'static, Result<Judged, String>>> = None;
        let mut barrier_done: Option<Judged> = None;
        let mut stalled = false;
        loop {
            let mut ready = Vec::new();
            let mut failed = None;
            let taking =
                barrier.is_none() && barrier_done.is_none() && lanes.held < MAX_EVENTS_JUDGED;
            tokio::select! {
                event = unjudged.recv(), if taking => {
                    let Some(event) = event else { return };
                    if stalled && !matches!(event, WatchEvent::Listed { .. }) {
                        continue;
                    }
                    stalled = false;
                    let key = match &event {
                        WatchEvent::Put(kv) => Some(kv.key.clone()),
                        WatchEvent::Delete { key, .. } => Some(key.clone()),
                        WatchEvent::Listed { .. } | WatchEvent::Interrupted => None,
                    };
                    let listed = matches!(event, WatchEvent::Listed { .. });
                    match (key, self.judge(event, &permits)) {
                        (None, Judging::Ready(j)) if listed => barrier_done = Some(j),
                        (None, Judging::Ready(j)) => ready.push(j),
                        (None, Judging::Waiting(f)) => barrier = Some(f),
                        (Some(key), Judging::Ready(j)) => ready.extend(lanes.arrived(key, Some(j)).1),
                        (Some(key), Judging::Waiting(f)) => {
                            let (seq, _) = lanes.arrived(key.clone(), None);
                            lookups.push(f.map(move |r| (key, seq, r)));
                        }
                    }
                }
                Some((key, seq, done)) = lookups.next() => match done {
                    Ok(j) => ready.extend(lanes.answered(&key, seq, j)),
                    Err(e) => failed = Some(e),
                },
                done = async { barrier.as_mut().expect("a barrier").await }, if barrier.is_some() => {
                    barrier = None;
                    match done {
                        Ok(j) => barrier_done = Some(j),
                        Err(e) => failed = Some(e),
                    }
                }
            }
            if let Some(e) = failed {
                tracing::warn!(
                    "heartbeat watch: {e}; a heartbeat is judged by its lease's TTL, so the heartbeats cannot be judged: listing them again"
                );
                lanes = KeyLanes::default();
                lookups = FuturesUnordered::new();
                (barrier, barrier_done, stalled) = (None, None, true);
                relist.store(true, Ordering::SeqCst);
                ready = vec![Judged {
                    event: WatchEvent::Interrupted,
                    granted: GrantedTtls::new(),
                    looked_up: GrantedTtls::new(),
                }];
            }
            if lanes.held == 0
                && let Some(j) = barrier_done.take()
            {
                ready.push(j);
            }
            for Judged {
                event,
                granted,
                looked_up,
            } in ready
            {
                self.learned(&looked_up);
                if judged.send((event, granted)).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Takes `event` in (which lease each key rides now) and returns what its judging waits
    /// for: nothing when its leases are known, their lookups otherwise.
    fn judge(&mut self, event: WatchEvent, permits: &Arc<Semaphore>) -> Judging {
        let mut known = GrantedTtls::new();
        let mut unknown = Vec::new();
        match &event {
            WatchEvent::Listed { kvs, replaced, .. } => {
                if *replaced {
                    // Lease ids of another store say nothing about this one's.
                    self.granted.clear();
                }
                self.key_lease.clear();
                self.keys_on.clear();
                for kv in kvs.iter().filter(|kv| kv.lease != 0) {
                    self.track(&kv.key, kv.lease);
                }
                self.granted
                    .retain(|lease, _| self.keys_on.contains_key(lease));
                for lease in self.keys_on.keys() {
                    match self.granted.get(lease) {
                        Some(ttl) => {
                            known.insert(*lease, Some(*ttl));
                        }
                        None => unknown.push(*lease),
                    }
                }
            }
            WatchEvent::Put(kv) => {
                self.track(&kv.key, kv.lease);
                match self.granted.get(&kv.lease) {
                    _ if kv.lease == 0 => {}
                    Some(ttl) => {
                        known.insert(kv.lease, Some(*ttl));
                    }
                    None => unknown.push(kv.lease),
                }
            }
            WatchEvent::Delete { key, .. } => self.track(key, 0),
            WatchEvent::Interrupted => {}
        }
        if unknown.is_empty() {
            return Judging::Ready(Judged {
                event,
                granted: known,
                looked_up: GrantedTtls::new(),
            });
        }
        let (etcd, permits) = (self.etcd.clone(), permits.clone());
        Judging::Waiting(
            async move {
                let started = Instant::now();
                let looked_up = granted_ttls(&etcd, &unknown, &permits).await?;
                if matches!(event, WatchEvent::Listed { .. }) {
                    tracing::info!(
                        leases = unknown.len(),
                        gone = looked_up.values().filter(|g| g.is_none()).count(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "looked up the TTL of every new lease in the heartbeat list"
                    );
                }
                known.extend(looked_up.iter().map(|(lease, ttl)| (*lease, *ttl)));
                Ok(Judged {
                    event,
                    granted: known,
                    looked_up,
                })
            }
            .boxed(),
        )
    }

    /// Keeps the TTLs looked up, of the leases that still carry a key.
    fn learned(&mut self, looked_up: &GrantedTtls) {
        for (lease, ttl) in looked_up {
            if let Some(ttl) = ttl
                && self.keys_on.contains_key(lease)
            {
                self.granted.insert(*lease, *ttl);
            }
        }
    }

    /// `key` is on `lease` now (0: none, or deleted).
    fn track(&mut self, key: &[u8], lease: i64) {
        let old = match lease {
            0 => self.key_lease.remove(key),
            _ => self.key_lease.insert(key.to_vec(), lease),
        };
        if old == Some(lease) {
            return;
        }
        if let Some(old) = old
            && let Some(n) = self.keys_on.get_mut(&old)
        {
            *n -= 1;
            if *n == 0 {
                self.keys_on.remove(&old);
                self.granted.remove(&old);
            }
        }
        if lease != 0 {
            *self.keys_on.entry(lease).or_default() += 1;
        }
    }
}

/// What judging an event waits for.
enum Judging {
    /// Nothing: its leases' TTLs are known.
    Ready(Judged),
    /// Their lookups.
    Waiting(BoxFuture<'static, Result<Judged, String>>),
}

/// Each key's events not passed on yet, in order: the first waits for its lookups, those
/// behind it for it.
#[derive(Default)]
struct KeyLanes {
    lanes: HashMap<Vec<u8>, VecDeque<(u64, Option<Judged>)>>,
    next_seq: u64,
    /// Events held, in every lane.
    held: usize,
}

impl KeyLanes {
    /// An event of `key` came (`judged`: ready already); returns its number, and the events
    /// that can go out now (itself, when nothing of its key waits).
    fn arrived(&mut self, key: Vec<u8>, judged: Option<Judged>) -> (u64, Vec<Judged>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        match (self.lanes.get_mut(&key), judged) {
            (None, Some(j)) => return (seq, vec![j]),
            (Some(lane), j) => lane.push_back((seq, j)),
            (None, None) => {
                self.lanes.insert(key, VecDeque::from([(seq, None)]));
            }
        }
        self.held += 1;
        (seq, Vec::new())
    }

    /// Event `seq` of `key` has its lookups' answers: the events of its key that can go out
    /// now, in order.
    fn answered(&mut self, key: &[u8], seq: u64, judged: Judged) -> Vec<Judged> {
        let Some(lane) = self.lanes.get_mut(key) else {
            return Vec::new();
        };
        if let Some(slot) = lane.iter_mut().find(|(s, _)| *s == seq) {
            slot.1 = Some(judged);
        }
        let mut out = Vec::new();
        while let Some((_, Some(_))) = lane.front() {
            if let Some((_, Some(j))) = lane.pop_front() {
                out.push(j);
            }
        }
        self.held -= out.len();
        if lane.is_empty() {
            self.lanes.remove(key);
        }
        out
    }
}

/// An event with the granted TTLs of its leases, and those of them just looked up.
struct Judged {
    event: WatchEvent,
    granted: GrantedTtls,
    looked_up: GrantedTtls,
}

/// The granted TTL of each of `leases`, as many at a time as `permits` allow.
async fn granted_ttls(
    etcd: &Client,
    leases: &[i64],
    permits: &Semaphore,
) -> Result<GrantedTtls, String> {
    futures::stream::iter(leases.iter().copied())
        .map(|lease| async move {
            let _permit = permits.acquire().await;
            granted_ttl(etcd, lease).await.map(|g| (lease, g))
        })
        .buffer_unordered(MAX_TTL_LOOKUPS)
        .try_collect()
        .await
}

/// The TTL `lease` was granted with, `None` when etcd has no such lease; retried with backoff
/// for [`LOOKUP_PATIENCE`].
async fn granted_ttl(etcd: &Client, lease: i64) -> Result<Option<i64>, String> {
    let mut etcd = etcd.clone();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(2500));
    let give_up = Instant::now() + LOOKUP_PATIENCE;
    loop {
        let asked = etcd.lease_time_to_live(lease, None);
        let error = match tokio::time::timeout(Duration::from_secs(1), asked).await {
            // etcd answers -1 for a lease it does not have.
            Ok(Ok(r)) if r.ttl() < 0 => return Ok(None),
            Ok(Ok(r)) => return Ok(Some(r.granted_ttl())),
            Ok(Err(e)) if e.to_string().contains("lease not found") => return Ok(None),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within 1s".to_string(),
        };
        if Instant::now() >= give_up {
            return Err(format!(
                "could not look up lease {lease:x} for {LOOKUP_PATIENCE:?}: {error}"
            ));
        }
        backoff.wait().await;
    }
}

/// Why a key does not count: a rejection, or a lease gone already (its key goes with it, and
/// the delete says so).
enum Refusal {
    Rejected(Rejection),
    LeaseGone,
}

impl From<Rejection> for Refusal {
    fn from(rejection: Rejection) -> Self {
        Refusal::Rejected(rejection)
    }
}

/// Heartbeats for names no Node object has (agents on machines outside the cluster, or keys
/// written under made-up names): each gets a MonitorNode, so only `cap` names count, those
/// with a MonitorNode first; more are rejected ([`Rejection::NoNode`]).
pub struct WithoutNode {
    inventory: Option<Inventory>,
    changes: Option<watch::Receiver<u64>>,
    cap: usize,
    /// Names without a Node whose heartbeat counts now.
    admitted: HashSet<String>,
    /// MonitorNodes without a Node, as the inventory last said (and names admitted since).
    monitor_nodes: HashSet<String>,
}

impl WithoutNode {
    /// At most `cap` names without a Node in `inventory`.
    pub fn new(inventory: Inventory, cap: usize) -> Self {
        WithoutNode {
            changes: Some(inventory.watch_changes()),
            inventory: Some(inventory),
            ..WithoutNode::unlimited()
        }
        .with_cap(cap)
    }

    /// Every name counts (no inventory to ask).
    fn unlimited() -> Self {
        WithoutNode {
            inventory: None,
            changes: None,
            cap: usize::MAX,
            admitted: HashSet::new(),
            monitor_nodes: HashSet::new(),
        }
    }

    fn with_cap(mut self, cap: usize) -> Self {
        self.cap = cap;
        self
    }

    /// Whether `name`'s heartbeat may count; counts it if so.
    fn admit(&mut self, name: &str) -> Result<(), Rejection> {
        let Some(inventory) = &self.inventory else {
            return Ok(());
        };
        // Until the caches have listed, a missing Node says nothing.
        if !inventory.is_ready() || inventory.node(name).is_some() {
            self.admitted.remove(name);
            return Ok(());
        }
        let mut counted = within_cap(name, &self.admitted, &self.monitor_nodes, self.cap);
        if !counted
            && let Some(changes) = self.changes.as_mut()
            && changes.has_changed().unwrap_or(false)
        {
            changes.mark_unchanged();
            self.monitor_nodes = inventory.monitor_nodes_without_node();
            self.admitted.retain(|n| inventory.node(n).is_none());
            counted = within_cap(name, &self.admitted, &self.monitor_nodes, self.cap);
        }
        if !counted {
            return Err(Rejection::NoNode);
        }
        self.admitted.insert(name.to_string());
        Ok(())
    }

    /// `name`'s heartbeat no longer counts; its MonitorNode stays.
    fn forget(&mut self, name: &str) {
        if self.admitted.remove(name) {
            self.monitor_nodes.insert(name.to_string());
        }
    }

    /// A new list: every name is judged again.
    fn relisted(&mut self) {
        let admitted = std::mem::take(&mut self.admitted);
        self.monitor_nodes.extend(admitted);
    }
}

/// Whether `name`, which no Node has, may count: it does when it counts already or has a
/// MonitorNode, or when fewer than `cap` names do.
fn within_cap(
    name: &str,
    admitted: &HashSet<String>,
    monitor_nodes: &HashSet<String>,
    cap: usize,
) -> bool {
    if admitted.contains(name) || monitor_nodes.contains(name) {
        return true;
    }
    // The sum bounds the union: most calls need no more.
    admitted.len() + monitor_nodes.len() < cap || admitted.union(monitor_nodes).count() < cap
}

/// Checks each heartbeat key, remembers which lease carries which node's heartbeat, and logs a
/// rejection once per node and reason (counted every time).
struct Admission {
    /// The node whose heartbeat each lease carries, and the other way round.
    lease_node: HashMap<i64, String>,
    node_lease: HashMap<String, i64>,
    logged: HashSet<(String, Rejection)>,
    rejected: Family<RejectionLabel, Counter>,
    without_node: WithoutNode,
}

impl Admission {
    fn new(rejected: Family<RejectionLabel, Counter>, without_node: WithoutNode) -> Self {
        Admission {
            lease_node: HashMap::new(),
            node_lease: HashMap::new(),
            logged: HashSet::new(),
            rejected,
            without_node,
        }
    }

    /// What one watch event says about the nodes, judged with its leases' `granted` TTLs
    /// (`None`: nothing, e.g. a key no agent writes).
    fn liveness_event(
        &mut self,
        event: WatchEvent,
        granted: &GrantedTtls,
    ) -> Option<HeartbeatEvent> {
        Some(match event {
            WatchEvent::Listed {
                revision,
                mut kvs,
                replaced,
            } => {
                self.lease_node.clear();
                self.node_lease.clear();
                self.without_node.relisted();
                // Of two keys on one lease, the older one keeps it: the agent's own key was
                // there before anyone attached another.
                kvs.sort_by_key(|kv| kv.create_revision);
                let mut snapshot = BTreeMap::new();
                for kv in &kvs {
                    if let Some(node) = heartbeat_node(&kv.key)
                        && let Ok(hb) = self.admit(node, kv, granted)
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
                match self.admit(&node, &kv, granted) {
                    Ok(heartbeat) => HeartbeatEvent::Put { node, heartbeat },
                    Err(Refusal::Rejected(rejection)) => HeartbeatEvent::Rejected {
                        node,
                        rejection,
                        seen_at: Instant::now(),
                    },
                    Err(Refusal::LeaseGone) => return None,
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
    fn admit(&mut self, node: &str, kv: &Kv, granted: &GrantedTtls) -> Result<Heartbeat, Refusal> {
        match self.check(node, kv, granted) {
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
            Err(Refusal::LeaseGone) => {
                tracing::debug!(
                    node,
                    lease = kv.lease,
                    "heartbeat key on a lease etcd no longer has: its delete follows"
                );
                Err(Refusal::LeaseGone)
            }
            Err(Refusal::Rejected(rejection)) => {
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
                        granted_ttl = granted.get(&kv.lease).copied().flatten(),
                        bytes = kv.value.len(),
                        "not a heartbeat: the node counts as having none until its agent writes one"
                    );
                }
                // The key no longer carries this node's heartbeat.
                if self.node_lease.get(node) == Some(&kv.lease) {
                    self.forget(node);
                }
                Err(Refusal::Rejected(rejection))
            }
        }
    }

    fn check(&mut self, node: &str, kv: &Kv, granted: &GrantedTtls) -> Result<Heartbeat, Refusal> {
        let hb = Heartbeat::admit(node, kv.lease, &kv.value)?;
        let Some(Some(ttl)) = granted.get(&kv.lease) else {
            return Err(Refusal::LeaseGone);
        };
        let hb = hb.on_lease(*ttl)?;
        if self
            .lease_node
            .get(&kv.lease)
            .is_some_and(|holder| holder != node)
        {
            return Err(Rejection::SharedLease.into());
        }
        self.without_node.admit(node)?;
        Ok(hb)
    }

    fn forget(&mut self, node: &str) {
        if let Some(lease) = self.node_lease.remove(node) {
            self.lease_node.remove(&lease);
        }
        self.without_node.forget(node);
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

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn names_without_a_node_count_up_to_the_cap_those_counted_already_first() {
        let (admitted, monitor_nodes) = (set(&["a"]), set(&["a", "b"]));
        // Counted already: always.
        for name in ["a", "b"] {
            assert!(within_cap(name, &admitted, &monitor_nodes, 2), "{name}");
            assert!(within_cap(name, &admitted, &monitor_nodes, 0), "{name}");
        }
        // A new name: only below the cap, counting a name in both sets once.
        assert!(within_cap("c", &admitted, &monitor_nodes, 3));
        assert!(!within_cap("c", &admitted, &monitor_nodes, 2));
        assert!(!within_cap("c", &HashSet::new(), &HashSet::new(), 0));
    }

    #[test]
    fn a_name_forgotten_keeps_its_place_until_its_monitor_node_goes() {
        let mut w = WithoutNode::unlimited().with_cap(1);
        w.admitted.insert("a".into());
        w.forget("a");
        // Its MonitorNode stays: it still counts, and a new name does not fit.
        assert!(within_cap("a", &w.admitted, &w.monitor_nodes, w.cap));
        assert!(!within_cap("b", &w.admitted, &w.monitor_nodes, w.cap));
        w.admitted.insert("a".into());
        w.relisted();
        assert!(w.admitted.is_empty());
        assert!(within_cap("a", &w.admitted, &w.monitor_nodes, w.cap));
    }

    #[tokio::test]
    async fn a_leases_ttl_is_kept_while_keys_ride_it_and_forgotten_with_the_last() {
        // A client of no etcd (it connects lazily): every TTL here is known, so none is
        // looked up.
        let etcd = Client::connect(["http://127.0.0.1:1"], None)
            .await
            .expect("a lazy client");
        let mut leases = LeaseTtls::new(etcd);
        leases.granted.insert(7, 10);
        leases.track(b"/k/a", 7);
        leases.track(b"/k/b", 7);
        let put = |key: &[u8], lease| {
            WatchEvent::Put(Kv {
                key: key.to_vec(),
                lease,
                ..Kv::default()
            })
        };
        let permits = Arc::new(Semaphore::new(1));
        let mut judge = |event| leases.judge(event, &permits);
        // A rewrite on the same lease: from the cache, at once.
        let ready = |judging| match judging {
            Judging::Ready(j) => j.granted,
            Judging::Waiting(_) => panic!("a lookup"),
        };
        assert_eq!(
            ready(judge(put(b"/k/a", 7))),
            GrantedTtls::from([(7, Some(10))])
        );
        // One key moves off the lease, the other goes: the TTL known when each event came is
        // the one it is judged with, and the lease is forgotten with its last key.
        let delete = WatchEvent::Delete {
            key: b"/k/b".to_vec(),
            prev: None,
            revision: 9,
        };
        let events = [put(b"/k/a", 0), put(b"/k/b", 7), delete];
        let granted: Vec<_> = events.into_iter().map(|e| ready(judge(e))).collect();
        assert_eq!(granted[1], GrantedTtls::from([(7, Some(10))]));
        assert!(leases.granted.is_empty(), "the last key went");
        assert!(leases.keys_on.is_empty() && leases.key_lease.is_empty());
    }

    fn judged(key: &[u8], rev: i64) -> Judged {
        Judged {
            event: WatchEvent::Delete {
                key: key.to_vec(),
                prev: None,
                revision: rev,
            },
            granted: GrantedTtls::new(),
            looked_up: GrantedTtls::new(),
        }
    }

    fn revisions(out: &[Judged]) -> Vec<i64> {
        out.iter()
            .map(|j| match j.event {
                WatchEvent::Delete { revision, .. } => revision,
                _ => 0,
            })
            .collect()
    }

    #[test]
    fn a_keys_events_wait_for_its_lookup_and_no_other_keys_do() {
        let mut lanes = KeyLanes::default();
        // a's put waits for its lease's TTL; a's next event waits behind it, b's does not.
        let (seq_a, out) = lanes.arrived(b"a".to_vec(), None);
        assert!(out.is_empty());
        let (_, out) = lanes.arrived(b"a".to_vec(), Some(judged(b"a", 2)));
        assert!(out.is_empty(), "behind a's lookup");
        let (_, out) = lanes.arrived(b"b".to_vec(), Some(judged(b"b", 3)));
        assert_eq!(revisions(&out), [3]);
        let (seq_a2, _) = lanes.arrived(b"a".to_vec(), None);
        assert_eq!(lanes.held, 3);
        // The later lookup answers first: nothing of a goes out yet.
        assert!(lanes.answered(b"a", seq_a2, judged(b"a", 4)).is_empty());
        // a's first answers: all three, in order.
        assert_eq!(
            revisions(&lanes.answered(b"a", seq_a, judged(b"a", 1))),
            [1, 2, 4]
        );
        assert_eq!(lanes.held, 0);
        assert!(lanes.lanes.is_empty());
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
