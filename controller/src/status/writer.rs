//! When each node's MonitorNode status is written: transitions at once and ahead of everything
//! else, usage figures at most every `--usage-write-interval` and not at all while transitions
//! wait, writes per node kept in order and never two at a time, a failed one retried with a
//! per-node backoff, and nothing written when nothing changed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::runtime::events::Recorder;
use kube::{Client, ResourceExt};
use nodepulse_crd::v1alpha1::MonitorNode;
use nodepulse_crd::wire::ConfigValue;
use nodepulse_runtime::Backoff;
use tokio::sync::{Semaphore, watch};

use crate::config::DesiredConfigs;
use crate::error::Result;
use crate::inventory::Inventory;
use crate::metrics::Metrics;
use crate::status::apply::{WriteJob, write_status};
use crate::status::events::TransitionEvents;
use crate::status::node_condition::NodeConditions;
use crate::status::record::NodeRecord;
use crate::status::render::{compute_status, from_an_earlier_run, usage_moved, without_usage};

/// Usage-only changes too small to matter are still written after this many usage intervals,
/// so `lastHeartbeatTime` never lags more than a few minutes.
const REFRESH_FACTOR: u32 = 10;

/// Usage refreshes may start at most this far ahead of their pace, in seconds of it: the
/// refreshes due go out spread over time, not in one wave.
const PACE_BURST_SECONDS: f64 = 1.0;

/// Writes other than transitions wait this long after the last transition write: a mass failure
/// arrives as deletes spread over seconds, and each write in between would delay a Dead.
const STORM_QUIET: Duration = Duration::from_secs(2);

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

/// What became of a write.
enum Written {
    /// The status was written at this instant, to this MonitorNode.
    Done(Instant, ObjectReference),
    /// Not sent: transitions were waiting for the API server, and this write carries none.
    Deferred,
}

/// A write that ended.
pub struct WriteOutcome {
    job: WriteJob,
    result: Result<Written>,
}

/// Writes MonitorNode status from the node records, in order per node and within the limits.
pub struct StatusWriter {
    api: Api<MonitorNode>,
    events: TransitionEvents,
    inventory: Inventory,
    metrics: Arc<Metrics>,
    desired: watch::Receiver<DesiredConfigs>,
    settings: StatusSettings,
    writes: FuturesUnordered<BoxFuture<'static, WriteOutcome>>,
    permits: Arc<Semaphore>,
    /// Writes that carry no transition also take one of these, so at most half the permits go
    /// to usage refreshes and a Dead status never queues behind a wave of them.
    background_permits: Arc<Semaphore>,
    /// Transition writes queued or under way: the others give way to them.
    transitions_pending: Arc<AtomicUsize>,
    /// Writes other than transitions start again at this instant (see [`STORM_QUIET`]).
    quiet_from: Instant,
    /// Writes without a transition started and not ended yet.
    background_in_flight: usize,
    pace: RefreshPace,
}

/// How fast usage refreshes go out: never faster than one per node per
/// `--usage-write-interval`, and slower while the API server does not keep up with them (the
/// refreshes started a tick ago still queue for a permit), so that the writes never exceed what
/// it absorbs and a transition never waits behind a backlog.
struct RefreshPace {
    /// Refreshes per second allowed now (0 until the first tick).
    rate: f64,
    /// Refreshes that may start now.
    allowance: f64,
    at: Instant,
}

impl RefreshPace {
    /// Adjusts the rate to the API server's answer: `backlog` refreshes still waiting for a
    /// permit of the `lanes` they may use. `ceiling` is one refresh per node per interval.
    fn adjust(&mut self, backlog: usize, lanes: usize, ceiling: f64, now: Instant) {
        if self.rate == 0.0 {
            self.rate = ceiling;
        }
        if backlog > lanes {
            // Behind: back off multiplicatively, as TCP does.
            self.rate = (self.rate * 0.7).max(1.0);
        } else if backlog == 0 {
            self.rate = (self.rate * 1.1 + 1.0).min(ceiling);
        }
        self.rate = self.rate.min(ceiling).max(ceiling.min(1.0));
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.allowance = (self.allowance + self.rate * elapsed).min(self.rate * PACE_BURST_SECONDS);
    }

    /// Takes one refresh from the allowance, if any is left.
    fn take(&mut self) -> bool {
        if self.allowance >= 1.0 {
            self.allowance -= 1.0;
            true
        } else {
            false
        }
    }
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
            events: TransitionEvents::new(recorder),
            inventory,
            metrics,
            desired,
            settings,
            writes: FuturesUnordered::new(),
            permits,
            background_permits,
            transitions_pending: Arc::default(),
            quiet_from: Instant::now(),
            background_in_flight: 0,
            pace: RefreshPace {
                rate: 0.0,
                allowance: 0.0,
                at: Instant::now(),
            },
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

    /// The next write to end (while Events go out meanwhile); pending forever while none is
    /// under way.
    pub async fn next_outcome(&mut self) -> WriteOutcome {
        loop {
            tokio::select! {
                Some(outcome) = self.writes.next(), if !self.writes.is_empty() => return outcome,
                () = self.events.published() => {}
            }
        }
    }

    /// Whether transitions are being written, or were a moment ago: then nothing else is.
    fn storming(&self, now: Instant) -> bool {
        self.transitions_pending.load(Ordering::Relaxed) > 0 || now < self.quiet_from
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
        if rec.verdict.is_none() {
            return;
        }
        let status = compute_status(
            rec,
            self.desired_for(node).as_ref(),
            self.inventory.maintenance(node),
        );
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
    /// MonitorNodes created before their Node object (the next write sets the owner); and the
    /// Event summaries whose time has come.
    pub fn flush_due(&mut self, records: &mut HashMap<String, NodeRecord>) {
        self.events.flush_due();
        let now = Instant::now();
        let storming = self.storming(now);
        let interval = self.settings.usage_write_interval;
        if !storming {
            let ceiling = records.len().max(1) as f64 / interval.as_secs_f64().max(0.001);
            let lanes = (self.settings.max_concurrent_writes.max(2) / 2).max(1);
            let waiting = self.background_in_flight.saturating_sub(lanes);
            self.pace.adjust(waiting, lanes, ceiling, now);
            let effective = records.len() as f64 / self.pace.rate.max(0.001);
            self.metrics
                .usage_write_interval
                .set(effective.max(interval.as_secs_f64()));
        }
        for (name, rec) in records.iter_mut() {
            if rec.write.in_flight {
                continue;
            }
            let transition = !rec.pending_events.is_empty() || rec.dead_seen_at.is_some();
            if storming && !transition {
                continue;
            }
            let w = &rec.write;
            let due = match w.retry_at {
                Some(at) => at <= now,
                None => {
                    let since = w.last_write.map_or(Duration::MAX, |t| now - t);
                    let refresh = (w.usage_moved && since >= interval)
                        || (w.usage_dirty && since >= interval * REFRESH_FACTOR);
                    let condition_due = self.settings.node_conditions.as_ref().is_some_and(|nc| {
                        self.inventory.node(name).is_some()
                            && nc.due(name, rec.written.as_ref(), now)
                    });
                    (refresh && self.pace.take()) || condition_due
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
        let status = compute_status(
            rec,
            self.desired_for(node).as_ref(),
            self.inventory.maintenance(node),
        );
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
        let metrics = self.metrics.clone();
        let permits = self.permits.clone();
        let transition = job.is_transition();
        let background = (!transition).then(|| self.background_permits.clone());
        if !transition {
            self.background_in_flight += 1;
        }
        let node_conditions = self.settings.node_conditions.clone();
        let pending = self.transitions_pending.clone();
        if transition {
            pending.fetch_add(1, Ordering::Relaxed);
        }
        self.writes.push(Box::pin(async move {
            let _background = match background {
                Some(b) => b.acquire_owned().await.ok(),
                None => None,
            };
            let _permit = permits.acquire_owned().await;
            if !transition && pending.load(Ordering::Relaxed) > 0 {
                return WriteOutcome {
                    job,
                    result: Ok(Written::Deferred),
                };
            }
            metrics.status_writes.inc();
            let result = write_status(&api, &job)
                .await
                .map(|(at, mn)| Written::Done(at, mn));
            // A node without a Node object (simulated, or deleted) has nowhere to show it.
            if let (Ok(_), Some(nc)) = (&result, node_conditions)
                && job.owner.is_some()
            {
                nc.sync(&job.node, &job.status).await;
            }
            if transition {
                pending.fetch_sub(1, Ordering::Relaxed);
            }
            WriteOutcome { job, result }
        }));
        self.report_queue();
    }

    /// Exports how many writes of each kind are queued or under way.
    fn report_queue(&self) {
        let transitions = self.transitions_pending.load(Ordering::Relaxed);
        self.metrics.writes_pending("transition", transitions);
        self.metrics
            .writes_pending("usage", self.background_in_flight);
    }

    /// Takes a write's end into its node's record: what was written, or a retry with the
    /// transitions' Events kept for it.
    pub fn finish(&mut self, outcome: WriteOutcome, records: &mut HashMap<String, NodeRecord>) {
        let WriteOutcome { job, result } = outcome;
        let Some(rec) = records.get_mut(&job.node) else {
            return;
        };
        rec.write.in_flight = false;
        if job.is_transition() {
            self.quiet_from = Instant::now() + STORM_QUIET;
        } else {
            self.background_in_flight = self.background_in_flight.saturating_sub(1);
        }
        self.report_queue();
        match result {
            Ok(Written::Deferred) => {
                // Written once the transitions are through (`flush_due` holds it until then).
                rec.write.retry_at = Some(Instant::now());
                rec.write.owner_requested = false;
                if rec.write.write_again {
                    self.consider(&job.node, rec);
                }
            }
            Ok(Written::Done(written_at, mn)) => {
                if let Some(seen) = job.dead_seen_at {
                    self.metrics
                        .dead_detection
                        .observe((written_at - seen).as_secs_f64());
                }
                for t in &job.events {
                    self.events.raise(&job.node, &mn, t);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(at: Instant) -> RefreshPace {
        RefreshPace {
            rate: 0.0,
            allowance: 0.0,
            at,
        }
    }

    #[test]
    fn refreshes_start_at_one_per_node_per_interval_and_never_burst_past_a_second_of_it() {
        let t0 = Instant::now();
        let mut p = pace(t0);
        // 1,000 nodes, 10 s interval: 100 refreshes a second at most.
        p.adjust(0, 16, 100.0, t0 + Duration::from_secs(5));
        assert_eq!(p.rate, 100.0);
        // Five seconds' worth of allowance is capped at one second's.
        assert_eq!(p.allowance, 100.0);
        assert_eq!((0..150).filter(|_| p.take()).count(), 100);
    }

    #[test]
    fn refreshes_slow_down_while_the_api_server_falls_behind_and_recover_after() {
        let t0 = Instant::now();
        let mut p = pace(t0);
        let mut at = t0;
        let mut tick = |p: &mut RefreshPace, backlog| {
            at += Duration::from_millis(500);
            p.adjust(backlog, 16, 100.0, at);
            p.rate
        };
        assert_eq!(tick(&mut p, 0), 100.0);
        // A backlog beyond the lanes: multiplicative decrease, never below one a second.
        assert_eq!(tick(&mut p, 17), 70.0);
        assert!((tick(&mut p, 17) - 49.0).abs() < 1e-9);
        for _ in 0..50 {
            tick(&mut p, 100);
        }
        assert_eq!(p.rate, 1.0);
        // A backlog within the lanes holds the rate.
        assert_eq!(tick(&mut p, 5), 1.0);
        // None: it grows back, up to the ceiling and no further.
        assert_eq!(tick(&mut p, 0), 2.1);
        for _ in 0..100 {
            tick(&mut p, 0);
        }
        assert_eq!(p.rate, 100.0);
    }

    #[test]
    fn a_smaller_fleet_lowers_the_ceiling_at_once() {
        let t0 = Instant::now();
        let mut p = pace(t0);
        p.adjust(0, 16, 100.0, t0 + Duration::from_secs(1));
        p.adjust(0, 16, 10.0, t0 + Duration::from_secs(2));
        assert_eq!(p.rate, 10.0);
        assert!(p.allowance <= 10.0);
    }
}
