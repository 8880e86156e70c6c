//! What the chart's defaults lock down: NetworkPolicies that admit only the agent and the
//! controller to etcd's client port and only etcd members to its peer port.

use serde_yaml::Value;
use testkit::render_chart;

fn network_policy<'a>(objects: &'a [Value], namespace: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some("NetworkPolicy")
                && o["metadata"]["namespace"].as_str() == Some(namespace)
                && o["metadata"]["name"].as_str() == Some(name)
        })
        .unwrap_or_else(|| panic!("no NetworkPolicy {namespace}/{name}"))
}

/// The ingress rule of `policy` that opens the named port.
fn ingress_for<'a>(policy: &'a Value, port: &str) -> &'a Value {
    policy["spec"]["ingress"]
        .as_sequence()
        .expect("ingress rules")
        .iter()
        .find(|r| r["ports"][0]["port"].as_str() == Some(port))
        .unwrap_or_else(|| panic!("no ingress rule for port {port}"))
}

fn component(peer: &Value) -> &str {
    peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        .as_str()
        .expect("a component selector")
}

#[test]
fn by_default_etcd_admits_only_the_agent_and_the_controller_and_its_peers() {
    let objects = render_chart(&[]);
    let etcd = network_policy(&objects, "etcd", "etcd");
    assert_eq!(
        etcd["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"].as_str(),
        Some("etcd")
    );

    let client = ingress_for(etcd, "client");
    let from = client["from"]
        .as_sequence()
        .expect("client port has sources");
    let components: Vec<&str> = from.iter().map(component).collect();
    assert_eq!(components, ["agent", "controller"]);
    for peer in from {
        assert_eq!(
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str(),
            Some("nodepulse"),
            "only from the release's namespace: {peer:?}"
        );
    }

    let peer = ingress_for(etcd, "peer");
    let from = peer["from"].as_sequence().expect("peer port has sources");
    assert_eq!(from.iter().map(component).collect::<Vec<_>>(), ["etcd"]);

    // The kubelet's probes and Prometheus read the plain metrics port.
    assert!(ingress_for(etcd, "metrics")["from"].is_null());

    for name in ["nodepulse-agent", "nodepulse-controller"] {
        let policy = network_policy(&objects, "nodepulse", name);
        let rules = policy["spec"]["ingress"].as_sequence().expect("ingress");
        assert_eq!(rules.len(), 1, "{name}: only the metrics port");
        assert_eq!(rules[0]["ports"][0]["port"].as_str(), Some("metrics"));
    }

    let off = render_chart(&["--set", "networkPolicy.enabled=false"]);
    assert!(
        off.iter()
            .all(|o| o["kind"].as_str() != Some("NetworkPolicy"))
    );
}
