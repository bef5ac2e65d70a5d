//! Flow events from the ring buffer, decoded and named, printed like
//! `hubble observe -o compact`.

pub mod filter;
pub mod observe_args;
pub mod store;

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use portcullis_common::{
    DIR_INGRESS, FlowEvent, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
    VERDICT_DROPPED, identity, reason,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::{compiled::CompiledState, datapath::keys::ip_from};

/// One verdict of the datapath, named: what `agent observe` prints and
/// `POST /v1/flows` streams (one JSON object per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// RFC 3339, UTC.
    pub time: String,
    /// The same instant in nanoseconds since the Unix epoch (for `--since`).
    pub time_ns: u64,
    pub endpoint_id: u16,
    /// `namespace/pod` of the endpoint that judged the packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `INGRESS` or `EGRESS`, seen from the endpoint.
    pub direction: String,
    /// `DROPPED` or `FORWARDED`.
    pub verdict: String,
    pub reason: String,
    /// `TCP`, `UDP`, `SCTP`, `ICMPv4`, `ICMPv6` or `proto N`; absent for
    /// packets that are not IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    /// Names of the TCP flags set (`SYN`, `ACK`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_flags: Vec<String>,
    /// `namespace/pod` holding the address, when a pod does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_identity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_identity: Option<u32>,
    /// The identity's labels as `key=value`, namespace first as `ns=NAME`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub src_labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dst_labels: Vec<String>,
    /// For a forward of an isolated endpoint: the rule that allowed it
    /// (`namespace/policy ingress rule N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl Flow {
    /// The namespace of each side, from its pod name or its labels.
    pub fn src_namespace(&self) -> Option<&str> {
        namespace_of(self.src_pod.as_deref(), &self.src_labels)
    }

    pub fn dst_namespace(&self) -> Option<&str> {
        namespace_of(self.dst_pod.as_deref(), &self.dst_labels)
    }

    pub fn protocol_number(&self) -> Option<u8> {
        match self.protocol.as_deref()? {
            "TCP" => Some(IPPROTO_TCP),
            "UDP" => Some(IPPROTO_UDP),
            "SCTP" => Some(IPPROTO_SCTP),
            "ICMPv4" => Some(IPPROTO_ICMP),
            "ICMPv6" => Some(IPPROTO_ICMPV6),
            other => other.strip_prefix("proto ")?.parse().ok(),
        }
    }
}

fn namespace_of<'a>(pod: Option<&'a str>, labels: &'a [String]) -> Option<&'a str> {
    pod.and_then(|p| p.split_once('/').map(|(ns, _)| ns))
        .or_else(|| labels.iter().find_map(|l| l.strip_prefix("ns=")))
}

/// Names for addresses, identities, endpoints and rules, from the compiled
/// state (and the policies, for rule names).
#[derive(Clone, Debug, Default)]
pub struct Names {
    pods: HashMap<IpAddr, std::sync::Arc<str>>,
    endpoints: HashMap<u16, (String, u32)>,
    labels: HashMap<u32, Vec<String>>,
    rules: HashMap<u32, String>,
}

impl Names {
    pub fn from_state(state: &CompiledState) -> Self {
        let pods = state.ipcache.iter().filter_map(|e| Some((e.cidr.addr(), e.name.clone()?))).collect();
        let endpoints = state.endpoints.iter().map(|e| (e.id, (e.name.clone(), e.identity))).collect();
        let labels =
            state.identities.iter().map(|(id, text)| (*id, identity_labels(*id, Some(text)))).collect();
        Names { pods, endpoints, labels, rules: HashMap::new() }
    }

    /// Rule cookies to names (`namespace/policy direction rule N`).
    pub fn with_rules(mut self, rules: impl IntoIterator<Item = (u32, String)>) -> Self {
        self.rules = rules.into_iter().collect();
        self
    }

    pub fn rule(&self, cookie: u32) -> Option<&str> {
        self.rules.get(&cookie).map(String::as_str)
    }

    pub fn labels(&self, identity: u32) -> Vec<String> {
        match self.labels.get(&identity) {
            Some(l) => l.clone(),
            None => identity_labels(identity, None),
        }
    }
}

/// An identity's labels: `reserved:host` and `reserved:world` for the
/// reserved ones, else its compiled name (`ns=default app=web`: label keys
/// and values hold no spaces) split into `key=value` items.
pub fn identity_labels(identity: u32, name: Option<&str>) -> Vec<String> {
    match identity {
        identity::HOST => vec!["reserved:host".into()],
        identity::WORLD => vec!["reserved:world".into()],
        _ => name.map(|t| t.split_whitespace().map(str::to_owned).collect()).unwrap_or_default(),
    }
}

pub fn reason_name(r: u8) -> &'static str {
    match r {
        reason::POLICY_ALLOWED => "Policy allowed",
        reason::POLICY_DENIED => "Policy denied",
        reason::MALFORMED => "Malformed packet",
        reason::UNSUPPORTED_L3 => "Unsupported L3 protocol",
        reason::SPOOFED_SOURCE => "Invalid source ip",
        reason::UNKNOWN_ENDPOINT => "Unknown endpoint",
        reason::NO_MAP_SPACE => "No map space",
        _ => "Unknown reason",
    }
}

impl Flow {
    pub fn decode(ev: &FlowEvent, names: &Names, boot_offset: Duration) -> Flow {
        let src = ip_from(ev.family, &ev.src_addr);
        let dst = ip_from(ev.family, &ev.dst_addr);
        let ingress = ev.direction == DIR_INGRESS;
        let endpoint = names.endpoints.get(&ev.endpoint_id);
        let local_identity = endpoint.map(|e| e.1);
        let (src_identity, dst_identity) = if ingress {
            (Some(ev.remote_identity), local_identity)
        } else {
            (local_identity, Some(ev.remote_identity))
        };
        let name = |a: Option<IpAddr>| a.and_then(|a| names.pods.get(&a).map(|n| n.to_string()));
        let labels = |id: Option<u32>| id.map(|id| names.labels(id)).unwrap_or_default();
        let time = SystemTime::UNIX_EPOCH + boot_offset + Duration::from_nanos(ev.timestamp_ns);
        let protocol = (ev.family != 0).then_some(ev.protocol);
        Flow {
            time: rfc3339(time),
            time_ns: time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
            endpoint_id: ev.endpoint_id,
            endpoint: endpoint.map(|e| e.0.clone()),
            direction: if ingress { "INGRESS" } else { "EGRESS" }.into(),
            verdict: if ev.verdict == VERDICT_DROPPED { "DROPPED" } else { "FORWARDED" }.into(),
            reason: reason_name(ev.reason).into(),
            protocol: protocol.map(protocol_name),
            src,
            dst,
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            tcp_flags: if protocol == Some(IPPROTO_TCP) { tcp_flag_names(ev.tcp_flags) } else { Vec::new() },
            src_pod: name(src),
            dst_pod: name(dst),
            src_identity,
            dst_identity,
            src_labels: labels(src_identity),
            dst_labels: labels(dst_identity),
            policy: (ev.rule_cookie != 0).then(|| names.rule(ev.rule_cookie).map(str::to_owned)).flatten(),
        }
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "TCP".into(),
        IPPROTO_UDP => "UDP".into(),
        IPPROTO_SCTP => "SCTP".into(),
        IPPROTO_ICMP => "ICMPv4".into(),
        IPPROTO_ICMPV6 => "ICMPv6".into(),
        other => format!("proto {other}"),
    }
}

fn tcp_flag_names(flags: u8) -> Vec<String> {
    const NAMES: [(u8, &str); 6] =
        [(0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG")];
    NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, n)| (*n).to_owned()).collect()
}

fn identity_label(id: Option<u32>) -> String {
    match id {
        Some(identity::HOST) => "host".into(),
        Some(identity::WORLD) => "world".into(),
        Some(n) => format!("ID:{n}"),
        None => "ID:?".into(),
    }
}

fn endpoint_text(addr: Option<IpAddr>, port: u16, name: &Option<String>, protocol: Option<u8>) -> String {
    let with_port = matches!(protocol, Some(IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP));
    let host = match (name, addr) {
        (Some(n), _) => n.clone(),
        (None, Some(IpAddr::V6(a))) if with_port => format!("[{a}]"),
        (None, Some(a)) => a.to_string(),
        (None, None) => "?".into(),
    };
    if with_port { format!("{host}:{port}") } else { host }
}

impl fmt::Display for Flow {
    /// `Nov 23 18:29:17.123: default/frontend:41234 (ID:256) -> default/backend:80 (ID:257)
    /// EGRESS Policy denied DROPPED (TCP Flags: SYN)`, and for a forward the
    /// rule that allowed it in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = format_time(SystemTime::UNIX_EPOCH + Duration::from_nanos(self.time_ns));
        let protocol = self.protocol_number();
        let src = endpoint_text(self.src, self.src_port, &self.src_pod, protocol);
        let dst = endpoint_text(self.dst, self.dst_port, &self.dst_pod, protocol);
        write!(
            f,
            "{time}: {src} ({}) -> {dst} ({}) {} {} {}",
            identity_label(self.src_identity),
            identity_label(self.dst_identity),
            self.direction,
            self.reason,
            self.verdict,
        )?;
        match (protocol, &self.protocol) {
            (Some(IPPROTO_TCP), _) => write!(f, " (TCP Flags: {})", self.tcp_flags.join(", "))?,
            (_, Some(p)) => write!(f, " ({p})")?,
            _ => {}
        }
        match &self.policy {
            Some(rule) => write!(f, " [{rule}]"),
            None => Ok(()),
        }
    }
}

/// RFC 3339 in UTC with nanoseconds: `2026-11-24T07:30:00.123456789Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (year, month, day) = civil_from_days(secs.div_euclid(86400));
    let rem = secs.rem_euclid(86400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// `Mon DD HH:MM:SS.mmm` in UTC, as hubble prints it.
fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (_, month, day) = civil_from_days(days);
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{} {:>2} {:02}:{:02}:{:02}.{:03}",
        MONTHS[(month - 1) as usize],
        day,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Wall-clock time of the monotonic clock's zero: event timestamps are
/// `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
pub fn monotonic_epoch() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    now.saturating_sub(mono)
}

/// Reads flow events as they arrive.
pub struct FlowReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl FlowReader {
    pub fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its fd, which stays open as long as the
        // AsyncFd holds it.
        Ok(FlowReader { ring: unsafe { AsyncFd::register(ring)? } })
    }

    /// Waits for events and returns all that are ready.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<FlowEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let out = drain_ring(guard.get_inner_mut());
            guard.clear_ready();
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
}

/// The events already in the ring, without waiting.
pub fn drain_ring(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowEvent>() {
            // SAFETY: the program writes whole FlowEvents; read unaligned.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowEvent>()) });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2026-11-23
        assert_eq!(civil_from_days(20780), (2026, 11, 23));
    }

    #[test]
    fn compact_line_names_both_sides() {
        let mut ev = FlowEvent {
            timestamp_ns: 0,
            endpoint_id: 7,
            direction: DIR_INGRESS,
            verdict: VERDICT_DROPPED,
            reason: reason::POLICY_DENIED,
            family: portcullis_common::AF_INET,
            protocol: IPPROTO_TCP,
            tcp_flags: 0x02,
            src_port: 41234,
            dst_port: 80,
            remote_identity: 300,
            ..Default::default()
        };
        ev.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let mut names = Names::default();
        names.pods.insert("10.0.0.1".parse().unwrap(), "default/frontend".into());
        names.endpoints.insert(7, ("default/backend".into(), 301));
        names.labels.insert(300, vec!["ns=default".into(), "app=frontend".into()]);
        let flow = Flow::decode(&ev, &names, Duration::from_secs(20415 * 86400 + 3600));
        assert_eq!(
            flow.to_string(),
            "Nov 23 01:00:00.000: default/frontend:41234 (ID:300) -> 10.0.0.2:80 (ID:301) \
             INGRESS Policy denied DROPPED (TCP Flags: SYN)"
        );
        assert_eq!(flow.time, "2025-11-23T01:00:00.000000000Z");
        assert_eq!(flow.src_labels, ["ns=default", "app=frontend"]);
        assert_eq!(flow.src_namespace(), Some("default"));
        // The wire form reads back as the same flow.
        let json = serde_json::to_string(&flow).unwrap();
        assert_eq!(serde_json::from_str::<Flow>(&json).unwrap(), flow);

        ev.verdict = portcullis_common::VERDICT_FORWARDED;
        ev.reason = reason::POLICY_ALLOWED;
        ev.rule_cookie = 99;
        let names = names.with_rules([(99, "default/web ingress rule 0".to_owned())]);
        assert!(
            Flow::decode(&ev, &names, Duration::ZERO)
                .to_string()
                .ends_with("INGRESS Policy allowed FORWARDED (TCP Flags: SYN) [default/web ingress rule 0]")
        );
    }
}
