//! The `zarrfs` command, below its argument definitions (which stay in `main.rs`): settings,
//! the commands, and the daemon that serves a mount.
//!
//! - [`options`]: the table of mount settings, parsed the same from flags and `-o` strings;
//! - [`daemon`]: starting the detached daemon, its ready pipe, and the signals that end it;
//! - [`serve`]: one mount session, from opening the store to the unmount;
//! - [`info`]: the `info` command's table and JSON;
//! - [`create`]: the `create` command's STORE/PATH argument;
//! - [`stats`]: the `stats` command, a mount's live counters;
//! - [`umount`]: the `umount` command.
//!
//! Kernel mount plumbing (mount(2), `/proc/self/mountinfo`, readahead) stays in
//! [`crate::mount`]: it knows nothing of the command line.

pub mod create;
pub mod daemon;
pub mod info;
pub mod options;
pub mod serve;
pub mod stats;
pub mod umount;

use std::ffi::OsString;

/// The command line, with `mount` put in front when it has no subcommand: `mount -t
/// fuse.zarrfs` runs `zarrfs STORE MOUNTPOINT -o OPTS`. Any first argument that is not a
/// subcommand or a flag is taken as the start of a mount. The daemon re-runs exactly this.
pub fn normalized_args() -> Vec<OsString> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    if let Some(first) = args.get(1).and_then(|a| a.to_str()) {
        let known = ["mount", "info", "create", "stats", "umount", "help"];
        if !known.contains(&first) && !first.starts_with('-') {
            args.insert(1, "mount".into());
        }
    }
    args
}
