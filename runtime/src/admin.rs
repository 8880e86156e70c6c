//! The `/metrics`, `/healthz` and `/readyz` server of the agent and the controller.

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

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
    axum::serve(listener, app).await
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
