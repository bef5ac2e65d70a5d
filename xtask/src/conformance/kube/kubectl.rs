//! kubectl against the test cluster, JSON in and out. While the API server
//! cannot be reached (restarted, or stopped by another test for a while) a
//! call waits and retries instead of failing the case; every call here may
//! run twice (apply, merge patches, deletes that ignore what is gone).

use std::{
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::{cluster::Paths, interrupted};

/// How long a call keeps retrying an API server that does not answer.
const UNREACHABLE_FOR: Duration = Duration::from_secs(300);

pub struct Kubectl {
    paths: Paths,
}

impl Kubectl {
    pub fn new(paths: Paths) -> Self {
        Kubectl { paths }
    }

    /// `kubectl ARGS` with `stdin` fed to it: its stdout.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
        let started = Instant::now();
        let mut said = false;
        loop {
            let mut child = self
                .paths
                .kubectl()
                .args(args)
                .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running kubectl")?;
            if let Some(input) = stdin {
                // kubectl reads all its input before it writes anything.
                child
                    .stdin
                    .take()
                    .context("kubectl's stdin")?
                    .write_all(input)
                    .context("writing to kubectl")?;
            }
            let out = child.wait_with_output().context("waiting for kubectl")?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if !unreachable(&err) || started.elapsed() > UNREACHABLE_FOR || interrupted() {
                bail!("kubectl {}: {err}", args.join(" "));
            }
            if !said {
                eprintln!(
                    "conformance: the API server does not answer, retrying: {}",
                    err.lines().next().unwrap_or("")
                );
                said = true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all, None)?;
        serde_json::from_str(&text).with_context(|| format!("kubectl {}: unreadable output", args.join(" ")))
    }

    /// Creates the objects, or updates them to what is given (in order:
    /// namespaces before what goes in them). Returns them as the API server
    /// stored them.
    pub fn apply(&self, objects: &[Value]) -> Result<Vec<Value>> {
        if objects.is_empty() {
            return Ok(Vec::new());
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        let text = self.run(&["apply", "-f", "-", "-o", "json"], Some(list.to_string().as_bytes()))?;
        let out: Value = serde_json::from_str(&text).context("kubectl apply: unreadable output")?;
        Ok(match out["items"].as_array() {
            Some(items) if out["kind"] == "List" => items.clone(),
            _ => vec![out],
        })
    }

    /// A JSON merge patch on `kind/name`; the object after it.
    pub fn patch(&self, kind: &str, namespace: Option<&str>, name: &str, patch: &Value) -> Result<Value> {
        let target = format!("{kind}/{name}");
        let patch = patch.to_string();
        let mut args = vec!["patch", &target, "--type", "merge", "-p", &patch];
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.json(&args)
    }

    /// Deletes, without waiting for them to be gone (the runner waits only
    /// when it needs a name again). Pods go from the API at once: kubelet
    /// 1.20 takes some 10 s to confirm a pod's end even with a grace period
    /// of 1 s, and nothing needs to see these pods end.
    pub fn delete(&self, resource: &str, namespace: Option<&str>, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["delete", resource, "--ignore-not-found", "--wait=false"];
        if resource == "pod" {
            args.extend(["--grace-period=0", "--force"]);
        }
        args.extend(names.iter().map(String::as_str));
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        self.run(&args, None).map(drop)
    }

    /// Waits until none of the named objects exists.
    pub fn wait_gone(
        &self,
        kind: &str,
        namespace: Option<&str>,
        names: &[String],
        timeout: Duration,
    ) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        let mut args = vec!["get", kind, "--ignore-not-found", "-o", "name"];
        args.extend(names.iter().map(String::as_str));
        if let Some(ns) = namespace {
            args.extend(["-n", ns]);
        }
        let started = Instant::now();
        loop {
            let left = self.run(&args, None)?;
            if left.trim().is_empty() {
                return Ok(());
            }
            if interrupted() {
                bail!("interrupted");
            }
            if started.elapsed() > timeout {
                bail!(
                    "still there after {}s: {}",
                    timeout.as_secs(),
                    left.split_whitespace().collect::<Vec<_>>().join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Whether kubectl failed because the API server could not be reached (or
/// could not answer for now), as opposed to refusing the request.
fn unreachable(stderr: &str) -> bool {
    const SIGNS: [&str; 11] = [
        "connection refused",
        "was refused",
        "Unable to connect to the server",
        "the server is currently unable to handle the request",
        "the server was unable to return a response",
        "TLS handshake timeout",
        "i/o timeout",
        "connection reset by peer",
        "unexpected EOF",
        "etcdserver: ",
        "http2: server sent GOAWAY",
    ];
    SIGNS.iter().any(|s| stderr.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_api_server_is_told_from_a_refused_request() {
        for retried in [
            "The connection to the server 192.0.2.2:6443 was refused - did you specify the right host or port?",
            "Unable to connect to the server: dial tcp 192.0.2.2:6443: connect: connection refused",
            "Error from server (ServiceUnavailable): the server is currently unable to handle the request",
            "Error from server: etcdserver: request timed out",
            "Unable to connect to the server: net/http: TLS handshake timeout",
        ] {
            assert!(unreachable(retried), "{retried}");
        }
        for refused in [
            "Error from server (NotFound): pods \"a\" not found",
            "Error from server (AlreadyExists): namespaces \"x\" already exists",
            "error: error validating \"STDIN\": error validating data: ValidationError(NetworkPolicy.spec): unknown field",
            "The NetworkPolicy \"p\" is invalid: spec.ingress[0].from[0].ipBlock.cidr: Invalid value",
        ] {
            assert!(!unreachable(refused), "{refused}");
        }
    }
}
