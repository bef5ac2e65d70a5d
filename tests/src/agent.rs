//! The agent binary as a child process in a node's network namespace, its
//! stdout read line by line (flow lines and `enforced revision N` reports).

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc::{Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::Netns;

pub struct AgentProcess {
    child: Child,
    /// The agent's own API socket directory (agents here run side by side).
    api_dir: PathBuf,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl AgentProcess {
    pub fn start<I, S>(node: &Netns, binary: &Path, args: I) -> Result<AgentProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let api_dir =
            std::env::temp_dir().join(format!("portcullis-api-{}-{}-{n}", node.name(), std::process::id()));
        let mut child = node
            .command(&binary.to_string_lossy())
            .args(args)
            .env("PORTCULLIS_API_SOCKET", api_dir.join("agent.sock"))
            // Flow lines and reports come on stdout; keep its logs to warnings.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let out = child.stdout.take().context("agent stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(AgentProcess { child, api_dir, lines, seen: Vec::new() })
    }

    /// The agent's local API socket.
    pub fn socket(&self) -> PathBuf {
        self.api_dir.join("agent.sock")
    }

    /// Waits for a line containing every one of `parts`, and returns it.
    pub fn wait_for(&mut self, parts: &[&str], timeout: Duration) -> Result<String> {
        if let Some(l) = self.seen.iter().find(|l| parts.iter().all(|p| l.contains(p))) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if parts.iter().all(|p| line.contains(p)) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no agent line with {parts:?} within {timeout:?}; saw:\n{}", self.seen.join("\n"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("agent exited; no line with {parts:?}; saw:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// Lines that arrived since the last call (waiting `settle` for stragglers).
    pub fn take_new(&mut self, settle: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(settle) {
            self.seen.push(line.clone());
            out.push(line);
        }
        out
    }

    /// SIGINT, as Ctrl-C would; waits for the exit (and kills the agent if
    /// it has not exited within five seconds).
    pub fn stop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProcess {
    /// SIGKILL: the agent dies without a chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.api_dir);
    }
}

/// A state file the agent watches, in a private directory removed on drop.
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    pub fn new(tag: &str) -> Result<StateFile> {
        let dir = std::env::temp_dir().join(format!("portcullis-{tag}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(StateFile { dir })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Replaces the file atomically, so the agent never reads half of it.
    pub fn write(&self, contents: &[u8]) -> Result<()> {
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, self.path())?;
        Ok(())
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
