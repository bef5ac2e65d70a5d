//! Scale and footprint, end to end: the agent against a 10,000-pod cluster
//! in the test cluster's API server, enforcing 250 local pods that are real
//! network namespaces, judged by real packets.
//!
//! `cargo xtask bench scale` (it installs and starts the test cluster when
//! needed and builds the release agent; needs root). Every figure comes
//! with a baseline measured in the same run.

mod agent;
mod objects;
mod probes;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent::{Agent, RssPeak, Usage};
use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Namespace, networking::v1::NetworkPolicy};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
    runtime::watcher,
};
use objects::{LOCAL_NS, LOCAL_PODS};
use portcullis_testbed::{Bed, Netns};
use probes::{Receivers, Sweeps};
use serde_json::json;

const PIN_DIR: &str = "/sys/fs/bpf/portcullis-scale";
const ALLOWED_PORT: u16 = 7777;
const DENIED_PORT: u16 = 7778;
/// The link from the test node's namespace to the API server.
const API_LINK: &str = "pcscale-api";

struct Env {
    binary: PathBuf,
    /// The CNI plugin the agent installs (its own binary, beside the agent's).
    plugin: PathBuf,
    kubeconfig: PathBuf,
    log: PathBuf,
    cycles_one: usize,
    cycles_all: usize,
}

fn env() -> Result<Env> {
    let var =
        |k: &str| std::env::var(k).with_context(|| format!("{k} is not set: run `cargo xtask bench scale`"));
    let num = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let binary: PathBuf = var("PORTCULLIS_SCALE_AGENT")?.into();
    let plugin = binary.with_file_name(portcullis_agent::cni::PLUGIN_BINARY);
    if !plugin.is_file() {
        anyhow::bail!("no CNI plugin binary at {}: run `cargo xtask bench scale`", plugin.display());
    }
    Ok(Env {
        binary,
        plugin,
        kubeconfig: var("PORTCULLIS_SCALE_KUBECONFIG")?.into(),
        log: std::env::temp_dir().join("portcullis-scale-agent.log"),
        cycles_one: num("PORTCULLIS_SCALE_CYCLES_ONE", 40),
        cycles_all: num("PORTCULLIS_SCALE_CYCLES_ALL", 15),
    })
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing to parse.
    let env = env()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (client, server) = rt.block_on(objects::client(&env.kubeconfig))?;
    let _ = std::fs::remove_file(&env.log);
    let _ = std::fs::remove_dir_all(PIN_DIR);
    let result = run(&rt, &client, &server, &env);
    let _ = std::fs::remove_dir_all(PIN_DIR);
    eprintln!("scale: removing the benchmark's objects");
    rt.block_on(objects::clean(&client))?;
    if result.is_err() {
        eprintln!("scale: the agent's log is {}", env.log.display());
    }
    result
}

/// The test node: a namespace with the pods' host-side veths, and a link to
/// the API server (which listens on the machine's address).
fn node(server: &str) -> Result<Bed> {
    let bed = Bed::new()?;
    let _ = portcullis_testbed::sh("ip", &["link", "del", API_LINK]);
    portcullis_testbed::sh(
        "ip",
        &["link", "add", API_LINK, "type", "veth", "peer", "name", "api", "netns", bed.node.name()],
    )?;
    portcullis_testbed::sh("ip", &["addr", "add", "198.51.100.1/30", "dev", API_LINK])?;
    portcullis_testbed::sh("ip", &["link", "set", API_LINK, "up"])?;
    bed.node.ip(&["addr", "add", "198.51.100.2/30", "dev", "api"])?;
    bed.node.ip(&["link", "set", "api", "up"])?;
    bed.node.ip(&["route", "add", &format!("{server}/32"), "via", "198.51.100.1"])?;
    Ok(bed)
}

struct Stats {
    median: f64,
    p99: f64,
    max: f64,
    n: usize,
}

/// Median and p99 (nearest rank) of milliseconds.
fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    if v.is_empty() {
        return Stats { median: f64::NAN, p99: f64::NAN, max: f64::NAN, n: 0 };
    }
    Stats { median: at(0.5), p99: at(0.99), max: v[v.len() - 1], n: v.len() }
}

/// The last `n` CNI ADD answers in the agent's log: their `ms` (request
/// read to answer) and `queued_ms`.
fn agent_shares(log: &Path, n: usize) -> Option<(Stats, Stats)> {
    let text = std::fs::read_to_string(log).ok()?;
    let field = |line: &str, name: &str| -> Option<f64> {
        let at = line.find(&format!(" {name}="))? + name.len() + 2;
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let answers: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.contains("CNI ADD answered"))
        .filter_map(|l| Some((field(l, "ms")?, field(l, "queued_ms")?)))
        .collect();
    let last = answers.get(answers.len().checked_sub(n)?..)?;
    Some((stats(last.iter().map(|a| a.0).collect()), stats(last.iter().map(|a| a.1).collect())))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The rows of the results table, printed at the end.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 4]>,
}

impl Table {
    fn row(
        &mut self,
        what: impl Into<String>,
        median: impl Into<String>,
        p99: impl Into<String>,
        baseline: impl Into<String>,
    ) {
        let row = [what.into(), median.into(), p99.into(), baseline.into()];
        eprintln!("scale: {} | {} | {} | {}", row[0], row[1], row[2], row[3]);
        self.rows.push(row);
    }

    fn print(&self) {
        println!("| what | median | p99 | baseline (same run) and ratio |");
        println!("| --- | ---: | ---: | --- |");
        for r in &self.rows {
            println!("| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]);
        }
    }
}

fn run(rt: &tokio::runtime::Runtime, client: &Client, server: &str, env: &Env) -> Result<()> {
    let mut table = Table::default();
    let mut bed = node(server)?;
    let pin_dir = Path::new(PIN_DIR);
    rt.block_on(objects::clean(client))?;

    // Baseline: the agent with none of the benchmark's objects.
    let a = Agent::start(&bed.node, &env.binary, &env.kubeconfig, pin_dir, &env.log)?;
    let empty_ready = a.wait_ready(0, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let empty = a.usage()?;
    a.stop()?;
    std::fs::remove_dir_all(pin_dir).context("removing the pins")?;

    eprintln!("scale: creating {} pods, {} namespaces, 1,000 policies", objects::PODS, objects::NAMESPACES);
    let created = rt.block_on(objects::create(client))?;
    eprintln!(
        "scale: the API server took {:.1} s for {} requests ({:.0}/s)",
        created.seconds,
        created.requests,
        created.requests as f64 / created.seconds
    );
    let (p4, p6) = objects::prober_ips();
    bed.add_pod_at(objects::PROBER, p4, p6)?;

    // The agent syncs the 10,000-pod cluster with one local endpoint.
    let a = Agent::start(&bed.node, &env.binary, &env.kubeconfig, pin_dir, &env.log)?;
    let cold = a.wait_ready(1, Duration::from_secs(120))?;
    let cold_usage = a.usage()?;
    std::thread::sleep(Duration::from_secs(2));
    let synced = a.usage()?;
    let maps_one = agent::maps(a.pid())?;
    table.row(
        "agent start to enforcing: 10,000-pod cluster, 1 local endpoint",
        format!("{:.0} ms", ms(cold)),
        "-",
        format!("no benchmark objects: {:.0} ms ({:.1}×)", ms(empty_ready), ms(cold) / ms(empty_ready)),
    );

    // --- 250 pods start together through the CNI plugin -----------------
    eprintln!("scale: wiring {LOCAL_PODS} pods (network namespaces, veths, routes)");
    for i in 0..LOCAL_PODS {
        bed.add_pod_at(&objects::local_pod_name(i), objects::local_ipv4(i), objects::local_ipv6(i))?;
    }
    let prober = Netns::existing(bed.pod(objects::PROBER).netns.name())?;
    let targets: Vec<Ipv4Addr> = (0..LOCAL_PODS).map(objects::local_ipv4).collect();
    let pods: Vec<&Netns> = (0..LOCAL_PODS).map(|i| &bed.pod(&objects::local_pod_name(i)).netns).collect();
    let receivers = Receivers::start(&pods, &[ALLOWED_PORT, DENIED_PORT])?;
    drop(pods);

    let plugin = |command: &str, i: usize| -> (Command, String) {
        let pod = bed.pod(&objects::local_pod_name(i));
        let mut cmd = Command::new(&env.plugin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("scale{i:03}"))
            .env("CNI_NETNS", format!("/run/netns/{}", pod.netns.name()))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={LOCAL_NS};K8S_POD_NAME={}", pod.name),
            );
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": pod.host_if}, {"name": "eth0", "sandbox": format!("/run/netns/{}", pod.netns.name())}],
            "ips": [{"address": format!("{}/32", pod.ipv4), "interface": 1}, {"address": format!("{}/128", pod.ipv6), "interface": 1}],
        });
        let conf = json!({"cniVersion": "1.0.0", "name": "scale", "type": "portcullis",
                          "socket": a.socket, "timeoutSeconds": 120, "prevResult": prev});
        (cmd, conf.to_string())
    };
    // Baseline: the same binary answering VERSION, 250 at once (the cost
    // of starting 250 plugin processes together on this machine).
    let version = agent::run_together(&bed.node, (0..LOCAL_PODS).map(|i| plugin("VERSION", i)).collect())?;
    // Every pod probed every ~25 ms (each probe dropped is a flow event the
    // agent handles too).
    let sweeps = Sweeps::start(&prober, targets.clone(), vec![ALLOWED_PORT], Duration::from_millis(20))?;
    std::thread::sleep(Duration::from_millis(200));
    let adds = agent::run_together(&bed.node, (0..LOCAL_PODS).map(|i| plugin("ADD", i)).collect())?;
    std::thread::sleep(Duration::from_millis(200));
    let sent = sweeps.stop();
    let failed: Vec<usize> = (0..LOCAL_PODS).filter(|&i| !adds[i].ok).collect();
    if let Some(&bad) = failed.first() {
        let took: Vec<String> = adds.iter().map(|t| format!("{:.0}", ms(t.took))).collect();
        bail!(
            "{} CNI ADDs failed, the first of {}: {}; times (ms): {}",
            failed.len(),
            objects::local_pod_name(bad),
            adds[bad].stdout,
            took.join(" ")
        );
    }
    // Fail closed from the first packet: no probe sent after a pod's ADD
    // answered may have reached it (the default deny isolates them all).
    let arrived = receivers.which(sent.iter().map(|s| s.id));
    let leaks = sent.iter().zip(&arrived).filter(|(s, got)| **got && s.at > adds[s.target].done).count();
    let judged = sent.iter().filter(|s| s.at > adds[s.target].done).count();
    if leaks > 0 {
        bail!("{leaks} probes reached a pod after its CNI ADD said it was enforced");
    }
    let add = stats(adds.iter().map(|t| ms(t.took)).collect());
    let ver = stats(version.iter().map(|t| ms(t.took)).collect());
    table.row(
        format!("pod start, CNI ADD to enforced, {LOCAL_PODS} pods together ({judged} probes after the ADDs: 0 through)"),
        format!("{:.1} ms", add.median),
        format!("{:.1} ms", add.p99),
        format!("plugin VERSION ×{LOCAL_PODS} together: {:.1} / {:.1} ms ({:.1}× / {:.1}×)", ver.median, ver.p99, add.median / ver.median, add.p99 / ver.p99),
    );
    // The agent's share, from its log: each ADD from its request read to
    // its answer, and of that the wait for the pass running when it came.
    match agent_shares(&env.log, LOCAL_PODS) {
        Some((took, queued)) => table.row(
            "pod start: the agent's share, ADD request read to answer (its log)",
            format!("{:.1} ms", took.median),
            format!("{:.1} ms", took.p99),
            format!("of it queued behind the pass before: {:.1} / {:.1} ms", queued.median, queued.p99),
        ),
        None => eprintln!("scale: the agent's log has no CNI ADD answers (RUST_LOG without agent=info?)"),
    }
    // The kubelet then writes the pods' addresses.
    rt.block_on(futures::stream::iter(0..LOCAL_PODS).for_each_concurrent(32, |i| async move {
        if let Err(e) = objects::local_started(client, i).await {
            eprintln!("scale: {e:#}");
        }
    }));
    a.wait_ready(LOCAL_PODS + 1, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    let maps_all = agent::maps(a.pid())?;
    let loaded = a.usage()?;
    map_rows(&mut table, &a, &maps_one, &maps_all)?;

    // --- policy to enforcement ---------------------------------------------
    let seen = watch_policies(rt, client);
    let one = policy_cycles(rt, client, &prober, &receivers, &seen, false, env.cycles_one)?;
    let all = policy_cycles(rt, client, &prober, &receivers, &seen, true, env.cycles_all)?;
    for (label, r) in [
        ("1 local endpoint", &one),
        (&format!("{LOCAL_PODS} local endpoints (the last of them)") as &str, &all),
    ] {
        for (dir, lat, watch) in
            [("allows", &r.allow, &r.watch_allow), ("forbids", &r.forbid, &r.watch_forbid)]
        {
            let (l, w) = (stats(lat.clone()), stats(watch.clone()));
            table.row(
                format!(
                    "policy {dir}: accepted to first packet {}, {label} ({} runs)",
                    if dir == "allows" { "passing" } else { "dropped" },
                    l.n
                ),
                format!("{:.1} ms", l.median),
                format!("{:.1} ms", l.p99),
                format!(
                    "the API server's watch delivers it: {:.1} / {:.1} ms ({:.1}× / {:.1}×)",
                    w.median,
                    w.p99,
                    l.median / w.median,
                    l.p99 / w.p99
                ),
            );
        }
    }

    // --- steady state, then a full resync ---------------------------------------
    let steady = |secs: u64| -> Result<(Usage, Usage)> {
        let u0 = a.usage()?;
        std::thread::sleep(Duration::from_secs(secs));
        Ok((u0, a.usage()?))
    };
    let (i0, i1) = steady(20)?;
    let idle_cpu = (i1.cpu - i0.cpu).as_secs_f64() / 20.0;
    let everyone = json!({"matchLabels": {"placement": "local"}});
    let steady_policy = objects::probe_policy("probe-steady", everyone, ALLOWED_PORT, true);
    rt.block_on(
        Api::<NetworkPolicy>::namespaced(client.clone(), LOCAL_NS)
            .create(&PostParams::default(), &steady_policy),
    )?;
    // Each pod probed on both ports every ~100 ms: every allowed probe
    // must arrive, no denied one may.
    let gap_sweeps = || {
        Sweeps::start(&prober, targets.clone(), vec![ALLOWED_PORT, DENIED_PORT], Duration::from_millis(100))
    };
    {
        let s = Sweeps::start(&prober, targets.clone(), vec![ALLOWED_PORT], Duration::from_millis(5))?;
        let t = Instant::now();
        while !probes::all_in(&receivers, &s, LOCAL_PODS, true, t) {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("probe-steady is not enforced after 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut gaps = Gaps::default();
    let dropped = |a: &Agent| a.metric("portcullis_dropped_packets_total").unwrap_or(f64::NAN);
    let d0 = dropped(&a);
    let s = gap_sweeps()?;
    let (l0, l1) = steady(20)?;
    gaps.add("steady", &receivers, s.stop(), dropped(&a) - d0);
    let load_cpu = (l1.cpu - l0.cpu).as_secs_f64() / 20.0;
    table.row(
        "agent CPU at steady state (idle / probed: 5,000 probes/s, half dropped)",
        format!("{:.1} % / {:.1} % of a core", idle_cpu * 100.0, load_cpu * 100.0),
        "-",
        "-",
    );
    table.row(
        "agent resident memory, steady: 10,000-pod cluster, 251 local endpoints",
        format!("{:.1} MiB", mib(l1.rss_kib)),
        "-",
        format!(
            "no benchmark objects: {:.1} MiB; 1 endpoint: {:.1} MiB; {:.2} KiB per cluster pod",
            mib(empty.rss_kib),
            mib(synced.rss_kib),
            (loaded.rss_kib as f64 - empty.rss_kib as f64) / objects::PODS as f64
        ),
    );
    // What of that the heap holds: in use, and freed but kept by the
    // allocator (fragmentation), from the agent's own metrics.
    let heap =
        |state: &str| a.metric(&format!("portcullis_heap_bytes{{state=\"{state}\"}}")).unwrap_or(f64::NAN);
    let (in_use, free) = (heap("in_use"), heap("free"));
    table.row(
        "agent heap, steady: in use / free but kept by the allocator",
        format!("{:.1} MiB / {:.1} MiB", in_use / 1048576.0, free / 1048576.0),
        "-",
        format!("resident: {:.1} MiB", mib(l1.rss_kib)),
    );

    // A full resync: the API server restarts, every watch relists.
    let d0 = dropped(&a);
    let s = gap_sweeps()?;
    let peak = RssPeak::start(a.pid());
    let r0 = a.usage()?;
    let restarts0 = a.metric("portcullis_api_watch_restarts_total").unwrap_or(0.0);
    let t = Instant::now();
    restart_api_server(&env.kubeconfig, rt, client)?;
    // Back: the watches must have failed and come back connected.
    while !(a.metric("portcullis_api_watch_restarts_total").unwrap_or(0.0) > restarts0
        && a.metric("portcullis_api_server_connected").unwrap_or(0.0) == 1.0)
    {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the agent's watches did not reconnect within 120 s of the API server restart");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let window = t.elapsed();
    let r1 = a.usage()?;
    let resync_peak = peak.stop();
    gaps.add("resync", &receivers, s.stop(), dropped(&a) - d0);
    table.row(
        format!(
            "full resync (API server restart, 4 watches relist): agent CPU over {:.0} s",
            window.as_secs_f64()
        ),
        format!(
            "{:.2} s ({:.1} % of a core)",
            (r1.cpu - r0.cpu).as_secs_f64(),
            (r1.cpu - r0.cpu).as_secs_f64() / window.as_secs_f64() * 100.0
        ),
        "-",
        format!("steady, probed: {:.1} % of a core", load_cpu * 100.0),
    );
    table.row(
        "agent resident memory, peak during the resync",
        format!("{:.1} MiB", mib(resync_peak)),
        "-",
        format!("steady: {:.1} MiB ({:.2}×)", mib(l1.rss_kib), resync_peak as f64 / l1.rss_kib as f64),
    );

    // --- adoption: agent restarts with 251 pods enforced -------------------
    let mut a = a;
    let mut adoption = Vec::new();
    let mut start_peak = Vec::new();
    let mut start_cpu = Vec::new();
    let d0 = dropped(&a);
    let s = gap_sweeps()?;
    for n in 0..5 {
        gaps.mark(format!("restart {n}: stopping the agent"));
        a.stop()?;
        gaps.mark(format!("restart {n}: stopped, starting the next"));
        a = Agent::start(&bed.node, &env.binary, &env.kubeconfig, pin_dir, &env.log)?;
        adoption.push(ms(a.wait_ready(LOCAL_PODS + 1, Duration::from_secs(120))?));
        gaps.mark(format!("restart {n}: ready"));
        let u = a.usage()?;
        start_peak.push(mib(u.hwm_kib));
        start_cpu.push(ms(u.cpu));
        std::thread::sleep(Duration::from_secs(2));
    }
    // The counters are pinned: they span the restarts.
    gaps.add("restarts", &receivers, s.stop(), dropped(&a) - d0);
    let adopt = stats(adoption);
    table.row(
        format!("adoption: agent restart to all {} endpoints enforced (5 restarts)", LOCAL_PODS + 1),
        format!("{:.0} ms", adopt.median),
        format!("{:.0} ms", adopt.max),
        format!("first start, 1 endpoint: {:.0} ms ({:.2}×)", ms(cold), adopt.median / ms(cold)),
    );
    let peak = stats(start_peak);
    let cpu = stats(start_cpu);
    table.row(
        "agent start: CPU time to ready / peak resident memory",
        format!("{:.0} ms / {:.1} MiB", cpu.median, peak.median),
        format!("{:.0} ms / {:.1} MiB", cpu.max, peak.max),
        format!("first start, 1 endpoint: {:.0} ms / {:.1} MiB", ms(cold_usage.cpu), mib(cold_usage.hwm_kib)),
    );
    table.row(
        "enforcement gaps during steady state, the resync and 5 restarts",
        format!(
            "{} of {} allowed probes lost, {} of {} denied probes through",
            gaps.lost(),
            gaps.allowed(),
            gaps.leaked(),
            gaps.denied()
        ),
        "-",
        format!("must be 0 and 0; {}", gaps.by_phase()),
    );
    a.stop()?;
    println!();
    println!(
        "Scale: {} pods in {} namespaces on {} nodes, {LOCAL_PODS} local (network namespaces), 1,000 policies",
        objects::PODS,
        objects::NAMESPACES,
        objects::NODES
    );
    println!();
    table.print();
    if gaps.lost() + gaps.leaked() > 0 {
        bail!(
            "enforcement gaps: {} allowed probes lost, {} denied probes through ({})",
            gaps.lost(),
            gaps.leaked(),
            gaps.by_phase()
        );
    }
    Ok(())
}

/// Probes of the allowed and the denied port, per phase, and what the
/// datapath dropped meanwhile (its counters): an allowed probe lost with no
/// drop beyond the denied probes was lost on the way (a socket buffer), not
/// by the policy.
#[derive(Default)]
struct Gaps {
    phases: Vec<Phase>,
    /// What happened when, in the phase being probed: lost probes are
    /// told against these.
    marks: Vec<(String, Instant)>,
}

struct Phase {
    name: &'static str,
    allowed: usize,
    lost: usize,
    denied: usize,
    leaked: usize,
    dropped: f64,
}

impl Gaps {
    fn add(&mut self, name: &'static str, receivers: &Receivers, sent: Vec<probes::Sent>, dropped: f64) {
        let arrived = receivers.which(sent.iter().map(|s| s.id));
        let mut p = Phase { name, allowed: 0, lost: 0, denied: 0, leaked: 0, dropped };
        for (s, got) in sent.iter().zip(arrived) {
            if s.port == ALLOWED_PORT {
                p.allowed += 1;
                p.lost += usize::from(!got);
            } else {
                p.denied += 1;
                p.leaked += usize::from(got);
            }
        }
        if p.lost + p.leaked > 0 {
            eprintln!(
                "scale: gaps in {name}: {} allowed lost, {} denied through, {dropped} drops counted",
                p.lost, p.leaked
            );
            // Which, and when: against the phase's first probe and its marks.
            if let Some(t0) = sent.iter().map(|s| s.at).min() {
                let at = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
                for (what, t) in &self.marks {
                    eprintln!("scale:   {:>9.1} ms  {what}", at(*t));
                }
                let arrived = receivers.which(sent.iter().map(|s| s.id));
                let wrong = sent.iter().zip(arrived).filter(|(s, got)| *got != (s.port == ALLOWED_PORT));
                for (s, _) in wrong.take(40) {
                    let what = if s.port == ALLOWED_PORT { "allowed, lost" } else { "denied, through" };
                    eprintln!(
                        "scale:   {:>9.1} ms  probe {} to {} ({what})",
                        at(s.at),
                        s.id,
                        objects::local_pod_name(s.target)
                    );
                }
            }
        }
        self.marks.clear();
        self.phases.push(p);
    }

    fn mark(&mut self, what: String) {
        self.marks.push((what, Instant::now()));
    }

    fn allowed(&self) -> usize {
        self.phases.iter().map(|p| p.allowed).sum()
    }

    fn lost(&self) -> usize {
        self.phases.iter().map(|p| p.lost).sum()
    }

    fn denied(&self) -> usize {
        self.phases.iter().map(|p| p.denied).sum()
    }

    fn leaked(&self) -> usize {
        self.phases.iter().map(|p| p.leaked).sum()
    }

    /// Per phase: allowed probes lost, and drops the datapath counted beyond
    /// the denied probes.
    fn by_phase(&self) -> String {
        self.phases
            .iter()
            .map(|p| {
                let extra = p.dropped - (p.denied - p.leaked) as f64;
                format!("{}: {} lost, {extra:.0} extra drops", p.name, p.lost)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn map_rows(
    table: &mut Table,
    a: &Agent,
    one: &BTreeMap<u64, agent::MapInfo>,
    all: &BTreeMap<u64, agent::MapInfo>,
) -> Result<()> {
    let total = |m: &BTreeMap<u64, agent::MapInfo>| m.values().map(|i| i.memlock).sum::<u64>();
    let entries = |map: &str| a.metric(&format!("portcullis_map_entries{{map=\"{map}\"}}")).unwrap_or(0.0);
    let policy = entries("policy");
    let cidr = entries("cidr");
    let (t1, t251) = (total(one), total(all));
    table.row(
        format!("BPF map memory (kernel's count, {} maps), 251 local endpoints", all.len()),
        format!("{:.1} MiB", t251 as f64 / 1048576.0),
        "-",
        format!(
            "1 endpoint: {:.1} MiB; {:.1} KiB more per endpoint; {:.0} policy and {:.0} CIDR entries per endpoint",
            t1 as f64 / 1048576.0,
            (t251 as f64 - t1 as f64) / 250.0 / 1024.0,
            policy / 251.0,
            cidr / 251.0
        ),
    );
    for (id, m) in all {
        eprintln!(
            "scale: map {id}: type {} key {} value {} max {} memlock {:.1} KiB",
            m.map_type,
            m.key_size,
            m.value_size,
            m.max_entries,
            m.memlock as f64 / 1024.0
        );
    }
    Ok(())
}

/// When the benchmark's own watch saw each probe policy, as allowing or
/// forbidding: the API server's part of the latency.
type Seen = Arc<Mutex<BTreeMap<(String, bool), Instant>>>;

fn watch_policies(rt: &tokio::runtime::Runtime, client: &Client) -> Seen {
    let seen: Seen = Default::default();
    let out = seen.clone();
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), LOCAL_NS);
    rt.spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = stream.next().await {
            if let watcher::Event::Apply(p) = event {
                let allows = serde_json::to_string(&p.spec).unwrap_or_default().contains(objects::PROBER);
                let name = p.metadata.name.unwrap_or_default();
                out.lock().expect("seen lock").entry((name, allows)).or_insert_with(Instant::now);
            }
        }
    });
    seen
}

#[derive(Default)]
struct Cycles {
    allow: Vec<f64>,
    forbid: Vec<f64>,
    watch_allow: Vec<f64>,
    watch_forbid: Vec<f64>,
}

/// Creates a policy that lets the prober in, then changes it so it does
/// not: each time, how long until the first probe passes (is dropped) at
/// every target and stays so.
fn policy_cycles(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    prober: &Netns,
    receivers: &Receivers,
    seen: &Seen,
    all: bool,
    cycles: usize,
) -> Result<Cycles> {
    let api: Api<NetworkPolicy> = Api::namespaced(client.clone(), LOCAL_NS);
    let mut out = Cycles::default();
    for k in 0..cycles {
        let (targets, selector) = if all {
            ((0..LOCAL_PODS).collect::<Vec<_>>(), json!({"matchLabels": {"placement": "local"}}))
        } else {
            let i = k % (LOCAL_PODS / objects::SINGLES_EVERY) * objects::SINGLES_EVERY;
            (vec![i], json!({"matchLabels": {"local-target": format!("t{i}")}}))
        };
        let ips = targets.iter().map(|&i| objects::local_ipv4(i)).collect();
        let pause = if all { Duration::ZERO } else { Duration::from_millis(1) };
        let name = format!("probe-{}-{k}", if all { "all" } else { "one" });
        let sweeps = Sweeps::start(prober, ips, vec![ALLOWED_PORT], pause)?;
        let wait = |want: bool, since: Instant| -> Result<()> {
            while !probes::all_in(receivers, &sweeps, targets.len(), want, since) {
                if since.elapsed() > Duration::from_secs(20) {
                    bail!("{name}: not {} after 20 s", if want { "allowed" } else { "forbidden" });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(100));
            Ok(())
        };
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        rt.block_on(api.create(
            &PostParams::default(),
            &objects::probe_policy(&name, selector.clone(), ALLOWED_PORT, true),
        ))?;
        wait(true, t0)?;
        let t1 = Instant::now();
        let mut forbid = objects::probe_policy(&name, selector, ALLOWED_PORT, false);
        forbid.metadata.resource_version = None;
        rt.block_on(api.replace(&name, &PostParams::default(), &forbid))?;
        wait(false, t1)?;
        let sent = sweeps.stop();
        rt.block_on(api.delete(&name, &DeleteParams::default()))?;
        let arrived = receivers.which(sent.iter().map(|s| s.id));
        let probes: Vec<(probes::Sent, bool)> = sent.into_iter().zip(arrived).collect();
        let before: Vec<_> = probes.iter().filter(|(s, _)| s.at < t1).copied().collect();
        let after: Vec<_> = probes.iter().filter(|(s, _)| s.at >= t1).copied().collect();
        // The last target to get there decides.
        let last = |at: &dyn Fn(usize) -> Option<Duration>, what: &str| -> Result<f64> {
            (0..targets.len())
                .map(|i| at(i).map(ms).with_context(|| format!("{name}: target {i} never {what}")))
                .try_fold(0.0f64, |m, l| Ok(m.max(l?)))
        };
        out.allow.push(last(&|i| probes::first_arrival(&before, i, t0), "passed")?);
        out.forbid.push(last(&|i| probes::settled(&after, i, false, t1), "stayed dropped")?);
        eprintln!(
            "scale: {name}: allowed after {:.1} ms, forbidden after {:.1} ms",
            out.allow[k], out.forbid[k]
        );
        let seen = seen.lock().expect("seen lock");
        if let (Some(a), Some(f)) = (seen.get(&(name.clone(), true)), seen.get(&(name.clone(), false))) {
            out.watch_allow.push(ms(*a - t0));
            out.watch_forbid.push(ms(*f - t1));
        }
    }
    Ok(out)
}

/// Restarts the test cluster's API server (as `cargo xtask cluster
/// reliability` does): SIGTERM, then the same command line again.
fn restart_api_server(kubeconfig: &Path, rt: &tokio::runtime::Runtime, client: &Client) -> Result<()> {
    let work = kubeconfig.parent().context("kubeconfig's directory")?;
    let pid_file = work.join("pids/kube-apiserver.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse().context("kube-apiserver.pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).context("the API server is not running")?;
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into())
        .collect();
    let t = Instant::now();
    // SAFETY: kill(2) on the PID the cluster scripts recorded.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    // SAFETY: signal 0 only checks.
    while unsafe { libc::kill(pid, 0) } == 0 {
        if t.elapsed() > Duration::from_secs(10) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::OpenOptions::new().append(true).open(work.join("logs/kube-apiserver.log"))?;
    let child = Command::new("setsid")
        .args(&argv)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("restarting the API server")?;
    std::fs::write(&pid_file, format!("{}\n", child.id()))?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    while rt.block_on(namespaces.list(&ListParams::default().limit(1))).is_err() {
        if t.elapsed() > Duration::from_secs(90) {
            bail!("the API server is not back 90 s after its restart");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
