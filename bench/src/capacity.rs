//! The API server's capacity for MonitorNode status writes on this machine: status patches a
//! second while nothing else writes to it. That is the physical limit for reporting many deaths
//! at once, and the scale phase judges its storm figures against it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeSpec};

use crate::{Error, Result};

/// MonitorNodes the probe writes to, in turn.
const PROBES: usize = 64;
/// Writes in flight at once: the controller's default `--max-concurrent-writes`.
const CONCURRENCY: usize = 32;
/// The probe's MonitorNodes carry this label, so that one call deletes them all.
const LABEL: &str = "bench.nodepulse.io/capacity-probe";

/// Status writes per second the API server took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capacity {
    /// Server-side apply of a whole status, as the controller writes one.
    pub apply_per_s: f64,
    /// JSON merge patch of only what a transition changes (state, reason, message, time and
    /// conditions).
    pub merge_per_s: f64,
}

impl Capacity {
    /// The higher of the two: the most the API server can take of any status write.
    pub fn best(&self) -> f64 {
        self.apply_per_s.max(self.merge_per_s)
    }
}

/// Creates the probe's MonitorNodes, writes their status as fast as the API server answers for
/// `window` with each kind of patch, and deletes them again.
pub async fn measure(client: kube::Client, window: Duration) -> Result<Capacity> {
    let api: Api<MonitorNode> = Api::all(client);
    let names: Vec<String> = (0..PROBES).map(|i| format!("capacity-probe-{i}")).collect();
    for name in &names {
        let mut mn = MonitorNode::new(name, MonitorNodeSpec {});
        mn.metadata.labels = Some([(LABEL.to_string(), "true".to_string())].into());
        api.create(&PostParams::default(), &mn)
            .await
            .map_err(|e| Error::Kube(format!("create MonitorNode {name}: {e}")))?;
    }
    let names = Arc::new(names);
    let apply_per_s = rate(&api, &names, window, |i| {
        let status = status(i);
        let patch = serde_json::json!({
            "apiVersion": "nodepulse.io/v1alpha1",
            "kind": "MonitorNode",
            "status": status,
        });
        (
            PatchParams::apply("bench-capacity").force(),
            Patch::Apply(patch),
        )
    })
    .await?;
    let merge_per_s = rate(&api, &names, window, |i| {
        let mut status = status(i);
        for field in [
            "usage",
            "config",
            "agentVersion",
            "ttlSeconds",
            "lastHeartbeatTime",
        ] {
            status.as_object_mut().map(|s| s.remove(field));
        }
        (
            PatchParams::default(),
            Patch::Merge(serde_json::json!({ "status": status })),
        )
    })
    .await?;
    api.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels(LABEL),
    )
    .await
    .map_err(|e| Error::Kube(format!("delete the capacity probe's MonitorNodes: {e}")))?;
    Ok(Capacity {
        apply_per_s,
        merge_per_s,
    })
}

/// Status patches per second over `window`, `CONCURRENCY` at a time; the `i`-th write flips
/// its MonitorNode between Alive and Dead, so that every write changes the status.
async fn rate(
    api: &Api<MonitorNode>,
    names: &Arc<Vec<String>>,
    window: Duration,
    patch: fn(usize) -> (PatchParams, Patch<serde_json::Value>),
) -> Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (api, names) = (api.clone(), names.clone());
            let (next, done, errors) = (next.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while start.elapsed() < window {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (params, body) = patch(i);
                    match api
                        .patch_status(&names[i % names.len()], &params, &body)
                        .await
                    {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        return Err(Error::Kube(format!(
            "{errors} MonitorNode status writes failed while measuring the API server's capacity"
        )));
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// A whole status as the controller writes one, Alive or Dead by the parity of `i`.
fn status(i: usize) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let (state, reason, message, alive) = if i.is_multiple_of(2) {
        (
            "Alive",
            "HeartbeatSeen",
            "agent 0.1.0 holds its heartbeat lease (5s TTL)",
            "True",
        )
    } else {
        (
            "Dead",
            "HeartbeatExpired",
            "the heartbeat lease expired (5s TTL): no keep-alive from the agent",
            "False",
        )
    };
    serde_json::json!({
        "state": state,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
        "agentVersion": "0.1.0",
        "ttlSeconds": 5,
        "config": {"interval": 10, "metrics": ["cpu", "memory", "disk", "network", "load"], "revision": 0, "inSync": true},
        "usage": {"cpuPercent": 12.5, "memoryPercent": 41.0, "diskPercent": 55.2, "load1": 0.4},
        "conditions": [
            {"type": "Alive", "status": alive, "reason": reason, "message": message, "lastTransitionTime": now},
            {"type": "ConfigApplied", "status": "True", "reason": "Applied", "message": "the agent runs every 10s", "lastTransitionTime": now},
        ],
    })
}
