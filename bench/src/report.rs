//! `bench/RESULTS.md`: the machine, the versions and the date, then one table per benchmark
//! with a paragraph on what limits each figure.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::stats::{Latencies, ms};

/// One benchmark's results.
#[derive(Clone, Debug, Default)]
pub struct Section {
    /// Heading, e.g. "1. Agent footprint against node_exporter".
    pub title: String,
    /// What was run, in one or two sentences.
    pub setup: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// Table rows (same width as `columns`).
    pub rows: Vec<Vec<String>>,
    /// What limits the figures and what would move them.
    pub analysis: String,
}

impl Section {
    /// A section with a title and columns, no rows yet.
    pub fn new(title: &str, columns: &[&str]) -> Section {
        Section {
            title: title.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            ..Section::default()
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: &[String]) {
        self.rows.push(cells.to_vec());
    }

    /// A latency table: what was measured, how many of `counted`, p50, p99, max, and the p99
    /// against its target.
    pub fn latencies(title: &str, counted: &str) -> Section {
        let columns = [
            "measured as",
            counted,
            "p50",
            "p99",
            "max",
            "target p99",
            "met",
        ];
        Section::new(title, &columns)
    }

    /// A row of a [`Section::latencies`] table: the percentiles of `samples`, the p99 against
    /// `target` when there is one.
    pub fn latency_row(&mut self, what: &str, samples: &[Duration], target: Option<Duration>) {
        match Latencies::of(samples) {
            Some(l) => self.row(&[
                what.to_string(),
                l.count.to_string(),
                ms(l.p50),
                ms(l.p99),
                ms(l.max),
                target.map_or(String::new(), |t| format!("< {}", ms(t))),
                target.map_or(String::new(), |t| {
                    if l.p99 < t { "yes" } else { "**no**" }.to_string()
                }),
            ]),
            None => self.row(&[what.to_string(), "not measured: no samples".into()]),
        }
    }

    /// A section saying the benchmark could not run, and why.
    pub fn not_measured(title: &str, reason: &str) -> Section {
        Section {
            title: title.to_string(),
            setup: String::new(),
            columns: vec!["figure".into(), "result".into()],
            rows: vec![vec!["all".into(), format!("not measured: {reason}")]],
            analysis: String::new(),
        }
    }

    /// Whether every row carries a figure (the smoke test's check).
    pub fn measured(&self) -> bool {
        !self.rows.is_empty()
            && self
                .rows
                .iter()
                .all(|r| !r.iter().any(|c| c.starts_with("not measured")))
    }

    /// A Markdown table needs no alignment, so no table library: one line per row.
    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "## {}\n", self.title);
        if !self.setup.is_empty() {
            let _ = writeln!(out, "{}\n", self.setup);
        }
        let _ = writeln!(out, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.columns.iter().map(|_| "---|").collect::<String>()
        );
        for row in &self.rows {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", cells.join(" | "));
        }
        if !self.analysis.is_empty() {
            let _ = writeln!(out, "\n{}", self.analysis);
        }
        out.push('\n');
    }
}

/// Where and with what the run happened.
#[derive(Clone, Debug)]
pub struct Environment {
    /// `2 cores, AMD EPYC ..., 23.4 GiB`.
    pub machine: String,
    /// `nodepulse 0.1.0 (abc1234)`, `node_exporter 1.10.1`, ...
    pub versions: Vec<String>,
    /// UTC date and time the run started.
    pub date: String,
    /// The command that produced the file.
    pub command: String,
}

impl Environment {
    /// Describes this machine and the tools the bench runs.
    pub fn detect(command: &str) -> Environment {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        let machine = format!(
            "{cores} cores (nproc), {model}, {:.1} GiB memory, Linux {}",
            mem_kib / 1024.0 / 1024.0,
            first_line(Command::new("uname").arg("-r"))
        );
        let git = first_line(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
        let versions = vec![
            format!("nodepulse {} (git {git})", env!("CARGO_PKG_VERSION")),
            tool_version("node_exporter"),
            // Optional (a long build `make bench` does and `make test` does not): never built here.
            match testkit::built_tool("otelcol") {
                Some(_) => tool_version("otelcol"),
                None => "otelcol not built".to_string(),
            },
            tool_version("etcd"),
            tool_version("kube-apiserver"),
        ];
        Environment {
            machine,
            versions,
            date: k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%d %H:%M UTC")
                .to_string(),
            command: command.to_string(),
        }
    }
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

/// `etcd v3.6.16`: hack/tools.sh names each binary `<tool>-<version>` behind an unversioned
/// symlink (binaries built from the module proxy do not know their own version).
fn tool_version(name: &str) -> String {
    let path = testkit::tool(name);
    let version = std::fs::read_link(&path)
        .ok()
        .and_then(|target| {
            target
                .file_name()?
                .to_str()?
                .strip_prefix(&format!("{name}-"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown version".to_string());
    format!("{name} {version}")
}

/// Renders the whole file.
pub fn render(env: &Environment, intro: &str, sections: &[Section]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# nodepulse benchmark results\n");
    let _ = writeln!(
        out,
        "Generated by `{}` on {}. Do not edit: rerun the command.\n",
        env.command, env.date
    );
    let _ = writeln!(out, "- Machine: {}", env.machine);
    for v in &env.versions {
        let _ = writeln!(out, "- {v}");
    }
    let _ = writeln!(out, "\n{intro}\n");
    for s in sections {
        s.render(&mut out);
    }
    out
}

/// Writes the file, creating its directory.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_tables_and_marks_missing_figures() {
        let mut s = Section::new("1. Thing", &["figure", "value"]);
        s.row(&["a|b".into(), "3".into()]);
        s.analysis = "Limited by etcd.".into();
        assert!(s.measured());
        let missing = Section::not_measured("2. Other", "controller not built");
        assert!(!missing.measured());
        let env = Environment {
            machine: "m".into(),
            versions: vec!["v".into()],
            date: "d".into(),
            command: "make bench".into(),
        };
        let text = render(&env, "intro", &[s, missing]);
        assert!(text.contains("| a\\|b | 3 |"), "{text}");
        assert!(text.contains("|---|---|"), "{text}");
        assert!(
            text.contains("not measured: controller not built"),
            "{text}"
        );
    }
}
