//! etcd as production runs it: clients over TLS with certificates (`--client-cert-auth`), and
//! etcd's own user/password authentication with nodepulse's least-privilege roles.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};

use crate::etcd::PEER_SOCKET_URL;
use crate::ports::ReservedPort;
use crate::process::Process;
use crate::tools::{repo_root, tool};
use crate::{http_get, scratch_dir, wait_until};

/// Client-side TLS files: the CA that signed etcd's serving certificate, and a client
/// certificate/key signed by the same CA.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// CA certificate (PEM).
    pub ca_file: PathBuf,
    /// Client certificate (PEM).
    pub cert_file: PathBuf,
    /// Client private key (PEM).
    pub key_file: PathBuf,
}

/// A single-member etcd that serves clients only over TLS and requires a client certificate
/// signed by its CA. Its `/health` is served on a separate plain-HTTP metrics port.
pub struct SecureEtcd {
    /// `https://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The CA and a valid client certificate.
    pub tls: ClientTls,
    /// A certificate/key signed by another CA, which etcd must refuse.
    pub foreign: ClientTls,
    dir: tempfile::TempDir,
    _process: Process,
    _ports: [ReservedPort; 2],
}

impl SecureEtcd {
    /// Generates a CA, a serving certificate for 127.0.0.1/localhost and client certificates,
    /// starts etcd with `--cert-file/--key-file/--trusted-ca-file/--client-cert-auth`, and waits
    /// until it is healthy.
    pub fn start() -> SecureEtcd {
        let dir = scratch_dir("etcd-tls");
        let pki = dir.path().join("pki");
        std::fs::create_dir_all(&pki).expect("create pki dir");
        let (server_cert, server_key, tls) = write_pki(&pki, "");
        let (_, _, foreign) = write_pki(&pki, "foreign-");

        // Reserved ports rather than port 0: etcd's built-in gRPC gateway dials the configured
        // client address, which must therefore be the real one (see `crate::ports`).
        let client_port = ReservedPort::new();
        let metrics_port = ReservedPort::new();
        let endpoint = format!("https://{}", client_port.addr());
        let peer = PEER_SOCKET_URL;
        let mut cmd = Command::new(tool("etcd"));
        cmd.current_dir(dir.path())
            .args(["--name", "testkit"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("testkit={peer}")])
            .args([
                "--listen-metrics-urls",
                &format!("http://{}", metrics_port.addr()),
            ])
            .arg("--cert-file")
            .arg(&server_cert)
            .arg("--key-file")
            .arg(&server_key)
            .arg("--trusted-ca-file")
            .arg(&tls.ca_file)
            .arg("--client-cert-auth")
            .args(["--log-level", "warn"])
            .arg("--unsafe-no-fsync");
        let process = Process::spawn("etcd-tls", cmd);
        let health = metrics_port.addr();
        wait_until("TLS etcd /health", Duration::from_secs(30), || {
            http_get(&health, "/health")
                .is_some_and(|(status, body)| status == 200 && body.contains("\"health\":\"true\""))
        });
        SecureEtcd {
            endpoint,
            tls,
            foreign,
            dir,
            _process: process,
            _ports: [client_port, metrics_port],
        }
    }

    /// The scratch directory (certificates live under `pki/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `etcdctl` against this server with the valid client certificate.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(tool("etcdctl"));
        cmd.args(["--endpoints", &self.endpoint]);
        tls_env(&mut cmd, &self.tls);
        cmd.args(args).output().expect("run etcdctl")
    }
}

/// Points `etcdctl` (through its `ETCDCTL_*` variables) at the TLS files.
pub fn tls_env(cmd: &mut Command, tls: &ClientTls) {
    cmd.env("ETCDCTL_CACERT", &tls.ca_file)
        .env("ETCDCTL_CERT", &tls.cert_file)
        .env("ETCDCTL_KEY", &tls.key_file);
}

/// The passwords of the users `hack/etcd-roles.sh` creates.
#[derive(Clone, Debug)]
pub struct EtcdUsers {
    /// `root`'s password.
    pub root_password: String,
    /// User `nodepulse-agent`: readwrite `/monitor/heartbeat/`, read `/monitor/config/`.
    pub agent_password: String,
    /// User `nodepulse-controller`: read `/monitor/heartbeat/`, readwrite `/monitor/config/`.
    pub controller_password: String,
}

impl EtcdUsers {
    /// The agent's user name.
    pub const AGENT: &'static str = "nodepulse-agent";
    /// The controller's user name.
    pub const CONTROLLER: &'static str = "nodepulse-controller";
}

/// Creates nodepulse's least-privilege roles and users with the repository's
/// `hack/etcd-roles.sh` (as an operator would) and turns etcd authentication on. `tls` is
/// needed when the endpoint is a [`SecureEtcd`]. Passwords are random per call.
pub fn enable_etcd_auth(endpoint: &str, tls: Option<&ClientTls>) -> EtcdUsers {
    let users = EtcdUsers {
        root_password: random_password("root"),
        agent_password: random_password("agent"),
        controller_password: random_password("controller"),
    };
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/etcd-roles.sh"))
        .env("ETCDCTL", tool("etcdctl"))
        .env("ETCDCTL_ENDPOINTS", endpoint)
        .env("ROOT_PASSWORD", &users.root_password)
        .env("AGENT_PASSWORD", &users.agent_password)
        .env("CONTROLLER_PASSWORD", &users.controller_password)
        .stdin(Stdio::null());
    if let Some(tls) = tls {
        tls_env(&mut cmd, tls);
    }
    let out = cmd.output().expect("run hack/etcd-roles.sh");
    assert!(
        out.status.success(),
        "hack/etcd-roles.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    users
}

/// `etcdctl --user <user> --password <password> <args>` against `endpoint` (password passed in
/// the environment, so it never shows in a process list).
pub fn etcdctl_as(
    endpoint: &str,
    tls: Option<&ClientTls>,
    user: &str,
    password: &str,
    args: &[&str],
) -> Output {
    let mut cmd = Command::new(tool("etcdctl"));
    cmd.args(["--endpoints", endpoint])
        .env("ETCDCTL_USER", user)
        .env("ETCDCTL_PASSWORD", password)
        .args(args);
    if let Some(tls) = tls {
        tls_env(&mut cmd, tls);
    }
    cmd.output().expect("run etcdctl")
}

/// A password unique enough to grep logs for.
fn random_password(who: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("S3cr3t-{who}-{}-{nanos:09}", std::process::id())
}

/// Writes `<prefix>ca.crt`, `<prefix>server.crt/key` and `<prefix>client.crt/key` into `dir`.
fn write_pki(dir: &Path, prefix: &str) -> (PathBuf, PathBuf, ClientTls) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut ca_name = DistinguishedName::new();
    ca_name.push(DnType::CommonName, format!("{prefix}testkit etcd CA"));
    ca_params.distinguished_name = ca_name;
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("server key");
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("server params");
    server_params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server = server_params
        .signed_by(&server_key, &issuer)
        .expect("sign server cert");

    let client_key = KeyPair::generate().expect("client key");
    let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    let mut client_name = DistinguishedName::new();
    client_name.push(DnType::CommonName, format!("{prefix}nodepulse-client"));
    client_params.distinguished_name = client_name;
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params
        .signed_by(&client_key, &issuer)
        .expect("sign client cert");

    let path = |name: &str| dir.join(format!("{prefix}{name}"));
    let tls = ClientTls {
        ca_file: path("ca.crt"),
        cert_file: path("client.crt"),
        key_file: path("client.key"),
    };
    let (server_cert, server_key_file) = (path("server.crt"), path("server.key"));
    for (file, pem) in [
        (&tls.ca_file, ca_cert.pem()),
        (&tls.cert_file, client.pem()),
        (&tls.key_file, client_key.serialize_pem()),
        (&server_cert, server.pem()),
        (&server_key_file, server_key.serialize_pem()),
    ] {
        std::fs::write(file, pem).expect("write pki file");
    }
    (server_cert, server_key_file, tls)
}
