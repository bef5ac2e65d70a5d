//! The verdict programs on crafted packets, through `BPF_PROG_TEST_RUN`.
//!
//! Each test runs in its own network namespace, where the kernel runs the
//! program as if on that namespace's loopback (ifindex 1); the endpoint under
//! test is therefore `lo`. Needs root and BPF.

use std::{net::IpAddr, sync::Arc};

use portcullis_agent::{
    compiled::{
        AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, PrefixEntry,
        Protocol, ServiceFrontend,
    },
    datapath::{CtEntry, Datapath, DatapathConfig, Hook, monotonic_ns, raw_map},
    flows::drain_ring,
};
use portcullis_common::{
    CtValue, DIR_EGRESS, DIR_INGRESS, FlowEvent, TC_ACT_SHOT, TC_PASS, VERDICT_DROPPED, VERDICT_FORWARDED,
    ct_flags, identity, mark, reason,
};
use portcullis_testbed::{
    Netns, PinDir,
    packets::{self, Frame, arp},
};

const FRONTEND: u32 = 300;
const ADMIN: u32 = 301;
const MONITOR: u32 = 302;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn allow(peer: u32, protocol: Option<Protocol>, ports: Option<(u16, u16)>, rule: u32) -> AllowEntry {
    AllowEntry { peer, protocol, ports: ports.map(|(start, end)| PortRange { start, end }), rule }
}

/// `lo` is the endpoint `default/backend`, isolated for ingress.
fn backend_state(ingress: Vec<AllowEntry>) -> CompiledState {
    let cache = |cidr: &str, identity: u32, name: &str| IpcacheEntry {
        cidr: cidr.parse().expect("test cidr"),
        identity,
        name: Some(name.into()),
    };
    CompiledState {
        revision: 1,
        identities: Default::default(),
        ipcache: vec![
            cache("10.0.0.1/32", FRONTEND, "default/frontend"),
            cache("fd00::1/128", FRONTEND, "default/frontend"),
            cache("10.0.0.3/32", ADMIN, "default/admin"),
            cache("10.0.0.4/32", MONITOR, "default/monitor"),
            cache("10.0.0.254/32", identity::HOST, "node"),
        ],
        endpoints: vec![EndpointState {
            id: 1,
            name: "default/backend".into(),
            interface: "lo".into(),
            identity: 400,
            addresses: vec![ip("10.0.0.2"), ip("fd00::2"), ip("fd00:1::1"), ip("10.9.9.9")],
            ingress: DirectionPolicy { isolated: true, allow: ingress, ..Default::default() }.into(),
            egress: DirectionPolicy::default().into(),
        }],
        services: vec![],
    }
}

fn default_rules() -> Vec<AllowEntry> {
    vec![
        allow(FRONTEND, Some(Protocol::Tcp), Some((80, 80)), 1),
        allow(identity::ANY, Some(Protocol::Udp), Some((53, 53)), 2),
        allow(ADMIN, Some(Protocol::Tcp), Some((8000, 8999)), 3),
        allow(MONITOR, None, None, 4),
    ]
}

/// Runs `body` with a loaded datapath holding `state`, in a fresh namespace.
fn with_datapath(
    state: CompiledState,
    body: impl FnOnce(&mut Datapath, &mut dyn FnMut() -> Vec<FlowEvent>) + Send + 'static,
) {
    with_datapath_config(DatapathConfig::default(), state, body)
}

/// Like `with_datapath`, with the given configuration (its pin directory is
/// replaced by a fresh one).
fn with_datapath_config(
    config: DatapathConfig,
    state: CompiledState,
    body: impl FnOnce(&mut Datapath, &mut dyn FnMut() -> Vec<FlowEvent>) + Send + 'static,
) {
    let ns = Netns::create(format!("pc{}-testrun-{}", std::process::id(), unique())).expect("netns");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    ns.run(move || {
        let mut dp = Datapath::load(&DatapathConfig { pin_dir, ..config }).expect("load datapath");
        let report = dp.apply(&state);
        assert!(report.errors.is_empty(), "apply: {:?}", report.errors);
        let mut ring = dp.take_flows().expect("flow ring");
        let mut events = move || drain_ring(&mut ring);
        body(&mut dp, &mut events);
    })
    .expect("test body");
}

fn unique() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn verdict(dp: &Datapath, hook: Hook, frame: &Frame) -> i32 {
    dp.test_run(hook, &frame.bytes()).expect("test run")
}

fn ingress(dp: &Datapath, frame: Frame) -> i32 {
    verdict(dp, Hook::ToContainer, &frame)
}

#[test]
fn identity_protocol_and_port_decide_ingress() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, backend, world) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("192.0.2.9"));
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS, "frontend TCP/80 is allowed");
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 81)), TC_ACT_SHOT, "only port 80");
        assert_eq!(ingress(dp, Frame::tcp(world, backend, 80)), TC_ACT_SHOT, "world is not frontend");
        assert_eq!(ingress(dp, Frame::udp(fe, backend, 80)), TC_ACT_SHOT, "a TCP rule never allows UDP");
        assert_eq!(
            ingress(dp, Frame::new(fe, backend, packets::SCTP, 80)),
            TC_ACT_SHOT,
            "a TCP rule never allows SCTP"
        );
        assert_eq!(ingress(dp, Frame::udp(world, backend, 53)), TC_PASS, "UDP/53 from any peer");
        assert_eq!(ingress(dp, Frame::tcp(world, backend, 53)), TC_ACT_SHOT, "but not TCP/53");
        assert_eq!(ingress(dp, Frame::icmp(fe, backend, 8)), TC_ACT_SHOT, "port rules never allow ICMP");
        let monitor = ip("10.0.0.4");
        assert_eq!(
            ingress(dp, Frame::icmp(monitor, backend, 8)),
            TC_PASS,
            "a rule without ports allows ICMP"
        );
        assert_eq!(ingress(dp, Frame::new(monitor, backend, packets::SCTP, 9)), TC_PASS);
    });
}

#[test]
fn port_ranges_match_exactly_their_bounds() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (admin, backend) = (ip("10.0.0.3"), ip("10.0.0.2"));
        for (port, want) in
            [(7999, TC_ACT_SHOT), (8000, TC_PASS), (8500, TC_PASS), (8999, TC_PASS), (9000, TC_ACT_SHOT)]
        {
            assert_eq!(ingress(dp, Frame::tcp(admin, backend, port)), want, "admin TCP/{port}");
        }
    });
}

#[test]
fn ipv6_is_judged_like_ipv4() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, backend) = (ip("fd00::1"), ip("fd00::2"));
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS);
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 81)), TC_ACT_SHOT);
        assert_eq!(ingress(dp, Frame::tcp(ip("fd00::99"), backend, 80)), TC_ACT_SHOT);
        // Extension headers before TCP: the port is still found.
        let with_ext = Frame { v6_ext: vec![0, 60], ..Frame::tcp(fe, backend, 80) };
        assert_eq!(ingress(dp, with_ext), TC_PASS);
        let with_ext = Frame { v6_ext: vec![0, 60], ..Frame::tcp(fe, backend, 81) };
        assert_eq!(ingress(dp, with_ext), TC_ACT_SHOT);
        // AH is sized in 4-byte units: the ports after it are still found.
        let with_ah = Frame { v6_ext: vec![0, packets::AH], ..Frame::tcp(fe, backend, 81) };
        assert_eq!(ingress(dp, with_ah), TC_ACT_SHOT);
        let with_ah = Frame { v6_ext: vec![packets::AH, 60], ..Frame::tcp(fe, backend, 80) };
        assert_eq!(ingress(dp, with_ah), TC_PASS);
    });
}

#[test]
fn neighbour_discovery_arp_and_node_always_pass() {
    with_datapath(backend_state(vec![]), |dp, events| {
        let frame = arp();
        assert_eq!(dp.test_run(Hook::ToContainer, &frame).expect("run"), TC_PASS, "ARP");
        for ty in 133..=137 {
            let nd = Frame { hop_limit: 255, ..Frame::icmp(ip("fe80::1"), ip("fd00::2"), ty) };
            assert_eq!(ingress(dp, nd), TC_PASS, "ICMPv6 type {ty}");
        }
        // MLD reports to a link-scope group pass; with a routable hop limit
        // or a global destination they are just ICMPv6.
        let mld = |hop_limit: u8, dst: &str| Frame { hop_limit, ..Frame::icmp(ip("fe80::1"), ip(dst), 143) };
        assert_eq!(ingress(dp, mld(1, "ff02::16")), TC_PASS, "MLDv2 report");
        assert_eq!(ingress(dp, mld(64, "ff02::16")), TC_ACT_SHOT, "MLD-looking, routed");
        assert_eq!(ingress(dp, mld(1, "ff0e::16")), TC_ACT_SHOT, "MLD-looking, global group");
        // Not from the link (hop limit below 255): not neighbour discovery.
        let routed = Frame { hop_limit: 64, ..Frame::icmp(ip("fe80::1"), ip("fd00::2"), 135) };
        assert_eq!(ingress(dp, routed), TC_ACT_SHOT, "routed ND-looking packet");
        let echo = Frame::icmp(ip("fe80::1"), ip("fd00::2"), 128);
        assert_eq!(ingress(dp, echo), TC_ACT_SHOT, "echo is not neighbour discovery");
        assert_eq!(ingress(dp, Frame::tcp(ip("10.0.0.254"), ip("10.0.0.2"), 10250)), TC_PASS, "node");
        let drops = events();
        assert_eq!(drops.len(), 4, "four drop events: {drops:?}");
    });
}

#[test]
fn truncated_headers_are_dropped_as_malformed() {
    with_datapath(backend_state(default_rules()), |dp, events| {
        let short = Frame { truncate: Some(14 + 20 + 2), ..Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 80) };
        assert_eq!(ingress(dp, short), TC_ACT_SHOT);
        // The kernel refuses to run on an incomplete IPv6 header; cut in TCP.
        let short6 = Frame { truncate: Some(14 + 40 + 4), ..Frame::tcp(ip("fd00::1"), ip("fd00::2"), 80) };
        assert_eq!(ingress(dp, short6), TC_ACT_SHOT);
        let ev = events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.iter().all(|e| e.reason == reason::MALFORMED), "{ev:?}");
    });
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, backend) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let first =
            |src, port, id| Frame { ip_id: id, more_fragments: true, ..Frame::tcp(src, backend, port) };
        let later = |src, port, id| Frame { ip_id: id, frag_offset: 185, ..Frame::tcp(src, backend, port) };
        // Allowed first fragment: its later fragments pass.
        assert_eq!(ingress(dp, first(fe, 80, 7)), TC_PASS);
        assert_eq!(ingress(dp, later(fe, 80, 7)), TC_PASS, "follows its first fragment");
        // Denied first fragment: so are the later ones.
        assert_eq!(ingress(dp, first(fe, 81, 8)), TC_ACT_SHOT);
        assert_eq!(ingress(dp, later(fe, 81, 8)), TC_ACT_SHOT, "follows its first fragment");
        // A later fragment of no datagram we saw: only rules without ports
        // could admit it (MONITOR has one; frontend's rules all have ports).
        assert_eq!(ingress(dp, later(fe, 80, 9)), TC_ACT_SHOT, "port rule, no ports to match");
        assert_eq!(ingress(dp, later(ip("10.0.0.4"), 80, 10)), TC_PASS, "rule without ports");
        let udp = Frame { frag_offset: 185, ..Frame::udp(ip("192.0.2.7"), backend, 53) };
        assert_eq!(ingress(dp, udp), TC_ACT_SHOT, "UDP/53 from anyone is a port rule");

        // IPv6: the fragment header carries the identification.
        let (fe6, backend6) = (ip("fd00::1"), ip("fd00::2"));
        let v6 = |offset, more, port| Frame {
            v6_ext: vec![packets::FRAGMENT],
            ip_id: 0x1234_5678,
            frag_offset: offset,
            more_fragments: more,
            ..Frame::tcp(fe6, backend6, port)
        };
        assert_eq!(ingress(dp, v6(0, true, 80)), TC_PASS);
        assert_eq!(ingress(dp, v6(185, false, 80)), TC_PASS, "IPv6 later fragment follows");
        assert_eq!(ingress(dp, Frame { ip_id: 1, ..v6(185, false, 80) }), TC_ACT_SHOT, "another datagram");
    });
    // A rule for a protocol without ports admits that protocol's later fragments.
    let udp_any = vec![allow(identity::ANY, Some(Protocol::Udp), None, 8)];
    with_datapath(backend_state(udp_any), |dp, _| {
        let udp = Frame { frag_offset: 185, ..Frame::udp(ip("192.0.2.7"), ip("10.0.0.2"), 9999) };
        assert_eq!(ingress(dp, udp), TC_PASS);
        let tcp = Frame { frag_offset: 185, ..Frame::tcp(ip("192.0.2.7"), ip("10.0.0.2"), 9999) };
        assert_eq!(ingress(dp, tcp), TC_ACT_SHOT);
    });
}

#[test]
fn unisolated_directions_pass_and_unknown_interfaces_fail_closed() {
    with_datapath(backend_state(vec![]), |dp, _| {
        let out = Frame::tcp(ip("10.0.0.2"), ip("192.0.2.1"), 443);
        assert_eq!(verdict(dp, Hook::FromContainer, &out), TC_PASS, "egress is not isolated");
    });
    // Our programs on an interface the endpoint table does not know (it
    // was full): nothing passes, and the drop says why.
    let mut state = backend_state(vec![]);
    state.endpoints.clear();
    with_datapath(state, |dp, events| {
        assert_eq!(ingress(dp, Frame::tcp(ip("192.0.2.1"), ip("10.0.0.2"), 80)), TC_ACT_SHOT);
        assert_eq!(
            verdict(dp, Hook::FromContainer, &Frame::tcp(ip("10.0.0.2"), ip("192.0.2.1"), 80)),
            TC_ACT_SHOT
        );
        let ev = events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.iter().all(|e| e.reason == reason::UNKNOWN_ENDPOINT && e.verdict == VERDICT_DROPPED));
        // Counted too (under id 0), so the drop totals see them.
        let c = dp.endpoint_counters(0).expect("id 0 is counted");
        assert_eq!(c.ingress.dropped_packets[reason::UNKNOWN_ENDPOINT as usize], 1);
        assert_eq!(c.egress.dropped_packets[reason::UNKNOWN_ENDPOINT as usize], 1);
    });
}

#[test]
fn drop_events_carry_the_tuple_and_reason() {
    with_datapath(backend_state(default_rules()), |dp, events| {
        assert_eq!(ingress(dp, Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 81)), TC_ACT_SHOT);
        let ev = events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = ev[0];
        assert_eq!((e.verdict, e.reason, e.direction), (VERDICT_DROPPED, reason::POLICY_DENIED, DIR_INGRESS));
        assert_eq!((e.endpoint_id, e.remote_identity, e.protocol), (1, FRONTEND, packets::TCP));
        assert_eq!((e.src_port, e.dst_port, e.tcp_flags), (40000, 81, 0x02));
        assert_eq!(&e.src_addr[..4], &[10, 0, 0, 1]);
        assert_eq!(&e.dst_addr[..4], &[10, 0, 0, 2]);
        assert_eq!(e.ifindex, 1);
    });
}

#[test]
fn a_new_state_replaces_the_old_one_whole() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, admin, backend) = (ip("10.0.0.1"), ip("10.0.0.3"), ip("10.0.0.2"));
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS);
        // Revoke frontend, open admin on 22 only. New flows (new source
        // ports): cutting tracked flows on revocation is conntrack's job.
        let new_flow = |f: Frame| Frame { src_port: 50000, ..f };
        let mut next = backend_state(vec![allow(ADMIN, Some(Protocol::Tcp), Some((22, 22)), 9)]);
        next.revision = 2;
        let report = dp.apply(&next);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.policy_entries, 1, "the old generation's entries are gone");
        assert_eq!(ingress(dp, new_flow(Frame::tcp(fe, backend, 80))), TC_ACT_SHOT);
        assert_eq!(ingress(dp, Frame::tcp(admin, backend, 8000)), TC_ACT_SHOT);
        assert_eq!(ingress(dp, Frame::tcp(admin, backend, 22)), TC_PASS);
        // Dropping the endpoint from the state takes the programs off its
        // interface (were they left, they would drop everything there).
        for direction in ["ingress", "egress"] {
            assert!(endpoint_filter("lo", direction), "{direction} filter on lo");
        }
        let mut gone = next.clone();
        gone.endpoints.clear();
        gone.revision = 3;
        let report = dp.apply(&gone);
        assert_eq!(report.endpoints_removed, 1);
        for direction in ["ingress", "egress"] {
            assert!(!endpoint_filter("lo", direction), "{direction} filter left on lo");
        }
    });
}

/// `agent uninstall` takes the filters off every interface: they hold the
/// programs (and those the maps) past the pins.
#[test]
fn uninstalling_removes_the_endpoint_filters() {
    with_datapath(backend_state(default_rules()), |_, _| {
        assert!(endpoint_filter("lo", "ingress") && endpoint_filter("lo", "egress"));
        assert_eq!(portcullis_agent::datapath::detach_all_filters().expect("detach"), 2);
        assert!(!endpoint_filter("lo", "ingress") && !endpoint_filter("lo", "egress"));
        assert_eq!(portcullis_agent::datapath::detach_all_filters().expect("detach again"), 0);
    });
}

/// Whether the endpoint's tc filter (the agent's priority and handle) is on
/// `interface`'s `direction` hook, as `tc` sees it from this thread's
/// network namespace.
fn endpoint_filter(interface: &str, direction: &str) -> bool {
    let out = std::process::Command::new("tc")
        .args(["filter", "show", "dev", interface, direction])
        .output()
        .expect("tc filter show");
    assert!(out.status.success(), "tc: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.contains("pref 1 bpf") && l.contains("handle 0x5043"))
}

/// Endpoints with the same policy (a Deployment's replicas) share one
/// policy set: its entries are written once, a new replica adds none, and
/// a replica whose policy alone changes moves to a set of its own (and
/// back) while the others keep theirs.
#[test]
fn endpoints_with_the_same_policy_share_one_policy_set() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        for (name, peer) in [("pcrep1", "pcrep1p"), ("pcrep2", "pcrep2p")] {
            let status = std::process::Command::new("ip")
                .args(["link", "add", name, "type", "veth", "peer", "name", peer])
                .status()
                .expect("ip link add");
            assert!(status.success());
        }
        let one = dp.loaded_entries();
        let (set, n) = dp.policy_set_of(1).expect("endpoint 1 has a set");
        assert_eq!(n, 1);
        let with_replica = |rules: Vec<AllowEntry>, revision: u64| {
            let mut state = backend_state(default_rules());
            let mut replica = state.endpoints[0].clone();
            replica.id = 2;
            replica.name = "default/backend-2".into();
            replica.interface = "pcrep1".into();
            replica.addresses = vec![ip("10.0.0.12")];
            Arc::make_mut(&mut replica.ingress).allow = rules;
            state.endpoints.push(replica);
            state.revision = revision;
            state
        };

        // A replica joins the set: no new entries.
        let report = dp.apply(&with_replica(default_rules(), 2));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.endpoints_written, report.narrowed), (1, false), "{report:?}");
        assert_eq!(dp.loaded_entries(), one, "the replica's policy is already there");
        assert_eq!(dp.policy_set_of(1), Some((set, 2)));
        assert_eq!(dp.policy_set_of(2), Some((set, 2)));

        // Its policy alone changes: a set of its own; endpoint 1 keeps the
        // shared one, entries and verdicts.
        let report = dp.apply(&with_replica(vec![allow(ADMIN, Some(Protocol::Tcp), Some((22, 22)), 9)], 3));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let (own, n) = dp.policy_set_of(2).expect("endpoint 2 has a set");
        assert_ne!(own, set);
        assert_eq!(n, 1);
        assert_eq!(dp.policy_set_of(1), Some((set, 1)));
        assert_eq!(dp.loaded_entries(), one + 1);
        let (fe, backend) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(ingress(dp, Frame { src_port: 50100, ..Frame::tcp(fe, backend, 80) }), TC_PASS);

        // Back to the common policy: it rejoins, and its own set goes.
        let report = dp.apply(&with_replica(default_rules(), 4));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(dp.policy_set_of(2), Some((set, 2)));
        assert_eq!(dp.loaded_entries(), one);

        // Both change together, and a third replica starts: the shared set
        // is updated in place, and the newcomer joins it once the old
        // policy's entries are gone.
        let mut both = with_replica(vec![allow(ADMIN, Some(Protocol::Tcp), Some((22, 22)), 9)], 5);
        both.endpoints[0].ingress = both.endpoints[1].ingress.clone();
        let mut third = both.endpoints[1].clone();
        third.id = 3;
        third.name = "default/backend-3".into();
        third.interface = "pcrep2".into();
        third.addresses = vec![ip("10.0.0.13")];
        both.endpoints.push(third);
        let report = dp.apply(&both);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.endpoints_written, 3);
        assert_eq!(dp.policy_set_of(1), Some((set, 3)), "the same set, rewritten");
        assert_eq!(dp.policy_set_of(3), Some((set, 3)));
        assert_eq!(dp.loaded_entries(), 1);
        assert_eq!(ingress(dp, Frame { src_port: 50101, ..Frame::tcp(fe, backend, 80) }), TC_ACT_SHOT);
        assert_eq!(ingress(dp, Frame::tcp(ip("10.0.0.3"), backend, 22)), TC_PASS);
    });
}

#[test]
fn an_endpoint_whose_update_fails_keeps_its_last_good_policy() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let mut bad = backend_state(vec![allow(ADMIN, None, Some((22, 22)), 9)]);
        bad.revision = 2;
        let report = dp.apply(&bad);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        assert!(report.errors[0].contains("default/backend"), "names the endpoint: {}", report.errors[0]);
        let fresh = Frame { src_port: 50001, ..Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 80) };
        assert_eq!(ingress(dp, fresh), TC_PASS, "old rules hold");
        assert_eq!(ingress(dp, Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 81)), TC_ACT_SHOT);
    });
}

#[test]
fn replies_of_tracked_flows_pass_without_policy() {
    // lo is ingress-isolated and allows nothing; its own outgoing flows must
    // still get their replies.
    with_datapath(backend_state(vec![]), |dp, _| {
        let (me, peer) = (ip("10.0.0.2"), ip("10.0.0.1"));
        let out = Frame { src_port: 43000, ..Frame::tcp(me, peer, 443) };
        assert_eq!(verdict(dp, Hook::FromContainer, &out), TC_PASS, "egress is open");
        let reply = Frame { src_port: 443, ..Frame::tcp(peer, me, 43000) };
        assert_eq!(ingress(dp, reply.clone()), TC_PASS, "reply of a tracked flow");
        let stranger = Frame { src_port: 443, ..Frame::tcp(peer, me, 43001) };
        assert_eq!(ingress(dp, stranger), TC_ACT_SHOT, "same peer, untracked port");
        // ICMP echo: the identifier ties the reply to the request.
        let mut ping = Frame::icmp(me, peer, 8);
        ping.src_port = 7;
        ping.dst_port = 7;
        assert_eq!(verdict(dp, Hook::FromContainer, &ping), TC_PASS);
        let pong = Frame { src_port: 7, dst_port: 7, ..Frame::icmp(peer, me, 0) };
        assert_eq!(ingress(dp, pong), TC_PASS, "echo reply");
        let other_pong = Frame { src_port: 8, dst_port: 8, ..Frame::icmp(peer, me, 0) };
        assert_eq!(ingress(dp, other_pong), TC_ACT_SHOT, "reply to nothing we sent");
    });
}

#[test]
fn prefixes_decide_by_longest_match_with_except_holes() {
    // As compiled from: ipBlock 10.0.0.0/8 except 10.1.0.0/16 on TCP/80, and a
    // second peer 10.1.2.0/24 on UDP/53; fd00::/64 on TCP/443.
    let tcp80 = allow(0, Some(Protocol::Tcp), Some((80, 80)), 5);
    let udp53 = allow(0, Some(Protocol::Udp), Some((53, 53)), 6);
    let tcp443 = allow(0, Some(Protocol::Tcp), Some((443, 443)), 7);
    let prefix =
        |cidr: &str, allow: Vec<AllowEntry>| PrefixEntry { cidr: cidr.parse().expect("cidr"), allow };
    let mut state = backend_state(vec![]);
    Arc::make_mut(&mut state.endpoints[0].ingress).prefixes = vec![
        prefix("10.0.0.0/8", vec![tcp80]),
        prefix("10.1.0.0/16", vec![]),
        prefix("10.1.2.0/24", vec![udp53]),
        prefix("fd00::/64", vec![tcp443]),
    ];
    with_datapath(state, |dp, _| {
        let me = ip("10.9.9.9");
        let from = |src: &str, proto: u8, port: u16| Frame::new(ip(src), me, proto, port);
        assert_eq!(ingress(dp, from("10.200.0.1", packets::TCP, 80)), TC_PASS, "in the /8");
        assert_eq!(ingress(dp, from("10.200.0.1", packets::TCP, 81)), TC_ACT_SHOT, "wrong port");
        assert_eq!(ingress(dp, from("10.1.0.1", packets::TCP, 80)), TC_ACT_SHOT, "in the except");
        assert_eq!(
            ingress(dp, from("10.1.2.3", packets::TCP, 80)),
            TC_ACT_SHOT,
            "the except holds inside the /24"
        );
        assert_eq!(ingress(dp, from("10.1.2.3", packets::UDP, 53)), TC_PASS, "the other peer's /24");
        assert_eq!(ingress(dp, from("11.0.0.1", packets::TCP, 80)), TC_ACT_SHOT, "outside every prefix");
        // Pod addresses are matched by prefix too: 10.0.0.1 is frontend's.
        assert_eq!(ingress(dp, from("10.0.0.1", packets::TCP, 80)), TC_PASS, "a pod in the block");
        let v6 = Frame::tcp(ip("fd00::77"), ip("fd00:1::1"), 443);
        assert_eq!(ingress(dp, v6), TC_PASS, "IPv6 prefix");
        assert_eq!(ingress(dp, Frame::tcp(ip("fd01::77"), ip("fd00:1::1"), 443)), TC_ACT_SHOT);
    });
}

/// A restarted agent continues from what the pinned maps enforce: applying a
/// new state after a restart leaves nothing of the old one behind, whichever
/// generation was live.
#[test]
fn a_restarted_agent_replaces_the_state_it_finds() {
    for flips in [0u64, 1] {
        let ns = Netns::create(format!("pc{}-restart-{}", std::process::id(), unique())).expect("netns");
        let pins = PinDir::new();
        let pin_dir = pins.path.clone();
        ns.run(move || {
            let config = DatapathConfig { pin_dir, ..Default::default() };
            let (fe, admin, backend) = (ip("10.0.0.1"), ip("10.0.0.3"), ip("10.0.0.2"));
            {
                let mut dp = Datapath::load(&config).expect("load");
                for n in 0..=flips {
                    let mut rules = default_rules();
                    rules.truncate(4 - n as usize);
                    let report = dp.apply(&backend_state(rules));
                    assert!(report.errors.is_empty(), "{:?}", report.errors);
                }
                assert_eq!(ingress(&dp, Frame::tcp(fe, backend, 80)), TC_PASS);
            } // the agent exits; pins stay

            let mut dp = Datapath::load(&config).expect("reload");
            // Enforcement went on while no agent ran.
            let fresh = |f: Frame, port: u16| Frame { src_port: port, ..f };
            assert_eq!(ingress(&dp, fresh(Frame::tcp(fe, backend, 81), 50100)), TC_ACT_SHOT);
            let report = dp.apply(&backend_state(vec![allow(ADMIN, Some(Protocol::Tcp), Some((22, 22)), 9)]));
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert!(report.reused, "whose the recovered endpoint ids were is not known");
            assert_eq!(report.policy_entries, 1, "only the new state's entry is loaded");
            assert_eq!(
                ingress(&dp, fresh(Frame::tcp(fe, backend, 80), 50101)),
                TC_ACT_SHOT,
                "revoked (flips: {flips})"
            );
            assert_eq!(ingress(&dp, fresh(Frame::tcp(admin, backend, 22), 50102)), TC_PASS);
            assert_eq!(ingress(&dp, fresh(Frame::tcp(admin, backend, 8000), 50103)), TC_ACT_SHOT);
            drop(dp);
            // And what the kernel holds is exactly that entry.
            let dp = Datapath::load(&config).expect("reload again");
            assert_eq!(dp.loaded_entries(), 1);
        })
        .expect("test body");
    }
}

/// Makes the pinned map at `path` look like an earlier release's: the same
/// type, keys and entries, each value cut to its first `value_size` bytes
/// (layouts grow only by appending fields).
fn shrink_pinned_values(path: &std::path::Path, value_size: usize) {
    rewrite_pinned(path, value_size, |_| {})
}

/// Like `shrink_pinned_values`, with each key passed through `rekey`.
fn rewrite_pinned(path: &std::path::Path, value_size: usize, rekey: impl Fn(&mut Vec<u8>)) {
    let info = aya::maps::MapInfo::from_pin(path).expect("pinned map");
    let (key_size, old_size) = (info.key_size() as usize, info.value_size() as usize);
    let fd = raw_map::obj_get(path).expect("open pin");
    let mut entries = Vec::new();
    let (mut key, mut next, mut value) = (None::<Vec<u8>>, vec![0u8; key_size], vec![0u8; old_size]);
    while raw_map::next_key(&fd, key.as_deref(), &mut next).expect("next key") {
        assert!(raw_map::lookup(&fd, &next, &mut value).expect("lookup"));
        let mut k = next.clone();
        rekey(&mut k);
        entries.push((k, value[..value_size].to_vec()));
        key = Some(next.clone());
    }
    assert!(!entries.is_empty(), "{} holds nothing to carry", path.display());
    let map_type = info.map_type().expect("map type") as u32;
    let old =
        raw_map::create(map_type, key_size as u32, value_size as u32, info.max_entries(), info.map_flags())
            .expect("create the earlier release's map");
    for (k, v) in &entries {
        raw_map::update(&old, k, v).expect("fill it");
    }
    std::fs::remove_file(path).expect("unpin");
    raw_map::pin(&old, path).expect("pin the earlier release's map");
}

/// An upgrade across a layout change (as when `CtValue` grew from 40 to 48
/// bytes, `PolicyValue` from 4 to 8, and `EndpointInfo` from 28 to 32 with
/// policy sets, whose entries were keyed by the endpoint's own id before):
/// the new agent carries the old maps' entries over before its programs
/// take the links, so a flow opened before the upgrade still gets its
/// replies, and the policy holds as it was until the new agent writes its
/// own.
#[test]
fn an_upgrade_that_grows_map_layouts_carries_conntrack_and_policy_over() {
    let ns = Netns::create(format!("pc{}-carry-{}", std::process::id(), unique())).expect("netns");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    ns.run(move || {
        let config = DatapathConfig { pin_dir: pin_dir.clone(), ..Default::default() };
        let (me, fe, peer) = (ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.3"));
        let out = Frame { src_port: 43000, ..Frame::tcp(me, peer, 443) };
        let reply = Frame { src_port: 443, ..Frame::tcp(peer, me, 43000) };
        {
            let mut dp = Datapath::load(&config).expect("load");
            let report = dp.apply(&backend_state(default_rules()));
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            assert_eq!(verdict(&dp, Hook::FromContainer, &out), TC_PASS, "egress is open");
            assert_eq!(ingress(&dp, reply.clone()), TC_PASS, "the reply of a tracked flow");
        } // the earlier release's agent stops
        shrink_pinned_values(&pin_dir.join(portcullis_common::map_names::CT), 40);
        // Before sets: entries under the endpoint's id (1), and a table
        // entry without `policy_id`.
        let own_id = |key: &mut Vec<u8>| {
            // The LPM prefix length, then the key data: `policy_id` first.
            if key[4..6] == portcullis_common::POLICY_SET_BASE.to_ne_bytes() {
                key[4..6].copy_from_slice(&1u16.to_ne_bytes());
            }
        };
        rewrite_pinned(&pin_dir.join(portcullis_common::map_names::POLICY), 4, own_id);
        shrink_pinned_values(&pin_dir.join(portcullis_common::map_names::ENDPOINTS), 28);

        // The new release starts; it has not written anything yet.
        let dp = Datapath::load(&config).expect("load across the layout change");
        let info = aya::maps::MapInfo::from_pin(pin_dir.join(portcullis_common::map_names::CT)).expect("ct");
        assert_eq!(info.value_size() as usize, std::mem::size_of::<CtValue>(), "the map was replaced");
        assert_eq!(ingress(&dp, reply), TC_PASS, "the flow from before the upgrade still gets its replies");
        let fresh = |f: Frame, port: u16| Frame { src_port: port, ..f };
        assert_eq!(ingress(&dp, fresh(Frame::tcp(fe, me, 80), 50200)), TC_PASS, "the carried policy allows");
        assert_eq!(ingress(&dp, fresh(Frame::tcp(fe, me, 81), 50201)), TC_ACT_SHOT, "and isolates");
        let stranger = Frame { src_port: 443, ..Frame::tcp(peer, me, 43001) };
        assert_eq!(ingress(&dp, stranger), TC_ACT_SHOT, "nothing else was carried in");
        // The new agent writes its state: the endpoint's entries stay where
        // they are (a set of one under its own id) and still decide.
        let mut dp = dp;
        let report = dp.apply(&backend_state(default_rules()));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!report.narrowed, "{report:?}");
        assert_eq!(dp.policy_set_of(1), Some((1, 1)));
        assert_eq!(ingress(&dp, fresh(Frame::tcp(fe, me, 80), 50202)), TC_PASS);
        assert_eq!(ingress(&dp, fresh(Frame::tcp(fe, me, 81), 50203)), TC_ACT_SHOT);
    })
    .expect("test body");
}

/// A policy change cuts the tracked flows it no longer allows, and only those.
#[test]
fn revoking_a_rule_cuts_its_tracked_flows() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, admin, backend) = (ip("10.0.0.1"), ip("10.0.0.3"), ip("10.0.0.2"));
        let flow = Frame { src_port: 45000, ..Frame::tcp(fe, backend, 80) };
        let other = Frame { src_port: 45001, ..Frame::tcp(admin, backend, 8080) };
        assert_eq!(ingress(dp, flow.clone()), TC_PASS);
        assert_eq!(ingress(dp, other.clone()), TC_PASS);
        // The endpoint's own outgoing flow: egress is not isolated.
        let out = Frame { src_port: 46000, ..Frame::tcp(backend, ip("192.0.2.1"), 443) };
        assert_eq!(verdict(dp, Hook::FromContainer, &out), TC_PASS);

        // A rule added (in place) allows more: no flow to check.
        let mut more = default_rules();
        more.push(allow(ADMIN, Some(Protocol::Udp), Some((5000, 5000)), 5));
        let report = dp.apply(&backend_state(more));
        assert_eq!((report.endpoints_written, report.narrowed), (1, false), "{report:?}");

        // Frontend loses TCP/80; admin keeps its range.
        let mut rules = default_rules();
        rules.retain(|r| r.peer != FRONTEND);
        let report = dp.apply(&backend_state(rules));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.narrowed, "entries went: tracked flows are to be checked");
        assert_eq!(dp.revoke_flows(), 1, "exactly the frontend flow");
        assert_eq!(ingress(dp, flow), TC_ACT_SHOT, "the tracked flow is cut");
        assert_eq!(ingress(dp, other), TC_PASS, "still allowed");
        let reply = Frame { src_port: 443, ..Frame::tcp(ip("192.0.2.1"), backend, 46000) };
        assert_eq!(ingress(dp, reply), TC_PASS, "replies of the endpoint's own flow still pass");
    });
}

/// A pod sends from its own addresses only; a forged source is dropped and
/// reported, whatever its policy, before it can pass as another identity.
#[test]
fn forged_sources_are_dropped() {
    with_datapath(backend_state(vec![]), |dp, events| {
        let out = |src: &str, dst: &str| Frame::tcp(ip(src), ip(dst), 443);
        assert_eq!(verdict(dp, Hook::FromContainer, &out("10.0.0.2", "192.0.2.1")), TC_PASS, "own IPv4");
        assert_eq!(verdict(dp, Hook::FromContainer, &out("fd00::2", "fd00::9")), TC_PASS, "own IPv6");
        let link_local = Frame::icmp(ip("fe80::5"), ip("fe80::1"), 128);
        assert_eq!(verdict(dp, Hook::FromContainer, &link_local), TC_PASS, "link-local stays on the link");
        assert_eq!(
            verdict(dp, Hook::FromContainer, &out("10.0.0.1", "10.0.0.3")),
            TC_ACT_SHOT,
            "frontend's address"
        );
        assert_eq!(
            verdict(dp, Hook::FromContainer, &out("fd00::1", "fd00::3")),
            TC_ACT_SHOT,
            "frontend's IPv6"
        );
        let ev = events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.iter().all(|e| e.reason == reason::SPOOFED_SOURCE), "{ev:?}");
    });
    // Without known addresses (a state that gives none) nothing is checked.
    let mut state = backend_state(vec![]);
    state.endpoints[0].addresses.clear();
    with_datapath(state, |dp, _| {
        let forged = Frame::tcp(ip("10.0.0.1"), ip("10.0.0.3"), 443);
        assert_eq!(verdict(dp, Hook::FromContainer, &forged), TC_PASS);
    });
}

fn ct_entry(dp: &Datapath, src_port: u16, dst_port: u16) -> CtEntry {
    let found: Vec<CtEntry> = dp
        .conntrack_entries()
        .into_iter()
        .filter(|e| e.key.local_port == src_port && e.key.remote_port == dst_port)
        .collect();
    assert_eq!(found.len(), 1, "one entry for {src_port}->{dst_port}: {found:?}");
    found[0]
}

/// Seconds the entry has left.
fn remaining(e: &CtEntry) -> f64 {
    (e.value.expires_ns as f64 - monotonic_ns() as f64) / 1e9
}

#[test]
fn tcp_states_set_conntrack_lifetimes_and_expired_entries_pass_nothing() {
    // Ingress isolated, nothing allowed: only replies of our own flows pass.
    with_datapath(backend_state(vec![]), |dp, _| {
        let (me, peer) = (ip("10.0.0.2"), ip("10.0.0.1"));
        let out = |flags| Frame { src_port: 43000, tcp_flags: flags, ..Frame::tcp(me, peer, 443) };
        let back = |flags| Frame { src_port: 443, tcp_flags: flags, ..Frame::tcp(peer, me, 43000) };
        const FIN: u8 = 0x01;
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;

        assert_eq!(verdict(dp, Hook::FromContainer, &out(SYN)), TC_PASS);
        let e = ct_entry(dp, 43000, 443);
        assert_eq!(e.value.flags, 0, "opening");
        assert!((55.0..=60.0).contains(&remaining(&e)), "a SYN lives a minute: {}", remaining(&e));

        assert_eq!(ingress(dp, back(SYN | ACK)), TC_PASS, "the SYN-ACK is a reply");
        let e = ct_entry(dp, 43000, 443);
        assert_eq!(e.value.flags, ct_flags::SEEN_REPLY, "established");
        assert!(remaining(&e) > 5.0 * 3600.0, "established lives hours: {}", remaining(&e));

        assert_eq!(verdict(dp, Hook::FromContainer, &out(FIN | ACK)), TC_PASS);
        let e = ct_entry(dp, 43000, 443);
        assert_eq!(e.value.flags, ct_flags::SEEN_REPLY | ct_flags::CLOSING);
        assert!(remaining(&e) <= 10.0, "closing lives seconds: {}", remaining(&e));
        assert_eq!(ingress(dp, back(FIN | ACK)), TC_PASS, "the peer's FIN");

        // Past its expiry an entry passes nothing, even before the sweep.
        // (A second back: the programs read the coarse clock, a tick behind.)
        let expired =
            CtEntry { value: CtValue { expires_ns: monotonic_ns() - 1_000_000_000, ..e.value }, ..e };
        dp.conntrack_set(&expired).expect("age the entry");
        assert_eq!(ingress(dp, back(ACK)), TC_ACT_SHOT, "expired: judged as new, and denied");
        assert_eq!(dp.sweep_conntrack(monotonic_ns()).removed, 1, "the sweep removes it");
        assert!(dp.conntrack_entries().is_empty());

        // A connection reset at once lives seconds too; UDP a minute.
        assert_eq!(verdict(dp, Hook::FromContainer, &Frame { src_port: 43001, ..out(RST) }), TC_PASS);
        assert!(remaining(&ct_entry(dp, 43001, 443)) <= 10.0);
        let udp = Frame { src_port: 43002, ..Frame::udp(me, peer, 53) };
        assert_eq!(verdict(dp, Hook::FromContainer, &udp), TC_PASS);
        assert!((55.0..=60.0).contains(&remaining(&ct_entry(dp, 43002, 53))));

        // The sweep takes what expired by its clock and leaves the rest.
        let sweep = dp.sweep_conntrack(monotonic_ns() + 20_000_000_000);
        assert_eq!((sweep.removed, sweep.live), (1, 1), "the reset flow goes, UDP stays");
        assert_eq!(dp.conntrack_entries().len(), 1, "UDP lives on");
    });
}

#[test]
fn counters_count_packets_per_endpoint_direction_and_reason() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, backend) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let allowed = Frame::tcp(fe, backend, 80);
        assert_eq!(ingress(dp, allowed.clone()), TC_PASS);
        assert_eq!(ingress(dp, allowed.clone()), TC_PASS, "tracked packets count too");
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 81)), TC_ACT_SHOT);
        let truncated = Frame { truncate: Some(40), ..Frame::tcp(fe, backend, 80) };
        assert_eq!(ingress(dp, truncated), TC_ACT_SHOT);
        assert_eq!(verdict(dp, Hook::FromContainer, &Frame::udp(backend, fe, 53)), TC_PASS);

        let c = dp.endpoint_counters(1).expect("endpoint 1 is counted");
        assert_eq!(c.ingress.forwarded_packets, 2);
        assert_eq!(c.ingress.forwarded_bytes, 2 * allowed.bytes().len() as u64);
        assert_eq!(c.ingress.dropped_packets[reason::POLICY_DENIED as usize], 1);
        assert_eq!(c.ingress.dropped_packets[reason::MALFORMED as usize], 1);
        assert_eq!(c.ingress.dropped_total(), 2);
        assert_eq!(c.egress.forwarded_packets, 1);
        assert_eq!(c.egress.dropped_total(), 0);
        // Endpoint 1, and id 0: what no endpoint's table entry claims (none here).
        let all = dp.counters();
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!((all[&0].ingress.dropped_total(), all[&0].egress.dropped_total()), (0, 0));
    });
}

#[test]
fn each_rule_counts_the_packets_of_the_flows_it_allowed_both_ways() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let (fe, backend) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let syn = Frame { src_port: 41000, ..Frame::tcp(fe, backend, 80) };
        assert_eq!(ingress(dp, syn.clone()), TC_PASS, "new flow: rule 1");
        assert_eq!(ingress(dp, syn.clone()), TC_PASS, "tracked: still rule 1");
        let reply = Frame { src_port: 80, ..Frame::tcp(backend, fe, 41000) };
        assert_eq!(
            verdict(dp, Hook::FromContainer, &reply),
            TC_PASS,
            "the reply counts under rule 1's direction"
        );
        assert_eq!(ingress(dp, Frame::udp(fe, backend, 53)), TC_PASS, "rule 2");
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 81)), TC_ACT_SHOT, "no rule: not counted");
        // An open direction's flows belong to no rule.
        assert_eq!(verdict(dp, Hook::FromContainer, &Frame::udp(backend, fe, 5353)), TC_PASS);

        let counted = dp.rule_counters(1);
        let len = |f: &Frame| f.bytes().len() as u64;
        assert_eq!(counted.get(&(DIR_INGRESS, 1)), Some(&(3, 2 * len(&syn) + len(&reply))));
        assert_eq!(counted.get(&(DIR_INGRESS, 2)), Some(&(1, len(&Frame::udp(fe, backend, 53)))));
        assert_eq!(counted.get(&(DIR_INGRESS, 3)), Some(&(0, 0)), "a rule nothing used: {counted:?}");
        assert_eq!(counted.len(), 4, "one slot per rule: {counted:?}");

        // Rule 2 goes: its count goes with it; rule 1 keeps counting.
        let mut state = backend_state(vec![default_rules()[0].clone()]);
        state.revision = 2;
        assert!(dp.apply(&state).errors.is_empty());
        assert_eq!(dp.rule_counters(1).keys().copied().collect::<Vec<_>>(), [(DIR_INGRESS, 1)]);
        assert_eq!(dp.rule_counters(1)[&(DIR_INGRESS, 1)].0, 3, "rule 1 kept its count across the change");
        // The id handed to another pod in one pass (the old one gone, the
        // lowest free id reused at once): its endpoint counters start from
        // nothing. Rules count per policy set, and its policy is the same.
        assert!(dp.endpoint_counters(1).expect("counted").ingress.forwarded_packets > 0);
        state.endpoints[0].name = "default/successor".into();
        state.revision = 3;
        assert!(dp.apply(&state).errors.is_empty());
        assert_eq!(dp.endpoint_counters(1).expect("counted").ingress.forwarded_packets, 0);
        assert_eq!(dp.rule_counters(1)[&(DIR_INGRESS, 1)].0, 3, "the set's count");
        // A rule new to the set counts from nothing.
        Arc::make_mut(&mut state.endpoints[0].ingress).allow[0].rule = 7;
        state.revision = 4;
        assert!(dp.apply(&state).errors.is_empty());
        assert_eq!(dp.rule_counters(1)[&(DIR_INGRESS, 7)], (0, 0));
    });
}

#[test]
fn allowed_verdicts_are_reported_for_new_flows_when_asked() {
    let config = DatapathConfig { report_allowed: true, ..Default::default() };
    with_datapath_config(config, backend_state(default_rules()), |dp, events| {
        let (fe, backend) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS);
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS);
        let ev = events();
        assert_eq!(ev.len(), 1, "the new flow only, not its tracked packets: {ev:?}");
        let e = ev[0];
        assert_eq!((e.verdict, e.reason, e.rule_cookie), (VERDICT_FORWARDED, reason::POLICY_ALLOWED, 1));
        assert_eq!((e.remote_identity, e.direction, e.dst_port), (FRONTEND, DIR_INGRESS, 80));
    });
    // Off by default.
    with_datapath(backend_state(default_rules()), |dp, events| {
        assert_eq!(ingress(dp, Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 80)), TC_PASS);
        assert!(events().is_empty());
    });
}

#[test]
fn a_policy_that_does_not_fit_fails_closed_until_it_fits() {
    let mut config = DatapathConfig::default();
    config.map_sizes.set("policy=8").expect("size");
    let small = backend_state(vec![allow(FRONTEND, Some(Protocol::Tcp), Some((80, 80)), 1)]);
    with_datapath_config(config, small.clone(), move |dp, events| {
        let (fe, backend, node) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.254"));
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_PASS, "fits");
        events();

        // Twenty rules (frontend's TCP/80 among them) do not fit 8 entries.
        let mut big = backend_state(
            (0..20).map(|i| allow(FRONTEND, Some(Protocol::Tcp), Some((80 + i, 80 + i)), 1)).collect(),
        );
        big.revision = 2;
        let report = dp.apply(&big);
        assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
        let e = &report.errors[0];
        assert!(e.contains("default/backend") && e.contains("policy"), "names endpoint and map: {e}");
        // Nothing passes but the node: not the old policy, not tracked flows.
        let fresh = Frame { src_port: 50000, ..Frame::tcp(fe, backend, 80) };
        assert_eq!(ingress(dp, fresh.clone()), TC_ACT_SHOT, "fail closed");
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 80)), TC_ACT_SHOT, "the tracked flow too");
        let out = Frame::tcp(backend, ip("192.0.2.1"), 443);
        assert_eq!(verdict(dp, Hook::FromContainer, &out), TC_ACT_SHOT, "egress too");
        assert_eq!(ingress(dp, Frame::tcp(node, backend, 8080)), TC_PASS, "the node still reaches its pod");
        let ev = events();
        assert!(!ev.is_empty() && ev.iter().all(|e| e.reason == reason::NO_MAP_SPACE), "{ev:?}");
        let c = dp.endpoint_counters(1).expect("counted");
        assert_eq!(c.ingress.dropped_packets[reason::NO_MAP_SPACE as usize], 2);

        // Once the policy fits again, it is enforced.
        let mut fits = small.clone();
        fits.revision = 3;
        let report = dp.apply(&fits);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(ingress(dp, fresh), TC_PASS);
    });
}

#[test]
fn egress_to_a_service_is_judged_after_dnat_on_the_backend() {
    // The endpoint (lo, 10.0.0.2) may send TCP/8080 to frontend only; its
    // ingress admits TCP/8080 from anyone (the backend side of this test).
    let mut state = backend_state(vec![allow(identity::ANY, Some(Protocol::Tcp), Some((8080, 8080)), 2)]);
    state.endpoints[0].egress = DirectionPolicy {
        isolated: true,
        allow: vec![allow(FRONTEND, Some(Protocol::Tcp), Some((8080, 8080)), 7)],
        ..Default::default()
    }
    .into();
    state.services = vec![ServiceFrontend { ip: ip("10.96.0.10"), protocol: Protocol::Tcp, port: 80 }];
    let dp_state = state.clone();
    with_datapath(state, move |dp, events| {
        let (me, fe, admin, svc) = (ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.3"), ip("10.96.0.10"));
        let to_svc = |port| Frame { src_port: port, ..Frame::tcp(me, svc, 80) };
        let dnat = |port, backend| Frame { src_port: port, ..Frame::tcp(me, backend, 8080) };
        let tag = dp.node_tag();
        assert!((1..=255).contains(&tag), "a node tag is set at load: {tag}");
        let pending = mark::SERVICE_PENDING | tag | (1 << mark::ENDPOINT_SHIFT);

        // Leaving the pod the packet is not judged but marked...
        let (v, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43000).bytes(), 0x4000).expect("run");
        assert_eq!((v, m), (TC_PASS, pending | 0x4000), "kube-proxy's bits stay");
        // ...and after DNAT judged on the backend, the mark restored.
        let (v, m) = dp.test_run_marked(Hook::ToContainer, &dnat(43000, fe).bytes(), m).expect("run");
        assert_eq!((v, m), (TC_PASS, 0x4000), "frontend:8080 is allowed");
        // Later packets are checked after DNAT against the backend they
        // were judged on: that one passes, another one netfilter may pick
        // for the same tuple (its entry expired or was flushed) is judged.
        let (v, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43000).bytes(), 0).expect("run");
        assert_eq!((v, m), (TC_PASS, pending), "tracked, still marked");
        let (v, m2) = dp.test_run_marked(Hook::ToContainer, &dnat(43000, fe).bytes(), m).expect("run");
        assert_eq!((v, m2), (TC_PASS, 0), "the same backend");
        let (v, _) = dp.test_run_marked(Hook::ToNetdev, &dnat(43000, admin).bytes(), m).expect("run");
        assert_eq!(v, TC_ACT_SHOT, "another backend for the tracked tuple is judged: admin is not allowed");
        assert_eq!(events().len(), 1, "reported");
        // The replies (from the Service address) pass.
        let reply = Frame { src_port: 80, ..Frame::tcp(svc, me, 43000) };
        assert_eq!(ingress(dp, reply), TC_PASS, "reply from the Service address");
        assert!(events().is_empty());
        let tracked = ct_entry(dp, 43000, 80);
        assert_eq!(tracked.value.flags & ct_flags::SERVICE, ct_flags::SERVICE);
        assert_eq!((tracked.value.nat_port, &tracked.value.nat_addr[..4]), (8080, &[10, 0, 0, 1][..]));
        assert_eq!(dp.revoke_flows(), 0, "judged on its backend, the flow stays");

        // A backend the egress policy does not allow: dropped after DNAT,
        // reported as the client's egress.
        let (_, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43001).bytes(), 0).expect("run");
        assert_eq!(m, pending);
        let (v, m) = dp.test_run_marked(Hook::ToContainer, &dnat(43001, admin).bytes(), m).expect("run");
        assert_eq!((v, m), (TC_ACT_SHOT, 0));
        let ev = events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        let e = ev[0];
        assert_eq!((e.endpoint_id, e.direction, e.reason), (1, DIR_EGRESS, reason::POLICY_DENIED));
        assert_eq!((e.remote_identity, e.dst_port), (ADMIN, 8080));

        // A backend off the node: the node device's hook judges.
        let (_, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43002).bytes(), 0).expect("run");
        let (v, _) = dp.test_run_marked(Hook::ToNetdev, &dnat(43002, fe).bytes(), m).expect("run");
        assert_eq!(v, TC_PASS);
        let (_, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43003).bytes(), 0).expect("run");
        let (v, _) = dp.test_run_marked(Hook::ToNetdev, &dnat(43003, admin).bytes(), m).expect("run");
        assert_eq!(v, TC_ACT_SHOT);
        let (v, _) = dp.test_run_marked(Hook::ToNetdev, &dnat(43004, admin).bytes(), 0).expect("run");
        assert_eq!(v, TC_PASS, "unmarked traffic is not the node device's to judge");
        // Other software's marks are left alone: WireGuard's 0xca6c shares
        // our magic nibble, and another node's tag is not ours.
        for foreign in [0xca6c, mark::SERVICE_PENDING | (tag % 255 + 1) | (1 << mark::ENDPOINT_SHIFT)] {
            let (v, m) =
                dp.test_run_marked(Hook::ToNetdev, &dnat(43004, admin).bytes(), foreign).expect("run");
            assert_eq!((v, m), (TC_PASS, foreign), "foreign mark {foreign:#x}");
        }
        events();

        // A mark without its pending record (evicted; and this CPU last
        // marked another kind of packet): fail closed.
        let udp = Frame { src_port: 43005, ..Frame::udp(me, fe, 8080) };
        let (v, _) = dp.test_run_marked(Hook::ToContainer, &udp.bytes(), pending).expect("run");
        assert_eq!(v, TC_ACT_SHOT);
        assert_eq!(events()[0].reason, reason::NO_MAP_SPACE);

        // Another port of the ClusterIP is no Service: judged as it is.
        let other = Frame { src_port: 43006, ..Frame::tcp(me, svc, 81) };
        assert_eq!(
            dp.test_run_marked(Hook::FromContainer, &other.bytes(), 0).expect("run"),
            (TC_ACT_SHOT, 0)
        );

        // A policy change that takes frontend:8080 away cuts the connection
        // made through the Service: its next packet is marked again.
        let mut next = dp_state.clone();
        next.revision = 2;
        Arc::make_mut(&mut next.endpoints[0].egress).allow.clear();
        assert!(dp.apply(&next).errors.is_empty());
        assert!(dp.revoke_flows() >= 1);
        let (_, m) = dp.test_run_marked(Hook::FromContainer, &to_svc(43000).bytes(), 0).expect("run");
        assert_eq!(m, pending, "no longer tracked");
    });
}

/// The agent reads and deletes conntrack in batches of 4,096 (revocation
/// and the sweep walk all of it): every entry comes back once, as written,
/// and the sweep deletes exactly the expired ones.
#[test]
fn conntrack_is_read_whole_across_batches() {
    with_datapath(backend_state(vec![]), |dp, _| {
        let (me, peer) = (ip("10.0.0.2"), ip("10.0.0.1"));
        assert_eq!(verdict(dp, Hook::FromContainer, &Frame::udp(me, peer, 53)), TC_PASS);
        let template = dp.conntrack_entries()[0];
        let written: std::collections::BTreeMap<u16, u64> =
            (0..10_000u16).map(|i| (20_000 + i, u64::from(i) * 7 + 1)).collect();
        for (&port, &expires_ns) in &written {
            let key = portcullis_common::CtKey { local_port: port, ..template.key };
            dp.conntrack_set(&CtEntry { key, value: CtValue { expires_ns, ..template.value } })
                .expect("write");
        }
        let read: Vec<CtEntry> = dp.conntrack_entries();
        assert_eq!(read.len(), written.len() + 1, "each entry once");
        let by_port: std::collections::BTreeMap<u16, u64> = read
            .iter()
            .filter(|e| e.key != template.key)
            .map(|e| (e.key.local_port, e.value.expires_ns))
            .collect();
        assert_eq!(by_port, written);
        // Deleted in batches too: the sweep takes the 5,000 that expired
        // by its clock (i * 7 + 1 <= 35,000), spread over every batch.
        let sweep = dp.sweep_conntrack(35_000);
        assert_eq!((sweep.removed, sweep.live), (5_000, 5_001));
        let left: Vec<u16> = dp.conntrack_entries().iter().map(|e| e.key.local_port).collect();
        assert_eq!(left.len(), 5_001);
        assert!(left.iter().all(|&p| p == template.key.local_port || p >= 25_000), "only the expired went");
    });
}

#[test]
fn a_full_conntrack_table_evicts_the_oldest_flows_which_then_meet_the_policy_again() {
    let mut config = DatapathConfig::default();
    config.map_sizes.set("conntrack=64").expect("size");
    // Ingress isolated and allowing nothing: a reply passes only by conntrack.
    with_datapath_config(config, backend_state(vec![]), |dp, _| {
        let (me, peer) = (ip("10.0.0.2"), ip("10.0.0.1"));
        let out = |port| Frame { src_port: port, ..Frame::udp(me, peer, 53) };
        let reply = |port| Frame { src_port: 53, ..Frame::udp(peer, me, port) };
        for port in 20000..20400 {
            assert_eq!(verdict(dp, Hook::FromContainer, &out(port)), TC_PASS, "egress is open");
        }
        let tracked = dp.conntrack_entries().len();
        assert!(tracked <= 64, "the table holds at most its size: {tracked}");
        let sweep = dp.sweep_conntrack(monotonic_ns());
        assert_eq!(sweep.capacity, 64);
        assert!(sweep.nearly_full(), "reported: {sweep:?}");
        assert_eq!(ingress(dp, reply(20399)), TC_PASS, "the newest flow is tracked");
        assert_eq!(
            ingress(dp, reply(20000)),
            TC_ACT_SHOT,
            "the oldest was evicted: its reply meets the policy"
        );
        // Evicted flows are re-judged, never waved through: sending again
        // tracks the flow anew.
        assert_eq!(verdict(dp, Hook::FromContainer, &out(20000)), TC_PASS);
        assert_eq!(ingress(dp, reply(20000)), TC_PASS);
    });
}

#[test]
fn sctp_ports_and_ranges_are_judged_and_tracked_like_tcp() {
    // This kernel may have no SCTP sockets; the programs judge SCTP headers
    // all the same.
    let rules = vec![
        allow(FRONTEND, Some(Protocol::Sctp), Some((5000, 5000)), 1),
        allow(identity::ANY, Some(Protocol::Sctp), Some((6000, 6010)), 2),
    ];
    with_datapath(backend_state(rules), |dp, events| {
        let (fe, backend, world) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("192.0.2.9"));
        let sctp = |src, port| Frame::new(src, backend, packets::SCTP, port);
        assert_eq!(ingress(dp, sctp(fe, 5000)), TC_PASS);
        assert_eq!(ingress(dp, sctp(fe, 5001)), TC_ACT_SHOT, "only 5000");
        assert_eq!(ingress(dp, sctp(world, 5000)), TC_ACT_SHOT, "only frontend");
        assert_eq!(ingress(dp, Frame::tcp(fe, backend, 5000)), TC_ACT_SHOT, "an SCTP rule never allows TCP");
        assert_eq!(ingress(dp, sctp(world, 6010)), TC_PASS, "range end");
        assert_eq!(ingress(dp, sctp(world, 6011)), TC_ACT_SHOT, "past the range");
        // The association's packets back from the backend pass by conntrack.
        let back = Frame { src_port: 5000, ..Frame::new(backend, fe, packets::SCTP, 40000) };
        assert_eq!(verdict(dp, Hook::FromContainer, &back), TC_PASS);
        let e = events();
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().all(|e| e.reason == reason::POLICY_DENIED));
        assert_eq!(e.iter().filter(|e| e.protocol == packets::SCTP).count(), 3);
        let c = dp.endpoint_counters(1).expect("counted");
        assert_eq!((c.ingress.forwarded_packets, c.ingress.dropped_total()), (2, 4));
        assert_eq!(ct_entry(dp, 5000, 40000).value.origin, DIR_INGRESS);
    });
}

#[test]
fn icmp_errors_about_tracked_flows_pass_as_related() {
    // Ingress isolated and allowing nothing: an ICMP error reaches the pod
    // only as related to a flow it opened.
    with_datapath(backend_state(vec![]), |dp, _| {
        for (me, peer, router) in [
            (ip("10.0.0.2"), ip("10.0.0.1"), ip("192.0.2.254")),
            (ip("fd00::2"), ip("fd00::1"), ip("2001:db8::fe")),
        ] {
            let udp = Frame { src_port: 43000, ..Frame::udp(me, peer, 53) };
            assert_eq!(verdict(dp, Hook::FromContainer, &udp), TC_PASS, "egress is open");
            // Port unreachable from the peer, and from a router on the way.
            assert_eq!(ingress(dp, Frame::icmp_error(peer, me, &udp)), TC_PASS, "{me}: related");
            assert_eq!(
                ingress(dp, Frame::icmp_error(router, me, &udp)),
                TC_PASS,
                "{me}: related, from a router"
            );
            // About a flow the pod never opened: judged as ICMP, and denied.
            let other = Frame { src_port: 43001, ..Frame::udp(me, peer, 53) };
            assert_eq!(ingress(dp, Frame::icmp_error(peer, me, &other)), TC_ACT_SHOT, "{me}: unrelated");
            // About a TCP connection and an echo request the pod made.
            let tcp = Frame { src_port: 43002, ..Frame::tcp(me, peer, 443) };
            assert_eq!(verdict(dp, Hook::FromContainer, &tcp), TC_PASS);
            assert_eq!(ingress(dp, Frame::icmp_error(router, me, &tcp)), TC_PASS, "{me}: TCP related");
            let ping = Frame {
                src_port: 9,
                dst_port: 9,
                ..Frame::icmp(me, peer, if me.is_ipv4() { 8 } else { 128 })
            };
            assert_eq!(verdict(dp, Hook::FromContainer, &ping), TC_PASS);
            assert_eq!(ingress(dp, Frame::icmp_error(router, me, &ping)), TC_PASS, "{me}: echo related");
        }
    });
}

#[test]
fn a_pinned_map_of_another_size_is_replaced_at_load() {
    let ns = Netns::create(format!("pc{}-resize-{}", std::process::id(), unique())).expect("netns");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    ns.run(move || {
        let mut small = DatapathConfig { pin_dir, ..Default::default() };
        small.map_sizes.set("policy=8").expect("size");
        let many: Vec<AllowEntry> =
            (0..20).map(|i| allow(FRONTEND, Some(Protocol::Tcp), Some((80 + i, 80 + i)), 1)).collect();
        {
            let mut dp = Datapath::load(&small).expect("load");
            let report = dp.apply(&backend_state(many.clone()));
            assert_eq!(report.errors.len(), 1, "20 rules do not fit 8 entries: {:?}", report.errors);
        } // the agent exits; the 8-entry map stays pinned

        // A new agent with a larger policy map: the pinned one is replaced,
        // so the same state now fits.
        let larger = DatapathConfig { map_sizes: Default::default(), ..small };
        let mut dp = Datapath::load(&larger).expect("reload with another size");
        let report = dp.apply(&backend_state(many));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(ingress(&dp, Frame::tcp(ip("10.0.0.1"), ip("10.0.0.2"), 99)), TC_PASS);
    })
    .expect("test body");
}

/// The filters of many interfaces go in one rtnetlink exchange: each
/// interface gets one filter per hook, an interface that is gone fails
/// alone, attaching again replaces the program in place (no second filter),
/// and a restarted agent's programs take over the same filters.
#[test]
fn interfaces_attached_together_each_get_one_filter_per_hook() {
    let ns = Netns::create(format!("pc{}-many-{}", std::process::id(), unique())).expect("netns");
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    ns.run(move || {
        // More than one rtnetlink buffer's worth (32 interfaces).
        let names: Vec<String> = (0..40).map(|i| format!("many{i}")).collect();
        for name in &names {
            let out = std::process::Command::new("ip")
                .args(["link", "add", name, "type", "veth", "peer", "name", &format!("{name}p")])
                .output()
                .expect("ip link add");
            assert!(out.status.success(), "ip: {}", String::from_utf8_lossy(&out.stderr));
        }
        let indexes: Vec<u32> =
            names.iter().map(|n| portcullis_agent::datapath::ifindex(n).expect("index")).collect();
        let gone = indexes.iter().max().expect("indexes") + 1000;
        // What `tc` lists on a hook: the ids of the programs in our filters.
        let programs = |interface: &str, direction: &str| -> Vec<String> {
            let out = std::process::Command::new("tc")
                .args(["filter", "show", "dev", interface, direction])
                .output()
                .expect("tc filter show");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("handle 0x5043"))
                .map(|l| l.split(" id ").nth(1).unwrap_or_default().split_whitespace().next().unwrap_or_default().to_string())
                .collect()
        };
        // Half of them readied as a CNI ADD's wait does: a clsact qdisc and
        // no filter yet; twice, and on an interface that does not exist.
        for name in names.iter().step_by(2) {
            portcullis_agent::datapath::prepare_interface(name).expect("prepare");
            portcullis_agent::datapath::prepare_interface(name).expect("prepare again");
            let out = std::process::Command::new("tc").args(["qdisc", "show", "dev", name]).output().expect("tc");
            assert!(String::from_utf8_lossy(&out.stdout).contains("clsact"), "{name}: no clsact");
            assert!(programs(name, "ingress").is_empty() && programs(name, "egress").is_empty());
        }
        portcullis_agent::datapath::prepare_interface("no-such-if").expect("left to the pass");
        let config = DatapathConfig { pin_dir, ..Default::default() };
        let mut first = Vec::new();
        {
            let mut dp = Datapath::load(&config).expect("load");
            let mut asked = indexes.clone();
            asked.insert(1, gone);
            let results = dp.attach_many(&asked);
            for (i, result) in results.iter().enumerate() {
                match i {
                    1 => assert!(
                        matches!(result, Err(portcullis_agent::datapath::AttachError::NoInterface(i)) if *i == gone),
                        "{result:?}"
                    ),
                    _ => assert!(result.is_ok(), "interface {i}: {result:?}"),
                }
            }
            for name in &names {
                for direction in ["ingress", "egress"] {
                    let ids = programs(name, direction);
                    assert_eq!(ids.len(), 1, "{name} {direction}: {ids:?}");
                    first.push(ids[0].clone());
                }
            }
            // Again: the same filters, the same programs.
            assert!(dp.attach_many(&indexes).iter().all(Result::is_ok));
            let again: Vec<String> =
                names.iter().flat_map(|n| ["ingress", "egress"].map(|d| programs(n, d))).flatten().collect();
            assert_eq!(again, first);
        }
        // A new agent's programs replace the old ones inside the filters.
        let mut dp = Datapath::load(&config).expect("reload");
        assert!(dp.attach_many(&indexes).iter().all(Result::is_ok));
        for (i, name) in names.iter().enumerate() {
            for (j, direction) in ["ingress", "egress"].iter().enumerate() {
                let ids = programs(name, direction);
                assert_eq!(ids.len(), 1, "{name} {direction} after the restart: {ids:?}");
                assert_ne!(ids[0], first[i * 2 + j], "{name} {direction}: the new agent's program");
            }
        }
    })
    .expect("test body");
}

/// A pass says when it hands an endpoint id or a peer address to another
/// holder (new pods then wait for the old flows' revocation before they are
/// said to be enforced); a pass that only narrows a policy, or only adds,
/// does not.
#[test]
fn a_pass_says_when_an_id_or_an_address_changes_holder() {
    with_datapath(backend_state(default_rules()), |dp, _| {
        let mut rules = default_rules();
        rules.truncate(2);
        let report = dp.apply(&backend_state(rules.clone()));
        assert!(report.narrowed && !report.reused, "a policy narrowed: {report:?}");

        let mut added = backend_state(rules);
        added.ipcache.push(IpcacheEntry {
            cidr: "10.0.0.5/32".parse().expect("cidr"),
            identity: MONITOR,
            name: None,
        });
        added.ipcache.sort();
        let report = dp.apply(&added);
        assert!(!report.narrowed && !report.reused, "a peer added: {report:?}");

        let mut moved = added.clone();
        let admin = moved.ipcache.iter_mut().find(|e| e.identity == ADMIN).expect("admin's address");
        admin.identity = MONITOR;
        let report = dp.apply(&moved);
        assert!(report.narrowed && report.reused, "an address to another identity: {report:?}");

        let mut handed = moved.clone();
        handed.endpoints[0].name = "default/backend-2".into();
        let report = dp.apply(&handed);
        assert!(report.reused, "the endpoint id to a new pod: {report:?}");

        let mut emptied = handed.clone();
        emptied.endpoints.clear();
        let report = dp.apply(&emptied);
        assert!(report.reused, "an endpoint gone (its id and addresses free for the next pod): {report:?}");
    });
}

/// What a pod with CAP_NET_RAW can put in a packet earns no exemption meant
/// for something else (issue 24), and the paths around Services keep working
/// for what the policy allows (the positive controls).
#[test]
fn forged_exemptions_earn_nothing_and_service_corners_keep_working() {
    // The endpoint (lo, 10.0.0.2) may send TCP/8080 to frontend and to
    // itself, nothing else.
    let mut state = backend_state(default_rules());
    state.ipcache.push(IpcacheEntry {
        cidr: "10.0.0.2/32".parse().expect("cidr"),
        identity: 400,
        name: None,
    });
    state.endpoints[0].egress = DirectionPolicy {
        isolated: true,
        allow: vec![
            allow(FRONTEND, Some(Protocol::Tcp), Some((8080, 8080)), 7),
            allow(400, Some(Protocol::Tcp), Some((8080, 8080)), 8),
            allow(FRONTEND, Some(Protocol::Udp), Some((5353, 5353)), 9),
        ],
        ..Default::default()
    }
    .into();
    state.services = vec![
        ServiceFrontend { ip: ip("10.96.0.10"), protocol: Protocol::Tcp, port: 80 },
        ServiceFrontend { ip: ip("10.96.0.11"), protocol: Protocol::Udp, port: 53 },
    ];
    with_datapath(state, |dp, events| {
        let tag = dp.node_tag();
        let ours = |m: u32| m & mark::MAGIC_MASK;
        let (me, me6, fe) = (ip("10.0.0.2"), ip("fd00::2"), ip("10.0.0.1"));
        let out = |frame: &Frame| dp.test_run_marked(Hook::FromContainer, &frame.bytes(), 0).expect("run");

        // IPv4 carrying protocol 58, dressed as a neighbour solicitation.
        let fake_nd =
            Frame { hop_limit: 255, icmp_type: 135, ..Frame::new(me, ip("192.0.2.7"), packets::ICMPV6, 0) };
        assert_eq!(out(&fake_nd).0, TC_ACT_SHOT, "ND over IPv4 is just an unknown protocol");
        // Real neighbour discovery passes (positive control), marked as
        // link-only: routed on, it is dropped where it leaves the node or
        // enters a pod; on the link (a bridge) it arrives.
        let nd = Frame { hop_limit: 255, ..Frame::icmp(me6, ip("2001:db8::7"), 135) };
        let (v, m) = out(&nd);
        assert_eq!((v, ours(m)), (TC_PASS, mark::LINK_ONLY | tag));
        let routed = Frame { hop_limit: 254, ..nd.clone() };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &routed.bytes(), m).expect("run"), (TC_ACT_SHOT, 0));
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &nd.bytes(), m).expect("run"), (TC_PASS, 0));
        let into_pod = Frame { hop_limit: 254, ..Frame::icmp(ip("fd00::1"), me6, 135) };
        assert_eq!(dp.test_run_marked(Hook::ToContainer, &into_pod.bytes(), m).expect("run").0, TC_ACT_SHOT);
        let on_link = Frame { hop_limit: 255, ..into_pod };
        assert_eq!(dp.test_run_marked(Hook::ToContainer, &on_link.bytes(), m).expect("run").0, TC_PASS);

        // An ICMP error quoting a tracked flow goes back to the quoted
        // packet's sender only: anywhere else it is a packet like any other.
        let inbound = Frame { src_port: 41000, ..Frame::tcp(fe, me, 80) };
        assert_eq!(ingress(dp, inbound.clone()), TC_PASS);
        assert_eq!(out(&Frame::icmp_error(me, fe, &inbound)).0, TC_PASS, "back to the sender");
        assert_eq!(
            out(&Frame::icmp_error(me, ip("192.0.2.7"), &inbound)).0,
            TC_ACT_SHOT,
            "carried elsewhere"
        );

        // A fragmented datagram to a Service: the later fragments follow the
        // first to the verdict after DNAT, instead of being dropped portless.
        let dns = ip("10.96.0.11");
        let first = Frame { more_fragments: true, ip_id: 77, src_port: 40053, ..Frame::udp(me, dns, 53) };
        let (v, m) = out(&first);
        assert_eq!((v, ours(m)), (TC_PASS, mark::SERVICE_PENDING | tag));
        let later = Frame { frag_offset: 100, ip_id: 77, src_port: 40053, ..Frame::udp(me, dns, 53) };
        let (v, m) = out(&later);
        assert_eq!(
            (v, ours(m)),
            (TC_PASS, mark::SERVICE_PENDING | tag),
            "the later fragment is the Service's too"
        );
        let after = Frame { src_port: 40053, ..Frame::udp(me, fe, 5353) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &after.bytes(), m).expect("run").0, TC_PASS);

        // Hairpin: the pod reaches its own Service and kube-proxy
        // masquerades it (source: the node, a random port). Judged on the
        // backend (itself), tracked under the pod's own tuple, and the reply
        // passes.
        let svc = ip("10.96.0.10");
        let (_, m) = out(&Frame { src_port: 45000, ..Frame::tcp(me, svc, 80) });
        // (kube-proxy masquerades with --random-fully: another port.)
        let masqueraded = Frame { src_port: 61111, ..Frame::tcp(ip("10.0.0.254"), me, 8080) };
        assert_eq!(
            dp.test_run_marked(Hook::ToContainer, &masqueraded.bytes(), m).expect("run"),
            (TC_PASS, 0)
        );
        let reply = Frame { src_port: 80, tcp_flags: 0x12, ..Frame::tcp(svc, me, 45000) };
        assert_eq!(ingress(dp, reply), TC_PASS, "the reply from the Service address");

        // Masquerade toward a backend off the node (kube-proxy's
        // masquerade-all, a CNI's SNAT): the node's device still finds the
        // record under the client's own address, judges, and tracks it.
        let (_, m) = out(&Frame { src_port: 45100, ..Frame::tcp(me, svc, 80) });
        let snat = Frame { src_port: 62222, ..Frame::tcp(ip("10.0.0.254"), fe, 8080) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &snat.bytes(), m).expect("run"), (TC_PASS, 0));
        let reply = Frame { src_port: 80, tcp_flags: 0x12, ..Frame::tcp(svc, me, 45100) };
        assert_eq!(ingress(dp, reply), TC_PASS, "the reply of the masqueraded connection");
        let (_, m) = out(&Frame { src_port: 45101, ..Frame::tcp(me, svc, 80) });
        let snat = Frame { src_port: 45101, ..Frame::tcp(ip("10.0.0.254"), ip("10.0.0.3"), 8080) };
        assert_eq!(
            dp.test_run_marked(Hook::ToNetdev, &snat.bytes(), m).expect("run").0,
            TC_ACT_SHOT,
            "admin"
        );

        // An ICMP error about a Service flow, out of an isolated pod: not
        // related (netfilter would carry it to the flow's backend unjudged).
        let svc_flow = Frame { src_port: 80, ..Frame::tcp(svc, me, 45100) };
        assert_eq!(out(&Frame::icmp_error(me, svc, &svc_flow)).0, TC_ACT_SHOT, "ICMP error to a Service");
        // A flow opened from a Service address (its entry expired, or a
        // forged source): the pod's packets on it are still judged after
        // DNAT, on the backend.
        let from_svc = Frame { src_port: 53, ..Frame::udp(dns, me, 53) };
        assert_eq!(ingress(dp, from_svc), TC_PASS, "the pod's ingress admits UDP/53 from anyone");
        let (v, m) = out(&Frame { src_port: 53, ..Frame::udp(me, dns, 53) });
        assert_eq!((v, ours(m)), (TC_PASS, mark::SERVICE_PENDING | tag), "marked, not passed as tracked");
        let to_admin = Frame { src_port: 53, ..Frame::udp(me, ip("10.0.0.3"), 5353) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &to_admin.bytes(), m).expect("run").0, TC_ACT_SHOT);
        // A datagram netfilter fragments again after DNAT: its later
        // fragments, marked like the first, follow the first's verdict.
        let (_, m) = out(&Frame { src_port: 40054, ..Frame::udp(me, dns, 53) });
        let first = Frame { more_fragments: true, ip_id: 78, src_port: 40054, ..Frame::udp(me, fe, 5353) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &first.bytes(), m).expect("run").0, TC_PASS);
        let later = Frame { frag_offset: 100, ip_id: 78, src_port: 40054, ..Frame::udp(me, fe, 5353) };
        assert_eq!(
            dp.test_run_marked(Hook::ToNetdev, &later.bytes(), m).expect("run").0,
            TC_PASS,
            "later fragment"
        );

        // A port reused after the connection closed: the new SYN is judged
        // again after DNAT (netfilter may pick another backend), not passed
        // as the old flow. A retransmitted SYN of an unanswered one is not.
        let (_, m) = out(&Frame { src_port: 46000, ..Frame::tcp(me, svc, 80) });
        let to_fe = Frame { src_port: 46000, ..Frame::tcp(me, fe, 8080) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &to_fe.bytes(), m).expect("run").0, TC_PASS);
        assert_eq!(
            ingress(dp, Frame { src_port: 80, tcp_flags: 0x12, ..Frame::tcp(svc, me, 46000) }),
            TC_PASS
        );
        let (v, m) = out(&Frame { src_port: 46000, ..Frame::tcp(me, svc, 80) });
        assert_eq!((v, ours(m)), (TC_PASS, mark::SERVICE_PENDING | tag), "a new connection on an old tuple");
        let to_admin = Frame { src_port: 46000, ..Frame::tcp(me, ip("10.0.0.3"), 8080) };
        assert_eq!(dp.test_run_marked(Hook::ToNetdev, &to_admin.bytes(), m).expect("run").0, TC_ACT_SHOT);
        events();
    });
}

/// `to_host` attaches to a cgroup's ingress, as a pinned link that a second
/// agent replaces, and the pins hold it.
#[test]
fn the_host_hook_attaches_to_a_cgroup_and_a_new_agent_replaces_it() {
    // A cgroup of our own under the machine's cgroup v2 root.
    let root = portcullis_agent::datapath::cgroup_v2_root(std::path::Path::new("/sys/fs/cgroup"))
        .expect("cgroup v2");
    let cgroup = root.join(format!("portcullis-test-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("cgroup");
    let pins = PinDir::new();
    let config = DatapathConfig { pin_dir: pins.path.clone(), ..Default::default() };
    for _ in 0..2 {
        let mut dp = Datapath::load(&config).expect("load");
        if let Err(e) = dp.attach_host(&cgroup) {
            let _ = std::fs::remove_dir(&cgroup);
            panic!("attach: {:?}", anyhow::Error::from(e));
        }
    }
    assert!(pins.path.join("links/host-cgroup").exists(), "the link is pinned");
    drop(pins);
    let _ = std::fs::remove_dir(&cgroup);
}
