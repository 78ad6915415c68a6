//! Access rules hold for cached content: a digest cached for one repository is served under
//! another only when the upstream confirms that repository holds it, online; offline, never.
//! Per-user rules and allow/deny lists cannot be walked around by asking for someone else's
//! digest under a permitted name, and the catalog lists only what the caller may pull.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pier_server::auth::{Auth, AuthConfig};
use pier_server::ServerOptions;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, launch, settle, Pier, Setup, UpstreamSpec};

const M: &str = "application/vnd.oci.image.manifest.v1+json";

struct Fixture {
    up: FakeUpstream,
    pier: Pier,
    _users: tempfile::TempDir,
    /// A layer only `library/app` holds, and one both repositories hold.
    app_layer: String,
    shared_layer: String,
    app_manifest: String,
}

/// alice may pull only `library/allowed`; bob anything. The upstream links blobs per
/// repository, as a real registry does.
async fn setup(deny: Vec<String>, dir: Option<tempfile::TempDir>) -> Fixture {
    let users = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    std::fs::write(
        users.path().join("htpasswd"),
        format!("alice:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    let auth = Auth::load(&AuthConfig {
        htpasswd: users.path().join("htpasswd"),
        anonymous: false,
        token_ttl: Duration::from_secs(60),
        rules: HashMap::from([(
            "alice".to_string(),
            vec![pier_server::auth::Rule::pull("docker.io/library/allowed")],
        )]),
    })
    .unwrap();
    let up = FakeUpstream::start(Behaviour::default()).await;
    let app_layer = up.add_blob_in("library/app", vec![7u8; 50_000]);
    let shared_layer = up.add_blob_in("library/app", vec![9u8; 40_000]);
    up.state
        .blob_repos
        .lock()
        .unwrap()
        .get_mut(&shared_layer)
        .unwrap()
        .push("library/allowed".into());
    let app_manifest = up.add_manifest(
        "library/app",
        "1",
        M,
        &format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{app_layer}"}}]}}"#),
    );
    up.add_manifest("library/allowed", "1", M, r#"{"schemaVersion":2}"#);
    let mut s = Setup::new(dir.unwrap_or_else(|| tempfile::tempdir().unwrap()));
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.read_timeout = Duration::from_millis(500);
    spec.deny = deny;
    s.upstreams = vec![spec];
    s.options = ServerOptions {
        auth: Some(Arc::new(auth)),
        ..ServerOptions::default()
    };
    let pier = launch(s).await;
    Fixture {
        up,
        pier,
        _users: users,
        app_layer,
        shared_layer,
        app_manifest,
    }
}

async fn get(pier: &Pier, user: &str, path: &str) -> reqwest::Response {
    client()
        .get(format!("{}/v2/{path}", pier.url))
        .basic_auth(user, Some("pw"))
        .send()
        .await
        .unwrap()
}

async fn head(pier: &Pier, user: &str, path: &str) -> u16 {
    client()
        .head(format!("{}/v2/{path}", pier.url))
        .basic_auth(user, Some("pw"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_user_never_gets_a_cached_digest_of_a_repository_they_may_not_pull() {
    let f = setup(Vec::new(), None).await;
    // bob pulls library/app: its manifest and layer are cached.
    let r = get(&f.pier, "bob", "app/manifests/1").await;
    assert_eq!(r.status(), 200);
    let r = get(&f.pier, "bob", &format!("app/blobs/{}", f.app_layer)).await;
    assert_eq!(r.bytes().await.unwrap().len(), 50_000);
    settle(&f.pier).await;
    let gets = f.up.count("GET /v2/library/app/blobs/");
    // alice may pull library/allowed only; asking for app's layer under it is refused, after
    // the upstream said library/allowed does not hold it.
    let r = get(&f.pier, "alice", &format!("allowed/blobs/{}", f.app_layer)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert_eq!(
        f.up.count(&format!("HEAD /v2/library/allowed/blobs/{}", f.app_layer)),
        1
    );
    assert_eq!(
        head(&f.pier, "alice", &format!("allowed/blobs/{}", f.app_layer)).await,
        404
    );
    let r = get(
        &f.pier,
        "alice",
        &format!("allowed/manifests/{}", f.app_manifest),
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Her own repository's request goes straight through, and bob is refused nothing.
    assert_eq!(
        get(&f.pier, "alice", "allowed/manifests/1").await.status(),
        200
    );
    // A layer both repositories hold is confirmed once (a HEAD) and served from the cache.
    let r = get(&f.pier, "bob", &format!("app/blobs/{}", f.shared_layer)).await;
    assert_eq!(r.bytes().await.unwrap().len(), 40_000);
    settle(&f.pier).await;
    for _ in 0..2 {
        let r = get(
            &f.pier,
            "alice",
            &format!("allowed/blobs/{}", f.shared_layer),
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().len(), 40_000);
    }
    assert_eq!(
        f.up.count(&format!(
            "HEAD /v2/library/allowed/blobs/{}",
            f.shared_layer
        )),
        1
    );
    assert_eq!(f.up.count("GET /v2/library/allowed/blobs/"), 0);
    assert_eq!(f.up.count("GET /v2/library/app/blobs/"), gets + 1);
    // Offline: an unlinked repository gets the not-found error, never someone else's bytes;
    // what was confirmed keeps working.
    f.up.set(|b| b.drop_connections = true);
    let r = get(&f.pier, "alice", &format!("allowed/blobs/{}", f.app_layer)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = get(
        &f.pier,
        "alice",
        &format!("allowed/blobs/{}", f.shared_layer),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = get(&f.pier, "bob", &format!("app/blobs/{}", f.app_layer)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_deny_list_is_not_walked_around_through_cached_digests_online_or_offline() {
    // First without a deny list: library/app's layer is cached.
    let f = setup(Vec::new(), None).await;
    assert_eq!(get(&f.pier, "bob", "app/manifests/1").await.status(), 200);
    let r = get(&f.pier, "bob", &format!("app/blobs/{}", f.app_layer)).await;
    assert_eq!(r.bytes().await.unwrap().len(), 50_000);
    settle(&f.pier).await;
    let r = get(&f.pier, "bob", "_catalog").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]));
    let dir = f.pier.stop().await;
    // Then library/app is denied: its cached layer is not reachable through library/allowed.
    let f2 = setup(vec!["library/app".into()], Some(dir)).await;
    let layer = f.app_layer;
    let r = get(&f2.pier, "bob", &format!("app/blobs/{layer}")).await;
    assert_eq!(r.status(), 403);
    // The upstream holds the layer under library/app only: it answers the HEAD with 404.
    let r = get(&f2.pier, "bob", &format!("allowed/blobs/{layer}")).await;
    assert_eq!(r.status(), 404);
    f2.up.set(|b| b.drop_connections = true);
    let r = get(&f2.pier, "bob", &format!("allowed/blobs/{layer}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    // The catalog does not list a denied repository.
    let r = get(&f2.pier, "bob", "_catalog").await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(!v["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r == "library/app"));
}

#[tokio::test]
async fn the_catalog_lists_only_what_the_caller_may_pull() {
    let f = setup(Vec::new(), None).await;
    for repo in ["app", "allowed"] {
        assert_eq!(
            get(&f.pier, "bob", &format!("{repo}/manifests/1"))
                .await
                .status(),
            200
        );
    }
    let list = |user: &'static str| {
        let pier = &f.pier;
        async move {
            let v: serde_json::Value = get(pier, user, "_catalog").await.json().await.unwrap();
            v["repositories"].clone()
        }
    };
    assert_eq!(
        list("bob").await,
        serde_json::json!(["library/allowed", "library/app"])
    );
    assert_eq!(list("alice").await, serde_json::json!(["library/allowed"]));
    // Paging works on what the caller sees.
    let r = get(&f.pier, "bob", "_catalog?n=1").await;
    assert_eq!(
        r.headers()["link"].to_str().unwrap(),
        r#"</v2/_catalog?n=1&last=library%2Fallowed>; rel="next""#
    );
}
