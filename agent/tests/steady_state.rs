//! A healthy etcd with its default settings never drops the agent's connection: no watch lost,
//! no lease re-granted, no keep-alive stream reopened in a minute. Each reconnect reopens the
//! lease keep-alive stream, which at a short TTL is a false Dead, and at 10,000 nodes hundreds
//! of reconnects a second. And it is one connection: the config watch rides on the heartbeat's.

use std::collections::HashSet;
use std::time::Duration;

use testkit::{Etcd, http_get, wait_until};

/// How many streams of `method` etcd has started, from its own /metrics.
fn streams_started(etcd: &Etcd, method: &str) -> u64 {
    let addr = etcd.endpoint.trim_start_matches("http://");
    let (_, body) = http_get(addr, "/metrics").expect("etcd /metrics answers");
    body.lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter(|l| l.contains(&format!("grpc_method=\"{method}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The agent's established TCP connections to `port`: its sockets (the `socket:[inode]` links
/// under /proc/<pid>/fd) whose peer, in the network namespace's TCP table, is that port.
fn connections_to(pid: u32, port: u16) -> usize {
    let sockets: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's fds")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let peer = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        // sl local_address rem_address st ... inode: state 01 is ESTABLISHED.
        .filter(|f| f.len() > 9 && f[2].ends_with(&peer) && f[3] == "01")
        .filter(|f| sockets.contains(&f[9]))
        .count()
}

#[tokio::test]
async fn a_minute_of_healthy_etcd_keeps_one_connection() {
    // etcd as it comes: --grpc-keepalive-min-time 5 s, no pings on idle connections.
    let etcd = Etcd::start();
    let agent = etcd.agent("steady-1").ttl(3).start();
    agent
        .process
        .wait_for_line(Duration::from_secs(10), "lease granted", |l| {
            l.contains("heartbeat lease granted")
        });
    wait_until("the config watch", Duration::from_secs(10), || {
        streams_started(&etcd, "Watch") >= 1
    });
    let etcd_port: u16 = etcd
        .endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("etcd's port");
    assert_eq!(
        connections_to(agent.process.pid(), etcd_port),
        1,
        "the heartbeat and the config watch share one connection to etcd"
    );
    let watches = streams_started(&etcd, "Watch");
    let keep_alives = streams_started(&etcd, "LeaseKeepAlive");
    assert!(keep_alives >= 1, "no keep-alive stream: {keep_alives}");

    // Nothing to wait for: the point is that nothing happens for a minute.
    tokio::time::sleep(Duration::from_secs(60)).await;

    let output = agent.process.output_text();
    let churn: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("lost") || l.contains("resum"))
        .collect();
    assert!(churn.is_empty(), "connection churn:\n{}", churn.join("\n"));
    assert_eq!(
        (
            streams_started(&etcd, "Watch"),
            streams_started(&etcd, "LeaseKeepAlive")
        ),
        (watches, keep_alives),
        "etcd saw the agent open new streams:\n{output}"
    );
    let (_, metrics) = http_get(&agent.http, "/metrics").expect("agent /metrics");
    for line in [
        "nodepulse_agent_lease_regrants_total 0",
        "nodepulse_agent_heartbeat_failures_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}
