//! OCI image archives without a registry or a base image: a root filesystem,
//! described entry by entry, tarred into one layer and wrapped in the OCI
//! image layout (`oci-layout`, `index.json`, `blobs/sha256/…`), which
//! `ctr images import` reads. Deterministic: the same entries give the same
//! digests, so a re-import is a no-op.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sha2::{Digest, Sha256};

/// One path in the image's root filesystem.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir,
    /// A file copied from the host, with its mode.
    File {
        source: PathBuf,
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// An image: its full name (registry host included, or containerd prefixes
/// `docker.io/`), process defaults and root filesystem.
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// Absolute paths in the image; parents are added as directories.
    pub files: BTreeMap<String, Entry>,
}

impl Image {
    pub fn new(name: &str) -> Self {
        Image {
            name: name.into(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            files: BTreeMap::new(),
        }
    }

    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.files.insert(path.into(), Entry::Dir);
        self
    }

    pub fn file(&mut self, path: &str, source: impl Into<PathBuf>, mode: u32) -> &mut Self {
        self.files.insert(path.into(), Entry::File { source: source.into(), mode });
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.files.insert(path.into(), Entry::Symlink { target: target.into() });
        self
    }

    /// The tag part of the name (`3.2` of `k8s.gcr.io/pause:3.2`).
    fn tag(&self) -> &str {
        let last = self.name.rsplit('/').next().unwrap_or(&self.name);
        last.split_once(':').map_or("latest", |(_, t)| t)
    }

    /// The layer: every entry and its parents, in path order, owned by root,
    /// timestamps zeroed.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut paths: BTreeMap<String, Entry> = BTreeMap::new();
        for (path, entry) in &self.files {
            if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
                bail!("image {}: path {path:?} must be absolute and plain", self.name);
            }
            let mut parent = Path::new(path).parent();
            while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
                paths.entry(p.to_string_lossy().into_owned()).or_insert(Entry::Dir);
                parent = p.parent();
            }
            paths.insert(path.clone(), entry.clone());
        }
        let mut tar = tar::Builder::new(Vec::new());
        for (path, entry) in &paths {
            let name = path.trim_start_matches('/');
            let mut header = tar::Header::new_ustar();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            match entry {
                Entry::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    tar.append_data(&mut header, format!("{name}/"), std::io::empty())?;
                }
                Entry::File { source, mode } => {
                    let data = fs::read(source)
                        .with_context(|| format!("image {}: reading {}", self.name, source.display()))?;
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(*mode);
                    header.set_size(data.len() as u64);
                    tar.append_data(&mut header, name, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, name, target)?;
                }
            }
        }
        Ok(tar.into_inner()?)
    }

    /// Writes the image as an OCI layout archive at `out`; returns its size.
    pub fn write_archive(&self, out: &Path) -> Result<u64> {
        let layer = self.layer()?;
        let layer_digest = digest(&layer);
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "Env": self.env,
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
            "history": [{ "created_by": "portcullis xtask (oci.rs)" }],
        }))?;
        let config_digest = digest(&config);
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        }))?;
        let manifest_digest = digest(&manifest);
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": {
                    // containerd names the imported image after this one.
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": self.tag(),
                },
            }],
        }))?;

        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| -> Result<()> {
            let mut header = tar::Header::new_ustar();
            header.set_mtime(0);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, data)?;
            Ok(())
        };
        add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        add("index.json", &index)?;
        for blob in [&layer, &config, &manifest] {
            let hex = digest(blob);
            add(&format!("blobs/sha256/{}", hex.trim_start_matches("sha256:")), blob)?;
        }
        let bytes = tar.into_inner()?;
        let tmp = out.with_extension("tmp");
        fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes))
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
        Ok(bytes.len() as u64)
    }
}

fn digest(data: &[u8]) -> String {
    let hash = Sha256::digest(data);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn archive_entries(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut archive = tar::Archive::new(bytes);
        for e in archive.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(name, data);
        }
        out
    }

    #[test]
    fn archive_is_a_consistent_oci_layout() {
        let dir = std::env::temp_dir().join(format!("oci-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("tool");
        fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
        let mut image = Image::new("registry.example.test/tools/tool:1.2");
        image.file("/usr/bin/tool", &bin, 0o755).symlink("/bin/t", "/usr/bin/tool");
        image.entrypoint = vec!["/usr/bin/tool".into()];
        let out = dir.join("image.tar");
        image.write_archive(&out).unwrap();
        let first = fs::read(&out).unwrap();
        image.write_archive(&out).unwrap();
        assert_eq!(first, fs::read(&out).unwrap(), "archives must be reproducible");

        let files = archive_entries(&first);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"]["io.containerd.image.name"], "registry.example.test/tools/tool:1.2");
        assert_eq!(m["annotations"]["org.opencontainers.image.ref.name"], "1.2");
        // Every digest names a blob whose content hashes to it, at its size.
        let blob = |d: &serde_json::Value| {
            let d = d.as_str().unwrap();
            let data = &files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))];
            assert_eq!(digest(data), d);
            data.clone()
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&m["digest"])).unwrap();
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(manifest["layers"][0]["size"], layer.len());
        assert_eq!(config["rootfs"]["diff_ids"][0], manifest["layers"][0]["digest"]);
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/tool");

        // The layer holds the parents, the file with its mode, the link.
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut seen = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            seen.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap(),
                h.link_name().unwrap().map(|l| l.to_string_lossy().into_owned()),
            ));
        }
        assert_eq!(
            seen,
            [
                ("bin/".to_string(), 0o755, None),
                ("bin/t".to_string(), 0o777, Some("/usr/bin/tool".to_string())),
                ("usr/".to_string(), 0o755, None),
                ("usr/bin/".to_string(), 0o755, None),
                ("usr/bin/tool".to_string(), 0o755, None),
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_or_escaping_paths_are_refused() {
        let mut image = Image::new("registry.example.test/x:1");
        image.dir("etc");
        assert!(image.layer().is_err());
        let mut image = Image::new("registry.example.test/x:1");
        image.dir("/a/../../etc");
        assert!(image.layer().is_err());
    }
}
