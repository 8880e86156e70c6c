//! End to end: a real kube-apiserver, a real etcd, the real controller binary and real agent
//! processes, killed with SIGKILL where the issue says "kill".
//!
//! Each test has its own API server: two controllers on one server would each reconcile the
//! other's MonitorNodes against their own etcd.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::Api;
use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::{MonitorNode, NodeState};
use nodepulse_crd::wire::{ConfigValue, config_key, heartbeat_key};
use serde_json::json;
use testkit::{
    Daemon, Etcd, Process, TestEnv, alive_condition, eventually, http_get, ready_condition,
};

/// The controller; `identity` names it in the leader Lease.
fn start_controller(env: &TestEnv, identity: &str) -> Process {
    env.controller(identity)
        .args(["--usage-write-interval", "5s"])
        .spawn()
}

fn start_agent(env: &TestEnv, node: &str) -> Daemon {
    env.agent(node).ttl(3).start()
}

/// `node`'s config key, parsed, and its revision.
async fn config_key_of(etcd: &Etcd, node: &str) -> Option<(ConfigValue, i64)> {
    let (value, revision) = raw_key(etcd, &config_key(node)).await?;
    let value = ConfigValue::parse(value.as_bytes()).expect("config key parses");
    Some((value, revision))
}

/// `node`'s config key once it exists, within `timeout`.
async fn config_key_within(etcd: &Etcd, node: &str, timeout: Duration) -> (ConfigValue, i64) {
    eventually(&format!("{node}'s config key"), timeout, || {
        config_key_of(etcd, node)
    })
    .await
}

async fn raw_key(etcd: &Etcd, key: &str) -> Option<(String, i64)> {
    let mut client = etcd.client().await;
    let resp = client.get(key, None).await.expect("etcd get");
    resp.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).into_owned(),
            kv.mod_revision(),
        )
    })
}

/// NodeAlive and HeartbeatExpired counts of worker-1..3, in that order.
async fn transition_events(env: &TestEnv) -> Vec<i32> {
    let mut out = Vec::new();
    for node in ["worker-1", "worker-2", "worker-3"] {
        for reason in ["NodeAlive", "HeartbeatExpired"] {
            out.push(env.event_count(node, reason).await);
        }
    }
    out
}

fn monitor_config_yaml(name: &str, selector: serde_json::Value, interval: u32) -> String {
    json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorConfig",
        "metadata": {"name": name},
        "spec": {"nodeSelector": selector, "interval": interval, "metrics": ["cpu", "memory"]},
    })
    .to_string()
}

/// Three agents, liveness, a config change and a controller restart, in the order an operator
/// meets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acceptance_three_agents_liveness_config_and_restart() {
    let (env, etcd) = TestEnv::start().await;
    env.node("worker-1", &[("nodepulse.io/pool", "fast")]);
    env.node("worker-2", &[("nodepulse.io/pool", "slow")]);
    env.node("worker-3", &[("nodepulse.io/pool", "slow")]);
    let mut controller = start_controller(&env, "controller-0");
    let mut agents: BTreeMap<&str, Daemon> = ["worker-1", "worker-2", "worker-3"]
        .into_iter()
        .map(|n| (n, start_agent(&env, n)))
        .collect();

    // Three agents -> three MonitorNodes Alive, with CPU% and MEMORY% in `kubectl get`.
    for node in ["worker-1", "worker-2", "worker-3"] {
        env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
            .await;
        controller.wait_for_line(Duration::from_secs(5), "Node Alive", |l| {
            l.contains(&format!("Node {node} Alive"))
        });
    }
    let table = eventually(
        "CPU% and MEMORY% in kubectl get monitornodes",
        Duration::from_secs(30),
        || async {
            let table = env.api().kubectl_ok(&["get", "monitornodes"]);
            let rows: Vec<Vec<String>> = table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(String::from).collect())
                .collect();
            let filled = rows.len() == 3
                && rows.iter().all(|r| {
                    r[1] == "Alive" && r[2].parse::<f64>().is_ok() && r[3].parse::<f64>().is_ok()
                });
            filled.then_some(table)
        },
    )
    .await;
    assert!(table.starts_with("NAME"), "{table}");
    let api: Api<MonitorNode> = Api::all(env.kube.clone());
    let mn = api.get("worker-1").await.expect("MonitorNode worker-1");
    let owner = &mn
        .metadata
        .owner_references
        .as_ref()
        .expect("ownerReference")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", "worker-1")
    );
    assert_eq!(owner.block_owner_deletion, None);
    let status = mn.status.expect("status");
    let alive = alive_condition(&status);
    assert_eq!(alive.status, "True");
    assert_eq!(status.ttl_seconds, Some(3));
    assert!(status.agent_version.is_some());

    // SIGKILL worker-2's agent -> Dead within TTL + 2 s, with a HeartbeatExpired Event; restart
    // -> Alive.
    agents.get_mut("worker-2").expect("agent").kill_hard();
    let killed = Instant::now();
    let dead = env
        .wait_state("worker-2", NodeState::Dead, Duration::from_secs(5))
        .await;
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    println!("worker-2 Dead {:?} after SIGKILL", killed.elapsed());
    controller.wait_for_line(Duration::from_secs(5), "Dead line", |l| {
        l.contains("Node worker-2 Dead (heartbeat expired)")
    });
    eventually(
        "HeartbeatExpired Event on worker-2",
        Duration::from_secs(10),
        || async { (env.event_count("worker-2", "HeartbeatExpired").await >= 1).then_some(()) },
    )
    .await;
    let describe = env
        .api()
        .kubectl_ok(&["describe", "monitornode", "worker-2"]);
    assert!(describe.contains("HeartbeatExpired"), "{describe}");
    agents.insert("worker-2", start_agent(&env, "worker-2"));
    env.wait_state("worker-2", NodeState::Alive, Duration::from_secs(30))
        .await;

    // A MonitorConfig selecting worker-1 by label, interval 2: only worker-1's key changes.
    let before: Vec<_> = [
        config_key_of(&etcd, "worker-2").await,
        config_key_of(&etcd, "worker-3").await,
    ]
    .into();
    let worker1_lines = agents["worker-1"].line_count();
    env.apply(&monitor_config_yaml(
        "fast",
        json!({"matchLabels": {"nodepulse.io/pool": "fast"}}),
        2,
    ));
    let (value, _) = config_key_within(&etcd, "worker-1", Duration::from_secs(20)).await;
    assert_eq!(value.interval, 2);
    assert!(value.is_managed());
    assert_eq!(
        value.source.as_ref().map(|s| s.monitor_config.as_str()),
        Some("fast")
    );
    agents["worker-1"].wait_for_line_from(
        worker1_lines,
        Duration::from_secs(10),
        "config updated",
        |l| l.contains("config updated:") && l.contains("-> 2s"),
    );
    eventually(
        "worker-1 runs interval 2, in sync",
        Duration::from_secs(20),
        || async {
            let s = env.status("worker-1").await?;
            let c = s.config?;
            (c.interval == 2
                && c.in_sync == Some(true)
                && c.monitor_config.as_deref() == Some("fast"))
            .then_some(())
        },
    )
    .await;
    let after: Vec<_> = [
        config_key_of(&etcd, "worker-2").await,
        config_key_of(&etcd, "worker-3").await,
    ]
    .into();
    assert_eq!(before, after, "only worker-1's key may change");
    assert_eq!(after, vec![None, None]);
    let mc = eventually("MonitorConfig status", Duration::from_secs(20), || async {
        env.monitor_config("fast")
            .await
            .filter(|mc| mc.status.as_ref().is_some_and(|s| s.applied_nodes == 1))
    })
    .await;
    let st = mc.status.as_ref().expect("status");
    assert_eq!(
        (st.matched_nodes, st.observed_generation),
        (1, mc.metadata.generation)
    );
    assert_eq!(ready_condition(&mc).map(|r| r.0), Some("True".into()));

    // Relabel the Node so the selector no longer matches: key removed, agent back to defaults.
    let lines = agents["worker-1"].line_count();
    env.api().kubectl_ok(&[
        "label",
        "node",
        "worker-1",
        "nodepulse.io/pool=slow",
        "--overwrite",
    ]);
    eventually(
        "worker-1's key removed",
        Duration::from_secs(20),
        || async {
            config_key_of(&etcd, "worker-1")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    agents["worker-1"].wait_for_line_from(
        lines,
        Duration::from_secs(10),
        "back to defaults",
        |l| l.contains("back to defaults"),
    );
    eventually(
        "worker-1 on defaults, in sync",
        Duration::from_secs(20),
        || async {
            let c = env.status("worker-1").await?.config?;
            (c.interval == 10 && c.in_sync == Some(true)).then_some(())
        },
    )
    .await;

    // Select it again, then delete the MonitorConfig: no key it wrote remains.
    env.api().kubectl_ok(&[
        "label",
        "node",
        "worker-1",
        "nodepulse.io/pool=fast",
        "--overwrite",
    ]);
    config_key_within(&etcd, "worker-1", Duration::from_secs(20)).await;
    env.api().kubectl_ok(&[
        "delete",
        "monitorconfig",
        "fast",
        "--wait=true",
        "--timeout=30s",
    ]);
    assert!(env.monitor_config("fast").await.is_none());
    for node in ["worker-1", "worker-2", "worker-3"] {
        assert_eq!(
            config_key_of(&etcd, node).await,
            None,
            "{node}'s key outlived its MonitorConfig"
        );
    }

    // Kill the controller, kill an agent while it is down, start it again: that node is Dead
    // within 5 s of the start, and nothing is said about the others.
    controller.kill_hard();
    let events_before = transition_events(&env).await;
    agents.get_mut("worker-3").expect("agent").kill_hard();
    eventually(
        "worker-3's heartbeat key to expire",
        Duration::from_secs(15),
        || async {
            raw_key(&etcd, &heartbeat_key("worker-3"))
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        env.status("worker-3").await.and_then(|s| s.state),
        Some(NodeState::Alive),
        "nobody may have written while the controller was down"
    );
    let controller = start_controller(&env, "controller-0");
    let started = Instant::now();
    let dead = env
        .wait_state("worker-3", NodeState::Dead, Duration::from_secs(5))
        .await;
    println!(
        "worker-3 Dead {:?} after the controller started",
        started.elapsed()
    );
    assert_eq!(dead.reason.as_deref(), Some("HeartbeatExpired"));
    eventually(
        "HeartbeatExpired Event on worker-3",
        Duration::from_secs(10),
        || async {
            let now = transition_events(&env).await;
            (now[5] == events_before[5] + 1).then_some(())
        },
    )
    .await;
    controller.wait_for_line(Duration::from_secs(10), "reconciled", |l| {
        l.contains("reconciled every MonitorNode")
    });
    let events_after = transition_events(&env).await;
    assert_eq!(
        events_after[..4],
        events_before[..4],
        "spurious Events for worker-1/2"
    );
    assert_eq!(
        events_after[4], events_before[4],
        "spurious NodeAlive for worker-3"
    );
    let output = controller.output_text();
    assert!(
        !output.contains("Node worker-1") && !output.contains("Node worker-2"),
        "spurious transitions:\n{output}"
    );

    // A clean stop for good: the agent says it is stopping, and no agent takes over within the
    // TTL (3 s), so the node ends Dead with the reason it gave.
    agents["worker-1"].signal(Signal::SIGTERM);
    let stopped = env
        .wait_state("worker-1", NodeState::Dead, Duration::from_secs(3 + 5))
        .await;
    assert_eq!(stopped.reason.as_deref(), Some("AgentStopped"));
    controller.wait_for_line(Duration::from_secs(5), "agent stopped", |l| {
        l.contains("Node worker-1 Dead (agent stopped)")
    });

    // /metrics and /healthz.
    let addr = controller.wait_for_serving_addr(Duration::from_secs(30));
    let (code, body) = http_get(&addr, "/healthz").expect("healthz answers");
    assert_eq!(code, 200, "{body}");
    let body = eventually("node gauges", Duration::from_secs(5), || async {
        let (code, body) = http_get(&addr, "/metrics")?;
        (code == 200
            && body
                .lines()
                .any(|l| l == "nodepulse_controller_nodes{state=\"dead\"} 2"))
        .then_some(body)
    })
    .await;
    for needle in [
        "nodepulse_controller_nodes{state=\"alive\"} 1",
        "nodepulse_controller_transitions_total{state=\"dead\"} 2",
        "nodepulse_controller_dead_detection_seconds_count 1",
        "nodepulse_controller_leader 1",
    ] {
        assert!(
            body.lines().any(|l| l == needle),
            "{needle} missing from:\n{body}"
        );
    }
}

/// Keys written by hand are never touched; a managed key edited by hand is restored; a
/// MonitorConfig that cannot apply says why in its status. No agents needed: the keys are the
/// contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hand_written_keys_are_left_alone_and_unapplicable_configs_say_why() {
    let (env, etcd) = TestEnv::start().await;
    env.node("hand-1", &[("team", "a")]);
    env.node("managed-1", &[("team", "a")]);
    let hand_value = r#"{"interval": 7, "metrics": ["cpu"]}"#;
    let out = etcd.etcdctl(&["put", &config_key("hand-1"), hand_value]);
    assert!(out.status.success());
    let out = etcd.etcdctl(&["put", &config_key("elsewhere"), hand_value]);
    assert!(out.status.success());
    let hand_before = raw_key(&etcd, &config_key("hand-1"))
        .await
        .expect("hand key");
    let elsewhere_before = raw_key(&etcd, &config_key("elsewhere")).await.expect("key");
    let mut controller = start_controller(&env, "controller-a");

    env.apply(&monitor_config_yaml(
        "team-a",
        json!({"matchLabels": {"team": "a"}}),
        3,
    ));
    let (value, _) = config_key_within(&etcd, "managed-1", Duration::from_secs(30)).await;
    assert_eq!(value.interval, 3);
    let mc = eventually(
        "team-a reports the hand-written key",
        Duration::from_secs(20),
        || async {
            env.monitor_config("team-a")
                .await
                .filter(|mc| ready_condition(mc).is_some_and(|r| r.1 == "UnmanagedKeys"))
        },
    )
    .await;
    let (status, _, message) = ready_condition(&mc).expect("Ready");
    assert_eq!(status, "False");
    assert!(message.contains("hand-1"), "{message}");
    let st = mc.status.expect("status");
    assert_eq!((st.matched_nodes, st.applied_nodes), (2, 1));

    // A managed key changed by hand is restored, with a warning.
    let edited = r#"{"interval":9,"metrics":["cpu"],"managedBy":"nodepulse-controller","source":{"monitorConfig":"team-a","generation":1}}"#;
    assert!(
        etcd.etcdctl(&["put", &config_key("managed-1"), edited])
            .status
            .success()
    );
    eventually("managed-1 restored", Duration::from_secs(20), || async {
        let (v, _) = config_key_of(&etcd, "managed-1").await?;
        (v.interval == 3).then_some(())
    })
    .await;
    controller.wait_for_line(Duration::from_secs(5), "hand edit warning", |l| {
        l.contains("changed by hand") && l.contains("managed-1")
    });

    // A MonitorConfig the controller cannot apply says why.
    // A selector the controller could not apply never gets that far: the CRD's CEL rules
    // make the API server refuse it (controller/tests/bad_input.rs covers the other rules).
    let bad_selector = json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorConfig",
        "metadata": {"name": "bad-selector"},
        "spec": {
            "nodeSelector": {"matchExpressions": [{"key": "team", "operator": "Near", "values": ["a"]}]},
            "interval": 5,
            "metrics": ["cpu"],
            "priority": 10,
        },
    });
    let out = env
        .api()
        .kubectl_stdin(&["apply", "-f", "-"], &bad_selector.to_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an unknown operator was accepted");
    assert!(stderr.contains("operator must be In, NotIn"), "{stderr}");
    assert!(env.monitor_config("bad-selector").await.is_none());

    // Deleting the MonitorConfig removes its keys, and only its keys.
    env.api().kubectl_ok(&[
        "delete",
        "monitorconfig",
        "team-a",
        "--wait=true",
        "--timeout=30s",
    ]);
    assert_eq!(config_key_of(&etcd, "managed-1").await, None);
    assert_eq!(
        raw_key(&etcd, &config_key("hand-1")).await,
        Some(hand_before)
    );
    assert_eq!(
        raw_key(&etcd, &config_key("elsewhere")).await,
        Some(elsewhere_before)
    );
    assert!(controller.is_running(), "{}", controller.output_text());
}

/// Two replicas: only the Lease holder writes; when it stops, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_leader_writes_and_a_standby_takes_over() {
    let (env, etcd) = TestEnv::start().await;
    let mut a = start_controller(&env, "replica-a");
    let addr_a = a.wait_for_serving_addr(Duration::from_secs(30));
    let leader_metric = |addr: &str| {
        http_get(addr, "/metrics")
            .is_some_and(|(_, body)| body.lines().any(|l| l == "nodepulse_controller_leader 1"))
    };
    eventually("replica-a leads", Duration::from_secs(30), || async {
        leader_metric(&addr_a).then_some(())
    })
    .await;
    let b = start_controller(&env, "replica-b");
    let addr_b = b.wait_for_serving_addr(Duration::from_secs(30));
    b.wait_for_line(Duration::from_secs(20), "waiting to lead", |l| {
        l.contains("waiting to lead")
    });

    let mut etcd = etcd.client().await;
    let lease = etcd.lease_grant(30, None).await.expect("lease").id();
    let hb = json!({
        "node": "standby-1", "agentVersion": "test", "state": "Running",
        "startedAt": "2026-11-22T05:00:00Z", "updatedAt": "2026-11-22T05:00:00Z",
        "ttlSeconds": 30, "config": {"revision": 0, "interval": 10, "metrics": ["cpu"]},
    });
    etcd.put(
        heartbeat_key("standby-1"),
        hb.to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .expect("put heartbeat");
    env.wait_state("standby-1", NodeState::Alive, Duration::from_secs(20))
        .await;
    assert!(
        !leader_metric(&addr_b),
        "replica-b must stand by ({addr_a} vs {addr_b}):\n{}",
        b.output_text()
    );
    eventually(
        "replica-a counts one node alive",
        Duration::from_secs(5),
        || async {
            http_get(&addr_a, "/metrics").filter(|(_, body)| {
                body.lines()
                    .any(|l| l == "nodepulse_controller_nodes{state=\"alive\"} 1")
            })
        },
    )
    .await;
    assert!(
        !b.output_text().contains("Node standby-1"),
        "{}",
        b.output_text()
    );

    // A graceful stop releases the Lease: replica-b takes it at once (not when replica-a's
    // last renewal would have expired, 10 to 30 s later) and notices the death.
    a.signal(Signal::SIGTERM);
    a.wait_exit(Duration::from_secs(15))
        .expect("replica-a exits");
    let released = Instant::now();
    b.wait_for_line(Duration::from_secs(8), "became leader", |l| {
        l.contains("became leader")
    });
    eprintln!(
        "replica-b leads {:.2}s after replica-a exited",
        released.elapsed().as_secs_f64()
    );
    etcd.lease_revoke(lease).await.expect("revoke");
    env.wait_state("standby-1", NodeState::Dead, Duration::from_secs(10))
        .await;
    b.wait_for_line(Duration::from_secs(5), "Dead line", |l| {
        l.contains("Node standby-1 Dead")
    });
}

/// The heartbeat watch survives etcd going away (SIGKILL and restart): deaths after the
/// restart are still seen. A MonitorNode created before its Node object gets the Node as owner
/// once the Node appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn liveness_survives_an_etcd_restart_and_late_nodes_become_owners() {
    let (env, mut etcd) = TestEnv::start().await;
    let _controller = start_controller(&env, "controller-r");
    let mut agent = start_agent(&env, "solo-1");
    env.wait_state("solo-1", NodeState::Alive, Duration::from_secs(30))
        .await;
    let api: Api<MonitorNode> = Api::all(env.kube.clone());
    let mn = api.get("solo-1").await.expect("MonitorNode");
    assert!(mn.metadata.owner_references.is_none(), "no Node object yet");

    env.node("solo-1", &[("late", "true")]);
    eventually(
        "solo-1 owned by its Node",
        Duration::from_secs(20),
        || async {
            let mn = api.get("solo-1").await.ok()?;
            let owner = mn.metadata.owner_references?.into_iter().next()?;
            (owner.kind == "Node" && owner.name == "solo-1").then_some(())
        },
    )
    .await;

    let lines = agent.line_count();
    tokio::task::block_in_place(|| etcd.restart());
    agent.wait_for_line_from(lines, Duration::from_secs(30), "heartbeat back", |l| {
        l.contains("heartbeat") && (l.contains("resumed") || l.contains("granted"))
    });
    agent.kill_hard();
    env.wait_state("solo-1", NodeState::Dead, Duration::from_secs(15))
        .await;
}

/// `kubectl cordon` shows on the node's MonitorNode at once (`maintenance: Cordoned`) and changes
/// nothing of its liveness; the autoscaler's taint shows as `ScaleDown`; `kubectl uncordon` and
/// the taint's removal clear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cordon_shows_on_the_monitor_node_and_leaves_it_alive() {
    use nodepulse_crd::v1alpha1::Maintenance;

    let (env, _etcd) = TestEnv::start().await;
    env.node("kept-1", &[]);
    let _controller = start_controller(&env, "controller-m");
    let _agent = start_agent(&env, "kept-1");
    env.wait_state("kept-1", NodeState::Alive, Duration::from_secs(30))
        .await;
    // At once, not with the next usage refresh.
    let within = Duration::from_secs(3);
    let api = env.api();
    api.kubectl_ok(&["cordon", "kept-1"]);
    let s = env
        .wait_status("kept-1", "Cordoned", within, |s| {
            s.maintenance == Some(Maintenance::Cordoned)
        })
        .await;
    assert_eq!(s.state, Some(NodeState::Alive));
    let table = api.kubectl_ok(&["get", "monitornodes", "kept-1"]);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.ends_with("MAINTENANCE"))
            && table
                .lines()
                .nth(1)
                .is_some_and(|r| r.ends_with("Cordoned")),
        "{table}"
    );
    api.kubectl_ok(&[
        "taint",
        "node",
        "kept-1",
        "ToBeDeletedByClusterAutoscaler=1700000000:NoSchedule",
    ]);
    env.wait_status("kept-1", "ScaleDown", within, |s| {
        s.maintenance == Some(Maintenance::ScaleDown)
    })
    .await;
    api.kubectl_ok(&["taint", "node", "kept-1", "ToBeDeletedByClusterAutoscaler-"]);
    api.kubectl_ok(&["uncordon", "kept-1"]);
    let s = env
        .wait_status("kept-1", "no maintenance", within, |s| {
            s.maintenance.is_none()
        })
        .await;
    assert_eq!(s.state, Some(NodeState::Alive));
}

/// A controller start judges no applied config before its first config sync: a configured
/// node's `ConfigApplied` stays True through a restart (it never flashes False), and the
/// restart raises no second NodeAlive Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restart_does_not_flash_config_applied_false() {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let (env, _etcd) = TestEnv::start().await;
    env.node("worker-1", &[]);
    let mut controller = start_controller(&env, "controller-0");
    let mut agent = start_agent(&env, "worker-1");
    env.apply(&monitor_config_yaml("fast", json!({}), 2));
    let config_applied = |s: &nodepulse_crd::v1alpha1::MonitorNodeStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied")
            .map(|c| c.status.clone())
    };
    eventually(
        "worker-1 ConfigApplied=True at interval 2",
        Duration::from_secs(60),
        || async {
            let s = env.status("worker-1").await?;
            (s.config.as_ref()?.interval == 2 && config_applied(&s).as_deref() == Some("True"))
                .then_some(())
        },
    )
    .await;

    // Every version of worker-1's status from now on.
    let api: Api<MonitorNode> = Api::all(env.kube.clone());
    let mut versions = watcher(
        api,
        watcher::Config::default().fields("metadata.name=worker-1"),
    )
    .applied_objects()
    .boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), versions.next())
        .await
        .expect("the watch lists worker-1")
        .expect("a version")
        .expect("no watch error");
    assert_eq!(
        first.status.as_ref().and_then(config_applied).as_deref(),
        Some("True")
    );
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(mn)) = versions.next().await {
            let state = mn.status.as_ref().and_then(|s| s.state);
            seen.push((state, mn.status.as_ref().and_then(config_applied)));
            if state == Some(NodeState::Dead) {
                break;
            }
        }
        seen
    });

    controller.kill_hard();
    let controller = start_controller(&env, "controller-0");
    controller.wait_for_line(Duration::from_secs(30), "reconciled", |l| {
        l.contains("reconciled every MonitorNode")
    });
    // A write the new controller must make: everything it wrote before it is in `seen`.
    agent.kill_hard();
    let seen = tokio::time::timeout(Duration::from_secs(20), seen)
        .await
        .expect("worker-1 Dead")
        .expect("the watch task");
    assert!(
        seen.iter().all(|(_, c)| c.as_deref() == Some("True")),
        "ConfigApplied changed across the restart: {seen:?}"
    );
    assert_eq!(env.event_count("worker-1", "NodeAlive").await, 1);
}

/// `kubectl wait` on a MonitorNode's condition and on its state, as the README shows them,
/// returns when the node dies; `kubectl explain` documents every status field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_wait_and_explain_work_on_monitor_nodes() {
    let (env, _etcd) = TestEnv::start().await;
    env.node("worker-1", &[]);
    let _controller = start_controller(&env, "controller-0");
    let mut agent = start_agent(&env, "worker-1");
    env.wait_state("worker-1", NodeState::Alive, Duration::from_secs(60))
        .await;
    env.api().kubectl_ok(&[
        "wait",
        "--for=condition=Alive",
        "monitornode/worker-1",
        "--timeout=5s",
    ]);

    let wait = |for_: &str| {
        std::process::Command::new(testkit::kubectl())
            .arg("--kubeconfig")
            .arg(&env.api().kubeconfig)
            .args(["wait", for_, "monitornode/worker-1", "--timeout=60s"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run kubectl wait")
    };
    let not_alive = wait("--for=condition=Alive=false");
    let dead = wait("--for=jsonpath={.status.state}=Dead");
    agent.kill_hard();
    for (what, child) in [("condition=Alive=false", not_alive), ("state Dead", dead)] {
        let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("kubectl wait");
        assert!(
            out.status.success(),
            "kubectl wait {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("condition met"),
            "kubectl wait {what}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(
        env.status("worker-1").await.and_then(|s| s.state),
        Some(NodeState::Dead)
    );

    // Every field of the status and of the objects in it comes with its description.
    for (path, fields) in [
        (
            "monitornode.status",
            &[
                "state",
                "reason",
                "message",
                "lastHeartbeatTime",
                "lastTransitionTime",
                "agentVersion",
                "ttlSeconds",
                "config",
                "usage",
                "conditions",
            ][..],
        ),
        (
            "monitornode.status.config",
            &[
                "interval",
                "metrics",
                "revision",
                "monitorConfig",
                "inSync",
                "error",
            ][..],
        ),
        (
            "monitornode.status.usage",
            &["cpuPercent", "memoryPercent", "diskPercent", "load1"][..],
        ),
    ] {
        let out = env.api().kubectl_ok(&["explain", path]);
        let listed = out.split("FIELDS:").nth(1).unwrap_or_default();
        for field in fields {
            // Each field's line is followed by its block (an `enum:` line, then the
            // description, indented further), up to a blank line.
            let mut block = listed
                .lines()
                .skip_while(|l| l.split_whitespace().next() != Some(field));
            assert!(block.next().is_some(), "{path}.{field} not listed:\n{out}");
            let described = block
                .take_while(|l| !l.trim().is_empty())
                .any(|l| l.starts_with("    "));
            assert!(described, "{path}.{field} has no description:\n{out}");
        }
    }
}
