//! `nodepulsectl watch` across a rebuilt etcd (killed, its data directory lost, started again
//! empty on the same address): a live node missing from the new store's first list is not a
//! death, since its agent writes its key again within its TTL; one whose agent does not is Dead.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use testkit::{Etcd, Process, heartbeat, project_bin};

/// The agents' heartbeat TTL, in seconds.
const TTL: u64 = 3;

fn watch(etcd: &Etcd) -> Process {
    let mut cmd = Command::new(project_bin("nodepulsectl"));
    cmd.arg("watch")
        .env("NODEPULSE_ETCD_ENDPOINTS", &etcd.endpoint)
        .env("RUST_LOG", "info");
    Process::spawn("watch", cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_etcd_is_no_death_of_a_live_node() {
    let mut etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd");
    let live = etcd.agent("rebuilt-live").ttl(TTL).start();
    let dead = etcd.agent("rebuilt-dead").ttl(TTL).start();
    let client = etcd.client().await;
    for node in ["rebuilt-live", "rebuilt-dead"] {
        testkit::eventually(
            &format!("{node}'s heartbeat"),
            Duration::from_secs(20),
            || async { heartbeat(&client, node).await.map(|_| ()) },
        )
        .await;
    }
    let watcher = watch(&etcd);
    // The table's rows, sorted by name: the live node's comes last.
    watcher.wait_for_line(Duration::from_secs(10), "the first table", |l| {
        l.starts_with("rebuilt-live") && l.contains("Alive")
    });

    // Both agents frozen while etcd is rebuilt, so that neither writes its key before the
    // watch lists the new, empty store: the race a live agent wins only sometimes.
    live.process.signal(Signal::SIGSTOP);
    dead.process.signal(Signal::SIGSTOP);
    let mark = watcher.line_count();
    tokio::task::block_in_place(|| {
        etcd.kill();
        std::fs::remove_dir_all(etcd.data_dir()).expect("remove the data directory");
        etcd.restart();
    });
    watcher.wait_for_line_from(
        mark,
        Duration::from_secs(20),
        "the watch back on the new store",
        |l| l.contains("back after"),
    );
    // One agent comes back within its TTL and writes its key on the new store; the other never
    // does (SIGKILL).
    live.process.signal(Signal::SIGCONT);
    dead.process.signal(Signal::SIGKILL);
    let client = etcd.client().await;
    testkit::eventually(
        "the live agent's heartbeat on the new store",
        Duration::from_secs(TTL),
        || async { heartbeat(&client, "rebuilt-live").await.map(|_| ()) },
    )
    .await;
    watcher.wait_for_line_from(
        mark,
        Duration::from_secs(TTL + 5),
        "the dead node's death, one TTL after the new store's list",
        |l| l.contains("Node rebuilt-dead Dead (heartbeat expired)"),
    );
    let said: Vec<String> = watcher.lines()[mark..]
        .iter()
        .map(|l| l.text.clone())
        .filter(|l| l.contains("rebuilt-live"))
        .collect();
    assert!(
        said.is_empty(),
        "nothing happened to the live node, yet the watch said: {said:?}"
    );
}
