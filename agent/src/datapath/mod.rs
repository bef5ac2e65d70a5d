//! The kernel side as the agent sees it: load the eBPF object with its maps
//! pinned, attach the programs to endpoints' host-side veths, write compiled
//! state into the maps, and read flow events.

mod attach;
mod conntrack;
mod counters;
mod host;
mod inspect;
pub mod keys;
mod netdevs;
mod pins;
pub mod raw_map;
mod tc_events;
mod tc_netlink;
mod writer;

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use portcullis_common::{
    CidrKey, Counter, CtKey, CtValue, EndpointAddr, EndpointInfo, IpKey, PolicyKey, PolicyValue, ServiceKey,
    map_names, map_sizes, program_names,
};

pub use attach::{AttachError, IfIndexes, detach_all_filters, ifindex, ifname, prepare_interface};
pub use conntrack::{CtEntry, Sweep, monotonic_ns};
pub use counters::{DirectionCounters, EndpointCounters};
pub use host::{HostHookError, cgroup_v2_root};
pub use inspect::{KernelEndpoint, KernelVerdict};
pub use netdevs::{NetdevFailures, netdev_program, watch_new_links};
pub use tc_events::watch_hook_removals;
pub use writer::{ApplyReport, Placement, WriteError};

/// The eBPF object, built by `build.rs`. Public for tools and benchmarks
/// that load its `pass_all` program (load it with a pin directory of their
/// own: its maps are declared pinned).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

/// Where pins live unless configured otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/portcullis";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{0} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs(PathBuf),
    #[error(
        "no bpffs on /sys/fs/bpf and mounting one failed: {0} (in a pod, the host must have it: \
         the DaemonSet's mount-bpffs init container mounts it)"
    )]
    Mount(std::io::Error),
    #[error("creating pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// Map sizes (entries; bytes for the flow ring); `Default` gives the values
/// compiled into the object. A pinned map of another size or layout is
/// replaced at load (its contents are rebuilt from the cluster).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub endpoints: u32,
    pub ipcache: u32,
    pub policy: u32,
    pub flows_bytes: u32,
    pub conntrack: u32,
    pub cidr: u32,
    pub endpoint_addresses: u32,
    pub services: u32,
    pub service_pending: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            endpoints: map_sizes::ENDPOINTS,
            ipcache: map_sizes::IPCACHE,
            policy: map_sizes::POLICY,
            flows_bytes: map_sizes::FLOWS,
            conntrack: map_sizes::CT,
            cidr: map_sizes::CIDR,
            endpoint_addresses: map_sizes::EP_ADDRS,
            services: map_sizes::SERVICES,
            service_pending: map_sizes::SVC_PENDING,
        }
    }
}

impl MapSizes {
    /// Applies `name=entries` (names as `agent run --help` lists them).
    pub fn set(&mut self, spec: &str) -> Result<(), String> {
        let (name, value) = spec.split_once('=').ok_or_else(|| format!("{spec:?}: expected NAME=ENTRIES"))?;
        let value: u32 = value
            .trim()
            .parse()
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| format!("{spec:?}: {value:?} is not a positive number"))?;
        let slot = match name.trim() {
            "endpoints" => &mut self.endpoints,
            "ipcache" => &mut self.ipcache,
            "policy" => &mut self.policy,
            "flows-bytes" => &mut self.flows_bytes,
            "conntrack" => &mut self.conntrack,
            "cidr" => &mut self.cidr,
            "endpoint-addresses" => &mut self.endpoint_addresses,
            "services" => &mut self.services,
            "service-pending" => &mut self.service_pending,
            other => return Err(format!("{other:?} is not a map (one of {})", Self::NAMES.join(", "))),
        };
        *slot = value;
        Ok(())
    }

    pub const NAMES: [&'static str; 9] = [
        "endpoints",
        "ipcache",
        "policy",
        "flows-bytes",
        "conntrack",
        "cidr",
        "endpoint-addresses",
        "services",
        "service-pending",
    ];
}

#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// Directory on bpffs for pinned maps and links.
    pub pin_dir: PathBuf,
    pub map_sizes: MapSizes,
    /// Report every new flow a policy lets through, not only drops.
    pub report_allowed: bool,
    /// How new endpoints' hooks are attached.
    pub attach: AttachMode,
}

/// How an endpoint's hooks are attached to its veth. Hooks already in place
/// (either way, by an earlier agent) keep their kind; only their program
/// is replaced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// tc filters on a clsact qdisc: attached in well under a millisecond.
    #[default]
    Tc,
    /// TCX links, pinned: owned by the agent, but each attach waits for an
    /// RCU grace period (~16 ms) under RTNL, so pod starts queue.
    Tcx,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
            map_sizes: MapSizes::default(),
            report_allowed: false,
            attach: AttachMode::default(),
        }
    }
}

/// Which hook of an endpoint: named for the pod's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress of the host veth: the pod's egress.
    FromContainer,
    /// TC egress of the host veth: the pod's ingress.
    ToContainer,
    /// TC egress of a node device: Service verdicts for off-node backends.
    ToNetdev,
}

impl Hook {
    fn program(self) -> &'static str {
        match self {
            Hook::FromContainer => program_names::FROM_CONTAINER,
            Hook::ToContainer => program_names::TO_CONTAINER,
            Hook::ToNetdev => program_names::TO_NETDEV,
        }
    }
}

pub(crate) struct Maps {
    endpoints: BpfHashMap<MapData, u32, EndpointInfo>,
    ipcache: LpmTrie<MapData, IpKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    cidr: LpmTrie<MapData, CidrKey, u32>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    ep_addrs: BpfHashMap<MapData, EndpointAddr, u8>,
    services: BpfHashMap<MapData, ServiceKey, u32>,
    counters: PerCpuArray<MapData, Counter>,
    rule_stats: PerCpuArray<MapData, Counter>,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    report_allowed: bool,
    attach: AttachMode,
    sizes: MapSizes,
    maps: Maps,
    flows: Option<RingBuf<MapData>>,
    loaded: writer::Loaded,
    /// Node devices carrying the Service hook (`netdevs.rs`): index, name.
    node_devices: std::collections::BTreeMap<u32, String>,
}

impl Datapath {
    /// Loads the programs and opens (or creates) the pinned maps; what they
    /// already hold (an earlier agent's state) becomes the loaded state, and
    /// pinned links get this agent's programs. Call in the network namespace
    /// of the endpoints' interfaces.
    pub fn load(config: &DatapathConfig) -> Result<Self, DatapathError> {
        ensure_bpffs(&config.pin_dir)?;
        std::fs::create_dir_all(&config.pin_dir)
            .map_err(|source| DatapathError::PinDir { path: config.pin_dir.clone(), source })?;
        if !is_bpffs(&config.pin_dir) {
            return Err(DatapathError::NoBpffs(config.pin_dir.clone()));
        }
        let sizes = &config.map_sizes;
        let carried = pins::drop_incompatible(&config.pin_dir, sizes);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&config.pin_dir)
            .map_max_entries(map_names::ENDPOINTS, sizes.endpoints)
            .map_max_entries(map_names::IPCACHE, sizes.ipcache)
            .map_max_entries(map_names::POLICY, sizes.policy)
            .map_max_entries(map_names::FLOWS, sizes.flows_bytes)
            .map_max_entries(map_names::CT, sizes.conntrack)
            .map_max_entries(map_names::CIDR, sizes.cidr)
            .map_max_entries(map_names::EP_ADDRS, sizes.endpoint_addresses)
            .map_max_entries(map_names::SERVICES, sizes.services)
            .map_max_entries(map_names::SVC_PENDING, sizes.service_pending)
            .load(OBJECT)?;
        // Before the links get this agent's programs (in `recover`): the
        // new maps hold what the old ones did when the programs switch.
        pins::carry_over(&config.pin_dir, carried);
        for name in [
            program_names::FROM_CONTAINER,
            program_names::TO_CONTAINER,
            program_names::TO_NETDEV,
            program_names::TO_NETDEV_L3,
        ] {
            classifier(&mut ebpf, name)?.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        host::load(&mut ebpf)?;
        host::ensure_node_tag(&mut ebpf)?;
        let maps = Maps {
            endpoints: take_map(&mut ebpf, map_names::ENDPOINTS)?,
            ipcache: take_map(&mut ebpf, map_names::IPCACHE)?,
            policy: take_map(&mut ebpf, map_names::POLICY)?,
            cidr: take_map(&mut ebpf, map_names::CIDR)?,
            conntrack: take_map(&mut ebpf, map_names::CT)?,
            ep_addrs: take_map(&mut ebpf, map_names::EP_ADDRS)?,
            services: take_map(&mut ebpf, map_names::SERVICES)?,
            counters: take_map(&mut ebpf, map_names::COUNTERS)?,
            rule_stats: take_map(&mut ebpf, map_names::RULE_STATS)?,
        };
        let flows = Some(take_map(&mut ebpf, map_names::FLOWS)?);
        let mut dp = Datapath {
            ebpf,
            pin_dir: config.pin_dir.clone(),
            report_allowed: config.report_allowed,
            attach: config.attach,
            sizes: config.map_sizes.clone(),
            maps,
            flows,
            loaded: Default::default(),
            node_devices: Default::default(),
        };
        dp.recover();
        Ok(dp)
    }

    /// The flow event ring buffer; handed out once, to the flow reader.
    pub fn take_flows(&mut self) -> Option<RingBuf<MapData>> {
        self.flows.take()
    }

    /// Runs one hook's program on a crafted packet with `BPF_PROG_TEST_RUN`
    /// and returns its TC verdict. The kernel runs it as if on the loopback
    /// device (ifindex 1) of the caller's network namespace.
    pub fn test_run(&self, hook: Hook, packet: &[u8]) -> Result<i32, DatapathError> {
        self.test_run_timed(hook, packet, 1).map(|(verdict, _)| verdict)
    }

    /// Like `test_run`, with the packet carrying `mark`; also returns the
    /// mark the program left on it.
    pub fn test_run_marked(&self, hook: Hook, packet: &[u8], mark: u32) -> Result<(i32, u32), DatapathError> {
        // `struct __sk_buff`: `len`, `pkt_type`, then `mark` at byte 8; the
        // kernel takes the leading part as given and zero for the rest, and
        // writes the whole struct back (192 bytes on 6.x; room for growth).
        const MARK_OFFSET: usize = 8;
        let mut ctx_in = [0u8; MARK_OFFSET + 4];
        ctx_in[MARK_OFFSET..].copy_from_slice(&mark.to_ne_bytes());
        let mut ctx_out = [0u8; 512];
        let name = hook.program();
        let prog = self.classifier_ref(name)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..Default::default()
            })
            .map_err(|source| DatapathError::Program { name, source })?;
        let mut out = [0u8; 4];
        out.copy_from_slice(&ctx_out[MARK_OFFSET..MARK_OFFSET + 4]);
        Ok((result.return_value as i32, u32::from_ne_bytes(out)))
    }

    /// Per program: how often it ran and for how long in all, as the kernel
    /// counts while run-time statistics are on (`aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<(&'static str, u64, std::time::Duration)> {
        [program_names::FROM_CONTAINER, program_names::TO_CONTAINER, program_names::TO_NETDEV]
            .into_iter()
            .filter_map(|name| {
                let info = self.classifier_ref(name).ok()?.info().ok()?;
                Some((name, info.run_count(), info.run_time()))
            })
            .collect()
    }

    fn classifier_ref(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    /// Like `test_run`, `repeat` times; also returns the kernel's mean run time.
    pub fn test_run_timed(
        &self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<(i32, std::time::Duration), DatapathError> {
        let name = hook.program();
        let prog = self.classifier_ref(name)?;
        let result = prog
            .test_run(TestRunOptions { data_in: Some(packet), repeat, ..Default::default() })
            .map_err(|source| DatapathError::Program { name, source })?;
        Ok((result.return_value as i32, result.duration))
    }
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Program { name, source: aya::programs::ProgramError::NotLoaded })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory lives there and nothing
/// is mounted yet (fresh machines, containers without the host mount).
fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    if pin_dir.starts_with("/sys/fs/bpf") {
        mount_bpffs()?;
    }
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf unless one is there; true if it mounted.
/// kind's nodes lack it: the DaemonSet's privileged init container calls
/// this with the host's /sys/fs/bpf shared back to the host, so pins
/// outlive the agent's container.
pub fn mount_bpffs() -> Result<bool, DatapathError> {
    // One check-and-mount at a time, or two loaders could stack two mounts.
    static MOUNT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = MOUNT.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new("/sys/fs/bpf");
    if is_bpffs(root) {
        return Ok(false);
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("static string");
    let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DatapathError::Mount(std::io::Error::last_os_error()));
    }
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(true)
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}
