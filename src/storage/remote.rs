//! Remote stores: `s3://bucket/prefix` and `http(s)://host/path`, read through `object_store`.
//!
//! [`RemoteStorage`] is a synchronous zarrs storage that blocks on a small tokio runtime for
//! each request, so every decode thread of the filesystem keeps one fetch in flight while the
//! others decode. Whole objects are plain GETs, byte ranges are byte-range GETs (zarrs asks
//! through `get_partial_many`), a missing object (404) is "no object", and every other failure
//! is an error naming the key, which the filesystem turns into `EIO` for the read that needed
//! it. Timeouts and retries with exponential backoff are object_store's own.
//!
//! Listing: S3 can be listed; a plain HTTP store cannot, and says so in its errors (the source
//! above decides whether it needs a listing, e.g. when there is no consolidated metadata).
//!
//! Writes (`-o rw`): S3 only. [`RemoteStorage`] is also a zarrs writable storage there: each
//! object is one PUT, which S3 applies atomically (readers see the old or the new object,
//! never a mix), and an erase is a DELETE. Plain HTTP stores are read-only.
//!
//! Invariant: no format knowledge. Which keys' last modification stands for the store's time
//! is told by the caller (a predicate given to [`RemoteStorage::connect`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};
use parking_lot::Mutex;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableStorageTraits, StorageError,
    StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorageTraits,
};

use crate::storage::aws_config::aws_config_files;
use crate::text::one_line;

/// Settings for remote stores; part of the mount settings (`-o` options and flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSettings {
    /// Per-request timeout (connect + transfer).
    pub timeout: Duration,
    /// Retries of a failed request (connection errors, timeouts, 5xx), with exponential backoff.
    pub retries: usize,
    /// Directory of the on-disk cache of fetched (encoded) chunks, if any.
    pub disk_cache: Option<PathBuf>,
    /// Bound of the disk cache, in bytes of disk usage.
    pub disk_cache_bytes: u64,
}

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRIES: usize = 5;
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 10 << 30;

impl Default for RemoteSettings {
    fn default() -> Self {
        RemoteSettings {
            timeout: DEFAULT_TIMEOUT,
            retries: DEFAULT_RETRIES,
            disk_cache: None,
            disk_cache_bytes: DEFAULT_DISK_CACHE_BYTES,
        }
    }
}

/// Whether a STORE argument names a remote store.
pub fn is_url(store: &str) -> bool {
    let lower = store.get(..8).unwrap_or(store).to_ascii_lowercase();
    lower.starts_with("s3://") || lower.starts_with("http://") || lower.starts_with("https://")
}

/// The URL a STORE argument names, if it names a remote store.
pub fn url_of(store: &Path) -> Option<&str> {
    store.to_str().filter(|s| is_url(s))
}

/// Why a writable mount of a plain HTTP store is refused.
pub const HTTP_READ_ONLY: &str = "writable mounts need S3; plain HTTP stores are read-only";

/// Why a plain HTTP store cannot be listed, and what to do about it.
pub const NO_LISTING: &str = "cannot list a plain HTTP store; write consolidated metadata \
    (zarr.consolidate_metadata) or serve the store from S3";

// ------------------------------------------------------------------------------------------
// object_store behind a synchronous zarrs storage
// ------------------------------------------------------------------------------------------

/// A remote object store as a synchronous zarrs storage: readable, and writable on S3.
pub struct RemoteStorage {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    /// S3 can list (and be written); plain HTTP cannot.
    pub listable: bool,
    /// The newest last modification of the objects `noted` names, noted when they are fetched.
    noted_modified: Mutex<Option<SystemTime>>,
    /// The keys whose last modification is noted (the caller's root documents).
    noted: fn(&StoreKey) -> bool,
    /// What names this store's objects absolutely, before their keys: the server (S3 endpoint
    /// or region, or HTTP origin), the bucket and the path. Disk-cache entries are named by it,
    /// so two servers never share entries, and a store mounted at a group's URL shares them
    /// with a mount of the whole store.
    cache_namespace: String,
}

/// Where a URL points: an S3 bucket and key prefix, or an HTTP base URL.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    S3 { bucket: String, prefix: String },
    Http { url: String },
}

pub(crate) fn parse_target(url: &str) -> Result<Target, String> {
    let url = url.trim_end_matches('/');
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("s3://") {
        let rest = &url[5..];
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err("an S3 URL needs a bucket (s3://BUCKET/PATH)".into());
        }
        return Ok(Target::S3 { bucket: bucket.into(), prefix: prefix.trim_matches('/').into() });
    }
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(Target::Http { url: url.into() });
    }
    Err("not a supported URL (s3://, http:// or https://)".into())
}

impl RemoteStorage {
    /// A client for the store at `url`; `noted` names the keys whose last modification
    /// [`RemoteStorage::noted_modified`] reports. No request is made.
    pub fn connect(
        url: &str,
        settings: &RemoteSettings,
        noted: fn(&StoreKey) -> bool,
    ) -> Result<RemoteStorage, String> {
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: settings.retries,
            retry_timeout: (settings.timeout * (settings.retries as u32 + 1)).min(Duration::from_secs(120)),
        };
        let timeout = format!("{}ms", settings.timeout.as_millis().max(1));
        let connect_timeout = format!("{}ms", settings.timeout.min(Duration::from_secs(10)).as_millis().max(1));
        let (store, listable, cache_namespace): (Arc<dyn ObjectStore>, bool, String) = match parse_target(url)? {
            Target::S3 { bucket, prefix } => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
                let mut builder = AmazonS3Builder::from_env();
                for (key, value) in aws_config_files() {
                    // The environment wins over the shared config files.
                    if builder.get_config_value(&key).is_none() {
                        builder = builder.with_config(key, value);
                    }
                }
                let endpoint = builder.get_config_value(&AmazonS3ConfigKey::Endpoint).unwrap_or_else(|| {
                    let region = builder.get_config_value(&AmazonS3ConfigKey::Region);
                    format!("aws:{}", region.as_deref().unwrap_or("us-east-1"))
                });
                let within = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
                let cache_namespace = format!("s3 {}\n{bucket}/{within}", endpoint.trim_end_matches('/'));
                let s3 = builder
                    .with_bucket_name(bucket)
                    .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), &timeout)
                    .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), &connect_timeout)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| one_line(&e.to_string()))?;
                if prefix.is_empty() {
                    (Arc::new(s3), true, cache_namespace)
                } else {
                    (Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.as_str())), true, cache_namespace)
                }
            }
            Target::Http { url } => {
                let cache_namespace = format!("{url}/");
                let http = object_store::http::HttpBuilder::new()
                    .with_url(url)
                    .with_config(ClientConfigKey::AllowHttp, "true")
                    .with_config(ClientConfigKey::Timeout, &timeout)
                    .with_config(ClientConfigKey::ConnectTimeout, &connect_timeout)
                    .with_retry(retry)
                    .build()
                    .map_err(|e| one_line(&e.to_string()))?;
                (Arc::new(http), false, cache_namespace)
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("zarrfs-net")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the network runtime: {e}"))?;
        Ok(RemoteStorage {
            store,
            runtime: Arc::new(runtime),
            listable,
            noted_modified: Mutex::new(None),
            noted,
            cache_namespace,
        })
    }

    /// The newest last modification among the noted objects fetched so far.
    pub fn noted_modified(&self) -> Option<SystemTime> {
        *self.noted_modified.lock()
    }

    /// What names this store's objects absolutely (see the field): the disk cache's namespace.
    pub fn cache_namespace(&self) -> &str {
        &self.cache_namespace
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// One line naming the key (object_store names it in the URL it reports) and the whole
    /// chain of causes: "error sending request" alone does not say "timed out".
    fn error(key: &str, e: object_store::Error) -> StorageError {
        let mut message = one_line(&e.to_string());
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            let text = one_line(&cause.to_string());
            if !text.is_empty() && !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = cause.source();
        }
        if !message.contains(key) {
            message = format!("{key}: {message}");
        }
        StorageError::Other(message)
    }

    fn listing_error() -> StorageError {
        StorageError::Unsupported(NO_LISTING.into())
    }

    async fn fetch(
        store: &dyn ObjectStore,
        path: &ObjectPath,
        range: ByteRange,
    ) -> object_store::Result<(Bytes, SystemTime)> {
        let get_range = match range {
            ByteRange::FromStart(0, None) => None,
            ByteRange::FromStart(start, None) => Some(GetRange::Offset(start)),
            ByteRange::FromStart(_, Some(0)) | ByteRange::Suffix(0) => {
                return Ok((Bytes::new(), SystemTime::UNIX_EPOCH))
            }
            ByteRange::FromStart(start, Some(len)) => Some(GetRange::Bounded(start..start + len)),
            ByteRange::Suffix(len) => Some(GetRange::Suffix(len)),
        };
        let options = GetOptions { range: get_range, ..Default::default() };
        let got = store.get_opts(path, options).await?;
        let modified = SystemTime::from(got.meta.last_modified);
        let bytes = got.bytes().await?;
        let expected = match range {
            ByteRange::FromStart(_, Some(len)) | ByteRange::Suffix(len) => Some(len),
            ByteRange::FromStart(_, None) => None,
        };
        if let Some(len) = expected.filter(|len| *len != bytes.len() as u64) {
            return Err(object_store::Error::Generic {
                store: "zarrfs",
                source: format!("range {range:?}: expected {len} bytes, got {}", bytes.len()).into(),
            });
        }
        Ok((bytes, modified))
    }

    fn object_path(prefix: &StorePrefix) -> Option<ObjectPath> {
        let p = prefix.as_str().trim_end_matches('/');
        (!p.is_empty()).then(|| ObjectPath::from(p))
    }

    fn list_keys(&self, prefix: &StorePrefix) -> Result<Vec<(StoreKey, u64)>, StorageError> {
        if !self.listable {
            return Err(Self::listing_error());
        }
        let path = Self::object_path(prefix);
        let metas: Vec<object_store::ObjectMeta> =
            self.block_on(self.store.list(path.as_ref()).try_collect()).map_err(|e| Self::error(prefix.as_str(), e))?;
        let mut keys: Vec<(StoreKey, u64)> =
            metas.into_iter().filter_map(|m| StoreKey::new(m.location.as_ref()).ok().map(|k| (k, m.size))).collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(keys)
    }
}

impl ReadableStorageTraits for RemoteStorage {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        let path = ObjectPath::from(key.as_str());
        let ranges: Vec<ByteRange> = byte_ranges.collect();
        let store = self.store.as_ref();
        let result =
            self.block_on(futures::future::try_join_all(ranges.iter().map(|range| Self::fetch(store, &path, *range))));
        match result {
            Ok(parts) => {
                if (self.noted)(key) {
                    let newest = parts.iter().map(|p| p.1).max();
                    let mut noted = self.noted_modified.lock();
                    *noted = (*noted).max(newest);
                }
                Ok(Some(Box::new(parts.into_iter().map(|p| Ok(p.0)))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::error(key.as_str(), e)),
        }
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        match self.block_on(self.store.head(&ObjectPath::from(key.as_str()))) {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Self::error(key.as_str(), e)),
        }
    }

    fn supports_get_partial(&self) -> bool {
        true
    }
}

impl ListableStorageTraits for RemoteStorage {
    fn list(&self) -> Result<StoreKeys, StorageError> {
        self.list_prefix(&StorePrefix::root())
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
        Ok(self.list_keys(prefix)?.into_iter().map(|(k, _)| k).collect())
    }

    fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
        if !self.listable {
            return Err(Self::listing_error());
        }
        let path = Self::object_path(prefix);
        let listing = self
            .block_on(self.store.list_with_delimiter(path.as_ref()))
            .map_err(|e| Self::error(prefix.as_str(), e))?;
        let mut keys: StoreKeys =
            listing.objects.iter().filter_map(|m| StoreKey::new(m.location.as_ref()).ok()).collect();
        let mut prefixes: Vec<StorePrefix> =
            listing.common_prefixes.iter().filter_map(|p| StorePrefix::new(format!("{}/", p.as_ref())).ok()).collect();
        keys.sort();
        prefixes.sort();
        Ok(StoreKeysPrefixes::new(keys, prefixes))
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
        Ok(self.list_keys(prefix)?.iter().map(|(_, size)| size).sum())
    }
}

/// S3 only (`storage::open` refuses writable HTTP mounts): one PUT per object, atomic by nature;
/// a DELETE of a missing object is not an error.
impl WritableStorageTraits for RemoteStorage {
    fn set(&self, key: &StoreKey, value: Bytes) -> Result<(), StorageError> {
        self.check_writable()?;
        let path = ObjectPath::from(key.as_str());
        self.block_on(self.store.put(&path, value.into())).map(|_| ()).map_err(|e| Self::error(key.as_str(), e))
    }

    fn set_partial_many(&self, key: &StoreKey, offset_values: OffsetBytesIterator) -> Result<(), StorageError> {
        zarrs::storage::store_set_partial_many(self, key, offset_values)
    }

    fn erase(&self, key: &StoreKey) -> Result<(), StorageError> {
        self.check_writable()?;
        match self.block_on(self.store.delete(&ObjectPath::from(key.as_str()))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Self::error(key.as_str(), e)),
        }
    }

    fn erase_prefix(&self, prefix: &StorePrefix) -> Result<(), StorageError> {
        self.check_writable()?;
        let keys = self.list_keys(prefix)?;
        let store = self.store.as_ref();
        self.block_on(
            futures::stream::iter(keys.iter().map(|(key, _)| async move {
                match store.delete(&ObjectPath::from(key.as_str())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Self::error(key.as_str(), e)),
                }
            }))
            .buffer_unordered(16)
            .try_collect::<Vec<()>>(),
        )
        .map(|_| ())
    }

    fn supports_set_partial(&self) -> bool {
        false
    }
}

impl RemoteStorage {
    fn check_writable(&self) -> Result<(), StorageError> {
        if self.listable {
            Ok(())
        } else {
            Err(StorageError::Unsupported(HTTP_READ_ONLY.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disk-cache entries name objects absolutely: a mount of a group's URL and a mount of the
    /// whole store name the same object alike, two servers never alike.
    #[test]
    fn cache_namespaces_name_objects_absolutely() {
        let settings = RemoteSettings::default();
        let name = |url: &str, key: &str| {
            format!("{}{key}", RemoteStorage::connect(url, &settings, |_| false).unwrap().cache_namespace)
        };
        assert_eq!(name("http://h:1/x.zarr", "grp/a/c/0"), name("http://h:1/x.zarr/grp/", "a/c/0"));
        assert_ne!(name("http://h:1/x.zarr", "a/c/0"), name("http://h:2/x.zarr", "a/c/0"));
    }

    #[test]
    fn urls() {
        assert!(is_url("s3://b/x.zarr"));
        assert!(is_url("HTTPS://host/x"));
        assert!(is_url("http://127.0.0.1:8000/x.zarr"));
        assert!(!is_url("/data/x.zarr"));
        assert!(!is_url("s3.zarr"));
        assert_eq!(
            parse_target("s3://bucket/a/b.zarr/").unwrap(),
            Target::S3 { bucket: "bucket".into(), prefix: "a/b.zarr".into() }
        );
        assert_eq!(parse_target("s3://bucket").unwrap(), Target::S3 { bucket: "bucket".into(), prefix: "".into() });
        assert!(parse_target("s3:///x").is_err());
        assert_eq!(parse_target("http://h:1/x.zarr/").unwrap(), Target::Http { url: "http://h:1/x.zarr".into() });
    }
}
