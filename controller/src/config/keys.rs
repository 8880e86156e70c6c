//! Writes `/monitor/config/<node>` from the MonitorConfigs: each node's key holds the value of
//! the MonitorConfig that wins it, written only when it changes, and only over keys the
//! controller owns (`managedBy: nodepulse-controller`); keys written by hand are never touched.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use futures::channel::mpsc;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use nodepulse_crd::v1alpha1::MonitorConfig;
use nodepulse_crd::wire::{CONFIG_PREFIX, ConfigValue, config_key, node_of_config_key};
use nodepulse_etcd::list_prefix;
use nodepulse_etcd::watch::{EtcdWatcher, WatchEvent, WatcherSettings};
use nodepulse_runtime::Backoff;
use tokio::sync::{Mutex, Notify, watch};

use crate::config::DesiredConfigs;
use crate::config::selection::{CompiledConfig, same_value, winners};
use crate::error::{Error, Result};
use crate::inventory::{Inventory, StoreReady};
use crate::metrics::Metrics;

/// What one sync did for one MonitorConfig, for its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigReport {
    /// Nodes it selects.
    pub matched: u32,
    /// Nodes it wins whose key holds its value.
    pub applied: u32,
    /// Why the spec cannot be applied at all.
    pub invalid: Option<String>,
    /// Names in `spec.nodeNames` that are neither a Node nor a MonitorNode (yet).
    pub unknown_nodes: Vec<String>,
    /// Nodes it wins whose key was written by hand, so the controller leaves it alone.
    pub blocked: Vec<String>,
    /// Nodes whose key could not be written.
    pub failed: Vec<String>,
}

/// The outcome of one sync, per MonitorConfig name.
pub type SyncReport = BTreeMap<String, ConfigReport>;

/// A config key as etcd holds it.
enum CurrentKey {
    /// Written by the controller.
    Managed(ConfigValue, i64),
    /// Written by someone else (or not a valid config at all): not ours to touch.
    Unmanaged(Option<ConfigValue>),
}

/// Computes and writes the config keys. One sync at a time.
pub struct ConfigKeys {
    etcd: Client,
    inventory: Inventory,
    configs: Store<MonitorConfig>,
    configs_ready: StoreReady,
    metrics: Arc<Metrics>,
    /// The value the controller last wrote per node, to tell a hand edit from a spec change.
    written: Mutex<HashMap<String, ConfigValue>>,
    desired: watch::Sender<DesiredConfigs>,
    keys_changed: Notify,
}

impl ConfigKeys {
    /// A syncer over the MonitorConfig cache `configs` and the nodes in `inventory`,
    /// publishing each node's desired config on `desired`.
    pub fn new(
        etcd: Client,
        inventory: Inventory,
        configs: Store<MonitorConfig>,
        configs_ready: StoreReady,
        metrics: Arc<Metrics>,
        desired: watch::Sender<DesiredConfigs>,
    ) -> Self {
        ConfigKeys {
            etcd,
            inventory,
            configs_ready,
            configs,
            metrics,
            written: Mutex::new(HashMap::new()),
            desired,
            keys_changed: Notify::new(),
        }
    }

    /// Brings every config key in line with the MonitorConfigs (leaving out `excluding`, a
    /// MonitorConfig being deleted) and reports what it did for each MonitorConfig.
    pub async fn sync(&self, excluding: Option<&str>) -> Result<SyncReport> {
        // A sync over half-filled caches would delete the keys of nodes it has not seen yet.
        self.configs_ready
            .wait()
            .await
            .map_err(|_| Error::CacheNeverReady("MonitorConfig"))?;
        self.inventory.wait_until_ready().await?;
        let mut written = self.written.lock().await;

        let mut report = SyncReport::new();
        let mut compiled = Vec::new();
        for mc in self.configs.state() {
            let name = mc.name_any();
            if mc.metadata.deletion_timestamp.is_some() || Some(name.as_str()) == excluding {
                continue;
            }
            match CompiledConfig::compile(&mc) {
                Ok(c) => compiled.push(c),
                Err(why) => {
                    report.entry(name).or_default().invalid = Some(why);
                }
            }
        }
        let nodes = self.inventory.nodes();
        for c in &compiled {
            let entry = report.entry(c.name.clone()).or_default();
            entry.matched = nodes.iter().filter(|(n, l)| c.selects(n, l)).count() as u32;
            entry.unknown_nodes = c
                .node_names()
                .filter(|n| !nodes.contains_key(*n))
                .cloned()
                .collect();
        }
        let winners = winners(&compiled, &nodes);
        let current = self.current_keys().await?;

        let mut desired = BTreeMap::new();
        let all: BTreeSet<&String> = winners.keys().chain(current.keys()).collect();
        for node in all {
            let key = config_key(node);
            let want = winners.get(node.as_str());
            match (want, current.get(node.as_str())) {
                (Some(c), Some(CurrentKey::Unmanaged(_))) => {
                    report
                        .entry(c.name.clone())
                        .or_default()
                        .blocked
                        .push(node.clone());
                }
                (Some(c), Some(CurrentKey::Managed(value, _))) if same_value(value, &c.value) => {
                    report.entry(c.name.clone()).or_default().applied += 1;
                    written.insert(node.clone(), value.clone());
                }
                (Some(c), existing) => {
                    let expect = match existing {
                        Some(CurrentKey::Managed(value, rev)) => {
                            if written.get(node.as_str()).is_some_and(|w| w != value) {
                                tracing::warn!(
                                    node = %node,
                                    "config key {key} was changed by hand; restoring the value of MonitorConfig {}",
                                    c.name
                                );
                            }
                            Some(*rev)
                        }
                        _ => None,
                    };
                    let entry = report.entry(c.name.clone()).or_default();
                    match self.put(&key, &c.value, expect).await {
                        Ok(true) => {
                            entry.applied += 1;
                            written.insert(node.clone(), c.value.clone());
                            tracing::info!(
                                node = %node,
                                "config {key} set to every {}s, metrics {}, from MonitorConfig {} (generation {})",
                                c.value.interval,
                                c.value.metrics,
                                c.name,
                                c.generation
                            );
                        }
                        Ok(false) => entry.failed.push(node.clone()),
                        Err(e) => {
                            tracing::warn!(node = %node, error = %e, "config key not written");
                            entry.failed.push(node.clone());
                        }
                    }
                }
                (None, Some(CurrentKey::Managed(_, rev))) => match self.delete(&key, *rev).await {
                    Ok(_) => {
                        written.remove(node.as_str());
                        tracing::info!(
                            node = %node,
                            "config {key} removed: no MonitorConfig selects {node}; its agent returns to the defaults"
                        );
                    }
                    Err(e) => {
                        self.metrics.reconcile_error("config-keys");
                        tracing::warn!(node = %node, error = %e, "config key not removed");
                    }
                },
                (None, _) => {}
            }
            // What the node's agent should end up running, for MonitorNode `inSync`.
            match (want, current.get(node.as_str())) {
                (_, Some(CurrentKey::Unmanaged(Some(value)))) => {
                    desired.insert(node.clone(), value.clone());
                }
                (Some(c), Some(CurrentKey::Managed(..)) | None) => {
                    desired.insert(node.clone(), c.value.clone());
                }
                _ => {}
            }
        }
        self.desired.send_if_modified(|old| {
            if old.as_deref() == Some(&desired) {
                false
            } else {
                *old = Some(Arc::new(desired));
                true
            }
        });
        Ok(report)
    }

    async fn current_keys(&self) -> Result<BTreeMap<String, CurrentKey>> {
        let mut etcd = self.etcd.clone();
        let listing = list_prefix(&mut etcd, CONFIG_PREFIX, false)
            .await
            .map_err(Error::etcd(format!("list {CONFIG_PREFIX}")))?;
        let mut out = BTreeMap::new();
        for kv in &listing.kvs {
            let Some(node) = node_of_config_key(kv.key()) else {
                continue;
            };
            let key = match ConfigValue::parse(kv.value()) {
                Ok(v) if v.is_managed() => CurrentKey::Managed(v, kv.mod_revision()),
                Ok(v) => CurrentKey::Unmanaged(Some(v)),
                Err(_) => CurrentKey::Unmanaged(None),
            };
            out.insert(node.to_string(), key);
        }
        Ok(out)
    }

    /// Writes `value` if the key is still as read: absent (`expect` None) or at revision
    /// `expect`. Returns false when someone changed it in between (the next sync looks again).
    async fn put(&self, key: &str, value: &ConfigValue, expect: Option<i64>) -> Result<bool> {
        let guard = match expect {
            None => Compare::create_revision(key, CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
        };
        let txn = Txn::new()
            .when([guard])
            .and_then([TxnOp::put(key, value.to_json(), None)]);
        let mut etcd = self.etcd.clone();
        let resp = etcd
            .txn(txn)
            .await
            .map_err(Error::etcd(format!("write {key}")))?;
        self.metrics.config_key_writes.inc();
        Ok(resp.succeeded())
    }

    async fn delete(&self, key: &str, rev: i64) -> Result<bool> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then([TxnOp::delete(key, None)]);
        let mut etcd = self.etcd.clone();
        let resp = etcd
            .txn(txn)
            .await
            .map_err(Error::etcd(format!("delete {key}")))?;
        self.metrics.config_key_writes.inc();
        Ok(resp.succeeded())
    }

    /// Syncs on start, whenever a node or a config key changes, and every `resync` anyway; after
    /// each sync whose outcome differs from the last, asks the MonitorConfig controller to
    /// refresh the statuses through `refresh`.
    pub async fn run_sync_loop(
        self: Arc<Self>,
        refresh: mpsc::UnboundedSender<()>,
        resync: Duration,
    ) -> Result<()> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut last: Option<SyncReport> = None;
        loop {
            match self.sync(None).await {
                Ok(report) => {
                    backoff.reset();
                    if last.as_ref() != Some(&report) {
                        let _ = refresh.unbounded_send(());
                        last = Some(report);
                    }
                    tokio::select! {
                        _ = self.inventory.changed() => {}
                        _ = self.keys_changed.notified() => {}
                        _ = tokio::time::sleep(resync) => {}
                    }
                    // Let a burst of changes settle into one sync.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    self.metrics.reconcile_error("config-keys");
                    tracing::warn!(error = %e, "config key sync failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Watches `/monitor/config/` so a key changed or deleted by hand is noticed at once.
    pub async fn watch_keys(self: Arc<Self>) -> Result<()> {
        let settings = WatcherSettings {
            keys_only: true,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            ..WatcherSettings::prefix("config key watch")
        };
        let mut watcher = EtcdWatcher::new(self.etcd.clone(), CONFIG_PREFIX, settings);
        loop {
            match watcher.next().await {
                // Anything may have changed while the watch was down; every change is a reason
                // to sync (the sync reads the keys itself).
                WatchEvent::Listed { .. } | WatchEvent::Put(_) | WatchEvent::Delete { .. } => {
                    self.keys_changed.notify_one()
                }
                WatchEvent::Interrupted => {}
            }
        }
    }
}
