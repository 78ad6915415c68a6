//! OCI image layouts made on the spot: random gzipped tar layers, a config, a manifest per
//! platform and an index over them. No network.

use std::fs;
use std::io::Write;
use std::path::Path;

use rand::RngCore;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A descriptor of a blob written into a layout.
#[derive(Clone, Debug)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: usize,
}

impl Descriptor {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

/// Writes `data` into the layout's blobs and describes it.
fn put(layout: &Path, media_type: &str, data: &[u8]) -> Descriptor {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).expect("mkdir blobs");
    fs::write(dir.join(&hex), data).expect("write blob");
    Descriptor {
        media_type: media_type.into(),
        digest: format!("sha256:{hex}"),
        size: data.len(),
    }
}

/// A gzipped tar with one file of `size` random bytes; returns (compressed, uncompressed digest).
fn layer(size: usize) -> (Vec<u8>, String) {
    let mut content = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut content);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    tar.append_data(
        &mut header,
        format!("data-{}.bin", &sha256_hex(&content)[..8]),
        &content[..],
    )
    .expect("tar append");
    let raw = tar.into_inner().expect("tar finish");
    let diff_id = format!("sha256:{}", sha256_hex(&raw));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).expect("gzip");
    (gz.finish().expect("gzip finish"), diff_id)
}

/// What a generated image is made of.
#[derive(Clone, Debug)]
pub struct Image {
    /// What the tag points at: the index, or the manifest of a single-platform image.
    pub top: Descriptor,
    /// Per platform: architecture, manifest, config.
    pub platforms: Vec<(String, Descriptor, Descriptor)>,
}

impl Image {
    /// The linux/amd64 manifest and config.
    pub fn amd64(&self) -> (&Descriptor, &Descriptor) {
        let (_, m, c) = self
            .platforms
            .iter()
            .find(|(a, _, _)| a == "amd64")
            .expect("an amd64 image");
        (m, c)
    }
}

/// One platform's image manifest with its config and layers.
fn platform_manifest(layout: &Path, arch: &str, layer_sizes: &[usize]) -> (Descriptor, Descriptor) {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for &size in layer_sizes {
        let (gz, diff_id) = layer(size);
        layers.push(put(layout, OCI_LAYER, &gz));
        diff_ids.push(diff_id);
    }
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": { "Cmd": ["/bin/true"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = put(layout, OCI_CONFIG, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.json(),
        "layers": layers.iter().map(Descriptor::json).collect::<Vec<_>>(),
    });
    (
        put(layout, OCI_MANIFEST, manifest.to_string().as_bytes()),
        config,
    )
}

/// Builds an OCI layout at `layout` whose `tag` is an index over linux/amd64 and linux/arm64,
/// each with layers of the given sizes. Returns the index descriptor.
pub fn two_platform_index(layout: &Path, tag: &str, layer_sizes: &[usize]) -> Image {
    let mut entries = Vec::new();
    let mut platforms = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (m, config) = platform_manifest(layout, arch, layer_sizes);
        platforms.push((arch.to_string(), m.clone(), config));
        let mut e = m.json();
        e["platform"] = serde_json::json!({ "architecture": arch, "os": "linux" });
        entries.push(e);
    }
    let index =
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries });
    let index = put(layout, OCI_INDEX, index.to_string().as_bytes());
    write_index_json(layout, tag, &index);
    Image {
        top: index,
        platforms,
    }
}

/// Builds an OCI layout with a single-platform (linux/amd64) image under `tag`.
pub fn single_image(layout: &Path, tag: &str, layer_sizes: &[usize]) -> Image {
    let (m, config) = platform_manifest(layout, "amd64", layer_sizes);
    write_index_json(layout, tag, &m);
    Image {
        top: m.clone(),
        platforms: vec![("amd64".into(), m, config)],
    }
}

fn write_index_json(layout: &Path, tag: &str, top: &Descriptor) {
    let mut e = top.json();
    e["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": tag });
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": [e] });
    fs::write(layout.join("index.json"), index.to_string()).expect("index.json");
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
}

/// The blobs of a layout: file name (hex digest) → bytes.
pub fn blobs(layout: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fs::read_dir(layout.join("blobs/sha256"))
        .expect("read blobs")
        .map(|e| {
            let e = e.expect("dir entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).expect("read blob"),
            )
        })
        .collect()
}
