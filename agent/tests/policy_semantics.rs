//! DESIGN §4, item by item, on the upstream e2e model (namespaces x, y, z;
//! pods a, b, c in each; ports 80 and 81 over TCP and UDP, named
//! `serve-<port>-<proto>`). Policies are written as API objects and go through
//! the same conversion as the agent's. Every expectation is checked against the
//! oracle and against the compiled entries, over IPv4 and IPv6.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portcullis_agent::{
    model::{Cluster, ContainerPort, Labels, Namespace, Pod, Protocol, network_policy_from_api},
    policy::oracle::{self, Party},
};
use serde_json::{Value, json};
use support::{NODE_IP, agree, compile, pod};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn ns_index(ns: &str) -> u8 {
    NAMESPACES.iter().position(|n| *n == ns).expect("namespace") as u8
}

fn e2e_model() -> Cluster {
    let mut c = Cluster::default();
    for ns in NAMESPACES {
        let labels: Labels = [("ns", ns), ("kubernetes.io/metadata.name", ns)]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        c.add_namespace(Namespace { name: ns.into(), labels });
        for (i, p) in PODS.iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for (protocol, tag) in
                    [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp"), (Protocol::Sctp, "sctp")]
                {
                    ports.push(ContainerPort { name: Some(format!("serve-{port}-{tag}")), port, protocol });
                }
            }
            let n = ns_index(ns) * 16 + i as u8 + 1;
            c.add_pod(Pod {
                namespace: ns.into(),
                name: p.to_string(),
                labels: [("pod".to_string(), p.to_string())].into(),
                ips: vec![
                    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(n))),
                ],
                node: Some("node".into()),
                host_network: false,
                finished: false,
                created: None,
                deleting: false,
                ports,
            });
        }
    }
    c
}

fn apply(c: &mut Cluster, namespace: &str, name: &str, spec: Value) {
    let api =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec}))
            .expect("policy JSON");
    c.add_policy(network_policy_from_api(&api).expect("valid policy"));
}

/// Asserts the verdict from `from` to `to` (`ns/pod`) over both families,
/// in the oracle and in the compiled entries.
fn expect(c: &Cluster, from: &str, to: &str, protocol: Protocol, port: u16, allowed: bool) {
    let compiled = compile(c);
    let (client, server) = (pod(c, from), pod(c, to));
    for family in 0..2 {
        let got = agree(
            c,
            &compiled,
            Party::Pod(client, client.ips[family]),
            Party::Pod(server, server.ips[family]),
            protocol,
            port,
        );
        assert_eq!(
            got,
            allowed,
            "{from} -> {to} {protocol}/{port} over IPv{}",
            if family == 0 { 4 } else { 6 }
        );
    }
}

use Protocol::{Sctp, Tcp, Udp};

#[test]
fn no_policy_allows_everything() {
    let c = e2e_model();
    expect(&c, "x/a", "y/b", Tcp, 80, true);
    expect(&c, "z/c", "x/a", Udp, 81, true);
}

#[test]
fn policy_types_absent_means_ingress_and_egress_iff_egress_rules() {
    let mut c = e2e_model();
    // No types, no egress rules: isolates ingress only.
    apply(&mut c, "x", "ingress-only", json!({"podSelector": {"matchLabels": {"pod": "a"}}}));
    expect(&c, "y/a", "x/a", Tcp, 80, false);
    expect(&c, "x/a", "y/a", Tcp, 80, true);
    // No types, egress rules present: isolates egress too.
    apply(
        &mut c,
        "x",
        "egress-rules",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}},
            "egress": [{"ports": [{"port": 81}]}],
        }),
    );
    expect(&c, "x/b", "y/a", Tcp, 80, false);
    expect(&c, "x/b", "y/a", Tcp, 81, true);
    expect(&c, "y/a", "x/b", Tcp, 80, false);
    // Explicit Egress only: ingress stays open.
    apply(&mut c, "y", "egress-type", json!({"podSelector": {}, "policyTypes": ["Egress"]}));
    expect(&c, "z/a", "y/a", Tcp, 80, true);
    expect(&c, "y/a", "z/a", Tcp, 80, false);
}

#[test]
fn a_connection_needs_the_clients_egress_and_the_servers_ingress() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "a-out",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
        }),
    );
    apply(
        &mut c,
        "y",
        "b-in",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
        }),
    );
    expect(&c, "x/a", "y/a", Tcp, 80, true);
    expect(&c, "x/a", "y/b", Tcp, 80, false); // egress allows, ingress does not
    expect(&c, "z/a", "y/b", Tcp, 80, true);
    expect(&c, "x/a", "z/a", Tcp, 80, false); // ingress open, egress does not allow
}

#[test]
fn rules_and_peers_or_selectors_in_one_peer_and() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]},
                {"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}, {"namespaceSelector": {"matchLabels": {"ns": "z"}}}]},
            ],
        }),
    );
    expect(&c, "y/b", "x/a", Tcp, 80, true); // ns AND pod
    expect(&c, "y/a", "x/a", Tcp, 80, false); // ns only: the AND fails
    expect(&c, "y/c", "x/a", Tcp, 80, false); // podSelector alone is the policy's namespace
    expect(&c, "x/c", "x/a", Tcp, 80, true);
    expect(&c, "z/a", "x/a", Tcp, 80, true); // second peer of the second rule
    expect(&c, "x/b", "x/a", Tcp, 80, false);
}

#[test]
fn empty_namespace_selector_is_every_namespace() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]}],
        }),
    );
    for ns in NAMESPACES {
        expect(&c, &format!("{ns}/b"), "x/a", Tcp, 80, true);
        expect(&c, &format!("{ns}/c"), "x/a", Tcp, 80, false);
    }
}

#[test]
fn empty_rule_allows_all_and_no_rules_deny_all() {
    let mut c = e2e_model();
    apply(&mut c, "x", "allow-all", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{}]}));
    apply(&mut c, "x", "deny-all", json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": []}));
    apply(
        &mut c,
        "x",
        "deny-all-typed",
        json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Ingress"]}),
    );
    expect(&c, "z/c", "x/a", Udp, 81, true);
    expect(&c, "x/a", "x/b", Tcp, 80, false);
    expect(&c, "x/a", "x/c", Tcp, 80, false);
    // Two policies selecting the same pod: the union of what they allow.
    apply(
        &mut c,
        "x",
        "allow-b-80",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 80}]}],
        }),
    );
    expect(&c, "x/a", "x/b", Tcp, 80, true);
    expect(&c, "x/a", "x/b", Tcp, 81, false);
}

#[test]
fn ports_absent_allow_all_ports_and_protocol_defaults_to_tcp() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "any-port",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {}}]}],
        }),
    );
    expect(&c, "x/b", "x/a", Udp, 81, true);
    expect(&c, "x/b", "x/a", Sctp, 80, true);
    apply(
        &mut c,
        "x",
        "tcp-80",
        json!({"podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"port": 80}]}]}),
    );
    expect(&c, "x/a", "x/b", Tcp, 80, true);
    expect(&c, "x/a", "x/b", Udp, 80, false);
}

#[test]
fn match_expressions_operators() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}], "ports": [{"port": 80}]},
                {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x", "y"]}]}}], "ports": [{"port": 81}]},
                {"from": [{"namespaceSelector": {}, "podSelector": {"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}, {"key": "pod", "operator": "Exists"}]}}], "ports": [{"protocol": "UDP", "port": 80}]},
            ],
        }),
    );
    expect(&c, "y/b", "x/a", Tcp, 80, true);
    expect(&c, "y/c", "x/a", Tcp, 80, false);
    expect(&c, "z/c", "x/a", Tcp, 81, true);
    expect(&c, "y/c", "x/a", Tcp, 81, false);
    expect(&c, "y/c", "x/a", Udp, 80, true);
}

#[test]
fn not_in_and_does_not_exist_match_objects_without_the_key() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "NotIn", "values": ["red"]}]}}]}],
        }),
    );
    // No namespace has a team label: NotIn matches them all.
    expect(&c, "y/b", "x/a", Tcp, 80, true);
    c.namespaces.get_mut("y").expect("y").labels.insert("team".into(), "red".into());
    expect(&c, "y/b", "x/a", Tcp, 80, false);
    expect(&c, "z/b", "x/a", Tcp, 80, true);
}

#[test]
fn sctp_and_udp_rules_isolate_and_never_allow_tcp() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "sctp",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "SCTP", "port": 80}]}],
        }),
    );
    apply(
        &mut c,
        "x",
        "udp",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}}, "ingress": [{"ports": [{"protocol": "UDP", "port": 80}]}],
        }),
    );
    expect(&c, "y/a", "x/a", Sctp, 80, true);
    expect(&c, "y/a", "x/a", Tcp, 80, false);
    expect(&c, "y/a", "x/a", Udp, 80, false);
    expect(&c, "y/a", "x/b", Udp, 80, true);
    expect(&c, "y/a", "x/b", Tcp, 80, false);
}

#[test]
fn relabels_take_effect() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ok": "yes"}}, "podSelector": {"matchLabels": {"role": "client"}}}]}],
        }),
    );
    expect(&c, "y/b", "x/a", Tcp, 80, false);
    c.namespaces.get_mut("y").expect("y").labels.insert("ok".into(), "yes".into());
    expect(&c, "y/b", "x/a", Tcp, 80, false);
    c.pods
        .values_mut()
        .find(|p| p.namespace == "y" && p.name == "b")
        .expect("y/b")
        .labels
        .insert("role".into(), "client".into());
    expect(&c, "y/b", "x/a", Tcp, 80, true);
    // The server's own relabel: no longer selected, no longer isolated.
    c.pods
        .values_mut()
        .find(|p| p.namespace == "x" && p.name == "a")
        .expect("x/a")
        .labels
        .insert("pod".into(), "a2".into());
    expect(&c, "z/c", "x/a", Tcp, 80, true);
}

#[test]
fn ip_blocks_match_pod_addresses_and_except_stays_in_its_peer() {
    let mut c = e2e_model();
    let (b4, b6) = (pod(&c, "y/b").ips[0], pod(&c, "y/b").ips[1]);
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [
                {"from": [
                    {"ipBlock": {"cidr": "10.0.0.0/24", "except": [format!("{b4}/32")]}},
                    {"ipBlock": {"cidr": "fd00::/64", "except": [format!("{b6}/128")]}},
                ], "ports": [{"port": 80}]},
                {"from": [{"ipBlock": {"cidr": format!("{b4}/30")}}, {"ipBlock": {"cidr": format!("{b6}/126")}}], "ports": [{"port": 81}]},
            ],
        }),
    );
    expect(&c, "y/a", "x/a", Tcp, 80, true);
    expect(&c, "y/b", "x/a", Tcp, 80, false); // excepted
    expect(&c, "y/b", "x/a", Tcp, 81, true); // the except does not reach the other rule's block
    // External addresses are judged by the blocks too.
    let compiled = compile(&c);
    let server = pod(&c, "x/a");
    let outside = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200));
    assert!(agree(&c, &compiled, Party::External(outside), Party::Pod(server, server.ips[0]), Tcp, 80));
    let far = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1));
    assert!(!agree(&c, &compiled, Party::External(far), Party::Pod(server, server.ips[0]), Tcp, 80));
}

#[test]
fn named_ports_resolve_against_the_server() {
    let mut c = e2e_model();
    // y/c serves serve-80-tcp on 8080 instead; same labels as any pod c.
    let yc = c.pods.values_mut().find(|p| p.namespace == "y" && p.name == "c").expect("y/c");
    yc.ports.iter_mut().filter(|p| p.name.as_deref() == Some("serve-80-tcp")).for_each(|p| p.port = 8080);
    apply(
        &mut c,
        "x",
        "in",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}],
        }),
    );
    expect(&c, "y/a", "x/a", Udp, 81, true);
    expect(&c, "y/a", "x/a", Udp, 80, false);
    apply(
        &mut c,
        "x",
        "out",
        json!({
            "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "c"}}}], "ports": [{"port": "serve-80-tcp"}]}],
        }),
    );
    expect(&c, "x/b", "z/c", Tcp, 80, true);
    expect(&c, "x/b", "y/c", Tcp, 8080, true); // resolved on y/c itself
    expect(&c, "x/b", "y/c", Tcp, 80, false);
    expect(&c, "x/b", "z/c", Tcp, 8080, false);
}

#[test]
fn end_port_ranges() {
    let mut c = e2e_model();
    apply(
        &mut c,
        "x",
        "p",
        json!({
            "podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 79, "endPort": 80}]}],
        }),
    );
    expect(&c, "y/a", "x/a", Tcp, 80, true);
    expect(&c, "y/a", "x/a", Tcp, 81, false);
}

#[test]
fn the_node_always_reaches_its_pods() {
    let mut c = e2e_model();
    apply(&mut c, "x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]}));
    let compiled = compile(&c);
    let a = pod(&c, "x/a");
    assert!(agree(&c, &compiled, Party::Node(NODE_IP), Party::Pod(a, a.ips[0]), Tcp, 10250));
    let verdict = oracle::evaluate(
        &c,
        Party::Pod(pod(&c, "y/a"), pod(&c, "y/a").ips[0]),
        Party::Pod(a, a.ips[0]),
        Tcp,
        80,
    );
    assert_eq!(verdict.ingress.selected_by, vec!["x/deny".to_string()]);
    assert!(!verdict.allowed && verdict.ingress.allowed_by.is_empty());
}
