//! A loopback gRPC proxy in front of a real etcd that holds writes back: etcd with a stalled disk
//! as its clients see it (a put waits seconds), while lease keep-alives, watches and reads pass at
//! once. etcd itself cannot be made to do that: its LeaseRenew waits for the applied index too,
//! so a stalled WAL or apply stalls the renewals with the writes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The gRPC methods that write etcd's key space.
const WRITES: [&str; 2] = ["/etcdserverpb.KV/Put", "/etcdserverpb.KV/Txn"];

/// Forwards etcd's gRPC calls made to [`SlowEtcd::endpoint`] to a real etcd, each write after
/// [`SlowEtcd::set_write_delay`].
pub struct SlowEtcd {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    delay_ms: AtomicU64,
    /// Writes that were held back (counted when the hold begins).
    held: AtomicU64,
}

impl SlowEtcd {
    /// Listens on a port the OS picks on 127.0.0.1 and forwards to `endpoint`
    /// (`http://127.0.0.1:<port>`), with no delay yet.
    pub fn start(endpoint: &str) -> SlowEtcd {
        let target: Uri = endpoint.parse().expect("an http:// etcd endpoint");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let serving = shared.clone();
        // A runtime of its own, so that the proxy outlives any one test's runtime.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime")
                .block_on(serve(listener, target, serving));
        });
        SlowEtcd { addr, shared }
    }

    /// `http://127.0.0.1:<port>`, for a client's `--etcd-endpoints`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every write from now on waits `delay` before it goes to etcd.
    pub fn set_write_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// How many writes have been held back so far.
    pub fn writes_held(&self) -> u64 {
        self.shared.held.load(Ordering::SeqCst)
    }
}

async fn serve(listener: std::net::TcpListener, target: Uri, shared: Arc<Shared>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (client, target, shared) = (client.clone(), target.clone(), shared.clone());
        tokio::spawn(async move {
            let service =
                service_fn(move |req| forward(req, client.clone(), target.clone(), shared.clone()));
            // Ends when the client goes away; nothing to report.
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    mut req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    target: Uri,
    shared: Arc<Shared>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 && WRITES.contains(&req.uri().path()) {
        shared.held.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut parts = target.into_parts();
    parts.path_and_query = req.uri().path_and_query().cloned();
    *req.uri_mut() = Uri::from_parts(parts).expect("the etcd endpoint with the call's path");
    client.request(req).await
}
