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
        helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
        macros::{cgroup_skb, classifier, map},
        maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
        programs::{SkBuffContext, TcContext, sk_buff::SkBuff},
    };
    use portcullis_common::{
        AF_INET, AF_INET6, COUNTED_ENDPOINTS, COUNTER_REASONS, COUNTER_SLOTS, CidrKey, Counter, CtKey,
        CtValue, DIR_EGRESS, DIR_INGRESS, EP_CHECK_SOURCE, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS,
        EP_POLICY_OVERFLOW, EP_REPORT_ALLOWED, EndpointAddr, EndpointInfo, FlowEvent, FragKey, FragValue,
        IPPROTO_ICMPV6, IPPROTO_TCP, IpKey, PendingKey, PendingSlot, PendingValue, PolicyKey, PolicyValue,
        ServiceKey, TC_ACT_SHOT, TC_PASS, VERDICT_DROPPED, VERDICT_FORWARDED, config, ct_flags, ct_timeout,
        identity, map_sizes, mark, reason,
    };

    use crate::packet::{Packet, Parsed, parse, parse_l3, quoted_key};

    mod service;
    use service::{
        is_our_pending_mark, is_service, is_service_source, pending_service_verdict, pending_unparsed,
        to_service,
    };

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

    #[map]
    static PC_FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(map_sizes::FRAGS, 0);

    #[map]
    static PC_COUNTERS: PerCpuArray<Counter> = PerCpuArray::pinned(COUNTED_ENDPOINTS * COUNTER_SLOTS, 0);

    /// Packets and bytes per (endpoint, direction, rule), at the slot the
    /// agent gave it in the rule's policy values: what each rule let through.
    #[map]
    static PC_RULE_STATS: PerCpuArray<Counter> = PerCpuArray::pinned(map_sizes::RULE_STATS, 0);

    /// Node-wide settings the agent writes once (`config::*` slots).
    #[map]
    static PC_CONFIG: Array<u32> = Array::pinned(config::SLOTS, 0);

    #[classifier]
    pub fn from_container(ctx: TcContext) -> i32 {
        enforce(&ctx, DIR_EGRESS)
    }

    #[classifier]
    pub fn to_container(ctx: TcContext) -> i32 {
        enforce(&ctx, DIR_INGRESS)
    }

    /// Passes everything. Never attached by the agent: benchmarks measure the
    /// cost of the TC hook itself with it (the floor under any verdict).
    #[classifier]
    pub fn pass_all(_ctx: TcContext) -> i32 {
        TC_PASS
    }

    /// TC egress of the node's other devices: gives the egress verdict of
    /// Service connections whose backend is not a local pod. The agent
    /// attaches it to every device of the node but its pods' veths, and
    /// follows devices as they come.
    #[classifier]
    pub fn to_netdev(ctx: TcContext) -> i32 {
        netdev_verdict(&ctx.skb, true)
    }

    /// `to_netdev` for devices whose packets start with the IP header
    /// (WireGuard, IPIP, tun).
    #[classifier]
    pub fn to_netdev_l3(ctx: TcContext) -> i32 {
        netdev_verdict(&ctx.skb, false)
    }

    /// What a node device's egress checks: a pending Service verdict, and
    /// link-only exemptions that were routed. Everything else passes.
    #[inline(always)]
    fn netdev_verdict(skb: &SkBuff, l2: bool) -> i32 {
        let tag = node_tag();
        let link_only = tag != 0 && skb_mark(skb) & mark::MAGIC_MASK == mark::LINK_ONLY | tag;
        if !link_only && !is_our_pending_mark(skb) {
            return TC_PASS;
        }
        let parsed = if l2 { parse(skb) } else { parse_l3(skb) };
        let Parsed::Ip(mut pkt) = parsed else {
            return pending_unparsed(skb);
        };
        if link_only {
            if !routed_after_exemption(skb, &pkt) {
                return TC_PASS;
            }
            let client = (skb_mark(skb) >> mark::ENDPOINT_SHIFT) as u16;
            count(client, DIR_EGRESS, reason::MALFORMED, skb.len());
            emit(
                skb,
                client,
                0,
                DIR_EGRESS,
                identity::WORLD,
                VERDICT_DROPPED,
                reason::MALFORMED,
                0,
                Some(&pkt),
            );
            return TC_ACT_SHOT;
        }
        follow_first_fragment(&mut pkt);
        pending_service_verdict(skb, &pkt)
    }

    /// Ingress of the node's root cgroup: a packet delivered to one of the
    /// node's own sockets. The egress verdict of a Service connection whose
    /// backend is a node address (a hostNetwork pod, the API server) is
    /// given here: after DNAT such a packet goes to local input, where no
    /// device hook runs.
    #[cgroup_skb]
    pub fn to_host(ctx: SkBuffContext) -> i32 {
        const ALLOW: i32 = 1;
        const DROP: i32 = 0;
        if !is_our_pending_mark(&ctx.skb) {
            return ALLOW;
        }
        let verdict = match parse_l3(&ctx.skb) {
            Parsed::Ip(mut pkt) => {
                follow_first_fragment(&mut pkt);
                pending_service_verdict(&ctx.skb, &pkt)
            }
            _ => pending_unparsed(&ctx.skb),
        };
        if verdict == TC_ACT_SHOT { DROP } else { ALLOW }
    }

    /// The node's mark tag (0: not set yet, which no mark matches).
    #[inline(always)]
    fn node_tag() -> u32 {
        PC_CONFIG.get(config::NODE_TAG).copied().unwrap_or(0) & mark::TAG_MASK
    }

    /// Marks a packet exempted from the pod's egress policy because it
    /// never leaves the link (neighbour discovery): the hook where it
    /// leaves the node, or enters another pod, drops it if it was routed.
    #[inline(always)]
    fn mark_link_only(skb: &SkBuff, endpoint_id: u16) {
        let tag = node_tag();
        if tag != 0 {
            let ours = mark::LINK_ONLY | tag | (u32::from(endpoint_id) << mark::ENDPOINT_SHIFT);
            skb.set_mark(skb_mark(skb) & !mark::MASK | ours);
        }
    }

    /// A packet exempted as link-only by its sender's hook whose hop limit
    /// shows it was routed; clears our mark either way.
    #[inline(always)]
    fn routed_after_exemption(skb: &SkBuff, pkt: &Packet) -> bool {
        let m = skb_mark(skb);
        let tag = node_tag();
        if tag == 0 || m & mark::MAGIC_MASK != mark::LINK_ONLY | tag {
            return false;
        }
        skb.set_mark(m & !mark::MASK);
        pkt.hop_limit != 255
    }

    #[inline(always)]
    fn skb_mark(skb: &SkBuff) -> u32 {
        // SAFETY: the kernel hands the program a valid __sk_buff.
        unsafe { (*skb.skb).mark }
    }

    /// ICMPv6 router/neighbour solicitation and advertisement, and redirect:
    /// an isolated pod without them loses its network. Real ones never left
    /// their link (RFC 4861: hop limit 255), so they cannot carry a pod's
    /// traffic past its policy.
    #[inline(always)]
    fn is_neighbour_discovery(pkt: &Packet) -> bool {
        // Protocol 58 means ICMPv6 only in an IPv6 header: over IPv4 it is
        // an unknown protocol that must meet the policy.
        pkt.family == AF_INET6
            && pkt.protocol == IPPROTO_ICMPV6
            && (133..=137).contains(&pkt.icmp_type)
            && pkt.hop_limit == 255
    }

    /// Multicast listener queries and reports (MLDv1 130-132, MLDv2 143):
    /// hop limit 1 and a link-scope multicast destination (RFC 3810), so
    /// they never leave the link either.
    #[inline(always)]
    fn is_multicast_listener_discovery(pkt: &Packet) -> bool {
        pkt.family == AF_INET6
            && pkt.protocol == IPPROTO_ICMPV6
            && matches!(pkt.icmp_type, 130..=132 | 143)
            && pkt.hop_limit == 1
            && pkt.dst[0] == 0xff
            && pkt.dst[1] & 0x0f == 0x02
    }

    #[inline(always)]
    fn enforce(ctx: &TcContext, direction: u8) -> i32 {
        let ctx = &ctx.skb;
        // SAFETY: the kernel hands TC programs a valid __sk_buff.
        let ifindex = unsafe { (*ctx.skb).ifindex };
        let Some(ep) = (unsafe { PC_ENDPOINTS.get(&ifindex) }) else {
            // Our programs run here but the table does not know the
            // interface: fail closed (the agent detaches before it forgets),
            // counted under id 0, which no endpoint has.
            count(0, direction, reason::UNKNOWN_ENDPOINT, ctx.len());
            emit(
                ctx,
                0,
                ifindex,
                direction,
                identity::WORLD,
                VERDICT_DROPPED,
                reason::UNKNOWN_ENDPOINT,
                0,
                None,
            );
            return TC_ACT_SHOT;
        };
        let ep = *ep;
        let overflow = ep.flags & EP_POLICY_OVERFLOW != 0;
        let isolation = if direction == DIR_INGRESS { EP_ISOLATED_INGRESS } else { EP_ISOLATED_EGRESS };
        let isolated = overflow || ep.flags & isolation != 0;

        let mut pkt = match parse(ctx) {
            Parsed::Ip(pkt) => pkt,
            Parsed::Arp => return TC_PASS,
            Parsed::OtherL3 if isolated => {
                return drop(ctx, &ep, ifindex, direction, identity::WORLD, reason::UNSUPPORTED_L3, None);
            }
            Parsed::Malformed if isolated => {
                return drop(ctx, &ep, ifindex, direction, identity::WORLD, reason::MALFORMED, None);
            }
            // Not isolated: the kernel deals with what we cannot parse.
            Parsed::OtherL3 | Parsed::Malformed => return TC_PASS,
        };
        // Neighbour discovery a pod sent passed its egress because it stays
        // on the link; one that was routed on (its hop limit no longer 255)
        // was never neighbour discovery, and must not arrive.
        if direction == DIR_INGRESS && routed_after_exemption(ctx, &pkt) {
            return drop(ctx, &ep, ifindex, direction, identity::WORLD, reason::MALFORMED, Some(&pkt));
        }
        if is_neighbour_discovery(&pkt) {
            // Only an isolated pod's ND is exempt from anything: an open
            // pod may send ND-shaped packets anywhere, as any packet.
            if direction == DIR_EGRESS && isolated {
                mark_link_only(ctx, ep.endpoint_id);
            }
            return TC_PASS;
        }
        if is_multicast_listener_discovery(&pkt) {
            return TC_PASS;
        }
        follow_first_fragment(&mut pkt);
        // A pod sends from its own addresses only: a forged source would be
        // judged (and tracked) as another pod's identity everywhere else.
        if direction == DIR_EGRESS && ep.flags & EP_CHECK_SOURCE != 0 && !source_is_own(ifindex, &ep, &pkt) {
            return drop(ctx, &ep, ifindex, direction, identity::WORLD, reason::SPOOFED_SOURCE, Some(&pkt));
        }
        // A connection to a Service on its way in, after DNAT: first the
        // client's egress verdict, then ours.
        if direction == DIR_INGRESS
            && is_our_pending_mark(ctx)
            && pending_service_verdict(ctx, &pkt) == TC_ACT_SHOT
        {
            return TC_ACT_SHOT;
        }

        // Conntrack lifetimes are seconds: the coarse clock (a tick's
        // resolution, no clock read) is enough.
        // SAFETY: plain helper call without arguments.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        // An ICMP error about a tracked flow (unreachable, too big, time
        // exceeded) is related to it and passes like its replies: coming in,
        // to the endpoint that sent the quoted packet (from any router on
        // the way); going out, only back to the quoted packet's sender, so
        // a quote of a tracked flow carries nothing anywhere else.
        if !overflow
            && pkt.quoted_off != 0
            && quoted_key(ctx, &pkt, ep.endpoint_id, direction == DIR_INGRESS).is_some_and(|k| {
                let to = if direction == DIR_INGRESS { &k.local_addr } else { &k.remote_addr };
                // Going out of an isolated pod, not about a Service flow:
                // netfilter would take it as related to the flow's NAT
                // and carry it to a backend nobody judged.
                let service_ok = direction == DIR_INGRESS || !isolated;
                pkt.dst == *to && ct_related(&k, now, service_ok)
            })
        {
            count(ep.endpoint_id, direction, reason::POLICY_ALLOWED, ctx.len());
            return TC_PASS;
        }
        let key = ct_key(ep.endpoint_id, direction, &pkt);
        if !overflow && let Some((slot, flags)) = ct_hit(&key, &pkt, direction, now) {
            remember_first_fragment(&pkt);
            // Every packet of an isolated client's Service flow is checked
            // after DNAT against the backend it was judged on: netfilter may
            // give the tuple another one (its entry expired or was flushed).
            if direction == DIR_EGRESS && isolated && flags & ct_flags::SERVICE != 0 {
                return to_service(ctx, &ep, ifindex, identity::WORLD, &pkt, false);
            }
            count(ep.endpoint_id, direction, reason::POLICY_ALLOWED, ctx.len());
            count_rule(slot, ctx.len());
            return TC_PASS;
        }

        let mut rule_cookie = 0;
        let mut stats_slot = 0;
        let mut remote_identity = identity::WORLD;
        if isolated {
            let remote = if direction == DIR_INGRESS { &pkt.src } else { &pkt.dst };
            remote_identity = lookup_identity(pkt.family, remote);
            // The node may always reach its pods (kubelet probes).
            if !(direction == DIR_INGRESS && remote_identity == identity::HOST) {
                // Egress to a Service: the verdict waits for the backend
                // kube-proxy picks (DNAT comes after this hook).
                if !overflow && direction == DIR_EGRESS && pkt.has_l4 && is_service(&pkt) {
                    // Its later fragments follow it to the Service.
                    remember_first_fragment(&pkt);
                    return to_service(ctx, &ep, ifindex, remote_identity, &pkt, true);
                }
                let lookup = if overflow {
                    None
                } else {
                    policy_lookup(ep.policy_id(), ep.generation, direction, remote_identity, remote, &pkt)
                };
                match lookup {
                    Some(v) => {
                        rule_cookie = v.rule_cookie;
                        stats_slot = v.stats_slot;
                    }
                    None => {
                        let why = if overflow { reason::NO_MAP_SPACE } else { reason::POLICY_DENIED };
                        return drop(ctx, &ep, ifindex, direction, remote_identity, why, Some(&pkt));
                    }
                }
            }
        }
        // A later fragment without a record has no ports: nothing to track.
        if pkt.has_l4 {
            // A flow opened from a Service address (a reply whose entry
            // expired, a forged source) is a Service flow: the endpoint's
            // packets on it are judged after DNAT like its own connections'.
            let backend = (direction == DIR_INGRESS && is_service_source(&pkt)).then_some(([0; 16], 0));
            ct_create(&key, &pkt, direction, PolicyValue { rule_cookie, stats_slot }, now, backend);
            remember_first_fragment(&pkt);
        }
        count(ep.endpoint_id, direction, reason::POLICY_ALLOWED, ctx.len());
        count_rule(stats_slot, ctx.len());
        if ep.flags & EP_REPORT_ALLOWED != 0 {
            emit(
                ctx,
                ep.endpoint_id,
                ifindex,
                direction,
                remote_identity,
                VERDICT_FORWARDED,
                reason::POLICY_ALLOWED,
                rule_cookie,
                Some(&pkt),
            );
        }
        TC_PASS
    }

    /// A later fragment takes the ports of its datagram's first fragment
    /// (recorded when that passed), and so follows its verdict. Without a
    /// record only rules without ports can admit it.
    #[inline(always)]
    fn follow_first_fragment(pkt: &mut Packet) {
        if pkt.fragment
            && !pkt.has_l4
            && let Some(first) = PC_FRAGS.get_ptr(&frag_key(pkt))
        {
            // SAFETY: the map value outlives this program run.
            let first = unsafe { *first };
            pkt.src_port = first.src_port;
            pkt.dst_port = first.dst_port;
            pkt.has_l4 = true;
        }
    }

    #[inline(always)]
    fn frag_key(pkt: &Packet) -> FragKey {
        FragKey {
            src_addr: pkt.src,
            dst_addr: pkt.dst,
            id: pkt.frag_id,
            family: pkt.family,
            protocol: pkt.protocol,
            _pad: [0; 2],
        }
    }

    /// A first fragment that passed leaves its ports for the later ones.
    #[inline(always)]
    fn remember_first_fragment(pkt: &Packet) {
        if pkt.fragment {
            let value = FragValue { src_port: pkt.src_port, dst_port: pkt.dst_port };
            // LRU: under pressure the oldest datagram's later fragments fall
            // back to rules without ports (fail closed).
            let _ = PC_FRAGS.insert(&frag_key(pkt), &value, 0);
        }
    }

    /// Is the packet's source one of the endpoint's addresses? IPv6
    /// link-local and unspecified sources never leave the link, so they pass.
    #[inline(always)]
    fn source_is_own(ifindex: u32, ep: &EndpointInfo, pkt: &Packet) -> bool {
        if pkt.family == AF_INET {
            if pkt.src[..4] == ep.ipv4 {
                return true;
            }
        } else if pkt.src == ep.ipv6
            || (pkt.src[0] == 0xfe && pkt.src[1] & 0xc0 == 0x80)
            || pkt.src == [0u8; 16]
        {
            return true;
        }
        let key = EndpointAddr { ifindex, family: pkt.family, _pad: [0; 3], addr: pkt.src };
        unsafe { PC_EP_ADDRS.get(&key) }.is_some()
    }

    /// The flow as the endpoint sees it: its own side first.
    #[inline(always)]
    fn ct_key(endpoint_id: u16, direction: u8, pkt: &Packet) -> CtKey {
        let egress = direction == DIR_EGRESS;
        CtKey {
            local_addr: if egress { pkt.src } else { pkt.dst },
            remote_addr: if egress { pkt.dst } else { pkt.src },
            local_port: if egress { pkt.src_port } else { pkt.dst_port },
            remote_port: if egress { pkt.dst_port } else { pkt.src_port },
            endpoint_id,
            family: pkt.family,
            protocol: pkt.protocol,
        }
    }

    /// Whether a live entry tracks the flow (without moving its state);
    /// a Service flow's only if `service_ok`.
    #[inline(always)]
    fn ct_related(key: &CtKey, now: u64, service_ok: bool) -> bool {
        // SAFETY: the map value stays valid for this program run.
        PC_CT.get_ptr(key).is_some_and(|e| unsafe {
            (*e).expires_ns > now && (service_ok || (*e).flags & ct_flags::SERVICE == 0)
        })
    }

    #[inline(always)]
    fn ct_lifetime(pkt: &Packet, flags: u8) -> u64 {
        if pkt.protocol != IPPROTO_TCP && flags & ct_flags::SERVICE != 0 {
            ct_timeout::SERVICE_OTHER_NS
        } else if pkt.protocol != IPPROTO_TCP {
            ct_timeout::OTHER_NS
        } else if flags & ct_flags::CLOSING != 0 {
            ct_timeout::TCP_CLOSING_NS
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            ct_timeout::TCP_ESTABLISHED_NS
        } else {
            ct_timeout::TCP_OPENING_NS
        }
    }

    #[inline(always)]
    fn tcp_closing(pkt: &Packet) -> bool {
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        pkt.protocol == IPPROTO_TCP && pkt.tcp_flags & (FIN | RST) != 0
    }

    /// Whether a live entry tracks the packet's flow; if so the packet moves
    /// the entry's state and expiry on. An expired entry passes nothing.
    #[inline(always)]
    /// Returns its counter slot.
    fn ct_hit(key: &CtKey, pkt: &Packet, direction: u8, now: u64) -> Option<(u32, u8)> {
        let entry = PC_CT.get_ptr_mut(key)?;
        // SAFETY: the map value stays valid for this program run; racing
        // writers only move the expiry, and either value is fine.
        let entry = unsafe { &mut *entry };
        if entry.expires_ns <= now {
            return None;
        }
        // A SYN from the side that opened the flow, once it was answered or
        // closed, opens a new connection on the same tuple (a port reused
        // after a RST): it is judged as new (netfilter may pick another
        // Service backend for it). A retransmitted SYN is not.
        if is_opening_syn(pkt)
            && direction == entry.origin
            && entry.flags & (ct_flags::CLOSING | ct_flags::SEEN_REPLY) != 0
        {
            return None;
        }
        let mut flags = entry.flags;
        if direction != entry.origin {
            flags |= ct_flags::SEEN_REPLY;
        }
        if tcp_closing(pkt) {
            flags |= ct_flags::CLOSING;
        }
        let expires = now + ct_lifetime(pkt, flags);
        if flags != entry.flags {
            entry.flags = flags;
            entry.expires_ns = expires;
        } else if expires > entry.expires_ns + ct_timeout::REFRESH_SLACK_NS {
            entry.expires_ns = expires;
        }
        Some((entry.stats_slot, flags))
    }

    /// A TCP SYN without ACK: the first packet of a connection.
    #[inline(always)]
    fn is_opening_syn(pkt: &Packet) -> bool {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        pkt.protocol == IPPROTO_TCP && pkt.has_l4 && pkt.tcp_flags & (SYN | ACK) == SYN
    }

    /// Tracks a new flow; `backend`: the Service backend it was allowed for.
    #[inline(always)]
    fn ct_create(
        key: &CtKey,
        pkt: &Packet,
        origin: u8,
        rule: PolicyValue,
        now: u64,
        backend: Option<([u8; 16], u16)>,
    ) {
        let mut flags = if tcp_closing(pkt) { ct_flags::CLOSING } else { 0 };
        let (nat_addr, nat_port) = match backend {
            Some(b) => {
                flags |= ct_flags::SERVICE;
                b
            }
            None => ([0; 16], 0),
        };
        let value = CtValue {
            created_ns: now,
            expires_ns: now + ct_lifetime(pkt, flags),
            rule_cookie: rule.rule_cookie,
            flags,
            origin,
            nat_port,
            nat_addr,
            stats_slot: rule.stats_slot,
            _pad: 0,
        };
        // A full table evicts its least recently used flow (LRU), whose next
        // packet then meets the policy again; this one was allowed either way.
        let _ = PC_CT.insert(key, &value, 0);
    }

    #[inline(always)]
    fn lookup_identity(family: u8, addr: &[u8; 16]) -> u32 {
        let key = Key::new(
            IpKey::HEADER_BITS + if family == AF_INET { 32 } else { 128 },
            IpKey { family, _pad: [0; 3], addr: *addr },
        );
        PC_IPCACHE.get(&key).copied().unwrap_or(identity::WORLD)
    }

    /// The entry of the rule allowing this packet (cookie and counter slot),
    /// if any: by the remote's
    /// identity, by any peer, or by the class of the longest prefix of the
    /// remote's address in the endpoint's CIDR trie.
    #[inline(always)]
    fn policy_lookup(
        policy_id: u16,
        generation: u8,
        direction: u8,
        remote: u32,
        remote_addr: &[u8; 16],
        pkt: &Packet,
    ) -> Option<PolicyValue> {
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
                policy_id,
                generation,
                direction,
                identity: remote,
                protocol,
                port: port.to_be_bytes(),
                _pad: 0,
            },
        );
        if let Some(v) = PC_POLICY.get(&key) {
            return Some(*v);
        }
        key.data.identity = identity::ANY;
        if let Some(v) = PC_POLICY.get(&key) {
            return Some(*v);
        }
        let bits = if pkt.family == AF_INET { 32 } else { 128 };
        let cidr = Key::new(
            CidrKey::HEADER_BITS + bits,
            CidrKey {
                policy_id,
                generation,
                direction,
                family: pkt.family,
                _pad: [0; 3],
                addr: *remote_addr,
            },
        );
        key.data.identity = *PC_CIDR.get(&cidr)?;
        PC_POLICY.get(&key).copied()
    }

    #[inline(always)]
    fn count(endpoint_id: u16, direction: u8, why: u8, len: u32) {
        let id = u32::from(endpoint_id);
        if id >= COUNTED_ENDPOINTS {
            return;
        }
        let slot = id * COUNTER_SLOTS + u32::from(direction & 1) * COUNTER_REASONS + (u32::from(why) & 7);
        if let Some(c) = PC_COUNTERS.get_ptr_mut(slot) {
            // SAFETY: this CPU's slot; no other writer while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += u64::from(len);
            }
        }
    }

    /// Counts a packet in the slot of the rule that allowed its flow (none
    /// for directions that are not isolated).
    #[inline(always)]
    fn count_rule(slot: u32, len: u32) {
        if slot == 0 {
            return;
        }
        if let Some(c) = PC_RULE_STATS.get_ptr_mut(slot) {
            // SAFETY: this CPU's slot; no other writer while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += u64::from(len);
            }
        }
    }

    #[inline(always)]
    fn drop(
        ctx: &SkBuff,
        ep: &EndpointInfo,
        ifindex: u32,
        direction: u8,
        remote_identity: u32,
        why: u8,
        pkt: Option<&Packet>,
    ) -> i32 {
        count(ep.endpoint_id, direction, why, ctx.len());
        emit(ctx, ep.endpoint_id, ifindex, direction, remote_identity, VERDICT_DROPPED, why, 0, pkt);
        TC_ACT_SHOT
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn emit(
        ctx: &SkBuff,
        endpoint_id: u16,
        ifindex: u32,
        direction: u8,
        remote_identity: u32,
        verdict: u8,
        why: u8,
        rule_cookie: u32,
        pkt: Option<&Packet>,
    ) {
        let Some(mut entry) = PC_FLOWS.reserve::<FlowEvent>(0) else {
            // Ring full: the verdict stands; the counters still see it.
            return;
        };
        // Written in place: a FlowEvent on the stack costs 72 of the
        // 512 bytes every hook that reports shares.
        let ev = entry.as_mut_ptr();
        // SAFETY: the reservation is ours and FlowEvent-sized until submitted.
        unsafe {
            core::ptr::write_bytes(ev, 0, 1);
            // SAFETY: plain helper call without arguments.
            (*ev).timestamp_ns = bpf_ktime_get_ns();
            (*ev).ifindex = ifindex;
            (*ev).remote_identity = remote_identity;
            (*ev).rule_cookie = rule_cookie;
            (*ev).packet_len = ctx.len();
            (*ev).endpoint_id = endpoint_id;
            (*ev).direction = direction;
            (*ev).verdict = verdict;
            (*ev).reason = why;
            if let Some(pkt) = pkt {
                (*ev).family = pkt.family;
                (*ev).protocol = pkt.protocol;
                (*ev).tcp_flags = pkt.tcp_flags;
                (*ev).src_port = pkt.src_port;
                (*ev).dst_port = pkt.dst_port;
                (*ev).src_addr = pkt.src;
                (*ev).dst_addr = pkt.dst;
            }
        }
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
