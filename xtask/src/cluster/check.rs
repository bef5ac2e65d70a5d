//! `cargo xtask cluster test`: the cluster as the rest of the project needs
//! it, checked for real. From a machine with no cluster: `up` gives a Ready
//! node; pods reach each other by IP and by ClusterIP (and a closed port
//! stays closed, so the probe can fail); a privileged hostNetwork DaemonSet
//! runs with the host's /sys/fs/bpf mounted and full capabilities;
//! Portcullis' image runs; then `down` leaves the machine as it found it.

use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Paths, images, script, up};

const NS: &str = "portcullis-check";

pub fn run() -> Result<()> {
    let paths = Paths::read()?;
    if paths.work.exists() {
        bail!(
            "a cluster is (partly) up in {}: this test starts from none (`cargo xtask cluster down`)",
            paths.work.display()
        );
    }
    // Ctrl-C stops the step under way; `down` still runs.
    crate::handle_interrupts()?;
    let before = Snapshot::take(&paths)?;
    let t = Instant::now();
    up(true)?;
    eprintln!("cluster test: up in {:.1}s", t.elapsed().as_secs_f64());
    let checked = checks(&paths);
    if let Err(e) = &checked {
        eprintln!("cluster test: FAILED: {e:#}");
        let kube = Kube(&paths);
        for args in [&["get", "pods", "-A", "-o", "wide"][..], &["get", "events", "-n", NS]] {
            eprintln!(
                "--- kubectl {} ---\n{}",
                args.join(" "),
                kube.run(args).unwrap_or_else(|e| format!("{e:#}"))
            );
        }
        for log in ["kubelet", "containerd"] {
            let path = paths.work.join("logs").join(format!("{log}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<_> = text.lines().rev().take(15).collect();
            eprintln!("--- last lines of {log}.log ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    let t = Instant::now();
    script("down.sh", &[])?;
    eprintln!("cluster test: down in {:.1}s", t.elapsed().as_secs_f64());
    checked?;
    let after = Snapshot::take(&paths)?;
    let diff = before.diff(&after);
    if !diff.is_empty() {
        bail!("`down` left the machine changed:\n  {}", diff.join("\n  "));
    }
    eprintln!(
        "cluster test: passed; down left links, namespaces, iptables, mounts, cgroups, sysctls, processes and paths as they were"
    );
    Ok(())
}

fn checks(paths: &Paths) -> Result<()> {
    let kube = Kube(paths);
    let ready = kube.run(&[
        "get",
        "node",
        &paths.node_name,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ])?;
    if ready.trim() != "True" {
        bail!("node {} is not Ready: {ready}", paths.node_name);
    }
    eprintln!("cluster test: node {} Ready", paths.node_name);

    kube.apply(&workloads())?;
    kube.run(&["wait", "-n", NS, "--for=condition=Ready", "pod/server", "pod/client", "--timeout=180s"])?;
    let server_ip = kube.run(&["get", "pod", "-n", NS, "server", "-o", "jsonpath={.status.podIP}"])?;
    let cluster_ip = kube.run(&["get", "service", "-n", NS, "server", "-o", "jsonpath={.spec.clusterIP}"])?;
    // `agnhost connect` exits 0 on a connection, 1 when it fails; anything
    // else (kubectl exec itself failing) is an error, not a verdict.
    let connect = |to: &str| -> Result<bool> {
        let out = paths
            .kubectl()
            .args([
                "exec",
                "-n",
                NS,
                "client",
                "--",
                "/agnhost",
                "connect",
                to,
                "--timeout=5s",
                "--protocol=tcp",
            ])
            .output()
            .context("running kubectl exec")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) if !stderr.contains("Error from server") => Ok(false),
            _ => bail!("kubectl exec client -- /agnhost connect {to}: {}", stderr.trim()),
        }
    };
    // kube-proxy programs a new Service's rules within seconds of its
    // endpoints being ready, not at once: retry, up to a minute.
    for to in [format!("{server_ip}:8080"), format!("{cluster_ip}:80")] {
        let t = Instant::now();
        while !connect(&to)? {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("client could not connect to {to} for 60 s");
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!("cluster test: client reached the server at {to} ({:.1}s)", t.elapsed().as_secs_f64());
    }
    // The probe can fail: a port nobody serves is refused.
    if connect(&format!("{server_ip}:8081"))? {
        bail!("client connected to {server_ip}:8081, where nothing listens: the probe proves nothing");
    }

    // The agent's shape: privileged, host network, the host's bpffs.
    let t = Instant::now();
    loop {
        let status = kube.run(&[
            "get",
            "daemonset",
            "-n",
            NS,
            "bpf-probe",
            "-o",
            "jsonpath={.status.desiredNumberScheduled}/{.status.numberReady}",
        ])?;
        if status == "1/1" {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("DaemonSet bpf-probe not ready (desired/ready {status})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pod = kube.run(&[
        "get",
        "pod",
        "-n",
        NS,
        "-l",
        "app=bpf-probe",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let ips = kube.run(&["get", "pod", "-n", NS, &pod, "-o", "jsonpath={.status.podIP} {.status.hostIP}"])?;
    match ips.split_once(' ') {
        Some((pod_ip, host_ip)) if pod_ip == host_ip => {}
        _ => bail!("DaemonSet pod {pod} is not on the host network (podIP hostIP: {ips})"),
    }
    let mounts = kube.run(&["exec", "-n", NS, &pod, "--", "cat", "/proc/mounts"])?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["bpf", "/sys/fs/bpf", "bpf"])
    {
        bail!("DaemonSet pod {pod} has no bpf filesystem at /sys/fs/bpf");
    }
    let caps = |status: &str| status.lines().find(|l| l.starts_with("CapEff:")).map(str::to_owned);
    let pod_caps = caps(&kube.run(&["exec", "-n", NS, &pod, "--", "cat", "/proc/self/status"])?);
    let host_caps = caps(&std::fs::read_to_string("/proc/self/status")?);
    if pod_caps.is_none() || pod_caps != host_caps {
        bail!("DaemonSet pod {pod} is not privileged: {pod_caps:?}, the host's root has {host_caps:?}");
    }
    eprintln!("cluster test: DaemonSet pod {pod} runs privileged on the host network with /sys/fs/bpf");

    // Portcullis' own image starts and its binary runs (libraries included).
    kube.run(&["wait", "-n", NS, "--for=condition=Ready", "pod/agent-version", "--timeout=60s"]).ok();
    let t = Instant::now();
    loop {
        let phase = kube.run(&["get", "pod", "-n", NS, "agent-version", "-o", "jsonpath={.status.phase}"])?;
        match phase.as_str() {
            "Succeeded" => break,
            "Failed" => {
                bail!("{} failed: {}", images::agent_image(), kube.run(&["logs", "-n", NS, "agent-version"])?)
            }
            _ if t.elapsed() > Duration::from_secs(60) => bail!("pod agent-version still {phase}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
    let version = kube.run(&["logs", "-n", NS, "agent-version"])?;
    if !version.contains(env!("CARGO_PKG_VERSION")) {
        bail!("agent --version printed {version:?}");
    }
    eprintln!("cluster test: {} runs: {}", images::agent_image(), version.trim());
    Ok(())
}

fn workloads() -> String {
    let (agnhost, busybox, agent) = (images::AGNHOST, images::BUSYBOX, images::agent_image());
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {NS}, labels: {{app: server}}}}
spec:
  containers:
  - name: netexec
    image: {agnhost}
    args: ["netexec", "--http-port=8080"]
    ports: [{{containerPort: 8080}}]
    readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NS}}}
spec:
  selector: {{app: server}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}}}
spec:
  containers:
  - {{name: client, image: {agnhost}, args: ["pause"]}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: bpf-probe, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: bpf-probe}}}}
  template:
    metadata: {{labels: {{app: bpf-probe}}}}
    spec:
      hostNetwork: true
      containers:
      - name: probe
        image: {busybox}
        command: ["sh", "-c", "grep -q ' /sys/fs/bpf bpf ' /proc/mounts && touch /tmp/ready; exec sleep 86400"]
        securityContext: {{privileged: true}}
        readinessProbe: {{exec: {{command: ["cat", "/tmp/ready"]}}, periodSeconds: 1}}
        # Pins made here are the host's: the same bpffs, no propagation needed.
        volumeMounts: [{{name: bpffs, mountPath: /sys/fs/bpf}}]
      volumes: [{{name: bpffs, hostPath: {{path: /sys/fs/bpf, type: Directory}}}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: agent-version, namespace: {NS}}}
spec:
  restartPolicy: Never
  containers:
  - {{name: agent, image: "{agent}", args: ["--version"]}}
"#
    )
}

/// kubectl as admin, with errors that carry what kubectl said.
pub(super) struct Kube<'a>(pub(super) &'a Paths);

impl Kube<'_> {
    pub(super) fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.0.kubectl().args(args).output().context("running kubectl")?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub(super) fn apply(&self, yaml: &str) -> Result<()> {
        let mut child = self
            .0
            .kubectl()
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running kubectl apply")?;
        child.stdin.take().context("kubectl stdin")?.write_all(yaml.as_bytes())?;
        if !child.wait()?.success() {
            bail!("kubectl apply failed");
        }
        Ok(())
    }
}

/// What `up` may change on the host, read before and after.
#[derive(Debug, PartialEq)]
struct Snapshot(Vec<(&'static str, BTreeSet<String>)>);

const SYSCTLS: [&str; 11] = [
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.ipv4.conf.all.route_localnet",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];

impl Snapshot {
    fn take(paths: &Paths) -> Result<Self> {
        let lines = |program: &str, args: &[&str]| -> Result<Vec<String>> {
            let out =
                Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
            Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
        };
        let links = lines("ip", &["-o", "link", "show"])?
            .iter()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_owned()))
            .collect();
        let netns = lines("ip", &["netns", "list"])?
            .iter()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        let mut rules = BTreeSet::new();
        for family in ["iptables-save", "ip6tables-save"] {
            let mut table = String::new();
            for line in lines(family, &[])? {
                if let Some(t) = line.strip_prefix('*') {
                    table = t.to_owned();
                } else if line.starts_with("-A ") {
                    rules.insert(format!("{family} {table} {line}"));
                } else if let Some(chain) = line.strip_prefix(':') {
                    // ":NAME POLICY [packets:bytes]": counters change by themselves.
                    let chain: Vec<_> = chain.split_whitespace().take(2).collect();
                    // A table the kernel loads on first use (on a fresh
                    // machine, when the cluster's first rule is written)
                    // brings its built-in chains, empty and accepting:
                    // nothing a host would notice, so not a change.
                    const BUILT_IN: [&str; 5] = ["INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"];
                    if chain.len() == 2 && BUILT_IN.contains(&chain[0]) && chain[1] == "ACCEPT" {
                        continue;
                    }
                    rules.insert(format!("{family} {table} chain {}", chain.join(" ")));
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/mounts")?
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect();
        let mut cgroups = BTreeSet::new();
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
            cgroups.insert(hierarchy.path().display().to_string());
            if let Ok(children) = std::fs::read_dir(hierarchy.path()) {
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    cgroups.insert(child.path().display().to_string());
                }
            }
        }
        let sysctls = SYSCTLS
            .iter()
            .map(|s| {
                let v = lines("sysctl", &["-n", s]).map(|v| v.join(" ")).unwrap_or_default();
                format!("{s}={v}")
            })
            .collect();
        let ours = ["kube-apiserver", "kube-controller", "kube-scheduler", "kubelet", "kube-proxy", "etcd"];
        let mut processes = BTreeSet::new();
        for p in std::fs::read_dir("/proc")?.flatten() {
            let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) else { continue };
            let comm = comm.trim();
            if ours.contains(&comm) || comm.starts_with("containerd") || comm == "pause" || comm == "agnhost"
            {
                processes.insert(comm.to_owned());
            }
        }
        let files = [
            "/var/log/pods",
            "/var/log/containers",
            "/var/lib/cni",
            "/run/containerd",
            "/var/lib/kubelet",
            "/etc/cni",
            "/opt/cni",
        ]
        .iter()
        .map(|p| p.to_string())
        .chain([paths.work.display().to_string()])
        .filter(|p| std::path::Path::new(p).exists())
        .collect();
        Ok(Snapshot(vec![
            ("link", links),
            ("netns", netns),
            ("iptables", rules),
            ("mount", mounts),
            ("cgroup", cgroups),
            ("sysctl", sysctls),
            ("process", processes),
            ("path", files),
        ]))
    }

    /// Lines naming what appeared (+) or vanished (-), by kind.
    fn diff(&self, after: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        for ((kind, a), (_, b)) in self.0.iter().zip(&after.0) {
            out.extend(b.difference(a).map(|x| format!("+ {kind} {x}")));
            out.extend(a.difference(b).map(|x| format!("- {kind} {x}")));
        }
        out
    }
}

/// Pods start enforced: with the agent deployed, `count` pods created at
/// once, each probing from the first instant of its container a server its
/// egress policy forbids (must fail) and one it allows (must succeed).
pub fn pods_start_enforced(paths: &Paths, count: usize) -> Result<()> {
    const NS: &str = "portcullis-start";
    let kube = Kube(paths);
    let agnhost = images::AGNHOST;
    let server = |name: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}}}
spec:
  containers:
  - name: netexec
    image: {agnhost}
    args: ["netexec", "--http-port=8080"]
    readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
---"#
        )
    };
    let setup = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---{}{}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: clients-reach-allowed-only, namespace: {NS}}}
spec:
  podSelector: {{matchLabels: {{role: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: allowed}}}}}}]
"#,
        server("allowed"),
        server("forbidden")
    );
    kube.apply(&setup)?;
    kube.run(&["wait", "-n", NS, "--for=condition=Ready", "pod/allowed", "pod/forbidden", "--timeout=120s"])?;
    let ip = |pod: &str| kube.run(&["get", "pod", "-n", NS, pod, "-o", "jsonpath={.status.podIP}"]);
    let (allowed, forbidden) = (ip("allowed")?, ip("forbidden")?);
    // The first thing each container does is the forbidden probe.
    let probe = format!(
        "if /agnhost connect {forbidden}:8080 --timeout=2s 2>/dev/null; then echo LEAKED; else echo denied; fi; \
         if /agnhost connect {allowed}:8080 --timeout=10s 2>/dev/null; then echo allowed; else echo BLOCKED; fi"
    );
    let clients: String = (0..count)
        .map(|i| {
            format!(
                r#"
apiVersion: v1
kind: Pod
metadata: {{name: client-{i}, namespace: {NS}, labels: {{role: client}}}}
spec:
  restartPolicy: Never
  containers:
  - {{name: probe, image: {agnhost}, command: ["/bin/sh", "-c", {probe:?}]}}
---"#
            )
        })
        .collect();
    let t = Instant::now();
    kube.apply(&clients)?;
    let mut done = BTreeSet::new();
    let mut failures = Vec::new();
    while done.len() < count {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{} of {count} client pods finished within 300 s", done.len());
        }
        let phases = kube.run(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "role=client",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase}{\"\\n\"}{end}",
        ])?;
        for line in phases.lines() {
            let Some((name, phase)) = line.split_once(' ') else { continue };
            if (phase == "Succeeded" || phase == "Failed") && done.insert(name.to_owned()) {
                let log = kube.run(&["logs", "-n", NS, name])?;
                let words: Vec<&str> = log.split_whitespace().collect();
                if words != ["denied", "allowed"] {
                    failures.push(format!("{name}: {}", log.replace('\n', " ")));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The namespace goes whatever the tools say.
    let tools = if failures.is_empty() { operator_tools_in_the_pod(paths, NS) } else { Ok(()) };
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    tools?;
    if !failures.is_empty() {
        bail!("pods that did not start enforced (want \"denied allowed\"):\n  {}", failures.join("\n  "));
    }
    eprintln!(
        "cluster test: {count} pods started at once: each one's first packet to a forbidden server dropped, \
         the allowed one reached ({:.1}s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The operator tools as a user runs them, inside the DaemonSet's pod
/// (`kubectl exec -n portcullis ds/portcullis -- agent ...`), on the pods of
/// `pods_start_enforced` (`ns`), and the metrics on the node's port.
fn operator_tools_in_the_pod(paths: &Paths, ns: &str) -> Result<()> {
    let kube = Kube(paths);
    kube.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: client-long, namespace: {ns}, labels: {{role: client}}}}
spec:
  containers:
  - {{name: pause, image: {}, args: ["pause"]}}
"#,
        images::AGNHOST
    ))?;
    kube.run(&["wait", "-n", ns, "--for=condition=Ready", "pod/client-long", "--timeout=120s"])?;
    // The agent's exit code counts (a trace exits 1 when dropped), so
    // kubectl's output is read whatever its status.
    let agent = |args: &[&str]| -> Result<serde_json::Value> {
        let out = paths
            .kubectl()
            .args(["exec", "-n", super::AGENT_NAMESPACE, "ds/portcullis", "--", "agent"])
            .args(args)
            .args(["-o", "json"])
            .output()
            .context("running kubectl exec")?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "kubectl exec -n portcullis ds/portcullis -- agent {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    };
    let endpoints = agent(&["endpoint", "list"])?;
    let me = format!("{ns}/client-long");
    let ep = endpoints
        .as_array()
        .and_then(|l| l.iter().find(|e| e["name"] == me.as_str()))
        .with_context(|| format!("agent endpoint list has no {me}: {endpoints}"))?;
    if ep["egress_enforced"] != true || ep["status"] != "ready" {
        bail!("agent endpoint list: {me} is not enforced and ready: {ep}");
    }
    let trace = |to: &str| {
        agent(&["policy", "trace", "--from", &me, "--to", &format!("{ns}/{to}"), "--port", "8080/TCP"])
    };
    let denied = trace("forbidden")?;
    let allowed = trace("allowed")?;
    let rule = format!("{ns}/clients-reach-allowed-only egress rule 0");
    if denied["allowed"] != false
        || denied["egress"]["selected_by"] != serde_json::json!([format!("{ns}/clients-reach-allowed-only")])
        || allowed["allowed"] != true
        || allowed["egress"]["allowed_by"] != serde_json::json!([rule])
        || denied["datapath_agrees"] != true
        || allowed["datapath_agrees"] != true
    {
        bail!("agent policy trace is wrong:\n  to forbidden: {denied}\n  to allowed: {allowed}");
    }
    let forbidden_pod = format!("{ns}/forbidden");
    let drops = paths
        .kubectl()
        .args([
            "exec",
            "-n",
            super::AGENT_NAMESPACE,
            "ds/portcullis",
            "--",
            "agent",
            "observe",
            "--last",
            "500",
        ])
        .args(["--verdict", "DROPPED", "--to-pod", &forbidden_pod, "-o", "json"])
        .output()
        .context("running kubectl exec agent observe")?;
    let dropped = String::from_utf8_lossy(&drops.stdout)
        .lines()
        .filter(|l| l.contains(&format!("\"{ns}/client-")))
        .count();
    if dropped == 0 {
        bail!("agent observe shows no drop of the clients' probes to {forbidden_pod}");
    }
    let status = agent(&["status"])?;
    if status["health"]["api_server"]["connected"] != true || status["synced"] != true {
        bail!("agent status: not connected and synced: {status}");
    }
    let metrics = {
        use std::io::Read as _;
        let mut s =
            std::net::TcpStream::connect(("127.0.0.1", 9962)).context("the agent's metrics port 9962")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: node\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        text
    };
    if !metrics.lines().any(|l| l == "portcullis_api_server_connected 1") {
        bail!("the agent's metrics on :9962 lack portcullis_api_server_connected 1:\n{metrics}");
    }
    eprintln!(
        "cluster test: operator tools in the agent's pod: endpoint list, policy trace (allowed by {rule}; \
         the forbidden server dropped), observe ({dropped} drops of the clients' probes), status connected; \
         metrics on :9962"
    );
    Ok(())
}

/// A policy the API server admits but the agent refuses gets a Warning
/// Event naming the object and field, and the agent's other policies stay
/// enforced. (1.20 admits an `except` written as an IPv4-mapped IPv6 prefix
/// inside an IPv4 `cidr`; the agent refuses to guess what it means.)
pub fn refused_policy_is_reported(paths: &Paths) -> Result<()> {
    const NS: &str = "portcullis-refused";
    let kube = Kube(paths);
    kube.apply(&format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: odd-except, namespace: {NS}}}
spec:
  podSelector: {{}}
  ingress:
  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: ["::ffff:10.1.0.0/112"]}}}}]
"#
    ))?;
    let line = wait_rejected(&kube, NS, "odd-except", "spec.ingress[0].from[0].ipBlock.except[0]")?;
    eprintln!("cluster test: refused policy reported: {line}");
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    Ok(())
}

/// Waits for the agent's PolicyRejected Event about NetworkPolicy
/// `ns/name`, which must name `field`; returns it as a line.
pub(super) fn wait_rejected(kube: &Kube, ns: &str, name: &str, field: &str) -> Result<String> {
    let t = Instant::now();
    let wanted = format!("PolicyRejected NetworkPolicy/{name}:");
    loop {
        let events = kube.run(&[
            "get",
            "events.v1.events.k8s.io",
            "-n",
            ns,
            "-o",
            "jsonpath={range .items[*]}{.reason} {.regarding.kind}/{.regarding.name}: {.note}{\"\\n\"}{end}",
        ])?;
        if let Some(line) = events.lines().find(|l| l.starts_with(&wanted)) {
            if !line.contains(field) {
                bail!("the Event does not name the field {field}: {line}");
            }
            return Ok(line.to_owned());
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("no PolicyRejected Event for NetworkPolicy {ns}/{name} within 30 s (events: {events:?})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
