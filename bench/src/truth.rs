//! Benchmark 5: the truth matrix. Real etcd, a real kube-apiserver, the controller and real
//! agents, broken the ways an operator meets at 3 a.m.; for each fault, whether a live node was
//! shown Dead (false Dead), whether a dead node failed to end Dead exactly once (missed Dead), and
//! how long until every MonitorNode showed the truth again.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepulse_crd::v1alpha1::NodeState;
use nodepulse_crd::wire::heartbeat_key;
use testkit::SlowEtcd;

use crate::cluster::{Agent, Cluster, NodeStates, start_controller};
use crate::report::Section;
use crate::{Error, Options, Result, progress};

const TITLE: &str = "5. Truth: faults -> false Dead, missed Dead, time to the true state";
/// Every agent's lease TTL here, in seconds.
const TTL: u32 = 4;
/// Nodes alive through every fault: any Dead of theirs is a false Dead.
const STEADY: [&str; 2] = ["truth-steady-1", "truth-steady-2"];

/// One fault's outcome.
struct Outcome {
    fault: &'static str,
    truth: &'static str,
    false_dead: usize,
    missed_dead: usize,
    /// From the end of the fault (the kill, the server back) to every node in its true state.
    to_truth: Duration,
}

/// Runs every fault on a cluster of its own (etcd gets killed and rebuilt here).
pub async fn run(opts: &Options, start: Instant) -> Section {
    match measure(opts, start).await {
        Ok(section) => section,
        Err(e) => Section::not_measured(TITLE, &e.to_string()),
    }
}

/// The faults, in order; the smoke run stops after the first two.
async fn measure(opts: &Options, start: Instant) -> Result<Section> {
    let mut stage = Stage::start().await?;
    let mut outcomes = Vec::new();
    progress(start, "  agent SIGKILL");
    outcomes.push(stage.agent_killed().await?);
    progress(start, "  heartbeat key deleted by hand");
    outcomes.push(stage.key_deleted().await?);
    if !opts.smoke {
        progress(start, "  agent replaced within the TTL");
        outcomes.push(stage.agent_replaced().await?);
        progress(start, "  agent stopped for good");
        outcomes.push(stage.agent_stopped().await?);
        progress(start, "  etcd writes slower than the TTL");
        outcomes.push(stage.slow_writes().await?);
        progress(start, "  controller SIGKILL and restart");
        outcomes.push(stage.controller_restarted().await?);
        progress(start, "  etcd away longer than the TTL");
        outcomes.push(stage.etcd_away().await?);
        progress(start, "  etcd rebuilt with its data lost");
        outcomes.push(stage.etcd_rebuilt().await?);
    }

    let mut section = Section::new(
        TITLE,
        &[
            "fault",
            "the truth",
            "false Dead",
            "missed Dead",
            "time to the true state",
        ],
    );
    for o in &outcomes {
        section.row(&[
            o.fault.to_string(),
            o.truth.to_string(),
            o.false_dead.to_string(),
            o.missed_dead.to_string(),
            format!("{:.2} s", o.to_truth.as_secs_f64()),
        ]);
    }
    let (false_dead, missed): (usize, usize) = outcomes
        .iter()
        .fold((0, 0), |(f, m), o| (f + o.false_dead, m + o.missed_dead));
    section.setup = format!(
        "One etcd, a real kube-apiserver, the controller and real agents (lease TTL {TTL} s). \
         Two nodes stay alive through every fault: any Dead of theirs counts as false. A \
         node whose agent dies must end Dead exactly once. The time runs from the end of the \
         fault (the kill; etcd or the controller back) until every node involved shows its \
         true state, as a watch on the MonitorNodes saw it."
    );
    section.analysis = format!(
        "Total: {false_dead} false Dead, {missed} missed Dead. A member of a 3-member etcd cut off \
         from its peers (the watches move to a member with a leader) is covered by \
         `controller/tests/partition.rs`, which needs network namespaces: it is not repeated here."
    );
    Ok(section)
}

/// The cluster the faults are staged on, and the steady nodes.
struct Stage {
    cluster: Cluster,
    states: NodeStates,
    steady: Vec<Agent>,
}

impl Stage {
    async fn start() -> Result<Stage> {
        let cluster = Cluster::start().await?;
        let states = NodeStates::watch(cluster.kube.clone());
        let mut steady = Vec::new();
        for node in STEADY {
            steady.push(Agent::start(&cluster.etcd.endpoint, node, TTL).await?);
        }
        let stage = Stage {
            cluster,
            states,
            steady,
        };
        for node in STEADY {
            stage
                .states
                .wait_for(node, NodeState::Alive, Duration::from_secs(60))
                .await?;
        }
        Ok(stage)
    }

    async fn agent(&self, node: &str) -> Result<Agent> {
        let agent = Agent::start(&self.cluster.etcd.endpoint, node, TTL).await?;
        self.states
            .wait_for(node, NodeState::Alive, Duration::from_secs(30))
            .await?;
        Ok(agent)
    }

    /// Dead entries of the steady nodes and of `alive` since `since`.
    fn false_dead(&self, alive: &[&str], since: Instant) -> usize {
        STEADY
            .iter()
            .chain(alive)
            .map(|n| self.states.entries(n, NodeState::Dead, since).len())
            .sum()
    }

    /// 0 when `node` entered Dead exactly once since `since`, else 1.
    fn missed_dead(&self, node: &str, since: Instant) -> usize {
        usize::from(self.states.entries(node, NodeState::Dead, since).len() != 1)
    }

    /// Waits until every steady node is Alive; returns when the last one became so (long ago
    /// if none ever stopped being Alive).
    async fn steady_alive(&self, timeout: Duration) -> Result<Instant> {
        let mut last = None;
        for node in STEADY {
            let at = self
                .states
                .wait_for(node, NodeState::Alive, timeout)
                .await?;
            last = last.max(Some(at));
        }
        Ok(last.expect("STEADY is not empty"))
    }

    async fn agent_killed(&mut self) -> Result<Outcome> {
        let mut agent = self.agent("truth-kill").await?;
        let t0 = Instant::now();
        agent.process.kill_hard();
        let dead = self
            .states
            .wait_for("truth-kill", NodeState::Dead, ttl_plus(10))
            .await?;
        Ok(Outcome {
            fault: "agent SIGKILL (the node dies)",
            truth: "Dead",
            false_dead: self.false_dead(&[], t0),
            missed_dead: self.missed_dead("truth-kill", t0),
            to_truth: dead - t0,
        })
    }

    async fn key_deleted(&mut self) -> Result<Outcome> {
        let node = STEADY[0];
        let mut client = self.cluster.etcd.client().await;
        let t0 = Instant::now();
        client
            .delete(heartbeat_key(node), None)
            .await
            .map_err(|e| Error::Etcd(format!("delete {}: {e}", heartbeat_key(node))))?;
        // The agent puts the key back within a third of the TTL; give the controller the rest.
        let repaired = wait_key(&mut client, node, ttl_plus(5)).await?;
        settle(repaired, Duration::from_secs(2)).await;
        let alive = self.steady_alive(ttl_plus(5)).await?;
        Ok(Outcome {
            fault: "`etcdctl del` of a live node's heartbeat key",
            truth: "Alive",
            false_dead: self.false_dead(&[], t0),
            missed_dead: 0,
            to_truth: alive.saturating_duration_since(t0),
        })
    }

    async fn agent_replaced(&mut self) -> Result<Outcome> {
        let node = "truth-roll";
        let mut old = self.agent(node).await?;
        let t0 = Instant::now();
        old.process.signal(Signal::SIGTERM);
        old.process.wait_exit(Duration::from_secs(10));
        let _new = Agent::start(&self.cluster.etcd.endpoint, node, TTL).await?;
        // The old lease runs out within the TTL of the stop: past that, no Dead can come of it.
        settle(t0, ttl_plus(2)).await;
        let alive = self
            .states
            .wait_for(node, NodeState::Alive, Duration::from_secs(5))
            .await?;
        Ok(Outcome {
            fault: "agent replaced within the TTL (rolling update)",
            truth: "Alive",
            false_dead: self.false_dead(&[node], t0),
            missed_dead: 0,
            to_truth: alive.saturating_duration_since(t0),
        })
    }

    async fn agent_stopped(&mut self) -> Result<Outcome> {
        let node = "truth-stop";
        let mut agent = self.agent(node).await?;
        let t0 = Instant::now();
        agent.process.signal(Signal::SIGTERM);
        agent.process.wait_exit(Duration::from_secs(10));
        let dead = self
            .states
            .wait_for(node, NodeState::Dead, ttl_plus(10))
            .await?;
        Ok(Outcome {
            fault: "agent stopped for good (SIGTERM, not replaced)",
            truth: "Dead",
            false_dead: self.false_dead(&[], t0),
            missed_dead: self.missed_dead(node, t0),
            to_truth: dead - t0,
        })
    }

    async fn slow_writes(&mut self) -> Result<Outcome> {
        let node = "truth-slow";
        let slow = SlowEtcd::start(&self.cluster.etcd.endpoint);
        let agent = Agent::start(&slow.endpoint(), node, TTL).await?;
        self.states
            .wait_for(node, NodeState::Alive, Duration::from_secs(30))
            .await?;
        let t0 = Instant::now();
        slow.set_write_delay(Duration::from_secs(u64::from(TTL) * 2));
        // Three writes held back twice the TTL each, in a row.
        let deadline = Instant::now() + Duration::from_secs(120);
        while slow.writes_held() < 3 {
            if Instant::now() > deadline {
                return Err(Error::Timeout("three held etcd writes in 120 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slow.set_write_delay(Duration::ZERO);
        let alive = self
            .states
            .wait_for(node, NodeState::Alive, Duration::from_secs(5))
            .await?;
        drop(agent);
        Ok(Outcome {
            fault: "etcd writes held back 2 x TTL (a stalled disk), keep-alives on time",
            truth: "Alive",
            false_dead: self.false_dead(&[node], t0),
            missed_dead: 0,
            to_truth: alive.saturating_duration_since(t0),
        })
    }

    async fn controller_restarted(&mut self) -> Result<Outcome> {
        let victim = "truth-ctl-victim";
        let mut agent = self.agent(victim).await?;
        let t0 = Instant::now();
        self.cluster.controller.kill_hard();
        // A node dies while no controller runs.
        agent.process.kill_hard();
        let (controller, metrics) =
            start_controller(&self.cluster.etcd, &self.cluster.apiserver, &[]).await?;
        self.cluster.controller = controller;
        self.cluster.controller_metrics = metrics;
        let back = Instant::now();
        let dead = self
            .states
            .wait_for(victim, NodeState::Dead, Duration::from_secs(60))
            .await?;
        let alive = self.steady_alive(Duration::from_secs(60)).await?;
        Ok(Outcome {
            fault: "controller SIGKILL and restart, a node dying meanwhile",
            truth: "Dead (victim), Alive (others)",
            false_dead: self.false_dead(&[], t0),
            missed_dead: self.missed_dead(victim, t0),
            to_truth: dead.max(alive).saturating_duration_since(back),
        })
    }

    async fn etcd_away(&mut self) -> Result<Outcome> {
        let victim = "truth-outage-victim";
        let mut agent = self.agent(victim).await?;
        let t0 = Instant::now();
        tokio::task::block_in_place(|| self.cluster.etcd.kill());
        // The controller cannot vouch for anyone: Unknown, not a stale Alive.
        for node in STEADY {
            self.states
                .wait_for(node, NodeState::Unknown, ttl_plus(10))
                .await?;
        }
        agent.process.kill_hard();
        tokio::task::block_in_place(|| self.cluster.etcd.restart());
        let back = Instant::now();
        let dead = self
            .states
            .wait_for(victim, NodeState::Dead, ttl_plus(30))
            .await?;
        let alive = self.steady_alive(ttl_plus(30)).await?;
        Ok(Outcome {
            fault: "etcd away longer than the TTL, a node dying meanwhile",
            truth: "Unknown, then Dead (victim), Alive (others)",
            false_dead: self.false_dead(&[], t0),
            missed_dead: self.missed_dead(victim, t0),
            to_truth: dead.max(alive).saturating_duration_since(back),
        })
    }

    async fn etcd_rebuilt(&mut self) -> Result<Outcome> {
        let victim = "truth-rebuilt-victim";
        let mut agent = self.agent(victim).await?;
        let t0 = Instant::now();
        let data_dir = self.cluster.etcd.data_dir().to_path_buf();
        // A node dies with the store: nothing in the new one will say so.
        agent.process.kill_hard();
        tokio::task::block_in_place(|| {
            self.cluster.etcd.kill();
            std::fs::remove_dir_all(&data_dir)
                .map_err(|e| Error::Unexpected(format!("remove {}: {e}", data_dir.display())))?;
            self.cluster.etcd.restart();
            Ok::<_, Error>(())
        })?;
        let back = Instant::now();
        let mut client = self.cluster.etcd.client().await;
        for node in STEADY {
            wait_key(&mut client, node, ttl_plus(10)).await?;
        }
        let alive = self.steady_alive(ttl_plus(20)).await?;
        let dead = self
            .states
            .wait_for(victim, NodeState::Dead, ttl_plus(20))
            .await?;
        // Once every heartbeat is back, a Dead verdict could only come late: give it a TTL.
        settle(Instant::now(), ttl_plus(0)).await;
        Ok(Outcome {
            fault: "etcd rebuilt (data directory lost, restarted empty), a node dead with it",
            truth: "Dead (victim), Alive (others)",
            false_dead: self.false_dead(&[], t0),
            missed_dead: self.missed_dead(victim, t0),
            to_truth: dead.max(alive).saturating_duration_since(back),
        })
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.steady.clear();
    }
}

fn ttl_plus(secs: u64) -> Duration {
    Duration::from_secs(u64::from(TTL) + secs)
}

/// Waits until `since + span`: a window in which a wrong verdict, if one were coming, shows.
async fn settle(since: Instant, span: Duration) {
    tokio::time::sleep_until((since + span).into()).await;
}

/// Waits until `node`'s heartbeat key exists; returns when it was seen.
async fn wait_key(
    client: &mut etcd_client::Client,
    node: &str,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(resp) = client.get(heartbeat_key(node), None).await
            && !resp.kvs().is_empty()
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout(format!(
                "heartbeat key of {node} within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
