//! Compiled state for the pods of a test bed, as the agent-binary tests feed
//! it to `agent run --state`.

use std::net::IpAddr;

use portcullis_agent::compiled::{CompiledState, DirectionPolicy, EndpointState, IpcacheEntry};
use portcullis_testbed::{
    Bed, NODE_IPV4, PinDir,
    agent::{AgentProcess, StateFile},
};

/// A pod of the bed as an endpoint: its name, identity and policy.
pub struct PodPolicy<'a> {
    pub pod: &'a str,
    pub identity: u32,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

/// Every pod an endpoint (ids from 1, in order, named `default/<pod>`), both
/// addresses of each in the ipcache, and the node's address as the host.
pub fn state(bed: &Bed, revision: u64, pods: Vec<PodPolicy<'_>>) -> CompiledState {
    let mut ipcache = vec![IpcacheEntry { cidr: IpAddr::from(NODE_IPV4).into(), identity: 1, name: None }];
    let mut endpoints = Vec::new();
    for (i, p) in pods.into_iter().enumerate() {
        let pod = bed.pod(p.pod);
        let addresses = vec![IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)];
        for ip in &addresses {
            let name = Some(format!("default/{}", p.pod));
            ipcache.push(IpcacheEntry {
                cidr: (*ip).into(),
                identity: p.identity,
                name: name.map(Into::into),
            });
        }
        endpoints.push(EndpointState {
            id: i as u16 + 1,
            name: format!("default/{}", p.pod),
            interface: pod.host_if.clone(),
            identity: p.identity,
            addresses,
            ingress: p.ingress.into(),
            egress: p.egress.into(),
        });
    }
    CompiledState { revision, identities: Default::default(), ipcache, endpoints, services: vec![] }
}

/// Isolated, allowing `allow`.
pub fn isolated(allow: Vec<portcullis_agent::compiled::AllowEntry>) -> DirectionPolicy {
    DirectionPolicy { isolated: true, allow, ..Default::default() }
}

/// A pod whose policy isolates nothing.
pub fn open(pod: &str, identity: u32) -> PodPolicy<'_> {
    PodPolicy { pod, identity, ingress: DirectionPolicy::default(), egress: DirectionPolicy::default() }
}

/// `agent run --state FILE --pin-dir DIR`.
pub fn run_args(state: &StateFile, pins: &PinDir) -> Vec<std::ffi::OsString> {
    let state = state.path();
    vec!["run".into(), "--state".into(), state.into_os_string(), "--pin-dir".into(), pins.path.clone().into()]
}

/// Starts the agent binary in the bed's node with `args` and waits for it
/// to report `revision` enforced.
pub fn start_agent(bed: &Bed, args: &[std::ffi::OsString], revision: u64) -> AgentProcess {
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_agent"));
    let mut agent = AgentProcess::start(&bed.node, binary, args).expect("start agent");
    let line = format!("enforced revision {revision}");
    agent.wait_for(&[&line], std::time::Duration::from_secs(20)).expect("agent line");
    agent
}
