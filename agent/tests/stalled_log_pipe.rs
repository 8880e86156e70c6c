//! A log pipe that stops draining must not cost the node its lease: with the agent's stdout into
//! a 4 KiB pipe that nobody reads once the heartbeat key is there, and 1 s samples, the heartbeat
//! lease lives on well past the point the pipe fills, and the lines that did not fit are counted
//! on `/metrics`. `NODEPULSE_AGENT_UNDER_TEST` runs another build (one from before the log writer
//! had a thread of its own fails: its key is deleted).

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, fcntl};
use testkit::{
    Etcd, config_json, heartbeat_within, http_get, panic_on_heartbeat_delete, put_config,
};

/// The agent's lease TTL, in seconds.
const TTL: u64 = 3;
/// How long the lease must outlive the full pipe: over two TTLs.
const HELD_FOR: Duration = Duration::from_secs(3 * TTL);

#[tokio::test]
async fn a_log_pipe_nobody_reads_never_costs_the_lease() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    put_config(&client, "stalled-log", config_json(1)).await;
    // Debug lines (the etcd client's among them) fill 4 KiB within seconds.
    let mut cmd = etcd
        .agent("stalled-log")
        .ttl(TTL)
        .log("debug")
        .program_from_env("NODEPULSE_AGENT_UNDER_TEST")
        .command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut agent = cmd.spawn().expect("start the agent");
    let stdout = agent.stdout.take().expect("piped stdout");
    fcntl(stdout.as_fd(), FcntlArg::F_SETPIPE_SZ(4096)).expect("shrink the pipe to 4 KiB");

    // Read up to the serving line, then on until the heartbeat key is there, then never again.
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let addr = loop {
        line.clear();
        let n = reader.read_line(&mut line).expect("read the agent's log");
        assert!(n > 0, "the agent's log ended before it served /metrics");
        if let Some(rest) = line.find("serving /metrics").map(|i| &line[i..])
            && let Some((_, addr)) = rest.rsplit_once(" on ")
        {
            break addr
                .split(|c: char| c == '"' || c.is_whitespace())
                .next()
                .unwrap()
                .to_string();
        }
    };
    let stop_reading = Arc::new(AtomicBool::new(false));
    let draining = std::thread::spawn({
        let stop_reading = stop_reading.clone();
        move || {
            let mut line = String::new();
            while !stop_reading.load(Ordering::Relaxed) {
                line.clear();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
            }
            reader
        }
    });
    let (_, lease) = heartbeat_within(&client, "stalled-log", Duration::from_secs(10)).await;
    stop_reading.store(true, Ordering::Relaxed);
    // Held, unread, until the end of the test.
    let reader = draining.join().expect("the log reader");

    let watch_for_deletes = panic_on_heartbeat_delete(
        &client,
        "stalled-log",
        "the heartbeat key expired while the log pipe was full",
    )
    .await;
    // The pipe is full once a line is dropped; from then on the lease must live HELD_FOR.
    let full_then_held = async {
        let deadline = Instant::now() + Duration::from_secs(90);
        let dropped = |addr: String| async move {
            tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
                .await
                .expect("scrape")
                .and_then(|(_, body)| {
                    body.lines()
                        .find_map(|l| l.strip_prefix("nodepulse_agent_log_lines_dropped_total "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
                .unwrap_or(0)
        };
        while dropped(addr.clone()).await == 0 {
            assert!(
                Instant::now() < deadline,
                "no log line dropped within 90 s: the pipe never filled, or /metrics stopped answering"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(HELD_FOR).await;
        dropped(addr.clone()).await
    };
    let dropped = tokio::select! {
        () = watch_for_deletes => panic!("the watch on the heartbeat key ended"),
        d = full_then_held => d,
    };
    assert!(
        dropped > 0,
        "/metrics stopped answering while the pipe was full"
    );
    let (_, now_lease) = heartbeat_within(&client, "stalled-log", Duration::from_secs(1)).await;
    assert_eq!(now_lease, lease, "the key moved to another lease");
    let _ = agent.kill();
    let _ = agent.wait();
    drop(reader);
}
