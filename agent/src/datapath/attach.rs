//! Attaching the programs to an endpoint's host-side veth.
//!
//! An endpoint's hooks are tc filters on a clsact qdisc, at a fixed priority
//! and handle: they outlive the agent, and a restarted agent replaces the
//! program inside them (atomic), it never detaches and re-attaches. Not TCX
//! links: a TCX attach waits for an RCU grace period under RTNL (~16 ms
//! here, see docs/decisions.md), so pods started together queue behind one
//! another, while a filter is attached in well under a millisecond.
//! TCX links pinned by earlier agents are adopted as they are (the program
//! swapped inside them), and the node devices' Service hook is a TCX link
//! (attached once).

use std::{io, path::PathBuf};

use aya::programs::{
    LinkOrder, ProgramError, TcAttachType,
    links::{FdLink, Link as _, LinkError, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
};

use std::os::fd::{AsFd as _, AsRawFd as _};

use super::{AttachMode, Datapath, DatapathError, Hook, classifier, tc_netlink};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no interface with index {0}")]
    NoInterface(u32),
    #[error("{hook:?} on {interface}")]
    Attach {
        interface: String,
        hook: Hook,
        #[source]
        source: BoxError,
    },
    #[error("tc hooks on interface {ifindex}")]
    Filters {
        ifindex: u32,
        #[source]
        source: tc_netlink::RequestError,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where an endpoint's filters sit among a clsact qdisc's: first, under a
/// handle of our own ("PC"), so a replace never touches another tool's.
pub(super) const FILTER_PRIORITY: u16 = 1;
pub(super) const FILTER_HANDLE_RAW: u32 = 0x5043;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, FILTER_HANDLE_RAW as u16);

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::FromContainer => TcAttachType::Ingress,
        Hook::ToContainer | Hook::ToNetdev => TcAttachType::Egress,
    }
}

/// The errno behind a netlink failure, if any.
fn netlink_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::TcError(TcError::NetlinkError(e)) | ProgramError::NetlinkError(e) => e.raw_os_error(),
        _ => None,
    }
}

impl Datapath {
    fn link_pin(&self, ifindex: u32, hook: Hook) -> PathBuf {
        let name = match hook {
            Hook::FromContainer => format!("if{ifindex}-from"),
            Hook::ToContainer => format!("if{ifindex}-to"),
            // Not `if…`: endpoint link bookkeeping skips these.
            Hook::ToNetdev => format!("netdev-if{ifindex}"),
        };
        self.pin_dir.join("links").join(name)
    }

    /// Attaches both hooks to the interface `ifindex` (in the caller's network
    /// namespace); where they are attached already, swaps their program.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), AttachError> {
        let interface = ifname(ifindex).ok_or(AttachError::NoInterface(ifindex))?;
        let interface = interface.as_str();
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir { path: links, source })?;
        let mut clsact = false;
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            let attached = match self.swap_pinned(interface, ifindex, hook) {
                Ok(true) => Ok(()),
                Ok(false) if self.attach == AttachMode::Tcx => match self.replace_filter(interface, hook) {
                    Ok(true) => Ok(()),
                    Ok(false) => self.attach_link(interface, ifindex, hook),
                    Err(e) => Err(e),
                },
                Ok(false) => self.attach_filter(interface, hook, &mut clsact),
                Err(e) => Err(e),
            };
            attached.map_err(|source| AttachError::Attach { interface: interface.into(), hook, source })?;
        }
        Ok(())
    }

    /// Attaches both hooks to each interface of `ifindexes`, as `attach`
    /// does one: tc filters go through one rtnetlink buffer per 32 of them
    /// (pods that start together reach a pass together). Interfaces with
    /// pinned TCX links, and TCX mode, take `attach` one by one.
    pub fn attach_many(&mut self, ifindexes: &[u32]) -> Vec<Result<(), AttachError>> {
        let pinned: std::collections::BTreeSet<u32> = match self.attach {
            AttachMode::Tcx => Default::default(),
            AttachMode::Tc => self.pinned_link_ifindexes().into_iter().collect(),
        };
        let batched = |idx: &u32| self.attach == AttachMode::Tc && !pinned.contains(idx);
        let batched: Vec<bool> = ifindexes.iter().map(batched).collect();
        let together: Vec<u32> =
            ifindexes.iter().zip(&batched).filter(|(_, b)| **b).map(|(idx, _)| *idx).collect();
        let mut results = self.attach_filters(&together).into_iter();
        ifindexes
            .iter()
            .zip(batched)
            .map(|(&idx, batched)| match batched {
                true => results.next().unwrap_or(Err(AttachError::NoInterface(idx))),
                false => self.attach(idx),
            })
            .collect()
    }

    /// Both hooks' filters on each of `ifindexes` (`tc_netlink::attach`).
    fn attach_filters(&mut self, ifindexes: &[u32]) -> Vec<Result<(), AttachError>> {
        if ifindexes.is_empty() {
            return vec![];
        }
        let mut programs = Vec::new();
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            let name = hook.program();
            let fd = classifier(&mut self.ebpf, name).and_then(|p| {
                let fd = p.fd().map_err(|source| DatapathError::Program { name, source })?;
                Ok(fd.as_fd().as_raw_fd())
            });
            match fd {
                Ok(fd) => programs.push((hook, fd, std::ffi::CString::new(name).unwrap_or_default())),
                Err(e) => {
                    let why = e.to_string();
                    let source = || tc_netlink::RequestError {
                        what: "program",
                        source: io::Error::other(why.clone()),
                    };
                    return ifindexes
                        .iter()
                        .map(|&ifindex| Err(AttachError::Filters { ifindex, source: source() }))
                        .collect();
                }
            }
        }
        let filters: Vec<tc_netlink::Filter<'_>> = programs
            .iter()
            .map(|(hook, fd, name)| tc_netlink::Filter {
                side: match attach_type(*hook) {
                    TcAttachType::Ingress => tc_netlink::Side::Ingress,
                    _ => tc_netlink::Side::Egress,
                },
                priority: FILTER_PRIORITY,
                handle: FILTER_HANDLE_RAW,
                program: *fd,
                name,
            })
            .collect();
        tc_netlink::attach(ifindexes, &filters)
            .into_iter()
            .zip(ifindexes)
            .map(|(r, &ifindex)| {
                r.map_err(|source| match source.source.raw_os_error() {
                    Some(libc::ENODEV) => AttachError::NoInterface(ifindex),
                    _ => AttachError::Filters { ifindex, source },
                })
            })
            .collect()
    }

    /// The hook as a tc filter: created, or its program replaced in place.
    /// `clsact`: the interface's clsact qdisc is known to exist.
    fn attach_filter(&mut self, interface: &str, hook: Hook, clsact: &mut bool) -> Result<(), BoxError> {
        let prog = classifier(&mut self.ebpf, hook.program())?;
        if !*clsact {
            match tc::qdisc_add_clsact(interface) {
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                other => other?,
            }
            *clsact = true;
        }
        let options = NlOptions { priority: FILTER_PRIORITY, handle: FILTER_HANDLE, classid: None };
        match prog.attach_with_options(interface, attach_type(hook), TcAttachOptions::Netlink(options)) {
            Ok(id) => {
                // The filter outlives this handle: dropping it would detach.
                std::mem::forget(prog.take_link(id)?);
                Ok(())
            }
            Err(e) if netlink_errno(&e) == Some(libc::EEXIST) => {
                match self.replace_filter(interface, hook)? {
                    true => Ok(()),
                    // Deleted between the two requests: the next pass retries.
                    false => Err("the filter went away while its program was being replaced".into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the program in the hook's filter, if there is one.
    fn replace_filter(&mut self, interface: &str, hook: Hook) -> Result<bool, BoxError> {
        let prog = classifier(&mut self.ebpf, hook.program())?;
        let link = SchedClassifierLink::attached(
            interface,
            attach_type(hook),
            FILTER_PRIORITY,
            FILTER_HANDLE,
            None,
        )?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                std::mem::forget(prog.take_link(id)?);
                Ok(true)
            }
            Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Swaps the hook's program into the TCX link pinned for it, if there
    /// is one; false if there is none (a stale pin, whose interface index
    /// was reused, is removed).
    fn swap_pinned(&mut self, interface: &str, ifindex: u32, hook: Hook) -> Result<bool, BoxError> {
        let pin = self.link_pin(ifindex, hook);
        let prog = classifier(&mut self.ebpf, hook.program())?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; our handle may go.
                        drop(prog.take_link(id)?);
                        Ok(true)
                    }
                    Err(e) => {
                        tracing::debug!(interface, ?hook, error = %e, "removing stale link pin");
                        std::fs::remove_file(&pin)?;
                        Ok(false)
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The hook as a pinned TCX link (node devices).
    fn attach_link(&mut self, interface: &str, ifindex: u32, hook: Hook) -> Result<(), BoxError> {
        if self.swap_pinned(interface, ifindex, hook)? {
            return Ok(());
        }
        let pin = self.link_pin(ifindex, hook);
        let prog = classifier(&mut self.ebpf, hook.program())?;
        let id = prog.attach_with_options(
            interface,
            attach_type(hook),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )?;
        let link = FdLink::try_from(prog.take_link(id)?)?;
        link.pin(&pin)?;
        Ok(())
    }

    /// Attaches the Service verdict to a node device's TC egress (the way to
    /// backends that are not local pods); idempotent.
    pub fn attach_netdev(&mut self, interface: &str) -> Result<(), AttachError> {
        let idx = ifindex(interface).ok_or_else(|| AttachError::Attach {
            interface: interface.into(),
            hook: Hook::ToNetdev,
            source: "no such interface".into(),
        })?;
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir { path: links, source })?;
        self.attach_link(interface, idx, Hook::ToNetdev).map_err(|source| AttachError::Attach {
            interface: interface.into(),
            hook: Hook::ToNetdev,
            source,
        })
    }

    /// Removes an interface's hooks: its filters, and the pins of links an
    /// earlier agent made (the kernel then detaches those). Both hooks are
    /// tried; the first failure is returned.
    pub fn detach(&mut self, ifindex: u32) -> io::Result<()> {
        let mut result = Ok(());
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            let unpinned = match std::fs::remove_file(self.link_pin(ifindex, hook)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
            // A vanished interface took its filters along.
            let unfiltered = match ifname(ifindex) {
                Some(interface) => detach_filter(&interface, hook).map(|_| ()),
                None => Ok(()),
            };
            if result.is_ok() {
                result = unpinned.and(unfiltered);
            }
        }
        result
    }
}

/// Removes one hook's filter; false if there was none.
fn detach_filter(interface: &str, hook: Hook) -> io::Result<bool> {
    let Ok(link) =
        SchedClassifierLink::attached(interface, attach_type(hook), FILTER_PRIORITY, FILTER_HANDLE, None)
    else {
        // The interface went away meanwhile, and its filters with it.
        return Ok(false);
    };
    match link.detach() {
        Ok(()) => Ok(true),
        Err(e) if matches!(netlink_errno(&e), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)) => Ok(false),
        Err(e) => Err(io::Error::other(e)),
    }
}

/// Removes the endpoint filters from every interface of the caller's
/// network namespace (uninstalling: the filters hold the programs, and the
/// programs the maps, past their pins); returns how many.
pub fn detach_all_filters() -> io::Result<usize> {
    let mut removed = 0;
    for interface in interfaces() {
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            removed += usize::from(detach_filter(&interface, hook)?);
        }
    }
    Ok(removed)
}

/// The names of the caller's network namespace's interfaces.
fn interfaces() -> Vec<String> {
    // SAFETY: if_nameindex returns an array terminated by a zeroed entry
    // (or null on failure), freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return vec![];
        }
        let mut out = vec![];
        let mut p = list;
        while (*p).if_index != 0 {
            out.push(std::ffi::CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        out
    }
}

impl Datapath {
    /// Interfaces that carry endpoint programs (by their pinned links).
    pub fn pinned_link_ifindexes(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(self.pin_dir.join("links")) else { return vec![] };
        let mut out: Vec<u32> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_prefix("if")?.split_once('-')?.0.parse().ok())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The name of the interface with this index, in the caller's network namespace.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Readies a new endpoint's interface ahead of the pass that attaches its
/// filters (`--attach tc`): its clsact qdisc, which alone changes nothing
/// the interface carries (a pod's start waits for its filters all the same).
/// An interface that does not exist is left to the pass to report.
pub fn prepare_interface(interface: &str) -> Result<(), AttachError> {
    let Some(idx) = ifindex(interface) else { return Ok(()) };
    tc_netlink::add_clsact(idx).map_err(|source| AttachError::Filters { ifindex: idx, source })
}

/// The index of a network interface in the caller's network namespace.
pub fn ifindex(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Interface indexes by name, for many names at once: one socket for all
/// of them (`if_nametoindex` opens and closes one per name, and a pass
/// asks for hundreds). The socket answers for the network namespace it was
/// opened in: keep an `IfIndexes` for one call, not across a `setns`.
pub struct IfIndexes(Option<std::os::fd::OwnedFd>);

impl IfIndexes {
    pub fn open() -> IfIndexes {
        // SAFETY: plain socket(2); owned right below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        // SAFETY: a fresh descriptor we own.
        IfIndexes(
            (fd >= 0).then(|| unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }),
        )
    }

    pub fn get(&self, interface: &str) -> Option<u32> {
        use std::os::fd::AsRawFd as _;
        let Some(fd) = &self.0 else { return ifindex(interface) };
        let bytes = interface.as_bytes();
        if bytes.len() >= libc::IF_NAMESIZE || bytes.contains(&0) {
            return None;
        }
        // SAFETY: an all-zero ifreq is valid; the name is NUL-terminated
        // (checked to fit with its NUL).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFINDEX reads the name and writes the index into
        // the ifreq we pass.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } != 0 {
            return None;
        }
        // SAFETY: on success the kernel filled the union's index.
        let idx = unsafe { req.ifr_ifru.ifru_ifindex };
        u32::try_from(idx).ok().filter(|i| *i != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_by_name_agree_with_the_c_library() {
        let indexes = IfIndexes::open();
        assert_eq!(indexes.get("lo"), ifindex("lo"));
        assert!(indexes.get("lo").is_some());
        assert_eq!(indexes.get("no-such-if0"), None);
        assert_eq!(indexes.get("a-name-longer-than-sixteen"), None);
    }
}
