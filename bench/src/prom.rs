//! Just enough of the Prometheus text format to read counters and histograms off `/metrics`.
//!
//! Kept rather than `prometheus-parse`, which would bring chrono, regex and a second itertools
//! into the bench for what these lines (tested below) do.

/// One sample line: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`/`_sum`/`_count` suffixes kept).
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `key`, if present.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses every sample line of an exposition; comments and malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key, value));
        rest = &after[end..];
    }
    labels
}

/// Sum of the samples named `name` whose labels satisfy `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && filter(s))
        .map(|s| s.value)
        .sum()
}

/// A histogram's cumulative buckets (upper bound, count), summed over series matching `filter`.
pub fn histogram(
    samples: &[Sample],
    name: &str,
    filter: impl Fn(&Sample) -> bool,
) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for s in samples.iter().filter(|s| s.name == bucket && filter(s)) {
        let Some(le) = s.label("le").and_then(|le| match le {
            "+Inf" => Some(f64::INFINITY),
            v => v.parse().ok(),
        }) else {
            continue;
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(entry) => entry.1 += s.value,
            None => buckets.push((le, s.value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The quantile `q` of a cumulative histogram, interpolated linearly inside the bucket the way
/// PromQL's `histogram_quantile` does. `None` for an empty histogram.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Above the largest finite bound: all we can say is "more than" that bound.
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    None
}

/// Subtracts `before` from `after` bucket by bucket (a histogram over a time window).
pub fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, n - old)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apiserver_request_total Counter
# TYPE apiserver_request_total counter
apiserver_request_total{code="200",resource="monitornodes",verb="APPLY",subresource="status"} 7
apiserver_request_total{code="201",resource="monitornodes",verb="CREATE"} 3
apiserver_request_total{code="200",resource="pods",verb="LIST"} 9
lat_bucket{le="0.01"} 2
lat_bucket{le="0.1"} 8
lat_bucket{le="+Inf"} 10
lat_sum 0.9
lat_count 10
plain 4.5e1
"#;

    #[test]
    fn counters_filtered_by_labels() {
        let s = parse(TEXT);
        let writes = sum(&s, "apiserver_request_total", |s| {
            s.label("resource") == Some("monitornodes")
        });
        assert_eq!(writes, 10.0);
        assert_eq!(sum(&s, "plain", |_| true), 45.0);
    }

    #[test]
    fn histogram_quantiles_interpolate() {
        let s = parse(TEXT);
        let h = histogram(&s, "lat", |_| true);
        assert_eq!(h, vec![(0.01, 2.0), (0.1, 8.0), (f64::INFINITY, 10.0)]);
        let p50 = quantile(&h, 0.5).unwrap();
        assert!((p50 - 0.055).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(&h, 0.99), Some(0.1));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn labels_with_escapes_and_commas() {
        let s = parse(r#"m{a="x,y",b="q\"z"} 1"#);
        assert_eq!(s[0].label("a"), Some("x,y"));
        assert_eq!(s[0].label("b"), Some("q\"z"));
    }
}
