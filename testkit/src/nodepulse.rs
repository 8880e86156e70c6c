//! nodepulse's own binaries as the tests run them: an agent and a controller with the flags every
//! test gives them (metrics on a port the system picks, info logs), and what a test adds; and the
//! etcd keys tests read and write as the agents do.

use std::ffi::OsString;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use etcd_client::Client;
use nodepulse_crd::wire::{Heartbeat, config_key, heartbeat_key};

use crate::eventually;
use crate::process::Process;
use crate::tools::project_bin;

/// One of nodepulse's binaries, started by a test and serving its /metrics (dereferences to
/// its [`Process`]).
pub struct Daemon {
    /// The process.
    pub process: Process,
    /// `127.0.0.1:<port>` of its /metrics, /healthz and /readyz.
    pub http: String,
    /// The name it was launched with: the agent's node, or the controller's identity.
    pub name: String,
}

impl Daemon {
    /// Puts `value` in this agent's config key and waits up to `timeout` for it to log that it
    /// applied the put's revision, which it returns.
    pub async fn apply_config(
        &self,
        client: &Client,
        value: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> i64 {
        let rev = put_config(client, &self.name, value).await;
        self.process.wait_for_line(timeout, "config applied", |l| {
            l.contains(&format!("(revision {rev})"))
        });
        rev
    }
}

impl Deref for Daemon {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// How a test starts `nodepulse-agent` or `nodepulse-controller`: `--metrics-addr 127.0.0.1:0`
/// (the harness reads the bound address from the log), `RUST_LOG=info`, plus what the test adds.
#[derive(Clone, Debug)]
pub struct Launch {
    /// Names the process in its output: the node, or the controller's identity.
    name: String,
    program: OsString,
    env: Vec<(String, String)>,
    endpoints: Option<String>,
    args: Vec<String>,
}

impl Launch {
    /// An agent reporting as `node` (`--node-name`; no inherited `NODE_NAME`).
    pub fn agent(node: &str) -> Launch {
        Launch::new(node, "nodepulse-agent").args(["--node-name", node])
    }

    /// A controller using `kubeconfig`; `identity` names it in the leader Lease (namespace
    /// `default`): a restart with the same identity takes the Lease back at once, as a
    /// restarted container of the same pod does. `--leader-elect=false` runs one replica.
    /// Heartbeats for names without a Node count up to a million.
    pub fn controller(kubeconfig: &Path, identity: &str) -> Launch {
        let mut launch = Launch::new(identity, "nodepulse-controller").args([
            "--leader-election-namespace",
            "default",
            "--leader-election-identity",
            identity,
        ]);
        launch
            .env
            .push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        // The nodes tests and the bench simulate have no Node objects: their heartbeats count
        // beyond the controller's cap of 100 without a Node (a test of the cap sets its own).
        launch.env("NODEPULSE_MAX_HEARTBEATS_WITHOUT_NODE", "1000000")
    }

    /// An agent told its node name by `NODE_NAME`, as a pod is, instead of `--node-name`.
    pub fn agent_named_by_env(node: &str) -> Launch {
        Launch::new(node, "nodepulse-agent").env("NODE_NAME", node)
    }

    fn new(name: &str, binary: &str) -> Launch {
        Launch {
            name: name.to_string(),
            program: project_bin(binary).into(),
            env: vec![("RUST_LOG".into(), "info".into())],
            endpoints: None,
            args: Vec::new(),
        }
    }

    /// The etcd endpoints, comma-separated (`--etcd-endpoints`).
    pub fn etcd(mut self, endpoints: &str) -> Self {
        self.endpoints = Some(endpoints.to_string());
        self
    }

    /// The agent's heartbeat lease TTL in seconds (`--heartbeat-ttl`).
    pub fn ttl(self, seconds: u64) -> Self {
        self.args(["--heartbeat-ttl", &seconds.to_string()])
    }

    /// More command-line arguments.
    pub fn args<S: AsRef<str>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_string()));
        self
    }

    /// The `RUST_LOG` filter (default `info`).
    pub fn log(self, filter: &str) -> Self {
        self.env("RUST_LOG", filter)
    }

    /// An environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Runs the build named by the environment variable `var` when it is set (e.g. one from
    /// before a fix, to see a test fail there).
    pub fn program_from_env(mut self, var: &str) -> Self {
        if let Some(program) = std::env::var_os(var) {
            self.program = program;
        }
        self
    }

    /// Another build of the binary.
    pub fn program(mut self, program: &Path) -> Self {
        self.program = program.into();
        self
    }

    /// The command line, for a test that adds to it before [`Process::spawn`].
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.env_remove("NODE_NAME").envs(self.env.iter().cloned());
        if let Some(endpoints) = &self.endpoints {
            cmd.args(["--etcd-endpoints", endpoints]);
        }
        cmd.args(["--metrics-addr", "127.0.0.1:0"]).args(&self.args);
        cmd
    }

    /// Starts the binary without waiting for anything (it may be meant to fail).
    pub fn spawn(&self) -> Process {
        Process::spawn(&self.name, self.command())
    }

    /// Starts the binary and waits until its HTTP endpoint listens.
    pub fn start(&self) -> Daemon {
        let process = self.spawn();
        let http = process.wait_for_serving_addr(Duration::from_secs(30));
        Daemon {
            process,
            http,
            name: self.name.clone(),
        }
    }
}

/// The heartbeat value of `node` and its lease, if the key exists.
pub async fn heartbeat(client: &Client, node: &str) -> Option<(Heartbeat, i64)> {
    let resp = client.clone().get(heartbeat_key(node), None).await.ok()?;
    let kv = resp.kvs().first()?;
    let hb = Heartbeat::parse(kv.value()).expect("the agent writes valid heartbeats");
    Some((hb, kv.lease()))
}

/// Waits up to `timeout` for `node`'s heartbeat key: its value and lease.
pub async fn heartbeat_within(client: &Client, node: &str, timeout: Duration) -> (Heartbeat, i64) {
    eventually(&format!("{node}'s heartbeat key"), timeout, || {
        heartbeat(client, node)
    })
    .await
}

/// Waits up to `timeout` for `node`'s heartbeat key to be gone (its lease expired or revoked).
pub async fn heartbeat_gone_within(client: &Client, node: &str, timeout: Duration) {
    eventually(&format!("{node}'s heartbeat key gone"), timeout, || async {
        heartbeat(client, node).await.is_none().then_some(())
    })
    .await
}

/// Watches `node`'s heartbeat key from now on. The future returned panics with `why` at the
/// key's first delete (its lease expired or was revoked) and ends only if the watch does: run
/// it beside what must not cost the node its heartbeat.
pub async fn panic_on_heartbeat_delete(
    client: &Client,
    node: &str,
    why: &str,
) -> impl std::future::Future<Output = ()> + use<> {
    let mut events = client
        .clone()
        .watch(
            heartbeat_key(node),
            Some(etcd_client::WatchOptions::new().with_prev_key()),
        )
        .await
        .expect("watch the heartbeat key");
    let why = why.to_string();
    async move {
        while let Some(resp) = events.message().await.expect("watch stays open") {
            for e in resp.events() {
                assert_ne!(e.event_type(), etcd_client::EventType::Delete, "{why}");
            }
        }
    }
}

/// A config value of `interval` seconds and metrics cpu and memory.
pub fn config_json(interval: u32) -> String {
    serde_json::json!({"interval": interval, "metrics": ["cpu", "memory"]}).to_string()
}

/// Puts `value` in `node`'s config key (as `etcdctl put` would), retrying for up to 30 s while
/// etcd cannot take writes (an election, no quorum, a restart), and returns its revision.
pub async fn put_config(client: &Client, node: &str, value: impl Into<Vec<u8>>) -> i64 {
    let value: Vec<u8> = value.into();
    eventually(
        &format!("etcd to take {node}'s config"),
        Duration::from_secs(30),
        || {
            let mut c = client.clone();
            let value = value.clone();
            async move {
                let put = c.put(config_key(node), value, None);
                let resp = tokio::time::timeout(Duration::from_secs(2), put)
                    .await
                    .ok()?
                    .ok()?;
                resp.header().map(|h| h.revision())
            }
        },
    )
    .await
}
