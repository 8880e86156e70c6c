//! The `NodePulseHeartbeat` condition on each Node object (`--node-condition`), set the way Node
//! Problem Detector sets its own, so that `kubectl describe node`, kube-state-metrics
//! (`kube_node_status_condition`) and remediation operators see what nodepulse knows: `True`
//! for Alive, `False` for Dead, `Unknown` for Unknown, with the MonitorNode's reason and message.
//!
//! It rides on the MonitorNode status writes (see [`crate::status::writer`]): after a status is written,
//! the condition is patched if it says something new (a transition goes out at once, with the
//! transition's priority), and otherwise refreshed at most every ten usage intervals. Only our
//! own condition is touched: a strategic merge patch of `nodes/status` merges conditions by
//! `type`, leaving the kubelet's alone. A condition left behind would lie (a stale `False` gets
//! a healthy node fenced, a stale `True` hides a dead one), so [`remove_everywhere`] takes it
//! off every Node when the feature is turned off or nodepulse is uninstalled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use nodepulse_crd::v1alpha1::{MonitorNodeStatus, NodeState};
use nodepulse_runtime::Backoff;

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};

/// The condition's type on the Node.
pub const CONDITION_TYPE: &str = "NodePulseHeartbeat";

/// A Node patch refused for want of RBAC is tried again this much later: the chart grants it
/// with the flag, so a refusal means a hand-made deployment that an operator has to fix.
const FORBIDDEN_RETRY: Duration = Duration::from_secs(300);

/// A condition that says nothing new is rewritten (its `lastHeartbeatTime`) at most every this
/// many usage intervals, 5 minutes at the defaults as Node Problem Detector's heartbeat: once per
/// usage write would double the controller's writes to the API server.
pub const REFRESH_FACTOR: u32 = 10;

/// Nodes whose condition is being removed at once (a cluster of thousands is done in seconds,
/// without flooding the API server).
const REMOVALS_AT_ONCE: usize = 16;

/// A Node the cache knows but the API server did not find is tried again this much later
/// (the cache lags a deletion by a moment; a 404 is no failure to hurry over).
const MISSING_RETRY: Duration = Duration::from_secs(60);

/// The condition as nodepulse means it for one node.
#[derive(Clone, Debug, PartialEq)]
struct Shown {
    status: &'static str,
    reason: String,
    message: String,
}

impl Shown {
    /// What a MonitorNode status calls for; `None` before the node is judged.
    fn of(status: &MonitorNodeStatus) -> Option<Shown> {
        Some(Shown {
            status: match status.state? {
                NodeState::Alive => "True",
                NodeState::Dead => "False",
                NodeState::Unknown => "Unknown",
            },
            reason: status.reason.clone().unwrap_or_default(),
            message: status.message.clone().unwrap_or_default(),
        })
    }
}

/// Where one Node's condition stands.
#[derive(Default)]
struct NodeEntry {
    /// What the Node shows (as last written, or as listed at the start) and since when.
    written: Option<(Shown, Time)>,
    /// When it was last written by this process.
    written_at: Option<Instant>,
    /// A failed write is due again at this instant.
    retry_at: Option<Instant>,
    backoff: Option<Backoff>,
    /// The Node was not found once (a simulated node, or one deleted): said once at debug.
    missing_logged: bool,
}

/// Keeps the `NodePulseHeartbeat` condition of every Node in step with the MonitorNode writes.
#[derive(Clone)]
pub struct NodeConditions {
    api: Api<Node>,
    /// Least time between two writes that only refresh `lastHeartbeatTime`.
    refresh: Duration,
    nodes: Arc<Mutex<HashMap<String, NodeEntry>>>,
    /// A refusal for want of RBAC was logged (once, not once per node).
    forbidden_logged: Arc<AtomicBool>,
}

impl std::fmt::Debug for NodeConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConditions")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl NodeConditions {
    /// Reads what the Nodes show now, so that a restarted controller rewrites no condition
    /// that is already right, and one just enabled writes every one that is missing.
    /// Should the list fail, every node's condition is written once instead.
    /// `lastHeartbeatTime` is refreshed along with the MonitorNode writes, at most every
    /// [`REFRESH_FACTOR`] × `usage_write_interval`.
    pub async fn load(client: Client, usage_write_interval: Duration) -> NodeConditions {
        let refresh = usage_write_interval * REFRESH_FACTOR;
        let api: Api<Node> = Api::all(client);
        let listed = list_nodes(&api).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not read the Nodes' {CONDITION_TYPE} conditions; writing each once");
            Vec::new()
        });
        let mut nodes = HashMap::new();
        for node in listed {
            let Some(c) = our_condition(&node) else {
                continue;
            };
            let shown = Shown {
                status: match c.status.as_str() {
                    "True" => "True",
                    "False" => "False",
                    _ => "Unknown",
                },
                reason: c.reason.clone().unwrap_or_default(),
                message: c.message.clone().unwrap_or_default(),
            };
            let since = c
                .last_transition_time
                .clone()
                .unwrap_or_else(|| Time(Timestamp::now()));
            nodes.insert(
                node.name_any(),
                NodeEntry {
                    written: Some((shown, since)),
                    ..NodeEntry::default()
                },
            );
        }
        tracing::info!(
            nodes_with_condition = nodes.len(),
            "setting the {CONDITION_TYPE} condition on the Nodes"
        );
        NodeConditions {
            api,
            refresh,
            nodes: Arc::new(Mutex::new(nodes)),
            forbidden_logged: Arc::new(AtomicBool::new(false)),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        // Nothing panics while holding it; a poisoned map is still the best knowledge there is.
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `node`'s condition needs a write that no MonitorNode write will bring: it differs
    /// from `status` (the MonitorNode status last written) and no failed write waits for its
    /// retry time. The caller knows the Node object exists.
    pub fn due(&self, node: &str, status: Option<&MonitorNodeStatus>, now: Instant) -> bool {
        let Some(shown) = status.and_then(Shown::of) else {
            return false;
        };
        let nodes = self.entries();
        let Some(entry) = nodes.get(node) else {
            return true;
        };
        if entry.retry_at.is_some_and(|at| at > now) {
            return false;
        }
        entry.retry_at.is_some() || entry.written.as_ref().is_none_or(|(w, _)| *w != shown)
    }

    /// Brings `node`'s condition in step with the MonitorNode `status` just written: at once if
    /// it says something new, as a refresh of `lastHeartbeatTime` if the last write is older
    /// than the refresh interval, else not at all. Failures are logged and retried through
    /// [`NodeConditions::due`]; a Node that does not exist is no failure.
    pub async fn sync(&self, node: &str, status: &MonitorNodeStatus) {
        let Some(shown) = Shown::of(status) else {
            return;
        };
        let since = {
            let mut nodes = self.entries();
            let entry = nodes.entry(node.to_string()).or_default();
            let fresh = entry
                .written_at
                .is_some_and(|at| at.elapsed() < self.refresh);
            if fresh && entry.written.as_ref().is_some_and(|(w, _)| *w == shown) {
                entry.retry_at = None;
                return;
            }
            let written = entry.written.as_ref();
            // lastTransitionTime moves only when the status does.
            match written {
                Some((w, since)) if w.status == shown.status => since.clone(),
                _ => status
                    .last_transition_time
                    .clone()
                    .unwrap_or_else(|| Time(Timestamp::now())),
            }
        };
        let patch = serde_json::json!({
            "status": {"conditions": [NodeCondition {
                type_: CONDITION_TYPE.into(),
                status: shown.status.into(),
                reason: Some(shown.reason.clone()),
                message: Some(shown.message.clone()),
                last_heartbeat_time: Some(Time(Timestamp::now())),
                last_transition_time: Some(since.clone()),
            }]},
        });
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let result = self
            .api
            .patch_status(node, &params, &Patch::Strategic(&patch))
            .await;
        let mut nodes = self.entries();
        let entry = nodes.entry(node.to_string()).or_default();
        match result {
            Ok(_) => {
                entry.written = Some((shown, since));
                entry.written_at = Some(Instant::now());
                entry.retry_at = None;
                entry.backoff = None;
            }
            Err(kube::Error::Api(e)) if e.is_not_found() => {
                // No Node of that name (a node simulated by hand, or one already deleted):
                // nothing to show it on, and nothing to retry.
                if !entry.missing_logged {
                    entry.missing_logged = true;
                    tracing::debug!(node, "no Node object: {CONDITION_TYPE} condition not set");
                }
                entry.retry_at = Some(Instant::now() + MISSING_RETRY);
            }
            Err(kube::Error::Api(e)) if e.is_forbidden() => {
                if !self.forbidden_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        node,
                        error = %e,
                        "may not patch nodes/status: the {CONDITION_TYPE} condition needs that permission (the chart grants it with nodeCondition.enabled)"
                    );
                }
                entry.retry_at = Some(Instant::now() + FORBIDDEN_RETRY);
            }
            Err(e) => {
                tracing::warn!(node, error = %e, "{CONDITION_TYPE} condition not set; will retry");
                let backoff = entry.backoff.get_or_insert_with(|| {
                    Backoff::new(Duration::from_secs(1), Duration::from_secs(60))
                });
                entry.retry_at = Some(Instant::now() + backoff.next_delay());
            }
        }
    }
}

/// Every Node, listed in pages.
async fn list_nodes(api: &Api<Node>) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    let mut params = ListParams::default().limit(500);
    loop {
        let page = api.list(&params).await.map_err(Error::kube("list Nodes"))?;
        nodes.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(nodes),
        }
    }
}

/// Our condition on `node`, if it has one.
fn our_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CONDITION_TYPE)
}

/// The JSON patch that removes the condition at `index`, provided it is still ours: the
/// kubelet may rewrite the list between our read and our patch, and an index alone would
/// then remove one of its conditions.
fn removal_patch(index: usize) -> json_patch::Patch {
    let ops = serde_json::json!([
        {"op": "test", "path": format!("/status/conditions/{index}/type"), "value": CONDITION_TYPE},
        {"op": "remove", "path": format!("/status/conditions/{index}")},
    ]);
    serde_json::from_value(ops).expect("a well-formed JSON patch")
}

/// Removes the `NodePulseHeartbeat` condition from every Node that has it. Returns how many
/// Nodes it was removed from, and how many it could not be removed from (logged).
pub async fn remove_everywhere(client: &Client) -> Result<(usize, usize)> {
    let api: Api<Node> = Api::all(client.clone());
    let with_ours = list_nodes(&api)
        .await?
        .into_iter()
        .filter(|node| our_condition(node).is_some());
    let mut results = futures::stream::iter(with_ours)
        .map(|node| remove_from(&api, node))
        .buffer_unordered(REMOVALS_AT_ONCE);
    let (mut removed, mut failed) = (0, 0);
    while let Some(result) = results.next().await {
        match result {
            Ok(true) => removed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "{CONDITION_TYPE} condition not removed");
                failed += 1;
            }
        }
    }
    Ok((removed, failed))
}

/// Removes our condition from `node` as it was read (possibly some time ago), reading it again
/// when the conditions moved under the patch. `Ok(false)`: it had none by then, or the Node is
/// gone.
pub async fn remove_from(api: &Api<Node>, mut node: Node) -> Result<bool> {
    let name = node.name_any();
    let started = Instant::now();
    let mut backoff = Backoff::default();
    for _ in 0..10 {
        let index = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().position(|c| c.type_ == CONDITION_TYPE));
        let Some(index) = index else {
            return Ok(false);
        };
        let patch = Patch::Json::<()>(removal_patch(index));
        match api
            .patch_status(&name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {
                tracing::info!(node = %name, "removed the {CONDITION_TYPE} condition");
                return Ok(true);
            }
            Err(kube::Error::Api(e)) if e.is_not_found() => return Ok(false),
            // The test op failed (422) or the write conflicted (409): read the Node again.
            Err(kube::Error::Api(e)) if e.code == 422 || e.code == 409 => {
                tracing::debug!(node = %name, error = %e, "conditions moved; reading the Node again");
            }
            Err(e) => {
                return Err(Error::kube(format!(
                    "remove the condition from Node {name}"
                ))(e));
            }
        }
        backoff.wait().await;
        node = match api.get_opt(&name).await {
            Ok(Some(node)) => node,
            Ok(None) => return Ok(false),
            Err(e) => return Err(Error::kube(format!("get Node {name}"))(e)),
        };
    }
    Err(Error::Timeout {
        what: format!("removing the {CONDITION_TYPE} condition from Node {name} (10 attempts)"),
        after: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepulse_crd::v1alpha1::MonitorNodeStatus;

    #[test]
    fn the_condition_mirrors_the_monitor_node_state() {
        let status = |state| MonitorNodeStatus {
            state: Some(state),
            reason: Some("HeartbeatExpired".into()),
            message: Some("the heartbeat lease expired".into()),
            ..MonitorNodeStatus::default()
        };
        let dead = Shown::of(&status(NodeState::Dead)).expect("judged");
        assert_eq!(
            (dead.status, dead.reason.as_str(), dead.message.as_str()),
            ("False", "HeartbeatExpired", "the heartbeat lease expired")
        );
        assert_eq!(Shown::of(&status(NodeState::Alive)).unwrap().status, "True");
        assert_eq!(
            Shown::of(&status(NodeState::Unknown)).unwrap().status,
            "Unknown"
        );
        assert_eq!(Shown::of(&MonitorNodeStatus::default()), None);
    }

    #[test]
    fn the_removal_patch_tests_the_type_at_the_index_it_removes() {
        let patch = serde_json::to_value(removal_patch(3)).expect("serializes");
        assert_eq!(
            patch,
            serde_json::json!([
                {"op": "test", "path": "/status/conditions/3/type", "value": "NodePulseHeartbeat"},
                {"op": "remove", "path": "/status/conditions/3"},
            ])
        );
    }
}
