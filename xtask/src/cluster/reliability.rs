//! Reliability on the real cluster, with traffic flowing the whole time:
//! the agent adopting pods that existed before it, the agent SIGKILLed and
//! restarted many times, the API server stopped for a minute. Throughout,
//! long-lived allowed connections must never break, new allowed connections
//! must always succeed, and a denied client must never connect once.
//!
//! The traffic is the test's own sockets, opened inside the pods' network
//! namespaces (the CRI's `cni-…` netns), so it crosses the pods' veths and
//! the agent's programs exactly as the pods' own traffic does, and every
//! exchange is counted rather than sampled.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portcullis_testbed::{Conversation, EchoServer, Netns};

use super::{AGENT_DAEMONSET, AGENT_NAMESPACE, AGENT_SELECTOR, Paths, check::Kube, images};
use crate::build_static_agent;

pub(super) const NS: &str = "portcullis-reliability";
const PORT: u16 = 7000;
const PAUSED: &str = r#"{"spec":{"template":{"spec":{"nodeSelector":{"portcullis.test/paused":"true"}}}}}"#;
const RESUMED: &str = r#"{"spec":{"template":{"spec":{"nodeSelector":null}}}}"#;

/// The three pods, the server's policy and its echo server.
pub(super) struct Fixture {
    pub(super) server: IpAddr,
    allowed_ip: IpAddr,
    pub(super) allowed: Arc<Netns>,
    pub(super) denied: Arc<Netns>,
    _echo: EchoServer,
    _server_ns: Netns,
}

impl Fixture {
    pub(super) fn create(kube: &Kube) -> Result<Fixture> {
        kube.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"))?;
        // Pods are refused until the namespace's default ServiceAccount
        // exists, which the controller manager may take a while to make
        // (after the API server outage, it is still reconnecting).
        let t = Instant::now();
        while kube.run(&["get", "serviceaccount", "-n", NS, "default", "-o", "name"]).is_err() {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("namespace {NS} has no default ServiceAccount after 120 s");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        kube.apply(&format!(
            "{}---\n{}---\n{}---\n{}",
            pause_pod("server", "app", "server"),
            pause_pod("allowed", "role", "allowed"),
            pause_pod("denied", "role", "denied"),
            policy("allowed")
        ))?;
        let (server, server_ns) = sandbox(kube, "server")?;
        let echo = EchoServer::start(&server_ns, PORT)?;
        let (allowed_ip, allowed) = sandbox(kube, "allowed")?;
        Ok(Fixture {
            server,
            allowed_ip,
            allowed: Arc::new(allowed),
            denied: Arc::new(sandbox(kube, "denied")?.1),
            _echo: echo,
            _server_ns: server_ns,
        })
    }

    /// Waits until `from` can connect (or, `reach` false, cannot): how long.
    pub(super) fn wait_until(&self, from: &Arc<Netns>, reach: bool, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        while connects(from, self.server)? != reach {
            if t.elapsed() > timeout {
                bail!(
                    "{} still {} {}:{PORT} after {timeout:?}",
                    from.name(),
                    if reach { "cannot reach" } else { "reaches" },
                    self.server
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(t.elapsed())
    }
}

/// A pod of the test namespace that only holds its sandbox (the test's
/// own sockets serve and probe inside it).
pub(super) fn pause_pod(name: &str, label: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}, labels: {{{label}: {value}}}}}\n\
         spec:\n  terminationGracePeriodSeconds: 0\n  containers: [{{name: pause, image: {}, args: [pause]}}]\n",
        images::AGNHOST
    )
}

/// Waits for a pod of the test namespace to be Ready; its IP and sandbox.
pub(super) fn sandbox(kube: &Kube, name: &str) -> Result<(IpAddr, Netns)> {
    kube.run(&["wait", "-n", NS, "--for=condition=Ready", &format!("pod/{name}"), "--timeout=120s"])?;
    let ip: IpAddr = kube
        .run(&["get", "pod", "-n", NS, name, "-o", "jsonpath={.status.podIP}"])?
        .parse()
        .with_context(|| format!("pod {NS}/{name} has no IP"))?;
    Ok((ip, Netns::holding(ip)?))
}

/// The server's policy: TCP 7000 from pods with `role: <role>` only.
fn policy(role: &str) -> String {
    format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: server-ingress, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{app: server}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{role: {role}}}}}}}]
    ports: [{{protocol: TCP, port: {PORT}}}]
"#
    )
}

/// An update the API server admits and the agent refuses (an `except`
/// written as an IPv4-mapped IPv6 prefix inside an IPv4 `cidr`): the agent
/// names it in an Event and keeps the last good version. Had it taken
/// the new peer without its `except`, the denied pod (in 10.0.0.0/8) would
/// get in.
fn bad_update_keeps_last_good(kube: &Kube, fx: &Fixture) -> Result<()> {
    let bad = policy("allowed").replace(
        "  - from: [",
        "  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [\"::ffff:10.1.0.0/112\"]}}, ",
    );
    kube.apply(&bad)?;
    let line =
        super::check::wait_rejected(kube, NS, "server-ingress", "spec.ingress[0].from[0].ipBlock.except[0]")?;
    for _ in 0..10 {
        if connects(&fx.denied, fx.server)? {
            bail!(
                "after a refused update of its policy the denied pod gets in: the last good version was not kept"
            );
        }
    }
    fx.wait_until(&fx.allowed, true, Duration::from_secs(1))?;
    kube.apply(&policy("allowed"))?;
    eprintln!("cluster test: a refused update kept the last good policy enforced; reported: {line}");

    // A new policy refused outright stands in as isolation without rules:
    // the allowed pod's egress, which it selects, is shut (had the agent
    // ignored it the pod would pass; had it dropped the `except`, too).
    kube.apply(&format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: odd-egress, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{role: allowed}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: ["::ffff:10.1.0.0/112"]}}}}]
"#
    ))?;
    let line = super::check::wait_rejected(kube, NS, "odd-egress", "spec.egress[0].to[0].ipBlock.except[0]")?;
    fx.wait_until(&fx.allowed, false, Duration::from_secs(5))
        .context("a policy refused at first sight left the pods it selects open")?;
    kube.run(&["delete", "networkpolicy", "-n", NS, "odd-egress"])?;
    fx.wait_until(&fx.allowed, true, Duration::from_secs(10))?;
    eprintln!("cluster test: a policy refused at first sight isolated what it selects; reported: {line}");
    Ok(())
}

/// A pod IP handed to a new pod right after its old pod left: the new
/// pod must get only its own policy. The old pod was let in by the
/// server's policy, the new one is not; host-local hands out addresses in
/// turn, so the test points its cursor just before the freed address.
fn reused_ip_gets_only_its_own_policy(paths: &Paths, kube: &Kube, fx: &Fixture) -> Result<()> {
    // What a failed run may have left.
    kube.run(&[
        "delete",
        "pod",
        "-n",
        NS,
        "old",
        "new",
        "--ignore-not-found",
        "--wait=true",
        "--timeout=60s",
    ])?;
    kube.apply(&pause_pod("old", "role", "allowed"))?;
    let (ip, old) = sandbox(kube, "old")?;
    let old = Arc::new(old);
    fx.wait_until(&old, true, Duration::from_secs(10)).context("the old pod was never let in")?;
    drop(old);
    kube.run(&["delete", "pod", "-n", NS, "old", "--wait=true", "--timeout=60s"])?;
    let IpAddr::V4(v4) = ip else { bail!("the test cluster's pods are IPv4") };
    // host-local's state for the bridge network of scripts/cluster/up.sh's
    // conflist (its dataDir); nothing else allocates while this test runs.
    let cursor = paths.work.join("cni/ipam/portcullis-test/last_reserved_ip.0");
    std::fs::write(&cursor, std::net::Ipv4Addr::from(u32::from(v4) - 1).to_string())
        .with_context(|| format!("writing {}", cursor.display()))?;
    kube.apply(&pause_pod("new", "role", "newcomer"))?;
    let (new_ip, new) = sandbox(kube, "new")?;
    let new = Arc::new(new);
    if new_ip != ip {
        bail!("host-local gave the new pod {new_ip}, not the freed {ip}: the check cannot run");
    }
    for _ in 0..10 {
        if connects(&new, fx.server)? {
            bail!("a new pod on {ip}, the address of a pod the server let in, got in too");
        }
    }
    // It can send: a pod no policy isolates takes its connection.
    let echo = EchoServer::start(&fx.allowed, PORT + 1)?;
    let target = SocketAddr::new(fx.allowed_ip, PORT + 1);
    let reached = new.run(move || TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok())?;
    drop(echo);
    if !reached {
        bail!("the new pod on {ip} cannot reach an unisolated pod either: the check proves nothing");
    }
    kube.run(&["delete", "pod", "-n", NS, "new", "--wait=true", "--timeout=60s"])?;
    eprintln!("cluster test: a new pod on a reused address ({ip}) got only its own policy");
    Ok(())
}

/// Whether a TCP connection from inside `from` to the server completes.
pub(super) fn connects(from: &Arc<Netns>, server: IpAddr) -> Result<bool> {
    let target = SocketAddr::new(server, PORT);
    from.run(move || TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok())
}

/// What the traffic saw.
#[derive(Default, Debug)]
pub(super) struct Counts {
    /// Echo round trips on the long-lived connections.
    exchanges: u64,
    /// Long-lived connections that broke (an exchange failed).
    broken: Vec<String>,
    /// The longest wait for one echo on a long-lived connection.
    slowest: Duration,
    /// New connections from the allowed pod, each with one exchange.
    new_ok: u64,
    new_failed: u64,
    /// Connection attempts from the denied pod, and how many got through.
    denied_tries: u64,
    leaks: u64,
    /// Denied probes that could not run (the sandbox could not be entered).
    probe_errors: u64,
}

/// Traffic on threads until stopped: long-lived echo conversations and
/// new connections from the allowed pod, connection attempts from the
/// denied one.
pub(super) struct Traffic {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<Counts>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    pub(super) fn start(fx: &Fixture, conversations: usize) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(Counts::default()));
        let mut threads = Vec::new();
        // All connections first: a failure leaves no thread behind.
        let opened = (0..conversations)
            .map(|i| {
                Conversation::open(&fx.allowed, fx.server, PORT, Duration::from_secs(2))
                    .with_context(|| format!("opening long-lived connection {i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, mut conv) in opened.into_iter().enumerate() {
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = conv.exchange(&format!("conversation {i} line {n}"));
                    let took = t.elapsed();
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    if !ok {
                        c.broken.push(format!("connection {i} broke after {n} exchanges"));
                        return;
                    }
                    c.exchanges += 1;
                    c.slowest = c.slowest.max(took);
                    drop(c);
                    n += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        let (allowed, server) = (fx.allowed.clone(), fx.server);
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let ok = Conversation::open(&allowed, server, PORT, Duration::from_secs(2))
                    .is_ok_and(|mut conv| conv.exchange("new connection"));
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                if ok {
                    c.new_ok += 1
                } else {
                    c.new_failed += 1
                }
                drop(c);
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        let (denied, server) = (fx.denied.clone(), fx.server);
        let (s, c) = (stop.clone(), counts.clone());
        threads.push(std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let tried = connects(&denied, server);
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                match tried {
                    Ok(leaked) => {
                        c.denied_tries += 1;
                        c.leaks += u64::from(leaked);
                    }
                    // Not a denial: a probe that never ran proves nothing.
                    Err(_) => c.probe_errors += 1,
                }
                drop(c);
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
        Ok(Traffic { stop, counts, threads })
    }

    fn finish(mut self) -> Counts {
        self.halt();
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Fails unless every allowed exchange succeeded and nothing denied passed.
    pub(super) fn judge(self, what: &str) -> Result<Counts> {
        let c = self.finish();
        let mut wrong = c.broken.clone();
        if c.new_failed > 0 {
            wrong.push(format!(
                "{} of {} new allowed connections failed",
                c.new_failed,
                c.new_ok + c.new_failed
            ));
        }
        if c.probe_errors > 0 {
            wrong.push(format!(
                "{} denied probes could not enter the pod's network namespace",
                c.probe_errors
            ));
        }
        if c.leaks > 0 {
            wrong.push(format!("{} of {} denied connection attempts got through", c.leaks, c.denied_tries));
        }
        if c.exchanges == 0 || c.new_ok == 0 || c.denied_tries == 0 {
            wrong.push(format!("the traffic did not run: {c:?}"));
        }
        if !wrong.is_empty() {
            bail!("{what}:\n  {}", wrong.join("\n  "));
        }
        Ok(c)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

pub(super) fn describe(c: &Counts) -> String {
    format!(
        "{} echoes on long-lived connections (slowest {:.0} ms), {} new allowed connections, \
         0 of {} denied attempts through",
        c.exchanges,
        c.slowest.as_secs_f64() * 1e3,
        c.new_ok,
        c.denied_tries
    )
}

/// The agent as a process on the node, started the way the DaemonSet
/// starts it (same arguments, the DaemonSet's ServiceAccount and RBAC),
/// so that it can be SIGKILLed and restarted at once: the kubelet would
/// back off restarting a crashing container for minutes.
struct HostAgent {
    binary: PathBuf,
    kubeconfig: PathBuf,
    node: String,
    log_dir: PathBuf,
    starts: usize,
}

impl HostAgent {
    fn new(paths: &Paths, kube: &Kube) -> Result<HostAgent> {
        let binary = build_static_agent()?;
        let kubeconfig = paths.work.join("portcullis-agent.kubeconfig");
        let secret = kube.run(&[
            "get",
            "serviceaccount",
            "-n",
            AGENT_NAMESPACE,
            "portcullis",
            "-o",
            "jsonpath={.secrets[0].name}",
        ])?;
        let token = kube.run(&[
            "get",
            "secret",
            "-n",
            AGENT_NAMESPACE,
            &secret,
            "-o",
            "go-template={{.data.token | base64decode}}",
        ])?;
        let node_ip = std::fs::read_to_string(paths.work.join("state/node-ip")).context("reading node-ip")?;
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: portcullis\n  cluster: {{server: \"https://{}:6443\", certificate-authority: \"{}\"}}\nusers:\n- name: portcullis-agent\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: agent\n  context: {{cluster: portcullis, user: portcullis-agent}}\ncurrent-context: agent\n",
                node_ip.trim(),
                paths.work.join("pki/ca.crt").display()
            ),
        )?;
        let log_dir = paths.work.join("logs/host-agent");
        std::fs::create_dir_all(&log_dir)?;
        Ok(HostAgent { binary, kubeconfig, node: paths.node_name.clone(), log_dir, starts: 0 })
    }

    fn start(&mut self) -> Result<(Running, PathBuf)> {
        self.starts += 1;
        let log = self.log_dir.join(format!("start-{}.log", self.starts));
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&self.binary)
            .args(["run", "--kube", "--node", &self.node])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d"])
            .env("RUST_LOG", "info")
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        Ok((Running(child), log))
    }

    fn uninstall(&self) -> Result<()> {
        let status = Command::new(&self.binary).arg("uninstall").status()?;
        if !status.success() {
            bail!("agent uninstall failed");
        }
        Ok(())
    }
}

/// Waits for the agent's first `enforced revision` line in `log`.
fn wait_enforced(child: &mut Child, log: &Path, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| l.starts_with("enforced revision")) {
            return Ok(t.elapsed());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited ({status}): {}", tail(&text, 15));
        }
        if t.elapsed() > timeout {
            bail!("the agent has not enforced after {timeout:?}: {}", tail(&text, 15));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A host agent, SIGKILLed when dropped: none outlives the test (a second
/// agent would fight the DaemonSet's over the maps).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigkill(child: &mut Child) -> Result<()> {
    child.kill().context("SIGKILL to the agent")?;
    child.wait()?;
    Ok(())
}

/// A small deterministic generator for the kill timings, seeded and
/// printed so that a failing schedule can be replayed.
struct Jitter(u64);

impl Jitter {
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33;
        Duration::from_millis(lo + r % (hi - lo + 1))
    }
}

fn set_daemonset(kube: &Kube, patch: &str) -> Result<()> {
    kube.run(&["patch", "-n", AGENT_NAMESPACE, AGENT_DAEMONSET, "--type", "merge", "-p", patch])?;
    Ok(())
}

/// One of the DaemonSet's pods, as its agent container's status says.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct AgentPod {
    pub(super) image: String,
    pub(super) ready: bool,
    pub(super) restarts: u32,
}

/// The DaemonSet's pods.
pub(super) fn agent_pods(kube: &Kube) -> Result<Vec<AgentPod>> {
    let out = kube.run(&[
        "get",
        "pods",
        "-n",
        AGENT_NAMESPACE,
        "-l",
        AGENT_SELECTOR,
        "-o",
        "jsonpath={range .items[*]}{.spec.containers[0].image} {.status.containerStatuses[0].ready} \
         {.status.containerStatuses[0].restartCount}{\"\\n\"}{end}",
    ])?;
    Ok(out
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let (image, ready, restarts) = (f.next(), f.next(), f.next());
            AgentPod {
                image: image.unwrap_or_default().to_owned(),
                ready: ready == Some("true"),
                restarts: restarts.and_then(|n| n.parse().ok()).unwrap_or(0),
            }
        })
        .collect())
}

/// Waits until the DaemonSet runs `want` pods on the node, all ready.
fn wait_daemonset(kube: &Kube, want: u32) -> Result<()> {
    let t = Instant::now();
    loop {
        let pods = agent_pods(kube)?;
        let (total, ready) = (pods.len() as u32, pods.iter().filter(|p| p.ready).count() as u32);
        if total == want && ready == want {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the agent DaemonSet has {ready} ready of {total} pods, want {want}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Adoption, then `kills` SIGKILLs during traffic. The DaemonSet is paused
/// meanwhile and resumed at the end: its new pod takes over the pinned
/// state as in an upgrade, with the traffic still judged.
pub fn agent_restarts(paths: &Paths, kills: usize) -> Result<()> {
    let kube = Kube(paths);
    let fx = Fixture::create(&kube)?;
    fx.wait_until(&fx.denied, false, Duration::from_secs(30))?;
    fx.wait_until(&fx.allowed, true, Duration::from_secs(30))?;
    bad_update_keeps_last_good(&kube, &fx)?;
    reused_ip_gets_only_its_own_policy(paths, &kube, &fx)?;
    let mut agent = HostAgent::new(paths, &kube)?;
    set_daemonset(&kube, PAUSED)?;
    let run = wait_daemonset(&kube, 0).and_then(|()| restarts(&fx, &mut agent, kills));
    let resumed = set_daemonset(&kube, RESUMED)
        .and_then(|()| wait_daemonset(&kube, 1))
        .and_then(|()| super::wait_agent_enforces(paths, Duration::from_secs(60)));
    let traffic = run?;
    resumed?;
    std::thread::sleep(Duration::from_secs(2));
    let counts = traffic.judge(&format!("agent killed {kills}× during traffic"))?;
    // The DaemonSet's agent enforces what the host agent left.
    fx.wait_until(&fx.denied, false, Duration::from_secs(1))?;
    fx.wait_until(&fx.allowed, true, Duration::from_secs(1))?;
    drop(fx);
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    eprintln!(
        "cluster test: agent SIGKILLed {kills}× and restarted, then handed over to the DaemonSet: {}",
        describe(&counts)
    );
    Ok(())
}

/// Returns the traffic still running, for the caller to judge after the
/// DaemonSet took over.
fn restarts(fx: &Fixture, agent: &mut HostAgent, kills: usize) -> Result<Traffic> {
    // Adoption: with the agent and its programs gone the denied pod gets
    // through (so the check can fail); a new agent finds the pods that are
    // already running (no CNI call for them) and closes it again.
    agent.uninstall()?;
    fx.wait_until(&fx.denied, true, Duration::from_secs(10)).context(
        "with the agent uninstalled the denied pod still cannot connect: the check proves nothing",
    )?;
    let started = Instant::now();
    let (mut child, mut log) = agent.start()?;
    let first = wait_enforced(&mut child.0, &log, Duration::from_secs(60))?;
    // Behind a bridge, a pod the node never spoke to has no neighbour
    // entry: the agent asks the kernel to resolve it and places it on the
    // next pass, about a second later.
    fx.wait_until(&fx.denied, false, Duration::from_secs(5))
        .context("the new agent did not adopt the pods that were already running")?;
    let adopted = started.elapsed();
    fx.wait_until(&fx.allowed, true, Duration::from_millis(500))?;
    eprintln!(
        "cluster test: a fresh agent adopted the running pods: first state enforced {:.0} ms after it started, \
         the denied pod shut out after {:.0} ms",
        first.as_secs_f64() * 1e3,
        adopted.as_secs_f64() * 1e3
    );

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    let mut jitter = Jitter(seed);
    let traffic = Traffic::start(fx, 4)?;
    let mut to_enforce = Vec::new();
    let t = Instant::now();
    for i in 0..kills {
        if crate::interrupted() {
            sigkill(&mut child.0)?;
            bail!("interrupted");
        }
        // Half the kills land after the agent enforced, half while it may
        // still be starting (listing, compiling, writing maps).
        if i % 2 == 0 {
            let took = wait_enforced(&mut child.0, &log, Duration::from_secs(60))?;
            // The first agent is the adopting one, enforced already.
            if i > 0 {
                to_enforce.push(took);
            }
            std::thread::sleep(jitter.millis(100, 1500));
        } else {
            std::thread::sleep(jitter.millis(0, 800));
        }
        sigkill(&mut child.0)?;
        // Down for a while: only the pinned programs run.
        std::thread::sleep(jitter.millis(100, 1500));
        if i + 1 < kills {
            (child, log) = agent.start()?;
        }
    }
    to_enforce.sort();
    let ms =
        |d: Option<&Duration>| d.map_or("–".to_owned(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
    eprintln!(
        "cluster test: {kills} SIGKILLs in {:.1}s (schedule seed {seed}); restart to enforced: median {}, max {}",
        t.elapsed().as_secs_f64(),
        ms(to_enforce.get(to_enforce.len() / 2)),
        ms(to_enforce.last())
    );
    Ok(traffic)
}

/// The API server stopped for `outage` while the agent runs: enforcement
/// holds on the last good state, the agent keeps running, and a policy
/// change made right after the API server returns is enforced.
pub fn api_server_outage(paths: &Paths, outage: Duration) -> Result<()> {
    let kube = Kube(paths);
    let fx = Fixture::create(&kube)?;
    fx.wait_until(&fx.denied, false, Duration::from_secs(30))?;
    fx.wait_until(&fx.allowed, true, Duration::from_secs(30))?;
    let restarts_before = agent_restart_count(&kube)?;
    let traffic = Traffic::start(&fx, 4)?;

    let pid_file = paths.work.join("pids/kube-apiserver.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse().context("kube-apiserver.pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).context("the API server is not running")?;
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into())
        .collect();
    // SIGTERM closes its port at once; its graceful shutdown may then wait
    // on open watches for a minute, so it gets SIGKILL after 10 s.
    let t = Instant::now();
    // SAFETY: kill(2) on the PID the cluster scripts recorded.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    while alive(pid) {
        if t.elapsed() > Duration::from_secs(10) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the API server (PID {pid}) did not stop");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("cluster test: API server stopped; waiting {}s with traffic flowing", outage.as_secs());
    std::thread::sleep(outage.saturating_sub(t.elapsed()));
    let counts = traffic.judge("while the API server was away");

    // Back, as up.sh starts it: same arguments, its own session, same log.
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(paths.work.join("logs/kube-apiserver.log"))
        .context("the API server's log")?;
    let child = Command::new("setsid")
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("restarting the API server")?;
    std::fs::write(&pid_file, format!("{}\n", child.id()))?;
    let back = Instant::now();
    while kube.run(&["get", "--raw", "/readyz"]).is_err() {
        if back.elapsed() > Duration::from_secs(90) {
            bail!("the API server is not ready 90 s after its restart");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let counts = counts?;
    eprintln!(
        "cluster test: API server away {:.0}s: {}",
        back.duration_since(t).as_secs_f64(),
        describe(&counts)
    );
    // Right away, the policy flips: the denied pod is let in, the allowed
    // one shut out.
    let changed = Instant::now();
    kube.apply(&policy("denied"))?;
    eprintln!("cluster test: policy changed at {}", utc_now());
    let open = fx.wait_until(&fx.denied, true, Duration::from_secs(120))?;
    fx.wait_until(&fx.allowed, false, Duration::from_secs(5))?;
    let restarts_after = agent_restart_count(&kube)?;
    if restarts_after != restarts_before {
        bail!("the agent restarted during the outage ({restarts_before} → {restarts_after} restarts)");
    }
    eprintln!(
        "cluster test: a policy changed {:.1}s after the API server was ready was enforced {:.1}s later \
         (a watch retries within 0.5-8 s, then relists after 410 Gone); the agent never restarted",
        changed.duration_since(back).as_secs_f64(),
        open.as_secs_f64()
    );
    drop(fx);
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    Ok(())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%H:%M:%S.%3N"])
        .output()
        .map_or_else(|_| "?".into(), |o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Whether `pid` runs (a zombie no longer does).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

pub(super) fn agent_restart_count(kube: &Kube) -> Result<u32> {
    agent_pods(kube)?.first().map(|p| p.restarts).context("no agent pod")
}
