//! The env's demonstration scenario on one machine, which `make demo` runs (`nodepulse-demo`):
//!
//! 1. `nodepulsectl watch` starts: no node yet;
//! 2. an agent starts as worker-1 (interval 10 s, heartbeat lease TTL 5 s): the watcher prints
//!    `Node worker-1 Alive`;
//! 3. a new config (interval 2 s) is pushed: the agent logs it at once, and samples every 2 s;
//! 4. the agent is killed with SIGKILL: about a TTL later the watcher prints
//!    `Node worker-1 Dead (heartbeat expired)`.
//!
//! With [`Options::k8s`] (`DEMO_K8S=1`) a kube-apiserver (with an etcd of its own), the CRDs and
//! nodepulse-controller join: the config goes in as a MonitorConfig, and `kubectl get
//! monitornodes` is shown at each step. Every line says where it comes from: `[demo]`, `[watch]`,
//! `[agent]`, `[nodepulsectl]`, and `[controller]`, `[kubectl]`.
//!
//! Everything runs on loopback: our binaries bind `127.0.0.1:0`; etcd and kube-apiserver, which
//! cannot, get a [`crate::ReservedPort`]. Each step waits for its outcome with a deadline, and
//! the demo fails loudly when one does not come.
//!
//! At the end, on a failure, and on Ctrl-C (SIGINT) or SIGTERM, the demo stops what it started in
//! reverse order, one at a time (SIGTERM, SIGKILL after 5 s), so that the agent and the watcher
//! stop while etcd still answers, and says `[demo] stopped everything it started`. Its children
//! run in process groups of their own (see `crate::process`), so a Ctrl-C in the terminal reaches
//! the demo alone; if the demo is SIGKILLed, the kernel kills them (PR_SET_PDEATHSIG).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use crate::apiserver::KubeApiserver;
use crate::etcd::Etcd;
use crate::nodepulse::Launch;
use crate::process::{Line, Process};
use crate::scratch_dir;
use crate::tools::{project_bin_dir, repo_root, tools_dir};

/// The node the agent reports as.
const NODE: &str = "worker-1";

/// How often a wait looks at the interrupt flag, at most.
const SLICE: Duration = Duration::from_millis(100);

/// How long a stopping process gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the demo ended before its last step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Ctrl-C (SIGINT) or SIGTERM.
    #[error("interrupted")]
    Interrupted,
    /// A program the demo runs is not built.
    #[error("{what} is missing: run `{hint}` (it builds what the demo runs first)")]
    Missing {
        /// Where the program was looked for.
        what: String,
        /// The command that builds it.
        hint: &'static str,
    },
    /// A process did not print the line a step waits for.
    #[error("no {what} within {} s; last lines of {who}:\n{}", .within.as_secs(), indented(.last))]
    NoLine {
        /// The line.
        what: String,
        /// The step's deadline.
        within: Duration,
        /// The process.
        who: &'static str,
        /// Its last lines.
        last: String,
    },
    /// A condition a step waits for did not come true.
    #[error("no {what} within {} s", .within.as_secs())]
    Timeout {
        /// The condition.
        what: String,
        /// The step's deadline.
        within: Duration,
    },
    /// A server exited early, or a command failed.
    #[error("{what}; its output:\n{}", indented(.output))]
    Failed {
        /// What happened.
        what: String,
        /// The process's output.
        output: String,
    },
    /// SIGINT and SIGTERM could not be blocked.
    #[error("take over SIGINT and SIGTERM")]
    Signals(#[source] nix::Error),
    /// A thread could not be started.
    #[error("start the signal thread")]
    Thread(#[source] std::io::Error),
}

/// The demo's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the demo runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Add kube-apiserver, the CRDs and nodepulse-controller.
    pub k8s: bool,
    /// The agent's heartbeat lease TTL, in seconds.
    pub ttl: u64,
    /// Keep every process's output in a directory at the end (kept anyway on a failure).
    pub keep: bool,
    /// The `RUST_LOG` filter of the processes the demo starts.
    pub log: String,
}

/// Ctrl-C (SIGINT) or SIGTERM, once it came. Every wait of the demo goes through it, so that a
/// Ctrl-C ends any of them within [`SLICE`].
#[derive(Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Takes SIGINT and SIGTERM over: blocks them in this thread, and so in every thread started
    /// after it (call it first thing in `main`), and waits for them in a thread of its own, which
    /// says `[demo] interrupted` and raises the flag; later ones are swallowed, so that nothing
    /// interrupts the stopping (bounded by [`STOP_GRACE`] per process). Children get an empty
    /// signal mask at exec. A blocked signal is queued even when inherited as ignored (`make demo
    /// &`), so Ctrl-C works there too.
    pub fn install() -> Result<Interrupt> {
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        signals.thread_block().map_err(Error::Signals)?;
        let flag = Arc::new(AtomicBool::new(false));
        let raised = flag.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(_signal) = signals.wait() {
                    if !raised.swap(true, Ordering::SeqCst) {
                        println!("\n[demo] interrupted");
                    }
                }
            })
            .map_err(Error::Thread)?;
        Ok(Interrupt(flag))
    }

    #[cfg(test)]
    fn never() -> Interrupt {
        Interrupt(Arc::new(AtomicBool::new(false)))
    }

    fn check(&self) -> Result<()> {
        if self.0.load(Ordering::SeqCst) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Waits until a line of `process` (from index `from` on) satisfies `pred`.
    fn line(
        &self,
        (who, process): (&'static str, &Process),
        from: usize,
        within: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Line)> {
        let deadline = Instant::now() + within;
        loop {
            self.check()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::NoLine {
                    what: what.to_string(),
                    within,
                    who,
                    last: last_lines(&process.output_text(), 20),
                });
            }
            if let Some(found) = process.next_line_from(from, left.min(SLICE), &pred) {
                return Ok(found);
            }
        }
    }

    /// Calls `probe` every `every` until it returns `Some`.
    fn poll<T>(
        &self,
        what: &str,
        within: Duration,
        every: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        loop {
            self.check()?;
            if let Some(value) = probe()? {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    within,
                });
            }
            std::thread::sleep(every.min(left).min(SLICE));
        }
    }

    /// Runs a short command with its lines shown as `[name] ...`, and waits for it to succeed.
    fn run_shown(&self, name: &'static str, cmd: Command, within: Duration) -> Result<()> {
        let shown = format!("{cmd:?}");
        let mut process = Process::spawn_echoed(name, cmd);
        let deadline = Instant::now() + within;
        let status = loop {
            self.check()?;
            if let Some(status) = process.wait_exit(SLICE) {
                break status;
            }
            if Instant::now() >= deadline {
                return Err(Error::Failed {
                    what: format!("{shown} still running after {} s", within.as_secs()),
                    output: process.output_text(),
                });
            }
        };
        // The exit can come before the last lines are read: they are shown before what follows.
        process.wait_exit(Duration::from_secs(2));
        if status.success() {
            Ok(())
        } else {
            Err(Error::Failed {
                what: format!("{shown} exited with {status}"),
                output: process.output_text(),
            })
        }
    }
}

/// What the demo started, each in its slot; stopped in reverse order of starting.
#[derive(Default)]
struct Started {
    etcd: Option<Etcd>,
    apiserver: Option<KubeApiserver>,
    controller: Option<Process>,
    watch: Option<Process>,
    agent: Option<Process>,
    /// Each stopped process's output, for [`Started::keep_logs`].
    logs: Vec<(&'static str, String)>,
    stopped: bool,
}

impl Started {
    /// Stops everything, the last started first, one at a time; the servers go last.
    fn stop(&mut self) {
        self.stopped = true;
        for (name, slot) in [
            ("agent", &mut self.agent),
            ("watch", &mut self.watch),
            ("controller", &mut self.controller),
        ] {
            if let Some(mut process) = slot.take() {
                if process.is_running() {
                    process.signal(Signal::SIGTERM);
                }
                // Reaps it, and waits for its last lines to be shown.
                if process.wait_exit(STOP_GRACE).is_none() {
                    process.kill_hard();
                }
                self.logs.push((name, process.output_text()));
            }
        }
        if let Some(apiserver) = self.apiserver.take() {
            self.logs.push(("kube-apiserver", apiserver.output_text()));
        }
        if let Some(mut etcd) = self.etcd.take() {
            self.logs.push(("etcd", etcd.output_text()));
            etcd.kill();
        }
    }

    /// Writes every stopped process's output to `<name>.log` in a directory that stays.
    fn keep_logs(&self) -> std::io::Result<PathBuf> {
        let dir = scratch_dir("demo").keep();
        for (name, output) in &self.logs {
            std::fs::write(dir.join(format!("{name}.log")), format!("{output}\n"))?;
        }
        Ok(dir)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // Unwinding from a panic: [`run`] did not get to stop anything.
        if !self.stopped {
            self.stop();
            println!("[demo] stopped everything it started");
        }
    }
}

/// Plays the scenario, then stops everything it started (also when a step fails or `interrupt`
/// comes). Failures are printed as `[demo] FAILED: ...`.
pub fn run(options: &Options, interrupt: &Interrupt) -> Result<()> {
    let mut scenario = Scenario {
        options,
        interrupt,
        bin: project_bin_dir(),
        endpoint: String::new(),
        started: Started::default(),
    };
    let played = scenario.check().and_then(|()| scenario.play());
    let failed = match &played {
        Ok(()) | Err(Error::Interrupted) => false,
        Err(e) => {
            eprintln!("[demo] FAILED: {e}");
            true
        }
    };
    scenario.started.stop();
    if (options.keep || failed) && !scenario.started.logs.is_empty() {
        match scenario.started.keep_logs() {
            Ok(dir) => println!("[demo] logs kept in {}", dir.display()),
            Err(e) => eprintln!("[demo] could not keep the logs: {e}"),
        }
    }
    println!("[demo] stopped everything it started");
    played
}

/// One run of the demo.
struct Scenario<'a> {
    options: &'a Options,
    interrupt: &'a Interrupt,
    /// Where our binaries are: beside the demo's own executable.
    bin: PathBuf,
    /// The etcd nodepulse uses, `http://127.0.0.1:<port>`.
    endpoint: String,
    started: Started,
}

impl Scenario<'_> {
    /// Fails at once, saying how to build it, when something the demo runs is not built.
    fn check(&self) -> Result<()> {
        let k8s = self.options.k8s;
        let hint = if k8s {
            "DEMO_K8S=1 make demo"
        } else {
            "make demo"
        };
        let mut tools = vec!["etcd"];
        let mut binaries = vec!["nodepulse-agent", "nodepulsectl"];
        if k8s {
            tools.extend(["kube-apiserver", "kubectl"]);
            binaries.push("nodepulse-controller");
        }
        let tools = tools.into_iter().map(|t| tools_dir().join(t));
        let binaries = binaries.into_iter().map(|b| self.bin.join(b));
        match tools.chain(binaries).find(|path| !path.exists()) {
            Some(path) => Err(Error::Missing {
                what: path.display().to_string(),
                hint,
            }),
            None => Ok(()),
        }
    }

    fn play(&mut self) -> Result<()> {
        self.start_etcd()?;
        if self.options.k8s {
            self.start_k8s()?;
        }
        self.watch()?;
        let alive_after = self.start_agent()?;
        let applied_after = self.push_config()?;
        let dead_after = self.kill_agent()?;
        say(&format!(
            "Done: Alive after {} s, config applied after {} s, Dead {} s after kill -9.",
            secs(alive_after),
            secs(applied_after),
            secs(dead_after)
        ));
        Ok(())
    }

    fn start_etcd(&mut self) -> Result<()> {
        let etcd = self.started.etcd.insert(Etcd::spawn());
        self.endpoint = etcd.endpoint.clone();
        say(&format!(
            "starting etcd on {} (a single member, data in {})",
            etcd.endpoint,
            etcd.data_dir().display()
        ));
        self.interrupt.poll(
            "answer from etcd's /health",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || match etcd.probe() {
                Ok(healthy) => Ok(healthy.then_some(())),
                Err(output) => Err(Error::Failed {
                    what: "etcd exited before it answered".into(),
                    output,
                }),
            },
        )
    }

    /// kube-apiserver, the CRDs and the controller.
    fn start_k8s(&mut self) -> Result<()> {
        let interrupt = self.interrupt;
        let api = self.started.apiserver.insert(KubeApiserver::spawn());
        say(&format!(
            "DEMO_K8S=1: starting kube-apiserver on {} (with an etcd of its own) and nodepulse-controller",
            api.url
        ));
        // Its first start on a machine takes a while.
        interrupt.poll(
            "ready kube-apiserver (/readyz)",
            Duration::from_secs(120),
            Duration::from_millis(200),
            || match api.probe_ready() {
                Ok(ready) => Ok(ready.then_some(())),
                Err(output) => Err(Error::Failed {
                    what: "kube-apiserver exited before it was ready".into(),
                    output: last_lines(&output, 20),
                }),
            },
        )?;
        interrupt.poll(
            "namespace default in kube-apiserver",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || {
                let out = api.kubectl(&["get", "namespace", "default"]);
                Ok(out.status.success().then_some(()))
            },
        )?;
        let kubectl = api.kubectl_cli();
        let crds = repo_root().join(nodepulse_crd::GENERATED_CRD_PATHS[1]);
        note("kubectl apply --server-side -f manifests/00-crds.yaml");
        interrupt.run_shown(
            "kubectl",
            kubectl.command(&["apply", "--server-side", "-f", &crds.to_string_lossy()]),
            Duration::from_secs(60),
        )?;
        interrupt.run_shown(
            "kubectl",
            kubectl.command(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/monitornodes.nodepulse.io",
                "crd/monitorconfigs.nodepulse.io",
            ]),
            Duration::from_secs(70),
        )?;
        note(&format!(
            "nodepulse-controller --leader-election-namespace default --etcd-endpoints {}",
            self.endpoint
        ));
        let launch = Launch::controller(&api.kubeconfig, "nodepulse-demo")
            .etcd(&self.endpoint)
            .log(&self.options.log);
        let controller = self
            .started
            .controller
            .insert(Process::spawn_echoed("controller", launch.command()));
        interrupt.line(
            ("the controller", controller),
            0,
            Duration::from_secs(30),
            "\"became leader\" from the controller",
            |l| l.contains("became leader"),
        )?;
        Ok(())
    }

    /// Step 1: the watcher.
    fn watch(&mut self) -> Result<()> {
        say("1. The server watches /monitor/heartbeat/ (nodepulsectl watch): no node yet");
        let watch = self.started.watch.insert(Process::spawn_echoed(
            "watch",
            nodepulsectl(self, &["watch"]),
        ));
        self.interrupt.line(
            ("the watcher", watch),
            0,
            Duration::from_secs(10),
            "first output of the watcher",
            |l| l.contains("No node yet") || l.starts_with("NODE"),
        )?;
        self.show_monitornodes(None)
    }

    /// Step 2: the agent, until the watcher sees it alive. Returns how long that took.
    fn start_agent(&mut self) -> Result<Duration> {
        let ttl = self.options.ttl;
        say(&format!(
            "2. Start the agent as {NODE} (interval 10 s by default, heartbeat lease TTL {ttl} s)"
        ));
        note(&format!(
            "nodepulse-agent --node-name {NODE} --heartbeat-ttl {ttl} --etcd-endpoints {}",
            self.endpoint
        ));
        let launch = Launch::agent(NODE)
            .ttl(ttl)
            .etcd(&self.endpoint)
            .log(&self.options.log);
        let started_at = Instant::now();
        let agent = &*self
            .started
            .agent
            .insert(Process::spawn_echoed("agent", launch.command()));
        let watch = self
            .started
            .watch
            .as_ref()
            .expect("step 1 started the watcher");
        let (_, alive) = self.interrupt.line(
            ("the watcher", watch),
            0,
            Duration::from_secs(10),
            &format!("\"Node {NODE} Alive\" from the watcher"),
            |l| l.ends_with(&format!("Node {NODE} Alive")),
        )?;
        let alive_after = alive.at - started_at;
        note(&format!(
            "the watcher saw {NODE} alive {} s after the agent started",
            secs(alive_after)
        ));
        self.interrupt.line(
            ("the agent", agent),
            0,
            Duration::from_secs(15),
            "first sample line of the agent",
            is_sample,
        )?;
        if let Some(controller) = &self.started.controller {
            self.interrupt.line(
                ("the controller", controller),
                0,
                Duration::from_secs(10),
                &format!("\"Node {NODE} Alive\" from the controller"),
                |l| l.contains(&format!("Node {NODE} Alive")),
            )?;
        }
        self.show_monitornodes(Some("Alive"))?;
        Ok(alive_after)
    }

    /// Step 3: a new config, until the agent has sampled three times at its interval. Returns
    /// how long the agent took to apply it.
    fn push_config(&self) -> Result<Duration> {
        say(&format!(
            "3. Push a new config to {NODE}: interval 2 s, metrics cpu and memory"
        ));
        let agent = self.agent_process();
        let mark = agent.line_count();
        let pushed_at = if let Some(api) = &self.started.apiserver {
            // The Kubernetes way: a MonitorConfig; the controller writes /monitor/config/worker-1.
            let manifest = format!(
                "apiVersion: nodepulse.io/v1alpha1\nkind: MonitorConfig\nmetadata:\n  name: demo-fast\nspec:\n  nodeNames: [{NODE}]\n  interval: 2\n  metrics: [cpu, memory]\n"
            );
            note("kubectl apply -f - <<EOF");
            for line in manifest.lines() {
                println!("[demo]   {line}");
            }
            note("EOF");
            let pushed_at = Instant::now();
            let out = api.kubectl_stdin(&["apply", "-f", "-"], &manifest);
            let output = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for line in output.lines() {
                println!("[kubectl] {line}");
            }
            if !out.status.success() {
                return Err(Error::Failed {
                    what: format!("kubectl apply of MonitorConfig demo-fast: {}", out.status),
                    output,
                });
            }
            pushed_at
        } else {
            note(&format!(
                "nodepulsectl config set {NODE} --interval 2 --metrics cpu,memory"
            ));
            note(&format!(
                "  (the same as: etcdctl put /monitor/config/{NODE} '{{\"interval\": 2, \"metrics\": [\"cpu\",\"memory\"]}}')"
            ));
            let pushed_at = Instant::now();
            self.interrupt.run_shown(
                "nodepulsectl",
                nodepulsectl(
                    self,
                    &[
                        "config",
                        "set",
                        NODE,
                        "--interval",
                        "2",
                        "--metrics",
                        "cpu,memory",
                    ],
                ),
                Duration::from_secs(30),
            )?;
            pushed_at
        };
        let (mut n, updated) = self.interrupt.line(
            ("the agent", agent),
            mark,
            Duration::from_secs(5),
            "\"config updated\" line from the agent",
            |l| l.contains("config updated"),
        )?;
        let applied_after = updated.at - pushed_at;
        note(&format!(
            "the agent applied it {} s after the push; its samples now come every 2 s:",
            secs(applied_after)
        ));
        // Let the viewer see the new cadence: three samples after the update.
        for i in 1..=3 {
            (n, _) = self.interrupt.line(
                ("the agent", agent),
                n + 1,
                Duration::from_secs(5),
                &format!("sample line {i} after the update"),
                is_sample,
            )?;
        }
        note(
            "nodepulsectl nodes   (the heartbeat value is rewritten at most every 5 s; liveness rides on the lease)",
        );
        self.interrupt.run_shown(
            "nodepulsectl",
            nodepulsectl(self, &["nodes"]),
            Duration::from_secs(30),
        )?;
        if let Some(api) = &self.started.apiserver {
            note(&format!(
                "nodepulsectl config get {NODE}   (the key the controller wrote)"
            ));
            self.interrupt.run_shown(
                "nodepulsectl",
                nodepulsectl(self, &["config", "get", NODE]),
                Duration::from_secs(30),
            )?;
            note("kubectl get monitorconfigs");
            self.interrupt.run_shown(
                "kubectl",
                api.kubectl_cli().command(&["get", "monitorconfigs"]),
                Duration::from_secs(30),
            )?;
        }
        self.show_monitornodes(Some("Alive"))?;
        Ok(applied_after)
    }

    /// Step 4: SIGKILL, until the watcher reports the node dead. Returns how long that took.
    fn kill_agent(&mut self) -> Result<Duration> {
        let ttl = self.options.ttl;
        let agent = self
            .started
            .agent
            .as_mut()
            .expect("step 2 started the agent");
        say(&format!(
            "4. Kill the agent hard (kill -9 {}): no goodbye, etcd expires its lease after ~{ttl} s",
            agent.pid()
        ));
        let watch = self
            .started
            .watch
            .as_ref()
            .expect("step 1 started the watcher");
        let mark = watch.line_count();
        let controller_mark = self.started.controller.as_ref().map(Process::line_count);
        let killed_at = Instant::now();
        agent.kill_hard();
        let (_, dead) = self.interrupt.line(
            ("the watcher", watch),
            mark,
            Duration::from_secs(ttl + 10),
            &format!("\"Node {NODE} Dead\" from the watcher"),
            |l| l.contains(&format!("Node {NODE} Dead")),
        )?;
        let dead_after = dead.at - killed_at;
        note(&format!(
            "the watcher reported {NODE} dead {} s after the kill (TTL {ttl} s)",
            secs(dead_after)
        ));
        if let (Some(controller), Some(mark)) = (&self.started.controller, controller_mark) {
            self.interrupt.line(
                ("the controller", controller),
                mark,
                Duration::from_secs(10),
                &format!("\"Node {NODE} Dead\" from the controller"),
                |l| l.contains(&format!("Node {NODE} Dead")),
            )?;
        }
        self.show_monitornodes(Some("Dead"))?;
        Ok(dead_after)
    }

    /// With kube-apiserver: waits (15 s at most) until the MonitorNode shows `state`, then
    /// shows `kubectl get monitornodes`.
    fn show_monitornodes(&self, state: Option<&str>) -> Result<()> {
        let Some(api) = &self.started.apiserver else {
            return Ok(());
        };
        if let Some(state) = state {
            let shown = self.interrupt.poll(
                &format!("MonitorNode {NODE} {state}"),
                Duration::from_secs(15),
                Duration::from_millis(200),
                || {
                    let out = api.kubectl(&[
                        "get",
                        "monitornode",
                        NODE,
                        "-o",
                        "jsonpath={.status.state}",
                    ]);
                    Ok((out.status.success() && out.stdout == state.as_bytes()).then_some(()))
                },
            );
            match shown {
                Ok(()) => {}
                // Shown as it is, then.
                Err(Error::Timeout { .. }) => {
                    note(&format!("MonitorNode {NODE} is not {state} after 15 s"))
                }
                Err(e) => return Err(e),
            }
        }
        note("kubectl get monitornodes");
        self.interrupt.run_shown(
            "kubectl",
            api.kubectl_cli().command(&["get", "monitornodes"]),
            Duration::from_secs(30),
        )
    }

    fn agent_process(&self) -> &Process {
        self.started
            .agent
            .as_ref()
            .expect("step 2 started the agent")
    }
}

/// `nodepulsectl <args>` against the demo's etcd.
fn nodepulsectl(scenario: &Scenario, args: &[&str]) -> Command {
    let mut cmd = Command::new(scenario.bin.join("nodepulsectl"));
    cmd.args(args)
        .env("NODEPULSE_ETCD_ENDPOINTS", &scenario.endpoint)
        .env("RUST_LOG", &scenario.options.log);
    cmd
}

/// One of the agent's `sample cpu=...` lines.
fn is_sample(line: &str) -> bool {
    line.contains(" sample ")
}

/// A narration line after a blank one: a step begins.
fn say(text: &str) {
    println!("\n[demo] {text}");
}

/// A narration line.
fn note(text: &str) {
    println!("[demo] {text}");
}

/// Seconds with two decimals.
fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `text` with each line under `[demo]`, indented.
fn indented(text: &str) -> String {
    text.lines()
        .map(|l| format!("[demo]   {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_line_names_the_process_and_shows_its_last_lines_under_demo() {
        let e = Error::NoLine {
            what: "\"Node worker-1 Alive\" from the watcher".into(),
            within: Duration::from_secs(10),
            who: "the watcher",
            last: last_lines("one\ntwo\nthree", 2),
        };
        assert_eq!(
            e.to_string(),
            "no \"Node worker-1 Alive\" from the watcher within 10 s; last lines of the watcher:\n[demo]   two\n[demo]   three"
        );
    }

    #[test]
    fn a_wait_ends_at_once_when_interrupted() {
        let interrupt = Interrupt::never();
        interrupt.0.store(true, Ordering::SeqCst);
        let started = Instant::now();
        let waited = interrupt.poll("nothing", Duration::from_secs(30), SLICE, || Ok(None::<()>));
        assert!(matches!(waited, Err(Error::Interrupted)), "{waited:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_poll_times_out_at_its_deadline() {
        let waited = Interrupt::never().poll(
            "nothing",
            Duration::from_millis(200),
            Duration::from_millis(20),
            || Ok(None::<()>),
        );
        assert!(matches!(waited, Err(Error::Timeout { .. })), "{waited:?}");
    }
}
