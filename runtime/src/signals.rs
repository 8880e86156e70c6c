//! The shutdown signals every long-running binary stops on.

use tokio::signal::unix::{Signal, SignalKind, signal};

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
