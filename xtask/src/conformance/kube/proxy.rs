//! Whether kube-proxy (iptables mode) has programmed the pods' Services yet:
//! its NAT rules, read back with `iptables-save`, must send each Service
//! port's ClusterIP to its chain and that chain to the pod.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::interrupted;

/// One Service port and the backend it must lead to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub namespace: String,
    pub service: String,
    /// The Service port's name.
    pub port_name: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub backend: SocketAddr,
}

impl Frontend {
    /// Whether `rules` (`iptables-save -t nat`) translate it: kube-proxy
    /// comments its rules with `<ns>/<service>:<port name>`.
    fn programmed(&self, rules: &str) -> bool {
        let comment = format!("--comment \"{}/{}:{}", self.namespace, self.service, self.port_name);
        let dispatch = format!("{comment} cluster IP\"");
        let to_chain = rules.lines().any(|l| {
            l.starts_with("-A KUBE-SERVICES ")
                && l.contains(&format!("-d {}/32 ", self.cluster_ip))
                && l.contains(&format!("-p {} ", self.protocol))
                && l.contains(&dispatch)
                && l.contains(&format!("--dport {} ", self.port))
                && l.contains("-j KUBE-SVC-")
        });
        let to_pod = rules.lines().any(|l| {
            l.contains(&format!("{comment}\""))
                && l.ends_with(&format!("-j DNAT --to-destination {}", self.backend))
        });
        to_chain && to_pod
    }
}

/// The frontends `rules` do not translate yet.
pub fn missing<'a>(rules: &str, frontends: &'a [Frontend]) -> Vec<&'a Frontend> {
    frontends.iter().filter(|f| !f.programmed(rules)).collect()
}

/// Waits until kube-proxy translates every frontend.
pub fn wait_programmed(frontends: &[Frontend], timeout: Duration) -> Result<()> {
    let started = Instant::now();
    loop {
        let out =
            Command::new("iptables-save").args(["-t", "nat"]).output().context("running iptables-save")?;
        if !out.status.success() {
            bail!("iptables-save: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let left = missing(&String::from_utf8_lossy(&out.stdout), frontends);
        let Some(first) = left.first() else { return Ok(()) };
        if interrupted() {
            bail!("interrupted");
        }
        if started.elapsed() > timeout {
            bail!(
                "kube-proxy has not programmed {} Service port(s) after {}s, {}/{}:{} ({}:{} -> {}) among them",
                left.len(),
                timeout.as_secs(),
                first.namespace,
                first.service,
                first.port_name,
                first.cluster_ip,
                first.port,
                first.backend
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_port_is_programmed_once_both_rules_are_there() {
        let f = Frontend {
            namespace: "x".into(),
            service: "s-x-a".into(),
            port_name: "tcp-80".into(),
            protocol: "tcp".into(),
            cluster_ip: "10.96.12.7".parse().unwrap(),
            port: 80,
            backend: "10.244.0.9:80".parse().unwrap(),
        };
        // As kube-proxy 1.20 writes them.
        let dispatch = r#"-A KUBE-SERVICES -d 10.96.12.7/32 -p tcp -m comment --comment "x/s-x-a:tcp-80 cluster IP" -m tcp --dport 80 -j KUBE-SVC-ABCDEF"#;
        let dnat = r#"-A KUBE-SEP-GHIJKL -p tcp -m comment --comment "x/s-x-a:tcp-80" -m tcp -j DNAT --to-destination 10.244.0.9:80"#;
        let other = r#"-A KUBE-SEP-MNOP -p tcp -m comment --comment "x/s-x-a:tcp-8080" -m tcp -j DNAT --to-destination 10.244.0.9:8080"#;
        let frontends = [f];
        assert!(missing(&format!("{dispatch}\n{dnat}\n"), &frontends).is_empty());
        assert_eq!(missing(dispatch, &frontends).len(), 1, "no backend yet");
        assert_eq!(missing(&format!("{dispatch}\n{other}"), &frontends).len(), 1, "another port's backend");
        let stale = dnat.replace("10.244.0.9:80", "10.244.0.4:80");
        assert_eq!(missing(&format!("{dispatch}\n{stale}"), &frontends).len(), 1, "an old pod's address");
    }
}
