//! A fill: one upstream download of a blob into a temporary file, which any number of readers
//! follow while it grows.
//!
//! The fill runs on its own task and belongs to pier, not to the request that started it: a
//! client that goes away does not stop it. It checks size and digest as bytes arrive, resumes a
//! broken download with a Range request from the byte it reached, and moves the file into the
//! store only once it verified. Readers learn of progress through a `watch` channel and read the
//! bytes from the file itself, so a reader that joins late costs no memory of its own.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Buf;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use pier_oci::{Digest, Hasher};
use pier_upstream::{BlobResponse, UpstreamError};
use tokio::sync::watch;

use crate::error::IoFailure;

/// Where a fill gets its bytes: an upstream download that can start at an offset.
pub trait Origin: Send + Sync + 'static {
    /// Starts a download at byte `offset` (the origin may ignore it and start at 0; the fill
    /// then skips what it already has).
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<BlobResponse, UpstreamError>>;

    /// Whether what this origin brings should also go to the region's shared store: true once
    /// it fetched from the upstream, false while only a peer or the store itself answered.
    fn shares(&self) -> bool {
        false
    }

    /// The bytes this origin brought did not verify (wrong digest, more than announced, a
    /// range other than asked for, a size other than an earlier attempt's):
    /// nothing of them is kept. An origin with other sources (a region's) stops trusting the
    /// ones that sent them, so that the next fill of the digest does not fail the same way.
    fn rejected(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// How hard a fill tries before giving up.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Failed attempts in a row (without new bytes in between) before the fill fails.
    pub attempts: u32,
    /// Pause before the first retry; doubled for each further one, up to 5 s.
    pub base_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 3,
            base_delay: Duration::from_millis(200),
        }
    }
}

/// Why a fill failed. Nothing of a failed fill is kept.
#[derive(Clone, Debug)]
pub enum FillError {
    Upstream(UpstreamError),
    /// The bytes did not hash to the digest asked for.
    DigestMismatch {
        actual: Digest,
    },
    /// More or fewer bytes than the upstream announced.
    SizeMismatch {
        expected: u64,
        got: u64,
    },
    /// Local I/O (disk full, permissions).
    Io(IoFailure),
    /// Too many fills running and queued: try again shortly.
    Busy,
    /// The fill's task panicked (a bug; logged). Its readers get this instead of hanging.
    Panicked,
}

impl std::fmt::Display for FillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillError::Upstream(e) => e.fmt(f),
            FillError::DigestMismatch { actual } => {
                write!(f, "upstream content hashes to {actual}")
            }
            FillError::SizeMismatch { expected, got } => {
                write!(
                    f,
                    "upstream announced {expected} bytes and sent at least {got}"
                )
            }
            FillError::Io(e) => write!(f, "cache I/O error: {e}"),
            FillError::Busy => {
                f.write_str("too many upstream downloads in progress; try again shortly")
            }
            FillError::Panicked => f.write_str("the download task failed unexpectedly"),
        }
    }
}

impl std::error::Error for FillError {}

/// Where a fill stands, as readers see it.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// Blob size, once the upstream said.
    pub total: Option<u64>,
    /// Bytes in the file so far (all hashed).
    pub written: u64,
    pub phase: Phase,
}

#[derive(Clone, Debug)]
pub(crate) enum Phase {
    /// Waiting for the upstream's first answer.
    Connecting,
    Streaming,
    /// Every byte written and the digest verified; being committed to the store.
    Verified,
    /// Verified and in the store.
    Complete,
    Failed(FillError),
}

/// A fill in progress, shared by its task and its readers.
pub(crate) struct Fill {
    pub digest: Digest,
    /// The temporary file and its path: created by the fill's task (never under the fills
    /// lock), set before the phase leaves `Connecting`.
    pub temp: OnceLock<(Arc<File>, PathBuf)>,
    pub progress: watch::Sender<Progress>,
    /// Set by a purge of this digest while the fill runs: what it downloads is not kept.
    pub purged: AtomicBool,
}

impl Fill {
    pub(crate) fn new(digest: Digest) -> Fill {
        let (progress, _) = watch::channel(Progress {
            total: None,
            written: 0,
            phase: Phase::Connecting,
        });
        Fill {
            digest,
            temp: OnceLock::new(),
            progress,
            purged: AtomicBool::new(false),
        }
    }

    /// The file readers follow, once the fill's task created it.
    pub(crate) fn file(&self) -> Option<Arc<File>> {
        self.temp.get().map(|(f, _)| f.clone())
    }

    /// Downloads the whole blob into the temporary file and checks it. Does not commit.
    /// Returns how many times it resumed.
    pub(crate) async fn download(
        &self,
        file: &File,
        origin: &dyn Origin,
        policy: &RetryPolicy,
    ) -> Result<u32, FillError> {
        let mut hasher = Hasher::new(self.digest.algorithm());
        let mut written = 0u64;
        let mut total: Option<u64> = None;
        let mut failures = 0u32;
        let mut resumes = 0u32;
        loop {
            let before = written;
            let error = match origin.open(written).await {
                Err(e) => e,
                Ok(resp) => {
                    if written > 0 {
                        resumes += 1;
                        tracing::info!(digest = %self.digest, offset = written, start = resp.start, "resuming fill");
                    }
                    match (total, resp.total) {
                        (Some(t), Some(n)) if t != n => {
                            origin.rejected().await;
                            return Err(FillError::Upstream(UpstreamError::Invalid(format!(
                                "blob size changed from {t} to {n} between attempts"
                            ))));
                        }
                        (None, Some(n)) => total = Some(n),
                        _ => {}
                    }
                    if resp.start > written {
                        origin.rejected().await;
                        return Err(FillError::Upstream(UpstreamError::Invalid(
                            "upstream answered a range past the one asked for".into(),
                        )));
                    }
                    self.progress.send_modify(|p| {
                        p.total = total;
                        p.phase = Phase::Streaming;
                    });
                    // An upstream that ignored the Range sends bytes we already have: skip them.
                    let mut skip = written - resp.start;
                    let mut body = resp.body;
                    let mut broke = None;
                    while let Some(item) = body.next().await {
                        let mut chunk = match item {
                            Ok(c) => c,
                            Err(e) => {
                                broke = Some(e);
                                break;
                            }
                        };
                        if skip > 0 {
                            let n = skip.min(chunk.len() as u64);
                            chunk.advance(n as usize);
                            skip -= n;
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        let got = written + chunk.len() as u64;
                        if let Some(expected) = total.filter(|t| got > *t) {
                            origin.rejected().await;
                            return Err(FillError::SizeMismatch { expected, got });
                        }
                        hasher.update(&chunk);
                        // A page-cache write; cheap next to the network read that produced it.
                        file.write_all_at(&chunk, written)
                            .map_err(|e| FillError::Io(e.into()))?;
                        written = got;
                        self.progress.send_modify(|p| p.written = written);
                    }
                    match broke {
                        None if total.is_none_or(|t| written == t) => break,
                        None => UpstreamError::Transport("upstream body ended early".into()),
                        Some(e) => e,
                    }
                }
            };
            if written > before {
                failures = 0;
            }
            if !error.is_retryable() || failures >= policy.attempts {
                return Err(FillError::Upstream(error));
            }
            let delay = policy
                .base_delay
                .saturating_mul(1 << failures.min(5))
                .min(Duration::from_secs(5));
            failures += 1;
            tracing::warn!(digest = %self.digest, offset = written, error = %error, "upstream download broke; retrying");
            tokio::time::sleep(delay).await;
        }
        let actual = hasher.finish();
        if actual != self.digest {
            origin.rejected().await;
            return Err(FillError::DigestMismatch { actual });
        }
        Ok(resumes)
    }
}
