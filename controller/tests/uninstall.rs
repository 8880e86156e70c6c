//! `nodepulse-controller --on-uninstall` (the chart's pre-delete hook) against a real
//! kube-apiserver, a real etcd, a real agent and a real controller: it scales the controller's
//! Deployment to zero, waits while a replica still holds the leader Lease (the node stays Alive
//! meanwhile), then marks the MonitorNode Unknown (ControllerRemoved) and removes the Node's
//! NodePulseHeartbeat condition; a controller started again turns it back to Alive from the
//! agent's heartbeat.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::NodeState;
use testkit::{KubeApiserver, TestEnv, alive_condition, eventually, wait_until};

const DEPLOYMENT: &str = "nodepulse-controller";

/// How long a MonitorNode may take to reach a state.
const DEADLINE: Duration = Duration::from_secs(30);

/// The status of `node`'s NodePulseHeartbeat condition, if it has one.
async fn node_condition(env: &TestEnv, node: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(env.kube.clone());
    let node = nodes.get(node).await.expect("get Node");
    node.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == "NodePulseHeartbeat")
        .map(|c| c.status)
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
    let (env, _etcd) = TestEnv::start().await;
    let api = env.api();
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
    env.apply(&deployment.to_string());

    env.node("gone-1", &[]);
    let _agent = env.agent("gone-1").ttl(3).start();
    let mut running = env
        .controller("controller-0")
        .args(["--node-condition"])
        .spawn();
    env.wait_state("gone-1", NodeState::Alive, DEADLINE).await;
    eventually("the Node condition", DEADLINE, || async {
        node_condition(&env, "gone-1").await.filter(|s| s == "True")
    })
    .await;

    let mut hook = env
        .controller("hook")
        .args([
            "--on-uninstall",
            "--deployment-name",
            DEPLOYMENT,
            "--remove-node-condition",
        ])
        .spawn();
    wait_until(
        "the hook scales the Deployment to zero",
        Duration::from_secs(30),
        || replicas(api) == "0",
    );
    // The leader still holds the Lease: the hook waits, and the node is still what it was.
    assert!(hook.is_running(), "{}", hook.output_text());
    assert_eq!(
        env.status("gone-1").await.and_then(|s| s.state),
        Some(NodeState::Alive)
    );
    assert_eq!(
        node_condition(&env, "gone-1").await.as_deref(),
        Some("True")
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
    let s = env.status("gone-1").await.expect("status");
    assert_eq!(s.state, Some(NodeState::Unknown), "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("ControllerRemoved"));
    let message = s.message.as_deref().unwrap_or_default();
    assert!(message.contains("it was Alive"), "{message}");
    let alive = alive_condition(&s);
    assert_eq!(alive.status, "Unknown");
    assert!(
        hook.output_text().contains("marked 1 MonitorNodes Unknown"),
        "{}",
        hook.output_text()
    );

    // ...and only then took the Node condition away: nothing would update it either.
    assert_eq!(node_condition(&env, "gone-1").await, None);

    // Reinstalled: the new controller sees the agent's heartbeat and says Alive again.
    let _again = env.controller("controller-0").spawn();
    env.wait_state("gone-1", NodeState::Alive, DEADLINE).await;
}
