//! When each node's MonitorNode status is written: transitions at once, usage figures at most
//! every `--usage-write-interval`, writes per node kept in order and never two at a time, a
//! failed one retried with a per-node backoff, and nothing written when nothing changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use nodepulse_crd::etcd::Backoff;
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus};
use nodepulse_crd::wire::ConfigValue;
use tokio::sync::{Semaphore, watch};

use crate::apply::write_status;
use crate::conditions::{compute_status, from_an_earlier_run, usage_moved, without_usage};
use crate::error::Result;
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::node_condition::NodeConditions;
use crate::record::{Liveness, NodeRecord};

/// What each node's config key should make its agent run, as the config sync last computed
/// it; nodes absent run on the defaults. `None` until the first sync.
pub type DesiredConfigs = Option<Arc<BTreeMap<String, ConfigValue>>>;

/// Usage-only changes too small to matter are still written after this many usage intervals,
/// so `lastHeartbeatTime` never lags more than a few minutes.
const REFRESH_FACTOR: u32 = 10;

/// Tuning of the status writer.
#[derive(Clone, Debug)]
pub struct StatusSettings {
    /// Least time between two writes that only refresh usage figures, per node.
    pub usage_write_interval: Duration,
    /// Most status writes in flight at once.
    pub max_concurrent_writes: usize,
    /// The Node condition each status write carries along, when `--node-condition` is on.
    pub node_conditions: Option<NodeConditions>,
}

/// Where one node's writes stand.
#[derive(Default)]
pub struct WriteState {
    /// When the last write ended (or the status was listed).
    pub last_write: Option<Instant>,
    /// The usage figures or heartbeat time differ from what was written.
    pub usage_dirty: bool,
    /// ...and by enough to be worth a write once the usage interval has passed.
    pub usage_moved: bool,
    /// A write is queued or on its way.
    pub in_flight: bool,
    /// Something changed while it was: write again when it ends.
    pub write_again: bool,
    /// A failed write is retried at this instant.
    pub retry_at: Option<Instant>,
    retry_backoff: Option<Backoff>,
    /// A write was started to give the MonitorNode its Node as owner.
    pub owner_requested: bool,
}

/// One status write and the Events it carries.
pub struct WriteJob {
    /// The node.
    pub node: String,
    /// The full status to apply.
    pub status: MonitorNodeStatus,
    /// Transitions whose Events go out once the status is written.
    pub events: Vec<Liveness>,
    /// When the delete behind a Dead transition arrived.
    pub dead_seen_at: Option<Instant>,
    /// The MonitorNode's owner: its Node, when one exists.
    pub owner: Option<OwnerReference>,
    /// The MonitorNode is known to exist: apply the status straight away.
    pub exists: bool,
}

/// A write that ended.
pub struct WriteOutcome {
    job: WriteJob,
    /// When the status was written (before the Events went out).
    result: Result<Instant>,
}

/// Writes MonitorNode status from the node records, in order per node and within the limits.
pub struct StatusWriter {
    api: Api<MonitorNode>,
    recorder: Recorder,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    desired: watch::Receiver<DesiredConfigs>,
    settings: StatusSettings,
    writes: FuturesUnordered<BoxFuture<'static, WriteOutcome>>,
    permits: Arc<Semaphore>,
    /// Writes that carry no transition also take one of these, so at most half the permits go
    /// to usage refreshes and a Dead status never queues behind a wave of them.
    background_permits: Arc<Semaphore>,
}

impl StatusWriter {
    /// A writer through `client`, judging applied configs against `desired`.
    pub fn new(
        client: Client,
        recorder: Recorder,
        inventory: Inventory,
        metrics: Arc<Metrics>,
        desired: watch::Receiver<DesiredConfigs>,
        settings: StatusSettings,
    ) -> Self {
        let permits = Arc::new(Semaphore::new(settings.max_concurrent_writes.max(2)));
        let background_permits =
            Arc::new(Semaphore::new(settings.max_concurrent_writes.max(2) / 2));
        StatusWriter {
            api: Api::all(client),
            recorder,
            inventory,
            metrics,
            desired,
            settings,
            writes: FuturesUnordered::new(),
            permits,
            background_permits,
        }
    }

    /// The MonitorNode API the statuses are written through.
    pub fn api(&self) -> &Api<MonitorNode> {
        &self.api
    }

    /// The Node and MonitorNode caches.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The controller's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The desired configs the applied ones are judged against.
    pub fn desired(&self) -> &watch::Receiver<DesiredConfigs> {
        &self.desired
    }

    /// The next write to end; pending forever while none is under way.
    pub async fn next_outcome(&mut self) -> WriteOutcome {
        match self.writes.next().await {
            Some(outcome) => outcome,
            None => std::future::pending().await,
        }
    }

    /// What `node`'s agent should run; `None` before the first config sync.
    fn desired_for(&self, node: &str) -> Option<ConfigValue> {
        self.desired
            .borrow()
            .as_ref()
            .map(|d| d.get(node).cloned().unwrap_or_default())
    }

    /// Writes at once when something other than the usage figures changed; otherwise marks the
    /// usage dirty for the next periodic flush.
    pub fn consider(&mut self, node: &str, rec: &mut NodeRecord) {
        if rec.liveness.is_none() {
            return;
        }
        let status = compute_status(rec, self.desired_for(node).as_ref());
        // The first usage figures go out at once, so a new node shows CPU% without waiting.
        if let Some(written) = &rec.written
            && without_usage(written) == without_usage(&status)
            && rec.pending_events.is_empty()
            && (written.usage.is_some() || status.usage.is_none())
            && !from_an_earlier_run(written, rec.heartbeat.as_ref())
        {
            rec.write.usage_dirty = *written != status;
            rec.write.usage_moved = usage_moved(written.usage.as_ref(), status.usage.as_ref());
            return;
        }
        self.start(node, rec);
    }

    /// Starts the writes that are due: usage refreshes whose interval has passed, retries, and
    /// MonitorNodes created before their Node object (the next write sets the owner).
    pub fn flush_due(&mut self, records: &mut HashMap<String, NodeRecord>) {
        let now = Instant::now();
        let interval = self.settings.usage_write_interval;
        for (name, rec) in records.iter_mut() {
            if rec.write.in_flight {
                continue;
            }
            let w = &rec.write;
            let due = match w.retry_at {
                Some(at) => at <= now,
                None => {
                    let since = w.last_write.map_or(Duration::MAX, |t| now - t);
                    (w.usage_moved && since >= interval)
                        || (w.usage_dirty && since >= interval * REFRESH_FACTOR)
                        || self.settings.node_conditions.as_ref().is_some_and(|nc| {
                            self.inventory.node(name).is_some()
                                && nc.due(name, rec.written.as_ref(), now)
                        })
                }
            };
            let orphan = !w.owner_requested
                && rec.written.is_some()
                && self.inventory.node(name).is_some()
                && self
                    .inventory
                    .monitor_node(name)
                    .is_some_and(|mn| mn.owner_references().is_empty());
            if orphan {
                rec.write.owner_requested = true;
            }
            if due || orphan {
                self.start(name, rec);
            }
        }
    }

    /// Queues a write of the status `rec` calls for, or, with one under way, a write after it.
    fn start(&mut self, node: &str, rec: &mut NodeRecord) {
        if rec.write.in_flight {
            // One write per node at a time, in order: the next one starts when this one ends.
            rec.write.write_again = true;
            return;
        }
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
        let status = compute_status(rec, self.desired_for(node).as_ref());
        let w = &mut rec.write;
        w.in_flight = true;
        w.write_again = false;
        w.usage_dirty = false;
        w.usage_moved = false;
        w.retry_at = None;
        let job = WriteJob {
            exists: self.inventory.monitor_node(node).is_some() || rec.written.is_some(),
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
        let node_conditions = self.settings.node_conditions.clone();
        self.metrics.status_writes.inc();
        self.writes.push(Box::pin(async move {
            let _background = match background {
                Some(b) => b.acquire_owned().await.ok(),
                None => None,
            };
            let _permit = permits.acquire_owned().await;
            let result = write_status(&api, &recorder, &job).await;
            // A node without a Node object (simulated, or deleted) has nowhere to show it.
            if let (Ok(_), Some(nc)) = (&result, node_conditions)
                && job.owner.is_some()
            {
                nc.sync(&job.node, &job.status).await;
            }
            WriteOutcome { job, result }
        }));
    }

    /// Takes a write's end into its node's record: what was written, or a retry with the
    /// transitions' Events kept for it.
    pub fn finish(&mut self, outcome: WriteOutcome, records: &mut HashMap<String, NodeRecord>) {
        let WriteOutcome { job, result } = outcome;
        let Some(rec) = records.get_mut(&job.node) else {
            return;
        };
        rec.write.in_flight = false;
        match result {
            Ok(written_at) => {
                if let Some(seen) = job.dead_seen_at {
                    self.metrics
                        .dead_detection
                        .observe((written_at - seen).as_secs_f64());
                }
                rec.written = Some(job.status);
                rec.write.last_write = Some(Instant::now());
                rec.write.retry_backoff = None;
                if rec.write.write_again {
                    self.consider(&job.node, rec);
                }
            }
            Err(e) => {
                self.metrics.reconcile_error("liveness");
                tracing::warn!(node = %job.node, error = %e, "MonitorNode status not written; will retry");
                let mut events = job.events;
                events.append(&mut rec.pending_events);
                rec.pending_events = events;
                rec.dead_seen_at = rec.dead_seen_at.or(job.dead_seen_at);
                let backoff = rec.write.retry_backoff.get_or_insert_with(|| {
                    Backoff::new(Duration::from_millis(500), Duration::from_secs(10))
                });
                rec.write.retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
    }
}
