//! Who the agent says it is, and how it logs: NODE_NAME, --node-name over it, JSON lines.

mod common;

use std::process::Command;
use std::time::Duration;

use testkit::{Etcd, Process, eventually};

use common::heartbeat;

fn agent(etcd: &Etcd, args: &[&str], node_env: Option<&str>) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodepulse-agent"));
    cmd.args(["--etcd-endpoints", &etcd.endpoint])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(args)
        .env_remove("NODE_NAME");
    if let Some(n) = node_env {
        cmd.env("NODE_NAME", n);
    }
    Process::spawn("agent", cmd)
}

#[tokio::test]
async fn node_name_comes_from_node_name_env_and_the_flag_overrides_it() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let _from_env = agent(&etcd, &[], Some("env-node-1"));
    let _from_flag = agent(&etcd, &["--node-name", "flag-node-1"], Some("env-node-2"));
    for node in ["env-node-1", "flag-node-1"] {
        eventually(
            &format!("heartbeat of {node}"),
            Duration::from_secs(5),
            || {
                let mut c = client.clone();
                async move { heartbeat(&mut c, node).await }
            },
        )
        .await;
    }
    let mut c = client.clone();
    assert!(heartbeat(&mut c, "env-node-2").await.is_none());
}

#[tokio::test]
async fn an_invalid_node_name_is_refused_at_start() {
    let etcd = Etcd::start();
    let mut p = agent(&etcd, &["--node-name", "Not_A_Node"], None);
    let status = p.wait_exit(Duration::from_secs(5)).expect("exits");
    assert!(!status.success());
    p.wait_for_line(Duration::from_secs(1), "the reason", |l| {
        l.contains("node name \"Not_A_Node\" must be lowercase")
    });
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let etcd = Etcd::start();
    let p = agent(
        &etcd,
        &["--node-name", "json-1", "--log-format", "json"],
        None,
    );
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
