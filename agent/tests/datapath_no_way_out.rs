//! An isolated pod never gets out (issue 24), with real packets: the agent
//! binary as shipped (no `--netdev`), kube-proxy-style DNAT in the node, and
//! pods that send what a pod with CAP_NET_RAW can send. Every check has its
//! positive control: the same path works for a pod that is not isolated, so
//! no check passes by breaking the network.
//! Needs root, network namespaces, BPF, cgroup v2 and iptables.

mod bed_state;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use bed_state::{PodPolicy, isolated, open};

use portcullis_agent::compiled::{AllowEntry, CompiledState, PortRange, Protocol, ServiceFrontend};
use portcullis_testbed::{
    Bed, Network, PinDir, Transport,
    agent::{AgentProcess, StateFile},
    probe, raw,
};

const DENIED: Duration = Duration::from_millis(700);
const ARRIVES: Duration = Duration::from_millis(1500);

const CLIENT: u32 = 1000;
const WEB: u32 = 1001;
const SINK: u32 = 1002;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn allow(peer: u32, protocol: Protocol, port: u16) -> AllowEntry {
    AllowEntry { peer, protocol: Some(protocol), ports: Some(PortRange::single(port)), rule: 1 }
}

/// Who answered `from`'s probe, if anyone.
fn answer(bed: &Bed, from: &str, to: IpAddr, transport: Transport, port: u16) -> Option<String> {
    probe(&bed.pod(from).netns, transport, to, port, DENIED).expect("probe")
}

/// Starts the agent on `bed` with `state` (written to a state file it watches).
fn agent(bed: &Bed, state: &CompiledState) -> (AgentProcess, StateFile, PinDir) {
    let pins = PinDir::new();
    let file = StateFile::new(&bed.id).expect("state file");
    file.write(&serde_json::to_vec(state).expect("json")).expect("write state");
    let agent = bed_state::start_agent(bed, &bed_state::run_args(&file, &pins), state.revision);
    (agent, file, pins)
}

/// A Service's frontend in the agent's state and its DNAT in the node.
fn service(bed: &mut Bed, state: &mut CompiledState, cluster_ip: &str, backend: IpAddr) {
    let cluster_ip = ip(cluster_ip);
    for (protocol, name) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
        bed.add_service("svc", cluster_ip, name, 80, &[(backend, 8080)]).expect("service");
        state.services.push(ServiceFrontend { ip: cluster_ip, protocol, port: 80 });
    }
}

/// A Service whose backend is on another node, and one whose backend is
/// the node's own address (a hostNetwork pod, the API server): both are
/// judged on the backend by the client's egress policy, with no flag.
#[test]
fn services_with_backends_off_the_node_and_on_the_node_are_judged() {
    let mut a = Bed::node(Network::Routed, 0).expect("node a");
    a.add_pod("client").expect("pod");
    a.add_pod("web").expect("pod");
    let mut b = Bed::node(Network::Routed, 1).expect("node b");
    b.add_pod_at("remote", Ipv4Addr::new(10, 244, 1, 1), Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 1, 1))
        .expect("pod");
    Bed::join(&a, &b).expect("join");
    a.serve("web", 8080).expect("serve");
    a.serve_node(8080, "node").expect("serve on the node");
    b.serve("remote", 8080).expect("serve");

    // The client may reach web on 8080, nothing else; web is open.
    let client =
        PodPolicy { egress: isolated(vec![allow(WEB, Protocol::Tcp, 8080)]), ..open("client", CLIENT) };
    let mut state = bed_state::state(&a, 1, vec![client, open("web", WEB)]);
    let (web, remote, node) = (IpAddr::from(a.pod("web").ipv4), ip("10.244.1.1"), IpAddr::from(a.node_ipv4));
    service(&mut a, &mut state, "10.96.0.30", web);
    service(&mut a, &mut state, "10.96.0.31", remote);
    service(&mut a, &mut state, "10.96.0.32", node);
    let (mut agent, _file, _pins) = agent(&a, &state);

    use Transport::{Tcp, Udp};
    // Through a Service to an allowed backend: the path works for the
    // isolated client.
    assert_eq!(answer(&a, "client", ip("10.96.0.30"), Tcp, 80).as_deref(), Some("web"));
    for transport in [Tcp, Udp] {
        // A backend on another node, reached through the node's link.
        assert_eq!(
            answer(&a, "web", ip("10.96.0.31"), transport, 80).as_deref(),
            Some("remote"),
            "{transport:?}"
        );
        assert_eq!(
            answer(&a, "client", ip("10.96.0.31"), transport, 80),
            None,
            "off-node backend, {transport:?}"
        );
        // A backend on the node's own address.
        assert_eq!(
            answer(&a, "web", ip("10.96.0.32"), transport, 80).as_deref(),
            Some("node"),
            "{transport:?}"
        );
        assert_eq!(
            answer(&a, "client", ip("10.96.0.32"), transport, 80),
            None,
            "node backend, {transport:?}"
        );
    }
    // Straight to those backends: the same verdicts.
    assert_eq!(answer(&a, "web", remote, Tcp, 8080).as_deref(), Some("remote"));
    assert_eq!(answer(&a, "client", remote, Tcp, 8080), None);
    assert_eq!(answer(&a, "client", node, Tcp, 8080), None);
    // The node device's hook came without a flag.
    let filters =
        a.node.command("tc").args(["filter", "show", "dev", portcullis_testbed::LINK, "egress"]).output();
    let filters = String::from_utf8_lossy(&filters.expect("tc").stdout).into_owned();
    assert!(filters.contains("to_netdev"), "the node link carries the Service hook: {filters}");
    agent.stop();
}

/// The bytes of an ICMP message with its checksum.
fn icmp(mut message: Vec<u8>) -> Vec<u8> {
    let mut sum: u32 =
        message.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    message[2..4].copy_from_slice(&check.to_be_bytes());
    message
}

/// Packets dressed as what an isolated pod may always send get nowhere:
/// ND over IPv4, ND routed off the link, an ICMP error quoting a tracked
/// flow sent to a third party. A pod that is not isolated sends the same.
#[test]
fn raw_packets_dressed_as_exempt_traffic_do_not_leave_an_isolated_pod() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["client", "web", "sink"] {
        bed.add_pod(pod).expect("pod");
    }
    bed.serve("client", 7070).expect("serve");
    let client =
        PodPolicy { egress: isolated(vec![allow(WEB, Protocol::Tcp, 8080)]), ..open("client", CLIENT) };
    let state = bed_state::state(&bed, 1, vec![client, open("web", WEB), open("sink", SINK)]);
    let (mut agent, _file, _pins) = agent(&bed, &state);
    let (sink4, sink6) = (IpAddr::from(bed.pod("sink").ipv4), IpAddr::from(bed.pod("sink").ipv6));
    let web4 = IpAddr::from(bed.pod("web").ipv4);

    for sender in ["web", "client"] {
        let arrives = sender == "web";
        // IPv4 carrying protocol 58, shaped as a neighbour solicitation.
        let marker = format!("nd4-from-{sender}");
        let rx = raw::Receiver::open(&bed.pod("sink").netns, false, 58).expect("receiver");
        let mut payload = vec![135, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(marker.as_bytes());
        raw::send(&bed.pod(sender).netns, sink4, 58, 255, payload).expect("send");
        assert_eq!(rx.saw(marker.as_bytes(), ARRIVES).expect("receive"), arrives, "{marker}");

        // A real-looking neighbour solicitation to a global address off
        // the pod's link: routed by the node, it is no neighbour discovery.
        let marker = format!("nd6-from-{sender}");
        let rx = raw::Receiver::open(&bed.pod("sink").netns, true, libc::IPPROTO_ICMPV6).expect("receiver");
        let mut payload = vec![135, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&bed.pod("sink").ipv6.octets());
        payload.extend_from_slice(marker.as_bytes());
        raw::send(&bed.pod(sender).netns, sink6, libc::IPPROTO_ICMPV6, 255, payload).expect("send");
        assert_eq!(rx.saw(marker.as_bytes(), ARRIVES).expect("receive"), arrives, "{marker}");
    }

    // The client tracks a flow web opened (UDP from a known port); an ICMP
    // error about it goes back to web, and nowhere else.
    let web_ns = &bed.pod("web").netns;
    let client4 = IpAddr::from(bed.pod("client").ipv4);
    web_ns
        .run(move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 40404)).expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
            s.send_to(b"ping", (client4, 7070)).expect("send");
            let mut buf = [0u8; 64];
            s.recv_from(&mut buf).expect("the client answers: the flow is tracked");
        })
        .expect("web");
    let quote = |marker: &str| {
        // Port unreachable, quoting web -> client UDP 40404 -> 7070.
        let (IpAddr::V4(w), IpAddr::V4(c)) = (web4, client4) else { unreachable!() };
        let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, 17, 0, 0]);
        m.extend_from_slice(&w.octets());
        m.extend_from_slice(&c.octets());
        m.extend_from_slice(&40404u16.to_be_bytes());
        m.extend_from_slice(&7070u16.to_be_bytes());
        m.extend_from_slice(&[0, 12, 0, 0]);
        m.extend_from_slice(marker.as_bytes());
        icmp(m)
    };
    for (to, name, arrives) in [(web4, "web", true), (sink4, "sink", false)] {
        let marker = format!("quote-to-{name}");
        let rx = raw::Receiver::open(&bed.pod(name).netns, false, libc::IPPROTO_ICMP).expect("receiver");
        raw::send(&bed.pod("client").netns, to, libc::IPPROTO_ICMP, 64, quote(&marker)).expect("send");
        assert_eq!(rx.saw(marker.as_bytes(), ARRIVES).expect("receive"), arrives, "{marker}");
    }
    // Positive control for the third party: web (open) reaches the sink
    // with the same message.
    let rx = raw::Receiver::open(&bed.pod("sink").netns, false, libc::IPPROTO_ICMP).expect("receiver");
    raw::send(&bed.pod("web").netns, sink4, libc::IPPROTO_ICMP, 64, quote("quote-from-web")).expect("send");
    assert!(rx.saw(b"quote-from-web", ARRIVES).expect("receive"), "an open pod's ICMP error arrives");
    agent.stop();
}

/// Sends `ping` on `socket` to `to` and returns the answer, if any.
fn ask(socket: &UdpSocket, to: (IpAddr, u16)) -> Option<String> {
    socket.send_to(b"ping", to).expect("send");
    let mut buf = [0u8; 64];
    socket.recv_from(&mut buf).ok().map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// When netfilter gives a tracked Service flow another backend (its NAT
/// entry expired while ours lives on, or was flushed), the new backend is
/// judged: the isolated client's packets to a forbidden one are dropped,
/// an open pod's reach it.
#[test]
fn a_service_flow_given_another_backend_is_judged_on_it() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["client", "web", "open", "sink"] {
        bed.add_pod(pod).expect("pod");
    }
    bed.serve("web", 8080).expect("serve");
    bed.serve("sink", 8080).expect("serve");
    // The node forgets UDP NAT decisions after a second.
    for key in ["nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"] {
        bed.node.sysctl(&format!("net.netfilter.{key}"), "1").expect("sysctl");
    }
    let client =
        PodPolicy { egress: isolated(vec![allow(WEB, Protocol::Udp, 8080)]), ..open("client", CLIENT) };
    let mut state =
        bed_state::state(&bed, 1, vec![client, open("web", WEB), open("open", SINK + 1), open("sink", SINK)]);
    let (web, sink) = (IpAddr::from(bed.pod("web").ipv4), IpAddr::from(bed.pod("sink").ipv4));
    service(&mut bed, &mut state, "10.96.0.40", web);
    let (mut agent, _file, _pins) = agent(&bed, &state);

    let svc = (ip("10.96.0.40"), 80);
    let socket = |pod: &str| {
        bed.pod(pod)
            .netns
            .run(|| {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 40500)).expect("bind");
                s.set_read_timeout(Some(DENIED)).expect("timeout");
                s
            })
            .expect("socket")
    };
    let (client, open_pod) = (socket("client"), socket("open"));
    assert_eq!(ask(&client, svc).as_deref(), Some("web"), "the allowed backend");
    assert_eq!(ask(&open_pod, svc).as_deref(), Some("web"));
    // kube-proxy now sends the Service to sink (new NAT decisions only).
    let to = format!("{sink}:8080");
    let rule = [
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "1",
        "-d",
        "10.96.0.40",
        "-p",
        "udp",
        "--dport",
        "80",
        "-j",
        "DNAT",
    ];
    let out =
        bed.node.command("iptables").args(rule).args(["--to-destination", &to]).output().expect("iptables");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(ask(&open_pod, svc).as_deref(), Some("sink"), "netfilter picked the new backend");
    assert_eq!(ask(&client, svc), None, "the client's egress does not allow sink");
    agent.stop();
}

/// A NodePort on the node's own address is a Service like its ClusterIP:
/// a client allowed to reach the node's address is judged on the backend
/// kube-proxy translates the NodePort to.
#[test]
fn a_node_port_is_judged_on_its_backend() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["client", "web", "open", "sink"] {
        bed.add_pod(pod).expect("pod");
    }
    bed.serve("web", 8080).expect("serve");
    bed.serve("sink", 8080).expect("serve");
    let node = IpAddr::from(bed.node_ipv4);
    // The client may reach the node's NodePorts and web, not sink.
    let egress = vec![
        allow(portcullis_common::identity::HOST, Protocol::Tcp, 30080),
        allow(portcullis_common::identity::HOST, Protocol::Tcp, 30081),
        allow(WEB, Protocol::Tcp, 8080),
    ];
    let client = PodPolicy { egress: isolated(egress), ..open("client", CLIENT) };
    let mut state =
        bed_state::state(&bed, 1, vec![client, open("web", WEB), open("open", SINK + 1), open("sink", SINK)]);
    for (node_port, backend) in [(30080, "web"), (30081, "sink")] {
        let to = format!("{}:8080", bed.pod(backend).ipv4);
        let port = node_port.to_string();
        let rule = ["-t", "nat", "-A", "PREROUTING", "-d", &node.to_string(), "-p", "tcp", "--dport", &port];
        let out =
            bed.node.command("iptables").args(rule).args(["-j", "DNAT", "--to-destination", &to]).output();
        assert!(out.expect("iptables").status.success());
        state.services.push(ServiceFrontend { ip: node, protocol: Protocol::Tcp, port: node_port });
    }
    let (mut agent, _file, _pins) = agent(&bed, &state);
    use Transport::Tcp;
    assert_eq!(answer(&bed, "open", node, Tcp, 30081).as_deref(), Some("sink"), "an open pod");
    assert_eq!(answer(&bed, "client", node, Tcp, 30080).as_deref(), Some("web"), "an allowed backend");
    assert_eq!(
        answer(&bed, "client", node, Tcp, 30081),
        None,
        "a forbidden backend behind the node's address"
    );
    agent.stop();
}
