//! A real etcd server on free loopback ports, in a temporary data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::process::Process;
use crate::tools::tool;
use crate::{free_port, http_get, scratch_dir, wait_until};

/// A single-member etcd cluster owned by one test.
pub struct Etcd {
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
    process: Option<Process>,
}

impl Etcd {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> Etcd {
        let dir = scratch_dir("etcd");
        let client_port = free_port();
        let peer_port = free_port();
        let mut etcd = Etcd {
            endpoint: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            data_dir: dir.path().join("data"),
            _dir: dir,
            process: None,
        };
        etcd.launch();
        etcd
    }

    fn launch(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(tool("etcd"));
        cmd.args(["--name", "testkit"])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("testkit={peer}")])
            .args(["--log-level", "warn"])
            // Tests check behaviour, not durability across power loss.
            .arg("--unsafe-no-fsync");
        self.process = Some(Process::spawn("etcd", cmd));
        let health = format!("127.0.0.1:{}", self.client_port);
        wait_until("etcd /health", Duration::from_secs(30), || {
            http_get(&health, "/health")
                .is_some_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\""))
        });
    }

    /// SIGKILLs the server (the data directory stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill_hard();
        }
    }

    /// Starts the server again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
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

    /// Runs `etcdctl` against this server, as an operator would.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(tool("etcdctl"))
            .args(["--endpoints", &self.endpoint])
            .args(args)
            .output()
            .expect("run etcdctl")
    }
}
