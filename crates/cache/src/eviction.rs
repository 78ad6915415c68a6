//! Keeping to the disk budget: high and low watermarks, least recently used first, an optional
//! age limit, purges, and the maintenance task that runs them in the background.
//!
//! Eviction unlinks files. A reader that already has a blob open keeps its descriptor and reads
//! the blob whole; the space returns when it closes. Fills live in `tmp/` and join the index only
//! once committed, so a blob being filled is never a candidate.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pier_oci::{Digest, RepositoryName};

use crate::index::now_millis;
use crate::Cache;

/// How much disk the cache may use, and for how long an unused object is kept.
#[derive(Clone, Debug)]
pub struct Budget {
    /// Bytes of verified content allowed on disk; 0 means no limit.
    pub max_size: u64,
    /// Fraction of `max_size` at which eviction starts.
    pub high_watermark: f64,
    /// Fraction of `max_size` eviction brings usage down to.
    pub low_watermark: f64,
    /// Objects not used for this long are removed whatever the usage.
    pub max_age: Option<Duration>,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_size: 0,
            high_watermark: 0.95,
            low_watermark: 0.85,
            max_age: None,
        }
    }
}

impl Budget {
    fn high(&self) -> Option<u64> {
        (self.max_size > 0).then_some((self.max_size as f64 * self.high_watermark) as u64)
    }

    fn low(&self) -> u64 {
        (self.max_size as f64 * self.low_watermark) as u64
    }
}

/// What the cache holds, for the admin API and `pier du`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Usage {
    /// Bytes of mirrored content (what `max_size` limits and eviction removes).
    pub disk_bytes: u64,
    /// Objects on disk, mirrored and hosted.
    pub disk_objects: usize,
    pub max_size: u64,
    pub memory_bytes: u64,
    pub memory_entries: u64,
    pub fills_in_flight: usize,
    /// Hosted content: never evicted, limited by its own budget.
    pub hosted: crate::HostedUsage,
}

/// What an eviction run removed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EvictionReport {
    pub removed: usize,
    pub bytes: u64,
}

impl Cache {
    /// Records verified content that just landed on disk, and wakes eviction past the high mark.
    pub(crate) fn stored(&self, digest: Digest, size: u64) {
        let total = self.index.insert(digest, size);
        self.disk_usage_changed(total);
        if self.budget.high().is_some_and(|high| total > high) {
            self.evict_now.notify_one();
        }
    }

    pub(crate) fn disk_usage_changed(&self, total: u64) {
        self.metrics
            .disk_bytes
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// Applies the budget now: past the high watermark, removes the least recently used objects
    /// down to the low watermark; and removes whatever is older than the age limit.
    pub async fn evict(&self) -> io::Result<EvictionReport> {
        let (total, _) = self.index.usage();
        let target = self
            .budget
            .high()
            .filter(|high| total > *high)
            .map(|_| self.budget.low());
        let cutoff = self
            .budget
            .max_age
            .map(|age| now_millis().saturating_sub(age.as_millis() as u64));
        // A victim's file placed after the victims were chosen (stored, or found by a push or
        // fill that goes on to index it) stays: its placer counts on it.
        let placed_since = SystemTime::now();
        let victims = self.index.victims(target, cutoff);
        if victims.is_empty() {
            return Ok(EvictionReport::default());
        }
        // A victim may have been pinned (mounted into or pushed to a hosted repository) since
        // it was chosen: it stays.
        let victims: Vec<(Digest, u64)> = victims
            .into_iter()
            .filter(|(d, _)| !self.index.is_pinned(d))
            .collect();
        let digests: Vec<Digest> = victims.iter().map(|(d, _)| d.clone()).collect();
        // Every victim is tried; one that cannot be removed stays indexed and is tried again.
        let removed = self
            .disk
            .run(move |store| {
                Ok(digests
                    .into_iter()
                    .map(|d| match store.remove_unused_blob(&d, placed_since) {
                        Ok(gone) => gone.is_none(),
                        Err(e) => {
                            tracing::warn!(digest = %d, error = %e, "could not evict");
                            false
                        }
                    })
                    .collect::<Vec<bool>>())
            })
            .await?;
        let mut report = EvictionReport::default();
        for ((digest, size), gone) in victims.into_iter().zip(removed) {
            if !gone {
                continue;
            }
            self.memory.remove(&digest).await;
            if let Some(total) = self.index.remove(&digest) {
                self.disk_usage_changed(total);
            }
            report.removed += 1;
            report.bytes += size;
        }
        self.metrics.evictions.inc_by(report.removed as u64);
        tracing::info!(
            removed = report.removed,
            bytes = report.bytes,
            "evicted least recently used objects"
        );
        Ok(report)
    }

    /// Removes one blob or manifest from disk and memory. Returns whether it was there. A fill
    /// of the digest under way is not kept when it ends.
    pub async fn purge_digest(&self, digest: &Digest) -> io::Result<bool> {
        if let Some(fill) = self
            .fills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            fill.purged.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let d = digest.clone();
        self.disk.run(move |store| store.remove_blob(&d)).await?;
        self.memory.remove(digest).await;
        let was = self.index.remove(digest);
        if let Some(total) = was {
            self.disk_usage_changed(total);
        }
        Ok(was.is_some())
    }

    /// Forgets every tag of a repository and which digests it holds, so the next pull asks the
    /// upstream. The manifests and blobs stay until evicted: other repositories may share them.
    /// Returns how many tags went.
    pub async fn purge_repository(
        &self,
        upstream: &str,
        repo: &RepositoryName,
    ) -> io::Result<usize> {
        let (u, r) = (upstream.to_string(), repo.clone());
        let removed = self
            .disk
            .run(move |store| store.remove_tags(&u, &r))
            .await?;
        // A rare operation: forget every remembered tag rather than track which are this repo's.
        self.tags.forget_all();
        self.links.forget(upstream, repo).await;
        self.tag_lists
            .invalidate(&format!("{upstream}/{repo}"))
            .await;
        Ok(removed)
    }

    /// What the cache holds now.
    pub async fn usage(&self) -> Usage {
        let (disk_bytes, disk_objects) = self.index.usage();
        let (memory_bytes, memory_entries) = self.memory.usage().await;
        let fills_in_flight = self.fills.lock().unwrap_or_else(|p| p.into_inner()).len();
        Usage {
            disk_bytes,
            disk_objects,
            max_size: self.budget.max_size,
            memory_bytes,
            memory_entries,
            fills_in_flight,
            hosted: self.hosted_usage(),
        }
    }

    /// Waits until no fill is in flight (each committed or failed), or only the fill of `digest`
    /// when given; at most `limit`. Clients finish reading once a blob verified, a moment before
    /// it is committed. Returns whether they finished.
    pub async fn wait_for_fills(&self, digest: Option<&Digest>, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let busy = || {
            let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            digest.map_or(!fills.is_empty(), |d| fills.contains_key(d))
        };
        while busy() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Waits (up to `limit`) for upload steps and manifest pushes under way to end, so that a
    /// stop does not cut one between its write and its bookkeeping. Returns whether none is left.
    pub async fn wait_for_uploads(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.upload_steps.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Writes access times changed since the last call back to the files, so that the LRU order
    /// survives a restart.
    pub async fn flush_access_times(&self) {
        let dirty = self.index.take_dirty();
        if dirty.is_empty() {
            return;
        }
        let _ = self
            .disk
            .run(move |store| {
                store.record_access(&dirty);
                Ok(())
            })
            .await;
    }

    /// The maintenance loop: every `interval`, or at once when a fill pushed usage past the high
    /// watermark, writes back access times and applies the budget. Runs until the task is dropped.
    pub async fn run_maintenance(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.evict_now.notified() => {}
            }
            self.flush_access_times().await;
            self.expire_uploads().await;
            if let Err(e) = self.evict().await {
                tracing::warn!(error = %e, "eviction failed");
            }
        }
    }
}
