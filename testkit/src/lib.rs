//! The test harness: real servers on loopback, torn down with the test.
//!
//! No port is ever picked, freed and then handed to a server (another process may bind it in
//! between): the project's binaries bind `127.0.0.1:0` and the harness reads the bound address
//! from their output ([`Process::wait_for_serving_addr`]); etcd and kube-apiserver get a
//! [`ReservedPort`], held under a lock outside the kernel's ephemeral range (see `ports.rs`).
//!
//! - [`Etcd`]: a real etcd (built once by `hack/tools.sh` from the Go module proxy);
//! - [`KubeApiserver`]: a real kube-apiserver with its own etcd, certificates and kubeconfig, and
//!   `kubectl`/`helm` pointed at it;
//! - [`Process`]: any child process (our binaries too), killed on drop, with its output captured;
//! - [`Launch`]: nodepulse's agent and controller with the flags tests give them;
//! - [`TestEnv`]: a kube-apiserver and etcd endpoints for an end-to-end test, and waits on its
//!   MonitorNodes;
//! - [`wait_until`] / [`eventually`]: wait for a condition with a deadline, never a bare sleep;
//! - [`demo`]: the env's scenario on one machine, which `make demo` runs (`nodepulse-demo`).
//!
//! The `env` feature (on by default) adds what only the tests need, the kube-rs client and the
//! proxies ([`TestEnv`], [`SlowEtcd`], [`KubeApiserver::client`]); `make demo` builds without it, so
//! that a first demo compiles little beyond the agent and nodepulsectl.

mod apiserver;
pub mod demo;
mod etcd;
mod etcd_cluster;
mod etcd_secure;
mod helm;
mod nodepulse;
mod ports;
mod process;
mod proxy;
#[cfg(feature = "test-env")]
mod slow_etcd;
#[cfg(feature = "test-env")]
mod test_env;
mod tools;

pub use apiserver::KubeApiserver;
pub use etcd::{Etcd, compact, lease_ttl, put_and_compact};
pub use etcd_cluster::EtcdCluster;
pub use etcd_secure::{ClientTls, EtcdUsers, SecureEtcd, enable_etcd_auth, etcdctl_as, tls_env};
pub use helm::{helm, helm_command, mount_and_volume, render_chart};
pub use nodepulse::{
    Daemon, Launch, config_json, heartbeat, heartbeat_gone_within, heartbeat_within,
    panic_on_heartbeat_delete, put_config,
};
pub use ports::ReservedPort;
pub use process::{Line, Process};
pub use proxy::TcpProxy;
#[cfg(feature = "test-env")]
pub use slow_etcd::SlowEtcd;
#[cfg(feature = "test-env")]
pub use test_env::{History, Observed, TestEnv, alive_condition, ready_condition};
pub use tools::{
    Kubectl, built_tool, kubectl, project_bin, project_bin_dir, repo_root, tool, tools_dir,
};

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A temporary directory, removed on drop.
pub fn scratch_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("nodepulse-{what}-"))
        .tempdir()
        .expect("create a temporary directory")
}

/// A minimal HTTP/1.0 GET on a loopback address: `(status, body)`, or `None` if nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Some((status, body))
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async twin of [`wait_until`]: polls `probe` every 50 ms until it returns `Some`, and returns
/// that value; panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
