//! The nodes the controller knows about: Node objects (for their labels, uids and planned work)
//! and MonitorNode objects, each kept by a kube-runtime reflector, with a signal when the set of
//! nodes, a node's labels or its planned work changes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Client, ResourceExt};
use nodepulse_crd::v1alpha1::{Maintenance, MonitorNode};
use tokio::sync::{Notify, watch as signal};

use crate::error::{Error, Result};

/// The well-known label naming a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A node's labels (empty for a node that has a MonitorNode but no Node object).
pub type Labels = BTreeMap<String, String>;

/// The taint the cluster autoscaler puts on a node it is removing.
pub const SCALE_DOWN_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The planned work a Node object shows, if any: cordoned (`spec.unschedulable`, which `kubectl
/// cordon` and `drain` set), or being removed by the cluster autoscaler (its taint).
pub fn maintenance_of(node: &Node) -> Option<Maintenance> {
    let spec = node.spec.as_ref()?;
    let scale_down = spec
        .taints
        .iter()
        .flatten()
        .any(|t| t.key == SCALE_DOWN_TAINT);
    if scale_down {
        Some(Maintenance::ScaleDown)
    } else if spec.unschedulable == Some(true) {
        Some(Maintenance::Cordoned)
    } else {
        None
    }
}

/// Whether a reflector's store holds a full list, for any number of waiters.
///
/// kube-runtime's `Store::wait_until_ready` wakes only the last of several tasks waiting at the
/// same time (one oneshot receiver, one waker): the others wait forever. That stalled the
/// MonitorConfig reconciler beside the config key sync after a leader takeover, so every wait
/// goes through one task per store and a watch channel instead.
#[derive(Clone)]
pub struct StoreReady(signal::Receiver<bool>);

impl StoreReady {
    /// Starts the one task that waits on `store`; it ends with the store's writer.
    pub fn of<K>(store: Store<K>) -> Self
    where
        K: kube::Resource + Clone + Send + Sync + 'static,
        K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
    {
        let (ready, rx) = signal::channel(false);
        tokio::spawn(async move {
            if store.wait_until_ready().await.is_ok() {
                let _ = ready.send(true);
            }
        });
        StoreReady(rx)
    }

    /// Whether the store holds a full list now.
    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the store is ready; `Err` when its writer went away first.
    pub async fn wait(&self) -> std::result::Result<(), ()> {
        let mut rx = self.0.clone();
        rx.wait_for(|ready| *ready)
            .await
            .map(|_| ())
            .map_err(|_| ())
    }
}

/// Readiness told by whoever sees the store's first list end (the reflector stream's
/// `InitDone`), for a store that something else already waits on.
impl From<signal::Receiver<bool>> for StoreReady {
    fn from(ready: signal::Receiver<bool>) -> Self {
        StoreReady(ready)
    }
}

/// Read access to the Node and MonitorNode caches.
#[derive(Clone)]
pub struct Inventory {
    nodes: Store<Node>,
    monitor_nodes: Store<PartialObjectMeta<MonitorNode>>,
    nodes_ready: StoreReady,
    monitor_nodes_ready: StoreReady,
    changed: Arc<Notify>,
    /// The same signal for any number of listeners: a counter of changes.
    changes: Arc<signal::Sender<u64>>,
}

/// The tasks that keep an [`Inventory`] filled; run them for as long as it is used.
pub struct InventoryDrivers {
    node_events: std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>,
    monitor_node_events: std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>,
}

impl Inventory {
    /// Creates the caches; nothing is listed until the drivers run.
    pub fn new(client: &Client) -> (Inventory, InventoryDrivers) {
        let (nodes, node_writer) = reflector::store();
        let (monitor_nodes, mn_writer) = reflector::store();
        let inventory = Inventory {
            nodes_ready: StoreReady::of(nodes.clone()),
            monitor_nodes_ready: StoreReady::of(monitor_nodes.clone()),
            nodes,
            monitor_nodes,
            changed: Arc::new(Notify::new()),
            changes: Arc::new(signal::channel(0).0),
        };
        // The caches keep names, labels, uids and owners, and of a Node what says planned work
        // (unschedulable, taints); managed fields (a tree of every field each writer set, larger
        // than the rest of the metadata), a Node's status (its images alone are kilobytes) and
        // annotations would multiply their size.
        let node_stream = reflector::reflector(
            node_writer,
            watch(Api::<Node>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .modify(|node| {
                    node.managed_fields_mut().clear();
                    node.annotations_mut().clear();
                    node.status = None;
                    if let Some(spec) = node.spec.as_mut() {
                        let (unschedulable, taints) = (spec.unschedulable, spec.taints.take());
                        *spec = Default::default();
                        spec.unschedulable = unschedulable;
                        spec.taints = taints;
                    }
                }),
        );
        let mn_stream = reflector::reflector(
            mn_writer,
            watch(
                Api::<PartialObjectMeta<MonitorNode>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .modify(|mn| mn.managed_fields_mut().clear()),
        );
        let drivers = InventoryDrivers {
            node_events: changes(node_stream, "Node", inventory.clone(), |n: &Node| {
                (n.labels().clone(), maintenance_of(n))
            })
            .boxed(),
            monitor_node_events: changes(mn_stream, "MonitorNode", inventory.clone(), |mn| {
                mn.labels().clone()
            })
            .boxed(),
        };
        (inventory, drivers)
    }

    /// Waits until both caches hold a full list.
    pub async fn wait_until_ready(&self) -> Result<()> {
        self.nodes_ready
            .wait()
            .await
            .map_err(|_| Error::CacheNeverReady("Node"))?;
        self.monitor_nodes_ready
            .wait()
            .await
            .map_err(|_| Error::CacheNeverReady("MonitorNode"))
    }

    /// Whether both caches hold a full list now.
    pub fn is_ready(&self) -> bool {
        self.nodes_ready.is_ready() && self.monitor_nodes_ready.is_ready()
    }

    /// The MonitorNodes that have no Node object of their name.
    pub fn monitor_nodes_without_node(&self) -> HashSet<String> {
        self.monitor_nodes
            .state()
            .iter()
            .map(|mn| mn.name_any())
            .filter(|name| self.node(name).is_none())
            .collect()
    }

    /// Every node the controller knows, with its labels: Node objects, plus MonitorNodes
    /// without a Node object (which have no labels).
    pub fn nodes(&self) -> BTreeMap<String, Labels> {
        let mut out: BTreeMap<String, Labels> = self
            .monitor_nodes
            .state()
            .iter()
            .map(|mn| (mn.name_any(), Labels::new()))
            .collect();
        for node in self.nodes.state() {
            out.insert(node.name_any(), node.labels().clone());
        }
        out
    }

    /// The names of the Node objects in the cache.
    pub fn node_names(&self) -> impl Iterator<Item = String> + use<> {
        self.nodes.state().into_iter().map(|n| n.name_any())
    }

    /// Each Node object's zone (its `topology.kubernetes.io/zone` label; empty without one).
    pub fn node_zones(&self) -> BTreeMap<String, String> {
        self.nodes
            .state()
            .iter()
            .map(|n| {
                let zone = n.labels().get(ZONE_LABEL).cloned().unwrap_or_default();
                (n.name_any(), zone)
            })
            .collect()
    }

    /// A receiver that sees every change [`Inventory::changed`] signals, for a listener of its
    /// own (that one wakes a single waiter).
    pub fn watch_changes(&self) -> signal::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The Node object named `name`, if the cache has one (metadata, unschedulable and taints).
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectRef::new(name))
    }

    /// The planned work on node `name`, as its Node object shows it.
    pub fn maintenance(&self, name: &str) -> Option<Maintenance> {
        self.node(name).and_then(|n| maintenance_of(&n))
    }

    /// The MonitorNode named `name`, if the cache has one.
    pub fn monitor_node(&self, name: &str) -> Option<Arc<PartialObjectMeta<MonitorNode>>> {
        self.monitor_nodes.get(&ObjectRef::new(name))
    }

    /// Resolves when a node appeared or went away, or a Node's labels or planned work changed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn notify(&self) {
        // One stored permit: a change between two waits is not lost.
        self.changed.notify_one();
        self.changes.send_modify(|n| *n += 1);
    }
}

impl InventoryDrivers {
    /// Runs both watches until the process ends.
    pub async fn run(self) {
        let nodes = self.node_events.for_each(|()| async {});
        let monitor_nodes = self.monitor_node_events.for_each(|()| async {});
        futures::join!(nodes, monitor_nodes);
    }
}

/// Passes a reflector's events through, notifying the inventory when the set of names or what
/// `seen` takes of an object changed (a Node's status updates, which are frequent, change
/// neither).
fn changes<K, T>(
    stream: impl Stream<Item = watcher::Result<Event<K>>> + Send + 'static,
    kind: &'static str,
    inventory: Inventory,
    seen: impl Fn(&K) -> T + Send + 'static,
) -> impl Stream<Item = ()> + Send
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    T: PartialEq + Clone + Send + 'static,
{
    let mut known: HashMap<String, T> = HashMap::new();
    let mut relisted: HashMap<String, T> = HashMap::new();
    stream.then(move |event| {
        let changed = match event {
            Ok(Event::Apply(obj)) => {
                let now = seen(&obj);
                known.insert(obj.name_any(), now.clone()) != Some(now)
            }
            Ok(Event::Delete(obj)) => known.remove(&obj.name_any()).is_some(),
            Ok(Event::Init) => {
                relisted.clear();
                false
            }
            Ok(Event::InitApply(obj)) => {
                relisted.insert(obj.name_any(), seen(&obj));
                false
            }
            Ok(Event::InitDone) => {
                let changed = relisted != known;
                known = std::mem::take(&mut relisted);
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "watch {kind}s failed; retrying with backoff");
                false
            }
        };
        if changed {
            inventory.notify();
        }
        futures::future::ready(())
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};

    use super::*;

    fn node(unschedulable: Option<bool>, taints: &[&str]) -> Node {
        Node {
            spec: Some(NodeSpec {
                unschedulable,
                taints: Some(
                    taints
                        .iter()
                        .map(|key| Taint {
                            key: key.to_string(),
                            effect: "NoSchedule".into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn planned_work_is_read_from_the_node_spec() {
        assert_eq!(maintenance_of(&Node::default()), None);
        assert_eq!(maintenance_of(&node(Some(false), &[])), None);
        assert_eq!(
            maintenance_of(&node(Some(true), &["node.kubernetes.io/unschedulable"])),
            Some(Maintenance::Cordoned)
        );
        // The autoscaler cordons too; its taint says more.
        assert_eq!(
            maintenance_of(&node(Some(true), &[SCALE_DOWN_TAINT])),
            Some(Maintenance::ScaleDown)
        );
        assert_eq!(
            maintenance_of(&node(None, &["dedicated", SCALE_DOWN_TAINT])),
            Some(Maintenance::ScaleDown)
        );
    }
}
