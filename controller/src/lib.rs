//! nodepulse-controller: heartbeats in etcd into MonitorNode status, MonitorConfigs into etcd
//! config keys. Two halves, each a pipeline in one direction, sharing only what both read:
//!
//! - [`status`]: heartbeats -> liveness -> record -> render -> writer -> apply, with the
//!   transitions' Events and the Node condition;
//! - [`config`]: MonitorConfigs -> which one wins each node -> the `/monitor/config/<node>` keys,
//!   and the desired configs the status half judges applied configs against;
//! - shared: [`inventory`] (the Node and MonitorNode caches), [`leader`] (Lease-based leader
//!   election), [`metrics`] (`/metrics`, `/healthz`, `/readyz`), [`error`];
//! - [`removal`]: `--on-uninstall`, the chart's pre-delete hook.
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod removal;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc as futures_mpsc;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::watcher::{self, watcher};
use nodepulse_crd::v1alpha1::MonitorConfig;
use nodepulse_etcd::EtcdArgs;
use nodepulse_runtime::parse_duration;
use nodepulse_runtime::{LogFormat, ShutdownSignals};
use tokio::sync::{mpsc, watch};

pub use error::{Error, Result};

use crate::config::DesiredConfigs;
use crate::config::keys::ConfigKeys;
use crate::inventory::{Inventory, StoreReady};
use crate::leader::LeaderArgs;
use crate::metrics::Metrics;
use crate::status::elections::ElectionWatcher;
use crate::status::heartbeats::{HeartbeatWatcher, WithoutNode};
use crate::status::liveness::DisruptionBrake;
use crate::status::node_condition::NodeConditions;
use crate::status::tracker::LivenessTracker;
use crate::status::writer::{StatusSettings, StatusWriter};

/// A share from 0 to 1.
fn parse_share(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share from 0 to 1, such as 0.55")),
    }
}

/// The one field manager of every write the controller makes.
pub const FIELD_MANAGER: &str = "nodepulse-controller";

/// nodepulse-controller: node liveness from etcd heartbeats into MonitorNode status, and
/// MonitorConfigs into etcd config keys.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "nodepulse-controller", version, about, long_about = None)]
pub struct Args {
    /// etcd connection.
    #[command(flatten)]
    pub etcd: EtcdArgs,

    /// Leader election.
    #[command(flatten)]
    pub leader: LeaderArgs,

    /// Least time between two status writes of one node that only refresh its usage figures
    /// (transitions and config changes are written at once). Figures that moved by less than
    /// one point wait ten times as long. Longer while the API server does not keep up, and no
    /// refresh while transitions are being written.
    #[arg(long, env = "NODEPULSE_USAGE_WRITE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub usage_write_interval: Duration,

    /// Most MonitorNode status writes in flight at once.
    #[arg(long, env = "NODEPULSE_MAX_CONCURRENT_WRITES", default_value_t = 32)]
    pub max_concurrent_writes: usize,

    /// When more than this share (0 to 1) of a zone's or of the fleet's live nodes lose their
    /// heartbeat within one TTL, they are Unknown (MassDisruption), not Dead: a network or etcd
    /// fault is likelier than so many deaths. 1 turns the brake off.
    #[arg(long, env = "NODEPULSE_DISRUPTION_THRESHOLD", default_value_t = 0.55, value_parser = parse_share)]
    pub disruption_threshold: f64,

    /// The fewest lost nodes that make a mass disruption: fewer are deaths, whatever their
    /// share (a small cluster's).
    #[arg(long, env = "NODEPULSE_DISRUPTION_MIN_NODES", default_value_t = 3)]
    pub disruption_min_nodes: usize,

    /// Most names with no Node object whose heartbeats count (and get a MonitorNode): more are
    /// rejected (`no_node`), so that keys written under made-up names cannot fill the API
    /// server. Agents on Kubernetes nodes need none; raise it for agents on machines outside
    /// the cluster.
    #[arg(
        long,
        env = "NODEPULSE_MAX_HEARTBEATS_WITHOUT_NODE",
        default_value_t = 100
    )]
    pub max_heartbeats_without_node: usize,

    /// How long the MonitorNode of a name with no Node object stays once its node is Dead (its
    /// heartbeat gone); then it is deleted, as a Node's goes with its Node.
    #[arg(long, env = "NODEPULSE_DELETE_WITHOUT_NODE_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub delete_without_node_after: Duration,

    /// How often the config keys are checked against the MonitorConfigs even if nothing
    /// signalled a change.
    #[arg(long, env = "NODEPULSE_CONFIG_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub config_resync: Duration,

    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, env = "NODEPULSE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "NODEPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Set the `NodePulseHeartbeat` condition on each Node object, as Node Problem Detector
    /// sets its own: True, False or Unknown for Alive, Dead or Unknown, with the MonitorNode's
    /// reason and message. Needs `patch` on `nodes/status`.
    #[arg(long, env = "NODEPULSE_NODE_CONDITION")]
    pub node_condition: bool,

    /// Remove the `NodePulseHeartbeat` condition from every Node, then exit; with
    /// `--on-uninstall`, once the controller has stopped.
    #[arg(long)]
    pub remove_node_condition: bool,

    /// Run as the chart's pre-delete hook, then exit: scale the Deployment `--deployment-name`
    /// (in the leader-election namespace) to zero, wait until no replica holds the Lease, and
    /// mark every MonitorNode Unknown (ControllerRemoved), since nothing will update them.
    #[arg(long, requires = "deployment_name")]
    pub on_uninstall: bool,

    /// The controller's own Deployment, for `--on-uninstall`.
    #[arg(long, env = "NODEPULSE_DEPLOYMENT_NAME")]
    pub deployment_name: Option<String>,

    /// With `--on-uninstall`: mark every MonitorNode Unknown (ControllerRemoved) once the
    /// controller has stopped (true or false).
    #[arg(long, value_name = "ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub mark_unknown: bool,
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: Args) -> Result<()> {
    if args.on_uninstall || args.remove_node_condition {
        let client = Client::try_default().await.map_err(Error::KubeConfig)?;
        if let (true, Some(deployment)) = (args.on_uninstall, &args.deployment_name) {
            removal::run_on_uninstall(
                &client,
                &args.leader.namespace,
                deployment,
                args.leader.lease_duration,
                args.mark_unknown,
            )
            .await;
        }
        if args.remove_node_condition {
            let removed = removal::remove_node_conditions(&client).await;
            // The pre-delete hook never fails an uninstall; alone, a failure shows.
            if !args.on_uninstall {
                return removed;
            }
        }
        return Ok(());
    }
    let mut signals = ShutdownSignals::install().map_err(Error::Signals)?;
    let metrics = Arc::new(Metrics::default());
    let ready = metrics::EtcdReadiness::default();
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| Error::Metrics {
            addr: args.metrics_addr,
            source,
        })?;
    let serve = tokio::spawn(metrics::serve(listener, metrics.clone(), ready.clone()));
    let client = Client::try_default().await.map_err(Error::KubeConfig)?;
    let etcd = args.etcd.connect().await?;
    ready.set(etcd.clone());
    tracing::info!(
        etcd = %args.etcd.endpoints_display(),
        version = env!("CARGO_PKG_VERSION"),
        "nodepulse-controller starting"
    );
    let work = || run_reconcilers(client.clone(), etcd.clone(), &args, metrics.clone());
    let shutdown = async move {
        signals.recv().await;
        tracing::info!("shutting down");
    };
    let result = tokio::select! {
        r = leader::run_as_leader(client.clone(), &args.leader, metrics.clone(), shutdown, work) => r,
        r = serve => match r {
            Ok(Err(source)) => Err(Error::Metrics { addr: args.metrics_addr, source }),
            _ => Err(Error::TaskStopped("metrics server")),
        },
    };
    tracing::info!("nodepulse-controller stopped");
    result
}

/// Everything only the leader runs: the heartbeat watch and status writer, the MonitorConfig
/// controller and the config key sync. Returns only on a fatal error.
async fn run_reconcilers(
    client: Client,
    etcd: etcd_client::Client,
    args: &Args,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let (inventory, drivers) = Inventory::new(&client);
    let (desired_tx, desired_rx) = watch::channel(DesiredConfigs::None);
    // The MonitorConfig cache, and its readiness told by the reflector's own end of the first
    // list: the Controller already waits on the store itself (see `StoreReady`).
    let (configs, configs_writer) = reflector::store();
    let (configs_ready, configs_ready_rx) = watch::channel(false);
    let config_events = reflector(
        configs_writer,
        watcher(
            Api::<MonitorConfig>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    )
    .inspect(move |event| {
        if matches!(event, Ok(watcher::Event::InitDone)) {
            let _ = configs_ready.send(true);
        }
    });
    let controller = Controller::for_stream(config_events.applied_objects(), configs.clone());
    let keys = Arc::new(ConfigKeys::new(
        etcd.clone(),
        inventory.clone(),
        configs,
        StoreReady::from(configs_ready_rx),
        metrics.clone(),
        desired_tx,
    ));
    let (refresh_tx, refresh_rx) = futures_mpsc::unbounded();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: args.leader.identity.clone(),
        },
    );
    let (events_tx, events_rx) = mpsc::channel(4096);
    let (elections_tx, elections_rx) = mpsc::channel(4096);
    let (doubted_tx, doubted_rx) = tokio::sync::watch::channel(Default::default());
    let node_conditions = match args.node_condition {
        true => Some(NodeConditions::load(client.clone(), args.usage_write_interval).await),
        false => None,
    };
    let tracker = LivenessTracker::new(
        StatusWriter::new(
            client.clone(),
            recorder,
            inventory.clone(),
            metrics.clone(),
            desired_rx,
            StatusSettings {
                usage_write_interval: args.usage_write_interval,
                max_concurrent_writes: args.max_concurrent_writes,
                node_conditions,
            },
        ),
        DisruptionBrake {
            threshold: args.disruption_threshold,
            min_nodes: args.disruption_min_nodes,
        },
        doubted_tx,
    );
    // Owner references need the Node cache; liveness does not wait long for it.
    let ready = inventory.clone();
    let rejected = metrics.heartbeats_rejected.clone();
    let elections = ElectionWatcher::new(etcd.clone(), elections_tx, doubted_rx);
    let without_node = WithoutNode::new(inventory.clone(), args.max_heartbeats_without_node);
    let liveness = async move {
        if tokio::time::timeout(Duration::from_secs(5), ready.wait_until_ready())
            .await
            .is_err()
        {
            tracing::warn!("Node/MonitorNode caches not ready after 5s; starting liveness anyway");
        }
        tokio::select! {
            r = tracker.run(events_rx, elections_rx) => r,
            () = elections.run() => Err(Error::TaskStopped("etcd election watcher")),
            () = HeartbeatWatcher::new(etcd, events_tx, rejected, without_node).run() => Err(Error::TaskStopped("heartbeat watcher")),
        }
    };
    tokio::select! {
        r = liveness => r,
        () = drivers.run() => Err(Error::TaskStopped("Node/MonitorNode watches")),
        () = config::reconciler::run(controller, client.clone(), keys.clone(), metrics.clone(), refresh_rx) => Err(Error::TaskStopped("MonitorConfig controller")),
        r = keys.clone().run_sync_loop(refresh_tx, args.config_resync) => r,
        r = keys.clone().watch_keys() => r,
        () = status::orphans::run(Api::all(client.clone()), inventory.clone(), args.delete_without_node_after) => Err(Error::TaskStopped("MonitorNode clean-up")),
    }
}
