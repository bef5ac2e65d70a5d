//! The Service verdict on the node's own devices.
//!
//! A pod's packet to a Service is judged after kube-proxy's DNAT, on the
//! backend it goes to. A local backend's veth does that itself; a packet to
//! any other backend leaves through one of the node's devices (its uplink,
//! a tunnel, a bridge, WireGuard), so every device that is not an
//! endpoint's carries `to_netdev` on its egress, as a tc filter at the
//! endpoints' priority and handle (an endpoint attached to the same
//! interface later replaces it in place). No operator flag names them: the
//! agent reads the node's links once a second and whenever the kernel
//! announces a new one.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::AsFd as _,
    os::fd::AsRawFd as _,
};

use portcullis_common::program_names;

use super::{
    AttachError, Datapath, DatapathError,
    attach::{FILTER_HANDLE_RAW, FILTER_PRIORITY},
    classifier, tc_netlink,
};
use crate::{node::Link, rtnetlink};

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// `RTNLGRP_LINK` as a group bit (`RTMGRP_LINK`).
const RTMGRP_LINK: u32 = 0x1;

/// The program a node device gets, by its link type; `None` for loopback,
/// which no packet to a backend leaves through. Ethernet devices (veths,
/// bridges, VXLAN, the uplink) get `to_netdev`; every other type
/// `to_netdev_l3`, right for those whose packets start with the IP header
/// (WireGuard, tun, IPIP, SIT, GRE) and fail-closed for the rest (PPP,
/// InfiniBand): a marked packet it cannot read is dropped, unmarked ones
/// pass untouched.
pub fn netdev_program(link: &Link) -> Option<&'static str> {
    match link.link_type {
        ARPHRD_ETHER => Some(program_names::TO_NETDEV),
        ARPHRD_LOOPBACK => None,
        _ => Some(program_names::TO_NETDEV_L3),
    }
}

/// Node devices whose hook failed, with why.
pub type NetdevFailures = Vec<(String, AttachError)>;

impl Datapath {
    /// Gives every link of `links` that is no endpoint's interface the
    /// Service hook (once; again after someone removed it), and forgets
    /// links that are gone or became endpoints.
    /// `endpoint_interfaces`: the interfaces the current state places
    /// endpoints on (one recreated under its name has a new index the
    /// loaded endpoints do not know yet).
    pub fn sync_node_devices(
        &mut self,
        links: &[Link],
        endpoint_interfaces: &BTreeSet<&str>,
    ) -> NetdevFailures {
        let endpoints: BTreeSet<u32> = self.loaded.endpoints.values().map(|e| e.ifindex).collect();
        let current: BTreeMap<u32, &Link> = links
            .iter()
            .filter(|l| !endpoints.contains(&l.ifindex) && !endpoint_interfaces.contains(l.name.as_str()))
            .map(|l| (l.ifindex, l))
            .collect();
        // Gone, renamed (the index handed to another interface), or an
        // endpoint's now (its own filters replaced ours).
        self.node_devices.retain(|idx, name| current.get(idx).is_some_and(|l| &l.name == name));
        let mut failures = Vec::new();
        for program in [program_names::TO_NETDEV, program_names::TO_NETDEV_L3] {
            let wanted: Vec<&Link> = current
                .values()
                .filter(|l| netdev_program(l) == Some(program) && !self.node_devices.contains_key(&l.ifindex))
                .copied()
                .collect();
            if wanted.is_empty() {
                continue;
            }
            let ifindexes: Vec<u32> = wanted.iter().map(|l| l.ifindex).collect();
            let results = match self.attach_netdev_filters(program, &ifindexes) {
                Ok(r) => r,
                Err(e) => {
                    let why = e.to_string();
                    for l in &wanted {
                        failures.push((
                            l.name.clone(),
                            AttachError::Datapath(DatapathError::Program {
                                name: program,
                                source: aya::programs::ProgramError::IOError(io::Error::other(why.clone())),
                            }),
                        ));
                    }
                    continue;
                }
            };
            for (link, result) in wanted.iter().zip(results) {
                match result {
                    Ok(()) => {
                        // A pod's veth (not an endpoint yet, or never) is routine.
                        if link.kind.as_deref() == Some("veth") {
                            tracing::debug!(interface = %link.name, program, "Service verdicts on a node device");
                        } else {
                            tracing::info!(interface = %link.name, program, "Service verdicts on a node device");
                        }
                        self.node_devices.insert(link.ifindex, link.name.clone());
                    }
                    Err(source) => failures
                        .push((link.name.clone(), AttachError::Filters { ifindex: link.ifindex, source })),
                }
            }
        }
        failures
    }

    /// Reads the node's links and syncs their Service hooks; failures are
    /// logged (such a device is tried again on the next call).
    pub fn follow_node_devices(&mut self, endpoint_interfaces: &BTreeSet<&str>) {
        let links = match crate::node::links() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "reading the node's links for their Service hooks");
                return;
            }
        };
        for (name, e) in self.sync_node_devices(&links, endpoint_interfaces) {
            tracing::error!(
                interface = %name,
                error = %e,
                "no Service verdicts on this node device: Service connections leaving through it are not judged"
            );
        }
    }

    /// Forgets a node device whose hook someone removed (the next sync
    /// attaches it again); whether it was one.
    pub(super) fn node_device_hook_removed(&mut self, ifindex: u32) -> bool {
        self.node_devices.remove(&ifindex).is_some()
    }

    fn attach_netdev_filters(
        &mut self,
        program: &'static str,
        ifindexes: &[u32],
    ) -> Result<Vec<Result<(), tc_netlink::RequestError>>, DatapathError> {
        let prog = classifier(&mut self.ebpf, program)?;
        let fd = prog.fd().map_err(|source| DatapathError::Program { name: program, source })?;
        let name = std::ffi::CString::new(program).unwrap_or_default();
        let filter = tc_netlink::Filter {
            side: tc_netlink::Side::Egress,
            priority: FILTER_PRIORITY,
            handle: FILTER_HANDLE_RAW,
            program: fd.as_fd().as_raw_fd(),
            name: &name,
        };
        Ok(tc_netlink::attach(ifindexes, &[filter]))
    }
}

/// Listens, on a thread of its own, for links the kernel announces in the
/// caller's network namespace; `announced` gets each one that may need the
/// Service hook. Pods' veths are left to the once-a-second read: they
/// become endpoints, and a burst of pod starts should not wake the loop.
pub fn watch_new_links(announced: impl Fn(Link) + Send + 'static) -> io::Result<()> {
    let socket = rtnetlink::subscribe(RTMGRP_LINK)?;
    std::thread::Builder::new().name("link-events".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let data = match rtnetlink::receive(&socket, &mut buf) {
                Ok(d) => d,
                // ENOBUFS: notifications were lost; the once-a-second read
                // finds what they said.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "link notifications stopped; node devices are read once a second");
                    return;
                }
            };
            for link in crate::node::announced_links(data) {
                if link.kind.as_deref() != Some("veth") && netdev_program(&link).is_some() {
                    announced(link);
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(link_type: u16, kind: Option<&str>) -> Link {
        Link { ifindex: 2, name: "x".into(), link_type, kind: kind.map(Into::into) }
    }

    #[test]
    fn devices_get_the_program_for_their_header() {
        assert_eq!(netdev_program(&link(1, Some("vxlan"))), Some(program_names::TO_NETDEV));
        assert_eq!(netdev_program(&link(65534, Some("wireguard"))), Some(program_names::TO_NETDEV_L3));
        assert_eq!(netdev_program(&link(768, Some("ipip"))), Some(program_names::TO_NETDEV_L3));
        // Loopback: nothing leaves the node through it.
        assert_eq!(netdev_program(&link(772, None)), None);
        // PPP: judged where it can be, dropped where a marked packet cannot be read.
        assert_eq!(netdev_program(&link(512, Some("ppp"))), Some(program_names::TO_NETDEV_L3));
    }
}
