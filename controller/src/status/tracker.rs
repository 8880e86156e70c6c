//! Judges each node Alive, Dead or Unknown from the heartbeat events, and hands its record to
//! the status writer: the API server's view is re-read on every heartbeat re-list, a node is
//! Unknown while the controller cannot see etcd, and every Node has a MonitorNode.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use nodepulse_crd::v1alpha1::{LivenessReason, MonitorNode, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::{AgentState, HEARTBEAT_PREFIX, Heartbeat};
use nodepulse_runtime::Backoff;
use tokio::sync::{mpsc, watch};

use crate::config::DesiredConfigs;
use crate::error::{Error, Result};
use crate::inventory::Inventory;
use crate::metrics::{Metrics, StateLabel};
use crate::status::heartbeats::HeartbeatEvent;
use crate::status::record::{MIN_TTL, NodeRecord, VOUCH_MARGIN};
use crate::status::writer::StatusWriter;

/// MonitorNodes read per request when listing them all.
const LIST_PAGE: u32 = 500;

/// Owns every node's record: judges liveness from the heartbeat events and has the status
/// writer write what changed.
pub struct LivenessTracker {
    api: Api<MonitorNode>,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    records: HashMap<String, NodeRecord>,
    writer: StatusWriter,
    /// Signals a change in the set of Node objects.
    node_changes: watch::Receiver<u64>,
    /// Signals a change in the desired configs (the writer reads them).
    desired: watch::Receiver<DesiredConfigs>,
    /// Since when the heartbeat watch has been down (from the start until the first list).
    blind_since: Option<Instant>,
    /// The MonitorNodes were read from the API server at least once (by a heartbeat snapshot,
    /// or, when etcd is away from the start, so that they can be marked Unknown).
    adopted: bool,
}

impl LivenessTracker {
    /// A tracker having `writer` write the statuses; it reads the MonitorNodes, the Node
    /// inventory and the desired configs through the writer's client and caches.
    pub fn new(writer: StatusWriter) -> Self {
        let inventory = writer.inventory().clone();
        LivenessTracker {
            api: writer.api().clone(),
            desired: writer.desired().clone(),
            metrics: writer.metrics().clone(),
            node_changes: inventory.watch_changes(),
            inventory,
            records: HashMap::new(),
            writer,
            blind_since: Some(Instant::now()),
            adopted: false,
        }
    }

    /// Consumes heartbeat events until the watcher goes away.
    pub async fn run(mut self, mut events: mpsc::Receiver<HeartbeatEvent>) -> Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return Err(Error::TaskStopped("heartbeat watcher")),
                },
                outcome = self.writer.next_outcome() => self.writer.finish(outcome, &mut self.records),
                Ok(()) = self.node_changes.changed() => self.list_unseen_nodes(),
                Ok(()) = self.desired.changed() => {
                    for (name, rec) in self.records.iter_mut() {
                        self.writer.consider(name, rec);
                    }
                }
                _ = tick.tick() => {
                    self.adopt_while_blind().await;
                    self.mark_unknown_while_blind();
                    self.vouch_due();
                    self.doom_due();
                    self.writer.flush_due(&mut self.records);
                    self.update_gauges();
                }
            }
        }
    }

    /// Has the writer write `node`'s status if it changed.
    fn consider_write(&mut self, node: &str) {
        if let Some(rec) = self.records.get_mut(node) {
            self.writer.consider(node, rec);
        }
    }

    async fn handle(&mut self, event: HeartbeatEvent) {
        match event {
            HeartbeatEvent::Snapshot {
                heartbeats,
                store_replaced,
            } => self.reconcile_all(heartbeats, store_replaced).await,
            HeartbeatEvent::Interrupted { since } => {
                self.blind_since.get_or_insert(since);
            }
            HeartbeatEvent::Put { node, heartbeat } => {
                self.observe_alive(&node, heartbeat);
                self.consider_write(&node);
            }
            HeartbeatEvent::Delete {
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
                if rec.state() != Some(NodeState::Dead) {
                    rec.dead_seen_at = Some(seen_at);
                    rec.transition(&self.metrics, &node, NodeState::Dead, reason, message);
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
        let now = Instant::now();
        for (name, rec) in self.records.iter_mut() {
            match listed.get(name) {
                Some(status) => rec.adopt_listed(status.as_ref(), now),
                None => rec.forget_unlisted(),
            }
        }
        for (name, status) in &listed {
            if !self.records.contains_key(name) {
                let mut rec = NodeRecord::default();
                rec.adopt_listed(status.as_ref(), now);
                self.records.insert(name.clone(), rec);
            }
        }
        let names: BTreeSet<String> = listed.keys().chain(heartbeats.keys()).cloned().collect();
        for name in &names {
            let rec = self.records.entry(name.clone()).or_default();
            match heartbeats.get(name) {
                Some(hb) if rec.is_blind_unknown() && !rec.proves_life(hb.as_ref()) => {
                    // etcd resets every lease's TTL when it comes back, so a key present
                    // now says nothing yet: a dead node's key vanishes within a TTL, a live
                    // agent writes its value again. Until either, the node stays Unknown.
                    let ttl = Duration::from_secs(rec.ttl_seconds().into());
                    if hb.is_some() {
                        rec.heartbeat = hb.clone();
                    }
                    rec.vouch_at = Some(now + 2 * ttl + VOUCH_MARGIN);
                }
                Some(hb) => self.observe_alive(name, hb.clone()),
                None => {
                    rec.vouch_at = None;
                    let was_live = rec.state() == Some(NodeState::Alive) || rec.is_blind_unknown();
                    if was_live && store_replaced {
                        // A new store holds no lease yet: a live agent grants one and writes its
                        // key within a third of its TTL. Dead if none has by then.
                        let ttl = Duration::from_secs(rec.ttl_seconds().into());
                        rec.doom_at.get_or_insert(now + ttl + VOUCH_MARGIN);
                    } else if was_live {
                        rec.transition(
                            &self.metrics,
                            name,
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
            if self.records.get(name).is_some_and(|r| r.liveness.is_some()) {
                continue;
            }
            let rec = self.records.entry(name.clone()).or_default();
            rec.transition(
                &self.metrics,
                name,
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
                || rec.reason() != Some(LivenessReason::NoHeartbeat)
        });
    }

    /// Every MonitorNode's status, read in pages: only the statuses are kept, so a large
    /// cluster's full objects are never all in memory at once.
    async fn list_monitor_nodes(&self) -> BTreeMap<String, Option<MonitorNodeStatus>> {
        let mut backoff = Backoff::default();
        'list: loop {
            let mut statuses = BTreeMap::new();
            let mut page = ListParams::default().limit(LIST_PAGE);
            loop {
                match self.api.list(&page).await {
                    Ok(list) => {
                        statuses
                            .extend(list.items.into_iter().map(|mn| (mn.name_any(), mn.status)));
                        match list.metadata.continue_.filter(|c| !c.is_empty()) {
                            Some(token) => page = page.continue_token(&token),
                            None => return statuses,
                        }
                    }
                    Err(e) => {
                        // An expired continue token, or the API server away: start over.
                        self.metrics.reconcile_error("liveness");
                        tracing::warn!(error = %e, "list MonitorNodes failed; retrying");
                        backoff.wait().await;
                        continue 'list;
                    }
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
        if rec.state() != Some(NodeState::Alive) {
            let message = match &rec.heartbeat {
                Some(hb) => format!(
                    "agent {} holds its heartbeat lease ({}s TTL)",
                    hb.agent_version, hb.ttl_seconds
                ),
                None => "the heartbeat key exists".to_string(),
            };
            rec.dead_seen_at = None;
            rec.vouch_at = None;
            rec.transition(
                &self.metrics,
                node,
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
            rec.adopt_listed(status.as_ref(), now);
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
        for (name, rec) in self.records.iter_mut() {
            let ttl = rec.ttl_seconds();
            if rec.state() != Some(NodeState::Alive) || blind <= Duration::from_secs(ttl.into()) {
                continue;
            }
            let message = format!(
                "the controller has had no working watch on {HEARTBEAT_PREFIX} for {:.0}s, longer than the node's {ttl}s TTL: it cannot tell whether the node is alive",
                blind.as_secs_f64(),
            );
            rec.vouch_at = None;
            rec.transition(
                &self.metrics,
                name,
                NodeState::Unknown,
                LivenessReason::EtcdUnreachable,
                message,
            );
            self.writer.consider(name, rec);
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
        for (name, rec) in self.records.iter_mut() {
            if rec.doom_at.is_none_or(|at| at > now) {
                continue;
            }
            let doomed_at = rec.doom_at.take();
            if rec.state() != Some(NodeState::Dead) {
                rec.dead_seen_at = doomed_at;
                let message = format!(
                    "the heartbeat key went away and no agent wrote it again within its {}s TTL",
                    rec.ttl_seconds()
                );
                rec.transition(
                    &self.metrics,
                    name,
                    NodeState::Dead,
                    LivenessReason::HeartbeatExpired,
                    message,
                );
            }
            self.writer.consider(name, rec);
        }
    }

    fn update_gauges(&self) {
        let mut counts = [0i64; 3];
        for rec in self.records.values() {
            match rec.state() {
                Some(NodeState::Alive) => counts[0] += 1,
                Some(NodeState::Dead) => counts[1] += 1,
                Some(NodeState::Unknown) | None => counts[2] += 1,
            }
        }
        for (state, n) in [NodeState::Alive, NodeState::Dead, NodeState::Unknown]
            .into_iter()
            .zip(counts)
        {
            self.metrics
                .nodes
                .get_or_create(&StateLabel::of(state))
                .set(n);
        }
    }
}
