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

/// The agent's image: the static agent binary and the plugin's beside it
/// (which the agent installs on the node), and nothing else (no shell, no
/// libc: `kubectl exec … -- agent …` is all an operator needs).
pub fn agent(binary: &Path, name: &str) -> Image {
    let mut image = Image::new(name);
    image.file("/usr/bin/agent", binary, 0o755);
    image.file(&format!("/usr/bin/{}", crate::PLUGIN_BIN), binary.with_file_name(crate::PLUGIN_BIN), 0o755);
    image.dir("/tmp").dir("/proc").dir("/sys").dir("/dev").dir("/run").dir("/var/run");
    image.entrypoint = vec!["/usr/bin/agent".into()];
    image
}

/// Writes every image archive into `dir`; returns their paths.
pub fn write_all(paths: &Paths, agent_binary: Option<&Path>, dir: &Path) -> Result<Vec<PathBuf>> {
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

    if let Some(binary) = agent_binary {
        images.push(("portcullis-agent", agent(binary, &agent_image())));
    }

    let mut written = Vec::new();
    for (file, image) in images {
        let out = dir.join(format!("{file}.tar"));
        image.write_archive(&out).with_context(|| format!("writing image {}", image.name))?;
        written.push(out);
    }
    Ok(written)
}
