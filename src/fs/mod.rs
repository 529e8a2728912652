//! The filesystem on plain Rust types: the tree of groups and array files, attributes, reads.
//!
//! No FUSE types appear here; [`crate::fuse`] translates. Errors are `libc` errno values because
//! that is the vocabulary every caller of a filesystem ends up speaking.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde_json::{json, Value};

mod dirty;

use crate::cache::{Chunk, ChunkCache, ChunkKey, Claim, Flight};
use crate::layout::ChunkLayout;
use crate::npy;
use crate::source::{ArrayInfo, ChunkDecoder, ChunkError, ChunkWriter, GroupInfo, OpenArray};
use dirty::DirtyChunks;

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;
pub type Errno = i32;

/// What a user configures about a mount.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Byte budget of the decoded-chunk cache.
    pub cache_bytes: u64,
    /// Threads that decode chunks, shared by all readers and the prefetcher.
    pub decode_threads: usize,
    pub uid: u32,
    pub gid: u32,
    /// Writes allowed (`-o rw`): array files are writable and written chunks are stored back.
    pub writable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    File,
}

/// The attributes of a node, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

/// `statfs` figures: a read-only filesystem whose size is the sum of its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub files: u64,
    pub name_len: u32,
}

#[derive(Debug)]
enum NodeKind {
    Dir {
        children: BTreeMap<OsString, Ino>,
        group: Option<usize>,
    },
    /// The flat file of array `.0`.
    Data(usize),
    /// The `.npy` view of array `.0`.
    Npy(usize),
}

#[derive(Debug)]
struct Node {
    parent: Ino,
    kind: NodeKind,
    mtime: SystemTime,
}

struct MountedArray {
    info: ArrayInfo,
    layout: ChunkLayout,
    decoder: Arc<dyn ChunkDecoder>,
    writer: Option<Arc<dyn ChunkWriter>>,
    npy_header: Vec<u8>,
    /// File bytes spanned by one stripe, a row of chunks along the first axis.
    chunk_row_bytes: u64,
    /// Stripes the prefetcher keeps decoding ahead of a sequential reader (0: none).
    prefetch_stripes: u64,
    /// The two files showing this array: the flat file and the `.npy` view.
    data_ino: Ino,
    npy_ino: Ino,
}

thread_local! {
    /// Where a read that spans several pieces is assembled: one buffer per FUSE thread, reused,
    /// because a fresh megabyte per request costs page faults on every read of a scan.
    static ASSEMBLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Per-open-file state of the sequential-read detector.
#[derive(Debug, Default)]
struct Handle {
    /// Furthest end of the reads of the current scan.
    last_end: u64,
    /// First stripe (row of chunks along axis 0) not yet handed to the prefetcher.
    next_stripe: u64,
    /// Stripe of the previous read, and how many stripe boundaries this scan has crossed:
    /// the prefetch window grows with it, so a reader of a short slice (one worker's share of
    /// an array) does not set off decodes far past its end.
    stripe: u64,
    crossed: u64,
}

/// A read continues a scan when it starts at most this far past the scan's furthest end. Zero:
/// a strided (column) access must not set off whole-stripe prefetches, and a readahead read
/// that arrives early only moves the scan's end, so the reads it overtook still count.
const SEQUENTIAL_GAP: u64 = 0;
/// ... or at most this far before it (several FUSE threads finish out of order).
const SEQUENTIAL_BACK: u64 = 16 << 20;

pub struct ZarrFs {
    nodes: Vec<Node>,
    groups: Vec<GroupInfo>,
    arrays: Arc<Vec<MountedArray>>,
    cache: Arc<ChunkCache>,
    pool: rayon::ThreadPool,
    /// Threads that store written chunks: never the decode pool. Storing a sharded array holds
    /// its shard lock across parallel work, and a decode pool thread waiting inside that work
    /// may run a queued decode of the same array, which needs the lock: a deadlock.
    store_pool: Option<rayon::ThreadPool>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    bytes_served: AtomicU64,
    dirty: DirtyChunks,
    /// Tells the kernel to drop cached pages of a file (inode, offset, length): the other view
    /// of an array after a write through one of them.
    invalidate: std::sync::OnceLock<Box<dyn Fn(Ino, u64, u64) + Send + Sync>>,
    options: FsOptions,
}

impl ZarrFs {
    /// Build the tree. `root_array_name` names the files of a store whose root is an array.
    pub fn new(
        groups: Vec<GroupInfo>,
        arrays: Vec<OpenArray>,
        root_array_name: &str,
        options: FsOptions,
    ) -> Result<ZarrFs, String> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.decode_threads.max(1))
            .thread_name(|i| format!("zarrfs-decode-{i}"))
            .build()
            .map_err(|e| e.to_string())?;
        let store_pool = match options.writable {
            true => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(options.decode_threads.max(1))
                    .thread_name(|i| format!("zarrfs-store-{i}"))
                    .build()
                    .map_err(|e| e.to_string())?,
            ),
            false => None,
        };
        let root_mtime = groups.iter().find(|g| g.path == "/").map(|g| g.mtime);
        let mut fs = ZarrFs {
            nodes: vec![
                // Index 0 is unused so that an inode number is its index.
                Node {
                    parent: 0,
                    kind: NodeKind::Dir { children: BTreeMap::new(), group: None },
                    mtime: SystemTime::UNIX_EPOCH,
                },
                Node {
                    parent: ROOT_INO,
                    kind: NodeKind::Dir { children: BTreeMap::new(), group: None },
                    mtime: root_mtime.unwrap_or(SystemTime::UNIX_EPOCH),
                },
            ],
            groups: Vec::new(),
            arrays: Arc::new(Vec::new()),
            cache: Arc::new(ChunkCache::new(options.cache_bytes)),
            pool,
            store_pool,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            bytes_served: AtomicU64::new(0),
            dirty: DirtyChunks::default(),
            invalidate: std::sync::OnceLock::new(),
            options,
        };
        for group in groups {
            let ino = fs.dir_for(&group.path, group.mtime);
            let index = fs.groups.len();
            if let NodeKind::Dir { group, .. } = &mut fs.nodes[ino as usize].kind {
                *group = Some(index);
            }
            fs.groups.push(group);
        }
        for array in arrays {
            let info = array.info;
            let (parent_path, name) = if info.path == "/" {
                ("/".to_string(), root_array_name.to_string())
            } else {
                let (parent, name) = info.path.rsplit_once('/').unwrap_or(("", &info.path));
                (if parent.is_empty() { "/".to_string() } else { parent.to_string() }, name.to_string())
            };
            let layout = ChunkLayout::new(&info.shape, &info.decode_chunk_shape, info.itemsize)
                .map_err(|e| format!("array {}: {e}", info.path))?;
            let row_elems: u64 = info.shape.iter().skip(1).product();
            let chunk_row_bytes = info.decode_chunk_shape.first().copied().unwrap_or(1) * row_elems * info.itemsize;
            let prefetch_stripes = prefetch_depth(&layout, fs.options.cache_bytes, fs.options.decode_threads);
            let index = fs.arrays.len();
            let parent = fs.dir_for(&parent_path, info.mtime);
            let data_ino = fs.add_node(parent, &name, NodeKind::Data(index), info.mtime)?;
            let npy_ino = fs.add_node(parent, &format!("{name}.npy"), NodeKind::Npy(index), info.mtime)?;
            Arc::get_mut(&mut fs.arrays).expect("not shared while building").push(MountedArray {
                npy_header: npy::header(&info.dtype, &info.shape),
                layout,
                decoder: array.decoder,
                writer: if fs.options.writable { array.writer } else { None },
                chunk_row_bytes,
                prefetch_stripes,
                data_ino,
                npy_ino,
                info,
            });
        }
        Ok(fs)
    }

    /// The directory inode for a hierarchy path, creating it and its ancestors as needed.
    fn dir_for(&mut self, path: &str, mtime: SystemTime) -> Ino {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let existing = match &self.nodes[ino as usize].kind {
                NodeKind::Dir { children, .. } => children.get(OsStr::new(part)).copied(),
                _ => None,
            };
            ino = match existing {
                Some(child) => child,
                None => self
                    .add_node(ino, part, NodeKind::Dir { children: BTreeMap::new(), group: None }, mtime)
                    .expect("a new directory name is free"),
            };
        }
        ino
    }

    fn add_node(&mut self, parent: Ino, name: &str, kind: NodeKind, mtime: SystemTime) -> Result<Ino, String> {
        let ino = self.nodes.len() as Ino;
        let NodeKind::Dir { children, .. } = &mut self.nodes[parent as usize].kind else {
            return Err(format!("{name}: parent is not a directory"));
        };
        if children.contains_key(OsStr::new(name)) {
            return Err(format!("two entries would be named {name:?}"));
        }
        children.insert(name.into(), ino);
        self.nodes.push(Node { parent, kind, mtime });
        Ok(ino)
    }

    fn node(&self, ino: Ino) -> Result<&Node, Errno> {
        match self.nodes.get(ino as usize) {
            Some(node) if ino != 0 => Ok(node),
            _ => Err(libc::ENOENT),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (kind, size, perm, nlink) = match &node.kind {
            NodeKind::Dir { children, .. } => {
                let subdirs =
                    children.values().filter(|c| matches!(self.nodes[**c as usize].kind, NodeKind::Dir { .. })).count()
                        as u32;
                let perm = if self.options.writable { 0o755 } else { 0o555 };
                (FileKind::Directory, 0, perm, 2 + subdirs)
            }
            NodeKind::Data(a) => {
                let a = &self.arrays[*a];
                (FileKind::File, a.layout.file_size(), file_perm(a), 1)
            }
            NodeKind::Npy(a) => {
                let a = &self.arrays[*a];
                (FileKind::File, a.npy_header.len() as u64 + a.layout.file_size(), file_perm(a), 1)
            }
        };
        Ok(Attr { ino, kind, size, perm, nlink, uid: self.options.uid, gid: self.options.gid, mtime: node.mtime })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, Errno> {
        match &self.node(parent)?.kind {
            NodeKind::Dir { children, .. } => self.getattr(*children.get(name).ok_or(libc::ENOENT)?),
            _ => Err(libc::ENOTDIR),
        }
    }

    /// Entries of a directory, "." and ".." first.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(Ino, FileKind, OsString)>, Errno> {
        let node = self.node(ino)?;
        let NodeKind::Dir { children, .. } = &node.kind else { return Err(libc::ENOTDIR) };
        let mut entries = vec![(ino, FileKind::Directory, ".".into()), (node.parent, FileKind::Directory, "..".into())];
        for (name, child) in children {
            let kind = match self.nodes[*child as usize].kind {
                NodeKind::Dir { .. } => FileKind::Directory,
                _ => FileKind::File,
            };
            entries.push((*child, kind, name.clone()));
        }
        Ok(entries)
    }

    /// Open a file for reading; returns the handle that later reads carry.
    pub fn open(&self, ino: Ino, write: bool) -> Result<u64, Errno> {
        match self.node(ino)?.kind {
            NodeKind::Dir { .. } => return Err(libc::EISDIR),
            NodeKind::Data(a) | NodeKind::Npy(a) if write && self.arrays[a].writer.is_none() => {
                return Err(libc::EROFS)
            }
            _ => {}
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Handle::default());
        Ok(fh)
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    /// Read `size` bytes at `offset` of a file (short at end of file, empty past it) and hand
    /// them to `reply`: a slice of a cached chunk when the read falls inside one piece (no
    /// copy), else a buffer assembled from several.
    pub fn read_with<R>(
        &self,
        ino: Ino,
        fh: Option<u64>,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, Errno> {
        let (index, header): (usize, &[u8]) = match self.node(ino)?.kind {
            NodeKind::Data(a) => (a, &[]),
            NodeKind::Npy(a) => (a, &self.arrays[a].npy_header),
            NodeKind::Dir { .. } => return Err(libc::EISDIR),
        };
        let array = &self.arrays[index];
        let file_size = header.len() as u64 + array.layout.file_size();
        let end = offset.saturating_add(size as u64).min(file_size);
        if offset >= end {
            return Ok(reply(&[]));
        }
        let header_len = header.len() as u64;
        // The part of the request that falls in the array's data.
        let data_start = offset.max(header_len) - header_len;
        let data_end = end.saturating_sub(header_len);
        if let Some(fh) = fh.filter(|_| data_end > data_start) {
            self.note_read_and_prefetch(fh, index, data_start, data_end);
        }
        let pieces = array.layout.pieces(data_start, data_end.saturating_sub(data_start));
        // Pieces of a multi-dimensional read alternate between chunks row by row.
        let mut slot_of: HashMap<&[u64], usize> = HashMap::new();
        let mut distinct: Vec<&[u64]> = Vec::new();
        let slots: Vec<usize> = pieces
            .iter()
            .map(|p| {
                *slot_of.entry(p.chunk.as_slice()).or_insert_with(|| {
                    distinct.push(p.chunk.as_slice());
                    distinct.len() - 1
                })
            })
            .collect();
        let chunks = self.fetch(index, &distinct)?;
        let head = offset < header_len;
        self.bytes_served.fetch_add(end - offset, Ordering::Relaxed);
        if !head && pieces.len() == 1 {
            let p = &pieces[0];
            let start = p.chunk_offset as usize;
            return Ok(reply(&chunks[0][start..start + p.len as usize]));
        }
        let len = (end - offset) as usize;
        Ok(ASSEMBLY.with_borrow_mut(|buffer| {
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            // Every byte of out is written below: the header part, then the pieces, which
            // cover the data part exactly.
            let out = &mut buffer[..len];
            let data_out = if head {
                let n = (header_len.min(end) - offset) as usize;
                out[..n].copy_from_slice(&header[offset as usize..offset as usize + n]);
                n
            } else {
                0
            };
            for (p, slot) in pieces.iter().zip(slots) {
                let chunk = &chunks[slot];
                let dst = data_out + p.out_offset as usize;
                let src = p.chunk_offset as usize;
                out[dst..dst + p.len as usize].copy_from_slice(&chunk[src..src + p.len as usize]);
            }
            reply(out)
        }))
    }

    /// Each distinct chunk — dirty, cached, or decoded now. Missing chunks are claimed and
    /// decoded on the decode pool, all at once; this (FUSE) thread only waits, so a decode
    /// thread never blocks on another's work. A read needing a single missing chunk decodes it
    /// here instead: that is the latency of a random read.
    fn fetch(&self, array: usize, distinct: &[&[u64]]) -> Result<Vec<Chunk>, Errno> {
        let a = &self.arrays[array];
        let mut pending: Vec<Result<Chunk, Arc<Flight>>> = Vec::with_capacity(distinct.len());
        let mut inline: Option<(usize, ChunkKey, Arc<Flight>)> = None;
        for (i, c) in distinct.iter().enumerate() {
            let key = chunk_key(array, a, c);
            if let Some(dirty) = self.options.writable.then(|| self.dirty.get(key)).flatten() {
                pending.push(Ok(dirty));
                continue;
            }
            pending.push(match self.cache.claim(key) {
                Claim::Hit(chunk) => Ok(chunk),
                Claim::Wait(flight) => Err(flight),
                Claim::Lead(flight) if distinct.len() == 1 => {
                    inline = Some((i, key, flight.clone()));
                    Err(flight)
                }
                Claim::Lead(flight) => {
                    self.spawn_decode(array, c.to_vec(), key, flight.clone());
                    Err(flight)
                }
            });
        }
        if let Some((i, key, flight)) = inline {
            pending[i] = Ok(lead_decode(&self.cache, a, distinct[i], key, &flight).map_err(|_| libc::EIO)?);
        }
        pending.into_iter().map(|p| p.or_else(|flight| flight.wait().map_err(|_| libc::EIO))).collect()
    }

    fn spawn_decode(&self, array: usize, chunk: Vec<u64>, key: ChunkKey, flight: Arc<Flight>) {
        let (cache, arrays) = (self.cache.clone(), self.arrays.clone());
        self.pool.spawn(move || {
            let _ = lead_decode(&cache, &arrays[array], &chunk, key, &flight);
        });
    }

    /// Sequential-read detection: while a handle reads a scan, keep the decode pool working on
    /// the stripes ahead of it (and on the rest of the current one), each stripe handed over
    /// once. The window starts at one stripe and grows by one per stripe read, up to a depth
    /// fixed at mount time so that the stripes being read and decoded fit the cache together:
    /// a full scan then decodes each chunk exactly once.
    fn note_read_and_prefetch(&self, fh: u64, array: usize, start: u64, end: u64) {
        let a = &self.arrays[array];
        if a.prefetch_stripes == 0 || a.chunk_row_bytes == 0 {
            return;
        }
        let stripes = {
            let mut handles = self.handles.lock().unwrap();
            let Some(h) = handles.get_mut(&fh) else { return };
            // A scan starts at the beginning, or continues where this handle's reads got to.
            let sequential = match h.last_end {
                0 => start == 0,
                last => start <= last + SEQUENTIAL_GAP && start + SEQUENTIAL_BACK >= last,
            };
            let current = start / a.chunk_row_bytes;
            if !sequential {
                *h = Handle { last_end: end, next_stripe: 0, stripe: current, crossed: 0 };
                return;
            }
            h.last_end = h.last_end.max(end);
            let entered = current > h.stripe;
            if entered {
                h.crossed += current - h.stripe;
                h.stripe = current;
            }
            let ahead = a.prefetch_stripes.min(1 + h.crossed);
            // The furthest stripe is handed over only once the reader is half way through the
            // current one: by then the stripe before it is done with (readahead may deliver a
            // scan's reads out of order, but not half a stripe late), so decoding the new
            // stripe can evict it without evicting anything still to be read.
            let reach = if 2 * (start % a.chunk_row_bytes) >= a.chunk_row_bytes { ahead } else { ahead - 1 };
            let last = (current + reach).min(a.layout.file_size().saturating_sub(1) / a.chunk_row_bytes);
            let first = h.next_stripe.max(current);
            h.next_stripe = h.next_stripe.max(last + 1);
            (entered.then_some(current..=last), first..=last)
        };
        let (entered, stripes) = stripes;
        // The stripes ahead were decoded before the reader last used the stripe it just left:
        // mark them used now, nearest first, so that making room for the next one evicts the
        // stripe left behind rather than one still to be read.
        for stripe in entered.into_iter().flatten() {
            for chunk in a.layout.chunks_touched(stripe * a.chunk_row_bytes, a.chunk_row_bytes) {
                self.cache.touch(chunk_key(array, a, &chunk));
            }
        }
        for stripe in stripes {
            for chunk in a.layout.chunks_touched(stripe * a.chunk_row_bytes, a.chunk_row_bytes) {
                let key = chunk_key(array, a, &chunk);
                if self.options.writable && self.dirty.contains(key) {
                    continue;
                }
                if let Claim::Lead(flight) = self.cache.claim(key) {
                    self.spawn_decode(array, chunk, key, flight);
                }
            }
        }
    }

    /// Write `data` at `offset` into an array file of a writable mount. The bytes land in
    /// decoded chunks (read from the store first, or fill) that stay dirty until written back.
    /// The `.npy` header is not writable, and files never change size.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let (index, header): (usize, &[u8]) = match self.node(ino)?.kind {
            NodeKind::Data(a) => (a, &[]),
            NodeKind::Npy(a) => (a, &self.arrays[a].npy_header),
            NodeKind::Dir { .. } => return Err(libc::EISDIR),
        };
        let a = &self.arrays[index];
        if a.writer.is_none() {
            return Err(libc::EROFS);
        }
        let written = data.len() as u32;
        // Page write-back of a shared mapping of the `.npy` view sends whole pages, header
        // included: header bytes that are unchanged are fine, changing them is refused.
        let header_len = header.len() as u64;
        let (offset, data) = if offset < header_len {
            let n = (header_len - offset).min(data.len() as u64) as usize;
            if data[..n] != header[offset as usize..offset as usize + n] {
                return Err(libc::EPERM);
            }
            (header_len, &data[n..])
        } else {
            (offset, data)
        };
        let start = offset - header_len;
        let len = data.len() as u64;
        if start.checked_add(len).is_none_or(|end| end > a.layout.file_size()) {
            return Err(libc::EFBIG);
        }
        // Written data past half the budget that the last write-back could not store: store it
        // now, or refuse this write before it adds more (a write that fails did not happen).
        if self.dirty.bytes() > self.options.cache_bytes / 2 {
            self.flush(None)?;
        }
        let pieces = a.layout.pieces(start, len);
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
        // The same bytes seen through the array's other file may sit in the page cache.
        if let Some(invalidate) = self.invalidate.get() {
            match ino == a.data_ino {
                true => invalidate(a.npy_ino, start + a.npy_header.len() as u64, len),
                false => invalidate(a.data_ino, start, len),
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

    /// Whether writes are allowed (files may change while open).
    pub fn writable(&self) -> bool {
        self.options.writable
    }

    /// How to drop kernel-cached pages of a file, once the mount can tell the kernel.
    pub fn set_invalidator(&self, invalidate: Box<dyn Fn(Ino, u64, u64) + Send + Sync>) {
        let _ = self.invalidate.set(invalidate);
    }

    /// Store the dirty chunks of the array behind `ino` (fsync, close) — or of every array.
    pub fn flush_file(&self, ino: Option<Ino>) -> Result<(), Errno> {
        if !self.options.writable {
            return Ok(());
        }
        match ino.map(|i| self.node(i)).transpose()?.map(|n| &n.kind) {
            None => self.flush(None),
            Some(NodeKind::Data(a) | NodeKind::Npy(a)) => self.flush(Some(*a)),
            Some(NodeKind::Dir { .. }) => Ok(()),
        }
    }

    /// Encode and store dirty chunks (of one array, or all), then let them become clean.
    fn flush(&self, array: Option<usize>) -> Result<(), Errno> {
        let _one_at_a_time = self.dirty.begin_flush();
        let batch = self.dirty.snapshot(|k| array.is_none_or(|a| k.0 as usize == a));
        let result = self.store_and_retire(&batch);
        drop(batch);
        self.dirty.forget_copies();
        self.dirty.publish_bytes(|bytes| self.cache.set_reserved(bytes));
        result
    }

    fn store_and_retire(&self, batch: &[dirty::Snapshot]) -> Result<(), Errno> {
        let mut result = Ok(());
        for group in batch.chunk_by(|x, y| x.key.0 == y.key.0) {
            let a = &self.arrays[group[0].key.0 as usize];
            let Some(writer) = &a.writer else { continue };
            let chunks: Vec<(&[u64], &[u8])> = group.iter().map(|s| (s.chunk.as_slice(), s.data.as_slice())).collect();
            let store = || writer.store_chunks(&chunks);
            match self.store_pool.as_ref().map_or_else(store, |pool| pool.install(store)) {
                Ok(()) => self.dirty.retire(group, |key, data| self.cache.replace(key, data)),
                Err(e) => {
                    log::error!("{}: write-back failed, data kept in memory: {e}", a.info.path);
                    result = Err(libc::EIO);
                }
            }
        }
        result
    }

    /// Size changes are refused (an array's shape is fixed); setting the same size is a no-op.
    pub fn set_size(&self, ino: Ino, size: u64) -> Result<Attr, Errno> {
        let attr = self.getattr(ino)?;
        match attr.kind {
            FileKind::Directory => Err(libc::EISDIR),
            _ if !self.options.writable => Err(libc::EROFS),
            _ if size == attr.size => Ok(attr),
            _ => Err(libc::EPERM),
        }
    }

    /// Creating, removing or renaming entries: the tree mirrors the store's hierarchy.
    pub fn tree_change_errno(&self) -> Errno {
        if self.options.writable {
            libc::EPERM
        } else {
            libc::EROFS
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

    pub fn statfs(&self) -> StatFs {
        let bytes: u64 = (1..self.nodes.len() as Ino).filter_map(|i| self.getattr(i).ok()).map(|a| a.size).sum();
        StatFs { block_size: 4096, blocks: bytes.div_ceil(4096), files: self.nodes.len() as u64 - 1, name_len: 255 }
    }

    /// Names of the extended attributes of a node.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<String>, Errno> {
        let mut names: Vec<String> = self.xattrs(ino)?.into_iter().map(|(k, _)| k).collect();
        names.sort();
        Ok(names)
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>, Errno> {
        let name = name.to_str().ok_or(libc::ENODATA)?;
        self.xattrs(ino)?.into_iter().find(|(k, _)| k == name).map(|(_, v)| v.into_bytes()).ok_or(libc::ENODATA)
    }

    /// Arrays describe themselves (shape, dtype, ...); groups carry their attributes; the root
    /// also carries the live counters, which is how a filesystem can expose them without
    /// inventing files that might collide with array names.
    fn xattrs(&self, ino: Ino) -> Result<Vec<(String, String)>, Errno> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        match &node.kind {
            NodeKind::Data(a) | NodeKind::Npy(a) => {
                let a = &self.arrays[*a];
                out.extend(a.info.xattrs.iter().cloned());
                if matches!(node.kind, NodeKind::Npy(_)) {
                    out.push(("user.npy.data_offset".into(), a.npy_header.len().to_string()));
                }
            }
            NodeKind::Dir { group, .. } => {
                if let Some(g) = group {
                    out.extend(self.groups[*g].xattrs.iter().cloned());
                }
                if ino == ROOT_INO {
                    out.push(("user.zarrfs.stats".into(), self.stats_json().to_string()));
                }
            }
        }
        Ok(out)
    }

    #[cfg(test)]
    fn stats(&self) -> crate::cache::StatsSnapshot {
        self.cache.snapshot()
    }

    /// Counters as JSON, for the root's `user.zarrfs.stats` and the unmount log.
    pub fn stats_json(&self) -> Value {
        let s = self.cache.snapshot();
        json!({
            "chunks_decoded": s.decodes,
            "decode_errors": s.decode_errors,
            "cache_hits": s.hits,
            "cache_misses": s.misses,
            "evictions": s.evictions,
            "decoded_bytes": s.decoded_bytes,
            "decode_seconds": s.decode_nanos as f64 / 1e9,
            "cached_bytes": s.cached_bytes,
            "cached_chunks": s.cached_chunks,
            "cache_budget_bytes": s.budget_bytes,
            "bytes_served": self.bytes_served.load(Ordering::Relaxed),
        })
    }

    /// Arrays whose stripe (one row of chunks) does not fit the cache: a row-major scan of them
    /// decodes chunks more than once. Returned as (path, bytes needed).
    pub fn stripes_exceeding_cache(&self) -> Vec<(String, u64)> {
        self.arrays
            .iter()
            .filter(|a| a.layout.stripe_bytes() > self.cache.budget())
            .map(|a| (a.info.path.clone(), a.layout.stripe_bytes()))
            .collect()
    }
}

fn file_perm(a: &MountedArray) -> u16 {
    if a.writer.is_some() {
        0o644
    } else {
        0o444
    }
}

fn chunk_key(array: usize, a: &MountedArray, chunk: &[u64]) -> ChunkKey {
    (array as u32, a.layout.chunk_linear(chunk))
}

/// One chunk of array number `array`, from the cache or decoded now (one decode however many
/// ask at once).
fn load_chunk(cache: &ChunkCache, array: usize, a: &MountedArray, chunk: &[u64]) -> Result<Chunk, Errno> {
    let key = chunk_key(array, a, chunk);
    cache.get_or_load(key, a.layout.chunk_bytes(), || decode_checked(a, chunk)).map_err(|_| libc::EIO)
}

/// Decode a chunk this caller has claimed (see [`ChunkCache::claim`]).
fn lead_decode(
    cache: &ChunkCache,
    a: &MountedArray,
    chunk: &[u64],
    key: ChunkKey,
    flight: &Flight,
) -> Result<Chunk, ChunkError> {
    cache.lead(key, flight, a.layout.chunk_bytes(), || decode_checked(a, chunk))
}

/// Decode a chunk and check its size; a failure is logged here, once, by the one decode that
/// all readers of the chunk share (each of them gets EIO).
fn decode_checked(a: &MountedArray, chunk: &[u64]) -> Result<Vec<u8>, ChunkError> {
    a.decoder
        .decode(chunk)
        .and_then(|bytes| match bytes.len() as u64 == a.layout.chunk_bytes() {
            true => Ok(bytes),
            false => Err(ChunkError::Decode {
                key: format!("{chunk:?}"),
                reason: format!("decoded {} bytes, expected {}", bytes.len(), a.layout.chunk_bytes()),
            }),
        })
        .inspect_err(|e| log::error!("{}: {e}", a.info.path))
}

/// Stripes to decode ahead of a sequential reader: enough chunks to keep every decode thread
/// busy twice over, and at least two stripes (the furthest is only started half way through
/// the current one), but never more than fit in the cache beside the stripe being read.
pub fn prefetch_depth(layout: &ChunkLayout, cache_bytes: u64, decode_threads: usize) -> u64 {
    let stripe = layout.stripe_bytes().max(1);
    let chunks_per_stripe = (stripe / layout.chunk_bytes().max(1)).max(1);
    let wanted = (2 * decode_threads as u64).div_ceil(chunks_per_stripe).max(2);
    let fit = (cache_bytes / stripe).saturating_sub(1);
    wanted.min(fit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{ChunkWriter, Format};
    use std::sync::atomic::AtomicUsize;

    /// A 2-D uint16 array whose element (r, c) is `r * cols + c` (mod 2^16), served by a decoder
    /// that counts its decodes per chunk.
    struct Synthetic {
        shape: [u64; 2],
        chunks: [u64; 2],
        decodes: Mutex<HashMap<Vec<u64>, usize>>,
        total: AtomicUsize,
    }

    impl Synthetic {
        fn value(&self, r: u64, c: u64) -> u16 {
            (r * self.shape[1] + c) as u16
        }
        fn expected(&self) -> Vec<u8> {
            (0..self.shape[0])
                .flat_map(|r| (0..self.shape[1]).flat_map(move |c| self.value(r, c).to_ne_bytes()))
                .collect()
        }
    }

    impl ChunkDecoder for Synthetic {
        fn decode(&self, chunk: &[u64]) -> Result<Vec<u8>, ChunkError> {
            *self.decodes.lock().unwrap().entry(chunk.to_vec()).or_default() += 1;
            self.total.fetch_add(1, Ordering::SeqCst);
            let mut out = Vec::new();
            for i in 0..self.chunks[0] {
                for j in 0..self.chunks[1] {
                    let (r, c) = (chunk[0] * self.chunks[0] + i, chunk[1] * self.chunks[1] + j);
                    out.extend_from_slice(&self.value(r, c).to_ne_bytes());
                }
            }
            Ok(out)
        }
    }

    struct NoWrites;
    impl ChunkWriter for NoWrites {
        fn store_chunks(&self, _: &[(&[u64], &[u8])]) -> Result<(), ChunkError> {
            Ok(())
        }
    }

    fn mount(shape: [u64; 2], chunks: [u64; 2], cache_bytes: u64) -> (ZarrFs, Arc<Synthetic>) {
        let source = Arc::new(Synthetic { shape, chunks, decodes: Mutex::default(), total: AtomicUsize::new(0) });
        let info = ArrayInfo {
            path: "/grp/a".into(),
            dtype: "<u2".into(),
            itemsize: 2,
            shape: shape.to_vec(),
            chunks: chunks.to_vec(),
            decode_chunk_shape: chunks.to_vec(),
            fill_value: json!(0),
            attributes: json!({"units": "m"}),
            codecs: json!([]),
            format: Format::Zarr { version: 3 },
            mtime: SystemTime::UNIX_EPOCH,
            xattrs: vec![("user.zarr.shape".into(), json!(shape).to_string())],
        };
        let array = OpenArray { info, decoder: source.clone(), writer: Some(Arc::new(NoWrites)) };
        let options = FsOptions { cache_bytes, decode_threads: 2, uid: 0, gid: 0, writable: false };
        (ZarrFs::new(vec![], vec![array], "root", options).unwrap(), source)
    }

    impl ZarrFs {
        fn read(&self, ino: Ino, fh: Option<u64>, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
            self.read_with(ino, fh, offset, size, |b| b.to_vec())
        }
    }

    fn file(fs: &ZarrFs, name: &str) -> Ino {
        let grp = fs.lookup(ROOT_INO, OsStr::new("grp")).unwrap().ino;
        fs.lookup(grp, OsStr::new(name)).unwrap().ino
    }

    #[test]
    fn tree_attributes_and_xattrs() {
        let (fs, _) = mount([30, 20], [8, 8], 1 << 20);
        let names: Vec<_> =
            fs.readdir(fs.lookup(ROOT_INO, OsStr::new("grp")).unwrap().ino).unwrap().into_iter().map(|e| e.2).collect();
        assert_eq!(names, [".", "..", "a", "a.npy"]);
        let a = fs.getattr(file(&fs, "a")).unwrap();
        assert_eq!((a.size, a.perm), (30 * 20 * 2, 0o444));
        let npy = fs.getattr(file(&fs, "a.npy")).unwrap();
        assert_eq!(npy.size % 64, (30 * 20 * 2) % 64);
        assert_eq!(fs.getxattr(file(&fs, "a"), OsStr::new("user.zarr.shape")).unwrap(), b"[30,20]");
        assert_eq!(fs.getxattr(file(&fs, "a"), OsStr::new("user.zarr.nope")), Err(libc::ENODATA));
        assert_eq!(fs.open(file(&fs, "a"), true), Err(libc::EROFS));
        assert_eq!(fs.lookup(ROOT_INO, OsStr::new("missing")), Err(libc::ENOENT));
    }

    #[test]
    fn reads_match_the_flat_array_at_any_offset() {
        let (fs, src) = mount([30, 20], [8, 7], 1 << 20);
        let expected = src.expected();
        let ino = file(&fs, "a");
        for (offset, len) in [(0, 1200), (1, 3), (37, 500), (1199, 10), (1100, 4096), (1200, 5)] {
            let got = fs.read(ino, None, offset, len).unwrap();
            let end = (offset as usize + len as usize).min(expected.len());
            assert_eq!(got, &expected[(offset as usize).min(end)..end], "offset {offset} len {len}");
        }
        let npy = file(&fs, "a.npy");
        let header = fs.getxattr(npy, OsStr::new("user.npy.data_offset")).unwrap();
        let header: u64 = String::from_utf8(header).unwrap().parse().unwrap();
        let whole = fs.read(npy, None, 0, 1 << 20).unwrap();
        assert_eq!(&whole[..6], b"\x93NUMPY");
        assert_eq!(&whole[header as usize..], &expected[..]);
    }

    #[test]
    fn concurrent_readers_of_one_chunk_decode_it_once() {
        let (fs, src) = mount([64, 64], [64, 64], 1 << 20);
        let fs = Arc::new(fs);
        let ino = file(&fs, "a");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let fs = fs.clone();
                std::thread::spawn(move || fs.read(ino, None, i * 100, 64).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(src.total.load(Ordering::SeqCst), 1);
    }

    /// A sequential scan through one handle decodes every chunk exactly once while the cache
    /// holds two stripes, and the cache never exceeds its budget.
    #[test]
    fn sequential_scan_decodes_each_chunk_once_within_budget() {
        let (shape, chunks) = ([256, 96], [16, 32]);
        let chunk_bytes = 16 * 32 * 2;
        let stripe = 3 * chunk_bytes;
        let (fs, src) = mount(shape, chunks, 2 * stripe);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let expected = src.expected();
        let mut offset = 0;
        while offset < expected.len() as u64 {
            let got = fs.read(ino, Some(fh), offset, 1000).unwrap();
            assert_eq!(got, &expected[offset as usize..(offset as usize + 1000).min(expected.len())]);
            assert!(fs.stats().cached_bytes <= 2 * stripe);
            offset += 1000;
        }
        let decodes = src.decodes.lock().unwrap().clone();
        assert_eq!(decodes.len(), 16 * 3, "every chunk decoded");
        assert!(decodes.values().all(|n| *n == 1), "no chunk decoded twice: {decodes:?}");
    }

    /// The same with a deep prefetch window (one chunk per stripe, several stripes ahead).
    #[test]
    fn deep_prefetch_scan_decodes_each_chunk_once_within_budget() {
        let chunk_bytes = 4 * 64 * 2;
        let (fs, src) = mount([256, 64], [4, 64], 5 * chunk_bytes);
        assert_eq!(fs.arrays[0].prefetch_stripes, 4);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let expected = src.expected();
        for offset in (0..expected.len() as u64).step_by(300) {
            let got = fs.read(ino, Some(fh), offset, 300).unwrap();
            assert_eq!(got, &expected[offset as usize..(offset as usize + 300).min(expected.len())]);
            assert!(fs.stats().cached_bytes <= 5 * chunk_bytes);
        }
        let decodes = src.decodes.lock().unwrap().clone();
        assert_eq!(decodes.len(), 64);
        assert!(decodes.values().all(|n| *n == 1), "no chunk decoded twice: {decodes:?}");
    }

    /// Reading one column with small strided reads is not a scan: only the chunks holding
    /// that column are decoded (rows here are wider than the sequential-read gap).
    #[test]
    fn strided_column_reads_do_not_prefetch() {
        let cols = 70_000u64;
        let (fs, src) = mount([64, cols], [16, 32_768], 1 << 30);
        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        for r in 0..64u64 {
            let offset = (r * cols + 40_000) * 2;
            let got = fs.read(ino, Some(fh), offset, 2).unwrap();
            assert_eq!(got, src.value(r, 40_000).to_ne_bytes());
        }
        let decodes = src.decodes.lock().unwrap().clone();
        assert!(decodes.keys().all(|c| c[1] == 1), "only the column's chunks: {:?}", decodes.keys());
        assert_eq!(decodes.len(), 4);
    }

    /// A worker reading its own short slice of rows, and `np.load` reading the `.npy` header,
    /// do not set off decodes far beyond what they read.
    #[test]
    fn short_slices_and_header_reads_prefetch_little() {
        let (fs, src) = mount([256, 64], [4, 64], 1 << 20);
        assert_eq!(fs.arrays[0].prefetch_stripes, 4);
        let npy = file(&fs, "a.npy");
        let fh = fs.open(npy, false).unwrap();
        fs.read(npy, Some(fh), 0, 64).unwrap(); // header only
        assert_eq!(claimed(&fs), 0, "a header read decodes nothing");

        let ino = file(&fs, "a");
        let fh = fs.open(ino, false).unwrap();
        let row = 64 * 2;
        for r in (100..116).step_by(2) {
            fs.read(ino, Some(fh), r * row, 2 * row as u32).unwrap();
        }
        let decoded = claimed(&fs);
        assert!((4..=8).contains(&decoded), "read 4 chunks, decoded {decoded}");
        assert!(src.total.load(Ordering::SeqCst) <= 8);
    }

    /// Chunks decoded or being decoded (prefetches claim synchronously, decode later).
    fn claimed(fs: &ZarrFs) -> usize {
        let a = &fs.arrays[0];
        (0..a.layout.chunk_count())
            .filter(|&i| fs.cache.is_present_or_loading(chunk_key(0, a, &a.layout.chunk_from_linear(i))))
            .count()
    }

    #[test]
    fn prefetch_depth_fits_the_cache() {
        // 16 chunks of 4 MiB per stripe: two stripes ahead keep 2 threads busy...
        let wide = ChunkLayout::new(&[16384, 16384], &[1024, 1024], 4).unwrap();
        assert_eq!(prefetch_depth(&wide, 1 << 30, 2), 2);
        // ...if they fit: with room for two stripes, one; for less, none.
        assert_eq!(prefetch_depth(&wide, 128 << 20, 2), 1);
        assert_eq!(prefetch_depth(&wide, 127 << 20, 2), 0);
        // One chunk per stripe (1-D): several stripes ahead, bounded by the cache.
        let line = ChunkLayout::new(&[1 << 20], &[1 << 16], 4).unwrap();
        assert_eq!(prefetch_depth(&line, 1 << 30, 2), 4);
        assert_eq!(prefetch_depth(&line, 3 << 18, 2), 2);
    }

    #[test]
    fn stripe_warning_names_arrays_whose_stripe_exceeds_the_cache() {
        let (fs, _) = mount([256, 96], [16, 32], 2000);
        assert_eq!(fs.stripes_exceeding_cache(), vec![("/grp/a".to_string(), 3 * 16 * 32 * 2)]);
        let (fs, _) = mount([256, 96], [16, 32], 1 << 20);
        assert!(fs.stripes_exceeding_cache().is_empty());
    }

    /// A store that takes its time on its first call: says it started, then waits to be let go.
    struct SlowFirstStore(Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>);
    impl ChunkWriter for SlowFirstStore {
        fn store_chunks(&self, _: &[(&[u64], &[u8])]) -> Result<(), ChunkError> {
            if let Some((started, go)) = self.0.lock().unwrap().take() {
                started.send(()).unwrap();
                go.recv().unwrap();
            }
            Ok(())
        }
    }

    /// Chunks rewritten while a write-back stores them are copied (the store still reads the old
    /// contents): the copies count against the budget, and the writer making them waits for the
    /// write-back once they push written data past half of it.
    #[test]
    fn copies_of_chunks_being_stored_count_against_the_budget() {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let budget = 64 * 64 * 2 * 16; // 16 chunks of 64x64 u16
        let info = ArrayInfo {
            path: "/a".into(),
            dtype: "<u2".into(),
            itemsize: 2,
            shape: vec![64, 64 * 64],
            chunks: vec![64, 64],
            decode_chunk_shape: vec![64, 64],
            fill_value: json!(0),
            attributes: json!({}),
            codecs: json!([]),
            format: Format::Zarr { version: 3 },
            mtime: SystemTime::UNIX_EPOCH,
            xattrs: vec![],
        };
        let source = Arc::new(Synthetic {
            shape: [64, 4096],
            chunks: [64, 64],
            decodes: Mutex::default(),
            total: AtomicUsize::new(0),
        });
        let writer = Arc::new(SlowFirstStore(Mutex::new(Some((started_tx, go_rx)))));
        let array = OpenArray { info, decoder: source, writer: Some(writer) };
        let options = FsOptions { cache_bytes: budget, decode_threads: 2, uid: 0, gid: 0, writable: true };
        let fs = Arc::new(ZarrFs::new(vec![], vec![array], "root", options).unwrap());
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
        // that write waits for the write-back before it returns.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs.dirty.bytes() < 9 * chunk && std::time::Instant::now() < deadline {
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
}
