//! How every nodepulse binary reaches etcd: the same flags, the same environment variables and
//! the same keep-alive settings.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use nodepulse_runtime::{Backoff, parse_duration};

use crate::failover::{ActiveMember, FailoverChannel};

/// The HTTP/2 ping period: twice etcd's default `--grpc-keepalive-min-time` (5 s), so that
/// jitter never makes a ping look too early to the server, and grpc-go's own floor for clients.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// etcd connection flags, shared by the agent, the controller and `nodepulsectl`.
///
/// `Debug` is written by hand so that the password never reaches a log line or a panic message.
#[derive(Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (every member of a 3-member cluster, for failover).
    #[arg(
        long = "etcd-endpoints",
        env = "NODEPULSE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,

    /// CA certificate (PEM) that signed etcd's serving certificate; enables TLS.
    #[arg(long = "etcd-ca-file", env = "NODEPULSE_ETCD_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        long = "etcd-cert-file",
        env = "NODEPULSE_ETCD_CERT_FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(
        long = "etcd-key-file",
        env = "NODEPULSE_ETCD_KEY_FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,

    /// etcd user name, when etcd has authentication enabled.
    #[arg(
        long = "etcd-username",
        env = "NODEPULSE_ETCD_USERNAME",
        requires = "password"
    )]
    pub username: Option<String>,

    /// etcd password (prefer the environment variable to the flag: flags show in `ps`).
    #[arg(
        long = "etcd-password",
        env = "NODEPULSE_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,

    /// How long to wait for a TCP/TLS connection to an endpoint.
    #[arg(long = "etcd-dial-timeout", env = "NODEPULSE_ETCD_DIAL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
}

impl std::fmt::Debug for EtcdArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArgs")
            .field("endpoints", &self.endpoints)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dial_timeout", &self.dial_timeout)
            .finish()
    }
}

/// Why a connection could not even be attempted (bad files or flags; etcd being away is not one).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file could not be read.
    #[error("read {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// etcd-client refused the options or could not reach etcd.
    #[error("connect to etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// etcd-client's error.
        #[source]
        source: etcd_client::Error,
    },
}

impl EtcdArgs {
    /// Arguments for a single plain-HTTP endpoint, as tests and the demo use.
    pub fn for_endpoint(endpoint: impl Into<String>) -> Self {
        EtcdArgs {
            endpoints: vec![endpoint.into()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            dial_timeout: Duration::from_secs(5),
        }
    }

    /// The endpoints, as one string for log lines.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    /// Builds etcd-client's options.
    ///
    /// - HTTP/2 keep-alive pings, so that a dead connection (a killed etcd, a cut network) fails
    ///   the streams on it within seconds instead of hanging forever. Every [`KEEP_ALIVE`], and
    ///   only while a stream is open: etcd answers pings more frequent than its
    ///   `--grpc-keepalive-min-time` (5 s by default), or any ping on an idle connection, with a
    ///   GOAWAY after two strikes, which would drop every watch and lease stream on it.
    /// - `require_leader`: a member cut off from its peers fails our streams instead of serving
    ///   a watch that never delivers, so the client moves to a member with a leader.
    pub fn connect_options(&self) -> Result<ConnectOptions, ConnectError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.dial_timeout)
            .with_keep_alive(KEEP_ALIVE, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_tcp_keepalive(Duration::from_secs(10))
            .with_require_leader(true);
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            // etcd's simple tokens live in the server's memory: a restarted member (or one that
            // expired the token) answers "invalid auth token" to the old one forever, so
            // re-authenticate and retry instead of failing every call until our restart.
            opts = opts.with_user(user, password).with_auto_token_refresh(true);
        }
        if self.ca_file.is_some() || self.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }

    /// Connects once. The channel underneath is lazy and talks to one member at a time: it
    /// reconnects by itself and moves to the next member when one is unreachable or has no
    /// leader ([`crate::failover`]).
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        self.connect_to(&ActiveMember::default()).await
    }

    /// [`EtcdArgs::connect`], with the caller holding the member its requests go to.
    pub async fn connect_to(&self, member: &ActiveMember) -> Result<Client, ConnectError> {
        let opts = self.connect_options()?;
        Client::connect_with_balanced_channel(
            &self.endpoints,
            Some(opts),
            FailoverChannel(member.clone()),
        )
        .await
        .map_err(|source| ConnectError::Etcd {
            endpoints: self.endpoints_display(),
            source,
        })
    }

    /// Connects, retrying with backoff for as long as it takes: etcd being away (or refusing a
    /// login until it is back) is never a reason for a long-running loop to stop. Warns once, as
    /// `<job>: <error>; retrying`. Call [`EtcdArgs::connect_options`] first to fail at once on
    /// unreadable TLS files.
    pub async fn connect_retrying(&self, job: &str) -> Client {
        self.connect_retrying_to(job, &ActiveMember::default())
            .await
    }

    /// [`EtcdArgs::connect_retrying`], with the caller holding the member its requests go to.
    pub async fn connect_retrying_to(&self, job: &str, member: &ActiveMember) -> Client {
        let mut backoff = Backoff::default();
        let mut warned = false;
        loop {
            match self.connect_to(member).await {
                Ok(client) => return client,
                Err(e) => {
                    if !warned {
                        tracing::warn!("{job}: {e}; retrying");
                        warned = true;
                    }
                    backoff.wait().await;
                }
            }
        }
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|source| ConnectError::ReadFile {
        path: path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_the_password() {
        let mut args = EtcdArgs::for_endpoint("http://127.0.0.1:2379");
        args.username = Some("nodepulse-agent".into());
        args.password = Some("hunter2-secret".into());
        let debug = format!("{args:?} {args:#?}");
        assert!(!debug.contains("hunter2-secret"), "{debug}");
        assert!(
            debug.contains("<redacted>") && debug.contains("nodepulse-agent"),
            "{debug}"
        );
    }
}
