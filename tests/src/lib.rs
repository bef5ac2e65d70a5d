//! Pods as network namespaces: the test bed for datapath tests and the lab.
//!
//! A [`Bed`] is one node: a network namespace holding the host-side veth of
//! every pod, routed like kindnet or Calico (each pod a /32 and /128 behind its
//! own veth, whose host side owns the gateway `169.254.1.1` and `fe80::1`). Because
//! every bed has its own node namespace, beds never collide with the machine's
//! networks or with each other, and they all use the same addresses.
//! Everything is removed on drop, also when a test panics.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

pub mod agent;
pub mod packets;
pub mod raw;

/// The node's own addresses (on the node namespace's loopback).
pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(10, 244, 255, 254);
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0xfffe);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns`), deleted on drop if this handle
/// created it.
pub struct Netns {
    name: String,
    owned: bool,
}

impl Netns {
    pub fn create(name: String) -> Result<Netns> {
        sh("ip", &["netns", "add", &name])?;
        let ns = Netns { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace somebody else made (a CRI pod sandbox's `cni-…`), left
    /// in place on drop.
    pub fn existing(name: &str) -> Result<Netns> {
        if !std::path::Path::new("/run/netns").join(name).exists() {
            bail!("no network namespace /run/netns/{name}");
        }
        Ok(Netns { name: name.to_owned(), owned: false })
    }

    /// The CRI pod sandbox (`cni-…` under /run/netns) that holds `ip` on one
    /// of its interfaces: how a test finds a Kubernetes pod from its pod IP.
    /// Other namespaces (a lab's pods may use the same addresses) never match.
    pub fn holding(ip: IpAddr) -> Result<Netns> {
        let wanted = ip.to_string();
        for entry in std::fs::read_dir("/run/netns").context("reading /run/netns")?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("cni-") {
                continue;
            }
            let Ok(addrs) = sh("ip", &["-n", &name, "-o", "addr", "show"]) else { continue };
            let holds = addrs.lines().any(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "inet" && *w != "inet6")
                    .nth(1)
                    .and_then(|a| a.split('/').next())
                    .is_some_and(|a| a == wanted)
            });
            if holds {
                return Ok(Netns { name, owned: false });
            }
        }
        bail!("no pod sandbox (/run/netns/cni-…) holds {ip}")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sh("ip", &["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a fresh thread that has entered this namespace; sockets and
    /// netlink calls made there belong to it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.spawn(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
            .ok_or_else(|| anyhow::anyhow!("could not enter {}", self.name))
    }

    /// Like `run`, without waiting; the thread yields `None` if it could not
    /// enter the namespace (and then did not run `f`).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Option<T>>> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            // SAFETY: valid fd; this thread never returns to a pool.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            let entered = if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            // Never run `f` in the wrong namespace.
            ok.then(f)
        });
        rx.recv().context("setns thread")?.context("setns")?;
        Ok(handle)
    }

    /// A command line that runs `program` inside this network namespace.
    /// Unlike `ip netns exec` it keeps the mount namespace, so bpffs pins
    /// made there are the machine's.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A pod: its namespace, the host-side veth in the node, its addresses.
pub struct Pod {
    pub name: String,
    pub netns: Netns,
    /// Host-side interface name, in the node namespace.
    pub host_if: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// How pods are wired to their node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// A veth per pod with a host route to it, the pod's gateway a link-local
    /// address on every host-side veth (kindnet, Calico).
    Routed,
    /// A veth per pod enslaved to the bridge `cni0`, which holds the pods'
    /// gateway addresses (the bridge CNI plugin, flannel): `(gateway,
    /// prefix length)` per family, the pods' subnets.
    Bridge { v4: (Ipv4Addr, u8), v6: (Ipv6Addr, u8) },
}

impl Network {
    /// A bridge for the default pod addresses (10.244.0.N, fd00:10::N).
    pub const DEFAULT_BRIDGE: Network = Network::Bridge {
        v4: (Ipv4Addr::new(10, 244, 0, 254), 24),
        v6: (Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 1, 0xfffe), 64),
    };
}

/// The bridge of `Network::Bridge`.
pub const BRIDGE: &str = "cni0";
/// The link between two nodes joined by `Bed::join`.
pub const LINK: &str = "nodelink";

/// One node and its pods.
pub struct Bed {
    /// Unique prefix of this bed's namespace names.
    pub id: String,
    pub network: Network,
    /// The node's own addresses (on its loopback).
    pub node_ipv4: Ipv4Addr,
    pub node_ipv6: Ipv6Addr,
    // Fields drop in order: servers stop, pods go (with their veths), then the node.
    servers: Vec<Server>,
    pub pods: Vec<Pod>,
    pub node: Netns,
    /// Whether the `KUBE-SERVICES` chain exists, for IPv4 and IPv6.
    kube_services: [bool; 2],
}

impl Bed {
    /// A node with routed pods.
    pub fn new() -> Result<Bed> {
        Bed::with_network(Network::Routed)
    }

    pub fn with_network(network: Network) -> Result<Bed> {
        Bed::node(network, 0)
    }

    /// Node number `index` of a cluster (0 is the one `with_network` makes):
    /// its own addresses are `NODE_IPV4`/`NODE_IPV6` minus `index`.
    pub fn node(network: Network, index: u8) -> Result<Bed> {
        let id = format!("pc{}x{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let node = Netns::create(format!("{id}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let node_ipv4 = Ipv4Addr::from(u32::from(NODE_IPV4) - u32::from(index));
        let node_ipv6 = Ipv6Addr::from(u128::from(NODE_IPV6) - u128::from(index));
        // The node's addresses live on its loopback (no dummy driver needed).
        node.ip(&["addr", "add", &format!("{node_ipv4}/32"), "dev", "lo"])?;
        node.ip(&["-6", "addr", "add", &format!("{node_ipv6}/128"), "dev", "lo", "nodad"])?;
        if let Network::Bridge { v4, v6 } = network {
            node.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
            node.ip(&["link", "set", BRIDGE, "up"])?;
            node.ip(&["addr", "add", &format!("{}/{}", v4.0, v4.1), "dev", BRIDGE])?;
            node.ip(&["-6", "addr", "add", &format!("{}/{}", v6.0, v6.1), "dev", BRIDGE, "nodad"])?;
            // kube-proxy on a bridge needs bridged frames to meet netfilter
            // (replies from a Service backend are un-DNATed there).
            node.sysctl("net.bridge.bridge-nf-call-iptables", "1")?;
            node.sysctl("net.bridge.bridge-nf-call-ip6tables", "1")?;
        }
        Ok(Bed {
            id,
            network,
            node_ipv4,
            node_ipv6,
            servers: Vec::new(),
            pods: Vec::new(),
            node,
            kube_services: [false; 2],
        })
    }

    /// Adds a pod with the next free addresses (10.244.0.N, fd00:10::N).
    pub fn add_pod(&mut self, name: &str) -> Result<&Pod> {
        let n = self.pods.len() + 1;
        let ipv4 = Ipv4Addr::new(10, 244, 0, n as u8);
        let ipv6 = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, n as u16);
        self.add_pod_at(name, ipv4, ipv6)
    }

    /// Adds a pod with these addresses.
    pub fn add_pod_at(&mut self, name: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<&Pod> {
        let n = self.pods.len() + 1;
        let netns = Netns::create(format!("{}-{name}", self.id))?;
        let host_if = format!("lxc{n}");
        self.wire(&netns, &host_if, ipv4, ipv6)?;
        self.pods.push(Pod { name: name.to_string(), netns, host_if, ipv4, ipv6 });
        Ok(self.pods.last().expect("just pushed"))
    }

    /// The pod's veth pair and routes, as a CNI plugin makes them.
    fn wire(&self, netns: &Netns, host_if: &str, ipv4: Ipv4Addr, ipv6: Ipv6Addr) -> Result<()> {
        self.node.ip(&[
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        if let Network::Bridge { v4, v6 } = self.network {
            netns.ip(&["addr", "add", &format!("{ipv4}/{}", v4.1), "dev", "eth0"])?;
            netns.ip(&["-6", "addr", "add", &format!("{ipv6}/{}", v6.1), "dev", "eth0", "nodad"])?;
            netns.ip(&["route", "add", "default", "via", &v4.0.to_string(), "dev", "eth0"])?;
            netns.ip(&["-6", "route", "add", "default", "via", &v6.0.to_string(), "dev", "eth0"])?;
            self.node.ip(&["link", "set", host_if, "master", BRIDGE, "up"])?;
            return Ok(());
        }
        netns.ip(&["addr", "add", &format!("{ipv4}/32"), "dev", "eth0"])?;
        netns.ip(&["-6", "addr", "add", &format!("{ipv6}/128"), "dev", "eth0", "nodad"])?;
        netns.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
        self.node.ip(&["link", "set", host_if, "up"])?;
        // Every host-side veth answers for the pods' gateway (as Calico's
        // 169.254.1.1); the node talks to pods from its own address.
        self.node.ip(&["addr", "add", "169.254.1.1/32", "dev", host_if])?;
        self.node.ip(&["-6", "addr", "add", "fe80::1/64", "dev", host_if, "nodad"])?;
        let (src4, src6) = (self.node_ipv4.to_string(), self.node_ipv6.to_string());
        self.node.ip(&["route", "add", &format!("{ipv4}/32"), "dev", host_if, "src", &src4])?;
        self.node.ip(&["-6", "route", "add", &format!("{ipv6}/128"), "dev", host_if, "src", &src6])?;
        // The pod routes IPv6 through fe80::1 on its eth0.
        netns.ip(&["-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
        Ok(())
    }

    /// Joins two routed nodes with a link (`nodelink` on both sides) and
    /// routes each node's pods and addresses through it from the other, as
    /// kindnet routes between nodes. Call once both have their pods.
    pub fn join(a: &Bed, b: &Bed) -> Result<()> {
        if a.network != Network::Routed || b.network != Network::Routed {
            bail!("only routed nodes can be joined");
        }
        a.node.ip(&["link", "add", LINK, "type", "veth", "peer", "name", LINK, "netns", b.node.name()])?;
        let ends = [(a, "192.0.2.1", "fd00:ff::1"), (b, "192.0.2.2", "fd00:ff::2")];
        for (bed, v4, v6) in ends {
            bed.node.ip(&["link", "set", LINK, "up"])?;
            bed.node.ip(&["addr", "add", &format!("{v4}/24"), "dev", LINK])?;
            bed.node.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", LINK, "nodad"])?;
        }
        for ((from, _, _), (to, via4, via6)) in [(ends[0], ends[1]), (ends[1], ends[0])] {
            let v4: Vec<Ipv4Addr> = to.pods.iter().map(|p| p.ipv4).chain([to.node_ipv4]).collect();
            let v6: Vec<Ipv6Addr> = to.pods.iter().map(|p| p.ipv6).chain([to.node_ipv6]).collect();
            for ip in v4 {
                from.node.ip(&["route", "add", &format!("{ip}/32"), "via", via4, "dev", LINK])?;
            }
            for ip in v6 {
                from.node.ip(&["-6", "route", "add", &format!("{ip}/128"), "via", via6, "dev", LINK])?;
            }
        }
        Ok(())
    }

    /// Deletes and recreates a pod's veth pair under the same name (a new
    /// interface index), as a sandbox restart does.
    pub fn recreate_veth(&self, pod: &str) -> Result<()> {
        let p = self.pod(pod);
        self.node.ip(&["link", "del", &p.host_if])?;
        self.wire(&p.netns, &p.host_if, p.ipv4, p.ipv6)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts a TCP echo server on `port` that keeps its connections open.
    pub fn serve_echo(&mut self, pod: &str, port: u16) -> Result<()> {
        let server = Server::echo(&self.pod(pod).netns, port)?;
        self.servers.push(server);
        Ok(())
    }

    /// Starts TCP and UDP servers on `port` (both families) in a pod that
    /// answer with its name.
    /// A server in the node's own namespace, answering `reply` (a
    /// hostNetwork pod, or the API server on a control-plane node).
    pub fn serve_node(&mut self, port: u16, reply: &str) -> Result<()> {
        let server = Server::start(&self.node, reply.to_string(), port)?;
        self.servers.push(server);
        Ok(())
    }

    pub fn serve(&mut self, pod: &str, port: u16) -> Result<()> {
        let server = Server::start(&self.pod(pod).netns, pod.to_string(), port)?;
        self.servers.push(server);
        Ok(())
    }

    /// A Service frontend translated the way kube-proxy (iptables mode)
    /// translates it, in the node: `KUBE-SERVICES` from PREROUTING and
    /// OUTPUT, a `KUBE-SVC-` chain per frontend spreading over one
    /// `KUBE-SEP-` DNAT chain per backend. `protocol`: "tcp", "udp", "sctp".
    pub fn add_service(
        &mut self,
        name: &str,
        cluster_ip: IpAddr,
        protocol: &str,
        port: u16,
        backends: &[(IpAddr, u16)],
    ) -> Result<()> {
        self.add_services(&[ServiceSpec {
            name: name.into(),
            cluster_ip,
            protocol: protocol.into(),
            port,
            backends: backends.to_vec(),
        }])
    }

    /// Many Service frontends at once (one `iptables-restore` per family).
    pub fn add_services(&mut self, services: &[ServiceSpec]) -> Result<()> {
        for v6 in [false, true] {
            let mine: Vec<&ServiceSpec> = services.iter().filter(|s| s.cluster_ip.is_ipv6() == v6).collect();
            if mine.is_empty() {
                continue;
            }
            let mut rules = String::from("*nat\n");
            if !self.kube_services[usize::from(v6)] {
                rules.push_str(
                    ":KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\n",
                );
                self.kube_services[usize::from(v6)] = true;
            }
            for svc in mine {
                let chain = |kind: &str, extra: &str| {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (&svc.name, &svc.cluster_ip, &svc.protocol, svc.port, extra).hash(&mut h);
                    format!("KUBE-{kind}-{:016X}", h.finish())
                };
                let svc_chain = chain("SVC", "");
                rules.push_str(&format!(":{svc_chain} - [0:0]\n"));
                rules.push_str(&format!(
                    "-A KUBE-SERVICES -d {}/{} -p {} --dport {} -m comment --comment \"{}\" -j {svc_chain}\n",
                    svc.cluster_ip,
                    if v6 { 128 } else { 32 },
                    svc.protocol,
                    svc.port,
                    svc.name
                ));
                for (i, (addr, target)) in svc.backends.iter().enumerate() {
                    let sep = chain("SEP", &i.to_string());
                    let to = match addr {
                        IpAddr::V4(a) => format!("{a}:{target}"),
                        IpAddr::V6(a) => format!("[{a}]:{target}"),
                    };
                    rules.push_str(&format!(":{sep} - [0:0]\n"));
                    rules.push_str(&format!("-A {sep} -p {} -j DNAT --to-destination {to}\n", svc.protocol));
                    let left = svc.backends.len() - i;
                    if left > 1 {
                        rules.push_str(&format!(
                            "-A {svc_chain} -m statistic --mode random --probability {:.5} -j {sep}\n",
                            1.0 / left as f64
                        ));
                    } else {
                        rules.push_str(&format!("-A {svc_chain} -j {sep}\n"));
                    }
                }
            }
            rules.push_str("COMMIT\n");
            let tool = if v6 { "ip6tables-restore" } else { "iptables-restore" };
            let mut child = self
                .node
                .command(tool)
                .args(["-w", "--noflush"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .with_context(|| format!("running {tool}"))?;
            child.stdin.take().context("stdin")?.write_all(rules.as_bytes())?;
            let out = child.wait_with_output()?;
            if !out.status.success() {
                bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
        Ok(())
    }
}

/// A Service frontend and its backends, for `Bed::add_services`.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: IpAddr,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    pub port: u16,
    /// Backend address and target port.
    pub backends: Vec<(IpAddr, u16)>,
}

/// A long-lived TCP connection from a pod, for tests of established flows.
pub struct Conversation {
    stream: TcpStream,
}

impl Conversation {
    /// Connects from `from` to an echo server (`Bed::serve_echo`).
    pub fn open(from: &Netns, addr: IpAddr, port: u16, timeout: Duration) -> Result<Conversation> {
        let target = SocketAddr::new(addr, port);
        let stream = from.run(move || TcpStream::connect_timeout(&target, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Conversation { stream })
    }

    /// Sends a line and waits for its echo: whether it came back.
    pub fn exchange(&mut self, line: &str) -> bool {
        let msg = format!("{line}\n");
        if self.stream.write_all(msg.as_bytes()).is_err() {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while got.len() < msg.len() {
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got == msg.as_bytes()
    }
}

/// A TCP echo server in a namespace that keeps its connections open;
/// stopped on drop (the only use of the field).
pub struct EchoServer(#[allow(dead_code)] Server);

impl EchoServer {
    pub fn start(netns: &Netns, port: u16) -> Result<EchoServer> {
        Server::echo(netns, port).map(EchoServer)
    }
}

/// A TCP and UDP server in a pod that answers with the pod's name.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(netns: &Netns, reply: String, port: u16) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        // Bind in the namespace, serve on threads that live there too.
        let (tcp, udp) = netns
            .run(move || -> std::io::Result<_> { Ok((TcpListener::bind(any)?, UdpSocket::bind(any)?)) })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;

        let (s1, r1) = (stop.clone(), reply.clone());
        let t1 = std::thread::spawn(move || {
            while !s1.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                        let _ = conn.write_all(r1.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let s2 = stop.clone();
        let t2 = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !s2.load(Ordering::Relaxed) {
                if let Ok((_, from)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(reply.as_bytes(), from);
                }
            }
        });
        Ok(Server { stop, threads: vec![t1, t2] })
    }
}

impl Server {
    fn echo(netns: &Netns, port: u16) -> Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        let tcp = netns.run(move || TcpListener::bind(any))??;
        tcp.set_nonblocking(true)?;
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((mut conn, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                            let mut buf = [0u8; 256];
                            while !s.load(Ordering::Relaxed) {
                                match conn.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if conn.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Server { stop, threads: vec![thread] })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Connects from `from` to `addr:port` and returns the server's reply, or
/// `None` when nothing answered within `timeout`.
pub fn probe(
    from: &Netns,
    transport: Transport,
    addr: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<Option<String>> {
    from.run(move || {
        let target = SocketAddr::new(addr, port);
        let mut buf = [0u8; 512];
        match transport {
            Transport::Tcp => {
                let Ok(mut s) = TcpStream::connect_timeout(&target, timeout) else {
                    return None;
                };
                s.set_read_timeout(Some(timeout)).ok()?;
                let n = s.read(&mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
            Transport::Udp => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(bind).ok()?;
                s.set_read_timeout(Some(timeout)).ok()?;
                s.send_to(b"ping", target).ok()?;
                let (n, _) = s.recv_from(&mut buf).ok()?;
                Some(String::from_utf8_lossy(&buf[..n]).into_owned())
            }
        }
    })
}

/// Sends one ICMP (or ICMPv6) echo request from `from` to `addr` and says
/// whether the matching reply came back within `timeout`. Uses the kernel's
/// ping sockets, which it opens to root in the sender's namespace first.
pub fn ping(from: &Netns, addr: IpAddr, timeout: Duration) -> Result<bool> {
    from.sysctl("net.ipv4.ping_group_range", "0 0")?;
    from.run(move || -> Result<bool> {
        let (domain, protocol) = if addr.is_ipv4() {
            (libc::AF_INET, libc::IPPROTO_ICMP)
        } else {
            (libc::AF_INET6, libc::IPPROTO_ICMPV6)
        };
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("ping socket");
        }
        // SAFETY: a fresh fd we own; a UdpSocket is just a datagram fd.
        let socket = unsafe { <UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        socket.set_read_timeout(Some(timeout))?;
        // Type 8 (v4) / 128 (v6), code 0; the kernel fills id and checksum.
        let request_type = if addr.is_ipv4() { 8 } else { 128 };
        let echo = [request_type, 0, 0, 0, 0, 0, 0, 1, b'p', b'c'];
        socket.send_to(&echo, SocketAddr::new(addr, 0))?;
        let reply_type = if addr.is_ipv4() { 0 } else { 129 };
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 256];
        while std::time::Instant::now() < deadline {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if n >= 8 && buf[0] == reply_type && buf[7] == 1 => return Ok(true),
                Ok(_) => continue,
                Err(_) => return Ok(false),
            }
        }
        Ok(false)
    })?
}

/// A bpffs directory for one test's pins, removed on drop.
pub struct PinDir {
    pub path: std::path::PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        let path = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/portcullis-test-{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        PinDir { path }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
