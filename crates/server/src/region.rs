//! The peer interface: other nodes of the region asking this one, as the owner, for a blob or a
//! manifest of a configured upstream's repository.
//!
//! Requests must carry the region's secret (else 401), name a configured upstream and a
//! repository its allow and deny lists permit, and are answered through the same resolve → tier
//! → fill path as a client's, with the repository's links checked, only without asking other
//! peers (no loops). The asking node authenticated its client and applied its rules; the owner
//! adds nothing a client could not get there, and reaches nothing the configuration does not name.

use http::{header, Method, Request, Response};
use pier_cache::region::peer::{ACCEPT_QUERY, FETCHED_AT_HEADER, PATH_PREFIX, SECRET_HEADER};
use pier_oci::{AcceptSet, Digest, ErrorCode, Query, Reference, RegistryError, RepositoryName};

use crate::handlers;
use crate::response::{self, Body};
use crate::routing::Route;
use crate::Mirror;

/// Whether a request is for the peer interface.
pub(crate) fn is_peer_request(path: &str) -> bool {
    path.starts_with(PATH_PREFIX)
}

/// Whether a request carries the region's secret (a node without peers accepts none).
pub(crate) fn carries_secret<B>(mirror: &Mirror, req: &Request<B>) -> bool {
    let secret = req.headers().get(SECRET_HEADER).map(|v| v.as_bytes());
    mirror
        .cache
        .region()
        .is_some_and(|r| r.has_peers() && r.accepts_secret(secret))
}

/// Answers a peer request.
pub(crate) async fn answer<B>(mirror: &Mirror, req: &Request<B>) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    match dispatch(mirror, req, head).await {
        Ok(resp) => resp,
        Err(e) => response::error(&e, head),
    }
}

async fn dispatch<B>(
    mirror: &Mirror,
    req: &Request<B>,
    head: bool,
) -> Result<Response<Body>, RegistryError> {
    if !carries_secret(mirror, req) {
        return Err(RegistryError::new(
            ErrorCode::Unauthorized,
            "peer requests need the region's secret",
        ));
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            "peers only read",
        ));
    }
    let bad = |what: &str| RegistryError::new(ErrorCode::NameInvalid, what.to_string());
    let q = Query::parse_opt(req.uri().query());
    let upstream = q
        .get("upstream")
        .and_then(|u| mirror.upstream_named(u))
        // Not 404: the asking node would take it for "the repository has no such object" (a
        // rolling configuration change leaves nodes with different upstreams for a while).
        .ok_or_else(|| {
            RegistryError::new(ErrorCode::NameUnknown, "no such upstream on this node")
                .with_status(421)
        })?;
    let repo = q
        .get("repo")
        .and_then(|r| RepositoryName::parse(r).ok())
        .ok_or_else(|| bad("missing or invalid repository"))?;
    // Hosted names never reach an upstream, whoever asks.
    if !upstream.access.permits(&repo) || mirror.hosted.contains(repo.as_str()) {
        return Err(RegistryError::new(
            ErrorCode::Denied,
            "repository not allowed on this mirror",
        ));
    }
    let route = Route {
        upstream,
        repo,
        from_peer: true,
    };
    let rest = req
        .uri()
        .path()
        .strip_prefix(PATH_PREFIX)
        .unwrap_or_default();
    match rest.split_once('/') {
        Some(("blobs", d)) => {
            let digest: Digest = d
                .parse()
                .map_err(|_| RegistryError::new(ErrorCode::DigestInvalid, "invalid digest"))?;
            handlers::blob(mirror, &route, &digest, req.headers(), head).await
        }
        Some(("manifests", r)) => {
            let reference = Reference::parse(r)
                .map_err(|e| RegistryError::new(ErrorCode::ManifestInvalid, e.to_string()))?;
            let accept = q
                .get(ACCEPT_QUERY)
                .and_then(|b| b.parse().ok())
                .and_then(AcceptSet::from_bits)
                .ok_or_else(|| bad("missing or invalid accept set"))?;
            let mut resp = handlers::manifest(mirror, &route, &reference, accept, head).await?;
            if let Reference::Tag(tag) = &reference {
                let at = mirror.cache.tag_fetched_at(route.at(), tag, accept).await;
                if let Some(v) = at.and_then(|t| header::HeaderValue::from_str(&t.to_string()).ok())
                {
                    resp.headers_mut().insert(FETCHED_AT_HEADER, v);
                }
            }
            Ok(resp)
        }
        _ => Err(
            RegistryError::new(ErrorCode::Unsupported, "no such peer endpoint").with_status(400),
        ),
    }
}
