//! The agent under test: a process in the node's network namespace, and
//! what the kernel says it costs (resident memory, CPU time, BPF maps).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portcullis_testbed::Netns;

pub const METRICS: &str = "127.0.0.1:9962";

pub struct Agent {
    child: Child,
    pub started: Instant,
    pub socket: PathBuf,
    node: String,
}

impl Agent {
    pub fn start(
        node: &Netns,
        binary: &Path,
        kubeconfig: &Path,
        pin_dir: &Path,
        log: &Path,
    ) -> Result<Agent> {
        let socket = std::env::temp_dir().join(format!("portcullis-scale-{}.sock", std::process::id()));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let started = Instant::now();
        let child = node
            .command(&binary.to_string_lossy())
            .args(["run", "--kube", "--node", super::objects::LOCAL_NODE, "--metrics-address", METRICS])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--pin-dir")
            .arg(pin_dir)
            .env("PORTCULLIS_API_SOCKET", &socket)
            // The main loop's info lines (per pass, per CNI ADD) give the
            // agent's share of a pod start.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,agent=info".into()))
            // Every dropped probe is a flow line: kept out of the way.
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Agent { child, started, socket, node: node.name().to_string() })
    }

    /// The agent's PID (nsenter execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET path` on the metrics address, inside the node's namespace.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.node, path)
    }

    /// Waits until `/readyz` says every pod of the node is enforced, with
    /// `endpoints` endpoints; returns when (from the process' start).
    pub fn wait_ready(&self, endpoints: usize, timeout: Duration) -> Result<Duration> {
        let want = format!("on {endpoints} endpoint(s)");
        let mut last = String::new();
        while self.started.elapsed() < timeout {
            if let Ok((status, body)) = self.get("/readyz") {
                if status == 200 && body.contains(&want) {
                    return Ok(self.started.elapsed());
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bail!("the agent is not ready with {endpoints} endpoints after {timeout:?}: {}", last.trim())
    }

    /// SIGTERM, and wait (the pins stay and keep enforcing).
    pub fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while self.child.try_wait()?.is_none() {
            if t.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn usage(&self) -> Result<Usage> {
        usage(self.pid())
    }

    /// A Prometheus sample's value: `name{labels}` as printed, or a bare
    /// name for the sum over all its label sets.
    pub fn metric(&self, series: &str) -> Result<f64> {
        let (_, body) = self.get("/metrics")?;
        let values: Vec<f64> = body
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(series)?;
                let rest = match rest.strip_prefix('{') {
                    Some(labelled) if !series.contains('{') => labelled.split_once('}')?.1,
                    Some(_) => return None,
                    None => rest,
                };
                rest.trim().parse().ok()
            })
            .collect();
        if values.is_empty() {
            bail!("no metric {series}");
        }
        Ok(values.iter().sum())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn http_get(netns: &str, path: &str) -> Result<(u16, String)> {
    let ns = Netns::existing(netns)?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n");
    let text = ns.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A process' footprint, from /proc.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub rss_kib: u64,
    /// The peak resident size since the process started.
    pub hwm_kib: u64,
    /// User + system CPU time.
    pub cpu: Duration,
}

pub fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is the
    // 14th field, stime the 15th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Usage {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu: Duration::from_nanos(ticks * 1_000_000_000 / hz),
    })
}

/// Samples a process' resident size every 20 ms on a thread, for the peak
/// over a window (VmHWM covers the whole life).
pub struct RssPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssPeak {
    pub fn start(pid: u32) -> RssPeak {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(u) = usage(pid) {
                    peak = peak.max(u.rss_kib);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        RssPeak { stop, thread }
    }

    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// One BPF map the process holds, from its fdinfo.
#[derive(Clone, Debug, Default)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u64,
    pub value_size: u64,
    pub max_entries: u64,
    /// What the kernel charges for it (its own estimate of the memory used).
    pub memlock: u64,
}

/// Every BPF map the process has open, by map id.
pub fn maps(pid: u32) -> Result<BTreeMap<u64, MapInfo>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if target.to_string_lossy() != "anon_inode:bpf-map" {
            continue;
        }
        let fd = entry.file_name();
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy())) else {
            continue;
        };
        let field = |key: &str| -> u64 {
            info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        };
        let id = field("map_id:");
        out.insert(
            id,
            MapInfo {
                map_type: field("map_type:") as u32,
                key_size: field("key_size:"),
                value_size: field("value_size:"),
                max_entries: field("max_entries:"),
                memlock: field("memlock:"),
            },
        );
    }
    Ok(out)
}

/// Runs `program` with `env` and `stdin` in the node's namespace, and
/// times it from spawn to exit. The thread that spawns has entered the
/// namespace, so the child needs no `nsenter`.
pub struct Timed {
    pub took: Duration,
    pub ok: bool,
    pub stdout: String,
    pub done: Instant,
}

/// Starts every command at once (as a container runtime starting many
/// sandboxes does), each timed from its spawn to its exit.
pub fn run_together(node: &Netns, commands: Vec<(Command, String)>) -> Result<Vec<Timed>> {
    let handle = node.spawn(move || -> Result<Vec<Timed>> {
        let mut waiting = Vec::new();
        for (mut cmd, stdin) in commands {
            let t = Instant::now();
            let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
            let mut input = child.stdin.take().context("stdin")?;
            waiting.push(std::thread::spawn(move || -> Result<Timed> {
                input.write_all(stdin.as_bytes())?;
                drop(input);
                let out = child.wait_with_output()?;
                let done = Instant::now();
                Ok(Timed {
                    took: done - t,
                    ok: out.status.success(),
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    done,
                })
            }));
        }
        waiting.into_iter().map(|w| w.join().map_err(|_| anyhow::anyhow!("a waiter panicked"))?).collect()
    })?;
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the spawner panicked"))?
        .context("entering the node namespace")?
}
