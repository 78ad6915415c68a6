//! Tag records: what the upstream answered for each tag (and each digest's referrers), per accept
//! set. [`TagRecords::record`] is the only writer, on disk and in memory.

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

fn key(upstream: &str, repo: &RepositoryName, name: RecordName<'_>) -> String {
    format!("{upstream}/{repo}{name}")
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

    /// Records `answer` for its accept set, keeping the answers of other sets.
    pub(crate) async fn record(
        &self,
        disk: &Disk,
        upstream: &str,
        repo: &RepositoryName,
        name: RecordName<'_>,
        answer: TagAnswer,
    ) -> io::Result<()> {
        let k = key(upstream, repo, name);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        let _writing = self.writers[h.finish() as usize % WRITE_SHARDS]
            .lock()
            .await;
        let mut rec = (*self.get(disk, upstream, repo, name).await?).clone();
        rec.set(answer);
        let (path, stored) = (
            disk.blocking().record_path(upstream, repo, name),
            rec.clone(),
        );
        disk.run(move |store| store.write_record(&path, &stored))
            .await?;
        self.memory.insert(k, Arc::new(rec)).await;
        Ok(())
    }

    /// Forgets every record held in memory (after a purge removed some from disk).
    pub(crate) fn forget_all(&self) {
        self.memory.invalidate_all();
    }
}
