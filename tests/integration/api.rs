//! The pull API's answers: headers, bytes, ranges, errors.

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, raw_get, start, UpstreamSpec};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

async fn setup() -> (FakeUpstream, crate::harness::Pier) {
    let up = FakeUpstream::start(Behaviour {
        ranges: true,
        ..Behaviour::default()
    })
    .await;
    let pier = start(
        vec![UpstreamSpec::new("docker.io", up.url())],
        (1 << 20, 64 << 10),
    )
    .await;
    (up, pier)
}

#[tokio::test]
async fn base_endpoint_answers_with_api_version() {
    let (_up, pier) = setup().await;
    let r = client()
        .get(format!("{}/v2/", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn manifest_by_tag_is_served_byte_for_byte_with_headers() {
    let (up, pier) = setup().await;
    // Odd spacing on purpose: re-serialising would change the digest.
    let body = r#"{"schemaVersion":2,  "mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let digest = up.add_manifest("library/app", "1.0", INDEX, body);
    for path in ["library/app", "app"] {
        let r = client()
            .get(format!("{}/v2/{path}/manifests/1.0", pier.url))
            .header("accept", INDEX)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], INDEX);
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
        assert_eq!(r.headers()["etag"], format!("\"{digest}\"").as_str());
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(r.text().await.unwrap(), body);
    }
    let h = client()
        .head(format!("{}/v2/app/manifests/1.0", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), 200);
    assert_eq!(h.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(
        h.headers()["content-length"],
        body.len().to_string().as_str()
    );
    // One upstream GET served all of it: the tag is fresh within its TTL.
    assert_eq!(up.count("GET /v2/library/app/manifests/1.0"), 1);
}

#[tokio::test]
async fn manifest_by_digest_is_cached_for_good() {
    let (up, pier) = setup().await;
    let digest = up.add_manifest(
        "library/app",
        "1.0",
        DOCKER_V2,
        r#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#,
    );
    let url = format!("{}/v2/library/app/manifests/{digest}", pier.url);
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    up.set(|b| b.fail_status = Some(500));
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], DOCKER_V2);
    assert_eq!(up.count(&format!("manifests/{digest}")), 1);
}

#[tokio::test]
async fn blob_ranges() {
    let (up, pier) = setup().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let digest = up.add_blob(data.clone());
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    // cold, with a range: served from the fill
    let r = client()
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/300000");
    assert_eq!(&r.bytes().await.unwrap()[..], &data[100..200]);
    // warm
    let r = client()
        .get(&url)
        .header("range", "bytes=299990-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 299990-299999/300000");
    assert_eq!(&r.bytes().await.unwrap()[..], &data[299_990..]);
    let r = client()
        .get(&url)
        .header("range", "bytes=300000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */300000");
    let r = client()
        .get(&url)
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert!(r.bytes().await.unwrap() == data);
    assert_eq!(
        up.state.blob_gets.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn small_blobs_move_to_the_memory_tier() {
    let (up, pier) = setup().await;
    let digest = up.add_blob(vec![7u8; 1000]);
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    let mut sources = Vec::new();
    for _ in 0..3 {
        let r = client().get(&url).send().await.unwrap();
        sources.push(r.headers()["x-pier-cache"].to_str().unwrap().to_string());
        assert_eq!(r.bytes().await.unwrap().len(), 1000);
        crate::harness::settle(&pier).await;
    }
    assert_eq!(sources, ["upstream", "disk", "memory"]);
    // A memory hit needs no disk: remove the file and it is still served.
    let hex = digest.trim_start_matches("sha256:");
    std::fs::remove_file(
        pier.dir
            .path()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex),
    )
    .unwrap();
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-pier-cache"], "memory");
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
}

#[tokio::test]
async fn head_of_uncached_blob_asks_upstream_head_only() {
    let (up, pier) = setup().await;
    let digest = up.add_blob(vec![1u8; 5000]);
    let r = client()
        .head(format!("{}/v2/library/app/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "5000");
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(up.count("HEAD /v2/library/app/blobs/"), 1);
    assert_eq!(up.count("GET /v2/library/app/blobs/"), 0);
}

#[tokio::test]
async fn upstream_not_found_is_404_with_the_right_code() {
    let (_up, pier) = setup().await;
    let missing = format!("sha256:{}", "ab".repeat(32));
    let r = client()
        .get(format!("{}/v2/library/app/blobs/{missing}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = client()
        .get(format!("{}/v2/library/app/manifests/nope", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn malformed_requests_get_registry_errors_and_never_reach_upstream() {
    let (up, pier) = setup().await;
    let d = format!("sha256:{}", "0".repeat(64));
    let cases = [
        (
            "/v2/Library/app/manifests/1.0".to_string(),
            400,
            "NAME_INVALID",
        ),
        ("/v2/a/../b/manifests/1.0".to_string(), 400, "NAME_INVALID"),
        (format!("/v2/a/%2e%2e/b/blobs/{d}"), 400, "NAME_INVALID"),
        (format!("/v2/a%2fb/blobs/{d}"), 400, "NAME_INVALID"),
        (
            format!("/v2/{}/manifests/1.0", "a".repeat(300)),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/app/blobs/sha256:1234".to_string(),
            400,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/app/blobs/md5:{}", "0".repeat(32)),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/app/manifests/sha256:xyz".to_string(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/app/manifests/.hidden".to_string(),
            400,
            "MANIFEST_INVALID",
        ),
    ];
    for (path, status, code) in cases {
        let (got, body) = raw_get(&pier.url, &path).await;
        assert_eq!(got, status, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(v["errors"][0]["code"], code, "{path}");
    }
    assert!(
        up.requests().is_empty(),
        "malformed requests reached the upstream: {:?}",
        up.requests()
    );
}

#[tokio::test]
async fn push_and_delete_are_refused() {
    let (up, pier) = setup().await;
    let c = client();
    let d = format!("sha256:{}", "0".repeat(64));
    let reqs = [
        c.post(format!("{}/v2/app/blobs/uploads/", pier.url)),
        c.put(format!("{}/v2/app/manifests/1.0", pier.url)),
        c.delete(format!("{}/v2/app/manifests/{d}", pier.url)),
        c.patch(format!("{}/v2/app/blobs/uploads/x", pier.url)),
        c.delete(format!("{}/v2/app/blobs/{d}", pier.url)),
    ];
    for req in reqs {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 405);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
        assert!(v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("read-only mirror"));
    }
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn wrong_bytes_from_upstream_are_never_served_whole_or_kept() {
    let (up, pier) = setup().await;
    let good: Vec<u8> = vec![3u8; 200_000];
    let digest = format!(
        "sha256:{}",
        crate::fake_upstream::hex(&<sha2::Sha256 as sha2::Digest>::digest(&good))
    );
    up.add_blob_under(&digest, vec![4u8; 200_000]);
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "200000");
    assert!(
        r.bytes().await.is_err(),
        "a body with the wrong digest was completed"
    );
    let hex = digest.trim_start_matches("sha256:");
    assert!(!pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
    // Fixed upstream: the next request fills again and gets the right bytes.
    up.add_blob(good.clone());
    let r = client().get(&url).send().await.unwrap();
    assert!(r.bytes().await.unwrap() == good);
    assert_eq!(
        up.state.blob_gets.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn oversized_upstream_manifest_is_refused_and_not_kept() {
    let (up, pier) = setup().await;
    let huge = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(5 * 1024 * 1024)
    );
    let digest = up.add_manifest("library/app", "huge", DOCKER_V2, &huge);
    let r = client()
        .get(format!("{}/v2/app/manifests/huge", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("4 MiB"),
        "{v}"
    );
    let hex = digest.trim_start_matches("sha256:");
    assert!(!pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
}
