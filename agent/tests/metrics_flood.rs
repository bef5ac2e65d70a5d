//! Issue 24: the metrics listener is also what the kubelet probes, and on
//! the node's network any pod can reach it. Idle connections from one
//! peer must never keep the probes or another peer's scrape from being
//! answered. Real sockets on loopback: the flooder binds 127.0.0.2 (all of
//! 127/8 is local on Linux), the others come from 127.0.0.1; no root
//! needed.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use futures::FutureExt as _;
use portcullis_agent::{
    metrics::{self, Metrics},
    probes::Progress,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

/// More than the old server's 32 slots, several times over: on the old
/// server a request queued behind these waited for three rounds of its
/// 5 s head timeout.
const FLOOD: usize = 128;
/// Connections one address may hold at once (`metrics::Limits`' default).
const PER_PEER: usize = 4;
/// What a response may take here, however loaded the machine: generous.
const PROMPTLY: Duration = Duration::from_secs(10);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// `path` asked from `source`: the response, or a panic if none comes
/// within `PROMPTLY`.
async fn get_from(source: IpAddr, to: SocketAddr, path: &str) -> String {
    let exchange = async {
        let mut stream = connect_from(source, to).await?;
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: node\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response)
    };
    match tokio::time::timeout(PROMPTLY, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("GET {path} from {source}: {e}"),
        Err(_) => panic!("GET {path} from {source}: no answer within {PROMPTLY:?}"),
    }
}

/// `n` idle connections from `source`: connected, never a byte sent.
async fn flood(source: IpAddr, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(connect_from(source, to).await.expect("the kernel completes the handshake"));
    }
    held
}

/// Is `stream` closed by the server (end of stream or reset), without
/// waiting?
fn closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Waits (up to `PROMPTLY`) until at least `n` of `held` are closed by
/// the server; how many are.
async fn wait_closed(held: &[TcpStream], n: usize) -> usize {
    let deadline = Instant::now() + PROMPTLY;
    loop {
        let count = held.iter().filter(|s| closed(s)).count();
        if count >= n || Instant::now() > deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn enforcing() -> (watch::Sender<Progress>, watch::Receiver<Progress>) {
    let mut p = Progress::starting(std::time::Instant::now());
    p.revision = Some(7);
    p.endpoints = 3;
    watch::channel(p)
}

fn snapshot() -> futures::future::BoxFuture<'static, Option<Metrics>> {
    async { Some(Metrics { endpoints: 4, ..Metrics::default() }) }.boxed()
}

fn assert_scraped(r: &str) {
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.contains("\nportcullis_endpoints 4\n"), "{r}");
}

fn assert_ready(r: &str) {
    assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
    assert!(r.ends_with("enforcing revision 7 on 3 endpoint(s)\n"), "{r}");
}

/// The listener as the agent serves it today (`--metrics-address`, with
/// the probes on it too, for compatibility): the flooder holds every
/// connection it can; a scrape and the probes from another address are
/// answered all the same, and the flooder keeps at most its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_holding_idle_connections_starves_neither_probes_nor_scrapes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_progress, progress) = enforcing();
    let server = metrics::serve_listener(listener, snapshot, progress).await;

    let held = flood(ip(2), addr, FLOOD).await;
    assert_scraped(&get_from(ip(1), addr, "/metrics").await);
    assert_ready(&get_from(ip(1), addr, "/readyz").await);
    assert!(get_from(ip(1), addr, "/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));

    // Its extra connections were closed (without the 5 s of the old head
    // timeout per 32 of them): it keeps at most its per-address share.
    let n = wait_closed(&held, FLOOD - PER_PEER).await;
    assert!(n >= FLOOD - PER_PEER, "only {n} of the flood's {FLOOD} closed");
    server.abort();
}

/// Tests' limits: the default shares, but a head timeout long enough that
/// any connection closed here was closed to make room, not for slowness.
fn patient() -> metrics::Limits {
    metrics::Limits { head_timeout: Duration::from_secs(120), ..metrics::Limits::default() }
}

/// The probes' own listener (on loopback in the DaemonSet, which pods
/// cannot reach): flooded from another address and from the kubelet's own
/// (a process on the node's network can use 127.0.0.1 too), the probes are
/// answered, and each flood keeps its newest connections and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probes_listener_answers_through_floods_even_from_its_own_address() {
    assert_eq!(metrics::Limits::default().per_peer, PER_PEER);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_progress, progress) = enforcing();
    let server = metrics::serve_probes_listener(listener, progress, patient()).await;

    let other = flood(ip(2), addr, FLOOD).await;
    let own = flood(ip(1), addr, FLOOD).await;
    assert_ready(&get_from(ip(1), addr, "/readyz").await);
    assert!(get_from(ip(1), addr, "/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(get_from(ip(1), addr, "/metrics").await.starts_with("HTTP/1.1 404 "));

    // The other address: all but its newest PER_PEER closed, those open.
    let n = wait_closed(&other, FLOOD - PER_PEER).await;
    assert_eq!(n, FLOOD - PER_PEER, "of the flood's {FLOOD}");
    let (gone, kept) = other.split_at(FLOOD - PER_PEER);
    assert!(gone.iter().all(closed) && !kept.iter().any(closed));
    // The kubelet's address: the probes took the places of its idle ones.
    let n = wait_closed(&own, FLOOD - PER_PEER).await;
    assert!(n >= FLOOD - PER_PEER, "only {n} of the flood's {FLOOD} closed");
    server.abort();
}

/// Many addresses, each within its share, together holding more than the
/// listener's total: a scrape from yet another address is answered, and
/// the listener holds no more than its total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_starves_no_other_scraper() {
    let limits = metrics::Limits { total: 16, ..patient() };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_progress, progress) = enforcing();
    let server = metrics::serve_listener_with(listener, snapshot, progress, limits).await;

    let mut held = Vec::new();
    for peer in 2..12 {
        held.extend(flood(ip(peer), addr, PER_PEER).await);
    }
    assert_scraped(&get_from(ip(1), addr, "/metrics").await);
    assert_ready(&get_from(ip(1), addr, "/readyz").await);

    let n = wait_closed(&held, held.len() - limits.total).await;
    assert!(n >= held.len() - limits.total, "only {n} of {} closed", held.len());
    server.abort();
}
