//! The heartbeat key `/monitor/heartbeat/<node>`, bound to a lease we keep alive.
//!
//! Liveness rides on the lease keep-alive, which costs etcd almost nothing; the key's value is
//! rewritten only when it has something new to say, and at most every `--heartbeat-min-interval`;
//! with nothing new, every `--heartbeat-max-interval` all the same, so that its `updatedAt` says
//! the agent is there even at an hour's sampling interval.
//! Renewals never wait for a value write: a put stuck behind a slow etcd disk runs beside them.
//! Each sample wakes the heartbeat too: a keep-alive due before the next sample, and a rewrite
//! due within a twentieth of the minimum interval, go out then, so that at short sampling
//! intervals neither wakes the agent on its own.
//!
//! A clean stop does not revoke the lease: it marks the value Stopping and lets the lease run out.
//! An agent replaced within the TTL (a rolling update, a deleted pod) takes the key over on a
//! lease of its own before the old one expires, so its node never shows Dead; an agent that does
//! not come back leaves its node Dead (agent stopped) one TTL later.

use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    PutResponse, Txn, TxnOp, WatchStream,
};
use jiff::Timestamp;
use nodepulse_crd::wire::{AgentState, Heartbeat, UsageSummary, heartbeat_key};
use nodepulse_runtime::Backoff;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

use crate::alarm::Alarm;
use crate::config::SharedConfig;
use crate::connection::EtcdConnection;
use crate::error::{Error, Result};
use crate::metrics::AgentMetrics;

/// How long one etcd call may take before we treat the connection as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the Stopping write of a clean stop may take: a stop must not hang on a dead etcd.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a keep-alive answer may still come once the member looks hung.
const HUNG_GRACE: Duration = Duration::from_millis(200);

/// A value write in flight: the value (with `updated_at` cleared) and etcd's answer.
type PendingPut =
    Pin<Box<dyn Future<Output = (Heartbeat, Result<PutResponse, etcd_client::Error>)> + Send>>;

/// Whether etcd answered that the lease does not exist (expired or revoked).
fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => status.code() == tonic::Code::NotFound,
        // etcd answers a keep-alive on a missing lease with TTL 0, not a status; etcd-client
        // turns that into this error, whose text is all there is to match.
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        _ => false,
    }
}

/// Retries after an etcd failure: doubling from 100 ms up to a third of the TTL (at most 5 s),
/// like the keep-alives. etcd resets a lease's TTL when it comes back, so a retry pace slower
/// than that would lose the lease of a short-TTL agent after an outage that etcd survived.
fn retry_backoff(ttl: u32) -> Backoff {
    let third = Duration::from_millis(u64::from(ttl) * 1000 / 3);
    Backoff::new(
        Duration::from_millis(100),
        third.min(Duration::from_secs(5)),
    )
}

/// What the heartbeat job needs from the rest of the agent.
pub struct HeartbeatInputs {
    /// The configuration in force (read only).
    pub config: Arc<SharedConfig>,
    /// The latest usage summary, from the sampler.
    pub usage: watch::Receiver<Option<UsageSummary>>,
    /// The agent's own metrics.
    pub metrics: Arc<AgentMetrics>,
}

/// Keeps `/monitor/heartbeat/<node>` alive through a lease, and marks it Stopping on a clean stop.
pub struct HeartbeatLease {
    node: String,
    key: String,
    ttl: u32,
    /// Value rewrites: at most every `start()` (news waits), at least every `end()` (no news).
    rewrite: RangeInclusive<Duration>,
    etcd: EtcdConnection,
    inputs: HeartbeatInputs,
    started_at: Timestamp,
    client: Option<Client>,
    /// The lease we hold (or held before etcd went away).
    lease: Option<i64>,
    /// Set when the previous lease is known to be gone, so the next grant is logged as a re-grant.
    lease_lost: bool,
    /// The last value written, with `updated_at` cleared, to tell whether there is news.
    last_written: Option<Heartbeat>,
    last_write_at: Option<Instant>,
    /// The start of a newer agent for this node that holds the key on a lease of its own (a
    /// rolling update with surge, a pod replaced while this one stops): this one stops writing
    /// the key so that the two do not move it back and forth between their leases.
    superseded_by: Option<Timestamp>,
    outage: bool,
    backoff: Backoff,
}

impl HeartbeatLease {
    /// A heartbeat for `node` with a lease of `ttl` seconds, its value rewritten within the
    /// `rewrite` range of intervals.
    pub fn new(
        node: &str,
        ttl: u32,
        rewrite: RangeInclusive<Duration>,
        etcd: EtcdConnection,
        inputs: HeartbeatInputs,
    ) -> Self {
        HeartbeatLease {
            node: node.to_string(),
            key: heartbeat_key(node),
            ttl,
            rewrite,
            etcd,
            inputs,
            started_at: Timestamp::now(),
            client: None,
            lease: None,
            lease_lost: false,
            last_written: None,
            last_write_at: None,
            superseded_by: None,
            outage: false,
            backoff: retry_backoff(ttl),
        }
    }

    /// Keeps the heartbeat alive until `stop` turns true, then marks the value Stopping and
    /// leaves the lease to expire. etcd being away is waited out, never an error.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            _ = self.keep_alive_forever() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        self.stop().await;
    }

    async fn keep_alive_forever(&mut self) {
        let client = self.etcd.client().await;
        self.client = Some(client.clone());
        loop {
            let mut client = client.clone();
            let end = self.session(&mut client).await;
            self.inputs.metrics.set_lease_held(false);
            match end {
                Error::LeaseLost(_) => {
                    // Granted again right away: the node must not look dead longer than needed.
                    self.lease = None;
                    self.lease_lost = true;
                }
                e => {
                    self.inputs.metrics.heartbeat_failures.inc();
                    if !self.outage {
                        warn!("heartbeat: {e}; retrying while sampling goes on");
                        self.outage = true;
                    }
                    self.backoff.wait().await;
                }
            }
        }
    }

    /// One stretch of holding the lease: establish it, then keep it alive and rewrite the value
    /// when there is news. Returns why it ended.
    async fn session(&mut self, client: &mut Client) -> Error {
        // The member this session's streams go to, to leave it if it hangs.
        let member = self.etcd.member_in_use();
        let (mut keeper, mut stream, mut own_key) = match self.establish(client).await {
            Ok(k) => k,
            Err(e) => {
                if let (Error::Timeout { .. }, Some(m)) = (&e, member) {
                    // A call that went unanswered that long: the member may be hung.
                    self.etcd.leave_member(m);
                }
                return e;
            }
        };
        self.inputs.metrics.set_lease_held(true);
        self.outage = false;
        self.backoff.reset();

        let mut config_changed = self.inputs.config.subscribe();
        let mut usage = self.inputs.usage.clone();
        // A third of the TTL: two keep-alives may be lost before the lease expires.
        let every = Duration::from_millis(u64::from(self.ttl) * 1000 / 3);
        let ttl = Duration::from_secs(self.ttl.into());
        // A keep-alive still unanswered a whole `every` after it went out: the member may be
        // hung (a hung member fails no request, and an HTTP/2 ping notices it only after the
        // lease would have run out), and is left while the lease has a third of its TTL to run,
        // unless an answer comes within `HUNG_GRACE` more (one that arrived while this task
        // waited for the thread is read first). The deadline is set once a second keep-alive
        // goes out unanswered, early with a sample or not.
        let mut unanswered_since: Option<Instant> = None;
        let mut hung_at: Option<Instant> = None;
        let mut next_keep_alive = Instant::now() + every;
        // A keep-alive due before the next sample, or a value write due within `rewrite_slack`,
        // goes out with the sample instead of waking the thread on its own; a write's own alarm
        // waits that much longer, so that the sample due with it comes first.
        let rewrite_slack = *self.rewrite.start() / 20;
        let (mut keep_alive_alarm, mut rewrite_alarm) = (Alarm::new(), Alarm::new());
        let mut last_ack = Instant::now();
        // The key goes on the new (or resumed) lease at once.
        self.last_written = None;
        self.last_write_at = None;
        let mut pending = true;
        let mut put: Option<PendingPut> = None;
        let (mut config_open, mut usage_open) = (true, true);
        loop {
            let (mut renew, mut write) = (false, false);
            // News waits for the shortest rewrite interval; no news, for the longest.
            let rewrite_after = if pending {
                self.rewrite.start()
            } else {
                self.rewrite.end()
            };
            let rewrite_at = self
                .last_write_at
                .map_or_else(Instant::now, |t| t + *rewrite_after + rewrite_slack);
            tokio::select! {
                // Answers first: the hung-member deadline must not win over one already here.
                biased;
                msg = stream.message() => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        last_ack = Instant::now();
                        unanswered_since = None;
                        hung_at = None;
                    }
                    Ok(Some(_)) => return Error::LeaseLost(keeper.id()),
                    Ok(None) => return Error::StreamEnded(format!(
                        "keep-alive stream of lease {:x} closed by etcd", keeper.id()
                    )),
                    Err(source) => return Error::Etcd {
                        what: format!("keep lease {:x} alive", keeper.id()), source
                    },
                },
                _ = keep_alive_alarm.sleep_until(next_keep_alive) => renew = true,
                _ = tokio::time::sleep_until(hung_at.unwrap_or_else(Instant::now)), if hung_at.is_some() => {
                    if let Some(m) = member {
                        self.etcd.leave_member(m);
                    }
                    return Error::StreamEnded(format!(
                        "no keep-alive answer for lease {:x} in {:.1}s; trying the next etcd member",
                        keeper.id(), last_ack.elapsed().as_secs_f64()
                    ));
                }
                msg = own_key.message() => match msg {
                    Ok(Some(r)) => {
                        for e in r.events() {
                            let Some(kv) = e.kv() else { continue };
                            if e.event_type() == EventType::Delete {
                                // Deleted by hand, or a newer agent's lease expired: while our
                                // lease lives, the node is alive; put the key back now.
                                warn!("heartbeat: {} was deleted while lease {:x} lives; writing it again", self.key, keeper.id());
                                self.superseded_by = None;
                                self.last_written = None;
                                self.last_write_at = None;
                                pending = true;
                            } else if kv.lease() != keeper.id() && self.notice_other_agent(kv.value()) {
                                // An older agent wrote over ours: take the key back now.
                                self.last_written = None;
                                pending = true;
                            }
                        }
                    }
                    Ok(None) => return Error::StreamEnded(format!("watch on {} closed by etcd", self.key)),
                    Err(source) => return Error::Etcd { what: format!("watch {}", self.key), source },
                },
                r = config_changed.changed(), if config_open => {
                    config_open = r.is_ok();
                    pending = true;
                }
                r = usage.changed(), if usage_open => {
                    usage_open = r.is_ok();
                    pending = true;
                    let now = Instant::now();
                    renew = next_keep_alive <= now + self.inputs.config.interval().min(every / 2);
                    write = self.last_write_at.is_none_or(|t| t + *self.rewrite.start() <= now + rewrite_slack);
                }
                _ = rewrite_alarm.sleep_until(rewrite_at), if put.is_none() && self.superseded_by.is_none() => {
                    if !pending {
                        // Nothing new for a while: the same value with a fresh `updatedAt`.
                        self.last_written = None;
                        pending = true;
                    }
                    write = true;
                }
                (value, result) = async { put.as_mut().expect("guarded by is_some").await }, if put.is_some() => {
                    put = None;
                    match result {
                        Ok(_) => self.last_written = Some(value),
                        Err(e) if is_lease_not_found(&e) => return Error::LeaseLost(keeper.id()),
                        Err(e) => {
                            // The lease is what keeps the node alive; the value is tried again
                            // after the usual pause, and the keep-alives tell whether etcd is gone.
                            debug!("heartbeat: put {} failed: {e}; trying again", self.key);
                            self.last_write_at = Some(Instant::now());
                            pending = true;
                        }
                    }
                }
            }
            if renew {
                let now = Instant::now();
                // Early with a sample: the next one a whole `every` later; late (a busy
                // thread): on the original schedule.
                next_keep_alive = next_keep_alive.min(now) + every;
                if last_ack.elapsed() > ttl {
                    return Error::StreamEnded(format!(
                        "no keep-alive answer for lease {:x} within its ttl",
                        keeper.id()
                    ));
                }
                if let (None, Some(_), Some(since)) = (hung_at, member, unanswered_since) {
                    hung_at = Some(since + every + HUNG_GRACE);
                }
                unanswered_since.get_or_insert(now);
                match timeout(CALL_TIMEOUT, keeper.keep_alive()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(source)) => {
                        return Error::Etcd {
                            what: format!("keep lease {:x} alive", keeper.id()),
                            source,
                        };
                    }
                    Err(_) => {
                        return Error::Timeout {
                            what: format!("keep lease {:x} alive", keeper.id()),
                            after: CALL_TIMEOUT,
                        };
                    }
                }
            }
            if write && put.is_none() && self.superseded_by.is_none() {
                pending = false;
                put = self.start_put(client, AgentState::Running);
                if put.is_some() {
                    // Rewrites are spaced from start to start, as samples are.
                    self.last_write_at = Some(Instant::now());
                    rewrite_alarm.disarm();
                }
            }
        }
    }

    /// Gets a live lease: the one we held if etcd still has it, else a new one. Returns its
    /// keep-alive stream and a watch on our key (to repair a key deleted by hand). The value is
    /// written by the caller, beside the keep-alives.
    async fn establish(
        &mut self,
        client: &mut Client,
    ) -> Result<(LeaseKeeper, LeaseKeepAliveStream, WatchStream)> {
        let watch = timeout(CALL_TIMEOUT, client.watch(self.key.as_str(), None))
            .await
            .map_err(|_| Error::Timeout {
                what: format!("watch {}", self.key),
                after: CALL_TIMEOUT,
            })?
            .map_err(|source| Error::Etcd {
                what: format!("watch {}", self.key),
                source,
            })?;
        if let Some(id) = self.lease {
            match timeout(CALL_TIMEOUT, client.lease_keep_alive(id)).await {
                Ok(Ok((keeper, stream))) => {
                    info!("heartbeat resumed: lease {id:x} still alive");
                    return Ok((keeper, stream, watch));
                }
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    self.lease = None;
                    self.lease_lost = true;
                }
                Ok(Err(source)) => {
                    return Err(Error::Etcd {
                        what: format!("keep lease {id:x} alive"),
                        source,
                    });
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("keep lease {id:x} alive"),
                        after: CALL_TIMEOUT,
                    });
                }
            }
        }
        let what = format!("grant a {}s lease", self.ttl);
        let granted = timeout(CALL_TIMEOUT, client.lease_grant(self.ttl.into(), None))
            .await
            .map_err(|_| Error::Timeout {
                what: what.clone(),
                after: CALL_TIMEOUT,
            })?
            .map_err(|source| Error::Etcd { what, source })?;
        let id = granted.id();
        self.lease = Some(id);
        if self.lease_lost {
            self.inputs.metrics.lease_regrants.inc();
            info!(
                "heartbeat lease lost; granted a new one: id {id:x}, ttl {}s, key {}",
                granted.ttl(),
                self.key
            );
            self.lease_lost = false;
        } else {
            info!("heartbeat lease granted: id {id:x}, ttl {}s", granted.ttl());
        }
        // The keep-alive stream first: the put that attaches the key may be slow.
        let what = format!("keep lease {id:x} alive");
        let (keeper, stream) = timeout(CALL_TIMEOUT, client.lease_keep_alive(id))
            .await
            .map_err(|_| Error::Timeout {
                what: what.clone(),
                after: CALL_TIMEOUT,
            })?
            .map_err(|source| Error::Etcd { what, source })?;
        Ok((keeper, stream, watch))
    }

    /// The value to write now.
    fn value(&self, state: AgentState) -> Heartbeat {
        Heartbeat {
            node: self.node.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            state,
            started_at: self.started_at,
            updated_at: Timestamp::now(),
            ttl_seconds: self.ttl,
            config: self.inputs.config.current().to_wire(),
            usage: self.inputs.usage.borrow().clone(),
        }
    }

    /// Another lease's value appeared on our key: yield to it if its agent started after us.
    /// Returns whether it is an older agent's, whose write should be undone.
    fn notice_other_agent(&mut self, value: &[u8]) -> bool {
        let Ok(other) = Heartbeat::parse(value) else {
            return false;
        };
        if other.started_at > self.started_at {
            if self.superseded_by != Some(other.started_at) {
                info!(
                    "heartbeat: a newer agent (started {}) holds {}; this one stops writing it",
                    other.started_at, self.key
                );
                self.superseded_by = Some(other.started_at);
            }
            return false;
        }
        other.started_at < self.started_at && self.superseded_by.is_none()
    }

    /// Starts putting the value on the lease if it differs from the last one written.
    fn start_put(&self, client: &Client, state: AgentState) -> Option<PendingPut> {
        let lease = self.lease?;
        let value = self.value(state);
        let mut comparable = value.clone();
        comparable.updated_at = self.started_at;
        if self.last_written.as_ref() == Some(&comparable) {
            return None;
        }
        let (mut client, key) = (client.clone(), self.key.clone());
        Some(Box::pin(async move {
            let put = client
                .put(
                    key,
                    value.to_json(),
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await;
            (comparable, put)
        }))
    }

    /// The clean stop: say Stopping in the value, if the key is still on our lease (another
    /// incarnation of this agent may have taken it over already), and leave the lease to expire.
    async fn stop(&mut self) {
        let (Some(client), Some(lease)) = (self.client.clone(), self.lease) else {
            info!("stopping: no heartbeat lease held (etcd unreachable), nothing to mark");
            return;
        };
        let mut client = client;
        let value = self.value(AgentState::Stopping);
        let txn = Txn::new()
            .when([Compare::lease(self.key.as_str(), CompareOp::Equal, lease)])
            .and_then([TxnOp::put(
                self.key.as_str(),
                value.to_json(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let ttl = self.ttl;
        match timeout(STOP_TIMEOUT, client.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => info!(
                "stopping: heartbeat marked stopping; lease {lease:x} expires within {ttl}s unless a new agent takes over"
            ),
            Ok(Ok(_)) => info!(
                "stopping: {} is no longer on lease {lease:x} (taken over or deleted); left as it is",
                self.key
            ),
            Ok(Err(e)) => warn!(
                "stopping: could not mark the heartbeat stopping: {e}; it expires within {ttl}s"
            ),
            Err(_) => warn!(
                "stopping: etcd did not answer within {STOP_TIMEOUT:?}; the heartbeat expires within {ttl}s"
            ),
        }
        self.inputs.metrics.set_lease_held(false);
    }
}
