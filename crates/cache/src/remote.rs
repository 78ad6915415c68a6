//! An upstream repository as the cache sees it: the client that reaches it, and how long its tags
//! may be answered without asking it again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt};
use pier_oci::{Digest, RepositoryName, Tag};
use pier_upstream::{BlobResponse, Upstream, UpstreamError};
use regex::Regex;

use crate::fill::Origin;
use crate::store::TagAnswer;

/// How fresh an upstream's tags must be. [`Freshness::allows_cached`] is the one place that
/// decides whether a cached tag answer is served without asking the upstream.
#[derive(Clone, Debug)]
pub struct Freshness {
    /// How long a tag is answered from cache before pier asks the upstream again.
    pub tag_ttl: Duration,
    /// Tags matching this (say `^v?\d+\.\d+\.\d+$`) are never revalidated once cached.
    pub immutable_tags: Option<Regex>,
    /// When the upstream reports this many pulls or fewer left (Docker Hub's
    /// `ratelimit-remaining`), cached tags are served without revalidation.
    pub rate_limit_reserve: u64,
}

impl Default for Freshness {
    /// A 5 minute window, no immutable tags, a reserve of 10 pulls.
    fn default() -> Self {
        Freshness {
            tag_ttl: Duration::from_secs(300),
            immutable_tags: None,
            rate_limit_reserve: 10,
        }
    }
}

impl Freshness {
    /// Whether `answer`, cached for `tag`, may be served without asking `upstream`: within the
    /// window, a tag that never moves, or the upstream's pull budget down to its reserve (spend
    /// none of the last pulls on revalidation).
    pub fn allows_cached(&self, tag: &Tag, answer: &TagAnswer, upstream: &Upstream) -> bool {
        answer.age_secs(SystemTime::now()) < self.tag_ttl.as_secs()
            || self
                .immutable_tags
                .as_ref()
                .is_some_and(|re| re.is_match(tag.as_str()))
            || upstream
                .rate_limit_remaining()
                .is_some_and(|r| r <= self.rate_limit_reserve)
    }
}

/// One repository of one upstream: where tags are resolved, digests are linked and fills fetch.
#[derive(Clone, Copy)]
pub struct RepoRef<'a> {
    /// The upstream's configured name (`docker.io`, `ghcr.io`).
    pub upstream: &'a str,
    pub client: &'a Arc<Upstream>,
    pub freshness: &'a Freshness,
    /// The repository as the upstream names it (`library/nginx`).
    pub repo: &'a RepositoryName,
}

impl RepoRef<'_> {
    /// The key of this repository in the cache's maps.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.upstream, self.repo)
    }

    pub(crate) fn owned(&self) -> OwnedRepo {
        OwnedRepo {
            upstream: self.upstream.into(),
            client: self.client.clone(),
            repo: self.repo.clone(),
        }
    }
}

/// A [`RepoRef`] that a task started for several requests can keep.
#[derive(Clone)]
pub(crate) struct OwnedRepo {
    pub upstream: Arc<str>,
    pub client: Arc<Upstream>,
    pub repo: RepositoryName,
}

impl OwnedRepo {
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.upstream, self.repo)
    }
}

/// A blob download from an upstream repository, as a fill consumes it.
pub(crate) struct UpstreamOrigin {
    pub client: Arc<Upstream>,
    pub repo: RepositoryName,
    pub digest: Digest,
}

impl Origin for UpstreamOrigin {
    fn open(&self, offset: u64) -> BoxFuture<'static, Result<BlobResponse, UpstreamError>> {
        let (client, repo, digest) = (self.client.clone(), self.repo.clone(), self.digest.clone());
        async move { client.get_blob(&repo, &digest, offset).await }.boxed()
    }
}
