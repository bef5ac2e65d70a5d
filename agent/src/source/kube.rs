//! The Kubernetes source: one kube-runtime watcher per kind (Namespaces,
//! Pods, NetworkPolicies, Services; all namespaces, since remote pods feed
//! the ipcache), turned into engine changes.
//!
//! The rules that keep enforcement whole:
//! - nothing is applied until every kind has completed its first list, so a
//!   restarted agent keeps enforcing the pinned state until it has the
//!   complete view, never a partial one (a pod without its policies would
//!   be opened);
//! - a relist (after a watch error, 410 Gone, or an API server outage) is
//!   buffered until it is complete and then applied as one batch: upserts
//!   for what changed, deletes for what vanished meanwhile;
//! - an object that does not convert is reported (log line, and the caller
//!   may raise an Event) and its last good version stays enforced.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::{
    model::{
        ModelError, PodKey, namespace_from_api, network_policy_from_api, pod_from_api, service_from_api,
    },
    policy::{Change, Engine},
};

/// The kinds watched; all must be listed once before anything is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    Service,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Namespace, Kind::Pod, Kind::NetworkPolicy, Kind::Service];
}

/// An object the API server holds that the model refuses.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub error: String,
}

impl Rejected {
    /// The object, as an Event's regarding reference.
    pub fn reference(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        let (api_version, kind) = match self.kind {
            Kind::Namespace => ("v1", "Namespace"),
            Kind::Pod => ("v1", "Pod"),
            Kind::NetworkPolicy => ("networking.k8s.io/v1", "NetworkPolicy"),
            Kind::Service => ("v1", "Service"),
        };
        k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace: (!self.namespace.is_empty()).then(|| self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }
}

/// Publishes a Kubernetes Event (Warning, reason `PolicyRejected`) on each
/// object the agent refuses, so `kubectl describe` shows why.
#[derive(Clone)]
pub struct Events {
    recorder: kube::runtime::events::Recorder,
}

impl Events {
    pub fn new(client: Client, node: &str) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "portcullis-agent".into(),
            instance: Some(node.to_string()),
        };
        Events { recorder: kube::runtime::events::Recorder::new(client, reporter) }
    }

    /// Fire and forget: a failure to publish is logged, never blocks enforcement.
    pub fn rejected(&self, r: &Rejected) {
        use kube::runtime::events::{Event, EventType};
        let recorder = self.recorder.clone();
        let reference = r.reference();
        let event = Event {
            type_: EventType::Warning,
            reason: "PolicyRejected".into(),
            note: Some(
                format!("{} (portcullis keeps enforcing its last good version)", r.error)
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Compile".into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, "publishing an Event");
            }
        });
    }
}

/// What a watcher task reports.
#[derive(Debug)]
pub enum Update {
    /// Changes to apply together; `listed` marks the end of a (re)list.
    Changes { kind: Kind, changes: Vec<Change>, rejected: Vec<Rejected>, listed: bool },
    /// The watch failed; the watcher retries with backoff, the last state stays.
    WatchError { kind: Kind, error: String },
}

/// Feeds the engine from the watchers.
pub struct KubeSource {
    rx: mpsc::UnboundedReceiver<Update>,
    listed: BTreeSet<Kind>,
    /// Changes held back until every kind has been listed once.
    held: Vec<Change>,
    /// Bumped whenever a batch moves the engine; reported once enforced.
    pub revision: u64,
    /// Watch restarts since start, per kind (for status and metrics).
    pub watch_errors: BTreeMap<Kind, u64>,
}

/// What one poll found.
#[derive(Default)]
pub struct Poll {
    pub changes: Vec<Change>,
    pub rejected: Vec<Rejected>,
    pub watch_errors: Vec<String>,
}

impl KubeSource {
    /// Starts the four watchers on the current tokio runtime.
    pub fn start(client: Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        spawn_watch::<core::Namespace>(Api::all(client.clone()), Kind::Namespace, tx.clone(), |ns| {
            namespace_from_api(ns).map(Change::UpsertNamespace)
        });
        spawn_watch::<core::Pod>(Api::all(client.clone()), Kind::Pod, tx.clone(), |pod| {
            pod_from_api(pod).map(Change::UpsertPod)
        });
        spawn_watch::<net::NetworkPolicy>(Api::all(client.clone()), Kind::NetworkPolicy, tx.clone(), |np| {
            network_policy_from_api(np).map(Change::UpsertPolicy)
        });
        spawn_watch::<core::Service>(Api::all(client), Kind::Service, tx, |svc| {
            service_from_api(svc).map(Change::UpsertService)
        });
        Self::from_updates(rx)
    }

    /// A source over updates from elsewhere (tests).
    pub fn from_updates(rx: mpsc::UnboundedReceiver<Update>) -> Self {
        KubeSource {
            rx,
            listed: BTreeSet::new(),
            held: Vec::new(),
            revision: 0,
            watch_errors: BTreeMap::new(),
        }
    }

    /// Every kind has been listed at least once.
    pub fn synced(&self) -> bool {
        self.listed.len() == Kind::ALL.len()
    }

    /// Drains what the watchers sent. Changes come out only once the view
    /// is complete; before that they are held.
    pub fn poll(&mut self) -> Poll {
        let mut poll = Poll::default();
        while let Ok(update) = self.rx.try_recv() {
            match update {
                Update::Changes { kind, changes, rejected, listed } => {
                    self.held.extend(changes);
                    poll.rejected.extend(rejected);
                    if listed {
                        self.listed.insert(kind);
                    }
                }
                Update::WatchError { kind, error } => {
                    *self.watch_errors.entry(kind).or_default() += 1;
                    poll.watch_errors.push(format!("watching {kind:?}s: {error}"));
                }
            }
        }
        if self.synced() {
            // Namespaces before the pods and policies in them, as listed.
            self.held.sort_by_key(|c| match c {
                Change::UpsertNamespace(_) => 0,
                Change::UpsertPod(_) => 1,
                _ => 2,
            });
            poll.changes = std::mem::take(&mut self.held);
        }
        poll
    }

    /// Applies a poll's changes; when there were any, bumps the revision
    /// and returns true (the state is rebuilt and reported as enforced).
    pub fn feed(&mut self, engine: &mut Engine, poll: &mut Poll) -> bool {
        if poll.changes.is_empty() {
            return false;
        }
        engine.apply(std::mem::take(&mut poll.changes));
        self.revision += 1;
        true
    }
}

type Key = (String, String);

fn key_of<K: Resource>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn delete_change(kind: Kind, (namespace, name): Key) -> Change {
    match kind {
        Kind::Namespace => Change::DeleteNamespace(name),
        Kind::Pod => Change::DeletePod(PodKey { namespace, name }),
        Kind::NetworkPolicy => Change::DeletePolicy((namespace, name)),
        Kind::Service => Change::DeleteService((namespace, name)),
    }
}

/// The per-kind bookkeeping between watcher events and engine changes.
pub struct KindState<K> {
    kind: Kind,
    convert: fn(&K) -> Result<Change, ModelError>,
    /// Objects the engine has, by key, with the resourceVersion last seen.
    known: BTreeMap<Key, Option<String>>,
    /// During a relist: what it has listed so far, and the changes found.
    relist: Option<Relist>,
}

/// A relist under way: the objects listed (with versions), the changes and
/// refusals found so far; applied together when it completes.
#[derive(Default)]
struct Relist {
    listed: BTreeMap<Key, Option<String>>,
    changes: Vec<Change>,
    rejected: Vec<Rejected>,
}

impl<K: Resource> KindState<K> {
    pub fn new(kind: Kind, convert: fn(&K) -> Result<Change, ModelError>) -> Self {
        KindState { kind, convert, known: BTreeMap::new(), relist: None }
    }

    fn upsert(&self, obj: &K, changes: &mut Vec<Change>, rejected: &mut Vec<Rejected>) {
        match (self.convert)(obj) {
            Ok(change) => changes.push(change),
            Err(e) => {
                let (namespace, name) = key_of(obj);
                let uid = obj.meta().uid.clone();
                rejected.push(Rejected { kind: self.kind, namespace, name, uid, error: e.to_string() });
            }
        }
    }

    /// One watcher event in; the update to send out, if any.
    pub fn on_event(&mut self, event: watcher::Event<K>) -> Option<Update> {
        let kind = self.kind;
        match event {
            watcher::Event::Init => {
                self.relist = Some(Relist::default());
                None
            }
            watcher::Event::InitApply(obj) => {
                let key = key_of(&obj);
                let version = obj.meta().resource_version.clone();
                let unchanged = version.is_some() && self.known.get(&key) == Some(&version);
                let mut relist = self.relist.take().unwrap_or_default();
                if !unchanged {
                    self.upsert(&obj, &mut relist.changes, &mut relist.rejected);
                }
                relist.listed.insert(key, version);
                self.relist = Some(relist);
                None
            }
            watcher::Event::InitDone => {
                let Relist { listed, mut changes, rejected } = self.relist.take().unwrap_or_default();
                // Gone while we were not watching: deleted now.
                for key in self.known.keys().filter(|k| !listed.contains_key(*k)) {
                    changes.push(delete_change(kind, key.clone()));
                }
                self.known = listed;
                Some(Update::Changes { kind, changes, rejected, listed: true })
            }
            watcher::Event::Apply(obj) => {
                let (mut changes, mut rejected) = (Vec::new(), Vec::new());
                self.upsert(&obj, &mut changes, &mut rejected);
                self.known.insert(key_of(&obj), obj.meta().resource_version.clone());
                Some(Update::Changes { kind, changes, rejected, listed: false })
            }
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj);
                self.known.remove(&key);
                Some(Update::Changes {
                    kind,
                    changes: vec![delete_change(kind, key)],
                    rejected: vec![],
                    listed: false,
                })
            }
        }
    }
}

fn spawn_watch<K>(
    api: Api<K>,
    kind: Kind,
    tx: mpsc::UnboundedSender<Update>,
    convert: fn(&K) -> Result<Change, ModelError>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(async move {
        let mut state = KindState::new(kind, convert);
        // Bookmarks on (1.17+), plain list+watch (streaming lists need 1.27+).
        let mut stream = watcher(api, watcher::Config::default()).default_backoff().boxed();
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(event) => state.on_event(event),
                Err(e) => Some(Update::WatchError { kind, error: e.to_string() }),
            };
            if let Some(update) = update
                && tx.send(update).is_err()
            {
                return; // the agent is stopping
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn ns(name: &str, version: &str, labels: &[(&str, &str)]) -> core::Namespace {
        core::Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn state() -> KindState<core::Namespace> {
        KindState::new(Kind::Namespace, |n| namespace_from_api(n).map(Change::UpsertNamespace))
    }

    fn changes(update: Option<Update>) -> (Vec<String>, bool) {
        match update {
            Some(Update::Changes { changes, listed, .. }) => (
                changes
                    .iter()
                    .map(|c| match c {
                        Change::UpsertNamespace(n) => format!("upsert {}", n.name),
                        Change::DeleteNamespace(n) => format!("delete {n}"),
                        other => format!("{other:?}"),
                    })
                    .collect(),
                listed,
            ),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    #[test]
    fn a_relist_is_one_batch_with_deletes_for_what_vanished() {
        let mut s = state();
        assert!(s.on_event(watcher::Event::Init).is_none());
        assert!(s.on_event(watcher::Event::InitApply(ns("a", "1", &[]))).is_none());
        assert!(s.on_event(watcher::Event::InitApply(ns("b", "1", &[]))).is_none());
        assert_eq!(
            changes(s.on_event(watcher::Event::InitDone)),
            (vec!["upsert a".into(), "upsert b".into()], true)
        );

        // The watch breaks; meanwhile b is deleted, a relabeled, c created.
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(ns("a", "2", &[("team", "x")])));
        s.on_event(watcher::Event::InitApply(ns("c", "5", &[])));
        assert_eq!(
            changes(s.on_event(watcher::Event::InitDone)),
            (vec!["upsert a".into(), "upsert c".into(), "delete b".into()], true)
        );

        // A relist that finds nothing new sends an empty batch (still "listed").
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(ns("a", "2", &[("team", "x")])));
        s.on_event(watcher::Event::InitApply(ns("c", "5", &[])));
        assert_eq!(changes(s.on_event(watcher::Event::InitDone)), (vec![], true));

        assert_eq!(
            changes(s.on_event(watcher::Event::Apply(ns("d", "6", &[])))),
            (vec!["upsert d".into()], false)
        );
        assert_eq!(
            changes(s.on_event(watcher::Event::Delete(ns("d", "7", &[])))),
            (vec!["delete d".into()], false)
        );
    }

    #[test]
    fn a_refused_object_is_named_and_changes_nothing() {
        let policy = |end_port: i32| -> net::NetworkPolicy {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "x", "resourceVersion": end_port.to_string()},
                "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": end_port}]}]}
            }))
            .unwrap()
        };
        let mut s: KindState<net::NetworkPolicy> =
            KindState::new(Kind::NetworkPolicy, |np| network_policy_from_api(np).map(Change::UpsertPolicy));
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(policy(90)));
        assert!(
            matches!(s.on_event(watcher::Event::InitDone), Some(Update::Changes { ref changes, .. }) if changes.len() == 1)
        );
        match s.on_event(watcher::Event::Apply(policy(70))) {
            Some(Update::Changes { changes, rejected, listed: false, .. }) => {
                assert!(changes.is_empty(), "the last good version stays");
                assert_eq!(
                    rejected,
                    vec![Rejected {
                        kind: Kind::NetworkPolicy,
                        namespace: "x".into(),
                        name: "web".into(),
                        uid: None,
                        error: "NetworkPolicy x/web: spec.ingress[0].ports[0].endPort: 70 is below port 80"
                            .into(),
                    }]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_comes_out_until_every_kind_is_listed() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = KubeSource::from_updates(rx);
        let mut engine = Engine::new("node");
        let upsert = |name: &str| Change::UpsertNamespace(namespace_from_api(&ns(name, "1", &[])).unwrap());
        for (i, kind) in Kind::ALL.iter().enumerate() {
            let changes = if *kind == Kind::Namespace { vec![upsert("a")] } else { vec![] };
            tx.send(Update::Changes { kind: *kind, changes, rejected: vec![], listed: true }).unwrap();
            let mut poll = source.poll();
            if i + 1 < Kind::ALL.len() {
                assert!(poll.changes.is_empty() && !source.synced(), "held until all kinds are listed");
            } else {
                assert!(source.synced());
                assert!(source.feed(&mut engine, &mut poll));
                assert_eq!(source.revision, 1);
            }
        }
        assert!(engine.cluster().namespaces.contains_key("a"));
        tx.send(Update::WatchError { kind: Kind::Pod, error: "410 Gone".into() }).unwrap();
        let poll = source.poll();
        assert_eq!(poll.watch_errors, vec!["watching Pods: 410 Gone".to_string()]);
        assert_eq!(source.watch_errors[&Kind::Pod], 1);
    }
}
