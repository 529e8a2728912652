//! A local store directory as zarrs storage ([`LocalDir`]): reads go straight to `pread` into
//! buffers of a few sizes, every write replaces its file atomically (temporary file in the same
//! directory, fsync, rename, fsync of the directory), and [`remove_dead_temp_files`] clears
//! what writers killed mid-write left behind.
//!
//! Invariants: a reader never sees a torn file; every temporary file is hidden and names the
//! process writing it ([`temp_name`]), so only files of dead processes are ever removed.

use std::path::Path;

use zarrs::filesystem::{FilesystemStore, FilesystemStoreCreateError};
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator, InvalidByteRangeError};
use zarrs::storage::{
    Bytes, MaybeBytesIterator, ReadableStorageTraits, StorageError, StoreKey, StorePrefix, WritableStorageTraits,
};

/// A store directory. zarrs' `FilesystemStore` keeps a lock entry for every key it has touched,
/// for the life of the store (a daemon reading millions of chunks would grow without bound),
/// and writes files in place (a crash could leave a torn chunk). Here reads go straight to
/// `pread`, and every write replaces its file atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory. Listing is delegated.
pub struct LocalDir {
    inner: FilesystemStore,
}

impl LocalDir {
    /// The directory `root` as a store (it is not checked to exist).
    pub fn new(root: &Path) -> Result<LocalDir, FilesystemStoreCreateError> {
        Ok(LocalDir { inner: FilesystemStore::new(root)? })
    }
}

/// The capacity to read `len` bytes into: `len` rounded up to one of a few sizes per power of
/// two. zarrs takes the buffer over and frees it once the chunk is decoded, while the decoded
/// chunk stays in the cache; a hole of exactly one encoded chunk's size, left between cached
/// chunks, rarely fits the next (sizes vary), and such holes stay resident: tens of MiB over the
/// cache budget after a full scan. Holes of a common size are reused by the next read.
fn read_buffer_capacity(len: usize) -> usize {
    let step = (len.next_power_of_two() / 8).max(4096);
    len.div_ceil(step) * step
}

impl ReadableStorageTraits for LocalDir {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        use std::os::unix::fs::FileExt;
        let file = match std::fs::File::open(self.inner.key_to_fspath(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let size = file.metadata()?.len();
        let read = |range: ByteRange| -> Result<Bytes, StorageError> {
            let (start, len) = match range {
                ByteRange::FromStart(start, Some(len)) => (start, len),
                ByteRange::FromStart(start, None) => {
                    (start, size.checked_sub(start).ok_or(InvalidByteRangeError::new(range, size))?)
                }
                ByteRange::Suffix(len) => (size.checked_sub(len).ok_or(InvalidByteRangeError::new(range, size))?, len),
            };
            if start.checked_add(len).is_none_or(|end| end > size) {
                return Err(InvalidByteRangeError::new(range, size).into());
            }
            let mut buf = Vec::with_capacity(read_buffer_capacity(len as usize));
            buf.resize(len as usize, 0);
            file.read_exact_at(&mut buf, start)?;
            Ok(Bytes::from(buf))
        };
        let out: Vec<Result<Bytes, StorageError>> = byte_ranges.map(read).collect();
        Ok(Some(Box::new(out.into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        match std::fs::metadata(self.inner.key_to_fspath(key)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

list_through!(LocalDir, inner);

/// The temporary file a chunk is written to before it replaces `name`: hidden, so zarr-python
/// and listings skip it, and naming the writing process, so leftovers can be told apart.
fn temp_name(name: &str, pid: u32, n: u64) -> String {
    format!(".{name}.zarrfs-{pid}-{n}.tmp")
}

/// The process that wrote a file named by [`temp_name`], if `file_name` is one.
fn temp_writer(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (rest, n) = rest.rsplit_once('-')?;
    let (_, pid) = rest.rsplit_once(".zarrfs-")?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

/// Remove the temporary files that writers which are no longer running (killed mid-write) left
/// under `root`; a live process's files are its writes in progress. Returns how many went.
pub fn remove_dead_temp_files(root: &Path) -> usize {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                dirs.push(entry.path());
                continue;
            }
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(temp_writer) else { continue };
            if kind.is_file()
                && !Path::new("/proc").join(pid.to_string()).exists()
                && std::fs::remove_file(entry.path()).is_ok()
            {
                log::info!("{}: removed {} left by an interrupted write", root.display(), entry.path().display());
                removed += 1;
            }
        }
    }
    removed
}

impl WritableStorageTraits for LocalDir {
    fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
        use std::io::Write;
        use std::sync::atomic::{AtomicU64, Ordering};
        static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
        let path = self.inner.key_to_fspath(key);
        let dir = path.parent().ok_or_else(|| StorageError::Other(format!("{key}: no parent directory")))?;
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(temp_name(&name, std::process::id(), n));
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(&value)?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            std::fs::File::open(dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        Ok(written?)
    }

    fn set_partial_many(
        &self,
        key: &StoreKey,
        offset_values: zarrs::storage::OffsetBytesIterator,
    ) -> Result<(), StorageError> {
        zarrs::storage::store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
        let path = self.inner.key_to_fspath(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                if let Some(dir) = path.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
        self.inner.erase_prefix(prefix)
    }

    fn supports_set_partial(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_buffers_come_in_few_sizes() {
        for len in [0, 1, 4095, 4096, 4097, 100_000, 1_693_314, 1 << 21, (1 << 21) + 1, 7 << 20] {
            let cap = read_buffer_capacity(len);
            assert!(cap >= len && cap <= len + len / 4 + 4096, "{len} -> {cap}");
        }
        // encoded chunks of similar size leave holes the next one fits
        assert_eq!(read_buffer_capacity(1_693_314), read_buffer_capacity(1_700_000));
    }

    #[test]
    fn temp_names_name_their_writer() {
        assert_eq!(temp_writer(&temp_name("c.0.1", 4242, 7)), Some(4242));
        assert_eq!(temp_writer(&temp_name("zarr.json", 1, 0)), Some(1));
        for other in [".zarray", "0.0", ".c.zarrfs-12.tmp", ".c.zarrfs-x-1.tmp", "c.zarrfs-1-2.tmp", ".c.zarrfs-1-2"] {
            assert_eq!(temp_writer(other), None, "{other}");
        }
    }

    /// zarrs' storage conformance tests. `store_write` uses `set_partial`, which LocalDir
    /// serves as read-modify-write through a whole-file atomic replace: it passes too.
    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path()).unwrap();
        zarrs_storage::store_test::store_write(&store).unwrap();
        zarrs_storage::store_test::store_read(&store).unwrap();
        // store_list is skipped: listing is delegated to zarrs' FilesystemStore, whose list_dir
        // returns sub-prefixes in directory order, not sorted as the test expects. Nothing here
        // relies on that order (the hierarchy walk sorts children itself); sorting in
        // list_dir would be a behaviour change, left out of this restructuring.
        zarrs_storage::store_test::store_list_size(&store).unwrap();
    }
}
