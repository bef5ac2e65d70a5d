//! Facts about the node the agent runs on: its addresses, and which interface
//! leads to a local pod (a host route to its address, or the bridge port its
//! MAC address is behind).

mod netlink;

pub use netlink::{Link, announced_links, links};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Every address configured on this network namespace's interfaces (but
/// IPv6 link-local ones, which are per link, not the node's).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = match netlink::addresses() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "reading the node's addresses");
            Vec::new()
        }
    };
    out.retain(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80));
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

    /// The device of the longest route to `ip` (not `lo`).
    pub fn device_for(&self, ip: IpAddr) -> Option<&str> {
        let dev = match ip {
            IpAddr::V4(a) => {
                let addr = u32::from(a);
                self.v4
                    .iter()
                    .filter(|(dest, mask, _)| addr & mask == *dest)
                    .max_by_key(|(_, mask, _)| mask.count_ones())
                    .map(|(_, _, d)| d)
            }
            IpAddr::V6(a) => {
                let addr = u128::from(a);
                let mask = |bits: u32| if bits == 0 { 0 } else { u128::MAX << (128 - bits.min(128)) };
                self.v6
                    .iter()
                    .filter(|(dest, bits, _)| addr & mask(*bits) == *dest)
                    .max_by_key(|(_, bits, _)| *bits)
                    .map(|(_, _, d)| d)
            }
        };
        dev.map(String::as_str).filter(|dev| *dev != "lo")
    }
}

/// Finds local pods' host-side interfaces: a host route to the pod's address
/// (routed veths, as kindnet and Calico make them), or, behind a bridge (the
/// bridge CNI plugin, flannel), the bridge port that forwards to the MAC
/// address the neighbour table has for it.
pub struct Interfaces {
    routes: Routes,
    neighbours: Vec<netlink::Neighbour>,
    forwarding: Vec<netlink::Forwarding>,
}

impl Interfaces {
    /// Reads the routes, neighbours and bridge forwarding entries once.
    pub fn read() -> Interfaces {
        let neighbours = netlink::neighbours().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the neighbour table");
            Vec::new()
        });
        let forwarding = netlink::forwarding().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading bridge forwarding entries");
            Vec::new()
        });
        Interfaces { routes: Routes::read(), neighbours, forwarding }
    }

    /// The host-side interface of the local pod with address `ip`.
    pub fn interface_for(&self, ip: IpAddr) -> Option<String> {
        if let Some(dev) = self.routes.interface_for(ip) {
            return Some(dev.to_string());
        }
        let bridge = crate::datapath::ifindex(self.routes.device_for(ip)?)?;
        let mac = self.neighbours.iter().find(|n| n.ifindex == bridge && n.ip == ip)?.mac;
        let port = self.forwarding.iter().find(|f| f.master == bridge && f.mac == mac)?.port;
        crate::datapath::ifname(port)
    }

    /// Whether `ip` lies behind a bridge of this node without a neighbour
    /// entry yet: `resolve` makes the kernel look it up.
    pub fn unresolved_on_bridge(&self, ip: IpAddr) -> bool {
        let Some(bridge) = self.routes.device_for(ip).and_then(crate::datapath::ifindex) else {
            return false;
        };
        self.forwarding.iter().any(|f| f.master == bridge) && !self.neighbours.iter().any(|n| n.ip == ip)
    }
}

/// Sends one datagram to `ip` (port 9, discard) so the kernel resolves its
/// neighbour entry; the next pass then finds the pod's bridge port.
pub fn resolve(ip: IpAddr) {
    let bind: std::net::SocketAddr =
        if ip.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    if let Ok(socket) = std::net::UdpSocket::bind(bind) {
        let _ = socket.send_to(b"", (ip, 9));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_route_names_the_device_and_only_host_routes_name_endpoints() {
        let routes = Routes {
            v4: vec![
                (0, 0, "eth0".into()),
                (u32::from(Ipv4Addr::new(10, 64, 0, 0)), 0xffff_0000, "cni0".into()),
                (u32::from(Ipv4Addr::new(10, 64, 0, 7)), u32::MAX, "lxc7".into()),
            ],
            v6: vec![(0xfd00_0064u128 << 96, 64, "cni0".into())],
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(routes.device_for(ip("10.64.3.4")), Some("cni0"));
        assert_eq!(routes.device_for(ip("192.0.2.1")), Some("eth0"));
        assert_eq!(routes.device_for(ip("fd00:64::5")), Some("cni0"));
        assert_eq!(routes.interface_for(ip("10.64.0.7")), Some("lxc7"));
        assert_eq!(routes.interface_for(ip("10.64.3.4")), None, "a subnet route names no endpoint");
    }

    #[test]
    fn the_neighbour_and_forwarding_tables_can_be_read() {
        assert!(netlink::neighbours().is_ok());
        assert!(netlink::forwarding().is_ok());
    }

    #[test]
    fn loopback_is_a_local_address_and_no_endpoint() {
        assert!(local_addresses().contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert_eq!(Routes::read().interface_for(IpAddr::V4(Ipv4Addr::LOCALHOST)), None);
    }
}
