//! Writing compiled state into the maps as a diff against what is loaded.
//!
//! Policy lives in **policy sets**: the entries one compiled policy makes,
//! keyed by the set's id. Endpoints whose policy is the same (a Deployment's
//! replicas) share a set, and each endpoint's table entry names its set. So
//! a new replica costs a few map writes, not a thousand trie inserts, and a
//! policy change touches each distinct policy once, not every pod.
//!
//! Every change is atomic for packets:
//! - an endpoint moving to another set (its policy changed and others keep
//!   the old one, or another set holds the new one already) moves with one
//!   write to the endpoint table; a set is deleted at the end of the pass
//!   once no endpoint names it and any packet that read an old table entry
//!   is done with it;
//! - a set whose endpoints all move to the same new policy is updated in
//!   place, in an order in which every moment allows what the old or the
//!   new policy allows (`update_set`).
//!
//! A policy that does not fit (a full map) fails closed: the partial set is
//! removed and its endpoints are flagged `EP_POLICY_OVERFLOW`, which denies
//! everything but the node until a later pass fits it. Keeping the old policy
//! instead could pass what the new one denies. An endpoint the endpoint
//! table cannot take gets the programs anyway: they drop what arrives on an
//! interface they do not know.
//!
//! What is loaded is tracked per endpoint id and per set, and recovered from
//! the pinned maps when the agent starts: a restarted agent continues from
//! what the kernel enforces, never from an empty slate that would leave
//! stale entries. Endpoints written before sets existed keep their entries
//! under their own id (`EndpointInfo::policy_id` 0) as a set of one, which
//! others with the same policy join when the next pass writes them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use aya::maps::lpm_trie::Key;
use ipnet::IpNet;
use portcullis_common::{
    AF_INET, AF_INET6, CidrKey, EP_CHECK_SOURCE, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EP_POLICY_OVERFLOW,
    EP_REPORT_ALLOWED, EndpointAddr, EndpointInfo, IpKey, POLICY_SET_BASE, PolicyKey, ServiceKey,
};

use super::{
    Datapath,
    attach::ifname,
    keys::{EndpointKeys, class_floor, endpoint_keys, family_and_addr, policy_keys, policy_keys_keeping},
};
use crate::compiled::{CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, ServiceFrontend};

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
    pub(super) sets: BTreeMap<SetRef, LoadedSet>,
    /// Counter slots of `(policy set id, direction, rule cookie)` in use.
    pub(super) slots: BTreeMap<(u16, u8, u32), u32>,
    pub(super) free_slots: Vec<u32>,
    /// The next never-used slot (slot 0 means "not counted").
    pub(super) next_slot: u32,
    pub(super) ipcache: BTreeMap<(u32, IpKey), u32>,
    /// The state's ipcache as last written whole (every entry in the map,
    /// nothing else there): the next is diffed against it, so a pass that
    /// moves a few pods touches a few entries, not 10,000. `None` after a
    /// failed write, or for a list not sorted by distinct prefixes.
    pub(super) ipcache_written: Option<Vec<IpcacheEntry>>,
    pub(super) services: BTreeSet<ServiceKey>,
}

/// An ipcache entry's key: `(prefix length, address)`.
type IpcacheKey = (u32, IpKey);

/// An endpoint address as the address map keys it: `(family, address)`.
type Address = (u8, [u8; 16]);

/// Where a policy set's entries are in the tries: their `policy_id` and
/// `generation` (always 0 for sets; endpoints written before sets existed
/// may hold either generation under their own id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SetRef {
    pub(super) id: u16,
    pub(super) generation: u8,
}

/// The policy a set was compiled from: both directions.
type SetPolicy = (Arc<DirectionPolicy>, Arc<DirectionPolicy>);

pub(super) struct LoadedSet {
    pub(super) keys: EndpointKeys,
    /// What the entries were compiled from, to find the set again for the
    /// same policy; `None` when recovered from the pins (unknown until a
    /// pass compares the entries themselves).
    policy: Option<Arc<SetPolicy>>,
    policy_hash: u64,
    pub(super) members: BTreeSet<u16>,
    /// Per direction, where fresh prefix classes start: above every class
    /// the set has held, so one whose entries a failed removal left in the
    /// kernel never comes back naming another prefix.
    class_floor: [u32; 2],
}

pub(super) struct LoadedEndpoint {
    /// `namespace/pod`; empty when recovered from the pins (unknown).
    name: String,
    pub(super) ifindex: u32,
    /// Addresses the endpoint may send from (in the address map under `ifindex`).
    pub(super) addresses: BTreeSet<Address>,
    pub(super) info: EndpointInfo,
    /// The set its table entry names; `None` while it fails closed.
    pub(super) set: Option<SetRef>,
    /// Programs attached to `ifindex` (retried on every pass until they are).
    attached: bool,
    /// The state this endpoint was written from, when all of it was
    /// written: the same state again needs no work, which keeps a pass
    /// cheap when few endpoints change.
    applied: Option<EndpointState>,
}

fn policy_hash(ingress: &DirectionPolicy, egress: &DirectionPolicy) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ingress.hash(&mut h);
    egress.hash(&mut h);
    h.finish()
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

/// What an in-place set update still has to remove once its members'
/// table entries are written.
#[derive(Default)]
struct Removals {
    /// Entries were written or are to be removed: the set's policy changed.
    wrote: bool,
    set: Option<SetRef>,
    policy: Vec<(u32, PolicyKey)>,
    cidr: Vec<(u32, CidrKey)>,
}

impl Removals {
    fn removes(&self) -> bool {
        !self.policy.is_empty() || !self.cidr.is_empty()
    }
}

/// Endpoints of one pass that share a policy, and the set they go to.
struct Group<'a> {
    policy: &'a EndpointState,
    hash: u64,
    members: Vec<(&'a EndpointState, u32)>,
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
    /// An endpoint id or a peer address passed from one holder to another
    /// in this pass (a pod left, its id or address went to a new one):
    /// tracked flows may name the new holder, so a new pod waits for their
    /// revocation before it is said to be enforced.
    pub reused: bool,
}

impl Datapath {
    /// Makes the maps hold `state`. Endpoints whose update fails keep their
    /// previous policy and are reported; the others are applied. Cheap when
    /// nothing changed, so callers may re-apply to retry failures.
    pub fn apply(&mut self, state: &CompiledState) -> ApplyReport {
        let mut report = ApplyReport::default();
        let started = std::time::Instant::now();

        // What of the ipcache to write now, and what to remove after the
        // policy: the difference from the last list when there is one.
        let (ipcache_writes, ipcache_gone): (Vec<(IpcacheKey, u32)>, Vec<IpcacheKey>) =
            match self.loaded.ipcache_written.take().filter(|_| distinct_sorted(&state.ipcache)) {
                Some(last) => {
                    let (writes, gone) = ipcache_delta(&last, &state.ipcache);
                    (
                        writes.into_iter().map(|e| (ipcache_key(&e.cidr), e.identity)).collect(),
                        gone.iter().map(ipcache_key).collect(),
                    )
                }
                None => {
                    let desired: BTreeMap<(u32, IpKey), u32> =
                        state.ipcache.iter().map(|e| (ipcache_key(&e.cidr), e.identity)).collect();
                    let gone =
                        self.loaded.ipcache.keys().copied().filter(|k| !desired.contains_key(k)).collect();
                    (desired.into_iter().collect(), gone)
                }
            };
        let ipcache_errors = report.errors.len();
        // Addresses first, so new policy never meets an unknown peer.
        for ((prefix, key), identity) in ipcache_writes {
            let was = self.loaded.ipcache.get(&(prefix, key));
            if was == Some(&identity) {
                continue;
            }
            report.narrowed |= was.is_some();
            report.reused |= was.is_some();
            match self.maps.ipcache.insert(&Key::new(prefix, key), identity, 0) {
                Ok(()) => {
                    self.loaded.ipcache.insert((prefix, key), identity);
                }
                Err(source) => report.errors.push(WriteError::Map { map: "ipcache", source }.to_string()),
            }
        }
        let ipcache_failed = report.errors.len() > ipcache_errors;
        let ipcache_done = std::time::Instant::now();

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

        // The endpoints that need writing, grouped by their policy.
        let mut seen = HashSet::new();
        let mut groups: Vec<Group<'_>> = Vec::new();
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut by_address: HashMap<(usize, usize), usize> = HashMap::new();
        let fail = |report: &mut ApplyReport, ep: &EndpointState, e: WriteError| {
            tracing::warn!(error = %e, "endpoint kept at its last good state");
            report.errors.push(e.to_string());
            report.failed.insert(ep.name.clone());
        };
        let indexes = super::IfIndexes::open();
        for ep in &state.endpoints {
            if !seen.insert(ep.id) {
                let why = format!("endpoint id {} is used twice", ep.id);
                fail(&mut report, ep, WriteError::Invalid { endpoint: ep.name.clone(), why });
                continue;
            }
            if ep.id == 0 || ep.id >= POLICY_SET_BASE {
                let why = format!("endpoint id {} is outside 1..{POLICY_SET_BASE}", ep.id);
                fail(&mut report, ep, WriteError::Invalid { endpoint: ep.name.clone(), why });
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
                // Recovered from the pins, the name was unknown until now:
                // whose it was is not known either.
                report.reused |= prev.name.is_empty();
                prev.name = ep.name.clone();
            }
            if handed_over {
                report.narrowed = true;
                report.reused = true;
                self.reset_counters(ep.id);
            }
            let Some(idx) = indexes.get(&ep.interface) else {
                let interface = ep.interface.clone();
                fail(&mut report, ep, WriteError::NoInterface { endpoint: ep.name.clone(), interface });
                continue;
            };
            // The pod's sandbox was made anew (a new veth, the same pod).
            report.reused |= self.loaded.endpoints.get(&ep.id).is_some_and(|p| p.ifindex != idx);
            if let Some(p) = self.loaded.endpoints.get(&ep.id)
                && p.attached
                && p.ifindex == idx
                && p.applied.as_ref() == Some(ep)
            {
                continue;
            }
            // Replicas hold the very same policy (shared by the engine):
            // found by address before hashing a copy's content.
            let shared = (Arc::as_ptr(&ep.ingress) as usize, Arc::as_ptr(&ep.egress) as usize);
            if let Some(&g) = by_address.get(&shared) {
                groups[g].members.push((ep, idx));
                continue;
            }
            let hash = policy_hash(&ep.ingress, &ep.egress);
            let same = by_hash.entry(hash).or_default();
            match same.iter().find(|g| {
                let p = groups[**g].policy;
                p.ingress == ep.ingress && p.egress == ep.egress
            }) {
                Some(&g) => {
                    groups[g].members.push((ep, idx));
                    by_address.insert(shared, g);
                }
                None => {
                    same.push(groups.len());
                    by_address.insert(shared, groups.len());
                    groups.push(Group { policy: ep, hash, members: vec![(ep, idx)] });
                }
            }
        }

        let grouped = std::time::Instant::now();
        let targets = self.choose_sets(&groups);
        let mut removals = Vec::new();
        // Endpoints joining a set that is updated in place, to be written
        // once it holds the new policy alone (until its removals, the set
        // still allows what its old policy allowed, which was never theirs).
        let mut joiners: Vec<(&EndpointState, u32, SetRef, bool)> = Vec::new();
        for (group, target) in groups.iter().zip(targets) {
            let (set, rewritten, narrowing) = match self.prepare_set(group, target, &mut report.narrowed) {
                Ok((set, removal)) => {
                    let (rewritten, narrowing) = (removal.wrote, removal.removes());
                    removals.push(removal);
                    (set, rewritten, narrowing)
                }
                Err(e) => {
                    // A full map fails every member closed; other errors
                    // leave enforced endpoints at their last good state,
                    // and new ones closed.
                    let full = matches!(e, WriteError::Overflow { .. });
                    tracing::warn!(error = %e, endpoints = group.members.len(), "policy not written");
                    for &(ep, idx) in &group.members {
                        report.errors.push(e.to_string());
                        report.failed.insert(ep.name.clone());
                        if full || !self.loaded.endpoints.contains_key(&ep.id) {
                            let _ = self.apply_endpoint(ep, idx, None, &mut report.narrowed);
                        }
                    }
                    continue;
                }
            };
            for &(ep, idx) in &group.members {
                if narrowing && self.loaded.endpoints.get(&ep.id).and_then(|l| l.set) != Some(set) {
                    joiners.push((ep, idx, set, rewritten));
                    continue;
                }
                match self.apply_endpoint(ep, idx, Some(set), &mut report.narrowed) {
                    Ok(wrote) if wrote || rewritten => report.endpoints_written += 1,
                    Ok(_) => {}
                    Err(e) => fail(&mut report, ep, e),
                }
            }
        }
        let gone: Vec<u16> = self.loaded.endpoints.keys().copied().filter(|id| !seen.contains(id)).collect();
        for id in gone {
            self.remove_endpoint(id);
            report.endpoints_removed += 1;
            report.narrowed = true;
            report.reused = true;
        }

        // Members have their new table entries: what only the old policy of
        // an updated set allowed may go now. A verdict takes several lookups
        // (the peer's identity, any peer, its prefix): a packet that made
        // some of them before an update began and the rest after it ended
        // would see neither policy whole. Programs finish in microseconds;
        // give them a millisecond before entries go.
        let grace = || std::thread::sleep(Duration::from_millis(1));
        let mut graced = false;
        if removals.iter().any(Removals::removes) {
            grace();
            graced = true;
        }
        for r in removals {
            self.finish_set_update(r);
        }
        let joined = !joiners.is_empty();
        for (ep, idx, set, rewritten) in joiners {
            match self.apply_endpoint(ep, idx, Some(set), &mut report.narrowed) {
                Ok(wrote) if wrote || rewritten => report.endpoints_written += 1,
                Ok(_) => {}
                Err(e) => fail(&mut report, ep, e),
            }
        }
        let written = std::time::Instant::now();
        self.attach_new_endpoints(&mut report);
        let attached = std::time::Instant::now();
        // Then the sets no endpoint names any more.
        let empty: Vec<SetRef> =
            self.loaded.sets.iter().filter(|(_, s)| s.members.is_empty()).map(|(r, _)| *r).collect();
        if !empty.is_empty() && (joined || !graced) {
            grace();
        }
        for r in &empty {
            if let Some(set) = self.loaded.sets.remove(r) {
                self.remove_keys(&set.keys, *r);
            }
        }

        for k in ipcache_gone {
            if self.loaded.ipcache.remove(&k).is_some() {
                let _ = self.maps.ipcache.remove(&Key::new(k.0, k.1));
                report.narrowed = true;
            }
        }
        if !ipcache_failed && distinct_sorted(&state.ipcache) {
            self.loaded.ipcache_written = Some(state.ipcache.clone());
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

        if report.endpoints_written > 0 || report.endpoints_removed > 0 || !empty.is_empty() {
            self.prune_slots();
        }

        report.services = self.loaded.services.len();
        report.policy_entries = self.loaded_entries();
        report.ipcache_entries = self.loaded.ipcache.len();
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        let ended = std::time::Instant::now();
        tracing::debug!(
            ipcache_ms = ms(started, ipcache_done),
            group_ms = ms(ipcache_done, grouped),
            sets_and_endpoints_ms = ms(grouped, written),
            attach_ms = ms(written, attached),
            cleanup_ms = ms(attached, ended),
            "maps written"
        );
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

    /// The addresses the ipcache names with an allocated identity (pods',
    /// not the node's or a CIDR's), and their numbers: what an earlier agent
    /// gave them, for a restarted one to keep.
    pub fn address_identities(&self) -> Vec<(IpAddr, u32)> {
        self.loaded
            .ipcache
            .iter()
            .filter(|(_, id)| **id >= portcullis_common::identity::FIRST_ALLOCATED)
            .filter(|((prefix, key), _)| {
                let len = prefix.saturating_sub(IpKey::HEADER_BITS);
                len == if key.family == portcullis_common::AF_INET { 32 } else { 128 }
            })
            .filter_map(|((_, key), id)| Some((super::keys::ip_from(key.family, &key.addr)?, *id)))
            .collect()
    }

    /// Policy and CIDR entries loaded, over all policy sets.
    pub fn loaded_entries(&self) -> usize {
        self.loaded.sets.values().map(|s| s.keys.len()).sum()
    }

    /// The policy set an endpoint is in: its id and how many endpoints
    /// share it.
    pub fn policy_set_of(&self, endpoint: u16) -> Option<(u16, usize)> {
        let set = self.loaded.endpoints.get(&endpoint)?.set?;
        Some((set.id, self.loaded.sets.get(&set)?.members.len()))
    }

    /// For each group, the set it goes to: `Some` an existing one (holding
    /// its policy already, or to be updated in place), `None` a new one. A
    /// set is updated in place only when all its members are in the group
    /// (each endpoint sees its old or its new policy, never another's), and
    /// is given to one group only.
    fn choose_sets(&self, groups: &[Group<'_>]) -> Vec<Option<SetRef>> {
        let mut taken: BTreeSet<SetRef> = BTreeSet::new();
        let mut out: Vec<Option<SetRef>> = groups
            .iter()
            .map(|g| {
                let found = self
                    .loaded
                    .sets
                    .iter()
                    .find(|(_, s)| {
                        s.policy_hash == g.hash
                            && s.policy
                                .as_deref()
                                .is_some_and(|(i, e)| *i == g.policy.ingress && *e == g.policy.egress)
                    })
                    .map(|(r, _)| *r)
                    .or_else(|| self.recovered_set_holding(g));
                found.inspect(|r| {
                    taken.insert(*r);
                })
            })
            .collect();
        for (g, target) in groups.iter().zip(out.iter_mut()) {
            if target.is_some() {
                continue;
            }
            let ids: BTreeSet<u16> = g.members.iter().map(|(ep, _)| ep.id).collect();
            let mut candidates: BTreeMap<SetRef, usize> = BTreeMap::new();
            for (ep, _) in &g.members {
                if let Some(r) = self.loaded.endpoints.get(&ep.id).and_then(|l| l.set) {
                    *candidates.entry(r).or_default() += 1;
                }
            }
            let best = candidates
                .into_iter()
                .filter(|(r, _)| !taken.contains(r))
                .filter(|(r, _)| self.loaded.sets.get(r).is_some_and(|s| s.members.is_subset(&ids)))
                .max_by_key(|(r, n)| (*n, std::cmp::Reverse(*r)));
            if let Some((r, _)) = best {
                taken.insert(r);
                *target = Some(r);
            }
        }
        out
    }

    /// A set recovered from the pins (its policy unknown) that one of the
    /// group's endpoints names and whose entries are the group's policy
    /// already: after a restart the endpoints stay where they are, even
    /// when a set's other endpoints are not in this pass (a pod deleted
    /// while no agent ran).
    fn recovered_set_holding(&self, g: &Group<'_>) -> Option<SetRef> {
        let mut sets: Vec<SetRef> =
            g.members.iter().filter_map(|(ep, _)| self.loaded.endpoints.get(&ep.id)?.set).collect();
        sets.sort_unstable();
        sets.dedup();
        sets.retain(|r| self.loaded.sets.get(r).is_some_and(|s| s.policy.is_none()));
        if sets.is_empty() {
            return None;
        }
        let want = policy_keys(&g.policy.ingress, &g.policy.egress).ok()?;
        // The rule each entry names decides; counter slots are the writer's.
        let rules = |k: &EndpointKeys| -> Vec<((u32, PolicyKey), u32)> {
            k.policy.iter().map(|(key, v)| (*key, v.rule_cookie)).collect()
        };
        sets.into_iter().find(|r| {
            let Some(loaded) = self.loaded.sets.get(r) else { return false };
            let mut keys = want.clone();
            keys.keep_classes_of(&loaded.keys);
            keys.cidr == loaded.keys.cidr && rules(&keys) == rules(&loaded.keys)
        })
    }

    /// Makes `target` (or a new set) hold the group's policy: writes what
    /// is new and returns what is to be removed once the members point at
    /// it. On a full map the set is gone and the group fails closed.
    fn prepare_set(
        &mut self,
        group: &Group<'_>,
        target: Option<SetRef>,
        narrowed: &mut bool,
    ) -> Result<(SetRef, Removals), WriteError> {
        let name = || match group.members.as_slice() {
            [(ep, _)] => ep.name.clone(),
            [(ep, _), rest @ ..] => format!("{} and {} more with the same policy", ep.name, rest.len()),
            [] => String::new(),
        };
        let policy = group.policy;
        let set = match target {
            Some(r) => r,
            None => {
                let id = self.free_set_id().ok_or_else(|| WriteError::Invalid {
                    endpoint: name(),
                    why: "no policy set id left".into(),
                })?;
                let r = SetRef { id, generation: 0 };
                self.loaded.sets.insert(
                    r,
                    LoadedSet {
                        keys: EndpointKeys::default(),
                        policy: None,
                        policy_hash: 0,
                        members: BTreeSet::new(),
                        class_floor: class_floor(&EndpointKeys::default()),
                    },
                );
                r
            }
        };
        let Some(loaded) = self.loaded.sets.get(&set) else {
            return Err(WriteError::Invalid { endpoint: name(), why: "policy set vanished".into() });
        };
        if loaded.policy.as_deref().is_some_and(|(i, e)| *i == policy.ingress && *e == policy.egress) {
            return Ok((set, Removals::default()));
        }
        // Only for a set whose policy changes (replicas joining one that
        // holds theirs already need no entries).
        let mut keys = policy_keys_keeping(&policy.ingress, &policy.egress, &loaded.keys, loaded.class_floor)
            .map_err(|why| WriteError::Invalid { endpoint: name(), why })?;
        let floor = class_floor(&keys);
        for ((_, key), value) in keys.policy.iter_mut() {
            value.stats_slot = self.slot_for(set.id, key.direction, value.rule_cookie);
        }
        let removals = self.update_set(set, keys, narrowed).map_err(|(map, source)| {
            // The set is emptied; its members fail closed (apply_endpoint
            // with no set) and are retried next pass. It goes, its id and
            // counter slots freed, with the sets no endpoint names at the
            // end of the pass: never another policy's in this one.
            if let Some(failed) = self.loaded.sets.get_mut(&set) {
                failed.keys = EndpointKeys::default();
                failed.policy = None;
                failed.policy_hash = 0;
                for m in std::mem::take(&mut failed.members) {
                    if let Some(l) = self.loaded.endpoints.get_mut(&m) {
                        l.set = None;
                        l.applied = None;
                    }
                }
            }
            *narrowed = true;
            WriteError::Overflow { endpoint: name(), map, source }
        })?;
        if let Some(s) = self.loaded.sets.get_mut(&set) {
            s.policy = Some(Arc::new((policy.ingress.clone(), policy.egress.clone())));
            s.policy_hash = group.hash;
            for (f, new) in s.class_floor.iter_mut().zip(floor) {
                *f = (*f).max(new);
            }
        }
        Ok((set, removals))
    }

    /// The lowest set id no loaded set uses.
    fn free_set_id(&self) -> Option<u16> {
        let used: BTreeSet<u16> = self.loaded.sets.keys().map(|r| r.id).collect();
        (POLICY_SET_BASE..=u16::MAX).find(|id| !used.contains(id))
    }

    /// Moves a set's entries to `keys`: policy entries of new and changed
    /// classes and peers first, then new prefixes (their classes' entries
    /// are there). What went is returned, to be removed after the members'
    /// table entries (their isolation flags) are written: prefixes first
    /// (their addresses fall back to a broader prefix, already updated),
    /// then policy entries. Every moment allows, for each peer, what the old
    /// or the new policy allows. On a full map everything the set had and
    /// got is removed.
    fn update_set(
        &mut self,
        set: SetRef,
        keys: EndpointKeys,
        narrowed: &mut bool,
    ) -> Result<Removals, (&'static str, aya::maps::MapError)> {
        let Some(loaded) = self.loaded.sets.get(&set) else { return Ok(Removals::default()) };
        let policy_key = |prefix: u32, k: &PolicyKey| {
            Key::new(prefix, PolicyKey { policy_id: set.id, generation: set.generation, ..*k })
        };
        let cidr_key = |prefix: u32, k: &CidrKey| {
            Key::new(prefix, CidrKey { policy_id: set.id, generation: set.generation, ..*k })
        };
        let (added, removed) = map_diff(&loaded.keys.policy, &keys.policy);
        let (cidr_added, cidr_removed) = map_diff(&loaded.keys.cidr, &keys.cidr);
        // A changed value moves a flow to another rule: not less allowed.
        // A set with no members yet (new) narrows nothing.
        *narrowed |= !loaded.members.is_empty()
            && (!removed.is_empty()
                || !cidr_removed.is_empty()
                || cidr_added.iter().any(|(key, _)| carves_a_hole(&keys, key)));
        let mut written: Result<(), (&'static str, aya::maps::MapError)> = Ok(());
        for ((prefix, k), value) in &added {
            written = self.maps.policy.insert(&policy_key(*prefix, k), value, 0).map_err(|e| ("policy", e));
            if written.is_err() {
                break;
            }
        }
        if written.is_ok() {
            for ((prefix, k), class) in &cidr_added {
                written = self.maps.cidr.insert(&cidr_key(*prefix, k), class, 0).map_err(|e| ("cidr", e));
                if written.is_err() {
                    break;
                }
            }
        }
        if let Err(e) = written {
            let old = self.loaded.sets.get(&set).map(|s| s.keys.clone()).unwrap_or_default();
            // The members' table entries must not name it any more before
            // its entries go: they fail closed first (apply_endpoint).
            self.fail_members(set);
            self.remove_keys(&old, set);
            self.remove_keys(&keys, set);
            return Err(e);
        }
        if let Some(s) = self.loaded.sets.get_mut(&set) {
            s.keys = keys;
        }
        let wrote =
            !(added.is_empty() && cidr_added.is_empty() && removed.is_empty() && cidr_removed.is_empty());
        Ok(Removals { wrote, set: Some(set), policy: removed, cidr: cidr_removed })
    }

    /// Flags every member of a set as failing closed, in the kernel too.
    fn fail_members(&mut self, set: SetRef) {
        let members: Vec<u16> =
            self.loaded.sets.get(&set).map(|s| s.members.iter().copied().collect()).unwrap_or_default();
        for m in members {
            if let Some(l) = self.loaded.endpoints.get_mut(&m) {
                let failed =
                    EndpointInfo { flags: (l.info.flags & EP_REPORT_ALLOWED) | EP_POLICY_OVERFLOW, ..l.info };
                let _ = self.maps.endpoints.insert(l.ifindex, failed, 0);
                l.info = failed;
            }
        }
    }

    fn finish_set_update(&mut self, r: Removals) {
        let Some(set) = r.set else { return };
        for (prefix, k) in &r.cidr {
            let key = CidrKey { policy_id: set.id, generation: set.generation, ..*k };
            let _ = self.maps.cidr.remove(&Key::new(*prefix, key));
        }
        for (prefix, k) in &r.policy {
            let key = PolicyKey { policy_id: set.id, generation: set.generation, ..*k };
            let _ = self.maps.policy.remove(&Key::new(*prefix, key));
        }
    }

    /// Writes one endpoint's table entry naming `set` (`None`: its policy
    /// did not fit, it fails closed), its addresses, and attaches the
    /// programs; returns whether anything was written, and sets `narrowed`
    /// when it may allow less than before.
    fn apply_endpoint(
        &mut self,
        ep: &EndpointState,
        idx: u32,
        set: Option<SetRef>,
        narrowed: &mut bool,
    ) -> Result<bool, WriteError> {
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
        if set.is_none() {
            flags = (flags & EP_REPORT_ALLOWED) | EP_POLICY_OVERFLOW;
        }
        let previous = self.loaded.endpoints.get(&ep.id);
        if previous.is_none() {
            // A new pod may get a recycled id: its counters start at zero.
            self.reset_counters(ep.id);
        }
        let previous = self.loaded.endpoints.get(&ep.id);
        // Moving to another set or changing isolation may allow less; a new
        // endpoint, or one whose set changed in place (counted there), not.
        *narrowed |= previous.is_some_and(|p| p.set != set || p.info.flags != flags);
        let attached = previous.is_some_and(|p| p.attached && p.ifindex == idx);

        let addresses_changed = previous.is_none_or(|p| p.ifindex != idx || p.addresses != addresses);
        // Addresses it may send from, before the entry that checks them.
        let mut overflow = None;
        for a in &addresses {
            if previous.is_some_and(|p| p.ifindex == idx && p.addresses.contains(a)) {
                continue;
            }
            let key = EndpointAddr { ifindex: idx, family: a.0, _pad: [0; 3], addr: a.1 };
            if let Err(source) = self.maps.ep_addrs.insert(key, 1, 0) {
                overflow = Some(("endpoint-addresses", source));
                break;
            }
        }
        if overflow.is_some() {
            flags = (flags & EP_REPORT_ALLOWED) | EP_POLICY_OVERFLOW;
        }
        let mut ipv4 = [0; 4];
        let mut ipv6 = [0; 16];
        if let Some(IpAddr::V4(a)) = ep.addresses.iter().find(|a| a.is_ipv4()) {
            ipv4 = a.octets();
        }
        if let Some(IpAddr::V6(a)) = ep.addresses.iter().find(|a| a.is_ipv6()) {
            ipv6 = a.octets();
        }
        let set = set.filter(|_| overflow.is_none());
        let (policy_id, generation) = set.map_or((0, 0), |r| (r.id, r.generation));
        let info = EndpointInfo {
            endpoint_id: ep.id,
            generation,
            _pad: 0,
            flags,
            ipv4,
            ipv6,
            policy_id,
            _pad2: [0; 2],
        };
        // The switch: from here packets see the new set and flags.
        let unchanged = previous.is_some_and(|p| p.ifindex == idx && p.info == info);
        let table_full = if unchanged { None } else { self.maps.endpoints.insert(idx, info, 0).err() };

        // What the kernel's table names now: the new entry, or when it
        // could not be written, the old one on the same interface (none on
        // a new interface: the programs drop there).
        let prev_set = previous.and_then(|p| p.set);
        let same_interface = previous.filter(|p| p.ifindex == idx);
        let (named, held) = match (&table_full, same_interface) {
            (None, _) => (set, info),
            (Some(_), Some(p)) => (p.set, p.info),
            (Some(_), None) => (None, EndpointInfo { flags: EP_POLICY_OVERFLOW, ..info }),
        };
        if prev_set != named
            && let Some(s) = prev_set.and_then(|r| self.loaded.sets.get_mut(&r))
        {
            s.members.remove(&ep.id);
        }
        if let Some(s) = named.and_then(|r| self.loaded.sets.get_mut(&r)) {
            s.members.insert(ep.id);
        }
        let complete = overflow.is_none() && table_full.is_none() && set.is_some();
        let new = LoadedEndpoint {
            name: ep.name.clone(),
            ifindex: idx,
            addresses: addresses.clone(),
            info: held,
            set: named,
            attached,
            applied: complete.then(|| ep.clone()),
        };
        if let Some(prev) = self.loaded.endpoints.insert(ep.id, new) {
            if prev.ifindex != idx {
                // The pod's veth was recreated: release the old interface.
                self.release_ifindex(prev.ifindex, &prev.addresses);
            } else {
                let gone: BTreeSet<Address> = prev.addresses.difference(&addresses).copied().collect();
                self.remove_addresses(idx, &gone);
            }
        }
        if let Some(source) = table_full {
            return Err(WriteError::Overflow { endpoint: ep.name.clone(), map: "endpoints", source });
        }
        if let Some((map, source)) = overflow {
            return Err(WriteError::Overflow { endpoint: ep.name.clone(), map, source });
        }
        Ok(!unchanged || !attached || addresses_changed)
    }

    /// The entries `ep` compiles to, with the prefix classes of the set it
    /// is in (`EndpointKeys::keep_classes_of`).
    pub fn compiled_keys(&self, ep: &EndpointState) -> Result<EndpointKeys, WriteError> {
        let mut keys =
            endpoint_keys(ep).map_err(|why| WriteError::Invalid { endpoint: ep.name.clone(), why })?;
        if let Some(set) = self.endpoint_set(ep.id) {
            keys.keep_classes_of(&set.keys);
        }
        Ok(keys)
    }

    /// Someone else removed the hooks on `ifindex` (0: on any interface):
    /// the endpoints there are attached again in the next pass.
    pub fn hooks_removed(&mut self, ifindex: u32) -> usize {
        let mut n = 0;
        for e in self.loaded.endpoints.values_mut().filter(|e| ifindex == 0 || e.ifindex == ifindex) {
            n += usize::from(std::mem::replace(&mut e.attached, false));
        }
        // A node device's Service hook: attached again by the next sync.
        if ifindex == 0 {
            n += std::mem::take(&mut self.node_devices).len();
        } else if self.node_device_hook_removed(ifindex) {
            n += 1;
        }
        n
    }

    /// The set an endpoint's table entry names, as loaded.
    pub(super) fn endpoint_set(&self, id: u16) -> Option<&LoadedSet> {
        self.loaded.sets.get(&self.loaded.endpoints.get(&id)?.set?)
    }

    /// Attaches the hooks of every endpoint that has none yet, together
    /// (one rtnetlink buffer per 32 interfaces: pods that start together
    /// reach a pass together). Called once their table entries are written:
    /// policy is in place before the programs see a packet. Also where an
    /// entry could not be written: the programs then drop everything on the
    /// interface (fail closed).
    fn attach_new_endpoints(&mut self, report: &mut ApplyReport) {
        let due: Vec<(u16, u32)> = self
            .loaded
            .endpoints
            .iter()
            .filter(|(_, e)| !e.attached)
            .map(|(id, e)| (*id, e.ifindex))
            .collect();
        if due.is_empty() {
            return;
        }
        let ifindexes: Vec<u32> = due.iter().map(|(_, idx)| *idx).collect();
        for ((id, _), result) in due.iter().zip(self.attach_many(&ifindexes)) {
            let Some(loaded) = self.loaded.endpoints.get_mut(id) else { continue };
            match result {
                Ok(()) => loaded.attached = true,
                Err(source) => {
                    let e = WriteError::Attach { endpoint: loaded.name.clone(), source: Box::new(source) };
                    tracing::warn!(error = %e, "endpoint kept at its last good state");
                    report.errors.push(e.to_string());
                    report.failed.insert(loaded.name.clone());
                }
            }
        }
    }

    fn remove_endpoint(&mut self, id: u16) {
        if let Some(prev) = self.loaded.endpoints.remove(&id) {
            self.release_ifindex(prev.ifindex, &prev.addresses);
            if let Some(s) = prev.set.and_then(|r| self.loaded.sets.get_mut(&r)) {
                s.members.remove(&id);
            }
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

    /// Removes a set's entries (missing ones are fine).
    fn remove_keys(&mut self, keys: &EndpointKeys, set: SetRef) {
        let (policy_id, generation) = (set.id, set.generation);
        for &(prefix, key) in keys.policy.keys() {
            let _ = self.maps.policy.remove(&Key::new(prefix, PolicyKey { policy_id, generation, ..key }));
        }
        for &(prefix, key) in keys.cidr.keys() {
            let _ = self.maps.cidr.remove(&Key::new(prefix, CidrKey { policy_id, generation, ..key }));
        }
    }

    /// Rebuilds what is loaded from the pinned maps (a restart or upgrade):
    /// the sets the endpoints name are kept, everything else (other
    /// generations, sets no endpoint names, interfaces that vanished while
    /// no agent ran) is removed, and the programs inside the pinned links
    /// are replaced by this agent's.
    pub(super) fn recover(&mut self) {
        let endpoints: Vec<(u32, EndpointInfo)> = self.maps.endpoints.iter().filter_map(Result::ok).collect();
        let mut live: BTreeMap<u16, LoadedEndpoint> = BTreeMap::new();
        let mut sets: BTreeMap<SetRef, LoadedSet> = BTreeMap::new();
        for (idx, info) in endpoints {
            if ifname(idx).is_none() || live.contains_key(&info.endpoint_id) {
                let _ = self.maps.endpoints.remove(&idx);
                continue;
            }
            let set = (info.flags & EP_POLICY_OVERFLOW == 0)
                .then_some(SetRef { id: info.policy_id(), generation: info.generation });
            if let Some(r) = set {
                sets.entry(r)
                    .or_insert_with(|| LoadedSet {
                        keys: EndpointKeys::default(),
                        policy: None,
                        policy_hash: 0,
                        members: BTreeSet::new(),
                        class_floor: class_floor(&EndpointKeys::default()),
                    })
                    .members
                    .insert(info.endpoint_id);
            }
            let loaded = LoadedEndpoint {
                name: String::new(),
                ifindex: idx,
                addresses: BTreeSet::new(),
                info,
                set,
                attached: false,
                applied: None,
            };
            live.insert(info.endpoint_id, loaded);
        }

        let policy: Vec<Key<PolicyKey>> = self.maps.policy.keys().filter_map(Result::ok).collect();
        for key in policy {
            let data = key.data();
            let set = SetRef { id: data.policy_id, generation: data.generation };
            match (self.maps.policy.get(&key, 0), sets.get_mut(&set)) {
                (Ok(value), Some(s)) => {
                    if value.stats_slot != 0 {
                        let slot = (set.id, data.direction, value.rule_cookie);
                        self.loaded.slots.insert(slot, value.stats_slot);
                        self.loaded.next_slot = self.loaded.next_slot.max(value.stats_slot + 1);
                    }
                    let bare = PolicyKey { policy_id: 0, generation: 0, ..data };
                    s.keys.policy.insert((key.prefix_len(), bare), value);
                }
                _ => {
                    let _ = self.maps.policy.remove(&key);
                }
            }
        }
        let cidr: Vec<Key<CidrKey>> = self.maps.cidr.keys().filter_map(Result::ok).collect();
        for key in cidr {
            let data = key.data();
            let set = SetRef { id: data.policy_id, generation: data.generation };
            match (self.maps.cidr.get(&key, 0), sets.get_mut(&set)) {
                (Ok(class), Some(s)) => {
                    let bare = CidrKey { policy_id: 0, generation: 0, ..data };
                    s.keys.cidr.insert((key.prefix_len(), bare), class);
                }
                _ => {
                    let _ = self.maps.cidr.remove(&key);
                }
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
        // Every class the kernel holds, stale entries' too.
        for set in sets.values_mut() {
            set.class_floor = class_floor(&set.keys);
        }
        self.loaded.sets = sets;
        let due: Vec<(u16, u32)> = self.loaded.endpoints.iter().map(|(id, l)| (*id, l.ifindex)).collect();
        let ifindexes: Vec<u32> = due.iter().map(|(_, idx)| *idx).collect();
        for ((id, idx), result) in due.iter().zip(self.attach_many(&ifindexes)) {
            match result {
                Ok(()) => {
                    if let Some(l) = self.loaded.endpoints.get_mut(id) {
                        l.attached = true;
                    }
                }
                Err(e) => tracing::warn!(ifindex = idx, error = %e, "re-attaching a recovered endpoint"),
            }
        }
        if !self.loaded.endpoints.is_empty() {
            tracing::info!(
                endpoints = self.loaded.endpoints.len(),
                policy_sets = self.loaded.sets.len(),
                "recovered enforced state from pinned maps"
            );
        }
    }
}

/// What `new` has that `old` has not, or has with another value; and the
/// keys only `old` has. One walk over both (they are sorted alike), where
/// a lookup per entry would walk each tree thousands of times.
fn map_diff<K: Ord + Copy, V: PartialEq + Copy>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
) -> (Vec<(K, V)>, Vec<K>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (Some((ok, _)), Some((nk, nv))) => match ok.cmp(nk) {
                std::cmp::Ordering::Less => {
                    removed.push(**ok);
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    added.push((**nk, **nv));
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if o.next().map(|(_, v)| v) != Some(*nv) {
                        added.push((**nk, **nv));
                    }
                    n.next();
                }
            },
            (Some((ok, _)), None) => {
                removed.push(**ok);
                o.next();
            }
            (None, Some((nk, nv))) => {
                added.push((**nk, **nv));
                n.next();
            }
            (None, None) => return (added, removed),
        }
    }
}

fn service_key(s: &ServiceFrontend) -> ServiceKey {
    let (family, addr) = family_and_addr(s.ip);
    debug_assert!(family == AF_INET || family == AF_INET6);
    ServiceKey { family, protocol: s.protocol.number(), port: s.port, addr }
}

/// Whether `ipcache` is sorted by prefixes that are distinct and have no
/// bits past their length (so each is one key of the map, its own).
fn distinct_sorted(ipcache: &[IpcacheEntry]) -> bool {
    ipcache.windows(2).all(|w| w[0].cidr < w[1].cidr) && ipcache.iter().all(|e| e.cidr == e.cidr.trunc())
}

/// What changed from `last` to `now` (both `distinct_sorted`): the entries
/// new or with another identity, and the prefixes gone.
fn ipcache_delta<'a>(last: &[IpcacheEntry], now: &'a [IpcacheEntry]) -> (Vec<&'a IpcacheEntry>, Vec<IpNet>) {
    let (mut writes, mut gone) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (last.iter().peekable(), now.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (Some(o), Some(n)) if o.cidr == n.cidr => {
                if o.identity != n.identity {
                    writes.push(*n);
                }
                old.next();
                new.next();
            }
            (Some(o), Some(n)) if o.cidr < n.cidr => {
                gone.push(o.cidr);
                old.next();
            }
            (Some(o), None) => {
                gone.push(o.cidr);
                old.next();
            }
            (_, Some(n)) => {
                writes.push(*n);
                new.next();
            }
            (None, None) => return (writes, gone),
        }
    }
}

fn ipcache_key(cidr: &IpNet) -> (u32, IpKey) {
    let cidr = cidr.trunc();
    let (family, addr) = family_and_addr(cidr.addr());
    (IpKey::HEADER_BITS + u32::from(cidr.prefix_len()), IpKey { family, _pad: [0; 3], addr })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn list(entries: &BTreeMap<u8, u32>) -> Vec<IpcacheEntry> {
        let mut v: Vec<IpcacheEntry> = entries
            .iter()
            .map(|(n, id)| IpcacheEntry {
                cidr: IpNet::from(IpAddr::from([10, 0, 0, *n])),
                identity: *id,
                name: None,
            })
            .collect();
        v.sort();
        v
    }

    proptest! {
        /// The old map with the diff's writes and removals applied is the
        /// new map, and nothing it already held is written again.
        #[test]
        fn a_map_diff_turns_the_old_map_into_the_new(
            old in proptest::collection::btree_map(0u8..40, 0u8..3, 0..30),
            new in proptest::collection::btree_map(0u8..40, 0u8..3, 0..30),
        ) {
            let (added, removed) = map_diff(&old, &new);
            let mut turned = old.clone();
            for k in &removed {
                prop_assert!(!new.contains_key(k));
                turned.remove(k);
            }
            for (k, v) in &added {
                prop_assert!(old.get(k) != Some(v), "only what differs is written");
                turned.insert(*k, *v);
            }
            prop_assert_eq!(turned, new);
        }

        /// The last list with the delta's writes and removals applied is
        /// the new list.
        #[test]
        fn an_ipcache_delta_turns_the_last_list_into_the_new(
            last in proptest::collection::btree_map(any::<u8>(), 3u32..6, 0..40),
            now in proptest::collection::btree_map(any::<u8>(), 3u32..6, 0..40),
        ) {
            let (last, now) = (list(&last), list(&now));
            prop_assert!(distinct_sorted(&last) && distinct_sorted(&now));
            let (writes, gone) = ipcache_delta(&last, &now);
            let mut map: BTreeMap<IpNet, u32> = last.iter().map(|e| (e.cidr, e.identity)).collect();
            for e in &writes {
                prop_assert!(map.insert(e.cidr, e.identity) != Some(e.identity), "{:?} written unchanged", e);
            }
            for cidr in &gone {
                prop_assert!(map.remove(cidr).is_some());
            }
            let want: BTreeMap<IpNet, u32> = now.iter().map(|e| (e.cidr, e.identity)).collect();
            prop_assert_eq!(map, want);
        }
    }
}
