//! Zarr v2 and v3 through zarrs: open a store, walk its hierarchy, decode and store chunks.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rayon::prelude::*;
use serde_json::{json, Value};
use std::sync::RwLock;
use zarrs::array::{
    Array, ArrayBytes, ArrayMetadata, ArrayShardedExt, ArrayShardedReadableExt, ArrayShardedReadableExtCache,
};
use zarrs::array::{ArrayError, CodecOptions};
use zarrs::filesystem::FilesystemStore;
use zarrs::node::{Node, NodeMetadata};
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator, InvalidByteRangeError};
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, ReadableListableStorage, ReadableListableStorageTraits,
    ReadableStorageTraits, StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorage,
    WritableStorageTraits,
};

use super::{
    ArrayInfo, ChunkDecoder, ChunkError, ChunkWriter, Format, GroupInfo, OpenArray, OpenError, Skipped, Store,
};

impl Store {
    /// Open a local Zarr v2 or v3 store and walk its whole hierarchy. Fails on anything that makes
    /// the store unreadable as a whole (missing, not Zarr, invalid or unsupported metadata);
    /// arrays whose elements have no fixed size are skipped instead.
    pub fn open(location: &Path) -> Result<Store, OpenError> {
        Store::open_local(location, false)
    }

    /// Open a local store; `writable` also prepares every array for storing chunks back.
    pub fn open_local(location: &Path, writable: bool) -> Result<Store, OpenError> {
        let err = |reason: String| OpenError { store: location.to_path_buf(), reason };
        let meta = std::fs::metadata(location).map_err(|e| err(io_reason(&e)))?;
        if !meta.is_dir() {
            return Err(err("not a directory (a Zarr store is a directory)".into()));
        }
        let inner = FilesystemStore::new(location).map_err(|e| err(e.to_string()))?;
        let dir = Arc::new(LocalDir { inner });
        let write: Option<WritableStorage> = if writable { Some(dir.clone()) } else { None };
        Store::open_storage(dir, write, location, Timestamps::Local(location))
    }

    /// Open the hierarchy held by `storage`; `location` names it in messages, `times` says where
    /// the nodes' modification times come from.
    pub fn open_storage(
        storage: ReadableListableStorage,
        writable: Option<WritableStorage>,
        location: &Path,
        times: Timestamps,
    ) -> Result<Store, OpenError> {
        let err = |reason: String| OpenError { store: location.to_path_buf(), reason };
        let root = Node::open(&storage, "/").map_err(|e| match e {
            zarrs::node::NodeCreateError::MissingMetadata(_) => {
                err("not a Zarr store (no zarr.json, .zgroup or .zarray at its root)".into())
            }
            e => err(one_line(&e.to_string())),
        })?;
        let listing = storage.clone();
        let mut store = Store {
            location: location.to_path_buf(),
            format: Format::Zarr { version: node_zarr_format(root.metadata()) },
            groups: Vec::new(),
            arrays: Vec::new(),
            skipped: Vec::new(),
            stored_bytes: Box::new(move |node_path| {
                let prefix = match node_path.trim_matches('/') {
                    "" => StorePrefix::root(),
                    path => StorePrefix::new(format!("{path}/")).ok()?,
                };
                listing.size_prefix(&prefix).ok()
            }),
        };
        store.walk(&storage, writable.as_ref(), &times, &root).map_err(err)?;
        Ok(store)
    }

    fn walk(
        &mut self,
        storage: &ReadableListableStorage,
        writable: Option<&WritableStorage>,
        times: &Timestamps,
        node: &Node,
    ) -> Result<(), String> {
        let mtime = |path: &str| match times {
            Timestamps::Local(root) => metadata_mtime(root, path),
            Timestamps::Fixed(time) => *time,
        };
        let path = node.path().as_str().to_string();
        match node.metadata() {
            NodeMetadata::Group(group) => {
                let attributes = match group {
                    zarrs::metadata::GroupMetadata::V3(g) => Value::Object(g.attributes.clone()),
                    zarrs::metadata::GroupMetadata::V2(g) => Value::Object(g.attributes.clone()),
                };
                self.groups.push(GroupInfo {
                    mtime: mtime(&path),
                    path,
                    xattrs: vec![("user.zarr.attributes".into(), attributes.to_string())],
                    attributes,
                });
                let mut children: Vec<&Node> = node.children().iter().collect();
                children.sort_by(|a, b| a.path().as_str().cmp(b.path().as_str()));
                for child in children {
                    self.walk(storage, writable, times, child)?;
                }
            }
            NodeMetadata::Array(metadata) => {
                let local = matches!(times, Timestamps::Local(_));
                match open_array(storage, writable, &path, metadata.clone(), mtime(&path), local)? {
                    Ok(array) => self.arrays.push(array),
                    Err(reason) => {
                        log::warn!("{}: skipping array {path}: {reason}", self.location.display());
                        self.skipped.push(Skipped { path, reason });
                    }
                }
            }
        }
        Ok(())
    }
}

fn node_zarr_format(metadata: &NodeMetadata) -> u8 {
    match metadata {
        NodeMetadata::Array(ArrayMetadata::V2(_)) => 2,
        NodeMetadata::Group(zarrs::metadata::GroupMetadata::V2(_)) => 2,
        _ => 3,
    }
}

/// An I/O error in the words a one-line message uses.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// zarrs errors can span lines (serde's context); the user gets one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where the modification times of a store's files and directories come from.
pub enum Timestamps<'a> {
    /// A local store: each node's metadata documents.
    Local(&'a Path),
    /// The same time for every node (a remote store: its root metadata's last modification).
    Fixed(SystemTime),
}

/// The newest modification time among the metadata documents of a node.
fn metadata_mtime(location: &Path, node_path: &str) -> SystemTime {
    let dir = location.join(node_path.trim_start_matches('/'));
    ["zarr.json", ".zarray", ".zgroup", ".zattrs"]
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Outer `Err` fails the whole store (invalid/unsupported metadata); inner `Err` skips the array.
fn open_array(
    storage: &ReadableListableStorage,
    writable: Option<&WritableStorage>,
    path: &str,
    metadata: ArrayMetadata,
    mtime: SystemTime,
    local: bool,
) -> Result<Result<OpenArray, String>, String> {
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
    let array = Array::new_with_metadata(storage.clone(), path, metadata)
        .map_err(|e| format!("array {path}: {}", one_line(&e.to_string())))?;
    let data_type = array.data_type();
    let Some(itemsize) = data_type.fixed_size() else {
        return Ok(Err("elements have no fixed size (variable-length data type)".into()));
    };
    let Some(dtype) = numpy_typestr(&data_type.name_v3().unwrap_or_default(), itemsize) else {
        return Ok(Err(format!("data type {} has no numpy equivalent", data_type.name_v3().unwrap_or_default())));
    };
    if !regular {
        return Ok(Err("only regular chunk grids can be flattened".into()));
    }
    let zeros = vec![0u64; array.dimensionality()];
    let chunks: Vec<u64> =
        array.chunk_shape(&zeros).map_err(|e| format!("array {path}: {e}"))?.iter().map(|c| c.get()).collect();
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
    Ok(Ok(OpenArray { info, decoder: zarrs_array, writer }))
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

/// What `zarrfs create` makes: a new, empty array.
#[derive(Debug, Clone)]
pub struct NewArray {
    pub shape: Vec<u64>,
    pub chunks: Vec<u64>,
    /// numpy-style: `f4`, `<f4`, `float32`, `u1`, `bool`, `c8`, ...
    pub dtype: String,
    /// `zstd[:LEVEL]`, `blosc[:LEVEL]`, `gzip[:LEVEL]`, `none`.
    pub codec: String,
    /// The fill value as typed: `0`, `-1.5`, `nan`, `inf`, `true`.
    pub fill: String,
    pub zarr_format: u8,
}

/// Create an empty array at `array_path` ("/" for a root array) of the local store `store`,
/// and the groups on the way that do not exist yet. The metadata is built as a document and
/// checked by zarrs (which also writes it), so anything zarrs would refuse to open is refused.
pub fn create_array(store: &Path, array_path: &str, spec: &NewArray) -> Result<(), String> {
    let inner = FilesystemStore::new(store).map_err(|e| e.to_string())?;
    let storage: Arc<LocalDir> = Arc::new(LocalDir { inner });
    let array_path = if array_path.starts_with('/') { array_path.to_string() } else { format!("/{array_path}") };
    if spec.shape.len() != spec.chunks.len() {
        return Err(format!("--shape has {} dimensions but --chunks has {}", spec.shape.len(), spec.chunks.len()));
    }
    if spec.chunks.contains(&0) {
        return Err("chunk sizes must be at least 1".into());
    }
    let (v3_name, v2_typestr, itemsize) = parse_dtype(&spec.dtype)?;
    if Node::open(&storage, &array_path).is_ok() {
        return Err(format!("{array_path} already exists"));
    }
    let (codec, level) = match spec.codec.split_once(':') {
        Some((c, l)) => (c, Some(l.parse::<i64>().map_err(|_| format!("codec level {l:?} is not a number"))?)),
        None => (spec.codec.as_str(), None),
    };
    let fill = parse_fill(&spec.fill, v3_name)?;
    let metadata: Value = if spec.zarr_format == 2 {
        let compressor = match codec {
            "zstd" => json!({"id": "zstd", "level": level.unwrap_or(3)}),
            "blosc" => {
                json!({"id": "blosc", "cname": "lz4", "clevel": level.unwrap_or(5), "shuffle": 1, "blocksize": 0})
            }
            "gzip" => json!({"id": "gzip", "level": level.unwrap_or(5)}),
            "none" => Value::Null,
            other => return Err(format!("unknown codec {other:?} (zstd, blosc, gzip or none)")),
        };
        json!({"zarr_format": 2, "shape": spec.shape, "chunks": spec.chunks, "dtype": v2_typestr,
               "compressor": compressor, "fill_value": fill, "order": "C", "filters": null,
               "dimension_separator": "."})
    } else if spec.zarr_format == 3 {
        let endian = if itemsize > 1 { json!({"endian": "little"}) } else { json!({}) };
        let mut codecs = vec![json!({"name": "bytes", "configuration": endian})];
        match codec {
            "zstd" => {
                codecs.push(json!({"name": "zstd", "configuration": {"level": level.unwrap_or(3), "checksum": false}}))
            }
            "blosc" => codecs
                .push(json!({"name": "blosc", "configuration": {"cname": "lz4", "clevel": level.unwrap_or(5),
                                          "shuffle": "shuffle", "typesize": itemsize, "blocksize": 0}})),
            "gzip" => codecs.push(json!({"name": "gzip", "configuration": {"level": level.unwrap_or(5)}})),
            "none" => {}
            other => return Err(format!("unknown codec {other:?} (zstd, blosc, gzip or none)")),
        }
        json!({"zarr_format": 3, "node_type": "array", "shape": spec.shape, "data_type": v3_name,
               "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": spec.chunks}},
               "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
               "fill_value": fill, "codecs": codecs, "attributes": {}})
    } else {
        return Err(format!("--zarr-format must be 2 or 3, not {}", spec.zarr_format));
    };
    let metadata: ArrayMetadata = if spec.zarr_format == 2 {
        ArrayMetadata::V2(serde_json::from_value(metadata).map_err(|e| e.to_string())?)
    } else {
        ArrayMetadata::V3(serde_json::from_value(metadata).map_err(|e| e.to_string())?)
    };
    // Groups on the way, root first.
    let parts: Vec<&str> = array_path.split('/').filter(|p| !p.is_empty()).collect();
    for depth in 0..parts.len() {
        let group_path = format!("/{}", parts[..depth].join("/"));
        match Node::open(&storage, &group_path).map(|n| n.metadata().clone()) {
            Ok(NodeMetadata::Group(g)) => {
                let format = if matches!(g, zarrs::metadata::GroupMetadata::V2(_)) { 2 } else { 3 };
                if format != spec.zarr_format {
                    return Err(format!("{group_path} is a Zarr v{format} group; use --zarr-format {format}"));
                }
            }
            Ok(NodeMetadata::Array(_)) => return Err(format!("{group_path} is an array, not a group")),
            Err(_) => {
                let group = if spec.zarr_format == 2 {
                    zarrs::metadata::GroupMetadata::V2(
                        serde_json::from_value(json!({"zarr_format": 2})).map_err(|e| e.to_string())?,
                    )
                } else {
                    zarrs::metadata::GroupMetadata::V3(
                        serde_json::from_value(json!({"zarr_format": 3, "node_type": "group", "attributes": {}}))
                            .map_err(|e| e.to_string())?,
                    )
                };
                zarrs::group::Group::new_with_metadata(storage.clone(), &group_path, group)
                    .and_then(|g| g.store_metadata().map_err(Into::into))
                    .map_err(|e| format!("group {group_path}: {}", one_line(&e.to_string())))?;
            }
        }
    }
    let array = Array::new_with_metadata(storage, &array_path, metadata).map_err(|e| one_line(&e.to_string()))?;
    array.store_metadata().map_err(|e| one_line(&e.to_string()))
}

/// (zarr v3 data type name, zarr v2 typestr, item size) for a numpy-style dtype.
fn parse_dtype(text: &str) -> Result<(&'static str, String, usize), String> {
    let t = text.trim_start_matches(['<', '|', '=']);
    let (name, size) = match t {
        "b1" | "bool" | "?" => ("bool", 1),
        "i1" | "int8" => ("int8", 1),
        "u1" | "uint8" => ("uint8", 1),
        "i2" | "int16" => ("int16", 2),
        "u2" | "uint16" => ("uint16", 2),
        "i4" | "int32" => ("int32", 4),
        "u4" | "uint32" => ("uint32", 4),
        "i8" | "int64" => ("int64", 8),
        "u8" | "uint64" => ("uint64", 8),
        "f2" | "float16" => ("float16", 2),
        "f4" | "float32" => ("float32", 4),
        "f8" | "float64" => ("float64", 8),
        "c8" | "complex64" => ("complex64", 8),
        "c16" | "complex128" => ("complex128", 16),
        _ => return Err(format!("unsupported dtype {text:?} (e.g. u1 i2 i4 i8 f2 f4 f8 c8 c16 bool)")),
    };
    let kind = match name {
        "bool" => "|b1".to_string(),
        "int8" => "|i1".into(),
        "uint8" => "|u1".into(),
        n if n.starts_with("uint") => format!("<u{size}"),
        n if n.starts_with("int") => format!("<i{size}"),
        n if n.starts_with("float") => format!("<f{size}"),
        _ => format!("<c{size}"),
    };
    Ok((name, kind, size))
}

/// A fill value as JSON metadata, from what a user types.
fn parse_fill(text: &str, v3_name: &str) -> Result<Value, String> {
    let bad = || format!("fill value {text:?} does not fit data type {v3_name}");
    let lower = text.trim().to_ascii_lowercase();
    Ok(match v3_name {
        "bool" => match lower.as_str() {
            "0" | "false" => json!(false),
            "1" | "true" => json!(true),
            _ => return Err(bad()),
        },
        n if n.starts_with("float") || n.starts_with("complex") => {
            let f = match lower.as_str() {
                "nan" => return Ok(if n.starts_with("complex") { json!(["NaN", 0.0]) } else { json!("NaN") }),
                "inf" | "infinity" => return Ok(json!("Infinity")),
                "-inf" | "-infinity" => return Ok(json!("-Infinity")),
                _ => lower.parse::<f64>().map_err(|_| bad())?,
            };
            if n.starts_with("complex") {
                json!([f, 0.0])
            } else {
                json!(f)
            }
        }
        n if n.starts_with("uint") => json!(lower.parse::<u64>().map_err(|_| bad())?),
        _ => json!(lower.parse::<i64>().map_err(|_| bad())?),
    })
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
        let mut seen = sizes.seen.lock().unwrap();
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
        let mut by_shard: std::collections::BTreeMap<Vec<u64>, Vec<(Vec<u64>, &[u8])>> = Default::default();
        for (inner, bytes) in chunks {
            let origin: Vec<u64> = inner.iter().zip(&inner_shape).map(|(i, s)| i * s).collect();
            let shard: Vec<u64> = origin.iter().zip(&shard_shape).map(|(o, s)| o / s).collect();
            let within: Vec<u64> = origin.iter().zip(&shard).zip(&shard_shape).map(|((o, i), s)| o - i * s).collect();
            by_shard.entry(shard).or_default().push((within, bytes));
        }
        let _exclusive = self.shard_lock.write().unwrap();
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
                let _shared = self.shard_lock.read().unwrap();
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

/// A store directory. zarrs' `FilesystemStore` keeps a lock entry for every key it has touched,
/// for the life of the store (a daemon reading millions of chunks would grow without bound),
/// and writes files in place (a crash could leave a torn chunk). Here reads go straight to
/// `pread`, and every write replaces its file atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory. Listing is delegated.
struct LocalDir {
    inner: FilesystemStore,
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

impl ListableStorageTraits for LocalDir {
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
    use super::{copy_block, numpy_typestr, read_buffer_capacity, temp_name, temp_writer};

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
