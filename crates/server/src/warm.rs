//! Warming the cache before anyone asks: an image's manifests (every platform of an index, or the
//! chosen ones) and all their blobs, pulled through the same handlers, fills and checks as a
//! client's pull.

use std::sync::Arc;

use futures_util::{stream, StreamExt};
use http::{header, Method, Request};
use http_body_util::BodyExt;
use pier_oci::media_type::{DEFAULT_ACCEPT, DOCKER_MANIFEST_LIST, OCI_INDEX};

use crate::handlers::{self, CACHE_HEADER};
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

/// What an internal request answered.
struct Answer {
    /// `X-Pier-Cache`: where the answer came from.
    cache: Option<String>,
    /// The body, when kept.
    body: bytes::Bytes,
    /// Body bytes received.
    len: u64,
}

/// A GET (or HEAD) through the registry handlers, as a client would send it. The body is read to
/// the end, so that a fill it started has completed and verified (or failed); it is kept only
/// when asked (manifests), never for blobs, which may be gigabytes.
async fn internal(
    mirror: &Mirror,
    method: Method,
    path: &str,
    keep_body: bool,
) -> Result<Answer, String> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::ACCEPT, DEFAULT_ACCEPT)
        .body(())
        .map_err(|e| e.to_string())?;
    let resp = handlers::handle(mirror, &req).await;
    let status = resp.status();
    let cache = resp
        .headers()
        .get(CACHE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let (mut kept, mut len) = (bytes::BytesMut::new(), 0u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("download broke off: {e}"))?;
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
            if keep_body || !status.is_success() {
                kept.extend_from_slice(data);
            }
        }
    }
    if !status.is_success() {
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            String::from_utf8_lossy(&kept)
        ));
    }
    Ok(Answer {
        cache,
        body: kept.freeze(),
        len,
    })
}

/// `os/arch[/variant]` matches a descriptor's `platform`.
fn platform_matches(wanted: &[String], platform: &serde_json::Value) -> bool {
    if wanted.is_empty() {
        return true;
    }
    let os = platform["os"].as_str().unwrap_or("");
    let arch = platform["architecture"].as_str().unwrap_or("");
    let variant = platform["variant"].as_str();
    wanted.iter().any(|w| {
        let mut parts = w.split('/');
        parts.next() == Some(os)
            && parts.next() == Some(arch)
            && parts.next().is_none_or(|v| Some(v) == variant)
    })
}

impl Mirror {
    /// Warms one image: its manifest (and, for an index, the manifests of the wanted platforms,
    /// all when `platforms` is empty) and every config and layer blob they name. `progress` is
    /// told of every object as it is done.
    pub async fn warm(
        &self,
        image: &str,
        platforms: &[String],
        progress: &(dyn Fn(WarmEvent) + Sync),
    ) -> WarmReport {
        let mut report = WarmReport::default();
        let emit = |event: WarmEvent, report: &mut WarmReport| {
            report.add(&event);
            progress(event);
        };
        let (name, reference) = split_image(image);
        let event = |kind: &str, digest: &str| WarmEvent {
            image: image.to_string(),
            kind: kind.to_string(),
            digest: digest.to_string(),
            fetched_bytes: 0,
            cached: false,
            error: None,
        };
        // The top manifest, then each platform's.
        let mut manifests = vec![reference];
        let mut blobs: Vec<String> = Vec::new();
        while let Some(reference) = manifests.pop() {
            let mut e = event("manifest", &reference);
            match internal(
                self,
                Method::GET,
                &format!("/v2/{name}/manifests/{reference}"),
                true,
            )
            .await
            {
                Err(err) => {
                    e.error = Some(err);
                    emit(e, &mut report);
                    continue;
                }
                Ok(answer) => {
                    e.cached = matches!(answer.cache.as_deref(), Some("memory" | "disk"));
                    e.fetched_bytes = if e.cached { 0 } else { answer.len };
                    let doc: serde_json::Value =
                        serde_json::from_slice(&answer.body).unwrap_or_default();
                    let media_type = doc["mediaType"].as_str().unwrap_or("");
                    if media_type == OCI_INDEX
                        || media_type == DOCKER_MANIFEST_LIST
                        || doc["manifests"].is_array()
                    {
                        for m in doc["manifests"].as_array().into_iter().flatten() {
                            if platform_matches(platforms, &m["platform"]) {
                                if let Some(d) = m["digest"].as_str() {
                                    manifests.push(d.to_string());
                                }
                            }
                        }
                    } else {
                        blobs.extend(doc["config"]["digest"].as_str().map(str::to_string));
                        for l in doc["layers"].as_array().into_iter().flatten() {
                            blobs.extend(l["digest"].as_str().map(str::to_string));
                        }
                    }
                    emit(e, &mut report);
                }
            }
        }
        blobs.sort();
        blobs.dedup();
        let mut done = stream::iter(blobs)
            .map(|digest| {
                let name = name.clone();
                let mut e = event("blob", &digest);
                async move {
                    let path = format!("/v2/{name}/blobs/{digest}");
                    // A HEAD tells whether it is cached without reading it; only a miss is fetched.
                    let cached = internal(self, Method::HEAD, &path, false)
                        .await
                        .is_ok_and(|a| matches!(a.cache.as_deref(), Some("memory" | "disk")));
                    if cached {
                        e.cached = true;
                    } else {
                        match internal(self, Method::GET, &path, false).await {
                            Ok(answer) => {
                                e.fetched_bytes = answer.len;
                                // A reader finishes once the blob verified; warm means stored.
                                if let Ok(d) = digest.parse() {
                                    self.cache
                                        .wait_for_fills(
                                            Some(&d),
                                            std::time::Duration::from_secs(600),
                                        )
                                        .await;
                                }
                            }
                            Err(err) => e.error = Some(err),
                        }
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

    /// Warms each image in turn; returns one report per image.
    pub async fn warm_all(
        self: &Arc<Self>,
        images: &[String],
        platforms: &[String],
    ) -> Vec<(String, WarmReport)> {
        let mut out = Vec::new();
        for image in images {
            let report = self.warm(image, platforms, &|_| {}).await;
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

    #[test]
    fn platforms() {
        let p = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        assert!(platform_matches(&[], &p));
        assert!(platform_matches(&["linux/arm64".into()], &p));
        assert!(platform_matches(&["linux/arm64/v8".into()], &p));
        assert!(!platform_matches(&["linux/arm64/v7".into()], &p));
        assert!(!platform_matches(&["linux/amd64".into()], &p));
    }
}
