//! A policy change never drops a packet both versions allow: a pod sends
//! new UDP flows without pause while the agent rewrites the receiving
//! endpoint's policy thousands of times, every version allowing that flow
//! through different entries. Not one packet may be dropped. Both ways the
//! writer changes an endpoint are driven: entries updated in place in the
//! live generation (policy entries differ, or CIDR prefixes too), and a
//! whole new generation flipped in (the endpoint's flags differ). Needs
//! root, network namespaces and BPF.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use portcullis_agent::{
    compiled::{
        AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, PrefixEntry,
        Protocol,
    },
    datapath::{Datapath, DatapathConfig},
};
use portcullis_testbed::{Bed, PinDir};

const SENDER: u32 = 1000;
const REWRITES: u64 = 2000;

/// How consecutive versions differ.
#[derive(Clone, Copy)]
enum Change {
    /// Policy entries only: updated in place.
    Entries,
    /// A CIDR prefix too: in place as well.
    Prefixes,
    /// Egress isolation too: a new generation each time.
    Flags,
}

fn state(bed: &Bed, revision: u64, change: Change) -> CompiledState {
    let sender = bed.pod("sender");
    let receiver = bed.pod("receiver");
    let udp = |peer, start, end, rule| AllowEntry {
        peer,
        protocol: Some(Protocol::Udp),
        ports: Some(PortRange { start, end }),
        rule,
    };
    // Even revisions: the sender by identity on exactly 5353; odd ones: any
    // peer on a range around it, plus unrelated entries. Every version's
    // keys differ from the last.
    let allow = if revision.is_multiple_of(2) {
        vec![udp(SENDER, 5353, 5353, 1), udp(SENDER + 1, 1, 1000, 2)]
    } else {
        let mut v = vec![udp(0, 5000, 5999, 3)];
        v.extend((0..50).map(|i| udp(SENDER + 2 + i, 7000 + i as u16, 7000 + i as u16, 4)));
        v
    };
    let prefixes = match change {
        Change::Entries | Change::Flags => vec![],
        Change::Prefixes => vec![PrefixEntry {
            cidr: format!("198.18.{}.0/24", revision % 2).parse().expect("cidr"),
            allow: vec![udp(0, 53, 53, 5)],
        }],
    };
    CompiledState {
        revision,
        identities: Default::default(),
        ipcache: vec![IpcacheEntry { cidr: IpAddr::from(sender.ipv4).into(), identity: SENDER, name: None }],
        endpoints: vec![EndpointState {
            id: 1,
            name: "default/receiver".into(),
            interface: receiver.host_if.clone(),
            identity: 1001,
            addresses: vec![IpAddr::from(receiver.ipv4)],
            ingress: DirectionPolicy { isolated: true, allow, prefixes }.into(),
            // Isolated egress that lets everything out: only the flag differs.
            egress: DirectionPolicy {
                isolated: matches!(change, Change::Flags) && revision.is_multiple_of(2),
                allow: vec![AllowEntry { peer: 0, protocol: None, ports: None, rule: 6 }],
                prefixes: vec![],
            }
            .into(),
        }],
        services: vec![],
    }
}

#[test]
fn updating_entries_in_place_thousands_of_times_drops_no_packet_it_allows() {
    rewrite_under_traffic(Change::Entries);
}

#[test]
fn updating_prefixes_in_place_thousands_of_times_drops_no_packet_it_allows() {
    rewrite_under_traffic(Change::Prefixes);
}

#[test]
fn flipping_generations_thousands_of_times_drops_no_packet_it_allows() {
    rewrite_under_traffic(Change::Flags);
}

/// An agent restart (an upgrade) swaps the programs inside the hooks in
/// place: a new agent takes over a hundred times while the pod sends, and
/// each one writes a new policy version too.
#[test]
fn taking_over_from_an_earlier_agent_a_hundred_times_drops_no_packet_it_allows() {
    rewrite_under_traffic_with(Change::Entries, 100, true);
}

fn rewrite_under_traffic(change: Change) {
    rewrite_under_traffic_with(change, REWRITES, false);
}

/// `rewrites` new versions; with `restart`, each written by a new agent
/// that first adopts what the last one left.
fn rewrite_under_traffic_with(change: Change, rewrites: u64, restart: bool) {
    let mut bed = Bed::new().expect("bed");
    bed.add_pod("sender").expect("pod");
    bed.add_pod("receiver").expect("pod");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    let target = SocketAddr::new(IpAddr::from(bed.pod("receiver").ipv4), 5353);

    let states: Vec<CompiledState> = (1..=rewrites + 1).map(|r| state(&bed, r, change)).collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let writer = bed
        .node
        .spawn(move || {
            let config = DatapathConfig { pin_dir, ..Default::default() };
            let mut dp = Datapath::load(&config).expect("load");
            let report = dp.apply(&states[0]);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            ready_tx.send(()).expect("ready");
            go_rx.recv().expect("go");
            for s in &states[1..] {
                if restart {
                    drop(dp);
                    dp = Datapath::load(&config).expect("a new agent loads");
                }
                let report = dp.apply(s);
                assert!(report.errors.is_empty(), "{:?}", report.errors);
                assert_eq!(report.endpoints_written, 1, "revision {} rewrote the endpoint", s.revision);
            }
            done_tx.send(()).expect("done");
            dp
        })
        .expect("writer thread");
    ready_rx.recv().expect("datapath loaded");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        bed.pod("sender")
            .netns
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A fresh socket, a fresh source port: a new flow whose
                    // first packet needs the policy, not conntrack.
                    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                    if socket.send_to(b"x", target).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .expect("sender thread")
    };
    go_tx.send(()).expect("go");
    done_rx.recv().expect("rewrites done");
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("sender");
    let dp = writer.join().expect("writer").expect("entered the node");

    // Datagrams sent last may still be on their way through the backlog.
    let sent = sent.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let ingress = loop {
        let c = dp.endpoint_counters(1).expect("counted").ingress;
        if c.forwarded_packets + c.dropped_total() >= sent || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    eprintln!(
        "{rewrites} rewrites{}; {sent} datagrams sent, {} forwarded, {} dropped",
        if restart { " by new agents" } else { "" },
        ingress.forwarded_packets,
        ingress.dropped_total()
    );
    assert!(sent > 1000, "the sender kept sending during the rewrites ({sent})");
    assert_eq!(ingress.dropped_total(), 0, "not one allowed packet dropped: {ingress:?}");
    assert_eq!(ingress.forwarded_packets, sent, "every datagram sent was judged and forwarded");
}
