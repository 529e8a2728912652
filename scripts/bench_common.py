"""What the parts of `make bench` share: paths, settings, the results being collected and how a
figure is recorded, the page-cache drop, and the benchmark's mount (the shared kit's guard)."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

from kit import Mount

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-out"
DATA = OUT / "data"
HTTP_DATA = OUT / "data-http"
HTTP_WORK = OUT / "http"
MNT = OUT / "mnt"
LOGS = OUT / "logs"
BUILT_BIN = ROOT / "target" / "release" / "zarrfs"
BUILT_SCAN = ROOT / "target" / "release" / "examples" / "zarrs_scan"
# The run uses private copies, so a rebuild during the run cannot change what is measured.
BIN = OUT / "bin" / "zarrfs"
SCAN = OUT / "bin" / "zarrs_scan"
SHM_RAW = Path("/dev/shm/zarrfs-bench-raw.f32")
REPS = max(3, int(os.environ.get("BENCH_REPS", "3")))
SMALL_CACHE = "128M"
MiB = 1 << 20
FORMATS = {"v3": "v3 zstd", "v2": "v2 blosc-lz4"}

results: dict = {"measurements": {}, "scans": [], "notes": []}


# ---------------------------------------------------------------- recording figures

def med(xs):
    return statistics.median(xs) if xs else None


def record(key: str, label: str, unit: str, values: list[float], **extra) -> dict:
    m = {"label": label, "unit": unit, "values": values, "median": med(values),
         "min": min(values) if values else None, "max": max(values) if values else None, **extra}
    results["measurements"][key] = m
    return m


def add(key: str, value: float, label: str, unit: str, **extra) -> None:
    m = results["measurements"].get(key)
    if m is None:
        record(key, label, unit, [value], **extra)
    else:
        m["values"].append(value)
        m["median"], m["min"], m["max"] = med(m["values"]), min(m["values"]), max(m["values"])


def median_of(key: str):
    m = results["measurements"].get(key)
    return m["median"] if m else None


# ---------------------------------------------------------------- logging, page cache, mounts

def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


_drop_error: str | None = None


def drop_caches() -> bool:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`. Returns False (and remembers why) if refused."""
    global _drop_error
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError as e:
        if _drop_error is None:
            log(f"WARNING: cannot drop the page cache ({e}); 'cold' figures include cached data")
        _drop_error = str(e)
        return False


def drop_error() -> str | None:
    return _drop_error


def mount(store: str, *, log_path: Path, cache_size: str | None = None, decode_threads: int | None = None,
          env: dict | None = None) -> Mount:
    """`zarrfs mount -f STORE MNT` (the run's private copy of the binary) in a child process;
    unmounted and reaped on exit. A watchdog kills the daemon if the mount outlives 180 s, so a
    hung read turns into an error instead of a hung benchmark."""
    args = []
    if cache_size:
        args += ["--cache-size", cache_size]
    if decode_threads:
        args += ["--decode-threads", str(decode_threads)]
    return Mount(store, MNT, *args, binary=BIN, foreground=True, env=dict(os.environ, **(env or {})),
                 log_path=log_path, timeout=30, watchdog=180.0, replace_stale=True, note=log)
