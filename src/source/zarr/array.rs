//! One Zarr array through zarrs ([`ZarrsArray`]): decoding chunks (inner chunks of sharded
//! arrays, reading only their byte ranges through cached shard indexes), storing them back
//! (whole shards for sharded arrays), and describing the array ([`ArrayInfo`], its xattrs).
//!
//! Invariants: a decoded chunk is always the full decode-chunk shape in C order and native
//! endianness; no read pairs a cached shard index with the bytes of a newer shard (the shard
//! lock orders readers against our writes, shard sizes catch other writers on local stores).

use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use serde_json::{json, Value};
use zarrs::array::{
    Array, ArrayBytes, ArrayError, ArrayMetadata, ArrayShardedExt, ArrayShardedReadableExt,
    ArrayShardedReadableExtCache, CodecOptions,
};
use zarrs::storage::{ReadableListableStorage, ReadableListableStorageTraits, WritableStorage, WritableStorageTraits};

use crate::source::{ArrayInfo, ChunkDecoder, ChunkError, ChunkWriter, Format, OpenArray};
use crate::text::one_line;

/// What opening one array of the hierarchy gave.
pub(super) enum ArrayOutcome {
    /// Boxed: an open array is large beside a skip reason.
    Open(Box<OpenArray>),
    /// The array exists and is valid, but cannot be shown as a flat file.
    Skipped(SkipReason),
}

/// Why an array cannot be shown as a flat file. `Display` is the one-line reason.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SkipReason {
    #[error("elements have no fixed size (variable-length data type)")]
    VariableSize,
    #[error("data type {0} has no numpy equivalent")]
    NoNumpyType(String),
    #[error("only regular chunk grids can be flattened")]
    IrregularGrid,
}

/// An array whose metadata zarrs refuses: the whole store fails to open.
#[derive(Debug, thiserror::Error)]
#[error("array {path}: {reason}")]
pub struct InvalidArray {
    pub path: String,
    pub reason: String,
}

/// Open one array of the hierarchy. `Err` fails the whole store (invalid or unsupported
/// metadata); [`ArrayOutcome::Skipped`] leaves just this array out. `local` says shards are
/// cheap to stat (see [`ShardSizes`]).
pub(super) fn open_array(
    storage: &ReadableListableStorage,
    writable: Option<&WritableStorage>,
    path: &str,
    metadata: ArrayMetadata,
    mtime: SystemTime,
    local: bool,
) -> Result<ArrayOutcome, InvalidArray> {
    let invalid = |reason: String| InvalidArray { path: path.to_string(), reason };
    let (zarr_format, codecs, attributes, regular, fill_value) = match &metadata {
        ArrayMetadata::V3(m) => (
            3,
            serde_json::to_value(&m.codecs).unwrap_or(Value::Null),
            Value::Object(m.attributes.clone()),
            m.chunk_grid.name() == "regular",
            serde_json::to_value(&m.fill_value).unwrap_or(Value::Null),
        ),
        ArrayMetadata::V2(m) => (
            2,
            json!({"compressor": m.compressor, "filters": m.filters, "order": m.order}),
            Value::Object(m.attributes.clone()),
            true,
            serde_json::to_value(&m.fill_value).unwrap_or(Value::Null),
        ),
    };
    let array =
        Array::new_with_metadata(storage.clone(), path, metadata).map_err(|e| invalid(one_line(&e.to_string())))?;
    let data_type = array.data_type();
    let Some(itemsize) = data_type.fixed_size() else {
        return Ok(ArrayOutcome::Skipped(SkipReason::VariableSize));
    };
    let Some(dtype) = numpy_typestr(&data_type.name_v3().unwrap_or_default(), itemsize) else {
        return Ok(ArrayOutcome::Skipped(SkipReason::NoNumpyType(data_type.name_v3().unwrap_or_default().to_string())));
    };
    if !regular {
        return Ok(ArrayOutcome::Skipped(SkipReason::IrregularGrid));
    }
    let zeros = vec![0u64; array.dimensionality()];
    let chunks: Vec<u64> =
        array.chunk_shape(&zeros).map_err(|e| invalid(e.to_string()))?.iter().map(|c| c.get()).collect();
    let sharded = if array.is_exclusively_sharded() {
        array.effective_subchunk_shape().map(|s| s.iter().map(|c| c.get()).collect::<Vec<u64>>())
    } else {
        None
    };
    let mut info = ArrayInfo {
        path: path.to_string(),
        dtype,
        itemsize: itemsize as u64,
        shape: array.shape().to_vec(),
        decode_chunk_shape: sharded.clone().unwrap_or_else(|| chunks.clone()),
        chunks,
        fill_value,
        attributes,
        codecs,
        format: Format::Zarr { version: zarr_format },
        mtime,
        xattrs: Vec::new(),
    };
    info.xattrs = array_xattrs(&info, zarr_format);
    let shard_index_cache = sharded.as_ref().map(|_| ArrayShardedReadableExtCache::new(&array));
    // Local shards are cheap to stat: a shard replaced by another writer is noticed before its
    // cached index is used on it (remote stores would pay a request per read for this).
    let shard_sizes = match (&sharded, local) {
        (Some(inner), true) => {
            let per_shard = info.chunks.iter().zip(inner).map(|(s, i)| (s / i).max(1)).collect();
            Some(ShardSizes { per_shard, seen: Mutex::default() })
        }
        _ => None,
    };
    let zarrs_array = Arc::new(ZarrsArray {
        write: writable.map(|w| array.with_storage(w.clone())),
        array,
        shard_index_cache,
        shard_sizes,
        shard_lock: RwLock::new(()),
        options: CodecOptions::default().with_concurrent_target(1),
    });
    let writer: Option<Arc<dyn ChunkWriter>> = match zarrs_array.write {
        Some(_) => Some(zarrs_array.clone()),
        None => None,
    };
    Ok(ArrayOutcome::Open(Box::new(OpenArray { info, decoder: zarrs_array, writer })))
}

/// What `getfattr` shows on both files of a Zarr array.
fn array_xattrs(i: &ArrayInfo, zarr_format: u8) -> Vec<(String, String)> {
    vec![
        ("user.zarr.path".into(), i.path.clone()),
        ("user.zarr.shape".into(), json!(i.shape).to_string()),
        ("user.zarr.dtype".into(), i.dtype.clone()),
        ("user.zarr.chunks".into(), json!(i.chunks).to_string()),
        ("user.zarr.fill_value".into(), i.fill_value.to_string()),
        ("user.zarr.attributes".into(), i.attributes.to_string()),
        ("user.zarr.codecs".into(), i.codecs.to_string()),
        ("user.zarr.zarr_format".into(), zarr_format.to_string()),
    ]
}

/// The numpy typestr for a zarr v3 data type name, in native byte order: zarrs hands out
/// decoded elements in native order whatever the store's endianness.
fn numpy_typestr(v3_name: &str, itemsize: usize) -> Option<String> {
    let order = if cfg!(target_endian = "little") { '<' } else { '>' };
    let kind = match v3_name {
        "bool" => return Some("|b1".into()),
        "int8" => return Some("|i1".into()),
        "uint8" => return Some("|u1".into()),
        "int16" | "int32" | "int64" => 'i',
        "uint16" | "uint32" | "uint64" => 'u',
        "float16" | "float32" | "float64" => 'f',
        "complex64" | "complex128" => 'c',
        _ if v3_name.starts_with('r') && v3_name[1..].parse::<usize>().is_ok() => return Some(format!("|V{itemsize}")),
        _ => return None,
    };
    Some(format!("{order}{kind}{itemsize}"))
}

/// One array as zarrs sees it, serving both directions.
struct ZarrsArray {
    array: Array<dyn ReadableListableStorageTraits>,
    /// The same array over writable storage, on a writable mount.
    write: Option<Array<dyn WritableStorageTraits>>,
    /// Present for sharded arrays: we decode inner chunks, reading only their byte ranges.
    shard_index_cache: Option<ArrayShardedReadableExtCache>,
    /// Readers of inner chunks hold it shared; storing a shard holds it exclusively, so no read
    /// pairs a cached shard index with the bytes of a newer shard.
    shard_lock: RwLock<()>,
    /// Local sharded arrays: the size each shard had when its index was last used.
    shard_sizes: Option<ShardSizes>,
    options: CodecOptions,
}

struct ShardSizes {
    /// Inner chunks per shard along each axis.
    per_shard: Vec<u64>,
    seen: Mutex<std::collections::HashMap<Vec<u64>, Option<u64>>>,
}

/// Shard indexes cached per array before the cache is emptied: it is unbounded in zarrs and
/// each entry holds a whole shard index.
const MAX_CACHED_SHARD_INDEXES: usize = 256;

impl ZarrsArray {
    /// If the shard holding inner chunk `chunk` changed size since its index was last used
    /// (another writer replaced it), drop the cached indexes: the old offsets would read bytes
    /// of neither version from the new shard.
    fn forget_index_of_changed_shard(&self, sizes: &ShardSizes, cache: &ArrayShardedReadableExtCache, chunk: &[u64]) {
        let shard: Vec<u64> = chunk.iter().zip(&sizes.per_shard).map(|(c, n)| c / n).collect();
        let size = self.array.storage().size_key(&self.array.chunk_key(&shard)).ok().flatten();
        let mut seen = sizes.seen.lock();
        if seen.len() > MAX_CACHED_SHARD_INDEXES {
            seen.clear();
            cache.clear();
        }
        if let Some(before) = seen.insert(shard, size) {
            if before != size {
                cache.clear();
            }
        }
    }

    fn key(&self, chunk: &[u64]) -> String {
        match &self.shard_index_cache {
            None => self.array.chunk_key(chunk).to_string(),
            Some(_) => format!("inner chunk {chunk:?} of array {}", self.array.path()),
        }
    }

    /// A failed read: storage failures are `Fetch`, everything else (codecs, shapes) `Decode`.
    fn read_error(&self, chunk: &[u64], e: ArrayError) -> ChunkError {
        let (key, reason) = (self.key(chunk), one_line(&e.to_string()));
        match e {
            ArrayError::StorageError(_) => ChunkError::Fetch { key, reason },
            _ => ChunkError::Decode { key, reason },
        }
    }

    fn store_error(&self, chunk: &[u64], reason: impl ToString) -> ChunkError {
        ChunkError::Store { key: self.key(chunk), reason: one_line(&reason.to_string()) }
    }

    /// Store whole shards: read each touched shard, lay the new inner chunks over it, encode.
    fn store_inner_chunks(
        &self,
        write: &Array<dyn WritableStorageTraits>,
        cache: &ArrayShardedReadableExtCache,
        chunks: &[(&[u64], &[u8])],
    ) -> Result<(), ChunkError> {
        let zeros = vec![0u64; self.array.dimensionality()];
        let shard_shape: Vec<u64> =
            self.array.chunk_shape(&zeros).map_err(|e| self.store_error(&zeros, e))?.iter().map(|c| c.get()).collect();
        let inner_shape: Vec<u64> = self
            .array
            .effective_subchunk_shape()
            .map(|s| s.iter().map(|c| c.get()).collect())
            .ok_or_else(|| self.store_error(&zeros, "sharded array without a regular inner chunk shape"))?;
        let itemsize = self.array.data_type().fixed_size().unwrap_or(1) as u64;
        // Shard grid index -> (offset of the inner chunk within the shard, its bytes).
        type ByShard<'a> = std::collections::BTreeMap<Vec<u64>, Vec<(Vec<u64>, &'a [u8])>>;
        let mut by_shard: ByShard = Default::default();
        for (inner, bytes) in chunks {
            let origin: Vec<u64> = inner.iter().zip(&inner_shape).map(|(i, s)| i * s).collect();
            let shard: Vec<u64> = origin.iter().zip(&shard_shape).map(|(o, s)| o / s).collect();
            let within: Vec<u64> = origin.iter().zip(&shard).zip(&shard_shape).map(|((o, i), s)| o - i * s).collect();
            by_shard.entry(shard).or_default().push((within, bytes));
        }
        let _exclusive = self.shard_lock.write();
        let result = by_shard.par_iter().try_for_each(|(shard, inners)| {
            let current: ArrayBytes<'static> =
                self.array.retrieve_chunk_opt(shard, &self.options).map_err(|e| self.read_error(shard, e))?;
            let mut bytes = current.into_fixed().map_err(|e| self.read_error(shard, e.into()))?.into_owned();
            for (within, inner) in inners {
                copy_block(&mut bytes, &shard_shape, within, inner, &inner_shape, itemsize);
            }
            write
                .store_chunk_opt(shard, ArrayBytes::new_flen(&bytes[..]), &self.options)
                .map_err(|e| self.store_error(shard, e))
        });
        cache.clear();
        result
    }
}

impl ChunkDecoder for ZarrsArray {
    fn decode(&self, chunk: &[u64]) -> Result<Vec<u8>, ChunkError> {
        let bytes: Result<ArrayBytes<'static>, _> = match &self.shard_index_cache {
            None => self.array.retrieve_chunk_opt(chunk, &self.options),
            Some(cache) => {
                let _shared = self.shard_lock.read();
                if cache.len() > MAX_CACHED_SHARD_INDEXES {
                    cache.clear();
                }
                if let Some(sizes) = &self.shard_sizes {
                    self.forget_index_of_changed_shard(sizes, cache, chunk);
                }
                self.array.retrieve_subchunk_opt(cache, chunk, &self.options)
            }
        };
        let bytes = bytes.map_err(|e| self.read_error(chunk, e))?;
        let fixed = bytes.into_fixed().map_err(|e| self.read_error(chunk, e.into()))?;
        Ok(fixed.into_owned())
    }
}

impl ChunkWriter for ZarrsArray {
    fn store_chunks(&self, chunks: &[(&[u64], &[u8])]) -> Result<(), ChunkError> {
        let Some(write) = &self.write else {
            return Err(ChunkError::Store { key: self.array.path().to_string(), reason: "store is read-only".into() });
        };
        match &self.shard_index_cache {
            Some(cache) => self.store_inner_chunks(write, cache, chunks),
            None => chunks.par_iter().try_for_each(|(chunk, bytes)| {
                write
                    .store_chunk_opt(chunk, ArrayBytes::new_flen(*bytes), &self.options)
                    .map_err(|e| self.store_error(chunk, e))
            }),
        }
    }
}

/// Copy a C-order block `src` of shape `src_shape` into the C-order buffer `dst` of shape
/// `dst_shape` at element offset `origin`, clipping what falls outside `dst`.
fn copy_block(dst: &mut [u8], dst_shape: &[u64], origin: &[u64], src: &[u8], src_shape: &[u64], itemsize: u64) {
    let n = dst_shape.len();
    if n == 0 {
        dst[..itemsize as usize].copy_from_slice(&src[..itemsize as usize]);
        return;
    }
    let extent: Vec<u64> = (0..n).map(|d| src_shape[d].min(dst_shape[d].saturating_sub(origin[d]))).collect();
    if extent.contains(&0) {
        return;
    }
    let row = (extent[n - 1] * itemsize) as usize;
    let rows: u64 = extent[..n - 1].iter().product();
    let mut index = vec![0u64; n - 1];
    for _ in 0..rows {
        let (mut s_off, mut d_off) = (0u64, 0u64);
        for d in 0..n {
            let i = if d < n - 1 { index[d] } else { 0 };
            s_off = s_off * src_shape[d] + i;
            d_off = d_off * dst_shape[d] + origin[d] + i;
        }
        let (s, dd) = ((s_off * itemsize) as usize, (d_off * itemsize) as usize);
        dst[dd..dd + row].copy_from_slice(&src[s..s + row]);
        for d in (0..n - 1).rev() {
            index[d] += 1;
            if index[d] < extent[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{copy_block, numpy_typestr};

    #[test]
    fn copy_block_places_and_clips() {
        // 4x5 destination of u8, a 2x3 block at (1, 3): the last column falls outside.
        let mut dst = vec![0u8; 20];
        let src = [1, 2, 3, 4, 5, 6];
        copy_block(&mut dst, &[4, 5], &[1, 3], &src, &[2, 3], 1);
        let expect = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 4, 5, 0, 0, 0, 0, 0];
        assert_eq!(dst, expect);
        // Two-byte items, 1-D.
        let mut dst = vec![0u8; 8];
        copy_block(&mut dst, &[4], &[1], &[9, 9, 8, 8], &[2], 2);
        assert_eq!(dst, [0, 0, 9, 9, 8, 8, 0, 0]);
    }

    #[test]
    fn typestrs_are_native_order() {
        let o = if cfg!(target_endian = "little") { "<" } else { ">" };
        assert_eq!(numpy_typestr("float32", 4).unwrap(), format!("{o}f4"));
        assert_eq!(numpy_typestr("complex64", 8).unwrap(), format!("{o}c8"));
        assert_eq!(numpy_typestr("uint64", 8).unwrap(), format!("{o}u8"));
        assert_eq!(numpy_typestr("bool", 1).unwrap(), "|b1");
        assert_eq!(numpy_typestr("r24", 3).unwrap(), "|V3");
        assert_eq!(numpy_typestr("string", 0), None);
    }
}
