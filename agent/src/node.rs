//! Facts about the node the agent runs on: its addresses, and which interface
//! leads to a local pod (the host route to its address: routed veths, as
//! kindnet and Calico make them; bridged networks come with the Kubernetes
//! issue).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every address configured on this network namespace's interfaces.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    // Link-local addresses are per link, not the node's.
                    if ip.segments()[0] & 0xffc0 != 0xfe80 {
                        out.push(IpAddr::V6(ip));
                    }
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

/// The main routing table of this network namespace, read once.
pub struct Routes {
    v4: Vec<(u32, u32, String)>,
    v6: Vec<(u128, u32, String)>,
}

impl Routes {
    pub fn read() -> Routes {
        let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
        let v4 = v4
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                // Destination and mask are little-endian hex.
                let dest = u32::from_str_radix(f.get(1)?, 16).ok()?.swap_bytes();
                let mask = u32::from_str_radix(f.get(7)?, 16).ok()?.swap_bytes();
                Some((dest, mask, f[0].to_string()))
            })
            .collect();
        let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        let v6 = v6
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let dest = u128::from_str_radix(f.first()?, 16).ok()?;
                let bits = u32::from_str_radix(f.get(1)?, 16).ok()?;
                Some((dest, bits, f.get(9)?.to_string()))
            })
            .collect();
        Routes { v4, v6 }
    }

    /// The interface a host route (/32, /128) to `ip` points at: a routed
    /// pod's host-side veth. Wider routes (a default route, a bridge's
    /// subnet) never name an endpoint: attaching there would police the
    /// node's own traffic.
    pub fn interface_for(&self, ip: IpAddr) -> Option<&str> {
        let dev = match ip {
            IpAddr::V4(a) => {
                let addr = u32::from(a);
                self.v4.iter().find(|(dest, mask, _)| *mask == u32::MAX && addr == *dest).map(|(_, _, d)| d)
            }
            IpAddr::V6(a) => {
                let addr = u128::from(a);
                self.v6.iter().find(|(dest, bits, _)| *bits == 128 && addr == *dest).map(|(_, _, d)| d)
            }
        };
        dev.map(String::as_str).filter(|dev| *dev != "lo")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_local_address_and_no_endpoint() {
        assert!(local_addresses().contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(Routes::read().interface_for(IpAddr::V4(Ipv4Addr::LOCALHOST)), None);
    }
}
