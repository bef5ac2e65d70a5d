//! Property: for random clusters and policies, the compiled entries (looked
//! up the way the programs look them up) give the oracle's verdict for every
//! flow between the pods, external addresses and the nodes, on every protocol
//! and a spread of ports. Clusters have two nodes, each enforced by its own
//! engine (its endpoints, its ipcache, its own addresses as the host), pods on
//! the host network sharing their node's addresses, and pods claiming one
//! address (new, terminating, finished). Set PROPTEST_CASES for more cases.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use portcullis_agent::{
    compiled::AllowEntry,
    model::{
        Cluster, ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Operator, Peer, Pod,
        PortRange, PortRef, PortSpec, Protocol, Requirement, Rule,
    },
    policy::{
        Change, Compiler, EndpointPolicy, Engine, Identities, IdentityLabels, Simulation,
        compile::{PlanCache, pods_by_identity},
        oracle::{self, Party, pod_at},
    },
};
use proptest::prelude::*;
use support::NODE_IP;

/// splitmix64: the case is a seed, and a failing seed reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The nodes and their addresses: a pod on the host network has its node's.
const NODES: [(&str, [IpAddr; 2]); 2] = [
    ("node", [NODE_IP, IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xff, 0xfffe))]),
    (
        "other",
        [
            IpAddr::V4(Ipv4Addr::new(10, 0, 255, 253)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0xff, 0xfffd)),
        ],
    ),
];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];
/// Ports probed: every number rules and container ports use, and neighbours.
const PROBE_PORTS: [u16; 11] = [53, 79, 80, 81, 5353, 8000, 8080, 8999, 9000, 9001, 9090];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn values(rng: &mut Rng, pool: &[&str]) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = pool.iter().filter(|_| rng.chance(50)).map(|s| s.to_string()).collect();
    if out.is_empty() {
        out.insert(rng.pick(pool).to_string());
    }
    out
}

/// A selector over keys with their possible values.
fn selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> LabelSelector {
    let mut sel = LabelSelector::default();
    for _ in 0..rng.below(2) {
        let (k, vals) = rng.pick(keys);
        sel.match_labels.insert(k.to_string(), rng.pick(vals).to_string());
    }
    for _ in 0..rng.below(3) {
        let (k, vals) = rng.pick(keys);
        let operator = match rng.below(4) {
            0 => Operator::In(values(rng, vals)),
            1 => Operator::NotIn(values(rng, vals)),
            2 => Operator::Exists,
            _ => Operator::DoesNotExist,
        };
        sel.expressions.push(Requirement { key: k.to_string(), operator });
    }
    sel
}

const POD_KEYS: &[(&str, &[&str])] = &[("app", &["a", "b", "c"]), ("tier", &["f", "b"]), ("nolabel", &["v"])];
const NS_KEYS: &[(&str, &[&str])] = &[("ns", &["x", "y", "z"]), ("team", &["a", "b"]), ("nolabel", &["v"])];

fn cidrs() -> Vec<IpNet> {
    [
        "10.0.0.0/16",
        "10.0.0.0/24",
        "10.0.0.0/29",
        "10.0.0.4/30",
        "10.0.0.3/32",
        "10.0.0.8/29",
        "0.0.0.0/0",
        "192.168.0.0/16",
        "fd00::/64",
        "fd00::/125",
        "fd00::4/126",
        "fd00::3/128",
        "::/0",
    ]
    .iter()
    .map(|s| s.parse().expect("cidr"))
    .collect()
}

fn peer(rng: &mut Rng) -> Peer {
    if rng.chance(45) {
        let all = cidrs();
        let cidr = *rng.pick(&all);
        let inside: Vec<IpNet> = all.iter().copied().filter(|c| cidr.contains(c) && *c != cidr).collect();
        let except = if inside.is_empty() {
            vec![]
        } else {
            let mut e: Vec<IpNet> = (0..rng.below(4)).map(|_| *rng.pick(&inside)).collect();
            e.sort();
            e.dedup();
            e
        };
        return Peer::IpBlock { cidr, except };
    }
    let namespaces = rng.chance(50).then(|| selector(rng, NS_KEYS));
    let pods = (namespaces.is_none() || rng.chance(50)).then(|| selector(rng, POD_KEYS));
    Peer::Pods { namespaces, pods }
}

fn port_spec(rng: &mut Rng) -> PortSpec {
    let protocol = *rng.pick(&PROTOCOLS);
    let port = match rng.below(5) {
        0 => None,
        1 => Some(PortRef::Numbers(PortRange::single(*rng.pick(&[53, 80, 81, 8080, 9000, 9090])))),
        2 => {
            let start = *rng.pick(&[50u16, 80, 8000]);
            let end = start + *rng.pick(&[0u16, 1, 30, 1000]);
            Some(PortRef::Numbers(PortRange { start, end }))
        }
        _ => Some(PortRef::Named(rng.pick(&["http", "dns", "sc", "metrics", "nope"]).to_string())),
    };
    PortSpec { protocol, port }
}

fn rules(rng: &mut Rng) -> Vec<Rule> {
    (0..rng.below(3))
        .map(|_| Rule {
            peers: (0..rng.below(3)).map(|_| peer(rng)).collect(),
            ports: (0..rng.below(3)).map(|_| port_spec(rng)).collect(),
        })
        .collect()
}

/// A creation time: a few values, so that ties happen; or none (an object
/// from a manifest file).
fn lifetime(rng: &mut Rng) -> Option<i64> {
    rng.chance(80).then(|| rng.below(3) as i64)
}

fn cluster(seed: u64) -> Cluster {
    let mut rng = Rng(seed);
    let mut cluster = Cluster::default();
    for ns in NAMESPACES {
        let mut l = labels(&[("ns", ns)]);
        if rng.chance(50) {
            l.insert("team".into(), rng.pick(&["a", "b"]).to_string());
        }
        cluster.add_namespace(Namespace { name: ns.into(), labels: l });
    }
    // Named ports whose numbers differ between pods, even of one identity.
    let catalog: [(&str, Protocol, &[u16]); 4] = [
        ("http", Protocol::Tcp, &[80, 8080]),
        ("dns", Protocol::Udp, &[53, 5353]),
        ("sc", Protocol::Sctp, &[9000, 9001]),
        ("metrics", Protocol::Tcp, &[9090]),
    ];
    let pod_labels = |rng: &mut Rng| {
        let mut l = Labels::new();
        l.insert("app".into(), rng.pick(&["a", "b", "c"]).to_string());
        if rng.chance(50) {
            l.insert("tier".into(), rng.pick(&["f", "b"]).to_string());
        }
        l
    };
    let pod_ports = |rng: &mut Rng| {
        let mut ports = Vec::new();
        for (name, protocol, numbers) in &catalog {
            if rng.chance(60) {
                ports.push(ContainerPort {
                    name: Some(name.to_string()),
                    port: *rng.pick(numbers),
                    protocol: *protocol,
                });
            }
        }
        ports
    };
    for i in 0..2 + rng.below(6) {
        let labels = pod_labels(&mut rng);
        let ports = pod_ports(&mut rng);
        let n = i as u8 + 1;
        // Now and then an address another pod claims too: a reused one
        // (the old pod terminating, or finished, or not yet seen so).
        let m = if i > 0 && rng.chance(30) { 1 + rng.below(i) as u8 } else { n };
        cluster.add_pod(Pod {
            namespace: rng.pick(&NAMESPACES).to_string(),
            name: format!("p{n}"),
            labels,
            ips: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, m)),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(m))),
            ],
            node: Some(if rng.chance(70) { "node" } else { "other" }.into()),
            host_network: false,
            finished: rng.chance(5),
            ports,
            created: lifetime(&mut rng),
            deleting: rng.chance(15),
        });
    }
    // Pods on the host network (kube-proxy, etcd, the agent): their
    // addresses are their node's, and their labels are like any pod's.
    for i in 0..rng.below(4) {
        let labels = pod_labels(&mut rng);
        let ports = pod_ports(&mut rng);
        let (node, ips) = rng.pick(&NODES);
        cluster.add_pod(Pod {
            namespace: rng.pick(&NAMESPACES).to_string(),
            name: format!("h{i}"),
            labels,
            ips: ips.to_vec(),
            node: Some(node.to_string()),
            host_network: true,
            finished: false,
            ports,
            created: lifetime(&mut rng),
            deleting: rng.chance(15),
        });
    }
    for i in 0..1 + rng.below(5) {
        let ingress = rules(&mut rng);
        let egress = rules(&mut rng);
        let (affects_ingress, affects_egress) = match rng.below(4) {
            0 => (true, !egress.is_empty()), // policyTypes absent
            1 => (true, false),
            2 => (false, true),
            _ => (true, true),
        };
        cluster.add_policy(NetworkPolicy {
            namespace: rng.pick(&NAMESPACES).to_string(),
            name: format!("pol{i}"),
            pod_selector: if rng.chance(40) {
                LabelSelector::everything()
            } else {
                selector(&mut rng, POD_KEYS)
            },
            affects_ingress,
            affects_egress,
            ingress,
            egress,
        });
    }
    cluster
}

/// One engine per node, fed the whole cluster (in key order).
fn engines(cluster: &Cluster) -> Vec<(Engine, [IpAddr; 2])> {
    NODES
        .iter()
        .map(|(node, ips)| {
            let mut engine = Engine::new(*node);
            engine.apply(cluster.namespaces.values().cloned().map(Change::UpsertNamespace));
            engine.apply(cluster.pods.values().cloned().map(Change::UpsertPod));
            engine.apply(cluster.policies.values().cloned().map(Change::UpsertPolicy));
            (engine, *ips)
        })
        .collect()
}

/// The engine's ipcache is exactly the oracle's: every pod address with
/// the identity (and the name) of the pod holding it, and nothing for an
/// address no pod holds (a node's, which pods on the host network share).
fn assert_ipcache(engine: &Engine, context: &dyn std::fmt::Debug) {
    let cluster = engine.cluster();
    let want: BTreeMap<IpAddr, (IdentityLabels, String)> = cluster
        .pods
        .values()
        .flat_map(|p| p.ips.iter().copied())
        .filter_map(|ip| {
            let holder = pod_at(cluster, ip)?;
            Some((ip, (IdentityLabels::of(cluster, holder), holder.key().to_string())))
        })
        .collect();
    let got: BTreeMap<IpAddr, (IdentityLabels, String)> = engine
        .ipcache()
        .map(|(ip, id)| {
            let labels = engine.identities().labels(id).cloned().expect("a live identity");
            let (_, holder) = engine.ip_holder(&ip).expect("an ipcache entry has a holder");
            (ip, (labels, holder.to_string()))
        })
        .collect();
    assert_eq!(got, want, "ipcache after {context:?}");
}

/// Checks every flow of one case; returns how many flows, and how many allowed.
fn check(seed: u64) -> (u64, u64) {
    let (mut flows, mut allowed) = (0, 0);
    let cluster = cluster(seed);
    let engines = engines(&cluster);
    let mut simulations = Vec::new();
    for (engine, node_ips) in &engines {
        assert_ipcache(engine, &seed);
        simulations.push(Simulation::from_engine(engine, node_ips).expect("compiled state has valid keys"));
    }
    let externals = [
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 200)),
        IpAddr::V4(Ipv4Addr::new(192, 168, 3, 4)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x77)),
    ];
    // Each pod at the addresses it holds; pods on the host network at their
    // node's.
    let mut parties: Vec<Party<'_>> = cluster
        .pods
        .values()
        .flat_map(|p| p.ips.iter().map(move |ip| (p, *ip)))
        .filter(|(p, ip)| p.host_network || pod_at(&cluster, *ip).is_some_and(|h| h.key() == p.key()))
        .map(|(p, ip)| Party::Pod(p, ip))
        .collect();
    parties.extend(externals.iter().map(|ip| Party::External(*ip)));
    let nodes: Vec<Party<'_>> =
        NODES.iter().flat_map(|(_, ips)| ips.iter().map(|ip| Party::Node(*ip))).collect();
    let endpoint = |p: &Party<'_>| matches!(p, Party::Pod(pod, _) if !pod.host_network);
    for client in parties.iter().chain(&nodes) {
        for server in &parties {
            let same_pod =
                matches!((client, server), (Party::Pod(a, _), Party::Pod(b, _)) if a.key() == b.key());
            if client.ip().is_ipv4() != server.ip().is_ipv4() || same_pod {
                continue;
            }
            if !endpoint(client) && !endpoint(server) {
                continue;
            }
            // A node is the node only to its own pods; to others, an address.
            let client = match (*client, server) {
                (Party::Node(ip), Party::Pod(pod, _)) => {
                    let home = NODES.iter().find(|(n, _)| pod.node.as_deref() == Some(*n));
                    if home.is_some_and(|(_, ips)| ips.contains(&ip)) {
                        Party::Node(ip)
                    } else {
                        Party::External(ip)
                    }
                }
                (c, _) => c,
            };
            for protocol in PROTOCOLS {
                for port in PROBE_PORTS {
                    flows += 1;
                    let want = oracle::evaluate(&cluster, client, *server, protocol, port);
                    // Each side is judged by its own node's engine.
                    let got = simulations.iter().all(|s| s.allows(client, *server, protocol, port));
                    assert_eq!(
                        got,
                        want.allowed,
                        "compiled and oracle disagree on {} -> {} {protocol}/{port} (seed {seed})\noracle: {want:#?}\ncluster: {cluster:#?}",
                        client.ip(),
                        server.ip(),
                    );
                    allowed += u64::from(got);
                }
            }
        }
    }
    (flows, allowed)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(1000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_entries_agree_with_the_oracle(seed in any::<u64>()) {
        check(seed);
    }
}

/// Guards the generator: the cases must mix allowed and denied flows, or
/// agreement would prove little.
#[test]
fn generated_cases_mix_verdicts() {
    let (mut policies, mut isolated, mut flows, mut allowed) = (0, 0, 0, 0);
    let (mut host_network, mut shared) = (0, 0);
    for seed in 0..200 {
        let c = cluster(seed);
        policies += c.policies.len();
        host_network += c.pods.values().filter(|p| p.host_network).count();
        let owners: Vec<IpAddr> = c.pods.values().filter(|p| p.owns_addresses()).map(|p| p.ips[0]).collect();
        shared += owners.len() - owners.iter().collect::<BTreeSet<_>>().len();
        for (engine, _) in engines(&c) {
            isolated +=
                engine.endpoints().values().filter(|p| p.ingress.isolated || p.egress.isolated).count();
        }
        let (f, a) = check(seed);
        flows += f;
        allowed += a;
    }
    eprintln!("{flows} flows, {allowed} allowed, {policies} policies, {isolated} isolated endpoints");
    eprintln!("{host_network} pods on the host network, {shared} pods claiming an address another claims");
    assert!(host_network > 100 && shared > 50, "{host_network} on the host network, {shared} shared");
    assert!(flows > 100_000, "{flows} flows");
    assert!(allowed * 10 > flows && allowed * 10 < flows * 9, "{allowed} of {flows} allowed");
}

/// An endpoint's policy with identities replaced by their labels, so that two
/// engines that numbered identities differently compare equal.
type Portable = Vec<(bool, BTreeSet<(Option<IdentityLabels>, AllowEntry)>, String)>;

fn portable(policy: &EndpointPolicy, ids: &Identities) -> Portable {
    [&policy.ingress, &policy.egress]
        .into_iter()
        .map(|d| {
            let allow = d
                .allow
                .iter()
                .map(|a| (ids.labels(a.peer).cloned(), AllowEntry { peer: 0, ..a.clone() }))
                .collect();
            (d.isolated, allow, format!("{:?}", d.prefixes))
        })
        .collect()
}

/// From scratch: fresh identities, every local endpoint compiled.
fn from_scratch(cluster: &Cluster) -> std::collections::BTreeMap<String, Portable> {
    let mut ids = Identities::default();
    let mut pod_identity = std::collections::BTreeMap::new();
    for pod in cluster.pods.values().filter(|p| p.owns_addresses()) {
        pod_identity.insert(pod.key(), ids.acquire(IdentityLabels::of(cluster, pod)));
    }
    let by_identity = pods_by_identity(&pod_identity);
    let plans = PlanCache::default();
    let compiler = Compiler::new(cluster, &ids, &by_identity, &plans);
    cluster
        .pods
        .values()
        .filter(|p| p.node.as_deref() == Some("node") && p.owns_addresses())
        .map(|p| (p.key().to_string(), portable(&compiler.endpoint(p), &ids)))
        .collect()
}

fn engine_view(engine: &Engine) -> std::collections::BTreeMap<String, Portable> {
    engine.endpoints().iter().map(|(k, p)| (k.to_string(), portable(p, engine.identities()))).collect()
}

/// A random change to a cluster, as the API would deliver it.
fn mutation(rng: &mut Rng, cluster: &Cluster, round: u8) -> Change {
    let pods: Vec<&Pod> = cluster.pods.values().collect();
    match rng.below(9) {
        0 | 1 if !pods.is_empty() => {
            let mut pod = (*rng.pick(&pods)).clone();
            let app = rng.pick(&["a", "b", "c", "d"]).to_string();
            pod.labels.insert("app".into(), app);
            if rng.chance(30) {
                pod.labels.remove("tier");
            }
            Change::UpsertPod(pod)
        }
        2 => {
            let ns = rng.pick(&NAMESPACES);
            let mut l = cluster.namespaces[*ns].labels.clone();
            if l.remove("team").is_none() {
                l.insert("team".into(), rng.pick(&["a", "b"]).to_string());
            }
            Change::UpsertNamespace(Namespace { name: ns.to_string(), labels: l })
        }
        3 if !pods.is_empty() => Change::DeletePod(rng.pick(&pods).key()),
        4 if !pods.is_empty() => {
            // A new pod, or a pod whose ports changed, possibly on a reused address.
            let template = (*rng.pick(&pods)).clone();
            let mut pod =
                Pod { name: format!("n{round}"), created: lifetime(rng), deleting: false, ..template };
            if rng.chance(50) {
                pod.ports.iter_mut().for_each(|p| p.port = p.port.wrapping_add(1));
            }
            if rng.chance(50) {
                pod.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100 + round))];
            }
            Change::UpsertPod(pod)
        }
        7 if !pods.is_empty() => {
            // A status update: terminating, finished, or back (an update
            // seen out of order); the order of updates must not matter.
            let mut pod = (*rng.pick(&pods)).clone();
            match rng.below(4) {
                0 | 1 => pod.deleting = !pod.deleting,
                2 => pod.finished = !pod.finished,
                _ => pod.created = lifetime(rng),
            }
            Change::UpsertPod(pod)
        }
        8 if !pods.is_empty() => {
            // A pod taking another's address (or a node's, on the host
            // network), older or newer than it.
            let (donor, template) = (*rng.pick(&pods), *rng.pick(&pods));
            Change::UpsertPod(Pod {
                name: format!("r{round}"),
                ips: donor.ips.clone(),
                node: donor.node.clone(),
                host_network: donor.host_network,
                created: lifetime(rng),
                deleting: rng.chance(20),
                finished: false,
                ..template.clone()
            })
        }
        5 if !cluster.policies.is_empty() => {
            let keys: Vec<_> = cluster.policies.keys().cloned().collect();
            Change::DeletePolicy(rng.pick(&keys).clone())
        }
        _ => {
            let donor = self::cluster(rng.next());
            match donor.policies.values().next() {
                Some(p) => Change::UpsertPolicy(NetworkPolicy {
                    name: format!("pol{}", rng.below(3)),
                    namespace: rng.pick(&NAMESPACES).to_string(),
                    ..p.clone()
                }),
                None => Change::DeleteNamespace("gone".into()),
            }
        }
    }
}

fn check_incremental(seed: u64) {
    let full = cluster(seed);
    let mut rng = Rng(seed ^ 0x5eed);
    let mut changes: Vec<Change> = full.namespaces.values().cloned().map(Change::UpsertNamespace).collect();
    changes.extend(full.pods.values().cloned().map(Change::UpsertPod));
    changes.extend(full.policies.values().cloned().map(Change::UpsertPolicy));
    // Any arrival order, one change at a time.
    for i in (1..changes.len()).rev() {
        changes.swap(i, rng.below(i + 1));
    }
    let mut engine = Engine::new("node");
    for c in changes {
        engine.apply([c]);
    }
    assert_eq!(engine_view(&engine), from_scratch(engine.cluster()), "after the initial load");
    for round in 0..12 {
        let change = mutation(&mut rng, engine.cluster(), round);
        let before = engine_view(&engine);
        let diff = engine.apply([change.clone()]);
        let after = engine_view(&engine);
        assert_eq!(after, from_scratch(engine.cluster()), "after {change:?}");
        // The diff names exactly the endpoints that changed.
        let changed: BTreeSet<String> =
            after.keys().chain(before.keys()).filter(|k| before.get(*k) != after.get(*k)).cloned().collect();
        let reported: BTreeSet<String> = diff.endpoints.keys().map(|k| k.to_string()).collect();
        assert_eq!(reported, changed, "diff after {change:?}");
        // The ipcache follows the pods: each address goes to its holder
        // whatever the order of updates.
        assert_ipcache(&engine, &change);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    /// Incremental changes leave the engine exactly where a compile from
    /// scratch would, and its diffs name exactly the endpoints that changed.
    #[test]
    fn incremental_engine_matches_a_full_compile(seed in any::<u64>()) {
        check_incremental(seed);
    }
}
