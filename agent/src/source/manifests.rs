//! The manifests source: Kubernetes objects (Namespaces, Pods,
//! NetworkPolicies; multi-document YAML) in a directory, as the lab and the
//! conformance runner hand them to the agent when there is no API server.
//! Each poll turns what changed into engine changes; an invalid object is
//! reported and its last good version stays.

use std::{collections::BTreeMap, path::PathBuf};

use k8s_openapi::api::{core::v1 as core, networking::v1 as net};

use crate::{
    model::{
        ModelError, namespace_from_api, network_policy_fail_closed, network_policy_from_api, pod_from_api,
        service_from_api,
    },
    policy::{Change, Engine},
};

/// `(kind, namespace, name)`.
type ObjectId = (String, String, String);

pub struct ManifestsSource {
    dir: PathBuf,
    /// Objects as last read (their YAML), to see what changed.
    seen: BTreeMap<ObjectId, serde_yaml_ng::Value>,
    /// Versions refused, so each is reported once, not at every poll.
    rejected: BTreeMap<ObjectId, serde_yaml_ng::Value>,
    /// The revision the directory declares (file `revision`), reported once
    /// everything read with it is enforced.
    pub revision: u64,
}

/// What one poll found.
#[derive(Default)]
pub struct Poll {
    pub changes: Vec<Change>,
    /// Objects left at their last good version (or out), and why.
    pub errors: Vec<String>,
    /// The directory's revision moved (even if no object did).
    pub revision_changed: bool,
}

impl ManifestsSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestsSource { dir: dir.into(), seen: BTreeMap::new(), rejected: BTreeMap::new(), revision: 0 }
    }

    /// Reads the directory and returns the changes since the last poll.
    pub fn poll(&mut self) -> Poll {
        let mut poll = Poll::default();
        let mut now: BTreeMap<ObjectId, serde_yaml_ng::Value> = BTreeMap::new();
        // The revision is read before the objects: a writer that replaces the
        // objects and then the revision never has a new revision reported
        // with old objects.
        let mut revision = self.revision;
        let revision_file = self.dir.join("revision");
        if revision_file.exists() {
            match std::fs::read_to_string(&revision_file).map(|t| t.trim().parse::<u64>()) {
                Ok(Ok(r)) => revision = r,
                _ => poll.errors.push(format!("{}: not a revision number", revision_file.display())),
            }
        }
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&self.dir) {
            Ok(d) => d.filter_map(|e| e.ok().map(|e| e.path())).collect(),
            Err(e) => {
                poll.errors.push(format!("{}: {e}", self.dir.display()));
                return poll;
            }
        };
        files.sort();
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&file) else { continue };
            for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
                let value = match serde::Deserialize::deserialize(doc) {
                    Ok(serde_yaml_ng::Value::Null) => continue,
                    Ok(v) => v,
                    Err(e) => {
                        poll.errors.push(format!("{} document {i}: {e}", file.display()));
                        continue;
                    }
                };
                let field = |f: &str| value.get("metadata").and_then(|m| m.get(f)).and_then(|v| v.as_str());
                let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or_default().to_string();
                let id = (
                    kind,
                    field("namespace").unwrap_or_default().into(),
                    field("name").unwrap_or_default().into(),
                );
                now.insert(id, value);
            }
        }
        poll.revision_changed = revision != self.revision;
        self.revision = revision;

        // Deletions first (a recreated object comes back below).
        let gone: Vec<ObjectId> = self.seen.keys().filter(|id| !now.contains_key(*id)).cloned().collect();
        for id in gone {
            self.seen.remove(&id);
            let (kind, ns, name) = id;
            match kind.as_str() {
                "Namespace" => poll.changes.push(Change::DeleteNamespace(name)),
                "Pod" => poll.changes.push(Change::DeletePod(crate::model::PodKey { namespace: ns, name })),
                "NetworkPolicy" => poll.changes.push(Change::DeletePolicy((ns, name))),
                "Service" => poll.changes.push(Change::DeleteService((ns, name))),
                _ => {}
            }
        }
        // Namespaces before the pods and policies in them.
        let order = |kind: &str| match kind {
            "Namespace" => 0,
            "Pod" => 1,
            _ => 2,
        };
        self.rejected.retain(|id, v| now.get(id) == Some(v));
        let mut fresh: Vec<(ObjectId, serde_yaml_ng::Value)> = now
            .into_iter()
            .filter(|(id, v)| self.seen.get(id) != Some(v) && self.rejected.get(id) != Some(v))
            .collect();
        fresh.sort_by_key(|((kind, _, _), _)| order(kind));
        for (id, value) in fresh {
            match convert(&id.0, value.clone()) {
                Ok(Some(change)) => {
                    poll.changes.push(change);
                    self.seen.insert(id, value);
                }
                Ok(None) => {
                    self.seen.insert(id, value);
                }
                // A policy refused the first time stands in as isolation
                // without rules (see `network_policy_fail_closed`), and
                // counts as its last good version from then on.
                Err(e) if id.0 == "NetworkPolicy" && !self.seen.contains_key(&id) => {
                    match fail_closed_policy(&value) {
                        Some(p) => {
                            poll.errors.push(format!(
                                "{e} (until a valid version replaces it, the pods it selects are isolated \
                                 with nothing allowed)"
                            ));
                            poll.changes.push(Change::UpsertPolicy(p));
                            self.seen.insert(id, value);
                        }
                        None => {
                            poll.errors.push(e);
                            self.rejected.insert(id, value);
                        }
                    }
                }
                // The last good version (if any) stays enforced.
                Err(e) => {
                    poll.errors.push(e);
                    self.rejected.insert(id, value);
                }
            }
        }
        poll
    }
}

fn convert(kind: &str, value: serde_yaml_ng::Value) -> Result<Option<Change>, String> {
    fn parse<T: serde::de::DeserializeOwned>(kind: &str, value: serde_yaml_ng::Value) -> Result<T, String> {
        serde_yaml_ng::from_value(value).map_err(|e| format!("{kind}: {e}"))
    }
    let model = |e: ModelError| e.to_string();
    Ok(Some(match kind {
        "Namespace" => Change::UpsertNamespace(
            namespace_from_api(&parse::<core::Namespace>(kind, value)?).map_err(model)?,
        ),
        "Pod" => Change::UpsertPod(pod_from_api(&parse::<core::Pod>(kind, value)?).map_err(model)?),
        "NetworkPolicy" => Change::UpsertPolicy(
            network_policy_from_api(&parse::<net::NetworkPolicy>(kind, value)?).map_err(model)?,
        ),
        "Service" => {
            Change::UpsertService(service_from_api(&parse::<core::Service>(kind, value)?).map_err(model)?)
        }
        // Other kinds are not ours.
        _ => return Ok(None),
    }))
}

/// The stand-in for a refused policy, read as far as it can be: a
/// document that is not even a NetworkPolicy in shape still names its
/// namespace, and then isolates all of it.
fn fail_closed_policy(value: &serde_yaml_ng::Value) -> Option<crate::model::NetworkPolicy> {
    let typed = serde_yaml_ng::from_value::<net::NetworkPolicy>(value.clone()).ok().or_else(|| {
        let meta = value.get("metadata")?;
        let text = |f: &str| meta.get(f).and_then(|v| v.as_str()).map(str::to_owned);
        Some(net::NetworkPolicy {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: text("name"),
                namespace: text("namespace"),
                ..Default::default()
            },
            ..Default::default()
        })
    })?;
    network_policy_fail_closed(&typed)
}

/// Applies a poll's changes to the engine; returns whether anything moved.
pub fn feed(engine: &mut Engine, poll: &mut Poll) -> bool {
    if poll.changes.is_empty() {
        return false;
    }
    let diff = engine.apply(std::mem::take(&mut poll.changes));
    !diff.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PodKey;

    fn policy(end_port: u16) -> String {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: x}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n    - ports: [{{port: 80, endPort: {end_port}}}]\n"
        )
    }

    const OBJECTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: x, labels: {app: web}}\n\
        spec: {nodeName: node, containers: [{name: c}]}\nstatus: {podIP: 10.1.0.1}\n";

    #[test]
    fn a_bad_update_is_reported_and_the_last_good_version_stays() {
        let dir = std::env::temp_dir().join(format!("portcullis-manifests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("objects.yaml"), OBJECTS).expect("write");
        std::fs::write(dir.join("policy.yaml"), policy(90)).expect("write");
        std::fs::write(dir.join("revision"), "1").expect("write");
        let mut source = ManifestsSource::new(&dir);
        let mut engine = Engine::new("node");
        let mut poll = source.poll();
        assert!(poll.errors.is_empty(), "{:?}", poll.errors);
        assert!(feed(&mut engine, &mut poll));
        let web = PodKey { namespace: "x".into(), name: "web".into() };
        let before = engine.endpoints()[&web].clone();
        assert!(before.ingress.isolated);

        // endPort below port: refused, named, and the enforced policy stays.
        std::fs::write(dir.join("policy.yaml"), policy(70)).expect("write");
        std::fs::write(dir.join("revision"), "2").expect("write");
        let mut poll = source.poll();
        assert_eq!(
            poll.errors,
            vec!["NetworkPolicy x/web: spec.ingress[0].ports[0].endPort: 70 is below port 80".to_string()]
        );
        assert!(poll.revision_changed);
        assert!(!feed(&mut engine, &mut poll));
        assert_eq!(engine.endpoints()[&web], before, "the last good version is enforced");
        assert!(source.poll().errors.is_empty(), "reported once, not at every poll");

        // A good version goes through; deleting the file deletes the policy.
        std::fs::write(dir.join("policy.yaml"), policy(81)).expect("write");
        let mut poll = source.poll();
        assert!(poll.errors.is_empty() && feed(&mut engine, &mut poll));
        std::fs::remove_file(dir.join("policy.yaml")).expect("remove");
        let mut poll = source.poll();
        assert!(feed(&mut engine, &mut poll));
        assert!(!engine.endpoints()[&web].ingress.isolated);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_policy_refused_at_first_sight_isolates_what_it_selects_until_a_good_version() {
        let dir = std::env::temp_dir().join(format!("portcullis-manifests-first-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("objects.yaml"), OBJECTS).expect("write");
        std::fs::write(dir.join("policy.yaml"), policy(70)).expect("write");
        let mut source = ManifestsSource::new(&dir);
        let mut engine = Engine::new("node");
        let mut poll = source.poll();
        assert_eq!(poll.errors.len(), 1);
        assert!(poll.errors[0].contains("endPort: 70 is below port 80"), "{:?}", poll.errors);
        assert!(poll.errors[0].contains("isolated"), "{:?}", poll.errors);
        assert!(feed(&mut engine, &mut poll));
        let web = PodKey { namespace: "x".into(), name: "web".into() };
        let ep = engine.endpoints()[&web].clone();
        assert!(ep.ingress.isolated && ep.ingress.allow.is_empty(), "fail closed, not open: {ep:?}");
        assert!(!ep.egress.isolated, "only the directions the policy names");

        // A good version replaces it; deleting it deletes the stand-in too.
        std::fs::write(dir.join("policy.yaml"), policy(81)).expect("write");
        let mut poll = source.poll();
        assert!(poll.errors.is_empty() && feed(&mut engine, &mut poll));
        assert!(!engine.endpoints()[&web].ingress.allow.is_empty());
        std::fs::write(
            dir.join("policy.yaml"),
            "kind: NetworkPolicy\nmetadata: {name: web, namespace: x}\nspec: 7\n",
        )
        .expect("write");
        let mut poll = source.poll();
        assert!(!feed(&mut engine, &mut poll), "a refused update keeps the last good version");
        std::fs::remove_file(dir.join("policy.yaml")).expect("remove");
        let mut poll = source.poll();
        assert!(feed(&mut engine, &mut poll));
        assert!(!engine.endpoints()[&web].ingress.isolated);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
