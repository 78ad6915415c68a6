//! pier's cache: a memory tier (moka) in front of a content-addressed disk store, filled from the
//! upstream once per digest, and the one owner of manifest and tag resolution.
//!
//! A request flows route → resolve → tier → fill → stream. [`Cache::resolve_manifest`] turns a
//! tag or digest into a manifest for one repository and one accept set: it decides whether a tag
//! answer is fresh, asks the upstream once for all concurrent callers, records the answer, and
//! falls back to cached answers the client accepts while the upstream is down ([`resolve`]).
//! [`Cache::blob`] looks a digest up in memory, then on disk, then joins the fill in progress for
//! it or starts one; every concurrent request for a digest streams the same fill's bytes as they
//! land in its file, and bytes whose digest does not verify never reach the store. Both check that
//! the digest belongs to the repository asked for ([`links`]).

mod disk;
mod error;
mod eviction;
mod fill;
mod flight;
mod gc;
mod hosted;
mod index;
mod links;
mod memory;
mod reader;
mod referrers;
pub mod region;
mod remote;
mod resolve;
pub mod store;
mod tags;
mod uploads;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::OptionFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use futures_util::FutureExt;
use pier_metrics::Metrics;
use pier_oci::Digest;
use pier_upstream::UpstreamError;
use tokio::sync::watch;

pub use disk::Disk;
pub use error::{Error, IoFailure, PushError};
pub use eviction::{Budget, EvictionReport, Usage};
pub use fill::{FillError, Origin, RetryPolicy};
pub use flight::{Panicked, SingleFlight};
pub use gc::GcReport;
pub use hosted::{HostedConfig, HostedUsage, MountFrom, PushedManifest, HOSTED, MAX_MANIFEST_SIZE};
pub use memory::MemoryObject;
pub use referrers::{fallback_tag, EMPTY_INDEX};
pub use remote::{is_attachment_tag, Freshness, RepoRef};
pub use resolve::{ResolvedManifest, TagList};
pub use store::{DiskStore, LinkFile, RecordName, TagAnswer, TagRecord};

use fill::{Fill, Phase, Progress};
use index::Index;
use links::Links;
use memory::MemoryTier;
use region::origin::RegionOrigin;
use region::Region;
use remote::UpstreamOrigin;
use tags::TagRecords;

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
    /// Hosted content's budget and upload expiry.
    pub hosted: HostedConfig,
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
    /// The blob's file on disk when it is complete and verified (its bytes final, `size` its
    /// length), so that the server may hand them to the socket itself (`sendfile`) instead of
    /// streaming them through memory. `None` for the memory tier and for a fill still running.
    pub fn complete_file(&self) -> Option<&Arc<File>> {
        match &self.content {
            Content::File {
                file,
                progress: None,
            } if self.size.is_some() => Some(file),
            _ => None,
        }
    }

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

/// The tiers, the fills, and what the cache knows of tags and repositories.
pub struct Cache {
    disk: Disk,
    memory: MemoryTier,
    fills: Fills,
    retry: RetryPolicy,
    metrics: Arc<Metrics>,
    index: Index,
    budget: Budget,
    /// Wakes the maintenance task when the budget is exceeded.
    evict_now: tokio::sync::Notify,
    /// Download slots, when limited, and how many fills may exist at all (running and queued).
    fill_slots: Option<(Arc<tokio::sync::Semaphore>, usize)>,
    tags: TagRecords,
    links: Links,
    /// Of hosted repositories' links, the manifests pushed to them.
    hosted_manifests: Links,
    /// Manifest GETs under way, by upstream, repository, reference and accept set.
    manifest_fetches: SingleFlight<String, Result<ResolvedManifest, Error>>,
    /// Tag resolutions with the upstream under way, by upstream, repository, tag and accept set.
    resolutions: SingleFlight<String, Result<ResolvedManifest, Error>>,
    /// Confirmations that a repository holds a digest, by repository and digest.
    confirmations: SingleFlight<String, Result<(), Error>>,
    /// Tag lists as the upstream gave them, kept briefly and served while the upstream is down.
    tag_lists: moka::future::Cache<String, Arc<TagList>>,
    tag_list_fetches: SingleFlight<String, Result<Arc<TagList>, Error>>,
    /// The region this node is part of, if any: peers and a shared store between this node's
    /// tiers and the upstream.
    region: Option<Arc<Region>>,
    hosted: HostedConfig,
    uploads: uploads::Uploads,
    /// Bytes held by upload sessions (and manifests being written): reserved in the hosted
    /// budget. Its lock also orders every hosted budget check.
    uploading: Mutex<u64>,
    /// Held by the garbage collection running, so that one runs at a time.
    gc_running: tokio::sync::Mutex<()>,
    /// Upload steps and manifest pushes under way, which run to their end whatever happens to
    /// their request: a stop waits for them.
    upload_steps: Arc<std::sync::atomic::AtomicUsize>,
}

impl Cache {
    /// Opens the cache directory: creates it, removes leftovers of interrupted fills, and
    /// indexes the blobs on disk. Fails if another pier process has the directory open.
    /// Blocking: call it before serving.
    pub fn open(config: CacheConfig, metrics: Arc<Metrics>) -> io::Result<Cache> {
        let store = DiskStore::open(&config.dir)?;
        store.record_hosted_manifests(HOSTED)?;
        // Whatever a hosted repository links is hosted content: pinned, never evicted.
        // And what a hosted manifest's deletion left, until garbage collection has seen it.
        let mut hosted = store.all_links(HOSTED)?;
        hosted.extend(store.deleted(HOSTED)?);
        let index = Index::from_scan(store.scan()?, &hosted);
        let sessions = store.uploads()?;
        let uploading = sessions.iter().map(|(_, u)| u.size).sum();
        let cache = Cache {
            disk: Disk::new(store),
            memory: MemoryTier::new(config.memory_size, config.memory_object_size),
            fills: Fills::default(),
            retry: config.retry,
            metrics,
            index,
            budget: config.budget,
            evict_now: tokio::sync::Notify::new(),
            fill_slots: (config.max_concurrent_fills > 0).then(|| {
                let slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_fills));
                (slots, config.max_concurrent_fills + config.max_queued_fills)
            }),
            tags: TagRecords::new(),
            links: Links::new(LinkFile::All),
            hosted_manifests: Links::new(LinkFile::Manifests),
            manifest_fetches: SingleFlight::default(),
            resolutions: SingleFlight::default(),
            confirmations: SingleFlight::default(),
            tag_lists: moka::future::Cache::new(10_000),
            tag_list_fetches: SingleFlight::default(),
            region: None,
            hosted: config.hosted,
            uploads: uploads::Uploads::from_disk(&sessions),
            uploading: Mutex::new(uploading),
            gc_running: tokio::sync::Mutex::new(()),
            upload_steps: Arc::default(),
        };
        cache
            .metrics
            .hosted_uploads_in_progress
            .set(i64::try_from(sessions.len()).unwrap_or(i64::MAX));
        cache
            .metrics
            .disk_budget_bytes
            .set(i64::try_from(cache.budget.max_size).unwrap_or(i64::MAX));
        cache.disk_usage_changed(cache.index.usage().0);
        Ok(cache)
    }

    /// Makes this node part of `region`: lookups of what it does not hold go to the region
    /// before the upstream.
    pub fn with_region(mut self, region: Arc<Region>) -> Self {
        self.region = Some(region);
        self
    }

    /// The region this node is part of, if any.
    pub fn region(&self) -> Option<&Arc<Region>> {
        self.region.as_ref()
    }

    /// The disk store, through its async front.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether the cache directory takes writes (for readiness probes).
    pub async fn check_writable(&self) -> io::Result<()> {
        self.disk.run(|s| s.check_writable()).await
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
        let hosted = self.hosted_usage();
        for (gauge, value) in [
            (&self.metrics.hosted_bytes, hosted.stored_bytes),
            (&self.metrics.hosted_upload_bytes, hosted.uploading_bytes),
            (&self.metrics.hosted_budget_bytes, hosted.max_size),
        ] {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// A blob from memory or disk, without going upstream. No repository is checked: for
    /// callers that did ([`Cache::blob`]) and for benchmarks.
    pub async fn cached_blob(&self, digest: &Digest) -> io::Result<Option<Blob>> {
        if let Some(obj) = self.memory.get(digest).await {
            self.index.touch(digest);
            return Ok(Some(Blob {
                size: Some(obj.bytes.len() as u64),
                source: Source::Memory,
                content: Content::Memory(obj.bytes),
            }));
        }
        if !self.index.contains(digest) {
            return Ok(None);
        }
        let d = digest.clone();
        let admits = self.memory.max_object_size();
        let opened = self
            .disk
            .run(move |s| {
                let Some((file, len)) = s.open_blob(&d)? else {
                    return Ok(None);
                };
                // Small enough for the memory tier: read it whole on this thread.
                let bytes = if len <= admits {
                    let mut buf = Vec::with_capacity(len as usize);
                    std::io::Read::read_to_end(&mut &file, &mut buf)?;
                    Some(Bytes::from(buf))
                } else {
                    None
                };
                Ok(Some((file, len, bytes)))
            })
            .await?;
        let Some((file, len, bytes)) = opened else {
            // Gone from disk behind pier's back (or evicted a moment ago): the index follows.
            self.forget_stored(digest).await;
            return Ok(None);
        };
        self.index.touch(digest);
        if let Some(bytes) = bytes {
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

    /// A blob of `at`'s repository: from the cache when the repository holds it (confirmed with
    /// the upstream when pier holds the digest only for other repositories), else from the fill
    /// for its digest, joined or started from this repository. Returns once the upstream
    /// answered, so that the size is known, or with the error that ended the fill before any
    /// byte.
    pub async fn blob(self: &Arc<Self>, at: RepoRef<'_>, digest: &Digest) -> Result<Blob, Error> {
        let mut linked = self.is_linked(at, digest).await?;
        if !linked && self.holds(digest) {
            self.confirm(at, digest, resolve::Kind::Blob).await?;
            linked = true;
        }
        let origin = || -> Arc<dyn Origin> {
            let upstream = UpstreamOrigin {
                client: at.client.clone(),
                repo: at.repo.clone(),
                digest: digest.clone(),
            };
            match &self.region {
                // The shared store is keyed by digest alone: it may answer only for a digest
                // the repository is known to hold. The owner checks for itself.
                Some(region) => Arc::new(RegionOrigin::new(
                    region.clone(),
                    upstream,
                    at.upstream.into(),
                    !at.from_peer,
                    linked,
                )),
                None => Arc::new(upstream),
            }
        };
        let blob = match self.fill_blob(digest, origin).await {
            // The fill joined may have been another repository's, which does not hold the
            // digest: that says nothing of this repository, which the upstream vouched for.
            Err(FillError::Upstream(UpstreamError::NotFound | UpstreamError::Unauthorized(_)))
                if linked =>
            {
                self.wait_for_fills(Some(digest), std::time::Duration::from_secs(5))
                    .await;
                self.fill_blob(digest, origin).await?
            }
            other => other?,
        };
        if !linked {
            match blob.source {
                // This repository's own download got an answer: the upstream has it there.
                Source::Upstream { joined: false } => self.link(at, [digest.clone()]).await,
                // Someone else's bytes arrived meanwhile: ask, as above.
                _ => self.confirm(at, digest, resolve::Kind::Blob).await?,
            }
        }
        Ok(blob)
    }

    /// A blob by digest from the tiers, or else from the fill for it (joining the one in
    /// progress, or starting one with `origin`). No repository is checked: [`Cache::blob`] does.
    pub async fn fill_blob(
        self: &Arc<Self>,
        digest: &Digest,
        origin: impl FnOnce() -> Arc<dyn Origin>,
    ) -> Result<Blob, FillError> {
        let mut origin = Some(origin);
        // Twice at most: a blob evicted between the index's word and the open is filled again.
        for _ in 0..2 {
            if let Some(blob) = self
                .cached_blob(digest)
                .await
                .map_err(|e| FillError::Io(e.into()))?
            {
                return Ok(blob);
            }
            let (fill, joined) = match self.join_or_start(digest, &mut origin)? {
                Some(f) => f,
                None => continue, // landed on disk between the two looks
            };
            let mut rx = fill.progress.subscribe();
            let ready = rx
                .wait_for(|p| !matches!(p.phase, Phase::Connecting))
                .await
                .map_err(|_| FillError::Panicked)?
                .clone();
            if let Phase::Failed(e) = ready.phase {
                return Err(e);
            }
            let file = fill.file().ok_or(FillError::Panicked)?;
            return Ok(Blob {
                size: ready.total,
                source: Source::Upstream { joined },
                content: Content::File {
                    file,
                    progress: Some(rx),
                },
            });
        }
        Err(FillError::Io(
            io::Error::other("blob vanished from the store while it was read").into(),
        ))
    }

    /// The size of a blob of `at`'s repository, and where it is: pier's own when the repository
    /// holds it (or the upstream confirms it does), else the upstream's HEAD, without
    /// downloading.
    pub async fn blob_head(
        self: &Arc<Self>,
        at: RepoRef<'_>,
        digest: &Digest,
    ) -> Result<(Option<u64>, Source), Error> {
        let linked = self.is_linked(at, digest).await?;
        if let Some((size, source)) = self.local_size(digest).await {
            if !linked {
                self.confirm(at, digest, resolve::Kind::Blob).await?;
            }
            return Ok((Some(size), source));
        }
        // The region holds it for this repository: no need to ask the upstream (which may be
        // down).
        if linked {
            let shared = self.region.as_ref().and_then(|r| r.shared.as_ref());
            if let Some(size) = OptionFuture::from(shared.map(|s| s.size(digest)))
                .await
                .flatten()
            {
                return Ok((Some(size), Source::Upstream { joined: false }));
            }
        }
        let size = at
            .client
            .head_blob(at.repo, digest)
            .await
            .map_err(Error::from_upstream)?;
        if !linked {
            self.link(at, [digest.clone()]).await;
        }
        Ok((size, Source::Upstream { joined: false }))
    }

    /// Size and tier of a blob pier has or is filling, from memory alone (no file is read).
    async fn local_size(&self, digest: &Digest) -> Option<(u64, Source)> {
        if let Some(obj) = self.memory.get(digest).await {
            return Some((obj.bytes.len() as u64, Source::Memory));
        }
        if let Some(len) = self.index.size(digest) {
            return Some((len, Source::Disk));
        }
        // Being filled: known, but not cached yet (the fill may still fail).
        let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        let total = fills.get(digest).and_then(|f| f.progress.borrow().total)?;
        Some((total, Source::Upstream { joined: true }))
    }

    /// Whether verified content with this digest is in the disk store.
    pub fn is_stored(&self, digest: &Digest) -> bool {
        self.index.contains(digest)
    }

    /// Whether pier holds the digest in any tier or is filling it.
    fn holds(&self, digest: &Digest) -> bool {
        self.memory.contains(digest)
            || self.index.contains(digest)
            || self
                .fills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(digest)
    }

    /// The fill for `digest`: the one running, or a new one (whose task creates its file).
    /// `None` when the blob is on disk. No file system call happens under the lock: the index
    /// and the fills map settle it, as a fill leaves the map only after its blob is indexed.
    fn join_or_start<O: FnOnce() -> Arc<dyn Origin>>(
        self: &Arc<Self>,
        digest: &Digest,
        origin: &mut Option<O>,
    ) -> Result<Option<(Arc<Fill>, bool)>, FillError> {
        let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fill) = fills.get(digest) {
            self.metrics.fill_joins.inc();
            return Ok(Some((fill.clone(), true)));
        }
        if self.index.contains(digest) {
            return Ok(None);
        }
        if self
            .fill_slots
            .as_ref()
            .is_some_and(|(_, most)| fills.len() >= *most)
        {
            return Err(FillError::Busy);
        }
        let origin = origin.take().ok_or(FillError::Panicked)?();
        let fill = Arc::new(Fill::new(digest.clone()));
        fills.insert(digest.clone(), fill.clone());
        drop(fills);
        self.metrics.fills_in_flight.inc();
        tokio::spawn(run_fill(self.clone(), fill.clone(), origin));
        Ok(Some((fill, false)))
    }

    /// A manifest by digest, from memory or disk. No repository is checked:
    /// [`Cache::resolve_manifest`] does.
    pub(crate) async fn manifest(
        &self,
        digest: &Digest,
    ) -> io::Result<Option<(CachedManifest, Source)>> {
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
        if !self.index.contains(digest) {
            return Ok(self.shared_manifest(digest).await);
        }
        let d = digest.clone();
        let read = self
            .disk
            .run(move |s| {
                let Some(media_type) = s.manifest_type(&d) else {
                    return Ok(None);
                };
                let Some((file, _)) = s.open_blob(&d)? else {
                    return Ok(None);
                };
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut buf)?;
                Ok(Some((media_type, Bytes::from(buf))))
            })
            .await?;
        let Some((media_type, bytes)) = read else {
            return Ok(None);
        };
        self.index.touch(digest);
        let media_type: Arc<str> = media_type.into();
        let obj = MemoryObject {
            bytes: bytes.clone(),
            media_type: Some(media_type.clone()),
        };
        self.memory.insert(digest.clone(), obj).await;
        Ok(Some((CachedManifest { bytes, media_type }, Source::Disk)))
    }

    /// A manifest from the region's shared store, kept on this node too.
    async fn shared_manifest(&self, digest: &Digest) -> Option<(CachedManifest, Source)> {
        let shared = self.region.as_ref()?.shared.as_ref()?;
        let (bytes, media_type) = shared.manifest(digest).await?;
        let manifest = CachedManifest {
            bytes,
            media_type: media_type.into(),
        };
        if let Err(e) = self.store_manifest(digest, &manifest).await {
            tracing::warn!(error = %e, %digest, "could not cache manifest");
        }
        Some((manifest, Source::Upstream { joined: false }))
    }

    /// Stores a manifest under its digest, and in the region's shared store. The caller
    /// checked that `digest` matches `bytes`.
    pub(crate) async fn put_manifest(
        &self,
        digest: &Digest,
        manifest: &CachedManifest,
    ) -> io::Result<()> {
        self.store_manifest(digest, manifest).await?;
        if let Some(region) = &self.region {
            if region.shared.is_some() {
                let (region, d, m) = (region.clone(), digest.clone(), manifest.clone());
                tokio::spawn(async move {
                    if let Some(shared) = &region.shared {
                        shared.put_manifest(&d, m.bytes, &m.media_type).await;
                    }
                });
            }
        }
        Ok(())
    }

    /// Stores a manifest under its digest on this node. The caller checked that `digest`
    /// matches `bytes`.
    async fn store_manifest(&self, digest: &Digest, manifest: &CachedManifest) -> io::Result<()> {
        let (d, m) = (digest.clone(), manifest.clone());
        self.disk
            .run(move |store| {
                store.write_blob(&d, &m.bytes)?;
                store.set_manifest_type(&d, &m.media_type)
            })
            .await?;
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
        self.disk.run(|s| s.repositories()).await
    }

    /// Forgets a blob the index holds but the disk no longer does.
    async fn forget_stored(&self, digest: &Digest) {
        self.memory.remove(digest).await;
        if let Some(total) = self.index.remove(digest) {
            self.disk_usage_changed(total);
        }
    }
}

/// The fill's task: download, commit or discard, tell the readers, leave the map. A panic
/// anywhere in it still fails the fill for its readers and removes it from the map.
async fn run_fill(cache: Arc<Cache>, fill: Arc<Fill>, origin: Arc<dyn Origin>) {
    if let Some(region) = &cache.region {
        if region.shared.is_some() {
            tokio::spawn(share_fill(region.clone(), fill.clone(), origin.clone()));
        }
    }
    let outcome = std::panic::AssertUnwindSafe(fill_and_commit(&cache, &fill, origin.as_ref()))
        .catch_unwind()
        .await;
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => {
            tracing::error!(digest = %fill.digest, "fill task panicked");
            Some(FillError::Panicked)
        }
    };
    if let Some(e) = failure {
        cache.metrics.fills.with_label_values(&["failed"]).inc();
        tracing::warn!(digest = %fill.digest, error = %e, "fill failed; nothing kept");
        if let Some((_, temp)) = fill.temp.get() {
            let temp = temp.clone();
            let _ = cache.disk.run(move |_| std::fs::remove_file(temp)).await;
        }
        if matches!(&e, FillError::Io(io) if io.kind() == io::ErrorKind::StorageFull) {
            // Make room for the next attempt.
            cache.evict_now.notify_one();
        }
        fill.progress.send_modify(|p| p.phase = Phase::Failed(e));
    }
    if fill.purged.load(Ordering::SeqCst) {
        // A purge ran during the fill: what it committed must not outlive the purge. Done
        // before the fill leaves the map, so that whoever waits for fills sees it done; a purge
        // from now on finds the committed blob itself.
        let _ = cache.purge_digest(&fill.digest).await;
    }
    cache
        .fills
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&fill.digest);
    cache.metrics.fills_in_flight.dec();
}

/// Uploads what a fill brings from the upstream to the region's shared store as it streams,
/// completing the upload only once the fill verified (its stream holds the last byte back until
/// then). A fill served by a peer or by the shared store itself is not uploaded again, unless it
/// had to finish from the upstream.
async fn share_fill(region: Arc<Region>, fill: Arc<Fill>, origin: Arc<dyn Origin>) {
    let mut rx = fill.progress.subscribe();
    let Ok(ready) = rx
        .wait_for(|p| !matches!(p.phase, Phase::Connecting))
        .await
        .map(|p| p.clone())
    else {
        return;
    };
    if matches!(ready.phase, Phase::Failed(_)) {
        return;
    }
    if !origin.shares() {
        // A later attempt may still go to the upstream (its first source died mid-fill): then
        // the whole verified blob is shared once the fill is done.
        let done = rx
            .wait_for(|p| {
                matches!(
                    p.phase,
                    Phase::Verified | Phase::Complete | Phase::Failed(_)
                )
            })
            .await
            .map(|p| matches!(p.phase, Phase::Verified | Phase::Complete));
        if !(matches!(done, Ok(true)) && origin.shares()) {
            return;
        }
    }
    let (Some(shared), Some(file)) = (&region.shared, fill.file()) else {
        return;
    };
    let blob = Blob {
        size: ready.total,
        source: Source::Upstream { joined: true },
        content: Content::File {
            file,
            progress: Some(rx),
        },
    };
    if shared.upload(&fill.digest, blob.stream(0, None)).await {
        tracing::debug!(digest = %fill.digest, "blob shared with the region");
    }
}

/// Downloads into a new temporary file, verifies, and commits it to the store.
async fn fill_and_commit(
    cache: &Arc<Cache>,
    fill: &Arc<Fill>,
    origin: &dyn Origin,
) -> Result<(), FillError> {
    let metrics = &cache.metrics;
    // Wait for a download slot; the fill's readers wait meanwhile (still "connecting").
    let _slot = match &cache.fill_slots {
        Some((slots, _)) => slots.clone().acquire_owned().await.ok(),
        None => None,
    };
    let d = fill.digest.clone();
    let (file, temp) = cache
        .disk
        .run(move |s| s.create_temp(&d))
        .await
        .map_err(|e| FillError::Io(e.into()))?;
    let file = Arc::new(file);
    let _ = fill.temp.set((file.clone(), temp.clone()));
    let resumes = fill.download(&file, origin, &cache.retry).await?;
    metrics.fill_resumes.inc_by(u64::from(resumes));
    // The bytes verified: readers may finish now, before the fsync of the commit.
    fill.progress.send_modify(|p| p.phase = Phase::Verified);
    let written = fill.progress.borrow().written;
    let (f, t, d) = (file.clone(), temp.clone(), fill.digest.clone());
    match cache.disk.run(move |s| s.commit(&f, &t, &d)).await {
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
            let _ = cache.disk.run(move |_| std::fs::remove_file(temp)).await;
            cache.evict_now.notify_one();
        }
    }
    Ok(())
}
