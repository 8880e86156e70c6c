//! The harness's servers are real: the API server enforces the CRD schemas and serves the
//! printer columns, and etcd expires lease-bound keys by itself.

use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nodepulse_crd::v1alpha1::{MonitorNode, MonitorNodeSpec, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::UsageSummary;
use testkit::{Etcd, KubeApiserver, eventually};

#[tokio::test]
async fn monitor_node_status_shows_in_printer_columns() {
    let server = KubeApiserver::shared();
    let api: Api<MonitorNode> = Api::all(server.client().await);
    let node = MonitorNode::new("columns-worker-1", MonitorNodeSpec {});
    api.create(&PostParams::default(), &node)
        .await
        .expect("create MonitorNode");

    let status = MonitorNodeStatus {
        state: Some(NodeState::Alive),
        reason: Some("HeartbeatSeen".into()),
        agent_version: Some("9.9.9".into()),
        config: Some(nodepulse_crd::v1alpha1::AppliedConfigStatus {
            interval: 2,
            metrics: "cpu".parse().unwrap(),
            ..Default::default()
        }),
        usage: Some(UsageSummary {
            cpu_percent: Some(12.5),
            memory_percent: Some(43.2),
            disk_percent: Some(71.0),
            load1: Some(0.4),
        }),
        ..Default::default()
    };
    let patch = serde_json::json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorNode",
        "status": status,
    });
    api.patch_status(
        "columns-worker-1",
        &PatchParams::apply("testkit").force(),
        &Patch::Apply(&patch),
    )
    .await
    .expect("patch status through the status subresource");

    let table = server.kubectl_ok(&["get", "monitornodes", "columns-worker-1"]);
    let mut lines = table.lines();
    let header: Vec<_> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "STATUS",
            "CPU%",
            "MEMORY%",
            "DISK%",
            "INTERVAL",
            "LAST-HEARTBEAT",
            "AGE",
            "MAINTENANCE"
        ],
        "{table}"
    );
    let row: Vec<_> = lines.next().expect("row").split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["columns-worker-1", "Alive", "12.5", "43.2", "71", "2"],
        "{table}"
    );

    let wide = server.kubectl_ok(&["get", "mn", "columns-worker-1", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("REASON"), "{wide}");
    assert!(
        wide.contains("HeartbeatSeen") && wide.contains("9.9.9"),
        "{wide}"
    );

    // The category and the short name work too.
    let by_category = server.kubectl_ok(&["get", "monitoring"]);
    assert!(by_category.contains("columns-worker-1"), "{by_category}");
}

fn monitor_config(name: &str, interval: i64, metrics: &[&str]) -> String {
    serde_json::json!({
        "apiVersion": "nodepulse.io/v1alpha1",
        "kind": "MonitorConfig",
        "metadata": {"name": name},
        "spec": {"interval": interval, "metrics": metrics},
    })
    .to_string()
}

#[test]
fn api_server_rejects_bad_monitor_configs() {
    let server = KubeApiserver::shared();
    let cases = [
        (monitor_config("bad-interval", 0, &["cpu"]), "spec.interval"),
        (
            monitor_config("bad-interval-high", 3601, &["cpu"]),
            "spec.interval",
        ),
        (
            monitor_config("bad-metric", 2, &["cpu", "gpu"]),
            "spec.metrics[1]",
        ),
        (monitor_config("no-metrics", 2, &[]), "spec.metrics"),
        (
            monitor_config("dup-metrics", 2, &["cpu", "cpu"]),
            "spec.metrics[1]",
        ),
    ];
    for (manifest, field) in cases {
        let out = server.kubectl_stdin(&["apply", "-f", "-"], &manifest);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {manifest}");
        assert!(
            stderr.contains("Invalid value")
                || stderr.contains("Unsupported value")
                || stderr.contains("Duplicate value")
                || stderr.contains("should have at least 1 items"),
            "{stderr}"
        );
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
    let ok = server.kubectl_stdin(
        &["apply", "-f", "-"],
        &monitor_config("good", 2, &["cpu", "memory"]),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test]
async fn lease_bound_key_vanishes_after_its_ttl() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let lease = client.lease_grant(2, None).await.expect("grant lease");
    client
        .put(
            "/monitor/heartbeat/ttl-test",
            "alive",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await
        .expect("put");
    let start = Instant::now();
    assert_eq!(
        client
            .get("/monitor/heartbeat/ttl-test", None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
    eventually("lease-bound key to expire", Duration::from_secs(5), || {
        let mut client = client.clone();
        async move {
            let resp = client.get("/monitor/heartbeat/ttl-test", None).await.ok()?;
            resp.kvs().is_empty().then_some(())
        }
    })
    .await;
    // etcd must not expire it early either.
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "expired after {:?}",
        start.elapsed()
    );

    let out = etcd.etcdctl(&["get", "--prefix", "/monitor/"]);
    assert!(out.status.success() && out.stdout.is_empty());
}
