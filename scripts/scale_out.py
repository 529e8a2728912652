#!/usr/bin/env python3
"""Scale-out demo: several "nodes" read one Zarr store from one object store through zarrfs.

Each node is what one machine of a cluster would run: its own `zarrfs mount URL MNT` (its own
daemon, its own decoded-chunk cache, nothing shared with the other nodes). A local Dask cluster
(one worker process per node) then has every worker memory-map its own slice of rows of the
mounted flat file with plain numpy -- `np.memmap(MNT/ARRAY, offset=..., shape=...)` -- and sum
it. The only thing the nodes share is the object store; a node fetches the chunks under its
worker's rows plus a read-ahead margin (the output counts the GETs). The sums are checked
against numpy on the original data (or zarr-python reading --url).

    python scripts/scale_out.py                          # 256 MiB store over loopback HTTP
    python scripts/scale_out.py --backend s3             # the same through moto's S3 server
    python scripts/scale_out.py --url http://host/x.zarr --array grp/temp   # an existing store
    python scripts/scale_out.py --small --json           # tiny store, JSON result (the test)

Servers (loopback only) and mounts are started and stopped by the script. Needs the release
build (target/release/zarrfs, or ZARRFS_BIN) and dask[distributed]; `--executor processes`
uses concurrent.futures.ProcessPoolExecutor instead of Dask.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared kit

from kit import ZARRFS_BIN as ZARRFS, Mount  # noqa: E402

BUCKET = "zarrfs-scale-out"

EXPLANATION = """\
How many nodes share one object store: every node mounts the same URL with its own zarrfs
daemon, and the daemons never talk to each other -- no coordinator, no shared cache, no lock.
A worker touches only the pages of its own rows, so its node fetches the chunk objects under
those rows straight from the store, plus a margin: the kernel's read-around before a worker's
first page and zarrfs's sequential prefetch (about 2 x decode threads chunks) past its last
page, which no node can know belongs to another ({chunk_gets} chunk GETs for {n_chunks}
chunks here; slices much larger than the margin make it small). The object store is the only
shared component, and object stores are built for many concurrent readers, so aggregate
throughput grows with the number of nodes until the store or the network saturates; each node
brings its own decode CPU and cache memory. The workers run plain numpy on a memory-mapped
file: no Zarr library, credentials or chunk arithmetic on them. (On this {cores}-core machine
all nodes share the same cores, so the timings show the mechanism, not the speed-up.)"""


# ---------------------------------------------------------------- the workers' code

def slice_sum(flat: str, dtype: str, shape: list[int], r0: int, r1: int) -> dict:
    """Run on a worker: memory-map rows [r0, r1) of the mounted flat file and sum them."""
    t0 = time.perf_counter()
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    part = np.memmap(flat, dtype=dtype, mode="r", offset=r0 * row_bytes, shape=(r1 - r0, *shape[1:]))
    total = float(part.sum(dtype=np.float64))
    nbytes = part.nbytes
    del part
    return {"pid": os.getpid(), "rows": [r0, r1], "sum": total, "bytes": nbytes,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- the store and its server

def make_store(path: Path, shape: tuple[int, int], chunks: tuple[int, int]) -> np.ndarray:
    """A v3 group with one float32 array `field`, consolidated (HTTP cannot be listed)."""
    import zarr

    rng = np.random.default_rng(20261128)
    data = (rng.standard_normal(shape, dtype=np.float32) * 4 + 280).round(2).astype("f4")
    z = zarr.create_array(str(path), name="field", shape=shape, chunks=chunks, dtype="f4")
    z[:] = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the Zarr v3 spec"
        zarr.consolidate_metadata(str(path))
    return data


class Backend:
    """Serves a local store directory over loopback HTTP or moto's S3 server."""

    def __init__(self, kind: str, store: Path, workdir: Path):
        self.kind, self.store, self.workdir = kind, store, workdir
        self.server = None
        self.env: dict = {}

    def __enter__(self) -> "Backend":
        from kit.servers import HttpServer, MotoServer, upload_dir

        if self.kind == "http":
            self.server = HttpServer(self.store.parent, self.workdir).start()
            self.url = self.server.url(self.store.name)
        else:
            self.server = MotoServer(self.workdir).start()
            client = self.server.client()
            client.create_bucket(Bucket=BUCKET)
            upload_dir(client, BUCKET, self.store.name, self.store)
            self.url = f"s3://{BUCKET}/{self.store.name}"
            self.env = self.server.client_env()
        return self

    def chunk_gets(self, array: str) -> int | None:
        """GETs of chunk objects the store has answered so far."""
        needle = f"/{self.store.name}/{array}/c/"
        if self.kind == "http":
            return sum(1 for method, path, _ in self.server.requests() if method == "GET" and needle in path)
        log = self.server.log_path.read_text(errors="replace")
        return sum(1 for line in log.splitlines() if '"GET ' in line and needle in line)

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


# ---------------------------------------------------------------- running

def node_mount(url: str, mnt: Path, env: dict, decode_threads: int | None) -> Mount:
    """One node's `zarrfs mount -f URL MNT` (log next to MNT), unmounted and reaped on exit; a
    watchdog kills its daemon after 15 minutes, so a hung read becomes an error."""
    args = ["--decode-threads", str(decode_threads)] if decode_threads else []
    return Mount(url, mnt, *args, binary=ZARRFS, foreground=True, env=dict(os.environ, **env),
                 log_path=mnt.with_name(mnt.name + ".log"), timeout=30, watchdog=900, replace_stale=True)


def row_slices(rows: int, chunk_rows: int, n: int) -> list[tuple[int, int]]:
    """n contiguous row ranges, aligned to chunk rows, as even as the chunk grid allows."""
    chunk_count = -(-rows // chunk_rows)
    bounds = [round(i * chunk_count / n) * chunk_rows for i in range(n + 1)]
    return [(min(a, rows), min(b, rows)) for a, b in zip(bounds, bounds[1:])]


def warm_up() -> int:
    return os.getpid()


def run_tasks(executor: str, tasks: list[tuple], workdir: Path) -> tuple[list[dict], float]:
    """Task i runs on worker i: worker i plays node i and reads through node i's mount.
    Returns the results and the seconds from submitting the tasks to the last result (the
    workers are started, and have run a task, before)."""
    if executor == "processes":
        from concurrent.futures import ProcessPoolExecutor

        pools = [ProcessPoolExecutor(1) for _ in tasks]  # one worker process per node
        try:
            for pool in pools:
                pool.submit(warm_up).result(timeout=60)
            t0 = time.perf_counter()
            futures = [pool.submit(slice_sum, *task) for pool, task in zip(pools, tasks)]
            parts = [f.result() for f in futures]
            return parts, time.perf_counter() - t0
        finally:
            for pool in pools:
                pool.shutdown()
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=len(tasks), processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, local_directory=str(workdir / "dask"),
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.wait_for_workers(len(tasks), timeout=60)
        workers = sorted(client.scheduler_info()["workers"])
        client.run(warm_up)
        t0 = time.perf_counter()
        futures = [client.submit(slice_sum, *task, workers=[w], allow_other_workers=False, pure=False)
                   for task, w in zip(tasks, workers)]
        parts = client.gather(futures)
        return parts, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4, help="mounts (one per node) and worker processes")
    ap.add_argument("--backend", choices=["http", "s3"], default="http", help="loopback server for the demo store")
    ap.add_argument("--url", help="an existing store instead of the demo store (no server started)")
    ap.add_argument("--array", default="field", help="array path inside --url's store")
    ap.add_argument("--small", action="store_true", help="a tiny store (512x512, chunks 64x64): the test")
    ap.add_argument("--executor", choices=["dask", "processes"], default="dask")
    ap.add_argument("--decode-threads", type=int, help="each node's zarrfs --decode-threads (default: zarrfs's)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-node, one-process scan")
    ap.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = ap.parse_args()
    out = (lambda *a: None) if args.json else print
    if not ZARRFS.exists():
        print(f"{ZARRFS} is missing: run `cargo build --release --locked` first", file=sys.stderr)
        return 1
    if args.executor == "dask":
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            print("dask[distributed] is not installed: use --executor processes", file=sys.stderr)
            return 1

    shape, chunks = ((512, 512), (64, 64)) if args.small else ((8192, 8192), (1024, 1024))
    workdir = Path(tempfile.mkdtemp(prefix="zarrfs-scale-out-"))
    try:
        data = None
        backend = None
        if args.url:
            url, env, array = args.url, {}, args.array.strip("/")
        else:
            out(f"writing a {np.prod(shape) * 4 / 2**20:.0f} MiB float32 store {shape}, chunks {chunks} ...")
            data = make_store(workdir / "www" / "demo.zarr", shape, chunks)
            backend = Backend(args.backend, workdir / "www" / "demo.zarr", workdir).__enter__()
            url, env, array = backend.url, backend.env, "field"
        try:
            result = scale_out(args, url, env, array, data, backend, workdir, out)
        finally:
            if backend is not None:
                backend.__exit__(None, None, None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0 if result["all_match"] else 1


def scale_out(args, url: str, env: dict, array: str, data, backend, workdir: Path, out) -> dict:
    mounts = [node_mount(url, workdir / f"node{i}", env, args.decode_threads) for i in range(args.nodes)]
    out(f"{args.nodes} nodes mount {url}, one zarrfs daemon each")
    entered = []
    try:
        for m in mounts:
            entered.append(m.__enter__())
        # Geometry from the extended attributes: reading data here would start node 0's scan.
        flat = str(mounts[0].mountpoint / array)
        shape = tuple(json.loads(os.getxattr(flat, "user.zarr.shape")))
        dtype = np.dtype(os.getxattr(flat, "user.zarr.dtype").decode())
        chunks = json.loads(os.getxattr(flat, "user.zarr.chunks"))
        slices = row_slices(shape[0], chunks[0], args.nodes)
        tasks = [(str(m.mountpoint / array), np.dtype(dtype).str, list(shape), r0, r1) for m, (r0, r1) in zip(mounts, slices)]
        gets0 = backend.chunk_gets(array) if backend else None
        out(f"{args.executor}: {args.nodes} worker processes, worker i sums rows of node i's mount ...")
        parts, wall = run_tasks(args.executor, tasks, workdir)
        gets = backend.chunk_gets(array) - gets0 if backend else None
        decoded = [m.stats()["chunks_decoded"] for m in mounts]
    finally:
        for m in reversed(entered):
            m.__exit__(None, None, None)

    # The reference: numpy on the original data (or zarr-python reading the URL).
    if data is None:
        import zarr
        data = zarr.open_array(url, path=array, mode="r")[:]
    nodes = []
    for i, (p, (r0, r1)) in enumerate(zip(parts, slices)):
        ref = float(data[r0:r1].sum(dtype=np.float64))
        nodes.append({"node": i, "rows": [r0, r1], "mib": p["bytes"] / 2**20, "seconds": p["seconds"],
                      "sum": p["sum"], "numpy_sum": ref, "match": bool(np.isclose(p["sum"], ref, rtol=1e-12, atol=0)),
                      "worker_pid": p["pid"], "chunks_decoded": decoded[i]})
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    n_chunks = int(np.prod([-(-s // c) for s, c in zip(shape, chunks)]))
    result = {"url": url, "array": array, "shape": list(shape), "dtype": np.dtype(dtype).str,
              "chunks": chunks, "n_chunks": n_chunks, "nodes": nodes, "executor": args.executor,
              "wall_seconds": wall, "gbps": nbytes / wall / 1e9, "chunk_gets": gets,
              "total": sum(n["sum"] for n in nodes), "numpy_total": float(data.sum(dtype=np.float64)),
              "all_match": all(n["match"] for n in nodes)}
    if not args.no_baseline:
        with node_mount(url, workdir / "single", env, args.decode_threads) as m:
            t0 = time.perf_counter()
            one = slice_sum(str(m.mountpoint / array), np.dtype(dtype).str, list(shape), 0, shape[0])
            result["baseline_seconds"] = time.perf_counter() - t0
        result["baseline_match"] = bool(np.isclose(one["sum"], result["numpy_total"], rtol=1e-12))

    out("")
    out("| node | rows | MiB | seconds | MB/s | chunks decoded | sum | numpy | |")
    out("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for n in nodes:
        out(f"| {n['node']} | {n['rows'][0]}:{n['rows'][1]} | {n['mib']:.0f} | {n['seconds']:.2f} | "
            f"{n['mib'] * 2**20 / max(n['seconds'], 1e-9) / 1e6:.0f} | {n['chunks_decoded']} | {n['sum']:.6g} | "
            f"{n['numpy_sum']:.6g} | {'ok' if n['match'] else 'MISMATCH'} |")
    out("")
    out(f"{args.nodes} nodes together: {nbytes / 2**20:.0f} MiB in {wall:.2f} s ({result['gbps']:.2f} GB/s), "
        f"{gets if gets is not None else '?'} chunk GETs for {n_chunks} chunks")
    if "baseline_seconds" in result:
        out(f"1 node, 1 process, whole array: {result['baseline_seconds']:.2f} s "
            f"({nbytes / result['baseline_seconds'] / 1e9:.2f} GB/s)")
    out(f"sum of the node sums {result['total']:.9g}, numpy on the original data {result['numpy_total']:.9g}: "
        f"{'equal' if result['all_match'] else 'DIFFERENT'}")
    out("")
    out(textwrap.fill(" ".join(EXPLANATION.format(chunk_gets=gets if gets is not None else "(not counted)",
                                                  n_chunks=n_chunks, cores=os.cpu_count()).split()), 96))
    return result


if __name__ == "__main__":
    sys.exit(main())
