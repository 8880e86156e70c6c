//! The collectors on fixture /proc trees: a busy machine, an idle one, and one with odd devices
//! (offline core, old kernel lines, partitions and stacked devices, counters touching the colon).
//!
//! Each tree's `expected.txt` is the golden description of what the parsers read from it.
//! Regenerate after a deliberate change with `NODEPULSE_BLESS=1 cargo test -p nodepulse-agent
//! --test proc_fixtures` and review the diff.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use nodepulse_agent::collect::{self, HostPaths, Sampler, cpu, disk, load, memory, network};
use nodepulse_crd::wire::MetricSet;

fn tree(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/proc")
        .join(name)
}

fn read(tree: &Path, file: &str) -> String {
    std::fs::read_to_string(tree.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// What the parsers make of a tree, one fact per line.
fn describe(tree: &Path) -> String {
    let mut out = String::new();
    let c = cpu::parse_stat(&read(tree, "stat")).expect("stat parses");
    writeln!(
        out,
        "cpu total busy={} total={}",
        c.total.busy, c.total.total
    )
    .unwrap();
    for (n, t) in &c.cores {
        writeln!(out, "cpu core {n} busy={} total={}", t.busy, t.total).unwrap();
    }
    writeln!(out, "cpu procs_running={:?}", c.procs_running).unwrap();
    let m = memory::parse_meminfo(&read(tree, "meminfo")).expect("meminfo parses");
    writeln!(
        out,
        "memory total={} available={} used={:.2}% swap_total={} swap_used={}",
        m.total_bytes, m.available_bytes, m.used_percent, m.swap_total_bytes, m.swap_used_bytes
    )
    .unwrap();
    for d in disk::parse_diskstats(&read(tree, "diskstats")) {
        writeln!(
            out,
            "disk {} reads={} writes={} read_bytes={} written_bytes={} whole_disk={}",
            d.name,
            d.reads,
            d.writes,
            d.read_bytes,
            d.written_bytes,
            disk::is_whole_disk(&d.name)
        )
        .unwrap();
    }
    for i in network::parse_net_dev(&read(tree, "net/dev")).expect("net/dev parses") {
        writeln!(
            out,
            "net {} rx_bytes={} tx_bytes={} rx_packets={} tx_packets={} rx_errors={} tx_errors={}",
            i.name, i.rx_bytes, i.tx_bytes, i.rx_packets, i.tx_packets, i.rx_errors, i.tx_errors
        )
        .unwrap();
    }
    let l = load::parse_loadavg(&read(tree, "loadavg")).expect("loadavg parses");
    writeln!(
        out,
        "load {} {} {} runnable={} tasks={}",
        l.one, l.five, l.fifteen, l.runnable, l.tasks
    )
    .unwrap();
    out
}

fn check_golden(name: &str) -> String {
    let dir = tree(name);
    let got = describe(&dir);
    let golden = dir.join("expected.txt");
    if std::env::var_os("NODEPULSE_BLESS").is_some() {
        std::fs::write(&golden, &got).expect("write golden file");
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert_eq!(
        got, want,
        "{name}: parsers disagree with {golden:?}; if the change is deliberate, regenerate with NODEPULSE_BLESS=1"
    );
    got
}

#[test]
fn busy_machine() {
    let d = check_golden("busy");
    assert!(
        d.contains("memory total=16694640640 available=1054867456 used=93.68%"),
        "{d}"
    );
    assert!(d.contains("swap_used=3221221376"), "{d}");
    assert!(
        d.contains("load 7.85 6.2 5.01 runnable=9 tasks=1043"),
        "{d}"
    );
    assert!(!d.contains("loop0") && !d.contains("net lo "), "{d}");
    assert!(
        d.contains("disk sda1 ") && d.contains("whole_disk=false"),
        "{d}"
    );
}

#[test]
fn idle_machine() {
    let d = check_golden("idle");
    assert!(d.contains("cpu core 1 "), "{d}");
    assert!(d.contains("procs_running=Some(1)"), "{d}");
    assert!(d.contains("swap_total=0 swap_used=0"), "{d}");
}

#[test]
fn odd_devices() {
    let d = check_golden("odd-devices");
    // cpu1 is offline: the cores keep their own numbers.
    assert!(d.contains("cpu core 0 ") && d.contains("cpu core 2 ") && !d.contains("cpu core 1 "));
    // No MemAvailable: free + buffers + cached.
    assert!(d.contains("available=2621440000"), "{d}");
    // The short old-layout line is skipped; loop and zram are left out.
    assert!(
        !d.contains("sdc1") && !d.contains("zram0") && !d.contains("loop4"),
        "{d}"
    );
    for whole in ["nvme0n1", "mmcblk0", "xvda", "sr0"] {
        assert!(d.contains(&format!("disk {whole} ")), "{whole}: {d}");
        assert!(d.contains(&format!("disk {whole} ")) && disk::is_whole_disk(whole));
    }
    // The byte count glued to the colon.
    assert!(
        d.contains("net eth0 rx_bytes=123456789012 tx_bytes=98765432109"),
        "{d}"
    );
    assert!(d.contains("net br-3f2a1b4c5d6e "), "{d}");
    assert!(!d.contains("net lo "), "{d}");
}

#[test]
fn a_sampler_on_each_tree_reads_everything_and_logs_one_line() {
    for name in ["busy", "idle", "odd-devices"] {
        let paths = HostPaths::new(tree(name), "/");
        let first = collect::sample_all(&paths);
        assert!(first.errors.is_empty(), "{name}: {:?}", first.errors);
        assert!(first.cpu.is_none(), "no rates without a previous reading");
        assert!(first.memory.is_some() && first.load.is_some());

        let mut sampler = Sampler::new(paths);
        let all = MetricSet::all();
        sampler.sample(&all);
        let second = sampler.sample(&all);
        assert!(second.errors.is_empty(), "{name}: {:?}", second.errors);
        // Same files twice: no time passed for the CPU, nothing moved on disks and links.
        assert_eq!(second.cpu.as_ref().unwrap().busy_percent, 0.0);
        let line = second.log_line(&all);
        assert!(line.starts_with("sample cpu=0.0% mem="), "{line}");
        for part in [
            " disk=",
            " rd=0.0MiB/s wr=0.0MiB/s",
            " net rx=0KiB/s tx=0KiB/s",
            " load=",
        ] {
            assert!(line.contains(part), "{name}: {part} missing in {line}");
        }
        let summary = second.summary();
        assert!(summary.memory_percent.is_some() && summary.load1.is_some());

        let only: MetricSet = "cpu,memory".parse().unwrap();
        let line = sampler.sample(&only).log_line(&only);
        assert!(
            line.starts_with("sample cpu=") && !line.contains("load="),
            "{line}"
        );
    }
}

#[test]
fn a_missing_proc_root_is_reported_per_collector_not_a_panic() {
    let s = collect::sample_all(&HostPaths::new("/nonexistent-proc", "/nonexistent-host"));
    assert_eq!(s.errors.len(), 5, "{:?}", s.errors);
    let msg = s.errors[0].1.to_string();
    assert!(msg.contains("/nonexistent-proc/stat"), "{msg}");
    let line = s.log_line(&MetricSet::all());
    assert_eq!(
        line,
        "sample cpu=error mem=error disk=error net=error load=error"
    );
}
