#!/usr/bin/env python3
"""`make bench`: how fast zarrfs serves a Zarr array as a flat file, against the alternatives.

One run measures everything below on the same machine, so the ratios checked at the end compare
figures taken minutes apart. Each figure is the median of BENCH_REPS (default 3) repetitions,
interleaved so that machine noise spreads over all paths alike.

  1. Cold sequential scan of a 1 GiB float32 array (16384x16384, chunks 1024x1024), stored as
     Zarr v3 zstd and as Zarr v2 blosc-lz4: through a fresh zarrfs mount (1 MiB readinto loop,
     np.memmap().sum()), zarrs decoding every chunk on 2 threads (examples/zarrs_scan.rs, the
     decode ceiling), zarr-python z[:], tensorstore, and an uncompressed copy (np.memmap sum, dd)
     cold and warm. The page cache is dropped before every cold run.
  2. Warm re-read through the mount (kernel page cache) against dd of the raw copy on tmpfs.
  3. Column a[:, j]: memmap of the mount vs cold memmap of the raw copy vs zarr-python z[:, j].
  4. Random 4 KiB pread latency on a decoded chunk and on a not-yet-decoded chunk.
  5. Decodes per chunk in full scans and the daemon's peak RSS against --cache-size, including a
     scan with a cache 8x smaller than the array.
  6. Cold scan over loopback HTTP of a 256 MiB copy (v3 zstd, consolidated) served by Python's
     http.server with byte ranges (tests/kit/servers.py): a fresh `zarrfs mount
     http://...` (1 MiB readinto) against zarr-python reading the same URL (fsspec + aiohttp).
  +  Diagnostics: FUSE read sizes seen by the daemon during scans (fuser debug log), CPU used by
     each kind of daemon thread.

BENCH_ONLY=http,latency,... runs only those sections (cold, storecached, warm, column, latency,
small_cache, read_sizes, http) and writes bench-out/results-partial.{md,json} instead.

Writes bench-out/results.md (also printed), bench-out/results.json and bench-out/throughput.png.
Data are generated once under bench-out/data (seeded) and reused while the parameters match.

This file runs the sections; the measurements are in bench_sections.py, the targets, tables and
plot in bench_report.py, paths and the figures collected in bench_common.py, the data in
bench_data.py. Mounts and the HTTP server come from the shared kit (tests/kit).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared kit

from bench_common import (  # noqa: E402
    BIN, BUILT_BIN, BUILT_SCAN, DATA, LOGS, MNT, OUT, ROOT, SCAN, SHM_RAW, drop_error, log, results,
)
from bench_data import ensure_data  # noqa: E402
from bench_report import plot, render, targets  # noqa: E402
from bench_sections import (  # noqa: E402
    bench_cold_scans, bench_column, bench_http, bench_latency, bench_read_sizes, bench_small_cache,
    bench_store_cached, bench_warm, loadavg, machine, reader_cpu, system_busy_seconds,
)
from kit import force_unmount, is_mounted  # noqa: E402


def main() -> int:
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    OUT.mkdir(exist_ok=True)
    LOGS.mkdir(exist_ok=True)
    if not BUILT_BIN.exists():
        log(f"{BUILT_BIN} is missing: run `cargo build --release --locked` (or `make bench`)")
        return 1
    BIN.parent.mkdir(exist_ok=True)
    shutil.copy2(BUILT_BIN, BIN)
    results["machine"] = machine()
    # Other work on a shared machine (builds, tests) otherwise takes CPU from whichever path is
    # being measured; every process of the run (daemon, zarrs, dd, ...) inherits this priority.
    want = int(os.environ.get("BENCH_NICE", "-10"))
    try:
        if want:
            os.nice(want)
    except OSError as e:
        log(f"cannot change priority to {want} ({e}); running at normal priority")
    results["machine"]["nice"] = os.nice(0)
    log(f"machine: {results['machine']}")
    log("building examples/zarrs_scan.rs (release)")
    b = subprocess.run(["cargo", "build", "--release", "--locked", "--example", "zarrs_scan"], cwd=ROOT,
                       capture_output=True, text=True)
    have_scan = b.returncode == 0 and BUILT_SCAN.exists()
    if have_scan:
        shutil.copy2(BUILT_SCAN, SCAN)
    if not have_scan:
        results["notes"].append("zarrs_scan example did not build; decode ceiling not measured")
        log("zarrs_scan build failed:\n" + b.stderr[-2000:])
    try:
        import tensorstore  # noqa: F401
        have_ts = True
    except ImportError:
        have_ts = False
        results["notes"].append("tensorstore is not installed; its path is skipped")
    sections = {
        "cold": lambda: bench_cold_scans(info, have_scan, have_ts),
        "storecached": lambda: bench_store_cached(info, have_scan),
        "warm": lambda: bench_warm(info),
        "column": lambda: bench_column(info),
        "latency": lambda: bench_latency(info),
        "small_cache": lambda: bench_small_cache(info),
        "read_sizes": lambda: bench_read_sizes(info),
        "http": bench_http,
    }
    only = [s.strip() for s in os.environ.get("BENCH_ONLY", "").split(",") if s.strip()]
    unknown = [s for s in only if s not in sections]
    if unknown:
        log(f"BENCH_ONLY: unknown sections {unknown}; known: {', '.join(sections)}")
        return 2
    if only:
        results["notes"].append(f"partial run: BENCH_ONLY={','.join(only)}")
    info = ensure_data(DATA)
    results["data"] = info
    busy0, own0, wall0, la0 = system_busy_seconds(), reader_cpu(), time.perf_counter(), loadavg()
    try:
        for name, run in sections.items():
            if not only or name in only:
                run()
    finally:
        SHM_RAW.unlink(missing_ok=True)
        if is_mounted(MNT):
            force_unmount(MNT)
    wall = time.perf_counter() - wall0
    results["noise"] = {"other_cores": max(0.0, (system_busy_seconds() - busy0) - (reader_cpu() - own0)) / wall,
                        "loadavg_start": la0, "loadavg_end": loadavg()}
    results["targets"] = targets(info)
    results["page_cache_drop_error"] = drop_error()
    elapsed = time.perf_counter() - started
    results["elapsed_seconds"] = elapsed
    stem = "results-partial" if only else "results"
    (OUT / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    if not only:
        plot(OUT / "throughput.png")
    md = render(info, elapsed)
    (OUT / f"{stem}.md").write_text(md)
    print(md)
    met = sum(t["met"] for t in results["targets"])
    log(f"{met}/{len(results['targets'])} targets met; results in {OUT}/{stem}.md, {stem}.json"
        + ("" if only else ", throughput.png") + f" ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
