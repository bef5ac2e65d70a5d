//! `cargo xtask test`: format, lints, then every test of the workspace.

use std::time::Instant;

use anyhow::Result;

use portcullis_conformance::case::Target;

use crate::{
    cargo,
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
    // The conformance suite with real traffic: via pod IPs and via
    // Services, over both families.
    for (target, target_arg) in [(None, ""), (Some(Target::Service), " --target service")] {
        for ipv6 in [false, true] {
            let t = Instant::now();
            let mode = format!(
                "{}{}",
                if ipv6 { "IPv6" } else { "IPv4" },
                if target.is_some() { ", via Services" } else { "" }
            );
            eprintln!(
                "xtask test: conformance over {mode}: cargo xtask conformance{target_arg}{} tests/conformance/cases",
                if ipv6 { " --ipv6" } else { "" }
            );
            let paths = vec![root().join("tests/conformance/cases")];
            let code =
                conformance::run(Options { target, ipv6, bridge: false, source: "files".into(), paths })?;
            if code != 0 {
                anyhow::bail!("conformance over {mode} failed (exit {code})");
            }
            eprintln!("xtask test: conformance over {mode} passed in {:.1}s", t.elapsed().as_secs_f64());
        }
    }
    eprintln!("xtask test: all passed in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
