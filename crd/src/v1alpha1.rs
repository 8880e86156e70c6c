//! `nodepulse.io/v1alpha1`: the MonitorNode and MonitorConfig custom resources.
//!
//! The CRD YAML under `charts/` and `manifests/` is generated from these types by `crdgen`
//! (`make generate`); never edit it by hand.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::wire::{AppliedConfig, ConfigValue, Metric, MetricSet, UsageSummary};

/// API group of every nodepulse resource.
pub const GROUP: &str = "nodepulse.io";

/// A node's liveness as the controller last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum NodeState {
    /// The node's heartbeat key exists: its agent holds a live lease.
    Alive,
    /// The heartbeat key is gone: the lease expired or the agent stopped.
    Dead,
    /// The controller has not yet seen the heartbeat prefix since it started.
    Unknown,
}

/// Planned work on a node, as its Node object tells it: the node is expected to go away or stop
/// taking work, so a lost heartbeat there is no surprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Maintenance {
    /// `kubectl cordon` or `kubectl drain`: the Node is unschedulable.
    Cordoned,
    /// The cluster autoscaler is removing the node (taint `ToBeDeletedByClusterAutoscaler`).
    ScaleDown,
}

/// Why a node is in its state: the status's `reason`, and the words of its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessReason {
    /// Alive: the heartbeat key exists.
    HeartbeatSeen,
    /// Dead: the key vanished without the agent saying it was stopping, so its lease expired
    /// (or someone deleted the key: etcd's delete event does not tell the two apart).
    HeartbeatExpired,
    /// Dead: the agent said it was stopping, and no agent took the key over before its lease
    /// expired.
    AgentStopped,
    /// Unknown: the controller has had no working watch on the heartbeats for longer than the
    /// node's TTL (etcd down, a partition), like a Node's `NodeStatusUnknown`.
    EtcdUnreachable,
    /// Unknown: the Node's agent has never written a heartbeat (not scheduled, not started).
    NoHeartbeat,
    /// Unknown: the controller was uninstalled, so nothing updates the status any more.
    ControllerRemoved,
    /// Unknown: the heartbeat was lost together with those of more than a set share of the
    /// node's zone or of the fleet within one TTL. A mass loss is a network or etcd fault far
    /// more often than a mass death, so nodepulse does not say Dead (and asks for no
    /// remediation) until the heartbeats tell it more.
    MassDisruption,
    /// Unknown: etcd's leader changed, and each new leader restarts every lease at its full
    /// TTL, so the key alone no longer proves that its agent renews it; the agent has not
    /// proven it since (no heartbeat write, no keep-alive seen in the lease's time-to-live)
    /// within a TTL of the change. While leaders change faster than the TTL, a dead node's key
    /// outlives it.
    LeaderChurn,
}

impl LivenessReason {
    /// Every reason, in the order of the states they explain.
    pub const ALL: [LivenessReason; 8] = [
        LivenessReason::HeartbeatSeen,
        LivenessReason::HeartbeatExpired,
        LivenessReason::AgentStopped,
        LivenessReason::EtcdUnreachable,
        LivenessReason::NoHeartbeat,
        LivenessReason::ControllerRemoved,
        LivenessReason::MassDisruption,
        LivenessReason::LeaderChurn,
    ];

    /// The status's `reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            LivenessReason::HeartbeatSeen => "HeartbeatSeen",
            LivenessReason::HeartbeatExpired => "HeartbeatExpired",
            LivenessReason::AgentStopped => "AgentStopped",
            LivenessReason::EtcdUnreachable => "EtcdUnreachable",
            LivenessReason::NoHeartbeat => "NoHeartbeat",
            LivenessReason::ControllerRemoved => "ControllerRemoved",
            LivenessReason::MassDisruption => "MassDisruption",
            LivenessReason::LeaderChurn => "LeaderChurn",
        }
    }

    /// The reason as the log lines say it: `Node worker-1 Dead (heartbeat expired)`.
    pub fn words(self) -> &'static str {
        match self {
            LivenessReason::HeartbeatSeen => "heartbeat seen",
            LivenessReason::HeartbeatExpired => "heartbeat expired",
            LivenessReason::AgentStopped => "agent stopped",
            LivenessReason::EtcdUnreachable => "etcd unreachable",
            LivenessReason::NoHeartbeat => "no heartbeat yet",
            LivenessReason::ControllerRemoved => "controller removed",
            LivenessReason::MassDisruption => "mass disruption",
            LivenessReason::LeaderChurn => "etcd leader churn",
        }
    }

    /// The reason a status's `reason` string names, if it is one of ours.
    pub fn parse(reason: &str) -> Option<Self> {
        LivenessReason::ALL
            .into_iter()
            .find(|r| r.as_str() == reason)
    }
}

impl std::fmt::Display for LivenessReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.words())
    }
}

/// The one log line of a transition: `Node worker-1 Alive`, `Node worker-1 Dead (heartbeat
/// expired)`.
pub fn transition_line(node: &str, state: NodeState, reason: LivenessReason) -> String {
    match state {
        NodeState::Alive => format!("Node {node} Alive"),
        NodeState::Dead => format!("Node {node} Dead ({})", reason.words()),
        NodeState::Unknown => format!("Node {node} Unknown ({})", reason.words()),
    }
}

/// One MonitorNode per node: no desired state of its own, the status is the point.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodepulse.io",
    version = "v1alpha1",
    kind = "MonitorNode",
    plural = "monitornodes",
    shortname = "mn",
    category = "monitoring",
    status = "MonitorNodeStatus",
    doc = "Liveness and latest usage of one node, as its nodepulse agent reports them through etcd.",
    printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.state","description":"Alive: a heartbeat on a live lease. Dead: the lease expired (reason HeartbeatExpired or AgentStopped). Unknown: nodepulse cannot tell (reason EtcdUnreachable, MassDisruption, LeaderChurn, NoHeartbeat or ControllerRemoved)"}"#,
    printcolumn = r#"{"name":"CPU%","type":"number","jsonPath":".status.usage.cpuPercent"}"#,
    printcolumn = r#"{"name":"Memory%","type":"number","jsonPath":".status.usage.memoryPercent"}"#,
    printcolumn = r#"{"name":"Disk%","type":"number","jsonPath":".status.usage.diskPercent"}"#,
    printcolumn = r#"{"name":"Interval","type":"integer","jsonPath":".status.config.interval","description":"Sampling interval in seconds"}"#,
    printcolumn = r#"{"name":"Last-Heartbeat","type":"date","jsonPath":".status.lastHeartbeatTime","description":"When the agent last rewrote its heartbeat value (on news, and at least every minute); liveness itself is the lease: read Status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Maintenance","type":"string","jsonPath":".status.maintenance","description":"Planned work the Node object shows: Cordoned (cordon, drain) or ScaleDown (the cluster autoscaler removes it)"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason","priority":1}"#,
    printcolumn = r#"{"name":"Agent","type":"string","jsonPath":".status.agentVersion","priority":1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MonitorNodeSpec {}

/// What the controller last learnt about a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorNodeStatus {
    /// Alive, Dead or Unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
    /// Machine-readable cause of the state: HeartbeatSeen (Alive); HeartbeatExpired or
    /// AgentStopped (Dead); EtcdUnreachable, MassDisruption, LeaderChurn, NoHeartbeat or
    /// ControllerRemoved (Unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A sentence for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the agent last wrote its heartbeat value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// When `state` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// TTL of the agent's lease, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
    /// The configuration the agent runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<AppliedConfigStatus>,
    /// The latest usage summary the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSummary>,
    /// Planned work on the node, from its Node object: Cordoned or ScaleDown; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<Maintenance>,
    /// `Alive` and `ConfigApplied`, in the metav1.Condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The configuration an agent reports it applied, and whether it is the one desired.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppliedConfigStatus {
    /// Sampling interval in seconds.
    pub interval: u32,
    /// Metrics collected.
    #[schemars(with = "Vec<Metric>")]
    pub metrics: MetricSet,
    /// etcd revision of the config key applied (0: defaults).
    #[serde(default)]
    pub revision: i64,
    /// The MonitorConfig the applied value came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_config: Option<String>,
    /// Whether the applied config matches the effective one the MonitorConfigs ask for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<bool>,
    /// Why the agent rejected its last config value, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<&AppliedConfig> for AppliedConfigStatus {
    /// What the agent reports, not yet compared with the desired config (`in_sync` unset).
    fn from(applied: &AppliedConfig) -> Self {
        AppliedConfigStatus {
            interval: applied.interval,
            metrics: applied.metrics.clone(),
            revision: applied.revision,
            monitor_config: applied.source.as_ref().map(|s| s.monitor_config.clone()),
            in_sync: None,
            error: applied.error.clone(),
        }
    }
}

impl AppliedConfigStatus {
    /// Whether the agent runs the interval and metrics `desired` asks for.
    pub fn runs(&self, desired: &ConfigValue) -> bool {
        self.interval == desired.interval && self.metrics == desired.metrics
    }
}

/// Desired sampling settings for the nodes it selects.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "nodepulse.io",
    version = "v1alpha1",
    kind = "MonitorConfig",
    plural = "monitorconfigs",
    shortname = "moncfg",
    category = "monitoring",
    status = "MonitorConfigStatus",
    doc = "Sampling interval and metrics for the nodes it selects; the controller writes them to /monitor/config/<node>.",
    printcolumn = r#"{"name":"Interval","type":"integer","jsonPath":".spec.interval"}"#,
    printcolumn = r#"{"name":"Metrics","type":"string","jsonPath":".spec.metrics"}"#,
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.matchedNodes"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MonitorConfigSpec {
    /// Nodes whose labels match; empty or absent selects every node.
    // The API server checks what kube's LabelSelector schema leaves open, so a bad selector
    // is refused at `kubectl apply` instead of surfacing later in the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])",
            "message": "matchExpressions operator must be In, NotIn, Exists or DoesNotExist",
        },
        {
            "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, !(e.operator in ['In', 'NotIn']) || (has(e.values) && size(e.values) > 0))",
            "message": "matchExpressions with operator In or NotIn need at least one value",
        },
        {
            "rule": "!has(self.matchExpressions) || self.matchExpressions.all(e, !(e.operator in ['Exists', 'DoesNotExist']) || !has(e.values) || size(e.values) == 0)",
            "message": "matchExpressions with operator Exists or DoesNotExist take no values",
        },
    ]))]
    pub node_selector: Option<LabelSelector>,
    /// Nodes selected by name, in addition to the selector. When set without a selector, only
    /// these nodes are selected. Each must be a valid node name (a DNS-1123 subdomain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 1000),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        ),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub node_names: Vec<String>,
    /// Sampling interval in seconds.
    #[schemars(range(min = 1, max = 3600))]
    pub interval: u32,
    /// What to collect: at least one of cpu, memory, disk, network, load.
    #[schemars(length(min = 1), extend("x-kubernetes-list-type" = "set"))]
    pub metrics: Vec<Metric>,
    /// When several MonitorConfigs select a node, the highest priority wins; ties go to the
    /// name that sorts first.
    #[serde(default)]
    pub priority: i32,
}

/// What the controller did with a MonitorConfig.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorConfigStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many nodes this MonitorConfig selects.
    #[serde(default)]
    pub matched_nodes: u32,
    /// How many of them it wins (no higher-priority MonitorConfig selects them).
    #[serde(default)]
    pub applied_nodes: u32,
    /// `Ready`, in the metav1.Condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_lines_say_the_state_and_why() {
        use LivenessReason::*;
        assert_eq!(
            transition_line("worker-1", NodeState::Alive, HeartbeatSeen),
            "Node worker-1 Alive"
        );
        assert_eq!(
            transition_line("worker-1", NodeState::Dead, HeartbeatExpired),
            "Node worker-1 Dead (heartbeat expired)"
        );
        assert_eq!(
            transition_line("worker-1", NodeState::Dead, AgentStopped),
            "Node worker-1 Dead (agent stopped)"
        );
        for reason in LivenessReason::ALL {
            assert_eq!(LivenessReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(LivenessReason::parse("Alive"), None);
    }
}
