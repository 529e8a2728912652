//! `zarrfs umount MOUNTPOINT`: the unmount that works for the caller — umount2(2) as root,
//! `fusermount3 -u` otherwise — for zarrfs mounts only, with one line saying why when it cannot.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mount::{self, FS_TYPE};
use crate::text::{io_reason, one_line};

/// Unmount the zarrfs mount at `mountpoint`. While files on it are open this fails, unless
/// `lazy`: then the mount point is detached at once and the daemon ends when they are closed.
pub fn umount(mountpoint: &Path, lazy: bool) -> Result<(), String> {
    let name = mountpoint.display();
    let abs = absolute(mountpoint).map_err(|e| format!("{name}: {}", io_reason(&e)))?;
    match mount::mount_entry(&abs) {
        None => return Err(format!("{name}: not a mount point")),
        Some(entry) if entry.fs_type != FS_TYPE => {
            return Err(format!("{name}: not a zarrfs mount (it is {})", entry.fs_type))
        }
        Some(_) => {}
    }
    let busy = || format!("{name}: busy: files on it are still open (close them, or use --lazy to detach it now)");
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } == 0 {
        let result = if lazy { mount::unmount(&abs) } else { mount::unmount_now(&abs) };
        return result.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => busy(),
            _ => format!("{name}: cannot unmount: {e}"),
        });
    }
    // fusermount3 says "Device or resource busy" in its own words only.
    let is_busy = |message: &str| message.to_lowercase().contains("busy");
    let result = match fusermount_unmount(&abs, false) {
        Err(message) if is_busy(&message) && lazy => fusermount_unmount(&abs, true),
        result => result,
    };
    result.map_err(|message| if is_busy(&message) { busy() } else { format!("{name}: cannot unmount: {message}") })
}

/// `fusermount3 -u [-z] MOUNTPOINT`; its complaint, made one line, on failure.
fn fusermount_unmount(mountpoint: &Path, lazy: bool) -> Result<(), String> {
    let mut command = Command::new("fusermount3");
    command.arg("-u");
    if lazy {
        command.arg("-z");
    }
    let output = command.arg(mountpoint).stdin(Stdio::null()).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "fusermount3 not found (install fuse3)".to_string(),
        _ => format!("fusermount3: {e}"),
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(one_line(&String::from_utf8_lossy(&output.stderr)))
}

/// `mountpoint` made absolute without looking at the mount itself: a mount whose daemon died
/// answers every lookup with ENOTCONN, and it is exactly the one a user needs to unmount.
fn absolute(mountpoint: &Path) -> std::io::Result<PathBuf> {
    match (mountpoint.parent(), mountpoint.file_name()) {
        (Some(parent), Some(file)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            Ok(std::fs::canonicalize(parent)?.join(file))
        }
        _ => std::fs::canonicalize(mountpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_paths_resolve_the_parent_only() {
        let here = std::env::current_dir().unwrap().canonicalize().unwrap();
        assert_eq!(absolute(Path::new("mnt")).unwrap(), here.join("mnt"));
        assert_eq!(absolute(Path::new("/tmp/../tmp/x/")).unwrap(), Path::new("/tmp").canonicalize().unwrap().join("x"));
        assert_eq!(absolute(Path::new("/")).unwrap(), Path::new("/"));
    }
}
