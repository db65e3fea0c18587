//! Small OCI images, written as image-layout tarballs that `ctr image import` accepts.
//!
//! One uncompressed layer (`application/vnd.oci.image.layer.v1.tar`; compressing it would only
//! cost time on both ends of a local import) — or several, bottom first
//! ([`write_layered_image`], for images of many layers) — an image config, a manifest and an `index.json`
//! whose manifest descriptor carries the image name twice: `org.opencontainers.image.ref.name`
//! (the OCI annotation) and `io.containerd.image.name` (which containerd's importer prefers).
//! JSON is written with sorted keys and every tar entry with a fixed mtime, so the same tree
//! gives the same bytes and therefore the same image digest.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder,
    Sha256Digest, ANNOTATION_REF_NAME,
};
use sha2::{Digest as _, Sha256};

use crate::tree::{Content, Kind, Tree, TreeError};
use crate::FIXED_MTIME;

/// containerd's annotation for the image name in an imported index.
pub const ANNOTATION_CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";

/// The default `PATH` of our images (the one runc and Docker images use).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Errors while writing an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("building the OCI {what}")]
    Spec {
        what: &'static str,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("serialising the OCI {0}")]
    Json(&'static str, #[source] serde_json::Error),
    #[error("writing the image archive")]
    Write(#[from] io::Error),
    #[error("an image needs at least one layer")]
    NoLayers,
    #[error("{path}: cannot run `{path} --list` to find busybox applets — install busybox-static (cargo xtask setup)")]
    Busybox {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn spec_err(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    move |source| ImageError::Spec { what, source }
}

/// What the image runs and how it is named.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Full reference, e.g. `husk.local/busybox:latest`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

impl ImageSpec {
    pub fn new(name: &str, cmd: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            entrypoint: Vec::new(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec![DEFAULT_PATH.to_string()],
            working_dir: "/".to_string(),
        }
    }
}

/// The tree of a busybox image: the static busybox, one symlink per applet in `/bin`, and the
/// few files containers expect (`/etc/passwd`, `/etc/group`, mount points).
pub fn busybox_tree(busybox: &Path) -> Result<Tree, ImageError> {
    let bb_err = |source| ImageError::Busybox {
        path: busybox.display().to_string(),
        source,
    };
    let out = Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(bb_err)?;
    if !out.status.success() {
        return Err(bb_err(io::Error::other("exited with an error")));
    }
    let mut t = base_tree(busybox)?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            t.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    t.dir("var/www", 0o755)?;
    Ok(t)
}

/// The tree of the pause image: busybox with only `sleep`, run as `sleep infinity`.
pub fn pause_tree(busybox: &Path) -> Result<Tree, ImageError> {
    let mut t = base_tree(busybox)?;
    t.symlink("bin/sleep", "busybox")?;
    Ok(t)
}

fn base_tree(busybox: &Path) -> Result<Tree, ImageError> {
    let mut t = Tree::new();
    t.file(
        "bin/busybox",
        Content::HostFile(busybox.to_path_buf()),
        0o755,
    )?;
    for d in ["dev", "proc", "sys", "etc", "root", "run", "var"] {
        t.dir(d, 0o755)?;
    }
    t.dir("root", 0o700)?;
    t.dir("tmp", 0o1777)?;
    t.file(
        "etc/passwd",
        Content::Bytes(
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
        ),
        0o644,
    )?;
    t.file(
        "etc/group",
        Content::Bytes(b"root:x:0:\nnogroup:x:65534:\n".to_vec()),
        0o644,
    )?;
    Ok(t)
}

/// Serialises `tree` as an uncompressed layer tar.
pub fn layer_tar(tree: &Tree) -> Result<Vec<u8>, ImageError> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in tree.iter() {
        let mut h = tar::Header::new_gnu();
        h.set_mode(node.perm);
        h.set_uid(u64::from(node.uid));
        h.set_gid(u64::from(node.gid));
        h.set_mtime(FIXED_MTIME);
        h.set_size(0);
        match &node.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                b.append_data(&mut h, path, io::empty())?;
            }
            Kind::File(c) => {
                let data = c.read()?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, data.as_slice())?;
            }
            Kind::Symlink(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, target)?;
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                let ty = if matches!(node.kind, Kind::CharDev { .. }) {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                h.set_entry_type(ty);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                b.append_data(&mut h, path, io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// A blob of the image layout: its bytes and descriptor.
struct Blob {
    bytes: Vec<u8>,
    digest: Sha256Digest,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let hex = hex::encode(Sha256::digest(&bytes));
        let digest = hex.parse().expect("sha256 hex is always a valid digest");
        Self { bytes, digest }
    }

    fn descriptor(&self, media_type: MediaType) -> Result<Descriptor, ImageError> {
        DescriptorBuilder::default()
            .media_type(media_type)
            .digest(self.digest.clone())
            .size(self.bytes.len() as u64)
            .build()
            .map_err(spec_err("descriptor"))
    }

    fn path(&self) -> String {
        format!("blobs/sha256/{}", self.digest)
    }
}

/// JSON with sorted object keys (oci-spec keeps annotations in a HashMap).
fn sorted_json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, ImageError> {
    let value = serde_json::to_value(v).map_err(|e| ImageError::Json(what, e))?;
    serde_json::to_vec(&value).map_err(|e| ImageError::Json(what, e))
}

/// The image written by [`write_image`]: its manifest digest, for callers that check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenImage {
    pub name: String,
    pub manifest_digest: String,
    /// The top (last) layer's digest: the only one of a one-layer image.
    pub layer_digest: String,
    /// Every layer's digest, bottom first.
    pub layer_digests: Vec<String>,
}

/// Writes `tree` as an OCI image-layout tarball named `spec.name`.
pub fn write_image<W: Write>(
    tree: &Tree,
    spec: &ImageSpec,
    out: W,
) -> Result<(W, WrittenImage), ImageError> {
    write_layered_image(&[tree], spec, out)
}

/// Writes an image whose layers are `layers`, bottom first (each a tree of what that layer
/// adds or replaces), as an OCI image-layout tarball named `spec.name`.
pub fn write_layered_image<W: Write>(
    layers: &[&Tree],
    spec: &ImageSpec,
    out: W,
) -> Result<(W, WrittenImage), ImageError> {
    if layers.is_empty() {
        return Err(ImageError::NoLayers);
    }
    let layers: Vec<Blob> = layers
        .iter()
        .map(|t| Ok(Blob::new(layer_tar(t)?)))
        .collect::<Result<_, ImageError>>()?;
    let mut cfg = ConfigBuilder::default()
        .env(spec.env.clone())
        .working_dir(spec.working_dir.clone());
    if !spec.entrypoint.is_empty() {
        cfg = cfg.entrypoint(spec.entrypoint.clone());
    }
    if !spec.cmd.is_empty() {
        cfg = cfg.cmd(spec.cmd.clone());
    }
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(cfg.build().map_err(spec_err("image config"))?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(
                    layers
                        .iter()
                        .map(|l| format!("sha256:{}", l.digest))
                        .collect::<Vec<_>>(),
                )
                .build()
                .map_err(spec_err("rootfs"))?,
        )
        .build()
        .map_err(spec_err("image configuration"))?;
    let config = Blob::new(sorted_json("image configuration", &config)?);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor(MediaType::ImageConfig)?)
        .layers(
            layers
                .iter()
                .map(|l| l.descriptor(MediaType::ImageLayer))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .build()
        .map_err(spec_err("manifest"))?;
    let manifest = Blob::new(sorted_json("manifest", &manifest)?);
    let mut mdesc = manifest.descriptor(MediaType::ImageManifest)?;
    mdesc.set_annotations(Some(HashMap::from([
        (ANNOTATION_REF_NAME.to_string(), spec.name.clone()),
        (
            ANNOTATION_CONTAINERD_IMAGE_NAME.to_string(),
            spec.name.clone(),
        ),
    ])));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![mdesc])
        .build()
        .map_err(spec_err("index"))?;
    let index = sorted_json("index", &index)?;
    let layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec_err("oci-layout"))?;
    let layout = sorted_json("oci-layout", &layout)?;

    let mut files: Vec<(String, &[u8])> = vec![
        ("oci-layout".into(), &layout),
        ("index.json".into(), &index),
        (config.path(), &config.bytes),
        (manifest.path(), &manifest.bytes),
    ];
    files.extend(layers.iter().map(|l| (l.path(), l.bytes.as_slice())));
    files.sort_by(|a, b| a.0.cmp(&b.0));
    // Two identical layers are one blob.
    files.dedup_by(|a, b| a.0 == b.0);
    let mut b = tar::Builder::new(out);
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(FIXED_MTIME);
        h.set_size(0);
        b.append_data(&mut h, dir, io::empty())?;
    }
    for (path, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(FIXED_MTIME);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, path, bytes)?;
    }
    let out = b.into_inner()?;
    Ok((
        out,
        WrittenImage {
            name: spec.name.clone(),
            manifest_digest: format!("sha256:{}", manifest.digest),
            layer_digest: format!(
                "sha256:{}",
                layers.last().expect("checked: not empty").digest
            ),
            layer_digests: layers
                .iter()
                .map(|l| format!("sha256:{}", l.digest))
                .collect(),
        },
    ))
}

/// Writes the image to `dest` atomically (temporary file, then rename).
pub fn build(tree: &Tree, spec: &ImageSpec, dest: &Path) -> Result<WrittenImage, ImageError> {
    build_layered(&[tree], spec, dest)
}

/// Writes an image of `layers` (bottom first) to `dest` atomically.
pub fn build_layered(
    layers: &[&Tree],
    spec: &ImageSpec,
    dest: &Path,
) -> Result<WrittenImage, ImageError> {
    let tmp = dest.with_extension("tar.tmp");
    let file = io::BufWriter::new(std::fs::File::create(&tmp)?);
    let (mut file, written) = write_layered_image(layers, spec, file)?;
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, dest)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn small_tree() -> Tree {
        let mut t = Tree::new();
        t.file(
            "bin/hello",
            Content::Bytes(b"#!/bin/sh\necho hi\n".to_vec()),
            0o755,
        )
        .unwrap();
        t.symlink("bin/hi", "hello").unwrap();
        t.dir("tmp", 0o1777).unwrap();
        t
    }

    fn entries(tar_bytes: &[u8]) -> HashMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (p, v)
            })
            .collect()
    }

    #[test]
    fn layout_is_complete_and_digests_match() {
        let spec = ImageSpec::new("husk.local/test:1", &["/bin/hello"]);
        let (bytes, written) = write_image(&small_tree(), &spec, Vec::new()).unwrap();
        let files = entries(&bytes);
        assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let m = &index["manifests"][0];
        assert_eq!(m["annotations"][ANNOTATION_REF_NAME], "husk.local/test:1");
        assert_eq!(
            m["annotations"][ANNOTATION_CONTAINERD_IMAGE_NAME],
            "husk.local/test:1"
        );
        assert_eq!(m["digest"], written.manifest_digest.as_str());
        // Every blob's name is the sha256 of its bytes.
        for (path, data) in files
            .iter()
            .filter(|(p, _)| p.starts_with("blobs/sha256/") && !p.ends_with('/'))
        {
            assert_eq!(
                path.rsplit('/').next().unwrap(),
                hex::encode(Sha256::digest(data)),
                "{path}"
            );
        }
        let manifest: serde_json::Value = serde_json::from_slice(
            &files[&format!(
                "blobs/sha256/{}",
                written.manifest_digest.trim_start_matches("sha256:")
            )],
        )
        .unwrap();
        assert_eq!(
            manifest["layers"][0]["digest"],
            written.layer_digest.as_str()
        );
        assert_eq!(
            manifest["layers"][0]["mediaType"],
            "application/vnd.oci.image.layer.v1.tar"
        );
        let config: serde_json::Value = serde_json::from_slice(
            &files[&format!(
                "blobs/sha256/{}",
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:")
            )],
        )
        .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            written.layer_digest.as_str()
        );
        assert_eq!(config["config"]["Cmd"][0], "/bin/hello");
        assert_eq!(config["architecture"], "amd64");
    }

    #[test]
    fn layer_keeps_modes_links_and_is_reproducible() {
        let a = layer_tar(&small_tree()).unwrap();
        assert_eq!(a, layer_tar(&small_tree()).unwrap());
        let mut ar = tar::Archive::new(a.as_slice());
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            seen.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                e.link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned()),
            ));
        }
        assert_eq!(
            seen,
            [
                ("bin".into(), 0o755, 0, None),
                ("bin/hello".into(), 0o755, 0, None),
                ("bin/hi".into(), 0o777, 0, Some("hello".into())),
                ("tmp".into(), 0o1777, 0, None),
            ]
        );
    }

    #[test]
    fn whole_image_is_reproducible() {
        let spec = ImageSpec::new("husk.local/test:1", &["sh"]);
        let (a, wa) = write_image(&small_tree(), &spec, Vec::new()).unwrap();
        let (b, wb) = write_image(&small_tree(), &spec, Vec::new()).unwrap();
        assert_eq!(a, b);
        assert_eq!(wa, wb);
    }

    #[test]
    fn layers_are_listed_bottom_first_in_manifest_and_config() {
        let mut layers = vec![small_tree()];
        for i in 0..3 {
            let mut t = Tree::new();
            t.file(&format!("layer/{i}"), Content::Bytes(vec![b'0' + i]), 0o644)
                .unwrap();
            layers.push(t);
        }
        let refs: Vec<&Tree> = layers.iter().collect();
        let spec = ImageSpec::new("husk.local/layers:1", &["sh"]);
        let (bytes, written) = write_layered_image(&refs, &spec, Vec::new()).unwrap();
        assert_eq!(written.layer_digests.len(), 4);
        assert_eq!(written.layer_digest, written.layer_digests[3]);
        let files = entries(&bytes);
        let blob = |d: &str| &files[&format!("blobs/sha256/{}", d.trim_start_matches("sha256:"))];
        let manifest: serde_json::Value =
            serde_json::from_slice(blob(&written.manifest_digest)).unwrap();
        let listed: Vec<&str> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        assert_eq!(listed, written.layer_digests);
        let config: serde_json::Value =
            serde_json::from_slice(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            serde_json::json!(written.layer_digests)
        );
        // The third layer's blob holds only what it adds (and its parent directory).
        let third = entries(blob(&written.layer_digests[2]));
        let mut names: Vec<&String> = third.keys().collect();
        names.sort();
        assert_eq!(names, ["layer", "layer/1"]);
        assert!(matches!(
            write_layered_image(&[], &spec, Vec::new()),
            Err(ImageError::NoLayers)
        ));
    }

    #[test]
    fn busybox_image_has_applets() {
        let bb = Path::new("/bin/busybox");
        assert!(
            bb.exists(),
            "/bin/busybox missing: install busybox-static (cargo xtask setup)"
        );
        let t = busybox_tree(bb).unwrap();
        for applet in ["sh", "echo", "cat", "sleep", "httpd", "id", "true"] {
            assert_eq!(
                t.get(&format!("bin/{applet}")).map(|n| &n.kind),
                Some(&Kind::Symlink("busybox".into())),
                "{applet}"
            );
        }
        assert!(pause_tree(bb).unwrap().get("bin/sh").is_none());
    }

    #[test]
    fn missing_busybox_is_a_clear_error() {
        let err = busybox_tree(Path::new("/nonexistent/busybox")).unwrap_err();
        assert!(err.to_string().contains("busybox-static"), "{err}");
    }
}
