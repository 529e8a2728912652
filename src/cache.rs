//! Decoded chunks, shared by every reader: a byte-budgeted LRU with single-flight loading.
//!
//! Budgeting by bytes rather than by count is what lets users reason about memory: the cache
//! holds at most `budget` bytes of decoded chunks, whatever the chunk size. A chunk that several
//! readers (or a reader and the prefetcher) want at once is decoded once; the others wait for it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use parking_lot::{Condvar, Mutex};

use crate::source::ChunkError;

/// A decoded chunk: (array number, chunk's linear index in its grid).
pub type ChunkKey = (u32, u64);
pub type Chunk = Arc<Vec<u8>>;

/// Counters a user or the benchmark can read while the mount is live.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub decodes: AtomicU64,
    pub decode_errors: AtomicU64,
    pub decoded_bytes: AtomicU64,
    pub decode_nanos: AtomicU64,
    pub evictions: AtomicU64,
}

/// A plain copy of the counters plus the cache's current size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub hits: u64,
    pub misses: u64,
    pub decodes: u64,
    pub decode_errors: u64,
    pub decoded_bytes: u64,
    pub decode_nanos: u64,
    pub evictions: u64,
    pub cached_bytes: u64,
    pub cached_chunks: u64,
    pub budget_bytes: u64,
}

/// What [`ChunkCache::claim`] found.
pub enum Claim {
    Hit(Chunk),
    /// Someone else is decoding it.
    Wait(Arc<Flight>),
    /// The caller must decode it with [`ChunkCache::lead`].
    Lead(Arc<Flight>),
}

/// One decode in progress; late arrivals wait on `done`.
#[derive(Default)]
pub struct Flight {
    result: Mutex<Option<Result<Chunk, ChunkError>>>,
    done: Condvar,
    /// Set when newer contents were put for the key while this decode ran (a write-back):
    /// the decode read the old bytes and must not be cached over the new ones.
    superseded: AtomicBool,
}

/// Takes a decode's bytes off the in-progress count when dropped, and lets a decode waiting
/// for room start.
struct Decoding<'a>(&'a ChunkCache, u64);

impl Drop for Decoding<'_> {
    fn drop(&mut self) {
        self.0.decoding.fetch_sub(self.1, Ordering::SeqCst);
        let _locked = self.0.inner.lock(); // a waiter is checking or already waiting
        self.0.room.notify_all();
    }
}

impl Flight {
    /// Block until the leader has a result.
    pub fn wait(&self) -> Result<Chunk, ChunkError> {
        let mut result = self.result.lock();
        while result.is_none() {
            self.done.wait(&mut result);
        }
        result.clone().unwrap()
    }
}

struct Inner {
    lru: LruCache<ChunkKey, Chunk>,
    bytes: u64,
    in_flight: HashMap<ChunkKey, Arc<Flight>>,
}

pub struct ChunkCache {
    budget: u64,
    /// Bytes held outside the cache that count against its budget (dirty chunks of a writable
    /// mount), so clean chunks are evicted to make room for them.
    reserved: AtomicU64,
    /// Bytes of chunks being decoded right now, made room for before each decode starts, so
    /// that cached plus in-progress chunks stay within the budget.
    decoding: AtomicU64,
    inner: Mutex<Inner>,
    /// Signalled (with `inner` held) when decoding or reserved bytes go down.
    room: Condvar,
    pub stats: CacheStats,
}

impl ChunkCache {
    pub fn new(budget: u64) -> Self {
        ChunkCache {
            budget,
            reserved: AtomicU64::new(0),
            decoding: AtomicU64::new(0),
            inner: Mutex::new(Inner { lru: LruCache::unbounded(), bytes: 0, in_flight: HashMap::new() }),
            room: Condvar::new(),
            stats: CacheStats::default(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The bytes last set by [`set_reserved`](Self::set_reserved).
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Set how many bytes outside the cache count against its budget; evicts to make room.
    pub fn set_reserved(&self, bytes: u64) {
        self.reserved.store(bytes, Ordering::Relaxed);
        let mut inner = self.inner.lock();
        self.evict_to_fit(&mut inner, 0);
        self.room.notify_all();
    }

    /// Put newer contents for a key (after a write-back): replaces what is cached, and keeps a
    /// decode of the old contents that is still running from being cached afterwards.
    pub fn replace(&self, key: ChunkKey, chunk: Chunk) {
        let mut inner = self.inner.lock();
        if let Some(flight) = inner.in_flight.remove(&key) {
            flight.superseded.store(true, Ordering::SeqCst);
        }
        if let Some(old) = inner.lru.pop(&key) {
            inner.bytes -= old.len() as u64;
        }
        self.insert(&mut inner, key, chunk);
    }

    /// Mark a cached chunk as just used, so that it is evicted last.
    pub fn touch(&self, key: ChunkKey) {
        self.inner.lock().lru.promote(&key);
    }

    #[cfg(test)]
    /// True when the chunk is cached or being decoded.
    pub(crate) fn is_present_or_loading(&self, key: ChunkKey) -> bool {
        let inner = self.inner.lock();
        inner.lru.contains(&key) || inner.in_flight.contains_key(&key)
    }

    /// Look a chunk up and, when it is neither cached nor being decoded, claim it: the caller
    /// then must [`lead`](Self::lead) the decode (possibly on another thread), and everyone else
    /// who asks meanwhile gets [`Claim::Wait`] on the same flight.
    pub fn claim(&self, key: ChunkKey) -> Claim {
        let mut inner = self.inner.lock();
        if let Some(chunk) = inner.lru.get(&key) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Claim::Hit(chunk.clone());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        match inner.in_flight.get(&key) {
            Some(flight) => Claim::Wait(flight.clone()),
            None => {
                let flight = Arc::new(Flight::default());
                inner.in_flight.insert(key, flight.clone());
                Claim::Lead(flight)
            }
        }
    }

    /// The chunk, from the cache or by running `load` — at most one `load` per key at a time;
    /// concurrent callers for the same key share its result. Errors are not cached: a later
    /// read tries again (the chunk may have been repaired).
    /// `expected` is the decoded size, made room for before decoding (see [`lead`](Self::lead)).
    pub fn get_or_load(
        &self,
        key: ChunkKey,
        expected: u64,
        load: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Chunk, ChunkError> {
        match self.claim(key) {
            Claim::Hit(chunk) => Ok(chunk),
            Claim::Wait(flight) => flight.wait(),
            Claim::Lead(flight) => self.lead(key, &flight, expected, load),
        }
    }

    /// Run the decode of a claimed chunk, cache its result and wake its waiters. `expected`
    /// bytes (the decoded size) are made room for before the decode starts; while the decodes
    /// already running leave no room beside the reserved bytes, it waits for one to end (one
    /// decode always runs, however small the budget), so decoded bytes stay within the budget
    /// however many threads want chunks at once.
    pub fn lead(
        &self,
        key: ChunkKey,
        flight: &Flight,
        expected: u64,
        load: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Chunk, ChunkError> {
        {
            let mut inner = self.inner.lock();
            loop {
                let decoding = self.decoding.load(Ordering::SeqCst);
                let outside = decoding + expected + self.reserved.load(Ordering::Relaxed);
                if decoding == 0 || outside <= self.budget {
                    break;
                }
                self.room.wait(&mut inner);
            }
            self.decoding.fetch_add(expected, Ordering::SeqCst);
            self.evict_to_fit(&mut inner, 0);
        }
        self.load_as_leader(key, flight, || {
            // Counted as decoding until the decode ends, however it ends (a codec may panic).
            let _counted = Decoding(self, expected);
            load()
        })
    }

    fn load_as_leader(
        &self,
        key: ChunkKey,
        flight: &Flight,
        load: impl FnOnce() -> Result<Vec<u8>, ChunkError>,
    ) -> Result<Chunk, ChunkError> {
        let started = Instant::now();
        // A panicking codec must not leave waiters blocked forever.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
            .unwrap_or_else(|_| Err(ChunkError::Decode { key: format!("{key:?}"), reason: "decoder panicked".into() }))
            .map(Arc::new);
        self.stats.decode_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match &result {
            Ok(chunk) => {
                self.stats.decodes.fetch_add(1, Ordering::Relaxed);
                self.stats.decoded_bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        {
            let mut inner = self.inner.lock();
            if !flight.superseded.load(Ordering::SeqCst) {
                inner.in_flight.remove(&key);
                if let Ok(chunk) = &result {
                    self.insert(&mut inner, key, chunk.clone());
                }
            }
        }
        *flight.result.lock() = Some(result.clone());
        flight.done.notify_all();
        result
    }

    fn insert(&self, inner: &mut Inner, key: ChunkKey, chunk: Chunk) {
        let size = chunk.len() as u64;
        if !self.evict_to_fit(inner, size) {
            return; // served to its readers, never held
        }
        inner.bytes += size;
        if let Some(old) = inner.lru.put(key, chunk) {
            inner.bytes -= old.len() as u64;
        }
    }

    /// Evict least recently used chunks until `extra` more bytes fit beside the reserved ones;
    /// false when they cannot fit even in an empty cache.
    fn evict_to_fit(&self, inner: &mut Inner, extra: u64) -> bool {
        let outside = self.reserved.load(Ordering::Relaxed) + self.decoding.load(Ordering::Relaxed);
        let limit = self.budget.saturating_sub(outside);
        if extra > limit {
            return false;
        }
        while inner.bytes + extra > limit {
            let Some((_, old)) = inner.lru.pop_lru() else { break };
            inner.bytes -= old.len() as u64;
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let (cached_bytes, cached_chunks) = {
            let inner = self.inner.lock();
            (inner.bytes, inner.lru.len() as u64)
        };
        let s = &self.stats;
        StatsSnapshot {
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            decodes: s.decodes.load(Ordering::Relaxed),
            decode_errors: s.decode_errors.load(Ordering::Relaxed),
            decoded_bytes: s.decoded_bytes.load(Ordering::Relaxed),
            decode_nanos: s.decode_nanos.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            cached_bytes,
            cached_chunks,
            budget_bytes: self.budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Barrier;

    fn chunk(n: usize, v: u8) -> Result<Vec<u8>, ChunkError> {
        Ok(vec![v; n])
    }

    #[test]
    fn hit_after_load() {
        let cache = ChunkCache::new(100);
        assert_eq!(*cache.get_or_load((0, 1), 0, || chunk(10, 7)).unwrap(), vec![7; 10]);
        let again = cache.get_or_load((0, 1), 0, || panic!("must not decode twice")).unwrap();
        assert_eq!(again.len(), 10);
        let s = cache.snapshot();
        assert_eq!((s.decodes, s.hits, s.misses, s.cached_bytes), (1, 1, 1, 10));
    }

    #[test]
    fn evicts_least_recently_used_to_stay_within_budget() {
        let cache = ChunkCache::new(30);
        for i in 0..3 {
            cache.get_or_load((0, i), 0, || chunk(10, i as u8)).unwrap();
        }
        cache.get_or_load((0, 0), 0, || unreachable!()).unwrap(); // 0 is now most recent
        cache.get_or_load((0, 3), 0, || chunk(10, 3)).unwrap(); // evicts 1
        assert!(cache.is_present_or_loading((0, 0)));
        assert!(!cache.is_present_or_loading((0, 1)));
        assert!(cache.snapshot().cached_bytes <= 30);
        assert_eq!(cache.snapshot().evictions, 1);
    }

    #[test]
    fn chunk_larger_than_budget_is_served_but_not_held() {
        let cache = ChunkCache::new(5);
        assert_eq!(cache.get_or_load((1, 0), 0, || chunk(10, 1)).unwrap().len(), 10);
        assert_eq!(cache.snapshot().cached_bytes, 0);
    }

    #[test]
    fn errors_are_shared_but_not_cached() {
        let cache = ChunkCache::new(100);
        let bad = || Err(ChunkError::Decode { key: "c/0".into(), reason: "corrupt".into() });
        assert!(cache.get_or_load((0, 0), 0, bad).is_err());
        assert!(cache.get_or_load((0, 0), 0, || chunk(4, 1)).is_ok());
        assert_eq!(cache.snapshot().decode_errors, 1);
    }

    #[test]
    fn panicking_decoder_becomes_an_error() {
        let cache = ChunkCache::new(100);
        let r = cache.get_or_load((0, 0), 0, || panic!("codec bug"));
        assert!(r.is_err());
        assert!(!cache.is_present_or_loading((0, 0)));
        let Claim::Lead(flight) = cache.claim((0, 1)) else { panic!("nothing cached yet") };
        assert!(cache.lead((0, 1), &flight, 60, || panic!("codec bug")).is_err());
        cache.get_or_load((0, 2), 0, || chunk(100, 0)).unwrap();
        assert_eq!(cache.snapshot().cached_bytes, 100, "the panicked decode no longer holds room");
    }

    #[test]
    fn room_is_made_for_a_decode_before_it_starts() {
        let cache = ChunkCache::new(30);
        for i in 0..3 {
            cache.get_or_load((0, i), 0, || chunk(10, 0)).unwrap();
        }
        let Claim::Lead(flight) = cache.claim((0, 9)) else { panic!("not cached") };
        let seen = cache.lead((0, 9), &flight, 10, || {
            assert!(cache.snapshot().cached_bytes <= 20, "evicted before decoding");
            chunk(10, 1)
        });
        assert!(seen.is_ok());
        assert!(cache.snapshot().cached_bytes <= 30);
    }

    /// Eight threads lead decodes of distinct chunks at once, with room for two: cached and
    /// in-progress bytes never pass the budget, yet every decode completes.
    #[test]
    fn concurrent_decodes_wait_for_room() {
        let cache = Arc::new(ChunkCache::new(20));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (cache, running, most) = (cache.clone(), running.clone(), most.clone());
                std::thread::spawn(move || {
                    let Claim::Lead(flight) = cache.claim((0, i)) else { panic!("distinct chunks") };
                    cache
                        .lead((0, i), &flight, 10, || {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            let cached = cache.snapshot().cached_bytes as usize;
                            assert!(cached + 10 * now <= 20, "{now} decodes beside {cached} cached bytes");
                            std::thread::yield_now();
                            running.fetch_sub(1, Ordering::SeqCst);
                            chunk(10, i as u8)
                        })
                        .unwrap()
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            assert_eq!(*t.join().unwrap(), vec![i as u8; 10]);
        }
        assert!(most.load(Ordering::SeqCst) <= 2);
        assert_eq!(cache.snapshot().decodes, 8);
    }

    #[test]
    fn one_decode_runs_however_small_the_budget() {
        let cache = ChunkCache::new(5);
        cache.set_reserved(100);
        let Claim::Lead(flight) = cache.claim((0, 0)) else { panic!("not cached") };
        assert_eq!(cache.lead((0, 0), &flight, 10, || chunk(10, 3)).unwrap().len(), 10);
    }

    #[test]
    fn replace_wins_over_a_decode_of_the_old_contents() {
        let cache = Arc::new(ChunkCache::new(100));
        let c2 = cache.clone();
        // The "old" decode is running when the write-back replaces the chunk.
        let old = cache.get_or_load((0, 0), 0, move || {
            c2.replace((0, 0), Arc::new(vec![2; 4]));
            chunk(4, 1)
        });
        assert_eq!(*old.unwrap(), vec![1; 4]); // its own reader gets what it decoded
        let now = cache.get_or_load((0, 0), 0, || unreachable!("replaced contents are cached")).unwrap();
        assert_eq!(*now, vec![2; 4]);
    }

    #[test]
    fn reserved_bytes_shrink_the_room_for_clean_chunks() {
        let cache = ChunkCache::new(40);
        for i in 0..4 {
            cache.get_or_load((0, i), 0, || chunk(10, 0)).unwrap();
        }
        cache.set_reserved(25);
        assert!(cache.snapshot().cached_bytes <= 15);
        cache.get_or_load((0, 9), 0, || chunk(10, 0)).unwrap();
        assert!(cache.snapshot().cached_bytes <= 15);
    }

    #[test]
    fn concurrent_readers_decode_once() {
        let cache = Arc::new(ChunkCache::new(1 << 20));
        let loads = Arc::new(AtomicUsize::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, loads, barrier) = (cache.clone(), loads.clone(), barrier.clone());
                let cache2 = cache.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    cache
                        .get_or_load((0, 42), 0, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            // Finish only once every reader has missed and is therefore
                            // waiting on this flight: the single-flight path is exercised.
                            while cache2.stats.misses.load(Ordering::SeqCst) < 8 {
                                std::thread::yield_now();
                            }
                            chunk(1000, 9)
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap().len(), 1000);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(cache.snapshot().decodes, 1);
    }
}
