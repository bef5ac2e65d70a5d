//! Real traffic between two pods (network namespaces joined through the node
//! by routed veths), measured side by side in one run:
//!
//! - no program at all (the baseline),
//! - Portcullis, the flow allowed among 1, 1,000 and 100,000 policy entries
//!   (half by peer identity, half by CIDR, on both the client's egress and
//!   the server's ingress),
//! - the same rules as kube-router writes them: a chain per pod in FORWARD,
//!   conntrack's ESTABLISHED first, then one iptables rule per (peer set,
//!   port) matching an ipset, then DROP.
//!
//! Three figures per setup: request/response rate on one connection
//! (TCP_RR-like), connection rate (TCP_CRR-like: connect, one exchange,
//! close) and bulk throughput; and, for Portcullis, the programs' mean run
//! time from the kernel's BPF statistics. Every figure is also given as a
//! ratio to the baseline.
//!
//! Needs root, network namespaces, BPF, iptables and ipset.
//! `cargo bench -p portcullis-agent --bench datapath_traffic` (or
//! `cargo xtask bench datapath`).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use portcullis_agent::{
    compiled::{
        AllowEntry, CompiledState, DirectionPolicy, EndpointState, IpcacheEntry, PortRange, PrefixEntry,
        Protocol,
    },
    datapath::{Datapath, DatapathConfig},
};
use portcullis_testbed::{Bed, Netns, PinDir};

const RR_PORT: u16 = 5001;
const CRR_PORT: u16 = 5002;
const BULK_PORT: u16 = 5003;
/// Each figure: the median of this many runs of `RUN` each.
const PAIRS: usize = 5;
const RUN: Duration = Duration::from_millis(1000);

const CLIENT: u32 = 1000;
const SERVER: u32 = 1001;
/// Identities of the other peers in the rules start here.
const PEERS: u32 = 10_000;
/// Peers (identities or prefixes) per rule, so that 100,000 entries make
/// 200 ipsets (the kernel allows 256 per namespace).
const PER_RULE: usize = 500;

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("datapath_traffic bench: needs root (network namespaces, BPF, iptables); skipped");
        return;
    }
    if std::env::args().any(|a| a == "--test") {
        return;
    }
    let mut bed = Bed::new().expect("bed");
    bed.add_pod("client").expect("pod");
    bed.add_pod("server").expect("pod");
    let client = bed.pod("client");
    // Many short connections: let the client reuse ports in TIME_WAIT.
    client.netns.sysctl("net.ipv4.tcp_tw_reuse", "1").expect("sysctl");
    client.netns.sysctl("net.ipv4.ip_local_port_range", "1024 65000").expect("sysctl");
    let server_ip = IpAddr::from(bed.pod("server").ipv4);
    let client_ip = IpAddr::from(client.ipv4);
    let stop = Arc::new(AtomicBool::new(false));
    let servers = start_servers(&bed.pod("server").netns, stop.clone());

    // This thread joins the node's namespace: it attaches and detaches the
    // programs there; clients and servers run on threads in the pods.
    enter(&bed.node);

    println!(
        "Traffic between two pods over veth: each figure is the median of {PAIRS} runs of {RUN:?}, \
         each run paired with one without any program just before it."
    );
    let mut rows: Vec<Row> = Vec::new();

    // `PORTCULLIS_BENCH_ONLY=portcullis` (or `iptables`) measures one side.
    let only = std::env::var("PORTCULLIS_BENCH_ONLY").unwrap_or_default();
    let sizes: &[usize] =
        if std::env::var("PORTCULLIS_BENCH_ONE").is_ok() { &[1] } else { &[1, 1_000, 100_000] };

    // kube-router-style iptables and ipset: the rules stay, the FORWARD
    // jumps into them come and go.
    for &entries in sizes.iter().filter(|_| only.is_empty() || only == "iptables") {
        let rules = Rules::new(entries);
        iptables_install(&bed.node, &rules, client_ip, server_ip);
        let jumps =
            [format!("-d {server_ip}/32 -j PC-FW-SERVER"), format!("-s {client_ip}/32 -j PC-FW-CLIENT")];
        let toggle = |on: bool| {
            for jump in &jumps {
                let args: Vec<&str> = jump.split(' ').collect();
                let op = if on { "-A" } else { "-D" };
                let status = bed.node.command("iptables").args(["-w", op, "FORWARD"]).args(&args).status();
                assert!(status.is_ok_and(|s| s.success()), "iptables {op} FORWARD {jump}");
            }
        };
        let label = format!("iptables + ipset, {} entries", thousands(entries));
        rows.push(compare(&bed, &label, server_ip, &mut |on| toggle(on)));
        iptables_remove(&bed.node);
    }

    // The floor: a TC program that passes everything, on the same hooks.
    if only.is_empty() || only == "portcullis" {
        rows.push(floor(&bed, server_ip));
    }

    // Portcullis: the maps stay loaded, the programs are attached and
    // detached (their links unpinned).
    let pins = PinDir::new();
    let mut config = DatapathConfig { pin_dir: pins.path.clone(), ..Default::default() };
    // Two endpoints with up to 50,000 prefixes each.
    config.map_sizes.set("cidr=262144").expect("size");
    let mut dp = Datapath::load(&config).expect("load datapath");
    let veths: Vec<u32> = ["client", "server"]
        .iter()
        .map(|p| portcullis_agent::datapath::ifindex(&bed.pod(p).host_if).expect("veth"))
        .collect();
    for &entries in sizes.iter().filter(|_| only.is_empty() || only == "portcullis") {
        let report = dp.apply(&portcullis_state(&bed, &Rules::new(entries)));
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let label = format!(
            "Portcullis, {} entries ({} in the maps)",
            thousands(entries),
            thousands(report.policy_entries)
        );
        let dp_cell = std::cell::RefCell::new(&mut dp);
        let mut toggle = |on: bool| {
            let mut dp = dp_cell.borrow_mut();
            for idx in &veths {
                if on {
                    dp.attach(*idx).expect("attach");
                } else {
                    dp.detach(*idx).expect("detach");
                }
            }
        };
        let mut row = compare(&bed, &label, server_ip, &mut toggle);
        // The programs' own cost, from the kernel's statistics, in a
        // separate TCP_RR run: keeping statistics costs time itself.
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time statistics");
        let before = dp_cell.borrow().program_stats();
        bed.pod("client").netns.run(move || run_rr(SocketAddr::new(server_ip, RR_PORT))).expect("client");
        let after = dp_cell.borrow().program_stats();
        drop(stats);
        let mean = |i: usize| {
            let runs = after[i].1 - before[i].1;
            let time = after[i].2.saturating_sub(before[i].2);
            if runs == 0 { 0.0 } else { time.as_nanos() as f64 / runs as f64 }
        };
        row.prog_ns = Some((mean(0), mean(1)));
        rows.push(row);
    }
    dp.apply(&CompiledState { revision: 99, ..Default::default() });
    drop(dp);
    drop(pins);

    stop.store(true, Ordering::Relaxed);
    for s in servers {
        let _ = s.join();
    }
    print_table(&rows);
}

/// The cost of the hooks themselves: `pass_all` on both veths' TC ingress
/// and egress, as Portcullis attaches its programs.
fn floor(bed: &Bed, server: IpAddr) -> Row {
    use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions};
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).expect("pin dir");
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&pins.path)
        .load(portcullis_agent::datapath::OBJECT)
        .expect("load object");
    let prog: &mut SchedClassifier =
        ebpf.program_mut("pass_all").expect("pass_all").try_into().expect("classifier");
    prog.load().expect("load pass_all");
    let prog_id = prog.info().expect("info").id();
    let veths = [bed.pod("client").host_if.clone(), bed.pod("server").host_if.clone()];
    let mut links = Vec::new();
    let mut toggle = |on: bool| {
        if !on {
            for id in links.drain(..) {
                prog.detach(id).expect("detach");
            }
            return;
        }
        for veth in &veths {
            for side in [TcAttachType::Ingress, TcAttachType::Egress] {
                let opts = TcAttachOptions::TcxOrder(LinkOrder::default());
                links.push(prog.attach_with_options(veth, side, opts).expect("attach"));
            }
        }
    };
    toggle(true);
    let mut row = compare(bed, "an empty TC program (pass_all: the hooks' floor)", server, &mut toggle);
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time statistics");
    let info = || {
        aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .map(|i| (i.run_count(), i.run_time()))
            .expect("pass_all is loaded")
    };
    let before = info();
    bed.pod("client").netns.run(move || run_rr(SocketAddr::new(server, RR_PORT))).expect("client");
    let after = info();
    drop(stats);
    let per_run = (after.1 - before.1).as_nanos() as f64 / (after.0 - before.0).max(1) as f64;
    row.prog_ns = Some((per_run, per_run));
    toggle(false);
    row
}

/// Moves the calling thread into `netns`.
fn enter(netns: &Netns) {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(format!("/run/netns/{}", netns.name())).expect("open netns");
    // SAFETY: a valid namespace fd.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// The rules in the same shape for both implementations.
struct Rules {
    /// Per rule: peer identity numbers (each one pod IP), and the port.
    identity_rules: Vec<(Vec<u32>, u16)>,
    /// Per rule: prefixes, and the port.
    cidr_rules: Vec<(Vec<ipnet::Ipv4Net>, u16)>,
}

impl Rules {
    /// `entries` policy entries; the first is the client's, the rest split
    /// between identities and prefixes.
    fn new(entries: usize) -> Rules {
        let others = entries.saturating_sub(1);
        let (ids, cidrs) = (others / 2, others - others / 2);
        let port = |rule: usize| 20_000 + rule as u16;
        let identity_rules = (0..ids)
            .collect::<Vec<_>>()
            .chunks(PER_RULE)
            .enumerate()
            .map(|(r, chunk)| (chunk.iter().map(|i| PEERS + *i as u32).collect(), port(r)))
            .collect();
        let cidr_rules = (0..cidrs)
            .collect::<Vec<_>>()
            .chunks(PER_RULE)
            .enumerate()
            .map(|(r, chunk)| {
                let nets = chunk
                    .iter()
                    .map(|i| {
                        let i = *i as u32;
                        ipnet::Ipv4Net::new(
                            Ipv4Addr::new(172, 16 + (i >> 16) as u8, (i >> 8) as u8, i as u8),
                            32,
                        )
                        .expect("prefix")
                    })
                    .collect();
                (nets, port(500 + r))
            })
            .collect();
        Rules { identity_rules, cidr_rules }
    }
}

/// A peer identity's pod address: 10.128.0.0/10.
fn peer_ip(identity: u32) -> Ipv4Addr {
    let i = identity - PEERS;
    Ipv4Addr::new(10, 128 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn portcullis_state(bed: &Bed, rules: &Rules) -> CompiledState {
    let tcp = |peer, start, end| AllowEntry {
        peer,
        protocol: Some(Protocol::Tcp),
        ports: Some(PortRange { start, end }),
        rule: 1,
    };
    let direction = |remote: u32| {
        let mut allow = vec![tcp(remote, RR_PORT, BULK_PORT)];
        for (ids, port) in &rules.identity_rules {
            allow.extend(ids.iter().map(|id| tcp(*id, *port, *port)));
        }
        let prefixes = rules
            .cidr_rules
            .iter()
            .flat_map(|(nets, port)| {
                nets.iter().map(|n| PrefixEntry { cidr: (*n).into(), allow: vec![tcp(0, *port, *port)] })
            })
            .collect();
        DirectionPolicy { isolated: true, allow, prefixes }
    };
    let mut ipcache: Vec<IpcacheEntry> = rules
        .identity_rules
        .iter()
        .flat_map(|(ids, _)| ids.iter())
        .map(|id| IpcacheEntry { cidr: IpAddr::from(peer_ip(*id)).into(), identity: *id, name: None })
        .collect();
    let endpoint = |id: u16, pod: &str, identity: u32, ingress: DirectionPolicy, egress: DirectionPolicy| {
        let p = bed.pod(pod);
        EndpointState {
            id,
            name: format!("bench/{pod}"),
            interface: p.host_if.clone(),
            identity,
            addresses: vec![IpAddr::from(p.ipv4)],
            ingress: ingress.into(),
            egress: egress.into(),
        }
    };
    for (pod, identity) in [("client", CLIENT), ("server", SERVER)] {
        let cidr = IpAddr::from(bed.pod(pod).ipv4).into();
        ipcache.push(IpcacheEntry { cidr, identity, name: None });
    }
    CompiledState {
        revision: 1,
        identities: Default::default(),
        ipcache,
        endpoints: vec![
            endpoint(1, "client", CLIENT, DirectionPolicy::default(), direction(SERVER)),
            endpoint(2, "server", SERVER, direction(CLIENT), DirectionPolicy::default()),
        ],
        services: vec![],
    }
}

/// kube-router's shape: FORWARD jumps to a chain per pod and direction;
/// established flows leave at the first rule; each (peer set, port) is one
/// rule matching an ipset; the pod's own allow comes after the others (a
/// policy's rules are not ordered for the flow at hand); then DROP.
fn iptables_install(node: &Netns, rules: &Rules, client: IpAddr, server: IpAddr) {
    let mut sets = String::new();
    let mut chains = String::from("*filter\n:PC-FW-SERVER - [0:0]\n:PC-FW-CLIENT - [0:0]\n");
    chains.push_str(&format!("-A FORWARD -d {server}/32 -j PC-FW-SERVER\n"));
    chains.push_str(&format!("-A FORWARD -s {client}/32 -j PC-FW-CLIENT\n"));
    for (chain, side, remote) in [("PC-FW-SERVER", "src", client), ("PC-FW-CLIENT", "dst", server)] {
        chains.push_str(&format!("-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"));
        for (r, (ids, port)) in rules.identity_rules.iter().enumerate() {
            let set = format!("pc-id-{r}");
            if side == "src" {
                sets.push_str(&format!("create {set} hash:ip family inet\n"));
                for id in ids {
                    sets.push_str(&format!("add {set} {}\n", peer_ip(*id)));
                }
            }
            chains.push_str(&format!(
                "-A {chain} -p tcp -m set --match-set {set} {side} --dport {port} -j ACCEPT\n"
            ));
        }
        for (r, (nets, port)) in rules.cidr_rules.iter().enumerate() {
            let set = format!("pc-net-{r}");
            if side == "src" {
                sets.push_str(&format!("create {set} hash:net family inet\n"));
                for n in nets {
                    sets.push_str(&format!("add {set} {n}\n"));
                }
            }
            chains.push_str(&format!(
                "-A {chain} -p tcp -m set --match-set {set} {side} --dport {port} -j ACCEPT\n"
            ));
        }
        let peer = if side == "src" { format!("-s {remote}/32") } else { format!("-d {remote}/32") };
        chains.push_str(&format!(
            "-A {chain} {peer} -p tcp -m multiport --dports {RR_PORT}:{BULK_PORT} -j ACCEPT\n"
        ));
        chains.push_str(&format!("-A {chain} -j DROP\n"));
    }
    chains.push_str("COMMIT\n");
    restore(node, "ipset", &["restore"], &sets);
    restore(node, "iptables-restore", &["-w", "--noflush"], &chains);
}

fn iptables_remove(node: &Netns) {
    restore(node, "iptables-restore", &["-w"], "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n");
    restore(node, "ipset", &["destroy"], "");
}

fn restore(node: &Netns, program: &str, args: &[&str], input: &str) {
    let mut child = node
        .command(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write rules");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{program} {args:?} failed");
}

struct Row {
    label: String,
    /// Median figures with the setup, and median ratios to the paired
    /// runs without it: TCP_RR req/s, TCP_CRR conn/s, bulk Gbit/s.
    figures: [(f64, f64); 3],
    /// Mean ns per run of from_container and to_container.
    prog_ns: Option<(f64, f64)>,
}

/// A client workload: runs for `RUN` against a server, returns its rate.
type Workload = fn(SocketAddr) -> f64;

/// Measures each figure `PAIRS` times with the setup on, each time right
/// after a run with it off.
fn compare(bed: &Bed, label: &str, server: IpAddr, toggle: &mut dyn FnMut(bool)) -> Row {
    let netns = &bed.pod("client").netns;
    let run = |f: Workload, port| {
        netns
            .run(move || {
                pin_to_cpu(CLIENT_CPU);
                f(SocketAddr::new(server, port))
            })
            .expect("client")
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut figures = [(0.0, 0.0); 3];
    let tests: [(Workload, u16); 3] = [(run_rr, RR_PORT), (run_crr, CRR_PORT), (run_bulk, BULK_PORT)];
    for (slot, (f, port)) in figures.iter_mut().zip(tests) {
        let (mut with, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..PAIRS {
            toggle(false);
            let base = run(f, port);
            toggle(true);
            let value = run(f, port);
            with.push(value);
            ratios.push(value / base);
        }
        *slot = (median(with), median(ratios));
    }
    let [(rr, _), (crr, _), (bulk, _)] = figures;
    eprintln!("  {label}: {rr:.0} req/s, {crr:.0} conn/s, {bulk:.2} Gbit/s");
    Row { label: label.to_string(), figures, prog_ns: None }
}

fn run_rr(to: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(to).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut b = [0u8; 1];
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < RUN {
        s.write_all(b"x").expect("write");
        s.read_exact(&mut b).expect("read");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn run_crr(to: SocketAddr) -> f64 {
    let mut b = [0u8; 1];
    let (start, mut n) = (Instant::now(), 0u64);
    while start.elapsed() < RUN {
        let mut s = TcpStream::connect(to).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.write_all(b"x").expect("write");
        s.read_exact(&mut b).expect("read");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn run_bulk(to: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(to).expect("connect");
    let buf = vec![0u8; 128 * 1024];
    let (start, mut bytes) = (Instant::now(), 0u64);
    while start.elapsed() < RUN {
        s.write_all(&buf).expect("write");
        bytes += buf.len() as u64;
    }
    bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

fn start_servers(netns: &Netns, stop: Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<Option<()>>> {
    let mut out = Vec::new();
    for port in [RR_PORT, CRR_PORT, BULK_PORT] {
        let stop = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        out.push(
            netns
                .spawn(move || {
                    pin_to_cpu(SERVER_CPU);
                    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind");
                    // A blocking accept that wakes every 100 ms to look at `stop`.
                    set_receive_timeout(&listener, Duration::from_millis(100));
                    ready_tx.send(()).expect("ready");
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut conn, _)) = listener.accept() else { continue };
                        let _ = conn.set_read_timeout(None);
                        let _ = conn.set_nodelay(true);
                        let mut serve = move || {
                            let mut buf = vec![0u8; 128 * 1024];
                            match port {
                                // Echo one byte per request until the client goes.
                                RR_PORT => {
                                    while conn.read_exact(&mut buf[..1]).is_ok() {
                                        if conn.write_all(&buf[..1]).is_err() {
                                            return;
                                        }
                                    }
                                }
                                // One exchange, then close (the server side
                                // holds TIME_WAIT).
                                CRR_PORT => {
                                    if conn.read_exact(&mut buf[..1]).is_ok() {
                                        let _ = conn.write_all(&buf[..1]);
                                    }
                                }
                                // Sink.
                                _ => while matches!(conn.read(&mut buf), Ok(n) if n > 0) {},
                            }
                        };
                        if port == CRR_PORT {
                            serve();
                        } else {
                            std::thread::spawn(move || {
                                pin_to_cpu(SERVER_CPU);
                                serve()
                            });
                        }
                    }
                })
                .expect("server thread"),
        );
        ready_rx.recv().expect("server ready");
    }
    out
}

/// Client and server on their own CPUs (of two): less scheduling noise.
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

fn pin_to_cpu(cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn set_receive_timeout(listener: &TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
    // SAFETY: a valid socket fd and a timeval of the size given.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| setup | TCP_RR req/s | vs none | TCP_CRR conn/s | vs none | bulk Gbit/s | vs none | from_container ns/run | to_container ns/run |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        let (from, to) = match r.prog_ns {
            Some((a, b)) => (format!("{a:.0}"), format!("{b:.0}")),
            None => ("-".into(), "-".into()),
        };
        let [(rr, rr_ratio), (crr, crr_ratio), (bulk, bulk_ratio)] = r.figures;
        println!(
            "| {} | {rr:.0} | {rr_ratio:.3} | {crr:.0} | {crr_ratio:.3} | {bulk:.2} | {bulk_ratio:.3} | {from} | {to} |",
            r.label
        );
    }
    println!("\n(\"vs none\": the median ratio of each run to the run without any program just before it.)");
}
