//! Writes on a writable mount: bytes land in decoded dirty chunks (see `dirty`), which flush
//! (close, fsync, the write-back thread, memory pressure) encodes and stores.
//!
//! Invariants: a write applies to all its chunks at once or not at all; a view's header may be
//! rewritten only with its own bytes and files never change size; once a write returns, the
//! other views of the array no longer show the old bytes from the page cache; written data
//! past half the cache budget is stored before more is accepted, so memory stays bounded;
//! stores run on the store pool, never the decode pool.

use std::collections::HashMap;
use std::sync::Arc;

use super::dirty;
use super::read::{chunk_key, load_chunk};
use super::{FileKind, FsError, Ino, ZarrFs};
use crate::cache::{Chunk, ChunkKey};

impl ZarrFs {
    /// Write `data` at `offset` into an array file of a writable mount. The bytes land in
    /// decoded chunks (read from the store first, or fill) that stay dirty until written back.
    /// A view's header is not writable, and files never change size.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let (index, a, view) = self.file(ino)?;
        if a.writer.is_none() {
            return Err(FsError::ReadOnly);
        }
        let header: &[u8] = &view.header;
        let written = data.len() as u32;
        // Page write-back of a shared mapping of the `.npy` view sends whole pages, header
        // included: header bytes that are unchanged are fine, changing them is refused.
        let header_len = header.len() as u64;
        let (offset, data) = if offset < header_len {
            let n = (header_len - offset).min(data.len() as u64) as usize;
            if data[..n] != header[offset as usize..offset as usize + n] {
                return Err(FsError::NotPermitted);
            }
            (header_len, &data[n..])
        } else {
            (offset, data)
        };
        let start = offset - header_len;
        let len = data.len() as u64;
        if start.checked_add(len).is_none_or(|end| end > view.layout.file_size()) {
            return Err(FsError::TooBig);
        }
        // Written data past half the budget that the last write-back could not store: store it
        // now, or refuse this write before it adds more (a write that fails did not happen).
        if self.dirty.bytes() > self.options.cache_bytes / 2 {
            self.flush(None)?;
        }
        let pieces = view.layout.pieces(start, len);
        let pieces: Vec<_> = pieces
            .iter()
            .map(|p| {
                (
                    chunk_key(index, a, &p.chunk),
                    p.chunk.as_slice(),
                    p.chunk_offset as usize,
                    p.out_offset as usize,
                    p.len as usize,
                )
            })
            .collect();
        // Chunks not yet dirty start from their stored contents; load those first, outside any
        // lock, then apply the whole write at once (again if a write-back retired a chunk).
        let mut bases: HashMap<ChunkKey, Chunk> = HashMap::new();
        let mut lacking: Vec<ChunkKey> = pieces.iter().map(|p| p.0).filter(|k| !self.dirty.contains(*k)).collect();
        lacking.dedup();
        let mut epoch = self.dirty.epoch();
        loop {
            for key in lacking {
                let chunk = pieces.iter().find(|p| p.0 == key).expect("key from pieces").1;
                bases.insert(key, load_chunk(&self.cache, index, a, chunk)?);
            }
            match self.dirty.apply(&pieces, &bases, epoch, data) {
                Ok(()) => break,
                Err((missing, now)) => (lacking, epoch) = (missing, now),
            }
        }
        // The same bytes seen through the array's other views may sit in the page cache.
        if let Some(invalidate) = self.invalidate.get() {
            for other in a.views.iter().filter(|v| v.ino != ino) {
                invalidate(other.ino, start + other.header.len() as u64, len);
            }
        }
        let dirty = self.dirty.publish_bytes(|bytes| self.cache.set_reserved(bytes));
        // Past half the budget, the writer pays for write-back: memory stays bounded. Writes
        // that copy chunks being stored count too, so they wait for the write-back to end.
        if dirty > self.options.cache_bytes / 2 {
            // Applied, whatever the write-back says: if it fails (the log names the array), the
            // data stays in memory, is retried, and the next write is refused until it succeeds.
            let _ = self.flush(None);
        }
        Ok(written)
    }

    /// Store the dirty chunks of the array behind `ino` (fsync, close) — or of every array.
    pub fn flush_file(&self, ino: Option<Ino>) -> Result<(), FsError> {
        if !self.options.writable {
            return Ok(());
        }
        match ino.map(|i| self.file(i)).transpose() {
            Ok(None) => self.flush(None),
            Ok(Some((index, _, _))) => self.flush(Some(index)),
            Err(FsError::IsDir) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Encode and store dirty chunks (of one array, or all), then let them become clean.
    fn flush(&self, array: Option<usize>) -> Result<(), FsError> {
        let _one_at_a_time = self.dirty.begin_flush();
        let batch = self.dirty.snapshot(|k| array.is_none_or(|a| k.0 as usize == a));
        let result = self.store_and_retire(&batch);
        drop(batch);
        self.dirty.forget_copies();
        self.dirty.publish_bytes(|bytes| self.cache.set_reserved(bytes));
        result
    }

    fn store_and_retire(&self, batch: &[dirty::Snapshot]) -> Result<(), FsError> {
        let mut result = Ok(());
        for group in batch.chunk_by(|x, y| x.key.0 == y.key.0) {
            let a = &self.arrays[group[0].key.0 as usize];
            let Some(writer) = &a.writer else { continue };
            let chunks: Vec<(&[u64], &[u8])> = group.iter().map(|s| (s.chunk.as_slice(), s.data.as_slice())).collect();
            let store = || writer.store_chunks(&chunks);
            match self.pools.store.as_ref().map_or_else(store, |pool| pool.install(store)) {
                Ok(()) => self.dirty.retire(group, |key, data| self.cache.replace(key, data)),
                Err(e) => {
                    log::error!("{}: write-back failed, data kept in memory: {e}", a.info.path);
                    result = Err(FsError::from(e));
                }
            }
        }
        result
    }

    /// Size changes are refused (an array's shape is fixed); setting the same size is a no-op.
    pub fn set_size(&self, ino: Ino, size: u64) -> Result<super::Attr, FsError> {
        let attr = self.getattr(ino)?;
        match attr.kind {
            FileKind::Directory => Err(FsError::IsDir),
            _ if !self.options.writable => Err(FsError::ReadOnly),
            _ if size == attr.size => Ok(attr),
            _ => Err(FsError::NotPermitted),
        }
    }

    /// Why creating, removing or renaming entries (or changing modes, owners, xattrs) fails:
    /// the tree mirrors the store's hierarchy.
    pub fn tree_change_error(&self) -> FsError {
        if self.options.writable {
            FsError::NotPermitted
        } else {
            FsError::ReadOnly
        }
    }

    /// Write dirty chunks back every `every` until the filesystem is dropped, so little is at
    /// risk if the daemon dies.
    pub fn spawn_writeback(self: &Arc<Self>, every: std::time::Duration) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("zarrfs-writeback".into()).spawn(move || loop {
            std::thread::sleep(every);
            let Some(fs) = weak.upgrade() else { return };
            let _ = fs.flush(None);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{array_info, Synthetic};
    use super::super::{FsOptions, Pools, ROOT_INO};
    use super::*;
    use crate::source::{ChunkError, ChunkWriter, OpenArray};
    use parking_lot::Mutex;
    use std::ffi::OsStr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store that takes its time on its first call: says it started, then waits to be let go.
    struct SlowFirstStore(Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>);
    impl ChunkWriter for SlowFirstStore {
        fn store_chunks(&self, _: &[(&[u64], &[u8])]) -> Result<(), ChunkError> {
            if let Some((started, go)) = self.0.lock().take() {
                started.send(()).unwrap();
                go.recv().unwrap();
            }
            Ok(())
        }
    }

    fn writable_fs(writer: Arc<dyn ChunkWriter>, cache_bytes: u64) -> Arc<ZarrFs> {
        let info = array_info("/a", [64, 4096], [64, 64]);
        let array = OpenArray { info, decoder: Arc::new(Synthetic::new([64, 4096], [64, 64])), writer: Some(writer) };
        let options = FsOptions { cache_bytes, decode_threads: 2, uid: 0, gid: 0, writable: true };
        Arc::new(ZarrFs::new(vec![], vec![array], "root", options, Pools::new(2, true).unwrap()).unwrap())
    }

    /// Chunks rewritten while a write-back stores them are copied (the store still reads the old
    /// contents): the copies count against the budget, and the writer making them waits for the
    /// write-back once they push written data past half of it.
    #[test]
    fn copies_of_chunks_being_stored_count_against_the_budget() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let budget = 64 * 64 * 2 * 16; // 16 chunks of 64x64 u16
        let fs = writable_fs(Arc::new(SlowFirstStore(Mutex::new(Some((started_tx, go_rx))))), budget);
        let ino = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap().ino;
        let chunk = 64 * 64 * 2u64;
        let at = |c: u64| c * 64 * 2; // first element of chunk c (row 0)
        for c in 0..8 {
            fs.write(ino, at(c), &[1, 0]).unwrap(); // half the budget dirty: no flush yet
        }
        for c in 20..40 {
            fs.read(ino, None, at(c), 2).unwrap(); // clean chunks fill the rest
        }
        let flusher = {
            let fs = fs.clone();
            std::thread::spawn(move || fs.flush_file(None).unwrap())
        };
        started.recv().unwrap(); // the write-back holds snapshots of the 8 chunks
        let rewrites = Arc::new(AtomicUsize::new(0));
        let rewriter = {
            let (fs, rewrites) = (fs.clone(), rewrites.clone());
            std::thread::spawn(move || {
                for c in 0..8 {
                    fs.write(ino, at(c) + 2, &[2, 0]).unwrap();
                    rewrites.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        // The first rewrite copies a chunk and pushes written bytes past half the budget, so
        // that write waits for the write-back before it returns. Its copy shows in the dirty
        // count a moment before the write publishes it to the cache (which then evicts): wait
        // for both, or the check below races with that eviction.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while (fs.dirty.bytes() < 9 * chunk || fs.cache.reserved() < 9 * chunk) && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        assert_eq!(fs.dirty.bytes(), 9 * chunk, "the copy is counted");
        let live = fs.cache.snapshot().cached_bytes + fs.dirty.bytes();
        assert!(live <= budget, "decoded bytes alive {live} > budget {budget}");
        assert_eq!(rewrites.load(Ordering::SeqCst), 0, "the writer that made the copy did not wait");
        go.send(()).unwrap();
        flusher.join().unwrap();
        rewriter.join().unwrap();
        assert_eq!(fs.read(ino, None, at(3), 4).unwrap(), vec![1, 0, 2, 0]);
    }

    /// Records which inodes a write asked the kernel to drop pages of.
    #[test]
    fn a_write_invalidates_every_other_view_and_only_those() {
        struct Stored;
        impl ChunkWriter for Stored {
            fn store_chunks(&self, _: &[(&[u64], &[u8])]) -> Result<(), ChunkError> {
                Ok(())
            }
        }
        let fs = writable_fs(Arc::new(Stored), 1 << 24);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        fs.set_invalidator(Box::new(move |ino, offset, len| log.lock().push((ino, offset, len))));
        let flat = fs.lookup(ROOT_INO, OsStr::new("a")).unwrap().ino;
        let npy = fs.lookup(ROOT_INO, OsStr::new("a.npy")).unwrap().ino;
        let header = fs.getattr(npy).unwrap().size - fs.getattr(flat).unwrap().size;
        fs.write(flat, 10, &[1, 2]).unwrap();
        fs.write(npy, header + 20, &[3, 4]).unwrap();
        assert_eq!(*seen.lock(), vec![(npy, header + 10, 2), (flat, 20, 2)]);
        // The header may be rewritten with its own bytes only; files never grow.
        let own = fs.read(npy, None, 0, 4).unwrap();
        assert_eq!(fs.write(npy, 0, &own).unwrap(), 4);
        assert!(matches!(fs.write(npy, 0, b"XXXX"), Err(FsError::NotPermitted)));
        let size = fs.getattr(flat).unwrap().size;
        assert!(matches!(fs.write(flat, size - 1, &[0, 0]), Err(FsError::TooBig)));
        assert!(matches!(fs.set_size(flat, size + 1), Err(FsError::NotPermitted)));
        assert!(matches!(fs.tree_change_error(), FsError::NotPermitted));
        fs.flush_file(Some(flat)).unwrap();
    }
}
