//! The tree: inodes, lookup, readdir, getattr, extended attributes, statfs.
//!
//! Built once by [`ZarrFs::new`](super::ZarrFs::new) and never changed: groups are directories,
//! each array contributes one file per [`FileView`](super::FileView). An inode number is its
//! index in the node table (index 0 unused); a file node names its array and view, so every
//! per-file question (size, xattrs) is answered from the view's data.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use super::{FileView, FsError, Ino, MountedArray, ZarrFs, ROOT_INO, STATS_XATTR};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    File,
}

/// The attributes of a node, as `stat` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
}

/// `statfs` figures: a read-only filesystem whose size is the sum of its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub block_size: u32,
    pub blocks: u64,
    pub files: u64,
    pub name_len: u32,
}

#[derive(Debug)]
pub(crate) enum NodeKind {
    Dir {
        children: BTreeMap<OsString, Ino>,
        group: Option<usize>,
    },
    /// View number `view` of array number `array`.
    File {
        array: usize,
        view: usize,
    },
}

#[derive(Debug)]
pub(crate) struct Node {
    pub parent: Ino,
    pub kind: NodeKind,
    pub mtime: SystemTime,
}

/// The node table of an empty tree: the unused index 0, and the root directory.
pub(super) fn initial_nodes(root_mtime: SystemTime) -> Vec<Node> {
    let dir = || NodeKind::Dir { children: BTreeMap::new(), group: None };
    vec![
        Node { parent: 0, kind: dir(), mtime: SystemTime::UNIX_EPOCH },
        Node { parent: ROOT_INO, kind: dir(), mtime: root_mtime },
    ]
}

fn file_perm(a: &MountedArray) -> u16 {
    if a.writer.is_some() {
        0o644
    } else {
        0o444
    }
}

impl ZarrFs {
    /// The directory inode for a hierarchy path, creating it and its ancestors as needed.
    pub(super) fn dir_for(&mut self, path: &str, mtime: SystemTime) -> Ino {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let existing = match &self.nodes[ino as usize].kind {
                NodeKind::Dir { children, .. } => children.get(OsStr::new(part)).copied(),
                _ => None,
            };
            ino = match existing {
                Some(child) => child,
                None => self
                    .add_node(ino, part, NodeKind::Dir { children: BTreeMap::new(), group: None }, mtime)
                    .expect("a new directory name is free"),
            };
        }
        ino
    }

    pub(super) fn add_node(
        &mut self,
        parent: Ino,
        name: &str,
        kind: NodeKind,
        mtime: SystemTime,
    ) -> Result<Ino, String> {
        let ino = self.nodes.len() as Ino;
        let NodeKind::Dir { children, .. } = &mut self.nodes[parent as usize].kind else {
            return Err(format!("{name}: parent is not a directory"));
        };
        if children.contains_key(OsStr::new(name)) {
            return Err(format!("two entries would be named {name:?}"));
        }
        children.insert(name.into(), ino);
        self.nodes.push(Node { parent, kind, mtime });
        Ok(ino)
    }

    pub(super) fn node(&self, ino: Ino) -> Result<&Node, FsError> {
        match self.nodes.get(ino as usize) {
            Some(node) if ino != 0 => Ok(node),
            _ => Err(FsError::NotFound),
        }
    }

    /// The array and view behind a file inode; a directory is [`FsError::IsDir`].
    pub(super) fn file(&self, ino: Ino) -> Result<(usize, &MountedArray, &FileView), FsError> {
        match self.node(ino)?.kind {
            NodeKind::File { array, view } => {
                let a = &self.arrays[array];
                Ok((array, a, &a.views[view]))
            }
            NodeKind::Dir { .. } => Err(FsError::IsDir),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, FsError> {
        let node = self.node(ino)?;
        let (kind, size, perm, nlink) = match &node.kind {
            NodeKind::Dir { children, .. } => {
                let subdirs =
                    children.values().filter(|c| matches!(self.nodes[**c as usize].kind, NodeKind::Dir { .. })).count()
                        as u32;
                let perm = if self.options.writable { 0o755 } else { 0o555 };
                (FileKind::Directory, 0, perm, 2 + subdirs)
            }
            NodeKind::File { array, view } => {
                let a = &self.arrays[*array];
                (FileKind::File, a.views[*view].size(), file_perm(a), 1)
            }
        };
        Ok(Attr { ino, kind, size, perm, nlink, uid: self.options.uid, gid: self.options.gid, mtime: node.mtime })
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, FsError> {
        match &self.node(parent)?.kind {
            NodeKind::Dir { children, .. } => self.getattr(*children.get(name).ok_or(FsError::NotFound)?),
            _ => Err(FsError::NotDir),
        }
    }

    /// Entries of a directory, "." and ".." first.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(Ino, FileKind, OsString)>, FsError> {
        let node = self.node(ino)?;
        let NodeKind::Dir { children, .. } = &node.kind else { return Err(FsError::NotDir) };
        let mut entries = vec![(ino, FileKind::Directory, ".".into()), (node.parent, FileKind::Directory, "..".into())];
        for (name, child) in children {
            let kind = match self.nodes[*child as usize].kind {
                NodeKind::Dir { .. } => FileKind::Directory,
                _ => FileKind::File,
            };
            entries.push((*child, kind, name.clone()));
        }
        Ok(entries)
    }

    pub fn statfs(&self) -> StatFs {
        let bytes: u64 = (1..self.nodes.len() as Ino).filter_map(|i| self.getattr(i).ok()).map(|a| a.size).sum();
        StatFs { block_size: 4096, blocks: bytes.div_ceil(4096), files: self.nodes.len() as u64 - 1, name_len: 255 }
    }

    /// Names of the extended attributes of a node.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<String>, FsError> {
        let mut names: Vec<String> = self.xattrs(ino)?.into_iter().map(|(k, _)| k).collect();
        names.sort();
        Ok(names)
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let name = name.to_str().ok_or(FsError::NoData)?;
        self.xattrs(ino)?.into_iter().find(|(k, _)| k == name).map(|(_, v)| v.into_bytes()).ok_or(FsError::NoData)
    }

    /// Arrays describe themselves (shape, dtype, ...) and each view adds its own; groups carry
    /// their attributes; the root also carries the live counters, which is how a filesystem can
    /// expose them without inventing files that might collide with array names.
    fn xattrs(&self, ino: Ino) -> Result<Vec<(String, String)>, FsError> {
        let node = self.node(ino)?;
        let mut out = Vec::new();
        match &node.kind {
            NodeKind::File { array, view } => {
                let a = &self.arrays[*array];
                out.extend(a.info.xattrs.iter().cloned());
                out.extend(a.views[*view].xattrs.iter().cloned());
            }
            NodeKind::Dir { group, .. } => {
                if let Some(g) = group {
                    out.extend(self.groups[*g].xattrs.iter().cloned());
                }
                if ino == ROOT_INO {
                    out.push((STATS_XATTR.into(), self.stats_json().to_string()));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{file, mount};
    use super::*;

    #[test]
    fn tree_attributes_and_xattrs() {
        let (fs, _) = mount([30, 20], [8, 8], 1 << 20);
        let names: Vec<_> =
            fs.readdir(fs.lookup(ROOT_INO, OsStr::new("grp")).unwrap().ino).unwrap().into_iter().map(|e| e.2).collect();
        assert_eq!(names, [".", "..", "a", "a.npy"]);
        let a = fs.getattr(file(&fs, "a")).unwrap();
        assert_eq!((a.size, a.perm), (30 * 20 * 2, 0o444));
        let npy = fs.getattr(file(&fs, "a.npy")).unwrap();
        assert_eq!(npy.size % 64, (30 * 20 * 2) % 64);
        assert_eq!(fs.getxattr(file(&fs, "a"), OsStr::new("user.zarr.shape")).unwrap(), b"[30,20]");
        assert!(matches!(fs.getxattr(file(&fs, "a"), OsStr::new("user.zarr.nope")), Err(FsError::NoData)));
        assert!(matches!(fs.getxattr(file(&fs, "a"), OsStr::new("user.npy.data_offset")), Err(FsError::NoData)));
        assert!(fs.getxattr(file(&fs, "a.npy"), OsStr::new("user.npy.data_offset")).is_ok());
        assert!(matches!(fs.open(file(&fs, "a"), true), Err(FsError::ReadOnly)));
        assert!(matches!(fs.lookup(ROOT_INO, OsStr::new("missing")), Err(FsError::NotFound)));
        assert!(matches!(fs.lookup(file(&fs, "a"), OsStr::new("x")), Err(FsError::NotDir)));
        assert!(matches!(fs.readdir(file(&fs, "a")), Err(FsError::NotDir)));
        assert!(matches!(fs.getattr(0), Err(FsError::NotFound)));
    }
}
