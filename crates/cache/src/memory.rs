//! The memory tier: small objects by digest, weighted by their size.

use std::sync::Arc;

use bytes::Bytes;
use pier_oci::Digest;

/// An object held in memory. `media_type` is set for manifests.
#[derive(Clone, Debug)]
pub struct MemoryObject {
    pub bytes: Bytes,
    pub media_type: Option<Arc<str>>,
}

/// A moka cache of objects up to `max_object_size`, `max_size` bytes in all.
pub(crate) struct MemoryTier {
    cache: moka::future::Cache<Digest, MemoryObject>,
    max_object_size: u64,
}

impl MemoryTier {
    pub(crate) fn new(max_size: u64, max_object_size: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_size)
            .weigher(|_k: &Digest, v: &MemoryObject| {
                u32::try_from(v.bytes.len()).unwrap_or(u32::MAX)
            })
            .build();
        MemoryTier {
            cache,
            max_object_size,
        }
    }

    pub(crate) async fn get(&self, digest: &Digest) -> Option<MemoryObject> {
        self.cache.get(digest).await
    }

    /// Whether the tier holds `digest` (no recency update).
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.cache.contains_key(digest)
    }

    /// The largest object the tier takes (0 when it is off).
    pub(crate) fn max_object_size(&self) -> u64 {
        if self.max_object_size > 0 {
            self.max_object_size
        } else {
            0
        }
    }

    /// Whether an object of this size belongs in memory.
    pub(crate) fn admits(&self, len: u64) -> bool {
        len <= self.max_object_size && self.max_object_size > 0
    }

    pub(crate) async fn insert(&self, digest: Digest, object: MemoryObject) {
        if self.admits(object.bytes.len() as u64) {
            self.cache.insert(digest, object).await;
        }
    }

    pub(crate) async fn remove(&self, digest: &Digest) {
        self.cache.invalidate(digest).await;
    }

    /// Bytes and entries held (moka's estimates, settled by pending maintenance).
    pub(crate) async fn usage(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}
