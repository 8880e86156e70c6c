//! etcd going away under the agent, or not being there at start: the agent keeps sampling and
//! logging, and restores its heartbeat and its config watch by itself.

mod common;

use std::time::Duration;

use testkit::{Etcd, eventually, http_get};

use common::{RECOVERY, heartbeat, put_config, start_agent};

#[tokio::test]
async fn etcd_restarted_after_more_than_a_ttl_heartbeat_and_watch_resume() {
    let mut etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = start_agent(
        &etcd,
        "worker-1",
        &["--heartbeat-ttl", "3", "--heartbeat-min-interval", "500ms"],
    );
    let p = &agent.process;
    let rev = put_config(
        &mut client,
        "worker-1",
        r#"{"interval": 1, "metrics": ["cpu"]}"#,
    )
    .await;
    p.wait_for_line(Duration::from_secs(5), "config applied", |l| {
        l.contains(&format!("(revision {rev})"))
    });
    eventually("ready", Duration::from_secs(5), || async {
        (http_get(&agent.http, "/readyz")?.0 == 200).then_some(())
    })
    .await;

    // Down for longer than the TTL. The agent keeps sampling meanwhile.
    let down_from = p.line_count();
    etcd.kill();
    for _ in 0..4 {
        let n = p.line_count();
        p.wait_for_line_from(
            n,
            Duration::from_secs(3),
            "a sample while etcd is down",
            |l| l.contains(" sample cpu="),
        );
    }
    assert!(agent_running(&agent));
    p.wait_for_line_from(
        down_from,
        Duration::from_secs(10),
        "the outage noticed",
        |l| l.contains("heartbeat: ") && l.contains("retrying while sampling goes on"),
    );
    eventually(
        "not ready while etcd is down",
        Duration::from_secs(10),
        || async { (http_get(&agent.http, "/readyz")?.0 == 503).then_some(()) },
    )
    .await;

    etcd.restart();
    let mut client = etcd.client().await;
    eventually("ready again", RECOVERY, || async {
        (http_get(&agent.http, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    eventually("heartbeat key back", RECOVERY, || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-1").await }
    })
    .await;
    // Kept alive, not just left over: still there after more than one TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, lease) = heartbeat(&mut client, "worker-1")
        .await
        .expect("heartbeat key kept alive after the restart");
    let ttl = client
        .lease_time_to_live(lease, None)
        .await
        .expect("lease ttl")
        .ttl();
    assert!(ttl > 0, "lease {lease:x} has ttl {ttl}");

    // The watch resumed: a config put after the restart is applied.
    let from = p.line_count();
    let rev = put_config(
        &mut client,
        "worker-1",
        r#"{"interval": 2, "metrics": ["cpu", "memory"]}"#,
    )
    .await;
    p.wait_for_line_from(from, RECOVERY, "config applied after the restart", |l| {
        l.contains(&format!(
            "config updated: interval 1s -> 2s, metrics [cpu, memory] (revision {rev})"
        ))
    });
    eventually("heartbeat shows the post-restart config", RECOVERY, || {
        let mut c = client.clone();
        async move {
            heartbeat(&mut c, "worker-1")
                .await
                .filter(|(h, _)| h.config.revision == rev)
        }
    })
    .await;
}

#[tokio::test]
async fn etcd_away_at_start_is_waited_for_while_sampling() {
    let mut etcd = Etcd::start();
    etcd.kill();
    let agent = start_agent(&etcd, "worker-2", &["--heartbeat-ttl", "3"]);
    let p = &agent.process;
    p.wait_for_line(Duration::from_secs(5), "a sample without etcd", |l| {
        l.contains(" sample cpu=")
    });
    assert_eq!(http_get(&agent.http, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(&agent.http, "/healthz").map(|r| r.0), Some(200));

    etcd.restart();
    let mut client = etcd.client().await;
    eventually("heartbeat key once etcd is up", RECOVERY, || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-2").await }
    })
    .await;
    let rev = put_config(
        &mut client,
        "worker-2",
        r#"{"interval": 5, "metrics": ["load"]}"#,
    )
    .await;
    p.wait_for_line(RECOVERY, "config applied", |l| {
        l.contains(&format!(
            "config updated: interval 10s -> 5s, metrics [load] (revision {rev})"
        ))
    });
}

fn agent_running(agent: &common::Agent) -> bool {
    http_get(&agent.http, "/healthz").is_some_and(|r| r.0 == 200)
}
