//! Which flows a client wants, like `hubble observe`'s filters: within one
//! field the values are alternatives, across fields all must hold, and an
//! empty [`Criteria`] takes every flow.
//!
//! Criteria travel as plain strings (`POST /v1/flows`), so matching parses
//! them as it goes; a value that does not parse matches nothing, and
//! [`Criteria::validate`] is there to reject it up front.

use std::net::IpAddr;

use ipnet::IpNet;
use portcullis_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

use super::Flow;

/// One filter: each field lists alternatives; empty fields don't filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Criteria {
    /// `[namespace/]pod-name-prefix` of either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_pod: Vec<String>,
    /// Namespace of either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_namespace: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_namespace: Vec<String>,
    /// Label selector (`k=v,k2!=v2,k3,!k4`) on either side's labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub label: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_label: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_label: Vec<String>,
    /// Address or CIDR of either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_ip: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_ip: Vec<String>,
    /// TCP/UDP/SCTP port of either side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_port: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_port: Vec<String>,
    /// `TCP`, `UDP`, `SCTP`, `ICMPv4` (or `ICMP`), `ICMPv6`, any case, or
    /// an IP protocol number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol: Vec<String>,
    /// `DROPPED` or `FORWARDED`, any case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<String>,
    /// The judging endpoint: its id, or its `namespace/pod`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoint: Vec<String>,
    /// `INGRESS` or `EGRESS`, any case.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub direction: Vec<String>,
}

/// Source or destination.
#[derive(Clone, Copy)]
enum Side {
    Src,
    Dst,
}

impl Side {
    fn pod(self, f: &Flow) -> Option<&str> {
        match self {
            Side::Src => f.src_pod.as_deref(),
            Side::Dst => f.dst_pod.as_deref(),
        }
    }

    fn namespace(self, f: &Flow) -> Option<&str> {
        match self {
            Side::Src => f.src_namespace(),
            Side::Dst => f.dst_namespace(),
        }
    }

    fn labels(self, f: &Flow) -> &[String] {
        match self {
            Side::Src => &f.src_labels,
            Side::Dst => &f.dst_labels,
        }
    }

    fn ip(self, f: &Flow) -> Option<IpAddr> {
        match self {
            Side::Src => f.src,
            Side::Dst => f.dst,
        }
    }

    fn port(self, f: &Flow) -> Option<u16> {
        // Only these carry ports; for the others the fields are not ports.
        if !matches!(f.protocol_number(), Some(IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)) {
            return None;
        }
        Some(match self {
            Side::Src => f.src_port,
            Side::Dst => f.dst_port,
        })
    }
}

const BOTH: [Side; 2] = [Side::Src, Side::Dst];

/// True when the field is empty or any of its values holds.
fn any_of(values: &[String], holds: impl Fn(&str) -> bool) -> bool {
    values.is_empty() || values.iter().any(|v| holds(v))
}

/// `ns/prefix`: a pod in `ns` whose name starts with `prefix`; without a
/// namespace, a name prefix in any namespace.
fn pod_matches(pattern: &str, pod: Option<&str>) -> bool {
    let Some((ns, name)) = pod.and_then(|p| p.split_once('/')) else { return false };
    match pattern.split_once('/') {
        Some((want_ns, prefix)) => ns == want_ns && name.starts_with(prefix),
        None => name.starts_with(pattern),
    }
}

fn ip_matches(pattern: &str, ip: Option<IpAddr>) -> bool {
    let Some(ip) = ip else { return false };
    match parse_ip_or_cidr(pattern) {
        Some(net) => net.contains(&ip),
        None => false,
    }
}

fn parse_ip_or_cidr(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>().ok().or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

fn port_matches(pattern: &str, port: Option<u16>) -> bool {
    port.is_some() && pattern.parse::<u16>().ok() == port
}

/// The protocol number a filter value names.
fn protocol_number(text: &str) -> Option<u8> {
    match text.to_ascii_lowercase().as_str() {
        "tcp" => Some(IPPROTO_TCP),
        "udp" => Some(IPPROTO_UDP),
        "sctp" => Some(IPPROTO_SCTP),
        // hubble's `icmp` is ICMPv4.
        "icmp" | "icmpv4" => Some(IPPROTO_ICMP),
        "icmpv6" => Some(IPPROTO_ICMPV6),
        other => other.parse().ok(),
    }
}

fn endpoint_matches(pattern: &str, f: &Flow) -> bool {
    match pattern.parse::<u16>() {
        Ok(id) => f.endpoint_id == id,
        Err(_) => f.endpoint.as_deref() == Some(pattern),
    }
}

/// One term of a label selector.
#[derive(Debug, PartialEq, Eq)]
enum Term<'a> {
    Exists(&'a str),
    Absent(&'a str),
    Equals(&'a str, &'a str),
    NotEquals(&'a str, &'a str),
}

/// Selector keys as hubble users write them, to the keys flows carry.
fn selector_key(key: &str) -> &str {
    let key = key.trim();
    let key = key.strip_prefix("k8s:").unwrap_or(key);
    // Cilium's name for the namespace label; flows call it `ns`.
    if key == "io.kubernetes.pod.namespace" { "ns" } else { key }
}

/// `k=v,k2!=v2,k3,!k4` (also `k==v`), or why not.
fn parse_selector(text: &str) -> Result<Vec<Term<'_>>, String> {
    text.split(',')
        .map(|term| {
            let term = term.trim();
            let parsed = if let Some(key) = term.strip_prefix('!') {
                if key.contains('=') {
                    return Err(format!("{term:?}: `!key` takes no value (use key!=value)"));
                }
                Term::Absent(selector_key(key))
            } else if let Some((key, value)) = term.split_once("!=") {
                Term::NotEquals(selector_key(key), value.trim())
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                Term::Equals(selector_key(key), value.trim())
            } else {
                Term::Exists(selector_key(term))
            };
            let (Term::Exists(key) | Term::Absent(key) | Term::Equals(key, _) | Term::NotEquals(key, _)) =
                parsed;
            if key.is_empty() {
                return Err(if term.is_empty() {
                    "empty selector term".to_owned()
                } else {
                    format!("{term:?}: no label key")
                });
            }
            Ok(parsed)
        })
        .collect()
}

/// Flow labels are `key=value`; reserved ones (`reserved:host`) are a bare
/// key.
fn label_values<'a>(labels: &'a [String], key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    labels.iter().filter_map(move |l| match l.split_once('=') {
        Some((k, v)) => (k == key).then_some(v),
        None => (l == key).then_some(""),
    })
}

fn selector_matches(selector: &str, labels: &[String]) -> bool {
    let Ok(terms) = parse_selector(selector) else { return false };
    terms.iter().all(|term| match *term {
        Term::Exists(k) => label_values(labels, k).next().is_some(),
        Term::Absent(k) => label_values(labels, k).next().is_none(),
        Term::Equals(k, v) => label_values(labels, k).any(|x| x == v),
        // Kubernetes' `!=`: holds when the key is absent too.
        Term::NotEquals(k, v) => label_values(labels, k).all(|x| x != v),
    })
}

impl Criteria {
    pub fn is_empty(&self) -> bool {
        self == &Criteria::default()
    }

    /// Every non-empty field has a value that holds for the flow (the
    /// either-side ones all on the same side).
    pub fn matches(&self, f: &Flow) -> bool {
        let sides = |values: &[String], sides: &[Side], holds: &dyn Fn(&str, Side) -> bool| {
            any_of(values, |v| sides.iter().any(|&s| holds(v, s)))
        };
        let pod = |v: &str, s: Side| pod_matches(v, s.pod(f));
        let namespace = |v: &str, s: Side| s.namespace(f) == Some(v);
        let label = |v: &str, s: Side| selector_matches(v, s.labels(f));
        let ip = |v: &str, s: Side| ip_matches(v, s.ip(f));
        let port = |v: &str, s: Side| port_matches(v, s.port(f));
        // Either-side filters hold together on one side, as hubble's: `--pod
        // a --label app=db` wants a side that is pod a and labelled app=db.
        let one_side = BOTH.iter().any(|&s| {
            sides(&self.pod, &[s], &pod)
                && sides(&self.namespace, &[s], &namespace)
                && sides(&self.label, &[s], &label)
                && sides(&self.ip, &[s], &ip)
                && sides(&self.port, &[s], &port)
        });
        one_side
            && sides(&self.from_pod, &[Side::Src], &pod)
            && sides(&self.to_pod, &[Side::Dst], &pod)
            && sides(&self.from_namespace, &[Side::Src], &namespace)
            && sides(&self.to_namespace, &[Side::Dst], &namespace)
            && sides(&self.from_label, &[Side::Src], &label)
            && sides(&self.to_label, &[Side::Dst], &label)
            && sides(&self.from_ip, &[Side::Src], &ip)
            && sides(&self.to_ip, &[Side::Dst], &ip)
            && sides(&self.from_port, &[Side::Src], &port)
            && sides(&self.to_port, &[Side::Dst], &port)
            && any_of(&self.protocol, |v| protocol_number(v).is_some_and(|p| f.protocol_number() == Some(p)))
            && any_of(&self.verdict, |v| f.verdict.eq_ignore_ascii_case(v))
            && any_of(&self.endpoint, |v| endpoint_matches(v, f))
            && any_of(&self.direction, |v| f.direction.eq_ignore_ascii_case(v))
    }

    /// Every value well-formed; errors name the `agent observe` flag.
    pub fn validate(&self) -> Result<(), String> {
        type Check = fn(&str) -> Result<(), String>;
        let fields: [(&str, &[String], Check); 19] = [
            ("pod", &self.pod, check_pod),
            ("from-pod", &self.from_pod, check_pod),
            ("to-pod", &self.to_pod, check_pod),
            ("namespace", &self.namespace, check_namespace),
            ("from-namespace", &self.from_namespace, check_namespace),
            ("to-namespace", &self.to_namespace, check_namespace),
            ("label", &self.label, check_selector),
            ("from-label", &self.from_label, check_selector),
            ("to-label", &self.to_label, check_selector),
            ("ip", &self.ip, check_ip),
            ("from-ip", &self.from_ip, check_ip),
            ("to-ip", &self.to_ip, check_ip),
            ("port", &self.port, check_port),
            ("from-port", &self.from_port, check_port),
            ("to-port", &self.to_port, check_port),
            ("protocol", &self.protocol, check_protocol),
            ("verdict", &self.verdict, check_verdict),
            ("endpoint", &self.endpoint, check_endpoint),
            ("traffic-direction", &self.direction, check_direction),
        ];
        for (flag, values, check) in fields {
            for v in values {
                check(v).map_err(|why| format!("--{flag} {v}: {why}"))?;
            }
        }
        Ok(())
    }
}

fn check_pod(v: &str) -> Result<(), String> {
    // `ns/` is fine: every pod in the namespace.
    let ok = match v.split_once('/') {
        Some((ns, prefix)) => !ns.is_empty() && !prefix.contains('/'),
        None => !v.is_empty(),
    };
    if ok { Ok(()) } else { Err("not a pod name prefix ([namespace/]pod)".into()) }
}

fn check_namespace(v: &str) -> Result<(), String> {
    if v.is_empty() || v.contains('/') {
        return Err("not a namespace name".into());
    }
    Ok(())
}

fn check_selector(v: &str) -> Result<(), String> {
    parse_selector(v).map(drop).map_err(|why| format!("not a label selector (k=v,k!=v,k,!k): {why}"))
}

fn check_ip(v: &str) -> Result<(), String> {
    parse_ip_or_cidr(v).map(drop).ok_or_else(|| "not an IP address or CIDR".into())
}

fn check_port(v: &str) -> Result<(), String> {
    v.parse::<u16>().map(drop).map_err(|_| "not a port number (0-65535)".into())
}

fn check_protocol(v: &str) -> Result<(), String> {
    protocol_number(v)
        .map(drop)
        .ok_or_else(|| "not a protocol (tcp, udp, sctp, icmp, icmpv4, icmpv6 or a number)".into())
}

fn check_verdict(v: &str) -> Result<(), String> {
    match v.to_ascii_uppercase().as_str() {
        "DROPPED" | "FORWARDED" => Ok(()),
        _ => Err("not a verdict (FORWARDED or DROPPED)".into()),
    }
}

fn check_endpoint(v: &str) -> Result<(), String> {
    if v.parse::<u16>().is_ok() {
        return Ok(());
    }
    match v.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => Ok(()),
        _ => Err("not an endpoint id or namespace/pod".into()),
    }
}

fn check_direction(v: &str) -> Result<(), String> {
    match v.to_ascii_uppercase().as_str() {
        "INGRESS" | "EGRESS" => Ok(()),
        _ => Err("not a traffic direction (ingress or egress)".into()),
    }
}

/// A flow query: which flows, and how much history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowQuery {
    /// Flows must match this...
    #[serde(default)]
    pub include: Criteria,
    /// ...and not this (when it is not empty).
    #[serde(default)]
    pub exclude: Criteria,
    /// At most this many stored flows, the newest; `None`: all stored.
    #[serde(default)]
    pub last: Option<usize>,
    /// Keep streaming new flows after the stored ones.
    #[serde(default)]
    pub follow: bool,
    /// Flows at or after this instant (ns since the Unix epoch).
    #[serde(default)]
    pub since_ns: Option<u64>,
    /// Flows before this instant.
    #[serde(default)]
    pub until_ns: Option<u64>,
}

impl FlowQuery {
    /// Filters and time window; `last` and `follow` are for the caller.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.since_ns.is_none_or(|t| flow.time_ns >= t)
            && self.until_ns.is_none_or(|t| flow.time_ns < t)
            && self.include.matches(flow)
            && (self.exclude.is_empty() || !self.exclude.matches(flow))
    }
}

const ACCEPTED_TIMES: &str =
    "expected a duration ago (30s, 5m, 2h30m, 1.5h, 500ms) or an RFC 3339 time (2026-11-24T07:30:00Z)";

/// `--since`/`--until`: a duration before `now_ns` (`30s`, `2h30m`,
/// `1.5h`, `500ms`) or an RFC 3339 timestamp; nanoseconds since the epoch.
pub fn parse_time(text: &str, now_ns: u64) -> Result<u64, String> {
    let t = text.trim();
    let bad = |why: &str| format!("{text:?}: {why}; {ACCEPTED_TIMES}");
    // Dates start with four digits and a dash; durations never have a dash.
    if t.contains('-') && t.len() >= 10 {
        return parse_rfc3339(t).map_err(|why| bad(&why));
    }
    let ago = parse_duration_ns(t).map_err(|why| bad(&why))?;
    Ok(now_ns.saturating_sub(ago))
}

/// Go-style durations: one or more `<decimal><unit>`, units ns, us (µs),
/// ms, s, m, h, and d for days.
fn parse_duration_ns(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err("empty".into());
    }
    if text == "0" {
        return Ok(0);
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "d" => 86400 * 1_000_000_000,
            "" => return Err(format!("{num:?} has no unit")),
            other => return Err(format!("unknown unit {other:?}")),
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(format!("{num:?} is not a number"));
        }
        let digits = |s: &str| -> Result<u128, String> {
            if s.is_empty() { Ok(0) } else { s.parse().map_err(|_| format!("{num:?} is too large")) }
        };
        // Nine fractional digits are below a nanosecond for every unit.
        let frac = &frac[..frac.len().min(9)];
        let scale = 10u128.pow(frac.len() as u32);
        total = digits(whole)?
            .checked_mul(unit_ns)
            .and_then(|w| w.checked_add(digits(frac).ok()? * unit_ns / scale))
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| format!("{text:?} is too long"))?;
        rest = tail;
    }
    u64::try_from(total).map_err(|_| "too long".into())
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±hh:mm)`.
fn parse_rfc3339(text: &str) -> Result<u64, String> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(range)?;
        if s.bytes().all(|c| c.is_ascii_digit()) { s.parse().ok() } else { None }
    };
    let malformed = || "not a valid RFC 3339 time".to_owned();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(malformed());
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(malformed());
    }
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    let (hour, minute, second) = (num(11..13), num(14..16), num(17..19));
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) =
        (year, month, day, hour, minute, second)
    else {
        return Err(malformed());
    };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err("no such date".into());
    }
    // 60: a leap second.
    if hour > 23 || minute > 59 || second > 60 {
        return Err("no such time of day".into());
    }
    let mut rest = &text[19..];
    let mut nanos = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let len = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
        if len == 0 {
            return Err(malformed());
        }
        let kept = &frac[..len.min(9)];
        nanos = kept.parse::<i64>().map_err(|_| malformed())? * 10i64.pow(9 - kept.len() as u32);
        rest = &frac[len..];
    }
    let offset_secs = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        &[sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (Some(h), Some(m)) = (two(h1, h2), two(m1, m2)) else {
                return Err("no time zone (Z or ±hh:mm)".into());
            };
            if h > 23 || m > 59 {
                return Err("no such time zone offset".into());
            }
            if sign == b'-' { -(h * 3600 + m * 60) } else { h * 3600 + m * 60 }
        }
        _ => return Err("no time zone (Z or ±hh:mm)".into()),
    };
    let secs = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second - offset_secs;
    let ns = i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    u64::try_from(ns).map_err(|_| "before 1970".into())
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// (year, month, day) to days since 1970-01-01; Howard Hinnant's algorithm,
/// the inverse of `civil_from_days`.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

#[cfg(test)]
mod same_side_tests {
    use super::*;

    #[test]
    fn either_side_filters_hold_on_one_side_together() {
        let flow: Flow = serde_json::from_value(serde_json::json!({
            "time": "", "time_ns": 0, "endpoint_id": 1, "direction": "EGRESS", "verdict": "DROPPED",
            "reason": "", "src_port": 1234, "dst_port": 80,
            "src_pod": "x/a", "dst_pod": "x/db", "src_labels": ["ns=x", "app=web"], "dst_labels": ["ns=x", "app=db"],
        }))
        .expect("flow");
        let c = |pod: &str, label: &str| Criteria {
            pod: vec![pod.into()],
            label: vec![label.into()],
            ..Default::default()
        };
        assert!(c("x/a", "app=web").matches(&flow));
        assert!(c("x/db", "app=db").matches(&flow));
        assert!(!c("x/a", "app=db").matches(&flow), "pod a is not labelled app=db");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            time: String::new(),
            time_ns: 1_000,
            endpoint_id: 7,
            endpoint: Some("default/backend-7d9f".into()),
            direction: "INGRESS".into(),
            verdict: "DROPPED".into(),
            reason: "Policy denied".into(),
            protocol: Some("TCP".into()),
            src: Some("10.0.0.1".parse().unwrap()),
            dst: Some("10.0.1.2".parse().unwrap()),
            src_port: 41234,
            dst_port: 80,
            tcp_flags: vec!["SYN".into()],
            src_pod: Some("frontend/web-5c6b".into()),
            dst_pod: Some("default/backend-7d9f".into()),
            src_identity: Some(300),
            dst_identity: Some(301),
            src_labels: vec!["ns=frontend".into(), "app=web".into(), "tier=front".into()],
            dst_labels: vec!["ns=default".into(), "app=backend".into()],
            policy: None,
        }
    }

    fn v(values: &[&str]) -> Vec<String> {
        values.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn empty_matches_everything() {
        assert!(Criteria::default().is_empty());
        assert!(Criteria::default().matches(&flow()));
        assert!(FlowQuery::default().matches(&flow()));
    }

    #[test]
    fn pods_by_namespace_and_prefix() {
        let f = flow();
        let c = |pod: &[&str], from: &[&str], to: &[&str]| Criteria {
            pod: v(pod),
            from_pod: v(from),
            to_pod: v(to),
            ..Default::default()
        };
        assert!(c(&["web"], &[], &[]).matches(&f));
        assert!(c(&["frontend/web"], &[], &[]).matches(&f));
        assert!(c(&["default/"], &[], &[]).matches(&f));
        assert!(!c(&["default/web"], &[], &[]).matches(&f));
        assert!(!c(&["api"], &[], &[]).matches(&f));
        // Alternatives within a field.
        assert!(c(&["api", "backend"], &[], &[]).matches(&f));
        assert!(c(&[], &["web"], &["backend"]).matches(&f));
        assert!(!c(&[], &["backend"], &[]).matches(&f));
        assert!(!c(&[], &[], &["web"]).matches(&f));
        // Across fields, all must hold.
        assert!(!c(&[], &["web"], &["web"]).matches(&f));
        // A side without a pod name matches no pod filter.
        let mut world = f.clone();
        world.src_pod = None;
        assert!(!c(&[], &["web"], &[]).matches(&world));
    }

    #[test]
    fn namespaces_from_pod_or_labels() {
        let mut f = flow();
        let ns = |any: &[&str], from: &[&str], to: &[&str]| Criteria {
            namespace: v(any),
            from_namespace: v(from),
            to_namespace: v(to),
            ..Default::default()
        };
        assert!(ns(&["default"], &[], &[]).matches(&f));
        assert!(ns(&[], &["frontend"], &["default"]).matches(&f));
        assert!(!ns(&[], &["default"], &[]).matches(&f));
        assert!(!ns(&["kube-system"], &[], &[]).matches(&f));
        f.dst_pod = None;
        assert!(ns(&[], &[], &["default"]).matches(&f));
    }

    #[test]
    fn label_selectors() {
        let f = flow();
        let from = |sel: &str| Criteria { from_label: v(&[sel]), ..Default::default() }.matches(&f);
        assert!(from("app=web"));
        assert!(from("app==web"));
        assert!(from("app=web,tier=front"));
        assert!(from("app=web, tier"));
        assert!(from("k8s:app=web"));
        assert!(from("k8s:io.kubernetes.pod.namespace=frontend"));
        assert!(from("ns=frontend,!team"));
        assert!(from("app!=backend"));
        assert!(from("team!=x"));
        assert!(!from("app=web,tier=back"));
        assert!(!from("!app"));
        assert!(!from("app!=web"));
        assert!(!from("team"));
        assert!(!from("app=,"));
        let any = |sel: &[&str]| Criteria { label: v(sel), ..Default::default() }.matches(&f);
        assert!(any(&["app=backend"]));
        assert!(any(&["app=nope", "app=web"]));
        assert!(!any(&["app=nope"]));
        let to = Criteria { to_label: v(&["app=web"]), ..Default::default() };
        assert!(!to.matches(&f));
        // Reserved labels are bare keys.
        let mut host = f.clone();
        host.src_labels = v(&["reserved:host"]);
        assert!(Criteria { from_label: v(&["reserved:host"]), ..Default::default() }.matches(&host));
    }

    #[test]
    fn addresses_and_cidrs() {
        let f = flow();
        let ip = |any: &[&str], from: &[&str], to: &[&str]| {
            Criteria { ip: v(any), from_ip: v(from), to_ip: v(to), ..Default::default() }.matches(&f)
        };
        assert!(ip(&["10.0.1.2"], &[], &[]));
        assert!(ip(&["10.0.0.0/24"], &[], &[]));
        assert!(ip(&[], &["10.0.0.0/24"], &["10.0.1.0/24"]));
        assert!(!ip(&[], &["10.0.1.0/24"], &[]));
        assert!(!ip(&["fd00::/8"], &[], &[]));
        assert!(!ip(&["not-an-ip"], &[], &[]));
        assert!(ip(&["fd00::/8", "10.0.0.1"], &[], &[]));
    }

    #[test]
    fn ports_only_for_port_protocols() {
        let mut f = flow();
        let port = |f: &Flow, any: &[&str], from: &[&str], to: &[&str]| {
            Criteria { port: v(any), from_port: v(from), to_port: v(to), ..Default::default() }.matches(f)
        };
        assert!(port(&f, &["80"], &[], &[]));
        assert!(port(&f, &["41234"], &[], &[]));
        assert!(port(&f, &[], &[], &["80"]));
        assert!(!port(&f, &[], &["80"], &[]));
        assert!(port(&f, &["53", "80"], &[], &[]));
        f.protocol = Some("ICMPv4".into());
        f.dst_port = 0;
        assert!(!port(&f, &["0"], &[], &[]));
    }

    #[test]
    fn protocol_verdict_endpoint_direction() {
        let f = flow();
        let c = |c: Criteria| c.matches(&f);
        assert!(c(Criteria { protocol: v(&["tcp"]), ..Default::default() }));
        assert!(c(Criteria { protocol: v(&["6"]), ..Default::default() }));
        assert!(c(Criteria { protocol: v(&["udp", "TCP"]), ..Default::default() }));
        assert!(!c(Criteria { protocol: v(&["icmp"]), ..Default::default() }));
        let mut icmp = f.clone();
        icmp.protocol = Some("ICMPv4".into());
        assert!(Criteria { protocol: v(&["icmp"]), ..Default::default() }.matches(&icmp));
        assert!(!Criteria { protocol: v(&["icmpv6"]), ..Default::default() }.matches(&icmp));
        assert!(c(Criteria { verdict: v(&["dropped"]), ..Default::default() }));
        assert!(!c(Criteria { verdict: v(&["FORWARDED"]), ..Default::default() }));
        assert!(c(Criteria { endpoint: v(&["7"]), ..Default::default() }));
        assert!(c(Criteria { endpoint: v(&["default/backend-7d9f"]), ..Default::default() }));
        assert!(!c(Criteria { endpoint: v(&["8", "default/backend"]), ..Default::default() }));
        assert!(c(Criteria { direction: v(&["ingress"]), ..Default::default() }));
        assert!(!c(Criteria { direction: v(&["EGRESS"]), ..Default::default() }));
    }

    #[test]
    fn query_excludes_and_time_window() {
        let f = flow();
        let mut q = FlowQuery {
            include: Criteria { pod: v(&["web"]), ..Default::default() },
            exclude: Criteria { to_port: v(&["53"]), ..Default::default() },
            ..Default::default()
        };
        assert!(q.matches(&f));
        q.exclude.to_port = v(&["53", "80"]);
        assert!(!q.matches(&f));
        q.exclude = Criteria::default();
        q.since_ns = Some(1_000);
        q.until_ns = Some(1_001);
        assert!(q.matches(&f));
        q.since_ns = Some(1_001);
        assert!(!q.matches(&f));
        q.since_ns = None;
        q.until_ns = Some(1_000);
        assert!(!q.matches(&f));
    }

    #[test]
    fn wire_form_skips_empty_fields() {
        let q = FlowQuery {
            include: Criteria { to_ip: v(&["10.0.0.0/8"]), ..Default::default() },
            last: Some(20),
            ..Default::default()
        };
        let json = serde_json::to_string(&q).unwrap();
        assert_eq!(
            json,
            r#"{"include":{"to_ip":["10.0.0.0/8"]},"exclude":{},"last":20,"follow":false,"since_ns":null,"until_ns":null}"#
        );
        assert_eq!(serde_json::from_str::<FlowQuery>(&json).unwrap(), q);
        assert_eq!(serde_json::from_str::<FlowQuery>("{}").unwrap(), FlowQuery::default());
    }

    #[test]
    fn validation_names_the_flag() {
        let err = |c: Criteria| c.validate().unwrap_err();
        assert_eq!(
            err(Criteria { to_ip: v(&["10.0.0.300"]), ..Default::default() }),
            "--to-ip 10.0.0.300: not an IP address or CIDR"
        );
        assert!(err(Criteria { port: v(&["http"]), ..Default::default() }).starts_with("--port http:"));
        assert!(err(Criteria { protocol: v(&["gre"]), ..Default::default() }).starts_with("--protocol gre:"));
        assert!(err(Criteria { verdict: v(&["denied"]), ..Default::default() }).starts_with("--verdict"));
        assert!(
            err(Criteria { direction: v(&["up"]), ..Default::default() })
                .starts_with("--traffic-direction up:")
        );
        assert!(
            err(Criteria { from_label: v(&["a=b,,c"]), ..Default::default() }).starts_with("--from-label")
        );
        assert!(err(Criteria { label: v(&["!a=b"]), ..Default::default() }).starts_with("--label"));
        assert!(err(Criteria { endpoint: v(&["web"]), ..Default::default() }).starts_with("--endpoint"));
        assert!(err(Criteria { pod: v(&["a/b/c"]), ..Default::default() }).starts_with("--pod"));
        assert!(err(Criteria { namespace: v(&[""]), ..Default::default() }).starts_with("--namespace"));
        let ok = Criteria {
            pod: v(&["web", "default/", "default/api"]),
            label: v(&["k8s:app=web,!canary,tier!=db"]),
            ip: v(&["10.0.0.1", "fd00::/8"]),
            port: v(&["53"]),
            protocol: v(&["ICMP", "udp", "17"]),
            verdict: v(&["forwarded"]),
            endpoint: v(&["12", "default/web"]),
            direction: v(&["Egress"]),
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn relative_times() {
        let now = 10_000 * 1_000_000_000;
        let s = 1_000_000_000;
        assert_eq!(parse_time("30s", now), Ok(now - 30 * s));
        assert_eq!(parse_time("5m", now), Ok(now - 300 * s));
        assert_eq!(parse_time("1h", now), Ok(now - 3600 * s));
        assert_eq!(parse_time("2h30m", now), Ok(now - 9000 * s));
        assert_eq!(parse_time("1.5h", now), Ok(now - 5400 * s));
        assert_eq!(parse_time("500ms", now), Ok(now - s / 2));
        assert_eq!(parse_time(".5s", now), Ok(now - s / 2));
        assert_eq!(parse_time("1m0.25s", now), Ok(now - 60 * s - s / 4));
        assert_eq!(parse_time("0", now), Ok(now));
        // Further back than the epoch: the epoch.
        assert_eq!(parse_time("1000d", now), Ok(0));
        for bad in ["", "30", "5x", "h", "1..5s", "-5m", "5 m", "99999999999999999999h"] {
            let err = parse_time(bad, now).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")) && err.contains("RFC 3339"), "{bad}: {err}");
        }
    }

    #[test]
    fn rfc3339_times() {
        let s = 1_000_000_000u64;
        assert_eq!(parse_time("1970-01-01T00:00:00Z", 0), Ok(0));
        // 2026-11-24 is day 20781.
        let day = 20781 * 86400 * s;
        assert_eq!(parse_time("2026-11-24T07:30:00Z", 0), Ok(day + (7 * 3600 + 1800) * s));
        assert_eq!(parse_time("2026-11-24T07:30:00.5Z", 0), Ok(day + (7 * 3600 + 1800) * s + s / 2));
        assert_eq!(
            parse_time("2026-11-24T07:30:00.123456789123Z", 0),
            Ok(day + (7 * 3600 + 1800) * s + 123_456_789)
        );
        assert_eq!(parse_time("2026-11-24T09:30:00+02:00", 0), Ok(day + (7 * 3600 + 1800) * s));
        assert_eq!(parse_time("2026-11-23T23:30:00-08:00", 0), Ok(day + (7 * 3600 + 1800) * s));
        assert_eq!(parse_time("2024-02-29t00:00:00z", 0), Ok(19782 * 86400 * s));
        for bad in [
            "2026-11-24T07:30:00",
            "2026-11-24",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-24T24:00:00Z",
            "2026-11-24T07:30:00+2:00",
            "2026-11-24T07:30:00.Z",
            "1969-12-31T23:59:59Z",
            "2026-1-24T07:30:00Z",
        ] {
            let err = parse_time(bad, 0).unwrap_err();
            assert!(err.contains(bad) && err.contains("RFC 3339"), "{bad}: {err}");
        }
    }

    #[test]
    fn civil_round_trip() {
        for days in [-800_000, -1, 0, 59, 60, 20780, 2_000_000] {
            let (y, m, d) = super::super::civil_from_days(days);
            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), days);
        }
    }
}
