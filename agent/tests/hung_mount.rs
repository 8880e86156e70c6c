//! A mount that never answers must cost the node one collector's figures, never its lease: when
//! the host root turns into a FUSE mount whose server never replies (statvfs on it waits for
//! ever, as on an NFS mount whose server went away), the disk collector reports a timeout, once, and is not started again; the
//! other collectors and the heartbeat lease carry on; when the mount fails at last, the disk
//! collector comes back.
//!
//! The mount is real: this test opens `/dev/fuse` and mounts it itself (it needs root, as the
//! agent's tests do), and plays a FUSE server that never reads a request.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::os::fd::AsRawFd;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nodepulse_agent::collect::deadline::BLOCKING_THREADS;
use testkit::{
    Etcd, eventually, heartbeat_within, http_get, panic_on_heartbeat_delete, put_config,
};

/// The agent's lease TTL, in seconds.
const TTL: u64 = 3;
/// How long the mount stays hung once the timeout is reported: three TTLs.
const HELD_FOR: Duration = Duration::from_secs(3 * TTL);

/// A FUSE mount in a scratch directory whose server never answers: every request on it (the
/// kernel's first, INIT, included) waits until the device is closed.
struct HungMount {
    dir: PathBuf,
    device: Option<File>,
}

impl HungMount {
    /// Mounts it over `dir`: from now on, whoever looks at `dir` waits.
    fn over(dir: &Path) -> HungMount {
        // Opened close-on-exec: the agent must not hold the device too.
        let device = File::options()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .expect("open /dev/fuse (the test needs root and the fuse module)");
        let options = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        );
        mount(
            Some("nodepulse-hung"),
            dir,
            Some("fuse"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .expect("mount a FUSE filesystem (the test needs root)");
        HungMount {
            dir: dir.to_path_buf(),
            device: Some(device),
        }
    }

    /// Closes the device: the kernel aborts the connection, and every request waiting on it
    /// fails (ENOTCONN), as a hung NFS mount's do once it is unmounted by force.
    fn fail_at_last(&mut self) {
        self.device = None;
    }
}

impl Drop for HungMount {
    fn drop(&mut self) {
        self.device = None;
        let _ = umount2(&self.dir, MntFlags::MNT_DETACH);
    }
}

/// The value of the series `series` (name and labels, as exported) on `/metrics`.
async fn scrape_value(addr: &str, series: &str) -> Option<f64> {
    let addr = addr.to_string();
    let (_, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
        .await
        .expect("scrape")?;
    body.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

/// The number of threads of process `pid`.
fn threads(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads in the status")
}

#[tokio::test]
async fn a_mount_that_never_answers_costs_the_disk_figures_not_the_lease() {
    let host_root = testkit::scratch_dir("hung-mount");
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let all_five = r#"{"interval": 1, "metrics": ["cpu", "memory", "disk", "network", "load"]}"#;
    put_config(&client, "hung-mount", all_five).await;
    let agent = etcd
        .agent("hung-mount")
        .ttl(TTL)
        .args(["--host-root", &host_root.path().display().to_string()])
        .program_from_env("NODEPULSE_AGENT_UNDER_TEST")
        .start();
    let pid = agent.pid();
    let (_, lease) = heartbeat_within(&client, "hung-mount", Duration::from_secs(10)).await;
    let serving_disk = r#"nodepulse_agent_collector_success{collector="disk"} "#;
    eventually("a sample of the disk", Duration::from_secs(10), || async {
        (scrape_value(&agent.http, serving_disk).await? == 1.0).then_some(())
    })
    .await;

    let watch_for_deletes = panic_on_heartbeat_delete(
        &client,
        "hung-mount",
        "the heartbeat key expired while a mount hung",
    )
    .await;
    let timeouts = r#"nodepulse_agent_collector_timeouts_total{collector="disk"} "#;
    // The host root's filesystem stops answering, as an NFS server that went away.
    let mut hung = HungMount::over(host_root.path());
    let hung_then_back = async {
        eventually(
            "the disk collector's timeout",
            Duration::from_secs(20),
            || async { (scrape_value(&agent.http, timeouts).await? >= 1.0).then_some(()) },
        )
        .await;
        let samples_before = agent.line_count();
        let threads_hung = threads(pid);
        let held_until = Instant::now() + HELD_FOR;
        while Instant::now() < held_until {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let samples_while_hung = agent.lines()[samples_before..]
            .iter()
            .filter(|l| l.text.contains("sample cpu=") && l.text.contains("disk=timeout"))
            .count();
        let timeouts_after = scrape_value(&agent.http, timeouts).await;
        let cpu_ok = scrape_value(
            &agent.http,
            r#"nodepulse_agent_collector_success{collector="cpu"} "#,
        )
        .await;
        let disk_ok = scrape_value(&agent.http, serving_disk).await;
        let threads_later = threads(pid);

        // The mount fails at last: the hung statvfs returns, and the collector comes back.
        let from = agent.line_count();
        hung.fail_at_last();
        eventually(
            "the disk collector back",
            Duration::from_secs(20),
            || async {
                agent.lines()[from..]
                    .iter()
                    .any(|l| l.text.contains("the disk collector answered at last"))
                    .then_some(())
            },
        )
        .await;
        (
            samples_while_hung,
            timeouts_after,
            cpu_ok,
            disk_ok,
            threads_hung,
            threads_later,
        )
    };
    let (samples, timeouts_after, cpu_ok, disk_ok, threads_hung, threads_later) = tokio::select! {
        () = watch_for_deletes => panic!("the watch on the heartbeat key ended"),
        r = hung_then_back => r,
    };
    eprintln!(
        "{samples} samples with disk=timeout in {HELD_FOR:?}; disk timeouts counted: \
         {timeouts_after:?}; collector_success cpu {cpu_ok:?}, disk {disk_ok:?}; agent threads \
         {threads_hung} then {threads_later}"
    );
    let log = agent.output_text();
    assert!(
        samples >= 4,
        "the other collectors stopped sampling while the mount hung:\n{log}"
    );
    assert_eq!(
        timeouts_after,
        Some(1.0),
        "the hung collector was started again"
    );
    assert_eq!(cpu_ok, Some(1.0), "the cpu collector stopped working");
    assert_eq!(
        disk_ok,
        Some(0.0),
        "the hung disk collector reported success"
    );
    // The runtime's thread, the log writer's, and the blocking pool at its bound: a hung
    // collector started again at every sample would pass it within a few seconds.
    let most = 2 + BLOCKING_THREADS as u32;
    assert!(
        threads_hung.max(threads_later) <= most,
        "the agent ran {threads_hung}, then {threads_later} threads while the mount hung (at most {most})"
    );
    assert!(
        log.contains("sampling: disk collector failed: no answer within 1s"),
        "no log line says the disk collector timed out:\n{log}"
    );
    let (_, now_lease) = heartbeat_within(&client, "hung-mount", Duration::from_secs(1)).await;
    assert_eq!(now_lease, lease, "the key moved to another lease");
}
