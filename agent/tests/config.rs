//! The config watch end to end: a config put with a plain etcd client changes the agent's pace at once;
//! malformed values are rejected whole and reported.

use std::time::{Duration, Instant};

use nodepulse_crd::wire::{Metric, config_key};
use testkit::{Etcd, eventually, heartbeat, http_get, put_config};

#[tokio::test]
async fn a_new_interval_is_logged_within_1s_and_sets_the_pace() {
    let etcd = Etcd::start();
    let mut client = etcd.client().await;
    let agent = etcd.agent("worker-1").start();
    let p = &agent.process;
    p.wait_for_line(Duration::from_secs(5), "a first sample", |l| {
        l.contains(" sample cpu=") && l.contains(" load=")
    });

    // The env's scenario: 10 s -> 2 s.
    let put_at = Instant::now();
    let revision = put_config(
        &client,
        "worker-1",
        r#"{"interval": 2, "metrics": ["cpu", "memory"]}"#,
    )
    .await;
    let want =
        format!("config updated: interval 10s -> 2s, metrics [cpu, memory] (revision {revision})");
    let (idx, line) = p.wait_for_line_from(0, Duration::from_secs(1), "config updated", |l| {
        l.contains(&want)
    });
    assert!(line.at - put_at <= Duration::from_secs(1));

    // The next samples come at the new interval, with the new metrics only.
    let mut samples = Vec::new();
    let mut stamps = Vec::new();
    let mut from = idx + 1;
    while samples.len() < 4 {
        let (i, l) = p.wait_for_line_from(from, Duration::from_secs(4), "a sample at 2 s", |l| {
            l.contains(" sample ")
        });
        assert!(
            l.text.contains("cpu=") && l.text.contains("mem=") && !l.text.contains("load="),
            "{}",
            l.text
        );
        samples.push(l.at);
        stamps.push(logged_at(&l.text));
        from = i + 1;
    }
    assert!(
        samples[0] - line.at <= Duration::from_millis(2500),
        "first sample {:?} after the change",
        samples[0] - line.at
    );
    // The spacing of the lines' own timestamps (when the agent logged them; arrival times add
    // the pipe's jitter on a busy machine). Each gap near 2 s, and 2 s on average.
    let gaps: Vec<f64> = stamps
        .windows(2)
        .map(|p| p[1].duration_since(p[0]).as_secs_f64())
        .collect();
    for gap in &gaps {
        assert!(
            (1.5..=2.5).contains(gap),
            "samples {gaps:?} s apart, want 2 s"
        );
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!(
        (1.9..=2.1).contains(&mean),
        "samples {gaps:?} s apart, want 2 s"
    );

    // The heartbeat value reports the applied config.
    let hb = eventually(
        "heartbeat shows the new config",
        Duration::from_secs(7),
        || {
            let c = client.clone();
            async move {
                heartbeat(&c, "worker-1")
                    .await
                    .filter(|(h, _)| h.config.revision == revision)
            }
        },
    )
    .await
    .0;
    assert_eq!(hb.config.interval, 2);
    assert_eq!(hb.config.metrics.to_vec(), [Metric::Cpu, Metric::Memory]);
    let (_, body) = http_get(&agent.http, "/metrics").expect("/metrics");
    assert!(
        body.contains(&format!("nodepulse_agent_config_revision {revision}")),
        "{body}"
    );

    // Deleting the key goes back to the defaults.
    let del = client
        .delete(config_key("worker-1"), None)
        .await
        .expect("delete config")
        .header()
        .unwrap()
        .revision();
    p.wait_for_line(Duration::from_secs(1), "config removed", |l| {
        l.contains(&format!(
            "config removed (revision {del}): back to defaults, interval 10s, metrics [cpu, memory, disk, network, load]"
        ))
    });
}

/// The timestamp tracing puts at the start of a text line.
fn logged_at(line: &str) -> jiff::Timestamp {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    stamp
        .parse()
        .unwrap_or_else(|e| panic!("no timestamp ({e}) in {line}"))
}

/// Each value, and a fragment of the reason the agent must give.
const MALFORMED: &[(&[u8], &str)] = &[
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"interval=2", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (br#"{"metrics": ["cpu"]}"#, "missing field \"interval\""),
    (br#"{"interval": 2}"#, "missing field \"metrics\""),
    (
        br#"{"interval": "2", "metrics": ["cpu"]}"#,
        "field \"interval\" must be",
    ),
    (
        br#"{"interval": 2.5, "metrics": ["cpu"]}"#,
        "field \"interval\" must be",
    ),
    (
        br#"{"interval": 0, "metrics": ["cpu"]}"#,
        "interval 0 is out of range",
    ),
    (
        br#"{"interval": -3, "metrics": ["cpu"]}"#,
        "interval -3 is out of range",
    ),
    (
        br#"{"interval": 3601, "metrics": ["cpu"]}"#,
        "interval 3601 is out of range",
    ),
    (
        br#"{"interval": 2, "metrics": "cpu"}"#,
        "field \"metrics\" must be",
    ),
    (
        br#"{"interval": 2, "metrics": []}"#,
        "metrics must name at least one",
    ),
    (
        br#"{"interval": 2, "metrics": ["cpu", "gpu"]}"#,
        "unknown metric \"gpu\"",
    ),
    (
        br#"{"interval": 2, "metrics": [1]}"#,
        "field \"metrics\" must be",
    ),
    (
        br#"{"interval": 2, "metrics": ["cpu"], "intervall": 3}"#,
        "unknown field \"intervall\"",
    ),
    (
        br#"{"interval": 2, "metrics": ["cpu"], "source": "x"}"#,
        "field \"source\" is malformed",
    ),
];

#[tokio::test]
async fn malformed_values_are_rejected_whole_and_reported() {
    let etcd = Etcd::start();
    let client = etcd.client().await;
    let mut agent = etcd
        .agent("worker-2")
        .args(["--heartbeat-min-interval", "100ms"])
        .start();
    let good = put_config(
        &client,
        "worker-2",
        r#"{"interval": 3, "metrics": ["cpu", "load"]}"#,
    )
    .await;
    agent
        .process
        .wait_for_line(Duration::from_secs(5), "good config", |l| {
            l.contains(&format!(
                "config updated: interval 10s -> 3s, metrics [cpu, load] (revision {good})"
            ))
        });

    let oversized = format!(
        r#"{{"interval": 2, "metrics": ["cpu"], "managedBy": "{}"}}"#,
        "x".repeat(5000)
    );
    let mut cases: Vec<(Vec<u8>, &str)> = MALFORMED
        .iter()
        .map(|(v, why)| (v.to_vec(), *why))
        .collect();
    cases.push((oversized.into_bytes(), "the limit is 4096"));
    assert!(cases.len() >= 12);

    for (value, why) in &cases {
        let shown = String::from_utf8_lossy(value)
            .chars()
            .take(60)
            .collect::<String>();
        let rev = put_config(&client, "worker-2", value.clone()).await;
        let line = agent
            .process
            .wait_for_line(Duration::from_secs(2), "rejection", |l| {
                l.contains(&format!("config rejected (revision {rev}): "))
            });
        assert!(line.text.contains(why), "{shown}: {}", line.text);
        assert!(
            line.text
                .contains("keeping interval 3s, metrics [cpu, load]"),
            "{shown}: {}",
            line.text
        );
        let (hb, _) = eventually(
            &format!("heartbeat reporting the rejection of {shown}"),
            Duration::from_secs(3),
            || {
                let c = client.clone();
                async move {
                    heartbeat(&c, "worker-2").await.filter(|(h, _)| {
                        h.config
                            .error
                            .as_deref()
                            .is_some_and(|e| e.starts_with(&format!("revision {rev}: ")))
                    })
                }
            },
        )
        .await;
        assert!(
            hb.config.error.as_deref().unwrap().contains(why),
            "{shown}: {hb:?}"
        );
        assert_eq!(
            hb.config.revision, good,
            "the last good config stays applied"
        );
        assert_eq!(hb.config.interval, 3);
        assert_eq!(hb.config.metrics.to_vec(), [Metric::Cpu, Metric::Load]);
        assert!(agent.process.is_running(), "{shown} stopped the agent");
    }

    // Still sampling at the last good pace and with its metrics.
    let from = agent.process.line_count();
    let (_, l) = agent
        .process
        .wait_for_line_from(from, Duration::from_secs(4), "a sample", |l| {
            l.contains(" sample ")
        });
    assert!(l.text.contains("cpu=") && l.text.contains("load=") && !l.text.contains("mem="));
    let (_, body) = http_get(&agent.http, "/metrics").expect("/metrics");
    assert!(
        body.contains(&format!(
            "nodepulse_agent_config_rejected_total {}",
            cases.len()
        )),
        "{body}"
    );

    // A good value clears the error.
    let fixed = put_config(
        &client,
        "worker-2",
        r#"{"interval": 4, "metrics": ["memory"]}"#,
    )
    .await;
    eventually("error cleared", Duration::from_secs(3), || {
        let c = client.clone();
        async move {
            heartbeat(&c, "worker-2")
                .await
                .filter(|(h, _)| h.config.revision == fixed && h.config.error.is_none())
        }
    })
    .await;
}
