//! Faults: real etcd members, a real kube-apiserver, the real controller and real
//! agents, broken on purpose (SIGKILL, SIGSTOP, compaction). Each test asserts the outcome; where
//! it asserts that something does NOT happen (no node Dead), a watch on the MonitorNodes records
//! every state the API server ever held for them over the whole fault window, and the test
//! asserts on that history, on the Dead Events (HeartbeatExpired, AgentStopped) and on the
//! controller's log.
//!
//! The tests share one private API server (started once for this binary) and run one at a time:
//! timing assertions on 2 cores should not compete with each other, and a controller of one test
//! must not run while another test's controller does (each writes the MonitorNodes it sees from
//! its own etcd). Node names are distinct per test, so what an earlier test left behind is never
//! asserted on.
//!
//! TTLs are short (4 s) so that "longer than the TTL" takes seconds, not the 30 s of the issue.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, heartbeat_key};
use testkit::{
    Daemon, EtcdCluster, History, Process, TestEnv, config_json, eventually, http_get, put_config,
};

/// Heartbeat TTL of every agent here, in seconds.
const TTL: u64 = 4;

/// The controller with leader election off (one replica: a test's faults are in etcd).
fn controller(env: &TestEnv, identity: &str) -> Process {
    controller_with(env, identity, &["--leader-elect=false"])
}

fn controller_with(env: &TestEnv, identity: &str, extra: &[&str]) -> Process {
    env.controller(identity)
        .args(["--usage-write-interval", "5s"])
        .args(extra)
        .spawn()
}

fn agent(env: &TestEnv, node: &str) -> Daemon {
    env.agent(node)
        .ttl(TTL)
        .args(["--heartbeat-min-interval", "500ms"])
        .start()
}

/// Agents on some nodes, all seen Alive, and the record of their MonitorNodes' states since.
struct Fleet<'a> {
    env: &'a TestEnv,
    nodes: &'a [&'a str],
    agents: Vec<Daemon>,
    history: History,
}

impl<'a> Fleet<'a> {
    /// Starts an agent on each of `nodes`, waits until every one is Alive and records their
    /// MonitorNodes' states from then on.
    async fn start(env: &'a TestEnv, nodes: &'a [&'a str]) -> Fleet<'a> {
        let agents = nodes.iter().map(|n| agent(env, n)).collect();
        for node in nodes {
            env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
                .await;
        }
        let history = env.record(nodes).await;
        Fleet {
            env,
            nodes,
            agents,
            history,
        }
    }

    /// [`assert_no_false_alarm`] over twice the TTL, then every agent still holds its lease:
    /// the leases are really kept alive, not just left over.
    async fn assert_calm(&self, controller: &Process, during: &str) {
        let window = Duration::from_secs(2 * TTL);
        assert_no_false_alarm(
            self.env,
            &self.history,
            controller,
            self.nodes,
            window,
            during,
        )
        .await;
        for agent in &self.agents {
            assert!(lease_held(agent), "{}", agent.process.output_text());
        }
    }

    /// Puts `interval` in the config key of the fleet's node `i`, then waits for its agent to
    /// apply it (its log from line `mark` on, `within` counted from `since`, when the fault
    /// began) and for the controller to report it (`within` again).
    async fn push_config(
        &self,
        client: &etcd_client::Client,
        i: usize,
        mark: usize,
        interval: u32,
        since: Instant,
        within: Duration,
    ) {
        let node = self.nodes[i];
        put_config(client, node, config_json(interval)).await;
        let taken = since.elapsed();
        wait_config_applied(&self.agents[i], mark, interval, since, within);
        wait_interval(self.env, node, interval, within).await;
        println!(
            "{node}: etcd took the config {taken:?} after the fault, reported {:?} after",
            since.elapsed()
        );
    }
}

/// Waits until `node`'s status says its agent runs `interval`.
async fn wait_interval(env: &TestEnv, node: &str, interval: u32, within: Duration) {
    env.wait_status(
        node,
        &format!("reporting interval {interval}"),
        within,
        |s| s.config.as_ref().is_some_and(|c| c.interval == interval),
    )
    .await;
}

/// A heartbeat value as an agent writes it, for nodes played by the test itself.
fn fake_heartbeat(node: &str) -> String {
    serde_json::json!({
        "node": node, "agentVersion": "test", "state": "Running",
        "startedAt": "2026-11-22T05:00:00Z", "updatedAt": "2026-11-22T05:00:00Z",
        "ttlSeconds": 60, "config": {"revision": 0, "interval": 10, "metrics": ["cpu"]},
    })
    .to_string()
}

/// Waits, with `within` counted from `since`, for the agent's log to say it applied `interval`.
fn wait_config_applied(
    agent: &Daemon,
    from_line: usize,
    interval: u32,
    since: Instant,
    within: Duration,
) {
    let left = within.saturating_sub(since.elapsed());
    agent
        .process
        .wait_for_line_from(from_line, left, &format!("config -> {interval}s"), |l| {
            l.contains("config updated:") && l.contains(&format!("-> {interval}s"))
        });
}

/// The agent holds its lease (`/readyz` is 200 exactly then).
fn lease_held(agent: &Daemon) -> bool {
    http_get(&agent.http, "/readyz").is_some_and(|(code, _)| code == 200)
}

/// The controller's log from line `mark` on says its heartbeat watch broke.
fn assert_watch_interrupted(controller: &Process, mark: usize) {
    assert!(
        controller.lines()[mark..]
            .iter()
            .any(|l| l.text.contains("heartbeat watch interrupted")),
        "the controller should have noticed the outage:\n{}",
        controller.output_text()
    );
}

/// Keeps watching for `window` (the recorder runs meanwhile), then checks that no node went
/// Dead, no Dead Event (HeartbeatExpired, AgentStopped) was raised and the controller never
/// logged a Dead transition.
async fn assert_no_false_alarm(
    env: &TestEnv,
    history: &History,
    controller: &Process,
    nodes: &[&str],
    window: Duration,
    during: &str,
) {
    // Watching is the point here: a lease not kept alive would expire within this window.
    tokio::time::sleep(window).await;
    history.assert_never_dead(during);
    for node in nodes {
        assert_eq!(
            env.dead_events(node).await,
            0,
            "Dead Event on {node} during {during}"
        );
        let log = controller.output_text();
        assert!(
            !log.contains(&format!("Node {node} Dead")),
            "the controller marked {node} Dead during {during}:\n{log}"
        );
    }
}

/// etcd (one member) SIGKILLed and restarted after twice the TTL (longer than the TTL is what
/// matters; 2×TTL keeps the suite fast): etcd keeps the leases and
/// resets their TTL, so nothing turns Dead; heartbeats, the agents' config watches and the
/// controller's heartbeat watch resume by themselves within 5 s of the return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_restart_longer_than_the_ttl_raises_no_false_alarm() {
    let (env, mut etcd) = TestEnv::start_shared().await;
    let nodes = ["restart-1", "restart-2"];
    let controller = controller(&env, "faults-restart");
    let fleet = Fleet::start(&env, &nodes).await;
    let marks: Vec<usize> = fleet
        .agents
        .iter()
        .map(|a| a.process.line_count())
        .collect();
    let controller_mark = controller.line_count();

    tokio::task::block_in_place(|| etcd.kill());
    // The outage itself: etcd stays down this long, on purpose.
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    tokio::task::block_in_place(|| etcd.restart());
    let back = Instant::now();
    println!("etcd back");

    // A config change right after the return reaches the agent (its watch resumed).
    let client = etcd.client().await;
    let rev = put_config(&client, "restart-1", config_json(2)).await;
    let within = Duration::from_secs(5);
    for (agent, mark) in fleet.agents.iter().zip(&marks) {
        let left = within.saturating_sub(back.elapsed());
        agent
            .process
            .wait_for_line_from(*mark, left, "heartbeat resumed", |l| {
                l.contains("heartbeat resumed: lease")
            });
    }
    println!(
        "heartbeats resumed {:?} after etcd's return",
        back.elapsed()
    );
    wait_config_applied(&fleet.agents[0], marks[0], 2, back, within);
    println!(
        "config (revision {rev}) applied {:?} after etcd's return",
        back.elapsed()
    );
    // The controller's heartbeat watch is back: it saw the heartbeat that reports the new
    // config. The agent writes it at most 500 ms after applying, the controller at once.
    wait_interval(
        &env,
        "restart-1",
        2,
        within + Duration::from_secs(2) - back.elapsed().min(within),
    )
    .await;
    println!("controller saw it {:?} after etcd's return", back.elapsed());
    assert_watch_interrupted(&controller, controller_mark);

    // Past the reset TTL: the leases are really kept alive, not just left over.
    fleet.assert_calm(&controller, "the etcd restart").await;
    // Away longer than the TTL, the controller could not vouch for the nodes (Unknown); back,
    // they are Alive again, never Dead.
    let states = [NodeState::Alive, NodeState::Unknown, NodeState::Alive];
    fleet
        .history
        .assert_states("restart-1", &states.map(Some))
        .await;
}

/// Three etcd members: SIGKILL the leader, then lose quorum for less than the TTL. Agents and
/// controller know all three endpoints and carry on through the others; nothing turns Dead; a
/// config change made during the election, and one after the quorum is back, both arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_cluster_leader_loss_and_quorum_loss_raise_no_false_alarm() {
    let mut cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .expect("start the etcd cluster");
    let env = TestEnv::shared(&cluster.endpoints_flag()).await;
    let nodes = ["cluster-1", "cluster-2"];
    let controller = controller(&env, "faults-cluster");
    let fleet = Fleet::start(&env, &nodes).await;
    let client = cluster.client().await;

    // SIGKILL the leader; a config change made during the election still arrives.
    let leader = tokio::task::block_in_place(|| cluster.wait_leader(Duration::from_secs(10)));
    let mark = fleet.agents[0].process.line_count();
    tokio::task::block_in_place(|| cluster.kill(leader));
    let killed = Instant::now();
    fleet
        .push_config(&client, 0, mark, 2, killed, Duration::from_secs(15))
        .await;
    fleet.assert_calm(&controller, "the leader's loss").await;
    tokio::task::block_in_place(|| {
        cluster.restart(leader);
        cluster.wait_healthy(Duration::from_secs(30));
    });

    // Lose quorum (two members down) for less than the TTL, then bring them back.
    let leader = tokio::task::block_in_place(|| cluster.wait_leader(Duration::from_secs(10)));
    let other = (leader + 1) % 3;
    let mark = fleet.agents[1].process.line_count();
    tokio::task::block_in_place(|| {
        cluster.kill(leader);
        cluster.kill(other);
    });
    // The outage itself: shorter than the TTL, on purpose.
    tokio::time::sleep(Duration::from_secs(TTL / 2)).await;
    tokio::task::block_in_place(|| {
        cluster.restart(leader);
        cluster.restart(other);
        cluster.wait_healthy(Duration::from_secs(30));
    });
    let back = Instant::now();
    fleet
        .push_config(&client, 1, mark, 3, back, Duration::from_secs(10))
        .await;
    fleet.assert_calm(&controller, "the quorum loss").await;
}

/// Two controller replicas: SIGKILL the leader while the other waits. The other takes the Lease
/// over, and a node that dies during the takeover is marked Dead exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_crash_standby_takes_over_and_marks_a_death_once() {
    let (env, _etcd) = TestEnv::start_shared().await;
    // A short Lease so that the takeover takes seconds (the default is 30 s).
    let election = [
        "--leader-election-lease-duration",
        "5s",
        "--leader-election-renew-grace",
        "2s",
    ];
    let mut a = controller_with(&env, "crash-a", &election);
    a.wait_for_line(Duration::from_secs(30), "crash-a leads", |l| {
        l.contains("became leader")
    });
    let b = controller_with(&env, "crash-b", &election);
    b.wait_for_line(Duration::from_secs(30), "crash-b waits", |l| {
        l.contains("waiting to lead")
    });
    let nodes = ["crash-1", "crash-2"];
    let mut fleet = Fleet::start(&env, &nodes).await;
    assert!(
        !b.output_text().contains("became leader"),
        "{}",
        b.output_text()
    );

    // The leader crashes; crash-1's agent dies right after, during the takeover.
    a.kill_hard();
    let crashed = Instant::now();
    fleet.agents[0].process.kill_hard();
    b.wait_for_line(Duration::from_secs(30), "crash-b takes over", |l| {
        l.contains("became leader")
    });
    println!("crash-b leads {:?} after the crash", crashed.elapsed());
    let dead = env
        .wait_state("crash-1", NodeState::Dead, Duration::from_secs(30))
        .await;
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    println!("crash-1 Dead {:?} after the crash", crashed.elapsed());
    eventually(
        "one HeartbeatExpired Event on crash-1",
        Duration::from_secs(10),
        || async { (env.event_count("crash-1", "HeartbeatExpired").await >= 1).then_some(()) },
    )
    .await;
    b.wait_for_line(Duration::from_secs(10), "crash-b's full reconcile", |l| {
        l.contains("reconciled every MonitorNode")
    });
    // Another TTL of watching: a second Dead or Event would show up by now.
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    assert_eq!(env.event_count("crash-1", "HeartbeatExpired").await, 1);
    let lines: Vec<_> = b
        .lines()
        .into_iter()
        .filter(|l| l.text.contains("Node crash-1 Dead"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    fleet
        .history
        .assert_states("crash-1", &[Some(NodeState::Alive), Some(NodeState::Dead)])
        .await;
    // The survivor was left alone.
    fleet
        .history
        .assert_states("crash-2", &[Some(NodeState::Alive)])
        .await;
    assert_eq!(env.event_count("crash-2", "HeartbeatExpired").await, 0);
    drop(fleet);
}

/// An agent cut off from etcd (SIGSTOP) for longer than the TTL: Dead after the TTL; SIGCONT ->
/// Alive within 2 s, on a new lease, and one heartbeat key on one lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_cut_off_longer_than_the_ttl_is_dead_then_alive_on_a_new_lease() {
    let (env, etcd) = TestEnv::start_shared().await;
    let node = "frozen-1";
    let _controller = controller(&env, "faults-frozen");
    let agent = agent(&env, node);
    env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
        .await;
    let mut client = etcd.client().await;
    let old_lease = client
        .get(heartbeat_key(node), None)
        .await
        .expect("get heartbeat")
        .kvs()
        .first()
        .expect("heartbeat key")
        .lease();

    agent.process.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let dead = env
        .wait_state(node, NodeState::Dead, Duration::from_secs(TTL + 10))
        .await;
    let after = stopped.elapsed();
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    // Dead only once the lease ran out: at least the TTL minus the last keep-alive's period
    // (the agent's TTL/3, in milliseconds: 1.33 s at TTL 4, not a whole second).
    assert!(
        after >= Duration::from_millis(TTL * 1000 - TTL * 1000 / 3),
        "Dead {after:?} after SIGSTOP"
    );
    println!("Dead {after:?} after SIGSTOP");

    let mark = agent.process.line_count();
    agent.process.signal(Signal::SIGCONT);
    let resumed = Instant::now();
    env.wait_state(node, NodeState::Alive, Duration::from_secs(2))
        .await;
    println!("Alive {:?} after SIGCONT", resumed.elapsed());
    agent
        .process
        .wait_for_line_from(mark, Duration::from_secs(5), "a new lease", |l| {
            l.contains("heartbeat lease lost; granted a new one")
        });

    let every_key = Some(etcd_client::GetOptions::new().with_prefix());
    let heartbeats = client
        .get(HEARTBEAT_PREFIX, every_key)
        .await
        .expect("list heartbeats");
    let keys: Vec<(String, i64)> = heartbeats
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (key, new_lease) = keys[0].clone();
    assert_eq!(key, heartbeat_key(node));
    assert_ne!(new_lease, old_lease, "the heartbeat must be on a new lease");
    let leases = client.leases().await.expect("list leases");
    let ids: Vec<i64> = leases.leases().iter().map(|l| l.id()).collect();
    assert_eq!(ids, vec![new_lease], "one live lease, the new one");
    let ttl = client
        .lease_time_to_live(
            new_lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await
        .expect("lease ttl");
    assert_eq!(ttl.keys(), [heartbeat_key(node).into_bytes()]);
}

/// Watch compaction: the agent and the controller are frozen (SIGSTOP) while etcd restarts (so
/// their watches break), changes are made and etcd is compacted at its latest revision; on
/// SIGCONT their watches cannot resume from the revision they had, so they must re-list, and
/// end up right: the agent on the latest config, the MonitorNodes matching the heartbeat keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_compaction_while_away_both_relist_and_end_up_right() {
    let (env, mut etcd) = TestEnv::start_shared().await;
    let node = "compact-1";
    let controller = controller(&env, "faults-compact");
    let agent = agent(&env, node);
    let mut client = etcd.client().await;
    let lease = client.lease_grant(60, None).await.expect("lease").id();
    let on_lease = Some(etcd_client::PutOptions::new().with_lease(lease));
    client
        .put(
            heartbeat_key("compact-gone"),
            fake_heartbeat("compact-gone"),
            on_lease.clone(),
        )
        .await
        .expect("put heartbeat");
    for n in [node, "compact-gone"] {
        env.wait_state(n, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    put_config(&client, node, config_json(5)).await;
    wait_interval(&env, node, 5, Duration::from_secs(15)).await;
    let history = env.record(&[node]).await;
    let (agent_mark, controller_mark) = (agent.process.line_count(), controller.line_count());

    // Away: both frozen, etcd restarted under them, changes they do not see, then compaction.
    agent.process.signal(Signal::SIGSTOP);
    controller.signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    tokio::task::block_in_place(|| etcd.restart());
    let mut client = etcd.client().await;
    put_config(&client, node, config_json(2)).await;
    put_config(&client, node, config_json(3)).await;
    client
        .lease_revoke(lease)
        .await
        .expect("revoke compact-gone's lease");
    let lease = client.lease_grant(60, None).await.expect("lease").id();
    let put = client
        .put(
            heartbeat_key("compact-new"),
            fake_heartbeat("compact-new"),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put heartbeat");
    let latest = put.header().expect("header").revision();
    let out = etcd.etcdctl(&["compact", &latest.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.process.signal(Signal::SIGCONT);
    controller.signal(Signal::SIGCONT);
    // The agent's lease survives: etcd reset its TTL when it restarted, and it is back within it.
    assert!(
        frozen.elapsed() < Duration::from_secs(TTL),
        "frozen for {:?}, longer than the TTL",
        frozen.elapsed()
    );

    // The agent found its revision compacted, read the key again and runs the latest config.
    agent.process.wait_for_line_from(
        agent_mark,
        Duration::from_secs(15),
        "the agent's config watch compacted",
        |l| l.contains("config watch: revision") && l.contains("was compacted"),
    );
    wait_config_applied(
        &agent,
        agent_mark,
        3,
        Instant::now(),
        Duration::from_secs(10),
    );
    wait_interval(&env, node, 3, Duration::from_secs(15)).await;
    // The controller re-listed and now matches the keys: one gone, one new, the agent's alive.
    let gone = env
        .wait_state("compact-gone", NodeState::Dead, Duration::from_secs(15))
        .await;
    println!("compact-gone: {:?}", gone.reason);
    env.wait_state("compact-new", NodeState::Alive, Duration::from_secs(15))
        .await;
    assert_watch_interrupted(&controller, controller_mark);
    assert_eq!(env.event_count("compact-gone", "HeartbeatExpired").await, 1);
    assert_no_false_alarm(
        &env,
        &history,
        &controller,
        &[node],
        Duration::from_secs(TTL),
        "the compaction",
    )
    .await;
    let intervals: Vec<Option<u32>> = history
        .all()
        .iter()
        .filter(|o| o.node == node && o.state.is_some())
        .map(|o| o.interval)
        .collect();
    assert_eq!(intervals.last(), Some(&Some(3)), "{:?}", history.all());
    let reasons: BTreeMap<String, Option<String>> = history
        .all()
        .into_iter()
        .map(|o| (o.node, o.reason))
        .collect();
    println!("last reasons: {reasons:?}");
}

/// Each member's id, by index, from `etcdctl member list` (`move-leader` wants the hex id).
fn member_ids(cluster: &EtcdCluster) -> Vec<u64> {
    let out = cluster.etcdctl(&["member", "list", "-w", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("member list JSON");
    cluster
        .endpoints()
        .iter()
        .map(|endpoint| {
            list["members"]
                .as_array()
                .expect("members")
                .iter()
                .find(|m| {
                    m["clientURLs"]
                        .as_array()
                        .is_some_and(|urls| urls.iter().any(|u| u.as_str() == Some(endpoint)))
                })
                .and_then(|m| m["ID"].as_u64())
                .unwrap_or_else(|| panic!("no member serves {endpoint}: {list}"))
        })
        .collect()
}

/// Three etcd members whose leader moves every TTL/2 (`etcdctl move-leader`), one agent frozen
/// (SIGSTOP): each new leader resets every lease to its full TTL, so the frozen agent's key
/// stays, and the key alone no longer proves life. The frozen node is never Alive past TTL + 2 s
/// after the freeze and is Unknown by then; once the leader stays put, its lease runs out and it
/// is Dead. The agent that kept running is never Dead, and Alive once the leader settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_leader_moving_faster_than_the_ttl_makes_a_frozen_node_unknown_then_dead() {
    let cluster = tokio::task::spawn_blocking(|| EtcdCluster::start(3))
        .await
        .expect("start the etcd cluster");
    let env = TestEnv::shared(&cluster.endpoints_flag()).await;
    let nodes = ["churn-frozen", "churn-live"];
    let controller = controller(&env, "faults-churn");
    let fleet = Fleet::start(&env, &nodes).await;
    let ids = member_ids(&cluster);
    let client = cluster.client().await;
    let frozen_node = nodes[0];
    let move_leader = || {
        let leader = cluster.wait_leader(Duration::from_secs(10));
        let target = format!("{:x}", ids[(leader + 1) % ids.len()]);
        let out = cluster.etcdctl(&["move-leader", &target]);
        assert!(
            out.status.success(),
            "move-leader: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // One election with every agent running: their keep-alives show within the TTL, no node
    // is ever anything but Alive.
    let mark = controller.line_count();
    tokio::task::block_in_place(move_leader);
    tokio::task::block_in_place(|| {
        controller.wait_for_line_from(
            mark,
            Duration::from_secs(5),
            "the leader change seen",
            |l| l.contains("etcd's leader changed"),
        )
    });
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    for node in nodes {
        fleet
            .history
            .assert_states(node, &[Some(NodeState::Alive)])
            .await;
    }

    fleet.agents[0].process.signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    let churn = Duration::from_secs(5 * TTL);
    let limit = Duration::from_secs(TTL + 2);
    let mut moves = 0;
    let mut unknown_after = None;
    let mut next_move = Instant::now();
    while frozen.elapsed() < churn {
        if Instant::now() >= next_move {
            tokio::task::block_in_place(move_leader);
            moves += 1;
            next_move += Duration::from_millis(TTL * 1000 / 2);
        }
        let state = env.status(frozen_node).await.and_then(|s| s.state);
        let at = frozen.elapsed();
        if at > limit {
            assert_ne!(
                state,
                Some(NodeState::Alive),
                "{frozen_node} still Alive {at:?} after SIGSTOP, with the leader moved {moves} times:\n{}",
                controller.output_text()
            );
        }
        if state == Some(NodeState::Unknown) && unknown_after.is_none() {
            unknown_after = Some(at);
            println!("{frozen_node} Unknown {at:?} after SIGSTOP");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The fault is real: the frozen agent's key outlived its TTL many times over.
    assert!(
        testkit::heartbeat(&client, frozen_node).await.is_some(),
        "the frozen agent's key expired during the churn: the leader moves did not reset its lease"
    );
    let unknown_after = unknown_after.expect("the frozen node went Unknown");
    assert!(
        unknown_after <= limit,
        "Unknown only {unknown_after:?} after SIGSTOP"
    );
    let status = env.status(frozen_node).await.expect("status");
    println!(
        "{frozen_node} after {moves} leader moves: {:?} ({:?})",
        status.state, status.reason
    );
    assert_eq!(status.reason.as_deref(), Some("LeaderChurn"));

    // The leader stays put: the lease runs out (TTL + etcd's election timeout), the node is Dead.
    let settled = Instant::now();
    let dead = env
        .wait_state(
            frozen_node,
            NodeState::Dead,
            Duration::from_secs(2 * TTL + 5),
        )
        .await;
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    println!(
        "{frozen_node} Dead {:?} after the last leader move",
        settled.elapsed()
    );
    env.wait_state(nodes[1], NodeState::Alive, Duration::from_secs(2 * TTL + 2))
        .await;
    fleet
        .history
        .assert_states(
            frozen_node,
            &[
                Some(NodeState::Alive),
                Some(NodeState::Unknown),
                Some(NodeState::Dead),
            ],
        )
        .await;
    let live = fleet.history.states(nodes[1]);
    println!("{} went through {live:?}", nodes[1]);
    assert!(!live.contains(&Some(NodeState::Dead)), "{live:?}");
    drop(fleet);
}
