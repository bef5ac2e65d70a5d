//! Outcomes and how the runners print them (FORMAT.md, "The runner").

use crate::{
    case::{Probe, Target},
    expect::{Matrix, side_by_side},
    world::World,
};

pub struct ProbeResult {
    pub title: String,
    pub clients: Vec<String>,
    pub servers: Vec<String>,
    pub expected: Matrix,
    pub observed: Matrix,
    /// Pairs where the compiled entries and the oracle disagreed (pure runner).
    pub disagreements: Vec<String>,
}

impl ProbeResult {
    pub fn new(
        step: usize,
        index: usize,
        probe: &Probe,
        world: &World,
        expected: Matrix,
        observed: Matrix,
        disagreements: Vec<String>,
    ) -> Self {
        let target = match probe.target {
            Target::PodIp => "pod-ip",
            Target::Service => "service",
        };
        let protocol = format!("{:?}", probe.protocol.model()).to_uppercase();
        let title = format!("step {}, probe {} ({protocol}/{}, {target})", step + 1, index + 1, probe.port);
        let clients: Vec<String> = world.pods.iter().map(|p| p.id()).collect();
        let servers: Vec<String> = world
            .pods
            .iter()
            .filter(|p| p.serves(&probe.port, probe.protocol).is_some())
            .map(|p| p.id())
            .collect();
        ProbeResult { title, clients, servers, expected, observed, disagreements }
    }

    pub fn passed(&self) -> bool {
        self.expected == self.observed && self.disagreements.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = format!("  {}\n", self.title);
        for line in side_by_side(&self.clients, &self.servers, &self.expected, &self.observed).lines() {
            out.push_str(&format!("    {line}\n"));
        }
        if !self.disagreements.is_empty() {
            out.push_str(&format!(
                "    compiled entries and oracle disagree on: {}\n",
                self.disagreements.join(", ")
            ));
        }
        out
    }
}

pub enum CaseOutcome {
    Pass,
    Fail(Vec<ProbeResult>),
    Skip(String),
}

/// `PASS name`, `FAIL name` with the failing probes' tables, `SKIP name: why`.
pub fn render(name: &str, outcome: &CaseOutcome) -> String {
    match outcome {
        CaseOutcome::Pass => format!("PASS {name}\n"),
        CaseOutcome::Skip(why) => format!("SKIP {name}: {why}\n"),
        CaseOutcome::Fail(probes) => {
            let mut out = format!("FAIL {name}\n");
            for p in probes {
                out.push_str(&p.render());
            }
            out
        }
    }
}
