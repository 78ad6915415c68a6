//! The pull API: `/v2/`, manifests, blobs, tag lists, the catalog, and Docker's `/v1/_ping`
//! (its search, `/v1/search`, is the `search` module's). Each handler routes the request, asks
//! the cache (which resolves, looks up tiers and fills), and answers.

use std::net::IpAddr;
use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use pier_cache::{CachedManifest, Source};
use pier_oci::path::PathError;
use pier_oci::reference::ReferenceError;
use pier_oci::{
    AcceptSet, ByteRange, Digest, Endpoint, ErrorCode, Query, RangeError, Reference, RegistryError,
    RepositoryName, Tag,
};

use crate::auth::{Action, Auth, Identity};
use crate::response::{self, Body};
use crate::routing::{Route, Target};
use crate::sendfile::FileRegion;
use crate::{hosted, Mirror};

/// Who is asking, for what pier lists: per-user rules apply to listings as they do to pulls
/// (the gate in front of the handlers already applied them to the repository of a request).
pub enum Caller<'a> {
    /// Client authentication is off: anyone may pull what the upstreams' lists allow.
    Anyone,
    /// A client under the authentication rules (anonymous, when anonymous pulls are on).
    Identified { auth: &'a Auth, who: Identity },
}

impl Caller<'_> {
    /// Whether the caller may pull `repository` of `registry`.
    pub fn may_pull(&self, registry: &str, repository: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Identified { auth, who } => auth.may_pull(who, registry, repository),
        }
    }

    /// Whether the caller may do `action` to `target`: the one decision on access to hosted
    /// repositories. Pulls follow the rules as for mirrored repositories (hosted names without
    /// a registry); push and delete need a user whose rules grant them, or, for anonymous
    /// clients (everyone, with client authentication off), `allow_anonymous_push`. Mirrored
    /// repositories take no writes.
    pub fn may(&self, mirror: &Mirror, action: Action, target: &Target<'_>) -> bool {
        match target {
            Target::Mirrored(route) => {
                action == Action::Pull && self.may_pull(&route.upstream.name, route.repo.as_str())
            }
            Target::Hosted(repo) => match (self, action) {
                (Caller::Anyone, Action::Pull) => true,
                (Caller::Anyone, _) => mirror.hosted.allow_anonymous_push,
                (Caller::Identified { auth, who }, Action::Pull) => {
                    auth.may(who, Action::Pull, repo.as_str())
                }
                (
                    Caller::Identified {
                        who: Identity::Anonymous,
                        ..
                    },
                    _,
                ) => mirror.hosted.allow_anonymous_push,
                (Caller::Identified { auth, who }, action) => auth.may(who, action, repo.as_str()),
            },
        }
    }
}

/// What an answer was and where it came from, attached to the response for the access log and
/// the metrics.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// `manifest`, `blob` or `tags`.
    pub kind: &'static str,
    pub source: Source,
    /// The upstream that was asked, if one was.
    pub upstream: Option<Arc<str>>,
}

pub(crate) type Answer = Result<Response<Body>, RegistryError>;

/// Answers one request of `caller` (whom the gate let through), sent from `client`.
pub async fn handle<B>(
    mirror: &Mirror,
    req: Request<B>,
    caller: &Caller<'_>,
    client: IpAddr,
) -> Response<Body>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let head = req.method() == Method::HEAD;
    match dispatch(mirror, req, caller, client, head).await {
        Ok(resp) => resp,
        Err(e) => response::error(&e, head),
    }
}

async fn dispatch<B>(
    mirror: &Mirror,
    req: Request<B>,
    caller: &Caller<'_>,
    client: IpAddr,
    head: bool,
) -> Answer
where
    B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    // Docker's search, on the registry API of old.
    if let Some(v1) = req.uri().path().strip_prefix("/v1/") {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Err(RegistryError::new(
                ErrorCode::Unsupported,
                "the v1 API takes only GET /v1/_ping and GET /v1/search",
            ));
        }
        return match v1 {
            "_ping" => Ok(v1_ping(head)),
            "search" => crate::search::search(mirror, caller, req.uri().query(), head).await,
            _ => Err(path_error(PathError::NotFound)),
        };
    }
    let endpoint = Endpoint::parse(req.uri().path()).map_err(path_error)?;
    let query = req.uri().query();
    // Hosted repositories take pushes and deletes; everything else is a read-only mirror.
    let target = match &endpoint {
        Endpoint::Manifest { name, .. }
        | Endpoint::Blob { name, .. }
        | Endpoint::Referrers { name, .. }
        | Endpoint::TagsList { name }
        | Endpoint::Upload { name, .. } => match mirror.target(name, query) {
            Ok(target) => Some(target),
            // A write to a name that routes nowhere is still a write to a read-only mirror.
            Err(e) if head || *req.method() == Method::GET || mirror.hosted.contains(name) => {
                return Err(e)
            }
            Err(_) => None,
        },
        Endpoint::Base | Endpoint::Catalog => None,
    };
    let route = match target {
        Some(Target::Hosted(repo)) => {
            let action = Action::of(&req);
            if !caller.may(mirror, action, &Target::Hosted(repo.clone())) {
                return Err(hosted::refused(caller, action, &repo));
            }
            return hosted::dispatch(mirror, req, caller, client, endpoint, repo, head).await;
        }
        Some(Target::Mirrored(route)) => Some(route),
        None => None,
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            "pier is a read-only mirror: push and delete are not supported",
        ));
    }
    // Every GET of a repository's endpoint was routed above, or refused.
    let routed = || route.ok_or_else(|| path_error(PathError::NotFound));
    match endpoint {
        Endpoint::Base => Ok(response::json("{}", head)),
        Endpoint::Catalog => catalog(mirror, caller, query, head).await,
        Endpoint::Upload { .. } => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "pier is a read-only mirror: push is not supported",
        )),
        Endpoint::Manifest { reference, .. } => {
            let accept = AcceptSet::from_header(&accept(req.headers()));
            manifest(mirror, &routed()?, &reference, accept, head).await
        }
        Endpoint::Blob { digest, .. } => {
            blob(mirror, &routed()?, &digest, req.headers(), head).await
        }
        Endpoint::Referrers { digest, .. } => {
            referrers(mirror, &routed()?, &digest, query, head).await
        }
        Endpoint::TagsList { .. } => {
            tags_list(mirror, &routed()?, req.uri().path(), query, head).await
        }
    }
}

pub(crate) fn path_error(e: PathError) -> RegistryError {
    match e {
        PathError::NotFound => {
            RegistryError::new(ErrorCode::Unsupported, "no such registry API endpoint")
                .with_status(404)
        }
        PathError::TooLong => RegistryError::new(ErrorCode::NameInvalid, "request path too long"),
        PathError::BadDigest(e) | PathError::BadReference(ReferenceError::Digest(e)) => {
            RegistryError::new(ErrorCode::DigestInvalid, format!("invalid digest: {e}"))
        }
        PathError::BadReference(e @ ReferenceError::Tag) => RegistryError::new(
            ErrorCode::ManifestInvalid,
            format!("invalid reference: {e}"),
        ),
        PathError::BadSession => {
            RegistryError::new(ErrorCode::BlobUploadUnknown, "no such upload session")
        }
    }
}

/// All `Accept` headers of the request as one list (Docker sends several; most clients one).
fn accept(headers: &HeaderMap) -> std::borrow::Cow<'_, str> {
    let mut all = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    match (all.next(), all.next()) {
        (None, _) => "".into(),
        (Some(one), None) => one.into(),
        (Some(first), Some(second)) => {
            let mut joined = [first, second].join(", ");
            for more in all {
                joined.push_str(", ");
                joined.push_str(more);
            }
            joined.into()
        }
    }
}

/// Response header telling where the answer came from: memory, disk, upstream, upstream-joined.
pub const CACHE_HEADER: &str = "x-pier-cache";

pub(crate) fn with_outcome(
    mut resp: Response<Body>,
    kind: &'static str,
    source: Source,
    upstream: Arc<str>,
) -> Response<Body> {
    let upstream = matches!(source, Source::Upstream { .. }).then_some(upstream);
    resp.headers_mut().insert(
        CACHE_HEADER,
        http::HeaderValue::from_static(source.as_str()),
    );
    resp.extensions_mut().insert(Outcome {
        kind,
        source,
        upstream,
    });
    resp
}

// ---- manifests ----

/// A manifest by tag or digest, as the cache resolves it for the client's accept set.
pub(crate) async fn manifest(
    mirror: &Mirror,
    route: &Route<'_>,
    reference: &Reference,
    accept: AcceptSet,
    head: bool,
) -> Answer {
    let m = mirror
        .cache
        .resolve_manifest(route.at(), reference, accept)
        .await
        .map_err(|e| response::from_cache(&e, ErrorCode::ManifestUnknown))?;
    Ok(manifest_response(
        &m.digest,
        &m.manifest,
        m.source,
        route.upstream.name.clone(),
        head,
    ))
}

/// The referrers of a digest (OCI 1.1), as the cache resolves them, filtered by `artifactType`
/// when asked (`OCI-Filters-Applied` then says so).
async fn referrers(
    mirror: &Mirror,
    route: &Route<'_>,
    digest: &Digest,
    query: Option<&str>,
    head: bool,
) -> Answer {
    let m = mirror
        .cache
        .referrers(route.at(), digest)
        .await
        .map_err(|e| response::from_cache(&e, ErrorCode::ManifestUnknown))?;
    let resp = referrers_response(m.manifest.bytes.clone(), query, head)?;
    Ok(with_outcome(
        resp,
        "manifest",
        m.source,
        route.upstream.name.clone(),
    ))
}

/// A referrers index as an answer, filtered by the query's `artifactType` when it names one
/// (`OCI-Filters-Applied` then says so).
pub(crate) fn referrers_response(index: bytes::Bytes, query: Option<&str>, head: bool) -> Answer {
    // A media type has no spaces: a `+` a client left unencoded (`...+json`) is itself, not a
    // form-encoded space.
    let query = query.map(|q| q.replace('+', "%2B"));
    let artifact_type = Query::parse_opt(query.as_deref())
        .get("artifactType")
        .map(str::to_string);
    let body = match &artifact_type {
        None => index,
        Some(wanted) => {
            let mut index: serde_json::Value = serde_json::from_slice(&index).map_err(|_| {
                RegistryError::new(ErrorCode::Unavailable, "referrers index is not JSON")
            })?;
            if let Some(list) = index.get_mut("manifests").and_then(|l| l.as_array_mut()) {
                list.retain(|d| d["artifactType"].as_str() == Some(wanted.as_str()));
            }
            bytes::Bytes::from(index.to_string())
        }
    };
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, pier_oci::media_type::OCI_INDEX)
        .header(header::CONTENT_LENGTH, body.len());
    if artifact_type.is_some() {
        b = b.header("oci-filters-applied", "artifactType");
    }
    Ok(response::built(
        b.body(if head {
            response::empty()
        } else {
            response::full(body)
        }),
        head,
    ))
}

pub(crate) fn manifest_response(
    digest: &Digest,
    m: &CachedManifest,
    source: Source,
    upstream: Arc<str>,
    head: bool,
) -> Response<Body> {
    // The media type came from the upstream: one that is no header value is a 500, never an
    // answer without its type.
    let media_type = match HeaderValue::from_str(&m.media_type) {
        Ok(v) => v,
        Err(e) => return response::unbuildable(&e, head),
    };
    let body = if head {
        response::empty()
    } else {
        response::full(m.bytes.clone())
    };
    let mut resp = response::answer(StatusCode::OK, body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, media_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
    response::set_digest(h, digest);
    with_outcome(resp, "manifest", source, upstream)
}

// ---- blobs ----

pub(crate) async fn blob(
    mirror: &Mirror,
    route: &Route<'_>,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Answer {
    let range = requested_range(headers)?;
    if head {
        // Known locally (cached or filling), or asked of the upstream without downloading.
        let (size, source) = mirror
            .cache
            .blob_head(route.at(), digest)
            .await
            .map_err(|e| response::from_cache(&e, ErrorCode::BlobUnknown))?;
        let resp = blob_head_response(digest, size);
        return Ok(with_outcome(
            resp,
            "blob",
            source,
            route.upstream.name.clone(),
        ));
    }
    let blob = mirror
        .cache
        .blob(route.at(), digest)
        .await
        .map_err(|e| response::from_cache(&e, ErrorCode::BlobUnknown))?;
    let source = blob.source;
    let resp = blob_response(digest, blob, range);
    Ok(with_outcome(
        resp,
        "blob",
        source,
        route.upstream.name.clone(),
    ))
}

/// The request's `Range`, if it sent one; 416 `RANGE_INVALID` when malformed.
pub(crate) fn requested_range(headers: &HeaderMap) -> Result<Option<ByteRange>, RegistryError> {
    match headers.get(header::RANGE) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map_err(|_| RangeError::Malformed)
            .and_then(ByteRange::parse)
            .map(Some)
            .map_err(range_error),
    }
}

/// A blob answer's status, body and headers, but for its length and range.
fn blob_answer(digest: &Digest, status: StatusCode, body: Body) -> Response<Body> {
    let mut resp = response::answer(status, body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response::set_digest(h, digest);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp
}

/// A HEAD answer for a blob of `size` bytes (when known).
pub(crate) fn blob_head_response(digest: &Digest, size: Option<u64>) -> Response<Body> {
    let mut resp = blob_answer(digest, StatusCode::OK, response::empty());
    if let Some(size) = size {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    resp
}

/// A blob's bytes, whole or the range asked for (206; 416 outside the blob). A complete file on
/// disk is also described as a [`FileRegion`], which a plain HTTP/1 connection sends with
/// `sendfile` instead of the streaming body.
pub(crate) fn blob_response(
    digest: &Digest,
    blob: pier_cache::Blob,
    range: Option<ByteRange>,
) -> Response<Body> {
    let (status, content_range, start, len) = match (range, blob.size) {
        (Some(range), Some(size)) => match range.resolve(size) {
            Ok((first, last)) => (
                StatusCode::PARTIAL_CONTENT,
                Some(format!("bytes {first}-{last}/{size}")),
                first,
                Some(last - first + 1),
            ),
            Err(_) => {
                let mut e = response::error(&range_error(RangeError::Unsatisfiable), false);
                if let Ok(v) = format!("bytes */{size}").parse() {
                    e.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return e;
            }
        },
        (_, size) => (StatusCode::OK, None, 0, size),
    };
    let region = blob.complete_file().zip(len).map(|(file, len)| FileRegion {
        file: file.clone(),
        start,
        len,
    });
    let body = response::stream(blob.stream(start, len.map(|len| start + len)));
    let mut resp = blob_answer(digest, status, body);
    let h = resp.headers_mut();
    if let Some(v) = content_range.and_then(|r| HeaderValue::from_maybe_shared(r).ok()) {
        h.insert(header::CONTENT_RANGE, v);
    }
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Some(region) = region {
        resp.extensions_mut().insert(region);
    }
    resp
}

pub(crate) fn range_error(e: RangeError) -> RegistryError {
    RegistryError::new(ErrorCode::RangeInvalid, e.to_string())
}

// ---- tag lists and catalog ----

/// `n` and `last` of a query string; `n` must be a number and `last` a tag (or, for the
/// catalog, a repository name), else 400.
pub(crate) fn page_params(
    query: &Query<'_>,
) -> Result<(Option<usize>, Option<String>), RegistryError> {
    let bad = |m: &str| RegistryError::new(ErrorCode::Unsupported, m).with_status(400);
    let n = query
        .get("n")
        .map(|v| {
            v.parse::<u32>()
                .map(|n| n as usize)
                .map_err(|_| bad("n must be a non-negative integer"))
        })
        .transpose()?;
    let last = query.get("last").map(str::to_string);
    if last.as_deref().is_some_and(|l| {
        l.len() > 512
            || !l
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
    }) {
        return Err(bad("last must be a tag or repository name"));
    }
    Ok((n, last))
}

/// One page of a sorted list: the names after `last`, at most `n` of them, and whether more
/// follow.
pub(crate) fn page<'a>(
    sorted: &'a [String],
    n: Option<usize>,
    last: Option<&str>,
) -> (&'a [String], bool) {
    let start = last.map_or(0, |l| sorted.partition_point(|t| t.as_str() <= l));
    let rest = &sorted[start..];
    match n {
        Some(n) if rest.len() > n => (&rest[..n], n > 0),
        _ => (rest, false),
    }
}

/// A JSON list page, with a `Link` to the next page when there is one.
pub(crate) fn list_response(
    body: String,
    next: Option<String>,
    kind: Option<(Source, Arc<str>)>,
    head: bool,
) -> Response<Body> {
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(next) = next {
        b = b.header(header::LINK, format!("<{next}>; rel=\"next\""));
    }
    let resp = response::built(
        b.body(if head {
            response::empty()
        } else {
            response::full(body)
        }),
        head,
    );
    match kind {
        Some((source, upstream)) => with_outcome(resp, "tags", source, upstream),
        None => resp,
    }
}

/// The upstream's tags, sorted and paged by pier (`n`, `last`, `Link`), so that paging works
/// whatever the upstream supports. Kept briefly and served stale while the upstream is down.
async fn tags_list(
    mirror: &Mirror,
    route: &Route<'_>,
    path: &str,
    query: Option<&str>,
    head: bool,
) -> Answer {
    let params = Query::parse_opt(query);
    let (n, last) = page_params(&params)?;
    if last.as_deref().is_some_and(|l| Tag::parse(l).is_none()) {
        return Err(
            RegistryError::new(ErrorCode::Unsupported, "last must be a tag").with_status(400),
        );
    }
    let (list, source) = mirror
        .cache
        .tag_list(route.at())
        .await
        .map_err(|e| response::from_cache(&e, ErrorCode::NameUnknown))?;
    let (tags, more) = page(&list.tags, n, last.as_deref());
    let next = match (more, tags.last(), n) {
        (true, Some(last), Some(n)) => {
            // The client's own path, and its `ns` when it routed by one.
            let mut next = form_urlencoded::Serializer::new(String::new());
            if let Some(ns) = params.get("ns") {
                next.append_pair("ns", ns);
            }
            next.append_pair("n", &n.to_string());
            next.append_pair("last", last);
            Some(format!("{path}?{}", next.finish()))
        }
        _ => None,
    };
    let body = serde_json::json!({ "name": route.repo.as_str(), "tags": tags }).to_string();
    Ok(list_response(
        body,
        next,
        Some((source, route.upstream.name.clone())),
        head,
    ))
}

/// The repositories pier holds that the caller may pull, named as clients name them: plain for
/// hosted repositories and the default upstream, `<registry>/<repository>` for the others.
async fn catalog(mirror: &Mirror, caller: &Caller<'_>, query: Option<&str>, head: bool) -> Answer {
    let (n, last) = page_params(&Query::parse_opt(query))?;
    let names = pullable_repositories(mirror, caller).await?;
    let (names, more) = page(&names, n, last.as_deref());
    let next = match (more, names.last(), n) {
        (true, Some(last), Some(n)) => Some(format!(
            "/v2/_catalog?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("n", &n.to_string())
                .append_pair("last", last)
                .finish()
        )),
        _ => None,
    };
    let body = serde_json::json!({ "repositories": names }).to_string();
    Ok(list_response(body, next, None, head))
}

/// `GET /v1/_ping`: what the Docker daemon asks before `docker search`. A standalone registry:
/// the daemon sends its credentials for the registry along.
pub(crate) fn v1_ping(head: bool) -> Response<Body> {
    let body = r#"{"standalone":true}"#;
    response::built(
        response::builder(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .header("x-docker-registry-standalone", "true")
            .body(if head {
                response::empty()
            } else {
                response::full(body)
            }),
        head,
    )
}

/// The repositories pier holds that the caller may pull, sorted, named as clients name them:
/// plain for hosted repositories and the default upstream, `<registry>/<repository>` for the
/// others.
pub(crate) async fn pullable_repositories(
    mirror: &Mirror,
    caller: &Caller<'_>,
) -> Result<Vec<String>, RegistryError> {
    let default = &mirror.upstreams[mirror.default_upstream].name;
    let mut names: Vec<String> = mirror
        .cache
        .repositories()
        .await
        .map_err(|e| response::from_io(&e))?
        .into_iter()
        .filter_map(|(upstream, repo)| {
            let name = RepositoryName::parse(&repo).ok()?;
            if upstream == pier_cache::HOSTED {
                // Still hosted by the configuration, and the caller may pull it.
                let target = Target::Hosted(name);
                return (mirror.hosted.contains(&repo)
                    && caller.may(mirror, Action::Pull, &target))
                .then_some(repo);
            }
            let u = mirror.upstream_named(&upstream)?;
            if !u.access.permits(&name) || !caller.may_pull(&upstream, &repo) {
                return None;
            }
            if *upstream == **default {
                // A mirrored name a hosted glob now claims is no longer served as mirrored.
                (!mirror.hosted.contains(&repo)).then_some(repo)
            } else {
                Some(format!("{upstream}/{repo}"))
            }
        })
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages() {
        let all: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(page(&all, Some(2), None), (&all[..2], true));
        assert_eq!(page(&all, Some(2), Some("b")), (&all[2..], false));
        assert_eq!(page(&all, None, Some("bb")), (&all[2..], false));
        assert_eq!(page(&all, Some(10), None), (&all[..], false));
        assert_eq!(page(&all, Some(0), None), (&all[..0], false));
        assert_eq!(page(&all, Some(1), Some("z")), (&all[4..], false));
    }
}
