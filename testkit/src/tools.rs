//! Where the harness finds its servers and the project's own binaries.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the repository")
        .to_path_buf()
}

/// A test tool built by `hack/tools.sh` (kube-apiserver, kubectl, etcd, etcdctl, helm, node_exporter),
/// building it first if this machine has never done so. The cache lives outside the repository
/// (`$NODEPULSE_TOOLS`, else `$NODEPULSE_CACHE/tools/bin`, else `~/.cache/nodepulse/tools/bin`, as
/// `hack/tools.sh` has it), so only the first run pays.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join(name);
    if !path.exists() {
        let target = match name {
            "etcdctl" => "etcd",
            other => other,
        };
        let status = Command::new("bash")
            .arg(repo_root().join("hack/tools.sh"))
            .arg(target)
            .status()
            .unwrap_or_else(|e| panic!("run hack/tools.sh {target}: {e}"));
        assert!(status.success(), "hack/tools.sh {target} failed");
    }
    assert!(
        path.exists(),
        "{} missing after hack/tools.sh",
        path.display()
    );
    path
}

/// A test tool if `hack/tools.sh` has already built it on this machine, without building it: for
/// the tools that only some runs need and that take long to build (the OpenTelemetry Collector).
pub fn built_tool(name: &str) -> Option<PathBuf> {
    Some(tools_dir().join(name)).filter(|p| p.exists())
}

/// Where `hack/tools.sh` puts its binaries.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("NODEPULSE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("NODEPULSE_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let home = std::env::var_os("HOME").expect("HOME is set");
                    Path::new(&home).join(".cache/nodepulse")
                });
            cache.join("tools/bin")
        })
}

/// kubectl at the API server's version, built by `hack/tools.sh` like the server itself.
pub fn kubectl() -> PathBuf {
    tool("kubectl")
}

/// Where this workspace's binaries are: the directory of the running executable, or its parent
/// for a test binary or an example (`target/<profile>/deps/<test>`, `.../examples/<example>`).
pub fn project_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("the executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

/// A binary of this workspace (`nodepulse-agent`, `nodepulse-controller`, `nodepulsectl`, ...),
/// from the target directory the running test was built into. `make test` builds every binary
/// before it runs the tests.
pub fn project_bin(name: &str) -> PathBuf {
    let path = project_bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (make test does) first",
        path.display()
    );
    path
}

/// kubectl with a kubeconfig of its own.
pub struct Kubectl {
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// kubectl using `kubeconfig`.
    pub fn new(kubeconfig: &Path) -> Kubectl {
        Kubectl {
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// The command line, for callers that run it their own way.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl());
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// Runs kubectl.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run kubectl")
    }

    /// Runs kubectl and panics with its output unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded("kubectl", args, self.run(args))
    }

    /// Runs kubectl with `stdin` as input (`kubectl apply -f -`).
    pub fn stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write kubectl stdin");
        child.wait_with_output().expect("kubectl output")
    }
}

/// The stdout of `<program> <args>`, which ran as `out`; panics with its whole output unless it
/// succeeded.
pub(crate) fn succeeded(program: &str, args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "{program} {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
