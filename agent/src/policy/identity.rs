//! Identities: node-local numbers for distinct security-relevant label sets.
//!
//! A pod's identity is its namespace's name and labels plus its own labels —
//! everything a selector can see. Every label counts: excluding churning ones
//! (`pod-template-hash`, ...) would save identities during rollouts but make a
//! selector on them wrong, and policy must be exactly Kubernetes'. Numbers are
//! never handed out twice in an agent's life, so a flow event or a conntrack
//! entry can never be read as another label set's; a restarted agent takes
//! over its predecessor's numbers where they surely mean the same label set
//! (`Engine::recover_identities`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use portcullis_common::identity::FIRST_ALLOCATED;

use crate::model::{Cluster, Labels, Pod};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityLabels {
    pub namespace: String,
    pub namespace_labels: Labels,
    pub pod_labels: Labels,
}

impl IdentityLabels {
    pub fn of(cluster: &Cluster, pod: &Pod) -> Self {
        IdentityLabels {
            namespace: pod.namespace.clone(),
            namespace_labels: cluster.namespace_labels(&pod.namespace).clone(),
            pod_labels: pod.labels.clone(),
        }
    }
}

impl std::fmt::Display for IdentityLabels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ns={}", self.namespace)?;
        for (k, v) in &self.pod_labels {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Identities {
    /// Labels are stored once, shared by both directions of the mapping.
    by_labels: HashMap<Arc<IdentityLabels>, (u32, usize)>,
    by_id: BTreeMap<u32, Arc<IdentityLabels>>,
    by_namespace: BTreeMap<String, BTreeSet<u32>>,
    next: u32,
    /// Numbers an earlier agent gave, not handed out yet in this life: each
    /// goes, once, to the label set that asks for it first.
    recovered: BTreeSet<u32>,
}

impl Default for Identities {
    fn default() -> Self {
        Identities {
            by_labels: HashMap::new(),
            by_id: BTreeMap::new(),
            by_namespace: BTreeMap::new(),
            next: FIRST_ALLOCATED,
            recovered: BTreeSet::new(),
        }
    }
}

impl Identities {
    /// The identity of `labels`, allocated if new; counts one more holder.
    pub fn acquire(&mut self, labels: IdentityLabels) -> u32 {
        self.acquire_preferring(labels, None)
    }

    /// Numbers the agent before this one gave (read from the pinned
    /// ipcache): fresh numbers start above them, and `acquire_preferring`
    /// hands each out again, once. A restarted agent then gives the pods
    /// the numbers the maps already hold, and adopting them rewrites
    /// nothing; renumbering would switch the ipcache to new numbers before
    /// the policy naming them, and drop allowed packets meanwhile.
    pub fn recover(&mut self, ids: impl IntoIterator<Item = u32>) {
        let allocated = FIRST_ALLOCATED..portcullis_common::identity::CLASS_BASE;
        for id in ids.into_iter().filter(|id| allocated.contains(id) && !self.by_id.contains_key(id)) {
            self.recovered.insert(id);
            self.next = self.next.max(id.saturating_add(1));
        }
    }

    /// As `acquire`; a new label set gets `preferred` when an earlier agent
    /// gave it (`recover`) and no one has it yet in this life. The caller
    /// makes sure the number meant this label set (`Engine::plan_recovered`).
    pub fn acquire_preferring(&mut self, labels: IdentityLabels, preferred: Option<u32>) -> u32 {
        if let Some((id, refs)) = self.by_labels.get_mut(&labels) {
            *refs += 1;
            return *id;
        }
        let id = match preferred.filter(|p| self.recovered.remove(p)) {
            Some(p) => p,
            None => {
                self.next += 1;
                self.next - 1
            }
        };
        self.by_namespace.entry(labels.namespace.clone()).or_default().insert(id);
        let labels = Arc::new(labels);
        self.by_id.insert(id, labels.clone());
        self.by_labels.insert(labels, (id, 1));
        id
    }

    /// One holder fewer; returns true when the identity is gone.
    pub fn release(&mut self, id: u32) -> bool {
        let Some(labels) = self.by_id.get(&id) else { return false };
        let Some((_, refs)) = self.by_labels.get_mut(labels) else { return false };
        *refs -= 1;
        if *refs > 0 {
            return false;
        }
        if let Some(labels) = self.by_id.remove(&id) {
            self.by_labels.remove(&labels);
            if let Some(ids) = self.by_namespace.get_mut(&labels.namespace) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.by_namespace.remove(&labels.namespace);
                }
            }
        }
        true
    }

    pub fn get(&self, labels: &IdentityLabels) -> Option<u32> {
        self.by_labels.get(labels).map(|(id, _)| *id)
    }

    pub fn labels(&self, id: u32) -> Option<&IdentityLabels> {
        self.by_id.get(&id).map(|l| &**l)
    }

    /// Live identities in number order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &IdentityLabels)> {
        self.by_id.iter().map(|(id, l)| (*id, &**l))
    }

    /// Namespaces that have live identities.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.by_namespace.keys().map(String::as_str)
    }

    /// Live identities of one namespace.
    pub fn in_namespace<'a>(&'a self, namespace: &str) -> impl Iterator<Item = u32> + 'a {
        self.by_namespace.get(namespace).into_iter().flatten().copied()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ns: &str, app: &str) -> IdentityLabels {
        IdentityLabels {
            namespace: ns.into(),
            namespace_labels: Labels::new(),
            pod_labels: [("app".to_string(), app.to_string())].into(),
        }
    }

    #[test]
    fn same_labels_same_identity_while_held() {
        let mut ids = Identities::default();
        let a = ids.acquire(labels("x", "a"));
        assert_eq!(ids.acquire(labels("x", "a")), a);
        assert_ne!(ids.acquire(labels("y", "a")), a, "the namespace is part of the identity");
        assert!(!ids.release(a), "one holder left");
        assert_eq!(ids.get(&labels("x", "a")), Some(a));
        assert!(ids.release(a));
        assert_eq!(ids.get(&labels("x", "a")), None);
        assert_ne!(ids.acquire(labels("x", "a")), a, "numbers are not reused");
    }
}
