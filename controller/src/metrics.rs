//! Prometheus metrics and the `/metrics`, `/healthz` (alive) and `/readyz` (etcd answers) endpoint.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_runtime::{healthz, openmetrics, serve_admin};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use tokio::net::TcpListener;

/// A node liveness state, as a metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `alive`, `dead` or `unknown`.
    pub state: &'static str,
}

impl StateLabel {
    /// The label of `state`.
    pub fn of(state: NodeState) -> Self {
        StateLabel {
            state: match state {
                NodeState::Alive => "alive",
                NodeState::Dead => "dead",
                NodeState::Unknown => "unknown",
            },
        }
    }
}

/// One node's state series, as metric labels (kube-state-metrics' `kube_node_status_condition`
/// shape: one series per state, 1 for the node's state and 0 for the others).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabel {
    /// The node's name.
    pub node: String,
    /// `alive`, `dead` or `unknown`.
    pub state: &'static str,
}

/// Which reconciler failed, as a metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcilerLabel {
    /// `liveness`, `monitorconfig` or `config-keys`.
    pub reconciler: &'static str,
}

/// Why a heartbeat key was not taken as a heartbeat, as a metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabel {
    /// `no_lease`, `too_large`, `malformed`, `other_node`, `ttl_out_of_range`, `shared_lease`,
    /// `ttl_mismatch`, `lease_ttl_out_of_range` or `no_node`.
    pub reason: &'static str,
}

/// Which status writes, as a metric label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteKindLabel {
    /// `transition` (a liveness change: goes first) or `usage` (a refresh: gives way).
    pub kind: &'static str,
}

/// Every metric the controller exports.
pub struct Metrics {
    registry: Registry,
    /// MonitorNodes by state, as this replica last wrote them.
    pub nodes: Family<StateLabel, Gauge>,
    /// Liveness transitions, by the state entered.
    pub transitions: Family<StateLabel, Counter>,
    /// Mass disruptions found: heartbeats lost together by more than the brake's share.
    pub disruptions: Counter,
    /// Nodes Unknown now because their heartbeat was lost in a mass disruption.
    pub nodes_disrupted: Gauge,
    /// etcd leader changes seen (a higher raft term in a response header).
    pub etcd_leader_changes: Counter,
    /// Failed reconciles and writes, by reconciler.
    pub reconcile_errors: Family<ReconcilerLabel, Counter>,
    /// Seconds from an etcd delete event on a heartbeat key to the Dead status being written.
    pub dead_detection: Histogram,
    /// MonitorNode status writes sent to the API server.
    pub status_writes: Counter,
    /// Status writes queued or under way, by kind.
    pub status_writes_pending: Family<WriteKindLabel, Gauge>,
    /// The usage-refresh interval in force: `--usage-write-interval`, or longer while the API
    /// server does not absorb one refresh per node per interval.
    pub usage_write_interval: Gauge<f64, AtomicU64>,
    /// etcd config keys written or deleted by the controller.
    pub config_key_writes: Counter,
    /// Whether this replica holds the leader Lease (1) or stands by (0).
    pub leader: Gauge,
    /// Heartbeat keys not taken as a heartbeat, by reason.
    pub heartbeats_rejected: Family<RejectionLabel, Counter>,
    /// Each node's state: 1 on the series of its state, 0 on the others.
    pub node_state: Family<NodeStateLabel, Gauge>,
    /// The nodes `node_state` has series for, so a node that goes away loses them.
    node_state_exported: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nodepulse_controller");
        let nodes = Family::<StateLabel, Gauge>::default();
        registry.register("nodes", "MonitorNodes by liveness state", nodes.clone());
        let transitions = Family::<StateLabel, Counter>::default();
        registry.register(
            "transitions",
            "Node liveness transitions, by the state entered",
            transitions.clone(),
        );
        let disruptions = Counter::default();
        registry.register(
            "mass_disruptions",
            "Mass disruptions found: more than the brake's share of a zone's or the fleet's live nodes lost their heartbeat within one TTL, so they were marked Unknown instead of Dead",
            disruptions.clone(),
        );
        let nodes_disrupted = Gauge::default();
        registry.register(
            "nodes_disrupted",
            "Nodes Unknown because their heartbeat was lost in a mass disruption (reason MassDisruption)",
            nodes_disrupted.clone(),
        );
        let etcd_leader_changes = Counter::default();
        registry.register(
            "etcd_leader_changes",
            "etcd leader changes seen (a higher raft term): each restarts every lease at its full TTL, so Alive nodes must show their agent renews its lease within a TTL or be Unknown (reason LeaderChurn)",
            etcd_leader_changes.clone(),
        );
        let reconcile_errors = Family::<ReconcilerLabel, Counter>::default();
        // Exported at 0 from the start: a series that appears only at the first error hides
        // that error from `rate()` and from dashboards.
        for reconciler in ["liveness", "monitorconfig", "config-keys"] {
            let _ = reconcile_errors.get_or_create(&ReconcilerLabel { reconciler });
        }
        registry.register(
            "reconcile_errors",
            "Failed reconciles and writes, by reconciler",
            reconcile_errors.clone(),
        );
        let dead_detection = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "dead_detection_seconds",
            "Time from an etcd delete event on a heartbeat key to the MonitorNode's Dead status being written",
            dead_detection.clone(),
        );
        let status_writes = Counter::default();
        registry.register(
            "status_writes",
            "MonitorNode status writes sent to the API server",
            status_writes.clone(),
        );
        let status_writes_pending = Family::<WriteKindLabel, Gauge>::default();
        for kind in ["transition", "usage"] {
            let _ = status_writes_pending.get_or_create(&WriteKindLabel { kind });
        }
        registry.register(
            "status_writes_pending",
            "MonitorNode status writes queued or under way, by kind: transitions go first, usage refreshes give way",
            status_writes_pending.clone(),
        );
        let usage_write_interval = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "usage_write_interval_seconds",
            "Time between two usage refreshes of one node's status now: the configured interval, longer while the API server does not keep up",
            usage_write_interval.clone(),
        );
        let config_key_writes = Counter::default();
        registry.register(
            "config_key_writes",
            "etcd config keys written or deleted by the controller",
            config_key_writes.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica holds the leader Lease (1) or stands by (0)",
            leader.clone(),
        );
        let heartbeats_rejected = Family::<RejectionLabel, Counter>::default();
        registry.register(
            "heartbeats_rejected",
            "Heartbeat keys not taken as a node's heartbeat, by reason: no lease, too large, malformed, naming another node, a TTL no agent runs with, or a lease that carries another node's heartbeat",
            heartbeats_rejected.clone(),
        );
        let node_state = Family::<NodeStateLabel, Gauge>::default();
        registry.register(
            "node_state",
            "Each MonitorNode's liveness state: 1 on the series of its state, 0 on the others (a node not judged yet is unknown)",
            node_state.clone(),
        );
        Metrics {
            registry,
            nodes,
            transitions,
            disruptions,
            nodes_disrupted,
            etcd_leader_changes,
            reconcile_errors,
            dead_detection,
            status_writes,
            status_writes_pending,
            usage_write_interval,
            config_key_writes,
            leader,
            heartbeats_rejected,
            node_state,
            node_state_exported: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Sets the queue of status writes of `kind`.
    pub fn writes_pending(&self, kind: &'static str, n: usize) {
        self.status_writes_pending
            .get_or_create(&WriteKindLabel { kind })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets each node's state series to `nodes` (name and state, `None` for not judged yet),
    /// and removes the series of nodes no longer in it, so cardinality follows the fleet.
    pub fn set_node_states<'a>(
        &self,
        nodes: impl IntoIterator<Item = (&'a str, Option<NodeState>)>,
    ) {
        const STATES: [NodeState; 3] = [NodeState::Alive, NodeState::Dead, NodeState::Unknown];
        let mut exported = self
            .node_state_exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut now = BTreeSet::new();
        for (node, state) in nodes {
            let state = state.unwrap_or(NodeState::Unknown);
            for s in STATES {
                let label = NodeStateLabel {
                    node: node.to_owned(),
                    state: StateLabel::of(s).state,
                };
                self.node_state
                    .get_or_create(&label)
                    .set(i64::from(s == state));
            }
            now.insert(node.to_owned());
        }
        for gone in exported.difference(&now) {
            for s in STATES {
                self.node_state.remove(&NodeStateLabel {
                    node: gone.clone(),
                    state: StateLabel::of(s).state,
                });
            }
        }
        *exported = now;
    }

    /// Counts one failure of `reconciler`.
    pub fn reconcile_error(&self, reconciler: &'static str) {
        self.reconcile_errors
            .get_or_create(&ReconcilerLabel { reconciler })
            .inc();
    }
}

/// How long `/readyz` waits for etcd's answer (the kubelet's probe gives up after 3 s).
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// The etcd connection `/readyz` checks: not ready before the controller has one, nor while
/// etcd does not answer a quorum read. `/healthz` stays 200 meanwhile: a controller that
/// cannot reach etcd is alive, and restarting it would not bring etcd back.
#[derive(Clone, Default)]
pub struct EtcdReadiness(Arc<OnceLock<etcd_client::Client>>);

impl EtcdReadiness {
    /// Records the controller's etcd client (the first one set stays).
    pub fn set(&self, client: etcd_client::Client) {
        let _ = self.0.set(client);
    }

    /// Whether etcd answers a linearizable read of one key (so: reachable, with a leader and
    /// quorum, and our credentials accepted) within [`READY_TIMEOUT`].
    async fn check(&self) -> std::result::Result<(), String> {
        let Some(client) = self.0.get() else {
            return Err("no etcd connection yet".into());
        };
        let mut client = client.clone();
        let read = client.get(
            nodepulse_crd::wire::HEARTBEAT_PREFIX,
            Some(etcd_client::GetOptions::new().with_count_only()),
        );
        match tokio::time::timeout(READY_TIMEOUT, read).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("etcd: {e}")),
            Err(_) => Err(format!("etcd did not answer within {READY_TIMEOUT:?}")),
        }
    }
}

async fn readyz(ready: EtcdReadiness) -> (StatusCode, String) {
    match ready.check().await {
        Ok(()) => (StatusCode::OK, "ok: etcd answers\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: EtcdReadiness,
) -> std::io::Result<()> {
    let routes = vec![
        (
            "/metrics",
            get(move || std::future::ready(openmetrics(&metrics.registry))),
        ),
        ("/healthz", get(healthz)),
        ("/readyz", get(move || readyz(ready.clone()))),
    ];
    serve_admin(listener, routes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(metrics: &Metrics) -> Vec<String> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry)
            .expect("encode metrics");
        text.lines()
            .filter(|l| l.starts_with("nodepulse_controller_node_state{"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn node_state_series_follow_the_nodes() {
        let metrics = Metrics::default();
        metrics.set_node_states([
            ("worker-1", Some(NodeState::Dead)),
            ("worker-2", Some(NodeState::Alive)),
            ("worker-3", None),
        ]);
        let lines = exposition(&metrics);
        for want in [
            r#"nodepulse_controller_node_state{node="worker-1",state="dead"} 1"#,
            r#"nodepulse_controller_node_state{node="worker-1",state="alive"} 0"#,
            r#"nodepulse_controller_node_state{node="worker-1",state="unknown"} 0"#,
            r#"nodepulse_controller_node_state{node="worker-2",state="alive"} 1"#,
            r#"nodepulse_controller_node_state{node="worker-2",state="dead"} 0"#,
            r#"nodepulse_controller_node_state{node="worker-3",state="unknown"} 1"#,
        ] {
            assert!(lines.iter().any(|l| l == want), "{want} not in {lines:#?}");
        }
        assert_eq!(lines.len(), 9, "{lines:#?}");

        // worker-1 comes back, worker-3's MonitorNode goes away.
        metrics.set_node_states([
            ("worker-1", Some(NodeState::Alive)),
            ("worker-2", Some(NodeState::Alive)),
        ]);
        let lines = exposition(&metrics);
        assert!(
            lines
                .iter()
                .any(|l| l == r#"nodepulse_controller_node_state{node="worker-1",state="alive"} 1"#),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l == r#"nodepulse_controller_node_state{node="worker-1",state="dead"} 0"#),
            "{lines:#?}"
        );
        assert!(!lines.iter().any(|l| l.contains("worker-3")), "{lines:#?}");
        assert_eq!(lines.len(), 6, "{lines:#?}");
    }
}
