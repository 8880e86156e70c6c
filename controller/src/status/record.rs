//! One node's record: its verdict as the controller judges it, the heartbeat it judges from,
//! the status last written and where its writes stand, and the rules by which a re-list moves
//! it.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use nodepulse_crd::v1alpha1::{LivenessReason, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::Heartbeat;

use nodepulse_runtime::Backoff;

/// What the status's `state`, `reason`, `message` and `lastTransitionTime` say; a transition
/// waiting for its Event is one of these too.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Alive, Dead or Unknown.
    pub state: NodeState,
    /// Why.
    pub reason: LivenessReason,
    /// The sentence for people.
    pub message: String,
    /// When the state was entered.
    pub since: Time,
}

impl Verdict {
    /// The liveness a listed status shows, if it is one the controller could have written.
    fn from_status(status: &MonitorNodeStatus, now: Timestamp) -> Option<Verdict> {
        Some(Verdict {
            state: status.state?,
            reason: LivenessReason::parse(status.reason.as_deref()?)?,
            message: status.message.clone().unwrap_or_default(),
            since: status.last_transition_time.clone().unwrap_or(Time(now)),
        })
    }
}

/// Everything the controller keeps about one node.
#[derive(Default)]
pub struct NodeRecord {
    /// `None` until the node is first judged.
    pub verdict: Option<Verdict>,
    /// The last heartbeat value that parsed.
    pub heartbeat: Option<Heartbeat>,
    /// The status last written (or read from the API server on a re-list).
    pub written: Option<MonitorNodeStatus>,
    /// Transitions whose Events have not gone out yet.
    pub pending_events: Vec<Verdict>,
    /// When the delete that made the node Dead arrived, to time the status write.
    pub dead_seen_at: Option<Instant>,
    /// Unknown since an outage, its key listed again but not yet proven live: Alive at this
    /// instant if its key is still there (its lease then outlived any extension etcd gave it).
    pub alive_at: Option<Instant>,
    /// Its heartbeat is gone: Dead at this instant unless an agent writes it again first (a
    /// key deleted by hand while its lease lives, one absent from a rebuilt store) or the loss
    /// turns out to be part of a mass disruption (every lost heartbeat waits a moment for
    /// that).
    pub dead_at: Option<Instant>,
    /// The verdict `dead_at` brings, when it is not the default `HeartbeatExpired`.
    pub dead_reason: Option<(LivenessReason, String)>,
    /// When its heartbeat was lost (and not back since): counted for a mass disruption.
    pub lost_at: Option<Instant>,
    /// Since when etcd's leader changed without the agent proving since that it renews its
    /// lease (each new leader restarts every lease at its full TTL, so the key alone proves
    /// nothing then): Unknown a TTL after this unless it does.
    pub doubt_since: Option<Instant>,
    /// The lease's expiry as the time-to-live answers since the last leader change place it:
    /// an answer that places it elsewhere means a keep-alive moved it.
    pub lease_expiry: Option<LeaseExpiry>,
    /// Where the node's status writes stand.
    pub write: WriteState,
}

impl NodeRecord {
    /// The node's state, once judged.
    pub fn state(&self) -> Option<NodeState> {
        self.verdict.as_ref().map(|l| l.state)
    }

    /// The reason of the node's state, once judged.
    pub fn reason(&self) -> Option<LivenessReason> {
        self.verdict.as_ref().map(|l| l.reason)
    }

    /// Moves the node to `state` at wall time `at`, with its Event to come.
    pub fn transition(
        &mut self,
        state: NodeState,
        reason: LivenessReason,
        message: String,
        at: Timestamp,
    ) {
        let verdict = Verdict {
            state,
            reason,
            message,
            since: Time(at),
        };
        self.pending_events.push(verdict.clone());
        self.verdict = Some(verdict);
    }

    /// The node's heartbeat TTL in seconds, as last reported (10, the agent's default, if never).
    pub fn ttl_seconds(&self) -> u32 {
        self.heartbeat
            .as_ref()
            .map(|hb| hb.ttl_seconds)
            .or_else(|| self.written.as_ref().and_then(|w| w.ttl_seconds))
            .unwrap_or(10)
    }

    /// Unknown because the controller could not see etcd (not for another reason).
    pub fn is_unknown_for_etcd(&self) -> bool {
        self.state() == Some(NodeState::Unknown)
            && self.reason() == Some(LivenessReason::EtcdUnreachable)
    }

    /// Whether a heartbeat listed after an outage was written after the last one seen before
    /// it: then its agent ran after the controller lost sight of it.
    pub fn proves_life(&self, listed: Option<&Heartbeat>) -> bool {
        let Some(listed) = listed else {
            return false;
        };
        let before = self.heartbeat.as_ref().map(|hb| hb.updated_at).or_else(|| {
            self.written
                .as_ref()
                .and_then(|w| w.last_heartbeat_time.as_ref())
                .map(|t| t.0)
        });
        before.is_some_and(|before| listed.updated_at > before)
    }

    /// A transition of ours is being written, or waits for a retry: it is newer than anything
    /// a list of the MonitorNodes returns.
    fn ours_pending(&self) -> bool {
        self.write.in_flight || !self.pending_events.is_empty()
    }

    /// Takes the API server's view of the node into the record on a re-list. A transition of
    /// ours still being written (or waiting for a retry) is newer than what the list returned:
    /// then the record keeps its liveness, or the re-list would undo a transition whose Event is
    /// on its way and raise it a second time.
    pub fn adopt_listed(
        &mut self,
        status: Option<&MonitorNodeStatus>,
        now: Instant,
        wall: Timestamp,
    ) {
        if let Some(status) = status
            && !self.ours_pending()
        {
            self.verdict = Verdict::from_status(status, wall);
        }
        self.written = Some(status.cloned().unwrap_or_default());
        self.write.last_write.get_or_insert(now);
    }

    /// The MonitorNode was missing from a re-list: deleted behind our back, so forget what it
    /// showed and a live node's is recreated. Unless a write of ours is in flight (creating it,
    /// most likely) or waits for a retry: its transition is newer than the list, and forgetting
    /// it would judge the node anew and raise the same transition's Event twice.
    pub fn forget_unlisted(&mut self) {
        self.written = None;
        if self.ours_pending() {
            return;
        }
        *self = NodeRecord {
            heartbeat: self.heartbeat.take(),
            ..NodeRecord::default()
        };
    }
}

/// Where a lease's expiry lies, from one time-to-live answer: etcd reports whole seconds
/// (rounded down) at some instant between the request and the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseExpiry {
    /// The lease.
    pub lease: i64,
    /// The expiry is no earlier than this...
    pub earliest: Instant,
    /// ...and earlier than this.
    pub before: Instant,
}

impl LeaseExpiry {
    /// The expiry a time-to-live answer of `remaining_secs` places, asked at `sent_at` and
    /// answered at `received_at`.
    pub fn from_answer(
        lease: i64,
        remaining_secs: u64,
        sent_at: Instant,
        received_at: Instant,
    ) -> Self {
        let remaining = Duration::from_secs(remaining_secs);
        LeaseExpiry {
            lease,
            earliest: sent_at + remaining,
            before: received_at + remaining + Duration::from_secs(1),
        }
    }

    /// Whether the two cannot be the same expiry: only a keep-alive (or a leader change) moves
    /// a lease's expiry.
    pub fn moved_from(&self, other: &LeaseExpiry) -> bool {
        self.lease == other.lease
            && (self.earliest >= other.before || other.earliest >= self.before)
    }

    /// Where the expiry lies if both answers place the same one: each answer blurs a different
    /// part of its whole second, so a few answers place it within their latency, and a
    /// keep-alive that moves it by less than a second shows.
    pub fn narrowed(&self, other: &LeaseExpiry) -> LeaseExpiry {
        LeaseExpiry {
            lease: self.lease,
            earliest: self.earliest.max(other.earliest),
            before: self.before.min(other.before),
        }
    }
}

/// Where one node's writes stand.
#[derive(Default)]
pub struct WriteState {
    /// When the last write ended (or the status was listed).
    pub last_write: Option<Instant>,
    /// The usage figures or heartbeat time differ from what was written.
    pub usage_dirty: bool,
    /// ...and by enough to be worth a write once the usage interval has passed.
    pub usage_moved: bool,
    /// A write is queued or on its way.
    pub in_flight: bool,
    /// Something changed while it was: write again when it ends.
    pub write_again: bool,
    /// A failed write is retried at this instant.
    pub retry_at: Option<Instant>,
    /// The backoff of the retries, while writes fail.
    pub retry_backoff: Option<Backoff>,
    /// A write was started to give the MonitorNode its Node as owner.
    pub owner_requested: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    fn heartbeat() -> Heartbeat {
        let mut hb = Heartbeat::running("worker-1", 3, "2026-11-22T05:00:00Z".parse().unwrap());
        hb.updated_at = "2026-11-22T05:00:05Z".parse().unwrap();
        hb
    }

    fn liveness(state: NodeState, reason: LivenessReason) -> Option<Verdict> {
        Some(Verdict {
            state,
            reason,
            message: String::new(),
            since: Time(Timestamp::now()),
        })
    }

    #[test]
    fn a_relist_does_not_undo_a_transition_being_written() {
        // A Dead transition is being written (its Event goes out with it) when a re-list
        // returns the MonitorNode as it was before: still Alive.
        let mut rec = NodeRecord {
            verdict: liveness(NodeState::Dead, LivenessReason::HeartbeatExpired),
            ..Default::default()
        };
        rec.write.in_flight = true;
        let listed = MonitorNodeStatus {
            state: Some(NodeState::Alive),
            reason: Some("HeartbeatSeen".into()),
            ..Default::default()
        };
        rec.adopt_listed(Some(&listed), Instant::now(), Timestamp::now());
        // Taking the listed Alive would make the absent key a second Dead, and a second Event.
        assert_eq!(rec.state(), Some(NodeState::Dead));
        assert_eq!(rec.reason(), Some(LivenessReason::HeartbeatExpired));
        // Nothing of ours pending: the API server's view is taken.
        rec.write.in_flight = false;
        rec.adopt_listed(Some(&listed), Instant::now(), Timestamp::now());
        assert_eq!(rec.state(), Some(NodeState::Alive));
    }

    #[test]
    fn a_relist_that_misses_a_monitor_node_being_created_keeps_its_transition() {
        // A new node's first write (which creates its MonitorNode, with the NodeAlive Event) is
        // in flight when a re-list comes back without that MonitorNode.
        let mut rec = NodeRecord {
            verdict: liveness(NodeState::Alive, LivenessReason::HeartbeatSeen),
            heartbeat: Some(heartbeat()),
            ..Default::default()
        };
        rec.write.in_flight = true;
        rec.forget_unlisted();
        // Forgetting it would judge the node anew: a second Alive, a second NodeAlive Event.
        assert_eq!(rec.state(), Some(NodeState::Alive));
        assert!(rec.write.in_flight);
        assert!(
            rec.written.is_none(),
            "the next write creates the MonitorNode again"
        );
        // Nothing of ours pending: the MonitorNode was deleted behind our back.
        rec.write.in_flight = false;
        rec.forget_unlisted();
        assert_eq!(rec.state(), None);
        assert!(rec.heartbeat.is_some());
    }

    #[test]
    fn only_a_heartbeat_written_after_the_outage_proves_life() {
        let before = heartbeat();
        let rec = NodeRecord {
            verdict: liveness(NodeState::Unknown, LivenessReason::EtcdUnreachable),
            heartbeat: Some(before.clone()),
            ..Default::default()
        };
        assert!(rec.is_unknown_for_etcd());
        assert!(!rec.proves_life(Some(&before)));
        assert!(!rec.proves_life(None));
        let mut after = before.clone();
        after.updated_at = "2026-11-22T05:00:09Z".parse().unwrap();
        assert!(rec.proves_life(Some(&after)));
        assert_eq!(rec.ttl_seconds(), 3);
    }

    #[test]
    fn a_listed_status_of_ours_is_adopted_whole() {
        let mut rec = NodeRecord::default();
        let listed = MonitorNodeStatus {
            state: Some(NodeState::Unknown),
            reason: Some("ControllerRemoved".into()),
            message: Some("the controller was uninstalled".into()),
            ..Default::default()
        };
        rec.adopt_listed(Some(&listed), Instant::now(), Timestamp::now());
        let l = rec.verdict.as_ref().expect("adopted");
        assert_eq!(
            (l.state, l.reason, l.message.as_str()),
            (
                NodeState::Unknown,
                LivenessReason::ControllerRemoved,
                "the controller was uninstalled"
            )
        );
    }
}
