//! `cargo xtask test`: format, lints, then every test of the workspace.

use std::time::Instant;

use anyhow::Result;

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
    // The conformance suite with real traffic, over both families.
    for ipv6 in [false, true] {
        let t = Instant::now();
        let family = if ipv6 { "IPv6" } else { "IPv4" };
        eprintln!(
            "xtask test: conformance over {family}: cargo xtask conformance{} tests/conformance/cases",
            if ipv6 { " --ipv6" } else { "" }
        );
        let paths = vec![root().join("tests/conformance/cases")];
        let code = conformance::run(Options { target: None, ipv6, source: "files".into(), paths })?;
        if code != 0 {
            anyhow::bail!("conformance over {family} failed (exit {code})");
        }
        eprintln!("xtask test: conformance over {family} passed in {:.1}s", t.elapsed().as_secs_f64());
    }
    eprintln!("xtask test: all passed in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
