//! The MonitorNodes of names with no Node object (agents on machines outside the cluster, or
//! keys written under made-up names): nothing deletes them with a Node, so once such a name's
//! heartbeat has been gone for `--delete-without-node-after`, its MonitorNode is deleted here.
//! A Node's own MonitorNode goes with it (owner reference) and is never touched.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Preconditions};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus, NodeState};

use crate::inventory::Inventory;

/// Whether a MonitorNode with no Node is to go at `now`: its node has been Dead (its heartbeat
/// gone) for at least `after`. A node Alive, or Unknown (the controller cannot tell), stays.
pub fn is_stale(status: Option<&MonitorNodeStatus>, now: Timestamp, after: Duration) -> bool {
    let Some(status) = status else {
        return false;
    };
    let since = status.last_transition_time.as_ref().map(|t| t.0);
    status.state == Some(NodeState::Dead)
        && since.is_some_and(|since| now.duration_since(since).unsigned_abs() >= after)
}

/// How often the MonitorNodes without a Node are looked at: often enough that one goes at most
/// a tenth of `after` late, at most every minute.
pub fn period(after: Duration) -> Duration {
    (after / 10).clamp(Duration::from_millis(500), Duration::from_secs(60))
}

/// Deletes, forever, the MonitorNodes of names with no Node whose heartbeat has been gone for
/// `after`.
pub async fn run(api: Api<MonitorNode>, inventory: Inventory, after: Duration) {
    let mut tick = tokio::time::interval(period(after));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !inventory.is_ready() {
            continue;
        }
        for name in inventory.monitor_nodes_without_node() {
            delete_if_stale(&api, &inventory, &name, after).await;
        }
    }
}

async fn delete_if_stale(
    api: &Api<MonitorNode>,
    inventory: &Inventory,
    name: &str,
    after: Duration,
) {
    let mn = match api.get_opt(name).await {
        Ok(Some(mn)) => mn,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(node = name, error = %e, "read MonitorNode without a Node");
            return;
        }
    };
    if inventory.node(name).is_some() || !is_stale(mn.status.as_ref(), Timestamp::now(), after) {
        return;
    }
    // Only the version judged: one whose heartbeat came back meanwhile stays.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: mn.metadata.resource_version.clone(),
            uid: mn.metadata.uid.clone(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => tracing::info!(
            node = name,
            "deleted MonitorNode {name}: no Node has its name and its heartbeat has been gone for {after:?}"
        ),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(node = name, error = %e, "could not delete MonitorNode {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use nodepulse_crd::v1alpha1::LivenessReason;

    fn status(state: NodeState, reason: LivenessReason, at: &str) -> MonitorNodeStatus {
        MonitorNodeStatus {
            state: Some(state),
            reason: Some(reason.as_str().into()),
            last_transition_time: Some(Time(at.parse().unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_node_dead_for_long_enough_goes() {
        let now: Timestamp = "2026-12-07T12:00:00Z".parse().unwrap();
        let hour = Duration::from_secs(3600);
        let dead = |at| status(NodeState::Dead, LivenessReason::HeartbeatExpired, at);
        assert!(is_stale(Some(&dead("2026-12-07T11:00:00Z")), now, hour));
        assert!(!is_stale(Some(&dead("2026-12-07T11:00:01Z")), now, hour));
        let stopped = status(
            NodeState::Dead,
            LivenessReason::AgentStopped,
            "2026-12-07T10:00:00Z",
        );
        assert!(is_stale(Some(&stopped), now, hour));
        // Alive, or Unknown (etcd away, a disruption): the heartbeat may be there.
        for (state, reason) in [
            (NodeState::Alive, LivenessReason::HeartbeatSeen),
            (NodeState::Unknown, LivenessReason::EtcdUnreachable),
            (NodeState::Unknown, LivenessReason::MassDisruption),
        ] {
            let s = status(state, reason, "2026-12-07T01:00:00Z");
            assert!(!is_stale(Some(&s), now, hour), "{state:?}");
        }
        // Never written, or no transition time: nothing to go by.
        assert!(!is_stale(None, now, hour));
        let mut s = dead("2026-12-07T01:00:00Z");
        s.last_transition_time = None;
        assert!(!is_stale(Some(&s), now, hour));
    }

    #[test]
    fn the_period_follows_the_wait_within_bounds() {
        assert_eq!(period(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(period(Duration::from_secs(100)), Duration::from_secs(10));
        assert_eq!(period(Duration::from_secs(2)), Duration::from_millis(500));
    }
}
