//! Hostile review of the hot-path performance work (issue 17): hashing of digests anyone can
//! choose, the metrics' series and counts, h2c, and the access log's fields.

use std::fmt::Write as _;
use std::time::Duration;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{launch, Pier, Setup, UpstreamSpec};

const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

async fn setup() -> (FakeUpstream, FakeUpstream, Pier) {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let ghcr = FakeUpstream::start(Behaviour::default()).await;
    let mut s = Setup::new(tempfile::tempdir().unwrap());
    s.upstreams = vec![
        UpstreamSpec::new("docker.io", up.url()),
        UpstreamSpec::new("ghcr.io", ghcr.url()),
    ];
    s.hosted_repositories = vec!["team/**".into()];
    s.allow_anonymous_push = true;
    let pier = launch(s).await;
    (up, ghcr, pier)
}

/// Digests for hash maps: two different digests must not hash alike whatever the hasher's keys,
/// or anyone who chooses digests (a client asking for blobs, an upstream image's manifest) fills
/// one bucket.
#[test]
fn digests_differing_after_sixteen_hex_characters_hash_differently() {
    use std::hash::BuildHasher;
    let a: pier_oci::Digest = format!("sha256:{}{}", "0".repeat(16), "1".repeat(48))
        .parse()
        .unwrap();
    let b: pier_oci::Digest = format!("sha256:{}{}", "0".repeat(16), "2".repeat(48))
        .parse()
        .unwrap();
    assert_ne!(a, b);
    let s = std::collections::hash_map::RandomState::new();
    assert_ne!(
        s.hash_one(&a),
        s.hash_one(&b),
        "different digests hash alike under a random key"
    );
}

/// A manifest (from an upstream image anyone can publish) naming many layers, with digests that
/// share their first 16 hex characters or not.
fn many_layers(n: usize, shared_prefix: bool) -> String {
    let mut layers = String::new();
    for i in 0..n {
        let hex = if shared_prefix {
            format!("{}{:048x}", "f".repeat(16), i)
        } else {
            crate::fake_upstream::hex(&<sha2::Sha256 as sha2::Digest>::digest(i.to_le_bytes()))
        };
        if i > 0 {
            layers.push(',');
        }
        let _ = write!(layers, r#"{{"digest":"sha256:{hex}","size":1}}"#);
    }
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI}","config":{{"digest":"sha256:{}","size":1}},"layers":[{layers}]}}"#,
        "e".repeat(64)
    )
}

/// Pulling an image whose manifest names many layers costs about the same whatever their
/// digests: the repository's link set is a `HashSet<Digest>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_of_prefix_sharing_layer_digests_is_no_slower_to_pull() {
    const N: usize = 20_000;
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = crate::harness::start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    up.add_manifest("library/plain", "1", OCI, &many_layers(N, false));
    up.add_manifest("library/evil", "1", OCI, &many_layers(N, true));
    let time = |repo: &'static str| {
        let url = format!("{}/v2/{repo}/manifests/1", pier.url);
        async move {
            let t = std::time::Instant::now();
            let r = crate::harness::client()
                .get(url)
                .header("accept", OCI)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.bytes().await.unwrap();
            t.elapsed()
        }
    };
    let plain = time("plain").await;
    let evil = time("evil").await;
    eprintln!("{N} layers: random digests {plain:?}, digests sharing 16 hex characters {evil:?}");
    assert!(
        evil < plain * 5 + Duration::from_millis(500),
        "random digests {plain:?}, prefix-sharing digests {evil:?}"
    );
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(url: &str) -> String {
    crate::harness::client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// h2c requests (no sendfile) are served, counted and their bytes counted as before; HEADs
/// count as lookups and add no bytes.
#[tokio::test]
async fn h2c_gets_and_heads_are_counted_as_before() {
    let (up, _ghcr, pier) = setup().await;
    let data = vec![9u8; 300_000];
    let d = up.add_blob(data.clone());
    let c = crate::harness::client();
    let url = format!("{}/v2/app/blobs/{d}", pier.url);
    assert_eq!(
        c.get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        data.len()
    );
    crate::harness::settle(&pier).await;
    assert!(crate::harness::wait_stored(&pier, &d).await);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let before = scrape(&pier.url).await;
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["docker-content-digest"], d.as_str());
    assert_eq!(r.headers()["content-length"], "300000");
    assert!(r.bytes().await.unwrap() == data);
    let r = h2.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");
    let r = h2
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/300000");
    assert_eq!(r.bytes().await.unwrap().len(), 10);
    let after = scrape(&pier.url).await;
    let served = |t: &str| metric(t, r#"pier_served_bytes_total{source="disk"}"#).unwrap_or(0.0);
    assert_eq!(served(&after) - served(&before), 300_010.0);
    let lookups = |t: &str| {
        metric(
            t,
            r#"pier_cache_lookups_total{kind="blob",result="disk_hit"}"#,
        )
        .unwrap_or(0.0)
    };
    assert_eq!(lookups(&after) - lookups(&before), 3.0);
}

/// A HEAD answered with a cache outcome made its `pier_served_bytes_total` series (at 0) before
/// the change, as the series of every outcome's source was made per answer.
#[tokio::test]
async fn a_head_only_client_still_shows_its_served_bytes_series() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = crate::harness::start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    up.add_manifest("library/app", "1", OCI, r#"{"schemaVersion":2}"#);
    let r = crate::harness::client()
        .head(format!("{}/v2/app/manifests/1", pier.url))
        .header("accept", OCI)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = scrape(&pier.url).await;
    assert_eq!(
        metric(
            &m,
            r#"pier_cache_lookups_total{kind="manifest",result="miss"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, r#"pier_served_bytes_total{source="upstream"}"#),
        Some(0.0),
        "the series is gone:\n{m}"
    );
}

/// The access log line (target pier::access, info) has every field, in text and JSON, whether
/// info is the level of everything or of the access log alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_keep_every_field() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    up.add_manifest("library/app", "1", OCI, r#"{"schemaVersion":2}"#);
    for (filter, json) in [
        ("info", false),
        ("warn,pier::access=info", false),
        ("info", true),
        ("pier=info", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mirror.yaml");
        std::fs::write(
            &config,
            format!("upstreams:\n  - name: docker.io\n    url: {}\n", up.url()),
        )
        .unwrap();
        let log = dir.path().join("pier.log");
        let cache = dir.path().join("cache");
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        if json {
            args.extend(["--log-format", "json"]);
        }
        let (mut cmd, addr) = crate::harness::pier_binary(&args);
        let mut child = cmd
            .env("RUST_LOG", filter)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let base = format!("http://{addr}");
        for _ in 0..200 {
            if crate::harness::client()
                .get(format!("{base}/v2/"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let r = crate::harness::client()
            .get(format!("{base}/v2/app/manifests/1?x=1"))
            .header("accept", OCI)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("pier::access") && l.contains("manifests/1"))
            .unwrap_or_else(|| panic!("{filter} json={json}: no access line in\n{text}"));
        for field in [
            "method",
            "path",
            "status",
            "bytes",
            "duration_ms",
            "cache",
            "upstream",
            "peer",
        ] {
            assert!(
                line.contains(&format!("{field}=")) || line.contains(&format!("\"{field}\":")),
                "{filter} json={json}: {field} missing from {line}"
            );
        }
        assert!(line.contains("/v2/app/manifests/1?x=1"), "{line}");
        assert!(line.contains("127.0.0.1:"), "{line}");
        assert!(line.contains("docker.io"), "{line}");
    }
}
