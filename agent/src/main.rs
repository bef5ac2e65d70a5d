//! `agent`: the daemon (`agent run`) and its command-line tools.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use portcullis_agent::{
    compiled::CompiledState,
    datapath::{DEFAULT_PIN_DIR, Datapath, DatapathConfig},
    flows::{Flow, FlowReader, Names, monotonic_epoch},
};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "agent", version, about = "Portcullis: NetworkPolicy enforcement with eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enforce: load the datapath and keep the maps in line with the state.
    Run {
        /// Compiled endpoint state (JSON), re-read whenever it changes.
        #[arg(long)]
        state: PathBuf,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Stop enforcing on this node: remove every pinned map and link.
    Uninstall {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Run { state, pin_dir } => run(&state, pin_dir).await,
        Command::Uninstall { pin_dir } => uninstall(&pin_dir),
    }
}

async fn run(state_path: &Path, pin_dir: PathBuf) -> Result<()> {
    let mut dp =
        Datapath::load(&DatapathConfig { pin_dir, ..Default::default() }).context("loading the datapath")?;
    let mut reader = FlowReader::new(dp.take_flows().context("flow ring buffer")?)?;
    let (names_tx, names_rx) = watch::channel(Names::default());

    let printer = tokio::spawn(async move {
        let epoch = monotonic_epoch();
        loop {
            let batch = match reader.next_batch().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "reading flow events");
                    return;
                }
            };
            let names = names_rx.borrow().clone();
            for ev in batch {
                println!("{}", Flow::decode(&ev, &names, epoch));
            }
        }
    });

    let mut last_text = None;
    let mut good: Option<CompiledState> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        ticks += 1;
        let text = std::fs::read_to_string(state_path).ok();
        if text.is_some() && text != last_text {
            last_text = text.clone();
            match serde_json::from_str::<CompiledState>(text.as_deref().unwrap_or_default()) {
                Ok(state) => {
                    let report = dp.apply(&state);
                    names_tx.send_replace(Names::from_state(&state));
                    for e in &report.errors {
                        tracing::error!("{e}");
                    }
                    tracing::info!(
                        revision = state.revision,
                        endpoints = state.endpoints.len(),
                        policy_entries = report.policy_entries,
                        ipcache_entries = report.ipcache_entries,
                        "enforced"
                    );
                    // A line the lab and tests wait for: the revision is in the maps.
                    println!("enforced revision {}", state.revision);
                    good = Some(state);
                }
                // Keep enforcing the last good state.
                Err(e) => {
                    tracing::error!(file = %state_path.display(), error = %e, "invalid state, keeping the last good one")
                }
            }
        } else if ticks.is_multiple_of(10)
            && let Some(state) = &good
        {
            // Once a second, converge again: interfaces that appeared or were
            // recreated get their programs, failed endpoints are retried.
            let report = dp.apply(state);
            if report.endpoints_written > 0 || report.endpoints_removed > 0 {
                tracing::info!(
                    written = report.endpoints_written,
                    removed = report.endpoints_removed,
                    "reconciled"
                );
                println!("enforced revision {} (reconciled)", state.revision);
            }
        }
    }
    printer.abort();
    // Pins keep enforcing after we exit; `agent uninstall` removes them.
    Ok(())
}

fn uninstall(pin_dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            eprintln!("removed {}", pin_dir.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin_dir.display())),
    }
}
