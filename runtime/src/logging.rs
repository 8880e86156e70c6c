//! Logging: the `RUST_LOG` filter, text or JSON lines, and where they go.
//!
//! Lines are written by a thread of their own (tracing-appender's non-blocking writer, lossy):
//! the agent's keep-alives run on one thread, and a container log pipe that nobody drains must
//! not stop it, or a healthy node shows Dead when its lease lapses. When the queue is full a line
//! is dropped, not waited for, and counted ([`log_lines_dropped`], which the agent exports).

use std::io::IsTerminal;
use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

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

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 512;

/// The writer thread's guard (dropped by [`flush_logs`]) and its count of dropped lines.
static WRITER: OnceLock<(Mutex<Option<WorkerGuard>>, ErrorCounter)> = OnceLock::new();

/// Log lines dropped since start because the output did not keep up (0 before [`init_logging`]).
pub fn log_lines_dropped() -> u64 {
    WRITER
        .get()
        .map_or(0, |(_, dropped)| dropped.dropped_lines() as u64)
}

/// Writes out the lines still queued and stops the writer thread; lines logged after it are
/// dropped. Call once, as the process ends.
pub fn flush_logs() {
    if let Some((guard, _)) = WRITER.get() {
        drop(guard.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// Sets up logging: `RUST_LOG` filter (default info), text or JSON, colours only on a
/// terminal. `with_module` adds the module path to each line, which tells the controller's many
/// tasks apart.
pub fn init_logging(format: LogFormat, stream: LogStream, with_module: bool) {
    let (filter, rejected) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer");
    let (writer, guard, terminal) = match stream {
        LogStream::Stdout => {
            let (w, g) = builder.finish(std::io::stdout());
            (w, g, std::io::stdout().is_terminal())
        }
        LogStream::Stderr => {
            let (w, g) = builder.finish(std::io::stderr());
            (w, g, std::io::stderr().is_terminal())
        }
    };
    let dropped = writer.error_counter();
    if WRITER.set((Mutex::new(Some(guard)), dropped)).is_err() {
        return;
    }
    let writer = BoxMakeWriter::new(writer);
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
