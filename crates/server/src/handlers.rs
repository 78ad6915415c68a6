//! The pull API: `/v2/`, manifests, blobs and tag lists, answered through the cache.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use pier_cache::{CachedManifest, Origin, Source, TagRecord};
use pier_oci::media_type;
use pier_oci::path::PathError;
use pier_oci::reference::ReferenceError;
use pier_oci::{ByteRange, Digest, Endpoint, ErrorCode, RangeError, Reference, RegistryError, Tag};

use crate::origin::BlobOrigin;
use crate::response::{self, Body};
use crate::routing::Route;
use crate::{Mirror, TagList};

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

type Answer = Result<Response<Body>, RegistryError>;

/// Answers one request.
pub async fn handle<B>(mirror: &Mirror, req: &Request<B>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    match dispatch(mirror, req, head).await {
        Ok(resp) => resp,
        Err(e) => response::error(&e, head),
    }
}

async fn dispatch<B>(mirror: &Mirror, req: &Request<B>, head: bool) -> Answer {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            "pier is a read-only mirror: push and delete are not supported",
        ));
    }
    let endpoint = Endpoint::parse(req.uri().path()).map_err(path_error)?;
    let query = req.uri().query();
    match endpoint {
        Endpoint::Base => Ok(response::json("{}", head)),
        Endpoint::Catalog => catalog(mirror, query, head).await,
        Endpoint::Upload => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "pier is a read-only mirror: push is not supported",
        )),
        Endpoint::Manifest { name, reference } => {
            let route = mirror.route(&name, query)?;
            let accept = accept(req.headers());
            manifest(mirror, &route, &reference, &accept, head).await
        }
        Endpoint::Blob { name, digest } => {
            let route = mirror.route(&name, query)?;
            blob(mirror, &route, &digest, req.headers(), head).await
        }
        Endpoint::TagsList { name } => {
            let route = mirror.route(&name, query)?;
            tags_list(mirror, &route, query, head).await
        }
    }
}

fn path_error(e: PathError) -> RegistryError {
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
    }
}

/// All `Accept` headers of the request as one list (Docker sends several).
fn accept(headers: &HeaderMap) -> String {
    let parts: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    parts.join(", ")
}

/// Response header telling where the answer came from: memory, disk, upstream, upstream-joined.
pub const CACHE_HEADER: &str = "x-pier-cache";

fn with_outcome(
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

async fn manifest(
    mirror: &Mirror,
    route: &Route<'_>,
    reference: &Reference,
    accept: &str,
    head: bool,
) -> Answer {
    match reference {
        Reference::Digest(digest) => manifest_by_digest(mirror, route, digest, accept, head).await,
        Reference::Tag(tag) => manifest_by_tag(mirror, route, tag, accept, head).await,
    }
}

/// Digests are immutable: a cached one is answered without asking the upstream, ever.
async fn manifest_by_digest(
    mirror: &Mirror,
    route: &Route<'_>,
    digest: &Digest,
    accept: &str,
    head: bool,
) -> Answer {
    if let Some((m, source)) = mirror
        .cache
        .manifest(digest)
        .await
        .map_err(|e| response::from_io(&e))?
    {
        return Ok(manifest_response(digest, &m, source, route, head));
    }
    let reference = Reference::Digest(digest.clone());
    let (fetched, joined) = fill_manifest(mirror, route, &reference, accept).await;
    let (digest, m) =
        fetched.map_err(|e| response::from_upstream(&e, ErrorCode::ManifestUnknown))?;
    Ok(manifest_response(
        &digest,
        &m,
        Source::Upstream { joined },
        route,
        head,
    ))
}

/// Tags move: answered from cache within the upstream's TTL, then revalidated with a HEAD (which
/// does not count against Docker Hub's pull limit), fetched only when the digest changed, and
/// served stale while the upstream is unreachable, failing or rate-limiting.
async fn manifest_by_tag(
    mirror: &Mirror,
    route: &Route<'_>,
    tag: &Tag,
    accept: &str,
    head: bool,
) -> Answer {
    let upstream = route.upstream;
    let record = mirror.cache.tag(&upstream.name, &route.repo, tag).await;
    let mut cached = None;
    if let Some(rec) = record
        .as_ref()
        .filter(|r| media_type::accepts(accept, &r.media_type))
    {
        if let Ok(digest) = rec.digest.parse::<Digest>() {
            if let Some((m, source)) = mirror
                .cache
                .manifest(&digest)
                .await
                .map_err(|e| response::from_io(&e))?
            {
                cached = Some((digest, m, source, rec.clone()));
            }
        }
    }
    let reference = Reference::Tag(tag.clone());
    if let Some((digest, m, source, rec)) = &cached {
        let fresh = rec.age_secs(SystemTime::now()) < upstream.tag_ttl.as_secs();
        let immutable = upstream
            .immutable_tags
            .as_ref()
            .is_some_and(|re| re.is_match(tag.as_str()));
        // Spend none of the last pulls of the upstream's budget on revalidation.
        let budget_low = upstream
            .client
            .rate_limit_remaining()
            .is_some_and(|r| r <= upstream.rate_limit_reserve);
        if fresh || immutable || budget_low {
            return Ok(manifest_response(digest, m, *source, route, head));
        }
        if upstream.client.in_outage() {
            return Ok(serve_stale(
                mirror,
                route,
                tag,
                &"upstream down",
                (digest, m, *source),
                head,
            ));
        }
        let key = format!(
            "{}\n{}\n{tag}\n{}",
            upstream.name,
            route.repo,
            media_type::upstream_accept(accept)
        );
        let (client, repo, r, a) = (
            upstream.client.clone(),
            route.repo.clone(),
            reference.clone(),
            accept.to_string(),
        );
        let (revalidated, joined) = mirror
            .revalidations
            .run(key, move || async move {
                client.head_manifest(&repo, &r, &a).await
            })
            .await;
        let result = match &revalidated {
            Ok(h) if h.digest == *digest => "unchanged",
            Ok(_) => "changed",
            Err(_) => "failed",
        };
        if !joined {
            mirror
                .metrics
                .tag_revalidations
                .with_label_values(&[&upstream.name, result])
                .inc();
        }
        match revalidated {
            Ok(h) if h.digest == *digest => {
                let fresh = TagRecord::new(digest, &m.media_type, SystemTime::now());
                if let Err(e) = mirror
                    .cache
                    .set_tag(&upstream.name, &route.repo, tag, &fresh)
                    .await
                {
                    tracing::warn!(error = %e, "could not record tag");
                }
                return Ok(manifest_response(digest, m, *source, route, head));
            }
            Ok(_) => {} // moved: fetch below
            Err(e) if e.is_outage() => {
                return Ok(serve_stale(
                    mirror,
                    route,
                    tag,
                    &e,
                    (digest, m, *source),
                    head,
                ));
            }
            Err(e) => return Err(response::from_upstream(&e, ErrorCode::ManifestUnknown)),
        }
    }
    let (fetched, joined) = fill_manifest(mirror, route, &reference, accept).await;
    let (digest, m) = match (fetched, &cached) {
        (Ok(f), _) => f,
        (Err(e), Some((digest, m, source, _))) if e.is_outage() => {
            return Ok(serve_stale(
                mirror,
                route,
                tag,
                &e,
                (digest, m, *source),
                head,
            ));
        }
        (Err(e), _) => return Err(response::from_upstream(&e, ErrorCode::ManifestUnknown)),
    };
    Ok(manifest_response(
        &digest,
        &m,
        Source::Upstream { joined },
        route,
        head,
    ))
}

/// A cached tag answered because the upstream could not be asked: logged and counted.
fn serve_stale(
    mirror: &Mirror,
    route: &Route<'_>,
    tag: &Tag,
    why: &dyn std::fmt::Display,
    (digest, m, source): (&Digest, &CachedManifest, Source),
    head: bool,
) -> Response<Body> {
    let upstream = &route.upstream.name;
    tracing::warn!(%upstream, repo = %route.repo, %tag, error = %why, "serving cached tag: upstream unavailable");
    mirror
        .metrics
        .stale_served
        .with_label_values(&[upstream, "manifest"])
        .inc();
    manifest_response(digest, m, source, route, head)
}

/// Fetches and stores a manifest, once per upstream, repository, reference and Accept at a time.
async fn fill_manifest(
    mirror: &Mirror,
    route: &Route<'_>,
    reference: &Reference,
    accept: &str,
) -> (
    Result<(Digest, CachedManifest), pier_upstream::UpstreamError>,
    bool,
) {
    let accept = media_type::upstream_accept(accept).to_string();
    let key = format!(
        "{}\n{}\n{}\n{}",
        route.upstream.name, route.repo, reference, accept
    );
    let (client, repo, r) = (
        route.upstream.client.clone(),
        route.repo.clone(),
        reference.clone(),
    );
    let fetch = Box::pin(async move { client.get_manifest(&repo, &r, &accept).await });
    let (expected, tag) = match reference {
        Reference::Digest(d) => (Some(d.clone()), None),
        Reference::Tag(t) => (
            None,
            Some((route.upstream.name.clone(), route.repo.clone(), t.clone())),
        ),
    };
    mirror.cache.fill_manifest(key, fetch, expected, tag).await
}

fn manifest_response(
    digest: &Digest,
    m: &CachedManifest,
    source: Source,
    route: &Route<'_>,
    head: bool,
) -> Response<Body> {
    let resp = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, &*m.media_type)
        .header(header::CONTENT_LENGTH, m.bytes.len())
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .body(if head {
            response::empty()
        } else {
            response::full(m.bytes.clone())
        })
        .unwrap_or_else(|_| Response::new(response::empty()));
    with_outcome(resp, "manifest", source, route.upstream.name.clone())
}

// ---- blobs ----

async fn blob(
    mirror: &Mirror,
    route: &Route<'_>,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Answer {
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| RangeError::Malformed)
                .and_then(ByteRange::parse)
                .map_err(range_error)?,
        ),
    };
    let base = |status: StatusCode| {
        response::builder(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header("docker-content-digest", digest.to_string())
            .header(header::ETAG, format!("\"{digest}\""))
            .header(header::ACCEPT_RANGES, "bytes")
    };
    if head {
        // Known locally (cached or filling), or asked of the upstream without downloading.
        let (size, source) = match mirror.cache.blob_size(digest).await {
            Some((size, source)) => (Some(size), source),
            None => {
                let size = route
                    .upstream
                    .client
                    .head_blob(&route.repo, digest)
                    .await
                    .map_err(|e| response::from_upstream(&e, ErrorCode::BlobUnknown))?;
                (size, Source::Upstream { joined: false })
            }
        };
        let mut b = base(StatusCode::OK);
        if let Some(size) = size {
            b = b.header(header::CONTENT_LENGTH, size);
        }
        let resp = b
            .body(response::empty())
            .unwrap_or_else(|_| Response::new(response::empty()));
        return Ok(with_outcome(
            resp,
            "blob",
            source,
            route.upstream.name.clone(),
        ));
    }
    let origin = || {
        Arc::new(BlobOrigin {
            upstream: route.upstream.client.clone(),
            repo: route.repo.clone(),
            digest: digest.clone(),
        }) as Arc<dyn Origin>
    };
    let blob = mirror
        .cache
        .blob(digest, origin)
        .await
        .map_err(|e| response::from_fill(&e))?;
    let source = blob.source;
    let resp = match (range, blob.size) {
        (Some(range), Some(size)) => match range.resolve(size) {
            Ok((first, last)) => base(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {first}-{last}/{size}"),
                )
                .header(header::CONTENT_LENGTH, last - first + 1)
                .body(response::stream(blob.stream(first, Some(last + 1)))),
            Err(_) => {
                let mut e = response::error(&range_error(RangeError::Unsatisfiable), false);
                if let Ok(v) = format!("bytes */{size}").parse() {
                    e.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(e);
            }
        },
        (_, size) => {
            let mut b = base(StatusCode::OK);
            if let Some(size) = size {
                b = b.header(header::CONTENT_LENGTH, size);
            }
            b.body(response::stream(blob.stream(0, None)))
        }
    };
    let resp = resp.unwrap_or_else(|_| Response::new(response::empty()));
    Ok(with_outcome(
        resp,
        "blob",
        source,
        route.upstream.name.clone(),
    ))
}

fn range_error(e: RangeError) -> RegistryError {
    RegistryError::new(ErrorCode::RangeInvalid, e.to_string())
}

// ---- tag lists and catalog ----

/// Longest a tag list is answered without asking the upstream again (shorter when the
/// upstream's `tag_ttl` is).
const TAG_LIST_TTL: Duration = Duration::from_secs(30);

/// `n` and `last` of a query string; `n` must be a number and `last` a tag (or, for the
/// catalog, a repository name), else 400.
fn page_params(query: Option<&str>) -> Result<(Option<u32>, Option<String>), RegistryError> {
    let param = |name: &str| {
        query?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
    };
    let bad = |m: &str| RegistryError::new(ErrorCode::Unsupported, m).with_status(400);
    let n = param("n")
        .map(|v| {
            v.parse::<u32>()
                .map_err(|_| bad("n must be a non-negative integer"))
        })
        .transpose()?;
    let last = param("last").map(str::to_string);
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

/// Passed to the upstream, kept briefly, and served stale while the upstream is down.
async fn tags_list(mirror: &Mirror, route: &Route<'_>, query: Option<&str>, head: bool) -> Answer {
    let (n, last) = page_params(query)?;
    if last.as_deref().is_some_and(|l| Tag::parse(l).is_none()) {
        return Err(
            RegistryError::new(ErrorCode::Unsupported, "last must be a tag").with_status(400),
        );
    }
    let key = format!("{}\n{}\n{n:?}\n{last:?}", route.upstream.name, route.repo);
    let kept = mirror.tag_lists.get(&key).await;
    let (list, source) = match kept {
        Some(list) if list.fetched.elapsed() < TAG_LIST_TTL.min(route.upstream.tag_ttl) => {
            (list, Source::Memory)
        }
        kept => match route
            .upstream
            .client
            .tags_list(&route.repo, n, last.as_deref())
            .await
        {
            Ok((body, link)) => {
                let list = Arc::new(TagList {
                    fetched: Instant::now(),
                    body,
                    link,
                });
                mirror.tag_lists.insert(key, list.clone()).await;
                (list, Source::Upstream { joined: false })
            }
            Err(e) => match kept {
                Some(list) if e.is_outage() => {
                    tracing::warn!(upstream = %route.upstream.name, repo = %route.repo, error = %e, "serving cached tag list: upstream unavailable");
                    mirror
                        .metrics
                        .stale_served
                        .with_label_values(&[&route.upstream.name, "tags"])
                        .inc();
                    (list, Source::Memory)
                }
                _ => return Err(response::from_upstream(&e, ErrorCode::NameUnknown)),
            },
        },
    };
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, list.body.len());
    if let Some(link) = &list.link {
        b = b.header(header::LINK, link);
    }
    let resp = b
        .body(if head {
            response::empty()
        } else {
            response::full(list.body.clone())
        })
        .unwrap_or_else(|_| Response::new(response::empty()));
    Ok(with_outcome(
        resp,
        "tags",
        source,
        route.upstream.name.clone(),
    ))
}

/// The repositories pier holds, named as clients name them: plain for the default upstream,
/// `<registry>/<repository>` for the others.
async fn catalog(mirror: &Mirror, query: Option<&str>, head: bool) -> Answer {
    let (n, last) = page_params(query)?;
    let default = &mirror.upstreams[mirror.default_upstream].name;
    let mut names: Vec<String> = mirror
        .cache
        .repositories()
        .await
        .map_err(|e| response::from_io(&e))?
        .into_iter()
        .map(|(upstream, repo)| {
            if *upstream == **default {
                repo
            } else {
                format!("{upstream}/{repo}")
            }
        })
        .collect();
    names.sort();
    names.dedup();
    if let Some(last) = &last {
        names.retain(|name| name > last);
    }
    let mut link = None;
    if let Some(n) = n.map(|n| n as usize) {
        if names.len() > n {
            names.truncate(n);
            if let Some(next) = names.last() {
                link = Some(format!("</v2/_catalog?last={next}&n={n}>; rel=\"next\""));
            }
        }
    }
    let body = serde_json::json!({ "repositories": names }).to_string();
    let mut b = response::builder(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(link) = link {
        b = b.header(header::LINK, link);
    }
    Ok(b.body(if head {
        response::empty()
    } else {
        response::full(body)
    })
    .unwrap_or_else(|_| Response::new(response::empty())))
}
