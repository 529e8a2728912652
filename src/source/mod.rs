//! What reads a format: the arrays of an opened store, described as plain types ([`ArrayInfo`],
//! [`GroupInfo`]) with a [`ChunkDecoder`] per array that turns grid indices into decoded chunk
//! bytes (and a [`ChunkWriter`] on writable stores). Everything above this module sees only
//! these, which keeps the filesystem testable with in-memory decoders and leaves room for
//! other formats beside [`zarr`].
//!
//! [`open`] is the one entry point: it has [`crate::storage`] build the storage for a location
//! (local directory or URL) and hands it to the format's reader.

pub mod zarr;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::Value;

use crate::storage::remote::RemoteSettings;
use crate::storage::StorageConfig;

/// Why a chunk could not be produced or stored. Shown in the log; the reader gets `EIO`.
/// `Display` is the one-line message (`chunk KEY: REASON`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    /// Its bytes could not be read from storage.
    #[error("chunk {key}: {reason}")]
    Fetch { key: String, reason: String },
    /// Its bytes were read but do not decode to a chunk of the array.
    #[error("chunk {key}: {reason}")]
    Decode { key: String, reason: String },
    /// Written chunks could not be encoded or stored.
    #[error("chunk {key}: {reason}")]
    Store { key: String, reason: String },
}

/// Produces decoded chunks of one array: C order, native endian, always at the full chunk shape
/// (edge chunks padded), missing chunks filled with the fill value.
pub trait ChunkDecoder: Send + Sync {
    fn decode(&self, chunk: &[u64]) -> Result<Vec<u8>, ChunkError>;
}

/// Stores chunks of one array: encodes full-shape decoded chunks (the same form
/// [`ChunkDecoder::decode`] produces) with the array's codecs and replaces them in the store,
/// each chunk or shard atomically. A chunk that is entirely the fill value is deleted.
pub trait ChunkWriter: Send + Sync {
    fn store_chunks(&self, chunks: &[(&[u64], &[u8])]) -> Result<(), ChunkError>;
}

/// What the filesystem needs to know about an array, independent of how it is stored.
#[derive(Debug, Clone)]
pub struct ArrayInfo {
    /// Hierarchy path, "/" for a root array, "/grp/temp" otherwise.
    pub path: String,
    /// numpy typestr of the flat file's elements (native byte order), e.g. "<f4".
    pub dtype: String,
    pub itemsize: u64,
    pub shape: Vec<u64>,
    /// The chunk shape written in the metadata (the shard shape for sharded arrays).
    pub chunks: Vec<u64>,
    /// The unit zarrs decodes and we cache: the inner chunk of a sharded array, else the chunk.
    pub decode_chunk_shape: Vec<u64>,
    pub fill_value: Value,
    pub attributes: Value,
    pub codecs: Value,
    pub format: Format,
    /// Modification time of the array's metadata document.
    pub mtime: SystemTime,
    /// Extended attributes the source gives both files of the array, in its own names
    /// (`user.zarr.shape`, ...): the filesystem serves them as they are.
    pub xattrs: Vec<(String, String)>,
}

/// The format a store or array is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Zarr { version: u8 },
}

impl Format {
    /// The Zarr format version, for Zarr stores.
    pub fn zarr_version(&self) -> Option<u8> {
        match self {
            Format::Zarr { version } => Some(*version),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Format::Zarr { version } => write!(f, "Zarr v{version}"),
        }
    }
}

/// A group of the hierarchy.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    pub path: String,
    pub attributes: Value,
    pub mtime: SystemTime,
    /// Extended attributes of the group's directory, in the source's own names.
    pub xattrs: Vec<(String, String)>,
}

/// An array that cannot be shown as a flat file, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// An opened array: its description, the decoder that serves its chunks, and on a writable
/// store the writer that stores them back.
#[derive(Clone)]
pub struct OpenArray {
    pub info: ArrayInfo,
    pub decoder: Arc<dyn ChunkDecoder>,
    pub writer: Option<Arc<dyn ChunkWriter>>,
}

/// An opened store: every group and every array that can be mounted.
pub struct Store {
    pub location: PathBuf,
    /// The format of the root node.
    pub format: Format,
    pub groups: Vec<GroupInfo>,
    pub arrays: Vec<OpenArray>,
    pub skipped: Vec<Skipped>,
    /// Bytes stored under a node path (its chunks and metadata), where the store can be listed.
    pub stored_bytes: StoredBytes,
}

/// Bytes stored under a node path, where the store can be listed (see [`Store::stored_bytes`]).
pub type StoredBytes = Box<dyn Fn(&str) -> Option<u64> + Send + Sync>;

impl Store {
    /// Bytes stored under a node (its chunks and metadata), where the store can be listed.
    pub fn stored_bytes(&self, node_path: &str) -> Option<u64> {
        (self.stored_bytes)(node_path)
    }
}

/// Why a store could not be opened. Always names the store.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", store.display())]
pub struct OpenError {
    pub store: PathBuf,
    pub reason: String,
}

/// How to open a store.
#[derive(Debug, Clone, Default)]
pub struct OpenConfig {
    /// Prepare every array for storing chunks back (local stores and S3).
    pub writable: bool,
    /// Remote stores: timeouts, retries, disk cache.
    pub remote: RemoteSettings,
}

/// Open the store at `location` (a local directory or an `s3://`/`http(s)://` URL) and walk its
/// whole hierarchy. Fails on anything that makes the store unreadable as a whole; arrays that
/// cannot be shown are in [`Store::skipped`].
pub fn open(location: &Path, config: &OpenConfig) -> Result<Store, OpenError> {
    let storage_config = StorageConfig { writable: config.writable, remote: &config.remote, roles: zarr::KEY_ROLES };
    let storage = crate::storage::open(location, &storage_config)
        .map_err(|e| OpenError { store: crate::storage::display_name(location), reason: e.to_string() })?;
    zarr::open(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_http_is_refused_before_any_request() {
        // Port 9 (discard) on loopback: nothing is asked of it.
        let config = OpenConfig { writable: true, ..Default::default() };
        let e = open(Path::new("http://127.0.0.1:9/x.zarr/"), &config).err().unwrap();
        assert_eq!(e.to_string(), format!("http://127.0.0.1:9/x.zarr: {}", crate::storage::remote::HTTP_READ_ONLY));
    }

    #[test]
    fn local_errors_name_the_store() {
        let e = open(Path::new("/nonexistent/x.zarr"), &OpenConfig::default()).err().unwrap();
        assert_eq!(e.to_string(), "/nonexistent/x.zarr: no such file or directory");
        let dir = tempfile::tempdir().unwrap();
        let e = open(dir.path(), &OpenConfig::default()).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!("{}: not a Zarr store (no zarr.json, .zgroup or .zarray at its root)", dir.path().display())
        );
    }
}
