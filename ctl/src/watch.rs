//! `nodepulsectl watch`: the lab's server. Lists `/monitor/heartbeat/`, prints the table, then
//! watches the prefix from the next revision and prints one line per node that comes alive or
//! dies. It outlives etcd restarts: reconnect with backoff, resume from the last revision seen,
//! re-list when that revision was compacted.

use std::io::Write;

use etcd_client::{Client, EventType, WatchOptions};
use jiff::Timestamp;
use nodepulse_crd::etcd::{Backoff, EtcdArgs};
use nodepulse_crd::wire::{HEARTBEAT_PREFIX, node_of_heartbeat_key};
use serde::Serialize;

use crate::error::Result;
use crate::nodes::{HeartbeatList, NodeRow, list_heartbeats, now, parse_heartbeat, render_table};
use crate::tracker::{NodeTracker, Transition};
use crate::{OutputFormat, connect_retrying};

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

    fn transition(&mut self, node: &str, t: &Transition, revision: i64) -> Result<()> {
        let at = now();
        let (event, reason, heartbeat) = match t {
            Transition::Alive(hb) => ("alive", None, Some(hb)),
            Transition::Updated(hb) if self.settings.verbose => ("updated", None, Some(hb)),
            Transition::Updated(_) => return Ok(()),
            Transition::Dead(r) => ("dead", Some(r.as_str()), None),
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
                    Transition::Alive(_) => format!("Node {node} Alive"),
                    Transition::Dead(r) => format!("Node {node} Dead ({r})"),
                    Transition::Updated(hb) => {
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

/// Why one watch stream ended.
enum StreamEnd {
    /// The stream broke (etcd restarted, connection lost): resume from the last revision.
    Broken,
    /// The revision to resume from was compacted away: list again.
    Compacted,
    /// etcd was rebuilt or restored: our revisions mean nothing there.
    NewCluster,
    /// etcd canceled the watch for another reason (e.g. a future revision after etcd was
    /// replaced by an empty one): list again, after a pause in case it keeps happening.
    Canceled,
}

/// Runs the watch until the process is stopped. Returns only on an error that retrying cannot
/// fix (bad TLS files, stdout closed).
pub async fn run(etcd: &EtcdArgs, settings: WatchSettings, out: impl Write) -> Result<()> {
    let mut printer = EventPrinter { out, settings };
    let mut client = connect_retrying(etcd).await?;
    let mut tracker = NodeTracker::default();
    let mut backoff = Backoff::default();

    let first = list_retrying(&mut client, &mut backoff).await;
    let mut revision = first.revision;
    let mut cluster_id = first.cluster_id;
    tracker.seed(first.heartbeats);
    printer.snapshot(tracker.alive_rows(), revision)?;
    let mut broken = false;

    loop {
        let resume = Resume {
            start: revision + 1,
            cluster_id,
            after_break: broken,
        };
        let end = watch_from(
            &mut client,
            resume,
            &mut tracker,
            &mut printer,
            &mut backoff,
        )
        .await?;
        revision = end.revision.max(revision);
        broken = matches!(end.why, StreamEnd::Broken);
        match end.why {
            StreamEnd::Broken => backoff.wait().await,
            StreamEnd::Compacted | StreamEnd::Canceled | StreamEnd::NewCluster => {
                match end.why {
                    StreamEnd::Compacted => tracing::warn!(
                        "revision {} was compacted: listing {HEARTBEAT_PREFIX} again",
                        revision + 1
                    ),
                    StreamEnd::NewCluster => tracing::warn!(
                        "etcd's revision went back below {revision} (rebuilt or restored from a backup): listing {HEARTBEAT_PREFIX} again"
                    ),
                    _ => backoff.wait().await,
                }
                let list = list_retrying(&mut client, &mut backoff).await;
                for (node, t) in tracker.relist(list.heartbeats, now()) {
                    printer.transition(&node, &t, list.revision)?;
                }
                revision = list.revision;
                cluster_id = list.cluster_id;
            }
        }
    }
}

/// Lists the heartbeats, retrying with backoff while etcd is away.
async fn list_retrying(client: &mut Client, backoff: &mut Backoff) -> HeartbeatList {
    loop {
        match list_heartbeats(client).await {
            Ok(list) => {
                backoff.reset();
                return list;
            }
            Err(e) => {
                tracing::warn!("{e}; retrying");
                backoff.wait().await;
            }
        }
    }
}

/// Where a watch stream starts.
struct Resume {
    /// The first revision wanted.
    start: i64,
    /// The etcd cluster the revisions belong to.
    cluster_id: u64,
    /// Whether the previous stream broke (then its recovery is worth a log line).
    after_break: bool,
}

/// How a watch stream ended, and the last revision it delivered.
struct Ended {
    why: StreamEnd,
    revision: i64,
}

/// One watch stream; prints transitions as events arrive.
async fn watch_from<W: Write>(
    client: &mut Client,
    resume: Resume,
    tracker: &mut NodeTracker,
    printer: &mut EventPrinter<W>,
    backoff: &mut Backoff,
) -> Result<Ended> {
    let start = resume.start;
    let mut revision = start - 1;
    let ended = |why, revision| Ok(Ended { why, revision });
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_progress_notify();
    let mut stream = match client.watch(HEARTBEAT_PREFIX, Some(opts)).await {
        Ok(s) => s,
        Err(e) => {
            // The break itself was logged once; each failed retry while etcd is away is not news.
            if resume.after_break {
                tracing::debug!("watch {HEARTBEAT_PREFIX} from revision {start}: {e}; retrying");
            } else {
                tracing::warn!("watch {HEARTBEAT_PREFIX} from revision {start}: {e}; retrying");
            }
            return ended(StreamEnd::Broken, revision);
        }
    };
    let mut first = true;
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                tracing::warn!("watch {HEARTBEAT_PREFIX}: stream closed by etcd; resuming");
                return ended(StreamEnd::Broken, revision);
            }
            Err(e) => {
                tracing::warn!(
                    "watch {HEARTBEAT_PREFIX} lost after revision {revision}: {e}; reconnecting"
                );
                return ended(StreamEnd::Broken, revision);
            }
        };
        if resp.compact_revision() > 0 {
            return ended(StreamEnd::Compacted, revision);
        }
        if resp.canceled() {
            tracing::warn!(
                "watch {HEARTBEAT_PREFIX} canceled by etcd: {}; listing it again",
                resp.cancel_reason()
            );
            return ended(StreamEnd::Canceled, revision);
        }
        // (Checked after compaction: etcd's compaction notice carries revision 0.)
        // A store's revision never goes back: a smaller one than we have seen, or another
        // cluster id, means etcd was rebuilt (or restored from an older backup), and resuming at
        // our revision would silently skip everything until the new store catches up.
        if let Some(h) = resp.header() {
            let other_cluster = h.cluster_id() != resume.cluster_id && resume.cluster_id != 0;
            if other_cluster || (h.revision() > 0 && h.revision() < start - 1) {
                return ended(StreamEnd::NewCluster, revision);
            }
        }
        if first {
            first = false;
            backoff.reset();
            if resume.after_break {
                tracing::info!("watch {HEARTBEAT_PREFIX} resumed from revision {start}");
            }
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            revision = revision.max(kv.mod_revision());
            let Some(node) = node_of_heartbeat_key(kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => {
                    if let Some((node, hb)) = parse_heartbeat(kv) {
                        let t = tracker.put(&node, hb, now());
                        printer.transition(&node, &t, kv.mod_revision())?;
                    }
                }
                EventType::Delete => {
                    if let Some(reason) = tracker.delete(node, now()) {
                        printer.transition(node, &Transition::Dead(reason), kv.mod_revision())?;
                    }
                }
            }
        }
    }
}
