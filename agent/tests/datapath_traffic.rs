//! The agent binary enforcing a compiled state on real TCP and UDP traffic
//! between pods (network namespaces), with drops reported as flow lines.
//! Needs root, network namespaces and BPF.

mod bed_state;

use std::{net::IpAddr, time::Duration};

use bed_state::{PodPolicy, isolated, open};

use portcullis_agent::compiled::{AllowEntry, CompiledState, PortRange, Protocol};
use portcullis_testbed::{
    Bed, Conversation, PinDir, Transport,
    agent::{AgentProcess, StateFile},
    ping, probe,
};

/// A dropped SYN or datagram never answers; this is how long we wait to say so.
const DENIED: Duration = Duration::from_millis(700);

const FRONTEND: u32 = 1000;
const OTHER: u32 = 1001;
const BACKEND: u32 = 1002;

fn state(bed: &Bed, revision: u64, backend_ingress: Vec<AllowEntry>) -> CompiledState {
    let backend = PodPolicy { ingress: isolated(backend_ingress), ..open("backend", BACKEND) };
    bed_state::state(bed, revision, vec![open("frontend", FRONTEND), open("other", OTHER), backend])
}

fn allow(peer: u32, protocol: Protocol, port: u16) -> AllowEntry {
    AllowEntry { peer, protocol: Some(protocol), ports: Some(PortRange::single(port)), rule: 1 }
}

/// Whether `from` gets an answer from `to:port`. A dropped probe is retried
/// never; an answered one is checked to come from the expected server.
fn reaches(bed: &Bed, from: &str, to: IpAddr, transport: Transport, port: u16) -> bool {
    probe(&bed.pod(from).netns, transport, to, port, DENIED).expect("probe").is_some()
}

#[test]
fn agent_enforces_tcp_and_udp_between_pods() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["frontend", "other", "backend"] {
        bed.add_pod(pod).expect("pod");
    }
    bed.serve("backend", 80).expect("serve");
    bed.serve("backend", 53).expect("serve");
    bed.serve("frontend", 80).expect("serve");
    bed.serve_echo("backend", 8080).expect("serve echo");
    let pins = PinDir::new();
    let file = StateFile::new(&bed.id).expect("state file");
    let write = |s: &CompiledState| file.write(&serde_json::to_vec(s).expect("json")).expect("write state");
    let frontend_rules = vec![
        allow(FRONTEND, Protocol::Tcp, 80),
        allow(FRONTEND, Protocol::Udp, 53),
        allow(FRONTEND, Protocol::Tcp, 8080),
    ];
    write(&state(&bed, 1, frontend_rules.clone()));

    // This agent attaches TCX links, as earlier releases did; the one that
    // takes over below (tc filters by default) keeps them.
    let args = bed_state::run_args(&file, &pins);
    let mut tcx_args = args.clone();
    tcx_args.extend(["--attach".into(), "tcx".into()]);
    let mut agent = bed_state::start_agent(&bed, &tcx_args, 1);
    let wait = |agent: &mut AgentProcess, parts: &[&str], secs: u64| {
        agent.wait_for(parts, Duration::from_secs(secs)).expect("agent line")
    };

    let backend = bed.pod("backend");
    let (b4, b6) = (IpAddr::from(backend.ipv4), IpAddr::from(backend.ipv6));
    use Transport::{Tcp, Udp};
    for addr in [b4, b6] {
        assert!(reaches(&bed, "frontend", addr, Tcp, 80), "frontend -> backend {addr} TCP/80");
        assert!(reaches(&bed, "frontend", addr, Udp, 53), "frontend -> backend {addr} UDP/53");
        assert!(
            !reaches(&bed, "frontend", addr, Tcp, 53),
            "frontend -> backend {addr} TCP/53 is not allowed"
        );
        assert!(!reaches(&bed, "other", addr, Tcp, 80), "other -> backend {addr} TCP/80");
        assert!(!reaches(&bed, "other", addr, Udp, 53), "other -> backend {addr} UDP/53");
    }
    // ICMP: only a rule without ports admits it (none here), and replies
    // of pings the backend sends pass by conntrack.
    let (f4, f6) = (IpAddr::from(bed.pod("frontend").ipv4), IpAddr::from(bed.pod("frontend").ipv6));
    for (b, f) in [(b4, f4), (b6, f6)] {
        assert!(!ping(&bed.pod("frontend").netns, b, DENIED).expect("ping"), "frontend pings backend {b}");
        assert!(ping(&bed.pod("backend").netns, f, DENIED).expect("ping"), "backend pings frontend {f}");
    }
    assert!(reaches(&bed, "backend", f4, Tcp, 80), "frontend is not isolated");
    assert!(reaches(&bed, "other", f4, Tcp, 80), "frontend is not isolated");

    // Drops arrive as flow lines naming both sides.
    let drop80 =
        ["default/other:", "-> default/backend:80", "INGRESS Policy denied DROPPED", "TCP Flags: SYN"];
    wait(&mut agent, &drop80, 5);
    wait(&mut agent, &["default/other:", "-> default/backend:53", "DROPPED (UDP)"], 5);

    // A long-lived connection, allowed now.
    let mut talk = Conversation::open(&bed.pod("frontend").netns, b4, 8080, DENIED).expect("connect to echo");
    assert!(talk.exchange("before"), "the established connection works");

    // A rule without ports admits ICMP too.
    let mut with_other = frontend_rules.clone();
    with_other.push(AllowEntry { peer: OTHER, protocol: None, ports: None, rule: 2 });
    write(&state(&bed, 2, with_other));
    wait(&mut agent, &["enforced revision 2"], 10);
    for b in [b4, b6] {
        assert!(ping(&bed.pod("other").netns, b, DENIED).expect("ping"), "other pings backend {b}");
        assert!(!ping(&bed.pod("frontend").netns, b, DENIED).expect("ping"), "frontend still may not");
    }
    assert!(talk.exchange("still"), "a new revision that keeps its rule keeps the connection");

    // A new revision revokes TCP/80 and TCP/8080 from frontend: new
    // connections are refused, and the established one is cut.
    write(&state(&bed, 3, vec![allow(FRONTEND, Protocol::Udp, 53)]));
    wait(&mut agent, &["enforced revision 3"], 10);
    assert!(!reaches(&bed, "frontend", b4, Tcp, 80), "revoked");
    assert!(!talk.exchange("after"), "the established connection is cut");
    assert!(reaches(&bed, "frontend", b4, Udp, 53), "still allowed");

    // The backend's sandbox restarts: same veth name, new interface. The
    // agent converges on its own and enforces on the new interface.
    bed.recreate_veth("backend").expect("recreate veth");
    wait(&mut agent, &["enforced revision 3 (reconciled)"], 5);
    assert!(!reaches(&bed, "other", b4, Tcp, 80), "enforced on the recreated veth");
    assert!(reaches(&bed, "frontend", b4, Udp, 53), "allowed on the recreated veth");

    // The agent is killed; the pinned programs and maps keep enforcing.
    agent.kill();
    assert!(!reaches(&bed, "other", b4, Tcp, 80), "still enforced with the agent stopped");
    assert!(reaches(&bed, "frontend", b4, Udp, 53), "still allowed with the agent stopped");

    // A new agent (an upgrade) takes over the pinned state and moves it on.
    write(&state(&bed, 4, vec![allow(OTHER, Protocol::Tcp, 80)]));
    let mut agent = bed_state::start_agent(&bed, &args, 4);
    assert!(reaches(&bed, "other", b4, Tcp, 80), "allowed by revision 4");
    assert!(!reaches(&bed, "frontend", b4, Tcp, 80), "still revoked");
    assert!(!reaches(&bed, "frontend", b4, Udp, 53), "revoked by revision 4");
    // It swapped its programs into the TCX links; it added no filters,
    // which would judge packets a second time.
    let host_if = bed.pod("backend").host_if.clone();
    for direction in ["ingress", "egress"] {
        let out = bed.node.command("tc").args(["filter", "show", "dev", &host_if, direction]).output();
        let out = out.expect("tc filter show");
        assert!(out.stdout.is_empty(), "{direction}: {}", String::from_utf8_lossy(&out.stdout));
    }
    agent.stop();

    // Uninstalling removes the pins, and with them enforcement.
    let out = bed
        .node
        .command(env!("CARGO_BIN_EXE_agent"))
        .args(["uninstall", "--pin-dir"])
        .arg(&pins.path)
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!pins.path.exists());
    assert!(reaches(&bed, "frontend", b4, Tcp, 80), "nothing enforces after uninstall");
    assert!(reaches(&bed, "frontend", b4, Udp, 53), "nothing enforces after uninstall");
}

/// tc filters, unlike pinned TCX links, can be taken away by anyone with
/// `CAP_NET_ADMIN` (the qdisc deleted, a hook flushed, a priority deleted):
/// the agent hears of it from the kernel and puts them back, so the pod is
/// enforced again at once.
#[test]
fn hooks_someone_else_removes_are_put_back() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["frontend", "other", "backend"] {
        bed.add_pod(pod).expect("pod");
    }
    bed.serve("backend", 80).expect("serve");
    let pins = PinDir::new();
    let file = StateFile::new(&bed.id).expect("state file");
    file.write(&serde_json::to_vec(&state(&bed, 1, vec![allow(FRONTEND, Protocol::Tcp, 80)])).expect("json"))
        .expect("write state");
    let mut agent = bed_state::start_agent(&bed, &bed_state::run_args(&file, &pins), 1);
    let b4 = IpAddr::from(bed.pod("backend").ipv4);
    assert!(!reaches(&bed, "other", b4, Transport::Tcp, 80), "enforced");

    let host_if = bed.pod("backend").host_if.clone();
    let filters = |direction: &str| {
        let out = bed.node.command("tc").args(["filter", "show", "dev", &host_if, direction]).output();
        String::from_utf8_lossy(&out.expect("tc filter show").stdout).into_owned()
    };
    assert!(filters("ingress").contains("handle 0x5043"), "{}", filters("ingress"));
    // The qdisc, a hook's filters flushed, the filters at our priority.
    let removals: [&[&str]; 3] = [
        &["qdisc", "del", "dev", &host_if, "clsact"],
        &["filter", "del", "dev", &host_if, "ingress"],
        &["filter", "del", "dev", &host_if, "egress", "pref", "1"],
    ];
    for (round, removal) in removals.iter().enumerate() {
        let out = bed.node.command("tc").args(*removal).output();
        assert!(out.expect("tc").status.success(), "round {round}: tc {removal:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !["ingress", "egress"].iter().all(|d| filters(d).contains("handle 0x5043")) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the filters are not back after 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!reaches(&bed, "other", b4, Transport::Tcp, 80), "round {round}: enforced again");
        assert!(reaches(&bed, "frontend", b4, Transport::Tcp, 80), "round {round}: still allowed");
    }
    agent.stop();
}
