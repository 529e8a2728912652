//! One mount session, in the daemon (or `zarrfs mount -f`): open the store, build the
//! filesystem, mount it, serve requests until the unmount, store what was written.
//!
//! The two seams to the rest of the crate are one function each: [`open_store`] (which source
//! opens a STORE argument) and [`build_fs`] (how settings become a [`ZarrFs`]).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use super::daemon;
use super::options::MountSettings;
use crate::fs::{FsOptions, Pools, ZarrFs};
use crate::fuse::FuseAdapter;
use crate::mount;
use crate::source::{OpenConfig, Store};
use crate::storage::remote::RemoteSettings;
use crate::units::{human, size_arg};

/// Open the store a STORE argument names: a URL (s3://, http(s)://) or a local directory.
pub fn open_store(store_path: &Path, remote: &RemoteSettings, writable: bool) -> Result<Store, String> {
    let config = OpenConfig { writable, remote: remote.clone() };
    crate::source::open(store_path, &config).map_err(|e| e.to_string())
}

/// The filesystem serving `store`, with the cache and decode threads the settings ask for.
fn build_fs(store: Store, store_path: &Path, root_name: &str, settings: &MountSettings) -> Result<Arc<ZarrFs>, String> {
    let options = FsOptions {
        cache_bytes: settings.cache_bytes,
        decode_threads: settings.decode_threads_for(crate::storage::remote::url_of(store_path).is_some()),
        // SAFETY: trivial libc getters.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        writable: settings.read_write,
    };
    // Both failures name the store, as they did when ZarrFs::new also built the pools.
    let named = |e: String| format!("{}: {e}", store_path.display());
    let pools = Pools::new(options.decode_threads, options.writable).map_err(named)?;
    Ok(Arc::new(ZarrFs::new(store.groups, store.arrays, root_name, options, pools).map_err(named)?))
}

/// Mount `store_path` at `mountpoint` and serve it until it is unmounted. With `ready_fd` this
/// is the detached daemon: it reports on that pipe once the mount is live, then detaches.
/// `parent_pidfd` is the process to end with (`exit_with_parent`), as the command that started
/// the daemon found it; in the foreground it is our parent.
pub fn serve(
    store_path: &Path,
    mountpoint: &Path,
    settings: &MountSettings,
    ready_fd: Option<RawFd>,
    parent_pidfd: Option<RawFd>,
) -> Result<(), String> {
    // Where a detached daemon's output goes, opened before anything is mounted: a log file
    // that cannot be opened fails the mount command, not the daemon after it said "ready".
    let log_target = match ready_fd {
        Some(_) => Some(daemon::open_log_target(settings.log_file.as_deref())?),
        None => None,
    };
    // Before any thread exists, so that every thread inherits the mask.
    let signals = daemon::block_termination_signals();

    // Decoded chunks are large buffers, allocated and freed all the time. Served from the heap
    // they are reused without page faults (a scan of fast-to-decode data is bound by those
    // faults otherwise); one arena keeps freed buffers from piling up per thread, which is what
    // holds the daemon's memory near the cache budget. A fixed threshold also stops glibc from
    // moving it on its own.
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }

    let mounted = daemon::watch_signals(signals, store_path.display().to_string())?;
    let parent = match parent_pidfd {
        // SAFETY: the fd was handed to us by the command that started us, for exactly this.
        Some(fd) => Some(unsafe { OwnedFd::from_raw_fd(fd) }),
        None if settings.exit_with_parent => Some(daemon::open_parent_pidfd()?),
        None => None,
    };
    if let Some(pidfd) = parent {
        daemon::exit_with(pidfd)?;
    }

    let store = open_store(store_path, &settings.remote, settings.read_write)?;
    let mountpoint = mount::check_mountpoint(mountpoint)?;
    let store_abs = std::fs::canonicalize(store_path).unwrap_or_else(|_| store_path.to_path_buf());
    let root_name = root_array_name(&store_abs);
    let fs = build_fs(store, store_path, &root_name, settings)?;
    for (path, needed) in fs.stripes_exceeding_cache() {
        eprintln!(
            "zarrfs: warning: {}: array {path}: one row of chunks needs {} but the cache holds {}; \
             row-major scans will decode chunks more than once (use --cache-size {} or more)",
            store_path.display(),
            human(needed),
            human(settings.cache_bytes),
            size_arg(needed)
        );
    }

    let adapter = FuseAdapter { fs: fs.clone() };
    let session = {
        let mut at = mounted.lock(); // a signal now waits for the mount, then undoes it
        let session = start_session(adapter, &store_abs, &mountpoint, settings)?;
        *at = Some(mountpoint.clone());
        session
    };
    mount::set_readahead(&mountpoint, settings.readahead_kb);
    if settings.read_write {
        fs.spawn_writeback(std::time::Duration::from_secs(settings.writeback_secs));
        fs.set_invalidator(crate::fuse::invalidator(session.notifier()));
    }
    if let Some(fd) = ready_fd {
        daemon::detach(fd, log_target.expect("opened when there is a ready fd"));
    }
    log::info!("mounted {} at {}", store_path.display(), mountpoint.display());
    if settings.read_write && crate::storage::remote::url_of(store_path).is_none() {
        // A writer killed mid-write leaves its temporary chunk file behind; clear them off the
        // serving path, since a big store takes a while to walk.
        let root = store_path.to_path_buf();
        let _ = std::thread::Builder::new().name("zarrfs-sweep".into()).spawn(move || {
            crate::storage::local::remove_dead_temp_files(&root);
        });
    }
    // Returns when the kernel ends the connection: after any unmount, ours or the user's.
    let result = session.run();
    if fs.flush_file(None).is_err() {
        log::error!("some written chunks could not be stored");
    }
    log::info!("unmounted {}; counters: {}", mountpoint.display(), fs.stats_json());
    result.map_err(|e| format!("{}: {e}", mountpoint.display()))
}

/// Mount and complete the FUSE handshake. As root we mount `fuse.zarrfs` ourselves (see
/// [`mount`]); otherwise fuser goes through `fusermount3`.
fn start_session(
    adapter: FuseAdapter,
    store_abs: &Path,
    mountpoint: &Path,
    settings: &MountSettings,
) -> Result<fuser::Session<FuseAdapter>, String> {
    let cannot = |e: std::io::Error| format!("{}: cannot mount: {e}", mountpoint.display());
    let mut config = fuser::Config::default();
    config.n_threads = Some(settings.threads);
    config.clone_fd = true;
    if settings.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } == 0 {
        let flags = mount::mount_flags(!settings.read_write, &settings.passthrough);
        let fd = mount::mount_fuse(&store_abs.display().to_string(), mountpoint, flags, settings.allow_other)
            .map_err(cannot)?;
        return fuser::Session::from_fd(adapter, fd, config.acl, config).map_err(|e| {
            let _ = mount::unmount(mountpoint);
            cannot(e)
        });
    }
    use fuser::MountOption as O;
    let access = if settings.read_write { O::RW } else { O::RO };
    let mut options =
        vec![O::FSName(store_abs.display().to_string()), O::Subtype("zarrfs".into()), access, O::DefaultPermissions];
    for flag in &settings.passthrough {
        options.push(match flag.as_str() {
            "dev" => O::Dev,
            "nodev" => O::NoDev,
            "suid" => O::Suid,
            "nosuid" => O::NoSuid,
            "exec" => O::Exec,
            "noexec" => O::NoExec,
            "atime" => O::Atime,
            "noatime" => O::NoAtime,
            "sync" => O::Sync,
            "async" => O::Async,
            "dirsync" => O::DirSync,
            _ => continue, // the finer access-time flags: fusermount3 takes none of them
        });
    }
    if settings.allow_other {
        options.push(O::CUSTOM("allow_other".into()));
    }
    config.mount_options = options;
    fuser::Session::new(adapter, mountpoint, &config).map_err(cannot)
}

/// Files of a store whose root is an array are named after the store: `temp.zarr` → `temp`.
fn root_array_name(store_abs: &Path) -> String {
    let base = store_abs.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = base.strip_suffix(".zarr").unwrap_or(base);
    if name.is_empty() {
        "array".into()
    } else {
        name.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_array_names() {
        assert_eq!(root_array_name(Path::new("/d/temp.zarr")), "temp");
        assert_eq!(root_array_name(Path::new("/d/plain")), "plain");
        assert_eq!(root_array_name(Path::new("/d/.zarr")), "array");
    }
}
