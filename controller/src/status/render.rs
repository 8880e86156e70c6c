//! The MonitorNode status a node's record calls for: state, heartbeat figures, the applied
//! config against the desired one, and the `Alive` and `ConfigApplied` conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use nodepulse_crd::v1alpha1::{AppliedConfigStatus, Maintenance, MonitorNodeStatus, NodeState};
use nodepulse_crd::wire::{ConfigValue, Heartbeat, UsageSummary};

use crate::status::record::NodeRecord;

/// Figures that moved less than this (percentage points, or load) are not worth a write of
/// their own; they go out with the next write, or after a few usage intervals.
const USAGE_STEP: f64 = 1.0;

/// The full status a node's record calls for. Fields the record does not know (after a re-list,
/// before the next heartbeat value) are carried over from what was written. `desired` is what
/// the config sync says the node's agent should run; `None` until that sync has run once, and
/// then the applied config is not judged afresh: a verdict against nothing would flash
/// `ConfigApplied=False` on every configured node at each controller start. `maintenance` is the
/// planned work the node's Node object shows.
pub fn compute_status(
    rec: &NodeRecord,
    desired: Option<&ConfigValue>,
    maintenance: Option<Maintenance>,
) -> MonitorNodeStatus {
    let written = rec.written.as_ref();
    let mut status = written.cloned().unwrap_or_default();
    status.maintenance = maintenance;
    let liveness = rec.verdict.as_ref();
    status.state = liveness.map(|l| l.state);
    status.reason = liveness.map(|l| l.reason.as_str().to_string());
    status.message = liveness.map(|l| l.message.clone());
    status.last_transition_time = liveness.map(|l| l.since.clone());
    if let Some(hb) = &rec.heartbeat {
        status.last_heartbeat_time = Some(Time(hb.updated_at));
        status.agent_version = Some(hb.agent_version.clone());
        status.ttl_seconds = Some(hb.ttl_seconds);
        status.usage = hb.usage.clone();
        status.config = Some(AppliedConfigStatus::from(&hb.config));
    }
    if let Some(config) = status.config.as_mut() {
        config.in_sync = match desired {
            Some(desired) => Some(config.runs(desired)),
            None => written
                .and_then(|w| w.config.as_ref())
                .filter(|w| w.interval == config.interval && w.metrics == config.metrics)
                .and_then(|w| w.in_sync),
        };
    }

    let previous = std::mem::take(&mut status.conditions);
    let mut conditions = vec![Condition {
        type_: "Alive".into(),
        status: match status.state {
            Some(NodeState::Alive) => "True",
            Some(NodeState::Dead) => "False",
            _ => "Unknown",
        }
        .into(),
        reason: status.reason.clone().unwrap_or_else(|| "Unknown".into()),
        message: status.message.clone().unwrap_or_default(),
        last_transition_time: status
            .last_transition_time
            .clone()
            .unwrap_or_else(|| Time(Timestamp::now())),
        observed_generation: None,
    }];
    let previous_config_applied = previous.iter().find(|c| c.type_ == "ConfigApplied");
    if let Some(config) = &status.config {
        let verdict = match (&config.error, config.in_sync) {
            (Some(error), _) => Some((
                "False",
                "Rejected",
                format!("the agent rejected its config: {error}"),
            )),
            (None, Some(false)) => Some((
                "False",
                "Pending",
                match desired {
                    Some(desired) => format!(
                        "the agent runs every {}s; {}s is desired",
                        config.interval, desired.interval
                    ),
                    None => previous_config_applied.map_or_else(
                        || format!("the agent runs every {}s", config.interval),
                        |c| c.message.clone(),
                    ),
                },
            )),
            (None, Some(true)) => Some((
                "True",
                "Applied",
                format!("the agent runs every {}s", config.interval),
            )),
            // Not judged yet: what was written stands.
            (None, None) => None,
        };
        match verdict {
            Some((cond_status, reason, message)) => {
                let since = previous_config_applied
                    .filter(|c| c.status == cond_status)
                    .map_or_else(
                        || Time(Timestamp::now()),
                        |c| c.last_transition_time.clone(),
                    );
                conditions.push(Condition {
                    type_: "ConfigApplied".into(),
                    status: cond_status.into(),
                    reason: reason.into(),
                    message,
                    last_transition_time: since,
                    observed_generation: None,
                });
            }
            None => conditions.extend(previous_config_applied.cloned()),
        }
    }
    status.conditions = conditions;
    status
}

/// Whether the usage figures moved enough to be worth a write of their own.
pub fn usage_moved(old: Option<&UsageSummary>, new: Option<&UsageSummary>) -> bool {
    let (Some(old), Some(new)) = (old, new) else {
        return old.is_some() != new.is_some();
    };
    let moved = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() >= USAGE_STEP,
        (a, b) => a.is_some() != b.is_some(),
    };
    moved(old.cpu_percent, new.cpu_percent)
        || moved(old.memory_percent, new.memory_percent)
        || moved(old.disk_percent, new.disk_percent)
        || moved(old.load1, new.load1)
}

/// The status minus what changes with every sample: the usage figures and the heartbeat time.
pub fn without_usage(status: &MonitorNodeStatus) -> MonitorNodeStatus {
    MonitorNodeStatus {
        usage: None,
        last_heartbeat_time: None,
        ..status.clone()
    }
}

/// Whether the written status describes an earlier run of the node's agent than the heartbeat
/// now seen (a reinstall, a replaced pod): its figures and heartbeat time are another agent's,
/// so they are replaced at once rather than after the usage interval. Both times come from the
/// same node's clock.
pub fn from_an_earlier_run(written: &MonitorNodeStatus, heartbeat: Option<&Heartbeat>) -> bool {
    match (&written.last_heartbeat_time, heartbeat) {
        (Some(Time(seen)), Some(hb)) => *seen < hb.started_at,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepulse_crd::v1alpha1::LivenessReason;
    use nodepulse_crd::wire::MetricSet;

    use crate::status::record::Verdict;

    fn heartbeat(interval: u32, cpu: f64) -> Heartbeat {
        let mut hb = Heartbeat::running("worker-1", 3, "2026-11-22T05:00:00Z".parse().unwrap());
        hb.updated_at = "2026-11-22T05:00:05Z".parse().unwrap();
        hb.config.interval = interval;
        hb.usage = Some(UsageSummary {
            cpu_percent: Some(cpu),
            ..Default::default()
        });
        hb
    }

    fn alive(hb: Heartbeat) -> NodeRecord {
        NodeRecord {
            verdict: Some(Verdict {
                state: NodeState::Alive,
                reason: LivenessReason::HeartbeatSeen,
                message: String::new(),
                since: Time(Timestamp::now()),
            }),
            heartbeat: Some(hb),
            ..Default::default()
        }
    }

    fn config_applied(status: &MonitorNodeStatus) -> Option<(&str, &str)> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied")
            .map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    #[test]
    fn usage_alone_is_not_an_urgent_change_but_config_is() {
        let defaults = ConfigValue::default();
        let mut rec = alive(heartbeat(10, 1.0));
        let first = compute_status(&rec, Some(&defaults), None);
        rec.written = Some(first.clone());
        assert_eq!(first.config.as_ref().unwrap().in_sync, Some(true));
        rec.heartbeat = Some(heartbeat(10, 55.0));
        let second = compute_status(&rec, Some(&defaults), None);
        assert_ne!(first, second);
        assert_eq!(without_usage(&first), without_usage(&second));
        rec.heartbeat = Some(heartbeat(2, 55.0));
        let third = compute_status(&rec, Some(&defaults), None);
        assert_ne!(without_usage(&first), without_usage(&third));
        assert_eq!(config_applied(&third), Some(("False", "Pending")));
        let desired = ConfigValue::new(2, MetricSet::all()).unwrap();
        let fourth = compute_status(&rec, Some(&desired), None);
        assert_eq!(fourth.config.as_ref().unwrap().in_sync, Some(true));
    }

    #[test]
    fn a_cordon_is_a_write_of_its_own_and_its_end_too() {
        let defaults = ConfigValue::default();
        let mut rec = alive(heartbeat(10, 1.0));
        let plain = compute_status(&rec, Some(&defaults), None);
        rec.written = Some(plain.clone());
        let cordoned = compute_status(&rec, Some(&defaults), Some(Maintenance::Cordoned));
        assert_eq!(cordoned.maintenance, Some(Maintenance::Cordoned));
        assert_eq!(cordoned.state, Some(NodeState::Alive));
        assert_ne!(without_usage(&plain), without_usage(&cordoned));
        rec.written = Some(cordoned);
        let uncordoned = compute_status(&rec, Some(&defaults), None);
        assert_eq!(uncordoned.maintenance, None);
        assert_eq!(without_usage(&plain), without_usage(&uncordoned));
    }

    #[test]
    fn config_applied_is_not_judged_before_the_first_config_sync() {
        let desired = ConfigValue::new(2, MetricSet::all()).unwrap();
        let mut rec = alive(heartbeat(2, 1.0));
        // A fresh controller, the status a previous one wrote: no desired config known yet.
        rec.written = Some(compute_status(&rec, Some(&desired), None));
        let start = compute_status(&rec, None, None);
        assert_eq!(config_applied(&start), Some(("True", "Applied")));
        assert_eq!(start.config.as_ref().unwrap().in_sync, Some(true));
        assert_eq!(
            without_usage(&start),
            without_usage(rec.written.as_ref().unwrap())
        );
        // Nothing written before: no verdict at all rather than a wrong one.
        rec.written = None;
        let fresh = compute_status(&rec, None, None);
        assert_eq!(config_applied(&fresh), None);
        assert_eq!(fresh.config.as_ref().unwrap().in_sync, None);
    }

    #[test]
    fn small_usage_moves_wait_for_a_refresh() {
        let u = |cpu: f64| UsageSummary {
            cpu_percent: Some(cpu),
            memory_percent: Some(40.0),
            ..Default::default()
        };
        assert!(!usage_moved(Some(&u(10.0)), Some(&u(10.9))));
        assert!(usage_moved(Some(&u(10.0)), Some(&u(11.0))));
        assert!(usage_moved(None, Some(&u(10.0))));
        assert!(!usage_moved(None, None));
    }

    #[test]
    fn a_rejected_config_shows_in_the_condition() {
        let mut hb = heartbeat(10, 1.0);
        hb.config.error = Some("interval 0 is out of range".into());
        let status = compute_status(&alive(hb), None, None);
        let cond = status
            .conditions
            .iter()
            .find(|c| c.type_ == "ConfigApplied")
            .unwrap();
        assert_eq!(cond.status, "False");
        assert!(cond.message.contains("interval 0"), "{}", cond.message);
    }

    #[test]
    fn a_status_older_than_the_agents_start_is_from_an_earlier_run() {
        let hb: Heartbeat = serde_json::from_value(serde_json::json!({
            "node": "worker-1", "agentVersion": "0.1.0", "state": "Running",
            "startedAt": "2026-12-01T10:00:00Z", "updatedAt": "2026-12-01T10:00:05Z",
            "ttlSeconds": 10, "config": {"revision": 0, "interval": 10, "metrics": ["cpu"]}
        }))
        .expect("a heartbeat");
        let at = |t: &str| MonitorNodeStatus {
            last_heartbeat_time: Some(Time(t.parse().expect("a time"))),
            ..MonitorNodeStatus::default()
        };
        // The previous release's agent wrote this status before the new agent started.
        assert!(from_an_earlier_run(&at("2026-12-01T09:40:00Z"), Some(&hb)));
        // This agent's own earlier value: a usage refresh, which waits for the interval.
        assert!(!from_an_earlier_run(&at("2026-12-01T10:00:00Z"), Some(&hb)));
        assert!(!from_an_earlier_run(&at("2026-12-01T10:00:05Z"), Some(&hb)));
        assert!(!from_an_earlier_run(
            &MonitorNodeStatus::default(),
            Some(&hb)
        ));
        assert!(!from_an_earlier_run(&at("2026-12-01T09:40:00Z"), None));
    }
}
