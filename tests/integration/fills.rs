//! One upstream fetch per digest, shared by every concurrent client.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;

use crate::fake_upstream::{Behaviour, FakeUpstream};
use crate::harness::{client, launch, start, Setup, UpstreamSpec};

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_one_upstream_request() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(5)),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let body = data(2 * 1024 * 1024);
    let digest = up.add_blob(body.clone());
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    let c = client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() == body);
    }
    assert_eq!(up.state.blob_gets.load(Ordering::SeqCst), 1);
    let m = &pier.mirror.metrics;
    assert_eq!(m.fills.with_label_values(&["ok"]).get(), 1);
    assert!(m.fill_joins.get() >= 90, "{} joins", m.fill_joins.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_client_leaving_does_not_stop_the_fill() {
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(10)),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let body = data(1024 * 1024);
    let digest = up.add_blob(body.clone());
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    // The first client reads one chunk and hangs up.
    let r = client().get(&url).send().await.unwrap();
    let mut s = r.bytes_stream();
    assert!(s.next().await.is_some());
    drop(s);
    // A second client joins the same fill and gets everything.
    let r = client().get(&url).send().await.unwrap();
    assert!(r.bytes().await.unwrap() == body);
    assert_eq!(up.state.blob_gets.load(Ordering::SeqCst), 1);
    assert!(crate::harness::wait_stored(&pier, &digest).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_body_fails_every_client_and_keeps_nothing() {
    // Cut every GET after 300 KB, and no Range support: retries cannot complete it.
    let up = FakeUpstream::start(Behaviour {
        cut_after: Some((300_000, usize::MAX)),
        chunk_delay: Some(Duration::from_millis(2)),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let body = data(1024 * 1024);
    let digest = up.add_blob(body.clone());
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = client().get(&url).send().await.unwrap();
                r.bytes().await.map(|b| b.len())
            })
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap().is_err(),
            "a client got a complete body from a broken fill"
        );
    }
    let hex = digest.trim_start_matches("sha256:");
    assert!(!pier
        .dir
        .path()
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
    assert_eq!(
        std::fs::read_dir(pier.dir.path().join("tmp"))
            .unwrap()
            .count(),
        0
    );
    // The upstream heals: the next request starts a new fill.
    up.set(|b| b.cut_after = None);
    let before = up.state.blob_gets.load(Ordering::SeqCst);
    let r = client().get(&url).send().await.unwrap();
    assert!(r.bytes().await.unwrap() == body);
    assert_eq!(up.state.blob_gets.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn broken_download_resumes_with_range() {
    let up = FakeUpstream::start(Behaviour {
        cut_after: Some((400_000, 1)),
        ranges: true,
        chunk_delay: Some(Duration::from_millis(2)),
        ..Behaviour::default()
    })
    .await;
    let pier = start(vec![UpstreamSpec::new("docker.io", up.url())], (0, 0)).await;
    let body = data(1024 * 1024);
    let digest = up.add_blob(body.clone());
    let r = client()
        .get(format!("{}/v2/library/app/blobs/{digest}", pier.url))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.unwrap() == body);
    let ranges = up.state.ranges_seen.lock().unwrap().clone();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let resumed_at: u64 = ranges[1]
        .as_deref()
        .unwrap()
        .trim_start_matches("bytes=")
        .trim_end_matches('-')
        .parse()
        .unwrap();
    assert!(resumed_at > 0 && resumed_at <= 400_000, "{resumed_at}");
    assert_eq!(pier.mirror.metrics.fill_resumes.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_manifest_requests_share_one_upstream_get() {
    let up = FakeUpstream::start(Behaviour::default()).await;
    let pier = start(
        vec![UpstreamSpec::new("docker.io", up.url())],
        (1 << 20, 64 << 10),
    )
    .await;
    up.add_manifest(
        "library/app",
        "1.0",
        "application/vnd.oci.image.manifest.v1+json",
        r#"{"schemaVersion":2}"#,
    );
    let url = format!("{}/v2/library/app/manifests/1.0", pier.url);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(&url).send().await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(up.count("GET /v2/library/app/manifests/1.0"), 1);
}

/// `blobs` different blobs asked for at once from a pier that downloads at most `limit` at a
/// time and queues the rest: every client gets its blob, and the upstream never had more than
/// `limit` blob bodies in flight (it had `limit` at some point: the slots were used).
async fn downloads_stay_within(limit: usize, blobs: u8) {
    // 5 chunks of 64 KiB, 20 ms apart: each body takes 100 ms or more.
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(20)),
        ..Behaviour::default()
    })
    .await;
    let mut setup = Setup::new(tempfile::tempdir().unwrap());
    setup.upstreams = vec![UpstreamSpec::new("docker.io", up.url())];
    setup.max_concurrent_fills = limit;
    setup.max_queued_fills = usize::from(blobs) - limit;
    let pier = launch(setup).await;
    let bodies: Vec<Vec<u8>> = (0..blobs).map(|i| vec![i; 300_000]).collect();
    let tasks: Vec<_> = bodies
        .iter()
        .map(|b| {
            let url = format!("{}/v2/app/blobs/{}", pier.url, up.add_blob(b.clone()));
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.unwrap())
            })
        })
        .collect();
    for (t, body) in tasks.into_iter().zip(&bodies) {
        let (status, got) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(got == *body, "a client got the wrong bytes");
    }
    assert_eq!(
        up.state.blob_gets.load(Ordering::SeqCst),
        usize::from(blobs)
    );
    let most = up.state.blob_bodies.most();
    assert!(
        most <= limit,
        "{most} downloads overlapped with max_concurrent_fills = {limit}"
    );
    assert_eq!(most, limit, "the download slots were not all used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_download_slot_means_downloads_one_after_another() {
    downloads_stay_within(1, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_beyond_the_slots_wait_and_never_overlap_more() {
    downloads_stay_within(2, 6).await;
}

/// A thousand clients on one cold blob: one upstream request, and every body complete and right.
/// (The 100-client test above checks the fill's metrics; this one the scale, with a connection
/// per client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_clients_one_upstream_request_all_bodies_right() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    use sha2::{Digest as _, Sha256};
    // Two descriptors per client (its end and pier's), and some to spare.
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
    let fds = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let clients = 1000.min((fds.saturating_sub(200) / 2) as usize);
    assert!(clients >= 100, "only {fds} file descriptors");
    if clients < 1000 {
        eprintln!("descriptor limit {fds}: {clients} clients instead of 1000");
    }
    let up = FakeUpstream::start(Behaviour {
        chunk_delay: Some(Duration::from_millis(20)),
        ..Behaviour::default()
    })
    .await;
    // A thousand clients hashing in a debug build can keep the fill's task from the runtime for
    // seconds: no read timeout cutting the download short (a resume would be a second request).
    let mut spec = UpstreamSpec::new("docker.io", up.url());
    spec.read_timeout = Duration::from_secs(120);
    let pier = start(vec![spec], (0, 0)).await;
    let body = data(512 * 1024);
    let want: [u8; 32] = Sha256::digest(&body).into();
    let digest = up.add_blob(body);
    let url = format!("{}/v2/library/app/blobs/{digest}", pier.url);
    // One client: a thousand requests at once are a thousand connections (HTTP/1.1).
    let c = client();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let r = c.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut s = r.bytes_stream();
                let mut h = Sha256::new();
                while let Some(chunk) = s.next().await {
                    h.update(chunk.unwrap());
                }
                <[u8; 32]>::from(h.finalize())
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), want);
    }
    let ranges = up.state.ranges_seen.lock().unwrap().clone();
    assert_eq!(up.state.blob_gets.load(Ordering::SeqCst), 1, "{ranges:?}");
}
