//! Header parsing for the verdict: L3 addresses, L4 protocol and ports.
//! Reads the packet directly where the headers are in the skb's linear part
//! (nearly always), and with `bpf_skb_load_bytes` where they are not, so
//! non-linear skbs parse like linear ones.

use aya_ebpf::programs::sk_buff::SkBuff;
use portcullis_common::{
    AF_INET, AF_INET6, CtKey, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

const IPV6_HLEN: usize = 40;
/// IPv6 extension headers walked before giving up (Cilium uses 4 too).
const IPV6_MAX_EXT: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

pub struct Packet {
    pub family: u8,
    pub protocol: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type, when `protocol` is one of them.
    pub icmp_type: u8,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// False for a non-first fragment: it carries no L4 header.
    pub has_l4: bool,
    /// Part of a fragmented datagram (first or later fragment).
    pub fragment: bool,
    /// IPv4 identification or IPv6 fragment identification, when `fragment`.
    pub frag_id: u32,
    /// For an ICMP error: the offset of the packet it quotes (0: none).
    pub quoted_off: u16,
}

pub enum Parsed {
    Ip(Packet),
    Arp,
    /// An ethertype the verdict does not understand.
    OtherL3,
    /// Truncated or inconsistent headers.
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &SkBuff, off: usize) -> Option<T> {
    // SAFETY: the kernel hands the program a valid __sk_buff.
    let (start, end) = unsafe { ((*ctx.skb).data as usize, (*ctx.skb).data_end as usize) };
    // At least two bytes: LLVM turns `p + 1 <= end` into `p < end`, which
    // the verifier does not take as a bound. A last lone byte takes the
    // helper path.
    let need = if core::mem::size_of::<T>() < 2 { 2 } else { core::mem::size_of::<T>() };
    if start + off + need <= end {
        // SAFETY: in bounds of the linear packet data, checked just above
        // (the verifier checks it again); headers need not be aligned.
        return Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) });
    }
    ctx.load::<T>(off).ok()
}

/// A frame that starts with its Ethernet header (veths, Ethernet devices).
#[inline(always)]
pub fn parse(ctx: &SkBuff) -> Parsed {
    let Some(proto) = load::<u16>(ctx, 12) else {
        return Parsed::Malformed;
    };
    match u16::from_be(proto) {
        ETH_P_IP => parse_v4(ctx, ETH_HLEN),
        ETH_P_IPV6 => parse_v6(ctx, ETH_HLEN),
        ETH_P_ARP => Parsed::Arp,
        _ => Parsed::OtherL3,
    }
}

/// A packet that starts with its IP header: devices without a link-layer
/// header (WireGuard, IPIP, tun) and socket-level hooks. The family comes
/// from the skb's protocol, which the kernel set, not the sender.
#[inline(always)]
pub fn parse_l3(ctx: &SkBuff) -> Parsed {
    match u16::from_be(ctx.protocol() as u16) {
        ETH_P_IP => parse_v4(ctx, 0),
        ETH_P_IPV6 => parse_v6(ctx, 0),
        _ => Parsed::OtherL3,
    }
}

#[inline(always)]
fn parse_v4(ctx: &SkBuff, l3: usize) -> Parsed {
    let Some(vihl) = load::<u8>(ctx, l3) else {
        return Parsed::Malformed;
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let (Some(id), Some(frag), Some([ttl, protocol]), Some(src4), Some(dst4)) = (
        load::<u16>(ctx, l3 + 4),
        load::<u16>(ctx, l3 + 6),
        load::<[u8; 2]>(ctx, l3 + 8),
        load::<[u8; 4]>(ctx, l3 + 12),
        load::<[u8; 4]>(ctx, l3 + 16),
    ) else {
        return Parsed::Malformed;
    };
    let mut pkt = Packet {
        family: AF_INET,
        protocol,
        src: [0; 16],
        dst: [0; 16],
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        hop_limit: ttl,
        has_l4: u16::from_be(frag) & 0x1fff == 0,
        // More fragments, or an offset: a piece of a larger datagram.
        fragment: u16::from_be(frag) & 0x3fff != 0,
        frag_id: u32::from(u16::from_be(id)),
        quoted_off: 0,
    };
    pkt.src[..4].copy_from_slice(&src4);
    pkt.dst[..4].copy_from_slice(&dst4);
    // ihl is at most 60, which keeps the offset bounded for the verifier.
    parse_l4(ctx, l3 + (ihl & 0x3c), pkt)
}

#[inline(always)]
fn parse_v6(ctx: &SkBuff, l3: usize) -> Parsed {
    let (Some([mut next, hop_limit]), Some(src), Some(dst)) =
        (load::<[u8; 2]>(ctx, l3 + 6), load::<[u8; 16]>(ctx, l3 + 8), load::<[u8; 16]>(ctx, l3 + 24))
    else {
        return Parsed::Malformed;
    };
    let mut off = l3 + IPV6_HLEN;
    let mut has_l4 = true;
    let mut fragment = false;
    let mut frag_id = 0;
    for _ in 0..IPV6_MAX_EXT {
        let current = next;
        match current {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                let Some(hdr) = load::<[u8; 2]>(ctx, off) else {
                    return Parsed::Malformed;
                };
                next = hdr[0];
                // Sized by its own type: AH counts 4-byte units, the rest 8.
                off += if current == NEXTHDR_AUTH {
                    (hdr[1] as usize + 2) * 4
                } else {
                    (hdr[1] as usize + 1) * 8
                };
            }
            NEXTHDR_FRAGMENT => {
                let Some(hdr) = load::<[u8; 8]>(ctx, off) else {
                    return Parsed::Malformed;
                };
                next = hdr[0];
                off += 8;
                fragment = true;
                frag_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 {
                    // A later fragment: what follows is payload, not headers.
                    has_l4 = false;
                    break;
                }
            }
            _ => break,
        }
    }
    if has_l4
        && matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT)
    {
        // More extension headers than we walk: cannot find the ports.
        return Parsed::Malformed;
    }
    let pkt = Packet {
        family: AF_INET6,
        protocol: next,
        src,
        dst,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        icmp_type: 0,
        hop_limit,
        has_l4,
        fragment,
        frag_id,
        quoted_off: 0,
    };
    // Keep the offset provably bounded for the verifier.
    if off > 512 {
        return Parsed::Malformed;
    }
    parse_l4(ctx, off, pkt)
}

#[inline(always)]
fn parse_l4(ctx: &SkBuff, off: usize, mut pkt: Packet) -> Parsed {
    if !pkt.has_l4 {
        return Parsed::Ip(pkt);
    }
    match pkt.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let Some(ports) = load::<[u16; 2]>(ctx, off) else {
                return Parsed::Malformed;
            };
            pkt.src_port = u16::from_be(ports[0]);
            pkt.dst_port = u16::from_be(ports[1]);
            if pkt.protocol == IPPROTO_TCP {
                let Some(flags) = load::<u8>(ctx, off + 13) else {
                    return Parsed::Malformed;
                };
                pkt.tcp_flags = flags;
            }
        }
        // ICMP only over IPv4 and ICMPv6 only over IPv6: protocol 58 in an
        // IPv4 header is no neighbour discovery and quotes no flow.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if is_icmp_of_family(pkt.family, pkt.protocol) => {
            let Some(ty) = load::<u8>(ctx, off) else {
                return Parsed::Malformed;
            };
            pkt.icmp_type = ty;
            if is_echo(pkt.protocol, ty) {
                // The identifier stands in for both ports: request and reply
                // then have mirrored tuples, as TCP and UDP flows do.
                let Some(id) = load::<u16>(ctx, off + 4) else {
                    return Parsed::Malformed;
                };
                pkt.src_port = u16::from_be(id);
                pkt.dst_port = pkt.src_port;
            } else if is_error(pkt.protocol, ty) {
                // The quoted packet follows the 8-byte ICMP header. One we
                // cannot read is no malformation: the error is then judged
                // on its own.
                // Read later, and only when it matters (`quoted_key`).
                pkt.quoted_off = (off + 8) as u16;
            }
        }
        _ => {}
    }
    Parsed::Ip(pkt)
}

/// Whether `protocol` is the ICMP of the packet's own family.
#[inline(always)]
pub fn is_icmp_of_family(family: u8, protocol: u8) -> bool {
    (family == AF_INET && protocol == IPPROTO_ICMP) || (family == AF_INET6 && protocol == IPPROTO_ICMPV6)
}

/// Errors that quote the packet they report on: destination unreachable
/// (incl. fragmentation needed), time exceeded, parameter problem; ICMPv6
/// also packet too big.
#[inline(always)]
fn is_error(protocol: u8, ty: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => matches!(ty, 3 | 11 | 12),
        _ => matches!(ty, 1..=4),
    }
}

/// The conntrack key of the flow an ICMP error quotes (its IP header and the
/// first bytes of its transport header), as endpoint `endpoint_id` sees that
/// flow. Coming in (`ingress`), the error reports on a packet the endpoint
/// sent; going out, on one it received. `None` when there is no quote or it
/// cannot be read.
#[inline(always)]
pub fn quoted_key(ctx: &SkBuff, pkt: &Packet, endpoint_id: u16, ingress: bool) -> Option<CtKey> {
    let off = pkt.quoted_off as usize;
    if off == 0 || off > 512 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (protocol, l4) = if pkt.family == AF_INET {
        let vihl = load::<u8>(ctx, off)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        src[..4].copy_from_slice(&load::<[u8; 4]>(ctx, off + 12)?);
        dst[..4].copy_from_slice(&load::<[u8; 4]>(ctx, off + 16)?);
        (load::<u8>(ctx, off + 9)?, off + (ihl & 0x3c))
    } else {
        // Extension headers in the quoted packet are not walked.
        src = load::<[u8; 16]>(ctx, off + 8)?;
        dst = load::<[u8; 16]>(ctx, off + 24)?;
        (load::<u8>(ctx, off + 6)?, off + IPV6_HLEN)
    };
    let head = load::<[u8; 6]>(ctx, l4)?;
    let (src_port, dst_port) = match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            (u16::from_be_bytes([head[0], head[1]]), u16::from_be_bytes([head[2], head[3]]))
        }
        // An error about an echo request: the identifier is its "port".
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if is_icmp_of_family(pkt.family, protocol) && is_echo(protocol, head[0]) =>
        {
            let id = u16::from_be_bytes([head[4], head[5]]);
            (id, id)
        }
        _ => return None,
    };
    Some(CtKey {
        local_addr: if ingress { src } else { dst },
        remote_addr: if ingress { dst } else { src },
        local_port: if ingress { src_port } else { dst_port },
        remote_port: if ingress { dst_port } else { src_port },
        endpoint_id,
        family: pkt.family,
        protocol,
    })
}

/// ICMP or ICMPv6 echo request or reply.
#[inline(always)]
fn is_echo(protocol: u8, ty: u8) -> bool {
    match protocol {
        IPPROTO_ICMP => ty == 0 || ty == 8,
        _ => ty == 128 || ty == 129,
    }
}
