//! [`Upstream`]: the requests pier makes to one registry.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use pier_metrics::Metrics;
use pier_oci::{Digest, Reference, RepositoryName};
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Response, StatusCode, Url};

use crate::auth::{Challenge, TokenCache, TokenResponse};
use crate::error::UpstreamError;

/// Largest manifest accepted from an upstream (the limit Distribution and containerd use).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Username and password for an upstream. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

/// How to reach one upstream registry.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The registry host clients know it by (`docker.io`, `ghcr.io`); used in logs.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io` or `http://10.0.0.5:5000`.
    pub url: String,
    pub credentials: Option<Credentials>,
    /// A PEM file of extra CA certificates, trusted besides the platform's roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for any read (headers or the next body bytes) once connected.
    pub read_timeout: Duration,
}

/// A manifest as the upstream served it: bytes untouched, so its digest is the upstream's.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    /// `Docker-Content-Digest`, when the upstream sent a valid one.
    pub digest_header: Option<Digest>,
}

/// What a manifest HEAD tells without the body.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    pub digest: Digest,
    pub media_type: Option<String>,
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
    pub body: BlobBody,
}

/// A client for one upstream registry. Cheap to share behind an `Arc`; connections are pooled.
pub struct Upstream {
    name: String,
    base: String,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    tokens: TokenCache,
    /// The scheme this upstream challenged with last, so the next request authenticates up front
    /// instead of collecting a 401 first.
    scheme: Mutex<Option<Challenge>>,
    /// Docker Hub's `ratelimit-remaining` as last seen; `u64::MAX` until seen.
    rate_limit_remaining: AtomicU64,
    /// Set when a request failed for want of the upstream (unreachable, timeout, 5xx); cleared by
    /// the next answer. While set, cached tags are served without first waiting on the upstream.
    outage_until: Mutex<Option<Instant>>,
    metrics: Arc<Metrics>,
}

/// How long an upstream counts as down after a failed request, unless it answers sooner.
pub const OUTAGE_HOLD: Duration = Duration::from_secs(10);

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
    pub fn new(config: UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, String> {
        let url =
            Url::parse(&config.url).map_err(|e| format!("invalid URL {:?}: {e}", config.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "URL {:?} must be http:// or https:// with a host",
                config.url
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("put credentials in username/password, not in the URL".into());
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tls_built_in_root_certs(true);
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("CA file {} is not PEM certificates: {e}", ca.display()))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot build HTTP client: {e}"))?;
        Ok(Upstream {
            name: config.name,
            base: config.url.trim_end_matches('/').to_string(),
            credentials: config.credentials,
            http,
            tokens: TokenCache::default(),
            scheme: Mutex::new(None),
            rate_limit_remaining: AtomicU64::new(u64::MAX),
            outage_until: Mutex::new(None),
            metrics,
        })
    }

    /// The pull budget the upstream reported last (`ratelimit-remaining`), if it ever did.
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        Some(self.rate_limit_remaining.load(Ordering::Relaxed)).filter(|r| *r != u64::MAX)
    }

    /// Whether a request failed for want of the upstream within the last [`OUTAGE_HOLD`], with no
    /// answer since.
    pub fn in_outage(&self) -> bool {
        let until = *self.outage_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// Records how a request to the upstream went, for [`Upstream::in_outage`].
    fn observe<T>(&self, result: &Result<T, UpstreamError>) {
        let outage = matches!(result, Err(e) if e.is_retryable());
        let mut until = self.outage_until.lock().unwrap_or_else(|p| p.into_inner());
        if outage {
            if until.is_none() {
                tracing::warn!(upstream = %self.name, "upstream unavailable");
            }
            *until = Some(Instant::now() + OUTAGE_HOLD);
        } else if until.take().is_some() {
            tracing::info!(upstream = %self.name, "upstream answering again");
        }
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
        check_status(&resp)?;
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
        check_status(&resp)?;
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
        check_status(&resp)?;
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
        check_status(&resp)?;
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
        check_status(&resp)?;
        Ok(content_length(resp.headers()))
    }

    /// GET the tag list, with the client's `n` and `last` passed on. Returns the JSON body and
    /// the `Link` header for the next page, if any.
    pub async fn tags_list(
        &self,
        repo: &RepositoryName,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<(Bytes, Option<String>), UpstreamError> {
        let mut url = self.url(&format!("/v2/{repo}/tags/list"))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(n) = n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(last) = last {
                q.append_pair("last", last);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let mut resp = self
            .send("tags", Method::GET, url, repo, HeaderMap::new())
            .await?;
        check_status(&resp)?;
        let link = resp
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(UpstreamError::from_reqwest)? {
            if body.len() + chunk.len() > MAX_MANIFEST_BYTES {
                return Err(UpstreamError::Invalid("tag list larger than 4 MiB".into()));
            }
            body.extend_from_slice(&chunk);
            self.received(chunk.len());
        }
        Ok((body.freeze(), link))
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
        self.observe(&health);
        if let Some(remaining) = result
            .as_ref()
            .ok()
            .and_then(|r| rate_limit_remaining(r.headers()))
        {
            self.rate_limit_remaining
                .store(remaining, Ordering::Relaxed);
            self.metrics
                .rate_limit_remaining
                .with_label_values(&[&self.name])
                .set(i64::try_from(remaining).unwrap_or(i64::MAX));
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

    async fn send_authenticated(
        &self,
        method: Method,
        url: Url,
        repo: &RepositoryName,
        headers: HeaderMap,
    ) -> Result<Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let known = self
            .scheme
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut auth = match known {
            Some(challenge) => self.authorization(&challenge, &scope).await?,
            None => None,
        };
        let mut answered = false;
        loop {
            let mut req = self
                .http
                .request(method.clone(), url.clone())
                .headers(headers.clone());
            if let Some(a) = &auth {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let resp = req.send().await.map_err(UpstreamError::from_reqwest)?;
            if resp.status() != StatusCode::UNAUTHORIZED || answered {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse)
                .ok_or_else(|| {
                    UpstreamError::Unauthorized("401 without a usable challenge".into())
                })?;
            auth = self.authorization(&challenge, &scope).await?;
            if auth.is_none() {
                return Err(UpstreamError::Unauthorized(
                    "upstream asks for credentials and none are configured".into(),
                ));
            }
            *self.scheme.lock().unwrap_or_else(|p| p.into_inner()) = Some(challenge);
            answered = true;
        }
    }

    /// The `Authorization` value answering `challenge` for `scope`: a cached or new token, or Basic.
    async fn authorization(
        &self,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        match challenge {
            Challenge::Basic => Ok(self.credentials.as_ref().map(basic)),
            Challenge::Bearer { realm, service, .. } => {
                let token = match self.tokens.get(scope) {
                    Some(t) => t,
                    None => self.fetch_token(realm, service.as_deref(), scope).await?,
                };
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .map(Some)
                    .map_err(|_| {
                        UpstreamError::Invalid("token endpoint returned an unusable token".into())
                    })
            }
        }
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let result = self.request_token(realm, service, scope).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .token_fetches
            .with_label_values(&[&self.name, outcome])
            .inc();
        if let Err(e) = &result {
            tracing::warn!(upstream = %self.name, error = %e, "token fetch failed");
        }
        result
    }

    async fn request_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, UpstreamError> {
        let mut url = Url::parse(realm)
            .map_err(|_| UpstreamError::Invalid("challenge realm is not a URL".into()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(UpstreamError::Invalid(
                "challenge realm is not http(s)".into(),
            ));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url);
        if let Some(c) = &self.credentials {
            req = req.header(header::AUTHORIZATION, basic(c));
        }
        let resp = req.send().await.map_err(UpstreamError::from_reqwest)?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(UpstreamError::Unauthorized(format!(
                    "token endpoint answered {}",
                    resp.status().as_u16()
                )))
            }
            _ => check_status(&resp).map(|_| ())?,
        }
        let body: TokenResponse = resp.json().await.map_err(|_| {
            UpstreamError::Invalid("token endpoint answered something other than token JSON".into())
        })?;
        let token = body
            .token
            .or(body.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                UpstreamError::Invalid("token endpoint answered without a token".into())
            })?;
        // The spec's default lifetime is 60 s when expires_in is missing.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(1));
        self.tokens.put(scope, token.clone(), lifetime);
        tracing::debug!(upstream = %self.name, scope, "fetched upstream token");
        Ok(token)
    }
}

fn basic(c: &Credentials) -> HeaderValue {
    use base64_lite::encode;
    let mut v = HeaderValue::from_str(&format!(
        "Basic {}",
        encode(format!("{}:{}", c.username, c.password).as_bytes())
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    v.set_sensitive(true);
    v
}

/// Minimal standard base64, for the Basic header.
mod base64_lite {
    pub fn encode(input: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn encodes() {
        assert_eq!(encode(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(encode(b"a"), "YQ==");
        assert_eq!(encode(b"ab"), "YWI=");
        assert_eq!(encode(b""), "");
    }
}

fn accept_value(accept: &str) -> HeaderValue {
    let accept = pier_oci::media_type::upstream_accept(accept);
    HeaderValue::from_str(accept)
        .unwrap_or_else(|_| HeaderValue::from_static(pier_oci::media_type::DEFAULT_ACCEPT))
}

/// The `outcome` label of an upstream answer.
fn outcome(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "ok",
        404 => "not_found",
        401 | 403 => "unauthorized",
        429 => "rate_limited",
        500..=599 => "server_error",
        _ => "other",
    }
}

fn check_status(resp: &Response) -> Result<(), UpstreamError> {
    match resp.status() {
        s if s.is_success() => Ok(()),
        StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(UpstreamError::Unauthorized(
            format!("HTTP {}", resp.status().as_u16()),
        )),
        StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::RateLimited {
            retry_after: resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
        }),
        s => Err(UpstreamError::Status(s.as_u16())),
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let t = v.split(';').next()?.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Docker Hub's `ratelimit-remaining: 76;w=21600` → 76.
fn rate_limit_remaining(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get("ratelimit-remaining")?.to_str().ok()?;
    v.split(';').next()?.trim().parse().ok()
}

/// The `Content-Length` header itself: reqwest's `content_length()` reports the (empty) body of
/// a HEAD response, not the header.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes start-end/total` → (start, total).
fn parse_content_range(headers: &HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, total) = spec.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/1000"),
        );
        assert_eq!(parse_content_range(&h), Some((100, Some(1000))));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 5-9/*"),
        );
        assert_eq!(parse_content_range(&h), Some((5, None)));
        h.insert(header::CONTENT_RANGE, HeaderValue::from_static("garbage"));
        assert_eq!(parse_content_range(&h), None);
    }

    #[test]
    fn rate_limit_header() {
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_remaining(&h), None);
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from_static("76;w=21600"),
        );
        assert_eq!(rate_limit_remaining(&h), Some(76));
    }

    #[test]
    fn credentials_debug_is_redacted() {
        let c = Credentials {
            username: "u".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
