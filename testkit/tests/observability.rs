//! What the chart hands to Prometheus and Grafana, checked by the real tools: the PrometheusRule
//! passes `promtool check rules`, `promtool test rules` fires and holds back each alert on series
//! shaped as the binaries (and the bundled etcd) export them, and every metric an alert or a
//! dashboard panel queries is one the real agent, controller and etcd serve on `/metrics`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_yaml::Value;
use testkit::{
    Etcd, EtcdCluster, KubeApiserver, Launch, http_get, render_chart, repo_root, scratch_dir, tool,
    wait_until,
};

fn chart() -> PathBuf {
    repo_root().join("charts/nodepulse")
}

fn fixture(name: &str) -> PathBuf {
    repo_root().join("testkit/tests/fixtures").join(name)
}

/// The promtool unit tests of the PrometheusRule: the nodepulse group's and the nodepulse-etcd
/// group's.
const ALERT_TESTS: [&str; 2] = ["alerts.test.yaml", "etcd-alerts.test.yaml"];

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn the_one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in the rendered chart");
    found[0]
}

fn assert_ran(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `promtool <command> rules <files>`, which must succeed.
fn promtool_rules(command: &str, files: &[PathBuf]) -> Output {
    let out = Command::new(tool("promtool"))
        .args([command, "rules"])
        .args(files)
        .output()
        .expect("run promtool");
    assert_ran(&format!("promtool {command} rules"), &out);
    out
}

/// The PrometheusRule the chart renders with `prometheusRule.enabled=true`.
fn prometheus_rule() -> Value {
    let objects = render_chart(&["--set", "prometheusRule.enabled=true"]);
    the_one(&objects, "PrometheusRule").clone()
}

/// Every alerting rule of the rule's groups.
fn alerts(rule: &Value) -> Vec<&Value> {
    rule["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .filter(|r| r["alert"].is_string())
        .collect()
}

#[test]
fn prometheus_rule_is_off_by_default() {
    let objects = render_chart(&[]);
    assert!(
        objects
            .iter()
            .all(|o| o["kind"].as_str() != Some("PrometheusRule")),
        "the Operator's CRD may be absent: no PrometheusRule unless asked for"
    );
}

#[test]
fn prometheus_rule_passes_promtool_check_and_unit_tests() {
    let rule = prometheus_rule();
    let dir = scratch_dir("promtool");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        serde_yaml::to_string(&rule["spec"]).expect("serialize"),
    )
    .expect("write rules.yaml");
    let tests: Vec<PathBuf> = ALERT_TESTS
        .iter()
        .map(|name| {
            let copy = dir.path().join(name);
            std::fs::copy(fixture(name), &copy).expect("copy the promtool tests");
            copy
        })
        .collect();

    promtool_rules("check", &[rules]);
    let unit = promtool_rules("test", &tests);
    println!("{}", text(&unit.stdout));
}

#[test]
fn every_alert_is_documented_and_tested_firing_and_not_firing() {
    let rule = prometheus_rule();
    let runbooks =
        std::fs::read_to_string(repo_root().join("docs/runbooks.md")).expect("docs/runbooks.md");
    let tests: Vec<Value> = ALERT_TESTS
        .iter()
        .map(|name| {
            serde_yaml::from_str(
                &std::fs::read_to_string(fixture(name)).expect("read the promtool tests"),
            )
            .expect("the promtool tests parse")
        })
        .collect();
    let cases: Vec<&Value> = tests
        .iter()
        .flat_map(|file| file["tests"].as_sequence().expect("tests"))
        .flat_map(|t| t["alert_rule_test"].as_sequence().expect("alert_rule_test"))
        .collect();

    let alerts = alerts(&rule);
    assert!(alerts.len() >= 6, "the alerts the chart promises");
    // The etcd mixin's alerts that a one- or three-member etcd can raise, under the chart's prefix.
    let names: BTreeSet<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    for mixin in [
        "MembersDown",
        "InsufficientMembers",
        "NoLeader",
        "HighNumberOfLeaderChanges",
        "HighFsyncDurations",
        "HighCommitDurations",
        "DatabaseQuotaLowSpace",
        "ExcessiveDatabaseGrowth",
        "DatabaseHighFragmentationRatio",
    ] {
        let name = format!("NodepulseEtcd{mixin}");
        assert!(names.contains(name.as_str()), "no {name} alert");
    }
    for alert in alerts {
        let name = alert["alert"].as_str().expect("alert name");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                alert["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        let runbook = alert["annotations"]["runbook_url"]
            .as_str()
            .expect("runbook");
        let anchor = runbook.rsplit_once('#').expect("runbook anchor").1;
        assert_eq!(anchor, name.to_lowercase(), "{name}'s runbook anchor");
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "docs/runbooks.md has no runbook heading for {name}"
        );
        let fired = |firing: bool| {
            cases.iter().any(|c| {
                c["alertname"].as_str() == Some(name)
                    && c["exp_alerts"]
                        .as_sequence()
                        .is_some_and(|a| a.is_empty() != firing)
            })
        };
        assert!(fired(true), "no promtool case where {name} fires");
        assert!(fired(false), "no promtool case where {name} stays quiet");
    }
}

/// The nodepulse and etcd metric names a PromQL expression mentions (a Grafana variable such
/// as `$etcd_namespace` is none).
fn metric_names(expr: &str) -> impl Iterator<Item = &str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .filter(|t| t.starts_with("nodepulse_") || t.starts_with("etcd_"))
}

/// etcd metrics the alerts query that a single member does not export: families with a label
/// per peer have no child, and so no line, until there is a peer (and, for failures, a failure).
/// `members_down_reads_the_peer_failures_a_real_member_exports` proves them on three members.
const ETCD_PEER_METRICS: [&str; 1] = ["etcd_network_peer_sent_failures_total"];

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("target expr").to_string());
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if let Some(q) = var["query"]["query"].as_str() {
            exprs.push(q.to_string());
        }
    }
    exprs
}

/// The sample names a Prometheus text exposition offers: every sample line's name, and for each
/// `# TYPE` family the names its type gives its samples (a labelled family with no child yet,
/// e.g. transitions before the first one, has no sample line but is exported all the same).
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(ty) = line.strip_prefix("# TYPE ") {
            let (name, kind) = ty.split_once(' ').expect("# TYPE <name> <type>");
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

fn scrape(addr: &str) -> String {
    match http_get(addr, "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET http://{addr}/metrics: {other:?}"),
    }
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_query_is_exported_by_the_real_binaries() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(chart().join("dashboards/nodepulse.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queried: Vec<(String, String)> = Vec::new();
    for expr in dashboard_exprs(&dashboard) {
        queried.extend(metric_names(&expr).map(|n| ("dashboard".to_string(), n.to_string())));
    }
    for alert in alerts(&prometheus_rule()) {
        let name = alert["alert"].as_str().expect("alert name");
        let expr = alert["expr"].as_str().expect("alert expr");
        queried.extend(metric_names(expr).map(|n| (name.to_string(), n.to_string())));
    }
    assert!(
        queried.len() > 20,
        "the queries name nodepulse metrics: {queried:?}"
    );

    // The dashboard ships in the chart as it is in the repository.
    let objects = render_chart(&["--set", "grafanaDashboard.enabled=true"]);
    let configmap = the_one(&objects, "ConfigMap");
    assert_eq!(
        configmap["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let shipped: serde_json::Value = serde_json::from_str(
        configmap["data"]["nodepulse.json"]
            .as_str()
            .expect("nodepulse.json in the ConfigMap"),
    )
    .expect("the shipped dashboard is JSON");
    assert_eq!(shipped, dashboard);

    let api = KubeApiserver::with_crds();
    let etcd = Etcd::start();
    let controller = Launch::controller(&api.kubeconfig, "controller")
        .etcd(&etcd.endpoint)
        .args(["--leader-elect=false"])
        .spawn();
    // Every interface counts (loopback too), so the per-interface series exist on any machine.
    let agent = etcd
        .agent("worker-1")
        .ttl(3)
        .args(["--network-device-exclude", ""])
        .spawn();

    let agent_addr = agent.wait_for_serving_addr(Duration::from_secs(30));
    let controller_addr = controller.wait_for_serving_addr(Duration::from_secs(30));
    // Rates (disk, network) need two samples: wait for the second one.
    let mut exported = BTreeSet::new();
    wait_until(
        "the agent's node figures, rates included",
        Duration::from_secs(60),
        || {
            exported = exported_names(&scrape(&agent_addr));
            exported.contains("nodepulse_node_network_receive_bytes_per_second")
                && exported.contains("nodepulse_node_disk_read_bytes_per_second")
        },
    );
    exported.extend(exported_names(&scrape(&controller_addr)));
    // etcd serves its metrics on the client URL too; the chart's `--listen-metrics-urls` serves
    // the same registry on 2381.
    let etcd_addr = etcd.endpoint.trim_start_matches("http://");
    exported.extend(exported_names(&scrape(etcd_addr)));
    exported.extend(ETCD_PEER_METRICS.iter().map(|n| n.to_string()));
    assert!(
        queried.iter().any(|(_, n)| n.starts_with("etcd_")),
        "the etcd alerts and panels query etcd's metrics"
    );

    let missing: Vec<_> = queried
        .iter()
        .filter(|(_, name)| !exported.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "queried but not exported (by whom, metric): {missing:?}\nexported: {exported:?}"
    );
}

/// The rendered object of `kind` named `name`.
fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered chart"))
}

/// The PrometheusRule's group called `name`, if it renders.
fn group<'a>(rule: &'a Value, name: &str) -> Option<&'a Value> {
    rule["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .find(|g| g["name"].as_str() == Some(name))
}

#[test]
fn etcd_service_monitor_scrapes_the_members_metrics_port_that_the_etcd_alerts_query() {
    let monitors = |objects: &[Value]| -> Vec<String> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some("ServiceMonitor"))
            .map(|o| o["metadata"]["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert!(
        monitors(&render_chart(&[])).is_empty(),
        "no ServiceMonitor unless asked for"
    );

    let objects = render_chart(&[
        "--set",
        "etcd.serviceMonitor.enabled=true",
        "--set",
        "etcd.serviceMonitor.labels.release=kps",
        "--set",
        "prometheusRule.enabled=true",
    ]);
    let monitor = named(&objects, "ServiceMonitor", "etcd");
    assert_eq!(monitor["metadata"]["namespace"].as_str(), Some("etcd"));
    assert_eq!(
        monitor["metadata"]["labels"]["release"].as_str(),
        Some("kps")
    );
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        serde_yaml::from_str::<Value>("[etcd]").expect("yaml")
    );

    // It selects the headless Service, whose port of that name is the members' metrics port.
    let service = named(&objects, "Service", "etcd-service");
    assert_eq!(service["metadata"]["namespace"].as_str(), Some("etcd"));
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "the Service carries the ServiceMonitor's selector label {key:?}"
        );
    }
    let endpoints = monitor["spec"]["endpoints"]
        .as_sequence()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"].as_str(), Some("metrics"));
    assert_eq!(endpoints[0]["scheme"].as_str(), Some("http"));
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
    assert_eq!(endpoints[0]["interval"].as_str(), Some("30s"));
    let port = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .expect("the Service has a metrics port");
    assert_eq!(port["port"].as_u64(), Some(2381));
    let container =
        &named(&objects, "StatefulSet", "etcd")["spec"]["template"]["spec"]["containers"][0];
    let container_port = container["ports"]
        .as_sequence()
        .expect("container ports")
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("the Service's metrics port targets a named container port");
    assert_eq!(container_port["containerPort"].as_u64(), Some(2381));
    assert!(
        container["args"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(container["command"].as_sequence().into_iter().flatten())
            .any(|a| a.as_str() == Some("--listen-metrics-urls=http://0.0.0.0:2381")),
        "etcd serves plain-HTTP metrics on that port"
    );

    // The alerts select what it scrapes: the job label is the Service's name.
    let rule = the_one(&objects, "PrometheusRule");
    let etcd_group = group(rule, "nodepulse-etcd").expect("the nodepulse-etcd group");
    for alert in etcd_group["rules"].as_sequence().expect("rules") {
        let expr = alert["expr"].as_str().expect("expr");
        assert!(
            expr.contains(r#"job="etcd-service", namespace="etcd""#),
            "{} selects the bundled etcd's series: {expr}",
            alert["alert"].as_str().unwrap_or("?")
        );
    }

    // The NetworkPolicy admits scrapes of that port from networkPolicy.metricsFrom.
    let from = r#"networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.kubernetes\.io/metadata\.name=monitoring"#;
    let objects = render_chart(&["--set", from]);
    let policy = named(&objects, "NetworkPolicy", "etcd");
    assert_eq!(policy["metadata"]["namespace"].as_str(), Some("etcd"));
    let metrics_rule = policy["spec"]["ingress"]
        .as_sequence()
        .expect("ingress")
        .iter()
        .find(|r| r["ports"][0]["port"].as_str() == Some("metrics"))
        .expect("an ingress rule for the metrics port");
    assert_eq!(
        metrics_rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
            .as_str(),
        Some("monitoring")
    );

    // An external etcd is someone else's to watch: neither the ServiceMonitor nor the group.
    let external = repo_root().join("charts/nodepulse/ci/external-etcd-tls-values.yaml");
    let objects = render_chart(&[
        "-f",
        external.to_str().expect("utf-8 path"),
        "--set",
        "etcd.serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ]);
    assert!(
        monitors(&objects).is_empty(),
        "no ServiceMonitor for an external etcd"
    );
    let rule = the_one(&objects, "PrometheusRule");
    assert!(group(rule, "nodepulse").is_some());
    assert!(group(rule, "nodepulse-etcd").is_none());
}

#[test]
fn members_down_reads_the_peer_failures_a_real_member_exports() {
    let mut cluster = EtcdCluster::start(3);
    let addrs: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.trim_start_matches("http://").to_string())
        .collect();
    cluster.kill(2);
    // The survivors keep a quorum and count what they fail to send to the member that is gone,
    // one series per peer (`To`, its member ID), as NodepulseEtcdMembersDown's peer branch reads.
    let mut exposition = String::new();
    wait_until(
        "a survivor counts failed sends to the killed member",
        Duration::from_secs(60),
        || {
            exposition = scrape(&addrs[0]);
            exposition
                .lines()
                .any(|l| l.starts_with("etcd_network_peer_sent_failures_total{To=\""))
        },
    );
    let exported = exported_names(&exposition);
    for name in ETCD_PEER_METRICS {
        assert!(exported.contains(name), "{name} not exported by a member");
    }
    assert!(
        exposition.lines().any(|l| l == "etcd_server_has_leader 1"),
        "two members of three keep a leader"
    );
}
