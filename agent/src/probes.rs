//! What the kubelet's probes ask the agent: `/healthz` (is the main loop
//! turning?) and `/readyz` (is this node enforcing?). The main loop
//! publishes its `Progress` as it goes; the HTTP server judges it when a
//! probe asks, so a stuck loop is seen as stuck rather than answered for.

use std::time::{Duration, Instant};

/// A main loop silent this long is stuck: not live, not ready.
pub const STALL: Duration = Duration::from_secs(30);

/// The main loop's progress, as last published.
#[derive(Clone, Debug)]
pub struct Progress {
    /// When the loop last went round (it ticks every 100 ms).
    pub heartbeat: Instant,
    /// The revision last written to the maps: none until the sources have
    /// given a complete view (for `--kube`: every kind listed) and it was
    /// written.
    pub revision: Option<u64>,
    pub endpoints: usize,
    /// Pods whose endpoint could not be written (retried every second).
    pub failed: Vec<String>,
    /// Node-wide hooks that are not in place (a verdict would be missed).
    pub missing_hooks: Vec<String>,
}

impl Progress {
    pub fn starting(now: Instant) -> Self {
        Progress {
            heartbeat: now,
            revision: None,
            endpoints: 0,
            failed: Vec::new(),
            missing_hooks: Vec::new(),
        }
    }

    /// Ok with a line to show, or Err with why not.
    pub fn live(&self, now: Instant) -> Result<String, String> {
        let silent = now.saturating_duration_since(self.heartbeat);
        if silent > STALL {
            return Err(format!("the main loop has not turned for {}s", silent.as_secs()));
        }
        Ok("alive\n".into())
    }

    /// Ready means enforcing: the loop is live, a complete view is in the
    /// maps, and every local pod's endpoint in it was written. A node with a
    /// pod it cannot enforce is not ready, so a rolling update stops there
    /// instead of moving on to the next node.
    pub fn ready(&self, now: Instant) -> Result<String, String> {
        self.live(now)?;
        let Some(revision) = self.revision else {
            return Err("not enforcing yet: waiting for a complete view of the cluster".into());
        };
        if !self.failed.is_empty() {
            let mut shown: Vec<&str> = self.failed.iter().take(5).map(String::as_str).collect();
            if self.failed.len() > shown.len() {
                shown.push("…");
            }
            return Err(format!(
                "revision {revision} written, but {} endpoint(s) failed: {} (see `agent status`)",
                self.failed.len(),
                shown.join(", ")
            ));
        }
        if !self.missing_hooks.is_empty() {
            return Err(format!(
                "revision {revision} written, but not in place: {}",
                self.missing_hooks.join("; ")
            ));
        }
        Ok(format!("enforcing revision {revision} on {} endpoint(s)\n", self.endpoints))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_a_complete_view_is_written_without_failures() {
        let t0 = Instant::now();
        let mut p = Progress::starting(t0);
        assert!(p.live(t0).is_ok());
        assert!(p.ready(t0).unwrap_err().contains("not enforcing yet"));
        p.revision = Some(3);
        p.endpoints = 2;
        assert_eq!(p.ready(t0).unwrap(), "enforcing revision 3 on 2 endpoint(s)\n");
        p.failed = (0..7).map(|i| format!("ns/pod-{i}")).collect();
        let why = p.ready(t0).unwrap_err();
        assert!(why.contains("7 endpoint(s) failed: ns/pod-0, ns/pod-1"), "{why}");
        assert!(why.ends_with("… (see `agent status`)"), "{why}");
        p.failed.clear();
        p.missing_hooks = vec!["the host cgroup hook".into()];
        assert!(p.ready(t0).unwrap_err().contains("not in place: the host cgroup hook"));
    }

    #[test]
    fn a_silent_loop_is_neither_live_nor_ready() {
        let t0 = Instant::now();
        let mut p = Progress::starting(t0);
        p.revision = Some(1);
        let later = t0 + STALL + Duration::from_secs(1);
        assert!(p.live(later).unwrap_err().contains("has not turned for 31s"));
        assert!(p.ready(later).is_err());
        p.heartbeat = later;
        assert!(p.ready(later).is_ok());
    }
}
