//! A real three-member (or n-member) etcd cluster on loopback, for failover tests: members can be
//! SIGKILLed one by one and started again on the same ports and data.
//!
//! Members talk to each other over unix sockets in the cluster's scratch directory (every member
//! runs there, and etcd wants `unix://<host>:<port>`, so member `m0` listens on the socket file
//! `m0:2380`): each member's peer URL must be known before any starts, and a socket file cannot
//! collide with anything outside the directory. Client ports are [`ReservedPort`]s: they must
//! survive a member's restart, because the agents and controllers under test keep them.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::ports::ReservedPort;
use crate::process::Process;
use crate::tools::tool;
use crate::{http_get, scratch_dir, wait_until};

struct Member {
    // Declared first, so dropped first: the server goes before its port reservation does.
    process: Option<Process>,
    name: String,
    client_port: ReservedPort,
    data_dir: PathBuf,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("http://{}", self.client_port.addr())
    }

    fn peer_url(&self) -> String {
        format!("unix://{}:2380", self.name)
    }

    fn healthy(&self) -> bool {
        http_get(&self.client_port.addr(), "/health")
            .is_some_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\""))
    }
}

/// An etcd cluster of real members owned by one test, torn down on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    scratch: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until each one answers `/health` (which needs a leader).
    pub fn start(n: usize) -> EtcdCluster {
        let dir = scratch_dir("etcd-cluster");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                process: None,
                name: format!("m{i}"),
                client_port: ReservedPort::new(),
                data_dir: dir.path().join(format!("m{i}")),
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            scratch: dir,
        };
        for i in 0..n {
            cluster.launch(i);
        }
        cluster.wait_healthy(Duration::from_secs(60));
        cluster
    }

    fn launch(&mut self, i: usize) {
        let m = &self.members[i];
        let client = m.endpoint();
        let peer = m.peer_url();
        let mut cmd = Command::new(tool("etcd"));
        // The peer sockets are relative to the working directory: the same one for every member.
        cmd.current_dir(self.dir())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "testkit-cluster"])
            .args(["--log-level", "warn"])
            // Tests check behaviour, not durability across power loss.
            .arg("--unsafe-no-fsync");
        let name = format!("etcd-{}", m.name);
        self.members[i].process = Some(Process::spawn(&name, cmd));
    }

    fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// Every member's client URL, `http://127.0.0.1:<port>`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// The endpoints joined by commas, as `--etcd-endpoints` takes them.
    pub fn endpoints_flag(&self) -> String {
        self.endpoints().join(",")
    }

    /// Whether member `i` is running (not killed).
    pub fn is_up(&self, i: usize) -> bool {
        self.members[i].process.is_some()
    }

    /// Index of the current leader, asked of the running members with
    /// `etcdctl endpoint status -w json`; `None` while there is none (no quorum, election).
    pub fn leader_index(&self) -> Option<usize> {
        let up: Vec<String> = (0..self.members.len())
            .filter(|&i| self.is_up(i))
            .map(|i| self.members[i].endpoint())
            .collect();
        if up.is_empty() {
            return None;
        }
        let out = Command::new(tool("etcdctl"))
            .args(["--endpoints", &up.join(",")])
            .args([
                "--command-timeout",
                "2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .output()
            .ok()?;
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|s| {
            let leader = s["Status"]["leader"].as_u64()?;
            let me = s["Status"]["header"]["member_id"].as_u64()?;
            if leader != me || leader == 0 {
                return None;
            }
            let endpoint = s["Endpoint"].as_str()?;
            self.members.iter().position(|m| m.endpoint() == endpoint)
        })
    }

    /// Waits until there is a leader and returns its index.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        let mut leader = None;
        wait_until("an etcd leader", timeout, || {
            leader = self.leader_index();
            leader.is_some()
        });
        leader.expect("leader found")
    }

    /// SIGKILLs member `i` (its data directory stays).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].process.take() {
            p.kill_hard();
        }
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open and nothing on them is answered,
    /// as with a hung process or a frozen machine. [`Self::thaw`] lets it go on.
    pub fn freeze(&self, i: usize) {
        if let Some(p) = &self.members[i].process {
            p.signal(nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// Lets a frozen member go on (SIGCONT).
    pub fn thaw(&self, i: usize) {
        if let Some(p) = &self.members[i].process {
            p.signal(nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// Starts member `i` again on the same ports and data, and waits until it accepts client
    /// connections. It serves requests only once a quorum is up: see [`Self::wait_healthy`].
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
        let addr = self.members[i].client_port.addr();
        wait_until(
            &format!("etcd member {i} listening"),
            Duration::from_secs(30),
            || TcpStream::connect(&addr).is_ok(),
        );
    }

    /// Waits until every running member answers `/health` (it has a leader and serves).
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until("every running etcd member healthy", timeout, || {
            self.members
                .iter()
                .filter(|m| m.process.is_some())
                .all(Member::healthy)
        });
    }

    /// A client knowing every member.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect(self.endpoints(), None)
            .await
            .expect("connect to the test etcd cluster")
    }

    /// Runs `etcdctl` against every member, as an operator would.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new(tool("etcdctl"))
            .args(["--endpoints", &self.endpoints_flag()])
            .args(args)
            .output()
            .expect("run etcdctl")
    }
}
