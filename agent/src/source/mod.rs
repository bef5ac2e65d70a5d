//! Where the agent learns the cluster, and how the engine's result becomes the
//! compiled state the datapath loads.

pub mod installation;
pub mod kube;
pub mod manifests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use portcullis_common::identity;

use crate::{
    compiled::{CompiledState, EndpointState, IpcacheEntry, ServiceFrontend},
    datapath::{self, Placement},
    model::PodKey,
    node,
    policy::{Change, Engine},
};

/// What the chained CNI plugin told the agent about a pod it is starting:
/// its host-side interface and addresses, before the API server has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hint {
    pub container_id: String,
    pub interface: String,
    pub ips: Vec<IpAddr>,
}

/// Hints by pod, kept from CNI ADD until CNI DEL or the pod's deletion;
/// and where the pinned state enforced each endpoint when the agent started.
#[derive(Default, Debug)]
pub struct Hints {
    by_pod: BTreeMap<PodKey, Hint>,
    restored: Vec<Placement>,
}

impl Hints {
    /// What the datapath recovered from its pins: a restarted agent keeps
    /// each running pod on its interface and endpoint id, instead of
    /// detaching a pod it cannot place yet (which would leave it open).
    pub fn restore(&mut self, placements: Vec<Placement>) {
        self.restored = placements;
    }

    /// The recovered placement of an endpoint with one of `ips`, if its
    /// interface still exists (a pod deleted meanwhile took its veth along,
    /// so its address, reused by a new pod, never leads there).
    fn restored_for(&self, ips: &[IpAddr]) -> Option<(&Placement, String)> {
        let p = self.restored.iter().find(|p| p.addresses.iter().any(|a| ips.contains(a)))?;
        Some((p, datapath::ifname(p.ifindex)?))
    }

    pub fn get(&self, pod: &PodKey) -> Option<&Hint> {
        self.by_pod.get(pod)
    }

    /// Records a hint; when the engine already has the pod without
    /// addresses (the API server learns them only after CNI ADD returns),
    /// returns the change that gives it the hinted ones, so it becomes an
    /// endpoint now. (The caller applies the changes of a burst of ADDs
    /// together: one recompile for all.)
    #[must_use]
    pub fn insert(&mut self, pod: PodKey, hint: Hint, engine: &Engine) -> Option<Change> {
        // Addresses an earlier hint gave it are replaced too: that hint may
        // be a stale sandbox's (an ADD for a pod deleted meanwhile, whose
        // name a new pod took).
        let from_hint = self.by_pod.get(&pod).map(|h| h.ips.clone());
        let patched = engine
            .cluster()
            .pods
            .get(&pod)
            .filter(|p| (p.ips.is_empty() || Some(&p.ips) == from_hint.as_ref()) && !p.finished)
            .map(|p| {
                let mut p = p.clone();
                p.ips = hint.ips.clone();
                p
            });
        self.by_pod.insert(pod, hint);
        patched.map(Change::UpsertPod)
    }

    /// Forgets the hint of a sandbox (CNI DEL names the container).
    pub fn remove(&mut self, pod: &PodKey, container_id: &str) {
        if self.by_pod.get(pod).is_some_and(|h| h.container_id == container_id) {
            self.by_pod.remove(pod);
        }
    }

    /// Fills in the hinted addresses of pods the API server reports without
    /// any yet, and forgets hints of deleted pods. A pod whose object has
    /// addresses keeps those: the API server is the truth once it knows.
    pub fn patch(&mut self, changes: &mut [Change]) {
        for change in changes {
            match change {
                Change::UpsertPod(pod) if pod.ips.is_empty() && !pod.finished => {
                    if let Some(h) = self.by_pod.get(&pod.key()) {
                        pod.ips = h.ips.clone();
                    }
                }
                Change::DeletePod(key) => {
                    self.by_pod.remove(key);
                }
                _ => {}
            }
        }
    }
}

/// Builds compiled state from the engine, with stable endpoint ids.
#[derive(Default)]
pub struct StateBuilder {
    ids: BTreeMap<PodKey, u16>,
    /// The interface each endpoint was last placed on: its index and name.
    placed: BTreeMap<PodKey, (u32, String)>,
    /// The pods' ipcache entries and the identities' names, kept between
    /// passes and updated where the engine says they changed: a pass that
    /// moves a few pods does not rebuild 10,000 entries.
    pod_ipcache: BTreeMap<IpAddr, IpcacheEntry>,
    identities: BTreeMap<u32, String>,
    /// `pod_ipcache` and `identities` follow the engine's changes (false
    /// until the first build, which reads them whole).
    primed: bool,
    /// The node's routes, neighbours and bridge ports as last read, and
    /// when: read again after a second, or at once for a pod neither they
    /// nor its own last placement put anywhere (hundreds of veths make a
    /// read cost milliseconds, and pods starting together would pay it on
    /// every pass).
    interfaces: Option<(std::time::Instant, node::Interfaces)>,
}

/// How long a read of the node's interfaces serves.
const INTERFACES_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// When a lookup of a pod's interface reads the node's interfaces anew
/// (at most once a pass).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Read {
    /// Only the last read, while it is fresh.
    Never,
    /// When the last read is over `INTERFACES_FRESH` old.
    IfStale,
    /// When the last read does not place the pod.
    IfMissing,
}

impl StateBuilder {
    /// The pod's id: the one it has, else `preferred` (its id in the pinned
    /// state) when free, else the lowest id neither used nor `reserved`.
    fn id_for(&mut self, pod: &PodKey, preferred: Option<u16>, reserved: &BTreeSet<u16>) -> Option<u16> {
        if let Some(id) = self.ids.get(pod) {
            return Some(*id);
        }
        let used: BTreeSet<u16> = self.ids.values().copied().collect();
        let id = preferred
            .filter(|p| !used.contains(p))
            .filter(|p| *p < portcullis_common::POLICY_SET_BASE)
            .or_else(|| {
                (1..portcullis_common::POLICY_SET_BASE).find(|i| !used.contains(i) && !reserved.contains(i))
            })?;
        self.ids.insert(pod.clone(), id);
        Some(id)
    }

    /// The state for the engine's local endpoints; endpoints whose interface
    /// cannot be found yet are reported and left out (the next pass retries).
    /// `verify_placed`: check placed pods against a read of the node's
    /// interfaces when the last is stale (false while pods start).
    pub fn build(
        &mut self,
        engine: &mut Engine,
        revision: u64,
        node_ips: &[IpAddr],
        hints: &Hints,
        verify_placed: bool,
    ) -> (CompiledState, Vec<String>) {
        let mut errors = Vec::new();
        let live: BTreeSet<&PodKey> = engine.endpoints().keys().collect();
        self.ids.retain(|k, _| live.contains(k));
        self.placed.retain(|k, _| live.contains(k));
        // Pinned ids of interfaces that still exist: fresh ids avoid them,
        // so that no running pod's id goes to another pod while it waits.
        let reserved: BTreeSet<u16> = hints
            .restored
            .iter()
            .filter(|p| datapath::ifname(p.ifindex).is_some())
            .map(|p| p.endpoint_id)
            .collect();
        self.follow_ipcache(engine);
        let engine = &*engine;
        let mut endpoints = Vec::new();
        // Read when some endpoint needs it (pods the CNI plugin announced
        // carry their interface), and then at most once a second (at most
        // once a pass): a pod the last read does not place, and that has
        // no placement of its own either, has it read again at once.
        let mut cache = self.interfaces.take().filter(|(at, _)| at.elapsed() < INTERFACES_FRESH);
        let mut read_now = false;
        let mut interface_for = |ips: &[IpAddr], read: Read| -> Option<String> {
            let lookup = |cache: &Option<(std::time::Instant, node::Interfaces)>| {
                cache.as_ref().and_then(|(_, i)| ips.iter().find_map(|ip| i.interface_for(*ip)))
            };
            let found = lookup(&cache);
            let again = !read_now
                && match read {
                    Read::Never => false,
                    Read::IfStale => cache.is_none(),
                    Read::IfMissing => found.is_none(),
                };
            if !again {
                return found;
            }
            read_now = true;
            cache = Some((std::time::Instant::now(), node::Interfaces::read()));
            lookup(&cache)
        };
        let mut unresolved = Vec::new();
        let indexes = datapath::IfIndexes::open();
        for (key, policy) in engine.endpoints() {
            let Some(pod) = engine.cluster().pods.get(key) else { continue };
            let restored = hints.restored_for(&pod.ips);
            // The CNI plugin names the interface at pod start; otherwise
            // routes, neighbours and the bridge's forwarding table tell.
            // When they cannot (yet), the interface it was last enforced on
            // (by this agent, or the one before it) keeps it: never detach a
            // running pod for want of a neighbour entry. While pods start
            // (`verify_placed` false), a placed pod is not checked against
            // a new read: the burst's pass would wait for it; the first
            // pass after the burst checks.
            let hinted = hints.get(key).map(|h| h.interface.clone());
            let verify = if verify_placed { Read::IfStale } else { Read::Never };
            let placed = || {
                let (idx, name) = self.placed.get(key)?;
                // The same interface, not another that took its index.
                datapath::ifname(*idx).filter(|now| now == name)
            };
            let found = hinted
                .or_else(|| interface_for(&pod.ips, verify))
                .or_else(placed)
                .or_else(|| interface_for(&pod.ips, Read::IfMissing))
                .or_else(|| restored.as_ref().map(|(_, name)| name.clone()));
            let Some(interface) = found else {
                // Behind a bridge, a pod that has not spoken yet has no
                // neighbour entry: ask the kernel to resolve it for the next
                // pass. (The CNI plugin closes this window at pod start.)
                unresolved.extend(pod.ips.iter().copied());
                errors.push(format!("endpoint {key}: no interface found for {:?} yet", pod.ips));
                continue;
            };
            let preferred = restored.filter(|(_, name)| *name == interface).map(|(p, _)| p.endpoint_id);
            if let Some(idx) = indexes.get(&interface) {
                self.placed.insert(key.clone(), (idx, interface.clone()));
            }
            let Some(id) = self.id_for(key, preferred, &reserved) else {
                errors.push(format!("endpoint {key}: no endpoint id left"));
                continue;
            };
            endpoints.push(EndpointState {
                id,
                name: key.to_string(),
                interface,
                identity: engine.identity_of(key).unwrap_or(identity::WORLD),
                addresses: pod.ips.clone(),
                ingress: policy.ingress.clone(),
                egress: policy.egress.clone(),
            });
        }
        if let Some((_, interfaces)) = &cache {
            for ip in unresolved.into_iter().filter(|ip| interfaces.unresolved_on_bridge(*ip)) {
                node::resolve(ip);
            }
        }
        self.interfaces = cache;
        let mut ipcache: Vec<IpcacheEntry> = self.pod_ipcache.values().cloned().collect();
        ipcache.extend(node_ips.iter().map(|ip| IpcacheEntry {
            cidr: (*ip).into(),
            identity: identity::HOST,
            name: Some("node".into()),
        }));
        ipcache.sort();
        ipcache.dedup_by_key(|e| e.cidr);
        let identities = self.identities.clone();
        let mut services: Vec<ServiceFrontend> =
            engine.cluster().services.values().flat_map(|svc| service_frontends(svc, node_ips)).collect();
        services.sort();
        services.dedup();
        (CompiledState { revision, identities, ipcache, endpoints, services }, errors)
    }

    /// Brings the pods' ipcache entries and the identities' names up to
    /// the engine: whole the first time, then where it says they changed.
    fn follow_ipcache(&mut self, engine: &mut Engine) {
        let changes = engine.take_ipcache_changes();
        let entry = |ip: &IpAddr| {
            let (identity, holder) = engine.ip_holder(ip)?;
            Some(IpcacheEntry { cidr: (*ip).into(), identity, name: Some(holder.to_string().into()) })
        };
        if !self.primed {
            self.pod_ipcache = engine.ipcache().filter_map(|(ip, _)| Some((ip, entry(&ip)?))).collect();
        } else {
            for ip in &changes.addresses {
                match entry(ip) {
                    Some(e) => self.pod_ipcache.insert(*ip, e),
                    None => self.pod_ipcache.remove(ip),
                };
            }
        }
        if !self.primed || changes.identities {
            self.identities =
                engine.identities().iter().map(|(id, labels)| (id, labels.to_string())).collect();
        }
        self.primed = true;
    }
}

/// Every address and port kube-proxy translates for `svc` on this node:
/// its ClusterIPs and external addresses on each port, and each node
/// address on each NodePort; the unspecified addresses stand for the
/// node's loopback and IPv6 link-local ones, where kube-proxy serves
/// NodePorts too. A packet to any of them is judged after DNAT.
/// (A NodePort on another node's address is translated there, out of this
/// node's sight: it is judged as egress to that node's address.)
fn service_frontends<'a>(
    svc: &'a crate::model::Service,
    node_ips: &'a [IpAddr],
) -> impl Iterator<Item = ServiceFrontend> + 'a {
    let addresses = svc.cluster_ips.iter().chain(&svc.external_ips);
    let on_ports = addresses.flat_map(move |ip| {
        svc.ports.iter().map(move |p| ServiceFrontend { ip: *ip, protocol: p.protocol, port: p.port })
    });
    const ANY_LOCAL: [IpAddr; 2] =
        [IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)];
    let on_node_ports = node_ips.iter().chain(&ANY_LOCAL).flat_map(move |ip| {
        svc.ports
            .iter()
            .filter_map(move |p| Some(ServiceFrontend { ip: *ip, protocol: p.protocol, port: p.node_port? }))
    });
    on_ports.chain(on_node_ports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Labels, Namespace, Pod};

    // TEST-NET-2: no route or neighbour on any machine names these.
    fn pod(name: &str, n: u8) -> Pod {
        Pod {
            namespace: "x".into(),
            name: name.into(),
            labels: Labels::default(),
            ips: vec![IpAddr::from([198, 51, 100, n])],
            node: Some("node".into()),
            host_network: false,
            finished: false,
            created: None,
            deleting: false,
            ports: vec![],
        }
    }

    /// A NodePort Service with an external address: its ClusterIP and
    /// external address on each port, and each node address on each
    /// NodePort, are frontends (all translated by kube-proxy here).
    #[test]
    fn every_address_kube_proxy_translates_is_a_frontend() {
        use crate::model::{Protocol, Service, ServicePort, TargetPort};
        let svc = Service {
            namespace: "x".into(),
            name: "web".into(),
            cluster_ips: vec![IpAddr::from([10, 96, 0, 1])],
            external_ips: vec![IpAddr::from([203, 0, 113, 9])],
            selector: None,
            ports: vec![
                ServicePort {
                    name: None,
                    port: 80,
                    protocol: Protocol::Tcp,
                    target: TargetPort::Number(8080),
                    node_port: Some(30080),
                },
                ServicePort {
                    name: None,
                    port: 53,
                    protocol: Protocol::Udp,
                    target: TargetPort::Number(53),
                    node_port: None,
                },
            ],
        };
        let node = [IpAddr::from([192, 0, 2, 1])];
        let mut got: Vec<(String, u16)> =
            service_frontends(&svc, &node).map(|f| (f.ip.to_string(), f.port)).collect();
        got.sort();
        let want = [
            ("0.0.0.0", 30080),
            ("10.96.0.1", 53),
            ("10.96.0.1", 80),
            ("192.0.2.1", 30080),
            ("203.0.113.9", 53),
            ("203.0.113.9", 80),
            ("::", 30080),
        ];
        assert_eq!(got, want.map(|(a, p)| (a.to_string(), p)));
    }

    fn key(name: &str) -> PodKey {
        PodKey { namespace: "x".into(), name: name.into() }
    }

    fn engine(pods: &[Pod]) -> Engine {
        let mut engine = Engine::new("node");
        engine.apply([Change::UpsertNamespace(Namespace { name: "x".into(), labels: Labels::default() })]);
        engine.apply(pods.iter().cloned().map(Change::UpsertPod));
        engine
    }

    fn placed(state: &CompiledState) -> Vec<(String, String, u16)> {
        state.endpoints.iter().map(|e| (e.name.clone(), e.interface.clone(), e.id)).collect()
    }

    #[test]
    fn a_new_sandbox_replaces_what_a_hint_gave_but_not_what_the_api_server_said() {
        let mut bare = pod("a", 1);
        bare.ips.clear();
        let mut engine = engine(&[bare]);
        let mut hints = Hints::default();
        let hint =
            |c: &str, n: u8| Hint { container_id: c.into(), interface: "lo".into(), ips: pod("a", n).ips };
        let ips = |engine: &Engine| engine.cluster().pods[&key("a")].ips.clone();
        // A stale sandbox's ADD (its pod deleted, the name taken again),
        // then the new pod's own.
        engine.apply(hints.insert(key("a"), hint("old", 6), &engine));
        assert_eq!(ips(&engine), pod("a", 6).ips);
        engine.apply(hints.insert(key("a"), hint("new", 7), &engine));
        assert_eq!(ips(&engine), pod("a", 7).ips, "the newer sandbox's address wins");
        // Once the API server has said, a hint does not overrule it.
        engine.apply([Change::UpsertPod(pod("a", 9))]);
        engine.apply(hints.insert(key("a"), hint("other", 8), &engine));
        assert_eq!(ips(&engine), pod("a", 9).ips);
    }

    #[test]
    fn a_restarted_agent_keeps_running_pods_on_their_pinned_interface_and_id() {
        let lo = datapath::ifindex("lo").expect("lo");
        let mut engine = engine(&[pod("a", 10), pod("b", 11), pod("c", 12)]);
        let mut hints = Hints::default();
        hints.restore(vec![
            Placement { ifindex: lo, endpoint_id: 1, addresses: vec![IpAddr::from([198, 51, 100, 11])] },
            // Its veth went away while no agent ran: neither its interface
            // nor its id count any more.
            Placement {
                ifindex: u32::MAX - 7,
                endpoint_id: 2,
                addresses: vec![IpAddr::from([198, 51, 100, 12])],
            },
        ]);
        // `a` has no interface anywhere, `b` only its pinned one.
        let (state, errors) = StateBuilder::default().build(&mut engine, 1, &[], &hints, true);
        assert_eq!(placed(&state), vec![("x/b".into(), "lo".into(), 1)]);
        assert_eq!(errors.len(), 2, "{errors:?}");

        // A hint for `a` places it; its fresh id avoids b's pinned one.
        let mut builder = StateBuilder::default();
        let hint = Hint { container_id: "c1".into(), interface: "lo".into(), ips: pod("a", 10).ips };
        engine.apply(hints.insert(key("a"), hint, &engine));
        let (state, _) = builder.build(&mut engine, 2, &[], &hints, true);
        assert_eq!(placed(&state), vec![("x/a".into(), "lo".into(), 2), ("x/b".into(), "lo".into(), 1)]);

        // Once placed, a pod stays on its interface when nothing else
        // names it any more (a neighbour entry that expired).
        hints.remove(&key("a"), "c1");
        let (state, _) = builder.build(&mut engine, 3, &[], &hints, true);
        assert_eq!(placed(&state)[0], ("x/a".into(), "lo".into(), 2));
        // Also while pods start (no read of the node's interfaces then).
        let (state, _) = builder.build(&mut engine, 4, &[], &hints, false);
        assert_eq!(placed(&state)[0], ("x/a".into(), "lo".into(), 2));

        // Its index now names another interface (the veth went, its index
        // was handed on): that is not its placement.
        builder.placed.insert(key("a"), (lo, "gone0".into()));
        let (state, errors) = builder.build(&mut engine, 5, &[], &hints, true);
        assert!(placed(&state).iter().all(|(name, _, _)| name != "x/a"), "{:?}", placed(&state));
        assert!(errors.iter().any(|e| e.contains("x/a")), "{errors:?}");
    }

    /// Pods on the host network have their node's address; the compiled
    /// state gives it no identity from their labels: the node's own
    /// address stays the host, another node's stays out of the ipcache
    /// (world), however the pods are updated.
    #[test]
    fn node_addresses_stay_the_nodes_with_pods_on_the_host_network() {
        let (here, there) = (IpAddr::from([198, 51, 100, 250]), IpAddr::from([198, 51, 100, 251]));
        let host_pod = |name: &str, node: &str, ip: IpAddr| Pod {
            host_network: true,
            ips: vec![ip],
            node: Some(node.into()),
            labels: [("app".to_string(), name.to_string())].into_iter().collect(),
            ..pod(name, 0)
        };
        let mut engine = engine(&[host_pod("agent", "node", here), host_pod("etcd", "remote", there)]);
        let mut builder = StateBuilder::default();
        let hints = Hints::default();
        for revision in 1..3 {
            // Updated again: the last update must not make them owners.
            engine.apply([
                Change::UpsertPod(host_pod("kube-proxy", "node", here)),
                Change::UpsertPod(host_pod("kube-proxy-remote", "remote", there)),
            ]);
            for (state, _) in [
                builder.build(&mut engine, revision, &[here], &hints, true),
                StateBuilder::default().build(&mut engine, revision, &[here], &hints, true),
            ] {
                let node =
                    IpcacheEntry { cidr: here.into(), identity: identity::HOST, name: Some("node".into()) };
                assert_eq!(state.ipcache, vec![node]);
                assert!(state.identities.is_empty(), "{:?}", state.identities);
                assert!(state.endpoints.is_empty());
            }
        }
    }

    /// The ipcache and identities a builder keeps up to date pass by pass
    /// are what a fresh builder reads whole from the same engine: after
    /// pods come, go, move addresses (one taken over by another pod),
    /// relabel into new identities, and their namespace relabels.
    #[test]
    fn the_ipcache_kept_between_passes_is_the_one_read_whole() {
        use proptest::prelude::*;
        let step = (0u8..6, 0u8..5, 0u8..4, 0u8..3);
        proptest!(ProptestConfig::with_cases(64), |(steps in proptest::collection::vec(step, 1..40))| {
            let mut engine = engine(&[]);
            let mut kept = StateBuilder::default();
            let hints = Hints::default();
            for (revision, (what, who, ip, label)) in steps.into_iter().enumerate() {
                let name = format!("p{who}");
                let change = match what {
                    0..=2 => {
                        let mut p = pod(&name, 20 + ip);
                        p.labels = [("app".to_string(), format!("a{label}"))].into_iter().collect();
                        if what == 2 {
                            p.ips.clear();
                        }
                        Change::UpsertPod(p)
                    }
                    3 => Change::DeletePod(key(&name)),
                    _ => Change::UpsertNamespace(Namespace {
                        name: "x".into(),
                        labels: [("team".to_string(), format!("t{label}"))].into_iter().collect(),
                    }),
                };
                engine.apply([change]);
                let (incremental, _) = kept.build(&mut engine, revision as u64, &[], &hints, true);
                let (whole, _) = StateBuilder::default().build(&mut engine, revision as u64, &[], &hints, true);
                prop_assert_eq!(&incremental.ipcache, &whole.ipcache);
                prop_assert_eq!(&incremental.identities, &whole.identities);
            }
        });
    }
}
