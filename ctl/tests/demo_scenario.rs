//! `make demo` as a newcomer runs it: runs `hack/demo.sh` exactly as `make demo`
//! does (real etcd, `nodepulsectl watch`, a real agent process, `nodepulsectl config set`,
//! SIGKILL) and checks each step against its deadline, from the moments the lines arrived.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::{Process, project_bin, repo_root, tool};

/// The demo's heartbeat TTL, in seconds (`DEMO_TTL`).
const TTL: u64 = 5;

/// The demo script, stopped with SIGTERM (so that its trap stops etcd and the rest) if the test
/// fails half-way; the harness's SIGKILL on drop comes after.
struct Demo(Process);

impl Drop for Demo {
    fn drop(&mut self) {
        if self.0.is_running() {
            self.0.signal(Signal::SIGTERM);
            let _ = self.0.wait_exit(Duration::from_secs(15));
        }
    }
}

/// The agent's own timestamp at the start of an `[agent] <RFC 3339> INFO ...` line.
fn agent_time(line: &str) -> jiff::Timestamp {
    line.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
}

/// The directory of etcd, etcdctl (and kube-apiserver, kubectl), built first if this machine lacks them.
fn tools_dir(k8s: bool) -> PathBuf {
    let etcd = tool("etcd");
    tool("etcdctl");
    if k8s {
        tool("kube-apiserver");
        tool("kubectl");
    }
    etcd.parent().expect("tools dir").to_path_buf()
}

fn bin_dir() -> PathBuf {
    // Both binaries the demo runs must exist; `make test` builds every binary first.
    project_bin("nodepulse-agent");
    project_bin("nodepulsectl")
        .parent()
        .expect("target dir")
        .to_path_buf()
}

#[test]
fn make_demo_plays_the_labs_scenario_within_its_deadlines() {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/demo.sh"))
        .env("NODEPULSE_BIN", bin_dir())
        .env("NODEPULSE_TOOLS", tools_dir(false))
        .env("DEMO_TTL", TTL.to_string())
        .env_remove("DEMO_K8S")
        .env_remove("RUST_LOG");
    let demo = Demo(Process::spawn("demo", cmd));
    let secs = Duration::from_secs;

    // 1. The watcher starts and says there is no node.
    let (i, _) = demo
        .0
        .wait_for_line_from(0, secs(60), "[watch] no node yet", |l| {
            l.starts_with("[watch]") && l.contains("No node yet")
        });

    // 2. Alive within 2 s of the agent's start.
    let (i, started) = demo
        .0
        .wait_for_line_from(i, secs(10), "the agent's command line", |l| {
            l.starts_with("[demo] nodepulse-agent --node-name worker-1")
        });
    let (i, alive) = demo
        .0
        .wait_for_line_from(i, secs(10), "[watch] Node worker-1 Alive", |l| {
            l.starts_with("[watch]") && l.ends_with("Node worker-1 Alive")
        });
    let took = alive.at - started.at;
    assert!(took <= secs(2), "Alive {took:?} after the agent's start");

    // 3. "config updated" within 1 s of the push, then samples 2 s apart.
    let (i, push) = demo.0.wait_for_line_from(i, secs(20), "the push", |l| {
        l.starts_with("[demo] nodepulsectl config set worker-1 --interval 2")
    });
    let (i, updated) = demo
        .0
        .wait_for_line_from(i, secs(5), "[agent] config updated", |l| {
            l.starts_with("[agent]") && l.contains("config updated: interval 10s -> 2s")
        });
    let took = updated.at - push.at;
    assert!(took <= secs(1), "config applied {took:?} after the push");
    assert!(
        updated.text.contains("metrics [cpu, memory]"),
        "{}",
        updated.text
    );
    let mut at = agent_time(&updated.text);
    let mut i = i;
    let mut gaps = Vec::new();
    for n in 0..3 {
        let (next, sample) =
            demo.0
                .wait_for_line_from(i + 1, secs(5), &format!("sample {n}"), |l| {
                    l.starts_with("[agent]") && l.contains(" sample ")
                });
        let t = agent_time(&sample.text);
        if n > 0 {
            gaps.push(t.duration_since(at));
        }
        at = t;
        i = next;
    }
    for gap in &gaps {
        let gap = gap.as_secs_f64();
        assert!(
            (1.5..=2.5).contains(&gap),
            "samples should come 2 s apart, got {gaps:?}"
        );
    }

    // 4. Dead within TTL + 2 s of the SIGKILL.
    let (i, kill) = demo.0.wait_for_line_from(i, secs(10), "the kill", |l| {
        l.starts_with("[demo] 4. Kill the agent hard")
    });
    let (i, dead) = demo.0.wait_for_line_from(
        i,
        secs(TTL + 5),
        "[watch] Node worker-1 Dead (heartbeat expired)",
        |l| l.starts_with("[watch]") && l.ends_with("Node worker-1 Dead (heartbeat expired)"),
    );
    let took = dead.at - kill.at;
    assert!(
        took <= secs(TTL + 2),
        "Dead {took:?} after the kill (TTL {TTL} s)"
    );

    // The demo ends by itself and stops what it started.
    demo.0.wait_for_line_from(i, secs(20), "the end", |l| {
        l == "[demo] stopped everything it started"
    });
    let mut demo = demo;
    let status = demo.0.wait_exit(secs(10)).expect("demo exits");
    assert!(status.success(), "{}", demo.0.output_text());
    let out = demo.0.output_text();
    let endpoint = out
        .lines()
        .find_map(|l| l.strip_prefix("[demo] starting etcd on http://"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the etcd line");
    assert!(
        std::net::TcpStream::connect(endpoint).is_err(),
        "etcd at {endpoint} still answers after the demo"
    );
}

#[test]
fn ctrl_c_stops_everything_the_demo_started() {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/demo.sh"))
        .env("NODEPULSE_BIN", bin_dir())
        .env("NODEPULSE_TOOLS", tools_dir(false))
        .env_remove("DEMO_K8S");
    let mut demo = Demo(Process::spawn("demo", cmd));
    demo.0
        .wait_for_line_from(0, Duration::from_secs(60), "the agent alive", |l| {
            l.ends_with("Node worker-1 Alive")
        });
    let out = demo.0.output_text();
    let endpoint = out
        .lines()
        .find_map(|l| l.strip_prefix("[demo] starting etcd on http://"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the etcd line")
        .to_string();
    demo.0.signal(Signal::SIGINT);
    let status = demo.0.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(130), "{}", demo.0.output_text());
    // The output is read by other threads: wait for the lines rather than look once.
    demo.0
        .wait_for_line_from(0, Duration::from_secs(5), "[demo] interrupted", |l| {
            l == "[demo] interrupted"
        });
    demo.0
        .wait_for_line_from(0, Duration::from_secs(5), "the cleanup line", |l| {
            l == "[demo] stopped everything it started"
        });
    assert!(
        std::net::TcpStream::connect(&endpoint).is_err(),
        "etcd at {endpoint} still answers after Ctrl-C"
    );
}

#[test]
fn demo_k8s_mode_shows_the_monitor_node_alive_then_dead() {
    project_bin("nodepulse-controller");
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/demo.sh"))
        .env("NODEPULSE_BIN", bin_dir())
        .env("NODEPULSE_TOOLS", tools_dir(true))
        .env("DEMO_K8S", "1")
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG");
    let demo = Demo(Process::spawn("demo-k8s", cmd));
    let secs = Duration::from_secs;
    let row = |state: &'static str| {
        move |l: &str| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols.first() == Some(&"[kubectl]")
                && cols.get(1) == Some(&"worker-1")
                && cols.get(2) == Some(&state)
        }
    };
    // The apiserver's first start on a machine takes a while; afterwards the steps as usual.
    let (i, _) = demo
        .0
        .wait_for_line_from(0, secs(180), "the controller leading", |l| {
            l.starts_with("[controller]") && l.contains("became leader")
        });
    let (i, _) =
        demo.0
            .wait_for_line_from(i, secs(20), "kubectl get monitornodes: Alive", row("Alive"));
    let (i, _) = demo
        .0
        .wait_for_line_from(i, secs(20), "the controller's key", |l| {
            l.contains("written by: nodepulse-controller (MonitorConfig demo-fast")
        });
    let (i, _) = demo
        .0
        .wait_for_line_from(i, secs(20), "[controller] Node worker-1 Dead", |l| {
            l.starts_with("[controller]") && l.contains("Node worker-1 Dead (heartbeat expired)")
        });
    let (i, _) =
        demo.0
            .wait_for_line_from(i, secs(20), "kubectl get monitornodes: Dead", row("Dead"));
    demo.0.wait_for_line_from(i, secs(30), "the end", |l| {
        l == "[demo] stopped everything it started"
    });
    let mut demo = demo;
    let status = demo.0.wait_exit(secs(10)).expect("demo exits");
    assert!(status.success(), "{}", demo.0.output_text());
}
