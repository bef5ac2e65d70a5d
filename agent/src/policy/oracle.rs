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
    /// A pod, at one of its addresses.
    Pod(&'a Pod, IpAddr),
    /// The node the server pod runs on: always admitted.
    Node(IpAddr),
    /// Anything else.
    External(IpAddr),
}

impl Party<'_> {
    pub fn ip(&self) -> IpAddr {
        match *self {
            Party::Pod(_, ip) | Party::Node(ip) | Party::External(ip) => ip,
        }
    }

    fn pod(&self) -> Option<&Pod> {
        match self {
            Party::Pod(p, _) => Some(p),
            _ => None,
        }
    }
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
    let egress = match client.pod() {
        Some(pod) => side(cluster, pod, Direction::Egress, &client, &server, protocol, port),
        None => SideVerdict { allowed: true, ..Default::default() },
    };
    let ingress = match server.pod() {
        // The node may always reach its pods.
        Some(_) if matches!(client, Party::Node(_)) => SideVerdict { allowed: true, ..Default::default() },
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
    for policy in cluster.policies.values() {
        if policy.namespace != pod.namespace
            || !policy.affects(direction)
            || !policy.pod_selector.matches(&pod.labels)
        {
            continue;
        }
        out.selected_by.push(format!("{}/{}", policy.namespace, policy.name));
        for (index, rule) in policy.rules(direction).iter().enumerate() {
            let peer_ok =
                rule.peers.is_empty() || rule.peers.iter().any(|p| peer_matches(cluster, policy, p, remote));
            let port_ok = rule.ports.is_empty()
                || rule.ports.iter().any(|spec| {
                    spec.protocol == protocol
                        && match &spec.port {
                            None => true,
                            Some(PortRef::Numbers(range)) => range.contains(port),
                            // Named ports belong to the server pod.
                            Some(PortRef::Named(name)) => {
                                server.pod().and_then(|s| s.named_port(name, protocol)) == Some(port)
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

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer, remote: &Party<'_>) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            let ip = remote.ip();
            cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
        }
        Peer::Pods { namespaces, pods } => {
            let Some(remote) = remote.pod() else { return false };
            let ns_ok = match namespaces {
                None => remote.namespace == policy.namespace,
                Some(sel) => sel.matches(cluster.namespace_labels(&remote.namespace)),
            };
            ns_ok && pods.as_ref().is_none_or(|s| s.matches(&remote.labels))
        }
    }
}
