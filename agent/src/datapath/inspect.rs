//! What the kernel holds, read back for the operator tools: an endpoint's
//! entries and flags as the programs see them (read from the maps, not from
//! the agent's own record of what it wrote, so a disagreement shows), map
//! fill levels, and verdicts computed over the read entries.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use portcullis_common::{
    AF_INET, CidrKey, DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EP_POLICY_OVERFLOW, EndpointInfo,
    IpKey, PolicyKey, identity,
};

use crate::metrics::MapFill;

use super::{
    Datapath,
    keys::{EndpointKeys, Probe, family_and_addr, lookup},
};

/// One endpoint as the kernel holds it.
#[derive(Clone, Debug)]
pub struct KernelEndpoint {
    pub ifindex: u32,
    pub info: EndpointInfo,
    /// The entries of its policy set (set id and generation 0, as the pure
    /// lookup model expects).
    pub keys: EndpointKeys,
}

impl KernelEndpoint {
    pub fn isolated(&self, direction: u8) -> bool {
        let bit = if direction == DIR_INGRESS { EP_ISOLATED_INGRESS } else { EP_ISOLATED_EGRESS };
        self.info.flags & bit != 0
    }

    pub fn overflowed(&self) -> bool {
        self.info.flags & EP_POLICY_OVERFLOW != 0
    }
}

/// What the programs would decide for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVerdict {
    /// The direction is not isolated.
    NotIsolated,
    /// The node reaching its own pod.
    Host,
    Allowed {
        rule_cookie: u32,
    },
    Dropped,
}

impl Datapath {
    /// The endpoint with this id as the kernel holds it; `None` when the
    /// endpoint table has no such id. Its entries are the ones the agent
    /// wrote, each looked up in the kernel's tries in the set its entry names
    /// (point lookups: walking a 262,144-entry trie would hold the main loop
    /// for seconds), so an entry the kernel lost or holds differently shows.
    pub fn kernel_endpoint(&self, id: u16) -> Option<KernelEndpoint> {
        let loaded = self.loaded.endpoints.get(&id);
        let (ifindex, info) = match loaded
            .and_then(|l| Some((l.ifindex, self.maps.endpoints.get(&l.ifindex, 0).ok()?)))
        {
            Some((idx, info)) if info.endpoint_id == id => (idx, info),
            // Not where the agent put it: look for it anywhere.
            _ => {
                self.maps.endpoints.iter().filter_map(Result::ok).find(|(_, info)| info.endpoint_id == id)?
            }
        };
        let mut keys = EndpointKeys::default();
        // The set the kernel's table entry names, with the entries the agent
        // wrote there.
        let (policy_id, generation) = (info.policy_id(), info.generation);
        if let Some(set) = self.endpoint_set(id) {
            for (bits, key) in set.keys.policy.keys() {
                let live = Key::new(*bits, PolicyKey { policy_id, generation, ..*key });
                if let Ok(value) = self.maps.policy.get(&live, 0) {
                    keys.policy.insert((*bits, *key), value);
                }
            }
            for (bits, key) in set.keys.cidr.keys() {
                let live = Key::new(*bits, CidrKey { policy_id, generation, ..*key });
                if let Ok(class) = self.maps.cidr.get(&live, 0) {
                    keys.cidr.insert((*bits, *key), class);
                }
            }
        }
        Some(KernelEndpoint { ifindex, info, keys })
    }

    /// Ids in the kernel's endpoint table.
    pub fn kernel_endpoint_ids(&self) -> std::collections::BTreeSet<u16> {
        self.maps.endpoints.iter().filter_map(Result::ok).map(|(_, info)| info.endpoint_id).collect()
    }

    /// The identity the programs give `ip`: the longest ipcache prefix in
    /// the kernel's map, world when none.
    pub fn kernel_identity(&self, ip: IpAddr) -> u32 {
        let (family, addr) = family_and_addr(ip);
        let bits = IpKey::HEADER_BITS + if family == AF_INET { 32 } else { 128 };
        self.maps
            .ipcache
            .get(&Key::new(bits, IpKey { family, _pad: [0; 3], addr }), 0)
            .unwrap_or(identity::WORLD)
    }

    /// The verdict the programs would give a new flow on `endpoint`, from
    /// the kernel's maps.
    pub fn kernel_verdict(&self, endpoint: &KernelEndpoint, probe: Probe) -> KernelVerdict {
        if endpoint.overflowed() {
            return KernelVerdict::Dropped;
        }
        if !endpoint.isolated(probe.direction) {
            return KernelVerdict::NotIsolated;
        }
        if probe.direction == DIR_INGRESS && probe.remote_identity == identity::HOST {
            return KernelVerdict::Host;
        }
        match lookup(&endpoint.keys, probe) {
            Some(rule_cookie) => KernelVerdict::Allowed { rule_cookie },
            None => KernelVerdict::Dropped,
        }
    }

    /// Entries per map against their sizes, as the agent wrote them (the
    /// conntrack count comes from its sweeps, which walk the table anyway).
    pub fn map_fill(&self, conntrack_live: Option<u64>) -> Vec<MapFill> {
        let l = &self.loaded;
        let s = &self.sizes;
        let policy: u64 = l.sets.values().map(|e| e.keys.policy.len() as u64).sum();
        let cidr: u64 = l.sets.values().map(|e| e.keys.cidr.len() as u64).sum();
        let addresses: u64 = l.endpoints.values().map(|e| e.addresses.len() as u64).sum();
        let mut out = vec![
            MapFill {
                name: "endpoints".into(),
                entries: l.endpoints.len() as u64,
                capacity: s.endpoints.into(),
            },
            MapFill { name: "ipcache".into(), entries: l.ipcache.len() as u64, capacity: s.ipcache.into() },
            MapFill { name: "policy".into(), entries: policy, capacity: s.policy.into() },
            MapFill { name: "cidr".into(), entries: cidr, capacity: s.cidr.into() },
            MapFill {
                name: "endpoint-addresses".into(),
                entries: addresses,
                capacity: s.endpoint_addresses.into(),
            },
            MapFill {
                name: "services".into(),
                entries: l.services.len() as u64,
                capacity: s.services.into(),
            },
        ];
        if let Some(live) = conntrack_live {
            out.push(MapFill { name: "conntrack".into(), entries: live, capacity: s.conntrack.into() });
        }
        out
    }
}
