//! Conformance cases in the format of `tests/conformance/FORMAT.md`: parsing
//! (errors name the file and field), expectation rules, the evolving cluster a
//! case describes, and the pure runner that judges the policy engine with them.

pub mod case;
pub mod expect;
pub mod pure;
pub mod report;
pub mod world;

use std::path::{Path, PathBuf};

pub use case::{Case, CaseError};

/// Every `*.yaml` file under each path (a file or a directory), sorted.
pub fn case_files(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() { walk(p, &mut out)? } else { out.push(p.clone()) }
    }
    out.sort();
    Ok(out)
}
