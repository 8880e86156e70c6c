//! The heartbeat's I/O around [`crate::heartbeat::state`]: the etcd calls, the alarms, the
//! value, the logs and the metrics. Every decision is the rules'; this task feeds them what etcd
//! and the clock say, and does what they decide.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    PutResponse, Txn, TxnOp, WatchStream,
};
use jiff::Timestamp;
use nodepulse_crd::wire::{AgentState, Heartbeat, UsageSummary, heartbeat_key};
use tokio::sync::watch;
use tokio::time::timeout;
use tracing::{debug, info, warn};

use crate::alarm::Alarm;
use crate::config::SharedConfig;
use crate::connection::EtcdConnection;
use crate::error::{Error, Result};
use crate::heartbeat::state::{
    Decisions, Event, HeartbeatState, LeaseRequest, SessionEnd, Transition,
};
use crate::metrics::AgentMetrics;

/// How long one etcd call may take before we treat the connection as gone.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One etcd call of the set-up, `what` naming it in the error, given [`CALL_TIMEOUT`]: a member
/// that hangs fails the call instead of holding the heartbeat.
async fn call<T>(
    what: String,
    request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> Result<T> {
    match timeout(CALL_TIMEOUT, request).await {
        Err(_) => Err(Error::Timeout {
            what,
            after: CALL_TIMEOUT,
        }),
        Ok(answer) => answer.map_err(|source| Error::Etcd { what, source }),
    }
}
/// How long the Stopping write of a clean stop may take: a stop must not hang on a dead etcd.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// A value write in flight.
type PendingPut = Pin<Box<dyn Future<Output = Result<PutResponse, etcd_client::Error>> + Send>>;

/// The streams of a session: the lease's keep-alives and the watch on our key.
type Streams = (LeaseKeeper, LeaseKeepAliveStream, WatchStream);

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

/// The deadline `at` on tokio's clock, which is the same as std's.
fn tokio_instant(at: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(at)
}

/// A session's end: the error that ended it and what the rules decided on it.
struct Ended {
    error: Error,
    then: Decisions,
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
    etcd: EtcdConnection,
    inputs: HeartbeatInputs,
    started_at: Timestamp,
    client: Option<Client>,
    state: HeartbeatState,
}

impl HeartbeatLease {
    /// A heartbeat for `node` with a lease of `ttl` seconds, its value rewritten within the
    /// `rewrite` range of intervals.
    pub fn new(
        node: &str,
        ttl: u32,
        rewrite: std::ops::RangeInclusive<Duration>,
        etcd: EtcdConnection,
        inputs: HeartbeatInputs,
    ) -> Self {
        let started_at = Timestamp::now();
        HeartbeatLease {
            node: node.to_string(),
            key: heartbeat_key(node),
            ttl,
            etcd,
            inputs,
            started_at,
            client: None,
            state: HeartbeatState::new(ttl, rewrite, started_at),
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
            let Err(Ended { error, then }) = self.session(&mut client).await;
            self.inputs.metrics.set_lease_held(false);
            if let Some(m) = then.leave_member {
                self.etcd.leave_member(m);
            }
            if let Some(Transition::Failed { first }) = then.transition {
                self.inputs.metrics.heartbeat_failures.inc();
                if first {
                    warn!("heartbeat: {error}; retrying while sampling goes on");
                }
            }
            if let Some(at) = then.retry_at {
                tokio::time::sleep_until(tokio_instant(at)).await;
            }
        }
    }

    /// One stretch of holding the lease: set it up, then feed the rules what etcd, the
    /// configuration, the sampler and the alarms say, until they or etcd end it.
    async fn session(&mut self, client: &mut Client) -> Result<Infallible, Ended> {
        let member = self.etcd.member_in_use();
        let (mut keeper, mut stream, mut own_key) = match self.establish(client, member).await {
            Ok(streams) => streams,
            Err(error) => return Err(self.failed(error)),
        };
        let mut now = Instant::now();
        if let Some(Transition::Resumed { id }) =
            self.state.step(Event::SessionStarted, now).transition
        {
            info!("heartbeat resumed: lease {id:x} still alive");
        }
        self.inputs.metrics.set_lease_held(true);

        let mut config_changed = self.inputs.config.subscribe();
        let mut usage = self.inputs.usage.clone();
        // A keep-alive due before the next sample, or a value write due within the rules'
        // slack, goes out with the sample instead of waking the thread on its own.
        let (mut keep_alive_alarm, mut rewrite_alarm) = (Alarm::new(), Alarm::new());
        let mut put: Option<PendingPut> = None;
        let (mut config_open, mut usage_open) = (true, true);
        loop {
            let Some(due) = self.state.deadlines(now) else {
                // Not reached: the rules leave a session only by a decision that returned above.
                // Were it reached, a retry beats a heartbeat task gone for good.
                let error = Error::StreamEnded(format!("session on lease {:x} over", keeper.id()));
                return Err(self.failed(error));
            };
            if due.rewrite.is_none() {
                // A deadline nobody waits for must not wake the thread.
                rewrite_alarm.disarm();
            }
            let event = tokio::select! {
                // Answers first: the hung-member deadline must not win over one already here.
                biased;
                msg = stream.message() => match msg {
                    Ok(Some(r)) => Event::KeepAliveAnswered { ttl: r.ttl() },
                    Ok(None) => return Err(self.failed(Error::StreamEnded(format!(
                        "keep-alive stream of lease {:x} closed by etcd", keeper.id()
                    )))),
                    Err(source) => return Err(self.failed(Error::Etcd {
                        what: format!("keep lease {:x} alive", keeper.id()), source
                    })),
                },
                _ = keep_alive_alarm.sleep_until(tokio_instant(due.keep_alive)) => Event::KeepAliveDue,
                _ = tokio::time::sleep_until(tokio_instant(due.hung.unwrap_or(now))), if due.hung.is_some() => {
                    Event::HungDeadline
                }
                msg = own_key.message() => {
                    let r = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(self.failed(Error::StreamEnded(format!("watch on {} closed by etcd", self.key)))),
                        Err(source) => return Err(self.failed(Error::Etcd { what: format!("watch {}", self.key), source })),
                    };
                    now = Instant::now();
                    for e in r.events() {
                        let Some(kv) = e.kv() else { continue };
                        let event = if e.event_type() == EventType::Delete {
                            Event::KeyDeleted
                        } else {
                            Event::KeyPut { lease: kv.lease(), value: kv.value() }
                        };
                        let d = self.state.step(event, now);
                        self.act(d, now, &mut keeper, client, &mut put).await?;
                    }
                    continue;
                }
                r = config_changed.changed(), if config_open => {
                    config_open = r.is_ok();
                    Event::ConfigChanged
                }
                r = usage.changed(), if usage_open => {
                    usage_open = r.is_ok();
                    Event::Sample { interval: self.inputs.config.interval() }
                }
                _ = rewrite_alarm.sleep_until(tokio_instant(due.rewrite.unwrap_or(now))), if due.rewrite.is_some() => {
                    Event::RewriteDue
                }
                result = async { put.as_mut().expect("guarded by is_some").await }, if put.is_some() => {
                    put = None;
                    match result {
                        Ok(_) => Event::WriteAnswered,
                        Err(e) => {
                            let lease_not_found = is_lease_not_found(&e);
                            if !lease_not_found {
                                debug!("heartbeat: put {} failed: {e}; trying again", self.key);
                            }
                            Event::WriteFailed { lease_not_found }
                        }
                    }
                }
            };
            now = Instant::now();
            let d = self.state.step(event, now);
            self.act(d, now, &mut keeper, client, &mut put).await?;
        }
    }

    /// Does what the rules decided at `now` within the session: logs, renews the lease, starts
    /// a write. Returns how the session ended, if it did.
    async fn act(
        &mut self,
        d: Decisions,
        now: Instant,
        keeper: &mut LeaseKeeper,
        client: &Client,
        put: &mut Option<PendingPut>,
    ) -> Result<(), Ended> {
        if let Some(end) = d.end {
            return Err(Ended {
                error: end_error(end),
                then: d,
            });
        }
        match d.transition {
            Some(Transition::KeyDeleted { lease }) => warn!(
                "heartbeat: {} was deleted while lease {lease:x} lives; writing it again",
                self.key
            ),
            Some(Transition::Superseded { by }) => info!(
                "heartbeat: a newer agent (started {by}) holds {}; this one stops writing it",
                self.key
            ),
            _ => {}
        }
        if d.keep_alive {
            let id = keeper.id();
            let error = match timeout(CALL_TIMEOUT, keeper.keep_alive()).await {
                Ok(Ok(())) => None,
                Ok(Err(source)) => Some(Error::Etcd {
                    what: format!("keep lease {id:x} alive"),
                    source,
                }),
                Err(_) => Some(Error::Timeout {
                    what: format!("keep lease {id:x} alive"),
                    after: CALL_TIMEOUT,
                }),
            };
            if let Some(error) = error {
                return Err(self.failed(error));
            }
        }
        if d.write {
            let value = self.value(AgentState::Running);
            if let Some(lease) = self.state.start_write(&value, now) {
                *put = Some(self.start_put(client, lease, &value));
            }
        }
        Ok(())
    }

    /// An etcd call failed or a stream ended: the rules decide what comes next.
    fn failed(&mut self, error: Error) -> Ended {
        let timed_out = matches!(error, Error::Timeout { .. });
        let then = self.state.step(Event::Failed { timed_out }, Instant::now());
        Ended { error, then }
    }

    /// Gets a live lease, as the rules ask: the one we held if etcd still has it, else a new one.
    /// Returns its keep-alive stream and a watch on our key (to repair a key deleted by hand).
    /// The value is written by the caller, beside the keep-alives.
    async fn establish(&mut self, client: &mut Client, member: Option<usize>) -> Result<Streams> {
        let request = self
            .state
            .step(Event::SetUp { member }, Instant::now())
            .lease;
        let watch = call(
            format!("watch {}", self.key),
            client.watch(self.key.as_str(), None),
        )
        .await?;
        if let Some(LeaseRequest::Resume(id)) = request {
            match timeout(CALL_TIMEOUT, client.lease_keep_alive(id)).await {
                Ok(Ok((keeper, stream))) => return Ok((keeper, stream, watch)),
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    // The rules answer with a grant.
                    self.state.step(Event::LeaseNotFound, Instant::now());
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
        let granted = call(
            format!("grant a {}s lease", self.ttl),
            client.lease_grant(self.ttl.into(), None),
        )
        .await?;
        let event = Event::LeaseGranted {
            id: granted.id(),
            ttl: granted.ttl(),
        };
        match self.state.step(event, Instant::now()).transition {
            Some(Transition::Granted {
                id,
                ttl,
                regranted: true,
            }) => {
                self.inputs.metrics.lease_regrants.inc();
                info!(
                    "heartbeat lease lost; granted a new one: id {id:x}, ttl {ttl}s, key {}",
                    self.key
                );
            }
            Some(Transition::Granted { id, ttl, .. }) => {
                info!("heartbeat lease granted: id {id:x}, ttl {ttl}s");
            }
            _ => {}
        }
        // The keep-alive stream first: the put that attaches the key may be slow.
        let id = granted.id();
        let (keeper, stream) = call(
            format!("keep lease {id:x} alive"),
            client.lease_keep_alive(id),
        )
        .await?;
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

    /// Starts putting `value` on `lease`.
    fn start_put(&self, client: &Client, lease: i64, value: &Heartbeat) -> PendingPut {
        let (mut client, key, json) = (client.clone(), self.key.clone(), value.to_json());
        Box::pin(async move {
            client
                .put(key, json, Some(PutOptions::new().with_lease(lease)))
                .await
        })
    }

    /// The clean stop: say Stopping in the value, if the key is still on our lease (another
    /// incarnation of this agent may have taken it over already), and leave the lease to expire.
    async fn stop(&mut self) {
        let stopping = self
            .state
            .step(Event::Shutdown, Instant::now())
            .mark_stopping;
        let (Some(mut client), Some(lease)) = (self.client.clone(), stopping) else {
            info!("stopping: no heartbeat lease held (etcd unreachable), nothing to mark");
            return;
        };
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

/// The error a session the rules ended stands for, as the log tells it.
fn end_error(end: SessionEnd) -> Error {
    match end {
        SessionEnd::LeaseLost { lease } => Error::LeaseLost(lease),
        SessionEnd::Unanswered { lease } => Error::StreamEnded(format!(
            "no keep-alive answer for lease {lease:x} within its ttl"
        )),
        SessionEnd::MemberHung { lease, silent } => Error::StreamEnded(format!(
            "no keep-alive answer for lease {lease:x} in {:.1}s; trying the next etcd member",
            silent.as_secs_f64()
        )),
    }
}
