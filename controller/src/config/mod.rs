//! MonitorConfigs into `/monitor/config/<node>` keys: [`selection`] (which MonitorConfig wins
//! which node, pure) -> [`keys`] (the keys written and watched) and [`reconciler`] (the
//! MonitorConfig controller and its status). What flows out is [`DesiredConfigs`], which the
//! status half reads to judge each node's applied config.

use std::collections::BTreeMap;
use std::sync::Arc;

use nodepulse_crd::wire::ConfigValue;

pub mod keys;
pub mod reconciler;
pub mod selection;

/// What each node's config key should make its agent run, as the config sync last computed
/// it; nodes absent run on the defaults. `None` until the first sync.
pub type DesiredConfigs = Option<Arc<BTreeMap<String, ConfigValue>>>;
