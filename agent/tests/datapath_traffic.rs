//! The agent binary enforcing a compiled state on real TCP and UDP traffic
//! between pods (network namespaces), with drops reported as flow lines.
//! Needs root, network namespaces and BPF.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use portcullis_agent::compiled::{
    AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, Protocol,
};
use portcullis_testbed::{Bed, NODE_IPV4, PinDir, Transport, probe};

/// A dropped SYN or datagram never answers; this is how long we wait to say so.
const DENIED: Duration = Duration::from_millis(700);

struct Agent {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(bed: &Bed, state: &Path, pins: &Path) -> Agent {
        let mut child = bed
            .node
            .command(env!("CARGO_BIN_EXE_agent"))
            .args(["run", "--state"])
            .arg(state)
            .arg("--pin-dir")
            .arg(pins)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start agent");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Agent {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing every one of `parts`.
    fn wait_for(&mut self, parts: &[&str], timeout: Duration) -> String {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
        {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line with {parts:?} within {timeout:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "agent exited; no line with {parts:?}; saw:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// SIGINT, as on Ctrl-C; waits for exit.
    fn stop(&mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    fn new(bed: &Bed) -> StateFile {
        let dir = std::env::temp_dir().join(format!("portcullis-{}", bed.id));
        std::fs::create_dir_all(&dir).expect("state dir");
        StateFile { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Atomic replace, so the agent never reads half a file.
    fn write(&self, state: &CompiledState) {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(state).expect("json")).expect("write state");
        std::fs::rename(&tmp, self.path()).expect("rename state");
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const FRONTEND: u32 = 1000;
const OTHER: u32 = 1001;
const BACKEND: u32 = 1002;

fn state(bed: &Bed, revision: u64, backend_ingress: Vec<AllowEntry>) -> CompiledState {
    let mut ipcache = vec![IpcacheEntry {
        cidr: IpAddr::from(NODE_IPV4).into(),
        identity: 1,
        name: None,
    }];
    for (pod, identity) in [
        ("frontend", FRONTEND),
        ("other", OTHER),
        ("backend", BACKEND),
    ] {
        let p = bed.pod(pod);
        for ip in [IpAddr::from(p.ipv4), IpAddr::from(p.ipv6)] {
            ipcache.push(IpcacheEntry {
                cidr: ip.into(),
                identity,
                name: Some(format!("default/{pod}")),
            });
        }
    }
    let endpoint = |id: u16, pod: &str, identity: u32, ingress: DirectionPolicy| EndpointState {
        id,
        name: format!("default/{pod}"),
        interface: bed.pod(pod).host_if.clone(),
        identity,
        ingress,
        egress: DirectionPolicy::default(),
    };
    CompiledState {
        revision,
        identities: Default::default(),
        ipcache,
        endpoints: vec![
            endpoint(1, "frontend", FRONTEND, DirectionPolicy::default()),
            endpoint(2, "other", OTHER, DirectionPolicy::default()),
            endpoint(
                3,
                "backend",
                BACKEND,
                DirectionPolicy {
                    isolated: true,
                    allow: backend_ingress,
                },
            ),
        ],
    }
}

fn allow(peer: u32, protocol: Protocol, port: u16) -> AllowEntry {
    AllowEntry {
        peer,
        protocol: Some(protocol),
        ports: Some(PortRange::single(port)),
        rule: 1,
    }
}

/// Whether `from` gets an answer from `to:port`. A dropped probe is retried
/// never; an answered one is checked to come from the expected server.
fn reaches(bed: &Bed, from: &str, to: IpAddr, transport: Transport, port: u16) -> bool {
    probe(&bed.pod(from).netns, transport, to, port, DENIED)
        .expect("probe")
        .is_some()
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
    let pins = PinDir::new();
    let file = StateFile::new(&bed);
    let rules = vec![
        allow(FRONTEND, Protocol::Tcp, 80),
        allow(FRONTEND, Protocol::Udp, 53),
    ];
    file.write(&state(&bed, 1, rules));

    let mut agent = Agent::start(&bed, &file.path(), &pins.path);
    agent.wait_for(&["enforced revision 1"], Duration::from_secs(20));

    let backend = bed.pod("backend");
    let (b4, b6) = (IpAddr::from(backend.ipv4), IpAddr::from(backend.ipv6));
    use Transport::{Tcp, Udp};
    for addr in [b4, b6] {
        assert!(
            reaches(&bed, "frontend", addr, Tcp, 80),
            "frontend -> backend {addr} TCP/80"
        );
        assert!(
            reaches(&bed, "frontend", addr, Udp, 53),
            "frontend -> backend {addr} UDP/53"
        );
        assert!(
            !reaches(&bed, "frontend", addr, Tcp, 53),
            "frontend -> backend {addr} TCP/53 is not allowed"
        );
        assert!(
            !reaches(&bed, "other", addr, Tcp, 80),
            "other -> backend {addr} TCP/80"
        );
        assert!(
            !reaches(&bed, "other", addr, Udp, 53),
            "other -> backend {addr} UDP/53"
        );
    }
    let f4 = IpAddr::from(bed.pod("frontend").ipv4);
    assert!(
        reaches(&bed, "backend", f4, Tcp, 80),
        "frontend is not isolated"
    );
    assert!(
        reaches(&bed, "other", f4, Tcp, 80),
        "frontend is not isolated"
    );

    // Drops arrive as flow lines naming both sides.
    agent.wait_for(
        &[
            "default/other:",
            "-> default/backend:80",
            "INGRESS Policy denied DROPPED",
            "TCP Flags: SYN",
        ],
        Duration::from_secs(5),
    );
    agent.wait_for(
        &["default/other:", "-> default/backend:53", "DROPPED (UDP)"],
        Duration::from_secs(5),
    );

    // A new revision revokes TCP/80 from frontend.
    file.write(&state(&bed, 2, vec![allow(FRONTEND, Protocol::Udp, 53)]));
    agent.wait_for(&["enforced revision 2"], Duration::from_secs(10));
    assert!(!reaches(&bed, "frontend", b4, Tcp, 80), "revoked");
    assert!(reaches(&bed, "frontend", b4, Udp, 53), "still allowed");

    // The agent goes away; the pinned programs and maps keep enforcing.
    agent.stop();
    assert!(
        !reaches(&bed, "other", b4, Tcp, 80),
        "still enforced with the agent stopped"
    );
    assert!(
        reaches(&bed, "frontend", b4, Udp, 53),
        "still allowed with the agent stopped"
    );

    // Uninstalling removes the pins, and with them enforcement.
    let out = bed
        .node
        .command(env!("CARGO_BIN_EXE_agent"))
        .args(["uninstall", "--pin-dir"])
        .arg(&pins.path)
        .output()
        .expect("uninstall");
    assert!(
        out.status.success(),
        "uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.path.exists());
    assert!(
        reaches(&bed, "other", b4, Tcp, 80),
        "nothing enforces after uninstall"
    );
}
