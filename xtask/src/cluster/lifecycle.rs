//! The shipped manifests' life on the node: installed on a host without
//! bpffs (as kind's nodes are) and checked for what they promise, the k3s
//! variant admitted, a rewritten conflist chained again, a rolling update
//! to a new image with traffic judged throughout, and an uninstall
//! (`kubectl delete -k deploy/kubernetes`) that must leave the node as it
//! was: no pins, programs, CNI plugin, socket or iptables rules.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    AGENT_DAEMONSET, AGENT_NAMESPACE, Paths,
    check::Kube,
    images,
    reliability::{self, Fixture, NS, Traffic, agent_pods},
};
use crate::{root, static_agent_path, target_dir};

/// Takes bpffs off the host's /sys/fs/bpf, as on a kind node (where
/// nothing mounts it): the DaemonSet's mount-bpffs init container must
/// mount it for the host. Nothing may be pinned there at this point.
pub fn without_host_bpffs() -> Result<()> {
    while is_bpffs(Path::new("/sys/fs/bpf")) {
        let status = Command::new("umount").arg("/sys/fs/bpf").status().context("running umount")?;
        if !status.success() {
            bail!("umount /sys/fs/bpf failed");
        }
    }
    eprintln!("cluster test: no bpffs on the host's /sys/fs/bpf (as on a kind node)");
    Ok(())
}

/// After `kubectl apply -k`: what the manifests promise holds on the node.
/// The mount-bpffs init container mounted bpffs for the host and the pins
/// are in it; install-cni put a static plugin binary into the CNI bin dir
/// (no ELF interpreter: it runs on any node's libc); the agent process
/// holds exactly the capabilities the manifest names and no others; and
/// its readiness endpoint says it enforces.
pub fn deployed_as_shipped() -> Result<()> {
    if !is_bpffs(Path::new("/sys/fs/bpf")) || !Path::new("/sys/fs/bpf/portcullis").is_dir() {
        bail!("after the deploy the host's /sys/fs/bpf is no bpffs with the agent's pins");
    }
    let plugin = Path::new("/opt/cni/bin/portcullis");
    if has_interpreter(plugin)? {
        bail!("{} is dynamically linked (it must run on any node's libc)", plugin.display());
    }
    // The plugin's own small binary, not the agent's: every pod start runs it.
    let built = crate::static_agent_path().with_file_name(crate::PLUGIN_BIN);
    if std::fs::read(plugin)?
        != std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?
    {
        bail!("{} is not the plugin binary the image ships ({})", plugin.display(), built.display());
    }
    const NET_ADMIN: u32 = 12;
    const PERFMON: u32 = 38;
    const BPF: u32 = 39;
    let want = (1u64 << NET_ADMIN) | (1u64 << PERFMON) | (1u64 << BPF);
    let pid = agent_pid()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cap = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        u64::from_str_radix(line[name.len()..].trim(), 16).with_context(|| format!("{line:?}"))
    };
    let (effective, bounding) = (cap("CapEff:")?, cap("CapBnd:")?);
    if effective != want || bounding != want {
        bail!(
            "the agent (PID {pid}) runs with capabilities {effective:#x} (bounding {bounding:#x}); \
             the manifest names BPF, PERFMON and NET_ADMIN only ({want:#x})"
        );
    }
    let ready = http_get("127.0.0.1:9962", "/readyz")?;
    if !ready.starts_with("HTTP/1.1 200") || !ready.contains("enforcing revision") {
        bail!("GET /readyz: {ready}");
    }
    let body = ready.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_owned();
    eprintln!(
        "cluster test: deployed as shipped: the mount-bpffs init container mounted bpffs for the host; \
         the CNI plugin is its own static binary; the agent holds only BPF, PERFMON and NET_ADMIN \
         ({effective:#x}); /readyz: {body}"
    );
    Ok(())
}

/// The PID of the DaemonSet's agent (`/usr/bin/agent run --kube`).
fn agent_pid() -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first() == Some(&&b"/usr/bin/agent"[..]) && args.get(1) == Some(&&b"run"[..]) {
            return Ok(pid);
        }
    }
    bail!("no /usr/bin/agent run process on the node")
}

/// Whether an ELF file names a program interpreter (PT_INTERP): a
/// dynamically linked executable does, a static one does not.
fn has_interpreter(path: &Path) -> Result<bool> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (phoff, phentsize, phnum) = match (u64_at(0x20), u16_at(0x36), u16_at(0x38)) {
        (Some(o), Some(s), Some(n)) => (o as usize, s as usize, n as usize),
        _ => bail!("{}: truncated ELF header", path.display()),
    };
    const PT_INTERP: u32 = 3;
    Ok((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4).is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    }))
}

/// A plain HTTP/1.1 GET; the whole response.
fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn is_bpffs(path: &Path) -> bool {
    Command::new("findmnt")
        .args(["-no", "FSTYPE"])
        .arg(path)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == "bpf"))
}

/// The main plugin writes its conflist again, without our entry, as
/// kindnet and k3s' flannel do whenever they start: the agent must chain
/// itself in again at once, or pods would start unenforced.
pub fn rewritten_conflist_is_chained_again() -> Result<()> {
    let conflist = std::fs::read_dir("/etc/cni/net.d")
        .context("reading /etc/cni/net.d")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .min()
        .context("no conflist in /etc/cni/net.d")?;
    let chained = |conf: &serde_json::Value| {
        conf["plugins"].as_array().is_some_and(|p| p.iter().any(|p| p["type"] == "portcullis"))
    };
    let read = || -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(&conflist)?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", conflist.display()))
    };
    let mut conf = read()?;
    if !chained(&conf) {
        bail!("{} does not chain portcullis before the test", conflist.display());
    }
    if let Some(plugins) = conf["plugins"].as_array_mut() {
        plugins.retain(|p| p["type"] != "portcullis");
    }
    std::fs::write(&conflist, serde_json::to_string_pretty(&conf)?)?;
    let t = Instant::now();
    while !chained(&read()?) {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{} was rewritten without portcullis and not chained again in 10 s", conflist.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "cluster test: {} rewritten without portcullis (as kindnet and flannel do at start) was chained \
         again {:.0} ms later",
        conflist.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// The k3s variant (deploy/k3s: the base with k3s' CNI paths) is valid
/// for the API server: built by kubectl's kustomize and admitted in a
/// server-side dry run.
pub fn k3s_variant_is_admitted(paths: &Paths) -> Result<()> {
    let out = paths
        .kubectl()
        .arg("apply")
        .arg("-k")
        .arg(root().join("deploy/k3s"))
        .args(["--dry-run=server", "-o", "jsonpath={range .items[*]}{.kind}/{.metadata.name} {end}"])
        .output()
        .context("running kubectl apply --dry-run=server")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("DaemonSet/portcullis") {
        bail!("deploy/k3s was not admitted: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let rendered = paths.kubectl().arg("kustomize").arg(root().join("deploy/k3s")).output()?;
    let rendered = String::from_utf8_lossy(&rendered.stdout);
    for path in ["/var/lib/rancher/k3s/data/cni", "/var/lib/rancher/k3s/agent/etc/cni/net.d"] {
        if !rendered.contains(path) {
            bail!("deploy/k3s does not mount {path}");
        }
    }
    eprintln!("cluster test: deploy/k3s builds with k3s' CNI paths and the API server admits it (dry run)");
    Ok(())
}

/// The image the update moves to: the same agent, under a new name and
/// with a different image config (so a new image ID, as a release has).
fn update_image() -> String {
    format!("{}-update", images::agent_image())
}

/// Writes the update's image and imports it into the node's containerd.
fn import_update_image(paths: &Paths) -> Result<String> {
    let name = update_image();
    let mut image = images::agent(&static_agent_path(), &name);
    image.env.push("PORTCULLIS_IMAGE_REVISION=update".into());
    let archive = target_dir().join("cluster-images/update/portcullis-agent-update.tar");
    std::fs::create_dir_all(archive.parent().context("archive dir")?)?;
    image.write_archive(&archive)?;
    let socket = paths.work.join("containerd/containerd.sock");
    let status = Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(&archive)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running ctr images import")?;
    if !status.success() {
        bail!("ctr images import {} failed", archive.display());
    }
    Ok(name)
}

/// `kubectl set image` on the DaemonSet (agent and init container), as an
/// upgrade does, while long-lived connections, new connections and a
/// denied client run. Nothing allowed may fail and nothing denied may pass
/// while the old agent stops and the new one adopts the pins; a pod
/// created in the gap must start enforced.
pub fn rolling_update(paths: &Paths) -> Result<()> {
    let kube = Kube(paths);
    let image = import_update_image(paths)?;
    let fx = Fixture::create(&kube)?;
    fx.wait_until(&fx.denied, false, Duration::from_secs(30))?;
    fx.wait_until(&fx.allowed, true, Duration::from_secs(30))?;
    let traffic = Traffic::start(&fx, 4)?;
    let t = Instant::now();
    kube.run(&[
        "set",
        "image",
        "-n",
        AGENT_NAMESPACE,
        AGENT_DAEMONSET,
        &format!("agent={image}"),
        &format!("install-cni={image}"),
        &format!("mount-bpffs={image}"),
    ])?;
    // A pod created while the old agent is stopping or the new one is
    // starting: its CNI ADD waits for the new agent.
    std::thread::sleep(Duration::from_millis(300));
    kube.apply(&reliability::pause_pod("late", "role", "denied"))?;
    let rolled = super::wait_rollout(paths);
    let took = t.elapsed();
    let counts = traffic.judge("during the rolling update");
    rolled?;
    let pods = agent_pods(&kube)?;
    if pods.len() != 1 || pods[0].image != image || !pods[0].ready {
        bail!("after the update the agent's pods are {pods:?}, want one ready pod of {image}");
    }
    let counts = counts?;
    // The late pod's first packets meet its policy: it is a denied client.
    let (_, late) = reliability::sandbox(&kube, "late")?;
    let late = std::sync::Arc::new(late);
    if reliability::connects(&late, fx.server)? {
        bail!("a pod started during the update reached a server its policy forbids");
    }
    eprintln!(
        "cluster test: rolling update to {image} done in {:.1}s (ready = enforcing): {}; \
         a pod started meanwhile was enforced from its first packet",
        took.as_secs_f64(),
        reliability::describe(&counts)
    );
    drop(fx);
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    Ok(())
}

/// The node's iptables and ip6tables rules (every table, chain and rule,
/// counters left out) that are not kube-proxy's (`KUBE-…`) or the bridge
/// plugin's (`CNI-…` chains, rules commented with the test network's
/// name): what anything else, Portcullis included, added.
pub fn iptables_rules() -> Result<Vec<String>> {
    let mut rules = Vec::new();
    for tool in ["iptables-save", "ip6tables-save"] {
        let out = Command::new(tool).output().with_context(|| format!("running {tool}"))?;
        if !out.status.success() {
            bail!("{tool} failed");
        }
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with('-') || l.starts_with(':') || l.starts_with('*'))
                .filter(|l| !l.contains("KUBE-") && !l.contains("CNI-") && !l.contains("portcullis-test"))
                .map(|l| match l.split_once(" [") {
                    // ":CHAIN POLICY [packets:bytes]"
                    Some((chain, _)) if l.starts_with(':') => format!("{tool}: {chain}"),
                    _ => format!("{tool}: {l}"),
                }),
        );
    }
    Ok(rules)
}

/// BPF programs of the agent still loaded anywhere in the kernel.
fn agent_programs() -> Result<Vec<String>> {
    let mut found = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing loaded BPF programs")?;
        let name = info.name_as_str().unwrap_or_default();
        if ["from_container", "to_container", "to_netdev"].contains(&name) {
            found.push(format!("program {} ({name})", info.id()));
        }
    }
    Ok(found)
}

/// What an uninstall must leave behind: nothing (and the iptables rules
/// as they were before the deploy).
fn leftovers(iptables_before: &[String]) -> Result<Vec<String>> {
    let mut left = Vec::new();
    for path in ["/sys/fs/bpf/portcullis", "/opt/cni/bin/portcullis", "/var/run/portcullis/agent.sock"] {
        if Path::new(path).exists() {
            left.push(format!("{path} exists"));
        }
    }
    for entry in std::fs::read_dir("/etc/cni/net.d").context("reading /etc/cni/net.d")? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"portcullis\"") {
            left.push(format!("{} still chains portcullis", path.display()));
        }
    }
    left.extend(agent_programs()?);
    let now = iptables_rules()?;
    left.extend(now.iter().filter(|r| !iptables_before.contains(r)).map(|r| format!("added: {r}")));
    left.extend(iptables_before.iter().filter(|r| !now.contains(r)).map(|r| format!("removed: {r}")));
    Ok(left)
}

/// `kubectl delete -k deploy/kubernetes`: every agent sees its DaemonSet
/// go and takes itself off its node. Then the node has none of it, pods
/// the policy isolated are reachable again (nothing enforces), and a new
/// pod starts (the conflist no longer names a plugin that is gone).
/// `iptables_before`: the rules before the agent was deployed.
pub fn uninstall(paths: &Paths, iptables_before: &[String]) -> Result<()> {
    let kube = Kube(paths);
    let fx = Fixture::create(&kube)?;
    fx.wait_until(&fx.denied, false, Duration::from_secs(30))?;
    let t = Instant::now();
    let status = paths
        .kubectl()
        .arg("delete")
        .arg("-k")
        .arg(root().join("deploy/kubernetes"))
        .arg("--timeout=180s")
        .status()
        .context("running kubectl delete -k")?;
    if !status.success() {
        bail!("kubectl delete -k deploy/kubernetes failed");
    }
    // kubectl waits for the namespace, hence the agent's pod, to be gone.
    let left = leftovers(iptables_before)?;
    if !left.is_empty() {
        bail!("the uninstall left things behind:\n  {}", left.join("\n  "));
    }
    let open = fx.wait_until(&fx.denied, true, Duration::from_secs(10))?;
    kube.apply(&reliability::pause_pod("after-uninstall", "role", "any"))?;
    reliability::sandbox(&kube, "after-uninstall")?;
    eprintln!(
        "cluster test: kubectl delete -k deploy/kubernetes took {:.1}s and left no pins, programs, \
         CNI plugin, socket or iptables rules; the isolated server was open {:.1}s later; a new pod started",
        t.elapsed().as_secs_f64(),
        open.as_secs_f64()
    );
    drop(fx);
    kube.run(&["delete", "namespace", NS, "--timeout=180s"])?;
    Ok(())
}
