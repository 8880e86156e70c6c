//! Liveness that never lies: real etcd, a real kube-apiserver, the real controller and
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_crd::wire::heartbeat_key;
use testkit::{Etcd, History, Launch, Process, TestEnv, config_json, eventually, put_config};

/// Heartbeat TTL of every agent here, in seconds.
const TTL: u64 = 4;

/// The controller; `TRUTH_CONTROLLER_BIN` runs another build of it.
fn controller(env: &TestEnv, identity: &str) -> Process {
    env.controller(identity)
        .program_from_env("TRUTH_CONTROLLER_BIN")
        .args(["--leader-elect=false", "--usage-write-interval", "5s"])
        .spawn()
}

/// An agent against `endpoints`; `TRUTH_AGENT_BIN` runs another build of it (e.g. one from
/// before a fix, to see these tests fail there).
fn agent(endpoints: &str, node: &str) -> Process {
    Launch::agent(node)
        .program_from_env("TRUTH_AGENT_BIN")
        .etcd(endpoints)
        .ttl(TTL)
        .args(["--heartbeat-min-interval", "500ms"])
        .spawn()
}

/// What a live node's MonitorNode goes through while the controller cannot see etcd.
const UNKNOWN_THEN_ALIVE: [Option<NodeState>; 3] = [
    Some(NodeState::Alive),
    Some(NodeState::Unknown),
    Some(NodeState::Alive),
];

/// `node` went Alive, Unknown and Alive again, and `controller` never logged it Dead.
async fn assert_unknown_then_alive_never_dead(history: &History, controller: &Process, node: &str) {
    history.assert_states(node, &UNKNOWN_THEN_ALIVE).await;
    let log = controller.output_text();
    assert!(!log.contains(&format!("Node {node} Dead")), "{log}");
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
    let (env, mut etcd) = TestEnv::start_shared().await;
    let (node, victim) = ("rebuilt-1", "rebuilt-dies");
    let _controller = controller(&env, "truth-rebuilt");
    let mut victim_agent = agent(env.endpoints(), victim);
    let agent = agent(env.endpoints(), node);
    for n in [node, victim] {
        env.wait_state(n, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    let history = env.record(&[node, victim]).await;
    let client = etcd.client().await;
    // History the new store will not reach soon: the old revisions run well ahead.
    for i in 0..100 {
        let mut c = client.clone();
        c.put(format!("/pad/{i}"), "x", None).await.expect("pad");
    }
    let mark = agent.line_count();
    put_config(&client, node, config_json(5)).await;
    agent.wait_for_line_from(mark, Duration::from_secs(5), "config -> 5s", |l| {
        l.contains("config updated:") && l.contains("-> 5s")
    });

    // The rebuild: SIGKILL, data directory gone, the same address. One node dies with the
    // old store: nothing in the new one says so.
    let mark = agent.line_count();
    victim_agent.kill_hard();
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
    env.wait_state(node, NodeState::Alive, Duration::from_secs(10))
        .await;
    println!("MonitorNode Alive {:?} after the rebuild", back.elapsed());

    // The next config change reaches the agent within 1 s.
    put_config(&client, node, config_json(2)).await;
    let put = Instant::now();
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
            let s = env.status(node).await?;
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

    // A key missing from the new store is no proof of death: the live node was never Dead,
    // and the one that died with the old store is Dead once its TTL has passed unanswered.
    env.wait_state(victim, NodeState::Dead, Duration::from_secs(TTL + 10))
        .await;
    println!("{victim} Dead {:?} after the rebuild", back.elapsed());
    assert!(
        !history.states(node).contains(&Some(NodeState::Dead)),
        "{node} was shown Dead after the rebuild: {:?}",
        history.states(node)
    );
    history
        .assert_states(victim, &[Some(NodeState::Alive), Some(NodeState::Dead)])
        .await;
}

/// A heartbeat key deleted by hand (`etcdctl del`) while its lease lives is no death: the
/// agent writes it again within a third of its TTL, so the node stays Alive. When no agent
/// writes it again (this one is frozen, so its lease runs out too), the node is Dead once the
/// lease would have expired: a delete ahead of the expiry must not hide the death either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_key_deleted_by_hand_is_no_death_unless_nobody_writes_it_again() {
    let (env, etcd) = TestEnv::start_shared().await;
    let (live, frozen) = ("deleted-live", "deleted-frozen");
    let _controller = controller(&env, "truth-deleted");
    let _live = agent(env.endpoints(), live);
    let mut frozen_agent = agent(env.endpoints(), frozen);
    for n in [live, frozen] {
        env.wait_state(n, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    let history = env.record(&[live, frozen]).await;
    let mut client = etcd.client().await;

    frozen_agent.signal(Signal::SIGSTOP);
    for n in [live, frozen] {
        client
            .delete(heartbeat_key(n), None)
            .await
            .expect("etcdctl del");
    }
    let deleted = Instant::now();
    eventually(
        "the live agent writing its key again",
        Duration::from_secs(TTL),
        || async { heartbeat_present(&client, live).await.then_some(()) },
    )
    .await;
    // The frozen node's lease runs out within its TTL of the delete; then it is Dead.
    env.wait_state(frozen, NodeState::Dead, Duration::from_secs(TTL + 3))
        .await;
    println!(
        "{frozen} Dead {:?} after its key was deleted",
        deleted.elapsed()
    );
    frozen_agent.kill_hard();
    history.assert_states(live, &[Some(NodeState::Alive)]).await;
    history
        .assert_states(frozen, &[Some(NodeState::Alive), Some(NodeState::Dead)])
        .await;
}

/// Item 5: etcd SIGKILLed for longer than the TTL. Every node the controller can no longer
/// vouch for goes `Unknown` (reason EtcdUnreachable, condition Alive=Unknown, one Event each);
/// on etcd's return the live node goes back to Alive with no Dead in between, and a node whose
/// agent was killed during the outage ends Dead exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_away_longer_than_the_ttl_is_unknown_then_each_node_its_true_state() {
    let (env, mut etcd) = TestEnv::start_shared().await;
    let nodes = ["unknown-live", "unknown-dies"];
    let controller = controller(&env, "truth-unknown");
    let mut agents: Vec<Process> = nodes.iter().map(|n| agent(env.endpoints(), n)).collect();
    for node in nodes {
        env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    let history = env.record(&nodes).await;

    tokio::task::block_in_place(|| etcd.kill());
    let down = Instant::now();
    for node in nodes {
        let s = env
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

    env.wait_state(
        "unknown-live",
        NodeState::Alive,
        Duration::from_secs(TTL + 5),
    )
    .await;
    println!(
        "unknown-live Alive {:?} after etcd's return",
        back.elapsed()
    );
    let dead = env
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
    history
        .assert_states("unknown-live", &UNKNOWN_THEN_ALIVE)
        .await;
    history
        .assert_states(
            "unknown-dies",
            &[
                Some(NodeState::Alive),
                Some(NodeState::Unknown),
                Some(NodeState::Dead),
            ],
        )
        .await;
    assert_eq!(env.dead_events("unknown-live").await, 0);
    assert_eq!(env.dead_events("unknown-dies").await, 1);
    for node in nodes {
        assert_eq!(
            env.event_count(node, "NodeStatusUnknown").await,
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
    let (env, mut etcd) = TestEnv::start_shared().await;
    let node = "blind-start";
    let mut first = controller(&env, "truth-blind-1");
    let _agent = agent(env.endpoints(), node);
    env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let history = env.record(&[node]).await;

    first.kill_hard();
    tokio::task::block_in_place(|| etcd.kill());
    let second = controller(&env, "truth-blind-2");
    let started = Instant::now();
    let s = env
        .wait_state(node, NodeState::Unknown, Duration::from_secs(TTL + 10))
        .await;
    assert_eq!(s.reason.as_deref(), Some("EtcdUnreachable"), "{s:?}");
    println!(
        "Unknown {:?} after a controller started without etcd",
        started.elapsed()
    );

    tokio::task::block_in_place(|| etcd.restart());
    let back = Instant::now();
    env.wait_state(node, NodeState::Alive, Duration::from_secs(TTL + 5))
        .await;
    println!("Alive {:?} after etcd's return", back.elapsed());
    assert_unknown_then_alive_never_dead(&history, &second, node).await;
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
    let env = TestEnv::shared(&format!("http://{}", proxy.addr)).await;
    let node = "silent-1";
    let controller = controller(&env, "truth-silent");
    let _agent = agent(&etcd.endpoint, node);
    env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let history = env.record(&[node]).await;

    proxy.set_frozen(true);
    let cut = Instant::now();
    let s = env
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
    env.wait_state(node, NodeState::Alive, Duration::from_secs(30))
        .await;
    println!("Alive {:?} after the network came back", healed.elapsed());
    assert_unknown_then_alive_never_dead(&history, &controller, node).await;
}
