//! `nodepulsectl watch`: liveness as it happens. Lists `/monitor/heartbeat/`, prints the table, then
//! watches the prefix from the next revision and prints one line per node that comes alive or
//! dies. It outlives etcd restarts through the shared watcher (`nodepulse_etcd::watch`): resume
//! from the last revision seen, re-list when that revision was compacted or etcd was rebuilt.

use std::io::Write;

use jiff::Timestamp;
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, Heartbeat, node_of_heartbeat_key};
use nodepulse_etcd::EtcdArgs;
use nodepulse_etcd::watch::{EtcdWatcher, Kv, WatchEvent, WatcherSettings};
use nodepulse_runtime::Backoff;
use serde::Serialize;

use crate::OutputFormat;
use crate::error::Result;
use crate::nodes::{NodeRow, now, render_table};
use crate::tracker::{NodeChange, NodeTracker};

/// How `watch` prints.
#[derive(Clone, Copy, Debug)]
pub struct WatchSettings {
    /// Text lines for people, or one JSON object per line for scripts.
    pub output: OutputFormat,
    /// Also print value updates of nodes already alive.
    pub verbose: bool,
}

/// One JSON line of `watch --output json`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonEvent<'a> {
    time: Timestamp,
    /// `snapshot`, `alive`, `updated` or `dead`.
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    /// The etcd revision of the event (of the read, for a snapshot).
    revision: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat: Option<&'a nodepulse_crd::wire::Heartbeat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<NodeRow>>,
}

/// Prints snapshots and transitions, flushing after every line: the output is usually a pipe
/// (the demo, tests, `| grep`), and a line sitting in a buffer is a line nobody sees.
struct EventPrinter<W> {
    out: W,
    settings: WatchSettings,
}

impl<W: Write> EventPrinter<W> {
    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.out, "{text}")?;
        self.out.flush()?;
        Ok(())
    }

    fn json(&mut self, event: &JsonEvent<'_>) -> Result<()> {
        let text = serde_json::to_string(event).map_err(std::io::Error::other)?;
        self.line(&text)
    }

    fn snapshot(&mut self, rows: Vec<NodeRow>, revision: i64) -> Result<()> {
        let at = now();
        match self.settings.output {
            OutputFormat::Json => self.json(&JsonEvent {
                time: at,
                event: "snapshot",
                node: None,
                reason: None,
                revision,
                heartbeat: None,
                nodes: Some(rows),
            }),
            OutputFormat::Text if rows.is_empty() => self.line(&format!(
                "{at} No node yet: no key under {HEARTBEAT_PREFIX} (revision {revision}); waiting for agents"
            )),
            OutputFormat::Text => {
                let table = render_table(&rows, at);
                self.out.write_all(table.as_bytes())?;
                self.out.flush()?;
                Ok(())
            }
        }
    }

    fn transition(&mut self, node: &str, t: &NodeChange, revision: i64) -> Result<()> {
        let at = now();
        let (event, reason, heartbeat) = match t {
            NodeChange::Alive(hb) => ("alive", None, Some(hb)),
            NodeChange::Updated(hb) if self.settings.verbose => ("updated", None, Some(hb)),
            NodeChange::Updated(_) => return Ok(()),
            NodeChange::Dead(r) => ("dead", Some(r.words()), None),
        };
        match self.settings.output {
            OutputFormat::Json => self.json(&JsonEvent {
                time: at,
                event,
                node: Some(node),
                reason,
                revision,
                heartbeat,
                nodes: None,
            }),
            OutputFormat::Text => {
                let text = match t {
                    NodeChange::Alive(_) => format!("Node {node} Alive"),
                    NodeChange::Dead(r) => format!("Node {node} Dead ({r})"),
                    NodeChange::Updated(hb) => {
                        let row = NodeRow::alive(node, hb, at);
                        let pct = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.1}%"));
                        format!(
                            "Node {node} updated: state {}, cpu {}, mem {}, interval {}s, config revision {}",
                            row.state,
                            pct(row.cpu_percent),
                            pct(row.memory_percent),
                            hb.config.interval,
                            hb.config.revision
                        )
                    }
                };
                self.line(&format!("{at} {text}"))
            }
        }
    }
}

/// Runs the watch until the process is stopped. Returns only on an error that retrying cannot
/// fix (bad TLS files, stdout closed).
pub async fn run(etcd: &EtcdArgs, settings: WatchSettings, out: impl Write) -> Result<()> {
    let mut printer = EventPrinter { out, settings };
    // Unreadable TLS files fail now; etcd being away is waited for.
    etcd.connect_options()?;
    let client = etcd.connect_retrying("watch").await;
    let mut tracker = NodeTracker::default();
    let watch = WatcherSettings {
        backoff: Backoff::default(),
        ..WatcherSettings::prefix("watch")
    };
    let mut watcher = EtcdWatcher::new(client, HEARTBEAT_PREFIX, watch);
    // The watcher runs on a task of its own, so that waiting for a node's deadline never cuts
    // one of its calls short.
    let (events_tx, mut events) = tokio::sync::mpsc::channel(64);
    let _watching = AbortOnDrop(tokio::spawn(async move {
        loop {
            if events_tx.send(watcher.next().await).await.is_err() {
                return;
            }
        }
    }));
    let mut first = true;
    // The store revision of the last event, for the deaths a deadline brings.
    let mut seen_revision = 0;
    loop {
        let due = tracker.next_due();
        let event = tokio::select! {
            event = events.recv() => match event {
                Some(event) => event,
                None => return Ok(()),
            },
            () = sleep_until_wall(due), if due.is_some() => {
                for (node, t) in tracker.due(now()) {
                    printer.transition(&node, &t, seen_revision)?;
                }
                continue;
            }
        };
        match event {
            WatchEvent::Listed {
                revision,
                kvs,
                replaced,
            } => {
                seen_revision = revision;
                let mut present: Vec<_> = kvs.iter().filter_map(heartbeat_of).collect();
                present.sort_by(|a, b| a.0.cmp(&b.0));
                if std::mem::take(&mut first) {
                    tracker.seed(present);
                    printer.snapshot(tracker.alive_rows(), revision)?;
                } else {
                    // A re-list (compaction, rebuilt etcd): print only the real differences.
                    for (node, t) in tracker.relist(present, replaced, now()) {
                        printer.transition(&node, &t, revision)?;
                    }
                }
            }
            WatchEvent::Put(kv) => {
                seen_revision = kv.mod_revision;
                if let Some((node, hb)) = heartbeat_of(&kv) {
                    let t = tracker.put(&node, hb, now());
                    printer.transition(&node, &t, kv.mod_revision)?;
                }
            }
            WatchEvent::Delete { key, revision, .. } => {
                seen_revision = revision;
                let Some(node) = node_of_heartbeat_key(&key) else {
                    continue;
                };
                if let Some(reason) = tracker.delete(node, now()) {
                    printer.transition(node, &NodeChange::Dead(reason), revision)?;
                }
            }
            WatchEvent::Interrupted => {}
        }
    }
}

/// The node and heartbeat of a key, or `None` (logged) for a key that is not an agent's
/// heartbeat (no lease, a value no agent wrote or naming another node): the controller's rules.
fn heartbeat_of(kv: &Kv) -> Option<(String, Heartbeat)> {
    let node = node_of_heartbeat_key(&kv.key)?;
    match Heartbeat::admit(node, kv.lease, &kv.value) {
        Ok(hb) => Some((node.to_string(), hb)),
        Err(rejection) => {
            tracing::warn!(key = %String::from_utf8_lossy(&kv.key), reason = rejection.label(), "ignoring key: not a heartbeat");
            None
        }
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sleeps until the wall time `at` (at once if it has passed; forever for `None`).
async fn sleep_until_wall(at: Option<jiff::Timestamp>) {
    let Some(at) = at else {
        return std::future::pending().await;
    };
    let left = at.duration_since(now()).try_into().unwrap_or_default();
    tokio::time::sleep(left).await;
}
