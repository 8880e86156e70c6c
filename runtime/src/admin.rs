//! The `/metrics`, `/healthz` and `/readyz` server of the agent and the controller.
//!
//! Bounded, because it shares a process (the agent's, under a 128 Mi memory limit, with the
//! heartbeat on the same thread) with what matters more: at most [`MAX_CONNECTIONS`] at once
//! (one more is closed as soon as it is accepted), [`HEADER_READ_TIMEOUT`] to send a request's
//! head, at most [`MAX_REQUEST_HEAD_BYTES`] of it, and [`CONNECTION_TIMEOUT`] for a whole
//! connection. A flood of idle connections then costs a few sockets, not the process's memory.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once. A scraper or two and the kubelet's probes need a handful.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head, from when it connected or its
/// previous request was answered: an idle connection is closed after this long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection may stay open, requests and answers included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head (request line and headers) read; a longer one is refused (431).
pub const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;
/// How long accepting pauses after it failed for want of descriptors or memory, so that a full
/// descriptor table is not retried in a busy loop.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Serves `routes` (path, handler) on `listener` until the task is dropped.
///
/// Logs the bound address first (`serving /metrics, /healthz and /readyz on 127.0.0.1:40123`):
/// with `--metrics-addr 127.0.0.1:0` the system picks the port, and that line is how a
/// person or a test (`testkit::Process::wait_for_serving_addr`) learns which.
pub async fn serve_admin(
    listener: TcpListener,
    routes: Vec<(&'static str, MethodRouter)>,
) -> std::io::Result<()> {
    let bound = listener.local_addr()?;
    let paths: Vec<&str> = routes.iter().map(|(path, _)| *path).collect();
    tracing::info!("serving {} on {bound}", in_words(&paths));
    let app = routes
        .into_iter()
        .fold(Router::new(), |app, (path, handler)| {
            app.route(path, handler)
        });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut refused: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE, ENFILE, ENOMEM, or a connection reset before it was accepted: the
                // listener itself is fine, and retrying at once would spin.
                tracing::debug!("admin server: accept failed: {e}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if refused == 0 {
                tracing::warn!(
                    "admin server: {MAX_CONNECTIONS} connections open; closing new ones until one ends"
                );
            }
            refused += 1;
            drop(stream);
            continue;
        };
        if refused > 0 {
            tracing::info!("admin server: accepting again ({refused} connections closed unserved)");
            refused = 0;
        }
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            // An error is the client's doing (a reset, a bad request, a timeout): nothing to do.
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

/// `/healthz`: the process answers. Readiness (etcd reachable, lease held) is `/readyz`'s
/// business: restarting a process would not bring etcd back.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// A `/metrics` answer: `registry` in the OpenMetrics text format.
pub fn openmetrics(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        )
            .into_response(),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn in_words(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_as_a_list() {
        assert_eq!(in_words(&["/metrics"]), "/metrics");
        assert_eq!(
            in_words(&["/metrics", "/healthz", "/readyz"]),
            "/metrics, /healthz and /readyz"
        );
    }
}
