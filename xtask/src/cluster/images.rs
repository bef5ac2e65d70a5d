//! The images the test cluster runs, written as OCI archives for
//! `ctr images import`: nothing is pulled, every file comes from this machine.
//! Names are the ones kubelet 1.20 and the 1.20 e2e suite ask for.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{Paths, oci::Image};

pub const PAUSE: &str = "k8s.gcr.io/pause:3.2";
pub const BUSYBOX: &str = "docker.io/library/busybox:1.29";
pub const AGNHOST: &str = "k8s.gcr.io/e2e-test-images/agnhost:2.21";

/// Portcullis' own image, tagged with the workspace version.
pub fn agent_image() -> String {
    format!("registry.portcullis.test/portcullis/agent:{}", env!("CARGO_PKG_VERSION"))
}

/// Debian's static busybox and a link per applet, under `/bin`.
fn add_busybox(image: &mut Image) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let out =
        Command::new(busybox).arg("--list").output().context("running busybox --list (busybox-static)")?;
    if !out.status.success() {
        bail!("busybox --list failed: is busybox-static installed? (cargo xtask cluster install)");
    }
    image.file("/bin/busybox", busybox, 0o755);
    for applet in String::from_utf8_lossy(&out.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        image.symlink(&format!("/bin/{applet}"), "/bin/busybox");
    }
    image.dir("/tmp").dir("/etc").dir("/proc").dir("/sys").dir("/dev");
    Ok(())
}

/// A dynamically linked binary and the libraries `ldd` says it loads, at
/// their host paths.
fn add_linked_binary(image: &mut Image, at: &str, binary: &Path) -> Result<()> {
    image.file(at, binary, 0o755);
    let out = Command::new("ldd").arg(binary).output().context("running ldd")?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = line.split("=>").last().unwrap_or("").split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            let real = std::fs::canonicalize(path).with_context(|| format!("resolving {path}"))?;
            image.file(path, real, 0o755);
        }
    }
    Ok(())
}

/// Writes every image archive into `dir`; returns their paths.
pub fn write_all(paths: &Paths, agent: Option<&Path>, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut images = Vec::new();

    let mut pause = Image::new(PAUSE);
    pause.file("/pause", paths.k8s_bin.join("pause"), 0o755);
    pause.entrypoint = vec!["/pause".into()];
    images.push(("pause", pause));

    let mut busybox = Image::new(BUSYBOX);
    add_busybox(&mut busybox)?;
    busybox.cmd = vec!["sh".into()];
    images.push(("busybox", busybox));

    // agnhost as upstream ships it: /agnhost as entrypoint, a shell beside it
    // (the e2e clients run `/bin/sh -c "… /agnhost connect …"`).
    let mut agnhost = Image::new(AGNHOST);
    add_busybox(&mut agnhost)?;
    agnhost.file("/agnhost", paths.k8s_bin.join("agnhost"), 0o755).symlink("/agnhost-2", "agnhost");
    agnhost.dir("/uploads");
    agnhost.entrypoint = vec!["/agnhost".into()];
    agnhost.cmd = vec!["pause".into()];
    images.push(("agnhost", agnhost));

    if let Some(agent) = agent {
        let mut image = Image::new(&agent_image());
        add_linked_binary(&mut image, "/usr/bin/agent", agent)?;
        image.dir("/tmp").dir("/proc").dir("/sys").dir("/dev").dir("/run");
        image.entrypoint = vec!["/usr/bin/agent".into()];
        images.push(("portcullis-agent", image));
    }

    let mut written = Vec::new();
    for (file, image) in images {
        let out = dir.join(format!("{file}.tar"));
        image.write_archive(&out).with_context(|| format!("writing image {}", image.name))?;
        written.push(out);
    }
    Ok(written)
}
