//! Blob uploads to hosted repositories (OCI distribution spec 1.1 push): sessions on disk under
//! `uploads/`, so that a restart does not lose them, chunks appended in order, and the finished
//! upload verified against the digest the client names before it becomes a blob of the same
//! content-addressed store the mirror fills.
//!
//! A chunk is all or nothing: one that breaks off, does not match its `Content-Range` or would
//! exceed the hosted budget is cut back off the session, which stays where it was. Sessions that
//! take no bytes for `upload_expiry` are removed (on access and by the maintenance task).
//!
//! Open sessions are limited, on the node (`hosted.max_uploads`) and per caller
//! (`hosted.max_uploads_per_client`): each holds a directory and files until it finishes, is
//! cancelled or expires, and a client could otherwise open them without end. Sessions found on
//! disk at start count; one that finishes, is cancelled or expires frees its slot.
//!
//! Chunks are hashed (sha256) as they are written, so that finishing an upload reads nothing
//! back; a session whose running hash was lost (a restart, a chunk cut back) or that finishes
//! with another algorithm is hashed from its file instead.
//!
//! A request that writes to, finishes or cancels a session does so in a task of its own
//! ([`detached`]): a client that hangs up makes hyper drop the request's future at whatever it
//! awaits, and a step cut there would keep part of a chunk, or leave a session gone from disk
//! whose slot and reserved bytes were never given back.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{BoxStream, StreamExt};
use pier_oci::{Algorithm, Digest, Hasher, RepositoryName};

use crate::error::PushError;
use crate::hosted::{HostedConfig, HOSTED};
use crate::store::UploadInfo;
use crate::Cache;

/// Bytes gathered from a request body before one write to the session's file.
const WRITE_BATCH: usize = 1 << 20;

/// Upload sessions' locks, running hashes and slots.
#[derive(Default)]
pub(crate) struct Uploads {
    /// One lock per session, so that its chunks are written one at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The sha256 of each session's first `u64` bytes.
    hashes: Mutex<HashMap<String, (u64, Hasher)>>,
    /// The sessions open, as the limits count them.
    slots: Mutex<Slots>,
}

/// Which sessions are open, whose they are, and when each last took bytes.
#[derive(Default)]
struct Slots {
    open: HashMap<String, Slot>,
    /// Sessions open per owner (kept with `open`, so that a check costs no walk).
    per_owner: HashMap<String, usize>,
}

struct Slot {
    owner: String,
    /// When it last took bytes, as far as this process saw (its file's time, give or take a
    /// write): it picks the sessions that may have expired; the file decides.
    touched: SystemTime,
}

impl Slots {
    fn insert(&mut self, session: &str, owner: &str, touched: SystemTime) {
        let slot = Slot {
            owner: owner.to_string(),
            touched,
        };
        if self.open.insert(session.to_string(), slot).is_none() {
            *self.per_owner.entry(owner.to_string()).or_default() += 1;
        }
    }

    fn remove(&mut self, session: &str) -> bool {
        let Some(slot) = self.open.remove(session) else {
            return false;
        };
        if let Some(n) = self.per_owner.get_mut(&slot.owner) {
            *n -= 1;
            if *n == 0 {
                self.per_owner.remove(&slot.owner);
            }
        }
        true
    }
}

/// The owner recorded for sessions of an earlier version, which kept none: they count against
/// the node's limit only (no caller's key looks like this).
const UNKNOWN_OWNER: &str = "-";

impl Uploads {
    /// The slots of the sessions on disk at start.
    pub(crate) fn from_disk(sessions: &[(String, UploadInfo)]) -> Self {
        let uploads = Uploads::default();
        {
            let mut slots = uploads.slots.lock().unwrap_or_else(|p| p.into_inner());
            for (session, info) in sessions {
                let owner = info.owner.as_deref().unwrap_or(UNKNOWN_OWNER);
                slots.insert(session, owner, info.touched);
            }
        }
        uploads
    }

    /// Takes a slot for a new session of `owner`, if the limits leave one.
    fn admit(&self, session: &str, owner: &str, limits: &HostedConfig) -> Result<(), PushError> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.per_owner.get(owner).copied().unwrap_or(0) >= limits.max_uploads_per_client {
            return Err(PushError::TooManyUploads {
                field: "hosted.max_uploads_per_client",
                limit: limits.max_uploads_per_client,
            });
        }
        if slots.open.len() >= limits.max_uploads {
            return Err(PushError::TooManyUploads {
                field: "hosted.max_uploads",
                limit: limits.max_uploads,
            });
        }
        slots.insert(session, owner, SystemTime::now());
        Ok(())
    }

    /// Gives a session's slot back; `false` when it held none (closed already).
    fn close(&self, session: &str) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session)
    }

    /// Notes that a session took bytes.
    fn touch(&self, session: &str) {
        if let Some(slot) = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .get_mut(session)
        {
            slot.touched = SystemTime::now();
        }
    }

    /// Sessions that may have been idle for longer than `expiry`.
    fn maybe_expired(&self, expiry: std::time::Duration) -> Vec<String> {
        let now = SystemTime::now();
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .iter()
            .filter(|(_, slot)| now.duration_since(slot.touched).is_ok_and(|d| d > expiry))
            .map(|(session, _)| session.clone())
            .collect()
    }

    fn open(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open
            .len()
    }

    fn lock_of(&self, session: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(session.to_string())
            .or_default()
            .clone()
    }

    fn forget(&self, session: &str) {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
        self.take_hash(session, None);
    }

    /// The running hash of a session of `size` bytes (a new one for an empty session), if it is
    /// known; it is taken out, to be put back with the bytes that follow.
    fn take_hash(&self, session: &str, size: Option<u64>) -> Option<Hasher> {
        let kept = self
            .hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
        match (kept, size) {
            (Some((at, h)), Some(size)) if at == size => Some(h),
            (_, Some(0)) => Some(Hasher::new(Algorithm::Sha256)),
            _ => None,
        }
    }

    fn put_hash(&self, session: &str, size: u64, hasher: Hasher) {
        self.hashes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.to_string(), (size, hasher));
    }
}

/// Runs one step of an upload (a chunk, the last request, a cancel) as a task of its own and
/// waits for it: the step runs to its end even when the request that asked for it is dropped
/// (its client hung up), so that its bookkeeping (cut back, slot closed, bytes released, blob
/// linked) always follows what it did on disk. `running` counts the steps under way, for a stop
/// to wait for ([`Cache::wait_for_uploads`]).
pub(crate) async fn detached<T, F>(running: &Arc<AtomicUsize>, step: F) -> Result<T, PushError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, PushError>> + Send + 'static,
{
    running.fetch_add(1, Ordering::SeqCst);
    let counted = Running(running.clone());
    tokio::spawn(async move {
        let _counted = counted;
        step.await
    })
    .await
    .map_err(|e| io::Error::other(format!("upload step did not finish: {e}")))?
}

/// One step counted in [`Cache`]'s running upload steps until it ends (or panics).
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A new session id: 128 random bits, hex. Guessing one would let a stranger write into
/// someone's upload.
fn new_session_id() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl Cache {
    /// Starts an upload session for a hosted repository, opened by `owner` (the caller as the
    /// per-client limit counts them: a user, or an anonymous client's address); returns its id.
    /// [`PushError::TooManyUploads`] when the limits leave no slot, even after sessions that
    /// expired meanwhile were removed.
    pub async fn start_upload(
        &self,
        repo: &RepositoryName,
        owner: &str,
    ) -> Result<String, PushError> {
        let session = new_session_id()?;
        if let Err(full) = self.uploads.admit(&session, owner, &self.hosted) {
            // Sessions past their expiry that maintenance has not removed yet hold slots that
            // are free by rights. Only when some may be: a refused client costs no disk walk.
            let stale = self.uploads.maybe_expired(self.hosted.upload_expiry);
            if stale.is_empty() {
                return Err(full);
            }
            for s in stale {
                self.expire_upload(&s).await;
            }
            self.uploads.admit(&session, owner, &self.hosted)?;
        }
        let (s, r, o) = (session.clone(), repo.clone(), owner.to_string());
        let created = self
            .disk
            .run(move |store| store.create_upload(&s, &r, &o))
            .await;
        if let Err(e) = created {
            self.close_upload(&session);
            return Err(e.into());
        }
        self.count_open_uploads();
        Ok(session)
    }

    /// Gives back a session's slot (it finished, was cancelled or expired). `false` when it
    /// held none: another request closed it first, and counted it.
    fn close_upload(&self, session: &str) -> bool {
        let closed = self.uploads.close(session);
        self.count_open_uploads();
        closed
    }

    fn count_open_uploads(&self) {
        self.metrics
            .hosted_uploads_in_progress
            .set(i64::try_from(self.uploads.open()).unwrap_or(i64::MAX));
    }

    /// The bytes an upload session of `repo` holds so far.
    pub async fn upload_status(
        &self,
        repo: &RepositoryName,
        session: &str,
    ) -> Result<u64, PushError> {
        self.live_upload(repo, session).await
    }

    /// Appends a chunk to an upload session. With `range` (from `Content-Range`, inclusive),
    /// the chunk must start where the upload ends and be exactly that long: a `content_length`
    /// that says otherwise is refused before anything is written, and a body is cut off as soon
    /// as more bytes than the range holds arrive ([`PushError::ChunkLength`]; the session stays
    /// where it was). Returns the upload's new size.
    pub async fn upload_chunk(
        self: &Arc<Self>,
        repo: &RepositoryName,
        session: &str,
        range: Option<(u64, u64)>,
        content_length: Option<u64>,
        body: BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let (cache, repo, session) = (self.clone(), repo.clone(), session.to_string());
        detached(&self.upload_steps, async move {
            cache
                .upload_chunk_now(&repo, &session, range, content_length, body)
                .await
        })
        .await
    }

    async fn upload_chunk_now(
        &self,
        repo: &RepositoryName,
        session: &str,
        range: Option<(u64, u64)>,
        content_length: Option<u64>,
        body: BoxStream<'_, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let lock = self.uploads.lock_of(session);
        let _writing = lock.lock().await;
        let size = self.live_upload(repo, session).await?;
        // The chunk's announced length, checked before anything is written (a range up to the
        // top of u64 has no length).
        let expected = match range {
            Some((first, _)) if first != size => return Err(PushError::OutOfOrder { size }),
            Some((first, last)) => Some(
                last.checked_sub(first)
                    .and_then(|d| d.checked_add(1))
                    .ok_or(PushError::UnsizedRange { first, last })?,
            ),
            None => None,
        };
        if let (Some(expected), Some(got)) = (expected, content_length) {
            if got != expected {
                return Err(PushError::ChunkLength {
                    expected,
                    got,
                    size,
                });
            }
        }
        let end = self.append(session, size, body, expected).await?;
        if let Some(expected) = expected {
            // Shorter than announced (a longer one was stopped in `append`).
            if end - size != expected {
                self.cut_back(session, size, end - size).await;
                return Err(PushError::ChunkLength {
                    expected,
                    got: end - size,
                    size,
                });
            }
        }
        Ok(end)
    }

    /// Finishes an upload session: appends the last chunk (if any), checks that the whole is
    /// `digest`, and stores it as a blob of `repo`, pinned as hosted content. Nothing is kept
    /// when the digest does not match. Returns the blob's size.
    pub async fn finish_upload(
        self: &Arc<Self>,
        repo: &RepositoryName,
        session: &str,
        digest: &Digest,
        body: BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let (cache, repo, session, digest) = (
            self.clone(),
            repo.clone(),
            session.to_string(),
            digest.clone(),
        );
        detached(&self.upload_steps, async move {
            cache
                .finish_upload_now(&repo, &session, &digest, body)
                .await
        })
        .await
    }

    /// A monolithic upload (`POST ?digest=` with the whole blob): a session of `owner`
    /// started, finished with `body` and, when that fails, cancelled, all in one task. The
    /// client learns no session id, so nothing but this may end the session: a client that
    /// hangs up still gets its blob stored or its session gone. Returns the blob's size.
    pub async fn upload_blob(
        self: &Arc<Self>,
        repo: &RepositoryName,
        owner: &str,
        digest: &Digest,
        body: BoxStream<'static, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let (cache, repo, owner, digest) = (
            self.clone(),
            repo.clone(),
            owner.to_string(),
            digest.clone(),
        );
        detached(&self.upload_steps, async move {
            let session = cache.start_upload(&repo, &owner).await?;
            let finished = cache
                .finish_upload_now(&repo, &session, &digest, body)
                .await;
            if finished.is_err() {
                // A failed digest check removed the session already; anything else leaves it.
                let _ = cache.cancel_upload_now(&repo, &session).await;
            }
            finished
        })
        .await
    }

    async fn finish_upload_now(
        &self,
        repo: &RepositoryName,
        session: &str,
        digest: &Digest,
        body: BoxStream<'_, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let result = self.finish_upload_once(repo, session, digest, body).await;
        self.count_push("blob", result.as_ref().map(|_| ()));
        result
    }

    /// Counts a push of `kind` by its outcome.
    pub(crate) fn count_push(&self, kind: &str, result: Result<(), &PushError>) {
        let outcome = result.err().map_or("ok", PushError::outcome);
        self.metrics
            .hosted_pushes
            .with_label_values(&[kind, outcome])
            .inc();
    }

    /// Counts bytes received by pushes, `stored` or `discarded`.
    pub(crate) fn count_received(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.metrics
                .hosted_received_bytes
                .with_label_values(&[outcome])
                .inc_by(n);
        }
    }

    async fn finish_upload_once(
        &self,
        repo: &RepositoryName,
        session: &str,
        digest: &Digest,
        body: BoxStream<'_, io::Result<Bytes>>,
    ) -> Result<u64, PushError> {
        let lock = self.uploads.lock_of(session);
        let _writing = lock.lock().await;
        let size = self.live_upload(repo, session).await?;
        let end = self.append(session, size, body, None).await?;
        let known = self
            .uploads
            .take_hash(session, Some(end))
            .filter(|_| digest.algorithm() == Algorithm::Sha256)
            .map(Hasher::finish);
        let (s, d) = (session.to_string(), digest.clone());
        let committed = self
            .disk
            .run(move |store| store.commit_upload(&s, &d, known.as_ref()))
            .await;
        self.uploads.forget(session);
        // Once per session: a commit that failed leaves the session on disk for a retried PUT,
        // which must not give its bytes back a second time.
        if self.close_upload(session) {
            self.release(end);
        }
        match committed? {
            None => {
                self.count_received("discarded", end);
                Err(PushError::DigestMismatch(digest.clone()))
            }
            Some(size) => {
                self.count_received("stored", size);
                self.stored_hosted(digest, size);
                self.link_hosted(repo, [digest.clone()]).await?;
                Ok(size)
            }
        }
    }

    /// Cancels an upload session and removes what it held.
    pub async fn cancel_upload(
        self: &Arc<Self>,
        repo: &RepositoryName,
        session: &str,
    ) -> Result<(), PushError> {
        let (cache, repo, session) = (self.clone(), repo.clone(), session.to_string());
        detached(&self.upload_steps, async move {
            cache.cancel_upload_now(&repo, &session).await
        })
        .await
    }

    async fn cancel_upload_now(
        &self,
        repo: &RepositoryName,
        session: &str,
    ) -> Result<(), PushError> {
        let lock = self.uploads.lock_of(session);
        let _writing = lock.lock().await;
        let size = self.live_upload(repo, session).await?;
        self.drop_upload(session, size).await;
        Ok(())
    }

    /// Removes upload sessions idle for longer than `upload_expiry` (the maintenance task runs
    /// this). Sessions busy with a chunk are left for the next run.
    pub async fn expire_uploads(&self) {
        let Ok(all) = self.disk.run(|store| store.uploads()).await else {
            return;
        };
        for (session, info) in all {
            if self.expired(info.touched) {
                self.expire_upload(&session).await;
            }
        }
    }

    /// Removes one upload session if it is idle for longer than `upload_expiry` (as its file
    /// says, read under its lock) and no chunk is being written to it.
    async fn expire_upload(&self, session: &str) {
        let lock = self.uploads.lock_of(session);
        let Ok(_writing) = lock.try_lock() else {
            return;
        };
        let s = session.to_string();
        let info = match self.disk.run(move |store| store.upload_info(&s)).await {
            Ok(Some(info)) => info,
            Ok(None) => {
                // Gone from disk, so it holds no slot by rights, whatever cut short the request
                // that removed it (closing again is a no-op). Its bytes are not known here:
                // those are given back by whoever removed it.
                self.close_upload(session);
                return;
            }
            Err(_) => return,
        };
        if !self.expired(info.touched) {
            return;
        }
        tracing::info!(%session, repository = %info.repository, bytes = info.size, "upload expired");
        self.drop_upload(session, info.size).await;
    }

    /// The size of a session that exists, belongs to `repo` and has not expired (an expired one
    /// is removed on the spot).
    async fn live_upload(&self, repo: &RepositoryName, session: &str) -> Result<u64, PushError> {
        let s = session.to_string();
        let info = self
            .disk
            .run(move |store| store.upload_info(&s))
            .await?
            .ok_or(PushError::UploadUnknown)?;
        if info.repository != repo.as_str() {
            return Err(PushError::UploadUnknown);
        }
        if self.expired(info.touched) {
            self.drop_upload(session, info.size).await;
            return Err(PushError::UploadUnknown);
        }
        Ok(info.size)
    }

    fn expired(&self, touched: SystemTime) -> bool {
        SystemTime::now()
            .duration_since(touched)
            .is_ok_and(|idle| idle > self.hosted.upload_expiry)
    }

    /// Removes a session: its slot and bytes are given back before its directory goes, so that
    /// a request dropped while the directory is removed (a client hanging up on a request that
    /// found its session expired) has given everything back already.
    async fn drop_upload(&self, session: &str, size: u64) {
        self.uploads.forget(session);
        // Two removals racing (a request finding it expired, and maintenance) give its bytes
        // back once.
        if self.close_upload(session) {
            self.count_received("discarded", size);
            self.release(size);
        }
        let s = session.to_string();
        if let Err(e) = self.disk.run(move |store| store.remove_upload(&s)).await {
            tracing::warn!(%session, error = %e, "could not remove upload");
        }
    }

    /// Streams `body` onto the end of a session of `size` bytes, a batch at a time, each batch
    /// first reserved against the hosted budget and hashed as it is written. With `limit`, the
    /// body stops being read at the first byte past it ([`PushError::ChunkLength`]). On any
    /// failure what this call wrote is cut off again (and the session's running hash is
    /// dropped, unless nothing was written: the file is hashed when it finishes). Returns the
    /// new size.
    async fn append(
        &self,
        session: &str,
        size: u64,
        mut body: BoxStream<'_, io::Result<Bytes>>,
        limit: Option<u64>,
    ) -> Result<u64, PushError> {
        let mut end = size;
        let mut hasher = self.uploads.take_hash(session, Some(size));
        let mut batch = BytesMut::new();
        let mut done = false;
        while !done {
            match body.next().await {
                Some(Ok(bytes)) => batch.extend_from_slice(&bytes),
                Some(Err(e)) => {
                    self.cut_back(session, size, end - size).await;
                    return Err(PushError::Body(e));
                }
                None => done = true,
            }
            let received = (end - size).saturating_add(batch.len() as u64);
            if let Some(expected) = limit.filter(|&l| received > l) {
                // What is past the range is never written; what this call wrote goes too.
                if end == size {
                    if let Some(h) = hasher.take() {
                        self.uploads.put_hash(session, size, h);
                    }
                } else {
                    self.cut_back(session, size, end - size).await;
                }
                return Err(PushError::ChunkLength {
                    expected,
                    got: received,
                    size,
                });
            }
            if batch.is_empty() || (!done && batch.len() < WRITE_BATCH) {
                continue;
            }
            let chunk = batch.split().freeze();
            let n = chunk.len() as u64;
            if let Err(e) = self.reserve(n) {
                self.cut_back(session, size, end - size).await;
                return Err(e);
            }
            let s = session.to_string();
            let mut h = hasher.take();
            // Hashed on the blocking thread too: a megabyte of sha256 is no work for a worker.
            let written = self
                .disk
                .run(move |store| {
                    let new_end = store.append_upload(&s, end, &chunk)?;
                    if let Some(h) = h.as_mut() {
                        h.update(&chunk);
                    }
                    Ok((new_end, h))
                })
                .await;
            match written {
                Ok((new_end, h)) => {
                    end = new_end;
                    hasher = h;
                    self.uploads.touch(session);
                }
                Err(e) => {
                    self.release(n);
                    self.cut_back(session, size, end - size).await;
                    return Err(e.into());
                }
            }
        }
        if let Some(h) = hasher {
            self.uploads.put_hash(session, end, h);
        }
        Ok(end)
    }

    /// Cuts a session back to `size` bytes, giving back the `added` bytes reserved.
    async fn cut_back(&self, session: &str, size: u64, added: u64) {
        let s = session.to_string();
        if let Err(e) = self
            .disk
            .run(move |store| store.truncate_upload(&s, size))
            .await
        {
            tracing::warn!(%session, error = %e, "could not cut an upload back");
        }
        self.count_received("discarded", added);
        self.release(added);
    }

    /// Reserves `n` bytes of the hosted budget for an upload.
    fn reserve(&self, n: u64) -> Result<(), PushError> {
        let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        self.within_budget(*uploading, n)?;
        *uploading += n;
        Ok(())
    }

    /// Gives back bytes reserved for uploads.
    fn release(&self, n: u64) {
        let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        *uploading = uploading.saturating_sub(n);
    }

    /// Links digests to a hosted repository.
    pub(crate) async fn link_hosted(
        &self,
        repo: &RepositoryName,
        digests: impl IntoIterator<Item = Digest>,
    ) -> io::Result<()> {
        self.links.add(&self.disk, HOSTED, repo, digests).await?;
        Ok(())
    }
}
