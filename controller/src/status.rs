//! Turns liveness events into MonitorNode status: one record per node, transitions written at
//! once, usage figures at most every `--usage-write-interval`, writes per node kept in order and
//! never two at a time, and nothing written when nothing changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use nodepulse_crd::etcd::Backoff;
use nodepulse_crd::v1alpha1::{
    AppliedConfigStatus, MonitorNode, MonitorNodeSpec, MonitorNodeStatus, NodeState,
};
use nodepulse_crd::wire::{AgentState, ConfigValue, HEARTBEAT_PREFIX, Heartbeat, UsageSummary};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::inventory::Inventory;
use crate::liveness::LivenessEvent;
use crate::metrics::{Metrics, StateLabel};

/// What each node's config key should make its agent run, as the config reconciler last
/// computed it; nodes absent run on the defaults.
pub type DesiredConfigs = BTreeMap<String, ConfigValue>;

/// Why a node is Alive or Dead, in the status's `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessReason {
    /// The heartbeat key exists.
    HeartbeatSeen,
    /// The key vanished without the agent saying it was stopping: its lease expired.
    HeartbeatExpired,
    /// The agent said it was stopping, and no agent took the key over before its lease expired.
    AgentStopped,
    /// The controller has had no working watch on the heartbeats for longer than the node's
    /// TTL (etcd down, a partition): it cannot tell, like a Node's `NodeStatusUnknown`.
    EtcdUnreachable,
    /// A Node whose agent has never written a heartbeat (not scheduled there, not started).
    NoHeartbeat,
}

impl LivenessReason {
    /// The `reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            LivenessReason::HeartbeatSeen => "HeartbeatSeen",
            LivenessReason::HeartbeatExpired => "HeartbeatExpired",
            LivenessReason::AgentStopped => "AgentStopped",
            LivenessReason::EtcdUnreachable => "EtcdUnreachable",
            LivenessReason::NoHeartbeat => "NoHeartbeat",
        }
    }

    /// The words of the lab's demo, for the log line.
    fn words(self) -> &'static str {
        match self {
            LivenessReason::HeartbeatSeen => "heartbeat seen",
            LivenessReason::HeartbeatExpired => "heartbeat expired",
            LivenessReason::AgentStopped => "agent stopped",
            LivenessReason::EtcdUnreachable => "etcd unreachable",
            LivenessReason::NoHeartbeat => "no heartbeat yet",
        }
    }
}

/// The one log line per transition, in the lab's words: `Node worker-1 Alive`,
/// `Node worker-1 Dead (heartbeat expired)`.
pub fn transition_line(node: &str, state: NodeState, reason: LivenessReason) -> String {
    match state {
        NodeState::Alive => format!("Node {node} Alive"),
        NodeState::Dead => format!("Node {node} Dead ({})", reason.words()),
        NodeState::Unknown => format!("Node {node} Unknown ({})", reason.words()),
    }
}

/// A transition waiting for its Event.
#[derive(Clone, Debug)]
struct Transition {
    state: NodeState,
    reason: LivenessReason,
    message: String,
}

#[derive(Default)]
struct NodeRecord {
    state: Option<NodeState>,
    reason: Option<String>,
    message: Option<String>,
    last_transition: Option<Time>,
    heartbeat: Option<Heartbeat>,
    /// The status last written (or read from the API server on a re-list).
    written: Option<MonitorNodeStatus>,
    last_write: Option<Instant>,
    /// The usage figures or heartbeat time differ from what was written.
    usage_dirty: bool,
    /// ...and by enough to be worth a write once the usage interval has passed.
    usage_moved: bool,
    in_flight: bool,
    write_again: bool,
    retry_at: Option<Instant>,
    retry_backoff: Option<Backoff>,
    pending_events: Vec<Transition>,
    dead_seen_at: Option<Instant>,
    /// A write was started to give the MonitorNode its Node as owner.
    owner_requested: bool,
    /// Unknown since an outage, its key listed again but not yet proven live: Alive at this
    /// instant if its key is still there (its lease then outlived any extension etcd gave it).
    vouch_at: Option<Instant>,
    /// Its key is gone but a live agent would write it again (deleted by hand while its lease
    /// lives, or absent from a rebuilt store): Dead at this instant unless one has.
    doom_at: Option<Instant>,
}

struct WriteJob {
    node: String,
    status: MonitorNodeStatus,
    events: Vec<Transition>,
    dead_seen_at: Option<Instant>,
    owner: Option<OwnerReference>,
    /// The MonitorNode is known to exist: apply the status straight away.
    exists: bool,
}

struct WriteOutcome {
    job: WriteJob,
    /// When the status was written (before the Events went out).
    result: Result<Instant>,
}

/// Tuning of the status writer.
#[derive(Clone, Debug)]
pub struct StatusSettings {
    /// Least time between two writes that only refresh usage figures, per node.
    pub usage_write_interval: Duration,
    /// Most status writes in flight at once.
    pub max_concurrent_writes: usize,
}

/// Owns every node's liveness record and writes MonitorNode status from it.
pub struct NodeTracker {
    api: Api<MonitorNode>,
    recorder: Recorder,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    desired: watch::Receiver<Arc<DesiredConfigs>>,
    settings: StatusSettings,
    records: HashMap<String, NodeRecord>,
    /// Signals a change in the set of Node objects.
    node_changes: watch::Receiver<u64>,
    writes: FuturesUnordered<BoxFuture<'static, WriteOutcome>>,
    permits: Arc<Semaphore>,
    /// Writes that carry no transition also take one of these, so at most half the permits go
    /// to usage refreshes and a Dead status never queues behind a wave of them.
    background_permits: Arc<Semaphore>,
    /// Since when the heartbeat watch has been down (from the start until the first list).
    blind_since: Option<Instant>,
    /// The MonitorNodes were read from the API server at least once (by a heartbeat snapshot,
    /// or, when etcd is away from the start, so that they can be marked Unknown).
    adopted: bool,
}

impl NodeTracker {
    /// A tracker writing through `client`.
    pub fn new(
        client: Client,
        recorder: Recorder,
        inventory: Inventory,
        metrics: Arc<Metrics>,
        desired: watch::Receiver<Arc<DesiredConfigs>>,
        settings: StatusSettings,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.max_concurrent_writes.max(2)));
        let background_permits =
            Arc::new(Semaphore::new(settings.max_concurrent_writes.max(2) / 2));
        NodeTracker {
            api: Api::all(client),
            recorder,
            node_changes: inventory.watch_changes(),
            inventory,
            metrics,
            desired,
            settings,
            records: HashMap::new(),
            writes: FuturesUnordered::new(),
            permits,
            background_permits,
            blind_since: Some(Instant::now()),
            adopted: false,
        }
    }

    /// Consumes liveness events until the watcher goes away.
    pub async fn run(mut self, mut events: mpsc::Receiver<LivenessEvent>) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return Err(Error::TaskStopped("heartbeat watcher")),
                },
                Some(outcome) = self.writes.next(), if !self.writes.is_empty() => self.finish(outcome),
                Ok(()) = self.node_changes.changed() => self.list_unseen_nodes(),
                Ok(()) = self.desired.changed() => {
                    let names: Vec<String> = self.records.keys().cloned().collect();
                    for name in names {
                        self.consider_write(&name);
                    }
                }
                _ = tick.tick() => {
                    self.adopt_while_blind().await;
                    self.mark_unknown_while_blind();
                    self.vouch_due();
                    self.doom_due();
                    self.flush_due();
                    self.update_gauges();
                }
            }
        }
    }

    async fn handle(&mut self, event: LivenessEvent) {
        match event {
            LivenessEvent::Snapshot {
                heartbeats,
                store_replaced,
            } => self.reconcile_all(heartbeats, store_replaced).await,
            LivenessEvent::Interrupted { since } => {
                self.blind_since.get_or_insert(since);
            }
            LivenessEvent::Put { node, heartbeat } => {
                self.observe_alive(&node, heartbeat);
                self.consider_write(&node);
            }
            LivenessEvent::Delete {
                node,
                last,
                lease_left,
                seen_at,
            } => {
                let Some(rec) = self.records.get_mut(&node) else {
                    return;
                };
                if let Some(left) = lease_left {
                    // Deleted by hand: the agent on the lease writes the key again within a
                    // third of its TTL. Dead only if nobody has when the lease would run out.
                    tracing::warn!(node, lease_left = ?left, "heartbeat key deleted while its lease lives; Dead only if no agent writes it again before the lease runs out");
                    rec.doom_at = Some(seen_at + left + VOUCH_MARGIN);
                    return;
                }
                let last = last.or_else(|| rec.heartbeat.clone());
                let stopping = last
                    .as_ref()
                    .is_some_and(|hb| hb.state == AgentState::Stopping);
                let (reason, message) = if stopping {
                    (
                        LivenessReason::AgentStopped,
                        "the agent stopped and no agent took over within its TTL".to_string(),
                    )
                } else {
                    let ttl = last
                        .as_ref()
                        .map_or_else(String::new, |hb| format!(" ({}s TTL)", hb.ttl_seconds));
                    (
                        LivenessReason::HeartbeatExpired,
                        format!("the heartbeat lease expired{ttl}: no keep-alive from the agent"),
                    )
                };
                rec.vouch_at = None;
                rec.doom_at = None;
                if rec.state != Some(NodeState::Dead) {
                    rec.dead_seen_at = Some(seen_at);
                    transition(&self.metrics, &node, rec, NodeState::Dead, reason, message);
                }
                self.consider_write(&node);
            }
        }
    }

    /// Re-lists the MonitorNodes and reconciles each against the heartbeat keys present: the
    /// API server's view, not memory, says what is shown.
    async fn reconcile_all(
        &mut self,
        heartbeats: BTreeMap<String, Option<Heartbeat>>,
        store_replaced: bool,
    ) {
        let listed = self.list_monitor_nodes().await;
        for rec in self.records.values_mut() {
            rec.written = None;
        }
        let now = Instant::now();
        for (name, status) in &listed {
            let rec = self.records.entry(name.clone()).or_default();
            adopt_listed(rec, status.as_ref(), now);
        }
        // MonitorNodes deleted behind our back: forget what we knew, so a live node's is recreated.
        for (name, rec) in self.records.iter_mut() {
            if !listed.contains_key(name) {
                *rec = NodeRecord {
                    heartbeat: rec.heartbeat.take(),
                    ..NodeRecord::default()
                };
            }
        }
        let names: BTreeSet<String> = listed.keys().chain(heartbeats.keys()).cloned().collect();
        for name in &names {
            match heartbeats.get(name) {
                Some(hb) => {
                    let rec = self.records.entry(name.clone()).or_default();
                    if is_blind_unknown(rec) && !proves_life(rec, hb.as_ref()) {
                        // etcd resets every lease's TTL when it comes back, so a key present
                        // now says nothing yet: a dead node's key vanishes within a TTL, a live
                        // agent writes its value again. Until either, the node stays Unknown.
                        let ttl = Duration::from_secs(ttl_of(rec).into());
                        if hb.is_some() {
                            rec.heartbeat = hb.clone();
                        }
                        rec.vouch_at = Some(now + 2 * ttl + VOUCH_MARGIN);
                    } else {
                        self.observe_alive(name, hb.clone());
                    }
                }
                None => {
                    let rec = self.records.entry(name.clone()).or_default();
                    rec.vouch_at = None;
                    let was_live = rec.state == Some(NodeState::Alive) || is_blind_unknown(rec);
                    if was_live && store_replaced {
                        // A new store holds no lease yet: a live agent grants one and writes its
                        // key within a third of its TTL. Dead if none has by then.
                        let ttl = Duration::from_secs(ttl_of(rec).into());
                        rec.doom_at.get_or_insert(now + ttl + VOUCH_MARGIN);
                    } else if was_live {
                        transition(
                            &self.metrics,
                            name,
                            rec,
                            NodeState::Dead,
                            LivenessReason::HeartbeatExpired,
                            "the heartbeat key was gone when the controller listed the heartbeats"
                                .into(),
                        );
                    }
                }
            }
            self.consider_write(name);
        }
        self.records.retain(|name, _| names.contains(name));
        self.blind_since = None;
        self.list_unseen_nodes();
        self.adopted = true;
        tracing::info!(
            heartbeats = heartbeats.len(),
            monitor_nodes = listed.len(),
            "reconciled every MonitorNode against the heartbeat keys"
        );
    }

    /// Every Node has a MonitorNode: one whose agent has never written a heartbeat is listed
    /// `Unknown` (`NoHeartbeat`), so that `kubectl get monitornodes` shows the whole cluster.
    /// Its record goes with its Node (the MonitorNode itself goes through its owner reference).
    fn list_unseen_nodes(&mut self) {
        if self.blind_since.is_some() {
            // The heartbeats are not known right now: "never seen" cannot be told.
            return;
        }
        let nodes: BTreeSet<String> = self.inventory.node_names().collect();
        for name in &nodes {
            if self.records.get(name).is_some_and(|r| r.state.is_some()) {
                continue;
            }
            let rec = self.records.entry(name.clone()).or_default();
            transition(
                &self.metrics,
                name,
                rec,
                NodeState::Unknown,
                LivenessReason::NoHeartbeat,
                "no agent has written a heartbeat for this node: is one scheduled and running there?"
                    .into(),
            );
            self.consider_write(name);
        }
        self.records.retain(|name, rec| {
            nodes.contains(name)
                || rec.heartbeat.is_some()
                || rec.reason.as_deref() != Some(LivenessReason::NoHeartbeat.as_str())
        });
    }

    async fn list_monitor_nodes(&self) -> BTreeMap<String, Option<MonitorNodeStatus>> {
        let mut backoff = Backoff::default();
        loop {
            match self.api.list(&ListParams::default()).await {
                Ok(list) => {
                    return list
                        .items
                        .into_iter()
                        .map(|mn| (mn.name_any(), mn.status))
                        .collect();
                }
                Err(e) => {
                    self.metrics.reconcile_error("liveness");
                    tracing::warn!(error = %e, "list MonitorNodes failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    fn observe_alive(&mut self, node: &str, heartbeat: Option<Heartbeat>) {
        let rec = self.records.entry(node.to_string()).or_default();
        rec.doom_at = None;
        if heartbeat.is_some() {
            rec.heartbeat = heartbeat;
        }
        if rec.state != Some(NodeState::Alive) {
            let message = match &rec.heartbeat {
                Some(hb) => format!(
                    "agent {} holds its heartbeat lease ({}s TTL)",
                    hb.agent_version, hb.ttl_seconds
                ),
                None => "the heartbeat key exists".to_string(),
            };
            rec.dead_seen_at = None;
            rec.vouch_at = None;
            transition(
                &self.metrics,
                node,
                rec,
                NodeState::Alive,
                LivenessReason::HeartbeatSeen,
                message,
            );
        }
    }

    /// A controller started while etcd is away has no records to mark Unknown: once blind for
    /// the shortest TTL, it reads the MonitorNodes the API server holds (their TTL is in them).
    async fn adopt_while_blind(&mut self) {
        let Some(since) = self.blind_since else {
            return;
        };
        if self.adopted || since.elapsed() < Duration::from_secs(MIN_TTL) {
            return;
        }
        self.adopted = true;
        let listed = self.list_monitor_nodes().await;
        let now = Instant::now();
        for (name, status) in &listed {
            let rec = self.records.entry(name.clone()).or_default();
            adopt_listed(rec, status.as_ref(), now);
        }
        tracing::info!(
            monitor_nodes = listed.len(),
            "no heartbeat list yet: read the MonitorNodes, to say Unknown for those etcd cannot vouch for"
        );
    }

    /// While the heartbeat watch is down: every Alive node whose TTL has passed since then goes
    /// Unknown, since a node may have died meanwhile without the controller seeing it. Dead
    /// nodes stay Dead: nothing suggests their lease came back.
    fn mark_unknown_while_blind(&mut self) {
        let Some(since) = self.blind_since else {
            return;
        };
        let blind = since.elapsed();
        let due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| rec.state == Some(NodeState::Alive))
            .filter(|(_, rec)| blind > Duration::from_secs(ttl_of(rec).into()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let Some(rec) = self.records.get_mut(&name) else {
                continue;
            };
            let message = format!(
                "the controller has had no working watch on {HEARTBEAT_PREFIX} for {:.0}s, longer than the node's {}s TTL: it cannot tell whether the node is alive",
                blind.as_secs_f64(),
                ttl_of(rec)
            );
            rec.vouch_at = None;
            transition(
                &self.metrics,
                &name,
                rec,
                NodeState::Unknown,
                LivenessReason::EtcdUnreachable,
                message,
            );
            self.consider_write(&name);
        }
    }

    /// Unknown nodes whose key outlived twice their TTL after the watch came back: their lease
    /// is kept alive, so they are Alive.
    fn vouch_due(&mut self) {
        if self.blind_since.is_some() {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| rec.vouch_at.is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            self.observe_alive(&name, None);
            self.consider_write(&name);
        }
    }

    /// Nodes whose key went away without their lease expiring and was not written again in
    /// time: their lease has run out by now, so they are Dead.
    fn doom_due(&mut self) {
        if self.blind_since.is_some() {
            return;
        }
        let now = Instant::now();
        let due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| rec.doom_at.is_some_and(|at| at <= now))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let Some(rec) = self.records.get_mut(&name) else {
                continue;
            };
            let doomed_at = rec.doom_at.take();
            if rec.state != Some(NodeState::Dead) {
                rec.dead_seen_at = doomed_at;
                let message = format!(
                    "the heartbeat key went away and no agent wrote it again within its {}s TTL",
                    ttl_of(rec)
                );
                transition(
                    &self.metrics,
                    &name,
                    rec,
                    NodeState::Dead,
                    LivenessReason::HeartbeatExpired,
                    message,
                );
            }
            self.consider_write(&name);
        }
    }

    /// Writes at once when something other than the usage figures changed; otherwise marks the
    /// usage dirty for the next periodic flush.
    fn consider_write(&mut self, node: &str) {
        let desired = self.desired.borrow().get(node).cloned();
        let Some(rec) = self.records.get_mut(node) else {
            return;
        };
        if rec.state.is_none() {
            return;
        }
        let status = compute_status(rec, desired.as_ref());
        // The first usage figures go out at once, so a new node shows CPU% without waiting.
        if let Some(written) = &rec.written
            && without_usage(written) == without_usage(&status)
            && rec.pending_events.is_empty()
            && (written.usage.is_some() || status.usage.is_none())
            && !from_an_earlier_run(written, rec.heartbeat.as_ref())
        {
            rec.usage_dirty = *written != status;
            rec.usage_moved = usage_moved(written.usage.as_ref(), status.usage.as_ref());
            return;
        }
        if rec.in_flight {
            rec.write_again = true;
        } else {
            self.start_write(node);
        }
    }

    fn flush_due(&mut self) {
        let now = Instant::now();
        let interval = self.settings.usage_write_interval;
        let due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| !rec.in_flight)
            .filter(|(_, rec)| match rec.retry_at {
                Some(at) => at <= now,
                None => {
                    let since = rec.last_write.map_or(Duration::MAX, |t| now - t);
                    (rec.usage_moved && since >= interval)
                        || (rec.usage_dirty && since >= interval * REFRESH_FACTOR)
                }
            })
            .map(|(name, _)| name.clone())
            .collect();
        // MonitorNodes created before their Node object: the next write sets the owner.
        let inventory = &self.inventory;
        let orphans: Vec<String> = self
            .records
            .iter_mut()
            .filter(|(_, rec)| !rec.in_flight && !rec.owner_requested && rec.written.is_some())
            .filter(|(name, _)| {
                inventory.node(name).is_some()
                    && inventory
                        .monitor_node(name)
                        .is_some_and(|mn| mn.owner_references().is_empty())
            })
            .map(|(name, rec)| {
                rec.owner_requested = true;
                name.clone()
            })
            .collect();
        for name in due.into_iter().chain(orphans) {
            self.start_write(&name);
        }
    }

    fn start_write(&mut self, node: &str) {
        let desired = self.desired.borrow().get(node).cloned();
        let owner = self.inventory.node(node).and_then(|n| {
            Some(OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: n.name_any(),
                uid: n.uid()?,
                controller: None,
                block_owner_deletion: None,
            })
        });
        let Some(rec) = self.records.get_mut(node) else {
            return;
        };
        if rec.in_flight {
            // One write per node at a time, in order: the next one starts when this one ends.
            rec.write_again = true;
            return;
        }
        let status = compute_status(rec, desired.as_ref());
        rec.in_flight = true;
        rec.write_again = false;
        rec.usage_dirty = false;
        rec.usage_moved = false;
        rec.retry_at = None;
        let exists = self.inventory.monitor_node(node).is_some() || rec.written.is_some();
        let job = WriteJob {
            exists,
            node: node.to_string(),
            status,
            events: std::mem::take(&mut rec.pending_events),
            dead_seen_at: rec.dead_seen_at.take(),
            owner,
        };
        let api = self.api.clone();
        let recorder = self.recorder.clone();
        let permits = self.permits.clone();
        let background = (job.events.is_empty() && job.dead_seen_at.is_none())
            .then(|| self.background_permits.clone());
        self.metrics.status_writes.inc();
        self.writes.push(Box::pin(async move {
            let _background = match background {
                Some(b) => b.acquire_owned().await.ok(),
                None => None,
            };
            let _permit = permits.acquire_owned().await;
            let result = write_status(&api, &recorder, &job).await;
            WriteOutcome { job, result }
        }));
    }

    fn finish(&mut self, outcome: WriteOutcome) {
        let WriteOutcome { job, result } = outcome;
        let Some(rec) = self.records.get_mut(&job.node) else {
            return;
        };
        rec.in_flight = false;
        match result {
            Ok(written_at) => {
                if let Some(seen) = job.dead_seen_at {
                    self.metrics
                        .dead_detection
                        .observe((written_at - seen).as_secs_f64());
                }
                rec.written = Some(job.status);
                rec.last_write = Some(Instant::now());
                rec.retry_backoff = None;
                if rec.write_again {
                    self.consider_write(&job.node);
                }
            }
            Err(e) => {
                self.metrics.reconcile_error("liveness");
                tracing::warn!(node = %job.node, error = %e, "MonitorNode status not written; will retry");
                let mut events = job.events;
                events.append(&mut rec.pending_events);
                rec.pending_events = events;
                rec.dead_seen_at = rec.dead_seen_at.or(job.dead_seen_at);
                let backoff = rec.retry_backoff.get_or_insert_with(|| {
                    Backoff::new(Duration::from_millis(500), Duration::from_secs(10))
                });
                rec.retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
    }

    fn update_gauges(&self) {
        let mut counts = [0i64; 3];
        for rec in self.records.values() {
            match rec.state {
                Some(NodeState::Alive) => counts[0] += 1,
                Some(NodeState::Dead) => counts[1] += 1,
                Some(NodeState::Unknown) | None => counts[2] += 1,
            }
        }
        for (state, n) in ["alive", "dead", "unknown"].into_iter().zip(counts) {
            self.metrics
                .nodes
                .get_or_create(&StateLabel { state })
                .set(n);
        }
    }
}

fn transition(
    metrics: &Metrics,
    node: &str,
    rec: &mut NodeRecord,
    state: NodeState,
    reason: LivenessReason,
    message: String,
) {
    tracing::info!(
        node,
        reason = reason.as_str(),
        "{}",
        transition_line(node, state, reason)
    );
    metrics
        .transitions
        .get_or_create(&StateLabel {
            state: match state {
                NodeState::Alive => "alive",
                NodeState::Dead => "dead",
                NodeState::Unknown => "unknown",
            },
        })
        .inc();
    rec.state = Some(state);
    rec.reason = Some(reason.as_str().to_string());
    rec.message = Some(message.clone());
    rec.last_transition = Some(Time(Timestamp::now()));
    rec.pending_events.push(Transition {
        state,
        reason,
        message,
    });
}

/// The agent's shortest heartbeat TTL, in seconds.
const MIN_TTL: u64 = 2;

/// A node whose key stays there after the watch's return is vouched for after twice its TTL
/// and this margin: etcd extends every lease when a leader takes over (a restart, an election),
/// by an election timeout on top of the TTL, so a dead node's key may outlive one TTL.
const VOUCH_MARGIN: Duration = Duration::from_secs(1);

/// The node's heartbeat TTL in seconds, as last reported (10, the agent's default, if never).
fn ttl_of(rec: &NodeRecord) -> u32 {
    rec.heartbeat
        .as_ref()
        .map(|hb| hb.ttl_seconds)
        .or_else(|| rec.written.as_ref().and_then(|w| w.ttl_seconds))
        .unwrap_or(10)
}

/// Unknown because the controller could not see etcd (not for another reason).
fn is_blind_unknown(rec: &NodeRecord) -> bool {
    rec.state == Some(NodeState::Unknown)
        && rec.reason.as_deref() == Some(LivenessReason::EtcdUnreachable.as_str())
}

/// Whether a heartbeat listed after an outage was written after the last one seen before it:
/// then its agent ran after the controller lost sight of it.
fn proves_life(rec: &NodeRecord, listed: Option<&Heartbeat>) -> bool {
    let Some(listed) = listed else {
        return false;
    };
    let before = rec.heartbeat.as_ref().map(|hb| hb.updated_at).or_else(|| {
        rec.written
            .as_ref()
            .and_then(|w| w.last_heartbeat_time.as_ref())
            .map(|t| t.0)
    });
    before.is_some_and(|before| listed.updated_at > before)
}

/// Takes the API server's view of a node into its record on a re-list. A transition of ours
/// still being written (or waiting for a retry) is newer than what the list returned: then the
/// record keeps its state, or the re-list would undo a transition whose Event is on its way and
/// raise it a second time.
fn adopt_listed(rec: &mut NodeRecord, status: Option<&MonitorNodeStatus>, now: Instant) {
    let ours_pending = rec.in_flight || !rec.pending_events.is_empty();
    if let Some(status) = status
        && !ours_pending
    {
        rec.state = status.state;
        rec.reason = status.reason.clone();
        rec.message = status.message.clone();
        rec.last_transition = status.last_transition_time.clone();
    }
    rec.written = Some(status.cloned().unwrap_or_default());
    rec.last_write.get_or_insert(now);
}

/// The full status a node's record calls for. Fields the record does not know (after a re-list,
/// before the next heartbeat value) are carried over from what was written.
fn compute_status(rec: &mut NodeRecord, desired: Option<&ConfigValue>) -> MonitorNodeStatus {
    let mut status = rec.written.clone().unwrap_or_default();
    status.state = rec.state;
    status.reason = rec.reason.clone();
    status.message = rec.message.clone();
    let since = rec
        .last_transition
        .get_or_insert_with(|| Time(Timestamp::now()))
        .clone();
    status.last_transition_time = Some(since.clone());
    if let Some(hb) = &rec.heartbeat {
        status.last_heartbeat_time = Some(Time(hb.updated_at));
        status.agent_version = Some(hb.agent_version.clone());
        status.ttl_seconds = Some(hb.ttl_seconds);
        status.usage = hb.usage.clone();
        status.config = Some(AppliedConfigStatus::from(&hb.config));
    }
    let default = ConfigValue::default();
    let desired = desired.unwrap_or(&default);
    if let Some(config) = status.config.as_mut() {
        config.in_sync = Some(config.runs(desired));
    }

    let previous = std::mem::take(&mut status.conditions);
    let mut conditions = vec![Condition {
        type_: "Alive".into(),
        status: match rec.state {
            Some(NodeState::Alive) => "True",
            Some(NodeState::Dead) => "False",
            _ => "Unknown",
        }
        .into(),
        reason: rec.reason.clone().unwrap_or_else(|| "Unknown".into()),
        message: rec.message.clone().unwrap_or_default(),
        last_transition_time: since,
        observed_generation: None,
    }];
    if let Some(config) = &status.config {
        let (cond_status, reason, message) = match (&config.error, config.in_sync) {
            (Some(error), _) => (
                "False",
                "Rejected",
                format!("the agent rejected its config: {error}"),
            ),
            (None, Some(false)) => (
                "False",
                "Pending",
                format!(
                    "the agent runs every {}s; {}s is desired",
                    config.interval, desired.interval
                ),
            ),
            _ => (
                "True",
                "Applied",
                format!("the agent runs every {}s", config.interval),
            ),
        };
        let since = previous
            .iter()
            .find(|c| c.type_ == "ConfigApplied" && c.status == cond_status)
            .map_or_else(
                || Time(Timestamp::now()),
                |c| c.last_transition_time.clone(),
            );
        conditions.push(Condition {
            type_: "ConfigApplied".into(),
            status: cond_status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: None,
        });
    }
    status.conditions = conditions;
    status
}

/// Figures that moved less than this (percentage points, or load) are not worth a write of
/// their own; they go out with the next write, or after `REFRESH_FACTOR` usage intervals.
const USAGE_STEP: f64 = 1.0;

/// Usage-only changes too small to matter are still written after this many usage intervals,
/// so `lastHeartbeatTime` never lags more than a few minutes.
const REFRESH_FACTOR: u32 = 10;

/// Whether the usage figures moved enough to be worth a write of their own.
fn usage_moved(old: Option<&UsageSummary>, new: Option<&UsageSummary>) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return old.is_some() != new.is_some();
    };
    let moved = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() >= USAGE_STEP,
        (a, b) => a.is_some() != b.is_some(),
    };
    moved(old.cpu_percent, new.cpu_percent)
        || moved(old.memory_percent, new.memory_percent)
        || moved(old.disk_percent, new.disk_percent)
        || moved(old.load1, new.load1)
}

/// The status minus what changes with every sample: the usage figures and the heartbeat time.
fn without_usage(status: &MonitorNodeStatus) -> MonitorNodeStatus {
    MonitorNodeStatus {
        usage: None,
        last_heartbeat_time: None,
        ..status.clone()
    }
}

/// Whether the written status describes an earlier run of the node's agent than the heartbeat
/// now seen (a reinstall, a replaced pod): its figures and heartbeat time are another agent's,
/// so they are replaced at once rather than after the usage interval. Both times come from the
/// same node's clock.
fn from_an_earlier_run(written: &MonitorNodeStatus, heartbeat: Option<&Heartbeat>) -> bool {
    match (&written.last_heartbeat_time, heartbeat) {
        (Some(Time(seen)), Some(hb)) => *seen < hb.started_at,
        _ => false,
    }
}

#[cfg(test)]
mod earlier_run_tests {
    use super::*;

    #[test]
    fn a_status_older_than_the_agents_start_is_from_an_earlier_run() {
        let hb: Heartbeat = serde_json::from_value(serde_json::json!({
            "node": "worker-1", "agentVersion": "0.1.0", "state": "Running",
            "startedAt": "2026-12-01T10:00:00Z", "updatedAt": "2026-12-01T10:00:05Z",
            "ttlSeconds": 10, "config": {"revision": 0, "interval": 10, "metrics": ["cpu"]}
        }))
        .expect("a heartbeat");
        let at = |t: &str| MonitorNodeStatus {
            last_heartbeat_time: Some(Time(t.parse().expect("a time"))),
            ..MonitorNodeStatus::default()
        };
        // The previous release's agent wrote this status before the new agent started.
        assert!(from_an_earlier_run(&at("2026-12-01T09:40:00Z"), Some(&hb)));
        // This agent's own earlier value: a usage refresh, which waits for the interval.
        assert!(!from_an_earlier_run(&at("2026-12-01T10:00:00Z"), Some(&hb)));
        assert!(!from_an_earlier_run(&at("2026-12-01T10:00:05Z"), Some(&hb)));
        assert!(!from_an_earlier_run(
            &MonitorNodeStatus::default(),
            Some(&hb)
        ));
        assert!(!from_an_earlier_run(&at("2026-12-01T09:40:00Z"), None));
    }
}

/// Applies the status through the status subresource, creating the MonitorNode first when it
/// does not exist, then raises the Events of the transitions it carries.
async fn write_status(
    api: &Api<MonitorNode>,
    recorder: &Recorder,
    job: &WriteJob,
) -> Result<Instant> {
    let patch = serde_json::json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorNode",
        "status": job.status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let action = || format!("apply status of MonitorNode {}", job.node);
    // A node seen for the first time: create its MonitorNode first rather than learn from a 404.
    if !job.exists {
        create_monitor_node(api, job).await?;
    }
    let mn = match api
        .patch_status(&job.node, &params, &Patch::Apply(&patch))
        .await
    {
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            create_monitor_node(api, job).await?;
            api.patch_status(&job.node, &params, &Patch::Apply(&patch))
                .await
                .map_err(Error::kube(action()))?
        }
        other => other.map_err(Error::kube(action()))?,
    };
    let written_at = Instant::now();
    // A MonitorNode created before its Node object existed gets its owner once the Node shows up.
    if let Some(owner) = &job.owner
        && mn.owner_references().is_empty()
    {
        let patch = serde_json::json!({
            "apiVersion": "nodepulse.io/v1alpha1",
            "kind": "MonitorNode",
            "metadata": {"ownerReferences": [owner]},
        });
        if let Err(e) = api
            .patch(
                &job.node,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::warn!(node = %job.node, error = %e, "could not set the MonitorNode's owner to its Node");
        }
    }
    let reference = mn.object_ref(&());
    for t in &job.events {
        let event = Event {
            type_: match t.state {
                NodeState::Alive => EventType::Normal,
                _ => EventType::Warning,
            },
            reason: match t.state {
                NodeState::Alive => "NodeAlive",
                NodeState::Unknown => "NodeStatusUnknown",
                // A death's reason is the status's (HeartbeatExpired, AgentStopped): the
                // recorder folds Events with the same reason and action into one series under
                // the first message, so a clean stop after an expiry read "heartbeat expired".
                _ => t.reason.as_str(),
            }
            .into(),
            note: Some(format!(
                "{}: {}",
                transition_line(&job.node, t.state, t.reason),
                t.message
            )),
            action: "Heartbeat".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            // The status is what matters; a lost Event is logged, not retried.
            tracing::warn!(node = %job.node, error = %e, "could not record Event {}", event.reason);
        }
    }
    Ok(written_at)
}

/// Creates the MonitorNode, owned by its Node when one exists; one that already exists is fine.
async fn create_monitor_node(api: &Api<MonitorNode>, job: &WriteJob) -> Result<()> {
    let mut mn = MonitorNode::new(&job.node, MonitorNodeSpec {});
    if let Some(owner) = &job.owner {
        mn.metadata.owner_references = Some(vec![owner.clone()]);
    }
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, &mn).await {
        Ok(_) => {
            tracing::debug!(node = %job.node, "created MonitorNode");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(e) => Err(Error::kube(format!("create MonitorNode {}", job.node))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepulse_crd::wire::{AppliedConfig, MetricSet};

    fn heartbeat(interval: u32, cpu: f64) -> Heartbeat {
        Heartbeat {
            node: "worker-1".into(),
            agent_version: "0.1.0".into(),
            state: AgentState::Running,
            started_at: "2026-11-22T05:00:00Z".parse().unwrap(),
            updated_at: "2026-11-22T05:00:05Z".parse().unwrap(),
            ttl_seconds: 3,
            config: AppliedConfig {
                revision: 0,
                interval,
                metrics: MetricSet::all(),
                source: None,
                error: None,
            },
            usage: Some(UsageSummary {
                cpu_percent: Some(cpu),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn a_relist_does_not_undo_a_transition_being_written() {
        // A Dead transition is being written (its Event goes out with it) when a re-list
        // returns the MonitorNode as it was before: still Alive.
        let mut rec = NodeRecord {
            state: Some(NodeState::Dead),
            reason: Some("HeartbeatExpired".into()),
            in_flight: true,
            ..Default::default()
        };
        let listed = MonitorNodeStatus {
            state: Some(NodeState::Alive),
            reason: Some("HeartbeatSeen".into()),
            ..Default::default()
        };
        adopt_listed(&mut rec, Some(&listed), Instant::now());
        // Taking the listed Alive would make the absent key a second Dead, and a second Event.
        assert_eq!(rec.state, Some(NodeState::Dead));
        assert_eq!(rec.reason.as_deref(), Some("HeartbeatExpired"));
        // Nothing of ours pending: the API server's view is taken.
        rec.in_flight = false;
        adopt_listed(&mut rec, Some(&listed), Instant::now());
        assert_eq!(rec.state, Some(NodeState::Alive));
    }

    #[test]
    fn only_a_heartbeat_written_after_the_outage_proves_life() {
        let before = heartbeat(10, 1.0);
        let rec = NodeRecord {
            state: Some(NodeState::Unknown),
            reason: Some("EtcdUnreachable".into()),
            heartbeat: Some(before.clone()),
            ..Default::default()
        };
        assert!(is_blind_unknown(&rec));
        assert!(!proves_life(&rec, Some(&before)));
        assert!(!proves_life(&rec, None));
        let mut after = before.clone();
        after.updated_at = "2026-11-22T05:00:09Z".parse().unwrap();
        assert!(proves_life(&rec, Some(&after)));
        assert_eq!(ttl_of(&rec), 3);
    }

    #[test]
    fn transition_lines_use_the_labs_words() {
        assert_eq!(
            transition_line("worker-1", NodeState::Alive, LivenessReason::HeartbeatSeen),
            "Node worker-1 Alive"
        );
        assert_eq!(
            transition_line(
                "worker-1",
                NodeState::Dead,
                LivenessReason::HeartbeatExpired
            ),
            "Node worker-1 Dead (heartbeat expired)"
        );
        assert_eq!(
            transition_line("worker-1", NodeState::Dead, LivenessReason::AgentStopped),
            "Node worker-1 Dead (agent stopped)"
        );
    }

    #[test]
    fn usage_alone_is_not_an_urgent_change_but_config_is() {
        let mut rec = NodeRecord {
            state: Some(NodeState::Alive),
            reason: Some("HeartbeatSeen".into()),
            heartbeat: Some(heartbeat(10, 1.0)),
            ..Default::default()
        };
        let first = compute_status(&mut rec, None);
        rec.written = Some(first.clone());
        assert_eq!(first.config.as_ref().unwrap().in_sync, Some(true));
        rec.heartbeat = Some(heartbeat(10, 55.0));
        let second = compute_status(&mut rec, None);
        assert_ne!(first, second);
        assert_eq!(without_usage(&first), without_usage(&second));
        rec.heartbeat = Some(heartbeat(2, 55.0));
        let third = compute_status(&mut rec, None);
        assert_ne!(without_usage(&first), without_usage(&third));
        let cond = third
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied")
            .unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("False", "Pending")
        );
        let desired = ConfigValue::new(2, nodepulse_crd::wire::MetricSet::all()).unwrap();
        let fourth = compute_status(&mut rec, Some(&desired));
        assert_eq!(fourth.config.as_ref().unwrap().in_sync, Some(true));
    }

    #[test]
    fn small_usage_moves_wait_for_a_refresh() {
        let u = |cpu: f64| UsageSummary {
            cpu_percent: Some(cpu),
            memory_percent: Some(40.0),
            ..Default::default()
        };
        assert!(!usage_moved(Some(&u(10.0)), Some(&u(10.9))));
        assert!(usage_moved(Some(&u(10.0)), Some(&u(11.0))));
        assert!(usage_moved(None, Some(&u(10.0))));
        assert!(!usage_moved(None, None));
    }

    #[test]
    fn a_rejected_config_shows_in_the_condition() {
        let mut hb = heartbeat(10, 1.0);
        hb.config.error = Some("interval 0 is out of range".into());
        let mut rec = NodeRecord {
            state: Some(NodeState::Alive),
            heartbeat: Some(hb),
            ..Default::default()
        };
        let status = compute_status(&mut rec, None);
        let cond = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied")
            .unwrap();
        assert_eq!(cond.status, "False");
        assert!(cond.message.contains("interval 0"), "{}", cond.message);
    }
}
