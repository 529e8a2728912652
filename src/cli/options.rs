//! Mount settings from the command line and from `-o` option strings (which is how
//! `mount -t fuse.zarrfs` and `/etc/fstab` pass them). Pure parsing, unit-tested.
//!
//! [`SETTINGS`] is the one table of what a mount can be told: each entry has its `-o` name, its
//! `--flag` spelling if it has one, and one function that parses the value and stores it. Both
//! routes go through that function ([`apply_options`] for `-o`, [`FlagArgs`] for the clap
//! flags it generates), so a flag and its `-o` form accept and refuse exactly the same values.
//! Units come from [`crate::units`]; each component keeps its own config struct
//! ([`RemoteSettings`] in storage, `FsOptions` in fs) and this module only fills them in.

use std::path::PathBuf;

use crate::storage::remote::RemoteSettings;
use crate::units::{parse_duration, parse_size, UnitError};

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
    pub remote: RemoteSettings,
    /// Unmount when the process that ran `zarrfs mount` ends (the Python package's mounts).
    pub exit_with_parent: bool,
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
            exit_with_parent: false,
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

    /// The settings of `zarrfs mount`: the `-o` strings in order, then the flags (a flag wins
    /// over the `-o` form of the same setting, whatever their order on the line).
    pub fn from_command_line(options: &[String], flags: &FlagArgs, foreground: bool) -> Result<Self, SettingsError> {
        let mut settings = MountSettings::default();
        for o in options {
            apply_options(&mut settings, o)?;
        }
        flags.apply(&mut settings)?;
        settings.foreground |= foreground;
        Ok(settings)
    }
}

/// A setting that cannot be applied. Each message is one line, printed after `zarrfs: `; `key`
/// is the setting as the user spelled it (`threads` in `-o`, `--threads` as a flag).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("option {key} needs a value ({key}=...)")]
    NeedsValue { key: String },
    #[error("option {key}: {value:?} is not a positive number")]
    NotPositive { key: String, value: String },
    #[error("option {key}: {value:?} is not a number")]
    NotANumber { key: String, value: String },
    #[error("option {key}: {source}")]
    Duration { key: String, source: UnitError },
    /// The size message quotes the value, which is enough to find it; it never named the option.
    #[error(transparent)]
    Size(UnitError),
    #[error("unknown mount option {0:?}")]
    Unknown(String),
}

/// How a setting is spelled as a flag of `zarrfs mount`.
#[derive(Debug, Clone, Copy)]
pub struct Flag {
    /// `--long`, without the dashes.
    pub long: &'static str,
    pub alias: Option<&'static str>,
    /// The value's name in `--help`; `None` for a switch, which takes no value.
    pub value_name: Option<&'static str>,
    pub help: &'static str,
}

/// One setting: its `-o` name, its flag, and how its value is parsed and stored.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub option: &'static str,
    pub flag: Option<Flag>,
    /// Parse the value (with the `Value` parsers, which make the messages) and store it.
    apply: fn(&mut MountSettings, Value) -> Result<(), SettingsError>,
}

/// The value given for a setting: `None` for a switch, or `-o key` without `=value`.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    key: &'a str,
    text: Option<&'a str>,
}

impl<'a> Value<'a> {
    fn required(self) -> Result<&'a str, SettingsError> {
        self.text.ok_or_else(|| SettingsError::NeedsValue { key: self.key.into() })
    }

    /// Remote settings take an empty value as none at all.
    fn non_empty(self) -> Result<&'a str, SettingsError> {
        self.text.filter(|v| !v.is_empty()).ok_or_else(|| SettingsError::NeedsValue { key: self.key.into() })
    }

    /// Thread counts and periods: zero would mean a mount that never serves or never stores.
    fn positive(self) -> Result<usize, SettingsError> {
        let v = self.required()?;
        v.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| SettingsError::NotPositive { key: self.key.into(), value: v.into() })
    }

    fn count(self) -> Result<usize, SettingsError> {
        let v = self.non_empty()?;
        v.parse().map_err(|_| SettingsError::NotANumber { key: self.key.into(), value: v.into() })
    }

    fn size(self) -> Result<u64, SettingsError> {
        parse_size(self.required()?).map_err(SettingsError::Size)
    }

    fn duration(self) -> Result<std::time::Duration, SettingsError> {
        parse_duration(self.non_empty()?).map_err(|source| SettingsError::Duration { key: self.key.into(), source })
    }
}

const fn flag(long: &'static str, value_name: &'static str, help: &'static str) -> Option<Flag> {
    Some(Flag { long, alias: None, value_name: Some(value_name), help })
}

const fn switch(long: &'static str, alias: Option<&'static str>, help: &'static str) -> Option<Flag> {
    Some(Flag { long, alias, value_name: None, help })
}

/// Every setting of a mount. Flags appear in `zarrfs mount --help` in this order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        option: "cache_size",
        flag: flag("cache-size", "SIZE", "Byte budget of the decoded-chunk cache, e.g. 512M or 2G [default: 1G]"),
        apply: |s, v| {
            s.cache_bytes = v.size()?;
            Ok(())
        },
    },
    Setting {
        option: "threads",
        flag: flag("threads", "THREADS", "FUSE request threads [default: 4]"),
        apply: |s, v| {
            s.threads = v.positive()?;
            Ok(())
        },
    },
    Setting {
        option: "decode_threads",
        flag: flag(
            "decode-threads",
            "DECODE_THREADS",
            "Chunk decoding threads [default: number of cores; 16 for remote stores]",
        ),
        apply: |s, v| {
            s.decode_threads = Some(v.positive()?);
            Ok(())
        },
    },
    Setting {
        option: "allow_other",
        flag: switch("allow-other", None, "Let other users read the mount"),
        apply: |s, _| {
            s.allow_other = true;
            Ok(())
        },
    },
    Setting {
        option: "rw",
        flag: switch(
            "read-write",
            Some("rw"),
            "Allow writes (same as -o rw): written chunks are re-encoded and stored",
        ),
        apply: |s, _| {
            s.read_write = true;
            Ok(())
        },
    },
    Setting {
        option: "writeback_secs",
        flag: flag(
            "writeback-secs",
            "SECONDS",
            "On a writable mount, store dirty chunks at least this often [default: 5]",
        ),
        apply: |s, v| {
            s.writeback_secs = v.positive()? as u64;
            Ok(())
        },
    },
    Setting {
        option: "log_file",
        flag: flag("log-file", "PATH", "Where the daemon logs (default: nowhere once detached)"),
        apply: |s, v| {
            s.log_file = Some(v.required()?.to_string());
            Ok(())
        },
    },
    Setting {
        option: "disk_cache",
        flag: flag(
            "disk-cache",
            "DIR",
            "Remote stores: keep fetched chunks in this directory (shared by mounts, kept across them)",
        ),
        apply: |s, v| {
            s.remote.disk_cache = Some(PathBuf::from(v.non_empty()?));
            Ok(())
        },
    },
    Setting {
        option: "disk_cache_size",
        flag: flag("disk-cache-size", "SIZE", "Bound of the --disk-cache directory, e.g. 10G [default: 10G]"),
        apply: |s, v| {
            s.remote.disk_cache_bytes = parse_size(v.non_empty()?).map_err(SettingsError::Size)?;
            Ok(())
        },
    },
    Setting {
        option: "exit_with_parent",
        flag: switch(
            "exit-with-parent",
            None,
            "Unmount when the process that ran `zarrfs mount` exits, even if it is killed",
        ),
        apply: |s, _| {
            s.exit_with_parent = true;
            Ok(())
        },
    },
    Setting {
        option: "readahead_kb",
        flag: None,
        apply: |s, v| {
            s.readahead_kb = v.positive()? as u32;
            Ok(())
        },
    },
    Setting {
        option: "ro",
        flag: None,
        apply: |s, _| {
            s.read_write = false;
            Ok(())
        },
    },
    Setting {
        option: "remote_timeout",
        flag: None,
        apply: |s, v| {
            s.remote.timeout = v.duration()?;
            Ok(())
        },
    },
    Setting {
        option: "remote_retries",
        flag: None,
        apply: |s, v| {
            s.remote.retries = v.count()?;
            Ok(())
        },
    },
];

/// Options mount(8) or mount.fuse3 may add that mean nothing to us.
const IGNORED: &[&str] = &["defaults", "auto", "noauto", "user", "users", "nouser", "_netdev", "nofail"];

/// Apply a comma-separated `-o` string on top of `settings`.
pub fn apply_options(settings: &mut MountSettings, opts: &str) -> Result<(), SettingsError> {
    for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (key, text) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        if let Some(setting) = SETTINGS.iter().find(|s| s.option == key) {
            (setting.apply)(settings, Value { key, text })?;
        } else if key.starts_with("x-") || IGNORED.contains(&key) {
        } else if crate::mount::is_vfs_flag(key) {
            settings.passthrough.push(key.to_string());
        } else {
            return Err(SettingsError::Unknown(opt.to_string()));
        }
    }
    Ok(())
}

/// The flags of `zarrfs mount` that [`SETTINGS`] defines, as clap parsed them (flatten it into
/// a clap derive struct). Values stay text until [`FlagArgs::apply`], so that the table's
/// parser, not clap's, decides what a flag accepts.
#[derive(Debug, Clone, Default)]
pub struct FlagArgs {
    /// `(option name, value)` of each flag given, in table order; `None` for a switch.
    given: Vec<(&'static str, Option<String>)>,
}

impl FlagArgs {
    /// Apply the flags given on top of `settings`, in table order.
    pub fn apply(&self, settings: &mut MountSettings) -> Result<(), SettingsError> {
        for (option, text) in &self.given {
            let setting = SETTINGS.iter().find(|s| s.option == *option).expect("flags come from the table");
            let flag = setting.flag.expect("only settings with a flag are given as flags");
            let key = format!("--{}", flag.long);
            (setting.apply)(settings, Value { key: &key, text: text.as_deref() })?;
        }
        Ok(())
    }
}

impl clap::FromArgMatches for FlagArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut given = Vec::new();
        for setting in SETTINGS {
            match setting.flag {
                Some(Flag { value_name: Some(_), .. }) => {
                    if let Some(text) = matches.get_one::<String>(setting.option) {
                        given.push((setting.option, Some(text.clone())));
                    }
                }
                Some(Flag { value_name: None, .. }) if matches.get_flag(setting.option) => {
                    given.push((setting.option, None));
                }
                _ => {}
            }
        }
        Ok(FlagArgs { given })
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for FlagArgs {
    fn augment_args(command: clap::Command) -> clap::Command {
        SETTINGS.iter().fold(command, |command, setting| {
            let Some(flag) = setting.flag else { return command };
            let arg = clap::Arg::new(setting.option).long(flag.long).help(flag.help);
            let arg = match flag.value_name {
                Some(name) => arg.value_name(name).value_parser(clap::value_parser!(String)),
                None => arg.action(clap::ArgAction::SetTrue),
            };
            command.arg(match flag.alias {
                Some(alias) => arg.visible_alias(alias),
                None => arg,
            })
        })
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Self::augment_args(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, FromArgMatches};
    use std::time::Duration;

    #[test]
    fn option_strings() {
        let mut s = MountSettings::default();
        apply_options(&mut s, "ro,cache_size=2G,threads=8,nodev,noatime,x-systemd.automount,allow_other").unwrap();
        assert_eq!(s.cache_bytes, 2 << 30);
        assert_eq!(s.threads, 8);
        assert!(s.allow_other);
        assert_eq!(s.passthrough, vec!["nodev", "noatime"]);
        assert!(apply_options(&mut s, "cache_size").unwrap_err().to_string().contains("cache_size"));
        assert!(apply_options(&mut s, "threads=0").is_err());
        assert!(apply_options(&mut s, "frobnicate").unwrap_err().to_string().contains("frobnicate"));
        apply_options(&mut s, "rw,writeback_secs=2").unwrap();
        assert!(s.read_write);
        assert_eq!(s.writeback_secs, 2);
        apply_options(&mut s, "ro").unwrap();
        assert!(!s.read_write);
        assert!(!s.exit_with_parent);
        apply_options(&mut s, "exit_with_parent").unwrap();
        assert!(s.exit_with_parent);
    }

    /// The messages are the ones zarrfs printed before they became typed errors.
    #[test]
    fn messages() {
        let err = |o: &str| apply_options(&mut MountSettings::default(), o).unwrap_err().to_string();
        assert_eq!(err("cache_size"), "option cache_size needs a value (cache_size=...)");
        assert_eq!(err("threads=0"), "option threads: \"0\" is not a positive number");
        assert_eq!(err("cache_size=lots"), "invalid size \"lots\" (expected e.g. 512M, 2G or a number of bytes)");
        assert_eq!(err("disk_cache="), "option disk_cache needs a value (disk_cache=...)");
        assert_eq!(err("remote_retries=x"), "option remote_retries: \"x\" is not a number");
        assert_eq!(
            err("remote_timeout=0"),
            "option remote_timeout: invalid duration \"0\" (expected e.g. 30s, 500ms or 2m)"
        );
        assert_eq!(err("frobnicate=1"), "unknown mount option \"frobnicate=1\"");
    }

    #[test]
    fn remote_options() {
        let mut s = MountSettings::default();
        apply_options(&mut s, "remote_timeout=2s,remote_retries=0,disk_cache=/tmp/c,disk_cache_size=10G").unwrap();
        assert_eq!(s.remote.timeout, Duration::from_secs(2));
        assert_eq!(s.remote.retries, 0);
        assert_eq!(s.remote.disk_cache, Some(PathBuf::from("/tmp/c")));
        assert_eq!(s.remote.disk_cache_bytes, 10 << 30);
        assert!(apply_options(&mut s, "disk_cache").unwrap_err().to_string().contains("disk_cache"));
        assert!(apply_options(&mut s, "remote_retries=x").is_err());
        assert!(apply_options(&mut s, "remote_timeout=0").is_err());
    }

    #[test]
    fn mount_option_strings() {
        let mut s = MountSettings::default();
        apply_options(&mut s, "ro,remote_timeout=500ms,remote_retries=2,disk_cache=/c,disk_cache_size=1G").unwrap();
        assert_eq!(s.remote.timeout, Duration::from_millis(500));
        assert_eq!(s.remote.retries, 2);
        assert_eq!(s.remote.disk_cache, Some(PathBuf::from("/c")));
        assert_eq!(s.remote.disk_cache_bytes, 1 << 30);
        assert!(apply_options(&mut s, "disk_cache_size=lots").is_err());
    }

    /// Settings from flags given on a command line, through clap as `zarrfs mount` parses them.
    fn from_flags(args: &[&str]) -> Result<MountSettings, SettingsError> {
        let command = FlagArgs::augment_args(clap::Command::new("zarrfs-mount"));
        let matches = command.try_get_matches_from(std::iter::once("zarrfs-mount").chain(args.iter().copied()));
        let flags = FlagArgs::from_arg_matches(&matches.expect("clap accepts the flag")).unwrap();
        MountSettings::from_command_line(&[], &flags, false)
    }

    /// Every flag and its `-o` spelling accept the same values into the same settings and refuse
    /// the same values. `--threads 0` and friends used to be ignored while `-o threads=0` was an
    /// error.
    #[test]
    fn flags_and_options_agree() {
        let values = ["0", "1", "8", "", "x", "-1", "2G", "1.5", "500ms", "/tmp/c"];
        let mut checked = 0;
        for setting in SETTINGS {
            let Some(flag) = setting.flag else { continue };
            let cases: Vec<(String, String)> = match flag.value_name {
                Some(_) => {
                    values.iter().map(|v| (format!("--{}={v}", flag.long), format!("{}={v}", setting.option))).collect()
                }
                None => vec![(format!("--{}", flag.long), setting.option.to_string())],
            };
            for (flag_arg, option) in cases {
                let by_flag = from_flags(&[&flag_arg]);
                let mut by_option = MountSettings::default();
                let by_option = apply_options(&mut by_option, &option).map(|()| by_option);
                match (&by_flag, &by_option) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{flag_arg} vs -o {option}"),
                    (Err(a), Err(b)) => {
                        // The same message, naming the setting as it was spelled.
                        let spelled = a.to_string().replace(&format!("--{}", flag.long), setting.option);
                        assert_eq!(spelled, b.to_string(), "{flag_arg} vs -o {option}");
                    }
                    _ => panic!("{flag_arg} gives {by_flag:?} but -o {option} gives {by_option:?}"),
                }
                checked += 1;
            }
        }
        assert!(checked > 50);
        for zero in ["threads", "decode-threads", "writeback-secs"] {
            let e = from_flags(&[&format!("--{zero}"), "0"]).unwrap_err();
            assert_eq!(e.to_string(), format!("option --{zero}: \"0\" is not a positive number"));
        }
        assert!(apply_options(&mut MountSettings::default(), "readahead_kb=0").is_err());
    }

    #[test]
    fn flags_win_over_options() {
        let command = FlagArgs::augment_args(clap::Command::new("m"));
        let matches = command.try_get_matches_from(["m", "--threads", "3", "--rw", "--disk-cache", "/d"]).unwrap();
        let flags = FlagArgs::from_arg_matches(&matches).unwrap();
        let s = MountSettings::from_command_line(&["ro,threads=9".into()], &flags, true).unwrap();
        assert_eq!(s.threads, 3);
        assert!(s.read_write && s.foreground);
        assert_eq!(s.remote.disk_cache, Some(PathBuf::from("/d")));
    }
}
