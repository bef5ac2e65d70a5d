//! `cargo xtask`: the project's own commands.
//!
//! - `cargo xtask lab`: pods as network namespaces on this machine, the agent
//!   enforcing policy on them, the reachability matrix and dropped flows.
//! - `cargo xtask test`: every test (format, lints, unit, datapath with real
//!   packets). Needs root: tests load BPF programs and make network namespaces.
//! - `cargo xtask bench`: the benchmarks, as tables with ratios to baselines
//!   measured in the same run.

mod lab;
mod test;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the lab: pods as network namespaces, the agent enforcing policy.
    Lab,
    /// Run every test.
    Test,
    /// Run the benchmarks (policy engine at cluster scale; datapath verdict
    /// cost, which needs root) and print their tables.
    Bench,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Lab => lab::run(),
        Cmd::Test => test::run(),
        Cmd::Bench => {
            cargo(&["bench", "--quiet", "--package", "portcullis-agent", "--bench", "policy_engine"])?;
            cargo(&["bench", "--quiet", "--package", "portcullis-agent", "--bench", "datapath"])
        }
    }
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF programs, network namespaces): run it with sudo");
    }
    Ok(())
}

/// Runs `cargo ARGS` in the workspace, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the agent binary and returns its path.
pub fn build_agent() -> Result<PathBuf> {
    cargo(&["build", "--quiet", "--package", "portcullis-agent", "--bin", "agent"])?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    Ok(target.join("debug").join("agent"))
}
