//! Portcullis datapath: TC programs on each pod's host-side veth.
//!
//! `from_container` runs at TC ingress of the host-side veth (the pod's egress),
//! `to_container` at its TC egress (the pod's ingress). Both look the endpoint
//! up by ifindex. A packet of a flow conntrack knows passes; a new flow, where
//! the direction is isolated, must find an entry in the endpoint's policy trie
//! for the peer's identity (from the ipcache) or for any peer, covering its
//! protocol and port. Every new flow that passes is tracked, isolated or not,
//! so its replies pass too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod datapath {
    use aya_ebpf::{
        helpers::bpf_ktime_get_ns,
        macros::{classifier, map},
        maps::{HashMap, LpmTrie, LruHashMap, RingBuf, lpm_trie::Key},
        programs::TcContext,
    };
    use portcullis_common::{
        CidrKey, CtKey, CtValue, DIR_EGRESS, DIR_INGRESS, EP_CHECK_SOURCE, EP_ISOLATED_EGRESS,
        EP_ISOLATED_INGRESS, EndpointAddr, EndpointInfo, FlowEvent, IPPROTO_ICMPV6, IpKey, PolicyKey,
        PolicyValue, TC_ACT_SHOT, TC_PASS, VERDICT_DROPPED, identity, map_sizes, reason,
    };

    use crate::packet::{Packet, Parsed, parse};

    #[map]
    static PC_ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::pinned(map_sizes::ENDPOINTS, 0);

    #[map]
    static PC_IPCACHE: LpmTrie<IpKey, u32> = LpmTrie::pinned(map_sizes::IPCACHE, 0);

    #[map]
    static PC_POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(map_sizes::POLICY, 0);

    #[map]
    static PC_FLOWS: RingBuf = RingBuf::pinned(map_sizes::FLOWS, 0);

    #[map]
    static PC_CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(map_sizes::CT, 0);

    #[map]
    static PC_CIDR: LpmTrie<CidrKey, u32> = LpmTrie::pinned(map_sizes::CIDR, 0);

    #[map]
    static PC_EP_ADDRS: HashMap<EndpointAddr, u8> = HashMap::pinned(map_sizes::EP_ADDRS, 0);

    #[classifier]
    pub fn from_container(ctx: TcContext) -> i32 {
        enforce(&ctx, DIR_EGRESS)
    }

    #[classifier]
    pub fn to_container(ctx: TcContext) -> i32 {
        enforce(&ctx, DIR_INGRESS)
    }

    /// ICMPv6 router/neighbour solicitation and advertisement, and redirect:
    /// an isolated pod without them loses its network. Real ones never left
    /// their link (RFC 4861: hop limit 255), so they cannot carry a pod's
    /// traffic past its policy.
    #[inline(always)]
    fn is_neighbour_discovery(pkt: &Packet) -> bool {
        pkt.protocol == IPPROTO_ICMPV6 && (133..=137).contains(&pkt.icmp_type) && pkt.hop_limit == 255
    }

    /// Multicast listener queries and reports (MLDv1 130-132, MLDv2 143):
    /// hop limit 1 and a link-scope multicast destination (RFC 3810), so
    /// they never leave the link either.
    #[inline(always)]
    fn is_multicast_listener_discovery(pkt: &Packet) -> bool {
        pkt.protocol == IPPROTO_ICMPV6
            && matches!(pkt.icmp_type, 130..=132 | 143)
            && pkt.hop_limit == 1
            && pkt.dst[0] == 0xff
            && pkt.dst[1] & 0x0f == 0x02
    }

    #[inline(always)]
    fn enforce(ctx: &TcContext, direction: u8) -> i32 {
        // SAFETY: the kernel hands TC programs a valid __sk_buff.
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let Some(ep) = (unsafe { PC_ENDPOINTS.get(&ifindex) }) else {
            // Not a Portcullis endpoint: not ours to judge.
            return TC_PASS;
        };
        let ep = *ep;
        let isolation = if direction == DIR_INGRESS { EP_ISOLATED_INGRESS } else { EP_ISOLATED_EGRESS };
        let isolated = ep.flags & isolation != 0;

        let pkt = match parse(ctx) {
            Parsed::Ip(pkt) => pkt,
            Parsed::Arp => return TC_PASS,
            Parsed::OtherL3 if isolated => {
                return drop_unparsed(ctx, &ep, ifindex, direction, reason::UNSUPPORTED_L3);
            }
            Parsed::Malformed if isolated => {
                return drop_unparsed(ctx, &ep, ifindex, direction, reason::MALFORMED);
            }
            // Not isolated: the kernel deals with what we cannot parse.
            Parsed::OtherL3 | Parsed::Malformed => return TC_PASS,
        };
        if is_neighbour_discovery(&pkt) || is_multicast_listener_discovery(&pkt) {
            return TC_PASS;
        }
        // A pod sends from its own addresses only: a forged source would be
        // judged (and tracked) as another pod's identity everywhere else.
        if direction == DIR_EGRESS && ep.flags & EP_CHECK_SOURCE != 0 && !source_is_own(ifindex, &pkt) {
            emit_drop(ctx, &ep, ifindex, direction, identity::WORLD, reason::SPOOFED_SOURCE, Some(&pkt));
            return TC_ACT_SHOT;
        }

        let key = ct_key(&ep, direction, &pkt);
        if unsafe { PC_CT.get(&key) }.is_some() {
            return TC_PASS;
        }
        if unsafe { PC_CT.get(&ct_reverse(&key)) }.is_some() {
            return TC_PASS;
        }

        let mut rule_cookie = 0;
        if isolated {
            let remote = if direction == DIR_INGRESS { &pkt.src } else { &pkt.dst };
            let remote_identity = lookup_identity(pkt.family, remote);
            // The node may always reach its pods (kubelet probes).
            if !(direction == DIR_INGRESS && remote_identity == identity::HOST) {
                match policy_lookup(&ep, direction, remote_identity, remote, &pkt) {
                    Some(cookie) => rule_cookie = cookie,
                    None => {
                        emit_drop(
                            ctx,
                            &ep,
                            ifindex,
                            direction,
                            remote_identity,
                            reason::POLICY_DENIED,
                            Some(&pkt),
                        );
                        return TC_ACT_SHOT;
                    }
                }
            }
        }
        // A later fragment has no ports of its own: nothing to track.
        if pkt.has_l4 {
            let value = CtValue {
                // SAFETY: plain helper call without arguments.
                created_ns: unsafe { bpf_ktime_get_ns() },
                rule_cookie,
                _pad: 0,
            };
            // A full table evicts its least recently used flow (LRU); the
            // packet itself was allowed by policy either way.
            let _ = PC_CT.insert(&key, &value, 0);
        }
        TC_PASS
    }

    /// Is the packet's source one of the endpoint's addresses? IPv6
    /// link-local and unspecified sources never leave the link, so they pass.
    #[inline(always)]
    fn source_is_own(ifindex: u32, pkt: &Packet) -> bool {
        if pkt.family == portcullis_common::AF_INET6
            && ((pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80) || pkt.src == [0u8; 16])
        {
            return true;
        }
        let key = EndpointAddr { ifindex, family: pkt.family, _pad: [0; 3], addr: pkt.src };
        unsafe { PC_EP_ADDRS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn ct_key(ep: &EndpointInfo, direction: u8, pkt: &Packet) -> CtKey {
        CtKey {
            src_addr: pkt.src,
            dst_addr: pkt.dst,
            src_port: pkt.src_port,
            dst_port: pkt.dst_port,
            endpoint_id: ep.endpoint_id,
            family: pkt.family,
            protocol: pkt.protocol,
            direction,
            _pad: [0; 3],
        }
    }

    /// The key under which the other direction of the same endpoint tracked
    /// the flow this packet replies to.
    #[inline(always)]
    fn ct_reverse(key: &CtKey) -> CtKey {
        CtKey {
            src_addr: key.dst_addr,
            dst_addr: key.src_addr,
            src_port: key.dst_port,
            dst_port: key.src_port,
            direction: key.direction ^ 1,
            ..*key
        }
    }

    #[inline(always)]
    fn lookup_identity(family: u8, addr: &[u8; 16]) -> u32 {
        let key = Key::new(
            IpKey::HEADER_BITS + if family == portcullis_common::AF_INET { 32 } else { 128 },
            IpKey { family, _pad: [0; 3], addr: *addr },
        );
        PC_IPCACHE.get(&key).copied().unwrap_or(identity::WORLD)
    }

    /// The cookie of the rule allowing this packet, if any: by the remote's
    /// identity, by any peer, or by the class of the longest prefix of the
    /// remote's address in the endpoint's CIDR trie.
    #[inline(always)]
    fn policy_lookup(
        ep: &EndpointInfo,
        direction: u8,
        remote: u32,
        remote_addr: &[u8; 16],
        pkt: &Packet,
    ) -> Option<u32> {
        // A non-first fragment has no ports: only rules without ports (for
        // any protocol, or for its protocol) match it.
        let (protocol, port, prefix) = if pkt.has_l4 {
            (pkt.protocol, pkt.dst_port, PolicyKey::PREFIX_FULL)
        } else {
            (pkt.protocol, 0, PolicyKey::PREFIX_ANY_PORT)
        };
        let mut key = Key::new(
            prefix,
            PolicyKey {
                endpoint_id: ep.endpoint_id,
                generation: ep.generation,
                direction,
                identity: remote,
                protocol,
                port: port.to_be_bytes(),
                _pad: 0,
            },
        );
        if let Some(v) = PC_POLICY.get(&key) {
            return Some(v.rule_cookie);
        }
        key.data.identity = identity::ANY;
        if let Some(v) = PC_POLICY.get(&key) {
            return Some(v.rule_cookie);
        }
        let bits = if pkt.family == portcullis_common::AF_INET { 32 } else { 128 };
        let cidr = Key::new(
            CidrKey::HEADER_BITS + bits,
            CidrKey {
                endpoint_id: ep.endpoint_id,
                generation: ep.generation,
                direction,
                family: pkt.family,
                _pad: [0; 3],
                addr: *remote_addr,
            },
        );
        key.data.identity = *PC_CIDR.get(&cidr)?;
        PC_POLICY.get(&key).map(|v| v.rule_cookie)
    }

    #[inline(always)]
    fn drop_unparsed(ctx: &TcContext, ep: &EndpointInfo, ifindex: u32, direction: u8, why: u8) -> i32 {
        emit_drop(ctx, ep, ifindex, direction, identity::WORLD, why, None);
        TC_ACT_SHOT
    }

    #[inline(always)]
    fn emit_drop(
        ctx: &TcContext,
        ep: &EndpointInfo,
        ifindex: u32,
        direction: u8,
        remote_identity: u32,
        why: u8,
        pkt: Option<&Packet>,
    ) {
        let Some(mut entry) = PC_FLOWS.reserve::<FlowEvent>(0) else {
            // Ring full: the drop still happens; userspace sees the gap in counters.
            return;
        };
        let mut ev = FlowEvent {
            // SAFETY: plain helper call without arguments.
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            ifindex,
            remote_identity,
            packet_len: ctx.len(),
            endpoint_id: ep.endpoint_id,
            direction,
            verdict: VERDICT_DROPPED,
            reason: why,
            ..FlowEvent::default()
        };
        if let Some(pkt) = pkt {
            ev.family = pkt.family;
            ev.protocol = pkt.protocol;
            ev.tcp_flags = pkt.tcp_flags;
            ev.src_port = pkt.src_port;
            ev.dst_port = pkt.dst_port;
            ev.src_addr = pkt.src;
            ev.dst_addr = pkt.dst;
        }
        entry.write(ev);
        entry.submit(0);
    }
}

#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
