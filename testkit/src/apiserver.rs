//! A real kube-apiserver (with its own etcd) on reserved loopback ports: serving certificates,
//! service-account keys, an admin token and a kubeconfig, all generated per instance.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::etcd::Etcd;
use crate::helm::helm_command;
use crate::ports::ReservedPort;
use crate::process::Process;
use crate::scratch_dir;
use crate::tools::{Kubectl, repo_root, tool};

const ADMIN_TOKEN: &str = "nodepulse-testkit-admin";

/// A kube-apiserver backed by its own etcd. No controller-manager, scheduler or kubelet: objects
/// are stored and validated for real, but pods never run.
pub struct KubeApiserver {
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// A kubeconfig with cluster-admin rights.
    pub kubeconfig: PathBuf,
    dir: tempfile::TempDir,
    process: Process,
    _port: ReservedPort,
    _etcd: Etcd,
}

impl KubeApiserver {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers ok.
    pub fn start() -> KubeApiserver {
        let mut server = KubeApiserver::spawn();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match server.probe_ready() {
                Ok(true) => break server,
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Ok(false) => panic!(
                    "kube-apiserver not ready after 120 s: {}\n--- kube-apiserver output ---\n{}",
                    String::from_utf8_lossy(&server.kubectl(&["get", "--raw", "/readyz"]).stderr),
                    server.output_text()
                ),
                Err(output) => panic!(
                    "kube-apiserver exited before it was ready\n--- kube-apiserver output ---\n{output}"
                ),
            }
        }
    }

    /// Starts etcd (waiting for it) and kube-apiserver (not waiting for it):
    /// [`KubeApiserver::probe_ready`] tells when it is ready, for a caller that waits its own
    /// way, as the demo does, which stops waiting on Ctrl-C.
    pub fn spawn() -> KubeApiserver {
        let etcd = Etcd::start();
        let dir = scratch_dir("apiserver");
        // kube-apiserver refuses `--secure-port=0`: a reserved port (see `crate::ports`).
        let reserved = ReservedPort::new();
        let port = reserved.port();
        let url = format!("https://127.0.0.1:{port}");
        let pki = write_pki(dir.path());
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(
            &tokens,
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )
        .expect("write token file");

        let mut cmd = Command::new(tool("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={}", etcd.endpoint))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", dir.path().join("certs").display()))
            .arg(format!("--tls-cert-file={}", pki.serving_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                pki.serving_key.display()
            ))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg(format!(
                "--service-account-key-file={}",
                pki.sa_pub.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                pki.sa_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .arg("--allow-privileged=true")
            .arg("--enable-priority-and-fairness=false")
            .arg("--v=0");
        let process = Process::spawn("kube-apiserver", cmd);

        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: testkit\n  cluster:\n    server: {url}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: testkit\n  context:\n    cluster: testkit\n    user: admin\ncurrent-context: testkit\n",
                ca = pki.ca_cert.display()
            ),
        )
        .expect("write kubeconfig");

        KubeApiserver {
            url,
            kubeconfig,
            dir,
            process,
            _port: reserved,
            _etcd: etcd,
        }
    }

    /// Whether `/readyz` answers ok now; `Err` with the server's output once it has exited.
    pub fn probe_ready(&mut self) -> Result<bool, String> {
        if !self.process.is_running() {
            return Err(self.output_text());
        }
        Ok(self.kubectl(&["get", "--raw", "/readyz"]).status.success())
    }

    /// What kube-apiserver printed so far.
    pub fn output_text(&self) -> String {
        self.process.output_text()
    }

    /// [`KubeApiserver::start`] with nodepulse's CRDs installed.
    pub fn with_crds() -> KubeApiserver {
        let server = KubeApiserver::start();
        server.install_crds();
        server
    }

    /// One API server with the CRDs shared by every test in this test binary (starting one
    /// costs seconds). Tests sharing it use distinct object names. It dies with the test binary.
    pub fn shared() -> &'static KubeApiserver {
        static SHARED: OnceLock<KubeApiserver> = OnceLock::new();
        SHARED.get_or_init(KubeApiserver::with_crds)
    }

    /// A scratch directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// kubectl against this server.
    pub fn kubectl_cli(&self) -> Kubectl {
        Kubectl::new(&self.kubeconfig)
    }

    /// Runs kubectl against this server.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_cli().run(args)
    }

    /// Runs kubectl and panics with its output unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl_cli().ok(args)
    }

    /// Runs kubectl with `stdin` as input (`kubectl apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        self.kubectl_cli().stdin(args, stdin)
    }

    /// Runs helm against this server.
    pub fn helm(&self, args: &[&str]) -> Output {
        helm_command(&self.dir().join("helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run helm")
    }

    /// Runs helm against this server and panics with its output unless it succeeds; returns
    /// stdout.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        crate::tools::succeeded("helm", args, self.helm(args))
    }

    /// Applies the generated CRDs and waits until both are established.
    pub fn install_crds(&self) {
        let crds = repo_root().join(nodepulse_crd::GENERATED_CRD_PATHS[1]);
        self.kubectl_ok(&["apply", "--server-side", "-f", &crds.to_string_lossy()]);
        self.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/monitornodes.nodepulse.io",
            "crd/monitorconfigs.nodepulse.io",
        ]);
    }

    /// A kube-rs client with cluster-admin rights.
    #[cfg(feature = "test-env")]
    pub async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("read kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("kubeconfig to config");
        kube::Client::try_from(config).expect("kube client")
    }
}

struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and a service-account signing key.
fn write_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate().expect("serving key");
    let serving = CertificateParams::new(vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ])
    .expect("serving params")
    .signed_by(&serving_key, &issuer)
    .expect("sign serving cert");

    let sa_key = KeyPair::generate().expect("service-account key");

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
    };
    for (path, pem) in [
        (&pki.ca_cert, ca_cert.pem()),
        (&pki.serving_cert, serving.pem()),
        (&pki.serving_key, serving_key.serialize_pem()),
        (&pki.sa_key, sa_key.serialize_pem()),
        (&pki.sa_pub, sa_key.public_key_pem()),
    ] {
        std::fs::write(path, pem).expect("write pki file");
    }
    pki
}
