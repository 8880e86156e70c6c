//! Property tests of the two parsers every binary reads etcd values with: they never panic, what
//! they accept survives `to_json` and back unchanged, and well-formed values are always accepted.

use nodepulse_crd::wire::{
    AgentState, AppliedConfig, CONTROLLER_MANAGER, ConfigSource, ConfigValue, Heartbeat, Metric,
    MetricSet, UsageSummary,
};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON document, nested a few levels.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 ]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field value that is sometimes right and often subtly wrong.
fn interval_like() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..4000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-10.0f64..4000.0).prop_map(Value::from),
        Just(json!("2")),
        Just(json!("NaN")),
        any_json(),
    ]
}

fn metric_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(vec!["cpu", "memory", "disk", "network", "load"]).prop_map(Value::from),
        1 => Just(json!("gpu")),
        1 => Just(json!("CPU")),
        1 => any_json(),
    ]
}

/// Objects shaped like a config with each field drawn from good and bad values, plus
/// sometimes the controller's markers and an unknown field.
fn config_like() -> impl Strategy<Value = Value> {
    (
        prop::option::weighted(0.9, interval_like()),
        prop::option::weighted(0.9, prop::collection::vec(metric_name(), 0..7)),
        prop::option::of(prop_oneof![Just(json!(CONTROLLER_MANAGER)), any_json()]),
        prop::option::of(prop_oneof![
            ("[a-z]{1,8}", any::<i64>())
                .prop_map(|(n, g)| json!({"monitorConfig": n, "generation": g})),
            any_json(),
        ]),
        prop::option::weighted(0.1, ("[a-z]{1,8}", any_json())),
    )
        .prop_map(|(interval, metrics, managed_by, source, extra)| {
            let mut obj = serde_json::Map::new();
            if let Some(v) = interval {
                obj.insert("interval".into(), v);
            }
            if let Some(m) = metrics {
                obj.insert("metrics".into(), Value::Array(m));
            }
            if let Some(v) = managed_by {
                obj.insert("managedBy".into(), v);
            }
            if let Some(v) = source {
                obj.insert("source".into(), v);
            }
            if let Some((k, v)) = extra {
                obj.insert(k, v);
            }
            Value::Object(obj)
        })
}

/// A config value as the controller, nodepulsectl or a person would write it.
fn valid_config() -> impl Strategy<Value = (u32, Vec<Metric>, Option<ConfigSource>)> {
    (
        1u32..=3600,
        Just(Metric::ALL.to_vec()).prop_shuffle(),
        1usize..=5,
        prop::option::of(
            ("[a-z0-9-]{1,20}", any::<i64>()).prop_map(|(n, g)| ConfigSource {
                monitor_config: n,
                generation: g,
            }),
        ),
    )
        .prop_map(|(interval, metrics, n, source)| (interval, metrics[..n].to_vec(), source))
}

fn assert_config_round_trips(c: &ConfigValue) {
    let again = ConfigValue::parse(c.to_json().as_bytes()).expect("to_json re-parses");
    assert_eq!(&again, c);
}

fn percent() -> impl Strategy<Value = Option<f64>> {
    prop::option::of((0u32..=1000).prop_map(|n| f64::from(n) / 10.0))
}

fn valid_heartbeat() -> impl Strategy<Value = Heartbeat> {
    (
        "[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?",
        prop_oneof![Just(AgentState::Running), Just(AgentState::Stopping)],
        (0i64..4_000_000_000, 0i64..1_000_000),
        2u32..=300,
        (0i64..1_000_000, valid_config()),
        prop::option::of(prop::option::of("[ -~]{0,80}")),
        prop::option::of((percent(), percent(), percent(), percent())),
    )
        .prop_map(
            |(
                node,
                state,
                (start, up),
                ttl,
                (revision, (interval, metrics, source)),
                error,
                usage,
            )| {
                let at = |s: i64| k8s_openapi::jiff::Timestamp::from_second(s).expect("in range");
                Heartbeat {
                    node,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    state,
                    started_at: at(start),
                    updated_at: at(start + up),
                    ttl_seconds: ttl,
                    config: AppliedConfig {
                        revision,
                        interval,
                        metrics: MetricSet::new(metrics).expect("at least one metric"),
                        source,
                        error: error.flatten(),
                    },
                    usage: usage.map(|(c, m, d, l)| UsageSummary {
                        cpu_percent: c,
                        memory_percent: m,
                        disk_percent: d,
                        load1: l,
                    }),
                }
            },
        )
}

fn assert_heartbeat_round_trips(hb: &Heartbeat) {
    let again = Heartbeat::parse(hb.to_json().as_bytes()).expect("to_json re-parses");
    assert_eq!(&again, hb);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn config_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        if let Ok(c) = ConfigValue::parse(&bytes) {
            assert_config_round_trips(&c);
        }
    }

    #[test]
    fn config_parser_never_panics_on_json(v in any_json()) {
        if let Ok(c) = ConfigValue::parse(v.to_string().as_bytes()) {
            assert_config_round_trips(&c);
        }
    }

    #[test]
    fn config_like_objects_round_trip_when_accepted(v in config_like()) {
        match ConfigValue::parse(v.to_string().as_bytes()) {
            Ok(c) => {
                assert_config_round_trips(&c);
                // What is accepted is within the contract.
                prop_assert!((1..=3600).contains(&c.interval));
                prop_assert!(c.metrics.iter().count() >= 1);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn valid_configs_are_always_accepted(
        (interval, metrics, source) in valid_config(),
        float in any::<bool>(),
        managed in any::<bool>(),
    ) {
        let mut v = json!({"metrics": metrics});
        // A whole number written as 2.0 is accepted too.
        v["interval"] = if float { json!(f64::from(interval)) } else { json!(interval) };
        if managed {
            v["managedBy"] = json!(CONTROLLER_MANAGER);
        }
        if let Some(s) = &source {
            v["source"] = serde_json::to_value(s).expect("source serializes");
        }
        let c = ConfigValue::parse(v.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("{v} rejected: {e}"));
        prop_assert_eq!(c.interval, interval);
        let mut want = metrics.clone();
        want.sort();
        prop_assert_eq!(c.metrics.to_vec(), want);
        prop_assert_eq!(c.is_managed(), managed);
        prop_assert_eq!(&c.source, &source);
        assert_config_round_trips(&c);
    }

    #[test]
    fn heartbeat_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        if let Ok(hb) = Heartbeat::parse(&bytes) {
            assert_heartbeat_round_trips(&hb);
        }
    }

    #[test]
    fn heartbeat_parser_never_panics_on_json(v in any_json()) {
        if let Ok(hb) = Heartbeat::parse(v.to_string().as_bytes()) {
            assert_heartbeat_round_trips(&hb);
        }
    }

    #[test]
    fn heartbeats_with_a_field_mangled_never_panic(hb in valid_heartbeat(), field in "[a-zA-Z]{1,12}", junk in any_json()) {
        // Replace or add one field (often a real one, through the select) with arbitrary JSON.
        let mut v = serde_json::to_value(&hb).expect("heartbeat serializes");
        let names = ["node", "agentVersion", "state", "startedAt", "updatedAt", "ttlSeconds", "config", "usage"];
        let key = names.iter().find(|n| n.len() % 5 == field.len() % 5).map_or(field.clone(), |n| (*n).to_string());
        v[key] = junk;
        if let Ok(parsed) = Heartbeat::parse(v.to_string().as_bytes()) {
            assert_heartbeat_round_trips(&parsed);
        }
    }

    #[test]
    fn valid_heartbeats_round_trip(hb in valid_heartbeat()) {
        assert_heartbeat_round_trips(&hb);
    }
}
