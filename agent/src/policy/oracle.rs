//! The oracle: the Kubernetes rules, evaluated plainly for one connection.
//! Deliberately naive (no identities, no prefixes, no caches): it is the
//! specification in code, the judge of the compiler, and the basis of
//! `agent policy trace`.

use std::net::IpAddr;

use serde::Serialize;

use crate::model::{Cluster, Direction, NetworkPolicy, Peer, Pod, PortRef, Protocol};

/// One side of a connection.
#[derive(Clone, Copy, Debug)]
pub enum Party<'a> {
    /// A pod, at one of its addresses. A pod on the host network is its
    /// node's address: policy does not apply to it, no pod selector picks
    /// it, and to a pod on its own node it is that node.
    Pod(&'a Pod, IpAddr),
    /// The node the server pod runs on: always admitted.
    Node(IpAddr),
    /// Anything else.
    External(IpAddr),
}

impl<'a> Party<'a> {
    pub fn ip(&self) -> IpAddr {
        match *self {
            Party::Pod(_, ip) | Party::Node(ip) | Party::External(ip) => ip,
        }
    }

    /// The pod whose policy judges this side: none for a pod on the host
    /// network.
    fn endpoint(&self) -> Option<&'a Pod> {
        match *self {
            Party::Pod(p, _) if !p.host_network => Some(p),
            _ => None,
        }
    }

    /// The pod a peer is, seen from the other side: the one holding its
    /// address (`pod_at`). Peers are known by their address, so a pod on
    /// the host network is nobody's, and a pod that lost its address to
    /// another is that other.
    fn remote(&self, cluster: &'a Cluster) -> Option<&'a Pod> {
        match *self {
            Party::Pod(_, ip) => pod_at(cluster, ip),
            _ => None,
        }
    }
}

/// The pod holding `ip`. Pods on the host network never hold one (theirs
/// is their node's), nor do finished pods. Of several that claim it, one
/// not being deleted wins over one being deleted, then the newest
/// (`created`; unknown is oldest), then the first in `namespace/name`
/// order. Which was updated last does not matter.
pub fn pod_at(cluster: &Cluster, ip: IpAddr) -> Option<&Pod> {
    let mut best: Option<&Pod> = None;
    for pod in cluster.pods.values() {
        if pod.host_network || pod.finished || !pod.ips.contains(&ip) {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) if b.deleting != pod.deleting => b.deleting,
            // Strictly newer: on a tie the first in name order stays.
            Some(b) => pod.created > b.created,
        };
        if better {
            best = Some(pod);
        }
    }
    best
}

/// A rule that allowed the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
}

impl std::fmt::Display for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} {} rule {}", self.namespace, self.policy, self.direction, self.index)
    }
}

/// The verdict of one direction (the client's egress or the server's ingress).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SideVerdict {
    /// Policies of this direction that select the pod (empty: not isolated).
    pub selected_by: Vec<String>,
    /// Rules that allow the connection.
    pub allowed_by: Vec<RuleRef>,
    pub allowed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    pub egress: SideVerdict,
    pub ingress: SideVerdict,
}

/// Is a connection from `client` to `server` on `protocol`/`port` allowed?
pub fn evaluate(
    cluster: &Cluster,
    client: Party<'_>,
    server: Party<'_>,
    protocol: Protocol,
    port: u16,
) -> Verdict {
    let egress = match client.endpoint() {
        Some(pod) => side(cluster, pod, Direction::Egress, &client, &server, protocol, port),
        None => SideVerdict { allowed: true, ..Default::default() },
    };
    // A pod on the host network of the server's node is that node.
    let node_of = |server: &Pod| match client {
        Party::Node(_) => true,
        Party::Pod(c, _) => c.host_network && c.node.is_some() && c.node == server.node,
        Party::External(_) => false,
    };
    let ingress = match server.endpoint() {
        // The node may always reach its pods.
        Some(pod) if node_of(pod) => SideVerdict { allowed: true, ..Default::default() },
        Some(pod) => side(cluster, pod, Direction::Ingress, &client, &server, protocol, port),
        None => SideVerdict { allowed: true, ..Default::default() },
    };
    Verdict { allowed: egress.allowed && ingress.allowed, egress, ingress }
}

fn side(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    client: &Party<'_>,
    server: &Party<'_>,
    protocol: Protocol,
    port: u16,
) -> SideVerdict {
    let mut out = SideVerdict::default();
    let remote = if direction == Direction::Ingress { client } else { server };
    let remote_pod = remote.remote(cluster);
    // Named ports belong to the server pod: this one for ingress, the pod
    // at the destination address for egress.
    let server_pod = if direction == Direction::Ingress { Some(pod) } else { remote_pod };
    for policy in cluster.policies.values() {
        if policy.namespace != pod.namespace
            || !policy.affects(direction)
            || !policy.pod_selector.matches(&pod.labels)
        {
            continue;
        }
        out.selected_by.push(format!("{}/{}", policy.namespace, policy.name));
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            let peer_ok = rule.peers.is_empty()
                || rule.peers.iter().any(|p| peer_matches(cluster, policy, p, remote, remote_pod));
            let port_ok = rule.ports.is_empty()
                || rule.ports.iter().any(|spec| {
                    spec.protocol == protocol
                        && match &spec.port {
                            None => true,
                            Some(PortRef::Numbers(range)) => range.contains(port),
                            Some(PortRef::Named(name)) => {
                                server_pod.and_then(|s| s.named_port(name, protocol)) == Some(port)
                            }
                        }
                });
            if peer_ok && port_ok {
                out.allowed_by.push(RuleRef {
                    namespace: policy.namespace.clone(),
                    policy: policy.name.clone(),
                    direction,
                    index,
                });
            }
        }
    }
    out.allowed = out.selected_by.is_empty() || !out.allowed_by.is_empty();
    out
}

fn peer_matches(
    cluster: &Cluster,
    policy: &NetworkPolicy,
    peer: &Peer,
    remote: &Party<'_>,
    remote_pod: Option<&Pod>,
) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            let ip = remote.ip();
            cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
        }
        Peer::Pods { namespaces, pods } => {
            let Some(remote) = remote_pod else { return false };
            let ns_ok = match namespaces {
                None => remote.namespace == policy.namespace,
                Some(sel) => sel.matches(cluster.namespace_labels(&remote.namespace)),
            };
            ns_ok && pods.as_ref().is_none_or(|s| s.matches(&remote.labels))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Labels;

    /// The oracle's plain rule and the one the engine and the compiler
    /// share (`Pod::address_precedence`) pick the same holder, for every
    /// mix of three pods claiming one address.
    #[test]
    fn the_oracles_holder_is_the_compilers() {
        let ip = IpAddr::from([10, 0, 0, 7]);
        // (created, deleting, finished, host_network) of each pod.
        let states: Vec<(Option<i64>, bool, bool, bool)> = [None, Some(1), Some(2)]
            .into_iter()
            .flat_map(|c| [false, true].into_iter().map(move |d| (c, d)))
            .flat_map(|(c, d)| [(c, d, false, false), (c, d, true, false), (c, d, false, true)])
            .collect();
        let mut cases = 0;
        for a in &states {
            for b in &states {
                for c in &states {
                    let mut cluster = Cluster::default();
                    for (name, &(created, deleting, finished, host_network)) in [("a", a), ("b", b), ("c", c)]
                    {
                        cluster.add_pod(Pod {
                            namespace: "x".into(),
                            name: name.into(),
                            labels: Labels::new(),
                            ips: vec![ip],
                            node: Some("n".into()),
                            host_network,
                            finished,
                            ports: vec![],
                            created,
                            deleting,
                        });
                    }
                    let want = pod_at(&cluster, ip).map(Pod::key);
                    let got = cluster.address_holders().get(&ip).map(|p| p.key());
                    assert_eq!(got, want, "{a:?} {b:?} {c:?}");
                    cases += usize::from(want.is_some());
                }
            }
        }
        assert!(cases > 1000, "{cases}");
    }

    /// Peers are known by their address: a pod on the host network is its
    /// node's, which no pod selector picks; to a pod of its own node it is
    /// that node.
    #[test]
    fn a_pod_on_the_host_network_is_its_node() {
        let pod = |name: &str, node: &str, ip: [u8; 4], host_network: bool| Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: Labels::new(),
            ips: vec![IpAddr::from(ip)],
            node: Some(node.into()),
            host_network,
            finished: false,
            ports: vec![],
            created: None,
            deleting: false,
        };
        let mut cluster = Cluster::default();
        let web = pod("web", "n1", [10, 0, 0, 1], false);
        let (here, there) =
            (pod("agent", "n1", [192, 0, 2, 1], true), pod("proxy", "n2", [192, 0, 2, 2], true));
        for p in [&web, &here, &there] {
            cluster.add_pod(p.clone());
        }
        // Only pods of x (every one of them) may reach web.
        cluster.add_policy(NetworkPolicy {
            namespace: "x".into(),
            name: "p".into(),
            pod_selector: crate::model::LabelSelector::everything(),
            affects_ingress: true,
            affects_egress: false,
            ingress: vec![crate::model::Rule {
                peers: vec![Peer::Pods { namespaces: None, pods: None }],
                ports: vec![],
            }],
            egress: vec![],
        });
        let to_web = Party::Pod(&web, web.ips[0]);
        let from = |p: &Pod| evaluate(&cluster, Party::Pod(p, p.ips[0]), to_web, Protocol::Tcp, 80);
        assert!(from(&here).allowed, "its own node");
        let verdict = from(&there);
        assert!(!verdict.allowed && verdict.ingress.allowed_by.is_empty(), "{verdict:?}");
        // Not isolated themselves: policy does not apply to them.
        let back = evaluate(&cluster, to_web, Party::Pod(&there, there.ips[0]), Protocol::Tcp, 80);
        assert!(back.allowed && back.ingress.selected_by.is_empty(), "{back:?}");
    }
}
