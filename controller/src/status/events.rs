//! The Events of liveness transitions: one per transition while transitions are few, and while
//! many nodes change at once (a mass failure, a cold start) one summary per state and reason
//! every few seconds, so that the API server's writes go to the statuses. Kubernetes' own
//! controllers rate-limit their Events the same way (a burst, then a slow refill).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use nodepulse_crd::v1alpha1::{LivenessReason, NodeState, transition_line};

use crate::status::record::Verdict;

/// Transitions with an Event each before the budget runs out.
const BURST: f64 = 20.0;
/// Events the budget regains per second.
const REFILL_PER_SECOND: f64 = 1.0;
/// How long transitions beyond the budget are gathered before their summary goes out.
const SUMMARY_WINDOW: Duration = Duration::from_secs(5);
/// Nodes named in a summary (the MonitorNodes themselves show every one).
const NAMED: usize = 10;
/// The Event reason of a mass disruption: one Event for all its nodes.
const DISRUPTION: &str = "MassDisruption";
/// The API server refuses an Event note longer than 1 kB.
const NOTE_LIMIT: usize = 1000;

/// Transitions beyond the budget with the same state and reason.
struct Summary {
    /// The first node's MonitorNode: a summary needs an object to be about.
    regarding: ObjectReference,
    named: Vec<String>,
    count: usize,
    since: Instant,
}

/// Raises the transitions' Events within a budget; summarises the rest.
pub struct TransitionEvents {
    recorder: Recorder,
    budget: f64,
    refilled_at: Instant,
    summaries: BTreeMap<(&'static str, String), (NodeState, Summary)>,
    publishing: FuturesUnordered<BoxFuture<'static, ()>>,
}

impl TransitionEvents {
    /// Events through `recorder`, starting with a full budget.
    pub fn new(recorder: Recorder) -> Self {
        TransitionEvents {
            recorder,
            budget: BURST,
            refilled_at: Instant::now(),
            summaries: BTreeMap::new(),
            publishing: FuturesUnordered::new(),
        }
    }

    /// `node` went through transition `t`, now written to its MonitorNode `regarding`.
    pub fn raise(&mut self, node: &str, regarding: &ObjectReference, t: &Verdict) {
        let now = Instant::now();
        self.budget = (self.budget
            + now.duration_since(self.refilled_at).as_secs_f64() * REFILL_PER_SECOND)
            .min(BURST);
        self.refilled_at = now;
        // While a summary gathers, the transitions join it: the budget is spent. A mass
        // disruption is one event, not one per node: it always goes to its summary.
        let disrupted = t.reason == LivenessReason::MassDisruption;
        let gathering = self.summaries.keys().any(|(r, _)| *r != DISRUPTION);
        if !disrupted && !gathering && self.budget >= 1.0 {
            self.budget -= 1.0;
            let note = format!(
                "{}: {}",
                transition_line(node, t.state, t.reason),
                t.message
            );
            self.publish(event(t.state, reason(t), note, "Heartbeat"), regarding);
            return;
        }
        let (_, summary) = self
            .summaries
            .entry((reason(t), state_name(t.state).to_string()))
            .or_insert_with(|| {
                (
                    t.state,
                    Summary {
                        regarding: regarding.clone(),
                        named: Vec::new(),
                        count: 0,
                        since: now,
                    },
                )
            });
        summary.count += 1;
        if summary.named.len() < NAMED {
            summary.named.push(node.to_string());
        }
    }

    /// Publishes the summaries whose window has passed.
    pub fn flush_due(&mut self) {
        let now = Instant::now();
        let due: Vec<_> = self
            .summaries
            .iter()
            .filter(|(_, (_, s))| now.duration_since(s.since) >= SUMMARY_WINDOW)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let Some((state, s)) = self.summaries.remove(&key) else {
                continue;
            };
            let more = if s.count > s.named.len() {
                format!(
                    " and {} more (kubectl get monitornodes shows each)",
                    s.count - s.named.len()
                )
            } else {
                String::new()
            };
            let mut note = if key.0 == DISRUPTION {
                format!(
                    "mass disruption: {} nodes lost their heartbeat together, more than the brake's share of their zone or of the fleet; they are Unknown, not Dead, until their heartbeats come back or the disruption is judged over: {}{more}",
                    s.count,
                    s.named.join(", "),
                )
            } else {
                format!(
                    "{} nodes {} ({}) within {}s, too many for an Event each: {}{more}",
                    s.count,
                    state_name(state),
                    key.0,
                    now.duration_since(s.since).as_secs(),
                    s.named.join(", "),
                )
            };
            if note.len() > NOTE_LIMIT {
                let cut = (0..=NOTE_LIMIT)
                    .rev()
                    .find(|i| note.is_char_boundary(*i))
                    .unwrap_or(0);
                note.truncate(cut);
            }
            tracing::info!(
                nodes = s.count,
                reason = key.0,
                "{} nodes {} within {}s: one summary Event",
                s.count,
                state_name(state),
                now.duration_since(s.since).as_secs()
            );
            self.publish(event(state, key.0, note, "HeartbeatSummary"), &s.regarding);
        }
    }

    /// Resolves when an Event being published is done; pending while none is.
    pub async fn published(&mut self) {
        match self.publishing.next().await {
            Some(()) => {}
            None => std::future::pending().await,
        }
    }

    fn publish(&mut self, event: Event, regarding: &ObjectReference) {
        let recorder = self.recorder.clone();
        let regarding = regarding.clone();
        self.publishing.push(Box::pin(async move {
            if let Err(e) = recorder.publish(&event, &regarding).await {
                // The status is what matters; a lost Event is logged, not retried.
                tracing::warn!(object = ?regarding.name, error = %e, "could not record Event {}", event.reason);
            }
        }));
    }
}

fn event(state: NodeState, reason: &str, note: String, action: &str) -> Event {
    Event {
        type_: match state {
            NodeState::Alive => EventType::Normal,
            _ => EventType::Warning,
        },
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}

/// The Event reason of a transition. A death's reason is the status's (HeartbeatExpired,
/// AgentStopped): the recorder folds Events with the same reason and action into one series
/// under the first message, so a clean stop after an expiry would read "heartbeat expired".
fn reason(t: &Verdict) -> &'static str {
    match t.state {
        NodeState::Alive => "NodeAlive",
        NodeState::Unknown if t.reason == LivenessReason::MassDisruption => DISRUPTION,
        NodeState::Unknown => "NodeStatusUnknown",
        _ => t.reason.as_str(),
    }
}

fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Alive => "Alive",
        NodeState::Dead => "Dead",
        NodeState::Unknown => "Unknown",
    }
}
