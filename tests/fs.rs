//! The filesystem driven without FUSE over a real local Zarr v3 store: the tree, attributes,
//! reads, writes stored back and read through a fresh mount, and the errors callers see.

use std::ffi::{OsStr, OsString};
use std::path::Path;

use zarrfs::create::{create_array, NewArray};
use zarrfs::fs::{FileKind, FsError, FsOptions, Ino, Pools, ZarrFs, ROOT_INO};
use zarrfs::source::OpenConfig;

const SHAPE: [u64; 2] = [30, 20];
const FILL: u16 = 7;

/// A store holding one zstd-compressed `<u2` array `/a` of shape 30x20 in 8x8 chunks, fill 7.
fn store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = NewArray {
        shape: SHAPE.to_vec(),
        chunks: vec![8, 8],
        dtype: "<u2".into(),
        codec: "zstd".into(),
        fill: FILL.to_string(),
        zarr_format: 3,
    };
    create_array(dir.path(), "/a", &spec).unwrap();
    dir
}

fn mount(path: &Path, writable: bool) -> ZarrFs {
    let config = OpenConfig { writable, ..Default::default() };
    let store = zarrfs::source::open(path, &config).unwrap();
    let options = FsOptions { cache_bytes: 1 << 20, decode_threads: 2, uid: 1, gid: 2, writable };
    let pools = Pools::new(options.decode_threads, writable).unwrap();
    ZarrFs::new(store.groups, store.arrays, "root", options, pools).unwrap()
}

fn ino(fs: &ZarrFs, name: &str) -> Ino {
    fs.lookup(ROOT_INO, OsStr::new(name)).unwrap().ino
}

fn read(fs: &ZarrFs, ino: Ino, offset: u64, size: u32) -> Vec<u8> {
    fs.read_with(ino, None, offset, size, |b| b.to_vec()).unwrap()
}

fn data_offset(fs: &ZarrFs) -> u64 {
    let v = fs.getxattr(ino(fs, "a.npy"), OsStr::new("user.npy.data_offset")).unwrap();
    String::from_utf8(v).unwrap().parse().unwrap()
}

const SIZE: u64 = SHAPE[0] * SHAPE[1] * 2;

#[test]
fn tree_attributes_and_fill_reads() {
    let dir = store();
    let fs = mount(dir.path(), false);
    let entries = fs.readdir(ROOT_INO).unwrap();
    let names: Vec<OsString> = entries.iter().map(|e| e.2.clone()).collect();
    assert_eq!(names, [".", "..", "a", "a.npy"]);
    assert!(entries[2..].iter().all(|e| e.1 == FileKind::File));

    let (a, npy) = (fs.getattr(ino(&fs, "a")).unwrap(), fs.getattr(ino(&fs, "a.npy")).unwrap());
    assert_eq!((a.size, a.perm, a.uid, a.gid), (SIZE, 0o444, 1, 2));
    let header = data_offset(&fs);
    assert_eq!(header % 64, 0);
    assert_eq!(npy.size, header + SIZE);
    assert_eq!(fs.getxattr(a.ino, OsStr::new("user.zarr.shape")).unwrap(), b"[30,20]");

    let fill: Vec<u8> = std::iter::repeat_n(FILL.to_ne_bytes(), SIZE as usize / 2).flatten().collect();
    for (offset, len) in [(0, 2), (1, 3), (15, 300), (SIZE - 1, 10), (0, 1 << 16)] {
        let end = (offset + len as u64).min(SIZE) as usize;
        assert_eq!(read(&fs, a.ino, offset, len), &fill[offset as usize..end], "offset {offset} len {len}");
    }
    assert!(read(&fs, a.ino, SIZE, 10).is_empty(), "past the end");
    let whole = read(&fs, npy.ino, 0, 1 << 16);
    assert_eq!(&whole[..6], b"\x93NUMPY");
    assert_eq!(&whole[header as usize..], &fill[..]);
}

#[test]
fn errors() {
    let dir = store();
    let fs = mount(dir.path(), false);
    let a = ino(&fs, "a");
    assert!(matches!(fs.lookup(ROOT_INO, OsStr::new("nope")), Err(FsError::NotFound)));
    assert!(matches!(fs.lookup(a, OsStr::new("x")), Err(FsError::NotDir)));
    assert!(matches!(fs.readdir(a), Err(FsError::NotDir)));
    assert!(matches!(fs.open(ROOT_INO, false), Err(FsError::IsDir)));
    assert!(matches!(fs.open(a, true), Err(FsError::ReadOnly)));
    assert!(matches!(fs.write(a, 0, &[1, 2]), Err(FsError::ReadOnly)));
    assert!(matches!(fs.set_size(a, 0), Err(FsError::ReadOnly)));
    assert!(matches!(fs.tree_change_error(), FsError::ReadOnly));
    assert!(matches!(fs.getxattr(a, OsStr::new("user.nope")), Err(FsError::NoData)));

    let fs = mount(dir.path(), true);
    let a = ino(&fs, "a");
    assert!(matches!(fs.write(a, SIZE - 1, &[1, 2]), Err(FsError::TooBig)));
    assert!(matches!(fs.set_size(a, SIZE + 2), Err(FsError::NotPermitted)));
    assert!(matches!(fs.tree_change_error(), FsError::NotPermitted));
    assert!(matches!(fs.write(ino(&fs, "a.npy"), 0, b"nope"), Err(FsError::NotPermitted)));
}

/// Corrupt chunk bytes are an I/O error carrying the chunk's error.
#[test]
fn a_corrupt_chunk_is_an_io_error() {
    let dir = store();
    std::fs::create_dir_all(dir.path().join("a/c/0")).unwrap();
    std::fs::write(dir.path().join("a/c/0/0"), b"not zstd at all").unwrap();
    let fs = mount(dir.path(), false);
    let got = fs.read_with(ino(&fs, "a"), None, 0, 2, |b| b.to_vec());
    assert!(matches!(got, Err(FsError::Io(Some(_)))), "{got:?}");
    assert_eq!(read(&fs, ino(&fs, "a"), SIZE - 2, 2), FILL.to_ne_bytes(), "other chunks still read");
}

#[test]
fn writes_are_stored_and_read_back_through_a_new_mount() {
    let dir = store();
    let mut expected: Vec<u8> = std::iter::repeat_n(FILL.to_ne_bytes(), SIZE as usize / 2).flatten().collect();
    {
        let fs = mount(dir.path(), true);
        let (a, npy) = (ino(&fs, "a"), ino(&fs, "a.npy"));
        assert_eq!(fs.getattr(a).unwrap().perm, 0o644);
        let header = data_offset(&fs);
        // Across chunk boundaries in both axes, through either file.
        let first: Vec<u8> = (0..100u8).collect();
        assert_eq!(fs.write(a, 10, &first).unwrap(), 100);
        expected[10..110].copy_from_slice(&first);
        let second: Vec<u8> = (0..50u8).map(|i| 200 - i).collect();
        assert_eq!(fs.write(npy, header + 600, &second).unwrap(), 50);
        expected[600..650].copy_from_slice(&second);
        assert_eq!(read(&fs, a, 0, SIZE as u32), expected, "dirty bytes are read at once");
        assert_eq!(read(&fs, npy, header, SIZE as u32), expected, "through the other view too");
        fs.flush_file(Some(a)).unwrap();
    }
    let fs = mount(dir.path(), false);
    assert_eq!(read(&fs, ino(&fs, "a"), 0, SIZE as u32), expected);
    let header = data_offset(&fs);
    assert_eq!(read(&fs, ino(&fs, "a.npy"), header + 600, 50), &expected[600..650]);
}
