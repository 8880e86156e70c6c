//! What the agent, the controller and `nodepulsectl` share at start-up: the log format and its
//! set-up, the shutdown signals, and (feature `admin`) the `/metrics`, `/healthz` and `/readyz`
//! server.

use std::io::IsTerminal;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::prelude::*;

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

/// Sets up logging: `RUST_LOG` filter (default info), text or JSON, colours only on a
/// terminal. `with_module` adds the module path to each line, which tells the controller's many
/// tasks apart.
pub fn init_logging(format: LogFormat, stream: LogStream, with_module: bool) {
    let (filter, rejected) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
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
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(with_module)
        .with_ansi(terminal);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
    if let Some(why) = rejected {
        tracing::warn!("{why}");
    }
}

/// The log filter `RUST_LOG` asks for: a default level and `target=level` directives, such as
/// `info,nodepulse_agent=debug` (module paths, as in the log lines; spaces and empty directives
/// are ignored). Span and field filters (`[span]`, `{field}`) are not taken: they would link a
/// regular-expression engine into every binary for a rarely used feature. Unset or empty:
/// `info`. Unreadable: `info`, and the reason to log.
pub fn log_filter(directives: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(LevelFilter::INFO);
    let Some(given) = directives else {
        return (info(), None);
    };
    let kept: Vec<&str> = given
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if kept.is_empty() {
        return (info(), None);
    }
    let unreadable = |why: String| {
        (
            info(),
            Some(format!(
                "RUST_LOG={given:?} is not a list of [target=]level directives ({why}); logging at info"
            )),
        )
    };
    if let Some(d) = kept.iter().find(|d| d.contains(['[', '{', ' '])) {
        return unreadable(format!("{d:?}: span and field filters are not supported"));
    }
    match kept.join(",").parse::<Targets>() {
        Ok(t) => (t, None),
        Err(e) => unreadable(e.to_string()),
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

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    #[test]
    fn log_filter_takes_a_level_and_target_directives() {
        let (t, why) = log_filter(Some("info,nodepulse_agent=debug"));
        assert!(why.is_none());
        assert!(t.would_enable("nodepulse_agent::heartbeat", &Level::DEBUG));
        assert!(!t.would_enable("h2::codec", &Level::DEBUG));
        assert!(t.would_enable("h2::codec", &Level::INFO));

        // Spaces and empty directives are not directives.
        let (t, why) = log_filter(Some("info, nodepulse_agent=debug,"));
        assert!(why.is_none());
        assert!(t.would_enable("nodepulse_agent::heartbeat", &Level::DEBUG));
        assert!(t.would_enable("h2::codec", &Level::INFO));
        assert!(!t.would_enable("h2::codec", &Level::DEBUG));

        for unset in [None, Some(""), Some("  "), Some(" , ")] {
            let (t, why) = log_filter(unset);
            assert!(why.is_none());
            assert!(t.would_enable("nodepulse_agent", &Level::INFO));
            assert!(!t.would_enable("nodepulse_agent", &Level::DEBUG));
        }
    }

    #[test]
    fn an_unreadable_filter_logs_at_info_and_says_why() {
        let (t, why) = log_filter(Some("nodepulse_agent=loud"));
        assert!(t.would_enable("nodepulse_agent", &Level::INFO));
        assert!(!t.would_enable("nodepulse_agent", &Level::DEBUG));
        assert!(why.unwrap().contains("nodepulse_agent=loud"));

        let (t, why) = log_filter(Some("info,nodepulse_agent[heartbeat]=debug"));
        assert!(!t.would_enable("nodepulse_agent", &Level::DEBUG));
        assert!(
            why.unwrap()
                .contains("span and field filters are not supported")
        );
    }
}
