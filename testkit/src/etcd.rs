//! A real etcd server on a reserved loopback port, in a temporary data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::nodepulse::Launch;
use crate::ports::ReservedPort;
use crate::process::Process;
use crate::tools::tool;
use crate::{http_get, scratch_dir};

/// The peer URL of a single member: a unix socket named `peer:1` in the member's working
/// directory (etcd wants `host:port` even for a socket). A single member never dials it, but
/// etcd always listens for peers, and a socket in the scratch directory cannot collide.
pub(crate) const PEER_SOCKET_URL: &str = "unix://peer:1";

/// A single-member etcd cluster owned by one test.
pub struct Etcd {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    client_port: ReservedPort,
    data_dir: PathBuf,
    dir: tempfile::TempDir,
    process: Option<Process>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // The server goes before its port reservation does.
        self.kill();
    }
}

impl Etcd {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> Etcd {
        let mut etcd = Etcd::spawn();
        etcd.wait_healthy();
        etcd
    }

    /// Starts etcd without waiting for it: [`Etcd::probe`] tells when it answers (for a caller
    /// that waits its own way, as the demo does, which stops waiting on Ctrl-C).
    pub fn spawn() -> Etcd {
        let dir = scratch_dir("etcd");
        // A reserved port, not port 0: a restarted etcd must come back on the same endpoint.
        let client_port = ReservedPort::new();
        let mut etcd = Etcd {
            endpoint: format!("http://{}", client_port.addr()),
            client_port,
            data_dir: dir.path().join("data"),
            dir,
            process: None,
        };
        etcd.launch();
        etcd
    }

    fn launch(&mut self) {
        let peer = PEER_SOCKET_URL;
        let mut cmd = Command::new(tool("etcd"));
        cmd.current_dir(self.dir.path())
            .args(["--name", "testkit"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("testkit={peer}")])
            .args(["--log-level", "warn"])
            // Tests check behaviour, not durability across power loss.
            .arg("--unsafe-no-fsync");
        self.process = Some(Process::spawn("etcd", cmd));
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = self.probe().unwrap_or_else(|output| {
                panic!(
                    "etcd on {} exited before it was healthy; its output:\n{output}",
                    self.client_port.addr()
                )
            });
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd on {} not healthy after 30 s; its output:\n{}",
                self.client_port.addr(),
                self.output_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers `/health` with `"health":"true"` now; `Err` with its output once
    /// it has exited (or was killed).
    pub fn probe(&mut self) -> Result<bool, String> {
        if !self.process.as_mut().is_some_and(Process::is_running) {
            return Err(self.output_text());
        }
        Ok(http_get(&self.client_port.addr(), "/health")
            .is_some_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\"")))
    }

    /// What etcd printed so far (it logs at `warn`).
    pub fn output_text(&self) -> String {
        self.process
            .as_ref()
            .map_or_else(String::new, Process::output_text)
    }

    /// SIGKILLs the server (the data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill_hard();
        }
    }

    /// Starts the server again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
        self.wait_healthy();
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client connected to this server.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([&self.endpoint], None)
            .await
            .expect("connect to test etcd")
    }

    /// An agent for `node` that talks to this server, to start as the test needs it.
    pub fn agent(&self, node: &str) -> Launch {
        Launch::agent(node).etcd(&self.endpoint)
    }

    /// Runs `etcdctl` against this server, as an operator would.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(tool("etcdctl"))
            .args(["--endpoints", &self.endpoint])
            .args(args)
            .output()
            .expect("run etcdctl")
    }
}

/// Compacts `client`'s etcd physically at `revision`: the history a watch would resume from is gone.
pub async fn compact(client: &mut etcd_client::Client, revision: i64) {
    client
        .compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await
        .expect("compact");
}

/// Puts `key`, then compacts the history at the revision of that put, which it returns.
pub async fn put_and_compact(client: &mut etcd_client::Client, key: &str, value: &str) -> i64 {
    let revision = client
        .put(key, value, None)
        .await
        .expect("put")
        .header()
        .expect("header")
        .revision();
    compact(client, revision).await;
    revision
}

/// The seconds `lease` has left (`-1` once it has expired).
pub async fn lease_ttl(client: &mut etcd_client::Client, lease: i64) -> i64 {
    client
        .lease_time_to_live(lease, None)
        .await
        .expect("lease time to live")
        .ttl()
}
