//! CPU time and memory of a process, read from /proc the way `top` does.

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
    /// Times a thread was put on a CPU, summed over `/proc/<pid>/task/*/schedstat`: for a daemon
    /// that sleeps between jobs, its wake-ups.
    pub wakeups: u64,
}

/// Reads `pid`'s usage now.
pub fn read(pid: u32) -> Result<Usage> {
    let failed = |what: &str, e: procfs::ProcError| Error::Proc(format!("/proc/{pid}/{what}: {e}"));
    let id = i32::try_from(pid).map_err(|_| Error::Proc(format!("pid {pid} out of range")))?;
    let process = procfs::process::Process::new(id).map_err(|e| failed("", e))?;
    let stat = process.stat().map_err(|e| failed("stat", e))?;
    let status = process.status().map_err(|e| failed("status", e))?;
    // Threads that exit between the listing and the read are skipped.
    let (sched_ns, wakeups) = process
        .tasks()
        .map_err(|e| failed("task", e))?
        .flatten()
        .filter_map(|task| task.schedstat().ok())
        .fold((0, 0), |(ns, n), s| (ns + s.sum_exec_runtime, n + s.pcount));
    Ok(Usage {
        cpu_ticks: stat.utime + stat.stime,
        cpu_sched: Duration::from_nanos(sched_ns),
        rss_kib: status.vmrss.unwrap_or(0),
        wakeups,
    })
}

/// What a process's resident memory is made of, from `/proc/<pid>/smaps_rollup`, in MiB.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Resident {
    /// All resident pages (`Rss`).
    pub total_mib: f64,
    /// Anonymous memory: heap and stacks (`Anonymous`).
    pub anonymous_mib: f64,
}

impl Resident {
    /// Pages of mapped files: the executable and the shared libraries.
    pub fn files_mib(&self) -> f64 {
        self.total_mib - self.anonymous_mib
    }
}

/// Reads what `pid`'s resident memory is made of now.
pub fn resident(pid: u32) -> Result<Resident> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Proc(format!("{path}: {e}")))?;
    Ok(parse_smaps_rollup(&text))
}

fn parse_smaps_rollup(text: &str) -> Resident {
    let mib = |field: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    Resident {
        total_mib: mib("Rss"),
        anonymous_mib: mib("Anonymous"),
    }
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
                b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / procfs::ticks_per_second() as f64
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

    /// Wake-ups between the first and the last reading.
    pub fn wakeups(&self) -> u64 {
        match (self.readings.first(), self.readings.last()) {
            (Some(a), Some(b)) => b.wakeups.saturating_sub(a.wakeups),
            _ => 0,
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
    fn own_process_is_readable() {
        let u = read(std::process::id()).unwrap();
        assert!(u.rss_kib > 0);
        assert!(u.cpu_sched > Duration::ZERO);
        let r = resident(std::process::id()).unwrap();
        assert!(
            r.total_mib > r.anonymous_mib && r.anonymous_mib > 0.0,
            "{r:?}"
        );
    }

    #[test]
    fn smaps_rollup_splits_files_from_anonymous_memory() {
        let r = parse_smaps_rollup(
            "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:                5568 kB\n\
             Pss:                2390 kB\nAnonymous:           628 kB\n",
        );
        assert_eq!(r.total_mib, 5568.0 / 1024.0);
        assert_eq!(r.anonymous_mib, 628.0 / 1024.0);
        assert_eq!(r.files_mib(), 4940.0 / 1024.0);
    }
}
