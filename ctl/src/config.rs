//! `nodepulsectl config get|set|delete`: read and write `/monitor/config/<node>` by hand.
//!
//! `set` builds the JSON it will write and runs it through [`ConfigValue::parse`], the very
//! function the agent applies to the key, so whatever `set` accepts the agent accepts, and
//! whatever the agent would reject is refused here before anything is written.

use std::collections::BTreeMap;
use std::io::Write;

use etcd_client::{Client, DeleteOptions, KeyValue, Txn, TxnOp};
use nodepulse_crd::wire::{
    CONFIG_PREFIX, CONTROLLER_MANAGER, ConfigValue, HEARTBEAT_PREFIX, config_key,
    node_of_config_key, node_of_heartbeat_key, validate_node_name,
};
use nodepulse_etcd::list_prefix;
use serde::Serialize;
use serde_json::{Value, json};

use crate::OutputFormat;
use crate::error::{Error, Result};

/// etcd refuses transactions of more than 128 operations by default (`--max-txn-ops`).
const PUTS_PER_TXN: usize = 100;

/// What `config set` changes; a field left out keeps the node's current value (or the default).
#[derive(Clone, Debug, Default)]
pub struct ConfigChange {
    /// The interval as typed: whole seconds, optionally with an `s` suffix.
    pub interval: Option<String>,
    /// The metrics as typed: `cpu,memory`.
    pub metrics: Option<String>,
}

impl ConfigChange {
    /// The value to write over `current`, validated exactly as the agent validates the key.
    pub fn apply_to(&self, current: Option<&ConfigValue>) -> Result<ConfigValue> {
        let base = current.cloned().unwrap_or_default();
        let interval = match &self.interval {
            None => Value::from(base.interval),
            Some(typed) => parse_interval(typed)?,
        };
        let metrics: Vec<Value> = match &self.metrics {
            None => base
                .metrics
                .iter()
                .map(|m| Value::from(m.as_str()))
                .collect(),
            Some(typed) => typed
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(Value::from)
                .collect(),
        };
        let candidate = json!({"interval": interval, "metrics": metrics}).to_string();
        ConfigValue::parse(candidate.as_bytes())
            .map_err(|e| Error::Invalid(format!("config refused, nothing written: {e}")))
    }
}

/// `2`, `2s` -> a JSON number; range checks are the validator's job (so `0` and `-1` get its
/// message).
fn parse_interval(typed: &str) -> Result<Value> {
    let digits = typed.trim().strip_suffix('s').unwrap_or(typed.trim());
    digits.parse::<i64>().map(Value::from).map_err(|_| {
        Error::Invalid(format!(
            "config refused, nothing written: interval {typed:?} is not a whole number of seconds (e.g. 2 or 2s)"
        ))
    })
}

/// Which nodes `config set` writes.
#[derive(Clone, Debug)]
pub enum Targets {
    /// These nodes.
    Nodes(Vec<String>),
    /// Every node that has a heartbeat key now.
    AllWithHeartbeat,
}

/// Refuses names that cannot be node names (they would make keys no agent watches).
pub fn validate_nodes(nodes: &[String]) -> Result<()> {
    for node in nodes {
        validate_node_name(node).map_err(Error::Invalid)?;
    }
    Ok(())
}

/// One config key as `config get -o json` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigKeyReport {
    node: String,
    key: String,
    mod_revision: i64,
    /// The bytes stored, as text.
    value: String,
    /// Whether the agent accepts the value.
    valid: bool,
    /// Why the agent rejects it.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// The parsed value, when valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<ConfigValue>,
}

/// `config get <node>`: prints the key; [`Error::NotFound`] when there is none.
pub async fn get(
    client: &mut Client,
    node: &str,
    output: OutputFormat,
    mut out: impl Write,
) -> Result<()> {
    validate_nodes(&[node.to_string()])?;
    let key = config_key(node);
    let resp = client
        .get(key.as_str(), None)
        .await
        .map_err(Error::etcd(format!("get {key}")))?;
    let Some(kv) = resp.kvs().first() else {
        return Err(Error::NotFound(format!(
            "no config key {key}: the agent on {node} runs with the defaults (interval 10s, metrics [cpu, memory, disk, network, load])"
        )));
    };
    let parsed = ConfigValue::parse(kv.value());
    let value = String::from_utf8_lossy(kv.value()).into_owned();
    match output {
        OutputFormat::Json => {
            let report = ConfigKeyReport {
                node: node.to_string(),
                key,
                mod_revision: kv.mod_revision(),
                value,
                valid: parsed.is_ok(),
                error: parsed.as_ref().err().map(ToString::to_string),
                config: parsed.ok(),
            };
            let text = serde_json::to_string(&report).map_err(std::io::Error::other)?;
            writeln!(out, "{text}")?;
        }
        OutputFormat::Text => {
            writeln!(out, "key:        {key}")?;
            writeln!(out, "value:      {value}")?;
            writeln!(out, "revision:   {}", kv.mod_revision())?;
            match parsed {
                Ok(c) => {
                    writeln!(out, "interval:   {}s", c.interval)?;
                    writeln!(out, "metrics:    {}", c.metrics)?;
                    writeln!(out, "written by: {}", writer(&c))?;
                }
                Err(e) => writeln!(
                    out,
                    "INVALID:    {e} (the agent rejects it and keeps its last good config)"
                )?,
            }
        }
    }
    Ok(())
}

fn writer(c: &ConfigValue) -> String {
    match (&c.managed_by, &c.source) {
        (Some(m), Some(s)) => format!(
            "{m} (MonitorConfig {}, generation {})",
            s.monitor_config, s.generation
        ),
        (Some(m), None) => m.clone(),
        (None, _) => "hand (nodepulsectl or etcdctl; the controller leaves it alone)".to_string(),
    }
}

/// `config set`: validates, then writes every target's key in as few transactions as possible.
pub async fn set(
    client: &mut Client,
    targets: Targets,
    change: &ConfigChange,
    mut out: impl Write,
    mut err: impl Write,
) -> Result<()> {
    // Refuse bad flags before touching etcd: a refused change writes nothing.
    change.apply_to(None)?;
    let mut nodes = match targets {
        Targets::Nodes(nodes) => {
            validate_nodes(&nodes)?;
            nodes
        }
        Targets::AllWithHeartbeat => nodes_with_heartbeat(client).await?,
    };
    // etcd refuses a transaction that puts the same key twice.
    nodes.sort();
    nodes.dedup();
    let current = current_configs(client).await?;

    let mut writes = Vec::new();
    for node in &nodes {
        let existing = current.get(node.as_str());
        let previous = existing.and_then(|kv| ConfigValue::parse(kv.value()).ok());
        let value = change.apply_to(previous.as_ref())?;
        if let Some(prev) = previous.as_ref().filter(|p| p.is_managed()) {
            // A value without `managedBy` is a hand-written key to the controller: it stops
            // managing it (its MonitorConfig turns Ready=False, UnmanagedKeys) until it is deleted.
            let mc = prev
                .source
                .as_ref()
                .map_or("its MonitorConfig".to_string(), |s| {
                    format!("MonitorConfig {}", s.monitor_config)
                });
            writeln!(
                err,
                "warning: {key} was managed by {CONTROLLER_MANAGER} from {mc}; written by hand now, the controller leaves it alone and {mc} reports it (Ready=False, UnmanagedKeys); `nodepulsectl config delete {node}` hands it back to the controller",
                key = config_key(node),
            )?;
        }
        writes.push((node.clone(), value));
    }

    for chunk in writes.chunks(PUTS_PER_TXN) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|(node, v)| TxnOp::put(config_key(node), v.to_json(), None))
            .collect();
        let resp = client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(Error::etcd(format!("write {} config keys", chunk.len())))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        for (node, v) in chunk {
            writeln!(
                out,
                "{} = {} (revision {revision})",
                config_key(node),
                v.to_json()
            )?;
        }
    }
    Ok(())
}

/// `config delete`: removes the keys (the agents fall back to the defaults).
pub async fn delete(
    client: &mut Client,
    nodes: &[String],
    mut out: impl Write,
    mut err: impl Write,
) -> Result<()> {
    validate_nodes(nodes)?;
    for node in nodes {
        let key = config_key(node);
        let resp = client
            .delete(key.as_str(), Some(DeleteOptions::new().with_prev_key()))
            .await
            .map_err(Error::etcd(format!("delete {key}")))?;
        let Some(prev) = resp.prev_kvs().first() else {
            writeln!(out, "{key} did not exist: nothing to delete")?;
            continue;
        };
        writeln!(
            out,
            "{key} deleted: the agent on {node} goes back to the defaults"
        )?;
        if let Some(prev) = ConfigValue::parse(prev.value())
            .ok()
            .filter(ConfigValue::is_managed)
        {
            let mc = prev.source.map_or("a MonitorConfig".to_string(), |s| {
                format!("MonitorConfig {}", s.monitor_config)
            });
            writeln!(
                err,
                "note: {key} was written by {CONTROLLER_MANAGER} from {mc}; it writes the key again while {mc} selects {node}"
            )?;
        }
    }
    Ok(())
}

/// Every node with a heartbeat key.
async fn nodes_with_heartbeat(client: &mut Client) -> Result<Vec<String>> {
    let listing = list_prefix(client, HEARTBEAT_PREFIX, true)
        .await
        .map_err(Error::etcd(format!("list {HEARTBEAT_PREFIX}")))?;
    let nodes: Vec<String> = listing
        .kvs
        .iter()
        .filter_map(|kv| node_of_heartbeat_key(kv.key()).map(str::to_string))
        .collect();
    if nodes.is_empty() {
        return Err(Error::NotFound(format!(
            "--all: no node has a heartbeat key under {HEARTBEAT_PREFIX}; nothing written"
        )));
    }
    Ok(nodes)
}

/// Every config key, by node.
async fn current_configs(client: &mut Client) -> Result<BTreeMap<String, KeyValue>> {
    let listing = list_prefix(client, CONFIG_PREFIX, false)
        .await
        .map_err(Error::etcd(format!("list {CONFIG_PREFIX}")))?;
    Ok(listing
        .kvs
        .iter()
        .filter_map(|kv| node_of_config_key(kv.key()).map(|n| (n.to_string(), kv.clone())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(interval: Option<&str>, metrics: Option<&str>) -> ConfigChange {
        ConfigChange {
            interval: interval.map(Into::into),
            metrics: metrics.map(Into::into),
        }
    }

    #[test]
    fn interval_2_with_cpu_and_memory_is_accepted() {
        let v = change(Some("2"), Some("cpu,memory"))
            .apply_to(None)
            .unwrap();
        assert_eq!(v.to_json(), r#"{"interval":2,"metrics":["cpu","memory"]}"#);
        let v = change(Some("2s"), Some(" memory , cpu "))
            .apply_to(None)
            .unwrap();
        assert_eq!(v.to_json(), r#"{"interval":2,"metrics":["cpu","memory"]}"#);
    }

    #[test]
    fn a_missing_field_keeps_the_current_value() {
        let current = ConfigValue::new(5, "disk".parse().unwrap()).unwrap();
        let v = change(Some("2"), None).apply_to(Some(&current)).unwrap();
        assert_eq!(v.to_json(), r#"{"interval":2,"metrics":["disk"]}"#);
        let v = change(None, Some("load")).apply_to(None).unwrap();
        assert_eq!(v.to_json(), r#"{"interval":10,"metrics":["load"]}"#);
    }

    #[test]
    fn a_hand_write_drops_the_controller_markers() {
        let mut current = ConfigValue::new(5, "disk".parse().unwrap()).unwrap();
        current.managed_by = Some(nodepulse_crd::wire::CONTROLLER_MANAGER.into());
        let v = change(Some("3"), None).apply_to(Some(&current)).unwrap();
        assert!(!v.is_managed());
        assert_eq!(v.source, None);
    }

    #[test]
    fn bad_values_are_refused_with_the_agents_reason() {
        let msg = |i: Option<&str>, m: Option<&str>| {
            let e = change(i, m).apply_to(None).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
            e.to_string()
        };
        assert_eq!(
            msg(Some("0"), None),
            "config refused, nothing written: interval 0 is out of range: must be 1 to 3600 seconds"
        );
        assert!(msg(Some("-1"), None).contains("interval -1 is out of range"));
        assert!(msg(Some("3601"), None).contains("out of range"));
        assert!(msg(Some("fast"), None).contains("not a whole number"));
        assert_eq!(
            msg(None, Some("cpu,gpu")),
            r#"config refused, nothing written: unknown metric "gpu": must be one of cpu, memory, disk, network, load"#
        );
        assert!(msg(None, Some(",")).contains("at least one"));
    }

    #[test]
    fn node_names_are_checked() {
        assert!(validate_nodes(&["worker-1".into()]).is_ok());
        assert!(matches!(
            validate_nodes(&["Worker_1".into()]),
            Err(Error::Invalid(_))
        ));
    }
}
