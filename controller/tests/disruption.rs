//! A mass disruption is not a mass death: ten real agents, most of them cut off from etcd at
//! once (SIGSTOP: their leases run out as a rack switch's failure would make them), are
//! Unknown (MassDisruption), with one Event for the disruption, and never Dead; one of ten cut
//! off is Dead.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::NodeState;
use testkit::{Daemon, TestEnv, eventually};

/// Heartbeat TTL of every agent here, in seconds.
const TTL: u64 = 3;

/// The fleet.
const NODES: usize = 10;

/// Ten agents and a controller, every node Alive.
async fn fleet(
    prefix: &str,
) -> (
    TestEnv,
    testkit::Etcd,
    testkit::Process,
    Vec<Daemon>,
    Vec<String>,
) {
    let (env, etcd) = TestEnv::start().await;
    let controller = env
        .controller(&format!("{prefix}controller"))
        .args(["--leader-elect=false"])
        .spawn();
    let names: Vec<String> = (0..NODES).map(|i| format!("{prefix}{i}")).collect();
    let agents: Vec<Daemon> = names
        .iter()
        .map(|n| env.agent(n).ttl(TTL).start())
        .collect();
    for node in &names {
        env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    (env, etcd, controller, agents, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn six_of_ten_cut_off_at_once_are_unknown_never_dead() {
    let (env, _etcd, controller, agents, names) = fleet("rack-").await;
    let nodes: Vec<&str> = names.iter().map(String::as_str).collect();
    let history = env.record(&nodes).await;

    let cut: Vec<&Daemon> = agents.iter().take(6).collect();
    for agent in &cut {
        agent.process.signal(Signal::SIGSTOP);
    }
    let stopped = Instant::now();
    for node in &nodes[..6] {
        let status = env
            .wait_state(node, NodeState::Unknown, Duration::from_secs(TTL + 2))
            .await;
        assert_eq!(
            status.reason.as_deref(),
            Some("MassDisruption"),
            "{node}: {status:?}"
        );
    }
    println!("all 6 Unknown {:?} after SIGSTOP", stopped.elapsed());
    controller.wait_for_line(Duration::from_secs(5), "the disruption logged", |l| {
        l.contains("mass disruption: 6 of 10 live nodes")
    });
    // A few TTLs on, still no Dead: neither for the six nor for the four that live on.
    tokio::time::sleep(Duration::from_secs(2 * TTL)).await;
    history.assert_never_dead("six of ten cut off");
    for node in &nodes[6..] {
        assert_eq!(
            env.status(node).await.and_then(|s| s.state),
            Some(NodeState::Alive),
            "{node}"
        );
    }

    // One Event for the disruption, naming the nodes, and none per node.
    let events = eventually(
        "the disruption's Event",
        Duration::from_secs(15),
        || async {
            let mut n = 0;
            for node in &nodes {
                n += env.event_count(node, "MassDisruption").await;
            }
            (n > 0).then_some(n)
        },
    )
    .await;
    assert_eq!(events, 1, "one Event for the whole disruption");
    for node in &nodes[..6] {
        assert_eq!(
            env.event_count(node, "NodeStatusUnknown").await,
            0,
            "{node}"
        );
    }

    // Back on the network: Alive, on new leases.
    for agent in &cut {
        agent.process.signal(Signal::SIGCONT);
    }
    for node in &nodes[..6] {
        env.wait_state(node, NodeState::Alive, Duration::from_secs(10))
            .await;
    }
    history.assert_never_dead("six of ten cut off and back");
    history
        .assert_states(
            nodes[0],
            &[
                Some(NodeState::Alive),
                Some(NodeState::Unknown),
                Some(NodeState::Alive),
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_ten_cut_off_is_dead() {
    let (env, _etcd, _controller, agents, names) = fleet("single-").await;
    agents[3].process.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    let status = env
        .wait_state(&names[3], NodeState::Dead, Duration::from_secs(TTL + 2))
        .await;
    assert_eq!(status.reason.as_deref(), Some("HeartbeatExpired"));
    println!("Dead {:?} after SIGSTOP", stopped.elapsed());
    for node in names.iter().filter(|n| *n != &names[3]) {
        assert_eq!(
            env.status(node).await.and_then(|s| s.state),
            Some(NodeState::Alive),
            "{node}"
        );
    }
    agents[3].process.signal(Signal::SIGCONT);
}
