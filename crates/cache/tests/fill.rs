//! The fill against an in-process origin that can cut bodies, fail and count its calls.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test: a failure is the assertion"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use pier_cache::{Cache, CacheConfig, Origin, RetryPolicy, Source};
use pier_oci::Digest;
use pier_upstream::{BlobResponse, UpstreamError};

/// Serves `data` in 64 KiB chunks, slowly; `cut_at` makes the first answer break after that many
/// bytes; `fail` makes every answer a 503; `honour_range` decides whether offsets are respected.
struct FakeOrigin {
    data: Bytes,
    calls: AtomicUsize,
    offsets: Mutex<Vec<u64>>,
    cut_at: Option<usize>,
    fail: bool,
    honour_range: bool,
    /// Panic inside the download (a bug in a fill's task).
    panic: bool,
}

impl FakeOrigin {
    fn new(data: Bytes) -> Self {
        FakeOrigin {
            data,
            calls: AtomicUsize::new(0),
            offsets: Mutex::default(),
            cut_at: None,
            fail: false,
            honour_range: true,
            panic: false,
        }
    }
}

impl Origin for FakeOrigin {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<BlobResponse, UpstreamError>> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        self.offsets.lock().unwrap().push(offset);
        let fail = self.fail;
        let start = if self.honour_range {
            offset as usize
        } else {
            0
        };
        let total = self.data.len() as u64;
        let mut body = self.data.slice(start..);
        let cut = if call == 0 { self.cut_at } else { None };
        let panic = self.panic;
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!panic, "a bug in the download");
            if fail {
                return Err(UpstreamError::Status(503));
            }
            let mut chunks: Vec<Result<Bytes, UpstreamError>> = Vec::new();
            let mut sent = start;
            while !body.is_empty() {
                let n = body.len().min(64 * 1024);
                let chunk = body.split_to(n);
                if let Some(c) = cut.filter(|c| sent + n > *c) {
                    chunks.push(Ok(chunk.slice(..c - sent)));
                    chunks.push(Err(UpstreamError::Transport("connection reset".into())));
                    break;
                }
                sent += n;
                chunks.push(Ok(chunk));
            }
            let body = futures_util::stream::iter(chunks)
                .then(|c| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    c
                })
                .boxed();
            Ok(BlobResponse {
                start: start as u64,
                total: Some(total),
                body,
            })
        }
        .boxed()
    }
}

fn data(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 31 % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

fn cache(dir: &std::path::Path) -> Arc<Cache> {
    cache_with(dir, 0, pier_cache::Budget::default())
}

fn cache_with(dir: &std::path::Path, memory: u64, budget: pier_cache::Budget) -> Arc<Cache> {
    Arc::new(
        Cache::open(
            CacheConfig {
                dir: dir.to_path_buf(),
                memory_size: memory,
                memory_object_size: memory,
                retry: RetryPolicy {
                    attempts: 3,
                    base_delay: Duration::from_millis(10),
                },
                budget,
                max_concurrent_fills: 0,
                max_queued_fills: 0,
                hosted: Default::default(),
            },
            Arc::new(pier_metrics::Metrics::new()),
        )
        .unwrap(),
    )
}

async fn read(
    cache: &Arc<Cache>,
    digest: &Digest,
    origin: &Arc<FakeOrigin>,
) -> Result<(Vec<u8>, Source), String> {
    let o = origin.clone();
    let blob = cache
        .fill_blob(digest, move || o as Arc<dyn Origin>)
        .await
        .map_err(|e| e.to_string())?;
    let source = blob.source;
    let parts: Vec<Bytes> = blob
        .stream(0, None)
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((parts.concat(), source))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_readers_share_one_download() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(3 * 1024 * 1024 + 17);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin::new(body.clone()));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (cache, digest, origin) = (cache.clone(), digest.clone(), origin.clone());
        tasks.push(tokio::spawn(
            async move { read(&cache, &digest, &origin).await },
        ));
    }
    let mut joined = 0;
    for t in tasks {
        let (got, source) = t.await.unwrap().unwrap();
        assert!(got == body[..], "a reader got different bytes");
        joined += usize::from(source == Source::Upstream { joined: true });
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
    assert!(joined >= 90, "only {joined} readers joined the fill");
    // The blob is now on disk (readers finish once it verified, the commit follows) and served
    // from there, without the origin.
    for _ in 0..500 {
        if cache
            .disk()
            .blocking()
            .open_blob(&digest)
            .unwrap()
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (got, source) = read(&cache, &digest, &origin).await.unwrap();
    assert_eq!((got.len(), source), (body.len(), Source::Disk));
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn broken_download_resumes_with_offset() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(1024 * 1024);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin {
        cut_at: Some(300_000),
        ..FakeOrigin::new(body.clone())
    });
    let (got, _) = read(&cache, &digest, &origin).await.unwrap();
    assert!(got == body[..]);
    assert_eq!(*origin.offsets.lock().unwrap(), vec![0, 300_000]);
    assert_eq!(cache.metrics().fill_resumes.get(), 1);
}

#[tokio::test]
async fn resume_against_origin_without_ranges_skips_what_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(500_000);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin {
        cut_at: Some(200_001),
        honour_range: false,
        ..FakeOrigin::new(body.clone())
    });
    let (got, _) = read(&cache, &digest, &origin).await.unwrap();
    assert!(got == body[..]);
    assert_eq!(origin.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn wrong_digest_is_never_kept_or_completed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(200_000);
    let wrong = Digest::sha256_of(b"something else");
    let origin = Arc::new(FakeOrigin::new(body));
    let err = read(&cache, &wrong, &origin).await.unwrap_err();
    assert!(err.contains("hashes to"), "{err}");
    assert!(cache.disk().blocking().open_blob(&wrong).unwrap().is_none());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn failing_upstream_fails_every_reader_and_next_request_retries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(100_000);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin {
        fail: true,
        ..FakeOrigin::new(body.clone())
    });
    assert!(read(&cache, &digest, &origin).await.is_err());
    // 1 try + 3 retries
    assert_eq!(origin.calls.load(Ordering::SeqCst), 4);
    let healthy = Arc::new(FakeOrigin::new(body.clone()));
    let (got, _) = read(&cache, &digest, &healthy).await.unwrap();
    assert!(got == body[..]);
}

#[tokio::test]
async fn range_read_of_a_fill_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(2 * 1024 * 1024);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin::new(body.clone()));
    let o = origin.clone();
    let blob = cache
        .fill_blob(&digest, move || o as Arc<dyn Origin>)
        .await
        .unwrap();
    assert_eq!(blob.size, Some(body.len() as u64));
    let parts: Vec<Bytes> = blob
        .stream(1_500_000, Some(1_600_000))
        .try_collect()
        .await
        .unwrap();
    assert!(parts.concat() == body[1_500_000..1_600_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_fill_reaches_its_readers_as_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(100_000);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin {
        panic: true,
        ..FakeOrigin::new(body.clone())
    });
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (cache, digest, origin) = (cache.clone(), digest.clone(), origin.clone());
        tasks.push(tokio::spawn(
            async move { read(&cache, &digest, &origin).await },
        ));
    }
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .expect("a reader hung after the fill panicked")
            .unwrap();
        assert!(r.is_err(), "a reader got bytes from a fill that panicked");
    }
    // The fill left the map: the next request starts a new one, which works.
    let good = Arc::new(FakeOrigin::new(body.clone()));
    let (got, _) = read(&cache, &digest, &good).await.unwrap();
    assert_eq!(got, body);
    assert!(cache.wait_for_fills(None, Duration::from_secs(5)).await);
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fill_is_not_undone_by_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache(dir.path());
    let body = data(2 * 1024 * 1024);
    let digest = Digest::sha256_of(&body);
    let origin = Arc::new(FakeOrigin::new(body.clone()));
    let o = origin.clone();
    let blob = cache
        .fill_blob(&digest, move || o as Arc<dyn Origin>)
        .await
        .unwrap();
    // The download is under way (2 ms per 64 KiB chunk: about 64 ms in all).
    assert!(cache.purge_digest(&digest).await.is_ok());
    // The reader that was following the fill still gets the whole verified blob.
    let parts: Vec<Bytes> = blob.stream(0, None).try_collect().await.unwrap();
    assert!(parts.concat() == body[..]);
    assert!(cache.wait_for_fills(None, Duration::from_secs(5)).await);
    assert!(!cache.is_stored(&digest), "the purged blob came back");
    assert!(cache
        .disk()
        .blocking()
        .open_blob(&digest)
        .unwrap()
        .is_none());
    assert_eq!(cache.usage().await.disk_objects, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_removes_from_the_memory_tier_too() {
    let dir = tempfile::tempdir().unwrap();
    // Four blobs of 100 KB on a 250 KB budget; all of them fit the memory tier.
    let budget = pier_cache::Budget {
        max_size: 250_000,
        ..pier_cache::Budget::default()
    };
    let cache = cache_with(dir.path(), 1 << 20, budget);
    let mut digests = Vec::new();
    for i in 0..4u8 {
        let body: Bytes = vec![i; 100_000].into();
        let digest = Digest::sha256_of(&body);
        let origin = Arc::new(FakeOrigin::new(body));
        read(&cache, &digest, &origin).await.unwrap();
        assert!(cache.wait_for_fills(None, Duration::from_secs(5)).await);
        // Read again: from disk into the memory tier.
        let (_, source) = read(&cache, &digest, &origin).await.unwrap();
        assert_eq!(source, Source::Disk);
        let (_, source) = read(&cache, &digest, &origin).await.unwrap();
        assert_eq!(source, Source::Memory);
        digests.push(digest);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = cache.evict().await.unwrap();
    assert!(report.removed >= 2, "{report:?}");
    // What was evicted is gone from every tier: no read answers it without the origin.
    for d in &digests[..report.removed] {
        assert!(
            cache.cached_blob(d).await.unwrap().is_none(),
            "an evicted blob was still served"
        );
    }
    assert!(cache.cached_blob(&digests[3]).await.unwrap().is_some());
}
