//! The chained CNI plugin (`type: portcullis`, after the main plugin in the
//! node's CNI configuration; [`install`] puts it there). The agent binary
//! runs as the plugin when the container runtime calls it (`CNI_COMMAND`
//! set, no arguments).
//!
//! ADD waits until the agent enforces the pod's endpoint (programs attached
//! to its host-side interface, its policy in the maps) and only then passes
//! the main plugin's result on: the pod's containers start after that, so
//! no packet leaves or reaches it unjudged. If the agent does not answer in
//! time, ADD fails and the runtime tears the sandbox down and retries:
//! fail closed. DEL never fails (a sandbox must always be removable).

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};
use thiserror::Error;

use crate::api::{self, CniAdd, CniDel};

mod install;
pub use install::{InstallError, install, is_chained, uninstall, wait_for_conflist};

/// The plugin's type in a conflist, and its file name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "portcullis";
/// The plugin's own binary, beside the agent's (the image's `/usr/bin`).
pub const PLUGIN_BINARY: &str = "portcullis-cni";
const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The plugin's network configuration (stdin).
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    /// The agent's API socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// How long ADD waits for the agent (default 30 s).
    #[serde(rename = "timeoutSeconds", default)]
    timeout_seconds: Option<u64>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

/// A CNI error: printed as the spec's error object, exit status 1.
#[derive(Debug, Error)]
#[error("{msg}")]
pub struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: details.into() }
    }
}

// Codes from the CNI spec.
const INVALID_NETCONF: u32 = 7;
const DECODE: u32 = 6;
const TRY_AGAIN_LATER: u32 = 11;

/// Runs the plugin: environment and stdin in, result or error on stdout.
/// Returns the exit status.
pub fn plugin_main() -> i32 {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    match run(&command, &stdin, &env, is_bridge) {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let version = serde_json::from_str::<NetConf>(&stdin).map(|c| c.cni_version).unwrap_or_default();
            println!(
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details})
            );
            1
        }
    }
}

/// The plugin's logic, with the environment and the bridge test passed in
/// (tests). Returns what to print on success.
fn run(
    command: &str,
    stdin: &str,
    env: &dyn Fn(&str) -> String,
    is_bridge: impl Fn(&str) -> bool,
) -> Result<Option<String>, CniError> {
    if command == "VERSION" {
        return Ok(Some(json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}).to_string()));
    }
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(DECODE, "portcullis: cannot decode the network configuration", e.to_string())
    })?;
    let socket = conf.socket.clone().unwrap_or_else(|| PathBuf::from(api::DEFAULT_SOCKET));
    let args = parse_args(&env("CNI_ARGS"));
    let pod = args.get("K8S_POD_NAMESPACE").zip(args.get("K8S_POD_NAME"));
    let container_id = env("CNI_CONTAINERID");
    match command {
        "ADD" => {
            let prev = conf.prev_result.clone().ok_or_else(|| {
                CniError::new(
                    INVALID_NETCONF,
                    "portcullis must be chained after a main plugin (no prevResult)",
                    "add it after the main plugin in the conflist's plugins",
                )
            })?;
            let mut result = prev.clone();
            if let Some(obj) = result.as_object_mut() {
                obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
            }
            // Not a Kubernetes pod: nothing to enforce.
            let Some((namespace, name)) = pod else { return Ok(Some(result.to_string())) };
            let (interface, ips) = host_side(&prev, &is_bridge)?;
            let add =
                CniAdd { namespace: namespace.clone(), name: name.clone(), container_id, interface, ips };
            let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(30));
            match api::call(&socket, "/v1/cni/add", &add, timeout) {
                Ok((200, _)) => Ok(Some(result.to_string())),
                Ok((status, body)) => Err(CniError::new(
                    TRY_AGAIN_LATER,
                    format!("portcullis: pod {namespace}/{name} is not enforced yet ({status})"),
                    body["error"].as_str().unwrap_or_default().to_string(),
                )),
                Err(e) => Err(CniError::new(
                    TRY_AGAIN_LATER,
                    format!(
                        "portcullis: no answer from the agent at {} within {}s: is the portcullis DaemonSet running on this node (kubectl -n portcullis get pods -o wide)?",
                        socket.display(),
                        timeout.as_secs()
                    ),
                    e.to_string(),
                )),
            }
        }
        "DEL" => {
            if let Some((namespace, name)) = pod {
                let del = CniDel { namespace: namespace.clone(), name: name.clone(), container_id };
                // Best effort: the agent forgets the pod anyway once it is deleted.
                let _ = api::call(&socket, "/v1/cni/del", &del, Duration::from_secs(5));
            }
            Ok(None)
        }
        // CHECK, GC, STATUS: nothing of ours can be wrong without the agent knowing.
        _ => Ok(None),
    }
}

/// `K1=V1;K2=V2` (CNI_ARGS).
fn parse_args(args: &str) -> std::collections::BTreeMap<String, String> {
    args.split(';').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The host-side interface and the pod's addresses from the main plugin's
/// result: the interface outside the sandbox that is not a bridge (bridge
/// lists cni0, the veth, eth0; ptp lists the veth, eth0).
fn host_side(
    prev: &Value,
    is_bridge: &dyn Fn(&str) -> bool,
) -> Result<(String, Vec<std::net::IpAddr>), CniError> {
    let bad = |what: &str| {
        CniError::new(INVALID_NETCONF, format!("portcullis: prevResult {what}"), prev.to_string())
    };
    let interfaces = prev["interfaces"].as_array().ok_or_else(|| bad("has no interfaces"))?;
    let interface = interfaces
        .iter()
        .filter(|i| i["sandbox"].as_str().unwrap_or_default().is_empty())
        .filter_map(|i| i["name"].as_str())
        .find(|name| !is_bridge(name))
        .ok_or_else(|| bad("names no host-side interface"))?
        .to_string();
    let mut ips = Vec::new();
    for ip in prev["ips"].as_array().into_iter().flatten() {
        let address = ip["address"].as_str().ok_or_else(|| bad("has an ip without address"))?;
        let addr = address.split('/').next().unwrap_or_default();
        ips.push(addr.parse().map_err(|_| bad(&format!("has a bad address {address:?}")))?);
    }
    if ips.is_empty() {
        return Err(bad("has no ips"));
    }
    Ok((interface, ips))
}

/// Whether a host interface is a bridge (sysfs: the plugin runs in the
/// host's network namespace).
pub fn is_bridge(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).join("bridge").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE_RESULT: &str = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"cni0","mac":"aa"},
        {"name":"veth1234","mac":"bb"},{"name":"eth0","mac":"cc","sandbox":"/var/run/netns/cni-1"}],
        "ips":[{"version":"4","address":"10.244.0.7/24","gateway":"10.244.0.1","interface":2}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

    fn conf(socket: &Path) -> String {
        format!(
            r#"{{"cniVersion":"0.4.0","name":"test","type":"portcullis","socket":{socket:?},"timeoutSeconds":1,"prevResult":{BRIDGE_RESULT}}}"#
        )
    }

    fn env(args: &'static str) -> impl Fn(&str) -> String {
        move |k: &str| match k {
            "CNI_ARGS" => args.to_string(),
            "CNI_CONTAINERID" => "c1".to_string(),
            _ => String::new(),
        }
    }

    #[test]
    fn finds_the_host_side_veth_and_the_addresses() {
        let prev: Value = serde_json::from_str(BRIDGE_RESULT).unwrap();
        let (iface, ips) = host_side(&prev, &|n: &str| n == "cni0").unwrap();
        assert_eq!(
            (iface.as_str(), ips),
            ("veth1234", vec!["10.244.0.7".parse::<std::net::IpAddr>().unwrap()])
        );
    }

    #[test]
    fn add_without_an_agent_fails_closed_and_says_why() {
        let socket = std::env::temp_dir().join("portcullis-no-agent.sock");
        let args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=web";
        let err = run("ADD", &conf(&socket), &env(args), |n: &str| n == "cni0").unwrap_err();
        assert_eq!(err.code, TRY_AGAIN_LATER);
        assert!(err.msg.contains("is the portcullis DaemonSet running"), "{}", err.msg);
        // DEL must succeed regardless, VERSION lists what we speak.
        assert_eq!(run("DEL", &conf(&socket), &env(args), |_: &str| false).unwrap(), None);
        let version = run("VERSION", "", &env(""), |_: &str| false).unwrap().unwrap();
        assert!(version.contains("0.4.0") && version.contains("1.0.0"));
        // Not a pod: passed through.
        let out = run("ADD", &conf(&socket), &env(""), |_: &str| false).unwrap().unwrap();
        assert!(out.contains("veth1234"));
        // Not chained: refused.
        let err =
            run("ADD", r#"{"cniVersion":"0.4.0","name":"x","type":"portcullis"}"#, &env(args), |_: &str| {
                false
            })
            .unwrap_err();
        assert_eq!(err.code, INVALID_NETCONF);
    }
}
