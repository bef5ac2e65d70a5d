//! Chaining the plugin into the node's CNI configuration: into the one file
//! the container runtime uses, found by the runtime's own rule.
//!
//! containerd, CRI-O and the kubelet's dockershim (all through libcni) list
//! the conf dir's files named `*.conf`, `*.conflist` or `*.json`
//! (directories aside), sort them by name, and use the first that loads: a
//! `.conflist` as a list (a string `name`, a non-empty `plugins`, each with
//! a `type`), a `.conf` or `.json` as a single plugin (a `type` at the top;
//! a list saved as `.json` has none and is not loaded: "perhaps this is a
//! .conflist?"). CRI-O and the dockershim skip a file that does not load;
//! containerd then refuses the whole directory, so no pod gets a network and
//! none starts unenforced either way.
//!
//! A list gets `{"type": "portcullis", "socket": ...}` appended. A single
//! plugin's file cannot hold a second plugin: `10-flannel.conf` becomes
//! `10-flannel.conflist`, the list libcni itself makes of it
//! (`ConfListFromConf`: its `cniVersion` and `name`, the plugin as it was)
//! followed by ours, and the file is renamed `10-flannel.conf.portcullis-orig`,
//! an extension libcni ignores, from where uninstall renames it back, byte
//! for byte. The list names its source (`portcullisConvertedFrom`, a key
//! libcni ignores): when the main plugin writes its file again, the agent's
//! check each second sees that file (a `.conf` sorts before its
//! `.conflist`; a `.json` after, but the list names it) and converts it
//! again.

use std::{
    ffi::{OsStr, OsString},
    io::Write as _,
    os::unix::ffi::{OsStrExt as _, OsStringExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use thiserror::Error;

use super::{PLUGIN_BINARY, PLUGIN_TYPE};

/// The extensions libcni lists for the runtimes (Go's `filepath.Ext`).
const EXTENSIONS: [&[u8]; 3] = [b".conf", b".conflist", b".json"];
/// A single plugin's file, renamed aside while our list stands for it.
const ORIGINAL_SUFFIX: &str = ".portcullis-orig";
/// The key naming the single plugin's file a list of ours was made from.
const CONVERTED_FROM: &str = "portcullisConvertedFrom";
/// Written, then renamed over its target: an extension libcni ignores.
const TMP: &str = ".portcullis.tmp";

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "no CNI configuration the container runtime would use in {dir} (a .conf, .conflist or .json file \
         that loads){skipped}: the main CNI plugin's configuration must be there before portcullis can \
         chain after it"
    )]
    NoConfig { dir: PathBuf, skipped: String },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + use<> {
    let path = path.to_path_buf();
    move |source| InstallError::Io { path, source }
}

/// The plugin's entry in the list: its type and the agent's socket.
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

/// Installs the plugin: its binary as `BIN_DIR/portcullis`, and its entry
/// in the configuration of `CONF_DIR` the runtime uses (a single plugin's
/// file made a list first). Every write is an atomic rename; a second run
/// changes nothing. Returns the list's path.
pub fn install(bin_dir: &Path, conf_dir: &Path, socket: &Path) -> Result<PathBuf, InstallError> {
    let exe = std::env::current_exe().map_err(io_error(Path::new("/proc/self/exe")))?;
    install_binary(&plugin_source(&exe), bin_dir)?;
    chain(conf_dir, socket)
}

fn install_binary(source: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    std::fs::create_dir_all(bin_dir).map_err(io_error(bin_dir))?;
    std::fs::copy(source, &tmp).map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &target).map_err(io_error(&target))
}

/// Whether the plugin is in place: its binary, and its entry (once) in the
/// configuration the runtime uses. Main plugins rewrite their files when
/// they restart (kindnet and k3s' flannel their conflist, older flannel and
/// bridge setups a `.conf`), which drops the entry or puts the single
/// plugin's file back; the agent checks this every second and chains again.
pub fn is_chained(bin_dir: &Path, conf_dir: &Path, socket: &Path) -> bool {
    let entry = chain_entry(socket);
    bin_dir.join(PLUGIN_TYPE).is_file()
        && runtime_config(conf_dir)
            .ok()
            .and_then(|choice| choice.used)
            .is_some_and(|config| config.kind == Kind::List && chains(&config.conf, &entry))
}

/// The configuration the runtime uses, once there is one: the main plugin
/// may write it after the agent starts (kindnet and flannel run as pods).
/// Any of the runtime's kinds counts (the name is kept from when only
/// conflists were looked at).
pub fn wait_for_conflist(conf_dir: &Path, timeout: Duration) -> Result<PathBuf, InstallError> {
    let deadline = Instant::now() + timeout;
    let mut said = false;
    loop {
        let found = runtime_config(conf_dir);
        match found {
            Ok(Choice { used: Some(config), .. }) => return Ok(conf_dir.join(config.name)),
            _ if Instant::now() < deadline => {
                if !std::mem::replace(&mut said, true) {
                    eprintln!(
                        "waiting for the main CNI plugin to write its configuration into {} ...",
                        conf_dir.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok(choice) => return Err(no_config(conf_dir, &choice.skipped)),
            Err(e) => return Err(io_error(conf_dir)(e)),
        }
    }
}

/// Takes the plugin out: a list made from a single plugin's file gives way
/// to that file again (renamed back, byte for byte), our entry leaves every
/// other list, and the binary goes.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    match config_files(conf_dir) {
        Ok(names) => {
            for name in names {
                unchain(conf_dir, &name)?;
            }
            remove_leftovers(conf_dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(conf_dir)(e)),
    }
    remove_if_there(&bin_dir.join(PLUGIN_TYPE))
}

/// What kind of configuration a file holds, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A `.conflist`.
    List,
    /// A `.conf` or `.json`: one plugin, which the runtime makes a list of.
    Single,
}

/// A configuration file that loads.
#[derive(Debug)]
struct Config {
    name: OsString,
    kind: Kind,
    conf: Value,
    bytes: Vec<u8>,
}

/// What the runtime uses, and the files before it that it skips (with why).
struct Choice {
    used: Option<Config>,
    skipped: Vec<(OsString, String)>,
}

/// The extension as Go's `filepath.Ext` sees it: from the last dot.
fn extension(name: &OsStr) -> &[u8] {
    let bytes = name.as_bytes();
    bytes.iter().rposition(|&b| b == b'.').map_or(&[], |i| &bytes[i..])
}

/// The conf dir's configuration files, in the runtime's order (libcni's
/// `ConfFiles`, then `sort.Strings`: by bytes).
fn config_files(dir: &Path) -> std::io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // As Go's `DirEntry.IsDir`: a symlink, even to a directory, is listed.
        if entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name();
        if EXTENSIONS.contains(&extension(&name)) {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// The file the runtime uses: the first that loads.
fn runtime_config(dir: &Path) -> std::io::Result<Choice> {
    let mut skipped = Vec::new();
    for name in config_files(dir)? {
        match load(dir, &name) {
            Err(why) => skipped.push((name, why)),
            Ok(config) => {
                // A list of ours whose single plugin's file the main plugin
                // wrote again: that file holds its configuration now (the
                // runtime already uses a `.conf`, which sorts first), and is
                // to be chained again.
                if let Some(source) = converted_from(&config)
                    && let Ok(fresh) = load(dir, source)
                    && fresh.kind == Kind::Single
                {
                    return Ok(Choice { used: Some(fresh), skipped });
                }
                return Ok(Choice { used: Some(config), skipped });
            }
        }
    }
    Ok(Choice { used: None, skipped })
}

fn load(dir: &Path, name: &OsStr) -> Result<Config, String> {
    let bytes = std::fs::read(dir.join(name)).map_err(|e| format!("cannot be read: {e}"))?;
    parse(name, bytes)
}

/// Loads a file as libcni does for the runtime, or says why it does not.
fn parse(name: &OsStr, bytes: Vec<u8>) -> Result<Config, String> {
    let conf: Value = serde_json::from_slice(&bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = conf.as_object().ok_or("not a JSON object")?;
    let list = extension(name) == b".conflist";
    for key in ["cniVersion", "name"] {
        // A list is read as a map (a null is no string); a single plugin
        // into Go's struct (a null leaves the field empty).
        if obj.get(key).is_some_and(|v| !(v.is_string() || (v.is_null() && !list))) {
            return Err(format!("{key:?} is not a string"));
        }
    }
    let has_type = |p: &Value| p.get("type").and_then(Value::as_str).is_some_and(|t| !t.is_empty());
    let kind = if list {
        if !obj.contains_key("name") {
            return Err("a list without \"name\"".into());
        }
        let plugins = obj.get("plugins").ok_or("a list without \"plugins\"")?;
        let plugins = plugins.as_array().ok_or("\"plugins\" is not a list")?;
        if plugins.is_empty() {
            return Err("\"plugins\" is empty".into());
        }
        if let Some(i) = plugins.iter().position(|p| !has_type(p)) {
            return Err(format!("plugin {i} of the list has no \"type\""));
        }
        Kind::List
    } else if has_type(&conf) {
        Kind::Single
    } else if obj.contains_key("plugins") {
        return Err(
            "no \"type\": a list of plugins, which the runtime reads only from a .conflist file".into()
        );
    } else {
        return Err("no \"type\"".into());
    };
    Ok(Config { name: name.to_owned(), kind, conf, bytes })
}

/// The single plugin's file a list of ours was made from.
fn converted_from(config: &Config) -> Option<&OsStr> {
    if config.kind != Kind::List {
        return None;
    }
    source_of(&config.conf)
}

fn source_of(conf: &Value) -> Option<&OsStr> {
    let source = OsStr::new(conf.get(CONVERTED_FROM)?.as_str()?);
    // A plain name in the conf dir, of a single plugin's kind.
    let plain = Path::new(source).file_name() == Some(source);
    (plain && matches!(extension(source), b".conf" | b".json")).then_some(source)
}

/// Whether the list holds our entry, once.
fn chains(conf: &Value, entry: &Value) -> bool {
    let mut ours = conf["plugins"].as_array().into_iter().flatten().filter(|p| p["type"] == PLUGIN_TYPE);
    ours.next() == Some(entry) && ours.next().is_none()
}

/// Puts our entry into the list once (after the main plugin, or where an
/// older one of ours was). Whether anything changed.
fn add_entry(conf: &mut Value, entry: Value) -> bool {
    if chains(conf, &entry) {
        return false;
    }
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else { return false };
    match plugins.iter().position(|p| p["type"] == PLUGIN_TYPE) {
        None => plugins.push(entry),
        Some(first) => {
            plugins[first] = entry;
            let mut seen = false;
            plugins.retain(|p| p["type"] != PLUGIN_TYPE || !std::mem::replace(&mut seen, true));
        }
    }
    true
}

/// Takes our entries out of the list. Whether anything changed.
fn remove_entries(conf: &mut Value) -> bool {
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else { return false };
    let before = plugins.len();
    plugins.retain(|p| p["type"] != PLUGIN_TYPE);
    plugins.len() != before
}

/// The oldest CNI version the runtime chains in: a chained plugin needs the
/// main plugin's result (`prevResult`, CNI 0.3.0). libcni reads a missing
/// `cniVersion` as 0.1.0.
const CHAINING: (u64, u64, u64) = (0, 3, 0);

fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split('.').map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next().transpose().ok()?.unwrap_or(0);
    let patch = parts.next().transpose().ok()?.unwrap_or(0);
    parts.next().is_none().then_some((major, minor, patch))
}

/// Whether the configuration's CNI version lets a plugin chain after the
/// main one (`cniVersion`, or the newest of `cniVersions`, which newer
/// libcni prefers).
fn chainable_version(conf: &Value) -> Result<(), String> {
    let version = conf.get("cniVersion").and_then(Value::as_str);
    let listed = conf.get("cniVersions").and_then(Value::as_array).into_iter().flatten();
    let versions: Vec<&str> = version.into_iter().chain(listed.filter_map(Value::as_str)).collect();
    if versions.iter().filter_map(|v| parse_version(v)).any(|v| v >= CHAINING) {
        return Ok(());
    }
    Err(format!(
        "cniVersion {}: portcullis runs after the main plugin, on its result, which needs CNI 0.3.0 or newer",
        version.map_or_else(|| "missing (0.1.0)".to_string(), |v| format!("{v:?}"))
    ))
}

fn no_config(dir: &Path, skipped: &[(OsString, String)]) -> InstallError {
    let skipped = skipped
        .iter()
        .map(|(name, why)| format!("; skipped {}: {why}", dir.join(name).display()))
        .collect::<String>();
    InstallError::NoConfig { dir: dir.to_path_buf(), skipped }
}

/// A warning to the agent's log, or to stderr when there is none (the
/// `cni install` command of the init container).
fn warn(message: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{message}");
    } else {
        eprintln!("warning: {message}");
    }
}

/// Chains our entry into the configuration the runtime uses, and returns
/// that list's path.
fn chain(conf_dir: &Path, socket: &Path) -> Result<PathBuf, InstallError> {
    let choice = runtime_config(conf_dir).map_err(io_error(conf_dir))?;
    for (name, why) in &choice.skipped {
        warn(&format!(
            "{}: skipped, as the container runtime skips it: {why}",
            conf_dir.join(name).display()
        ));
    }
    let Some(config) = choice.used else { return Err(no_config(conf_dir, &choice.skipped)) };
    let path = conf_dir.join(&config.name);
    chainable_version(&config.conf).map_err(|why| InstallError::Invalid { path: path.clone(), why })?;
    let entry = chain_entry(socket);
    match config.kind {
        Kind::List => {
            let mut conf = config.conf;
            if add_entry(&mut conf, entry) {
                write_atomic(conf_dir, &path, &pretty(&conf, &path)?)?;
            }
            Ok(path)
        }
        Kind::Single => convert(conf_dir, config, &entry),
    }
}

/// libcni's list of a single plugin (`ConfListFromConf`: the plugin's
/// `cniVersion` and `name`, the plugin as it is) with our entry after it,
/// naming the file it was made from.
fn as_list(config: &Config, source: &str, entry: &Value) -> Value {
    let text = |key: &str| config.conf.get(key).and_then(Value::as_str).unwrap_or_default();
    json!({
        "cniVersion": text("cniVersion"),
        "name": text("name"),
        "plugins": [config.conf, entry],
        CONVERTED_FROM: source,
    })
}

fn original_name(source: &OsStr) -> OsString {
    let mut name = source.to_owned();
    name.push(ORIGINAL_SUFFIX);
    name
}

/// Makes the single plugin's file a list of it and us, under a name the
/// runtime picks in its place, then renames the file aside (kept for
/// uninstall). Crash-safe: in between both are there, and the next run
/// finds the file again and converts it again.
fn convert(conf_dir: &Path, config: Config, entry: &Value) -> Result<PathBuf, InstallError> {
    let source_path = conf_dir.join(&config.name);
    let invalid = |why: String| InstallError::Invalid { path: source_path.clone(), why };
    let source = config.name.to_str().ok_or_else(|| invalid("a name that is not UTF-8".into()))?;
    let list = conf_dir.join(list_name(conf_dir, &config.name)?);
    write_atomic(conf_dir, &list, &pretty(&as_list(&config, source, entry), &list)?)?;
    let original = conf_dir.join(original_name(&config.name));
    std::fs::rename(&source_path, &original).map_err(io_error(&source_path))?;
    // The main plugin may have written its file again between our read and
    // the rename: the list must hold what was renamed, as uninstall brings
    // that back.
    let moved = std::fs::read(&original).map_err(io_error(&original))?;
    if moved != config.bytes {
        let fresh = parse(&config.name, moved)
            .ok()
            .filter(|fresh| fresh.kind == Kind::Single && chainable_version(&fresh.conf).is_ok())
            .ok_or_else(|| invalid("rewritten while being chained, with nothing to chain after".into()))?;
        write_atomic(conf_dir, &list, &pretty(&as_list(&fresh, source, entry), &list)?)?;
    }
    Ok(list)
}

/// Where the list made from `source` goes: `stem.conflist`, or failing
/// that `source.conflist`. The name must be free (or our list of the same
/// file), and no other file that loads may sort before it: the runtime
/// would use that one instead once `source` is renamed aside.
fn list_name(conf_dir: &Path, source: &OsStr) -> Result<OsString, InstallError> {
    let bytes = source.as_bytes();
    let stem = &bytes[..bytes.len() - extension(source).len()];
    let candidates = [[stem, b".conflist"].concat(), [bytes, b".conflist"].concat()].map(OsString::from_vec);
    let names = config_files(conf_dir).map_err(io_error(conf_dir))?;
    let mut why = Vec::new();
    for candidate in candidates {
        let path = conf_dir.join(&candidate);
        let ours = load(conf_dir, &candidate).is_ok_and(|c| converted_from(&c) == Some(source));
        if path.symlink_metadata().is_ok() && !ours {
            why.push(format!("{} is taken", path.display()));
            continue;
        }
        let before = names
            .iter()
            .filter(|n| n.as_os_str() != source && **n != candidate && n.as_bytes() < candidate.as_bytes())
            .find(|n| load(conf_dir, n).is_ok());
        match before {
            None => return Ok(candidate),
            Some(n) => why.push(format!(
                "{} would sort after {}, which the runtime would use instead",
                path.display(),
                conf_dir.join(n).display()
            )),
        }
    }
    Err(InstallError::Invalid {
        path: conf_dir.join(source),
        why: format!("no name for the list that chains portcullis after it: {}", why.join("; ")),
    })
}

fn pretty(conf: &Value, path: &Path) -> Result<Vec<u8>, InstallError> {
    let mut out = serde_json::to_vec_pretty(conf)
        .map_err(|e| InstallError::Invalid { path: path.to_path_buf(), why: e.to_string() })?;
    out.push(b'\n');
    Ok(out)
}

/// Writes `path` whole or not at all: a temporary file in the same
/// directory, under a name libcni ignores, renamed over it.
fn write_atomic(conf_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    let tmp = conf_dir.join(TMP);
    let written = std::fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(&tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

fn remove_if_there(path: &Path) -> Result<(), InstallError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

/// Takes us out of one configuration file.
fn unchain(conf_dir: &Path, name: &OsStr) -> Result<(), InstallError> {
    let path = conf_dir.join(name);
    let Some(mut conf) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return Ok(());
    };
    let mut changed = false;
    if extension(name) == b".conflist"
        && let Some(source) = source_of(&conf).map(OsStr::to_owned)
    {
        let (original, restored) = (conf_dir.join(original_name(&source)), conf_dir.join(&source));
        let there = |p: &Path| p.symlink_metadata().is_ok();
        if there(&original) {
            if there(&restored) {
                // The main plugin wrote its file again since: that one stays.
                remove_if_there(&original)?;
            } else {
                std::fs::rename(&original, &restored).map_err(io_error(&original))?;
            }
            return remove_if_there(&path);
        }
        if there(&restored) {
            return remove_if_there(&path);
        }
        // Neither: the main plugin's configuration lives on only in this
        // list, which stays, as the main plugin's.
        if let Some(obj) = conf.as_object_mut() {
            obj.remove(CONVERTED_FROM);
        }
        changed = true;
    }
    if remove_entries(&mut conf) || changed {
        write_atomic(conf_dir, &path, &pretty(&conf, &path)?)?;
    }
    Ok(())
}

/// Originals no list of ours stands for any more (the main plugin replaced
/// the list, or a run stopped between two steps), and a temporary file.
/// The runtime ignores them; uninstall leaves nothing behind.
fn remove_leftovers(conf_dir: &Path) -> Result<(), InstallError> {
    for entry in std::fs::read_dir(conf_dir).map_err(io_error(conf_dir))? {
        let name = entry.map_err(io_error(conf_dir))?.file_name();
        if name.as_bytes().ends_with(ORIGINAL_SUFFIX.as_bytes()) || name == TMP {
            remove_if_there(&conf_dir.join(name))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
