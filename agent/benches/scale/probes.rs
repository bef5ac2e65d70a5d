//! Packets as the judge: UDP probes from the prober pod to the local pods,
//! each from a fresh socket (a new flow, so every probe meets the policy
//! rather than a conntrack entry), and receivers in every local pod that
//! record which probes arrived.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use portcullis_testbed::Netns;

/// A probe is judged dropped once it has not arrived this long after it
/// was sent (a veth delivers in microseconds).
pub const LATE: Duration = Duration::from_millis(20);

/// Receivers in every target pod, on every port asked for; one thread
/// polls them all.
pub struct Receivers {
    arrived: Arc<Mutex<HashSet<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receivers {
    pub fn start(pods: &[&Netns], ports: &[u16]) -> Result<Receivers> {
        let mut sockets = Vec::new();
        for ns in pods {
            for &port in ports {
                let socket = ns
                    .run(move || UdpSocket::bind(("0.0.0.0", port)))?
                    .with_context(|| format!("binding UDP {port} in {}", ns.name()))?;
                socket.set_nonblocking(true)?;
                sockets.push(socket);
            }
        }
        let arrived = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, halt) = (arrived.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut fds: Vec<libc::pollfd> = sockets
                .iter()
                .map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            let mut buf = [0u8; 64];
            while !halt.load(Ordering::Relaxed) {
                // SAFETY: `fds` is a live array of pollfd for sockets we own.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
                if n <= 0 {
                    continue;
                }
                let mut got = Vec::new();
                for (fd, socket) in fds.iter_mut().zip(&sockets) {
                    if fd.revents == 0 {
                        continue;
                    }
                    fd.revents = 0;
                    while let Ok(len) = socket.recv(&mut buf) {
                        if len >= 8 {
                            got.push(u64::from_le_bytes(buf[..8].try_into().expect("8 bytes")));
                        }
                    }
                }
                seen.lock().expect("receiver lock").extend(got);
            }
        });
        Ok(Receivers { arrived, stop, thread: Some(thread) })
    }

    pub fn arrived(&self, id: u64) -> bool {
        self.arrived.lock().expect("receiver lock").contains(&id)
    }

    /// Which of `ids` arrived.
    pub fn which(&self, ids: impl Iterator<Item = u64>) -> Vec<bool> {
        let set = self.arrived.lock().expect("receiver lock");
        ids.map(|id| set.contains(&id)).collect()
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One probe sent: to which target (index into the sweep's list), on
/// which port, when.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub id: u64,
    pub target: usize,
    pub port: u16,
    pub at: Instant,
}

/// Probes sent in sweeps over every target, from the prober pod, until
/// stopped.
pub struct Sweeps {
    pub sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
/// The last source port used per target, across sweeps.
static LAST_PORT: Mutex<std::collections::BTreeMap<Ipv4Addr, u16>> =
    Mutex::new(std::collections::BTreeMap::new());

impl Sweeps {
    /// Sweeps `targets` × `ports` from `prober`, waiting `pause` between
    /// sweeps.
    pub fn start(prober: &Netns, targets: Vec<Ipv4Addr>, ports: Vec<u16>, pause: Duration) -> Result<Sweeps> {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log, halt) = (sent.clone(), stop.clone());
        let thread = prober.spawn(move || {
            // Source ports in turn per target, not the kernel's random pick:
            // a port used again soon after for the same target would be a
            // flow conntrack already knows, not a new one.
            let mut next_port: Vec<u16> = {
                let last = LAST_PORT.lock().expect("port lock");
                targets.iter().map(|ip| last.get(ip).copied().unwrap_or(0)).collect()
            };
            while !halt.load(Ordering::Relaxed) {
                let mut batch = Vec::with_capacity(targets.len() * ports.len());
                for (target, ip) in targets.iter().enumerate() {
                    for &port in &ports {
                        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                        let at = Instant::now();
                        // A new socket per probe: a new source port, a new flow.
                        let n = &mut next_port[target];
                        *n = (*n + 1) % 50000;
                        let source = 10000 + *n;
                        if let Ok(s) = UdpSocket::bind(("0.0.0.0", source)) {
                            let _ = s.send_to(&id.to_le_bytes(), SocketAddr::from((*ip, port)));
                        }
                        batch.push(Sent { id, target, port, at });
                    }
                }
                log.lock().expect("sweep lock").extend(batch);
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            let mut last = LAST_PORT.lock().expect("port lock");
            for (ip, n) in targets.iter().zip(next_port) {
                last.insert(*ip, n);
            }
        })?;
        Ok(Sweeps { sent, stop, thread: Some(thread) })
    }

    /// Stops, waits out late arrivals, and returns every probe sent.
    pub fn stop(mut self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::thread::sleep(LATE);
        std::mem::take(&mut *self.sent.lock().expect("sweep lock"))
    }

    /// The probes sent so far that are old enough to be judged.
    pub fn judged(&self) -> Vec<Sent> {
        let cutoff = Instant::now() - LATE;
        self.sent.lock().expect("sweep lock").iter().filter(|s| s.at <= cutoff).copied().collect()
    }
}

impl Drop for Sweeps {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When the first probe to `target` sent since `t0` arrived (an arrival
/// cannot be a fluke; a loss can, so "passing" is not asked to last).
pub fn first_arrival(probes: &[(Sent, bool)], target: usize, t0: Instant) -> Option<Duration> {
    probes.iter().find(|(s, ok)| *ok && s.target == target && s.at >= t0).map(|(s, _)| s.at - t0)
}

/// When `target` reached, and kept, the state `want` (arrived or not):
/// the send time of the first probe of the final run of probes in that
/// state, measured from `t0`. None if its last probe is not in it.
pub fn settled(probes: &[(Sent, bool)], target: usize, want: bool, t0: Instant) -> Option<Duration> {
    let mine: Vec<&(Sent, bool)> = probes.iter().filter(|(s, _)| s.target == target && s.at >= t0).collect();
    let last_wrong = mine.iter().rposition(|(_, ok)| *ok != want);
    let first_right = match last_wrong {
        Some(i) => mine.get(i + 1)?,
        None => mine.first()?,
    };
    Some(first_right.0.at - t0)
}

/// Whether every target's newest judged probe is in state `want`.
pub fn all_in(receivers: &Receivers, sweeps: &Sweeps, targets: usize, want: bool, since: Instant) -> bool {
    let judged = sweeps.judged();
    (0..targets).all(|t| {
        judged
            .iter()
            .rev()
            .find(|s| s.target == t && s.at >= since)
            .is_some_and(|s| receivers.arrived(s.id) == want)
    })
}
