//! A flood of idle connections to the admin port must not cost the node its lease nor the agent
//! its memory: 10,000 TCP connections to `/metrics` that never send a byte, held for three TTLs,
//! leave the heartbeat lease alive, the agent's resident memory within a few MiB of what it was,
//! and `/metrics` answering again once the idle ones are dropped.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use testkit::{
    Etcd, config_json, heartbeat_within, http_get, panic_on_heartbeat_delete, put_config,
};

/// The agent's lease TTL, in seconds.
const TTL: u64 = 3;
/// How long the flood is held: three TTLs.
const HELD_FOR: Duration = Duration::from_secs(3 * TTL);
/// Idle connections opened.
const CONNECTIONS: usize = 10_000;
/// How much the agent's resident memory may grow under the flood.
const RSS_GROWTH_LIMIT_KIB: u64 = 8 * 1024;

/// The agent's resident memory, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in the status")
}

/// Opens up to `n` connections to `addr` that never send anything; gives up on the rest after
/// a minute (a server that stops accepting leaves connects hanging in the backlog).
fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut streams = Vec::with_capacity(n);
    while streams.len() < n && Instant::now() < deadline {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            streams.push(s);
        }
    }
    streams
}

#[tokio::test]
async fn ten_thousand_idle_connections_never_cost_the_lease() {
    // The test's own descriptors (and the agent's, which inherits the limit) must cover the flood.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(
        hard >= CONNECTIONS as u64 + 1024,
        "RLIMIT_NOFILE's hard limit {hard} is too low for {CONNECTIONS} connections"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raise RLIMIT_NOFILE");

    let etcd = Etcd::start();
    let client = etcd.client().await;
    put_config(&client, "idle-flood", config_json(1)).await;
    let agent = etcd
        .agent("idle-flood")
        .ttl(TTL)
        .program_from_env("NODEPULSE_AGENT_UNDER_TEST")
        .start();
    let pid = agent.pid();
    let addr: SocketAddr = agent.http.parse().expect("a socket address");
    let (_, lease) = heartbeat_within(&client, "idle-flood", Duration::from_secs(10)).await;
    // A few samples and scrapes first, so that the baseline holds what steady state allocates.
    for _ in 0..3 {
        let http = agent.http.clone();
        let scraped = tokio::task::spawn_blocking(move || http_get(&http, "/metrics"))
            .await
            .expect("scrape");
        assert!(matches!(scraped, Some((200, _))), "/metrics: {scraped:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let before = rss_kib(pid);

    let watch_for_deletes = panic_on_heartbeat_delete(
        &client,
        "idle-flood",
        "the heartbeat key expired under a flood of idle connections",
    )
    .await;
    let flood_then_held = async {
        let started = Instant::now();
        let streams = tokio::task::spawn_blocking(move || open_idle(addr, CONNECTIONS))
            .await
            .expect("open the connections");
        let opened_in = started.elapsed();
        let mut peak = rss_kib(pid);
        let held_until = Instant::now() + HELD_FOR;
        while Instant::now() < held_until {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Still holding every idle connection: a new scraper gets an answer.
        let http = agent.http.clone();
        let during = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(20);
            loop {
                if let Some((200, _)) = http_get(&http, "/metrics") {
                    return Some(started.elapsed());
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .await
        .expect("scrape");
        peak = peak.max(rss_kib(pid));
        (streams.len(), opened_in, peak, during)
    };
    let (opened, opened_in, peak, answered_during) = tokio::select! {
        () = watch_for_deletes => panic!("the watch on the heartbeat key ended"),
        r = flood_then_held => r,
    };
    eprintln!(
        "opened {opened} idle connections in {opened_in:?}; agent VmRSS {before} KiB before, \
         {peak} KiB at most under the flood; /metrics answered, the flood still open, after \
         {answered_during:?}"
    );
    assert_eq!(opened, CONNECTIONS, "connections that could be opened");
    assert!(
        peak <= before + RSS_GROWTH_LIMIT_KIB,
        "the agent's VmRSS grew from {before} KiB to {peak} KiB under the flood"
    );
    assert!(
        answered_during.is_some(),
        "/metrics did not answer during the flood"
    );
    let (_, now_lease) = heartbeat_within(&client, "idle-flood", Duration::from_secs(1)).await;
    assert_eq!(now_lease, lease, "the key moved to another lease");
    let http = agent.http.clone();
    let after = tokio::task::spawn_blocking(move || http_get(&http, "/metrics"))
        .await
        .expect("scrape");
    assert!(
        matches!(after, Some((200, _))),
        "/metrics after the flood: {after:?}"
    );
}
