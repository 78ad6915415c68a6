//! Hostile review of the hosted-repository changes: index children that must be manifests of
//! their own repository (and what a mount, a blob, a delete or a referrers query can make of
//! another repository's manifests), garbage collection of untagged children, upload session
//! limits and the slots clients that hang up leave behind, PATCH ranges, an old cache directory,
//! and `docker search` merging a hostile upstream search.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pier_oci::{Algorithm, Digest, Hasher};
use pier_server::auth::Auth;
use pier_server::ServerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, Pier, Setup, UpstreamSpec};

use crate::pushing::{
    as_user, digest_of, header, image_manifest, push_blob, put_manifest, start, start_with_users,
    upload_data, upload_dirs, users, OCI_INDEX, OCI_MANIFEST,
};

/// An index naming `child` with extra descriptor fields (`extra` starts with a comma, or is
/// empty).
fn index_naming(child: &str, size: usize, extra: &str) -> String {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{child}","size":{size}{extra}}}]}}"#
    )
}

async fn status(pier: &Pier, user: Option<&str>, method: reqwest::Method, path: &str) -> u16 {
    as_user(
        client().request(method, format!("{}{path}", pier.url)),
        user,
    )
    .send()
    .await
    .unwrap()
    .status()
    .as_u16()
}

/// Pushes an image (config and one layer of `tag` bytes) to `repo` under `reference`; returns
/// the manifest and its digest.
async fn push_image(
    pier: &Pier,
    user: Option<&str>,
    repo: &str,
    reference: &str,
    seed: &str,
) -> (String, String) {
    let config = push_blob(
        pier,
        user,
        repo,
        format!("{{\"seed\":\"{seed}\"}}").as_bytes(),
    )
    .await;
    let layer = push_blob(pier, user, repo, format!("layer of {seed}").as_bytes()).await;
    let manifest = image_manifest(&config, &[&layer]);
    let r = put_manifest(pier, user, repo, reference, OCI_MANIFEST, &manifest).await;
    assert_eq!(r.status(), 201, "{repo}:{reference}: {:?}", r.text().await);
    let d = digest_of(manifest.as_bytes());
    (manifest, d)
}

async fn gc(pier: &Pier) -> serde_json::Value {
    let r = client()
        .post(format!("{}/admin/gc", pier.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn start_session(pier: &Pier, user: Option<&str>, repo: &str) -> reqwest::Response {
    as_user(
        client().post(format!("{}/v2/{repo}/blobs/uploads/", pier.url)),
        user,
    )
    .send()
    .await
    .unwrap()
}

/// Sends `head` (request line and headers, no blank line) and `body` by hand, then hangs up
/// after `linger` without reading an answer: a client whose network went away.
async fn send_and_hang_up(pier: &Pier, head: &str, body: &[u8], linger: Duration) {
    let addr = pier.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("{head}\r\nHost: {addr}\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(linger).await;
    drop(s);
}

/// Sends `req` over HTTP/2 (prior knowledge) and gives up on it after `linger`: the client
/// resets its stream, and hyper drops the request's future then and there. (On HTTP/1 pier
/// serves half-closed connections, so a client's hang-up goes unnoticed until the answer.)
async fn send_and_cancel(req: reqwest::RequestBuilder, linger: Duration) {
    let _ = tokio::time::timeout(linger, req.send()).await;
}

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Index children, mounts, deletes and referrers across repositories
// ---------------------------------------------------------------------------------------------

/// An index child whose descriptor carries `urls` (or a foreign media type) is still a child
/// manifest: the Distribution registry checks every child of a manifest list exists in the
/// repository, whatever its descriptor says. pier skips the check for "foreign" children, so an
/// index naming a manifest of another repository (one the pusher may not even pull) is taken
/// and served, dangling.
#[tokio::test]
async fn an_index_child_with_urls_must_still_be_a_manifest_of_the_repository() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let (manifest, md) = push_image(&pier, None, "team/a", "1.0", "a").await;
    let foreign = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    let mut taken = Vec::new();
    for index in [
        index_naming(&md, manifest.len(), r#","urls":["https://example.com/m"]"#),
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{foreign}","digest":"{md}","size":{}}}]}}"#,
            manifest.len()
        ),
    ] {
        let r = put_manifest(&pier, None, "team/b", "multi", OCI_INDEX, &index).await;
        let got = r.status().as_u16();
        let body = r.text().await.unwrap();
        taken.push((got, body));
    }
    // What team/b now serves: an index whose child it does not hold.
    let served = status(
        &pier,
        None,
        reqwest::Method::GET,
        "/v2/team/b/manifests/multi",
    )
    .await;
    let child = format!("/v2/team/b/manifests/{md}");
    let child = status(&pier, None, reqwest::Method::GET, &child).await;
    assert!(
        taken
            .iter()
            .all(|(s, b)| *s == 400 && b.contains("MANIFEST_BLOB_UNKNOWN")),
        "{taken:?}; team/b:multi {served}, its child {child}"
    );
}

/// An image manifest whose config names `urls` is no foreign layer: the Distribution registry
/// requires the config in the repository. pier takes a manifest whose config the repository
/// does not hold when its descriptor has `urls`.
#[tokio::test]
async fn a_config_with_urls_must_still_be_held() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let layer = push_blob(&pier, None, "team/b", b"b's layer").await;
    let missing = digest_of(b"a config team/b never had");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{missing}","size":2,"urls":["https://example.com/c"]}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":1}}]}}"#
    );
    let r = put_manifest(&pier, None, "team/b", "1.0", OCI_MANIFEST, &manifest).await;
    let got = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(got, 400, "{body}");
    assert!(body.contains("MANIFEST_BLOB_UNKNOWN"), "{body}");
}

/// A manifest of team/a mounted into team/b (alice may pull team/a) is a blob of team/b: no
/// index of team/b may name it, and team/b does not serve it as a manifest, by GET, HEAD,
/// DELETE or referrers.
#[tokio::test]
async fn a_mounted_manifest_is_a_blob_of_the_target() {
    let (_dir, _up, pier) = start_with_users().await;
    let alice = Some("alice");
    let (manifest, md) = push_image(&pier, alice, "team/a", "1.0", "a").await;
    // A referrer of it in team/a, whose bytes team/b also gets as a blob.
    let config = push_blob(&pier, alice, "team/a", b"{}").await;
    let referrer = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/x-sig","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{}}}}}"#,
        manifest.len()
    );
    let rd = digest_of(referrer.as_bytes());
    let r = put_manifest(&pier, alice, "team/a", &rd, OCI_MANIFEST, &referrer).await;
    assert_eq!(r.status(), 201);
    for d in [&md, &rd] {
        let r = as_user(
            client().post(format!(
                "{}/v2/team/b/blobs/uploads/?mount={d}&from=team/a",
                pier.url
            )),
            alice,
        )
        .send()
        .await
        .unwrap();
        assert_eq!(r.status(), 201, "mount {d}");
    }
    // A blob of team/b now...
    let blob = format!("/v2/team/b/blobs/{md}");
    assert_eq!(status(&pier, alice, reqwest::Method::GET, &blob).await, 200);
    // ...and no manifest of it.
    let index = index_naming(&md, manifest.len(), "");
    let r = put_manifest(&pier, alice, "team/b", "multi", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let path = format!("/v2/team/b/manifests/{md}");
    for m in [reqwest::Method::GET, reqwest::Method::HEAD] {
        assert_eq!(status(&pier, alice, m.clone(), &path).await, 404, "{m}");
    }
    assert_eq!(
        status(&pier, alice, reqwest::Method::DELETE, &path).await,
        404
    );
    let r = as_user(
        client().get(format!("{}/v2/team/b/referrers/{md}", pier.url)),
        alice,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"], serde_json::json!([]), "{v}");
    // The failed DELETE took nothing from team/b or team/a.
    assert_eq!(status(&pier, alice, reqwest::Method::GET, &blob).await, 200);
    let a = format!("/v2/team/a/manifests/{md}");
    assert_eq!(status(&pier, alice, reqwest::Method::GET, &a).await, 200);
    let r = as_user(
        client().get(format!("{}/v2/team/a/referrers/{md}", pier.url)),
        alice,
    )
    .send()
    .await
    .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"][0]["digest"], rd.as_str(), "{v}");
}

/// Children pushed by digest only (no tag, as `skopeo copy --all` pushes them) survive garbage
/// collection while an index of their repository names them, tagged or not; an untagged
/// manifest survives on its own too (it was pushed to the repository); deleting the index
/// leaves the children.
#[tokio::test]
async fn untagged_children_of_an_index_survive_garbage_collection() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let (child, cd) = push_image(&pier, None, "team/m", "placeholder", "child").await;
    // Pushed by digest as well, then the tag that carried it goes: the child is untagged.
    let r = put_manifest(&pier, None, "team/m", &cd, OCI_MANIFEST, &child).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        status(
            &pier,
            None,
            reqwest::Method::DELETE,
            "/v2/team/m/manifests/placeholder"
        )
        .await,
        202
    );
    let index = index_naming(&cd, child.len(), "");
    let id = digest_of(index.as_bytes());
    let r = put_manifest(&pier, None, "team/m", "1.0", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let pulls = |pier: &Pier| {
        let paths = [
            format!("/v2/team/m/manifests/{cd}"),
            format!("/v2/team/m/blobs/{}", digest_of(b"{\"seed\":\"child\"}")),
            format!("/v2/team/m/blobs/{}", digest_of(b"layer of child")),
        ];
        let url = pier.url.clone();
        async move {
            for p in paths {
                let r = client().get(format!("{url}{p}")).send().await.unwrap();
                assert_eq!(r.status(), 200, "{p}");
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = gc(&pier).await;
    assert_eq!(report["removed"], 0, "{report}");
    pulls(&pier).await;
    // The index untagged (still a manifest of team/m by digest).
    assert_eq!(
        status(
            &pier,
            None,
            reqwest::Method::DELETE,
            "/v2/team/m/manifests/1.0"
        )
        .await,
        202
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = gc(&pier).await;
    assert_eq!(report["removed"], 0, "{report}");
    pulls(&pier).await;
    let ip = format!("/v2/team/m/manifests/{id}");
    assert_eq!(status(&pier, None, reqwest::Method::GET, &ip).await, 200);
    // The index deleted: it goes, the child (pushed by digest) stays.
    assert_eq!(status(&pier, None, reqwest::Method::DELETE, &ip).await, 202);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = gc(&pier).await;
    assert_eq!(report["removed"], 1, "{report}");
    assert_eq!(report["manifests"], 1, "{report}");
    pulls(&pier).await;
    // And across a restart.
    let dir = pier.stop().await;
    let hosted = pier_cache::HostedConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], Some(dir)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = gc(&pier).await;
    assert_eq!(report["removed"], 0, "{report}");
    pulls(&pier).await;
}

// ---------------------------------------------------------------------------------------------
// Upload slots: clients that hang up, and who may take them
// ---------------------------------------------------------------------------------------------

/// A client that sends `PUT ?digest=` and hangs up while pier verifies the upload (a large
/// upload finished with sha512 is hashed from its file) must not take the session's slot or
/// its reserved bytes with it: the request's future is dropped after the blocking commit removed
/// the session, before the slot and the bytes were given back, and expiry never frees a slot
/// whose session is gone from disk ("gone already: its slot went with it"). The per-client
/// limit then refuses that client for good (until a restart), and the hosted budget keeps the
/// bytes.
#[tokio::test]
async fn a_client_hanging_up_during_the_final_put_leaks_no_slot() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_uploads_per_client: 1,
        upload_expiry: Duration::from_secs(2),
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let c = client();
    // 16 MiB finished as sha512: pier hashes the file when the PUT comes (seconds, in a debug
    // build). Hashed here first, so that the session does not expire meanwhile.
    let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 253) as u8).collect();
    let mut hasher = Hasher::new(Algorithm::Sha512);
    hasher.update(&data);
    let digest = hasher.finish();
    let r = start_session(&pier, None, "team/a").await;
    assert_eq!(r.status(), 202);
    let location = header(&r, "location");
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        let first = i * (4 << 20);
        let r = c
            .patch(format!("{}{location}", pier.url))
            .header(
                "content-range",
                format!("{first}-{}", first + chunk.len() - 1),
            )
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let started = Instant::now();
    let put = h2_client().put(format!("{}{location}?digest={digest}", pier.url));
    send_and_cancel(put, Duration::from_millis(100)).await;
    let blob = pier
        .dir
        .path()
        .join("blobs/sha512")
        .join(&digest.hex()[..2])
        .join(digest.hex());
    // The commit goes on without the client: the blob lands and the session goes.
    while (upload_dirs(&pier) > 0 || !blob.exists()) && started.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hashed = started.elapsed();
    assert!(blob.exists() && upload_dirs(&pier) == 0, "{hashed:?}");
    assert!(
        hashed > Duration::from_millis(100),
        "hashed in {hashed:?}: no window"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client retries: the blob is not in team/a (the PUT never got to link it), so it
    // needs a new session, which its one slot must allow, now and after the expiry.
    let r = client()
        .head(format!("{}/v2/team/a/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    let linked = r.status().as_u16();
    let usage = pier.mirror.cache.hosted_usage();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    pier.mirror.cache.expire_uploads().await;
    let r = start_session(&pier, None, "team/a").await;
    let got = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(
        (got.as_u16(), usage.uploading_bytes),
        (202, 0),
        "hashed in {hashed:?}; HEAD in team/a {linked}; a new session: {body}"
    );
}

/// A monolithic upload (`POST ?digest=`) whose client hangs up mid-body leaves a session the
/// client never learned the id of: it must not hold one of the client's slots until
/// `upload_expiry` (an hour by default). The body's failure reaches pier, which cancels it.
#[tokio::test]
async fn an_interrupted_monolithic_upload_frees_its_slot() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_uploads_per_client: 1,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let d = digest_of(&[7u8; 1_000_000]);
    let head =
        format!("POST /v2/team/a/blobs/uploads/?digest={d} HTTP/1.1\r\nContent-Length: 1000000");
    send_and_hang_up(&pier, &head, &[7u8; 3000], Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = upload_dirs(&pier);
    let r = start_session(&pier, None, "team/a").await;
    let got = r.status();
    let body = r.text().await.unwrap();
    assert_eq!((got.as_u16(), left), (202, 0), "{body}");
}

/// A chunk is all or nothing (README): a PATCH whose client hangs up mid-body, after more than
/// a write batch (1 MiB) arrived, is cut back.
#[tokio::test]
async fn a_patch_whose_client_hangs_up_keeps_nothing_of_the_chunk() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let r = start_session(&pier, None, "team/a").await;
    let location = header(&r, "location");
    let head =
        format!("PATCH {location} HTTP/1.1\r\nContent-Range: 0-4194303\r\nContent-Length: 4194304");
    send_and_hang_up(
        &pier,
        &head,
        &vec![1u8; (5 << 20) / 2],
        Duration::from_millis(500),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = client()
        .get(format!("{}{location}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let data = upload_data(&pier, &location);
    let kept = std::fs::metadata(data).unwrap().len();
    let usage = pier.mirror.cache.hosted_usage();
    assert_eq!(
        (header(&r, "range"), kept, usage.uploading_bytes),
        ("0-0".to_string(), 0, 0)
    );
}

/// A client that sent a whole PATCH body and hangs up before the answer (its link dropped) gets
/// the chunk kept whole or not at all: pier stops polling the request once it sees the
/// connection's end, which can be while the chunk's batches are still being written.
#[tokio::test]
async fn a_whole_patch_then_a_hang_up_keeps_all_or_nothing() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    // The end of the connection can come before or after pier wrote the chunk's last batch:
    // a few tries.
    let n = (4usize << 20) + 12_345;
    let mut kept = Vec::new();
    for i in 0..10 {
        let r = start_session(&pier, None, "team/a").await;
        let location = header(&r, "location");
        let patch = h2_client()
            .patch(format!("{}{location}", pier.url))
            .header("content-range", format!("0-{}", n - 1))
            .body(vec![1u8; n]);
        send_and_cancel(patch, Duration::from_millis(10 * i)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let data = upload_data(&pier, &location);
        kept.push(std::fs::metadata(data).unwrap().len());
    }
    let usage = pier.mirror.cache.hosted_usage();
    assert!(
        kept.iter().all(|&k| k == 0 || k == n as u64),
        "of {n} bytes, kept {kept:?}"
    );
    assert_eq!(usage.uploading_bytes, kept.iter().sum::<u64>());
}

/// A monolithic upload whose client sent the whole blob and hangs up before the answer: the
/// session pier opened for it (whose id the client never learned, so it cannot cancel it) must
/// not keep one of the client's slots.
#[tokio::test]
async fn a_whole_monolithic_upload_then_a_hang_up_frees_its_slot() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_uploads_per_client: 1,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let n = 8usize << 20;
    let body = vec![9u8; n];
    let d = digest_of(&body);
    let post = h2_client()
        .post(format!("{}/v2/team/a/blobs/uploads/?digest={d}", pier.url))
        .body(body);
    send_and_cancel(post, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = upload_dirs(&pier);
    let linked = client()
        .head(format!("{}/v2/team/a/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap()
        .status();
    let usage = pier.mirror.cache.hosted_usage();
    let r = start_session(&pier, None, "team/a").await;
    let got = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(
        (got.as_u16(), usage.uploading_bytes),
        (202, 0),
        "sessions left {left}, blob in team/a: {linked}; {text}"
    );
}

/// A client bound to a loopback address of its own (127.0.0.x: another caller to pier).
fn client_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(ip))
        .build()
        .unwrap()
}

/// Per-client slots: an anonymous address that used up its own slots blocks neither another
/// address nor a user behind the same address (users count by name), and no header the client
/// sends (`X-Forwarded-For`) makes it another caller. The node's limit is shared by all.
#[tokio::test]
async fn an_anonymous_address_takes_only_its_own_slots() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    s.hosted_repositories = vec!["team/**".into(), "local/*".into()];
    s.allow_anonymous_push = true;
    s.hosted = pier_cache::HostedConfig {
        max_uploads: 5,
        max_uploads_per_client: 2,
        ..Default::default()
    };
    s.options = ServerOptions {
        auth: Some(users(dir.path())),
        metrics_on_main: true,
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    let uploads = format!("{}/v2/team/a/blobs/uploads/", pier.url);
    let one = client_from([127, 0, 0, 1]);
    for _ in 0..2 {
        assert_eq!(one.post(&uploads).send().await.unwrap().status(), 202);
    }
    for forwarded in ["10.9.8.7", "127.0.0.9", "alice"] {
        let r = one
            .post(&uploads)
            .header("x-forwarded-for", forwarded)
            .header("forwarded", format!("for={forwarded}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429, "{forwarded}");
        let body = r.text().await.unwrap();
        assert!(body.contains("hosted.max_uploads_per_client"), "{body}");
    }
    // alice, from the same address, has her own.
    for _ in 0..2 {
        let r = one
            .post(&uploads)
            .basic_auth("alice", Some("pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    // Another anonymous address has its own, up to the node's limit.
    let two = client_from([127, 0, 0, 2]);
    assert_eq!(two.post(&uploads).send().await.unwrap().status(), 202);
    let r = two.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("hosted.max_uploads is 5"));
}

/// Odd PATCH framing with a Content-Range: a Content-Length and chunked encoding together, no
/// body at all, ranges that are not `<first>-<last>` in digits. Each is refused, the session
/// unchanged, and the answer says where the session is.
#[tokio::test]
async fn odd_patch_framings_are_refused_and_keep_nothing() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, None, Default::default(), vec![], None).await;
    let c = client();
    let r = start_session(&pier, None, "team/a").await;
    let location = header(&r, "location");
    let at = format!("{}{location}", pier.url);
    let r = c
        .patch(&at)
        .header("content-range", "0-9")
        .body(vec![1u8; 10])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let data = upload_data(&pier, &location);
    let addr = pier.url.trim_start_matches("http://").to_string();
    let raw = |head: String, body: Vec<u8>| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let _ = s.write_all(&body).await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).into_owned()
        }
    };
    // Content-Length agreeing with the range, and a chunked body twice as long.
    let mut chunked = format!("{:x}\r\n", 20).into_bytes();
    chunked.extend_from_slice(&[2u8; 20]);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = raw(
        format!(
            "PATCH {location} HTTP/1.1\r\nContent-Range: 10-19\r\nContent-Length: 10\r\nTransfer-Encoding: chunked"
        ),
        chunked,
    )
    .await;
    let status = answer.split(' ').nth(1).unwrap_or("none").to_string();
    assert!(status == "400" || status == "416", "{answer}");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 10, "{answer}");
    // A range and no body at all (neither Content-Length nor chunked).
    let answer = raw(
        format!("PATCH {location} HTTP/1.1\r\nContent-Range: 10-19"),
        Vec::new(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 416"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("\r\nrange: 0-9\r\n"), "{answer}");
    assert!(lower.contains(&format!("\r\nlocation: {location}\r\n").to_ascii_lowercase()));
    assert!(lower.contains("docker-upload-uuid: "), "{answer}");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 10);
    // Not digits-dash-digits.
    for range in [
        "+10-19",
        "10-+19",
        "10-19,20-29",
        "10 - 19",
        "bytes=10-19",
        "0x0a-19",
    ] {
        let r = c
            .patch(&at)
            .header("content-range", range)
            .body(vec![3u8; 10])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{range}");
    }
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(header(&r, "range"), "0-9");
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 10);
    assert_eq!(pier.mirror.cache.hosted_usage().uploading_bytes, 10);
}

// ---------------------------------------------------------------------------------------------
// Cache directories of an earlier version
// ---------------------------------------------------------------------------------------------

/// What an earlier pier left: no `_manifests` files, no marker that they were recorded.
fn make_it_old(dir: &std::path::Path) {
    fn walk(p: &std::path::Path) {
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path());
            } else if e.file_name() == "_manifests" || e.file_name() == "_manifests_recorded" {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    walk(&dir.join("tags"));
}

/// A plain mirror (no hosted repositories) on a cache directory of an earlier version starts,
/// and serves what it cached, the upstream down.
#[tokio::test]
async fn a_plain_mirror_serves_an_earlier_versions_cache() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let layer = up.add_blob_in("library/app", vec![4u8; 5000]);
    let config = up.add_blob_in("library/app", b"{}".to_vec());
    let manifest = image_manifest(&config, &[&layer]);
    let md = up.add_manifest("library/app", "1.0", OCI_MANIFEST, &manifest);
    let plain = |dir: tempfile::TempDir| {
        let mut s = Setup::new(dir);
        s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
        launch(s)
    };
    let pier = plain(tempfile::tempdir().unwrap()).await;
    let c = client();
    for path in [
        "/v2/app/manifests/1.0".to_string(),
        format!("/v2/app/blobs/{layer}"),
    ] {
        let r = c.get(format!("{}{path}", pier.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.bytes().await.unwrap();
    }
    crate::harness::settle(&pier).await;
    let dir = pier.stop().await;
    make_it_old(dir.path());
    up.set(|b| b.fail_status = Some(503));
    let pier = plain(dir).await;
    for path in [
        "/v2/app/manifests/1.0".to_string(),
        format!("/v2/app/manifests/{md}"),
        format!("/v2/app/blobs/{layer}"),
    ] {
        let r = c.get(format!("{}{path}", pier.url)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let r = c
        .get(format!("{}/v2/_catalog", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]), "{v}");
}

/// Hosted content of an earlier version (no record of which digests were pushed as manifests):
/// at start its manifests are found again, so that an untagged child pushed by digest is still
/// served, may be named by an index, and survives garbage collection; a blob stays a blob.
#[tokio::test]
async fn hosted_content_of_an_earlier_version_keeps_its_manifests() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = || pier_cache::HostedConfig {
        gc_grace: Duration::ZERO,
        ..Default::default()
    };
    let pier = start(&up, None, hosted(), vec![], None).await;
    let (child, cd) = push_image(&pier, None, "team/m", "tmp", "child").await;
    let r = put_manifest(&pier, None, "team/m", &cd, OCI_MANIFEST, &child).await;
    assert_eq!(r.status(), 201);
    assert_eq!(
        status(
            &pier,
            None,
            reqwest::Method::DELETE,
            "/v2/team/m/manifests/tmp"
        )
        .await,
        202
    );
    let plain = push_blob(&pier, None, "team/m", b"just a blob").await;
    let dir = pier.stop().await;
    make_it_old(dir.path());
    let pier = start(&up, None, hosted(), vec![], Some(dir)).await;
    let path = format!("/v2/team/m/manifests/{cd}");
    assert_eq!(status(&pier, None, reqwest::Method::GET, &path).await, 200);
    let blob_as_manifest = format!("/v2/team/m/manifests/{plain}");
    assert_eq!(
        status(&pier, None, reqwest::Method::GET, &blob_as_manifest).await,
        404
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = gc(&pier).await;
    // The plain blob, named by nothing, goes; the untagged manifest and its blobs stay.
    assert_eq!(report["removed"], 1, "{report}");
    assert_eq!(status(&pier, None, reqwest::Method::GET, &path).await, 200);
    let index = index_naming(&cd, child.len(), "");
    let r = put_manifest(&pier, None, "team/m", "multi", OCI_INDEX, &index).await;
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
}

// ---------------------------------------------------------------------------------------------
// docker search and a hostile upstream search
// ---------------------------------------------------------------------------------------------

/// One step of a scripted answer: wait, then write these bytes.
type Script = Vec<(Duration, Vec<u8>)>;

/// An HTTP server that answers every request by a script (chosen from its head), recording the
/// request heads: a search endpoint that misbehaves in ways a registry fake does not.
struct Scripted {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    async fn start(script: impl Fn(&str) -> Script + Send + Sync + 'static) -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (h, script) = (heads.clone(), Arc::new(script));
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let (h, script) = (h.clone(), script.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut byte = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&byte[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    h.lock().unwrap().push(head.clone());
                    for (wait, bytes) in script(&head) {
                        tokio::time::sleep(wait).await;
                        if s.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Scripted { url, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// A whole HTTP answer with a JSON body.
fn json_answer(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A search answer naming `names`, `total` in all.
fn search_body(names: &[&str], total: u64) -> String {
    let results: Vec<serde_json::Value> = names
        .iter()
        .map(|n| serde_json::json!({"name": n, "description": "", "star_count": 1}))
        .collect();
    serde_json::json!({"num_results": total, "results": results}).to_string()
}

/// pier mirroring `up` as docker.io (with `deny`, and `credentials`), whose search is
/// `search_url`, hosting `team/**` (anonymous pushes when there is no `auth`).
async fn start_search(
    up: &FakeUpstream,
    auth: Option<Arc<Auth>>,
    deny: Vec<String>,
    search_url: &str,
    search_timeout: Duration,
    credentials: Option<(&'static str, &'static str)>,
) -> Pier {
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.deny = deny;
    spec.search_url = Some(search_url.to_string());
    spec.search_timeout = search_timeout;
    spec.credentials = credentials;
    s.upstreams = vec![spec];
    s.hosted_repositories = vec!["team/**".into()];
    s.allow_anonymous_push = auth.is_none();
    s.options = ServerOptions {
        auth,
        metrics_on_main: true,
        ..ServerOptions::default()
    };
    launch(s).await
}

async fn search_as(pier: &Pier, user: Option<&str>, query: &[(&str, &str)]) -> serde_json::Value {
    let r = as_user(client().get(format!("{}/v1/search", pier.url)), user)
        .query(query)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{query:?}");
    r.json().await.unwrap()
}

fn names(v: &serde_json::Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// What an upstream search finds is kept only when the caller may pull it through pier: the
/// upstream's deny list (official names are `library/<name>` to it), the caller's rules, hosted
/// names, names that are no repository names.
#[tokio::test]
async fn upstream_search_results_follow_the_deny_list_and_the_callers_rules() {
    let dir = tempfile::tempdir().unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index = FakeUpstream::start(Behaviour::default()).await;
    index.index_for_search(&[
        "app",
        "secret-app",
        "evil/app",
        "good/app",
        "team/app",
        "Upper/app",
        "../app",
        "good/app/../../evil/app",
        "localhost:5000/app",
    ]);
    let pier = start_search(
        &up,
        Some(users(dir.path())),
        vec!["library/secret*".into(), "evil/**".into()],
        &index.url(),
        Duration::from_secs(3),
        None,
    )
    .await;
    // bob pulls anything the lists allow; carol only docker.io/library/*.
    let v = search_as(&pier, Some("bob"), &[("q", "app")]).await;
    assert_eq!(names(&v), ["app", "good/app"], "{v}");
    let v = search_as(&pier, Some("carol"), &[("q", "app")]).await;
    assert_eq!(names(&v), ["app"], "{v}");
    let v = search_as(&pier, None, &[("q", "app")]).await;
    assert_eq!(names(&v), ["app", "good/app"], "{v}");
}

/// The search term reaches the upstream search as one encoded `q`: nothing in it adds a
/// parameter, changes the path or the host, or splits the request.
#[tokio::test]
async fn the_search_term_cannot_change_the_upstream_request() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index =
        Scripted::start(|_| vec![(Duration::ZERO, json_answer(&search_body(&[], 0)))]).await;
    let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(3), None).await;
    let terms = [
        "a&n=1000&page=0",
        "x#/../../v2/_catalog",
        "y%2F..%2F..%2Fadmin",
        "app HTTP/1.1\r\nHost: evil.example\r\nX-Injected: 1",
        "http://169.254.169.254/latest",
        "ünïcödé ☃",
    ];
    for term in terms {
        search_as(&pier, None, &[("q", term), ("n", "5")]).await;
    }
    let heads = index.heads();
    assert_eq!(heads.len(), terms.len(), "{heads:?}");
    let index_host = index.url.trim_start_matches("http://");
    for (head, term) in heads.iter().zip(terms) {
        let mut lines = head.lines();
        let line = lines.next().unwrap();
        let target = line
            .strip_prefix("GET ")
            .and_then(|l| l.strip_suffix(" HTTP/1.1"))
            .unwrap_or_else(|| panic!("{line:?}"));
        let url = reqwest::Url::parse(&format!("http://index{target}")).unwrap();
        assert_eq!(url.path(), "/v1/search", "{head}");
        let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        assert_eq!(
            params,
            [
                ("q".to_string(), term.trim().to_string()),
                ("n".to_string(), "5".to_string()),
                ("page".to_string(), "1".to_string())
            ],
            "{head}"
        );
        let host = lines
            .find_map(|l| {
                l.strip_prefix("host: ")
                    .or_else(|| l.strip_prefix("Host: "))
            })
            .unwrap();
        assert_eq!(host, index_host, "{head}");
        // Only in the (encoded) query, never as a header line of its own.
        assert!(
            head.lines()
                .skip(1)
                .all(|l| !l.to_ascii_lowercase().starts_with("x-injected")),
            "{head}"
        );
    }
}

/// Whatever the upstream search answers (too large, not JSON, nested past any parser's depth,
/// of the wrong shape, counts that are no counts, an HTML error page), the search is answered
/// with pier's own results, at once.
#[tokio::test]
async fn a_hostile_upstream_search_answer_costs_only_its_results() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let huge = {
        let names: Vec<String> = (0..40_000).map(|i| format!("bulk/app{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        search_body(&refs, 40_000)
    };
    assert!(huge.len() > 1 << 20);
    let answers: Vec<(&str, Vec<u8>)> = vec![
        ("larger than 1 MiB", json_answer(&huge)),
        ("not JSON", json_answer("{\"results\": [")),
        ("nested", json_answer(&"[".repeat(100_000))),
        ("results not a list", json_answer(r#"{"num_results": 1, "results": {"name": "x"}}"#)),
        (
            "HTML",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\nConnection: close\r\n\r\n<html></html>".to_vec(),
        ),
        (
            "chunked without end",
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"res".to_vec(),
        ),
        (
            "length longer than the body",
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{}".to_vec(),
        ),
    ];
    for (what, answer) in answers {
        let index = Scripted::start(move |_| vec![(Duration::ZERO, answer.clone())]).await;
        let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(2), None).await;
        push_image(&pier, None, "team/app", "1.0", "x").await;
        let started = Instant::now();
        let v = search_as(&pier, None, &[("q", "app")]).await;
        assert!(started.elapsed() < Duration::from_millis(2500), "{what}");
        assert_eq!(names(&v), ["team/app"], "{what}: {v}");
        assert_eq!(v["num_results"], 1, "{what}: {v}");
    }
    // Counts that are no counts: the results are taken, the count is the results'.
    for count in ["-5", "1e300", "\"many\"", "18446744073709551616"] {
        let body = format!(r#"{{"num_results": {count}, "results": [{{"name": "good/app"}}]}}"#);
        let index = Scripted::start(move |_| vec![(Duration::ZERO, json_answer(&body))]).await;
        let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(2), None).await;
        let v = search_as(&pier, None, &[("q", "app")]).await;
        assert_eq!(names(&v), ["good/app"], "{count}: {v}");
        assert_eq!(v["num_results"], 1, "{count}: {v}");
    }
    // The largest count there is: no overflow in the page count.
    let body = search_body(&["good/app"], u64::MAX);
    let index = Scripted::start(move |_| vec![(Duration::ZERO, json_answer(&body))]).await;
    let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(2), None).await;
    for n in ["1", "7", "100"] {
        let v = search_as(&pier, None, &[("q", "app"), ("n", n), ("page", "2")]).await;
        assert!(v["num_pages"].as_u64().is_some(), "{v}");
    }
}

/// An upstream search that sends its answer a byte at a time, or its head late, is given up
/// after `search_timeout`, not after the whole answer.
#[tokio::test]
async fn a_slow_upstream_search_is_given_up_after_search_timeout() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let body = search_body(&["good/app"], 1);
    let slow_body = {
        let answer = json_answer(&body);
        Scripted::start(move |_| {
            answer
                .iter()
                .map(|b| (Duration::from_millis(100), vec![*b]))
                .collect()
        })
        .await
    };
    let slow_head = {
        let answer = json_answer(&body);
        Scripted::start(move |_| vec![(Duration::from_secs(30), answer.clone())]).await
    };
    for index in [&slow_body, &slow_head] {
        let pier = start_search(
            &up,
            None,
            vec![],
            &index.url,
            Duration::from_millis(700),
            None,
        )
        .await;
        let started = Instant::now();
        let v = search_as(&pier, None, &[("q", "app")]).await;
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(names(&v), Vec::<String>::new(), "{v}");
    }
}

/// `search_timeout` bounds what an upstream's search costs a client. A page whose window spans
/// two of the upstream's pages asks for them one after the other, each with the whole timeout:
/// an upstream that answers each just in time makes the client wait twice as long, and with
/// several searching upstreams, the timeouts add up.
#[tokio::test]
async fn a_search_waits_at_most_search_timeout_for_an_upstream() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index = Scripted::start(|head| {
        let page = if head.contains("page=1") { 1 } else { 2 };
        let names = if page == 1 {
            ["x/app1", "x/app2"]
        } else {
            ["x/app3", "x/app4"]
        };
        vec![(
            Duration::from_millis(900),
            json_answer(&search_body(&names, 4)),
        )]
    })
    .await;
    let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(1), None).await;
    push_image(&pier, None, "team/app", "1.0", "x").await;
    // One of pier's, then the upstream's from its second: the window spans its pages 1 and 2.
    let started = Instant::now();
    let v = search_as(&pier, None, &[("q", "app"), ("n", "2"), ("page", "2")]).await;
    let took = started.elapsed();
    assert_eq!(index.heads().len(), 2, "{v}");
    assert!(
        took < Duration::from_millis(1500),
        "{took:?} for a search_timeout of 1 s: {v}"
    );
}

/// Upstreams with a search are asked at once: two that each answer just within their
/// `search_timeout` cost a client one timeout, not the sum, and both their results are kept.
#[tokio::test]
async fn searching_upstreams_are_asked_at_once() {
    let hub = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    let slow = |names: &'static [&'static str]| {
        Scripted::start(move |_| {
            vec![(
                Duration::from_millis(800),
                json_answer(&search_body(names, names.len() as u64)),
            )]
        })
    };
    let (hub_index, ghcr_index) = (slow(&["x/app1"]).await, slow(&["y/app2"]).await);
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    let mut a = UpstreamSpec::new("docker.io", hub.url());
    a.search_url = Some(hub_index.url.clone());
    a.search_timeout = Duration::from_secs(1);
    let mut b = UpstreamSpec::new("ghcr.io", ghcr.url());
    b.search_url = Some(ghcr_index.url.clone());
    b.search_timeout = Duration::from_secs(1);
    s.upstreams = vec![a, b];
    let pier = launch(s).await;
    let started = Instant::now();
    let v = search_as(&pier, None, &[("q", "app")]).await;
    let took = started.elapsed();
    assert_eq!(names(&v), ["x/app1", "ghcr.io/y/app2"], "{v}");
    assert!(took < Duration::from_millis(1400), "{took:?}: {v}");
}

/// The search endpoint is the one host pier asks: an answer redirecting elsewhere (another host,
/// an internal address) is not followed.
#[tokio::test]
async fn an_upstream_search_redirect_is_not_followed() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let elsewhere = Scripted::start(|_| {
        vec![(
            Duration::ZERO,
            json_answer(&search_body(&["from/elsewhere"], 1)),
        )]
    })
    .await;
    let target = format!("{}/v1/search?q=app", elsewhere.url);
    let index = Scripted::start(move |_| {
        vec![(
            Duration::ZERO,
            format!(
                "HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
        )]
    })
    .await;
    let pier = start_search(&up, None, vec![], &index.url, Duration::from_secs(2), None).await;
    let v = search_as(&pier, None, &[("q", "app")]).await;
    assert_eq!(index.heads().len(), 1);
    assert!(
        elsewhere.heads().is_empty(),
        "pier followed the redirect: {:?}; answered {v}",
        elsewhere.heads()
    );
}

/// The upstream's credentials are never sent to its search, even when the search is the same
/// host as the registry and challenges for them.
#[tokio::test]
async fn the_upstreams_credentials_never_reach_its_search() {
    let up = FakeUpstream::start(Behaviour {
        require_basic: Some(("puller".into(), "s3cret".into())),
        ..Behaviour::default()
    })
    .await;
    up.index_for_search(&["good/app"]);
    let layer = up.add_blob_in("library/app", vec![1u8; 100]);
    let pier = start_search(
        &up,
        None,
        vec![],
        &up.url(),
        Duration::from_secs(2),
        Some(("puller", "s3cret")),
    )
    .await;
    // The registry gets them (a pull works)...
    let r = client()
        .get(format!("{}/v2/app/blobs/{layer}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // ...the search does not, and its 401 costs only its results.
    let v = search_as(&pier, None, &[("q", "app")]).await;
    assert_eq!(names(&v), Vec::<String>::new(), "{v}");
    let seen = up.state.auth_seen.lock().unwrap().clone();
    let searches: Vec<_> = seen
        .iter()
        .filter(|(path, _)| path.starts_with("/v1/search"))
        .collect();
    assert_eq!(searches.len(), 1, "{seen:?}");
    assert!(searches.iter().all(|(_, a)| a.is_none()), "{searches:?}");
    let other =
        Scripted::start(|_| vec![(Duration::ZERO, json_answer(&search_body(&[], 0)))]).await;
    let pier = start_search(
        &up,
        None,
        vec![],
        &other.url,
        Duration::from_secs(2),
        Some(("puller", "s3cret")),
    )
    .await;
    search_as(&pier, None, &[("q", "app")]).await;
    let heads = other.heads();
    assert_eq!(heads.len(), 1);
    assert!(
        !heads[0].to_ascii_lowercase().contains("authorization"),
        "{}",
        heads[0]
    );
}

/// Page arithmetic at the edges: n of 0 or past 100, page 0 or far past the end, numbers that
/// are no numbers. No answer is a server error, pages are 1..=100 long.
#[tokio::test]
async fn search_paging_at_the_edges() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index = FakeUpstream::start(Behaviour::default()).await;
    index.index_for_search(&["x/app1", "x/app2", "x/app3"]);
    let pier = start_search(
        &up,
        None,
        vec![],
        &index.url(),
        Duration::from_secs(2),
        None,
    )
    .await;
    push_image(&pier, None, "team/app", "1.0", "x").await;
    let max = usize::MAX.to_string();
    for (n, page, size) in [
        ("0", "1", 1),
        ("1000", "1", 100),
        ("2", "0", 2),
        ("1", max.as_str(), 1),
        ("100", max.as_str(), 100),
        ("2", "3", 2),
        ("", "", 25),
    ] {
        let v = search_as(&pier, None, &[("q", "app"), ("n", n), ("page", page)]).await;
        assert_eq!(v["page_size"], size, "n={n} page={page}: {v}");
        assert!(v["results"].as_array().unwrap().len() <= size, "{v}");
        assert_eq!(v["num_results"], 4, "n={n} page={page}: {v}");
    }
    let v = search_as(&pier, None, &[("q", "app"), ("n", "2"), ("page", "2")]).await;
    assert_eq!(names(&v), ["x/app2", "x/app3"], "{v}");
    for (n, page) in [
        ("-1", "1"),
        ("1", "-1"),
        ("x", "1"),
        ("1", "18446744073709551616"),
    ] {
        let r = client()
            .get(format!("{}/v1/search", pier.url))
            .query(&[("q", "app"), ("n", n), ("page", page)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "n={n} page={page}");
    }
}

// ---------------------------------------------------------------------------------------------
// Garbage collection racing uploads of what it removes
// ---------------------------------------------------------------------------------------------

/// An upload that finishes while garbage collection removes the same bytes: collection takes
/// an object out of the index first and unlinks its file later; an upload committed in
/// between finds the file still there, does not write it ("written once"), and indexes and
/// links it; then the file goes. The repository then holds a blob that HEAD answers 200 for (so
/// clients do not push it again) and that cannot be read.
#[tokio::test]
async fn an_upload_racing_garbage_collection_is_kept_whole() {
    let dir = tempfile::tempdir().unwrap();
    // An earlier pier's leftovers: many unreferenced hosted blobs, unused for an hour.
    let junk: Vec<Vec<u8>> = (0..4000)
        .map(|i| format!("junk blob {i}").into_bytes())
        .collect();
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let mut links = String::new();
    for data in &junk {
        let d = Digest::sha256_of(data);
        let path = dir
            .path()
            .join("blobs/sha256")
            .join(&d.hex()[..2])
            .join(d.hex());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        links.push_str(&format!("{d}\n"));
    }
    let repo_dir = dir.path().join("tags/_hosted/team/junk");
    std::fs::create_dir_all(&repo_dir).unwrap();
    std::fs::write(repo_dir.join("_links"), links).unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        gc_grace: Duration::from_secs(600),
        max_uploads_per_client: 1000,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], Some(dir)).await;
    // Uploads of some of those bytes to team/a, all but finished.
    let c = client();
    let mut sessions = Vec::new();
    for data in junk.iter().step_by(20) {
        let r = start_session(&pier, None, "team/a").await;
        assert_eq!(r.status(), 202);
        let at = format!("{}{}", pier.url, header(&r, "location"));
        let r = c.patch(&at).body(data.clone()).send().await.unwrap();
        assert_eq!(r.status(), 202);
        sessions.push((at, data.clone()));
    }
    // Collection and the last requests of the uploads, together.
    let admin = pier.admin.clone();
    let collecting = tokio::spawn(async move {
        client()
            .post(format!("{admin}/admin/gc"))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    let finishing = sessions.iter().enumerate().map(|(i, (at, data))| {
        let c = c.clone();
        async move {
            tokio::time::sleep(Duration::from_micros(300 * i as u64)).await;
            let r = c
                .put(format!("{at}?digest={}", digest_of(data)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });
    futures_util::future::join_all(finishing).await;
    let report = collecting.await.unwrap();
    let mut broken = Vec::new();
    for (_, data) in &sessions {
        let url = format!("{}/v2/team/a/blobs/{}", pier.url, digest_of(data));
        let head = c.head(&url).send().await.unwrap().status();
        let r = c.get(&url).send().await.unwrap();
        let get = r.status();
        let body = r.bytes().await.unwrap_or_default();
        if head != 200 || get != 200 || body.as_ref() != data.as_slice() {
            broken.push((String::from_utf8_lossy(data).into_owned(), head, get));
        }
    }
    assert!(
        broken.is_empty(),
        "{} of {} uploads pier said it stored are broken: {broken:?}; gc {report}",
        broken.len(),
        sessions.len()
    );
}

/// Slots come back from every way a session can fail to become a blob: a monolithic upload
/// whose digest does not match, or that is malformed; a mount that falls back to a session,
/// cancelled; a session finished with the wrong digest.
#[tokio::test]
async fn failed_uploads_give_their_slot_back() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_uploads_per_client: 1,
        ..Default::default()
    };
    let pier = start(&up, None, hosted, vec![], None).await;
    let c = client();
    let uploads = format!("{}/v2/team/a/blobs/uploads/", pier.url);
    let wrong = digest_of(b"something else");
    for query in [
        format!("?digest={wrong}"),
        "?digest=sha256:zz".to_string(),
        format!("?digest=md5:{}", "0".repeat(32)),
        "?digest=".to_string(),
    ] {
        let r = c
            .post(format!("{uploads}{query}"))
            .body(b"the blob".to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        assert_eq!(upload_dirs(&pier), 0, "{query}");
    }
    // A mount that cannot be done is a session, which a DELETE gives back.
    let r = c
        .post(format!(
            "{uploads}?mount={}&from=team/nowhere",
            digest_of(b"x")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let at = format!("{}{}", pier.url, header(&r, "location"));
    assert_eq!(c.post(&uploads).send().await.unwrap().status(), 429);
    assert_eq!(c.delete(&at).send().await.unwrap().status(), 204);
    // A session finished with the wrong digest is gone, and so is its slot.
    let r = c.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let at = format!("{}{}", pier.url, header(&r, "location"));
    let r = c
        .put(format!("{at}?digest={wrong}"))
        .body(b"the blob".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert_eq!(c.post(&uploads).send().await.unwrap().status(), 202);
    assert_eq!(pier.mirror.cache.hosted_usage().uploading_bytes, 0);
}
