//! `cargo xtask lab`: a node with three pods (network namespaces with routed
//! veths), the agent binary enforcing on their host-side veths, and after each
//! step the TCP/80 reachability matrix and the flows the agent dropped.
//!
//! The agent is fed compiled endpoint state (what the policy compiler will
//! produce from NetworkPolicies); each step changes it, the agent reports the
//! revision enforced, and only then the lab probes.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use portcullis_agent::compiled::{
    AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, Protocol,
};
use portcullis_testbed::{
    Bed, NODE_IPV4, PinDir, Transport,
    agent::{AgentProcess, StateFile},
    probe,
};

use crate::{build_agent, require_root};

const PODS: [(&str, u32); 3] = [("frontend", 1000), ("backend", 1001), ("not-frontend", 1002)];
const PORT: u16 = 80;
/// How long a probe waits before calling the path blocked.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

struct Step {
    title: &'static str,
    /// Ingress allow list of `backend`; `None`: backend not isolated.
    backend_ingress: Option<Vec<AllowEntry>>,
}

fn steps() -> Vec<Step> {
    let frontend = PODS[0].1;
    vec![
        Step { title: "no policy: every pod reaches every pod", backend_ingress: None },
        Step { title: "default-deny ingress on backend", backend_ingress: Some(vec![]) },
        Step {
            title: "allow frontend -> backend on TCP/80 (backend -> frontend still open: frontend is not isolated)",
            backend_ingress: Some(vec![AllowEntry {
                peer: frontend,
                protocol: Some(Protocol::Tcp),
                ports: Some(PortRange::single(PORT)),
                rule: 1,
            }]),
        },
    ]
}

pub fn run() -> Result<()> {
    require_root("cargo xtask lab")?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("installing Ctrl-C handler")?;

    eprintln!("lab: building the agent");
    let agent_bin = build_agent()?;

    let mut bed = Bed::new()?;
    for (pod, _) in PODS {
        bed.add_pod(pod)?;
        bed.serve(pod, PORT)?;
    }
    let pins = PinDir::new();
    let file = StateFile::new(&bed.id)?;
    println!("lab: node {} with pods:", bed.node.name());
    for p in &bed.pods {
        println!("  default/{:<14} {:<12} {:<14} host veth {}", p.name, p.ipv4, p.ipv6, p.host_if);
    }

    let mut agent: Option<AgentProcess> = None;
    for (i, step) in steps().into_iter().enumerate() {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let revision = i as u64 + 1;
        let state = state_for(&bed, revision, &step);
        file.write(&serde_json::to_vec_pretty(&state)?)?;
        let agent = match agent.as_mut() {
            Some(a) => a,
            None => {
                let state_path = file.path();
                let args = [
                    "run".as_ref(),
                    "--state".as_ref(),
                    state_path.as_os_str(),
                    "--pin-dir".as_ref(),
                    pins.path.as_os_str(),
                ];
                agent.insert(AgentProcess::start(&bed.node, &agent_bin, args)?)
            }
        };
        let enforced =
            agent.wait_for(&[&format!("enforced revision {revision}")], Duration::from_secs(30))?;
        agent.take_new(Duration::ZERO);

        println!("\n== step {revision}: {}", step.title);
        println!("agent: {enforced}");
        print_matrix(&bed)?;
        let drops: Vec<String> = agent
            .take_new(Duration::from_millis(200))
            .into_iter()
            .filter(|l| l.contains("DROPPED"))
            .collect();
        println!("dropped flows ({}):", drops.len());
        for line in drops {
            println!("  {line}");
        }
    }
    println!("\nlab: done; removing the pods, the node and the agent's pins");
    Ok(())
}

fn state_for(bed: &Bed, revision: u64, step: &Step) -> CompiledState {
    let mut ipcache = vec![IpcacheEntry { cidr: IpAddr::from(NODE_IPV4).into(), identity: 1, name: None }];
    let mut endpoints = Vec::new();
    for (n, (pod, identity)) in PODS.iter().enumerate() {
        let p = bed.pod(pod);
        let name = format!("default/{pod}");
        for ip in [IpAddr::from(p.ipv4), IpAddr::from(p.ipv6)] {
            ipcache.push(IpcacheEntry { cidr: ip.into(), identity: *identity, name: Some(name.clone()) });
        }
        let ingress = match (*pod, &step.backend_ingress) {
            ("backend", Some(allow)) => {
                DirectionPolicy { isolated: true, allow: allow.clone(), ..Default::default() }
            }
            _ => DirectionPolicy::default(),
        };
        endpoints.push(EndpointState {
            id: n as u16 + 1,
            name,
            interface: p.host_if.clone(),
            identity: *identity,
            ingress,
            egress: DirectionPolicy::default(),
        });
    }
    CompiledState { revision, identities: Default::default(), ipcache, endpoints }
}

/// Probes TCP/80 between every ordered pair of pods, all at once.
fn print_matrix(bed: &Bed) -> Result<()> {
    let names: Vec<&str> = PODS.iter().map(|p| p.0).collect();
    let results: Vec<Vec<Option<bool>>> = std::thread::scope(|s| {
        let handles: Vec<Vec<_>> = names
            .iter()
            .map(|from| {
                names
                    .iter()
                    .map(|to| {
                        let (from, to) = (bed.pod(from), bed.pod(to));
                        (from.name != to.name).then(|| {
                            s.spawn(move || {
                                probe(&from.netns, Transport::Tcp, to.ipv4.into(), PORT, PROBE_TIMEOUT)
                            })
                        })
                    })
                    .collect()
            })
            .collect();
        handles
            .into_iter()
            .map(|row| row.into_iter().map(|h| h.map(|h| matches!(h.join(), Ok(Ok(Some(_)))))).collect())
            .collect()
    });
    println!("reachability TCP/{PORT} (row: from, column: to; . reachable, X blocked)");
    print!("{:<16}", "");
    for n in &names {
        print!("{n:<14}");
    }
    println!();
    for (from, row) in names.iter().zip(results) {
        print!("{from:<16}");
        for cell in row {
            let mark = match cell {
                None => "-",
                Some(true) => ".",
                Some(false) => "X",
            };
            print!("{mark:<14}");
        }
        println!();
    }
    Ok(())
}
