//! `cargo xtask cluster`: a real single-node Kubernetes 1.20 on this
//! machine, built from Debian bookworm (scripts/cluster/*.sh do the system
//! work; this module drives them, writes the images and runs the checks).

mod check;
mod e2e;
pub(crate) mod images;
mod lifecycle;
mod oci;
mod reliability;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{build_static_agent, require_root, root, target_dir};

/// Where `deploy/kubernetes` puts the agent.
pub const AGENT_NAMESPACE: &str = "portcullis";
pub const AGENT_DAEMONSET: &str = "daemonset/portcullis";
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=portcullis";

#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// Install the packages and build Kubernetes 1.20 from Debian's source
    /// (cached by version; ~15 min once on 2 cores).
    Install,
    /// Start the cluster: control plane, containerd, kubelet, kube-proxy,
    /// bridge CNI; import the images; wait for the node to be Ready.
    Up {
        /// Skip building and importing Portcullis' own image.
        #[arg(long)]
        no_agent_image: bool,
    },
    /// Stop the cluster and remove everything `up` created.
    Down,
    /// Deploy the agent (deploy/kubernetes/portcullis.yaml, the image `up`
    /// imported) and wait until it enforces on the node.
    Deploy,
    /// Run the Kubernetes 1.20 NetworkPolicy e2e suite against the cluster
    /// and report its counts.
    E2e {
        /// Ginkgo focus regex.
        #[arg(long, default_value = "NetworkPolicy")]
        focus: String,
    },
    /// The agent on the cluster as users deploy it: up, `kubectl apply -k
    /// deploy/kubernetes` on a host without bpffs (as kind), deploy/k3s
    /// admitted, a rewritten conflist chained again, 50 pods that must
    /// start enforced, a refused policy reported, the conformance cases
    /// through the cluster, the agent killed 20× and the API server
    /// stopped for 60 s during traffic, a rolling update under traffic,
    /// the e2e suite (every spec must pass), `kubectl delete -k` leaving
    /// nothing behind, down.
    E2eWithAgent,
    /// With the agent deployed, traffic flowing and judged throughout: a
    /// fresh agent adopts running pods, the agent is SIGKILLed and
    /// restarted KILLS times, then the API server is stopped for
    /// OUTAGE seconds and a policy changed right after it returns.
    Reliability {
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long, default_value_t = 60)]
        outage: u64,
    },
    /// With the agent deployed: N pods created at once must each start
    /// enforced (a forbidden server unreachable from their first packet).
    StartEnforced {
        #[arg(long, default_value_t = 50)]
        pods: usize,
    },
    /// With the agent deployed: `kubectl set image` to a new image while
    /// traffic is judged; nothing allowed may fail, nothing denied pass.
    RollingUpdate,
    /// With the agent deployed: `kubectl delete -k deploy/kubernetes`, then
    /// check the node has no pins, programs, CNI plugin or iptables rules
    /// of it left.
    Uninstall,
    /// The cluster's own test: up on a clean machine, a Ready node, pods
    /// reaching each other by IP and ClusterIP, a privileged hostNetwork
    /// DaemonSet with /sys/fs/bpf, then down leaving the machine as it was.
    Test,
    /// Print the shell lines that point kubectl at the cluster.
    Env,
}

/// Where the scripts keep things; read from scripts/cluster/env.sh, the
/// one place they are defined.
pub struct Paths {
    pub k8s_bin: PathBuf,
    pub work: PathBuf,
    pub node_name: String,
}

impl Paths {
    pub fn read() -> Result<Self> {
        let env = root().join("scripts/cluster/env.sh");
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(". '{}' && printf '%s\\n' \"$k8s_bin\" \"$work\" \"$node_name\"", env.display()))
            .output()
            .context("reading scripts/cluster/env.sh")?;
        if !out.status.success() {
            bail!("scripts/cluster/env.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines();
        let mut next = || lines.next().map(str::to_owned).context("env.sh printed too little");
        Ok(Paths { k8s_bin: next()?.into(), work: next()?.into(), node_name: next()? })
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.work.join("kubeconfig")
    }

    /// `kubectl` against the cluster, as admin.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.k8s_bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(self.kubeconfig());
        cmd
    }
}

fn script(name: &str, args: &[&Path]) -> Result<()> {
    let path = root().join("scripts/cluster").join(name);
    let status =
        Command::new(&path).args(args).status().with_context(|| format!("running {}", path.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", path.display());
    }
    Ok(())
}

pub fn run(cmd: ClusterCmd) -> Result<()> {
    require_root("cargo xtask cluster")?;
    match cmd {
        ClusterCmd::Install => script("install.sh", &[]),
        ClusterCmd::Up { no_agent_image } => up(!no_agent_image),
        ClusterCmd::Down => script("down.sh", &[]),
        ClusterCmd::Deploy => deploy(&Paths::read()?),
        ClusterCmd::E2e { focus } => {
            let report = e2e::run(&Paths::read()?, &focus)?;
            println!("{report}");
            if report.failed > 0 {
                bail!("{} of {} e2e specs failed", report.failed, report.ran);
            }
            Ok(())
        }
        ClusterCmd::Test => check::run(),
        ClusterCmd::E2eWithAgent => e2e_with_agent(),
        ClusterCmd::Reliability { kills, outage } => reliability(&Paths::read()?, kills, outage),
        ClusterCmd::RollingUpdate => lifecycle::rolling_update(&Paths::read()?),
        // Rules as they are now stand for "before": the agent adds none.
        ClusterCmd::Uninstall => lifecycle::uninstall(&Paths::read()?, &lifecycle::iptables_rules()?),
        ClusterCmd::StartEnforced { pods } => check::pods_start_enforced(&Paths::read()?, pods),
        ClusterCmd::Env => {
            let paths = Paths::read()?;
            println!("export KUBECONFIG={}", paths.kubeconfig().display());
            println!("export PATH={}:$PATH", paths.k8s_bin.display());
            Ok(())
        }
    }
}

/// Writes the image archives, then runs up.sh (which imports them).
pub fn up(agent_image: bool) -> Result<()> {
    let paths = Paths::read()?;
    if !paths.k8s_bin.join("kubelet").exists() {
        bail!("{} has no kubelet: run `cargo xtask cluster install` first", paths.k8s_bin.display());
    }
    let agent = if agent_image { Some(build_static_agent()?) } else { None };
    // Outside the work dir: up.sh may take a half-up cluster down first.
    let dir = target_dir().join("cluster-images");
    images::write_all(&paths, agent.as_deref(), &dir)?;
    script("up.sh", &[&dir])
}

/// `cargo xtask bench scale`: the scale benchmark against the test
/// cluster's API server (installed and brought up when needed, and then
/// taken down again), with the static release agent the image ships.
pub fn bench_scale() -> Result<()> {
    let paths = Paths::read()?;
    if !paths.k8s_bin.join("kubelet").exists() {
        script("install.sh", &[])?;
    }
    let was_up = paths.kubeconfig().exists()
        && paths.kubectl().args(["get", "--raw", "/readyz"]).output().is_ok_and(|o| o.status.success());
    let agent = build_static_agent()?;
    if !was_up {
        up(false)?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["bench", "--quiet", "--package", "portcullis-agent", "--bench", "scale"])
        .env("PORTCULLIS_SCALE_AGENT", &agent)
        .env("PORTCULLIS_SCALE_KUBECONFIG", paths.kubeconfig())
        .current_dir(root())
        .status()
        .context("running the scale benchmark");
    if !was_up {
        script("down.sh", &[])?;
    }
    let status = status?;
    if !status.success() {
        bail!("the scale benchmark failed ({status})");
    }
    Ok(())
}

/// `kubectl apply -k deploy/kubernetes`, exactly as shipped (the image
/// `up` imported has the name the manifests use), then waits until the
/// DaemonSet is ready, which its readiness probe says only once the agent
/// enforces every pod of the node.
pub fn deploy(paths: &Paths) -> Result<()> {
    let manifests = root().join("deploy/kubernetes");
    let status =
        paths.kubectl().arg("apply").arg("-k").arg(&manifests).status().context("running kubectl apply")?;
    if !status.success() {
        bail!("kubectl apply -k {} failed", manifests.display());
    }
    wait_rollout(paths)?;
    wait_agent_enforces(paths, std::time::Duration::from_secs(60))
}

/// Waits until the DaemonSet's pods all run its newest template and are
/// ready.
pub fn wait_rollout(paths: &Paths) -> Result<()> {
    let status = paths
        .kubectl()
        .args(["rollout", "status", "-n", AGENT_NAMESPACE, AGENT_DAEMONSET, "--timeout=180s"])
        .status()
        .context("running kubectl rollout status")?;
    if !status.success() {
        bail!("the portcullis DaemonSet did not become ready");
    }
    Ok(())
}

/// Waits for the DaemonSet agent's first "enforced" line.
pub fn wait_agent_enforces(paths: &Paths, timeout: std::time::Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let out = paths
            .kubectl()
            .args(["logs", "-n", AGENT_NAMESPACE, AGENT_DAEMONSET, "-c", "agent"])
            .output()
            .context("running kubectl logs")?;
        if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("enforced revision")) {
            eprintln!("cluster: the portcullis agent enforces on {}", paths.node_name);
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the portcullis agent has not enforced after {timeout:?}; its log:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// The upstream suite as CI runs it: a fresh cluster with the agent, every
/// spec must pass; the cluster is taken down whatever happens.
pub fn e2e_with_agent() -> Result<()> {
    let paths = Paths::read()?;
    if paths.work.exists() {
        bail!("a cluster is (partly) up in {}: `cargo xtask cluster down` first", paths.work.display());
    }
    crate::handle_interrupts()?;
    let mut iptables_before = Vec::new();
    let result = up(true)
        .and_then(|()| lifecycle::iptables_rules().map(|r| iptables_before = r))
        .and_then(|()| lifecycle::without_host_bpffs())
        .and_then(|()| deploy(&paths))
        .and_then(|()| lifecycle::deployed_as_shipped())
        .and_then(|()| lifecycle::k3s_variant_is_admitted(&paths))
        .and_then(|()| lifecycle::rewritten_conflist_is_chained_again())
        .and_then(|()| check::pods_start_enforced(&paths, 50))
        .and_then(|()| check::refused_policy_is_reported(&paths))
        .and_then(|()| conformance_through_the_cluster())
        .and_then(|()| reliability(&paths, 20, 60))
        .and_then(|()| lifecycle::rolling_update(&paths))
        .and_then(|()| e2e::run(&paths, "NetworkPolicy"))
        .and_then(|report| lifecycle::uninstall(&paths, &iptables_before).map(|()| report));
    if result.is_err() || result.as_ref().is_ok_and(|r| r.failed > 0) {
        let log = paths
            .kubectl()
            .args(["logs", "-n", AGENT_NAMESPACE, AGENT_DAEMONSET, "-c", "agent", "--tail=60"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        eprintln!("--- the agent's last log lines ---\n{log}");
    }
    script("down.sh", &[])?;
    let report = result?;
    println!("{report}");
    if report.failed > 0 || report.ran == 0 {
        bail!("{} of {} e2e specs failed with the agent enforcing", report.failed, report.ran);
    }
    Ok(())
}

/// The conformance cases with `--source kube`: real pods, the agent as its
/// DaemonSet, Services through the cluster's kube-proxy.
fn conformance_through_the_cluster() -> Result<()> {
    let t = std::time::Instant::now();
    eprintln!("cluster test: cargo xtask conformance --source kube tests/conformance/cases");
    let code = crate::conformance::run(crate::conformance::Options {
        target: None,
        ipv6: false,
        bridge: false,
        nodes: 1,
        source: "kube".into(),
        paths: vec![root().join("tests/conformance/cases")],
    })?;
    if code != 0 {
        bail!("conformance through the cluster failed (exit {code})");
    }
    eprintln!("cluster test: conformance through the cluster passed in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

fn reliability(paths: &Paths, kills: usize, outage: u64) -> Result<()> {
    reliability::agent_restarts(paths, kills)?;
    reliability::api_server_outage(paths, std::time::Duration::from_secs(outage))
}

/// A job started in the background (in its own process group): waited
/// for, or, if `kill_on_drop`, killed with everything it started when
/// dropped, so that a failing test run leaves no build behind. (An install
/// is left to finish: killed, apt could leave dpkg half-configured.)
pub struct Background {
    child: Option<std::process::Child>,
    what: &'static str,
    log: PathBuf,
    kill_on_drop: bool,
}

impl Background {
    fn spawn(mut cmd: Command, what: &'static str, log: &Path, kill_on_drop: bool) -> Result<Background> {
        use std::os::unix::process::CommandExt as _;
        std::fs::create_dir_all(target_dir()).ok();
        let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .process_group(0)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Background { child: Some(child), what, log: log.to_owned(), kill_on_drop })
    }

    /// Waits for the job; on failure, shows its log's end.
    pub fn wait(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let status = child.wait().with_context(|| format!("waiting for {}", self.what))?;
        if !status.success() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} failed ({status}); end of {}:\n{}", self.what, self.log.display(), tail.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take().filter(|_| self.kill_on_drop) {
            // SAFETY: kill(2) on the process group this job leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// Starts `install.sh` niced in the background, its output in `log`.
pub fn install_in_background(log: &Path) -> Result<Background> {
    require_root("cargo xtask cluster install")?;
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "15"]).arg(root().join("scripts/cluster/install.sh"));
    Background::spawn(cmd, "the cluster install", log, false)
}

/// Starts the release build of the agent for its image, niced in the
/// background, its output in `log`. Cargo locks each profile's directory
/// on its own, so debug builds meanwhile do not wait for it.
pub fn build_image_agent_in_background(log: &Path) -> Result<Background> {
    let build = crate::static_agent_build(false);
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "15"]).arg(build.get_program()).args(build.get_args()).current_dir(root());
    for (k, v) in build.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    Background::spawn(cmd, "the agent's static release build", log, true)
}
