//! pier's cache: a memory tier (moka) in front of a content-addressed disk store, filled from the
//! upstream once per digest.
//!
//! [`Cache::blob`] is the whole lookup: memory, then disk, then the fill in progress for that
//! digest, or a new fill. Every concurrent request for a digest joins the same fill and streams
//! the bytes as they land in its file; bytes whose digest does not verify never reach the store.
//! Manifests are small: they are fetched whole, once per key at a time ([`Cache::fill_manifest`]),
//! and stored by digest next to the blobs, with their tags recorded per upstream and repository.

mod eviction;
mod fill;
mod flight;
mod index;
mod memory;
mod reader;
pub mod store;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use pier_metrics::Metrics;
use pier_oci::{Digest, RepositoryName, Tag};
use pier_upstream::{Manifest, UpstreamError};
use tokio::sync::watch;

pub use eviction::{Budget, EvictionReport, Usage};
pub use fill::{FillError, Origin, RetryPolicy};
pub use flight::SingleFlight;
pub use memory::MemoryObject;
pub use store::{DiskStore, TagRecord};

use fill::{Fill, Phase, Progress};
use index::Index;
use memory::MemoryTier;

/// How the cache is set up.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes the memory tier may hold.
    pub memory_size: u64,
    /// Largest object the memory tier takes.
    pub memory_object_size: u64,
    pub retry: RetryPolicy,
    /// Disk budget and age limit.
    pub budget: Budget,
    /// Blob downloads running at once (0: no limit); further misses wait in a queue.
    pub max_concurrent_fills: usize,
    /// Misses that may wait for a download slot; beyond, requests get "busy" at once.
    pub max_queued_fills: usize,
}

/// Where an answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Memory,
    Disk,
    /// From a fill: started by this request, or joined while another request's fill ran.
    Upstream {
        joined: bool,
    },
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Memory => "memory",
            Source::Disk => "disk",
            Source::Upstream { joined: false } => "upstream",
            Source::Upstream { joined: true } => "upstream-joined",
        }
    }
}

/// A blob ready to be streamed.
pub struct Blob {
    /// Size in bytes, when known (a fill learns it from the upstream's headers).
    pub size: Option<u64>,
    pub source: Source,
    content: Content,
}

enum Content {
    Memory(Bytes),
    File {
        file: Arc<File>,
        progress: Option<watch::Receiver<Progress>>,
    },
}

impl Blob {
    /// The bytes `[start, end)` (`end` = `None`: to the end). A stream from a fill waits for bytes
    /// as they arrive and ends in an error if the fill fails; it never yields the blob's last byte
    /// before the digest verified.
    pub fn stream(self, start: u64, end: Option<u64>) -> BoxStream<'static, io::Result<Bytes>> {
        match self.content {
            Content::Memory(b) => {
                let len = b.len() as u64;
                let (s, e) = (start.min(len), end.unwrap_or(len).min(len));
                stream::iter([Ok(b.slice(s as usize..e.max(s) as usize))]).boxed()
            }
            Content::File { file, progress } => {
                let end = end.or(if progress.is_none() { self.size } else { None });
                reader::file_range(file, start, end, progress)
            }
        }
    }
}

/// A manifest held by the cache.
#[derive(Clone, Debug)]
pub struct CachedManifest {
    pub bytes: Bytes,
    pub media_type: Arc<str>,
}

type Fills = Arc<Mutex<HashMap<Digest, Arc<Fill>>>>;

/// The tiers and the fills.
pub struct Cache {
    store: Arc<DiskStore>,
    memory: MemoryTier,
    fills: Fills,
    manifest_fetches: SingleFlight<String, Result<(Digest, CachedManifest), UpstreamError>>,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    index: Index,
    budget: Budget,
    /// Wakes the maintenance task when the budget is exceeded.
    evict_now: tokio::sync::Notify,
    /// Tag records by `<upstream>/<repo>:<tag>`, so that a tag lookup reads no file.
    tags: moka::future::Cache<String, TagRecord>,
    /// Download slots, when limited, and how many fills may exist at all (running and queued).
    fill_slots: Option<(Arc<tokio::sync::Semaphore>, usize)>,
}

impl Cache {
    /// Opens the cache directory: creates it, removes leftovers of interrupted fills, and
    /// indexes the blobs on disk. Fails if another pier process has the directory open.
    pub fn open(config: CacheConfig, metrics: Arc<Metrics>) -> io::Result<Cache> {
        let store = DiskStore::open(&config.dir)?;
        let index = Index::from_scan(store.scan()?);
        let cache = Cache {
            store: Arc::new(store),
            memory: MemoryTier::new(config.memory_size, config.memory_object_size),
            fills: Fills::default(),
            manifest_fetches: SingleFlight::default(),
            retry: config.retry,
            metrics,
            index,
            budget: config.budget,
            evict_now: tokio::sync::Notify::new(),
            tags: moka::future::Cache::new(100_000),
            fill_slots: (config.max_concurrent_fills > 0).then(|| {
                let slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_fills));
                (slots, config.max_concurrent_fills + config.max_queued_fills)
            }),
        };
        cache
            .metrics
            .disk_budget_bytes
            .set(i64::try_from(cache.budget.max_size).unwrap_or(i64::MAX));
        cache.disk_usage_changed(cache.index.usage().0);
        Ok(cache)
    }

    pub fn store(&self) -> &DiskStore {
        &self.store
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the cache directory takes writes (for readiness probes).
    pub async fn check_writable(&self) -> io::Result<()> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.check_writable())
            .await
            .map_err(io::Error::other)?
    }

    /// Brings the gauges that are read rather than counted (the memory tier's) up to date.
    pub async fn update_gauges(&self) {
        let (bytes, entries) = self.memory.usage().await;
        self.metrics
            .memory_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics
            .memory_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// A blob from memory or disk, without going upstream.
    pub async fn cached_blob(&self, digest: &Digest) -> io::Result<Option<Blob>> {
        if let Some(obj) = self.memory.get(digest).await {
            self.index.touch(digest);
            return Ok(Some(Blob {
                size: Some(obj.bytes.len() as u64),
                source: Source::Memory,
                content: Content::Memory(obj.bytes),
            }));
        }
        let Some((file, len)) = self.store.open_blob(digest)? else {
            return Ok(None);
        };
        self.index.touch(digest);
        if self.memory.admits(len) {
            let bytes = read_whole(file).await?;
            self.memory
                .insert(
                    digest.clone(),
                    MemoryObject {
                        bytes: bytes.clone(),
                        media_type: None,
                    },
                )
                .await;
            return Ok(Some(Blob {
                size: Some(len),
                source: Source::Disk,
                content: Content::Memory(bytes),
            }));
        }
        Ok(Some(Blob {
            size: Some(len),
            source: Source::Disk,
            content: Content::File {
                file: Arc::new(file),
                progress: None,
            },
        }))
    }

    /// A blob from the cache, or else from the fill for its digest (joining the one in progress,
    /// or starting one with `origin`). Returns once the upstream answered, so that the size is
    /// known, or with the error that ended the fill before any byte.
    pub async fn blob(
        self: &Arc<Self>,
        digest: &Digest,
        origin: impl FnOnce() -> Arc<dyn Origin>,
    ) -> Result<Blob, FillError> {
        if let Some(blob) = self
            .cached_blob(digest)
            .await
            .map_err(|e| FillError::Io(e.to_string()))?
        {
            return Ok(blob);
        }
        let (fill, joined) = self.join_or_start(digest, origin)?;
        let Some(fill) = fill else {
            // It landed on disk between the two looks.
            return self
                .cached_blob(digest)
                .await
                .map_err(|e| FillError::Io(e.to_string()))?
                .ok_or_else(|| FillError::Io("blob vanished from the store".into()));
        };
        let mut rx = fill.progress.subscribe();
        let ready = rx
            .wait_for(|p| !matches!(p.phase, Phase::Connecting))
            .await
            .map_err(|_| FillError::Io("fill ended without an answer".into()))?
            .clone();
        if let Phase::Failed(e) = ready.phase {
            return Err(e);
        }
        Ok(Blob {
            size: ready.total,
            source: Source::Upstream { joined },
            content: Content::File {
                file: fill.file.clone(),
                progress: Some(rx),
            },
        })
    }

    /// The size of a blob pier has or is filling, without going upstream.
    pub async fn blob_size(&self, digest: &Digest) -> Option<(u64, Source)> {
        if let Some(obj) = self.memory.get(digest).await {
            return Some((obj.bytes.len() as u64, Source::Memory));
        }
        if let Some(len) = self.store.blob_len(digest) {
            return Some((len, Source::Disk));
        }
        // Being filled: known, but not cached yet (the fill may still fail).
        let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        let total = fills.get(digest).and_then(|f| f.progress.borrow().total)?;
        Some((total, Source::Upstream { joined: true }))
    }

    /// The fill for `digest`: the one running, or a new one. `None` when the blob is on disk.
    fn join_or_start(
        self: &Arc<Self>,
        digest: &Digest,
        origin: impl FnOnce() -> Arc<dyn Origin>,
    ) -> Result<(Option<Arc<Fill>>, bool), FillError> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fill) = fills.get(digest) {
            self.metrics.fill_joins.inc();
            return Ok((Some(fill.clone()), true));
        }
        // A fill removes itself from the map only after its file is in place, so a look at the
        // disk under the lock settles whether a new fill is needed.
        if self.store.blob_len(digest).is_some() {
            return Ok((None, false));
        }
        if self
            .fill_slots
            .as_ref()
            .is_some_and(|(_, most)| fills.len() >= *most)
        {
            return Err(FillError::Busy);
        }
        let (file, temp) = self
            .store
            .create_temp(digest)
            .map_err(|e| FillError::Io(e.to_string()))?;
        let fill = Arc::new(Fill::new(digest.clone(), file, temp));
        fills.insert(digest.clone(), fill.clone());
        drop(fills);
        self.metrics.fills_in_flight.inc();
        tokio::spawn(run_fill(self.clone(), fill.clone(), origin()));
        Ok((Some(fill), false))
    }

    /// A manifest by digest, from memory or disk.
    pub async fn manifest(&self, digest: &Digest) -> io::Result<Option<(CachedManifest, Source)>> {
        if let Some(obj) = self.memory.get(digest).await {
            if let Some(media_type) = obj.media_type {
                self.index.touch(digest);
                return Ok(Some((
                    CachedManifest {
                        bytes: obj.bytes,
                        media_type,
                    },
                    Source::Memory,
                )));
            }
        }
        let Some(media_type) = self.store.manifest_type(digest) else {
            return Ok(None);
        };
        let Some((file, _)) = self.store.open_blob(digest)? else {
            return Ok(None);
        };
        self.index.touch(digest);
        let bytes = read_whole(file).await?;
        let media_type: Arc<str> = media_type.into();
        let obj = MemoryObject {
            bytes: bytes.clone(),
            media_type: Some(media_type.clone()),
        };
        self.memory.insert(digest.clone(), obj).await;
        Ok(Some((CachedManifest { bytes, media_type }, Source::Disk)))
    }

    /// Stores a manifest under its digest. The caller checked that `digest` matches `bytes`.
    pub async fn put_manifest(&self, digest: &Digest, manifest: &CachedManifest) -> io::Result<()> {
        let (store, d, m) = (self.store.clone(), digest.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || {
            store.write_blob(&d, &m.bytes)?;
            store.set_manifest_type(&d, &m.media_type)
        })
        .await
        .map_err(io::Error::other)??;
        self.stored(digest.clone(), manifest.bytes.len() as u64);
        let obj = MemoryObject {
            bytes: manifest.bytes.clone(),
            media_type: Some(manifest.media_type.clone()),
        };
        self.memory.insert(digest.clone(), obj).await;
        Ok(())
    }

    /// Every (upstream, repository) pier holds a tag of.
    pub async fn repositories(&self) -> io::Result<Vec<(String, String)>> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.repositories())
            .await
            .map_err(io::Error::other)?
    }

    /// Where a tag of an upstream's repository pointed when pier last saw it.
    /// Answered from memory when pier saw the tag since it started, else from its file.
    pub async fn tag(&self, upstream: &str, repo: &RepositoryName, tag: &Tag) -> Option<TagRecord> {
        let key = tag_key(upstream, repo, tag);
        if let Some(rec) = self.tags.get(&key).await {
            return Some(rec);
        }
        let rec = self.store.tag(upstream, repo, tag)?;
        self.tags.insert(key, rec.clone()).await;
        Some(rec)
    }

    /// Records where a tag points, on disk and in memory.
    pub async fn set_tag(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        tag: &Tag,
        record: &TagRecord,
    ) -> io::Result<()> {
        self.store.set_tag(upstream, repo, tag, record)?;
        self.tags
            .insert(tag_key(upstream, repo, tag), record.clone())
            .await;
        Ok(())
    }

    /// The manifest fill: runs `fetch` once for all concurrent callers with the same `key`, checks
    /// the bytes against `expected` (a digest reference) or the upstream's `Docker-Content-Digest`,
    /// stores them, and records `tag` as pointing at them, all before any caller is answered, so
    /// that a request arriving just after finds the tag recorded. Returns the digest and manifest,
    /// and whether this caller joined a fill already under way.
    pub async fn fill_manifest(
        self: &Arc<Self>,
        key: String,
        fetch: BoxFuture<'static, Result<Manifest, UpstreamError>>,
        expected: Option<Digest>,
        tag: Option<(Arc<str>, RepositoryName, Tag)>,
    ) -> (Result<(Digest, CachedManifest), UpstreamError>, bool) {
        let cache = self.clone();
        self.manifest_fetches
            .run(key, move || async move {
                let m = fetch.await?;
                let digest = match (expected, m.digest_header) {
                    (Some(d), _) | (None, Some(d)) if d.verifies(&m.bytes) => d,
                    (Some(_), _) | (None, Some(_)) => {
                        return Err(UpstreamError::Invalid(
                            "manifest bytes do not match their digest".into(),
                        ))
                    }
                    (None, None) => Digest::sha256_of(&m.bytes),
                };
                let manifest = CachedManifest {
                    bytes: m.bytes,
                    media_type: m.media_type.into(),
                };
                if let Err(e) = cache.put_manifest(&digest, &manifest).await {
                    tracing::warn!(error = %e, %digest, "could not cache manifest");
                } else if let Some((upstream, repo, tag)) = tag {
                    let rec =
                        TagRecord::new(&digest, &manifest.media_type, std::time::SystemTime::now());
                    if let Err(e) = cache.set_tag(&upstream, &repo, &tag, &rec).await {
                        tracing::warn!(error = %e, "could not record tag");
                    }
                }
                Ok((digest, manifest))
            })
            .await
    }
}

fn tag_key(upstream: &str, repo: &RepositoryName, tag: &Tag) -> String {
    format!("{upstream}/{repo}:{tag}")
}

/// The fill's task: download, commit or discard, tell the readers, leave the map.
async fn run_fill(cache: Arc<Cache>, fill: Arc<Fill>, origin: Arc<dyn Origin>) {
    let metrics = &cache.metrics;
    // Wait for a download slot; the fill's readers wait meanwhile (still "connecting").
    let _slot = match &cache.fill_slots {
        Some((slots, _)) => slots.clone().acquire_owned().await.ok(),
        None => None,
    };
    match fill.download(origin.as_ref(), &cache.retry).await {
        Ok(resumes) => {
            metrics.fill_resumes.inc_by(u64::from(resumes));
            // The bytes verified: readers may finish now, before the fsync of the commit.
            fill.progress.send_modify(|p| p.phase = Phase::Verified);
            let written = fill.progress.borrow().written;
            let (s, f) = (cache.store.clone(), fill.clone());
            let committed =
                tokio::task::spawn_blocking(move || s.commit(&f.file, &f.temp, &f.digest))
                    .await
                    .map_err(io::Error::other)
                    .and_then(|r| r);
            match committed {
                Ok(()) => {
                    metrics.fills.with_label_values(&["ok"]).inc();
                    cache.stored(fill.digest.clone(), written);
                    fill.progress.send_modify(|p| p.phase = Phase::Complete);
                    tracing::debug!(digest = %fill.digest, bytes = written, "fill complete");
                }
                Err(e) => {
                    // The clients got verified bytes; only the cache goes without.
                    metrics.fills.with_label_values(&["failed"]).inc();
                    tracing::warn!(digest = %fill.digest, error = %e, "verified blob could not be stored");
                    let _ = std::fs::remove_file(&fill.temp);
                    cache.evict_now.notify_one();
                }
            }
        }
        Err(e) => {
            metrics.fills.with_label_values(&["failed"]).inc();
            tracing::warn!(digest = %fill.digest, error = %e, "fill failed; nothing kept");
            let _ = std::fs::remove_file(&fill.temp);
            if matches!(&e, FillError::Io(m) if m.contains("No space left")) {
                // Make room for the next attempt.
                cache.evict_now.notify_one();
            }
            fill.progress.send_modify(|p| p.phase = Phase::Failed(e));
        }
    }
    cache
        .fills
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&fill.digest);
    metrics.fills_in_flight.dec();
}

async fn read_whole(file: File) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut buf = Vec::new();
        (&file).read_to_end(&mut buf)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}
