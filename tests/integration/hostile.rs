//! A hostile review of the cache layer's claims, kept as regression tests: other Accept headers
//! (q=0, wildcards, concurrent sets, moving tags), other users' and repositories' digests (foreign
//! layers, fills started under the wrong repository, two upstreams, Range and HEAD), caches of an
//! earlier pier, and upstream tag lists that page with other cursors or loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use pier_server::auth::{Auth, AuthConfig};
use pier_server::ServerOptions;
use sha2::{Digest as _, Sha256};

use crate::fake_upstream::{hex, Behaviour, FakeUpstream};
use crate::harness::{
    client, error_code, launch, settle, start, start_in, Pier, Setup, UpstreamSpec,
};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
const MULTI: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(b)))
}

struct Image {
    index: String,
    amd64: String,
    layer: String,
}

/// `library/multi:latest`: a Docker manifest list (amd64, arm64) whose amd64 manifest has one
/// layer, held by library/multi only.
fn multi_platform(up: &FakeUpstream) -> Image {
    let layer = up.add_blob_in("library/multi", vec![3u8; 30_000]);
    let amd64 = up.add_manifest(
        "library/multi",
        "amd64-only",
        V2,
        &format!(
            r#"{{"schemaVersion":2,"mediaType":"{V2}","config":{{"digest":"sha256:{}"}},"layers":[{{"digest":"{layer}"}}]}}"#,
            "a".repeat(64)
        ),
    );
    let arm64 = up.add_manifest(
        "library/multi",
        "arm64-only",
        V2,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{V2}","arch":"arm64"}}"#),
    );
    let list = format!(
        r#"{{"schemaVersion":2,"mediaType":"{LIST}","manifests":[
        {{"mediaType":"{V2}","digest":"{arm64}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
        {{"mediaType":"{V2}","digest":"{amd64}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
    );
    let index = up.add_manifest("library/multi", "latest", LIST, &list);
    Image {
        index,
        amd64,
        layer,
    }
}

fn spec(name: &'static str, up: &FakeUpstream) -> UpstreamSpec {
    let mut s = UpstreamSpec::new(name, up.url());
    s.read_timeout = Duration::from_millis(500);
    s
}

/// GET (or HEAD) with one Accept: status, content type, digest.
async fn manifest(pier: &Pier, path: &str, accept: &str, head: bool) -> (u16, String, String) {
    let url = format!("{}/v2/{path}", pier.url);
    let req = if head {
        client().head(url)
    } else {
        client().get(url)
    };
    let r = req.header("accept", accept).send().await.unwrap();
    let h = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (
        r.status().as_u16(),
        h("content-type"),
        h("docker-content-digest"),
    )
}

async fn status(url: String) -> u16 {
    client().get(url).send().await.unwrap().status().as_u16()
}

// ---------------------------------------------------------------------------------------------
// Claim 2: links. A digest is served under a repository only when the upstream served it there.
// ---------------------------------------------------------------------------------------------

fn users(rules: &[(&str, &str)]) -> (tempfile::TempDir, Auth) {
    let users = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let names: Vec<&str> = vec!["bob", "mallory"];
    let lines: String = names.iter().map(|n| format!("{n}:{hash}\n")).collect();
    std::fs::write(users.path().join("htpasswd"), lines).unwrap();
    let mut map: HashMap<String, Vec<pier_server::auth::Rule>> = HashMap::new();
    for (u, g) in rules {
        map.entry(u.to_string())
            .or_default()
            .push(pier_server::auth::Rule::pull(*g));
    }
    let auth = Auth::load(&AuthConfig {
        htpasswd: users.path().join("htpasswd"),
        anonymous: false,
        token_ttl: Duration::from_secs(60),
        rules: map,
    })
    .unwrap();
    (users, auth)
}

async fn get_as(pier: &Pier, user: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{}/v2/{path}", pier.url))
        .basic_auth(user, Some("pw"))
        .send()
        .await
        .unwrap()
}

/// A manifest in a repository mallory controls names, as a layer with `urls` (a foreign /
/// non-distributable layer), the digest of a layer only `library/app` holds. The Distribution
/// registry accepts such a push without the blob being in the repository (it checks blob
/// presence only for layers without URLs), and answers a blob request for it under that
/// repository with 404. pier links every descriptor of a fetched manifest to the repository, and
/// so serves library/app's bytes to mallory, who may pull only `evil/*`, without asking anyone.
#[tokio::test]
async fn probe_descriptor_of_a_fetched_manifest_is_not_proof_the_repository_holds_the_blob() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let secret = up.add_blob_in("library/app", vec![7u8; 50_000]);
    up.add_manifest(
        "library/app",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{OCI}","layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{secret}","size":50000}}]}}"#),
    );
    up.add_manifest(
        "evil/x",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{OCI}","layers":[{{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{secret}","size":50000,"urls":["https://example.invalid/layer"]}}]}}"#),
    );
    let (_u, auth) = users(&[("mallory", "docker.io/evil/*")]);
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![spec("docker.io", &up)];
    s.options = ServerOptions {
        auth: Some(Arc::new(auth)),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    // bob pulls library/app: its layer is cached.
    assert_eq!(get_as(&pier, "bob", "app/manifests/1").await.status(), 200);
    let r = get_as(&pier, "bob", &format!("app/blobs/{secret}")).await;
    assert_eq!(r.bytes().await.unwrap().len(), 50_000);
    settle(&pier).await;
    // mallory may not pull library/app.
    assert_eq!(
        get_as(&pier, "mallory", &format!("app/blobs/{secret}"))
            .await
            .status(),
        403
    );
    // She pulls her own manifest, then asks for the layer under her repository.
    assert_eq!(
        get_as(&pier, "mallory", "evil/x/manifests/1")
            .await
            .status(),
        200
    );
    // The upstream does not hold it there:
    assert_eq!(
        status(format!("{}/v2/evil/x/blobs/{secret}", up.url())).await,
        404
    );
    let r = get_as(&pier, "mallory", &format!("evil/x/blobs/{secret}")).await;
    let code = r.status().as_u16();
    let body = r.bytes().await.unwrap();
    assert_eq!(
        code,
        404,
        "mallory got {} bytes of library/app's layer through evil/x (upstream asked: {} HEAD)",
        body.len(),
        up.count(&format!("HEAD /v2/evil/x/blobs/{secret}"))
    );
}

/// A request for a digest under a repository that does not hold it starts the one fill for that
/// digest from that repository; a concurrent pull of the repository that does hold it joins that
/// fill and gets its 404.
#[tokio::test]
async fn probe_a_fill_started_under_the_wrong_repository_fails_the_owner_that_joins_it() {
    let data = Bytes::from(vec![5u8; 20_000]);
    let digest = sha(&data);
    let d = digest.clone();
    let up = MiniUpstream::start(Arc::new(move |method, path, _query| {
        let d = d.clone();
        let data = data.clone();
        Box::pin(async move {
            if path == format!("/v2/library/b/blobs/{d}") {
                // Slow to say no.
                tokio::time::sleep(Duration::from_millis(600)).await;
                return Reply::status(404);
            }
            if path == format!("/v2/library/a/blobs/{d}") {
                return if method == "HEAD" {
                    Reply::status(200).header("content-length", &data.len().to_string())
                } else {
                    Reply::ok(data)
                };
            }
            Reply::status(404)
        })
    }))
    .await;
    let pier = start(
        vec![{
            let mut s = UpstreamSpec::new("docker.io", up.url());
            s.read_timeout = Duration::from_secs(2);
            s
        }],
        (0, 0),
    )
    .await;
    // a is known to hold the digest (a HEAD through pier links it).
    let r = client()
        .head(format!("{}/v2/a/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wrong = tokio::spawn(status(format!("{}/v2/b/blobs/{digest}", pier.url)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let owner = status(format!("{}/v2/a/blobs/{digest}", pier.url)).await;
    assert_eq!(wrong.await.unwrap(), 404);
    assert_eq!(
        owner, 200,
        "library/a's pull failed because library/b's fill failed"
    );
}

/// Blob HEAD and Range GET under an unlinked repository while another repository's fill is in
/// progress; manifest GET/HEAD by digest under an unlinked repository; online and offline.
#[tokio::test]
async fn probe_unlinked_repository_during_fill_head_range_manifest_offline() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(60)),
        ..Behaviour::default()
    })
    .await;
    let big = up.add_blob_in("library/a", vec![1u8; 1 << 20]);
    let m = up.add_manifest(
        "library/a",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{big}"}}]}}"#),
    );
    up.add_manifest("library/b", "1", OCI, r#"{"schemaVersion":2}"#);
    let pier = start(vec![spec("docker.io", &up)], (1 << 20, 64 << 10)).await;
    assert_eq!(manifest(&pier, "a/manifests/1", MULTI, false).await.0, 200);
    let fill = tokio::spawn({
        let url = format!("{}/v2/a/blobs/{big}", pier.url);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While a's fill runs.
    let r = client()
        .head(format!("{}/v2/b/blobs/{big}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "blob HEAD under b during a's fill");
    let r = client()
        .get(format!("{}/v2/b/blobs/{big}", pier.url))
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "range GET under b during a's fill");
    assert_eq!(
        manifest(&pier, &format!("b/manifests/{m}"), MULTI, false)
            .await
            .0,
        404
    );
    assert_eq!(
        manifest(&pier, &format!("b/manifests/{m}"), MULTI, true)
            .await
            .0,
        404
    );
    assert_eq!(fill.await.unwrap(), 1 << 20);
    settle(&pier).await;
    up.set(|b| b.drop_connections = true);
    let r = client()
        .get(format!("{}/v2/b/blobs/{big}", pier.url))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = client()
        .head(format!("{}/v2/b/blobs/{big}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        manifest(&pier, &format!("b/manifests/{m}"), MULTI, true)
            .await
            .0,
        404
    );
    assert_eq!(
        manifest(&pier, &format!("b/manifests/{m}"), V2, false)
            .await
            .0,
        404
    );
    // a keeps working offline.
    assert_eq!(
        manifest(&pier, &format!("a/manifests/{m}"), MULTI, false)
            .await
            .0,
        200
    );
    let r = client()
        .get(format!("{}/v2/a/blobs/{big}", pier.url))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
}

/// Two upstreams: a digest of upstream X asked for through upstream Y (path prefix and `?ns=`)
/// must be confirmed with Y; offline, not found.
#[tokio::test]
async fn probe_digest_of_one_upstream_through_another() {
    let hub = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    let layer = hub.add_blob_in("library/app", vec![4u8; 10_000]);
    let m = hub.add_manifest(
        "library/app",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{layer}"}}]}}"#),
    );
    // ghcr has a repository of the same name, without that layer.
    ghcr.add_manifest(
        "library/app",
        "1",
        OCI,
        r#"{"schemaVersion":2,"from":"ghcr"}"#,
    );
    let pier = start(
        vec![spec("docker.io", &hub), spec("ghcr.io", &ghcr)],
        (0, 0),
    )
    .await;
    assert_eq!(
        manifest(&pier, "library/app/manifests/1", MULTI, false)
            .await
            .2,
        m
    );
    assert_eq!(
        status(format!("{}/v2/library/app/blobs/{layer}", pier.url)).await,
        200
    );
    settle(&pier).await;
    for path in [
        format!("ghcr.io/library/app/blobs/{layer}"),
        format!("library/app/blobs/{layer}?ns=ghcr.io"),
        format!("ghcr.io/library/app/manifests/{m}"),
        format!("library/app/manifests/{m}?ns=ghcr.io"),
    ] {
        assert_eq!(
            status(format!("{}/v2/{path}", pier.url)).await,
            404,
            "{path}"
        );
    }
    ghcr.set(|b| b.drop_connections = true);
    for path in [
        format!("ghcr.io/library/app/blobs/{layer}"),
        format!("ghcr.io/library/app/manifests/{m}"),
    ] {
        assert_eq!(
            status(format!("{}/v2/{path}", pier.url)).await,
            404,
            "offline {path}"
        );
    }
    // ghcr's own tag answer was never cached: offline it is an error, never docker.io's answer.
    let (s, _, d) = manifest(&pier, "ghcr.io/library/app/manifests/1", MULTI, false).await;
    assert!(s >= 500 && d != m, "{s} {d}");
}

// ---------------------------------------------------------------------------------------------
// Claim 2, restart: a cache directory of the previous version (no _links, old tag records).
// ---------------------------------------------------------------------------------------------

fn remove_links(dir: &std::path::Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.join("tags")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|f| f == "_links") {
                std::fs::remove_file(&p).unwrap();
                n += 1;
            }
        }
    }
    n
}

/// A Kubernetes-style pull by digest only (`app@sha256:...`) leaves no tag record. The previous
/// pier cached the manifest and layers the same way (blobs/, manifests/) but had no links, and a
/// repository's links are derived from its tags only: after the upgrade, pier cannot vouch that
/// the repository holds the digest, so with the upstream down it answers not-found (never bytes
/// it cannot attribute), and once the upstream confirms the digest for the repository (one HEAD,
/// no download), it serves it from cache again, offline too. (Documented in README.)
#[tokio::test]
async fn probe_upgrade_digest_pinned_image_is_confirmed_once_then_available_offline() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let layer = up.add_blob_in("library/app", vec![8u8; 10_000]);
    let m = up.add_manifest(
        "library/app",
        "1",
        OCI,
        &format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{layer}"}}]}}"#),
    );
    let pier = start(vec![spec("docker.io", &up)], (0, 0)).await;
    assert_eq!(
        manifest(&pier, &format!("app/manifests/{m}"), MULTI, false)
            .await
            .0,
        200
    );
    assert_eq!(
        status(format!("{}/v2/app/blobs/{layer}", pier.url)).await,
        200
    );
    settle(&pier).await;
    let dir = pier.stop().await;
    // What the previous version left: same blobs/ and manifests/, no _links.
    assert_eq!(remove_links(dir.path()), 1);
    up.set(|b| b.drop_connections = true);
    let pier = start_in(vec![spec("docker.io", &up)], (0, 0), dir).await;
    assert_eq!(
        manifest(&pier, &format!("app/manifests/{m}"), MULTI, false)
            .await
            .0,
        404,
        "a digest pier cannot attribute to the repository, upstream down"
    );
    up.set(|b| b.drop_connections = false);
    let gets = up.count("GET /v2/library/app/blobs/");
    assert_eq!(
        manifest(&pier, &format!("app/manifests/{m}"), MULTI, false)
            .await
            .0,
        200
    );
    assert_eq!(
        status(format!("{}/v2/app/blobs/{layer}", pier.url)).await,
        200
    );
    // Confirmed with HEADs, served from the cache.
    assert_eq!(up.count("GET /v2/library/app/blobs/"), gets);
    up.set(|b| b.drop_connections = true);
    assert_eq!(
        manifest(&pier, &format!("app/manifests/{m}"), MULTI, false)
            .await
            .0,
        200
    );
    assert_eq!(
        status(format!("{}/v2/app/blobs/{layer}", pier.url)).await,
        200
    );
}

/// Old tag records (one answer, no accept set) and no _links: offline pulls by tag still work
/// for every client, and the links are derived.
#[tokio::test]
async fn probe_upgrade_old_tag_records_offline() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let image = multi_platform(&up);
    let pier = start(vec![spec("docker.io", &up)], (0, 0)).await;
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false)
            .await
            .2,
        image.index
    );
    assert_eq!(
        manifest(
            &pier,
            &format!("multi/manifests/{}", image.amd64),
            MULTI,
            false
        )
        .await
        .0,
        200
    );
    assert_eq!(
        status(format!("{}/v2/multi/blobs/{}", pier.url, image.layer)).await,
        200
    );
    settle(&pier).await;
    let dir = pier.stop().await;
    assert_eq!(remove_links(dir.path()), 1);
    let tag = dir.path().join("tags/docker.io/library/multi/_tags/latest");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::write(
        &tag,
        format!(
            r#"{{"digest":"{}","media_type":"{LIST}","fetched_at":{}}}"#,
            image.index,
            now - 86_400
        ),
    )
    .unwrap();
    up.set(|b| b.drop_connections = true);
    let pier = start_in(vec![spec("docker.io", &up)], (0, 0), dir).await;
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false).await,
        (200, LIST.into(), image.index.clone())
    );
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", V2, false).await,
        (200, V2.into(), image.amd64.clone())
    );
    assert_eq!(
        manifest(
            &pier,
            &format!("multi/manifests/{}", image.amd64),
            MULTI,
            false
        )
        .await
        .0,
        200
    );
    assert_eq!(
        status(format!("{}/v2/multi/blobs/{}", pier.url, image.layer)).await,
        200
    );
    // Another repository still gets nothing of it.
    assert_eq!(
        status(format!("{}/v2/other/blobs/{}", pier.url, image.layer)).await,
        404
    );
}

// ---------------------------------------------------------------------------------------------
// Claim 1: accept sets.
// ---------------------------------------------------------------------------------------------

/// q=0 is documented as refusing a type; a header that refuses every index type but also has a
/// wildcard (or refuses every type it names) collapses to MODERN, and the client is handed the
/// index it refused, offline included ("NEVER a manifest of a type the client does not accept").
#[tokio::test]
async fn probe_q0_refused_index_is_not_served() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let image = multi_platform(&up);
    let pier = start(vec![spec("docker.io", &up)], (1 << 20, 64 << 10)).await;
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false)
            .await
            .2,
        image.index
    );
    assert_eq!(
        manifest(
            &pier,
            &format!("multi/manifests/{}", image.amd64),
            MULTI,
            false
        )
        .await
        .0,
        200
    );
    up.set(|b| b.drop_connections = true);
    let mut bad = Vec::new();
    for accept in [
        format!("*/*, {INDEX};q=0, {LIST};q=0"),
        format!("{INDEX};q=0, {LIST};q=0"),
        format!("application/*, {LIST};q=0, {INDEX};q=0"),
    ] {
        let (s, t, _) = manifest(&pier, "multi/manifests/latest", &accept, false).await;
        if s == 200 && (t == LIST || t == INDEX) {
            bad.push(format!("{accept:?} -> {s} {t}"));
        }
    }
    assert!(
        bad.is_empty(),
        "index served to clients that refused it: {bad:#?}"
    );
}

/// Clients with different Accepts at once, on a cold cache, then the tag moves upstream while
/// the other set's answer is still fresh.
#[tokio::test]
async fn probe_concurrent_sets_and_tag_moves() {
    let up = FakeUpstream::start(Behaviour {
        manifest_delay: Some(Duration::from_millis(200)),
        ..Behaviour::default()
    })
    .await;
    let image = multi_platform(&up);
    let mut s = spec("docker.io", &up);
    s.tag_ttl = Duration::from_secs(1);
    let pier = start(vec![s], (1 << 20, 64 << 10)).await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let url = format!("{}/v2/multi/manifests/latest", pier.url);
        let (accept, head) = match i % 4 {
            0 => (MULTI.to_string(), false),
            1 => (V2.to_string(), false),
            2 => (format!("{V2}, {OCI}"), true),
            _ => (LIST.to_string(), false),
        };
        tasks.push(tokio::spawn(async move {
            let req = if head {
                client().head(url)
            } else {
                client().get(url)
            };
            let r = req.header("accept", accept.clone()).send().await.unwrap();
            (
                accept,
                r.status().as_u16(),
                r.headers()
                    .get("docker-content-digest")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
            )
        }));
    }
    for t in tasks {
        let (accept, s, d) = t.await.unwrap();
        assert_eq!(s, 200, "{accept}");
        let want = if accept == MULTI || accept == LIST {
            &image.index
        } else {
            &image.amd64
        };
        assert_eq!(&d, want, "{accept}");
    }
    // The tag moves: a new single-platform OCI manifest.
    let moved = up.add_manifest(
        "library/multi",
        "latest",
        V2,
        &format!(r#"{{"schemaVersion":2,"mediaType":"{V2}","moved":true}}"#),
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", V2, false).await.2,
        moved
    );
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false)
            .await
            .2,
        moved
    );
    up.set(|b| b.drop_connections = true);
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false)
            .await
            .2,
        moved
    );
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", V2, false).await.2,
        moved
    );
    // A set that only ever saw the old index answer gets its own (old) answer offline.
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", LIST, false)
            .await
            .2,
        image.index
    );
    // OCI-only client: neither the old list nor the moved v2 manifest is acceptable.
    let (s, t, _) = manifest(&pier, "multi/manifests/latest", OCI, false).await;
    assert!(s >= 500, "{s} {t}");
}

/// `pier warm` (resolver and fills called directly) leaves what offline clients of every set
/// need: the index for multi-platform clients, its amd64 child for single-manifest clients, the
/// blobs linked to the repository.
#[tokio::test]
async fn probe_warm_then_offline_for_every_set() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let image = multi_platform(&up);
    let pier = start(vec![spec("docker.io", &up)], (0, 0)).await;
    let report = pier
        .mirror
        .warm(
            "multi:latest",
            &pier_server::warm::WarmOptions::default(),
            &|_| {},
        )
        .await;
    // The amd64 manifest's config digest is made up: that one blob fails.
    assert!(report.manifests >= 3, "{report:?}");
    settle(&pier).await;
    up.set(|b| b.drop_connections = true);
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", MULTI, false).await,
        (200, LIST.into(), image.index.clone())
    );
    assert_eq!(
        manifest(&pier, "multi/manifests/latest", V2, true).await,
        (200, V2.into(), image.amd64.clone())
    );
    assert_eq!(
        status(format!("{}/v2/multi/blobs/{}", pier.url, image.layer)).await,
        200
    );
    let (s, t, _) = manifest(&pier, "multi/manifests/latest", OCI, false).await;
    assert!(s >= 500, "{s} {t}");
}

/// A token issued for one repository lists, in `_catalog`, everything the user's rules allow
/// (Distribution would want a `registry:catalog:*` scope). Documents the behaviour.
#[tokio::test]
async fn probe_catalog_with_a_token_scoped_to_one_repository() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    up.add_manifest("library/app", "1", OCI, r#"{"schemaVersion":2,"a":1}"#);
    up.add_manifest("library/allowed", "1", OCI, r#"{"schemaVersion":2,"b":1}"#);
    let (_u, auth) = users(&[("mallory", "docker.io/library/allowed")]);
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![spec("docker.io", &up)];
    s.options = ServerOptions {
        auth: Some(Arc::new(auth)),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    for r in ["app", "allowed"] {
        assert_eq!(
            get_as(&pier, "bob", &format!("{r}/manifests/1"))
                .await
                .status(),
            200
        );
    }
    let token = |user: &'static str| {
        let url = format!(
            "{}/auth/token?service=pier&scope=repository:allowed:pull",
            pier.url
        );
        async move {
            let v: serde_json::Value = client()
                .get(url)
                .basic_auth(user, Some("pw"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let catalog = |t: String| {
        let url = format!("{}/v2/_catalog", pier.url);
        async move {
            let v: serde_json::Value = client()
                .get(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["repositories"].clone()
        }
    };
    // mallory's rules hold.
    assert_eq!(
        catalog(token("mallory").await).await,
        serde_json::json!(["library/allowed"])
    );
    // bob's token names library/allowed only; the catalog shows what his rules allow.
    assert_eq!(
        catalog(token("bob").await).await,
        serde_json::json!(["library/allowed", "library/app"])
    );
}

// ---------------------------------------------------------------------------------------------
// Claim 3: tag lists.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn probe_tag_list_paging_edges() {
    let up = FakeUpstream::start(Behaviour {
        tag_page_size: Some(2),
        ..Behaviour::default()
    })
    .await;
    for t in ["a", "b", "c", "d", "e"] {
        up.add_manifest("library/t", t, OCI, &format!(r#"{{"t":"{t}"}}"#));
    }
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    for t in ["x", "y", "z"] {
        ghcr.add_manifest("org/t", t, OCI, &format!(r#"{{"t":"{t}"}}"#));
    }
    let pier = start(vec![spec("docker.io", &up), spec("ghcr.io", &ghcr)], (0, 0)).await;
    let list = |q: &'static str| {
        let url = format!("{}/v2/t/tags/list{q}", pier.url);
        async move {
            let r = client().get(url).send().await.unwrap();
            let s = r.status().as_u16();
            let link = r
                .headers()
                .get("link")
                .map(|v| v.to_str().unwrap().to_string());
            let v: serde_json::Value = r.json().await.unwrap();
            (s, v["tags"].clone(), link)
        }
    };
    let all = serde_json::json!(["a", "b", "c", "d", "e"]);
    assert_eq!(list("").await, (200, all.clone(), None));
    assert_eq!(list("?n=0").await, (200, serde_json::json!([]), None));
    assert_eq!(list("?last=zzz").await, (200, serde_json::json!([]), None));
    assert_eq!(
        list("?last=bb").await,
        (200, serde_json::json!(["c", "d", "e"]), None)
    );
    assert_eq!(list("?n=4294967295").await, (200, all.clone(), None));
    assert_eq!(list("?n=5").await, (200, all.clone(), None));
    assert_eq!(
        list("?n=2&last=a").await,
        (
            200,
            serde_json::json!(["b", "c"]),
            Some(r#"</v2/t/tags/list?n=2&last=c>; rel="next""#.into())
        )
    );
    assert_eq!(
        list("?ns=docker.io&n=4").await.2,
        Some(r#"</v2/t/tags/list?ns=docker.io&n=4&last=d>; rel="next""#.into())
    );
    let r = client()
        .get(format!("{}/v2/ghcr.io/org/t/tags/list?n=1", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"].to_str().unwrap(),
        r#"</v2/ghcr.io/org/t/tags/list?n=1&last=x>; rel="next""#
    );
}

/// An upstream whose `Link` carries its own cursor (Quay before the OCI paging change sends
/// `?n=100&next_page=<token>`; OCI says to follow the Link as given): pier reads only `last=`
/// and stops after the first page, answering a truncated list as if complete.
#[tokio::test]
async fn probe_tag_list_follows_links_with_other_cursors() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let up = MiniUpstream::start(Arc::new(move |_m, path, query| {
        let c = c.clone();
        Box::pin(async move {
            if path != "/v2/library/q/tags/list" {
                return Reply::status(404);
            }
            c.fetch_add(1, Ordering::SeqCst);
            let (tags, next) = match query.as_deref() {
                None | Some("") => (vec!["a", "b"], Some("t1")),
                Some(q) if q.contains("next_page=t1") => (vec!["c", "d"], Some("t2")),
                Some(q) if q.contains("next_page=t2") => (vec!["e"], None),
                Some(_) => (vec![], None),
            };
            let mut r = Reply::json(serde_json::json!({"name":"library/q","tags":tags}));
            if let Some(n) = next {
                r = r.header(
                    "link",
                    &format!(r#"</v2/library/q/tags/list?n=2&next_page={n}>; rel="next""#),
                );
            }
            r
        })
    }))
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let v: serde_json::Value = client()
        .get(format!("{}/v2/q/tags/list", pier.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["tags"],
        serde_json::json!(["a", "b", "c", "d", "e"]),
        "upstream asked {} times",
        calls.load(Ordering::SeqCst)
    );
}

/// An upstream whose Link loops (always the same `last`), or goes backwards: pier stops.
#[tokio::test]
async fn probe_tag_list_looping_link_terminates() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let up = MiniUpstream::start(Arc::new(move |_m, _path, _query| {
        let c = c.clone();
        Box::pin(async move {
            let n = c.fetch_add(1, Ordering::SeqCst);
            // Forward-looking cursor, but the same page every time.
            Reply::json(serde_json::json!({"name":"library/l","tags":["a","b"]})).header(
                "link",
                &format!(r#"</v2/library/l/tags/list?n=2&last=b{n}>; rel="next""#),
            )
        })
    }))
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        client().get(format!("{}/v2/l/tags/list", pier.url)).send(),
    )
    .await
    .expect("pier answers")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        calls.load(Ordering::SeqCst) <= 100,
        "{}",
        calls.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------------
// A tiny programmable upstream for what the fake cannot do.
// ---------------------------------------------------------------------------------------------

type Handler = Arc<
    dyn Fn(
            String,
            String,
            Option<String>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>
        + Send
        + Sync,
>;

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }
    fn ok(body: Bytes) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-length".into(), body.len().to_string())],
            body,
        }
    }
    fn json(v: serde_json::Value) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(v.to_string()),
        }
    }
    fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

struct MiniUpstream {
    addr: SocketAddr,
}

impl MiniUpstream {
    async fn start(handler: Handler) -> MiniUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let h = handler.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let h = h.clone();
                            async move {
                                let head = req.method() == hyper::Method::HEAD;
                                let reply = h(
                                    req.method().to_string(),
                                    req.uri().path().to_string(),
                                    req.uri().query().map(str::to_string),
                                )
                                .await;
                                let mut r = Response::new(
                                    Full::new(if head { Bytes::new() } else { reply.body })
                                        .map_err(|e| -> std::io::Error { match e {} })
                                        .boxed_unsync(),
                                );
                                *r.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                                for (k, v) in reply.headers {
                                    r.headers_mut().insert(
                                        hyper::header::HeaderName::from_bytes(k.as_bytes())
                                            .unwrap(),
                                        v.parse().unwrap(),
                                    );
                                }
                                Ok::<_, std::io::Error>(r)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MiniUpstream { addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
