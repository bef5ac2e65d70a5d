//! Builds the eBPF object with Debian's rustc (`/usr`, which ships a prebuilt
//! `core` for bpfel-unknown-none) and bpf-linker from `scripts/setup.sh`.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace =
        manifest.parent().ok_or_else(|| anyhow::anyhow!("agent crate has no parent directory"))?;
    let ebpf = workspace.join("ebpf");
    // The eBPF crate compiles `common` into the object too.
    println!("cargo:rerun-if-changed={}", workspace.join("common").display());

    // setup.sh installs bpf-linker under the user's cache; rustc finds the
    // linker for the bpf target on PATH.
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|c| c.join("portcullis").join("bin"));
    println!("cargo:rerun-if-env-changed=PATH");
    if let Some(bin) = cache.filter(|b| b.join("bpf-linker").exists()) {
        let mut paths = vec![bin];
        paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
        // SAFETY: build scripts are single-threaded here.
        unsafe { env::set_var("PATH", env::join_paths(paths)?) };
    }
    if which("bpf-linker").is_none() {
        anyhow::bail!("bpf-linker not found: run scripts/setup.sh first");
    }

    // aya-build relays every line the nested cargo prints as a warning; keep
    // it to real diagnostics.
    // SAFETY: as above.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };

    let ebpf_dir = ebpf.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "portcullis-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom("/usr"),
    )
}

fn which(bin: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?).map(|d| d.join(bin)).find(|p| p.is_file())
}
