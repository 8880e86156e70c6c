//! Liveness that never lies (issue 16): real etcd, a real kube-apiserver, the real controller and
//! real agents, with etcd broken in the ways an operator meets at 3 a.m.
//!
//! - a rebuilt etcd (data directory lost, restarted empty on the same address): heartbeats,
//!   config watches and MonitorNodes come back, instead of a watch silently waiting for a
//!   revision the new store will only reach hours later;
//! - etcd away for longer than the TTL: the controller says `Unknown`, not a stale `Alive`, and
//!   on etcd's return each node goes to its true state, a node that died meanwhile Dead once.
//!
//! The tests share one private API server and run one at a time (timing on 2 cores; each
//! controller writes the MonitorNodes it sees). Node names are distinct per test.

use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::{config_key, heartbeat_key};
use testkit::{Etcd, KubeApiserver, Process, eventually};

/// Heartbeat TTL of every agent here, in seconds.
const TTL: u64 = 4;

fn api_server() -> &'static KubeApiserver {
    static API: OnceLock<KubeApiserver> = OnceLock::new();
    API.get_or_init(|| {
        let api = KubeApiserver::start();
        api.install_crds();
        api
    })
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Lab {
    api: &'static KubeApiserver,
    kube: kube::Client,
    endpoints: String,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

impl Lab {
    async fn start(endpoints: String) -> Lab {
        let serial = SERIAL.lock().await;
        let api = tokio::task::spawn_blocking(api_server)
            .await
            .expect("start the API server");
        Lab {
            api,
            kube: api.client().await,
            endpoints,
            _serial: serial,
        }
    }

    /// The controller; `TRUTH_CONTROLLER_BIN` runs another build of it.
    fn controller(&self, identity: &str) -> Process {
        let bin = std::env::var_os("TRUTH_CONTROLLER_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_nodepulse-controller").into());
        let mut cmd = Command::new(bin);
        cmd.env("KUBECONFIG", &self.api.kubeconfig)
            .env("RUST_LOG", "info")
            .args(["--etcd-endpoints", &self.endpoints])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--leader-elect=false"])
            .args(["--leader-election-identity", identity])
            .args(["--usage-write-interval", "5s"]);
        Process::spawn(identity, cmd)
    }

    /// An agent; `TRUTH_AGENT_BIN` runs another build of it (e.g. one from before a fix, to
    /// see these tests fail there).
    fn agent(&self, node: &str) -> Process {
        let bin = std::env::var_os("TRUTH_AGENT_BIN")
            .map_or_else(|| testkit::project_bin("nodepulse-agent"), Into::into);
        let mut cmd = Command::new(bin);
        cmd.env("RUST_LOG", "info")
            .env_remove("NODE_NAME")
            .args(["--node-name", node])
            .args(["--heartbeat-ttl", &TTL.to_string()])
            .args(["--heartbeat-min-interval", "500ms"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--etcd-endpoints", &self.endpoints]);
        Process::spawn(node, cmd)
    }

    async fn status(&self, node: &str) -> Option<MonitorNodeStatus> {
        let api: Api<MonitorNode> = Api::all(self.kube.clone());
        api.get_opt(node).await.ok().flatten()?.status
    }

    async fn wait_state(
        &self,
        node: &str,
        state: NodeState,
        within: Duration,
    ) -> MonitorNodeStatus {
        eventually(&format!("MonitorNode {node} {state:?}"), within, || async {
            self.status(node).await.filter(|s| s.state == Some(state))
        })
        .await
    }

    /// Events the controller raised on `node`'s MonitorNode with `reason`, counting repeats.
    async fn event_count(&self, node: &str, reason: &str) -> i32 {
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

    /// Records every state the API server shows for `nodes` from now on.
    async fn record(&self, nodes: &[&str]) -> History {
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
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
                if wanted.contains(&name) {
                    let state = mn.status.and_then(|s| s.state);
                    recorded.lock().expect("history lock").push((name, state));
                }
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

/// (node, state) of every MonitorNode version the recorder saw.
type Seen = Arc<Mutex<Vec<(String, Option<NodeState>)>>>;

/// Every state some MonitorNodes went through, in the order the API server sent them.
struct History {
    seen: Seen,
    task: tokio::task::JoinHandle<()>,
}

impl History {
    /// The states `node` went through, repeats collapsed.
    fn states(&self, node: &str) -> Vec<Option<NodeState>> {
        let mut out: Vec<Option<NodeState>> = Vec::new();
        for (n, state) in self.seen.lock().expect("history lock").iter() {
            if n == node && out.last() != Some(state) {
                out.push(*state);
            }
        }
        out
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Puts a config value for `node` straight into etcd (as `etcdctl put` would), retrying while
/// etcd cannot take writes, and returns when etcd took it.
async fn put_config(client: &etcd_client::Client, node: &str, interval: u32) -> Instant {
    let value = serde_json::json!({"interval": interval, "metrics": ["cpu", "memory"]}).to_string();
    eventually(
        &format!("etcd to take {node}'s config"),
        Duration::from_secs(30),
        || {
            let mut c = client.clone();
            let value = value.clone();
            async move {
                let put = c.put(config_key(node), value, None);
                tokio::time::timeout(Duration::from_secs(2), put)
                    .await
                    .ok()?
                    .ok()?;
                Some(Instant::now())
            }
        },
    )
    .await
}

/// Whether etcd holds `node`'s heartbeat key.
async fn heartbeat_present(client: &etcd_client::Client, node: &str) -> bool {
    let mut c = client.clone();
    let get = c.get(heartbeat_key(node), None);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), get).await,
        Ok(Ok(resp)) if !resp.kvs().is_empty()
    )
}

/// Item 4: etcd's data directory is lost and etcd restarts empty on the same address under a
/// running agent and controller. The agent's config watch stood at a revision the new store
/// has not reached; etcd accepts a watch from a future revision and waits, so without noticing
/// the rebuild the agent would ignore every config until the new store caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuilt_etcd_is_noticed_heartbeat_config_and_status_come_back() {
    let mut etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("start etcd");
    let lab = Lab::start(etcd.endpoint.clone()).await;
    let node = "rebuilt-1";
    let _controller = lab.controller("truth-rebuilt");
    let agent = lab.agent(node);
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let client = etcd.client().await;
    // History the new store will not reach soon: the old revisions run well ahead.
    for i in 0..100 {
        let mut c = client.clone();
        c.put(format!("/pad/{i}"), "x", None).await.expect("pad");
    }
    let mark = agent.line_count();
    put_config(&client, node, 5).await;
    agent.wait_for_line_from(mark, Duration::from_secs(5), "config -> 5s", |l| {
        l.contains("config updated:") && l.contains("-> 5s")
    });

    // The rebuild: SIGKILL, data directory gone, the same address.
    let mark = agent.line_count();
    tokio::task::block_in_place(|| {
        etcd.kill();
        std::fs::remove_dir_all(etcd.data_dir()).expect("remove etcd's data directory");
        etcd.restart();
    });
    let back = Instant::now();
    let client = etcd.client().await;

    // The heartbeat: a new lease on the new store within 5 s.
    eventually(
        "the heartbeat key in the rebuilt etcd",
        Duration::from_secs(5).saturating_sub(back.elapsed()),
        || async { heartbeat_present(&client, node).await.then_some(()) },
    )
    .await;
    println!("heartbeat back {:?} after the rebuild", back.elapsed());
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(10))
        .await;
    println!("MonitorNode Alive {:?} after the rebuild", back.elapsed());

    // The next config change reaches the agent within 1 s.
    let put = put_config(&client, node, 2).await;
    agent.wait_for_line_from(
        mark,
        Duration::from_secs(1).saturating_sub(put.elapsed()),
        "config -> 2s within 1 s of the put",
        |l| l.contains("config updated:") && l.contains("-> 2s"),
    );
    println!(
        "config applied {:?} after the put ({:?} after the rebuild)",
        put.elapsed(),
        back.elapsed()
    );
    // And the controller reports it: its watch reads the new store too.
    eventually(
        "MonitorNode reporting interval 2",
        Duration::from_secs(10),
        || async {
            let s = lab.status(node).await?;
            (s.state == Some(NodeState::Alive) && s.config?.interval == 2).then_some(())
        },
    )
    .await;
    assert!(
        agent
            .output_text()
            .contains("listing /monitor/config/rebuilt-1 again"),
        "the agent should say it noticed the rebuilt etcd:\n{}",
        agent.output_text()
    );
}

/// Item 5: etcd SIGKILLed for longer than the TTL. Every node the controller can no longer
/// vouch for goes `Unknown` (reason EtcdUnreachable, condition Alive=Unknown, one Event each);
/// on etcd's return the live node goes back to Alive with no Dead in between, and a node whose
/// agent was killed during the outage ends Dead exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_away_longer_than_the_ttl_is_unknown_then_each_node_its_true_state() {
    let mut etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("start etcd");
    let lab = Lab::start(etcd.endpoint.clone()).await;
    let nodes = ["unknown-live", "unknown-dies"];
    let controller = lab.controller("truth-unknown");
    let mut agents: Vec<Process> = nodes.iter().map(|n| lab.agent(n)).collect();
    for node in nodes {
        lab.wait_state(node, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    let history = lab.record(&nodes).await;

    tokio::task::block_in_place(|| etcd.kill());
    let down = Instant::now();
    for node in nodes {
        let s = lab
            .wait_state(node, NodeState::Unknown, Duration::from_secs(TTL + 5))
            .await;
        assert_eq!(s.reason.as_deref(), Some("EtcdUnreachable"), "{s:?}");
        let alive = s
            .conditions
            .iter()
            .find(|c| c.type_ == "Alive")
            .expect("an Alive condition");
        assert_eq!(
            (alive.status.as_str(), alive.reason.as_str()),
            ("Unknown", "EtcdUnreachable")
        );
    }
    let unknown_after = down.elapsed();
    println!("both Unknown {unknown_after:?} after etcd's SIGKILL (TTL {TTL}s)");
    assert!(
        unknown_after >= Duration::from_secs(TTL),
        "Unknown after {unknown_after:?}, before the TTL"
    );

    // A node dies while nobody can see it.
    agents[1].kill_hard();
    // The outage itself: longer than the TTL, on purpose (2 × TTL in all).
    tokio::time::sleep(Duration::from_secs(2 * TTL).saturating_sub(down.elapsed())).await;
    tokio::task::block_in_place(|| etcd.restart());
    let back = Instant::now();

    lab.wait_state(
        "unknown-live",
        NodeState::Alive,
        Duration::from_secs(TTL + 5),
    )
    .await;
    println!(
        "unknown-live Alive {:?} after etcd's return",
        back.elapsed()
    );
    let dead = lab
        .wait_state(
            "unknown-dies",
            NodeState::Dead,
            Duration::from_secs(TTL + 10),
        )
        .await;
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    println!("unknown-dies Dead {:?} after etcd's return", back.elapsed());

    // Another TTL of watching: a stray transition or Event would show up by now.
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    assert_eq!(
        history.states("unknown-live"),
        vec![
            Some(NodeState::Alive),
            Some(NodeState::Unknown),
            Some(NodeState::Alive)
        ]
    );
    assert_eq!(
        history.states("unknown-dies"),
        vec![
            Some(NodeState::Alive),
            Some(NodeState::Unknown),
            Some(NodeState::Dead)
        ]
    );
    assert_eq!(
        lab.event_count("unknown-live", "HeartbeatExpired").await
            + lab.event_count("unknown-live", "AgentStopped").await,
        0
    );
    assert_eq!(
        lab.event_count("unknown-dies", "HeartbeatExpired").await
            + lab.event_count("unknown-dies", "AgentStopped").await,
        1
    );
    for node in nodes {
        assert_eq!(
            lab.event_count(node, "NodeStatusUnknown").await,
            1,
            "{node}"
        );
    }
    let dead_lines = controller
        .lines()
        .into_iter()
        .filter(|l| l.text.contains("Node unknown-dies Dead"))
        .count();
    assert_eq!(dead_lines, 1, "{}", controller.output_text());
    assert!(!controller.output_text().contains("Node unknown-live Dead"));
    drop(agents);
}

/// Item 5, the controller's side: a controller (re)started while etcd is away has never had a
/// working watch; past the TTL it says Unknown for the MonitorNodes the API server shows Alive,
/// instead of leaving a stale Alive, and once etcd is back the live node is Alive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_started_while_etcd_is_away_says_unknown_then_alive() {
    let mut etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("start etcd");
    let lab = Lab::start(etcd.endpoint.clone()).await;
    let node = "blind-start";
    let mut first = lab.controller("truth-blind-1");
    let _agent = lab.agent(node);
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let history = lab.record(&[node]).await;

    first.kill_hard();
    tokio::task::block_in_place(|| etcd.kill());
    let second = lab.controller("truth-blind-2");
    let started = Instant::now();
    let s = lab
        .wait_state(node, NodeState::Unknown, Duration::from_secs(TTL + 10))
        .await;
    assert_eq!(s.reason.as_deref(), Some("EtcdUnreachable"), "{s:?}");
    println!(
        "Unknown {:?} after a controller started without etcd",
        started.elapsed()
    );

    tokio::task::block_in_place(|| etcd.restart());
    let back = Instant::now();
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(TTL + 5))
        .await;
    println!("Alive {:?} after etcd's return", back.elapsed());
    assert_eq!(
        history.states(node),
        vec![
            Some(NodeState::Alive),
            Some(NodeState::Unknown),
            Some(NodeState::Alive)
        ]
    );
    assert!(
        !second.output_text().contains(&format!("Node {node} Dead")),
        "{}",
        second.output_text()
    );
}

/// A loopback TCP proxy that can freeze: bytes stop flowing both ways, connections stay open
/// (a blackholed network: no reset, no close, nothing).
struct FreezingProxy {
    addr: std::net::SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingProxy {
    fn start(target: std::net::SocketAddr) -> FreezingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let frozen = Arc::new(AtomicBool::new(false));
        let frozen2 = frozen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let frozen = frozen2.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            while frozen.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        FreezingProxy { addr, frozen }
    }

    fn set_frozen(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Item 5, a partition between the controller and etcd that says nothing (no reset, no close:
/// packets just stop): the controller's connection fails its HTTP/2 keep-alive (a ping every
/// 10 s, 5 s to answer), so it is blind from then on; past the TTL it says Unknown, and Alive
/// again, never Dead, when the network comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_partition_from_etcd_is_unknown_then_alive_never_dead() {
    let etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("start etcd");
    let target: std::net::SocketAddr = etcd
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    let proxy = FreezingProxy::start(target);
    // The agent reaches etcd directly; only the controller is behind the proxy.
    let lab = Lab::start(format!("http://{}", proxy.addr)).await;
    let node = "silent-1";
    let controller = lab.controller("truth-silent");
    let agent_lab_endpoints = etcd.endpoint.clone();
    let mut cmd = Command::new(testkit::project_bin("nodepulse-agent"));
    cmd.env("RUST_LOG", "info")
        .env_remove("NODE_NAME")
        .args(["--node-name", node])
        .args(["--heartbeat-ttl", &TTL.to_string()])
        .args(["--heartbeat-min-interval", "500ms"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &agent_lab_endpoints]);
    let _agent = Process::spawn(node, cmd);
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let history = lab.record(&[node]).await;

    proxy.set_frozen(true);
    let cut = Instant::now();
    let s = lab
        .wait_state(node, NodeState::Unknown, Duration::from_secs(TTL + 25))
        .await;
    assert_eq!(s.reason.as_deref(), Some("EtcdUnreachable"), "{s:?}");
    let unknown_after = cut.elapsed();
    println!("Unknown {unknown_after:?} after the silent partition (TTL {TTL}s)");
    // Blind once the keep-alive gives up (at most 15 s), Unknown a TTL later.
    assert!(
        unknown_after >= Duration::from_secs(TTL),
        "Unknown {unknown_after:?} after the cut, before the TTL"
    );
    proxy.set_frozen(false);
    let healed = Instant::now();
    lab.wait_state(node, NodeState::Alive, Duration::from_secs(30))
        .await;
    println!("Alive {:?} after the network came back", healed.elapsed());
    assert_eq!(
        history.states(node),
        vec![
            Some(NodeState::Alive),
            Some(NodeState::Unknown),
            Some(NodeState::Alive)
        ]
    );
    assert!(
        !controller
            .output_text()
            .contains(&format!("Node {node} Dead")),
        "{}",
        controller.output_text()
    );
}
