//! Writes one node's MonitorNode status, creating the MonitorNode first when needed.

use std::time::Instant;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeSpec, MonitorNodeStatus};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::status::record::Verdict;

/// One status write and the Events it carries.
pub struct WriteJob {
    /// The node.
    pub node: String,
    /// The full status to apply.
    pub status: MonitorNodeStatus,
    /// Transitions whose Events go out once the status is written.
    pub events: Vec<Verdict>,
    /// When the delete behind a Dead transition arrived.
    pub dead_seen_at: Option<Instant>,
    /// The MonitorNode's owner: its Node, when one exists.
    pub owner: Option<OwnerReference>,
    /// The MonitorNode is known to exist: apply the status straight away.
    pub exists: bool,
}

impl WriteJob {
    /// The write carries a transition (its Event, or a Dead to time).
    pub fn is_transition(&self) -> bool {
        !self.events.is_empty() || self.dead_seen_at.is_some()
    }
}

/// Applies the status through the status subresource, creating the MonitorNode first when it
/// does not exist. Returns when it was written, and the MonitorNode (for the Events).
pub async fn write_status(
    api: &Api<MonitorNode>,
    job: &WriteJob,
) -> Result<(Instant, ObjectReference)> {
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
    Ok((written_at, mn.object_ref(&())))
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
