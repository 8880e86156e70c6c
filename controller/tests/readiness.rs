//! The controller's probes against a real etcd and a real kube-apiserver: `/readyz` answers 503
//! while the controller's etcd is down and 200 once it answers again; `/healthz` stays 200 all
//! along and the process keeps running, so the kubelet takes the pod out of its Service but
//! does not restart it in a loop.

use std::time::Duration;

use testkit::{TestEnv, eventually, http_get};

async fn readyz(addr: &str, want: u16, within: Duration) -> String {
    eventually(&format!("/readyz {want}"), within, || async {
        let (code, body) = http_get(addr, "/readyz")?;
        (code == want).then_some(body)
    })
    .await
}

#[tokio::test]
async fn readyz_follows_etcd_and_healthz_stays_up() {
    // nodepulse's etcd is apart from the API server's: it can go away alone.
    let (env, mut etcd) = TestEnv::start().await;
    let mut controller = env.controller("controller-0").spawn();
    let addr = controller.wait_for_serving_addr(Duration::from_secs(30));

    let body = readyz(&addr, 200, Duration::from_secs(30)).await;
    assert!(body.contains("etcd answers"), "{body}");

    etcd.kill();
    let body = readyz(&addr, 503, Duration::from_secs(10)).await;
    assert!(body.starts_with("not ready: "), "{body}");
    let (code, _) = http_get(&addr, "/healthz").expect("/healthz answers");
    assert_eq!(code, 200, "/healthz must stay 200 while etcd is down");
    assert!(controller.is_running(), "{}", controller.output_text());

    etcd.restart();
    readyz(&addr, 200, Duration::from_secs(30)).await;
    assert_eq!(http_get(&addr, "/healthz").map(|r| r.0), Some(200));
    assert!(controller.is_running(), "{}", controller.output_text());
}
