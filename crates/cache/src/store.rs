//! The content-addressed disk store.
//!
//! ```text
//! <root>/blobs/<alg>/<2 hex>/<hex>     verified content (layers, configs and manifests alike)
//! <root>/manifests/<alg>/<hex>         a manifest's media type, next to its bytes in blobs/
//! <root>/tags/<upstream>/<repo>/_tags/<tag>   which digest a tag pointed at, and when pier saw it
//! <root>/tmp/                          fills in progress; anything here at start-up is a leftover
//! ```
//!
//! A file appears under `blobs/` only by `rename` from `tmp/` after its digest and size were
//! checked and its bytes were fsynced, and the directory is fsynced after the rename. So a crash at
//! any moment leaves either the whole verified file or none (see README, "Crash safety").
//! Repository components never start with `_` (name grammar), so `_tags` cannot collide with one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use pier_oci::{Digest, RepositoryName, Tag};

/// Where a tag pointed when pier last confirmed it with the upstream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagRecord {
    pub digest: String,
    pub media_type: String,
    /// Seconds since the Unix epoch.
    pub fetched_at: u64,
}

impl TagRecord {
    pub fn new(digest: &Digest, media_type: &str, fetched_at: SystemTime) -> Self {
        TagRecord {
            digest: digest.to_string(),
            media_type: media_type.to_string(),
            fetched_at: fetched_at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Seconds since the record was confirmed (0 if the clock went back).
    pub fn age_secs(&self, now: SystemTime) -> u64 {
        now.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(self.fetched_at)
    }
}

/// The files of one cache directory.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    next_temp: AtomicU64,
    /// An exclusive lock on `<root>/lock`, held while the store is open, so that two pier
    /// processes (or `pier gc` and a running pier) never share a directory.
    _lock: File,
}

/// One verified blob found on disk.
#[derive(Clone, Debug)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size: u64,
    /// Last access as recorded in the file's mtime, in milliseconds since the Unix epoch.
    pub last_access: u64,
}

impl DiskStore {
    /// Opens (creating) a cache directory, and removes what crashed fills left in `tmp/`.
    /// Fails if another process has the directory open.
    pub fn open(root: &Path) -> io::Result<DiskStore> {
        for dir in ["blobs", "manifests", "tags", "tmp"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join("lock"))?;
        lock.try_lock().map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another pier process", root.display()),
            )
        })?;
        let mut leftovers = 0;
        for entry in fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            if fs::remove_file(entry.path()).is_ok() {
                leftovers += 1;
            }
        }
        if leftovers > 0 {
            tracing::info!(leftovers, "removed temporary files of interrupted fills");
        }
        Ok(DiskStore {
            root: root.to_path_buf(),
            next_temp: AtomicU64::new(0),
            _lock: lock,
        })
    }

    /// Every verified blob on disk, with its size and recorded last access. Files whose name is
    /// not a digest are skipped. Blocking.
    pub fn scan(&self) -> io::Result<Vec<StoredBlob>> {
        let mut out = Vec::new();
        // Anything that is not <alg>/<xx>/<hex> is not pier's and is left alone.
        let dirs = |path: &Path| -> io::Result<Vec<fs::DirEntry>> {
            let mut out = Vec::new();
            for entry in fs::read_dir(path)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    out.push(entry);
                }
            }
            Ok(out)
        };
        for alg in dirs(&self.root.join("blobs"))? {
            let alg_name = alg.file_name().to_string_lossy().into_owned();
            for prefix in dirs(&alg.path())? {
                for file in fs::read_dir(prefix.path())? {
                    let file = file?;
                    let name = file.file_name();
                    let Ok(digest) =
                        format!("{alg_name}:{}", name.to_string_lossy()).parse::<Digest>()
                    else {
                        continue;
                    };
                    let meta = file.metadata()?;
                    let last_access = meta
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_millis() as u64);
                    out.push(StoredBlob {
                        digest,
                        size: meta.len(),
                        last_access,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Removes a blob (and its manifest media type, if it is a manifest). A reader that has the
    /// file open keeps reading it whole: the bytes go when the last descriptor closes.
    pub fn remove_blob(&self, digest: &Digest) -> io::Result<()> {
        let _ = fs::remove_file(self.manifest_type_path(digest));
        match fs::remove_file(self.blob_path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Records last access times in the files' mtimes, so the order survives a restart.
    /// Blocking; files that vanished meanwhile are skipped.
    pub fn record_access(&self, accesses: &[(Digest, u64)]) {
        for (digest, millis) in accesses {
            let time = UNIX_EPOCH + std::time::Duration::from_millis(*millis);
            if let Ok(f) = File::options().write(true).open(self.blob_path(digest)) {
                let _ = f.set_modified(time);
            }
        }
    }

    /// Forgets every tag of `upstream`'s `repo` (not of repositories below it). Returns the
    /// digests the tags pointed at.
    pub fn remove_tags(&self, upstream: &str, repo: &RepositoryName) -> io::Result<Vec<Digest>> {
        let dir = self
            .root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags");
        let mut digests = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(digests),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if let Ok(data) = fs::read(entry.path()) {
                if let Some(d) = serde_json::from_slice::<TagRecord>(&data)
                    .ok()
                    .and_then(|r| r.digest.parse().ok())
                {
                    digests.push(d);
                }
            }
        }
        fs::remove_dir_all(&dir)?;
        Ok(digests)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where verified content with this digest lives.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens verified content: the file and its length, or `None` when it is not cached.
    pub fn open_blob(&self, digest: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(digest)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The length of cached content, without opening it.
    pub fn blob_len(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(digest)).ok().map(|m| m.len())
    }

    /// A new, empty temporary file for a fill, opened for reading and writing.
    pub fn create_temp(&self, digest: &Digest) -> io::Result<(File, PathBuf)> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{}-{n}",
            digest.algorithm().as_str(),
            &digest.hex()[..16],
            std::process::id()
        );
        let path = self.root.join("tmp").join(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Makes a verified temporary file the content of `digest`: fsync the bytes, rename into
    /// place, fsync the directory. Blocking; call from a blocking thread.
    pub fn commit(&self, file: &File, temp: &Path, digest: &Digest) -> io::Result<()> {
        file.sync_all()?;
        let dest = self.blob_path(digest);
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(dir)?;
        fs::rename(temp, &dest)?;
        File::open(dir)?.sync_all()
    }

    /// Stores small verified content (a manifest) in one go.
    pub fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.blob_path(digest).exists() {
            return Ok(());
        }
        let (mut file, temp) = self.create_temp(digest)?;
        let result = file
            .write_all(bytes)
            .and_then(|_| self.commit(&file, &temp, digest));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Writes and removes a small file in `tmp/`, to show the directory takes writes.
    pub fn check_writable(&self) -> io::Result<()> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let probe = self
            .root
            .join("tmp")
            .join(format!("probe-{}-{n}", std::process::id()));
        fs::write(&probe, b"ok")?;
        fs::remove_file(&probe)
    }

    /// The media type recorded for a manifest.
    pub fn manifest_type(&self, digest: &Digest) -> Option<String> {
        fs::read_to_string(self.manifest_type_path(digest))
            .ok()
            .filter(|s| !s.is_empty())
    }

    pub fn set_manifest_type(&self, digest: &Digest, media_type: &str) -> io::Result<()> {
        self.write_atomic(&self.manifest_type_path(digest), media_type.as_bytes())
    }

    fn manifest_type_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("manifests")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// The record of a tag, if pier has seen it.
    pub fn tag(&self, upstream: &str, repo: &RepositoryName, tag: &Tag) -> Option<TagRecord> {
        let data = fs::read(self.tag_path(upstream, repo, tag)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    pub fn set_tag(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        tag: &Tag,
        record: &TagRecord,
    ) -> io::Result<()> {
        let data = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.write_atomic(&self.tag_path(upstream, repo, tag), &data)
    }

    fn tag_path(&self, upstream: &str, repo: &RepositoryName, tag: &Tag) -> PathBuf {
        // `upstream` is a configured registry name; `repo` and `tag` passed their grammars.
        self.root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    /// Every (upstream, repository) with at least one tag recorded, unsorted. Blocking.
    pub fn repositories(&self) -> io::Result<Vec<(String, String)>> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                if !entry.file_type()?.is_dir() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == "_tags" {
                    out.push(prefix.to_string());
                    continue;
                }
                let path = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                walk(&entry.path(), &path, out)?;
            }
            Ok(())
        }
        let mut out = Vec::new();
        for upstream in fs::read_dir(self.root.join("tags"))? {
            let upstream = upstream?;
            if !upstream.file_type()?.is_dir() {
                continue;
            }
            let name = upstream.file_name().to_string_lossy().into_owned();
            let mut repos = Vec::new();
            walk(&upstream.path(), "", &mut repos)?;
            out.extend(repos.into_iter().map(|r| (name.clone(), r)));
        }
        Ok(out)
    }

    /// Replaces a small file whole: write a temporary file, then rename it over the old one.
    fn write_atomic(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("path has no parent"))?;
        fs::create_dir_all(dir)?;
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .root
            .join("tmp")
            .join(format!("meta-{}-{n}", std::process::id()));
        let result = fs::write(&temp, data).and_then(|_| fs::rename(&temp, dest));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_removes_leftover_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        fs::write(dir.path().join("tmp/sha256-crashed"), b"half").unwrap();
        let _store = DiskStore::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn scan_finds_blobs_with_recorded_access_times() {
        let dir = tempfile::tempdir().unwrap();
        let d1 = Digest::sha256_of(b"one");
        let d2 = Digest::sha256_of(b"two");
        {
            let store = DiskStore::open(dir.path()).unwrap();
            store.write_blob(&d1, b"one").unwrap();
            store.write_blob(&d2, b"two!").unwrap();
            fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();
            store.record_access(&[(d1.clone(), 1_000_000), (d2.clone(), 2_000_000)]);
        }
        // A second open sees the same order (and the lock was released with the first).
        let store = DiskStore::open(dir.path()).unwrap();
        let mut found = store.scan().unwrap();
        found.sort_by_key(|b| b.last_access);
        let got: Vec<(Digest, u64, u64)> = found
            .into_iter()
            .map(|b| (b.digest, b.size, b.last_access))
            .collect();
        assert_eq!(got, vec![(d1, 3, 1_000_000), (d2, 4, 2_000_000)]);
    }

    #[test]
    fn a_directory_is_open_once() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DiskStore::open(dir.path()).unwrap();
        let err = DiskStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn write_and_read_blob_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        assert!(store.open_blob(&d).unwrap().is_none());
        store.write_blob(&d, b"hello").unwrap();
        assert_eq!(store.blob_len(&d), Some(5));
        assert!(store
            .blob_path(&d)
            .starts_with(dir.path().join("blobs/sha256")));
        let repo = RepositoryName::parse("library/x").unwrap();
        let tag = Tag::parse("1.0").unwrap();
        let rec = TagRecord::new(&d, "application/json", SystemTime::now());
        store.set_tag("docker.io", &repo, &tag, &rec).unwrap();
        assert_eq!(store.tag("docker.io", &repo, &tag), Some(rec.clone()));
        assert_eq!(store.tag("ghcr.io", &repo, &tag), None);
        let repo2 = RepositoryName::parse("library/x/y").unwrap();
        store.set_tag("ghcr.io", &repo2, &tag, &rec).unwrap();
        let mut repos = store.repositories().unwrap();
        repos.sort();
        assert_eq!(
            repos,
            vec![
                ("docker.io".to_string(), "library/x".to_string()),
                ("ghcr.io".to_string(), "library/x/y".to_string())
            ]
        );
        // nothing left behind in tmp/
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
