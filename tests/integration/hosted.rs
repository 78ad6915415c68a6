//! Hosted repositories: the push API (uploads, mounts, manifests, deletes), what it refuses, who
//! may push, and that a hosted name never reaches an upstream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pier_server::auth::{Action, Auth, AuthConfig, Rule};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, raw_get, settle, Pier, Setup, UpstreamSpec};
use crate::pushing::{
    blob_file, digest_of, header, image_manifest, upload_data, upload_dirs, OCI_INDEX, OCI_MANIFEST,
};

struct Options {
    auth: Option<Arc<Auth>>,
    allow_anonymous_push: bool,
    hosted: pier_cache::HostedConfig,
    budget: pier_cache::Budget,
    dir: Option<tempfile::TempDir>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            auth: None,
            allow_anonymous_push: true,
            hosted: pier_cache::HostedConfig::default(),
            budget: pier_cache::Budget::default(),
            dir: None,
        }
    }
}

/// pier mirroring a fake Docker Hub, with `team/**` and `local/*` hosted.
async fn start(up: &FakeUpstream, o: Options) -> Pier {
    let mut s = Setup::new(o.dir.unwrap_or_else(|| tempfile::tempdir().unwrap()));
    s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    s.hosted_repositories = vec!["team/**".into(), "local/*".into()];
    s.allow_anonymous_push = o.allow_anonymous_push;
    s.hosted = o.hosted;
    s.budget = o.budget;
    s.options = ServerOptions {
        auth: o.auth,
        metrics_on_main: true,
        ..ServerOptions::default()
    };
    launch(s).await
}

/// Pushes a blob in one request; returns its digest.
async fn push_blob(pier: &Pier, repo: &str, data: &[u8]) -> String {
    let d = digest_of(data);
    let r = client()
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", pier.url))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{repo}: {:?}", r.text().await);
    d
}

async fn put_manifest(pier: &Pier, repo: &str, reference: &str, body: &str) -> reqwest::Response {
    client()
        .put(format!("{}/v2/{repo}/manifests/{reference}", pier.url))
        .header("content-type", OCI_MANIFEST)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn monolithic_and_chunked_uploads_are_served_back() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    let c = client();
    // Monolithic: POST with the digest and the blob.
    let data = b"hello hosted".to_vec();
    let d = digest_of(&data);
    let r = c
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={d}",
            pier.url
        ))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/team/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    let r = c
        .get(format!("{}/v2/team/app/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), data);

    // A session: POST, PATCH with and without Content-Range, status, PUT with a last chunk.
    let r = c
        .post(format!("{}/v2/team/app/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-0");
    let location = header(&r, "location");
    let uuid = header(&r, "docker-upload-uuid");
    assert_eq!(location, format!("/v2/team/app/blobs/uploads/{uuid}"));
    let at = format!("{}{location}", pier.url);
    let blob: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let r = c
        .patch(&at)
        .header("content-range", "0-999")
        .header("content-type", "application/octet-stream")
        .body(blob[..1000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-999");
    assert_eq!(header(&r, "location"), location);
    assert_eq!(header(&r, "docker-upload-uuid"), uuid);
    // A streamed chunk without Content-Range.
    let r = c
        .patch(&at)
        .body(blob[1000..2000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(header(&r, "range"), "0-1999");
    // Out of order: 416, and the upload is where it was.
    let r = c
        .patch(&at)
        .header("content-range", "2500-2999")
        .body(blob[2500..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "range"), "0-1999");
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-1999");
    assert_eq!(header(&r, "docker-upload-uuid"), uuid);
    let d = digest_of(&blob);
    let r = c
        .put(format!("{at}?digest={d}"))
        .body(blob[2000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/team/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    // The session is gone; the blob is served, whole and by range.
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    let r = c
        .head(format!("{}/v2/team/app/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "3000");
    let r = c
        .get(format!("{}/v2/team/app/blobs/{d}", pier.url))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), &blob[10..20]);
    // Nothing left behind in uploads/, and no upstream was asked anything.
    assert_eq!(upload_dirs(&pier), 0);
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[tokio::test]
async fn a_blob_already_stored_is_not_written_again() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    let d = push_blob(&pier, "team/a", b"same bytes").await;
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&blob_file(&pier, &d));
    push_blob(&pier, "team/b", b"same bytes").await;
    assert_eq!(inode(&blob_file(&pier, &d)), before);
    // Each repository holds it now; a third does not.
    for repo in ["team/a", "team/b"] {
        let r = client()
            .head(format!("{}/v2/{repo}/blobs/{d}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{repo}");
    }
    let r = client()
        .get(format!("{}/v2/team/c/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
}

#[tokio::test]
async fn bad_uploads_are_refused_and_nothing_is_kept() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    let c = client();
    let base = format!("{}/v2/team/app/blobs/uploads/", pier.url);
    // Wrong digest, monolithic: 400, no blob.
    let wrong = digest_of(b"something else");
    let r = c
        .post(format!("{base}?digest={wrong}"))
        .body(b"these bytes".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    assert!(!blob_file(&pier, &wrong).exists());
    assert!(!blob_file(&pier, &digest_of(b"these bytes")).exists());
    // A malformed digest.
    let r = c
        .post(format!("{base}?digest=sha256:zz"))
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");

    // Wrong digest at the end of a session: 400, the session and its bytes are gone.
    let r = c.post(&base).send().await.unwrap();
    let at = format!("{}{}", pier.url, header(&r, "location"));
    c.patch(&at).body(b"abc".to_vec()).send().await.unwrap();
    let r = c.put(format!("{at}?digest={wrong}")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(upload_dirs(&pier), 0);

    // PUT without a digest.
    let r = c.post(&base).send().await.unwrap();
    let at = format!("{}{}", pier.url, header(&r, "location"));
    let r = c.put(&at).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // A chunk shorter than its Content-Range: 416 with where the upload is, nothing kept.
    c.patch(&at).body(b"12345".to_vec()).send().await.unwrap();
    let r = c
        .patch(&at)
        .header("content-range", "5-14")
        .body(b"67890".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "range"), "0-4");
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(header(&r, "range"), "0-4");
    // A gap: the chunk starts past the end.
    let r = c
        .patch(&at)
        .header("content-range", "6-10")
        .body(b"abcde".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    // A malformed Content-Range.
    let r = c
        .patch(&at)
        .header("content-range", "bytes=5-")
        .body(b"x".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_INVALID");
    // The session belongs to team/app only.
    let other = at.replace("/team/app/", "/team/other/");
    let r = c.get(&other).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    // Cancel: 204, then unknown.
    let r = c.delete(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
    for r in [
        c.get(&at).send().await.unwrap(),
        c.patch(&at).body(b"x".to_vec()).send().await.unwrap(),
        c.delete(&at).send().await.unwrap(),
    ] {
        assert_eq!(r.status(), 404);
        assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    }
    // Unknown and malformed session ids.
    for session in ["0123456789abcdef", "..", "a%2fb"] {
        let (status, body) =
            raw_get(&pier.url, &format!("/v2/team/app/blobs/uploads/{session}")).await;
        assert_eq!(status, 404, "{session}");
        assert!(body.contains("BLOB_UPLOAD_UNKNOWN"), "{session}: {body}");
    }
}

#[tokio::test]
async fn names_with_traversal_are_refused() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    for path in [
        "/v2/team/../etc/blobs/uploads/",
        "/v2/team/%2e%2e/x/manifests/latest",
        "/v2/team//app/tags/list",
        "/v2/team/App/manifests/latest",
    ] {
        let (status, body) = raw_get(&pier.url, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains("NAME_INVALID"), "{path}: {body}");
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[tokio::test]
async fn manifests_are_checked_stored_served_and_deleted() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    let c = client();
    let config = push_blob(&pier, "team/app", b"{}").await;
    let layer = push_blob(&pier, "team/app", b"layer bytes").await;
    let manifest = image_manifest(&config, &[&layer]);
    let md = digest_of(manifest.as_bytes());
    let r = put_manifest(&pier, "team/app", "v1", &manifest).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "docker-content-digest"), md);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/team/app/manifests/{md}")
    );
    assert!(r.headers().get("oci-subject").is_none());
    // Served by tag and by digest, with the type it was pushed with, whatever the client takes.
    for reference in ["v1", md.as_str()] {
        let r = c
            .get(format!("{}/v2/team/app/manifests/{reference}", pier.url))
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{reference}");
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), md);
        assert_eq!(r.text().await.unwrap(), manifest);
        let r = c
            .head(format!("{}/v2/team/app/manifests/{reference}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "content-length"), manifest.len().to_string());
    }
    // By digest: the digest must match.
    let r = put_manifest(&pier, "team/app", &md, &manifest).await;
    assert_eq!(r.status(), 201);
    let r = put_manifest(&pier, "team/app", &digest_of(b"other"), &manifest).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "DIGEST_INVALID");
    // A blob this repository does not hold (pushed to another one, or nowhere).
    let elsewhere = push_blob(&pier, "team/other", b"not here").await;
    for missing in [elsewhere.clone(), digest_of(b"nowhere")] {
        let r = put_manifest(
            &pier,
            "team/app",
            "bad",
            &image_manifest(&config, &[&missing]),
        )
        .await;
        assert_eq!(r.status(), 400);
        assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    }
    let r = c
        .get(format!("{}/v2/team/app/manifests/bad", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Not JSON, not a manifest, no media type, oversized.
    for body in ["not json", "[1,2]", r#"{"schemaVersion":2,"layers":5}"#] {
        let r = put_manifest(&pier, "team/app", "bad", body).await;
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_code(r).await, "MANIFEST_INVALID", "{body}");
    }
    let r = c
        .put(format!("{}/v2/team/app/manifests/bad", pier.url))
        .body(r#"{"schemaVersion":2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "MANIFEST_INVALID");
    let huge = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","annotations":{{"x":"{}"}}}}"#,
        "a".repeat(5 << 20)
    );
    let r = put_manifest(&pier, "team/app", "huge", &huge).await;
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "SIZE_INVALID");

    // An index of the manifest, and an artifact whose subject is the manifest.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{},"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
        manifest.len()
    );
    let r = c
        .put(format!("{}/v2/team/app/manifests/multi", pier.url))
        .header("content-type", OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .put(format!("{}/v2/team/elsewhere/manifests/multi", pier.url))
        .header("content-type", OCI_INDEX)
        .body(index)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_BLOB_UNKNOWN");
    let artifact = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/example","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{config}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{md}","size":{}}}}}"#,
        manifest.len()
    );
    let ad = digest_of(artifact.as_bytes());
    let r = put_manifest(&pier, "team/app", &ad, &artifact).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "oci-subject"), md);
    // The referrers API lists it (OCI-Subject promised so), filtered by artifactType if asked.
    let r = c
        .get(format!("{}/v2/team/app/referrers/{md}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manifests"][0]["digest"], ad.as_str());
    assert_eq!(v["manifests"][0]["artifactType"], "application/example");
    assert_eq!(v["manifests"][0]["size"], artifact.len());
    let r = c
        .get(format!(
            "{}/v2/team/app/referrers/{md}?artifactType=application%2Fother",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["manifests"].as_array().unwrap().is_empty());
    let r = c
        .get(format!("{}/v2/team/app/referrers/{ad}", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["manifests"].as_array().unwrap().is_empty());

    // Tags, paged.
    let r = put_manifest(&pier, "team/app", "v2", &manifest).await;
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{}/v2/team/app/tags/list", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["name"], "team/app");
    assert_eq!(v["tags"], serde_json::json!(["multi", "v1", "v2"]));
    let r = c
        .get(format!("{}/v2/team/app/tags/list?n=1&last=multi", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "link"),
        "</v2/team/app/tags/list?n=1&last=v1>; rel=\"next\""
    );
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1"]));
    let r = c
        .get(format!("{}/v2/team/none/tags/list", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    // The catalog lists hosted and mirrored repositories together.
    up.add_manifest("library/base", "1", OCI_MANIFEST, r#"{"schemaVersion":2}"#);
    c.get(format!("{}/v2/base/manifests/1", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = c
        .get(format!("{}/v2/_catalog", pier.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["library/base", "team/app"])
    );

    // Delete a tag: 202; the manifest stays by digest and under v2.
    let r = c
        .delete(format!("{}/v2/team/app/manifests/v1", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = c
        .get(format!("{}/v2/team/app/manifests/v1", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = c
        .get(format!("{}/v2/team/app/manifests/v2", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Delete by digest: 202; the tags pointing at it go too; a second delete is 404.
    let r = c
        .delete(format!("{}/v2/team/app/manifests/{md}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for reference in ["v2", md.as_str()] {
        let r = c
            .get(format!("{}/v2/team/app/manifests/{reference}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{reference}");
    }
    let r = c
        .delete(format!("{}/v2/team/app/manifests/{md}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Blobs are not deleted through the API.
    let r = c
        .delete(format!("{}/v2/team/app/blobs/{layer}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    assert_eq!(up.count("/team/"), 0);
}

#[tokio::test]
async fn a_hosted_name_is_never_fetched_from_upstream() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    // The upstream has team/app: an attacker's image of the same name.
    let evil_layer = up.add_blob_in("team/app", b"evil".to_vec());
    up.add_manifest(
        "team/app",
        "latest",
        OCI_MANIFEST,
        &image_manifest(&evil_layer, &[]),
    );
    let pier = start(&up, Options::default()).await;
    let c = client();
    for query in ["", "?ns=docker.io"] {
        let r = c
            .get(format!("{}/v2/team/app/manifests/latest{query}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{query}");
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
        let r = c
            .get(format!(
                "{}/v2/team/app/blobs/{evil_layer}{query}",
                pier.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
        let r = c
            .head(format!(
                "{}/v2/team/app/blobs/{evil_layer}{query}",
                pier.url
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = c
            .get(format!("{}/v2/team/app/tags/list{query}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    }
    // Pushed, it is pier's own; the upstream's never shows.
    let layer = push_blob(&pier, "team/app", b"good").await;
    let r = put_manifest(&pier, "team/app", "latest", &image_manifest(&layer, &[])).await;
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{}/v2/team/app/manifests/latest", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains(&layer));
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

#[tokio::test]
async fn mounts_from_mirrored_and_hosted_repositories() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let base = up.add_blob_in("library/base", vec![5u8; 10_000]);
    let unlinked = up.add_blob_in("library/other", vec![6u8; 10_000]);
    // An age limit of nothing: whatever eviction may take, it takes when asked.
    let budget = pier_cache::Budget {
        max_age: Some(Duration::from_millis(1)),
        ..pier_cache::Budget::default()
    };
    let pier = start(
        &up,
        Options {
            budget,
            ..Options::default()
        },
    )
    .await;
    let c = client();
    // Pulled through the mirror: library/base holds it.
    for blob in [&base, &unlinked] {
        let repo = if blob == &base { "base" } else { "other" };
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{blob}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 10_000);
    }
    settle(&pier).await;
    let r = c
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?mount={base}&from=library/base",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "location"), format!("/v2/team/app/blobs/{base}"));
    assert_eq!(header(&r, "docker-content-digest"), base);
    // library/base does not hold the other blob: a session instead, and no upstream asked.
    let before = up.requests().len();
    let r = c
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?mount={unlinked}&from=library/base",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(header(&r, "location").starts_with("/v2/team/app/blobs/uploads/"));
    assert_eq!(up.requests().len(), before);
    // From one hosted repository to another.
    let r = c
        .post(format!(
            "{}/v2/team/copy/blobs/uploads/?mount={base}&from=team/app",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Mounted blobs are hosted: pinned, the mirror's eviction leaves them.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let report = pier.mirror.cache.evict().await.unwrap();
    assert_eq!(report.removed, 1, "only the unmounted blob goes");
    assert!(blob_file(&pier, &base).exists());
    assert!(!blob_file(&pier, &unlinked).exists());
    for repo in ["team/app", "team/copy"] {
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{base}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 10_000, "{repo}");
    }
    assert_eq!(pier.mirror.cache.hosted_usage().stored_bytes, 10_000);
}

#[tokio::test]
async fn the_hosted_budget_refuses_pushes_past_it_and_keeps_nothing() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let hosted = pier_cache::HostedConfig {
        max_size: 1000,
        ..pier_cache::HostedConfig::default()
    };
    let pier = start(
        &up,
        Options {
            hosted,
            ..Options::default()
        },
    )
    .await;
    let c = client();
    push_blob(&pier, "team/app", &[1u8; 800]).await;
    let big = vec![2u8; 300];
    let d = digest_of(&big);
    let r = c
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={d}",
            pier.url
        ))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], "DENIED");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("hosted.max_size"),
        "{v}"
    );
    assert!(!blob_file(&pier, &d).exists());
    // A chunk past it: refused, and the session keeps what it had.
    let r = c
        .post(format!("{}/v2/team/app/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    let at = format!("{}{}", pier.url, header(&r, "location"));
    let r = c.patch(&at).body(vec![3u8; 100]).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.patch(&at).body(vec![3u8; 200]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(header(&r, "range"), "0-99");
    assert_eq!(
        std::fs::metadata(upload_data(&pier, &at)).unwrap().len(),
        100
    );
    // Cancelled, the room comes back.
    c.delete(&at).send().await.unwrap();
    push_blob(&pier, "team/app", &[4u8; 150]).await;
    assert_eq!(pier.mirror.cache.hosted_usage().stored_bytes, 950);
    assert_eq!(pier.mirror.cache.hosted_usage().uploading_bytes, 0);
    let metrics = c
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "pier_hosted_bytes 950",
        "pier_hosted_upload_bytes 0",
        "pier_hosted_budget_bytes 1000",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn upload_sessions_survive_a_restart_and_expire_when_idle() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(&up, Options::default()).await;
    let c = client();
    let r = c
        .post(format!("{}/v2/local/app/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    let location = header(&r, "location");
    c.patch(format!("{}{location}", pier.url))
        .body(b"first half ".to_vec())
        .send()
        .await
        .unwrap();
    let dir = pier.stop().await;
    let pier = start(
        &up,
        Options {
            dir: Some(dir),
            ..Options::default()
        },
    )
    .await;
    let at = format!("{}{location}", pier.url);
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(header(&r, "range"), "0-10");
    let whole = b"first half second half";
    let r = c
        .put(format!("{at}?digest={}", digest_of(whole)))
        .body(b"second half".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let dir = pier.stop().await;

    // With a short expiry, an idle session is gone.
    let pier = start(
        &up,
        Options {
            dir: Some(dir),
            hosted: pier_cache::HostedConfig {
                upload_expiry: Duration::from_millis(300),
                ..pier_cache::HostedConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let r = c
        .post(format!("{}/v2/local/app/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    let at = format!("{}{}", pier.url, header(&r, "location"));
    c.patch(&at).body(b"abc".to_vec()).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pier.mirror.cache.expire_uploads().await;
    assert_eq!(upload_dirs(&pier), 0);
    let r = c.get(&at).send().await.unwrap();
    assert_eq!(error_code(r).await, "BLOB_UPLOAD_UNKNOWN");
    assert_eq!(pier.mirror.cache.hosted_usage().uploading_bytes, 0);
}

/// An upload session holds a slot of `hosted.max_uploads_per_client` until it is cancelled,
/// finishes or expires; sessions kept across a restart hold theirs.
#[tokio::test]
async fn a_closed_upload_session_frees_its_slot() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let limits = |expiry: Duration| pier_cache::HostedConfig {
        max_uploads_per_client: 2,
        upload_expiry: expiry,
        ..pier_cache::HostedConfig::default()
    };
    let pier = start(
        &up,
        Options {
            hosted: limits(Duration::from_secs(3600)),
            ..Options::default()
        },
    )
    .await;
    let c = client();
    let uploads = format!("{}/v2/team/app/blobs/uploads/", pier.url);
    let post = || c.post(&uploads).send();
    let first = header(&post().await.unwrap(), "location");
    let second = header(&post().await.unwrap(), "location");
    let r = post().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    // Cancelled: its slot is free.
    let r = c
        .delete(format!("{}{first}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = post().await.unwrap();
    assert_eq!(r.status(), 202);
    let third = header(&r, "location");
    assert_eq!(post().await.unwrap().status(), 429);
    // Finished: its slot is free.
    let r = c
        .put(format!(
            "{}{second}?digest={}",
            pier.url,
            digest_of(b"done")
        ))
        .body(b"done".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let fourth = header(&post().await.unwrap(), "location");
    assert_eq!(post().await.unwrap().status(), 429);

    // Across a restart the two open sessions still count.
    let dir = pier.stop().await;
    let pier = start(
        &up,
        Options {
            dir: Some(dir),
            hosted: limits(Duration::from_secs(3600)),
            ..Options::default()
        },
    )
    .await;
    let uploads = format!("{}/v2/team/app/blobs/uploads/", pier.url);
    let r = c.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let metrics = c
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pier_hosted_uploads_in_progress 2"),
        "{metrics}"
    );
    // Expired (no maintenance run needed): their slots are free, and they are gone.
    let dir = pier.stop().await;
    let pier = start(
        &up,
        Options {
            dir: Some(dir),
            hosted: limits(Duration::from_millis(300)),
            ..Options::default()
        },
    )
    .await;
    let uploads = format!("{}/v2/team/app/blobs/uploads/", pier.url);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = c.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 202);
    for gone in [third, fourth] {
        let r = c.get(format!("{}{gone}", pier.url)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{gone}");
    }
    assert_eq!(upload_dirs(&pier), 1);
}

#[tokio::test]
async fn without_client_authentication_hosted_repositories_are_read_only_unless_allowed() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        &up,
        Options {
            allow_anonymous_push: false,
            ..Options::default()
        },
    )
    .await;
    let c = client();
    for r in [
        c.post(format!("{}/v2/team/app/blobs/uploads/", pier.url))
            .send()
            .await
            .unwrap(),
        c.put(format!("{}/v2/team/app/manifests/v1", pier.url))
            .body("{}")
            .send()
            .await
            .unwrap(),
        c.delete(format!("{}/v2/team/app/manifests/v1", pier.url))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 403);
        assert_eq!(error_code(r).await, "DENIED");
    }
    // Reads work; mirrored repositories stay read-only mirrors (405).
    let r = c
        .get(format!("{}/v2/team/app/tags/list", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/v2/library/nginx/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
}

/// alice may push (not delete) to team/**; bob has no rules (pulls only); anonymous pulls on.
async fn with_users(allow_anonymous_push: bool) -> (tempfile::TempDir, FakeUpstream, Pier) {
    let users = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(
        users.path().join("htpasswd"),
        format!("alice:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    let auth = Auth::load(&AuthConfig {
        htpasswd: users.path().join("htpasswd"),
        anonymous: true,
        token_ttl: Duration::from_secs(60),
        rules: HashMap::from([(
            "alice".to_string(),
            vec![
                Rule::pull("docker.io/**"),
                Rule {
                    pattern: "team/**".into(),
                    actions: vec![Action::Pull, Action::Push],
                },
            ],
        )]),
    })
    .unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        &up,
        Options {
            auth: Some(Arc::new(auth)),
            allow_anonymous_push,
            ..Options::default()
        },
    )
    .await;
    (users, up, pier)
}

#[tokio::test]
async fn push_needs_a_user_whose_rules_allow_it() {
    let (_users, _up, pier) = with_users(false).await;
    let c = client();
    let uploads = format!("{}/v2/team/app/blobs/uploads/", pier.url);
    // The ping challenges anonymous clients, so that clients holding credentials send them;
    // one without gets an anonymous token, good for pulls.
    let r = c.get(format!("{}/v2/", pier.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(!header(&r, "www-authenticate").contains("scope="));
    let v: serde_json::Value = c
        .get(format!(
            "{}/auth/token?service=pier&scope=repository:team/app:pull,push",
            pier.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let anonymous = v["token"].as_str().unwrap().to_string();
    let r = c
        .get(format!("{}/v2/", pier.url))
        .bearer_auth(&anonymous)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(&uploads)
        .bearer_auth(&anonymous)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an anonymous token grants no push");
    // Anonymous: challenged for push.
    let r = c.post(&uploads).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        header(&r, "www-authenticate").contains("scope=\"repository:team/app:pull,push\""),
        "{}",
        header(&r, "www-authenticate")
    );
    // bob has no push rule; alice has.
    let r = c
        .post(&uploads)
        .basic_auth("bob", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let d = digest_of(b"alice's");
    let r = c
        .post(format!("{uploads}?digest={d}"))
        .basic_auth("alice", Some("pw"))
        .body(b"alice's".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Everyone who may pull reads it.
    for r in [
        c.get(format!("{}/v2/team/app/blobs/{d}", pier.url))
            .send()
            .await
            .unwrap(),
        c.get(format!("{}/v2/team/app/blobs/{d}", pier.url))
            .basic_auth("bob", Some("pw"))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 200);
    }
    // alice may not delete, nor push outside team/**.
    let r = c
        .delete(format!("{}/v2/team/app/manifests/{d}", pier.url))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(format!("{}/v2/local/x/blobs/uploads/", pier.url))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The token flow: a pull token is challenged again for push; a push token works.
    let token = |scope: &'static str| {
        let c = c.clone();
        let url = format!("{}/auth/token?service=pier&scope={scope}", pier.url);
        async move {
            let v: serde_json::Value = c
                .get(url)
                .basic_auth("alice", Some("pw"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let pull = token("repository:team/app:pull").await;
    let r = c.post(&uploads).bearer_auth(&pull).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let push = token("repository:team/app:pull,push").await;
    let r = c.post(&uploads).bearer_auth(&push).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // A token never grants push to a mirrored repository.
    let mirrored = token("repository:library/nginx:pull,push").await;
    let r = c
        .post(format!("{}/v2/library/nginx/blobs/uploads/", pier.url))
        .bearer_auth(&mirrored)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn anonymous_push_only_when_allowed() {
    let (_users, _up, pier) = with_users(true).await;
    let r = client()
        .post(format!("{}/v2/local/lab/blobs/uploads/", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

async fn delete(pier: &Pier, repo: &str, reference: &str) {
    let r = client()
        .delete(format!("{}/v2/{repo}/manifests/{reference}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{repo}:{reference}");
}

async fn status(pier: &Pier, path: &str) -> u16 {
    client()
        .get(format!("{}{path}", pier.url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn garbage_collection_removes_what_no_hosted_manifest_names() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let base = up.add_blob_in("library/base", vec![5u8; 10_000]);
    let grace = Duration::from_millis(1500);
    let pier = start(
        &up,
        Options {
            hosted: pier_cache::HostedConfig {
                gc_grace: grace,
                ..pier_cache::HostedConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let c = client();
    // The mirror pulls a blob, and team/app mounts it.
    let r = c
        .get(format!("{}/v2/base/blobs/{base}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().len(), 10_000);
    settle(&pier).await;
    let r = c
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?mount={base}&from=library/base",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // team/app:1.0 names its own config and layers, a layer team/other shares, and the mounted
    // blob; team/other:1.0 the shared layer.
    let big: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let config = push_blob(&pier, "team/app", b"{\"app\":1}").await;
    let own = push_blob(&pier, "team/app", b"own layer").await;
    let shared = push_blob(&pier, "team/app", b"shared layer").await;
    let large = push_blob(&pier, "team/app", &big).await;
    let app = image_manifest(&config, &[&own, &shared, &large, &base]);
    assert_eq!(
        put_manifest(&pier, "team/app", "1.0", &app).await.status(),
        201
    );
    let other_config = push_blob(&pier, "team/other", b"{\"other\":1}").await;
    push_blob(&pier, "team/other", b"shared layer").await;
    let other = image_manifest(&other_config, &[&shared]);
    assert_eq!(
        put_manifest(&pier, "team/other", "1.0", &other)
            .await
            .status(),
        201
    );
    // team/multi:1.0 is an index whose child was deleted by digest: the index still names it.
    let child_config = push_blob(&pier, "team/multi", b"{\"child\":1}").await;
    let child_layer = push_blob(&pier, "team/multi", b"child layer").await;
    let child = image_manifest(&child_config, &[&child_layer]);
    let child_digest = digest_of(child.as_bytes());
    assert_eq!(
        put_manifest(&pier, "team/multi", &child_digest, &child)
            .await
            .status(),
        201
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{child_digest}","size":{}}}]}}"#,
        child.len()
    );
    let r = c
        .put(format!("{}/v2/team/multi/manifests/1.0", pier.url))
        .header("content-type", OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    delete(&pier, "team/multi", &child_digest).await;
    // team/app:1.0 is deleted.
    let app_digest = digest_of(app.as_bytes());
    delete(&pier, "team/app", &app_digest).await;
    let stored_before = pier.mirror.cache.hosted_usage().stored_bytes;

    // A client starts pulling the large layer (by its repository's link) before the grace
    // period ends, and reads it to the end after its file was removed.
    let mut reading = c
        .get(format!("{}/v2/team/app/blobs/{large}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reading.status(), 200);
    let mut got = reading.chunk().await.unwrap().unwrap().to_vec();
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    // A push under way: its blob is there, its manifest is not yet.
    let recent = push_blob(&pier, "team/app", b"pushed a moment ago").await;

    let r = c
        .post(format!("{}/admin/gc", pier.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: serde_json::Value = r.json().await.unwrap();
    // The deleted manifest, its own config and layer, and the large layer.
    assert_eq!(report["removed"], 4, "{report}");
    assert_eq!(report["manifests"], 1, "{report}");
    let freed = (app.len() + 9 + 9 + big.len()) as u64;
    assert_eq!(report["bytes"], freed, "{report}");
    // The mounted blob goes back to the mirror, which uses it.
    assert_eq!(report["unpinned"], 1, "{report}");
    assert_eq!(report["unpinned_bytes"], 10_000, "{report}");
    assert_eq!(report["kept_recent"], 1, "{report}");
    for gone in [&app_digest, &config, &own, &large] {
        assert!(!blob_file(&pier, gone).exists(), "{gone}");
    }
    for kept in [
        &shared,
        &base,
        &recent,
        &child_digest,
        &child_layer,
        &child_config,
    ] {
        assert!(blob_file(&pier, kept).exists(), "{kept}");
    }
    assert_eq!(
        pier.mirror.cache.hosted_usage().stored_bytes,
        stored_before + 19 - freed - 10_000,
        "the recent upload stays"
    );

    // The reader got every byte.
    while let Some(chunk) = reading.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.len(), big.len());
    assert!(got == big, "the body read during the collection is intact");

    // What stays is served; what went is not; the mirror serves its blob without the upstream.
    assert_eq!(status(&pier, "/v2/team/other/manifests/1.0").await, 200);
    assert_eq!(
        status(&pier, &format!("/v2/team/other/blobs/{shared}")).await,
        200
    );
    assert_eq!(status(&pier, "/v2/team/multi/manifests/1.0").await, 200);
    let child_path = format!("/v2/team/multi/blobs/{child_layer}");
    assert_eq!(status(&pier, &child_path).await, 200);
    assert_eq!(
        status(&pier, &format!("/v2/team/app/blobs/{own}")).await,
        404
    );
    assert_eq!(
        status(&pier, &format!("/v2/team/app/blobs/{large}")).await,
        404
    );
    assert_eq!(
        status(&pier, &format!("/v2/team/app/blobs/{recent}")).await,
        200
    );
    let before = up.requests().len();
    assert_eq!(status(&pier, &format!("/v2/base/blobs/{base}")).await, 200);
    assert_eq!(up.requests().len(), before, "the mirror kept its blob");
    assert_eq!(
        status(&pier, &format!("/v2/team/app/blobs/{base}")).await,
        404
    );

    // Once its grace period is over, an upload no manifest names goes too.
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let report = pier.mirror.cache.collect_garbage().await.unwrap();
    assert_eq!(report.removed, 1, "{report:?}");
    assert!(!blob_file(&pier, &recent).exists());
    let metrics = c
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pier_gc_runs_total{outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("pier_gc_freed_bytes_total {}", freed + 19)));
    assert!(metrics.contains("pier_hosted_pushes_total{kind=\"manifest\",outcome=\"ok\"} 4"));
    assert!(metrics.contains("pier_hosted_uploads_in_progress 0"));

    // A manifest deleted before a restart is still collected after it; what stayed is still
    // hosted.
    delete(&pier, "team/other", &digest_of(other.as_bytes())).await;
    let dir = pier.stop().await;
    let pier = start(
        &up,
        Options {
            dir: Some(dir),
            hosted: pier_cache::HostedConfig {
                gc_grace: Duration::ZERO,
                ..pier_cache::HostedConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let report = pier.mirror.cache.collect_garbage().await.unwrap();
    // The manifest, its config and the layer it shared with the deleted team/app:1.0.
    assert_eq!(report.removed, 3, "{report:?}");
    assert_eq!(report.manifests, 1, "{report:?}");
    assert_eq!(report.unpinned, 0, "{report:?}");
    assert!(!blob_file(&pier, &shared).exists());
    assert_eq!(status(&pier, "/v2/team/multi/manifests/1.0").await, 200);
    assert_eq!(status(&pier, "/v2/team/other/manifests/1.0").await, 404);
    let report = pier.mirror.cache.collect_garbage().await.unwrap();
    assert_eq!(report.removed, 0, "{report:?}");
}

#[tokio::test]
async fn docker_search_lists_what_the_caller_may_pull_a_page_at_a_time() {
    let users = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(
        users.path().join("htpasswd"),
        format!("alice:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    let auth = Auth::load(&AuthConfig {
        htpasswd: users.path().join("htpasswd"),
        anonymous: true,
        token_ttl: Duration::from_secs(60),
        rules: HashMap::from([(
            "alice".to_string(),
            vec![
                Rule::pull("team/app*"),
                Rule::pull("docker.io/library/nginx"),
            ],
        )]),
    })
    .unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let layer = up.add_blob(b"nginx layer".to_vec());
    let config = up.add_blob(b"{}".to_vec());
    up.add_manifest(
        "library/nginx",
        "latest",
        OCI_MANIFEST,
        &image_manifest(&config, &[&layer]),
    );
    let pier = start(
        &up,
        Options {
            auth: Some(Arc::new(auth)),
            ..Options::default()
        },
    )
    .await;
    let c = client();
    assert_eq!(status(&pier, "/v2/nginx/manifests/latest").await, 200);
    for repo in ["team/app", "team/apple", "team/tool", "local/app"] {
        let config = push_blob(&pier, repo, b"{}").await;
        let r = put_manifest(&pier, repo, "1.0", &image_manifest(&config, &[])).await;
        assert_eq!(r.status(), 201, "{repo}");
    }
    // The daemon's ping needs no credentials.
    let r = c
        .get(format!("{}/v1/_ping", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-docker-registry-standalone"), "true");
    let search = |user: Option<&'static str>, query: &'static str| {
        let c = c.clone();
        let url = format!("{}/v1/search?{query}", pier.url);
        async move {
            let mut req = c.get(url).header("x-docker-token", "true");
            if let Some(u) = user {
                req = req.basic_auth(u, Some("pw"));
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{user:?} {query}");
            assert_eq!(header(&r, "content-type"), "application/json");
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    let names = |v: &serde_json::Value| -> Vec<String> {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    // bob has no rules: he may pull anything.
    let v = search(Some("bob"), "q=APP&n=25").await;
    assert_eq!(names(&v), ["local/app", "team/app", "team/apple"]);
    assert_eq!(v["num_results"], 3);
    assert_eq!(v["num_pages"], 1);
    assert_eq!(v["page"], 1);
    assert_eq!(v["page_size"], 25);
    assert_eq!(v["query"], "APP");
    let first = &v["results"][0];
    assert_eq!(first["description"], "");
    assert_eq!(first["star_count"], 0);
    assert_eq!(first["is_official"], false);
    assert_eq!(first["is_automated"], false);
    // A page at a time.
    let v = search(Some("bob"), "q=app&n=2&page=2").await;
    assert_eq!(names(&v), ["team/apple"]);
    assert_eq!(v["num_pages"], 2);
    assert_eq!(v["page"], 2);
    assert_eq!(v["page_size"], 2);
    assert_eq!(v["num_results"], 3);
    let v = search(Some("bob"), "q=app&n=2&page=3").await;
    assert!(names(&v).is_empty());
    // alice sees what her rules let her pull, hosted and mirrored.
    let v = search(Some("alice"), "q=").await;
    assert_eq!(names(&v), ["library/nginx", "team/app", "team/apple"]);
    assert_eq!(v["page_size"], 25);
    let v = search(Some("alice"), "q=tool").await;
    assert!(names(&v).is_empty());
    assert_eq!(v["num_pages"], 0);
    // Anonymous clients pull anything here.
    let v = search(None, "q=ngin").await;
    assert_eq!(names(&v), ["library/nginx"]);
    // Bad numbers are refused; wrong credentials challenged.
    let r = c
        .get(format!("{}/v1/search?q=a&n=many", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(format!("{}/v1/search?q=a", pier.url))
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// pier hosting `team/**` and `local/*` (anonymous pushes on), mirroring `up` as docker.io with
/// `denied/**` denied, and searching `search_url` (with `search_timeout`) when given.
async fn start_searching(
    up: &FakeUpstream,
    search_url: Option<String>,
    search_timeout: Duration,
) -> Pier {
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.deny = vec!["denied/**".into()];
    spec.search_url = search_url;
    spec.search_timeout = search_timeout;
    s.upstreams = vec![spec];
    s.hosted_repositories = vec!["team/**".into(), "local/*".into()];
    s.allow_anonymous_push = true;
    launch(s).await
}

/// Pushes `team/app`, `team/apple` and `local/app`, and answers `/v1/search?<query>` as JSON.
async fn push_three_and_search(pier: &Pier) -> impl Fn(&str) -> BoxedSearch + '_ {
    for repo in ["team/app", "team/apple", "local/app"] {
        let config = push_blob(pier, repo, b"{}").await;
        let r = put_manifest(pier, repo, "1.0", &image_manifest(&config, &[])).await;
        assert_eq!(r.status(), 201, "{repo}");
    }
    move |query: &str| {
        let url = format!("{}/v1/search?{query}", pier.url);
        Box::pin(async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        })
    }
}

type BoxedSearch = std::pin::Pin<Box<dyn std::future::Future<Output = serde_json::Value>>>;

fn result_names(v: &serde_json::Value) -> Vec<String> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

/// The names Docker Hub's index finds for `app` in these tests: a hosted name (`team/app`) and
/// a denied one among them.
const INDEXED: [&str; 6] = [
    "app-tools",
    "bitnami/app",
    "team/app",
    "someone/apple",
    "denied/app",
    "other/thing",
];

/// With an upstream search configured, `docker search` answers pier's matches first, then the
/// upstream's for the same term (with their descriptions and stars), named as clients pull
/// them, without what pier lists already, hosted names, or what the upstream's lists deny.
#[tokio::test]
async fn docker_search_adds_a_configured_upstream_search() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index = FakeUpstream::start(Behaviour::default()).await;
    index.index_for_search(&INDEXED);
    let pier = start_searching(&up, Some(index.url()), Duration::from_secs(3)).await;
    let search = push_three_and_search(&pier).await;
    let v = search("q=app").await;
    assert_eq!(
        result_names(&v),
        [
            "local/app",
            "team/app",
            "team/apple",
            "app-tools",
            "bitnami/app",
            "someone/apple"
        ]
    );
    assert_eq!(v["results"][3]["description"], "app-tools upstream");
    assert_eq!(v["results"][3]["star_count"], 7);
    assert_eq!(v["results"][3]["is_official"], true);
    assert_eq!(v["results"][0]["star_count"], 0);
    // Pier's three and the five the index counts.
    assert_eq!(v["num_results"], 8);
    assert_eq!(v["num_pages"], 1);
    assert_eq!(index.requests(), ["GET /v1/search?q=app&n=25&page=1"]);
    // The registry itself is never asked to search.
    assert_eq!(up.count("/v1/search"), 0);
    // Counted as upstream requests of kind search.
    let metrics = client()
        .get(format!("{}/metrics", pier.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"pier_upstream_requests_total{kind="search",outcome="ok",upstream="docker.io"} 1"#
        ),
        "{metrics}"
    );
}

/// Pages are windows of pier's matches followed by the upstream's: the upstream is asked for
/// the page (of the client's size) the window starts in, and the next when it spans two.
#[tokio::test]
async fn docker_search_pages_through_local_then_upstream_results() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let index = FakeUpstream::start(Behaviour::default()).await;
    index.index_for_search(&INDEXED);
    let pier = start_searching(&up, Some(index.url()), Duration::from_secs(3)).await;
    let search = push_three_and_search(&pier).await;
    let v = search("q=app&n=2&page=1").await;
    assert_eq!(result_names(&v), ["local/app", "team/app"]);
    assert_eq!(
        (v["num_results"].clone(), v["num_pages"].clone()),
        (8.into(), 4.into())
    );
    let v = search("q=app&n=2&page=2").await;
    assert_eq!(result_names(&v), ["team/apple", "app-tools"]);
    // Upstream results 1 and 2 (bitnami/app, team/app): across its pages 1 and 2; team/app is
    // hosted here, so one is left.
    let v = search("q=app&n=2&page=3").await;
    assert_eq!(result_names(&v), ["bitnami/app"]);
    let v = search("q=app&n=2&page=4").await;
    assert_eq!(result_names(&v), ["someone/apple"]);
    assert_eq!(
        index.requests(),
        [
            "GET /v1/search?q=app&n=2&page=1",
            "GET /v1/search?q=app&n=2&page=1",
            "GET /v1/search?q=app&n=2&page=1",
            "GET /v1/search?q=app&n=2&page=2",
            "GET /v1/search?q=app&n=2&page=2",
            "GET /v1/search?q=app&n=2&page=3",
        ]
    );
}

/// An upstream search that is down, fails or hangs costs its results, never the search: pier's
/// own matches are answered (a hanging one within `search_timeout`).
#[tokio::test]
async fn docker_search_answers_local_results_when_the_upstream_search_fails() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let failing = FakeUpstream::start(Behaviour {
        fail_status: Some(500),
        ..Behaviour::default()
    })
    .await;
    let hanging = FakeUpstream::start(Behaviour {
        hang: true,
        ..Behaviour::default()
    })
    .await;
    for url in [format!("http://{closed}"), failing.url(), hanging.url()] {
        let pier = start_searching(&up, Some(url.clone()), Duration::from_millis(300)).await;
        let search = push_three_and_search(&pier).await;
        let started = std::time::Instant::now();
        let v = search("q=app").await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{url}: {:?}",
            started.elapsed()
        );
        assert_eq!(
            result_names(&v),
            ["local/app", "team/app", "team/apple"],
            "{url}"
        );
        assert_eq!(v["num_results"], 3, "{url}");
    }
    assert_eq!(failing.count("/v1/search"), 1);
    assert_eq!(hanging.count("/v1/search"), 1);
}

/// Without `search_url`, no upstream is asked anything by a search: not even the registry
/// pier mirrors, though it would answer one.
#[tokio::test]
async fn docker_search_asks_no_upstream_unless_configured() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    up.index_for_search(&INDEXED);
    let pier = start_searching(&up, None, Duration::from_secs(3)).await;
    let search = push_three_and_search(&pier).await;
    let v = search("q=app").await;
    assert_eq!(result_names(&v), ["local/app", "team/app", "team/apple"]);
    assert_eq!(v["num_results"], 3);
    assert_eq!(up.count("/v1/search"), 0);
    assert!(up.requests().is_empty(), "{:?}", up.requests());
}

/// Results of a search configured on an upstream other than the default are named with its
/// registry, as clients pull them through pier.
#[tokio::test]
async fn docker_search_names_another_upstreams_results_with_its_registry() {
    let hub = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    let index = FakeUpstream::start(Behaviour::default()).await;
    index.index_for_search(&["org/app", "org/tool"]);
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    let mut spec = UpstreamSpec::new("ghcr.io", ghcr.url());
    spec.search_url = Some(index.url());
    s.upstreams = vec![UpstreamSpec::new("docker.io", hub.url()), spec];
    let pier = launch(s).await;
    let r = client()
        .get(format!("{}/v1/search?q=app", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(result_names(&v), ["ghcr.io/org/app"]);
    assert_eq!(hub.count("/v1/search") + ghcr.count("/v1/search"), 0);
}
