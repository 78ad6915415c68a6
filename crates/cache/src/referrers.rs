//! The referrers of a digest (OCI 1.1) in a mirrored repository: the signatures, attestations
//! and SBOMs whose `subject` it is.
//!
//! Asked of the upstream's referrers API; where the upstream has none (404), read from the
//! fallback tag the specification defines (`sha256-<hex>`, an image index); where neither has
//! anything, an empty image index. The answer is kept like a tag's: served from cache within the
//! upstream's `tag_ttl` (signatures are added at any time, so never longer), asked again after,
//! and served stale while the upstream is down, so that an edge node verifies images offline.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use pier_oci::media_type::OCI_INDEX;
use pier_oci::{AcceptSet, Digest, Reference, References, Tag};
use pier_upstream::UpstreamError;

use crate::remote::OwnedRepo;
use crate::store::{RecordName, TagAnswer};
use crate::{Cache, CachedManifest, Error, Freshness, RepoRef, ResolvedManifest, Source};

/// The referrers answer when there are none.
pub const EMPTY_INDEX: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

/// The fallback tag of the referrers of `subject`: `<algorithm>-<hex>`.
pub fn fallback_tag(subject: &Digest) -> Option<Tag> {
    Tag::parse(&format!(
        "{}-{}",
        subject.algorithm().as_str(),
        subject.hex()
    ))
}

impl Cache {
    /// The referrers index of `subject` in `at`'s repository, unfiltered.
    pub async fn referrers(
        self: &Arc<Self>,
        at: RepoRef<'_>,
        subject: &Digest,
    ) -> Result<ResolvedManifest, Error> {
        let name = RecordName::Referrers(subject);
        let record = self
            .tags
            .get(&self.disk, at.upstream, at.repo, name)
            .await?;
        let kept = match record.answers.first() {
            Some(answer) => self
                .cached_answer(answer)
                .await?
                .map(|m| (answer.clone(), m)),
            None => None,
        };
        if let Some((answer, m)) = &kept {
            if at.freshness.allows_cached(name, answer, at.client) {
                return Ok(m.clone());
            }
            if at.client.in_outage() {
                return Ok(self.stale(at, name, &"upstream down", m.clone()));
            }
        }
        let key = format!("{}\n{subject}\nreferrers", at.key());
        let (cache, repo, freshness, s) = (
            self.clone(),
            at.owned(),
            at.freshness.clone(),
            subject.clone(),
        );
        let (asked, joined) = self
            .resolutions
            .run(key, move || async move {
                cache.fetch_referrers(&repo, &freshness, &s).await
            })
            .await;
        match asked.map_err(Error::from).and_then(|r| r) {
            Ok(mut m) => {
                if joined && matches!(m.source, Source::Upstream { .. }) {
                    m.source = Source::Upstream { joined: true };
                }
                Ok(m)
            }
            Err(e) if e.is_outage() => match kept {
                Some((_, m)) => Ok(self.stale(at, name, &e, m)),
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Asks the upstream's referrers API, else the fallback tag; stores and records the answer
    /// and links what it lists to the repository.
    async fn fetch_referrers(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        freshness: &Freshness,
        subject: &Digest,
    ) -> Result<ResolvedManifest, Error> {
        let bytes = match repo.client.get_referrers(&repo.repo, subject).await {
            Ok(m) => m.bytes,
            // No referrers API (Distribution 2.x answers 404; some registries 400 or 405).
            Err(UpstreamError::NotFound | UpstreamError::Status(400 | 405)) => {
                // A digest too long for a tag (sha512: 135 characters) has no fallback tag, so
                // no referrers anyone could have pushed there.
                let Some(tag) = fallback_tag(subject) else {
                    return Ok(Self::unrecorded(Bytes::from_static(EMPTY_INDEX)));
                };
                let at = RepoRef {
                    freshness,
                    ..repo.at()
                };
                let index_only = AcceptSet::from_header(OCI_INDEX);
                match self
                    .resolve_manifest(at, &Reference::Tag(tag), index_only)
                    .await
                {
                    Ok(m) => m.manifest.bytes,
                    Err(Error::NotFound) => Bytes::from_static(EMPTY_INDEX),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(Error::from_upstream(e)),
        };
        if References::parse(&bytes).is_none() {
            return Err(Error::Upstream(UpstreamError::Invalid(
                "referrers answer is not an image index".into(),
            )));
        }
        let digest = Digest::sha256_of(&bytes);
        let manifest = CachedManifest {
            bytes,
            media_type: OCI_INDEX.into(),
        };
        match self.put_manifest(&digest, &manifest).await {
            Ok(()) => {
                let answer = TagAnswer::new(AcceptSet::ALL, &digest, OCI_INDEX, SystemTime::now());
                self.record(repo, RecordName::Referrers(subject), answer)
                    .await;
            }
            Err(e) => tracing::warn!(error = %e, %subject, "could not cache referrers"),
        }
        // What it lists is not linked to the repository: a referrers answer says what refers to
        // a digest, not what the repository holds, and an upstream (or whoever pushed the
        // fallback tag) may list another repository's manifests. Each is linked when fetched
        // from this repository (by warm, offline use included) or confirmed there.
        Ok(ResolvedManifest {
            digest,
            manifest,
            source: Source::Upstream { joined: false },
        })
    }

    /// An answer made up by pier, neither stored nor recorded.
    fn unrecorded(bytes: Bytes) -> ResolvedManifest {
        ResolvedManifest {
            digest: Digest::sha256_of(&bytes),
            manifest: CachedManifest {
                bytes,
                media_type: OCI_INDEX.into(),
            },
            source: Source::Upstream { joined: false },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_index_and_fallback_tag() {
        let refs = References::parse(EMPTY_INDEX).unwrap();
        assert!(refs.manifests.is_empty());
        let d = Digest::sha256_of(b"x");
        assert_eq!(
            fallback_tag(&d).unwrap().as_str(),
            format!("sha256-{}", d.hex())
        );
    }
}
