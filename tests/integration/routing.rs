//! Routing on one listener: default upstream, `?ns=`, registry path prefix; never an open proxy.

use std::sync::atomic::Ordering;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, start, UpstreamSpec};

const M: &str = "application/vnd.oci.image.manifest.v1+json";

async fn two() -> (FakeUpstream, FakeUpstream, crate::harness::Pier) {
    let hub = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        vec![
            UpstreamSpec::new("docker.io", hub.url()),
            UpstreamSpec::new("ghcr.io", ghcr.url()),
        ],
        (0, 0),
    )
    .await;
    hub.add_manifest("library/app", "1.0", M, r#"{"from":"hub"}"#);
    ghcr.add_manifest("org/app", "1.0", M, r#"{"from":"ghcr"}"#);
    (hub, ghcr, pier)
}

async fn get(url: String) -> (u16, String) {
    let r = client().get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn three_conventions_route_to_the_right_upstream() {
    let (hub, ghcr, pier) = two().await;
    assert_eq!(
        get(format!("{}/v2/library/app/manifests/1.0", pier.url)).await,
        (200, r#"{"from":"hub"}"#.into())
    );
    assert_eq!(
        get(format!("{}/v2/org/app/manifests/1.0?ns=ghcr.io", pier.url)).await,
        (200, r#"{"from":"ghcr"}"#.into())
    );
    assert_eq!(
        get(format!("{}/v2/ghcr.io/org/app/manifests/1.0", pier.url)).await,
        (200, r#"{"from":"ghcr"}"#.into())
    );
    assert_eq!(
        get(format!(
            "{}/v2/docker.io/library/app/manifests/1.0",
            pier.url
        ))
        .await,
        (200, r#"{"from":"hub"}"#.into())
    );
    assert_eq!(
        get(format!("{}/v2/app/manifests/1.0?ns=docker.io", pier.url)).await,
        (200, r#"{"from":"hub"}"#.into())
    );
    // Tags belong to their upstream: same repo and tag, two answers, each fetched once.
    assert_eq!(ghcr.count("manifests/1.0"), 1);
    assert_eq!(hub.count("manifests/1.0"), 1);
}

#[tokio::test]
async fn unconfigured_registry_is_refused_by_name_and_nothing_leaves_pier() {
    let (hub, ghcr, pier) = two().await;
    for url in [
        format!("{}/v2/quay.io/org/app/manifests/1.0", pier.url),
        format!("{}/v2/org/app/manifests/1.0?ns=quay.io", pier.url),
        format!(
            "{}/v2/evil.example:8080/x/blobs/sha256:{}",
            pier.url,
            "0".repeat(64)
        ),
    ] {
        let r = client().get(&url).send().await.unwrap();
        assert_eq!(r.status(), 404, "{url}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "NAME_UNKNOWN");
        assert!(v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("is not configured"));
    }
    assert!(hub.requests().is_empty() && ghcr.requests().is_empty());
}

#[tokio::test]
async fn a_blob_is_stored_and_fetched_once_across_upstreams() {
    let (hub, ghcr, pier) = two().await;
    let body = vec![5u8; 50_000];
    let digest = hub.add_blob(body.clone());
    ghcr.add_blob(body.clone());
    let (s, _) = get(format!("{}/v2/library/app/blobs/{digest}", pier.url)).await;
    assert_eq!(s, 200);
    crate::harness::settle(&pier).await;
    let r = client()
        .get(format!("{}/v2/ghcr.io/org/app/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-pier-cache"], "disk");
    assert!(r.bytes().await.unwrap() == body);
    assert_eq!(
        hub.state.blob_gets.load(Ordering::SeqCst) + ghcr.state.blob_gets.load(Ordering::SeqCst),
        1
    );
}

#[tokio::test]
async fn allow_and_deny_lists_are_checked_before_anything_else() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.allow = vec!["library/*".into(), "myorg/**".into()];
    spec.deny = vec!["library/forbidden".into()];
    let pier = start(vec![spec], (0, 0)).await;
    up.add_manifest("library/app", "1", M, "{}");
    assert_eq!(get(format!("{}/v2/app/manifests/1", pier.url)).await.0, 200);
    for path in [
        "library/forbidden/manifests/1",
        "forbidden/manifests/1",
        "other/app/manifests/1",
        "other/app/tags/list",
    ] {
        let r = client()
            .get(format!("{}/v2/{path}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], "DENIED");
    }
    let d = format!("sha256:{}", "1".repeat(64));
    let r = client()
        .get(format!("{}/v2/other/app/blobs/{d}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(up.requests().len(), 1, "{:?}", up.requests());
}
