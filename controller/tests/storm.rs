//! Many nodes dying at once, though fewer than a mass disruption (a share of the fleet past the
//! controller's brake): every one of them Dead, and their Events summarised instead of one API
//! write each, so that the API server's writes go to the statuses.

use std::time::Duration;

use etcd_client::PutOptions;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use nodepulse_crd::v1alpha1::{MonitorNode, NodeState};
use nodepulse_crd::wire::{HEARTBEAT_TTL_SECONDS, Heartbeat, heartbeat_key};
use testkit::{TestEnv, eventually};

/// Nodes that die together: more than the controller raises an Event each for.
const NODES: usize = 40;

/// Nodes that live on beside them: the dead are 40% of the fleet, below the brake's 55%.
const SURVIVORS: usize = 60;

/// `count` heartbeat keys on leases of their own (`ttl` seconds), as agents write them.
async fn heartbeats(
    etcd: &mut etcd_client::Client,
    prefix: &str,
    count: usize,
    ttl: i64,
) -> Vec<i64> {
    let mut leases = Vec::new();
    for i in 0..count {
        let node = format!("{prefix}{i}");
        let lease = etcd.lease_grant(ttl, None).await.expect("lease").id();
        let hb = Heartbeat::running(&node, ttl as u32, Timestamp::now());
        etcd.put(
            heartbeat_key(&node),
            hb.to_json(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put heartbeat");
        leases.push(lease);
    }
    leases
}

async fn count(api: &Api<MonitorNode>, prefix: &str, state: NodeState) -> usize {
    api.list(&ListParams::default())
        .await
        .expect("list MonitorNodes")
        .items
        .iter()
        .filter(|mn| {
            mn.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(prefix))
        })
        .filter(|mn| mn.status.as_ref().and_then(|s| s.state) == Some(state))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mass_failure_is_every_node_dead_with_its_events_summarised() {
    let (env, etcd) = TestEnv::start().await;
    let mut client = etcd.client().await;
    let prefix = "storm-";
    let leases = heartbeats(&mut client, prefix, NODES, 30).await;
    // The longest TTL an agent may run with: they outlive the test without keep-alives.
    let ttl = i64::from(*HEARTBEAT_TTL_SECONDS.end());
    let _survivors = heartbeats(&mut client, "calm-", SURVIVORS, ttl).await;
    // `STORM_CONTROLLER_BIN` runs another build (one from before Events were summarised fails).
    let _controller = env
        .controller("controller")
        .program_from_env("STORM_CONTROLLER_BIN")
        .args(["--leader-elect=false"])
        .spawn();
    let api: Api<MonitorNode> = Api::all(env.kube.clone());
    eventually("every node Alive", Duration::from_secs(60), || async {
        (count(&api, prefix, NodeState::Alive).await == NODES
            && count(&api, "calm-", NodeState::Alive).await == SURVIVORS)
            .then_some(())
    })
    .await;

    // Every lease revoked at once: the keys go, the nodes are Dead.
    for lease in leases {
        client.lease_revoke(lease).await.expect("revoke");
    }
    eventually("every node Dead", Duration::from_secs(30), || async {
        (count(&api, prefix, NodeState::Dead).await == NODES).then_some(())
    })
    .await;

    // Fewer death Events than deaths, and a summary that counts the rest.
    let events: Api<Event> = Api::namespaced(env.kube.clone(), "default");
    let summary = eventually("a summary Event", Duration::from_secs(20), || async {
        let list = events
            .list(&ListParams::default())
            .await
            .expect("list Events");
        list.items.into_iter().find(|e| {
            e.action.as_deref() == Some("HeartbeatSummary")
                && e.reason.as_deref() == Some("HeartbeatExpired")
        })
    })
    .await;
    let note = summary.note.unwrap_or_default();
    assert!(note.contains("nodes Dead"), "{note}");
    let mut deaths = 0;
    for i in 0..NODES {
        deaths += env.dead_events(&format!("{prefix}{i}")).await;
    }
    assert!(
        deaths < NODES as i32,
        "{deaths} HeartbeatExpired Events for {NODES} deaths: one API write each"
    );
}
