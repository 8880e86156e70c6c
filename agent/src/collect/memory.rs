//! `memory`: total, available, used % and swap, from `/proc/meminfo`.

use procfs::ProcError;
use prometheus_client::encoding::DescriptorEncoder;

use super::{HostPaths, ProcFile, gauge, parsed};
use crate::error::Result;

/// Reads `meminfo`.
#[derive(Debug, Default)]
pub struct MemoryCollector {
    file: ProcFile,
}

impl MemoryCollector {
    /// The memory figures now.
    pub fn read(&mut self, paths: &HostPaths) -> Result<MemoryUsage> {
        self.file.read(paths, "meminfo")?;
        parsed(self.file.path(), parse_meminfo(self.file.text()))
    }
}

/// Memory figures at one moment, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryUsage {
    /// Physical memory.
    pub total_bytes: u64,
    /// Memory available to new work without swapping (`MemAvailable`).
    pub available_bytes: u64,
    /// `total - available`, in % of total.
    pub used_percent: f64,
    /// Swap space.
    pub swap_total_bytes: u64,
    /// Swap in use.
    pub swap_used_bytes: u64,
}

impl MemoryUsage {
    /// Bytes in use (`total - available`).
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }
}

impl MemoryUsage {
    /// Exports the figures.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let bytes = |b: u64| b as f64;
        gauge(
            enc,
            "nodepulse_node_memory_total_bytes",
            "Physical memory",
            bytes(self.total_bytes),
        )?;
        gauge(
            enc,
            "nodepulse_node_memory_available_bytes",
            "Memory available without swapping",
            bytes(self.available_bytes),
        )?;
        gauge(
            enc,
            "nodepulse_node_memory_used_percent",
            "Memory in use, %",
            self.used_percent,
        )?;
        gauge(
            enc,
            "nodepulse_node_swap_total_bytes",
            "Swap space",
            bytes(self.swap_total_bytes),
        )?;
        gauge(
            enc,
            "nodepulse_node_swap_used_bytes",
            "Swap in use",
            bytes(self.swap_used_bytes),
        )
    }
}

/// Parses the text of `/proc/meminfo`.
///
/// Our own parser, not procfs's: that one builds a map of all sixty fields, which took a quarter
/// of the agent's user-space instructions; this one reads the six lines the figures need, in one
/// pass and without allocating.
pub fn parse_meminfo(text: &str) -> Result<MemoryUsage, ProcError> {
    let mut fields = MeminfoFields::default();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match name {
            "MemTotal" => &mut fields.total,
            "MemFree" => &mut fields.free,
            "MemAvailable" => &mut fields.available,
            "Buffers" => &mut fields.buffers,
            "Cached" => &mut fields.cached,
            "SwapTotal" => &mut fields.swap_total,
            "SwapFree" => &mut fields.swap_free,
            _ => continue,
        };
        *slot = Some(bytes(name, value)?);
        if fields.all_read() {
            // The rest (fifty lines) holds none of them.
            break;
        }
    }
    let need = |v: Option<u64>, name: &str| {
        v.ok_or_else(|| ProcError::Other(format!("meminfo: no {name} line")))
    };
    let total = need(fields.total, "MemTotal")?;
    // Kernels before 3.14 have no MemAvailable: free + buffers + page cache is what `free`
    // showed then.
    let available = match fields.available {
        Some(a) => a,
        None => {
            need(fields.free, "MemFree")?
                + need(fields.buffers, "Buffers")?
                + need(fields.cached, "Cached")?
        }
    }
    .min(total);
    let used_percent = if total == 0 {
        0.0
    } else {
        100.0 * (total - available) as f64 / total as f64
    };
    let swap_total = need(fields.swap_total, "SwapTotal")?;
    Ok(MemoryUsage {
        total_bytes: total,
        available_bytes: available,
        used_percent,
        swap_total_bytes: swap_total,
        swap_used_bytes: swap_total.saturating_sub(need(fields.swap_free, "SwapFree")?),
    })
}

/// The `/proc/meminfo` lines the figures come from, in bytes.
#[derive(Default)]
struct MeminfoFields {
    total: Option<u64>,
    free: Option<u64>,
    available: Option<u64>,
    buffers: Option<u64>,
    cached: Option<u64>,
    swap_total: Option<u64>,
    swap_free: Option<u64>,
}

impl MeminfoFields {
    fn all_read(&self) -> bool {
        [
            self.total,
            self.free,
            self.available,
            self.buffers,
            self.cached,
            self.swap_total,
            self.swap_free,
        ]
        .iter()
        .all(Option::is_some)
    }
}

/// `   8131600 kB` in bytes.
fn bytes(name: &str, value: &str) -> Result<u64, ProcError> {
    let value = value.trim();
    let (number, unit) = match value.strip_suffix("kB") {
        Some(n) => (n.trim_end(), 1024),
        None => (value, 1),
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| ProcError::Other(format!("meminfo: {name}: {value:?} is not a size")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meminfo(total: u64, available: Option<u64>) -> String {
        let mut s = format!("MemTotal: {total} kB\nMemFree: 1000 kB\n");
        if let Some(a) = available {
            s += &format!("MemAvailable: {a} kB\n");
        }
        s += "Buffers: 500 kB\nCached: 1500 kB\nSwapCached: 0 kB\nActive: 1 kB\nInactive: 1 kB\n\
              SwapTotal: 2048 kB\nSwapFree: 1024 kB\nDirty: 0 kB\nWriteback: 0 kB\nMapped: 0 kB\n\
              Shmem: 0 kB\nSlab: 0 kB\nPageTables: 0 kB\nNFS_Unstable: 0 kB\nBounce: 0 kB\n\
              WritebackTmp: 0 kB\nCommitLimit: 0 kB\nCommitted_AS: 0 kB\nVmallocTotal: 0 kB\n\
              VmallocUsed: 0 kB\nVmallocChunk: 0 kB\n";
        s
    }

    #[test]
    fn used_is_total_minus_available() {
        let m = parse_meminfo(&meminfo(8000, Some(2000))).unwrap();
        assert_eq!(m.total_bytes, 8000 * 1024);
        assert_eq!(m.available_bytes, 2000 * 1024);
        assert!((m.used_percent - 75.0).abs() < 1e-9);
        assert_eq!(m.swap_total_bytes, 2048 * 1024);
        assert_eq!(m.swap_used_bytes, 1024 * 1024);
    }

    #[test]
    fn old_kernels_without_memavailable() {
        let m = parse_meminfo(&meminfo(8000, None)).unwrap();
        assert_eq!(m.available_bytes, 3000 * 1024);
    }

    #[test]
    fn missing_fields_are_an_error() {
        assert!(parse_meminfo("MemTotal: 5 kB\n").is_err());
        let no_swap = "MemTotal: 5 kB\nMemAvailable: 1 kB\nSwapTotal: 0 kB\n";
        assert!(parse_meminfo(no_swap).is_err());
    }

    #[test]
    fn garbage_in_a_field_read_is_an_error_and_other_lines_are_ignored() {
        let text = meminfo(8000, Some(2000)) + "HugePages_Total:       0\nDirectMap1G: x kB\n";
        assert_eq!(parse_meminfo(&text).unwrap().total_bytes, 8000 * 1024);
        let bad = meminfo(8000, Some(2000)).replace("SwapFree: 1024 kB", "SwapFree: lots kB");
        assert!(parse_meminfo(&bad).is_err());
    }

    #[test]
    fn agrees_with_procfs_on_the_fixture_trees() {
        use procfs::{FromBufRead, Meminfo};
        for (tree, text) in crate::collect::reference_texts("meminfo") {
            let ours = parse_meminfo(&text).expect("parses");
            let theirs = Meminfo::from_buf_read(text.as_bytes()).expect("procfs parses");
            assert_eq!(ours.total_bytes, theirs.mem_total, "{tree}");
            assert_eq!(
                ours.available_bytes,
                theirs
                    .mem_available
                    .unwrap_or(theirs.mem_free + theirs.buffers + theirs.cached)
                    .min(theirs.mem_total),
                "{tree}"
            );
            assert_eq!(ours.swap_total_bytes, theirs.swap_total, "{tree}");
            assert_eq!(
                ours.swap_used_bytes,
                theirs.swap_total - theirs.swap_free,
                "{tree}"
            );
        }
    }
}
