//! What the cluster holds of the kinds the runner writes ([`Snapshot`]),
//! and what to change so that it holds a case's model and no policy
//! ([`Plan`]): objects that match are kept, labels are set to the model's,
//! what differs is recreated.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Result, bail};
use portcullis_conformance::world::World;
use serde_json::Value;

use super::objects::{
    self, BARRIER, BORROWED, OWNER, annotation, created, label_patch, labels, same_fingerprint,
};

pub struct Snapshot {
    pub namespaces: BTreeMap<String, Value>,
    /// Namespaced objects by (kind, namespace, name).
    objects: BTreeMap<(String, String, String), Value>,
}

impl Snapshot {
    /// From the items of a `kubectl get … -o json` list.
    pub fn new(items: &[Value]) -> Snapshot {
        let mut snapshot = Snapshot { namespaces: BTreeMap::new(), objects: BTreeMap::new() };
        for item in items {
            let kind = item["kind"].as_str().unwrap_or_default().to_owned();
            let name = item["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            match item["metadata"]["namespace"].as_str() {
                None if kind == "Namespace" => {
                    snapshot.namespaces.insert(name, item.clone());
                }
                Some(ns) => {
                    snapshot.objects.insert((kind, ns.to_owned(), name), item.clone());
                }
                None => {}
            }
        }
        snapshot
    }

    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(kind.to_owned(), namespace.to_owned(), name.to_owned()))
    }

    /// The objects of one kind in one namespace, by name.
    pub fn in_namespace<'a>(
        &'a self,
        kind: &'a str,
        namespace: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Value)> {
        self.objects
            .iter()
            .filter(move |((k, ns, _), _)| k == kind && ns == namespace)
            .map(|((_, _, n), v)| (n.as_str(), v))
    }
}

/// Where a pod is, as far as the runner cares.
#[derive(Debug, PartialEq)]
pub enum PodState {
    Running(IpAddr),
    /// Not yet, and why.
    Starting(String),
    /// It will not run without help.
    Broken(String),
}

pub fn pod_state(pod: &Value) -> PodState {
    const STUCK: [&str; 7] = [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    ];
    if pod["metadata"]["deletionTimestamp"].is_string() {
        return PodState::Broken("being deleted".into());
    }
    let status = &pod["status"];
    let phase = status["phase"].as_str().unwrap_or("Pending");
    if phase == "Failed" || phase == "Succeeded" {
        return PodState::Broken(format!(
            "{phase}: {}",
            status["reason"].as_str().unwrap_or("no reason given")
        ));
    }
    for c in status["containerStatuses"].as_array().into_iter().flatten() {
        let waiting = &c["state"]["waiting"];
        if let Some(reason) = waiting["reason"].as_str().filter(|r| STUCK.contains(r)) {
            let message = waiting["message"].as_str().unwrap_or_default();
            return PodState::Broken(format!(
                "container {}: {reason} {message}",
                c["name"].as_str().unwrap_or("?")
            ));
        }
    }
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    match status["podIP"].as_str().and_then(|ip| ip.parse().ok()) {
        Some(ip) if phase == "Running" && ready => PodState::Running(ip),
        _ => PodState::Starting(format!("{phase}{}", if ready { "" } else { ", not ready" })),
    }
}

/// The kubectl resource of a kind.
pub fn resource(kind: &str) -> &'static str {
    match kind {
        "Namespace" => "namespace",
        "Pod" => "pod",
        "Service" => "service",
        "Endpoints" => "endpoints",
        _ => "networkpolicy",
    }
}

/// (kubectl resource, namespace): where a list of names goes.
type Place = (&'static str, Option<String>);

/// What to change, carried out in this order: deletes; waits until the
/// `gone` namespaces and `recreate` names no longer exist; one apply; label
/// patches.
#[derive(Debug, Default)]
pub struct Plan {
    pub delete: BTreeMap<Place, Vec<String>>,
    /// Namespaces being deleted that the case needs again.
    pub gone: Vec<String>,
    /// Deleted names that are created again.
    pub recreate: BTreeMap<Place, Vec<String>>,
    /// Objects to create or update, namespaces first.
    pub apply: Vec<Value>,
    /// (resource, namespace, name, JSON merge patch).
    pub patch: Vec<(&'static str, Option<String>, String, Value)>,
}

impl Plan {
    /// The changes that make the cluster hold `world`'s model and no policy.
    /// The runner's namespaces the case does not use are emptied and kept
    /// for a later case (an empty namespace changes no verdict, and 1.20
    /// takes long to delete one); borrowed ones are given back. `serial`
    /// makes the barrier policy a write when policies are deleted.
    pub fn new(snap: &Snapshot, world: &World, serial: u128) -> Result<Plan> {
        let mut plan = Plan::default();
        let wanted = &world.namespaces;
        for (name, ns) in snap.namespaces.iter().filter(|(n, _)| !wanted.contains_key(*n)) {
            if created(ns) {
                plan.empty(snap, name);
            } else if annotation(ns, OWNER) == Some(BORROWED) {
                plan.give_back(snap, name, ns);
            }
        }
        // The model's namespaces with its labels; `fresh` ones hold nothing yet.
        let mut fresh = BTreeSet::new();
        for (name, want) in wanted {
            match snap.namespaces.get(name) {
                Some(ns) if ns["status"]["phase"] == "Terminating" => {
                    plan.gone.push(name.clone());
                    fresh.insert(name.clone());
                    plan.apply.push(objects::namespace(name, want));
                }
                None => {
                    fresh.insert(name.clone());
                    plan.apply.push(objects::namespace(name, want));
                }
                Some(ns) if annotation(ns, OWNER).is_none() => {
                    plan.patch.push(("namespace", None, name.clone(), objects::borrow(ns, want)));
                }
                Some(ns) => {
                    if let Some(patch) = label_patch(&labels(ns), want) {
                        plan.patch.push(("namespace", None, name.clone(), patch));
                    }
                }
            }
        }
        // Pods running what the model's pod needs are kept and relabelled;
        // the runner's other pods, Services and Endpoints go, and every
        // policy but the barrier.
        let Some(barrier_ns) = wanted.keys().next() else { bail!("the model has no namespace") };
        let mut kept = BTreeSet::new();
        let mut policies_deleted = false;
        for ns in wanted.keys().filter(|n| !fresh.contains(*n)) {
            for (name, live) in snap.in_namespace("Pod", ns) {
                let id = format!("{ns}/{name}");
                match world.pod(&id) {
                    Some(_) if !created(live) => {
                        bail!("pod {id} exists and is not the runner's: delete it first")
                    }
                    Some(want)
                        if same_fingerprint(live, &objects::pod(want))
                            && !matches!(pod_state(live), PodState::Broken(_)) =>
                    {
                        kept.insert(id);
                        if let Some(patch) = label_patch(&labels(live), &want.labels) {
                            plan.patch.push(("pod", Some(ns.clone()), name.to_owned(), patch));
                        }
                    }
                    Some(_) => {
                        plan.add(Step::Delete, "pod", Some(ns), name);
                        plan.add(Step::Recreate, "pod", Some(ns), name);
                    }
                    None if created(live) => plan.add(Step::Delete, "pod", Some(ns), name),
                    None => {}
                }
            }
            for kind in ["Service", "Endpoints"] {
                for (name, live) in snap.in_namespace(kind, ns) {
                    let serves = world.pods.iter().any(|p| p.namespace == *ns && p.service_name() == name);
                    if created(live) && !serves {
                        plan.add(Step::Delete, resource(kind), Some(ns), name);
                    }
                }
            }
            for (name, _) in snap.in_namespace("NetworkPolicy", ns) {
                if !(ns == barrier_ns && name == BARRIER) {
                    plan.add(Step::Delete, "networkpolicy", Some(ns), name);
                    policies_deleted = true;
                }
            }
        }
        for pod in &world.pods {
            if !kept.contains(&pod.id()) {
                plan.apply.push(objects::pod(pod));
            }
            let service = objects::service(pod);
            let live = snap.get("Service", &pod.namespace, &pod.service_name());
            let current =
                live.is_some_and(|l| same_fingerprint(l, &service)) && !fresh.contains(&pod.namespace);
            if !current {
                plan.apply.push(service);
            }
        }
        // Written after the deletes: an agent past it is past them.
        if policies_deleted {
            plan.apply.push(objects::barrier(barrier_ns, serial));
        }
        Ok(plan)
    }

    /// Deletes every object of the runner in namespace `ns`.
    pub fn empty(&mut self, snap: &Snapshot, ns: &str) {
        for kind in ["Pod", "Service", "Endpoints", "NetworkPolicy"] {
            for (name, _) in snap.in_namespace(kind, ns).filter(|(_, o)| created(o)) {
                self.add(Step::Delete, resource(kind), Some(ns), name);
            }
        }
    }

    /// A borrowed namespace back as it was: the runner's objects in it
    /// deleted, its labels restored.
    pub fn give_back(&mut self, snap: &Snapshot, name: &str, ns: &Value) {
        self.empty(snap, name);
        self.patch.push(("namespace", None, name.to_owned(), objects::give_back(ns)));
    }

    fn add(&mut self, step: Step, resource: &'static str, namespace: Option<&str>, name: &str) {
        let list = match step {
            Step::Delete => &mut self.delete,
            Step::Recreate => &mut self.recreate,
        };
        list.entry((resource, namespace.map(str::to_owned))).or_default().push(name.to_owned());
    }
}

enum Step {
    Delete,
    Recreate,
}

#[cfg(test)]
mod tests {
    use portcullis_conformance::{Case, world::Family};
    use serde_json::json;

    use super::*;

    fn world() -> World {
        let case = Case::parse(
            "inline.yaml",
            r#"
name: plan
model:
  namespaces: {x: {labels: {ns: x}}}
  pods:
    - {name: x/a, labels: {pod: a}, ports: [{port: 80, protocol: TCP}]}
    - {name: x/b, labels: {pod: b}, ports: [{port: 80, protocol: TCP}]}
steps: []
"#,
        )
        .expect("case");
        World::new(&case, Family::V4, false)
    }

    /// The world's objects as the cluster would hold them, running.
    fn running(world: &World) -> Vec<Value> {
        let mut items: Vec<Value> = world.namespaces.iter().map(|(n, l)| objects::namespace(n, l)).collect();
        for (i, pod) in world.pods.iter().enumerate() {
            let mut p = objects::pod(pod);
            p["status"] = json!({
                "phase": "Running", "podIP": format!("10.244.0.{}", i + 2),
                "conditions": [{"type": "Ready", "status": "True"}],
            });
            items.extend([p, objects::service(pod)]);
        }
        items
    }

    fn names(plan: &Plan, resource: &'static str, ns: &str) -> Vec<String> {
        plan.delete.get(&(resource, Some(ns.to_owned()))).cloned().unwrap_or_default()
    }

    #[test]
    fn an_empty_cluster_gets_the_whole_model() {
        let plan = Plan::new(&Snapshot::new(&[]), &world(), 1).expect("plan");
        let kinds: Vec<&str> = plan.apply.iter().map(|o| o["kind"].as_str().unwrap_or("?")).collect();
        assert_eq!(kinds, ["Namespace", "Pod", "Service", "Pod", "Service"]);
        assert!(plan.delete.is_empty() && plan.patch.is_empty() && plan.gone.is_empty());
    }

    #[test]
    fn a_matching_cluster_is_reset_not_recreated() {
        let world = world();
        let mut items = running(&world);
        // A case relabelled x/a and the namespace, and left a policy.
        items[1]["metadata"]["labels"] = json!({"pod": "a2", "extra": "1"});
        items[0]["metadata"]["labels"]["team"] = json!("blue");
        items.push(json!({"kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "x"}}));
        let plan = Plan::new(&Snapshot::new(&items), &world, 7).expect("plan");

        assert_eq!(names(&plan, "networkpolicy", "x"), ["deny"]);
        assert!(plan.recreate.is_empty());
        let patched: Vec<(&str, &str)> = plan.patch.iter().map(|(r, _, n, _)| (*r, n.as_str())).collect();
        assert_eq!(patched, [("namespace", "x"), ("pod", "a")]);
        assert_eq!(plan.patch[1].3, json!({"metadata": {"labels": {"pod": "a", "extra": null}}}));
        // Nothing to create; the barrier after the delete.
        assert_eq!(plan.apply, [objects::barrier("x", 7)]);

        // Reset again, with the barrier left in place: nothing to do.
        let mut items = running(&world);
        items.push(objects::barrier("x", 7));
        let plan = Plan::new(&Snapshot::new(&items), &world, 8).expect("plan");
        assert!(plan.apply.is_empty() && plan.delete.is_empty() && plan.patch.is_empty());
    }

    #[test]
    fn what_differs_is_recreated_and_what_is_unused_emptied() {
        let world = world();
        let mut items = running(&world);
        // x/b served another port; x/c is not in this model; namespace y
        // (the runner's) holds a pod of an earlier case; default was borrowed.
        let mut other = world.pods[1].clone();
        other.ports[0].port = 81;
        items[3] = objects::pod(&other);
        let mut c = world.pods[1].clone();
        c.name = "c".into();
        items.extend([objects::pod(&c), objects::service(&c)]);
        let mut y = world.pods[1].clone();
        y.namespace = "y".into();
        items.extend([objects::namespace("y", &Default::default()), objects::pod(&y)]);
        items.push(json!({
            "kind": "Namespace",
            "metadata": {"name": "default", "labels": {"ns": "default"},
                         "annotations": {OWNER: BORROWED, objects::ORIGINAL_LABELS: "{}"}},
        }));
        let plan = Plan::new(&Snapshot::new(&items), &world, 1).expect("plan");

        assert_eq!(names(&plan, "pod", "x"), ["b", "c"]);
        assert_eq!(plan.recreate, BTreeMap::from([(("pod", Some("x".to_owned())), vec!["b".to_owned()])]));
        assert_eq!(names(&plan, "service", "x"), ["s-x-c"]);
        assert_eq!(names(&plan, "pod", "y"), ["b"]);
        assert!(!plan.delete.contains_key(&("namespace", None)), "namespaces are kept");
        let creates: Vec<(&str, &str)> = plan
            .apply
            .iter()
            .map(|o| (o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"].as_str().unwrap_or("?")))
            .collect();
        assert_eq!(creates, [("Pod", "b")]);
        assert_eq!(plan.patch.len(), 1);
        assert_eq!(plan.patch[0].2, "default");
        assert_eq!(plan.patch[0].3["metadata"]["labels"], json!({"ns": null}));
    }

    #[test]
    fn a_namespace_being_deleted_is_waited_for_and_someone_elses_pod_refused() {
        let world = world();
        let mut items = running(&world);
        items[0]["status"] = json!({"phase": "Terminating"});
        let plan = Plan::new(&Snapshot::new(&items), &world, 1).expect("plan");
        assert_eq!(plan.gone, ["x"]);
        assert_eq!(plan.apply.len(), 5, "everything anew: {:?}", plan.apply);

        let mut items = running(&world);
        items[1]["metadata"]["annotations"] = json!({});
        let e = Plan::new(&Snapshot::new(&items), &world, 1).expect_err("not the runner's");
        assert!(e.to_string().contains("x/a exists and is not the runner's"), "{e}");
    }

    #[test]
    fn a_pod_runs_once_ready_with_an_address() {
        let pod = |phase: &str, ready: &str, ip: Option<&str>| {
            json!({
                "metadata": {"name": "a"},
                "status": {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
            })
        };
        assert_eq!(
            pod_state(&pod("Running", "True", Some("10.244.0.7"))),
            PodState::Running("10.244.0.7".parse().unwrap())
        );
        assert_eq!(
            pod_state(&pod("Running", "False", Some("10.244.0.7"))),
            PodState::Starting("Running, not ready".into())
        );
        assert_eq!(
            pod_state(&pod("Pending", "False", None)),
            PodState::Starting("Pending, not ready".into())
        );
        assert!(matches!(pod_state(&pod("Failed", "False", None)), PodState::Broken(_)));
        let mut pulling = pod("Pending", "False", None);
        pulling["status"]["containerStatuses"] = json!([{
            "name": "serve-80-tcp",
            "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}},
        }]);
        assert_eq!(
            pod_state(&pulling),
            PodState::Broken("container serve-80-tcp: ErrImagePull not found".into())
        );
        let mut going = pod("Running", "True", Some("10.244.0.7"));
        going["metadata"]["deletionTimestamp"] = json!("2024-01-01T00:00:00Z");
        assert!(matches!(pod_state(&going), PodState::Broken(_)));
    }
}
