//! Compiled endpoint state as BPF map entries (pure: no kernel), and a
//! userspace model of the programs' lookups over them. The writer loads these
//! entries; the policy tests look verdicts up in them exactly as the programs
//! do, so compiler and key layout are checked together against the oracle.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use portcullis_common::{
    AF_INET, AF_INET6, CidrKey, DIR_EGRESS, DIR_INGRESS, PolicyKey, PolicyValue, identity::CLASS_BASE,
};

use crate::compiled::{AllowEntry, DirectionPolicy, EndpointState, PortPrefixes as _};

/// Policy trie entries of one policy set, keyed `(prefix length, key)` with
/// set id and generation 0 (the writer sets both when it writes them).
pub type PolicyEntries = BTreeMap<(u32, PolicyKey), PolicyValue>;
/// CIDR trie entries of one policy set: `(prefix length, key) -> class`.
pub type CidrEntries = BTreeMap<(u32, CidrKey), u32>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointKeys {
    pub policy: PolicyEntries,
    pub cidr: CidrEntries,
}

impl EndpointKeys {
    /// Gives each prefix the class it has in `previous` (a fresh one, above
    /// all of `previous`' classes, when it is new), so that a prefix coming
    /// or going leaves the other prefixes' entries as they are and the
    /// writer can update the live generation in place. Classes are only
    /// names: any numbering that is unique per direction means the same.
    pub fn keep_classes_of(&mut self, previous: &EndpointKeys) {
        let old = &previous.cidr;
        let mut next: BTreeMap<u8, u32> = BTreeMap::new();
        for ((_, key), class) in &previous.cidr {
            let n = next.entry(key.direction).or_insert(CLASS_BASE);
            *n = (*n).max(class.saturating_add(1));
        }
        let mut rename: BTreeMap<(u8, u32), u32> = BTreeMap::new();
        for (key, class) in self.cidr.iter_mut() {
            let to = match old.get(key) {
                Some(kept) => *kept,
                None => {
                    let n = next.entry(key.1.direction).or_insert(CLASS_BASE);
                    let fresh = *n;
                    *n = n.saturating_add(1);
                    fresh
                }
            };
            rename.insert((key.1.direction, *class), to);
            *class = to;
        }
        if rename.iter().all(|((_, from), to)| from == to) {
            return;
        }
        self.policy = std::mem::take(&mut self.policy)
            .into_iter()
            .map(|((bits, mut key), value)| {
                if key.identity >= CLASS_BASE
                    && let Some(to) = rename.get(&(key.direction, key.identity))
                {
                    key.identity = *to;
                }
                ((bits, key), value)
            })
            .collect();
    }

    pub fn len(&self) -> usize {
        self.policy.len() + self.cidr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policy.is_empty() && self.cidr.is_empty()
    }
}

/// The entries an endpoint's policy compiles to; they depend on its policy
/// alone, so endpoints with the same policy share them.
pub fn endpoint_keys(ep: &EndpointState) -> Result<EndpointKeys, String> {
    policy_keys(&ep.ingress, &ep.egress)
}

pub fn policy_keys(ingress: &DirectionPolicy, egress: &DirectionPolicy) -> Result<EndpointKeys, String> {
    policy_keys_keeping(ingress, egress, &EndpointKeys::default(), [CLASS_BASE; 2])
}

/// Per direction, the lowest class above every class `keys` uses (in its
/// prefixes or its entries' peers).
pub fn class_floor(keys: &EndpointKeys) -> [u32; 2] {
    let mut floor = [CLASS_BASE; 2];
    let mut see = |direction: u8, class: u32| {
        let f = &mut floor[usize::from(direction & 1)];
        *f = (*f).max(class.saturating_add(1));
    };
    for ((_, key), class) in &keys.cidr {
        see(key.direction, *class);
    }
    for (_, key) in keys.policy.keys().filter(|(_, k)| k.identity >= CLASS_BASE) {
        see(key.direction, key.identity);
    }
    floor
}

/// `policy_keys`, with each prefix given the class it has in `previous`
/// (as `EndpointKeys::keep_classes_of` would), at once: a set rewritten as
/// addresses come and go does not build its entries twice. New prefixes
/// get classes at or above `floor` (per direction) and above every class
/// of `previous`: a class whose entries may linger is not handed out again.
pub fn policy_keys_keeping(
    ingress: &DirectionPolicy,
    egress: &DirectionPolicy,
    previous: &EndpointKeys,
    floor: [u32; 2],
) -> Result<EndpointKeys, String> {
    let mut out = EndpointKeys::default();
    let above = class_floor(previous);
    for (direction, policy) in [(DIR_INGRESS, ingress), (DIR_EGRESS, egress)] {
        let d = usize::from(direction & 1);
        add_direction(&mut out, direction, policy, previous, floor[d].max(above[d]))?;
    }
    Ok(out)
}

fn add_direction(
    out: &mut EndpointKeys,
    direction: u8,
    policy: &DirectionPolicy,
    previous: &EndpointKeys,
    mut next: u32,
) -> Result<(), String> {
    for entry in &policy.allow {
        add_allow(&mut out.policy, direction, entry.peer, entry)?;
    }
    if policy.prefixes.len() >= (u32::MAX - CLASS_BASE) as usize {
        return Err("too many prefixes".into());
    }
    for prefix in &policy.prefixes {
        let key = cidr_key(direction, &prefix.cidr);
        let class = match previous.cidr.get(&key) {
            Some(kept) => *kept,
            None => {
                let fresh = next;
                // Never two prefixes on one class: fail (closed) instead.
                next = next.checked_add(1).ok_or("the policy set has used up its prefix classes")?;
                fresh
            }
        };
        out.cidr.insert(key, class);
        for entry in &prefix.allow {
            add_allow(&mut out.policy, direction, class, entry)?;
        }
    }
    Ok(())
}

fn add_allow(out: &mut PolicyEntries, direction: u8, peer: u32, entry: &AllowEntry) -> Result<(), String> {
    let base = PolicyKey { policy_id: 0, generation: 0, direction, identity: peer, ..Default::default() };
    // The writer gives each rule its counter slot.
    let value = PolicyValue { rule_cookie: entry.rule, stats_slot: 0 };
    let mut put = |prefix: u32, key: PolicyKey| {
        out.entry((prefix, key)).or_insert(value);
    };
    match (entry.protocol, entry.ports) {
        (None, None) => put(PolicyKey::PREFIX_ANY_PROTO, base),
        (None, Some(_)) => return Err(format!("allow entry for peer {peer} has ports but no protocol")),
        (Some(p), None) => put(PolicyKey::PREFIX_ANY_PORT, PolicyKey { protocol: p.number(), ..base }),
        (Some(p), Some(range)) => {
            if range.end < range.start {
                return Err(format!("port range {}-{} is empty", range.start, range.end));
            }
            for pp in range.prefixes() {
                let key = PolicyKey { protocol: p.number(), port: pp.port.to_be_bytes(), ..base };
                put(PolicyKey::port_prefix(pp.bits), key);
            }
        }
    }
    Ok(())
}

/// An address as the maps hold it: `(family, bytes)`, IPv4 in the first four.
pub fn family_and_addr(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            (AF_INET, addr)
        }
        IpAddr::V6(a) => (AF_INET6, a.octets()),
    }
}

/// The address a map's `(family, bytes)` holds.
pub fn ip_from(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(std::net::Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Some(IpAddr::V6(std::net::Ipv6Addr::from(*raw))),
        _ => None,
    }
}

pub fn cidr_key(direction: u8, cidr: &IpNet) -> (u32, CidrKey) {
    let (family, addr) = family_and_addr(cidr.trunc().addr());
    let key = CidrKey { policy_id: 0, generation: 0, direction, family, _pad: [0; 3], addr };
    (CidrKey::HEADER_BITS + u32::from(cidr.prefix_len()), key)
}

fn policy_bytes(k: &PolicyKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..2].copy_from_slice(&k.policy_id.to_ne_bytes());
    b[2] = k.generation;
    b[3] = k.direction;
    b[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    b[8] = k.protocol;
    b[9..11].copy_from_slice(&k.port);
    b
}

fn cidr_bytes(k: &CidrKey) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..2].copy_from_slice(&k.policy_id.to_ne_bytes());
    b[2] = k.generation;
    b[3] = k.direction;
    b[4] = k.family;
    b[8..].copy_from_slice(&k.addr);
    b
}

/// Do the first `bits` bits of `a` and `b` agree?
pub(super) fn prefix_eq(a: &[u8], b: &[u8], bits: u32) -> bool {
    let full = (bits / 8) as usize;
    if a[..full] != b[..full] {
        return false;
    }
    let rest = bits % 8;
    rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0
}

/// The kernel's LPM semantics: the longest stored prefix (up to `query_bits`)
/// that matches.
fn lpm<'a, K, V, const N: usize>(
    map: &'a BTreeMap<(u32, K), V>,
    key: &K,
    query_bits: u32,
    bytes: fn(&K) -> [u8; N],
) -> Option<&'a V> {
    let want = bytes(key);
    map.iter()
        .filter(|((bits, k), _)| *bits <= query_bits && prefix_eq(&bytes(k), &want, *bits))
        .max_by_key(|((bits, _), _)| *bits)
        .map(|(_, v)| v)
}

/// A packet as the programs see it for the verdict.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub direction: u8,
    pub remote_identity: u32,
    pub remote_ip: IpAddr,
    pub protocol: u8,
    pub port: u16,
}

/// What the programs decide for a new flow of an isolated endpoint whose
/// policy set holds `keys`: the rule cookie that allows it, or `None`
/// (drop). Mirrors `ebpf/src/main.rs`.
pub fn lookup(keys: &EndpointKeys, probe: Probe) -> Option<u32> {
    let key = |identity: u32| PolicyKey {
        policy_id: 0,
        generation: 0,
        direction: probe.direction,
        identity,
        protocol: probe.protocol,
        port: probe.port.to_be_bytes(),
        _pad: 0,
    };
    let find = |identity: u32| lpm(&keys.policy, &key(identity), PolicyKey::PREFIX_FULL, policy_bytes);
    if let Some(v) = find(probe.remote_identity).or_else(|| find(0)) {
        return Some(v.rule_cookie);
    }
    let (bits, ck) = cidr_key(probe.direction, &IpNet::from(probe.remote_ip));
    let class = lpm(&keys.cidr, &ck, bits, cidr_bytes)?;
    find(*class).map(|v| v.rule_cookie)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compiled::{PortRange, PrefixEntry, Protocol};

    fn endpoint(prefixes: &[&str]) -> EndpointState {
        let allow = |port| AllowEntry {
            peer: 0,
            protocol: Some(Protocol::Tcp),
            ports: Some(PortRange { start: port, end: port }),
            rule: 1,
        };
        EndpointState {
            id: 1,
            name: "default/a".into(),
            interface: "lo".into(),
            identity: 9,
            addresses: vec![],
            ingress: DirectionPolicy::default().into(),
            egress: DirectionPolicy {
                isolated: true,
                allow: vec![],
                prefixes: prefixes
                    .iter()
                    .enumerate()
                    .map(|(n, c)| PrefixEntry {
                        cidr: c.parse().expect("cidr"),
                        allow: vec![allow(80 + n as u16)],
                    })
                    .collect(),
            }
            .into(),
        }
    }

    /// prefix -> the ports its class allows.
    fn by_prefix(k: &EndpointKeys) -> BTreeMap<String, Vec<u16>> {
        k.cidr
            .iter()
            .map(|((bits, key), class)| {
                let ip = ip_from(key.family, &key.addr).expect("address");
                let ports = k
                    .policy
                    .keys()
                    .filter(|(_, p)| p.identity == *class)
                    .map(|(_, p)| u16::from_be_bytes(p.port))
                    .collect();
                (format!("{ip}/{}", bits - CidrKey::HEADER_BITS), ports)
            })
            .collect()
    }

    #[test]
    fn a_new_prefix_leaves_the_classes_of_the_others_alone() {
        let before = endpoint_keys(&endpoint(&["10.0.0.0/8", "10.2.0.0/16"])).expect("keys");
        let plain = endpoint_keys(&endpoint(&["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"])).expect("keys");
        let mut kept = plain.clone();
        kept.keep_classes_of(&before);
        // The same meaning under other names.
        assert_eq!(by_prefix(&kept), by_prefix(&plain));
        // 10.2/16 was the second prefix and is now the third: it keeps
        // its class all the same, and the new one gets a fresh class.
        let class_of = |k: &EndpointKeys, p: &str| {
            k.cidr
                .iter()
                .find(|((_, key), _)| ip_from(key.family, &key.addr) == Some(p.parse().expect("ip")))
                .map(|(_, c)| *c)
        };
        assert_eq!(class_of(&kept, "10.2.0.0"), class_of(&before, "10.2.0.0"));
        assert_eq!(class_of(&kept, "10.0.0.0"), class_of(&before, "10.0.0.0"));
        assert_eq!(class_of(&kept, "10.1.0.0"), Some(CLASS_BASE + 2));
        // Only the new prefix and its entry differ from before.
        let new_cidr = kept.cidr.iter().filter(|(k, c)| before.cidr.get(k) != Some(c)).count();
        let new_policy = kept.policy.keys().filter(|k| !before.policy.contains_key(k)).count();
        let gone = before.policy.keys().filter(|k| !kept.policy.contains_key(k)).count();
        assert_eq!(
            (new_cidr, new_policy, gone),
            (1, 2, 1),
            "the port entries of 10.2/16 moved from 81 to 82"
        );
        // Built with the classes kept from the start: the very same entries.
        let after = endpoint(&["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"]);
        let at_once =
            policy_keys_keeping(&after.ingress, &after.egress, &before, [CLASS_BASE; 2]).expect("keys");
        assert_eq!(at_once, kept);
        // A prefix gone, one new: the new one's class is above every class
        // before, not the freed one.
        let other = endpoint(&["10.2.0.0/16", "10.3.0.0/16"]);
        let moved = policy_keys_keeping(&other.ingress, &other.egress, &kept, [CLASS_BASE; 2]).expect("keys");
        assert_eq!(class_of(&moved, "10.2.0.0"), class_of(&before, "10.2.0.0"));
        assert_eq!(class_of(&moved, "10.3.0.0"), Some(CLASS_BASE + 3));
        // Above a floor (classes that left the set, whose entries the
        // kernel may still hold), never below it.
        let floored = policy_keys_keeping(&other.ingress, &other.egress, &kept, [CLASS_BASE, CLASS_BASE + 9])
            .expect("keys");
        assert_eq!(class_of(&floored, "10.3.0.0"), Some(CLASS_BASE + 9));
        assert_eq!(class_floor(&floored)[1], CLASS_BASE + 10);
        assert_eq!(class_floor(&floored)[0], CLASS_BASE, "no ingress prefix");
        assert_eq!(
            by_prefix(&moved),
            by_prefix(&endpoint_keys(&endpoint(&["10.2.0.0/16", "10.3.0.0/16"])).expect("keys"))
        );
    }
}
