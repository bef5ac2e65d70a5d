//! What the datapath decides for a new flow, computed in userspace from the
//! same map entries the writer loads (`datapath::keys`): the client's egress
//! and the server's ingress, conntrack aside. The conformance runner's pure
//! mode and the policy tests judge the compiler with it against the oracle.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use portcullis_common::{DIR_EGRESS, DIR_INGRESS, identity};

use super::{EndpointPolicy, Engine, oracle::Party};
use crate::{
    datapath::keys::{EndpointKeys, Probe, lookup, policy_keys},
    model::{Pod, PodKey, Protocol},
};

pub struct Simulation {
    endpoints: BTreeMap<PodKey, (bool, bool, EndpointKeys)>,
    ipcache: HashMap<IpAddr, u32>,
}

impl Simulation {
    /// From compiled endpoints and the ipcache; `node_ips` get the host identity.
    pub fn new<'a>(
        endpoints: impl IntoIterator<Item = (&'a PodKey, &'a EndpointPolicy)>,
        ipcache: impl IntoIterator<Item = (IpAddr, u32)>,
        node_ips: &[IpAddr],
    ) -> Result<Self, String> {
        let mut ipcache: HashMap<IpAddr, u32> = ipcache.into_iter().collect();
        ipcache.extend(node_ips.iter().map(|ip| (*ip, identity::HOST)));
        let mut out = BTreeMap::new();
        for (key, policy) in endpoints {
            let keys = policy_keys(&policy.ingress, &policy.egress).map_err(|e| format!("{key}: {e}"))?;
            out.insert(key.clone(), (policy.ingress.isolated, policy.egress.isolated, keys));
        }
        Ok(Simulation { endpoints: out, ipcache })
    }

    pub fn from_engine(engine: &Engine, node_ips: &[IpAddr]) -> Result<Self, String> {
        Simulation::new(engine.endpoints(), engine.ipcache(), node_ips)
    }

    fn identity_of(&self, ip: IpAddr) -> u32 {
        self.ipcache.get(&ip).copied().unwrap_or(identity::WORLD)
    }

    /// Is a new connection allowed? Sides that are not local endpoints are
    /// not judged here (their own node's agent does that).
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
        let Some((ingress_isolated, egress_isolated, keys)) = self.endpoints.get(&pod.key()) else {
            return true;
        };
        let isolated = if direction == DIR_INGRESS { *ingress_isolated } else { *egress_isolated };
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
        lookup(keys, probe).is_some()
    }
}
