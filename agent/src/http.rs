//! `/metrics` (Prometheus text), `/healthz` and `/readyz` (ready = heartbeat lease held).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::routing::get;
use nodepulse_runtime::{healthz, openmetrics, serve_admin};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::metrics::AgentMetrics;

async fn readyz(metrics: Arc<AgentMetrics>) -> (StatusCode, &'static str) {
    if metrics.lease_held() {
        (StatusCode::OK, "ok: heartbeat lease held\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no heartbeat lease held\n",
        )
    }
}

/// Binds the listener now, so that a taken port fails the start rather than later.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    registry: Registry,
) {
    let registry = Arc::new(registry);
    let routes = vec![
        (
            "/metrics",
            get(move || std::future::ready(openmetrics(&registry))),
        ),
        ("/healthz", get(healthz)),
        ("/readyz", get(move || readyz(metrics.clone()))),
    ];
    if let Err(e) = serve_admin(listener, routes).await {
        tracing::error!("metrics endpoint stopped: {e}");
    }
}
