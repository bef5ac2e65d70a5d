//! The Service verdict for backends on the node's own addresses.
//!
//! After DNAT to one of the node's addresses (a hostNetwork pod, the API
//! server on a control-plane node) a pod's packet goes to local input,
//! where no device hook runs. `to_host`, on the ingress of the node's root
//! cgroup, sees it as it is delivered to the socket: it gives the client's
//! egress verdict there. Its link is pinned, so it holds while the agent
//! is away; a new agent pins its own in its place.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    maps::Array,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, links::FdLink},
};
use portcullis_common::{config, program_names};

use super::{Datapath, DatapathError};

const MAP_CONFIG: &str = portcullis_common::map_names::CONFIG;

pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let name = program_names::TO_HOST;
    cgroup_skb(ebpf)?.load().map_err(|source| DatapathError::Program { name, source })
}

fn cgroup_skb(ebpf: &mut Ebpf) -> Result<&mut CgroupSkb, DatapathError> {
    let name = program_names::TO_HOST;
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// The node's mark tag: chosen once per pinned map set (so a restarted
/// agent, and packets in flight, keep it) and never 0, which marks nothing.
pub(super) fn ensure_node_tag(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(MAP_CONFIG).ok_or(DatapathError::MissingMap(MAP_CONFIG))?;
    let mut config: Array<_, u32> =
        Array::try_from(map).map_err(|source| DatapathError::Map { name: MAP_CONFIG, source })?;
    let tag =
        config.get(&config::NODE_TAG, 0).map_err(|source| DatapathError::Map { name: MAP_CONFIG, source })?;
    if tag != 0 {
        return Ok(());
    }
    // Different agents on one kernel (test beds, nodes as containers)
    // should not share a tag: a random one of 255.
    let mut byte = [0u8; 1];
    // SAFETY: fills the one-byte buffer given.
    let got = unsafe { libc::getrandom(byte.as_mut_ptr().cast(), 1, 0) };
    let tag = if got == 1 { u32::from(byte[0] % 255) + 1 } else { std::process::id() % 255 + 1 };
    config.set(config::NODE_TAG, tag, 0).map_err(|source| DatapathError::Map { name: MAP_CONFIG, source })
}

/// Where cgroup v2 is at or below `path`: `path` itself (unified
/// hierarchy), or `path/unified` (the hybrid layout of systemd's older
/// defaults, and of this project's CI machines).
pub fn cgroup_v2_root(path: &Path) -> Result<PathBuf, HostHookError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let is_v2 = |p: &Path| {
        use std::os::unix::ffi::OsStrExt as _;
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) else { return false };
        // SAFETY: zeroed statfs is a valid out-buffer.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid C string and out-pointer.
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
    };
    [path.to_owned(), path.join("unified")].into_iter().find(|p| is_v2(p)).ok_or_else(|| {
        HostHookError::Cgroup {
            path: path.to_owned(),
            source: std::io::Error::other("no cgroup v2 hierarchy there, nor under unified/"),
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum HostHookError {
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching {} to cgroup {path}", program_names::TO_HOST)]
    Attach {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

impl Datapath {
    /// This node's mark tag (the low byte of our marks; tests build marks
    /// with it).
    pub fn node_tag(&self) -> u32 {
        let Some(map) = self.ebpf.map(MAP_CONFIG) else { return 0 };
        Array::<_, u32>::try_from(map).ok().and_then(|a| a.get(&config::NODE_TAG, 0).ok()).unwrap_or(0)
    }

    fn host_link_pin(&self) -> PathBuf {
        self.pin_dir.join("links").join("host-cgroup")
    }

    /// Attaches `to_host` to the ingress of cgroup `cgroup` (the node's
    /// root: cgroup v2's mount point as the host sees it), replacing the
    /// link an earlier agent pinned. Idempotent.
    pub fn attach_host(&mut self, cgroup: &Path) -> Result<(), HostHookError> {
        let cgroup = &cgroup_v2_root(cgroup)?;
        let file = std::fs::File::open(cgroup)
            .map_err(|source| HostHookError::Cgroup { path: cgroup.to_owned(), source })?;
        let attach = |source: Box<dyn std::error::Error + Send + Sync>| HostHookError::Attach {
            path: cgroup.to_owned(),
            source,
        };
        let links = self.pin_dir.join("links");
        std::fs::create_dir_all(&links)
            .map_err(|source| DatapathError::PinDir { path: links.clone(), source })?;
        let pin = self.host_link_pin();
        let fresh = links.join("host-cgroup-new");
        let _ = std::fs::remove_file(&fresh);
        let prog = cgroup_skb(&mut self.ebpf)?;
        // A BPF link (this kernel makes one) always shares the cgroup with
        // other programs (systemd's, another agent's on the same kernel in
        // test beds): each runs. The link takes no attach flags.
        let id = prog
            .attach(&file, CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
            .map_err(|e| attach(e.into()))?;
        let link = FdLink::try_from(prog.take_link(id).map_err(|e| attach(e.into()))?)
            .map_err(|e| attach(e.into()))?;
        link.pin(&fresh).map_err(|e| attach(e.into()))?;
        // The new link first, then the old one goes with its pin: never a
        // moment without the hook.
        std::fs::rename(&fresh, &pin).map_err(|e| attach(e.into()))?;
        Ok(())
    }
}
