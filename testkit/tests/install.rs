//! The chart against the real tools: the Helm chart lints and renders for the supported
//! values and refuses bad ones, installs into a real kube-apiserver, the plain manifests pass a
//! server-side dry run and do not drift from the chart, the Dockerfile ships what `make release`
//! builds, and the 3-member etcd command line the chart renders really forms a cluster.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_yaml::Value;
use testkit::{
    KubeApiserver, Process, ReservedPort, helm, http_get, mount_and_volume, render_chart,
    repo_root, scratch_dir, tool, wait_until,
};

/// The chart's directory.
fn chart() -> PathBuf {
    repo_root().join("charts/nodepulse")
}

/// A values file of the chart's `ci/` folder (also what `make lint` lints).
fn ci_values(name: &str) -> String {
    chart().join("ci").join(name).to_string_lossy().into_owned()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// The one object of `kind` named `name`.
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().expect("kind").to_string())
        .collect()
}

/// A container's `args` as strings.
fn container_args(workload: &Value) -> Vec<String> {
    workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

#[test]
fn helm_lint_strict_and_template_pass_for_defaults_three_members_and_external_tls_etcd() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let cases: [(&str, Vec<String>); 4] = [
        ("defaults", vec![]),
        (
            "etcd.replicas=3",
            vec!["--set".into(), "etcd.replicas=3".into()],
        ),
        (
            "external etcd with TLS",
            vec!["-f".into(), ci_values("external-etcd-tls-values.yaml")],
        ),
        (
            "chart etcd with client and peer TLS",
            vec!["-f".into(), ci_values("etcd-tls-values.yaml")],
        ),
    ];
    for (what, extra) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let mut lint = vec!["lint", "--strict", chart];
        lint.extend_from_slice(&extra);
        let out = helm(&lint);
        assert!(
            out.status.success(),
            "helm lint --strict ({what}) failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let objects = render_chart(&extra);
        assert!(
            kinds(&objects).contains("DaemonSet") && kinds(&objects).contains("Deployment"),
            "{what}: agent and controller rendered"
        );
    }
}

#[test]
fn bad_values_fail_with_a_clear_message() {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let cases = [
        // An even member count adds no fault tolerance: the schema allows 1 or 3 only.
        (vec!["--set", "etcd.replicas=2"], "/etcd/replicas"),
        (vec!["--set", "etcd.replicas=2"], "must be one of 1, 3"),
        (
            vec!["--set", "etcd.replica=3"],
            "additional properties 'replica' not allowed",
        ),
        (
            vec!["--set", "agent.heartbeatTTL=10s"],
            "additional properties 'heartbeatTTL' not allowed",
        ),
        (
            vec!["--set", "etcd.enabled=false"],
            "/etcd/external/endpoints",
        ),
        (vec!["--set", "logFormat=xml"], "/logFormat"),
    ];
    for (flags, message) in cases {
        for command in [
            ["template", "nodepulse", chart].as_slice(),
            ["lint", "--strict", chart].as_slice(),
        ] {
            let mut args = command.to_vec();
            args.extend_from_slice(&flags);
            let out = helm(&args);
            let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(
                !out.status.success(),
                "helm {args:?} should fail; it said:\n{said}"
            );
            assert!(
                said.contains(message),
                "helm {args:?} should say {message:?}; it said:\n{said}"
            );
        }
    }
}

#[test]
fn rendered_objects_carry_what_the_issue_asks_for() {
    let objects = render_chart(&[]);

    // etcd as the specification names it: namespace etcd, headless etcd-service, StatefulSet etcd.
    object(&objects, "Namespace", "etcd");
    let service = object(&objects, "Service", "etcd-service");
    assert_eq!(service["metadata"]["namespace"].as_str(), Some("etcd"));
    assert_eq!(service["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let sts = object(&objects, "StatefulSet", "etcd");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(1));
    assert_eq!(
        sts["spec"]["podManagementPolicy"].as_str(),
        Some("Parallel")
    );
    assert_eq!(sts["spec"]["serviceName"].as_str(), Some("etcd-service"));
    assert!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
            .is_string()
    );
    let etcd = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(probe_paths(etcd), [Some("/livez"), Some("/readyz")]);
    assert!(container_args(sts).contains(&"--listen-metrics-urls=http://0.0.0.0:2381".to_string()));
    assert!(
        !kinds(&objects).contains("PodDisruptionBudget")
            || objects
                .iter()
                .filter(|o| o["kind"].as_str() == Some("PodDisruptionBudget"))
                .all(|o| o["metadata"]["namespace"].as_str() != Some("etcd")),
        "no etcd PDB for a single member"
    );

    // Agent: every node, host /proc and / read-only, hostPID, non-root, no token, probes.
    let ns = object(&objects, "Namespace", "nodepulse");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("privileged")
    );
    let ds = object(&objects, "DaemonSet", "nodepulse-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"));
    let agent = &pod["containers"][0];
    assert_eq!(agent["env"][0]["name"].as_str(), Some("NODE_NAME"));
    assert_eq!(
        agent["env"][0]["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("spec.nodeName")
    );
    let sc = &agent["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    for (mount, path) in [("/host/proc", "/proc"), ("/host/root", "/")] {
        let (m, volume) = mount_and_volume(pod, agent, mount);
        assert_eq!(m["readOnly"].as_bool(), Some(true), "{mount} read-only");
        assert_eq!(volume["hostPath"]["path"].as_str(), Some(path));
    }
    let args = container_args(ds);
    assert!(args.contains(&"--proc-root=/host/proc".to_string()));
    assert!(args.contains(&"--host-root=/host/root".to_string()));
    assert_eq!(probe_paths(agent), [Some("/healthz"), Some("/readyz")]);
    let endpoints = agent["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .find(|e| e["name"].as_str() == Some("NODEPULSE_ETCD_ENDPOINTS"))
        .expect("etcd endpoints");
    assert_eq!(
        endpoints["value"].as_str(),
        Some("https://etcd-0.etcd-service.etcd.svc.cluster.local:2379")
    );

    // Pod-template labels are stable across chart upgrades: no chart version in them.
    for workload in [
        ds,
        sts,
        object(&objects, "Deployment", "nodepulse-controller"),
    ] {
        let labels = workload["spec"]["template"]["metadata"]["labels"]
            .as_mapping()
            .expect("pod labels");
        assert!(!labels.contains_key("helm.sh/chart"));
        assert!(!labels.contains_key("app.kubernetes.io/version"));
    }

    // Controller: 2 replicas, leader election in its own namespace, least-privilege RBAC.
    let deploy = object(&objects, "Deployment", "nodepulse-controller");
    assert_eq!(deploy["spec"]["replicas"].as_u64(), Some(2));
    assert!(
        container_args(deploy)
            .contains(&"--leader-election-namespace=$(POD_NAMESPACE)".to_string())
    );
    let role = object(&objects, "ClusterRole", "nodepulse-controller");
    let rules = serde_yaml::to_string(&role["rules"]).expect("rules");
    for resource in [
        "monitornodes/status",
        "monitorconfigs/status",
        "monitorconfigs/finalizers",
        "nodes",
        "events",
    ] {
        assert!(rules.contains(resource), "ClusterRole covers {resource}");
    }
    assert!(
        !rules.contains("delete") && !rules.contains('*'),
        "no delete, no wildcard"
    );
    let lease_role = object(&objects, "Role", "nodepulse-controller-leader-election");
    assert_eq!(
        lease_role["rules"][0]["resources"][0].as_str(),
        Some("leases")
    );

    // Three members: all in --initial-cluster, required anti-affinity, PDB maxUnavailable 1.
    let three = render_chart(&["--set", "etcd.replicas=3"]);
    let sts = object(&three, "StatefulSet", "etcd");
    assert_eq!(sts["spec"]["replicas"].as_u64(), Some(3));
    assert!(
        sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]
            .is_sequence()
    );
    let pdb = object(&three, "PodDisruptionBudget", "etcd");
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));
    let initial = container_args(sts)
        .into_iter()
        .find(|a| a.starts_with("--initial-cluster="))
        .expect("--initial-cluster");
    assert_eq!(
        initial,
        "--initial-cluster=etcd-0=https://etcd-0.etcd-service.etcd.svc.cluster.local:2380,\
         etcd-1=https://etcd-1.etcd-service.etcd.svc.cluster.local:2380,\
         etcd-2=https://etcd-2.etcd-service.etcd.svc.cluster.local:2380"
    );

    // External etcd with TLS: no etcd objects, the client Secret mounted, credentials from a Secret.
    let external = render_chart(&["-f", &ci_values("external-etcd-tls-values.yaml")]);
    assert!(!kinds(&external).contains("StatefulSet"));
    let yaml =
        serde_yaml::to_string(object(&external, "DaemonSet", "nodepulse-agent")).expect("yaml");
    for needle in [
        "https://etcd-a.example.internal:2379,https://etcd-b.example.internal:2379",
        "NODEPULSE_ETCD_CA_FILE",
        "secretName: nodepulse-etcd-client-tls",
        "NODEPULSE_ETCD_PASSWORD",
    ] {
        assert!(yaml.contains(needle), "external TLS agent has {needle}");
    }
}

#[test]
fn helm_install_into_a_real_apiserver_is_accepted_and_installs_the_crds() {
    // A private API server without the CRDs: the chart's crds/ folder must bring them.
    let server = KubeApiserver::start();
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let ok = |out: Output, what: &str| -> String {
        assert!(
            out.status.success(),
            "{what} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    };

    let notes = ok(
        server.helm(&["install", "nodepulse", chart, "--namespace", "default"]),
        "helm install (defaults)",
    );
    assert!(
        notes.contains("kubectl get monitornodes"),
        "NOTES tell the next commands:\n{notes}"
    );
    assert!(notes.contains("etcdctl member list -w table"));
    server.kubectl_ok(&["get", "crd", "monitornodes.nodepulse.io"]);
    server.kubectl_ok(&["get", "crd", "monitorconfigs.nodepulse.io"]);
    server.kubectl_ok(&["get", "namespace", "etcd", "nodepulse"]);
    server.kubectl_ok(&[
        "get",
        "statefulset/etcd",
        "service/etcd-service",
        "-n",
        "etcd",
    ]);
    server.kubectl_ok(&[
        "get",
        "daemonset/nodepulse-agent",
        "deployment/nodepulse-controller",
        "role/nodepulse-controller-leader-election",
        "-n",
        "nodepulse",
    ]);
    server.kubectl_ok(&["get", "clusterrole/nodepulse-controller"]);
    // The controller's service account can do what the controller needs, and no more.
    let sa = "system:serviceaccount:nodepulse:nodepulse-controller";
    for (verb, resource, ns, allowed) in [
        ("patch", "monitornodes.nodepulse.io/status", "", "yes"),
        (
            "update",
            "monitorconfigs.nodepulse.io/finalizers",
            "",
            "yes",
        ),
        ("watch", "nodes", "", "yes"),
        ("update", "leases.coordination.k8s.io", "nodepulse", "yes"),
        ("delete", "nodes", "", "no"),
        ("update", "leases.coordination.k8s.io", "kube-system", "no"),
    ] {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", sa];
        if !ns.is_empty() {
            args.extend_from_slice(&["-n", ns]);
        }
        let out = server.kubectl(&args);
        assert_eq!(
            text(&out.stdout).trim(),
            allowed,
            "can {sa} {verb} {resource} in {ns:?}?"
        );
    }

    // Upgrade to a 3-member etcd: the PDB and the new StatefulSet are accepted too.
    ok(
        server.helm(&[
            "upgrade",
            "nodepulse",
            chart,
            "--namespace",
            "default",
            "--set",
            "etcd.replicas=3",
            "--set",
            "defaultConfig.enabled=true",
        ]),
        "helm upgrade (etcd.replicas=3, defaultConfig)",
    );
    let replicas = server.kubectl_ok(&[
        "get",
        "statefulset/etcd",
        "-n",
        "etcd",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "3");
    server.kubectl_ok(&["get", "pdb/etcd", "-n", "etcd"]);
    server.kubectl_ok(&["get", "monitorconfig/nodepulse-default"]);

    // A second release against an external etcd over TLS, in its own namespace.
    ok(
        server.helm(&[
            "install",
            "np-external",
            chart,
            "--namespace",
            "default",
            "-f",
            &ci_values("external-etcd-tls-values.yaml"),
            "--set",
            "namespace.name=np-external",
        ]),
        "helm install (external etcd with TLS)",
    );
    server.kubectl_ok(&[
        "get",
        "daemonset/np-external-nodepulse-agent",
        "-n",
        "np-external",
    ]);
}

#[test]
fn plain_manifests_pass_a_server_side_dry_run() {
    let server = KubeApiserver::start();
    let manifests = repo_root().join("manifests");
    let path = |p: &str| manifests.join(p).to_string_lossy().into_owned();
    // A dry run creates nothing, so objects that other objects need must exist for real: the CRDs
    // (for the kinds) and the namespaces (the NamespaceLifecycle admission plugin rejects objects
    // in a namespace that does not exist).
    server.kubectl_ok(&["apply", "--server-side", "-f", &path("00-crds.yaml")]);
    server.kubectl_ok(&["create", "namespace", "etcd"]);
    server.kubectl_ok(&["create", "namespace", "nodepulse"]);
    for dir in [path(""), path("etcd-3-replicas")] {
        let out = server.kubectl_ok(&["apply", "--dry-run=server", "-f", &dir]);
        for object in [
            "statefulset.apps/etcd",
            "service/etcd-service",
            "daemonset.apps/nodepulse-agent",
            "deployment.apps/nodepulse-controller",
            "clusterrole.rbac.authorization.k8s.io/nodepulse-controller",
        ] {
            assert!(
                out.contains(object),
                "dry run of {dir} accepted {object}:\n{out}"
            );
        }
    }
}

#[test]
fn committed_manifests_match_a_fresh_render_of_the_chart() {
    let fresh = scratch_dir("manifests");
    let status = Command::new("bash")
        .arg(repo_root().join("hack/manifests.sh"))
        .arg(fresh.path())
        .env("HELM", tool("helm"))
        .status()
        .expect("run hack/manifests.sh");
    assert!(status.success(), "hack/manifests.sh failed");
    for file in [
        "01-etcd.yaml",
        "02-nodepulse.yaml",
        "etcd-3-replicas/01-etcd.yaml",
        "etcd-3-replicas/02-nodepulse.yaml",
    ] {
        let committed = std::fs::read_to_string(repo_root().join("manifests").join(file))
            .unwrap_or_else(|e| panic!("manifests/{file}: {e} (run `make manifests`)"));
        let rendered = std::fs::read_to_string(fresh.path().join(file)).expect("rendered file");
        assert!(
            committed == rendered,
            "manifests/{file} drifted from charts/nodepulse: run `make manifests` and commit"
        );
    }
}

#[test]
fn dockerfile_builds_and_copies_what_make_release_builds() {
    let dockerfile =
        std::fs::read_to_string(repo_root().join("Dockerfile")).expect("read Dockerfile");
    let makefile = std::fs::read_to_string(repo_root().join("Makefile")).expect("read Makefile");
    let packages = |text: &str, marker: &str| -> BTreeSet<String> {
        let line = text
            .lines()
            .find(|l| l.contains(marker))
            .unwrap_or_else(|| panic!("a line with {marker:?}"));
        line.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "-p")
            .map(|w| w[1].to_string())
            .collect()
    };
    let released = packages(&makefile, "build --release --bins");
    let imaged = packages(&dockerfile, "cargo build --release --bins");
    assert_eq!(
        imaged, released,
        "the image builds what `make release` builds"
    );
    let expected: BTreeSet<String> = ["nodepulse-agent", "nodepulse-controller", "nodepulsectl"]
        .map(String::from)
        .into();
    assert_eq!(released, expected);
    for bin in &expected {
        assert!(
            dockerfile.contains(&format!(
                "COPY --from=builder /src/target/release/{bin} /usr/local/bin/{bin}"
            )),
            "the image carries {bin}"
        );
        // ...and that is the name cargo gives the binary (panics when it is not built).
        testkit::project_bin(bin);
    }
    assert!(dockerfile.contains("USER 65532:65532"), "non-root user");
    assert!(
        dockerfile.contains("cargo chef cook"),
        "cached dependency layer"
    );
    // The chart runs the binaries where the image puts them.
    let objects = render_chart(&[]);
    for (kind, name, bin) in [
        ("DaemonSet", "nodepulse-agent", "nodepulse-agent"),
        ("Deployment", "nodepulse-controller", "nodepulse-controller"),
    ] {
        let command = &object(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0]["command"]
            [0];
        assert_eq!(
            command.as_str(),
            Some(format!("/usr/local/bin/{bin}").as_str())
        );
    }
}

/// Writes the keys of a rendered Secret as files into `dir` (what the kubelet's volume does).
fn write_secret(secret: &Value, dir: &Path) {
    use base64::Engine;
    std::fs::create_dir_all(dir).expect("create the Secret's directory");
    for (key, value) in secret["data"].as_mapping().expect("Secret data") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().expect("base64 string"))
            .expect("Secret data is base64");
        std::fs::write(dir.join(key.as_str().expect("key")), bytes).expect("write a Secret key");
    }
}

/// Ports one loopback etcd member listens on, standing in for a pod's 2379/2380/2381: reserved
/// (every member's peer URL must be known before any starts, so port 0 cannot do).
struct MemberPorts {
    client: ReservedPort,
    peer: ReservedPort,
    metrics: ReservedPort,
}

/// Rewrites one rendered etcd flag for member `me` on loopback: pod DNS names and 0.0.0.0
/// listeners become 127.0.0.1 with the member's own ports; everything else stays as rendered.
fn loopback_flag(
    flag: &str,
    me: usize,
    ports: &[MemberPorts],
    data_dir: &Path,
    tls_dir: &Path,
) -> String {
    let pod = format!("etcd-{me}");
    let mut flag = flag
        .replace("$(POD_NAME)", &pod)
        .replace("/etc/etcd/tls", &tls_dir.to_string_lossy());
    if flag.starts_with("--data-dir=") {
        return format!("--data-dir={}", data_dir.display());
    }
    for (i, p) in ports.iter().enumerate() {
        let host = format!("etcd-{i}.etcd-service.etcd.svc.cluster.local");
        flag = flag
            .replace(&format!("{host}:2379"), &p.client.addr())
            .replace(&format!("{host}:2380"), &p.peer.addr());
    }
    let mine = &ports[me];
    flag.replace("0.0.0.0:2379", &mine.client.addr())
        .replace("0.0.0.0:2380", &mine.peer.addr())
        .replace("0.0.0.0:2381", &mine.metrics.addr())
}

#[test]
fn three_member_etcd_command_line_from_the_chart_forms_a_cluster() {
    let objects = render_chart(&["--set", "etcd.replicas=3"]);
    let sts = object(&objects, "StatefulSet", "etcd");
    let rendered = container_args(sts);
    for flag in [
        "--name=$(POD_NAME)",
        "--initial-cluster-token=nodepulse-etcd",
        "--initial-cluster-state=new",
    ] {
        assert!(rendered.contains(&flag.to_string()), "rendered {flag}");
    }
    let pod_name_env = &sts["spec"]["template"]["spec"]["containers"][0]["env"][0];
    assert_eq!(pod_name_env["name"].as_str(), Some("POD_NAME"));
    assert_eq!(
        pod_name_env["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("metadata.name")
    );

    let ports: Vec<MemberPorts> = (0..3)
        .map(|_| MemberPorts {
            client: ReservedPort::new(),
            peer: ReservedPort::new(),
            metrics: ReservedPort::new(),
        })
        .collect();
    let dirs: Vec<_> = (0..3).map(|_| scratch_dir("etcd-member")).collect();
    // The certificates the chart generated, where the pods mount them (their names include
    // 127.0.0.1, which the members' loopback URLs use).
    let tls = scratch_dir("etcd-tls");
    for (secret, dir) in [("etcd-server-tls", "client"), ("etcd-peer-tls", "peer")] {
        write_secret(object(&objects, "Secret", secret), &tls.path().join(dir));
    }
    write_secret(
        object(&objects, "Secret", "nodepulse-etcd-client-tls-controller"),
        &tls.path().join("controller"),
    );
    let members: Vec<Process> = (0..3)
        .map(|i| {
            let flags: Vec<String> = rendered
                .iter()
                .map(|f| {
                    let data = dirs[i].path().join("default.etcd");
                    loopback_flag(f, i, &ports, &data, tls.path())
                })
                .collect();
            assert!(
                !flags
                    .iter()
                    .any(|f| f.contains("svc.cluster.local") || f.contains("0.0.0.0")),
                "every pod address mapped to loopback: {flags:?}"
            );
            let mut cmd = Command::new(tool("etcd"));
            cmd.args(&flags);
            Process::spawn(&format!("etcd-{i}"), cmd)
        })
        .collect();

    // Each member's probes answer on the plain metrics port once the cluster has formed.
    for (i, p) in ports.iter().enumerate() {
        let addr = p.metrics.addr();
        let member = &members[i];
        wait_until(
            &format!("etcd-{i} /readyz"),
            Duration::from_secs(60),
            || http_get(&addr, "/readyz").is_some_and(|(status, _)| status == 200),
        );
        assert_eq!(
            http_get(&addr, "/livez").map(|(s, _)| s),
            Some(200),
            "etcd-{i} /livez; output:\n{}",
            member.output_text()
        );
    }

    let endpoint = format!("https://{}", ports[0].client.addr());
    let controller_tls = tls.path().join("controller");
    let mut table = String::new();
    wait_until(
        "etcdctl member list: three members started",
        Duration::from_secs(60),
        || {
            let out = Command::new(tool("etcdctl"))
                .args(["--endpoints", &endpoint, "member", "list", "-w", "table"])
                .arg(format!(
                    "--cacert={}",
                    controller_tls.join("ca.crt").display()
                ))
                .arg(format!(
                    "--cert={}",
                    controller_tls.join("tls.crt").display()
                ))
                .arg(format!(
                    "--key={}",
                    controller_tls.join("tls.key").display()
                ))
                .output()
                .expect("run etcdctl");
            table = text(&out.stdout);
            out.status.success()
                && (0..3).all(|i| {
                    table
                        .lines()
                        .any(|l| l.contains(&format!("| etcd-{i} ")) && l.contains("| started |"))
                })
        },
    );
    println!("{table}");
    assert_eq!(
        table.matches("| started |").count(),
        3,
        "three members, all started:\n{table}"
    );
}

/// The environment a pod's container gets: literal values, and the downward API fields the chart
/// uses resolved as the kubelet would for a pod named `pod` in `namespace` on `node`.
fn pod_env(container: &Value, pod: &str, namespace: &str, node: &str) -> Vec<(String, String)> {
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => node.to_string(),
                    Some("metadata.namespace") => namespace.to_string(),
                    Some("metadata.name") => pod.to_string(),
                    other => panic!("env {name}: unexpected source {other:?}"),
                }
            };
            (name, value)
        })
        .collect()
}

/// Kubernetes' `$(VAR)` expansion of container args.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    env.iter().fold(arg.to_string(), |a, (k, v)| {
        a.replace(&format!("$({k})"), v)
    })
}

/// A rendered workload's container as a local command line: its command, args (with `$(VAR)`
/// expanded) and env, with `rewrite` applied to args and env values (pod paths and addresses to
/// this machine's).
fn local_command(
    workload: &Value,
    binary: &str,
    env: &[(String, String)],
    rewrite: impl Fn(&str) -> String,
) -> Command {
    let container = &workload["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["command"][0].as_str(),
        Some(format!("/usr/local/bin/{binary}").as_str())
    );
    let mut cmd = Command::new(testkit::project_bin(binary));
    for arg in container_args(workload) {
        cmd.arg(rewrite(&expand(&arg, env)));
    }
    cmd.env_clear();
    for (k, v) in env {
        cmd.env(k, rewrite(v));
    }
    cmd
}

#[test]
fn rendered_agent_and_controller_command_lines_run_the_real_binaries() {
    // What the chart renders must be what the binaries accept: run them with exactly the rendered
    // args and env, only the pod's paths and addresses mapped to this machine. Plain text here
    // (the harness's etcd); secure_defaults.rs runs the default TLS against the chart's
    // certificates.
    let objects = render_chart(&[
        "--set",
        "etcd.tls.client.enabled=false,etcd.tls.peer.enabled=false,etcd.client.tls.enabled=false",
    ]);
    let etcd = testkit::Etcd::start();
    let server = KubeApiserver::shared();
    let node = "chart-node-1";
    let in_cluster_etcd = "http://etcd-0.etcd-service.etcd.svc.cluster.local:2379";

    let ds = object(&objects, "DaemonSet", "nodepulse-agent");
    let agent_env = pod_env(
        &ds["spec"]["template"]["spec"]["containers"][0],
        "nodepulse-agent-x1",
        "nodepulse",
        node,
    );
    let agent_cmd = local_command(ds, "nodepulse-agent", &agent_env, |s| {
        s.replace(in_cluster_etcd, &etcd.endpoint)
            .replace("/host/proc", "/proc")
            .replace("/host/root", "/")
            .replace("0.0.0.0:9101", "127.0.0.1:0")
    });
    let agent = Process::spawn("agent", agent_cmd);
    let agent_addr = agent.wait_for_serving_addr(Duration::from_secs(60));
    for path in ["/healthz", "/readyz"] {
        wait_until(
            &format!("the agent's {path} (TESTKIT_VERBOSE=1 shows its output)"),
            Duration::from_secs(60),
            || http_get(&agent_addr, path).is_some_and(|(s, _)| s == 200),
        );
    }
    wait_until(
        "the agent's heartbeat key in etcd",
        Duration::from_secs(30),
        || {
            let out = etcd.etcdctl(&[
                "get",
                &format!("/monitor/heartbeat/{node}"),
                "--print-value-only",
            ]);
            out.status.success() && !out.stdout.is_empty()
        },
    );

    let deploy = object(&objects, "Deployment", "nodepulse-controller");
    let mut controller_env = pod_env(
        &deploy["spec"]["template"]["spec"]["containers"][0],
        "nodepulse-controller-x1",
        "default",
        "some-node",
    );
    // In a pod the client finds the in-cluster config; here the harness's kubeconfig.
    controller_env.push((
        "KUBECONFIG".into(),
        server.kubeconfig.to_string_lossy().into_owned(),
    ));
    let controller_cmd = local_command(deploy, "nodepulse-controller", &controller_env, |s| {
        s.replace(in_cluster_etcd, &etcd.endpoint)
            .replace("0.0.0.0:8080", "127.0.0.1:0")
    });
    let controller = Process::spawn("controller", controller_cmd);
    let controller_addr = controller.wait_for_serving_addr(Duration::from_secs(60));
    wait_until("the controller's /healthz", Duration::from_secs(60), || {
        http_get(&controller_addr, "/healthz").is_some_and(|(s, _)| s == 200)
    });
    wait_until(
        "the controller's leader Lease and MonitorNode chart-node-1 Alive",
        Duration::from_secs(60),
        || {
            let lease = server.kubectl(&["get", "lease", "nodepulse-controller", "-n", "default"]);
            let state =
                server.kubectl(&["get", "monitornode", node, "-o", "jsonpath={.status.state}"]);
            lease.status.success() && text(&state.stdout) == "Alive"
        },
    );
    drop(agent);
    drop(controller);
}

/// One container of a pod template, by name.
fn container<'a>(workload: &'a Value, key: &str, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"][key]
        .as_sequence()
        .unwrap_or_else(|| panic!("{key} rendered"))
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {key} entry {name}"))
}

#[test]
fn chart_defaults_run_on_a_real_node() {
    // What a first install on a real node ran into, each checked on the render.
    let objects = render_chart(&[]);
    let ds = object(&objects, "DaemonSet", "nodepulse-agent");
    let deploy = object(&objects, "Deployment", "nodepulse-controller");
    let sts = object(&objects, "StatefulSet", "etcd");

    // Logs a person reads by default.
    for workload in [ds, deploy] {
        let args = container_args(workload);
        assert!(args.contains(&"--log-format=text".to_string()), "{args:?}");
    }
    let json = render_chart(&["--set", "logFormat=json"]);
    assert!(
        container_args(object(&json, "DaemonSet", "nodepulse-agent"))
            .contains(&"--log-format=json".to_string())
    );

    // The host's / without HostToContainer: it fails on hosts whose / is a private mount.
    let root_mount = |ds: &Value| {
        container(ds, "containers", "agent")["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["mountPath"].as_str() == Some("/host/root"))
            .expect("/host/root mounted")["mountPropagation"]
            .as_str()
            .map(str::to_string)
    };
    assert_eq!(root_mount(ds).as_deref(), Some("None"));
    let shared = render_chart(&["--set", "agent.hostRootMountPropagation=HostToContainer"]);
    assert_eq!(
        root_mount(object(&shared, "DaemonSet", "nodepulse-agent")).as_deref(),
        Some("HostToContainer")
    );
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let bad = helm(&[
        "template",
        "nodepulse",
        chart,
        "--set",
        "agent.hostRootMountPropagation=Bidirectional",
    ]);
    assert!(!bad.status.success(), "Bidirectional must be refused");
    assert!(
        text(&bad.stderr).contains("hostRootMountPropagation"),
        "{}",
        text(&bad.stderr)
    );

    // Readiness follows etcd, liveness only the process.
    let controller = container(deploy, "containers", "controller");
    assert_eq!(probe_paths(controller), [Some("/healthz"), Some("/readyz")]);

    // The new agent starts before the old one stops (the old one yields the heartbeat key), so
    // helm --wait, which waits for nodes - maxUnavailable ready pods, waits for every agent, on
    // install and upgrade alike; on the host's network two agents cannot share the port.
    for args in [&[][..], &["--is-upgrade"][..]] {
        let rendered = render_chart(args);
        let ds = object(&rendered, "DaemonSet", "nodepulse-agent");
        let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0), "{args:?}");
        assert_eq!(rolling["maxSurge"].as_u64(), Some(1), "{args:?}");
    }
    let host = render_chart(&["--set", "agent.hostNetwork=true"]);
    let host_ds = object(&host, "DaemonSet", "nodepulse-agent");
    let rolling = &host_ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(1));
    assert_eq!(rolling["maxSurge"].as_u64(), Some(0));
    let own = render_chart(&["--set", "agent.updateStrategy.type=OnDelete"]);
    assert_eq!(
        object(&own, "DaemonSet", "nodepulse-agent")["spec"]["updateStrategy"]["type"].as_str(),
        Some("OnDelete")
    );

    // The etcd namespace, and so the PVCs in it, go with the release unless asked to stay;
    // restricted by default.
    let ns = object(&objects, "Namespace", "etcd");
    assert!(ns["metadata"]["annotations"]["helm.sh/resource-policy"].is_null());
    let kept = render_chart(&["--set", "etcd.namespace.keepOnUninstall=true"]);
    assert_eq!(
        object(&kept, "Namespace", "etcd")["metadata"]["annotations"]["helm.sh/resource-policy"]
            .as_str(),
        Some("keep")
    );
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str(),
        Some("restricted")
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(
        pod["securityContext"]["fsGroupChangePolicy"].as_str(),
        Some("OnRootMismatch")
    );
    assert!(
        pod["initContainers"].is_null(),
        "no root init container by default"
    );

    // hostPath PVs ignore fsGroup: the opt-in init container chowns the volume's root, as root
    // with CAP_CHOWN only; etcd itself stays 65532, and the namespace allows root (baseline).
    let hostpath = render_chart(&["-f", &ci_values("etcd-hostpath-values.yaml")]);
    let sts = object(&hostpath, "StatefulSet", "etcd");
    let init = container(sts, "initContainers", "volume-permissions");
    let cmd: Vec<&str> = init["command"]
        .as_sequence()
        .expect("command")
        .iter()
        .map(|c| c.as_str().expect("string"))
        .collect();
    assert_eq!(cmd, ["chown", "65532:65532", "/var/run/etcd"]);
    let sc = &init["securityContext"];
    assert_eq!(sc["runAsUser"].as_u64(), Some(0));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(
        sc["capabilities"]["add"].as_sequence().map(Vec::len),
        Some(1)
    );
    assert_eq!(sc["capabilities"]["add"][0].as_str(), Some("CHOWN"));
    assert_eq!(
        init["volumeMounts"][0]["mountPath"].as_str(),
        Some("/var/run/etcd")
    );
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"].as_u64(), Some(65532));
    assert!(container(sts, "containers", "etcd")["securityContext"]["runAsUser"].is_null());
    assert_eq!(
        object(&hostpath, "Namespace", "etcd")["metadata"]["labels"]
            ["pod-security.kubernetes.io/enforce"]
            .as_str(),
        Some("baseline")
    );

    // helm uninstall: a pre-delete hook stops the controller and marks the MonitorNodes Unknown,
    // with the controller's ServiceAccount, allowed to patch its own Deployment and no other.
    let job = object(&objects, "Job", "nodepulse-controller-uninstall");
    assert_eq!(
        job["metadata"]["annotations"]["helm.sh/hook"].as_str(),
        Some("pre-delete")
    );
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"].as_str(),
        Some("nodepulse-controller")
    );
    let args = container_args(job);
    assert!(
        args.contains(&"--on-uninstall".to_string())
            && args.contains(&"--deployment-name=nodepulse-controller".to_string()),
        "{args:?}"
    );
    let role = object(&objects, "Role", "nodepulse-controller-leader-election");
    let rule = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .find(|r| r["resources"][0].as_str() == Some("deployments"))
        .expect("a rule on deployments");
    assert_eq!(
        rule["resourceNames"][0].as_str(),
        Some("nodepulse-controller")
    );
    let off = render_chart(&["--set", "controller.markNodesUnknownOnUninstall=false"]);
    assert!(!kinds(&off).contains("Job"));
}

/// The HTTP paths of a container's liveness and readiness probes.
fn probe_paths(container: &Value) -> [Option<&str>; 2] {
    ["livenessProbe", "readinessProbe"].map(|probe| container[probe]["httpGet"]["path"].as_str())
}

/// The user-facing roles carry the labels that aggregate them into `view`, `edit` and `admin`
/// (the aggregation itself is the controller manager's: the cluster e2e asks `kubectl auth
/// can-i`), and go with `userRoles.aggregate=false`.
#[test]
fn user_roles_aggregate_into_view_edit_and_admin() {
    let objects = render_chart(&[]);
    let labels = |name: &str| -> BTreeSet<String> {
        object(&objects, "ClusterRole", name)["metadata"]["labels"]
            .as_mapping()
            .expect("labels")
            .iter()
            .filter(|(_, v)| v.as_str() == Some("true"))
            .filter_map(|(k, _)| k.as_str()?.strip_prefix("rbac.authorization.k8s.io/"))
            .map(String::from)
            .collect()
    };
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        labels("nodepulse-view"),
        set(&[
            "aggregate-to-admin",
            "aggregate-to-edit",
            "aggregate-to-view"
        ])
    );
    assert_eq!(
        labels("nodepulse-edit"),
        set(&["aggregate-to-admin", "aggregate-to-edit"])
    );
    let edit = &object(&objects, "ClusterRole", "nodepulse-edit")["rules"][0];
    assert_eq!(edit["resources"][0].as_str(), Some("monitorconfigs"));
    let off = render_chart(&["--set", "userRoles.aggregate=false"]);
    assert!(
        !off.iter().any(|o| o["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n == "nodepulse-view" || n == "nodepulse-edit")),
        "userRoles.aggregate=false still renders the roles"
    );
}

/// Every pod runs as `podUser` (65532 by default); another UID is one value, and null leaves the
/// UID to the platform (OpenShift's restricted SCC) while the pods stay non-root.
#[test]
fn the_pods_user_is_a_value() {
    let pods = |objects: &[Value]| -> Vec<(String, Value)> {
        objects
            .iter()
            .filter(|o| {
                matches!(
                    o["kind"].as_str(),
                    Some("DaemonSet" | "Deployment" | "StatefulSet" | "Job")
                )
            })
            .map(|o| {
                let name = o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (
                    name,
                    o["spec"]["template"]["spec"]["securityContext"].clone(),
                )
            })
            .collect()
    };
    let defaults = render_chart(&["--set", "nodeCondition.enabled=true"]);
    for (name, sc) in pods(&defaults) {
        assert_eq!(sc["runAsUser"].as_u64(), Some(65532), "{name}: {sc:?}");
        assert_eq!(sc["runAsGroup"].as_u64(), Some(65532), "{name}: {sc:?}");
    }
    let other = render_chart(&[
        "--set",
        "podUser.runAsUser=1001",
        "--set",
        "podUser.runAsGroup=1002",
    ]);
    for (name, sc) in pods(&other) {
        assert_eq!(sc["runAsUser"].as_u64(), Some(1001), "{name}: {sc:?}");
        assert_eq!(sc["runAsGroup"].as_u64(), Some(1002), "{name}: {sc:?}");
    }
    let platform = render_chart(&[
        "--set",
        "podUser.runAsUser=null",
        "--set",
        "podUser.runAsGroup=null",
    ]);
    let all = pods(&platform);
    assert!(all.len() >= 3, "{all:?}");
    for (name, sc) in all {
        assert!(
            sc["runAsUser"].is_null() && sc["runAsGroup"].is_null() && sc["fsGroup"].is_null(),
            "{name}: {sc:?}"
        );
        assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{name}");
    }
}

/// etcd's quota sits below its volume: three quarters of `etcd.persistence.size` (at most 8 GiB),
/// so the NOSPACE alarm comes before a full disk (which makes etcd exit); an explicit
/// `etcd.quotaBackendBytes` wins, and without a volume etcd keeps its default.
#[test]
fn the_etcd_quota_leaves_room_on_its_volume() {
    let quota = |extra: &[&str]| -> Option<String> {
        let objects = render_chart(extra);
        let args = object(&objects, "StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"]
            [0]["args"]
            .as_sequence()
            .expect("etcd's args")
            .iter()
            .filter_map(|a| a.as_str()?.strip_prefix("--quota-backend-bytes=").map(String::from))
            .collect::<Vec<_>>();
        args.into_iter().next()
    };
    assert_eq!(quota(&[]).as_deref(), Some("805306368"), "1Gi volume");
    assert_eq!(
        quota(&["--set", "etcd.persistence.size=10Gi"]).as_deref(),
        Some("8053063680")
    );
    assert_eq!(
        quota(&["--set", "etcd.persistence.size=64Gi"]).as_deref(),
        Some("8589934592")
    );
    assert_eq!(
        quota(&["--set", "etcd.quotaBackendBytes=4294967296"]).as_deref(),
        Some("4294967296")
    );
    assert_eq!(quota(&["--set", "etcd.persistence.enabled=false"]), None);
    let chart = chart();
    let out = helm(&[
        "template",
        "nodepulse",
        chart.to_str().expect("utf-8 path"),
        "--set",
        "etcd.persistence.size=1.5Gi",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("etcd.persistence.size \"1.5Gi\""),
        "{}",
        text(&out.stderr)
    );
}
