//! `cargo xtask test`: format, lints, then every test of the workspace.

use std::time::Instant;

use anyhow::Result;

use portcullis_conformance::case::Target;

use crate::{
    cargo,
    cluster::{self, ClusterCmd},
    conformance::{self, Options},
    require_root, root,
};

pub fn run() -> Result<()> {
    require_root("cargo xtask test")?;
    let start = Instant::now();
    let steps: [(&str, &[&str]); 3] = [
        ("format", &["fmt", "--all", "--", "--check"]),
        ("lints", &["clippy", "--quiet", "--all-targets", "--", "-D", "warnings"]),
        ("tests", &["test", "--quiet"]),
    ];
    for (name, args) in steps {
        let t = Instant::now();
        eprintln!("xtask test: {name}: cargo {}", args.join(" "));
        cargo(args)?;
        eprintln!("xtask test: {name} passed in {:.1}s", t.elapsed().as_secs_f64());
    }
    // The test cluster's build (Kubernetes from source, ~7 min on a fresh
    // machine, a no-op when cached) runs beside the conformance suite, which
    // mostly waits on probes; niced, so the probes keep their timing.
    // So does the agent's release build for the cluster's image (~3.5 min
    // in a cold target).
    let install_log = crate::target_dir().join("cluster-install.log");
    let install = cluster::install_in_background(&install_log)?;
    let image_log = crate::target_dir().join("image-agent-build.log");
    let image_agent = cluster::build_image_agent_in_background(&image_log)?;
    // The conformance suite with real traffic: via pod IPs over both
    // families and via Services over IPv6, on one node with routed veths;
    // then with the pods on a bridge (IPv6 through Services: neighbour
    // discovery, bridged netfilter and ip6tables at once), and spread over
    // two nodes (IPv4 through Services: remote identities, the node link's
    // hook). IPv4 through Services on one node runs on the real cluster
    // below (`--source kube`, its kube-proxy).
    let service = Some(Target::Service);
    let modes = [
        (None, false, false, 1),
        (None, true, false, 1),
        (service, true, false, 1),
        (service, true, true, 1),
        (service, false, false, 2),
    ];
    for (target, ipv6, bridge, nodes) in modes {
        let t = Instant::now();
        let mode = format!(
            "{}{}{}{}",
            if ipv6 { "IPv6" } else { "IPv4" },
            if target.is_some() { ", via Services" } else { "" },
            if bridge { ", pods on a bridge" } else { "" },
            if nodes == 2 { ", two nodes" } else { "" }
        );
        eprintln!(
            "xtask test: conformance over {mode}: cargo xtask conformance{}{}{}{} tests/conformance/cases",
            if target.is_some() { " --target service" } else { "" },
            if ipv6 { " --ipv6" } else { "" },
            if bridge { " --network bridge" } else { "" },
            if nodes == 2 { " --two-nodes" } else { "" }
        );
        let paths = vec![root().join("tests/conformance/cases")];
        let code = conformance::run(Options { target, ipv6, bridge, nodes, source: "files".into(), paths })?;
        if code != 0 {
            anyhow::bail!("conformance over {mode} failed (exit {code})");
        }
        eprintln!("xtask test: conformance over {mode} passed in {:.1}s", t.elapsed().as_secs_f64());
    }
    // The real cluster (scripts/cluster): built once from Debian's source
    // package and cached, then up, checked and down on this machine.
    // Then the tree's own NetworkPolicy e2e suite, with the agent deployed
    // as a DaemonSet enforcing on the node.
    let t = Instant::now();
    install.wait()?;
    image_agent.wait()?;
    eprintln!(
        "xtask test: cluster install and the image's agent build (in the background) done; waited {:.1}s",
        t.elapsed().as_secs_f64()
    );
    for (name, cmd) in [("test", ClusterCmd::Test), ("e2e-with-agent", ClusterCmd::E2eWithAgent)] {
        let t = Instant::now();
        eprintln!("xtask test: cluster: cargo xtask cluster {name}");
        cluster::run(cmd)?;
        eprintln!("xtask test: cluster {name} passed in {:.1}s", t.elapsed().as_secs_f64());
    }
    eprintln!("xtask test: all passed in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
