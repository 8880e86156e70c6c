//! Child processes that die with the test: SIGKILLed on drop, and SIGKILLed by the kernel if the
//! test binary itself dies. Their output is kept line by line, with the time each line arrived.
//!
//! Each child runs in a process group of its own, so that a Ctrl-C in the terminal reaches only
//! the program that started it (a test binary, which then dies and takes its children with it;
//! the demo, which stops its children itself, in order) and not the children all at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal, kill};
use nix::unistd::Pid;

/// One line a child printed, with the moment the harness read it.
#[derive(Clone, Debug)]
pub struct Line {
    /// When the line arrived.
    pub at: Instant,
    /// The text, without its newline.
    pub text: String,
}

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<Line>>,
    changed: Condvar,
    /// Streams (stdout, stderr) read to their end; counted under `lines`' lock.
    ended: AtomicUsize,
}

/// Where a child's lines are echoed as they arrive, besides being kept.
#[derive(Clone, Copy, PartialEq)]
enum Echo {
    /// Kept only (echoed to stderr with `TESTKIT_VERBOSE=1`).
    Quiet,
    /// Echoed to stdout as `[name] line`.
    Stdout,
}

/// A running child process owned by a test.
pub struct Process {
    name: String,
    child: Child,
    output: Arc<Output>,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns from one thread that lives as long as the test binary: PR_SET_PDEATHSIG fires when the
/// *thread* that forked the child exits, and test threads come and go.
fn spawn_from_keeper(cmd: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let tx = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the testkit spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .expect("spawner lock")
        .send((cmd, reply_tx))
        .expect("spawner thread alive");
    reply_rx.recv().expect("spawner replies")
}

impl Process {
    /// Starts `cmd`, capturing stdout and stderr. `name` prefixes its lines when
    /// `TESTKIT_VERBOSE=1` echoes them.
    pub fn spawn(name: &str, cmd: Command) -> Process {
        Process::spawn_with(name, cmd, Echo::Quiet)
    }

    /// [`Process::spawn`], and every line echoed to stdout as `[name] line` as it arrives
    /// (before a waiter sees it), as the demo shows its processes.
    pub fn spawn_echoed(name: &str, cmd: Command) -> Process {
        Process::spawn_with(name, cmd, Echo::Stdout)
    }

    fn spawn_with(name: &str, mut cmd: Command, echo: Echo) -> Process {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl, sigaction and pthread_sigmask are async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
                // A test binary started in the background by a script (`make test &`) inherits
                // SIGINT ignored, and a child shell could then neither trap nor receive it: the
                // children run as if started from a terminal.
                for sig in [Signal::SIGINT, Signal::SIGQUIT] {
                    nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl)
                        .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
                }
                // Nor any signal blocked: the mask survives fork and exec, and the demo blocks
                // SIGINT and SIGTERM in all its threads to take them in one of its own.
                SigSet::empty()
                    .thread_set_mask()
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
                Ok(())
            });
        }
        let program = format!("{:?}", cmd.get_program());
        let mut child = spawn_from_keeper(cmd).unwrap_or_else(|e| panic!("start {program}: {e}"));
        let output = Arc::new(Output::default());
        let verbose = std::env::var_os("TESTKIT_VERBOSE").is_some();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
            let output = output.clone();
            let name = name.to_string();
            std::thread::spawn(move || {
                for text in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo == Echo::Stdout {
                        // A closed stdout (`| head`) loses the echo, not the line.
                        let _ = writeln!(std::io::stdout().lock(), "[{name}] {text}");
                    } else if verbose {
                        eprintln!("[{name}] {text}");
                    }
                    let mut lines = output.lines.lock().expect("lines lock");
                    lines.push(Line {
                        at: Instant::now(),
                        text,
                    });
                    output.changed.notify_all();
                }
                let _lines = output.lines.lock().expect("lines lock");
                output.ended.fetch_add(1, Ordering::SeqCst);
                output.changed.notify_all();
            });
        }
        Process {
            name: name.to_string(),
            child,
            output,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far.
    pub fn lines(&self) -> Vec<Line> {
        self.output.lines.lock().expect("lines lock").clone()
    }

    /// All output so far as one string, for assertion messages.
    pub fn output_text(&self) -> String {
        self.lines()
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until a line printed at index `from` or later satisfies `pred`; panics with the
    /// output when `timeout` passes first. Returns the line's index and the line.
    pub fn wait_for_line_from(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, Line) {
        self.next_line_from(from, timeout, pred).unwrap_or_else(|| {
            panic!(
                "{}: no line {what} within {timeout:?}; output:\n{}",
                self.name,
                self.output_text()
            )
        })
    }

    /// [`Process::wait_for_line_from`] that returns `None` when `timeout` passes first, for a
    /// caller that waits in slices (and checks something else in between) or fails its own way.
    pub fn next_line_from(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<(usize, Line)> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.output.lines.lock().expect("lines lock");
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(&l.text))
            {
                return Some((i, l.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .output
                .changed
                .wait_timeout(lines, deadline - now)
                .expect("lines lock")
                .0;
        }
    }

    /// [`Process::wait_for_line_from`] from the first line.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Line {
        self.wait_for_line_from(0, timeout, what, pred).1
    }

    /// The address in this process's `serving /metrics ... on <addr>` line, if it printed one
    /// yet (non-blocking twin of [`Process::wait_for_serving_addr`]).
    pub fn serving_addr(&self) -> Option<String> {
        let lines = self.output.lines.lock().expect("lines lock");
        lines
            .iter()
            .find_map(|l| serving_addr(&l.text).map(str::to_string))
    }

    /// The address one of the project's binaries started with `--metrics-addr 127.0.0.1:0`
    /// serves on: waits for its `serving /metrics ... on <addr>` line (text or JSON logs) and
    /// returns `<addr>`, e.g. `127.0.0.1:40123`.
    pub fn wait_for_serving_addr(&self, timeout: Duration) -> String {
        let line = self.wait_for_line(timeout, "serving /metrics ... on <addr>", |l| {
            serving_addr(l).is_some()
        });
        serving_addr(&line.text)
            .expect("matched a serving line")
            .to_string()
    }

    /// The number of lines printed so far (a cursor for `wait_for_line_from`).
    pub fn line_count(&self) -> usize {
        self.output.lines.lock().expect("lines lock").len()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// SIGKILL and reap: the crash case.
    pub fn kill_hard(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `timeout`. Once it has, waits (within the same
    /// `timeout`) until its output is read to the end, so that what it printed last is in
    /// [`Process::lines`]: the exit can be seen before the reader threads drain the pipes.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut lines = self.output.lines.lock().expect("lines lock");
                // A child of the process that kept the pipes open would hold them: bounded.
                while self.output.ended.load(Ordering::SeqCst) < 2 {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    lines = self
                        .output
                        .changed
                        .wait_timeout(lines, left)
                        .expect("lines lock")
                        .0;
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// The address in a `serving /metrics[, /healthz and /readyz] on <addr>` log line.
fn serving_addr(line: &str) -> Option<&str> {
    let rest = &line[line.find("serving /metrics")?..];
    let addr = rest.rsplit_once(" on ")?.1;
    let addr = addr.split(|c: char| c == '"' || c.is_whitespace()).next()?;
    addr.parse::<std::net::SocketAddr>().ok().map(|_| addr)
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill_hard();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::serving_addr;

    #[test]
    fn serving_addr_reads_text_and_json_log_lines() {
        assert_eq!(
            serving_addr(
                "2026-12-01T21:37:02.599265Z  INFO serving /metrics, /healthz and /readyz on 127.0.0.1:40123"
            ),
            Some("127.0.0.1:40123")
        );
        assert_eq!(
            serving_addr(
                r#"{"timestamp":"x","level":"INFO","fields":{"message":"serving /metrics and /healthz on 127.0.0.1:8080"}}"#
            ),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            serving_addr("serving /metrics and /healthz on 127.0.0.1:0x"),
            None
        );
        assert_eq!(serving_addr("agent started: node worker-1"), None);
    }
}
