//! `network`: per-interface rx/tx bytes, packets and errors from the node's `net/dev`, the
//! virtual devices left out.
//!
//! Which namespace: `<proc>/1/net/dev`, PID 1's, is the node's network namespace whether the
//! agent runs on the machine itself or in a pod that mounts the host's `/proc` (a proc mount
//! shows the PID namespace it was made in, the host's); `<proc>/net/dev` is `self/net`, the
//! reader's own namespace, which in a pod is the pod's `eth0`.
//!
//! Which devices: on a Kubernetes node every byte a pod sends crosses its `veth*`, the bridge
//! (`cni0`, `docker0`, `br-*`), perhaps a tunnel (`flannel.1`, `vxlan.calico`, `cilium_*`), and
//! then the physical interface; summing them all counts pod traffic two or three times. So the
//! figures leave out the devices [`DEFAULT_DEVICE_EXCLUDE`] names (`--network-device-exclude`,
//! like node_exporter's `--collector.netdev.device-exclude`), in the sums and in the
//! per-interface series alike.

use std::time::Instant;

use procfs::ProcError;
use prometheus_client::encoding::DescriptorEncoder;
use regex_lite::Regex;

use super::{HostPaths, ProcFile, gauges, parsed};
use crate::error::Result;

/// The devices left out by default: loopback, and the virtual devices of container runtimes,
/// CNI plugins, tunnels and hypervisors, whose traffic is also counted on a physical device.
pub const DEFAULT_DEVICE_EXCLUDE: &str = "^(lo|veth.*|cni.*|docker.*|br-.*|flannel.*|cali.*|cilium.*|vxlan.*|tunl.*|kube-.*|nodelocaldns|dummy.*|virbr.*|lxc.*|genev_sys.*|weave.*|tap.*)$";

/// Which network devices count as the node's traffic: every device whose name the exclude
/// pattern does not match (an empty pattern excludes nothing).
#[derive(Clone, Debug)]
pub struct DeviceFilter {
    exclude: Option<Regex>,
}

impl DeviceFilter {
    /// A filter leaving out the devices `pattern` matches (a regular expression, unanchored
    /// like node_exporter's: anchor it with `^...$`); empty leaves out none.
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Ok(DeviceFilter { exclude: None });
        }
        Regex::new(pattern)
            .map(|re| DeviceFilter { exclude: Some(re) })
            .map_err(|e| format!("network device exclude pattern {pattern:?}: {e}"))
    }

    /// Whether the device's traffic counts.
    pub fn counts(&self, name: &str) -> bool {
        self.exclude.as_ref().is_none_or(|re| !re.is_match(name))
    }

    /// The pattern (`""`: none), for the start-up log line and to tell a collector its
    /// verdicts are stale.
    pub fn pattern(&self) -> &str {
        self.exclude.as_ref().map_or("", Regex::as_str)
    }
}

impl Default for DeviceFilter {
    fn default() -> Self {
        DeviceFilter {
            exclude: Some(Regex::new(DEFAULT_DEVICE_EXCLUDE).expect("the default pattern parses")),
        }
    }
}

/// Reads the node's `net/dev`, keeping the previous counters the rates are computed from.
#[derive(Debug, Default)]
pub struct NetworkCollector {
    prev: Option<(Instant, Vec<InterfaceCounters>)>,
    /// The node's `net/dev`, and the agent's own, read when the node's is not readable.
    node_file: ProcFile,
    own_file: ProcFile,
    /// The agent's own network namespace is read because the node's was not readable; said once.
    warned_own_netns: bool,
    /// Whether each device seen counts under the exclude pattern `verdicts_of`, so that the
    /// pattern runs once per new device, not once per device and sample.
    verdicts: Vec<(String, bool)>,
    verdicts_of: String,
}

impl NetworkCollector {
    /// The counted interfaces' rates since the previous reading (none on the first).
    pub fn read(&mut self, paths: &HostPaths) -> Result<NetworkUsage> {
        let file = self.read_node_net_dev(paths)?;
        let at = Instant::now();
        let mut now = parsed(file.path(), parse_net_dev(file.text()))?;
        if self.verdicts_of != paths.net_devices.pattern() {
            self.verdicts.clear();
            self.verdicts_of = paths.net_devices.pattern().to_string();
        } else if self.verdicts.len() > 2 * now.len() + 64 {
            // Devices come and go (a veth per pod): forget those gone.
            self.verdicts
                .retain(|(n, _)| now.iter().any(|i| i.name == *n));
        }
        now.retain(|i| match self.verdicts.iter().find(|(n, _)| *n == i.name) {
            Some((_, counts)) => *counts,
            None => {
                let counts = paths.net_devices.counts(&i.name);
                self.verdicts.push((i.name.clone(), counts));
                counts
            }
        });
        let usage = match &self.prev {
            Some((t, prev)) => usage(Some(prev), &now, (at - *t).as_secs_f64()),
            None => usage(None, &now, 0.0),
        };
        self.prev = Some((at, now));
        Ok(usage)
    }

    /// Forgets the previous counters, so that no rate spans a time the collector was off.
    pub fn forget(&mut self) {
        self.prev = None;
    }

    /// The node's `net/dev`: PID 1's network namespace (`<proc>/1/net/dev`), not `net/dev`,
    /// which is `self/net`, the reader's own: in a pod without `hostNetwork`, the pod's `eth0`.
    /// A proc root without PID 1 (a bare fixture tree, a hardened mount) falls back to it, and
    /// says so once.
    fn read_node_net_dev(&mut self, paths: &HostPaths) -> Result<&ProcFile> {
        match self.node_file.read(paths, "1/net/dev") {
            Ok(()) => Ok(&self.node_file),
            Err(node_err) => match self.own_file.read(paths, "net/dev") {
                Ok(()) => {
                    if !self.warned_own_netns {
                        self.warned_own_netns = true;
                        tracing::warn!(
                            "network: {node_err}; reading {} instead, the agent's own network namespace (in a pod without hostNetwork, the pod's interfaces, not the node's)",
                            self.own_file.path().display()
                        );
                    }
                    Ok(&self.own_file)
                }
                Err(_) => Err(node_err),
            },
        }
    }
}

/// One interface's cumulative counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Interface name.
    pub name: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Receive errors since boot.
    pub rx_errors: u64,
    /// Transmit errors since boot.
    pub tx_errors: u64,
}

/// One interface's rates over an interval, and its error counts.
#[derive(Clone, Debug, PartialEq)]
pub struct InterfaceRates {
    /// Interface name.
    pub name: String,
    /// Bytes received per second.
    pub rx_bytes_per_sec: f64,
    /// Bytes sent per second.
    pub tx_bytes_per_sec: f64,
    /// Packets received per second.
    pub rx_packets_per_sec: f64,
    /// Packets sent per second.
    pub tx_packets_per_sec: f64,
    /// Receive errors since boot.
    pub rx_errors: u64,
    /// Transmit errors since boot.
    pub tx_errors: u64,
}

/// Network figures over an interval.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkUsage {
    /// Per interface.
    pub interfaces: Vec<InterfaceRates>,
    /// Bytes received per second, all interfaces; absent on the first reading.
    pub rx_bytes_per_sec: Option<f64>,
    /// Bytes sent per second, all interfaces; absent on the first reading.
    pub tx_bytes_per_sec: Option<f64>,
}

impl NetworkUsage {
    /// Exports the figures, per interface.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let per_interface = |figure: fn(&InterfaceRates) -> f64| {
            self.interfaces
                .iter()
                .map(move |i| (i.name.as_str(), figure(i)))
        };
        gauges(
            enc,
            "nodepulse_node_network_receive_bytes_per_second",
            "Bytes received per second",
            "interface",
            per_interface(|i| i.rx_bytes_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_network_transmit_bytes_per_second",
            "Bytes sent per second",
            "interface",
            per_interface(|i| i.tx_bytes_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_network_receive_packets_per_second",
            "Packets received per second",
            "interface",
            per_interface(|i| i.rx_packets_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_network_transmit_packets_per_second",
            "Packets sent per second",
            "interface",
            per_interface(|i| i.tx_packets_per_sec),
        )?;
        gauges(
            enc,
            "nodepulse_node_network_receive_errors",
            "Receive errors since boot",
            "interface",
            per_interface(|i| i.rx_errors as f64),
        )?;
        gauges(
            enc,
            "nodepulse_node_network_transmit_errors",
            "Transmit errors since boot",
            "interface",
            per_interface(|i| i.tx_errors as f64),
        )
    }
}

/// Parses the text of `/proc/net/dev`, every device (loopback too), sorted by name.
///
/// Our own parser, not procfs's: that one goes through a map of every counter of every device.
pub fn parse_net_dev(text: &str) -> Result<Vec<InterfaceCounters>, ProcError> {
    let mut out = Vec::new();
    // Two header lines, then one line per device: its receive counters (bytes packets errs drop
    // fifo frame compressed multicast), then its transmit counters (bytes packets errs ...).
    for line in text.lines().skip(2).filter(|l| !l.trim().is_empty()) {
        // Older kernels printed "%6s:%8lu", so once an interface had received 100 MB its byte
        // count touched the colon ("eth0:123456789"). Interface names cannot contain ':', so
        // splitting at the first one is always right.
        let (name, counters) = line
            .split_once(':')
            .ok_or_else(|| ProcError::Other(format!("net/dev: no device in {line:?}")))?;
        let mut fields = counters.split_ascii_whitespace();
        let mut c = [0u64; 16];
        for slot in c.iter_mut() {
            let field = fields.next().ok_or_else(|| {
                ProcError::Other(format!("net/dev: fewer than 16 counters in {line:?}"))
            })?;
            *slot = field
                .parse()
                .map_err(|_| ProcError::Other(format!("net/dev: {field:?} is not a counter")))?;
        }
        out.push(InterfaceCounters {
            name: name.trim().to_string(),
            rx_bytes: c[0],
            rx_packets: c[1],
            rx_errors: c[2],
            tx_bytes: c[8],
            tx_packets: c[9],
            tx_errors: c[10],
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Rates between two readings `seconds` apart; interfaces present in both only.
pub fn usage(
    prev: Option<&[InterfaceCounters]>,
    now: &[InterfaceCounters],
    seconds: f64,
) -> NetworkUsage {
    let Some(prev) = prev.filter(|_| seconds > 0.0) else {
        return NetworkUsage {
            interfaces: Vec::new(),
            rx_bytes_per_sec: None,
            tx_bytes_per_sec: None,
        };
    };
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    let interfaces: Vec<InterfaceRates> = now
        .iter()
        .filter_map(|n| {
            let p = prev.iter().find(|p| p.name == n.name)?;
            Some(InterfaceRates {
                name: n.name.clone(),
                rx_bytes_per_sec: per_sec(p.rx_bytes, n.rx_bytes),
                tx_bytes_per_sec: per_sec(p.tx_bytes, n.tx_bytes),
                rx_packets_per_sec: per_sec(p.rx_packets, n.rx_packets),
                tx_packets_per_sec: per_sec(p.tx_packets, n.tx_packets),
                rx_errors: n.rx_errors,
                tx_errors: n.tx_errors,
            })
        })
        .collect();
    NetworkUsage {
        rx_bytes_per_sec: Some(interfaces.iter().map(|i| i.rx_bytes_per_sec).sum()),
        tx_bytes_per_sec: Some(interfaces.iter().map(|i| i.tx_bytes_per_sec).sum()),
        interfaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Inter-|   Receive                                                |  Transmit\n \
        face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n";

    #[test]
    fn big_counters_touching_the_colon_parse() {
        let text = format!(
            "{HEADER}    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
             eth0:123456789012 900 1 0 0 0 0 0 5000 40 2 0 0 0 0 0\n"
        );
        let n = parse_net_dev(&text).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].name, "eth0");
        assert_eq!(n[0].rx_bytes, 123_456_789_012);
        assert_eq!(n[0].rx_errors, 1);
        assert_eq!(n[0].tx_errors, 2);
        assert_eq!(n[1].name, "lo");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_net_dev(&format!("{HEADER}  eth0: 1 2 3\n")).is_err());
        assert!(
            parse_net_dev(&format!(
                "{HEADER}  eth0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"
            ))
            .is_err()
        );
        let x = format!("{HEADER}  eth0: x 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n");
        assert!(parse_net_dev(&x).is_err());
    }

    #[test]
    fn agrees_with_procfs_on_the_fixture_trees() {
        use procfs::FromBufRead;
        use procfs::net::InterfaceDeviceStatus;
        let texts = crate::collect::reference_texts("net/dev");
        // The node's interfaces as a pod reads them through PID 1, beside the pod's own.
        assert!(
            texts
                .iter()
                .any(|(path, _)| path.contains("pod-on-node/1/"))
        );
        for (tree, text) in texts {
            let ours = parse_net_dev(&text).expect("parses");
            // procfs splits at whitespace only: part a counter touching the colon from it.
            let spaced: String = text
                .lines()
                .map(|l| l.replacen(':', ": ", 1) + "\n")
                .collect();
            let theirs = InterfaceDeviceStatus::from_buf_read(spaced.as_bytes()).expect("procfs");
            assert_eq!(ours.len(), theirs.0.len(), "{tree}");
            for i in &ours {
                let d = &theirs.0[&i.name];
                let t = (d.recv_bytes, d.recv_packets, d.recv_errs);
                assert_eq!((i.rx_bytes, i.rx_packets, i.rx_errors), t, "{tree}");
                let t = (d.sent_bytes, d.sent_packets, d.sent_errs);
                assert_eq!((i.tx_bytes, i.tx_packets, i.tx_errors), t, "{tree}");
            }
        }
    }

    #[test]
    fn the_default_filter_keeps_physical_devices_and_leaves_out_virtual_ones() {
        let f = DeviceFilter::default();
        for counted in [
            "eth0",
            "ens5",
            "enp0s31f6",
            "eno1",
            "wlp0s20f3",
            "bond0",
            "em1",
            "ib0",
            "eth0.100",
        ] {
            assert!(f.counts(counted), "{counted} must count");
        }
        for left_out in [
            "lo",
            "veth9c1a2b3",
            "cni0",
            "docker0",
            "br-3f2a1b4c5d6e",
            "flannel.1",
            "cali1234abcd",
            "cilium_host",
            "cilium_vxlan",
            "vxlan.calico",
            "tunl0",
            "kube-ipvs0",
            "kube-bridge",
            "nodelocaldns",
            "virbr0",
            "lxc1a2b",
            "genev_sys_6081",
            "weave",
            "tap0",
        ] {
            assert!(!f.counts(left_out), "{left_out} must be left out");
        }
    }

    #[test]
    fn an_empty_pattern_counts_everything_and_a_bad_one_is_refused() {
        let all = DeviceFilter::new("").unwrap();
        assert!(all.counts("lo") && all.counts("veth1"));
        assert_eq!(all.pattern(), "");
        let only_lo = DeviceFilter::new("^lo$").unwrap();
        assert!(!only_lo.counts("lo") && only_lo.counts("lo2") && only_lo.counts("veth1"));
        let err = DeviceFilter::new("^(lo").unwrap_err();
        assert!(err.contains("^(lo"), "{err}");
    }

    #[test]
    fn rates_over_interfaces_present_twice() {
        let c = |name: &str, n: u64| InterfaceCounters {
            name: name.into(),
            rx_bytes: n * 100,
            tx_bytes: n * 10,
            rx_packets: n,
            tx_packets: n,
            rx_errors: 0,
            tx_errors: 0,
        };
        let u = usage(Some(&[c("eth0", 1)]), &[c("eth0", 11), c("veth1", 3)], 10.0);
        assert_eq!(u.interfaces.len(), 1);
        assert_eq!(u.rx_bytes_per_sec, Some(100.0));
        assert_eq!(u.tx_bytes_per_sec, Some(10.0));
        assert_eq!(usage(None, &[c("eth0", 1)], 1.0).rx_bytes_per_sec, None);
    }
}
