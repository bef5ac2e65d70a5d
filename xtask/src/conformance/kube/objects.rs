//! The API objects the runner writes for a case's model: each namespace;
//! each pod, one agnhost `serve-hostname` container per port and protocol
//! with the container ports the case names; its Service `s-<ns>-<pod>`
//! without a selector (pod labels change during a case) and the Endpoints
//! that lead it to the pod. Annotations mark what the runner owns and what
//! it wrote, so objects can be reused across cases; labels are the model's
//! alone, since policies select on them.

use std::{collections::BTreeMap, net::IpAddr};

use portcullis_conformance::{
    case::{PortSpec, Protocol},
    world::WorldPod,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::cluster::images::AGNHOST;

/// Who owns an object: [`CREATED`] (the runner made it, and deletes it when
/// done) or [`BORROWED`] (a namespace that existed, `default` say: the
/// runner gives it back as it found it).
pub const OWNER: &str = "conformance.portcullis.test/owner";
pub const CREATED: &str = "runner";
pub const BORROWED: &str = "borrowed";
/// A borrowed namespace's labels before the runner set the model's.
pub const ORIGINAL_LABELS: &str = "conformance.portcullis.test/original-labels";
/// A digest of what the runner wrote (labels aside): an object whose digest
/// matches what the next case needs is kept.
pub const FINGERPRINT: &str = "conformance.portcullis.test/fingerprint";
/// The NetworkPolicy written after deletes, so that the agent's progress on
/// NetworkPolicies passes a version the runner knows (see `status`).
pub const BARRIER: &str = "portcullis-conformance-barrier";

pub type Labels = BTreeMap<String, String>;

fn fingerprint(what: &Value) -> String {
    let digest = Sha256::digest(what.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

/// The name of a port on the pod's Service and Endpoints (`tcp-80`).
pub fn service_port_name(p: &PortSpec) -> String {
    format!("{}-{}", protocol(p.protocol).to_lowercase(), p.port)
}

/// What the pod's servers answer, and so what a probe must read: unique
/// per pod (pod names repeat across namespaces), a DNS label.
pub fn hostname(pod: &WorldPod) -> String {
    let mut name: String =
        format!("{}-{}", pod.namespace, pod.name).replace('.', "-").chars().take(63).collect();
    while name.ends_with('-') {
        name.pop();
    }
    name
}

pub fn namespace(name: &str, labels: &Labels) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "annotations": {OWNER: CREATED}},
    })
}

pub fn pod(pod: &WorldPod) -> Value {
    let containers: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mode = match p.protocol {
                Protocol::Tcp => Some("--tcp"),
                Protocol::Udp => Some("--udp"),
                // serve-hostname has no SCTP: the port is declared (a named
                // port resolves), nothing answers.
                Protocol::Sctp => None,
            };
            let args: Vec<String> = match mode {
                Some(mode) => {
                    vec![
                        "serve-hostname".into(),
                        mode.into(),
                        "--http=false".into(),
                        format!("--port={}", p.port),
                    ]
                }
                None => vec!["pause".into()],
            };
            let mut port = json!({"containerPort": p.port, "protocol": protocol(p.protocol)});
            if let Some(name) = &p.name {
                port["name"] = json!(name);
            }
            json!({
                "name": format!("serve-{}-{}", p.port, protocol(p.protocol).to_lowercase()),
                "image": AGNHOST,
                "args": args,
                "ports": [port],
            })
        })
        .collect();
    let spec = json!({
        "hostname": hostname(pod),
        "containers": containers,
        // serve-hostname lingers 60 s after SIGTERM; nothing here needs it.
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
    });
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "labels": pod.labels,
            "annotations": {OWNER: CREATED, FINGERPRINT: fingerprint(&spec)},
        },
        "spec": spec,
    })
}

/// The pod's Service: a ClusterIP with the pod's ports, no selector.
pub fn service(pod: &WorldPod) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            json!({
                "name": service_port_name(p), "port": p.port,
                "protocol": protocol(p.protocol), "targetPort": p.port,
            })
        })
        .collect();
    let spec = json!({"type": "ClusterIP", "ports": ports});
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": pod.service_name(), "namespace": pod.namespace,
            "annotations": {OWNER: CREATED, FINGERPRINT: fingerprint(&spec)},
        },
        "spec": spec,
    })
}

/// The Endpoints that lead the pod's Service to the pod at `ip`.
pub fn endpoints(pod: &WorldPod, ip: IpAddr) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| json!({"name": service_port_name(p), "port": p.port, "protocol": protocol(p.protocol)}))
        .collect();
    let subsets = json!([{"addresses": [{"ip": ip.to_string()}], "ports": ports}]);
    json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {
            "name": pod.service_name(), "namespace": pod.namespace,
            "annotations": {OWNER: CREATED, FINGERPRINT: fingerprint(&subsets)},
        },
        "subsets": subsets,
    })
}

/// The barrier policy, written anew (`serial` differs every time) after
/// deletes. It selects no pod, so it changes no verdict.
pub fn barrier(namespace: &str, serial: u128) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {
            "name": BARRIER, "namespace": namespace,
            "annotations": {OWNER: CREATED, "conformance.portcullis.test/serial": serial.to_string()},
        },
        "spec": {
            "podSelector": {"matchLabels": {"conformance.portcullis.test/barrier": "selects-no-pod"}},
            "policyTypes": ["Ingress"],
        },
    })
}

/// A case's object, marked as the runner's (an annotation: no selector
/// sees it).
pub fn owned(mut object: Value) -> Value {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = annotations.as_object_mut() {
            a.insert(OWNER.into(), json!(CREATED));
        }
    }
    object
}

/// The JSON merge patch that turns labels `live` into exactly `want`, if
/// they differ.
pub fn label_patch(live: &Labels, want: &Labels) -> Option<Value> {
    let mut labels = serde_json::Map::new();
    for k in live.keys().filter(|k| !want.contains_key(*k)) {
        labels.insert(k.clone(), Value::Null);
    }
    for (k, v) in want.iter().filter(|(k, v)| live.get(*k) != Some(*v)) {
        labels.insert(k.clone(), json!(v));
    }
    (!labels.is_empty()).then(|| json!({"metadata": {"labels": labels}}))
}

/// The patch that borrows a namespace found as `live` for a case wanting
/// `want`: its labels recorded, then replaced.
pub fn borrow(live: &Value, want: &Labels) -> Value {
    let found = labels(live);
    let mut patch = label_patch(&found, want).unwrap_or_else(|| json!({"metadata": {}}));
    patch["metadata"]["annotations"] = json!({
        OWNER: BORROWED,
        ORIGINAL_LABELS: serde_json::to_string(&found).unwrap_or_default(),
    });
    patch
}

/// The patch that gives a borrowed namespace back: its labels as they were
/// when borrowed, the runner's annotations gone.
pub fn give_back(live: &Value) -> Value {
    let original: Labels =
        annotation(live, ORIGINAL_LABELS).and_then(|a| serde_json::from_str(a).ok()).unwrap_or_default();
    let mut patch = label_patch(&labels(live), &original).unwrap_or_else(|| json!({"metadata": {}}));
    patch["metadata"]["annotations"] = json!({OWNER: null, ORIGINAL_LABELS: null});
    patch
}

/// An object's labels.
pub fn labels(object: &Value) -> Labels {
    object["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default()
}

pub fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["annotations"][key].as_str()
}

/// Whether the runner made it.
pub fn created(object: &Value) -> bool {
    annotation(object, OWNER) == Some(CREATED)
}

/// Whether the cluster's object is what the runner would write now.
pub fn same_fingerprint(live: &Value, wanted: &Value) -> bool {
    let print = annotation(wanted, FINGERPRINT);
    print.is_some() && annotation(live, FINGERPRINT) == print
}

#[cfg(test)]
mod tests {
    use portcullis_conformance::{Case, world::Family, world::World};

    use super::*;

    fn world() -> World {
        let case = Case::parse(
            "inline.yaml",
            r#"
name: objects
model:
  namespaces: {prod: {labels: {env: prod}}}
  pods:
    - name: prod/db
      labels: {role: db}
      ports: [{name: mysql, port: 3306, protocol: TCP}, {port: 53, protocol: UDP}]
steps: []
"#,
        )
        .expect("case");
        World::new(&case, Family::V4, false)
    }

    #[test]
    fn a_pod_serves_each_port_in_its_own_container_with_the_cases_port_names() {
        let world = world();
        let db = &world.pods[0];
        let pod = pod(db);
        assert_eq!(pod["metadata"]["labels"], json!({"role": "db"}), "the model's labels, nothing else");
        assert_eq!(pod["spec"]["hostname"], "prod-db");
        let containers = pod["spec"]["containers"].as_array().expect("containers");
        assert_eq!(containers.len(), 2);
        assert_eq!(containers[0]["name"], "serve-3306-tcp");
        assert_eq!(containers[0]["image"], AGNHOST);
        assert_eq!(containers[0]["args"], json!(["serve-hostname", "--tcp", "--http=false", "--port=3306"]));
        assert_eq!(
            containers[0]["ports"],
            json!([{"containerPort": 3306, "protocol": "TCP", "name": "mysql"}])
        );
        assert_eq!(containers[1]["args"], json!(["serve-hostname", "--udp", "--http=false", "--port=53"]));
        assert_eq!(containers[1]["ports"], json!([{"containerPort": 53, "protocol": "UDP"}]));

        // Labels are not part of the fingerprint: a relabelled pod is reused.
        let mut relabelled = world.pods[0].clone();
        relabelled.labels.insert("extra".into(), "1".into());
        assert!(same_fingerprint(&pod, &super::pod(&relabelled)));
        let mut other_ports = world.pods[0].clone();
        other_ports.ports.pop();
        assert!(!same_fingerprint(&pod, &super::pod(&other_ports)));
    }

    #[test]
    fn a_service_without_selector_and_its_endpoints() {
        let world = world();
        let db = &world.pods[0];
        let svc = service(db);
        assert_eq!(svc["metadata"]["name"], "s-prod-db");
        assert_eq!(svc["spec"].get("selector"), None);
        assert_eq!(
            svc["spec"]["ports"],
            json!([
                {"name": "tcp-3306", "port": 3306, "protocol": "TCP", "targetPort": 3306},
                {"name": "udp-53", "port": 53, "protocol": "UDP", "targetPort": 53},
            ])
        );
        let ep = endpoints(db, "10.244.0.9".parse().unwrap());
        assert_eq!(ep["subsets"][0]["addresses"], json!([{"ip": "10.244.0.9"}]));
        assert_eq!(ep["subsets"][0]["ports"][1], json!({"name": "udp-53", "port": 53, "protocol": "UDP"}));
        // A pod recreated with another address needs its Endpoints rewritten.
        assert!(!same_fingerprint(&ep, &endpoints(db, "10.244.0.10".parse().unwrap())));
    }

    #[test]
    fn labels_are_patched_to_exactly_the_models() {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(label_patch(&l(&[("pod", "a")]), &l(&[("pod", "a")])), None);
        assert_eq!(
            label_patch(&l(&[("pod", "a2"), ("extra", "1")]), &l(&[("pod", "a"), ("ns", "x")])),
            Some(json!({"metadata": {"labels": {"pod": "a", "extra": null, "ns": "x"}}}))
        );
    }

    #[test]
    fn a_borrowed_namespace_is_given_back_as_found() {
        let found = json!({"metadata": {"name": "default", "labels": {"team": "core"}}});
        let want = Labels::from([("kubernetes.io/metadata.name".into(), "default".into())]);
        let patch = borrow(&found, &want);
        assert_eq!(
            patch,
            json!({"metadata": {
                "labels": {"team": null, "kubernetes.io/metadata.name": "default"},
                "annotations": {OWNER: BORROWED, ORIGINAL_LABELS: r#"{"team":"core"}"#},
            }})
        );
        let borrowed = json!({"metadata": {
            "name": "default",
            "labels": {"kubernetes.io/metadata.name": "default", "ns": "default"},
            "annotations": {OWNER: BORROWED, ORIGINAL_LABELS: r#"{"team":"core"}"#},
        }});
        assert_eq!(
            give_back(&borrowed),
            json!({"metadata": {
                "labels": {"kubernetes.io/metadata.name": null, "ns": null, "team": "core"},
                "annotations": {OWNER: null, ORIGINAL_LABELS: null},
            }})
        );
    }

    #[test]
    fn case_objects_and_the_barrier_are_marked_as_the_runners() {
        let policy = owned(json!({"kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x"}}));
        assert!(created(&policy));
        let b = barrier("x", 7);
        assert!(created(&b));
        assert_ne!(b, barrier("x", 8), "every barrier is a write");
        assert_eq!(hostname(&world().pods[0]), "prod-db");
    }
}
