//! The load generator: one process standing in for many agents. Each simulated node holds a lease
//! and a heartbeat key bound to it, keeps the lease alive and rewrites the key's value now and
//! then, exactly as `nodepulse-agent` does on the wire, but without any /proc work.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use etcd_client::{Client, PutOptions};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use nodepulse_crd::wire::{Heartbeat, UsageSummary, heartbeat_key};
use rand::Rng;

use crate::{Error, Result};

/// Flags of the `loadgen` binary.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Simulates many nodepulse agents against one etcd: leases, keep-alives and heartbeat keys"
)]
pub struct LoadgenArgs {
    /// etcd client URL.
    #[arg(
        long,
        env = "LOADGEN_ETCD_ENDPOINT",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoint: String,
    /// How many nodes to simulate.
    #[arg(long, env = "LOADGEN_NODES", default_value_t = 1000)]
    pub nodes: usize,
    /// Index of the first node (two generators can hold disjoint sets).
    #[arg(long, env = "LOADGEN_FIRST", default_value_t = 0)]
    pub first: usize,
    /// Node names are `<prefix><index>`.
    #[arg(long, env = "LOADGEN_PREFIX", default_value = "sim-")]
    pub prefix: String,
    /// Lease TTL, seconds (the agent's --heartbeat-ttl).
    #[arg(long, env = "LOADGEN_TTL_SECONDS", default_value_t = 5)]
    pub ttl_seconds: u32,
    /// Seconds between keep-alives of one lease; default as the agent: a third of the TTL in
    /// whole seconds, at least 1 (so 1 s for a 5 s TTL).
    #[arg(long, env = "LOADGEN_KEEPALIVE_SECONDS")]
    pub keepalive_seconds: Option<u64>,
    /// Seconds between value rewrites of one node's heartbeat key (the agent's floor is 5 s).
    #[arg(long, env = "LOADGEN_REWRITE_SECONDS", default_value_t = 5)]
    pub rewrite_seconds: u64,
    /// gRPC connections to spread the nodes over.
    #[arg(long, env = "LOADGEN_CONNECTIONS", default_value_t = 8)]
    pub connections: usize,
    /// Leases granted and keys written at once while starting.
    #[arg(long, env = "LOADGEN_SETUP_CONCURRENCY", default_value_t = 256)]
    pub setup_concurrency: usize,
}

/// What the generator did, for its periodic report line.
#[derive(Default)]
struct Counters {
    keepalives: AtomicU64,
    puts: AtomicU64,
    lost: AtomicU64,
    errors: AtomicU64,
}

/// Runs until killed: sets every node up, prints `loadgen ready: N nodes`, then keeps them alive
/// and prints one rate line every 10 s.
pub async fn run(args: LoadgenArgs) -> Result<()> {
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(
            Client::connect([&args.etcd_endpoint], None)
                .await
                .map_err(|e| Error::Etcd(format!("connect {}: {e}", args.etcd_endpoint)))?,
        );
    }
    let counters = Arc::new(Counters::default());
    let started_at = Timestamp::now();

    // Set up: grant, put, open the keep-alive stream, bounded in concurrency.
    let indexes: Vec<usize> = (args.first..args.first + args.nodes).collect();
    let setups = futures::stream::iter(indexes.into_iter().map(|i| {
        let client = clients[i % clients.len()].clone();
        let args = args.clone();
        async move { SimulatedNode::start(client, &args, i, started_at).await }
    }))
    .buffer_unordered(args.setup_concurrency.max(1));
    let nodes: Vec<SimulatedNode> = setups
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    println!("loadgen ready: {} nodes", nodes.len());

    // The agent renews every TTL/3 (in milliseconds).
    let period = args.keepalive_seconds.map_or(
        Duration::from_millis(u64::from(args.ttl_seconds) * 1000 / 3),
        |s| Duration::from_secs(s.max(1)),
    );
    let rewrite_every = (args.rewrite_seconds as f64 / period.as_secs_f64())
        .round()
        .max(1.0) as u64;
    for node in nodes {
        let counters = counters.clone();
        tokio::spawn(node.keep_alive(period, rewrite_every, args.ttl_seconds, counters));
    }

    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.tick().await;
    let (mut ka, mut puts) = (0, 0);
    loop {
        ticker.tick().await;
        let (ka2, puts2) = (
            counters.keepalives.load(Ordering::Relaxed),
            counters.puts.load(Ordering::Relaxed),
        );
        println!(
            "loadgen: {:.0} keep-alives/s, {:.0} puts/s, leases lost so far: {}, errors: {}",
            (ka2 - ka) as f64 / 10.0,
            (puts2 - puts) as f64 / 10.0,
            counters.lost.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed)
        );
        (ka, puts) = (ka2, puts2);
    }
}

/// One simulated agent's etcd state.
struct SimulatedNode {
    client: Client,
    node: String,
    key: String,
    lease: i64,
    keeper: etcd_client::LeaseKeeper,
    responses: etcd_client::LeaseKeepAliveStream,
    heartbeat: Heartbeat,
}

impl SimulatedNode {
    async fn start(
        client: Client,
        args: &LoadgenArgs,
        index: usize,
        started_at: Timestamp,
    ) -> Result<SimulatedNode> {
        let node = format!("{}{index}", args.prefix);
        let heartbeat = Heartbeat {
            agent_version: format!("loadgen-{}", env!("CARGO_PKG_VERSION")),
            updated_at: Timestamp::now(),
            usage: Some(random_usage()),
            ..Heartbeat::running(&node, args.ttl_seconds, started_at)
        };
        let mut client = client;
        let key = heartbeat_key(&node);
        let (lease, keeper, responses) =
            establish(&mut client, &key, &heartbeat, args.ttl_seconds).await?;
        Ok(SimulatedNode {
            client,
            node,
            key,
            lease,
            keeper,
            responses,
            heartbeat,
        })
    }

    /// Renews the lease every `period` and rewrites the value every `rewrite_every` renewals,
    /// starting at a random phase so the load is spread evenly. A lease that is lost (expired
    /// while this process was starved, or a stream that broke) is replaced by a new one and the
    /// key written again, as the agent does.
    async fn keep_alive(
        mut self,
        period: Duration,
        rewrite_every: u64,
        ttl_seconds: u32,
        counters: Arc<Counters>,
    ) {
        let phase = rand::rng().random_range(0..period.as_millis().max(1) as u64);
        let mut tick: u64 = rand::rng().random_range(0..rewrite_every);
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let answer_within = Duration::from_secs(u64::from(ttl_seconds));
        loop {
            ticker.tick().await;
            tick += 1;
            let renewed = match self.keeper.keep_alive().await {
                Ok(()) => matches!(
                    tokio::time::timeout(answer_within, self.responses.message()).await,
                    Ok(Ok(Some(r))) if r.ttl() > 0
                ),
                Err(_) => false,
            };
            if renewed {
                counters.keepalives.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.lost.fetch_add(1, Ordering::Relaxed);
                match establish(&mut self.client, &self.key, &self.heartbeat, ttl_seconds).await {
                    Ok((lease, keeper, responses)) => {
                        (self.lease, self.keeper, self.responses) = (lease, keeper, responses);
                    }
                    Err(e) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("loadgen: {}: {e}", self.node);
                    }
                }
                continue;
            }
            if tick.is_multiple_of(rewrite_every) {
                self.heartbeat.updated_at = Timestamp::now();
                self.heartbeat.usage = Some(random_usage());
                let put = self
                    .client
                    .put(
                        self.key.as_str(),
                        self.heartbeat.to_json(),
                        Some(PutOptions::new().with_lease(self.lease)),
                    )
                    .await;
                match put {
                    Ok(_) => counters.puts.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }
    }
}

/// Grants a lease, writes the heartbeat key on it and opens its keep-alive stream.
async fn establish(
    client: &mut Client,
    key: &str,
    heartbeat: &Heartbeat,
    ttl_seconds: u32,
) -> Result<(
    i64,
    etcd_client::LeaseKeeper,
    etcd_client::LeaseKeepAliveStream,
)> {
    let lease = client
        .lease_grant(i64::from(ttl_seconds), None)
        .await
        .map_err(|e| Error::Etcd(format!("grant lease for {key}: {e}")))?
        .id();
    client
        .put(
            key,
            heartbeat.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| Error::Etcd(format!("put {key}: {e}")))?;
    let (keeper, responses) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| Error::Etcd(format!("keep-alive stream for {key}: {e}")))?;
    Ok((lease, keeper, responses))
}

/// Plausible usage figures, rounded to one decimal as the agent reports them, so that each
/// rewrite carries a real change.
fn random_usage() -> UsageSummary {
    let mut rng = rand::rng();
    let mut pct = |lo: f64, hi: f64| (rng.random_range(lo..hi) * 10.0_f64).round() / 10.0;
    UsageSummary {
        cpu_percent: Some(pct(1.0, 60.0)),
        memory_percent: Some(pct(20.0, 80.0)),
        disk_percent: Some(pct(30.0, 70.0)),
        load1: Some(pct(0.0, 4.0)),
    }
}
