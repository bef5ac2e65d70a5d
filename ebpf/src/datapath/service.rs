//! Services: a packet to a Service frontend leaves the client's veth
//! marked, its record kept; the first of our hooks it meets after
//! kube-proxy's DNAT gives the client's egress verdict on the backend.
//! This concern owns its maps: the frontends the agent mirrors, the
//! records, and each CPU's last record.

use super::*;

#[map]
static PC_SERVICES: HashMap<ServiceKey, u32> = HashMap::pinned(map_sizes::SERVICES, 0);

#[map]
static PC_SVC_PENDING: LruHashMap<PendingKey, PendingValue> = LruHashMap::pinned(map_sizes::SVC_PENDING, 0);

/// The Service packet this CPU marked last (see `PendingSlot`).
#[map]
static PC_SVC_LAST: PerCpuArray<PendingSlot> = PerCpuArray::pinned(1, 0);

/// Whether the packet carries this node's "Service verdict pending"
/// mark: the magic and this node's tag (set by `from_container`).
#[inline(always)]
pub(super) fn is_our_pending_mark(skb: &SkBuff) -> bool {
    let tag = node_tag();
    let m = skb_mark(skb);
    // Endpoint ids start at 1: WireGuard's 0xca6c (magic nibble and,
    // on one node in 255, the tag too) names none.
    tag != 0 && m & mark::MAGIC_MASK == mark::SERVICE_PENDING | tag && m >> mark::ENDPOINT_SHIFT != 0
}

/// A marked packet we cannot read after DNAT: the client's verdict
/// cannot be given, so it fails closed.
#[inline(always)]
pub(super) fn pending_unparsed(skb: &SkBuff) -> i32 {
    let m = skb_mark(skb);
    skb.set_mark(m & !mark::MASK);
    let client = (m >> mark::ENDPOINT_SHIFT) as u16;
    count(client, DIR_EGRESS, reason::MALFORMED, skb.len());
    emit(skb, client, 0, DIR_EGRESS, identity::WORLD, VERDICT_DROPPED, reason::MALFORMED, 0, None);
    TC_ACT_SHOT
}

/// Whether the packet goes to a mirrored Service frontend.
#[inline(always)]
pub(super) fn is_service(pkt: &Packet) -> bool {
    is_frontend(pkt.family, pkt.protocol, &pkt.dst, pkt.dst_port)
}

/// Whether the packet comes from a mirrored Service frontend.
#[inline(always)]
pub(super) fn is_service_source(pkt: &Packet) -> bool {
    is_frontend(pkt.family, pkt.protocol, &pkt.src, pkt.src_port)
}

/// A frontend by its address, or, for the node's loopback and IPv6
/// link-local addresses (where kube-proxy serves NodePorts too), under
/// the unspecified address.
#[inline(always)]
fn is_frontend(family: u8, protocol: u8, addr: &[u8; 16], port: u16) -> bool {
    let mut service = ServiceKey { family, protocol, port, addr: *addr };
    if unsafe { PC_SERVICES.get(&service) }.is_some() {
        return true;
    }
    let local_only =
        if family == AF_INET { addr[0] == 127 } else { addr[0] == 0xfe && addr[1] & 0xc0 == 0x80 };
    if !local_only {
        return false;
    }
    service.addr = [0; 16];
    unsafe { PC_SERVICES.get(&service) }.is_some()
}

/// A packet to a Service goes on marked, its verdict due after DNAT; or
/// is dropped when it cannot be marked (the verdict would fail closed).
#[inline(always)]
pub(super) fn to_service(
    ctx: &SkBuff,
    ep: &EndpointInfo,
    ifindex: u32,
    remote_identity: u32,
    pkt: &Packet,
    new_flow: bool,
) -> i32 {
    if mark_service(ctx, ep, pkt, new_flow) {
        TC_PASS
    } else {
        drop(ctx, ep, ifindex, DIR_EGRESS, remote_identity, reason::NO_MAP_SPACE, Some(pkt))
    }
}

/// Records a packet to a Service address and marks it, so the hook that
/// sees it after DNAT gives the client's egress verdict on the backend.
/// False when this node has no mark tag yet (the verdict could not be
/// given: the caller drops).
#[inline(always)]
fn mark_service(skb: &SkBuff, ep: &EndpointInfo, pkt: &Packet, new_flow: bool) -> bool {
    let tag = node_tag();
    if tag == 0 {
        return false;
    }
    let value = PendingValue {
        dst_addr: pkt.dst,
        dst_port: pkt.dst_port,
        generation: ep.generation,
        _pad: 0,
        flags: ep.flags,
        policy_id: ep.policy_id(),
        _pad2: [0; 2],
    };
    let key = pending_key(ep.endpoint_id, &pkt.src, pkt);
    if let Some(last) = PC_SVC_LAST.get_ptr_mut(0) {
        // SAFETY: this CPU's slot; no other writer while we run.
        unsafe { *last = PendingSlot { key, value } };
    }
    // A new connection's record also goes in the shared table, for
    // the rare path that leaves this CPU before DNAT's hook (a datagram
    // reassembled on another). LRU: a full table evicts the oldest,
    // whose verdict then fails closed.
    if new_flow {
        let _ = PC_SVC_PENDING.insert(&key, &value, 0);
    }
    let m = skb_mark(skb) & !mark::MASK;
    skb.set_mark(m | mark::SERVICE_PENDING | tag | (u32::from(ep.endpoint_id) << mark::ENDPOINT_SHIFT));
    true
}

#[inline(always)]
fn pending_key(endpoint_id: u16, src: &[u8; 16], pkt: &Packet) -> PendingKey {
    PendingKey {
        src_addr: *src,
        src_port: pkt.src_port,
        endpoint_id,
        family: pkt.family,
        protocol: pkt.protocol,
        _pad: [0; 2],
    }
}

/// The client's egress verdict for a marked packet after DNAT: the
/// destination is now the backend. Allowed: the connection is tracked
/// under the address the client used, so its later packets and the
/// replies (un-DNATed, from the Service address) pass. Clears our mark.
/// Where SNAT replaced the source (masquerade toward a backend off the
/// node, a pod reaching its own Service) but kept the port, as it does
/// when it can, the record is found under the client's own address.
#[inline(always)]
pub(super) fn pending_service_verdict(skb: &SkBuff, pkt: &Packet) -> i32 {
    let m = skb_mark(skb);
    skb.set_mark(m & !mark::MASK);
    let client = (m >> mark::ENDPOINT_SHIFT) as u16;
    let remote_identity = lookup_identity(pkt.family, &pkt.dst);
    // This packet's own record: left by `from_container` on this CPU in
    // this same pass (whatever SNAT did since), else in the shared table
    // under the packet's source, copied into this CPU's slot. Read in
    // place: copies on the stack push `to_container` past its limit.
    let Some(slot) = PC_SVC_LAST.get_ptr_mut(0) else {
        return service_drop(skb, client, remote_identity, reason::NO_MAP_SPACE, pkt);
    };
    // SAFETY: this CPU's slot; no other writer while we run.
    let rec = unsafe { &mut *slot };
    if !(rec.key.endpoint_id == client && rec.key.family == pkt.family && rec.key.protocol == pkt.protocol) {
        let key = pending_key(client, &pkt.src, pkt);
        let Some(found) = PC_SVC_PENDING.get_ptr(&key) else {
            return service_drop(skb, client, remote_identity, reason::NO_MAP_SPACE, pkt);
        };
        rec.key = key;
        // SAFETY: the map value outlives this program run.
        rec.value = unsafe { *found };
    }
    if rec.value.flags & EP_POLICY_OVERFLOW != 0 {
        return service_drop(skb, client, remote_identity, reason::NO_MAP_SPACE, pkt);
    }
    let ct = CtKey {
        local_addr: rec.key.src_addr,
        remote_addr: rec.value.dst_addr,
        local_port: rec.key.src_port,
        remote_port: rec.value.dst_port,
        endpoint_id: client,
        family: pkt.family,
        protocol: pkt.protocol,
    };
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // A tracked connection going to the backend it was judged on passes
    // (its record is refreshed by each packet; never removed, so the
    // next packet never misses it).
    if let Some(e) = PC_CT.get_ptr(&ct) {
        // SAFETY: the map value outlives this program run.
        let e = unsafe { &*e };
        // (A new connection on a reused tuple is tracked afresh.)
        let reopened = is_opening_syn(pkt) && e.flags & (ct_flags::CLOSING | ct_flags::SEEN_REPLY) != 0;
        if e.flags & ct_flags::SERVICE != 0
            && e.expires_ns > now
            && e.nat_port == pkt.dst_port
            && e.nat_addr == pkt.dst
            && !reopened
        {
            remember_first_fragment(pkt);
            count(client, DIR_EGRESS, reason::POLICY_ALLOWED, skb.len());
            count_rule(e.stats_slot, skb.len());
            return TC_PASS;
        }
    }
    // Records from before policy sets have no set: the client's own id.
    let policy = if rec.value.policy_id != 0 { rec.value.policy_id } else { client };
    let Some(allowed) =
        policy_lookup(policy, rec.value.generation, DIR_EGRESS, remote_identity, &pkt.dst, pkt)
    else {
        return service_drop(skb, client, remote_identity, reason::POLICY_DENIED, pkt);
    };
    ct_create(&ct, pkt, DIR_EGRESS, allowed, now, Some((pkt.dst, pkt.dst_port)));
    // Netfilter may fragment the datagram again after DNAT: its later
    // fragments (marked like the first) find their ports here.
    remember_first_fragment(pkt);
    count(client, DIR_EGRESS, reason::POLICY_ALLOWED, skb.len());
    count_rule(allowed.stats_slot, skb.len());
    if rec.value.flags & EP_REPORT_ALLOWED != 0 {
        emit(
            skb,
            client,
            0,
            DIR_EGRESS,
            remote_identity,
            VERDICT_FORWARDED,
            reason::POLICY_ALLOWED,
            allowed.rule_cookie,
            Some(pkt),
        );
    }
    TC_PASS
}

#[inline(always)]
fn service_drop(skb: &SkBuff, client: u16, remote_identity: u32, why: u8, pkt: &Packet) -> i32 {
    emit(skb, client, 0, DIR_EGRESS, remote_identity, VERDICT_DROPPED, why, 0, Some(pkt));
    count(client, DIR_EGRESS, why, skb.len());
    TC_ACT_SHOT
}
