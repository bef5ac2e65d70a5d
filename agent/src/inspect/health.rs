//! `agent status` and the Prometheus metrics: counters summed over
//! endpoints, map fill, and what the main loop measures as it goes.

use std::time::SystemTime;

use super::{View, endpoints::drop_counts};
use crate::{
    api::{ApiServerHealth, Health},
    datapath::DirectionCounters,
    metrics::{DropCount, Histogram, Metrics},
};

/// What the main loop records between passes.
#[derive(Clone, Debug, Default)]
pub struct Telemetry {
    /// Passes that compiled a change: the time to compile it.
    pub compile: Histogram,
    /// Passes that wrote the maps: the time the writes took.
    pub write: Histogram,
    pub last_enforced: Option<SystemTime>,
    /// Live conntrack entries at the last sweep.
    pub conntrack_live: Option<u64>,
    pub flows_seen: u64,
}

/// Forwards and drops of every endpoint, per direction.
fn totals(view: &View<'_>) -> (DirectionCounters, DirectionCounters) {
    let mut ingress = DirectionCounters::default();
    let mut egress = DirectionCounters::default();
    for c in view.dp.counters().values() {
        for (sum, side) in [(&mut ingress, &c.ingress), (&mut egress, &c.egress)] {
            sum.forwarded_packets += side.forwarded_packets;
            sum.forwarded_bytes += side.forwarded_bytes;
            for i in 0..sum.dropped_packets.len() {
                sum.dropped_packets[i] += side.dropped_packets[i];
                sum.dropped_bytes[i] += side.dropped_bytes[i];
            }
        }
    }
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

pub fn health(view: &View<'_>, t: &Telemetry, node: &str, api_server: Option<ApiServerHealth>) -> Health {
    let (ingress, egress) = totals(view);
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
    t: &Telemetry,
    api_server: Option<&ApiServerHealth>,
    restarts: Vec<(String, u64)>,
) -> Metrics {
    let (ingress, egress) = totals(view);
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
        watch_restarts: restarts.into_iter().collect(),
        api_server_connected: api_server.map(|a| a.connected),
        last_sync_unix_seconds: t
            .last_enforced
            .and_then(|e| e.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64()),
        revision: view.state.map_or(0, |s| s.revision),
        flow_events_seen: t.flows_seen,
    }
}
