//! The table of bad config values shared by `crd/tests/bad_config.rs` (the parser alone) and
//! `agent/tests/bad_input.rs` (a real agent, controller and API server). Neighbouring rows give
//! different error messages, so an end-to-end test can tell one rejection from the previous one.

/// One value that must be rejected whole.
pub struct BadConfig {
    /// What the row tests.
    pub what: &'static str,
    /// The bytes put in the config key.
    pub value: Vec<u8>,
    /// A piece of the error message the parser must give.
    pub reason: &'static str,
}

fn row(what: &'static str, value: impl Into<Vec<u8>>, reason: &'static str) -> BadConfig {
    BadConfig {
        what,
        value: value.into(),
        reason,
    }
}

/// A config whose `interval` is `value` (JSON text) and whose metrics are valid.
fn with_interval(what: &'static str, value: &str, reason: &'static str) -> BadConfig {
    row(
        what,
        format!(r#"{{"interval":{value},"metrics":["cpu"]}}"#),
        reason,
    )
}

/// A config whose `metrics` is `value` (JSON text) and whose interval is valid.
fn with_metrics(what: &'static str, value: &str, reason: &'static str) -> BadConfig {
    row(
        what,
        format!(r#"{{"interval":2,"metrics":{value}}}"#),
        reason,
    )
}

/// At least 25 values, each rejected for its own reason.
pub fn bad_configs() -> Vec<BadConfig> {
    let one_mib = format!(
        r#"{{"interval":2,"metrics":["cpu"],"pad":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    vec![
        row("empty value", "", "not valid JSON"),
        row("unclosed object", "{", "not valid JSON"),
        row("plain text", "interval=2", "not valid JSON"),
        row("JSON array", "[1,2]", "got an array"),
        row("JSON string", r#""interval""#, "got a string"),
        row("JSON null", "null", "got null"),
        row("JSON number", "2", "got a number"),
        row(
            "missing interval",
            r#"{"metrics":["cpu"]}"#,
            r#"missing field "interval""#,
        ),
        row(
            "missing metrics",
            r#"{"interval":2}"#,
            r#"missing field "metrics""#,
        ),
        with_interval(
            "interval as a string",
            r#""2""#,
            r#"field "interval" must be a whole number of seconds, got a string"#,
        ),
        with_interval("interval 0", "0", "interval 0 is out of range"),
        with_interval("interval as a boolean", "true", "got a boolean"),
        with_interval("interval -1", "-1", "interval -1 is out of range"),
        with_interval("interval null", "null", "got null"),
        with_interval("interval 3601", "3601", "interval 3601 is out of range"),
        with_interval("interval as an array", "[2]", "got an array"),
        with_interval("interval 1e9", "1e9", "interval 1000000000 is out of range"),
        with_interval("interval \"NaN\"", r#""NaN""#, "got a string"),
        with_interval("interval 2.5", "2.5", "got a fraction"),
        with_interval("interval 1e400 (beyond f64)", "1e400", "not valid JSON"),
        with_interval("interval as an object", r#"{"seconds":2}"#, "got an object"),
        with_metrics(
            "metrics as a string",
            r#""cpu,memory""#,
            r#"field "metrics" must be an array of metric names, got a string"#,
        ),
        with_metrics("metrics empty", "[]", "metrics must name at least one"),
        with_metrics(
            "unknown metric",
            r#"["cpu","gpu"]"#,
            r#"unknown metric "gpu""#,
        ),
        with_metrics(
            "duplicate metrics",
            r#"["cpu","memory","cpu"]"#,
            r#"metric "cpu" is listed twice"#,
        ),
        with_metrics(
            "metric in upper case",
            r#"["CPU"]"#,
            r#"unknown metric "CPU""#,
        ),
        with_metrics("metric as a number", "[1]", "an array holding a number"),
        with_metrics("metric null", "[null]", "an array holding null"),
        with_metrics(
            "metrics nested one level more",
            r#"[["cpu"]]"#,
            "an array holding a non-string",
        ),
        with_metrics("metrics as an object", r#"{"cpu":true}"#, "got an object"),
        row(
            "whole config nested one level",
            r#"{"config":{"interval":2,"metrics":["cpu"]}}"#,
            r#"missing field "interval""#,
        ),
        row(
            "unknown field",
            r#"{"interval":2,"metrics":["cpu"],"intervall":3}"#,
            r#"unknown field "intervall""#,
        ),
        row(
            "managedBy as a number",
            r#"{"interval":2,"metrics":["cpu"],"managedBy":1}"#,
            r#"field "managedBy" must be a string"#,
        ),
        row(
            "source malformed",
            r#"{"interval":2,"metrics":["cpu"],"source":"fast"}"#,
            r#"field "source" is malformed"#,
        ),
        row("1 MiB value", one_mib, "bytes; the limit is 4096"),
        row(
            "non-UTF-8 bytes alone",
            b"\xff\xfe\xfd".to_vec(),
            "not valid JSON",
        ),
        row(
            "trailing garbage",
            r#"{"interval":2,"metrics":["cpu"]} x"#,
            "not valid JSON: trailing characters",
        ),
        row(
            "non-UTF-8 bytes in a string",
            b"{\"interval\":2,\"metrics\":[\"cpu\xff\"]}".to_vec(),
            "not valid JSON",
        ),
        row(
            "two objects",
            r#"{"interval":2,"metrics":["cpu"]}{"interval":3,"metrics":["cpu"]}"#,
            "not valid JSON: trailing characters",
        ),
        row(
            "duplicate interval field",
            r#"{"interval":2,"interval":0,"metrics":["cpu"]}"#,
            "interval 0 is out of range",
        ),
    ]
}
