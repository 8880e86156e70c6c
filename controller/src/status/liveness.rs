//! The liveness rules: every node judged Alive, Dead or Unknown from the heartbeat events.
//!
//! Pure, as kube-runtime's watcher `State` is: events go in with the time they happen at
//! ([`Now`]), verdicts come out (a node's new [`Verdict`] with its Event to raise, and the nodes
//! whose status is to be written again, in [`Decisions`]). No clock, no etcd client and no API
//! server inside: the task around it ([`crate::status::tracker`]) reads the MonitorNodes and the
//! Nodes, passes them in, and hands the decisions to the status writer. So every rule below is
//! tested with made-up instants, without a server.
//!
//! The rules, as the state table in `docs/architecture.md` gives them:
//! - a heartbeat put (on a live lease) is Alive (`HeartbeatSeen`);
//! - a heartbeat deleted by its lease's expiry is Dead: `AgentStopped` when the agent said it
//!   was stopping, `HeartbeatExpired` otherwise; deleted by hand while its lease lives, Dead only
//!   if no agent writes it again before that lease would run out;
//! - no working watch for longer than a node's TTL: Alive nodes go Unknown (`EtcdUnreachable`),
//!   Dead ones stay Dead; when the watch is back, a key listed again proves life only if it was
//!   written after the outage began, or once it outlived twice its TTL (etcd extends every lease
//!   when a leader takes over);
//! - a rebuilt store (new cluster, revisions gone back) that lacks a live node's key: Dead only
//!   if no agent writes it within a TTL;
//! - etcd's leader changed (a new raft term): each new leader restarts every lease at its full
//!   TTL, so the key alone proves nothing until the agent shows it renews its lease (a heartbeat
//!   write, or a lease whose expiry a keep-alive moved). An Alive node that does not within a
//!   TTL of the change is Unknown (`LeaderChurn`): Alive again when it does, Dead when its key
//!   expires once the leaders stay put, Alive again when its key outlives the last change by
//!   twice its TTL;
//! - a Node whose agent has never written a heartbeat is Unknown (`NoHeartbeat`);
//! - on every re-list (start, leader hand-over, after a watch error) the API server's statuses
//!   are adopted first, so a restart repeats no transition and raises no Event twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use nodepulse_crd::v1alpha1::{LivenessReason, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::{AgentState, HEARTBEAT_PREFIX, Heartbeat, Rejection};

use crate::status::elections::ElectionEvent;
use crate::status::heartbeats::HeartbeatEvent;
use crate::status::record::{LeaseExpiry, NodeRecord};

/// The agent's shortest heartbeat TTL, in seconds.
pub const MIN_TTL: u64 = 2;

/// A node whose key stays there after the watch's return is taken for alive after twice its TTL
/// and this margin: etcd extends every lease when a leader takes over (a restart, an election),
/// by an election timeout on top of the TTL, so a dead node's key may outlive one TTL.
pub const LEASE_GRACE: Duration = Duration::from_secs(1);

/// The brake on mass verdicts: when more than `threshold` of a zone's or of the fleet's live
/// nodes lose their heartbeat within one TTL, and at least `min_nodes` of them, they are Unknown
/// (`MassDisruption`), not Dead. The node lifecycle controller stops evicting on the same rule
/// (`--unhealthy-zone-threshold` 0.55, more than two nodes), and so do Node Health Check's
/// `minHealthy` and Cluster API's `maxUnhealthy`: a rack switch, a zone's network or one etcd
/// member failing looks like a mass death and is not one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DisruptionBrake {
    /// The share of live nodes (0 to 1) whose loss within one TTL is a disruption; 1 turns the
    /// brake off.
    pub threshold: f64,
    /// The fewest lost nodes that can make a disruption: below it, a small cluster's losses
    /// are deaths.
    pub min_nodes: usize,
}

impl Default for DisruptionBrake {
    fn default() -> Self {
        DisruptionBrake {
            threshold: 0.55,
            min_nodes: 3,
        }
    }
}

impl DisruptionBrake {
    /// How long a lost heartbeat waits before it is judged, so that the losses of nodes cut off
    /// together are counted together: their leases run out within a keep-alive period (TTL/3)
    /// of each other, and etcd revokes expired leases every half second. At most 1.5 s, which
    /// keeps a real death's Dead within TTL + 2 s.
    pub fn hold(&self, ttl_seconds: u32) -> Duration {
        if self.threshold >= 1.0 {
            return Duration::ZERO;
        }
        (Duration::from_secs(ttl_seconds.into()) / 3 + Duration::from_millis(500))
            .min(Duration::from_millis(1500))
    }
}

/// The time an event happens at: the monotonic instant the rules count with, and the wall time
/// a transition is stamped with (`lastTransitionTime`).
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// For deadlines.
    pub instant: Instant,
    /// For the status.
    pub wall: Timestamp,
}

impl Now {
    /// This moment, from the clocks: only the task around the rules reads them.
    pub fn read() -> Now {
        Now {
            instant: Instant::now(),
            wall: Timestamp::now(),
        }
    }
}

/// A node's move to a new state, for the log line and the transitions metric (its Event waits
/// in the node's record until the status is written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The node.
    pub node: String,
    /// The state entered.
    pub state: NodeState,
    /// Why.
    pub reason: LivenessReason,
}

/// What the rules decided since the last [`Liveness::take_decisions`].
#[derive(Debug, Default, PartialEq)]
pub struct Decisions {
    /// Transitions, in the order they happened.
    pub transitions: Vec<Transition>,
    /// Nodes whose status the writer should look at again (it writes only what changed).
    pub touched: BTreeSet<String>,
    /// Mass disruptions found (each made its lost nodes Unknown instead of Dead).
    pub disruptions: Vec<Disruption>,
    /// etcd leader changes seen: the raft term before and after.
    pub leader_changes: Vec<(u64, u64)>,
}

/// A mass loss of heartbeats.
#[derive(Clone, Debug, PartialEq)]
pub struct Disruption {
    /// The zone it hit; `None`: the fleet.
    pub zone: Option<String>,
    /// Nodes that lost their heartbeat within the window.
    pub lost: usize,
    /// Live nodes in its scope (the lost ones included).
    pub live: usize,
    /// The window: one TTL and the hold.
    pub window: Duration,
}

/// Every node's record and the rules that move it.
pub struct Liveness {
    records: HashMap<String, NodeRecord>,
    /// Each Node's zone (empty: none); nodes without a Node object are in the empty zone too.
    zones: BTreeMap<String, String>,
    brake: DisruptionBrake,
    /// When each disruption (by zone; `None`: the fleet) was last found: losses that join it
    /// within a window are the same disruption, reported once.
    disruptions_seen: BTreeMap<Option<String>, Instant>,
    /// The earliest `dead_at` of any record, or earlier (never later).
    next_dead_at: Option<Instant>,
    /// Since when the heartbeat watch has been down (from the start until the first list).
    watch_lost_since: Option<Instant>,
    /// The MonitorNodes were read from the API server at least once (by a snapshot, or, when
    /// etcd is away from the start, so that they can be marked Unknown).
    adopted: bool,
    /// etcd's raft term as last seen, and when it was first seen.
    term: Option<(u64, Instant)>,
    /// When the term last changed (the first term seen is no change).
    term_changed_at: Option<Instant>,
    /// When the next verdict on a doubted node is due (see [`Liveness::judge_leader_churn`]).
    next_churn_at: Option<Instant>,
    decisions: Decisions,
}

impl Liveness {
    /// No records yet, and no watch since `started`: nothing is known until the first list.
    pub fn new(started: Instant, brake: DisruptionBrake) -> Self {
        Liveness {
            records: HashMap::new(),
            zones: BTreeMap::new(),
            brake,
            next_dead_at: None,
            disruptions_seen: BTreeMap::new(),
            watch_lost_since: Some(started),
            adopted: false,
            term: None,
            term_changed_at: None,
            next_churn_at: None,
            decisions: Decisions::default(),
        }
    }

    /// Every node's record.
    pub fn records(&self) -> &HashMap<String, NodeRecord> {
        &self.records
    }

    /// Every node's record, for the writer to track its writes in.
    pub fn records_mut(&mut self) -> &mut HashMap<String, NodeRecord> {
        &mut self.records
    }

    /// What was decided since the last call.
    pub fn take_decisions(&mut self) -> Decisions {
        std::mem::take(&mut self.decisions)
    }

    /// Nodes by state: Alive, Dead, Unknown (a node not judged yet counts as Unknown).
    pub fn counts(&self) -> [usize; 3] {
        let mut counts = [0; 3];
        for rec in self.records.values() {
            match rec.state() {
                Some(NodeState::Alive) => counts[0] += 1,
                Some(NodeState::Dead) => counts[1] += 1,
                Some(NodeState::Unknown) | None => counts[2] += 1,
            }
        }
        counts
    }

    /// Nodes Unknown because of a mass disruption.
    pub fn disrupted(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.reason() == Some(LivenessReason::MassDisruption))
            .count()
    }

    /// Whether the heartbeats cannot be seen right now.
    pub fn watch_lost(&self) -> bool {
        self.watch_lost_since.is_some()
    }

    /// A heartbeat event other than a snapshot (which needs the MonitorNodes: [`Liveness::reconcile`]).
    pub fn observe(&mut self, event: HeartbeatEvent, now: Now) {
        match event {
            HeartbeatEvent::Snapshot { .. } => {
                debug_assert!(false, "a snapshot goes through reconcile");
            }
            HeartbeatEvent::Interrupted { since } => {
                self.watch_lost_since.get_or_insert(since);
            }
            HeartbeatEvent::Put { node, heartbeat } => {
                // A write is the agent acting now, whatever etcd's leaders did before.
                if let Some(rec) = self.records.get_mut(&node) {
                    rec.doubt_since = None;
                    rec.lease_expiry = None;
                }
                self.observe_alive(&node, Some(heartbeat), now)
            }
            HeartbeatEvent::Rejected {
                node,
                rejection,
                seen_at,
            } => {
                // Whatever is in the key now, it is not the agent's heartbeat: judged as a
                // lost heartbeat, with the reason said.
                self.observe_delete(&node, None, None, seen_at, Some(rejection));
            }
            HeartbeatEvent::Delete {
                node,
                last,
                lease_left,
                seen_at,
            } => self.observe_delete(&node, last, lease_left, seen_at, None),
        }
    }

    /// `node`'s heartbeat key went away, or, with `rejected`, now holds something that is not
    /// its agent's heartbeat.
    fn observe_delete(
        &mut self,
        node: &str,
        last: Option<Heartbeat>,
        lease_left: Option<Duration>,
        seen_at: Instant,
        rejected: Option<Rejection>,
    ) {
        let Some(rec) = self.records.get_mut(node) else {
            return;
        };
        if rec.heartbeat.is_none() && rec.state() != Some(NodeState::Alive) {
            // No heartbeat was there to lose (a Node whose agent never wrote one): a key that
            // was or is not one changes nothing.
            return;
        }
        if let Some(left) = lease_left {
            // Deleted by hand: the agent on the lease writes the key again within a third of
            // its TTL. Dead only if nobody has when the lease would run out.
            tracing::warn!(node, lease_left = ?left, "heartbeat key deleted while its lease lives; Dead only if no agent writes it again before the lease runs out");
            let at = seen_at + left + LEASE_GRACE;
            rec.dead_at = Some(at);
            self.next_dead_at = Some(self.next_dead_at.map_or(at, |n| n.min(at)));
            return;
        }
        rec.doubt_since = None;
        rec.lease_expiry = None;
        let last = last.or_else(|| rec.heartbeat.clone());
        // A goodbye is the agent's own word, which a rejected key is not.
        let stopping = rejected.is_none()
            && last
                .as_ref()
                .is_some_and(|hb| hb.state == AgentState::Stopping);
        let (reason, message) = if let Some(rejection) = rejected {
            (
                LivenessReason::HeartbeatExpired,
                format!(
                    "the heartbeat key holds no agent's heartbeat ({}): see the controller's log",
                    rejection.label()
                ),
            )
        } else if stopping {
            (
                LivenessReason::AgentStopped,
                "the agent stopped and no agent took over within its TTL".to_string(),
            )
        } else {
            let ttl = last
                .as_ref()
                .map_or_else(String::new, |hb| format!(" ({}s TTL)", hb.ttl_seconds));
            (
                LivenessReason::HeartbeatExpired,
                format!("the heartbeat lease expired{ttl}: no keep-alive from the agent"),
            )
        };
        rec.alive_at = None;
        if rec.state() == Some(NodeState::Dead) {
            rec.dead_at = None;
            return;
        }
        // A lost heartbeat is judged in a moment (see [`DisruptionBrake::hold`]), with the losses
        // around it. An agent that said goodbye was not cut off: its node is Dead at once, and
        // a mass of goodbyes (an uninstall) is no disruption.
        let at = if stopping {
            seen_at
        } else {
            rec.lost_at = Some(seen_at);
            seen_at + self.brake.hold(rec.ttl_seconds())
        };
        rec.dead_reason = Some((reason, message));
        rec.dead_at = Some(at);
        self.next_dead_at = Some(self.next_dead_at.map_or(at, |n| n.min(at)));
    }

    /// A snapshot of the heartbeat keys, reconciled against every MonitorNode's status as the
    /// API server listed it (`listed`) and the Nodes that exist (`nodes`): the API server's
    /// view, not memory, says what is shown.
    pub fn reconcile(
        &mut self,
        heartbeats: BTreeMap<String, Heartbeat>,
        store_replaced: bool,
        listed: BTreeMap<String, Option<MonitorNodeStatus>>,
        nodes: &BTreeMap<String, String>,
        now: Now,
    ) {
        for (name, rec) in self.records.iter_mut() {
            match listed.get(name) {
                Some(status) => rec.adopt_listed(status.as_ref(), now.instant, now.wall),
                None => rec.forget_unlisted(),
            }
        }
        for (name, status) in &listed {
            if !self.records.contains_key(name) {
                let mut rec = NodeRecord::default();
                rec.adopt_listed(status.as_ref(), now.instant, now.wall);
                self.records.insert(name.clone(), rec);
            }
        }
        let names: BTreeSet<String> = listed.keys().chain(heartbeats.keys()).cloned().collect();
        let outage = self.watch_lost_since;
        for name in &names {
            let rec = self.records.entry(name.clone()).or_default();
            match heartbeats.get(name) {
                Some(hb) if rec.is_unknown_for_etcd() && !rec.proves_life(Some(hb)) => {
                    // etcd resets every lease's TTL when it comes back, so a key present
                    // now says nothing yet: a dead node's key vanishes within a TTL, a live
                    // agent writes its value again. Until either, the node stays Unknown.
                    let ttl = Duration::from_secs(rec.ttl_seconds().into());
                    rec.heartbeat = Some(hb.clone());
                    rec.alive_at = Some(now.instant + 2 * ttl + LEASE_GRACE);
                }
                Some(hb) if rec.reason() == Some(LivenessReason::LeaderChurn) => {
                    // Listed is not renewed: it stays Unknown until its agent proves it.
                    rec.heartbeat = Some(hb.clone());
                }
                Some(hb) => {
                    // A value newer than the last one seen was written during the outage: after
                    // the leader change, if the outage began after it.
                    let written_since_doubt = rec.proves_life(Some(hb))
                        && outage.zip(rec.doubt_since).is_some_and(|(o, d)| o >= d);
                    if written_since_doubt {
                        rec.doubt_since = None;
                        rec.lease_expiry = None;
                    }
                    self.observe_alive(name, Some(hb.clone()), now)
                }
                None => {
                    rec.alive_at = None;
                    rec.doubt_since = None;
                    let was_live = rec.state() == Some(NodeState::Alive)
                        || rec.is_unknown_for_etcd()
                        || rec.reason() == Some(LivenessReason::LeaderChurn);
                    if was_live && store_replaced {
                        // A new store holds no lease yet: a live agent grants one and writes its
                        // key within a third of its TTL. Dead if none has by then.
                        let ttl = Duration::from_secs(rec.ttl_seconds().into());
                        rec.dead_at.get_or_insert(now.instant + ttl + LEASE_GRACE);
                    } else if was_live && rec.dead_at.is_none() {
                        // Gone at some time before the list: not a loss the brake can place in
                        // a window (a disruption's verdicts are in the listed statuses already).
                        transition(
                            &mut self.decisions,
                            name,
                            rec,
                            NodeState::Dead,
                            LivenessReason::HeartbeatExpired,
                            "the heartbeat key was gone when the controller listed the heartbeats"
                                .into(),
                            now,
                        );
                    }
                    if let Some(at) = rec.dead_at {
                        self.next_dead_at = Some(self.next_dead_at.map_or(at, |n| n.min(at)));
                    }
                }
            }
            self.decisions.touched.insert(name.clone());
        }
        self.records.retain(|name, _| names.contains(name));
        self.watch_lost_since = None;
        self.adopted = true;
        self.next_churn_at = self.churn_deadline();
        self.nodes_changed(nodes, now);
    }

    /// The set of Node objects changed. Every Node has a MonitorNode: one whose agent has never
    /// written a heartbeat is `Unknown` (`NoHeartbeat`), so that `kubectl get monitornodes` shows
    /// the whole cluster. Its record goes with its Node (the MonitorNode itself goes through its
    /// owner reference).
    pub fn nodes_changed(&mut self, nodes: &BTreeMap<String, String>, now: Now) {
        self.zones.clone_from(nodes);
        if self.watch_lost_since.is_some() {
            // The heartbeats are not known right now: "never seen" cannot be told.
            return;
        }
        for name in nodes.keys() {
            if self.records.get(name).is_some_and(|r| r.verdict.is_some()) {
                continue;
            }
            let rec = self.records.entry(name.clone()).or_default();
            transition(
                &mut self.decisions,
                name,
                rec,
                NodeState::Unknown,
                LivenessReason::NoHeartbeat,
                "no agent has written a heartbeat for this node: is one scheduled and running there?"
                    .into(),
                now,
            );
            self.decisions.touched.insert(name.clone());
        }
        self.records.retain(|name, rec| {
            nodes.contains_key(name)
                || rec.heartbeat.is_some()
                || rec.reason() != Some(LivenessReason::NoHeartbeat)
        });
    }

    /// A controller started while etcd is away has no records to mark Unknown: once without a watch for
    /// the shortest TTL, it should read the MonitorNodes the API server holds (their TTL is in
    /// them) and pass them to [`Liveness::adopt`].
    pub fn wants_adoption(&self, now: Instant) -> bool {
        match self.watch_lost_since {
            Some(since) => {
                !self.adopted && now.duration_since(since) >= Duration::from_secs(MIN_TTL)
            }
            None => false,
        }
    }

    /// The MonitorNodes' statuses, read while the watch is lost (see [`Liveness::wants_adoption`]).
    pub fn adopt(&mut self, listed: BTreeMap<String, Option<MonitorNodeStatus>>, now: Now) {
        self.adopted = true;
        for (name, status) in &listed {
            let rec = self.records.entry(name.clone()).or_default();
            rec.adopt_listed(status.as_ref(), now.instant, now.wall);
        }
    }

    /// When the next verdict on a lost heartbeat, or on a node doubted since a leader change,
    /// is due, if one is waiting: the task wakes then, so a verdict is not late by a tick.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_dead_at, self.next_churn_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed: the deadlines that are due now fire.
    pub fn tick(&mut self, now: Now) {
        self.mark_unknown_while_watch_lost(now);
        self.judge_leader_churn(now);
        self.confirm_alive_due(now);
        self.confirm_dead_due(now);
    }

    /// What etcd says about its elections: a term, or a doubted node's lease.
    pub fn observe_election(&mut self, event: ElectionEvent, now: Now) {
        match event {
            ElectionEvent::Term { term, seen_at } => self.observe_term(term, seen_at),
            ElectionEvent::LeaseAudit {
                node,
                lease,
                term,
                remaining_secs,
                sent_at,
                received_at,
            } => {
                self.observe_term(term, received_at);
                let Some((current, seen_at)) = self.term else {
                    return;
                };
                // An answer from before the term it carries was seen may predate the new
                // leader's reset of the leases: it places nothing.
                if term != current || sent_at < seen_at || remaining_secs <= 0 {
                    return;
                }
                let Some(rec) = self.records.get_mut(&node) else {
                    return;
                };
                if rec.doubt_since.is_none() {
                    return;
                }
                let expiry = LeaseExpiry::from_answer(
                    lease,
                    remaining_secs.unsigned_abs(),
                    sent_at,
                    received_at,
                );
                match rec.lease_expiry {
                    Some(first) if expiry.moved_from(&first) => {
                        // A keep-alive since the leader changed: the agent renews its lease.
                        rec.doubt_since = None;
                        rec.lease_expiry = None;
                        if rec.reason() == Some(LivenessReason::LeaderChurn) {
                            self.observe_alive(&node, None, now);
                        }
                    }
                    Some(placed) if placed.lease == lease => {
                        rec.lease_expiry = Some(placed.narrowed(&expiry));
                    }
                    _ => rec.lease_expiry = Some(expiry),
                }
            }
        }
    }

    /// A term seen at `seen_at`: a higher one than before is a leader change, after which no
    /// Alive node's key proves life until its agent shows it renews its lease.
    fn observe_term(&mut self, term: u64, seen_at: Instant) {
        match self.term {
            None => self.term = Some((term, seen_at)),
            Some((known, _)) if term > known => {
                self.decisions.leader_changes.push((known, term));
                self.term = Some((term, seen_at));
                self.term_changed_at = Some(seen_at);
                for rec in self.records.values_mut() {
                    let doubtful = rec.state() == Some(NodeState::Alive)
                        || rec.reason() == Some(LivenessReason::LeaderChurn);
                    if doubtful && rec.heartbeat.is_some() {
                        rec.doubt_since.get_or_insert(seen_at);
                        // The new leader moved every expiry: one placed before says nothing.
                        rec.lease_expiry = None;
                    }
                }
                self.next_churn_at = self.churn_deadline();
            }
            Some(_) => {}
        }
    }

    /// The earliest instant at which [`Liveness::judge_leader_churn`] has a doubted node to
    /// move: an Alive one a TTL after its doubt began, or any once the leaders have settled.
    fn churn_deadline(&self) -> Option<Instant> {
        let changed_at = self.term_changed_at?;
        self.records
            .values()
            .filter_map(|rec| {
                let since = rec.doubt_since?;
                let ttl = Duration::from_secs(rec.ttl_seconds().into());
                let settled = changed_at + 2 * ttl + LEASE_GRACE;
                Some(match rec.state() {
                    Some(NodeState::Alive) => settled.min(since + ttl),
                    _ => settled,
                })
            })
            .min()
    }

    /// The nodes whose agent has not proven since etcd's leader changed that it renews its
    /// lease: the task around the rules audits their leases.
    pub fn doubted(&self) -> BTreeSet<String> {
        self.records
            .iter()
            .filter(|(_, rec)| rec.doubt_since.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Doubted Alive nodes a TTL after the leader change: Unknown (`LeaderChurn`). Doubted nodes
    /// whose key outlived the last leader change by twice their TTL: their lease is kept alive
    /// (a new leader gives every lease its TTL and an election timeout), Alive.
    fn judge_leader_churn(&mut self, now: Now) {
        let Some(changed_at) = self.term_changed_at else {
            return;
        };
        if self.watch_lost_since.is_some() {
            // The keys cannot be seen: the outage's rules judge the nodes meanwhile (the next
            // list sets the deadline again).
            self.next_churn_at = None;
            return;
        }
        if self.next_churn_at.is_none_or(|at| at > now.instant) {
            return;
        }
        let mut settled = Vec::new();
        for (name, rec) in self.records.iter_mut() {
            let Some(since) = rec.doubt_since else {
                continue;
            };
            let ttl = Duration::from_secs(rec.ttl_seconds().into());
            if now.instant >= changed_at + 2 * ttl + LEASE_GRACE {
                rec.doubt_since = None;
                rec.lease_expiry = None;
                if rec.reason() == Some(LivenessReason::LeaderChurn) {
                    settled.push(name.clone());
                }
                continue;
            }
            if rec.state() != Some(NodeState::Alive) || now.instant < since + ttl {
                continue;
            }
            let message = format!(
                "etcd's leader changed {:.0}s ago, and each new leader restarts every lease at its full TTL: the heartbeat key alone does not prove the agent renews its lease, and it has not shown it does within its {}s TTL",
                now.instant.saturating_duration_since(since).as_secs_f64(),
                ttl.as_secs(),
            );
            transition(
                &mut self.decisions,
                name,
                rec,
                NodeState::Unknown,
                LivenessReason::LeaderChurn,
                message,
                now,
            );
            self.decisions.touched.insert(name.clone());
        }
        settled.sort();
        for name in settled {
            self.observe_alive(&name, None, now);
        }
        self.next_churn_at = self.churn_deadline();
    }

    /// While the heartbeat watch is down: every Alive node whose TTL has passed since then goes
    /// Unknown, since a node may have died meanwhile without the controller seeing it. Dead
    /// nodes stay Dead: nothing suggests their lease came back.
    fn mark_unknown_while_watch_lost(&mut self, now: Now) {
        let Some(since) = self.watch_lost_since else {
            return;
        };
        let lost = now.instant.saturating_duration_since(since);
        for (name, rec) in self.records.iter_mut() {
            let ttl = rec.ttl_seconds();
            if rec.state() != Some(NodeState::Alive) || lost <= Duration::from_secs(ttl.into()) {
                continue;
            }
            let message = format!(
                "the controller has had no working watch on {HEARTBEAT_PREFIX} for {:.0}s, longer than the node's {ttl}s TTL: it cannot tell whether the node is alive",
                lost.as_secs_f64(),
            );
            rec.alive_at = None;
            transition(
                &mut self.decisions,
                name,
                rec,
                NodeState::Unknown,
                LivenessReason::EtcdUnreachable,
                message,
                now,
            );
            self.decisions.touched.insert(name.clone());
        }
    }

    /// Unknown nodes whose key outlived twice their TTL after the watch came back: their lease
    /// is kept alive, so they are Alive.
    fn confirm_alive_due(&mut self, now: Now) {
        if self.watch_lost_since.is_some() {
            return;
        }
        let due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| rec.alive_at.is_some_and(|at| at <= now.instant))
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            self.observe_alive(&name, None, now);
        }
    }

    /// Nodes whose heartbeat was lost and not written again in time: Dead, unless they are
    /// part of a mass disruption.
    fn confirm_dead_due(&mut self, now: Now) {
        if self.watch_lost_since.is_some() {
            return;
        }
        let mut due: Vec<String> = self
            .records
            .iter()
            .filter(|(_, rec)| rec.dead_at.is_some_and(|at| at <= now.instant))
            .map(|(name, _)| name.clone())
            .collect();
        due.sort();
        self.next_dead_at = self
            .records
            .values()
            .filter_map(|r| r.dead_at)
            .filter(|at| *at > now.instant)
            .min();
        for name in due {
            let rec = self.records.get_mut(&name).expect("due");
            if rec.dead_at.is_none() {
                continue; // taken in a disruption judged just before
            }
            let goodbye = matches!(rec.dead_reason, Some((LivenessReason::AgentStopped, _)));
            if !goodbye {
                // A key that went away by hand or with a rebuilt store is lost now.
                rec.lost_at = rec.lost_at.or(rec.dead_at);
            }
            if !goodbye && let Some(scope) = self.disruption(&name, now.instant) {
                self.brake_disruption(scope, now);
                continue;
            }
            let rec = self.records.get_mut(&name).expect("due");
            let dead_since = rec.dead_at.take();
            let (reason, message) = rec.dead_reason.take().unwrap_or_else(|| {
                (
                    LivenessReason::HeartbeatExpired,
                    format!(
                        "the heartbeat key went away and no agent wrote it again within its {}s TTL",
                        rec.ttl_seconds()
                    ),
                )
            });
            if rec.state() != Some(NodeState::Dead) {
                rec.dead_seen_at = rec.lost_at.or(dead_since);
                transition(
                    &mut self.decisions,
                    &name,
                    rec,
                    NodeState::Dead,
                    reason,
                    message,
                    now,
                );
            }
            self.decisions.touched.insert(name);
        }
    }

    /// Whether `node`'s lost heartbeat is part of a mass disruption: of the live nodes of its
    /// zone, or of the fleet, more than the brake's share lost theirs within one TTL.
    fn disruption(&self, node: &str, now: Instant) -> Option<Disruption> {
        if self.brake.threshold >= 1.0 {
            return None;
        }
        let rec = &self.records[node];
        let window =
            Duration::from_secs(rec.ttl_seconds().into()) + self.brake.hold(rec.ttl_seconds());
        let zone = self.zones.get(node).cloned().unwrap_or_default();
        let mut fleet = (0, 0);
        let mut in_zone = (0, 0);
        for (name, r) in &self.records {
            let lost = r
                .lost_at
                .is_some_and(|at| now.saturating_duration_since(at) <= window);
            let live = lost || r.state() == Some(NodeState::Alive);
            if !live {
                continue;
            }
            let same_zone = self.zones.get(name).map_or("", String::as_str) == zone;
            for (counts, counted) in [(&mut fleet, true), (&mut in_zone, same_zone)] {
                if counted {
                    counts.0 += usize::from(lost);
                    counts.1 += 1;
                }
            }
        }
        let disrupted = |(lost, live): (usize, usize)| {
            lost >= self.brake.min_nodes && lost as f64 > self.brake.threshold * live as f64
        };
        if disrupted(fleet) {
            Some(Disruption {
                zone: None,
                lost: fleet.0,
                live: fleet.1,
                window,
            })
        } else if !zone.is_empty() && disrupted(in_zone) {
            Some(Disruption {
                zone: Some(zone),
                lost: in_zone.0,
                live: in_zone.1,
                window,
            })
        } else {
            None
        }
    }

    /// Every node lost within the disruption's window and scope is Unknown (`MassDisruption`):
    /// those waiting for their verdict, and those already shown Dead in it.
    fn brake_disruption(&mut self, d: Disruption, now: Now) {
        let scope = match &d.zone {
            Some(zone) => format!("zone {zone}"),
            None => "the fleet".to_string(),
        };
        let message = format!(
            "{} of {} live nodes in {scope} lost their heartbeat within {:.0}s, more than {:.0}%: a network or etcd fault is likelier than so many deaths, so nodepulse cannot tell whether this node is alive",
            d.lost,
            d.live,
            d.window.as_secs_f64(),
            self.brake.threshold * 100.0,
        );
        for (name, rec) in self.records.iter_mut() {
            let in_scope = match &d.zone {
                Some(zone) => self.zones.get(name) == Some(zone),
                None => true,
            };
            let lost = rec
                .lost_at
                .is_some_and(|at| now.instant.saturating_duration_since(at) <= d.window);
            if !in_scope || !lost || rec.reason() == Some(LivenessReason::MassDisruption) {
                continue;
            }
            rec.dead_at = None;
            rec.dead_reason = None;
            rec.dead_seen_at = None;
            transition(
                &mut self.decisions,
                name,
                rec,
                NodeState::Unknown,
                LivenessReason::MassDisruption,
                message.clone(),
                now,
            );
            self.decisions.touched.insert(name.clone());
        }
        let last = self.disruptions_seen.insert(d.zone.clone(), now.instant);
        if last.is_none_or(|at| now.instant.saturating_duration_since(at) > d.window) {
            self.decisions.disruptions.push(d);
        }
    }

    fn observe_alive(&mut self, node: &str, heartbeat: Option<Heartbeat>, now: Now) {
        let rec = self.records.entry(node.to_string()).or_default();
        rec.dead_at = None;
        rec.dead_reason = None;
        rec.lost_at = None;
        if heartbeat.is_some() {
            rec.heartbeat = heartbeat;
        }
        if rec.state() != Some(NodeState::Alive) {
            let message = match &rec.heartbeat {
                Some(hb) => format!(
                    "agent {} holds its heartbeat lease ({}s TTL)",
                    hb.agent_version, hb.ttl_seconds
                ),
                None => "the heartbeat key exists".to_string(),
            };
            rec.dead_seen_at = None;
            rec.alive_at = None;
            transition(
                &mut self.decisions,
                node,
                rec,
                NodeState::Alive,
                LivenessReason::HeartbeatSeen,
                message,
                now,
            );
        }
        self.decisions.touched.insert(node.to_string());
    }
}

/// Moves `rec` to `state` and records the transition among the decisions.
fn transition(
    decisions: &mut Decisions,
    node: &str,
    rec: &mut NodeRecord,
    state: NodeState,
    reason: LivenessReason,
    message: String,
    now: Now,
) {
    rec.transition(state, reason, message, now.wall);
    decisions.transitions.push(Transition {
        node: node.to_string(),
        state,
        reason,
    });
}

#[cfg(test)]
mod tests {
    //! Every rule, with made-up instants: no server, no clock, no sleep.

    use super::*;

    const TTL: u32 = 10;

    /// A state and its reason, as the state table pairs them.
    type Verdict = (NodeState, LivenessReason);
    const ALIVE: Verdict = (NodeState::Alive, LivenessReason::HeartbeatSeen);
    const EXPIRED: Verdict = (NodeState::Dead, LivenessReason::HeartbeatExpired);
    const STOPPED: Verdict = (NodeState::Dead, LivenessReason::AgentStopped);
    const ETCD_UNREACHABLE: Verdict = (NodeState::Unknown, LivenessReason::EtcdUnreachable);
    const NO_HEARTBEAT: Verdict = (NodeState::Unknown, LivenessReason::NoHeartbeat);
    const CONTROLLER_REMOVED: Verdict = (NodeState::Unknown, LivenessReason::ControllerRemoved);
    const MASS_DISRUPTION: Verdict = (NodeState::Unknown, LivenessReason::MassDisruption);
    const LEADER_CHURN: Verdict = (NodeState::Unknown, LivenessReason::LeaderChurn);

    /// A clock that only moves when the test says so.
    struct Clock {
        start: Instant,
        wall: Timestamp,
        offset: Duration,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                start: Instant::now(),
                wall: "2026-12-07T12:00:00Z".parse().unwrap(),
                offset: Duration::ZERO,
            }
        }
        fn now(&self) -> Now {
            Now {
                instant: self.start + self.offset,
                wall: self.wall + self.offset,
            }
        }
        fn at(&self, secs: f64) -> Now {
            let offset = Duration::from_secs_f64(secs);
            Now {
                instant: self.start + offset,
                wall: self.wall + offset,
            }
        }
        fn advance(&mut self, d: Duration) -> Now {
            self.offset += d;
            self.now()
        }
    }

    fn heartbeat(node: &str, written_secs: i64) -> Heartbeat {
        let start: Timestamp = "2026-12-07T11:00:00Z".parse().unwrap();
        let mut hb = Heartbeat::running(node, TTL, start);
        hb.updated_at = start + k8s_openapi::jiff::SignedDuration::from_secs(written_secs);
        hb
    }

    fn stopping(node: &str) -> Heartbeat {
        let mut hb = heartbeat(node, 0);
        hb.state = AgentState::Stopping;
        hb
    }

    fn put(node: &str, hb: Heartbeat) -> HeartbeatEvent {
        HeartbeatEvent::Put {
            node: node.into(),
            heartbeat: hb,
        }
    }

    fn expired(node: &str, last: Option<Heartbeat>, seen_at: Instant) -> HeartbeatEvent {
        HeartbeatEvent::Delete {
            node: node.into(),
            last,
            lease_left: None,
            seen_at,
        }
    }

    fn state(l: &Liveness, node: &str) -> Option<Verdict> {
        let rec = l.records().get(node)?;
        Some((rec.state()?, rec.reason()?))
    }

    fn transitions(d: &Decisions) -> Vec<(&str, Verdict)> {
        d.transitions
            .iter()
            .map(|t| (t.node.as_str(), (t.state, t.reason)))
            .collect()
    }

    /// The transitions decided since the last look are `expected`.
    #[track_caller]
    fn assert_decided(l: &mut Liveness, expected: &[(&str, Verdict)]) {
        assert_eq!(transitions(&l.take_decisions()), expected);
    }

    /// How long a lost heartbeat waits for its verdict at TTL 10 s.
    const HOLD: f64 = 1.5;

    /// Nodes in `zone`, as the inventory gives them.
    fn nodes_in(zone: &str, list: &[&str]) -> BTreeMap<String, String> {
        list.iter()
            .map(|n| (n.to_string(), zone.to_string()))
            .collect()
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn listed_status(state: NodeState, reason: LivenessReason) -> Option<MonitorNodeStatus> {
        Some(MonitorNodeStatus {
            state: Some(state),
            reason: Some(reason.as_str().into()),
            ttl_seconds: Some(TTL),
            ..Default::default()
        })
    }

    /// A tracker that has listed once: `alive` hold keys, `nodes` are the Node objects.
    fn started(clock: &Clock, alive: &[&str], nodes: &[&str]) -> Liveness {
        let mut l = Liveness::new(clock.now().instant, DisruptionBrake::default());
        let heartbeats = alive
            .iter()
            .map(|n| (n.to_string(), heartbeat(n, 0)))
            .collect();
        l.reconcile(
            heartbeats,
            false,
            BTreeMap::new(),
            &nodes_in("", nodes),
            clock.now(),
        );
        l.take_decisions();
        l
    }

    #[test]
    fn a_heartbeat_is_alive_with_one_transition_and_its_event() {
        let clock = Clock::new();
        let mut l = started(&clock, &[], &[]);
        l.observe(put("worker-1", heartbeat("worker-1", 0)), clock.now());
        let d = l.take_decisions();
        assert_eq!(transitions(&d), [("worker-1", ALIVE)]);
        assert_eq!(d.touched, names(&["worker-1"]));
        let rec = &l.records()["worker-1"];
        assert_eq!(rec.pending_events.len(), 1);
        let verdict = rec.verdict.as_ref().unwrap();
        assert_eq!(verdict.since.0, clock.now().wall);
        assert!(verdict.message.contains("10s TTL"), "{}", verdict.message);

        // A value rewrite is news for the status, not a transition.
        l.observe(put("worker-1", heartbeat("worker-1", 5)), clock.now());
        let d = l.take_decisions();
        assert!(d.transitions.is_empty());
        assert_eq!(d.touched, names(&["worker-1"]));
        assert_eq!(l.records()["worker-1"].pending_events.len(), 1);
    }

    #[test]
    fn a_lease_that_expires_is_dead_heartbeat_expired() {
        let mut clock = Clock::new();
        let mut l = started(&clock, &["worker-1"], &["worker-1"]);
        let seen = clock.advance(Duration::from_secs(11)).instant;
        l.observe(
            expired("worker-1", Some(heartbeat("worker-1", 0)), seen),
            clock.now(),
        );
        // Judged a moment later, with the losses around it.
        assert_decided(&mut l, &[]);
        assert_eq!(l.next_deadline(), Some(clock.at(11.0 + HOLD).instant));
        l.tick(clock.at(11.0 + HOLD - 0.001));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(11.0 + HOLD));
        let d = l.take_decisions();
        assert_eq!(transitions(&d), [("worker-1", EXPIRED)]);
        assert_eq!(l.next_deadline(), None);
        let rec = &l.records()["worker-1"];
        assert_eq!(rec.dead_seen_at, Some(seen), "the delete times the write");
        assert!(rec.verdict.as_ref().unwrap().message.contains("10s TTL"));

        // A second delete (a watch replay) is no second Dead.
        l.observe(expired("worker-1", None, seen), clock.now());
        assert_decided(&mut l, &[]);
    }

    #[test]
    fn an_agent_that_said_it_was_stopping_is_dead_agent_stopped() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1"], &[]);
        l.observe(put("worker-1", stopping("worker-1")), clock.now());
        l.take_decisions();
        // The value before the delete is not always known: the last one seen counts.
        l.observe(expired("worker-1", None, clock.now().instant), clock.now());
        l.tick(clock.at(HOLD));
        assert_decided(&mut l, &[("worker-1", STOPPED)]);
    }

    #[test]
    fn a_dead_node_whose_agent_comes_back_is_alive() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1"], &[]);
        l.observe(expired("worker-1", None, clock.now().instant), clock.now());
        l.tick(clock.at(HOLD));
        l.observe(put("worker-1", heartbeat("worker-1", 30)), clock.at(30.0));
        let d = l.take_decisions();
        assert_eq!(
            transitions(&d),
            [("worker-1", EXPIRED), ("worker-1", ALIVE)]
        );
        assert_eq!(l.records()["worker-1"].dead_seen_at, None);
    }

    #[test]
    fn a_key_deleted_by_hand_while_its_lease_lives_is_dead_only_once_the_lease_would_have_run_out()
    {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1", "worker-2"], &[]);
        for node in ["worker-1", "worker-2"] {
            l.observe(
                HeartbeatEvent::Delete {
                    node: node.into(),
                    last: None,
                    lease_left: Some(Duration::from_secs(7)),
                    seen_at: clock.now().instant,
                },
                clock.now(),
            );
        }
        assert_eq!(l.take_decisions(), Decisions::default());
        // worker-1's agent writes its key again (within a third of its TTL).
        l.observe(put("worker-1", heartbeat("worker-1", 3)), clock.at(3.0));
        // Up to the lease's end and the margin, nothing: exactly at it, the deadline is due.
        l.tick(clock.at(7.999));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(8.0));
        let d = l.take_decisions();
        assert_eq!(transitions(&d), [("worker-2", EXPIRED)]);
        assert_eq!(state(&l, "worker-1"), Some(ALIVE));
        assert_eq!(
            l.records()["worker-1"].pending_events.len(),
            1,
            "no second Alive"
        );
        assert_eq!(
            l.records()["worker-2"].dead_seen_at,
            Some(clock.at(8.0).instant)
        );
    }

    #[test]
    fn a_delete_of_a_node_never_seen_is_ignored() {
        let clock = Clock::new();
        let mut l = started(&clock, &[], &[]);
        l.observe(expired("ghost", None, clock.now().instant), clock.now());
        assert_eq!(l.take_decisions(), Decisions::default());
        assert!(l.records().is_empty());
    }

    #[test]
    fn without_a_watch_for_longer_than_the_ttl_alive_nodes_are_unknown_dead_ones_stay_dead() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1", "worker-2"], &[]);
        l.observe(expired("worker-2", None, clock.now().instant), clock.now());
        l.tick(clock.at(HOLD));
        l.take_decisions();
        l.observe(
            HeartbeatEvent::Interrupted {
                since: clock.at(2.0).instant,
            },
            clock.at(2.0),
        );
        assert!(l.watch_lost());
        // Exactly one TTL without a watch is not yet longer than the TTL.
        l.tick(clock.at(12.0));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(12.001));
        let d = l.take_decisions();
        assert_eq!(transitions(&d), [("worker-1", ETCD_UNREACHABLE)]);
        assert_eq!(d.touched, names(&["worker-1"]));
        assert_eq!(state(&l, "worker-2"), Some(EXPIRED));
        // A second interruption does not move the start of the outage.
        l.observe(
            HeartbeatEvent::Interrupted {
                since: clock.at(20.0).instant,
            },
            clock.at(20.0),
        );
        l.tick(clock.at(30.0));
        assert_decided(&mut l, &[]);
    }

    fn unknown_after_outage(clock: &Clock) -> Liveness {
        let mut l = started(clock, &["worker-1"], &[]);
        l.observe(
            HeartbeatEvent::Interrupted {
                since: clock.now().instant,
            },
            clock.now(),
        );
        l.tick(clock.at(20.0));
        assert_eq!(state(&l, "worker-1"), Some(ETCD_UNREACHABLE));
        l.take_decisions();
        l
    }

    fn relist(l: &mut Liveness, heartbeats: &[(&str, Heartbeat)], store_replaced: bool, now: Now) {
        let heartbeats = heartbeats
            .iter()
            .map(|(n, hb)| (n.to_string(), hb.clone()))
            .collect();
        // The API server shows what the records say (the writes went through).
        let listed = l
            .records()
            .iter()
            .map(|(n, r)| {
                let status = r.verdict.as_ref().map(|v| MonitorNodeStatus {
                    state: Some(v.state),
                    reason: Some(v.reason.as_str().into()),
                    ttl_seconds: Some(TTL),
                    ..Default::default()
                });
                (n.clone(), status)
            })
            .collect();
        l.reconcile(heartbeats, store_replaced, listed, &BTreeMap::new(), now);
    }

    /// worker-1 Unknown after an outage, then the heartbeats listed again 25 s in: its key
    /// written `key_written` seconds after the agent started (or gone).
    fn relisted_after_outage(clock: &Clock, key_written: Option<i64>) -> Liveness {
        let mut l = unknown_after_outage(clock);
        let key: Vec<(&str, Heartbeat)> = key_written
            .map(|secs| ("worker-1", heartbeat("worker-1", secs)))
            .into_iter()
            .collect();
        relist(&mut l, &key, false, clock.at(25.0));
        l
    }

    #[test]
    fn after_an_outage_a_heartbeat_written_since_proves_life_at_once() {
        let clock = Clock::new();
        let mut l = relisted_after_outage(&clock, Some(25));
        assert_decided(&mut l, &[("worker-1", ALIVE)]);
    }

    #[test]
    fn after_an_outage_an_old_key_is_alive_only_once_it_outlived_twice_its_ttl() {
        let clock = Clock::new();
        // The same value as before the outage: etcd may have extended a dead node's lease.
        let mut l = relisted_after_outage(&clock, Some(0));
        assert_decided(&mut l, &[]);
        assert!(!l.watch_lost());
        // Vouched for at 25 + 2 x 10 + 1 s.
        l.tick(clock.at(45.999));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(46.0));
        assert_decided(&mut l, &[("worker-1", ALIVE)]);
    }

    #[test]
    fn after_an_outage_an_old_key_that_expires_is_dead_once() {
        let clock = Clock::new();
        let mut l = relisted_after_outage(&clock, Some(0));
        l.observe(
            expired("worker-1", None, clock.at(33.0).instant),
            clock.at(33.0),
        );
        l.tick(clock.at(60.0));
        assert_decided(&mut l, &[("worker-1", EXPIRED)]);
    }

    #[test]
    fn after_an_outage_a_key_gone_from_the_list_is_dead() {
        let clock = Clock::new();
        let mut l = relisted_after_outage(&clock, None);
        l.tick(clock.at(25.0 + HOLD));
        let d = l.take_decisions();
        assert_eq!(transitions(&d), [("worker-1", EXPIRED)]);
        assert!(d.touched.contains("worker-1"));
    }

    #[test]
    fn a_rebuilt_store_without_a_live_nodes_key_waits_a_ttl_for_its_agent() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1", "worker-2"], &[]);
        relist(&mut l, &[], true, clock.at(1.0));
        assert!(l.take_decisions().transitions.is_empty(), "nothing expired");
        // worker-1's agent grants a lease on the new store and writes its key.
        l.observe(put("worker-1", heartbeat("worker-1", 2)), clock.at(2.0));
        l.tick(clock.at(11.999));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(12.0));
        assert_decided(&mut l, &[("worker-2", EXPIRED)]);
        assert_eq!(state(&l, "worker-1"), Some(ALIVE));
    }

    #[test]
    fn a_node_without_a_heartbeat_is_unknown_and_goes_with_its_node() {
        let clock = Clock::new();
        let mut l = Liveness::new(clock.now().instant, DisruptionBrake::default());
        // Blind: "never seen" cannot be told yet.
        l.nodes_changed(&nodes_in("", &["worker-1"]), clock.now());
        assert_eq!(l.take_decisions(), Decisions::default());
        l.reconcile(
            BTreeMap::new(),
            false,
            BTreeMap::new(),
            &nodes_in("", &["worker-1"]),
            clock.now(),
        );
        assert_decided(&mut l, &[("worker-1", NO_HEARTBEAT)]);
        // Its agent starts.
        l.observe(put("worker-1", heartbeat("worker-1", 0)), clock.now());
        assert_decided(&mut l, &[("worker-1", ALIVE)]);
        // A second Node joins; then it is deleted before any agent ran there.
        l.nodes_changed(&nodes_in("", &["worker-1", "worker-2"]), clock.now());
        assert_decided(&mut l, &[("worker-2", NO_HEARTBEAT)]);
        l.nodes_changed(&nodes_in("", &["worker-1"]), clock.now());
        assert!(!l.records().contains_key("worker-2"));
        // A node with a heartbeat stays, Node object or not (simulated nodes have none).
        l.nodes_changed(&BTreeMap::new(), clock.now());
        assert!(l.records().contains_key("worker-1"));
    }

    #[test]
    fn a_restart_or_leader_hand_over_repeats_no_transition() {
        let clock = Clock::new();
        let mut l = Liveness::new(clock.now().instant, DisruptionBrake::default());
        // What the previous leader wrote: worker-1 Alive, worker-2 Dead, worker-3 never seen,
        // worker-4 shown Unknown by the uninstall hook.
        let listed = BTreeMap::from([
            (
                "worker-1".to_string(),
                listed_status(NodeState::Alive, LivenessReason::HeartbeatSeen),
            ),
            (
                "worker-2".to_string(),
                listed_status(NodeState::Dead, LivenessReason::HeartbeatExpired),
            ),
            (
                "worker-3".to_string(),
                listed_status(NodeState::Unknown, LivenessReason::NoHeartbeat),
            ),
            (
                "worker-4".to_string(),
                listed_status(NodeState::Unknown, LivenessReason::ControllerRemoved),
            ),
        ]);
        let heartbeats = BTreeMap::from([("worker-1".to_string(), heartbeat("worker-1", 0))]);
        let nodes = nodes_in("", &["worker-1", "worker-2", "worker-3", "worker-4"]);
        l.reconcile(heartbeats, false, listed, &nodes, clock.now());
        let d = l.take_decisions();
        assert_eq!(
            transitions(&d),
            [],
            "the statuses already say it: no transition, no Event"
        );
        assert_eq!(state(&l, "worker-2"), Some(EXPIRED));
        // ControllerRemoved is adopted as the API server shows it (the writer then writes the
        // true state: worker-4 has no heartbeat, so it is reconsidered).
        assert_eq!(state(&l, "worker-4"), Some(CONTROLLER_REMOVED));
        assert!(d.touched.contains("worker-4"));
        assert!(l.records().values().all(|r| r.pending_events.is_empty()));
    }

    #[test]
    fn a_restart_that_finds_a_shown_alive_nodes_key_gone_makes_it_dead_once() {
        let clock = Clock::new();
        let mut l = Liveness::new(clock.now().instant, DisruptionBrake::default());
        let listed = BTreeMap::from([(
            "worker-1".to_string(),
            listed_status(NodeState::Alive, LivenessReason::HeartbeatSeen),
        )]);
        l.reconcile(
            BTreeMap::new(),
            false,
            listed,
            &nodes_in("", &["worker-1"]),
            clock.now(),
        );
        l.tick(clock.at(HOLD));
        assert_decided(&mut l, &[("worker-1", EXPIRED)]);
    }

    #[test]
    fn a_controller_started_while_etcd_is_away_marks_what_it_cannot_vouch_for_unknown() {
        let clock = Clock::new();
        let mut l = Liveness::new(clock.now().instant, DisruptionBrake::default());
        assert!(!l.wants_adoption(clock.at(1.9).instant));
        assert!(l.wants_adoption(clock.at(2.0).instant));
        let listed = BTreeMap::from([
            (
                "worker-1".to_string(),
                listed_status(NodeState::Alive, LivenessReason::HeartbeatSeen),
            ),
            (
                "worker-2".to_string(),
                listed_status(NodeState::Dead, LivenessReason::HeartbeatExpired),
            ),
        ]);
        l.adopt(listed, clock.at(2.0));
        assert!(!l.wants_adoption(clock.at(3.0).instant), "once");
        l.tick(clock.at(10.0));
        assert!(l.take_decisions().transitions.is_empty(), "within the TTL");
        l.tick(clock.at(10.5));
        assert_decided(&mut l, &[("worker-1", ETCD_UNREACHABLE)]);
    }

    #[test]
    fn a_mass_failure_is_one_dead_transition_per_node() {
        let clock = Clock::new();
        let all: Vec<String> = (0..1000).map(|i| format!("node-{i:04}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut l = started(&clock, &refs, &[]);
        for (i, node) in all.iter().enumerate().take(100) {
            let at = clock.at(10.0 + i as f64 * 0.01);
            l.observe(expired(node, None, at.instant), at);
        }
        l.tick(clock.at(11.0 + HOLD));
        // A tenth of the fleet is a mass failure, not a disruption: every one is Dead.
        let d = l.take_decisions();
        assert!(d.disruptions.is_empty());
        assert_eq!(d.transitions.len(), 100);
        assert!(
            d.transitions
                .iter()
                .all(|t| t.state == NodeState::Dead && t.reason == LivenessReason::HeartbeatExpired)
        );
        assert_eq!(d.touched.len(), 100);
        assert_eq!(l.counts(), [900, 100, 0]);
    }

    #[test]
    fn counts_are_by_state() {
        let clock = Clock::new();
        let mut l = started(&clock, &["a", "b"], &["a", "b", "c"]);
        l.observe(expired("b", None, clock.now().instant), clock.now());
        l.tick(clock.at(HOLD));
        assert_eq!(l.counts(), [1, 1, 1]);
    }

    /// `count` nodes (`n00`, `n01`, ...) Alive in `zone`.
    fn fleet(clock: &Clock, zones: &[(&str, usize)], brake: DisruptionBrake) -> Liveness {
        let mut l = Liveness::new(clock.now().instant, brake);
        let mut heartbeats = BTreeMap::new();
        let mut nodes = BTreeMap::new();
        for (zone, count) in zones {
            for i in 0..*count {
                let name = format!("{zone}-n{i:02}");
                heartbeats.insert(name.clone(), heartbeat(&name, 0));
                nodes.insert(name, zone.to_string());
            }
        }
        l.reconcile(heartbeats, false, BTreeMap::new(), &nodes, clock.now());
        l.take_decisions();
        l
    }

    /// Loses `node`'s heartbeat at `at` seconds.
    fn lose(l: &mut Liveness, clock: &Clock, node: &str, at: f64) {
        l.observe(expired(node, None, clock.at(at).instant), clock.at(at));
    }

    /// Ticks every 100 ms from `from` to `to` seconds, gathering every decision.
    fn run(l: &mut Liveness, clock: &Clock, from: f64, to: f64) -> Decisions {
        let mut all = Decisions::default();
        let mut t = from;
        while t <= to {
            l.tick(clock.at(t));
            let d = l.take_decisions();
            all.transitions.extend(d.transitions);
            all.touched.extend(d.touched);
            all.disruptions.extend(d.disruptions);
            t += 0.1;
        }
        all
    }

    #[test]
    fn six_of_ten_lost_together_are_unknown_never_dead() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        // Frozen at once: their leases run out within a keep-alive period of each other.
        for (i, at) in [10.0, 10.3, 10.6, 10.9, 11.1, 11.3].into_iter().enumerate() {
            lose(&mut l, &clock, &format!("-n{i:02}"), at);
        }
        let d = run(&mut l, &clock, 10.0, 30.0);
        assert!(
            d.transitions
                .iter()
                .all(|t| (t.state, t.reason) == MASS_DISRUPTION),
            "{:?}",
            d.transitions
        );
        assert_eq!(d.transitions.len(), 6);
        assert_eq!(d.disruptions.len(), 1, "one disruption, reported once");
        assert_eq!((d.disruptions[0].lost, d.disruptions[0].live), (6, 10));
        assert_eq!(d.disruptions[0].zone, None);
        assert_eq!(l.counts(), [4, 0, 6]);
        assert_eq!(l.disrupted(), 6);
        let message = &l.records()["-n00"].verdict.as_ref().unwrap().message;
        assert!(
            message.starts_with("6 of 10 live nodes in the fleet"),
            "{message}"
        );
        assert!(
            l.records()["-n00"].dead_seen_at.is_none(),
            "no Dead to time"
        );

        // Their heartbeats come back: Alive.
        for i in 0..6 {
            let node = format!("-n{i:02}");
            l.observe(put(&node, heartbeat(&node, 40)), clock.at(40.0));
        }
        assert_eq!(l.take_decisions().transitions.len(), 6);
        assert_eq!(l.counts(), [10, 0, 0]);
    }

    #[test]
    fn one_of_ten_lost_is_dead() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        lose(&mut l, &clock, "-n03", 10.0);
        let d = run(&mut l, &clock, 10.0, 12.0);
        assert_eq!(transitions(&d), [("-n03", EXPIRED)]);
        assert!(d.disruptions.is_empty());
    }

    #[test]
    fn a_dead_shown_before_the_share_was_crossed_turns_unknown_when_it_is() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        lose(&mut l, &clock, "-n00", 10.0);
        let first = run(&mut l, &clock, 10.0, 12.0);
        assert_eq!(transitions(&first), [("-n00", EXPIRED)]);
        // Within the same TTL, five more: the first was part of it.
        for i in 1..6 {
            lose(&mut l, &clock, &format!("-n{i:02}"), 14.0);
        }
        let d = run(&mut l, &clock, 12.0, 20.0);
        assert_eq!(d.transitions.len(), 6);
        assert!(
            d.transitions
                .iter()
                .all(|t| (t.state, t.reason) == MASS_DISRUPTION)
        );
        assert_eq!(l.counts(), [4, 0, 6]);
    }

    #[test]
    fn a_rejected_key_of_a_node_that_never_had_a_heartbeat_changes_nothing() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1"], &["worker-1", "worker-2"]);
        assert_eq!(state(&l, "worker-2"), Some(NO_HEARTBEAT));
        let rejected = HeartbeatEvent::Rejected {
            node: "worker-2".into(),
            rejection: Rejection::NoLease,
            seen_at: clock.at(1.0).instant,
        };
        l.observe(rejected, clock.at(1.0));
        l.tick(clock.at(5.0));
        assert_decided(&mut l, &[]);
        assert_eq!(state(&l, "worker-2"), Some(NO_HEARTBEAT));
        assert_eq!(
            l.records()["worker-2"].lost_at,
            None,
            "no loss for the brake to count"
        );
    }

    #[test]
    fn a_rejected_key_says_why_whatever_the_last_heartbeat_said() {
        let clock = Clock::new();
        let mut l = started(&clock, &["worker-1"], &["worker-1"]);
        l.observe(put("worker-1", stopping("worker-1")), clock.now());
        l.take_decisions();
        let rejected = HeartbeatEvent::Rejected {
            node: "worker-1".into(),
            rejection: Rejection::TtlMismatch,
            seen_at: clock.at(1.0).instant,
        };
        l.observe(rejected, clock.at(1.0));
        l.tick(clock.at(1.0 + HOLD));
        assert_decided(&mut l, &[("worker-1", EXPIRED)]);
        let verdict = l.records()["worker-1"].verdict.clone().expect("a verdict");
        assert!(
            verdict.message.contains("ttl_mismatch"),
            "{}",
            verdict.message
        );
    }

    #[test]
    fn a_key_that_no_longer_holds_the_agents_heartbeat_is_a_lost_heartbeat_with_its_reason() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        l.observe(
            HeartbeatEvent::Rejected {
                node: "-n03".into(),
                rejection: Rejection::NoLease,
                seen_at: clock.at(10.0).instant,
            },
            clock.at(10.0),
        );
        let d = run(&mut l, &clock, 10.0, 12.0);
        let [t] = d.transitions.as_slice() else {
            panic!("one transition: {:?}", d.transitions)
        };
        assert_eq!((t.node.as_str(), (t.state, t.reason)), ("-n03", EXPIRED));
        let verdict = l.records()["-n03"].verdict.clone().expect("a verdict");
        assert!(verdict.message.contains("no_lease"), "{}", verdict.message);
        // The agent writes its heartbeat again: Alive.
        l.observe(put("-n03", heartbeat("-n03", 0)), clock.at(13.0));
        assert_eq!(state(&l, "-n03").map(|v| v.0), Some(NodeState::Alive));
    }

    #[test]
    fn losses_more_than_a_ttl_apart_are_deaths() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        let mut d = Decisions::default();
        for i in 0..6 {
            let at = 10.0 + 12.0 * i as f64;
            lose(&mut l, &clock, &format!("-n{i:02}"), at);
            d.transitions
                .extend(run(&mut l, &clock, at, at + 11.9).transitions);
        }
        assert_eq!(d.transitions.len(), 6);
        assert!(
            d.transitions.iter().all(|t| (t.state, t.reason) == EXPIRED),
            "{:?}",
            d.transitions
        );
    }

    #[test]
    fn a_zone_that_loses_most_of_its_nodes_is_disrupted_and_the_others_are_not() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("a", 5), ("b", 5)], DisruptionBrake::default());
        // 4 of zone a's 5 (80%), 4 of the fleet's 10 (40%).
        for i in 0..4 {
            lose(&mut l, &clock, &format!("a-n{i:02}"), 10.0 + 0.2 * i as f64);
        }
        let d = run(&mut l, &clock, 10.0, 15.0);
        assert_eq!(d.transitions.len(), 4);
        assert!(
            d.transitions
                .iter()
                .all(|t| (t.state, t.reason) == MASS_DISRUPTION)
        );
        assert_eq!(d.disruptions.len(), 1);
        assert_eq!(d.disruptions[0].zone.as_deref(), Some("a"));
        assert_eq!((d.disruptions[0].lost, d.disruptions[0].live), (4, 5));
        // One of zone b dies meanwhile: a death.
        lose(&mut l, &clock, "b-n00", 15.0);
        let d = run(&mut l, &clock, 15.0, 17.0);
        assert_eq!(transitions(&d), [("b-n00", EXPIRED)]);
    }

    #[test]
    fn a_small_cluster_losing_fewer_than_the_minimum_sees_deaths() {
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 3)], DisruptionBrake::default());
        lose(&mut l, &clock, "-n00", 10.0);
        lose(&mut l, &clock, "-n01", 10.2);
        let d = run(&mut l, &clock, 10.0, 13.0);
        assert_eq!(transitions(&d), [("-n00", EXPIRED), ("-n01", EXPIRED)]);
    }

    #[test]
    fn with_the_brake_off_every_loss_is_dead_at_once() {
        let clock = Clock::new();
        let off = DisruptionBrake {
            threshold: 1.0,
            min_nodes: 3,
        };
        assert_eq!(off.hold(10), Duration::ZERO);
        let mut l = fleet(&clock, &[("", 10)], off);
        for i in 0..6 {
            lose(&mut l, &clock, &format!("-n{i:02}"), 10.0);
        }
        l.tick(clock.at(10.0));
        let d = l.take_decisions();
        assert_eq!(d.transitions.len(), 6);
        assert!(d.transitions.iter().all(|t| (t.state, t.reason) == EXPIRED));
    }

    #[test]
    fn the_hold_covers_a_keep_alive_period_and_etcds_revoke_pass_up_to_a_second_and_a_half() {
        let brake = DisruptionBrake::default();
        assert_eq!(
            brake.hold(2),
            Duration::from_secs(2) / 3 + Duration::from_millis(500)
        );
        assert_eq!(brake.hold(3), Duration::from_millis(1500));
        assert_eq!(brake.hold(10), Duration::from_millis(1500));
    }

    #[test]
    fn agents_that_say_goodbye_together_are_dead_at_once_not_a_disruption() {
        // helm uninstall: every agent stops cleanly and marks its value Stopping first.
        let clock = Clock::new();
        let mut l = fleet(&clock, &[("", 10)], DisruptionBrake::default());
        for i in 0..10 {
            let node = format!("-n{i:02}");
            l.observe(put(&node, stopping(&node)), clock.at(5.0));
            lose(&mut l, &clock, &node, 10.0 + 0.1 * i as f64);
        }
        let d = run(&mut l, &clock, 10.0, 11.0);
        assert_eq!(d.transitions.len(), 10);
        assert!(d.transitions.iter().all(|t| (t.state, t.reason) == STOPPED));
        assert!(d.disruptions.is_empty());
    }

    /// etcd's term `term`, seen at `at` seconds.
    fn term(l: &mut Liveness, clock: &Clock, term: u64, at: f64) {
        l.observe_election(
            ElectionEvent::Term {
                term,
                seen_at: clock.at(at).instant,
            },
            clock.at(at),
        );
    }

    /// A time-to-live answer for `node`'s lease 7 in `term`: `remaining` seconds, asked at `at`
    /// seconds and answered 10 ms later.
    fn audit(l: &mut Liveness, clock: &Clock, node: &str, term: u64, remaining: i64, at: f64) {
        l.observe_election(
            ElectionEvent::LeaseAudit {
                node: node.into(),
                lease: 7,
                term,
                remaining_secs: remaining,
                sent_at: clock.at(at).instant,
                received_at: clock.at(at + 0.01).instant,
            },
            clock.at(at + 0.01),
        );
    }

    /// worker-1 and worker-2 Alive, etcd at term 5 since the start, then a new leader (term 6)
    /// seen at 1 s.
    fn after_a_leader_change(clock: &Clock) -> Liveness {
        let mut l = started(clock, &["worker-1", "worker-2"], &[]);
        term(&mut l, clock, 5, 0.0);
        assert!(l.doubted().is_empty(), "the first term seen is no change");
        term(&mut l, clock, 6, 1.0);
        let d = l.take_decisions();
        assert_eq!(d.leader_changes, [(5, 6)]);
        assert!(d.transitions.is_empty());
        assert_eq!(l.doubted(), names(&["worker-1", "worker-2"]));
        l
    }

    #[test]
    fn after_a_leader_change_a_node_whose_agent_does_not_prove_it_renews_is_unknown_a_ttl_later() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        // worker-1's agent writes its heartbeat: it acts now.
        l.observe(put("worker-1", heartbeat("worker-1", 3)), clock.at(3.0));
        l.take_decisions();
        assert_eq!(l.doubted(), names(&["worker-2"]));
        assert_eq!(
            l.next_deadline(),
            Some(clock.at(11.0).instant),
            "the task wakes then"
        );
        // The same term again, and an older one (a lagging member), change nothing.
        term(&mut l, &clock, 6, 2.0);
        term(&mut l, &clock, 4, 2.5);
        l.tick(clock.at(10.999));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(11.0));
        assert_decided(&mut l, &[("worker-2", LEADER_CHURN)]);
        assert_eq!(state(&l, "worker-1"), Some(ALIVE));
        let message = &l.records()["worker-2"].verdict.as_ref().unwrap().message;
        assert!(message.contains("leader changed 10s ago"), "{message}");
    }

    #[test]
    fn a_lease_whose_expiry_a_keep_alive_moved_proves_its_agent_renews_it() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        // Both leases as the new leader reset them: 10 s and its election timeout from ~1 s.
        audit(&mut l, &clock, "worker-1", 6, 10, 1.5);
        audit(&mut l, &clock, "worker-2", 6, 10, 1.5);
        // worker-1's agent renews at 4.5 s (expiry 14.5); worker-2's is frozen (expiry ~12).
        for at in [2.5, 3.5, 4.6, 5.6, 6.6] {
            let left = |expiry: f64| (expiry - at).floor() as i64;
            audit(
                &mut l,
                &clock,
                "worker-1",
                6,
                left(if at < 4.5 { 12.0 } else { 14.5 }),
                at,
            );
            audit(&mut l, &clock, "worker-2", 6, left(12.0), at);
        }
        assert_eq!(l.doubted(), names(&["worker-2"]));
        l.tick(clock.at(11.0));
        assert_decided(&mut l, &[("worker-2", LEADER_CHURN)]);
        // worker-2's agent is back: a keep-alive moves its expiry, and it is Alive again.
        audit(&mut l, &clock, "worker-2", 6, 1, 11.5);
        audit(&mut l, &clock, "worker-2", 6, 9, 12.0);
        assert_decided(&mut l, &[("worker-2", ALIVE)]);
        assert!(l.doubted().is_empty());
    }

    #[test]
    fn lease_answers_that_may_predate_the_new_leaders_reset_prove_nothing() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        // Asked before term 6 was seen: it may have been answered before the reset.
        audit(&mut l, &clock, "worker-1", 6, 3, 0.9);
        // From the old term.
        audit(&mut l, &clock, "worker-1", 5, 3, 1.2);
        audit(&mut l, &clock, "worker-1", 6, 10, 1.5);
        assert_eq!(l.doubted(), names(&["worker-1", "worker-2"]));
        // An answer in a newer term is a leader change: every expiry placed before is void, and
        // the answer itself came before the term was seen.
        audit(&mut l, &clock, "worker-1", 7, 6, 5.0);
        assert_eq!(l.take_decisions().leader_changes, [(6, 7)]);
        assert_eq!(l.records()["worker-1"].lease_expiry, None);
        // A new lease (the agent restarted) starts over instead of proving anything.
        audit(&mut l, &clock, "worker-1", 7, 10, 5.5);
        l.observe_election(
            ElectionEvent::LeaseAudit {
                node: "worker-1".into(),
                lease: 8,
                term: 7,
                remaining_secs: 3,
                sent_at: clock.at(6.0).instant,
                received_at: clock.at(6.0).instant,
            },
            clock.at(6.0),
        );
        assert_eq!(l.doubted(), names(&["worker-1", "worker-2"]));
        // Doubted since the first change they were not proven after.
        l.tick(clock.at(11.0));
        assert_eq!(l.take_decisions().transitions.len(), 2);
    }

    #[test]
    fn while_leaders_keep_changing_a_frozen_nodes_key_stays_and_it_is_unknown_then_dead() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        l.observe(put("worker-1", heartbeat("worker-1", 1)), clock.at(1.5));
        // A new leader every 5 s; worker-1's agent writes after each, worker-2's is frozen.
        let mut all = Vec::new();
        for i in 0..8 {
            let at = 6.0 + 5.0 * i as f64;
            term(&mut l, &clock, 7 + i, at);
            l.observe(
                put("worker-1", heartbeat("worker-1", 2 + i64::from(i as u8))),
                clock.at(at + 1.0),
            );
            for t in [at + 2.0, at + 4.9] {
                l.tick(clock.at(t));
                all.extend(
                    transitions(&l.take_decisions())
                        .into_iter()
                        .map(|(n, v)| (n.to_string(), v)),
                );
            }
        }
        assert_eq!(
            all,
            [("worker-2".to_string(), LEADER_CHURN)],
            "Unknown once, 10 s after the first change"
        );
        assert_eq!(state(&l, "worker-1"), Some(ALIVE));
        // The leaders settle (the last change at 41 s): worker-2's lease runs out.
        l.observe(
            expired("worker-2", None, clock.at(52.0).instant),
            clock.at(52.0),
        );
        assert!(l.doubted().is_empty());
        l.tick(clock.at(52.0 + HOLD));
        assert_decided(&mut l, &[("worker-2", EXPIRED)]);
    }

    #[test]
    fn a_key_that_outlives_the_last_leader_change_by_twice_its_ttl_is_alive_again() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        l.tick(clock.at(11.0));
        assert_eq!(l.take_decisions().transitions.len(), 2);
        // A re-list shows the keys: listed is not renewed, they stay Unknown.
        relist(
            &mut l,
            &[
                ("worker-1", heartbeat("worker-1", 0)),
                ("worker-2", heartbeat("worker-2", 0)),
            ],
            false,
            clock.at(12.0),
        );
        assert_decided(&mut l, &[]);
        assert_eq!(state(&l, "worker-1"), Some(LEADER_CHURN));
        // The leader changed last at 1 s: a lease it reset ran out by 1 + 10 + its election
        // timeout, so a key there at 1 + 2 x 10 + 1 s is being renewed.
        l.tick(clock.at(21.999));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(22.0));
        assert_decided(&mut l, &[("worker-1", ALIVE), ("worker-2", ALIVE)]);
        assert!(l.doubted().is_empty());
    }

    #[test]
    fn a_leader_churn_node_whose_key_is_gone_from_a_relist_is_dead_and_dead_nodes_are_not_doubted()
    {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        l.observe(
            expired("worker-1", None, clock.at(2.0).instant),
            clock.at(2.0),
        );
        l.tick(clock.at(2.0 + HOLD));
        assert_decided(&mut l, &[("worker-1", EXPIRED)]);
        term(&mut l, &clock, 7, 4.0);
        assert_eq!(
            l.doubted(),
            names(&["worker-2"]),
            "a Dead node has nothing to prove"
        );
        l.tick(clock.at(11.0));
        assert_decided(&mut l, &[("worker-2", LEADER_CHURN)]);
        relist(&mut l, &[], false, clock.at(12.0));
        assert_decided(&mut l, &[("worker-2", EXPIRED)]);
    }

    #[test]
    fn while_the_watch_is_lost_the_outage_rules_judge_doubted_nodes_and_no_deadline_is_left_due() {
        let clock = Clock::new();
        let mut l = after_a_leader_change(&clock);
        l.observe(
            HeartbeatEvent::Interrupted {
                since: clock.at(2.0).instant,
            },
            clock.at(2.0),
        );
        l.tick(clock.at(11.0));
        assert_decided(&mut l, &[]);
        assert_eq!(
            l.next_deadline(),
            None,
            "nothing due that a tick cannot move"
        );
        l.tick(clock.at(12.5));
        let d = l.take_decisions();
        assert!(
            d.transitions
                .iter()
                .all(|t| t.reason == LivenessReason::EtcdUnreachable),
            "{:?}",
            d.transitions
        );
        assert_eq!(d.transitions.len(), 2);
        // Listed again: the outage's rule (a key written since, or twice the TTL) brings them
        // back, and the doubt of the leader change ends with it.
        relist(
            &mut l,
            &[
                ("worker-1", heartbeat("worker-1", 13)),
                ("worker-2", heartbeat("worker-2", 0)),
            ],
            false,
            clock.at(13.0),
        );
        assert_decided(&mut l, &[("worker-1", ALIVE)]);
        assert_eq!(
            l.doubted(),
            names(&["worker-2"]),
            "worker-1 wrote after the change"
        );
        l.tick(clock.at(13.5));
        assert_decided(&mut l, &[]);
        l.tick(clock.at(34.0));
        assert_decided(&mut l, &[("worker-2", ALIVE)]);
        assert!(l.doubted().is_empty());
    }

    #[test]
    fn lease_expiries_move_only_beyond_what_whole_seconds_blur() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // 9 s left asked at 1.0 s: the expiry is in [10.0, 11.05).
        let first = LeaseExpiry::from_answer(7, 9, at(1.0), at(1.05));
        assert!(!LeaseExpiry::from_answer(7, 8, at(2.0), at(2.05)).moved_from(&first));
        assert!(!LeaseExpiry::from_answer(7, 9, at(2.0), at(2.05)).moved_from(&first));
        assert!(LeaseExpiry::from_answer(7, 9, at(2.1), at(2.15)).moved_from(&first));
        assert!(LeaseExpiry::from_answer(7, 7, at(1.0), at(1.05)).moved_from(&first));
        assert!(!LeaseExpiry::from_answer(8, 20, at(2.0), at(2.05)).moved_from(&first));
    }

    #[test]
    fn a_few_answers_place_an_expiry_closely_enough_to_see_a_keep_alive_move_it_under_a_second() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // A lease expiring at 12 s, asked five times, each answer 10 ms after its request.
        let answer = |expiry: f64, asked: f64| {
            let left = (expiry - asked).floor() as u64;
            LeaseExpiry::from_answer(7, left, at(asked), at(asked + 0.01))
        };
        let mut placed = answer(12.0, 1.0);
        for asked in [1.5, 2.3, 2.8, 3.1] {
            let next = answer(12.0, asked);
            assert!(!next.moved_from(&placed), "asked at {asked}");
            placed = placed.narrowed(&next);
        }
        assert_eq!((placed.earliest, placed.before), (at(12.0), at(12.11)));
        // A keep-alive moves it to 12.4 s: not seen while the answers blur it, then seen.
        assert!(!answer(12.4, 3.5).moved_from(&placed));
        assert!(answer(12.4, 4.35).moved_from(&placed));
    }
}
