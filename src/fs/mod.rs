//! The filesystem on plain Rust types: the facade. [`ZarrFs`] owns the tree of groups and array
//! files, the decoded-chunk cache, the dirty chunks of a writable mount and the thread pools it
//! was handed; its public methods are the whole API [`crate::fuse`] (or a test) calls.
//!
//! No FUSE types appear here, and no errno: every method returns [`FsError`], which the FUSE
//! layer maps at its boundary. The work is split by concern:
//! - `tree`: inodes, lookup, readdir, getattr, xattrs, statfs;
//! - `read`: read assembly and fetching chunks (dirty, cached or decoded);
//! - `prefetch`: open handles, sequential-scan detection, stripes decoded ahead;
//! - `write`: writes, flush, size changes, the write-back thread;
//! - `dirty`: the dirty-chunk state of a writable mount.
//!
//! Invariants: the tree never changes after [`ZarrFs::new`]; an inode number is its index in the
//! node table; every file of an array is one of its [`FileView`]s, and read, write, getattr and
//! flush go through the view, never through a per-kind match.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde_json::{json, Value};

mod dirty;
mod error;
mod prefetch;
mod read;
mod tree;
mod write;

#[cfg(test)]
mod test_support;

use crate::cache::ChunkCache;
use crate::layout::ChunkLayout;
use crate::source::{ArrayInfo, ChunkDecoder, ChunkWriter, GroupInfo, OpenArray};
use dirty::DirtyChunks;
use prefetch::{prefetch_depth, Handle};
use tree::{Node, NodeKind};

pub use error::FsError;
pub use tree::{Attr, FileKind, StatFs};

pub type Ino = u64;
/// Drops kernel-cached pages of a file: (inode, offset, length).
pub type Invalidator = Box<dyn Fn(Ino, u64, u64) + Send + Sync>;
pub const ROOT_INO: Ino = 1;

/// The extended attribute of the mount root that holds [`ZarrFs::stats_json`].
pub const STATS_XATTR: &str = "user.zarrfs.stats";

/// What a user configures about a mount.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Byte budget of the decoded-chunk cache.
    pub cache_bytes: u64,
    /// Threads that decode chunks, shared by all readers and the prefetcher (the size of
    /// [`Pools::decode`]; the prefetch depth is sized from it).
    pub decode_threads: usize,
    pub uid: u32,
    pub gid: u32,
    /// Writes allowed (`-o rw`): array files are writable and written chunks are stored back.
    pub writable: bool,
}

/// The thread pools of a session, built at session setup and handed to [`ZarrFs::new`].
pub struct Pools {
    /// Decodes chunks for reads and the prefetcher.
    pub decode: rayon::ThreadPool,
    /// Stores written chunks (writable mounts only): never the decode pool. Storing a sharded
    /// array holds its shard lock across parallel work, and a decode pool thread waiting inside
    /// that work may run a queued decode of the same array, which needs the lock: a deadlock.
    pub store: Option<rayon::ThreadPool>,
}

impl Pools {
    /// `decode_threads` decode threads (at least one), and as many store threads if `writable`.
    pub fn new(decode_threads: usize, writable: bool) -> Result<Pools, String> {
        let pool = |name: &'static str| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(decode_threads.max(1))
                .thread_name(move |i| format!("zarrfs-{name}-{i}"))
                .build()
                .map_err(|e| e.to_string())
        };
        Ok(Pools { decode: pool("decode")?, store: if writable { Some(pool("store")?) } else { None } })
    }
}

/// One file showing an array: the flat file, the `.npy` view, and later others (Fortran order,
/// permuted axes). A file's bytes are `header` followed by the array's elements in the order
/// `layout` gives.
pub(crate) struct FileView {
    /// Appended to the array's name: "" for the flat file, ".npy" for the numpy view.
    pub name_suffix: &'static str,
    /// Bytes before the data (empty, or the `.npy` header); never writable to other contents.
    pub header: Vec<u8>,
    /// The element order of the data part. Today every view shares the array's C-order
    /// layout; a view in another axis order brings its own.
    pub layout: Arc<ChunkLayout>,
    /// Extended attributes this view adds to the array's (`user.npy.data_offset`).
    pub xattrs: Vec<(String, String)>,
    pub ino: Ino,
}

impl FileView {
    /// The file's size: header plus data.
    pub fn size(&self) -> u64 {
        self.header.len() as u64 + self.layout.file_size()
    }
}

/// What a view is before it has an inode: (name suffix, header, extra xattrs).
type ViewSpec = (&'static str, Vec<u8>, Vec<(String, String)>);

/// The views every array gets, in directory order. A new view is one more entry here.
fn views_of(info: &ArrayInfo) -> Vec<ViewSpec> {
    let npy_header = crate::npy::header(&info.dtype, &info.shape);
    let data_offset = vec![("user.npy.data_offset".to_string(), npy_header.len().to_string())];
    vec![("", Vec::new(), Vec::new()), (".npy", npy_header, data_offset)]
}

pub(crate) struct MountedArray {
    pub info: ArrayInfo,
    /// The chunk grid in C order: chunk keys and prefetch stripes are counted in it.
    pub layout: Arc<ChunkLayout>,
    pub decoder: Arc<dyn ChunkDecoder>,
    pub writer: Option<Arc<dyn ChunkWriter>>,
    /// File bytes spanned by one stripe, a row of chunks along the first axis.
    pub chunk_row_bytes: u64,
    /// Stripes the prefetcher keeps decoding ahead of a sequential reader (0: none).
    pub prefetch_stripes: u64,
    /// The files showing this array.
    pub views: Vec<FileView>,
}

pub struct ZarrFs {
    nodes: Vec<Node>,
    groups: Vec<GroupInfo>,
    arrays: Arc<Vec<MountedArray>>,
    cache: Arc<ChunkCache>,
    pools: Pools,
    handles: Mutex<std::collections::HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    bytes_served: AtomicU64,
    dirty: DirtyChunks,
    /// Tells the kernel to drop cached pages of a file (inode, offset, length): the other views
    /// of an array after a write through one of them.
    invalidate: std::sync::OnceLock<Invalidator>,
    options: FsOptions,
}

impl ZarrFs {
    /// Build the tree. `root_array_name` names the files of a store whose root is an array.
    pub fn new(
        groups: Vec<GroupInfo>,
        arrays: Vec<OpenArray>,
        root_array_name: &str,
        options: FsOptions,
        pools: Pools,
    ) -> Result<ZarrFs, String> {
        let root_mtime = groups.iter().find(|g| g.path == "/").map(|g| g.mtime);
        let mut fs = ZarrFs {
            nodes: tree::initial_nodes(root_mtime.unwrap_or(SystemTime::UNIX_EPOCH)),
            groups: Vec::new(),
            arrays: Arc::new(Vec::new()),
            cache: Arc::new(ChunkCache::new(options.cache_bytes)),
            pools,
            handles: Mutex::new(std::collections::HashMap::new()),
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
            let layout = Arc::new(
                ChunkLayout::new(&info.shape, &info.decode_chunk_shape, info.itemsize)
                    .map_err(|e| format!("array {}: {e}", info.path))?,
            );
            let row_elems: u64 = info.shape.iter().skip(1).product();
            let chunk_row_bytes = info.decode_chunk_shape.first().copied().unwrap_or(1) * row_elems * info.itemsize;
            let prefetch_stripes = prefetch_depth(&layout, fs.options.cache_bytes, fs.options.decode_threads);
            let array_index = fs.arrays.len();
            let parent = fs.dir_for(&parent_path, info.mtime);
            let mut views = Vec::new();
            for (view_index, (name_suffix, header, xattrs)) in views_of(&info).into_iter().enumerate() {
                let mut view = FileView { name_suffix, header, layout: layout.clone(), xattrs, ino: 0 };
                let kind = NodeKind::File { array: array_index, view: view_index };
                view.ino = fs.add_node(parent, &format!("{name}{}", view.name_suffix), kind, info.mtime)?;
                views.push(view);
            }
            Arc::get_mut(&mut fs.arrays).expect("not shared while building").push(MountedArray {
                layout,
                decoder: array.decoder,
                writer: if fs.options.writable { array.writer } else { None },
                chunk_row_bytes,
                prefetch_stripes,
                views,
                info,
            });
        }
        Ok(fs)
    }

    /// Whether writes are allowed (files may change while open).
    pub fn writable(&self) -> bool {
        self.options.writable
    }

    /// How to drop kernel-cached pages of a file, once the mount can tell the kernel.
    pub fn set_invalidator(&self, invalidate: Invalidator) {
        let _ = self.invalidate.set(invalidate);
    }

    /// The cache's counters right now.
    pub fn stats(&self) -> crate::cache::StatsSnapshot {
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

#[cfg(test)]
mod tests {
    use super::test_support::mount;

    #[test]
    fn stripe_warning_names_arrays_whose_stripe_exceeds_the_cache() {
        let (fs, _) = mount([256, 96], [16, 32], 2000);
        assert_eq!(fs.stripes_exceeding_cache(), vec![("/grp/a".to_string(), 3 * 16 * 32 * 2)]);
        let (fs, _) = mount([256, 96], [16, 32], 1 << 20);
        assert!(fs.stripes_exceeding_cache().is_empty());
    }
}
