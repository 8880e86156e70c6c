//! Which nodes are alive, from the heartbeat events: the pure logic behind `nodepulsectl watch`.
//!
//! A put on a node not known to be alive is the node coming alive; a put on an alive node is a
//! value update; a delete is a death, "agent stopped" when the last value seen said the agent was
//! stopping (it writes that before revoking its lease), "heartbeat expired" otherwise. After a
//! re-list (start, compaction) only real differences come out as transitions. A re-list of a new
//! store (etcd rebuilt or restored) holds no lease yet: a node missing from it is not dead until
//! its TTL has passed without its agent writing the key again ([`NodeTracker::due`]).

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
    /// Missing from a new store: Dead at this time unless its agent writes the key first.
    dead_unless_written_by: Option<Timestamp>,
}

/// A live agent writes its key on a new store within a third of its TTL; this on top of the
/// TTL covers the agent's reconnect.
const REBUILT_STORE_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(1);

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
                t.dead_unless_written_by = None;
                NodeChange::Updated(hb)
            }
            _ => {
                self.nodes.insert(
                    node.to_string(),
                    TrackedNode {
                        alive: true,
                        last: hb.clone(),
                        since: at,
                        dead_unless_written_by: None,
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
        t.dead_unless_written_by = None;
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
                    dead_unless_written_by: None,
                },
            );
        }
    }

    /// A re-list after the watch history was lost (compaction, or `replaced`: a new store): the
    /// keys present now replace what the lost events would have said. Returns only real
    /// transitions, by node name. On a new store, a node missing is not dead yet: it is given
    /// its TTL to be written again.
    pub fn relist(
        &mut self,
        present: Vec<(String, Heartbeat)>,
        replaced: bool,
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
            if replaced {
                if let Some(t) = self.nodes.get_mut(&node) {
                    let ttl = jiff::SignedDuration::from_secs(t.last.ttl_seconds.into());
                    t.dead_unless_written_by
                        .get_or_insert(at + ttl + REBUILT_STORE_GRACE);
                }
            } else if let Some(reason) = self.delete(&node, at) {
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

    /// Nodes missing from a new store whose time to be written again has passed by `at`: Dead.
    pub fn due(&mut self, at: Timestamp) -> Vec<(String, NodeChange)> {
        let due: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, t)| t.alive && t.dead_unless_written_by.is_some_and(|by| by <= at))
            .map(|(n, _)| n.clone())
            .collect();
        due.into_iter()
            .filter_map(|node| {
                let reason = self.delete(&node, at)?;
                Some((node, NodeChange::Dead(reason)))
            })
            .collect()
    }

    /// When [`NodeTracker::due`] has something next, if ever.
    pub fn next_due(&self) -> Option<Timestamp> {
        self.nodes
            .values()
            .filter(|t| t.alive)
            .filter_map(|t| t.dead_unless_written_by)
            .min()
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
            false,
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

    #[test]
    fn a_node_missing_from_a_new_store_is_dead_only_once_its_ttl_passed_unwritten() {
        let mut tr = NodeTracker::default();
        tr.seed(vec![
            ("back".into(), hb(AgentState::Running)),
            ("gone".into(), hb(AgentState::Running)),
        ]);
        // etcd rebuilt: its first list is empty, no agent has written yet. Nothing expired.
        let at = t("2026-11-22T06:00:00Z");
        assert_eq!(tr.relist(vec![], true, at), vec![]);
        assert_eq!(tr.alive_rows().len(), 2, "not dead yet");
        // The TTL (5 s) and a second of grace.
        assert_eq!(tr.next_due(), Some(t("2026-11-22T06:00:06Z")));
        // One agent writes its key on the new store: the node never stopped being alive.
        assert!(matches!(
            tr.put("back", hb(AgentState::Running), t("2026-11-22T06:00:00.1Z")),
            NodeChange::Updated(_)
        ));
        assert_eq!(tr.due(t("2026-11-22T06:00:05.9Z")), vec![]);
        assert_eq!(
            tr.due(t("2026-11-22T06:00:06Z")),
            vec![(
                "gone".to_string(),
                NodeChange::Dead(LivenessReason::HeartbeatExpired)
            )]
        );
        assert_eq!(tr.next_due(), None);
        let names: Vec<_> = tr.alive_rows().into_iter().map(|r| r.node).collect();
        assert_eq!(names, ["back"]);
        // A later re-list of the same store is a plain one again.
        assert_eq!(tr.relist(vec![], false, at).len(), 1);
    }
}
