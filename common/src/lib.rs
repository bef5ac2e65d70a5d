//! Layouts both sides of the datapath agree on: map keys and values, flow
//! events, constants. `no_std` and `#[repr(C)]`; the only place they are defined.
#![no_std]

/// Names of the maps in the eBPF object; also their pin file names.
pub mod map_names {
    pub const ENDPOINTS: &str = "PC_ENDPOINTS";
    pub const IPCACHE: &str = "PC_IPCACHE";
    pub const POLICY: &str = "PC_POLICY";
    pub const FLOWS: &str = "PC_FLOWS";
    pub const CT: &str = "PC_CT";
    pub const CIDR: &str = "PC_CIDR";
    pub const EP_ADDRS: &str = "PC_EP_ADDRS";
    pub const SERVICES: &str = "PC_SERVICES";
    pub const SVC_PENDING: &str = "PC_SVC_PENDING";
    pub const COUNTERS: &str = "PC_COUNTERS";
    pub const FRAGS: &str = "PC_FRAGS";
    pub const RULE_STATS: &str = "PC_RULE_STATS";
    pub const CONFIG: &str = "PC_CONFIG";
    pub const SVC_LAST: &str = "PC_SVC_LAST";
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// TC ingress of the host-side veth: packets leaving the pod (its egress).
    pub const FROM_CONTAINER: &str = "from_container";
    /// TC egress of the host-side veth: packets entering the pod (its ingress).
    pub const TO_CONTAINER: &str = "to_container";
    /// TC egress of the node's other devices: Service verdicts after DNAT.
    pub const TO_NETDEV: &str = "to_netdev";
    /// The same for devices without a link-layer header (WireGuard, IPIP).
    pub const TO_NETDEV_L3: &str = "to_netdev_l3";
    /// cgroup ingress of the node's root cgroup: Service verdicts for
    /// backends on the node's own addresses (hostNetwork pods, the API
    /// server), which no device hook sees after DNAT.
    pub const TO_HOST: &str = "to_host";
}

/// Default map sizes; the agent may override them at load time.
pub mod map_sizes {
    pub const ENDPOINTS: u32 = 1024;
    pub const IPCACHE: u32 = 65536;
    /// LPM tries (policy, CIDR) take memory per entry, not per slot, so
    /// their limits are set for a full node: 250 pods of a 10,000-pod
    /// cluster hold about 750,000 policy and 125,000 CIDR entries
    /// (`cargo xtask bench scale`).
    pub const POLICY: u32 = 1 << 21;
    /// Bytes; a power of two and a multiple of the page size.
    pub const FLOWS: u32 = 1 << 20;
    pub const CT: u32 = 262144;
    pub const CIDR: u32 = 1 << 19;
    /// Endpoint addresses: a few per endpoint.
    pub const EP_ADDRS: u32 = 4096;
    /// Service frontends (ClusterIP, protocol, port).
    pub const SERVICES: u32 = 65536;
    /// Connections to a Service whose egress verdict waits for DNAT.
    pub const SVC_PENDING: u32 = 65536;
    /// Fragmented datagrams in flight (first fragment passed, later ones due).
    pub const FRAGS: u32 = 8192;
    /// Per-rule counter slots: one per (policy set, direction, rule) in use;
    /// slot 0 means "not counted".
    pub const RULE_STATS: u32 = 65536;
}

/// Counters are per endpoint id; ids at or above this share no slot and
/// are not counted (the agent hands out ids from 1 upwards).
pub const COUNTED_ENDPOINTS: u32 = 4096;
/// Counter slots per endpoint: `direction * COUNTER_REASONS + reason`, where
/// reason 0 is "forwarded" and the others are the drop reasons.
pub const COUNTER_REASONS: u32 = 8;
pub const COUNTER_SLOTS: u32 = 2 * COUNTER_REASONS;

/// Conntrack entry lifetimes, refreshed by every packet of the flow.
pub mod ct_timeout {
    const S: u64 = 1_000_000_000;
    /// TCP before the other side answered (a SYN on its way).
    pub const TCP_OPENING_NS: u64 = 60 * S;
    /// TCP once both sides spoke.
    pub const TCP_ESTABLISHED_NS: u64 = 6 * 3600 * S;
    /// TCP after a FIN or RST.
    pub const TCP_CLOSING_NS: u64 = 10 * S;
    /// UDP, SCTP, ICMP and everything else.
    pub const OTHER_NS: u64 = 60 * S;
    /// A Service flow other than TCP: below the kernel's shortest UDP
    /// timeout (30 s, unreplied or in its first seconds), so our entry never
    /// outlives the NAT decision it was judged on (once the kernel forgets
    /// it, the next packet may get another backend, which must be judged).
    pub const SERVICE_OTHER_NS: u64 = 25 * S;
    /// The datapath rewrites an entry's expiry only when it moves by more
    /// than this, so a busy flow does not write its entry on every packet.
    pub const REFRESH_SLACK_NS: u64 = S;
}

/// Conntrack entry flags (`CtValue::flags`).
pub mod ct_flags {
    /// A packet passed the other way: the flow is established.
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// A TCP FIN or RST passed.
    pub const CLOSING: u8 = 1 << 1;
    /// A connection to a Service address, allowed for the backend in
    /// `nat_addr`/`nat_port`.
    pub const SERVICE: u8 = 1 << 2;
}

/// skb mark bits the datapath uses to carry "egress verdict pending" from
/// the client's veth to the hook that sees the packet after kube-proxy's DNAT.
/// Clear of kube-proxy's 0x4000/0x8000 and restored once read.
pub mod mark {
    /// Bits 8..=11 hold the magic, bits 0..=7 the node's tag (random per
    /// pinned map set, in `PC_CONFIG`), bits 16..=31 the client's endpoint
    /// id. Twelve bits must match before a mark counts as ours: another
    /// tool's mark (WireGuard's 0xca6c shares the magic nibble) is left
    /// alone, and so is another agent's on the same kernel (test beds).
    pub const MASK: u32 = 0xffff_0fff;
    pub const MAGIC_MASK: u32 = 0x0000_0fff;
    pub const SERVICE_PENDING: u32 = 0x0000_0a00;
    /// A packet let through a pod's egress because it stays on the link
    /// (neighbour discovery): dropped where it leaves the node or enters a
    /// pod if it was routed meanwhile.
    pub const LINK_ONLY: u32 = 0x0000_0b00;
    pub const TAG_MASK: u32 = 0x0000_00ff;
    pub const ENDPOINT_SHIFT: u32 = 16;
}

/// Slots of the `PC_CONFIG` array.
pub mod config {
    /// The node's mark tag (1..=255; 0 until the agent sets it, which no
    /// mark matches).
    pub const NODE_TAG: u32 = 0;
    pub const SLOTS: u32 = 4;
}

/// The verdict for a packet we let through: TC_ACT_UNSPEC, which TCX reads as
/// "next" — programs attached after ours (another CNI's, a monitor) still run,
/// and the packet passes when none objects.
pub const TC_PASS: i32 = -1;
pub const TC_ACT_SHOT: i32 = 2;

/// Traffic direction, seen from the endpoint (the pod).
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Reserved identities. Identity 0 in a policy key means "any peer".
pub mod identity {
    pub const ANY: u32 = 0;
    /// The node's own addresses.
    pub const HOST: u32 = 1;
    /// Every address the ipcache does not know.
    pub const WORLD: u32 = 2;
    /// First identity the agent allocates for label sets.
    pub const FIRST_ALLOCATED: u32 = 256;
    /// Prefix classes (an endpoint's CIDR trie values) live above this; they
    /// key policy entries like identities do.
    pub const CLASS_BASE: u32 = 0x8000_0000;
}

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// Endpoint flags (`EndpointInfo::flags`).
pub const EP_ISOLATED_INGRESS: u32 = 1 << 0;
pub const EP_ISOLATED_EGRESS: u32 = 1 << 1;
/// The endpoint's addresses are known: packets it sends from any other
/// (non-link-local) address are dropped.
pub const EP_CHECK_SOURCE: u32 = 1 << 2;
/// Report every new flow the endpoint's policy lets through, not only drops.
pub const EP_REPORT_ALLOWED: u32 = 1 << 3;
/// The endpoint's policy did not fit the maps: both directions deny all
/// (but the node and neighbour discovery) until it does. Fail closed.
pub const EP_POLICY_OVERFLOW: u32 = 1 << 4;

/// The endpoint table: host-side ifindex -> endpoint.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub endpoint_id: u16,
    /// Which generation of this endpoint's policy entries is live; the agent
    /// writes the other one, then flips this in one map write.
    pub generation: u8,
    pub _pad: u8,
    pub flags: u32,
    /// The endpoint's first IPv4 and IPv6 address (zero: none), so the
    /// source check of nearly every packet needs no map lookup; further
    /// addresses are in the endpoint address map.
    pub ipv4: [u8; 4],
    pub ipv6: [u8; 16],
    /// The policy set the endpoint's verdicts are looked up in (the `policy_id`
    /// of its policy and CIDR entries): endpoints whose compiled policy is
    /// the same (a Deployment's replicas) share one set, so a new replica is
    /// a handful of map writes. 0: the endpoint's own entries, keyed by its
    /// `endpoint_id` (the layout before sets).
    pub policy_id: u16,
    pub _pad2: [u8; 2],
}

impl EndpointInfo {
    /// The id its policy and CIDR entries are keyed by.
    #[inline(always)]
    pub fn policy_id(&self) -> u16 {
        if self.policy_id != 0 { self.policy_id } else { self.endpoint_id }
    }
}

/// Policy set ids start here; endpoint ids stay below it, so a set never
/// meets the entries an endpoint of the layout before sets keyed by its
/// own id.
pub const POLICY_SET_BASE: u16 = 0x8000;

/// ipcache LPM key data: `{family, addr}`; the prefix length counts the 32 bits
/// of `family` and padding first, so one trie holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpKey {
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

impl IpKey {
    /// Bits of the key before the address.
    pub const HEADER_BITS: u32 = 32;
}

/// Policy LPM key data. Exact on `{policy set, generation, direction,
/// identity}`, then optionally protocol, then a prefix of the destination port
/// (network byte order) — so an `endPort` range is a handful of aligned prefixes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// `EndpointInfo::policy_id()`.
    pub policy_id: u16,
    pub generation: u8,
    pub direction: u8,
    pub identity: u32,
    pub protocol: u8,
    pub port: [u8; 2],
    /// Never part of a prefix.
    pub _pad: u8,
}

impl PolicyKey {
    /// Prefix length (in bits) that matches the peer and any protocol or port.
    pub const PREFIX_ANY_PROTO: u32 = 64;
    /// Peer and protocol, any port.
    pub const PREFIX_ANY_PORT: u32 = 72;
    /// Peer, protocol and the full 16-bit port.
    pub const PREFIX_FULL: u32 = 88;

    pub const fn port_prefix(port_bits: u8) -> u32 {
        Self::PREFIX_ANY_PORT + port_bits as u32
    }
}

/// Per-policy-set CIDR trie key data: exact on `{policy set, generation,
/// direction, family}` (64 bits), then a prefix of the remote address. The
/// value is a prefix class (`identity::CLASS_BASE + n`) looked up in the
/// policy trie like an identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CidrKey {
    /// `EndpointInfo::policy_id()`.
    pub policy_id: u16,
    pub generation: u8,
    pub direction: u8,
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
}

impl CidrKey {
    /// Bits of the key before the address.
    pub const HEADER_BITS: u32 = 64;
}

/// What an allow entry carries: the rule that put it there, echoed in flow
/// events so a forward can name its reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyValue {
    pub rule_cookie: u32,
    /// The rule's counter slot in this policy set (`PC_RULE_STATS`); the
    /// flow's conntrack entry keeps it, so its later packets count there
    /// with one array lookup. 0: not counted.
    pub stats_slot: u32,
}

/// An address an endpoint owns, keyed by its host-side ifindex.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointAddr {
    pub ifindex: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

/// Conntrack key: a flow as one endpoint sees it, whichever side opened it
/// and whichever way the packet goes: the endpoint's address and port, then
/// the peer's. A flow's packets in both directions find one entry with one
/// lookup; the value remembers which direction opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// For ICMP echo both ports hold the identifier.
    pub local_port: u16,
    pub remote_port: u16,
    pub endpoint_id: u16,
    pub family: u8,
    pub protocol: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` after which the entry passes nothing; the agent
    /// sweeps such entries.
    pub expires_ns: u64,
    /// The rule that allowed the flow (0: the direction was not isolated).
    pub rule_cookie: u32,
    /// `ct_flags`.
    pub flags: u8,
    /// The direction of the flow's first packet (`DIR_INGRESS`/`DIR_EGRESS`).
    pub origin: u8,
    /// With `ct_flags::SERVICE`: the backend kube-proxy chose (host byte
    /// order port), which the verdict was given on; revocation judges it.
    pub nat_port: u16,
    pub nat_addr: [u8; 16],
    /// The counter slot of the rule that allowed the flow (0: none).
    pub stats_slot: u32,
    pub _pad: u32,
}

/// A Service frontend as kube-proxy translates it: ClusterIP, protocol, port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub family: u8,
    pub protocol: u8,
    /// Host byte order.
    pub port: u16,
    pub addr: [u8; 16],
}

/// A connection from an endpoint to a Service, between the client's veth
/// and the hook that gives the egress verdict after DNAT. Keyed by what DNAT
/// leaves alone: the client's side of the tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    pub src_addr: [u8; 16],
    pub src_port: u16,
    pub endpoint_id: u16,
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// The Service address the client asked for, and the client's policy as it
/// was when the packet left (the verdict uses that set and generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingValue {
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
    pub generation: u8,
    pub _pad: u8,
    pub flags: u32,
    /// The client's `EndpointInfo::policy_id` (0: the client's endpoint id).
    pub policy_id: u16,
    pub _pad2: [u8; 2],
}

/// The Service packet a CPU marked last: its record. A packet goes from
/// the client's veth through netfilter to the hook after DNAT in one pass
/// on one CPU, so that hook finds its own record here whatever SNAT did
/// to the source (kube-proxy masquerades with random ports).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingSlot {
    pub key: PendingKey,
    pub value: PendingValue,
}

/// A fragmented datagram: addresses, protocol and the IP identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub id: u32,
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// The ports of a datagram's first fragment, which its later fragments lack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragValue {
    pub src_port: u16,
    pub dst_port: u16,
}

/// One counter slot: packets and bytes (per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Verdicts in flow events.
pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;

/// Why a packet was dropped (or forwarded).
pub mod reason {
    pub const POLICY_ALLOWED: u8 = 0;
    pub const POLICY_DENIED: u8 = 1;
    pub const MALFORMED: u8 = 2;
    pub const UNSUPPORTED_L3: u8 = 3;
    pub const SPOOFED_SOURCE: u8 = 4;
    /// A packet on an interface that carries our programs but that the
    /// endpoint table does not know (it was full, or the endpoint is leaving).
    pub const UNKNOWN_ENDPOINT: u8 = 5;
    /// The state the verdict needs is not in the maps: the endpoint's policy
    /// did not fit (it then denies everything until it does), or a Service
    /// connection's pending record was evicted before its verdict.
    pub const NO_MAP_SPACE: u8 = 6;
    /// The number of reasons; also the counters' stride.
    pub const COUNT: u8 = 7;
}

/// A flow event on the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    pub ifindex: u32,
    /// Identity of the remote side as the ipcache resolved it.
    pub remote_identity: u32,
    pub rule_cookie: u32,
    pub packet_len: u32,
    pub endpoint_id: u16,
    pub src_port: u16,
    pub dst_port: u16,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub family: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub _pad: [u8; 4],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `#[repr(C)]`, `Copy`, and every bit pattern is valid; the
    // explicit padding fields leave no uninitialised bytes.
    unsafe impl aya::Pod for super::EndpointInfo {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::PolicyValue {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::EndpointAddr {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::PendingKey {}
    unsafe impl aya::Pod for super::PendingValue {}
    unsafe impl aya::Pod for super::PendingSlot {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
}

// Layouts are ABI: fail the build if one changes size by accident. They
// change only by appending fields whose zero means "absent": an upgraded
// agent then carries the pinned maps' entries over, zero-extended
// (agent/src/datapath/pins.rs). Keys never change.
const _: () = assert!(core::mem::size_of::<EndpointInfo>() == 32);
const _: () = assert!(core::mem::size_of::<IpKey>() == 20);
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 72);
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);
const _: () = assert!(core::mem::size_of::<CtValue>() == 48);
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<PendingKey>() == 24);
const _: () = assert!(core::mem::size_of::<PendingValue>() == 28);
const _: () = assert!(core::mem::size_of::<PendingSlot>() == 52);
const _: () = assert!(reason::COUNT as u32 <= COUNTER_REASONS);
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);
const _: () = assert!(core::mem::size_of::<CidrKey>() == 24);
const _: () = assert!(core::mem::size_of::<EndpointAddr>() == 24);
