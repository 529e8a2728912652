//! The `zarrfs` command: its arguments (clap) and dispatch to [`zarrfs::cli`], where the
//! commands, the mount settings and the daemon live.

#![deny(clippy::undocumented_unsafe_blocks)]

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use zarrfs::cli::options::{FlagArgs, MountSettings};
use zarrfs::cli::{create, daemon, info, normalized_args, serve, stats, umount};

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
    /// Show the live counters of a mount: decodes, cache hits and misses, bytes served, cache use.
    Stats {
        mountpoint: PathBuf,
        /// Print the counters as JSON (one line per sample with --watch).
        #[arg(long)]
        json: bool,
        /// Refresh every second, with rates since the previous sample.
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after N samples.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Unmount a zarrfs mount (umount2 as root, fusermount3 -u otherwise).
    Umount {
        mountpoint: PathBuf,
        /// If files are still open, detach the mount now; the daemon ends when they are closed.
        #[arg(short = 'l', long)]
        lazy: bool,
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
    /// Internal: a pidfd of the process that ran `zarrfs mount` (`exit_with_parent`).
    #[arg(long, hide = true)]
    parent_pidfd: Option<RawFd>,
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
            info::info(&store, json)
        }
        Command::Mount(args) => mount(&args),
        Command::Stats { mountpoint, json, watch, count } => {
            stats::stats(&mountpoint, stats::StatsOptions { json, watch, count })
        }
        Command::Umount { mountpoint, lazy } => umount::umount(&mountpoint, lazy),
        Command::Create(args) => {
            let spec = zarrfs::create::NewArray {
                shape: args.shape,
                chunks: args.chunks,
                dtype: args.dtype,
                codec: args.codec,
                fill: args.fill,
                zarr_format: args.zarr_format,
            };
            create::create(&args.target, &spec)
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

/// `zarrfs mount`: start the daemon and wait for it, or (`-f`, and in the daemon) serve.
fn mount(args: &MountArgs) -> Result<(), String> {
    let settings =
        MountSettings::from_command_line(&args.options, &args.flags, args.foreground).map_err(|e| e.to_string())?;
    if !settings.foreground {
        return daemon::spawn_daemon(settings.exit_with_parent);
    }
    serve::serve(&args.store, &args.mountpoint, &settings, args.ready_fd, args.parent_pidfd)
}
