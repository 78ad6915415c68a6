//! Client authentication: Basic with htpasswd users, the registry token flow, per-user rules,
//! anonymous pulls on or off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pier_server::auth::{Auth, AuthConfig};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, Pier, Setup, UpstreamSpec};

const M: &str = "application/vnd.oci.image.manifest.v1+json";

async fn setup(anonymous: bool) -> (tempfile::TempDir, FakeUpstream, Pier) {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    let bob = bcrypt::hash("bob-pw", 4).unwrap();
    std::fs::write(
        dir.path().join("htpasswd"),
        format!("alice:{hash}\nbob:{bob}\n"),
    )
    .unwrap();
    let auth = Auth::load(&AuthConfig {
        htpasswd: dir.path().join("htpasswd"),
        anonymous,
        token_ttl: Duration::from_secs(60),
        rules: HashMap::from([(
            "bob".to_string(),
            vec!["docker.io/library/allowed".to_string()],
        )]),
    })
    .unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    for repo in ["library/app", "library/allowed"] {
        up.add_manifest(repo, "1", M, "{}");
    }
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    s.options = ServerOptions {
        auth: Some(Arc::new(auth)),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    (dir, up, pier)
}

#[tokio::test]
async fn basic_credentials_and_challenges() {
    let (_d, up, pier) = setup(false).await;
    let url = format!("{}/v2/app/manifests/1", pier.url);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer realm=\"http://127.0.0.1:"),
        "{challenge}"
    );
    assert!(
        challenge.contains("/auth/token\",service=\"pier\",scope=\"repository:app:pull\""),
        "{challenge}"
    );
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    let r = client()
        .get(&url)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        up.requests().is_empty(),
        "an unauthenticated request reached the upstream"
    );
    let r = client()
        .get(&url)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // /v2/ too asks for credentials, so that `docker login` works against it.
    assert_eq!(
        client()
            .get(format!("{}/v2/", pier.url))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client()
            .get(format!("{}/v2/", pier.url))
            .basic_auth("alice", Some("alice-pw"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn token_flow_scoped_to_repositories() {
    let (_d, _up, pier) = setup(false).await;
    let token_url = format!(
        "{}/auth/token?service=pier&scope=repository:app:pull",
        pier.url
    );
    assert_eq!(client().get(&token_url).send().await.unwrap().status(), 401);
    let v: serde_json::Value = client()
        .get(&token_url)
        .basic_auth("alice", Some("alice-pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert_eq!(v["access_token"], v["token"]);
    assert_eq!(v["expires_in"], 60);
    let get = |path: &str, token: &str| {
        client()
            .get(format!("{}/v2/{path}", pier.url))
            .bearer_auth(token.to_string())
            .send()
    };
    assert_eq!(get("app/manifests/1", &token).await.unwrap().status(), 200);
    // The token names library/app's client name only: another repository needs another token.
    let r = get("allowed/manifests/1", &token).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("scope=\"repository:allowed:pull\""));
    assert_eq!(
        get("app/manifests/1", "forged.token")
            .await
            .unwrap()
            .status(),
        401
    );
}

#[tokio::test]
async fn per_user_rules() {
    let (_d, up, pier) = setup(false).await;
    let get = |path: &str| {
        client()
            .get(format!("{}/v2/{path}", pier.url))
            .basic_auth("bob", Some("bob-pw"))
            .send()
    };
    assert_eq!(get("allowed/manifests/1").await.unwrap().status(), 200);
    let r = get("app/manifests/1").await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    // A token is only granted for what bob may pull.
    let v: serde_json::Value = client()
        .get(format!(
            "{}/auth/token?service=pier&scope=repository:app:pull&scope=repository:allowed:pull",
            pier.url
        ))
        .basic_auth("bob", Some("bob-pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap();
    let with_token = |path: &str| {
        client()
            .get(format!("{}/v2/{path}", pier.url))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        with_token("allowed/manifests/1").await.unwrap().status(),
        200
    );
    assert_eq!(with_token("app/manifests/1").await.unwrap().status(), 401);
    assert_eq!(up.count("library/app"), 0);
}

#[tokio::test]
async fn anonymous_pulls_when_allowed() {
    let (_d, _up, pier) = setup(true).await;
    assert_eq!(
        client()
            .get(format!("{}/v2/app/manifests/1", pier.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Bad credentials are still refused rather than silently downgraded.
    let r = client()
        .get(format!("{}/v2/app/manifests/1", pier.url))
        .basic_auth("alice", Some("nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
