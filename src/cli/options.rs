//! Mount settings from the command line and from `-o` option strings (which is how
//! `mount -t fuse.zarrfs` and `/etc/fstab` pass them). Pure parsing, unit-tested.

use crate::units::parse_size;

/// Settings of one mount, after flags and `-o` options are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSettings {
    pub cache_bytes: u64,
    /// FUSE request threads.
    pub threads: usize,
    /// Chunk decode threads; `None` picks by store (see [`MountSettings::decode_threads_for`]).
    pub decode_threads: Option<usize>,
    pub allow_other: bool,
    pub foreground: bool,
    /// `-o rw`: writes go to the store.
    pub read_write: bool,
    /// How often dirty chunks are written back on a writable mount.
    pub writeback_secs: u64,
    pub log_file: Option<String>,
    /// Kernel readahead for the mount, in KiB (the bdi's read_ahead_kb).
    pub readahead_kb: u32,
    /// Generic VFS flags for the kernel mount (nodev, noexec, noatime, ...), in order given.
    pub passthrough: Vec<String>,
    /// Remote stores: request timeout and retries, disk cache.
    pub remote: crate::storage::remote::RemoteSettings,
}

pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            cache_bytes: DEFAULT_CACHE_BYTES,
            threads: 4,
            decode_threads: None,
            allow_other: false,
            foreground: false,
            read_write: false,
            writeback_secs: 5,
            log_file: None,
            readahead_kb: 4096,
            passthrough: Vec::new(),
            remote: Default::default(),
        }
    }
}

/// Decode threads for remote stores when not set: each decode first waits for its chunk to
/// arrive, so many more fetches than cores must be in flight to hide network latency.
pub const REMOTE_DECODE_THREADS: usize = 16;

impl MountSettings {
    /// The decode threads to run: as set, else one per core (local) or [`REMOTE_DECODE_THREADS`].
    pub fn decode_threads_for(&self, remote: bool) -> usize {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        self.decode_threads.unwrap_or(if remote { REMOTE_DECODE_THREADS.max(cores) } else { cores })
    }
}

/// Options mount(8) or mount.fuse3 may add that mean nothing to us.
const IGNORED: &[&str] = &["defaults", "auto", "noauto", "user", "users", "nouser", "_netdev", "nofail"];

/// Apply a comma-separated `-o` string on top of `settings`.
pub fn apply_options(settings: &mut MountSettings, opts: &str) -> Result<(), String> {
    for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        fn need<'a>(key: &str, v: Option<&'a str>) -> Result<&'a str, String> {
            v.ok_or_else(|| format!("option {key} needs a value ({key}=...)"))
        }
        let number = |v: Option<&str>| -> Result<usize, String> {
            let v = need(key, v)?;
            v.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("option {key}: {v:?} is not a positive number"))
        };
        match key {
            "cache_size" => settings.cache_bytes = parse_size(need(key, value)?).map_err(|e| e.to_string())?,
            "threads" => settings.threads = number(value)?,
            "decode_threads" => settings.decode_threads = Some(number(value)?),
            "readahead_kb" => settings.readahead_kb = number(value)? as u32,
            "allow_other" => settings.allow_other = true,
            "log_file" => settings.log_file = Some(need(key, value)?.to_string()),
            k if crate::storage::remote::RemoteSettings::is_option(k) => settings.remote.apply_option(k, value)?,
            "rw" => settings.read_write = true,
            "ro" => settings.read_write = false,
            "writeback_secs" => settings.writeback_secs = number(value)? as u64,
            k if k.starts_with("x-") || IGNORED.contains(&k) => {}
            k if crate::mount::is_vfs_flag(k) => settings.passthrough.push(k.to_string()),
            _ => return Err(format!("unknown mount option {opt:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings() {
        let mut s = MountSettings::default();
        apply_options(&mut s, "ro,cache_size=2G,threads=8,nodev,noatime,x-systemd.automount,allow_other").unwrap();
        assert_eq!(s.cache_bytes, 2 << 30);
        assert_eq!(s.threads, 8);
        assert!(s.allow_other);
        assert_eq!(s.passthrough, vec!["nodev", "noatime"]);
        assert!(apply_options(&mut s, "cache_size").unwrap_err().contains("cache_size"));
        assert!(apply_options(&mut s, "threads=0").is_err());
        assert!(apply_options(&mut s, "frobnicate").unwrap_err().contains("frobnicate"));
        apply_options(&mut s, "rw,writeback_secs=2").unwrap();
        assert!(s.read_write);
        assert_eq!(s.writeback_secs, 2);
        apply_options(&mut s, "ro").unwrap();
        assert!(!s.read_write);
    }
}
