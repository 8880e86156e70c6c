//! CPU time and memory of a process, read from /proc the way `top` does.

use std::path::Path;
use std::time::Duration;

use crate::{Error, Result};

/// One reading of a process's resource use.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// utime + stime from `/proc/<pid>/stat`, in clock ticks.
    pub cpu_ticks: u64,
    /// On-CPU time summed over `/proc/<pid>/task/*/schedstat` (nanosecond precision, but threads
    /// that already exited are not counted).
    pub cpu_sched: Duration,
    /// Resident set size (`VmRSS`), in KiB.
    pub rss_kib: u64,
}

/// Reads `pid`'s usage now.
pub fn read(pid: u32) -> Result<Usage> {
    let dir = format!("/proc/{pid}");
    let stat = read_file(&format!("{dir}/stat"))?;
    let cpu_ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| Error::Proc(format!("{dir}/stat: unexpected format")))?;
    let status = read_file(&format!("{dir}/status"))?;
    let rss_kib = parse_status_rss_kib(&status).unwrap_or(0);
    let mut sched_ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("{dir}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) {
                sched_ns += text
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    Ok(Usage {
        cpu_ticks,
        cpu_sched: Duration::from_nanos(sched_ns),
        rss_kib,
    })
}

fn read_file(path: &str) -> Result<String> {
    std::fs::read_to_string(Path::new(path)).map_err(|e| Error::Proc(format!("read {path}: {e}")))
}

/// utime + stime: fields 14 and 15 of `/proc/<pid>/stat`, counted after the `)` that ends the
/// command name (which may itself hold spaces).
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is field 3 (state), so field 14 is fields[11].
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` in KiB from `/proc/<pid>/status`.
pub fn parse_status_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux we run on).
pub fn ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

/// Readings of one process taken at a fixed period, summarised.
#[derive(Clone, Debug, Default)]
pub struct UsageSeries {
    readings: Vec<Usage>,
}

impl UsageSeries {
    /// Adds a reading.
    pub fn push(&mut self, u: Usage) {
        self.readings.push(u);
    }

    /// CPU seconds (utime + stime) between the first and the last reading.
    pub fn cpu_seconds(&self) -> f64 {
        match (self.readings.first(), self.readings.last()) {
            (Some(a), Some(b)) => {
                b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_second() as f64
            }
            _ => 0.0,
        }
    }

    /// Scheduler on-CPU time between the first and the last reading.
    pub fn cpu_sched(&self) -> Duration {
        match (self.readings.first(), self.readings.last()) {
            (Some(a), Some(b)) => b.cpu_sched.saturating_sub(a.cpu_sched),
            _ => Duration::ZERO,
        }
    }

    /// Mean RSS in MiB.
    pub fn rss_mean_mib(&self) -> f64 {
        if self.readings.is_empty() {
            return 0.0;
        }
        let sum: u64 = self.readings.iter().map(|u| u.rss_kib).sum();
        sum as f64 / self.readings.len() as f64 / 1024.0
    }

    /// Largest RSS in MiB.
    pub fn rss_max_mib(&self) -> f64 {
        self.readings.iter().map(|u| u.rss_kib).max().unwrap_or(0) as f64 / 1024.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_command_name_with_spaces() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 1000 200";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn rss_from_status() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\nThreads: 2\n";
        assert_eq!(parse_status_rss_kib(status), Some(4321));
    }

    #[test]
    fn own_process_is_readable() {
        let u = read(std::process::id()).unwrap();
        assert!(u.rss_kib > 0);
    }
}
