//! Start-up with a large cache: how long `Cache::open` takes (removing leftovers, scanning and
//! indexing every blob) with 100,000 blobs on disk.
//!
//! `cargo bench --bench startup` measures (`PIER_BENCH_COLD=1` empties the page cache before each
//! run; needs root); `cargo test` runs it small, as a smoke test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests and benchmarks: a failure is the assertion"
)]

use std::sync::Arc;
use std::time::Instant;

use pier_cache::{Budget, Cache, CacheConfig, DiskStore, RetryPolicy};
use pier_metrics::Metrics;
use pier_oci::Digest;

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let blobs: usize = if measuring { 100_000 } else { 1_000 };
    let dir = tempfile::tempdir().expect("tempdir");

    let started = Instant::now();
    {
        let store = DiskStore::open(dir.path()).expect("open store");
        for i in 0..blobs {
            let data = format!("blob number {i}");
            // Written straight into place (no fsync): a fixture, not a fill.
            let path = store.blob_path(&Digest::sha256_of(data.as_bytes()));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, data).expect("write blob");
        }
        // Leftovers of a crash, to be removed at start-up.
        for i in 0..100 {
            std::fs::write(
                dir.path().join("tmp").join(format!("sha256-crashed-{i}")),
                b"half",
            )
            .expect("leftover");
        }
    }
    let setup = started.elapsed();

    let runs = if measuring { 5 } else { 1 };
    // PIER_BENCH_COLD=1: empty the page cache before each run, as after a reboot.
    let cold = measuring && std::env::var("PIER_BENCH_COLD").is_ok_and(|v| v == "1");
    let mut times = Vec::new();
    for _ in 0..runs {
        let config = CacheConfig {
            dir: dir.path().to_path_buf(),
            memory_size: 256 << 20,
            memory_object_size: 1 << 20,
            retry: RetryPolicy::default(),
            budget: Budget::default(),
            max_concurrent_fills: 0,
            max_queued_fills: 0,
            hosted: Default::default(),
        };
        if cold {
            // Needs root; the scan then reads every directory and inode from disk.
            let _ = std::process::Command::new("sync").status();
            std::fs::write("/proc/sys/vm/drop_caches", "3")
                .expect("drop the page cache (needs root)");
        }
        let t = Instant::now();
        let cache = Cache::open(config, Arc::new(Metrics::new())).expect("open cache");
        times.push(t.elapsed());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let usage = rt.block_on(cache.usage());
        assert_eq!(usage.disk_objects, blobs);
    }
    times.sort();
    println!(
        "startup with {blobs} blobs: median {:.3} s, best {:.3} s, worst {:.3} s over {runs} runs (page cache {}; creating them took {:.1} s)",
        times[times.len() / 2].as_secs_f64(),
        times[0].as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        if cold { "dropped before each run" } else { "warm" },
        setup.as_secs_f64(),
    );
}
