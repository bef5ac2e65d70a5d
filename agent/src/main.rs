//! `agent`: the daemon (`agent run`) and its command-line tools.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use portcullis_agent::{
    api, cli, cni,
    compiled::CompiledState,
    datapath::{AttachMode, DEFAULT_PIN_DIR, Datapath, DatapathConfig, MapSizes, monotonic_ns},
    flows::{Flow, FlowReader, Names, monotonic_epoch, observe_args::ObserveArgs, store::FlowStore},
    inspect,
    model::PodKey,
    node,
    policy::Engine,
    probes::Progress,
    source::{
        Hint, Hints, StateBuilder,
        installation::Installation,
        kube::{Events, KubeSource},
        manifests::{self, ManifestsSource},
    },
};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "agent", version, about = "Portcullis: NetworkPolicy enforcement with eBPF")]
struct Cli {
    /// The agent's local API socket (root-only): where `run` serves it and
    /// the other commands ask it.
    #[arg(long, global = true, env = "PORTCULLIS_API_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce: load the datapath and keep the maps in line with the cluster.
    Run(Box<RunArgs>),
    /// The chained CNI plugin on this node (the DaemonSet's init container
    /// installs it).
    #[command(subcommand)]
    Cni(CniCmd),
    /// Mount bpffs on /sys/fs/bpf unless one is there (the DaemonSet's
    /// init container: kind's nodes have none).
    MountBpffs,
    /// Stop enforcing on this node: remove every pinned map and link.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Also remove the CNI plugin from these directories.
        #[arg(long, requires = "cni_conf_dir", value_name = "DIR")]
        cni_bin_dir: Option<PathBuf>,
        #[arg(long, requires = "cni_bin_dir", value_name = "DIR")]
        cni_conf_dir: Option<PathBuf>,
    },
    /// Endpoints (the pods of this node the agent enforces).
    #[command(subcommand)]
    Endpoint(cli::EndpointCmd),
    /// Flows the datapath judged, like `hubble observe` (drops always;
    /// forwards with `run --report-allowed`).
    Observe(Box<ObserveArgs>),
    /// Why a connection is allowed or dropped.
    #[command(subcommand)]
    Policy(cli::PolicyCmd),
    /// Security identities.
    #[command(subcommand)]
    Identity(cli::IdentityCmd),
    /// Connection tracking.
    #[command(subcommand)]
    Ct(cli::CtCmd),
    /// The agent's health: API server, last sync, endpoints, maps, drops.
    Status(cli::OutputArg),
    /// The Prometheus metrics, as the agent serves them.
    Metrics,
    /// Shell completions: `agent completions bash > /etc/bash_completion.d/agent`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubernetes objects (Namespaces, Pods, NetworkPolicies as YAML) in
    /// a directory, re-read whenever they change; a file `revision` in it
    /// names the revision reported once enforced.
    #[arg(long, conflicts_with_all = ["state", "kube"], required_unless_present_any = ["state", "kube"])]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API server (in-cluster credentials, or
    /// KUBECONFIG / --kubeconfig).
    #[arg(long, conflicts_with = "state")]
    kube: bool,
    /// A kubeconfig file for --kube (default: in-cluster, then KUBECONFIG).
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// The node whose pods are this agent's endpoints (with --manifests
    /// or --kube; a DaemonSet passes spec.nodeName as NODE_NAME).
    #[arg(long, env = "NODE_NAME", default_value = "node")]
    node: String,
    /// Compiled endpoint state (JSON) instead of objects, re-read whenever
    /// it changes.
    #[arg(long)]
    state: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Cut tracked flows that a policy change no longer allows (their
    /// next packet meets the new policy).
    #[arg(long, env = "PORTCULLIS_REVOKE_FLOWS", default_value_t = true, action = clap::ArgAction::Set)]
    revoke_flows: bool,
    /// Report every new flow a policy lets through, not only drops.
    #[arg(long, env = "PORTCULLIS_REPORT_ALLOWED")]
    report_allowed: bool,
    /// How new endpoints' hooks are attached: tc filters (fast), or TCX
    /// links (each waits for an RCU grace period). Hooks in place keep
    /// their kind.
    #[arg(long, env = "PORTCULLIS_ATTACH", value_enum, default_value_t = AttachMode::Tc)]
    attach: AttachMode,
    /// A BPF map's size, as NAME=ENTRIES (repeatable). Maps: endpoints,
    /// ipcache, policy, cidr, conntrack, endpoint-addresses, services,
    /// service-pending, flows-bytes. A pinned map of another size is
    /// replaced at start, its entries carried over (as many as fit).
    #[arg(
        long = "map-size",
        env = "PORTCULLIS_MAP_SIZES",
        value_delimiter = ',',
        value_name = "NAME=ENTRIES"
    )]
    map_sizes: Vec<String>,
    /// Seconds between sweeps of expired conntrack entries.
    #[arg(long, env = "PORTCULLIS_CT_SWEEP_INTERVAL", default_value_t = 30)]
    ct_sweep_interval: u64,
    /// Node devices to give the Service hook as pinned TCX links. Not
    /// needed: every device of the node that is not a pod's gets it as a
    /// tc filter, followed as devices come and go.
    #[arg(long = "netdev", env = "PORTCULLIS_NETDEVS", value_delimiter = ',', value_name = "INTERFACE")]
    netdevs: Vec<String>,
    /// The node's root cgroup (cgroup v2, as the host mounts it): its
    /// ingress judges Service connections whose backend is one of the
    /// node's own addresses (hostNetwork pods, the API server).
    #[arg(long, env = "PORTCULLIS_HOST_CGROUP", default_value = "/sys/fs/cgroup", value_name = "DIR")]
    host_cgroup: PathBuf,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9962),
    /// and the kubelet's probes: `/healthz` (the agent is turning) and
    /// `/readyz` (the node is enforcing). `GET /metrics` on the API
    /// socket serves the metrics too.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDRESS", value_name = "ADDRESS:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Serve only the kubelet's probes (`/healthz`, `/readyz`) on this
    /// address, e.g. 127.0.0.1:9963: on loopback, no pod can reach it, so
    /// no pod's connections can delay a probe.
    #[arg(long, env = "PORTCULLIS_HEALTH_ADDRESS", value_name = "ADDRESS:PORT")]
    health_address: Option<std::net::SocketAddr>,
    /// Flows kept in memory for `agent observe --last`.
    #[arg(long, env = "PORTCULLIS_FLOW_HISTORY", default_value_t = portcullis_agent::flows::store::DEFAULT_HISTORY)]
    flow_history: usize,
    /// The DaemonSet that runs this agent (with --kube). If it, or the
    /// namespace it is in (POD_NAMESPACE), is deleted, the agent
    /// uninstalls itself from the node when stopped (programs, pins,
    /// CNI plugin). Any other stop (an upgrade, a restart) leaves
    /// enforcement in place for the next agent.
    #[arg(long, env = "PORTCULLIS_DAEMONSET", requires = "kube", value_name = "NAME")]
    daemonset: Option<String>,
    /// The namespace this agent's pod runs in (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "portcullis", value_name = "NAMESPACE")]
    pod_namespace: String,
    /// Install the chained CNI plugin: this binary into DIR (the node's
    /// CNI bin dir, e.g. /opt/cni/bin) ...
    #[arg(long, requires = "cni_conf_dir", value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// ... and `{"type": "portcullis"}` into the first conflist of DIR
    /// (e.g. /etc/cni/net.d). Pods then start only once enforced.
    #[arg(long, requires = "cni_bin_dir", value_name = "DIR")]
    cni_conf_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CniCmd {
    /// Copy this binary into the CNI bin dir as `portcullis`, and chain it
    /// after the main plugin in the first conflist of the conf dir (waiting
    /// for the main plugin to write one).
    Install {
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// Seconds to wait for the main plugin's conflist.
        #[arg(long, default_value_t = 600)]
        wait: u64,
    },
    /// Take the plugin out of the conflist and the bin dir.
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn cni_command(cmd: CniCmd, socket: &Path) -> Result<()> {
    match cmd {
        CniCmd::Install { bin_dir, conf_dir, wait } => {
            cni::wait_for_conflist(&conf_dir, Duration::from_secs(wait)).with_context(|| {
                format!("waiting for the main plugin's conflist in {}", conf_dir.display())
            })?;
            let conflist = cni::install(&bin_dir, &conf_dir, socket).context("installing the CNI plugin")?;
            println!(
                "chained the portcullis CNI plugin in {} (binary {})",
                conflist.display(),
                bin_dir.join(cni::PLUGIN_TYPE).display()
            );
        }
        CniCmd::Uninstall { bin_dir, conf_dir } => {
            cni::uninstall(&bin_dir, &conf_dir).context("removing the CNI plugin")?;
            println!(
                "removed the portcullis CNI plugin from {} and {}",
                conf_dir.display(),
                bin_dir.display()
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    // Called by the container runtime as the chained CNI plugin: no
    // arguments, the request in the environment and on stdin.
    if std::env::var_os("CNI_COMMAND").is_some() && std::env::args_os().len() == 1 {
        std::process::exit(cni::plugin_main());
    }
    let cli = Cli::parse();
    let client = cli::Client::new(&cli.socket);
    let done = match cli.command {
        Command::Endpoint(cmd) => cli::endpoint(&client, cmd),
        Command::Observe(args) => cli::observe(&client, *args),
        Command::Identity(cmd) => cli::identity(&client, cmd),
        Command::Ct(cmd) => cli::ct(&client, cmd),
        Command::Status(out) => cli::status(&client, out),
        Command::Metrics => cli::metrics(&client),
        Command::Cni(cmd) => cni_command(cmd, &cli.socket),
        Command::MountBpffs => portcullis_agent::datapath::mount_bpffs()
            .map(|mounted| {
                println!(
                    "{}",
                    if mounted { "mounted bpffs on /sys/fs/bpf" } else { "bpffs is on /sys/fs/bpf" }
                )
            })
            .map_err(Into::into),
        Command::Policy(cmd) => match cli::policy(&client, cmd) {
            // Dropped: exit 1, for scripts.
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "agent",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        command => {
            tune_allocator();
            return tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(agent_main(command, cli.socket));
        }
    };
    if let Err(e) = done {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
    Ok(())
}

async fn agent_main(command: Command, api_socket: PathBuf) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match command {
        Command::Run(args) => {
            let RunArgs {
                manifests,
                kube,
                kubeconfig,
                node,
                state,
                pin_dir,
                revoke_flows,
                report_allowed,
                attach,
                map_sizes,
                ct_sweep_interval,
                netdevs,
                host_cgroup,
                metrics_address,
                health_address,
                flow_history,
                cni_bin_dir,
                cni_conf_dir,
                daemonset,
                pod_namespace,
            } = *args;
            let node_name = node.clone();
            let mut installation = None;
            let source = match (manifests, state) {
                (Some(dir), _) => Source::Manifests {
                    source: ManifestsSource::new(dir),
                    engine: Box::new(Engine::new(node)),
                    builder: StateBuilder::default(),
                },
                (None, Some(path)) => Source::StateFile { path, last: None },
                (None, None) if kube => {
                    let client = kube_client(kubeconfig.as_deref()).await?;
                    tracing::info!(node = %node, "watching the API server");
                    installation = daemonset
                        .as_deref()
                        .map(|ds| Installation::watch(client.clone(), &pod_namespace, ds));
                    Source::Kube {
                        events: Events::new(client.clone(), &node),
                        source: Box::new(KubeSource::start(client)),
                        engine: Box::new(Engine::new(node)),
                        builder: StateBuilder::default(),
                    }
                }
                (None, None) => anyhow::bail!("--manifests, --kube or --state is required"),
            };
            let mut sizes = MapSizes::default();
            // An empty value (the ConfigMap's default) sets nothing.
            for spec in map_sizes.iter().filter(|s| !s.trim().is_empty()) {
                sizes.set(spec).map_err(|e| anyhow::anyhow!("--map-size {e}"))?;
            }
            let config = DatapathConfig { pin_dir, map_sizes: sizes, report_allowed, attach };
            let options = RunOptions {
                revoke_flows,
                ct_sweep_interval: Duration::from_secs(ct_sweep_interval.max(1)),
                netdevs,
                host_cgroup,
                api_socket,
                metrics_address,
                health_address,
                flow_history,
                node: node_name,
                cni: cni_bin_dir.zip(cni_conf_dir),
                installation,
            };
            run(source, config, options).await
        }
        Command::Uninstall { pin_dir, cni_bin_dir, cni_conf_dir } => {
            uninstall(&pin_dir, cni_bin_dir.as_deref().zip(cni_conf_dir.as_deref()))
        }
        // The client commands return before the runtime starts.
        _ => anyhow::bail!("not a command of the running agent"),
    }
}

async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("no in-cluster credentials and no usable KUBECONFIG")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Where the state to enforce comes from.
enum Source {
    /// The API server's objects, through watchers, compiled by the engine.
    Kube { source: Box<KubeSource>, events: Events, engine: Box<Engine>, builder: StateBuilder },
    /// Objects in a directory, compiled by the engine.
    Manifests { source: ManifestsSource, engine: Box<Engine>, builder: StateBuilder },
    /// Compiled state written by someone else.
    StateFile { path: PathBuf, last: Option<String> },
}

impl Source {
    /// The engine the objects feed, when there is one (CNI hints go there).
    fn engine_mut(&mut self) -> Option<&mut Engine> {
        match self {
            Source::Kube { engine, .. } | Source::Manifests { engine, .. } => Some(engine),
            Source::StateFile { .. } => None,
        }
    }

    fn engine(&self) -> Option<&Engine> {
        match self {
            Source::Kube { engine, .. } | Source::Manifests { engine, .. } => Some(engine),
            Source::StateFile { .. } => None,
        }
    }

    /// Notified when the source has news (`kube` only; the others are
    /// read at every tick).
    fn wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        match self {
            Source::Kube { source, .. } => source.wake(),
            _ => Default::default(),
        }
    }

    /// The API server as the watches see it (`kube` only).
    fn api_server(&self) -> Option<api::ApiServerHealth> {
        match self {
            Source::Kube { source, .. } => Some(source.health()),
            _ => None,
        }
    }

    /// Watch restarts per kind (`kube` only).
    fn watch_restarts(&self) -> Vec<(String, u64)> {
        match self {
            Source::Kube { source, .. } => {
                source.watch_errors.iter().map(|(k, n)| (k.as_str().to_owned(), *n)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// What `GET /v1/status` answers, given the revision last written.
    fn status(&self, revision: Option<u64>) -> api::Status {
        let mut status = api::Status { revision, ..Default::default() };
        match self {
            Source::Kube { source, .. } => {
                status.source = "kube".into();
                status.synced = source.synced();
                status.resource_versions = source
                    .applied_versions()
                    .iter()
                    .map(|(k, v)| (k.as_str().into(), v.to_string()))
                    .collect();
            }
            Source::Manifests { .. } => status.source = "manifests".into(),
            Source::StateFile { .. } => status.source = "state".into(),
        }
        status
    }

    /// The state to enforce, and whether it is news (to report) rather than
    /// a periodic re-check; `None` when nothing moved. `reconcile`: build
    /// the state even when no object moved (interfaces that appeared, CNI
    /// hints); `node_ips`: the node's addresses, as last read; `starting`:
    /// CNI ADDs wait on this pass (`StateBuilder::build`'s `verify_placed`).
    fn poll(
        &mut self,
        reconcile: bool,
        hints: &mut Hints,
        node_ips: &[IpAddr],
        starting: bool,
    ) -> Option<(CompiledState, bool)> {
        let (engine, builder, revision, moved) = match self {
            Source::Kube { source, events, engine, builder } => {
                let mut poll = source.poll();
                for e in &poll.watch_errors {
                    tracing::warn!("{e} (retrying; the last state stays enforced)");
                }
                for r in &poll.rejected {
                    tracing::error!(kind = ?r.kind, namespace = %r.namespace, name = %r.name, "{} ({})", r.error, r.meanwhile);
                    events.rejected(r);
                }
                // Until every kind is listed, the pinned state stays as it is.
                if !source.synced() {
                    return None;
                }
                hints.patch(&mut poll.changes);
                let moved = source.feed(engine, &mut poll);
                (engine, builder, source.revision, moved)
            }
            Source::Manifests { source, engine, builder } => {
                let mut poll = source.poll();
                for e in &poll.errors {
                    tracing::error!("{e}");
                }
                hints.patch(&mut poll.changes);
                let moved = manifests::feed(engine, &mut poll) || poll.revision_changed;
                (engine, builder, source.revision, moved)
            }
            Source::StateFile { path, last } => {
                let text = std::fs::read_to_string(&*path).ok()?;
                if last.as_ref() == Some(&text) {
                    return None;
                }
                *last = Some(text.clone());
                return match serde_json::from_str::<CompiledState>(&text) {
                    Ok(state) => Some((state, true)),
                    // Keep enforcing the last good state.
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "invalid state, keeping the last good one");
                        None
                    }
                };
            }
        };
        if !moved && !reconcile {
            return None;
        }
        let (state, errors) = builder.build(engine, revision, node_ips, hints, !starting);
        for e in &errors {
            tracing::debug!("{e}");
        }
        Some((state, moved))
    }
}

struct RunOptions {
    revoke_flows: bool,
    ct_sweep_interval: Duration,
    netdevs: Vec<String>,
    host_cgroup: PathBuf,
    api_socket: PathBuf,
    metrics_address: Option<std::net::SocketAddr>,
    health_address: Option<std::net::SocketAddr>,
    flow_history: usize,
    node: String,
    /// (bin dir, conf dir) to install the CNI plugin into.
    cni: Option<(PathBuf, PathBuf)>,
    /// The agent's DaemonSet, watched: its removal means uninstall at stop.
    installation: Option<Installation>,
}

/// Requests handled between two passes: queued ones go first (a burst of
/// CNI ADDs then shares one pass), up to this many.
const REQUESTS_PER_PASS: usize = 256;

/// A CNI ADD waiting for its endpoint to be enforced.
struct PendingAdd {
    pod: PodKey,
    interface: String,
    /// When the API server read the request, and when this loop took it.
    received: std::time::Instant,
    taken: std::time::Instant,
    reply: tokio::sync::oneshot::Sender<Result<api::CniReady, String>>,
}

async fn run(mut source: Source, config: DatapathConfig, options: RunOptions) -> Result<()> {
    let RunOptions {
        revoke_flows,
        ct_sweep_interval,
        netdevs,
        host_cgroup,
        api_socket,
        metrics_address,
        health_address,
        flow_history,
        node: node_name,
        cni,
        installation,
    } = options;
    let pin_dir = config.pin_dir.clone();
    let (progress_tx, progress_rx) = watch::channel(Progress::starting(std::time::Instant::now()));
    let mut dp = Datapath::load(&config).context("loading the datapath")?;
    for dev in &netdevs {
        dp.attach_netdev(dev).with_context(|| format!("--netdev {dev}"))?;
    }
    // Service verdicts after DNAT: on the node's devices (backends on other
    // nodes) and its root cgroup (backends on its own addresses). Without
    // the latter a Service to a node address would bypass egress policy.
    // Fails closed as far as it can: the rest is enforced, but the node is
    // not ready (a rolling update stops here) while the hook is missing.
    if let Err(e) = dp.attach_host(&host_cgroup) {
        tracing::error!(
            cgroup = %host_cgroup.display(),
            error = %format!("{e:#}"),
            "no Service verdicts for backends on this node's own addresses: a Service to a node address is not judged \
             (mount the host's cgroup2 root and pass --host-cgroup)"
        );
        let why = format!("the host cgroup hook ({}: {e})", host_cgroup.display());
        progress_tx.send_modify(|p| p.missing_hooks.push(why));
    }
    dp.follow_node_devices(&Default::default());
    let (links_tx, mut links_rx) = tokio::sync::mpsc::unbounded_channel::<portcullis_agent::node::Link>();
    if let Err(e) = portcullis_agent::datapath::watch_new_links(move |link| {
        let _ = links_tx.send(link);
    }) {
        tracing::warn!(error = %e, "not listening for new links: node devices are read once a second");
    }
    let mut links_changed = false;
    let mut reader = FlowReader::new(dp.take_flows().context("flow ring buffer")?)?;
    let (names_tx, names_rx) = watch::channel(std::sync::Arc::new(Names::default()));
    let flow_store = FlowStore::new(flow_history);

    let printer_store = flow_store.clone();
    let printer = tokio::spawn(async move {
        let epoch = monotonic_epoch();
        loop {
            let batch = match reader.next_batch().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "reading flow events");
                    return;
                }
            };
            let names = names_rx.borrow().clone();
            for ev in batch {
                let flow = Flow::decode(&ev, &names, epoch);
                println!("{flow}");
                printer_store.push(flow);
            }
        }
    });

    // Room for a node's worth of CNI ADDs: requests that wait here join the
    // next pass; ones that found it full would wait for the pass after.
    let (api_tx, mut api_rx) = tokio::sync::mpsc::channel(REQUESTS_PER_PASS);
    // A pod's interface gets its clsact qdisc while its ADD waits for a
    // pass, not in the pass (which every ADD of a burst waits for).
    let prepare: Option<api::Prepare> = (config.attach == portcullis_agent::datapath::AttachMode::Tc).then(|| {
        std::sync::Arc::new(|add: &api::CniAdd| {
            if let Err(e) = portcullis_agent::datapath::prepare_interface(&add.interface) {
                tracing::debug!(interface = %add.interface, error = %e, "readying the interface ahead of its pass");
            }
        }) as api::Prepare
    });
    let api_server = api::serve(&api_socket, api_tx.clone(), flow_store.clone(), prepare)?;
    tracing::info!(socket = %api_socket.display(), "local API listening");
    let metrics_server = match metrics_address {
        Some(addr) => {
            let ask = api_tx.clone();
            let snapshot =
                move || -> futures::future::BoxFuture<'static, Option<portcullis_agent::metrics::Metrics>> {
                    let ask = ask.clone();
                    Box::pin(async move {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        ask.send(api::Request::Inspect(api::Query::Metrics, tx)).await.ok()?;
                        match rx.await.ok()?.ok()? {
                            api::Answer::Metrics(m) => Some(*m),
                            api::Answer::Json(_) => None,
                        }
                    })
                };
            match portcullis_agent::metrics::serve(addr, snapshot, progress_rx.clone()).await {
                Ok(server) => {
                    tracing::info!(address = %addr, "metrics served");
                    Some(server)
                }
                // Enforcement matters more than metrics: go on without them.
                Err(e) => {
                    tracing::error!(address = %addr, error = %e, "cannot serve metrics; enforcing without them");
                    None
                }
            }
        }
        None => None,
    };
    let health_server = match health_address {
        Some(addr) => match portcullis_agent::metrics::serve_probes(addr, progress_rx.clone()).await {
            Ok(server) => {
                tracing::info!(address = %addr, "probes served");
                Some(server)
            }
            // As with metrics. The kubelet's probes then fail: it restarts
            // the agent, which tries again.
            Err(e) => {
                tracing::error!(address = %addr, error = %e, "cannot serve the probes; enforcing without them");
                None
            }
        },
        None => None,
    };
    // The plugin goes in only once the socket answers: from here on, pods
    // on this node start only when enforced.
    if let Some((bin, conf)) = &cni {
        let conflist = cni::install(bin, conf, &api_socket).context("installing the CNI plugin")?;
        tracing::info!(conflist = %conflist.display(), "CNI plugin chained");
    }
    let mut hints = Hints::default();
    hints.restore(dp.placements());
    if let Some(engine) = source.engine_mut() {
        engine.recover_identities(dp.address_identities());
    }
    let mut pending: Vec<PendingAdd> = Vec::new();
    let mut cni_dirty = false;
    // Hooks someone else removed (a deleted clsact qdisc): attached again
    // in a pass that runs at once.
    let (hooks_tx, mut hooks_rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
    if let Err(e) = portcullis_agent::datapath::watch_hook_removals(move |idx| {
        let _ = hooks_tx.send(idx);
    }) {
        tracing::warn!(
            error = %e,
            "not listening for removed tc hooks: a removed one comes back only when its endpoint changes"
        );
    }
    let mut hooks_gone = false;
    let mut node_ips: Option<Vec<IpAddr>> = None;
    let mut names_due = false;

    // Made once, so a signal that arrives while a pass runs is not lost.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut good: Option<CompiledState> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sweep = tokio::time::interval(ct_sweep_interval);
    let mut ticks: u64 = 0;
    let mut trim_due = false;
    // Addresses CNI ADDs gave pods, fed to the engine together at the pass.
    let mut hint_changes: Vec<portcullis_agent::policy::Change> = Vec::new();
    // Watch events and CNI ADDs are acted on at once, not at the next tick:
    // a pass runs this long after the first of a burst, so that the rest
    // of the burst (a relist, many pods starting together) goes with it.
    const GATHER: Duration = Duration::from_millis(2);
    let wake = source.wake();
    let mut soon: Option<tokio::time::Instant> = None;
    let mut last_errors: Vec<String> = Vec::new();
    let mut last_failed: std::collections::BTreeSet<String> = Default::default();
    let mut telemetry = inspect::Telemetry::default();
    let mut metrics_cache: Option<(std::time::Instant, portcullis_agent::metrics::Metrics)> = None;
    let mut requests = 0usize;
    loop {
        let mut on_tick = false;
        tokio::select! {
            biased;
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            Some(request) = api_rx.recv(), if requests < REQUESTS_PER_PASS => {
                requests += 1;
                match request {
                    api::Request::CniAdd(add, received, reply) => {
                        let pod = PodKey { namespace: add.namespace.clone(), name: add.name.clone() };
                        tracing::info!(pod = %pod, interface = %add.interface, ips = ?add.ips, "CNI ADD: enforcing before the pod starts");
                        let hint = Hint { container_id: add.container_id, interface: add.interface.clone(), ips: add.ips };
                        match source.engine_mut() {
                            Some(engine) => {
                                hint_changes.extend(hints.insert(pod.clone(), hint, engine));
                                pending.push(PendingAdd {
                                    pod,
                                    interface: add.interface,
                                    received,
                                    taken: std::time::Instant::now(),
                                    reply,
                                });
                                cni_dirty = true;
                                soon.get_or_insert_with(|| tokio::time::Instant::now() + GATHER);
                            }
                            None => {
                                let _ = reply.send(Err("the agent runs from a state file: no pods to enforce".into()));
                            }
                        }
                    }
                    api::Request::CniDel(del) => {
                        let pod = PodKey { namespace: del.namespace, name: del.name };
                        hints.remove(&pod, &del.container_id);
                    }
                    // Answered between passes, and a pass writes the maps for
                    // everything it fed the engine: what the source has
                    // applied is enforced.
                    api::Request::Status(reply) => {
                        let mut status = source.status(good.as_ref().map(|s| s.revision));
                        telemetry.flows_seen = flow_store.seen();
                        // The addresses the loop keeps (read once a second), not a
                        // netlink dump per request: scrapes come from outside.
                        let node_ips = node_ips.get_or_insert_with(node::local_addresses).clone();
                        let view = inspect_view(&good, &source, &last_errors, &last_failed, &dp, &node_ips, &node_name);
                        status.health = Some(inspect::health(&view, &mut telemetry, &node_name, source.api_server()));
                        let _ = reply.send(status);
                    }
                    api::Request::Inspect(query, reply) => {
                        telemetry.flows_seen = flow_store.seen();
                        let node_ips = node_ips.get_or_insert_with(node::local_addresses).clone();
                        let view = inspect_view(&good, &source, &last_errors, &last_failed, &dp, &node_ips, &node_name);
                        let json = |v: Result<serde_json::Value, serde_json::Error>| {
                            v.map(api::Answer::Json).map_err(|e| inspect::Failure { status: 500, message: e.to_string() })
                        };
                        let answer = match query {
                            api::Query::Endpoints => json(serde_json::to_value(inspect::endpoints(&view))),
                            api::Query::Endpoint(which) => {
                                inspect::endpoint(&view, &which).and_then(|d| json(serde_json::to_value(d)))
                            }
                            api::Query::Identities => json(serde_json::to_value(inspect::identities(&view))),
                            api::Query::Conntrack(filter) => {
                                inspect::conntrack(&view, &filter).and_then(|c| json(serde_json::to_value(c)))
                            }
                            api::Query::Trace(req) => {
                                inspect::trace(&view, &req).and_then(|t| json(serde_json::to_value(t)))
                            }
                            // Built at most once a second: scrapers (up to 32 at
                            // once) must not keep the loop from enforcing.
                            api::Query::Metrics => match &metrics_cache {
                                Some((at, m)) if at.elapsed() < Duration::from_secs(1) => {
                                    Ok(api::Answer::Metrics(Box::new(m.clone())))
                                }
                                _ => {
                                    let api_server = source.api_server();
                                    let m = inspect::metrics(
                                        &view,
                                        &mut telemetry,
                                        api_server.as_ref(),
                                        source.watch_restarts(),
                                    );
                                    metrics_cache = Some((std::time::Instant::now(), m.clone()));
                                    Ok(api::Answer::Metrics(Box::new(m)))
                                }
                            },
                        };
                        let _ = reply.send(answer);
                    }
                }
                continue;
            }
            _ = tokio::time::sleep_until(soon.unwrap_or_else(tokio::time::Instant::now)), if soon.is_some() => {}
            _ = wake.notified(), if soon.is_none() => {
                soon = Some(tokio::time::Instant::now() + GATHER);
                continue;
            }
            Some(idx) = hooks_rx.recv() => {
                // One deletion is announced several times (each filter,
                // then the qdisc): taken together.
                let mut n = dp.hooks_removed(idx);
                while let Ok(idx) = hooks_rx.try_recv() {
                    n += dp.hooks_removed(idx);
                }
                if n > 0 {
                    tracing::warn!(ifindex = idx, endpoints = n, "an endpoint's tc hooks were removed by someone else: attaching them again");
                    hooks_gone = true;
                    soon = Some(tokio::time::Instant::now());
                }
                continue;
            }
            Some(link) = links_rx.recv() => {
                tracing::debug!(interface = %link.name, "a link appeared");
                links_changed = true;
                soon = Some(tokio::time::Instant::now());
                continue;
            }
            _ = tick.tick() => on_tick = true,
            _ = sweep.tick() => {
                let sweep = dp.sweep_conntrack(monotonic_ns());
                telemetry.conntrack_live = Some(sweep.live as u64);
                tracing::debug!(removed = sweep.removed, live = sweep.live, "swept conntrack");
                if sweep.nearly_full() {
                    tracing::warn!(
                        live = sweep.live,
                        capacity = sweep.capacity,
                        "conntrack table nearly full: the oldest flows are evicted and meet the policy again \
                         (raise --map-size conntrack=N)"
                    );
                }
                continue;
            }
        }
        soon = None;
        requests = 0;
        if on_tick {
            ticks += 1;
        }
        // Once a second (every tenth tick): the periodic checks.
        let each_second = on_tick && ticks.is_multiple_of(10);
        progress_tx.send_modify(|p| p.heartbeat = std::time::Instant::now());
        if each_second || hooks_gone || std::mem::take(&mut links_changed) {
            let placed = good.iter().flat_map(|s| s.endpoints.iter().map(|e| e.interface.as_str())).collect();
            dp.follow_node_devices(&placed);
        }
        // The main plugin may have rewritten its conflist (kindnet and
        // flannel do when they restart): chain again at once, or new pods
        // would start unenforced.
        if let Some((bin, conf)) = &cni
            && each_second
            && !cni::is_chained(bin, conf, &api_socket)
        {
            match cni::install(bin, conf, &api_socket) {
                Ok(conflist) => tracing::warn!(
                    conflist = %conflist.display(),
                    "the CNI plugin was no longer chained (the main plugin rewrote its conflist?): chained it again"
                ),
                Err(e) => tracing::error!(error = %e, "the CNI plugin is not chained and chaining it failed"),
            }
        }
        // What a relist or a burst of changes allocated and freed stays in
        // the allocator's free lists (tens of MiB after listing a 10,000-pod
        // cluster): hand it back to the kernel, at most every 10 s.
        if on_tick && ticks.is_multiple_of(100) && std::mem::take(&mut trim_due) {
            release_free_memory();
        }
        pending.retain(|p| !p.reply.is_closed());
        let compile_started = std::time::Instant::now();
        if !hint_changes.is_empty()
            && let Some(engine) = source.engine_mut()
        {
            engine.apply(std::mem::take(&mut hint_changes));
        }
        let reconcile = each_second || std::mem::take(&mut cni_dirty);
        // The node's own addresses (the host identity's), read again once
        // a second: hundreds of veths make a read cost milliseconds, and
        // pods starting together would pay it on every pass.
        if each_second || node_ips.is_none() {
            node_ips = Some(node::local_addresses());
        }
        let polled =
            source.poll(reconcile, &mut hints, node_ips.as_deref().unwrap_or_default(), !pending.is_empty());
        let rebuilt = polled.is_some();
        let (state, news) = match polled {
            Some((state, news)) => (state, news),
            // Once a second, converge again: interfaces that appeared or were
            // recreated get their programs, failed endpoints are retried.
            // (Taken, not cloned: it is put back at the end of this pass.)
            None if each_second || std::mem::take(&mut hooks_gone) => match good.take() {
                Some(state) => (state, false),
                None => continue,
            },
            None => continue,
        };
        let compile_took = compile_started.elapsed();
        if news {
            telemetry.compile.observe(compile_took.as_secs_f64());
            trim_due = true;
        }
        let write_started = std::time::Instant::now();
        let report = dp.apply(&state);
        let write_took = write_started.elapsed();
        // CNI ADDs whose endpoint is now in the maps, on its interface: the
        // pods wait on these, so before anything else. Unless this pass
        // handed an endpoint id or an address from one holder to another
        // and flows are to be cut: a new pod may then hold what an old
        // one's tracked flows still name. Other narrowing (a set losing an
        // entry as named ports resolve anew, say) names no new pod.
        let starting_pods = !pending.is_empty();
        let revoking = revoke_flows && report.narrowed;
        if !(revoking && report.reused) {
            answer_adds(&mut pending, &state, &report, &mut telemetry);
        }
        if news || report.endpoints_written > 0 || report.endpoints_removed > 0 {
            telemetry.write.observe(write_took.as_secs_f64());
            telemetry.last_enforced = Some(std::time::SystemTime::now());
        }
        last_failed = report.failed.clone();
        progress_tx.send_modify(|p| {
            p.revision = Some(state.revision);
            p.endpoints = state.endpoints.len();
            p.failed = report.failed.iter().cloned().collect();
        });
        // Failures are retried every second; say so once, and when they change.
        if report.errors != last_errors {
            for e in &report.errors {
                tracing::error!("{e}");
            }
            last_errors = report.errors.clone();
        }
        // The names follow the state (the once-a-second re-check of the
        // last one changes none). While pods start (a pass that answered
        // CNI ADDs; they come in bursts) they are put off, for a second at
        // most: flow output may name the newest pods a moment late, but no
        // pod waits for the names (10,000 addresses, every rule's name).
        names_due |= rebuilt;
        if names_due && (!starting_pods || each_second) {
            names_due = false;
            let rules = source.engine().map(|e| inspect::rule_names(e.cluster())).unwrap_or_default();
            names_tx.send_replace(std::sync::Arc::new(Names::from_state(&state).with_rules(rules)));
        }
        if revoking {
            let started = std::time::Instant::now();
            let revoked = dp.revoke_flows();
            let ms = started.elapsed().as_secs_f64() * 1e3;
            if revoked > 0 {
                tracing::info!(revoked, ms, "cut tracked flows the policy no longer allows");
            } else {
                tracing::debug!(ms, "no tracked flow to cut");
            }
            answer_adds(&mut pending, &state, &report, &mut telemetry);
        }
        if news {
            tracing::info!(
                revision = state.revision,
                endpoints = state.endpoints.len(),
                policy_entries = report.policy_entries,
                ipcache_entries = report.ipcache_entries,
                compile_ms = compile_took.as_secs_f64() * 1e3,
                write_ms = write_took.as_secs_f64() * 1e3,
                "enforced"
            );
            // A line the lab and tests wait for: the revision is in the maps
            // (and the flows it no longer allows are cut).
            println!("enforced revision {}", state.revision);
        } else if report.endpoints_written > 0 || report.endpoints_removed > 0 {
            tracing::info!(
                written = report.endpoints_written,
                removed = report.endpoints_removed,
                compile_ms = compile_took.as_secs_f64() * 1e3,
                write_ms = write_took.as_secs_f64() * 1e3,
                "reconciled"
            );
            println!("enforced revision {} (reconciled)", state.revision);
        }
        good = Some(state);
    }
    printer.abort();
    api_server.abort();
    for server in [metrics_server, health_server].into_iter().flatten() {
        server.abort();
    }
    // A CNI ADD now fails at once (no socket) instead of waiting for us.
    let _ = std::fs::remove_file(&api_socket);
    // Pins keep enforcing after we exit (for the next agent to adopt),
    // unless the installation itself is going away.
    if let Some(installation) = &installation
        && let Some(why) = installation.being_removed().await
    {
        tracing::warn!("{why}: uninstalling from this node (CNI plugin, programs, pins)");
        drop(dp);
        uninstall(&pin_dir, cni.as_ref().map(|(bin, conf)| (bin.as_path(), conf.as_path())))?;
        println!("uninstalled from this node: {why}");
    } else {
        tracing::info!(
            "stopping; the pinned programs and maps keep enforcing until the next agent adopts them"
        );
    }
    Ok(())
}

/// Answers the CNI ADDs whose endpoint `state` placed on their interface
/// and `report` says was written.
fn answer_adds(
    pending: &mut Vec<PendingAdd>,
    state: &CompiledState,
    report: &portcullis_agent::datapath::ApplyReport,
    telemetry: &mut inspect::Telemetry,
) {
    if pending.is_empty() {
        return;
    }
    let by_name: std::collections::HashMap<&str, &portcullis_agent::compiled::EndpointState> =
        state.endpoints.iter().map(|e| (e.name.as_str(), e)).collect();
    for p in std::mem::take(pending) {
        let name = p.pod.to_string();
        let enforced = by_name
            .get(name.as_str())
            .filter(|e| e.interface == p.interface && !report.failed.contains(&name))
            .map(|e| e.id);
        match enforced {
            Some(endpoint_id) => {
                // Queued: read by the API server, waiting for this loop (a
                // pass running); in all: read to answered.
                let took = p.received.elapsed();
                let queued = p.taken.saturating_duration_since(p.received);
                telemetry.cni_add.observe(took.as_secs_f64());
                tracing::info!(
                    pod = %p.pod,
                    endpoint = endpoint_id,
                    ms = took.as_secs_f64() * 1e3,
                    queued_ms = queued.as_secs_f64() * 1e3,
                    "CNI ADD answered: enforced"
                );
                let _ = p.reply.send(Ok(api::CniReady { endpoint_id }));
            }
            None => pending.push(p),
        }
    }
}

/// glibc's defaults suit short programs, not a daemon whose bursts (a
/// relist of a 10,000-pod cluster, megabytes of JSON) come and go: every
/// thread that allocates gets an arena of its own (up to 8 per core), and
/// freed memory stays in each, so the resident size grows by the sum of
/// their high-water marks. One arena (the agent is one loop and a few
/// helpers), and big blocks from mmap (given back
/// when freed) instead of the heap.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; called before
    // any thread but this one exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Returns the allocator's free memory to the kernel (glibc keeps freed
/// chunks for reuse, so the resident size would stay at its peak).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the operator tools see of the main loop's state.
fn inspect_view<'a>(
    good: &'a Option<CompiledState>,
    source: &'a Source,
    errors: &'a [String],
    failed: &'a std::collections::BTreeSet<String>,
    dp: &'a Datapath,
    node_ips: &'a [std::net::IpAddr],
    node: &'a str,
) -> inspect::View<'a> {
    inspect::View {
        state: good.as_ref(),
        cluster: source.engine().map(Engine::cluster),
        errors,
        failed,
        dp,
        node_ips,
        node,
    }
}

/// Takes the agent off the node: the CNI plugin (from `cni`'s bin and conf
/// dirs) first, so that from then on pods start without it, as they will
/// once it is gone; then the pins, which detaches the programs.
fn uninstall(pin_dir: &Path, cni: Option<(&Path, &Path)>) -> Result<()> {
    if let Some((bin, conf)) = cni {
        cni::uninstall(bin, conf).context("removing the CNI plugin")?;
        eprintln!("removed the CNI plugin from {} and {}", bin.display(), conf.display());
    }
    // The filters first: they hold the programs, and the programs the maps.
    let filters =
        portcullis_agent::datapath::detach_all_filters().context("removing the endpoints' tc filters")?;
    if filters > 0 {
        eprintln!("removed {filters} tc filters");
    }
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            eprintln!("removed {}", pin_dir.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin_dir.display())),
    }
}
