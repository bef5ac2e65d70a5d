//! `agent ct list`: the conntrack table, named and filtered.

use std::net::IpAddr;

use portcullis_common::{DIR_INGRESS, ct_flags};
use serde::{Deserialize, Serialize};

use super::{Failure, View};
use crate::{
    datapath::{CtEntry, keys::ip_from, monotonic_ns},
    flows::protocol_name,
};

/// Which entries to list; every field narrows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CtFilter {
    /// An endpoint id or `namespace/pod`.
    pub endpoint: Option<String>,
    /// Either side's address.
    pub ip: Option<IpAddr>,
    /// Either side's port.
    pub port: Option<u16>,
    /// `TCP`, `UDP`, ...
    pub protocol: Option<String>,
    /// At most this many (the first in endpoint and address order).
    pub limit: Option<usize>,
}

/// One conntrack entry: a flow as one endpoint sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtView {
    pub endpoint_id: u16,
    pub endpoint: Option<String>,
    pub protocol: String,
    pub local: String,
    pub remote: String,
    /// `INGRESS` (the peer opened it) or `EGRESS`.
    pub origin: String,
    pub age_seconds: u64,
    /// Seconds until it passes nothing; 0 once expired (the sweep removes it).
    pub expires_in_seconds: u64,
    /// `seen-reply`, `closing`, `service`.
    pub flags: Vec<String>,
    /// The rule that allowed it (none: its direction was not isolated).
    pub rule: Option<String>,
    /// A Service connection: the backend the verdict was given on.
    pub backend: Option<String>,
}

fn socket(ip: Option<IpAddr>, port: u16) -> String {
    match ip {
        Some(IpAddr::V6(a)) => format!("[{a}]:{port}"),
        Some(a) => format!("{a}:{port}"),
        None => format!("?:{port}"),
    }
}

pub fn conntrack(view: &View<'_>, filter: &CtFilter) -> Result<Vec<CtView>, Failure> {
    let endpoint_names: std::collections::BTreeMap<u16, String> =
        view.state.map(|s| s.endpoints.iter().map(|e| (e.id, e.name.clone())).collect()).unwrap_or_default();
    let endpoint = match &filter.endpoint {
        None => None,
        Some(text) => Some(match text.parse::<u16>() {
            Ok(id) => id,
            Err(_) => {
                *endpoint_names
                    .iter()
                    .find(|(_, n)| *n == text)
                    .ok_or_else(|| Failure::not_found(format!("no endpoint {text} on this node")))?
                    .0
            }
        }),
    };
    let protocol = match &filter.protocol {
        None => None,
        Some(p) => Some(
            crate::model::Protocol::parse(&p.to_uppercase())
                .ok_or_else(|| Failure::bad_request(format!("protocol {p}: expected TCP, UDP or SCTP")))?
                .number(),
        ),
    };
    let rules = view.rule_names();
    let now = monotonic_ns();
    let keep = |e: &CtEntry| {
        let k = &e.key;
        let local = ip_from(k.family, &k.local_addr);
        let remote = ip_from(k.family, &k.remote_addr);
        endpoint.is_none_or(|id| k.endpoint_id == id)
            && protocol.is_none_or(|p| k.protocol == p)
            && filter.ip.is_none_or(|ip| local == Some(ip) || remote == Some(ip))
            && filter.port.is_none_or(|p| k.local_port == p || k.remote_port == p)
    };
    let mut out: Vec<CtView> = view
        .dp
        .conntrack_entries()
        .into_iter()
        .filter(keep)
        .map(|e| {
            let (k, v) = (&e.key, &e.value);
            let mut flags = Vec::new();
            for (bit, name) in [
                (ct_flags::SEEN_REPLY, "seen-reply"),
                (ct_flags::CLOSING, "closing"),
                (ct_flags::SERVICE, "service"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name.to_owned());
                }
            }
            CtView {
                endpoint_id: k.endpoint_id,
                endpoint: endpoint_names.get(&k.endpoint_id).cloned(),
                protocol: protocol_name(k.protocol),
                local: socket(ip_from(k.family, &k.local_addr), k.local_port),
                remote: socket(ip_from(k.family, &k.remote_addr), k.remote_port),
                origin: if v.origin == DIR_INGRESS { "INGRESS" } else { "EGRESS" }.into(),
                age_seconds: now.saturating_sub(v.created_ns) / 1_000_000_000,
                expires_in_seconds: v.expires_ns.saturating_sub(now) / 1_000_000_000,
                flags,
                rule: (v.rule_cookie != 0).then(|| {
                    rules.get(&v.rule_cookie).cloned().unwrap_or_else(|| format!("cookie {}", v.rule_cookie))
                }),
                backend: (v.flags & ct_flags::SERVICE != 0)
                    .then(|| socket(ip_from(k.family, &v.nat_addr), v.nat_port)),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.endpoint_id, &a.local, &a.remote).cmp(&(b.endpoint_id, &b.local, &b.remote)));
    if let Some(n) = filter.limit {
        out.truncate(n);
    }
    Ok(out)
}
