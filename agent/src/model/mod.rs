//! The cluster as policy sees it: plain structs, converted and validated from
//! the Kubernetes API types (`convert`), matched by label selectors
//! (`selector`). Nothing here does I/O.

mod cluster;
mod convert;
mod labels;
mod selector;

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use cluster::{Cluster, ObjectKey, address_holders};
pub use convert::{
    ModelError, namespace_from_api, network_policy_fail_closed, network_policy_from_api, pod_from_api,
    service_from_api,
};
pub use labels::Labels;
pub use selector::{LabelSelector, Operator, Requirement};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => portcullis_common::IPPROTO_TCP,
            Protocol::Udp => portcullis_common::IPPROTO_UDP,
            Protocol::Sctp => portcullis_common::IPPROTO_SCTP,
        }
    }

    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// An inclusive port range (`port` .. `endPort`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        PortRange { start: port, end: port }
    }

    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// Pods on the host network share the node's addresses; policy does not
    /// apply to them (as upstream), and no pod selector picks them as a
    /// peer: their traffic is their node's.
    pub host_network: bool,
    /// Succeeded or Failed: its addresses are given back (and may be reused
    /// by another pod), so it has none here.
    pub finished: bool,
    pub ports: Vec<ContainerPort>,
    /// `metadata.creationTimestamp`, in seconds since the epoch; `None` when
    /// the object has none (manifest files): older than any that has one.
    pub created: Option<i64>,
    /// `metadata.deletionTimestamp` is set: the pod is terminating.
    pub deleting: bool,
}

impl Pod {
    /// The number a named port resolves to on this pod, for this protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports.iter().find(|p| p.protocol == protocol && p.name.as_deref() == Some(name)).map(|p| p.port)
    }

    pub fn key(&self) -> PodKey {
        PodKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// Whether its addresses are its own, so that they carry its identity:
    /// a pod on the host network has its node's, and a finished pod gave
    /// its back.
    pub fn owns_addresses(&self) -> bool {
        !self.host_network && !self.finished && !self.ips.is_empty()
    }

    /// Among pods that own one address (`owns_addresses`), the greatest
    /// holds it: one that is not being deleted over one that is, then the
    /// newest by creation, then the first in `namespace/name` order. The
    /// order of updates never matters, so a terminating pod's late status
    /// update does not take a reused address back from its new pod.
    pub fn address_precedence(&self) -> impl Ord + '_ {
        (!self.deleting, self.created, std::cmp::Reverse((&self.namespace, &self.name)))
    }
}

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A NetworkPolicy (networking.k8s.io/v1) with `policyTypes` resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: LabelSelector,
    /// The policy isolates selected pods for ingress (`policyTypes` has
    /// Ingress, or was absent).
    pub affects_ingress: bool,
    /// `policyTypes` has Egress, or was absent and egress rules exist.
    pub affects_egress: bool,
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl NetworkPolicy {
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn affects(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.affects_ingress,
            Direction::Egress => self.affects_egress,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// One ingress or egress rule. Empty `peers`: every peer; empty `ports`: every
/// port and protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by labels. `namespaces: None` means the policy's own
    /// namespace; `pods: None` means every pod of the chosen namespaces.
    Pods { namespaces: Option<LabelSelector>, pods: Option<LabelSelector> },
    /// Addresses in `cidr` but in none of `except` (each inside `cidr`).
    IpBlock { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub protocol: Protocol,
    /// `None`: every port of the protocol.
    pub port: Option<PortRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortRef {
    Numbers(PortRange),
    /// A container port name, resolved against the server pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    /// Other addresses kube-proxy translates like the ClusterIPs:
    /// `spec.externalIPs` and the load balancer's `status` ingress IPs.
    pub external_ips: Vec<IpAddr>,
    pub selector: Option<Labels>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
    /// The port on every node address (NodePort and LoadBalancer Services).
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}
