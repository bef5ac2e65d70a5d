//! Human output of each operator tool.

use std::fmt::Write as _;

use super::table;
use crate::{
    api::Status,
    inspect::{CtView, EndpointDetail, EndpointSummary, IdentityInfo, TraceReport, TraceSide},
};

fn enforcement(on: bool) -> String {
    if on { "Enabled" } else { "Disabled" }.into()
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".into(), ToString::to_string)
}

pub fn endpoints(list: &[EndpointSummary]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.name.clone(),
                enforcement(e.ingress_enforced),
                enforcement(e.egress_enforced),
                e.identity.to_string(),
                e.labels.join("\n"),
                opt(&e.ipv4),
                opt(&e.ipv6),
                e.status.clone(),
            ]
        })
        .collect();
    table::render(
        &[
            "ENDPOINT",
            "POD",
            "POLICY (ingress) ENFORCEMENT",
            "POLICY (egress) ENFORCEMENT",
            "IDENTITY",
            "LABELS",
            "IPv4",
            "IPv6",
            "STATUS",
        ],
        &rows,
    )
}

pub fn endpoint(d: &EndpointDetail) -> String {
    let s = &d.summary;
    let mut out = String::new();
    let _ = writeln!(out, "Endpoint:   {} ({})", s.id, s.name);
    let _ = writeln!(out, "Interface:  {}", s.interface);
    let _ = writeln!(out, "Identity:   {} ({})", s.identity, s.labels.join(" "));
    let addresses: Vec<String> = [s.ipv4, s.ipv6].iter().flatten().map(ToString::to_string).collect();
    let _ =
        writeln!(out, "Addresses:  {}", if addresses.is_empty() { "-".into() } else { addresses.join(", ") });
    let _ = writeln!(out, "Status:     {}", s.status);
    for (name, on, policies, t) in [
        ("Ingress", s.ingress_enforced, &d.ingress_policies, &s.ingress),
        ("Egress", s.egress_enforced, &d.egress_policies, &s.egress),
    ] {
        let by = if policies.is_empty() { String::new() } else { format!(" by {}", policies.join(", ")) };
        let _ = writeln!(
            out,
            "{name:<8}    {}{by}; forwarded {} packets ({} bytes), dropped {}",
            if on { "isolated" } else { "not isolated" },
            t.forwarded_packets,
            t.forwarded_bytes,
            t.dropped_packets
        );
    }
    for problem in &d.disagreements {
        let _ = writeln!(out, "WARNING:    {problem}");
    }
    let _ = writeln!(out, "\nAllow entries in the kernel's maps ({}):", d.entries.len());
    if d.entries.is_empty() {
        let _ = writeln!(
            out,
            "  (none: an isolated direction drops everything; a direction that is not isolated passes everything)"
        );
    } else {
        let rows: Vec<Vec<String>> = d
            .entries
            .iter()
            .map(|e| {
                vec![
                    e.direction.to_uppercase(),
                    e.peer.clone(),
                    e.identity.map_or_else(|| "-".into(), |i| i.to_string()),
                    e.protocol.clone(),
                    e.ports.clone(),
                    e.rule.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        for line in
            table::render(&["DIRECTION", "PEER", "IDENTITY", "PROTOCOL", "PORTS", "RULE"], &rows).lines()
        {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !d.rules.is_empty() {
        let shared = match (d.policy_set, d.policy_set_endpoints) {
            (Some(set), n) if n > 1 => format!("; policy set {set}, counted for its {n} endpoints together"),
            _ => String::new(),
        };
        let _ = writeln!(out, "\nTraffic per rule (the flows it allowed, both ways{shared}):");
        let rows: Vec<Vec<String>> = d
            .rules
            .iter()
            .map(|r| {
                vec![
                    r.direction.to_uppercase(),
                    r.rule.clone().unwrap_or_else(|| format!("cookie {}", r.rule_cookie)),
                    r.packets.to_string(),
                    r.bytes.to_string(),
                ]
            })
            .collect();
        for line in table::render(&["DIRECTION", "RULE", "PACKETS", "BYTES"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !d.drops.is_empty() {
        let _ = writeln!(out, "\nDrops:");
        let rows: Vec<Vec<String>> = d
            .drops
            .iter()
            .map(|c| {
                vec![c.direction.to_uppercase(), c.reason.clone(), c.packets.to_string(), c.bytes.to_string()]
            })
            .collect();
        for line in table::render(&["DIRECTION", "REASON", "PACKETS", "BYTES"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

pub fn identities(list: &[IdentityInfo]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            let endpoints: Vec<String> = i.endpoints.iter().map(ToString::to_string).collect();
            vec![
                i.id.to_string(),
                i.labels.join("\n"),
                i.addresses.to_string(),
                if endpoints.is_empty() { "-".into() } else { endpoints.join(",") },
            ]
        })
        .collect();
    table::render(&["ID", "LABELS", "ADDRESSES", "LOCAL ENDPOINTS"], &rows)
}

pub fn conntrack(list: &[CtView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            vec![
                format!("{} {}", c.endpoint_id, c.endpoint.as_deref().unwrap_or("?")),
                c.protocol.clone(),
                c.local.clone(),
                if c.origin == "EGRESS" { "->".into() } else { "<-".into() },
                c.remote.clone(),
                format!("{}s", c.age_seconds),
                format!("{}s", c.expires_in_seconds),
                if c.flags.is_empty() { "-".into() } else { c.flags.join(",") },
                c.rule.clone().unwrap_or_else(|| "(not isolated)".into()),
            ]
        })
        .collect();
    table::render(
        &["ENDPOINT", "PROTO", "LOCAL", "", "REMOTE", "AGE", "EXPIRES", "FLAGS", "ALLOWED BY"],
        &rows,
    )
}

pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let revision = s.revision.map_or_else(|| "nothing yet".into(), |r| format!("revision {r}"));
    let _ = writeln!(
        out,
        "Source:          {}{}",
        s.source,
        if s.source == "kube" && !s.synced { " (not synced yet)" } else { "" }
    );
    let Some(h) = &s.health else {
        let _ = writeln!(out, "Enforced:        {revision}");
        return out;
    };
    let _ = writeln!(out, "Agent:           {} on node {}", h.version, h.node);
    if let Some(a) = &h.api_server {
        let seen = a
            .last_event_ms_ago
            .map_or_else(String::new, |ms| format!(", last event {:.1}s ago", ms as f64 / 1000.0));
        let state = if a.connected { "connected" } else { "UNREACHABLE (enforcing the last state)" };
        let _ = writeln!(out, "API server:      {state}{seen}, {} watch restarts", a.watch_restarts);
        if let (false, Some(e)) = (a.connected, &a.last_error) {
            let _ = writeln!(out, "                 {e}");
        }
    }
    let at = h.last_enforced.as_deref().map_or_else(String::new, |t| format!(" at {t}"));
    let _ = writeln!(out, "Enforced:        {revision}{at}");
    let _ = writeln!(
        out,
        "Endpoints:       {} ({} failed)   Policies: {}   Identities: {}",
        h.endpoints, h.endpoints_failed, h.policies, h.identities
    );
    let _ = writeln!(
        out,
        "Flows:           {} forwarded packets, {} flow events seen",
        h.forwarded_packets, h.flows_seen
    );
    let _ = writeln!(out, "Maps:");
    let rows: Vec<Vec<String>> = h
        .maps
        .iter()
        .map(|m| {
            let pct = if m.capacity == 0 { 0.0 } else { m.entries as f64 * 100.0 / m.capacity as f64 };
            vec![m.name.clone(), m.entries.to_string(), m.capacity.to_string(), format!("{pct:.1}%")]
        })
        .collect();
    for line in table::render(&["MAP", "ENTRIES", "CAPACITY", "FILL"], &rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    let _ = writeln!(out, "Drops:");
    if h.drops.is_empty() {
        let _ = writeln!(out, "  none");
    } else {
        let rows: Vec<Vec<String>> = h
            .drops
            .iter()
            .map(|c| vec![c.direction.to_uppercase(), c.reason.clone(), c.packets.to_string()])
            .collect();
        for line in table::render(&["DIRECTION", "REASON", "PACKETS"], &rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    for e in &h.errors {
        let _ = writeln!(out, "ERROR:           {e}");
    }
    out
}

fn side(out: &mut String, s: &TraceSide) {
    let title = if s.direction == "egress" { "Egress of the client" } else { "Ingress of the server" };
    let _ = writeln!(out, "{title}: {}", if s.allowed { "ALLOWED" } else { "DROPPED" });
    let _ = writeln!(out, "  {}", s.explanation);
    if !s.selected_by.is_empty() {
        let _ = writeln!(out, "  selected by: {}", s.selected_by.join(", "));
    }
    if s.allowed_by.len() > 1 {
        let _ = writeln!(out, "  allowed by:  {}", s.allowed_by.join(", "));
    }
    if let Some(d) = &s.datapath {
        let check = if d.agrees { "agrees" } else { "DISAGREES with the policy" };
        let _ = writeln!(out, "  datapath (endpoint {}): {} ({check})", d.endpoint_id, d.verdict);
    } else if s.pod.is_some() {
        let _ = writeln!(out, "  datapath: not an endpoint of this node (its node's agent judges it)");
    }
}

pub fn trace(r: &TraceReport) -> String {
    let mut out = String::new();
    let party = |p: &crate::inspect::TraceParty| -> String {
        let ep = p.endpoint_id.map_or_else(String::new, |id| format!(", endpoint {id}"));
        format!("{} ({}, identity {}{ep})", p.name, p.ip, p.identity)
    };
    let _ = writeln!(out, "From: {}", party(&r.from));
    let _ = writeln!(out, "To:   {}", party(&r.to));
    let _ = writeln!(out, "Port: {}/{}\n", r.port, r.protocol);
    side(&mut out, &r.egress);
    side(&mut out, &r.ingress);
    let _ = writeln!(out, "\nVerdict: {}", if r.allowed { "ALLOWED" } else { "DROPPED" });
    if r.datapath_agrees == Some(false) {
        let _ = writeln!(out, "WARNING: the loaded maps decide otherwise than the policies (see above)");
    }
    out
}
