//! Pinned maps from an earlier agent are reused only when they have the
//! layout and size this agent's programs expect. Any other is unpinned, so
//! the loader creates it afresh; what it held is carried over into the new
//! map when the layouts allow it (same key, a value that only grew by
//! appended fields, whose zero means "absent": the rule `common` keeps),
//! so an upgrade that changes a layout or a size keeps its conntrack and
//! its policy until the new agent writes its own. Programs of the earlier
//! agent keep their own maps until their links get this agent's programs.

use std::{mem::size_of, path::Path};

use aya::maps::MapInfo;
use portcullis_common::{
    COUNTED_ENDPOINTS, COUNTER_SLOTS, CidrKey, Counter, CtKey, CtValue, EndpointAddr, EndpointInfo, FragKey,
    FragValue, IpKey, PendingKey, PendingValue, PolicyKey, PolicyValue, ServiceKey, map_names, map_sizes,
};

use super::{MapSizes, raw_map as raw};

/// `(name, key size, value size, max entries)` of every pinned map.
fn expected(sizes: &MapSizes) -> [(&'static str, usize, usize, u32); 12] {
    // LPM trie keys carry a 32-bit prefix length in front of the data.
    const LPM: usize = size_of::<u32>();
    [
        (map_names::ENDPOINTS, size_of::<u32>(), size_of::<EndpointInfo>(), sizes.endpoints),
        (map_names::IPCACHE, LPM + size_of::<IpKey>(), size_of::<u32>(), sizes.ipcache),
        (map_names::POLICY, LPM + size_of::<PolicyKey>(), size_of::<PolicyValue>(), sizes.policy),
        (map_names::FLOWS, 0, 0, sizes.flows_bytes),
        (map_names::CT, size_of::<CtKey>(), size_of::<CtValue>(), sizes.conntrack),
        (map_names::CIDR, LPM + size_of::<CidrKey>(), size_of::<u32>(), sizes.cidr),
        (map_names::EP_ADDRS, size_of::<EndpointAddr>(), size_of::<u8>(), sizes.endpoint_addresses),
        (map_names::SERVICES, size_of::<ServiceKey>(), size_of::<u32>(), sizes.services),
        (map_names::SVC_PENDING, size_of::<PendingKey>(), size_of::<PendingValue>(), sizes.service_pending),
        (map_names::COUNTERS, size_of::<u32>(), size_of::<Counter>(), COUNTED_ENDPOINTS * COUNTER_SLOTS),
        (map_names::FRAGS, size_of::<FragKey>(), size_of::<FragValue>(), map_sizes::FRAGS),
        (map_names::RULE_STATS, size_of::<u32>(), size_of::<Counter>(), map_sizes::RULE_STATS),
    ]
}

/// Maps whose entries are not carried over: the flow ring (no entries)
/// and the per-CPU counters (their values are per CPU; counts restart).
const NOT_CARRIED: [&str; 3] = [map_names::FLOWS, map_names::COUNTERS, map_names::RULE_STATS];

/// The entries of a replaced map, to be written into its successor.
pub(super) struct Carried {
    name: &'static str,
    value_size: usize,
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Unpins every map under `pin_dir` whose layout or size differs from what
/// this agent loads; returns the entries of those that can be carried over
/// (`carry_over` writes them once the loader has made the new maps).
pub(super) fn drop_incompatible(pin_dir: &Path, sizes: &MapSizes) -> Vec<Carried> {
    let mut carried = Vec::new();
    for (name, key, value, entries) in expected(sizes) {
        let path = pin_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else { continue };
        let found = (info.key_size() as usize, info.value_size() as usize, info.max_entries());
        if found == (key, value, entries) {
            continue;
        }
        let can_carry = !NOT_CARRIED.contains(&name) && found.0 == key && found.1 <= value;
        let read = if can_carry { read_entries(&path, found.0, found.1, found.2) } else { Ok(Vec::new()) };
        tracing::warn!(
            map = name,
            found = ?found,
            want = ?(key, value, entries),
            carried = read.as_ref().map_or(0, Vec::len),
            "pinned map has another layout or size; replacing it{}",
            if can_carry { " and carrying its entries over" } else { "" }
        );
        match read {
            Ok(list) if !list.is_empty() => carried.push(Carried { name, value_size: value, entries: list }),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(map = name, error = %e, "reading a replaced map's entries; they are lost")
            }
        }
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::error!(map = name, error = %e, "unpinning an incompatible map");
        }
    }
    carried
}

/// Writes carried entries into the maps the loader made in their place,
/// each value zero-extended to the new layout. Entries beyond the new
/// map's capacity are dropped (counted in the log).
pub(super) fn carry_over(pin_dir: &Path, carried: Vec<Carried>) {
    for Carried { name, value_size, entries } in carried {
        let path = pin_dir.join(name);
        let fd = match raw::obj_get(&path) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::error!(map = name, error = %e, "opening the new map to carry entries over");
                continue;
            }
        };
        let (mut written, mut failed) = (0usize, 0usize);
        let mut value = vec![0u8; value_size];
        for (key, old) in &entries {
            value.fill(0);
            value[..old.len()].copy_from_slice(old);
            match raw::update(&fd, key, &value) {
                Ok(()) => written += 1,
                Err(_) => failed += 1,
            }
        }
        tracing::info!(map = name, written, failed, "carried entries over into the new map");
    }
}

/// Every entry of the pinned map at `path` (keys and values as bytes).
/// Programs may change the map meanwhile (conntrack): the walk stops after
/// twice its capacity in steps, and a key that vanished mid-walk is skipped.
fn read_entries(
    path: &Path,
    key_size: usize,
    value_size: usize,
    capacity: u32,
) -> std::io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let fd = raw::obj_get(path)?;
    let mut entries = Vec::new();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    for _ in 0..(capacity as usize).saturating_mul(2).max(1) {
        if !raw::next_key(&fd, key.as_deref(), &mut next)? {
            break;
        }
        if raw::lookup(&fd, &next, &mut value)? {
            entries.push((next.clone(), value.clone()));
        }
        key = Some(next.clone());
    }
    Ok(entries)
}
