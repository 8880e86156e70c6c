//! The agent's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in the agent, with the context a reader needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file under the proc root could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A /proc file did not parse.
    #[error("parse {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// procfs's error.
        #[source]
        source: procfs::ProcError,
    },
    /// statvfs on the host root failed.
    #[error("statvfs {path}: {source}")]
    Statvfs {
        /// The mount point.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// A collector did not answer within its deadline (a statvfs on a hung NFS or FUSE mount, a
    /// /proc read stuck in the kernel); it is not started again until it answers.
    #[error(
        "no answer within {after:?} (a hung mount or /proc read?); not started again until it answers"
    )]
    CollectorTimeout {
        /// The deadline.
        after: std::time::Duration,
    },
    /// A collector panicked (a bug); it starts afresh, with no previous counters, next time.
    #[error("panicked (a bug); started afresh")]
    CollectorPanicked,
    /// The node name is not usable as an etcd key and a Kubernetes object name.
    #[error("node name: {0}")]
    NodeName(String),
    /// The hostname could not be read (and neither --node-name nor NODE_NAME was given).
    #[error("read the hostname (set --node-name or NODE_NAME): {0}")]
    Hostname(#[source] nix::errno::Errno),
    /// The etcd flags are unusable (a TLS file is missing, ...).
    #[error(transparent)]
    EtcdSetup(#[from] nodepulse_etcd::ConnectError),
    /// An etcd call failed.
    #[error("{what}: {source}")]
    Etcd {
        /// What was being done ("grant a lease", "watch /monitor/config/x from revision 4").
        what: String,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd call did not answer in time.
    #[error("{what}: no answer within {after:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// How long we waited.
        after: std::time::Duration,
    },
    /// etcd ended a stream (a watch canceled, a keep-alive stream closed).
    #[error("{0}")]
    StreamEnded(String),
    /// The lease is gone on the server (expired or revoked).
    #[error("lease {0:x} expired or was revoked")]
    LeaseLost(i64),
    /// The metrics endpoint could not listen.
    #[error("listen on {addr} for /metrics: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// The agent's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
