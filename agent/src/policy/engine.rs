//! The incremental engine: holds the cluster and the compiled policy of every
//! local endpoint, and turns each change (a pod, namespace or policy added,
//! changed or deleted) into the endpoints it can affect, recompiled, and the
//! ipcache updates.
//!
//! Compiled entries name peers by identity, so most changes touch few
//! endpoints: a pod joining an existing identity changes only the ipcache.
//! What can change an endpoint's entries:
//! - a policy in its namespace that selects it (before or after the change);
//! - an identity appearing or disappearing that a peer of such a policy
//!   matches (or every identity, for rules without peers);
//! - for egress named ports, a change in how the destination pods resolve them;
//! - its own labels (which policies select it).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{Hash as _, Hasher as _},
    net::IpAddr,
    sync::{Arc, Weak},
};

use super::{
    compile::{Compiler, EndpointPolicy, PlanCache, PodsByIdentity, pod_peer_matches},
    identity::{Identities, IdentityLabels},
};
use crate::compiled::DirectionPolicy;
use crate::model::{
    Cluster, ContainerPort, Direction, Labels, Namespace, NetworkPolicy, ObjectKey, Peer, Pod, PodKey,
    PortRef, Service, address_holders,
};

#[derive(Clone, Debug)]
pub enum Change {
    UpsertNamespace(Namespace),
    DeleteNamespace(String),
    UpsertPod(Pod),
    DeletePod(PodKey),
    UpsertPolicy(NetworkPolicy),
    DeletePolicy(ObjectKey),
    /// Services change no endpoint's policy; the datapath mirrors their
    /// ClusterIPs so egress to them is judged after DNAT.
    UpsertService(Service),
    DeleteService(ObjectKey),
}

/// What a change did to the compiled state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Local endpoints whose policy changed: the new policy, or `None` when
    /// the endpoint is gone.
    pub endpoints: BTreeMap<PodKey, Option<EndpointPolicy>>,
    /// Addresses whose identity changed: the new one, or `None` when gone.
    pub ipcache: BTreeMap<IpAddr, Option<u32>>,
    /// Endpoints recompiled (changed or not): the cost of the change.
    pub recompiled: usize,
    /// Some Service's frontends changed.
    pub services: bool,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.ipcache.is_empty() && !self.services
    }
}

/// What the changes of one batch leave to do.
#[derive(Default)]
struct Pending {
    /// Local endpoints to recompile.
    affected: BTreeSet<PodKey>,
    ipcache: BTreeMap<IpAddr, Option<u32>>,
    /// Identities that appeared, and the labels of those that went.
    born: BTreeSet<u32>,
    dead: Vec<IdentityLabels>,
    /// Identities on which egress named ports may resolve differently now.
    named_churn: Vec<IdentityLabels>,
    services: bool,
}

pub struct Engine {
    node: String,
    cluster: Cluster,
    identities: Identities,
    pod_identity: BTreeMap<PodKey, u32>,
    pods_by_identity: PodsByIdentity,
    /// Policy plans, kept until what they depend on changes.
    plans: PlanCache,
    /// Pods claiming an address (those that own theirs: never one on the
    /// host network, whose address is its node's), in
    /// `Pod::address_precedence` order: the last holds it, whatever the
    /// order of updates (a reused address stays with its new pod when the
    /// terminating one's status changes), and when it goes the address
    /// falls back to the one before.
    ip_owner: HashMap<IpAddr, Vec<PodKey>>,
    endpoints: BTreeMap<PodKey, EndpointPolicy>,
    /// The pods this node enforces (`is_local`), by namespace: what a
    /// policy can select here, without walking its namespace's pods.
    local: BTreeSet<PodKey>,
    shared: SharedPolicies,
    /// What the ipcache and the identities went through since the state
    /// builder last took it.
    changes: IpcacheChanges,
    /// Addresses' identities as an earlier agent numbered them (its pinned
    /// ipcache), until the first complete view of the cluster (a batch
    /// with namespaces: the relist) decides which label sets keep theirs.
    recovered: HashMap<IpAddr, u32>,
    /// The numbers that relist gives label sets back (`plan_recovered`).
    planned: HashMap<IdentityLabels, u32>,
}

/// Addresses whose ipcache entry (identity, or the pod holding it) may have
/// changed, and whether identities came or went: what a consumer of the
/// ipcache must look at again. Recorded by every change the engine applies,
/// so it cannot miss one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpcacheChanges {
    pub addresses: BTreeSet<IpAddr>,
    pub identities: bool,
}

/// One copy of each distinct direction policy the endpoints hold: a
/// Deployment's 250 replicas compile to the same ~50 KB, kept once.
/// Every policy an endpoint holds went through here, so two equal
/// policies alive at once are one allocation.
#[derive(Default)]
struct SharedPolicies {
    by_hash: HashMap<u64, Vec<Weak<DirectionPolicy>>>,
    added: u64,
}

impl SharedPolicies {
    fn intern(&mut self, policy: Arc<DirectionPolicy>) -> Arc<DirectionPolicy> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        policy.hash(&mut h);
        let same = self.by_hash.entry(h.finish()).or_default();
        same.retain(|w| w.strong_count() > 0);
        if let Some(kept) = same.iter().filter_map(Weak::upgrade).find(|kept| **kept == *policy) {
            return kept;
        }
        same.push(Arc::downgrade(&policy));
        // Now and then, forget the policies no endpoint holds any more.
        self.added += 1;
        if self.added.is_multiple_of(256) {
            self.by_hash.retain(|_, v| {
                v.retain(|w| w.strong_count() > 0);
                !v.is_empty()
            });
        }
        policy
    }
}

/// A pod this node enforces: placed here, with addresses of its own (not on
/// the host network, not finished).
fn is_local(node: &str, pod: &Pod) -> bool {
    pod.node.as_deref() == Some(node) && pod.owns_addresses()
}

impl Engine {
    /// An engine for the endpoints of `node` (pods with `spec.nodeName` = it).
    pub fn new(node: impl Into<String>) -> Self {
        Engine {
            node: node.into(),
            cluster: Cluster::default(),
            identities: Identities::default(),
            pod_identity: BTreeMap::new(),
            pods_by_identity: PodsByIdentity::new(),
            plans: PlanCache::default(),
            ip_owner: HashMap::new(),
            endpoints: BTreeMap::new(),
            local: BTreeSet::new(),
            shared: SharedPolicies::default(),
            changes: IpcacheChanges::default(),
            recovered: HashMap::new(),
            planned: HashMap::new(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    pub fn identity_of(&self, pod: &PodKey) -> Option<u32> {
        self.pod_identity.get(pod).copied()
    }

    /// Compiled policy of every local endpoint.
    pub fn endpoints(&self) -> &BTreeMap<PodKey, EndpointPolicy> {
        &self.endpoints
    }

    fn is_local(&self, pod: &Pod) -> bool {
        is_local(&self.node, pod)
    }

    /// Applies a batch of changes and recompiles what they affect, once.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Diff {
        let changes: Vec<Change> = changes.into_iter().collect();
        let relist = changes.iter().any(|c| matches!(c, Change::UpsertNamespace(_)));
        if relist && !self.recovered.is_empty() {
            self.planned = self.plan_recovered(&changes);
            self.recovered.clear();
        }
        let mut pending = Pending::default();
        for change in changes {
            self.apply_one(change, &mut pending);
        }
        self.planned.clear();
        let Pending { mut affected, ipcache, born, dead, named_churn, services } = pending;
        self.changes.identities |= !born.is_empty() || !dead.is_empty();

        // Identities that came or went change the peer sets of the policies
        // whose peers match them.
        let mut churn: Vec<IdentityLabels> = dead;
        churn.extend(born.iter().filter_map(|id| self.identities.labels(*id).cloned()));
        if !churn.is_empty() || !named_churn.is_empty() {
            let policies: Vec<ObjectKey> = self
                .cluster
                .policies
                .iter()
                .filter(|(_, p)| {
                    Direction::ALL.into_iter().any(|d| {
                        p.affects(d)
                            && p.rules(d).iter().any(|r| {
                                let named = d == Direction::Egress
                                    && r.ports.iter().any(|s| matches!(s.port, Some(PortRef::Named(_))));
                                let has_block = r.peers.iter().any(|x| matches!(x, Peer::IpBlock { .. }));
                                let hit = |who: &IdentityLabels| {
                                    r.peers.iter().any(|x| pod_peer_matches(&p.namespace, x, who))
                                };
                                // Rules without peers name no identity, unless
                                // their named ports resolve on every pod.
                                let peers_moved = churn.iter().any(&hit)
                                    || (named && r.peers.is_empty() && !churn.is_empty());
                                let ports_moved = named
                                    && named_churn.iter().any(|w| r.peers.is_empty() || has_block || hit(w));
                                peers_moved || ports_moved
                            })
                    })
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in policies {
                self.plans.invalidate(&key);
                affected.extend(self.selected_local(&key));
            }
        }

        let mut diff = Diff { ipcache, services, ..Diff::default() };
        let compiler = Compiler::new(&self.cluster, &self.identities, &self.pods_by_identity, &self.plans);
        let (node, shared) = (self.node.as_str(), &mut self.shared);
        // A pod's policy depends on its namespace, labels and ports alone:
        // replicas are compiled (and interned) once per change.
        let mut same: HashMap<(&str, &Labels, &[ContainerPort]), EndpointPolicy> = HashMap::new();
        // The compiler hands pods with the same inputs one `Arc`: interned
        // (hashed whole) once each. Keyed by address, the compiled `Arc`
        // kept alongside so that no other takes its address.
        type Interned = (Arc<DirectionPolicy>, Arc<DirectionPolicy>);
        let mut interned: HashMap<*const DirectionPolicy, Interned> = HashMap::new();
        let mut intern = |policy: Arc<DirectionPolicy>| {
            let (_, kept) = interned
                .entry(Arc::as_ptr(&policy))
                .or_insert_with(|| (policy.clone(), shared.intern(policy.clone())));
            kept.clone()
        };
        for key in affected {
            let pod = self.cluster.pods.get(&key).filter(|p| is_local(node, p));
            let new = pod.map(|p| {
                same.entry((p.namespace.as_str(), &p.labels, p.ports.as_slice()))
                    .or_insert_with(|| {
                        let compiled = compiler.endpoint(p);
                        EndpointPolicy { ingress: intern(compiled.ingress), egress: intern(compiled.egress) }
                    })
                    .clone()
            });
            diff.recompiled += usize::from(new.is_some());
            // Interned: the same content is the same allocation (the old
            // one is alive, this engine holds it), so comparing addresses
            // is comparing policies, without walking 250 copies of 50 KB.
            let unchanged = match (self.endpoints.get(&key), &new) {
                (Some(old), Some(new)) => {
                    Arc::ptr_eq(&old.ingress, &new.ingress) && Arc::ptr_eq(&old.egress, &new.egress)
                }
                (None, None) => true,
                _ => false,
            };
            if !unchanged {
                diff.endpoints.insert(key.clone(), new);
            }
        }
        for (key, new) in &diff.endpoints {
            match new {
                Some(p) => self.endpoints.insert(key.clone(), p.clone()),
                None => self.endpoints.remove(key),
            };
        }
        diff
    }

    /// Local endpoints a policy selects (in its namespace).
    fn selected_local(&self, key: &ObjectKey) -> Vec<PodKey> {
        let Some(policy) = self.cluster.policies.get(key) else { return vec![] };
        self.local_in(&policy.namespace)
            .filter(|p| policy.pod_selector.matches(&p.labels))
            .map(Pod::key)
            .collect()
    }

    fn local_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        let start = PodKey { namespace: namespace.to_string(), name: String::new() };
        self.local
            .range(start..)
            .take_while(move |k| k.namespace == namespace)
            .filter_map(|k| self.cluster.pods.get(k))
    }

    /// Keeps `local` in step with the cluster's copy of the pod `key`.
    fn track_local(&mut self, key: &PodKey) {
        match self.cluster.pods.get(key) {
            Some(p) if self.is_local(p) => {
                if !self.local.contains(key) {
                    self.local.insert(key.clone());
                }
            }
            _ => {
                self.local.remove(key);
            }
        }
    }

    fn apply_one(&mut self, change: Change, pending: &mut Pending) {
        match change {
            Change::UpsertPolicy(policy) => {
                let key = (policy.namespace.clone(), policy.name.clone());
                pending.affected.extend(self.selected_local(&key));
                self.plans.invalidate(&key);
                self.cluster.add_policy(policy);
                pending.affected.extend(self.selected_local(&key));
            }
            Change::DeletePolicy(key) => {
                pending.affected.extend(self.selected_local(&key));
                self.plans.invalidate(&key);
                self.cluster.policies.remove(&key);
            }
            Change::UpsertNamespace(ns) => {
                let name = ns.name.clone();
                self.cluster.add_namespace(ns);
                self.refresh_namespace(&name, pending);
            }
            Change::DeleteNamespace(name) => {
                self.cluster.namespaces.remove(&name);
                self.refresh_namespace(&name, pending);
            }
            Change::UpsertPod(pod) => {
                let key = pod.key();
                let old = self.cluster.pods.insert(key.clone(), pod);
                self.track_local(&key);
                self.refresh_pod(&key, old, pending);
            }
            Change::DeletePod(key) => {
                let old = self.cluster.pods.remove(&key);
                self.track_local(&key);
                self.refresh_pod(&key, old, pending);
            }
            Change::UpsertService(svc) => {
                let key = (svc.namespace.clone(), svc.name.clone());
                let old = self.cluster.services.insert(key, svc.clone());
                pending.services |=
                    old.is_none_or(|o| o.cluster_ips != svc.cluster_ips || o.ports != svc.ports);
            }
            Change::DeleteService(key) => {
                pending.services |= self.cluster.services.remove(&key).is_some();
            }
        }
    }

    /// Namespace labels are part of every identity in it.
    fn refresh_namespace(&mut self, name: &str, pending: &mut Pending) {
        let start = PodKey { namespace: name.to_string(), name: String::new() };
        let keys: Vec<PodKey> = self
            .cluster
            .pods
            .range(start..)
            .map(|(k, _)| k)
            .take_while(|k| k.namespace == name)
            .cloned()
            .collect();
        for key in keys {
            let old = self.cluster.pods.get(&key).cloned();
            self.refresh_pod(&key, old, pending);
        }
    }

    /// Re-derives a pod's identity and addresses after it changed (`old` is
    /// how it was, the cluster holds how it is).
    fn refresh_pod(&mut self, key: &PodKey, old: Option<Pod>, pending: &mut Pending) {
        let new = self.cluster.pods.get(key);
        // Only addresses a pod owns carry its labels: a pod on the host
        // network has its node's, whose identity is the node's or world.
        let new_labels = new.filter(|p| p.owns_addresses()).map(|p| IdentityLabels::of(&self.cluster, p));
        let old_id = self.pod_identity.get(key).copied();
        let old_labels = old_id.and_then(|id| self.identities.labels(id).cloned());

        if old_labels != new_labels {
            if let Some(id) = old_id {
                self.pod_identity.remove(key);
                if let Some(pods) = self.pods_by_identity.get_mut(&id) {
                    pods.remove(key);
                    if pods.is_empty() {
                        self.pods_by_identity.remove(&id);
                    }
                }
                if self.identities.release(id) {
                    pending.born.remove(&id);
                    if let Some(l) = &old_labels {
                        pending.dead.push(l.clone());
                    }
                }
            }
            if let Some(labels) = &new_labels {
                let known = self.identities.get(labels).is_some();
                let preferred = self.planned.get(labels).copied();
                let id = self.identities.acquire_preferring(labels.clone(), preferred);
                self.pod_identity.insert(key.clone(), id);
                self.pods_by_identity.entry(id).or_default().insert(key.clone());
                if !known {
                    pending.born.insert(id);
                }
            }
        }
        let new_id = self.pod_identity.get(key).copied();

        let old_ips: Vec<IpAddr> = old.as_ref().map(|p| p.ips.clone()).unwrap_or_default();
        let new_ips: Vec<IpAddr> = new.map(|p| p.ips.clone()).unwrap_or_default();
        self.changes.addresses.extend(old_ips.iter().chain(&new_ips).copied());
        // It claims its addresses when it owns them (it has an identity then).
        let claimed: &[IpAddr] = if new_id.is_some() { &new_ips } else { &[] };
        let mut touched: Vec<IpAddr> = old_ips.iter().chain(claimed).copied().collect();
        touched.sort_unstable();
        touched.dedup();
        for ip in touched {
            // The holder and its identity, this pod's as it was before.
            let identity = |engine: &Self, k: &PodKey, before: bool| {
                if before && k == key { old_id } else { engine.pod_identity.get(k).copied() }
            };
            let before = self.ip_owner.get(&ip).and_then(|c| c.last()).cloned();
            let before_id = before.as_ref().and_then(|k| identity(self, k, true));
            let mut claims = self.ip_owner.remove(&ip).unwrap_or_default();
            claims.retain(|k| k != key);
            if claimed.contains(&ip) {
                claims.push(key.clone());
                let pods = &self.cluster.pods;
                claims.sort_by_key(|k| pods.get(k).map(Pod::address_precedence));
            }
            let after = claims.last().cloned();
            if !claims.is_empty() {
                self.ip_owner.insert(ip, claims);
            }
            let after_id = after.as_ref().and_then(|k| identity(self, k, false));
            if (&before, before_id) != (&after, after_id) {
                pending.ipcache.insert(ip, after_id);
            }
            if before != after {
                // Egress named ports resolve on the pods holding addresses:
                // both identities may resolve differently now.
                let labels_of = |id: Option<u32>| id.and_then(|id| self.identities.labels(id)).cloned();
                if let Some(k) = &before {
                    let l = if k == key { old_labels.clone() } else { labels_of(before_id) };
                    pending.named_churn.extend(l);
                }
                if after.is_some() {
                    pending.named_churn.extend(labels_of(after_id));
                }
            }
        }

        // Egress named ports resolve on this pod: a change in its identity,
        // addresses or ports can change what they resolve to.
        let ports_changed = old.as_ref().map(|p| (&p.ports, &p.ips)) != new.map(|p| (&p.ports, &p.ips));
        if ports_changed || old_labels != new_labels {
            pending.named_churn.extend(old_labels.iter().cloned());
            pending.named_churn.extend(new_labels.iter().cloned());
        }

        // Its own labels decide which policies select it.
        let was_local = old.as_ref().is_some_and(|p| self.is_local(p));
        let is_local = new.is_some_and(|p| self.is_local(p));
        let relabelled = old.as_ref().map(|p| &p.labels) != new.map(|p| &p.labels);
        if (was_local || is_local)
            && (relabelled || was_local != is_local || old_labels != new_labels || ports_changed)
        {
            pending.affected.insert(key.clone());
        }
    }
}

impl Engine {
    /// Address -> identity for every pod the engine knows.
    pub fn ipcache(&self) -> impl Iterator<Item = (IpAddr, u32)> + '_ {
        self.ip_owner.iter().filter_map(|(ip, claims)| Some((*ip, *self.pod_identity.get(claims.last()?)?)))
    }

    /// Takes over an earlier agent's identity numbers (address -> number,
    /// from the pinned ipcache), before the first change: pods keep the
    /// numbers the maps hold. See `Identities::recover` and
    /// `plan_recovered`.
    pub fn recover_identities(&mut self, by_address: impl IntoIterator<Item = (IpAddr, u32)>) {
        self.recovered =
            by_address.into_iter().filter(|(_, id)| *id < portcullis_common::identity::CLASS_BASE).collect();
        self.identities.recover(self.recovered.values().copied());
    }

    /// Which label sets get their number back, decided on the relist (the
    /// cluster as it will be after `changes`). The loaded policy reads a
    /// number as the label set it had, and the new ipcache is written
    /// before the new policy: a number may only go to the label set it
    /// meant. So a label set keeps number N only when the addresses
    /// recorded with N are all held by its pods now, and its pods' addresses
    /// were recorded with N or not at all. Any doubt (a pod relabelled, an
    /// address taken over while no agent ran) gives a fresh number, which
    /// fails closed until the policy naming it is written.
    fn plan_recovered(&self, changes: &[Change]) -> HashMap<IdentityLabels, u32> {
        let mut namespaces: HashMap<&str, &Labels> =
            self.cluster.namespaces.values().map(|n| (n.name.as_str(), &n.labels)).collect();
        let mut pods: BTreeMap<PodKey, &Pod> =
            self.cluster.pods.iter().map(|(k, p)| (k.clone(), p)).collect();
        for change in changes {
            match change {
                Change::UpsertNamespace(n) => {
                    namespaces.insert(&n.name, &n.labels);
                }
                Change::DeleteNamespace(n) => {
                    namespaces.remove(n.as_str());
                }
                Change::UpsertPod(p) => {
                    pods.insert(p.key(), p);
                }
                Change::DeletePod(k) => {
                    pods.remove(k);
                }
                _ => {}
            }
        }
        let no_labels = Labels::default();
        // The label sets found on each recorded number's addresses, and the
        // recorded numbers (None: not recorded) of each label set's.
        let mut on_number: HashMap<u32, BTreeSet<IdentityLabels>> = HashMap::new();
        let mut numbers_of: HashMap<IdentityLabels, BTreeSet<Option<u32>>> = HashMap::new();
        // Only the addresses a pod holds carry its identity.
        let holders = address_holders(pods.values().copied());
        for pod in pods.values().filter(|p| p.owns_addresses()) {
            let labels = IdentityLabels {
                namespace: pod.namespace.clone(),
                namespace_labels: namespaces
                    .get(pod.namespace.as_str())
                    .copied()
                    .unwrap_or(&no_labels)
                    .clone(),
                pod_labels: pod.labels.clone(),
            };
            for ip in pod.ips.iter().filter(|ip| holders.get(*ip).is_some_and(|h| std::ptr::eq(*h, *pod))) {
                let recorded = self.recovered.get(ip).copied();
                if let Some(n) = recorded {
                    on_number.entry(n).or_default().insert(labels.clone());
                }
                numbers_of.entry(labels.clone()).or_default().insert(recorded);
            }
        }
        numbers_of
            .into_iter()
            .filter_map(|(labels, numbers)| {
                let mut recorded = numbers.iter().flatten();
                let n = *recorded.next()?;
                let alone = recorded.next().is_none();
                let only_these =
                    on_number.get(&n).is_some_and(|sets| sets.len() == 1 && sets.contains(&labels));
                (alone && only_these).then_some((labels, n))
            })
            .collect()
    }

    /// The identity of `ip`, and the pod holding it (the newest to claim it).
    pub fn ip_holder(&self, ip: &IpAddr) -> Option<(u32, &PodKey)> {
        let holder = self.ip_owner.get(ip)?.last()?;
        Some((*self.pod_identity.get(holder)?, holder))
    }

    /// What the ipcache went through since the last call.
    pub fn take_ipcache_changes(&mut self) -> IpcacheChanges {
        std::mem::take(&mut self.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LabelSelector, Labels, Rule};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn pod(ns: &str, name: &str, app: &str, n: u8, node: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            labels: labels(&[("app", app)]),
            ips: vec![IpAddr::from([10, 0, 0, n])],
            node: Some(node.into()),
            host_network: false,
            finished: false,
            created: None,
            deleting: false,
            ports: vec![],
        }
    }

    fn allow_from(ns: &str, name: &str, app: &str, from_app: &str) -> NetworkPolicy {
        NetworkPolicy {
            namespace: ns.into(),
            name: name.into(),
            pod_selector: LabelSelector { match_labels: labels(&[("app", app)]), expressions: vec![] },
            affects_ingress: true,
            affects_egress: false,
            ingress: vec![Rule {
                peers: vec![Peer::Pods {
                    namespaces: None,
                    pods: Some(LabelSelector {
                        match_labels: labels(&[("app", from_app)]),
                        expressions: vec![],
                    }),
                }],
                ports: vec![],
            }],
            egress: vec![],
        }
    }

    #[test]
    fn a_pod_joining_an_existing_identity_only_touches_the_ipcache() {
        let mut e = Engine::new("n1");
        e.apply([
            Change::UpsertNamespace(Namespace { name: "x".into(), labels: Labels::new() }),
            Change::UpsertPod(pod("x", "web", "web", 1, "n1")),
            Change::UpsertPod(pod("x", "fe1", "fe", 2, "n2")),
            Change::UpsertPolicy(allow_from("x", "p", "web", "fe")),
        ]);
        let diff = e.apply([Change::UpsertPod(pod("x", "fe2", "fe", 3, "n2"))]);
        assert!(diff.endpoints.is_empty(), "{diff:?}");
        assert_eq!(diff.recompiled, 0);
        assert_eq!(diff.ipcache.len(), 1);
    }

    #[test]
    fn replicas_share_one_copy_of_their_policy() {
        let mut e = Engine::new("n1");
        e.apply([
            Change::UpsertNamespace(Namespace { name: "x".into(), labels: Labels::new() }),
            Change::UpsertPod(pod("x", "web1", "web", 1, "n1")),
            Change::UpsertPod(pod("x", "fe1", "fe", 2, "n2")),
            Change::UpsertPolicy(allow_from("x", "p", "web", "fe")),
        ]);
        // A replica started later, compiled on its own.
        e.apply([Change::UpsertPod(pod("x", "web2", "web", 3, "n1"))]);
        let key = |name: &str| PodKey { namespace: "x".into(), name: name.into() };
        let (a, b) = (&e.endpoints()[&key("web1")], &e.endpoints()[&key("web2")]);
        assert!(a.ingress.isolated && !a.ingress.allow.is_empty());
        assert!(Arc::ptr_eq(&a.ingress, &b.ingress), "one copy");
        assert!(Arc::ptr_eq(&a.egress, &b.egress));
    }

    #[test]
    fn a_new_identity_recompiles_the_endpoints_whose_peers_match_it() {
        let mut e = Engine::new("n1");
        e.apply([
            Change::UpsertNamespace(Namespace { name: "x".into(), labels: Labels::new() }),
            Change::UpsertPod(pod("x", "web", "web", 1, "n1")),
            Change::UpsertPod(pod("x", "db", "db", 4, "n1")),
            Change::UpsertPolicy(allow_from("x", "p", "web", "fe")),
        ]);
        let diff = e.apply([Change::UpsertPod(pod("x", "fe1", "fe", 2, "n2"))]);
        let web = PodKey { namespace: "x".into(), name: "web".into() };
        assert_eq!(diff.endpoints.keys().collect::<Vec<_>>(), vec![&web], "db is untouched");
        let fe = e.identity_of(&PodKey { namespace: "x".into(), name: "fe1".into() }).unwrap();
        let allow = &diff.endpoints[&web].as_ref().unwrap().ingress.allow;
        assert_eq!(allow.iter().map(|a| a.peer).collect::<Vec<_>>(), vec![fe]);
    }

    #[test]
    fn deleting_a_policy_releases_its_endpoints_and_deleting_a_pod_drops_its_endpoint() {
        let mut e = Engine::new("n1");
        e.apply([
            Change::UpsertNamespace(Namespace { name: "x".into(), labels: Labels::new() }),
            Change::UpsertPod(pod("x", "web", "web", 1, "n1")),
            Change::UpsertPolicy(allow_from("x", "p", "web", "fe")),
        ]);
        let web = PodKey { namespace: "x".into(), name: "web".into() };
        assert!(e.endpoints()[&web].ingress.isolated);
        let diff = e.apply([Change::DeletePolicy(("x".into(), "p".into()))]);
        assert!(!diff.endpoints[&web].as_ref().unwrap().ingress.isolated);
        let diff = e.apply([Change::DeletePod(web.clone())]);
        assert_eq!(diff.endpoints[&web], None);
        assert_eq!(diff.ipcache[&IpAddr::from([10, 0, 0, 1])], None);
    }

    /// The namespace the identity tests' pods are in: a batch with it is a
    /// relist, where recovered numbers are handed out.
    fn relist_namespace() -> Change {
        Change::UpsertNamespace(crate::model::Namespace { name: "ns".into(), labels: Labels::default() })
    }

    /// The addresses' identity numbers as an agent that saw `pods` gave them.
    fn numbered_by_an_earlier_agent(pods: &[Pod]) -> BTreeMap<IpAddr, u32> {
        let mut before = Engine::new("n");
        before.apply(std::iter::once(relist_namespace()).chain(pods.iter().cloned().map(Change::UpsertPod)));
        before.ipcache().collect()
    }

    /// A restarted agent numbers identities as the maps do, whatever order
    /// the pods arrive in; new label sets get numbers above those; and a
    /// recovered number goes to one label set only, once.
    #[test]
    fn a_restarted_engine_keeps_the_numbers_the_maps_hold() {
        let pods =
            [pod("ns", "a", "one", 1, "n"), pod("ns", "b", "two", 2, "n"), pod("ns", "c", "three", 3, "m")];
        let held = numbered_by_an_earlier_agent(&pods);

        let mut after = Engine::new("n");
        after.recover_identities(held.clone());
        let mut fresh = pod("ns", "d", "four", 4, "n");
        fresh.ips = vec![IpAddr::from([10, 0, 0, 9])];
        // The relist, in another order than the cluster grew.
        after.apply(
            [relist_namespace(), Change::UpsertPod(fresh), Change::UpsertPod(pods[2].clone())]
                .into_iter()
                .chain([Change::UpsertPod(pods[1].clone()), Change::UpsertPod(pods[0].clone())]),
        );
        let now: BTreeMap<IpAddr, u32> = after.ipcache().collect();
        for (ip, id) in &held {
            assert_eq!(now.get(ip), Some(id), "{ip} keeps its number");
        }
        let top = held.values().max().copied().unwrap_or_default();
        assert!(now[&IpAddr::from([10, 0, 0, 9])] > top, "a new label set gets a fresh number");

        // `a` leaves; a pod with other labels on its address later does not
        // get its number again.
        after.apply([Change::DeletePod(pods[0].key())]);
        let mut other = pods[0].clone();
        other.name = "e".into();
        other.labels = labels(&[("app", "five")]);
        after.apply([Change::UpsertPod(other)]);
        let reused = after.ipcache().find(|(ip, _)| *ip == IpAddr::from([10, 0, 0, 1])).map(|(_, id)| id);
        assert!(reused.is_some_and(|id| id != held[&IpAddr::from([10, 0, 0, 1])]), "{reused:?}");
    }

    /// A number whose meaning is in doubt is not given back: the loaded
    /// policy reads it as the label set it had, and the ipcache is written
    /// first. Here `a` was relabelled while no agent ran: number `one` is
    /// now on two label sets' addresses, and `two`'s pods had two numbers.
    #[test]
    fn a_number_whose_label_set_changed_while_no_agent_ran_is_not_given_back() {
        let pods =
            [pod("ns", "a", "one", 1, "n"), pod("ns", "b", "one", 2, "n"), pod("ns", "c", "two", 3, "n")];
        let held = numbered_by_an_earlier_agent(&pods);

        let mut relabelled = pods[0].clone();
        relabelled.labels = labels(&[("app", "two")]);
        let mut after = Engine::new("n");
        after.recover_identities(held.clone());
        after.apply([
            relist_namespace(),
            Change::UpsertPod(relabelled),
            Change::UpsertPod(pods[1].clone()),
            Change::UpsertPod(pods[2].clone()),
        ]);
        let old: BTreeSet<u32> = held.values().copied().collect();
        for (ip, id) in after.ipcache() {
            assert!(!old.contains(&id), "{ip} got number {id}, which meant another label set");
        }
    }

    fn key(ns: &str, name: &str) -> PodKey {
        PodKey { namespace: ns.into(), name: name.into() }
    }

    fn namespace(name: &str) -> Change {
        Change::UpsertNamespace(Namespace { name: name.into(), labels: Labels::new() })
    }

    /// A pod on the host network has its node's address. It must not carry
    /// the pod's labels (the agent's, kube-proxy's, etcd's), or a pod
    /// selector would admit all the node sends (kubelet, NodePort traffic
    /// SNATed to it): the address stays the node's, absent from the
    /// engine's ipcache as any node's is (the host identity on its own
    /// node, world on the others).
    #[test]
    fn a_pod_on_the_host_network_gives_its_node_address_no_identity() {
        use crate::{
            model::Protocol,
            policy::{
                Simulation,
                oracle::{self, Party},
            },
        };
        let (here, there) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let host_pod = |ns: &str, name: &str, app: &str, node: &str, ip: IpAddr| Pod {
            host_network: true,
            ips: vec![ip],
            ..pod(ns, name, app, 0, node)
        };
        // Every pod of every namespace may reach web.
        let everyone = NetworkPolicy {
            ingress: vec![Rule {
                peers: vec![Peer::Pods { namespaces: Some(LabelSelector::everything()), pods: None }],
                ports: vec![],
            }],
            ..allow_from("x", "p", "web", "fe")
        };
        let mut proxy = host_pod("kube-system", "kube-proxy-n2", "kube-proxy", "n2", there);
        let agent = host_pod("kube-system", "portcullis-n1", "portcullis", "n1", here);
        let mut e = Engine::new("n1");
        e.apply([
            namespace("x"),
            namespace("kube-system"),
            Change::UpsertPod(pod("x", "web", "web", 1, "n1")),
            Change::UpsertPod(pod("x", "fe", "fe", 2, "n2")),
            Change::UpsertPod(agent.clone()),
            Change::UpsertPod(proxy.clone()),
            Change::UpsertPolicy(everyone),
        ]);
        // Updated last, as the bug had it: still not the address's owner.
        proxy.labels.insert("v".into(), "2".into());
        e.apply([Change::UpsertPod(proxy.clone())]);
        for (pod, ip) in [(&agent, here), (&proxy, there)] {
            assert_eq!(e.ip_holder(&ip), None, "{ip}");
            assert!(e.ipcache().all(|(a, _)| a != ip), "{ip} is in the ipcache");
            assert_eq!(e.identity_of(&pod.key()), None, "{}", pod.key());
        }
        assert!(e.identities().iter().all(|(_, l)| l.namespace != "kube-system"));
        assert!(!e.endpoints().contains_key(&agent.key()), "no endpoint on the host network");

        // On n1, with its own address as the host: web admits fe, and this
        // node (the agent's address); not n2's address, which the policy's
        // pod peers do not name. The oracle says the same.
        let sim = Simulation::from_engine(&e, &[here]).expect("valid keys");
        let (web, fe) = (&e.cluster().pods[&key("x", "web")], &e.cluster().pods[&key("x", "fe")]);
        let to_web = Party::Pod(web, web.ips[0]);
        for (client, allowed) in [
            (Party::Pod(fe, fe.ips[0]), true),
            (Party::Pod(&agent, here), true),
            (Party::Pod(&proxy, there), false),
        ] {
            let verdict = oracle::evaluate(e.cluster(), client, to_web, Protocol::Tcp, 80);
            assert_eq!(verdict.allowed, allowed, "oracle: {} -> web", client.ip());
            assert_eq!(
                sim.allows(client, to_web, Protocol::Tcp, 80),
                allowed,
                "datapath: {} -> web",
                client.ip()
            );
        }
    }

    /// The pod holding an address, as the engine's ipcache has it.
    fn holder(e: &Engine, ip: IpAddr) -> Option<String> {
        let (id, holder) = e.ip_holder(&ip)?;
        assert_eq!(e.identity_of(holder), Some(id));
        assert_eq!(e.ipcache().find(|(a, _)| *a == ip).map(|(_, i)| i), Some(id));
        Some(holder.name.clone())
    }

    /// A reused address goes to the newest pod that is not being deleted,
    /// whatever order the updates come in: the terminating pod's status
    /// update, after the new pod took its address, does not take it back.
    #[test]
    fn a_reused_address_stays_with_the_newest_pod_whatever_the_update_order() {
        let ip = IpAddr::from([10, 0, 0, 7]);
        let mut old = Pod { created: Some(100), ..pod("x", "old", "old", 7, "n1") };
        let new = Pod { created: Some(200), ..pod("x", "new", "new", 7, "n1") };
        let mut e = Engine::new("n1");
        e.apply([namespace("x"), Change::UpsertPod(old.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("old"));
        let diff = e.apply([Change::UpsertPod(new.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));
        assert_eq!(diff.ipcache[&ip], e.identity_of(&new.key()));

        // The old pod's updates come after: it is terminating, then its
        // status changes again. The address stays the new pod's.
        old.deleting = true;
        let diff = e.apply([Change::UpsertPod(old.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));
        assert!(diff.ipcache.is_empty(), "{diff:?}");
        old.labels.insert("seen".into(), "later".into());
        e.apply([Change::UpsertPod(old.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));

        // Even while not marked deleting (an update seen out of order), an
        // older pod does not take it back.
        old.deleting = false;
        e.apply([Change::UpsertPod(old.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));

        // A newer pod being deleted loses to one that is not.
        let terminating = Pod { deleting: true, ..new.clone() };
        e.apply([Change::UpsertPod(terminating.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("old"));
        e.apply([Change::UpsertPod(new.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));

        // The same creation time: the first in namespace/name order.
        let twin = Pod { created: Some(200), ..pod("x", "a-twin", "twin", 7, "n1") };
        e.apply([Change::UpsertPod(twin.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("a-twin"));
        e.apply([Change::UpsertPod(new.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("a-twin"));
        e.apply([Change::DeletePod(twin.key())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));

        // A finished pod never holds one; when the new pod goes, the old
        // one (still running) has its address again.
        let done = Pod { finished: true, created: Some(300), ..pod("x", "done", "done", 7, "n1") };
        e.apply([Change::UpsertPod(done.clone())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("new"));
        e.apply([Change::DeletePod(new.key())]);
        assert_eq!(holder(&e, ip).as_deref(), Some("old"));
        old.finished = true;
        let diff = e.apply([Change::UpsertPod(old.clone())]);
        assert_eq!(holder(&e, ip), None);
        assert_eq!(diff.ipcache[&ip], None);
    }

    /// Whatever order a set of pods claiming one address arrives in (and
    /// however often each is updated), the engine ends where a fresh one
    /// fed the final pods at once does.
    #[test]
    fn the_holder_of_an_address_does_not_depend_on_the_order_of_updates() {
        let ip = IpAddr::from([10, 0, 0, 7]);
        let pods = [
            Pod { created: Some(100), deleting: true, ..pod("x", "a", "a", 7, "n1") },
            Pod { created: Some(300), ..pod("x", "b", "b", 7, "n1") },
            Pod { created: Some(200), ..pod("x", "c", "c", 7, "n1") },
            Pod { created: Some(400), finished: true, ..pod("x", "d", "d", 7, "n1") },
            Pod { created: None, ..pod("x", "e", "e", 7, "n1") },
        ];
        let mut want = Engine::new("n1");
        want.apply(std::iter::once(namespace("x")).chain(pods.iter().cloned().map(Change::UpsertPod)));
        assert_eq!(holder(&want, ip).as_deref(), Some("b"));
        let mut order: Vec<usize> = (0..pods.len()).collect();
        // Every rotation and its reverse, each pod updated twice.
        for turn in 0..2 * pods.len() {
            order.rotate_left(1);
            if turn == pods.len() {
                order.reverse();
            }
            let mut e = Engine::new("n1");
            e.apply([namespace("x")]);
            for &i in order.iter().chain(&order) {
                e.apply([Change::UpsertPod(pods[i].clone())]);
            }
            assert_eq!(holder(&e, ip), holder(&want, ip), "order {order:?}");
        }
    }
}
