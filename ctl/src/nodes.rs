//! Reading the heartbeat prefix into rows, and printing them as a table or as JSON.

use etcd_client::{Client, KeyValue};
use jiff::Timestamp;
use nodepulse_crd::wire::{AgentState, HEARTBEAT_PREFIX, Heartbeat, node_of_heartbeat_key};
use nodepulse_etcd::list_prefix;
use serde::Serialize;

use crate::OutputFormat;
use crate::error::{Error, Result};

/// One node as the table shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    /// The node's name (from its heartbeat key).
    pub node: String,
    /// `Alive`, `Stopping` (a clean stop under way) or `Dead`.
    pub state: String,
    /// Since when the node has been in that state (for a node found already alive: its agent's
    /// start time).
    pub since: Timestamp,
    /// Busy CPU %, when the agent collects it.
    pub cpu_percent: Option<f64>,
    /// Memory in use %, when the agent collects it.
    pub memory_percent: Option<f64>,
    /// The sampling interval the agent runs with, in seconds.
    pub interval: Option<u32>,
    /// The last heartbeat value seen.
    pub heartbeat: Option<Heartbeat>,
}

impl NodeRow {
    /// The row of a node whose heartbeat key exists.
    pub fn alive(node: &str, hb: &Heartbeat, since: Timestamp) -> NodeRow {
        let state = match hb.state {
            AgentState::Running => "Alive",
            AgentState::Stopping => "Stopping",
        };
        NodeRow {
            node: node.to_string(),
            state: state.to_string(),
            since,
            cpu_percent: hb.usage.as_ref().and_then(|u| u.cpu_percent),
            memory_percent: hb.usage.as_ref().and_then(|u| u.memory_percent),
            interval: Some(hb.config.interval),
            heartbeat: Some(hb.clone()),
        }
    }
}

/// The heartbeat keys present in etcd, and the revision they were read at.
pub struct HeartbeatList {
    /// `(node, value)` for every well-formed heartbeat key, sorted by node.
    pub heartbeats: Vec<(String, Heartbeat)>,
    /// The store revision of the read: watch from the next one.
    pub revision: i64,
    /// The id of the etcd cluster that answered (a new id means etcd was rebuilt from scratch
    /// and revisions started over).
    pub cluster_id: u64,
}

/// Lists `/monitor/heartbeat/`. Values that are not agent heartbeats are skipped with a warning
/// (something other than an agent wrote them; the controller ignores them too).
pub async fn list_heartbeats(client: &mut Client) -> Result<HeartbeatList> {
    let listing = list_prefix(client, HEARTBEAT_PREFIX, false)
        .await
        .map_err(Error::etcd(format!("list {HEARTBEAT_PREFIX}")))?;
    let (revision, cluster_id) = (listing.revision, listing.cluster_id);
    let mut heartbeats: Vec<_> = listing.kvs.iter().filter_map(parse_heartbeat).collect();
    heartbeats.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(HeartbeatList {
        heartbeats,
        revision,
        cluster_id,
    })
}

/// The node and heartbeat of one key, or `None` (with a warning) for anything else.
pub fn parse_heartbeat(kv: &KeyValue) -> Option<(String, Heartbeat)> {
    let node = node_of_heartbeat_key(kv.key())?;
    match Heartbeat::parse(kv.value()) {
        Ok(hb) => Some((node.to_string(), hb)),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring key: {e}");
            None
        }
    }
}

/// The table: `NODE STATE SINCE CPU% MEM% INTERVAL`, SINCE as an age relative to `now`, in
/// kubectl's borderless columns.
pub fn render_table(rows: &[NodeRow], now: Timestamp) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_style(comfy_table::presets::NOTHING)
        .set_header(["NODE", "STATE", "SINCE", "CPU%", "MEM%", "INTERVAL"]);
    for r in rows {
        table.add_row([
            r.node.clone(),
            r.state.clone(),
            age(now.duration_since(r.since)),
            percent(r.cpu_percent),
            percent(r.memory_percent),
            r.interval.map_or("-".to_string(), |i| format!("{i}s")),
        ]);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    table.trim_fmt() + "\n"
}

fn percent(p: Option<f64>) -> String {
    p.map_or("-".to_string(), |p| format!("{p:.1}"))
}

/// A short age as kubectl prints it: `42s`, `3m12s`, `5h3m`, `2d4h`.
pub fn age(d: jiff::SignedDuration) -> String {
    let s = d.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `nodepulsectl nodes`: the table (or a JSON array of rows) of the nodes alive now.
pub fn print(
    list: HeartbeatList,
    output: OutputFormat,
    mut out: impl std::io::Write,
) -> Result<()> {
    let rows: Vec<NodeRow> = list
        .heartbeats
        .iter()
        .map(|(node, hb)| NodeRow::alive(node, hb, hb.started_at))
        .collect();
    match output {
        OutputFormat::Json => {
            let text = serde_json::to_string(&rows).map_err(std::io::Error::other)?;
            writeln!(out, "{text}")?;
        }
        OutputFormat::Text if rows.is_empty() => {
            writeln!(out, "No node yet: no key under {HEARTBEAT_PREFIX}")?;
        }
        OutputFormat::Text => out.write_all(render_table(&rows, now()).as_bytes())?,
    }
    Ok(())
}

/// Now, at second precision (what the output shows).
pub fn now() -> Timestamp {
    Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodepulse_crd::wire::UsageSummary;

    pub(crate) fn heartbeat(node: &str, state: AgentState) -> Heartbeat {
        let mut hb = Heartbeat::running(node, 5, "2026-11-22T05:00:00Z".parse().unwrap());
        hb.state = state;
        hb.updated_at = "2026-11-22T05:00:05Z".parse().unwrap();
        hb.config.metrics = "cpu".parse().unwrap();
        hb.usage = Some(UsageSummary {
            cpu_percent: Some(12.25),
            ..Default::default()
        });
        hb
    }

    #[test]
    fn table_aligns_columns_and_shows_dashes_for_missing_figures() {
        let hb = heartbeat("worker-1", AgentState::Running);
        let since = "2026-11-22T05:00:00Z".parse().unwrap();
        let now = "2026-11-22T05:03:12Z".parse().unwrap();
        let rows = vec![
            NodeRow::alive("worker-1", &hb, since),
            NodeRow::alive(
                "a-much-longer-node-name",
                &heartbeat("x", AgentState::Stopping),
                since,
            ),
        ];
        let table = render_table(&rows, now);
        assert_eq!(
            table,
            "\
NODE                      STATE      SINCE   CPU%   MEM%   INTERVAL
worker-1                  Alive      3m12s   12.2   -      10s
a-much-longer-node-name   Stopping   3m12s   12.2   -      10s
"
        );
    }

    #[test]
    fn ages_read_like_kubectl() {
        let s = jiff::SignedDuration::from_secs;
        assert_eq!(age(s(0)), "0s");
        assert_eq!(age(s(-3)), "0s");
        assert_eq!(age(s(59)), "59s");
        assert_eq!(age(s(192)), "3m12s");
        assert_eq!(age(s(3 * 3600 + 120)), "3h2m");
        assert_eq!(age(s(2 * 86400 + 4 * 3600)), "2d4h");
    }
}
