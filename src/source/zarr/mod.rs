//! Zarr v2 and v3 through zarrs: opening a store on the storage [`crate::storage`] built for
//! it, walking its hierarchy into a [`Store`], and where the nodes' times come from.
//!
//! Jobs of the submodules: [`keys`] names the metadata documents (once), [`consolidated`]
//! finds the hierarchy of stores that cannot be listed, [`array`] decodes and stores chunks.
//!
//! Invariants: the whole hierarchy is walked at open, children in name order; an array zarrs
//! refuses fails the store, an array that cannot be flattened is skipped with its reason.

pub mod array;
pub mod consolidated;
pub mod keys;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;
use zarrs::array::ArrayMetadata;
use zarrs::node::{Node, NodeMetadata};
use zarrs::storage::{ReadableListableStorage, StorePrefix, WritableStorage};

use super::{Format, GroupInfo, OpenError, Skipped, Store};
use crate::storage::{KeyRoles, OpenedStorage, Origin};
use crate::text::one_line;
use array::{open_array, ArrayOutcome, InvalidArray};
use keys::{NODE_DOCUMENTS, ZARRAY, ZARR_JSON, ZGROUP};

/// What storage layers must know of Zarr keys: metadata documents change in place (the disk
/// cache refreshes them first), and the root documents' time is a remote store's time.
pub const KEY_ROLES: KeyRoles =
    KeyRoles { is_metadata: keys::is_metadata_key, is_root_document: keys::is_root_document };

/// Open the Zarr v2 or v3 hierarchy held by `storage` and walk all of it. Fails on anything
/// that makes the store unreadable as a whole (not Zarr, invalid or unsupported metadata, a
/// group that cannot be listed); arrays that cannot be flattened are skipped instead.
pub fn open(storage: OpenedStorage) -> Result<Store, OpenError> {
    let err = |reason: String| OpenError { store: storage.name.clone(), reason };
    let (read, times) = match &storage.origin {
        Origin::Local { root } => (storage.read.clone(), Timestamps::Local(root.clone())),
        Origin::Remote { listable, .. } => {
            let read = consolidated::with_consolidated_metadata(storage.read.clone(), *listable)
                .map_err(|e| err(e.to_string()))?;
            // Fetching the root metadata (just done) noted its time; served from the disk
            // cache, it did not, and the mount time stands in.
            let modified = storage.root_modified().unwrap_or_else(SystemTime::now);
            (read, Timestamps::Fixed(modified))
        }
    };
    open_storage(read, storage.write.clone(), &storage.name, times)
}

/// Open the hierarchy held by `storage`; `location` names it in messages, `times` says where
/// the nodes' modification times come from.
fn open_storage(
    storage: ReadableListableStorage,
    writable: Option<WritableStorage>,
    location: &Path,
    times: Timestamps,
) -> Result<Store, OpenError> {
    let err = |reason: String| OpenError { store: location.to_path_buf(), reason };
    let root = Node::open(&storage, "/").map_err(|e| match e {
        zarrs::node::NodeCreateError::MissingMetadata(_) => {
            err(format!("not a Zarr store (no {ZARR_JSON}, {ZGROUP} or {ZARRAY} at its root)"))
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
    walk(&mut store, &storage, writable.as_ref(), &times, &root).map_err(|e| err(e.to_string()))?;
    Ok(store)
}

/// Add `node` and everything under it to `store`.
fn walk(
    store: &mut Store,
    storage: &ReadableListableStorage,
    writable: Option<&WritableStorage>,
    times: &Timestamps,
    node: &Node,
) -> Result<(), InvalidArray> {
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
            store.groups.push(GroupInfo {
                mtime: mtime(&path),
                path,
                xattrs: vec![("user.zarr.attributes".into(), attributes.to_string())],
                attributes,
            });
            let mut children: Vec<&Node> = node.children().iter().collect();
            children.sort_by(|a, b| a.path().as_str().cmp(b.path().as_str()));
            for child in children {
                walk(store, storage, writable, times, child)?;
            }
        }
        NodeMetadata::Array(metadata) => {
            let local = matches!(times, Timestamps::Local(_));
            match open_array(storage, writable, &path, metadata.clone(), mtime(&path), local)? {
                ArrayOutcome::Open(array) => store.arrays.push(*array),
                ArrayOutcome::Skipped(reason) => {
                    let reason = reason.to_string();
                    log::warn!("{}: skipping array {path}: {reason}", store.location.display());
                    store.skipped.push(Skipped { path, reason });
                }
            }
        }
    }
    Ok(())
}

fn node_zarr_format(metadata: &NodeMetadata) -> u8 {
    match metadata {
        NodeMetadata::Array(ArrayMetadata::V2(_)) => 2,
        NodeMetadata::Group(zarrs::metadata::GroupMetadata::V2(_)) => 2,
        _ => 3,
    }
}

/// Where the modification times of a store's files and directories come from.
enum Timestamps {
    /// A local store: each node's metadata documents.
    Local(PathBuf),
    /// The same time for every node (a remote store: its root metadata's last modification).
    Fixed(SystemTime),
}

/// The newest modification time among the metadata documents of a node.
fn metadata_mtime(location: &Path, node_path: &str) -> SystemTime {
    let dir = location.join(node_path.trim_start_matches('/'));
    NODE_DOCUMENTS
        .iter()
        .filter_map(|name| std::fs::metadata(dir.join(name)).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
