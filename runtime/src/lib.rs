//! What every nodepulse binary shares at start-up and while it runs, apart from etcd: logging,
//! the shutdown signals, durations on the command line, retry backoff and (feature `admin`) the
//! `/metrics`, `/healthz` and `/readyz` server. The agent, the controller and `nodepulsectl`
//! start the same way, as kubert gives linkerd's controllers one start-up.
#![deny(missing_docs)]

#[cfg(feature = "admin")]
pub mod admin;
pub mod backoff;
pub mod duration;
pub mod logging;
pub mod signals;

#[cfg(feature = "admin")]
pub use admin::{healthz, openmetrics, serve_admin};
pub use backoff::Backoff;
pub use duration::parse_duration;
pub use logging::{LogFormat, LogStream, flush_logs, init_logging, log_filter, log_lines_dropped};
pub use signals::ShutdownSignals;
