//! `cargo xtask test`: format, lints, then every test of the workspace.

use std::time::Instant;

use anyhow::Result;

use crate::{cargo, require_root};

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
    eprintln!("xtask test: all passed in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
