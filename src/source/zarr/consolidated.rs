//! Consolidated metadata: deciding, from a store's root documents, how its hierarchy will be
//! found ([`with_consolidated_metadata`]), and the v2 `.zmetadata` overlay ([`ConsolidatedV2`])
//! that answers metadata reads and listings from one document, so a store that cannot be
//! listed (plain HTTP) can still be walked.
//!
//! Invariants: the overlay serves only the v2 node documents `.zmetadata` names (any other is
//! absent, never fetched); chunks always go to the storage below. v3 consolidated metadata is
//! zarrs' own business.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::Value;
use zarrs::storage::byte_range::ByteRangeIterator;
use zarrs::storage::{
    Bytes, ListableStorageTraits, MaybeBytesIterator, ReadableListableStorage, ReadableStorageTraits, StorageError,
    StoreKey, StoreKeys, StoreKeysPrefixes, StorePrefix,
};

use super::keys::{is_v2_node_document, ZARRAY, ZARR_JSON, ZGROUP, ZMETADATA};
use crate::storage::remote::NO_LISTING;
use crate::text::one_line;

/// Why a store's hierarchy cannot be found. `Display` is the one-line reason.
#[derive(Debug, thiserror::Error)]
pub enum ConsolidatedError {
    /// A root document could not be read (not merely absent).
    #[error("cannot read {name}: {reason}{hint}")]
    Read { name: &'static str, reason: String, hint: &'static str },
    /// A group without consolidated metadata, on a store that cannot be listed.
    #[error("{NO_LISTING}")]
    NoListing,
    #[error(".zmetadata: {0}")]
    ZMetadata(String),
}

/// Decide how the hierarchy will be found: v3 consolidated metadata is zarrs' business, v2
/// `.zmetadata` gets the [`ConsolidatedV2`] overlay, a root array needs nothing, and a group
/// without consolidated metadata needs a store that can be listed.
pub fn with_consolidated_metadata(
    storage: ReadableListableStorage,
    listable: bool,
) -> Result<ReadableListableStorage, ConsolidatedError> {
    let get = |name: &'static str| -> Result<Option<Bytes>, ConsolidatedError> {
        let key = StoreKey::new(name).expect("valid key");
        storage.get(&key).map_err(|e| {
            let reason = one_line(&e.to_string());
            let hint = match reason.contains("invalid peer certificate") {
                true => " (to trust a private CA, set SSL_CERT_FILE to its PEM file)",
                false => "",
            };
            ConsolidatedError::Read { name, reason, hint }
        })
    };
    if let Some(doc) = get(ZARR_JSON)? {
        let Ok(doc) = serde_json::from_slice::<Value>(&doc) else {
            return Ok(storage); // zarrs names the parse error
        };
        let group = doc.get("node_type").and_then(Value::as_str) == Some("group");
        let consolidated = doc.get("consolidated_metadata").is_some_and(|c| !c.is_null());
        if group && !consolidated && !listable {
            return Err(ConsolidatedError::NoListing);
        }
        return Ok(storage);
    }
    if let Some(doc) = get(ZMETADATA)? {
        let overlay = ConsolidatedV2::new(storage, &doc).map_err(ConsolidatedError::ZMetadata)?;
        return Ok(Arc::new(overlay));
    }
    if get(ZARRAY)?.is_some() {
        return Ok(storage);
    }
    if !listable && get(ZGROUP)?.is_some() {
        return Err(ConsolidatedError::NoListing);
    }
    Ok(storage)
}

/// A v2 store whose `.zmetadata` lists every metadata document: metadata reads and listing are
/// answered from it (no requests, no listing of the remote store); chunks go to `inner`.
pub struct ConsolidatedV2 {
    inner: ReadableListableStorage,
    docs: HashMap<String, Bytes>,
}

impl ConsolidatedV2 {
    pub fn new(inner: ReadableListableStorage, zmetadata: &[u8]) -> Result<ConsolidatedV2, String> {
        let doc: Value = serde_json::from_slice(zmetadata).map_err(|e| e.to_string())?;
        let Some(metadata) = doc.get("metadata").and_then(Value::as_object) else {
            return Err("no \"metadata\" object".into());
        };
        let docs = metadata
            .iter()
            .filter(|(k, _)| is_v2_node_document(k))
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
        if !is_v2_node_document(key.as_str()) {
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
        if is_v2_node_document(key.as_str()) {
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

    /// zarrs' read conformance test through the overlay over a store without `.zmetadata`
    /// documents: everything that is not a v2 node document passes through unchanged. (The
    /// listing tests do not apply: the overlay lists only the consolidated documents.)
    #[test]
    fn reads_pass_through() {
        let inner = Arc::new(MemoryStore::new());
        zarrs_storage::store_test::store_write(inner.as_ref()).unwrap();
        let zmetadata = serde_json::json!({"metadata": {".zgroup": {"zarr_format": 2}}});
        let overlay = ConsolidatedV2::new(inner, zmetadata.to_string().as_bytes()).unwrap();
        zarrs_storage::store_test::store_read(&overlay).unwrap();
    }
}
