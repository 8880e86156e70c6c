//! The shared list-and-watch (`nodepulse_etcd::watch`) against a real etcd: what it delivers,
//! and when it lists again (compaction, a rebuilt etcd) or resumes (a plain restart).
//!
//! Here rather than in the `crd` crate because the harness (`testkit`) depends on `crd`.

use std::time::Duration;

use etcd_client::Client;
use nodepulse_etcd::EtcdArgs;
use nodepulse_etcd::watch::{EtcdWatcher, Kv, WatchEvent, WatcherSettings};
use nodepulse_runtime::Backoff;
use testkit::Etcd;

const PREFIX: &str = "/w/";

fn settings() -> WatcherSettings {
    WatcherSettings {
        backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
        ..WatcherSettings::prefix("test watch")
    }
}

async fn client(etcd: &Etcd) -> Client {
    EtcdArgs::for_endpoint(etcd.endpoint.clone())
        .connect()
        .await
        .expect("connect")
}

/// A new etcd (started off the runtime's threads) and a client of it.
async fn start() -> (Etcd, Client) {
    let etcd = tokio::task::spawn_blocking(Etcd::start)
        .await
        .expect("etcd");
    let c = client(&etcd).await;
    (etcd, c)
}

/// The next event within 15 s.
async fn next(w: &mut EtcdWatcher) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(15), w.next())
        .await
        .expect("an event within 15 s")
}

/// The next event that is not `Interrupted`, and whether an `Interrupted` came first.
async fn next_after_outage(w: &mut EtcdWatcher) -> (bool, WatchEvent) {
    let mut interrupted = false;
    loop {
        match next(w).await {
            WatchEvent::Interrupted => {
                assert!(!interrupted, "one Interrupted per outage");
                interrupted = true;
            }
            other => return (interrupted, other),
        }
    }
}

/// Puts, retrying while a restarted etcd is still being reconnected to.
async fn put_retrying(c: &Client, key: &str) {
    testkit::eventually(&format!("put {key}"), Duration::from_secs(15), || {
        let mut c = c.clone();
        async move { c.put(key, "1", None).await.ok().map(|_| ()) }
    })
    .await;
}

/// After a re-list that may or may not have caught `key`: whether the list had it, else the
/// next event is its Put.
async fn listed_or_next(w: &mut EtcdWatcher, kvs: &[Kv], key: &str) {
    if !keys(kvs).iter().any(|k| k == key) {
        assert_eq!(put_key(&next(w).await), key);
    }
}

/// What a `Listed` event carries (revision, key-values, replaced); panics on any other event,
/// saying which `Listed` was `expected`.
fn listed(event: WatchEvent, expected: &str) -> (i64, Vec<Kv>, bool) {
    match event {
        WatchEvent::Listed {
            revision,
            kvs,
            replaced,
        } => (revision, kvs, replaced),
        other => panic!("expected {expected}, got {other:?}"),
    }
}

fn keys(kvs: &[Kv]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

fn put_key(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put(kv) => String::from_utf8_lossy(&kv.key).into_owned(),
        other => panic!("expected a Put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_then_delivers_puts_and_deletes_with_the_previous_value() {
    let (_etcd, mut c) = start().await;
    c.put("/w/a", "1", None).await.expect("put");
    c.put("/other", "x", None).await.expect("put");
    let mut w = EtcdWatcher::new(c.clone(), PREFIX, settings());
    let (revision, kvs, replaced) = listed(next(&mut w).await, "Listed first");
    assert_eq!(keys(&kvs), ["/w/a"]);
    assert!(!replaced, "nothing was seen before the first list");
    assert_eq!(revision, 3);
    c.put("/w/b", "2", None).await.expect("put");
    assert_eq!(put_key(&next(&mut w).await), "/w/b");
    c.delete("/w/a", None).await.expect("delete");
    match next(&mut w).await {
        WatchEvent::Delete {
            key,
            prev,
            revision,
        } => {
            assert_eq!(key, b"/w/a");
            assert_eq!(prev.expect("prev value").value, b"1");
            assert_eq!(revision, 5);
        }
        other => panic!("expected a Delete, got {other:?}"),
    }
    assert_eq!(w.revision(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_interrupts_once_then_resumes_without_a_list() {
    let (mut etcd, c) = start().await;
    let mut w = EtcdWatcher::new(c.clone(), PREFIX, settings());
    assert!(matches!(next(&mut w).await, WatchEvent::Listed { .. }));
    c.clone().put("/w/a", "1", None).await.expect("put");
    assert_eq!(put_key(&next(&mut w).await), "/w/a");
    tokio::task::block_in_place(|| etcd.restart());
    put_retrying(&c, "/w/after").await;
    let (interrupted, event) = next_after_outage(&mut w).await;
    assert!(interrupted, "the outage is reported");
    assert_eq!(put_key(&event), "/w/after", "resumed, not re-listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_break_lists_again_after_a_restart() {
    let (mut etcd, c) = start().await;
    let relisting = WatcherSettings {
        relist_after_break: true,
        ..settings()
    };
    let mut w = EtcdWatcher::new(c.clone(), PREFIX, relisting);
    assert!(matches!(next(&mut w).await, WatchEvent::Listed { .. }));
    tokio::task::block_in_place(|| etcd.restart());
    put_retrying(&c, "/w/after").await;
    let (interrupted, event) = next_after_outage(&mut w).await;
    assert!(interrupted);
    let (_, kvs, replaced) = listed(event, "a Listed");
    assert!(!replaced, "a restarted etcd is the same store");
    listed_or_next(&mut w, &kvs, "/w/after").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_revision_means_a_new_list_with_the_changes_missed() {
    let (mut etcd, mut c) = start().await;
    c.put("/w/gone", "1", None).await.expect("put");
    let mut w = EtcdWatcher::new(c.clone(), PREFIX, settings());
    assert!(matches!(next(&mut w).await, WatchEvent::Listed { .. }));
    // Away (not polled) while etcd restarts, the keys change and the history is compacted.
    tokio::task::block_in_place(|| etcd.restart());
    let mut c = client(&etcd).await;
    c.delete("/w/gone", None).await.expect("delete");
    let rev = testkit::put_and_compact(&mut c, "/w/born", "1").await;
    let (_, event) = next_after_outage(&mut w).await;
    let (revision, kvs, _) = listed(event, "a Listed after the compaction");
    assert_eq!(keys(&kvs), ["/w/born"]);
    assert_eq!(revision, rev);
}

/// etcd's data lost and etcd restarted empty on the same address: it would accept a watch from
/// our (future) revision and stay silent; the watcher sees the revision went back and lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_etcd_means_a_new_list_not_a_silent_watch() {
    let (mut etcd, mut c) = start().await;
    for i in 0..50 {
        c.put(format!("/w/old-{i}"), "x", None).await.expect("put");
    }
    let mut w = EtcdWatcher::new(c.clone(), PREFIX, settings());
    let (before, _, _) = listed(next(&mut w).await, "Listed first");
    tokio::task::block_in_place(|| {
        etcd.kill();
        std::fs::remove_dir_all(etcd.data_dir()).expect("remove the data directory");
        etcd.restart();
    });
    put_retrying(&c, "/w/new").await;
    let (_, event) = next_after_outage(&mut w).await;
    let (revision, kvs, replaced) = listed(event, "a Listed on the rebuilt etcd");
    assert!(revision < before, "{revision} < {before}");
    assert!(
        replaced,
        "a store whose revision went back is another store"
    );
    assert!(keys(&kvs).iter().all(|k| k == "/w/new"), "{kvs:?}");
    listed_or_next(&mut w, &kvs, "/w/new").await;
    c.put("/w/next", "1", None).await.expect("put");
    assert_eq!(put_key(&next(&mut w).await), "/w/next");
}

/// More keys than one gRPC message holds: 9,000 heartbeat-sized values (~530 bytes, under
/// cloud-style node names) are about 5 MiB, past the client's 4 MiB receive limit, which an
/// unpaged range hit on every retry. The list comes in pages at one revision: every key once, in
/// order, and the watch goes on from the list's revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_larger_than_one_message_comes_whole_in_pages() {
    let (_etcd, mut c) = start().await;
    const KEYS: usize = 9_000;
    let name = |i: usize| {
        format!(
            "{PREFIX}ip-10-0-{}-{}.eu-west-1.compute.internal",
            i / 250,
            i % 250
        )
    };
    let value = "x".repeat(530);
    // etcd takes at most 128 operations a transaction.
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| etcd_client::TxnOp::put(name(*i), value.as_str(), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops))
            .await
            .expect("put a batch");
    }
    let unpaged = c
        .get(PREFIX, Some(etcd_client::GetOptions::new().with_prefix()))
        .await;
    assert!(
        unpaged.is_err(),
        "one unpaged range of {KEYS} keys fits a message: the test no longer tests paging"
    );
    let listing = nodepulse_etcd::list_prefix(&mut c, PREFIX, false)
        .await
        .expect("list in pages");
    assert_eq!(listing.kvs.len(), KEYS);
    let keys: Vec<&[u8]> = listing.kvs.iter().map(|kv| kv.key()).collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "keys in order, each once"
    );

    let mut w = EtcdWatcher::new(c.clone(), PREFIX, settings());
    match next(&mut w).await {
        WatchEvent::Listed { kvs, .. } => assert_eq!(kvs.len(), KEYS),
        other => panic!("want Listed, got {other:?}"),
    }
    c.put(format!("{PREFIX}late"), "v", None)
        .await
        .expect("put");
    match next(&mut w).await {
        WatchEvent::Put(kv) => assert_eq!(kv.key, format!("{PREFIX}late").into_bytes()),
        other => panic!("want the late put, got {other:?}"),
    }
}
