//! An in-process registry for what a real one cannot do on demand: demand tokens, redirect blobs
//! to another host, send wrong bytes, cut bodies short, go slow, and count every request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest as _, Sha256};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How the fake misbehaves. Everything off by default.
#[derive(Default, Clone)]
pub struct Behaviour {
    /// Require `Authorization: Bearer <token>` from the token endpoint at /token.
    pub require_token: bool,
    /// Username:password the token endpoint wants (anonymous tokens when None).
    pub token_credentials: Option<(String, String)>,
    /// Name this as the realm in Bearer challenges instead of the fake's own /token.
    pub token_realm: Option<String>,
    /// Pause before the token endpoint answers.
    pub token_delay: Option<Duration>,
    /// Require these Basic credentials on every registry request (a Basic challenge).
    pub require_basic: Option<(String, String)>,
    /// Answer blob GETs with 307 to this base URL (another host).
    pub redirect_blobs_to: Option<String>,
    /// Cut blob bodies after this many bytes for the first N blob GETs.
    pub cut_after: Option<(usize, usize)>,
    /// Pause between 64 KiB chunks of blob bodies.
    pub chunk_delay: Option<Duration>,
    /// Honour Range on blob GETs.
    pub ranges: bool,
    /// Answer every request with this status (429 comes with `Retry-After: 42`).
    pub fail_status: Option<u16>,
    /// Close every connection without answering.
    pub drop_connections: bool,
    /// Never answer (pier's read timeout has to fire).
    pub hang: bool,
    /// Send Docker Hub's `ratelimit-remaining: N;w=21600` on manifest answers.
    pub rate_limit_remaining: Option<u64>,
    /// Pause before answering a manifest request.
    pub manifest_delay: Option<Duration>,
    /// Page tag lists by this many, with a `Link` to the next page, ignoring the client's `n`.
    pub tag_page_size: Option<usize>,
    /// Answer `GET /v2/<repo>/referrers/<digest>` (OCI 1.1) from the manifests whose `subject`
    /// is that digest; without it, referrers requests get 404 as from Distribution 2.x.
    pub referrers_api: bool,
    /// Digests a hostile referrers API lists besides the repository's own referrers (as
    /// descriptors of OCI manifests), held there or not.
    pub referrers_also: Vec<String>,
}

#[derive(Default)]
pub struct State {
    pub behaviour: Mutex<Behaviour>,
    pub blobs: Mutex<HashMap<String, Bytes>>,
    /// (repo, reference) → (media type, bytes)
    pub manifests: Mutex<HashMap<(String, String), (String, Bytes)>>,
    /// Every request as "METHOD path", in order.
    pub log: Mutex<Vec<String>>,
    /// Authorization headers seen, per request path.
    pub auth_seen: Mutex<Vec<(String, Option<String>)>>,
    /// Range headers seen on blob GETs.
    pub ranges_seen: Mutex<Vec<Option<String>>>,
    /// Blobs served only under these repositories, as a real registry links them (blobs not
    /// listed here are served under any repository).
    pub blob_repos: Mutex<HashMap<String, Vec<String>>>,
    pub blob_gets: AtomicUsize,
    pub tokens_issued: AtomicUsize,
    /// Bumped by `rotate_token`: only the current generation's token is issued and accepted.
    pub token_generation: AtomicUsize,
    /// Blob bodies being sent, and the most at once.
    pub blob_bodies: InFlight,
    /// What `GET /v1/search` (Docker Hub's index) finds: repository names, in this order.
    pub search_index: Mutex<Vec<String>>,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<State>,
}

impl FakeUpstream {
    pub async fn start(behaviour: Behaviour) -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State {
            behaviour: Mutex::new(behaviour),
            ..State::default()
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move {
                            let b = s.behaviour.lock().unwrap().clone();
                            if b.drop_connections {
                                s.log.lock().unwrap().push(format!(
                                    "DROPPED {} {}",
                                    req.method(),
                                    req.uri()
                                ));
                                return Err(std::io::Error::other("dropping the connection"));
                            }
                            if b.hang {
                                s.log.lock().unwrap().push(format!(
                                    "HUNG {} {}",
                                    req.method(),
                                    req.uri()
                                ));
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            Ok::<_, std::io::Error>(handle(s, addr, req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeUpstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds a blob; returns its digest.
    pub fn add_blob(&self, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = format!("sha256:{}", hex(&Sha256::digest(&data)));
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(digest.clone(), data);
        digest
    }

    /// Adds a blob served only under `repo` (and other repositories it is added to).
    pub fn add_blob_in(&self, repo: &str, data: impl Into<Bytes>) -> String {
        let digest = self.add_blob(data);
        self.state
            .blob_repos
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default()
            .push(repo.to_string());
        digest
    }

    /// Serves `bytes` under `digest` although they do not hash to it.
    pub fn add_blob_under(&self, digest: &str, data: impl Into<Bytes>) {
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(digest.to_string(), data.into());
    }

    /// Adds a manifest under a tag and under its digest; returns the digest.
    pub fn add_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &str) -> String {
        let bytes = Bytes::from(body.to_string());
        let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
        let mut m = self.state.manifests.lock().unwrap();
        m.insert(
            (repo.into(), tag.into()),
            (media_type.into(), bytes.clone()),
        );
        m.insert((repo.into(), digest.clone()), (media_type.into(), bytes));
        digest
    }

    /// "Rotates the signing key": the token issued so far is refused from now on, and the token
    /// endpoint issues a new one. Returns the new token.
    pub fn rotate_token(&self) -> String {
        self.state.token_generation.fetch_add(1, Ordering::SeqCst);
        current_token(&self.state)
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }

    /// Requests seen whose "METHOD path" contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Makes `GET /v1/search` find these repositories (those containing its `q`), in order.
    pub fn index_for_search(&self, names: &[&str]) {
        *self.state.search_index.lock().unwrap() = names.iter().map(|n| n.to_string()).collect();
    }

    pub fn requests(&self) -> Vec<String> {
        self.state.log.lock().unwrap().clone()
    }
}

/// Docker Hub's `/v1/search`: the indexed names containing `q`, `n` a page (25 unless given),
/// page `page` (from 1), with Docker Hub's fields.
fn search(state: &State, query: Option<&str>) -> Response<Body> {
    let url = reqwest::Url::parse(&format!("http://index/?{}", query.unwrap_or(""))).unwrap();
    let params: HashMap<String, String> = url.query_pairs().into_owned().collect();
    let q = params.get("q").cloned().unwrap_or_default();
    let n: usize = params.get("n").and_then(|n| n.parse().ok()).unwrap_or(25);
    let page: usize = params.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let found: Vec<String> = state
        .search_index
        .lock()
        .unwrap()
        .iter()
        .filter(|name| name.contains(&q))
        .cloned()
        .collect();
    let results: Vec<serde_json::Value> = found
        .iter()
        .skip((page - 1) * n)
        .take(n)
        .map(|name| {
            serde_json::json!({
                "name": name,
                "description": format!("{name} upstream"),
                "star_count": 7,
                "is_official": !name.contains('/'),
                "is_automated": false,
            })
        })
        .collect();
    let body = serde_json::json!({
        "num_pages": found.len().div_ceil(n),
        "num_results": found.len(),
        "page_size": n,
        "page": page,
        "query": q,
        "results": results,
    });
    full(StatusCode::OK, body.to_string())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

const TOKEN: &str = "tok-3f9a";

/// The token of the current generation: `TOKEN` until the first `rotate_token`.
pub fn current_token(state: &State) -> String {
    match state.token_generation.load(Ordering::SeqCst) {
        0 => TOKEN.to_string(),
        n => format!("{TOKEN}-rotated-{n}"),
    }
}

async fn handle(state: Arc<State>, addr: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let behaviour = state.behaviour.lock().unwrap().clone();
    state
        .log
        .lock()
        .unwrap()
        .push(format!("{} {}", req.method(), req.uri()));
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state
        .auth_seen
        .lock()
        .unwrap()
        .push((path.clone(), auth.clone()));

    if let Some(status) = behaviour.fail_status {
        let mut r = full(StatusCode::from_u16(status).unwrap(), "failing on purpose");
        if status == 429 {
            r.headers_mut().insert("retry-after", "42".parse().unwrap());
        }
        return r;
    }
    if path == "/token" {
        if let Some((u, p)) = &behaviour.token_credentials {
            let expected = format!("Basic {}", base64(&format!("{u}:{p}")));
            if auth.as_deref() != Some(expected.as_str()) {
                return full(StatusCode::UNAUTHORIZED, "bad credentials");
            }
        }
        if let Some(d) = behaviour.token_delay {
            tokio::time::sleep(d).await;
        }
        state.tokens_issued.fetch_add(1, Ordering::SeqCst);
        let token = current_token(&state);
        return full(
            StatusCode::OK,
            format!(r#"{{"token":"{token}","expires_in":300}}"#),
        );
    }
    if path.starts_with("/cdn/") {
        // The "other host" of a redirect: serves the blob named in the path.
        let digest = path.trim_start_matches("/cdn/");
        return match state.blobs.lock().unwrap().get(digest) {
            Some(b) => full(StatusCode::OK, b.clone()),
            None => full(StatusCode::NOT_FOUND, ""),
        };
    }
    if let Some((u, p)) = &behaviour.require_basic {
        if auth.as_deref() != Some(format!("Basic {}", base64(&format!("{u}:{p}"))).as_str()) {
            let mut r = full(
                StatusCode::UNAUTHORIZED,
                r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
            );
            r.headers_mut()
                .insert("www-authenticate", r#"Basic realm="fake""#.parse().unwrap());
            return r;
        }
    }
    if behaviour.require_token
        && auth.as_deref() != Some(&format!("Bearer {}", current_token(&state)))
    {
        let mut r = full(
            StatusCode::UNAUTHORIZED,
            r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#,
        );
        let realm = behaviour
            .token_realm
            .clone()
            .unwrap_or_else(|| format!("http://{addr}/token"));
        let mut challenge =
            format!(r#"Bearer realm="{realm}",service="fake",scope="repository:x:pull""#);
        if auth.is_some() {
            // What a registry says of a token it no longer trusts.
            challenge.push_str(r#",error="invalid_token""#);
        }
        r.headers_mut()
            .insert("www-authenticate", challenge.parse().unwrap());
        return r;
    }
    if path == "/v1/search" {
        return search(&state, req.uri().query());
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return full(StatusCode::NOT_FOUND, "");
    };
    if rest.is_empty() {
        return full(StatusCode::OK, "{}");
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        let q = req.uri().query().unwrap_or("");
        let param = |k: &str| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
        };
        let mut tags: Vec<String> = state
            .manifests
            .lock()
            .unwrap()
            .keys()
            .filter(|(r, t)| r == repo && !t.contains(':'))
            .map(|(_, t)| t.clone())
            .collect();
        if tags.is_empty() {
            return full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#,
            );
        }
        tags.sort();
        if let Some(last) = param("last") {
            tags.retain(|t| *t > last);
        }
        let mut link = None;
        if let Some(size) = behaviour.tag_page_size {
            // An opaque cursor, as Quay used: the client must follow the Link as given.
            let from: usize = param("next_page").and_then(|p| p.parse().ok()).unwrap_or(0);
            tags = tags.into_iter().skip(from).collect();
            if tags.len() > size {
                tags.truncate(size);
                link = Some(format!(
                    r#"</v2/{repo}/tags/list?n={size}&next_page={}>; rel="next""#,
                    from + size
                ));
            }
        } else if let Some(n) = param("n").and_then(|n| n.parse().ok()) {
            tags.truncate(n);
        }
        let mut r = full(
            StatusCode::OK,
            serde_json::json!({ "name": repo, "tags": tags }).to_string(),
        );
        if let Some(link) = link {
            r.headers_mut().insert("link", link.parse().unwrap());
        }
        return r;
    }
    if let Some((repo, subject)) = rest.rsplit_once("/referrers/") {
        if !behaviour.referrers_api {
            return full(StatusCode::NOT_FOUND, "404 page not found");
        }
        let manifests = state.manifests.lock().unwrap();
        let mut listed: Vec<serde_json::Value> = manifests
            .iter()
            .filter(|((r, reference), _)| r == repo && reference.starts_with("sha256:"))
            .filter_map(|((_, digest), (media_type, bytes))| {
                let doc: serde_json::Value = serde_json::from_slice(bytes).ok()?;
                (doc["subject"]["digest"] == subject).then(|| {
                    let artifact_type = doc["artifactType"]
                        .as_str()
                        .or(doc["config"]["mediaType"].as_str())
                        .unwrap_or_default();
                    serde_json::json!({
                        "mediaType": media_type,
                        "digest": digest,
                        "size": bytes.len(),
                        "artifactType": artifact_type,
                    })
                })
            })
            .collect();
        listed.extend(behaviour.referrers_also.iter().map(|d| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": d,
                "size": 1,
                "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            })
        }));
        listed.sort_by_key(|d| d["digest"].as_str().unwrap_or_default().to_string());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": listed,
        });
        let mut r = full(StatusCode::OK, index.to_string());
        r.headers_mut().insert(
            "content-type",
            "application/vnd.oci.image.index.v1+json".parse().unwrap(),
        );
        return r;
    }
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        if let Some(d) = behaviour.manifest_delay {
            tokio::time::sleep(d).await;
        }
        let accept = req
            .headers()
            .get_all("accept")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        let m = negotiate(&state.manifests.lock().unwrap(), repo, reference, &accept);
        return match m {
            Some((media_type, bytes)) => {
                let digest = format!("sha256:{}", hex(&Sha256::digest(&bytes)));
                let mut r = full(
                    StatusCode::OK,
                    if req.method() == hyper::Method::HEAD {
                        Bytes::new()
                    } else {
                        bytes.clone()
                    },
                );
                r.headers_mut()
                    .insert("content-type", media_type.parse().unwrap());
                r.headers_mut()
                    .insert("docker-content-digest", digest.parse().unwrap());
                r.headers_mut().insert("content-length", bytes.len().into());
                if let Some(n) = behaviour.rate_limit_remaining {
                    r.headers_mut().insert(
                        "ratelimit-remaining",
                        format!("{n};w=21600").parse().unwrap(),
                    );
                }
                r
            }
            None => full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#,
            ),
        };
    }
    if let Some((repo, digest)) = rest.rsplit_once("/blobs/") {
        let elsewhere = state
            .blob_repos
            .lock()
            .unwrap()
            .get(digest)
            .is_some_and(|repos| !repos.iter().any(|r| r == repo));
        let data = state.blobs.lock().unwrap().get(digest).cloned();
        let Some(data) = data.filter(|_| !elsewhere) else {
            return full(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#,
            );
        };
        if req.method() == hyper::Method::HEAD {
            let mut r = full(StatusCode::OK, Bytes::new());
            r.headers_mut().insert("content-length", data.len().into());
            return r;
        }
        let n = state.blob_gets.fetch_add(1, Ordering::SeqCst);
        let range = req
            .headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        state.ranges_seen.lock().unwrap().push(range.clone());
        if let Some(base) = &behaviour.redirect_blobs_to {
            let mut r = full(StatusCode::TEMPORARY_REDIRECT, "");
            r.headers_mut()
                .insert("location", format!("{base}/cdn/{digest}").parse().unwrap());
            return r;
        }
        let mut in_flight = InFlight::enter(&state);
        let total = data.len();
        let start = match (&range, behaviour.ranges) {
            (Some(r), true) => r
                .trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse::<usize>()
                .unwrap_or(0),
            _ => 0,
        };
        let cut = behaviour
            .cut_after
            .filter(|(_, first_n)| n < *first_n)
            .map(|(at, _)| at);
        let body = data.slice(start..);
        let delay = behaviour.chunk_delay;
        let chunks: Vec<Bytes> = body.chunks(64 * 1024).map(|c| body.slice_ref(c)).collect();
        let mut sent = start;
        let stream = futures_util::stream::iter(chunks).then(move |c| async move {
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            c
        });
        let stream = stream.map(move |c| {
            if let Some(at) = cut {
                if sent + c.len() > at {
                    return Err(std::io::Error::other("cut on purpose"));
                }
            }
            sent += c.len();
            if sent == total {
                in_flight.leave();
            }
            Ok(Frame::data(c))
        });
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        if start > 0 {
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                "content-range",
                format!("bytes {start}-{}/{total}", total - 1)
                    .parse()
                    .unwrap(),
            );
        }
        r.headers_mut()
            .insert("content-length", (total - start).into());
        return r;
    }
    full(StatusCode::NOT_FOUND, "")
}

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Content negotiation as Docker Hub and the Distribution registry do it: a tag that points at
/// an index is answered with its linux/amd64 manifest to a client that accepts no index; a
/// manifest of a type the client does not accept is not found. An empty Accept takes anything.
fn negotiate(
    manifests: &HashMap<(String, String), (String, Bytes)>,
    repo: &str,
    reference: &str,
    accept: &str,
) -> Option<(String, Bytes)> {
    let (media_type, bytes) = manifests
        .get(&(repo.to_string(), reference.to_string()))
        .cloned()?;
    let accepted: Vec<&str> = accept
        .split(',')
        .map(|p| p.split(';').next().unwrap_or("").trim())
        .filter(|p| !p.is_empty())
        .collect();
    let takes = |t: &str| accepted.is_empty() || accepted.iter().any(|a| *a == t || *a == "*/*");
    if takes(&media_type) || reference.starts_with("sha256:") {
        return Some((media_type, bytes));
    }
    if INDEX_TYPES.contains(&media_type.as_str()) {
        let index: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        let child = index["manifests"]
            .as_array()?
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")?;
        let digest = child["digest"].as_str()?;
        let (t, b) = manifests
            .get(&(repo.to_string(), digest.to_string()))
            .cloned()?;
        return takes(&t).then_some((t, b));
    }
    None
}

pub fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() {
                T[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// Blob bodies in flight: counted from the request until the last chunk is handed to the
/// connection (before the client can have it all), or until the body is dropped.
#[derive(Default)]
pub struct InFlight {
    now: AtomicUsize,
    most: AtomicUsize,
}

impl InFlight {
    /// The most blob bodies that were in flight at once.
    pub fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }

    fn enter(state: &Arc<State>) -> InFlightBody {
        let now = state.blob_bodies.now.fetch_add(1, Ordering::SeqCst) + 1;
        state.blob_bodies.most.fetch_max(now, Ordering::SeqCst);
        InFlightBody(Some(state.clone()))
    }
}

/// One blob body counted in [`InFlight`].
struct InFlightBody(Option<Arc<State>>);

impl InFlightBody {
    fn leave(&mut self) {
        if let Some(state) = self.0.take() {
            state.blob_bodies.now.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for InFlightBody {
    fn drop(&mut self) {
        self.leave();
    }
}
