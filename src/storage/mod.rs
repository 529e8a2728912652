//! Where bytes come from: local directories ([`local`]), object stores ([`remote`]), the disk
//! cache in front of them ([`disk_cache`]). [`open`] builds the stack for a location and hands
//! back zarrs storage handles.
//!
//! Invariant: storage knows nothing about formats. What a format knows about its keys (which
//! can change in place, which stand for the store's time) comes in as [`KeyRoles`].

/// `ListableStorageTraits` for a storage that lists through its field `$inner`: the local
/// directory and the disk cache (and test doubles) list what they wrap.
macro_rules! list_through {
    ($type:ty, $inner:ident) => {
        impl zarrs::storage::ListableStorageTraits for $type {
            fn list(&self) -> Result<zarrs::storage::StoreKeys, zarrs::storage::StorageError> {
                self.$inner.list()
            }
            fn list_prefix(
                &self,
                prefix: &zarrs::storage::StorePrefix,
            ) -> Result<zarrs::storage::StoreKeys, zarrs::storage::StorageError> {
                self.$inner.list_prefix(prefix)
            }
            fn list_dir(
                &self,
                prefix: &zarrs::storage::StorePrefix,
            ) -> Result<zarrs::storage::StoreKeysPrefixes, zarrs::storage::StorageError> {
                self.$inner.list_dir(prefix)
            }
            fn size_prefix(&self, prefix: &zarrs::storage::StorePrefix) -> Result<u64, zarrs::storage::StorageError> {
                self.$inner.size_prefix(prefix)
            }
        }
    };
}

pub mod aws_config;
pub mod disk_cache;
pub mod local;
pub mod remote;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use zarrs::storage::{ReadableListableStorage, StoreKey, WritableStorage};

use crate::text::io_reason;
use disk_cache::DiskCache;
use local::LocalDir;
use remote::{RemoteSettings, RemoteStorage, HTTP_READ_ONLY};

/// What the format above says about its keys, for the layers that must treat them apart.
#[derive(Clone, Copy)]
pub struct KeyRoles {
    /// Documents that can change in place (metadata): the disk cache asks the remote first.
    pub is_metadata: fn(&StoreKey) -> bool,
    /// Documents whose last modification stands for a remote store's time (its root documents).
    pub is_root_document: fn(&StoreKey) -> bool,
}

/// How to open a location's storage.
pub struct StorageConfig<'a> {
    /// Also hand out a writable handle (local directories and S3).
    pub writable: bool,
    /// Remote stores: timeouts, retries, disk cache.
    pub remote: &'a RemoteSettings,
    pub roles: KeyRoles,
}

/// Why a location's storage could not be opened. `Display` is the one-line reason; the caller
/// names the store.
#[derive(Debug, thiserror::Error)]
pub enum StorageOpenError {
    /// The local directory cannot be reached.
    #[error("{}", io_reason(.0))]
    Io(#[from] std::io::Error),
    #[error("not a directory (a Zarr store is a directory)")]
    NotADirectory,
    /// A writable mount of a plain HTTP store.
    #[error("{HTTP_READ_ONLY}")]
    HttpReadOnly,
    /// The URL or the client settings are refused, or the client cannot start.
    #[error("{0}")]
    Remote(String),
    #[error("disk cache {}: {source}", dir.display())]
    DiskCache { dir: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Local(String),
}

/// Where the storage is.
pub enum Origin {
    /// A local directory: its files carry their own modification times.
    Local { root: PathBuf },
    /// A remote store: `listable` is false for plain HTTP.
    Remote { remote: Arc<RemoteStorage>, listable: bool },
}

/// An opened storage stack.
pub struct OpenedStorage {
    /// How the location is named in messages: the path, or the URL without a trailing `/`.
    pub name: PathBuf,
    pub read: ReadableListableStorage,
    /// Present when asked for ([`StorageConfig::writable`]).
    pub write: Option<WritableStorage>,
    pub origin: Origin,
}

impl OpenedStorage {
    /// A remote store's last modification of its root documents, once they have been fetched
    /// (not when served from the disk cache).
    pub fn root_modified(&self) -> Option<SystemTime> {
        match &self.origin {
            Origin::Local { .. } => None,
            Origin::Remote { remote, .. } => remote.noted_modified(),
        }
    }
}

/// How `location` is named in messages: a URL without its trailing `/`, or the path.
pub fn display_name(location: &Path) -> PathBuf {
    match remote::url_of(location) {
        Some(url) => PathBuf::from(url.trim_end_matches('/')),
        None => location.to_path_buf(),
    }
}

/// Build the storage stack for `location`: a local directory, or (for an `s3://`/`http(s)://`
/// URL) a remote object store with the disk cache in front when one is configured.
pub fn open(location: &Path, config: &StorageConfig) -> Result<OpenedStorage, StorageOpenError> {
    match remote::url_of(location) {
        Some(url) => open_remote(url.trim_end_matches('/'), config),
        None => open_local(location, config.writable),
    }
}

fn open_local(location: &Path, writable: bool) -> Result<OpenedStorage, StorageOpenError> {
    if !std::fs::metadata(location)?.is_dir() {
        return Err(StorageOpenError::NotADirectory);
    }
    let dir = Arc::new(LocalDir::new(location).map_err(|e| StorageOpenError::Local(e.to_string()))?);
    let write: Option<WritableStorage> = if writable { Some(dir.clone()) } else { None };
    Ok(OpenedStorage {
        name: location.to_path_buf(),
        read: dir,
        write,
        origin: Origin::Local { root: location.to_path_buf() },
    })
}

fn open_remote(url: &str, config: &StorageConfig) -> Result<OpenedStorage, StorageOpenError> {
    let settings = config.remote;
    // Refused before any request is made.
    if config.writable && matches!(remote::parse_target(url), Ok(remote::Target::Http { .. })) {
        return Err(StorageOpenError::HttpReadOnly);
    }
    let remote = Arc::new(
        RemoteStorage::connect(url, settings, config.roles.is_root_document).map_err(StorageOpenError::Remote)?,
    );
    let listable = remote.listable;
    let mut write: Option<WritableStorage> = if config.writable { Some(remote.clone()) } else { None };
    let mut read: ReadableListableStorage = remote.clone();
    if let Some(dir) = &settings.disk_cache {
        let mut cache =
            DiskCache::open(read, dir, settings.disk_cache_bytes, remote.cache_namespace(), config.roles.is_metadata)
                .map_err(|source| StorageOpenError::DiskCache { dir: dir.clone(), source })?;
        if let Some(remote) = write.take() {
            cache = cache.with_writer(remote);
        }
        let cache = Arc::new(cache);
        if config.writable {
            write = Some(cache.clone());
        }
        read = cache;
    }
    Ok(OpenedStorage { name: PathBuf::from(url), read, write, origin: Origin::Remote { remote, listable } })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: KeyRoles = KeyRoles { is_metadata: |_| false, is_root_document: |_| false };

    #[test]
    fn writable_http_is_refused_before_any_request() {
        // Port 9 (discard) on loopback: nothing is asked of it.
        let settings = RemoteSettings::default();
        let config = StorageConfig { writable: true, remote: &settings, roles: ROLES };
        let e = open(Path::new("http://127.0.0.1:9/x.zarr/"), &config).err().unwrap();
        assert_eq!(e.to_string(), HTTP_READ_ONLY);
        assert_eq!(display_name(Path::new("http://127.0.0.1:9/x.zarr/")), PathBuf::from("http://127.0.0.1:9/x.zarr"));
    }

    #[test]
    fn local_errors_are_one_line_reasons() {
        let settings = RemoteSettings::default();
        let config = StorageConfig { writable: false, remote: &settings, roles: ROLES };
        let e = open(Path::new("/nonexistent/x.zarr"), &config).err().unwrap();
        assert_eq!(e.to_string(), "no such file or directory");
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = open(file.path(), &config).err().unwrap();
        assert_eq!(e.to_string(), "not a directory (a Zarr store is a directory)");
    }
}
