//! A region of nodes, in-process: real peers over loopback, an in-memory shared store, and
//! peers and stores that misbehave. pier's promises must hold across the region: no digest
//! under another repository, no open proxy, nothing unverified kept or served as complete, and
//! a bad peer or store costs a fetch, never a pull.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pier_cache::region::{ClusterConfig, Node, PeerSource, Region, RegionConfig, SharedStore};
use sha2::{Digest as _, Sha256};

use crate::fake_upstream::{hex, Behaviour, FakeUpstream};
use crate::harness::{client, launch, settle, wait_stored, Pier, Setup, UpstreamSpec};

const SECRET: &str = "region-secret-0123456789";

/// What a node of a test region has.
#[derive(Clone)]
struct NodeSpec {
    /// Takes part in the cluster (peers).
    cluster: bool,
    /// Uses the shared store.
    shared: bool,
    /// Its upstreams, by name; all point at the same fake.
    upstreams: Vec<&'static str>,
    deny: Vec<String>,
    tag_ttl: Duration,
    /// Client request rate limit of the node.
    rate_limit: Option<pier_server::limits::RateLimit>,
}

impl NodeSpec {
    fn full() -> Self {
        NodeSpec {
            cluster: true,
            shared: true,
            upstreams: vec!["docker.io"],
            deny: Vec::new(),
            tag_ttl: Duration::from_secs(300),
            rate_limit: None,
        }
    }
}

/// Starts one node per spec. `extra_peers` are listed as peers of every clustered node (fakes).
async fn region(
    up: &FakeUpstream,
    store: &Arc<InMemory>,
    specs: &[NodeSpec],
    extra_peers: &[String],
) -> Vec<Pier> {
    let mut listeners = Vec::new();
    for _ in specs {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let urls: Vec<String> = listeners
        .iter()
        .map(|l| format!("http://{}", l.local_addr().unwrap()))
        .collect();
    let clustered: Vec<String> = specs
        .iter()
        .zip(&urls)
        .filter(|(s, _)| s.cluster)
        .map(|(_, u)| u.clone())
        .chain(extra_peers.iter().cloned())
        .collect();
    let mut nodes = Vec::new();
    for ((spec, listener), url) in specs.iter().zip(listeners).zip(&urls) {
        let (spec, url, peers, store) =
            (spec.clone(), url.clone(), clustered.clone(), store.clone());
        let make = move |metrics: Arc<pier_metrics::Metrics>| {
            let shared =
                SharedStore::with_store(store as Arc<dyn ObjectStore>, "pier/", metrics.clone());
            if spec.cluster {
                let config = RegionConfig {
                    cluster: Some(ClusterConfig {
                        advertise: url,
                        peers: PeerSource::Static(peers),
                        secret: SECRET.into(),
                        timeout: Duration::from_millis(500),
                        read_timeout: Duration::from_millis(500),
                        ca_file: None,
                    }),
                    shared_store: None,
                };
                let r = Region::new(&config, metrics).unwrap();
                if spec.shared {
                    r.with_store(shared)
                } else {
                    r
                }
            } else {
                Region::with_shared_store(shared, metrics)
            }
        };
        let mut upstreams = specs_for(up, &spec.upstreams, &spec.deny);
        for u in &mut upstreams {
            u.tag_ttl = spec.tag_ttl;
        }
        let dir = tempfile::tempdir().unwrap();
        nodes.push(
            launch(Setup {
                upstreams,
                region: (spec.cluster || spec.shared).then(|| Box::new(make) as _),
                listener: Some(listener),
                options: pier_server::ServerOptions {
                    metrics_on_main: true,
                    rate_limit: spec.rate_limit,
                    ..pier_server::ServerOptions::default()
                },
                ..Setup::new(dir)
            })
            .await,
        );
    }
    nodes
}

fn specs_for(up: &FakeUpstream, names: &[&'static str], deny: &[String]) -> Vec<UpstreamSpec> {
    names
        .iter()
        .map(|n| {
            let mut s = UpstreamSpec::new(n, up.url());
            s.deny = deny.to_vec();
            s
        })
        .collect()
}

/// Who `pier` thinks owns `key`.
fn owner(pier: &Pier, key: &str) -> Node {
    pier.mirror.cache.region().unwrap().owners(key)[0].clone()
}

/// A blob (added to the upstream under `repo`) whose owner, as `asker` ranks it, is `want`.
fn blob_owned_by(up: &FakeUpstream, repo: &str, asker: &Pier, want: &Node) -> (String, Vec<u8>) {
    for i in 0u32.. {
        let data: Vec<u8> = (0..70_000u32)
            .map(|j| (j.wrapping_mul(31).wrapping_add(i)) as u8)
            .collect();
        let digest = format!("sha256:{}", hex(&Sha256::digest(&data)));
        if owner(asker, &digest) == *want {
            up.add_blob_in(repo, data.clone());
            return (digest, data);
        }
    }
    unreachable!()
}

/// GETs a blob; the status and the body as far as it came (an error mid-body ends it).
async fn get_blob(pier: &Pier, repo: &str, digest: &str) -> (u16, Vec<u8>, bool) {
    let sent = client()
        .get(format!("{}/v2/{repo}/blobs/{digest}", pier.url))
        .send()
        .await;
    // A body that fails at its first byte closes the connection before the headers went out.
    let Ok(resp) = sent else {
        return (0, Vec::new(), true);
    };
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut broke = false;
    use futures_util::StreamExt;
    while let Some(c) = stream.next().await {
        match c {
            Ok(c) => body.extend_from_slice(&c),
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    (status, body, broke)
}

/// A peer that answers every request with `answer(path)`: (status, headers, body).
type PeerAnswer = Arc<dyn Fn(&str) -> (u16, Vec<(&'static str, String)>, Bytes) + Send + Sync>;

async fn fake_peer(answer: PeerAnswer) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (status, headers, body) = answer(req.uri().path());
                    let mut b = Response::builder().status(status);
                    for (k, v) in headers {
                        b = b.header(k, v);
                    }
                    let r = b
                        .body(
                            Full::new(body)
                                .map_err(|e| -> std::io::Error { match e {} })
                                .boxed_unsync(),
                        )
                        .unwrap();
                    async move { Ok::<_, std::io::Error>(r) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    url
}

async fn peer_get(base: &str, path_and_query: &str, secret: Option<&str>) -> u16 {
    let mut req = client().get(format!("{base}{path_and_query}"));
    if let Some(s) = secret {
        req = req.header("x-pier-region-secret", s);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn the_peer_interface_is_no_open_proxy() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let spec = NodeSpec {
        deny: vec!["secret/*".into()],
        ..NodeSpec::full()
    };
    let lone = NodeSpec {
        cluster: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec.clone(), spec, lone], &[]).await;
    let d = up.add_blob_in("library/app", vec![3u8; 1000]);
    up.add_blob_in("secret/x", vec![3u8; 1000]);
    let a = &nodes[0].url;
    let ok = format!("/_pier/region/v1/blobs/{d}?upstream=docker.io&repo=library/app");
    assert_eq!(peer_get(a, &ok, Some(SECRET)).await, 200);
    // Without the secret, with one of the same length, with a prefix of it.
    assert_eq!(peer_get(a, &ok, None).await, 401);
    let wrong: String = SECRET.chars().rev().collect();
    assert_eq!(peer_get(a, &ok, Some(&wrong)).await, 401);
    assert_eq!(peer_get(a, &ok, Some(&SECRET[..10])).await, 401);
    // A node without `cluster:` answers no peer request.
    assert_eq!(peer_get(&nodes[2].url, &ok, Some(SECRET)).await, 401);
    // Upstreams and repositories the configuration does not name or permits not.
    for q in [
        format!("/_pier/region/v1/blobs/{d}?upstream=ghcr.io&repo=library/app"),
        format!("/_pier/region/v1/blobs/{d}?upstream=http://evil.example&repo=library/app"),
        format!("/_pier/region/v1/blobs/{d}?upstream=docker.io&repo=secret/x"),
        format!("/_pier/region/v1/blobs/{d}?upstream=docker.io&repo=../../etc"),
        format!("/_pier/region/v1/blobs/{d}?upstream=docker.io&repo=library%2F..%2Fsecret%2Fx"),
        format!("/_pier/region/v1/blobs/{d}?upstream=docker.io"),
        "/_pier/region/v1/manifests/latest?upstream=docker.io&repo=library/app&accept=99999"
            .to_string(),
        "/_pier/region/v1/manifests/latest?upstream=docker.io&repo=library/app&accept=x"
            .to_string(),
        "/_pier/region/v1/manifests/..%2F..%2Fx?upstream=docker.io&repo=library/app&accept=1"
            .to_string(),
        "/_pier/region/v1/blobs/sha256:..?upstream=docker.io&repo=library/app".to_string(),
        "/_pier/region/v1/tags/list?upstream=docker.io&repo=library/app".to_string(),
    ] {
        let status = peer_get(a, &q, Some(SECRET)).await;
        assert!((400..500).contains(&status), "{q}: {status}");
    }
    assert_eq!(
        up.count("secret/x"),
        0,
        "a denied repository reached the upstream"
    );
    // Only reads.
    let status = client()
        .post(format!("{a}{ok}"))
        .header("x-pier-region-secret", SECRET)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert!((400..500).contains(&status), "POST: {status}");
    // Hostile ranges are a client's problem, not a server error.
    for range in [
        "bytes=99999999999999999999999-",
        "bytes=5000-10",
        "bytes=-0",
        "bytes=0-1,3-4",
        "garbage",
    ] {
        let status = client()
            .get(format!("{a}{ok}"))
            .header("x-pier-region-secret", SECRET)
            .header("range", range)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert!(status < 500, "{range}: {status}");
    }
}

#[tokio::test]
async fn a_digest_of_one_repository_is_never_served_under_another_across_the_region() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let lone = NodeSpec {
        cluster: false,
        ..NodeSpec::full()
    };
    let nodes = region(
        &up,
        &store,
        &[NodeSpec::full(), NodeSpec::full(), lone],
        &[],
    )
    .await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // Owned by A as B ranks it: B asks A, which holds it for library/app only.
    let (d, data) = blob_owned_by(&up, "library/app", b, &Node::Peer(a.url.clone()));
    let (status, body, _) = get_blob(a, "library/app", &d).await;
    assert_eq!((status, body.len()), (200, data.len()));
    // A tag of library/app, by tag and by digest, seen by A.
    let manifest = up.add_manifest("library/app", "1.0", OCI, r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#);
    let tag_of = |node: &Pier, repo: &'static str, reference: String| {
        let url = format!("{}/v2/{repo}/manifests/{reference}", node.url);
        async move {
            client()
                .get(url)
                .header("accept", MULTI)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(tag_of(a, "library/app", "1.0".into()).await, 200);
    assert_eq!(tag_of(a, "library/app", manifest.clone()).await, 200);
    assert!(wait_stored(a, &d).await);
    settle(a).await;
    // The blob reaches the shared store (with its link for library/app).
    let key = Path::from(format!(
        "pier/blobs/sha256/{}",
        d.trim_start_matches("sha256:")
    ));
    for _ in 0..200 {
        if store.head(&key).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(store.head(&key).await.is_ok(), "not shared");
    // Upstream up: it says library/allowed has no such blob.
    for node in [b, c] {
        let (status, body, _) = get_blob(node, "library/allowed", &d).await;
        assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    }
    // Upstream down: nothing vouches for library/allowed.
    up.set(|b| b.fail_status = Some(503));
    for node in [a, b, c] {
        let (status, body, _) = get_blob(node, "library/allowed", &d).await;
        assert_ne!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    for node in [a, b, c] {
        assert_ne!(tag_of(node, "library/allowed", "1.0".into()).await, 200);
        assert_ne!(tag_of(node, "library/allowed", manifest.clone()).await, 200);
    }
    // ... while library/app is served from the region by every node, with the upstream down.
    for node in [b, c] {
        let (status, body, _) = get_blob(node, "library/app", &d).await;
        assert_eq!((status, body == data), (200, true));
        assert_eq!(tag_of(node, "library/app", "1.0".into()).await, 200);
        assert_eq!(tag_of(node, "library/app", manifest.clone()).await, 200);
    }
}

/// Wrong bytes from a peer fail that fill (nothing kept); the peer is not asked again at once,
/// so the client's retry gets the blob from the upstream.
#[tokio::test]
async fn a_peer_that_sends_wrong_bytes_costs_one_attempt_not_the_blob() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let evil = fake_peer(Arc::new(|path: &str| {
        if path.contains("/blobs/") {
            (200, vec![], Bytes::from(vec![0u8; 70_000]))
        } else {
            (404, vec![], Bytes::new())
        }
    }))
    .await;
    let spec = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec], std::slice::from_ref(&evil)).await;
    let n = &nodes[0];
    let (d, data) = blob_owned_by(&up, "library/app", n, &Node::Peer(evil.clone()));
    let (status, body, broke) = get_blob(n, "library/app", &d).await;
    assert!(
        status != 200 || broke || body.len() < data.len(),
        "wrong bytes served as complete"
    );
    settle(n).await;
    assert!(!n.mirror.cache.is_stored(&d.parse().unwrap()));
    let (status, body, _) = get_blob(n, "library/app", &d).await;
    assert_eq!(status, 200);
    assert!(body == data, "second pull got wrong bytes");
    assert!(wait_stored(n, &d).await);
}

/// A peer whose body ends early: the fill resumes from the upstream, the client sees nothing.
#[tokio::test]
async fn a_peer_that_cuts_its_body_short_costs_a_resume() {
    let up = FakeUpstream::start(Behaviour {
        ranges: true,
        ..Behaviour::default()
    })
    .await;
    let store = Arc::new(InMemory::new());
    let data: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
    let d2 = data.clone();
    let cut = fake_peer(Arc::new(move |path: &str| {
        let data = d2.lock().unwrap().clone();
        if path.contains("/blobs/") && !data.is_empty() {
            (
                200,
                vec![("content-length", data.len().to_string())],
                Bytes::from(data[..data.len() / 2].to_vec()),
            )
        } else {
            (503, vec![], Bytes::new())
        }
    }))
    .await;
    let spec = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec], std::slice::from_ref(&cut)).await;
    let n = &nodes[0];
    let (d, blob) = blob_owned_by(&up, "library/app", n, &Node::Peer(cut.clone()));
    *data.lock().unwrap() = blob.clone();
    let (status, body, broke) = get_blob(n, "library/app", &d).await;
    assert_eq!((status, broke), (200, false));
    assert!(body == blob);
}

/// An object in the shared store replaced by wrong bytes: the fill that read it fails and keeps
/// nothing, and the region does not keep failing that blob while the upstream has it.
#[tokio::test]
async fn a_corrupt_blob_in_the_shared_store_costs_one_attempt_not_the_blob() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let only_shared = NodeSpec {
        cluster: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[only_shared.clone(), only_shared], &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let data = vec![5u8; 90_000];
    let d = up.add_blob_in("library/app", data.clone());
    let (status, _, _) = get_blob(a, "library/app", &d).await;
    assert_eq!(status, 200);
    settle(a).await;
    let key = Path::from(format!(
        "pier/blobs/sha256/{}",
        d.trim_start_matches("sha256:")
    ));
    for _ in 0..200 {
        if store.head(&key).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Someone with write access to the bucket swaps the bytes (same length).
    store
        .put(&key, PutPayload::from(vec![6u8; 90_000]))
        .await
        .unwrap();
    let (status, body, broke) = get_blob(b, "library/app", &d).await;
    assert!(
        status != 200 || broke || body.len() < data.len(),
        "wrong bytes served as complete"
    );
    settle(b).await;
    assert!(!b.mirror.cache.is_stored(&d.parse().unwrap()));
    let (status, body, _) = get_blob(b, "library/app", &d).await;
    assert_eq!(status, 200);
    assert!(body == data, "second pull got wrong bytes");
    // The region's copy is right again: the upstream's bytes were shared.
    settle(b).await;
    let mut fixed = false;
    for _ in 0..200 {
        if let Ok(got) = store.get(&key).await {
            if got.bytes().await.unwrap() == data {
                fixed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fixed, "the corrupt object stayed in the shared store");
}

/// A node whose configuration lacks an upstream another node has (a rolling change): its
/// answer to peer requests for that upstream must not read as "the repository has no such
/// blob".
#[tokio::test]
async fn an_owner_without_the_upstream_does_not_make_its_blobs_unavailable() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let new = NodeSpec {
        shared: false,
        upstreams: vec!["docker.io", "ghcr.io"],
        ..NodeSpec::full()
    };
    let old = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[new, old], &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (d, data) = blob_owned_by(&up, "org/app", a, &Node::Peer(b.url.clone()));
    let (status, body, _) = get_blob(a, "ghcr.io/org/app", &d).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == data);
    let m = up.add_manifest(
        "org/app",
        "1.0",
        "application/vnd.oci.image.manifest.v1+json",
        r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":0},"layers":[]}"#,
    );
    // Whichever node owns the tag, the new node answers it.
    let resp = client()
        .get(format!("{}/v2/ghcr.io/org/app/manifests/1.0", a.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"], m.as_str());
}

const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const MULTI: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A multi-platform image under these tags of `library/multi`: (index, amd64, arm64).
fn multi_platform(up: &FakeUpstream, tags: &[&str], salt: &str) -> (String, String, String) {
    let child = |arch: &str| {
        up.add_manifest(
            "library/multi",
            &format!("{arch}-{salt}"),
            V2,
            &format!(
                r#"{{"schemaVersion":2,"mediaType":"{V2}","config":{{"digest":"sha256:aaaa"}},"arch":"{arch}","salt":"{salt}"}}"#
            ),
        )
    };
    let (amd64, arm64) = (child("amd64"), child("arm64"));
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"{LIST}","manifests":[
        {{"mediaType":"{V2}","digest":"{arm64}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
        {{"mediaType":"{V2}","digest":"{amd64}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
    );
    let mut index = String::new();
    for t in tags {
        index = up.add_manifest("library/multi", t, LIST, &list);
    }
    (index, amd64, arm64)
}

/// GET a manifest with this Accept: status, content type and digest.
async fn get_manifest(pier: &Pier, reference: &str, accept: &str) -> (u16, String, String) {
    let r = client()
        .get(format!(
            "{}/v2/library/multi/manifests/{reference}",
            pier.url
        ))
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    let (t, d) = (header("content-type"), header("docker-content-digest"));
    (status, t, d)
}

/// Tag answers shared between nodes stay per accept set: a client that takes no index gets the
/// linux/amd64 manifest on every node after a multi-platform client pulled on another, online
/// and offline, whichever node owns the tag; a client that takes neither gets nothing.
#[tokio::test]
async fn tag_answers_stay_per_accept_set_across_the_region() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let full = NodeSpec::full();
    let nodes = region(&up, &store, &[full.clone(), full.clone(), full], &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let tags = ["t0", "t1", "t2", "t3", "t4", "t5"];
    let (index, amd64, _) = multi_platform(&up, &tags, "x");
    let list = (200, LIST.to_string(), index.clone());
    let single = (200, V2.to_string(), amd64.clone());
    let (online, offline) = tags.split_at(3);
    for t in tags {
        // A multi-platform client on A: the index, then its amd64 manifest by digest.
        assert_eq!(get_manifest(a, t, MULTI).await, list, "{t}");
        assert_eq!(get_manifest(a, &amd64, MULTI).await, single, "{t}");
    }
    for t in online {
        assert_eq!(get_manifest(b, t, V2).await, single, "{t} online");
        assert_eq!(get_manifest(b, t, MULTI).await, list, "{t} online");
    }
    up.set(|b| b.drop_connections = true);
    for t in offline {
        for n in [b, c] {
            assert_eq!(get_manifest(n, t, V2).await, single, "{t} offline");
            assert_eq!(get_manifest(n, t, MULTI).await, list, "{t} offline");
            let (status, media_type, _) = get_manifest(n, t, OCI).await;
            assert!(
                status != 200 || media_type == OCI,
                "{t} offline: an OCI-only client got {media_type}"
            );
        }
    }
}

/// A tag moved upstream: no node keeps the old digest longer than tag_ttl, whichever owns it.
#[tokio::test]
async fn a_moved_tag_is_seen_by_every_node_within_tag_ttl() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let spec = NodeSpec {
        tag_ttl: Duration::from_secs(1),
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec.clone(), spec], &[]).await;
    let tags = ["m0", "m1", "m2", "m3"];
    let (old, _, _) = multi_platform(&up, &tags, "old");
    for t in tags {
        for n in &nodes {
            assert_eq!(get_manifest(n, t, MULTI).await.2, old, "{t}");
        }
    }
    let (new, _, _) = multi_platform(&up, &tags, "new");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for t in tags {
        // The other node first: the owner may not have revalidated yet.
        for n in nodes.iter().rev() {
            assert_eq!(get_manifest(n, t, MULTI).await.2, new, "{t} on {}", n.url);
        }
    }
}

/// A node's per-address request rate limit is for clients: its peers' requests (one address
/// carrying a whole node's misses) are not refused by it, or every miss they route to it would
/// turn into an upstream fetch of their own.
#[tokio::test]
async fn the_client_rate_limit_does_not_refuse_peers() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let plain = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let limited = NodeSpec {
        rate_limit: Some(pier_server::limits::RateLimit {
            per_second: 0.1,
            burst: 1.0,
        }),
        ..plain.clone()
    };
    let nodes = region(&up, &store, &[limited, plain.clone(), plain], &[]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    // Distinct blobs owned by A.
    let mut i = 0u32;
    while blobs.len() < 5 {
        i += 1;
        let data: Vec<u8> = (0..30_000u32)
            .map(|j| (j ^ i.wrapping_mul(7919)) as u8)
            .collect();
        let d = format!("sha256:{}", hex(&Sha256::digest(&data)));
        if owner(b, &d) == Node::Peer(a.url.clone()) && !blobs.iter().any(|(x, _)| *x == d) {
            up.add_blob_in("library/app", data.clone());
            blobs.push((d, data));
        }
    }
    for n in [b, c] {
        for (d, data) in &blobs {
            let (status, body, _) = get_blob(n, "library/app", d).await;
            assert_eq!(status, 200);
            assert!(body == *data);
        }
    }
    let gets = up.count("GET /v2/library/app/blobs/");
    assert_eq!(
        gets,
        blobs.len(),
        "the region fetched {gets} times for {} blobs",
        blobs.len()
    );
}

/// A store that accepts connections and never answers (a black-holed link), or refuses them:
/// pulls go on from the upstream at about their usual pace, not after minutes of retries.
#[tokio::test]
async fn a_dead_shared_store_costs_little_time() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    for endpoint in [format!("http://{hole_addr}"), format!("http://{closed}")] {
        let config = pier_cache::region::SharedStoreConfig {
            endpoint: endpoint.clone(),
            bucket: "pier".into(),
            prefix: "pier/".into(),
            region: "us-east-1".into(),
            path_style: true,
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
        };
        let make = move |metrics: Arc<pier_metrics::Metrics>| {
            Region::new(
                &RegionConfig {
                    cluster: None,
                    shared_store: Some(config),
                },
                metrics,
            )
            .unwrap()
        };
        let node = launch(Setup {
            upstreams: vec![UpstreamSpec::new("docker.io", up.url())],
            region: Some(Box::new(make)),
            ..Setup::new(tempfile::tempdir().unwrap())
        })
        .await;
        let started = std::time::Instant::now();
        for i in 0..3u8 {
            let data = vec![i; 20_000 + usize::from(i)];
            let d = up.add_blob_in("library/app", data.clone());
            let pulled =
                tokio::time::timeout(Duration::from_secs(20), get_blob(&node, "library/app", &d))
                    .await;
            let Ok((status, body, _)) = pulled else {
                panic!("{endpoint}: a pull waited 20 s for a dead store");
            };
            assert_eq!(status, 200);
            assert!(body == data);
        }
        let (index, _, _) = multi_platform(&up, &["dead-store"], "d");
        let got = tokio::time::timeout(
            Duration::from_secs(20),
            get_manifest(&node, "dead-store", MULTI),
        )
        .await
        .unwrap_or_else(|_| panic!("{endpoint}: a tag waited 20 s for a dead store"));
        assert_eq!(got.2, index);
        let took = started.elapsed();
        assert!(
            // One 5 s read timeout for the black hole; the rest is headroom for a busy machine.
            took < Duration::from_secs(15),
            "{endpoint}: 3 blobs and a tag took {took:?} with the store dead"
        );
    }
}

/// A peer that lies about manifests: for a tag, bytes that do not match the digest it names;
/// for a digest, another (self-consistent) manifest. Neither is taken: the node asks the
/// upstream, and every client gets the right manifest.
#[tokio::test]
async fn a_peer_that_lies_about_manifests_is_not_believed() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let other = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","evil":1}"#;
    let other_digest = format!("sha256:{}", hex(&Sha256::digest(other)));
    let evil = fake_peer(Arc::new(move |path: &str| {
        let headers = vec![
            ("content-type", V2.to_string()),
            ("docker-content-digest", other_digest.clone()),
        ];
        if path.contains("/manifests/sha256:") {
            (200, headers, Bytes::from_static(other))
        } else {
            (200, headers, Bytes::from_static(b"{\"not\":\"it\"}"))
        }
    }))
    .await;
    let spec = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec], std::slice::from_ref(&evil)).await;
    let n = &nodes[0];
    // Six tags, at least one of which the lying peer owns (ports, hence owners, vary per run).
    let evil_node = Node::Peer(evil.clone());
    let owned_by_evil = |t: &str| owner(n, &format!("docker.io/library/multi:{t}")) == evil_node;
    let first_evil = (0..)
        .map(|i| format!("l{i}"))
        .find(|t| owned_by_evil(t))
        .expect("some tag is the peer's");
    let names: Vec<String> = std::iter::once(first_evil)
        .chain((100..105).map(|i| format!("l{i}")))
        .collect();
    let tags: Vec<&str> = names.iter().map(String::as_str).collect();
    let (index, amd64, arm64) = multi_platform(&up, &tags, "l");
    assert!(tags.iter().any(|t| owned_by_evil(t)));
    for t in tags {
        assert_eq!(get_manifest(n, t, MULTI).await.2, index, "{t}");
    }
    for d in [&amd64, &arm64] {
        assert_eq!(get_manifest(n, d, MULTI).await.2, *d);
    }
}

/// A peer that answers a range other than the one asked for (a 206 from byte 5 to a request
/// from byte 0): that fill fails, the peer is skipped, and the retry is served.
#[tokio::test]
async fn a_peer_that_answers_the_wrong_range_costs_one_attempt_not_the_blob() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let evil = fake_peer(Arc::new(|path: &str| {
        if path.contains("/blobs/") {
            (
                206,
                vec![("content-range", "bytes 5-69999/70000".to_string())],
                Bytes::from(vec![1u8; 69_995]),
            )
        } else {
            (404, vec![], Bytes::new())
        }
    }))
    .await;
    let spec = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec], std::slice::from_ref(&evil)).await;
    let n = &nodes[0];
    let (d, data) = blob_owned_by(&up, "library/app", n, &Node::Peer(evil.clone()));
    let (status, _, _) = get_blob(n, "library/app", &d).await;
    assert_ne!(status, 200, "a range past the one asked for was served");
    settle(n).await;
    let (status, body, _) = get_blob(n, "library/app", &d).await;
    assert_eq!(status, 200);
    assert!(body == data, "second pull got wrong bytes");
}

/// Peers that refuse connections or never answer: each costs its timeout once, then is skipped;
/// every pull is served.
#[tokio::test]
async fn dead_peers_cost_a_timeout_not_a_pull() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_url = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let spec = NodeSpec {
        shared: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[spec], &[hole_url.clone(), closed.clone()]).await;
    let n = &nodes[0];
    let started = std::time::Instant::now();
    for dead in [&hole_url, &closed] {
        let (d, data) = blob_owned_by(&up, "library/app", n, &Node::Peer(dead.clone()));
        let (status, body, broke) = get_blob(n, "library/app", &d).await;
        assert_eq!((status, broke), (200, false));
        assert!(body == data);
        // Skipped now: left out of the ranking.
        let ranked = n.mirror.cache.region().unwrap().owners(&d);
        assert!(
            !ranked.contains(&Node::Peer(dead.clone())),
            "{dead} still ranked"
        );
    }
    let (index, _, _) = multi_platform(&up, &["dead-peers"], "p");
    assert_eq!(get_manifest(n, "dead-peers", MULTI).await.2, index);
    assert!(
        // Each dead peer costs peer_timeout (0.5 s) once; the rest is headroom for a busy machine.
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

/// A repository's first image on a node: its links reach the shared store like any other's, so
/// that a node with an empty disk serves it by digest (and its layers) with the upstream down.
/// (A repository's first links were derived from the tag record written just before them, and
/// what is derived counts as linked already: they were never shared.)
#[tokio::test]
async fn the_first_image_of_a_repository_is_linked_for_the_region() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let store = Arc::new(InMemory::new());
    let lone = NodeSpec {
        cluster: false,
        ..NodeSpec::full()
    };
    let nodes = region(&up, &store, &[lone.clone(), lone], &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let layer = vec![8u8; 30_000];
    let layer_digest = up.add_blob_in("library/first", layer.clone());
    let body = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{layer_digest}","size":30000}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":30000}}]}}"#
    );
    let m = up.add_manifest("library/first", "1", OCI, &body);
    // As a client pulls: the tag, then the layer.
    let r = client()
        .get(format!("{}/v2/library/first/manifests/1", a.url))
        .header("accept", MULTI)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get_blob(a, "library/first", &layer_digest).await.0, 200);
    settle(a).await;
    let link = |d: &str| {
        Path::from(format!(
            "pier/links/docker.io/library/first/sha256/{}",
            d.trim_start_matches("sha256:")
        ))
    };
    for _ in 0..200 {
        if store.head(&link(&m)).await.is_ok() && store.head(&link(&layer_digest)).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        store.head(&link(&m)).await.is_ok(),
        "manifest link not shared"
    );
    assert!(
        store.head(&link(&layer_digest)).await.is_ok(),
        "layer link not shared"
    );
    up.set(|b| b.drop_connections = true);
    let r = client()
        .get(format!("{}/v2/library/first/manifests/{m}", b.url))
        .header("accept", MULTI)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, got, _) = get_blob(b, "library/first", &layer_digest).await;
    assert_eq!(status, 200);
    assert!(got == layer);
}
