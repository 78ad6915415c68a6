//! Micro-benchmarks of the hot paths: request routing and reference/digest parsing, a memory-tier
//! hit, a disk-tier hit, and sha256 throughput of the fill's hasher against plain sha2.
//!
//! `cargo bench --bench hot_paths`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the assertion"
)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::TryStreamExt;
use pier_cache::{Budget, Cache, CacheConfig, RetryPolicy};
use pier_metrics::Metrics;
use pier_oci::{Algorithm, Digest, Endpoint, Hasher, Reference};
use pier_server::{Mirror, UpstreamEntry};
use pier_upstream::{Upstream, UpstreamConfig};
use sha2::Digest as _;

fn mirror(dir: &std::path::Path, memory_object_size: u64) -> Arc<Mirror> {
    let metrics = Arc::new(Metrics::new());
    let upstream = |name: &str| {
        let config = UpstreamConfig {
            name: name.into(),
            url: "http://127.0.0.1:9".into(),
            credentials: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
        };
        UpstreamEntry::new(
            name,
            Arc::new(Upstream::new(config, metrics.clone()).expect("client")),
        )
    };
    let cache = Cache::open(
        CacheConfig {
            dir: dir.to_path_buf(),
            memory_size: 256 << 20,
            memory_object_size,
            retry: RetryPolicy::default(),
            budget: Budget::default(),
            max_concurrent_fills: 0,
            max_queued_fills: 0,
            hosted: Default::default(),
        },
        metrics.clone(),
    )
    .expect("cache");
    Arc::new(Mirror::new(
        vec![upstream("docker.io"), upstream("ghcr.io")],
        0,
        Arc::new(cache),
        metrics,
    ))
}

fn parsing(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = mirror(dir.path(), 1 << 20);
    let digest = format!("sha256:{}", "ab".repeat(32));
    let blob_path = format!("/v2/ghcr.io/org/team/app/blobs/{digest}");
    let mut g = c.benchmark_group("parse");
    g.bench_function("digest", |b| {
        b.iter(|| digest.parse::<Digest>().expect("digest"))
    });
    g.bench_function("reference (tag)", |b| {
        b.iter(|| Reference::parse("v1.25.3-alpine").expect("tag"))
    });
    g.bench_function("path + route (blob, prefix routing)", |b| {
        b.iter(|| match Endpoint::parse(&blob_path).expect("path") {
            Endpoint::Blob { name, .. } => m
                .route(&name, None)
                .map(|r| r.repo.components())
                .expect("route"),
            _ => unreachable!(),
        })
    });
    g.bench_function("path + route (manifest, ?ns=)", |b| {
        b.iter(
            || match Endpoint::parse("/v2/library/nginx/manifests/1.25").expect("path") {
                Endpoint::Manifest { name, .. } => m
                    .route(&name, Some("ns=docker.io"))
                    .map(|r| r.repo.components())
                    .expect("route"),
                _ => unreachable!(),
            },
        )
    });
    g.finish();
}

fn tiers(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let small = vec![7u8; 1024];
    let large = vec![9u8; 4 << 20];
    let (ds, dl) = (Digest::sha256_of(&small), Digest::sha256_of(&large));
    // On disk before pier opens the directory, so that its start-up scan indexes them.
    for (d, data) in [(&ds, &small), (&dl, &large)] {
        let path = dir
            .path()
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex());
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, data).expect("write");
    }
    let m = mirror(dir.path(), 64 * 1024);
    // First look moves the small blob into memory.
    rt.block_on(async {
        m.cache
            .cached_blob(&ds)
            .await
            .expect("lookup")
            .expect("cached")
    });
    let mut g = c.benchmark_group("tier hit");
    g.throughput(Throughput::Bytes(small.len() as u64));
    g.bench_function("memory, 1 KiB", |b| {
        b.to_async(&rt).iter(|| async {
            let blob = m
                .cache
                .cached_blob(&ds)
                .await
                .expect("lookup")
                .expect("cached");
            blob.stream(0, None)
                .try_fold(0, |n, b| async move { Ok(n + b.len()) })
                .await
                .expect("read")
        })
    });
    g.throughput(Throughput::Bytes(large.len() as u64));
    g.bench_function("disk, 4 MiB", |b| {
        b.to_async(&rt).iter(|| async {
            let blob = m
                .cache
                .cached_blob(&dl)
                .await
                .expect("lookup")
                .expect("cached");
            blob.stream(0, None)
                .try_fold(0, |n, b| async move { Ok(n + b.len()) })
                .await
                .expect("read")
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let data = vec![0x5au8; 8 << 20];
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(data.len() as u64));
    for chunk in [16 * 1024, 64 * 1024] {
        g.bench_with_input(
            BenchmarkId::new("fill hasher, chunks of", chunk),
            &chunk,
            |b, &chunk| {
                b.iter(|| {
                    let mut h = Hasher::new(Algorithm::Sha256);
                    for part in data.chunks(chunk) {
                        h.update(part);
                    }
                    h.finish()
                })
            },
        );
    }
    g.bench_function("plain sha2, one call", |b| {
        b.iter(|| sha2::Sha256::digest(&data))
    });
    g.finish();
}

criterion_group!(benches, parsing, tiers, hashing);
criterion_main!(benches);
