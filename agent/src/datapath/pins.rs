//! Pinned maps from an earlier agent are reused only when they have the
//! layout and size this agent's programs expect; any other is unpinned, so
//! the loader creates it afresh and the agent refills it from the cluster.
//! Programs of the earlier agent keep their own maps until their links get
//! this agent's programs.

use std::{mem::size_of, path::Path};

use aya::maps::MapInfo;
use portcullis_common::{
    COUNTED_ENDPOINTS, COUNTER_SLOTS, CidrKey, Counter, CtKey, CtValue, EndpointAddr, EndpointInfo, FragKey,
    FragValue, IpKey, PendingKey, PendingValue, PolicyKey, PolicyValue, ServiceKey, map_names, map_sizes,
};

use super::MapSizes;

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

/// Unpins every map under `pin_dir` whose layout or size differs from what
/// this agent loads.
pub(super) fn drop_incompatible(pin_dir: &Path, sizes: &MapSizes) {
    for (name, key, value, entries) in expected(sizes) {
        let path = pin_dir.join(name);
        let Ok(info) = MapInfo::from_pin(&path) else { continue };
        let found = (info.key_size() as usize, info.value_size() as usize, info.max_entries());
        if found != (key, value, entries) {
            tracing::warn!(
                map = name,
                found = ?found,
                want = ?(key, value, entries),
                "pinned map has another layout or size; replacing it"
            );
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::error!(map = name, error = %e, "unpinning an incompatible map");
            }
        }
    }
}
