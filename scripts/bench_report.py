"""The report of `make bench`: the targets checked, the markdown tables (results.md) and the
plot (throughput.png), from the figures in bench_common.results."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench_common import FORMATS, REPS, SMALL_CACHE, MiB, drop_error, med, median_of, results


def targets(info: dict) -> list[dict]:
    t = []

    def check(name, measured, threshold, ok, detail):
        t.append({"target": name, "measured": measured, "threshold": threshold, "met": bool(ok), "detail": detail})

    for fmt, fname in FORMATS.items():
        mnt, ceil, zp = (median_of(f"cold.{fmt}.{k}") for k in ("zarrfs_readinto", "zarrs", "zarr_python"))
        if mnt and ceil:
            keep = median_of(f"cold.{fmt}.zarrs_keep")
            kept = f"; {mnt / keep:.2f}x zarrs keeping its chunks ({keep:.2f} GB/s)" if keep else ""
            check(f"cold scan via mount >= 0.85x zarrs 2-thread ({fname})", f"{mnt / ceil:.2f}x", ">= 0.85x",
                  mnt / ceil >= 0.85, f"{mnt:.2f} vs {ceil:.2f} GB/s{kept}")
        if mnt and zp:
            check(f"cold scan via mount >= 2.5x zarr-python ({fname})", f"{mnt / zp:.2f}x", ">= 2.5x",
                  mnt / zp >= 2.5, f"{mnt:.2f} vs {zp:.2f} GB/s")
    w, tmp = median_of("warm.zarrfs.dd"), median_of("warm.tmpfs.dd")
    if w and tmp:
        check("warm re-read >= 0.8x dd from tmpfs", f"{w / tmp:.2f}x", ">= 0.8x", w / tmp >= 0.8,
              f"{w:.2f} vs {tmp:.2f} GB/s")
    dpc = [s["decodes_per_chunk"] for s in results["scans"]]
    if dpc:
        check("decodes per chunk = 1.0 (every full scan)", f"{min(dpc):.2f}-{max(dpc):.2f}", "= 1.00",
              all(abs(x - 1.0) < 1e-9 for x in dpc), f"{len(dpc)} scans")
    col, rawc = median_of("column.zarrfs"), median_of("column.raw_cold")
    if col and rawc:
        check("column read >= 20x faster than cold memmap of raw copy", f"{rawc / col:.1f}x", ">= 20x",
              rawc / col >= 20, f"{col:.0f} vs {rawc:.0f} ms")
    lat = results.get("latency")
    if lat:
        p99 = lat["cached"]["p99_us"]
        check("cached 4 KiB pread p99 < 200 us", f"{p99:.0f} us", "< 200 us", p99 < 200,
              f"p50 {lat['cached']['p50_us']:.0f} us")
    if results["scans"]:
        excess = [(s["vm_hwm_bytes"] - s["stats"]["cache_budget_bytes"], s) for s in results["scans"]]
        worst, ws = max(excess, key=lambda e: e[0])
        check("daemon peak RSS <= cache budget + 64 MiB (every scan)", f"budget {worst / MiB:+.0f} MiB", "<= +64 MiB",
              worst <= 64 * MiB, f"worst: VmHWM {ws['vm_hwm_bytes'] / MiB:.0f} MiB with budget "
              f"{ws['stats']['cache_budget_bytes'] / MiB:.0f} MiB ({ws['tag']})")
    return t


def fmt_g(x, unit=""):
    return "n/a" if x is None else f"{x:.2f}{unit}"


def render(info: dict, elapsed: float) -> str:
    M = results["measurements"]
    mach = results["machine"]
    L = []
    L.append(f"# zarrfs benchmark, {mach['date']}")
    L.append("")
    L.append(f"Machine: {mach['nproc']} cores, {mach['cpu']}, Linux {mach['kernel']}, {mach['memory_gib']} GiB RAM; "
             f"zarrfs {mach['zarrfs_commit']}; medians of {REPS} repetitions; whole run {elapsed:.0f} s; "
             f"every process of the run at nice {mach.get('nice')}.")
    noise = results.get("noise", {})
    if noise:
        L.append(f"Other processes used {noise['other_cores']:.2f} of {mach['nproc']} cores on average during the run "
                 f"(load average {noise['loadavg_start']} at start, {noise['loadavg_end']} at end)"
                 + (": **the machine was busy, absolute figures are low and noisy**." if noise['other_cores'] > 0.25 else "."))
    L.append(f"Data: float32 {info['shape'][0]}x{info['shape'][1]} ({info['nbytes'] / 2**30:.2f} GiB), chunks "
             f"{info['chunks'][0]}x{info['chunks'][1]} ({info['n_chunks']} chunks); stored v3 zstd "
             f"{info['nbytes'] / info['v3_stored_bytes']:.2f}x, v2 blosc-lz4 {info['nbytes'] / info['v2_stored_bytes']:.2f}x "
             f"smaller. GB = 1e9 bytes.")
    if drop_error():
        L.append(f"**Page cache could not be dropped ({drop_error()}): cold figures are not cold.**")
    for n in results["notes"]:
        L.append(f"Note: {n}")
    L.append("")
    L.append("## Sequential scan (GB/s)")
    L.append("")
    L.append("| path | v3 zstd | v2 blosc-lz4 |")
    L.append("|---|---:|---:|")
    for k, label in [("cold.{}.zarrfs_readinto", "zarrfs mount, 1 MiB readinto, cold"),
                     ("cold.{}.zarrfs_memmap", "zarrfs mount, np.memmap().sum(), cold"),
                     ("cold.{}.zarrs", "zarrs direct, 2 threads (decode ceiling), cold"),
                     ("cold.{}.zarrs_keep", "zarrs direct, 2 threads, every decoded chunk kept (as a cache does), cold"),
                     ("cold.{}.zarr_python", "zarr-python `z[:]`, cold"),
                     ("cold.{}.tensorstore", "tensorstore read, cold"),
                     ("storecached.{}.zarrfs_readinto", "zarrfs mount, 1 MiB readinto, store files in page cache"),
                     ("storecached.{}.zarrs", "zarrs direct, 2 threads, store files in page cache"),
                     ("storecached.{}.zarrs_keep", "zarrs direct, 2 threads, chunks kept, store files in page cache")]:
        def cell(fmt):
            m = M.get(k.format(fmt))
            return "n/a" if not m else f"{m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f})"
        L.append(f"| {label} | {cell('v3')} | {cell('v2')} |")
    for k, label in [("cold.v3.zarrfs_readinto_small_cache", f"zarrfs mount, readinto, --cache-size {SMALL_CACHE}"),
                     ("cold.raw.memmap", "raw copy, np.memmap().sum(), cold"), ("cold.raw.dd", "raw copy, dd bs=1M, cold"),
                     ("warm.raw.memmap", "raw copy, np.memmap().sum(), warm"), ("warm.raw.dd", "raw copy, dd bs=1M, warm"),
                     ("fusepath.zarrfs_readinto", "zarrfs mount, readinto, all chunks already decoded, page cache dropped (FUSE path)"),
                     ("warm.zarrfs.first_dd", "zarrfs mount, dd bs=1M, first pass"),
                     ("warm.zarrfs.dd", "zarrfs mount, dd bs=1M, second pass (warm)"),
                     ("warm.zarrfs.memmap", "zarrfs mount, np.memmap().sum(), second pass"),
                     ("warm.tmpfs.dd", "raw copy on tmpfs, dd bs=1M")]:
        m = M.get(k)
        if m:
            where = "v3 only" if ("zarrfs" in k) else "(raw)"
            L.append(f"| {label} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) | {where} |")
    hz, hp = M.get("http.zarrfs_readinto"), M.get("http.zarr_python")
    if hz or hp:
        hi = results.get("http_data", {})
        L.append("")
        L.append(f"## Scan over loopback HTTP (GB/s): {hi.get('nbytes', 0) / MiB:.0f} MiB v3 zstd copy, consolidated, "
                 f"Python http.server with byte ranges")
        L.append("")
        L.append("| path | GB/s |")
        L.append("|---|---:|")
        for m in (hz, hp):
            if m:
                L.append(f"| {m['label']} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) |")
        if hz and hp:
            L.append(f"| ratio zarrfs / zarr-python | {hz['median'] / hp['median']:.2f}x |")
    L.append("")
    L.append("## Cold scans through the mount: where the time goes (medians)")
    L.append("")
    L.append("| scan (fresh mount) | GB/s | decodes/chunk | daemon CPU (cores) | decodes in flight | reader CPU (cores) | VmHWM MiB / budget MiB | readahead KiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    groups: dict[tuple, list] = {}
    for s in results["scans"]:
        groups.setdefault((s["format"], s["method"], s["cache_size"], s["store"]), []).append(s)
    for (fmt, method, cache, store), ss in groups.items():
        g = lambda k: med([s[k] for s in ss])  # noqa: E731
        L.append(f"| {FORMATS[fmt]}, {method}, cache {cache}, store {store} | {g('gbps'):.2f} | {max(s['decodes_per_chunk'] for s in ss):.2f} | "
                 f"{g('daemon_cores'):.2f} | {g('decode_cores'):.2f} | {g('reader_cores'):.2f} | "
                 f"{max(s['vm_hwm_bytes'] for s in ss) / MiB:.0f} / {ss[0]['stats']['cache_budget_bytes'] / MiB:.0f} | "
                 f"{ss[0]['read_ahead_kb']} |")
    fp = M.get("fusepath.zarrfs_readinto")
    if fp:
        L.append(f"| v3 zstd, readinto, every chunk already in the daemon's cache, page cache dropped | {fp['median']:.2f} | 0 | "
                 f"{med(fp['daemon_cores']):.2f} | 0 | {med(fp['reader_cores']):.2f} | | |")
    rs = results.get("read_sizes")
    if rs:
        L.append("")
        for method, r in rs.items():
            top = ", ".join(f"{k} x{v}" for k, v in list(r["size_histogram"].items())[:4])
            L.append(f"- FUSE reads reaching the daemon in a {method} scan (logged run): {r['reads']} reads, mean "
                     f"{fmt_g(r['mean_kib'])} KiB ({top}); {100 * r['out_of_order_fraction']:.0f}% arrive below the previous offset.")
    L.append("")
    L.append(f"## Column `a[:, {results.get('column_index')}]` (ms)")
    L.append("")
    L.append("| path | ms | chunks decoded | bytes served by the daemon |")
    L.append("|---|---:|---:|---:|")
    for k in ["column.zarrfs", "column.zarrfs_madv_random", "column.raw_cold", "column.zarr_python"]:
        m = M.get(k)
        if m:
            cd = m.get("chunks_decoded")
            bs = m.get("bytes_served")
            L.append(f"| {m['label']} | {m['median']:.0f} ({m['min']:.0f}-{m['max']:.0f}) | "
                     f"{med(cd) if cd else ''} | {f'{med(bs) / MiB:.0f} MiB' if bs else ''} |")
    lat = results.get("latency")
    if lat:
        L.append("")
        L.append("## Random 4 KiB pread through the mount (us)")
        L.append("")
        L.append("| case | samples | p50 | p99 | decodes | bytes served per read |")
        L.append("|---|---:|---:|---:|---:|---:|")
        for k, label in [("cached", "chunk already decoded (page not in page cache)"),
                         ("uncached", "chunk not yet decoded"), ("page_cache_hit", "page in the kernel page cache")]:
            v = lat[k]
            served = v.get("bytes_served_per_sample")
            served = "" if served is None else f"{served:.0f}"
            L.append(f"| {label} | {v['n']} | {v['p50_us']:.0f} | {v['p99_us']:.0f} | {v.get('decodes', '')} | {served} |")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | measured | needed | | detail |")
    L.append("|---|---:|---:|---|---|")
    for t in results["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {t['threshold']} | {'met' if t['met'] else '**MISSED**'} | {t['detail']} |")
    L.append("")
    return "\n".join(L)


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    M = results["measurements"]
    rows = []
    for fmt, fname in FORMATS.items():
        for k in ["zarrfs_readinto", "zarrfs_memmap", "zarrs", "zarrs_keep", "zarr_python", "tensorstore"]:
            m = M.get(f"cold.{fmt}.{k}")
            if m:
                rows.append((m["label"].replace(f" ({fname})", "") + f" — {fname}", m, f"cold {fname}"))
    for fmt, fname in FORMATS.items():
        for k in ["zarrfs_readinto", "zarrs"]:
            m = M.get(f"storecached.{fmt}.{k}")
            if m:
                rows.append((m["label"].replace(f" ({fname})", "") + f" — {fname}", m, "store files in page cache"))
    for k in ["fusepath.zarrfs_readinto", "cold.v3.zarrfs_readinto_small_cache", "cold.raw.memmap", "cold.raw.dd"]:
        if k in M:
            rows.append((M[k]["label"], M[k], "cold, other"))
    for k in ["warm.zarrfs.dd", "warm.zarrfs.memmap", "warm.raw.dd", "warm.raw.memmap", "warm.tmpfs.dd"]:
        if k in M:
            rows.append((M[k]["label"], M[k], "warm"))
    for k in ["http.zarrfs_readinto", "http.zarr_python"]:
        if k in M:
            rows.append((M[k]["label"] + " (256 MiB)", M[k], "loopback HTTP"))
    colours = {"cold v3 zstd": "tab:blue", "cold v2 blosc-lz4": "tab:orange", "store files in page cache": "tab:purple",
               "cold, other": "tab:gray", "warm": "tab:green", "loopback HTTP": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 0.38 * len(rows) + 1.6))
    y = np.arange(len(rows))[::-1]
    meds = [r[1]["median"] for r in rows]
    err = [[r[1]["median"] - r[1]["min"] for r in rows], [r[1]["max"] - r[1]["median"] for r in rows]]
    ax.barh(y, meds, xerr=err, color=[colours[r[2]] for r in rows], capsize=2)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    for yi, r in zip(y, rows):
        ax.text(r[1]["max"], yi, f"  {r[1]['median']:.2f}", va="center", fontsize=7)
    ax.set_xlabel("GB/s (median, whiskers min-max)")
    mach = results["machine"]
    ax.set_title(f"zarrfs: reading a 1 GiB float32 array\n{mach['nproc']} cores, {mach['cpu']}, "
                 f"Linux {mach['kernel']}, {mach['date']}", fontsize=8)
    from matplotlib.patches import Patch
    used = {r[2] for r in rows}
    ax.legend(handles=[Patch(color=c, label=l) for l, c in colours.items() if l in used], fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
