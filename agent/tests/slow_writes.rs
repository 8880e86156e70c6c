//! A slow put must never starve lease renewals: with every etcd write held back longer than the
//! TTL (a stalled disk as the agent sees it), the keep-alives still go out on time, so the node's
//! key never expires and no second lease is granted.

use std::time::Duration;

use testkit::{Etcd, Launch, SlowEtcd, eventually, heartbeat, panic_on_heartbeat_delete};

/// The agent's lease TTL, in seconds: keep-alives every second.
const TTL: u64 = 3;
/// How long each write is held back: longer than the TTL, so a renewal that waited for a put
/// would come too late.
const WRITE_DELAY: Duration = Duration::from_secs(5);

#[tokio::test]
async fn writes_slower_than_the_ttl_never_cost_the_lease() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let slow = SlowEtcd::start(&etcd.endpoint);
    // Values rewritten at least every second, so that a put is always pending.
    let agent = Launch::agent("slow-disk")
        .etcd(&slow.endpoint())
        .ttl(TTL)
        .args([
            "--heartbeat-min-interval",
            "1s",
            "--heartbeat-max-interval",
            "1s",
        ])
        .start();
    let (_, lease) = eventually("heartbeat key", Duration::from_secs(10), || {
        heartbeat(&client, "slow-disk")
    })
    .await;

    // From here on every put waits 5 s; watch the key straight on etcd, past the proxy.
    let watch_for_deletes = panic_on_heartbeat_delete(
        &client,
        "slow-disk",
        "the heartbeat key expired while puts were slow: renewals waited for them",
    )
    .await;
    slow.set_write_delay(WRITE_DELAY);

    // Three held writes in a row: at least 10 s (over three TTLs) in which the agent always had
    // a put waiting on etcd. Any expiry of the key in that time shows up as a Delete.
    let three_held_writes = eventually("three held writes", Duration::from_secs(60), || {
        let held = slow.writes_held();
        async move { (held >= 3).then_some(()) }
    });
    tokio::select! {
        () = watch_for_deletes => panic!("the watch on the heartbeat key ended"),
        () = three_held_writes => {}
    }

    // The lease is the one granted at the start, still alive, and the only one: no re-grant loop.
    let (_, now_lease) = heartbeat(&client, "slow-disk")
        .await
        .expect("the key is still there");
    assert_eq!(now_lease, lease, "the key moved to another lease");
    let leases: Vec<i64> = client
        .leases()
        .await
        .expect("list leases")
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    assert_eq!(leases, vec![lease], "orphan leases were granted");
    let ttl = testkit::lease_ttl(&mut client, lease).await;
    assert!(ttl > 0, "lease {lease:x} is expiring: {ttl}");
    let log = agent.process.output_text();
    assert!(
        !log.contains("lease lost") && !log.contains("heartbeat: "),
        "the agent lost its lease or its connection:\n{log}"
    );
}
