//! The pure runner: a case's steps fed to the policy engine, each probe's
//! pairs judged by looking the compiled map entries up the way the programs
//! do, and cross-checked with the oracle. No kernel, no root: it checks the
//! semantics; the lab runner checks the same cases with real packets.

use portcullis_agent::policy::{Engine, Simulation, oracle};

use crate::{
    case::{Case, CaseError},
    expect::Matrix,
    report::{CaseOutcome, ProbeResult},
    world::{Family, NODE, Pair, World},
};

pub fn run(case: &Case, family: Family) -> Result<CaseOutcome, CaseError> {
    let mut world = World::new(case, family, true);
    let mut engine = Engine::new(NODE);
    engine.apply(world.initial_changes());
    let mut failures = Vec::new();
    for (s, step) in case.steps.iter().enumerate() {
        let (changes, _notes) = world.step(s, step)?;
        engine.apply(changes);
        let sim = Simulation::from_engine(&engine, &[]).map_err(|m| CaseError::Invalid {
            file: case.file.clone(),
            field: format!("steps[{s}]"),
            message: format!("compiled state is not loadable: {m}"),
        })?;
        let cluster = engine.cluster();
        for (p, probe) in step.probes.iter().enumerate() {
            let (mut want, mut got, mut disagreements) = (Matrix::new(), Matrix::new(), Vec::new());
            for Pair { client: c, server: srv, port, expect } in world.pairs(s, p, probe)? {
                let (client, server) = (&world.pods[c], &world.pods[srv]);
                let (cp, sp) = (&cluster.pods[&world.pod_key(c)], &cluster.pods[&world.pod_key(srv)]);
                let (a, b) = (oracle::Party::Pod(cp, client.ip), oracle::Party::Pod(sp, server.ip));
                let protocol = probe.protocol.model();
                let compiled = sim.allows(a, b, protocol, port);
                if oracle::evaluate(cluster, a, b, protocol, port).allowed != compiled {
                    disagreements.push(format!("{} -> {}", client.id(), server.id()));
                }
                want.insert((client.id(), server.id()), expect);
                got.insert((client.id(), server.id()), compiled);
            }
            let result = ProbeResult::new(s, p, probe, &world, want, got, disagreements);
            if !result.passed() {
                failures.push(result);
            }
        }
    }
    Ok(if failures.is_empty() { CaseOutcome::Pass } else { CaseOutcome::Fail(failures) })
}
