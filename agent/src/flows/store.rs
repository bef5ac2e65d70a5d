//! The last flows in memory (for `agent observe --last`) and a broadcast of
//! new ones (for `--follow`), like hubble's ring buffer.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use super::Flow;

/// Flows kept when `--flow-history` is not given (hubble keeps 4095).
pub const DEFAULT_HISTORY: usize = 8192;

#[derive(Clone)]
pub struct FlowStore {
    inner: Arc<Mutex<Inner>>,
    live: broadcast::Sender<Arc<Flow>>,
}

struct Inner {
    flows: VecDeque<Arc<Flow>>,
    capacity: usize,
    /// Every flow ever pushed (the metrics' flow event counter).
    seen: u64,
}

impl FlowStore {
    pub fn new(capacity: usize) -> Self {
        // A follower more than this many flows behind is told it lost some.
        let (live, _) = broadcast::channel(4096);
        let inner = Inner { flows: VecDeque::with_capacity(capacity.min(1 << 16)), capacity, seen: 0 };
        FlowStore { inner: Arc::new(Mutex::new(inner)), live }
    }

    pub fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        {
            let mut inner = self.lock();
            inner.seen += 1;
            if inner.capacity > 0 {
                if inner.flows.len() == inner.capacity {
                    inner.flows.pop_front();
                }
                inner.flows.push_back(flow.clone());
            }
        }
        // No followers is fine.
        let _ = self.live.send(flow);
    }

    /// The stored flows `keep` accepts, oldest first, at most the newest
    /// `last` of them (`None`: all), and a receiver of every flow pushed
    /// after them (subscribed under the same lock, so none falls between).
    pub fn snapshot(
        &self,
        last: Option<usize>,
        keep: impl Fn(&Flow) -> bool,
    ) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let inner = self.lock();
        let rx = self.live.subscribe();
        let mut out: Vec<Arc<Flow>> = Vec::new();
        if last != Some(0) {
            for f in inner.flows.iter().rev() {
                if keep(f) {
                    out.push(f.clone());
                    if last.is_some_and(|n| out.len() >= n) {
                        break;
                    }
                }
            }
        }
        out.reverse();
        (out, rx)
    }

    pub fn seen(&self) -> u64 {
        self.lock().seen
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u64, verdict: &str) -> Flow {
        Flow {
            time: String::new(),
            time_ns: n,
            endpoint_id: 1,
            endpoint: None,
            direction: "INGRESS".into(),
            verdict: verdict.into(),
            reason: String::new(),
            protocol: None,
            src: None,
            dst: None,
            src_port: 0,
            dst_port: 0,
            tcp_flags: vec![],
            src_pod: None,
            dst_pod: None,
            src_identity: None,
            dst_identity: None,
            src_labels: vec![],
            dst_labels: vec![],
            policy: None,
        }
    }

    #[test]
    fn keeps_the_newest_and_filters_before_counting() {
        let store = FlowStore::new(5);
        for n in 0..8 {
            store.push(flow(n, if n % 2 == 0 { "DROPPED" } else { "FORWARDED" }));
        }
        let times = |v: Vec<Arc<Flow>>| v.iter().map(|f| f.time_ns).collect::<Vec<_>>();
        assert_eq!(times(store.snapshot(None, |_| true).0), [3, 4, 5, 6, 7]);
        assert_eq!(times(store.snapshot(Some(2), |f| f.verdict == "DROPPED").0), [4, 6]);
        assert_eq!(times(store.snapshot(Some(0), |_| true).0), Vec::<u64>::new());
        assert_eq!(store.seen(), 8);
    }

    #[tokio::test]
    async fn followers_get_what_comes_after_their_snapshot() {
        let store = FlowStore::new(2);
        store.push(flow(1, "DROPPED"));
        let (old, mut rx) = store.snapshot(None, |_| true);
        store.push(flow(2, "DROPPED"));
        assert_eq!(old.len(), 1);
        assert_eq!(rx.recv().await.unwrap().time_ns, 2);
    }
}
