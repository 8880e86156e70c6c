//! nodepulse-agent: three jobs at once, each surviving etcd's absence.
//!
//! - [`heartbeat`]: `/monitor/heartbeat/<node>` on a lease kept alive (the node's liveness);
//! - [`config`]: `/monitor/config/<node>` read and watched, applied at once;
//! - [`collect`] and [`sampling`]: figures from `/proc`, one log line per sample;
//! - [`metrics`]: the Prometheus registry; [`http`]: `/metrics`, `/healthz`, `/readyz`;
//! - [`connection`]: the one etcd connection the heartbeat and the config watch share;
//!   [`alarm`]: the deadline timer of the sampling and keep-alive loops.
//!
//! The jobs share the configuration through [`config::SharedConfig`], a reader-writer lock that
//! only the config watcher writes.
#![deny(missing_docs)]

pub mod alarm;
pub mod collect;
pub mod config;
pub mod connection;
pub mod error;
pub mod heartbeat;
pub mod http;
pub mod metrics;
pub mod sampling;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nodepulse_crd::wire::validate_node_name;
use nodepulse_etcd::EtcdArgs;
use nodepulse_runtime::parse_duration;
use nodepulse_runtime::{LogFormat, ShutdownSignals};
use tokio::sync::watch;
use tracing::info;

pub use error::{Error, Result};

/// The agent's flags; each one can also be set through the environment variable named.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "nodepulse-agent",
    version,
    about = "nodepulse's per-node agent: lease heartbeat, live configuration from etcd, /proc metrics"
)]
pub struct Args {
    /// This node's name (default: NODE_NAME, else the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// TTL of the heartbeat lease, in seconds: the node is seen dead this long after the agent dies.
    #[arg(long, env = "NODEPULSE_HEARTBEAT_TTL", default_value = "10", value_parser = parse_ttl)]
    pub heartbeat_ttl: u32,

    /// Shortest time between two rewrites of the heartbeat value, less a twentieth: a rewrite goes
    /// out with a sample that comes that little early rather than on a wake-up of its own
    /// (liveness itself rides on the lease keep-alive).
    #[arg(long, env = "NODEPULSE_HEARTBEAT_MIN_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_min_interval: Duration,

    /// Longest time between two rewrites of the heartbeat value, news or not, so that its
    /// `updatedAt` (a MonitorNode's LAST-HEARTBEAT) stays recent at long sampling intervals.
    #[arg(long, env = "NODEPULSE_HEARTBEAT_MAX_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_max_interval: Duration,

    /// Where the host's proc filesystem is mounted (/host/proc in a pod).
    #[arg(long, env = "NODEPULSE_PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Where the host's root filesystem is mounted, for its usage (/host in a pod).
    #[arg(long, env = "NODEPULSE_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,

    /// Network devices left out of the node's figures (a regular expression; empty: none): the
    /// virtual devices that carry pod traffic a physical interface counts too.
    #[arg(long, env = "NODEPULSE_NETWORK_DEVICE_EXCLUDE", default_value = collect::network::DEFAULT_DEVICE_EXCLUDE, value_parser = collect::network::DeviceFilter::new)]
    pub network_device_exclude: collect::network::DeviceFilter,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "NODEPULSE_METRICS_ADDR", default_value = "0.0.0.0:9101")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "NODEPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

/// Parses a lease TTL: whole seconds, `10` or `10s`, 2 to 300.
pub fn parse_ttl(s: &str) -> Result<u32, String> {
    let d = parse_duration(s)?;
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || !(2..=300).contains(&secs) {
        return Err(format!(
            "{s:?}: the heartbeat TTL must be a whole number of seconds from 2 to 300"
        ));
    }
    Ok(secs as u32)
}

/// The node name: `--node-name` (or `NODE_NAME`), else the hostname, lowercased as the kubelet
/// does.
pub fn node_name(flag: Option<&str>) -> Result<String> {
    let name = match flag {
        Some(n) => n.to_string(),
        None => nix::unistd::gethostname()
            .map_err(Error::Hostname)?
            .to_string_lossy()
            .to_lowercase(),
    };
    validate_node_name(&name).map_err(Error::NodeName)?;
    Ok(name)
}

/// Runs the agent until SIGTERM or SIGINT, then stops cleanly (heartbeat marked Stopping, lease
/// left to expire). Fails only on bad flags or an unusable metrics address, never because etcd is
/// away.
pub async fn run(args: Args) -> Result<()> {
    let node = node_name(args.node_name.as_deref())?;
    // Fail now on unreadable TLS files rather than retrying forever.
    args.etcd.connect_options()?;
    let listener = http::bind(args.metrics_addr).await?;
    let mut signals = ShutdownSignals::install().map_err(Error::Signals)?;

    let (metrics, registry) = metrics::AgentMetrics::new();
    let shared = config::SharedConfig::new(config::AppliedState::default());
    let start = shared.current();
    metrics.set_config(start.revision, start.value.interval);
    info!(
        "agent started: node {node}, interval {}s, metrics {}, heartbeat ttl {}s",
        start.value.interval, start.value.metrics, args.heartbeat_ttl
    );
    info!(
        "etcd {}, proc root {}, host root {}, metrics on http://{}",
        args.etcd.endpoints_display(),
        args.proc_root.display(),
        args.host_root.display(),
        listener.local_addr().unwrap_or(args.metrics_addr)
    );

    let (usage_tx, usage_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler = collect::deadline::TimedSampler::new(
        collect::HostPaths::new(&args.proc_root, &args.host_root)
            .with_net_devices(args.network_device_exclude.clone()),
        collect::deadline::COLLECTOR_DEADLINE,
    );
    let sampling = tokio::spawn(sampling::run(
        sampler,
        shared.clone(),
        usage_tx,
        metrics.clone(),
    ));
    let etcd = connection::EtcdConnection::new(args.etcd.clone());
    let watcher = tokio::spawn(
        config::ConfigWatcher::new(&node, etcd.clone(), shared.clone(), metrics.clone()).run(),
    );
    let server = tokio::spawn(http::serve(listener, metrics.clone(), registry));
    let heartbeat = tokio::spawn(
        heartbeat::HeartbeatLease::new(
            &node,
            args.heartbeat_ttl,
            args.heartbeat_min_interval..=args.heartbeat_max_interval,
            etcd,
            heartbeat::HeartbeatInputs {
                config: shared.clone(),
                usage: usage_rx,
                metrics: metrics.clone(),
            },
        )
        .run(stop_rx),
    );

    let signal_name = signals.recv().await;
    info!("{signal_name} received: stopping");
    sampling.abort();
    watcher.abort();
    let _ = stop_tx.send(true);
    // The heartbeat's stop is bounded by its own timeouts.
    let _ = heartbeat.await;
    server.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_takes_seconds_with_or_without_unit_within_range() {
        assert_eq!(parse_ttl("10"), Ok(10));
        assert_eq!(parse_ttl("3s"), Ok(3));
        assert_eq!(parse_ttl("5m"), Ok(300));
        for bad in ["1", "301", "2.5s", "500ms", "ten"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_name_flag_is_validated() {
        assert_eq!(node_name(Some("worker-1")).unwrap(), "worker-1");
        assert!(node_name(Some("Worker_1")).is_err());
    }
}
