//! The pieces every phase starts: our binaries as child processes, the shared etcd +
//! kube-apiserver + controller, and a watch on MonitorNode states.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use nodepulse_crd::v1alpha1::{MonitorNode, NodeState};
use testkit::{Etcd, KubeApiserver, Launch, Process, http_get};

use crate::{Error, Result};

/// A workspace binary beside the running bench (target/release when run with --release).
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = testkit::project_bin_dir().join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::NotBuilt(path.display().to_string()))
    }
}

/// Fetches `path` from `addr` over plain HTTP; errors name the address.
pub fn get(addr: &str, path: &str) -> Result<String> {
    match http_get(addr, path) {
        Some((200, body)) => Ok(body),
        Some((status, body)) => Err(Error::Unexpected(format!(
            "GET http://{addr}{path}: status {status}: {}",
            body.chars().take(200).collect::<String>()
        ))),
        None => Err(Error::Unexpected(format!(
            "GET http://{addr}{path}: no answer"
        ))),
    }
}

/// Waits until `addr` answers `path` with 200, up to `timeout`.
pub async fn wait_http(addr: &str, path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if get(addr, path).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "http://{addr}{path} did not answer in {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The address a binary of ours started with `--metrics-addr 127.0.0.1:0` serves on, from its
/// `serving /metrics ... on <addr>` log line, once `path` answers there.
pub async fn wait_serving(process: &Process, path: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let addr = loop {
        if let Some(addr) = process.serving_addr() {
            break addr;
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "no `serving /metrics ... on <addr>` line in {timeout:?}; output:\n{}",
                process.output_text()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_http(
        &addr,
        path,
        deadline.saturating_duration_since(Instant::now()),
    )
    .await?;
    Ok(addr)
}

/// A running `nodepulse-agent`.
pub struct Agent {
    /// The child process (its log lines, with arrival times).
    pub process: Process,
    /// `127.0.0.1:<port>` of its /metrics.
    pub metrics_addr: String,
    /// The node name it reports as.
    pub node: String,
}

impl Agent {
    /// Starts an agent for `node` against `etcd_endpoint`, with JSON logs.
    pub async fn start(etcd_endpoint: &str, node: &str, ttl_seconds: u32) -> Result<Agent> {
        let process = Launch::agent(node)
            .program(&bin("nodepulse-agent")?)
            .etcd(etcd_endpoint)
            .ttl(ttl_seconds.into())
            .args(["--log-format", "json"])
            .spawn();
        let metrics_addr = wait_serving(&process, "/metrics", Duration::from_secs(20)).await?;
        Ok(Agent {
            process,
            metrics_addr,
            node: node.to_string(),
        })
    }
}

/// Starts etcd (blocking work kept off the async runtime).
pub async fn start_etcd() -> Etcd {
    tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd start task")
}

/// Starts a kube-apiserver with the CRDs installed.
pub async fn start_apiserver() -> KubeApiserver {
    tokio::task::spawn_blocking(KubeApiserver::with_crds)
        .await
        .expect("kube-apiserver start task")
}

/// Starts `nodepulse-controller` against `etcd` and `apiserver`; returns it with its metrics
/// address once /metrics answers.
pub async fn start_controller(
    etcd: &Etcd,
    apiserver: &KubeApiserver,
    extra: &[&str],
) -> Result<(Process, String)> {
    let process = Launch::controller(&apiserver.kubeconfig, "controller")
        .program(&bin("nodepulse-controller")?)
        .etcd(&etcd.endpoint)
        .args(extra)
        .spawn();
    let metrics_addr = wait_serving(&process, "/metrics", Duration::from_secs(30)).await?;
    Ok((process, metrics_addr))
}

/// etcd, kube-apiserver and the controller, shared by phases 2 and 3.
pub struct Cluster {
    /// nodepulse's etcd (the agents' and the controller's).
    pub etcd: Etcd,
    /// The API server (with its own, separate etcd).
    pub apiserver: KubeApiserver,
    /// The controller process.
    pub controller: Process,
    /// `127.0.0.1:<port>` of the controller's /metrics.
    pub controller_metrics: String,
    /// A client for the API server.
    pub kube: kube::Client,
}

impl Cluster {
    /// Starts all three and waits for the controller's /metrics.
    pub async fn start() -> Result<Cluster> {
        // Fail fast, before minutes of server start-up, when a binary is missing.
        bin("nodepulse-controller")?;
        let etcd = start_etcd().await;
        let apiserver = start_apiserver().await;
        let (controller, controller_metrics) = start_controller(&etcd, &apiserver, &[]).await?;
        let kube = apiserver.client().await;
        Ok(Cluster {
            etcd,
            apiserver,
            controller,
            controller_metrics,
            kube,
        })
    }
}

/// Each node's state and the moment the watch first saw it in that state.
type StateMap = Arc<Mutex<HashMap<String, (Option<NodeState>, Instant)>>>;

/// Every state change seen: node, new state, when.
type History = Arc<Mutex<Vec<(String, Option<NodeState>, Instant)>>>;

/// The state of every MonitorNode, kept current by a watch, with the moment each state was
/// first seen, and every change in order.
pub struct NodeStates {
    states: StateMap,
    history: History,
    task: tokio::task::JoinHandle<()>,
}

impl NodeStates {
    /// Starts watching every MonitorNode.
    pub fn watch(client: kube::Client) -> NodeStates {
        let states: StateMap = Arc::default();
        let history: History = Arc::default();
        let api: Api<MonitorNode> = Api::all(client);
        let (shared, changes) = (states.clone(), history.clone());
        let task = tokio::spawn(async move {
            // Backing off after an error also yields: a watch failing at once (its API server
            // gone) would otherwise spin and keep the runtime from shutting down.
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let now = Instant::now();
                let (watcher::Event::Apply(mn) | watcher::Event::InitApply(mn)) = (match event {
                    Ok(e) => e,
                    Err(_) => continue,
                }) else {
                    continue;
                };
                let Some(name) = mn.metadata.name.clone() else {
                    continue;
                };
                let state = mn.status.as_ref().and_then(|s| s.state);
                let mut map = shared.lock().expect("states lock");
                match map.get(&name) {
                    Some((old, _)) if *old == state => {}
                    _ => {
                        changes
                            .lock()
                            .expect("history lock")
                            .push((name.clone(), state, now));
                        map.insert(name, (state, now));
                    }
                }
            }
        });
        NodeStates {
            states,
            history,
            task,
        }
    }

    /// The moments `node` entered `state` at or after `since`.
    pub fn entries(&self, node: &str, state: NodeState, since: Instant) -> Vec<Instant> {
        self.history
            .lock()
            .expect("history lock")
            .iter()
            .filter(|(n, s, at)| n == node && *s == Some(state) && *at >= since)
            .map(|(_, _, at)| *at)
            .collect()
    }

    /// Waits until `node` is in `state`, up to `timeout`; returns when the watch first saw it.
    pub async fn wait_for(
        &self,
        node: &str,
        state: NodeState,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.get(node) {
                Some((Some(s), at)) if s == state => return Ok(at),
                now => {
                    if Instant::now() > deadline {
                        return Err(Error::Timeout(format!(
                            "MonitorNode {node} {state:?} within {timeout:?} (it is {:?})",
                            now.and_then(|(s, _)| s)
                        )));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many nodes whose name starts with `prefix` are in `state`.
    pub fn count(&self, prefix: &str, state: NodeState) -> usize {
        self.states
            .lock()
            .expect("states lock")
            .iter()
            .filter(|(n, (s, _))| n.starts_with(prefix) && *s == Some(state))
            .count()
    }

    /// `node`'s state and when it was first seen in it.
    pub fn get(&self, node: &str) -> Option<(Option<NodeState>, Instant)> {
        self.states.lock().expect("states lock").get(node).copied()
    }

    /// When each node whose name starts with `prefix` entered `state` (only those in it now).
    pub fn entered(&self, prefix: &str, state: NodeState) -> Vec<(String, Instant)> {
        self.states
            .lock()
            .expect("states lock")
            .iter()
            .filter(|(n, (s, _))| n.starts_with(prefix) && *s == Some(state))
            .map(|(n, (_, at))| (n.clone(), *at))
            .collect()
    }

    /// Waits until `count(prefix, state) >= want`, up to `timeout`; returns when it happened.
    pub async fn wait_count(
        &self,
        prefix: &str,
        state: NodeState,
        want: usize,
        timeout: Duration,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.count(prefix, state);
            if n >= want {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "{n} of {want} MonitorNodes {prefix}* {state:?} after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeStates {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `process` prints a line satisfying `pred`, up to `timeout`; unlike testkit's
/// waits it returns an error (a panic would abort the whole release-built bench).
pub async fn wait_line(
    process: &mut Process,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Result<testkit::Line> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = process.lines().into_iter().find(|l| pred(&l.text)) {
            return Ok(l);
        }
        if !process.is_running() {
            return Err(Error::Unexpected(format!(
                "{what}: the process exited; its output:\n{}",
                process.output_text()
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "{what} within {timeout:?}; output:\n{}",
                process.output_text()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
