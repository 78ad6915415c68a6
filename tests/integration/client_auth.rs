//! Client authentication: Basic with htpasswd users, the registry token flow, per-user rules,
//! anonymous pulls on or off.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_server::auth::{Auth, AuthConfig};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, Pier, Setup, UpstreamSpec};

const M: &str = "application/vnd.oci.image.manifest.v1+json";

async fn setup(anonymous: bool) -> (tempfile::TempDir, FakeUpstream, Pier) {
    let (dir, up, pier, _) = setup_with(anonymous, 4).await;
    (dir, up, pier)
}

/// pier with users alice and bob, their hashes of this bcrypt cost; also hands back the `Auth`.
async fn setup_with(
    anonymous: bool,
    cost: u32,
) -> (tempfile::TempDir, FakeUpstream, Pier, Arc<Auth>) {
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-pw", cost).unwrap();
    let bob = bcrypt::hash("bob-pw", cost).unwrap();
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
            vec![pier_server::auth::Rule::pull("docker.io/library/allowed")],
        )]),
    })
    .unwrap();
    let auth = Arc::new(auth);
    let up = FakeUpstream::start(Behaviour::default()).await;
    for repo in ["library/app", "library/allowed"] {
        up.add_manifest(repo, "1", M, "{}");
    }
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    s.options = ServerOptions {
        auth: Some(auth.clone()),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    (dir, up, pier, auth)
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

/// bcrypt runs on the blocking pool, never on the async workers: with a single worker thread, a
/// flood of requests with different wrong passwords (each one a bcrypt check) does not hold up a
/// user whose password was verified before, nor an anonymous pull. Were bcrypt run on the
/// worker, the pulls would be answered only after (nearly) every check of the flood.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_flood_of_wrong_passwords_does_not_hold_up_other_pulls() {
    const FLOOD: usize = 50;
    // A cost that makes each check take tens of milliseconds (bcrypt doubles per step).
    let started = Instant::now();
    let (_d, _up, pier, auth) = setup_with(true, 7).await;
    eprintln!("two bcrypt hashes of cost 7: {:?}", started.elapsed());
    let url = format!("{}/v2/app/manifests/1", pier.url);
    let pull = |user: Option<(&str, &str)>| {
        let r = client().get(&url);
        let r = match user {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        };
        async move { r.send().await.unwrap().status().as_u16() }
    };
    // alice's password is verified once, and remembered.
    assert_eq!(pull(Some(("alice", "alice-pw"))).await, 200);
    assert_eq!(auth.password_checks(), 1);

    let done = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let (url, done) = (url.clone(), done.clone());
            tokio::spawn(async move {
                let r = client()
                    .get(&url)
                    .basic_auth("alice", Some(format!("wrong-{i}")))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 401 {
                    done.fetch_add(1, Ordering::SeqCst);
                }
                let retry_after = r
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status().as_u16(), retry_after)
            })
        })
        .collect();
    // Until bcrypt is at work on the flood. (The test body runs on a thread of its own, not on
    // the runtime's worker: sleeping it holds up nothing.)
    while auth.password_checks() < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let (verified, anonymous) = tokio::join!(pull(Some(("alice", "alice-pw"))), pull(None));
    let finished_meanwhile = done.load(Ordering::SeqCst);
    eprintln!("{finished_meanwhile} of {FLOOD} password checks answered before the pulls");
    assert_eq!((verified, anonymous), (200, 200));
    assert!(
        finished_meanwhile < FLOOD / 2,
        "the pulls waited for {finished_meanwhile} of {FLOOD} password checks"
    );
    let mut checked = 0;
    for f in flood {
        match f.await.unwrap() {
            (401, _) => checked += 1,
            // More than may wait for a turn: asked to come back, not told the password is wrong.
            (429, retry_after) => assert_eq!(retry_after.as_deref(), Some("1")),
            other => panic!("a wrong password was answered {other:?}"),
        }
    }
    assert!(checked > 0);
    // The remembered password needed no second check; each wrong one needed one.
    assert_eq!(auth.password_checks(), 1 + checked as u64);
}

/// containerd routes by `?ns=`: the challenge's realm carries it back, so that the token endpoint
/// grants the repository of the registry the request was for, under that registry's rules.
#[tokio::test]
async fn the_token_flow_keeps_the_ns_routing() {
    let users = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(users.path().join("htpasswd"), format!("carol:{hash}\n")).unwrap();
    let auth = Auth::load(&AuthConfig {
        htpasswd: users.path().join("htpasswd"),
        anonymous: false,
        token_ttl: Duration::from_secs(60),
        rules: HashMap::from([(
            "carol".to_string(),
            vec![pier_server::auth::Rule::pull("ghcr.io/org/**")],
        )]),
    })
    .unwrap();
    let hub = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    ghcr.add_manifest("org/app", "1", M, "{}");
    hub.add_manifest("org/app", "1", M, r#"{"hub":1}"#);
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![
        UpstreamSpec::new("docker.io", hub.url()),
        UpstreamSpec::new("ghcr.io", ghcr.url()),
    ];
    s.options = ServerOptions {
        auth: Some(Arc::new(auth)),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    let url = format!("{}/v2/org/app/manifests/1?ns=ghcr.io", pier.url);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    let realm = challenge
        .split("realm=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    assert!(realm.ends_with("/auth/token?ns=ghcr.io"), "{realm}");
    // As a client does: the realm, plus service and scope.
    let v: serde_json::Value = client()
        .get(format!(
            "{realm}&service=pier&scope=repository:org/app:pull"
        ))
        .basic_auth("carol", Some("pw"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["token"].as_str().unwrap();
    let r = client().get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(ghcr.count("/v2/org/app/manifests/1"), 1);
    // The same name on the default registry stays out of carol's rules.
    let r = client()
        .get(format!("{}/v2/org/app/manifests/1", pier.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(hub.count("/manifests/"), 0);
}
