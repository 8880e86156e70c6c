//! The host's figures from `/proc`, one file per collector.
//!
//! Each collector file owns what it reads (its collector, keeping the previous counters its
//! rates are computed from), what it reports (its figures) and how `/metrics` exports them (the
//! figures' `encode`, names and help texts beside the update, as in node_exporter). Parsing is
//! pure (text in, figures out) and tested on literal text and on fixture `/proc` trees;
//! [`Sampler`] runs the collectors under a configurable proc root, one after the other on the
//! caller's thread. The agent runs them through [`deadline::TimedSampler`] instead: each on a
//! blocking thread, within a deadline, never two runs of one collector at once. The reads are
//! file I/O on files the kernel makes from memory, and a statvfs, and take about 0.1 ms in all;
//! but a statvfs on a hung NFS or FUSE mount, or a /proc read stuck behind a kernel lock, never
//! returns, and the heartbeat must not wait with it.

pub mod cpu;
pub mod deadline;
pub mod disk;
pub mod load;
pub mod memory;
pub mod network;

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodepulse_crd::wire::{Metric, MetricSet, UsageSummary};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::error::{Error, Result};

/// Where the host's files are: `/proc` and `/` on a plain host, `/host/proc` and `/host` in a pod;
/// and which of its network devices count.
#[derive(Clone, Debug)]
pub struct HostPaths {
    /// The proc filesystem (`--proc-root`).
    pub proc_root: PathBuf,
    /// The host's root filesystem, for its usage (`--host-root`).
    pub host_root: PathBuf,
    /// The network devices whose traffic is the node's (`--network-device-exclude`).
    pub net_devices: network::DeviceFilter,
}

impl HostPaths {
    /// Paths under the given roots, the default network devices.
    pub fn new(proc_root: impl Into<PathBuf>, host_root: impl Into<PathBuf>) -> Self {
        HostPaths {
            proc_root: proc_root.into(),
            host_root: host_root.into(),
            net_devices: network::DeviceFilter::default(),
        }
    }

    /// The same paths, counting the network devices `filter` keeps.
    pub fn with_net_devices(mut self, filter: network::DeviceFilter) -> Self {
        self.net_devices = filter;
        self
    }
}

/// A file under the proc root, kept open from one sample to the next, and the text last read
/// from it. Each read asks from offset 0 again (`pread`), where the kernel makes a /proc file's
/// text anew: a sample costs one read per file and the one that finds its end, with no open or
/// close, and no allocation once the buffer has grown to the file's size.
#[derive(Debug, Default)]
pub struct ProcFile {
    open: Option<OpenFile>,
    /// What the reads land in, zeroed once when it grows rather than before every read.
    buf: Vec<u8>,
    text: String,
}

#[derive(Debug)]
struct OpenFile {
    name: String,
    path: PathBuf,
    file: File,
}

impl ProcFile {
    /// Reads `name` under the proc root: [`ProcFile::text`] is then its text.
    pub fn read(&mut self, paths: &HostPaths, name: &str) -> Result<()> {
        let kept = self.open.as_ref().is_some_and(|o| o.name == name);
        if !kept {
            self.open = None;
            self.open = Some(OpenFile::new(paths, name)?);
        }
        let mut result = self.fill();
        if result.is_err() && kept {
            // The handle of an earlier sample may have gone stale: one fresh open before failing.
            self.open = Some(OpenFile::new(paths, name)?);
            result = self.fill();
        }
        result.map_err(|source| Error::Read {
            path: self.path().to_path_buf(),
            source,
        })
    }

    /// The path of the file read last.
    pub fn path(&self) -> &Path {
        self.open.as_ref().map_or(Path::new(""), |o| &o.path)
    }

    /// The text read last.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Reads the open file from its start to its end into `text`, reusing the allocations.
    fn fill(&mut self) -> std::io::Result<()> {
        let file = &self.open.as_ref().expect("a file is open").file;
        let buf = &mut self.buf;
        if buf.is_empty() {
            buf.resize(4096, 0);
        }
        let mut len = 0;
        let read = loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match file.read_at(&mut buf[len..], len as u64) {
                Ok(0) => break Ok(()),
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.text.clear();
        match std::str::from_utf8(&buf[..len]) {
            Ok(text) => {
                self.text.push_str(text);
                read
            }
            Err(e) => read.and(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))),
        }
    }
}

impl OpenFile {
    fn new(paths: &HostPaths, name: &str) -> Result<OpenFile> {
        let path = paths.proc_root.join(name);
        match File::open(&path) {
            Ok(file) => Ok(OpenFile {
                name: name.to_string(),
                path,
                file,
            }),
            Err(source) => Err(Error::Read { path, source }),
        }
    }
}

fn parsed<T>(path: &Path, r: std::result::Result<T, procfs::ProcError>) -> Result<T> {
    r.map_err(|source| Error::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Exports one figure as a gauge without labels.
fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    let me = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(me)
}

/// Exports one gauge per device, interface or core, labelled `label`; nothing at all when there
/// is none (no HELP line for a family without series).
fn gauges<V: EncodeLabelValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &'static str,
    items: impl Iterator<Item = (V, f64)>,
) -> std::fmt::Result {
    let mut items = items.peekable();
    if items.peek().is_none() {
        return Ok(());
    }
    let mut me = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (value, v) in items {
        let labels = [(label, value)];
        ConstGauge::new(v).encode(me.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One collector, whichever metric it reads.
#[derive(Debug)]
pub enum Collector {
    /// `cpu`.
    Cpu(cpu::CpuCollector),
    /// `memory`.
    Memory(memory::MemoryCollector),
    /// `disk`.
    Disk(disk::DiskCollector),
    /// `network`.
    Network(network::NetworkCollector),
    /// `load`.
    Load(load::LoadCollector),
}

/// What one collector read.
#[derive(Debug)]
pub enum Figures {
    /// `cpu`: none on the first reading (a rate needs two).
    Cpu(Option<cpu::CpuUsage>),
    /// `memory`.
    Memory(memory::MemoryUsage),
    /// `disk`, and why the root filesystem's usage is missing if it is.
    Disk(disk::DiskUsage, Option<Error>),
    /// `network`.
    Network(network::NetworkUsage),
    /// `load`.
    Load(load::LoadFigures),
}

impl Collector {
    /// The collector of `metric`, with no previous counters yet.
    pub fn new(metric: Metric) -> Collector {
        match metric {
            Metric::Cpu => Collector::Cpu(Default::default()),
            Metric::Memory => Collector::Memory(Default::default()),
            Metric::Disk => Collector::Disk(Default::default()),
            Metric::Network => Collector::Network(Default::default()),
            Metric::Load => Collector::Load(Default::default()),
        }
    }

    /// Reads its figures (blocking file I/O).
    pub fn read(&mut self, paths: &HostPaths) -> Result<Figures> {
        Ok(match self {
            Collector::Cpu(c) => Figures::Cpu(c.read(paths)?),
            Collector::Memory(c) => Figures::Memory(c.read(paths)?),
            Collector::Disk(c) => {
                let (usage, root_err) = c.read(paths)?;
                Figures::Disk(usage, root_err)
            }
            Collector::Network(c) => Figures::Network(c.read(paths)?),
            Collector::Load(c) => Figures::Load(c.read(paths)?),
        })
    }

    /// Forgets the previous counters, so that no rate spans a time the collector was off (or
    /// hung).
    pub fn forget(&mut self) {
        match self {
            Collector::Cpu(c) => c.forget(),
            Collector::Disk(c) => c.forget(),
            Collector::Network(c) => c.forget(),
            Collector::Memory(_) | Collector::Load(_) => {}
        }
    }
}

/// Where `metric`'s collector sits in a table of all five, in [`Metric::ALL`]'s order.
pub(crate) fn slot(metric: Metric) -> usize {
    Metric::ALL
        .iter()
        .position(|m| *m == metric)
        .expect("every metric is in Metric::ALL")
}

/// One sample: the figures of the metrics asked for, and what failed.
#[derive(Debug, Default)]
pub struct Sample {
    /// Busy CPU since the previous sample.
    pub cpu: Option<cpu::CpuUsage>,
    /// Memory now.
    pub memory: Option<memory::MemoryUsage>,
    /// Disk throughput since the previous sample and root filesystem usage now.
    pub disk: Option<disk::DiskUsage>,
    /// Network throughput since the previous sample.
    pub network: Option<network::NetworkUsage>,
    /// Load now.
    pub load: Option<load::LoadFigures>,
    /// Collectors that failed, with why.
    pub errors: Vec<(Metric, Error)>,
    /// How long each collector took (a collector still running: how long it has been).
    pub durations: Vec<(Metric, Duration)>,
    /// Collectors that ran past their deadline in this sample (not those still running from an
    /// earlier one, which are in `errors` only).
    pub timed_out: Vec<Metric>,
    /// How long the whole sample took.
    pub duration: Duration,
}

/// Reads the figures, each collector keeping the previous counters its rates are computed from.
#[derive(Debug)]
pub struct Sampler {
    paths: HostPaths,
    /// In [`Metric::ALL`]'s order.
    collectors: [Collector; 5],
}

impl Sampler {
    /// A sampler with no previous counters yet.
    pub fn new(paths: HostPaths) -> Self {
        Sampler {
            paths,
            collectors: Metric::ALL.map(Collector::new),
        }
    }

    /// The paths read.
    pub fn paths(&self) -> &HostPaths {
        &self.paths
    }

    /// Takes one sample of `metrics` (blocking file I/O).
    pub fn sample(&mut self, metrics: &MetricSet) -> Sample {
        let started = Instant::now();
        let mut s = Sample::default();
        for m in metrics.iter() {
            let t = Instant::now();
            let result = self.collectors[slot(m)].read(&self.paths);
            s.record(m, result, t.elapsed());
        }
        // A metric switched off forgets its counters: switched on again, its first rate would
        // otherwise average over the whole time it was off.
        for m in Metric::ALL {
            if !metrics.contains(m) {
                self.collectors[slot(m)].forget();
            }
        }
        s.duration = started.elapsed();
        s
    }
}

/// One full sample of all five metrics from a fresh sampler (no rates: there is no previous
/// reading). The entry point benchmarks time.
pub fn sample_all(paths: &HostPaths) -> Sample {
    Sampler::new(paths.clone()).sample(&MetricSet::all())
}

/// Convenience for [`sample_all`] on `proc_root` with `/` as the host root.
pub fn sample_all_under(proc_root: &Path) -> Sample {
    sample_all(&HostPaths::new(proc_root, "/"))
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

impl Sample {
    /// Records what collector `metric` read, in `took`.
    pub fn record(&mut self, metric: Metric, result: Result<Figures>, took: Duration) {
        self.durations.push((metric, took));
        let failed = match result {
            Ok(Figures::Cpu(v)) => {
                self.cpu = v;
                None
            }
            Ok(Figures::Memory(v)) => {
                self.memory = Some(v);
                None
            }
            // The device rates stand even when the root filesystem could not be measured.
            Ok(Figures::Disk(v, root_err)) => {
                self.disk = Some(v);
                root_err
            }
            Ok(Figures::Network(v)) => {
                self.network = Some(v);
                None
            }
            Ok(Figures::Load(v)) => {
                self.load = Some(v);
                None
            }
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            self.errors.push((metric, e));
        }
    }

    /// Exports the figures of every collector that produced some, in a fixed order.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        if let Some(c) = &self.cpu {
            c.encode(enc)?;
        }
        if let Some(m) = &self.memory {
            m.encode(enc)?;
        }
        if let Some(d) = &self.disk {
            d.encode(enc)?;
        }
        if let Some(n) = &self.network {
            n.encode(enc)?;
        }
        if let Some(l) = &self.load {
            l.encode(enc)?;
        }
        Ok(())
    }

    /// The figures the heartbeat value carries, rounded to one decimal.
    pub fn summary(&self) -> UsageSummary {
        UsageSummary {
            cpu_percent: self.cpu.as_ref().map(|c| round1(c.busy_percent)),
            memory_percent: self.memory.as_ref().map(|m| round1(m.used_percent)),
            disk_percent: self
                .disk
                .as_ref()
                .and_then(|d| d.root.as_ref())
                .map(|r| round1(r.used_percent)),
            load1: self.load.as_ref().map(|l| round1(l.one)),
        }
    }

    /// The log line's message: `sample cpu=12.3% mem=45.6% (3.1/7.8 GiB) disk=71.0% rd=1.2MiB/s
    /// wr=0.3MiB/s net rx=10KiB/s tx=4KiB/s load=0.42 0.35 0.30`, the metrics in `metrics` only.
    /// A figure that needs a previous reading (the first sample) shows as `-`; a collector
    /// that failed shows as `error`, one that did not answer in time as `timeout`.
    pub fn log_line(&self, metrics: &MetricSet) -> String {
        const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
        const MIB: f64 = 1024.0 * 1024.0;
        let failed = |m: Metric| self.errors.iter().any(|(e, _)| *e == m);
        // A collector that did not answer in time shows as `timeout`, one that failed as `error`.
        let error = |m: Metric| {
            let timed_out = self
                .errors
                .iter()
                .any(|(e, err)| *e == m && matches!(err, Error::CollectorTimeout { .. }));
            if timed_out { "timeout" } else { "error" }
        };
        // Room for all five metrics' figures: the line is built without growing.
        let mut out = String::with_capacity(160);
        out.push_str("sample");
        for m in metrics.iter() {
            // Writing into a String cannot fail.
            let _ = match m {
                Metric::Cpu => match &self.cpu {
                    Some(c) => write!(out, " cpu={:.1}%", c.busy_percent),
                    None if failed(m) => write!(out, " cpu={}", error(m)),
                    None => write!(out, " cpu=-"),
                },
                Metric::Memory => match &self.memory {
                    Some(mem) => write!(
                        out,
                        " mem={:.1}% ({:.1}/{:.1} GiB)",
                        mem.used_percent,
                        mem.used_bytes() as f64 / GIB,
                        mem.total_bytes as f64 / GIB
                    ),
                    None => write!(out, " mem={}", error(m)),
                },
                Metric::Disk => match &self.disk {
                    Some(d) => match &d.root {
                        Some(r) => write!(out, " disk={:.1}%", r.used_percent),
                        None => write!(out, " disk=error"),
                    }
                    .and_then(|_| {
                        match (d.read_bytes_per_sec, d.write_bytes_per_sec) {
                            (Some(r), Some(w)) => {
                                write!(out, " rd={:.1}MiB/s wr={:.1}MiB/s", r / MIB, w / MIB)
                            }
                            _ => write!(out, " rd=- wr=-"),
                        }
                    }),
                    None => write!(out, " disk={}", error(m)),
                },
                Metric::Network => match &self.network {
                    Some(n) => match (n.rx_bytes_per_sec, n.tx_bytes_per_sec) {
                        (Some(rx), Some(tx)) => {
                            write!(out, " net rx={} tx={}", rate(rx), rate(tx))
                        }
                        _ => write!(out, " net rx=- tx=-"),
                    },
                    None => write!(out, " net={}", error(m)),
                },
                Metric::Load => match &self.load {
                    Some(l) => write!(out, " load={:.2} {:.2} {:.2}", l.one, l.five, l.fifteen),
                    None => write!(out, " load={}", error(m)),
                },
            };
        }
        out
    }
}

/// `10KiB/s`, `3.2MiB/s`, `1.1GiB/s`.
fn rate(bytes_per_sec: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes_per_sec < KIB * KIB {
        format!("{:.0}KiB/s", bytes_per_sec / KIB)
    } else if bytes_per_sec < KIB * KIB * KIB {
        format!("{:.1}MiB/s", bytes_per_sec / (KIB * KIB))
    } else {
        format!("{:.1}GiB/s", bytes_per_sec / (KIB * KIB * KIB))
    }
}

/// Every text of `file` a parser of ours must read the way procfs reads it: the four fixture
/// trees' (each must have it), the pod-on-node tree's PID 1 where it has one, and this
/// machine's, as its kernel writes it (a sandbox's /proc may lack it). Pairs of the path and
/// the text.
#[cfg(test)]
fn reference_texts(file: &str) -> Vec<(String, String)> {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc");
    let mut texts: Vec<(String, String)> = ["idle", "busy", "odd-devices", "pod-on-node"]
        .iter()
        .map(|tree| {
            let path = format!("{fixtures}/{tree}/{file}");
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            (path, text)
        })
        .collect();
    let optional = [
        format!("{fixtures}/pod-on-node/1/{file}"),
        format!("/proc/{file}"),
    ];
    for path in optional {
        if let Ok(text) = std::fs::read_to_string(&path) {
            texts.push((path, text));
        }
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = include_str!("../../tests/fixtures/proc/idle/stat");
    const STAT_LATER: &str = include_str!("../../tests/fixtures/proc/busy/stat");
    const DISKSTATS: &str = "   8       0 sda 10 0 2048 0 10 0 4096 0 0 0 0 0 0 0 0 0 0\n";

    fn proc_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write fixture");
        }
        dir
    }

    #[test]
    fn a_kept_file_reads_its_text_anew_each_time() {
        let proc = proc_tree(&[("stat", STAT)]);
        let paths = HostPaths::new(proc.path(), "/");
        let mut file = ProcFile::default();
        file.read(&paths, "stat").expect("read");
        assert_eq!(file.text(), STAT);
        assert_eq!(file.path(), proc.path().join("stat"));
        // Rewritten in place, shorter, then longer than the first buffer.
        std::fs::write(proc.path().join("stat"), "cpu 1\n").expect("rewrite");
        file.read(&paths, "stat").expect("read");
        assert_eq!(file.text(), "cpu 1\n");
        let long = "x".repeat(10_000);
        std::fs::write(proc.path().join("stat"), &long).expect("rewrite");
        file.read(&paths, "stat").expect("read");
        assert_eq!(file.text(), long);
        // Real /proc text, made by the kernel at each read from offset 0: the bytes this
        // process has read (`rchar`) count the first read by the time of the second.
        let real = HostPaths::new("/proc", "/");
        file.read(&real, "self/io").expect("read /proc/self/io");
        let first = file.text().to_string();
        file.read(&real, "self/io").expect("read /proc/self/io");
        assert!(file.text().starts_with("rchar: "), "{}", file.text());
        assert_ne!(file.text(), first, "a kept /proc file shows fresh figures");
    }

    #[test]
    fn a_file_that_cannot_be_read_names_its_path() {
        let proc = proc_tree(&[]);
        let mut file = ProcFile::default();
        let err = file
            .read(&HostPaths::new(proc.path(), "/"), "stat")
            .expect_err("no such file");
        assert!(matches!(&err, Error::Read { path, .. } if *path == proc.path().join("stat")));
    }

    #[test]
    fn an_unmeasurable_root_filesystem_keeps_the_disk_rates() {
        let proc = proc_tree(&[("diskstats", DISKSTATS)]);
        let mut sampler = Sampler::new(HostPaths::new(proc.path(), "/nonexistent-host-root"));
        let disk = MetricSet::new([Metric::Disk]).expect("a set");
        sampler.sample(&disk);
        let s = sampler.sample(&disk);
        let d = s.disk.as_ref().expect("device figures kept");
        assert!(d.root.is_none());
        assert!(d.read_bytes_per_sec.is_some() && d.write_bytes_per_sec.is_some());
        assert!(matches!(
            s.errors.as_slice(),
            [(Metric::Disk, Error::Statvfs { .. })]
        ));
        let line = s.log_line(&disk);
        assert!(
            line.starts_with("sample disk=error rd=0.0MiB/s wr=0.0MiB/s"),
            "{line}"
        );
    }

    #[test]
    fn a_metric_switched_off_and_on_starts_its_rates_afresh() {
        let proc = proc_tree(&[
            ("stat", STAT),
            ("meminfo", "MemTotal: 1000 kB\nMemAvailable: 500 kB\n"),
        ]);
        let mut sampler = Sampler::new(HostPaths::new(proc.path(), "/"));
        let cpu = MetricSet::new([Metric::Cpu]).expect("a set");
        let memory = MetricSet::new([Metric::Memory]).expect("a set");
        let first = sampler.sample(&cpu);
        assert!(first.errors.is_empty(), "{:?}", first.errors);
        sampler.sample(&memory);
        std::fs::write(proc.path().join("stat"), STAT_LATER).expect("rewrite stat");
        // Back on: no rate averaged over the time cpu was off; one from the next sample on.
        let back = sampler.sample(&cpu);
        assert!(back.errors.is_empty() && back.cpu.is_none(), "{back:?}");
        assert!(sampler.sample(&cpu).cpu.is_some());
    }

    #[test]
    fn rates_pick_a_readable_unit() {
        assert_eq!(rate(10.0 * 1024.0), "10KiB/s");
        assert_eq!(rate(3.25 * 1024.0 * 1024.0), "3.2MiB/s");
        assert_eq!(rate(0.0), "0KiB/s");
    }
}
