//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`: the headers the datapath
//! parses, with lengths right and checksums zero (TC programs do not check them).

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
/// IPv6 authentication header.
pub const AH: u8 = 51;
pub const FRAGMENT: u8 = 44;

const SYN: u8 = 0x02;

/// One frame, built up layer by layer.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// ICMP/ICMPv6 type.
    pub icmp_type: u8,
    /// IPv6 extension headers to put before L4, by type (0 hop-by-hop, 43
    /// routing, 60 destination options: 8 bytes each; 51 AH: 24 bytes).
    pub v6_ext: Vec<u8>,
    /// IPv4 TTL or IPv6 hop limit.
    pub hop_limit: u8,
    /// IPv4 fragment offset in 8-byte units (non-zero: a later fragment).
    pub frag_offset: u16,
    /// Cut the frame to this many bytes.
    pub truncate: Option<usize>,
    /// TCP flags (SYN by default).
    pub tcp_flags: u8,
    /// IPv4 identification / IPv6 fragment identification.
    pub ip_id: u32,
    /// The more-fragments flag (IPv4 header, or the IPv6 fragment header
    /// when `v6_ext` has one, type 44).
    pub more_fragments: bool,
    /// For ICMP errors: the quoted packet after the 8-byte ICMP header.
    pub icmp_payload: Vec<u8>,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, protocol: u8, dst_port: u16) -> Frame {
        Frame {
            src,
            dst,
            protocol,
            src_port: 40000,
            dst_port,
            icmp_type: 0,
            v6_ext: Vec::new(),
            frag_offset: 0,
            truncate: None,
            hop_limit: 64,
            tcp_flags: SYN,
            ip_id: 1,
            more_fragments: false,
            icmp_payload: Vec::new(),
        }
    }

    pub fn tcp(src: IpAddr, dst: IpAddr, dst_port: u16) -> Frame {
        Frame::new(src, dst, TCP, dst_port)
    }

    pub fn udp(src: IpAddr, dst: IpAddr, dst_port: u16) -> Frame {
        Frame::new(src, dst, UDP, dst_port)
    }

    pub fn icmp(src: IpAddr, dst: IpAddr, icmp_type: u8) -> Frame {
        let protocol = if src.is_ipv4() { ICMP } else { ICMPV6 };
        Frame { icmp_type, ..Frame::new(src, dst, protocol, 0) }
    }

    /// An ICMP port unreachable (ICMPv6: destination unreachable, port)
    /// from `src` to `dst` about `quoted`: its IP header and 8 bytes more.
    pub fn icmp_error(src: IpAddr, dst: IpAddr, quoted: &Frame) -> Frame {
        let bytes = quoted.bytes();
        let ip_len = if quoted.src.is_ipv4() { 20 } else { 40 };
        let end = (14 + ip_len + 8).min(bytes.len());
        let icmp_type = if src.is_ipv4() { 3 } else { 1 };
        Frame { icmp_payload: bytes[14..end].to_vec(), ..Frame::icmp(src, dst, icmp_type) }
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        match self.protocol {
            TCP => {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&self.dst_port.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            UDP => {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&self.dst_port.to_be_bytes());
                l4.extend_from_slice(&12u16.to_be_bytes());
                l4.extend_from_slice(&[0, 0, b'p', b'i', b'n', b'g']);
            }
            SCTP => {
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&self.dst_port.to_be_bytes());
                l4.extend_from_slice(&[0; 8]); // verification tag, checksum
            }
            _ => {
                // Type, code, checksum, then the echo identifier (`src_port`)
                // and sequence; an error's quote follows.
                l4.extend_from_slice(&[self.icmp_type, 0, 0, 0]);
                l4.extend_from_slice(&self.src_port.to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.icmp_payload);
            }
        }
        l4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4();
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let total = (20 + l4.len()) as u16;
                f.extend_from_slice(&[0x45, 0]);
                f.extend_from_slice(&total.to_be_bytes());
                f.extend_from_slice(&(self.ip_id as u16).to_be_bytes());
                let mf = if self.more_fragments { 0x2000 } else { 0 };
                f.extend_from_slice(&((self.frag_offset & 0x1fff) | mf).to_be_bytes());
                f.extend_from_slice(&[self.hop_limit, self.protocol, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let ext_len: usize = self.v6_ext.iter().map(|&t| if t == AH { 24 } else { 8 }).sum();
                let payload = (ext_len + l4.len()) as u16;
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&payload.to_be_bytes());
                let first = self.v6_ext.first().copied().unwrap_or(self.protocol);
                f.extend_from_slice(&[first, self.hop_limit]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
                for (i, &ty) in self.v6_ext.iter().enumerate() {
                    let next = self.v6_ext.get(i + 1).copied().unwrap_or(self.protocol);
                    if ty == AH {
                        // Length in 4-byte units minus 2: 24 bytes.
                        f.extend_from_slice(&[next, 4, 0, 0]);
                        f.extend_from_slice(&[0; 20]);
                    } else if ty == FRAGMENT {
                        let field = (self.frag_offset << 3) | u16::from(self.more_fragments);
                        f.extend_from_slice(&[next, 0]);
                        f.extend_from_slice(&field.to_be_bytes());
                        f.extend_from_slice(&self.ip_id.to_be_bytes());
                    } else {
                        // Options header, 8 bytes: PadN.
                        f.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
                    }
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend_from_slice(&l4);
        if let Some(n) = self.truncate {
            f.truncate(n);
        }
        f
    }
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 10, 0, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 0, 2]);
    f
}
