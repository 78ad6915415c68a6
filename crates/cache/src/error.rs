//! What a cache lookup can fail with.

use std::fmt;
use std::io;
use std::sync::Arc;

use pier_upstream::UpstreamError;

use crate::fill::FillError;

/// A local I/O failure that can be shared by every waiter of one operation: the kind is kept, so
/// that callers decide on it (a full disk is [`io::ErrorKind::StorageFull`]), not on the text.
#[derive(Clone, Debug)]
pub struct IoFailure(Arc<io::Error>);

impl IoFailure {
    pub fn kind(&self) -> io::ErrorKind {
        self.0.kind()
    }
}

impl From<io::Error> for IoFailure {
    fn from(e: io::Error) -> Self {
        IoFailure(Arc::new(e))
    }
}

impl fmt::Display for IoFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why the cache could not answer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// Not in this repository: the upstream says so, or pier holds the digest only for other
    /// repositories and the upstream could not confirm it for this one.
    #[error("not found in this repository")]
    NotFound,
    /// The upstream failed and nothing acceptable is cached.
    #[error(transparent)]
    Upstream(UpstreamError),
    /// A blob download failed before its first byte (bad bytes, or too many downloads).
    #[error(transparent)]
    Fill(FillError),
    /// The cache directory failed.
    #[error("cache I/O error: {0}")]
    Io(IoFailure),
    /// A task pier runs for several requests at once panicked; its waiters get this instead of
    /// hanging. A bug, logged where it happened.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e.into())
    }
}

impl From<FillError> for Error {
    fn from(e: FillError) -> Self {
        match e {
            FillError::Upstream(u) => Error::Upstream(u),
            FillError::Io(io) => Error::Io(io),
            other => Error::Fill(other),
        }
    }
}

impl From<crate::flight::Panicked> for Error {
    fn from(_: crate::flight::Panicked) -> Self {
        Error::Internal("a shared upstream request panicked")
    }
}

impl Error {
    /// An upstream failure, with "not there" as [`Error::NotFound`].
    pub fn from_upstream(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NotFound => Error::NotFound,
            e => Error::Upstream(e),
        }
    }

    /// An upstream outage (unreachable, timeout, 5xx, 429): cached content may stand in.
    pub fn is_outage(&self) -> bool {
        matches!(self, Error::Upstream(e) if e.is_outage())
    }
}

/// Why a push (an upload, a mount, a manifest, a delete) to a hosted repository was refused.
/// Nothing it sent is kept.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// No such upload session in this repository (never was, finished, cancelled or expired).
    #[error("no such upload in this repository")]
    UploadUnknown,
    /// A chunk that does not start where the upload is: the upload holds `size` bytes.
    #[error("chunk does not start at the end of the upload ({size} bytes)")]
    OutOfOrder { size: u64 },
    /// A chunk whose length (its `Content-Length`, or the bytes that arrived) is not the one
    /// its `Content-Range` gave: nothing of it is kept, the upload still holds `size` bytes.
    #[error("chunk does not match its Content-Range: {expected} bytes announced, {got} sent")]
    ChunkLength { expected: u64, got: u64, size: u64 },
    /// A `Content-Range` whose length no chunk can have (`<first>-<last>` up to the top of u64).
    #[error("Content-Range {first}-{last} spans more bytes than a chunk can hold")]
    UnsizedRange { first: u64, last: u64 },
    /// The uploaded bytes are not the digest the client named.
    #[error("uploaded content does not match digest {0}")]
    DigestMismatch(pier_oci::Digest),
    /// The hosted budget (`hosted.max_size`) would be exceeded.
    #[error(
        "hosted storage budget hosted.max_size ({max} bytes) would be exceeded ({used} bytes used)"
    )]
    Budget { max: u64, used: u64 },
    /// Too many upload sessions open: the caller's own (`hosted.max_uploads_per_client`) or the
    /// node's (`hosted.max_uploads`). Nothing was created; a session that finishes, is
    /// cancelled or expires frees a slot.
    #[error("too many upload sessions open: {field} is {limit}; finish or cancel (DELETE) one, or wait until idle ones expire (hosted.upload_expiry)")]
    TooManyUploads { field: &'static str, limit: usize },
    /// A manifest that names a blob or manifest its repository does not hold.
    #[error("manifest refers to {0}, which this repository does not hold")]
    BlobUnknown(pier_oci::Digest),
    /// A manifest that is not one (not JSON of a manifest's shape, no media type, ...).
    #[error("invalid manifest: {0}")]
    ManifestInvalid(&'static str),
    /// A manifest pushed by digest whose bytes have another digest.
    #[error("manifest bytes do not match digest {0}")]
    ManifestDigest(pier_oci::Digest),
    /// Nothing by that reference in this repository (a delete).
    #[error("not found in this repository")]
    NotFound,
    /// The client's body broke off.
    #[error("request body failed: {0}")]
    Body(io::Error),
    /// The cache directory failed.
    #[error("cache I/O error: {0}")]
    Io(IoFailure),
}

impl PushError {
    /// The `outcome` label of a refused push: `budget`, `aborted` (the body broke off),
    /// `failed` (the cache directory) or `invalid` (what the client sent).
    pub fn outcome(&self) -> &'static str {
        match self {
            PushError::Budget { .. } => "budget",
            PushError::Body(_) => "aborted",
            PushError::Io(_) => "failed",
            _ => "invalid",
        }
    }
}

impl From<io::Error> for PushError {
    fn from(e: io::Error) -> Self {
        PushError::Io(e.into())
    }
}

impl From<Error> for PushError {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound => PushError::NotFound,
            Error::Io(io) => PushError::Io(io),
            // A hosted operation asks no upstream and runs no fill; anything else is local.
            other => PushError::Io(io::Error::other(other.to_string()).into()),
        }
    }
}
