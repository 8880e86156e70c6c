//! The one error type of `nodepulsectl`, and the exit code each kind of failure maps to.

use nodepulse_etcd::ConnectError;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: etcd unreachable, refused a request, or another runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code: bad usage or a value refused by validation; nothing was written.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: what was asked for does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;

/// The exit codes as `--help` documents them (a macro, so that help texts can `concat!` it).
#[macro_export]
macro_rules! exit_codes_help {
    () => {
        "\
Exit codes:
  0  success
  1  etcd unreachable or refused the request, or another runtime error
  2  usage error, or a value refused by validation (nothing was written)
  3  not found (config get: no config key; config set --all: no node has a heartbeat)"
    };
}

/// The exit codes as `--help` documents them.
pub const EXIT_CODES_HELP: &str = exit_codes_help!();

/// Everything that can make a command fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection could not be set up (unreadable TLS file, auth refused, ...).
    #[error(transparent)]
    Connect(#[from] ConnectError),

    /// An etcd request failed.
    #[error("{what}: {source}")]
    Etcd {
        /// What was being done, with the key.
        what: String,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },

    /// etcd did not answer in time.
    #[error("{0}")]
    Unreachable(String),

    /// A flag or argument was refused before anything was written.
    #[error("{0}")]
    Invalid(String),

    /// The key or node asked for does not exist.
    #[error("{0}")]
    NotFound(String),

    /// Writing to stdout failed (usually a closed pipe).
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an etcd-client error with what was being done.
    pub fn etcd(what: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Error {
        let what = what.into();
        move |source| Error::Etcd { what, source }
    }

    /// The process exit code for this error (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Connect(_) | Error::Etcd { .. } | Error::Unreachable(_) | Error::Output(_) => {
                EXIT_RUNTIME
            }
            Error::Invalid(_) => EXIT_USAGE,
            Error::NotFound(_) => EXIT_NOT_FOUND,
        }
    }
}
