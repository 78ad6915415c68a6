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

/// Requests to the fake upstream that carried `Authorization: Bearer <token>`, from `from` on.
fn bearer_uses(up: &FakeUpstream, from: usize, token: &str) -> usize {
    let expected = format!("Bearer {token}");
    up.state.auth_seen.lock().unwrap()[from..]
        .iter()
        .filter(|(_, a)| a.as_deref() == Some(expected.as_str()))
        .count()
}

#[tokio::test]
async fn a_refused_token_is_dropped_and_replaced_by_exactly_one_new_one() {
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
    let get = |path: String| {
        let url = format!("{}/v2/{path}", pier.url);
        async move { client().get(url).send().await.unwrap().status() }
    };
    assert_eq!(get(format!("app/blobs/{d1}")).await, 200);
    assert_eq!(up.state.tokens_issued.load(Ordering::SeqCst), 1);
    let old = crate::fake_upstream::current_token(&up.state);

    // The upstream rotates its signing key: the cached token is refused from now on.
    let new = up.rotate_token();
    let seen_before = up.state.auth_seen.lock().unwrap().len();
    assert_eq!(
        get(format!("app/blobs/{d2}")).await,
        200,
        "{:?}",
        up.requests()
    );
    assert_eq!(
        up.state.tokens_issued.load(Ordering::SeqCst),
        2,
        "exactly one new token: {:?}",
        up.requests()
    );
    assert_eq!(
        bearer_uses(&up, seen_before, &old),
        1,
        "the refused token was sent again"
    );
    assert!(bearer_uses(&up, seen_before, &new) >= 1);

    // The new token is cached: the next pull needs no token request, and the old one is gone.
    let seen_before = up.state.auth_seen.lock().unwrap().len();
    assert_eq!(get("app/manifests/1.0".to_string()).await, 200);
    assert_eq!(up.state.tokens_issued.load(Ordering::SeqCst), 2);
    assert_eq!(bearer_uses(&up, seen_before, &old), 0);
}

/// GETs these blobs through pier all at once; each must come back whole.
async fn pull_all(pier: &str, blobs: &[(String, Vec<u8>)]) {
    let requests = blobs.iter().map(|(digest, data)| async move {
        let r = client()
            .get(format!("{pier}/v2/library/app/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.bytes().await.unwrap() == data[..]);
    });
    futures_util::future::join_all(requests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_needing_one_token_share_one_token_request() {
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_credentials: Some(("alice".into(), "s3cret-pw".into())),
        // Slow enough that every request is waiting for a token at once.
        token_delay: Some(std::time::Duration::from_millis(200)),
        ..Behaviour::default()
    })
    .await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.credentials = Some(("alice", "s3cret-pw"));
    let pier = start(vec![spec], (0, 0)).await;
    let blobs: Vec<(String, Vec<u8>)> = (0..40u8)
        .map(|i| {
            let data = vec![i; 5_000];
            (up.add_blob(data.clone()), data)
        })
        .collect();
    // A cold pier: 20 requests, all challenged, one token request.
    pull_all(&pier.url, &blobs[..20]).await;
    assert_eq!(
        up.state.tokens_issued.load(Ordering::SeqCst),
        1,
        "{:?}",
        up.requests()
    );

    // After a key rotation, 20 requests refused at once still fetch one new token between them.
    up.rotate_token();
    pull_all(&pier.url, &blobs[20..]).await;
    assert_eq!(
        up.state.tokens_issued.load(Ordering::SeqCst),
        2,
        "{:?}",
        up.requests()
    );
}

#[tokio::test]
async fn credentials_are_not_sent_to_a_plain_http_realm_on_another_host() {
    // The "other host": another server, named by a loopback alias the upstream is not known by.
    let token_server = FakeUpstream::start(Behaviour::default()).await;
    let realm = format!("http://localhost:{}/token", token_server.addr.port());
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_realm: Some(realm.clone()),
        ..Behaviour::default()
    })
    .await;
    assert!(up.url().starts_with("http://127.0.0.1:"));
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.credentials = Some(("alice", "s3cret-pw"));
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
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 502, "{text}");
    assert!(
        text.contains(&format!(
            r#"refusing to send credentials to token realm \"{realm}\""#
        )),
        "the error does not name the realm: {text}"
    );
    assert!(!text.contains("s3cret-pw"));
    assert!(
        token_server.requests().is_empty(),
        "the token server was asked: {:?}",
        token_server.state.auth_seen.lock().unwrap()
    );
    // and the upstream itself never saw the credentials either
    assert!(up
        .state
        .auth_seen
        .lock()
        .unwrap()
        .iter()
        .all(|(_, a)| a.is_none()));
}

#[tokio::test]
async fn anonymous_tokens_may_come_from_a_plain_http_realm_on_another_host() {
    let token_server = FakeUpstream::start(Behaviour::default()).await;
    let realm = format!("http://localhost:{}/token", token_server.addr.port());
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_realm: Some(realm),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
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
    assert_eq!(r.status(), 200);
    let asked = token_server.state.auth_seen.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0], ("/token".to_string(), None));
}
