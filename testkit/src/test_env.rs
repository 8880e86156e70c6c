//! The env every end-to-end test runs in: a kube-apiserver with the CRDs, the etcd endpoints the
//! agents and controllers under test use, and waits on MonitorNodes with deadlines.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use nodepulse_crd::v1alpha1::{MonitorConfig, MonitorNode, MonitorNodeStatus, NodeState};

use crate::apiserver::KubeApiserver;
use crate::etcd::Etcd;
use crate::eventually;
use crate::nodepulse::Launch;

/// A kube-apiserver (with the CRDs) and the etcd endpoints of one test.
pub struct TestEnv {
    api: Server,
    /// A client of the API server with cluster-admin rights.
    pub kube: kube::Client,
    endpoints: String,
    /// The shared server's turn, held by one test at a time: a controller writes every
    /// MonitorNode it sees from its own etcd, so two tests' controllers must not overlap.
    _turn: Option<tokio::sync::MutexGuard<'static, ()>>,
}

enum Server {
    Own(Box<KubeApiserver>),
    Shared(&'static KubeApiserver),
}

impl TestEnv {
    /// A private kube-apiserver and a separate single-member etcd for nodepulse's keys: the
    /// test's alone, so a controller sees only its own objects.
    pub async fn start() -> (TestEnv, Etcd) {
        let (api, etcd) =
            tokio::task::spawn_blocking(|| (KubeApiserver::with_crds(), Etcd::start()))
                .await
                .expect("start kube-apiserver and etcd");
        let kube = api.client().await;
        let env = TestEnv {
            api: Server::Own(Box::new(api)),
            kube,
            endpoints: etcd.endpoint.clone(),
            _turn: None,
        };
        (env, etcd)
    }

    /// The test binary's shared kube-apiserver (see [`TestEnv::shared`]) and a single-member etcd
    /// of the test's own.
    pub async fn start_shared() -> (TestEnv, Etcd) {
        let etcd = tokio::task::spawn_blocking(Etcd::start)
            .await
            .expect("start etcd");
        (TestEnv::shared(&etcd.endpoint).await, etcd)
    }

    /// The test binary's shared kube-apiserver ([`KubeApiserver::shared`]) with the etcd at
    /// `endpoints`; waits while another test of the binary holds it. Tests sharing it use
    /// distinct node names.
    pub async fn shared(endpoints: &str) -> TestEnv {
        static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let turn = TURN.lock().await;
        let api = tokio::task::spawn_blocking(KubeApiserver::shared)
            .await
            .expect("start the shared kube-apiserver");
        TestEnv {
            api: Server::Shared(api),
            kube: api.client().await,
            endpoints: endpoints.to_string(),
            _turn: Some(turn),
        }
    }

    /// The API server.
    pub fn api(&self) -> &KubeApiserver {
        match &self.api {
            Server::Own(api) => api,
            Server::Shared(api) => api,
        }
    }

    /// The etcd endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// An agent for `node` against this env's etcd.
    pub fn agent(&self, node: &str) -> Launch {
        Launch::agent(node).etcd(&self.endpoints)
    }

    /// A controller against this env's API server and etcd.
    pub fn controller(&self, identity: &str) -> Launch {
        Launch::controller(&self.api().kubeconfig, identity).etcd(&self.endpoints)
    }

    /// Creates (or relabels) the Node `name`.
    pub fn node(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<_, _> = labels.iter().copied().collect();
        let manifest = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
        });
        self.apply(&manifest.to_string());
    }

    /// `kubectl apply` of `manifest` (JSON or YAML), which must succeed.
    pub fn apply(&self, manifest: &str) {
        let out = self.api().kubectl_stdin(&["apply", "-f", "-"], manifest);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `node`'s MonitorNode status, if it has one.
    pub async fn status(&self, node: &str) -> Option<MonitorNodeStatus> {
        let api: Api<MonitorNode> = Api::all(self.kube.clone());
        api.get_opt(node).await.ok().flatten()?.status
    }

    /// Waits until `node`'s status satisfies `ok`, naming `what` if `within` passes first.
    pub async fn wait_status(
        &self,
        node: &str,
        what: &str,
        within: Duration,
        ok: impl Fn(&MonitorNodeStatus) -> bool,
    ) -> MonitorNodeStatus {
        eventually(&format!("MonitorNode {node}: {what}"), within, || async {
            self.status(node).await.filter(|s| ok(s))
        })
        .await
    }

    /// Waits until `node`'s MonitorNode is in `state`.
    pub async fn wait_state(
        &self,
        node: &str,
        state: NodeState,
        within: Duration,
    ) -> MonitorNodeStatus {
        self.wait_status(node, &format!("{state:?}"), within, |s| {
            s.state == Some(state)
        })
        .await
    }

    /// The MonitorConfig `name`, if it exists.
    pub async fn monitor_config(&self, name: &str) -> Option<MonitorConfig> {
        let api: Api<MonitorConfig> = Api::all(self.kube.clone());
        api.get_opt(name).await.expect("get MonitorConfig")
    }

    /// Events the controller raised on `node`'s MonitorNode with `reason`, counting repeats.
    pub async fn event_count(&self, node: &str, reason: &str) -> i32 {
        let api: Api<Event> = Api::namespaced(self.kube.clone(), "default");
        let events = api.list(&ListParams::default()).await.expect("list events");
        events
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter(|e| {
                e.regarding.as_ref().is_some_and(|r| {
                    r.name.as_deref() == Some(node) && r.kind.as_deref() == Some("MonitorNode")
                })
            })
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum()
    }

    /// Death Events on `node` (their reason is the status's: HeartbeatExpired, AgentStopped).
    pub async fn dead_events(&self, node: &str) -> i32 {
        self.event_count(node, "HeartbeatExpired").await
            + self.event_count(node, "AgentStopped").await
    }

    /// Starts recording every version the API server shows of `nodes`' MonitorNodes, and
    /// returns once the recorder has seen each of them (so the record covers everything from
    /// now on).
    pub async fn record(&self, nodes: &[&str]) -> History {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let wanted: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
        let api: Api<MonitorNode> = Api::all(self.kube.clone());
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                let Ok(mn) = item else { continue };
                let Some(name) = mn.metadata.name.clone() else {
                    continue;
                };
                if !wanted.contains(&name) {
                    continue;
                }
                let status = mn.status.unwrap_or_default();
                recorded.lock().expect("history lock").push(Observed {
                    node: name,
                    state: status.state,
                    reason: status.reason,
                    interval: status.config.map(|c| c.interval),
                });
            }
        });
        let history = History { seen, task };
        for node in nodes {
            eventually(
                &format!("the recorder to see {node}"),
                Duration::from_secs(10),
                || async { (!history.states(node).is_empty()).then_some(()) },
            )
            .await;
        }
        history
    }
}

/// (status, reason, message) of a MonitorConfig's Ready condition, once written.
pub fn ready_condition(mc: &MonitorConfig) -> Option<(String, String, String)> {
    let c = mc
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The `Alive` condition of a MonitorNode's status; panics when it has none.
pub fn alive_condition(status: &MonitorNodeStatus) -> &Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Alive")
        .expect("an Alive condition")
}

/// One MonitorNode version the recorder saw.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The node.
    pub node: String,
    /// Its state.
    pub state: Option<NodeState>,
    /// Why it is in that state.
    pub reason: Option<String>,
    /// The interval its agent reported running.
    pub interval: Option<u32>,
}

/// Every version of some MonitorNodes, in the order the API server sent them.
pub struct History {
    seen: Arc<Mutex<Vec<Observed>>>,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    /// Everything seen so far.
    pub fn all(&self) -> Vec<Observed> {
        self.seen.lock().expect("history lock").clone()
    }

    /// The states `node` went through, repeats collapsed.
    pub fn states(&self, node: &str) -> Vec<Option<NodeState>> {
        let mut out: Vec<Option<NodeState>> = Vec::new();
        for o in self.all().into_iter().filter(|o| o.node == node) {
            if out.last() != Some(&o.state) {
                out.push(o.state);
            }
        }
        out
    }

    /// Waits until the states `node` went through are `expected`, and panics with what was
    /// recorded if they are not within 5 s. The recorder sees a change through its watch,
    /// which may arrive after a GET has already shown it, so a test that has just seen the
    /// last state compares the history through this, not [`History::states`] at once.
    pub async fn assert_states(&self, node: &str, expected: &[Option<NodeState>]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let states = self.states(node);
            if states == expected {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("{node} went through {states:?}, expected {expected:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Panics if any recorded version of any node was Dead.
    pub fn assert_never_dead(&self, during: &str) {
        let dead: Vec<Observed> = self
            .all()
            .into_iter()
            .filter(|o| o.state == Some(NodeState::Dead))
            .collect();
        assert!(
            dead.is_empty(),
            "a node turned Dead during {during}: {dead:?}"
        );
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}
