//! `agent status` and the Prometheus metrics: counters summed over
//! endpoints, map fill, and what the main loop measures as it goes.

use std::{collections::BTreeMap, time::SystemTime};

use super::{View, endpoints::drop_counts};
use crate::{
    api::{ApiServerHealth, Health},
    datapath::{DirectionCounters, EndpointCounters},
    metrics::{DropCount, Histogram, Metrics},
};

/// What the main loop records between passes.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    /// Passes that compiled a change: the time to compile it.
    pub compile: Histogram,
    /// Passes that wrote the maps: the time the writes took.
    pub write: Histogram,
    /// CNI ADDs answered: from the request read to the answer.
    pub cni_add: Histogram,
    pub last_enforced: Option<SystemTime>,
    /// Live conntrack entries at the last sweep.
    pub conntrack_live: Option<u64>,
    pub flows_seen: u64,
    /// Each endpoint's counters when last read, and what endpoints that
    /// went away (or whose id was handed on) had counted: the totals only
    /// grow, as Prometheus counters must.
    pub last_counts: BTreeMap<u16, EndpointCounters>,
    pub retired: EndpointCounters,
}

fn add(sum: &mut DirectionCounters, side: &DirectionCounters) {
    sum.forwarded_packets += side.forwarded_packets;
    sum.forwarded_bytes += side.forwarded_bytes;
    for i in 0..sum.dropped_packets.len() {
        sum.dropped_packets[i] += side.dropped_packets[i];
        sum.dropped_bytes[i] += side.dropped_bytes[i];
    }
}

/// Did `now` count less than `before` anywhere (its id was reset)?
fn went_back(before: &DirectionCounters, now: &DirectionCounters) -> bool {
    now.forwarded_packets < before.forwarded_packets
        || now.dropped_packets.iter().zip(&before.dropped_packets).any(|(n, b)| n < b)
}

/// Forwards and drops since the agent started, per direction: the
/// endpoints' counters now plus what gone endpoints had counted when last
/// read (what they counted after that is lost).
fn totals(view: &View<'_>, t: &mut Telemetry) -> (DirectionCounters, DirectionCounters) {
    let now = view.dp.counters();
    for (id, before) in std::mem::take(&mut t.last_counts) {
        let gone = now
            .get(&id)
            .is_none_or(|c| went_back(&before.ingress, &c.ingress) || went_back(&before.egress, &c.egress));
        if gone {
            add(&mut t.retired.ingress, &before.ingress);
            add(&mut t.retired.egress, &before.egress);
        }
    }
    let mut ingress = t.retired.ingress.clone();
    let mut egress = t.retired.egress.clone();
    for c in now.values() {
        add(&mut ingress, &c.ingress);
        add(&mut egress, &c.egress);
    }
    t.last_counts = now;
    (ingress, egress)
}

fn drops(ingress: &DirectionCounters, egress: &DirectionCounters) -> Vec<DropCount> {
    let mut out = drop_counts("ingress", ingress);
    out.extend(drop_counts("egress", egress));
    out
}

fn policies(view: &View<'_>) -> usize {
    view.cluster.map_or(0, |c| c.policies.len())
}

pub fn health(view: &View<'_>, t: &mut Telemetry, node: &str, api_server: Option<ApiServerHealth>) -> Health {
    let (ingress, egress) = totals(view, t);
    Health {
        version: env!("CARGO_PKG_VERSION").into(),
        node: node.into(),
        api_server,
        last_enforced: t.last_enforced.map(crate::flows::rfc3339),
        endpoints: view.state.map_or(0, |s| s.endpoints.len()),
        endpoints_failed: view.failed.len(),
        policies: policies(view),
        identities: view.state.map_or(0, |s| s.identities.len()),
        maps: view.dp.map_fill(t.conntrack_live),
        forwarded_packets: ingress.forwarded_packets + egress.forwarded_packets,
        drops: drops(&ingress, &egress),
        errors: view.errors.to_vec(),
        flows_seen: t.flows_seen,
    }
}

pub fn metrics(
    view: &View<'_>,
    t: &mut Telemetry,
    api_server: Option<&ApiServerHealth>,
    restarts: Vec<(String, u64)>,
) -> Metrics {
    let (ingress, egress) = totals(view, t);
    Metrics {
        forwarded_packets: [ingress.forwarded_packets, egress.forwarded_packets],
        forwarded_bytes: [ingress.forwarded_bytes, egress.forwarded_bytes],
        drops: drops(&ingress, &egress),
        endpoints: view.state.map_or(0, |s| s.endpoints.len() as u64),
        endpoints_failed: view.failed.len() as u64,
        identities: view.state.map_or(0, |s| s.identities.len() as u64),
        policies: policies(view) as u64,
        map_entries: view.dp.map_fill(t.conntrack_live),
        conntrack_entries: t.conntrack_live.unwrap_or(0),
        policy_compile_seconds: t.compile.clone(),
        map_write_seconds: t.write.clone(),
        cni_add_seconds: t.cni_add.clone(),
        watch_restarts: restarts.into_iter().collect(),
        api_server_connected: api_server.map(|a| a.connected),
        last_sync_unix_seconds: t
            .last_enforced
            .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64()),
        revision: view.state.map_or(0, |s| s.revision),
        flow_events_seen: t.flows_seen,
        heap: crate::metrics::HeapBytes::now(),
    }
}
