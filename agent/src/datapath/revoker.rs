//! Revoking tracked flows off the agent's loop: a walk of a full conntrack
//! table takes about 100 ms, and a policy change that came meanwhile would
//! wait for it. One thread walks, one walk at a time, always by the newest
//! snapshot sent (older ones still queued are skipped: the newest state
//! judges at least as strictly as what it replaced, for every flow it
//! matters to).

use std::{sync::mpsc, thread::JoinHandle, time::Instant};

use super::Revocation;

/// What a walk did.
#[derive(Clone, Copy, Debug)]
pub struct Revoked {
    /// The revision whose snapshot judged (the newest sent before the walk).
    pub revision: u64,
    pub flows: usize,
    pub ms: f64,
}

pub struct Revoker {
    tx: Option<mpsc::Sender<Revocation>>,
    thread: Option<JoinHandle<()>>,
}

impl Revoker {
    /// Starts the thread; `done` hears of every walk.
    pub fn start(done: impl Fn(Revoked) + Send + 'static) -> std::io::Result<Revoker> {
        let (tx, rx) = mpsc::channel::<Revocation>();
        let thread = std::thread::Builder::new().name("revoker".into()).spawn(move || {
            while let Ok(mut next) = rx.recv() {
                while let Ok(newer) = rx.try_recv() {
                    next = newer;
                }
                let started = Instant::now();
                let flows = next.run();
                done(Revoked { revision: next.revision, flows, ms: started.elapsed().as_secs_f64() * 1e3 });
            }
        })?;
        Ok(Revoker { tx: Some(tx), thread: Some(thread) })
    }

    pub fn send(&self, revocation: Revocation) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(revocation);
        }
    }

    /// Waits for the walk under way (and the queued one) to end.
    pub fn finish(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
