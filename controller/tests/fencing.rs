//! A deposed leader stops writing. Replica A is cut off from the API server (a proxy the test
//! stops) but still reaches etcd; replica B takes the Lease over when it expires and writes a
//! new config. A must stop writing before that, or its stale MonitorConfig cache "restores" the
//! old config key over B's, and the two replicas fight for as long as the cut lasts.

use std::time::{Duration, Instant};

use etcd_client::{EventType, WatchOptions};
use nodepulse_crd::wire::{ConfigValue, config_key};
use testkit::{Launch, TcpProxy, TestEnv, eventually};

/// Short Lease times, so that a takeover takes seconds.
const LEASE: &[&str] = &[
    "--leader-election-lease-duration",
    "6s",
    "--leader-election-renew-grace",
    "2s",
];

fn monitor_config(interval: u32) -> String {
    format!(
        "apiVersion: nodepulse.io/v1alpha1\nkind: MonitorConfig\nmetadata:\n  name: fenced\n\
         spec:\n  nodeNames: [fence-1]\n  interval: {interval}\n  metrics: [cpu]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_cut_off_from_the_api_server_stops_writing_before_its_successor_starts() {
    let (env, etcd) = TestEnv::start().await;
    let api = env.api();
    env.node("fence-1", &[]);

    // Replica A reaches the API server only through the proxy.
    let server = api.url.trim_start_matches("https://");
    let proxy = TcpProxy::start(server);
    let kubeconfig_a = api.dir().join("kubeconfig-via-proxy");
    let original = std::fs::read_to_string(&api.kubeconfig).expect("read kubeconfig");
    assert!(original.contains(server), "{original}");
    std::fs::write(
        &kubeconfig_a,
        original.replace(server, &proxy.addr().to_string()),
    )
    .expect("write kubeconfig");

    let a = Launch::controller(&kubeconfig_a, "replica-a")
        .etcd(&etcd.endpoint)
        .args(LEASE)
        .spawn();
    a.wait_for_line(Duration::from_secs(30), "A leads", |l| {
        l.contains("became leader")
    });
    env.apply(&monitor_config(5));
    let mut client = etcd.client().await;
    eventually("A writes interval 5", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move {
            let resp = c.get(config_key("fence-1"), None).await.ok()?;
            let value = ConfigValue::parse(resp.kvs().first()?.value()).ok()?;
            (value.interval == 5).then_some(())
        }
    })
    .await;

    let b = env.controller("replica-b").args(LEASE).spawn();
    b.wait_for_line(Duration::from_secs(30), "B stands by", |l| {
        l.contains("waiting to lead")
    });

    // Cut A off. It still reaches etcd, and its caches still say interval 5.
    let cut = Instant::now();
    proxy.cut();
    let fenced = a.wait_for_line(Duration::from_secs(10), "A stops writing", |l| {
        l.contains("stopped writing")
    });
    let taken = b.wait_for_line(Duration::from_secs(30), "B leads", |l| {
        l.contains("became leader")
    });
    assert!(
        fenced.at < taken.at,
        "A stopped writing {:?} after the cut, B led {:?} after it",
        fenced.at - cut,
        taken.at - cut
    );

    // B writes the new config; nobody writes the old one back.
    let mut watch = client
        .watch(config_key("fence-1"), Some(WatchOptions::new()))
        .await
        .expect("watch the config key");
    watch.message().await.expect("watch created");
    env.apply(&monitor_config(7));
    // Every write of the key from now on: B's 7 within 15 s, then nothing else for 5 s more.
    let mut seen = Vec::new();
    let mut window = Instant::now() + Duration::from_secs(15);
    while let Ok(msg) = tokio::time::timeout_at(window.into(), watch.message()).await {
        let resp = msg.expect("watch stream").expect("watch open");
        for e in resp.events() {
            assert_eq!(e.event_type(), EventType::Put, "config key deleted");
            let value = ConfigValue::parse(e.kv().expect("kv").value()).expect("parses");
            if seen.is_empty() {
                window = Instant::now() + Duration::from_secs(5);
            }
            seen.push(value.interval);
        }
    }
    assert_eq!(
        seen,
        vec![7],
        "config key writes after the takeover\n--- A:\n{}\n--- B:\n{}",
        a.output_text(),
        b.output_text()
    );
}
