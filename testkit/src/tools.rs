//! Where the harness finds its servers and the project's own binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits in the repository")
        .to_path_buf()
}

/// A test tool built by `hack/tools.sh` (kube-apiserver, kubectl, etcd, etcdctl, helm, node_exporter),
/// building it first if this machine has never done so. The cache lives outside the repository
/// (`~/.cache/nodepulse/tools/bin`, or `$NODEPULSE_TOOLS`), so only the first run pays.
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("NODEPULSE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/nodepulse/tools/bin")
        });
    let path = dir.join(name);
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

/// kubectl at the API server's version, built by `hack/tools.sh` like the server itself.
pub fn kubectl() -> PathBuf {
    tool("kubectl")
}

/// A binary of this workspace (`nodepulse-agent`, `nodepulse-controller`, `nodepulsectl`, ...),
/// from the target directory the running test was built into. `make test` builds every binary
/// before it runs the tests.
pub fn project_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (make test does) first",
        path.display()
    );
    path
}
