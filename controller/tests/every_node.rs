//! Every Node has a MonitorNode: one whose agent never started is listed `Unknown`
//! (`NoHeartbeat`), turns `Alive` when an agent comes, and stays `Unknown`, never `Dead`, across a
//! controller restart.

use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus, NodeState};
use testkit::{Process, eventually, project_bin};

fn controller(kubeconfig: &std::path::Path, etcd: &str) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodepulse-controller"));
    cmd.env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .args(["--etcd-endpoints", etcd])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--leader-elect=false"]);
    Process::spawn("controller", cmd)
}

async fn wait_status(
    api: &Api<MonitorNode>,
    node: &str,
    what: &str,
    ok: impl Fn(&MonitorNodeStatus) -> bool,
) -> MonitorNodeStatus {
    eventually(what, Duration::from_secs(20), || async {
        let status = api.get_opt(node).await.ok().flatten()?.status?;
        ok(&status).then_some(status)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_an_agent_is_listed_unknown_until_one_comes() {
    let (api, etcd) = testkit::start_apiserver_and_etcd().await;
    for node in ["quiet-1", "quiet-2"] {
        let out = api.kubectl_stdin(
            &["apply", "-f", "-"],
            &format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n"),
        );
        assert!(out.status.success(), "{out:?}");
    }
    let mut ctl = controller(&api.kubeconfig, &etcd.endpoint);
    let monitor_nodes: Api<MonitorNode> = Api::all(api.client().await);
    for node in ["quiet-1", "quiet-2"] {
        let s = wait_status(&monitor_nodes, node, "Unknown NoHeartbeat", |s| {
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
    let ctl = controller(&api.kubeconfig, &etcd.endpoint);
    ctl.wait_for_line(Duration::from_secs(30), "reconciled", |l| {
        l.contains("reconciled every MonitorNode")
    });
    let mut agent_cmd = Command::new(project_bin("nodepulse-agent"));
    agent_cmd
        .env("RUST_LOG", "info")
        .args(["--node-name", "quiet-1"])
        .args(["--heartbeat-ttl", "3"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &etcd.endpoint]);
    let _agent = Process::spawn("quiet-1", agent_cmd);
    wait_status(
        &monitor_nodes,
        "quiet-1",
        "Alive once an agent comes",
        |s| s.state == Some(NodeState::Alive),
    )
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
