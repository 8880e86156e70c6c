//! etcd going away under the agent, or not being there at start: the agent keeps sampling and
//! logging, and restores its heartbeat and its config watch by itself.

use std::time::Duration;

use etcd_client::Client;
use testkit::{
    Daemon, Etcd, Launch, eventually, heartbeat, heartbeat_gone_within, heartbeat_within, http_get,
    put_config,
};

/// A generous deadline for the agent to notice a recovered etcd (its backoff is capped at 5 s).
const RECOVERY: Duration = Duration::from_secs(20);

#[tokio::test]
async fn etcd_restarted_after_more_than_a_ttl_heartbeat_and_watch_resume() {
    let mut etcd = Etcd::start();
    let client = etcd.client().await;
    let launch = etcd
        .agent("worker-1")
        .ttl(3)
        .args(["--heartbeat-min-interval", "500ms"]);
    let agent = start_configured(&launch, &client, r#"{"interval": 1, "metrics": ["cpu"]}"#).await;
    let p = &agent.process;
    readyz_answers(&agent, 200, Duration::from_secs(5)).await;

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
    readyz_answers(&agent, 503, Duration::from_secs(10)).await;

    etcd.restart();
    let mut client = etcd.client().await;
    readyz_answers(&agent, 200, RECOVERY).await;
    heartbeat_within(&client, "worker-1", RECOVERY).await;
    // Kept alive, not just left over: still there after more than one TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, lease) = heartbeat(&client, "worker-1")
        .await
        .expect("heartbeat key kept alive after the restart");
    let ttl = testkit::lease_ttl(&mut client, lease).await;
    assert!(ttl > 0, "lease {lease:x} has ttl {ttl}");

    // The watch resumed: a config put after the restart is applied.
    let from = p.line_count();
    let rev = put_config(
        &client,
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
        let c = client.clone();
        async move {
            heartbeat(&c, "worker-1")
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
    let agent = etcd.agent("worker-2").ttl(3).start();
    let p = &agent.process;
    p.wait_for_line(Duration::from_secs(5), "a sample without etcd", |l| {
        l.contains(" sample cpu=")
    });
    assert_eq!(http_get(&agent.http, "/readyz").map(|r| r.0), Some(503));
    assert_eq!(http_get(&agent.http, "/healthz").map(|r| r.0), Some(200));

    etcd.restart();
    let client = etcd.client().await;
    heartbeat_within(&client, "worker-2", RECOVERY).await;
    let rev = put_config(
        &client,
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

/// Starts the agent `launch` describes and waits for it to apply `config`, its first (5 s).
async fn start_configured(launch: &Launch, client: &Client, config: &str) -> Daemon {
    let agent = launch.start();
    agent
        .apply_config(client, config, Duration::from_secs(5))
        .await;
    agent
}

/// Waits up to `timeout` for the agent's /readyz to answer `status` (200 ready, 503 not).
async fn readyz_answers(agent: &Daemon, status: u16, timeout: Duration) {
    eventually(&format!("/readyz {status}"), timeout, || async {
        (http_get(&agent.http, "/readyz")?.0 == status).then_some(())
    })
    .await;
}

fn agent_running(agent: &Daemon) -> bool {
    http_get(&agent.http, "/healthz").is_some_and(|r| r.0 == 200)
}

#[tokio::test]
async fn a_compacted_resume_revision_rereads_the_key_and_an_expired_lease_is_replaced() {
    use nix::sys::signal::Signal;

    let mut etcd = Etcd::start();
    let client = etcd.client().await;
    let launch = etcd.agent("worker-3").ttl(3);
    let agent = start_configured(&launch, &client, r#"{"interval": 2, "metrics": ["cpu"]}"#).await;
    let p = &agent.process;
    let (_, old_lease) = heartbeat_within(&client, "worker-3", Duration::from_secs(5)).await;

    // Freeze the agent and cut its connections by restarting etcd; then change the config
    // twice and compact the history it would resume from. (Changing it before the restart
    // would leave the events in the frozen agent's socket buffer.)
    p_signal(&agent, Signal::SIGSTOP);
    etcd.restart();
    let mut client = etcd.client().await;
    put_config(
        &client,
        "worker-3",
        r#"{"interval": 3, "metrics": ["cpu"]}"#,
    )
    .await;
    let last = put_config(
        &client,
        "worker-3",
        r#"{"interval": 4, "metrics": ["memory"]}"#,
    )
    .await;
    testkit::compact(&mut client, last).await;
    // Frozen for longer than the TTL: the lease expires and the key with it.
    heartbeat_gone_within(&client, "worker-3", Duration::from_secs(15)).await;

    let from = p.line_count();
    p_signal(&agent, Signal::SIGCONT);
    p.wait_for_line_from(from, RECOVERY, "compaction noticed", |l| {
        l.contains("config watch: revision ") && l.contains(" was compacted")
    });
    p.wait_for_line_from(from, RECOVERY, "the latest value applied", |l| {
        l.contains(&format!(
            "config updated: interval 2s -> 4s, metrics [memory] (revision {last})"
        ))
    });
    p.wait_for_line_from(from, RECOVERY, "lease re-granted", |l| {
        l.contains("heartbeat lease lost; granted a new one: id ")
    });
    let (hb, lease) = heartbeat_within(&client, "worker-3", RECOVERY).await;
    assert_ne!(lease, old_lease);
    let _ = hb;
}

fn p_signal(agent: &Daemon, sig: nix::sys::signal::Signal) {
    agent.process.signal(sig);
}
