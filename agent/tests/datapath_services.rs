//! Egress to Services with real traffic: kube-proxy's DNAT (iptables rules
//! written as kube-proxy writes them) runs after the client's veth hook, so
//! the client's egress policy must be judged on the backend it picks, and
//! the replies, which come back from the Service address, must pass.
//! Needs root, network namespaces, BPF and iptables.

mod bed_state;

use std::{net::IpAddr, time::Duration};

use bed_state::{PodPolicy, isolated, open};

use portcullis_agent::compiled::{AllowEntry, CompiledState, PortRange, Protocol, ServiceFrontend};
use portcullis_testbed::{
    Bed, Conversation, PinDir, Transport,
    agent::{AgentProcess, StateFile},
    probe,
};

const DENIED: Duration = Duration::from_millis(700);

const CLIENT: u32 = 1000;
const WEB: u32 = 1001;
const OTHER: u32 = 1002;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn allow(peer: u32, protocol: Protocol, port: u16) -> AllowEntry {
    AllowEntry { peer, protocol: Some(protocol), ports: Some(PortRange::single(port)), rule: 1 }
}

/// ClusterIPs of the Services, per family.
fn cluster_ips(name: &str) -> [IpAddr; 2] {
    match name {
        "web" => [ip("10.96.0.10"), ip("fd00:96::10")],
        _ => [ip("10.96.0.11"), ip("fd00:96::11")],
    }
}

fn state(bed: &Bed, revision: u64, client_egress: Vec<AllowEntry>) -> CompiledState {
    let client = PodPolicy { egress: isolated(client_egress), ..open("client", CLIENT) };
    let mut state = bed_state::state(bed, revision, vec![client, open("web", WEB), open("other", OTHER)]);
    for name in ["web", "other"] {
        for ip in cluster_ips(name) {
            state.services.push(ServiceFrontend { ip, protocol: Protocol::Tcp, port: 80 });
            state.services.push(ServiceFrontend { ip, protocol: Protocol::Udp, port: 53 });
            state.services.push(ServiceFrontend { ip, protocol: Protocol::Tcp, port: 90 });
        }
    }
    state
}

/// Who answered `from`'s probe, if anyone.
fn answer(bed: &Bed, from: &str, to: IpAddr, transport: Transport, port: u16) -> Option<String> {
    probe(&bed.pod(from).netns, transport, to, port, DENIED).expect("probe")
}

#[test]
fn egress_through_a_service_is_judged_on_the_backend() {
    let mut bed = Bed::new().expect("bed");
    for pod in ["client", "web", "other"] {
        bed.add_pod(pod).expect("pod");
    }
    for pod in ["web", "other"] {
        bed.serve(pod, 8080).expect("serve");
        bed.serve(pod, 5353).expect("serve");
    }
    bed.serve_echo("web", 9090).expect("serve echo");
    for name in ["web", "other"] {
        let p = bed.pod(name);
        let backends = [IpAddr::from(p.ipv4), IpAddr::from(p.ipv6)];
        for (cluster_ip, backend) in cluster_ips(name).into_iter().zip(backends) {
            bed.add_service(name, cluster_ip, "tcp", 80, &[(backend, 8080)]).expect("service");
            bed.add_service(name, cluster_ip, "udp", 53, &[(backend, 5353)]).expect("service");
            bed.add_service(name, cluster_ip, "tcp", 90, &[(backend, 9090)]).expect("service");
        }
    }

    let pins = PinDir::new();
    let file = StateFile::new(&bed.id).expect("state file");
    let write = |s: &CompiledState| file.write(&serde_json::to_vec(s).expect("json")).expect("write state");
    // The client may reach web on its target ports, nothing else.
    let web_ports = vec![
        allow(WEB, Protocol::Tcp, 8080),
        allow(WEB, Protocol::Udp, 5353),
        allow(WEB, Protocol::Tcp, 9090),
    ];
    write(&state(&bed, 1, web_ports));
    let args = bed_state::run_args(&file, &pins);
    let mut agent = bed_state::start_agent(&bed, &args, 1);
    let wait = |agent: &mut AgentProcess, parts: &[&str], secs: u64| {
        agent.wait_for(parts, Duration::from_secs(secs)).expect("agent line")
    };

    use Transport::{Tcp, Udp};
    let [web4, web6] = cluster_ips("web");
    let [other4, other6] = cluster_ips("other");
    for (web, other) in [(web4, other4), (web6, other6)] {
        assert_eq!(
            answer(&bed, "client", web, Tcp, 80).as_deref(),
            Some("web"),
            "client -> web svc {web}:80"
        );
        assert_eq!(
            answer(&bed, "client", web, Udp, 53).as_deref(),
            Some("web"),
            "client -> web svc {web}:53/UDP"
        );
        assert_eq!(answer(&bed, "client", other, Tcp, 80), None, "client -> other svc {other}:80");
        assert_eq!(answer(&bed, "client", other, Udp, 53), None, "client -> other svc {other}:53/UDP");
    }
    // Directly to the backends: the same verdicts.
    let (web_pod, other_pod) = (IpAddr::from(bed.pod("web").ipv4), IpAddr::from(bed.pod("other").ipv4));
    assert_eq!(answer(&bed, "client", web_pod, Tcp, 8080).as_deref(), Some("web"));
    assert_eq!(answer(&bed, "client", other_pod, Tcp, 8080), None);
    // Pods whose egress is open reach every Service.
    assert_eq!(answer(&bed, "web", other4, Tcp, 80).as_deref(), Some("other"));

    // The drop names the client and the backend kube-proxy picked.
    wait(&mut agent, &["default/client:", "-> default/other:8080", "EGRESS Policy denied DROPPED"], 5);

    // A long-lived connection through a Service; a policy change that
    // takes its backend port away cuts it, and leaves the rest.
    let mut talk =
        Conversation::open(&bed.pod("client").netns, web4, 90, DENIED).expect("connect via service");
    assert!(talk.exchange("before"), "the connection through the Service works");
    write(&state(&bed, 2, vec![allow(WEB, Protocol::Tcp, 8080), allow(WEB, Protocol::Udp, 5353)]));
    wait(&mut agent, &["enforced revision 2"], 10);
    assert!(!talk.exchange("after"), "revoked: the connection through the Service is cut");
    assert_eq!(answer(&bed, "client", web4, Tcp, 90), None, "and new ones are refused");
    assert_eq!(answer(&bed, "client", web4, Tcp, 80).as_deref(), Some("web"), "still allowed");
    agent.stop();
}
