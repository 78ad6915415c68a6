//! An upstream repository as the cache sees it: the client that reaches it, and how long its tags
//! may be answered without asking it again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::{BoxFuture, FutureExt};
use pier_oci::{Digest, RepositoryName, Tag};
use pier_upstream::{BlobResponse, Upstream, UpstreamError};
use regex::Regex;

use crate::fill::Origin;
use crate::store::{RecordName, TagAnswer};

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
    /// Whether `answer`, cached for `name` (a tag, or a digest's referrers), may be served
    /// without asking `upstream`: within the window, a tag that never moves, or the upstream's
    /// pull budget down to its reserve (spend none of the last pulls on revalidation). Referrers,
    /// and the signature, attestation and fallback tags, move whenever a signature is added, so
    /// they are never immutable.
    pub fn allows_cached(
        &self,
        name: RecordName<'_>,
        answer: &TagAnswer,
        upstream: &Upstream,
    ) -> bool {
        let immutable = match name {
            RecordName::Tag(tag) => {
                !is_attachment_tag(tag)
                    && self
                        .immutable_tags
                        .as_ref()
                        .is_some_and(|re| re.is_match(tag.as_str()))
            }
            RecordName::Referrers(_) => false,
        };
        answer.age_secs(SystemTime::now()) < self.tag_ttl.as_secs()
            || immutable
            || upstream
                .rate_limit_remaining()
                .is_some_and(|r| r <= self.rate_limit_reserve)
    }
}

/// A tag of the sigstore attachment scheme (`sha256-<hex>.sig`, `.att`, `.sbom`) or the OCI
/// referrers fallback (`sha256-<hex>`): it names a digest, and it moves whenever something new is
/// attached to that digest.
pub fn is_attachment_tag(tag: &Tag) -> bool {
    let t = tag.as_str();
    let Some(rest) = t.strip_prefix("sha256-") else {
        return false;
    };
    let hex = rest
        .strip_suffix(".sig")
        .or_else(|| rest.strip_suffix(".att"))
        .or_else(|| rest.strip_suffix(".sbom"))
        .unwrap_or(rest);
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
    /// The request came from a peer of the region, which took this node as the owner: it is
    /// answered from this node's tiers, the shared store and the upstream, never another peer.
    pub from_peer: bool,
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
            freshness: self.freshness.clone(),
            repo: self.repo.clone(),
            from_peer: self.from_peer,
        }
    }
}

/// A [`RepoRef`] that a task started for several requests can keep.
#[derive(Clone)]
pub(crate) struct OwnedRepo {
    pub upstream: Arc<str>,
    pub client: Arc<Upstream>,
    pub freshness: Freshness,
    pub repo: RepositoryName,
    pub from_peer: bool,
}

impl OwnedRepo {
    pub(crate) fn at(&self) -> RepoRef<'_> {
        RepoRef {
            upstream: &self.upstream,
            client: &self.client,
            freshness: &self.freshness,
            repo: &self.repo,
            from_peer: self.from_peer,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_tags() {
        let hex = "a".repeat(64);
        for t in [
            format!("sha256-{hex}"),
            format!("sha256-{hex}.sig"),
            format!("sha256-{hex}.att"),
            format!("sha256-{hex}.sbom"),
        ] {
            assert!(is_attachment_tag(&Tag::parse(&t).unwrap()), "{t}");
        }
        for t in [
            "latest",
            "sha256-abc.sig",
            "v1.2.3",
            &format!("sha256-{hex}.txt"),
        ] {
            assert!(!is_attachment_tag(&Tag::parse(t).unwrap()), "{t}");
        }
    }
}
