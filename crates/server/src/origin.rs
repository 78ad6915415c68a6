//! Blob downloads from an upstream, as the cache's fills consume them.

use std::sync::Arc;

use futures_util::future::{BoxFuture, FutureExt};
use pier_cache::Origin;
use pier_oci::{Digest, RepositoryName};
use pier_upstream::{BlobResponse, Upstream, UpstreamError};

/// The upstream, repository and digest a fill downloads.
pub(crate) struct BlobOrigin {
    pub upstream: Arc<Upstream>,
    pub repo: RepositoryName,
    pub digest: Digest,
}

impl Origin for BlobOrigin {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<BlobResponse, UpstreamError>> {
        let (upstream, repo, digest) = (
            self.upstream.clone(),
            self.repo.clone(),
            self.digest.clone(),
        );
        async move { upstream.get_blob(&repo, &digest, offset).await }.boxed()
    }
}
