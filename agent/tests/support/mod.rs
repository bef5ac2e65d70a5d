//! Compiling a whole cluster (every pod a local endpoint) and asking both the
//! compiled entries (through the datapath's lookup model) and the oracle
//! about a flow.

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use portcullis_agent::{
    model::{Cluster, Pod, PodKey, Protocol},
    policy::{
        Compiler, EndpointPolicy, Identities, IdentityLabels, Simulation,
        compile::{PlanCache, pods_by_identity},
        oracle::{self, Party},
    },
};

pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 255, 254));

pub struct Compiled {
    pub identities: Identities,
    pub pod_identity: BTreeMap<PodKey, u32>,
    pub endpoints: BTreeMap<PodKey, EndpointPolicy>,
    simulation: Simulation,
}

/// Compiles every pod of the cluster as a local endpoint.
pub fn compile(cluster: &Cluster) -> Compiled {
    let mut identities = Identities::default();
    let mut pod_identity = BTreeMap::new();
    let mut ipcache = Vec::new();
    for pod in cluster.pods.values().filter(|p| !p.ips.is_empty()) {
        let id = identities.acquire(IdentityLabels::of(cluster, pod));
        pod_identity.insert(pod.key(), id);
        ipcache.extend(pod.ips.iter().map(|ip| (*ip, id)));
    }
    let by_identity = pods_by_identity(&pod_identity);
    let plans = PlanCache::default();
    let compiler = Compiler::new(cluster, &identities, &by_identity, &plans);
    let endpoints: BTreeMap<PodKey, EndpointPolicy> =
        cluster.pods.values().map(|pod| (pod.key(), compiler.endpoint(pod))).collect();
    let simulation = Simulation::new(&endpoints, ipcache, &[NODE_IP]).expect("compiled state has valid keys");
    Compiled { identities, pod_identity, endpoints, simulation }
}

impl Compiled {
    /// What the datapath would decide for a new flow.
    pub fn allows(&self, client: Party<'_>, server: Party<'_>, protocol: Protocol, port: u16) -> bool {
        self.simulation.allows(client, server, protocol, port)
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
