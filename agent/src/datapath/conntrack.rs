//! The agent's side of conntrack: revoking and sweeping.
//!
//! Revoking: after a policy change, every conntrack entry of an isolated
//! direction is judged again by the loaded entries, as the programs would
//! judge a new flow; entries the policy no longer allows are deleted, so the
//! flow's next packet meets the policy and is dropped. Entries of endpoints
//! that are gone go too.
//!
//! Sweeping: the programs ignore an expired entry; the sweep deletes it, so
//! the table holds live flows and the LRU evicts only those under pressure.

use std::{collections::HashMap, os::fd::BorrowedFd};

use portcullis_common::{
    AF_INET, CtKey, CtValue, DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EP_POLICY_OVERFLOW, IpKey,
    ct_flags, identity,
};

/// What decides whether a tracked flow is still allowed: its endpoint and
/// direction, and the peer and port its first packet was judged on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Question {
    endpoint: u16,
    direction: u8,
    service: bool,
    family: u8,
    protocol: u8,
    remote: [u8; 16],
    port: u16,
}

impl Question {
    fn of(entry: &CtEntry) -> Question {
        let (k, v) = (&entry.key, &entry.value);
        let service = v.flags & ct_flags::SERVICE != 0;
        let (remote, port) = match (v.origin == DIR_INGRESS, service) {
            (true, _) => (k.remote_addr, k.local_port),
            (false, true) => (v.nat_addr, v.nat_port),
            (false, false) => (k.remote_addr, k.remote_port),
        };
        Question {
            endpoint: k.endpoint_id,
            direction: v.origin,
            service,
            family: k.family,
            protocol: k.protocol,
            remote,
            port,
        }
    }
}

/// A conntrack entry as the map holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    pub key: CtKey,
    pub value: CtValue,
}

/// What a conntrack sweep found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Expired entries removed.
    pub removed: usize,
    /// Entries left.
    pub live: usize,
    /// The table's size; when `live` nears it, the LRU evicts live flows
    /// (whose next packets then meet the policy again).
    pub capacity: usize,
}

impl Sweep {
    pub fn nearly_full(&self) -> bool {
        self.capacity > 0 && self.live * 10 >= self.capacity * 9
    }
}

/// The bytes of a map key (plain data).
fn bytes_of<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain data, readable as bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The bytes of a map key or value to be written by the kernel.
fn bytes_of_mut<T: aya::Pod>(value: &mut T) -> &mut [u8] {
    // SAFETY: `Pod` types are plain data: any bytes are a valid value.
    unsafe { std::slice::from_raw_parts_mut((value as *mut T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// The clock of `bpf_ktime_get_ns`: CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

use super::{
    Datapath,
    keys::{Probe, ip_from, lookup, prefix_eq},
};

/// What judging tracked flows needs beyond the loaded state itself: the
/// host entries of the ipcache by address and its prefixes longest first (a
/// peer's identity is then a hash lookup, or a short scan). Endpoints and
/// their sets are read from the loaded state as it is now: a walk judges by
/// the policy in the maps, never by an older one.
struct Revocation<'a> {
    loaded: &'a super::writer::Loaded,
    hosts: HashMap<(u8, [u8; 16]), u32>,
    prefixes: Vec<(&'a (u32, IpKey), u32)>,
}

impl Datapath {
    /// Deletes the conntrack entries the loaded policy no longer allows;
    /// returns how many.
    pub fn revoke_flows(&self) -> usize {
        let host = |prefix: u32, key: &IpKey| {
            let len = prefix.saturating_sub(IpKey::HEADER_BITS);
            len == if key.family == AF_INET { 32 } else { 128 }
        };
        let (hosts, mut prefixes): (Vec<_>, Vec<_>) = self
            .loaded
            .ipcache
            .iter()
            .map(|(k, id)| (k, *id))
            .partition(|((prefix, key), _)| host(*prefix, key));
        let hosts = hosts.into_iter().map(|((_, key), id)| ((key.family, key.addr), id)).collect();
        prefixes.sort_by_key(|e| std::cmp::Reverse(e.0.0));
        let r = Revocation { loaded: &self.loaded, hosts, prefixes };
        let mut answers: HashMap<Question, bool> = HashMap::new();
        // A full table holds hundreds of thousands of flows but far fewer
        // distinct questions (endpoint, direction, peer, protocol, port):
        // each is answered once per walk.
        self.walk(|entry| {
            let question = Question::of(entry);
            !*answers.entry(question).or_insert_with(|| r.flow_allowed(entry))
        })
    }
}

impl Revocation<'_> {
    /// The identity the programs would give `ip` (longest ipcache prefix).
    fn identity_of(&self, family: u8, raw: &[u8; 16]) -> u32 {
        if let Some(id) = self.hosts.get(&(family, *raw)) {
            return *id;
        }
        let bits = if family == AF_INET { 32 } else { 128 };
        self.prefixes
            .iter()
            .find(|((prefix, key), _)| {
                let len = prefix.saturating_sub(IpKey::HEADER_BITS);
                key.family == family && len <= bits && prefix_eq(&key.addr, raw, len)
            })
            .map_or(identity::WORLD, |(_, id)| *id)
    }

    fn flow_allowed(&self, entry: &CtEntry) -> bool {
        let key = &entry.key;
        let Some(ep) = self.loaded.endpoints.get(&key.endpoint_id) else { return false };
        let flags = ep.info.flags;
        if flags & EP_POLICY_OVERFLOW != 0 {
            return false;
        }
        let direction = entry.value.origin;
        let isolated = if direction == DIR_INGRESS {
            flags & EP_ISOLATED_INGRESS != 0
        } else {
            flags & EP_ISOLATED_EGRESS != 0
        };
        if !isolated {
            return true;
        }
        // Judged as its first packet was: an ingress flow on the endpoint's
        // port, an egress flow on the peer's; a Service connection on the
        // backend it was allowed for.
        let service = entry.value.flags & ct_flags::SERVICE != 0;
        let (remote, port) = match (direction == DIR_INGRESS, service) {
            (true, _) => (&key.remote_addr, key.local_port),
            (false, true) => (&entry.value.nat_addr, entry.value.nat_port),
            (false, false) => (&key.remote_addr, key.remote_port),
        };
        let remote_identity = self.identity_of(key.family, remote);
        if direction == DIR_INGRESS && remote_identity == identity::HOST {
            return true;
        }
        let probe = Probe {
            direction,
            remote_identity,
            remote_ip: match ip_from(key.family, remote) {
                Some(ip) => ip,
                None => return false,
            },
            protocol: key.protocol,
            port,
        };
        let Some(set) = ep.set.and_then(|r| self.loaded.sets.get(&r)) else { return false };
        lookup(&set.keys, probe).is_some()
    }
}

impl Datapath {
    /// Deletes the entries that expired before `now_ns` (monotonic).
    pub fn sweep_conntrack(&mut self, now_ns: u64) -> Sweep {
        let mut total: usize = 0;
        let removed = self.walk(|entry| {
            total += 1;
            entry.value.expires_ns <= now_ns
        });
        Sweep { removed, live: total.saturating_sub(removed), capacity: self.sizes.conntrack as usize }
    }

    /// Every conntrack entry (a snapshot; the programs keep writing).
    pub fn conntrack_entries(&self) -> Vec<CtEntry> {
        let mut out = Vec::new();
        self.walk(|entry| {
            out.push(*entry);
            false
        });
        out
    }

    /// Writes one entry as the programs would (tools and tests: ageing a
    /// flow, restoring one).
    pub fn conntrack_set(&mut self, entry: &CtEntry) -> Result<(), aya::maps::MapError> {
        self.maps.conntrack.insert(entry.key, entry.value, 0)
    }
}

impl Datapath {
    fn walk(&self, doomed: impl FnMut(&CtEntry) -> bool) -> usize {
        use aya::maps::IterableMap as _;
        use std::os::fd::AsFd as _;
        walk(self.maps.conntrack.map().fd().as_fd(), doomed)
    }
}

/// Calls `doomed` with every entry of the conntrack map `fd` and deletes
/// those it says so of; returns how many it deleted. A few thousand entries
/// are read (and deleted) per call, and the whole table is never held at
/// once.
fn walk(fd: BorrowedFd<'_>, mut doomed: impl FnMut(&CtEntry) -> bool) -> usize {
    let (mut read, mut deleted) = (false, 0);
    let mut doomed_keys: Vec<CtKey> = Vec::new();
    let batched = super::raw_map::for_each_batch::<CtKey, CtValue>(fd, 4096, |keys, values| {
        read = true;
        doomed_keys.clear();
        for (key, value) in keys.iter().zip(values) {
            if doomed(&CtEntry { key: *key, value: *value }) {
                doomed_keys.push(*key);
            }
        }
        deleted += super::raw_map::delete_batch(fd, &doomed_keys).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "batched conntrack delete; deleting key by key");
            doomed_keys.iter().filter(|k| super::raw_map::delete(fd, bytes_of(*k)).unwrap_or(false)).count()
        });
    });
    let Err(e) = batched else { return deleted };
    if read {
        tracing::warn!(error = %e, "reading conntrack stopped part of the way");
        return deleted;
    }
    // Kernels without batched hash map reads (before 5.6): key by key, and
    // the doomed deleted after the walk (the next key after a deleted one
    // would start the walk over).
    tracing::debug!(error = %e, "batched conntrack read; reading key by key");
    let mut key: Option<CtKey> = None;
    let mut next = CtKey::default();
    let mut value = CtValue::default();
    while let Ok(true) = super::raw_map::next_key(fd, key.as_ref().map(bytes_of), bytes_of_mut(&mut next)) {
        if super::raw_map::lookup(fd, bytes_of(&next), bytes_of_mut(&mut value)).unwrap_or(false)
            && doomed(&CtEntry { key: next, value })
        {
            doomed_keys.push(next);
        }
        key = Some(next);
    }
    deleted + doomed_keys.iter().filter(|k| super::raw_map::delete(fd, bytes_of(*k)).unwrap_or(false)).count()
}
