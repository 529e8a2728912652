//! Unit-test fixtures: a synthetic array whose decoder counts its decodes, mounted in a
//! [`ZarrFs`] without any store.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde_json::json;

use super::{FsError, FsOptions, Ino, Pools, ZarrFs, ROOT_INO};
use crate::source::{ArrayInfo, ChunkDecoder, ChunkError, ChunkWriter, Format, OpenArray};

/// A 2-D uint16 array whose element (r, c) is `r * cols + c` (mod 2^16), served by a decoder
/// that counts its decodes per chunk.
pub struct Synthetic {
    pub shape: [u64; 2],
    pub chunks: [u64; 2],
    pub decodes: Mutex<HashMap<Vec<u64>, usize>>,
    pub total: AtomicUsize,
}

impl Synthetic {
    pub fn new(shape: [u64; 2], chunks: [u64; 2]) -> Self {
        Synthetic { shape, chunks, decodes: Mutex::default(), total: AtomicUsize::new(0) }
    }
    pub fn value(&self, r: u64, c: u64) -> u16 {
        (r * self.shape[1] + c) as u16
    }
    pub fn expected(&self) -> Vec<u8> {
        (0..self.shape[0]).flat_map(|r| (0..self.shape[1]).flat_map(move |c| self.value(r, c).to_ne_bytes())).collect()
    }
}

impl ChunkDecoder for Synthetic {
    fn decode(&self, chunk: &[u64]) -> Result<Vec<u8>, ChunkError> {
        *self.decodes.lock().entry(chunk.to_vec()).or_default() += 1;
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

/// The description of a 2-D `<u2` array at `path`.
pub fn array_info(path: &str, shape: [u64; 2], chunks: [u64; 2]) -> ArrayInfo {
    ArrayInfo {
        path: path.into(),
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
    }
}

/// A read-only mount of one synthetic array at `/grp/a`.
pub fn mount(shape: [u64; 2], chunks: [u64; 2], cache_bytes: u64) -> (ZarrFs, Arc<Synthetic>) {
    let source = Arc::new(Synthetic::new(shape, chunks));
    let info = array_info("/grp/a", shape, chunks);
    let array = OpenArray { info, decoder: source.clone(), writer: Some(Arc::new(NoWrites)) };
    let options = FsOptions { cache_bytes, decode_threads: 2, uid: 0, gid: 0, writable: false };
    let pools = Pools::new(options.decode_threads, options.writable).unwrap();
    (ZarrFs::new(vec![], vec![array], "root", options, pools).unwrap(), source)
}

impl ZarrFs {
    pub fn read(&self, ino: Ino, fh: Option<u64>, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        self.read_with(ino, fh, offset, size, |b| b.to_vec())
    }
}

/// The inode of `/grp/NAME`.
pub fn file(fs: &ZarrFs, name: &str) -> Ino {
    let grp = fs.lookup(ROOT_INO, OsStr::new("grp")).unwrap().ino;
    fs.lookup(grp, OsStr::new(name)).unwrap().ino
}
