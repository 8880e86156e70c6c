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
        row(
            "interval as a string",
            r#"{"interval":"2","metrics":["cpu"]}"#,
            r#"field "interval" must be a whole number of seconds, got a string"#,
        ),
        row(
            "interval 0",
            r#"{"interval":0,"metrics":["cpu"]}"#,
            "interval 0 is out of range",
        ),
        row(
            "interval as a boolean",
            r#"{"interval":true,"metrics":["cpu"]}"#,
            "got a boolean",
        ),
        row(
            "interval -1",
            r#"{"interval":-1,"metrics":["cpu"]}"#,
            "interval -1 is out of range",
        ),
        row(
            "interval null",
            r#"{"interval":null,"metrics":["cpu"]}"#,
            "got null",
        ),
        row(
            "interval 3601",
            r#"{"interval":3601,"metrics":["cpu"]}"#,
            "interval 3601 is out of range",
        ),
        row(
            "interval as an array",
            r#"{"interval":[2],"metrics":["cpu"]}"#,
            "got an array",
        ),
        row(
            "interval 1e9",
            r#"{"interval":1e9,"metrics":["cpu"]}"#,
            "interval 1000000000 is out of range",
        ),
        row(
            "interval \"NaN\"",
            r#"{"interval":"NaN","metrics":["cpu"]}"#,
            "got a string",
        ),
        row(
            "interval 2.5",
            r#"{"interval":2.5,"metrics":["cpu"]}"#,
            "got a fraction",
        ),
        row(
            "interval 1e400 (beyond f64)",
            r#"{"interval":1e400,"metrics":["cpu"]}"#,
            "not valid JSON",
        ),
        row(
            "interval as an object",
            r#"{"interval":{"seconds":2},"metrics":["cpu"]}"#,
            "got an object",
        ),
        row(
            "metrics as a string",
            r#"{"interval":2,"metrics":"cpu,memory"}"#,
            r#"field "metrics" must be an array of metric names, got a string"#,
        ),
        row(
            "metrics empty",
            r#"{"interval":2,"metrics":[]}"#,
            "metrics must name at least one",
        ),
        row(
            "unknown metric",
            r#"{"interval":2,"metrics":["cpu","gpu"]}"#,
            r#"unknown metric "gpu""#,
        ),
        row(
            "duplicate metrics",
            r#"{"interval":2,"metrics":["cpu","memory","cpu"]}"#,
            r#"metric "cpu" is listed twice"#,
        ),
        row(
            "metric in upper case",
            r#"{"interval":2,"metrics":["CPU"]}"#,
            r#"unknown metric "CPU""#,
        ),
        row(
            "metric as a number",
            r#"{"interval":2,"metrics":[1]}"#,
            "an array holding a number",
        ),
        row(
            "metric null",
            r#"{"interval":2,"metrics":[null]}"#,
            "an array holding null",
        ),
        row(
            "metrics nested one level more",
            r#"{"interval":2,"metrics":[["cpu"]]}"#,
            "an array holding a non-string",
        ),
        row(
            "metrics as an object",
            r#"{"interval":2,"metrics":{"cpu":true}}"#,
            "got an object",
        ),
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
