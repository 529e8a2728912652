//! `zarrfs stats MOUNTPOINT`: the live counters of a mount, read from its root's
//! [`STATS_XATTR`] (the daemon fills it in on every read), as a table, as JSON, or refreshed
//! every second with rates (`--watch`).

use std::ffi::CString;
use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fs::STATS_XATTR;
use crate::units::human;

/// How `zarrfs stats` shows the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsOptions {
    /// The document as the daemon wrote it (one JSON line per sample with `watch`).
    pub json: bool,
    /// Refresh every second, with rates since the previous sample.
    pub watch: bool,
    /// With `watch`: stop after this many samples (none: until interrupted).
    pub count: Option<u64>,
}

/// Print the counters of the mount at `mountpoint`.
pub fn stats(mountpoint: &Path, options: StatsOptions) -> Result<(), String> {
    let samples = if options.watch { options.count.unwrap_or(u64::MAX) } else { 1 };
    let clear_screen = options.watch && !options.json && std::io::stdout().is_terminal();
    let mut previous: Option<(Value, Instant)> = None;
    for n in 0..samples {
        if n > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let text = read_stats(mountpoint)?;
        let now = Instant::now();
        let counters: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{}: {STATS_XATTR} is not JSON: {e}", mountpoint.display()))?;
        let mut out = std::io::stdout().lock();
        let shown = if options.json {
            writeln!(out, "{text}")
        } else {
            let rates = previous.as_ref().map(|(before, at)| (before, now.duration_since(*at).as_secs_f64()));
            let prefix = if clear_screen {
                "\x1b[H\x1b[2J"
            } else if n > 0 {
                "\n"
            } else {
                ""
            };
            write!(out, "{prefix}{}", render(mountpoint, &counters, rates))
        };
        // A closed stdout (`zarrfs stats --watch | head`) ends the command quietly.
        if shown.and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
        previous = Some((counters, now));
    }
    Ok(())
}

/// The counters document on the root of the mount at `mountpoint`.
pub fn read_stats(mountpoint: &Path) -> Result<String, String> {
    let name = mountpoint.display();
    let path = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| format!("{name}: path contains NUL"))?;
    let attr = CString::new(STATS_XATTR).expect("no NUL");
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: valid C strings and a buffer of the length given.
        let n = unsafe { libc::getxattr(path.as_ptr(), attr.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            return String::from_utf8(buf).map_err(|_| format!("{name}: {STATS_XATTR} is not UTF-8"));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => {
                return Err(format!("{name}: not the root of a zarrfs mount (it has no {STATS_XATTR})"))
            }
            _ => return Err(format!("{name}: {}", crate::text::io_reason(&e))),
        }
    }
}

/// How a counter is shown.
#[derive(Clone, Copy)]
enum Unit {
    Count,
    Bytes,
    Seconds,
}

/// The rows of the table: label, key in the document, unit.
const ROWS: &[(&str, &str, Unit)] = &[
    ("chunks decoded", "chunks_decoded", Unit::Count),
    ("bytes decoded", "decoded_bytes", Unit::Bytes),
    ("decode time", "decode_seconds", Unit::Seconds),
    ("cache hits", "cache_hits", Unit::Count),
    ("cache misses", "cache_misses", Unit::Count),
    ("evictions", "evictions", Unit::Count),
    ("bytes served", "bytes_served", Unit::Bytes),
    ("decode errors", "decode_errors", Unit::Count),
];

fn number(counters: &Value, key: &str) -> f64 {
    counters.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

fn show(value: f64, unit: Unit) -> String {
    match unit {
        Unit::Count => format!("{value:.0}"),
        Unit::Bytes => human(value as u64),
        Unit::Seconds => format!("{value:.2} s"),
    }
}

/// The table; with `rates` (the previous sample and the seconds since), a per-second column.
fn render(mountpoint: &Path, counters: &Value, rates: Option<(&Value, f64)>) -> String {
    let mut out = format!("{}\n", mountpoint.display());
    for (label, key, unit) in ROWS {
        let value = number(counters, key);
        out.push_str(&format!("  {label:<16}{:>14}", show(value, *unit)));
        if let Some((before, secs)) = rates.filter(|(_, secs)| *secs > 0.0) {
            let rate = (value - number(before, key)).max(0.0) / secs;
            out.push_str(&format!("{:>14}/s", show(rate, *unit)));
        }
        out.push('\n');
    }
    let (hits, misses) = (number(counters, "cache_hits"), number(counters, "cache_misses"));
    if hits + misses > 0.0 {
        out.push_str(&format!("  {:<16}{:>13.1}%\n", "hit rate", 100.0 * hits / (hits + misses)));
    }
    out.push_str(&format!(
        "  {:<16}{:>14} of {} ({} chunks)\n",
        "cache use",
        human(number(counters, "cached_bytes") as u64),
        human(number(counters, "cache_budget_bytes") as u64),
        number(counters, "cached_chunks")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn counters(decoded: u64, served: u64) -> Value {
        json!({"chunks_decoded": decoded, "decode_errors": 0, "cache_hits": 3, "cache_misses": 1,
               "evictions": 0, "decoded_bytes": decoded * 1024, "decode_seconds": 0.5,
               "cached_bytes": 2048, "cached_chunks": 2, "cache_budget_bytes": 1u64 << 30,
               "bytes_served": served})
    }

    #[test]
    fn table_shows_every_counter_and_the_cache_use() {
        let table = render(Path::new("/mnt/d"), &counters(4, 3 << 20), None);
        assert!(table.starts_with("/mnt/d\n"), "{table}");
        assert!(table.contains("chunks decoded") && table.contains("bytes served"), "{table}");
        assert!(table.contains("3.0 MiB"), "{table}");
        assert!(table.contains("75.0%"), "{table}");
        assert!(table.contains("2.0 KiB of 1.0 GiB (2 chunks)"), "{table}");
        assert!(!table.contains("/s"), "no rates without a previous sample: {table}");
    }

    #[test]
    fn rates_are_differences_per_second() {
        let (before, after) = (counters(4, 0), counters(24, 4 << 20));
        let table = render(Path::new("/m"), &after, Some((&before, 2.0)));
        let decoded = table.lines().find(|l| l.contains("chunks decoded")).unwrap();
        assert!(decoded.trim_end().ends_with("10/s"), "{decoded}");
        let served = table.lines().find(|l| l.contains("bytes served")).unwrap();
        assert!(served.trim_end().ends_with("2.0 MiB/s"), "{served}");
    }
}
