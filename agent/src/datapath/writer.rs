//! Writing compiled state into the maps as a diff against what is loaded.
//!
//! Per endpoint the update is atomic for packets: the new entries go in under
//! the endpoint's other generation, one write to the endpoint table flips the
//! generation, then the old entries are deleted. A failed write (a full map)
//! rolls the new generation back and leaves the last good policy enforced.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use portcullis_common::{CidrKey, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EndpointInfo, IpKey, PolicyKey};

use super::{
    Datapath,
    attach::ifindex,
    keys::{EndpointKeys, endpoint_keys},
};
use crate::compiled::{CompiledState, EndpointState};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("endpoint {endpoint}: interface {interface} not found")]
    NoInterface { endpoint: String, interface: String },
    #[error("endpoint {endpoint}: {why}")]
    Invalid { endpoint: String, why: String },
    #[error("endpoint {endpoint}: attaching programs")]
    Attach {
        endpoint: String,
        #[source]
        source: Box<super::AttachError>,
    },
    #[error("writing map {map} (full? see its size setting)")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

#[derive(Default)]
pub(crate) struct Loaded {
    endpoints: HashMap<u32, LoadedEndpoint>,
    ipcache: BTreeMap<(u32, IpKey), u32>,
}

struct LoadedEndpoint {
    info: EndpointInfo,
    keys: EndpointKeys,
}

/// What one `apply` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    pub policy_entries: usize,
    pub ipcache_entries: usize,
    /// Endpoints left as they were (last good state), with why.
    pub errors: Vec<String>,
}

impl Datapath {
    /// Makes the maps hold `state`. Endpoints whose update fails keep their
    /// previous policy and are reported; the others are applied.
    pub fn apply(&mut self, state: &CompiledState) -> ApplyReport {
        let mut report = ApplyReport::default();

        let desired_ipcache: BTreeMap<(u32, IpKey), u32> =
            state.ipcache.iter().map(|e| (ipcache_key(&e.cidr), e.identity)).collect();
        // Addresses first, so new policy never meets an unknown peer.
        for (&(prefix, key), &identity) in &desired_ipcache {
            if self.loaded.ipcache.get(&(prefix, key)) == Some(&identity) {
                continue;
            }
            match self.maps.ipcache.insert(&Key::new(prefix, key), identity, 0) {
                Ok(()) => {
                    self.loaded.ipcache.insert((prefix, key), identity);
                }
                Err(source) => report.errors.push(WriteError::Map { map: "ipcache", source }.to_string()),
            }
        }

        let mut present = HashSet::new();
        for ep in &state.endpoints {
            match self.apply_endpoint(ep) {
                Ok(Some(ifindex)) => {
                    report.endpoints_written += 1;
                    present.insert(ifindex);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "endpoint kept at its last good state");
                    report.errors.push(format!("{e:#}"));
                }
            }
            if let Some(idx) = ifindex(&ep.interface) {
                present.insert(idx);
            }
        }

        let gone: Vec<u32> = self.loaded.endpoints.keys().copied().filter(|i| !present.contains(i)).collect();
        for idx in gone {
            self.remove_endpoint(idx);
            report.endpoints_removed += 1;
        }

        let stale: Vec<(u32, IpKey)> =
            self.loaded.ipcache.keys().copied().filter(|k| !desired_ipcache.contains_key(k)).collect();
        for k in stale {
            let _ = self.maps.ipcache.remove(&Key::new(k.0, k.1));
            self.loaded.ipcache.remove(&k);
        }

        report.policy_entries = self.loaded.endpoints.values().map(|e| e.keys.len()).sum();
        report.ipcache_entries = self.loaded.ipcache.len();
        report
    }

    /// Returns the ifindex when the endpoint was (re)written, `None` when it
    /// was already up to date.
    fn apply_endpoint(&mut self, ep: &EndpointState) -> Result<Option<u32>, WriteError> {
        let idx = ifindex(&ep.interface).ok_or_else(|| WriteError::NoInterface {
            endpoint: ep.name.clone(),
            interface: ep.interface.clone(),
        })?;
        if ep.id == 0 {
            return Err(WriteError::Invalid {
                endpoint: ep.name.clone(),
                why: "endpoint id 0 is reserved".into(),
            });
        }
        let keys = endpoint_keys(ep).map_err(|why| WriteError::Invalid { endpoint: ep.name.clone(), why })?;
        let mut flags = 0;
        if ep.ingress.isolated {
            flags |= EP_ISOLATED_INGRESS;
        }
        if ep.egress.isolated {
            flags |= EP_ISOLATED_EGRESS;
        }

        let previous = self.loaded.endpoints.get(&idx);
        if let Some(prev) = previous
            && prev.info.endpoint_id == ep.id
            && prev.info.flags == flags
            && prev.keys == keys
        {
            return Ok(None);
        }
        let generation = previous.map_or(0, |p| p.info.generation ^ 1);
        let first_time = previous.is_none();
        let info = EndpointInfo { endpoint_id: ep.id, generation, _pad: 0, flags };

        if let Err(e) = self.write_keys(&keys, ep.id, generation) {
            self.remove_keys(&keys, ep.id, generation);
            return Err(e);
        }
        // The flip: from here packets see the new generation.
        if let Err(source) = self.maps.endpoints.insert(idx, info, 0) {
            self.remove_keys(&keys, ep.id, generation);
            return Err(WriteError::Map { map: "endpoints", source });
        }
        if let Some(prev) = self.loaded.endpoints.insert(idx, LoadedEndpoint { info, keys }) {
            self.remove_keys(&prev.keys, prev.info.endpoint_id, prev.info.generation);
        }
        if first_time {
            // Policy is in place before the programs see a packet.
            self.attach(&ep.interface).map_err(|source| WriteError::Attach {
                endpoint: ep.name.clone(),
                source: Box::new(source),
            })?;
        }
        Ok(Some(idx))
    }

    fn remove_endpoint(&mut self, idx: u32) {
        let _ = self.maps.endpoints.remove(&idx);
        if let Some(prev) = self.loaded.endpoints.remove(&idx) {
            self.remove_keys(&prev.keys, prev.info.endpoint_id, prev.info.generation);
        }
        if let Err(e) = self.detach(idx) {
            tracing::warn!(ifindex = idx, error = %e, "removing link pins");
        }
    }

    fn write_keys(&mut self, keys: &EndpointKeys, ep: u16, generation: u8) -> Result<(), WriteError> {
        for (&(prefix, key), value) in &keys.policy {
            let key = Key::new(prefix, PolicyKey { endpoint_id: ep, generation, ..key });
            self.maps
                .policy
                .insert(&key, value, 0)
                .map_err(|source| WriteError::Map { map: "policy", source })?;
        }
        for (&(prefix, key), class) in &keys.cidr {
            let key = Key::new(prefix, CidrKey { endpoint_id: ep, generation, ..key });
            self.maps
                .cidr
                .insert(&key, class, 0)
                .map_err(|source| WriteError::Map { map: "cidr", source })?;
        }
        Ok(())
    }

    /// Removes one generation of an endpoint's entries (missing ones are fine).
    fn remove_keys(&mut self, keys: &EndpointKeys, ep: u16, generation: u8) {
        for &(prefix, key) in keys.policy.keys() {
            let _ =
                self.maps.policy.remove(&Key::new(prefix, PolicyKey { endpoint_id: ep, generation, ..key }));
        }
        for &(prefix, key) in keys.cidr.keys() {
            let _ = self.maps.cidr.remove(&Key::new(prefix, CidrKey { endpoint_id: ep, generation, ..key }));
        }
    }
}

fn ipcache_key(cidr: &IpNet) -> (u32, IpKey) {
    let cidr = cidr.trunc();
    let key = match cidr.addr() {
        IpAddr::V4(a) => IpKey::v4(a.octets()),
        IpAddr::V6(a) => IpKey::v6(a.octets()),
    };
    (IpKey::HEADER_BITS + u32::from(cidr.prefix_len()), key)
}
