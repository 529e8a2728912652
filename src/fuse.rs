//! fuser glue: FUSE requests in, [`ZarrFs`] calls, replies or errno out. Nothing else lives here;
//! [`errno`] is the one place a [`FsError`] becomes an errno.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use std::path::Path;
use std::time::SystemTime;

use fuser::{
    BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fs::{Attr, FileKind, FsError, ZarrFs};

/// The tree never changes while mounted, so the kernel may cache names and attributes for long.
const TTL: Duration = Duration::from_secs(3600);

/// Kernel readahead asked for at INIT: fuser lets the kernel cap it (128 KiB here); the mount
/// command raises the bdi's read_ahead_kb afterwards.
const MAX_READAHEAD: u32 = 1 << 20;

pub struct FuseAdapter {
    pub fs: Arc<ZarrFs>,
}

/// The errno a failed call answers with.
pub fn errno(e: &FsError) -> Errno {
    Errno::from_i32(match e {
        FsError::NotFound => libc::ENOENT,
        FsError::NotDir => libc::ENOTDIR,
        FsError::IsDir => libc::EISDIR,
        FsError::ReadOnly => libc::EROFS,
        FsError::NotPermitted => libc::EPERM,
        FsError::TooBig => libc::EFBIG,
        FsError::NoData => libc::ENODATA,
        FsError::Io(_) => libc::EIO,
    })
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        // Large reads are cheap for us and expensive per request; tools size buffers from this.
        blksize: 1 << 20,
        flags: 0,
    }
}

fn file_type(k: FileKind) -> FileType {
    match k {
        FileKind::Directory => FileType::Directory,
        FileKind::File => FileType::RegularFile,
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(cap) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(cap);
        }
        // More background requests in flight let large readahead keep several decodes going.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        // Read-only: keep the page cache across opens — contents never change while mounted,
        // and that cache is what lets a second reader (any process) skip the daemon entirely.
        // Writable: an array's files (views) are separate page caches, so each open starts fresh
        // (writes also invalidate the other views' pages, for readers that have it open).
        let flags = if self.fs.writable() { FopenFlags::empty() } else { FopenFlags::FOPEN_KEEP_CACHE };
        match self.fs.open(ino.0, write) {
            Ok(fh) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let result = guarded("read", || {
            self.fs.read_with(ino.0, Some(fh.0), offset, size, |bytes| {
                if let Some(reply) = reply.take() {
                    reply.data(bytes);
                }
            })
        });
        if let (Err(e), Some(reply)) = (result, reply.take()) {
            reply.error(errno(&e));
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn destroy(&mut self) {
        // Unmounting: whatever is still dirty goes to the store now.
        if self.fs.flush_file(None).is_err() {
            log::error!("some written chunks could not be stored at unmount");
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match guarded("write", || self.fs.write(ino.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Called at every close(2): written chunks are stored before close returns.
    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        empty_reply(guarded("flush", || self.fs.flush_file(Some(ino.0))), reply);
    }

    /// fsync/fdatasync, and msync(MS_SYNC) (which `np.memmap.flush()` uses) after the kernel
    /// has written the dirty pages to us.
    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty_reply(guarded("fsync", || self.fs.flush_file(Some(ino.0))), reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Ownership and modes mirror the store; times are not stored. Size is the array's.
        let result = match (mode, uid, gid, size) {
            (Some(_), _, _, _) | (_, Some(_), _, _) | (_, _, Some(_), _) => Err(self.fs.tree_change_error()),
            (_, _, _, Some(size)) => self.fs.set_size(ino.0, size),
            _ => self.fs.getattr(ino.0),
        };
        match result {
            Ok(a) => reply.attr(&TTL, &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _target: &Path, reply: ReplyEntry) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(&self.fs.tree_change_error()));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Directory => reply.opened(FileHandle(0), FopenFlags::FOPEN_CACHE_DIR),
            Ok(_) => reply.error(errno(&FsError::NotDir)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(ino.0) {
            Ok(entries) => {
                for (i, (child, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*child), (i + 1) as u64, file_type(*kind), name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(s.blocks, 0, 0, s.files, 0, s.block_size, s.name_len, s.block_size);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name) {
            Ok(value) => xattr_reply(&value, size, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(n.as_bytes());
                    buf.push(0);
                }
                xattr_reply(&buf, size, reply)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// Run a request's work so that a bug that panics fails that request with EIO instead of
/// taking a request thread (and eventually the mount) down with it.
fn guarded<T>(op: &str, work: impl FnOnce() -> Result<T, FsError>) -> Result<T, FsError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|_| {
        log::error!("{op}: internal error (panic); answered EIO");
        Err(FsError::Io(None))
    })
}

fn empty_reply(result: Result<(), FsError>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How long a write waits for the other views' stale pages to be dropped.
const INVALIDATION_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Page-cache invalidation for writable mounts. The write that asks for it waits until it is
/// done, so that once the write returns no process reads the old bytes through another view.
/// It is sent from a thread of its own, and the wait is bounded: the kernel may need to wait for
/// pages locked by reads that request threads (perhaps all of them waiting here) must serve.
pub fn invalidator(notifier: fuser::Notifier) -> crate::fs::Invalidator {
    type Job = (u64, u64, u64, std::sync::mpsc::Sender<()>);
    let (send, receive) = std::sync::mpsc::channel::<Job>();
    let _ = std::thread::Builder::new().name("zarrfs-inval".into()).spawn(move || {
        for (ino, offset, len, done) in receive {
            // ENOENT: the kernel has no pages of that file cached, nothing to do.
            let _ = notifier.inval_inode(INodeNo(ino), offset as i64, len as i64);
            let _ = done.send(());
        }
    });
    let send = parking_lot::Mutex::new(send);
    Box::new(move |ino, offset, len| {
        let (done, finished) = std::sync::mpsc::channel();
        if send.lock().send((ino, offset, len, done)).is_ok() {
            let _ = finished.recv_timeout(INVALIDATION_WAIT);
        }
    })
}

/// The xattr protocol: size 0 asks for the length, a too-small buffer is ERANGE.
fn xattr_reply(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
