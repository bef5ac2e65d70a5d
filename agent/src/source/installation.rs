//! Whether the agent's own installation is being removed: its DaemonSet
//! deleted, or the namespace it runs in. A SIGTERM alone does not say: a
//! rolling update, a pod deleted by hand and an uninstall all send one. On
//! the first two the pins must stay (they keep enforcing until the next
//! agent adopts them); only on an uninstall does the agent take its
//! programs, pins and CNI plugin off the node.
//!
//! The answer comes from watches opened at start, because `kubectl delete
//! -k` removes the agent's RBAC and ServiceAccount at the same moment as
//! its DaemonSet: by the time SIGTERM arrives, a fresh request may be
//! refused, but a watch already open keeps delivering events.

use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;

/// What the watches have seen of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Seen {
    /// Nothing yet (or the object never existed: then its absence proves
    /// nothing, e.g. an agent started without a DaemonSet).
    #[default]
    Nothing,
    Present,
    /// Deleted, or marked for deletion; the text says which.
    Removing(String),
}

/// Follows one object's watch events.
#[derive(Debug, Default)]
pub struct Tracker {
    pub seen: Seen,
    /// The object was in the (re)list under way.
    listed: bool,
}

impl Tracker {
    /// Takes one watch event about the object.
    pub fn on<K: Resource>(&mut self, event: &watcher::Event<K>, what: &str) {
        let judge = |obj: &K| match obj.meta().deletion_timestamp {
            Some(_) => Seen::Removing(format!("{what} is being deleted")),
            None => Seen::Present,
        };
        match event {
            watcher::Event::Init => self.listed = false,
            watcher::Event::InitApply(obj) => {
                self.listed = true;
                self.seen = judge(obj);
            }
            // A relist without an object we saw: it went while the watch
            // was down (a plain watcher sends no Delete for that).
            watcher::Event::InitDone if !self.listed && self.seen == Seen::Present => {
                self.seen = Seen::Removing(format!("{what} was deleted"));
            }
            watcher::Event::InitDone => {}
            watcher::Event::Apply(obj) => self.seen = judge(obj),
            watcher::Event::Delete(_) => self.seen = Seen::Removing(format!("{what} was deleted")),
        }
    }
}

/// The agent's DaemonSet and namespace, watched from start.
pub struct Installation {
    client: Client,
    namespace: String,
    daemonset: String,
    daemonset_seen: watch::Receiver<Seen>,
    namespace_seen: watch::Receiver<Seen>,
}

impl Installation {
    /// Starts the two watches (one object each, by field selector).
    pub fn watch(client: Client, namespace: &str, daemonset: &str) -> Self {
        let ds_api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
        let ns_api: Api<Namespace> = Api::all(client.clone());
        Installation {
            daemonset_seen: spawn_watch(ds_api, daemonset, format!("DaemonSet {namespace}/{daemonset}")),
            namespace_seen: spawn_watch(ns_api, namespace, format!("namespace {namespace}")),
            client,
            namespace: namespace.into(),
            daemonset: daemonset.into(),
        }
    }

    /// Why the installation is being removed, if it is. Called once, at
    /// SIGTERM. The watches answer first; if they have not seen a removal,
    /// the API server is asked once more (a deletion can be milliseconds
    /// old). A request that fails proves nothing: the pins stay.
    pub async fn being_removed(&self) -> Option<String> {
        for seen in [&self.daemonset_seen, &self.namespace_seen] {
            if let Seen::Removing(why) = &*seen.borrow() {
                return Some(why.clone());
            }
        }
        let ask = async {
            let ds: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.namespace);
            let ns: Api<Namespace> = Api::all(self.client.clone());
            let ds_seen = *self.daemonset_seen.borrow() == Seen::Present;
            match ds.get_opt(&self.daemonset).await {
                Ok(Some(d)) if d.metadata.deletion_timestamp.is_some() => {
                    return Some(format!("DaemonSet {}/{} is being deleted", self.namespace, self.daemonset));
                }
                // Gone, and it existed while we ran: deleted.
                Ok(None) if ds_seen => {
                    return Some(format!("DaemonSet {}/{} was deleted", self.namespace, self.daemonset));
                }
                _ => {}
            }
            match ns.get_opt(&self.namespace).await {
                Ok(Some(n)) if n.metadata.deletion_timestamp.is_some() => {
                    Some(format!("namespace {} is being deleted", self.namespace))
                }
                _ => None,
            }
        };
        tokio::time::timeout(Duration::from_secs(3), ask).await.ok().flatten()
    }
}

fn spawn_watch<K>(api: Api<K>, name: &str, what: String) -> watch::Receiver<Seen>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let (tx, rx) = watch::channel(Seen::Nothing);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut tracker = Tracker::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    tracker.on(&event, &what);
                    if tracker.seen != *tx.borrow() {
                        if let Seen::Removing(why) = &tracker.seen {
                            tracing::info!(
                                "{why}: this agent will uninstall itself from the node when stopped"
                            );
                        }
                        tx.send_replace(tracker.seen.clone());
                    }
                }
                Err(e) => tracing::debug!(error = %e, "watching {what}"),
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    use super::*;

    fn ds(deleting: bool) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("portcullis".into()),
                deletion_timestamp: deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_a_seen_deletion_counts_as_removal() {
        let what = "DaemonSet portcullis/portcullis";
        let mut t = Tracker::default();
        t.on(&watcher::Event::<DaemonSet>::Init, what);
        t.on(&watcher::Event::<DaemonSet>::InitDone, what);
        assert_eq!(t.seen, Seen::Nothing, "never seen: absence proves nothing");
        t.on(&watcher::Event::Apply(ds(false)), what);
        assert_eq!(t.seen, Seen::Present);
        // A rolling update changes the DaemonSet; it stays present.
        t.on(&watcher::Event::Apply(ds(false)), what);
        assert_eq!(t.seen, Seen::Present);
        // A relist that has it: still present.
        t.on(&watcher::Event::<DaemonSet>::Init, what);
        t.on(&watcher::Event::InitApply(ds(false)), what);
        t.on(&watcher::Event::<DaemonSet>::InitDone, what);
        assert_eq!(t.seen, Seen::Present);
        t.on(&watcher::Event::Apply(ds(true)), what);
        assert_eq!(t.seen, Seen::Removing(format!("{what} is being deleted")));

        let mut t = Tracker::default();
        t.on(&watcher::Event::Apply(ds(false)), what);
        t.on(&watcher::Event::Delete(ds(false)), what);
        assert_eq!(t.seen, Seen::Removing(format!("{what} was deleted")));

        // Deleted while the watch was down: the relist lacks it.
        let mut t = Tracker::default();
        t.on(&watcher::Event::InitApply(ds(false)), what);
        t.on(&watcher::Event::<DaemonSet>::InitDone, what);
        assert_eq!(t.seen, Seen::Present);
        t.on(&watcher::Event::<DaemonSet>::Init, what);
        t.on(&watcher::Event::<DaemonSet>::InitDone, what);
        assert_eq!(t.seen, Seen::Removing(format!("{what} was deleted")));
    }
}
