//! `network`: per-interface rx/tx bytes, packets and errors from `/proc/net/dev` (loopback
//! left out).

use procfs::FromBufRead;
use procfs::net::InterfaceDeviceStatus;

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

/// Parses the text of `/proc/net/dev`, loopback left out, sorted by name.
pub fn parse_net_dev(text: &str) -> Result<Vec<InterfaceCounters>, procfs::ProcError> {
    // Older kernels printed "%6s:%8lu", so once an interface had received 100 MB its byte count
    // touched the colon ("eth0:123456789") and a whitespace split sees one field too few.
    // Interface names cannot contain ':', so splitting at the first one is always right.
    let mut fixed = String::with_capacity(text.len() + 64);
    for (i, line) in text.lines().enumerate() {
        match line.split_once(':') {
            Some((name, rest)) if i >= 2 => {
                fixed.push_str(name);
                fixed.push_str(": ");
                fixed.push_str(rest);
            }
            _ => fixed.push_str(line),
        }
        fixed.push('\n');
    }
    let parsed = InterfaceDeviceStatus::from_buf_read(fixed.as_bytes())?;
    let mut out: Vec<InterfaceCounters> = parsed
        .0
        .into_values()
        .filter(|d| d.name != "lo")
        .map(|d| InterfaceCounters {
            name: d.name,
            rx_bytes: d.recv_bytes,
            tx_bytes: d.sent_bytes,
            rx_packets: d.recv_packets,
            tx_packets: d.sent_packets,
            rx_errors: d.recv_errs,
            tx_errors: d.sent_errs,
        })
        .collect();
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
    fn loopback_is_left_out_and_big_counters_touching_the_colon_parse() {
        let text = format!(
            "{HEADER}    lo: 1000 10 0 0 0 0 0 0 1000 10 0 0 0 0 0 0\n  \
             eth0:123456789012 900 1 0 0 0 0 0 5000 40 2 0 0 0 0 0\n"
        );
        let n = parse_net_dev(&text).unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].name, "eth0");
        assert_eq!(n[0].rx_bytes, 123_456_789_012);
        assert_eq!(n[0].rx_errors, 1);
        assert_eq!(n[0].tx_errors, 2);
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
