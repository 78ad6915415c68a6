//! Upstream credentials never appear in logs, metrics, errors or responses.

use std::time::Duration;

use crate::fake_upstream::{base64, Behaviour, FakeUpstream};
use crate::harness::client;

const PASSWORD: &str = "SUPERSECRET-pw-8812";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_credentials_do_not_leak() {
    let up = FakeUpstream::start(Behaviour {
        require_token: true,
        token_credentials: Some(("mirror".into(), PASSWORD.into())),
        ..Behaviour::default()
    })
    .await;
    up.add_manifest(
        "library/app",
        "1",
        "application/vnd.oci.image.manifest.v1+json",
        "{}",
    );
    let blob = up.add_blob(vec![1u8; 5000]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mirror.yaml");
    std::fs::write(
        &config,
        format!(
            "upstreams:\n  - name: docker.io\n    url: {}\n    username: mirror\n    password_env: PIER_TEST_UPSTREAM_PASSWORD\n",
            up.url()
        ),
    )
    .unwrap();
    let ops = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("pier.log");
    let (cache, ops_addr) = (dir.path().join("cache"), ops.to_string());
    let (mut cmd, addr) = crate::harness::pier_binary(&[
        "--config",
        config.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--metrics-listen",
        &ops_addr,
    ]);
    let mut child = cmd
        .env("PIER_TEST_UPSTREAM_PASSWORD", PASSWORD)
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://{addr}");
    for _ in 0..200 {
        if client().get(format!("{base}/v2/")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut seen = String::new();
    let paths = [
        "/v2/app/manifests/1".to_string(),
        format!("/v2/app/blobs/{blob}"),
        "/v2/app/manifests/missing".to_string(),
        format!("/v2/app/blobs/sha256:{}", "0".repeat(64)),
        "/v2/app/tags/list".to_string(),
    ];
    for p in &paths {
        let r = client().get(format!("{base}{p}")).send().await.unwrap();
        seen.push_str(&format!("{:?}", r.headers()));
        seen.push_str(&r.text().await.unwrap());
    }
    // Now the upstream refuses the credentials: the error must not echo them either.
    up.set(|b| b.token_credentials = Some(("mirror".into(), "rotated".into())));
    let r = client()
        .get(format!("{base}/v2/other/manifests/1"))
        .send()
        .await
        .unwrap();
    seen.push_str(&r.text().await.unwrap());
    seen.push_str(
        &client()
            .get(format!("http://{ops}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    seen.push_str(&std::fs::read_to_string(&log).unwrap());

    assert!(seen.contains("pier::access"), "the log was not captured");
    assert!(
        up.state
            .tokens_issued
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1,
        "the credentials were never used"
    );
    for secret in [
        PASSWORD.to_string(),
        base64(&format!("mirror:{PASSWORD}")),
        "tok-3f9a".to_string(),
    ] {
        assert!(!seen.contains(&secret), "{secret:?} leaked");
    }
}
