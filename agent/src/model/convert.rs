//! From the Kubernetes API types to the model, validating as the API server
//! would (and more, since older servers check less). An invalid object yields
//! an error naming it and the field; callers leave that object out and keep
//! the rest of the cluster.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1 as core,
        networking::v1::{self as net, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1 as meta, util::intstr::IntOrString},
};

use super::{
    ContainerPort, LabelSelector, Labels, Namespace, NetworkPolicy, Operator, Peer, Pod, PortRange, PortRef,
    PortSpec, Protocol, Requirement, Rule, Service, ServicePort, TargetPort,
};

/// An object the agent cannot use, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {message}")]
pub struct ModelError {
    pub kind: &'static str,
    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub object: String,
    /// The offending field as a path, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
}

struct Ctx {
    kind: &'static str,
    object: String,
}

impl Ctx {
    fn new(kind: &'static str, meta: &meta::ObjectMeta) -> Result<Ctx, ModelError> {
        let name = meta.name.clone().unwrap_or_default();
        let object = match &meta.namespace {
            Some(ns) => format!("{ns}/{name}"),
            None => name.clone(),
        };
        let ctx = Ctx { kind, object };
        if name.is_empty() {
            return Err(ctx.err("metadata.name", "missing"));
        }
        Ok(ctx)
    }

    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> ModelError {
        ModelError {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

fn namespace_of(ctx: &Ctx, meta: &meta::ObjectMeta) -> Result<String, ModelError> {
    meta.namespace.clone().filter(|n| !n.is_empty()).ok_or_else(|| ctx.err("metadata.namespace", "missing"))
}

pub fn namespace_from_api(ns: &core::Namespace) -> Result<Namespace, ModelError> {
    let ctx = Ctx::new("Namespace", &ns.metadata)?;
    Ok(Namespace { name: ctx.object.clone(), labels: ns.metadata.labels.clone().unwrap_or_default().into() })
}

fn protocol(ctx: &Ctx, field: &str, value: Option<&str>) -> Result<Protocol, ModelError> {
    match value {
        None => Ok(Protocol::Tcp),
        Some(p) => Protocol::parse(p)
            .ok_or_else(|| ctx.err(field, format!("unknown protocol {p:?} (TCP, UDP or SCTP)"))),
    }
}

fn port_number(ctx: &Ctx, field: &str, value: i32) -> Result<u16, ModelError> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ctx.err(field, format!("port {value} is not in 1-65535")))
}

/// An IANA service name as Kubernetes accepts it for a named port.
fn check_port_name(ctx: &Ctx, field: &str, name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok { Ok(()) } else { Err(ctx.err(field, format!("{name:?} is not a valid port name"))) }
}

pub fn pod_from_api(pod: &core::Pod) -> Result<Pod, ModelError> {
    let ctx = Ctx::new("Pod", &pod.metadata)?;
    let namespace = namespace_of(&ctx, &pod.metadata)?;
    let spec = pod.spec.as_ref().ok_or_else(|| ctx.err("spec", "missing"))?;
    let status = pod.status.as_ref();
    // Finished pods give their addresses back; they must not keep them here.
    let finished = status.and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    let mut ips = Vec::new();
    if !finished && let Some(status) = status {
        let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
        for (i, ip) in listed.chain(status.pod_ip.as_deref()).enumerate() {
            let addr: IpAddr = ip
                .parse()
                .map_err(|_| ctx.err(format!("status.podIPs[{i}]"), format!("{ip:?} is not an IP")))?;
            if !ips.contains(&addr) {
                ips.push(addr);
            }
        }
    }
    let mut ports = Vec::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (p, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{c}].ports[{p}]");
            let number = port_number(&ctx, &format!("{field}.containerPort"), port.container_port)?;
            let protocol = protocol(&ctx, &format!("{field}.protocol"), port.protocol.as_deref())?;
            if let Some(name) = &port.name {
                check_port_name(&ctx, &format!("{field}.name"), name)?;
            }
            ports.push(ContainerPort { name: port.name.clone(), port: number, protocol });
        }
    }
    Ok(Pod {
        namespace,
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default().into(),
        ips,
        node: spec.node_name.clone(),
        host_network: spec.host_network.unwrap_or(false),
        finished,
        ports,
        // Objects from manifest files usually have neither.
        created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()),
        deleting: pod.metadata.deletion_timestamp.is_some(),
    })
}

fn selector(ctx: &Ctx, field: &str, sel: &meta::LabelSelector) -> Result<LabelSelector, ModelError> {
    let mut expressions = Vec::new();
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if req.key.is_empty() {
            return Err(ctx.err(format!("{f}.key"), "empty"));
        }
        let values: BTreeSet<String> = req.values.iter().flatten().cloned().collect();
        let operator = match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(ctx.err(format!("{f}.values"), format!("must be non-empty for {}", req.operator)));
            }
            "In" => Operator::In(values),
            "NotIn" => Operator::NotIn(values),
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(ctx.err(format!("{f}.values"), format!("must be empty for {}", req.operator)));
            }
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err(ctx.err(
                    format!("{f}.operator"),
                    format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"),
                ));
            }
        };
        expressions.push(Requirement { key: req.key.clone(), operator });
    }
    Ok(LabelSelector { match_labels: sel.match_labels.clone().unwrap_or_default().into(), expressions })
}

fn cidr(ctx: &Ctx, field: &str, text: &str) -> Result<IpNet, ModelError> {
    let net: IpNet = text.parse().map_err(|_| ctx.err(field, format!("{text:?} is not a CIDR")))?;
    Ok(net.trunc())
}

fn peer(ctx: &Ctx, field: &str, peer: &NetworkPolicyPeer) -> Result<Peer, ModelError> {
    match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
        (Some(block), None, None) => {
            let cidr = cidr(ctx, &format!("{field}.ipBlock.cidr"), &block.cidr)?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let e = self::cidr(ctx, &f, e)?;
                if !cidr.contains(&e) || e == cidr {
                    return Err(ctx.err(f, format!("{e} is not strictly inside {cidr}")));
                }
                except.push(e);
            }
            except.sort();
            except.dedup();
            Ok(Peer::IpBlock { cidr, except })
        }
        (Some(_), _, _) => {
            Err(ctx.err(field, "ipBlock cannot be combined with podSelector or namespaceSelector"))
        }
        (None, None, None) => Err(ctx.err(field, "needs podSelector, namespaceSelector or ipBlock")),
        (None, ns, pods) => Ok(Peer::Pods {
            namespaces: ns
                .as_ref()
                .map(|s| selector(ctx, &format!("{field}.namespaceSelector"), s))
                .transpose()?,
            pods: pods.as_ref().map(|s| selector(ctx, &format!("{field}.podSelector"), s)).transpose()?,
        }),
    }
}

fn port_spec(ctx: &Ctx, field: &str, port: &NetworkPolicyPort) -> Result<PortSpec, ModelError> {
    let protocol = protocol(ctx, &format!("{field}.protocol"), port.protocol.as_deref())?;
    let port = match (&port.port, port.end_port) {
        (None, None) => None,
        (None, Some(_)) => return Err(ctx.err(format!("{field}.endPort"), "needs a numeric port")),
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(ctx.err(format!("{field}.endPort"), "cannot be used with a named port"));
            }
            check_port_name(ctx, &format!("{field}.port"), name)?;
            Some(PortRef::Named(name.clone()))
        }
        (Some(IntOrString::Int(start)), end) => {
            let start = port_number(ctx, &format!("{field}.port"), *start)?;
            let end = match end {
                None => start,
                Some(e) => {
                    let e = port_number(ctx, &format!("{field}.endPort"), e)?;
                    if e < start {
                        return Err(ctx.err(format!("{field}.endPort"), format!("{e} is below port {start}")));
                    }
                    e
                }
            };
            Some(PortRef::Numbers(PortRange { start, end }))
        }
    };
    Ok(PortSpec { protocol, port })
}

fn rule(
    ctx: &Ctx,
    field: &str,
    peers_field: &str,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<Rule, ModelError> {
    let peers = peers
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| peer(ctx, &format!("{field}.{peers_field}[{i}]"), p))
        .collect::<Result<_, _>>()?;
    let ports = ports
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, p)| port_spec(ctx, &format!("{field}.ports[{i}]"), p))
        .collect::<Result<_, _>>()?;
    Ok(Rule { peers, ports })
}

pub fn network_policy_from_api(np: &net::NetworkPolicy) -> Result<NetworkPolicy, ModelError> {
    let ctx = Ctx::new("NetworkPolicy", &np.metadata)?;
    let namespace = namespace_of(&ctx, &np.metadata)?;
    let spec = np.spec.as_ref().ok_or_else(|| ctx.err("spec", "missing"))?;
    let pod_selector = match &spec.pod_selector {
        Some(s) => selector(&ctx, "spec.podSelector", s)?,
        None => LabelSelector::everything(),
    };
    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| rule(&ctx, &format!("spec.ingress[{i}]"), "from", r.from.as_ref(), r.ports.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| rule(&ctx, &format!("spec.egress[{i}]"), "to", r.to.as_ref(), r.ports.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    let (affects_ingress, affects_egress) = match &spec.policy_types {
        // Absent: Ingress always, Egress iff there are egress rules.
        None => (true, !egress.is_empty()),
        Some(types) => {
            let mut seen = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => seen.0 = true,
                    "Egress" => seen.1 = true,
                    other => {
                        return Err(ctx.err(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (Ingress or Egress)"),
                        ));
                    }
                }
            }
            seen
        }
    };
    Ok(NetworkPolicy {
        namespace,
        name: np.metadata.name.clone().unwrap_or_default(),
        pod_selector,
        affects_ingress,
        affects_egress,
        ingress,
        egress,
    })
}

/// What a policy the agent refuses the first time it sees it stands in
/// for: it isolates the pods it selects, in its directions, and allows
/// nothing. Ignoring it would leave those pods open to what it was written
/// to stop; a later valid version replaces it. A selector that cannot be
/// read selects the whole namespace; unreadable policy types mean both.
/// `None` only without a namespace to scope it to.
pub fn network_policy_fail_closed(np: &net::NetworkPolicy) -> Option<NetworkPolicy> {
    let ctx = Ctx::new("NetworkPolicy", &np.metadata).ok()?;
    let namespace = namespace_of(&ctx, &np.metadata).ok()?;
    let spec = np.spec.as_ref();
    let pod_selector =
        spec.and_then(|s| s.pod_selector.as_ref()).map_or_else(LabelSelector::everything, |s| {
            selector(&ctx, "spec.podSelector", s).unwrap_or_else(|_| LabelSelector::everything())
        });
    let (affects_ingress, affects_egress) = match spec.and_then(|s| s.policy_types.as_ref()) {
        None => (true, spec.is_none_or(|s| s.egress.as_ref().is_some_and(|e| !e.is_empty()))),
        Some(types) => {
            let ingress = types.iter().any(|t| t == "Ingress");
            let egress = types.iter().any(|t| t == "Egress");
            if types.iter().all(|t| t == "Ingress" || t == "Egress") {
                (ingress, egress)
            } else {
                (true, true)
            }
        }
    };
    Some(NetworkPolicy {
        namespace,
        name: np.metadata.name.clone().unwrap_or_default(),
        pod_selector,
        affects_ingress,
        affects_egress,
        ingress: Vec::new(),
        egress: Vec::new(),
    })
}

pub fn service_from_api(svc: &core::Service) -> Result<Service, ModelError> {
    let ctx = Ctx::new("Service", &svc.metadata)?;
    let namespace = namespace_of(&ctx, &svc.metadata)?;
    let spec = svc.spec.as_ref().ok_or_else(|| ctx.err("spec", "missing"))?;
    let mut cluster_ips = Vec::new();
    let listed = spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter());
    for (i, ip) in listed.enumerate() {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| ctx.err(format!("spec.clusterIPs[{i}]"), format!("{ip:?} is not an IP")))?;
        if !cluster_ips.contains(&addr) {
            cluster_ips.push(addr);
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let port = port_number(&ctx, &format!("{field}.port"), p.port)?;
        let protocol = protocol(&ctx, &format!("{field}.protocol"), p.protocol.as_deref())?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(&ctx, &format!("{field}.targetPort"), *n)?)
            }
            Some(IntOrString::String(name)) => TargetPort::Named(name.clone()),
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(&ctx, &format!("{field}.nodePort"), n)?),
        };
        ports.push(ServicePort { name: p.name.clone(), port, protocol, target, node_port });
    }
    // Addresses kube-proxy also translates; one that does not parse is
    // no address of this Service (the API server validates them).
    let lb = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    let mut external_ips: Vec<IpAddr> = spec
        .external_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(lb.into_iter().flatten().filter_map(|i| i.ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    external_ips.sort();
    external_ips.dedup();
    Ok(Service {
        namespace,
        name: svc.metadata.name.clone().unwrap_or_default(),
        cluster_ips,
        external_ips,
        selector: spec.selector.clone().map(|s| s.into_iter().collect::<Labels>()),
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(spec: serde_json::Value) -> net::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "x"},
            "spec": spec,
        }))
        .expect("test policy")
    }

    fn error(spec: serde_json::Value) -> ModelError {
        network_policy_from_api(&np(spec)).expect_err("should be rejected")
    }

    #[test]
    fn a_refused_policy_stands_in_as_isolation_without_rules() {
        let odd = serde_json::json!({
            "podSelector": {"matchLabels": {"app": "db"}},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["::ffff:10.1.0.0/112"]}}]}],
        });
        assert!(network_policy_from_api(&np(odd.clone())).is_err());
        let p = network_policy_fail_closed(&np(odd)).expect("stand-in");
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "p"));
        assert!(p.pod_selector.matches(&Labels::from([("app".to_string(), "db".to_string())])));
        assert!(!p.pod_selector.matches(&Labels::new()), "it selects what the policy selects");
        assert!(p.affects_ingress && p.affects_egress, "ingress always, egress as its rules imply");
        assert!(p.ingress.is_empty() && p.egress.is_empty(), "and allows nothing");

        // An unreadable selector or policy type widens the isolation.
        let odd = serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Sometimes"}]},
            "policyTypes": ["Ingress", "Sideways"],
        });
        let p = network_policy_fail_closed(&np(odd)).expect("stand-in");
        assert!(p.pod_selector.matches(&Labels::new()), "the whole namespace");
        assert!(p.affects_ingress && p.affects_egress);
        let p = network_policy_fail_closed(&np(serde_json::json!({"policyTypes": ["Egress"]})))
            .expect("stand-in");
        assert!(!p.affects_ingress && p.affects_egress, "readable types are kept");
    }

    #[test]
    fn policy_types_default_from_rules() {
        let p = network_policy_from_api(&np(serde_json::json!({"podSelector": {}}))).unwrap();
        assert!(p.affects_ingress && !p.affects_egress, "no types, no egress rules: ingress only");
        let p = network_policy_from_api(&np(serde_json::json!({"podSelector": {}, "egress": [{}]}))).unwrap();
        assert!(p.affects_ingress && p.affects_egress, "egress rules imply Egress");
        let p = network_policy_from_api(&np(serde_json::json!({"podSelector": {}, "egress": []}))).unwrap();
        assert!(!p.affects_egress, "an empty egress list is no egress rule");
        let p =
            network_policy_from_api(&np(serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]})))
                .unwrap();
        assert!(!p.affects_ingress && p.affects_egress);
    }

    #[test]
    fn protocol_defaults_to_tcp_and_end_port_makes_a_range() {
        let p = network_policy_from_api(&np(serde_json::json!({
            "podSelector": {},
            "ingress": [{"ports": [{"port": 80}, {"protocol": "UDP", "port": 1000, "endPort": 2000}, {"protocol": "SCTP"}]}],
        })))
        .unwrap();
        let ports = &p.ingress[0].ports;
        assert_eq!(
            ports[0],
            PortSpec { protocol: Protocol::Tcp, port: Some(PortRef::Numbers(PortRange::single(80))) }
        );
        assert_eq!(
            ports[1],
            PortSpec {
                protocol: Protocol::Udp,
                port: Some(PortRef::Numbers(PortRange { start: 1000, end: 2000 }))
            }
        );
        assert_eq!(ports[2], PortSpec { protocol: Protocol::Sctp, port: None });
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let e = error(
            serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
        );
        assert_eq!((e.kind, e.object.as_str()), ("NetworkPolicy", "x/p"));
        assert_eq!(e.field, "spec.ingress[0].ports[0].endPort");
        assert_eq!(e.to_string(), "NetworkPolicy x/p: spec.ingress[0].ports[0].endPort: 79 is below port 80");

        let e = error(
            serde_json::json!({"podSelector": {}, "egress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
        );
        assert_eq!(e.field, "spec.egress[0].ports[0].endPort");

        let e = error(serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}));
        assert_eq!(e.field, "spec.ingress[0].ports[0].protocol");

        let e = error(serde_json::json!({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}));
        assert_eq!(e.field, "spec.ingress[0].ports[0].port");

        let e = error(serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Matches", "values": ["b"]}]},
        }));
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0].operator");

        let e = error(serde_json::json!({
            "podSelector": {},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}],
        }));
        assert_eq!(e.field, "spec.egress[0].to[0].ipBlock.cidr");

        let e = error(serde_json::json!({
            "podSelector": {},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}]}],
        }));
        assert_eq!(e.field, "spec.egress[0].to[0].ipBlock.except[0]");

        let e = error(serde_json::json!({
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        }));
        assert_eq!(e.field, "spec.ingress[0].from[0]");

        let e = error(serde_json::json!({"podSelector": {}, "policyTypes": ["Sideways"]}));
        assert_eq!(e.field, "spec.policyTypes[0]");

        let e = error(serde_json::json!({
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "In", "values": []}]},
        }));
        assert_eq!(e.field, "spec.podSelector.matchExpressions[0].values");
    }

    #[test]
    fn pod_ports_and_ips() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80},
                {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            ]}]},
            "status": {"podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]},
        }))
        .unwrap();
        let p = pod_from_api(&pod).unwrap();
        assert_eq!(p.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert_eq!(p.named_port("serve-80-udp", Protocol::Udp), Some(80));
        assert_eq!(p.named_port("serve-80-udp", Protocol::Tcp), None);
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!((p.created, p.deleting), (None, false), "a manifest's pod has neither");
    }

    #[test]
    fn pod_creation_and_deletion_timestamps() {
        let pod: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "creationTimestamp": "2024-05-01T10:00:02Z",
                "deletionTimestamp": "2024-05-01T11:00:00Z"},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.5"},
        }))
        .unwrap();
        let p = pod_from_api(&pod).unwrap();
        assert_eq!(p.created, Some(1_714_557_602));
        assert!(p.deleting);
    }
}
