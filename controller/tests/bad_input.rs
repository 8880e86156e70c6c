//! Bad input end to end, with a real kube-apiserver, a real etcd, the real controller and a
//! real agent:
//! - invalid MonitorConfig specs are refused by the API server (schema and CEL rules);
//! - what only the controller can judge (a selector that matches nothing, nodeNames of nodes
//!   that do not exist) is reported in the MonitorConfig's Ready condition;
//! - garbage under `/monitor/heartbeat/`, and forged heartbeats (no lease, another node's value,
//!   another node's lease, a value whose TTL is not its lease's, a lease no agent grants), are
//!   logged, counted and never make a node Alive; the controller keeps serving the real agent's
//!   node (transitions still work afterwards);
//! - heartbeats for names with no Node make MonitorNodes only up to the cap
//!   (`--max-heartbeats-without-node`); beyond it they are logged, counted and make none.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use nodepulse_crd::v1alpha1::{MonitorConfig, MonitorNode, NodeState};
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, Heartbeat, heartbeat_key};
use serde_json::{Value, json};
use testkit::{TestEnv, eventually, http_get, ready_condition};

/// `kubectl apply` of one manifest: Ok(stdout) or Err(stderr).
fn apply(env: &TestEnv, manifest: &Value) -> Result<String, String> {
    let out = env
        .api()
        .kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string());
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The Ready condition (status, reason, message) of a MonitorConfig, once written.
async fn ready(env: &TestEnv, name: &str) -> Option<(String, String, String)> {
    ready_condition(&env.monitor_config(name).await?)
}

fn monitor_config(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorConfig",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// Invalid specs and a piece of the API server's answer for each.
fn invalid_specs() -> Vec<(&'static str, Value, &'static str)> {
    let expr = |op: &str, values: Option<Vec<&str>>| {
        let mut e = json!({"key": "pool", "operator": op});
        if let Some(v) = values {
            e["values"] = json!(v);
        }
        json!({"interval": 2, "metrics": ["cpu"], "nodeSelector": {"matchExpressions": [e]}})
    };
    vec![
        (
            "interval 0",
            json!({"interval": 0, "metrics": ["cpu"]}),
            "spec.interval",
        ),
        (
            "interval 3601",
            json!({"interval": 3601, "metrics": ["cpu"]}),
            "spec.interval",
        ),
        (
            "interval -1",
            json!({"interval": -1, "metrics": ["cpu"]}),
            "spec.interval",
        ),
        (
            "interval as a string",
            json!({"interval": "2", "metrics": ["cpu"]}),
            "spec.interval",
        ),
        (
            "interval a fraction",
            json!({"interval": 2.5, "metrics": ["cpu"]}),
            "spec.interval",
        ),
        (
            "interval missing",
            json!({"metrics": ["cpu"]}),
            "spec.interval",
        ),
        ("metrics missing", json!({"interval": 2}), "spec.metrics"),
        (
            "metrics empty",
            json!({"interval": 2, "metrics": []}),
            "spec.metrics",
        ),
        (
            "unknown metric",
            json!({"interval": 2, "metrics": ["gpu"]}),
            "Unsupported value: \"gpu\"",
        ),
        (
            "duplicate metric",
            json!({"interval": 2, "metrics": ["cpu", "cpu"]}),
            "Duplicate value",
        ),
        (
            "metrics as a string",
            json!({"interval": 2, "metrics": "cpu"}),
            "spec.metrics",
        ),
        (
            "priority as a string",
            json!({"interval": 2, "metrics": ["cpu"], "priority": "high"}),
            "spec.priority",
        ),
        (
            "unknown field",
            json!({"interval": 2, "metrics": ["cpu"], "intervall": 3}),
            "intervall",
        ),
        (
            "nodeNames in upper case",
            json!({"interval": 2, "metrics": ["cpu"], "nodeNames": ["Worker-1"]}),
            "spec.nodeNames[0]",
        ),
        (
            "nodeNames with a slash",
            json!({"interval": 2, "metrics": ["cpu"], "nodeNames": ["a/b"]}),
            "spec.nodeNames[0]",
        ),
        (
            "nodeNames empty string",
            json!({"interval": 2, "metrics": ["cpu"], "nodeNames": [""]}),
            "spec.nodeNames[0]",
        ),
        (
            "nodeNames too long",
            json!({"interval": 2, "metrics": ["cpu"], "nodeNames": ["a".repeat(254)]}),
            "spec.nodeNames[0]",
        ),
        (
            "nodeNames duplicate",
            json!({"interval": 2, "metrics": ["cpu"], "nodeNames": ["w1", "w1"]}),
            "Duplicate value",
        ),
        (
            "selector operator Equals",
            expr("Equals", Some(vec!["a"])),
            "operator must be In, NotIn, Exists or DoesNotExist",
        ),
        (
            "selector In without values",
            expr("In", None),
            "In or NotIn need at least one value",
        ),
        (
            "selector NotIn with no values",
            expr("NotIn", Some(vec![])),
            "In or NotIn need at least one value",
        ),
        (
            "selector Exists with values",
            expr("Exists", Some(vec!["a"])),
            "Exists or DoesNotExist take no values",
        ),
        (
            "selector matchLabels not a map",
            json!({"interval": 2, "metrics": ["cpu"], "nodeSelector": {"matchLabels": ["pool"]}}),
            "matchLabels",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_monitor_configs_are_refused_or_reported_and_heartbeat_garbage_is_ignored() {
    let (env, etcd) = TestEnv::start().await;
    // Two heartbeats without a Node at most (the tests' default is far more: their simulated
    // nodes have no Node objects), and the MonitorNode of such a name deleted 2 s after its
    // node is Dead.
    let mut controller = env
        .controller("controller-0")
        .env("NODEPULSE_MAX_HEARTBEATS_WITHOUT_NODE", "2")
        .env("NODEPULSE_DELETE_WITHOUT_NODE_AFTER", "2s")
        .spawn();
    let metrics = controller.wait_for_serving_addr(Duration::from_secs(30));
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "worker-1", "labels": {"pool": "fast"}}});
    apply(&env, &node).expect("create Node worker-1");
    let mut agent = env.agent("worker-1").ttl(3).start();
    env.wait_state("worker-1", NodeState::Alive, Duration::from_secs(60))
        .await;

    // 1. The API server refuses invalid specs; nothing is stored.
    for (what, spec, want) in invalid_specs() {
        let err = apply(&env, &monitor_config("bad", spec.clone()))
            .expect_err(&format!("{what} must be refused: {spec}"));
        assert!(err.contains(want), "{what}: want {want:?} in:\n{err}");
    }
    let api: Api<MonitorConfig> = Api::all(env.kube.clone());
    assert!(api.get_opt("bad").await.expect("get").is_none());
    // The same rules let valid selectors through.
    let ok = json!({"interval": 2, "metrics": ["cpu"], "nodeSelector": {"matchExpressions": [
        {"key": "pool", "operator": "In", "values": ["fast"]},
        {"key": "gpu", "operator": "DoesNotExist"},
    ]}, "nodeNames": ["worker-1", "ip-10-0-0-1.ec2.internal"]});
    apply(&env, &monitor_config("fast", ok)).expect("a valid spec is accepted");

    // 2. What only the controller can judge is in the status.
    let nowhere = json!({"interval": 5, "metrics": ["cpu"], "nodeSelector": {"matchLabels": {"pool": "gpu"}}});
    let never = json!({"interval": 5, "metrics": ["cpu"], "nodeSelector": {
        "matchLabels": {"pool": "fast"},
        "matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["fast"]}],
    }});
    let ghosts = json!({"interval": 5, "metrics": ["cpu"], "nodeNames": ["ghost-1", "ghost-2"]});
    for (name, spec) in [("nowhere", nowhere), ("never", never), ("ghosts", ghosts)] {
        apply(&env, &monitor_config(name, spec)).expect("accepted");
        let (status, reason, message) = eventually(
            &format!("{name} reports it selects no node"),
            Duration::from_secs(30),
            || async { ready(&env, name).await.filter(|r| r.1 != "Applied") },
        )
        .await;
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "NoMatchingNodes"),
            "{name}: {message}"
        );
        if name == "ghosts" {
            assert!(message.contains("ghost-1, ghost-2"), "{message}");
        }
    }
    let (status, reason, message) = eventually("fast Ready", Duration::from_secs(30), || async {
        ready(&env, "fast").await
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "Applied"),
        "{message}"
    );
    assert!(message.contains("ip-10-0-0-1.ec2.internal"), "{message}");

    // 3. Garbage under the heartbeat prefix: logged, not taken as a sign of life, nothing
    //    crashes. Only a value an agent wrote, on a lease of its own, under its own node's key
    //    counts: a key without a lease outlives its writer, so it proves nothing.
    let mut etcd = etcd.client().await;
    env.node("worker-2", &[]);
    let genuine = etcd
        .get(format!("{HEARTBEAT_PREFIX}worker-1"), None)
        .await
        .expect("get worker-1's heartbeat")
        .kvs()[0]
        .clone();
    let (value, lease) = (genuine.value().to_vec(), genuine.lease());
    assert_ne!(lease, 0, "the agent's key is on a lease");
    let as_worker_2 = String::from_utf8(value.clone())
        .expect("utf-8")
        .replace("\"worker-1\"", "\"worker-2\"");
    let huge = format!("{{\"node\":\"{}\"}}", "x".repeat(1 << 20));
    let garbage: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b"garbage-1".to_vec(), b"alive".to_vec()),
        (
            b"garbage-2".to_vec(),
            br#"{"node":"garbage-2","ttlSeconds":"ten"}"#.to_vec(),
        ),
        (b"garbage-3".to_vec(), b"\xff\xfe\x00".to_vec()),
        (b"garbage-4".to_vec(), huge.into_bytes()),
        (b"garbage-5".to_vec(), b"".to_vec()),
        (b"a/b".to_vec(), b"{}".to_vec()),
        (b"Bad_Name".to_vec(), b"{}".to_vec()),
        (b"".to_vec(), b"{}".to_vec()),
        (b"\xff\xfe".to_vec(), b"{}".to_vec()),
        // A real agent's value copied, without a lease, under another Node's key.
        (b"worker-2".to_vec(), value.clone()),
    ];
    let from = controller.line_count();
    for (suffix, value) in &garbage {
        let mut key = HEARTBEAT_PREFIX.as_bytes().to_vec();
        key.extend_from_slice(suffix);
        etcd.put(key, value.clone(), None)
            .await
            .expect("put garbage");
    }
    // On worker-1's live lease: its own value under worker-2's key (names another node), and
    // one naming worker-2 (the lease carries worker-1's heartbeat already).
    let on_lease = etcd_client::PutOptions::new().with_lease(lease);
    for value in [value.clone(), as_worker_2.into_bytes()] {
        etcd.put(
            format!("{HEARTBEAT_PREFIX}worker-2"),
            value,
            Some(on_lease.clone()),
        )
        .await
        .expect("put on worker-1's lease");
    }
    // The TTL that counts is the lease's: a value claiming another (worker-1's own 3 s value,
    // renamed, on a 60 s lease) is no agent's, nor is a lease no agent grants (an hour).
    env.node("worker-3", &[]);
    env.node("worker-4", &[]);
    let as_worker_3 = String::from_utf8(value.clone())
        .expect("utf-8")
        .replace("\"worker-1\"", "\"worker-3\"");
    let max_ttl = Heartbeat::running("worker-4", 300, Timestamp::now()).to_json();
    for (node, lease_ttl, value) in [("worker-3", 60, as_worker_3), ("worker-4", 3600, max_ttl)] {
        let lease = etcd.lease_grant(lease_ttl, None).await.expect("lease").id();
        etcd.put(
            heartbeat_key(node),
            value,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put heartbeat");
    }
    // Genuine heartbeats (a 300 s lease, as an agent grants it) for names with no Node: two
    // are taken, the third is over the cap.
    let mut ghosts = Vec::new();
    for node in ["ghost-a", "ghost-b", "ghost-c"] {
        let lease = etcd.lease_grant(300, None).await.expect("lease").id();
        let hb = Heartbeat::running(node, 300, Timestamp::now());
        etcd.put(
            heartbeat_key(node),
            hb.to_json(),
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put heartbeat");
        ghosts.push((lease, hb));
    }
    for (what, needle) in [
        ("a nested path", "not /monitor/heartbeat/<node>"),
        ("an invalid node name", "cannot be a node"),
        ("a key without a lease", "reason=no_lease"),
        ("a value naming another node", "reason=other_node"),
        ("a lease carrying another node", "reason=shared_lease"),
        (
            "a value whose TTL is not its lease's",
            "reason=ttl_mismatch",
        ),
        ("a lease no agent grants", "reason=lease_ttl_out_of_range"),
        ("a name with no Node over the cap", "reason=no_node"),
    ] {
        controller.wait_for_line_from(from, Duration::from_secs(10), what, |l| {
            l.contains(needle)
                || (needle.starts_with("reason") && l.contains(&needle.replace('=', "=\"")))
        });
    }
    let counted = |reason: &str| {
        let (_, body) = http_get(&metrics, "/metrics").expect("/metrics");
        body.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "nodepulse_controller_heartbeats_rejected_total{{reason=\"{reason}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Every garbage key with a node's name has no lease: one count each, plus worker-2's.
    assert_eq!(counted("no_lease"), 6);
    assert_eq!(counted("other_node"), 1);
    assert_eq!(counted("shared_lease"), 1);
    assert_eq!(counted("ttl_mismatch"), 1);
    assert_eq!(counted("lease_ttl_out_of_range"), 1);
    assert_eq!(counted("no_node"), 1);
    for ghost in ["ghost-a", "ghost-b"] {
        env.wait_state(ghost, NodeState::Alive, Duration::from_secs(20))
            .await;
    }
    // None of the rest is a heartbeat: no MonitorNode for the names without a Node beyond the
    // cap's two, and worker-2's, worker-3's and worker-4's have no Alive (the events were
    // handled in order, the log lines above came after them).
    let mns: Api<MonitorNode> = Api::all(env.kube.clone());
    let names: Vec<String> = mns
        .list(&Default::default())
        .await
        .expect("list MonitorNodes")
        .items
        .into_iter()
        .filter_map(|m| m.metadata.name)
        .collect();
    let allowed = [
        "worker-1", "worker-2", "worker-3", "worker-4", "ghost-a", "ghost-b",
    ];
    assert!(
        names.iter().all(|n| allowed.contains(&n.as_str())),
        "only real heartbeats, and two without a Node, make MonitorNodes: {names:?}"
    );
    // The controller is still up and still serves the real node: transitions work.
    assert!(controller.is_running(), "controller exited");
    assert!(http_get(&metrics, "/healthz").is_some_and(|(code, _)| code == 200));
    assert_eq!(
        env.status("worker-1").await.and_then(|s| s.state),
        Some(NodeState::Alive)
    );
    // worker-2's key is on worker-1's lease now: it goes with it, which is no concern of
    // worker-1's liveness.
    agent.kill_hard();
    env.wait_state("worker-1", NodeState::Dead, Duration::from_secs(20))
        .await;
    let _agent = env.agent("worker-1").ttl(3).start();
    env.wait_state("worker-1", NodeState::Alive, Duration::from_secs(20))
        .await;
    // Nor did a key that is no heartbeat make a Node whose agent never wrote one Dead, when it
    // was written or when it went (worker-2's, with worker-1's lease): no heartbeat was there to
    // lose.
    for node in ["worker-2", "worker-3", "worker-4"] {
        let status = env.status(node).await.unwrap_or_default();
        assert_eq!(
            (status.state, status.reason.as_deref()),
            (Some(NodeState::Unknown), Some("NoHeartbeat")),
            "a key that is no heartbeat changed {node}: {status:?}"
        );
    }

    // A name with no Node whose heartbeat is gone: its MonitorNode is deleted (2 s after it is
    // Dead here), which frees its place under the cap: ghost-c's next write counts.
    let (ghost_a_lease, _) = &ghosts[0];
    etcd.lease_revoke(*ghost_a_lease)
        .await
        .expect("revoke ghost-a's lease");
    env.wait_state("ghost-a", NodeState::Dead, Duration::from_secs(20))
        .await;
    eventually(
        "ghost-a's MonitorNode deleted",
        Duration::from_secs(30),
        || async { mns.get_opt("ghost-a").await.ok()?.is_none().then_some(()) },
    )
    .await;
    let (ghost_c_lease, ghost_c) = &ghosts[2];
    etcd.put(
        heartbeat_key("ghost-c"),
        ghost_c.to_json(),
        Some(etcd_client::PutOptions::new().with_lease(*ghost_c_lease)),
    )
    .await
    .expect("put ghost-c's heartbeat again");
    env.wait_state("ghost-c", NodeState::Alive, Duration::from_secs(20))
        .await;
    // A Node's MonitorNode is never deleted so: worker-1 is still there.
    assert!(
        mns.get_opt("worker-1").await.expect("get").is_some(),
        "worker-1's MonitorNode deleted"
    );
    assert!(controller.is_running(), "controller exited");
}
