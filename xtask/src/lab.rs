//! `cargo xtask lab`: the main job on one machine. A node and its pods as
//! network namespaces, the agent enforcing NetworkPolicy objects on them,
//! and after every step the reachability tables (expected | observed) and
//! the flows the agent dropped.
//!
//! By default it replays the project's seed scenario (tests/conformance/cases
//! /examples/seed-*.yaml): frontend and backend with a default deny, then
//! frontend -> backend on port 80 while backend -> frontend stays blocked; a
//! not-frontend pod kept out of backend; the cassandra namespace reached by a
//! namespaceSelector, closed by its own default deny and reopened by a
//! namespace label. `--case FILE` runs any conformance case the same way.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use portcullis_conformance::{Case, report::CaseOutcome, world::Family};

use crate::{
    build_agent,
    conformance::{self, Show, run_case},
    handle_interrupts, interrupted, require_root, root,
};

const SEEDS: [&str; 3] =
    ["seed-frontend-backend.yaml", "seed-backend-allow-frontend.yaml", "seed-cassandra-namespace.yaml"];

pub fn run(cases: Vec<PathBuf>, ipv6: bool, bridge: bool, nodes: usize) -> Result<()> {
    require_root("cargo xtask lab")?;
    handle_interrupts()?;
    let cases = if cases.is_empty() {
        let dir = root().join("tests/conformance/cases/examples");
        SEEDS.iter().map(|s| dir.join(s)).collect()
    } else {
        cases
    };
    eprintln!("lab: building the agent");
    let agent = build_agent()?;
    let family = if ipv6 { Family::V6 } else { Family::V4 };
    let mut failed = Vec::new();
    for file in &cases {
        if interrupted() {
            bail!("interrupted");
        }
        let case = Case::load(file).with_context(|| format!("loading {}", file.display()))?;
        println!("\n#### {}", case.name);
        if let Some(d) = &case.description {
            println!("{}", d.trim());
        }
        let shape = conformance::Shape { network: conformance::network(bridge), nodes };
        match run_case(&case, family, None, shape, &agent, Show::Steps)? {
            CaseOutcome::Pass => println!("\nlab: {}: every table as expected", case.name),
            CaseOutcome::Skip(why) => println!("\nlab: {}: skipped: {why}", case.name),
            CaseOutcome::Fail(_) => {
                println!("\nlab: {}: some tables differ from the expected (marked <-)", case.name);
                failed.push(case.name);
            }
        }
    }
    println!("\nlab: done; the pods, the node and the agent's pins are gone");
    if !failed.is_empty() {
        bail!("not as expected: {}", failed.join(", "));
    }
    Ok(())
}
