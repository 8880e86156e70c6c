//! The heartbeat end to end: the key comes with the agent and goes with it by lease expiry, after
//! a crash and after a clean stop alike; an agent replaced within the TTL keeps its node alive.

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use nix::sys::signal::Signal;
use nodepulse_crd::wire::{AgentState, Heartbeat, MetricSet, heartbeat_key};
use testkit::{
    Etcd, EtcdCluster, Launch, eventually, heartbeat, heartbeat_gone_within, heartbeat_within,
    http_get, put_config,
};

#[tokio::test]
async fn heartbeat_appears_within_2s_and_sigterm_marks_it_stopping() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let started = Instant::now();
    let mut agent = etcd.agent("worker-1").start();
    let (hb, lease) = heartbeat_within(&client, "worker-1", Duration::from_secs(2)).await;
    assert!(started.elapsed() <= Duration::from_secs(2));
    assert_eq!(hb.node, "worker-1");
    assert_eq!(hb.state, AgentState::Running);
    assert_eq!(hb.ttl_seconds, 10);
    assert_eq!(hb.config.interval, 10);
    assert_eq!(hb.config.metrics, MetricSet::all());
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

    // Watch the key, then stop the agent cleanly: the value says Stopping, the lease stays.
    let mut events = client
        .watch(heartbeat_key("worker-1"), Some(WatchOptions::new()))
        .await
        .expect("watch heartbeat");
    events.message().await.expect("watch created");
    agent.process.signal(Signal::SIGTERM);
    let stopping = loop {
        let resp = tokio::time::timeout(Duration::from_secs(3), events.message())
            .await
            .expect("a watch event within 3 s")
            .expect("watch stream")
            .expect("watch open");
        let put = resp.events().iter().find_map(|e| {
            assert_eq!(
                e.event_type(),
                EventType::Put,
                "the key stays after a clean stop"
            );
            let hb = Heartbeat::parse(e.kv()?.value()).ok()?;
            (hb.state == AgentState::Stopping).then_some((hb, e.kv()?.lease()))
        });
        if let Some(p) = put {
            break p;
        }
    };
    assert_eq!(stopping.1, lease, "marked Stopping on its own lease");
    let status = agent
        .process
        .wait_exit(Duration::from_secs(5))
        .expect("agent exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", agent.process.output_text());
    agent
        .process
        .wait_for_line(Duration::from_secs(1), "stop line", |l| {
            l.contains("stopping: heartbeat marked stopping; lease ")
                && l.contains("expires within 10s unless a new agent takes over")
        });
    assert!(
        heartbeat(&client, "worker-1").await.is_some(),
        "the key outlives the process until its lease expires"
    );
}

/// An agent stopped for good: its key expires one TTL after the stop, Stopping to the end.
#[tokio::test]
async fn a_clean_stop_for_good_expires_the_key_after_the_ttl() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let mut agent = etcd.agent("worker-5").ttl(3).start();
    heartbeat_within(&client, "worker-5", Duration::from_secs(5)).await;
    let stopped = Instant::now();
    agent.process.signal(Signal::SIGTERM);
    agent
        .process
        .wait_exit(Duration::from_secs(5))
        .expect("agent exits after SIGTERM");
    let (last, _) = heartbeat(&client, "worker-5")
        .await
        .expect("key still there right after the stop");
    assert_eq!(last.state, AgentState::Stopping);
    let gone = expired_after(stopped, &client, "worker-5", Duration::from_secs(6)).await;
    assert!(
        gone >= Duration::from_millis(1500),
        "gone {gone:?} after the stop: the lease was not left to expire"
    );
}

/// A rolling update: the old agent stops cleanly, a new one starts within the TTL. The key is
/// never deleted (so the node never shows Dead), and ends on the new agent's lease.
#[tokio::test]
async fn an_agent_replaced_within_the_ttl_never_lets_the_key_go() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let mut old = etcd.agent("worker-6").ttl(3).start();
    let (_, old_lease) = heartbeat_within(&client, "worker-6", Duration::from_secs(5)).await;
    let mut events = client
        .watch(heartbeat_key("worker-6"), Some(WatchOptions::new()))
        .await
        .expect("watch heartbeat");
    events.message().await.expect("watch created");
    old.process.signal(Signal::SIGTERM);
    old.process
        .wait_exit(Duration::from_secs(5))
        .expect("old agent exits");
    let new = etcd.agent("worker-6").ttl(3).start();
    let new_lease = eventually("the new agent's key", Duration::from_secs(5), || {
        let c = client.clone();
        async move {
            let (hb, lease) = heartbeat(&c, "worker-6").await?;
            (hb.state == AgentState::Running && lease != old_lease).then_some(lease)
        }
    })
    .await;
    // Past the old lease's expiry: still there, still on the new lease.
    let outlive = Instant::now() + Duration::from_secs(5);
    assert_not_deleted_until(&mut events, outlive, || {
        format!(
            "the key was deleted during the replacement:\n{}",
            new.process.output_text()
        )
    })
    .await;
    let (hb, lease) = heartbeat(&client, "worker-6").await.expect("key present");
    assert_eq!((hb.state, lease), (AgentState::Running, new_lease));
}

/// A stopping agent leaves alone a key that another incarnation has taken over.
#[tokio::test]
async fn a_stopping_agent_does_not_touch_a_key_it_no_longer_holds() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = etcd.agent("worker-7").ttl(3).start();
    heartbeat_within(&client, "worker-7", Duration::from_secs(5)).await;
    // Another incarnation's value on another lease.
    let other = client.lease_grant(30, None).await.expect("grant").id();
    client
        .put(
            heartbeat_key("worker-7"),
            "{\"other\":true}",
            Some(etcd_client::PutOptions::new().with_lease(other)),
        )
        .await
        .expect("put");
    agent.process.signal(Signal::SIGTERM);
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "left as it is", |l| {
            l.contains("is no longer on lease") && l.contains("left as it is")
        });
    let resp = client
        .get(heartbeat_key("worker-7"), None)
        .await
        .expect("get");
    let kv = resp
        .kvs()
        .first()
        .expect("the other incarnation's key is still there");
    assert_eq!((kv.value(), kv.lease()), (&b"{\"other\":true}"[..], other));
}

/// `etcdctl del` of the key while the agent runs: written again within a third of the TTL.
#[tokio::test]
async fn a_key_deleted_by_hand_is_written_again_within_a_third_of_the_ttl() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let agent = etcd.agent("worker-8").ttl(6).start();
    let (_, lease) = heartbeat_within(&client, "worker-8", Duration::from_secs(5)).await;
    let out = etcd.etcdctl(&["del", &heartbeat_key("worker-8")]);
    assert!(out.status.success(), "{out:?}");
    let deleted = Instant::now();
    let (_, back_on) = heartbeat_within(&client, "worker-8", Duration::from_secs(2)).await;
    assert!(
        deleted.elapsed() <= Duration::from_secs(2),
        "back after {:?}; {}",
        deleted.elapsed(),
        agent.process.output_text()
    );
    assert_eq!(back_on, lease, "rewritten on the same live lease");
}

#[tokio::test]
async fn sigkill_leaves_the_key_to_expire_within_ttl_plus_1s() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let mut agent = etcd.agent("worker-2").ttl(3).start();
    let (hb, _) = heartbeat_within(&client, "worker-2", Duration::from_secs(2)).await;
    assert_eq!(hb.ttl_seconds, 3);
    // Outlive one TTL first, so the key is known to be kept alive rather than just fresh.
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "a sample", |l| {
            l.contains(" sample ")
        });
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        heartbeat(&client, "worker-2").await.is_some(),
        "kept alive past its TTL"
    );

    let killed = Instant::now();
    agent.process.kill_hard();
    let gone = expired_after(killed, &client, "worker-2", Duration::from_secs(4)).await;
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
    let agent = etcd.agent("worker-3").ttl(3).start();
    let (_, lease) = heartbeat_within(&client, "worker-3", Duration::from_secs(2)).await;
    client
        .lease_revoke(lease)
        .await
        .expect("revoke the agent's lease");
    let line = agent
        .process
        .wait_for_line(Duration::from_secs(5), "re-grant", |l| {
            l.contains("heartbeat lease lost; granted a new one: id ")
        });
    let (_, new_lease) = heartbeat_within(&client, "worker-3", Duration::from_secs(2)).await;
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
    let client = etcd.client().await;
    // A reserved port nothing listens on, and nothing else may bind while it is held.
    let nothing_there = testkit::ReservedPort::new();
    let dead = format!("http://{}", nothing_there.addr());
    let endpoints = format!("{dead},{}", etcd.endpoint);
    let agent = Launch::agent("worker-4").etcd(&endpoints).start();
    // One refused call moves the agent to the live member (before, a share of every call kept
    // going to the dead one, and the key took 6 s).
    eventually(
        "heartbeat key through the live endpoint",
        Duration::from_secs(3),
        || heartbeat(&client, "worker-4"),
    )
    .await;
    agent
        .apply_config(
            &client,
            r#"{"interval": 3, "metrics": ["cpu"]}"#,
            Duration::from_secs(10),
        )
        .await;
}

/// A member that hangs (its connections stay open and nothing is answered: a stopped process, a
/// frozen machine) is left before the lease runs out, so the node never shows Dead. Its HTTP/2
/// ping would notice it 15 s after the last answer, when a lease of 9 s had long expired.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_member_is_left_before_the_lease_runs_out() {
    const TTL: u64 = 9;
    let cluster = tokio::task::spawn_blocking(|| {
        let cluster = EtcdCluster::start(3);
        let leader = cluster.wait_leader(Duration::from_secs(30));
        (cluster, leader)
    });
    let (cluster, leader) = cluster.await.expect("start the etcd cluster");
    // A follower hangs, and the agent uses it: its renewals stop there while the leader keeps
    // counting the lease down.
    let hung = (leader + 1) % 3;
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(hung);
    let agent = Launch::agent("hung-1")
        .etcd(&endpoints.join(","))
        .ttl(TTL)
        .start();
    let leader_only = vec![cluster.endpoints()[leader].clone()];
    let mut client = etcd_client::Client::connect(leader_only, None)
        .await
        .expect("connect to the leader");
    let (_, lease) = heartbeat_within(&client, "hung-1", Duration::from_secs(5)).await;
    let mut events = client
        .watch(heartbeat_key("hung-1"), None)
        .await
        .expect("watch the heartbeat key");
    events.message().await.expect("watch created");

    cluster.freeze(hung);
    let frozen = Instant::now();
    // Three TTLs: the lease would have run out three times over without the move.
    let until = frozen + Duration::from_secs(3 * TTL);
    assert_not_deleted_until(&mut events, until, || {
        format!(
            "the heartbeat key was deleted {:?} after the member hung:\n{}",
            frozen.elapsed(),
            agent.process.output_text()
        )
    })
    .await;
    cluster.thaw(hung);
    let (_, now) = heartbeat(&client, "hung-1")
        .await
        .expect("the heartbeat key is there");
    let output = agent.process.output_text();
    assert_eq!(
        now, lease,
        "one lease, kept alive through another member:\n{output}"
    );
    assert!(
        output.contains("trying the next etcd member"),
        "the agent says why it moved:\n{output}"
    );
}

/// At an hour's sampling interval there is no news to write, yet the value's `updatedAt` (the
/// MonitorNode's LAST-HEARTBEAT) is refreshed every `--heartbeat-max-interval`.
#[tokio::test]
async fn with_nothing_new_the_value_is_refreshed_every_max_interval() {
    let (etcd, mut events) =
        etcd_watching_heartbeat("worker-9", r#"{"interval": 3600, "metrics": ["load"]}"#).await;
    let agent = etcd
        .agent("worker-9")
        .ttl(3)
        .args([
            "--heartbeat-min-interval",
            "500ms",
            "--heartbeat-max-interval",
            "2s",
        ])
        .start();
    let writes = next_writes(&mut events, 5, &agent).await;
    // The first writes (at most three) carry the start, the config and the first sample; the
    // last two are refreshes.
    let (a, b) = (&writes[3], &writes[4]);
    let gap = b.updated_at.duration_since(a.updated_at);
    assert!(
        gap >= jiff::SignedDuration::from_millis(1500)
            && gap <= jiff::SignedDuration::from_millis(3500),
        "refreshes {gap:?} apart: {writes:#?}"
    );
    let same = |hb: &Heartbeat| Heartbeat {
        updated_at: hb.started_at,
        ..hb.clone()
    };
    assert_eq!(same(a), same(b), "a refresh carries the same value");
}

/// When every sample brings news, the value is rewritten with the sample due when
/// `--heartbeat-min-interval` has passed, never sooner than a twentieth before.
#[tokio::test]
async fn news_is_written_no_more_often_than_the_min_interval() {
    let (etcd, mut events) =
        etcd_watching_heartbeat("worker-12", r#"{"interval": 1, "metrics": ["load"]}"#).await;
    // A proc root whose load average moves every 50 ms, so that every sample is news.
    let proc_root = tempfile::tempdir().expect("tempdir");
    let loadavg = proc_root.path().join("loadavg");
    let write_load = move |n: u32| {
        std::fs::write(&loadavg, format!("{n}.00 0.50 0.25 1/100 4242\n")).expect("write loadavg")
    };
    write_load(0);
    let moving = tokio::spawn(async move {
        for n in 1.. {
            tokio::time::sleep(Duration::from_millis(50)).await;
            write_load(n);
        }
    });
    let agent = etcd
        .agent("worker-12")
        .args(["--heartbeat-min-interval", "2s"])
        .args([
            "--proc-root",
            proc_root.path().to_str().expect("utf-8 path"),
        ])
        .start();
    let writes = next_writes(&mut events, 5, &agent).await;
    moving.abort();
    for pair in writes.windows(2) {
        let gap = pair[1].updated_at.duration_since(pair[0].updated_at);
        assert!(
            gap >= jiff::SignedDuration::from_millis(1900),
            "two writes {gap:?} apart: {writes:#?}"
        );
    }
}

/// An etcd holding `config` for `node`, and a watch on the node's heartbeat key from now on.
async fn etcd_watching_heartbeat(node: &str, config: &str) -> (Etcd, etcd_client::WatchStream) {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    put_config(&client, node, config).await;
    let mut events = client
        .watch(heartbeat_key(node), Some(WatchOptions::new()))
        .await
        .expect("watch heartbeat");
    events.message().await.expect("watch created");
    (etcd, events)
}

/// The next `n` values written to the heartbeat key, as `events` (a watch on it) shows them.
async fn next_writes(
    events: &mut etcd_client::WatchStream,
    n: usize,
    agent: &testkit::Daemon,
) -> Vec<Heartbeat> {
    let mut writes: Vec<Heartbeat> = Vec::new();
    while writes.len() < n {
        let resp = tokio::time::timeout(Duration::from_secs(5), events.message())
            .await
            .unwrap_or_else(|_| panic!("a write within 5 s:\n{}", agent.process.output_text()))
            .expect("watch stream")
            .expect("watch open");
        for e in resp.events() {
            assert_eq!(e.event_type(), EventType::Put);
            writes.push(Heartbeat::parse(e.kv().expect("kv").value()).expect("parses"));
        }
    }
    writes
}

/// Two agents for one node at once (a rolling update with surge): the newer one holds the key,
/// the older stops writing it, and when the older one stops the key is never deleted.
#[tokio::test]
async fn of_two_agents_for_one_node_the_newer_holds_the_key() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = etcd
        .agent("worker-10")
        .ttl(3)
        .args(["--heartbeat-min-interval", "500ms"]);
    let mut old = agent.start();
    let (_, old_lease) = heartbeat_within(&client, "worker-10", Duration::from_secs(5)).await;
    let new = agent.start();
    old.process
        .wait_for_line(Duration::from_secs(10), "the old one yields", |l| {
            l.contains("a newer agent (started ") && l.contains("this one stops writing it")
        });
    let new_lease = eventually("the new agent's key", Duration::from_secs(5), || {
        let c = client.clone();
        async move {
            let (_, lease) = heartbeat(&c, "worker-10").await?;
            (lease != old_lease).then_some(lease)
        }
    })
    .await;
    let mut events = client
        .watch(heartbeat_key("worker-10"), Some(WatchOptions::new()))
        .await
        .expect("watch heartbeat");
    events.message().await.expect("watch created");
    old.process.signal(Signal::SIGTERM);
    old.process
        .wait_exit(Duration::from_secs(5))
        .expect("old agent exits");
    // Past the old lease's expiry: every write is the new agent's, and none is a delete.
    let until = Instant::now() + Duration::from_secs(5);
    while let Ok(resp) = tokio::time::timeout_at(until.into(), events.message()).await {
        let resp = resp.expect("watch stream").expect("watch open");
        for e in resp.events() {
            let lease = e.kv().map(|kv| kv.lease());
            assert!(
                e.event_type() == EventType::Put && lease == Some(new_lease),
                "{:?} on lease {lease:?} (new {new_lease:x}, old {old_lease:x}):\n{}",
                e.event_type(),
                new.process.output_text()
            );
        }
    }
    let (hb, lease) = heartbeat(&client, "worker-10").await.expect("key present");
    assert_eq!((hb.state, lease), (AgentState::Running, new_lease));
}

/// Reads the watch on a heartbeat key until `until`, failing with `why()` at a delete.
async fn assert_not_deleted_until(
    events: &mut etcd_client::WatchStream,
    until: Instant,
    why: impl Fn() -> String,
) {
    while let Ok(resp) = tokio::time::timeout_at(until.into(), events.message()).await {
        let resp = resp.expect("watch stream").expect("watch open");
        for e in resp.events() {
            assert_eq!(e.event_type(), EventType::Put, "{}", why());
        }
    }
}

/// Waits up to `timeout` for `node`'s heartbeat key to expire: how long after `since` it was gone.
async fn expired_after(since: Instant, client: &Client, node: &str, timeout: Duration) -> Duration {
    heartbeat_gone_within(client, node, timeout).await;
    since.elapsed()
}
