//! Compiling a whole cluster and asking both the compiled entries (through the
//! datapath's lookup model) and the oracle about a flow.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use portcullis_agent::{
    compiled::EndpointState,
    datapath::keys::{EndpointKeys, Probe, endpoint_keys, lookup},
    model::{Cluster, Pod, PodKey, Protocol},
    policy::{
        Compiler, EndpointPolicy, Identities, IdentityLabels,
        compile::{PlanCache, pods_by_identity},
        oracle::{self, Party},
    },
};
use portcullis_common::{DIR_EGRESS, DIR_INGRESS, identity};

pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 255, 254));

pub struct Compiled {
    pub identities: Identities,
    pub pod_identity: BTreeMap<PodKey, u32>,
    pub endpoints: BTreeMap<PodKey, (u16, EndpointPolicy, EndpointKeys)>,
    ipcache: BTreeMap<IpAddr, u32>,
}

/// Compiles every pod of the cluster as a local endpoint.
pub fn compile(cluster: &Cluster) -> Compiled {
    let mut identities = Identities::default();
    let mut pod_identity = BTreeMap::new();
    let mut ipcache = BTreeMap::from([(NODE_IP, identity::HOST)]);
    for pod in cluster.pods.values().filter(|p| !p.ips.is_empty()) {
        let id = identities.acquire(IdentityLabels::of(cluster, pod));
        pod_identity.insert(pod.key(), id);
        for ip in &pod.ips {
            ipcache.insert(*ip, id);
        }
    }
    let by_identity = pods_by_identity(&pod_identity);
    let plans = PlanCache::default();
    let compiler = Compiler::new(cluster, &identities, &by_identity, &plans);
    let mut endpoints = BTreeMap::new();
    for (n, pod) in cluster.pods.values().enumerate() {
        let policy = compiler.endpoint(pod);
        let id = n as u16 + 1;
        let state = EndpointState {
            id,
            name: pod.key().to_string(),
            interface: String::new(),
            identity: pod_identity.get(&pod.key()).copied().unwrap_or(0),
            ingress: policy.ingress.clone(),
            egress: policy.egress.clone(),
        };
        let keys = endpoint_keys(&state).expect("compiled state has valid keys");
        endpoints.insert(pod.key(), (id, policy, keys));
    }
    Compiled { identities, pod_identity, endpoints, ipcache }
}

impl Compiled {
    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.ipcache.get(&ip).copied().unwrap_or(identity::WORLD)
    }

    /// What the datapath would decide for a new flow.
    pub fn allows(&self, client: Party<'_>, server: Party<'_>, protocol: Protocol, port: u16) -> bool {
        let egress = match client {
            Party::Pod(pod, _) => self.side(pod, DIR_EGRESS, server.ip(), protocol, port),
            _ => true,
        };
        let ingress = match server {
            // The programs admit the node (its addresses have the host identity).
            Party::Pod(_, _) if self.identity_of(client.ip()) == identity::HOST => true,
            Party::Pod(pod, _) => self.side(pod, DIR_INGRESS, client.ip(), protocol, port),
            _ => true,
        };
        egress && ingress
    }

    fn side(&self, pod: &Pod, direction: u8, remote: IpAddr, protocol: Protocol, port: u16) -> bool {
        let (id, policy, keys) = &self.endpoints[&pod.key()];
        let isolated =
            if direction == DIR_INGRESS { policy.ingress.isolated } else { policy.egress.isolated };
        if !isolated {
            return true;
        }
        let probe = Probe {
            direction,
            remote_identity: self.identity_of(remote),
            remote_ip: remote,
            protocol: protocol.number(),
            port,
        };
        lookup(keys, *id, probe).is_some()
    }
}

/// Checks compiled and oracle agree on one flow; returns the verdict.
pub fn agree(
    cluster: &Cluster,
    compiled: &Compiled,
    client: Party<'_>,
    server: Party<'_>,
    protocol: Protocol,
    port: u16,
) -> bool {
    let want = oracle::evaluate(cluster, client, server, protocol, port);
    let got = compiled.allows(client, server, protocol, port);
    assert_eq!(
        got,
        want.allowed,
        "compiled and oracle disagree on {} -> {} {protocol}/{port}\noracle: {want:#?}\ncluster: {cluster:#?}",
        client.ip(),
        server.ip(),
    );
    got
}

pub fn pod<'a>(cluster: &'a Cluster, key: &str) -> &'a Pod {
    let (ns, name) = key.split_once('/').expect("ns/name");
    &cluster.pods[&PodKey { namespace: ns.into(), name: name.into() }]
}
