//! An on-disk cache of fetched objects (encoded chunks, shard byte ranges, metadata) in front of
//! a remote storage.
//!
//! Layout of the cache directory `DIR`:
//! - `DIR/objects/KEY-RANGE`: one entry per (store URL, key, version, byte range). `KEY` hashes
//!   the store URL and the key, `RANGE` the whole identity, which the entry also carries in its
//!   header and which is checked on every read, so a hash collision is a miss, never wrong data.
//! - `DIR/objects/KEY-v`: the version record of a key that was written through a writable mount
//!   (absent for keys never written): a tag that is part of the identity of the key's entries.
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
//! Writes (S3 with `-o rw`): after each put or delete of a key, its version record gets a new
//! tag (and a put caches the new object whole under it), so every entry of the old version, in
//! every daemon sharing the directory, becomes unreachable at once without being looked for;
//! LRU eviction removes them later. Evicting a version record evicts every entry of its key with
//! it, so old entries can never become reachable again. A fetch that raced with a write inserts
//! under the version it started with, which is then already unreachable (every read refreshes
//! the version record's recency, so it is not evicted while a fetch of its key is in flight,
//! short of the whole cache turning over during that one fetch).
//!
//! Freshness: objects are served from the cache first (assumed immutable while cached, but for
//! writes made through mounts sharing the directory). Metadata documents, which the caller names
//! (a predicate given to [`DiskCache::open`]: the cache knows no format), go to the remote first
//! and are refreshed in the cache, including "absent" answers; when the remote cannot be
//! reached, the cached copies are served, so a store can be remounted while its server is down.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableListableStorage,
    ReadableStorageTraits, StorageError, StoreKey, StorePrefix, WritableStorage, WritableStorageTraits,
};

/// Entry format: MAGIC, identity length (u32 LE), identity, kind (u8), payload length (u64 LE),
/// payload. The payload length tells a whole entry from one cut short (a crash, a full disk):
/// such an entry is a miss, and is replaced when the object is fetched again.
const MAGIC: &[u8; 6] = b"ZFSC2\n";
const PRESENT: u8 = 1;
const ABSENT: u8 = 0;
/// Unit in which files occupy disk space (at least; real allocations are checked too).
const BLOCK: u64 = 4096;
/// Estimated directory-entry cost of one file, until a rescan measures the directory.
const DIRENT: u64 = 64;

/// A disk-cached view of `inner`, a remote storage; writable when given a `writer`.
pub struct DiskCache {
    inner: ReadableListableStorage,
    /// The same remote storage, writable (S3 on a writable mount).
    writer: Option<WritableStorage>,
    /// The store URL: part of every entry's identity, so stores can share a directory.
    namespace: String,
    objects: PathBuf,
    tmp: PathBuf,
    root: PathBuf,
    bound: u64,
    /// `DIR/usage`, flocked for inserts and evictions; the mutex orders this process's threads
    /// (a flock is shared by every thread holding the same open file).
    usage: Mutex<File>,
    /// The keys that can change in place (metadata): fetched from the remote first.
    is_metadata: fn(&StoreKey) -> bool,
}

/// What the cache holds for one identity.
enum Entry {
    Present(Bytes),
    Absent,
}

/// The version of a key whose entries are looked up and stored.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Version {
    /// Never written through a mount sharing the directory: no version record.
    Original,
    /// The tag of the key's version record.
    Tag(String),
    /// The version record cannot be read: the key bypasses the cache.
    Unknown,
}

/// One entry: its file name in `objects/` and its identity.
struct Slot {
    name: String,
    identity: String,
}

const VERSION_SUFFIX: &str = "-v";

impl DiskCache {
    /// Open (creating if needed) the cache directory `dir`, bounded to `bound` bytes of disk,
    /// for the store whose keys are named absolutely by `namespace` + key (see
    /// `RemoteStorage::cache_namespace`); `is_metadata` names the keys that can change in place
    /// and are refreshed from the remote first. Recounts the directory and trims it to the bound.
    pub fn open(
        inner: ReadableListableStorage,
        dir: &Path,
        bound: u64,
        namespace: &str,
        is_metadata: fn(&StoreKey) -> bool,
    ) -> std::io::Result<DiskCache> {
        let objects = dir.join("objects");
        let tmp = dir.join("tmp");
        for d in [&objects, &tmp] {
            std::fs::create_dir_all(d)?;
        }
        let root = std::fs::canonicalize(dir)?;
        let usage = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(root.join("usage"))?;
        let cache = DiskCache {
            inner,
            writer: None,
            namespace: namespace.to_string(),
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            root,
            bound,
            usage: Mutex::new(usage),
            is_metadata,
        };
        {
            let guard = cache.lock();
            let total = cache.rescan_and_evict(0, true)?;
            guard.write_usage(total);
        }
        Ok(cache)
    }

    /// Writes go to `writer` (the remote storage behind `inner`) and keep the cache coherent.
    pub fn with_writer(mut self, writer: WritableStorage) -> DiskCache {
        self.writer = Some(writer);
        self
    }

    fn lock(&self) -> UsageLock<'_> {
        let file = self.usage.lock();
        // SAFETY: flock on a valid, open fd.
        while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        UsageLock { file }
    }

    /// The part of the file names of `key`'s entries that names the key.
    fn key_name(&self, key: &StoreKey) -> String {
        hash_name(&format!("{}{}", self.namespace, key.as_str()))
    }

    /// The entry of `key`'s byte range `range` at `version` (not [`Version::Unknown`]).
    fn slot(&self, key: &StoreKey, range: &ByteRange, version: &Version) -> Slot {
        let range = match range {
            ByteRange::FromStart(0, None) => "all".to_string(),
            ByteRange::FromStart(start, None) => format!("{start}-"),
            ByteRange::FromStart(start, Some(len)) => format!("{start}+{len}"),
            ByteRange::Suffix(len) => format!("-{len}"),
        };
        let mut identity = format!("{}{}\n{}", self.namespace, key.as_str(), range);
        if let Version::Tag(tag) = version {
            identity.push('\n');
            identity.push_str(tag);
        }
        let name = format!("{}-{:016x}", self.key_name(key), fnv64(&identity, FNV_B));
        Slot { name, identity }
    }

    /// The version record of `key`.
    fn version_slot(&self, key: &StoreKey) -> Slot {
        Slot {
            name: format!("{}{VERSION_SUFFIX}", self.key_name(key)),
            identity: format!("{}{}\nversion", self.namespace, key.as_str()),
        }
    }

    /// The current version of `key`; refreshes the recency of its version record.
    fn version(&self, key: &StoreKey) -> Version {
        let slot = self.version_slot(key);
        let file = match File::open(self.objects.join(&slot.name)) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Version::Original,
            Err(_) => return Version::Unknown,
        };
        match read_entry(&file, &slot.identity, None) {
            Some(Entry::Present(tag)) => {
                let _ = file.set_modified(SystemTime::now());
                Version::Tag(String::from_utf8_lossy(&tag).into_owned())
            }
            _ => Version::Unknown,
        }
    }

    /// After a write of `key`: give it a new version, so that no entry of an older one can be
    /// found again; returns the new version. If the version record cannot be stored, every
    /// entry of the key is removed instead.
    fn new_version(&self, key: &StoreKey) -> Version {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tag = format!("{nanos:x}.{:x}.{:x}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        let slot = self.version_slot(key);
        if self.insert(&slot, &Entry::Present(Bytes::from(tag.clone()))) {
            return Version::Tag(tag);
        }
        self.purge_key(key);
        Version::Original
    }

    /// Remove every entry of `key`, its version record included (a scan of the directory:
    /// only when a version record cannot be stored).
    fn purge_key(&self, key: &StoreKey) {
        let prefix = format!("{}-", self.key_name(key));
        let guard = self.lock();
        let mut usage = guard.read_usage();
        let purged = (|| -> std::io::Result<()> {
            for e in std::fs::read_dir(&self.objects)?.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let cost = e.metadata().map(|m| cost_of(&m)).unwrap_or(0);
                    match std::fs::remove_file(e.path()) {
                        Ok(()) => usage = usage.saturating_sub(cost),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        })();
        guard.write_usage(usage);
        if let Err(e) = purged {
            log::error!(
                "disk cache {}: {key} was written but its old cached copies cannot be removed: {e}",
                self.root.display()
            );
        }
    }

    /// The entry in `slot`, if the cache has a valid one; refreshes its recency.
    fn lookup(&self, slot: &Slot) -> Option<Entry> {
        self.lookup_range(slot, None)
    }

    /// Like [`lookup`](Self::lookup), but reads only `range` of a present entry's payload.
    fn lookup_range(&self, slot: &Slot, range: Option<&ByteRange>) -> Option<Entry> {
        let file = File::open(self.objects.join(&slot.name)).ok()?;
        let entry = read_entry(&file, &slot.identity, range)?;
        let _ = file.set_modified(SystemTime::now());
        Some(entry)
    }

    /// Store an entry (atomically replacing any previous one), evicting as needed. Returns
    /// whether it was stored.
    fn insert(&self, slot: &Slot, entry: &Entry) -> bool {
        let identity = slot.identity.as_str();
        let payload: &[u8] = match entry {
            Entry::Present(b) => b,
            Entry::Absent => &[],
        };
        let mut data = Vec::with_capacity(MAGIC.len() + 4 + identity.len() + 1 + 8 + payload.len());
        data.extend_from_slice(MAGIC);
        data.extend_from_slice(&(identity.len() as u32).to_le_bytes());
        data.extend_from_slice(identity.as_bytes());
        data.push(if matches!(entry, Entry::Present(_)) { PRESENT } else { ABSENT });
        data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        data.extend_from_slice(payload);
        let cost = cost_of_len(data.len() as u64);
        if cost > self.bound {
            return false; // never fits: served, not cached
        }
        let dest = self.objects.join(&slot.name);
        let tmp = self.tmp.join(format!("{}.{}", slot.name, std::process::id()));
        let guard = self.lock();
        let mut usage = guard.read_usage();
        let replaced = std::fs::metadata(&dest).map(|m| cost_of(&m)).unwrap_or(0);
        usage = usage.saturating_sub(replaced);
        if usage + cost > self.bound {
            match self.rescan_and_evict(cost, false) {
                Ok(total) => usage = total,
                Err(e) => {
                    log::warn!("disk cache {}: {e}", self.root.display());
                    return false;
                }
            }
            if usage + cost > self.bound {
                guard.write_usage(usage);
                return false;
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
        let stored = match written {
            Ok(cost) => {
                usage += cost;
                true
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                log::warn!("disk cache {}: cannot store an entry: {e}", self.root.display());
                false
            }
        };
        guard.write_usage(usage);
        stored
    }

    /// Under the lock: measure the directory (removing leftovers of interrupted writes), then
    /// evict least-recently-used entries until `room` more bytes fit with some slack. Returns
    /// the usage after eviction.
    fn rescan_and_evict(&self, room: u64, at_open: bool) -> std::io::Result<u64> {
        let mut total = 0u64;
        for d in [&self.root, &self.objects, &self.tmp] {
            total += dir_cost(d);
        }
        total += std::fs::metadata(self.root.join("usage")).map(|m| cost_of(&m)).unwrap_or(0);
        for e in std::fs::read_dir(&self.tmp)?.flatten() {
            let _ = std::fs::remove_file(e.path()); // only ever present while its writer holds the lock
        }
        let mut entries: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for e in std::fs::read_dir(&self.objects)?.flatten() {
            if let Ok(m) = e.metadata() {
                let cost = cost_of(&m);
                total += cost;
                entries.push((m.modified().unwrap_or(SystemTime::UNIX_EPOCH), cost, e.path()));
            }
        }
        if total + room <= self.bound {
            return Ok(total);
        }
        // Evict down to 90% of the bound (less the new entry) so that inserts do not rescan
        // every time once the cache is full.
        let target = (self.bound - self.bound / 10).saturating_sub(room);
        entries.sort();
        // A version record takes every entry of its key along: entries of older versions must
        // not become reachable again.
        let mut of_key: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, (_, _, path)) in entries.iter().enumerate() {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if let Some((key, _)) = name.split_once('-') {
                of_key.entry(key.to_string()).or_default().push(i);
            }
        }
        let mut gone = vec![false; entries.len()];
        let mut evicted = 0usize;
        for i in 0..entries.len() {
            if total <= target {
                break;
            }
            if gone[i] {
                continue;
            }
            let name = entries[i].2.file_name().unwrap_or_default().to_string_lossy();
            let victims = match name.strip_suffix(VERSION_SUFFIX) {
                Some(key) => of_key.get(key).cloned().unwrap_or_default(),
                None => vec![i],
            };
            for j in victims {
                if !gone[j] && std::fs::remove_file(&entries[j].2).is_ok() {
                    total = total.saturating_sub(entries[j].1);
                    evicted += 1;
                }
                gone[j] = true;
            }
        }
        if at_open || evicted > 0 {
            log::debug!("disk cache {}: evicted {evicted} entries", self.root.display());
        }
        Ok(total)
    }

    /// Fetch from the remote, bypassing the cache.
    fn get_uncached(&self, key: &StoreKey, ranges: Vec<ByteRange>) -> Result<Option<Vec<Bytes>>, StorageError> {
        self.inner
            .get_partial_many(key, Box::new(ranges.into_iter()))?
            .map(|parts| parts.collect::<Result<Vec<Bytes>, _>>())
            .transpose()
    }

    /// Chunks: cache first; what is missing is fetched in one call and stored.
    fn get_cached_first(&self, key: &StoreKey, ranges: Vec<ByteRange>) -> Result<Option<Vec<Bytes>>, StorageError> {
        let version = self.version(key);
        if version == Version::Unknown {
            return self.get_uncached(key, ranges);
        }
        let mut out: Vec<Option<Bytes>> = Vec::with_capacity(ranges.len());
        let whole = self.slot(key, &ByteRange::FromStart(0, None), &version);
        for range in &ranges {
            let hit = match self.lookup(&self.slot(key, range, &version)) {
                Some(Entry::Present(b)) => Some(b),
                // A byte range of an object cached whole: read just that range.
                _ => match self.lookup_range(&whole, Some(range)) {
                    Some(Entry::Present(b)) => Some(b),
                    _ => None,
                },
            };
            out.push(hit);
        }
        let missing: Vec<ByteRange> =
            ranges.iter().zip(&out).filter(|(_, hit)| hit.is_none()).map(|(r, _)| *r).collect();
        if missing.is_empty() {
            return Ok(Some(out.into_iter().map(|b| b.expect("all hit")).collect()));
        }
        let Some(fetched) = self.inner.get_partial_many(key, Box::new(missing.clone().into_iter()))? else {
            return Ok(None);
        };
        let fetched: Vec<Bytes> = fetched.collect::<Result<_, _>>()?;
        for (range, bytes) in missing.iter().zip(&fetched) {
            self.insert(&self.slot(key, range, &version), &Entry::Present(bytes.clone()));
        }
        let mut fetched = fetched.into_iter();
        Ok(Some(out.into_iter().map(|hit| hit.or_else(|| fetched.next()).unwrap_or_default()).collect()))
    }

    /// Metadata: the remote first, refreshing the cache; the cache when the remote fails.
    fn get_remote_first(&self, key: &StoreKey, ranges: Vec<ByteRange>) -> Result<Option<Vec<Bytes>>, StorageError> {
        let version = self.version(key);
        if version == Version::Unknown {
            return self.get_uncached(key, ranges);
        }
        let slots: Vec<Slot> = ranges.iter().map(|r| self.slot(key, r, &version)).collect();
        match self.get_uncached(key, ranges) {
            Ok(Some(parts)) => {
                for (slot, bytes) in slots.iter().zip(&parts) {
                    let fresh = matches!(self.lookup(slot), Some(Entry::Present(b)) if b == bytes);
                    if !fresh {
                        self.insert(slot, &Entry::Present(bytes.clone()));
                    }
                }
                Ok(Some(parts))
            }
            Ok(None) => {
                for slot in &slots {
                    if !matches!(self.lookup(slot), Some(Entry::Absent)) {
                        self.insert(slot, &Entry::Absent);
                    }
                }
                Ok(None)
            }
            Err(e) => {
                let cached: Vec<Option<Entry>> = slots.iter().map(|s| self.lookup(s)).collect();
                if cached.iter().all(|c| matches!(c, Some(Entry::Absent))) {
                    log::warn!("{key}: remote unavailable ({e}); the disk cache says it is absent");
                    return Ok(None);
                }
                if cached.iter().all(|c| matches!(c, Some(Entry::Present(_)))) {
                    log::warn!("{key}: remote unavailable ({e}); serving the copy from the disk cache");
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
    file: parking_lot::MutexGuard<'a, File>,
}

impl UsageLock<'_> {
    fn read_usage(&self) -> u64 {
        let mut buf = [0u8; 32];
        let n = self.file.read_at(&mut buf, 0).unwrap_or(0);
        std::str::from_utf8(&buf[..n]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
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
    std::fs::metadata(dir).map(|m| m.blocks() * 512).unwrap_or(0)
}

const FNV_A: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_B: u64 = 0x6c62_272e_07bb_0142;

/// 64-bit FNV-1a of `text` from `basis`.
fn fnv64(text: &str, basis: u64) -> u64 {
    text.bytes().fold(basis, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A file name for `text`: two independent 64-bit FNV-1a hashes.
fn hash_name(text: &str) -> String {
    format!("{:016x}{:016x}", fnv64(text, FNV_A), fnv64(text, FNV_B))
}

/// The entry stored in `file` for `identity`, or `range` of its payload; None for another key's
/// entry, an older format, an entry cut short, or a range outside the object.
fn read_entry(file: &File, identity: &str, range: Option<&ByteRange>) -> Option<Entry> {
    let size = file.metadata().ok()?.len();
    let mut head = [0u8; MAGIC.len() + 4];
    file.read_exact_at(&mut head, 0).ok()?;
    if head[..MAGIC.len()] != MAGIC[..] {
        return None;
    }
    let id_len = u32::from_le_bytes(head[MAGIC.len()..].try_into().ok()?) as usize;
    let mut rest = vec![0u8; id_len + 1 + 8];
    file.read_exact_at(&mut rest, head.len() as u64).ok()?;
    if rest[..id_len] != *identity.as_bytes() {
        return None;
    }
    let kind = rest[id_len];
    let payload_len = u64::from_le_bytes(rest[id_len + 1..].try_into().ok()?);
    let payload_at = (head.len() + rest.len()) as u64;
    if payload_at.checked_add(payload_len)? != size {
        return None;
    }
    match kind {
        ABSENT if payload_len == 0 && range.is_none() => Some(Entry::Absent),
        PRESENT => {
            let wanted = match range {
                None => 0..payload_len,
                Some(r) => {
                    let fits = match r {
                        ByteRange::FromStart(start, len) => {
                            *start <= payload_len && len.is_none_or(|l| start + l <= payload_len)
                        }
                        ByteRange::Suffix(len) => *len <= payload_len,
                    };
                    if !fits {
                        return None;
                    }
                    let r = r.to_range_usize(payload_len);
                    r.start as u64..r.end as u64
                }
            };
            let mut buf = vec![0u8; (wanted.end - wanted.start) as usize];
            file.read_exact_at(&mut buf, payload_at + wanted.start).ok()?;
            Some(Entry::Present(Bytes::from(buf)))
        }
        _ => None,
    }
}

impl ReadableStorageTraits for DiskCache {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        let parts = if (self.is_metadata)(key) {
            self.get_remote_first(key, ranges)?
        } else {
            self.get_cached_first(key, ranges)?
        };
        Ok(parts.map(|p| Box::new(p.into_iter().map(Ok)) as Box<dyn Iterator<Item = _>>))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        match self.inner.size_key(key) {
            Ok(size) => Ok(size),
            Err(e) => {
                let version = self.version(key);
                if version == Version::Unknown {
                    return Err(e);
                }
                match self.lookup(&self.slot(key, &ByteRange::FromStart(0, None), &version)) {
                    Some(Entry::Present(b)) => Ok(Some(b.len() as u64)),
                    Some(Entry::Absent) => Ok(None),
                    None => Err(e),
                }
            }
        }
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

list_through!(DiskCache, inner);

impl DiskCache {
    fn writer(&self) -> Result<&WritableStorage, StorageError> {
        self.writer.as_ref().ok_or_else(|| StorageError::Unsupported("the store is read-only".into()))
    }
}

/// Every write goes to the remote first; then the key gets a new version (whether the write
/// succeeded or not: a failed request may still have been applied), and a stored object is
/// cached whole under it.
impl WritableStorageTraits for DiskCache {
    fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
        let result = self.writer()?.set(key, value.clone());
        let version = self.new_version(key);
        if result.is_ok() && version != Version::Original {
            let slot = self.slot(key, &ByteRange::FromStart(0, None), &version);
            self.insert(&slot, &Entry::Present(value));
        }
        result
    }

    fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> Result<(), StorageError> {
        zarrs::storage::store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
        let result = self.writer()?.erase(key);
        self.new_version(key);
        result
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
        let writer = self.writer()?;
        let keys = self.inner.list_prefix(prefix)?;
        let result = writer.erase_prefix(prefix);
        for key in &keys {
            self.new_version(key);
        }
        result
    }

    fn supports_set_partial(&self) -> bool {
        false
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
            Arc::new(Flaky { inner: MemoryStore::new(), down: AtomicBool::new(false), gets: AtomicUsize::new(0) })
        }
        fn put(&self, key: &str, value: &[u8]) {
            self.inner.set(&StoreKey::new(key).unwrap(), Bytes::copy_from_slice(value)).unwrap();
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

    list_through!(Flaky, inner);

    impl WritableStorageTraits for Flaky {
        fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
            self.check()?;
            self.inner.set(key, value)
        }
        fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> Result<(), StorageError> {
            self.check()?;
            self.inner.set_partial_many(key, offset_values)
        }
        fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
            self.check()?;
            self.inner.erase(key)
        }
        fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
            self.check()?;
            self.inner.erase_prefix(prefix)
        }
        fn supports_set_partial(&self) -> bool {
            false
        }
    }

    /// The caller's metadata predicate (the cache itself knows no names): what a Zarr source
    /// passes, spelled out here so the cache is tested on its own.
    fn metadata(k: &StoreKey) -> bool {
        let name = k.as_str().rsplit('/').next().unwrap_or("");
        matches!(name, "zarr.json" | ".zarray" | ".zgroup" | ".zattrs" | ".zmetadata")
    }

    /// zarrs' storage conformance tests, through the cache over a local directory (written
    /// through the cache, so the cached copies are exercised too).
    #[test]
    fn conformance_over_a_local_store() {
        let (cache_dir, store_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let local = Arc::new(crate::storage::local::LocalDir::new(store_dir.path()).unwrap());
        let cache =
            DiskCache::open(local.clone(), cache_dir.path(), 1 << 20, "local/", metadata).unwrap().with_writer(local);
        zarrs_storage::store_test::store_write(&cache).unwrap();
        zarrs_storage::store_test::store_read(&cache).unwrap();
        // store_list is skipped: the cache delegates listing to the store below, and a local
        // directory's list_dir does not sort its sub-prefixes (see storage::local's test).
        zarrs_storage::store_test::store_list_size(&cache).unwrap();
        // And again from the cache alone, as a remount would read it.
        zarrs_storage::store_test::store_read(&cache).unwrap();
    }

    fn key(k: &str) -> StoreKey {
        StoreKey::new(k).unwrap()
    }

    fn du(dir: &Path) -> u64 {
        let mut total = std::fs::metadata(dir).unwrap().blocks() * 512;
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let m = e.metadata().unwrap();
            total += if m.is_dir() { du(&e.path()) } else { m.blocks() * 512 };
        }
        total
    }

    #[test]
    fn hits_ranges_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("a/c/0", &[7u8; 10_000]);
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata).unwrap();
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        // Ranges of an object cached whole are served from it.
        let part = cache.get_partial(&key("a/c/0"), ByteRange::Suffix(16)).unwrap().unwrap();
        assert_eq!(&part[..], &[7u8; 16]);
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        // Missing chunks are not cached and not errors.
        assert!(cache.get(&key("a/c/1")).unwrap().is_none());
        // A new cache on the same directory (a remount) serves without the remote.
        drop(cache);
        remote.down.store(true, Ordering::SeqCst);
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata).unwrap();
        assert_eq!(cache.get(&key("a/c/0")).unwrap().unwrap().len(), 10_000);
        assert!(cache.get(&key("a/c/1")).is_err());
        // Another store sharing the directory does not see it.
        let other = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/y/", metadata).unwrap();
        assert!(other.get(&key("a/c/0")).is_err());
    }

    #[test]
    fn metadata_is_refreshed_and_survives_outages() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put(".zmetadata", b"{\"v\": 1}");
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "http://h/x/", metadata).unwrap();
        assert_eq!(&cache.get(&key(".zmetadata")).unwrap().unwrap()[..], b"{\"v\": 1}");
        assert!(cache.get(&key("zarr.json")).unwrap().is_none());
        remote.put(".zmetadata", b"{\"v\": 2}");
        assert_eq!(&cache.get(&key(".zmetadata")).unwrap().unwrap()[..], b"{\"v\": 2}");
        remote.down.store(true, Ordering::SeqCst);
        assert_eq!(&cache.get(&key(".zmetadata")).unwrap().unwrap()[..], b"{\"v\": 2}");
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
        let cache = DiskCache::open(remote.clone(), dir.path(), bound, "s3://b/x/", metadata).unwrap();
        let second = DiskCache::open(remote.clone(), dir.path(), bound, "s3://b/x/", metadata).unwrap();
        for i in 0..64 {
            // Keep c/0 hot; two caches (two daemons) insert into the same directory.
            assert_eq!(cache.get(&key("c/0")).unwrap().unwrap()[0], 0);
            let c = if i % 2 == 0 { &cache } else { &second };
            assert_eq!(c.get(&key(&format!("c/{i}"))).unwrap().unwrap()[0], i as u8);
            assert!(du(dir.path()) <= bound, "du {} > bound {bound} after {i}", du(dir.path()));
        }
        let before = remote.gets.load(Ordering::SeqCst);
        cache.get(&key("c/0")).unwrap();
        assert_eq!(remote.gets.load(Ordering::SeqCst), before, "the hot entry was evicted");
        // Reopening with a smaller bound trims the directory.
        drop((cache, second));
        let _small = DiskCache::open(remote.clone(), dir.path(), 64 << 10, "s3://b/x/", metadata).unwrap();
        assert!(du(dir.path()) <= 64 << 10);
    }

    #[test]
    fn corrupt_or_foreign_entries_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("c/0", b"good");
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata).unwrap();
        let slot = cache.slot(&key("c/0"), &ByteRange::FromStart(0, None), &Version::Original);
        std::fs::write(cache.objects.join(&slot.name), b"ZFSC1\ngarbage").unwrap();
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"good");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"good");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 1);

        // An entry cut short (a crash before its data reached the disk) is a miss, fetched
        // again and replaced: it heals instead of failing every read.
        let path = cache.objects.join(&slot.name);
        let whole = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(whole - 2).unwrap();
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"good");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole, "replaced by a whole entry");
        assert_eq!(&cache.get_partial(&key("c/0"), ByteRange::FromStart(1, Some(2))).unwrap().unwrap()[..], b"oo");
        assert_eq!(remote.gets.load(Ordering::SeqCst), 2, "a range of a whole entry is read from it");
    }

    /// Names in `objects/` of the entries of `k` (version record included).
    fn entries_of(cache: &DiskCache, k: &str) -> Vec<String> {
        let prefix = format!("{}-", cache.key_name(&key(k)));
        let mut names: Vec<String> = std::fs::read_dir(&cache.objects)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_replace_cached_copies_in_every_cache_sharing_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("a/c/0", &[1u8; 1000]);
        remote.put("a/c/1", &[2u8; 1000]);
        let writer = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata)
            .unwrap()
            .with_writer(remote.clone());
        // Another daemon sharing the directory, read-only.
        let reader = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata).unwrap();
        assert_eq!(reader.get(&key("a/c/0")).unwrap().unwrap()[0], 1);
        // Byte ranges cached on their own, as shard reads do.
        let tail = reader.get_partial(&key("a/c/1"), ByteRange::Suffix(8)).unwrap().unwrap();
        assert_eq!(&tail[..], &[2u8; 8]);
        assert!(reader.set(&key("a/c/0"), Bytes::new()).is_err(), "no writer");

        writer.set(&key("a/c/1"), Bytes::from(vec![3u8; 500])).unwrap();
        writer.erase(&key("a/c/0")).unwrap();
        let gets = remote.gets.load(Ordering::SeqCst);
        // The reader sees the new object at once, from the cache (cached whole by the write).
        let tail = reader.get_partial(&key("a/c/1"), ByteRange::Suffix(8)).unwrap().unwrap();
        assert_eq!(&tail[..], &[3u8; 8]);
        assert_eq!(reader.get(&key("a/c/1")).unwrap().unwrap().len(), 500);
        assert_eq!(remote.gets.load(Ordering::SeqCst), gets);
        // The deleted object is gone for both.
        assert!(reader.get(&key("a/c/0")).unwrap().is_none());
        assert!(writer.get(&key("a/c/0")).unwrap().is_none());
        // A remount serves the new version without the remote.
        drop((writer, reader));
        remote.down.store(true, Ordering::SeqCst);
        let again = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata).unwrap();
        assert_eq!(&again.get(&key("a/c/1")).unwrap().unwrap()[..], &[3u8; 500]);
        assert!(again.get(&key("a/c/0")).is_err(), "a deleted chunk is not served");
    }

    #[test]
    fn a_failed_write_still_invalidates() {
        let dir = tempfile::tempdir().unwrap();
        let remote = Flaky::new();
        remote.put("c/0", b"old");
        let cache = DiskCache::open(remote.clone(), dir.path(), 1 << 20, "s3://b/x/", metadata)
            .unwrap()
            .with_writer(remote.clone());
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"old");
        remote.down.store(true, Ordering::SeqCst);
        assert!(cache.set(&key("c/0"), Bytes::from_static(b"new")).is_err());
        // Whether the request was applied is unknown: nothing cached is trusted any more.
        assert!(cache.get(&key("c/0")).is_err());
        remote.down.store(false, Ordering::SeqCst);
        assert_eq!(&cache.get(&key("c/0")).unwrap().unwrap()[..], b"old");
    }

    #[test]
    fn evicting_a_version_record_evicts_every_entry_of_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 128 << 10;
        let remote = Flaky::new();
        remote.put("hot/0", &[9u8; 20_000]);
        let cache = DiskCache::open(remote.clone(), dir.path(), bound, "s3://b/x/", metadata)
            .unwrap()
            .with_writer(remote.clone());
        // An entry of the original version, then a write: two versions on disk.
        cache.get_partial(&key("hot/0"), ByteRange::Suffix(100)).unwrap();
        cache.set(&key("hot/0"), Bytes::from(vec![8u8; 20_000])).unwrap();
        assert_eq!(entries_of(&cache, "hot/0").len(), 3);
        // Fill the cache with other objects until everything of hot/0 is old enough to go.
        for i in 0..40 {
            remote.put(&format!("c/{i}"), &vec![i as u8; 20_000]);
            cache.get(&key(&format!("c/{i}"))).unwrap();
            let names = entries_of(&cache, "hot/0");
            let versioned = names.iter().any(|n| n.ends_with(VERSION_SUFFIX));
            assert!(versioned || names.is_empty(), "entries of hot/0 without their version record: {names:?}");
        }
        assert!(entries_of(&cache, "hot/0").is_empty());
        let tail = cache.get_partial(&key("hot/0"), ByteRange::Suffix(100)).unwrap().unwrap();
        assert_eq!(&tail[..], &[8u8; 100]);
    }
}
