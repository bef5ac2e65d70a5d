//! `cargo xtask conformance`: conformance cases (tests/conformance/FORMAT.md)
//! judged with real traffic.
//!
//! `--source files` (here): each case gets its own node (a network
//! namespace) with its pods as network namespaces on routed veths, serving
//! TCP and UDP on their ports; the agent binary enforces, learning the
//! objects from a manifests directory; after each step the runner waits for
//! the agent's report that the step's revision is enforced, then probes every
//! pair in parallel. `--source kube` ([`kube`]): the same cases as real pods
//! on the test cluster, enforced by the agent's DaemonSet.

mod kube;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portcullis_conformance::{
    Case, CaseError,
    case::{Probe, Protocol, Requirement, Target},
    case_files,
    expect::Matrix,
    report::{CaseOutcome, ProbeResult, render},
    world::{Family, World, WorldPod},
};
use portcullis_testbed::{Bed, Netns, Network, PinDir, ServiceSpec, Transport, agent::AgentProcess, probe};

use crate::{build_agent, handle_interrupts, interrupted, require_root};

/// How long an unanswered probe waits before it counts as blocked.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How long the agent may take to report a revision enforced.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Options {
    pub target: Option<Target>,
    pub ipv6: bool,
    /// Pods on a bridge (`cni0`) instead of routed veths.
    pub bridge: bool,
    /// Nodes the pods spread over (1 or 2).
    pub nodes: usize,
    pub source: String,
    pub paths: Vec<PathBuf>,
}

pub fn run(opts: Options) -> Result<i32> {
    require_root("cargo xtask conformance")?;
    handle_interrupts()?;
    if opts.paths.is_empty() {
        bail!("give case files or directories");
    }
    match opts.source.as_str() {
        "files" => {
            let agent = build_agent()?;
            let family = if opts.ipv6 { Family::V6 } else { Family::V4 };
            let shape = Shape { network: network(opts.bridge), nodes: opts.nodes };
            suite(&opts.paths, |case| run_case(case, family, opts.target, shape, &agent, Show::Outcome))
        }
        "kube" => kube::run(&opts),
        other => bail!("--source {other}: `files` or `kube`"),
    }
}

/// Runs every case under `paths` with `run_case` and prints the outcomes as
/// FORMAT.md says; returns the exit code. An error from `run_case` fails
/// the case (saying why), unless it is a `CaseError`: the file is malformed.
fn suite(paths: &[PathBuf], mut run_case: impl FnMut(&Case) -> Result<CaseOutcome>) -> Result<i32> {
    let files = case_files(paths).context("listing case files")?;
    let (mut passed, mut failed, mut skipped, mut malformed) = (0, 0, 0, 0);
    let started = Instant::now();
    let mut slowest: Option<(Duration, String)> = None;
    for file in files {
        if interrupted() {
            bail!("interrupted");
        }
        let case = match Case::load(&file) {
            Ok(c) => c,
            Err(e) => {
                println!("ERROR {e}");
                malformed += 1;
                continue;
            }
        };
        let t = Instant::now();
        let outcome = match run_case(&case) {
            Ok(o) => o,
            Err(e) => match e.downcast::<CaseError>() {
                Ok(case_error) => {
                    println!("ERROR {case_error}");
                    malformed += 1;
                    continue;
                }
                // The lab could not run it: that fails the case, saying why.
                Err(e) => {
                    println!("FAIL {}: {e:#}", case.name);
                    failed += 1;
                    continue;
                }
            },
        };
        match &outcome {
            CaseOutcome::Pass => passed += 1,
            CaseOutcome::Fail(_) => failed += 1,
            CaseOutcome::Skip(_) => skipped += 1,
        }
        if !matches!(outcome, CaseOutcome::Skip(_)) && slowest.as_ref().is_none_or(|(d, _)| t.elapsed() > *d)
        {
            slowest = Some((t.elapsed(), case.name.clone()));
        }
        print!("{}", render(&case.name, &outcome));
    }
    let total = started.elapsed().as_secs_f64();
    let ran = passed + failed;
    let mut timing = format!("conformance: {total:.0}s");
    if ran > 0 {
        timing.push_str(&format!(", {:.1}s per case run", total / f64::from(ran)));
    }
    if let Some((d, name)) = slowest {
        timing.push_str(&format!(" (slowest: {name}, {:.1}s)", d.as_secs_f64()));
    }
    eprintln!("{timing}");
    println!("{passed} passed, {failed} failed, {skipped} skipped");
    Ok(if malformed > 0 {
        2
    } else if failed > 0 {
        1
    } else {
        0
    })
}

/// Why this machine's lab cannot run a case, if it cannot.
fn skip_reason(case: &Case) -> Option<String> {
    // Every target runs here: pod IPs directly, Services through
    // kube-proxy-style DNAT.
    if case.requires.contains(&Requirement::Sctp) {
        return Some(
            if kernel_has_sctp() { "the lab's servers do not speak SCTP yet" } else { NO_SCTP }.into(),
        );
    }
    None
}

/// Why a case that needs SCTP is skipped on a kernel without it.
const NO_SCTP: &str = "this kernel has no SCTP (its policies are covered by the crafted-packet tests)";

fn kernel_has_sctp() -> bool {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd < 0 {
        return false;
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    true
}

/// How the lab wires pods: routed veths, or a bridge holding the gateways of
/// the world's pod subnets (10.64.0.0/16, fd00:64::/64).
pub fn network(bridge: bool) -> Network {
    if !bridge {
        return Network::Routed;
    }
    Network::Bridge {
        v4: (std::net::Ipv4Addr::new(10, 64, 255, 254), 16),
        v6: (std::net::Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 1, 0xfffe), 64),
    }
}

fn bed_name(id: &str) -> String {
    id.replace('/', "-")
}

/// How much a run shows while it goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Only the outcome (the conformance runner).
    Outcome,
    /// Every step: what changed, the tables and the dropped flows (the lab).
    Steps,
}

/// The lab's shape: how pods are wired, and over how many nodes they spread.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub network: Network,
    /// 1, or 2: pods alternate between two routed nodes joined by a link,
    /// each node with its own agent.
    pub nodes: usize,
}

/// The name of node `index` in the objects.
fn node_name(index: usize) -> String {
    if index == 0 { portcullis_conformance::world::NODE.to_string() } else { format!("node-{}", index + 1) }
}

pub fn run_case(
    case: &Case,
    family: Family,
    target: Option<Target>,
    shape: Shape,
    agent: &Path,
    show: Show,
) -> Result<CaseOutcome> {
    if let Some(why) = skip_reason(case) {
        return Ok(CaseOutcome::Skip(why));
    }
    let mut world = World::new(case, family, false);
    let nodes = shape.nodes.clamp(1, 2);
    let mut beds = Vec::new();
    for n in 0..nodes {
        beds.push(Bed::node(shape.network, n as u8)?);
    }
    for (i, pod) in world.pods.iter_mut().enumerate() {
        pod.node = node_name(i % nodes);
        let bed = &mut beds[i % nodes];
        bed.add_pod_at(&bed_name(&pod.id()), pod.ipv4, pod.ipv6)?;
        let ports: BTreeSet<u16> = pod.ports.iter().map(|p| p.port).collect();
        for port in ports {
            bed.serve(&bed_name(&pod.id()), port)?;
        }
    }
    if nodes == 2 {
        Bed::join(&beds[0], &beds[1])?;
    }
    // Each pod's Service, translated the way kube-proxy translates it (on
    // every node), when some probe goes through Services.
    let via_service = |p: &Probe| target.unwrap_or(p.target) == Target::Service;
    if case.steps.iter().flat_map(|s| &s.probes).any(via_service) {
        let mut services = Vec::new();
        for pod in &world.pods {
            for port in &pod.ports {
                let protocol = match port.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Sctp => continue,
                };
                services.push(ServiceSpec {
                    name: format!("{}/{}:{}", pod.namespace, pod.service_name(), port.port),
                    cluster_ip: pod.service_ip,
                    protocol: protocol.into(),
                    port: port.port,
                    backends: vec![(pod.ip, port.port)],
                });
            }
        }
        for bed in &mut beds {
            bed.add_services(&services)?;
        }
    }
    let dir = std::env::temp_dir().join(format!("portcullis-{}-manifests", beds[0].id));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let write = |world: &World, revision: usize| -> Result<()> {
        atomic_write(&dir.join("objects.yaml"), world.manifests().as_bytes())?;
        atomic_write(&dir.join("revision"), revision.to_string().as_bytes())
    };
    write(&world, 1)?;
    // One agent per node, each enforcing on its own pods and judging
    // Service connections that leave through the link.
    let mut pins = Vec::new();
    let mut agents = Vec::new();
    for (n, bed) in beds.iter().enumerate() {
        let pin = PinDir::new();
        let mut args: Vec<std::ffi::OsString> = vec![
            "run".into(),
            "--manifests".into(),
            dir.clone().into(),
            "--node".into(),
            node_name(n).into(),
            "--pin-dir".into(),
            pin.path.clone().into(),
        ];
        if nodes == 2 {
            args.extend(["--netdev".into(), portcullis_testbed::LINK.into()]);
        }
        agents.push(AgentProcess::start(&bed.node, agent, args)?);
        pins.push(pin);
    }
    for a in &mut agents {
        a.wait_for(&["enforced revision 1"], ENFORCE_TIMEOUT)?;
    }

    let mut failures = Vec::new();
    for (s, step) in case.steps.iter().enumerate() {
        let (_changes, notes) = world.step(s, step)?;
        for n in notes {
            eprintln!("  {}: step {}: {n}", case.name, s + 1);
        }
        let revision = s + 2;
        write(&world, revision)?;
        let mut enforced = Vec::new();
        for a in &mut agents {
            enforced.push(a.wait_for(&[&format!("enforced revision {revision}")], ENFORCE_TIMEOUT)?);
            a.take_new(Duration::ZERO);
        }
        if show == Show::Steps {
            println!("\n== {} step {}: {}", case.name, s + 1, describe(step));
            for (n, line) in enforced.iter().enumerate() {
                let who = if nodes == 1 { "agent".to_string() } else { format!("agent on {}", node_name(n)) };
                println!("{who}: {line}");
            }
        }
        // A client probes from its pod's namespace; the right server answers
        // with its pod's bed name.
        let netns_of = |client: &WorldPod| {
            let name = bed_name(&client.id());
            let bed =
                beds.iter().find(|b| b.pods.iter().any(|p| p.name == name)).context("the client's node")?;
            Ok(&bed.pod(&name).netns)
        };
        let answer_of = |server: &WorldPod| bed_name(&server.id());
        for (p, probe) in step.probes.iter().enumerate() {
            let (want, got) = probe_all(&world, s, p, probe, target, netns_of, answer_of)?;
            // Reported with the target it really used.
            let used = Probe { target: target.unwrap_or(probe.target), ..probe.clone() };
            let result = ProbeResult::new(s, p, &used, &world, want, got, vec![]);
            if show == Show::Steps {
                print!("{}", result.render());
            }
            if !result.passed() {
                failures.push(result);
            }
            // `agent policy trace` must give every pair the case's verdict,
            // and the maps must agree with it, on every node.
            if used.target == Target::PodIp {
                let mismatches = check_traces(&world, s, p, probe, &agents)?;
                if !mismatches.is_empty() {
                    bail!(
                        "step {}, probe {}: agent policy trace is wrong:\n  {}",
                        s + 1,
                        p + 1,
                        mismatches.join("\n  ")
                    );
                }
            }
        }
        if show == Show::Steps {
            let mut drops = Vec::new();
            for a in &mut agents {
                drops.extend(
                    a.take_new(Duration::from_millis(200)).into_iter().filter(|l| l.contains("DROPPED")),
                );
            }
            println!("  dropped flows ({}):", drops.len());
            for line in drops {
                println!("    {line}");
            }
        }
    }
    for a in &mut agents {
        a.stop();
    }
    drop(pins);
    Ok(if failures.is_empty() { CaseOutcome::Pass } else { CaseOutcome::Fail(failures) })
}

/// Asks each agent's `POST /v1/trace` for every pair of a probe (by pod
/// address) and returns the pairs whose verdict differs from the case's, or
/// whose maps disagree with the policies.
fn check_traces(
    world: &World,
    s: usize,
    p: usize,
    probe: &Probe,
    agents: &[AgentProcess],
) -> Result<Vec<String>> {
    let protocol = match probe.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    };
    let mut wrong = Vec::new();
    for pair in world.pairs(s, p, probe)? {
        let (client, server) = (&world.pods[pair.client], &world.pods[pair.server]);
        for agent in agents {
            let req = portcullis_agent::inspect::TraceRequest {
                from: client.ip.to_string(),
                to: server.ip.to_string(),
                port: pair.port,
                protocol: protocol.into(),
            };
            let body = serde_json::to_vec(&req)?;
            let (status, text) = portcullis_agent::api::fetch(
                &agent.socket(),
                "POST",
                "/v1/trace",
                Some(body),
                Some(Duration::from_secs(10)),
            )
            .context("asking the agent for a policy trace")?;
            if status != 200 {
                bail!("trace {} -> {}: HTTP {status}: {text}", client.id(), server.id());
            }
            let report: portcullis_agent::inspect::TraceReport = serde_json::from_str(&text)?;
            let who = format!("{} -> {}:{}/{protocol}", client.id(), server.id(), pair.port);
            if report.allowed != pair.expect {
                wrong.push(format!(
                    "{who}: traced {}, the case expects {}",
                    verdict(report.allowed),
                    verdict(pair.expect)
                ));
            }
            if report.datapath_agrees == Some(false) {
                let sides: Vec<String> = [&report.egress, &report.ingress]
                    .iter()
                    .filter_map(|side| {
                        side.datapath
                            .as_ref()
                            .filter(|d| !d.agrees)
                            .map(|d| format!("{}: {}", side.direction, d.verdict))
                    })
                    .collect();
                wrong.push(format!("{who}: the maps disagree with the policies ({})", sides.join("; ")));
            }
        }
    }
    Ok(wrong)
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "dropped" }
}

/// One line on what a step changes.
fn describe(step: &portcullis_conformance::case::Step) -> String {
    let mut parts = Vec::new();
    for op in &step.label {
        let who = op
            .namespace
            .as_ref()
            .map(|n| format!("namespace {n}"))
            .or(op.pod.as_ref().map(|p| format!("pod {p}")));
        let set: Vec<String> =
            op.set.iter().map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or("(removed)"))).collect();
        parts.push(format!("label {} {}", who.unwrap_or_default(), set.join(",")));
    }
    for d in &step.delete {
        parts.push(format!("delete {d}"));
    }
    for object in &step.apply {
        let meta =
            |f: &str| object.get("metadata").and_then(|m| m.get(f)).and_then(|v| v.as_str()).unwrap_or("?");
        let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
        parts.push(format!("apply {kind} {}/{}", meta("namespace"), meta("name")));
    }
    if parts.is_empty() { "probe only".into() } else { parts.join("; ") }
}

/// Probes every pair of one probe at once, each from its client's network
/// namespace (`netns_of`); a pair is reached when the server answers with
/// `answer_of(server)`. Returns expected and observed.
fn probe_all<'a>(
    world: &World,
    s: usize,
    p: usize,
    spec: &Probe,
    target: Option<Target>,
    netns_of: impl Fn(&WorldPod) -> Result<&'a Netns>,
    answer_of: impl Fn(&WorldPod) -> String,
) -> Result<(Matrix, Matrix)> {
    let via_service = target.unwrap_or(spec.target) == Target::Service;
    let transport = match spec.protocol {
        Protocol::Tcp => Transport::Tcp,
        Protocol::Udp => Transport::Udp,
        Protocol::Sctp => bail!("SCTP probes are not supported by the lab"),
    };
    let mut want = Matrix::new();
    let mut jobs = Vec::new();
    for pair in world.pairs(s, p, spec)? {
        let (client, server) = (&world.pods[pair.client], &world.pods[pair.server]);
        want.insert((client.id(), server.id()), pair.expect);
        let ip = if via_service { server.service_ip } else { server.ip };
        jobs.push((client.id(), server.id(), netns_of(client)?, answer_of(server), ip, pair.port));
    }
    let got: Result<Matrix> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(client, server, from, answer, ip, port)| {
                scope.spawn(move || {
                    // A probe that could not run (no namespace to enter)
                    // is an error, never "blocked".
                    let reply = probe(from, transport, ip, port, PROBE_TIMEOUT)
                        .with_context(|| format!("probing {client} -> {server}"))?;
                    // Reached means the right server answered.
                    Ok(((client, server), reply.as_deref() == Some(answer.as_str())))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a probe thread panicked"))?)
            .collect()
    });
    Ok((want, got?))
}

fn atomic_write(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
