//! `disk`: per-device throughput and IOPS from `/proc/diskstats`, and the host root
//! filesystem's usage from statvfs.

use std::path::Path;
use std::time::Instant;

use prometheus_client::encoding::DescriptorEncoder;

use super::{HostPaths, ProcFile, gauge, gauges};
use crate::error::{Error, Result};

/// Reads `diskstats` and the host root's statvfs, keeping the previous counters the rates are
/// computed from.
#[derive(Debug, Default)]
pub struct DiskCollector {
    prev: Option<(Instant, Vec<DiskCounters>)>,
    file: ProcFile,
}

impl DiskCollector {
    /// The device rates and root filesystem usage, and why the latter is missing if it is.
    pub fn read(&mut self, paths: &HostPaths) -> Result<(DiskUsage, Option<Error>)> {
        self.file.read(paths, "diskstats")?;
        let at = Instant::now();
        let now = parse_diskstats(self.file.text());
        let (devices, had_previous) = match &self.prev {
            Some((t, prev)) => (rates(prev, &now, (at - *t).as_secs_f64()), true),
            None => (Vec::new(), false),
        };
        self.prev = Some((at, now));
        let root = filesystem_usage(&paths.host_root);
        // A missing host root (a pod without the hostPath mount) must not hide the device
        // figures: report the rest and the error separately.
        let usage = usage(devices, had_previous, root.as_ref().ok().cloned());
        let root_err = root.err().map(|source| Error::Statvfs {
            path: paths.host_root.clone(),
            source,
        });
        Ok((usage, root_err))
    }

    /// Forgets the previous counters, so that no rate spans a time the collector was off.
    pub fn forget(&mut self) {
        self.prev = None;
    }
}

/// /proc/diskstats counts in 512-byte sectors whatever the device's real sector size.
const SECTOR_BYTES: u64 = 512;

/// One device's cumulative counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskCounters {
    /// Device name (`sda`, `nvme0n1p1`, `dm-0`).
    pub name: String,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
}

/// One device's rates over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskRates {
    /// Device name.
    pub name: String,
    /// Bytes read per second.
    pub read_bytes_per_sec: f64,
    /// Bytes written per second.
    pub write_bytes_per_sec: f64,
    /// Reads completed per second.
    pub reads_per_sec: f64,
    /// Writes completed per second.
    pub writes_per_sec: f64,
}

/// Usage of one filesystem, as `df` shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct FilesystemUsage {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Bytes an unprivileged user can still write.
    pub available_bytes: u64,
    /// Used %, of what users can use (reserved blocks excluded, as `df` does).
    pub used_percent: f64,
}

/// Disk figures over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct DiskUsage {
    /// Per device (loop, ram and zram devices left out), rates absent on the first reading.
    pub devices: Vec<DiskRates>,
    /// Bytes read per second over whole physical disks (partitions and stacked devices left
    /// out, so nothing is counted twice).
    pub read_bytes_per_sec: Option<f64>,
    /// Bytes written per second, counted the same way.
    pub write_bytes_per_sec: Option<f64>,
    /// The host root filesystem, when statvfs worked.
    pub root: Option<FilesystemUsage>,
}

impl DiskUsage {
    /// Exports the figures: the root filesystem's when it was measured, and each device's.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(r) = &self.root {
            gauge(
                enc,
                "nodepulse_node_filesystem_used_percent",
                "Host root filesystem used, %",
                r.used_percent,
            )?;
            gauge(
                enc,
                "nodepulse_node_filesystem_size_bytes",
                "Host root filesystem size",
                r.size_bytes as f64,
            )?;
            gauge(
                enc,
                "nodepulse_node_filesystem_available_bytes",
                "Host root filesystem space available to users",
                r.available_bytes as f64,
            )?;
        }
        let per_device = |figure: fn(&DiskRates) -> f64| {
            self.devices
                .iter()
                .map(move |d| (d.name.as_str(), figure(d)))
        };
        gauges(
            enc,
            "nodepulse_node_disk_read_bytes_per_second",
            "Bytes read per second",
            "device",
            per_device(|d| d.read_bytes_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_disk_written_bytes_per_second",
            "Bytes written per second",
            "device",
            per_device(|d| d.write_bytes_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_disk_reads_per_second",
            "Reads completed per second (IOPS)",
            "device",
            per_device(|d| d.reads_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_disk_writes_per_second",
            "Writes completed per second (IOPS)",
            "device",
            per_device(|d| d.writes_per_sec),
        )
    }
}

/// Devices that are not storage a node operator cares about (node_exporter ignores the same).
pub fn is_ignored(name: &str) -> bool {
    ["loop", "ram", "zram", "fd"]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(all_digits))
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a device is a whole physical disk, so that totals do not count a partition, an LVM
/// volume or a RAID array on top of the disk that carries it.
pub fn is_whole_disk(name: &str) -> bool {
    if is_ignored(name) || name.starts_with("dm-") || name.starts_with("md") {
        return false;
    }
    // nvme0n1p1, mmcblk0p1: a 'p' followed by digits after a digit ends a partition name.
    if let Some(i) = name.rfind('p') {
        let (head, tail) = (&name[..i], &name[i + 1..]);
        if all_digits(tail)
            && head.ends_with(|c: char| c.is_ascii_digit())
            && (head.starts_with("nvme") || head.starts_with("mmcblk"))
        {
            return false;
        }
    }
    // sda1, vdb2, xvda1, hda3: letters then digits.
    for prefix in ["sd", "vd", "hd", "xvd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let letters = rest.trim_end_matches(|c: char| c.is_ascii_digit());
            return letters.len() == rest.len();
        }
    }
    true
}

/// Parses the text of `/proc/diskstats`. A line that does not parse (an old kernel's short
/// partition line, a future field layout) is skipped rather than losing every device.
///
/// Our own parser, not procfs's: that one reads all twenty fields of every line into a struct
/// with the name copied out, loop devices included, for the four figures kept here.
pub fn parse_diskstats(text: &str) -> Vec<DiskCounters> {
    text.lines().filter_map(parse_diskstats_line).collect()
}

/// One line: major minor name, then at least eleven counters (reads, reads merged, sectors
/// read, ms reading, writes, writes merged, sectors written, ...); `None` for a device left out
/// or a line that does not parse.
fn parse_diskstats_line(line: &str) -> Option<DiskCounters> {
    let mut fields = line.split_ascii_whitespace();
    fields.next()?.parse::<i32>().ok()?;
    fields.next()?.parse::<i32>().ok()?;
    let name = fields.next()?;
    if is_ignored(name) {
        return None;
    }
    let mut c = [0u64; 11];
    for slot in c.iter_mut() {
        *slot = fields.next()?.parse().ok()?;
    }
    Some(DiskCounters {
        read_bytes: c[2].saturating_mul(SECTOR_BYTES),
        written_bytes: c[6].saturating_mul(SECTOR_BYTES),
        reads: c[0],
        writes: c[4],
        name: name.to_string(),
    })
}

/// Rates between two readings `seconds` apart; devices present in both only.
pub fn rates(prev: &[DiskCounters], now: &[DiskCounters], seconds: f64) -> Vec<DiskRates> {
    if seconds <= 0.0 {
        return Vec::new();
    }
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    now.iter()
        .filter_map(|n| {
            let p = prev.iter().find(|p| p.name == n.name)?;
            Some(DiskRates {
                name: n.name.clone(),
                read_bytes_per_sec: per_sec(p.read_bytes, n.read_bytes),
                write_bytes_per_sec: per_sec(p.written_bytes, n.written_bytes),
                reads_per_sec: per_sec(p.reads, n.reads),
                writes_per_sec: per_sec(p.writes, n.writes),
            })
        })
        .collect()
}

/// Builds the disk figures from the per-device rates and the root filesystem's usage.
pub fn usage(
    devices: Vec<DiskRates>,
    had_previous: bool,
    root: Option<FilesystemUsage>,
) -> DiskUsage {
    let whole = || devices.iter().filter(|d| is_whole_disk(&d.name));
    let (read, write) = if had_previous {
        (
            Some(whole().map(|d| d.read_bytes_per_sec).sum()),
            Some(whole().map(|d| d.write_bytes_per_sec).sum()),
        )
    } else {
        (None, None)
    };
    DiskUsage {
        devices,
        read_bytes_per_sec: read,
        write_bytes_per_sec: write,
        root,
    }
}

/// Usage of the filesystem mounted at `path`, as `df` computes it.
pub fn filesystem_usage(path: &Path) -> Result<FilesystemUsage, nix::errno::Errno> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let free = st.blocks_free() as u64;
    let avail = st.blocks_available() as u64;
    Ok(filesystem_from_blocks(frsize, blocks, free, avail))
}

/// `df`'s arithmetic: used / (used + available to users).
pub fn filesystem_from_blocks(frsize: u64, blocks: u64, free: u64, avail: u64) -> FilesystemUsage {
    let used = blocks.saturating_sub(free);
    let usable = used + avail;
    FilesystemUsage {
        size_bytes: blocks.saturating_mul(frsize),
        available_bytes: avail.saturating_mul(frsize),
        used_percent: if usable == 0 {
            0.0
        } else {
            100.0 * used as f64 / usable as f64
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modern_and_old_layouts_and_skips_what_does_not_parse() {
        let text = "   8       0 sda 100 0 2048 10 50 0 4096 20 0 30 30 0 0 0 0 0 0\n\
                    8       1 sda1 90 0 1024 10 40 0 2048 20 0 30 30\n\
                    7       0 loop0 1 0 8 0 0 0 0 0 0 0 0\n\
                    8       2 sda2 5 10 6 20\n\
                  259       0 nvme0n1 10 0 16 1 20 0 32 2 0 3 3 0 0 0 0\n";
        let d = parse_diskstats(text);
        let names: Vec<_> = d.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "sda1", "nvme0n1"]);
        assert_eq!(d[0].read_bytes, 2048 * 512);
        assert_eq!(d[0].written_bytes, 4096 * 512);
        assert_eq!(d[0].reads, 100);
        assert_eq!(d[0].writes, 50);
    }

    #[test]
    fn agrees_with_procfs_on_the_fixture_trees() {
        for (tree, text) in crate::collect::reference_texts("diskstats") {
            let theirs: Vec<DiskCounters> = text
                .lines()
                .filter_map(|l| procfs::DiskStat::from_line(l).ok())
                .filter(|d| !is_ignored(&d.name))
                .map(|d| DiskCounters {
                    read_bytes: d.sectors_read.saturating_mul(SECTOR_BYTES),
                    written_bytes: d.sectors_written.saturating_mul(SECTOR_BYTES),
                    reads: d.reads,
                    writes: d.writes,
                    name: d.name,
                })
                .collect();
            assert_eq!(parse_diskstats(&text), theirs, "{tree}");
        }
    }

    #[test]
    fn whole_disks_and_the_rest() {
        for whole in ["sda", "vdb", "xvda", "nvme0n1", "mmcblk0", "sr0", "hdc"] {
            assert!(is_whole_disk(whole), "{whole}");
        }
        for part in [
            "sda1",
            "vdb12",
            "xvda1",
            "nvme0n1p1",
            "mmcblk0p2",
            "dm-0",
            "md127",
            "loop3",
            "zram0",
        ] {
            assert!(!is_whole_disk(part), "{part}");
        }
        assert!(is_ignored("loop12") && is_ignored("ram0") && !is_ignored("looper"));
    }

    #[test]
    fn rates_sum_whole_disks_only() {
        let c = |name: &str, n: u64| DiskCounters {
            name: name.into(),
            reads: n,
            writes: n,
            read_bytes: n * 1000,
            written_bytes: n * 2000,
        };
        let prev = [c("sda", 0), c("sda1", 0)];
        let now = [c("sda", 10), c("sda1", 10), c("sdb", 5)];
        let r = rates(&prev, &now, 2.0);
        assert_eq!(r.len(), 2, "sdb has no previous reading");
        assert_eq!(r[0].reads_per_sec, 5.0);
        let u = usage(r, true, None);
        assert_eq!(u.read_bytes_per_sec, Some(5000.0));
        assert_eq!(u.write_bytes_per_sec, Some(10000.0));
    }

    #[test]
    fn df_arithmetic() {
        // 100 blocks, 30 free of which 25 available to users: 70 used of 95 usable.
        let f = filesystem_from_blocks(4096, 100, 30, 25);
        assert!((f.used_percent - 100.0 * 70.0 / 95.0).abs() < 1e-9);
        assert_eq!(f.size_bytes, 409_600);
        assert_eq!(filesystem_from_blocks(4096, 0, 0, 0).used_percent, 0.0);
    }

    #[test]
    fn statvfs_of_root_works() {
        let f = filesystem_usage(Path::new("/")).unwrap();
        assert!(f.size_bytes > 0);
        assert!((0.0..=100.0).contains(&f.used_percent));
    }
}
