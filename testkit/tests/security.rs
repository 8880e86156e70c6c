//! Security, against real processes: etcd with TLS client certificates and with
//! least-privilege users, the real agent, controller and nodepulsectl connecting by flags and by
//! environment variables, the chart's RBAC checked by impersonation on a real kube-apiserver, and
//! no password in any log.
//!
//! Build the binaries first (`make test` does): `cargo build -p nodepulse-agent -p
//! nodepulse-controller -p nodepulsectl`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_yaml::Value;
use testkit::{
    ClientTls, Etcd, EtcdUsers, KubeApiserver, Launch, Process, SecureEtcd, enable_etcd_auth,
    etcdctl_as, mount_and_volume, project_bin, render_chart, repo_root, tool, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// How a binary is given its etcd connection: command-line flags or `NODEPULSE_ETCD_*` variables.
#[derive(Clone, Copy, Debug)]
enum Via {
    Flags,
    Env,
}

/// etcd connection settings of one process.
#[derive(Clone, Default)]
struct Conn {
    endpoint: String,
    tls: Option<ClientTls>,
    user: Option<(String, String)>,
}

impl Conn {
    fn apply(&self, cmd: &mut Command, via: Via) {
        let mut pairs: Vec<(&str, &str, String)> = vec![(
            "--etcd-endpoints",
            "NODEPULSE_ETCD_ENDPOINTS",
            self.endpoint.clone(),
        )];
        if let Some(tls) = &self.tls {
            let p = |p: &PathBuf| p.to_string_lossy().into_owned();
            pairs.push(("--etcd-ca-file", "NODEPULSE_ETCD_CA_FILE", p(&tls.ca_file)));
            pairs.push((
                "--etcd-cert-file",
                "NODEPULSE_ETCD_CERT_FILE",
                p(&tls.cert_file),
            ));
            pairs.push((
                "--etcd-key-file",
                "NODEPULSE_ETCD_KEY_FILE",
                p(&tls.key_file),
            ));
        }
        if let Some((user, password)) = &self.user {
            pairs.push(("--etcd-username", "NODEPULSE_ETCD_USERNAME", user.clone()));
            pairs.push((
                "--etcd-password",
                "NODEPULSE_ETCD_PASSWORD",
                password.clone(),
            ));
        }
        for (flag, var, value) in pairs {
            cmd.env_remove(var);
            match via {
                Via::Flags => {
                    cmd.args([flag, &value]);
                }
                Via::Env => {
                    cmd.env(var, value);
                }
            }
        }
    }
}

fn agent(node: &str, conn: &Conn, via: Via, log: &str) -> Process {
    let mut cmd = Launch::agent(node).ttl(3).log(log).command();
    conn.apply(&mut cmd, via);
    Process::spawn(node, cmd)
}

fn controller(api: &KubeApiserver, conn: &Conn, via: Via, log: &str) -> Process {
    let mut cmd = Launch::controller(&api.kubeconfig, "security-test")
        .log(log)
        .args(["--usage-write-interval", "5s"])
        .command();
    conn.apply(&mut cmd, via);
    Process::spawn("controller", cmd)
}

fn ctl(conn: &Conn, via: Via, log: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(project_bin("nodepulsectl"));
    cmd.env("RUST_LOG", log);
    // Connection flags belong to the subcommand.
    cmd.args(args);
    conn.apply(&mut cmd, via);
    cmd.output().expect("run nodepulsectl")
}

/// `nodepulsectl nodes` lists every one of `nodes` (polls: heartbeats take a moment).
fn ctl_lists(conn: &Conn, via: Via, nodes: &[&str]) {
    let mut last = String::new();
    let listed = (0..200).any(|_| {
        let out = ctl(conn, via, "info", &["nodes"]);
        last = format!("{}{}", text(&out.stdout), text(&out.stderr));
        if out.status.success() && nodes.iter().all(|n| last.contains(n)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(
        listed,
        "nodepulsectl nodes ({via:?}) lists {nodes:?}:\n{last}"
    );
}

/// A private API server with the CRDs, with Nodes named `nodes`.
fn apiserver(nodes: &[&str]) -> KubeApiserver {
    let api = KubeApiserver::with_crds();
    for node in nodes {
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        });
        let out = api.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string());
        assert!(
            out.status.success(),
            "create Node {node}: {}",
            text(&out.stderr)
        );
    }
    api
}

fn wait_alive(api: &KubeApiserver, node: &str) {
    wait_until(&format!("MonitorNode {node} Alive"), DEADLINE, || {
        let out = api.kubectl(&["get", "monitornode", node, "-o", "jsonpath={.status.state}"]);
        text(&out.stdout).trim() == "Alive"
    });
}

/// The heartbeat key's value and lease id, as etcdctl sees it (`-w json` gives the lease; its
/// values are base64, so the value comes from a second, plain read).
fn heartbeat_lease(get: impl Fn(&[&str]) -> Output, node: &str) -> Option<(String, i64)> {
    let key = format!("/monitor/heartbeat/{node}");
    let out = get(&["get", &key, "-w", "json"]);
    if !out.status.success() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let lease = json["kvs"].get(0)?["lease"].as_i64()?;
    let value = get(&["get", &key, "--print-value-only"]);
    let value = text(&value.stdout).trim().to_string();
    (!value.is_empty()).then_some((value, lease))
}

#[test]
fn tls_etcd_agent_controller_and_ctl_connect_with_client_certificates() {
    let etcd = SecureEtcd::start();
    // etcd really demands a certificate from its CA.
    let mut plain = Command::new(tool("etcdctl"));
    plain
        .args(["--endpoints", &etcd.endpoint, "--dial-timeout", "2s"])
        .args(["--command-timeout", "3s", "get", "/x"]);
    testkit::tls_env(
        &mut plain,
        &ClientTls {
            cert_file: etcd.foreign.cert_file.clone(),
            key_file: etcd.foreign.key_file.clone(),
            ..etcd.tls.clone()
        },
    );
    let foreign = plain.output().expect("run etcdctl");
    assert!(
        !foreign.status.success(),
        "etcd accepted a client certificate from another CA"
    );
    assert!(etcd.etcdctl(&["put", "/probe", "1"]).status.success());

    let conn = Conn {
        endpoint: etcd.endpoint.clone(),
        tls: Some(etcd.tls.clone()),
        user: None,
    };
    let api = apiserver(&["tls-flags", "tls-env"]);
    let _a = agent("tls-flags", &conn, Via::Flags, "info");
    let _b = agent("tls-env", &conn, Via::Env, "info");
    let _c = controller(&api, &conn, Via::Env, "info");

    for node in ["tls-flags", "tls-env"] {
        wait_until(&format!("heartbeat of {node} over TLS"), DEADLINE, || {
            heartbeat_lease(|a| etcd.etcdctl(a), node).is_some_and(|(_, lease)| lease != 0)
        });
    }
    ctl_lists(&conn, Via::Flags, &["tls-flags", "tls-env"]);
    ctl_lists(&conn, Via::Env, &["tls-flags", "tls-env"]);
    wait_alive(&api, "tls-flags");
    wait_alive(&api, "tls-env");

    // The controller over TLS by flags too (a second run, after the first is gone).
    drop(_c);
    api.kubectl_ok(&["delete", "monitornode", "tls-flags"]);
    let _c = controller(&api, &conn, Via::Flags, "info");
    wait_alive(&api, "tls-flags");

    // Without a client certificate nodepulsectl is refused, with an error and a failing exit.
    let no_cert = Conn {
        tls: Some(ClientTls {
            cert_file: etcd.foreign.cert_file.clone(),
            key_file: etcd.foreign.key_file.clone(),
            ..etcd.tls.clone()
        }),
        ..conn.clone()
    };
    let out = ctl(&no_cert, Via::Flags, "info", &["nodes"]);
    assert!(
        !out.status.success(),
        "nodepulsectl with a foreign certificate must fail:\n{}",
        text(&out.stdout)
    );
}

/// An etcd with nodepulse's least-privilege users (hack/etcd-roles.sh) and auth on.
struct AuthEtcd {
    etcd: Etcd,
    users: EtcdUsers,
}

impl AuthEtcd {
    fn start() -> AuthEtcd {
        let etcd = Etcd::start();
        let users = enable_etcd_auth(&etcd.endpoint, None);
        AuthEtcd { etcd, users }
    }

    fn agent_conn(&self) -> Conn {
        self.conn(EtcdUsers::AGENT, &self.users.agent_password)
    }

    fn controller_conn(&self) -> Conn {
        self.conn(EtcdUsers::CONTROLLER, &self.users.controller_password)
    }

    fn conn(&self, user: &str, password: &str) -> Conn {
        Conn {
            endpoint: self.etcd.endpoint.clone(),
            tls: None,
            user: Some((user.to_string(), password.to_string())),
        }
    }

    fn as_agent(&self, args: &[&str]) -> Output {
        etcdctl_as(
            &self.etcd.endpoint,
            None,
            EtcdUsers::AGENT,
            &self.users.agent_password,
            args,
        )
    }

    fn as_controller(&self, args: &[&str]) -> Output {
        etcdctl_as(
            &self.etcd.endpoint,
            None,
            EtcdUsers::CONTROLLER,
            &self.users.controller_password,
            args,
        )
    }

    fn as_root(&self, args: &[&str]) -> Output {
        etcdctl_as(
            &self.etcd.endpoint,
            None,
            "root",
            &self.users.root_password,
            args,
        )
    }
}

fn denied(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what} must be refused");
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{what}: refused for the right reason: {}",
        text(&out.stderr)
    );
}

#[test]
fn least_privilege_etcd_users_agent_controller_and_ctl_work_and_agent_cannot_write_config() {
    let auth = AuthEtcd::start();
    // Auth is really on: no credentials, no data.
    let anonymous = auth.etcd.etcdctl(&["get", "/monitor/", "--prefix"]);
    assert!(!anonymous.status.success(), "anonymous read refused");

    let api = apiserver(&["auth-flags", "auth-env"]);
    let mut a = agent("auth-flags", &auth.agent_conn(), Via::Flags, "info");
    let mut b = agent("auth-env", &auth.agent_conn(), Via::Env, "info");
    let _c = controller(&api, &auth.controller_conn(), Via::Env, "info");

    // Heartbeats with a lease (LeaseGrant and KeepAlive work for an authenticated user).
    let mut leases = Vec::new();
    for node in ["auth-flags", "auth-env"] {
        wait_until(&format!("heartbeat of {node} with auth"), DEADLINE, || {
            heartbeat_lease(|x| auth.as_controller(x), node).is_some_and(|(_, l)| l != 0)
        });
        leases.push(heartbeat_lease(|x| auth.as_controller(x), node).expect("heartbeat"));
    }
    wait_alive(&api, "auth-flags");
    wait_alive(&api, "auth-env");
    // nodepulsectl with the controller's user (read on heartbeats), by flags and by env.
    ctl_lists(
        &auth.controller_conn(),
        Via::Flags,
        &["auth-flags", "auth-env"],
    );
    ctl_lists(
        &auth.controller_conn(),
        Via::Env,
        &["auth-flags", "auth-env"],
    );

    // The agent's credentials: refused a write (or delete) of any config key and anything outside
    // its prefixes; allowed to read configs.
    denied(
        &auth.as_agent(&[
            "put",
            "/monitor/config/auth-env",
            r#"{"interval":1,"metrics":["cpu"]}"#,
        ]),
        "agent user put /monitor/config/",
    );
    denied(
        &auth.as_agent(&["del", "/monitor/config/auth-env"]),
        "agent user delete /monitor/config/",
    );
    denied(
        &auth.as_agent(&["put", "/registry/x", "1"]),
        "agent user put outside /monitor/",
    );
    assert!(
        auth.as_agent(&["get", "/monitor/config/auth-env"])
            .status
            .success()
    );
    // nodepulsectl with the agent's credentials cannot push configuration either.
    let out = ctl(
        &auth.agent_conn(),
        Via::Env,
        "info",
        &[
            "config",
            "set",
            "auth-env",
            "--interval",
            "1s",
            "--metrics",
            "cpu",
        ],
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("permission denied"),
        "nodepulsectl config set as the agent must be refused:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The controller's credentials: may write configs, may not forge heartbeats.
    let set = auth.as_controller(&[
        "put",
        "/monitor/config/auth-env",
        r#"{"interval":2,"metrics":["cpu","memory"]}"#,
    ]);
    assert!(
        set.status.success(),
        "controller user writes /monitor/config/: {}",
        text(&set.stderr)
    );
    denied(
        &auth.as_controller(&["put", "/monitor/heartbeat/forged", "{}"]),
        "controller user put /monitor/heartbeat/",
    );

    // The agent's watch (an authenticated stream) delivers that config: its heartbeat reports it.
    wait_until(
        "agent auth-env applies the config over its watch",
        DEADLINE,
        || {
            heartbeat_lease(|x| auth.as_controller(x), "auth-env").is_some_and(|(v, _)| {
                serde_json::from_str::<serde_json::Value>(&v)
                    .is_ok_and(|hb| hb["config"]["interval"].as_u64() == Some(2))
            })
        },
    );

    // The agents kept working through the refused writes, on the same leases (keep-alives pass
    // auth): wait several TTLs and see the same lease ids with fresh values.
    let before = heartbeat_lease(|x| auth.as_controller(x), "auth-flags").expect("heartbeat");
    wait_until("a fresh heartbeat of auth-flags", DEADLINE, || {
        heartbeat_lease(|x| auth.as_controller(x), "auth-flags").is_some_and(|(v, _)| v != before.0)
    });
    std::thread::sleep(Duration::from_secs(4)); // > the 3 s TTL: the lease must have been kept alive
    for (node, (_, lease)) in ["auth-flags", "auth-env"].iter().zip(&leases) {
        let now = heartbeat_lease(|x| auth.as_controller(x), node).expect("heartbeat still there");
        assert_eq!(now.1, *lease, "{node} kept its lease alive under auth");
    }
    assert!(a.is_running() && b.is_running(), "both agents still run");

    // A SIGKILLed agent's lease expires and the controller, watching with its own user, sees it.
    a.kill_hard();
    wait_until("MonitorNode auth-flags Dead", DEADLINE, || {
        let out = api.kubectl(&[
            "get",
            "monitornode",
            "auth-flags",
            "-o",
            "jsonpath={.status.state}",
        ]);
        text(&out.stdout).trim() == "Dead"
    });
    // Root still sees everything (the operator's escape hatch).
    assert!(
        auth.as_root(&["get", "/monitor/", "--prefix", "--keys-only"])
            .status
            .success()
    );
}

#[test]
fn passwords_never_appear_in_logs_or_help() {
    let auth = AuthEtcd::start();
    let api = apiserver(&["secret-flags", "secret-env"]);
    let agent_pw = auth.users.agent_password.clone();
    let controller_pw = auth.users.controller_password.clone();
    let wrong_pw = format!("{agent_pw}-WRONG");
    let secrets = [&agent_pw, &controller_pw, &wrong_pw];

    let a = agent("secret-flags", &auth.agent_conn(), Via::Flags, "debug");
    let b = agent("secret-env", &auth.agent_conn(), Via::Env, "trace");
    let c = controller(&api, &auth.controller_conn(), Via::Env, "debug");
    // The auth failure paths: a wrong password by flag and by env.
    let wrong = auth.conn(EtcdUsers::AGENT, &wrong_pw);
    let bad_flag = agent("secret-bad", &wrong, Via::Flags, "debug");
    let bad_env = agent("secret-bad2", &wrong, Via::Env, "debug");
    wait_alive(&api, "secret-flags");
    wait_alive(&api, "secret-env");
    let mut outputs: Vec<(String, String)> = Vec::new();
    for (via, conn) in [
        (Via::Flags, auth.controller_conn()),
        (Via::Env, auth.controller_conn()),
        (Via::Flags, wrong.clone()),
        (Via::Env, wrong.clone()),
    ] {
        for args in [&["nodes"][..], &["config", "get", "secret-env"][..]] {
            let out = ctl(&conn, via, "debug", args);
            outputs.push((
                format!("nodepulsectl {args:?} ({via:?})"),
                format!("{}{}", text(&out.stdout), text(&out.stderr)),
            ));
        }
    }
    let refused = outputs
        .iter()
        .filter(|(what, _)| what.contains("nodes"))
        .any(|(_, o)| o.contains("authentication failed"));
    assert!(
        refused,
        "a wrong password is reported as such: {outputs:#?}"
    );
    // The agents with the wrong password said why they cannot work (and keep trying).
    for bad in [&bad_flag, &bad_env] {
        bad.wait_for_line(DEADLINE, "the agent reports the auth failure", |l| {
            l.contains("authentication failed") || l.contains("invalid user")
        });
    }
    // --help with the password in the environment does not print it.
    for bin in ["nodepulse-agent", "nodepulse-controller", "nodepulsectl"] {
        let out = Command::new(project_bin(bin))
            .arg("--help")
            .env("NODEPULSE_ETCD_PASSWORD", &agent_pw)
            .output()
            .expect("run --help");
        outputs.push((format!("{bin} --help"), text(&out.stdout)));
        let sub = Command::new(project_bin(bin))
            .args(["nodes", "--help"])
            .env("NODEPULSE_ETCD_PASSWORD", &agent_pw)
            .output()
            .expect("run --help");
        outputs.push((format!("{bin} nodes --help"), text(&sub.stdout)));
    }
    for (name, p) in [
        ("agent secret-flags", &a),
        ("agent secret-env", &b),
        ("controller", &c),
        ("agent wrong password (flag)", &bad_flag),
        ("agent wrong password (env)", &bad_env),
    ] {
        assert!(p.line_count() > 0, "{name} logged something at debug level");
        outputs.push((name.to_string(), p.output_text()));
    }
    for (what, output) in &outputs {
        for secret in secrets {
            assert!(
                !output.contains(secret.as_str()),
                "{what} printed a password:\n{output}"
            );
        }
    }
}

fn pod_spec<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let o = objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    &o["spec"]["template"]["spec"]
}

/// The `name: secret/key` or `name=value` of each env entry of the first container.
fn env_of(spec: &Value) -> Vec<(String, String)> {
    spec["containers"][0]["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_string();
            let from = &e["valueFrom"]["secretKeyRef"];
            let v = if from.is_mapping() {
                format!(
                    "secret:{}/{}",
                    from["name"].as_str().unwrap_or_default(),
                    from["key"].as_str().unwrap_or_default()
                )
            } else {
                e["value"].as_str().unwrap_or_default().to_string()
            };
            (name, v)
        })
        .collect()
}

fn env_value(env: &[(String, String)], name: &str) -> Option<String> {
    env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

#[test]
fn chart_passes_etcd_credentials_and_client_tls_from_secrets() {
    // Certificates of one's own (one client Secret); secure_defaults.rs covers the generated ones.
    let objects = render_chart(&[
        "--set",
        "etcd.tls.generate=false",
        "--set",
        "etcd.tls.client.enabled=true",
        "--set",
        "etcd.client.tls.enabled=true",
        "--set",
        "etcd.client.auth.enabled=true",
        "--set",
        "etcd.client.auth.agentSecretName=np-etcd-agent",
        "--set",
        "etcd.client.auth.controllerSecretName=np-etcd-controller",
    ]);
    for (kind, name, secret) in [
        ("DaemonSet", "nodepulse-agent", "np-etcd-agent"),
        ("Deployment", "nodepulse-controller", "np-etcd-controller"),
    ] {
        let spec = pod_spec(&objects, kind, name);
        let env = env_of(spec);
        assert_eq!(
            env_value(&env, "NODEPULSE_ETCD_USERNAME"),
            Some(format!("secret:{secret}/username")),
            "{name}: {env:?}"
        );
        assert_eq!(
            env_value(&env, "NODEPULSE_ETCD_PASSWORD"),
            Some(format!("secret:{secret}/password")),
            "{name}: the password only ever comes from a Secret"
        );
        assert!(
            env_value(&env, "NODEPULSE_ETCD_ENDPOINTS").is_some_and(|e| e.starts_with("https://")),
            "{name}: https endpoints with client TLS: {env:?}"
        );
        for (var, file) in [
            ("NODEPULSE_ETCD_CA_FILE", "ca.crt"),
            ("NODEPULSE_ETCD_CERT_FILE", "tls.crt"),
            ("NODEPULSE_ETCD_KEY_FILE", "tls.key"),
        ] {
            assert_eq!(
                env_value(&env, var),
                Some(format!("/etc/nodepulse/etcd-tls/{file}")),
                "{name} {var}"
            );
        }
        let (mount, volume) =
            mount_and_volume(spec, &spec["containers"][0], "/etc/nodepulse/etcd-tls");
        assert_eq!(mount["readOnly"].as_bool(), Some(true), "{name}");
        assert_eq!(
            volume["secret"]["secretName"].as_str(),
            Some("nodepulse-etcd-client-tls")
        );
        // No flag on the command line carries a credential (flags show in `ps`).
        let args = serde_yaml::to_string(&spec["containers"][0]["args"]).expect("yaml");
        assert!(!args.contains("password"), "{name} args: {args}");
    }

    // One shared Secret when no per-component one is named.
    let shared = render_chart(&["--set", "etcd.client.auth.enabled=true"]);
    for (kind, name) in [
        ("DaemonSet", "nodepulse-agent"),
        ("Deployment", "nodepulse-controller"),
    ] {
        let env = env_of(pod_spec(&shared, kind, name));
        assert_eq!(
            env_value(&env, "NODEPULSE_ETCD_PASSWORD"),
            Some("secret:nodepulse-etcd-auth/password".to_string())
        );
    }
    // Auth off: no credential variables at all.
    let off = render_chart(&[]);
    let env = env_of(pod_spec(&off, "DaemonSet", "nodepulse-agent"));
    assert!(env_value(&env, "NODEPULSE_ETCD_PASSWORD").is_none());
}

#[test]
fn chart_rbac_is_least_privilege_by_impersonation() {
    let server = KubeApiserver::start();
    let chart = repo_root().join("charts/nodepulse");
    let out = server.helm(&[
        "install",
        "nodepulse",
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        "default",
        "--set",
        "etcd.client.auth.enabled=true",
    ]);
    assert!(
        out.status.success(),
        "helm install: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let controller = "system:serviceaccount:nodepulse:nodepulse-controller";
    let agent = "system:serviceaccount:nodepulse:nodepulse-agent";
    // `resource/subresource` is asked as such (kubectl's own `nodes/status` names a Node).
    let can = |who: &str, verb: &str, resource: &str, ns: &str| -> String {
        let mut args = vec!["auth", "can-i", verb, "--as", who];
        match resource.split_once('/') {
            Some((resource, sub)) => args.extend([resource, "--subresource", sub]),
            None => args.push(resource),
        }
        if ns.is_empty() {
            args.push("--all-namespaces");
        } else {
            args.extend_from_slice(&["-n", ns]);
        }
        text(&server.kubectl(&args).stdout).trim().to_string()
    };
    let mut wrong = Vec::new();
    // The controller: what it needs...
    for (verb, resource, ns) in [
        ("get", "monitornodes.nodepulse.io", ""),
        ("list", "monitornodes.nodepulse.io", ""),
        ("watch", "monitornodes.nodepulse.io", ""),
        ("create", "monitornodes.nodepulse.io", ""),
        ("patch", "monitornodes.nodepulse.io/status", ""),
        ("list", "monitorconfigs.nodepulse.io", ""),
        ("patch", "monitorconfigs.nodepulse.io/status", ""),
        ("get", "nodes", ""),
        ("list", "nodes", ""),
        ("watch", "nodes", ""),
        ("create", "events.events.k8s.io", "default"),
        ("get", "leases.coordination.k8s.io", "nodepulse"),
        ("update", "leases.coordination.k8s.io", "nodepulse"),
    ] {
        if can(controller, verb, resource, ns) != "yes" {
            wrong.push(format!("controller cannot {verb} {resource} {ns}"));
        }
    }
    // ...and not more: no Secrets anywhere, no writes to Nodes, nothing of the workloads'.
    for (verb, resource, ns) in [
        ("get", "secrets", ""),
        ("list", "secrets", ""),
        ("watch", "secrets", ""),
        ("get", "secrets", "nodepulse"),
        ("list", "secrets", "nodepulse"),
        ("get", "secrets", "etcd"),
        ("get", "secrets", "kube-system"),
        ("create", "nodes", ""),
        ("patch", "nodes", ""),
        ("update", "nodes", ""),
        ("delete", "nodes", ""),
        ("patch", "nodes/status", ""),
        ("delete", "monitornodes.nodepulse.io", ""),
        ("create", "monitorconfigs.nodepulse.io", ""),
        ("delete", "monitorconfigs.nodepulse.io", ""),
        ("get", "configmaps", "nodepulse"),
        ("list", "pods", ""),
        ("create", "pods/exec", "etcd"),
        ("create", "serviceaccounts/token", "nodepulse"),
        ("update", "leases.coordination.k8s.io", "kube-system"),
        ("update", "clusterroles.rbac.authorization.k8s.io", ""),
        ("*", "*", ""),
    ] {
        if can(controller, verb, resource, ns) != "no" {
            wrong.push(format!("controller CAN {verb} {resource} {ns}"));
        }
    }
    // The agent talks to etcd only: no Kubernetes permissions at all.
    for (verb, resource, ns) in [
        ("get", "secrets", "nodepulse"),
        ("list", "nodes", ""),
        ("get", "monitornodes.nodepulse.io", ""),
        ("create", "events.events.k8s.io", "nodepulse"),
    ] {
        if can(agent, verb, resource, ns) != "no" {
            wrong.push(format!("agent CAN {verb} {resource} {ns}"));
        }
    }
    assert!(wrong.is_empty(), "RBAC is not least privilege: {wrong:#?}");
    // The agent's pods do not even get a token.
    let automount = server.kubectl_ok(&[
        "get",
        "daemonset/nodepulse-agent",
        "-n",
        "nodepulse",
        "-o",
        "jsonpath={.spec.template.spec.automountServiceAccountToken}",
    ]);
    assert_eq!(automount, "false");
}

#[test]
fn with_auth_on_agent_and_controller_survive_an_etcd_restart_that_forgets_their_tokens() {
    // etcd keeps its simple auth tokens in memory: after a restart every client's token is
    // refused, and a client that does not re-authenticate is locked out for good.
    let mut auth = AuthEtcd::start();
    let api = apiserver(&["auth-restart"]);
    let mut agent = agent("auth-restart", &auth.agent_conn(), Via::Env, "info");
    let controller = controller(&api, &auth.controller_conn(), Via::Env, "info");
    wait_alive(&api, "auth-restart");
    let mark = agent.line_count();

    auth.etcd.restart();
    agent.wait_for_line_from(
        mark,
        DEADLINE,
        "the config watch resumes after the restart",
        // `config watch (<key>) back after 0.7s: resumed from revision N` (or `listed at
        // revision N`, when etcd canceled the watch for the forgotten token).
        |l| l.contains("config watch (") && l.contains(" back after "),
    );
    // A config change made after the restart reaches the agent over its (re-authenticated) watch.
    let set = auth.as_controller(&[
        "put",
        "/monitor/config/auth-restart",
        r#"{"interval":3,"metrics":["cpu"]}"#,
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let applied = (0..300).any(|_| {
        let ok =
            heartbeat_lease(|x| auth.as_controller(x), "auth-restart").is_some_and(|(v, _)| {
                serde_json::from_str::<serde_json::Value>(&v)
                    .is_ok_and(|hb| hb["config"]["interval"].as_u64() == Some(3))
            });
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(
        applied,
        "the agent applies a config written after the restart:\n{}",
        agent.output_text()
    );
    // The controller's watch works again too: it sees the agent die.
    agent.kill_hard();
    let dead = (0..300).any(|_| {
        let out = api.kubectl(&[
            "get",
            "monitornode",
            "auth-restart",
            "-o",
            "jsonpath={.status.state}",
        ]);
        let ok = text(&out.stdout).trim() == "Dead";
        if !ok {
            std::thread::sleep(Duration::from_millis(200));
        }
        ok
    });
    assert!(
        dead,
        "the controller sees the agent die after the restart:\n{}",
        controller.output_text()
    );
}

#[test]
fn tls_and_auth_together_agent_writes_heartbeats_and_is_refused_config_writes() {
    // Production: client certificates for the channel, least-privilege users for the keys.
    let etcd = SecureEtcd::start();
    let users = enable_etcd_auth(&etcd.endpoint, Some(&etcd.tls));
    let conn = |user: &str, password: &str| Conn {
        endpoint: etcd.endpoint.clone(),
        tls: Some(etcd.tls.clone()),
        user: Some((user.to_string(), password.to_string())),
    };
    let agent_conn = conn(EtcdUsers::AGENT, &users.agent_password);
    let controller_conn = conn(EtcdUsers::CONTROLLER, &users.controller_password);
    let mut a = agent("tls-auth", &agent_conn, Via::Flags, "info");
    let as_user = |user: &str, password: &str, args: &[&str]| {
        etcdctl_as(&etcd.endpoint, Some(&etcd.tls), user, password, args)
    };
    wait_until("heartbeat over TLS with auth", DEADLINE, || {
        heartbeat_lease(
            |x| as_user(EtcdUsers::CONTROLLER, &users.controller_password, x),
            "tls-auth",
        )
        .is_some_and(|(_, lease)| lease != 0)
    });
    ctl_lists(&controller_conn, Via::Env, &["tls-auth"]);
    denied(
        &as_user(
            EtcdUsers::AGENT,
            &users.agent_password,
            &["put", "/monitor/config/tls-auth", "{}"],
        ),
        "agent user put /monitor/config/ over TLS",
    );
    let out = as_user(
        EtcdUsers::CONTROLLER,
        &users.controller_password,
        &[
            "put",
            "/monitor/config/tls-auth",
            r#"{"interval":2,"metrics":["cpu"]}"#,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    a.wait_for_line(DEADLINE, "the agent applies the config", |l| {
        l.contains("config updated")
    });
    assert!(a.is_running());
}
