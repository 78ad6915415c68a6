//! Manifest and tag resolution: the one place that turns a tag or digest of a repository into the
//! manifest a client gets.
//!
//! A tag's answer depends on what the client accepts: a registry that negotiates like Docker Hub
//! answers a multi-platform tag with an index to clients that take one and with the linux/amd64
//! manifest to clients that do not. So pier keeps one answer per tag and [`AcceptSet`], and a
//! client gets the answer for its own set: from cache while [`Freshness`](crate::Freshness)
//! allows it, else after asking the upstream (a HEAD with the client's set; a GET only when the
//! upstream points at a manifest pier does not hold). Concurrent requests for one tag and set
//! share one upstream exchange. While the upstream is down (or rate limiting), a client gets the
//! best cached answer it accepts, never one it does not.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pier_oci::media_type::{DOCKER_MANIFEST_LIST, OCI_INDEX};
use pier_oci::{AcceptSet, Digest, Reference, References, RepositoryName, Tag};
use pier_upstream::UpstreamError;

use crate::region::peer::PeerError;
use crate::region::Node;
use crate::remote::{is_attachment_tag, OwnedRepo};
use crate::store::{OwnedRecordName, RecordName, TagAnswer, TagRecord};
use crate::{Cache, CachedManifest, Error, RepoRef, Source};

/// A manifest for a client: its digest, bytes and type, and where it came from.
#[derive(Clone, Debug)]
pub struct ResolvedManifest {
    pub digest: Digest,
    pub manifest: CachedManifest,
    pub source: Source,
}

/// A repository's tags as the upstream listed them (every page), sorted.
#[derive(Debug)]
pub struct TagList {
    pub fetched: Instant,
    pub tags: Vec<String>,
}

/// Longest a tag list is answered without asking the upstream again (shorter when the
/// upstream's `tag_ttl` is).
const TAG_LIST_TTL: Duration = Duration::from_secs(30);
/// Most pages of a tag list pier follows.
const TAG_LIST_PAGES: usize = 100;

/// What is being confirmed as present in a repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Blob,
    Manifest,
}

impl Cache {
    /// The manifest `reference` names in `at`'s repository, for a client accepting `accept`.
    ///
    /// By digest: from cache when the repository holds it, else from the upstream. By tag: see
    /// the module documentation. Errors: [`Error::NotFound`] when the upstream says there is no
    /// such manifest there (or pier cannot confirm that the repository holds a digest it has
    /// only for others), [`Error::Upstream`] when the upstream failed and nothing acceptable is
    /// cached.
    pub async fn resolve_manifest(
        self: &Arc<Self>,
        at: RepoRef<'_>,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<ResolvedManifest, Error> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(at, d, accept).await,
            Reference::Tag(t) => self.manifest_by_tag(at, t, accept).await,
        }
    }

    /// Digests are immutable: one the repository holds is answered without asking the upstream.
    async fn manifest_by_digest(
        self: &Arc<Self>,
        at: RepoRef<'_>,
        digest: &Digest,
        accept: AcceptSet,
    ) -> Result<ResolvedManifest, Error> {
        if let Some((manifest, source)) = self.manifest(digest).await? {
            if !self.is_linked(at, digest).await? {
                self.confirm(at, digest, Kind::Manifest).await?;
            }
            return Ok(ResolvedManifest {
                digest: digest.clone(),
                manifest,
                source,
            });
        }
        let reference = Reference::Digest(digest.clone());
        let key = format!("{}\n{}\n{}", at.key(), reference, accept.bits());
        let (cache, repo) = (self.clone(), at.owned());
        let (fetched, joined) = self
            .manifest_fetches
            .run(key, move || async move {
                let owner_key = reference.to_string();
                if let Some(m) = cache
                    .ask_owner(&repo, &reference, &owner_key, accept)
                    .await?
                {
                    return Ok(m);
                }
                cache.fetch_manifest(&repo, &reference, accept).await
            })
            .await;
        let mut m = fetched??;
        if joined {
            m.source = Source::Upstream { joined: true };
        }
        Ok(m)
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        at: RepoRef<'_>,
        tag: &Tag,
        accept: AcceptSet,
    ) -> Result<ResolvedManifest, Error> {
        let record = self
            .tags
            .get(&self.disk, at.upstream, at.repo, RecordName::Tag(tag))
            .await?;
        // The manifest this accept set's answer names, if pier still holds it: the answer
        // itself while the tag is fresh.
        let mut known = None;
        if let Some(answer) = record.answer_for(accept) {
            if let Some(m) = self.cached_answer(answer).await? {
                if at
                    .freshness
                    .allows_cached(RecordName::Tag(tag), answer, at.client)
                {
                    return Ok(m);
                }
                known = Some(m.digest);
            }
        }
        if at.client.in_outage() {
            // A black-holed link would cost every request a connect timeout: answer from cache
            // while the last failure is recent, if anything cached is acceptable.
            let record = self.offline_record(at, tag, record.clone()).await?;
            if let Some(m) = self.best_offline(at, &record, accept).await? {
                return Ok(self.stale(at, RecordName::Tag(tag), &"upstream down", m));
            }
        }
        let key = format!("{}\n{tag}\n{}", at.key(), accept.bits());
        let (cache, repo, t) = (self.clone(), at.owned(), tag.clone());
        // Ask with a HEAD first when some answer for this tag is cached: the upstream may
        // point this accept set at a manifest pier holds, and a HEAD is not a pull on Docker Hub.
        let head_first = !record.answers.is_empty();
        let (asked, joined) = self
            .resolutions
            .run(key, move || async move {
                if let Some(m) = cache.tag_from_region(&repo, &t, accept).await? {
                    return Ok(m);
                }
                cache
                    .ask_upstream(&repo, &t, accept, known, head_first)
                    .await
            })
            .await;
        match asked.map_err(Error::from).and_then(|r| r) {
            Ok(mut m) => {
                if joined && matches!(m.source, Source::Upstream { .. }) {
                    m.source = Source::Upstream { joined: true };
                }
                Ok(m)
            }
            Err(e) if e.is_outage() => {
                let record = self.offline_record(at, tag, record).await?;
                match self.best_offline(at, &record, accept).await? {
                    Some(m) => Ok(self.stale(at, RecordName::Tag(tag), &e, m)),
                    // A signature or attestation pier never saw is, as far as anyone can tell
                    // now, absent: the client's policy then decides (a policy that requires one
                    // refuses, one that does not pulls on), where a gateway error would fail
                    // every pull of an unsigned image by a client that looks for signatures.
                    None if is_attachment_tag(tag) => Err(Error::NotFound),
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// When this node last confirmed `tag`'s answer for `accept` with the upstream (Unix
    /// seconds), for peers that keep the answer for what is left of its window.
    pub async fn tag_fetched_at(
        &self,
        at: RepoRef<'_>,
        tag: &Tag,
        accept: AcceptSet,
    ) -> Option<u64> {
        let record = self
            .tags
            .get(&self.disk, at.upstream, at.repo, RecordName::Tag(tag))
            .await
            .ok()?;
        record.answer_for(accept).map(|a| a.fetched_at)
    }

    /// The record to answer from while the upstream cannot be asked: with a shared store,
    /// what the whole region has seen of the tag.
    async fn offline_record(
        &self,
        at: RepoRef<'_>,
        tag: &Tag,
        local: Arc<TagRecord>,
    ) -> Result<Arc<TagRecord>, Error> {
        match self.region.as_ref().and_then(|r| r.shared.as_ref()) {
            Some(_) => self.region_record(&at.owned(), RecordName::Tag(tag)).await,
            None => Ok(local),
        }
    }

    /// A tag's answer from the region, before this node asks the upstream: from the tag's owner
    /// when that is another node (it revalidates for the whole region), else the region's
    /// record while it is fresh. `None`: this node asks the upstream itself.
    async fn tag_from_region(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        tag: &Tag,
        accept: AcceptSet,
    ) -> Result<Option<ResolvedManifest>, Error> {
        let Some(region) = &self.region else {
            return Ok(None);
        };
        let reference = Reference::Tag(tag.clone());
        let key = format!("{}:{tag}", repo.key());
        if let Some(m) = self.ask_owner(repo, &reference, &key, accept).await? {
            return Ok(Some(m));
        }
        if region.shared.is_none() {
            return Ok(None);
        }
        let record = self.region_record(repo, RecordName::Tag(tag)).await?;
        let Some(answer) = record.answer_for(accept) else {
            return Ok(None);
        };
        if !repo
            .freshness
            .allows_cached(RecordName::Tag(tag), answer, &repo.client)
        {
            return Ok(None);
        }
        let Some(m) = self.cached_answer(answer).await? else {
            return Ok(None);
        };
        // The region fetched it from this repository.
        self.link_manifest(repo, &m.digest, &m.manifest).await;
        Ok(Some(m))
    }

    /// A manifest from the owner of `key` when that is another node, stored here with what
    /// the owner said of it. `None` when this node owns it, or no owner answered.
    async fn ask_owner(
        &self,
        repo: &OwnedRepo,
        reference: &Reference,
        key: &str,
        accept: AcceptSet,
    ) -> Result<Option<ResolvedManifest>, Error> {
        let Some(region) = self.region.as_ref().filter(|_| !repo.from_peer) else {
            return Ok(None);
        };
        let Some(client) = &region.peers else {
            return Ok(None);
        };
        for node in region.owners(key) {
            let Node::Peer(peer) = node else { break };
            let answer = client
                .manifest(
                    &peer,
                    &repo.upstream,
                    &repo.repo,
                    reference,
                    accept,
                    &self.metrics,
                )
                .await;
            let pm = match answer {
                Ok(pm) => pm,
                Err(PeerError::NotFound) => return Err(Error::NotFound),
                Err(PeerError::Unavailable(why)) => {
                    tracing::debug!(%peer, %reference, %why, "owner unavailable; next");
                    region.mark_down(&peer);
                    continue;
                }
            };
            self.metrics
                .region_lookups
                .with_label_values(&["owner_hit"])
                .inc();
            let manifest = CachedManifest {
                bytes: pm.bytes,
                media_type: pm.media_type.into(),
            };
            if let Err(e) = self.store_manifest(&pm.digest, &manifest).await {
                tracing::warn!(error = %e, digest = %pm.digest, "could not cache manifest");
            }
            if let Reference::Tag(tag) = reference {
                let now = SystemTime::now();
                let mut answer = TagAnswer::new(accept, &pm.digest, &manifest.media_type, now);
                // Kept for what is left of the owner's window, not a window of its own.
                answer.fetched_at = pm.fetched_at.unwrap_or(0).min(answer.fetched_at);
                let name = RecordName::Tag(tag);
                if let Err(e) = self
                    .tags
                    .record(&self.disk, &repo.upstream, &repo.repo, name, [answer])
                    .await
                {
                    tracing::warn!(error = %e, %name, "could not record tag");
                }
            }
            // The owner answered for this repository: what it sent is linked to it.
            let mut digests = vec![pm.digest.clone()];
            if let Some(refs) = References::parse(&manifest.bytes) {
                digests.extend(refs.held_digests().cloned());
            }
            self.add_links(&repo.upstream, &repo.repo, digests, false)
                .await;
            return Ok(Some(ResolvedManifest {
                digest: pm.digest,
                manifest,
                source: Source::Upstream { joined: false },
            }));
        }
        Ok(None)
    }

    /// One exchange with the upstream for a tag and accept set, shared by concurrent callers:
    /// revalidate with a HEAD, and GET only what pier does not hold. Records the answer.
    async fn ask_upstream(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        tag: &Tag,
        accept: AcceptSet,
        known: Option<Digest>,
        head_first: bool,
    ) -> Result<ResolvedManifest, Error> {
        let reference = Reference::Tag(tag.clone());
        if head_first {
            let head = repo
                .client
                .head_manifest(&repo.repo, &reference, &accept.header())
                .await;
            if known.is_some() {
                let result = match &head {
                    Ok(h) if Some(&h.digest) == known.as_ref() => "unchanged",
                    Ok(_) => "changed",
                    Err(_) => "failed",
                };
                self.metrics
                    .tag_revalidations
                    .with_label_values(&[&repo.upstream, result])
                    .inc();
            }
            match head {
                Ok(h) => {
                    if let Some((manifest, source)) = self.manifest(&h.digest).await? {
                        // The upstream answers this set with a manifest pier holds.
                        let answer = TagAnswer::new(
                            accept,
                            &h.digest,
                            &manifest.media_type,
                            SystemTime::now(),
                        );
                        // Links first: see fetch_manifest.
                        self.link_manifest(repo, &h.digest, &manifest).await;
                        self.record(repo, RecordName::Tag(tag), answer).await;
                        return Ok(ResolvedManifest {
                            digest: h.digest,
                            manifest,
                            source,
                        });
                    }
                }
                // A HEAD without a digest tells nothing: the GET below will.
                Err(UpstreamError::Invalid(_)) => {}
                Err(e) => return Err(Error::from_upstream(e)),
            }
        }
        self.fetch_manifest(repo, &reference, accept).await
    }

    /// GETs a manifest, checks its digest, stores it, links it and what it refers to to the
    /// repository, and records the tag's answer for `accept`.
    async fn fetch_manifest(
        self: &Arc<Self>,
        repo: &OwnedRepo,
        reference: &Reference,
        accept: AcceptSet,
    ) -> Result<ResolvedManifest, Error> {
        let m = repo
            .client
            .get_manifest(&repo.repo, reference, &accept.header())
            .await
            .map_err(Error::from_upstream)?;
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => m.digest_header.clone(),
        };
        let digest = match expected {
            Some(d) if d.verifies(&m.bytes) => d,
            Some(_) => {
                return Err(Error::Upstream(UpstreamError::Invalid(
                    "manifest bytes do not match their digest".into(),
                )))
            }
            None => Digest::sha256_of(&m.bytes),
        };
        let manifest = CachedManifest {
            bytes: m.bytes,
            media_type: m.media_type.into(),
        };
        // Links before the tag's record: a repository's first links, loaded with no links file,
        // are derived from its tag records (a cache of an earlier pier), and what is derived
        // counts as linked already, so it would never be shared with the region.
        let stored = self.put_manifest(&digest, &manifest).await;
        self.link_manifest(repo, &digest, &manifest).await;
        match stored {
            // The client still gets the verified bytes; only the cache goes without.
            Err(e) => tracing::warn!(error = %e, %digest, "could not cache manifest"),
            Ok(()) => {
                if let Reference::Tag(tag) = reference {
                    let answer =
                        TagAnswer::new(accept, &digest, &manifest.media_type, SystemTime::now());
                    self.record(repo, RecordName::Tag(tag), answer).await;
                }
            }
        }
        Ok(ResolvedManifest {
            digest,
            manifest,
            source: Source::Upstream { joined: false },
        })
    }

    /// A cached answer's manifest, if pier still holds it.
    pub(crate) async fn cached_answer(
        &self,
        answer: &TagAnswer,
    ) -> Result<Option<ResolvedManifest>, Error> {
        let Ok(digest) = answer.digest.parse::<Digest>() else {
            return Ok(None);
        };
        Ok(self
            .manifest(&digest)
            .await?
            .map(|(manifest, source)| ResolvedManifest {
                digest,
                manifest,
                source,
            }))
    }

    /// The best cached answer for a client of `accept` while the upstream cannot be asked: its
    /// own set's answer; else the newest other answer of a type it accepts; else, for a client
    /// that takes no index, the linux/amd64 manifest of a cached index (what Docker Hub and the
    /// Distribution registry choose for such a client). Never a manifest it does not accept.
    async fn best_offline(
        &self,
        at: RepoRef<'_>,
        record: &TagRecord,
        accept: AcceptSet,
    ) -> Result<Option<ResolvedManifest>, Error> {
        let mut answers: Vec<&TagAnswer> = record.answers.iter().collect();
        // Its own set first, then the newest.
        answers.sort_by_key(|a| (a.accept != accept.bits(), std::cmp::Reverse(a.fetched_at)));
        for answer in &answers {
            if answer.accept == accept.bits() || accept.accepts(&answer.media_type) {
                if let Some(m) = self.cached_answer(answer).await? {
                    return Ok(Some(m));
                }
            }
        }
        if accept.takes_index() {
            return Ok(None);
        }
        for answer in answers
            .iter()
            .filter(|a| a.media_type == OCI_INDEX || a.media_type == DOCKER_MANIFEST_LIST)
        {
            let Some(index) = self.cached_answer(answer).await? else {
                continue;
            };
            let Some(refs) = References::parse(&index.manifest.bytes) else {
                continue;
            };
            let Some(child) = refs.platform_child("linux", "amd64") else {
                continue;
            };
            if let Some((manifest, source)) = self.manifest(&child.digest).await? {
                if accept.accepts(&manifest.media_type) && self.is_linked(at, &child.digest).await?
                {
                    return Ok(Some(ResolvedManifest {
                        digest: child.digest.clone(),
                        manifest,
                        source,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// A cached answer served because the upstream could not be asked: logged and counted.
    pub(crate) fn stale(
        &self,
        at: RepoRef<'_>,
        name: RecordName<'_>,
        why: &dyn std::fmt::Display,
        m: ResolvedManifest,
    ) -> ResolvedManifest {
        let kind = match name {
            RecordName::Tag(_) => "manifest",
            RecordName::Referrers(_) => "referrers",
        };
        tracing::warn!(upstream = %at.upstream, repo = %at.repo, what = %name, error = %why, "serving a cached answer: upstream unavailable");
        self.metrics
            .stale_served
            .with_label_values(&[at.upstream, kind])
            .inc();
        m
    }

    /// Records a tag's (or referrers') answer, on this node and for the region; a failure to
    /// write costs only the cache.
    pub(crate) async fn record(&self, repo: &OwnedRepo, name: RecordName<'_>, answer: TagAnswer) {
        match self
            .tags
            .record(&self.disk, &repo.upstream, &repo.repo, name, [answer])
            .await
        {
            Ok(record) => self.share_record(repo, name, record),
            Err(e) => {
                tracing::warn!(error = %e, upstream = %repo.upstream, repo = %repo.repo, %name, "could not record tag")
            }
        }
    }

    /// Writes a record to the region's shared store, in the background.
    fn share_record(&self, repo: &OwnedRepo, name: RecordName<'_>, record: Arc<TagRecord>) {
        let Some(region) = self.region.as_ref().filter(|r| r.shared.is_some()) else {
            return;
        };
        let (region, upstream, r) = (region.clone(), repo.upstream.clone(), repo.repo.clone());
        let name = OwnedRecordName::from(name);
        tokio::spawn(async move {
            if let Some(shared) = &region.shared {
                shared
                    .put_record(&upstream, &r, name.borrow(), &record)
                    .await;
            }
        });
    }

    /// The region's answers for a tag (or referrers), merged into this node's record; the
    /// merged record. Without a shared store, this node's record.
    pub(crate) async fn region_record(
        &self,
        repo: &OwnedRepo,
        name: RecordName<'_>,
    ) -> Result<Arc<TagRecord>, Error> {
        let shared = self.region.as_ref().and_then(|r| r.shared.as_ref());
        let theirs = match shared {
            Some(s) => s.record(&repo.upstream, &repo.repo, name).await,
            None => None,
        };
        let answers = theirs.map(|t| t.answers).unwrap_or_default();
        Ok(self
            .tags
            .record(&self.disk, &repo.upstream, &repo.repo, name, answers)
            .await?)
    }

    /// Links a manifest fetched from a repository, and what it refers to, to that repository.
    pub(crate) async fn link_manifest(
        &self,
        repo: &OwnedRepo,
        digest: &Digest,
        manifest: &CachedManifest,
    ) {
        let mut digests = vec![digest.clone()];
        if let Some(refs) = References::parse(&manifest.bytes) {
            digests.extend(refs.held_digests().cloned());
        }
        self.add_links(&repo.upstream, &repo.repo, digests, true)
            .await;
    }

    /// Links digests the upstream served from `at`'s repository.
    pub(crate) async fn link(&self, at: RepoRef<'_>, digests: impl IntoIterator<Item = Digest>) {
        self.add_links(at.upstream, at.repo, digests.into_iter().collect(), true)
            .await;
    }

    /// The one way links are added: on this node, and (`share`) for the region, when new.
    async fn add_links(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        digests: Vec<Digest>,
        share: bool,
    ) {
        let new = match self.links.add(&self.disk, upstream, repo, digests).await {
            Ok(new) => new,
            Err(e) => {
                tracing::warn!(error = %e, %upstream, %repo, "could not record repository links");
                return;
            }
        };
        let Some(region) = self.region.as_ref().filter(|r| share && r.shared.is_some()) else {
            return;
        };
        if new.is_empty() {
            return;
        }
        let (region, upstream, repo) = (region.clone(), upstream.to_string(), repo.clone());
        tokio::spawn(async move {
            if let Some(shared) = &region.shared {
                shared.put_links(&upstream, &repo, &new).await;
            }
        });
    }

    /// Whether `at`'s repository is known to hold `digest`: to this node, or to the region.
    pub(crate) async fn is_linked(&self, at: RepoRef<'_>, digest: &Digest) -> Result<bool, Error> {
        if self
            .links
            .contains(&self.disk, at.upstream, at.repo, digest)
            .await?
        {
            return Ok(true);
        }
        let Some(shared) = self.region.as_ref().and_then(|r| r.shared.as_ref()) else {
            return Ok(false);
        };
        if !shared.is_linked(at.upstream, at.repo, digest).await {
            return Ok(false);
        }
        self.add_links(at.upstream, at.repo, vec![digest.clone()], false)
            .await;
        Ok(true)
    }

    /// Asks the upstream whether `at`'s repository holds `digest` (a HEAD), and links it if so.
    /// Anything but a yes, an unreachable upstream included, is [`Error::NotFound`]: pier never
    /// hands out bytes it holds for one repository under another it cannot vouch for.
    pub(crate) async fn confirm(
        &self,
        at: RepoRef<'_>,
        digest: &Digest,
        kind: Kind,
    ) -> Result<(), Error> {
        let key = format!("{}\n{digest}\n{kind:?}", at.key());
        let (repo, d) = (at.owned(), digest.clone());
        let (asked, _) = self
            .confirmations
            .run(key, move || async move {
                let answer = match kind {
                    Kind::Blob => repo.client.head_blob(&repo.repo, &d).await.map(|_| ()),
                    Kind::Manifest => repo
                        .client
                        .head_manifest(
                            &repo.repo,
                            &Reference::Digest(d.clone()),
                            &AcceptSet::ALL.header(),
                        )
                        .await
                        .map(|_| ()),
                };
                answer.map_err(|e| {
                    tracing::debug!(repo = %repo.key(), digest = %d, error = %e, "digest not confirmed for repository");
                    Error::NotFound
                })
            })
            .await;
        asked.map_err(Error::from).and_then(|r| r)?;
        self.link(at, [digest.clone()]).await;
        Ok(())
    }

    /// The tags of `at`'s repository, sorted: kept for a short while, fetched once for
    /// concurrent callers (every page the upstream has), and served stale while the upstream
    /// is down. pier pages the list itself, so `n` and `last` work whatever the upstream
    /// supports.
    pub async fn tag_list(
        self: &Arc<Self>,
        at: RepoRef<'_>,
    ) -> Result<(Arc<TagList>, Source), Error> {
        let key = at.key();
        let kept = self.tag_lists.get(&key).await;
        let ttl = TAG_LIST_TTL.min(at.freshness.tag_ttl);
        if let Some(list) = kept.as_ref().filter(|l| l.fetched.elapsed() < ttl) {
            return Ok((list.clone(), Source::Memory));
        }
        let (cache, repo, k) = (self.clone(), at.owned(), key.clone());
        let (fetched, joined) = self
            .tag_list_fetches
            .run(key, move || async move {
                let list = Arc::new(fetch_tag_list(&repo).await?);
                cache.tag_lists.insert(k, list.clone()).await;
                Ok(list)
            })
            .await;
        match fetched.map_err(Error::from).and_then(|r| r) {
            Ok(list) => Ok((list, Source::Upstream { joined })),
            Err(e) if e.is_outage() => match kept {
                Some(list) => {
                    tracing::warn!(upstream = %at.upstream, repo = %at.repo, error = %e, "serving cached tag list: upstream unavailable");
                    self.metrics
                        .stale_served
                        .with_label_values(&[at.upstream, "tags"])
                        .inc();
                    Ok((list, Source::Memory))
                }
                None => Err(e),
            },
            Err(e) => Err(e),
        }
    }
}

/// Every page of a repository's tag list (following the upstream's `Link`s as given, whatever
/// its cursor), sorted and without duplicates.
async fn fetch_tag_list(repo: &OwnedRepo) -> Result<TagList, Error> {
    #[derive(serde::Deserialize)]
    struct Page {
        #[serde(default)]
        tags: Option<Vec<String>>,
    }
    let mut tags = Vec::new();
    let mut page: Option<String> = None;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..TAG_LIST_PAGES {
        let (body, next) = repo
            .client
            .tags_list(&repo.repo, page.as_deref())
            .await
            .map_err(Error::from_upstream)?;
        let listed: Page = serde_json::from_slice(&body)
            .map_err(|_| Error::Upstream(UpstreamError::Invalid("tag list is not JSON".into())))?;
        tags.extend(listed.tags.unwrap_or_default());
        // A Link seen before would loop: the list is complete.
        match next.filter(|n| seen.insert(n.clone())) {
            Some(n) => page = Some(n),
            None => break,
        }
    }
    tags.sort();
    tags.dedup();
    Ok(TagList {
        fetched: Instant::now(),
        tags,
    })
}
