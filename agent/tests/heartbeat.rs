//! Job 1 end to end: the heartbeat key comes with the agent and goes with it, by lease expiry
//! after a crash and at once after a clean stop.

mod common;

use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use nix::sys::signal::Signal;
use nodepulse_crd::wire::{AgentState, Heartbeat, heartbeat_key};
use testkit::{Etcd, eventually, http_get};

use common::{heartbeat, start_agent};

#[tokio::test]
async fn heartbeat_appears_within_2s_and_sigterm_marks_stopping_then_revokes() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let started = Instant::now();
    let mut agent = start_agent(&etcd, "worker-1", &[]);
    let (hb, lease) = eventually("heartbeat key", Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-1").await }
    })
    .await;
    assert!(started.elapsed() <= Duration::from_secs(2));
    assert_eq!(hb.node, "worker-1");
    assert_eq!(hb.state, AgentState::Running);
    assert_eq!(hb.ttl_seconds, 10);
    assert_eq!(hb.config.interval, 10);
    assert_eq!(hb.config.metrics.len(), 5);
    assert_ne!(lease, 0, "the key is bound to a lease");
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "lease granted", |l| {
            l.contains("heartbeat lease granted: id ") && l.contains(", ttl 10s")
        });
    agent.process.wait_for_line(Duration::from_secs(5), "start line", |l| {
        l.contains("agent started: node worker-1, interval 10s, metrics [cpu, memory, disk, network, load], heartbeat ttl 10s")
    });

    // /healthz, /readyz (lease held) and /metrics with node figures and the agent's own.
    let http = agent.http.clone();
    assert_eq!(http_get(&http, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(http_get(&http, "/readyz").map(|r| r.0), Some(200));
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "a first sample", |l| {
            l.contains(" sample cpu=")
        });
    let (status, body) = http_get(&http, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    for name in [
        "nodepulse_node_cpu_busy_percent ",
        "nodepulse_node_memory_used_percent ",
        "nodepulse_node_load1 ",
        "nodepulse_node_filesystem_used_percent ",
        "nodepulse_agent_heartbeat_failures_total 0",
        "nodepulse_agent_lease_regrants_total 0",
        "nodepulse_agent_config_revision 0",
        "nodepulse_agent_config_rejected_total 0",
        "nodepulse_agent_lease_held 1",
        "nodepulse_agent_sample_duration_seconds_count ",
        "nodepulse_agent_collector_success{collector=\"cpu\"} 1",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }

    // Watch the key, then stop the agent cleanly.
    let mut events = client
        .watch(heartbeat_key("worker-1"), Some(WatchOptions::new()))
        .await
        .expect("watch heartbeat");
    events.message().await.expect("watch created");
    let signalled = Instant::now();
    agent.process.signal(Signal::SIGTERM);
    let mut last_value: Option<Heartbeat> = None;
    let deleted_after = loop {
        let resp = tokio::time::timeout(Duration::from_secs(3), events.message())
            .await
            .expect("a watch event within 3 s")
            .expect("watch stream")
            .expect("watch open");
        let mut deleted = None;
        for e in resp.events() {
            match e.event_type() {
                EventType::Put => {
                    last_value = Some(Heartbeat::parse(e.kv().unwrap().value()).unwrap());
                }
                EventType::Delete => deleted = Some(signalled.elapsed()),
            }
        }
        if let Some(d) = deleted {
            break d;
        }
    };
    assert!(
        deleted_after <= Duration::from_secs(1),
        "key deleted {deleted_after:?} after SIGTERM"
    );
    let last = last_value.expect("the agent rewrote the value before revoking");
    assert_eq!(last.state, AgentState::Stopping);
    let status = agent
        .process
        .wait_exit(Duration::from_secs(5))
        .expect("agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.process.output_text());
    agent
        .process
        .wait_for_line(Duration::from_secs(1), "stop line", |l| {
            l.contains("stopping: heartbeat marked stopping, lease revoked")
        });
}

#[tokio::test]
async fn sigkill_leaves_the_key_to_expire_within_ttl_plus_1s() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let mut agent = start_agent(&etcd, "worker-2", &["--heartbeat-ttl", "3"]);
    let (hb, _) = eventually("heartbeat key", Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-2").await }
    })
    .await;
    assert_eq!(hb.ttl_seconds, 3);
    // Outlive one TTL first, so the key is known to be kept alive rather than just fresh.
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "a sample", |l| {
            l.contains(" sample ")
        });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        heartbeat(&mut client, "worker-2").await.is_some(),
        "kept alive past its TTL"
    );

    let killed = Instant::now();
    agent.process.kill_hard();
    eventually("heartbeat key to expire", Duration::from_secs(4), || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-2").await.is_none().then_some(()) }
    })
    .await;
    let gone = killed.elapsed();
    assert!(
        gone <= Duration::from_secs(4),
        "gone {gone:?} after SIGKILL"
    );
    assert!(
        gone >= Duration::from_millis(1500),
        "gone {gone:?} after SIGKILL: too early for a lease expiry"
    );
}

#[tokio::test]
async fn a_lease_revoked_behind_the_agents_back_is_granted_again() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = start_agent(&etcd, "worker-3", &["--heartbeat-ttl", "3"]);
    let (_, lease) = eventually("heartbeat key", Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-3").await }
    })
    .await;
    client
        .lease_revoke(lease)
        .await
        .expect("revoke the agent's lease");
    let line = agent
        .process
        .wait_for_line(Duration::from_secs(5), "re-grant", |l| {
            l.contains("heartbeat lease lost; granted a new one: id ")
        });
    let (_, new_lease) = eventually("heartbeat key back", Duration::from_secs(2), || {
        let mut c = client.clone();
        async move { heartbeat(&mut c, "worker-3").await }
    })
    .await;
    assert_ne!(new_lease, lease, "{}", line.text);
    let (_, body) = http_get(&agent.http, "/metrics").expect("/metrics");
    assert!(
        body.contains("nodepulse_agent_lease_regrants_total 1"),
        "{body}"
    );
}

#[tokio::test]
async fn a_dead_endpoint_in_the_list_is_failed_over() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let dead = format!("http://127.0.0.1:{}", testkit::free_port());
    let endpoints = format!("{dead},{}", etcd.endpoint);
    let agent = common::start_agent_at(&endpoints, "worker-4", &[]);
    eventually(
        "heartbeat key through the live endpoint",
        Duration::from_secs(10),
        || {
            let mut c = client.clone();
            async move { heartbeat(&mut c, "worker-4").await }
        },
    )
    .await;
    let rev = common::put_config(
        &mut client,
        "worker-4",
        r#"{"interval": 3, "metrics": ["cpu"]}"#,
    )
    .await;
    agent
        .process
        .wait_for_line(Duration::from_secs(10), "config applied", |l| {
            l.contains(&format!("(revision {rev})"))
        });
}
