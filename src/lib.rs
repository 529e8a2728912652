//! zarrfs: chunked array stores as flat, memory-mappable files.
//!
//! The FUSE protocol lives only in [`fuse`]; everything below it works on plain Rust types so it
//! can be tested without a kernel. See `docs/architecture.md` for the module map.

// Every unsafe block says why it is sound.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod cli;
pub mod create;
pub mod fs;
pub mod fuse;
pub mod layout;
pub mod mount;
pub mod npy;
pub mod source;
pub mod storage;
pub mod text;
pub mod units;
