//! Dirty chunks of a writable mount: written bytes live here, decoded, until they are encoded and
//! stored. Readers consult this before the clean cache, so every process sees written bytes at
//! once; dirty chunks are never evicted, only written back.
//!
//! Each write is applied to all its chunks under one lock, which makes the result of concurrent
//! writers exactly that of some serial order of their writes, and keeps a write-back from
//! retiring a chunk halfway through a write. A chunk being stored keeps accepting writes: each
//! dirty chunk carries a version, and a stored copy only retires the dirty chunk when no write
//! came in since the copy was taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Bumped whenever write-back retires a chunk: bases loaded before then may be stale.
    epoch: AtomicU64,
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

    /// Take before loading bases for [`apply`](Self::apply).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Apply one write atomically with respect to write-back: copy `data[src..src+len]` to
    /// `chunk[dst..dst+len]` for each `(key, chunk indices, dst, src, len)` piece. A chunk that is
    /// not dirty starts from its entry in `bases`, loaded since `epoch`. If one lacks a base, or
    /// a write-back retired chunks since `epoch` (so a base may predate a stored write),
    /// nothing is applied and the keys that need a (fresh) base are returned.
    pub fn apply(
        &self,
        pieces: &[(ChunkKey, &[u64], usize, usize, usize)],
        bases: &HashMap<ChunkKey, Chunk>,
        epoch: u64,
        data: &[u8],
    ) -> Result<(), Vec<ChunkKey>> {
        let mut map = self.map.lock().unwrap();
        let fresh = self.epoch.load(Ordering::SeqCst) == epoch;
        let mut lacking: Vec<ChunkKey> =
            pieces.iter().map(|p| p.0).filter(|k| !map.contains_key(k) && !(fresh && bases.contains_key(k))).collect();
        if !lacking.is_empty() {
            lacking.dedup();
            return Err(lacking);
        }
        for &(key, chunk, dst, src, len) in pieces {
            let dirty = map
                .entry(key)
                .or_insert_with(|| Dirty { chunk: chunk.to_vec(), data: bases[&key].clone(), version: 0 });
            Arc::make_mut(&mut dirty.data)[dst..dst + len].copy_from_slice(&data[src..src + len]);
            dirty.version += 1;
        }
        Ok(())
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
                self.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dirty: &DirtyChunks, bases: &HashMap<ChunkKey, Chunk>, at: usize, value: u8) -> Result<(), Vec<ChunkKey>> {
        dirty.apply(&[((0, 1), &[1], at, 0, 1)], bases, dirty.epoch(), &[value])
    }

    #[test]
    fn edits_copy_on_write_and_retire_by_version() {
        let dirty = DirtyChunks::default();
        let base: Chunk = Arc::new(vec![0u8; 4]);
        assert_eq!(write(&dirty, &HashMap::new(), 0, 7), Err(vec![(0, 1)]), "no base, nothing applied");
        let bases = HashMap::from([((0, 1), base.clone())]);
        write(&dirty, &bases, 0, 7).unwrap();
        assert_eq!(*base, vec![0; 4], "the clean chunk a reader holds is untouched");
        assert_eq!(*dirty.get((0, 1)).unwrap(), vec![7, 0, 0, 0]);
        assert_eq!(dirty.bytes(), 4);

        let snap = dirty.snapshot(|_| true);
        write(&dirty, &HashMap::new(), 1, 8).unwrap(); // written while being stored
        let cleaned = Mutex::new(Vec::new());
        dirty.retire(&snap, |k, c| cleaned.lock().unwrap().push((k, c)));
        assert!(cleaned.lock().unwrap().is_empty(), "a newer write keeps the chunk dirty");
        assert_eq!(*dirty.get((0, 1)).unwrap(), vec![7, 8, 0, 0]);

        let snap = dirty.snapshot(|_| true);
        dirty.retire(&snap, |k, c| cleaned.lock().unwrap().push((k, c)));
        assert_eq!(cleaned.lock().unwrap().len(), 1);
        assert!(!dirty.contains((0, 1)));
        assert_eq!(dirty.bytes(), 0);
        assert_eq!(write(&dirty, &HashMap::new(), 2, 9), Err(vec![(0, 1)]), "retired: needs a base again");
        let stale_epoch = dirty.epoch() - 1;
        let r = dirty.apply(&[((0, 1), &[1], 0, 0, 1)], &bases, stale_epoch, &[1]);
        assert_eq!(r, Err(vec![(0, 1)]), "a base loaded before a retire is not trusted");
    }

    #[test]
    fn snapshot_selects() {
        let dirty = DirtyChunks::default();
        for a in 0..3u32 {
            let bases = HashMap::from([((a, 0), Arc::new(vec![0u8]))]);
            dirty.apply(&[((a, 0), &[0], 0, 0, 1)], &bases, dirty.epoch(), &[1]).unwrap();
        }
        let picked: Vec<_> = dirty.snapshot(|k| k.0 == 1).into_iter().map(|s| s.key).collect();
        assert_eq!(picked, vec![(1, 0)]);
    }
}
