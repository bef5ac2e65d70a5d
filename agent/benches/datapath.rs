//! Per-packet cost of the verdict programs, measured by the kernel itself
//! (`BPF_PROG_TEST_RUN` with a repeat count reports the mean run time). Each
//! path is given as a ratio to the cheapest one measured in the same run: an
//! ARP packet on an endpoint (the endpoint lookup and the ethertype).
//!
//! Needs root. `cargo bench -p portcullis-agent --bench datapath` (or
//! `cargo xtask bench`).

use std::{net::IpAddr, time::Duration};

use portcullis_agent::{
    compiled::{
        AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, PrefixEntry,
        Protocol,
    },
    datapath::{Datapath, DatapathConfig, Hook},
};
use portcullis_testbed::{
    Netns, PinDir,
    packets::{self, Frame},
};

const REPEAT: u32 = 200_000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn state(endpoint: bool, peers: u32) -> CompiledState {
    let tcp = |peer, port| AllowEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: Some(PortRange::single(port)),
        rule: 1,
    };
    // A realistic table: many peers, ranges, and a CIDR block with a hole.
    // Every other peer may use TCP/80.
    let mut allow: Vec<AllowEntry> = (0..peers).step_by(2).map(|i| tcp(1000 + i, 80)).collect();
    allow.push(AllowEntry {
        peer: 1000,
        protocol: Some(Protocol::Tcp),
        ports: Some(PortRange { start: 30000, end: 32767 }),
        rule: 2,
    });
    let prefixes = vec![
        PrefixEntry { cidr: "192.168.0.0/16".parse().expect("cidr"), allow: vec![tcp(0, 443)] },
        PrefixEntry { cidr: "192.168.7.0/24".parse().expect("cidr"), allow: vec![] },
    ];
    let ipcache = (0..peers)
        .map(|i| IpcacheEntry {
            cidr: IpAddr::from([10, 1, (i >> 8) as u8, i as u8]).into(),
            identity: 1000 + i,
            name: None,
        })
        .collect();
    CompiledState {
        revision: 1,
        identities: Default::default(),
        ipcache,
        endpoints: if endpoint {
            vec![EndpointState {
                id: 1,
                name: "bench/server".into(),
                interface: "lo".into(),
                identity: 999,
                addresses: vec![],
                ingress: DirectionPolicy { isolated: true, allow, prefixes }.into(),
                egress: DirectionPolicy::default().into(),
            }]
        } else {
            vec![]
        },
        services: vec![],
    }
}

fn mean(dp: &Datapath, frame: &Frame) -> Duration {
    mean_bytes(dp, &frame.bytes())
}

fn mean_bytes(dp: &Datapath, bytes: &[u8]) -> Duration {
    // The kernel's figure is the mean over REPEAT runs; take the best of 5.
    (0..5)
        .map(|_| dp.test_run_timed(Hook::ToContainer, bytes, REPEAT).expect("test run").1)
        .min()
        .expect("runs")
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("datapath bench: skipped (needs root)");
        return;
    }
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let ns = Netns::create(format!("pc{}-bench", std::process::id())).expect("netns");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    let rows = ns
        .run(move || {
            let config = DatapathConfig { pin_dir, ..Default::default() };
            let mut dp = Datapath::load(&config).expect("load");
            let server = ip("10.0.0.2");
            let syn = |src: &str, port: u16, sport: u16| Frame {
                src_port: sport,
                ..Frame::tcp(ip(src), server, port)
            };

            dp.apply(&state(true, 1000));
            let baseline = mean_bytes(&dp, &packets::arp());
            let mut rows = vec![("ARP on an endpoint (baseline: the cheapest pass)", baseline)];
            // Each run is a new flow only the first time; after that conntrack
            // knows it. Denied packets never create entries, so they always
            // take the full path.
            rows.push(("denied: no rule for the peer", mean(&dp, &syn("10.1.0.5", 80, 40001))));
            rows.push(("denied: CIDR except hole", mean(&dp, &syn("192.168.7.9", 443, 40002))));
            rows.push(("denied: unknown peer, wrong port", mean(&dp, &syn("10.9.9.9", 81, 40003))));
            rows.push(("allowed, then tracked: identity + port", mean(&dp, &syn("10.1.0.4", 80, 40004))));
            rows.push(("allowed, then tracked: port range", mean(&dp, &syn("10.1.0.0", 31000, 40005))));
            rows.push(("allowed, then tracked: CIDR", mean(&dp, &syn("192.168.1.1", 443, 40006))));
            rows
        })
        .expect("bench body");
    let base = rows[0].1.as_nanos() as f64;
    println!("datapath verdict (to-container, BPF_PROG_TEST_RUN, mean of {REPEAT} runs, best of 5)");
    println!("{:<50} {:>10} {:>10}", "", "ns/packet", "ratio");
    for (name, d) in rows {
        println!("{name:<50} {:>10} {:>9.2}x", d.as_nanos(), d.as_nanos() as f64 / base);
    }
}
