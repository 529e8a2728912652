//! The names of Zarr's metadata documents, defined once, and the predicates over store keys
//! that the walk, the consolidated overlay and the storage layers (through the predicates the
//! source hands them) use. Invariant: every other module asks these, never spells a name.

use zarrs::storage::StoreKey;

/// A Zarr v3 node's metadata document (array or group, attributes included).
pub const ZARR_JSON: &str = "zarr.json";
/// A Zarr v2 array's metadata document.
pub const ZARRAY: &str = ".zarray";
/// A Zarr v2 group's metadata document.
pub const ZGROUP: &str = ".zgroup";
/// A Zarr v2 node's attributes.
pub const ZATTRS: &str = ".zattrs";
/// Zarr v2 consolidated metadata (at the root): every other v2 document in one.
pub const ZMETADATA: &str = ".zmetadata";

/// The documents that describe one node: their newest modification is the node's time.
pub const NODE_DOCUMENTS: [&str; 4] = [ZARR_JSON, ZARRAY, ZGROUP, ZATTRS];

/// The documents a v2 `.zmetadata` consolidates.
const V2_NODE_DOCUMENTS: [&str; 3] = [ZARRAY, ZGROUP, ZATTRS];

/// The documents at the root of a store that say what it is; a remote store's time is theirs.
const ROOT_DOCUMENTS: [&str; 4] = [ZARR_JSON, ZMETADATA, ZGROUP, ZARRAY];

/// The last path component of a key.
fn name_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// Whether `key` is a metadata document of any node (not a chunk): such documents can change
/// in place, so caches ask the store for them first.
pub fn is_metadata_key(key: &StoreKey) -> bool {
    let name = name_of(key.as_str());
    name == ZMETADATA || NODE_DOCUMENTS.contains(&name)
}

/// Whether `key` names a document that a v2 `.zmetadata` holds.
pub fn is_v2_node_document(key: &str) -> bool {
    V2_NODE_DOCUMENTS.contains(&name_of(key))
}

/// Whether `key` is one of the documents at the root of the store.
pub fn is_root_document(key: &StoreKey) -> bool {
    ROOT_DOCUMENTS.contains(&key.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predicates() {
        let k = |s: &str| StoreKey::new(s).unwrap();
        for m in ["zarr.json", "a/.zarray", "a/b/.zgroup", ".zattrs", ".zmetadata"] {
            assert!(is_metadata_key(&k(m)), "{m}");
        }
        for c in ["a/c/0/0", "a/0.0", "a/zarr.json.tmp"] {
            assert!(!is_metadata_key(&k(c)), "{c}");
        }
        assert!(is_v2_node_document("grp/.zattrs"));
        assert!(!is_v2_node_document("grp/zarr.json"));
        assert!(is_root_document(&k(".zmetadata")));
        assert!(!is_root_document(&k("grp/.zgroup")));
        assert!(!is_root_document(&k(".zattrs")));
    }
}
