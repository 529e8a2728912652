"""The measurements of `make bench` (see bench.py for what each section measures): cold scans,
scans with the store in the page cache, warm re-reads, column reads, pread latency, a small
cache, FUSE read sizes, and scans over loopback HTTP. Each section adds its figures to
bench_common.results."""

from __future__ import annotations

import datetime
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bench_common import (
    FORMATS, HTTP_DATA, HTTP_WORK, LOGS, MNT, REPS, ROOT, SCAN, SHM_RAW, SMALL_CACHE, MiB,
    add, drop_caches, log, mount, record, results,
)
from bench_data import ensure_http_data
from kit import bdi_read_ahead_kb


# ---------------------------------------------------------------- readers, CPU, the machine

def read_readinto(path: Path) -> int:
    buf = bytearray(MiB)
    view = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(view)
            if not k:
                return n
            n += k


def memmap_sum(path: Path, info: dict) -> float:
    a = np.memmap(path, dtype=info["dtype"], mode="r", shape=tuple(info["shape"]))
    s = float(a.sum())
    del a
    return s


def dd(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"], check=True)


def system_busy_seconds() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def reader_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "Cargo.toml"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    fuse_max_pages = None
    try:
        fuse_max_pages = int(Path("/proc/sys/fs/fuse/max_pages_limit").read_text())
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
        "memory_gib": round(mem / 2**30, 1), "zarrfs_commit": git + ("+dirty" if dirty else ""),
        "python": platform.python_version(), "numpy": np.__version__,
        "fuse_max_pages_limit": fuse_max_pages,
    }


# ---------------------------------------------------------------- 1. cold scans

def prime_store(store: str) -> None:
    """Read every file of a store so that its compressed chunks sit in the page cache."""
    for p in Path(store).rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 22):
                    pass


def mount_scan(info: dict, fmt: str, method: str, tag: str, cache_size: str | None = None,
               env: dict | None = None, cold: bool = True, decode_threads: int | None = None) -> dict:
    """One full scan through a fresh mount (nothing decoded). cold: the page cache is dropped
    first; else the store's files are read into the page cache first (isolates decode + FUSE)."""
    path = MNT / info["array"]
    if not cold:
        prime_store(info[fmt])
    with mount(info[fmt], cache_size=cache_size, env=env, log_path=LOGS / f"{tag}.log",
               decode_threads=decode_threads) as m:
        dropped = drop_caches() if cold else None
        c0, th0, r0 = m.cpu(), m.thread_cpu(), reader_cpu()
        t0 = time.perf_counter()
        if method == "readinto":
            n = read_readinto(path)
            assert n == info["nbytes"], f"short scan: {n} of {info['nbytes']} bytes"
        elif method == "memmap":
            memmap_sum(path, info)
        elif method == "dd":
            dd(path)
        dt = time.perf_counter() - t0
        c1, th1, r1 = m.cpu(), m.thread_cpu(), reader_cpu()
        st, hwm, ra = m.stats(), m.hwm(), bdi_read_ahead_kb(MNT)
    scan = {
        "tag": tag, "format": fmt, "method": method, "cache_size": cache_size or "default",
        "store": "cold" if cold else "in page cache", "decode_threads": decode_threads or "default",
        "seconds": dt, "gbps": info["nbytes"] / dt / 1e9, "cache_dropped": dropped,
        "decodes_per_chunk": st["chunks_decoded"] / info["n_chunks"], "stats": st,
        "vm_hwm_bytes": hwm, "daemon_cpu_s": c1 - c0, "daemon_cores": (c1 - c0) / dt,
        "reader_cores": (r1 - r0) / dt, "decode_cores": st["decode_seconds"] / dt,
        "thread_cpu_s": {k: round(th1.get(k, 0) - th0.get(k, 0), 3) for k in th1},
        "read_ahead_kb": ra,
    }
    results["scans"].append(scan)
    return scan


def zarrs_scan(store: str, array: str, cold: bool = True, keep: bool = False) -> float:
    """zarrs decoding every chunk on 2 threads; `keep`: hold every decoded chunk to the end, as a
    cache of decoded chunks does (fresh memory for every decode), instead of dropping it."""
    if cold:
        drop_caches()
    else:
        prime_store(store)
    keep_arg = ["--keep"] if keep else []
    r = subprocess.run([str(SCAN), store, "/" + array, "--threads", "2", *keep_arg], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    out = json.loads(r.stdout)
    return out["bytes"] / out["seconds"] / 1e9


def zarr_python_scan(store: str, array: str, nbytes: int) -> float:
    import zarr
    drop_caches()
    t0 = time.perf_counter()
    a = zarr.open_array(store, path=array, mode="r")[:]
    dt = time.perf_counter() - t0
    assert a.nbytes == nbytes
    del a
    return nbytes / dt / 1e9


def tensorstore_scan(store: str, array: str, fmt: str, nbytes: int) -> float:
    import tensorstore as ts
    drop_caches()
    t0 = time.perf_counter()
    t = ts.open({"driver": "zarr3" if fmt == "v3" else "zarr",
                 "kvstore": {"driver": "file", "path": f"{store}/{array}"}}).result()
    a = t.read().result()
    dt = time.perf_counter() - t0
    assert a.nbytes == nbytes
    del a
    return nbytes / dt / 1e9


def timed_gbps(fn, nbytes: int) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e9


def bench_cold_scans(info: dict, have_scan: bool, have_ts: bool) -> None:
    nb, arr = info["nbytes"], info["array"]
    # One-time start-up costs (imports, zarr-python's event loop and thread pool, tensorstore's
    # context) are paid here, untimed: the table compares steady-state reading.
    import zarr
    for fmt in FORMATS:
        zarr.open_array(info[fmt], path=arr, mode="r")[:1, :1]
        if have_ts:
            import tensorstore as ts
            ts.open({"driver": "zarr3" if fmt == "v3" else "zarr",
                     "kvstore": {"driver": "file", "path": f"{info[fmt]}/{arr}"}}).result()[:1, :1].read().result()
    for rep in range(REPS):
        log(f"1. cold scans, repetition {rep + 1}/{REPS}")
        for fmt, fname in FORMATS.items():
            s = mount_scan(info, fmt, "readinto", f"cold-{fmt}-readinto-{rep}")
            add(f"cold.{fmt}.zarrfs_readinto", s["gbps"], f"zarrfs, 1 MiB readinto ({fname})", "GB/s")
            s = mount_scan(info, fmt, "memmap", f"cold-{fmt}-memmap-{rep}")
            add(f"cold.{fmt}.zarrfs_memmap", s["gbps"], f"zarrfs, np.memmap().sum() ({fname})", "GB/s")
            if have_scan:
                add(f"cold.{fmt}.zarrs", zarrs_scan(info[fmt], arr), f"zarrs, 2 threads, all chunks ({fname})", "GB/s")
                add(f"cold.{fmt}.zarrs_keep", zarrs_scan(info[fmt], arr, keep=True),
                    f"zarrs, 2 threads, all chunks kept in memory ({fname})", "GB/s")
            add(f"cold.{fmt}.zarr_python", zarr_python_scan(info[fmt], arr, nb), f"zarr-python z[:] ({fname})", "GB/s")
            if have_ts:
                add(f"cold.{fmt}.tensorstore", tensorstore_scan(info[fmt], arr, fmt, nb), f"tensorstore read ({fname})", "GB/s")
        raw = Path(info["raw"])
        drop_caches()
        add("cold.raw.memmap", timed_gbps(lambda: memmap_sum(raw, info), nb), "raw copy, np.memmap().sum(), cold", "GB/s")
        drop_caches()
        add("cold.raw.dd", timed_gbps(lambda: dd(raw), nb), "raw copy, dd bs=1M, cold", "GB/s")
        dd(raw)  # make sure every page is cached before the warm runs
        add("warm.raw.memmap", timed_gbps(lambda: memmap_sum(raw, info), nb), "raw copy, np.memmap().sum(), warm", "GB/s")
        add("warm.raw.dd", timed_gbps(lambda: dd(raw), nb), "raw copy, dd bs=1M, warm", "GB/s")


def bench_store_cached(info: dict, have_scan: bool) -> None:
    """Diagnostic: store files already in the page cache, so the disk drops out and what is left
    is decoding plus the FUSE path (mount still fresh: nothing decoded)."""
    for rep in range(REPS):
        log(f"1b. scans with the store's files in the page cache, repetition {rep + 1}/{REPS}")
        for fmt, fname in FORMATS.items():
            s = mount_scan(info, fmt, "readinto", f"storecached-{fmt}-readinto-{rep}", cold=False)
            add(f"storecached.{fmt}.zarrfs_readinto", s["gbps"], f"zarrfs, 1 MiB readinto, store cached ({fname})", "GB/s")
            if have_scan:
                add(f"storecached.{fmt}.zarrs", zarrs_scan(info[fmt], info["array"], cold=False),
                    f"zarrs, 2 threads, store cached ({fname})", "GB/s")
                add(f"storecached.{fmt}.zarrs_keep", zarrs_scan(info[fmt], info["array"], cold=False, keep=True),
                    f"zarrs, 2 threads, chunks kept, store cached ({fname})", "GB/s")


# ---------------------------------------------------------------- 2. warm re-read

def bench_warm(info: dict) -> None:
    nb, path = info["nbytes"], MNT / info["array"]
    log("2. warm re-read through the mount")
    with mount(info["v3"], log_path=LOGS / "warm.log") as m:
        drop_caches()
        record("warm.zarrfs.first_dd", "zarrfs, dd bs=1M, first pass (cold, v3)", "GB/s",
               [timed_gbps(lambda: dd(path), nb)])
        s0 = m.stats()
        for _ in range(REPS):
            add("warm.zarrfs.dd", timed_gbps(lambda: dd(path), nb), "zarrfs, dd bs=1M, second pass (page cache)", "GB/s")
            add("warm.zarrfs.memmap", timed_gbps(lambda: memmap_sum(path, info), nb),
                "zarrfs, np.memmap().sum(), second pass", "GB/s")
        s1 = m.stats()
        results["warm_daemon_bytes_served"] = s1["bytes_served"] - s0["bytes_served"]
        # Every chunk decoded and held by the daemon, kernel page cache dropped: what is left is
        # the FUSE request path itself (the ceiling for a scan when decoding costs nothing).
        for _ in range(REPS):
            drop_caches()
            c0, r0, t0 = m.cpu(), reader_cpu(), time.perf_counter()
            read_readinto(path)
            dt = time.perf_counter() - t0
            add("fusepath.zarrfs_readinto", nb / dt / 1e9, "zarrfs, 1 MiB readinto, chunks in the daemon's cache, page cache dropped", "GB/s")
            mm = results["measurements"]["fusepath.zarrfs_readinto"]
            mm.setdefault("daemon_cores", []).append((m.cpu() - c0) / dt)
            mm.setdefault("reader_cores", []).append((reader_cpu() - r0) / dt)
        results["fusepath_decodes"] = m.stats()["chunks_decoded"] - s1["chunks_decoded"]
    log("2. dd of the raw copy on tmpfs")
    try:
        shutil.copyfile(info["raw"], SHM_RAW)
        for _ in range(REPS):
            add("warm.tmpfs.dd", timed_gbps(lambda: dd(SHM_RAW), nb), "raw copy on tmpfs, dd bs=1M", "GB/s")
    finally:
        SHM_RAW.unlink(missing_ok=True)


# ---------------------------------------------------------------- 3. column read

def column_memmap(path: Path, info: dict, j: int, advice: int | None = None) -> np.ndarray:
    a = np.memmap(path, dtype=info["dtype"], mode="r", shape=tuple(info["shape"]))
    if advice is not None:
        a._mmap.madvise(advice)
    col = np.array(a[:, j])
    del a
    return col


def bench_column(info: dict) -> None:
    import zarr
    j = info["shape"][1] // 3 + 7  # inside a chunk column, not on a chunk edge
    raw, path = Path(info["raw"]), MNT / info["array"]
    results["column_index"] = j
    ref = None
    for rep in range(REPS):
        log(f"3. column read a[:, {j}], repetition {rep + 1}/{REPS}")
        for key, label, advice in [("column.zarrfs", "zarrfs, np.memmap(...)[:, j] (fresh mount)", None),
                                   ("column.zarrfs_madv_random", "zarrfs, memmap + MADV_RANDOM (diagnostic)", mmap.MADV_RANDOM)]:
            with mount(info["v3"], log_path=LOGS / f"column-{rep}.log") as m:
                drop_caches()
                t0 = time.perf_counter()
                col = column_memmap(path, info, j, advice)
                dt = time.perf_counter() - t0
                st = m.stats()
            add(key, dt * 1e3, label, "ms")
            results["measurements"][key].setdefault("chunks_decoded", []).append(st["chunks_decoded"])
            results["measurements"][key].setdefault("bytes_served", []).append(st["bytes_served"])
            ref = col if ref is None else ref
            assert np.array_equal(col, ref), "column differs between runs"
        drop_caches()
        t0 = time.perf_counter()
        col = column_memmap(raw, info, j)
        add("column.raw_cold", (time.perf_counter() - t0) * 1e3, "raw copy, np.memmap(...)[:, j], cold", "ms")
        assert np.array_equal(col, ref), "column through the mount differs from the raw copy"
        drop_caches()
        t0 = time.perf_counter()
        col = zarr.open_array(info["v3"], path=info["array"], mode="r")[:, j]
        add("column.zarr_python", (time.perf_counter() - t0) * 1e3, "zarr-python z[:, j], cold (v3)", "ms")
        assert np.array_equal(col, ref), "column from zarr-python differs from the raw copy"


# ---------------------------------------------------------------- 4. latency

def spread_order(offsets: list[int], min_gap: int, rng: np.random.Generator) -> list[int]:
    """Order offsets so that consecutive ones are more than min_gap apart (zarrfs treats reads
    near the previous one as a sequential scan and prefetches), and none starts near 0."""
    pool = [o for o in offsets if o > 2 * min_gap]
    rng.shuffle(pool)
    out: list[int] = []
    while pool:
        for i, o in enumerate(pool):
            if not out or abs(o - out[-1]) > min_gap:
                out.append(pool.pop(i))
                break
        else:
            pool.pop(0)
    return out


def pread_samples(fd: int, offsets: list[int], drop_after: bool = True) -> list[float]:
    lat = []
    for off in offsets:
        t0 = time.perf_counter_ns()
        data = os.pread(fd, 4096, off)
        lat.append((time.perf_counter_ns() - t0) / 1e3)
        assert len(data) == 4096
        if drop_after:
            os.posix_fadvise(fd, off, 4096, os.POSIX_FADV_DONTNEED)
    return lat


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_latency(info: dict) -> None:
    log("4. random 4 KiB pread latency")
    rng = np.random.default_rng(7)
    rows, cols = info["shape"]
    cr, cc = info["chunks"]
    item = np.dtype(info["dtype"]).itemsize
    gr, gc = rows // cr, cols // cc
    row_bytes = cols * item
    # One 4 KiB page covers 1024 float32 = one row of one chunk (cc * item == 4096 here).
    page_in_chunk = lambda ci, cj, r: (ci * cr + r) * row_bytes + cj * cc * item  # noqa: E731
    gap = 5 * MiB
    with mount(info["v3"], log_path=LOGS / "latency.log") as m:
        fd = os.open(MNT / info["array"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel readahead: 4 KiB stays 4 KiB
            drop_caches()
            # Not-yet-decoded chunks: one sample per chunk, each a chunk never touched before.
            n_unc = min(128, gr * gc // 2)
            picks = rng.choice(gr * gc, size=n_unc, replace=False)
            offs = [page_in_chunk(int(k) // gc, int(k) % gc, int(rng.integers(cr))) for k in picks]
            offs = spread_order(offs, gap, rng)
            s0 = m.stats()
            uncached = pread_samples(fd, offs)
            s1 = m.stats()
            # A decoded chunk: pages of one chunk the previous step decoded, each page once.
            ci, cj = (offs[0] // row_bytes) // cr, ((offs[0] % row_bytes) // item) // cc
            cached_offs = [page_in_chunk(ci, cj, (k * 67 + 1) % cr) for k in range(min(400, cr))]
            cached = pread_samples(fd, cached_offs)
            s2 = m.stats()
            # Kernel page-cache hits on the mount, for reference: the same page again and again.
            os.pread(fd, 4096, cached_offs[5])
            pagecache = pread_samples(fd, [cached_offs[5]] * 400, drop_after=False)
        finally:
            os.close(fd)
    results["latency"] = {
        "uncached": {"n": len(uncached), "p50_us": pct(uncached, 50), "p99_us": pct(uncached, 99),
                     "decodes": s1["chunks_decoded"] - s0["chunks_decoded"],
                     "bytes_served_per_sample": (s1["bytes_served"] - s0["bytes_served"]) / len(uncached)},
        "cached": {"n": len(cached), "p50_us": pct(cached, 50), "p99_us": pct(cached, 99),
                   "decodes": s2["chunks_decoded"] - s1["chunks_decoded"],
                   "bytes_served_per_sample": (s2["bytes_served"] - s1["bytes_served"]) / len(cached)},
        "page_cache_hit": {"n": len(pagecache), "p50_us": pct(pagecache, 50), "p99_us": pct(pagecache, 99)},
    }


# ---------------------------------------------------------------- 5. small cache, diagnostics

def bench_small_cache(info: dict) -> None:
    for rep in range(REPS):
        log(f"5. scan with --cache-size {SMALL_CACHE} (array 8x the cache), repetition {rep + 1}/{REPS}")
        s = mount_scan(info, "v3", "readinto", f"small-cache-{rep}", cache_size=SMALL_CACHE)
        add("cold.v3.zarrfs_readinto_small_cache", s["gbps"], f"zarrfs, 1 MiB readinto, --cache-size {SMALL_CACHE} (v3)", "GB/s")


READ_RE = re.compile(r"READ fh [^,]*, offset \D*(\d+)\D*, size (\d+)")


def bench_read_sizes(info: dict) -> None:
    """One extra scan per reader with fuser's request log on: which reads reach the daemon."""
    out = {}
    for method in ["readinto", "memmap"]:
        log(f"diagnostic: FUSE read sizes during a {method} scan (request log on, not timed for the table)")
        tag = f"readlog-{method}"
        s = mount_scan(info, "v3", method, tag, env={"RUST_LOG": "warn,fuser::request=debug"})
        results["scans"].pop()  # logging slows the daemon: keep this scan out of the figures
        sizes, offsets = [], []
        with open(LOGS / f"{tag}.log", errors="replace") as f:
            for line in f:
                mt = READ_RE.search(line)
                if mt:
                    offsets.append(int(mt.group(1)))
                    sizes.append(int(mt.group(2)))
        hist: dict[str, int] = {}
        for sz in sizes:
            k = f"{sz // 1024} KiB"
            hist[k] = hist.get(k, 0) + 1
        backwards = sum(1 for a, b in zip(offsets, offsets[1:]) if b < a)
        out[method] = {"reads": len(sizes), "size_histogram": dict(sorted(hist.items(), key=lambda kv: -kv[1])),
                       "mean_kib": (sum(sizes) / len(sizes) / 1024) if sizes else None,
                       "out_of_order_fraction": backwards / max(1, len(offsets) - 1),
                       "gbps_with_logging": s["gbps"], "decodes_per_chunk": s["decodes_per_chunk"]}
        (LOGS / f"{tag}.log").unlink(missing_ok=True)  # large; the summary is in results.json
    results["read_sizes"] = out


# ---------------------------------------------------------------- 6. over HTTP

def bench_http() -> None:
    """Cold scans of the same URL: a fresh zarrfs mount vs zarr-python (fsspec HTTP). The page
    cache is dropped before each, so the server reads the store from disk every time."""
    try:
        import aiohttp  # noqa: F401
        import fsspec  # noqa: F401
    except ImportError:
        results["notes"].append("fsspec/aiohttp are not installed; the HTTP scan is skipped")
        return
    import zarr
    from kit.servers import HttpServer
    hinfo = ensure_http_data(HTTP_DATA)
    results["http_data"] = hinfo
    nb, arr = hinfo["nbytes"], hinfo["array"]
    HTTP_WORK.mkdir(exist_ok=True)
    (HTTP_WORK / "http-requests.log").unlink(missing_ok=True)
    server = HttpServer(HTTP_DATA, HTTP_WORK).start()
    try:
        url = server.url(hinfo["store"])
        results["http_url"] = url
        zarr.open_array(url, path=arr, mode="r")[:1, :1]  # zarr-python's start-up, untimed
        for rep in range(REPS):
            log(f"6. cold scans over HTTP ({nb / MiB:.0f} MiB), repetition {rep + 1}/{REPS}")
            with mount(url, log_path=LOGS / f"http-{rep}.log") as m:
                drop_caches()
                c0, t0 = m.cpu(), time.perf_counter()
                n = read_readinto(MNT / arr)
                dt = time.perf_counter() - t0
                cpu, st = m.cpu() - c0, m.stats()
            assert n == nb, f"short scan: {n} of {nb} bytes"
            add("http.zarrfs_readinto", nb / dt / 1e9, "zarrfs mount of the URL, 1 MiB readinto, cold", "GB/s")
            mm = results["measurements"]["http.zarrfs_readinto"]
            mm.setdefault("daemon_cores", []).append(cpu / dt)
            mm.setdefault("decodes_per_chunk", []).append(st["chunks_decoded"] / hinfo["n_chunks"])
            drop_caches()
            t0 = time.perf_counter()
            a = zarr.open_array(url, path=arr, mode="r")[:]
            dt = time.perf_counter() - t0
            assert a.nbytes == nb
            add("http.zarr_python", nb / dt / 1e9, "zarr-python z[:] of the URL (fsspec HTTP), cold", "GB/s")
        # Untimed: both paths read the same values.
        with mount(url, log_path=LOGS / "http-check.log"):
            same = np.array_equal(np.memmap(MNT / arr, dtype=hinfo["dtype"], mode="r", shape=a.shape), a)
        assert same, "the HTTP mount and zarr-python read different values"
        results["http_requests"] = len(server.requests())
    finally:
        server.stop()
