//! TCP ports for the servers that cannot be told "port 0".
//!
//! Binding port 0 and reading the real address back is the sound way to get a port, and the
//! project's own binaries do it (`--metrics-addr 127.0.0.1:0`, then the address from their
//! `serving /metrics ... on <addr>` line: [`crate::Process::wait_for_serving_addr`]). Two kinds of
//! server cannot: kube-apiserver refuses `--secure-port=0`, and an etcd that a test SIGKILLs and
//! starts again must come back on the *same* client port, because the agents and controllers
//! under test keep its endpoint. (Peers of an etcd cluster need no port: they talk over unix
//! sockets in the cluster's scratch directory.)
//!
//! "Bind :0, note the number, close it, hand it to the server" (the old `free_port()`) races
//! with everything else that binds on the machine: the kernel hands out that very port again for
//! the next port-0 bind or outgoing connection, and on a busy machine another test's server
//! took it first ("Address already in use"). A [`ReservedPort`] cannot collide:
//!
//! - it is taken *outside* the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`,
//!   usually 32768-60999): the kernel never picks such a port for a port-0 bind or for the local
//!   end of an outgoing connection, so only a process that names it explicitly can bind it;
//! - every process of ours that names a port explicitly first takes an exclusive `flock` on
//!   `/tmp/nodepulse-ports/<port>` and holds it for the server's lifetime (this struct, which the
//!   demo's etcd and kube-apiserver hold too). Concurrent test binaries and demos therefore never
//!   pick the same port, and a lock dies with its holder (the kernel drops it), so a crashed test
//!   leaks nothing;
//! - after taking the lock the port is bound once, to skip one that a foreign program already
//!   listens on.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the reservations live: one file per port, locked while reserved. Fixed (not `$TMPDIR`)
/// so that every process on the machine sees the same reservations.
const LOCK_DIR: &str = "/tmp/nodepulse-ports";

/// The window the reserved ports come from, cut below the ephemeral range. It stays below
/// 30000 (Kubernetes' NodePort range starts there) and above the well-known server ports.
const WINDOW: std::ops::Range<u16> = 20000..30000;

/// A loopback TCP port held for this process until dropped; nothing else of ours can reserve it
/// meanwhile, and the kernel never hands it out by itself.
#[derive(Debug)]
pub struct ReservedPort {
    port: u16,
    _lock: File,
}

impl ReservedPort {
    /// Reserves a port (see the module documentation for why it cannot collide).
    pub fn new() -> ReservedPort {
        let window = window();
        std::fs::create_dir_all(LOCK_DIR).unwrap_or_else(|e| panic!("create {LOCK_DIR}: {e}"));
        // Several users may share the machine: let each create its own lock files.
        let _ = std::fs::set_permissions(LOCK_DIR, std::fs::Permissions::from_mode(0o1777));
        let len = u32::from(window.end - window.start);
        // Start somewhere different in each process, so that concurrent test binaries do not all
        // contend for the first ports of the window.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = (std::process::id().wrapping_mul(7919) ^ nanos) % len;
        for i in 0..len {
            let port = window.start + ((start + i) % len) as u16;
            if let Some(reserved) = try_reserve(port) {
                return reserved;
            }
        }
        panic!(
            "no port left to reserve in {}..{} (every one locked under {LOCK_DIR} or in use)",
            window.start, window.end
        );
    }

    /// The port number.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

fn try_reserve(port: u16) -> Option<ReservedPort> {
    let path = Path::new(LOCK_DIR).join(port.to_string());
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .ok()?;
    // flock(2), the lock `flock -n <file>` takes from a shell.
    lock.try_lock().ok()?;
    // Something outside our reservations may listen there already: skip the port then. Once
    // reserved, nothing of ours and nothing the kernel picks can take it.
    drop(TcpListener::bind(("127.0.0.1", port)).ok()?);
    Some(ReservedPort { port, _lock: lock })
}

/// [`WINDOW`], cut so that it ends below the kernel's ephemeral range.
fn window() -> std::ops::Range<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("read /proc/sys/net/ipv4/ip_local_port_range");
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .expect("parse ip_local_port_range");
    let end = WINDOW.end.min(low);
    assert!(
        end > WINDOW.start + 100,
        "the ephemeral port range starts at {low}: too low to reserve test ports below it in {}..{}",
        WINDOW.start,
        WINDOW.end
    );
    WINDOW.start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_reservations_never_share_a_port_and_sit_below_the_ephemeral_range() {
        let ports: Vec<ReservedPort> = (0..20).map(|_| ReservedPort::new()).collect();
        let mut numbers: Vec<u16> = ports.iter().map(ReservedPort::port).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), 20, "a port was reserved twice: {numbers:?}");
        let w = window();
        assert!(
            numbers.iter().all(|p| w.contains(p)),
            "{numbers:?} outside {w:?}"
        );
    }

    #[test]
    fn a_reserved_port_is_free_again_once_dropped() {
        let first = ReservedPort::new();
        let port = first.port();
        assert!(try_reserve(port).is_none(), "reserved twice while held");
        drop(first);
        assert!(try_reserve(port).is_some(), "still locked after the drop");
    }
}
