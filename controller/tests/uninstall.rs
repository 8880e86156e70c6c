//! `nodepulse-controller --on-uninstall` (the chart's pre-delete hook) against a real
//! kube-apiserver, a real etcd, a real agent and a real controller: it scales the controller's
//! Deployment to zero, waits while a replica still holds the leader Lease (the node stays Alive
//! meanwhile), then marks the MonitorNode Unknown (ControllerRemoved); a controller started
//! again turns it back to Alive from the agent's heartbeat.

use std::process::Command;
use std::time::Duration;

use kube::api::Api;
use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeStatus, NodeState};
use testkit::{Etcd, KubeApiserver, Process, eventually, project_bin, wait_until};

const DEPLOYMENT: &str = "nodepulse-controller";

fn controller(api: &KubeApiserver, etcd: &Etcd) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodepulse-controller"));
    cmd.env("KUBECONFIG", &api.kubeconfig)
        .env("RUST_LOG", "info")
        .args(["--etcd-endpoints", &etcd.endpoint])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--leader-election-namespace", "default"])
        .args(["--leader-election-identity", "controller-0"]);
    Process::spawn("controller", cmd)
}

async fn status(kube: &kube::Client, node: &str) -> Option<MonitorNodeStatus> {
    let api: Api<MonitorNode> = Api::all(kube.clone());
    api.get_opt(node).await.ok().flatten()?.status
}

async fn wait_state(kube: &kube::Client, node: &str, state: NodeState) -> MonitorNodeStatus {
    eventually(
        &format!("MonitorNode {node} {state:?}"),
        Duration::from_secs(30),
        || async { status(kube, node).await.filter(|s| s.state == Some(state)) },
    )
    .await
}

fn replicas(api: &KubeApiserver) -> String {
    api.kubectl_ok(&[
        "get",
        "deployment",
        DEPLOYMENT,
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.replicas}",
    ])
}

#[tokio::test]
async fn the_uninstall_hook_stops_the_controller_then_marks_the_nodes_unknown() {
    let (api, etcd) = testkit::start_apiserver_and_etcd().await;
    let kube = api.client().await;
    // The controller's Deployment as the chart makes it (no kubelet here runs its pods: the test
    // plays the Deployment controller and stops the replica itself).
    let deployment = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": "default"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "c"}},
            "template": {
                "metadata": {"labels": {"app": "c"}},
                "spec": {"containers": [{"name": "controller", "image": "nodepulse:0.1.0"}]}
            }
        }
    });
    let out = api.kubectl_stdin(&["apply", "-f", "-"], &deployment.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut agent_cmd = Command::new(project_bin("nodepulse-agent"));
    agent_cmd
        .env("RUST_LOG", "info")
        .args(["--node-name", "gone-1"])
        .args(["--heartbeat-ttl", "3"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(["--etcd-endpoints", &etcd.endpoint]);
    let _agent = Process::spawn("gone-1", agent_cmd);
    let mut running = controller(&api, &etcd);
    wait_state(&kube, "gone-1", NodeState::Alive).await;

    let mut hook_cmd = Command::new(env!("CARGO_BIN_EXE_nodepulse-controller"));
    hook_cmd
        .env("KUBECONFIG", &api.kubeconfig)
        .env("RUST_LOG", "info")
        .args(["--on-uninstall", "--deployment-name", DEPLOYMENT])
        .args(["--leader-election-namespace", "default"]);
    let mut hook = Process::spawn("hook", hook_cmd);
    wait_until(
        "the hook scales the Deployment to zero",
        Duration::from_secs(30),
        || replicas(&api) == "0",
    );
    // The leader still holds the Lease: the hook waits, and the node is still what it was.
    assert!(hook.is_running(), "{}", hook.output_text());
    assert_eq!(
        status(&kube, "gone-1").await.and_then(|s| s.state),
        Some(NodeState::Alive)
    );

    // What the Deployment controller does once replicas is 0: SIGTERM; the leader lets go.
    running.signal(Signal::SIGTERM);
    assert!(
        running
            .wait_exit(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "{}",
        running.output_text()
    );
    let exit = hook.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| s.success()),
        "hook: {exit:?}\n{}",
        hook.output_text()
    );
    let s = status(&kube, "gone-1").await.expect("status");
    assert_eq!(s.state, Some(NodeState::Unknown), "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("ControllerRemoved"));
    let message = s.message.unwrap_or_default();
    assert!(message.contains("it was Alive"), "{message}");
    let alive = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Alive")
        .expect("Alive condition");
    assert_eq!(alive.status, "Unknown");
    assert!(
        hook.output_text().contains("marked 1 MonitorNodes Unknown"),
        "{}",
        hook.output_text()
    );

    // Reinstalled: the new controller sees the agent's heartbeat and says Alive again.
    let _again = controller(&api, &etcd);
    wait_state(&kube, "gone-1", NodeState::Alive).await;
}
