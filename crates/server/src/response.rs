//! Response bodies and the registry's JSON errors.

use std::io;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::TryStreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use pier_cache::FillError;
use pier_oci::{Digest, ErrorCode, RegistryError};
use pier_upstream::UpstreamError;

/// The body of every response pier sends. A stream that ends in an error makes hyper close the
/// connection before the announced `Content-Length`, so a client never takes a cut body as whole.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
pub const API_VERSION: &str = "registry/2.0";
const API_VERSION_NAME: HeaderName = HeaderName::from_static(API_VERSION_HEADER);
/// The digest of a manifest or blob answered.
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// Headers an answer of pier's carries at most, with the `Date` hyper adds: the header map of a
/// hot answer is made this large once instead of growing.
const HEADERS_PER_ANSWER: usize = 10;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn stream(s: BoxStream<'static, io::Result<Bytes>>) -> Body {
    StreamBody::new(s.map_ok(Frame::data)).boxed_unsync()
}

/// A response with the API version header every registry response carries.
pub fn builder(status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(API_VERSION_NAME, HeaderValue::from_static(API_VERSION))
}

/// A response with the API version header, for the answers made per request (manifests,
/// blobs): their headers are set on it directly, with names made once, instead of through a
/// builder that parses each name.
pub fn answer(status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let mut headers = HeaderMap::with_capacity(HEADERS_PER_ANSWER);
    headers.insert(API_VERSION_NAME, HeaderValue::from_static(API_VERSION));
    *resp.headers_mut() = headers;
    resp
}

/// `Docker-Content-Digest` and the `ETag` (the digest, quoted) of an answer for `digest`.
pub fn set_digest(headers: &mut HeaderMap, digest: &Digest) {
    let text = digest.as_str();
    // A digest is lower-case hex after an algorithm name: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(text) {
        headers.insert(DOCKER_CONTENT_DIGEST, v);
    }
    let mut etag = String::with_capacity(text.len() + 2);
    etag.push('"');
    etag.push_str(text);
    etag.push('"');
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(etag)) {
        headers.insert(header::ETAG, v);
    }
}

/// A JSON document as a 200 response (no body for HEAD).
pub fn json(body: impl Into<Bytes>, head: bool) -> Response<Body> {
    let body: Bytes = body.into();
    built(
        builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .body(if head { empty() } else { full(body) }),
        head,
    )
}

/// The response a builder made, or, when it refused a part (a header value that is not valid),
/// a 500 with the registry error body: never a 200 with a body that is not the answer.
pub fn built(response: http::Result<Response<Body>>, head: bool) -> Response<Body> {
    response.unwrap_or_else(|e| unbuildable(&e, head))
}

/// The 500 for an answer pier could not build (`why`: the header value it refused).
pub fn unbuildable(why: &dyn std::fmt::Display, head: bool) -> Response<Body> {
    tracing::error!(error = %why, "could not build a response");
    error(
        &RegistryError::new(ErrorCode::Unknown, "pier could not build the response")
            .with_status(500),
        head,
    )
}

/// A registry error as a response (no body for HEAD, as HTTP wants).
pub fn error(e: &RegistryError, head: bool) -> Response<Body> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let json = e.to_json();
    let mut b = builder(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, json.len());
    if let Some(secs) = e.retry_after {
        b = b.header(header::RETRY_AFTER, secs);
    }
    if e.status == 405 {
        b = b.header(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    let body = if head { empty() } else { full(json.clone()) };
    b.body(body).unwrap_or_else(|_| {
        // Only a retry-after or status pier made up could fail here: answer a plain 500.
        let mut r = Response::new(if head { empty() } else { full(json) });
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// What to tell a client when the upstream failed; `missing` is the code for "not there".
pub fn from_upstream(e: &UpstreamError, missing: ErrorCode) -> RegistryError {
    match e {
        UpstreamError::NotFound => RegistryError::new(missing, "not found upstream"),
        UpstreamError::Unauthorized(m) => {
            RegistryError::new(ErrorCode::Denied, format!("upstream refused access: {m}"))
        }
        UpstreamError::RateLimited { retry_after } => RegistryError::new(
            ErrorCode::TooManyRequests,
            "upstream rate limit reached and nothing cached",
        )
        .with_retry_after(*retry_after),
        UpstreamError::Transport(t) if t.is_timeout() => {
            RegistryError::new(ErrorCode::Unavailable, e.to_string()).with_status(504)
        }
        UpstreamError::Transport(_)
        | UpstreamError::Status(_)
        | UpstreamError::Invalid(_)
        | UpstreamError::InsecureRealm { .. } => {
            RegistryError::new(ErrorCode::Unavailable, e.to_string())
        }
    }
}

/// What to tell a client when the cache could not answer; `missing` is the code for "not there".
pub fn from_cache(e: &pier_cache::Error, missing: ErrorCode) -> RegistryError {
    match e {
        pier_cache::Error::NotFound => RegistryError::new(missing, "not found in this repository"),
        pier_cache::Error::Upstream(u) => from_upstream(u, missing),
        pier_cache::Error::Fill(f) => from_fill(f),
        pier_cache::Error::Io(io) if io.kind() == io::ErrorKind::StorageFull => {
            RegistryError::new(ErrorCode::Unknown, format!("cache disk full: {io}"))
                .with_status(507)
        }
        pier_cache::Error::Io(io) => {
            RegistryError::new(ErrorCode::Unknown, format!("cache I/O error: {io}"))
                .with_status(500)
        }
        pier_cache::Error::Internal(m) => {
            RegistryError::new(ErrorCode::Unknown, *m).with_status(500)
        }
    }
}

/// What to tell a client when a fill failed before its first byte.
pub fn from_fill(e: &FillError) -> RegistryError {
    match e {
        FillError::Upstream(u) => from_upstream(u, ErrorCode::BlobUnknown),
        FillError::DigestMismatch { .. } | FillError::SizeMismatch { .. } => RegistryError::new(
            ErrorCode::Unavailable,
            format!("upstream sent a bad blob: {e}"),
        ),
        FillError::Io(_) | FillError::Panicked => {
            RegistryError::new(ErrorCode::Unknown, e.to_string()).with_status(500)
        }
        FillError::Busy => {
            RegistryError::new(ErrorCode::TooManyRequests, e.to_string()).with_retry_after(Some(1))
        }
    }
}

/// A local I/O failure.
pub fn from_io(e: &io::Error) -> RegistryError {
    RegistryError::new(ErrorCode::Unknown, format!("cache I/O error: {e}")).with_status(500)
}

/// What to tell a client whose push to a hosted repository was refused; `missing` is the code
/// for "not there".
pub fn from_push(e: &pier_cache::PushError, missing: ErrorCode) -> RegistryError {
    use pier_cache::PushError as P;
    match e {
        P::UploadUnknown => RegistryError::new(ErrorCode::BlobUploadUnknown, e.to_string()),
        // 416 Range Not Satisfiable: the chunk does not fit where, or as long as, it said.
        P::OutOfOrder { .. } | P::ChunkLength { .. } => {
            RegistryError::new(ErrorCode::RangeInvalid, e.to_string())
        }
        P::UnsizedRange { .. } | P::Body(_) => {
            RegistryError::new(ErrorCode::BlobUploadInvalid, e.to_string())
        }
        P::DigestMismatch(_) | P::ManifestDigest(_) => {
            RegistryError::new(ErrorCode::DigestInvalid, e.to_string())
        }
        // Not a permission, but nothing the client can do here either: no retry helps.
        P::Budget { .. } => RegistryError::new(ErrorCode::Denied, e.to_string()),
        P::BlobUnknown(_) => RegistryError::new(ErrorCode::ManifestBlobUnknown, e.to_string()),
        // 429: a slot frees when a session finishes, is cancelled or expires.
        P::TooManyUploads { .. } => RegistryError::new(ErrorCode::TooManyRequests, e.to_string()),
        P::ManifestInvalid(_) => RegistryError::new(ErrorCode::ManifestInvalid, e.to_string()),
        P::NotFound => RegistryError::new(missing, e.to_string()),
        P::Io(io) if io.kind() == io::ErrorKind::StorageFull => {
            RegistryError::new(ErrorCode::Unknown, format!("cache disk full: {io}"))
                .with_status(507)
        }
        P::Io(io) => RegistryError::new(ErrorCode::Unknown, format!("cache I/O error: {io}"))
            .with_status(500),
    }
}
