//! Tags: the freshness window, HEAD revalidation, stale answers when the upstream is down or
//! rate-limiting, immutable tags, the rate-limit budget; tag lists and the catalog.

use std::time::Duration;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, error_code, start, start_in, Pier, UpstreamSpec};

const M: &str = "application/vnd.oci.image.manifest.v1+json";

async fn with_ttl(ttl: Duration, tweak: impl FnOnce(&mut UpstreamSpec)) -> (FakeUpstream, Pier) {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.tag_ttl = ttl;
    spec.read_timeout = Duration::from_millis(500);
    tweak(&mut spec);
    let pier = start(vec![spec], (1 << 20, 64 << 10)).await;
    (up, pier)
}

async fn digest_of(pier: &Pier, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("{}/v2/{path}", pier.url))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let d = r
        .headers()
        .get("docker-content-digest")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, d)
}

#[tokio::test]
async fn moved_tag_is_seen_after_the_window_and_not_before() {
    // Ages are whole seconds: a 2 s window is still open for a request a few milliseconds
    // after the fetch, whichever side of a second's boundary it falls on.
    let (up, pier) = with_ttl(Duration::from_secs(2), |_| {}).await;
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    assert_eq!(
        digest_of(&pier, "app/manifests/latest").await,
        (200, a.clone())
    );
    let b = up.add_manifest("library/app", "latest", M, r#"{"v":"b"}"#);
    assert_eq!(
        digest_of(&pier, "app/manifests/latest").await,
        (200, a.clone()),
        "changed within the window"
    );
    assert_eq!(up.requests().len(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(digest_of(&pier, "app/manifests/latest").await, (200, b));
    assert_eq!(up.count("HEAD /v2/library/app/manifests/latest"), 1);
    assert_eq!(up.count("GET /v2/library/app/manifests/latest"), 2);
}

#[tokio::test]
async fn revalidation_uses_head_while_the_digest_stays() {
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    for _ in 0..4 {
        assert_eq!(
            digest_of(&pier, "app/manifests/latest").await,
            (200, a.clone())
        );
    }
    assert_eq!(up.count("GET /v2/library/app/manifests/latest"), 1);
    assert_eq!(up.count("HEAD /v2/library/app/manifests/latest"), 3);
}

#[tokio::test]
async fn stale_tag_is_served_when_the_upstream_fails() {
    type Break = fn(&mut Behaviour);
    let cases: [(&str, Break); 5] = [
        ("500", |b| b.fail_status = Some(500)),
        ("503", |b| b.fail_status = Some(503)),
        ("429", |b| b.fail_status = Some(429)),
        ("connection dropped", |b| b.drop_connections = true),
        ("timeout", |b| b.hang = true),
    ];
    for (what, break_it) in cases {
        let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
        let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
        assert_eq!(
            digest_of(&pier, "app/manifests/latest").await,
            (200, a.clone())
        );
        up.set(break_it);
        assert_eq!(
            digest_of(&pier, "app/manifests/latest").await,
            (200, a.clone()),
            "{what}"
        );
        // Digest references never need the upstream.
        assert_eq!(
            digest_of(&pier, &format!("app/manifests/{a}")).await,
            (200, a.clone()),
            "{what}"
        );
    }
}

#[tokio::test]
async fn an_upstream_known_down_is_not_waited_on_again() {
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    up.add_manifest("library/app", "other", M, r#"{"v":"o"}"#);
    digest_of(&pier, "app/manifests/latest").await;
    digest_of(&pier, "app/manifests/other").await;
    up.set(|b| b.hang = true);
    assert_eq!(digest_of(&pier, "app/manifests/latest").await, (200, a));
    let hung = up.count("HUNG");
    let started = std::time::Instant::now();
    assert_eq!(digest_of(&pier, "app/manifests/other").await.0, 200);
    assert_eq!(
        up.count("HUNG"),
        hung,
        "pier asked an upstream it knew was down"
    );
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn deleted_tag_is_not_resurrected() {
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    up.add_manifest("library/app", "gone", M, r#"{"v":"a"}"#);
    assert_eq!(digest_of(&pier, "app/manifests/gone").await.0, 200);
    up.state
        .manifests
        .lock()
        .unwrap()
        .retain(|(_, t), _| t != "gone");
    let r = client()
        .get(format!("{}/v2/app/manifests/gone", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn rate_limited_with_nothing_cached_is_429_with_retry_after() {
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    up.set(|b| b.fail_status = Some(429));
    let r = client()
        .get(format!("{}/v2/app/manifests/latest", pier.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "42");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
}

#[tokio::test]
async fn pier_started_with_the_upstream_down_serves_its_cache() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    let blob = up.add_blob(vec![8u8; 70_000]);
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.tag_ttl = Duration::ZERO;
    let first = start(vec![spec], (0, 0)).await;
    assert_eq!(digest_of(&first, "app/manifests/latest").await.0, 200);
    assert_eq!(
        client()
            .get(format!("{}/v2/app/blobs/{blob}", first.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let dir = first.stop().await;
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut spec = UpstreamSpec::new("docker.io", format!("http://{dead}"));
    spec.tag_ttl = Duration::ZERO;
    let second = start_in(vec![spec], (0, 0), dir).await;
    assert_eq!(digest_of(&second, "app/manifests/latest").await, (200, a));
    let r = client()
        .get(format!("{}/v2/app/blobs/{blob}", second.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 70_000);
}

#[tokio::test]
async fn low_rate_limit_budget_stretches_revalidation() {
    let (up, pier) = with_ttl(Duration::ZERO, |s| s.rate_limit_reserve = 10).await;
    up.set(|b| b.rate_limit_remaining = Some(5));
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    assert_eq!(
        digest_of(&pier, "app/manifests/latest").await,
        (200, a.clone())
    );
    assert_eq!(
        pier.mirror.upstreams[0].client.rate_limit_remaining(),
        Some(5)
    );
    up.add_manifest("library/app", "latest", M, r#"{"v":"b"}"#);
    assert_eq!(digest_of(&pier, "app/manifests/latest").await, (200, a));
    assert_eq!(up.requests().len(), 1, "{:?}", up.requests());
}

#[tokio::test]
async fn immutable_tags_are_not_revalidated() {
    let (up, pier) = with_ttl(Duration::ZERO, |s| {
        s.immutable_tags = Some(regex::Regex::new(r"^v?\d+\.\d+\.\d+$").unwrap());
    })
    .await;
    let a = up.add_manifest("library/app", "1.2.3", M, r#"{"v":"a"}"#);
    let l = up.add_manifest("library/app", "latest", M, r#"{"v":"l"}"#);
    assert_eq!(
        digest_of(&pier, "app/manifests/1.2.3").await,
        (200, a.clone())
    );
    assert_eq!(digest_of(&pier, "app/manifests/latest").await, (200, l));
    up.add_manifest("library/app", "1.2.3", M, r#"{"v":"moved"}"#);
    assert_eq!(digest_of(&pier, "app/manifests/1.2.3").await, (200, a));
    assert_eq!(up.count("/manifests/1.2.3"), 1);
    // a mutable tag is revalidated
    digest_of(&pier, "app/manifests/latest").await;
    assert_eq!(up.count("HEAD /v2/library/app/manifests/latest"), 1);
}

async fn tags(pier: &Pier, query: &str) -> (u16, serde_json::Value) {
    let r = client()
        .get(format!("{}/v2/app/tags/list{query}", pier.url))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn tag_list_is_paged_by_pier_and_served_stale() {
    // The upstream pages by three with an opaque cursor in its Links (as Quay did) and ignores
    // the client's n and last (as Debian's Distribution 2.8.2 does): pier follows every Link as
    // given and pages itself.
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    up.set(|b| b.tag_page_size = Some(3));
    for t in ["c", "a", "e", "b", "d"] {
        up.add_manifest("library/app", t, M, &format!(r#"{{"t":"{t}"}}"#));
    }
    let (s, v) = tags(&pier, "").await;
    assert_eq!(s, 200);
    assert_eq!(v["tags"], serde_json::json!(["a", "b", "c", "d", "e"]));
    assert_eq!(v["name"], "library/app");
    let r = client()
        .get(format!("{}/v2/app/tags/list?n=2&last=a", pier.url))
        .send()
        .await
        .unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert_eq!(link, r#"</v2/app/tags/list?n=2&last=c>; rel="next""#);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["b", "c"]));
    // The last page has no Link; a `last` past every tag gives an empty page.
    let r = client()
        .get(format!("{}/v2/app/tags/list?n=2&last=c", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("link").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["d", "e"]));
    assert_eq!(
        tags(&pier, "?last=zz").await.1["tags"],
        serde_json::json!([])
    );
    // With ?ns= routing, the next page keeps it.
    let r = client()
        .get(format!(
            "{}/v2/library/app/tags/list?ns=docker.io&n=1",
            pier.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"].to_str().unwrap(),
        r#"</v2/library/app/tags/list?ns=docker.io&n=1&last=a>; rel="next""#
    );
    // The client's n and last never reach the upstream.
    assert!(up
        .requests()
        .iter()
        .all(|l| !l.contains("n=2") && !l.contains("last=c")));
    up.set(|b| b.fail_status = Some(503));
    let (s, v) = tags(&pier, "").await;
    assert_eq!(
        (s, v["tags"].clone()),
        (200, serde_json::json!(["a", "b", "c", "d", "e"]))
    );
}

#[tokio::test]
async fn tag_list_is_kept_briefly() {
    let (up, pier) = with_ttl(Duration::from_secs(300), |_| {}).await;
    up.add_manifest("library/app", "a", M, "{}");
    for _ in 0..3 {
        assert_eq!(tags(&pier, "").await.1["tags"], serde_json::json!(["a"]));
    }
    assert_eq!(up.count("/tags/list"), 1);
}

#[tokio::test]
async fn catalog_lists_what_pier_holds() {
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
    hub.add_manifest("library/app", "1", M, "{}");
    hub.add_manifest("team/tool", "1", M, "{}");
    ghcr.add_manifest("org/app", "1", M, "{}");
    for p in [
        "app/manifests/1",
        "team/tool/manifests/1",
        "ghcr.io/org/app/manifests/1",
    ] {
        assert_eq!(digest_of(&pier, p).await.0, 200);
    }
    let r = client()
        .get(format!("{}/v2/_catalog", pier.url))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["ghcr.io/org/app", "library/app", "team/tool"])
    );
    let r = client()
        .get(format!("{}/v2/_catalog?n=1&last=ghcr.io/org/app", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["link"]
        .to_str()
        .unwrap()
        .contains("last=library%2Fapp"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], serde_json::json!(["library/app"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revalidations_share_one_head() {
    let (up, pier) = with_ttl(Duration::ZERO, |_| {}).await;
    let a = up.add_manifest("library/app", "latest", M, r#"{"v":"a"}"#);
    assert_eq!(
        digest_of(&pier, "app/manifests/latest").await,
        (200, a.clone())
    );
    up.set(|b| b.manifest_delay = Some(Duration::from_millis(300)));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("{}/v2/app/manifests/latest", pier.url);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                (
                    r.status().as_u16(),
                    r.headers()["docker-content-digest"]
                        .to_str()
                        .unwrap()
                        .to_string(),
                )
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, a.clone()));
    }
    assert_eq!(up.count("HEAD /v2/library/app/manifests/latest"), 1);
    assert_eq!(
        pier.mirror
            .metrics
            .tag_revalidations
            .with_label_values(&["docker.io", "unchanged"])
            .get(),
        1
    );
}
