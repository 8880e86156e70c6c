//! The collectors on fixture /proc trees: a busy machine, an idle one, one with odd devices
//! (offline core, old kernel lines, partitions and stacked devices, counters touching the colon),
//! and the host's /proc as an agent pod sees it (`pod-on-node`: `net/dev` is the pod's own
//! network namespace, `1/net/dev` the node's, with a CNI bridge, veths and a tunnel).
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
    // The file the sampler reads: PID 1's network namespace when the tree has one.
    let net_dev = if tree.join("1/net/dev").exists() {
        "1/net/dev"
    } else {
        "net/dev"
    };
    writeln!(out, "net file {net_dev}").unwrap();
    let counted = network::DeviceFilter::default();
    for i in network::parse_net_dev(&read(tree, net_dev)).expect("net/dev parses") {
        writeln!(
            out,
            "net {} rx_bytes={} tx_bytes={} rx_packets={} tx_packets={} rx_errors={} tx_errors={} counted={}",
            i.name,
            i.rx_bytes,
            i.tx_bytes,
            i.rx_packets,
            i.tx_packets,
            i.rx_errors,
            i.tx_errors,
            counted.counts(&i.name)
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
    assert!(!d.contains("loop0"), "{d}");
    assert!(d.contains("net lo ") && d.contains("counted=false"), "{d}");
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
    for (dev, counted) in [
        ("eth0", true),
        ("wlp0s20f3", true),
        ("br-3f2a1b4c5d6e", false),
        ("veth9c1a2b3", false),
        ("lo", false),
    ] {
        let line = d
            .lines()
            .find(|l| l.starts_with(&format!("net {dev} ")))
            .unwrap_or_else(|| panic!("{dev} missing: {d}"));
        assert!(line.ends_with(&format!("counted={counted}")), "{line}");
    }
}

#[test]
fn pod_on_node_reads_the_nodes_namespace() {
    let d = check_golden("pod-on-node");
    assert!(d.contains("net file 1/net/dev"), "{d}");
    // The node's eth0 (943 MB), not the pod's (33 KB).
    assert!(d.contains("net eth0 rx_bytes=943718400 "), "{d}");
    assert!(!d.contains("rx_bytes=33792 "), "{d}");
}

/// A copy of a fixture tree the test can rewrite between two samples.
fn scratch_copy(name: &str) -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    copy(&tree(name), dir.path());
    dir
}

/// `net/dev` text with one line per `(device, rx_bytes, tx_bytes)`.
fn net_dev(devices: &[(&str, u64, u64)]) -> String {
    let mut text = String::from(
        "Inter-|   Receive                                                |  Transmit\n \
         face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n",
    );
    for (name, rx, tx) in devices {
        writeln!(
            text,
            "{name:>6}: {rx} {} 0 0 0 0 0 0 {tx} {} 0 0 0 0 0 0",
            rx / 1000,
            tx / 1000
        )
        .unwrap();
    }
    text
}

#[test]
fn node_traffic_is_counted_once_from_the_nodes_namespace() {
    let dir = scratch_copy("pod-on-node");
    let root = dir.path();
    let write = |file: &str, devices: &[(&str, u64, u64)]| {
        std::fs::write(root.join(file), net_dev(devices)).unwrap();
    };
    // A pod sends: its bytes cross veth, cni0 and flannel.1, then eth0. Only eth0 (and ens5)
    // may count; the pod's own namespace (net/dev) moves too, and must not be read.
    let node = |k: u64| {
        vec![
            ("lo", 1_000_000 * k, 1_000_000 * k),
            ("eth0", 1_000_000 + 3_000 * k, 2_000_000 + 5_000 * k),
            ("ens5", 100_000 + 7 * k, 100_000 + 11 * k),
            ("cni0", 9_000_000 * k, 9_000_000 * k),
            ("veth1a2b3c4d", 9_000_000 * k, 9_000_000 * k),
            ("flannel.1", 9_000_000 * k, 9_000_000 * k),
            ("docker0", 0, 0),
        ]
    };
    let pod = |k: u64| vec![("lo", 0, 0), ("eth0", 70_000_000 * k, 70_000_000 * k)];
    write("1/net/dev", &node(1));
    write("net/dev", &pod(1));
    let net: MetricSet = "network".parse().unwrap();
    let mut sampler = Sampler::new(HostPaths::new(root, "/"));
    assert!(sampler.sample(&net).errors.is_empty());
    write("1/net/dev", &node(2));
    write("net/dev", &pod(2));
    let s = sampler.sample(&net);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let n = s.network.expect("network figures");
    let names: Vec<&str> = n.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["ens5", "eth0"], "{n:?}");
    // Same elapsed time for every device: the sums are exactly eth0 + ens5, in the ratio of
    // their deltas (3_007 received for 5_011 sent), whatever the clock says.
    let rx = n.rx_bytes_per_sec.unwrap();
    let tx = n.tx_bytes_per_sec.unwrap();
    let per_if: f64 = n.interfaces.iter().map(|i| i.rx_bytes_per_sec).sum();
    assert_eq!(rx, per_if);
    assert!(rx > 0.0, "{n:?}");
    assert!(
        (rx / tx - 3_007.0 / 5_011.0).abs() < 1e-9,
        "rx {rx} tx {tx}"
    );
}

#[test]
fn without_pid_1_the_own_namespace_is_read_and_an_empty_pattern_counts_every_device() {
    let dir = scratch_copy("pod-on-node");
    std::fs::remove_dir_all(dir.path().join("1")).unwrap();
    let paths =
        HostPaths::new(dir.path(), "/").with_net_devices(network::DeviceFilter::new("").unwrap());
    let net: MetricSet = "network".parse().unwrap();
    let mut sampler = Sampler::new(paths);
    sampler.sample(&net);
    let s = sampler.sample(&net);
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    let names: Vec<&str> = s
        .network
        .as_ref()
        .unwrap()
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(names, ["eth0", "lo"]);
}

#[test]
fn a_sampler_on_each_tree_reads_everything_and_logs_one_line() {
    for name in ["busy", "idle", "odd-devices", "pod-on-node"] {
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
