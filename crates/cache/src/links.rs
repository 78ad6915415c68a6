//! Which digests each upstream repository holds: the cache's access boundary.
//!
//! Content is stored once by digest, whoever fetched it; but a client may have it only through a
//! repository the upstream has it in, or per-user rules and allow/deny lists could be walked
//! around by asking for someone else's digest under a permitted name. Like the Distribution
//! registry's per-repository links, pier records a digest under (upstream, repository) when the
//! upstream served it there: a blob or manifest fetched there, a HEAD that confirmed it, or what a
//! manifest fetched there refers to, except foreign layers (a registry accepts a manifest only
//! when its repository holds every child and blob it names, but lets layers with `urls` be
//! elsewhere, so those prove nothing). A digest asked for under a repository it is not linked
//! to is confirmed with the upstream first ([`Cache::confirm`](crate::Cache)).
//!
//! Links live in memory per repository, loaded on first use from one append-only file per
//! repository. A cache directory of an earlier pier has no links files: a repository's links are
//! then derived once from its tag records and the manifests they name.
//!
//! Hosted repositories keep a second set beside it ([`LinkFile::Manifests`]): which of their
//! digests were pushed to them as manifests, as the Distribution registry keeps manifest
//! revisions apart from layer links. Bytes uploaded as a blob are no manifest of the repository,
//! whatever another repository holds them as.

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, RwLock};

use pier_oci::{Digest, References, RepositoryName};

use crate::disk::Disk;
use crate::store::{DiskStore, LinkFile};

type Set = Arc<RwLock<HashSet<Digest>>>;

/// The link sets of recently used repositories, of one kind of links file.
pub(crate) struct Links {
    repos: moka::future::Cache<String, Set>,
    file: LinkFile,
}

impl Links {
    pub(crate) fn new(file: LinkFile) -> Self {
        Links {
            repos: moka::future::Cache::new(10_000),
            file,
        }
    }

    /// The set of `upstream`'s `repo`, loaded from disk (or derived) on first use.
    async fn set(&self, disk: &Disk, upstream: &str, repo: &RepositoryName) -> io::Result<Set> {
        let key = [upstream, "/", repo.as_str()].concat();
        // The common case, without building the loader.
        if let Some(set) = self.repos.get(&key).await {
            return Ok(set);
        }
        let (u, r, d, file) = (upstream.to_string(), repo.clone(), disk.clone(), self.file);
        self.repos
            .try_get_with(key, async move {
                let digests = d
                    .run(move |store| match file {
                        LinkFile::All => load_or_derive(store, &u, &r),
                        // Recorded for every hosted repository when the cache opened
                        // (`DiskStore::record_hosted_manifests`): none, no manifest.
                        LinkFile::Manifests => Ok(store.links(&u, &r, file)?.unwrap_or_default()),
                    })
                    .await?;
                Ok::<_, io::Error>(Arc::new(RwLock::new(digests.into_iter().collect())))
            })
            .await
            .map_err(|e| io::Error::new(e.kind(), e.to_string()))
    }

    /// Whether `digest` is linked to `upstream`'s `repo`.
    pub(crate) async fn contains(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> io::Result<bool> {
        let set = self.set(disk, upstream, repo).await?;
        let linked = set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(digest);
        Ok(linked)
    }

    /// Every digest linked to `upstream`'s `repo`.
    pub(crate) async fn all(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
    ) -> io::Result<Vec<Digest>> {
        let set = self.set(disk, upstream, repo).await?;
        let all = set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        Ok(all)
    }

    /// Links `digests` to `upstream`'s `repo`, on disk (appended) and in memory. Returns the
    /// digests that were not linked before.
    pub(crate) async fn add(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        digests: impl IntoIterator<Item = Digest>,
    ) -> io::Result<Vec<Digest>> {
        let set = self.set(disk, upstream, repo).await?;
        let digests: Vec<Digest> = digests.into_iter().collect();
        let known = {
            let set = set.read().unwrap_or_else(|p| p.into_inner());
            digests.iter().all(|d| set.contains(d))
        };
        if known {
            return Ok(Vec::new());
        }
        let (u, r, file) = (upstream.to_string(), repo.clone(), self.file);
        // The set and the file change together, under the set's lock on a blocking thread, so
        // that an unlink's rewrite never loses a concurrent append.
        disk.run(move |store| {
            let mut set = set.write().unwrap_or_else(|p| p.into_inner());
            let new: Vec<Digest> = digests
                .into_iter()
                .filter(|d| set.insert(d.clone()))
                .collect();
            if new.is_empty() {
                return Ok(new);
            }
            match store.add_links(&u, &r, file, &new) {
                Ok(()) => Ok(new),
                Err(e) => {
                    for d in &new {
                        set.remove(d);
                    }
                    Err(e)
                }
            }
        })
        .await
    }

    /// Unlinks `digests` from `upstream`'s `repo` (a hosted manifest deleted): the file is
    /// rewritten without them.
    pub(crate) async fn remove(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        digests: &[Digest],
    ) -> io::Result<()> {
        let set = self.set(disk, upstream, repo).await?;
        let (u, r, gone, file) = (
            upstream.to_string(),
            repo.clone(),
            digests.to_vec(),
            self.file,
        );
        disk.run(move |store| {
            let mut set = set.write().unwrap_or_else(|p| p.into_inner());
            for d in &gone {
                set.remove(d);
            }
            let left: Vec<Digest> = set.iter().cloned().collect();
            store.set_links(&u, &r, file, &left)
        })
        .await
    }

    /// Forgets the in-memory set of a repository (its file was removed).
    pub(crate) async fn forget(&self, upstream: &str, repo: &RepositoryName) {
        self.repos.invalidate(&format!("{upstream}/{repo}")).await;
    }
}

/// The links file of a repository, or, when it has none (a cache of an earlier pier), the digests
/// its recorded tags lead to, written as its links file. Blocking.
fn load_or_derive(
    store: &DiskStore,
    upstream: &str,
    repo: &RepositoryName,
) -> io::Result<Vec<Digest>> {
    if let Some(digests) = store.links(upstream, repo, LinkFile::All)? {
        return Ok(digests);
    }
    let mut found = Vec::new();
    let mut manifests: Vec<Digest> = store
        .tags_of(upstream, repo)?
        .into_iter()
        .flat_map(|(_, rec)| rec.answers)
        .filter_map(|a| a.digest.parse().ok())
        .collect();
    let mut seen = HashSet::new();
    while let Some(d) = manifests.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        found.push(d.clone());
        if store.manifest_type(&d).is_none() {
            continue;
        }
        let Ok(bytes) = std::fs::read(store.blob_path(&d)) else {
            continue;
        };
        if let Some(refs) = References::parse(&bytes) {
            manifests.extend(refs.manifests.into_iter().map(|m| m.digest));
            found.extend(
                refs.blobs
                    .into_iter()
                    .filter(|b| !b.foreign)
                    .map(|b| b.digest),
            );
        }
    }
    if !found.is_empty() {
        store.add_links(upstream, repo, LinkFile::All, &found)?;
        tracing::info!(%upstream, %repo, links = found.len(), "derived repository links from its tags");
    }
    Ok(found)
}
