//! Tag records: what the upstream answered for each tag (and each digest's referrers), per accept
//! set. [`TagRecords::record`] (mirrored answers, one accept set at a time) and
//! [`TagRecords::replace`] / [`TagRecords::remove`] (hosted tags, whole records) are the only
//! writers, on disk and in memory.

use std::hash::{Hash, Hasher};
use std::io;
use std::sync::Arc;

use pier_oci::RepositoryName;

use crate::disk::Disk;
use crate::store::{RecordName, TagAnswer, TagRecord};

/// Writers of one record take the same lock, so that two accept sets answered at once both land.
const WRITE_SHARDS: usize = 16;

/// Tag records, kept in memory so that a tag lookup reads no file.
pub(crate) struct TagRecords {
    /// By `<upstream>/<repo>:<tag>`; an empty record stands for "none on disk".
    memory: moka::future::Cache<String, Arc<TagRecord>>,
    writers: [tokio::sync::Mutex<()>; WRITE_SHARDS],
}

/// `upstream/repo:tag` or `upstream/repo@digest/referrers` (joined, not formatted: every pull
/// by tag builds one).
fn key(upstream: &str, repo: &RepositoryName, name: RecordName<'_>) -> String {
    let (sep, name, suffix) = match name {
        RecordName::Tag(t) => (":", t.as_str(), ""),
        RecordName::Referrers(d) => ("@", d.as_str(), "/referrers"),
    };
    [upstream, "/", repo.as_str(), sep, name, suffix].concat()
}

impl TagRecords {
    pub(crate) fn new() -> Self {
        TagRecords {
            memory: moka::future::Cache::new(100_000),
            writers: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        }
    }

    /// The record of a tag or referrers answer (empty when pier never saw it).
    pub(crate) async fn get(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
    ) -> io::Result<Arc<TagRecord>> {
        let k = key(upstream, repo, name);
        if let Some(rec) = self.memory.get(&k).await {
            return Ok(rec);
        }
        let path = disk.blocking().record_path(upstream, repo, name);
        let rec = Arc::new(
            disk.run(move |store| Ok(store.read_record(&path)))
                .await?
                .unwrap_or_default(),
        );
        self.memory.insert(k, rec.clone()).await;
        Ok(rec)
    }

    /// Records `answers`, each for its accept set, keeping the answers of other sets and an
    /// answer newer than the one offered (records merged from the region may be older than
    /// this node's). Returns the record as it now stands.
    pub(crate) async fn record(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
        answers: impl IntoIterator<Item = TagAnswer>,
    ) -> io::Result<Arc<TagRecord>> {
        let k = key(upstream, repo, name);
        let _writing = self.writer(&k).lock().await;
        let current = self.get(disk, upstream, repo, name).await?;
        let mut rec = (*current).clone();
        for answer in answers {
            let newer = rec
                .answers
                .iter()
                .find(|a| a.accept == answer.accept)
                .is_none_or(|a| a.fetched_at <= answer.fetched_at && *a != answer);
            if newer {
                rec.set(answer);
            }
        }
        if rec == *current {
            return Ok(current);
        }
        let (path, stored) = (
            disk.blocking().record_path(upstream, repo, name),
            rec.clone(),
        );
        disk.run(move |store| store.write_record(&path, &stored))
            .await?;
        let rec = Arc::new(rec);
        self.memory.insert(k, rec.clone()).await;
        Ok(rec)
    }

    /// Replaces a record whole (a hosted tag: one answer, whatever the client accepts).
    pub(crate) async fn replace(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
        record: TagRecord,
    ) -> io::Result<()> {
        let k = key(upstream, repo, name);
        let _writing = self.writer(&k).lock().await;
        let (path, stored) = (
            disk.blocking().record_path(upstream, repo, name),
            record.clone(),
        );
        disk.run(move |store| store.write_record(&path, &stored))
            .await?;
        self.memory.insert(k, Arc::new(record)).await;
        Ok(())
    }

    /// Removes a record (a hosted tag deleted).
    pub(crate) async fn remove(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
    ) -> io::Result<()> {
        let k = key(upstream, repo, name);
        let _writing = self.writer(&k).lock().await;
        let path = disk.blocking().record_path(upstream, repo, name);
        disk.run(move |store| store.remove_record(&path)).await?;
        self.memory.insert(k, Arc::new(TagRecord::default())).await;
        Ok(())
    }

    fn writer(&self, key: &str) -> &tokio::sync::Mutex<()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.writers[h.finish() as usize % WRITE_SHARDS]
    }

    /// Forgets every record held in memory (after a purge removed some from disk).
    pub(crate) fn forget_all(&self) {
        self.memory.invalidate_all();
    }
}
