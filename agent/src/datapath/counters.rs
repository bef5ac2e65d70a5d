//! Per-endpoint counters: packets and bytes per direction and verdict
//! reason, summed over CPUs.

use std::collections::BTreeMap;

use std::collections::BTreeSet;

use portcullis_common::{COUNTED_ENDPOINTS, COUNTER_REASONS, COUNTER_SLOTS, DIR_EGRESS, DIR_INGRESS, reason};

use super::Datapath;

/// One direction of one endpoint: `forwarded` and drops by reason (indexed
/// by `portcullis_common::reason`; index 0 is unused).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirectionCounters {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_packets: [u64; reason::COUNT as usize],
    pub dropped_bytes: [u64; reason::COUNT as usize],
}

impl DirectionCounters {
    pub fn dropped_total(&self) -> u64 {
        self.dropped_packets.iter().sum()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounters {
    pub ingress: DirectionCounters,
    pub egress: DirectionCounters,
}

impl Datapath {
    /// Counters of every endpoint id that has counted anything.
    pub fn counters(&self) -> BTreeMap<u16, EndpointCounters> {
        let mut out = BTreeMap::new();
        // Id 0 is no endpoint's: the programs count there what they drop
        // on an interface the endpoint table does not know.
        let ids: Vec<u16> = std::iter::once(0).chain(self.loaded.endpoints.keys().copied()).collect();
        for id in ids {
            if let Some(c) = self.endpoint_counters(id) {
                out.insert(id, c);
            }
        }
        out
    }

    /// One endpoint's counters; `None` for ids the programs do not count.
    pub fn endpoint_counters(&self, id: u16) -> Option<EndpointCounters> {
        if u32::from(id) >= COUNTED_ENDPOINTS {
            return None;
        }
        let mut out = EndpointCounters::default();
        for (direction, side) in [(DIR_INGRESS, &mut out.ingress), (DIR_EGRESS, &mut out.egress)] {
            for why in 0..reason::COUNT {
                let slot =
                    u32::from(id) * COUNTER_SLOTS + u32::from(direction) * COUNTER_REASONS + u32::from(why);
                let Ok(per_cpu) = self.maps.counters.get(&slot, 0) else { continue };
                let (packets, bytes) = per_cpu.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                if why == reason::POLICY_ALLOWED {
                    side.forwarded_packets = packets;
                    side.forwarded_bytes = bytes;
                } else {
                    side.dropped_packets[why as usize] = packets;
                    side.dropped_bytes[why as usize] = bytes;
                }
            }
        }
        Some(out)
    }

    /// Packets and bytes of the flows each rule allowed (both ways), keyed
    /// `(direction, rule cookie)`, in the policy set of endpoint `id`: rules
    /// are counted per set, so endpoints with the same policy (a
    /// Deployment's replicas) count together (`policy_set_of`).
    pub fn rule_counters(&self, id: u16) -> BTreeMap<(u8, u32), (u64, u64)> {
        let Some(set) = self.loaded.endpoints.get(&id).and_then(|l| l.set) else { return BTreeMap::new() };
        let id = set.id;
        self.loaded
            .slots
            .range((id, 0, 0)..=(id, u8::MAX, u32::MAX))
            .filter_map(|(&(_, direction, cookie), &slot)| {
                let per_cpu = self.maps.rule_stats.get(&slot, 0).ok()?;
                let sum = per_cpu.iter().fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
                Some(((direction, cookie), sum))
            })
            .collect()
    }

    /// The counter slot of a rule in a policy set, zeroed when newly handed
    /// out; 0 (not counted) when all are taken.
    pub(super) fn slot_for(&mut self, id: u16, direction: u8, cookie: u32) -> u32 {
        if let Some(&slot) = self.loaded.slots.get(&(id, direction, cookie)) {
            return slot;
        }
        let slot = match self.loaded.free_slots.pop() {
            Some(s) => s,
            None if self.loaded.next_slot.max(1) < portcullis_common::map_sizes::RULE_STATS => {
                let s = self.loaded.next_slot.max(1);
                self.loaded.next_slot = s + 1;
                s
            }
            None => return 0,
        };
        self.zero_slot(slot);
        self.loaded.slots.insert((id, direction, cookie), slot);
        slot
    }

    /// Frees the slots of rules no loaded policy set has any more.
    pub(super) fn prune_slots(&mut self) {
        let live: BTreeSet<(u16, u8, u32)> = self
            .loaded
            .sets
            .iter()
            .flat_map(|(r, s)| {
                s.keys.policy.iter().map(move |((_, k), v)| (r.id, k.direction, v.rule_cookie))
            })
            .collect();
        let gone: Vec<(u16, u8, u32)> =
            self.loaded.slots.keys().filter(|k| !live.contains(k)).copied().collect();
        for k in gone {
            if let Some(slot) = self.loaded.slots.remove(&k) {
                self.loaded.free_slots.push(slot);
            }
        }
    }

    fn zero_slot(&mut self, slot: u32) {
        let Some(cpus) = possible_cpus() else { return };
        if let Ok(zero) = aya::maps::PerCpuValues::try_from(vec![Default::default(); cpus]) {
            let _ = self.maps.rule_stats.set(slot, zero, 0);
        }
    }

    /// Zeroes an endpoint id's counters (the id is being handed to a new pod).
    pub(super) fn reset_counters(&mut self, id: u16) {
        if u32::from(id) >= COUNTED_ENDPOINTS {
            return;
        }
        let Some(cpus) = possible_cpus() else { return };
        for slot in 0..COUNTER_SLOTS {
            let zero = aya::maps::PerCpuValues::try_from(vec![Default::default(); cpus]);
            if let Ok(zero) = zero {
                let _ = self.maps.counters.set(u32::from(id) * COUNTER_SLOTS + slot, zero, 0);
            }
        }
    }
}

/// The kernel's possible CPUs (a per-CPU value's length): read once, as
/// it cannot change while we run (each new endpoint's counters need it).
fn possible_cpus() -> Option<usize> {
    static CPUS: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| aya::util::nr_cpus().ok())
}
