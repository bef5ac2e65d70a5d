//! `agent policy trace`: the verdict on one connection and why, from the
//! oracle (the Kubernetes rules, evaluated plainly), checked against what
//! the kernel's maps decide for the sides that are endpoints of this node.

use std::net::IpAddr;

use portcullis_common::{DIR_EGRESS, DIR_INGRESS};
use serde::{Deserialize, Serialize};

use super::{Failure, View};
use crate::{
    datapath::{KernelVerdict, keys::Probe},
    model::{Cluster, Pod, PodKey, Protocol},
    policy::{
        compile::rule_cookie,
        oracle::{self, Party, SideVerdict},
    },
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// `namespace/pod` or an address.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    pub from: TraceParty,
    pub to: TraceParty,
    pub protocol: String,
    pub port: u16,
    pub allowed: bool,
    /// The client's egress, then the server's ingress.
    pub egress: TraceSide,
    pub ingress: TraceSide,
    /// Whether the maps decide as the oracle does, for every side that is
    /// an endpoint of this node; none when neither is.
    pub datapath_agrees: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceParty {
    /// `namespace/pod`, `node` or `external`.
    pub name: String,
    pub ip: IpAddr,
    pub labels: Vec<String>,
    /// The identity the kernel's ipcache gives the address.
    pub identity: u32,
    /// Its endpoint id, when it is a pod of this node.
    pub endpoint_id: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSide {
    /// `egress` (of the client) or `ingress` (of the server).
    pub direction: String,
    pub pod: Option<String>,
    /// Policies of this direction selecting the pod.
    pub selected_by: Vec<String>,
    /// Rules allowing the connection.
    pub allowed_by: Vec<String>,
    pub allowed: bool,
    /// One sentence: why.
    pub explanation: String,
    /// What the kernel's maps decide, when the pod is an endpoint here.
    pub datapath: Option<DatapathSide>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathSide {
    pub endpoint_id: u16,
    pub allowed: bool,
    /// `allowed by <rule>`, `dropped: no entry allows it`, ...
    pub verdict: String,
    pub agrees: bool,
}

enum Resolved<'a> {
    Pod(&'a Pod, IpAddr),
    Node(IpAddr),
    External(IpAddr),
}

fn resolve<'a>(
    cluster: &'a Cluster,
    node_ips: &[IpAddr],
    text: &str,
    flag: &str,
    family: Option<bool>,
) -> Result<Resolved<'a>, Failure> {
    let by_address = |ip: IpAddr| {
        let pod = cluster.pods.values().find(|p| !p.host_network && !p.finished && p.ips.contains(&ip));
        match pod {
            Some(p) => Resolved::Pod(p, ip),
            None if node_ips.contains(&ip) => Resolved::Node(ip),
            None => Resolved::External(ip),
        }
    };
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(by_address(ip));
    }
    let (namespace, name) = text.split_once('/').ok_or_else(|| {
        Failure::bad_request(format!("{flag} {text}: expected namespace/pod or an IP address"))
    })?;
    let pod = cluster
        .pods
        .get(&PodKey { namespace: namespace.into(), name: name.into() })
        .ok_or_else(|| Failure::not_found(format!("{flag} {text}: no such pod")))?;
    // The family of the other side, when it was given as an address.
    let ip = pod
        .ips
        .iter()
        .copied()
        .find(|ip| family.is_none_or(|v4| ip.is_ipv4() == v4))
        .ok_or_else(|| Failure::bad_request(format!("{flag} {text}: the pod has no address (yet)")))?;
    // A pod on the host network is its node's address: policy does not
    // select it, and peers see the node.
    if pod.host_network {
        return Ok(match by_address(ip) {
            Resolved::Pod(..) => Resolved::External(ip),
            other => other,
        });
    }
    Ok(Resolved::Pod(pod, ip))
}

pub fn trace(view: &View<'_>, req: &TraceRequest) -> Result<TraceReport, Failure> {
    let cluster = view.cluster.ok_or_else(|| {
        Failure::bad_request("policy trace needs the objects: this agent runs from a compiled state file")
    })?;
    let protocol = Protocol::parse(&req.protocol.to_uppercase()).ok_or_else(|| {
        Failure::bad_request(format!("--port .../{}: expected TCP, UDP or SCTP", req.protocol))
    })?;
    let family = |t: &str| t.parse::<IpAddr>().ok().map(|ip| ip.is_ipv4());
    let from = resolve(cluster, view.node_ips, &req.from, "--from", family(&req.to))?;
    let to = resolve(
        cluster,
        view.node_ips,
        &req.to,
        "--to",
        family(&req.from).or(match &from {
            Resolved::Pod(_, ip) | Resolved::Node(ip) | Resolved::External(ip) => Some(ip.is_ipv4()),
        }),
    )?;
    // Only a pod's own node is let in regardless of policy; to a pod on
    // another node this node is an address like any other.
    let from = match (from, &to) {
        (Resolved::Node(ip), Resolved::Pod(pod, _)) if pod.node.as_deref() != Some(view.node) => {
            Resolved::External(ip)
        }
        (from, _) => from,
    };
    let verdict = oracle::evaluate(cluster, party(&from), party(&to), protocol, req.port);
    let (client, server) = (describe(view, &from), describe(view, &to));

    let rules = view.rule_names();
    let egress_probe = Probe {
        direction: DIR_EGRESS,
        remote_identity: server.identity,
        remote_ip: server.ip,
        protocol: protocol.number(),
        port: req.port,
    };
    let ingress_probe = Probe {
        direction: DIR_INGRESS,
        remote_identity: client.identity,
        remote_ip: client.ip,
        protocol: protocol.number(),
        port: req.port,
    };
    let egress = side(view, "egress", &from, &client, &verdict.egress, egress_probe, &rules, false);
    let client_is_node = matches!(from, Resolved::Node(_));
    let ingress =
        side(view, "ingress", &to, &server, &verdict.ingress, ingress_probe, &rules, client_is_node);
    let checks: Vec<bool> =
        [&egress, &ingress].iter().filter_map(|s| s.datapath.as_ref().map(|d| d.agrees)).collect();
    let datapath_agrees = (!checks.is_empty()).then(|| checks.iter().all(|a| *a));
    Ok(TraceReport {
        from: client,
        to: server,
        protocol: protocol.to_string(),
        port: req.port,
        allowed: verdict.allowed,
        egress,
        ingress,
        datapath_agrees,
    })
}

fn party<'a>(r: &Resolved<'a>) -> Party<'a> {
    match *r {
        Resolved::Pod(p, ip) => Party::Pod(p, ip),
        Resolved::Node(ip) => Party::Node(ip),
        Resolved::External(ip) => Party::External(ip),
    }
}

fn describe(view: &View<'_>, r: &Resolved<'_>) -> TraceParty {
    let (name, ip) = match r {
        Resolved::Pod(p, ip) => (format!("{}/{}", p.namespace, p.name), *ip),
        Resolved::Node(ip) => ("node".to_owned(), *ip),
        Resolved::External(ip) => ("external".to_owned(), *ip),
    };
    let identity = view.dp.kernel_identity(ip);
    let endpoint_id = view.state.and_then(|s| s.endpoints.iter().find(|e| e.name == name).map(|e| e.id));
    TraceParty { name, ip, labels: view.labels(identity), identity, endpoint_id }
}

#[allow(clippy::too_many_arguments)]
fn side(
    view: &View<'_>,
    direction: &str,
    who: &Resolved<'_>,
    party: &TraceParty,
    verdict: &SideVerdict,
    probe: Probe,
    rules: &std::collections::BTreeMap<u32, String>,
    from_node: bool,
) -> TraceSide {
    let allowed_by: Vec<String> = verdict.allowed_by.iter().map(ToString::to_string).collect();
    let pod = matches!(who, Resolved::Pod(..)).then(|| party.name.clone());
    let explanation = match (who, from_node) {
        (Resolved::Pod(..), true) => "the node may always reach its own pods".to_owned(),
        (Resolved::Pod(..), false) if verdict.selected_by.is_empty() => format!(
            "no policy with {} in its policyTypes selects {}: not isolated, allowed",
            if direction == "egress" { "Egress" } else { "Ingress" },
            party.name
        ),
        (Resolved::Pod(..), false) if verdict.allowed => {
            let more = match allowed_by.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            };
            format!("isolated; allowed by {}{more}", allowed_by[0])
        }
        (Resolved::Pod(..), false) => format!(
            "isolated by {}; no rule of {} allows this connection: dropped",
            verdict.selected_by.join(", "),
            if verdict.selected_by.len() == 1 { "it" } else { "them" }
        ),
        _ => format!("{} is not a pod: no policy applies to its {direction}", party.name),
    };
    let oracle_cookies: Vec<u32> = verdict
        .allowed_by
        .iter()
        .map(|r| rule_cookie(&r.namespace, &r.policy, r.direction, r.index))
        .collect();
    let datapath = party.endpoint_id.map(|id| {
        let kernel = view.dp.kernel_endpoint(id);
        let (allowed, text, agrees) = match kernel.map(|k| view.dp.kernel_verdict(&k, probe)) {
            None => (false, "no endpoint in the kernel: every packet dropped".to_owned(), !verdict.allowed),
            Some(KernelVerdict::NotIsolated) => {
                (true, "not isolated: passes".to_owned(), verdict.allowed && verdict.selected_by.is_empty())
            }
            Some(KernelVerdict::Host) => (true, "from the node: passes".to_owned(), verdict.allowed),
            Some(KernelVerdict::Dropped) => {
                (false, "dropped: no entry allows it".to_owned(), !verdict.allowed)
            }
            Some(KernelVerdict::Allowed { rule_cookie }) => {
                let name =
                    rules.get(&rule_cookie).cloned().unwrap_or_else(|| format!("cookie {rule_cookie}"));
                (true, format!("allowed by {name}"), verdict.allowed && oracle_cookies.contains(&rule_cookie))
            }
        };
        DatapathSide { endpoint_id: id, allowed, verdict: text, agrees }
    });
    TraceSide {
        direction: direction.into(),
        pod,
        selected_by: verdict.selected_by.clone(),
        allowed_by,
        allowed: verdict.allowed,
        explanation,
        datapath,
    }
}
