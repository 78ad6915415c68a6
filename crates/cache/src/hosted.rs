//! Hosted repositories: what clients push to pier, beside what it mirrors.
//!
//! A hosted repository never meets an upstream: its manifests, tags and blobs are what was pushed
//! (or mounted) into it, nothing else. Its content lives in the same content-addressed store as
//! mirrored content, written once, but is *pinned* in the index: the mirror's LRU never evicts
//! it, and it counts against its own budget (`hosted.max_size`), checked before anything is
//! written. Its tags are whole records written only here ([`Cache::put_hosted_manifest`] and
//! the deletes), never revalidated; its links say which digests it holds, as for a mirrored
//! repository, under the pseudo-upstream [`HOSTED`].

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use pier_oci::{AcceptSet, Digest, Reference, References, RepositoryName, Tag};

use crate::error::PushError;
use crate::memory::MemoryObject;
use crate::store::{RecordName, TagAnswer, TagRecord};
use crate::uploads::detached;
use crate::{Blob, Cache, Error, RepoRef, ResolvedManifest};

/// The name hosted repositories are kept under where an upstream's name would be. No configured
/// upstream can have it: registry host names hold no `_`.
pub const HOSTED: &str = "_hosted";

/// Largest manifest a client may push.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// Limits of hosted content.
#[derive(Clone, Debug)]
pub struct HostedConfig {
    /// Bytes of hosted content (blobs, manifests, uploads under way) allowed; 0: no limit.
    pub max_size: u64,
    /// Upload sessions idle for this long are removed.
    pub upload_expiry: Duration,
    /// Upload sessions open at once on this node (`hosted.max_uploads`): each is a directory
    /// and files under `uploads/` until it finishes, is cancelled or expires.
    pub max_uploads: usize,
    /// Upload sessions one caller (a user, or an anonymous client's address) may hold open
    /// (`hosted.max_uploads_per_client`), so that one client cannot take every slot.
    pub max_uploads_per_client: usize,
    /// Garbage collection leaves hosted content used (uploaded, mounted, asked for) this
    /// recently, so that a push under way, whose manifest is not there yet, keeps its blobs.
    pub gc_grace: Duration,
}

impl Default for HostedConfig {
    fn default() -> Self {
        HostedConfig {
            max_size: 0,
            upload_expiry: Duration::from_secs(3600),
            max_uploads: 1000,
            max_uploads_per_client: 100,
            gc_grace: Duration::from_secs(30 * 60),
        }
    }
}

/// Where a cross-repository mount takes a blob from.
#[derive(Clone, Copy)]
pub enum MountFrom<'a> {
    Hosted(&'a RepositoryName),
    Mirrored(RepoRef<'a>),
}

/// A manifest a hosted repository accepted.
#[derive(Clone, Debug)]
pub struct PushedManifest {
    pub digest: Digest,
    /// The digest its `subject` names (OCI 1.1), answered as `OCI-Subject`.
    pub subject: Option<Digest>,
}

/// How much hosted content there is, and may be.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HostedUsage {
    /// Bytes of hosted blobs and manifests on disk.
    pub stored_bytes: u64,
    /// Bytes held by upload sessions under way.
    pub uploading_bytes: u64,
    /// `hosted.max_size`; 0: no limit.
    pub max_size: u64,
}

impl Cache {
    /// Hosted content now.
    pub fn hosted_usage(&self) -> HostedUsage {
        HostedUsage {
            stored_bytes: self.index.pinned_bytes(),
            uploading_bytes: *self.uploading.lock().unwrap_or_else(|p| p.into_inner()),
            max_size: self.hosted.max_size,
        }
    }

    /// Whether `n` more bytes fit the hosted budget, with `uploading` bytes held by sessions.
    pub(crate) fn within_budget(&self, uploading: u64, n: u64) -> Result<(), PushError> {
        let max = self.hosted.max_size;
        let used = self.index.pinned_bytes() + uploading;
        if max > 0 && used.saturating_add(n) > max {
            return Err(PushError::Budget { max, used });
        }
        Ok(())
    }

    /// Pins content already on disk as hosted, if the budget takes it (content pinned already
    /// costs nothing). `Ok(false)` when it is not on disk.
    fn pin(&self, digest: &Digest) -> Result<bool, PushError> {
        let uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        if self.index.is_pinned(digest) {
            // Marked used, so that garbage collection leaves it (false: it took it just now).
            return Ok(self.index.pin(digest).is_some());
        }
        let Some(size) = self.index.size(digest) else {
            return Ok(false);
        };
        // Under the uploads' lock, so that no chunk reserves the same room meanwhile.
        self.within_budget(*uploading, size)?;
        let pinned = self.index.pin(digest).is_some();
        // Its bytes left the mirror's total.
        self.disk_usage_changed(self.index.usage().0);
        Ok(pinned)
    }

    /// Records hosted content that just landed on disk (pinned from the start, so eviction
    /// never sees it unpinned).
    pub(crate) fn stored_hosted(&self, digest: &Digest, size: u64) {
        let total = self.index.insert_pinned(digest.clone(), size);
        self.disk_usage_changed(total);
    }

    /// Whether hosted `repo` holds `digest`: linked to it and on disk. A use: garbage
    /// collection leaves what was asked for lately (a client that saw a blob there may push a
    /// manifest naming it next).
    async fn holds_hosted(&self, repo: &RepositoryName, digest: &Digest) -> Result<bool, Error> {
        Ok(self.index.touch_present(digest)
            && self
                .links
                .contains(&self.disk, HOSTED, repo, digest)
                .await?)
    }

    /// Whether hosted `repo` holds `digest` as a manifest: pushed to it as one (a blob of the
    /// same bytes is not), and on disk. A use, as [`Cache::holds_hosted`].
    async fn holds_hosted_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, Error> {
        Ok(self.index.touch_present(digest)
            && self
                .hosted_manifests
                .contains(&self.disk, HOSTED, repo, digest)
                .await?)
    }

    /// A blob of a hosted repository.
    pub async fn hosted_blob(&self, repo: &RepositoryName, digest: &Digest) -> Result<Blob, Error> {
        if !self.holds_hosted(repo, digest).await? {
            return Err(Error::NotFound);
        }
        self.cached_blob(digest).await?.ok_or(Error::NotFound)
    }

    /// The size of a blob of a hosted repository.
    pub async fn hosted_blob_size(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<u64, Error> {
        if !self.holds_hosted(repo, digest).await? {
            return Err(Error::NotFound);
        }
        self.index.size(digest).ok_or(Error::NotFound)
    }

    /// Mounts a blob into hosted `repo` from a repository the caller may pull (checked by the
    /// caller): only when `from` holds it by its links (no upstream is asked) and it is on
    /// disk. `Ok(false)` when it cannot be mounted (the client then uploads it).
    pub async fn mount_blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        from: MountFrom<'_>,
    ) -> Result<bool, PushError> {
        let linked = match from {
            MountFrom::Hosted(r) => self.links.contains(&self.disk, HOSTED, r, digest).await?,
            MountFrom::Mirrored(at) => self.is_linked(at, digest).await?,
        };
        if !linked || !self.pin(digest)? {
            return Ok(false);
        }
        self.link_hosted(repo, [digest.clone()]).await?;
        Ok(true)
    }

    /// Stores a manifest pushed to hosted `repo` under `reference` (a tag, or its digest), after
    /// checking it: a manifest's JSON, a media type (`content_type`, else its `mediaType`; the
    /// two must agree), the digest when pushed by digest, every blob it names (foreign layers
    /// aside) held by `repo`, and every child manifest (of an index) a manifest of `repo`: pushed
    /// to it as a manifest, as the Distribution registry has it (bytes uploaded as a blob are
    /// none). The tag, if any, then points at it.
    pub async fn put_hosted_manifest(
        self: &Arc<Self>,
        repo: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PushedManifest, PushError> {
        let n = bytes.len() as u64;
        // Runs to its end when the client hangs up: its budget reservation, pin and tag are
        // bookkept whatever happens to the request.
        let (cache, repo, reference) = (self.clone(), repo.clone(), reference.clone());
        let content_type = content_type.map(str::to_owned);
        let result = detached(&self.upload_steps, async move {
            cache
                .put_hosted_manifest_once(&repo, &reference, content_type.as_deref(), bytes)
                .await
        })
        .await;
        self.count_push("manifest", result.as_ref().map(|_| ()));
        self.count_received(
            if result.is_ok() {
                "stored"
            } else {
                "discarded"
            },
            n,
        );
        result
    }

    async fn put_hosted_manifest_once(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<PushedManifest, PushError> {
        if bytes.len() > MAX_MANIFEST_SIZE {
            return Err(PushError::ManifestInvalid("manifest is larger than 4 MiB"));
        }
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|_| PushError::ManifestInvalid("manifest is not JSON"))?;
        if !doc.is_object() {
            return Err(PushError::ManifestInvalid("manifest is not a JSON object"));
        }
        let refs = References::parse(&bytes).ok_or(PushError::ManifestInvalid(
            "manifest has no manifest's shape",
        ))?;
        let declared = doc.get("mediaType").and_then(|m| m.as_str());
        // A generic type says nothing; the document's own `mediaType` then decides.
        let sent = content_type
            .map(|c| c.split(';').next().unwrap_or(c).trim())
            .filter(|c| {
                !c.is_empty() && *c != "application/json" && *c != "application/octet-stream"
            });
        let media_type = match (sent, declared) {
            (Some(s), Some(d)) if s != d => {
                return Err(PushError::ManifestInvalid(
                    "Content-Type and the manifest's mediaType differ",
                ))
            }
            (Some(s), _) => s.to_string(),
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                return Err(PushError::ManifestInvalid(
                    "no media type: send Content-Type or a mediaType field",
                ))
            }
        };
        let digest = match reference {
            Reference::Digest(d) if d.verifies(&bytes) => d.clone(),
            Reference::Digest(d) => return Err(PushError::ManifestDigest(d.clone())),
            Reference::Tag(_) => Digest::sha256_of(&bytes),
        };
        for child in &refs.manifests {
            if !self.holds_hosted_manifest(repo, &child.digest).await?
                || self.manifest(&child.digest).await?.is_none()
            {
                return Err(PushError::BlobUnknown(child.digest.clone()));
            }
        }
        for blob in refs.blobs.iter().filter(|d| !d.foreign) {
            if !self.holds_hosted(repo, &blob.digest).await? {
                return Err(PushError::BlobUnknown(blob.digest.clone()));
            }
        }
        let subject = doc
            .get("subject")
            .and_then(|s| s.get("digest"))
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse::<Digest>().ok());
        self.store_hosted_manifest(&digest, &media_type, bytes)
            .await?;
        // Held first, then a manifest: a crash between leaves a blob, never a manifest that is
        // not hosted content.
        self.link_hosted(repo, [digest.clone()]).await?;
        self.hosted_manifests
            .add(&self.disk, HOSTED, repo, [digest.clone()])
            .await?;
        if let Reference::Tag(tag) = reference {
            self.tag_hosted(repo, tag, &digest, &media_type).await?;
        }
        Ok(PushedManifest { digest, subject })
    }

    /// Writes a manifest's bytes and media type, once, pinned; the budget is checked first.
    async fn store_hosted_manifest(
        &self,
        digest: &Digest,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), PushError> {
        if self.index.contains(digest) {
            if !self.pin(digest)? {
                return Err(PushError::Io(
                    io::Error::other("manifest vanished from the store").into(),
                ));
            }
        } else {
            // Reserved as upload bytes while written, so that concurrent pushes cannot both
            // take the last room.
            let n = bytes.len() as u64;
            {
                let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
                self.within_budget(*uploading, n)?;
                *uploading += n;
            }
            let (d, b) = (digest.clone(), bytes.clone());
            let written = self.disk.run(move |store| store.write_blob(&d, &b)).await;
            {
                let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
                *uploading = uploading.saturating_sub(n);
            }
            written?;
            self.stored_hosted(digest, n);
        }
        let (d, t) = (digest.clone(), media_type.to_string());
        self.disk
            .run(move |store| store.set_manifest_type(&d, &t))
            .await?;
        let obj = MemoryObject {
            bytes,
            media_type: Some(media_type.into()),
        };
        self.memory.insert(digest.clone(), obj).await;
        Ok(())
    }

    /// Points a hosted tag at a manifest: the one writer of hosted tags. One answer, for every
    /// client, never revalidated (there is no upstream to ask).
    async fn tag_hosted(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
        digest: &Digest,
        media_type: &str,
    ) -> io::Result<()> {
        let record = TagRecord {
            answers: vec![TagAnswer::new(
                AcceptSet::ALL,
                digest,
                media_type,
                SystemTime::now(),
            )],
        };
        self.tags
            .replace(&self.disk, HOSTED, repo, RecordName::Tag(tag), record)
            .await
    }

    /// A manifest of a hosted repository by tag or digest, with the media type it was pushed
    /// with, whatever the client accepts.
    pub async fn hosted_manifest(
        &self,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<ResolvedManifest, Error> {
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self.hosted_tag(repo, t).await?.ok_or(Error::NotFound)?,
        };
        if !self.holds_hosted_manifest(repo, &digest).await? {
            return Err(Error::NotFound);
        }
        let (manifest, source) = self.manifest(&digest).await?.ok_or(Error::NotFound)?;
        Ok(ResolvedManifest {
            digest,
            manifest,
            source,
        })
    }

    /// The digest a hosted tag points at.
    async fn hosted_tag(&self, repo: &RepositoryName, tag: &Tag) -> Result<Option<Digest>, Error> {
        let record = self
            .tags
            .get(&self.disk, HOSTED, repo, RecordName::Tag(tag))
            .await?;
        Ok(record
            .answers
            .first()
            .and_then(|a| a.digest.parse::<Digest>().ok()))
    }

    /// The tags of a hosted repository, sorted. [`Error::NotFound`] when it has none.
    pub async fn hosted_tags(&self, repo: &RepositoryName) -> Result<Vec<String>, Error> {
        let r = repo.clone();
        let mut tags: Vec<String> = self
            .disk
            .run(move |store| store.tags_of(HOSTED, &r))
            .await?
            .into_iter()
            .filter(|(_, rec)| !rec.answers.is_empty())
            .map(|(t, _)| t)
            .collect();
        if tags.is_empty() {
            return Err(Error::NotFound);
        }
        tags.sort();
        Ok(tags)
    }

    /// The referrers of `subject` in a hosted repository (OCI 1.1): an image index of the
    /// manifests it holds whose `subject` is that digest, with their artifact types and
    /// annotations; empty when there are none. Worked out from the repository's manifests on
    /// each request: one pass over what it holds, no index kept to go stale.
    pub async fn hosted_referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Bytes, Error> {
        let linked = self.hosted_manifests.all(&self.disk, HOSTED, repo).await?;
        let wanted = subject.to_string();
        let found = self
            .disk
            .run(move |store| {
                let mut out = Vec::new();
                for d in linked {
                    let Some(media_type) = store.manifest_type(&d) else {
                        continue;
                    };
                    let Ok(bytes) = std::fs::read(store.blob_path(&d)) else {
                        continue;
                    };
                    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                        continue;
                    };
                    if doc["subject"]["digest"].as_str() != Some(wanted.as_str()) {
                        continue;
                    }
                    let mut descriptor = serde_json::json!({
                        "mediaType": media_type,
                        "digest": d.to_string(),
                        "size": bytes.len(),
                    });
                    // The artifact type, else the config's media type (OCI 1.1).
                    let artifact_type = doc["artifactType"]
                        .as_str()
                        .or_else(|| doc["config"]["mediaType"].as_str());
                    if let Some(t) = artifact_type {
                        descriptor["artifactType"] = t.into();
                    }
                    if let Some(a) = doc.get("annotations").filter(|a| a.is_object()) {
                        descriptor["annotations"] = a.clone();
                    }
                    out.push((d.to_string(), descriptor));
                }
                Ok(out)
            })
            .await?;
        let mut found = found;
        // A stable order, whatever the set's.
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let manifests: Vec<serde_json::Value> = found.into_iter().map(|(_, d)| d).collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": pier_oci::media_type::OCI_INDEX,
            "manifests": manifests,
        });
        Ok(Bytes::from(index.to_string()))
    }

    /// Deletes a manifest from a hosted repository: the tags pointing at it go, and the
    /// repository no longer holds it. Its bytes stay until garbage collection (other
    /// repositories may hold them).
    pub async fn delete_hosted_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), PushError> {
        if !self
            .hosted_manifests
            .contains(&self.disk, HOSTED, repo, digest)
            .await?
            || self.manifest(digest).await?.is_none()
        {
            return Err(PushError::NotFound);
        }
        let r = repo.clone();
        let tags = self
            .disk
            .run(move |store| store.tags_of(HOSTED, &r))
            .await?;
        let wanted = digest.to_string();
        for (tag, record) in tags {
            let Some(tag) = Tag::parse(&tag) else {
                continue;
            };
            if record.answers.iter().any(|a| a.digest == wanted) {
                self.tags
                    .remove(&self.disk, HOSTED, repo, RecordName::Tag(&tag))
                    .await?;
            }
        }
        // No longer a manifest first, then no longer held (the reverse of a push).
        self.hosted_manifests
            .remove(&self.disk, HOSTED, repo, std::slice::from_ref(digest))
            .await?;
        self.links
            .remove(&self.disk, HOSTED, repo, std::slice::from_ref(digest))
            .await?;
        // Hosted content still, across a restart, until garbage collection has seen it.
        let d = digest.clone();
        self.disk
            .run(move |store| store.add_deleted(HOSTED, std::slice::from_ref(&d)))
            .await?;
        Ok(())
    }

    /// Deletes a tag of a hosted repository (the manifest stays, by digest).
    pub async fn delete_hosted_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<(), PushError> {
        if self.hosted_tag(repo, tag).await?.is_none() {
            return Err(PushError::NotFound);
        }
        self.tags
            .remove(&self.disk, HOSTED, repo, RecordName::Tag(tag))
            .await?;
        Ok(())
    }
}
