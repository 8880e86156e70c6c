//! `make demo` as a newcomer runs it: `nodepulse-demo` (testkit/src/demo.rs) as a process, with
//! what it starts for real (etcd, `nodepulsectl watch`, an agent, `nodepulsectl config set`,
//! SIGKILL), each step checked against its deadline from the moments its lines arrived; then its
//! end, by itself or by Ctrl-C: the exit status, and no process it started left behind.
//!
//! Left behind is seen for certain: this test binary is a child subreaper, so whatever the demo
//! started and did not stop becomes a child of the test when the demo exits, alive, or as a
//! zombie when the kernel killed it then (the demo's children die with it: PR_SET_PDEATHSIG).
//! The processes the demo stopped itself, it reaped itself. `make test` builds every binary
//! (the demo's too) before the tests run.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{Line, Process, project_bin, tool, wait_until};

/// The demo's heartbeat TTL, in seconds (`DEMO_TTL`).
const TTL: u64 = 5;

/// One demo at a time: the leftover check counts this binary's children, and the deadlines want
/// the CPU.
static SERIAL: Mutex<()> = Mutex::new(());

/// A process on this machine, named by its pid and start time (a pid alone may be reused).
#[derive(Clone, Debug, PartialEq)]
struct Proc {
    pid: i32,
    ppid: i32,
    start: u64,
    comm: String,
    state: char,
}

/// Every process on the machine, from /proc/<pid>/stat.
fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(p) = process(pid) {
            out.push(p);
        }
    }
    out
}

/// Process `pid`, if it exists (a zombie too).
fn process(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "<pid> (<comm>) <state> <ppid> ...": the name may hold spaces and parentheses.
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        // Field 22 of the whole line, the 20th after the name.
        start: fields.get(19)?.parse().ok()?,
        comm,
    })
}

/// Whether `p` still exists, as the same process.
fn still_there(p: &Proc) -> bool {
    process(p.pid).is_some_and(|now| now.start == p.start)
}

/// Every descendant of `pid`, now.
fn descendants(pid: i32) -> Vec<Proc> {
    let all = processes();
    let mut children: BTreeMap<i32, Vec<&Proc>> = BTreeMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(parent) = queue.pop() {
        for child in children.get(&parent).into_iter().flatten() {
            out.push((*child).clone());
            queue.push(child.pid);
        }
    }
    out
}

/// The demo as a process; SIGTERMed (so that it stops what it started) if the test fails
/// half-way, before the harness's SIGKILL on drop.
struct Demo {
    process: Process,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.process.is_running() {
            self.process.signal(Signal::SIGTERM);
            let _ = self.process.wait_exit(Duration::from_secs(20));
        }
    }
}

impl Demo {
    /// Starts `nodepulse-demo` as `make demo` does (`DEMO_K8S=1 make demo` with `k8s`).
    fn start(k8s: bool) -> Demo {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        nix::sys::prctl::set_child_subreaper(true).expect("become a child subreaper");
        // What the demo runs, built first if this machine lacks it (the tools) or checked.
        tool("etcd");
        project_bin("nodepulse-agent");
        project_bin("nodepulsectl");
        if k8s {
            tool("kube-apiserver");
            tool("kubectl");
            project_bin("nodepulse-controller");
        }
        let mut cmd = Command::new(project_bin("nodepulse-demo"));
        cmd.env("DEMO_TTL", TTL.to_string())
            .env("DEMO_K8S", if k8s { "1" } else { "0" })
            .env_remove("DEMO_KEEP")
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env_remove("NODEPULSE_ETCD_ENDPOINTS");
        Demo {
            process: Process::spawn(if k8s { "demo-k8s" } else { "demo" }, cmd),
            _serial: serial,
        }
    }

    fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    /// The first line from index `from` on that satisfies `pred`, within `within`; fails at
    /// once when the demo has exited without printing it.
    fn line(
        &mut self,
        from: usize,
        within: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, Line) {
        let deadline = Instant::now() + within;
        loop {
            let exited = !self.process.is_running();
            let left = deadline.saturating_duration_since(Instant::now());
            let slice = if exited {
                Duration::ZERO
            } else {
                left.min(Duration::from_millis(200))
            };
            if let Some(found) = self.process.next_line_from(from, slice, &pred) {
                return found;
            }
            if exited {
                // Its last lines may still be on their way: read them all, then look once more.
                let status = self.process.wait_exit(Duration::from_secs(5));
                if let Some(found) = self.process.next_line_from(from, Duration::ZERO, &pred) {
                    return found;
                }
                panic!(
                    "the demo exited ({status:?}) without {what}; its output:\n{}",
                    self.out()
                );
            }
            assert!(
                !left.is_zero(),
                "no {what} from the demo within {within:?}; its output:\n{}",
                self.out()
            );
        }
    }

    /// The etcd endpoint from the demo's first line.
    fn etcd_endpoint(&mut self) -> String {
        let (_, line) = self.line(0, Duration::from_secs(60), "the etcd line", |l| {
            l.starts_with("[demo] starting etcd on http://")
        });
        line.text
            .strip_prefix("[demo] starting etcd on ")
            .and_then(|l| l.split_whitespace().next())
            .expect("an endpoint after \"starting etcd on\"")
            .to_string()
    }

    /// Waits for the demo's exit (its stopping is bounded: 5 s per process).
    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let status = self
            .process
            .wait_exit(within)
            .unwrap_or_else(|| panic!("the demo still runs after {within:?}:\n{}", self.out()));
        status.code()
    }

    fn out(&self) -> String {
        self.process.output_text()
    }
}

/// After the demo has exited and been reaped: none of `seen` (what it ran at some point) still
/// exists, and nothing else was handed to this test (the subreaper) either. Cleans up what it
/// finds before it fails.
fn assert_nothing_left(seen: &[Proc], demo: &Demo) {
    let me = std::process::id() as i32;
    let mut left: Vec<Proc> = seen.iter().filter(|p| still_there(p)).cloned().collect();
    for p in processes().into_iter().filter(|p| p.ppid == me) {
        if !left.iter().any(|l| l.pid == p.pid) {
            left.push(p);
        }
    }
    for p in &left {
        let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        if process(p.pid).is_some_and(|now| now.ppid == me) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(p.pid), None);
        }
    }
    assert!(
        left.is_empty(),
        "the demo left behind {left:?}; its output:\n{}",
        demo.out()
    );
}

/// Asserts that `names` (process names, `comm`) all run among `tree`.
fn assert_running(tree: &[Proc], names: &[&str]) {
    for name in names {
        assert!(
            tree.iter().any(|p| p.comm == *name && p.state != 'Z'),
            "no {name} under the demo: {tree:?}"
        );
    }
}

/// Nothing answers at `endpoint` (`http://127.0.0.1:<port>`) any more.
fn assert_gone(endpoint: &str) {
    let addr = endpoint.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "etcd at {endpoint} still answers after the demo"
    );
}

/// The agent's own timestamp at the start of an `[agent] <RFC 3339> INFO ...` line.
fn agent_time(line: &str) -> jiff::Timestamp {
    line.split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
}

#[test]
fn make_demo_plays_the_four_steps_within_their_deadlines_and_stops_everything() {
    let mut demo = Demo::start(false);
    let secs = Duration::from_secs;
    let endpoint = demo.etcd_endpoint();

    // 1. The watcher starts and says there is no node.
    let (i, _) = demo.line(0, secs(15), "[demo] 1.", |l| {
        l == "[demo] 1. The server watches /monitor/heartbeat/ (nodepulsectl watch): no node yet"
    });
    let (i, _) = demo.line(i, secs(10), "[watch] no node yet", |l| {
        l.starts_with("[watch] ") && l.contains(" No node yet: no key under /monitor/heartbeat/")
    });

    // 2. Alive within 2 s of the agent's start.
    let (i, _) = demo.line(i, secs(10), "[demo] 2.", |l| {
        l == format!(
            "[demo] 2. Start the agent as worker-1 (interval 10 s by default, heartbeat lease TTL {TTL} s)"
        )
    });
    let (i, started) = demo.line(i, secs(10), "the agent's command line", |l| {
        l == format!(
            "[demo] nodepulse-agent --node-name worker-1 --heartbeat-ttl {TTL} --etcd-endpoints {endpoint}"
        )
    });
    let (i, alive) = demo.line(i, secs(10), "[watch] Node worker-1 Alive", |l| {
        l.starts_with("[watch] ") && l.ends_with(" Node worker-1 Alive")
    });
    let took = alive.at - started.at;
    assert!(took <= secs(2), "Alive {took:?} after the agent's start");
    let (i, _) = demo.line(i, secs(5), "the demo's Alive figure", |l| {
        l.starts_with("[demo] the watcher saw worker-1 alive ")
    });
    let tree = descendants(demo.pid());
    assert_running(&tree, &["etcd", "nodepulsectl", "nodepulse-agent"]);

    // 3. "config updated" within 1 s of the push, then samples 2 s apart.
    let (i, push) = demo.line(i, secs(20), "the push", |l| {
        l == "[demo] nodepulsectl config set worker-1 --interval 2 --metrics cpu,memory"
    });
    let (_, _) = demo.line(i, secs(5), "[nodepulsectl]'s answer", |l| {
        l.starts_with("[nodepulsectl] /monitor/config/worker-1 = {\"interval\":2,")
    });
    let (i, updated) = demo.line(i, secs(5), "[agent] config updated", |l| {
        l.starts_with("[agent] ") && l.contains(" config updated: interval 10s -> 2s")
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
        let (next, sample) = demo.line(i + 1, secs(5), &format!("sample {n}"), |l| {
            l.starts_with("[agent] ") && l.contains(" INFO sample cpu=")
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
    let (i, _) = demo.line(i, secs(10), "the nodes table", |l| {
        l.starts_with("[nodepulsectl] worker-1 ") && l.contains(" Alive ")
    });

    // 4. The agent SIGKILLed: gone at once, and Dead a lease TTL later, not sooner than the
    // TTL less the agent's keep-alive period (a third of it), not later than TTL + 2 s.
    let (i, kill_line) = demo.line(i, secs(10), "the kill", |l| {
        l.starts_with("[demo] 4. Kill the agent hard (kill -9 ")
    });
    let pid: i32 = kill_line
        .text
        .split("kill -9 ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {:?}", kill_line.text));
    let agent = tree
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("kill -9 {pid}: not a process of the demo: {tree:?}"));
    assert_eq!(agent.comm, "nodepulse-agent", "kill -9 {pid}");
    wait_until("the killed agent to be gone", secs(2), || {
        !still_there(agent)
    });
    let (i, dead) = demo.line(
        i,
        secs(TTL + 5),
        "[watch] Node worker-1 Dead (heartbeat expired)",
        |l| l.starts_with("[watch] ") && l.ends_with(" Node worker-1 Dead (heartbeat expired)"),
    );
    let took = dead.at - kill_line.at;
    let earliest = Duration::from_millis(TTL * 1000 * 2 / 3) - Duration::from_millis(300);
    assert!(
        (earliest..=secs(TTL + 2)).contains(&took),
        "Dead {took:?} after the kill (TTL {TTL} s)"
    );
    let (i, _) = demo.line(i, secs(5), "the Done line", |l| {
        l.starts_with("[demo] Done: Alive after ") && l.ends_with(" s after kill -9.")
    });

    // The demo ends by itself and stops what it started.
    demo.line(i, secs(20), "the end", |l| {
        l == "[demo] stopped everything it started"
    });
    let code = demo.exit_code(secs(10));
    assert_eq!(code, Some(0), "{}", demo.out());
    assert!(!demo.out().contains("FAILED"), "{}", demo.out());
    assert_gone(&endpoint);
    assert_nothing_left(&tree, &demo);
}

#[test]
fn ctrl_c_mid_scenario_stops_everything_the_demo_started_last_first_and_exits_130() {
    let mut demo = Demo::start(false);
    let secs = Duration::from_secs;
    let endpoint = demo.etcd_endpoint();
    let (i, _) = demo.line(0, secs(30), "[agent] config updated", |l| {
        l.starts_with("[agent] ") && l.contains(" config updated: interval 10s -> 2s")
    });
    // The demo's etcd holds what the steps did, seen by the test itself.
    let etcdctl = |key: &str| {
        let out = Command::new(tool("etcdctl"))
            .args(["--endpoints", &endpoint, "get", key, "--print-value-only"])
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl get {key}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let config = etcdctl("/monitor/config/worker-1");
    assert!(config.contains("\"interval\":2"), "{config}");
    assert!(
        !etcdctl("/monitor/heartbeat/worker-1").trim().is_empty(),
        "no heartbeat in the demo's etcd"
    );
    let tree = descendants(demo.pid());
    assert_running(&tree, &["etcd", "nodepulsectl", "nodepulse-agent"]);

    // A terminal's Ctrl-C reaches the demo's process group, which is the demo alone.
    let sent = Instant::now();
    demo.process.signal(Signal::SIGINT);
    let code = demo.exit_code(secs(20));
    assert_eq!(code, Some(130), "{}", demo.out());
    let (j, _) = demo.line(i, secs(5), "[demo] interrupted", |l| {
        l == "[demo] interrupted"
    });
    // The agent went first, while etcd still answered: it marked its heartbeat stopping.
    let (k, _) = demo.line(j, secs(5), "the agent's goodbye", |l| {
        l.starts_with("[agent] ") && l.contains("heartbeat marked stopping")
    });
    demo.line(k, secs(5), "the cleanup line", |l| {
        l == "[demo] stopped everything it started"
    });
    let took = sent.elapsed();
    assert!(took < secs(10), "the demo took {took:?} to stop");
    assert!(!demo.out().contains("FAILED"), "{}", demo.out());
    assert_gone(&endpoint);
    assert_nothing_left(&tree, &demo);
}

#[test]
fn demo_k8s_mode_shows_the_monitor_node_alive_then_dead_and_stops_everything() {
    let mut demo = Demo::start(true);
    let secs = Duration::from_secs;
    let endpoint = demo.etcd_endpoint();
    let row = |state: &'static str| {
        move |l: &str| {
            let cols: Vec<_> = l.split_whitespace().collect();
            cols.first() == Some(&"[kubectl]")
                && cols.get(1) == Some(&"worker-1")
                && cols.get(2) == Some(&state)
        }
    };
    // The apiserver's first start on a machine takes a while; afterwards the steps as usual.
    let (i, _) = demo.line(0, secs(180), "the controller leading", |l| {
        l.starts_with("[controller]") && l.contains("became leader")
    });
    let (i, _) = demo.line(i, secs(20), "kubectl get monitornodes: Alive", row("Alive"));
    let tree = descendants(demo.pid());
    assert_running(
        &tree,
        &[
            "etcd",
            "kube-apiserver",
            "nodepulse-contr",
            "nodepulsectl",
            "nodepulse-agent",
        ],
    );
    let (i, _) = demo.line(i, secs(20), "the MonitorConfig applied", |l| {
        l == "[kubectl] monitorconfig.nodepulse.io/demo-fast created"
    });
    let (i, _) = demo.line(i, secs(10), "[agent] config updated", |l| {
        l.starts_with("[agent] ") && l.contains(" config updated: interval 10s -> 2s")
    });
    let (i, _) = demo.line(i, secs(20), "the controller's key", |l| {
        l.contains("written by: nodepulse-controller (MonitorConfig demo-fast")
    });
    let (i, _) = demo.line(i, secs(20), "[controller] Node worker-1 Dead", |l| {
        l.starts_with("[controller]") && l.contains("Node worker-1 Dead (heartbeat expired)")
    });
    let (i, _) = demo.line(i, secs(20), "kubectl get monitornodes: Dead", row("Dead"));
    demo.line(i, secs(30), "the end", |l| {
        l == "[demo] stopped everything it started"
    });
    let code = demo.exit_code(secs(10));
    assert_eq!(code, Some(0), "{}", demo.out());
    assert_gone(&endpoint);
    assert_nothing_left(&tree, &demo);
}
