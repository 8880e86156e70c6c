//! Every Node has a MonitorNode: one whose agent never started is listed `Unknown`
//! (`NoHeartbeat`), turns `Alive` when an agent comes, and stays `Unknown`, never `Dead`, across a
//! controller restart.

use std::time::Duration;

use kube::api::Api;
use nodepulse_crd::v1alpha1::{MonitorNode, NodeState};
use testkit::{Process, TestEnv};

fn controller(env: &TestEnv) -> Process {
    env.controller("controller")
        .args(["--leader-elect=false"])
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_an_agent_is_listed_unknown_until_one_comes() {
    let (env, _etcd) = TestEnv::start().await;
    for node in ["quiet-1", "quiet-2"] {
        env.node(node, &[]);
    }
    let mut ctl = controller(&env);
    let monitor_nodes: Api<MonitorNode> = Api::all(env.kube.clone());
    for node in ["quiet-1", "quiet-2"] {
        let within = Duration::from_secs(20);
        let s = env
            .wait_status(node, "Unknown NoHeartbeat", within, |s| {
                s.state == Some(NodeState::Unknown) && s.reason.as_deref() == Some("NoHeartbeat")
            })
            .await;
        assert!(s.last_heartbeat_time.is_none(), "{s:?}");
    }
    let mn = monitor_nodes.get("quiet-1").await.expect("MonitorNode");
    let owner = mn.metadata.owner_references.unwrap_or_default();
    assert!(
        owner
            .iter()
            .any(|o| o.kind == "Node" && o.name == "quiet-1"),
        "owned by its Node, so it goes with it: {owner:?}"
    );

    // A restart lists the heartbeats again: still no key, still Unknown, not Dead.
    ctl.kill_hard();
    let ctl = controller(&env);
    ctl.wait_for_line(Duration::from_secs(30), "reconciled", |l| {
        l.contains("reconciled every MonitorNode")
    });
    let _agent = env.agent("quiet-1").ttl(3).start();
    env.wait_state("quiet-1", NodeState::Alive, Duration::from_secs(20))
        .await;
    let quiet2 = monitor_nodes
        .get("quiet-2")
        .await
        .expect("MonitorNode")
        .status
        .expect("status");
    assert_eq!(
        (quiet2.state, quiet2.reason.as_deref()),
        (Some(NodeState::Unknown), Some("NoHeartbeat")),
        "{}",
        ctl.output_text()
    );
    assert!(
        !ctl.output_text().contains("Dead"),
        "no Dead across the restart:\n{}",
        ctl.output_text()
    );
}
