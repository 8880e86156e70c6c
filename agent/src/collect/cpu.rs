//! `cpu`: busy % in total and per core, from deltas of `/proc/stat`.

use procfs::ProcError;
use prometheus_client::encoding::DescriptorEncoder;

use super::{HostPaths, ProcFile, gauge, gauges, parsed};
use crate::error::Result;

/// Reads `stat`, keeping the previous reading the busy % is computed from.
#[derive(Debug, Default)]
pub struct CpuCollector {
    prev: Option<CpuTimes>,
    file: ProcFile,
}

impl CpuCollector {
    /// The busy % since the previous reading; none on the first.
    pub fn read(&mut self, paths: &HostPaths) -> Result<Option<CpuUsage>> {
        self.file.read(paths, "stat")?;
        let now = parsed(self.file.path(), parse_stat(self.file.text()))?;
        let usage = self.prev.as_ref().map(|p| usage(p, &now));
        self.prev = Some(now);
        Ok(usage)
    }

    /// Forgets the previous reading, so that no rate spans a time the collector was off.
    pub fn forget(&mut self) {
        self.prev = None;
    }
}

/// Cumulative CPU ticks at one moment: the machine's total and each core's.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTimes {
    /// All cores together.
    pub total: Ticks,
    /// Each core, by the number in its `cpuN` line (offline cores are absent, so the position
    /// is not the core number).
    pub cores: Vec<(u32, Ticks)>,
    /// Runnable tasks right now (`procs_running`).
    pub procs_running: Option<u32>,
}

/// Busy and total ticks of one CPU line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticks {
    /// Ticks not idle and not waiting for I/O.
    pub busy: u64,
    /// All ticks.
    pub total: u64,
}

impl Ticks {
    /// The ticks of one `cpu` line's fields: user nice system idle iowait irq softirq steal
    /// (guest and guest_nice, already counted in user and nice, are left out: adding them would
    /// count virtual machines' time twice). Kernels before 2.6 had only the first four.
    fn parse(fields: &str) -> Result<Ticks, ProcError> {
        let mut t = [0u64; 8];
        let mut n = 0;
        for (slot, field) in t.iter_mut().zip(fields.split_ascii_whitespace()) {
            *slot = field
                .parse()
                .map_err(|_| ProcError::Other(format!("stat: {field:?} is not a tick count")))?;
            n += 1;
        }
        if n < 4 {
            return Err(ProcError::Other(format!(
                "stat: a cpu line with {n} fields, not at least 4"
            )));
        }
        let [user, nice, system, idle, iowait, irq, softirq, steal] = t;
        let busy = user + nice + system + irq + softirq + steal;
        Ok(Ticks {
            busy,
            total: busy + idle + iowait,
        })
    }
}

/// Busy CPU over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuUsage {
    /// Busy %, of all cores together.
    pub busy_percent: f64,
    /// Busy % of each core, by core number.
    pub cores: Vec<(u32, f64)>,
}

impl CpuUsage {
    /// Exports the figures.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        gauge(
            enc,
            "nodepulse_node_cpu_busy_percent",
            "Busy CPU, % of all cores",
            self.busy_percent,
        )?;
        gauges(
            enc,
            "nodepulse_node_cpu_core_busy_percent",
            "Busy % of each core",
            "core",
            self.cores.iter().copied(),
        )
    }
}

/// Parses the text of `/proc/stat`.
///
/// Our own parser, not procfs's: that one also parses every number of the `intr` and `softirq`
/// lines (one per interrupt), which the figures do not need; this one reads the `cpu` lines and
/// `procs_running`.
pub fn parse_stat(text: &str) -> Result<CpuTimes, ProcError> {
    let mut total = None;
    let mut cores = Vec::new();
    let mut procs_running = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("cpu") {
            let (id, fields) = rest
                .split_once(' ')
                .ok_or_else(|| ProcError::Other(format!("stat: {line:?} has no fields")))?;
            let ticks = Ticks::parse(fields)?;
            if id.is_empty() {
                total = Some(ticks);
            } else {
                let n = id
                    .parse::<u32>()
                    .map_err(|_| ProcError::Other(format!("stat: no core number in {line:?}")))?;
                cores.push((n, ticks));
            }
        } else if let Some(n) = line.strip_prefix("procs_running ") {
            procs_running = n.trim().parse().ok();
        }
    }
    Ok(CpuTimes {
        total: total.ok_or_else(|| ProcError::Other("stat: no cpu line".into()))?,
        cores,
        procs_running,
    })
}

fn busy_percent(prev: Ticks, now: Ticks) -> f64 {
    let total = now.total.saturating_sub(prev.total);
    if total == 0 {
        return 0.0;
    }
    let busy = now.busy.saturating_sub(prev.busy).min(total);
    100.0 * busy as f64 / total as f64
}

/// Busy % between two readings; cores present in both only.
pub fn usage(prev: &CpuTimes, now: &CpuTimes) -> CpuUsage {
    let cores = now
        .cores
        .iter()
        .filter_map(|(n, t)| {
            let (_, p) = prev.cores.iter().find(|(m, _)| m == n)?;
            Some((*n, busy_percent(*p, *t)))
        })
        .collect();
    CpuUsage {
        busy_percent: busy_percent(prev.total, now.total),
        cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "cpu  100 0 100 800 0 0 0 0 0 0\n\
        cpu0 50 0 50 400 0 0 0 0 0 0\n\
        cpu2 50 0 50 400 0 0 0 0 0 0\n\
        intr 1 2 3\nctxt 10\nbtime 1700000000\nprocesses 5\nprocs_running 3\nprocs_blocked 0\n";
    const AFTER: &str = "cpu  250 0 150 900 100 0 0 0 0 0\n\
        cpu0 150 0 100 400 50 0 0 0 0 0\n\
        cpu2 100 0 50 500 50 0 0 0 0 0\n\
        intr 1 2 3\nctxt 20\nbtime 1700000000\nprocesses 6\nprocs_running 1\nprocs_blocked 0\n";

    #[test]
    fn busy_is_everything_but_idle_and_iowait() {
        let a = parse_stat(BEFORE).unwrap();
        let b = parse_stat(AFTER).unwrap();
        assert_eq!(a.cores.iter().map(|c| c.0).collect::<Vec<_>>(), [0, 2]);
        let u = usage(&a, &b);
        // busy 200 of 400 ticks in total.
        assert!((u.busy_percent - 50.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.cores.len(), 2);
        assert!((u.cores[0].1 - 75.0).abs() < 1e-9, "{u:?}");
        assert!((u.cores[1].1 - 25.0).abs() < 1e-9, "{u:?}");
        assert_eq!(b.procs_running, Some(1));
    }

    #[test]
    fn no_time_passed_or_counters_reset_gives_zero_not_garbage() {
        let a = parse_stat(BEFORE).unwrap();
        assert_eq!(usage(&a, &a).busy_percent, 0.0);
        let b = parse_stat(AFTER).unwrap();
        assert_eq!(usage(&b, &a).busy_percent, 0.0);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_stat("cpu  x y z\n").is_err());
        assert!(parse_stat("cpu  1 2 3\n").is_err());
        assert!(parse_stat("intr 1 2 3\n").is_err());
    }

    #[test]
    fn agrees_with_procfs_on_the_fixture_trees() {
        use procfs::{CpuTime, ExplicitSystemInfo, FromBufReadSI, KernelStats};
        let ticks = |t: &CpuTime| {
            let idle = t.idle + t.iowait.unwrap_or(0);
            let busy = t.user
                + t.nice
                + t.system
                + t.irq.unwrap_or(0)
                + t.softirq.unwrap_or(0)
                + t.steal.unwrap_or(0);
            Ticks {
                busy,
                total: busy + idle,
            }
        };
        let info = ExplicitSystemInfo {
            boot_time_secs: 0,
            ticks_per_second: 100,
            page_size: 4096,
            is_little_endian: cfg!(target_endian = "little"),
        };
        for (tree, text) in crate::collect::reference_texts("stat") {
            let ours = parse_stat(&text).expect("parses");
            let theirs = KernelStats::from_buf_read(text.as_bytes(), &info).expect("procfs parses");
            assert_eq!(ours.total, ticks(&theirs.total), "{tree}");
            let their_cores: Vec<Ticks> = theirs.cpu_time.iter().map(ticks).collect();
            let our_cores: Vec<Ticks> = ours.cores.iter().map(|c| c.1).collect();
            assert_eq!(our_cores, their_cores, "{tree}");
            assert_eq!(ours.procs_running, theirs.procs_running, "{tree}");
        }
    }
}
