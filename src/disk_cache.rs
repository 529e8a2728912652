//! An on-disk cache of fetched objects (encoded chunks, shard byte ranges, metadata) in front of
//! a remote storage.
//!
//! Layout of the cache directory `DIR`:
//! - `DIR/objects/NAME`: one entry per (store URL, key, byte range); `NAME` is a hash of that
//!   identity, which the entry also carries in its header and which is checked on every read,
//!   so a hash collision is a miss, never wrong data.
//! - `DIR/tmp/`: entries being written; each is renamed into `objects/` when complete, so a
//!   reader (this daemon, another daemon, a later mount) never sees a partial entry.
//! - `DIR/usage`: the disk usage of the cache as a decimal number, and the `flock` that
//!   serialises inserts and evictions between daemons sharing the directory.
//!
//! Bound: every insert happens under the lock, after evicting least-recently-used entries
//! (oldest mtime first; a hit refreshes the entry's mtime) until the new entry fits, so the
//! directory never holds more than its bound of disk blocks. Entries are accounted by the
//! blocks they occupy, and a full rescan under the lock (at open, and whenever an eviction is
//! needed) recounts the real usage, directories included, so crashes cannot make it drift.
//!
//! Freshness: chunks are served from the cache first (objects of a Zarr store are assumed
//! immutable while cached). Metadata documents go to the remote first and are refreshed in the
//! cache, including "absent" answers; when the remote cannot be reached, the cached copies are
//! served, so a store can be remounted while its server is down.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, ReadableListableStorage,
    ReadableStorageTraits, StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix,
};

const MAGIC: &[u8; 6] = b"ZFSC1\n";
const PRESENT: u8 = 1;
const ABSENT: u8 = 0;
/// Unit in which files occupy disk space (at least; real allocations are checked too).
const BLOCK: u64 = 4096;
/// Estimated directory-entry cost of one file, until a rescan measures the directory.
const DIRENT: u64 = 64;

/// A disk-cached view of `inner`, a remote storage.
pub struct DiskCache {
    inner: ReadableListableStorage,
    /// The store URL: part of every entry's identity, so stores can share a directory.
    namespace: String,
    objects: PathBuf,
    tmp: PathBuf,
    root: PathBuf,
    bound: u64,
    /// `DIR/usage`, flocked for inserts and evictions; the mutex orders this process's threads
    /// (a flock is shared by every thread holding the same open file).
    usage: Mutex<File>,
}

/// What the cache holds for one identity.
enum Entry {
    Present(Bytes),
    Absent,
}

impl DiskCache {
    /// Open (creating if needed) the cache directory `dir`, bounded to `bound` bytes of disk,
    /// for the store named `namespace`. Recounts the directory and trims it to the bound.
    pub fn open(
        inner: ReadableListableStorage,
        dir: &Path,
        bound: u64,
        namespace: &str,
    ) -> Result<DiskCache, String> {
        let objects = dir.join("objects");
        let tmp = dir.join("tmp");
        for d in [&objects, &tmp] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let root = std::fs::canonicalize(dir).map_err(|e| e.to_string())?;
        let usage = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join("usage"))
            .map_err(|e| e.to_string())?;
        let cache = DiskCache {
            inner,
            namespace: namespace.to_string(),
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            root,
            bound,
            usage: Mutex::new(usage),
        };
        {
            let guard = cache.lock();
            let total = cache.rescan_and_evict(0, true).map_err(|e| e.to_string())?;
            guard.write_usage(total);
        }
        Ok(cache)
    }

    fn lock(&self) -> UsageLock<'_> {
        let file = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: flock on a valid, open fd.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        UsageLock { file }
    }

    fn identity(&self, key: &StoreKey, range: &ByteRange) -> String {
        let range = match range {
            ByteRange::FromStart(0, None) => "all".to_string(),
            ByteRange::FromStart(start, None) => format!("{start}-"),
            ByteRange::FromStart(start, Some(len)) => format!("{start}+{len}"),
            ByteRange::Suffix(len) => format!("-{len}"),
        };
        format!("{}\n{}\n{}", self.namespace, key.as_str(), range)
    }

    fn entry_path(&self, identity: &str) -> PathBuf {
        self.objects.join(entry_name(identity))
    }

    /// The entry for `identity`, if the cache has a valid one; refreshes its recency.
    fn lookup(&self, identity: &str) -> Option<Entry> {
        let path = self.entry_path(identity);
        let mut file = File::open(&path).ok()?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).ok()?;
        let entry = decode_entry(&data, identity)?;
        let _ = file.set_modified(SystemTime::now());
        Some(entry)
    }

    /// Store an entry (atomically replacing any previous one), evicting as needed.
    fn insert(&self, identity: &str, entry: &Entry) {
        let payload: &[u8] = match entry {
            Entry::Present(b) => b,
            Entry::Absent => &[],
        };
        let mut data = Vec::with_capacity(MAGIC.len() + 5 + identity.len() + 1 + payload.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&(identity.len() as u32).to_le_bytes());
        data.extend_from_slice(identity.as_bytes());
        data.push(if matches!(entry, Entry::Present(_)) {
            PRESENT
        } else {
            ABSENT
        });
        data.extend_from_slice(payload);
        let cost = cost_of_len(data.len() as u64);
        if cost > self.bound {
            return; // never fits: served, not cached
        }
        let name = entry_name(identity);
        let dest = self.objects.join(&name);
        let tmp = self.tmp.join(format!("{name}.{}", std::process::id()));
        let guard = self.lock();
        let mut usage = guard.read_usage();
        let replaced = std::fs::metadata(&dest).map(|m| cost_of(&m)).unwrap_or(0);
        usage = usage.saturating_sub(replaced);
        if usage + cost > self.bound {
            match self.rescan_and_evict(cost, false) {
                Ok(total) => usage = total,
                Err(e) => {
                    log::warn!("disk cache {}: {e}", self.root.display());
                    return;
                }
            }
            if usage + cost > self.bound {
                guard.write_usage(usage);
                return;
            }
        }
        let written = (|| -> std::io::Result<u64> {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            let cost = cost_of(&f.metadata()?).max(cost);
            drop(f);
            std::fs::rename(&tmp, &dest)?;
            Ok(cost)
        })();
        match written {
            Ok(cost) => usage += cost,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                log::warn!(
                    "disk cache {}: cannot store an entry: {e}",
                    self.root.display()
                );
            }
        }
        guard.write_usage(usage);
    }

    /// Under the lock: measure the directory (removing leftovers of interrupted writes), then
    /// evict least-recently-used entries until `room` more bytes fit with some slack. Returns
    /// the usage after eviction.
    fn rescan_and_evict(&self, room: u64, at_open: bool) -> std::io::Result<u64> {
        let mut total = 0u64;
        for d in [&self.root, &self.objects, &self.tmp] {
            total += dir_cost(d);
        }
        total += std::fs::metadata(self.root.join("usage"))
            .map(|m| cost_of(&m))
            .unwrap_or(0);
        for e in std::fs::read_dir(&self.tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path()); // only ever present while its writer holds the lock
        }
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&self.objects)?.flatten() {
            if let Ok(m) = e.metadata() {
                let cost = cost_of(&m);
                total += cost;
                entries.push((
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    cost,
                    e.path(),
                ));
            }
        }
        if total + room <= self.bound {
            return Ok(total);
        }
        // Evict down to 90% of the bound (less the new entry) so that inserts do not rescan
        // every time once the cache is full.
        let target = (self.bound - self.bound / 10).saturating_sub(room);
        entries.sort();
        let mut evicted = 0usize;
        for (_, cost, path) in entries {
            if total <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total = total.saturating_sub(cost);
                evicted += 1;
            }
        }
        if at_open || evicted > 0 {
            log::debug!(
                "disk cache {}: evicted {evicted} entries",
                self.root.display()
            );
        }
        Ok(total)
    }

    /// Chunks: cache first; what is missing is fetched in one call and stored.
    fn get_cached_first(
        &self,
        key: &StoreKey,
        ranges: Vec<ByteRange>,
    ) -> Result<Option<Vec<Bytes>>, StorageError> {
        let mut out: Vec<Option<Bytes>> = Vec::with_capacity(ranges.len());
        let mut whole: Option<Option<Bytes>> = None;
        for range in &ranges {
            let hit = match self.lookup(&self.identity(key, range)) {
                Some(Entry::Present(b)) => Some(b),
                _ => {
                    // A byte range of an object cached whole.
                    let all = whole.get_or_insert_with(|| {
                        match self.lookup(&self.identity(key, &ByteRange::FromStart(0, None))) {
                            Some(Entry::Present(b)) => Some(b),
                            _ => None,
                        }
                    });
                    all.as_ref().and_then(|b| slice_range(b, range))
                }
            };
            out.push(hit);
        }
        let missing: Vec<ByteRange> = ranges
            .iter()
            .zip(&out)
            .filter(|(_, hit)| hit.is_none())
            .map(|(r, _)| *r)
            .collect();
        if missing.is_empty() {
            return Ok(Some(out.into_iter().map(|b| b.expect("all hit")).collect()));
        }
        let Some(fetched) = self
            .inner
            .get_partial_many(key, Box::new(missing.clone().into_iter()))?
        else {
            return Ok(None);
        };
        let fetched: Vec<Bytes> = fetched.collect::<Result<_, _>>()?;
        for (range, bytes) in missing.iter().zip(&fetched) {
            self.insert(&self.identity(key, range), &Entry::Present(bytes.clone()));
        }
        let mut fetched = fetched.into_iter();
        Ok(Some(
            out.into_iter()
                .map(|hit| hit.or_else(|| fetched.next()).unwrap_or_default())
                .collect(),
        ))
    }

    /// Metadata: the remote first, refreshing the cache; the cache when the remote fails.
    fn get_remote_first(
        &self,
        key: &StoreKey,
        ranges: Vec<ByteRange>,
    ) -> Result<Option<Vec<Bytes>>, StorageError> {
        let identities: Vec<String> = ranges.iter().map(|r| self.identity(key, r)).collect();
        let remote = self
            .inner
            .get_partial_many(key, Box::new(ranges.clone().into_iter()))
            .and_then(|r| {
                r.map(|it| it.collect::<Result<Vec<Bytes>, _>>())
                    .transpose()
            });
        match remote {
            Ok(Some(parts)) => {
                for (identity, bytes) in identities.iter().zip(&parts) {
                    let fresh =
                        matches!(self.lookup(identity), Some(Entry::Present(b)) if b == bytes);
                    if !fresh {
                        self.insert(identity, &Entry::Present(bytes.clone()));
                    }
                }
                Ok(Some(parts))
            }
            Ok(None) => {
                for identity in &identities {
                    if !matches!(self.lookup(identity), Some(Entry::Absent)) {
                        self.insert(identity, &Entry::Absent);
                    }
                }
                Ok(None)
            }
            Err(e) => {
                let cached: Vec<Option<Entry>> =
                    identities.iter().map(|i| self.lookup(i)).collect();
                if cached.iter().all(|c| matches!(c, Some(Entry::Absent))) {
                    log::warn!("{key}: remote unavailable ({e}); the disk cache says it is absent");
                    return Ok(None);
                }
                if cached.iter().all(|c| matches!(c, Some(Entry::Present(_)))) {
                    log::warn!(
                        "{key}: remote unavailable ({e}); serving the copy from the disk cache"
                    );
                    return Ok(Some(
                        cached
                            .into_iter()
                            .map(|c| match c {
                                Some(Entry::Present(b)) => b,
                                _ => unreachable!(),
                            })
                            .collect(),
                    ));
                }
                Err(e)
            }
        }
    }
}

struct UsageLock<'a> {
    file: std::sync::MutexGuard<'a, File>,
}

impl UsageLock<'_> {
    fn read_usage(&self) -> u64 {
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0).unwrap_or(0);
        std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn write_usage(&self, usage: u64) {
        let text = format!("{usage:<20}\n");
        let _ = self.file.write_at(text.as_bytes(), 0);
    }
}

impl Drop for UsageLock<'_> {
    fn drop(&mut self) {
        // SAFETY: unlocking a valid, open fd.
        unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Disk space a file of `len` bytes occupies at least, including its directory entry.
fn cost_of_len(len: u64) -> u64 {
    len.div_ceil(BLOCK) * BLOCK + DIRENT
}

fn cost_of(m: &std::fs::Metadata) -> u64 {
    cost_of_len(m.len()).max(m.blocks() * 512 + DIRENT)
}

fn dir_cost(dir: &Path) -> u64 {
    std::fs::metadata(dir)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The file name of an identity: two independent 64-bit FNV-1a hashes.
fn entry_name(identity: &str) -> String {
    let fnv = |basis: u64| {
        identity.bytes().fold(basis, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    format!(
        "{:016x}{:016x}",
        fnv(0xcbf2_9ce4_8422_2325),
        fnv(0x6c62_272e_07bb_0142)
    )
}

fn decode_entry(data: &[u8], identity: &str) -> Option<Entry> {
    let rest = data.strip_prefix(MAGIC.as_slice())?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    if rest.get(..len)? != identity.as_bytes() {
        return None;
    }
    let (&kind, payload) = rest[len..].split_first()?;
    match kind {
        PRESENT => Some(Entry::Present(Bytes::copy_from_slice(payload))),
        ABSENT if payload.is_empty() => Some(Entry::Absent),
        _ => None,
    }
}

fn slice_range(all: &Bytes, range: &ByteRange) -> Option<Bytes> {
    let size = all.len() as u64;
    let ok = match range {
        ByteRange::FromStart(start, len) => *start <= size && len.is_none_or(|l| start + l <= size),
        ByteRange::Suffix(len) => *len <= size,
    };
    ok.then(|| all.slice(range.to_range_usize(size)))
}

fn is_metadata_key(key: &StoreKey) -> bool {
    let name = key.as_str().rsplit('/').next().unwrap_or("");
    matches!(
        name,
        "zarr.json" | ".zarray" | ".zgroup" | ".zattrs" | ".zmetadata"
    )
}

impl ReadableStorageTraits for DiskCache {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        let parts = if is_metadata_key(key) {
            self.get_remote_first(key, ranges)?
        } else {
            self.get_cached_first(key, ranges)?
        };
        Ok(parts.map(|p| Box::new(p.into_iter().map(Ok)) as Box<dyn Iterator<Item = _>>))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        match self.inner.size_key(key) {
            Ok(size) => Ok(size),
            Err(e) => match self.lookup(&self.identity(key, &ByteRange::FromStart(0, None))) {
                Some(Entry::Present(b)) => Ok(Some(b.len() as u64)),
                Some(Entry::Absent) => Ok(None),
                None => Err(e),
            },
        }
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

impl ListableStorageTraits for DiskCache {
    fn list(&self) -> Result<StoreKeys, StorageError> {
        self.inner.list()
    }
    fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
        self.inner.list_prefix(prefix)
    }
    fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
        self.inner.list_dir(prefix)
    }
    fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
        self.inner.size_prefix(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use zarrs::storage::store::MemoryStore;
    use zarrs::storage::WritableStorageTraits;

    /// A memory store that counts reads and can be switched off like a dead server.
    struct Flaky {
        inner: MemoryStore,
        down: AtomicBool,
        gets: AtomicUsize,
    }

    impl Flaky {
        fn new() -> Arc<Flaky> {
            Arc::new(Flaky {
                inner: MemoryStore::new(),
                down: AtomicBool::new(false),
                gets: AtomicUsize::new(0),
            })
        }
        fn put(&self, key: &str, value: &[u8]) {
            self.inner
                .set(&StoreKey::new(key).unwrap(), Bytes::copy_from_slice(value))
                .unwrap();
        }
        fn check(&self) -> Result<(), StorageError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StorageError::Other("connection refused".into()));
            }
            Ok(())
        }
    }

    impl ReadableStorageTraits for Flaky {
        fn get_partial_many<'a>(
            &'a self,
            key: &StoreKey,
            byte_ranges: ByteRangeIterator<'a>,
        ) -> Result<MaybeBytesIterator<'a>, StorageError> {
            self.check()?;
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.inner.get_partial_many(key, byte_ranges)
        }
        fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
            self.check()?;
            self.inner.size_key(key)
        }
        fn supports_get_partial(&self) -> bool {
            true
        }
    }

    impl ListableStorageTraits for Flaky {
        fn list(&self) -> Result<StoreKeys, StorageError> {
            self.inner.list()
        }
        fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
            self.inner.list_prefix(prefix)
        }
        fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
            self.inner.list_dir(prefix)
        }
        fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
            self.inner.size_prefix(prefix)
        }
    }

    fn key(k: &str) -> StoreKey {
        StoreKey::new(k).unwrap()
    }

    fn du(dir: &Path) -> u64 {
        let mut total = std::fs::metadata(dir).unwrap().blocks() * 512;
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() {
                du(&e.path())
            } else {
                m.blocks() * 512
            };
        }
        total
    }

    #[test]
    fn hits_ranges_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("a/c/0", &[7u8; 10_000]);
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x").unwrap();
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        // Ranges of an object cached whole are served from it.
        let part = cache
            .get_partial(&key("a/c/0"), ByteRange::Suffix(16))
            .unwrap()
            .unwrap();
        assert_eq!(&part[..], &[7u8; 16]);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        // Missing chunks are not cached and not errors.
        assert!(cache.get(&key("a/c/1")).unwrap().is_none());
        // A new cache on the same directory (a remount) serves without the remote.
        drop(cache);
        remote.down.store(true, Ordering::SeqCst);
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x").unwrap();
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert!(cache.get(&key("a/c/1")).is_err());
        // Another store sharing the directory does not see it.
        let other = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/y").unwrap();
        assert!(other.get(&key("a/c/0")).is_err());
    }

    #[test]
    fn metadata_is_refreshed_and_survives_outages() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put(".zmetadata", b"{\"v\": 1}");
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "http://h/x").unwrap();
        assert_eq!(
            &cache.get(&key(".zmetadata")).unwrap().unwrap()[..],
            b"{\"v\": 1}"
        );
        assert!(cache.get(&key("zarr.json")).unwrap().is_none());
        remote.put(".zmetadata", b"{\"v\": 2}");
        assert_eq!(
            &cache.get(&key(".zmetadata")).unwrap().unwrap()[..],
            b"{\"v\": 2}"
        );
        remote.down.store(true, Ordering::SeqCst);
        assert_eq!(
            &cache.get(&key(".zmetadata")).unwrap().unwrap()[..],
            b"{\"v\": 2}"
        );
        assert!(cache.get(&key("zarr.json")).unwrap().is_none());
        assert!(cache.get(&key("grp/.zarray")).is_err());
    }

    #[test]
    fn bound_is_never_exceeded_and_lru_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 256 << 10;
        let remote = Flaky::new();
        for i in 0..64 {
            remote.put(&format!("c/{i}"), &vec![i as u8; 20_000]);
        }
        let cache = DiskCache::open(remote.clone(), dir.path(), bound, "s3://b/x").unwrap();
        let second = DiskCache::open(remote.clone(), dir.path(), bound, "s3://b/x").unwrap();
        for i in 0..64 {
            // Keep c/0 hot; two caches (two daemons) insert into the same directory.
            assert_eq!(cache.get(&key("c/0")).unwrap().unwrap()[0], 0);
            let c = if i % 2 == 0 { &cache } else { &second };
            assert_eq!(c.get(&key(&format!("c/{i}"))).unwrap().unwrap()[0], i as u8);
            assert!(
                du(dir.path()) <= bound,
                "du {} > bound {bound} after {i}",
                du(dir.path())
            );
        }
        let before = remote.gets.load(Ordering::SeqCst);
        cache.get(&key("c/0")).unwrap();
        assert_eq!(
            remote.gets.load(Ordering::SeqCst),
            before,
            "the hot entry was evicted"
        );
        // Reopening with a smaller bound trims the directory.
        drop((cache, second));
        let _small = DiskCache::open(remote.clone(), dir.path(), 64 << 10, "s3://b/x").unwrap();
        assert!(du(dir.path()) <= 64 << 10);
    }

    #[test]
    fn corrupt_or_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("c/0", b"good");
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x").unwrap();
        let identity = cache.identity(&key("c/0"), &ByteRange::FromStart(0, None));
        std::fs::write(cache.entry_path(&identity), b"ZFSC1\ngarbage").unwrap();
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"good");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"good");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
    }
}
