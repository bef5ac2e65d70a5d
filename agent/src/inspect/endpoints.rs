//! Endpoints and identities as the operator tools show them.

use std::{collections::BTreeMap, net::IpAddr};

use portcullis_common::{DIR_EGRESS, DIR_INGRESS, PolicyKey, identity::CLASS_BASE, reason};

use super::{
    DropCount, EndpointDetail, EndpointSummary, Failure, IdentityInfo, MapEntry, RuleTraffic, Traffic, View,
};
use crate::{
    compiled::EndpointState,
    datapath::{DirectionCounters, KernelEndpoint, keys},
    flows::{protocol_name, reason_name},
    model::{Direction, PodKey},
};

/// Every endpoint of the enforced state, by id.
pub fn endpoints(view: &View<'_>) -> Vec<EndpointSummary> {
    let Some(state) = view.state else { return Vec::new() };
    let in_kernel = view.dp.kernel_endpoint_ids();
    state.endpoints.iter().map(|ep| summary(view, ep, in_kernel.contains(&ep.id))).collect()
}

fn summary(view: &View<'_>, ep: &EndpointState, in_kernel: bool) -> EndpointSummary {
    let status = if view.failed.contains(&ep.name) {
        let prefix = format!("endpoint {}:", ep.name);
        let why = view.errors.iter().find(|e| e.starts_with(&prefix)).cloned().unwrap_or_default();
        format!("failed: {why}")
    } else if !in_kernel {
        "not in the kernel yet".into()
    } else {
        "ready".into()
    };
    let counters = view.dp.endpoint_counters(ep.id).unwrap_or_default();
    EndpointSummary {
        id: ep.id,
        name: ep.name.clone(),
        interface: ep.interface.clone(),
        identity: ep.identity,
        labels: view.labels(ep.identity),
        ipv4: ep.addresses.iter().copied().find(IpAddr::is_ipv4),
        ipv6: ep.addresses.iter().copied().find(IpAddr::is_ipv6),
        ingress_enforced: ep.ingress.isolated,
        egress_enforced: ep.egress.isolated,
        status,
        ingress: traffic(&counters.ingress),
        egress: traffic(&counters.egress),
    }
}

fn traffic(c: &DirectionCounters) -> Traffic {
    Traffic {
        forwarded_packets: c.forwarded_packets,
        forwarded_bytes: c.forwarded_bytes,
        dropped_packets: c.dropped_total(),
    }
}

/// One endpoint by id or `namespace/pod`.
pub fn endpoint(view: &View<'_>, which: &str) -> Result<EndpointDetail, Failure> {
    let state = view.state.ok_or_else(|| Failure::not_found("nothing enforced yet"))?;
    let ep = match which.parse::<u16>() {
        Ok(id) => state.endpoints.iter().find(|e| e.id == id),
        Err(_) => state.endpoints.iter().find(|e| e.name == which),
    }
    .ok_or_else(|| {
        Failure::not_found(format!("no endpoint {which} on this node (`agent endpoint list` shows them)"))
    })?;
    let kernel = view.dp.kernel_endpoint(ep.id);
    let summary = summary(view, ep, kernel.is_some());
    let (ingress_policies, egress_policies) = selecting(view, ep);
    let rules = view.rule_names();
    let entries = kernel.as_ref().map(|k| map_entries(view, k, &rules)).unwrap_or_default();
    // Every rule with entries, counted or not yet.
    let mut counted = view.dp.rule_counters(ep.id);
    if let Some(k) = &kernel {
        for ((_, key), v) in &k.keys.policy {
            counted.entry((key.direction, v.rule_cookie)).or_default();
        }
    }
    let rules_traffic = counted
        .into_iter()
        .map(|((direction, cookie), (packets, bytes))| RuleTraffic {
            direction: if direction == DIR_INGRESS { "ingress" } else { "egress" }.into(),
            rule: rules.get(&cookie).cloned(),
            rule_cookie: cookie,
            packets,
            bytes,
        })
        .collect();
    let mut disagreements = Vec::new();
    match &kernel {
        None => disagreements.push("the kernel's endpoint table has no entry for this endpoint".into()),
        Some(k) => {
            if k.overflowed() {
                disagreements.push("its policy did not fit in the maps: every packet is dropped".into());
            }
            for (dir, name, want) in
                [(DIR_INGRESS, "ingress", ep.ingress.isolated), (DIR_EGRESS, "egress", ep.egress.isolated)]
            {
                if k.isolated(dir) != want {
                    disagreements.push(format!("{name} isolation: compiled {want}, in the kernel {}", !want));
                }
            }
            match view.dp.compiled_keys(ep) {
                Ok(want) if !k.overflowed() => {
                    let missing = want.policy.keys().filter(|key| !k.keys.policy.contains_key(key)).count()
                        + want.cidr.keys().filter(|key| !k.keys.cidr.contains_key(key)).count();
                    let extra = k.keys.policy.keys().filter(|key| !want.policy.contains_key(key)).count()
                        + k.keys.cidr.keys().filter(|key| !want.cidr.contains_key(key)).count();
                    if missing + extra > 0 {
                        disagreements.push(format!(
                            "the kernel's entries differ from the compiled ones: {missing} missing, {extra} extra"
                        ));
                    }
                }
                Ok(_) => {}
                Err(e) => disagreements.push(format!("the compiled entries are invalid: {e}")),
            }
        }
    }
    let counters = view.dp.endpoint_counters(ep.id).unwrap_or_default();
    let mut drops = Vec::new();
    for (direction, side) in [("ingress", &counters.ingress), ("egress", &counters.egress)] {
        drops.extend(drop_counts(direction, side));
    }
    Ok(EndpointDetail {
        summary,
        ingress_policies,
        egress_policies,
        entries,
        rules: rules_traffic,
        policy_set: view.dp.policy_set_of(ep.id).map(|(id, _)| id),
        policy_set_endpoints: view.dp.policy_set_of(ep.id).map_or(0, |(_, n)| n),
        drops,
        disagreements,
    })
}

/// A direction's drops per reason (those that happened).
pub(super) fn drop_counts(direction: &str, side: &DirectionCounters) -> Vec<DropCount> {
    (0..side.dropped_packets.len())
        .filter(|&why| side.dropped_packets[why] > 0 && why as u8 != reason::POLICY_ALLOWED)
        .map(|why| DropCount {
            direction: direction.into(),
            reason: reason_name(why as u8).into(),
            packets: side.dropped_packets[why],
            bytes: side.dropped_bytes[why],
        })
        .collect()
}

/// The policies selecting the endpoint's pod, per direction.
fn selecting(view: &View<'_>, ep: &EndpointState) -> (Vec<String>, Vec<String>) {
    let Some(cluster) = view.cluster else { return Default::default() };
    let Some((namespace, name)) = ep.name.split_once('/') else { return Default::default() };
    let key = PodKey { namespace: namespace.into(), name: name.into() };
    let Some(pod) = cluster.pods.get(&key) else { return Default::default() };
    let of = |direction| {
        cluster
            .policies_in(namespace)
            .filter(|p| p.affects(direction) && p.pod_selector.matches(&pod.labels))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    };
    (of(Direction::Ingress), of(Direction::Egress))
}

/// The kernel's entries of one endpoint, readable: port prefixes merged
/// back into ranges, prefix classes named by their CIDR.
fn map_entries(view: &View<'_>, k: &KernelEndpoint, rules: &BTreeMap<u32, String>) -> Vec<MapEntry> {
    let direction = |d: u8| if d == DIR_INGRESS { "ingress" } else { "egress" };
    let class_cidr: BTreeMap<(u8, u32), String> = k
        .keys
        .cidr
        .iter()
        .filter_map(|((bits, key), class)| {
            let ip = keys::ip_from(key.family, &key.addr)?;
            let len = bits - portcullis_common::CidrKey::HEADER_BITS;
            Some(((key.direction, *class), format!("{ip}/{len}")))
        })
        .collect();
    // (direction, peer identity, protocol or none, rule) -> port ranges.
    type Group = (u8, u32, Option<u8>, u32);
    let mut grouped: BTreeMap<Group, Vec<(u32, u32)>> = BTreeMap::new();
    for ((bits, key), value) in &k.keys.policy {
        let protocol = (*bits > PolicyKey::PREFIX_ANY_PROTO).then_some(key.protocol);
        let range = if *bits <= PolicyKey::PREFIX_ANY_PORT {
            (0, 65535)
        } else {
            let port_bits = bits - PolicyKey::PREFIX_ANY_PORT;
            let start = u32::from(u16::from_be_bytes(key.port));
            (start, start + (1u32 << (16 - port_bits)) - 1)
        };
        grouped.entry((key.direction, key.identity, protocol, value.rule_cookie)).or_default().push(range);
    }
    let mut out = Vec::new();
    for ((dir, peer, protocol, cookie), mut ranges) in grouped {
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 + 1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let (peer_text, identity, cidr) = if peer >= CLASS_BASE {
            let c = class_cidr
                .get(&(dir, peer))
                .cloned()
                .unwrap_or_else(|| format!("class {}", peer - CLASS_BASE));
            (c.clone(), None, Some(c))
        } else if peer == 0 {
            ("any".to_owned(), None, None)
        } else {
            let labels = view.labels(peer);
            let text = if labels.is_empty() { format!("identity {peer}") } else { labels.join(" ") };
            (text, Some(peer), None)
        };
        for (s, e) in merged {
            let ports = match (protocol, s, e) {
                (None, _, _) | (_, 0, 65535) => "any".to_owned(),
                (_, s, e) if s == e => s.to_string(),
                (_, s, e) => format!("{s}-{e}"),
            };
            out.push(MapEntry {
                direction: direction(dir).into(),
                peer: peer_text.clone(),
                identity,
                cidr: cidr.clone(),
                protocol: protocol.map_or_else(|| "any".to_owned(), protocol_name),
                ports,
                rule: rules.get(&cookie).cloned(),
                rule_cookie: cookie,
            });
        }
    }
    // Prefixes whose class has no entries: `except` holes.
    let used: std::collections::BTreeSet<(u8, u32)> =
        k.keys.policy.keys().map(|(_, key)| (key.direction, key.identity)).collect();
    for ((dir, class), cidr) in &class_cidr {
        if !used.contains(&(*dir, *class)) {
            out.push(MapEntry {
                direction: direction(*dir).into(),
                peer: format!("{cidr} (except: nothing)"),
                identity: None,
                cidr: Some(cidr.clone()),
                protocol: "none".into(),
                ports: "none".into(),
                rule: None,
                rule_cookie: 0,
            });
        }
    }
    out.sort();
    out
}

/// Every identity the enforced state knows, with its addresses and local
/// endpoints.
pub fn identities(view: &View<'_>) -> Vec<IdentityInfo> {
    let Some(state) = view.state else { return Vec::new() };
    let mut out: BTreeMap<u32, IdentityInfo> = BTreeMap::new();
    let ids = [portcullis_common::identity::HOST, portcullis_common::identity::WORLD]
        .into_iter()
        .chain(state.identities.keys().copied())
        .chain(state.ipcache.iter().map(|e| e.identity))
        .chain(state.endpoints.iter().map(|e| e.identity));
    for id in ids {
        out.entry(id).or_insert_with(|| IdentityInfo {
            id,
            labels: view.labels(id),
            addresses: 0,
            endpoints: Vec::new(),
        });
    }
    for e in &state.ipcache {
        if let Some(info) = out.get_mut(&e.identity) {
            info.addresses += 1;
        }
    }
    for ep in &state.endpoints {
        if let Some(info) = out.get_mut(&ep.identity) {
            info.endpoints.push(ep.id);
        }
    }
    out.into_values().collect()
}
