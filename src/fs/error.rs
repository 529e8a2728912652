//! Why a filesystem call failed, in the filesystem's own terms. The FUSE layer turns each
//! variant into one errno (`crate::fuse::errno`); nothing below it picks errno values.

use crate::source::ChunkError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such inode or name (ENOENT).
    #[error("no such file or directory")]
    NotFound,
    /// A file where a directory is needed (ENOTDIR).
    #[error("not a directory")]
    NotDir,
    /// A directory where a file is needed (EISDIR).
    #[error("is a directory")]
    IsDir,
    /// A change on a read-only mount or array (EROFS).
    #[error("read-only file system")]
    ReadOnly,
    /// A change the files cannot take even when writable: the tree mirrors the store, an
    /// array's size is its shape's, a `.npy` header is fixed (EPERM).
    #[error("operation not permitted")]
    NotPermitted,
    /// A write past the end of the file: files never grow (EFBIG).
    #[error("file too large")]
    TooBig,
    /// No extended attribute of that name (ENODATA).
    #[error("no such attribute")]
    NoData,
    /// A chunk could not be read, decoded or stored, or the request failed inside (EIO).
    #[error("input/output error{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Io(#[source] Option<ChunkError>),
}

impl From<ChunkError> for FsError {
    fn from(e: ChunkError) -> Self {
        FsError::Io(Some(e))
    }
}
