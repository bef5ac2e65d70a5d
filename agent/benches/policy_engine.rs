//! Policy engine at cluster scale: 10,000 pods in 100 namespaces on 10 nodes
//! (250 of them local), 1,000 policies of the usual shapes. Every figure is
//! also given as a ratio to a baseline measured in the same run, so results
//! compare across machines: ingesting the objects without compiling, for the
//! full compile; a full compile, for each incremental change.
//!
//! `cargo bench -p portcullis-agent --bench policy_engine` (or `cargo xtask bench`).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicIsize, Ordering},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use portcullis_agent::{
    model::{
        ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Operator, Peer, Pod, PortRange,
        PortRef, PortSpec, Protocol, Requirement, Rule,
    },
    policy::{Change, Engine},
    source::{Hints, StateBuilder},
};

/// Counts live heap bytes, for memory per pod.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const NODES: usize = 10;
const LOCAL: &str = "node-0";

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector { match_labels: labels(pairs), expressions: vec![] }
}

fn namespace(n: usize, extra: Option<&str>) -> Namespace {
    let mut l = labels(&[
        ("kubernetes.io/metadata.name", format!("ns{n}")),
        ("team", format!("t{}", n % 5)),
        ("env", if n.is_multiple_of(3) { "prod" } else { "dev" }.to_string()),
    ]);
    if let Some(e) = extra {
        l.insert("extra".into(), e.into());
    }
    Namespace { name: format!("ns{n}"), labels: l }
}

fn pod(ns: usize, i: usize, app_override: Option<&str>) -> Pod {
    let n = ns * PODS_PER_NS + i;
    // 250 of the 10,000 on this node, the rest spread over nine others.
    let node = if n.is_multiple_of(40) { LOCAL.to_string() } else { format!("node-{}", 1 + n % (NODES - 1)) };
    Pod {
        namespace: format!("ns{ns}"),
        name: format!("pod{i}"),
        labels: labels(&[
            ("app", app_override.map_or_else(|| format!("app{}", i % 10), str::to_string)),
            ("tier", if i.is_multiple_of(2) { "fe" } else { "be" }.to_string()),
            ("pod-template-hash", format!("h{}", i % 3)),
        ]),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8))],
        node: Some(node),
        host_network: false,
        finished: false,
        created: None,
        deleting: false,
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: if i.is_multiple_of(7) { 8080 } else { 80 },
                protocol: Protocol::Tcp,
            },
            ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
        ],
    }
}

/// Ten per namespace: default deny, app-to-app allows, namespace selectors,
/// CIDR egress with excepts, port ranges, named ports.
fn policies(ns: usize, variant: usize) -> Vec<NetworkPolicy> {
    let namespace = format!("ns{ns}");
    let tcp =
        |p: u16| PortSpec { protocol: Protocol::Tcp, port: Some(PortRef::Numbers(PortRange::single(p))) };
    let base = |name: String, selector: LabelSelector| NetworkPolicy {
        namespace: namespace.clone(),
        name,
        pod_selector: selector,
        affects_ingress: true,
        affects_egress: false,
        ingress: vec![],
        egress: vec![],
    };
    let mut out = vec![base("default-deny".into(), LabelSelector::everything())];
    for k in 0..5 {
        let mut p = base(format!("app{k}-from-app{}", k + 1), sel(&[("app", format!("app{k}"))]));
        p.ingress.push(Rule {
            peers: vec![Peer::Pods {
                namespaces: None,
                pods: Some(sel(&[("app", format!("app{}", k + 1 + variant))])),
            }],
            ports: vec![tcp(80), tcp(443)],
        });
        out.push(p);
    }
    let mut p = base("from-team".into(), sel(&[("tier", "fe".into())]));
    p.ingress.push(Rule {
        peers: vec![Peer::Pods {
            namespaces: Some(sel(&[("team", format!("t{}", ns % 5))])),
            pods: Some(LabelSelector {
                match_labels: Labels::new(),
                expressions: vec![Requirement {
                    key: "app".into(),
                    operator: Operator::In(["app1".to_string(), "app2".to_string()].into()),
                }],
            }),
        }],
        ports: vec![PortSpec { protocol: Protocol::Tcp, port: Some(PortRef::Named("http".into())) }],
    });
    out.push(p);
    let mut p = base("egress-cidr".into(), sel(&[("tier", "be".into())]));
    p.affects_egress = true;
    p.affects_ingress = false;
    let net = |s: &str| s.parse::<IpNet>().expect("cidr");
    p.egress.push(Rule {
        peers: vec![Peer::IpBlock {
            cidr: net("0.0.0.0/0"),
            except: vec![net("10.0.0.0/8"), net("192.168.0.0/16")],
        }],
        ports: vec![tcp(443)],
    });
    p.egress.push(Rule {
        peers: vec![Peer::Pods {
            namespaces: Some(LabelSelector::everything()),
            pods: Some(sel(&[("app", "app0".into())])),
        }],
        ports: vec![PortSpec { protocol: Protocol::Tcp, port: Some(PortRef::Named("http".into())) }],
    });
    out.push(p);
    let mut p = base("port-range".into(), sel(&[("app", "app9".into())]));
    p.ingress.push(Rule {
        peers: vec![Peer::Pods { namespaces: Some(sel(&[("env", "prod".into())])), pods: None }],
        ports: vec![PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Numbers(PortRange { start: 30000, end: 32767 })),
        }],
    });
    out.push(p);
    let mut p = base("dns".into(), LabelSelector::everything());
    p.affects_egress = true;
    p.egress.push(Rule {
        peers: vec![Peer::Pods { namespaces: Some(sel(&[("team", "t0".into())])), pods: None }],
        ports: vec![PortSpec {
            protocol: Protocol::Udp,
            port: Some(PortRef::Numbers(PortRange::single(53))),
        }],
    });
    out.push(p);
    out
}

fn cluster_changes() -> Vec<Change> {
    let mut changes = Vec::new();
    for ns in 0..NAMESPACES {
        changes.push(Change::UpsertNamespace(namespace(ns, None)));
        for i in 0..PODS_PER_NS {
            changes.push(Change::UpsertPod(pod(ns, i, None)));
        }
        changes.extend(policies(ns, 0).into_iter().map(Change::UpsertPolicy));
    }
    changes
}

struct Stats {
    median: Duration,
    p99: Duration,
}

fn measure(runs: usize, mut f: impl FnMut() -> Duration) -> Stats {
    let mut times: Vec<Duration> = (0..runs).map(|_| f()).collect();
    times.sort();
    Stats { median: times[runs / 2], p99: times[(runs * 99 / 100).min(runs - 1)] }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    // `cargo test --benches` runs this too: keep that quick.
    let quick =
        std::env::args().any(|a| a == "--test") || std::env::var_os("PORTCULLIS_BENCH_QUICK").is_some();
    let runs = if quick { 3 } else { 15 };
    let inc_runs = if quick { 5 } else { 101 };

    // Baseline: the same objects ingested by an engine on a node with no
    // endpoints (identities, ipcache, indices; nothing to compile).
    let changes = cluster_changes();
    let ingest = measure(runs, || {
        let mut e = Engine::new("no-such-node");
        let batch = changes.clone();
        let t = Instant::now();
        black_box(e.apply(batch));
        t.elapsed()
    });
    let full = measure(runs, || {
        let mut e = Engine::new(LOCAL);
        let batch = changes.clone();
        let t = Instant::now();
        let diff = e.apply(batch);
        let el = t.elapsed();
        assert_eq!(diff.endpoints.len(), 250, "250 local endpoints");
        el
    });

    let before = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(LOCAL);
    engine.apply(changes.clone());
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let pods = NAMESPACES * PODS_PER_NS;
    let before = LIVE.load(Ordering::Relaxed);
    let cluster_copy = engine.cluster().clone();
    let cluster_bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(cluster_copy);
    let before = LIVE.load(Ordering::Relaxed);
    let endpoints_copy = engine.endpoints().clone();
    let endpoint_bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(endpoints_copy);

    let mut flip = false;
    let mut incremental = |make: &mut dyn FnMut(bool) -> Change| {
        measure(inc_runs, || {
            flip = !flip;
            let change = make(flip);
            let t = Instant::now();
            black_box(engine.apply([change]));
            t.elapsed()
        })
    };
    let relabel = incremental(&mut |f| Change::UpsertPod(pod(3, 1, Some(if f { "app3" } else { "app1" }))));
    let new_identity =
        incremental(&mut |f| Change::UpsertPod(pod(3, 1, Some(if f { "fresh" } else { "app1" }))));
    // A local pod's address arrives (its CNI ADD): it becomes an endpoint,
    // compiled with every peer its rules reach; then it loses it again.
    let pod_start = incremental(&mut |f| {
        let mut p = pod(3, 20, None);
        assert_eq!(p.node.as_deref(), Some(LOCAL), "pod 320 is local");
        if !f {
            p.ips.clear();
        }
        Change::UpsertPod(p)
    });
    let policy = incremental(&mut |f| {
        let mut p = policies(7, usize::from(f))[1].clone();
        p.name = "app0-from-app1".into();
        Change::UpsertPolicy(p)
    });
    let ns_relabel = incremental(&mut |f| Change::UpsertNamespace(namespace(12, f.then_some("yes"))));
    // 250 pods start together: the node's pods get their addresses (their
    // CNI ADDs) in one batch.
    let local: Vec<Pod> = (0..NAMESPACES)
        .flat_map(|ns| (0..PODS_PER_NS).map(move |i| pod(ns, i, None)))
        .filter(|p| p.node.as_deref() == Some(LOCAL))
        .collect();
    let burst = measure(runs, || {
        engine.apply(local.iter().cloned().map(|mut p| {
            p.ips.clear();
            Change::UpsertPod(p)
        }));
        let batch: Vec<Change> = local.iter().cloned().map(Change::UpsertPod).collect();
        let t = Instant::now();
        let diff = engine.apply(batch);
        let el = t.elapsed();
        assert_eq!(diff.endpoints.len(), 250, "250 endpoints back");
        el
    });
    // After each change the agent builds the compiled state from the
    // engine (endpoints, ipcache with names, identities, Services): here
    // after a pod's relabel to a new identity.
    let hints = Hints::default();
    let mut builder = StateBuilder::default();
    builder.build(&mut engine, 1, &[], &hints, true);
    let state_build = measure(inc_runs, || {
        flip = !flip;
        engine.apply([Change::UpsertPod(pod(3, 1, Some(if flip { "fresh" } else { "app1" })))]);
        let t = Instant::now();
        black_box(builder.build(&mut engine, 1, &[], &hints, true));
        t.elapsed()
    });

    println!("policy engine: {pods} pods, {NAMESPACES} namespaces, 1000 policies, 250 local endpoints");
    println!("{:<44} {:>12} {:>12} {:>14}", "", "median", "p99", "ratio");
    let row = |name: &str, s: &Stats, base: &Stats, base_name: &str| {
        let ratio = s.median.as_secs_f64() / base.median.as_secs_f64();
        println!("{name:<44} {:>12} {:>12} {:>10.5} x {base_name}", ms(s.median), ms(s.p99), ratio);
    };
    println!(
        "{:<44} {:>12} {:>12} {:>14}",
        "baseline: ingest only (no endpoints)",
        ms(ingest.median),
        ms(ingest.p99),
        "1"
    );
    row("full compile (ingest + 250 endpoints)", &full, &ingest, "ingest");
    row("pod relabel (between existing identities)", &relabel, &full, "full");
    row("pod relabel to a new identity", &new_identity, &full, "full");
    row("local pod gets its address (becomes an endpoint)", &pod_start, &full, "full");
    row("policy change", &policy, &full, "full");
    row("250 local pods get their addresses together", &burst, &full, "full");
    row("namespace relabel (100 pods)", &ns_relabel, &full, "full");
    row("compiled state built after a pod relabel", &state_build, &full, "full");
    println!(
        "memory: {} bytes live for the engine, {:.0} bytes per cluster pod",
        bytes,
        bytes as f64 / pods as f64
    );
    println!(
        "  of which the cluster objects {:.0} B/pod, the 250 compiled endpoints {:.0} B/pod ({} B each)",
        cluster_bytes as f64 / pods as f64,
        endpoint_bytes as f64 / pods as f64,
        endpoint_bytes / 250
    );
}
