//! The disk store's index: every blob's size and last access, in memory, so that the budget is
//! enforced and the least recently used blobs found without walking the disk.
//!
//! Last access is updated in memory on every hit (no disk write). Changed times are written back
//! to the files' mtimes in batches by the maintenance task, and read back by the scan at start-up,
//! so the order survives a restart to within one maintenance interval.
//!
//! Hosted content (pushed to pier, or mounted into a hosted repository) is *pinned*: never an
//! eviction victim, and counted apart, against the hosted budget rather than the mirror's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use pier_oci::Digest;

use crate::store::StoredBlob;

/// Milliseconds since the Unix epoch: the unit of last access.
pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Entry {
    size: u64,
    last_access: u64,
    /// Accessed since the last write-back.
    dirty: bool,
    /// Held by a hosted repository: never evicted, counted in `pinned_total`.
    pinned: bool,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    /// Bytes of mirrored (unpinned) content: what the mirror's budget and eviction see.
    total: u64,
    /// Bytes of hosted (pinned) content.
    pinned_total: u64,
}

impl Inner {
    fn account(&mut self, e: &Entry, add: bool) {
        let t = if e.pinned {
            &mut self.pinned_total
        } else {
            &mut self.total
        };
        if add {
            *t += e.size;
        } else {
            *t -= e.size;
        }
    }
}

#[derive(Default)]
pub(crate) struct Index {
    inner: Mutex<Inner>,
}

impl Index {
    /// The index of what a scan found; digests in `pinned` are hosted content.
    pub(crate) fn from_scan(
        blobs: Vec<StoredBlob>,
        pinned: &std::collections::HashSet<Digest>,
    ) -> Index {
        let mut inner = Inner::default();
        for b in blobs {
            let entry = Entry {
                size: b.size,
                last_access: b.last_access,
                dirty: false,
                pinned: pinned.contains(&b.digest),
            };
            inner.account(&entry, true);
            inner.entries.insert(b.digest, entry);
        }
        Index {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new blob (pinned if it was already); returns the new mirror total.
    pub(crate) fn insert(&self, digest: Digest, size: u64) -> u64 {
        let mut inner = self.lock();
        let pinned = inner.entries.get(&digest).is_some_and(|e| e.pinned);
        let entry = Entry {
            size,
            last_access: now_millis(),
            dirty: false,
            pinned,
        };
        inner.account(&entry, true);
        if let Some(old) = inner.entries.insert(digest, entry) {
            inner.account(&old, false);
        }
        inner.total
    }

    /// Records new hosted content, pinned from the start; returns the new mirror total.
    pub(crate) fn insert_pinned(&self, digest: Digest, size: u64) -> u64 {
        let mut inner = self.lock();
        let entry = Entry {
            size,
            last_access: now_millis(),
            dirty: false,
            pinned: true,
        };
        inner.account(&entry, true);
        if let Some(old) = inner.entries.insert(digest, entry) {
            inner.account(&old, false);
        }
        inner.total
    }

    /// Pins a blob on disk as hosted content. Returns its size when it was not pinned before
    /// (its bytes move from the mirror's total to the hosted one), `Some(0)` when it already
    /// was, `None` when it is not indexed.
    /// A pin is a use: garbage collection leaves what was pinned lately.
    pub(crate) fn pin(&self, digest: &Digest) -> Option<u64> {
        let now = now_millis();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let e = inner.entries.get_mut(digest)?;
        if e.last_access != now {
            e.last_access = now;
            e.dirty = true;
        }
        if e.pinned {
            return Some(0);
        }
        e.pinned = true;
        inner.total -= e.size;
        inner.pinned_total += e.size;
        Some(e.size)
    }

    /// Whether a blob is pinned as hosted content.
    pub(crate) fn is_pinned(&self, digest: &Digest) -> bool {
        self.lock().entries.get(digest).is_some_and(|e| e.pinned)
    }

    /// Bytes of hosted (pinned) content.
    pub(crate) fn pinned_bytes(&self) -> u64 {
        self.lock().pinned_total
    }

    /// Whether verified content with this digest is on disk.
    pub(crate) fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// The size of verified content on disk.
    pub(crate) fn size(&self, digest: &Digest) -> Option<u64> {
        self.lock().entries.get(digest).map(|e| e.size)
    }

    /// Marks a blob used now.
    pub(crate) fn touch(&self, digest: &Digest) {
        self.touch_present(digest);
    }

    /// Marks a blob used now; returns whether it is indexed. One step, so that garbage
    /// collection (which removes only what was not used lately) either sees the use or has
    /// already removed the blob.
    pub(crate) fn touch_present(&self, digest: &Digest) -> bool {
        let now = now_millis();
        let mut inner = self.lock();
        match inner.entries.get_mut(digest) {
            Some(e) => {
                if e.last_access != now {
                    e.last_access = now;
                    e.dirty = true;
                }
                true
            }
            None => false,
        }
    }

    /// Every pinned (hosted) object: digest, size and last access.
    pub(crate) fn pinned(&self) -> Vec<(Digest, u64, u64)> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| e.pinned)
            .map(|(d, e)| (d.clone(), e.size, e.last_access))
            .collect()
    }

    /// Unpins an object last used before `cutoff`: its bytes go back to the mirror's total, and
    /// the mirror's LRU may evict it. Returns its size; `None` when it is not pinned or was used
    /// since.
    pub(crate) fn unpin_unused(&self, digest: &Digest, cutoff: u64) -> Option<u64> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let e = inner.entries.get_mut(digest)?;
        if !e.pinned || e.last_access >= cutoff {
            return None;
        }
        e.pinned = false;
        inner.pinned_total -= e.size;
        inner.total += e.size;
        Some(e.size)
    }

    /// Forgets a pinned object last used before `cutoff` (its file is removed next). Returns
    /// its size; `None` when it is not pinned or was used since.
    pub(crate) fn remove_unused(&self, digest: &Digest, cutoff: u64) -> Option<u64> {
        let mut inner = self.lock();
        if !inner
            .entries
            .get(digest)
            .is_some_and(|e| e.pinned && e.last_access < cutoff)
        {
            return None;
        }
        let e = inner.entries.remove(digest)?;
        inner.account(&e, false);
        Some(e.size)
    }

    /// Records a blob found on disk, unpinned, unless it is indexed already.
    pub(crate) fn restore(&self, digest: Digest, size: u64) {
        let mut inner = self.lock();
        if inner.entries.contains_key(&digest) {
            return;
        }
        let entry = Entry {
            size,
            last_access: now_millis(),
            dirty: false,
            pinned: false,
        };
        inner.account(&entry, true);
        inner.entries.insert(digest, entry);
    }

    /// Forgets a blob; returns the new total if it was there.
    pub(crate) fn remove(&self, digest: &Digest) -> Option<u64> {
        let mut inner = self.lock();
        let e = inner.entries.remove(digest)?;
        inner.account(&e, false);
        Some(inner.total)
    }

    /// Bytes of mirrored content, and objects (mirrored and hosted).
    pub(crate) fn usage(&self) -> (u64, usize) {
        let inner = self.lock();
        (inner.total, inner.entries.len())
    }

    /// Access times changed since the last call, to write back.
    pub(crate) fn take_dirty(&self) -> Vec<(Digest, u64)> {
        let mut inner = self.lock();
        let mut out = Vec::new();
        for (d, e) in inner.entries.iter_mut().filter(|(_, e)| e.dirty) {
            e.dirty = false;
            out.push((d.clone(), e.last_access));
        }
        out
    }

    /// What to remove, oldest access first: everything last used before `older_than` (if given),
    /// then more until the total is at most `target` bytes.
    pub(crate) fn victims(
        &self,
        target: Option<u64>,
        older_than: Option<u64>,
    ) -> Vec<(Digest, u64)> {
        let inner = self.lock();
        // Hosted content is never a victim, and is not in `total`.
        let mut all: Vec<(&Digest, &Entry)> =
            inner.entries.iter().filter(|(_, e)| !e.pinned).collect();
        all.sort_by_key(|(_, e)| e.last_access);
        let mut total = inner.total;
        let mut out = Vec::new();
        for (d, e) in all {
            let too_old = older_than.is_some_and(|cutoff| e.last_access < cutoff);
            let over = target.is_some_and(|t| total > t);
            if !too_old && !over {
                break;
            }
            total -= e.size;
            out.push((d.clone(), e.size));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, size: u64, last_access: u64) -> StoredBlob {
        StoredBlob {
            digest: Digest::sha256_of(&[n]),
            size,
            last_access,
        }
    }

    #[test]
    fn victims_are_least_recently_used_first_down_to_target() {
        let idx = Index::from_scan(
            vec![
                blob(1, 100, 30),
                blob(2, 100, 10),
                blob(3, 100, 20),
                blob(4, 100, 40),
            ],
            &Default::default(),
        );
        assert_eq!(idx.usage(), (400, 4));
        let v: Vec<Digest> = idx
            .victims(Some(200), None)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(v, vec![Digest::sha256_of(&[2]), Digest::sha256_of(&[3])]);
        // A touch moves a blob to the back of the line.
        idx.touch(&Digest::sha256_of(&[2]));
        let v: Vec<Digest> = idx
            .victims(Some(300), None)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(v, vec![Digest::sha256_of(&[3])]);
        assert_eq!(idx.take_dirty().len(), 1);
        assert!(idx.take_dirty().is_empty());
    }

    #[test]
    fn pinned_blobs_are_never_victims_and_counted_apart() {
        let pinned: std::collections::HashSet<Digest> = [Digest::sha256_of(&[2])].into();
        let idx = Index::from_scan(vec![blob(1, 100, 30), blob(2, 100, 10)], &pinned);
        assert_eq!(idx.usage(), (100, 2));
        assert_eq!(idx.pinned_bytes(), 100);
        let v = idx.victims(Some(0), Some(u64::MAX));
        assert_eq!(v, vec![(Digest::sha256_of(&[1]), 100)]);
        // Pinning moves the bytes; a second pin adds nothing; re-inserting keeps the pin.
        assert_eq!(idx.pin(&Digest::sha256_of(&[1])), Some(100));
        assert_eq!(idx.pin(&Digest::sha256_of(&[1])), Some(0));
        assert_eq!(idx.pin(&Digest::sha256_of(&[9])), None);
        assert_eq!(idx.insert(Digest::sha256_of(&[1]), 100), 0);
        assert!(idx.is_pinned(&Digest::sha256_of(&[1])));
        assert_eq!(idx.pinned_bytes(), 200);
        assert!(idx.victims(Some(0), Some(u64::MAX)).is_empty());
        assert_eq!(idx.remove(&Digest::sha256_of(&[1])), Some(0));
        assert_eq!(idx.pinned_bytes(), 100);
    }

    #[test]
    fn unused_pinned_objects_are_unpinned_or_removed_but_not_used_ones() {
        let pinned: std::collections::HashSet<Digest> =
            [Digest::sha256_of(&[1]), Digest::sha256_of(&[2])].into();
        let idx = Index::from_scan(vec![blob(1, 100, 10), blob(2, 50, 10)], &pinned);
        assert_eq!(idx.pinned().len(), 2);
        // Used since the cutoff: kept.
        assert!(idx.touch_present(&Digest::sha256_of(&[1])));
        assert_eq!(idx.unpin_unused(&Digest::sha256_of(&[1]), 20), None);
        assert_eq!(idx.remove_unused(&Digest::sha256_of(&[1]), 20), None);
        assert_eq!(idx.unpin_unused(&Digest::sha256_of(&[2]), 20), Some(50));
        assert_eq!(idx.usage(), (50, 2));
        assert_eq!(idx.pinned_bytes(), 100);
        // No longer pinned: not a hosted object to remove.
        assert_eq!(idx.remove_unused(&Digest::sha256_of(&[2]), 20), None);
        assert_eq!(
            idx.remove_unused(&Digest::sha256_of(&[1]), u64::MAX),
            Some(100)
        );
        assert_eq!(idx.pinned_bytes(), 0);
        assert!(!idx.touch_present(&Digest::sha256_of(&[1])));
    }

    #[test]
    fn victims_by_age() {
        let idx = Index::from_scan(
            vec![blob(1, 100, 30), blob(2, 100, 10), blob(3, 100, 20)],
            &Default::default(),
        );
        let v = idx.victims(None, Some(25));
        assert_eq!(v.len(), 2);
        assert!(idx.victims(None, None).is_empty());
        assert_eq!(idx.remove(&Digest::sha256_of(&[1])), Some(200));
        assert_eq!(idx.insert(Digest::sha256_of(&[9]), 50), 250);
    }
}
