//! Warming the cache before anyone asks: an image's manifests (every platform of an index, or the
//! chosen ones) and all their blobs, through the same resolver, fills and checks as a client's
//! pull (the cache's own API, not made-up HTTP requests).

use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt, TryStreamExt};
use pier_cache::Source;
use std::collections::HashSet;

use pier_oci::{AcceptSet, Digest, Reference, References, Tag};

use crate::Mirror;

/// Blobs fetched at once per image.
const CONCURRENCY: usize = 4;

/// What happened to one object.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WarmEvent {
    pub image: String,
    /// `manifest` or `blob`.
    pub kind: String,
    pub digest: String,
    /// Bytes fetched into the cache (0 when it was there already).
    pub fetched_bytes: u64,
    /// Already cached before the warm.
    pub cached: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// The outcome of warming one image.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WarmReport {
    pub manifests: usize,
    pub blobs: usize,
    pub already_cached: usize,
    pub fetched_bytes: u64,
    pub failures: Vec<String>,
}

impl WarmReport {
    fn add(&mut self, e: &WarmEvent) {
        match (&e.error, e.kind.as_str()) {
            (Some(err), _) => self
                .failures
                .push(format!("{} {}: {err}", e.kind, e.digest)),
            (None, "manifest") => self.manifests += 1,
            (None, _) => self.blobs += 1,
        }
        self.already_cached += usize::from(e.cached && e.error.is_none());
        self.fetched_bytes += e.fetched_bytes;
    }
}

/// What to warm of an image besides its manifest and blobs.
#[derive(Clone, Debug)]
pub struct WarmOptions {
    /// Only these platforms of an index (`os/arch[/variant]`); all when empty.
    pub platforms: Vec<String>,
    /// Also the image's signatures and attestations: its sigstore attachment tags
    /// (`sha256-<hex>.sig`, `.att`, `.sbom`) and its OCI referrers, with their blobs, so that an
    /// edge node verifies the image with the upstream down.
    pub signatures: bool,
}

impl Default for WarmOptions {
    fn default() -> Self {
        WarmOptions {
            platforms: Vec::new(),
            signatures: true,
        }
    }
}

/// The sigstore attachment tags of a digest.
const ATTACHMENTS: [&str; 3] = ["sig", "att", "sbom"];

/// `[registry/]name[:tag|@digest]` → (`[registry/]name`, reference); the tag defaults to `latest`.
pub fn split_image(image: &str) -> (String, String) {
    if let Some((name, digest)) = image.split_once('@') {
        return (name.to_string(), digest.to_string());
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (
            image[..last_slash + i].to_string(),
            image[last_slash + i + 1..].to_string(),
        ),
        None => (image.to_string(), "latest".to_string()),
    }
}

impl Mirror {
    /// Warms one image: its manifest (and, for an index, the manifests of the wanted platforms),
    /// with `options.signatures` the signatures and referrers of each, and every config and layer
    /// blob they name. `progress` is told of every object as it is done.
    pub async fn warm(
        &self,
        image: &str,
        options: &WarmOptions,
        progress: &(dyn Fn(WarmEvent) + Sync),
    ) -> WarmReport {
        let mut report = WarmReport::default();
        let emit = |event: WarmEvent, report: &mut WarmReport| {
            report.add(&event);
            progress(event);
        };
        let event = |kind: &str, digest: &str| WarmEvent {
            image: image.to_string(),
            kind: kind.to_string(),
            digest: digest.to_string(),
            fetched_bytes: 0,
            cached: false,
            error: None,
        };
        let (name, reference) = split_image(image);
        let route = match self.route(&name, None) {
            Ok(r) => r,
            Err(e) => {
                let mut ev = event("manifest", &reference);
                ev.error = Some(e.message);
                emit(ev, &mut report);
                return report;
            }
        };
        let top = match Reference::parse(&reference) {
            Ok(r) => r,
            Err(e) => {
                let mut ev = event("manifest", &reference);
                ev.error = Some(format!("invalid reference: {e}"));
                emit(ev, &mut report);
                return report;
            }
        };
        let cached = |s: Source| matches!(s, Source::Memory | Source::Disk);
        // Manifests to warm: (reference, whether it may be absent). The top manifest, each
        // platform's, and with signatures the attachments and referrers of every one of them.
        let mut manifests = vec![(top, false)];
        let mut seen = HashSet::new();
        let mut blobs: Vec<Digest> = Vec::new();
        while let Some((reference, optional)) = manifests.pop() {
            let mut e = event("manifest", &reference.to_string());
            let m = match self
                .cache
                .resolve_manifest(route.at(), &reference, AcceptSet::MODERN)
                .await
            {
                Err(pier_cache::Error::NotFound) if optional => continue,
                Err(err) => {
                    e.error = Some(err.to_string());
                    emit(e, &mut report);
                    continue;
                }
                Ok(m) => m,
            };
            if !seen.insert(m.digest.clone()) {
                continue;
            }
            e.digest = m.digest.to_string();
            e.cached = cached(m.source);
            e.fetched_bytes = if e.cached {
                0
            } else {
                m.manifest.bytes.len() as u64
            };
            if let Some(refs) = References::parse(&m.manifest.bytes) {
                for child in &refs.manifests {
                    let wanted = options.platforms.is_empty()
                        || child
                            .platform
                            .as_ref()
                            .is_none_or(|p| options.platforms.iter().any(|w| p.matches(w)));
                    if wanted {
                        manifests.push((Reference::Digest(child.digest.clone()), false));
                    }
                }
                blobs.extend(refs.blobs.into_iter().map(|b| b.digest));
            }
            emit(e, &mut report);
            if options.signatures {
                for suffix in ATTACHMENTS {
                    let tag = format!(
                        "{}-{}.{suffix}",
                        m.digest.algorithm().as_str(),
                        m.digest.hex()
                    );
                    if let Some(tag) = Tag::parse(&tag) {
                        manifests.push((Reference::Tag(tag), true));
                    }
                }
                match self.cache.referrers(route.at(), &m.digest).await {
                    Ok(index) => {
                        let listed = References::parse(&index.manifest.bytes).unwrap_or_default();
                        for r in listed.manifests {
                            manifests.push((Reference::Digest(r.digest), false));
                        }
                    }
                    Err(err) => {
                        let mut e = event("referrers", &m.digest.to_string());
                        e.error = Some(err.to_string());
                        emit(e, &mut report);
                    }
                }
            }
        }
        blobs.sort();
        blobs.dedup();
        let route = &route;
        let mut done = stream::iter(blobs)
            .map(|digest| {
                let mut e = event("blob", &digest.to_string());
                async move {
                    match self.warm_blob(route, &digest).await {
                        Ok(None) => e.cached = true,
                        Ok(Some(bytes)) => e.fetched_bytes = bytes,
                        Err(err) => e.error = Some(err),
                    }
                    e
                }
            })
            .buffer_unordered(CONCURRENCY);
        while let Some(e) = done.next().await {
            emit(e, &mut report);
        }
        report
    }

    /// Brings one blob into the store: `None` when it was cached, else the bytes fetched, once
    /// they verified and were committed.
    async fn warm_blob(
        &self,
        route: &crate::Route<'_>,
        digest: &Digest,
    ) -> Result<Option<u64>, String> {
        let blob = self
            .cache
            .blob(route.at(), digest)
            .await
            .map_err(|e| e.to_string())?;
        if matches!(blob.source, Source::Memory | Source::Disk) {
            return Ok(None);
        }
        // Follow the fill to its end: the stream fails if the bytes do not verify.
        let bytes = blob
            .stream(0, None)
            .try_fold(0u64, |n, chunk| async move { Ok(n + chunk.len() as u64) })
            .await
            .map_err(|e| format!("download broke off: {e}"))?;
        // Readers finish once the blob verified; warm means stored.
        self.cache
            .wait_for_fills(Some(digest), Duration::from_secs(600))
            .await;
        if !self.cache.is_stored(digest) {
            return Err("verified, but could not be stored".into());
        }
        Ok(Some(bytes))
    }

    /// Warms each image in turn; returns one report per image.
    pub async fn warm_all(
        self: &Arc<Self>,
        images: &[String],
        options: &WarmOptions,
    ) -> Vec<(String, WarmReport)> {
        let mut out = Vec::new();
        for image in images {
            let report = self.warm(image, options, &|_| {}).await;
            if report.failures.is_empty() {
                tracing::info!(%image, manifests = report.manifests, blobs = report.blobs, fetched_bytes = report.fetched_bytes, "warmed");
            } else {
                tracing::warn!(%image, failures = ?report.failures, "warming failed in part");
            }
            out.push((image.clone(), report));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_image_references() {
        assert_eq!(split_image("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(split_image("nginx:1.25"), ("nginx".into(), "1.25".into()));
        assert_eq!(
            split_image("registry.local:5000/team/app"),
            ("registry.local:5000/team/app".into(), "latest".into())
        );
        assert_eq!(
            split_image("registry.local:5000/team/app:v2"),
            ("registry.local:5000/team/app".into(), "v2".into())
        );
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            split_image(&format!("ghcr.io/org/app@{d}")),
            ("ghcr.io/org/app".into(), d)
        );
    }
}
