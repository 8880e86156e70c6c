//! `memory`: total, available, used % and swap, from `/proc/meminfo`.

use procfs::{FromBufRead, Meminfo};
use prometheus_client::encoding::DescriptorEncoder;

use super::{HostPaths, gauge, parsed};
use crate::error::Result;

/// Reads `meminfo`.
#[derive(Debug, Default)]
pub struct MemoryCollector {
    text: String,
}

impl MemoryCollector {
    /// The memory figures now.
    pub fn read(&mut self, paths: &HostPaths) -> Result<MemoryUsage> {
        let path = paths.read_into("meminfo", &mut self.text)?;
        parsed(path, parse_meminfo(&self.text))
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
pub fn parse_meminfo(text: &str) -> Result<MemoryUsage, procfs::ProcError> {
    let m = Meminfo::from_buf_read(text.as_bytes())?;
    // Kernels before 3.14 have no MemAvailable: free + buffers + page cache is what `free`
    // showed then.
    let available = m
        .mem_available
        .unwrap_or(m.mem_free + m.buffers + m.cached)
        .min(m.mem_total);
    let used_percent = if m.mem_total == 0 {
        0.0
    } else {
        100.0 * (m.mem_total - available) as f64 / m.mem_total as f64
    };
    Ok(MemoryUsage {
        total_bytes: m.mem_total,
        available_bytes: available,
        used_percent,
        swap_total_bytes: m.swap_total,
        swap_used_bytes: m.swap_total.saturating_sub(m.swap_free),
    })
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
    }
}
