//! Where the agent learns the cluster, and how the engine's result becomes the
//! compiled state the datapath loads.

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
    policy::Engine,
};

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
    ) -> (CompiledState, Vec<String>) {
        let mut errors = Vec::new();
        let live: BTreeSet<&PodKey> = engine.endpoints().keys().collect();
        self.ids.retain(|k, _| live.contains(k));
        let mut endpoints = Vec::new();
        let interfaces = node::Interfaces::read();
        for (key, policy) in engine.endpoints() {
            let Some(pod) = engine.cluster().pods.get(key) else { continue };
            let Some(interface) = pod.ips.iter().find_map(|ip| interfaces.interface_for(*ip)) else {
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
