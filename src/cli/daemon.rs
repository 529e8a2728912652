//! The daemon behind `zarrfs mount`: the command re-runs itself in the foreground, detached in
//! its own session, and waits on a pipe until the mount is live; the daemon then lets go of
//! the terminal. Also the signals that end a daemon (SIGINT, SIGTERM, SIGHUP), and
//! `exit_with_parent`: the end of the process that ran `zarrfs mount` ends the mount like SIGTERM.
//!
//! Process plumbing only: what is served is [`super::serve`]'s business.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

/// Run this same command again in the foreground, detached in its own session, and wait until
/// it reports the mount live (exit 0) or exits with its error (already printed on our stderr,
/// which it shares until it is live). With `watch_parent`, the daemon is handed a pidfd of the
/// process that ran this command, which it watches after this command has exited.
pub fn spawn_daemon(watch_parent: bool) -> Result<(), String> {
    let parent = if watch_parent { Some(open_parent_pidfd()?) } else { None };
    let parent_fd = parent.as_ref().map(|fd| fd.as_raw_fd());
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot create a pipe: {}", std::io::Error::last_os_error()));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut args = super::normalized_args();
    args.remove(0);
    args.extend(["--foreground".into(), "--ready-fd".into(), write_fd.to_string().into()]);
    if let Some(fd) = parent_fd {
        args.extend(["--parent-pidfd".into(), fd.to_string().into()]);
    }
    let mut command = std::process::Command::new(exe);
    command.args(args).stdin(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            // Until it reports the mount live, the daemon ends with this command (Ctrl-C on a
            // slow mount must not leave a daemon that mounts later); see `detach`.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            for fd in std::iter::once(write_fd).chain(parent_fd) {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    // SAFETY: both fds are ours; the child holds its own copy of the write end.
    unsafe { libc::close(write_fd) };
    drop(parent);
    let mut child = spawned.map_err(|e| format!("cannot start the daemon: {e}"))?;
    let mut report = String::new();
    // SAFETY: read_fd is an open fd we own; File takes ownership and closes it.
    let _ = unsafe { std::fs::File::from_raw_fd(read_fd) }.read_to_string(&mut report);
    if report.starts_with("ready") {
        return Ok(());
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    // The daemon printed its own error; exit with its status without adding a second line.
    std::process::exit(status.code().unwrap_or(1).max(1));
}

/// The file a detached daemon writes its log to: `--log-file`, or nowhere.
pub fn open_log_target(log_file: Option<&str>) -> Result<std::fs::File, String> {
    match log_file {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("log file {path}: {}", crate::text::io_reason(&e))),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(|e| format!("/dev/null: {e}")),
    }
}

/// The mount is live: tell the waiting parent, then let go of its terminal.
pub fn detach(ready_fd: RawFd, target: std::fs::File) {
    // From now on the daemon outlives the command that started it.
    // SAFETY: prctl with a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    // SAFETY: the fd was handed to us by the parent for exactly this.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(ready_fd) };
    let _ = pipe.write_all(b"ready\n");
    drop(pipe);
    // SAFETY: duplicating a valid fd onto the standard ones.
    unsafe {
        libc::dup2(target.as_raw_fd(), 1);
        libc::dup2(target.as_raw_fd(), 2);
    }
}

/// A pidfd of our parent: the process that ran `zarrfs mount`. A pidfd rather than a pid,
/// because the daemon outlives this command and a pid could be reused by then.
pub fn open_parent_pidfd() -> Result<OwnedFd, String> {
    // SAFETY: trivial getter.
    let parent = unsafe { libc::getppid() };
    // SAFETY: pidfd_open(2) takes a pid and flags; the fd it returns is owned below.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) };
    if raw < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("exit_with_parent: cannot watch process {parent}: {e}"));
    }
    // SAFETY: a fresh fd from pidfd_open (close-on-exec, as pidfd_open makes them).
    let fd = unsafe { OwnedFd::from_raw_fd(raw as RawFd) };
    // Had the parent ended before pidfd_open, we would have been reparented and `parent` might
    // name another process by now.
    // SAFETY: trivial getter.
    if unsafe { libc::getppid() } != parent {
        return Err("exit_with_parent: the process that ran zarrfs mount has already exited".into());
    }
    Ok(fd)
}

/// Once the process behind `pidfd` has ended, send ourselves SIGTERM: the mount ends exactly as
/// it does for `kill` (unmount, lazily if files are still open, then store and exit).
pub fn exit_with(pidfd: OwnedFd) -> Result<(), String> {
    std::thread::Builder::new()
        .name("zarrfs-parent".into())
        .spawn(move || {
            let mut poll = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // A pidfd turns readable when its process has exited.
            // SAFETY: one valid pollfd; no timeout.
            while unsafe { libc::poll(&mut poll, 1, -1) } < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::error!("exit_with_parent: cannot wait for the parent process: {e}");
                    return;
                }
            }
            log::info!("the process that ran zarrfs mount has exited; ending the mount");
            // SAFETY: a signal to ourselves, taken by the signal thread (blocked everywhere else).
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        })
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Signals that end a mount; blocked in every thread and taken by one waiting thread.
fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigset operations on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block the termination signals in this thread. Call it before any thread exists, so that
/// every thread inherits the mask and only [`watch_signals`]' thread takes them.
pub fn block_termination_signals() -> libc::sigset_t {
    let signals = termination_signals();
    // SAFETY: setting this thread's mask with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    signals
}

/// The mount point once the mount exists; a signal locks it, so holding the lock while mounting
/// makes a signal wait for the mount and then undo it.
pub type Mounted = Arc<Mutex<Option<PathBuf>>>;

/// Take SIGINT/SIGTERM/SIGHUP on a thread of their own. Before the mount exists there is nothing
/// to undo, and the process ends at once (opening a remote store can take minutes of retries);
/// after, it unmounts, which ends the session.
pub fn watch_signals(signals: libc::sigset_t, store: String) -> Result<Mounted, String> {
    let mounted: Mounted = Arc::default();
    let watched = mounted.clone();
    std::thread::Builder::new()
        .name("zarrfs-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: waiting on the blocked set.
            unsafe { libc::sigwait(&signals, &mut sig) };
            match watched.lock().as_ref() {
                Some(mp) => {
                    log::info!("signal {sig}: unmounting {}", mp.display());
                    if let Err(e) = crate::mount::unmount(mp) {
                        log::error!("unmount {}: {e}", mp.display());
                    }
                }
                None => {
                    eprintln!("zarrfs: {store}: stopped by signal {sig} before the mount was made");
                    std::process::exit(1);
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(mounted)
}
