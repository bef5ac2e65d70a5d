//! Compiled endpoint state: what the policy compiler produces and the datapath
//! loads. Plain data, serialisable, so a state can also be fed to `agent run
//! --state FILE` to drive the datapath directly.

use std::{collections::BTreeMap, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::model::{PortRange, Protocol};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompiledState {
    /// Increases with every change; the agent reports it once enforced.
    #[serde(default)]
    pub revision: u64,
    /// Identity number -> a human name (e.g. `default/app=frontend`).
    #[serde(default)]
    pub identities: BTreeMap<u32, String>,
    #[serde(default)]
    pub ipcache: Vec<IpcacheEntry>,
    #[serde(default)]
    pub endpoints: Vec<EndpointState>,
    /// Service frontends (ClusterIP, protocol, port) that kube-proxy
    /// translates: egress to them is judged after DNAT, on the backend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceFrontend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFrontend {
    pub ip: std::net::IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpcacheEntry {
    pub cidr: IpNet,
    pub identity: u32,
    /// Who holds the address (`namespace/pod`), for flow output. Shared:
    /// the agent builds this list on every pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointState {
    /// Node-local endpoint id (1..32768; the ids above name policy sets).
    pub id: u16,
    /// `namespace/pod`.
    pub name: String,
    /// Host-side interface of the pod.
    pub interface: String,
    pub identity: u32,
    /// The pod's addresses; when given, it may send from these only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Shared with the endpoints whose policy is the same.
    #[serde(default)]
    pub ingress: Arc<DirectionPolicy>,
    #[serde(default)]
    pub egress: Arc<DirectionPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionPolicy {
    /// Some policy of this direction selects the endpoint: only what `allow`
    /// or `prefixes` admit passes.
    #[serde(default)]
    pub isolated: bool,
    /// By the remote's identity.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    /// By the remote's address: the longest prefix containing it decides
    /// (ipBlocks with their excepts, and per-address named-port entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<PrefixEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixEntry {
    pub cidr: IpNet,
    /// What addresses under this prefix (and no longer one) may use; `peer`
    /// is 0 in each. Empty: nothing (an `except` hole).
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Remote identity; 0 = any peer.
    #[serde(default)]
    pub peer: u32,
    /// Absent: every protocol (and then every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// Absent: every port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// Names the rule in flow output and traces.
    #[serde(default)]
    pub rule: u32,
}

/// A port prefix: the top `bits` bits of `port` (the rest are zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPrefix {
    pub port: u16,
    pub bits: u8,
}

impl PortPrefix {
    pub fn contains(self, port: u16) -> bool {
        let mask = if self.bits == 0 { 0 } else { u16::MAX << (16 - self.bits) };
        port & mask == self.port
    }
}

/// The minimal set of aligned port prefixes that covers exactly `range`.
pub trait PortPrefixes {
    fn prefixes(self) -> Vec<PortPrefix>;
}

impl PortPrefixes for PortRange {
    /// The minimal set of aligned prefixes that covers exactly this range,
    /// ascending. Empty when `end < start`.
    fn prefixes(self) -> Vec<PortPrefix> {
        let mut out = Vec::new();
        let (mut lo, hi) = (u32::from(self.start), u32::from(self.end));
        while lo <= hi {
            // The largest aligned block starting at `lo` that stays within `hi`.
            let mut size_log = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
            while lo + (1 << size_log) - 1 > hi {
                size_log -= 1;
            }
            // `lo` fits 16 bits since `lo <= hi <= 65535`.
            out.push(PortPrefix { port: lo as u16, bits: (16 - size_log) as u8 });
            lo += 1 << size_log;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_port_is_one_full_prefix() {
        assert_eq!(PortRange::single(80).prefixes(), vec![PortPrefix { port: 80, bits: 16 }]);
    }

    #[test]
    fn whole_range_is_one_empty_prefix() {
        let all = PortRange { start: 0, end: u16::MAX };
        assert_eq!(all.prefixes(), vec![PortPrefix { port: 0, bits: 0 }]);
    }

    #[test]
    fn range_splits_into_aligned_blocks() {
        // 1000..=1999: 1000-1007 (8), 1008-1023 (16), 1024-1535 (512),
        // 1536-1791 (256), 1792-1919 (128), 1920-1983 (64), 1984-1999 (16).
        let got = PortRange { start: 1000, end: 1999 }.prefixes();
        let want = [(1000, 13), (1008, 12), (1024, 7), (1536, 8), (1792, 9), (1920, 10), (1984, 12)];
        let want: Vec<_> = want.iter().map(|&(port, bits)| PortPrefix { port, bits }).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn top_of_range_does_not_overflow() {
        let got = PortRange { start: 65534, end: 65535 }.prefixes();
        assert_eq!(got, vec![PortPrefix { port: 65534, bits: 15 }]);
    }

    proptest! {
        /// The prefixes cover exactly the range, without overlap, and no two
        /// could merge into one (minimality for aligned blocks).
        #[test]
        fn prefixes_cover_range_exactly(a in any::<u16>(), b in any::<u16>(), probe in any::<u16>()) {
            let (start, end) = (a.min(b), a.max(b));
            let prefixes = PortRange { start, end }.prefixes();
            let hits = prefixes.iter().filter(|p| p.contains(probe)).count();
            prop_assert_eq!(hits, usize::from((start..=end).contains(&probe)));
            for w in prefixes.windows(2) {
                let mergeable = w[0].bits == w[1].bits && w[0].bits > 0 && {
                    let parent_bits = w[0].bits - 1;
                    let parent_mask = if parent_bits == 0 { 0 } else { u16::MAX << (16 - parent_bits) };
                    w[0].port & parent_mask == w[1].port & parent_mask
                };
                prop_assert!(!mergeable, "{:?} and {:?} could merge", w[0], w[1]);
            }
        }
    }
}
