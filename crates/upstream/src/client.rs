//! [`Upstream`]: the requests pier makes to one registry. Authentication is the
//! [`AuthSession`]'s business, health the [`Health`]'s, and reading headers the `wire` module's;
//! this module strings them together per request and counts what happened.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use pier_metrics::Metrics;
use pier_oci::{Digest, Reference, RepositoryName};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};

use crate::auth::{AuthSession, Authorization, Credentials};
use crate::error::{SetupError, UpstreamError};
use crate::health::Health;
use crate::wire::{
    accept_value, check_status, content_length, content_type, header_digest, next_link,
    parse_content_range, rate_limit_remaining,
};

/// Largest manifest accepted from an upstream (the limit Distribution and containerd use).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// How to reach one upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry host clients know it by (`docker.io`, `ghcr.io`); used in logs.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://10.0.0.5:5000`.
    pub url: String,
    /// Sent as Basic to the upstream, or to the token realm it names when that realm is https or
    /// on the upstream's own origin; anonymous when `None`.
    pub credentials: Option<Credentials>,
    /// A PEM file of extra CA certificates, trusted besides the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Longest wait for a connection (TCP and TLS).
    pub connect_timeout: Duration,
    /// Longest wait for any read (headers or the next body bytes) once connected.
    pub read_timeout: Duration,
}

/// A manifest as the upstream served it: bytes untouched, so its digest is the upstream's.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The body, byte for byte.
    pub bytes: Bytes,
    /// The type the upstream declared, or the one the body declares, or OCI's.
    pub media_type: String,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest_header: Option<Digest>,
}

/// What a manifest HEAD tells without the body.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    /// `Docker-Content-Digest`.
    pub digest: Digest,
    /// `Content-Type`, without parameters.
    pub media_type: Option<String>,
    /// `Content-Length`.
    pub size: Option<u64>,
}

/// A blob body as a stream of chunks.
pub type BlobBody = BoxStream<'static, Result<Bytes, UpstreamError>>;

/// The start of a blob download.
pub struct BlobResponse {
    /// Byte position of the first body byte: the offset asked for when the upstream honoured the
    /// Range, 0 when it sent the whole blob.
    pub start: u64,
    /// Size of the whole blob, when the upstream said.
    pub total: Option<u64>,
    /// The bytes from `start` on.
    pub body: BlobBody,
}

/// A client for one upstream registry. Cheap to share behind an `Arc`; connections are pooled.
pub struct Upstream {
    name: String,
    base: String,
    http: reqwest::Client,
    auth: AuthSession,
    health: Health,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("url", &self.base)
            .finish()
    }
}

impl Upstream {
    /// Builds the client. Fails on a URL that is not http(s) or an unreadable CA file.
    pub fn new(config: UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, SetupError> {
        let url = Url::parse(&config.url).map_err(|e| SetupError::Url {
            url: config.url.clone(),
            message: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(SetupError::Url {
                url: config.url.clone(),
                message: "must be http:// or https:// with a host".into(),
            });
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(SetupError::CredentialsInUrl);
        }
        let http = http_client(
            config.connect_timeout,
            config.read_timeout,
            config.ca_file.as_deref(),
        )?;
        Ok(Upstream {
            auth: AuthSession::new(
                config.name.clone(),
                url,
                config.credentials,
                http.clone(),
                metrics.clone(),
            ),
            health: Health::new(config.name.clone(), metrics.clone()),
            name: config.name,
            base: config.url.trim_end_matches('/').to_string(),
            http,
            metrics,
        })
    }

    /// The pull budget the upstream reported last (`ratelimit-remaining`), if it ever did.
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        self.health.rate_limit_remaining()
    }

    /// Whether a request failed for want of the upstream within the last `OUTAGE_HOLD` (10 s),
    /// with no answer since.
    pub fn in_outage(&self) -> bool {
        self.health.in_outage()
    }

    /// The registry name this upstream stands for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// GET a manifest, with the client's `Accept` passed on.
    pub async fn get_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
        accept: &str,
    ) -> Result<Manifest, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, accept_value(accept));
        let mut resp = self
            .send("manifest", Method::GET, url, repo, headers)
            .await?;
        check_status(resp.status(), resp.headers())?;
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_BYTES as u64)
        {
            return Err(UpstreamError::Invalid("manifest larger than 4 MiB".into()));
        }
        let media_type = content_type(resp.headers());
        let digest_header = header_digest(resp.headers());
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::Invalid("manifest larger than 4 MiB".into()));
            }
            body.extend_from_slice(&chunk);
            self.received(chunk.len());
        }
        let bytes = body.freeze();
        let media_type = media_type
            .filter(|t| t != "application/json" && t != "text/plain")
            .or_else(|| pier_oci::media_type::declared(&bytes))
            .unwrap_or_else(|| pier_oci::media_type::OCI_MANIFEST.to_string());
        Ok(Manifest {
            bytes,
            media_type,
            digest_header,
        })
    }

    /// GET the referrers of a digest (OCI 1.1: an image index of the manifests whose `subject`
    /// it is). `NotFound` when the upstream has no referrers API.
    pub async fn get_referrers(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Manifest, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/referrers/{digest}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static(pier_oci::media_type::OCI_INDEX),
        );
        let mut resp = self
            .send("referrers", Method::GET, url, repo, headers)
            .await?;
        check_status(resp.status(), resp.headers())?;
        let media_type = content_type(resp.headers());
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::Invalid(
                    "referrers index larger than 4 MiB".into(),
                ));
            }
            body.extend_from_slice(&chunk);
            self.received(chunk.len());
        }
        Ok(Manifest {
            bytes: body.freeze(),
            media_type: media_type.unwrap_or_else(|| pier_oci::media_type::OCI_INDEX.to_string()),
            digest_header: None,
        })
    }

    /// HEAD a manifest: its digest, type and size, without counting as a pull on Docker Hub.
    pub async fn head_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
        accept: &str,
    ) -> Result<ManifestHead, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, accept_value(accept));
        let resp = self
            .send("manifest_head", Method::HEAD, url, repo, headers)
            .await?;
        check_status(resp.status(), resp.headers())?;
        let digest = header_digest(resp.headers()).ok_or_else(|| {
            UpstreamError::Invalid("manifest HEAD without Docker-Content-Digest".into())
        })?;
        Ok(ManifestHead {
            digest,
            media_type: content_type(resp.headers()),
            size: content_length(resp.headers()),
        })
    }

    /// GET a blob from byte `offset` on (Range when > 0); redirects are followed.
    pub async fn get_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobResponse, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                .map_err(|e| UpstreamError::Invalid(e.to_string()))?;
            headers.insert(header::RANGE, range);
        }
        let resp = self.send("blob", Method::GET, url, repo, headers).await?;
        check_status(resp.status(), resp.headers())?;
        let (start, total) = if resp.status() == StatusCode::PARTIAL_CONTENT {
            parse_content_range(resp.headers())
                .ok_or_else(|| UpstreamError::Invalid("206 without a valid Content-Range".into()))?
        } else {
            (0, resp.content_length())
        };
        let received = self.metrics.upstream_bytes.with_label_values(&[&self.name]);
        let body = resp
            .bytes_stream()
            .map_err(UpstreamError::from_reqwest)
            .inspect_ok(move |chunk| received.inc_by(chunk.len() as u64))
            .boxed();
        Ok(BlobResponse { start, total, body })
    }

    /// HEAD a blob: its size, without downloading it.
    pub async fn head_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Option<u64>, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let resp = self
            .send("blob_head", Method::HEAD, url, repo, HeaderMap::new())
            .await?;
        check_status(resp.status(), resp.headers())?;
        Ok(content_length(resp.headers()))
    }

    /// GET one page of a repository's tag list: the first (`page` = `None`), or the one a
    /// previous page's `Link: <...>; rel="next"` named. Returns the JSON body and the next page's
    /// target, if any. A `Link` that leaves this upstream's repository tag list is refused: pier
    /// only ever talks to what it was configured with.
    pub async fn tags_list(
        &self,
        repo: &RepositoryName,
        page: Option<&str>,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let first = self.url(&format!("/v2/{repo}/tags/list"))?;
        let url = match page {
            None => first,
            Some(target) => {
                let next = first
                    .join(target)
                    .map_err(|e| UpstreamError::Invalid(format!("tag list Link: {e}")))?;
                if next.origin() != first.origin() || next.path() != first.path() {
                    return Err(UpstreamError::Invalid(
                        "tag list Link points outside the repository's tag list".into(),
                    ));
                }
                next
            }
        };
        let mut resp = self
            .send("tags", Method::GET, url, repo, HeaderMap::new())
            .await?;
        check_status(resp.status(), resp.headers())?;
        let next = next_link(resp.headers());
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::Invalid("tag list larger than 4 MiB".into()));
            }
            body.extend_from_slice(&chunk);
            self.received(chunk.len());
        }
        Ok((body.freeze(), next))
    }

    fn url(&self, path: &str) -> Result<Url, UpstreamError> {
        Url::parse(&format!("{}{path}", self.base))
            .map_err(|e| UpstreamError::Invalid(e.to_string()))
    }

    /// Sends a request (answering one auth challenge if the upstream makes one), and notes what
    /// the answer says about the upstream's health and rate limit.
    async fn send(
        &self,
        kind: &'static str,
        method: Method,
        url: Url,
        repo: &RepositoryName,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let started = Instant::now();
        let result = self.send_authenticated(method, url, repo, headers).await;
        self.metrics
            .upstream_duration
            .with_label_values(&[&self.name, kind])
            .observe(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(r) => outcome(r.status()),
            Err(_) => "error",
        };
        self.metrics
            .upstream_requests
            .with_label_values(&[&self.name, kind, outcome])
            .inc();
        let health = match &result {
            Ok(resp) if resp.status().is_server_error() => {
                Err(UpstreamError::Status(resp.status().as_u16()))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e.clone()),
        };
        self.health.observe(&health);
        if let Some(remaining) = result
            .as_ref()
            .ok()
            .and_then(|r| rate_limit_remaining(r.headers()))
        {
            self.health.note_rate_limit(remaining);
        }
        result
    }

    /// Counts body bytes received from this upstream.
    fn received(&self, bytes: usize) {
        self.metrics
            .upstream_bytes
            .with_label_values(&[&self.name])
            .inc_by(bytes as u64);
    }

    /// Sends a request with what the auth session says to send; on a 401, lets the session answer
    /// the challenge and retries once. A second 401 is the upstream's final word.
    async fn send_authenticated(
        &self,
        method: Method,
        url: Url,
        repo: &RepositoryName,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let first = self.auth.up_front(repo).await?;
        let resp = self
            .send_once(method.clone(), url.clone(), headers.clone(), first.as_ref())
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        match self
            .auth
            .answer(resp.headers(), repo, first.as_ref())
            .await?
        {
            Some(retry) => self.send_once(method, url, headers, Some(&retry)).await,
            None => Ok(resp),
        }
    }

    async fn send_once(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
        auth: Option<&Authorization>,
    ) -> Result<Response, UpstreamError> {
        let mut req = self.http.request(method, url).headers(headers);
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a.header_value().clone());
        }
        req.send().await.map_err(UpstreamError::from_reqwest)
    }
}

/// An HTTP client as pier talks to upstreams: its user agent, these timeouts, the platform's
/// roots and the certificates of `ca_file`, if any.
pub(crate) fn http_client(
    connect_timeout: Duration,
    read_timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::Client, SetupError> {
    http_client_builder(connect_timeout, read_timeout, ca_file)?
        .build()
        .map_err(|e| SetupError::Client(e.to_string()))
}

/// [`http_client`]'s settings, for a client that needs one more.
pub(crate) fn http_client_builder(
    connect_timeout: Duration,
    read_timeout: Duration,
    ca_file: Option<&std::path::Path>,
) -> Result<reqwest::ClientBuilder, SetupError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .read_timeout(read_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tls_built_in_root_certs(true);
    if let Some(ca) = ca_file {
        let ca_error = |message: String| SetupError::CaFile {
            path: ca.to_path_buf(),
            message,
        };
        let pem = std::fs::read(ca).map_err(|e| ca_error(e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| ca_error(format!("not PEM certificates: {e}")))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// The `outcome` label of an upstream answer.
pub(crate) fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        404 => "not_found",
        401 | 403 => "unauthorized",
        429 => "rate_limited",
        500..=599 => "server_error",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TransportKind;

    fn upstream(url: String) -> Upstream {
        let config = UpstreamConfig {
            name: "test".into(),
            url,
            credentials: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_millis(200),
        };
        Upstream::new(config, Arc::new(Metrics::new())).unwrap()
    }

    fn blob() -> (RepositoryName, Digest) {
        (
            RepositoryName::parse("library/app").unwrap(),
            Digest::sha256_of(b"x"),
        )
    }

    #[tokio::test]
    async fn a_silent_upstream_fails_as_a_timeout() {
        // Accepts connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                open.push(conn);
            }
        });
        let up = upstream(format!("http://{addr}"));
        let (repo, digest) = blob();
        let e = up.head_blob(&repo, &digest).await.unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Transport(t) if t.kind == TransportKind::Timeout),
            "{e:?}"
        );
        assert!(e.is_timeout() && e.is_outage() && e.is_retryable());
        assert!(up.in_outage());
        server.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure_not_a_timeout() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // The listener is gone: nothing listens on addr any more.
        let up = upstream(format!("http://{addr}"));
        let (repo, digest) = blob();
        let e = up.head_blob(&repo, &digest).await.unwrap_err();
        assert!(
            matches!(&e, UpstreamError::Transport(t) if t.kind == TransportKind::Connect),
            "{e:?}"
        );
        assert!(!e.is_timeout() && e.is_outage() && e.is_retryable());
        assert!(up.in_outage());
    }

    #[test]
    fn urls_with_credentials_or_other_schemes_are_refused() {
        let config = |url: &str| UpstreamConfig {
            name: "test".into(),
            url: url.into(),
            credentials: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
        };
        let metrics = Arc::new(Metrics::new());
        for bad in ["ftp://x", "http://u:p@x", "not a url"] {
            assert!(
                Upstream::new(config(bad), metrics.clone()).is_err(),
                "{bad}"
            );
        }
        assert!(Upstream::new(config("https://registry.example/"), metrics).is_ok());
    }
}
