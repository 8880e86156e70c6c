//! What the agent, the controller and `nodepulsectl` share at start-up: the log format and its
//! set-up, the shutdown signals, and (feature `admin`) the `/metrics`, `/healthz` and `/readyz`
//! server.

use std::io::IsTerminal;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Where log lines go: a daemon's output is its log; a command keeps stdout for its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output (the agent and the controller).
    Stdout,
    /// Standard error (`nodepulsectl`).
    Stderr,
}

/// Sets up logging: `RUST_LOG`-style filter (default info), text or JSON, colours only on a
/// terminal. `with_module` adds the module path to each line, which tells the controller's many
/// tasks apart.
pub fn init_logging(format: LogFormat, stream: LogStream, with_module: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, terminal) = match stream {
        LogStream::Stdout => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
        ),
        LogStream::Stderr => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(with_module)
        .with_ansi(terminal);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGTERM (how Kubernetes stops a pod) and SIGINT (Ctrl-C), caught from the moment they are
/// installed, so that one arriving during start-up still stops the process cleanly.
#[derive(Debug)]
pub struct ShutdownSignals {
    term: Signal,
    int: Signal,
}

impl ShutdownSignals {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first of them, and names it for the log line.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(feature = "admin")]
pub use admin::{healthz, openmetrics, serve_admin};

#[cfg(feature = "admin")]
mod admin {
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
    /// person, `hack/demo.sh` or a test learns which.
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
}
