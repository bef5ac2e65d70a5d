//! What the operator tools ask the running agent, and the answers: the wire
//! types of `GET /v1/endpoints`, `/v1/identities`, `/v1/ct`, `POST
//! /v1/trace`, and the code that builds them from the enforced state, the
//! policies and the kernel's maps.

mod conntrack;
mod endpoints;
mod health;
mod trace;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

pub use crate::metrics::DropCount;
pub use conntrack::{CtFilter, CtView, conntrack};
pub use endpoints::{endpoint, endpoints, identities};
pub use health::{Telemetry, health, metrics};
pub use trace::{TraceParty, TraceReport, TraceRequest, TraceSide, trace};

use crate::{
    compiled::CompiledState,
    datapath::Datapath,
    model::{Cluster, Direction},
    policy::compile::rule_cookie,
};

/// What the answers are built from; borrowed from the agent's main loop.
pub struct View<'a> {
    /// The state last written to the maps (none before the first).
    pub state: Option<&'a CompiledState>,
    /// The objects (none when the agent runs from a compiled state file).
    pub cluster: Option<&'a Cluster>,
    /// Endpoints whose last write failed, with why.
    pub errors: &'a [String],
    pub failed: &'a BTreeSet<String>,
    pub dp: &'a Datapath,
    pub node_ips: &'a [IpAddr],
    /// This node's name (its pods are the endpoints).
    pub node: &'a str,
}

impl View<'_> {
    /// Rule cookies to `namespace/policy direction rule N`.
    pub fn rule_names(&self) -> BTreeMap<u32, String> {
        self.cluster.map(rule_names).unwrap_or_default()
    }

    /// An identity's labels (`ns=NAME`, then `key=value`).
    pub fn labels(&self, identity: u32) -> Vec<String> {
        let name = self.state.and_then(|s| s.identities.get(&identity)).map(String::as_str);
        crate::flows::identity_labels(identity, name)
    }
}

/// Rule cookies to `namespace/policy direction rule N`, for every rule of
/// every policy.
pub fn rule_names(cluster: &Cluster) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for p in cluster.policies.values() {
        for direction in Direction::ALL {
            for i in 0..p.rules(direction).len() {
                let cookie = rule_cookie(&p.namespace, &p.name, direction, i);
                out.insert(cookie, format!("{}/{} {direction} rule {i}", p.namespace, p.name));
            }
        }
    }
    out
}

/// An error to answer with: HTTP status and a message that says what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub message: String,
}

impl Failure {
    pub fn not_found(message: impl Into<String>) -> Self {
        Failure { status: 404, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Failure { status: 400, message: message.into() }
    }
}

/// Packets and bytes through one direction of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub forwarded_packets: u64,
    pub forwarded_bytes: u64,
    pub dropped_packets: u64,
}

/// A row of `agent endpoint list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSummary {
    pub id: u16,
    /// `namespace/pod`.
    pub name: String,
    pub interface: String,
    pub identity: u32,
    pub labels: Vec<String>,
    pub ipv4: Option<IpAddr>,
    pub ipv6: Option<IpAddr>,
    /// Some policy isolates the pod in this direction.
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// `ready`, or why not (`failed: ...`, `not in the kernel`).
    pub status: String,
    pub ingress: Traffic,
    pub egress: Traffic,
}

/// `agent endpoint get`: the summary, the policies, the entries as loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointDetail {
    #[serde(flatten)]
    pub summary: EndpointSummary,
    /// `namespace/name` of the policies selecting the pod, per direction.
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// Allow entries as read back from the kernel's maps.
    pub entries: Vec<MapEntry>,
    /// Per rule: the packets and bytes of the flows it allowed (both ways),
    /// as the programs count them: per policy set, so together for every
    /// endpoint in `policy_set_endpoints`.
    pub rules: Vec<RuleTraffic>,
    /// The policy set the endpoint's entries are in (shared by endpoints
    /// whose policy is the same) and how many endpoints use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_set: Option<u16>,
    #[serde(default)]
    pub policy_set_endpoints: usize,
    /// Drops per reason, per direction.
    pub drops: Vec<DropCount>,
    /// Where the kernel's entries differ from what the agent compiled.
    pub disagreements: Vec<String>,
}

/// One allow entry of the maps, ports merged back into ranges.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MapEntry {
    /// `ingress` or `egress`.
    pub direction: String,
    /// The peer: an identity's labels, `any`, or a CIDR (with its except
    /// holes shown as entries that allow nothing).
    pub peer: String,
    pub identity: Option<u32>,
    pub cidr: Option<String>,
    /// `TCP`, ... ; `any` for every protocol.
    pub protocol: String,
    /// `80`, `8000-8080` or `any`.
    pub ports: String,
    /// The rule that put it there.
    pub rule: Option<String>,
    pub rule_cookie: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTraffic {
    /// The direction the rule allows.
    pub direction: String,
    pub rule: Option<String>,
    pub rule_cookie: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// A row of `agent identity list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub id: u32,
    pub labels: Vec<String>,
    /// Addresses the ipcache maps to it.
    pub addresses: usize,
    /// Local endpoints that have it.
    pub endpoints: Vec<u16>,
}
