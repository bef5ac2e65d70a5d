//! The agent's local API: HTTP/1.1 with JSON bodies on a root-only unix
//! socket (`curl --unix-socket` works). It serves the chained CNI plugin
//! (`POST /v1/cni/add` answers once the pod's endpoint is enforced,
//! `POST /v1/cni/del` forgets the sandbox) and `GET /v1/status`: what the
//! maps hold, so a test can wait for its own writes to be enforced.
//!
//! Requests go to the main loop over a channel; the loop owns all state.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
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

/// The answer to `GET /v1/status`: what the maps hold now.
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
}

/// What the main loop is asked.
#[derive(Debug)]
pub enum Request {
    CniAdd(CniAdd, oneshot::Sender<Result<CniReady, String>>),
    CniDel(CniDel),
    Status(oneshot::Sender<Status>),
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("creating the API socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
}

/// Binds the socket (its directory root-only) and serves until the
/// receiver side goes away.
pub fn serve(path: &Path, tx: mpsc::Sender<Request>) -> Result<tokio::task::JoinHandle<()>, ApiError> {
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
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(stream, tx).await {
                    tracing::debug!(error = %e, "API connection");
                }
            });
        }
    }))
}

async fn handle(stream: UnixStream, tx: mpsc::Sender<Request>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (method, path) =
        (parts.next().unwrap_or_default().to_owned(), parts.next().unwrap_or_default().to_owned());
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
    let mut stream = reader.into_inner();
    let bad = |e: serde_json::Error| serde_json::json!({"error": format!("invalid request body: {e}")});
    match (method.as_str(), path.as_str()) {
        ("POST", "/v1/cni/add") => {
            let add: CniAdd = match serde_json::from_slice(&body) {
                Ok(a) => a,
                Err(e) => return respond(stream, 400, &bad(e)).await,
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            if tx.send(Request::CniAdd(add, reply_tx)).await.is_err() {
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
        _ => respond(stream, 404, &serde_json::json!({"error": format!("no route {method} {path}")})).await,
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

async fn respond(mut stream: UnixStream, status: u16, body: &serde_json::Value) -> std::io::Result<()> {
    let body = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
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
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: portcullis\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn add_waits_for_the_loop_and_del_is_passed_on() {
        let dir = std::env::temp_dir().join(format!("portcullis-api-{}", std::process::id()));
        let socket = dir.join("agent.sock");
        let (tx, mut rx) = mpsc::channel(8);
        let server = serve(&socket, tx).unwrap();
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
            Request::CniAdd(got, reply) => {
                assert_eq!(got, add);
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
        let server = serve(&socket, tx).unwrap();
        let client = {
            let socket = socket.clone();
            tokio::task::spawn_blocking(move || get(&socket, "/v1/status", std::time::Duration::from_secs(5)))
        };
        let status = Status {
            source: "kube".into(),
            revision: Some(12),
            synced: true,
            resource_versions: BTreeMap::from([("Pod".into(), "4711".into())]),
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
