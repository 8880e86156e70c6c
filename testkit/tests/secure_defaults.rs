//! What the chart's defaults lock down: etcd serves clients and peers over TLS with certificates
//! the chart generates, and refuses a client without the chart's client certificate; and
//! NetworkPolicies admit only the agent and the controller to etcd's client port and only etcd
//! members to its peer port.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use serde_yaml::Value;
use testkit::{
    Process, ReservedPort, http_get, project_bin, render_chart, scratch_dir, tool, wait_until,
};

fn network_policy<'a>(objects: &'a [Value], namespace: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some("NetworkPolicy")
                && o["metadata"]["namespace"].as_str() == Some(namespace)
                && o["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("no NetworkPolicy {namespace}/{name}"))
}

/// The ingress rule of `policy` that opens the named port.
fn ingress_for<'a>(policy: &'a Value, port: &str) -> &'a Value {
    policy["spec"]["ingress"]
        .as_sequence()
        .expect("ingress rules")
        .iter()
        .find(|r| r["ports"][0]["port"].as_str() == Some(port))
        .unwrap_or_else(|| panic!("no ingress rule for port {port}"))
}

fn component(peer: &Value) -> &str {
    peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        .as_str()
        .expect("a component selector")
}

#[test]
fn by_default_etcd_admits_only_the_agent_and_the_controller_and_its_peers() {
    let objects = render_chart(&[]);
    let etcd = network_policy(&objects, "etcd", "etcd");
    assert_eq!(
        etcd["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str(),
        Some("etcd")
    );

    let client = ingress_for(etcd, "client");
    let from = client["from"]
        .as_sequence()
        .expect("client port has sources");
    let components: Vec<&str> = from.iter().map(component).collect();
    assert_eq!(components, ["agent", "controller"]);
    for peer in from {
        assert_eq!(
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
            Some("nodepulse"),
            "only from the release's namespace: {peer:?}"
        );
    }

    let peer = ingress_for(etcd, "peer");
    let from = peer["from"].as_sequence().expect("peer port has sources");
    assert_eq!(from.iter().map(component).collect::<Vec<_>>(), ["etcd"]);

    // The kubelet's probes and Prometheus read the plain metrics port.
    assert!(ingress_for(etcd, "metrics")["from"].is_null());

    for name in ["nodepulse-agent", "nodepulse-controller"] {
        let policy = network_policy(&objects, "nodepulse", name);
        let rules = policy["spec"]["ingress"].as_sequence().expect("ingress");
        assert_eq!(rules.len(), 1, "{name}: only the metrics port");
        assert_eq!(rules[0]["ports"][0]["port"].as_str(), Some("metrics"));
    }

    let off = render_chart(&["--set", "networkPolicy.enabled=false"]);
    assert!(
        off.iter()
            .all(|o| o["kind"].as_str() != Some("NetworkPolicy"))
    );
}

fn object<'a>(objects: &'a [Value], kind: &str, namespace: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some(kind)
                && o["metadata"]["namespace"].as_str() == Some(namespace)
                && o["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} in the rendered chart"))
}

/// Writes the keys of a rendered Secret as files into `dir` (what the kubelet's volume does).
fn write_secret(secret: &Value, dir: &Path) {
    std::fs::create_dir_all(dir).expect("create the Secret's directory");
    let data = secret["data"].as_mapping().expect("Secret data");
    for (key, value) in data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 string"))
            .expect("Secret data is base64");
        std::fs::write(dir.join(key.as_str().expect("key")), bytes).expect("write a Secret key");
    }
}

/// `etcdctl put` of worker-1's heartbeat key, as a client with the flags `tls` would.
fn put_heartbeat(endpoint: &str, tls: &[String], value: &str) -> Output {
    etcdctl(
        endpoint,
        tls,
        &["put", "/monitor/heartbeat/worker-1", value],
    )
}

/// etcdctl against `endpoint` with `extra` flags (TLS files).
fn etcdctl(endpoint: &str, extra: &[String], args: &[&str]) -> Output {
    Command::new(tool("etcdctl"))
        .args([
            "--endpoints",
            endpoint,
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
        ])
        .args(extra)
        .args(args)
        .output()
        .expect("run etcdctl")
}

#[test]
fn etcd_with_the_default_flags_and_generated_certificates_refuses_clients_without_the_chart_certificate()
 {
    let objects = render_chart(&[]);
    let sts = object(&objects, "StatefulSet", "etcd", "etcd");
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let rendered: Vec<String> = container["args"]
        .as_sequence()
        .expect("etcd args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect();
    for flag in ["--client-cert-auth=true", "--peer-client-cert-auth=true"] {
        assert!(
            rendered.contains(&flag.to_string()),
            "defaults render {flag}"
        );
    }

    // The Secrets as the pods mount them.
    let dir = scratch_dir("chart-tls");
    let server_dir = dir.path().join("client");
    let peer_dir = dir.path().join("peer");
    let agent_dir = dir.path().join("agent");
    write_secret(
        object(&objects, "Secret", "etcd", "etcd-server-tls"),
        &server_dir,
    );
    write_secret(
        object(&objects, "Secret", "etcd", "etcd-peer-tls"),
        &peer_dir,
    );
    write_secret(
        object(
            &objects,
            "Secret",
            "nodepulse",
            "nodepulse-etcd-client-tls-agent",
        ),
        &agent_dir,
    );
    for component in ["agent", "controller"] {
        let workload = objects
            .iter()
            .find(|o| {
                o["metadata"]["name"].as_str() == Some(&format!("nodepulse-{component}"))
                    && o["spec"]["template"].is_mapping()
            })
            .expect("workload");
        let volumes = serde_yaml::to_string(&workload["spec"]["template"]["spec"]["volumes"])
            .expect("volumes");
        assert!(
            volumes.contains(&format!(
                "secretName: nodepulse-etcd-client-tls-{component}"
            )),
            "{component} mounts its own client certificate: {volumes}"
        );
    }

    // One member on loopback with exactly the rendered flags, certificate paths mapped to the files.
    let client = ReservedPort::new();
    let peer = ReservedPort::new();
    let metrics = ReservedPort::new();
    let data = dir.path().join("data");
    let host = "etcd-0.etcd-service.etcd.svc.cluster.local";
    let flags: Vec<String> = rendered
        .iter()
        .map(|f| {
            if f.starts_with("--data-dir=") {
                return format!("--data-dir={}", data.display());
            }
            f.replace("$(POD_NAME)", "etcd-0")
                .replace("/etc/etcd/tls/client", &server_dir.to_string_lossy())
                .replace("/etc/etcd/tls/peer", &peer_dir.to_string_lossy())
                // The certificates name the member's DNS name and localhost, not a loopback IP
                // with a port of ours: keep the name, resolve it to loopback through "localhost".
                .replace(
                    &format!("{host}:2379"),
                    &format!("localhost:{}", client.port()),
                )
                .replace(
                    &format!("{host}:2380"),
                    &format!("localhost:{}", peer.port()),
                )
                .replace("0.0.0.0:2379", &client.addr())
                .replace("0.0.0.0:2380", &peer.addr())
                .replace("0.0.0.0:2381", &metrics.addr())
        })
        .collect();
    let mut cmd = Command::new(tool("etcd"));
    cmd.args(&flags);
    let member = Process::spawn("etcd-0", cmd);

    // The kubelet's probes read the plain metrics port, TLS or not.
    wait_until(
        "etcd /readyz on the metrics port",
        Duration::from_secs(60),
        || http_get(&metrics.addr(), "/readyz").is_some_and(|(status, _)| status == 200),
    );

    let endpoint = format!("https://localhost:{}", client.port());
    let file = |d: &Path, f: &str| d.join(f).to_string_lossy().into_owned();
    let agent_tls = vec![
        format!("--cacert={}", file(&agent_dir, "ca.crt")),
        format!("--cert={}", file(&agent_dir, "tls.crt")),
        format!("--key={}", file(&agent_dir, "tls.key")),
    ];
    let put = put_heartbeat(&endpoint, &agent_tls, "x");
    assert!(
        put.status.success(),
        "the agent's certificate is accepted: {}{}\n{}",
        String::from_utf8_lossy(&put.stdout),
        String::from_utf8_lossy(&put.stderr),
        member.output_text()
    );

    // Server-verified TLS, but no client certificate: refused.
    let ca_only = vec![format!("--cacert={}", file(&agent_dir, "ca.crt"))];
    let anonymous = put_heartbeat(&endpoint, &ca_only, "forged");
    assert!(
        !anonymous.status.success(),
        "a client without a certificate must be refused: {}",
        String::from_utf8_lossy(&anonymous.stdout)
    );
    // Plain text: refused too.
    let plain = put_heartbeat(
        &format!("http://localhost:{}", client.port()),
        &[],
        "forged",
    );
    assert!(!plain.status.success(), "plain-text clients are refused");
    // A certificate from another CA: refused.
    let other = scratch_dir("other-ca");
    let other_ca = rcgen::generate_simple_self_signed(vec!["nodepulse-agent".into()])
        .expect("a self-signed certificate");
    std::fs::write(other.path().join("tls.crt"), other_ca.cert.pem()).expect("write");
    std::fs::write(
        other.path().join("tls.key"),
        other_ca.signing_key.serialize_pem(),
    )
    .expect("write");
    let stranger = vec![
        format!("--cacert={}", file(&agent_dir, "ca.crt")),
        format!("--cert={}", file(other.path(), "tls.crt")),
        format!("--key={}", file(other.path(), "tls.key")),
    ];
    let forged = put_heartbeat(&endpoint, &stranger, "forged");
    assert!(
        !forged.status.success(),
        "a certificate of another CA is refused"
    );

    let get = etcdctl(
        &endpoint,
        &agent_tls,
        &["get", "/monitor/heartbeat/worker-1", "--print-value-only"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "x",
        "nothing forged got in"
    );

    // The real agent, with the rendered args and environment and its generated certificate
    // where the pod mounts it, gets its heartbeat in.
    let ds = object(&objects, "DaemonSet", "nodepulse", "nodepulse-agent");
    let agent_container = &ds["spec"]["template"]["spec"]["containers"][0];
    let in_pod = |v: &str| {
        v.replace("/etc/nodepulse/etcd-tls", &agent_dir.to_string_lossy())
            .replace(&format!("https://{host}:2379"), &endpoint)
            .replace("/host/proc", "/proc")
            .replace("/host/root", "/")
            .replace("0.0.0.0:9101", "127.0.0.1:0")
    };
    let mut cmd = Command::new(project_bin("nodepulse-agent"));
    for arg in agent_container["args"].as_sequence().expect("agent args") {
        cmd.arg(in_pod(arg.as_str().expect("string arg")));
    }
    for env in agent_container["env"].as_sequence().expect("agent env") {
        let name = env["name"].as_str().expect("env name");
        match env["value"].as_str() {
            Some(v) => cmd.env(name, in_pod(v)),
            None if name == "NODE_NAME" => cmd.env(name, "worker-2"),
            None => panic!("an agent env var this test does not map: {env:?}"),
        };
    }
    let agent = Process::spawn("agent", cmd);
    wait_until(
        "the agent's heartbeat over the chart's TLS",
        Duration::from_secs(60),
        || {
            let out = etcdctl(
                &endpoint,
                &agent_tls,
                &["get", "/monitor/heartbeat/worker-2", "--print-value-only"],
            );
            out.status.success() && !out.stdout.is_empty()
        },
    );
    drop(agent);

    // `kubectl exec etcd-0 -- etcdctl ...` works as it is: the pod's ETCDCTL_* environment.
    let mut in_pod = Command::new(tool("etcdctl"));
    for env in container["env"].as_sequence().expect("env") {
        if let (Some(k), Some(v)) = (env["name"].as_str(), env["value"].as_str())
            && k.starts_with("ETCDCTL_")
        {
            in_pod.env(
                k,
                v.replace("/etc/etcd/tls/client", &server_dir.to_string_lossy())
                    .replace("127.0.0.1:2379", &client.addr()),
            );
        }
    }
    let health = in_pod
        .args(["endpoint", "health"])
        .output()
        .expect("run etcdctl");
    assert!(
        health.status.success(),
        "etcdctl endpoint health with the pod's environment: {}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
}
