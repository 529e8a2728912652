//! zarrfs: Zarr arrays as flat, memory-mappable files.
//!
//! The FUSE protocol lives only in [`fuse`]; everything below it works on plain Rust types so it
//! can be tested without a kernel.

pub mod cache;
pub mod disk_cache;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod mount;
pub mod npy;
pub mod options;
pub mod remote;
pub mod source;
pub mod writeback;
