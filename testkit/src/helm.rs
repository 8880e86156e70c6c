//! helm for the chart's tests: a private cache, config and data home per run.

use std::path::Path;
use std::process::{Command, Output};

use serde::Deserialize;

use crate::scratch_dir;
use crate::tools::{repo_root, tool};

/// helm keeping its cache, config and data under `home`.
pub fn helm_command(home: &Path) -> Command {
    let mut cmd = Command::new(tool("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

/// Runs helm without a cluster (lint, template), with a home of its own.
pub fn helm(args: &[&str]) -> Output {
    let home = scratch_dir("helm-home");
    helm_command(home.path())
        .args(args)
        .output()
        .expect("run helm")
}

/// `helm template nodepulse charts/nodepulse <extra>`, which must render: its objects, empty
/// documents left out.
pub fn render_chart(extra: &[&str]) -> Vec<serde_yaml::Value> {
    let chart = repo_root().join("charts/nodepulse");
    let mut args = vec!["template", "nodepulse", chart.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let out = helm(&args);
    assert!(
        out.status.success(),
        "helm template {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml::Deserializer::from_str(&String::from_utf8_lossy(&out.stdout))
        .map(|doc| serde_yaml::Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The mount of `container` at `path` and the volume of `pod` it mounts; panics without either.
pub fn mount_and_volume<'a>(
    pod: &'a serde_yaml::Value,
    container: &'a serde_yaml::Value,
    path: &str,
) -> (&'a serde_yaml::Value, &'a serde_yaml::Value) {
    let mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("{path} mounted"));
    let volume = pod["volumes"]
        .as_sequence()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("the volume mounted at {path}"));
    (mount, volume)
}
