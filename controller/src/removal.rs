//! `nodepulse-controller --on-uninstall`, the chart's pre-delete hook: once nodepulse is removed
//! nothing is left to update the MonitorNodes, and a node shown `Alive` would stay `Alive`
//! forever. So, before Helm deletes anything, the hook scales the controller's Deployment to
//! zero, waits until its leader has let go of the Lease (no replica writes any more), and marks
//! every MonitorNode `Unknown` (`ControllerRemoved`). A reinstalled controller turns them back to
//! `Alive` from the agents' heartbeats. With `--remove-node-condition` it then takes the
//! `NodePulseHeartbeat` condition off every Node, which nothing would update either.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use nodepulse_crd::v1alpha1::{LivenessReason, MonitorNode, NodeState};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::leader::LEASE_NAME;
use crate::status::node_condition;

/// Runs the hook: scale to zero, wait for the Lease to be free (at most `lease_duration` plus
/// 15 s), mark the MonitorNodes (unless `mark_unknown` is false). Never fails: a hook that
/// failed would block `helm uninstall`, so problems are logged and the next step runs anyway.
pub async fn run_on_uninstall(
    client: &Client,
    namespace: &str,
    deployment: &str,
    lease_duration: Duration,
    mark_unknown: bool,
) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let scale = serde_json::json!({"spec": {"replicas": 0}});
    match deployments
        .patch(deployment, &PatchParams::default(), &Patch::Merge(&scale))
        .await
    {
        Ok(_) => tracing::info!("scaled Deployment {namespace}/{deployment} to zero"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::info!("Deployment {namespace}/{deployment} is gone already");
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not scale Deployment {namespace}/{deployment} to zero")
        }
    }
    let deadline = tokio::time::Instant::now() + lease_duration + Duration::from_secs(15);
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    loop {
        match leases.get_opt(LEASE_NAME).await {
            Ok(lease) if lease_is_free(lease.as_ref(), Timestamp::now()) => break,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading Lease {namespace}/{LEASE_NAME}"),
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "Lease {namespace}/{LEASE_NAME} still held after {:?}; marking the MonitorNodes anyway",
                lease_duration + Duration::from_secs(15)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if mark_unknown {
        let marked = mark_nodes_unknown(client, "nodepulse is being uninstalled").await;
        tracing::info!(
            "marked {marked} MonitorNodes Unknown ({})",
            LivenessReason::ControllerRemoved.as_str()
        );
    }
}

/// Removes the `NodePulseHeartbeat` condition from every Node: a condition nothing updates any
/// more would lie to whoever acts on it. Fails if any Node keeps it.
pub async fn remove_node_conditions(client: &Client) -> Result<()> {
    let (removed, failed) = node_condition::remove_everywhere(client).await?;
    tracing::info!(
        "removed the {} condition from {removed} Nodes",
        node_condition::CONDITION_TYPE
    );
    match failed {
        0 => Ok(()),
        n => Err(Error::NodeConditionsLeft(n)),
    }
}

/// Whether no replica holds the Lease: none, no holder, or not renewed for its duration.
fn lease_is_free(lease: Option<&Lease>, now: Timestamp) -> bool {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return true;
    };
    if spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        return true;
    }
    match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs)) => renewed.0 + SignedDuration::from_secs(secs.into()) < now,
        _ => false,
    }
}

/// Marks every MonitorNode not already `Unknown` as `Unknown` (`ControllerRemoved`), saying what
/// it was. Returns how many it marked.
pub async fn mark_nodes_unknown(client: &Client, why: &str) -> usize {
    let api: Api<MonitorNode> = Api::all(client.clone());
    let nodes = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(e) => {
            tracing::warn!(error = %e, "listing the MonitorNodes failed");
            return 0;
        }
    };
    let mut marked = 0;
    for mn in nodes {
        let name = mn.name_any();
        let Some(mut status) = mn.status else {
            continue;
        };
        let was = match status.state {
            Some(NodeState::Alive) => "Alive",
            Some(NodeState::Dead) => "Dead",
            _ => continue,
        };
        let was = match status.reason.as_deref() {
            Some(reason) => format!("{was} ({reason})"),
            None => was.to_string(),
        };
        let message =
            format!("{why}: no nodepulse-controller is left to update this status (it was {was})");
        let now = Time(Timestamp::now());
        status.state = Some(NodeState::Unknown);
        status.reason = Some(LivenessReason::ControllerRemoved.as_str().into());
        status.message = Some(message.clone());
        status.last_transition_time = Some(now.clone());
        for c in status.conditions.iter_mut().filter(|c| c.type_ == "Alive") {
            c.status = "Unknown".into();
            c.reason = LivenessReason::ControllerRemoved.as_str().into();
            c.message = message.clone();
            c.last_transition_time = now.clone();
        }
        let patch = serde_json::json!({
            "apiVersion": "nodepulse.io/v1alpha1",
            "kind": "MonitorNode",
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&name, &params, &Patch::Apply(&patch))
            .await
        {
            Ok(_) => marked += 1,
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "could not mark the MonitorNode Unknown");
            }
        }
    }
    marked
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    fn lease(holder: Option<&str>, renewed: &str) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                renew_time: Some(MicroTime(renewed.parse().expect("a time"))),
                lease_duration_seconds: Some(30),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_is_free_without_holder_or_once_expired() {
        let now: Timestamp = "2026-12-01T10:01:00Z".parse().expect("a time");
        assert!(lease_is_free(None, now));
        assert!(lease_is_free(
            Some(&lease(None, "2026-12-01T10:00:50Z")),
            now
        ));
        assert!(lease_is_free(
            Some(&lease(Some(""), "2026-12-01T10:00:50Z")),
            now
        ));
        assert!(!lease_is_free(
            Some(&lease(Some("c-0"), "2026-12-01T10:00:50Z")),
            now
        ));
        assert!(lease_is_free(
            Some(&lease(Some("c-0"), "2026-12-01T10:00:20Z")),
            now
        ));
    }
}
