//! `load`: 1/5/15-minute load averages and runnable/total tasks, from `/proc/loadavg`.

use procfs::{FromRead, LoadAverage};
use prometheus_client::encoding::DescriptorEncoder;

use super::{HostPaths, ProcFile, gauge, parsed};
use crate::error::Result;

/// Reads `loadavg`.
#[derive(Debug, Default)]
pub struct LoadCollector {
    file: ProcFile,
}

impl LoadCollector {
    /// The load figures now.
    pub fn read(&mut self, paths: &HostPaths) -> Result<LoadFigures> {
        self.file.read(paths, "loadavg")?;
        parsed(self.file.path(), parse_loadavg(self.file.text()))
    }
}

/// Load figures at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadFigures {
    /// One-minute load average.
    pub one: f64,
    /// Five-minute load average.
    pub five: f64,
    /// Fifteen-minute load average.
    pub fifteen: f64,
    /// Runnable scheduling entities (processes and threads).
    pub runnable: u32,
    /// All scheduling entities.
    pub tasks: u32,
}

impl LoadFigures {
    /// Exports the figures.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        gauge(
            enc,
            "nodepulse_node_load1",
            "One-minute load average",
            self.one,
        )?;
        gauge(
            enc,
            "nodepulse_node_load5",
            "Five-minute load average",
            self.five,
        )?;
        gauge(
            enc,
            "nodepulse_node_load15",
            "Fifteen-minute load average",
            self.fifteen,
        )?;
        gauge(
            enc,
            "nodepulse_node_tasks_runnable",
            "Runnable tasks",
            self.runnable.into(),
        )?;
        gauge(enc, "nodepulse_node_tasks", "All tasks", self.tasks.into())
    }
}

/// Parses the text of `/proc/loadavg`.
pub fn parse_loadavg(text: &str) -> Result<LoadFigures, procfs::ProcError> {
    let l = LoadAverage::from_read(text.as_bytes())?;
    // f32 -> f64 through the decimal text, so 0.42 stays 0.42 rather than 0.41999998.
    let widen = |f: f32| f.to_string().parse::<f64>().unwrap_or(f as f64);
    Ok(LoadFigures {
        one: widen(l.one),
        five: widen(l.five),
        fifteen: widen(l.fifteen),
        runnable: l.cur,
        tasks: l.max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_five_fields() {
        let l = parse_loadavg("0.42 0.35 0.30 3/612 12345\n").unwrap();
        assert_eq!(
            l,
            LoadFigures {
                one: 0.42,
                five: 0.35,
                fifteen: 0.30,
                runnable: 3,
                tasks: 612
            }
        );
    }

    #[test]
    fn truncated_is_an_error() {
        assert!(parse_loadavg("0.42 0.35\n").is_err());
        assert!(parse_loadavg("").is_err());
    }
}
