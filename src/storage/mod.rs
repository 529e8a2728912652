//! Where bytes come from: local directories, object stores, the disk cache. Knows nothing
//! about formats.

pub mod disk_cache;
pub mod remote;
