//! Requests from this node to the owner of a digest or tag, and the protocol both sides speak.
//!
//! A peer request names the configured upstream and the repository it is for, and carries the
//! region's secret; the owner answers through the same cache path as a client request of that
//! repository (links checked, one fill per digest), only without asking peers again. So the
//! peer interface never reaches anything the configuration does not name, and never hands out
//! what the repository does not hold.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use pier_metrics::Metrics;
use pier_oci::{AcceptSet, Digest, Reference, RepositoryName};
use pier_upstream::{BlobResponse, TransportError, TransportKind, UpstreamError};

/// Where peer requests go: `<peer>/_pier/region/v1/{blobs,manifests}/<reference>`.
pub const PATH_PREFIX: &str = "/_pier/region/v1/";
/// The header that carries the region's secret.
pub const SECRET_HEADER: &str = "x-pier-region-secret";
/// On a manifest answer: when the owner last confirmed a tag's answer with the upstream (Unix
/// seconds), so that this node keeps it only for what is left of the window.
pub const FETCHED_AT_HEADER: &str = "x-pier-fetched-at";
/// On a manifest request: the client's accept set ([`AcceptSet::bits`]).
pub const ACCEPT_QUERY: &str = "accept";

/// Why a peer gave no answer to use.
#[derive(Debug)]
pub(crate) enum PeerError {
    /// The owner answered that the repository has no such object (it asked the upstream).
    NotFound,
    /// Anything else: down, slow, refused, broken. The next node in the ranking is asked.
    Unavailable(String),
}

/// A manifest as a peer answered it.
pub(crate) struct PeerManifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// For a tag: when its owner last confirmed it (Unix seconds).
    pub fetched_at: Option<u64>,
}

/// The HTTP client for peers.
pub(crate) struct PeerClient {
    http: reqwest::Client,
    secret: String,
}

/// Largest manifest a peer may send (as from an upstream).
const MAX_MANIFEST: usize = 4 << 20;

impl PeerClient {
    pub(crate) fn new(
        secret: String,
        connect_timeout: Duration,
        read_timeout: Duration,
        ca: Option<reqwest::Certificate>,
    ) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            // Peers answer themselves; a redirect would be someone else.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if let Some(ca) = ca {
            b = b.add_root_certificate(ca);
        }
        Ok(PeerClient {
            http: b.build().map_err(|e| e.to_string())?,
            secret,
        })
    }

    fn url(
        peer: &str,
        kind: &str,
        reference: &str,
        upstream: &str,
        repo: &RepositoryName,
    ) -> String {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("upstream", upstream)
            .append_pair("repo", repo.as_str())
            .finish();
        format!("{peer}{PATH_PREFIX}{kind}/{reference}?{query}")
    }

    /// Sends a request and sorts the outcome, counting it.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        metrics: &Metrics,
    ) -> Result<reqwest::Response, PeerError> {
        let started = Instant::now();
        let result = req.header(SECRET_HEADER, &self.secret).send().await;
        metrics
            .peer_duration
            .observe(started.elapsed().as_secs_f64());
        let (outcome, answer) = match result {
            Ok(r) if r.status().is_success() => ("ok", Ok(r)),
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                ("not_found", Err(PeerError::NotFound))
            }
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                tracing::error!(status = %r.status(), "a peer refused this node's requests: do the nodes share the cluster secret?");
                (
                    "refused",
                    Err(PeerError::Unavailable(format!("refused: {}", r.status()))),
                )
            }
            Ok(r) => (
                "error",
                Err(PeerError::Unavailable(format!("HTTP {}", r.status()))),
            ),
            Err(e) if e.is_timeout() => ("timeout", Err(PeerError::Unavailable(e.to_string()))),
            Err(e) => (
                "error",
                Err(PeerError::Unavailable(e.without_url().to_string())),
            ),
        };
        metrics.peer_requests.with_label_values(&[outcome]).inc();
        answer
    }

    /// The blob from `offset` on, as the owner streams it.
    pub(crate) async fn blob(
        &self,
        peer: &str,
        upstream: &str,
        repo: &RepositoryName,
        digest: &Digest,
        offset: u64,
        metrics: &Metrics,
    ) -> Result<BlobResponse, PeerError> {
        let mut req = self.http.get(Self::url(
            peer,
            "blobs",
            &digest.to_string(),
            upstream,
            repo,
        ));
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = self.send(req, metrics).await?;
        let length = resp.content_length();
        let (start, total) = if resp.status() == reqwest::StatusCode::PARTIAL_CONTENT {
            content_range(resp.headers()).ok_or_else(|| {
                PeerError::Unavailable("partial answer without a valid Content-Range".into())
            })?
        } else {
            (0, length)
        };
        let body = resp
            .bytes_stream()
            .map_err(|e| {
                UpstreamError::Transport(TransportError::new(
                    TransportKind::Other,
                    format!("peer body broke: {}", e.without_url()),
                ))
            })
            .boxed();
        Ok(BlobResponse { start, total, body })
    }

    /// A manifest by tag or digest for a client of `accept`, as the owner resolved it.
    pub(crate) async fn manifest(
        &self,
        peer: &str,
        upstream: &str,
        repo: &RepositoryName,
        reference: &Reference,
        accept: AcceptSet,
        metrics: &Metrics,
    ) -> Result<PeerManifest, PeerError> {
        let url = format!(
            "{}&{ACCEPT_QUERY}={}",
            Self::url(peer, "manifests", &reference.to_string(), upstream, repo),
            accept.bits()
        );
        let resp = self.send(self.http.get(url), metrics).await?;
        let h = resp.headers();
        let text = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let digest: Digest = text("docker-content-digest")
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| PeerError::Unavailable("manifest answer without a digest".into()))?;
        let media_type = text("content-type")
            .ok_or_else(|| PeerError::Unavailable("manifest answer without a type".into()))?;
        let fetched_at = text(FETCHED_AT_HEADER).and_then(|t| t.parse().ok());
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST as u64)
        {
            return Err(PeerError::Unavailable("manifest too large".into()));
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| PeerError::Unavailable(e.without_url().to_string()))?;
        // The owner is trusted with routing, not with content: the bytes must be what they say.
        if bytes.len() > MAX_MANIFEST || !digest.verifies(&bytes) {
            return Err(PeerError::Unavailable(
                "manifest bytes do not match their digest".into(),
            ));
        }
        if let Reference::Digest(asked) = reference {
            if *asked != digest {
                return Err(PeerError::Unavailable(
                    "peer answered another digest".into(),
                ));
            }
        }
        Ok(PeerManifest {
            digest,
            media_type,
            bytes,
            fetched_at,
        })
    }
}

/// `Content-Range: bytes <start>-<end>/<total>` → (start, total).
fn content_range(h: &reqwest::header::HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = h.get(reqwest::header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    Some((start.parse().ok()?, total.parse().ok()))
}
