//! Waiting until the agent enforces what the runner wrote. The agent's
//! local API (`GET /v1/status` on its root-only socket on the node) reports,
//! per watched kind, the newest resourceVersion its maps reflect; the runner
//! notes the resourceVersions the API server gave its writes and polls
//! until the agent is at least there on every kind it wrote.
//!
//! A resourceVersion is etcd's revision, ordered across the cluster (the
//! API calls it opaque; the agent and the runner both refuse one that is
//! not a number). A delete has no version the writer learns, so after
//! deletes the runner writes a barrier policy (`objects::BARRIER`): once the
//! agent is past the barrier on NetworkPolicies, it is past the deletes too,
//! since one kind's events reach it in order.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use portcullis_agent::api::{self, Status};
use serde_json::Value;

use crate::interrupted;

/// The kinds the agent watches.
const WATCHED: [&str; 4] = ["Namespace", "Pod", "NetworkPolicy", "Service"];

/// The newest resourceVersion the runner wrote (or read back) per watched
/// kind.
#[derive(Debug, Default)]
pub struct Written(BTreeMap<String, u64>);

impl Written {
    /// Notes an object as the API server returned it; kinds the agent does
    /// not watch (Endpoints) are left out.
    pub fn note(&mut self, object: &Value) -> Result<()> {
        let kind = object["kind"].as_str().unwrap_or_default();
        if !WATCHED.contains(&kind) {
            return Ok(());
        }
        let name = object["metadata"]["name"].as_str().unwrap_or("?");
        let version = object["metadata"]["resourceVersion"]
            .as_str()
            .with_context(|| format!("{kind} {name}: no resourceVersion"))?;
        let version: u64 = version.parse().with_context(|| {
            format!("{kind} {name}: resourceVersion {version:?} is not a number: the agent's progress cannot be compared with it")
        })?;
        let newest = self.0.entry(kind.to_owned()).or_default();
        *newest = (*newest).max(version);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What the agent still lacks, if anything.
    pub fn lag(&self, status: &Status) -> Option<String> {
        if status.source != "kube" {
            return Some(format!("the agent on the node reads {:?}, not the API server", status.source));
        }
        if !status.synced {
            return Some("the agent has not listed every kind yet".into());
        }
        self.0.iter().find_map(|(kind, wrote)| {
            let enforced = status.resource_versions.get(kind).and_then(|v| v.parse::<u64>().ok());
            match enforced {
                Some(v) if v >= *wrote => None,
                Some(v) => {
                    Some(format!("{kind}s enforced up to resourceVersion {v}, the runner wrote {wrote}"))
                }
                None => Some(format!("no {kind} enforced yet, the runner wrote {wrote}")),
            }
        })
    }
}

/// Waits until the agent's maps reflect everything in `written`. An agent
/// that does not answer (restarting, or stopped for a while) is waited for
/// too, up to `timeout`.
pub fn wait_enforced(written: &Written, timeout: Duration) -> Result<()> {
    if written.is_empty() {
        return Ok(());
    }
    let socket = Path::new(api::DEFAULT_SOCKET);
    let started = Instant::now();
    let mut said = false;
    loop {
        let lag = match api::get(socket, "/v1/status", Duration::from_secs(5)) {
            Ok((200, body)) => match serde_json::from_value::<Status>(body) {
                Ok(status) => match written.lag(&status) {
                    None => return Ok(()),
                    Some(lag) => lag,
                },
                Err(e) => format!("unreadable status: {e}"),
            },
            Ok((404, _)) => bail!(
                "the agent on the node has no GET /v1/status: it predates it; deploy the current one \
                 (`cargo xtask cluster up`, then `kubectl -n portcullis rollout restart ds/portcullis`)"
            ),
            Ok((code, body)) => format!("the agent answered {code}: {body}"),
            Err(e) => format!("no answer on {}: {e}", socket.display()),
        };
        if interrupted() {
            bail!("interrupted");
        }
        if started.elapsed() > timeout {
            bail!("the agent has not enforced the runner's writes after {}s: {lag}", timeout.as_secs());
        }
        if !said && started.elapsed() > Duration::from_secs(10) {
            eprintln!("conformance: waiting for the agent: {lag}");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn status(versions: &[(&str, &str)]) -> Status {
        Status {
            source: "kube".into(),
            revision: Some(3),
            synced: true,
            resource_versions: versions.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            health: None,
        }
    }

    #[test]
    fn the_agent_must_be_past_every_kind_written() {
        let mut written = Written::default();
        let object = |kind: &str, version: &str| json!({"kind": kind, "metadata": {"name": "o", "resourceVersion": version}});
        written.note(&object("Pod", "120")).unwrap();
        written.note(&object("Pod", "99")).unwrap();
        written.note(&object("NetworkPolicy", "130")).unwrap();
        written.note(&object("Endpoints", "131")).unwrap();
        assert!(written.note(&object("Service", "opaque")).is_err());

        assert_eq!(
            written.lag(&status(&[("Pod", "119"), ("NetworkPolicy", "200")])).as_deref(),
            Some("Pods enforced up to resourceVersion 119, the runner wrote 120")
        );
        assert_eq!(
            written.lag(&status(&[("Pod", "120")])).as_deref(),
            Some("no NetworkPolicy enforced yet, the runner wrote 130")
        );
        // Endpoints are not watched: nothing to wait for there.
        assert_eq!(written.lag(&status(&[("Pod", "125"), ("NetworkPolicy", "130")])), None);

        let unsynced = Status { synced: false, ..status(&[("Pod", "500"), ("NetworkPolicy", "500")]) };
        assert!(written.lag(&unsynced).is_some());
        let files = Status { source: "manifests".into(), ..status(&[]) };
        assert!(written.lag(&files).is_some());
        assert!(Written::default().is_empty());
    }
}
