//! The compiler: for an endpoint (a local pod) and each direction, whether it
//! is isolated and the allow entries the datapath needs. Pure and
//! deterministic: the same cluster gives the same entries, in the same order.
//!
//! Peers become identities (pod selectors are evaluated once per identity,
//! not per pod) or prefixes (ipBlocks). Prefixes carry DESIGN §2's except
//! semantics: every `cidr` and `except` is a prefix whose allowance is the
//! union of the peers that contain it and do not except it, so the longest
//! matching prefix answers exactly. Named ports resolve against the server:
//! the endpoint itself for ingress; each destination pod for egress, by
//! identity where all its pods agree and by address where they do not.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use super::identity::{Identities, IdentityLabels};
use crate::{
    compiled::{AllowEntry, DirectionPolicy, PrefixEntry},
    model::{
        Cluster, Direction, NetworkPolicy, ObjectKey, Peer, Pod, PodKey, PortRange, PortRef, PortSpec,
        Protocol,
    },
};

/// Both directions of one endpoint. Shared (`Arc`): endpoints whose policy
/// is the same (a Deployment's replicas) hold one copy, and so do the
/// states built from them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    pub ingress: Arc<DirectionPolicy>,
    pub egress: Arc<DirectionPolicy>,
}

/// A stable, non-zero number naming one rule of one policy in flow events.
pub fn rule_cookie(namespace: &str, name: &str, direction: Direction, index: usize) -> u32 {
    // FNV-1a: deterministic across runs and machines.
    let mut h: u32 = 0x811c_9dc5;
    for part in [namespace.as_bytes(), b"/", name.as_bytes(), b"/", direction.to_string().as_bytes()] {
        for &b in part {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
    }
    h = (h ^ index as u32).wrapping_mul(0x0100_0193);
    h.max(1)
}

/// Does a pod peer of a policy in `policy_ns` select pods with these labels?
pub fn pod_peer_matches(policy_ns: &str, peer: &Peer, who: &IdentityLabels) -> bool {
    let Peer::Pods { namespaces, pods } = peer else { return false };
    let ns_ok = match namespaces {
        None => who.namespace == policy_ns,
        Some(sel) => sel.matches(&who.namespace_labels),
    };
    ns_ok && pods.as_ref().is_none_or(|s| s.matches(&who.pod_labels))
}

/// A rule with its peers resolved; shared by every endpoint the policy selects.
struct RulePlan {
    cookie: u32,
    any_peer: bool,
    identities: Vec<u32>,
    blocks: Vec<(IpNet, Vec<IpNet>)>,
    ports: Vec<PortSpec>,
    /// Egress named ports, resolved against the destination pods.
    named: Vec<NamedTarget>,
}

enum NamedTarget {
    Identity(u32, Protocol, u16),
    Address(IpAddr, Protocol, u16),
}

struct PolicyPlan {
    ingress: Vec<RulePlan>,
    egress: Vec<RulePlan>,
}

/// The pods of each identity: where egress named ports resolve.
pub type PodsByIdentity = HashMap<u32, BTreeSet<PodKey>>;

pub fn pods_by_identity(pod_identity: &BTreeMap<PodKey, u32>) -> PodsByIdentity {
    let mut out = PodsByIdentity::new();
    for (key, id) in pod_identity {
        out.entry(*id).or_default().insert(key.clone());
    }
    out
}

/// Policies with their peers resolved, kept between compiles. Whoever changes
/// what a plan depends on (the policy, identities its peers match, named-port
/// resolution on its destinations) invalidates it.
#[derive(Default)]
pub struct PlanCache(RefCell<HashMap<ObjectKey, Arc<PolicyPlan>>>);

impl PlanCache {
    pub fn invalidate(&self, policy: &ObjectKey) {
        self.0.borrow_mut().remove(policy);
    }

    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

pub struct Compiler<'a> {
    cluster: &'a Cluster,
    identities: &'a Identities,
    pods_by_identity: &'a PodsByIdentity,
    plans: &'a PlanCache,
    /// Directions compiled by this compiler, by what they depend on: pods
    /// with different labels but the same selecting policies (and, for
    /// ingress, the same named ports) get the same entries, compiled once.
    compiled: RefCell<HashMap<DirectionInputs, Arc<DirectionPolicy>>>,
    /// Which pod holds each address (`Cluster::address_holders`), read
    /// when an egress named port first resolves per address.
    holders: std::cell::OnceCell<HashMap<IpAddr, &'a Pod>>,
}

/// What a direction's entries depend on, beyond the cluster: the policies
/// selecting the pod (by their place in its namespace) and, for ingress,
/// its ports (named ports resolve on the pod itself; egress ones resolve
/// on the destinations).
#[derive(PartialEq, Eq, Hash)]
struct DirectionInputs {
    direction: Direction,
    namespace: String,
    selecting: Vec<u32>,
    ports: Vec<crate::model::ContainerPort>,
}

impl<'a> Compiler<'a> {
    pub fn new(
        cluster: &'a Cluster,
        identities: &'a Identities,
        pods_by_identity: &'a PodsByIdentity,
        plans: &'a PlanCache,
    ) -> Self {
        Compiler {
            cluster,
            identities,
            pods_by_identity,
            plans,
            compiled: RefCell::default(),
            holders: std::cell::OnceCell::new(),
        }
    }

    /// The addresses `pod` holds: an egress named port resolved on it
    /// applies there only (an address it shares with a newer pod is that
    /// pod's; a pod on the host network holds none).
    fn held<'p>(&self, pod: &'p Pod) -> impl Iterator<Item = IpAddr> + 'p {
        let holders = self.holders.get_or_init(|| self.cluster.address_holders());
        let held: Vec<IpAddr> = pod
            .ips
            .iter()
            .copied()
            .filter(|ip| holders.get(ip).is_some_and(|h| std::ptr::eq(*h, pod)))
            .collect();
        held.into_iter()
    }

    /// Both directions of `pod`'s policy. Pods whose directions depend on
    /// the same inputs share one `Arc` of each.
    pub fn endpoint(&self, pod: &Pod) -> EndpointPolicy {
        EndpointPolicy {
            ingress: self.direction_of(pod, Direction::Ingress),
            egress: self.direction_of(pod, Direction::Egress),
        }
    }

    fn direction_of(&self, pod: &Pod, direction: Direction) -> Arc<DirectionPolicy> {
        let selecting: Vec<(u32, &NetworkPolicy)> = self
            .cluster
            .policies_in(&pod.namespace)
            .enumerate()
            .filter(|(_, p)| p.affects(direction) && p.pod_selector.matches(&pod.labels))
            .map(|(i, p)| (i as u32, p))
            .collect();
        let inputs = DirectionInputs {
            direction,
            namespace: pod.namespace.clone(),
            selecting: selecting.iter().map(|(i, _)| *i).collect(),
            ports: if direction == Direction::Ingress { pod.ports.clone() } else { Vec::new() },
        };
        if let Some(done) = self.compiled.borrow().get(&inputs) {
            return done.clone();
        }
        let policies: Vec<&NetworkPolicy> = selecting.into_iter().map(|(_, p)| p).collect();
        let done = Arc::new(self.direction(pod, direction, &policies));
        self.compiled.borrow_mut().insert(inputs, done.clone());
        done
    }

    /// `pod`'s entries in `direction`, given the policies selecting it there.
    fn direction(&self, pod: &Pod, direction: Direction, selecting: &[&NetworkPolicy]) -> DirectionPolicy {
        let mut out = DirectionPolicy::default();
        let mut prefix_peers: Vec<(IpNet, Vec<IpNet>, Vec<AllowEntry>)> = Vec::new();
        for &policy in selecting {
            out.isolated = true;
            let plan = self.plan(policy);
            let rules = match direction {
                Direction::Ingress => &plan.ingress,
                Direction::Egress => &plan.egress,
            };
            for rule in rules {
                let l4 = rule_l4(rule, direction, pod);
                let entries = |peer: u32| {
                    l4.iter().map(move |&(protocol, ports)| AllowEntry {
                        peer,
                        protocol,
                        ports,
                        rule: rule.cookie,
                    })
                };
                if rule.any_peer {
                    out.allow.extend(entries(0));
                }
                for &id in &rule.identities {
                    out.allow.extend(entries(id));
                }
                if !l4.is_empty() {
                    for (cidr, except) in &rule.blocks {
                        prefix_peers.push((*cidr, except.clone(), entries(0).collect()));
                    }
                }
                for target in &rule.named {
                    let entry = |protocol: Protocol, port: u16, peer: u32| AllowEntry {
                        peer,
                        protocol: Some(protocol),
                        ports: Some(PortRange::single(port)),
                        rule: rule.cookie,
                    };
                    match *target {
                        NamedTarget::Identity(id, protocol, port) => {
                            out.allow.push(entry(protocol, port, id))
                        }
                        NamedTarget::Address(ip, protocol, port) => {
                            prefix_peers.push((IpNet::from(ip), Vec::new(), vec![entry(protocol, port, 0)]));
                        }
                    }
                }
            }
        }
        out.allow.sort();
        out.allow.dedup_by(|a, b| (a.peer, a.protocol, a.ports) == (b.peer, b.protocol, b.ports));
        out.prefixes = prefix_union(&prefix_peers);
        out
    }

    fn plan(&self, policy: &NetworkPolicy) -> Arc<PolicyPlan> {
        let key = (policy.namespace.clone(), policy.name.clone());
        if let Some(plan) = self.plans.0.borrow().get(&key) {
            return plan.clone();
        }
        let rules = |direction: Direction| {
            policy
                .rules(direction)
                .iter()
                .enumerate()
                .map(|(i, rule)| {
                    let cookie = rule_cookie(&policy.namespace, &policy.name, direction, i);
                    self.rule_plan(policy, direction, rule, cookie)
                })
                .collect()
        };
        let plan =
            Arc::new(PolicyPlan { ingress: rules(Direction::Ingress), egress: rules(Direction::Egress) });
        self.plans.0.borrow_mut().insert(key, plan.clone());
        plan
    }

    fn rule_plan(
        &self,
        policy: &NetworkPolicy,
        direction: Direction,
        rule: &crate::model::Rule,
        cookie: u32,
    ) -> RulePlan {
        let any_peer = rule.peers.is_empty();
        let mut identities = BTreeSet::new();
        let mut blocks = Vec::new();
        for peer in &rule.peers {
            match peer {
                Peer::IpBlock { cidr, except } => blocks.push((*cidr, except.clone())),
                Peer::Pods { namespaces, .. } => {
                    let namespaces: Vec<&str> = match namespaces {
                        None => vec![policy.namespace.as_str()],
                        Some(sel) => self
                            .identities
                            .namespaces()
                            .filter(|ns| sel.matches(self.cluster.namespace_labels(ns)))
                            .collect(),
                    };
                    for ns in namespaces {
                        for id in self.identities.in_namespace(ns) {
                            let Some(labels) = self.identities.labels(id) else { continue };
                            if pod_peer_matches(&policy.namespace, peer, labels) {
                                identities.insert(id);
                            }
                        }
                    }
                }
            }
        }
        let identities: Vec<u32> = identities.into_iter().collect();
        let mut named = Vec::new();
        if direction == Direction::Egress {
            for spec in &rule.ports {
                let Some(PortRef::Named(name)) = &spec.port else { continue };
                let targets: Vec<u32> = if any_peer {
                    let mut all: Vec<u32> = self.pods_by_identity.keys().copied().collect();
                    all.sort_unstable();
                    all
                } else {
                    identities.clone()
                };
                for id in targets {
                    self.resolve_for_identity(id, name, spec.protocol, &mut named);
                }
                for (cidr, except) in &blocks {
                    for pod in self.cluster.pods.values().filter(|p| p.owns_addresses()) {
                        let Some(port) = pod.named_port(name, spec.protocol) else { continue };
                        for ip in self.held(pod) {
                            if cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip)) {
                                named.push(NamedTarget::Address(ip, spec.protocol, port));
                            }
                        }
                    }
                }
            }
        }
        RulePlan { cookie, any_peer, identities, blocks, ports: rule.ports.clone(), named }
    }

    /// Resolves a named port on every pod of an identity: one entry for the
    /// identity when they agree, one per address when they do not (the
    /// addresses each holds: one it shares with a pod that holds it is that
    /// pod's).
    fn resolve_for_identity(&self, id: u32, name: &str, protocol: Protocol, out: &mut Vec<NamedTarget>) {
        let pods: Vec<&Pod> = self
            .pods_by_identity
            .get(&id)
            .into_iter()
            .flatten()
            .filter_map(|k| self.cluster.pods.get(k))
            .collect();
        let ports: Vec<Option<u16>> = pods.iter().map(|p| p.named_port(name, protocol)).collect();
        match ports.first() {
            Some(Some(first)) if ports.iter().all(|p| *p == Some(*first)) => {
                out.push(NamedTarget::Identity(id, protocol, *first));
            }
            _ => {
                for (pod, port) in pods.iter().zip(ports) {
                    if let Some(port) = port {
                        out.extend(self.held(pod).map(|ip| NamedTarget::Address(ip, protocol, port)));
                    }
                }
            }
        }
    }
}

/// The protocol/port pairs a rule allows on this endpoint, except egress named
/// ports (those depend on the destination). Empty: the rule allows nothing.
fn rule_l4(rule: &RulePlan, direction: Direction, pod: &Pod) -> Vec<(Option<Protocol>, Option<PortRange>)> {
    if rule.ports.is_empty() {
        return vec![(None, None)];
    }
    let mut out = Vec::new();
    for spec in &rule.ports {
        match &spec.port {
            None => out.push((Some(spec.protocol), None)),
            Some(PortRef::Numbers(range)) => out.push((Some(spec.protocol), Some(*range))),
            Some(PortRef::Named(name)) if direction == Direction::Ingress => {
                if let Some(port) = pod.named_port(name, spec.protocol) {
                    out.push((Some(spec.protocol), Some(PortRange::single(port))));
                }
            }
            Some(PortRef::Named(_)) => {}
        }
    }
    out
}

/// DESIGN §2: every cidr and except is a prefix; each prefix allows the union
/// of what the peers containing it (and not excepting it) allow. The peers
/// containing a prefix are found among its ancestors (at most 33 or 129
/// lookups), not by testing every peer: an egress named-port rule to pods
/// all over the cluster makes hundreds of /32 peers, and testing each
/// against each made a compile quadratic in them.
fn prefix_union(peers: &[(IpNet, Vec<IpNet>, Vec<AllowEntry>)]) -> Vec<PrefixEntry> {
    let bounds: BTreeSet<IpNet> =
        peers.iter().flat_map(|(c, ex, _)| std::iter::once(*c).chain(ex.iter().copied())).collect();
    let mut by_cidr: HashMap<IpNet, Vec<usize>> = HashMap::new();
    for (i, (cidr, _, _)) in peers.iter().enumerate() {
        by_cidr.entry(cidr.trunc()).or_default().push(i);
    }
    // Only the lengths some peer has can hold an ancestor: a few (/0, /8,
    // /32), where trying all 33 made thousands of /32 peers cost 33 hash
    // lookups each.
    let lengths: BTreeSet<(bool, u8)> =
        by_cidr.keys().map(|c| (c.addr().is_ipv4(), c.prefix_len())).collect();
    bounds
        .into_iter()
        .map(|prefix| {
            let v4 = prefix.addr().is_ipv4();
            let mut allow: Vec<AllowEntry> = lengths
                .iter()
                .filter(|&&(family, len)| family == v4 && len <= prefix.prefix_len())
                .filter_map(|&(_, len)| IpNet::new(prefix.addr(), len).ok())
                .filter_map(|ancestor| by_cidr.get(&ancestor.trunc()))
                .flatten()
                .map(|&i| &peers[i])
                .filter(|(_, except, _)| !except.iter().any(|e| e.contains(&prefix)))
                .flat_map(|(_, _, a)| a.iter().cloned())
                .collect();
            allow.sort();
            allow.dedup_by(|a, b| (a.protocol, a.ports) == (b.protocol, b.ports));
            PrefixEntry { cidr: prefix, allow }
        })
        .collect()
}
