//! Managing the cache: statistics, purges and eviction, on a listener of their own (off unless
//! configured; put it on loopback or a management network). The same operations back the
//! `pier du`, `pier gc` and `pier purge` commands on a stopped cache directory.

use std::future::Future;
use std::sync::Arc;

use http::{header, Method, Response, StatusCode};
use pier_cache::{EvictionReport, GcReport, Usage};
use pier_oci::{Digest, ErrorCode, Query, RegistryError};
use tokio::net::TcpListener;

use crate::response::{self, Body};
use crate::serve::{accept_loop, ServerOptions};
use crate::warm::WarmOptions;
use crate::Mirror;

/// Cache statistics: what is held and how lookups went since start.
#[derive(Debug, serde::Serialize)]
pub struct Stats {
    #[serde(flatten)]
    pub usage: Usage,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
}

/// What a purge removed.
#[derive(Debug, serde::Serialize)]
pub struct Purged {
    /// `digest` or `repository`.
    pub kind: &'static str,
    pub target: String,
    /// Objects (a digest) or tags (a repository) removed.
    pub removed: usize,
}

impl Mirror {
    pub async fn stats(&self) -> Stats {
        let lookups = |result: &str| {
            ["manifest", "blob"]
                .iter()
                .map(|k| {
                    self.metrics
                        .cache_lookups
                        .with_label_values(&[result, k])
                        .get()
                })
                .sum()
        };
        Stats {
            usage: self.cache.usage().await,
            memory_hits: lookups("memory_hit"),
            disk_hits: lookups("disk_hit"),
            misses: lookups("miss"),
        }
    }

    /// Purges a digest (`sha256:...`: that blob or manifest) or a repository named as clients
    /// name it (`library/nginx`, `ghcr.io/org/app`: its tags, so the next pull asks upstream).
    pub async fn purge(&self, target: &str) -> Result<Purged, RegistryError> {
        if target.contains(':') && !target.contains('/') {
            let digest: Digest = target.parse().map_err(|e| {
                RegistryError::new(ErrorCode::DigestInvalid, format!("invalid digest: {e}"))
            })?;
            let removed = self
                .cache
                .purge_digest(&digest)
                .await
                .map_err(|e| response::from_io(&e))?;
            return Ok(Purged {
                kind: "digest",
                target: digest.to_string(),
                removed: usize::from(removed),
            });
        }
        let route = self.route(target, None)?;
        let removed = self
            .cache
            .purge_repository(&route.upstream.name, &route.repo)
            .await
            .map_err(|e| response::from_io(&e))?;
        Ok(Purged {
            kind: "repository",
            target: format!("{}/{}", route.upstream.name, route.repo),
            removed,
        })
    }

    /// Applies the disk budget and age limit now.
    pub async fn evict(&self) -> Result<EvictionReport, RegistryError> {
        self.cache.evict().await.map_err(|e| response::from_io(&e))
    }

    /// Collects hosted content no hosted manifest names now.
    pub async fn collect_garbage(&self) -> Result<GcReport, RegistryError> {
        self.cache
            .collect_garbage()
            .await
            .map_err(|e| response::from_io(&e))
    }
}

/// Serves the admin API on `listener` until `shutdown`:
///
/// - `GET /admin/stats`: [`Stats`] as JSON
/// - `DELETE /admin/digests/<digest>`: purge one blob or manifest
/// - `DELETE /admin/repositories/<name>`: purge a repository's tags
/// - `POST /admin/evict`: apply the budget now
/// - `POST /admin/gc`: collect hosted garbage now; answers with the [`GcReport`]
/// - `POST /admin/warm?image=IMAGE[&image=...][&platform=os/arch][&signatures=false]`: pull
///   images (with their signatures and referrers, unless `signatures=false`) into the cache;
///   answers with one JSON line per object as it is done, then one report line per image
pub async fn serve_admin(
    listener: TcpListener,
    mirror: Arc<Mirror>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let handler = move |req: hyper::Request<hyper::body::Incoming>, _conn| {
        let mirror = mirror.clone();
        async move {
            let path = req.uri().path().to_string();
            let result = match (req.method().clone(), path.as_str()) {
                (Method::GET, "/admin/stats") => Ok(json(&mirror.stats().await)),
                (Method::POST, "/admin/evict") => mirror.evict().await.map(|r| json(&r)),
                (Method::POST, "/admin/gc") => mirror.collect_garbage().await.map(|r| json(&r)),
                (Method::POST, "/admin/warm") => Ok(warm(mirror.clone(), req.uri().query().unwrap_or(""))),
                (Method::DELETE, p) if p.starts_with("/admin/digests/") => {
                    mirror.purge(&p["/admin/digests/".len()..]).await.map(|r| json(&r))
                }
                (Method::DELETE, p) if p.starts_with("/admin/repositories/") => {
                    mirror.purge(&p["/admin/repositories/".len()..]).await.map(|r| json(&r))
                }
                _ => Err(RegistryError::new(
                    ErrorCode::Unsupported,
                    "admin API: GET /admin/stats, POST /admin/evict, POST /admin/gc, DELETE /admin/digests/<digest>, DELETE /admin/repositories/<name>",
                )
                .with_status(404)),
            };
            result.unwrap_or_else(|e| response::error(&e, false))
        }
    };
    accept_loop(listener, &ServerOptions::default(), shutdown, handler).await
}

/// Runs a warm in its own task and streams its events as JSON lines. The warm goes on if the
/// caller hangs up.
fn warm(mirror: Arc<Mirror>, query: &str) -> Response<Body> {
    // Image references carry `/`, `:` and `@`, which clients may percent-encode.
    let query = Query::parse(query);
    let nonempty = |key| {
        query
            .all(key)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let images = nonempty("image");
    let options = WarmOptions {
        platforms: nonempty("platform"),
        signatures: query.all("signatures").last() != Some("false"),
    };
    if images.is_empty() {
        let e = RegistryError::new(ErrorCode::Unsupported, "give at least one image=...")
            .with_status(400);
        return response::error(&e, false);
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<std::io::Result<bytes::Bytes>>();
    tokio::spawn(async move {
        for image in images {
            let send = |line: String| {
                let _ = tx.send(Ok(bytes::Bytes::from(line + "\n")));
            };
            let report = mirror
                .warm(&image, &options, &|event| {
                    send(serde_json::to_string(&event).unwrap_or_default())
                })
                .await;
            send(serde_json::json!({ "image": image, "report": report }).to_string());
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    response::built(
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(response::stream(Box::pin(body))),
        false,
    )
}

fn json(value: &impl serde::Serialize) -> Response<Body> {
    response::json(
        serde_json::to_string_pretty(value).unwrap_or_default(),
        false,
    )
}
