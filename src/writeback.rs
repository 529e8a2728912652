//! Dirty chunks of a writable mount: written bytes live here, decoded, until they are encoded and
//! stored. Readers consult this before the clean cache, so every process sees written bytes at
//! once; dirty chunks are never evicted, only written back.
//!
//! Writers are serialised (one `write` at a time applies its bytes to its chunks), which makes
//! the result of concurrent writers exactly that of some serial order of their writes. A chunk
//! being stored keeps accepting writes: each dirty chunk carries a version, and a stored copy
//! only retires the dirty chunk when no write came in since the copy was taken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cache::{Chunk, ChunkKey};

struct Dirty {
    /// Grid indices of the chunk in its array.
    chunk: Vec<u64>,
    data: Chunk,
    version: u64,
}

/// A copy of one dirty chunk taken for storing.
pub struct Snapshot {
    pub key: ChunkKey,
    pub chunk: Vec<u64>,
    pub data: Chunk,
    version: u64,
}

#[derive(Default)]
pub struct DirtyChunks {
    map: Mutex<HashMap<ChunkKey, Dirty>>,
    /// Held by a write for its whole duration.
    writers: Mutex<()>,
    /// Held while chunks are being stored: one write-back at a time.
    flushing: Mutex<()>,
}

impl DirtyChunks {
    /// The dirty contents of a chunk, if it has unstored writes.
    pub fn get(&self, key: ChunkKey) -> Option<Chunk> {
        self.map.lock().unwrap().get(&key).map(|d| d.data.clone())
    }

    pub fn contains(&self, key: ChunkKey) -> bool {
        self.map.lock().unwrap().contains_key(&key)
    }

    /// Bytes held by dirty chunks.
    pub fn bytes(&self) -> u64 {
        self.map.lock().unwrap().values().map(|d| d.data.len() as u64).sum()
    }

    /// Serialise writers; hold the guard while loading bases and applying a write.
    pub fn begin_write(&self) -> MutexGuard<'_, ()> {
        self.writers.lock().unwrap()
    }

    /// Make `key` dirty with `base` as its current contents, unless it already is.
    pub fn ensure(&self, key: ChunkKey, chunk: &[u64], base: Chunk) {
        self.map.lock().unwrap().entry(key).or_insert_with(|| Dirty { chunk: chunk.to_vec(), data: base, version: 0 });
    }

    /// Apply `edit` to the bytes of dirty chunk `key` (copied first if a reader still holds
    /// them). The chunk must have been made dirty with [`ensure`](Self::ensure).
    pub fn edit(&self, key: ChunkKey, edit: impl FnOnce(&mut [u8])) {
        let mut map = self.map.lock().unwrap();
        let dirty = map.get_mut(&key).expect("ensure() before edit()");
        edit(Arc::make_mut(&mut dirty.data).as_mut_slice());
        dirty.version += 1;
    }

    /// Serialise write-backs; hold the guard from [`snapshot`](Self::snapshot) to
    /// [`retire`](Self::retire).
    pub fn begin_flush(&self) -> MutexGuard<'_, ()> {
        self.flushing.lock().unwrap()
    }

    /// Copies (shared, not duplicated) of the dirty chunks that `select` picks.
    pub fn snapshot(&self, select: impl Fn(ChunkKey) -> bool) -> Vec<Snapshot> {
        let map = self.map.lock().unwrap();
        let mut out: Vec<Snapshot> = map
            .iter()
            .filter(|(k, _)| select(**k))
            .map(|(k, d)| Snapshot { key: *k, chunk: d.chunk.clone(), data: d.data.clone(), version: d.version })
            .collect();
        out.sort_by_key(|s| s.key);
        out
    }

    /// The snapshots are stored: drop each dirty chunk that has not been written since its
    /// snapshot, handing its contents to `clean` while the map is locked, so a reader finds the
    /// chunk either dirty or with its new clean contents, never the old ones.
    pub fn retire(&self, stored: &[Snapshot], clean: impl Fn(ChunkKey, Chunk)) {
        let mut map = self.map.lock().unwrap();
        for s in stored {
            if map.get(&s.key).is_some_and(|d| d.version == s.version) {
                clean(s.key, s.data.clone());
                map.remove(&s.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_copy_on_write_and_retire_by_version() {
        let dirty = DirtyChunks::default();
        let base: Chunk = Arc::new(vec![0u8; 4]);
        dirty.ensure((0, 1), &[1], base.clone());
        dirty.edit((0, 1), |b| b[0] = 7);
        assert_eq!(*base, vec![0; 4], "the clean chunk a reader holds is untouched");
        assert_eq!(*dirty.get((0, 1)).unwrap(), vec![7, 0, 0, 0]);
        assert_eq!(dirty.bytes(), 4);

        let snap = dirty.snapshot(|_| true);
        dirty.edit((0, 1), |b| b[1] = 8); // written while being stored
        let cleaned = Mutex::new(Vec::new());
        dirty.retire(&snap, |k, c| cleaned.lock().unwrap().push((k, c)));
        assert!(cleaned.lock().unwrap().is_empty(), "a newer write keeps the chunk dirty");
        assert_eq!(*dirty.get((0, 1)).unwrap(), vec![7, 8, 0, 0]);

        let snap = dirty.snapshot(|_| true);
        dirty.retire(&snap, |k, c| cleaned.lock().unwrap().push((k, c)));
        assert_eq!(cleaned.lock().unwrap().len(), 1);
        assert!(!dirty.contains((0, 1)));
        assert_eq!(dirty.bytes(), 0);
    }

    #[test]
    fn snapshot_selects() {
        let dirty = DirtyChunks::default();
        for a in 0..3u32 {
            dirty.ensure((a, 0), &[0], Arc::new(vec![0]));
        }
        let picked: Vec<_> = dirty.snapshot(|k| k.0 == 1).into_iter().map(|s| s.key).collect();
        assert_eq!(picked, vec![(1, 0)]);
    }
}
