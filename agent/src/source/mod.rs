//! Where the agent learns the cluster, and how the engine's result becomes the
//! compiled state the datapath loads.

pub mod kube;
pub mod manifests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use portcullis_common::identity;

use crate::{
    compiled::{CompiledState, EndpointState, IpcacheEntry, ServiceFrontend},
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

/// Hints by pod, kept from CNI ADD until CNI DEL or the pod's deletion.
#[derive(Default, Debug)]
pub struct Hints {
    by_pod: BTreeMap<PodKey, Hint>,
}

impl Hints {
    pub fn get(&self, pod: &PodKey) -> Option<&Hint> {
        self.by_pod.get(pod)
    }

    /// Records a hint; when the engine already has the pod without
    /// addresses (the API server learns them only after CNI ADD returns),
    /// gives it the hinted ones so it becomes an endpoint now.
    pub fn insert(&mut self, pod: PodKey, hint: Hint, engine: &mut Engine) {
        let patched = engine.cluster().pods.get(&pod).filter(|p| p.ips.is_empty() && !p.finished).map(|p| {
            let mut p = p.clone();
            p.ips = hint.ips.clone();
            p
        });
        self.by_pod.insert(pod, hint);
        if let Some(p) = patched {
            engine.apply([Change::UpsertPod(p)]);
        }
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
}

impl StateBuilder {
    fn id_for(&mut self, pod: &PodKey) -> Option<u16> {
        if let Some(id) = self.ids.get(pod) {
            return Some(*id);
        }
        let used: BTreeSet<u16> = self.ids.values().copied().collect();
        let id = (1..=u16::MAX).find(|i| !used.contains(i))?;
        self.ids.insert(pod.clone(), id);
        Some(id)
    }

    /// The state for the engine's local endpoints; endpoints whose interface
    /// cannot be found yet are reported and left out (the next pass retries).
    pub fn build(
        &mut self,
        engine: &Engine,
        revision: u64,
        node_ips: &[IpAddr],
        hints: &Hints,
    ) -> (CompiledState, Vec<String>) {
        let mut errors = Vec::new();
        let live: BTreeSet<&PodKey> = engine.endpoints().keys().collect();
        self.ids.retain(|k, _| live.contains(k));
        let mut endpoints = Vec::new();
        let interfaces = node::Interfaces::read();
        for (key, policy) in engine.endpoints() {
            let Some(pod) = engine.cluster().pods.get(key) else { continue };
            // The CNI plugin names the interface at pod start; otherwise
            // routes, neighbours and the bridge's forwarding table tell.
            let hinted = hints.get(key).map(|h| h.interface.clone());
            let Some(interface) =
                hinted.or_else(|| pod.ips.iter().find_map(|ip| interfaces.interface_for(*ip)))
            else {
                // Behind a bridge, a pod that has not spoken yet has no
                // neighbour entry: ask the kernel to resolve it for the next
                // pass. (The CNI plugin closes this window at pod start.)
                for ip in pod.ips.iter().filter(|ip| interfaces.unresolved_on_bridge(**ip)) {
                    node::resolve(*ip);
                }
                errors.push(format!("endpoint {key}: no interface found for {:?} yet", pod.ips));
                continue;
            };
            let Some(id) = self.id_for(key) else {
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
        let owners: BTreeMap<IpAddr, String> = engine
            .cluster()
            .pods
            .values()
            .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p.key().to_string())))
            .collect();
        let mut ipcache: Vec<IpcacheEntry> = engine
            .ipcache()
            .map(|(ip, id)| IpcacheEntry { cidr: ip.into(), identity: id, name: owners.get(&ip).cloned() })
            .collect();
        ipcache.extend(node_ips.iter().map(|ip| IpcacheEntry {
            cidr: (*ip).into(),
            identity: identity::HOST,
            name: Some("node".into()),
        }));
        ipcache.sort();
        ipcache.dedup_by_key(|e| e.cidr);
        let identities = engine.identities().iter().map(|(id, labels)| (id, labels.to_string())).collect();
        let mut services: Vec<ServiceFrontend> = engine
            .cluster()
            .services
            .values()
            .flat_map(|svc| {
                svc.cluster_ips.iter().flat_map(move |ip| {
                    svc.ports.iter().map(move |p| ServiceFrontend {
                        ip: *ip,
                        protocol: p.protocol,
                        port: p.port,
                    })
                })
            })
            .collect();
        services.sort();
        services.dedup();
        (CompiledState { revision, identities, ipcache, endpoints, services }, errors)
    }
}
