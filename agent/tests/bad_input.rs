//! Bad config values end to end: a real agent, the real controller and a real API server.
//! Each value of the shared table (`crd/tests/support/bad_configs.rs`, 40 rows) is put in the
//! agent's config key by hand; the agent must keep running with its last good config, log why,
//! and the MonitorNode must show `ConfigApplied=False` with that reason.

#[path = "../../crd/tests/support/bad_configs.rs"]
mod bad_configs;

use std::time::Duration;

use nodepulse_crd::wire::ConfigValue;
use serde_json::Value;
use testkit::{KubeApiserver, TestEnv, eventually, http_get, put_config};

use bad_configs::bad_configs;

const NODE: &str = "worker-1";

/// The MonitorNode as `kubectl get -o json` shows it, if it exists.
fn monitor_node(api: &KubeApiserver) -> Option<Value> {
    let out = api.kubectl(&["get", "monitornode", NODE, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// (status, reason, message) of the MonitorNode's ConfigApplied condition.
fn config_applied(mn: &Value) -> Option<(String, String, String)> {
    let conds = mn.pointer("/status/conditions")?.as_array()?;
    let c = conds.iter().find(|c| c["type"] == "ConfigApplied")?;
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_config_is_rejected_and_reported_while_the_last_good_one_stays() {
    let (env, etcd) = TestEnv::start().await;
    let api = env.api();
    let _controller = env.controller("controller-0").spawn();
    let mut agent = env
        .agent(NODE)
        .args(["--heartbeat-min-interval", "500ms"])
        .start();
    let client = etcd.client().await;

    // The last good config: every rejection below must keep it.
    let good = put_config(
        &client,
        NODE,
        r#"{"interval":2,"metrics":["cpu","memory"]}"#,
    )
    .await;
    agent
        .process
        .wait_for_line(Duration::from_secs(10), "good config applied", |l| {
            l.contains(&format!("(revision {good})")) && l.contains("config updated")
        });
    eventually("ConfigApplied=True", Duration::from_secs(60), || async {
        let mn = monitor_node(api)?;
        let (status, reason, _) = config_applied(&mn)?;
        (status == "True" && reason == "Applied").then_some(())
    })
    .await;

    let table = bad_configs();
    for row in &table {
        let reason = ConfigValue::parse(&row.value)
            .expect_err(row.what)
            .to_string();
        assert!(reason.contains(row.reason), "{}: {reason}", row.what);
        let from = agent.process.line_count();
        let revision = put_config(&client, NODE, row.value.clone()).await;
        let want = format!(
            "config rejected (revision {revision}): {reason}; keeping interval 2s, metrics [cpu, memory]"
        );
        agent.process.wait_for_line_from(
            from,
            Duration::from_secs(5),
            &format!("rejection of {}", row.what),
            |l| l.contains(&want),
        );
        let mn = eventually(
            &format!("ConfigApplied=False for {}", row.what),
            Duration::from_secs(15),
            || async {
                let mn = monitor_node(api)?;
                let (status, why, message) = config_applied(&mn)?;
                (status == "False" && why == "Rejected" && message.ends_with(&reason)).then_some(mn)
            },
        )
        .await;
        // The config in force is still the last good one.
        let config = &mn["status"]["config"];
        assert_eq!(config["interval"], 2, "{}: {config}", row.what);
        assert_eq!(config["revision"], good, "{}: {config}", row.what);
        assert_eq!(mn["status"]["state"], "Alive", "{}", row.what);
        assert!(
            agent.process.is_running(),
            "agent exited after {}",
            row.what
        );
    }

    // Still sampling at the good interval, and counted every rejection.
    let from = agent.process.line_count();
    agent
        .process
        .wait_for_line_from(from, Duration::from_secs(5), "a sample", |l| {
            l.contains(" sample cpu=") && l.contains(" mem=") && !l.contains(" load=")
        });
    let (_, metrics) = http_get(&agent.http, "/metrics").expect("agent /metrics");
    let rejected = format!("nodepulse_agent_config_rejected_total {}", table.len());
    assert!(
        metrics.contains(&rejected),
        "want {rejected} in:\n{metrics}"
    );

    // A good value clears the error.
    let fixed = put_config(&client, NODE, r#"{"interval":3,"metrics":["cpu"]}"#).await;
    eventually(
        "ConfigApplied=True again",
        Duration::from_secs(15),
        || async {
            let mn = monitor_node(api)?;
            let (status, _, _) = config_applied(&mn)?;
            (status == "True" && mn["status"]["config"]["revision"] == fixed).then_some(())
        },
    )
    .await;
}
