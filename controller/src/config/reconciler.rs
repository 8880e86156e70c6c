//! The MonitorConfig reconciler: a kube-runtime `Controller` whose reconcile, wrapped in the
//! `finalizer` helper, brings the config keys in line (see [`crate::config::keys`]) and reports
//! in the MonitorConfig's status what it did.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::{Client, ResourceExt};
use nodepulse_crd::v1alpha1::{MonitorConfig, MonitorConfigStatus};

use crate::FIELD_MANAGER;
use crate::config::keys::{ConfigKeys, ConfigReport};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// The finalizer that makes a deleted MonitorConfig's keys go away (or pass to the next match).
pub const FINALIZER: &str = "nodepulse.io/config-keys";

/// What every reconcile shares.
pub struct Context {
    api: Api<MonitorConfig>,
    keys: Arc<ConfigKeys>,
    metrics: Arc<Metrics>,
}

/// Runs the MonitorConfig controller until the process ends. `refresh` asks for every
/// MonitorConfig to be reconciled again (a node or a key changed).
pub async fn run(
    controller: Controller<MonitorConfig>,
    client: Client,
    keys: Arc<ConfigKeys>,
    metrics: Arc<Metrics>,
    refresh: mpsc::UnboundedReceiver<()>,
) {
    let ctx = Arc::new(Context {
        api: Api::all(client),
        keys,
        metrics,
    });
    controller
        .reconcile_all_on(refresh)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "MonitorConfig reconcile");
            }
        })
        .await;
}

async fn reconcile(
    mc: Arc<MonitorConfig>,
    ctx: Arc<Context>,
) -> Result<Action, finalizer::Error<Error>> {
    let api = ctx.api.clone();
    finalizer(&api, FINALIZER, mc, |event| async {
        match event {
            Finalizer::Apply(mc) => apply(&mc, &ctx).await,
            Finalizer::Cleanup(mc) => cleanup(&mc, &ctx).await,
        }
    })
    .await
}

async fn apply(mc: &MonitorConfig, ctx: &Context) -> Result<Action> {
    let name = mc.name_any();
    match ctx.keys.sync(None).await {
        Ok(report) => {
            let entry = report.get(&name).cloned().unwrap_or_default();
            write_status(mc, ctx, ready_condition(&entry), &entry).await?;
            // Requeue now and then: a safety net, it writes nothing when nothing changed.
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Err(e) => {
            let cond = (
                "False",
                "EtcdUnavailable",
                format!("config keys not written: {e}"),
            );
            let _ = write_status(mc, ctx, cond, &ConfigReport::default()).await;
            Err(e)
        }
    }
}

async fn cleanup(mc: &MonitorConfig, ctx: &Context) -> Result<Action> {
    let name = mc.name_any();
    ctx.keys.sync(Some(&name)).await?;
    tracing::info!(
        monitor_config = %name,
        "MonitorConfig deleted: its config keys removed or handed to the next matching MonitorConfig"
    );
    Ok(Action::await_change())
}

fn error_policy(
    mc: Arc<MonitorConfig>,
    error: &finalizer::Error<Error>,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_error("monitorconfig");
    tracing::warn!(monitor_config = %mc.name_any(), error = %error, "MonitorConfig reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The Ready condition for one sync outcome: (status, reason, message).
pub fn ready_condition(report: &ConfigReport) -> (&'static str, &'static str, String) {
    if let Some(why) = &report.invalid {
        return ("False", "InvalidSpec", why.clone());
    }
    if !report.blocked.is_empty() {
        return (
            "False",
            "UnmanagedKeys",
            format!(
                "config keys of {} were written by hand (no managedBy); the controller leaves them alone: delete them to let this MonitorConfig apply",
                report.blocked.join(", ")
            ),
        );
    }
    if !report.failed.is_empty() {
        return (
            "False",
            "WriteFailed",
            format!(
                "config keys of {} could not be written yet",
                report.failed.join(", ")
            ),
        );
    }
    // Names of nodes that do not exist are not an error (the node may join later), but they
    // are the likely reason a MonitorConfig selects fewer nodes than its author expected.
    let unknown = if report.unknown_nodes.is_empty() {
        String::new()
    } else {
        format!(
            "; spec.nodeNames names no existing node: {}",
            report.unknown_nodes.join(", ")
        )
    };
    if report.matched == 0 {
        return (
            "False",
            "NoMatchingNodes",
            format!(
                "selects no node: neither its nodeSelector nor its nodeNames match a node{unknown}"
            ),
        );
    }
    (
        "True",
        "Applied",
        format!(
            "applied to {} of the {} nodes it selects (the others follow a higher-priority MonitorConfig){unknown}",
            report.applied, report.matched
        ),
    )
}

async fn write_status(
    mc: &MonitorConfig,
    ctx: &Context,
    (status, reason, message): (&str, &str, String),
    report: &ConfigReport,
) -> Result<()> {
    let name = mc.name_any();
    let old = mc.status.clone().unwrap_or_default();
    let since = old
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    let new = MonitorConfigStatus {
        observed_generation: mc.metadata.generation,
        matched_nodes: report.matched,
        applied_nodes: report.applied,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
            observed_generation: mc.metadata.generation,
        }],
    };
    if new == old {
        return Ok(());
    }
    if status != "True" {
        tracing::warn!(monitor_config = %name, reason, "MonitorConfig cannot be applied: {}", new.conditions[0].message);
    }
    let patch = serde_json::json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorConfig",
        "status": new,
    });
    ctx.api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::kube(format!("apply status of MonitorConfig {name}")))?;
    Ok(())
}
