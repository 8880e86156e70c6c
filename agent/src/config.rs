//! The live configuration from `/monitor/config/<node>`, and the lock the agent's three jobs
//! (heartbeat, config watch, sampling) share it through.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use nodepulse_crd::wire::{AppliedConfig, ConfigValue, MetricSet};
use nodepulse_etcd::watch::{EtcdWatcher, WatchEvent, WatcherSettings};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::connection::EtcdConnection;
use crate::metrics::AgentMetrics;

/// The configuration in force, and what the agent reports about it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppliedState {
    /// The settings in use (defaults when no key exists).
    pub value: ConfigValue,
    /// `mod_revision` of the key applied; 0 on defaults.
    pub revision: i64,
    /// Why the last value seen was rejected; cleared by the next good value or a delete.
    pub error: Option<String>,
}

impl AppliedState {
    /// Sampling interval.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.value.interval.into())
    }

    /// The part of the heartbeat value that describes the configuration.
    pub fn to_wire(&self) -> AppliedConfig {
        AppliedConfig::new(&self.value, self.revision, self.error.clone())
    }
}

/// The configuration the three jobs share.
///
/// A reader-writer lock rather than a channel: many readers, one writer, and each
/// reader (the sampler before each sample, the heartbeat before each write) needs the value in
/// force at that moment, not a queue of every change. The `changed` channel carries
/// no data; it only wakes readers that sleep (the sampler's interval, the heartbeat's
/// rewrite timer) so a change takes effect at once.
#[derive(Debug)]
pub struct SharedConfig {
    state: RwLock<AppliedState>,
    changed: watch::Sender<()>,
}

impl SharedConfig {
    /// Starts on `initial` (the defaults, normally).
    pub fn new(initial: AppliedState) -> Arc<Self> {
        Arc::new(SharedConfig {
            state: RwLock::new(initial),
            changed: watch::Sender::new(()),
        })
    }

    /// A copy of the configuration in force. The lock is held for the copy only.
    pub fn current(&self) -> AppliedState {
        // A panic while holding the lock cannot leave a half-written AppliedState (it is
        // replaced whole), so a poisoned lock still holds a good value.
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Interval and metrics, the two things the sampler needs.
    pub fn schedule(&self) -> (Duration, MetricSet) {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        (s.interval(), s.value.metrics.clone())
    }

    /// The sampling interval alone, without copying the metric set.
    pub fn interval(&self) -> Duration {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .interval()
    }

    /// A wake-up that fires after every change.
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// Replaces the configuration and wakes the readers. Only the config watcher calls this.
    fn replace(&self, next: AppliedState) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = next;
        self.changed.send_replace(());
    }
}

/// What happened to the config key.
#[derive(Clone, Copy, Debug)]
pub enum KeyEvent<'a> {
    /// The key holds `value`, written at `revision`.
    Put {
        /// The raw bytes.
        value: &'a [u8],
        /// Its `mod_revision`.
        revision: i64,
    },
    /// The key was deleted at `revision`.
    Deleted {
        /// The delete's revision.
        revision: i64,
    },
}

/// The configuration after an event, and the line to log about it (none when nothing changed).
#[derive(Debug, PartialEq)]
pub struct ConfigChange {
    /// The configuration to apply.
    pub next: AppliedState,
    /// The log line; a warning when the value was rejected.
    pub line: Option<String>,
    /// Whether a value was rejected.
    pub rejected: bool,
}

/// Decides what an event does to the configuration in force: a valid value replaces it whole,
/// an invalid one is rejected whole (the last good one stays, with the error), a delete goes
/// back to the defaults.
pub fn transition(current: &AppliedState, event: KeyEvent<'_>) -> ConfigChange {
    match event {
        KeyEvent::Put { value, revision } => match ConfigValue::parse(value) {
            Ok(v) => {
                let next = AppliedState {
                    value: v,
                    revision,
                    error: None,
                };
                let line = (next != *current).then(|| {
                    format!(
                        "config updated: interval {}s -> {}s, metrics {} (revision {revision})",
                        current.value.interval, next.value.interval, next.value.metrics
                    )
                });
                ConfigChange {
                    next,
                    line,
                    rejected: false,
                }
            }
            Err(e) => {
                let next = AppliedState {
                    error: Some(format!("revision {revision}: {e}")),
                    ..current.clone()
                };
                let line = format!(
                    "config rejected (revision {revision}): {e}; keeping interval {}s, metrics {}",
                    current.value.interval, current.value.metrics
                );
                ConfigChange {
                    next,
                    line: Some(line),
                    rejected: true,
                }
            }
        },
        KeyEvent::Deleted { revision } => {
            let next = AppliedState::default();
            let line = format!(
                "config removed (revision {revision}): back to defaults, interval {}s, metrics {}",
                next.value.interval, next.value.metrics
            );
            ConfigChange {
                next,
                line: Some(line),
                rejected: false,
            }
        }
    }
}

/// Reads `/monitor/config/<node>` at start, then watches it, applying each change to the shared
/// configuration.
pub struct ConfigWatcher {
    key: String,
    etcd: EtcdConnection,
    shared: Arc<SharedConfig>,
    metrics: Arc<AgentMetrics>,
}

impl ConfigWatcher {
    /// A watcher for `node`'s key.
    pub fn new(
        node: &str,
        etcd: EtcdConnection,
        shared: Arc<SharedConfig>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        ConfigWatcher {
            key: nodepulse_crd::wire::config_key(node),
            etcd,
            shared,
            metrics,
        }
    }

    /// Runs until the task is dropped. Never returns an error: etcd being away is waited out
    /// (the shared watcher resumes from the last revision, and reads the key again after a
    /// compaction or when etcd was rebuilt).
    pub async fn run(self) {
        let client = self.etcd.client().await;
        let mut watcher = EtcdWatcher::new(
            client,
            self.key.as_str(),
            WatcherSettings::key("config watch"),
        );
        loop {
            let event = watcher.next().await;
            self.on_event(event);
        }
    }

    /// What one event of the key does to the configuration.
    fn on_event(&self, event: WatchEvent) {
        match event {
            WatchEvent::Listed { revision, kvs, .. } => match kvs.first() {
                Some(kv) => self.apply(KeyEvent::Put {
                    value: &kv.value,
                    revision: kv.mod_revision,
                }),
                // No key: defaults. A key deleted while we were not watching (after a
                // compaction, or on a rebuilt etcd) also means defaults.
                None if self.shared.current().revision != 0 => {
                    self.apply(KeyEvent::Deleted { revision })
                }
                None => {}
            },
            WatchEvent::Put(kv) => self.apply(KeyEvent::Put {
                value: &kv.value,
                revision: kv.mod_revision,
            }),
            WatchEvent::Delete { revision, .. } => self.apply(KeyEvent::Deleted { revision }),
            WatchEvent::Interrupted => {}
        }
    }

    fn apply(&self, event: KeyEvent<'_>) {
        let t = transition(&self.shared.current(), event);
        match &t.line {
            Some(line) if t.rejected => warn!("{line}"),
            Some(line) => info!("{line}"),
            None => {}
        }
        if t.rejected {
            self.metrics.config_rejected.inc();
        }
        self.metrics
            .set_config(t.next.revision, t.next.value.interval);
        self.shared.replace(t.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &str, revision: i64) -> KeyEvent<'_> {
        KeyEvent::Put {
            value: s.as_bytes(),
            revision,
        }
    }

    #[test]
    fn a_valid_value_replaces_the_config_and_says_so() {
        let t = transition(
            &AppliedState::default(),
            put(r#"{"interval": 2, "metrics": ["cpu","memory"]}"#, 41),
        );
        assert_eq!(t.next.value.interval, 2);
        assert_eq!(t.next.revision, 41);
        assert_eq!(
            t.line,
            Some("config updated: interval 10s -> 2s, metrics [cpu, memory] (revision 41)".into())
        );
    }

    #[test]
    fn an_invalid_value_is_rejected_whole_and_the_last_good_one_kept() {
        let good = transition(
            &AppliedState::default(),
            put(r#"{"interval": 2, "metrics": ["cpu","memory"]}"#, 41),
        )
        .next;
        let t = transition(&good, put(r#"{"interval": 0, "metrics": ["cpu"]}"#, 42));
        assert!(t.rejected);
        assert_eq!(t.next.value, good.value);
        assert_eq!(t.next.revision, 41);
        assert_eq!(
            t.next.error.as_deref(),
            Some("revision 42: interval 0 is out of range: must be 1 to 3600 seconds")
        );
        assert_eq!(
            t.line.unwrap(),
            "config rejected (revision 42): interval 0 is out of range: must be 1 to 3600 seconds; keeping interval 2s, metrics [cpu, memory]"
        );
        // The next good value clears the error.
        let t2 = transition(&t.next, put(r#"{"interval": 5, "metrics": ["load"]}"#, 43));
        assert_eq!(t2.next.error, None);
    }

    #[test]
    fn a_delete_goes_back_to_defaults() {
        let good = transition(
            &AppliedState::default(),
            put(r#"{"interval": 2, "metrics": ["cpu"]}"#, 41),
        )
        .next;
        let t = transition(&good, KeyEvent::Deleted { revision: 43 });
        assert_eq!(t.next, AppliedState::default());
        assert_eq!(
            t.line.unwrap(),
            "config removed (revision 43): back to defaults, interval 10s, metrics [cpu, memory, disk, network, load]"
        );
    }

    #[test]
    fn reading_the_same_value_again_says_nothing() {
        let good = transition(
            &AppliedState::default(),
            put(r#"{"interval": 2, "metrics": ["cpu"]}"#, 41),
        )
        .next;
        let t = transition(&good, put(r#"{"interval": 2, "metrics": ["cpu"]}"#, 41));
        assert_eq!(t.line, None);
    }

    #[test]
    fn readers_are_woken_by_a_change() {
        let shared = SharedConfig::new(AppliedState::default());
        let mut rx = shared.subscribe();
        assert!(!rx.has_changed().unwrap());
        shared.replace(AppliedState {
            revision: 3,
            ..AppliedState::default()
        });
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(shared.current().revision, 3);
    }
}
