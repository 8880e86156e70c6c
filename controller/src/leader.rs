//! Leader election over a `coordination.k8s.io/v1` Lease (kube-lease-manager): only the replica
//! holding the Lease runs the reconcilers, so two replicas never write at once.
//!
//! kube-lease-manager keeps saying "leader" while its renewals fail for any reason other than a
//! conflict (the API server unreachable, say), and a standby takes the Lease once it expires. So
//! the leader also checks the Lease itself ([`LeaseFence`]) and stops writing before the Lease it
//! last saw renewed can expire: a replica cut off from the API server, but not from etcd, never
//! fights its successor over the config keys with stale caches.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{self, Timestamp};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use nodepulse_runtime::parse_duration;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Name of the Lease the replicas compete for.
pub const LEASE_NAME: &str = "nodepulse-controller";

/// Leader election flags.
#[derive(Clone, Debug, clap::Args)]
pub struct LeaderArgs {
    /// Elect a leader over a Lease so that several replicas can run; `false` for a single
    /// replica that writes at once.
    #[arg(long = "leader-elect", env = "NODEPULSE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,

    /// Namespace of the Lease.
    #[arg(
        long = "leader-election-namespace",
        env = "POD_NAMESPACE",
        default_value = "nodepulse"
    )]
    pub namespace: String,

    /// This replica's identity in the Lease (the pod name; a restarted container keeps it and
    /// so takes its Lease back at once). Defaults to the host name.
    #[arg(long = "leader-election-identity", env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a Lease holds without renewal before another replica may take it.
    #[arg(long = "leader-election-lease-duration", env = "NODEPULSE_LEADER_ELECTION_LEASE_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long before expiry the holder renews (renewals every duration minus this).
    #[arg(long = "leader-election-renew-grace", env = "NODEPULSE_LEADER_ELECTION_RENEW_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub renew_grace: Duration,
}

impl LeaderArgs {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| format!("nodepulse-controller-{}", std::process::id()))
        })
    }
}

/// Runs `work` while this replica leads (at once when election is off). When the Lease is lost
/// the work is dropped, which stops every write, and this replica waits to lead again.
pub async fn run_as_leader<F, Fut>(
    client: Client,
    args: &LeaderArgs,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
    mut work: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    tokio::pin!(shutdown);
    if !args.enabled {
        metrics.leader.set(1);
        return tokio::select! {
            r = work() => r,
            () = &mut shutdown => Ok(()),
        };
    }
    let identity = args.identity();
    let lease_err = |source| Error::LeaderElection {
        namespace: args.namespace.clone(),
        name: LEASE_NAME.into(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), LEASE_NAME)
        .with_namespace(&args.namespace)
        .with_identity(&identity)
        .with_duration(args.lease_duration.as_secs().max(2))
        .with_grace(args.renew_grace.as_secs().max(1))
        .build()
        .await
        .map_err(lease_err)?;
    let (mut leading, mut task) = manager.watch().await;
    tracing::info!(identity, namespace = %args.namespace, lease = LEASE_NAME, "waiting to lead");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.namespace);
    let result = loop {
        let became_leader = async {
            while !*leading.borrow_and_update() {
                leading
                    .changed()
                    .await
                    .map_err(|_| Error::TaskStopped("leader election"))?;
            }
            Ok::<_, Error>(())
        };
        tokio::select! {
            r = became_leader => if let Err(e) = r { break Err(e) },
            () = released(&leases) => {
                // kube-lease-manager's standby sleeps until the holder's last renewal would
                // expire, up to a Lease duration; a Lease released by a graceful stop (a rolling
                // update, a drained node) is free now, so the election starts over and takes it.
                tracing::info!(identity, "the leader released the Lease; taking it");
                drop(leading);
                // Standing by, so there is nothing to release if this fails.
                let manager = match task.await {
                    Ok(Ok(manager)) => manager,
                    Ok(Err(e)) => return Err(lease_err(e)),
                    Err(_) => return Err(Error::TaskStopped("leader election")),
                };
                (leading, task) = manager.watch().await;
                continue;
            }
            () = &mut shutdown => break Ok(()),
        }
        // Write only once the Lease itself says so, with time left on it.
        let mut fence = LeaseFence::new(&client, &args.namespace, &identity, args.lease_duration);
        tokio::select! {
            () = fence.confirm() => {}
            () = &mut shutdown => break Ok(()),
        }
        tracing::info!(identity, "became leader");
        metrics.leader.set(1);
        let lost = async {
            while *leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            r = work() => break r,
            () = lost => {
                metrics.leader.set(0);
                tracing::warn!(identity, "lost the leader Lease; stopped writing, waiting to lead again");
            }
            why = fence.expired() => {
                metrics.leader.set(0);
                tracing::warn!(identity, "{why}; stopped writing, waiting to lead again");
            }
            () = &mut shutdown => break Ok(()),
        }
    };
    // Closing the channel makes the manager release the Lease; a standby sees it free
    // ([`released`]) and takes it at once.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader Lease"),
        Err(_) => tracing::warn!("releasing the leader Lease timed out"),
        _ => {}
    }
    metrics.leader.set(0);
    result
}

/// Returns once the Lease, seen held, is seen free: its holder released it. Pending while the
/// API server does not answer (the election's own retries cover that).
async fn released(leases: &Api<Lease>) {
    let config = watcher::Config::default().fields(&format!("metadata.name={LEASE_NAME}"));
    let mut events = watcher(leases.clone(), config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut held = false;
    while let Some(event) = events.next().await {
        let Ok(lease) = event else { continue };
        let holder = lease.spec.and_then(|s| s.holder_identity);
        if holder.as_deref().is_some_and(|h| !h.is_empty()) {
            held = true;
        } else if held {
            return;
        }
    }
    std::future::pending().await
}

/// The leader's own view of its Lease: the latest renewal it has seen, and so the moment it must
/// stop writing. Times are this replica's clock: the holder writes `renewTime` itself.
struct LeaseFence {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
    /// When to stop: the last renewal seen, plus the Lease duration, less a margin for the
    /// time a write already under way may take.
    until: Timestamp,
}

impl LeaseFence {
    fn new(client: &Client, namespace: &str, identity: &str, duration: Duration) -> Self {
        LeaseFence {
            api: Api::namespaced(client.clone(), namespace),
            identity: identity.to_string(),
            duration,
            until: Timestamp::UNIX_EPOCH,
        }
    }

    /// How often the Lease is read: a few times per Lease duration.
    fn period(&self) -> Duration {
        (self.duration / 6).clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    /// Reads the Lease: `Ok(true)` when we hold it (and `until` moved on), `Ok(false)` when
    /// another replica does, `Err` when the API server did not answer.
    async fn check(&mut self) -> Result<bool, kube::Error> {
        let lease = self.api.get(LEASE_NAME).await?;
        let spec = lease.spec.unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        if let Some(renewed) = spec.renew_time {
            let margin = (self.duration / 10).max(Duration::from_secs(1));
            let left = self.duration.saturating_sub(margin);
            self.until = renewed.0 + jiff::SignedDuration::try_from(left).unwrap_or_default();
        }
        Ok(true)
    }

    /// Returns once the Lease says we hold it with time left.
    async fn confirm(&mut self) {
        loop {
            if matches!(self.check().await, Ok(true)) && Timestamp::now() < self.until {
                return;
            }
            tokio::time::sleep(self.period()).await;
        }
    }

    /// Returns why writing must stop: the Lease is another's, or its last renewal we could see
    /// is about to run out (renewals failing, the API server out of reach).
    async fn expired(&mut self) -> String {
        loop {
            tokio::time::sleep(self.period()).await;
            match tokio::time::timeout(self.period(), self.check()).await {
                Ok(Ok(false)) => return "the leader Lease is held by another replica".into(),
                Ok(Ok(true)) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "read the leader Lease"),
                Err(_) => tracing::debug!("read the leader Lease: no answer"),
            }
            if Timestamp::now() >= self.until {
                return format!(
                    "no renewal of the leader Lease seen for {}s: it may expire before the next one",
                    self.duration.as_secs()
                );
            }
        }
    }
}
