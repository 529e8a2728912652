//! The `zarrfs` command: arguments, logging, the daemon, signals.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use serde_json::json;

use zarrfs::cli::options::{FlagArgs, MountSettings};
use zarrfs::fs::{FsOptions, ZarrFs};
use zarrfs::fuse::FuseAdapter;
use zarrfs::mount;
use zarrfs::source::Store;
use zarrfs::units::{human, size_arg};

#[derive(Parser)]
#[command(name = "zarrfs", version, about = "Mount Zarr arrays as flat, memory-mappable files")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount STORE at MOUNTPOINT (read-only). Returns once the mount is live.
    Mount(MountArgs),
    /// Create an empty array (and the groups on its path) in a local store:
    /// `zarrfs create data.zarr/grp/temp --shape 1000,2000 --chunks 256,256 --dtype f4`.
    Create(CreateArgs),
    /// Describe the arrays of STORE.
    Info {
        store: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    /// STORE[/PATH]: the store is the path up to and including the first component ending in
    /// `.zarr` (or the whole path, for a root array); the rest is the array's path in it.
    target: PathBuf,
    /// Array shape, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    shape: Vec<u64>,
    /// Chunk shape, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    chunks: Vec<u64>,
    /// Element type, numpy style: u1 i2 i4 i8 f2 f4 f8 c8 c16 bool.
    #[arg(long)]
    dtype: String,
    /// zstd[:LEVEL], blosc[:LEVEL], gzip[:LEVEL] or none.
    #[arg(long, default_value = "zstd")]
    codec: String,
    /// Fill value: what never-written chunks read as.
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    fill: String,
    #[arg(long, default_value_t = 3)]
    zarr_format: u8,
}

/// Split `data.zarr/grp/temp` into the store and the array path within it.
fn split_target(target: &Path) -> (PathBuf, String) {
    let components: Vec<_> = target.components().collect();
    match components.iter().position(|c| c.as_os_str().to_string_lossy().ends_with(".zarr")) {
        Some(i) => {
            let store: PathBuf = components[..=i].iter().collect();
            let rest: PathBuf = components[i + 1..].iter().collect();
            (store, format!("/{}", rest.display()))
        }
        None => (target.to_path_buf(), "/".into()),
    }
}

#[derive(clap::Args)]
struct MountArgs {
    store: PathBuf,
    mountpoint: PathBuf,
    /// Stay in the foreground and log to stderr (RUST_LOG sets the level; default: zarrfs at info).
    #[arg(short, long)]
    foreground: bool,
    /// Mount options, comma-separated: cache_size=SIZE, threads=N, decode_threads=N,
    /// allow_other, log_file=PATH, readahead_kb=N, and generic flags (nodev, noatime, ...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The flags of the settings table (`--cache-size`, `--threads`, ...), each parsed like
    /// its `-o` form.
    #[command(flatten)]
    flags: FlagArgs,
    /// Internal: the pipe on which a detached daemon reports that the mount is live.
    #[arg(long, hide = true)]
    ready_fd: Option<RawFd>,
}

/// `mount -t fuse.zarrfs` runs `zarrfs STORE MOUNTPOINT -o OPTS`: no subcommand. Treat any
/// first argument that is not a subcommand or a flag as the start of a mount.
fn normalized_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        let known = ["mount", "info", "create", "help"];
        if !known.contains(&first) && !first.starts_with('-') {
            args.insert(1, "mount".into());
        }
    }
    args
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalized_args()) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // The TLS verifier logs each rejected certificate; the error zarrfs reports says it once.
    let default_filter = "warn,zarrfs=info,rustls_platform_verifier=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter)).init();
    let result = match cli.command {
        Command::Info { store, json } => {
            // Like other Unix filters: `zarrfs info | head` ends quietly when the reader goes.
            // SAFETY: restoring the default disposition of SIGPIPE.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            info(&store, json)
        }
        Command::Mount(args) => mount(&args),
        Command::Create(args) => {
            let (store, path) = split_target(&args.target);
            let spec = zarrfs::source::zarr::NewArray {
                shape: args.shape,
                chunks: args.chunks,
                dtype: args.dtype,
                codec: args.codec,
                fill: args.fill,
                zarr_format: args.zarr_format,
            };
            zarrfs::source::zarr::create_array(&store, &path, &spec)
                .map_err(|e| format!("{}: {e}", args.target.display()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("zarrfs: {message}");
            ExitCode::FAILURE
        }
    }
}

fn info(store_path: &Path, as_json: bool) -> Result<(), String> {
    let store = match zarrfs::storage::remote::url_of(store_path) {
        Some(url) => zarrfs::storage::remote::open_url(url, &Default::default(), false),
        None => Store::open(store_path),
    }
    .map_err(|e| e.to_string())?;
    let rows: Vec<_> = store
        .arrays
        .iter()
        .map(|a| {
            let i = &a.info;
            let nbytes = i.shape.iter().product::<u64>() * i.itemsize;
            let stored = store.stored_bytes(&i.path);
            (i, nbytes, stored)
        })
        .collect();
    if as_json {
        let arrays: Vec<_> = rows
            .iter()
            .map(|(i, nbytes, stored)| {
                json!({"path": i.path, "dtype": i.dtype, "shape": i.shape, "chunks": i.chunks,
                       "decode_chunks": i.decode_chunk_shape, "codecs": i.codecs,
                       "fill_value": i.fill_value, "nbytes": nbytes, "stored_bytes": stored,
                       "format": i.format.to_string(), "zarr_format": i.format.zarr_version()})
            })
            .collect();
        let skipped: Vec<_> = store.skipped.iter().map(|s| json!({"path": s.path, "reason": s.reason})).collect();
        let doc = json!({"store": store_path, "format": store.format.to_string(), "zarr_format": store.format.zarr_version(), "arrays": arrays, "skipped": skipped});
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON values serialise"));
        return Ok(());
    }
    println!("{} ({})", store_path.display(), store.format);
    println!("{:<28} {:<6} {:<20} {:<16} {:>12} {:>12}  codecs", "path", "dtype", "shape", "chunks", "size", "stored");
    for (i, nbytes, stored) in &rows {
        println!(
            "{:<28} {:<6} {:<20} {:<16} {:>12} {:>12}  {}",
            i.path,
            i.dtype,
            format!("{:?}", i.shape),
            format!("{:?}", i.chunks),
            human(*nbytes),
            stored.map_or("-".into(), human),
            codec_names(&i.codecs)
        );
    }
    for s in &store.skipped {
        println!("{:<28} skipped: {}", s.path, s.reason);
    }
    Ok(())
}

/// The codec names of a metadata codecs document, e.g. "bytes, zstd".
fn codec_names(codecs: &serde_json::Value) -> String {
    let mut names = Vec::new();
    fn walk(v: &serde_json::Value, names: &mut Vec<String>) {
        match v {
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, names)),
            serde_json::Value::Object(map) => {
                if let Some(n) = map.get("name").or_else(|| map.get("id")).and_then(|n| n.as_str()) {
                    names.push(n.to_string());
                }
                for (k, v) in map {
                    if k == "compressor" || k == "filters" || k == "configuration" || k == "codecs" {
                        walk(v, names);
                    }
                }
            }
            _ => {}
        }
    }
    walk(codecs, &mut names);
    names.join(", ")
}

fn mount(args: &MountArgs) -> Result<(), String> {
    let settings =
        MountSettings::from_command_line(&args.options, &args.flags, args.foreground).map_err(|e| e.to_string())?;
    if !settings.foreground {
        return spawn_daemon();
    }
    serve(&args.store, &args.mountpoint, &settings, args.ready_fd)
}

/// Run this same command again in the foreground, detached in its own session, and wait until
/// it reports the mount live (exit 0) or exits with its error (already printed on our stderr,
/// which it shares until it is live).
fn spawn_daemon() -> Result<(), String> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot create a pipe: {}", std::io::Error::last_os_error()));
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut args = normalized_args();
    args.remove(0);
    args.extend(["--foreground".into(), "--ready-fd".into(), write_fd.to_string().into()]);
    let mut command = std::process::Command::new(exe);
    command.args(args).stdin(std::process::Stdio::null());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            libc::setsid();
            // Until it reports the mount live, the daemon ends with this command (Ctrl-C on a
            // slow mount must not leave a daemon that mounts later); see `detach`.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::fcntl(write_fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = command.spawn();
    // SAFETY: both fds are ours; the child holds its own copy of the write end.
    unsafe { libc::close(write_fd) };
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

fn serve(
    store_path: &Path,
    mountpoint: &Path,
    settings: &MountSettings,
    ready_fd: Option<RawFd>,
) -> Result<(), String> {
    // Where a detached daemon's output goes, opened before anything is mounted: a log file
    // that cannot be opened fails the mount command, not the daemon after it said "ready".
    let log_target = match ready_fd {
        Some(_) => Some(open_log_target(settings.log_file.as_deref())?),
        None => None,
    };
    // Before any thread exists, so that every thread inherits the mask.
    let signals = termination_signals();
    // SAFETY: setting this thread's mask with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

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

    // SIGINT/SIGTERM/SIGHUP: before the mount exists there is nothing to undo, and the process
    // ends at once (opening a remote store can take minutes of retries); after, it unmounts.
    let mounted: Arc<std::sync::Mutex<Option<PathBuf>>> = Arc::default();
    {
        let mounted = mounted.clone();
        let store = store_path.display().to_string();
        std::thread::Builder::new()
            .name("zarrfs-signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: waiting on the blocked set.
                unsafe { libc::sigwait(&signals, &mut sig) };
                match mounted.lock().unwrap().as_ref() {
                    Some(mp) => {
                        log::info!("signal {sig}: unmounting {}", mp.display());
                        if let Err(e) = mount::unmount(mp) {
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
    }

    let store = match zarrfs::storage::remote::url_of(store_path) {
        Some(url) => zarrfs::storage::remote::open_url(url, &settings.remote, settings.read_write),
        None => Store::open_local(store_path, settings.read_write),
    }
    .map_err(|e| e.to_string())?;
    let mountpoint = mount::check_mountpoint(mountpoint)?;
    let store_abs = std::fs::canonicalize(store_path).unwrap_or_else(|_| store_path.to_path_buf());
    let root_name = root_array_name(&store_abs);
    let options = FsOptions {
        cache_bytes: settings.cache_bytes,
        decode_threads: settings.decode_threads_for(zarrfs::storage::remote::url_of(store_path).is_some()),
        // SAFETY: trivial libc getters.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        writable: settings.read_write,
    };
    let fs = Arc::new(
        ZarrFs::new(store.groups, store.arrays, &root_name, options)
            .map_err(|e| format!("{}: {e}", store_path.display()))?,
    );
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
        let mut at = mounted.lock().unwrap(); // a signal now waits for the mount, then undoes it
        let session = start_session(adapter, &store_abs, &mountpoint, settings)?;
        *at = Some(mountpoint.clone());
        session
    };
    mount::set_readahead(&mountpoint, settings.readahead_kb);
    if settings.read_write {
        fs.spawn_writeback(std::time::Duration::from_secs(settings.writeback_secs));
        fs.set_invalidator(zarrfs::fuse::invalidator(session.notifier()));
    }
    if let Some(fd) = ready_fd {
        detach(fd, log_target.expect("opened when there is a ready fd"));
    }
    log::info!("mounted {} at {}", store_path.display(), mountpoint.display());
    if settings.read_write && zarrfs::storage::remote::url_of(store_path).is_none() {
        // A writer killed mid-write leaves its temporary chunk file behind; clear them off the
        // serving path, since a big store takes a while to walk.
        let root = store_path.to_path_buf();
        let _ = std::thread::Builder::new().name("zarrfs-sweep".into()).spawn(move || {
            zarrfs::source::zarr::remove_dead_temp_files(&root);
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

/// The file a detached daemon writes its log to: `--log-file`, or nowhere.
fn open_log_target(log_file: Option<&str>) -> Result<std::fs::File, String> {
    match log_file {
        Some(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("log file {path}: {}", zarrfs::source::zarr::io_reason(&e))),
        None => std::fs::OpenOptions::new().write(true).open("/dev/null").map_err(|e| format!("/dev/null: {e}")),
    }
}

/// The mount is live: tell the waiting parent, then let go of its terminal.
fn detach(ready_fd: RawFd, target: std::fs::File) {
    // From now on the daemon outlives the command that started it.
    // SAFETY: prctl with a plain integer argument.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    // SAFETY: the fd was handed to us by the parent for exactly this.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(ready_fd) };
    let _ = pipe.write_all(b"ready\n");
    drop(pipe);
    use std::os::fd::AsRawFd;
    // SAFETY: duplicating a valid fd onto the standard ones.
    unsafe {
        libc::dup2(target.as_raw_fd(), 1);
        libc::dup2(target.as_raw_fd(), 2);
    }
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
