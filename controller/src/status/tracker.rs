//! The task that moves the heartbeat events through the liveness rules to the status writer:
//! it reads the clocks, the MonitorNodes and the Nodes, feeds them to [`Liveness`], logs and
//! counts the transitions, and has the writer write what changed. It decides nothing itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus, NodeState, transition_line};
use nodepulse_runtime::Backoff;
use tokio::sync::{mpsc, watch};

use crate::config::DesiredConfigs;
use crate::error::{Error, Result};
use crate::inventory::Inventory;
use crate::metrics::{Metrics, StateLabel};
use crate::status::elections::ElectionEvent;
use crate::status::heartbeats::HeartbeatEvent;
use crate::status::liveness::{DisruptionBrake, Liveness, Now};
use crate::status::writer::StatusWriter;

/// MonitorNodes read per request when listing them all.
const LIST_PAGE: u32 = 500;

/// Sleeps until `at` (forever for `None`: the branch is disabled then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// How often deadlines are checked and due writes started.
const TICK: Duration = Duration::from_millis(500);

/// Runs the liveness rules on the heartbeat events and has the status writer write what they
/// decide.
pub struct LivenessTracker {
    api: Api<MonitorNode>,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    liveness: Liveness,
    writer: StatusWriter,
    /// Signals a change in the set of Node objects.
    node_changes: watch::Receiver<u64>,
    /// Signals a change in the desired configs (the writer reads them).
    desired: watch::Receiver<DesiredConfigs>,
    /// The nodes whose leases the election watcher is to audit.
    doubted: watch::Sender<BTreeSet<String>>,
}

impl LivenessTracker {
    /// A tracker having `writer` write the statuses; it reads the MonitorNodes, the Node
    /// inventory and the desired configs through the writer's client and caches.
    pub fn new(
        writer: StatusWriter,
        brake: DisruptionBrake,
        doubted: watch::Sender<BTreeSet<String>>,
    ) -> Self {
        let inventory = writer.inventory().clone();
        LivenessTracker {
            api: writer.api().clone(),
            desired: writer.desired().clone(),
            metrics: writer.metrics().clone(),
            node_changes: inventory.watch_changes(),
            inventory,
            liveness: Liveness::new(Instant::now(), brake),
            writer,
            doubted,
        }
    }

    /// Consumes heartbeat and election events until a watcher goes away.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<HeartbeatEvent>,
        mut elections: mpsc::Receiver<ElectionEvent>,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let verdict_due = self.liveness.next_deadline();
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => return Err(Error::TaskStopped("heartbeat watcher")),
                },
                event = elections.recv() => match event {
                    Some(event) => {
                        self.liveness.observe_election(event, Now::read());
                        self.apply_decisions();
                    }
                    None => return Err(Error::TaskStopped("etcd election watcher")),
                },
                outcome = self.writer.next_outcome() => {
                    self.writer.finish(outcome, self.liveness.records_mut());
                }
                Ok(()) = self.node_changes.changed() => {
                    let nodes = self.inventory.node_zones();
                    self.liveness.nodes_changed(&nodes, Now::read());
                    self.apply_decisions();
                    // A cordon or its end is written at once.
                    for (name, rec) in self.liveness.records_mut().iter_mut() {
                        self.writer.consider(name, rec);
                    }
                }
                Ok(()) = self.desired.changed() => {
                    for (name, rec) in self.liveness.records_mut().iter_mut() {
                        self.writer.consider(name, rec);
                    }
                }
                () = sleep_until(verdict_due), if verdict_due.is_some() => {
                    self.liveness.tick(Now::read());
                    self.apply_decisions();
                    self.writer.flush_due(self.liveness.records_mut());
                }
                _ = tick.tick() => {
                    if self.liveness.wants_adoption(Instant::now()) {
                        let listed = self.list_monitor_nodes().await;
                        tracing::info!(
                            monitor_nodes = listed.len(),
                            "no heartbeat list yet: read the MonitorNodes, to say Unknown for those etcd cannot vouch for"
                        );
                        self.liveness.adopt(listed, Now::read());
                    }
                    self.liveness.tick(Now::read());
                    self.apply_decisions();
                    self.writer.flush_due(self.liveness.records_mut());
                    self.update_gauges();
                    self.publish_doubted();
                }
            }
        }
    }

    async fn handle(&mut self, event: HeartbeatEvent) {
        match event {
            HeartbeatEvent::Snapshot {
                heartbeats,
                store_replaced,
            } => {
                let listed = self.list_monitor_nodes().await;
                let (keys, monitor_nodes) = (heartbeats.len(), listed.len());
                let nodes = self.inventory.node_zones();
                self.liveness
                    .reconcile(heartbeats, store_replaced, listed, &nodes, Now::read());
                self.apply_decisions();
                tracing::info!(
                    heartbeats = keys,
                    monitor_nodes,
                    "reconciled every MonitorNode against the heartbeat keys"
                );
            }
            event => {
                self.liveness.observe(event, Now::read());
                self.apply_decisions();
            }
        }
    }

    /// Logs and counts the transitions the rules made, and has the writer look at the nodes
    /// they touched.
    fn apply_decisions(&mut self) {
        let decisions = self.liveness.take_decisions();
        for t in &decisions.transitions {
            tracing::info!(
                node = t.node,
                reason = t.reason.as_str(),
                "{}",
                transition_line(&t.node, t.state, t.reason)
            );
            self.metrics
                .transitions
                .get_or_create(&StateLabel::of(t.state))
                .inc();
        }
        for d in &decisions.disruptions {
            let zone = d.zone.as_deref().unwrap_or("");
            tracing::warn!(
                zone,
                lost = d.lost,
                live = d.live,
                "mass disruption: {} of {} live nodes{} lost their heartbeat within {:.0}s; they are Unknown (MassDisruption), not Dead",
                d.lost,
                d.live,
                d.zone
                    .as_ref()
                    .map_or(String::new(), |z| format!(" in zone {z}")),
                d.window.as_secs_f64(),
            );
            self.metrics.disruptions.inc();
        }
        if !decisions.leader_changes.is_empty() {
            // The nodes to audit grew: at once. They shrink as agents prove themselves, which
            // the next tick publishes (a list of every node per event would cost a large fleet).
            let doubted = self.publish_doubted();
            for (from, to) in &decisions.leader_changes {
                tracing::info!(
                    from,
                    to,
                    doubted,
                    "etcd's leader changed (term {from} -> {to}): every lease restarted at its full TTL, so each Alive node's agent must show within a TTL that it renews its lease, or the node is Unknown (LeaderChurn)"
                );
                self.metrics.etcd_leader_changes.inc();
            }
        }
        let records = self.liveness.records_mut();
        for name in &decisions.touched {
            if let Some(rec) = records.get_mut(name) {
                self.writer.consider(name, rec);
            }
        }
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

    /// Hands the election watcher the nodes whose leases it is to audit; returns how many.
    fn publish_doubted(&self) -> usize {
        let doubted = self.liveness.doubted();
        let count = doubted.len();
        self.doubted.send_if_modified(|was| {
            let changed = *was != doubted;
            if changed {
                *was = doubted;
            }
            changed
        });
        count
    }

    fn update_gauges(&self) {
        self.metrics
            .nodes_disrupted
            .set(self.liveness.disrupted() as i64);
        let counts = self.liveness.counts();
        for (state, n) in [NodeState::Alive, NodeState::Dead, NodeState::Unknown]
            .into_iter()
            .zip(counts)
        {
            self.metrics
                .nodes
                .get_or_create(&StateLabel::of(state))
                .set(n as i64);
        }
        self.metrics.set_node_states(
            self.liveness
                .records()
                .iter()
                .map(|(name, rec)| (name.as_str(), rec.state())),
        );
    }
}
