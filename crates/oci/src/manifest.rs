//! What a manifest refers to: the children of an image index (with their platforms), the config and
//! layers of an image manifest, the layers of a schema 1 manifest.
//!
//! Only the fields pier acts on are read; the bytes themselves are always served untouched.

use serde::Deserialize;

use crate::Digest;

/// A platform as an index names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// Whether this platform is `os/arch[/variant]` (without a variant, any variant matches).
    pub fn matches(&self, wanted: &str) -> bool {
        let mut parts = wanted.split('/');
        parts.next() == Some(self.os.as_str())
            && parts.next() == Some(self.architecture.as_str())
            && parts
                .next()
                .is_none_or(|v| Some(v) == self.variant.as_deref())
    }
}

/// A reference from one manifest to another object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub media_type: Option<String>,
    pub platform: Option<Platform>,
    /// A layer that names `urls` to fetch it from, or has a foreign media type (a foreign or
    /// non-distributable layer): registries accept such a manifest without holding the blob, so
    /// its naming the digest proves nothing about the repository. Only layers are foreign: the
    /// Distribution registry checks every child of an index and the config whatever they say.
    pub foreign: bool,
}

/// A manifest's references.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    /// The manifests an image index or manifest list names.
    pub manifests: Vec<Descriptor>,
    /// The config and layers of an image manifest (schema 1: its layers).
    pub blobs: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct RawDescriptor {
    digest: String,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    platform: Option<Platform>,
    #[serde(default)]
    urls: Vec<String>,
}

#[derive(Deserialize)]
struct RawLayerV1 {
    #[serde(rename = "blobSum")]
    blob_sum: String,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    manifests: Vec<RawDescriptor>,
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Vec<RawDescriptor>,
    #[serde(default, rename = "fsLayers")]
    fs_layers: Vec<RawLayerV1>,
}

impl References {
    /// The references of a manifest document; `None` if it is not JSON of a manifest's shape.
    /// Descriptors whose digest does not parse are left out: pier never asks for them.
    pub fn parse(bytes: &[u8]) -> Option<References> {
        let raw: Raw = serde_json::from_slice(bytes).ok()?;
        let descriptor = |layer: bool| {
            move |d: RawDescriptor| {
                Some(Descriptor {
                    digest: d.digest.parse().ok()?,
                    foreign: layer
                        && (!d.urls.is_empty()
                            || d.media_type
                                .as_deref()
                                .is_some_and(|t| t.contains(".foreign."))),
                    media_type: d.media_type,
                    platform: d.platform,
                })
            }
        };
        let manifests = raw
            .manifests
            .into_iter()
            .filter_map(descriptor(false))
            .collect();
        let mut blobs: Vec<Descriptor> = raw
            .config
            .into_iter()
            .filter_map(descriptor(false))
            .chain(raw.layers.into_iter().filter_map(descriptor(true)))
            .collect();
        blobs.extend(raw.fs_layers.into_iter().filter_map(|l| {
            Some(Descriptor {
                digest: l.blob_sum.parse().ok()?,
                media_type: None,
                platform: None,
                foreign: false,
            })
        }));
        Some(References { manifests, blobs })
    }

    /// Every digest referred to, children first.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().chain(&self.blobs).map(|d| &d.digest)
    }

    /// The digests a registry must hold in the manifest's repository to accept it (the
    /// Distribution registry checks each on push): every child, the config, and every layer
    /// but foreign ones.
    pub fn held_digests(&self) -> impl Iterator<Item = &Digest> {
        self.manifests
            .iter()
            .chain(&self.blobs)
            .filter(|d| !d.foreign)
            .map(|d| &d.digest)
    }

    /// The child an index names for `os`/`architecture` (the first, whatever its variant), as
    /// Docker Hub and the Distribution registry choose for a client that takes no index.
    pub fn platform_child(&self, os: &str, architecture: &str) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == architecture)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::sha256_of(&[n]).to_string()
    }

    #[test]
    fn index_children_and_platforms() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {{"digest":"{}","mediaType":"m","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
            {{"digest":"{}","platform":{{"os":"linux","architecture":"amd64"}}}},
            {{"digest":"not-a-digest"}}]}}"#,
            d(1),
            d(2)
        );
        let r = References::parse(doc.as_bytes()).unwrap();
        assert_eq!(r.manifests.len(), 2);
        assert!(r.blobs.is_empty());
        assert_eq!(
            r.platform_child("linux", "amd64")
                .unwrap()
                .digest
                .to_string(),
            d(2)
        );
        assert!(r.platform_child("windows", "amd64").is_none());
        let arm = r.manifests[0].platform.as_ref().unwrap();
        assert!(arm.matches("linux/arm64") && arm.matches("linux/arm64/v8"));
        assert!(!arm.matches("linux/arm64/v7") && !arm.matches("linux/amd64"));
    }

    #[test]
    fn foreign_layers_are_not_held() {
        let doc = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}","urls":["https://x/y"]}},{{"digest":"{}","mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}}]}}"#,
            d(1),
            d(2),
            d(3)
        );
        let r = References::parse(doc.as_bytes()).unwrap();
        assert_eq!(r.digests().count(), 3);
        let held: Vec<String> = r.held_digests().map(|x| x.to_string()).collect();
        assert_eq!(held, vec![d(1)]);
    }

    #[test]
    fn only_layers_are_foreign() {
        let foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}","urls":["https://x/y"]}},{{"digest":"{}","mediaType":"{foreign}"}}]}}"#,
            d(1),
            d(2)
        );
        let r = References::parse(index.as_bytes()).unwrap();
        assert!(r.manifests.iter().all(|m| !m.foreign));
        assert_eq!(r.held_digests().count(), 2);
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}","urls":["https://x/y"],"mediaType":"{foreign}"}},"layers":[{{"digest":"{}","urls":["https://x/z"]}}]}}"#,
            d(3),
            d(4)
        );
        let r = References::parse(image.as_bytes()).unwrap();
        let held: Vec<String> = r.held_digests().map(|x| x.to_string()).collect();
        assert_eq!(held, vec![d(3)]);
    }

    #[test]
    fn image_and_schema1_blobs() {
        let doc = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d(1),
            d(2)
        );
        let r = References::parse(doc.as_bytes()).unwrap();
        let all: Vec<String> = r.digests().map(|x| x.to_string()).collect();
        assert_eq!(all, vec![d(1), d(2)]);
        let v1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}}]}}"#,
            d(3)
        );
        assert_eq!(References::parse(v1.as_bytes()).unwrap().blobs.len(), 1);
        assert!(References::parse(b"not json").is_none());
    }
}
