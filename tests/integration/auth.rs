//! Upstream auth: token flow, credentials, redirects to another host.

use std::sync::atomic::Ordering;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, start, UpstreamSpec};

#[tokio::test]
async fn bearer_token_is_fetched_once_and_scoped_to_the_upstream_repository() {
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_credentials: Some(("alice".into(), "s3cret-pw".into())),
        ..Behaviour::default()
    })
    .await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.credentials = Some(("alice", "s3cret-pw"));
    let pier = start(vec![spec], (0, 0)).await;
    let d1 = up.add_blob(vec![1u8; 10_000]);
    let d2 = up.add_blob(vec![2u8; 10_000]);
    up.add_manifest(
        "library/app",
        "1.0",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    for path in [
        format!("app/blobs/{d1}"),
        format!("app/blobs/{d2}"),
        "app/manifests/1.0".to_string(),
    ] {
        let r = client()
            .get(format!("{}/v2/{path}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(
        up.state.tokens_issued.load(Ordering::SeqCst),
        1,
        "{:?}",
        up.requests()
    );
    let token_requests: Vec<String> = up
        .requests()
        .into_iter()
        .filter(|r| r.contains("/token"))
        .collect();
    assert!(
        token_requests[0].contains("scope=repository%3Alibrary%2Fapp%3Apull"),
        "{token_requests:?}"
    );
}

#[tokio::test]
async fn wrong_upstream_credentials_are_denied_without_leaking_them() {
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_credentials: Some(("alice".into(), "right".into())),
        ..Behaviour::default()
    })
    .await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.credentials = Some(("alice", "wrong-pw-123"));
    let pier = start(vec![spec], (0, 0)).await;
    up.add_manifest(
        "library/app",
        "1.0",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    let r = client()
        .get(format!("{}/v2/app/manifests/1.0", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(text.contains("DENIED"), "{text}");
    assert!(
        !text.contains("wrong-pw-123")
            && !text.contains(&crate::fake_upstream::base64("alice:wrong-pw-123"))
    );
}

#[tokio::test]
async fn blob_redirect_is_followed_without_the_upstream_token() {
    let cdn = FakeUpstream::start(Behaviour::default()).await;
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        redirect_blobs_to: Some(cdn.url()),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let body = vec![9u8; 100_000];
    let digest = up.add_blob(body.clone());
    cdn.add_blob(body.clone());
    let r = client()
        .get(format!("{}/v2/library/app/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == body);
    let cdn_auth = cdn.state.auth_seen.lock().unwrap().clone();
    assert_eq!(cdn_auth.len(), 1);
    assert_eq!(
        cdn_auth[0].1, None,
        "the upstream's Authorization was sent to another host"
    );
    // while the upstream itself did get the token
    assert!(up
        .state
        .auth_seen
        .lock()
        .unwrap()
        .iter()
        .any(|(p, a)| p.contains("/blobs/") && a.is_some()));
}

#[tokio::test]
async fn unrequested_client_authorization_is_ignored() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    up.add_manifest(
        "library/app",
        "1.0",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    let r = client()
        .get(format!("{}/v2/app/manifests/1.0", pier.url))
        .header("authorization", "Bearer docker-hub-credentials-of-the-user")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // and they do not travel upstream
    assert!(up
        .state
        .auth_seen
        .lock()
        .unwrap()
        .iter()
        .all(|(_, a)| a.is_none()));
}

#[tokio::test]
async fn basic_challenge_is_answered_with_the_configured_credentials() {
    let up = FakeUpstream::start(Behaviour {
        require_basic: Some(("mirror".into(), "basic-pw".into())),
        ..Behaviour::default()
    })
    .await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.credentials = Some(("mirror", "basic-pw"));
    let pier = start(vec![spec], (0, 0)).await;
    up.add_manifest(
        "library/app",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    let blob = up.add_blob(vec![3u8; 1000]);
    for path in ["app/manifests/1".to_string(), format!("app/blobs/{blob}")] {
        let r = client()
            .get(format!("{}/v2/{path}", pier.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // After the first challenge pier sends Basic up front: one 401 in all.
    let unauthorized = up
        .state
        .auth_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, a)| a.is_none())
        .count();
    assert_eq!(unauthorized, 1);
}
