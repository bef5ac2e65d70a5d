//! The agent's local API: HTTP/1.1 with JSON bodies on a root-only unix
//! socket (`curl --unix-socket` works). It serves the chained CNI plugin
//! (`POST /v1/cni/add` answers once the pod's endpoint is enforced,
//! `POST /v1/cni/del` forgets the sandbox), `GET /v1/status` (what the maps
//! hold, so a test can wait for its own writes to be enforced), and the
//! operator tools: `GET /v1/endpoints[/ID|/NS/POD]`, `/v1/identities`,
//! `/v1/ct?endpoint=&ip=&port=&protocol=`, `POST /v1/trace`, `GET /metrics`,
//! and `POST /v1/flows` (a `FlowQuery`; or `GET /v1/flows?last=N&follow=1`),
//! which streams flows as JSON lines.
//!
//! Requests go to the main loop over a channel; the loop owns all state.
//! Flows are served from the flow store without it.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    flows::{filter::FlowQuery, store::FlowStore},
    inspect::{CtFilter, Failure, TraceRequest},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

pub const DEFAULT_SOCKET: &str = "/var/run/portcullis/agent.sock";

/// A pod the CNI plugin is starting, as its main plugin wired it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniAdd {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    /// Host-side interface.
    pub interface: String,
    pub ips: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniDel {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
}

/// The answer to an ADD: the endpoint id it is enforced as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniReady {
    pub endpoint_id: u16,
}

/// The answer to `GET /v1/status`: what the maps hold now, and the agent's
/// health.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Where the agent learns objects: `kube`, `manifests` or `state`.
    pub source: String,
    /// The revision last written to the maps (the `enforced revision N`
    /// line); none before the first.
    pub revision: Option<u64>,
    /// `kube`: every kind has been listed once (nothing is applied before).
    pub synced: bool,
    /// `kube`: per watched kind (`Namespace`, `Pod`, `NetworkPolicy`,
    /// `Service`), the newest resourceVersion the agent has received and
    /// enforced: the maps are written for a state that contains it and
    /// everything before it on that kind's watch. Absent until the kind has
    /// an object.
    pub resource_versions: BTreeMap<String, String>,
    /// The rest is for `agent status`; absent from agents before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
}

/// `agent status` beyond what tests wait on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub node: String,
    /// `kube`: the watches' connection to the API server.
    pub api_server: Option<ApiServerHealth>,
    /// RFC 3339 time of the last write to the maps.
    pub last_enforced: Option<String>,
    pub endpoints: usize,
    pub endpoints_failed: usize,
    pub policies: usize,
    pub identities: usize,
    pub maps: Vec<crate::metrics::MapFill>,
    pub forwarded_packets: u64,
    pub drops: Vec<crate::inspect::DropCount>,
    /// Why endpoints could not be written (retried every second).
    pub errors: Vec<String>,
    pub flows_seen: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiServerHealth {
    /// False from a watch error until the next successful list or event.
    pub connected: bool,
    pub watch_restarts: u64,
    pub last_error: Option<String>,
    /// Milliseconds since the last event or list from any watch.
    pub last_event_ms_ago: Option<u64>,
}

/// What the main loop is asked.
#[derive(Debug)]
pub enum Request {
    /// With when its request was read: the wait is part of a pod's start.
    CniAdd(CniAdd, std::time::Instant, oneshot::Sender<Result<CniReady, String>>),
    CniDel(CniDel),
    Status(oneshot::Sender<Status>),
    Inspect(Query, oneshot::Sender<Result<Answer, Failure>>),
}

/// An operator tool's question for the main loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    Endpoints,
    /// By id or `namespace/pod`.
    Endpoint(String),
    Identities,
    Conntrack(CtFilter),
    Trace(TraceRequest),
    Metrics,
}

#[derive(Debug)]
pub enum Answer {
    Json(serde_json::Value),
    /// Rendered as Prometheus text.
    Metrics(Box<crate::metrics::Metrics>),
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("creating the API socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
}

/// Work a CNI ADD allows before the loop takes it (on a blocking thread,
/// while the request would wait in the queue anyway): what it does must
/// not change what the pod may send or receive.
pub type Prepare = std::sync::Arc<dyn Fn(&CniAdd) + Send + Sync>;

/// Binds the socket (its directory root-only) and serves until the
/// receiver side goes away.
pub fn serve(
    path: &Path,
    tx: mpsc::Sender<Request>,
    flows: FlowStore,
    prepare: Option<Prepare>,
) -> Result<tokio::task::JoinHandle<()>, ApiError> {
    let err = |source| ApiError::Socket { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    // A socket left by an earlier agent.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let (tx, flows, prepare) = (tx.clone(), flows.clone(), prepare.clone());
            tokio::spawn(async move {
                if let Err(e) = handle(stream, tx, flows, prepare).await {
                    tracing::debug!(error = %e, "API connection");
                }
            });
        }
    }))
}

async fn handle(
    stream: UnixStream,
    tx: mpsc::Sender<Request>,
    flows: FlowStore,
    prepare: Option<Prepare>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (method, target) =
        (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned());
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.clone(), String::new()),
    };
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    if length > 1 << 20 {
        return respond(reader.into_inner(), 413, &serde_json::json!({"error": "body too large"})).await;
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).await?;
    let received = std::time::Instant::now();
    let mut stream = reader.into_inner();
    let bad = |e: serde_json::Error| serde_json::json!({"error": format!("invalid request body: {e}")});
    match (method.as_str(), path.as_str()) {
        ("POST", "/v1/cni/add") => {
            let add: CniAdd = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => return respond(stream, 400, &bad(e)).await,
            };
            if let Some(prepare) = prepare {
                let add = add.clone();
                let _ = tokio::task::spawn_blocking(move || prepare(&add)).await;
            }
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(Request::CniAdd(add, received, reply_tx)).await.is_err() {
                return respond(stream, 503, &serde_json::json!({"error": "agent stopping"})).await;
            }
            // The caller's own timeout bounds the wait; if it hangs up, the
            // loop sees the closed channel and drops the request.
            let reply = tokio::select! {
                r = reply_rx => r,
                _ = wait_closed(&mut stream) => return Ok(()),
            };
            match reply {
                Ok(Ok(ready)) => respond(stream, 200, &serde_json::to_value(ready)?).await,
                Ok(Err(e)) => respond(stream, 503, &serde_json::json!({"error": e})).await,
                Err(_) => respond(stream, 503, &serde_json::json!({"error": "agent stopping"})).await,
            }
        }
        ("POST", "/v1/cni/del") => match serde_json::from_slice::<CniDel>(&body) {
            Ok(del) => {
                let _ = tx.send(Request::CniDel(del)).await;
                respond(stream, 200, &serde_json::json!({})).await
            }
            Err(e) => respond(stream, 400, &bad(e)).await,
        },
        ("GET", "/v1/status") => {
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(Request::Status(reply_tx)).await.is_err() {
                return respond(stream, 503, &serde_json::json!({"error": "agent stopping"})).await;
            }
            match reply_rx.await {
                Ok(status) => respond(stream, 200, &serde_json::to_value(status)?).await,
                Err(_) => respond(stream, 503, &serde_json::json!({"error": "agent stopping"})).await,
            }
        }
        (_, "/v1/flows") | (_, "/v1/flows/") => {
            let query = if method == "POST" && !body.is_empty() {
                match serde_json::from_slice::<FlowQuery>(&body) {
                    Ok(q) => q,
                    Err(e) => return respond(stream, 400, &bad(e)).await,
                }
            } else {
                FlowQuery {
                    last: param(&query, "last").and_then(|v| v.parse().ok()).or(Some(20)),
                    follow: param(&query, "follow").is_some_and(|v| v != "0" && v != "false"),
                    ..Default::default()
                }
            };
            stream_flows(stream, flows, query).await
        }
        ("GET", _) => {
            let ask = match path.as_str() {
                "/v1/endpoints" | "/v1/endpoints/" => Query::Endpoints,
                "/v1/identities" => Query::Identities,
                "/metrics" => Query::Metrics,
                "/v1/ct" => Query::Conntrack(CtFilter {
                    endpoint: param(&query, "endpoint"),
                    ip: match param(&query, "ip").map(|v| v.parse()) {
                        None => None,
                        Some(Ok(ip)) => Some(ip),
                        Some(Err(_)) => return respond(stream, 400, &error_json("ip: not an address")).await,
                    },
                    port: match param(&query, "port").map(|v| v.parse()) {
                        None => None,
                        Some(Ok(p)) => Some(p),
                        Some(Err(_)) => return respond(stream, 400, &error_json("port: not a port")).await,
                    },
                    protocol: param(&query, "protocol"),
                    limit: match param(&query, "limit").map(|v| v.parse()) {
                        None => None,
                        Some(Ok(n)) => Some(n),
                        Some(Err(_)) => {
                            return respond(stream, 400, &error_json("limit: not a number")).await;
                        }
                    },
                }),
                p => match p.strip_prefix("/v1/endpoints/") {
                    Some(which) if !which.is_empty() => Query::Endpoint(percent_decode(which)),
                    _ => {
                        return respond(stream, 404, &error_json(&format!("no route {method} {path}"))).await;
                    }
                },
            };
            ask_loop(stream, &tx, ask).await
        }
        ("POST", "/v1/trace") => match serde_json::from_slice::<TraceRequest>(&body) {
            Ok(req) => ask_loop(stream, &tx, Query::Trace(req)).await,
            Err(e) => respond(stream, 400, &bad(e)).await,
        },
        _ => respond(stream, 404, &error_json(&format!("no route {method} {path}"))).await,
    }
}

fn error_json(message: &str) -> serde_json::Value {
    serde_json::json!({ "error": message })
}

/// A query-string parameter, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asks the main loop and answers with what it says.
async fn ask_loop(stream: UnixStream, tx: &mpsc::Sender<Request>, query: Query) -> std::io::Result<()> {
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send(Request::Inspect(query, reply_tx)).await.is_err() {
        return respond(stream, 503, &error_json("agent stopping")).await;
    }
    match reply_rx.await {
        Ok(Ok(Answer::Json(value))) => respond(stream, 200, &value).await,
        Ok(Ok(Answer::Metrics(m))) => {
            respond_raw(stream, 200, crate::metrics::CONTENT_TYPE, crate::metrics::render(&m).as_bytes())
                .await
        }
        Ok(Err(f)) => respond(stream, f.status, &error_json(&f.message)).await,
        Err(_) => respond(stream, 503, &error_json("agent stopping")).await,
    }
}

/// Streams the stored flows the query wants, then (with `follow`) every new
/// one, as JSON lines, until the client hangs up. A follower that falls too
/// far behind gets `{"lost": N}` lines.
async fn stream_flows(stream: UnixStream, flows: FlowStore, query: FlowQuery) -> std::io::Result<()> {
    let (stored, mut live) = flows.snapshot(query.last, |f| query.matches(f));
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    for f in stored {
        serde_json::to_writer(&mut buf, &*f)?;
        buf.push(b'\n');
    }
    write.write_all(&buf).await?;
    if !query.follow {
        return write.shutdown().await;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            got = live.recv() => {
                let line = match got {
                    Ok(f) if query.matches(&f) => serde_json::to_vec(&*f)?,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        serde_json::to_vec(&serde_json::json!({ "lost": n }))?
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return write.shutdown().await,
                };
                write.write_all(&line).await?;
                write.write_all(b"\n").await?;
            }
            // The client hung up (or sent something): stop.
            _ = read.read(&mut probe) => return Ok(()),
        }
    }
}

/// Resolves when the peer closes its end (it gave up waiting).
async fn wait_closed(stream: &mut UnixStream) {
    let mut buf = [0u8; 1];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

async fn respond(stream: UnixStream, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    respond_raw(stream, status, "application/json", body.to_string().as_bytes()).await
}

async fn respond_raw(
    mut stream: UnixStream,
    status: u16,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// A blocking client for one request (the CNI plugin is short-lived and
/// synchronous). Returns the status and the body.
pub fn call(
    socket: &Path,
    path: &str,
    body: &impl Serialize,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, serde_json::Value)> {
    request(socket, "POST", path, Some(serde_json::to_vec(body)?), timeout)
}

/// `GET path` as a blocking client: the status and the body.
pub fn get(
    socket: &Path,
    path: &str,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, serde_json::Value)> {
    request(socket, "GET", path, None, timeout)
}

fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: std::time::Duration,
) -> std::io::Result<(u16, serde_json::Value)> {
    let (status, text) = fetch(socket, method, path, body, Some(timeout))?;
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

/// One request as a blocking client: the status and the body as text
/// (`timeout`: per read and write; none waits as long as it takes).
pub fn fetch(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<(u16, String)> {
    use std::io::Read as _;
    let mut stream = send(socket, method, path, body, timeout)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// A request whose answer is JSON lines (`/v1/flows`): calls `line` with
/// each as it arrives until it returns false or the agent closes. A status
/// other than 200 comes back as `Err((status, body))`.
pub fn stream_lines(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    mut line: impl FnMut(&str) -> bool,
) -> std::io::Result<Result<(), (u16, String)>> {
    use std::io::{BufRead as _, Read as _};
    let stream = send(socket, method, path, body, None)?;
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line)?;
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    if status != 200 {
        let mut rest = String::new();
        reader.read_to_string(&mut rest)?;
        return Ok(Err((status, rest)));
    }
    let mut text = String::new();
    loop {
        text.clear();
        if reader.read_line(&mut text)? == 0 || !line(text.trim_end()) {
            return Ok(Ok(()));
        }
    }
}

fn send(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Option<std::time::Duration>,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: portcullis\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn add_waits_for_the_loop_and_del_is_passed_on() {
        let dir = std::env::temp_dir().join(format!("portcullis-api-{}", std::process::id()));
        let socket = dir.join("agent.sock");
        let (tx, mut rx) = mpsc::channel(8);
        // The ADD's interface is readied before the loop sees the request.
        let prepared = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = prepared.clone();
        let prepare: Prepare = std::sync::Arc::new(move |add: &CniAdd| {
            seen.lock().unwrap().push(add.interface.clone());
        });
        let server = serve(&socket, tx, FlowStore::new(16), Some(prepare)).unwrap();
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "root-only socket");

        let add = CniAdd {
            namespace: "x".into(),
            name: "web".into(),
            container_id: "c1".into(),
            interface: "veth1".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
        };
        let client = {
            let (socket, add) = (socket.clone(), add.clone());
            tokio::task::spawn_blocking(move || {
                call(&socket, "/v1/cni/add", &add, std::time::Duration::from_secs(5))
            })
        };
        match rx.recv().await.unwrap() {
            Request::CniAdd(got, _, reply) => {
                assert_eq!(got, add);
                assert_eq!(*prepared.lock().unwrap(), ["veth1"]);
                reply.send(Ok(CniReady { endpoint_id: 7 })).unwrap();
            }
            other => panic!("{other:?}"),
        }
        let (status, body) = client.await.unwrap().unwrap();
        assert_eq!((status, body["endpoint_id"].as_u64()), (200, Some(7)));

        let del = CniDel { namespace: "x".into(), name: "web".into(), container_id: "c1".into() };
        let client = {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || {
                call(&socket, "/v1/cni/del", &del, std::time::Duration::from_secs(5))
            })
        };
        assert!(matches!(rx.recv().await.unwrap(), Request::CniDel(d) if d.container_id == "c1"));
        assert_eq!(client.await.unwrap().unwrap().0, 200);

        let (status, _) = tokio::task::spawn_blocking({
            let socket = socket.clone();
            move || call(&socket, "/v1/nothing", &(), std::time::Duration::from_secs(5))
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(status, 404);
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn status_is_answered_by_the_loop() {
        let dir = std::env::temp_dir().join(format!("portcullis-api-status-{}", std::process::id()));
        let socket = dir.join("agent.sock");
        let (tx, mut rx) = mpsc::channel(8);
        let server = serve(&socket, tx, FlowStore::new(16), None).unwrap();
        let client = {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || get(&socket, "/v1/status", std::time::Duration::from_secs(5)))
        };
        let status = Status {
            source: "kube".into(),
            revision: Some(12),
            synced: true,
            resource_versions: BTreeMap::from([("Pod".into(), "4711".into())]),
            health: None,
        };
        match rx.recv().await.unwrap() {
            Request::Status(reply) => reply.send(status.clone()).unwrap(),
            other => panic!("{other:?}"),
        }
        let (code, body) = client.await.unwrap().unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            body,
            serde_json::json!({
                "source": "kube", "revision": 12, "synced": true,
                "resource_versions": {"Pod": "4711"},
            })
        );
        assert_eq!(serde_json::from_value::<Status>(body).unwrap(), status);
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
