//! The `NodePulseHeartbeat` condition on the Node objects (`--node-condition`, the chart's
//! `nodeCondition.enabled`) against a real kube-apiserver, real agents and a real controller:
//! it appears `True` for a live node, turns `False` within TTL + 2 s of the agent's SIGKILL,
//! leaves the kubelet's conditions alone, is written again after a restart when missing, and
//! `--remove-node-condition` takes exactly it away. The chart's RBAC is checked by impersonating
//! the controller's ServiceAccount: it may patch `nodes/status` with the value, and not without.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeCondition};
use kube::api::{Api, Patch, PatchParams};
use nodepulse_controller::status::node_condition;
use nodepulse_crd::v1alpha1::NodeState;
use testkit::{KubeApiserver, Launch, TestEnv, eventually, repo_root};

const CONDITION: &str = "NodePulseHeartbeat";

/// The agents' heartbeat TTL, in seconds.
const TTL: u64 = 3;

/// How long a first status may take to appear.
const DEADLINE: Duration = Duration::from_secs(30);

/// Conditions as a kubelet writes them, with fixed times, so any change shows.
fn kubelet_conditions() -> serde_json::Value {
    let at = "2026-12-01T10:00:00Z";
    serde_json::json!({"status": {"conditions": [
        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
         "message": "kubelet has sufficient memory available", "lastHeartbeatTime": at, "lastTransitionTime": at},
        {"type": "Ready", "status": "True", "reason": "KubeletReady",
         "message": "kubelet is posting ready status", "lastHeartbeatTime": at, "lastTransitionTime": at},
    ]}})
}

async fn conditions(nodes: &Api<Node>, name: &str) -> Vec<NodeCondition> {
    nodes
        .get(name)
        .await
        .expect("get Node")
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
}

async fn ours(nodes: &Api<Node>, name: &str) -> Option<NodeCondition> {
    conditions(nodes, name)
        .await
        .into_iter()
        .find(|c| c.type_ == CONDITION)
}

async fn kubelets(nodes: &Api<Node>, name: &str) -> Vec<NodeCondition> {
    conditions(nodes, name)
        .await
        .into_iter()
        .filter(|c| c.type_ != CONDITION)
        .collect()
}

/// Waits until `name`'s condition has `status`, and returns it.
async fn wait_condition(
    nodes: &Api<Node>,
    name: &str,
    status: &str,
    within: Duration,
) -> NodeCondition {
    eventually(
        &format!("Node {name}: {CONDITION}={status}"),
        within,
        || async { ours(nodes, name).await.filter(|c| c.status == status) },
    )
    .await
}

#[tokio::test]
async fn the_node_condition_follows_the_heartbeat_and_leaves_the_kubelets_conditions_alone() {
    let (env, _etcd) = TestEnv::start().await;
    let nodes: Api<Node> = Api::all(env.kube.clone());
    for name in ["nc-live", "nc-dies", "nc-silent"] {
        env.node(name, &[]);
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Strategic(kubelet_conditions()),
            )
            .await
            .expect("the kubelet's conditions");
    }
    let kubelet_before = kubelets(&nodes, "nc-dies").await;
    assert_eq!(kubelet_before.len(), 2);

    let _live = env.agent("nc-live").ttl(TTL).start();
    let mut dies = env.agent("nc-dies").ttl(TTL).start();
    // No Node object of that name: a MonitorNode, and no condition anywhere, and no failure.
    let _ghost = env.agent("nc-ghost").ttl(TTL).start();
    let controller_cmd = env.controller("controller-0").args(["--node-condition"]);
    let mut controller = controller_cmd.spawn();

    let alive = wait_condition(&nodes, "nc-dies", "True", DEADLINE).await;
    assert_eq!(alive.reason.as_deref(), Some("HeartbeatSeen"), "{alive:?}");
    let status = env.status("nc-dies").await.expect("MonitorNode status");
    assert_eq!(alive.message, status.message);
    wait_condition(&nodes, "nc-live", "True", DEADLINE).await;
    // A Node whose agent never ran: Unknown, as its MonitorNode.
    let silent = wait_condition(&nodes, "nc-silent", "Unknown", DEADLINE).await;
    assert_eq!(silent.reason.as_deref(), Some("NoHeartbeat"), "{silent:?}");
    env.wait_state("nc-ghost", NodeState::Alive, DEADLINE).await;

    // A crash: the condition goes False within TTL + 2 s of the kill.
    dies.kill_hard();
    let killed = Instant::now();
    let dead = wait_condition(&nodes, "nc-dies", "False", Duration::from_secs(TTL + 2)).await;
    let took = killed.elapsed();
    println!("NodePulseHeartbeat False {took:?} after the SIGKILL (TTL {TTL}s)");
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"), "{dead:?}");
    assert!(
        dead.last_transition_time.as_ref().map(|t| t.0)
            > alive.last_transition_time.as_ref().map(|t| t.0),
        "lastTransitionTime moves with the status: {alive:?} -> {dead:?}"
    );
    // Our condition only: the kubelet's are exactly as it wrote them.
    assert_eq!(kubelets(&nodes, "nc-dies").await, kubelet_before);
    assert_eq!(kubelets(&nodes, "nc-live").await, kubelet_before);
    assert_eq!(
        ours(&nodes, "nc-live").await.map(|c| c.status).as_deref(),
        Some("True")
    );
    let log = controller.output_text();
    for line in log.lines().filter(|l| l.contains("nc-ghost")) {
        assert!(
            !line.contains("WARN") && !line.contains("ERROR"),
            "a missing Node is no failure: {line}"
        );
    }

    // The condition removed while no controller runs (as after `nodeCondition.enabled` is
    // turned on, or by hand): a restarted controller writes it again, though the MonitorNode,
    // Dead and unchanged, calls for no status write of its own.
    controller.kill_hard();
    let index = conditions(&nodes, "nc-dies")
        .await
        .iter()
        .position(|c| c.type_ == CONDITION)
        .expect("ours");
    env.api().kubectl_ok(&[
        "patch",
        "node",
        "nc-dies",
        "--subresource=status",
        "--type=json",
        "-p",
        &format!(r#"[{{"op": "remove", "path": "/status/conditions/{index}"}}]"#),
    ]);
    assert_eq!(ours(&nodes, "nc-dies").await, None);
    let mut controller = controller_cmd.spawn();
    let again = wait_condition(&nodes, "nc-dies", "False", DEADLINE).await;
    assert_eq!(again.reason.as_deref(), Some("HeartbeatExpired"));
    controller.kill_hard();

    // A removal from a Node read before another writer rewrote its conditions: the index read
    // then now holds one of the kubelet's, which the `test` op protects; it reads again.
    let stale = nodes.get("nc-live").await.expect("get Node");
    let shifted = {
        // Ours moved to the other end of the list, the kubelet's kept in their order.
        let mut all = conditions(&nodes, "nc-live").await;
        let at = all.iter().position(|c| c.type_ == CONDITION).expect("ours");
        let c = all.remove(at);
        match at {
            0 => all.push(c),
            _ => all.insert(0, c),
        }
        serde_json::json!([{"op": "replace", "path": "/status/conditions", "value": all}])
    };
    env.api().kubectl_ok(&[
        "patch",
        "node",
        "nc-live",
        "--subresource=status",
        "--type=json",
        "-p",
        &shifted.to_string(),
    ]);
    assert!(
        node_condition::remove_from(&nodes, stale)
            .await
            .expect("removed")
    );
    assert_eq!(ours(&nodes, "nc-live").await, None);
    assert_eq!(kubelets(&nodes, "nc-live").await, kubelet_before);

    // Removal (what the chart's hooks run): exactly our condition goes, everywhere.
    remove_node_condition(env.controller("removal"), 2);
    for name in ["nc-live", "nc-dies", "nc-silent"] {
        assert_eq!(ours(&nodes, name).await, None, "{name}");
        assert_eq!(kubelets(&nodes, name).await, kubelet_before, "{name}");
    }
}

/// Runs `controller --remove-node-condition` (what the chart's hooks run) to its successful end,
/// which must say it removed the condition from `nodes` Nodes.
fn remove_node_condition(controller: Launch, nodes: usize) {
    let mut removal = controller.args(["--remove-node-condition"]).spawn();
    let exit = removal.wait_exit(Duration::from_secs(30));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}: {}",
        removal.output_text()
    );
    let said = format!("removed the NodePulseHeartbeat condition from {nodes} Nodes");
    assert!(
        removal.output_text().contains(&said),
        "{}",
        removal.output_text()
    );
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The documents of a `helm --dry-run` output's `HOOKS:` section.
fn hooks(dry_run: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    let Some((_, after)) = dry_run.split_once("\nHOOKS:\n") else {
        return Vec::new();
    };
    let section = after.split("\nMANIFEST:\n").next().unwrap_or_default();
    serde_yaml::Deserializer::from_str(section)
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("hook YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The controller's own request (a strategic merge patch of `nodes/status`, no read first) to
/// Node `rbac-1`, made as `who` by impersonation.
async fn patch_status_as(server: &KubeApiserver, who: &str) -> Result<(), kube::Error> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&server.kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig to config");
    config.auth_info.impersonate = Some(who.to_string());
    let nodes: Api<Node> = Api::all(kube::Client::try_from(config).expect("kube client"));
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": CONDITION, "status": "True", "reason": "HeartbeatSeen", "message": "impersonated",
    }]}});
    nodes
        .patch_status("rbac-1", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn the_chart_lets_the_controller_patch_node_status_only_with_the_node_condition() {
    let server = KubeApiserver::start();
    let chart = repo_root().join("charts/nodepulse");
    let chart = chart.to_str().expect("utf-8 path");
    let node =
        serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "rbac-1"}});
    let out = server.kubectl_stdin(&["apply", "-f", "-"], &node.to_string());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let controller = "system:serviceaccount:nodepulse:nodepulse-controller";
    // `resource` or `resource/subresource` (kubectl's own `nodes/status` would name a Node).
    let can = |who: &str, verb: &str, resource: &str| -> String {
        let mut args = vec!["auth", "can-i", verb, "--as", who];
        match resource.split_once('/') {
            Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
            None => args.push(resource),
        }
        text(&server.kubectl(&args).stdout).trim().to_string()
    };
    server.helm_ok(&[
        "install",
        "nodepulse",
        chart,
        "--namespace",
        "default",
        "--set",
        "nodeCondition.enabled=true",
    ]);
    assert_eq!(can(controller, "patch", "nodes/status"), "yes");
    // That one verb on that one subresource: nothing else on Nodes.
    for (verb, resource) in [
        ("update", "nodes/status"),
        ("patch", "nodes"),
        ("update", "nodes"),
        ("delete", "nodes"),
    ] {
        assert_eq!(can(controller, verb, resource), "no", "{verb} {resource}");
    }
    patch_status_as(&server, controller)
        .await
        .expect("the controller's patch of nodes/status");

    // Turning it off: Helm, looking at the ClusterRole that still grants it, renders the
    // post-upgrade removal hook with RBAC of its own.
    // `helm upgrade` that turns the condition off, with one more flag.
    let turn_off = |flag: &str| {
        let set = ["--set", "nodeCondition.enabled=false", flag];
        let upgrade = ["upgrade", "nodepulse", chart, "--namespace", "default"];
        server.helm_ok(&[upgrade.as_slice(), &set].concat())
    };
    let dry_run = turn_off("--dry-run=server");
    let removal_hooks = hooks(&dry_run);
    let kinds: Vec<&str> = removal_hooks
        .iter()
        .filter(|h| {
            h["metadata"]["name"].as_str() == Some("nodepulse-controller-node-condition-removal")
        })
        .filter_map(|h| h["kind"].as_str())
        .collect();
    for kind in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job"] {
        assert!(
            kinds.contains(&kind),
            "no {kind} in the removal hook: {kinds:?}"
        );
    }
    let job = removal_hooks
        .iter()
        .find(|h| h["kind"].as_str() == Some("Job"))
        .expect("the Job");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"].as_str(),
        Some("post-upgrade")
    );
    let args = serde_yaml::to_string(&job["spec"]["template"]["spec"]["containers"][0]["args"])
        .expect("yaml");
    assert!(args.contains("--remove-node-condition"), "{args}");
    // The hook's RBAC allows the removal and nothing more.
    let rbac: Vec<String> = removal_hooks
        .iter()
        .filter(|h| h["kind"].as_str() != Some("Job"))
        .map(|h| serde_yaml::to_string(h).expect("yaml"))
        .collect();
    let out = server.kubectl_stdin(&["apply", "-f", "-"], &rbac.join("---\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let hook = "system:serviceaccount:nodepulse:nodepulse-controller-node-condition-removal";
    assert_eq!(can(hook, "patch", "nodes/status"), "yes");
    assert_eq!(can(hook, "list", "nodes"), "yes");
    for (verb, resource) in [("patch", "nodes"), ("delete", "nodes"), ("get", "secrets")] {
        assert_eq!(can(hook, verb, resource), "no", "hook {verb} {resource}");
    }
    // The hook's own command, run as the hook's ServiceAccount: that RBAC is all it needs.
    let as_hook = server.dir().join("kubeconfig-as-hook");
    let admin = std::fs::read_to_string(&server.kubeconfig).expect("read kubeconfig");
    let mut kubeconfig: serde_yaml::Value = serde_yaml::from_str(&admin).expect("kubeconfig");
    for user in kubeconfig["users"].as_sequence_mut().expect("users") {
        user["user"]["as"] = hook.into();
    }
    std::fs::write(&as_hook, serde_yaml::to_string(&kubeconfig).expect("yaml"))
        .expect("write kubeconfig");
    remove_node_condition(Launch::controller(&as_hook, "removal-hook"), 1);

    // Off (hooks skipped here: no kubelet runs Jobs in this env): the controller may not.
    turn_off("--no-hooks");
    assert_eq!(can(controller, "patch", "nodes/status"), "no");
    match patch_status_as(&server, controller).await {
        Err(kube::Error::Api(e)) if e.is_forbidden() => {}
        other => panic!("the controller's patch of nodes/status while off: {other:?}"),
    }
    // ...and once it no longer could, the next upgrade renders no removal hook.
    let again = server.helm_ok(&[
        "upgrade",
        "nodepulse",
        chart,
        "--namespace",
        "default",
        "--dry-run=server",
    ]);
    assert!(
        !again.contains("node-condition-removal"),
        "removal hook rendered though the feature was off already"
    );
}
