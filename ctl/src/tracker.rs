//! Which nodes are alive, from the heartbeat events: the pure logic behind `nodepulsectl watch`.
//!
//! A put on a node not known to be alive is the node coming alive; a put on an alive node is a
//! value update; a delete is a death, "agent stopped" when the last value seen said the agent was
//! stopping (it writes that before revoking its lease), "heartbeat expired" otherwise. After a
//! re-list (start, compaction) only real differences come out as transitions.

use std::collections::BTreeMap;

use jiff::Timestamp;
use nodepulse_crd::v1alpha1::LivenessReason;
use nodepulse_crd::wire::{AgentState, Heartbeat};

use crate::nodes::NodeRow;

/// What happened to one node.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeChange {
    /// The node has a heartbeat and was not known to be alive.
    Alive(Heartbeat),
    /// An alive node's heartbeat value changed (printed only with `-v`).
    Updated(Heartbeat),
    /// The node's heartbeat key is gone: `HeartbeatExpired` or `AgentStopped`.
    Dead(LivenessReason),
}

#[derive(Clone, Debug)]
struct TrackedNode {
    alive: bool,
    last: Heartbeat,
    since: Timestamp,
}

/// Every node seen since the watch started, alive or dead.
#[derive(Debug, Default)]
pub struct NodeTracker {
    nodes: BTreeMap<String, TrackedNode>,
}

impl NodeTracker {
    /// A put on the node's heartbeat key, seen at `at`.
    pub fn put(&mut self, node: &str, hb: Heartbeat, at: Timestamp) -> NodeChange {
        match self.nodes.get_mut(node) {
            Some(t) if t.alive => {
                t.last = hb.clone();
                NodeChange::Updated(hb)
            }
            _ => {
                self.nodes.insert(
                    node.to_string(),
                    TrackedNode {
                        alive: true,
                        last: hb.clone(),
                        since: at,
                    },
                );
                NodeChange::Alive(hb)
            }
        }
    }

    /// A delete of the node's heartbeat key, seen at `at`. `None` when the node was not alive
    /// (a key we never saw, or a second delete).
    pub fn delete(&mut self, node: &str, at: Timestamp) -> Option<LivenessReason> {
        let t = self.nodes.get_mut(node).filter(|t| t.alive)?;
        t.alive = false;
        t.since = at;
        Some(match t.last.state {
            AgentState::Stopping => LivenessReason::AgentStopped,
            AgentState::Running => LivenessReason::HeartbeatExpired,
        })
    }

    /// The first list: every node present is alive since its agent started, and nothing is
    /// printed as a transition (the table shows them).
    pub fn seed(&mut self, present: Vec<(String, Heartbeat)>) {
        for (node, hb) in present {
            let since = hb.started_at;
            self.nodes.insert(
                node,
                TrackedNode {
                    alive: true,
                    last: hb,
                    since,
                },
            );
        }
    }

    /// A re-list after the watch history was lost (compaction): the keys present now replace
    /// what the lost events would have said. Returns only real transitions, by node name.
    pub fn relist(
        &mut self,
        present: Vec<(String, Heartbeat)>,
        at: Timestamp,
    ) -> Vec<(String, NodeChange)> {
        let mut out = Vec::new();
        let present: BTreeMap<String, Heartbeat> = present.into_iter().collect();
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(n, t)| t.alive && !present.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for node in gone {
            if let Some(reason) = self.delete(&node, at) {
                out.push((node, NodeChange::Dead(reason)));
            }
        }
        for (node, hb) in present {
            if let t @ NodeChange::Alive(_) = self.put(&node, hb, at) {
                out.push((node, t));
            }
        }
        out
    }

    /// The rows of the nodes alive now.
    pub fn alive_rows(&self) -> Vec<NodeRow> {
        self.nodes
            .iter()
            .filter(|(_, t)| t.alive)
            .map(|(n, t)| NodeRow::alive(n, &t.last, t.since))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn hb(state: AgentState) -> Heartbeat {
        let mut hb = Heartbeat::running("n", 5, t("2026-11-22T05:00:00Z"));
        hb.state = state;
        hb
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn put_then_update_then_expiry() {
        let mut tr = NodeTracker::default();
        let at = t("2026-11-22T06:00:00Z");
        assert!(matches!(
            tr.put("w1", hb(AgentState::Running), at),
            NodeChange::Alive(_)
        ));
        assert!(matches!(
            tr.put("w1", hb(AgentState::Running), at),
            NodeChange::Updated(_)
        ));
        assert_eq!(tr.delete("w1", at), Some(LivenessReason::HeartbeatExpired));
        assert_eq!(tr.delete("w1", at), None, "a second delete is not a death");
        assert_eq!(tr.delete("never-seen", at), None);
        assert!(tr.alive_rows().is_empty());
        assert!(matches!(
            tr.put("w1", hb(AgentState::Running), at),
            NodeChange::Alive(_)
        ));
    }

    #[test]
    fn a_stopping_value_before_the_delete_means_agent_stopped() {
        let mut tr = NodeTracker::default();
        let at = t("2026-11-22T06:00:00Z");
        tr.put("w1", hb(AgentState::Running), at);
        tr.put("w1", hb(AgentState::Stopping), at);
        assert_eq!(tr.delete("w1", at), Some(LivenessReason::AgentStopped));
    }

    #[test]
    fn relist_reports_only_real_differences() {
        let mut tr = NodeTracker::default();
        tr.seed(vec![
            ("stays".into(), hb(AgentState::Running)),
            ("dies".into(), hb(AgentState::Running)),
            ("stops".into(), hb(AgentState::Stopping)),
        ]);
        assert_eq!(tr.alive_rows().len(), 3);
        assert_eq!(tr.alive_rows()[0].since, t("2026-11-22T05:00:00Z"));
        let at = t("2026-11-22T06:00:00Z");
        let got = tr.relist(
            vec![
                ("stays".into(), hb(AgentState::Running)),
                ("new".into(), hb(AgentState::Running)),
            ],
            at,
        );
        let summary: Vec<(String, String)> = got
            .into_iter()
            .map(|(n, t)| {
                let what = match t {
                    NodeChange::Alive(_) => "alive".to_string(),
                    NodeChange::Updated(_) => "updated".to_string(),
                    NodeChange::Dead(r) => format!("dead: {r}"),
                };
                (n, what)
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("dies".into(), "dead: heartbeat expired".into()),
                ("stops".into(), "dead: agent stopped".into()),
                ("new".into(), "alive".into()),
            ]
        );
        let names: Vec<_> = tr.alive_rows().into_iter().map(|r| r.node).collect();
        assert_eq!(names, ["new", "stays"]);
    }
}
