//! The Kubernetes tree's own NetworkPolicy e2e suite (built by `install`
//! from the same 1.20 source) against the test cluster.

use std::{fmt, fs, process::Command};

use anyhow::{Context as _, Result, bail};

use super::Paths;
use crate::target_dir;

/// What ginkgo reported.
#[derive(Debug, Default, PartialEq)]
pub struct Report {
    pub ran: u32,
    pub passed: u32,
    pub failed: u32,
    pub failures: Vec<String>,
    pub log: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "e2e: ran {} specs: {} passed, {} failed (log: {})",
            self.ran, self.passed, self.failed, self.log
        )?;
        for name in &self.failures {
            writeln!(f, "  FAIL {name}")?;
        }
        Ok(())
    }
}

/// Reads ginkgo's closing summary: "Ran 29 of 5120 Specs …", the
/// "N Passed | M Failed | …" line and the "[Fail] …" lines.
pub fn parse(output: &str) -> Option<Report> {
    let mut report = Report::default();
    let mut saw_ran = false;
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Ran ") {
            report.ran = rest.split_whitespace().next()?.parse().ok()?;
            saw_ran = true;
        } else if line.contains(" Passed | ") {
            for part in line.trim_start_matches(|c: char| !c.is_ascii_digit()).split('|') {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else { continue };
                let n: u32 = n.parse().ok()?;
                match what {
                    "Passed" => report.passed = n,
                    "Failed" => report.failed = n,
                    _ => {}
                }
            }
        } else if let Some(name) = line.strip_prefix("[Fail] ") {
            report.failures.push(name.split(" [It] ").collect::<Vec<_>>().join(" "));
        }
    }
    saw_ran.then_some(report)
}

pub fn run(paths: &Paths, focus: &str) -> Result<Report> {
    let e2e = paths.k8s_bin.join("e2e.test");
    if !e2e.exists() {
        bail!("{} missing: run `cargo xtask cluster install`", e2e.display());
    }
    if !paths.kubeconfig().exists() {
        bail!("no cluster at {}: run `cargo xtask cluster up`", paths.work.display());
    }
    let log = target_dir().join("cluster-e2e.log");
    eprintln!("e2e: {focus} specs (SCTP skipped: no SCTP in this kernel); output in {}", log.display());
    if !paths.k8s_bin.join("ginkgo").exists() {
        bail!("{} missing: run `cargo xtask cluster install`", paths.k8s_bin.join("ginkgo").display());
    }
    fs::create_dir_all(target_dir()).ok();
    // Straight to the log, so a long run can be followed with `tail -f`.
    let file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    // The specs wait on clients more than they compute: ginkgo runs them
    // in parallel processes, each in its own namespaces.
    let nodes: u32 = std::env::var("PORTCULLIS_E2E_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(4);
    let mut cmd = Command::new(paths.k8s_bin.join("ginkgo"));
    cmd.args([format!("--nodes={nodes}"), "--noColor".into()]).arg(&e2e).arg("--");
    let status = cmd
        .arg(format!("--kubeconfig={}", paths.kubeconfig().display()))
        .arg(format!("--kubectl-path={}", paths.k8s_bin.join("kubectl").display()))
        .args(["--provider=skeleton", "--num-nodes=1", "--minStartupPods=0", "--disable-log-dump"])
        .args(["--ginkgo.noColor", "--ginkgo.skip=SCTP|Feature:SCTPConnectivity"])
        .arg(format!("--ginkgo.focus={focus}"))
        .arg(format!("--report-dir={}", target_dir().join("cluster-e2e").display()))
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("running ginkgo with {}", e2e.display()))?;
    let text = fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let mut report = parse(&text).with_context(|| {
        format!("the e2e suite ended ({status}) without a summary; see {}", log.display())
    })?;
    report.log = log.display().to_string();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ginkgo_summary() {
        let out = "\
Summarizing 2 Failures:

[Fail] [sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client [It] should deny ingress \n\
/src/test/e2e/network/network_policy.go:1941

[Fail] [sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client [It] should enforce egress \n\
/src/test/e2e/network/network_policy.go:1941

Ran 29 of 5120 Specs in 1234.5 seconds
FAIL! -- 27 Passed | 2 Failed | 0 Pending | 5091 Skipped
";
        let r = parse(out).unwrap();
        assert_eq!((r.ran, r.passed, r.failed), (29, 27, 2));
        assert_eq!(
            r.failures[0],
            "[sig-network] NetworkPolicy [LinuxOnly] NetworkPolicy between server and client should deny ingress"
        );
        let ok = parse(
            "Ran 1 of 5120 Specs in 3.2 seconds\nSUCCESS! -- 1 Passed | 0 Failed | 0 Pending | 5119 Skipped\n",
        );
        assert_eq!(ok.map(|r| (r.ran, r.passed, r.failed)), Some((1, 1, 0)));
        assert_eq!(parse("panic: something\n"), None);
    }
}
