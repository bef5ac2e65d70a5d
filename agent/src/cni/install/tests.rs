//! Chaining into the file the runtime uses, in a temporary conf dir. What
//! the runtime would run is judged by `Node::runtime_runs`, libcni's rule
//! written out on its own.

use std::{collections::BTreeMap, fs};

use super::*;

const SOCKET: &str = "/var/run/portcullis/agent.sock";

/// Older flannel's single plugin, as it writes it.
const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "type": "flannel",
  "delegate": {"hairpinMode": true, "isDefaultGateway": true}
}
"#;
/// The same plugin written again by a restarted flannel (another MTU).
const FLANNEL_AGAIN: &str = r#"{"name":"cbr0","cniVersion":"0.3.1","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true,"mtu":1450}}"#;
const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.0.0/24"}]]}}"#;
const KINDNET: &str = r#"{"cniVersion":"0.3.1","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

/// A node's CNI dirs under a fresh temporary directory, removed on drop.
struct Node {
    root: PathBuf,
    conf: PathBuf,
    bin: PathBuf,
}

impl Node {
    fn new(test: &str) -> Node {
        let root = std::env::temp_dir().join(format!("portcullis-cni-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (conf, bin) = (root.join("net.d"), root.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        fs::write(root.join(PLUGIN_BINARY), "the plugin").unwrap();
        Node { root, conf, bin }
    }

    fn write(&self, name: &str, text: &str) {
        fs::write(self.conf.join(name), text).unwrap();
    }

    fn read(&self, name: &str) -> Option<String> {
        fs::read_to_string(self.conf.join(name)).ok()
    }

    /// `install`, with a small binary for the plugin's.
    fn install(&self) -> Result<PathBuf, InstallError> {
        install_binary(&self.root.join(PLUGIN_BINARY), &self.bin)?;
        chain(&self.conf, Path::new(SOCKET))
    }

    fn uninstall(&self) -> Result<(), InstallError> {
        uninstall(&self.bin, &self.conf)
    }

    fn is_chained(&self) -> bool {
        is_chained(&self.bin, &self.conf, Path::new(SOCKET))
    }

    /// Every file of the conf dir, and its bytes.
    fn files(&self) -> BTreeMap<String, Vec<u8>> {
        fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap()))
            .collect()
    }

    /// What containerd or CRI-O runs for a pod here: the first file by name
    /// among `*.conf`, `*.conflist` and `*.json` that loads (a `.conflist`
    /// as a list; the others as one plugin with a `type`, made a list), and
    /// that list.
    fn runtime_runs(&self) -> Option<(String, Value)> {
        let mut names: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| !e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| [".conf", ".conflist", ".json"].iter().any(|ext| n.ends_with(ext)))
            .collect();
        names.sort();
        names.into_iter().find_map(|name| {
            let conf: Value = serde_json::from_slice(&fs::read(self.conf.join(&name)).ok()?).ok()?;
            let typed = |p: &Value| p["type"].as_str().is_some_and(|t| !t.is_empty());
            if name.ends_with(".conflist") {
                let plugins = conf["plugins"].as_array()?;
                (conf["name"].is_string() && !plugins.is_empty() && plugins.iter().all(typed))
                    .then(|| (name, conf.clone()))
            } else {
                let list = json!({"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [conf]});
                typed(&conf).then_some((name, list))
            }
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}

fn types(list: &Value) -> Vec<&str> {
    list["plugins"].as_array().unwrap().iter().map(|p| p["type"].as_str().unwrap()).collect()
}

fn ours() -> Value {
    json!({"type": "portcullis", "socket": SOCKET})
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn a_conf_alone_becomes_a_list_of_it_then_us() {
    let node = Node::new("conf-alone");
    node.write("10-flannel.conf", FLANNEL);
    assert!(!node.is_chained());

    let list = node.install().unwrap();
    assert_eq!(list, node.conf.join("10-flannel.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!(file, "10-flannel.conflist", "the runtime runs our list");
    assert_eq!(types(&run), ["flannel", "portcullis"]);
    assert_eq!((&run["cniVersion"], &run["name"]), (&json!("0.3.1"), &json!("cbr0")), "carried over");
    assert_eq!(run["plugins"][0], json(FLANNEL), "the main plugin as it was");
    assert_eq!(run["plugins"][1], ours());
    assert_eq!(node.read("10-flannel.conf"), None, "renamed aside");
    assert_eq!(node.read("10-flannel.conf.portcullis-orig").as_deref(), Some(FLANNEL), "kept, byte for byte");
    assert!(node.is_chained());
    assert!(node.bin.join(PLUGIN_TYPE).is_file());
}

#[test]
fn a_json_alone_becomes_a_list_of_it_then_us() {
    let node = Node::new("json-alone");
    node.write("10-bridge.json", BRIDGE);
    assert!(!node.is_chained());

    let list = node.install().unwrap();
    assert_eq!(list, node.conf.join("10-bridge.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!(file, "10-bridge.conflist");
    assert_eq!(types(&run), ["bridge", "portcullis"]);
    assert_eq!(run["cniVersion"], "1.0.0");
    assert_eq!(run["plugins"][0], json(BRIDGE));
    assert_eq!(node.read("10-bridge.json"), None);
    assert_eq!(node.read("10-bridge.json.portcullis-orig").as_deref(), Some(BRIDGE));
    assert!(node.is_chained());
}

#[test]
fn a_conf_sorting_before_a_conflist_is_the_one_chained() {
    let node = Node::new("conf-first");
    node.write("05-bridge.conf", BRIDGE);
    node.write("10-kindnet.conflist", KINDNET);
    assert!(!node.is_chained());

    let list = node.install().unwrap();
    assert_eq!(list, node.conf.join("05-bridge.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), types(&run)), ("05-bridge.conflist", vec!["bridge", "portcullis"]));
    assert_eq!(node.read("10-kindnet.conflist").as_deref(), Some(KINDNET), "not the runtime's: untouched");
    assert!(node.is_chained());

    // The other way round: the conflist is the runtime's, the .conf stays.
    let node = Node::new("conflist-first");
    node.write("05-kindnet.conflist", KINDNET);
    node.write("10-bridge.conf", BRIDGE);
    assert_eq!(node.install().unwrap(), node.conf.join("05-kindnet.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), types(&run)), ("05-kindnet.conflist", vec!["ptp", "portmap", "portcullis"]));
    assert_eq!(node.read("10-bridge.conf").as_deref(), Some(BRIDGE));
}

#[test]
fn a_list_in_a_json_file_is_skipped_as_the_runtime_skips_it() {
    // containerd, CRI-O and the dockershim read a list only from a
    // .conflist; a .json must be one plugin with a "type".
    let node = Node::new("json-list");
    node.write("05-multus.json", KINDNET);
    node.write("10-flannel.conf", FLANNEL);
    assert_eq!(node.runtime_runs().unwrap().0, "10-flannel.conf");

    assert_eq!(node.install().unwrap(), node.conf.join("10-flannel.conflist"));
    assert_eq!(node.runtime_runs().unwrap().0, "10-flannel.conflist");
    assert_eq!(node.read("05-multus.json").as_deref(), Some(KINDNET), "untouched");
    assert!(node.is_chained());

    // Alone, it is no configuration at all, and the error says why.
    let node = Node::new("json-list-alone");
    node.write("05-multus.json", KINDNET);
    let err = node.install().unwrap_err().to_string();
    assert!(err.contains("05-multus.json") && err.contains(".conflist"), "{err}");
    assert_eq!(node.read("05-multus.json").as_deref(), Some(KINDNET));
}

#[test]
fn files_that_do_not_load_are_skipped_and_named() {
    let node = Node::new("invalid");
    node.write("00-broken.conflist", r#"{"cniVersion": "0.4.0", "name": "half"#);
    node.write("01-empty.conf", "");
    node.write("02-untyped.conf", r#"{"cniVersion":"0.4.0","name":"x"}"#);
    node.write("03-no-plugins.conflist", r#"{"cniVersion":"0.4.0","name":"x","plugins":[]}"#);
    fs::create_dir(node.conf.join("04-a-directory.conf")).unwrap();
    node.write("10-kindnet.conflist", KINDNET);
    let before = node.files();

    assert_eq!(node.install().unwrap(), node.conf.join("10-kindnet.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), types(&run)), ("10-kindnet.conflist", vec!["ptp", "portmap", "portcullis"]));
    for name in ["00-broken.conflist", "01-empty.conf", "02-untyped.conf", "03-no-plugins.conflist"] {
        assert_eq!(node.files()[name], before[name], "{name} untouched");
    }
    assert!(node.is_chained());

    // With nothing that loads, the error names each file and why.
    fs::remove_file(node.conf.join("10-kindnet.conflist")).unwrap();
    let err = node.install().unwrap_err().to_string();
    for (name, why) in [
        ("00-broken.conflist", "not valid JSON"),
        ("01-empty.conf", "not valid JSON"),
        ("02-untyped.conf", "no \"type\""),
        ("03-no-plugins.conflist", "\"plugins\" is empty"),
    ] {
        assert!(err.contains(&format!("{}: {why}", node.conf.join(name).display())), "{name} in {err}");
    }
    assert!(wait_for_conflist(&node.conf, Duration::ZERO).is_err());
}

#[test]
fn a_conf_the_main_plugin_writes_again_is_chained_again() {
    let node = Node::new("rewritten-conf");
    node.write("10-flannel.conf", FLANNEL);
    node.install().unwrap();
    assert!(node.is_chained());

    // flannel restarts and writes its .conf again: it sorts before our
    // list, so the runtime runs it, unchained.
    node.write("10-flannel.conf", FLANNEL_AGAIN);
    assert_eq!(node.runtime_runs().unwrap().0, "10-flannel.conf");
    assert!(!node.is_chained());
    assert_eq!(node.install().unwrap(), node.conf.join("10-flannel.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), types(&run)), ("10-flannel.conflist", vec!["flannel", "portcullis"]));
    assert_eq!(run["plugins"][0], json(FLANNEL_AGAIN), "the new configuration, not the old");
    assert_eq!(node.read("10-flannel.conf"), None);
    assert_eq!(node.read("10-flannel.conf.portcullis-orig").as_deref(), Some(FLANNEL_AGAIN));
    assert!(node.is_chained());

    // A .json sorts after its list: the runtime would go on with the stale
    // copy, which the check must see.
    let node = Node::new("rewritten-json");
    node.write("10-bridge.json", BRIDGE);
    node.install().unwrap();
    let again = BRIDGE.replace("10.244.0.0/24", "10.244.7.0/24");
    node.write("10-bridge.json", &again);
    assert!(!node.is_chained(), "the list holds the old configuration");
    node.install().unwrap();
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), &run["plugins"][0]), ("10-bridge.conflist", &json(&again)));
    assert_eq!(node.read("10-bridge.json"), None);
    assert_eq!(node.read("10-bridge.json.portcullis-orig").as_deref(), Some(again.as_str()));
    assert!(node.is_chained());
}

#[test]
fn uninstall_puts_the_original_back_byte_for_byte() {
    // Odd spacing, CRLF, key order, non-ASCII: all of it comes back.
    let odd = "{\r\n\t\"type\":  \"bridge\" ,\"cniVersion\":\"0.4.0\",\r\n  \"name\":\"k8s – pods\"}\r\n";
    for name in ["10-bridge.conf", "10-bridge.json"] {
        let node = Node::new("restore");
        node.write(name, odd);
        node.write("20-other.conflist", KINDNET);
        let before = node.files();
        node.install().unwrap();
        assert!(node.is_chained());
        node.uninstall().unwrap();
        assert_eq!(node.files(), before, "{name}: the conf dir as it was");
        assert!(!node.bin.join(PLUGIN_TYPE).exists());
        assert!(!node.is_chained());
    }

    // After the main plugin wrote its file again (before the check chained
    // it again), its new file stays.
    let node = Node::new("restore-rewritten");
    node.write("10-flannel.conf", FLANNEL);
    node.install().unwrap();
    node.write("10-flannel.conf", FLANNEL_AGAIN);
    node.uninstall().unwrap();
    assert_eq!(node.files(), BTreeMap::from([("10-flannel.conf".to_string(), FLANNEL_AGAIN.into())]));

    // And after it was chained again, the newest comes back.
    let node = Node::new("restore-rechained");
    node.write("10-flannel.conf", FLANNEL);
    node.install().unwrap();
    node.write("10-flannel.conf", FLANNEL_AGAIN);
    node.install().unwrap();
    node.uninstall().unwrap();
    assert_eq!(node.files(), BTreeMap::from([("10-flannel.conf".to_string(), FLANNEL_AGAIN.into())]));
}

#[test]
fn install_is_idempotent() {
    for (name, text) in
        [("10-flannel.conf", FLANNEL), ("10-bridge.json", BRIDGE), ("10-kindnet.conflist", KINDNET)]
    {
        let node = Node::new("idempotent");
        node.write(name, text);
        let first = node.install().unwrap();
        let after = node.files();
        for _ in 0..3 {
            assert!(node.is_chained());
            assert_eq!(node.install().unwrap(), first);
            assert_eq!(node.files(), after, "{name}: a second run changes nothing");
        }
        let (_, run) = node.runtime_runs().unwrap();
        assert_eq!(types(&run).iter().filter(|t| **t == "portcullis").count(), 1, "{name}: chained once");
    }

    // An entry of ours with another socket, or twice: one, ours.
    let node = Node::new("idempotent-stale");
    let stale = json!({"cniVersion":"0.4.0","name":"k8s","plugins":[
        {"type":"bridge"},{"type":"portcullis","socket":"/old.sock"},{"type":"portmap"},{"type":"portcullis"}]});
    node.write("10-net.conflist", &stale.to_string());
    assert!(!node.is_chained());
    node.install().unwrap();
    let (_, run) = node.runtime_runs().unwrap();
    assert_eq!(types(&run), ["bridge", "portcullis", "portmap"]);
    assert_eq!(run["plugins"][1], ours());
    assert!(node.is_chained());
}

#[test]
fn the_cni_version_is_carried_over_and_too_old_ones_refused() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::new("version");
        node.write(
            "10-bridge.conf",
            &format!(r#"{{"cniVersion":"{version}","name":"k8s","type":"bridge"}}"#),
        );
        node.install().unwrap();
        let (_, run) = node.runtime_runs().unwrap();
        assert_eq!(run["cniVersion"], version);
        assert_eq!(types(&run), ["bridge", "portcullis"]);
    }
    // A chained plugin runs on the main plugin's result: CNI 0.3.0 and up.
    for conf in
        [r#"{"cniVersion":"0.2.0","name":"k8s","type":"bridge"}"#, r#"{"name":"k8s","type":"bridge"}"#]
    {
        let node = Node::new("version-old");
        node.write("10-bridge.conf", conf);
        let err = node.install().unwrap_err().to_string();
        assert!(err.contains("10-bridge.conf") && err.contains("0.3.0"), "{err}");
        assert_eq!(node.files(), BTreeMap::from([("10-bridge.conf".to_string(), conf.into())]), "unchanged");
    }
}

#[test]
fn the_list_takes_another_name_when_its_own_is_taken() {
    let node = Node::new("taken");
    let other = r#"{"cniVersion":"0.4.0","name":"other","plugins":[{"type":"macvlan"}]}"#;
    node.write("10-foo.conf", BRIDGE);
    node.write("10-foo.conflist", other);
    let before = node.files();
    assert_eq!(node.install().unwrap(), node.conf.join("10-foo.conf.conflist"));
    let (file, run) = node.runtime_runs().unwrap();
    assert_eq!((file.as_str(), types(&run)), ("10-foo.conf.conflist", vec!["bridge", "portcullis"]));
    assert_eq!(node.read("10-foo.conflist").as_deref(), Some(other), "someone else's: untouched");
    node.install().unwrap();
    assert!(node.is_chained());
    node.uninstall().unwrap();
    assert_eq!(node.files(), before);

    // No name sorts where the runtime would pick it: refused, untouched.
    let node = Node::new("blocked");
    node.write("10-foo.conf", BRIDGE);
    node.write("10-foo.conflist", other);
    node.write("10-foo.conf.a.json", BRIDGE);
    let before = node.files();
    let err = node.install().unwrap_err().to_string();
    assert!(err.contains("10-foo.conf.a.json"), "{err}");
    assert_eq!(node.files(), before);
}

#[test]
fn uninstall_after_the_main_plugin_replaced_our_list() {
    // flannel, upgraded, writes a conflist under the name of ours.
    let node = Node::new("replaced");
    node.write("10-flannel.conf", FLANNEL);
    node.install().unwrap();
    node.write("10-flannel.conflist", KINDNET);
    assert!(!node.is_chained());
    node.install().unwrap();
    assert!(node.is_chained());
    node.uninstall().unwrap();
    let kindnet: Value = serde_json::from_slice(&node.files()["10-flannel.conflist"]).unwrap();
    assert_eq!(kindnet, json(KINDNET));
    assert_eq!(node.files().len(), 1, "the stale original is gone, not put back before the new list");
}

#[test]
fn is_chained_sees_a_rewritten_conflist() {
    let node = Node::new("chained");
    node.write("10-kindnet.conflist", KINDNET);
    assert!(!node.is_chained());
    node.install().unwrap();
    assert!(node.is_chained());
    assert!(!is_chained(&node.bin, &node.conf, Path::new("/elsewhere.sock")), "another socket is not ours");
    // The main plugin restarts and writes its conflist again.
    node.write("10-kindnet.conflist", KINDNET);
    assert!(!node.is_chained());
    let found = wait_for_conflist(&node.conf, Duration::ZERO).unwrap();
    assert_eq!(found, node.conf.join("10-kindnet.conflist"));
    assert!(matches!(
        wait_for_conflist(&node.root.join("none"), Duration::ZERO),
        Err(InstallError::Io { .. })
    ));
}

#[test]
fn the_plugins_own_binary_is_installed_when_it_is_beside_the_agent() {
    let node = Node::new("source");
    let agent = node.root.join("agent");
    fs::write(&agent, "agent").unwrap();
    fs::remove_file(node.root.join(PLUGIN_BINARY)).unwrap();
    assert_eq!(plugin_source(&agent), agent, "none beside it: the agent itself");
    fs::write(node.root.join(PLUGIN_BINARY), "plugin").unwrap();
    assert_eq!(plugin_source(&agent), node.root.join(PLUGIN_BINARY));
}

#[test]
fn install_appends_once_and_uninstall_removes() {
    let node = Node::new("install");
    let main = r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#;
    node.write("10-net.conflist", main);
    node.write("20-other.conflist", main);
    assert!(matches!(chain(&node.root.join("none"), Path::new("/s")), Err(InstallError::Io { .. })));
    let path = node.install().unwrap();
    assert_eq!(path, node.conf.join("10-net.conflist"));
    node.install().unwrap();
    let (_, run) = node.runtime_runs().unwrap();
    assert_eq!(types(&run), ["bridge", "portmap", "portcullis"], "appended once, after the main plugin");
    assert!(node.bin.join(PLUGIN_TYPE).exists());
    assert_eq!(node.read("20-other.conflist").as_deref(), Some(main), "others untouched");
    node.uninstall().unwrap();
    let (_, run) = node.runtime_runs().unwrap();
    assert_eq!(types(&run), ["bridge", "portmap"]);
    assert!(!node.bin.join(PLUGIN_TYPE).exists());
    node.uninstall().unwrap();
}
