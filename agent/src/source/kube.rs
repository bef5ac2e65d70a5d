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
//!
//! Each kind's newest resourceVersion goes along with its changes, so the
//! agent can say which writes its maps reflect (`GET /v1/status`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::{core::v1 as core, networking::v1 as net};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        utils::ResetTimerBackoff,
        watcher::{self, ExponentialBackoff, watcher},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::{
    model::{
        ModelError, PodKey, namespace_from_api, network_policy_fail_closed, network_policy_from_api,
        pod_from_api, service_from_api,
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

    /// The API's name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::Service => "Service",
        }
    }
}

/// An object the API server holds that the model refuses.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub error: String,
    /// What is enforced for it meanwhile, in words.
    pub meanwhile: &'static str,
}

const LAST_GOOD: &str = "portcullis keeps enforcing its last good version";
const STAND_IN: &str =
    "until a valid version replaces it, portcullis isolates the pods it selects with nothing allowed";

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
            note: Some(format!("{} ({})", r.error, r.meanwhile).chars().take(1000).collect()),
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
    /// `version`: the newest resourceVersion among the objects behind them
    /// (refused and unchanged ones included: they are handled too).
    Changes { kind: Kind, changes: Vec<Change>, rejected: Vec<Rejected>, listed: bool, version: Option<u64> },
    /// The watch failed; the watcher retries with backoff, the last state stays.
    WatchError { kind: Kind, error: String },
}

/// Feeds the engine from the watchers.
pub struct KubeSource {
    rx: mpsc::UnboundedReceiver<Update>,
    /// Notified whenever a watcher sends: the agent's loop wakes for it
    /// instead of waiting for its next tick.
    wake: std::sync::Arc<tokio::sync::Notify>,
    listed: BTreeSet<Kind>,
    /// Changes held back until every kind has been listed once.
    held: Vec<Change>,
    /// The newest resourceVersion drained per kind (held changes included).
    drained: BTreeMap<Kind, u64>,
    /// The newest resourceVersion per kind whose changes the engine has.
    applied: BTreeMap<Kind, u64>,
    /// Bumped whenever a batch moves the engine; reported once enforced.
    pub revision: u64,
    /// Watch restarts since start, per kind (for status and metrics).
    pub watch_errors: BTreeMap<Kind, u64>,
    /// When a watch last delivered something, and when one last failed
    /// (with why): the API server counts as reachable when the first is newer.
    pub last_event: Option<std::time::Instant>,
    pub last_error: Option<(std::time::Instant, String)>,
}

/// What one poll found.
#[derive(Default)]
pub struct Poll {
    pub changes: Vec<Change>,
    pub rejected: Vec<Rejected>,
    pub watch_errors: Vec<String>,
    /// The newest resourceVersion per kind that `changes` brings the engine to.
    pub versions: BTreeMap<Kind, u64>,
}

impl KubeSource {
    /// Starts the four watchers on the current tokio runtime.
    pub fn start(client: Client) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let tx = Sender { tx, wake: wake.clone() };
        let namespaces =
            KindState::new(Kind::Namespace, |ns| namespace_from_api(ns).map(Change::UpsertNamespace));
        spawn_watch::<core::Namespace>(Api::all(client.clone()), tx.clone(), namespaces);
        let pods = KindState::new(Kind::Pod, |pod| pod_from_api(pod).map(Change::UpsertPod));
        spawn_watch::<core::Pod>(Api::all(client.clone()), tx.clone(), pods);
        let policies =
            KindState::new(Kind::NetworkPolicy, |np| network_policy_from_api(np).map(Change::UpsertPolicy))
                .with_fail_closed(|np| network_policy_fail_closed(np).map(Change::UpsertPolicy));
        spawn_watch::<net::NetworkPolicy>(Api::all(client.clone()), tx.clone(), policies);
        let services = KindState::new(Kind::Service, |svc| service_from_api(svc).map(Change::UpsertService));
        spawn_watch::<core::Service>(Api::all(client), tx, services);
        KubeSource { wake, ..Self::from_updates(rx) }
    }

    /// A source over updates from elsewhere (tests).
    pub fn from_updates(rx: mpsc::UnboundedReceiver<Update>) -> Self {
        KubeSource {
            rx,
            wake: Default::default(),
            listed: BTreeSet::new(),
            held: Vec::new(),
            drained: BTreeMap::new(),
            applied: BTreeMap::new(),
            revision: 0,
            watch_errors: BTreeMap::new(),
            last_event: None,
            last_error: None,
        }
    }

    /// Notified when the watchers have sent something since the last
    /// poll (a permit is kept if nobody waits).
    pub fn wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.wake.clone()
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
                Update::Changes { kind, changes, rejected, listed, version } => {
                    self.last_event = Some(std::time::Instant::now());
                    self.held.extend(changes);
                    poll.rejected.extend(rejected);
                    if listed {
                        self.listed.insert(kind);
                    }
                    if let Some(v) = version {
                        let newest = self.drained.entry(kind).or_default();
                        *newest = (*newest).max(v);
                    }
                }
                Update::WatchError { kind, error } => {
                    *self.watch_errors.entry(kind).or_default() += 1;
                    let text = format!("watching {kind:?}s: {error}");
                    self.last_error = Some((std::time::Instant::now(), text.clone()));
                    poll.watch_errors.push(text);
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
            poll.versions = self.drained.clone();
        }
        poll
    }

    /// Applies a poll's changes; when there were any, bumps the revision
    /// and returns true (the state is rebuilt and reported as enforced).
    /// The poll's resourceVersions count as applied either way: a relist
    /// that found nothing new, or a refused update, needs nothing written.
    pub fn feed(&mut self, engine: &mut Engine, poll: &mut Poll) -> bool {
        for (kind, v) in std::mem::take(&mut poll.versions) {
            let newest = self.applied.entry(kind).or_default();
            *newest = (*newest).max(v);
        }
        if poll.changes.is_empty() {
            return false;
        }
        engine.apply(std::mem::take(&mut poll.changes));
        self.revision += 1;
        true
    }

    /// The newest resourceVersion per kind that `feed` gave the engine.
    /// The agent writes the maps in the same pass, so between passes these
    /// are enforced.
    pub fn applied_versions(&self) -> &BTreeMap<Kind, u64> {
        &self.applied
    }

    /// The watches' view of the API server, for `agent status`.
    pub fn health(&self) -> crate::api::ApiServerHealth {
        // A watch that resumes delivers nothing until something changes, so
        // quiet after an error counts too: a failing watch retries, and
        // fails again, within 4 s.
        const QUIET: std::time::Duration = std::time::Duration::from_secs(10);
        let connected = self.synced()
            && match &self.last_error {
                None => true,
                Some((failed, _)) => self.last_event.is_some_and(|e| e > *failed) || failed.elapsed() > QUIET,
            };
        crate::api::ApiServerHealth {
            connected,
            watch_restarts: self.watch_errors.values().sum(),
            last_error: self.last_error.as_ref().map(|(_, e)| e.clone()),
            last_event_ms_ago: self.last_event.map(|t| t.elapsed().as_millis() as u64),
        }
    }
}

type Key = (String, String);

fn key_of<K: Resource>(obj: &K) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// An object's resourceVersion as a number. The API calls it opaque, but
/// every API server backed by etcd writes its revision there (ordered across
/// the cluster); one that does not parse is not counted.
fn version_of<K: Resource>(obj: &K) -> Option<u64> {
    obj.meta().resource_version.as_deref()?.parse().ok()
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
    /// What stands in for an object refused the first time it is seen
    /// (policies: isolation without rules), if anything.
    fail_closed: Option<fn(&K) -> Option<Change>>,
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
    /// The newest resourceVersion listed so far.
    newest: Option<u64>,
}

impl<K: Resource> KindState<K> {
    pub fn new(kind: Kind, convert: fn(&K) -> Result<Change, ModelError>) -> Self {
        KindState { kind, convert, fail_closed: None, known: BTreeMap::new(), relist: None }
    }

    pub fn with_fail_closed(mut self, stand_in: fn(&K) -> Option<Change>) -> Self {
        self.fail_closed = Some(stand_in);
        self
    }

    fn upsert(&self, obj: &K, changes: &mut Vec<Change>, rejected: &mut Vec<Rejected>) {
        match (self.convert)(obj) {
            Ok(change) => changes.push(change),
            Err(e) => {
                let key = key_of(obj);
                // Seen before: its last good version (or stand-in) stays.
                let stand_in = match self.known.contains_key(&key) {
                    true => None,
                    false => self.fail_closed.and_then(|f| f(obj)),
                };
                let meanwhile = if stand_in.is_some() { STAND_IN } else { LAST_GOOD };
                changes.extend(stand_in);
                let (namespace, name) = key;
                let uid = obj.meta().uid.clone();
                rejected.push(Rejected {
                    kind: self.kind,
                    namespace,
                    name,
                    uid,
                    error: e.to_string(),
                    meanwhile,
                });
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
                relist.newest = relist.newest.max(version_of(&obj));
                relist.listed.insert(key, version);
                self.relist = Some(relist);
                None
            }
            watcher::Event::InitDone => {
                let Relist { listed, mut changes, rejected, newest } = self.relist.take().unwrap_or_default();
                // Gone while we were not watching: deleted now.
                for key in self.known.keys().filter(|k| !listed.contains_key(*k)) {
                    changes.push(delete_change(kind, key.clone()));
                }
                self.known = listed;
                Some(Update::Changes { kind, changes, rejected, listed: true, version: newest })
            }
            watcher::Event::Apply(obj) => {
                let (mut changes, mut rejected) = (Vec::new(), Vec::new());
                self.upsert(&obj, &mut changes, &mut rejected);
                self.known.insert(key_of(&obj), obj.meta().resource_version.clone());
                Some(Update::Changes { kind, changes, rejected, listed: false, version: version_of(&obj) })
            }
            // The API server gives a deleted object the deletion's version.
            watcher::Event::Delete(obj) => {
                let key = key_of(&obj);
                self.known.remove(&key);
                Some(Update::Changes {
                    kind,
                    changes: vec![delete_change(kind, key)],
                    rejected: vec![],
                    listed: false,
                    version: version_of(&obj),
                })
            }
        }
    }
}

/// Retries of a failed watch: 0.5 s doubling to 4 s (up to twice that with
/// jitter), reset after a minute of health. client-go's reflectors (and
/// kube-runtime's default) go up to 30 s; for an agent that must apply
/// the first policy changes after an API server outage, that is up to a
/// minute of lag (a refused connection, then 410 Gone, each waits a full
/// step), measured on the test cluster. A retry is one refused connect
/// or one list per kind and node, cheap for a recovering API server.
fn watch_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    let steps = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(4))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(ExponentialBackoff::from(steps), Duration::from_secs(60))
}

/// A watcher's way out: the channel, and the agent loop's wake-up.
#[derive(Clone)]
struct Sender {
    tx: mpsc::UnboundedSender<Update>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

fn spawn_watch<K>(api: Api<K>, tx: Sender, mut state: KindState<K>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let kind = state.kind;
    tokio::spawn(async move {
        // Bookmarks on (1.17+), plain list+watch (streaming lists need 1.27+).
        let mut stream = watcher(api, watcher::Config::default()).backoff(watch_backoff()).boxed();
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(event) => {
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let (what, version) = match &event {
                            watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                                ("apply", o.meta().resource_version.clone())
                            }
                            watcher::Event::Delete(o) => ("delete", o.meta().resource_version.clone()),
                            watcher::Event::Init => ("list started", None),
                            watcher::Event::InitDone => ("list done", None),
                        };
                        tracing::debug!(
                            ?kind,
                            what,
                            version = version.as_deref().unwrap_or("-"),
                            "watch event"
                        );
                    }
                    state.on_event(event)
                }
                Err(e) => Some(Update::WatchError { kind, error: e.to_string() }),
            };
            if let Some(update) = update {
                if tx.tx.send(update).is_err() {
                    return; // the agent is stopping
                }
                tx.wake.notify_one();
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
        let state = || -> KindState<net::NetworkPolicy> {
            KindState::new(Kind::NetworkPolicy, |np| network_policy_from_api(np).map(Change::UpsertPolicy))
                .with_fail_closed(|np| network_policy_fail_closed(np).map(Change::UpsertPolicy))
        };
        // Refused at first sight (an agent that never saw a good version):
        // a stand-in isolates what it selects, allowing nothing.
        let mut s = state();
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(policy(70)));
        match s.on_event(watcher::Event::InitDone) {
            Some(Update::Changes { changes, rejected, .. }) => {
                assert!(
                    matches!(&changes[..], [Change::UpsertPolicy(p)] if p.affects_ingress && p.ingress.is_empty()),
                    "{changes:?}"
                );
                assert_eq!(rejected[0].meanwhile, STAND_IN);
            }
            other => panic!("{other:?}"),
        }

        let mut s = state();
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
                        meanwhile: LAST_GOOD,
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
            tx.send(Update::Changes { kind: *kind, changes, rejected: vec![], listed: true, version: None })
                .unwrap();
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

    #[test]
    fn updates_carry_the_newest_resource_version() {
        let version = |u: Option<Update>| match u {
            Some(Update::Changes { version, .. }) => version,
            other => panic!("expected changes, got {other:?}"),
        };
        let mut s = state();
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(ns("a", "17", &[])));
        s.on_event(watcher::Event::InitApply(ns("b", "9", &[])));
        // Listed by name, not by version: the newest is the largest.
        assert_eq!(version(s.on_event(watcher::Event::InitDone)), Some(17));
        // A relist that changes nothing still says how far it got.
        s.on_event(watcher::Event::Init);
        s.on_event(watcher::Event::InitApply(ns("a", "17", &[])));
        assert_eq!(version(s.on_event(watcher::Event::InitDone)), Some(17));
        assert_eq!(version(s.on_event(watcher::Event::Apply(ns("c", "30", &[])))), Some(30));
        assert_eq!(version(s.on_event(watcher::Event::Delete(ns("c", "31", &[])))), Some(31));
        assert_eq!(version(s.on_event(watcher::Event::Apply(ns("d", "opaque", &[])))), None);
        s.on_event(watcher::Event::Init);
        assert_eq!(version(s.on_event(watcher::Event::InitDone)), None, "an empty list has no version");
    }

    #[test]
    fn applied_versions_follow_what_the_engine_has() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut source = KubeSource::from_updates(rx);
        let mut engine = Engine::new("node");
        let send = |kind: Kind, changes: Vec<Change>, listed: bool, version: Option<u64>| {
            tx.send(Update::Changes { kind, changes, rejected: vec![], listed, version }).unwrap();
        };
        let upsert = |name: &str| Change::UpsertNamespace(namespace_from_api(&ns(name, "1", &[])).unwrap());
        send(Kind::Namespace, vec![upsert("a")], true, Some(10));
        send(Kind::Pod, vec![], true, Some(12));
        send(Kind::NetworkPolicy, vec![], true, None);
        let mut poll = source.poll();
        assert!(poll.versions.is_empty(), "nothing is applied before every kind is listed");
        source.feed(&mut engine, &mut poll);
        assert!(source.applied_versions().is_empty());

        send(Kind::Service, vec![], true, Some(11));
        let mut poll = source.poll();
        assert!(source.feed(&mut engine, &mut poll));
        let want = BTreeMap::from([(Kind::Namespace, 10), (Kind::Pod, 12), (Kind::Service, 11)]);
        assert_eq!(source.applied_versions(), &want);

        // Nothing to change (a refused object, a relist that found all as it
        // was): no new revision, but the version is applied all the same.
        send(Kind::NetworkPolicy, vec![], false, Some(20));
        // A relist after an outage lists older objects: never backwards.
        send(Kind::Namespace, vec![], true, Some(5));
        let mut poll = source.poll();
        assert!(!source.feed(&mut engine, &mut poll));
        assert_eq!(source.revision, 1);
        let want = BTreeMap::from([
            (Kind::Namespace, 10),
            (Kind::Pod, 12),
            (Kind::NetworkPolicy, 20),
            (Kind::Service, 11),
        ]);
        assert_eq!(source.applied_versions(), &want);
    }
}
