//! `nodepulsectl` as a user runs it, against a real etcd: the watch's lines, the config tool's
//! validation and exit codes, and the watch outliving an etcd restart and a compaction.

use std::process::{Command, Output};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use nix::sys::signal::Signal;
use nodepulse_crd::wire::{
    AgentState, AppliedConfig, CONFIG_PREFIX, Heartbeat, UsageSummary, config_key, heartbeat_key,
};
use testkit::{Etcd, Process, project_bin};

fn ctl(etcd: &Etcd, args: &[&str]) -> Output {
    Command::new(project_bin("nodepulsectl"))
        .args(args)
        .env("NODEPULSE_ETCD_ENDPOINTS", &etcd.endpoint)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nodepulsectl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn watch(etcd: &Etcd, extra: &[&str]) -> Process {
    let mut cmd = Command::new(project_bin("nodepulsectl"));
    cmd.arg("watch")
        .args(extra)
        .env("NODEPULSE_ETCD_ENDPOINTS", &etcd.endpoint);
    Process::spawn("watch", cmd)
}

fn heartbeat(node: &str, state: AgentState, interval: u32) -> String {
    let now = jiff::Timestamp::now();
    Heartbeat {
        node: node.into(),
        agent_version: "test".into(),
        state,
        started_at: now,
        updated_at: now,
        ttl_seconds: 2,
        config: AppliedConfig {
            revision: 0,
            interval,
            metrics: "cpu,memory".parse().unwrap(),
            source: None,
            error: None,
        },
        usage: Some(UsageSummary {
            cpu_percent: Some(7.5),
            memory_percent: Some(41.0),
            ..Default::default()
        }),
    }
    .to_json()
}

/// Puts a heartbeat attached to a fresh lease, as an agent would; returns the lease id.
async fn put_heartbeat(client: &mut Client, node: &str, ttl: i64) -> i64 {
    let lease = client
        .lease_grant(ttl, None)
        .await
        .expect("lease grant")
        .id();
    put_on_lease(client, node, AgentState::Running, 10, lease).await;
    lease
}

/// Writes `node`'s heartbeat value again, on the lease it already has, as an agent would.
async fn put_on_lease(
    client: &mut Client,
    node: &str,
    state: AgentState,
    interval: u32,
    lease: i64,
) {
    client
        .put(
            heartbeat_key(node),
            heartbeat(node, state, interval),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap_or_else(|e| panic!("put the heartbeat of {node}: {e}"));
}

async fn config_keys(client: &mut Client) -> Vec<(String, String)> {
    let every_key = Some(etcd_client::GetOptions::new().with_prefix());
    let resp = client
        .get(CONFIG_PREFIX, every_key)
        .await
        .expect("get config keys");
    resp.kvs()
        .iter()
        .map(|kv| (text(kv.key()), text(kv.value())))
        .collect()
}

/// Writes `node`'s config key as the controller would, for MonitorConfig `fast`.
async fn put_managed_config(client: &mut Client, node: &str) {
    client
        .put(
            config_key(node),
            r#"{"interval":7,"metrics":["cpu"],"managedBy":"nodepulse-controller","source":{"monitorConfig":"fast","generation":2}}"#,
            None,
        )
        .await
        .expect("put managed key");
}

#[tokio::test]
async fn config_set_refuses_bad_values_writes_nothing_and_exits_2() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "worker-1", 60).await;

    let refused: &[(&[&str], &str)] = &[
        (
            &["worker-1", "--interval", "0", "--metrics", "cpu,memory"],
            "interval 0 is out of range: must be 1 to 3600 seconds",
        ),
        (
            &["worker-1", "--interval", "2", "--metrics", "cpu,gpu"],
            r#"unknown metric "gpu": must be one of cpu, memory, disk, network, load"#,
        ),
        (&["--all", "--interval", "0"], "interval 0 is out of range"),
        (
            &["worker-1", "--interval", "-1"],
            "interval -1 is out of range",
        ),
        (&["worker-1", "--interval", "3601"], "out of range"),
        (&["worker-1", "--interval", "soon"], "not a whole number"),
        (&["worker-1", "--metrics", ""], "at least one"),
        (&["Worker_1", "--interval", "2"], "node name"),
    ];
    for (args, reason) in refused {
        let mut full = vec!["config", "set"];
        full.extend_from_slice(args);
        let out = ctl(&etcd, &full);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{full:?}: {stderr}");
        assert!(stderr.contains(reason), "{full:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{full:?}");
    }
    assert_eq!(
        config_keys(&mut client).await,
        vec![],
        "a refused value wrote nothing"
    );
    // The same check through etcdctl, as the issue asks.
    let etcdctl = etcd.etcdctl(&["get", "--prefix", "/monitor/config/"]);
    assert!(etcdctl.status.success() && etcdctl.stdout.is_empty());

    // The env's push, then a partial change that keeps the metrics.
    let out = ctl(
        &etcd,
        &[
            "config",
            "set",
            "worker-1",
            "--interval",
            "2",
            "--metrics",
            "cpu,memory",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains(r#"/monitor/config/worker-1 = {"interval":2,"metrics":["cpu","memory"]}"#)
    );
    // The same node twice is written once.
    let out = ctl(
        &etcd,
        &["config", "set", "worker-1", "worker-1", "--interval", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = ctl(&etcd, &["config", "set", "--all", "--interval", "5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        config_keys(&mut client).await,
        vec![(
            config_key("worker-1"),
            r#"{"interval":5,"metrics":["cpu","memory"]}"#.to_string()
        )]
    );

    let out = ctl(&etcd, &["config", "get", "worker-1", "-o", "json"]);
    assert!(out.status.success());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["valid"], true);
    assert_eq!(got["config"]["interval"], 5);

    let out = ctl(&etcd, &["config", "get", "worker-2"]);
    assert_eq!(out.status.code(), Some(3), "not found");
    assert!(text(&out.stderr).contains("no config key /monitor/config/worker-2"));

    // A key the controller manages: the write goes through, with a warning.
    put_managed_config(&mut client, "worker-1").await;
    let out = ctl(&etcd, &["config", "set", "worker-1", "--interval", "3"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("managed by nodepulse-controller from MonitorConfig fast")
            && stderr.contains("the controller leaves it alone")
            && stderr.contains("nodepulsectl config delete worker-1"),
        "{stderr}"
    );
    assert_eq!(
        config_keys(&mut client).await[0].1,
        r#"{"interval":3,"metrics":["cpu"]}"#,
        "a hand-written key carries no managedBy"
    );

    let out = ctl(&etcd, &["config", "delete", "worker-1"]);
    assert!(out.status.success());
    assert_eq!(config_keys(&mut client).await, vec![]);

    // Deleting a managed key says the controller will write it again.
    put_managed_config(&mut client, "worker-1").await;
    let out = ctl(&etcd, &["config", "delete", "worker-1", "worker-9"]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("/monitor/config/worker-9 did not exist"),
        "{stdout}"
    );
    assert!(
        text(&out.stderr)
            .contains("it writes the key again while MonitorConfig fast selects worker-1"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(config_keys(&mut client).await, vec![]);
}

#[test]
fn an_unreachable_etcd_is_exit_code_1() {
    // Reserved, never bound: nothing can listen there while the test holds it.
    let nothing_there = testkit::ReservedPort::new();
    let port = nothing_there.port();
    let out = Command::new(project_bin("nodepulsectl"))
        .args(["nodes", "--timeout", "2s", "--etcd-endpoints"])
        .arg(format!("http://127.0.0.1:{port}"))
        .output()
        .expect("run nodepulsectl");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains(&format!("127.0.0.1:{port}")));
}

/// Brings `node` alive and waits for the watch to say so, writes its `last` value (state and
/// interval), revokes its lease and waits up to `dead_secs` for the line `Node <node> <dead>`.
async fn alive_then_revoked(
    client: &mut Client,
    w: &Process,
    node: &str,
    last: (AgentState, u32),
    dead: &str,
    dead_secs: u64,
) {
    let lease = put_heartbeat(client, node, 30).await;
    let alive = format!("Node {node} Alive");
    w.wait_for_line(Duration::from_secs(5), &alive, |l| l.ends_with(&alive));
    put_on_lease(client, node, last.0, last.1, lease).await;
    client.lease_revoke(lease).await.expect("revoke");
    let dead = format!("Node {node} {dead}");
    w.wait_for_line(Duration::from_secs(dead_secs), &dead, |l| {
        l.ends_with(&dead)
    });
}

#[tokio::test]
async fn watch_prints_alive_then_each_kind_of_death() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let w = watch(&etcd, &[]);
    w.wait_for_line(Duration::from_secs(10), "saying no node yet", |l| {
        l.contains("No node yet")
    });

    // Comes alive; a value update prints nothing; the key vanishing without a Stopping value is
    // "heartbeat expired" (a real lease expiry is in the JSON test and the demo test: here the
    // lease is revoked, so that a slow machine cannot expire it before the update is written).
    let update = (AgentState::Running, 2);
    alive_then_revoked(
        &mut client,
        &w,
        "worker-1",
        update,
        "Dead (heartbeat expired)",
        6,
    )
    .await;
    let worker_lines: Vec<_> = w
        .lines()
        .into_iter()
        .filter(|l| l.text.contains("worker-1"))
        .map(|l| l.text)
        .collect();
    assert_eq!(
        worker_lines.len(),
        2,
        "no line for a value update: {worker_lines:?}"
    );

    // A clean stop: the agent says Stopping, then revokes its lease.
    let stopping = (AgentState::Stopping, 10);
    alive_then_revoked(
        &mut client,
        &w,
        "worker-2",
        stopping,
        "Dead (agent stopped)",
        5,
    )
    .await;

    // Every event line starts with a timestamp.
    for l in w.lines().iter().filter(|l| l.text.contains("Node ")) {
        let stamp = l.text.split(' ').next().unwrap_or_default();
        assert!(stamp.parse::<jiff::Timestamp>().is_ok(), "{}", l.text);
    }
}

#[tokio::test]
async fn watch_json_prints_one_object_per_event() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let lease = put_heartbeat(&mut client, "worker-1", 60).await;
    let w = watch(&etcd, &["-o", "json", "-v"]);
    let snapshot = w.wait_for_line(Duration::from_secs(10), "snapshot", |l| {
        l.contains("\"snapshot\"")
    });
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot.text).expect("json");
    assert_eq!(snapshot["nodes"][0]["node"], "worker-1");
    assert_eq!(snapshot["nodes"][0]["cpuPercent"], 7.5);

    put_heartbeat(&mut client, "worker-2", 1).await;
    let alive = w.wait_for_line(Duration::from_secs(5), "alive event", |l| {
        l.contains("\"alive\"")
    });
    let dead = w.wait_for_line(Duration::from_secs(6), "dead event", |l| {
        l.contains("\"dead\"")
    });
    let alive: serde_json::Value = serde_json::from_str(&alive.text).expect("json");
    let dead: serde_json::Value = serde_json::from_str(&dead.text).expect("json");
    assert_eq!(alive["node"], "worker-2");
    assert_eq!(alive["heartbeat"]["ttlSeconds"], 2);
    assert_eq!(dead["node"], "worker-2");
    assert_eq!(dead["reason"], "heartbeat expired");
    assert!(dead["revision"].as_i64() > alive["revision"].as_i64());

    // -v: a value update of an alive node is an `updated` event.
    put_on_lease(&mut client, "worker-1", AgentState::Running, 2, lease).await;
    w.wait_for_line(Duration::from_secs(5), "updated event", |l| {
        l.contains("\"updated\"") && l.contains("worker-1")
    });
}

#[tokio::test]
async fn watch_outlives_an_etcd_restart_and_relists_after_a_compaction() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "stays", 600).await;
    put_heartbeat(&mut client, "dies", 600).await;
    let w = watch(&etcd, &[]);
    w.wait_for_line(Duration::from_secs(10), "the table", |l| {
        l.starts_with("stays")
    });

    // Plain restart: the watch resumes by itself and sees what happens next.
    etcd.restart();
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "after-restart", 600).await;
    w.wait_for_line(Duration::from_secs(15), "Alive after the restart", |l| {
        l.ends_with("Node after-restart Alive")
    });

    // Freeze the watcher, restart etcd, change things and compact the history it would need,
    // then let it run: it must re-list and print exactly the differences.
    w.signal(Signal::SIGSTOP);
    etcd.restart();
    let mut client = etcd.client().await;
    client
        .delete(heartbeat_key("dies"), None)
        .await
        .expect("delete");
    put_heartbeat(&mut client, "born", 600).await;
    testkit::put_and_compact(&mut client, "/unrelated", "x").await;
    let before = w.line_count();
    w.signal(Signal::SIGCONT);
    w.wait_for_line_from(before, Duration::from_secs(15), "dies Dead", |l| {
        l.ends_with("Node dies Dead (heartbeat expired)")
    });
    w.wait_for_line_from(
        before,
        Duration::from_secs(5),
        "the re-list log line",
        |l| l.contains("was compacted: listing /monitor/heartbeat/ again"),
    );
    w.wait_for_line_from(before, Duration::from_secs(5), "born Alive", |l| {
        l.ends_with("Node born Alive")
    });
    // Give a stray line for `stays` a chance to show up before checking there is none.
    put_heartbeat(&mut client, "probe", 600).await;
    w.wait_for_line_from(before, Duration::from_secs(5), "probe Alive", |l| {
        l.ends_with("Node probe Alive")
    });
    let events: Vec<_> = w.lines()[before..]
        .iter()
        .filter(|l| l.text.contains(" Node "))
        .map(|l| {
            l.text
                .split_once(' ')
                .map_or(String::new(), |(_, t)| t.to_string())
        })
        .collect();
    assert_eq!(
        events,
        [
            "Node dies Dead (heartbeat expired)",
            "Node born Alive",
            "Node probe Alive"
        ],
        "only real transitions after the re-list"
    );
}

#[tokio::test]
async fn watch_started_while_etcd_is_down_waits_for_it() {
    let mut etcd = Etcd::start();
    etcd.kill();
    let w = watch(&etcd, &[]);
    w.wait_for_line(Duration::from_secs(10), "a retry line on stderr", |l| {
        l.contains("retrying")
    });
    etcd.restart();
    w.wait_for_line(Duration::from_secs(15), "the first listing", |l| {
        l.contains("No node yet")
    });
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "late", 60).await;
    w.wait_for_line(Duration::from_secs(5), "late Alive", |l| {
        l.ends_with("Node late Alive")
    });
}

#[tokio::test]
async fn watch_relists_when_etcd_is_rebuilt_from_scratch() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "old", 600).await;
    for i in 0..20 {
        client
            .put(format!("/pad/{i}"), "x", None)
            .await
            .expect("pad");
    }
    let w = watch(&etcd, &[]);
    w.wait_for_line(Duration::from_secs(10), "the table", |l| {
        l.starts_with("old")
    });

    // Same endpoint, empty data: a new cluster whose revisions start over below ours.
    etcd.kill();
    std::fs::remove_dir_all(etcd.data_dir()).expect("wipe etcd data");
    etcd.restart();
    let mut client = etcd.client().await;
    put_heartbeat(&mut client, "new", 600).await;
    w.wait_for_line(Duration::from_secs(15), "old Dead", |l| {
        l.ends_with("Node old Dead (heartbeat expired)")
    });
    w.wait_for_line(Duration::from_secs(5), "new Alive", |l| {
        l.ends_with("Node new Alive")
    });
}

#[test]
fn connection_flags_go_before_or_after_the_subcommand() {
    let etcd = Etcd::start();
    // Only the flags say where etcd is, wherever they stand on the line.
    let run = |args: &[&str]| {
        Command::new(project_bin("nodepulsectl"))
            .args(args)
            .env_remove("NODEPULSE_ETCD_ENDPOINTS")
            .env_remove("RUST_LOG")
            .output()
            .expect("run nodepulsectl")
    };
    let endpoint = etcd.endpoint.as_str();
    let set = run(&[
        "--etcd-endpoints",
        endpoint,
        "--timeout",
        "30s",
        "config",
        "set",
        "n1",
        "--interval",
        "2",
    ]);
    assert!(set.status.success(), "{}", text(&set.stderr));
    let get = run(&[
        "config",
        "get",
        "n1",
        "--etcd-endpoints",
        endpoint,
        "-o",
        "json",
    ]);
    assert!(get.status.success(), "{}", text(&get.stderr));
    let got: serde_json::Value = serde_json::from_slice(&get.stdout).expect("json");
    assert_eq!(got["config"]["interval"], 2, "{got}");
}
