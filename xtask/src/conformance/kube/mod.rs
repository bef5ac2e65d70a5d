//! `cargo xtask conformance --source kube`: the cases on the real test
//! cluster (`cargo xtask cluster up && cargo xtask cluster deploy`), with
//! the agent's DaemonSet enforcing and the cluster's kube-proxy translating
//! Services.
//!
//! Every model pod is a real pod serving its ports ([`objects`]); a probe
//! enters the client pod's sandbox namespace from the host, as the lab's
//! probes enter theirs. Namespaces and pods are kept from one case to the
//! next when they match: a case starts by deleting every NetworkPolicy in
//! its namespaces and setting every label to the model's, and recreates only
//! what differs. After every change the runner waits until the agent
//! reports the change enforced ([`status`]).

mod kubectl;
mod objects;
mod plan;
mod proxy;
mod status;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use portcullis_conformance::{
    Case,
    case::{Probe, Protocol, Requirement, Step, Target},
    report::{CaseOutcome, ProbeResult},
    world::{Family, World, WorldPod},
};
use portcullis_testbed::{Netns, Transport, probe};

use self::{
    kubectl::Kubectl,
    objects::{BORROWED, OWNER, annotation, created, label_patch, same_fingerprint},
    plan::{Plan, PodState, Snapshot, pod_state},
    status::{Written, wait_enforced},
};
use super::{Options, probe_all, suite};
use crate::{cluster::Paths, interrupted};

/// How long the agent may take to enforce a write. Long: another test may
/// stop the agent or the API server for a while, and that is waited out.
const ENFORCE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long pods may take to run (they start only once the agent enforces
/// them, so this waits out a stopped agent too).
const PODS_TIMEOUT: Duration = Duration::from_secs(300);
/// How long deleted namespaces and pods may take to go.
const GONE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a running pod's servers may take to answer.
const SERVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long kube-proxy may take to program the Services.
const PROXY_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(opts: &Options) -> Result<i32> {
    if opts.ipv6 {
        bail!(
            "--source kube --ipv6: the test cluster is IPv4 only (pods in 10.244.0.0/24, Services in 10.96.0.0/16)"
        );
    }
    if opts.bridge || opts.nodes != 1 {
        bail!(
            "--network and --two-nodes shape the lab (--source files); with --source kube the cluster's own \
             network runs: one node, pods on the bridge CNI plugin's cni0"
        );
    }
    let paths = Paths::read()?;
    if !paths.kubeconfig().exists() {
        bail!(
            "no test cluster ({} is missing): `cargo xtask cluster up && cargo xtask cluster deploy` first",
            paths.kubeconfig().display()
        );
    }
    let kube = Kubectl::new(paths);
    let agent = kube.run(
        &[
            "get",
            "daemonset",
            "-n",
            crate::cluster::AGENT_NAMESPACE,
            "-l",
            crate::cluster::AGENT_SELECTOR,
            "-o",
            "name",
        ],
        None,
    )?;
    if agent.trim().is_empty() {
        bail!("the agent is not deployed on the test cluster: `cargo xtask cluster deploy` first");
    }
    let mut runner = Runner { kube, sandboxes: BTreeMap::new() };
    let result = suite(&opts.paths, |case| runner.run_case(case, opts.target));
    let t = Instant::now();
    let cleaned = runner.clean_up();
    eprintln!("conformance: case namespaces cleaned up in {:.1}s", t.elapsed().as_secs_f64());
    match (result, cleaned) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(_), Err(e)) => Err(e.context("cleaning up the case namespaces")),
        (Err(e), cleaned) => {
            if let Err(c) = cleaned {
                eprintln!("conformance: cleaning up the case namespaces: {c:#}");
            }
            Err(e)
        }
    }
}

/// Why the cluster cannot run a case, if it cannot.
fn skip_reason(case: &Case) -> Option<String> {
    if case.requires.contains(&Requirement::EndPort) {
        return Some(
            "the test cluster's API server (Kubernetes 1.20) prunes endPort: the field came in 1.21".into(),
        );
    }
    if case.requires.contains(&Requirement::Sctp) {
        return Some(
            if super::kernel_has_sctp() {
                "agnhost's serve-hostname (2.21) serves no SCTP"
            } else {
                super::NO_SCTP
            }
            .into(),
        );
    }
    None
}

struct Runner {
    kube: Kubectl,
    /// Each running pod's sandbox network namespace, by pod UID.
    sandboxes: BTreeMap<String, Netns>,
}

/// A value that differs on every call: each barrier is a write.
fn serial() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
}

impl Runner {
    fn run_case(&mut self, case: &Case, target: Option<Target>) -> Result<CaseOutcome> {
        if let Some(why) = skip_reason(case) {
            return Ok(CaseOutcome::Skip(why));
        }
        let mut world = World::new(case, Family::V4, false);
        if let Some(ns) =
            world.namespaces.keys().find(|n| n.starts_with("kube-") || n.starts_with("portcullis-"))
        {
            bail!("namespace {ns}: the runner leaves kube-* and portcullis-* namespaces alone");
        }
        let via_service =
            case.steps.iter().flat_map(|s| &s.probes).any(|p| target.unwrap_or(p.target) == Target::Service);
        let uids = self.prepare(&mut world, via_service)?;
        let mut failures = Vec::new();
        for (s, step) in case.steps.iter().enumerate() {
            let written = self.step(&mut world, s, step, &case.name)?;
            wait_enforced(&written, ENFORCE_TIMEOUT)?;
            let netns_of = |client: &WorldPod| {
                uids.get(&client.id())
                    .and_then(|uid| self.sandboxes.get(uid))
                    .with_context(|| format!("no sandbox found for pod {}", client.id()))
            };
            for (p, probe) in step.probes.iter().enumerate() {
                let (want, got) = probe_all(&world, s, p, probe, target, netns_of, objects::hostname)?;
                // Reported with the target it really used.
                let used = Probe { target: target.unwrap_or(probe.target), ..probe.clone() };
                let result = ProbeResult::new(s, p, &used, &world, want, got, vec![]);
                if !result.passed() {
                    failures.push(result);
                }
            }
        }
        Ok(if failures.is_empty() { CaseOutcome::Pass } else { CaseOutcome::Fail(failures) })
    }

    /// Makes the cluster hold the case's model and no policy, keeping what
    /// matches; gives the world the cluster's addresses; waits until every
    /// pod serves, the agent enforces it all, and (`via_service`) kube-proxy
    /// translates the Services. Returns each pod's UID by id.
    fn prepare(&mut self, world: &mut World, via_service: bool) -> Result<BTreeMap<String, String>> {
        let plan = Plan::new(&self.snapshot()?, world, serial())?;
        self.carry_out(&plan)?;

        let ready = self.wait_running(world)?;
        let mut endpoints = Vec::new();
        let mut uids = BTreeMap::new();
        for pod in world.pods.clone() {
            let live = ready.get("Pod", &pod.namespace, &pod.name).context("a running pod vanished")?;
            let PodState::Running(ip) = pod_state(live) else { bail!("pod {} stopped running", pod.id()) };
            let ep = objects::endpoints(&pod, ip);
            if !ready
                .get("Endpoints", &pod.namespace, &pod.service_name())
                .is_some_and(|l| same_fingerprint(l, &ep))
            {
                endpoints.push(ep);
            }
            let service =
                ready.get("Service", &pod.namespace, &pod.service_name()).context("a Service vanished")?;
            let cluster_ip: IpAddr =
                service["spec"]["clusterIP"].as_str().and_then(|ip| ip.parse().ok()).with_context(|| {
                    format!("Service {}/{} has no ClusterIP", pod.namespace, pod.service_name())
                })?;
            world.set_addresses(&pod.id(), ip, cluster_ip).map_err(|e| anyhow!(e))?;
            let uid = live["metadata"]["uid"].as_str().context("a pod without uid")?.to_owned();
            uids.insert(pod.id(), uid);
        }
        self.kube.apply(&endpoints)?;

        // Probes enter the pods' sandboxes; recreated pods have new ones.
        self.sandboxes.retain(|uid, _| uids.values().any(|u| u == uid));
        for pod in &world.pods {
            let uid = &uids[&pod.id()];
            if !self.sandboxes.contains_key(uid) {
                let netns = Netns::holding(pod.ip)?;
                // The lab's own namespaces may hold the same addresses.
                if !netns.name().starts_with("cni-") {
                    bail!(
                        "pod {} ({}): {} holds its address, not a CRI sandbox",
                        pod.id(),
                        pod.ip,
                        netns.name()
                    );
                }
                self.sandboxes.insert(uid.clone(), netns);
            }
        }
        self.wait_serving(world, &uids)?;

        // The agent has every object of the model as it is now, and no
        // policy: past the barrier if one was written.
        let mut written = Written::default();
        for ns in world.namespaces.keys() {
            written.note(ready.namespaces.get(ns).context("a namespace vanished")?)?;
            for (_, policy) in ready.in_namespace("NetworkPolicy", ns) {
                written.note(policy)?;
            }
        }
        for pod in &world.pods {
            for (kind, name) in [("Pod", &pod.name), ("Service", &pod.service_name())] {
                written.note(ready.get(kind, &pod.namespace, name).context("an object vanished")?)?;
            }
        }
        wait_enforced(&written, ENFORCE_TIMEOUT)?;
        if via_service {
            proxy::wait_programmed(&frontends(world), PROXY_TIMEOUT)?;
        }
        Ok(uids)
    }

    /// What the cluster holds of the kinds the runner writes.
    fn snapshot(&self) -> Result<Snapshot> {
        let list = self.kube.json(&[
            "get",
            "namespaces,pods,services,endpoints,networkpolicies",
            "--all-namespaces",
        ])?;
        Ok(Snapshot::new(list["items"].as_array().map(Vec::as_slice).unwrap_or_default()))
    }

    fn carry_out(&self, plan: &Plan) -> Result<()> {
        for ((resource, ns), names) in &plan.delete {
            self.kube.delete(resource, ns.as_deref(), names)?;
        }
        self.kube.wait_gone("namespace", None, &plan.gone, GONE_TIMEOUT)?;
        for ((resource, ns), names) in &plan.recreate {
            self.kube.wait_gone(resource, ns.as_deref(), names, GONE_TIMEOUT)?;
        }
        self.kube.apply(&plan.apply)?;
        for (resource, ns, name, patch) in &plan.patch {
            self.kube.patch(resource, ns.as_deref(), name, patch)?;
        }
        Ok(())
    }

    /// Waits until every pod of the world runs; the cluster then.
    fn wait_running(&self, world: &World) -> Result<Snapshot> {
        let started = Instant::now();
        let mut said = false;
        loop {
            let snap = self.snapshot()?;
            let mut waiting = Vec::new();
            for pod in &world.pods {
                match snap.get("Pod", &pod.namespace, &pod.name).map(pod_state) {
                    Some(PodState::Running(_)) => {}
                    Some(PodState::Broken(why)) => bail!("pod {}: {why}", pod.id()),
                    Some(PodState::Starting(why)) => waiting.push(format!("{}: {why}", pod.id())),
                    None => waiting.push(format!("{}: not there", pod.id())),
                }
            }
            if waiting.is_empty() {
                return Ok(snap);
            }
            if interrupted() {
                bail!("interrupted");
            }
            if started.elapsed() > PODS_TIMEOUT {
                bail!("pods not running after {}s: {}", PODS_TIMEOUT.as_secs(), waiting.join("; "));
            }
            if !said && started.elapsed() > Duration::from_secs(60) {
                eprintln!("conformance: still waiting for pods: {}", waiting.join("; "));
                said = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until every server of every pod answers, asked from inside
    /// the pod (over its loopback: no policy judges that).
    fn wait_serving(&self, world: &World, uids: &BTreeMap<String, String>) -> Result<()> {
        let started = Instant::now();
        for pod in &world.pods {
            let netns = &self.sandboxes[&uids[&pod.id()]];
            let answer = objects::hostname(pod);
            for port in &pod.ports {
                let transport = match port.protocol {
                    Protocol::Tcp => Transport::Tcp,
                    Protocol::Udp => Transport::Udp,
                    Protocol::Sctp => continue,
                };
                loop {
                    let reply = probe(netns, transport, pod.ip, port.port, Duration::from_millis(300))?;
                    if reply.as_deref() == Some(answer.as_str()) {
                        break;
                    }
                    if interrupted() {
                        bail!("interrupted");
                    }
                    if started.elapsed() > SERVE_TIMEOUT {
                        bail!(
                            "pod {} does not serve {:?}/{} (answer {reply:?}, want {answer:?})",
                            pod.id(),
                            port.protocol,
                            port.port
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(())
    }

    /// Writes a step's changes as FORMAT.md orders them (labels, deletes,
    /// applies); returns what the agent must have enforced before probing.
    fn step(&self, world: &mut World, s: usize, step: &Step, case: &str) -> Result<Written> {
        let namespaces_before = world.namespaces.clone();
        let pods_before: BTreeMap<String, objects::Labels> =
            world.pods.iter().map(|p| (p.id(), p.labels.clone())).collect();
        let (_changes, notes) = world.step(s, step)?;
        for n in notes {
            eprintln!("  {case}: step {}: {n}", s + 1);
        }
        let mut written = Written::default();
        // Each object labelled, patched once to the labels it ends with.
        let mut done = BTreeSet::new();
        for op in &step.label {
            if let Some(ns) = &op.namespace {
                if let (Some(before), Some(after)) = (namespaces_before.get(ns), world.namespaces.get(ns))
                    && done.insert(format!("namespace {ns}"))
                    && let Some(patch) = label_patch(before, after)
                {
                    written.note(&self.kube.patch("namespace", None, ns, &patch)?)?;
                }
            } else if let Some(pod) = op.pod.as_deref().and_then(|id| world.pod(id))
                && let Some(before) = pods_before.get(&pod.id())
                && done.insert(format!("pod {}", pod.id()))
                && let Some(patch) = label_patch(before, &pod.labels)
            {
                written.note(&self.kube.patch("pod", Some(&pod.namespace), &pod.name, &patch)?)?;
            }
        }
        // Deletes (the world refused kinds other than NetworkPolicy), then
        // the barrier that tells when the agent is past them.
        for d in &step.delete {
            let mut parts = d.splitn(3, '/').skip(1);
            let (ns, name) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            self.kube.delete("networkpolicy", Some(ns), &[name.to_owned()])?;
        }
        if !step.delete.is_empty() {
            let ns = world.namespaces.keys().next().context("the model has no namespace")?;
            for object in self.kube.apply(&[objects::barrier(ns, serial())])? {
                written.note(&object)?;
            }
        }
        // The policies as the world resolved them; ones the API server
        // would refuse the world left out.
        let mut applied = Vec::new();
        for object in &step.apply {
            let meta = |f: &str| object["metadata"][f].as_str().unwrap_or_default().to_owned();
            let key = (meta("namespace"), meta("name"));
            if !applied.contains(&key) && world.api_policies.contains_key(&key) {
                applied.push(key);
            }
        }
        let objects = applied
            .iter()
            .map(|key| serde_json::to_value(&world.api_policies[key]).map(objects::owned))
            .collect::<Result<Vec<_>, _>>()
            .context("a policy as JSON")?;
        for object in self.kube.apply(&objects)? {
            written.note(&object)?;
        }
        Ok(written)
    }

    /// Deletes the namespaces the runner made (their pods first and at once,
    /// which spares the namespace controller its slow retries) and waits
    /// until they are gone, unless interrupted; gives back the ones it
    /// borrowed.
    fn clean_up(&mut self) -> Result<()> {
        self.sandboxes.clear();
        let snap = self.snapshot()?;
        let mut plan = Plan::default();
        let mut ours = Vec::new();
        for (name, ns) in &snap.namespaces {
            if created(ns) {
                plan.empty(&snap, name);
                ours.push(name.clone());
            } else if annotation(ns, OWNER) == Some(BORROWED) {
                plan.give_back(&snap, name, ns);
            }
        }
        self.carry_out(&plan)?;
        self.kube.delete("namespace", None, &ours)?;
        if interrupted() {
            return Ok(());
        }
        self.kube.wait_gone("namespace", None, &ours, GONE_TIMEOUT)
    }
}

/// Every Service port of the world's pods, with the pod behind it.
fn frontends(world: &World) -> Vec<proxy::Frontend> {
    world
        .pods
        .iter()
        .flat_map(|pod| {
            pod.ports.iter().filter_map(move |p| {
                let protocol = match p.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                    Protocol::Sctp => return None,
                };
                Some(proxy::Frontend {
                    namespace: pod.namespace.clone(),
                    service: pod.service_name(),
                    port_name: objects::service_port_name(p),
                    protocol: protocol.into(),
                    cluster_ip: pod.service_ip,
                    port: p.port,
                    backend: SocketAddr::new(pod.ip, p.port),
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_skips_what_its_api_server_or_kernel_cannot_run() {
        let case = |requires: &str| {
            Case::parse("inline.yaml", &format!("name: c\nrequires: [{requires}]\nsteps: []\n"))
                .expect("case")
        };
        assert!(skip_reason(&case("endPort")).is_some_and(|why| why.contains("prunes endPort")));
        assert!(skip_reason(&case("sctp")).is_some());
        let plain = Case::parse("inline.yaml", "name: c\nsteps: []\n").expect("case");
        assert_eq!(skip_reason(&plain), None);
    }
}
