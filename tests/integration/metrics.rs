//! The counters move as they should.

use std::time::Duration;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, start, UpstreamSpec};

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn scrape(url: &str) -> String {
    let r = client().get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().await.unwrap()
}

#[tokio::test]
async fn cold_pull_counts_misses_and_upstream_bytes_then_hits() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        vec![UpstreamSpec::new("docker.io", up.url())],
        (1 << 20, 1024),
    )
    .await;
    let blob = up.add_blob(vec![1u8; 200_000]);
    let body = r#"{"schemaVersion":2}"#;
    up.add_manifest(
        "library/app",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        body,
    );
    let get = |p: String| {
        let url = format!("{}/v2/{p}", pier.url);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(get("app/manifests/1".into()).await, body.len());
    assert_eq!(get(format!("app/blobs/{blob}")).await, 200_000);
    crate::harness::settle(&pier).await;
    let m = scrape(&pier.url).await;
    assert_eq!(
        metric(&m, r#"pier_cache_lookups_total{kind="blob",result="miss"}"#),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_cache_lookups_total{kind="manifest",result="miss"}"#
        ),
        1.0
    );
    let upstream_bytes = metric(
        &m,
        r#"pier_upstream_received_bytes_total{upstream="docker.io"}"#,
    );
    assert_eq!(upstream_bytes, (200_000 + body.len()) as f64);
    assert_eq!(
        metric(&m, r#"pier_served_bytes_total{source="upstream"}"#),
        (200_000 + body.len()) as f64
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_upstream_requests_total{kind="blob",outcome="ok",upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_http_requests_total{kind="blob",method="GET",status="2xx"}"#
        ),
        1.0
    );

    // Second pull: hits only, no upstream bytes.
    get("app/manifests/1".into()).await;
    get(format!("app/blobs/{blob}")).await;
    crate::harness::settle(&pier).await;
    let m = scrape(&pier.url).await;
    assert_eq!(
        metric(
            &m,
            r#"pier_cache_lookups_total{kind="blob",result="disk_hit"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_cache_lookups_total{kind="manifest",result="memory_hit"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_upstream_received_bytes_total{upstream="docker.io"}"#
        ),
        upstream_bytes
    );
    assert_eq!(
        metric(&m, r#"pier_served_bytes_total{source="disk"}"#),
        200_000.0
    );
    assert!(m.contains("pier_build_info{version=\""));
    assert_eq!(metric(&m, "pier_fills_in_flight"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_joined_by_ten_clients_counts_nine_joins() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(20)),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let blob = up.add_blob(vec![2u8; 1024 * 1024]);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = format!("{}/v2/app/blobs/{blob}", pier.url);
            tokio::spawn(async move {
                client()
                    .get(url)
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap()
                    .len()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1024 * 1024);
    }
    crate::harness::settle(&pier).await;
    let m = scrape(&pier.url).await;
    assert_eq!(metric(&m, "pier_fill_joins_total"), 9.0);
    assert_eq!(metric(&m, r#"pier_fills_total{outcome="ok"}"#), 1.0);
    assert_eq!(
        metric(&m, r#"pier_cache_lookups_total{kind="blob",result="miss"}"#),
        10.0
    );
}

#[tokio::test]
async fn stale_answers_and_revalidations_are_counted() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.tag_ttl = Duration::ZERO;
    let pier = start(vec![spec], (0, 0)).await;
    up.add_manifest(
        "library/app",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    let url = format!("{}/v2/app/manifests/1", pier.url);
    client().get(&url).send().await.unwrap();
    client().get(&url).send().await.unwrap();
    up.set(|b| b.fail_status = Some(503));
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    crate::harness::settle(&pier).await;
    let m = scrape(&pier.url).await;
    assert_eq!(
        metric(
            &m,
            r#"pier_tag_revalidations_total{result="unchanged",upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_tag_revalidations_total{result="failed",upstream="docker.io"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"pier_stale_served_total{kind="manifest",upstream="docker.io"}"#
        ),
        1.0
    );
}
