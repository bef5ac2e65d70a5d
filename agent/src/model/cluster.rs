//! A snapshot of every object policy reads, keyed for deterministic order.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use super::{Labels, Namespace, NetworkPolicy, Pod, PodKey, Service};

/// `(namespace, name)`.
pub type ObjectKey = (String, String);

#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodKey, Pod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pub services: BTreeMap<ObjectKey, Service>,
}

static NO_LABELS: Labels = Labels::new();

impl Cluster {
    /// Labels of a namespace; none if the namespace is not (yet) known.
    pub fn namespace_labels(&self, namespace: &str) -> &Labels {
        self.namespaces.get(namespace).map_or(&NO_LABELS, |n| &n.labels)
    }

    /// Policies of one namespace, in name order.
    pub fn policies_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a NetworkPolicy> + 'a {
        let start = (namespace.to_string(), String::new());
        self.policies.range(start..).map(|(_, p)| p).take_while(move |p| p.namespace == namespace)
    }

    pub fn add_namespace(&mut self, ns: Namespace) {
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn add_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.key(), pod);
    }

    pub fn add_policy(&mut self, policy: NetworkPolicy) {
        self.policies.insert((policy.namespace.clone(), policy.name.clone()), policy);
    }

    /// Each pod address and the pod holding it (`address_holders`).
    pub fn address_holders(&self) -> HashMap<IpAddr, &Pod> {
        address_holders(self.pods.values())
    }
}

/// Each address of `pods` and the pod holding it: of the pods that own it
/// (`Pod::owns_addresses`), the one with the greatest
/// `Pod::address_precedence`. Addresses no pod owns (a node's, which pods
/// on the host network share) are not here.
pub fn address_holders<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashMap<IpAddr, &'a Pod> {
    let mut out: HashMap<IpAddr, &Pod> = HashMap::new();
    for pod in pods.into_iter().filter(|p| p.owns_addresses()) {
        for ip in &pod.ips {
            out.entry(*ip)
                .and_modify(|held| {
                    if pod.address_precedence() > held.address_precedence() {
                        *held = pod;
                    }
                })
                .or_insert(pod);
        }
    }
    out
}
