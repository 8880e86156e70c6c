//! A member cut off from its cluster must not serve a silent watch.
//!
//! Three real etcd members, each in its own network namespace made by this test (`ip netns
//! add`), their peer traffic over veth pairs joined by a bridge in a fourth namespace of ours
//! (addresses 10.77.0.0/24 exist only inside these namespaces). Each member serves its clients
//! on a unix socket, which the test relays to a loopback port of its own (port 0, bound by the
//! test): clients and the API server stay on the host's loopback, and cutting a member's link
//! cuts its peers only. Nothing on the host's network (addresses, links, iptables) is touched.
//!
//! The controller's and the agents' watches start on member 2 (the other two relays refuse
//! connections until then); member 2 is then cut off from the other two, which keep quorum. A
//! watch on member 2 without `require_leader` stays open and delivers nothing; with it, etcd
//! cancels it once the member has had no leader for a few election timeouts, and the clients
//! move to a member with a leader: a config change made meanwhile reaches the agent, and a node
//! whose agent is killed meanwhile ends Dead on time, the survivor never Dead.
//!
//! Needs root (network namespaces): `ip netns add` fails otherwise, and says so.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_crd::wire::config_key;
use testkit::{Process, TestEnv, eventually, http_get, scratch_dir, wait_until};

/// Heartbeat TTL of the agents, in seconds.
const TTL: u64 = 8;

/// Runs `ip <args>`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this test, deleted on drop.
struct Netns(String);

impl Netns {
    fn add(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A loopback TCP port of the test that forwards each connection to a unix socket, and can
/// refuse connections (accept and close at once) until opened.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    forwarded: Arc<AtomicUsize>,
}

impl Relay {
    fn start(socket: PathBuf, open: bool) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a relay port");
        let addr = listener.local_addr().expect("relay address");
        let open = Arc::new(AtomicBool::new(open));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let (is_open, count) = (open.clone(), forwarded.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(tcp) = conn else { continue };
                if !is_open.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(unix) = UnixStream::connect(&socket) else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                pipe(tcp, unix);
            }
        });
        Relay {
            addr,
            open,
            forwarded,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies both ways between a TCP and a unix stream until either side closes.
fn pipe(tcp: TcpStream, unix: UnixStream) {
    fn copy(mut from: impl Read, mut to: impl Write) {
        let mut buf = [0u8; 16384];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
    let (Ok(tcp_in), Ok(unix_in)) = (tcp.try_clone(), unix.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        copy(tcp_in, &unix);
        let _ = unix.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        copy(unix_in, &tcp);
        let _ = tcp.shutdown(std::net::Shutdown::Both);
    });
}

/// Three etcd members in namespaces of their own, peers over a bridge, clients over relays.
struct NetnsEtcdCluster {
    members: Vec<Option<Process>>,
    relays: Vec<Relay>,
    member_ns: Vec<Netns>,
    _bridge: Netns,
    /// The members' directories (a `tempfile::TempDir`, removed on drop).
    _dir: Box<dyn std::any::Any + Send>,
}

impl NetnsEtcdCluster {
    /// Starts the members; only member `first`'s relay accepts clients until [`open_all`].
    fn start(first: usize) -> NetnsEtcdCluster {
        let tag = format!("np16p{}", std::process::id());
        let bridge = Netns::add(format!("{tag}-br"));
        ip(&["-n", &bridge.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge.0, "link", "set", "br0", "up"]);
        let dir = scratch_dir("etcd-netns");
        let peer = |i: usize| format!("http://10.77.0.{}:2380", i + 1);
        let initial: Vec<String> = (0..3).map(|i| format!("m{i}={}", peer(i))).collect();
        let mut member_ns = Vec::new();
        let mut members = Vec::new();
        let mut relays = Vec::new();
        for i in 0..3 {
            let ns = Netns::add(format!("{tag}-m{i}"));
            let port = format!("v{i}");
            ip(&[
                "-n", &ns.0, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &bridge.0,
            ]);
            ip(&[
                "-n",
                &ns.0,
                "addr",
                "add",
                &format!("10.77.0.{}/24", i + 1),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
            ip(&["-n", &bridge.0, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &bridge.0, "link", "set", &port, "up"]);
            let home = dir.path().join(format!("m{i}"));
            std::fs::create_dir_all(&home).expect("member directory");
            let mut cmd = Command::new("ip");
            cmd.current_dir(&home)
                .args(["netns", "exec", &ns.0])
                .arg(testkit::tool("etcd"))
                .args(["--name", &format!("m{i}")])
                .args(["--data-dir", "data"])
                // A unix socket in the member's directory (etcd wants `unix://<host>:<port>`).
                .args(["--listen-client-urls", "unix://client:1"])
                .args(["--advertise-client-urls", "unix://client:1"])
                .args(["--listen-peer-urls", &peer(i)])
                .args(["--initial-advertise-peer-urls", &peer(i)])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-token", &tag])
                // Fast elections, so that "no leader" shows within seconds.
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--log-level", "warn", "--unsafe-no-fsync"]);
            members.push(Some(Process::spawn(&format!("etcd-m{i}"), cmd)));
            relays.push(Relay::start(home.join("client:1"), i == first));
            member_ns.push(ns);
        }
        let env = NetnsEtcdCluster {
            members,
            relays,
            member_ns,
            _bridge: bridge,
            _dir: Box::new(dir),
        };
        let health = env.relays[first].addr.to_string();
        wait_until(
            "the netns etcd cluster healthy",
            Duration::from_secs(30),
            || {
                http_get(&health, "/health").is_some_and(|(status, body)| {
                    status == 200 && body.contains("\"health\":\"true\"")
                })
            },
        );
        env
    }

    fn endpoints(&self) -> String {
        let all: Vec<String> = self.relays.iter().map(Relay::endpoint).collect();
        all.join(",")
    }

    fn open_all(&self) {
        for r in &self.relays {
            r.open.store(true, Ordering::SeqCst);
        }
    }

    /// Cuts member `i`'s peer link: its clients still reach it, its peers do not.
    fn cut_off(&self, i: usize) {
        ip(&["-n", &self.member_ns[i].0, "link", "set", "eth0", "down"]);
    }
}

impl Drop for NetnsEtcdCluster {
    fn drop(&mut self) {
        // The servers go before their namespaces.
        for m in &mut self.members {
            if let Some(mut p) = m.take() {
                p.kill_hard();
            }
        }
    }
}

/// `TRUTH_AGENT_BIN` / `TRUTH_CONTROLLER_BIN` run other builds (e.g. from before a fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_on_a_member_cut_off_from_its_peers_move_to_one_with_a_leader() {
    const CUT: usize = 2;
    let members = tokio::task::spawn_blocking(|| NetnsEtcdCluster::start(CUT))
        .await
        .expect("start the etcd members");
    let env = TestEnv::shared(&members.endpoints()).await;
    let controller = env
        .controller("partition")
        .program_from_env("TRUTH_CONTROLLER_BIN")
        .args(["--leader-elect=false", "--usage-write-interval", "5s"])
        .spawn();
    let agent = |node: &str| {
        env.agent(node)
            .program_from_env("TRUTH_AGENT_BIN")
            .ttl(TTL)
            .args(["--heartbeat-min-interval", "500ms"])
            .spawn()
    };
    let live = agent("part-live");
    let mut dies = agent("part-dies");
    for node in ["part-live", "part-dies"] {
        env.wait_state(node, NodeState::Alive, Duration::from_secs(60))
            .await;
    }
    // Everything is attached to member 2 now; let clients reach the others too (a client
    // connects to them when it needs them: when member 2 fails its streams).
    members.open_all();
    let (live_mark, controller_mark) = (live.line_count(), controller.line_count());

    // The partition; a node dies on the majority side meanwhile.
    members.cut_off(CUT);
    let cut = Instant::now();
    dies.kill_hard();
    let killed = Instant::now();

    // A config change written to the majority reaches the agent whose watch was on member 2.
    let etcd = etcd_client::Client::connect([members.relays[0].endpoint()], None)
        .await
        .expect("connect to member 0");
    let value = serde_json::json!({"interval": 3, "metrics": ["cpu"]}).to_string();
    eventually(
        "the majority to take a config",
        Duration::from_secs(15),
        || {
            let mut etcd = etcd.clone();
            let value = value.clone();
            async move {
                let put = etcd.put(config_key("part-live"), value, None);
                tokio::time::timeout(Duration::from_secs(2), put)
                    .await
                    .ok()?
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await;
    tokio::task::block_in_place(|| {
        live.wait_for_line_from(
            live_mark,
            Duration::from_secs(20).saturating_sub(cut.elapsed()),
            "config -> 3s through a member with a leader",
            |l| l.contains("config updated:") && l.contains("-> 3s"),
        )
    });
    println!("config applied {:?} after the cut", cut.elapsed());

    // The node killed on the majority side ends Dead on time: TTL plus the move.
    env.wait_state(
        "part-dies",
        NodeState::Dead,
        Duration::from_secs(TTL + 8).saturating_sub(killed.elapsed()),
    )
    .await;
    println!(
        "part-dies Dead {:?} after its agent's SIGKILL (TTL {TTL}s)",
        killed.elapsed()
    );
    // Another TTL: the survivor keeps its lease through the move (no false Dead).
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    let s = env.status("part-live").await.expect("part-live status");
    assert_eq!(s.state, Some(NodeState::Alive), "{s:?}");
    assert_eq!(env.dead_events("part-live").await, 0);
    assert_eq!(env.dead_events("part-dies").await, 1);
    let forwarded: Vec<usize> = members
        .relays
        .iter()
        .map(|r| r.forwarded.load(Ordering::SeqCst))
        .collect();
    println!("connections forwarded to members 0, 1, 2: {forwarded:?}");
    assert!(forwarded[0] + forwarded[1] > 0, "{forwarded:?}");
    let moved = controller.lines()[controller_mark..]
        .iter()
        .any(|l| l.text.contains("heartbeat watch interrupted"));
    assert!(
        moved,
        "the controller's watch should have left member 2:\n{}",
        controller.output_text()
    );
}
