//! Benchmark 3: SIGKILL of an agent -> its MonitorNode marked Dead, and the part that is ours
//! (etcd delete event -> status written).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, PutOptions, WatchOptions};
use k8s_openapi::jiff::Timestamp;
use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_crd::wire::{
    HEARTBEAT_PREFIX, HEARTBEAT_TTL_SECONDS, Heartbeat, heartbeat_key, node_of_heartbeat_key,
};

use crate::cluster::{Agent, Cluster, NodeStates, get};
use crate::report::Section;
use crate::stats::{Latencies, ms};
use crate::{Error, Options, Result, progress, prom};

const TITLE: &str = "3. Failure detection: SIGKILL of an agent -> MonitorNode Dead";
const TTL_SECONDS: u32 = 5;

/// Live nodes beside the victims, so that the kills are deaths in a fleet and not most of it:
/// the controller calls a loss of more than 55% of the live nodes within a TTL a mass
/// disruption (Unknown), and this section times Dead.
const SURVIVORS: usize = 20;

/// Heartbeats that outlive the section, as agents write them: each on a lease of its own with
/// the longest TTL an agent may run with (the value says the same TTL: the controller judges a
/// heartbeat by its lease's), kept alive every TTL/3 until the bench ends.
async fn survivors(cluster: &Cluster) -> Result<()> {
    let ttl = *HEARTBEAT_TTL_SECONDS.end();
    let mut etcd = cluster.etcd.client().await;
    let mut leases = Vec::new();
    for i in 0..SURVIVORS {
        let node = format!("bench-survivor-{i}");
        let lease = etcd
            .lease_grant(ttl.into(), None)
            .await
            .map_err(|e| Error::Etcd(e.to_string()))?
            .id();
        let hb = Heartbeat::running(&node, ttl, Timestamp::now());
        etcd.put(
            heartbeat_key(&node),
            hb.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| Error::Etcd(e.to_string()))?;
        leases.push(lease);
    }
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(ttl.into()) / 3).await;
            for lease in &leases {
                // A missed renewal is retried a third of the TTL later, well before it expires.
                if let Ok((mut keeper, mut answers)) = etcd.lease_keep_alive(*lease).await
                    && keeper.keep_alive().await.is_ok()
                {
                    let _ = answers.message().await;
                }
            }
        }
    });
    Ok(())
}

/// Runs the kills against the shared cluster.
pub async fn run(opts: &Options, start: Instant, cluster: Option<&Result<Cluster>>) -> Section {
    match cluster {
        Some(Ok(c)) => measure(opts, start, c)
            .await
            .unwrap_or_else(|e| Section::not_measured(TITLE, &e.to_string())),
        Some(Err(e)) => Section::not_measured(TITLE, &e.to_string()),
        None => Section::not_measured(TITLE, "cluster not started"),
    }
}

/// Records when etcd reported each heartbeat key deleted, as the controller would see it.
pub struct DeleteWatch {
    deleted: Arc<Mutex<HashMap<String, Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeleteWatch {
    /// Watches the heartbeat prefix from now on.
    pub async fn start(mut client: etcd_client::Client) -> Result<DeleteWatch> {
        let mut stream = client
            .watch(HEARTBEAT_PREFIX, Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(|e| Error::Etcd(format!("watch {HEARTBEAT_PREFIX}: {e}")))?;
        let deleted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let shared = deleted.clone();
        let task = tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                for ev in resp.events() {
                    if ev.event_type() != EventType::Delete {
                        continue;
                    }
                    if let Some(node) = ev.kv().and_then(|kv| node_of_heartbeat_key(kv.key())) {
                        shared
                            .lock()
                            .expect("deletes lock")
                            .entry(node.to_string())
                            .or_insert(now);
                    }
                }
            }
        });
        Ok(DeleteWatch { deleted, task })
    }

    /// When `node`'s key was deleted, if it was.
    pub fn at(&self, node: &str) -> Option<Instant> {
        self.deleted
            .lock()
            .expect("deletes lock")
            .get(node)
            .copied()
    }

    /// Every deletion seen so far.
    pub fn all(&self) -> HashMap<String, Instant> {
        self.deleted.lock().expect("deletes lock").clone()
    }
}

impl Drop for DeleteWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The controller's "etcd delete event -> status written" histogram, if it exports one: the
/// first histogram whose name mentions deletes/dead/detection.
pub fn controller_delete_histogram(metrics: &str) -> Option<(String, Vec<(f64, f64)>)> {
    let samples = prom::parse(metrics);
    let name = samples
        .iter()
        .filter_map(|s| s.name.strip_suffix("_bucket"))
        .find(|n| n.contains("delete") || n.contains("dead") || n.contains("detection"))?
        .to_string();
    let h = prom::histogram(&samples, &name, |_| true);
    Some((name, h))
}

async fn measure(opts: &Options, start: Instant, cluster: &Cluster) -> Result<Section> {
    let kills = if opts.smoke { 2 } else { 20 };
    let states = NodeStates::watch(cluster.kube.clone());
    progress(
        start,
        format!("  starting {kills} agents (TTL {TTL_SECONDS} s) beside {SURVIVORS} live nodes"),
    );
    survivors(cluster).await?;
    let mut agents = Vec::new();
    for i in 0..kills {
        agents.push(
            Agent::start(
                &cluster.etcd.endpoint,
                &format!("bench-kill-{i}"),
                TTL_SECONDS,
            )
            .await?,
        );
    }
    states
        .wait_count(
            "bench-kill-",
            NodeState::Alive,
            kills,
            Duration::from_secs(60),
        )
        .await?;
    let deletes = DeleteWatch::start(cluster.etcd.client().await).await?;
    let metrics_before = get(&cluster.controller_metrics, "/metrics")?;

    progress(start, format!("  SIGKILL {kills} agents, one a second"));
    let mut killed_at = HashMap::new();
    for agent in &mut agents {
        killed_at.insert(agent.node.clone(), Instant::now());
        agent.process.kill_hard();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    states
        .wait_count(
            "bench-kill-",
            NodeState::Dead,
            kills,
            Duration::from_secs(TTL_SECONDS as u64 + 30),
        )
        .await?;
    let metrics_after = get(&cluster.controller_metrics, "/metrics")?;

    let mut kill_to_dead = Vec::new();
    let mut delete_to_dead = Vec::new();
    let mut kill_to_delete = Vec::new();
    for (node, killed) in &killed_at {
        let Some((_, dead)) = states.get(node) else {
            continue;
        };
        kill_to_dead.push(dead.saturating_duration_since(*killed));
        if let Some(deleted) = deletes.at(node) {
            delete_to_dead.push(dead.saturating_duration_since(deleted));
            kill_to_delete.push(deleted.saturating_duration_since(*killed));
        }
    }

    let mut s = Section::latencies(TITLE, "kills");
    s.setup = format!(
        "The shared cluster (kube-apiserver, controller, etcd) and {kills} agents with \
         `--heartbeat-ttl {TTL_SECONDS}s`, killed with SIGKILL one a second, beside {SURVIVORS} live \
         heartbeats (so the kills are deaths in a fleet, below the controller's mass-disruption \
         brake). The bench watches \
         the MonitorNodes (kube-rs watcher) and the heartbeat prefix in etcd, and timestamps each \
         event as it arrives."
    );
    let ttl = Duration::from_secs(TTL_SECONDS as u64);
    s.latency_row(
        "SIGKILL -> MonitorNode Dead (watch event)",
        &kill_to_dead,
        Some(ttl + Duration::from_secs(1)),
    );
    s.latency_row(
        "  of which SIGKILL -> etcd deletes the key (lease expiry)",
        &kill_to_delete,
        None,
    );
    s.latency_row(
        "  of which etcd delete event -> MonitorNode Dead (both as the bench saw them)",
        &delete_to_dead,
        Some(Duration::from_millis(200)),
    );
    match (
        controller_delete_histogram(&metrics_before),
        controller_delete_histogram(&metrics_after),
    ) {
        (Some((_, before)), Some((name, after))) => {
            let delta = prom::histogram_delta(&before, &after);
            let n = delta.last().map_or(0.0, |b| b.1);
            let q = |p| {
                prom::quantile(&delta, p)
                    .map_or("n/a".to_string(), |v| ms(Duration::from_secs_f64(v)))
            };
            let p99 = prom::quantile(&delta, 0.99).unwrap_or(f64::INFINITY);
            s.row(&[
                format!("etcd delete event -> status written (controller's `{name}`, bucket-interpolated)"),
                format!("{n:.0}"),
                q(0.5),
                q(0.99),
                String::new(),
                "< 200 ms".into(),
                if p99 < 0.2 { "yes" } else { "**no**" }.into(),
            ]);
        }
        _ => s.row(&[
            "etcd delete event -> status written (controller's histogram)".into(),
            "not measured: the controller's /metrics has no histogram named after deletes".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]),
    }
    s.row(&[
        "Kubernetes: Node -> Unknown after the last kubelet heartbeat (node-monitor-grace-period, default since v1.32; reference, not measured: no kube-controller-manager here)".into(),
        String::new(),
        "50 s".into(),
        "50 s".into(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    s.analysis = format!(
        "What limits it: almost all of the time is the lease TTL. etcd checks for expired leases \
         every 500 ms, so a key vanishes between TTL and TTL + 0.5 s after the last keep-alive, \
         and the agent renews every TTL/3 (1.67 s here), so the last renewal was up to 1.67 s before the kill; the \
         part that is ours (delete event -> status written through the API server) is a single \
         server-side-apply status patch. A shorter TTL moves the total (at the price of more \
         keep-alives per second, about 3N / TTL), nothing in the controller would. Compared with \
         Kubernetes' own node lifecycle, a dead node is reported about {:.0}× sooner.",
        50.0 / Latencies::of(&kill_to_dead).map_or(f64::NAN, |l| l.p50.as_secs_f64())
    );
    drop(deletes);
    Ok(s)
}
