//! The etcd wire contract shared by the agent, the controller and `nodepulsectl`.
//!
//! Two key families live under `/monitor/`:
//! - `/monitor/heartbeat/<node>`: written by the agent, attached to its lease, value [`Heartbeat`];
//! - `/monitor/config/<node>`: written by the controller, `nodepulsectl` or `etcdctl`, value [`ConfigValue`].
//!
//! Everything that reads a value from etcd goes through [`ConfigValue::parse`] or
//! [`Heartbeat::parse`], so all three binaries accept and reject exactly the same bytes.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::jiff::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Prefix of the heartbeat keys, one per node.
pub const HEARTBEAT_PREFIX: &str = "/monitor/heartbeat/";
/// Prefix of the configuration keys, one per node.
pub const CONFIG_PREFIX: &str = "/monitor/config/";

/// Shortest sampling interval a config may ask for, in seconds.
pub const MIN_INTERVAL_SECONDS: u32 = 1;
/// Longest sampling interval a config may ask for, in seconds (one hour).
pub const MAX_INTERVAL_SECONDS: u32 = 3600;
/// Interval the agent uses when no config key exists.
pub const DEFAULT_INTERVAL_SECONDS: u32 = 10;
/// Largest config value accepted: a legitimate one is well under 300 bytes.
pub const MAX_CONFIG_BYTES: usize = 4096;
/// Largest heartbeat value a controller takes: an agent's is about 700 bytes.
pub const MAX_HEARTBEAT_BYTES: usize = 4096;
/// The heartbeat lease TTLs an agent may run with, in seconds.
pub const HEARTBEAT_TTL_SECONDS: std::ops::RangeInclusive<u32> = 2..=300;
/// How far a heartbeat's `ttlSeconds` may be from its lease's granted TTL: etcd grants at least
/// its minimum TTL (1.5 election timeouts, rounded up to whole seconds), so an agent asking for
/// less gets a second more.
pub const HEARTBEAT_TTL_TOLERANCE_SECONDS: u32 = 1;
/// Value of `managedBy` in the config keys the controller writes.
pub const CONTROLLER_MANAGER: &str = "nodepulse-controller";

/// The key an agent keeps alive through its lease.
pub fn heartbeat_key(node: &str) -> String {
    format!("{HEARTBEAT_PREFIX}{node}")
}

/// The key an agent watches for its configuration.
pub fn config_key(node: &str) -> String {
    format!("{CONFIG_PREFIX}{node}")
}

/// The node a heartbeat key belongs to, or `None` for a key outside the prefix.
pub fn node_of_heartbeat_key(key: &[u8]) -> Option<&str> {
    node_under(key, HEARTBEAT_PREFIX)
}

/// The node a config key belongs to, or `None` for a key outside the prefix.
pub fn node_of_config_key(key: &[u8]) -> Option<&str> {
    node_under(key, CONFIG_PREFIX)
}

fn node_under<'a>(key: &'a [u8], prefix: &str) -> Option<&'a str> {
    let node = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

/// Checks a node name the way Kubernetes checks a Node's name (a DNS subdomain), so that every
/// key we build maps back to exactly one node and one MonitorNode object.
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 253 {
        return Err(format!("node name {name:?} must be 1 to 253 characters"));
    }
    if !name.chars().all(ok_char) || !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(format!(
            "node name {name:?} must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// One family of figures the agent can collect.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Busy % from `/proc/stat`, in total and per core.
    Cpu,
    /// Memory and swap from `/proc/meminfo`.
    Memory,
    /// Per-device throughput from `/proc/diskstats` and the root filesystem's usage.
    Disk,
    /// Per-interface traffic from `/proc/net/dev`.
    Network,
    /// Load averages and task counts from `/proc/loadavg`.
    Load,
}

impl Metric {
    /// Every metric, in the order logs and tables show them.
    pub const ALL: [Metric; 5] = [
        Metric::Cpu,
        Metric::Memory,
        Metric::Disk,
        Metric::Network,
        Metric::Load,
    ];

    /// The name used in JSON, flags and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Memory => "memory",
            Metric::Disk => "disk",
            Metric::Network => "network",
            Metric::Load => "load",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Metric::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ConfigError::UnknownMetric(s.to_string()))
    }
}

/// A non-empty set of metrics, always in [`Metric::ALL`] order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<Metric>", into = "Vec<Metric>")]
pub struct MetricSet(BTreeSet<Metric>);

impl MetricSet {
    /// All five metrics: the default.
    pub fn all() -> Self {
        MetricSet(Metric::ALL.into_iter().collect())
    }

    /// Builds a set, refusing an empty one.
    pub fn new(metrics: impl IntoIterator<Item = Metric>) -> Result<Self, ConfigError> {
        let set: BTreeSet<Metric> = metrics.into_iter().collect();
        if set.is_empty() {
            return Err(ConfigError::NoMetrics);
        }
        Ok(MetricSet(set))
    }

    /// Whether `metric` is in the set.
    pub fn contains(&self, metric: Metric) -> bool {
        self.0.contains(&metric)
    }

    /// The metrics in display order.
    pub fn iter(&self) -> impl Iterator<Item = Metric> + '_ {
        self.0.iter().copied()
    }

    /// The metrics as a Vec, for JSON and the CRDs.
    pub fn to_vec(&self) -> Vec<Metric> {
        self.iter().collect()
    }
}

impl Default for MetricSet {
    /// All five, as an agent collects when no config key exists.
    fn default() -> Self {
        MetricSet::all()
    }
}

impl TryFrom<Vec<Metric>> for MetricSet {
    type Error = ConfigError;
    fn try_from(v: Vec<Metric>) -> Result<Self, ConfigError> {
        MetricSet::new(v)
    }
}

impl From<MetricSet> for Vec<Metric> {
    fn from(s: MetricSet) -> Self {
        s.to_vec()
    }
}

impl fmt::Display for MetricSet {
    /// `[cpu, memory]`, as the agent's log lines show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, m) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(m.as_str())?;
        }
        f.write_str("]")
    }
}

impl FromStr for MetricSet {
    type Err = ConfigError;

    /// Parses a comma-separated list such as `cpu,memory`, as flags take it.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let metrics = s
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(Metric::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        MetricSet::new(metrics)
    }
}

/// Who wrote a config key and from what, when the controller wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigSource {
    /// The MonitorConfig whose spec this key carries.
    pub monitor_config: String,
    /// That MonitorConfig's `metadata.generation` when the key was written.
    pub generation: i64,
}

/// The value of `/monitor/config/<node>`: `{"interval": 2, "metrics": ["cpu", "memory"]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigValue {
    /// Sampling interval in seconds, 1..=3600.
    pub interval: u32,
    /// What to collect.
    pub metrics: MetricSet,
    /// `nodepulse-controller` when the controller owns this key; absent for keys written by hand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// The MonitorConfig this key came from, when the controller wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<ConfigSource>,
}

impl Default for ConfigValue {
    /// What an agent runs with when its config key does not exist.
    fn default() -> Self {
        ConfigValue {
            interval: DEFAULT_INTERVAL_SECONDS,
            metrics: MetricSet::all(),
            managed_by: None,
            source: None,
        }
    }
}

/// Why a config value was rejected. Each variant's message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The value is larger than [`MAX_CONFIG_BYTES`].
    #[error("value is {0} bytes; the limit is {MAX_CONFIG_BYTES}")]
    TooLarge(usize),
    /// The bytes are not UTF-8 JSON.
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// The JSON is not an object.
    #[error(
        "expected a JSON object like {{\"interval\": 2, \"metrics\": [\"cpu\", \"memory\"]}}, got {0}"
    )]
    NotObject(&'static str),
    /// A required field is absent.
    #[error("missing field \"{0}\"")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field \"{field}\" must be {expected}, got {got}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
        /// The JSON type it was.
        got: &'static str,
    },
    /// The interval is outside 1..=3600 seconds.
    #[error(
        "interval {0} is out of range: must be {MIN_INTERVAL_SECONDS} to {MAX_INTERVAL_SECONDS} seconds"
    )]
    IntervalOutOfRange(String),
    /// A metric name is not one of cpu, memory, disk, network, load.
    #[error("unknown metric {0:?}: must be one of cpu, memory, disk, network, load")]
    UnknownMetric(String),
    /// The metrics list is empty.
    #[error("metrics must name at least one of cpu, memory, disk, network, load")]
    NoMetrics,
    /// A metric is named twice in the JSON list. Rejected rather than folded, so that etcd keys
    /// follow the same rule as a MonitorConfig's `spec.metrics` (a set the API server checks).
    #[error("metric {0:?} is listed twice")]
    DuplicateMetric(String),
    /// A field this version does not know (a typo such as "intervall" would otherwise pass unseen).
    #[error("unknown field {0:?}: allowed fields are interval, metrics, managedBy, source")]
    UnknownField(String),
    /// `source` is present but malformed.
    #[error("field \"source\" is malformed: {0}")]
    BadSource(String),
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl ConfigValue {
    /// Builds a hand-written style config (no controller markers), validating it.
    pub fn new(interval: u32, metrics: MetricSet) -> Result<Self, ConfigError> {
        validate_interval(interval as u64)?;
        Ok(ConfigValue {
            interval,
            metrics,
            managed_by: None,
            source: None,
        })
    }

    /// Parses and validates the bytes of a config key. Rejects the value whole on any error.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge(bytes.len()));
        }
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(ConfigError::NotObject(json_type(&value)));
        };
        let interval = parse_interval(obj.remove("interval"))?;
        let metrics = parse_metrics(obj.remove("metrics"))?;
        let managed_by = match obj.remove("managedBy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                return Err(ConfigError::WrongType {
                    field: "managedBy",
                    expected: "a string",
                    got: json_type(&other),
                });
            }
        };
        let source = match obj.remove("source") {
            None | Some(Value::Null) => None,
            Some(v) => {
                Some(serde_json::from_value(v).map_err(|e| ConfigError::BadSource(e.to_string()))?)
            }
        };
        if let Some(field) = first_key(&obj) {
            return Err(ConfigError::UnknownField(field));
        }
        Ok(ConfigValue {
            interval,
            metrics,
            managed_by,
            source,
        })
    }

    /// The JSON written to etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("ConfigValue serializes")
    }

    /// Whether the controller owns this key (so it may rewrite or delete it).
    pub fn is_managed(&self) -> bool {
        self.managed_by.as_deref() == Some(CONTROLLER_MANAGER)
    }

    /// Whether two configs ask the agent for the same behaviour (markers aside).
    pub fn same_settings(&self, other: &ConfigValue) -> bool {
        self.interval == other.interval && self.metrics == other.metrics
    }
}

fn first_key(obj: &Map<String, Value>) -> Option<String> {
    obj.keys().next().cloned()
}

fn validate_interval(n: u64) -> Result<u32, ConfigError> {
    if (MIN_INTERVAL_SECONDS as u64..=MAX_INTERVAL_SECONDS as u64).contains(&n) {
        Ok(n as u32)
    } else {
        Err(ConfigError::IntervalOutOfRange(n.to_string()))
    }
}

fn parse_interval(v: Option<Value>) -> Result<u32, ConfigError> {
    match v {
        None => Err(ConfigError::MissingField("interval")),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(n), _) => validate_interval(n),
            // 2.0 is a whole number of seconds written as a float; 2.5 is not.
            (None, Some(f)) if f.fract() == 0.0 && f >= 0.0 => validate_interval(f as u64),
            (None, Some(f)) if f < 0.0 || f > MAX_INTERVAL_SECONDS as f64 => {
                Err(ConfigError::IntervalOutOfRange(n.to_string()))
            }
            _ => Err(ConfigError::WrongType {
                field: "interval",
                expected: "a whole number of seconds",
                got: "a fraction",
            }),
        },
        Some(other) => Err(ConfigError::WrongType {
            field: "interval",
            expected: "a whole number of seconds",
            got: json_type(&other),
        }),
    }
}

fn parse_metrics(v: Option<Value>) -> Result<MetricSet, ConfigError> {
    let items = match v {
        None => return Err(ConfigError::MissingField("metrics")),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ConfigError::WrongType {
                field: "metrics",
                expected: "an array of metric names",
                got: json_type(&other),
            });
        }
    };
    let metrics = items
        .iter()
        .map(|item| match item {
            Value::String(s) => s.parse::<Metric>(),
            other => Err(ConfigError::WrongType {
                field: "metrics",
                expected: "an array of metric names",
                got: match json_type(other) {
                    "a number" => "an array holding a number",
                    "a boolean" => "an array holding a boolean",
                    "null" => "an array holding null",
                    _ => "an array holding a non-string",
                },
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = BTreeSet::new();
    if let Some(dup) = metrics.iter().find(|m| !seen.insert(**m)) {
        return Err(ConfigError::DuplicateMetric(dup.as_str().to_string()));
    }
    MetricSet::new(metrics)
}

/// Whether the agent is running or on its way out (it says so before revoking its lease, so a
/// reader can tell a clean stop from a death).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AgentState {
    /// Sampling and keeping its lease alive.
    #[default]
    Running,
    /// Received SIGTERM/SIGINT: its lease runs out unless a new agent takes the key over.
    Stopping,
}

/// The configuration an agent is running with, as it reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AppliedConfig {
    /// `mod_revision` of the config key applied; 0 when running on defaults.
    pub revision: i64,
    /// Sampling interval in seconds.
    pub interval: u32,
    /// What the agent collects.
    pub metrics: MetricSet,
    /// The MonitorConfig the applied value came from, when the controller wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ConfigSource>,
    /// Why the last config value was rejected, if it was; cleared by the next good one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AppliedConfig {
    /// What an agent reports while it runs `value`, read from the config key at `revision` (0
    /// on the defaults); `error` says why a later value was rejected, if one was.
    pub fn new(value: &ConfigValue, revision: i64, error: Option<String>) -> Self {
        AppliedConfig {
            revision,
            interval: value.interval,
            metrics: value.metrics.clone(),
            source: value.source.clone(),
            error,
        }
    }
}

/// The latest usage figures, rounded to one decimal; absent when the metric is not collected.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSummary {
    /// Busy CPU, % of all cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Memory in use (total minus available), %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_percent: Option<f64>,
    /// Root filesystem used, %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_percent: Option<f64>,
    /// One-minute load average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
}

/// The value of `/monitor/heartbeat/<node>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// The node this agent runs on.
    pub node: String,
    /// The agent's version.
    pub agent_version: String,
    /// Running, or Stopping just before a clean exit.
    #[serde(default)]
    pub state: AgentState,
    /// When the agent process started.
    pub started_at: Timestamp,
    /// When this value was written.
    pub updated_at: Timestamp,
    /// TTL of the lease the key is attached to.
    pub ttl_seconds: u32,
    /// The configuration in force.
    pub config: AppliedConfig,
    /// The latest usage figures, once a sample has been taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageSummary>,
}

/// Why a key under the heartbeat prefix does not count as its node's heartbeat. Only an agent
/// writes heartbeats, always on a lease of its own and with its own node's name; a key that
/// proves less is not taken as a sign of life, because a false `Alive` keeps a dead node in
/// service, whoever wrote the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The key has no lease, so nothing removes it when its writer dies.
    NoLease,
    /// The value is larger than an agent ever writes.
    TooLarge,
    /// The value is not an agent's heartbeat.
    Malformed,
    /// The value names another node than its key.
    OtherNode,
    /// The value's TTL is outside what an agent may run with.
    TtlOutOfRange,
    /// The lease already carries another node's heartbeat: one agent keeps only its own alive.
    SharedLease,
    /// The value's TTL is not its lease's: an agent writes the TTL it granted its lease with.
    TtlMismatch,
    /// The lease was granted a TTL outside what an agent may run with.
    LeaseTtlOutOfRange,
    /// No Node has the key's name, and the heartbeats without a Node have reached their cap.
    NoNode,
}

impl Rejection {
    /// The metric label and log word.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::NoLease => "no_lease",
            Rejection::TooLarge => "too_large",
            Rejection::Malformed => "malformed",
            Rejection::OtherNode => "other_node",
            Rejection::TtlOutOfRange => "ttl_out_of_range",
            Rejection::SharedLease => "shared_lease",
            Rejection::TtlMismatch => "ttl_mismatch",
            Rejection::LeaseTtlOutOfRange => "lease_ttl_out_of_range",
            Rejection::NoNode => "no_node",
        }
    }
}

/// A heartbeat value that does not parse (written by something other than an agent).
#[derive(Debug, thiserror::Error)]
#[error("heartbeat value is not valid: {0}")]
pub struct HeartbeatError(#[source] serde_json::Error);

impl Heartbeat {
    /// A running agent's value at `at`, before its first sample: started then, on the default
    /// config. Callers change what differs.
    pub fn running(node: &str, ttl_seconds: u32, at: Timestamp) -> Self {
        Heartbeat {
            node: node.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            state: AgentState::Running,
            started_at: at,
            updated_at: at,
            ttl_seconds,
            config: AppliedConfig::new(&ConfigValue::default(), 0, None),
            usage: None,
        }
    }

    /// Parses the bytes of a heartbeat key.
    pub fn parse(bytes: &[u8]) -> Result<Self, HeartbeatError> {
        serde_json::from_slice(bytes).map_err(HeartbeatError)
    }

    /// The heartbeat in `node`'s key on `lease` (0: none), if the key proves what an agent's
    /// does. Whether the lease carries another node's heartbeat too takes the other keys to
    /// know: the caller's to check.
    pub fn admit(node: &str, lease: i64, value: &[u8]) -> Result<Self, Rejection> {
        if lease == 0 {
            return Err(Rejection::NoLease);
        }
        if value.len() > MAX_HEARTBEAT_BYTES {
            return Err(Rejection::TooLarge);
        }
        let hb = Heartbeat::parse(value).map_err(|_| Rejection::Malformed)?;
        if hb.node != node {
            return Err(Rejection::OtherNode);
        }
        if !HEARTBEAT_TTL_SECONDS.contains(&hb.ttl_seconds) {
            return Err(Rejection::TtlOutOfRange);
        }
        Ok(hb)
    }

    /// The heartbeat judged by its lease, granted `granted_ttl` seconds (as etcd's
    /// LeaseTimeToLive says): the TTL that counts is the lease's, since the key lives exactly as
    /// long as it; so a lease no agent grants proves nothing, nor does a value claiming another
    /// TTL than its lease's. Returns the heartbeat with the lease's TTL.
    pub fn on_lease(mut self, granted_ttl: i64) -> Result<Self, Rejection> {
        let granted = u32::try_from(granted_ttl)
            .ok()
            .filter(|ttl| HEARTBEAT_TTL_SECONDS.contains(ttl))
            .ok_or(Rejection::LeaseTtlOutOfRange)?;
        if granted.abs_diff(self.ttl_seconds) > HEARTBEAT_TTL_TOLERANCE_SECONDS {
            return Err(Rejection::TtlMismatch);
        }
        self.ttl_seconds = granted;
        Ok(self)
    }

    /// The JSON written to etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("Heartbeat serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ConfigValue, ConfigError> {
        ConfigValue::parse(s.as_bytes())
    }

    #[test]
    fn the_labs_exact_format_parses() {
        let c = parse(r#"{"interval": 2, "metrics": ["cpu","memory"]}"#).unwrap();
        assert_eq!(c.interval, 2);
        assert_eq!(c.metrics.to_vec(), vec![Metric::Cpu, Metric::Memory]);
        assert!(!c.is_managed());
        assert_eq!(c.metrics.to_string(), "[cpu, memory]");
    }

    #[test]
    fn controller_markers_round_trip() {
        let mut c = ConfigValue::new(5, "disk,cpu".parse().unwrap()).unwrap();
        c.managed_by = Some(CONTROLLER_MANAGER.into());
        c.source = Some(ConfigSource {
            monitor_config: "fast".into(),
            generation: 3,
        });
        let json = c.to_json();
        assert_eq!(
            json,
            r#"{"interval":5,"metrics":["cpu","disk"],"managedBy":"nodepulse-controller","source":{"monitorConfig":"fast","generation":3}}"#
        );
        assert_eq!(ConfigValue::parse(json.as_bytes()).unwrap(), c);
        assert!(c.is_managed());
    }

    #[test]
    fn each_malformed_value_has_its_own_error() {
        let cases: &[(&str, ConfigError)] = &[
            ("", ConfigError::NotJson(String::new())),
            ("{", ConfigError::NotJson(String::new())),
            ("[1,2]", ConfigError::NotObject("an array")),
            ("\"x\"", ConfigError::NotObject("a string")),
            (
                r#"{"metrics":["cpu"]}"#,
                ConfigError::MissingField("interval"),
            ),
            (r#"{"interval":2}"#, ConfigError::MissingField("metrics")),
            (
                r#"{"interval":"2","metrics":["cpu"]}"#,
                ConfigError::WrongType {
                    field: "interval",
                    expected: "a whole number of seconds",
                    got: "a string",
                },
            ),
            (
                r#"{"interval":2.5,"metrics":["cpu"]}"#,
                ConfigError::WrongType {
                    field: "interval",
                    expected: "a whole number of seconds",
                    got: "a fraction",
                },
            ),
            (
                r#"{"interval":0,"metrics":["cpu"]}"#,
                ConfigError::IntervalOutOfRange("0".into()),
            ),
            (
                r#"{"interval":-3,"metrics":["cpu"]}"#,
                ConfigError::IntervalOutOfRange("-3".into()),
            ),
            (
                r#"{"interval":3601,"metrics":["cpu"]}"#,
                ConfigError::IntervalOutOfRange("3601".into()),
            ),
            (
                r#"{"interval":2,"metrics":"cpu"}"#,
                ConfigError::WrongType {
                    field: "metrics",
                    expected: "an array of metric names",
                    got: "a string",
                },
            ),
            (r#"{"interval":2,"metrics":[]}"#, ConfigError::NoMetrics),
            (
                r#"{"interval":2,"metrics":["cpu","gpu"]}"#,
                ConfigError::UnknownMetric("gpu".into()),
            ),
            (
                r#"{"interval":2,"metrics":["CPU"]}"#,
                ConfigError::UnknownMetric("CPU".into()),
            ),
            (
                r#"{"interval":2,"metrics":[1]}"#,
                ConfigError::WrongType {
                    field: "metrics",
                    expected: "an array of metric names",
                    got: "an array holding a number",
                },
            ),
            (
                r#"{"interval":2,"metrics":["cpu"],"intervall":3}"#,
                ConfigError::UnknownField("intervall".into()),
            ),
            (
                r#"{"interval":2,"metrics":["cpu"],"source":"x"}"#,
                ConfigError::BadSource(String::new()),
            ),
        ];
        for (input, want) in cases {
            let got = parse(input).expect_err(input);
            // JSON parser messages are serde's: compare the variant, not the text.
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(want),
                "{input}: {got}"
            );
            if !matches!(want, ConfigError::NotJson(_) | ConfigError::BadSource(_)) {
                assert_eq!(&got, want, "{input}");
            }
        }
        let huge = format!(
            r#"{{"interval":2,"metrics":["cpu"],"pad":"{}"}}"#,
            "x".repeat(5000)
        );
        assert!(matches!(parse(&huge), Err(ConfigError::TooLarge(_))));
    }

    #[test]
    fn lenient_where_harmless() {
        // Whole floats, any order and explicit nulls are unambiguous.
        let c = parse(r#"{"interval":2.0,"metrics":["memory","cpu"],"managedBy":null}"#).unwrap();
        assert_eq!(c.interval, 2);
        assert_eq!(c.metrics.to_vec(), vec![Metric::Cpu, Metric::Memory]);
        // A metric named twice is a mistake the API server also refuses in a MonitorConfig.
        assert_eq!(
            parse(r#"{"interval":2,"metrics":["cpu","memory","cpu"]}"#),
            Err(ConfigError::DuplicateMetric("cpu".into()))
        );
        assert!(parse(r#"{"interval":3600,"metrics":["load"]}"#).is_ok());
        assert!(parse(r#"{"interval":1,"metrics":["network"]}"#).is_ok());
    }

    #[test]
    fn error_messages_say_what_to_fix() {
        let e = parse(r#"{"interval":0,"metrics":["cpu"]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "interval 0 is out of range: must be 1 to 3600 seconds"
        );
        let e = parse(r#"{"interval":2,"metrics":["gpu"]}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown metric "gpu": must be one of cpu, memory, disk, network, load"#
        );
    }

    #[test]
    fn keys_map_back_to_nodes() {
        assert_eq!(heartbeat_key("worker-1"), "/monitor/heartbeat/worker-1");
        assert_eq!(config_key("worker-1"), "/monitor/config/worker-1");
        assert_eq!(
            node_of_heartbeat_key(b"/monitor/heartbeat/worker-1"),
            Some("worker-1")
        );
        assert_eq!(node_of_heartbeat_key(b"/monitor/heartbeat/"), None);
        assert_eq!(node_of_heartbeat_key(b"/monitor/heartbeat/a/b"), None);
        assert_eq!(node_of_heartbeat_key(b"/monitor/config/worker-1"), None);
        assert_eq!(node_of_config_key(b"/monitor/config/w"), Some("w"));
    }

    #[test]
    fn node_names_follow_kubernetes_rules() {
        assert!(validate_node_name("worker-1").is_ok());
        assert!(validate_node_name("ip-10-0-0-1.ec2.internal").is_ok());
        for bad in ["", "Worker", "-a", "a-", "a/b", "a b", &"x".repeat(254)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = Heartbeat {
            node: "worker-1".into(),
            agent_version: "0.1.0".into(),
            state: AgentState::Running,
            started_at: "2026-11-22T05:00:00Z".parse().unwrap(),
            updated_at: "2026-11-22T05:00:05Z".parse().unwrap(),
            ttl_seconds: 10,
            config: AppliedConfig {
                revision: 41,
                interval: 2,
                metrics: "cpu,memory".parse().unwrap(),
                source: None,
                error: Some("interval 0 is out of range".into()),
            },
            usage: Some(UsageSummary {
                cpu_percent: Some(12.5),
                memory_percent: Some(40.0),
                disk_percent: None,
                load1: Some(0.5),
            }),
        };
        assert_eq!(Heartbeat::parse(hb.to_json().as_bytes()).unwrap(), hb);
        assert!(Heartbeat::parse(b"alive").is_err());
    }

    #[test]
    fn a_heartbeat_is_judged_with_its_leases_ttl() {
        let hb = |ttl| Heartbeat::running("worker-1", ttl, Timestamp::UNIX_EPOCH);
        // The lease's TTL counts, within etcd's rounding.
        assert_eq!(hb(10).on_lease(10).map(|h| h.ttl_seconds), Ok(10));
        assert_eq!(hb(10).on_lease(11).map(|h| h.ttl_seconds), Ok(11));
        assert_eq!(
            hb(2).on_lease(1).map(|h| h.ttl_seconds),
            Err(Rejection::LeaseTtlOutOfRange)
        );
        assert_eq!(hb(300).on_lease(300).map(|h| h.ttl_seconds), Ok(300));
        // A value claiming another TTL than its lease's.
        assert_eq!(hb(3).on_lease(60), Err(Rejection::TtlMismatch));
        assert_eq!(hb(60).on_lease(10), Err(Rejection::TtlMismatch));
        // A lease no agent grants, whatever the value says.
        for granted in [0, -1, 301, 3600, i64::MAX] {
            assert_eq!(
                hb(300).on_lease(granted),
                Err(Rejection::LeaseTtlOutOfRange),
                "{granted}"
            );
        }
    }

    #[test]
    fn only_an_agents_key_is_admitted() {
        let value = Heartbeat::running("worker-1", 10, Timestamp::UNIX_EPOCH).to_json();
        let admit = |node, lease, value: &str| Heartbeat::admit(node, lease, value.as_bytes());
        assert!(admit("worker-1", 7, &value).is_ok());
        assert_eq!(admit("worker-1", 0, &value), Err(Rejection::NoLease));
        assert_eq!(admit("worker-2", 7, &value), Err(Rejection::OtherNode));
        assert_eq!(admit("worker-1", 7, "alive"), Err(Rejection::Malformed));
        let huge = format!("{value:<5000}");
        assert_eq!(admit("worker-1", 7, &huge), Err(Rejection::TooLarge));
        let long = Heartbeat::running("worker-1", 3600, Timestamp::UNIX_EPOCH).to_json();
        assert_eq!(admit("worker-1", 7, &long), Err(Rejection::TtlOutOfRange));
    }
}
