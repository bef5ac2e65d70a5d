//! Writing compiled state into the maps as a diff against what is loaded.
//!
//! Per endpoint the update is atomic for packets: the new entries go in under
//! the endpoint's other generation, one write to the endpoint table flips the
//! generation, and the old entries are deleted at the end of the pass (after
//! any packet that read the old generation is done with it).
//!
//! A policy that does not fit (a full map) fails closed: the partial new
//! generation is removed and the endpoint flips to an empty one flagged
//! `EP_POLICY_OVERFLOW`, which denies everything but the node until a later
//! pass fits it. Keeping the old policy instead could pass what the new one
//! denies. An endpoint the endpoint table cannot take gets the programs
//! anyway: they drop what arrives on an interface they do not know.
//!
//! What is loaded is tracked per endpoint id, and recovered from the pinned
//! maps when the agent starts: a restarted agent continues from what the
//! kernel enforces, never from an empty slate that would leave stale entries.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use portcullis_common::{
    AF_INET, AF_INET6, CidrKey, EP_CHECK_SOURCE, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EP_POLICY_OVERFLOW,
    EP_REPORT_ALLOWED, EndpointAddr, EndpointInfo, IpKey, PolicyKey, PolicyValue, ServiceKey,
};

use super::{
    Datapath,
    attach::{ifindex, ifname},
    keys::{EndpointKeys, endpoint_keys, family_and_addr},
};
use crate::compiled::{CompiledState, EndpointState, ServiceFrontend};

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
    #[error(
        "endpoint {endpoint}: its policy does not fit map {map} (raise --map-size {map}=N); it denies all \
         traffic but the node's until it fits"
    )]
    Overflow {
        endpoint: String,
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

#[derive(Default)]
pub(crate) struct Loaded {
    pub(super) endpoints: BTreeMap<u16, LoadedEndpoint>,
    /// Counter slots of `(endpoint, direction, rule cookie)` in use.
    pub(super) slots: BTreeMap<(u16, u8, u32), u32>,
    pub(super) free_slots: Vec<u32>,
    /// The next never-used slot (slot 0 means "not counted").
    pub(super) next_slot: u32,
    pub(super) ipcache: BTreeMap<(u32, IpKey), u32>,
    pub(super) services: BTreeSet<ServiceKey>,
}

/// An endpoint address as the address map keys it: `(family, address)`.
type Address = (u8, [u8; 16]);

pub(super) struct LoadedEndpoint {
    /// `namespace/pod`; empty when recovered from the pins (unknown).
    name: String,
    pub(super) ifindex: u32,
    /// Addresses the endpoint may send from (in the address map under `ifindex`).
    pub(super) addresses: BTreeSet<Address>,
    pub(super) info: EndpointInfo,
    pub(super) keys: EndpointKeys,
    /// Programs attached to `ifindex` (retried on every pass until they are).
    attached: bool,
    /// The state these entries were written from, when all of it was
    /// written: the same state again needs no work (not even its keys
    /// computed), which keeps a pass cheap when few endpoints change.
    applied: Option<EndpointState>,
}

/// Whether the prefix `new` (in `keys`) allows less than the broader prefix
/// its addresses matched before it came (the longest one of `keys`
/// containing it): an `except` hole, or fewer ports. A new pod's own /32
/// under a named-port rule allows what the rules around it allow and more.
fn carves_a_hole(keys: &EndpointKeys, new: &(u32, CidrKey)) -> bool {
    let (bits, key) = new;
    let net = |bits: u32, k: &CidrKey| {
        super::keys::ip_from(k.family, &k.addr)
            .and_then(|ip| IpNet::new(ip, (bits - CidrKey::HEADER_BITS) as u8).ok())
    };
    let Some(inner) = net(*bits, key) else { return true };
    let broader = keys
        .cidr
        .iter()
        .filter(|((b, k), _)| b < bits && k.direction == key.direction && k.family == key.family)
        .filter(|((b, k), _)| net(*b, k).is_some_and(|outer| outer.contains(&inner)))
        .max_by_key(|((b, _), _)| *b);
    let Some((_, outer_class)) = broader else { return false };
    let Some(inner_class) = keys.cidr.get(new) else { return true };
    // What a class allows: its entries' protocol and port prefix.
    let allows = |class: u32| -> BTreeSet<(u32, u8, [u8; 2])> {
        keys.policy
            .keys()
            .filter(|(_, k)| k.direction == key.direction && k.identity == class)
            .map(|(b, k)| (*b, k.protocol, k.port))
            .collect()
    };
    !allows(*inner_class).is_superset(&allows(*outer_class))
}

/// One generation of one endpoint's entries, to delete.
struct Stale {
    endpoint: u16,
    generation: u8,
    keys: EndpointKeys,
}

/// Where an endpoint is enforced: what a restarted agent needs to keep
/// each running pod on its interface and endpoint id before it can find
/// the interface itself (a bridged pod the node has not spoken to has no
/// neighbour entry yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub ifindex: u32,
    pub endpoint_id: u16,
    pub addresses: Vec<IpAddr>,
}

/// What one `apply` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    pub policy_entries: usize,
    pub ipcache_entries: usize,
    pub services: usize,
    /// Endpoints left as they were (last good state), with why.
    pub errors: Vec<String>,
    /// Names of the endpoints among `errors`.
    pub failed: std::collections::BTreeSet<String>,
    /// Something may allow less than before (entries, endpoints, peer
    /// addresses or Service frontends went or changed): tracked flows are
    /// worth checking against the policy. A pass that only added (a new
    /// pod, a new peer) cannot have cut a flow, and walking the whole
    /// conntrack table for it would slow every pod start.
    pub narrowed: bool,
}

impl Datapath {
    /// Makes the maps hold `state`. Endpoints whose update fails keep their
    /// previous policy and are reported; the others are applied. Cheap when
    /// nothing changed, so callers may re-apply to retry failures.
    pub fn apply(&mut self, state: &CompiledState) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut stale = Vec::new();

        let desired_ipcache: BTreeMap<(u32, IpKey), u32> =
            state.ipcache.iter().map(|e| (ipcache_key(&e.cidr), e.identity)).collect();
        // Addresses first, so new policy never meets an unknown peer.
        for (&(prefix, key), &identity) in &desired_ipcache {
            let was = self.loaded.ipcache.get(&(prefix, key));
            if was == Some(&identity) {
                continue;
            }
            report.narrowed |= was.is_some();
            match self.maps.ipcache.insert(&Key::new(prefix, key), identity, 0) {
                Ok(()) => {
                    self.loaded.ipcache.insert((prefix, key), identity);
                }
                Err(source) => report.errors.push(WriteError::Map { map: "ipcache", source }.to_string()),
            }
        }

        // Service frontends before policy: a pod's first packet to a Service
        // must wait for its backend.
        let desired_services: BTreeSet<ServiceKey> = state.services.iter().map(service_key).collect();
        for key in desired_services.difference(&self.loaded.services.clone()) {
            match self.maps.services.insert(key, 1, 0) {
                Ok(()) => {
                    self.loaded.services.insert(*key);
                }
                Err(source) => report.errors.push(WriteError::Map { map: "services", source }.to_string()),
            }
        }

        let mut seen = HashSet::new();
        for ep in &state.endpoints {
            if !seen.insert(ep.id) {
                let why = format!("endpoint id {} is used twice", ep.id);
                report.errors.push(WriteError::Invalid { endpoint: ep.name.clone(), why }.to_string());
                report.failed.insert(ep.name.clone());
                continue;
            }
            // A new pod on this id, also when the old one left in this same
            // pass (the lowest free id is handed out again at once).
            let handed_over = self
                .loaded
                .endpoints
                .get(&ep.id)
                .is_some_and(|prev| !prev.name.is_empty() && prev.name != ep.name);
            if let Some(prev) = self.loaded.endpoints.get_mut(&ep.id) {
                // Recovered from the pins, the name was unknown until now.
                prev.name = ep.name.clone();
            }
            if handed_over {
                report.narrowed = true;
                self.reset_counters(ep.id);
                self.release_slots(ep.id);
            }
            match self.apply_endpoint(ep, &mut stale, &mut report.narrowed) {
                Ok(true) => report.endpoints_written += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "endpoint kept at its last good state");
                    report.errors.push(e.to_string());
                    report.failed.insert(ep.name.clone());
                }
            }
        }

        let gone: Vec<u16> = self.loaded.endpoints.keys().copied().filter(|id| !seen.contains(id)).collect();
        for id in gone {
            self.remove_endpoint(id, &mut stale);
            report.endpoints_removed += 1;
            report.narrowed = true;
        }

        // Programs that read an old generation just before its flip finish
        // in microseconds; give them that before their entries go.
        if !stale.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        for s in stale {
            self.remove_keys(&s.keys, s.endpoint, s.generation);
        }

        let gone: Vec<(u32, IpKey)> =
            self.loaded.ipcache.keys().copied().filter(|k| !desired_ipcache.contains_key(k)).collect();
        for k in gone {
            let _ = self.maps.ipcache.remove(&Key::new(k.0, k.1));
            self.loaded.ipcache.remove(&k);
            report.narrowed = true;
        }
        let gone: Vec<ServiceKey> = self.loaded.services.difference(&desired_services).copied().collect();
        for k in gone {
            let _ = self.maps.services.remove(&k);
            self.loaded.services.remove(&k);
            report.narrowed = true;
        }

        // Links no endpoint owns (left by an earlier agent for pods that
        // are gone) carry programs that drop everything: remove them.
        let owned: BTreeSet<u32> = self.loaded.endpoints.values().map(|e| e.ifindex).collect();
        for idx in self.pinned_link_ifindexes() {
            if !owned.contains(&idx) {
                let _ = self.detach(idx);
            }
        }

        if report.endpoints_written > 0 || report.endpoints_removed > 0 {
            self.prune_slots();
        }

        report.services = self.loaded.services.len();
        report.policy_entries = self.loaded.endpoints.values().map(|e| e.keys.len()).sum();
        report.ipcache_entries = self.loaded.ipcache.len();
        report
    }

    /// The endpoints loaded now, with their interfaces and addresses.
    pub fn placements(&self) -> Vec<Placement> {
        self.loaded
            .endpoints
            .iter()
            .map(|(id, l)| Placement {
                ifindex: l.ifindex,
                endpoint_id: *id,
                addresses: l.addresses.iter().filter_map(|(f, a)| super::keys::ip_from(*f, a)).collect(),
            })
            .collect()
    }

    /// Policy and CIDR entries loaded, over all endpoints.
    pub fn loaded_entries(&self) -> usize {
        self.loaded.endpoints.values().map(|e| e.keys.len()).sum()
    }

    /// Returns whether the endpoint's entries were (re)written; sets
    /// `narrowed` when they may allow less than before.
    fn apply_endpoint(
        &mut self,
        ep: &EndpointState,
        stale: &mut Vec<Stale>,
        narrowed: &mut bool,
    ) -> Result<bool, WriteError> {
        if ep.id == 0 {
            return Err(WriteError::Invalid {
                endpoint: ep.name.clone(),
                why: "endpoint id 0 is reserved".into(),
            });
        }
        let idx = ifindex(&ep.interface).ok_or_else(|| WriteError::NoInterface {
            endpoint: ep.name.clone(),
            interface: ep.interface.clone(),
        })?;
        if let Some(p) = self.loaded.endpoints.get(&ep.id)
            && p.attached
            && p.ifindex == idx
            && p.applied.as_ref() == Some(ep)
        {
            return Ok(false);
        }
        let mut keys = self.compiled_keys(ep)?;
        for ((_, key), value) in keys.policy.iter_mut() {
            value.stats_slot = self.slot_for(ep.id, key.direction, value.rule_cookie);
        }
        let addresses: BTreeSet<Address> = ep.addresses.iter().map(|ip| family_and_addr(*ip)).collect();
        let mut flags = 0;
        if !addresses.is_empty() {
            flags |= EP_CHECK_SOURCE;
        }
        if ep.ingress.isolated {
            flags |= EP_ISOLATED_INGRESS;
        }
        if ep.egress.isolated {
            flags |= EP_ISOLATED_EGRESS;
        }
        if self.report_allowed {
            flags |= EP_REPORT_ALLOWED;
        }

        let previous = self.loaded.endpoints.get(&ep.id);
        // Addresses count too: a pod whose address changed on the same
        // interface (its Pod object replacing a CNI hint) must have its
        // source check follow, or its packets are dropped as forged.
        let unchanged = previous.is_some_and(|p| {
            p.ifindex == idx && p.info.flags == flags && p.keys == keys && p.addresses == addresses
        });
        let attached = previous.is_some_and(|p| p.attached && p.ifindex == idx);
        let generation = previous.map_or(0, |p| p.info.generation ^ 1);
        if unchanged {
            if !attached {
                self.attach_endpoint(ep)?;
            }
            if let Some(l) = self.loaded.endpoints.get_mut(&ep.id) {
                l.applied = Some(ep.clone());
            }
            return Ok(false);
        }
        // Only entries differ (a peer, or a peer's prefix, came or went:
        // the usual change): update the live generation in place instead
        // of writing a whole new one.
        if attached && previous.is_some_and(|p| p.info.flags == flags && p.addresses == addresses) {
            return self.update_in_place(ep, idx, keys, narrowed);
        }
        *narrowed |= previous.is_some();
        if previous.is_none() {
            // A new pod may get a recycled id: its counters start at zero.
            self.reset_counters(ep.id);
        }

        // The new generation's entries and addresses, or the failure that
        // makes the endpoint fail closed.
        let mut overflow = self.write_keys(&keys, ep.id, generation).err();
        if overflow.is_none() {
            for a in &addresses {
                let key = EndpointAddr { ifindex: idx, family: a.0, _pad: [0; 3], addr: a.1 };
                if let Err(source) = self.maps.ep_addrs.insert(key, 1, 0) {
                    overflow = Some(("endpoint-addresses", source));
                    break;
                }
            }
        }
        let mut ipv4 = [0; 4];
        let mut ipv6 = [0; 16];
        if let Some(IpAddr::V4(a)) = ep.addresses.iter().find(|a| a.is_ipv4()) {
            ipv4 = a.octets();
        }
        if let Some(IpAddr::V6(a)) = ep.addresses.iter().find(|a| a.is_ipv6()) {
            ipv6 = a.octets();
        }
        let info = |flags| EndpointInfo { endpoint_id: ep.id, generation, _pad: 0, flags, ipv4, ipv6 };
        let (info, loaded_keys) = match overflow {
            None => (info(flags), keys),
            Some(_) => {
                self.remove_keys(&keys, ep.id, generation);
                (info((flags & EP_REPORT_ALLOWED) | EP_POLICY_OVERFLOW), EndpointKeys::default())
            }
        };
        // The flip: from here packets see the new generation.
        let table_full = self.maps.endpoints.insert(idx, info, 0).err();
        let new = LoadedEndpoint {
            name: ep.name.clone(),
            ifindex: idx,
            addresses: addresses.clone(),
            info,
            keys: loaded_keys,
            attached,
            applied: overflow.is_none().then(|| ep.clone()),
        };
        if let Some(prev) = self.loaded.endpoints.insert(ep.id, new) {
            if prev.ifindex != idx {
                // The pod's veth was recreated: release the old interface.
                self.release_ifindex(prev.ifindex, &prev.addresses);
            } else {
                let gone: BTreeSet<Address> = prev.addresses.difference(&addresses).copied().collect();
                self.remove_addresses(idx, &gone);
            }
            stale.push(Stale { endpoint: ep.id, generation: prev.info.generation, keys: prev.keys });
        }
        if !attached {
            // Even when the table could not take the endpoint: the programs
            // then drop everything on the interface (fail closed).
            self.attach_endpoint(ep)?;
        }
        if let Some(source) = table_full {
            if let Some(l) = self.loaded.endpoints.get_mut(&ep.id) {
                // Not what the table holds: the next pass retries.
                l.keys = EndpointKeys::default();
                l.info.flags = EP_POLICY_OVERFLOW;
                l.applied = None;
            }
            return Err(WriteError::Overflow { endpoint: ep.name.clone(), map: "endpoints", source });
        }
        if let Some((map, source)) = overflow {
            return Err(WriteError::Overflow { endpoint: ep.name.clone(), map, source });
        }
        Ok(true)
    }

    /// The entries `ep` compiles to, with the prefix classes its loaded
    /// entries use (`EndpointKeys::keep_classes_of`).
    pub fn compiled_keys(&self, ep: &EndpointState) -> Result<EndpointKeys, WriteError> {
        let mut keys =
            endpoint_keys(ep).map_err(|why| WriteError::Invalid { endpoint: ep.name.clone(), why })?;
        if let Some(previous) = self.loaded.endpoints.get(&ep.id) {
            keys.keep_classes_of(&previous.keys);
        }
        Ok(keys)
    }

    /// Moves the live generation of an attached endpoint's entries to
    /// `keys` (its flags and addresses unchanged), in an order in which
    /// every moment allows, for each peer, what the old or the new policy
    /// allows (as a generation flip, which keeps the old entries until the
    /// flip): policy entries of new and changed classes and peers first,
    /// then new prefixes (their classes' entries are there), then prefixes
    /// that went (their addresses fall back to a broader prefix, already
    /// updated), then the policy entries no longer wanted. An entry moving
    /// between an exact port and a wildcard never leaves a moment in which
    /// neither is there. A full map makes the endpoint fail closed, as a
    /// failed generation write does.
    fn update_in_place(
        &mut self,
        ep: &EndpointState,
        idx: u32,
        keys: EndpointKeys,
        narrowed: &mut bool,
    ) -> Result<bool, WriteError> {
        let Some(loaded) = self.loaded.endpoints.get(&ep.id) else { return Ok(false) };
        let (id, generation, info) = (ep.id, loaded.info.generation, loaded.info);
        let key =
            |prefix: u32, k: &PolicyKey| Key::new(prefix, PolicyKey { endpoint_id: id, generation, ..*k });
        let added: Vec<((u32, PolicyKey), PolicyValue)> = keys
            .policy
            .iter()
            .filter(|(k, v)| loaded.keys.policy.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        let removed: Vec<(u32, PolicyKey)> =
            loaded.keys.policy.keys().filter(|k| !keys.policy.contains_key(k)).copied().collect();
        let cidr_key =
            |prefix: u32, k: &CidrKey| Key::new(prefix, CidrKey { endpoint_id: id, generation, ..*k });
        let cidr_added: Vec<((u32, CidrKey), u32)> = keys
            .cidr
            .iter()
            .filter(|(k, c)| loaded.keys.cidr.get(k) != Some(c))
            .map(|(k, c)| (*k, *c))
            .collect();
        let cidr_removed: Vec<(u32, CidrKey)> =
            loaded.keys.cidr.keys().filter(|k| !keys.cidr.contains_key(k)).copied().collect();
        // A changed value moves a flow to another rule: not less allowed.
        *narrowed |= !removed.is_empty()
            || !cidr_removed.is_empty()
            || cidr_added.iter().any(|(key, _)| carves_a_hole(&keys, key));
        let written = added
            .iter()
            .try_for_each(|((prefix, k), value)| {
                self.maps.policy.insert(&key(*prefix, k), value, 0).map_err(|e| ("policy", e))
            })
            .and_then(|()| {
                cidr_added.iter().try_for_each(|((prefix, k), class)| {
                    self.maps.cidr.insert(&cidr_key(*prefix, k), class, 0).map_err(|e| ("cidr", e))
                })
            });
        {
            if let Err((map, source)) = written {
                let failed =
                    EndpointInfo { flags: (info.flags & EP_REPORT_ALLOWED) | EP_POLICY_OVERFLOW, ..info };
                let _ = self.maps.endpoints.insert(idx, failed, 0);
                let old = self.loaded.endpoints.get(&id).map(|l| l.keys.clone()).unwrap_or_default();
                self.remove_keys(&old, id, generation);
                self.remove_keys(&keys, id, generation);
                if let Some(l) = self.loaded.endpoints.get_mut(&id) {
                    l.keys = EndpointKeys::default();
                    l.info = failed;
                    l.applied = None;
                }
                *narrowed = true;
                return Err(WriteError::Overflow { endpoint: ep.name.clone(), map, source });
            }
        }
        for (prefix, k) in &cidr_removed {
            let _ = self.maps.cidr.remove(&cidr_key(*prefix, k));
        }
        for (prefix, k) in &removed {
            let _ = self.maps.policy.remove(&key(*prefix, k));
        }
        if let Some(l) = self.loaded.endpoints.get_mut(&id) {
            l.keys = keys;
            l.applied = Some(ep.clone());
        }
        Ok(true)
    }

    /// Policy is in place before the programs see a packet.
    fn attach_endpoint(&mut self, ep: &EndpointState) -> Result<(), WriteError> {
        let Some(loaded) = self.loaded.endpoints.get(&ep.id) else { return Ok(()) };
        let idx = loaded.ifindex;
        self.attach(idx)
            .map_err(|source| WriteError::Attach { endpoint: ep.name.clone(), source: Box::new(source) })?;
        if let Some(loaded) = self.loaded.endpoints.get_mut(&ep.id) {
            loaded.attached = true;
        }
        Ok(())
    }

    fn remove_endpoint(&mut self, id: u16, stale: &mut Vec<Stale>) {
        if let Some(prev) = self.loaded.endpoints.remove(&id) {
            self.release_ifindex(prev.ifindex, &prev.addresses);
            stale.push(Stale { endpoint: id, generation: prev.info.generation, keys: prev.keys });
        }
    }

    fn remove_addresses(&mut self, idx: u32, addresses: &BTreeSet<Address>) {
        for a in addresses {
            let _ = self.maps.ep_addrs.remove(&EndpointAddr {
                ifindex: idx,
                family: a.0,
                _pad: [0; 3],
                addr: a.1,
            });
        }
    }

    /// Stops enforcing on an interface, unless another endpoint took it over.
    fn release_ifindex(&mut self, idx: u32, addresses: &BTreeSet<Address>) {
        let kept: BTreeSet<Address> = self
            .loaded
            .endpoints
            .values()
            .filter(|e| e.ifindex == idx)
            .flat_map(|e| e.addresses.iter().copied())
            .collect();
        let gone: BTreeSet<Address> = addresses.difference(&kept).copied().collect();
        self.remove_addresses(idx, &gone);
        if self.loaded.endpoints.values().any(|e| e.ifindex == idx) {
            return;
        }
        // Programs first: once the table forgets the interface they would
        // drop everything on it.
        if let Err(e) = self.detach(idx) {
            tracing::warn!(ifindex = idx, error = %e, "removing link pins");
        }
        let _ = self.maps.endpoints.remove(&idx);
    }

    /// Writes one generation of an endpoint's entries; on failure, names
    /// the map that was full.
    fn write_keys(
        &mut self,
        keys: &EndpointKeys,
        ep: u16,
        generation: u8,
    ) -> Result<(), (&'static str, aya::maps::MapError)> {
        for (&(prefix, key), value) in &keys.policy {
            let key = Key::new(prefix, PolicyKey { endpoint_id: ep, generation, ..key });
            self.maps.policy.insert(&key, value, 0).map_err(|e| ("policy", e))?;
        }
        for (&(prefix, key), class) in &keys.cidr {
            let key = Key::new(prefix, CidrKey { endpoint_id: ep, generation, ..key });
            self.maps.cidr.insert(&key, class, 0).map_err(|e| ("cidr", e))?;
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

    /// Rebuilds what is loaded from the pinned maps (a restart or upgrade):
    /// the live generation of each endpoint is kept, everything else (other
    /// generations, entries of endpoints that are gone, interfaces that
    /// vanished while no agent ran) is removed, and the programs inside the
    /// pinned links are replaced by this agent's.
    pub(super) fn recover(&mut self) {
        let endpoints: Vec<(u32, EndpointInfo)> = self.maps.endpoints.iter().filter_map(Result::ok).collect();
        let mut live: BTreeMap<u16, LoadedEndpoint> = BTreeMap::new();
        for (idx, info) in endpoints {
            if ifname(idx).is_none() || live.contains_key(&info.endpoint_id) {
                let _ = self.maps.endpoints.remove(&idx);
                continue;
            }
            let loaded = LoadedEndpoint {
                name: String::new(),
                ifindex: idx,
                addresses: BTreeSet::new(),
                info,
                keys: EndpointKeys::default(),
                attached: false,
                applied: None,
            };
            live.insert(info.endpoint_id, loaded);
        }
        let live_generation: BTreeMap<u16, u8> =
            live.iter().map(|(id, l)| (*id, l.info.generation)).collect();
        let is_live = |ep: u16, generation: u8| live_generation.get(&ep) == Some(&generation);

        let policy: Vec<Key<PolicyKey>> = self.maps.policy.keys().filter_map(Result::ok).collect();
        for key in policy {
            let data = key.data();
            if is_live(data.endpoint_id, data.generation) {
                if let (Ok(value), Some(ep)) =
                    (self.maps.policy.get(&key, 0), live.get_mut(&data.endpoint_id))
                {
                    if value.stats_slot != 0 {
                        let slot = (data.endpoint_id, data.direction, value.rule_cookie);
                        self.loaded.slots.insert(slot, value.stats_slot);
                        self.loaded.next_slot = self.loaded.next_slot.max(value.stats_slot + 1);
                    }
                    ep.keys.policy.insert((key.prefix_len(), PolicyKey { generation: 0, ..data }), value);
                }
            } else {
                let _ = self.maps.policy.remove(&key);
            }
        }
        let cidr: Vec<Key<CidrKey>> = self.maps.cidr.keys().filter_map(Result::ok).collect();
        for key in cidr {
            let data = key.data();
            if is_live(data.endpoint_id, data.generation) {
                if let (Ok(class), Some(ep)) = (self.maps.cidr.get(&key, 0), live.get_mut(&data.endpoint_id))
                {
                    ep.keys.cidr.insert((key.prefix_len(), CidrKey { generation: 0, ..data }), class);
                }
            } else {
                let _ = self.maps.cidr.remove(&key);
            }
        }
        let addresses: Vec<EndpointAddr> = self.maps.ep_addrs.keys().filter_map(Result::ok).collect();
        for key in addresses {
            match live.values_mut().find(|l| l.ifindex == key.ifindex) {
                Some(ep) => {
                    ep.addresses.insert((key.family, key.addr));
                }
                None => {
                    let _ = self.maps.ep_addrs.remove(&key);
                }
            }
        }
        self.loaded.services = self.maps.services.keys().filter_map(Result::ok).collect();
        let ipcache: Vec<Key<IpKey>> = self.maps.ipcache.keys().filter_map(Result::ok).collect();
        for key in ipcache {
            if let Ok(identity) = self.maps.ipcache.get(&key, 0) {
                self.loaded.ipcache.insert((key.prefix_len(), key.data()), identity);
            }
        }

        // Links of interfaces that still exist but no endpoint owns get this
        // agent's programs too (which drop everything there) until the first
        // pass decides: no window in which an old program or no program
        // judges. Links of vanished interfaces go.
        let ifindexes: BTreeSet<u32> = live.values().map(|l| l.ifindex).collect();
        for idx in self.pinned_link_ifindexes() {
            if ifindexes.contains(&idx) {
                continue;
            }
            if ifname(idx).is_none() || self.attach(idx).is_err() {
                let _ = self.detach(idx);
            }
        }
        self.loaded.endpoints = live;
        let ids: Vec<u16> = self.loaded.endpoints.keys().copied().collect();
        for id in ids {
            let Some(idx) = self.loaded.endpoints.get(&id).map(|l| l.ifindex) else { continue };
            match self.attach(idx) {
                Ok(()) => {
                    if let Some(l) = self.loaded.endpoints.get_mut(&id) {
                        l.attached = true;
                    }
                }
                Err(e) => tracing::warn!(ifindex = idx, error = %e, "re-attaching a recovered endpoint"),
            }
        }
        if !self.loaded.endpoints.is_empty() {
            tracing::info!(
                endpoints = self.loaded.endpoints.len(),
                "recovered enforced state from pinned maps"
            );
        }
    }
}

fn service_key(s: &ServiceFrontend) -> ServiceKey {
    let (family, addr) = family_and_addr(s.ip);
    debug_assert!(family == AF_INET || family == AF_INET6);
    ServiceKey { family, protocol: s.protocol.number(), port: s.port, addr }
}

fn ipcache_key(cidr: &IpNet) -> (u32, IpKey) {
    let cidr = cidr.trunc();
    let (family, addr) = family_and_addr(cidr.addr());
    (IpKey::HEADER_BITS + u32::from(cidr.prefix_len()), IpKey { family, _pad: [0; 3], addr })
}
