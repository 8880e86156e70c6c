//! Shared by the agent's end-to-end tests: start the real binary against a real etcd.

#![allow(dead_code)] // each test file uses its own subset

use std::process::Command;
use std::time::Duration;

use etcd_client::Client;
use nodepulse_crd::wire::{Heartbeat, config_key, heartbeat_key};
use testkit::{Etcd, Process};

/// A running agent and the address of its HTTP endpoint.
pub struct Agent {
    /// The process.
    pub process: Process,
    /// `127.0.0.1:<port>` of /metrics, /healthz, /readyz.
    pub http: String,
    /// Its node name.
    pub node: String,
}

/// Starts `nodepulse-agent` for `node` against `etcd`, with extra flags.
pub fn start_agent(etcd: &Etcd, node: &str, extra: &[&str]) -> Agent {
    start_agent_at(&etcd.endpoint, node, extra)
}

/// Starts `nodepulse-agent` for `node` against the comma-separated `endpoints`, and waits until
/// its HTTP endpoint listens (on a port the system picked: the agent logs which).
pub fn start_agent_at(endpoints: &str, node: &str, extra: &[&str]) -> Agent {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodepulse-agent"));
    cmd.args(["--node-name", node])
        .args(["--etcd-endpoints", endpoints])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("NODE_NAME");
    let process = Process::spawn(&format!("agent-{node}"), cmd);
    let http = process.wait_for_serving_addr(Duration::from_secs(30));
    Agent {
        process,
        http,
        node: node.to_string(),
    }
}

/// The heartbeat value, if the key exists.
pub async fn heartbeat(client: &mut Client, node: &str) -> Option<(Heartbeat, i64)> {
    let resp = client.get(heartbeat_key(node), None).await.ok()?;
    let kv = resp.kvs().first()?;
    let hb = Heartbeat::parse(kv.value()).expect("the agent writes valid heartbeats");
    Some((hb, kv.lease()))
}

/// Puts a config value and returns the revision it got.
pub async fn put_config(client: &mut Client, node: &str, value: impl Into<Vec<u8>>) -> i64 {
    client
        .put(config_key(node), value, None)
        .await
        .expect("put config")
        .header()
        .expect("put has a header")
        .revision()
}

/// A generous deadline for the agent to notice a recovered etcd (its backoff is capped at 5 s).
pub const RECOVERY: Duration = Duration::from_secs(20);
