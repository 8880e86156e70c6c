//! The controller's one error type.

use std::time::Duration;

/// Everything that can go wrong in the controller, with what it was doing at the time.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The etcd connection could not even be set up (bad TLS files or flags).
    #[error("etcd: {0}")]
    EtcdConnect(#[from] nodepulse_etcd::ConnectError),

    /// An etcd request failed.
    #[error("{action}: {source}")]
    Etcd {
        /// What the controller asked etcd to do.
        action: String,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },

    /// A watch on etcd ended or reported an error; the caller re-lists.
    #[error("watch {prefix}: {reason}")]
    WatchEnded {
        /// The watched prefix.
        prefix: &'static str,
        /// Why it ended (compacted, cancelled, stream closed).
        reason: String,
    },

    /// A Kubernetes API request failed.
    #[error("{action}: {source}")]
    Kube {
        /// What the controller asked the API server to do.
        action: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },

    /// No Kubernetes client configuration could be found.
    #[error("kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    KubeConfig(#[source] kube::Error),

    /// The API server's caches never became ready.
    #[error("waiting for the {0} cache: the watcher stopped")]
    CacheNeverReady(&'static str),

    /// Leader election failed in a way that is not a simple conflict.
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    LeaderElection {
        /// The Lease's namespace.
        namespace: String,
        /// The Lease's name.
        name: String,
        /// The lease manager's error.
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },

    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),

    /// The metrics endpoint could not be served.
    #[error("serve metrics on {addr}: {source}")]
    Metrics {
        /// The listen address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A task the controller cannot run without stopped.
    #[error("{0} stopped unexpectedly")]
    TaskStopped(&'static str),

    /// Some Nodes kept the `NodePulseHeartbeat` condition (each failure is logged).
    #[error("the NodePulseHeartbeat condition could not be removed from {0} Nodes")]
    NodeConditionsLeft(usize),

    /// An operation took longer than allowed.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// The operation.
        what: String,
        /// The limit.
        after: Duration,
    },
}

impl Error {
    /// Wraps a kube error with what the controller was doing.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }

    /// Wraps an etcd error with what the controller was doing.
    pub fn etcd(action: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Error {
        let action = action.into();
        move |source| Error::Etcd { action, source }
    }
}

/// The controller's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
