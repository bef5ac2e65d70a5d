//! Attaching the programs to an endpoint's host-side veth as TCX links, pinned
//! so that enforcement outlives the agent: a restarted agent swaps the program
//! inside the existing link (atomic), it never detaches and re-attaches.

use std::{io, path::PathBuf};

use aya::programs::{
    LinkOrder, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::{SchedClassifierLink, TcAttachOptions},
};

use super::{Datapath, DatapathError, Hook, classifier};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no interface with index {0}")]
    NoInterface(u32),
    #[error("{hook:?} on {interface}")]
    Attach {
        interface: String,
        hook: Hook,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
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
    /// namespace); where its links are pinned already, swaps their program.
    pub fn attach(&mut self, ifindex: u32) -> Result<(), AttachError> {
        let interface = ifname(ifindex).ok_or(AttachError::NoInterface(ifindex))?;
        let interface = interface.as_str();
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir { path: links, source })?;
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            self.attach_hook(interface, ifindex, hook).map_err(|source| AttachError::Attach {
                interface: interface.into(),
                hook,
                source,
            })?;
        }
        Ok(())
    }

    fn attach_hook(
        &mut self,
        interface: &str,
        ifindex: u32,
        hook: Hook,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let pin = self.link_pin(ifindex, hook);
        let prog = classifier(&mut self.ebpf, hook.program())?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; our handle may go.
                        drop(prog.take_link(id)?);
                        return Ok(());
                    }
                    Err(e) => {
                        // The interface behind the old link is gone (its index
                        // reused): start over with a fresh link.
                        tracing::debug!(interface, ?hook, error = %e, "replacing stale link pin");
                        std::fs::remove_file(&pin)?;
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let attach_type = match hook {
            Hook::FromContainer => TcAttachType::Ingress,
            Hook::ToContainer | Hook::ToNetdev => TcAttachType::Egress,
        };
        let id = prog.attach_with_options(
            interface,
            attach_type,
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
        self.attach_hook(interface, idx, Hook::ToNetdev).map_err(|source| AttachError::Attach {
            interface: interface.into(),
            hook: Hook::ToNetdev,
            source,
        })
    }

    /// Removes the pinned links of an interface; the kernel detaches them.
    pub fn detach(&mut self, ifindex: u32) -> io::Result<()> {
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            match std::fs::remove_file(self.link_pin(ifindex, hook)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
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

/// The index of a network interface in the caller's network namespace.
pub fn ifindex(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}
