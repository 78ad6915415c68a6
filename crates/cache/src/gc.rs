//! Garbage collection of hosted content: mark and sweep.
//!
//! **Mark** walks, on a blocking thread, what hosted repositories hold: every manifest pushed
//! to a hosted repository and every hosted tag's manifest are roots, and whatever they name
//! (layers, configs, an index's children, recursively; foreign layers aside) is live. Beside
//! them, whatever a mirrored repository links is the mirror's.
//!
//! **Sweep** goes over pinned (hosted) objects. A live one stays. One used since the grace
//! period began (uploaded, mounted, asked for by a push) stays too: a push under way has no
//! manifest yet. Of the rest, what the mirror links is unpinned, back under the mirror's LRU and
//! budget; everything else (layers of deleted manifests, deleted manifests no other manifest
//! names) is forgotten by the index and its file unlinked. Each decision is taken on the index
//! entry in one step against its last use, so a push that uses a blob after the mark either
//! sees it gone (and uploads it) or keeps it. Unlinking a file leaves readers that have it open
//! reading it whole, as eviction does; a reader that had not opened it yet gets a 404, never a
//! short body. A file is unlinked only if it was not placed again since the cutoff: an upload or
//! fill that finds the bytes already there ("written once") marks the file as it checks, under
//! the store's per-digest lock that the unlink takes too, and then indexes it, so that it is
//! never left indexed without its file. Finally the swept digests are unlinked from the hosted
//! repositories.
//!
//! One collection runs at a time; pulls and pushes go on meanwhile.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pier_oci::{Digest, References, RepositoryName};

use crate::hosted::HOSTED;
use crate::index::now_millis;
use crate::store::{DiskStore, LinkFile};
use crate::Cache;

/// What a garbage collection did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Objects removed from disk (blobs and manifests), and their bytes.
    pub removed: usize,
    pub bytes: u64,
    /// Of those, manifests.
    pub manifests: usize,
    /// Objects no hosted manifest names that a mirrored repository uses: handed back to the
    /// mirror's LRU and budget, and their bytes.
    pub unpinned: usize,
    pub unpinned_bytes: u64,
    /// Objects no hosted manifest names, kept because they were used within the grace period.
    pub kept_recent: usize,
    /// Hosted objects that stay (named by hosted manifests).
    pub live: usize,
    pub duration_ms: u64,
}

/// What the mark found.
struct Marks {
    /// Reached from hosted repositories' manifests and tags.
    live: HashSet<Digest>,
    /// Linked to a mirrored repository.
    mirrored: HashSet<Digest>,
    /// Hosted repositories and what they link.
    repositories: Vec<(RepositoryName, Vec<Digest>)>,
}

/// The mark: blocking, on the store as it is now.
fn mark(store: &DiskStore) -> io::Result<Marks> {
    let mut repositories = Vec::new();
    let mut roots: Vec<Digest> = Vec::new();
    for (name, links) in store.linked_repositories(HOSTED)? {
        let Ok(repo) = RepositoryName::parse(&name) else {
            continue;
        };
        // Its manifests: bytes it holds as a blob name nothing, even when they are a
        // manifest elsewhere.
        roots.extend(
            store
                .links(HOSTED, &repo, LinkFile::Manifests)?
                .unwrap_or_default(),
        );
        for (_, record) in store.tags_of(HOSTED, &repo)? {
            roots.extend(record.answers.iter().filter_map(|a| a.digest.parse().ok()));
        }
        repositories.push((repo, links));
    }
    let mut live = HashSet::new();
    while let Some(d) = roots.pop() {
        if !live.insert(d.clone()) || store.manifest_type(&d).is_none() {
            continue;
        }
        let Ok(bytes) = std::fs::read(store.blob_path(&d)) else {
            continue;
        };
        if let Some(refs) = References::parse(&bytes) {
            roots.extend(refs.manifests.into_iter().map(|m| m.digest));
            live.extend(
                refs.blobs
                    .into_iter()
                    .filter(|b| !b.foreign)
                    .map(|b| b.digest),
            );
        }
    }
    Ok(Marks {
        live,
        mirrored: store.links_except(HOSTED)?,
        repositories,
    })
}

impl Cache {
    /// Collects hosted garbage now (see the module's documentation) and reports what went.
    pub async fn collect_garbage(&self) -> io::Result<GcReport> {
        let result = self.collect_garbage_once().await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        self.metrics.gc_runs.with_label_values(&[outcome]).inc();
        result
    }

    async fn collect_garbage_once(&self) -> io::Result<GcReport> {
        let _one_at_a_time = self.gc_running.lock().await;
        let started = Instant::now();
        let grace = u64::try_from(self.hosted.gc_grace.as_millis()).unwrap_or(u64::MAX);
        let cutoff = now_millis().saturating_sub(grace);
        let marks = self.disk.run(mark).await?;
        let mut report = GcReport::default();
        let mut swept: HashSet<Digest> = HashSet::new();
        let mut doomed: Vec<(Digest, u64)> = Vec::new();
        for (digest, _, last_access) in self.index.pinned() {
            if marks.live.contains(&digest) {
                report.live += 1;
            } else if last_access >= cutoff {
                report.kept_recent += 1;
            } else if marks.mirrored.contains(&digest) {
                if let Some(size) = self.index.unpin_unused(&digest, cutoff) {
                    report.unpinned += 1;
                    report.unpinned_bytes += size;
                    swept.insert(digest);
                }
            } else if let Some(size) = self.index.remove_unused(&digest, cutoff) {
                doomed.push((digest, size));
            } else {
                report.kept_recent += 1;
            }
        }
        let digests: Vec<Digest> = doomed.iter().map(|(d, _)| d.clone()).collect();
        // Every object is tried; one whose file cannot be removed is no longer indexed, and the
        // next start's scan finds it again. One placed again since it left the index (an upload
        // or fill that found it "written once" and indexes it next) stays.
        let placed_since = std::time::UNIX_EPOCH + Duration::from_millis(cutoff);
        let removed = self
            .disk
            .run(move |store| {
                Ok(digests
                    .into_iter()
                    .map(|d| {
                        let manifest = store.manifest_type(&d).is_some();
                        let r = store.remove_unused_blob(&d, placed_since);
                        if let Err(e) = &r {
                            tracing::warn!(digest = %d, error = %e, "garbage collection could not remove");
                        }
                        (r, manifest)
                    })
                    .collect::<Vec<_>>())
            })
            .await?;
        for ((digest, size), (outcome, manifest)) in doomed.into_iter().zip(removed) {
            if let Ok(Some(kept)) = outcome {
                // Back in the index unless its placer indexed it already: as the mirror's (its
                // placer pins it if it is hosted), so that nothing on disk goes unindexed.
                self.index.restore(digest, kept);
                report.kept_recent += 1;
                continue;
            }
            self.memory.remove(&digest).await;
            if outcome.is_ok() {
                report.removed += 1;
                report.bytes += size;
                report.manifests += usize::from(manifest);
            }
            swept.insert(digest);
        }
        self.disk_usage_changed(self.index.usage().0);
        // What is no longer hosted content leaves the hosted repositories' links (unless a push
        // pinned it again meanwhile), so that a restart does not pin it again.
        for (repo, links) in marks.repositories {
            let stale: Vec<Digest> = links
                .into_iter()
                .filter(|d| swept.contains(d) && !self.index.is_pinned(d))
                .collect();
            // (A repository's manifests are roots, never swept: its manifests file stays.)
            if !stale.is_empty() {
                self.links.remove(&self.disk, HOSTED, &repo, &stale).await?;
            }
        }
        // Deleted manifests noted for a restart: those no longer hosted content are done with.
        let pinned: HashSet<Digest> = self.index.pinned().into_iter().map(|(d, ..)| d).collect();
        self.disk
            .run(move |store| store.retain_deleted(HOSTED, |d| pinned.contains(d)))
            .await?;
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.metrics.gc_freed_bytes.inc_by(report.bytes);
        self.metrics
            .gc_objects
            .with_label_values(&["removed"])
            .inc_by(report.removed as u64);
        self.metrics
            .gc_objects
            .with_label_values(&["unpinned"])
            .inc_by(report.unpinned as u64);
        tracing::info!(
            removed = report.removed,
            bytes = report.bytes,
            manifests = report.manifests,
            unpinned = report.unpinned,
            kept_recent = report.kept_recent,
            live = report.live,
            "hosted garbage collected"
        );
        Ok(report)
    }

    /// Collects hosted garbage every `interval`, until the task is dropped.
    pub async fn run_gc(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            if let Err(e) = self.collect_garbage().await {
                tracing::warn!(error = %e, "garbage collection failed");
            }
        }
    }
}
