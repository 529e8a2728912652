//! Kernel mount plumbing: checking a mount point, mounting `/dev/fuse` as `fuse.zarrfs`,
//! reading `/proc/self/mountinfo`, tuning readahead, unmounting.
//!
//! As root we call mount(2) ourselves rather than let fuser do it, because fuser always mounts
//! as type `fuse`: with our own call the mount shows up as `fuse.zarrfs` with the store as its
//! source, which is what `mount`, `findmnt -t fuse.zarrfs` and `/etc/fstab` users expect.
//! Unprivileged users go through fuser and `fusermount3`.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub const FS_TYPE: &str = "fuse.zarrfs";

/// VFS flags a user may set with `-o`, and the MS_* bit each sets or clears.
const FLAGS: &[(&str, libc::c_ulong, bool)] = &[
    ("nosuid", libc::MS_NOSUID, true),
    ("suid", libc::MS_NOSUID, false),
    ("nodev", libc::MS_NODEV, true),
    ("dev", libc::MS_NODEV, false),
    ("noexec", libc::MS_NOEXEC, true),
    ("exec", libc::MS_NOEXEC, false),
    ("noatime", libc::MS_NOATIME, true),
    ("atime", libc::MS_NOATIME, false),
    ("sync", libc::MS_SYNCHRONOUS, true),
    ("async", libc::MS_SYNCHRONOUS, false),
    ("dirsync", libc::MS_DIRSYNC, true),
    ("relatime", libc::MS_RELATIME, true),
    ("norelatime", libc::MS_RELATIME, false),
    ("strictatime", libc::MS_STRICTATIME, true),
    ("nodiratime", libc::MS_NODIRATIME, true),
    ("diratime", libc::MS_NODIRATIME, false),
    ("lazytime", libc::MS_LAZYTIME, true),
    ("nolazytime", libc::MS_LAZYTIME, false),
];

/// Names of the VFS flags `-o` accepts.
pub fn is_vfs_flag(name: &str) -> bool {
    FLAGS.iter().any(|(n, _, _)| *n == name)
}

/// mount(2) flags: nosuid and nodev unless the user says otherwise, then the user's flags in
/// order (a later flag wins, as with mount(8)).
pub fn mount_flags(read_only: bool, user_flags: &[String]) -> libc::c_ulong {
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    for f in user_flags {
        if let Some((_, bit, set)) = FLAGS.iter().find(|(n, _, _)| n == f) {
            if *set {
                flags |= bit;
            } else {
                flags &= !bit;
            }
        }
    }
    flags
}

/// Mount a new FUSE connection at `mountpoint` as `fuse.zarrfs`; returns the `/dev/fuse` fd to
/// serve. Needs CAP_SYS_ADMIN.
pub fn mount_fuse(source: &str, mountpoint: &Path, flags: libc::c_ulong, allow_other: bool) -> io::Result<OwnedFd> {
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let dev = CString::new("/dev/fuse").expect("no NUL");
    // SAFETY: open(2) with a valid path; the fd is owned below.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: trivial getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={raw},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions");
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"));
    let (source, target, fstype, data) =
        (c(source.as_bytes())?, c(mountpoint.as_os_str().as_bytes())?, c(FS_TYPE.as_bytes())?, c(data.as_bytes())?);
    // SAFETY: all pointers are valid C strings for the duration of the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Unmount; when busy (a process still has a file open), detach now and let the kernel finish
/// when the last user goes.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    match unmount_now(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            log::warn!("{}: busy; detaching lazily", mountpoint.display());
            umount2(mountpoint, libc::MNT_DETACH)
        }
        result => result,
    }
}

/// Unmount at once, or fail with EBUSY while files are open (needs CAP_SYS_ADMIN).
pub fn unmount_now(mountpoint: &Path) -> io::Result<()> {
    umount2(mountpoint, 0)
}

fn umount2(mountpoint: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(target.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A mount point must exist, be a directory and not already carry a mount. Returns it absolute.
pub fn check_mountpoint(mountpoint: &Path) -> Result<PathBuf, String> {
    let name = mountpoint.display();
    let meta = std::fs::metadata(mountpoint).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("mount point {name}: no such directory"),
        _ => format!("mount point {name}: {e}"),
    })?;
    if !meta.is_dir() {
        return Err(format!("mount point {name}: not a directory"));
    }
    let abs = std::fs::canonicalize(mountpoint).map_err(|e| format!("mount point {name}: {e}"))?;
    if mount_device(&abs).is_some() {
        return Err(format!("mount point {name}: already a mount point (unmount it first)"));
    }
    Ok(abs)
}

/// The device (major, minor) of the mount at exactly `mountpoint`, from /proc/self/mountinfo
/// (never `stat`, which would ask our own not-yet-serving filesystem and deadlock).
pub fn mount_device(mountpoint: &Path) -> Option<(u32, u32)> {
    mount_entry(mountpoint).map(|m| m.device)
}

/// The mount at exactly `mountpoint`, as /proc/self/mountinfo lists it (the last one wins when
/// mounts are stacked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// (major, minor)
    pub device: (u32, u32),
    /// e.g. `fuse.zarrfs` ([`FS_TYPE`]), for a mount made by mount(2) or by fusermount3.
    pub fs_type: String,
}

pub fn mount_entry(mountpoint: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    text.lines().rev().find_map(|line| parse_mountinfo_line(line).filter(|(at, _)| at == want).map(|(_, e)| e))
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the mount point (5th
/// field) and, after the optional fields ended by `-`, the filesystem type.
fn parse_mountinfo_line(line: &str) -> Option<(String, MountEntry)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let device = (major.parse().ok()?, minor.parse().ok()?);
    let separator = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let fs_type = fields.get(separator + 1)?.to_string();
    Some((unescape_mountinfo(fields.get(4)?), MountEntry { device, fs_type }))
}

/// mountinfo escapes space, tab, newline and backslash as octal `\NNN`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, b| v.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// FUSE caps readahead at 128 KiB at INIT; the mount's bdi takes a larger value afterwards,
/// which lets a sequential scan keep several chunk decodes in flight.
pub fn set_readahead(mountpoint: &Path, kb: u32) {
    let Some((major, minor)) = mount_device(mountpoint) else { return };
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, kb.to_string()) {
        log::debug!("{path}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let line =
            r"61 30 0:52 / /tmp/my\040mnt ro,nosuid,nodev,relatime shared:33 - fuse.zarrfs /d/a.zarr ro,user_id=0";
        let (at, entry) = parse_mountinfo_line(line).unwrap();
        assert_eq!(at, "/tmp/my mnt");
        assert_eq!(entry, MountEntry { device: (0, 52), fs_type: FS_TYPE.into() });
        let no_optional = "25 1 8:1 / / rw - ext4 /dev/sda1 rw";
        assert_eq!(parse_mountinfo_line(no_optional).unwrap().1.fs_type, "ext4");
        assert!(parse_mountinfo_line("garbage").is_none());
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040data"), "/mnt/my data");
        assert_eq!(unescape_mountinfo(r"/a\134b"), r"/a\b");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }

    #[test]
    fn flags_default_to_nosuid_nodev_and_user_flags_win() {
        let f = mount_flags(true, &[]);
        assert_eq!(
            f & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY
        );
        let f = mount_flags(false, &["dev".into(), "suid".into(), "noatime".into()]);
        assert_eq!(f & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY), 0);
        assert_ne!(f & libc::MS_NOATIME, 0);
        let f = mount_flags(true, &["relatime".into(), "nodiratime".into()]); // an fstab line's usual flags
        assert_eq!(f & (libc::MS_RELATIME | libc::MS_NODIRATIME), libc::MS_RELATIME | libc::MS_NODIRATIME);
    }
}
