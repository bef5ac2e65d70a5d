//! The chained CNI plugin (`type: portcullis`, after the main plugin in the
//! node's conflist). The agent binary runs as the plugin when the container
//! runtime calls it (`CNI_COMMAND` set, no arguments).
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

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "no .conflist in {0}: the main CNI plugin's configuration must be there before portcullis can chain after it"
    )]
    NoConflist(PathBuf),
    #[error("{path}: not a CNI conflist: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// The plugin's entry in the conflist: its type and the agent's socket.
fn chain_entry(socket: &Path) -> Value {
    json!({"type": PLUGIN_TYPE, "socket": socket})
}

/// The binary to install as the plugin: the plugin's own, beside `exe`;
/// failing that, `exe` itself (the agent runs as the plugin too, but each
/// of its starts maps and relocates 25 MB, not 3).
fn plugin_source(exe: &Path) -> PathBuf {
    let own = exe.with_file_name(PLUGIN_BINARY);
    if own.is_file() {
        return own;
    }
    tracing::warn!(
        missing = %own.display(),
        "no plugin binary beside the agent: installing the agent itself as the CNI plugin (slower pod starts)"
    );
    exe.to_path_buf()
}

/// Installs the plugin: its binary as `BIN_DIR/portcullis`, and
/// `{"type": "portcullis"}` appended to the first conflist of `CONF_DIR`
/// (the one the runtime uses). Both writes are atomic renames; a second
/// run changes nothing. Returns the conflist's path.
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &Path) -> Result<PathBuf, InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    std::fs::copy(plugin_source(&exe), &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io(&target))?;

    let conflist = first_conflist(conf_dir)?;
    let text = std::fs::read_to_string(&conflist).map_err(io(&conflist))?;
    let invalid = |why: String| InstallError::Invalid { path: conflist.clone(), why };
    let mut conf: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let plugins = conf["plugins"].as_array_mut().ok_or_else(|| invalid("no \"plugins\" list".into()))?;
    let entry = chain_entry(socket);
    match plugins.iter_mut().find(|p| p["type"] == PLUGIN_TYPE) {
        Some(existing) if *existing == entry => return Ok(conflist),
        Some(existing) => *existing = entry,
        None => plugins.push(entry),
    }
    // Not .conf/.conflist/.json while being written: the runtime ignores it.
    let tmp = conf_dir.join(".portcullis.tmp");
    let out = serde_json::to_string_pretty(&conf).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(&tmp, out).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &conflist).map_err(io(&conflist))?;
    Ok(conflist)
}

/// Whether the plugin is in place: its binary, and its entry in the
/// conflist the runtime uses. Main plugins (kindnet, k3s' flannel) rewrite
/// their conflist when they restart, which drops the entry; the agent
/// checks this every second and chains again.
pub fn is_chained(bin_dir: &Path, conf_dir: &Path, socket: &Path) -> bool {
    let entry = chain_entry(socket);
    bin_dir.join(PLUGIN_TYPE).is_file()
        && first_conflist(conf_dir)
            .ok()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|conf| conf["plugins"].as_array().is_some_and(|p| p.contains(&entry)))
}

/// The first conflist of `conf_dir`, once there is one: the main plugin
/// may write it after the agent starts (kindnet and flannel run as pods).
pub fn wait_for_conflist(conf_dir: &Path, timeout: std::time::Duration) -> Result<PathBuf, InstallError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut said = false;
    loop {
        match first_conflist(conf_dir) {
            Err(InstallError::NoConflist(_) | InstallError::Io { .. })
                if std::time::Instant::now() < deadline =>
            {
                if !std::mem::replace(&mut said, true) {
                    eprintln!(
                        "waiting for the main CNI plugin to write its conflist into {} ...",
                        conf_dir.display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// Removes the plugin's entry from the conflist (and the binary).
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InstallError::Io { path, source }
    };
    if let Ok(conflist) = first_conflist(conf_dir) {
        let text = std::fs::read_to_string(&conflist).map_err(io(&conflist))?;
        if let Ok(mut conf) = serde_json::from_str::<Value>(&text)
            && let Some(plugins) = conf["plugins"].as_array_mut()
        {
            let before = plugins.len();
            plugins.retain(|p| p["type"] != PLUGIN_TYPE);
            if plugins.len() != before {
                let tmp = conf_dir.join(".portcullis.tmp");
                let out = serde_json::to_string_pretty(&conf).unwrap_or(text);
                std::fs::write(&tmp, out).map_err(io(&tmp))?;
                std::fs::rename(&tmp, &conflist).map_err(io(&conflist))?;
            }
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&bin_dir.join(PLUGIN_TYPE))(e)),
        _ => Ok(()),
    }
}

/// The runtime loads the first configuration file by name.
fn first_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(|source| InstallError::Io { path: conf_dir.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    files.sort();
    files.into_iter().next().ok_or_else(|| InstallError::NoConflist(conf_dir.to_path_buf()))
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

    #[test]
    fn is_chained_sees_a_rewritten_conflist() {
        let dir = std::env::temp_dir().join(format!("portcullis-cni-chained-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let main = r#"{"cniVersion":"0.4.0","name":"kindnet","plugins":[{"type":"ptp"}]}"#;
        std::fs::write(conf.join("10-kindnet.conflist"), main).unwrap();
        let socket = Path::new("/var/run/portcullis/agent.sock");
        assert!(!is_chained(&bin, &conf, socket));
        install(&bin, &conf, socket).unwrap();
        assert!(is_chained(&bin, &conf, socket));
        assert!(!is_chained(&bin, &conf, Path::new("/elsewhere.sock")), "another socket is not ours");
        // The main plugin restarts and writes its conflist again.
        std::fs::write(conf.join("10-kindnet.conflist"), main).unwrap();
        assert!(!is_chained(&bin, &conf, socket));
        let found = wait_for_conflist(&conf, std::time::Duration::ZERO).unwrap();
        assert_eq!(found, conf.join("10-kindnet.conflist"));
        assert!(matches!(
            wait_for_conflist(&dir.join("none"), std::time::Duration::ZERO),
            Err(InstallError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_plugins_own_binary_is_installed_when_it_is_beside_the_agent() {
        let dir = std::env::temp_dir().join(format!("portcullis-cni-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let agent = dir.join("agent");
        std::fs::write(&agent, "agent").unwrap();
        assert_eq!(plugin_source(&agent), agent, "none beside it: the agent itself");
        std::fs::write(dir.join(PLUGIN_BINARY), "plugin").unwrap();
        assert_eq!(plugin_source(&agent), dir.join(PLUGIN_BINARY));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_appends_once_and_uninstall_removes() {
        let dir = std::env::temp_dir().join(format!("portcullis-cni-install-{}", std::process::id()));
        let (bin, conf_dir) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        let main = r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
        std::fs::write(conf_dir.join("10-net.conflist"), main).unwrap();
        std::fs::write(conf_dir.join("20-other.conflist"), main).unwrap();
        assert!(matches!(install(&bin, &dir.join("none"), Path::new("/s")), Err(InstallError::Io { .. })));
        let socket = Path::new("/var/run/portcullis/agent.sock");
        let path = install(&bin, &conf_dir, socket).unwrap();
        assert_eq!(path, conf_dir.join("10-net.conflist"));
        install(&bin, &conf_dir, socket).unwrap();
        let conf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let types: Vec<_> = conf["plugins"].as_array().unwrap().iter().map(|p| p["type"].clone()).collect();
        assert_eq!(types, ["bridge", "portmap", "portcullis"], "appended once, after the main plugin");
        assert!(bin.join(PLUGIN_TYPE).exists());
        assert_eq!(
            std::fs::read_to_string(conf_dir.join("20-other.conflist")).unwrap(),
            main,
            "others untouched"
        );
        uninstall(&bin, &conf_dir).unwrap();
        let conf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(conf["plugins"].as_array().unwrap().len(), 2);
        assert!(!bin.join(PLUGIN_TYPE).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
