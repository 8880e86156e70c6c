//! Who the agent says it is, and how it logs: NODE_NAME, --node-name over it, JSON lines.

use std::time::Duration;

use testkit::{Etcd, Launch, eventually, heartbeat};

#[tokio::test]
async fn node_name_comes_from_node_name_env_and_the_flag_overrides_it() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let _from_env = Launch::agent_named_by_env("env-node-1")
        .etcd(&etcd.endpoint)
        .spawn();
    let _from_flag = Launch::agent("flag-node-1")
        .env("NODE_NAME", "env-node-2")
        .etcd(&etcd.endpoint)
        .spawn();
    for node in ["env-node-1", "flag-node-1"] {
        eventually(
            &format!("heartbeat of {node}"),
            Duration::from_secs(5),
            || {
                let c = client.clone();
                async move { heartbeat(&c, node).await }
            },
        )
        .await;
    }
    let c = client.clone();
    assert!(heartbeat(&c, "env-node-2").await.is_none());
}

#[tokio::test]
async fn an_invalid_node_name_is_refused_at_start() {
    let etcd = Etcd::start();
    let mut p = Launch::agent("Not_A_Node").etcd(&etcd.endpoint).spawn();
    let status = p.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(!status.success());
    p.wait_for_line(Duration::from_secs(1), "the reason", |l| {
        l.contains("node name \"Not_A_Node\" must be lowercase")
    });
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let etcd = Etcd::start();
    let p = Launch::agent("json-1")
        .etcd(&etcd.endpoint)
        .args(["--log-format", "json"])
        .spawn();
    let line = p.wait_for_line(Duration::from_secs(5), "a sample", |l| {
        l.contains("sample cpu=")
    });
    let v: serde_json::Value = serde_json::from_str(&line.text).expect("a JSON line");
    let msg = v["fields"]["message"].as_str().expect("message field");
    assert!(msg.starts_with("sample cpu="), "{msg}");
    assert_eq!(v["level"], "INFO");
    for l in p.lines() {
        serde_json::from_str::<serde_json::Value>(&l.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", l.text));
    }
}
