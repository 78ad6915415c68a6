//! The content-addressed disk store.
//!
//! ```text
//! <root>/blobs/<alg>/<2 hex>/<hex>     verified content (layers, configs and manifests alike)
//! <root>/manifests/<alg>/<hex>         a manifest's media type, next to its bytes in blobs/
//! <root>/tags/<upstream>/<repo>/_tags/<tag>   which digest a tag pointed at, per accept set
//! <root>/tags/<upstream>/<repo>/_links        digests known to be in that repository, a line each
//! <root>/tags/_hosted/<repo>/_manifests       of those, the manifests pushed to a hosted repository
//! <root>/tmp/                          fills in progress; anything here at start-up is a leftover
//! <root>/uploads/<session>/data        a push's blob upload so far (kept across restarts)
//! <root>/uploads/<session>/repository  the hosted repository it is for
//! <root>/uploads/<session>/owner       the caller who opened it (for the per-client limit)
//! ```
//!
//! Hosted repositories keep their tags and links under `tags/_hosted/<repo>/` (and
//! `tags/_hosted/_deleted` notes deleted manifests until garbage collection saw them): `_hosted` is no
//! registry host name (configured upstream names cannot hold `_`), so it never meets an upstream.
//!
//! A file appears under `blobs/` only by `rename` from `tmp/` after its digest and size were
//! checked and its bytes were fsynced, and the directory is fsynced after the rename. So a crash at
//! any moment leaves either the whole verified file or none (see README, "Crash safety").
//! Repository components never start with `_` (name grammar), so `_tags` cannot collide with one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use pier_oci::{AcceptSet, Digest, RepositoryName, Tag};

/// What the upstream answered for one tag, per set of accepted manifest types: a registry that
/// negotiates (Docker Hub, Distribution) answers a multi-platform tag with an index to clients
/// that take one, and with one platform's manifest to clients that do not.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TagRecord {
    pub answers: Vec<TagAnswer>,
}

/// Which of a repository's link files: what it holds at all, or (hosted repositories) which of
/// that it holds as manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFile {
    /// Every digest the repository holds, blobs and manifests alike (`_links`).
    All,
    /// The manifests pushed to a hosted repository (`_manifests`). A digest linked only in
    /// [`LinkFile::All`] is a blob there, even when another repository holds the same bytes as a
    /// manifest: an index may name only manifests of its own repository.
    Manifests,
}

impl LinkFile {
    fn file_name(self) -> &'static str {
        match self {
            LinkFile::All => "_links",
            LinkFile::Manifests => "_manifests",
        }
    }
}

/// Written under `tags/_hosted/` once every hosted repository has its `_manifests` file: from
/// then on a repository without one holds no manifest.
const MANIFESTS_RECORDED: &str = "_manifests_recorded";

/// What a [`TagRecord`] is kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordName<'a> {
    /// A tag of the repository.
    Tag(&'a Tag),
    /// The referrers of a digest in the repository: the OCI referrers API's answer.
    Referrers(&'a Digest),
}

/// A [`RecordName`] that a task can keep.
#[derive(Clone, Debug)]
pub(crate) enum OwnedRecordName {
    Tag(Tag),
    Referrers(Digest),
}

impl From<RecordName<'_>> for OwnedRecordName {
    fn from(n: RecordName<'_>) -> Self {
        match n {
            RecordName::Tag(t) => OwnedRecordName::Tag(t.clone()),
            RecordName::Referrers(d) => OwnedRecordName::Referrers(d.clone()),
        }
    }
}

impl OwnedRecordName {
    pub(crate) fn borrow(&self) -> RecordName<'_> {
        match self {
            OwnedRecordName::Tag(t) => RecordName::Tag(t),
            OwnedRecordName::Referrers(d) => RecordName::Referrers(d),
        }
    }
}

impl std::fmt::Display for RecordName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordName::Tag(t) => write!(f, ":{t}"),
            RecordName::Referrers(d) => write!(f, "@{d}/referrers"),
        }
    }
}

/// One answer for a tag: for the clients of one accept set, the manifest it pointed at.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TagAnswer {
    /// [`AcceptSet::bits`] of the request the upstream answered; 0 for a record written by an
    /// earlier pier, whose accept set is unknown (it is served only while the upstream is down).
    pub accept: u8,
    pub digest: String,
    pub media_type: String,
    /// When pier last confirmed it with the upstream, in seconds since the Unix epoch.
    pub fetched_at: u64,
}

impl TagAnswer {
    pub fn new(accept: AcceptSet, digest: &Digest, media_type: &str, at: SystemTime) -> Self {
        TagAnswer {
            accept: accept.bits(),
            digest: digest.to_string(),
            media_type: media_type.to_string(),
            fetched_at: at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// The accept set this answer is for, if known.
    pub fn accept_set(&self) -> Option<AcceptSet> {
        AcceptSet::from_bits(self.accept)
    }

    /// Seconds since the answer was confirmed (0 if the clock went back).
    pub fn age_secs(&self, now: SystemTime) -> u64 {
        now.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .saturating_sub(self.fetched_at)
    }
}

impl TagRecord {
    /// The answer for exactly this accept set.
    pub fn answer_for(&self, accept: AcceptSet) -> Option<&TagAnswer> {
        self.answers.iter().find(|a| a.accept == accept.bits())
    }

    /// Replaces the answer for the accept set of `answer`.
    pub fn set(&mut self, answer: TagAnswer) {
        self.answers.retain(|a| a.accept != answer.accept);
        self.answers.push(answer);
    }
}

impl<'de> serde::Deserialize<'de> for TagRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Records of earlier versions held one answer, for an unknown accept set.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Answers {
                answers: Vec<TagAnswer>,
            },
            Single {
                digest: String,
                media_type: String,
                fetched_at: u64,
            },
        }
        Ok(match Stored::deserialize(d)? {
            Stored::Answers { answers } => TagRecord { answers },
            Stored::Single {
                digest,
                media_type,
                fetched_at,
            } => TagRecord {
                answers: vec![TagAnswer {
                    accept: 0,
                    digest,
                    media_type,
                    fetched_at,
                }],
            },
        })
    }
}

/// The files of one cache directory.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    next_temp: AtomicU64,
    /// Striped by digest: held while a blob is put in place (or found there and marked used)
    /// and while garbage collection decides to unlink it, so that collection never unlinks a
    /// blob a commit just counted on ([`DiskStore::remove_unused_blob`]).
    placing: [Mutex<()>; PLACING_STRIPES],
    /// An exclusive lock on `<root>/lock`, held while the store is open, so that two pier
    /// processes (or `pier gc` and a running pier) never share a directory.
    _lock: File,
}

const PLACING_STRIPES: usize = 64;

/// An upload session as the disk has it.
#[derive(Clone, Debug)]
pub struct UploadInfo {
    /// The hosted repository it is for.
    pub repository: String,
    /// Bytes received so far.
    pub size: u64,
    /// When it last took bytes (or was created).
    pub touched: SystemTime,
    /// Whose it is, as the upload limits count callers (`None`: a session of an earlier
    /// version, which recorded no owner).
    pub owner: Option<String>,
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
        for dir in ["blobs", "manifests", "tags", "tmp", "uploads"] {
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
            placing: std::array::from_fn(|_| Mutex::new(())),
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

    /// The lock ordering `digest`'s placement against its collection.
    fn placing(&self, digest: &Digest) -> MutexGuard<'_, ()> {
        let stripe = (digest.hex().bytes().take(8)).fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        self.placing[stripe % PLACING_STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Removes a blob garbage collection gave up, unless it was placed again since `cutoff`
    /// (committed, or found there by a commit: [`DiskStore::commit`], [`DiskStore::keep_placed`]),
    /// as an upload or fill whose bytes were "written once" goes on to index it. Returns whether
    /// it is gone, and the size of one kept.
    pub fn remove_unused_blob(
        &self,
        digest: &Digest,
        cutoff: SystemTime,
    ) -> io::Result<Option<u64>> {
        let _placing = self.placing(digest);
        match fs::metadata(self.blob_path(digest)) {
            Ok(meta) if meta.modified()? >= cutoff => Ok(Some(meta.len())),
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => self.remove_blob(digest).map(|()| None),
        }
    }

    /// Whether the store holds `digest` already (written once), marking it placed now: garbage
    /// collection that gave it up leaves it, since the caller goes on to index it.
    pub fn keep_placed(&self, digest: &Digest) -> io::Result<bool> {
        let _placing = self.placing(digest);
        match File::open(self.blob_path(digest)) {
            Ok(f) => f.set_modified(SystemTime::now()).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
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

    /// Forgets every tag of `upstream`'s `repo` (not of repositories below it), and which
    /// digests it holds. Returns how many tags went.
    pub fn remove_tags(&self, upstream: &str, repo: &RepositoryName) -> io::Result<usize> {
        let tags = self.tags_of(upstream, repo)?.len();
        let dir = self
            .root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags");
        for dir in [dir.clone(), dir.with_file_name("_referrers")] {
            match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.remove_links(upstream, repo)?;
        Ok(tags)
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
    /// place, fsync the directory. Placed now (its mtime), so that garbage collection leaves it
    /// ([`DiskStore::remove_unused_blob`]). Blocking; call from a blocking thread.
    pub fn commit(&self, file: &File, temp: &Path, digest: &Digest) -> io::Result<()> {
        file.set_modified(SystemTime::now())?;
        file.sync_all()?;
        let dest = self.blob_path(digest);
        let dir = dest
            .parent()
            .ok_or_else(|| io::Error::other("blob path has no parent"))?;
        fs::create_dir_all(dir)?;
        {
            let _placing = self.placing(digest);
            fs::rename(temp, &dest)?;
        }
        File::open(dir)?.sync_all()
    }

    /// Stores small verified content (a manifest) in one go.
    pub fn write_blob(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        if self.keep_placed(digest)? {
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

    /// Where the record of `name` in `upstream`'s `repo` lives (no file system call).
    pub fn record_path(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
    ) -> PathBuf {
        // `upstream` is a configured registry name; `repo`, tags and digests passed their
        // grammars, so none of them can leave the directory.
        let dir = self.root.join("tags").join(upstream).join(repo.as_str());
        match name {
            RecordName::Tag(tag) => dir.join("_tags").join(tag.as_str()),
            RecordName::Referrers(d) => {
                dir.join("_referrers")
                    .join(format!("{}-{}", d.algorithm().as_str(), d.hex()))
            }
        }
    }

    /// The record at `path`, if there is one.
    pub fn read_record(&self, path: &Path) -> Option<TagRecord> {
        let data = fs::read(path).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Replaces the record at `path`.
    pub fn write_record(&self, path: &Path, record: &TagRecord) -> io::Result<()> {
        let data = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.write_atomic(path, &data)
    }

    /// The record of a tag, if pier has seen it.
    pub fn tag(&self, upstream: &str, repo: &RepositoryName, tag: &Tag) -> Option<TagRecord> {
        self.read_record(&self.record_path(upstream, repo, RecordName::Tag(tag)))
    }

    fn links_path(&self, upstream: &str, repo: &RepositoryName, file: LinkFile) -> PathBuf {
        self.root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join(file.file_name())
    }

    /// The digests recorded in `file` of `upstream`'s `repo`, or `None` when the repository has
    /// no such file yet. A torn last line (a crash mid-append) is skipped.
    pub fn links(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        file: LinkFile,
    ) -> io::Result<Option<Vec<Digest>>> {
        match fs::read_to_string(self.links_path(upstream, repo, file)) {
            Ok(text) => Ok(Some(text.lines().filter_map(|l| l.parse().ok()).collect())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Appends digests to the repository's links `file` (creating it). One `write` of whole
    /// lines with `O_APPEND`, so concurrent appends never interleave within a line.
    pub fn add_links(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        file: LinkFile,
        digests: &[Digest],
    ) -> io::Result<()> {
        let path = self.links_path(upstream, repo, file);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut lines = String::new();
        for d in digests {
            lines.push_str(&d.to_string());
            lines.push('\n');
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(lines.as_bytes())
    }

    /// Gives every hosted repository (`upstream`'s) of a cache directory written before
    /// manifests were recorded apart its `_manifests` file, once: what it links that the store
    /// holds as a manifest, which is what it was taken to hold as manifests until then. Blocking.
    pub fn record_hosted_manifests(&self, upstream: &str) -> io::Result<()> {
        let marker = self
            .root
            .join("tags")
            .join(upstream)
            .join(MANIFESTS_RECORDED);
        if marker.exists() {
            return Ok(());
        }
        let mut recorded = 0usize;
        for (name, links) in self.linked_repositories(upstream)? {
            let Ok(repo) = RepositoryName::parse(&name) else {
                continue;
            };
            // One done before a crash is not redone (a repository may have changed since).
            if self.links(upstream, &repo, LinkFile::Manifests)?.is_some() {
                continue;
            }
            let manifests: Vec<Digest> = links
                .into_iter()
                .filter(|d| self.manifest_type(d).is_some())
                .collect();
            self.set_links(upstream, &repo, LinkFile::Manifests, &manifests)?;
            recorded += 1;
        }
        if recorded > 0 {
            tracing::info!(
                repositories = recorded,
                "recorded which digests hosted repositories hold as manifests"
            );
        }
        self.write_atomic(&marker, b"")
    }

    /// Forgets which digests `upstream`'s `repo` holds.
    pub fn remove_links(&self, upstream: &str, repo: &RepositoryName) -> io::Result<()> {
        for file in [LinkFile::All, LinkFile::Manifests] {
            match fs::remove_file(self.links_path(upstream, repo, file)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Every tag recorded for `upstream`'s `repo`, with its record. Blocking.
    pub fn tags_of(
        &self,
        upstream: &str,
        repo: &RepositoryName,
    ) -> io::Result<Vec<(String, TagRecord)>> {
        let dir = self
            .root
            .join("tags")
            .join(upstream)
            .join(repo.as_str())
            .join("_tags");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry?;
            let Ok(data) = fs::read(entry.path()) else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<TagRecord>(&data) {
                out.push((entry.file_name().to_string_lossy().into_owned(), rec));
            }
        }
        Ok(out)
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

    /// Replaces the repository's links `file` with exactly `digests` (write-then-rename).
    pub fn set_links(
        &self,
        upstream: &str,
        repo: &RepositoryName,
        file: LinkFile,
        digests: &[Digest],
    ) -> io::Result<()> {
        let mut lines = String::new();
        for d in digests {
            lines.push_str(&d.to_string());
            lines.push('\n');
        }
        self.write_atomic(&self.links_path(upstream, repo, file), lines.as_bytes())
    }

    /// Removes one record (a tag), if it is there.
    pub fn remove_record(&self, path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every digest linked to any repository of `upstream` (for hosted content: what is pinned).
    /// Blocking.
    pub fn all_links(&self, upstream: &str) -> io::Result<std::collections::HashSet<Digest>> {
        fn walk(dir: &Path, out: &mut std::collections::HashSet<Digest>) -> io::Result<()> {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    walk(&entry.path(), out)?;
                } else if entry.file_name() == "_links" {
                    let text = fs::read_to_string(entry.path())?;
                    out.extend(text.lines().filter_map(|l| l.parse::<Digest>().ok()));
                }
            }
            Ok(())
        }
        let mut out = std::collections::HashSet::new();
        walk(&self.root.join("tags").join(upstream), &mut out)?;
        Ok(out)
    }

    /// Every repository of `upstream` with a links file, named as under `tags/<upstream>/`,
    /// with its links. Blocking.
    pub fn linked_repositories(&self, upstream: &str) -> io::Result<Vec<(String, Vec<Digest>)>> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, Vec<Digest>)>) -> io::Result<()> {
            let entries = match fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type()?.is_dir() {
                    if name != "_tags" {
                        let path = if prefix.is_empty() {
                            name
                        } else {
                            format!("{prefix}/{name}")
                        };
                        walk(&entry.path(), &path, out)?;
                    }
                } else if name == "_links" {
                    let text = fs::read_to_string(entry.path())?;
                    let links = text.lines().filter_map(|l| l.parse().ok()).collect();
                    out.push((prefix.to_string(), links));
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.root.join("tags").join(upstream), "", &mut out)?;
        Ok(out)
    }

    /// Every digest linked to a repository of any upstream but `except`. Blocking.
    pub fn links_except(&self, except: &str) -> io::Result<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        let upstreams = match fs::read_dir(self.root.join("tags")) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for upstream in upstreams {
            let upstream = upstream?;
            let name = upstream.file_name().to_string_lossy().into_owned();
            if name != except && upstream.file_type()?.is_dir() {
                out.extend(self.all_links(&name)?);
            }
        }
        Ok(out)
    }

    fn deleted_path(&self, upstream: &str) -> PathBuf {
        self.root.join("tags").join(upstream).join("_deleted")
    }

    /// Notes digests a hosted repository no longer links (a manifest deleted), so that they
    /// stay hosted content across a restart until garbage collection has seen them. Blocking.
    pub fn add_deleted(&self, upstream: &str, digests: &[Digest]) -> io::Result<()> {
        let path = self.deleted_path(upstream);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let lines: String = digests.iter().map(|d| format!("{d}\n")).collect();
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(lines.as_bytes())
    }

    /// The digests noted by [`DiskStore::add_deleted`]. Blocking.
    pub fn deleted(&self, upstream: &str) -> io::Result<std::collections::HashSet<Digest>> {
        match fs::read_to_string(self.deleted_path(upstream)) {
            Ok(text) => Ok(text.lines().filter_map(|l| l.parse().ok()).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Default::default()),
            Err(e) => Err(e),
        }
    }

    /// Keeps only the noted digests `keep` says to. Blocking.
    pub fn retain_deleted(&self, upstream: &str, keep: impl Fn(&Digest) -> bool) -> io::Result<()> {
        let left: String = self
            .deleted(upstream)?
            .into_iter()
            .filter(|d| keep(d))
            .map(|d| format!("{d}\n"))
            .collect();
        self.write_atomic(&self.deleted_path(upstream), left.as_bytes())
    }

    // ---- upload sessions ----

    fn upload_dir(&self, session: &str) -> PathBuf {
        // Session ids are `[A-Za-z0-9_-]{1,64}` (checked by the router and by whoever made them).
        self.root.join("uploads").join(session)
    }

    /// Creates an empty upload session for `repo`, opened by `owner`. Its `data` comes last:
    /// a session is one once that is there, with everything else.
    pub fn create_upload(
        &self,
        session: &str,
        repo: &RepositoryName,
        owner: &str,
    ) -> io::Result<()> {
        let dir = self.upload_dir(session);
        fs::create_dir(&dir)?;
        let created = fs::write(dir.join("repository"), repo.as_str())
            .and_then(|()| fs::write(dir.join("owner"), owner))
            .and_then(|()| File::create(dir.join("data")).map(drop));
        if created.is_err() {
            // Half a session would hold no slot and never expire: none at all.
            let _ = fs::remove_dir_all(&dir);
        }
        created
    }

    /// An upload session's repository, its size so far and when it last took bytes; `None`
    /// when there is no such session.
    pub fn upload_info(&self, session: &str) -> io::Result<Option<UploadInfo>> {
        let dir = self.upload_dir(session);
        let repo = match fs::read_to_string(dir.join("repository")) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = match fs::metadata(dir.join("data")) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let owner = fs::read_to_string(dir.join("owner")).ok();
        Ok(Some(UploadInfo {
            repository: repo,
            size: meta.len(),
            touched: meta.modified().unwrap_or(UNIX_EPOCH),
            owner,
        }))
    }

    /// Every upload session on disk, with its info.
    pub fn uploads(&self) -> io::Result<Vec<(String, UploadInfo)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.root.join("uploads"))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !pier_oci::valid_session_id(&name) {
                continue;
            }
            if let Some(info) = self.upload_info(&name)? {
                out.push((name, info));
            }
        }
        Ok(out)
    }

    /// Appends `bytes` to a session's data, which must be `offset` bytes long. Returns the new
    /// length.
    pub fn append_upload(&self, session: &str, offset: u64, bytes: &[u8]) -> io::Result<u64> {
        let mut f = OpenOptions::new()
            .append(true)
            .open(self.upload_dir(session).join("data"))?;
        let len = f.metadata()?.len();
        if len != offset {
            return Err(io::Error::other(format!(
                "upload data is {len} bytes, expected {offset}"
            )));
        }
        f.write_all(bytes)?;
        Ok(offset + bytes.len() as u64)
    }

    /// Cuts a session's data back to `len` bytes (a chunk that did not arrive whole).
    pub fn truncate_upload(&self, session: &str, len: u64) -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(self.upload_dir(session).join("data"))?
            .set_len(len)
    }

    /// Removes an upload session and its data.
    pub fn remove_upload(&self, session: &str) -> io::Result<()> {
        match fs::remove_dir_all(self.upload_dir(session)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Finishes an upload: hashes its data (unless `known`, the digest its bytes were hashed to
    /// as they were written) and, when it is `digest`, makes it that blob (fsync, rename,
    /// fsync), unless the store holds it already (written once). The session goes either way.
    /// Returns the size, or `None` when the data is not `digest`.
    pub fn commit_upload(
        &self,
        session: &str,
        digest: &Digest,
        known: Option<&Digest>,
    ) -> io::Result<Option<u64>> {
        let data = self.upload_dir(session).join("data");
        let file = File::open(&data)?;
        let size = file.metadata()?.len();
        let actual = match known {
            Some(d) => d.clone(),
            None => {
                let mut hasher = pier_oci::Hasher::new(digest.algorithm());
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = io::Read::read(&mut &file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                hasher.finish()
            }
        };
        if actual != *digest {
            self.remove_upload(session)?;
            return Ok(None);
        }
        if !self.keep_placed(digest)? {
            self.commit(&file, &data, digest)?;
        }
        self.remove_upload(session)?;
        Ok(Some(size))
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
    fn records_of_earlier_versions_are_read() {
        let old = r#"{"digest":"sha256:00","media_type":"m","fetched_at":5}"#;
        let rec: TagRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.answers.len(), 1);
        assert_eq!(rec.answers[0].accept, 0);
        assert_eq!(rec.answers[0].accept_set(), None);
        let new = serde_json::to_string(&rec).unwrap();
        assert_eq!(serde_json::from_str::<TagRecord>(&new).unwrap(), rec);
    }

    #[test]
    fn upload_sessions_append_in_order_and_commit_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let repo = RepositoryName::parse("team/app").unwrap();
        store.create_upload("s1", &repo, "ip:127.0.0.1").unwrap();
        assert_eq!(store.append_upload("s1", 0, b"hello ").unwrap(), 6);
        // Not at the end: refused, nothing written.
        assert!(store.append_upload("s1", 2, b"x").is_err());
        assert_eq!(store.append_upload("s1", 6, b"world!!").unwrap(), 13);
        store.truncate_upload("s1", 11).unwrap();
        let info = store.upload_info("s1").unwrap().unwrap();
        assert_eq!((info.repository.as_str(), info.size), ("team/app", 11));
        assert_eq!(info.owner.as_deref(), Some("ip:127.0.0.1"));
        assert_eq!(store.uploads().unwrap().len(), 1);
        // A wrong digest keeps nothing.
        let wrong = Digest::sha256_of(b"other");
        assert_eq!(store.commit_upload("s1", &wrong, None).unwrap(), None);
        assert!(store.upload_info("s1").unwrap().is_none());
        assert!(!store.blob_path(&wrong).exists());
        // The right one becomes the blob; a second upload of it is not written again.
        let d = Digest::sha256_of(b"hello world");
        for session in ["s2", "s3"] {
            store.create_upload(session, &repo, "user:alice").unwrap();
            store.append_upload(session, 0, b"hello world").unwrap();
        }
        assert_eq!(store.commit_upload("s2", &d, None).unwrap(), Some(11));
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let first = inode(&store.blob_path(&d));
        assert_eq!(store.commit_upload("s3", &d, Some(&d)).unwrap(), Some(11));
        assert_eq!(inode(&store.blob_path(&d)), first);
        assert!(store.uploads().unwrap().is_empty());
        // Hosted links are found wherever the repository is.
        store
            .add_links("_hosted", &repo, LinkFile::All, std::slice::from_ref(&d))
            .unwrap();
        store
            .set_links(
                "_hosted",
                &RepositoryName::parse("x/y/z").unwrap(),
                LinkFile::All,
                std::slice::from_ref(&wrong),
            )
            .unwrap();
        let all = store.all_links("_hosted").unwrap();
        assert!(all.contains(&d) && all.contains(&wrong) && all.len() == 2);
    }

    /// A cache directory of a pier that recorded no manifests apart: each hosted repository's
    /// manifests are what it links that the store holds as manifests, recorded once.
    #[test]
    fn hosted_manifests_of_an_earlier_cache_are_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let repo = RepositoryName::parse("team/a").unwrap();
        let (manifest, blob) = (Digest::sha256_of(b"{}"), Digest::sha256_of(b"layer"));
        store.write_blob(&manifest, b"{}").unwrap();
        store
            .set_manifest_type(&manifest, "application/json")
            .unwrap();
        store.write_blob(&blob, b"layer").unwrap();
        store
            .add_links("_hosted", &repo, LinkFile::All, &[manifest.clone(), blob])
            .unwrap();
        store.record_hosted_manifests("_hosted").unwrap();
        assert_eq!(
            store.links("_hosted", &repo, LinkFile::Manifests).unwrap(),
            Some(vec![manifest])
        );
        // Recorded: a repository without a manifests file is not looked at again.
        let other = RepositoryName::parse("team/b").unwrap();
        store
            .add_links(
                "_hosted",
                &other,
                LinkFile::All,
                &[Digest::sha256_of(b"{}")],
            )
            .unwrap();
        store.record_hosted_manifests("_hosted").unwrap();
        assert_eq!(
            store.links("_hosted", &other, LinkFile::Manifests).unwrap(),
            None
        );
    }

    #[test]
    fn a_directory_is_open_once() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DiskStore::open(dir.path()).unwrap();
        let err = DiskStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn collection_leaves_a_blob_placed_again_since_its_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"hello");
        assert!(!store.keep_placed(&d).unwrap());
        store.write_blob(&d, b"hello").unwrap();
        let an_hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
        let age = |store: &DiskStore| {
            File::open(store.blob_path(&d))
                .unwrap()
                .set_modified(an_hour_ago)
                .unwrap()
        };
        // Just committed: kept.
        let cutoff = SystemTime::now() - std::time::Duration::from_secs(60);
        assert_eq!(store.remove_unused_blob(&d, cutoff).unwrap(), Some(5));
        // Unused since long before the cutoff: removed. Found by a second write: kept.
        age(&store);
        assert_eq!(store.remove_unused_blob(&d, cutoff).unwrap(), None);
        assert_eq!(store.blob_len(&d), None);
        assert_eq!(store.remove_unused_blob(&d, cutoff).unwrap(), None);
        store.write_blob(&d, b"hello").unwrap();
        age(&store);
        store.write_blob(&d, b"hello").unwrap();
        assert_eq!(store.remove_unused_blob(&d, cutoff).unwrap(), Some(5));
        assert_eq!(store.blob_len(&d), Some(5));
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
        let mut rec = TagRecord::default();
        rec.set(TagAnswer::new(
            AcceptSet::MODERN,
            &d,
            "application/json",
            SystemTime::now(),
        ));
        let set_tag = |u: &str, r: &RepositoryName, rec: &TagRecord| {
            store.write_record(&store.record_path(u, r, RecordName::Tag(&tag)), rec)
        };
        set_tag("docker.io", &repo, &rec).unwrap();
        assert_eq!(store.tag("docker.io", &repo, &tag), Some(rec.clone()));
        assert_eq!(store.tag("ghcr.io", &repo, &tag), None);
        let repo2 = RepositoryName::parse("library/x/y").unwrap();
        set_tag("ghcr.io", &repo2, &rec).unwrap();
        let mut repos = store.repositories().unwrap();
        repos.sort();
        assert_eq!(
            repos,
            vec![
                ("docker.io".to_string(), "library/x".to_string()),
                ("ghcr.io".to_string(), "library/x/y".to_string())
            ]
        );
        // Links: none yet, then appended, then gone with the tags.
        assert_eq!(
            store.links("docker.io", &repo, LinkFile::All).unwrap(),
            None
        );
        store
            .add_links("docker.io", &repo, LinkFile::All, std::slice::from_ref(&d))
            .unwrap();
        store
            .add_links(
                "docker.io",
                &repo,
                LinkFile::All,
                &[d.clone(), Digest::sha256_of(b"x")],
            )
            .unwrap();
        assert_eq!(
            store
                .links("docker.io", &repo, LinkFile::All)
                .unwrap()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(store.remove_tags("docker.io", &repo).unwrap(), 1);
        assert_eq!(
            store.links("docker.io", &repo, LinkFile::All).unwrap(),
            None
        );
        assert_eq!(store.tag("docker.io", &repo, &tag), None);
        // nothing left behind in tmp/
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
