//! The registry API of hosted repositories: pulls from what was pushed, and the push API (OCI
//! distribution spec 1.1): blob uploads (monolithic, chunked, cross-repository mounts),
//! manifest PUT and DELETE, tag lists. The caller's right to the action was checked before
//! ([`Caller::may`]); the cache checks and stores ([`pier_cache::Cache`]'s hosted and upload
//! methods). No upstream is ever asked anything here.

use std::io;
use std::net::IpAddr;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, StreamExt};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyStream;
use pier_cache::{MountFrom, PushError, HOSTED, MAX_MANIFEST_SIZE};
use pier_oci::{upload_chunk_range, Digest, Endpoint, ErrorCode, Query, Reference, RegistryError};
use pier_oci::{RepositoryName, Tag};

use crate::auth::{Action, Identity};
use crate::handlers::{self, Answer, Caller};
use crate::response::{self, Body};
use crate::routing::Target;
use crate::Mirror;

/// Why a caller may not do `action` to a hosted repository.
pub(crate) fn refused(caller: &Caller<'_>, action: Action, repo: &RepositoryName) -> RegistryError {
    let message = match (caller, action) {
        (_, Action::Pull) => format!("you may not pull {repo}"),
        (Caller::Anyone, _) => format!(
            "{repo} is read-only: pushing needs client authentication (auth) or \
             hosted.allow_anonymous_push"
        ),
        _ => format!("your rules do not let you push to or delete from {repo}"),
    };
    RegistryError::new(ErrorCode::Denied, message)
}

/// Answers a request for hosted `repo`.
pub(crate) async fn dispatch<B>(
    mirror: &Mirror,
    req: Request<B>,
    caller: &Caller<'_>,
    client: IpAddr,
    endpoint: Endpoint,
    repo: RepositoryName,
    head: bool,
) -> Answer
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let method = req.method().clone();
    let (parts, body) = req.into_parts();
    let query = parts.uri.query();
    match (method, endpoint) {
        (Method::GET | Method::HEAD, Endpoint::Manifest { reference, .. }) => {
            let m = mirror
                .cache
                .hosted_manifest(&repo, &reference)
                .await
                .map_err(|e| response::from_cache(&e, ErrorCode::ManifestUnknown))?;
            Ok(handlers::manifest_response(
                &m.digest,
                &m.manifest,
                m.source,
                HOSTED.into(),
                head,
            ))
        }
        (Method::PUT, Endpoint::Manifest { reference, .. }) => {
            put_manifest(mirror, &repo, &reference, &parts.headers, body).await
        }
        (Method::DELETE, Endpoint::Manifest { reference, .. }) => {
            let deleted = match &reference {
                Reference::Digest(d) => mirror.cache.delete_hosted_manifest(&repo, d).await,
                Reference::Tag(t) => mirror.cache.delete_hosted_tag(&repo, t).await,
            };
            deleted.map_err(|e| response::from_push(&e, ErrorCode::ManifestUnknown))?;
            Ok(response::built(
                empty(StatusCode::ACCEPTED).body(response::empty()),
                false,
            ))
        }
        (Method::GET | Method::HEAD, Endpoint::Blob { digest, .. }) => {
            let range = handlers::requested_range(&parts.headers)?;
            let missing = |e: pier_cache::Error| response::from_cache(&e, ErrorCode::BlobUnknown);
            if head {
                let size = mirror
                    .cache
                    .hosted_blob_size(&repo, &digest)
                    .await
                    .map_err(missing)?;
                return Ok(handlers::blob_head_response(&digest, Some(size)));
            }
            let blob = mirror
                .cache
                .hosted_blob(&repo, &digest)
                .await
                .map_err(missing)?;
            Ok(handlers::blob_response(&digest, blob, range))
        }
        (Method::GET | Method::HEAD, Endpoint::TagsList { .. }) => {
            tags_list(mirror, &repo, parts.uri.path(), query, head).await
        }
        (Method::GET | Method::HEAD, Endpoint::Referrers { digest, .. }) => {
            let index = mirror
                .cache
                .hosted_referrers(&repo, &digest)
                .await
                .map_err(|e| response::from_cache(&e, ErrorCode::ManifestUnknown))?;
            handlers::referrers_response(index, query, head)
        }
        (Method::POST, Endpoint::Upload { session: None, .. }) => {
            let owner = upload_owner(caller, client);
            start_upload(mirror, caller, &owner, &repo, query, body).await
        }
        (
            Method::PATCH,
            Endpoint::Upload {
                session: Some(s), ..
            },
        ) => {
            let range =
                match parts.headers.get(header::CONTENT_RANGE) {
                    None => None,
                    Some(v) => Some(v.to_str().ok().and_then(upload_chunk_range).ok_or_else(
                        || {
                            RegistryError::new(
                                ErrorCode::BlobUploadInvalid,
                                "Content-Range must be <first>-<last>",
                            )
                        },
                    )?),
                };
            // Compared with the range before a byte is read (a malformed one is hyper's 400).
            let content_length = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            match mirror
                .cache
                .upload_chunk(&repo, &s, range, content_length, body_stream(body))
                .await
            {
                Ok(size) => Ok(session_response(StatusCode::ACCEPTED, &repo, &s, size)),
                // The session is where it was: the client is told where, to go on from there.
                Err(e @ (PushError::OutOfOrder { size } | PushError::ChunkLength { size, .. })) => {
                    let e = response::from_push(&e, ErrorCode::BlobUploadUnknown);
                    let mut resp = response::error(&e, false);
                    add_session_headers(resp.headers_mut(), &repo, &s, size);
                    Ok(resp)
                }
                Err(e) => Err(response::from_push(&e, ErrorCode::BlobUploadUnknown)),
            }
        }
        (
            Method::PUT,
            Endpoint::Upload {
                session: Some(s), ..
            },
        ) => {
            let digest = digest_param(query)?;
            mirror
                .cache
                .finish_upload(&repo, &s, &digest, body_stream(body))
                .await
                .map_err(|e| response::from_push(&e, ErrorCode::BlobUploadUnknown))?;
            Ok(blob_created(&repo, &digest))
        }
        (
            Method::GET,
            Endpoint::Upload {
                session: Some(s), ..
            },
        ) => {
            let size = mirror
                .cache
                .upload_status(&repo, &s)
                .await
                .map_err(|e| response::from_push(&e, ErrorCode::BlobUploadUnknown))?;
            Ok(session_response(StatusCode::NO_CONTENT, &repo, &s, size))
        }
        (
            Method::DELETE,
            Endpoint::Upload {
                session: Some(s), ..
            },
        ) => {
            mirror
                .cache
                .cancel_upload(&repo, &s)
                .await
                .map_err(|e| response::from_push(&e, ErrorCode::BlobUploadUnknown))?;
            Ok(response::built(
                empty(StatusCode::NO_CONTENT).body(response::empty()),
                false,
            ))
        }
        _ => Err(RegistryError::new(
            ErrorCode::Unsupported,
            "this method is not supported on this endpoint",
        )),
    }
}

/// `POST /v2/<name>/blobs/uploads/`: a mount (`?mount=&from=`), a monolithic upload
/// (`?digest=` with the blob as body), or a new session.
async fn start_upload<B>(
    mirror: &Mirror,
    caller: &Caller<'_>,
    owner: &str,
    repo: &RepositoryName,
    query: Option<&str>,
    body: B,
) -> Answer
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let params = Query::parse_opt(query);
    if let (Some(mount), Some(from)) = (params.get("mount"), params.get("from")) {
        if let Ok(digest) = mount.parse::<Digest>() {
            if mount_blob(mirror, caller, repo, &digest, from).await? {
                return Ok(blob_created(repo, &digest));
            }
        }
        // Not mountable: the client gets a session and uploads the blob (spec 1.1).
    } else if params.get("digest").is_some() {
        let digest = digest_param(query)?;
        mirror
            .cache
            .upload_blob(repo, owner, &digest, body_stream(body))
            .await
            .map_err(|e| response::from_push(&e, ErrorCode::BlobUploadUnknown))?;
        return Ok(blob_created(repo, &digest));
    }
    let session = mirror
        .cache
        .start_upload(repo, owner)
        .await
        .map_err(|e| response::from_push(&e, ErrorCode::BlobUploadUnknown))?;
    Ok(session_response(StatusCode::ACCEPTED, repo, &session, 0))
}

/// Who opens an upload session, as `hosted.max_uploads_per_client` counts callers: a user by
/// name; an anonymous client (or anyone, without client authentication) by its address, the
/// one identity it has.
fn upload_owner(caller: &Caller<'_>, client: IpAddr) -> String {
    match caller {
        Caller::Identified {
            who: Identity::User(user),
            ..
        } => format!("user:{user}"),
        _ => format!("ip:{client}"),
    }
}

/// Mounts `digest` from `from` when the caller may pull `from` and it holds the digest (by its
/// links: hosted or mirrored, no upstream asked). `Ok(false)`: upload it instead.
async fn mount_blob(
    mirror: &Mirror,
    caller: &Caller<'_>,
    repo: &RepositoryName,
    digest: &Digest,
    from: &str,
) -> Result<bool, RegistryError> {
    let Ok(target) = mirror.target(from, None) else {
        return Ok(false);
    };
    if !caller.may(mirror, Action::Pull, &target) {
        return Ok(false);
    }
    let source = match &target {
        Target::Hosted(r) => MountFrom::Hosted(r),
        Target::Mirrored(route) => MountFrom::Mirrored(route.at()),
    };
    mirror
        .cache
        .mount_blob(repo, digest, source)
        .await
        .map_err(|e| response::from_push(&e, ErrorCode::BlobUnknown))
}

/// `PUT /v2/<name>/manifests/<reference>`: at most [`MAX_MANIFEST_SIZE`] bytes (413 beyond),
/// checked and stored by the cache.
async fn put_manifest<B>(
    mirror: &Mirror,
    repo: &RepositoryName,
    reference: &Reference,
    headers: &HeaderMap,
    body: B,
) -> Answer
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    let too_large = || {
        RegistryError::new(
            ErrorCode::SizeInvalid,
            format!("manifests may be at most {MAX_MANIFEST_SIZE} bytes"),
        )
        .with_status(413)
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_MANIFEST_SIZE as u64)
    {
        return Err(too_large());
    }
    let mut bytes = BytesMut::new();
    let mut stream = body_stream(body);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            RegistryError::new(
                ErrorCode::ManifestInvalid,
                format!("request body failed: {e}"),
            )
        })?;
        if bytes.len() + chunk.len() > MAX_MANIFEST_SIZE {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let pushed = mirror
        .cache
        .put_hosted_manifest(repo, reference, content_type, bytes.freeze())
        .await
        .map_err(|e| response::from_push(&e, ErrorCode::ManifestUnknown))?;
    let mut b = empty(StatusCode::CREATED)
        .header(
            header::LOCATION,
            format!("/v2/{repo}/manifests/{}", pushed.digest),
        )
        .header("docker-content-digest", pushed.digest.to_string());
    if let Some(subject) = &pushed.subject {
        b = b.header("oci-subject", subject.to_string());
    }
    Ok(response::built(b.body(response::empty()), false))
}

/// `GET /v2/<name>/tags/list` of a hosted repository, paged like a mirrored one's.
async fn tags_list(
    mirror: &Mirror,
    repo: &RepositoryName,
    path: &str,
    query: Option<&str>,
    head: bool,
) -> Answer {
    let (n, last) = handlers::page_params(&Query::parse_opt(query))?;
    if last.as_deref().is_some_and(|l| Tag::parse(l).is_none()) {
        return Err(
            RegistryError::new(ErrorCode::Unsupported, "last must be a tag").with_status(400),
        );
    }
    let tags = mirror
        .cache
        .hosted_tags(repo)
        .await
        .map_err(|e| response::from_cache(&e, ErrorCode::NameUnknown))?;
    let (page, more) = handlers::page(&tags, n, last.as_deref());
    let next = match (more, page.last(), n) {
        (true, Some(last), Some(n)) => Some(format!(
            "{path}?{}",
            form_urlencoded::Serializer::new(String::new())
                .append_pair("n", &n.to_string())
                .append_pair("last", last)
                .finish()
        )),
        _ => None,
    };
    let body = serde_json::json!({ "name": repo.as_str(), "tags": page }).to_string();
    Ok(handlers::list_response(body, next, None, head))
}

/// The `digest` parameter of an upload's last request: required, and a digest.
fn digest_param(query: Option<&str>) -> Result<Digest, RegistryError> {
    Query::parse_opt(query)
        .get("digest")
        .ok_or_else(|| RegistryError::new(ErrorCode::DigestInvalid, "digest parameter missing"))?
        .parse()
        .map_err(|e| RegistryError::new(ErrorCode::DigestInvalid, format!("invalid digest: {e}")))
}

/// A request body as a stream of bytes; a body that breaks off ends in an error.
fn body_stream<B>(body: B) -> BoxStream<'static, io::Result<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display + Send,
{
    BodyStream::new(body)
        .filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().map(Ok),
                Err(e) => Some(Err(io::Error::other(e.to_string()))),
            }
        })
        .boxed()
}

fn empty(status: StatusCode) -> http::response::Builder {
    response::builder(status).header(header::CONTENT_LENGTH, 0)
}

/// `201 Created` for a blob now in `repo`.
fn blob_created(repo: &RepositoryName, digest: &Digest) -> Response<Body> {
    response::built(
        empty(StatusCode::CREATED)
            .header(header::LOCATION, format!("/v2/{repo}/blobs/{digest}"))
            .header("docker-content-digest", digest.to_string())
            .body(response::empty()),
        false,
    )
}

/// Where an upload session is and how far it got.
fn add_session_headers(headers: &mut HeaderMap, repo: &RepositoryName, session: &str, size: u64) {
    // Session ids and repository names are checked grammars, so these always parse.
    let values = [
        (
            header::LOCATION,
            format!("/v2/{repo}/blobs/uploads/{session}"),
        ),
        (header::RANGE, format!("0-{}", size.saturating_sub(1))),
        (
            header::HeaderName::from_static("docker-upload-uuid"),
            session.to_string(),
        ),
    ];
    for (name, value) in values {
        if let Ok(v) = value.parse() {
            headers.insert(name, v);
        }
    }
}

fn session_response(
    status: StatusCode,
    repo: &RepositoryName,
    session: &str,
    size: u64,
) -> Response<Body> {
    let mut resp = response::built(empty(status).body(response::empty()), false);
    add_session_headers(resp.headers_mut(), repo, session, size);
    resp
}
