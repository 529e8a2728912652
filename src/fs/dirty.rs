//! Dirty chunks of a writable mount: written bytes live here, decoded, until they are encoded and
//! stored. Readers consult this before the clean cache, so every process sees written bytes at
//! once; dirty chunks are never evicted, only written back.
//!
//! Each write is applied to all its chunks under one lock, which makes the result of concurrent
//! writers exactly that of some serial order of their writes, and keeps a write-back from
//! retiring a chunk halfway through a write. A chunk being stored keeps accepting writes: each
//! dirty chunk carries a version, and a stored copy only retires the dirty chunk when no write
//! came in since the copy was taken.
//!
//! A writer loads the stored contents of chunks it is about to dirty outside the lock; if one of
//! those chunks was written back meanwhile, the loaded copy may miss a write. Retirements are
//! logged per chunk, so only such a chunk is loaded again: a global "something was retired"
//! signal would make a writer of many chunks start over every time another writer's chunk is
//! stored, and under steady write-back pressure it never finishes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

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

/// How many recent retirements are remembered. A writer whose bases are older than that reloads
/// all of them, which is correct, only slower.
const RETIRED_LOG: usize = 4096;

#[derive(Default)]
struct State {
    map: HashMap<ChunkKey, Dirty>,
    /// Counts retirements: a writer notes it before loading bases.
    epoch: u64,
    /// `(epoch after the retirement, chunk)` for the last [`RETIRED_LOG`] retirements.
    retired: VecDeque<(u64, ChunkKey)>,
    /// Bytes of dirty chunks copied on write because a snapshot being stored (or a reader)
    /// still held the previous contents: memory in use until the write-back ends.
    copied: u64,
}

impl State {
    fn bytes(&self) -> u64 {
        self.map.values().map(|d| d.data.len() as u64).sum::<u64>() + self.copied
    }
}

impl State {
    /// Whether a base of `key` loaded at `epoch` may predate a write that has since been stored.
    fn stale(&self, key: ChunkKey, epoch: u64) -> bool {
        if epoch == self.epoch {
            return false;
        }
        match self.retired.front() {
            Some(&(oldest, _)) if oldest <= epoch + 1 => {
                self.retired.iter().rev().take_while(|(e, _)| *e > epoch).any(|(_, k)| *k == key)
            }
            _ => true, // the log no longer reaches back to `epoch`
        }
    }
}

#[derive(Default)]
pub struct DirtyChunks {
    state: Mutex<State>,
    /// Held while chunks are being stored: one write-back at a time.
    flushing: Mutex<()>,
}

impl DirtyChunks {
    /// The dirty contents of a chunk, if it has unstored writes.
    pub fn get(&self, key: ChunkKey) -> Option<Chunk> {
        self.state.lock().map.get(&key).map(|d| d.data.clone())
    }

    pub fn contains(&self, key: ChunkKey) -> bool {
        self.state.lock().map.contains_key(&key)
    }

    /// Bytes held by dirty chunks, copies made while they were being stored included.
    pub fn bytes(&self) -> u64 {
        self.state.lock().bytes()
    }

    /// Hand the current [`bytes`](Self::bytes) to `publish` while no write or write-back can
    /// change them, so that two callers cannot publish their counts in the wrong order.
    pub fn publish_bytes(&self, publish: impl FnOnce(u64)) -> u64 {
        let state = self.state.lock();
        let bytes = state.bytes();
        publish(bytes);
        bytes
    }

    /// A write-back has ended and dropped its snapshots: the copies they caused are all that is left.
    pub fn forget_copies(&self) {
        self.state.lock().copied = 0;
    }

    /// Take before loading bases for [`apply`](Self::apply).
    pub fn epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    /// Apply one write atomically with respect to write-back: copy `data[src..src+len]` to
    /// `chunk[dst..dst+len]` for each `(key, chunk indices, dst, src, len)` piece. A chunk that is
    /// not dirty starts from its entry in `bases`, loaded since `epoch`. If one lacks a base, or
    /// its chunk was retired since `epoch` (so the base may predate a stored write), nothing is
    /// applied and the keys that need a (fresh) base are returned, with the epoch to load them
    /// at; the other bases stay good for that epoch.
    pub fn apply(
        &self,
        pieces: &[(ChunkKey, &[u64], usize, usize, usize)],
        bases: &HashMap<ChunkKey, Chunk>,
        epoch: u64,
        data: &[u8],
    ) -> Result<(), (Vec<ChunkKey>, u64)> {
        let mut state = self.state.lock();
        let mut lacking: Vec<ChunkKey> = pieces
            .iter()
            .map(|p| p.0)
            .filter(|k| !state.map.contains_key(k) && (!bases.contains_key(k) || state.stale(*k, epoch)))
            .collect();
        if !lacking.is_empty() {
            lacking.dedup();
            return Err((lacking, state.epoch));
        }
        let State { map, copied, .. } = &mut *state;
        for &(key, chunk, dst, src, len) in pieces {
            let dirty = map.entry(key).or_insert_with(|| Dirty {
                chunk: chunk.to_vec(),
                data: bases[&key].clone(),
                version: 0,
            });
            if dirty.version > 0 && Arc::strong_count(&dirty.data) > 1 {
                *copied += dirty.data.len() as u64; // make_mut is about to copy it
            }
            Arc::make_mut(&mut dirty.data)[dst..dst + len].copy_from_slice(&data[src..src + len]);
            dirty.version += 1;
        }
        Ok(())
    }

    /// Serialise write-backs; hold the guard from [`snapshot`](Self::snapshot) to
    /// [`retire`](Self::retire).
    pub fn begin_flush(&self) -> MutexGuard<'_, ()> {
        self.flushing.lock()
    }

    /// Copies (shared, not duplicated) of the dirty chunks that `select` picks.
    pub fn snapshot(&self, select: impl Fn(ChunkKey) -> bool) -> Vec<Snapshot> {
        let state = self.state.lock();
        let mut out: Vec<Snapshot> = state
            .map
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
        let mut state = self.state.lock();
        for s in stored {
            if state.map.get(&s.key).is_some_and(|d| d.version == s.version) {
                clean(s.key, s.data.clone());
                state.map.remove(&s.key);
                state.epoch += 1;
                let entry = (state.epoch, s.key);
                if state.retired.len() == RETIRED_LOG {
                    state.retired.pop_front();
                }
                state.retired.push_back(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dirty: &DirtyChunks, bases: &HashMap<ChunkKey, Chunk>, at: usize, value: u8) -> Result<(), Vec<ChunkKey>> {
        dirty.apply(&[((0, 1), &[1], at, 0, 1)], bases, dirty.epoch(), &[value]).map_err(|(keys, _)| keys)
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
        assert_eq!(dirty.bytes(), 8, "the copy beside the snapshot counts");
        let cleaned = Mutex::new(Vec::new());
        dirty.retire(&snap, |k, c| cleaned.lock().push((k, c)));
        assert!(cleaned.lock().is_empty(), "a newer write keeps the chunk dirty");
        assert_eq!(*dirty.get((0, 1)).unwrap(), vec![7, 8, 0, 0]);

        let snap = dirty.snapshot(|_| true);
        dirty.retire(&snap, |k, c| cleaned.lock().push((k, c)));
        assert_eq!(cleaned.lock().len(), 1);
        assert!(!dirty.contains((0, 1)));
        drop(snap);
        dirty.forget_copies();
        assert_eq!(dirty.bytes(), 0);
        assert_eq!(write(&dirty, &HashMap::new(), 2, 9), Err(vec![(0, 1)]), "retired: needs a base again");
        let stale_epoch = dirty.epoch() - 1;
        let r = dirty.apply(&[((0, 1), &[1], 0, 0, 1)], &bases, stale_epoch, &[1]);
        assert_eq!(r, Err((vec![(0, 1)], dirty.epoch())), "a base loaded before a retire is not trusted");
    }

    /// Retiring other chunks does not invalidate a writer's bases: a writer of many chunks
    /// finishes however often another writer's chunk is stored.
    #[test]
    fn only_retired_chunks_need_a_new_base() {
        let dirty = DirtyChunks::default();
        let base: Chunk = Arc::new(vec![0u8; 2]);
        let epoch = dirty.epoch();
        let (a, b, other) = ((0, 1), (0, 2), (1, 0));
        for _ in 0..3 {
            // another writer dirties and stores `other` while bases of `a` and `b` load
            dirty
                .apply(&[(other, &[0], 0, 0, 1)], &HashMap::from([(other, base.clone())]), dirty.epoch(), &[5])
                .unwrap();
            let snap = dirty.snapshot(|k| k == other);
            dirty.retire(&snap, |_, _| {});
        }
        let bases = HashMap::from([(a, base.clone()), (b, base.clone())]);
        let pieces: [(ChunkKey, &[u64], usize, usize, usize); 2] = [(a, &[1], 0, 0, 1), (b, &[2], 0, 1, 1)];
        dirty.apply(&pieces, &bases, epoch, &[1, 2]).expect("no base went stale");
        assert_eq!(*dirty.get(b).unwrap(), vec![2, 0]);

        // `b` is stored and retired after a later writer noted its epoch: only `b` reloads
        let epoch = dirty.epoch();
        let snap = dirty.snapshot(|k| k == b);
        dirty.retire(&snap, |_, _| {});
        let snap = dirty.snapshot(|k| k == a);
        dirty.retire(&snap, |_, _| {});
        let pieces: [(ChunkKey, &[u64], usize, usize, usize); 1] = [(b, &[2], 1, 0, 1)];
        assert_eq!(dirty.apply(&pieces, &bases, epoch, &[3]), Err((vec![b], epoch + 2)));
        let pieces: [(ChunkKey, &[u64], usize, usize, usize); 1] = [(a, &[1], 1, 0, 1)];
        assert_eq!(dirty.apply(&pieces, &bases, epoch + 1, &[3]), Err((vec![a], epoch + 2)));
    }

    #[test]
    fn a_log_that_no_longer_reaches_back_trusts_no_base() {
        let dirty = DirtyChunks::default();
        let base: Chunk = Arc::new(vec![0u8]);
        let epoch = dirty.epoch();
        for i in 0..=RETIRED_LOG as u64 {
            let key = (1, i);
            dirty.apply(&[(key, &[0], 0, 0, 1)], &HashMap::from([(key, base.clone())]), dirty.epoch(), &[1]).unwrap();
            dirty.retire(&dirty.snapshot(|_| true), |_, _| {});
        }
        let key = (0, 0);
        let r = dirty.apply(&[(key, &[0], 0, 0, 1)], &HashMap::from([(key, base.clone())]), epoch, &[1]);
        assert_eq!(r.map_err(|(keys, _)| keys), Err(vec![key]));
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
