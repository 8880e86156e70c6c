//! The benchmarks in miniature, so they do not rot: every phase must still produce figures.
//! Nothing here looks at a timing; `make bench` is where performance is measured.

use std::process::Command;

#[test]
fn every_benchmark_phase_produces_numbers() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("RESULTS.md");
    let status = Command::new(testkit::project_bin("bench"))
        .arg("--smoke")
        .arg("--out")
        .arg(&out)
        .current_dir(testkit::repo_root())
        .status()
        .expect("run the bench binary");
    assert!(status.success(), "bench --smoke failed: {status}");
    let report = std::fs::read_to_string(&out).expect("bench wrote its results");
    for heading in [
        "## 1. ", "## 1b. ", "## 2a. ", "## 2b. ", "## 3. ", "## 4. ", "## 5. ",
    ] {
        assert!(
            report.contains(heading),
            "no section {heading:?} in:\n{report}"
        );
    }
    // A phase that could not run says so at the start of a cell; reference rows (Kubernetes'
    // own figures) say "not measured" inside theirs, and are fine. So is the OpenTelemetry
    // Collector's column when it is not built: `make bench` builds it, `make test` does not.
    let missing: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("| not measured:") && !l.contains("otelcol is not built"))
        .collect();
    assert!(
        missing.is_empty(),
        "a phase produced no figures: {missing:?} in:\n{report}"
    );
    assert!(
        report.contains("Machine:") && report.contains("node_exporter"),
        "{report}"
    );
}
