//! Remote stores: `s3://bucket/prefix` and `http(s)://host/path`, read through `object_store`.
//!
//! [`RemoteStorage`] is a synchronous zarrs storage that blocks on a small tokio runtime for
//! each request, so every decode thread of the filesystem keeps one fetch in flight while the
//! others decode. Whole chunks are plain GETs, shard subchunks are byte-range GETs (zarrs asks
//! through `get_partial_many`), a missing object (404) is "no chunk" (the fill value), and every
//! other failure is an error naming the key, which the filesystem turns into `EIO` for the read
//! that needed it. Timeouts and retries with exponential backoff are object_store's own.
//!
//! Listing: consolidated metadata is used when present (v3 in the root `zarr.json`, handled by
//! zarrs; v2 `.zmetadata`, served here by [`ConsolidatedV2`]); otherwise S3 is listed, and a
//! plain HTTP store, which cannot be listed, is refused with a one-line error at mount time.
//!
//! Writes (`-o rw`): S3 only. [`RemoteStorage`] is also a zarrs writable storage there, so a
//! writable mount stores chunks through the same code as a local store: each encoded chunk (or
//! whole shard) is one PUT, which S3 applies atomically (readers see the old or the new object,
//! never a mix), and a chunk that is all fill value is a DELETE. Through the disk cache, writes
//! also replace the cached copies (see [`DiskCache`]). Plain HTTP stores are read-only.
//!
//! [`open_url`] is the entry point for the command line when [`url_of`] says STORE is a URL.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, GetOptions, GetRange, ObjectStore, ObjectStoreExt, RetryConfig};
use serde_json::Value;
use zarrs::storage::byte_range::{ByteRange, ByteRangeIterator};
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, OffsetBytesIterator, ReadableListableStorage,
    ReadableStorageTraits, StorageError, StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix, WritableStorage,
    WritableStorageTraits,
};

use crate::source::zarr::Timestamps;
use crate::source::{OpenError, Store};
use crate::storage::disk_cache::DiskCache;

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

/// Open a remote store, with the disk cache in front of it when one is configured;
/// `writable` (S3 only) also prepares every array for storing chunks back.
pub fn open_url(url: &str, settings: &RemoteSettings, writable: bool) -> Result<Store, OpenError> {
    let url = url.trim_end_matches('/');
    let err = |reason: String| OpenError { store: PathBuf::from(url), reason };
    if writable && matches!(parse_target(url), Ok(Target::Http { .. })) {
        return Err(err(HTTP_READ_ONLY.into()));
    }
    let remote = Arc::new(RemoteStorage::connect(url, settings).map_err(err)?);
    let listable = remote.listable;
    let mut write: Option<WritableStorage> = if writable { Some(remote.clone()) } else { None };
    let mut storage: ReadableListableStorage = remote.clone();
    if let Some(dir) = &settings.disk_cache {
        let mut cache = DiskCache::open(storage, dir, settings.disk_cache_bytes, &remote.cache_namespace)
            .map_err(|e| err(format!("disk cache {}: {e}", dir.display())))?;
        if let Some(remote) = write.take() {
            cache = cache.with_writer(remote);
        }
        let cache = Arc::new(cache);
        if writable {
            write = Some(cache.clone());
        }
        storage = cache;
    }
    let storage = with_consolidated_metadata(storage, listable).map_err(err)?;
    // Fetching the root metadata (just done) noted its time; served from the disk cache, it
    // did not, and the mount time stands in.
    let modified = remote.root_modified.lock().unwrap().unwrap_or_else(SystemTime::now);
    Store::open_storage(storage, write, Path::new(url), Timestamps::Fixed(modified))
}

const NO_LISTING: &str = "cannot list a plain HTTP store; write consolidated metadata \
    (zarr.consolidate_metadata) or serve the store from S3";

/// Decide how the hierarchy will be found: v3 consolidated metadata is zarrs' business, v2
/// `.zmetadata` gets the [`ConsolidatedV2`] overlay, a root array needs nothing, and a group
/// without consolidated metadata needs a store that can be listed.
fn with_consolidated_metadata(
    storage: ReadableListableStorage,
    listable: bool,
) -> Result<ReadableListableStorage, String> {
    let get = |name: &str| -> Result<Option<Bytes>, String> {
        let key = StoreKey::new(name).expect("valid key");
        storage.get(&key).map_err(|e| {
            let reason = one_line(&e.to_string());
            let hint = match reason.contains("invalid peer certificate") {
                true => " (to trust a private CA, set SSL_CERT_FILE to its PEM file)",
                false => "",
            };
            format!("cannot read {name}: {reason}{hint}")
        })
    };
    if let Some(doc) = get("zarr.json")? {
        let Ok(doc) = serde_json::from_slice::<Value>(&doc) else {
            return Ok(storage); // zarrs names the parse error
        };
        let group = doc.get("node_type").and_then(Value::as_str) == Some("group");
        let consolidated = doc.get("consolidated_metadata").is_some_and(|c| !c.is_null());
        if group && !consolidated && !listable {
            return Err(NO_LISTING.into());
        }
        return Ok(storage);
    }
    if let Some(doc) = get(".zmetadata")? {
        let overlay = ConsolidatedV2::new(storage, &doc).map_err(|e| format!(".zmetadata: {e}"))?;
        return Ok(Arc::new(overlay));
    }
    if get(".zarray")?.is_some() {
        return Ok(storage);
    }
    if !listable && get(".zgroup")?.is_some() {
        return Err(NO_LISTING.into());
    }
    Ok(storage)
}

/// zarrs and object_store errors can span lines; logs and the user get one.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

// ------------------------------------------------------------------------------------------
// object_store behind a synchronous zarrs storage
// ------------------------------------------------------------------------------------------

/// A remote object store as a synchronous zarrs storage: readable, and writable on S3.
pub struct RemoteStorage {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    /// S3 can list (and be written); plain HTTP cannot.
    pub listable: bool,
    /// Last modification of the root metadata, noted when it is fetched: the files' times.
    root_modified: Mutex<Option<SystemTime>>,
    /// What names this store's objects absolutely, before their keys: the server (S3 endpoint
    /// or region, or HTTP origin), the bucket and the path. Disk-cache entries are named by it,
    /// so two servers never share entries, and a store mounted at a group's URL shares them
    /// with a mount of the whole store.
    cache_namespace: String,
}

/// The metadata documents at the root of a store.
const ROOT_METADATA: [&str; 4] = ["zarr.json", ".zmetadata", ".zgroup", ".zarray"];

/// Where a URL points: an S3 bucket and key prefix, or an HTTP base URL.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    S3 { bucket: String, prefix: String },
    Http { url: String },
}

fn parse_target(url: &str) -> Result<Target, String> {
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
    pub fn connect(url: &str, settings: &RemoteSettings) -> Result<RemoteStorage, String> {
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
            root_modified: Mutex::new(None),
            cache_namespace,
        })
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
                if ROOT_METADATA.contains(&key.as_str()) {
                    let newest = parts.iter().map(|p| p.1).max();
                    let mut noted = self.root_modified.lock().unwrap();
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

/// S3 only (`open_url` refuses writable HTTP mounts): one PUT per object, atomic by nature;
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

/// Settings from the shared AWS files (`~/.aws/credentials`, `~/.aws/config`, or the files
/// named by `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`), for the profile named by
/// `AWS_PROFILE` (default `default`): keys, session token, region and endpoint URL.
fn aws_config_files() -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, default: &str| -> Option<String> {
        let path = std::env::var_os(var).map(PathBuf::from).or_else(|| home.as_ref().map(|h| h.join(default)))?;
        std::fs::read_to_string(path).ok()
    };
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let mut out = Vec::new();
    if let Some(text) = file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials") {
        out.extend(aws_profile_settings(&text, &profile, false));
    }
    if let Some(text) = file("AWS_CONFIG_FILE", ".aws/config") {
        out.extend(aws_profile_settings(&text, &profile, true));
    }
    out
}

/// The settings of one profile of an AWS shared config/credentials file (INI). In the config
/// file, profiles other than `default` are written `[profile NAME]`.
fn aws_profile_settings(
    text: &str,
    profile: &str,
    config_file: bool,
) -> Vec<(object_store::aws::AmazonS3ConfigKey, String)> {
    use object_store::aws::AmazonS3ConfigKey as K;
    let wanted = if config_file && profile != "default" { format!("profile {profile}") } else { profile.to_string() };
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section != wanted {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = match k.trim().to_ascii_lowercase().as_str() {
            "aws_access_key_id" => K::AccessKeyId,
            "aws_secret_access_key" => K::SecretAccessKey,
            "aws_session_token" => K::Token,
            "region" => K::Region,
            "endpoint_url" => K::Endpoint,
            _ => continue,
        };
        out.push((key, v.trim().to_string()));
    }
    out
}

// ------------------------------------------------------------------------------------------
// v2 consolidated metadata
// ------------------------------------------------------------------------------------------

/// A v2 store whose `.zmetadata` lists every metadata document: metadata reads and listing are
/// answered from it (no requests, no listing of the remote store); chunks go to `inner`.
pub struct ConsolidatedV2 {
    inner: ReadableListableStorage,
    docs: HashMap<String, Bytes>,
}

fn is_v2_metadata_key(key: &str) -> bool {
    let name = key.rsplit('/').next().unwrap_or(key);
    matches!(name, ".zarray" | ".zgroup" | ".zattrs")
}

impl ConsolidatedV2 {
    pub fn new(inner: ReadableListableStorage, zmetadata: &[u8]) -> Result<ConsolidatedV2, String> {
        let doc: Value = serde_json::from_slice(zmetadata).map_err(|e| e.to_string())?;
        let Some(metadata) = doc.get("metadata").and_then(Value::as_object) else {
            return Err("no \"metadata\" object".into());
        };
        let docs = metadata
            .iter()
            .filter(|(k, _)| is_v2_metadata_key(k))
            .map(|(k, v)| (k.trim_start_matches('/').to_string(), Bytes::from(v.to_string())))
            .collect();
        Ok(ConsolidatedV2 { inner, docs })
    }

    fn keys_under<'a>(&'a self, prefix: &'a StorePrefix) -> impl Iterator<Item = &'a str> + 'a {
        let p = prefix.as_str();
        self.docs.keys().map(String::as_str).filter(move |k| k.starts_with(p))
    }
}

impl ReadableStorageTraits for ConsolidatedV2 {
    fn get_partial_many<'a>(
        &'a self,
        key: &StoreKey,
        byte_ranges: ByteRangeIterator<'a>,
    ) -> Result<MaybeBytesIterator<'a>, StorageError> {
        if !is_v2_metadata_key(key.as_str()) {
            return self.inner.get_partial_many(key, byte_ranges);
        }
        let Some(doc) = self.docs.get(key.as_str()) else {
            return Ok(None);
        };
        let size = doc.len() as u64;
        let parts: Vec<Result<Bytes, StorageError>> = byte_ranges
            .map(|r| {
                if r.end(size) > size || r.start(size) > r.end(size) {
                    return Err(zarrs::storage::byte_range::InvalidByteRangeError::new(r, size).into());
                }
                let range = r.to_range_usize(size);
                Ok(doc.slice(range))
            })
            .collect();
        Ok(Some(Box::new(parts.into_iter())))
    }

    fn size_key(&self, key: &StoreKey) -> Result<Option<u64>, StorageError> {
        if is_v2_metadata_key(key.as_str()) {
            return Ok(self.docs.get(key.as_str()).map(|d| d.len() as u64));
        }
        self.inner.size_key(key)
    }

    fn supports_get_partial(&self) -> bool {
        self.inner.supports_get_partial()
    }
}

impl ListableStorageTraits for ConsolidatedV2 {
    fn list(&self) -> Result<StoreKeys, StorageError> {
        self.list_prefix(&StorePrefix::root())
    }

    fn list_prefix(&self, prefix: &StorePrefix) -> Result<StoreKeys, StorageError> {
        let mut keys: StoreKeys = self.keys_under(prefix).filter_map(|k| StoreKey::new(k).ok()).collect();
        keys.sort();
        Ok(keys)
    }

    /// The metadata documents and the nodes directly under `prefix`: all that a hierarchy walk
    /// needs (chunk keys are not listed).
    fn list_dir(&self, prefix: &StorePrefix) -> Result<StoreKeysPrefixes, StorageError> {
        let p = prefix.as_str();
        let mut keys = BTreeSet::new();
        let mut prefixes = BTreeSet::new();
        for k in self.keys_under(prefix) {
            match k[p.len()..].split_once('/') {
                None => {
                    keys.insert(k.to_string());
                }
                Some((child, _)) => {
                    prefixes.insert(format!("{p}{child}/"));
                }
            }
        }
        let keys = keys.into_iter().filter_map(|k| StoreKey::new(k).ok()).collect();
        let prefixes = prefixes.into_iter().filter_map(|k| StorePrefix::new(k).ok()).collect();
        Ok(StoreKeysPrefixes::new(keys, prefixes))
    }

    fn size_prefix(&self, prefix: &StorePrefix) -> Result<u64, StorageError> {
        self.inner.size_prefix(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zarrs::storage::store::MemoryStore;
    use zarrs::storage::WritableStorageTraits;

    /// Disk-cache entries name objects absolutely: a mount of a group's URL and a mount of the
    /// whole store name the same object alike, two servers never alike.
    #[test]
    fn cache_namespaces_name_objects_absolutely() {
        let settings = RemoteSettings::default();
        let name =
            |url: &str, key: &str| format!("{}{key}", RemoteStorage::connect(url, &settings).unwrap().cache_namespace);
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

    #[test]
    fn writable_http_is_refused_before_any_request() {
        // Port 9 (discard) on loopback: nothing is asked of it.
        let e = open_url("http://127.0.0.1:9/x.zarr/", &RemoteSettings::default(), true).err().unwrap();
        assert_eq!(e.to_string(), format!("http://127.0.0.1:9/x.zarr: {HTTP_READ_ONLY}"));
    }

    #[test]
    fn aws_profiles() {
        use object_store::aws::AmazonS3ConfigKey as K;
        let creds = "[default]\naws_access_key_id = A\naws_secret_access_key=S\n\n[other]\naws_access_key_id = B\n";
        let config = "[default]\nregion = eu-west-1\n[profile other]\nregion = us-west-2\nendpoint_url = http://127.0.0.1:9000\n";
        assert_eq!(
            aws_profile_settings(creds, "default", false),
            vec![(K::AccessKeyId, "A".to_string()), (K::SecretAccessKey, "S".to_string())]
        );
        assert_eq!(aws_profile_settings(creds, "other", false), vec![(K::AccessKeyId, "B".to_string())]);
        assert_eq!(
            aws_profile_settings(config, "other", true),
            vec![(K::Region, "us-west-2".to_string()), (K::Endpoint, "http://127.0.0.1:9000".to_string())]
        );
        assert_eq!(aws_profile_settings(config, "default", true), vec![(K::Region, "eu-west-1".to_string())]);
    }

    #[test]
    fn consolidated_v2_overlay() {
        let inner = Arc::new(MemoryStore::new());
        inner.set(&StoreKey::new("grp/arr/0.0").unwrap(), Bytes::from_static(b"chunk")).unwrap();
        let zmetadata = serde_json::json!({
            "zarr_consolidated_format": 1,
            "metadata": {
                ".zgroup": {"zarr_format": 2},
                "grp/.zgroup": {"zarr_format": 2},
                "grp/.zattrs": {"a": 1},
                "grp/arr/.zarray": {"zarr_format": 2},
                "other/.zgroup": {"zarr_format": 2},
            }
        });
        let overlay = ConsolidatedV2::new(inner, zmetadata.to_string().as_bytes()).unwrap();
        let root = overlay.list_dir(&StorePrefix::root()).unwrap();
        assert_eq!(root.keys(), &vec![StoreKey::new(".zgroup").unwrap()]);
        assert_eq!(root.prefixes(), &vec![StorePrefix::new("grp/").unwrap(), StorePrefix::new("other/").unwrap()]);
        let grp = overlay.list_dir(&StorePrefix::new("grp/").unwrap()).unwrap();
        assert_eq!(grp.prefixes(), &vec![StorePrefix::new("grp/arr/").unwrap()]);
        assert_eq!(grp.keys().len(), 2);
        let attrs = overlay.get(&StoreKey::new("grp/.zattrs").unwrap()).unwrap().unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&attrs).unwrap(), serde_json::json!({"a": 1}));
        assert!(overlay.get(&StoreKey::new("other/.zattrs").unwrap()).unwrap().is_none());
        assert_eq!(&overlay.get(&StoreKey::new("grp/arr/0.0").unwrap()).unwrap().unwrap()[..], b"chunk");
        assert!(overlay.get(&StoreKey::new("grp/arr/0.1").unwrap()).unwrap().is_none());
    }
}
