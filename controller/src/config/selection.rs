//! Which MonitorConfig each node gets: pure functions over the MonitorConfigs and node labels.

use std::collections::{BTreeMap, BTreeSet};

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use nodepulse_crd::v1alpha1::MonitorConfig;
use nodepulse_crd::wire::{CONTROLLER_MANAGER, ConfigSource, ConfigValue, MetricSet};

use crate::inventory::Labels;

/// A MonitorConfig checked and ready to match nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledConfig {
    /// The MonitorConfig's name.
    pub name: String,
    /// Its `metadata.generation`.
    pub generation: i64,
    /// Higher wins.
    pub priority: i32,
    /// `None`: no selector given.
    selector: Option<Selector>,
    node_names: BTreeSet<String>,
    /// The value its nodes' config keys should hold.
    pub value: ConfigValue,
}

impl CompiledConfig {
    /// Checks a MonitorConfig; the error says why it cannot be applied.
    pub fn compile(mc: &MonitorConfig) -> Result<CompiledConfig, String> {
        let name = mc.name_any();
        let selector = match &mc.spec.node_selector {
            None => None,
            Some(s) => Some(
                Selector::try_from(s.clone())
                    .map_err(|e| format!("spec.nodeSelector is not valid: {}", e.0))?,
            ),
        };
        for node in &mc.spec.node_names {
            nodepulse_crd::wire::validate_node_name(node)
                .map_err(|e| format!("spec.nodeNames: {e}"))?;
        }
        let metrics = MetricSet::new(mc.spec.metrics.iter().copied())
            .map_err(|e| format!("spec.metrics: {e}"))?;
        let mut value = ConfigValue::new(mc.spec.interval, metrics)
            .map_err(|e| format!("spec.interval: {e}"))?;
        let generation = mc.metadata.generation.unwrap_or(0);
        value.managed_by = Some(CONTROLLER_MANAGER.to_string());
        value.source = Some(ConfigSource {
            monitor_config: name.clone(),
            generation,
        });
        Ok(CompiledConfig {
            name,
            generation,
            priority: mc.spec.priority,
            selector,
            node_names: mc.spec.node_names.iter().cloned().collect(),
            value,
        })
    }

    /// Whether this MonitorConfig selects `node`: by `nodeNames`, or by the selector (an absent
    /// selector selects every node unless `nodeNames` is set).
    pub fn selects(&self, node: &str, labels: &Labels) -> bool {
        if self.node_names.contains(node) {
            return true;
        }
        match &self.selector {
            Some(selector) => selector.matches(labels),
            None => self.node_names.is_empty(),
        }
    }

    /// The nodes it names in `spec.nodeNames`.
    pub fn node_names(&self) -> impl Iterator<Item = &String> {
        self.node_names.iter()
    }

    /// Whether `self` wins over `other` for a node both select.
    fn beats(&self, other: &CompiledConfig) -> bool {
        (self.priority, std::cmp::Reverse(&self.name))
            > (other.priority, std::cmp::Reverse(&other.name))
    }
}

/// For every node, the MonitorConfig that wins it (highest priority, ties to the name that sorts
/// first); nodes no MonitorConfig selects are absent.
pub fn winners<'a>(
    configs: &'a [CompiledConfig],
    nodes: &BTreeMap<String, Labels>,
) -> BTreeMap<String, &'a CompiledConfig> {
    let mut out = BTreeMap::new();
    for (node, labels) in nodes {
        let best = configs.iter().filter(|c| c.selects(node, labels)).fold(
            None::<&CompiledConfig>,
            |best, c| match best {
                Some(b) if !c.beats(b) => Some(b),
                _ => Some(c),
            },
        );
        if let Some(best) = best {
            out.insert(node.clone(), best);
        }
    }
    out
}

/// Whether the key's current value already carries what `desired` asks for. The generation is
/// left out on purpose: a new generation that changes neither interval, metrics nor the owner
/// (say, a priority bump) does not make the agents reload.
pub fn same_value(current: &ConfigValue, desired: &ConfigValue) -> bool {
    current.same_settings(desired)
        && current.managed_by == desired.managed_by
        && current.source.as_ref().map(|s| &s.monitor_config)
            == desired.source.as_ref().map(|s| &s.monitor_config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use nodepulse_crd::v1alpha1::MonitorConfigSpec;
    use nodepulse_crd::wire::Metric;

    fn mc(
        name: &str,
        priority: i32,
        selector: Option<LabelSelector>,
        names: &[&str],
    ) -> MonitorConfig {
        let mut mc = MonitorConfig::new(
            name,
            MonitorConfigSpec {
                node_selector: selector,
                node_names: names.iter().map(|s| s.to_string()).collect(),
                interval: 2,
                metrics: vec![Metric::Cpu],
                priority,
            },
        );
        mc.metadata.generation = Some(1);
        mc
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn match_labels(pairs: &[(&str, &str)]) -> Option<LabelSelector> {
        Some(LabelSelector {
            match_labels: Some(labels(pairs)),
            match_expressions: None,
        })
    }

    fn nodes() -> BTreeMap<String, Labels> {
        [
            ("worker-1", labels(&[("tier", "fast")])),
            ("worker-2", labels(&[("tier", "slow")])),
            ("orphan", Labels::new()),
        ]
        .into_iter()
        .map(|(n, l)| (n.to_string(), l))
        .collect()
    }

    fn winner_names(configs: &[CompiledConfig]) -> Vec<(String, String)> {
        winners(configs, &nodes())
            .into_iter()
            .map(|(n, c)| (n, c.name.clone()))
            .collect()
    }

    #[test]
    fn empty_selector_selects_every_node_even_without_labels() {
        let all = CompiledConfig::compile(&mc("all", 0, None, &[])).unwrap();
        let empty =
            CompiledConfig::compile(&mc("empty", 0, Some(LabelSelector::default()), &[])).unwrap();
        for c in [&all, &empty] {
            assert!(c.selects("orphan", &Labels::new()));
            assert!(c.selects("worker-1", &labels(&[("tier", "fast")])));
        }
    }

    #[test]
    fn node_names_alone_select_only_those_nodes_and_add_to_a_selector() {
        let named = CompiledConfig::compile(&mc("named", 0, None, &["worker-2"])).unwrap();
        assert!(named.selects("worker-2", &Labels::new()));
        assert!(!named.selects("worker-1", &Labels::new()));
        let both = CompiledConfig::compile(&mc(
            "both",
            0,
            match_labels(&[("tier", "fast")]),
            &["orphan"],
        ))
        .unwrap();
        assert_eq!(
            winner_names(&[both]),
            [
                ("orphan".into(), "both".into()),
                ("worker-1".into(), "both".into())
            ]
        );
    }

    #[test]
    fn highest_priority_wins_and_ties_go_to_the_first_name() {
        let configs = [
            CompiledConfig::compile(&mc("b-all", 0, None, &[])).unwrap(),
            CompiledConfig::compile(&mc("a-all", 0, None, &[])).unwrap(),
            CompiledConfig::compile(&mc("z-fast", 5, match_labels(&[("tier", "fast")]), &[]))
                .unwrap(),
        ];
        assert_eq!(
            winner_names(&configs),
            [
                ("orphan".into(), "a-all".into()),
                ("worker-1".into(), "z-fast".into()),
                ("worker-2".into(), "a-all".into()),
            ]
        );
    }

    #[test]
    fn unselected_nodes_have_no_winner() {
        let fast = CompiledConfig::compile(&mc("fast", 0, match_labels(&[("tier", "fast")]), &[]))
            .unwrap();
        assert_eq!(winner_names(&[fast]), [("worker-1".into(), "fast".into())]);
    }

    #[test]
    fn a_bad_selector_or_node_name_cannot_be_applied() {
        let bad = Some(LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Near".into(),
                values: None,
            }]),
        });
        let err = CompiledConfig::compile(&mc("bad", 0, bad, &[])).unwrap_err();
        assert!(err.contains("spec.nodeSelector"), "{err}");
        let err = CompiledConfig::compile(&mc("bad", 0, None, &["Worker_1"])).unwrap_err();
        assert!(err.contains("spec.nodeNames"), "{err}");
    }

    #[test]
    fn the_written_value_carries_the_markers_and_generation_changes_alone_do_not_rewrite() {
        let c = CompiledConfig::compile(&mc("fast", 0, None, &[])).unwrap();
        assert!(c.value.is_managed());
        assert_eq!(c.value.source.as_ref().unwrap().monitor_config, "fast");
        let mut newer = c.value.clone();
        newer.source.as_mut().unwrap().generation = 7;
        assert!(same_value(&c.value, &newer));
        let mut other = c.value.clone();
        other.interval = 5;
        assert!(!same_value(&c.value, &other));
        let hand: ConfigValue = ConfigValue::new(2, "cpu".parse().unwrap()).unwrap();
        assert!(!same_value(&hand, &c.value));
    }
}
