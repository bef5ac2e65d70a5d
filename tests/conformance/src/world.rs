//! The cluster a case describes, as it evolves step by step: namespaces, pods
//! with addresses in one family, policies; templates resolved against it.
//! Both runners use it: the pure one feeds its changes to the policy engine,
//! the lab turns it into network namespaces and API objects.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use portcullis_agent::{
    model::{ContainerPort, Namespace, NetworkPolicy, ObjectKey, Pod, PodKey, network_policy_from_api},
    policy::Change,
};

use crate::{
    case::{Case, CaseError, PortSpec, Probe, ProbePort, Protocol, Step},
    expect::expected,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The node every pod of a case runs on.
pub const NODE: &str = "node";

#[derive(Clone, Debug)]
pub struct WorldPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    /// The address in the run's family (probes and templates use it).
    pub ip: IpAddr,
    /// Both addresses: pods are dual-stack.
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The ClusterIPs of the pod's Service `s-<ns>-<pod>` (dual-stack),
    /// and the one in the run's family.
    pub service_ipv4: Ipv4Addr,
    pub service_ipv6: Ipv6Addr,
    pub service_ip: IpAddr,
    /// The node it runs on (`NODE` unless the lab spreads pods over nodes).
    pub node: String,
}

impl WorldPod {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name of the pod's Service.
    pub fn service_name(&self) -> String {
        format!("s-{}-{}", self.namespace, self.name)
    }

    pub fn model(&self) -> Pod {
        Pod {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            labels: self.labels.clone().into(),
            ips: vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)],
            node: Some(self.node.clone()),
            host_network: false,
            finished: false,
            created: None,
            deleting: false,
            ports: self
                .ports
                .iter()
                .map(|p| ContainerPort { name: p.name.clone(), port: p.port, protocol: p.protocol.model() })
                .collect(),
        }
    }

    /// The port this pod serves for a probe, if it serves it.
    pub fn serves(&self, port: &ProbePort, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| {
                p.protocol == protocol
                    && match port {
                        ProbePort::Number(n) => p.port == *n,
                        ProbePort::Named(name) => p.name.as_deref() == Some(name.as_str()),
                    }
            })
            .map(|p| p.port)
    }
}

pub struct World {
    pub file: String,
    pub family: Family,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<WorldPod>,
    pub policies: BTreeMap<ObjectKey, NetworkPolicy>,
    /// The policies as applied (templates resolved), for the API or files.
    pub api_policies: BTreeMap<ObjectKey, serde_yaml_ng::Value>,
}

/// One pair of a probe and what the case expects of it.
pub struct Pair {
    pub client: usize,
    pub server: usize,
    /// The server's port for the probe (a named port resolved on it).
    pub port: u16,
    pub expect: bool,
}

/// Labels as a case writes them.
type StringMap = BTreeMap<String, String>;
/// `(namespace, name, labels, ports)` of a pod before it gets an address.
type PodSeed = (String, String, StringMap, Vec<PortSpec>);

fn default_model(sctp: bool) -> (BTreeMap<String, StringMap>, Vec<PodSeed>) {
    let mut namespaces = BTreeMap::new();
    let mut pods = Vec::new();
    for ns in ["x", "y", "z"] {
        namespaces.insert(ns.to_string(), BTreeMap::from([("ns".to_string(), ns.to_string())]));
        for pod in ["a", "b", "c"] {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                let mut protocols = vec![(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")];
                if sctp {
                    protocols.push((Protocol::Sctp, "sctp"));
                }
                for (protocol, tag) in protocols {
                    ports.push(PortSpec { name: Some(format!("serve-{port}-{tag}")), port, protocol });
                }
            }
            pods.push((
                ns.to_string(),
                pod.to_string(),
                BTreeMap::from([("pod".to_string(), pod.to_string())]),
                ports,
            ));
        }
    }
    (namespaces, pods)
}

impl World {
    /// The case's initial cluster; `sctp`: whether pods serve SCTP too.
    pub fn new(case: &Case, family: Family, sctp: bool) -> World {
        let (mut namespaces, pods) = match &case.model {
            None => default_model(sctp),
            Some(m) => (
                m.namespaces.iter().map(|(n, s)| (n.clone(), s.labels.clone())).collect(),
                m.pods
                    .iter()
                    .map(|p| {
                        let (ns, name) = p.name.split_once('/').unwrap_or(("", &p.name));
                        (ns.to_string(), name.to_string(), p.labels.clone(), p.ports.clone())
                    })
                    .collect(),
            ),
        };
        for (name, labels) in namespaces.iter_mut() {
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
        }
        let pods = pods
            .into_iter()
            .enumerate()
            .map(|(k, (namespace, name, labels, ports))| {
                let n = k as u16 + 1;
                let ipv4 = Ipv4Addr::new(10, 64, (n >> 8) as u8, n as u8);
                let ipv6 = Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, n);
                let service_ipv4 = Ipv4Addr::new(10, 96, (n >> 8) as u8, n as u8);
                let service_ipv6 = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, n);
                let (ip, service_ip) = match family {
                    Family::V4 => (IpAddr::V4(ipv4), IpAddr::V4(service_ipv4)),
                    Family::V6 => (IpAddr::V6(ipv6), IpAddr::V6(service_ipv6)),
                };
                WorldPod {
                    namespace,
                    name,
                    labels,
                    ports,
                    ip,
                    ipv4,
                    ipv6,
                    service_ipv4,
                    service_ipv6,
                    service_ip,
                    node: NODE.into(),
                }
            })
            .collect();
        World {
            file: case.file.clone(),
            family,
            namespaces,
            pods,
            policies: BTreeMap::new(),
            api_policies: BTreeMap::new(),
        }
    }

    /// Everything as engine changes (the initial load).
    pub fn initial_changes(&self) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .namespaces
            .iter()
            .map(|(n, l)| Change::UpsertNamespace(Namespace { name: n.clone(), labels: l.clone().into() }))
            .collect();
        out.extend(self.pods.iter().map(|p| Change::UpsertPod(p.model())));
        out
    }

    fn invalid(&self, field: String, message: impl Into<String>) -> CaseError {
        CaseError::Invalid { file: self.file.clone(), field, message: message.into() }
    }

    pub fn pod(&self, id: &str) -> Option<&WorldPod> {
        self.pods.iter().find(|p| p.id() == id)
    }

    /// Gives pod `id` the addresses a real cluster assigned to it and to its
    /// Service, in the run's family (the world picks its own otherwise). A
    /// runner on a cluster calls this once the pods run, before the steps
    /// resolve templates against them.
    pub fn set_addresses(&mut self, id: &str, ip: IpAddr, service_ip: IpAddr) -> Result<(), String> {
        let family = self.family;
        let pod = self.pods.iter_mut().find(|p| p.id() == id).ok_or_else(|| format!("no pod {id:?}"))?;
        match (family, ip, service_ip) {
            (Family::V4, IpAddr::V4(v4), IpAddr::V4(service)) => {
                pod.ipv4 = v4;
                pod.service_ipv4 = service;
            }
            (Family::V6, IpAddr::V6(v6), IpAddr::V6(service)) => {
                pod.ipv6 = v6;
                pod.service_ipv6 = service;
            }
            _ => {
                return Err(format!(
                    "pod {id}: {ip} and {service_ip} are not both in the run's family {family:?}"
                ));
            }
        }
        pod.ip = ip;
        pod.service_ip = service_ip;
        Ok(())
    }

    /// Applies a step's label, delete and apply, in that order. Returns the
    /// engine changes and notes (objects the API would have refused).
    pub fn step(&mut self, s: usize, step: &Step) -> Result<(Vec<Change>, Vec<String>), CaseError> {
        let mut changes = Vec::new();
        let mut notes = Vec::new();
        for (i, op) in step.label.iter().enumerate() {
            let field = format!("steps[{s}].label[{i}]");
            let labels = if let Some(ns) = &op.namespace {
                self.namespaces
                    .get_mut(ns)
                    .ok_or_else(|| self_invalid(&self.file, &field, ns, "namespace"))?
            } else {
                let id = op.pod.clone().unwrap_or_default();
                let file = self.file.clone();
                let pod = self
                    .pods
                    .iter_mut()
                    .find(|p| p.id() == id)
                    .ok_or_else(|| self_invalid(&file, &field, &id, "pod"))?;
                &mut pod.labels
            };
            for (k, v) in &op.set {
                match v {
                    Some(v) => labels.insert(k.clone(), v.clone()),
                    None => labels.remove(k),
                };
            }
            if let Some(ns) = &op.namespace {
                let labels = self.namespaces[ns].clone();
                changes.push(Change::UpsertNamespace(Namespace { name: ns.clone(), labels: labels.into() }));
            } else if let Some(pod) = self.pod(op.pod.as_deref().unwrap_or_default()) {
                changes.push(Change::UpsertPod(pod.model()));
            }
        }
        for (i, d) in step.delete.iter().enumerate() {
            let mut parts = d.splitn(3, '/');
            let (kind, ns, name) =
                (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kind != "NetworkPolicy" {
                return Err(
                    self.invalid(format!("steps[{s}].delete[{i}]"), format!("cannot delete kind {kind:?}"))
                );
            }
            let key = (ns.to_string(), name.to_string());
            self.api_policies.remove(&key);
            if self.policies.remove(&key).is_none() {
                notes.push(format!("delete {d}: not found"));
            }
            changes.push(Change::DeletePolicy(key));
        }
        for (i, object) in step.apply.iter().enumerate() {
            let field = format!("steps[{s}].apply[{i}]");
            let object = self.resolve_templates(object, &field)?;
            let kind = object.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
            if kind != "NetworkPolicy" {
                return Err(self.invalid(format!("{field}.kind"), format!("unsupported kind {kind:?}")));
            }
            let api: net::NetworkPolicy = serde_yaml_ng::from_value(object.clone())
                .map_err(|e| self.invalid(field.clone(), e.to_string()))?;
            match network_policy_from_api(&api) {
                Ok(policy) => {
                    let key = (policy.namespace.clone(), policy.name.clone());
                    self.api_policies.insert(key.clone(), object);
                    self.policies.insert(key, policy.clone());
                    changes.push(Change::UpsertPolicy(policy));
                }
                // The API server would refuse it; nothing changes.
                Err(e) => notes.push(format!("rejected: {e}")),
            }
        }
        Ok((changes, notes))
    }

    /// Replaces `$(ip ns/pod)`, `$(host ns/pod)` and `$(cidr ns/pod N)` in
    /// every string of an object.
    fn resolve_templates(
        &self,
        value: &serde_yaml_ng::Value,
        field: &str,
    ) -> Result<serde_yaml_ng::Value, CaseError> {
        use serde_yaml_ng::Value;
        Ok(match value {
            Value::String(s) => Value::String(self.expand(s, field)?),
            Value::Sequence(items) => Value::Sequence(
                items.iter().map(|v| self.resolve_templates(v, field)).collect::<Result<_, _>>()?,
            ),
            Value::Mapping(map) => {
                let mut out = serde_yaml_ng::Mapping::new();
                for (k, v) in map {
                    out.insert(k.clone(), self.resolve_templates(v, field)?);
                }
                Value::Mapping(out)
            }
            other => other.clone(),
        })
    }

    fn expand(&self, text: &str, field: &str) -> Result<String, CaseError> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("$(") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find(')')
                .ok_or_else(|| self.invalid(field.into(), format!("unclosed template in {text:?}")))?;
            let words: Vec<&str> = after[..end].split_whitespace().collect();
            let ip_of = |id: &str| {
                self.pod(id)
                    .map(|p| p.ip)
                    .ok_or_else(|| self.invalid(field.into(), format!("no pod {id:?} in template")))
            };
            let expanded = match words.as_slice() {
                ["ip", id] => ip_of(id)?.to_string(),
                ["host", id] => IpNet::from(ip_of(id)?).to_string(),
                ["cidr", id, bits] => {
                    let bits: u8 = bits
                        .parse()
                        .map_err(|_| self.invalid(field.into(), format!("bad prefix {bits:?}")))?;
                    let net = IpNet::new(ip_of(id)?, bits)
                        .map_err(|_| self.invalid(field.into(), format!("prefix {bits} too long")))?;
                    net.trunc().to_string()
                }
                _ => return Err(self.invalid(field.into(), format!("unknown template $({})", &after[..end]))),
            };
            out.push_str(&expanded);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Pairs of probe `p` of step `s`: every client with every server of the
    /// port, itself excepted, each with the verdict the rules expect.
    pub fn pairs(&self, s: usize, p: usize, probe: &Probe) -> Result<Vec<Pair>, CaseError> {
        let mut out = Vec::new();
        for (srv, server) in self.pods.iter().enumerate() {
            let Some(port) = server.serves(&probe.port, probe.protocol) else { continue };
            for (c, client) in self.pods.iter().enumerate().filter(|(c, _)| *c != srv) {
                let expect = expected(&probe.rules, &client.id(), &server.id()).ok_or_else(|| {
                    self.invalid(
                        format!("steps[{s}].probes[{p}].expect"),
                        format!("no rule decides {} -> {}", client.id(), server.id()),
                    )
                })?;
                out.push(Pair { client: c, server: srv, port, expect });
            }
        }
        Ok(out)
    }

    pub fn pod_key(&self, index: usize) -> PodKey {
        let p = &self.pods[index];
        PodKey { namespace: p.namespace.clone(), name: p.name.clone() }
    }
}

fn self_invalid(file: &str, field: &str, what: &str, kind: &str) -> CaseError {
    CaseError::Invalid { file: file.into(), field: field.into(), message: format!("no {kind} {what:?}") }
}

impl World {
    /// Every object as Kubernetes would hold it (multi-document YAML):
    /// namespaces, pods on their nodes with their addresses and container ports,
    /// each pod's Service (dual-stack ClusterIPs, its ports, no selector: the
    /// lab writes the backends into DNAT rules itself), and the applied
    /// policies.
    pub fn manifests(&self) -> String {
        let mut docs: Vec<serde_json::Value> = Vec::new();
        for (name, labels) in &self.namespaces {
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }));
        }
        for pod in &self.pods {
            let ports: Vec<serde_json::Value> = pod
                .ports
                .iter()
                .map(|p| {
                    let mut port = serde_json::json!({
                        "containerPort": p.port,
                        "protocol": format!("{:?}", p.protocol.model()).to_uppercase(),
                    });
                    if let Some(name) = &p.name {
                        port["name"] = serde_json::Value::String(name.clone());
                    }
                    port
                })
                .collect();
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
                "spec": {"nodeName": pod.node, "containers": [{"name": "server", "image": "server", "ports": ports}]},
                "status": {
                    "phase": "Running",
                    "podIP": pod.ip.to_string(),
                    "podIPs": [{"ip": pod.ipv4.to_string()}, {"ip": pod.ipv6.to_string()}],
                },
            }));
            let service_ports: Vec<serde_json::Value> = pod
                .ports
                .iter()
                .map(|p| {
                    let protocol = format!("{:?}", p.protocol.model()).to_uppercase();
                    serde_json::json!({
                        "name": format!("{}-{}", protocol.to_lowercase(), p.port),
                        "port": p.port, "protocol": protocol, "targetPort": p.port,
                    })
                })
                .collect();
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": pod.service_name(), "namespace": pod.namespace},
                "spec": {
                    "clusterIP": pod.service_ipv4.to_string(),
                    "clusterIPs": [pod.service_ipv4.to_string(), pod.service_ipv6.to_string()],
                    "ipFamilies": ["IPv4", "IPv6"],
                    "ipFamilyPolicy": "RequireDualStack",
                    "ports": service_ports,
                },
            }));
        }
        let mut out = String::new();
        for doc in docs {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(&doc).unwrap_or_default());
        }
        for policy in self.api_policies.values() {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(policy).unwrap_or_default());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_resolve_against_addresses_set_from_a_cluster() {
        let case = Case::parse(
            "inline.yaml",
            r#"
name: cluster-addresses
steps:
  - apply:
      - apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: p, namespace: x}
        spec:
          podSelector: {}
          ingress: [{from: [{ipBlock: {cidr: "$(cidr x/b 16)", except: ["$(host x/b)"]}}]}]
"#,
        )
        .expect("case");
        let mut world = World::new(&case, Family::V4, false);
        let (ip, service): (IpAddr, IpAddr) = ("10.244.0.23".parse().unwrap(), "10.96.7.9".parse().unwrap());
        world.set_addresses("x/b", ip, service).expect("same family");
        let b = world.pod("x/b").expect("x/b");
        assert_eq!(
            (b.ip, b.ipv4, b.service_ip, b.service_ipv4.into()),
            (ip, Ipv4Addr::new(10, 244, 0, 23), service, service)
        );
        world.step(0, &case.steps[0]).expect("step");
        let policy = &world.api_policies[&("x".to_string(), "p".to_string())];
        let block = &policy["spec"]["ingress"][0]["from"][0]["ipBlock"];
        assert_eq!(block["cidr"].as_str(), Some("10.244.0.0/16"));
        assert_eq!(block["except"][0].as_str(), Some("10.244.0.23/32"));

        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(world.set_addresses("x/b", v6, service).is_err(), "another family");
        assert!(world.set_addresses("x/nobody", ip, service).is_err());
        assert_eq!(world.pod("x/b").expect("x/b").ip, ip, "unchanged by a refused call");
    }
}
