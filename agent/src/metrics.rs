//! The agent's Prometheus metrics: a plain snapshot the main loop fills in,
//! rendered in the text exposition format (version 0.0.4) and served over
//! a minimal HTTP/1.1 endpoint (`GET /metrics`), beside the kubelet's
//! probes (`GET /healthz`, `GET /readyz`, see `probes`). Hand-written
//! because the format is small and stable, and a client library would be a
//! new crate.
//!
//! The metrics listener is on the node's network, where every pod can
//! reach it: its connections are bounded per peer address and in all, and
//! idle ones make way for new ones (`Limits`), so no peer can keep another
//! waiting. The kubelet's probes have a listener of their own
//! (`serve_probes`), meant for a loopback address, which pods cannot reach.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Display,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};

use crate::probes::Progress;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label values for `Metrics::forwarded_*`, indexed like
/// `portcullis_common::DIR_INGRESS` / `DIR_EGRESS`.
pub const DIRECTIONS: [&str; 2] = ["ingress", "egress"];

/// Upper bounds (seconds) of the histogram buckets; `+Inf` is implied.
/// They span a sub-millisecond map write to a slow full recompile.
pub const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A duration histogram with the fixed `BUCKETS`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; observations above the last
    /// bound are only in `count` (the `+Inf` bucket).
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, seconds: f64) {
        // A duration is never NaN or negative; keeping one out keeps `_sum`
        // meaningful.
        if seconds.is_nan() || seconds < 0.0 {
            return;
        }
        if let Some(i) = BUCKETS.iter().position(|&le| seconds <= le) {
            self.buckets[i] += 1;
        }
        self.sum += seconds;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }
}

/// Drops of one direction (`ingress`/`egress`) for one reason (as
/// `flows::reason_name` spells it, e.g. `Policy denied`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCount {
    pub direction: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

/// How full one BPF map is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub capacity: u64,
}

/// Everything `render` prints: the main loop fills this in on request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Indexed by direction: 0 ingress, 1 egress (see `DIRECTIONS`).
    pub forwarded_packets: [u64; 2],
    pub forwarded_bytes: [u64; 2],
    pub drops: Vec<DropCount>,
    pub endpoints: u64,
    /// Endpoints whose last map write failed.
    pub endpoints_failed: u64,
    pub identities: u64,
    pub policies: u64,
    pub map_entries: Vec<MapFill>,
    pub conntrack_entries: u64,
    pub policy_compile_seconds: Histogram,
    pub map_write_seconds: Histogram,
    /// CNI ADDs, from the request read to the answer (the pod enforced).
    #[serde(default)]
    pub cni_add_seconds: Histogram,
    /// Per watched kind (`Pod`, `NetworkPolicy`, ...).
    pub watch_restarts: BTreeMap<String, u64>,
    /// None when the agent does not watch Kubernetes.
    pub api_server_connected: Option<bool>,
    pub last_sync_unix_seconds: Option<f64>,
    pub revision: u64,
    pub flow_events_seen: u64,
    /// The allocator's view of the heap: bytes in use, bytes free but kept
    /// (None where the allocator does not say).
    #[serde(default)]
    pub heap: Option<HeapBytes>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeapBytes {
    pub in_use: u64,
    pub free: u64,
}

impl HeapBytes {
    /// glibc's count over all its arenas and mapped chunks.
    pub fn now() -> Option<HeapBytes> {
        #[cfg(target_env = "gnu")]
        {
            // SAFETY: mallinfo2 only reads the allocator's own statistics.
            let m = unsafe { libc::mallinfo2() };
            Some(HeapBytes { in_use: (m.uordblks + m.hblkhd) as u64, free: m.fordblks as u64 })
        }
        #[cfg(not(target_env = "gnu"))]
        None
    }
}

/// The text exposition of `m`. Every family gets its HELP/TYPE lines even
/// with no samples, so dashboards see the name from the first scrape.
pub fn render(m: &Metrics) -> String {
    let mut r = Renderer(String::with_capacity(4096));

    r.family("portcullis_build_info", "gauge", "Agent build; the value is always 1.");
    r.sample("portcullis_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    for (name, values, help) in [
        ("portcullis_forwarded_packets_total", m.forwarded_packets, "Packets the datapath forwarded."),
        ("portcullis_forwarded_bytes_total", m.forwarded_bytes, "Bytes the datapath forwarded."),
    ] {
        r.family(name, "counter", help);
        for (direction, v) in DIRECTIONS.into_iter().zip(values) {
            r.sample(name, &[("direction", direction)], v);
        }
    }

    // Summed per label set: a duplicate series would make the scrape fail.
    let mut drops: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for d in &m.drops {
        let e = drops.entry((&d.direction, &d.reason)).or_default();
        e.0 = e.0.saturating_add(d.packets);
        e.1 = e.1.saturating_add(d.bytes);
    }
    r.family("portcullis_dropped_packets_total", "counter", "Packets the datapath dropped.");
    for (&(direction, reason), (packets, _)) in &drops {
        r.sample(
            "portcullis_dropped_packets_total",
            &[("direction", direction), ("reason", reason)],
            packets,
        );
    }
    r.family("portcullis_dropped_bytes_total", "counter", "Bytes the datapath dropped.");
    for (&(direction, reason), (_, bytes)) in &drops {
        r.sample("portcullis_dropped_bytes_total", &[("direction", direction), ("reason", reason)], bytes);
    }

    r.gauge("portcullis_endpoints", "Endpoints the agent enforces.", m.endpoints);
    r.gauge("portcullis_endpoints_failed", "Endpoints whose last map write failed.", m.endpoints_failed);
    r.gauge("portcullis_identities", "Security identities allocated.", m.identities);
    r.gauge("portcullis_policies", "NetworkPolicies known to the agent.", m.policies);

    r.family("portcullis_map_entries", "gauge", "Entries in a BPF map.");
    for f in &m.map_entries {
        r.sample("portcullis_map_entries", &[("map", &f.name)], f.entries);
    }
    r.family("portcullis_map_capacity", "gauge", "Maximum entries of a BPF map.");
    for f in &m.map_entries {
        r.sample("portcullis_map_capacity", &[("map", &f.name)], f.capacity);
    }
    r.gauge("portcullis_conntrack_entries", "Entries in the connection tracking map.", m.conntrack_entries);

    r.histogram(
        "portcullis_policy_compile_seconds",
        "Time to compile policy into endpoint state.",
        &m.policy_compile_seconds,
    );
    r.histogram(
        "portcullis_map_write_seconds",
        "Time to write compiled state to the BPF maps.",
        &m.map_write_seconds,
    );
    r.histogram(
        "portcullis_cni_add_seconds",
        "Time from a CNI ADD request read to its answer (the pod's endpoint enforced).",
        &m.cni_add_seconds,
    );

    r.family("portcullis_api_watch_restarts_total", "counter", "Kubernetes watch restarts, per kind.");
    for (kind, n) in &m.watch_restarts {
        r.sample("portcullis_api_watch_restarts_total", &[("kind", kind)], n);
    }
    r.family("portcullis_api_server_connected", "gauge", "1 if the Kubernetes API server is reachable.");
    if let Some(c) = m.api_server_connected {
        r.sample("portcullis_api_server_connected", &[], u8::from(c));
    }
    r.family(
        "portcullis_last_sync_timestamp_seconds",
        "gauge",
        "Unix time the maps were last brought in sync with the desired state.",
    );
    if let Some(t) = m.last_sync_unix_seconds {
        r.sample("portcullis_last_sync_timestamp_seconds", &[], float(t));
    }
    r.gauge("portcullis_revision", "Revision last written to the maps.", m.revision);
    r.family("portcullis_flow_events_total", "counter", "Flow events read from the datapath.");
    r.sample("portcullis_flow_events_total", &[], m.flow_events_seen);
    r.family(
        "portcullis_heap_bytes",
        "gauge",
        "The agent's heap: in use, and free but not given back to the kernel.",
    );
    if let Some(h) = m.heap {
        r.sample("portcullis_heap_bytes", &[("state", "in_use")], h.in_use);
        r.sample("portcullis_heap_bytes", &[("state", "free")], h.free);
    }
    r.0
}

struct Renderer(String);

impl Renderer {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.0 += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.0 += name;
        if !labels.is_empty() {
            let labels: Vec<String> =
                labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape_label(v))).collect();
            self.0 += &format!("{{{}}}", labels.join(","));
        }
        self.0 += &format!(" {value}\n");
    }

    fn gauge(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "gauge", help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.family(name, "histogram", help);
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (le, n) in BUCKETS.iter().zip(h.buckets) {
            cumulative += n;
            self.sample(&bucket, &[("le", &float(*le))], cumulative);
        }
        self.sample(&bucket, &[("le", "+Inf")], h.count);
        self.sample(&format!("{name}_sum"), &[], float(h.sum));
        self.sample(&format!("{name}_count"), &[], h.count);
    }
}

/// A float as the format spells it (Rust's `Display` never uses exponents,
/// which Prometheus parses fine, but has its own names for the specials).
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out += "\\\\",
            '"' => out += "\\\"",
            '\n' => out += "\\n",
            c => out.push(c),
        }
    }
    out
}

/// A request head larger than this is refused; a scrape needs a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// A body rendered for one scrape serves the scrapes that follow for this
/// long: the main loop is asked at most once in this time, however many
/// scrape (it answers between passes, and the answer has a cost).
const FRESH: Duration = Duration::from_secs(1);
/// How long a scrape waits for the main loop's snapshot before a 503.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an answered client has to hang up before we do.
const LINGER: Duration = Duration::from_secs(1);

/// What one listener admits. The listener on the node's network is
/// reachable from every pod, so no peer may hold what another needs: each
/// address holds at most `per_peer` connections, the listener `total`.
/// A connection that would exceed either takes the place of the oldest one
/// still waiting for its request head (that peer's, for `per_peer`), so
/// idle connections can delay no one; only if every connection in the way
/// is being answered is the new one closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections one address holds at once.
    pub per_peer: usize,
    /// Connections the listener holds at once.
    pub total: usize,
    /// Time a client has to send its whole request head.
    pub head_timeout: Duration,
    /// Time to answer once the head is read (snapshot and write).
    pub answer_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_peer: 4,
            total: 64,
            head_timeout: Duration::from_secs(2),
            answer_timeout: Duration::from_secs(10),
        }
    }
}

/// Binds `addr` and serves `/metrics` and the probes from it. The bind
/// error is returned so the caller decides whether metrics are worth
/// failing for.
pub async fn serve(
    addr: SocketAddr,
    snapshot: impl Fn() -> BoxFuture<'static, Option<Metrics>> + Send + Sync + 'static,
    progress: watch::Receiver<Progress>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(serve_listener(listener, snapshot, progress).await)
}

/// Serves `/metrics` and the probes on an already bound listener (tests
/// bind port 0), with the default `Limits`. `snapshot` returns None when no
/// snapshot can be had (the agent is stopping), answered with 503. The
/// probes read `progress` without asking the main loop, so they answer even
/// when it is stuck.
pub async fn serve_listener(
    listener: TcpListener,
    snapshot: impl Fn() -> BoxFuture<'static, Option<Metrics>> + Send + Sync + 'static,
    progress: watch::Receiver<Progress>,
) -> JoinHandle<()> {
    serve_listener_with(listener, snapshot, progress, Limits::default()).await
}

/// `serve_listener` with other `Limits`.
pub async fn serve_listener_with(
    listener: TcpListener,
    snapshot: impl Fn() -> BoxFuture<'static, Option<Metrics>> + Send + Sync + 'static,
    progress: watch::Receiver<Progress>,
    limits: Limits,
) -> JoinHandle<()> {
    let scraper = Scraper { snapshot: Box::new(snapshot), last: tokio::sync::Mutex::new(None), fresh: FRESH };
    spawn_server(listener, Routes::Metrics(Arc::new(scraper)), progress, limits)
}

/// Binds `addr` (meant to be a loopback address, which pods cannot reach)
/// and serves only the kubelet's probes, `/healthz` and `/readyz`, from it.
pub async fn serve_probes(
    addr: SocketAddr,
    progress: watch::Receiver<Progress>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(serve_probes_listener(listener, progress, Limits::default()).await)
}

/// `serve_probes` on an already bound listener.
pub async fn serve_probes_listener(
    listener: TcpListener,
    progress: watch::Receiver<Progress>,
    limits: Limits,
) -> JoinHandle<()> {
    spawn_server(listener, Routes::Probes, progress, limits)
}

/// What a listener answers.
#[derive(Clone)]
enum Routes {
    /// `/metrics` and the probes.
    Metrics(Arc<Scraper>),
    /// The probes alone.
    Probes,
}

type Snapshot = dyn Fn() -> BoxFuture<'static, Option<Metrics>> + Send + Sync;

struct Scraper {
    snapshot: Box<Snapshot>,
    /// The body last rendered, and when. Held while the main loop is asked,
    /// so scrapes arriving together wait for one answer instead of each
    /// asking.
    last: tokio::sync::Mutex<Option<(Instant, Arc<String>)>>,
    /// How long a body serves (`FRESH`).
    fresh: Duration,
}

impl Scraper {
    async fn body(&self) -> Option<Arc<String>> {
        let mut last = self.last.lock().await;
        if let Some((at, body)) = &*last
            && at.elapsed() < self.fresh
        {
            return Some(body.clone());
        }
        let body = Arc::new(render(&(self.snapshot)().await?));
        *last = Some((Instant::now(), body.clone()));
        Some(body)
    }
}

/// The connections one listener holds, oldest first (ids only grow), and
/// how many each address holds.
struct Admission {
    limits: Limits,
    next: u64,
    open: BTreeMap<u64, Slot>,
    per_peer: HashMap<IpAddr, usize>,
}

struct Slot {
    peer: IpAddr,
    /// True until its request head is read and again once it is answered:
    /// it may then be closed to make room.
    evictable: bool,
    /// Dropped to close the connection (its task waits on the receiver).
    _evict: oneshot::Sender<()>,
}

impl Admission {
    fn new(limits: Limits) -> Self {
        let limits = Limits { per_peer: limits.per_peer.max(1), total: limits.total.max(1), ..limits };
        Admission { limits, next: 0, open: BTreeMap::new(), per_peer: HashMap::new() }
    }

    /// Room for a connection from `peer`, made by closing the oldest
    /// evictable connection in the way: its id and the receiver that
    /// fires when it is closed in turn. None: refused.
    fn admit(&mut self, peer: IpAddr) -> Option<(u64, oneshot::Receiver<()>)> {
        if self.per_peer.get(&peer).is_some_and(|&n| n >= self.limits.per_peer) {
            let victim = self.open.iter().find(|(_, s)| s.peer == peer && s.evictable).map(|(&id, _)| id)?;
            self.remove(victim);
        }
        if self.open.len() >= self.limits.total {
            let victim = self.open.iter().find(|(_, s)| s.evictable).map(|(&id, _)| id)?;
            self.remove(victim);
        }
        let id = self.next;
        self.next += 1;
        let (evict, evicted) = oneshot::channel();
        self.open.insert(id, Slot { peer, evictable: true, _evict: evict });
        *self.per_peer.entry(peer).or_default() += 1;
        Some((id, evicted))
    }

    fn remove(&mut self, id: u64) {
        let Some(slot) = self.open.remove(&id) else { return };
        if let Some(n) = self.per_peer.get_mut(&slot.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&slot.peer);
            }
        }
    }

    fn set_evictable(&mut self, id: u64, evictable: bool) {
        if let Some(slot) = self.open.get_mut(&id) {
            slot.evictable = evictable;
        }
    }
}

fn lock(admission: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    admission.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connection's place in its listener's `Admission`, given up on drop.
struct Ticket {
    admission: Arc<Mutex<Admission>>,
    id: u64,
}

impl Ticket {
    fn evictable(&self, evictable: bool) {
        lock(&self.admission).set_evictable(self.id, evictable);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.admission).remove(self.id);
    }
}

/// The accept loop: it never waits for anything but the next connection,
/// so what one peer holds cannot keep another's connection in the backlog.
fn spawn_server(
    listener: TcpListener,
    routes: Routes,
    progress: watch::Receiver<Progress>,
    limits: Limits,
) -> JoinHandle<()> {
    let admission = Arc::new(Mutex::new(Admission::new(limits)));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: back off rather than spin.
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // An IPv4 peer of a dual-stack listener counts as itself.
            let admitted = lock(&admission).admit(peer.ip().to_canonical());
            let Some((id, evicted)) = admitted else {
                tracing::debug!(%peer, "metrics: connection refused: its address, or the listener, is full");
                continue; // dropping the stream closes it
            };
            let ticket = Ticket { admission: admission.clone(), id };
            let (routes, progress) = (routes.clone(), progress.clone());
            tokio::spawn(async move {
                tokio::select! {
                    biased;
                    _ = evicted => tracing::debug!(%peer, "metrics: idle connection closed to admit another"),
                    done = handle(stream, &ticket, &routes, &progress, &limits) => {
                        if let Err(e) = done {
                            tracing::debug!(%peer, "metrics: connection failed: {e}");
                        }
                    }
                }
            });
        }
    })
}

async fn handle(
    mut stream: TcpStream,
    ticket: &Ticket,
    routes: &Routes,
    progress: &watch::Receiver<Progress>,
    limits: &Limits,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(limits.head_timeout, read_head(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Ok(()), // too slow: just hang up
    };
    ticket.evictable(false);
    let answer = async {
        let (status, content_type, body) = match head {
            Some(head) => route(&head, routes, progress).await,
            None => (431, "text/plain", Arc::new("request head too large\n".to_owned())),
        };
        respond(&mut stream, status, content_type, &body).await
    };
    match tokio::time::timeout(limits.answer_timeout, answer).await {
        Ok(answered) => answered?,
        Err(_) => return Ok(()),
    }
    ticket.evictable(true);
    // Closing with unread input makes the kernel send a reset, which can
    // destroy the response before the client reads it: drain briefly first.
    let mut buf = [0u8; 1024];
    let drain = async { while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

async fn route(
    head: &str,
    routes: &Routes,
    progress: &watch::Receiver<Progress>,
) -> (u16, &'static str, Arc<String>) {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let text = |status, body: String| (status, "text/plain", Arc::new(body));
    match (method, path, routes) {
        ("GET", "/metrics", Routes::Metrics(scraper)) => {
            match tokio::time::timeout(SNAPSHOT_TIMEOUT, scraper.body()).await {
                Ok(Some(body)) => (200, CONTENT_TYPE, body),
                _ => text(503, "metrics unavailable\n".into()),
            }
        }
        ("GET", "/healthz" | "/readyz", _) => {
            let now = Instant::now();
            let verdict = {
                let progress = progress.borrow();
                if path == "/healthz" { progress.live(now) } else { progress.ready(now) }
            };
            match verdict {
                Ok(line) => text(200, line),
                Err(why) => text(503, format!("{why}\n")),
            }
        }
        (_, _, Routes::Metrics(_)) => text(404, "not found; try GET /metrics, /healthz or /readyz\n".into()),
        (_, _, Routes::Probes) => text(404, "not found; try GET /healthz or /readyz\n".into()),
    }
}

/// Reads up to the blank line ending the request head (a GET has no body).
/// None if the head exceeds `MAX_HEAD`; a peer that closes early gets what
/// it sent parsed, which at worst is a 404.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Ok(None);
        }
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(Some(String::from_utf8_lossy(&head).into_owned()))
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;

    fn filled() -> Metrics {
        let mut policy_compile_seconds = Histogram::new();
        for s in [0.0001, 0.002, 0.002, 0.3, 20.0] {
            policy_compile_seconds.observe(s);
        }
        Metrics {
            forwarded_packets: [10, 20],
            forwarded_bytes: [1000, 2000],
            drops: vec![
                DropCount {
                    direction: "egress".into(),
                    reason: "Policy denied".into(),
                    packets: 3,
                    bytes: 180,
                },
                DropCount {
                    direction: "egress".into(),
                    reason: "Policy denied".into(),
                    packets: 1,
                    bytes: 60,
                },
                DropCount {
                    direction: "ingress".into(),
                    reason: "odd \"quoted\" \\ reason\nline".into(),
                    packets: 2,
                    bytes: 5,
                },
            ],
            endpoints: 4,
            endpoints_failed: 1,
            identities: 7,
            policies: 3,
            map_entries: vec![MapFill { name: "policy".into(), entries: 12, capacity: 16384 }],
            conntrack_entries: 42,
            policy_compile_seconds,
            map_write_seconds: Histogram::new(),
            cni_add_seconds: Histogram::new(),
            watch_restarts: [("Pod".to_owned(), 2)].into(),
            api_server_connected: Some(true),
            last_sync_unix_seconds: Some(1700000000.5),
            revision: 9,
            flow_events_seen: 123,
            heap: Some(HeapBytes { in_use: 2048, free: 1024 }),
        }
    }

    #[test]
    fn render_has_the_expected_lines() {
        let text = render(&filled());
        let lines: Vec<&str> = text.lines().collect();
        let expected = [
            format!("portcullis_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
            "# HELP portcullis_forwarded_packets_total Packets the datapath forwarded.".into(),
            "# TYPE portcullis_forwarded_packets_total counter".into(),
            "portcullis_forwarded_packets_total{direction=\"ingress\"} 10".into(),
            "portcullis_forwarded_packets_total{direction=\"egress\"} 20".into(),
            "portcullis_forwarded_bytes_total{direction=\"egress\"} 2000".into(),
            "# TYPE portcullis_dropped_packets_total counter".into(),
            "portcullis_dropped_packets_total{direction=\"egress\",reason=\"Policy denied\"} 4".into(),
            "portcullis_dropped_bytes_total{direction=\"egress\",reason=\"Policy denied\"} 240".into(),
            "portcullis_dropped_packets_total{direction=\"ingress\",reason=\"odd \\\"quoted\\\" \\\\ reason\\nline\"} 2"
                .into(),
            "# TYPE portcullis_endpoints gauge".into(),
            "portcullis_endpoints 4".into(),
            "portcullis_endpoints_failed 1".into(),
            "portcullis_identities 7".into(),
            "portcullis_policies 3".into(),
            "portcullis_map_entries{map=\"policy\"} 12".into(),
            "portcullis_map_capacity{map=\"policy\"} 16384".into(),
            "portcullis_conntrack_entries 42".into(),
            "# TYPE portcullis_policy_compile_seconds histogram".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"0.0005\"} 1".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"0.001\"} 1".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"0.0025\"} 3".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"0.25\"} 3".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"0.5\"} 4".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"1\"} 4".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"10\"} 4".into(),
            "portcullis_policy_compile_seconds_bucket{le=\"+Inf\"} 5".into(),
            "portcullis_policy_compile_seconds_count 5".into(),
            "portcullis_map_write_seconds_bucket{le=\"+Inf\"} 0".into(),
            "portcullis_map_write_seconds_sum 0".into(),
            "portcullis_map_write_seconds_count 0".into(),
            "# TYPE portcullis_cni_add_seconds histogram".into(),
            "portcullis_cni_add_seconds_count 0".into(),
            "# TYPE portcullis_api_watch_restarts_total counter".into(),
            "portcullis_api_watch_restarts_total{kind=\"Pod\"} 2".into(),
            "portcullis_api_server_connected 1".into(),
            "portcullis_last_sync_timestamp_seconds 1700000000.5".into(),
            "portcullis_revision 9".into(),
            "# TYPE portcullis_flow_events_total counter".into(),
            "portcullis_flow_events_total 123".into(),
            "portcullis_heap_bytes{state=\"in_use\"} 2048".into(),
            "portcullis_heap_bytes{state=\"free\"} 1024".into(),
        ];
        for line in &expected {
            assert!(lines.contains(&line.as_str()), "missing {line:?} in\n{text}");
        }
        let sum =
            lines.iter().find_map(|l| l.strip_prefix("portcullis_policy_compile_seconds_sum ")).unwrap();
        assert!((sum.parse::<f64>().unwrap() - 20.3041).abs() < 1e-9, "{sum}");

        // Each family's HELP and TYPE exactly once; each series exactly once.
        for prefix in ["# HELP ", "# TYPE "] {
            let names: Vec<&str> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(prefix))
                .map(|l| l.split(' ').next().unwrap())
                .collect();
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(names.len(), unique.len(), "{prefix}repeated");
        }
        let series: Vec<&str> =
            lines.iter().filter(|l| !l.starts_with('#')).map(|l| l.rsplit_once(' ').unwrap().0).collect();
        let mut unique = series.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(series.len(), unique.len(), "a series is repeated");
    }

    #[test]
    fn empty_families_keep_help_and_type() {
        let text = render(&Metrics::default());
        for family in [
            "portcullis_dropped_packets_total",
            "portcullis_dropped_bytes_total",
            "portcullis_map_entries",
            "portcullis_api_watch_restarts_total",
            "portcullis_api_server_connected",
            "portcullis_last_sync_timestamp_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
            assert!(!text.lines().any(|l| l.starts_with(family)), "{family} has a sample");
        }
        assert!(text.contains("\nportcullis_forwarded_packets_total{direction=\"ingress\"} 0\n"));
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn histogram_ignores_nonsense() {
        let mut h = Histogram::new();
        h.observe(f64::NAN);
        h.observe(-1.0);
        h.observe(0.01);
        assert_eq!((h.count(), h.sum()), (1, 0.01));
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(1e-7), "0.0000001");
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let m = filled();
        let back: Metrics = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_metrics_and_404s_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = filled();
        let server = serve_listener(
            listener,
            move || {
                let m = m.clone();
                async move { Some(m) }.boxed()
            },
            progress().1,
        )
        .await;

        let r = get(addr, "GET /metrics HTTP/1.1\r\nhost: x\r\naccept: */*\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(&format!("\r\ncontent-type: {CONTENT_TYPE}\r\n")), "{r}");
        assert!(r.contains("\r\nconnection: close\r\n"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
        assert!(body.contains("\nportcullis_endpoints 4\n"), "{body}");

        let r = get(addr, "GET /metrics?x=1 HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");

        for request in
            ["GET /other HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\n\r\n", "POST /metrics HTTP/1.1\r\n\r\n"]
        {
            let r = get(addr, request).await;
            assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
            assert!(r.ends_with("/metrics, /healthz or /readyz\n"), "{r}");
        }

        let r = get(addr, &format!("GET /metrics HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(MAX_HEAD))).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        server.abort();
    }

    #[tokio::test]
    async fn no_snapshot_is_503() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve_listener(listener, || async { None }.boxed(), progress().1).await;
        let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        server.abort();
    }

    #[tokio::test]
    async fn serve_returns_the_bind_error() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        assert!(serve(addr, || async { None }.boxed(), progress().1).await.is_err());
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, last))
    }

    fn admission(per_peer: usize, total: usize) -> Admission {
        Admission::new(Limits { per_peer, total, ..Limits::default() })
    }

    #[test]
    fn a_full_address_gives_up_its_oldest_idle_connection() {
        let mut a = admission(2, 10);
        let (first, mut first_evicted) = a.admit(ip(1)).unwrap();
        let (second, _e2) = a.admit(ip(1)).unwrap();
        let (_other, _e3) = a.admit(ip(2)).unwrap();
        assert!(first_evicted.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        let (third, _e4) = a.admit(ip(1)).unwrap();
        // The oldest of that address was closed, no one else's.
        assert!(first_evicted.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        assert!(!a.open.contains_key(&first));
        assert_eq!(a.open.keys().copied().collect::<Vec<_>>(), vec![second, 2, third]);
        assert_eq!(a.per_peer[&ip(1)], 2);
        // Being answered, both: the next one from that address is refused.
        a.set_evictable(second, false);
        a.set_evictable(third, false);
        assert!(a.admit(ip(1)).is_none());
        assert!(a.admit(ip(3)).is_some());
        // One is answered: room again.
        a.remove(second);
        assert!(a.admit(ip(1)).is_some());
        assert_eq!(a.per_peer[&ip(1)], 2);
        assert_eq!(a.open.len(), a.per_peer.values().sum::<usize>());
    }

    #[test]
    fn a_full_listener_gives_up_its_oldest_idle_connection() {
        let mut a = admission(4, 3);
        let ids: Vec<u64> = (1..=3).map(|i| a.admit(ip(i)).unwrap().0).collect();
        a.set_evictable(ids[0], false);
        let (newest, _e) = a.admit(ip(9)).unwrap();
        // The oldest idle one went (the first is being answered).
        assert_eq!(a.open.keys().copied().collect::<Vec<_>>(), vec![ids[0], ids[2], newest]);
        assert!(!a.per_peer.contains_key(&ip(2)));
        for id in [ids[2], newest] {
            a.set_evictable(id, false);
        }
        assert!(a.admit(ip(10)).is_none());
        for id in [ids[0], ids[2], newest] {
            a.remove(id);
        }
        assert!(a.open.is_empty() && a.per_peer.is_empty());
    }

    #[tokio::test]
    async fn the_probes_listener_serves_only_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = progress();
        let server = serve_probes_listener(listener, rx, Limits::default()).await;
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("alive\n"), "{r}");
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 ") && r.contains("not enforcing yet"), "{r}");
        tx.send_modify(|p| p.revision = Some(2));
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        let r = get(addr, "GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 ") && r.ends_with("try GET /healthz or /readyz\n"), "{r}");
        server.abort();
    }

    #[tokio::test]
    async fn scrapes_within_a_second_ask_the_main_loop_once() {
        let scraper = |fresh| {
            let asked = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let counter = asked.clone();
            let snapshot = move || {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Some(Metrics { revision: n, ..Metrics::default() })
                }
                .boxed()
            };
            (Scraper { snapshot: Box::new(snapshot), last: tokio::sync::Mutex::new(None), fresh }, asked)
        };
        let revisions = |bodies: Vec<Option<Arc<String>>>| -> Vec<String> {
            let revision =
                |b: &str| b.lines().find_map(|l| l.strip_prefix("portcullis_revision ")).unwrap().to_owned();
            bodies.iter().map(|b| revision(b.as_ref().unwrap())).collect()
        };
        // Scrapes together: one asks, the others wait for its answer; and
        // while it is fresh, it serves the next ones too.
        let (fresh, asked) = scraper(Duration::from_secs(3600));
        let bodies = futures::future::join_all((0..3).map(|_| fresh.body())).await;
        assert_eq!(revisions(bodies), ["1", "1", "1"]);
        assert_eq!(revisions(vec![fresh.body().await]), ["1"]);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Stale at once: each asks, still one at a time.
        let (stale, asked) = scraper(Duration::ZERO);
        let bodies = futures::future::join_all((0..3).map(|_| stale.body())).await;
        assert_eq!(revisions(bodies), ["1", "2", "3"]);
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    fn progress() -> (watch::Sender<Progress>, watch::Receiver<Progress>) {
        watch::channel(Progress::starting(std::time::Instant::now()))
    }

    #[tokio::test]
    async fn probes_follow_the_published_progress() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = progress();
        let server = serve_listener(listener, || async { None }.boxed(), rx).await;
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("alive\n"), "{r}");
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 ") && r.contains("not enforcing yet"), "{r}");
        tx.send_modify(|p| {
            p.revision = Some(7);
            p.endpoints = 3;
        });
        let r = get(addr, "GET /readyz HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("enforcing revision 7 on 3 endpoint(s)\n"),
            "{r}"
        );
        tx.send_modify(|p| p.heartbeat -= crate::probes::STALL + std::time::Duration::from_secs(5));
        let r = get(addr, "GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 503 ") && r.contains("has not turned"), "{r}");
        server.abort();
    }
}
