"""Remote stores: http(s):// and s3:// URLs as STORE, and the disk cache.

Servers run on 127.0.0.1 in subprocesses started and stopped by the fixtures here
(tests/kit/servers.py): Python's http.server with byte ranges, and moto's S3 server. Mounts use
``-o remote_timeout=2s,remote_retries=1`` so a stopped server fails a read in about a second.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import stores
from helpers import assert_same_array, errno_of, pread_full, stored_bytes
from kit import Mount, clean_env, is_mounted, run_zarrfs, wait_until, zarrfs_pids
from kit.servers import HttpServer, MotoServer, make_tls_files, upload_dir

FAST = ["-o", "remote_timeout=2s,remote_retries=1"]
CASES = {fmt: [c for c in stores.BIG_STORES[fmt][0] if not c.skipped] for fmt in (2, 3)}
SCAN_CHUNK = 4096 * 8  # bytes per chunk of the scan store (float64, chunks of 4096)
SCAN_ELEMENTS = 256 * 4096  # 8 MiB: 256 chunks


class RemoteMount(Mount):
    """A Mount whose STORE is a URL (Path() would fold its "//")."""

    def __init__(self, url: str, mountpoint, *args, **kw):
        super().__init__(os.devnull, mountpoint, *args, **kw)
        self.store = url


@pytest.fixture
def remote_mount(tmp_path):
    """remote_mount(url, *args, env=None) -> live RemoteMount, unmounted at teardown."""
    made: list[RemoteMount] = []

    def factory(url, *args, env=None, name=None) -> RemoteMount:
        m = RemoteMount(url, tmp_path / (name or f"rmnt{len(made)}"), *args, env=clean_env(**(env or {})))
        made.append(m)
        return m.start()

    yield factory
    gc.collect()
    for m in reversed(made):
        m.close()


def _consolidate(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of Zarr v3"
        zarr.consolidate_metadata(str(path))


@pytest.fixture(scope="module")
def www(big_stores, tmp_path_factory) -> Path:
    """The directory the HTTP server serves (and the S3 tests upload from):
    big_v{2,3}.zarr consolidated, plain_v{2,3}.zarr not, root_v{2,3}.zarr root arrays
    without consolidated metadata, scan.zarr an 8 MiB array of 32 KiB chunks."""
    base = tmp_path_factory.mktemp("www")
    for fmt, src in big_stores.items():
        shutil.copytree(src, base / f"plain_v{fmt}.zarr")
        shutil.copytree(src, base / f"big_v{fmt}.zarr")
        _consolidate(base / f"big_v{fmt}.zarr")
        stores.build_root_array_store(base / f"root_v{fmt}.zarr", fmt)
    stores.build_simple_store(base / "scan.zarr", 3, shape=(SCAN_ELEMENTS,), chunks=(4096,))
    _consolidate(base / "scan.zarr")
    return base


@functools.lru_cache(maxsize=None)
def expected(store: str, path: str) -> np.ndarray:
    return stores.expected_array(store, path)


@pytest.fixture(scope="module")
def http_server(www, tmp_path_factory):
    server = HttpServer(www, tmp_path_factory.mktemp("http"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def scan_server(www, tmp_path):
    """A server of its own, for tests that stop and restart it."""
    server = HttpServer(www, tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


def check_tree(root: Path, fmt: int) -> None:
    cases, empty = stores.BIG_STORES[fmt]
    for d, entries in stores.expected_tree(cases, empty).items():
        assert sorted(os.listdir(root / d)) == sorted(entries), f"listing of /{d}"


def check_every_array(m: Mount, local_store: Path, fmt: int) -> None:
    """Every byte of every array, flat file and .npy, against zarr-python's reading."""
    for case in CASES[fmt]:
        exp = expected(str(local_store), case.path)
        flat = m.path(case.path)
        data = flat.read_bytes()
        assert data == exp.tobytes(), f"{case.id}: flat file differs"
        arr = np.load(flat.with_name(flat.name + ".npy"), mmap_mode="r")
        try:
            assert_same_array(np.asarray(arr), exp, f"{case.id}.npy")
        finally:
            del arr


def scan_expected(www: Path) -> bytes:
    return expected(str(www / "scan.zarr"), "data").tobytes()


def refused(result, url: str, *needles: str) -> str:
    """The mount failed the documented way: exit 1, one line naming the store."""
    assert result.returncode == 1, f"exit {result.returncode}: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr!r}"
    assert lines[0].startswith(f"zarrfs: {url}: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.split()[0])


# --------------------------------------------------------------------------
# plain HTTP
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_http_consolidated_every_byte(http_server, www, remote_mount, fmt):
    m = remote_mount(http_server.url(f"big_v{fmt}.zarr"), *FAST)
    check_tree(m.path(), fmt)
    check_every_array(m, www / f"big_v{fmt}.zarr", fmt)
    # files and directories carry the root metadata's Last-Modified (whole seconds over HTTP)
    root_doc = www / f"big_v{fmt}.zarr" / ("zarr.json" if fmt == 3 else ".zmetadata")
    for p in (m.path(), m.path(CASES[fmt][0].path)):
        assert int(p.stat().st_mtime) == int(root_doc.stat().st_mtime), p
    m.assert_live()


def test_http_shard_subchunks_use_byte_ranges(http_server, www, remote_mount):
    m = remote_mount(http_server.url("big_v3.zarr"), *FAST)
    exp = expected(str(www / "big_v3.zarr"), "sharding/partial").tobytes()
    http_server.clear_requests()
    fd = os.open(m.path("sharding/partial"), os.O_RDONLY)
    try:
        assert pread_full(fd, 8, 0) == exp[:8]
    finally:
        os.close(fd)
    shard = [r for r in http_server.requests() if "/sharding/partial/c/" in r[1]]
    assert shard, http_server.requests()
    assert all(r[2].startswith("bytes=") for r in shard), f"whole-shard GETs: {shard}"


@pytest.mark.parametrize("fmt", [2, 3])
def test_http_root_array_needs_no_listing(http_server, www, remote_mount, fmt):
    m = remote_mount(http_server.url(f"root_v{fmt}.zarr"), *FAST)
    name = f"root_v{fmt}"
    assert sorted(os.listdir(m.path())) == [name, name + ".npy"]
    exp = stores.expected_array(www / f"root_v{fmt}.zarr", "")
    assert m.path(name).read_bytes() == exp.tobytes()


def test_https_with_a_trusted_ca_every_byte(www, tmp_path, remote_mount, guard_paths):
    """HTTPS against a server whose certificate a CA made for the test signed: trusted through
    SSL_CERT_FILE (the system's CA bundle otherwise), refused with a one-line error without it."""
    ca, cert, key = make_tls_files(tmp_path)
    with HttpServer(www, tmp_path, tls=(cert, key)).start() as server:
        url = server.url("big_v3.zarr")
        assert url.startswith("https://")
        m = remote_mount(url, *FAST, env={"SSL_CERT_FILE": str(ca)})
        check_every_array(m, www / "big_v3.zarr", 3)
        m.assert_live()

        mp = tmp_path / "untrusted"
        mp.mkdir()
        guard_paths.append(str(mp))
        refused(run_zarrfs("mount", url, mp, *FAST, env=clean_env()), url, "invalid peer certificate", "SSL_CERT_FILE")
        assert not is_mounted(mp)


@pytest.mark.parametrize("fmt", [2, 3])
def test_http_without_consolidated_metadata_is_refused(http_server, tmp_path, guard_paths, fmt):
    url = http_server.url(f"plain_v{fmt}.zarr")
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    line = refused(run_zarrfs("mount", url, mp, *FAST), url, "cannot list a plain HTTP store",
                   "consolidated metadata")
    assert "zarr.consolidate_metadata" in line
    assert not is_mounted(mp)
    assert not zarrfs_pids(str(mp))


def test_http_missing_store_and_dead_server(http_server, www, tmp_path, guard_paths):
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    url = http_server.url("nothere.zarr")
    refused(run_zarrfs("mount", url, mp, *FAST), url, "not a Zarr store")
    dead = HttpServer(www, tmp_path).start()
    url = dead.url("big_v3.zarr")
    dead.stop()
    started = time.monotonic()
    refused(run_zarrfs("mount", url, mp, *FAST), url, "zarr.json")
    assert time.monotonic() - started < 30
    assert not is_mounted(mp)


def test_info_over_http(http_server):
    r = run_zarrfs("info", "--json", http_server.url("big_v3.zarr"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(a["path"] for a in doc["arrays"]) == sorted("/" + c.path for c in CASES[3])
    assert all(a["stored_bytes"] is None for a in doc["arrays"]), "plain HTTP cannot be listed"


def test_info_over_s3_sums_the_listing(s3, www):
    r = run_zarrfs("info", "--json", f"s3://{BUCKET}/listed/big_v3.zarr", env=clean_env(**s3.client_env()))
    assert r.returncode == 0, r.stderr
    for a in json.loads(r.stdout)["arrays"]:
        local = www / "plain_v3.zarr" / a["path"].lstrip("/")
        assert a["stored_bytes"] == stored_bytes(local), a["path"]


# --------------------------------------------------------------------------
# faults: a server that goes away and comes back
# --------------------------------------------------------------------------


def test_server_down_fails_reads_with_eio_then_recovers(scan_server, www, remote_mount, tmp_path):
    exp = scan_expected(www)
    log = tmp_path / "daemon.log"
    m = remote_mount(scan_server.url("scan.zarr"), *FAST, "--log-file", log)
    tail = len(exp) - 3 * SCAN_CHUNK + 100  # far beyond readahead and prefetch of the head
    fd = os.open(m.path("data"), os.O_RDONLY)
    try:
        assert pread_full(fd, 65536, 0) == exp[:65536]
        scan_server.stop()
        # Ranges already read are still served.
        assert pread_full(fd, 65536, 0) == exp[:65536]
        # A range whose chunk was never fetched fails with EIO, quickly.
        started = time.monotonic()
        assert errno_of(os.pread, fd, 4096, tail) == errno.EIO
        assert time.monotonic() - started < 20
        m.assert_live()
        key = f"data/c/{tail // SCAN_CHUNK}"
        assert wait_until(lambda: key in log.read_text(), 5), f"log does not name {key}: {log.read_text()}"
        # The server comes back on the same port: the same read works, no remount.
        scan_server.restart()
        assert pread_full(fd, 4096, tail) == exp[tail:tail + 4096]
    finally:
        os.close(fd)
    assert m.path("data").read_bytes() == exp
    m.assert_live()


def test_unresponsive_server_times_out_then_recovers(scan_server, www, remote_mount):
    exp = scan_expected(www)
    m = remote_mount(scan_server.url("scan.zarr"), "-o", "remote_timeout=1s,remote_retries=0")
    tail = len(exp) - 3 * SCAN_CHUNK + 100
    fd = os.open(m.path("data"), os.O_RDONLY)
    try:
        assert pread_full(fd, 65536, 0) == exp[:65536]
        scan_server.freeze()  # connects, never answers: only the request timeout ends a fetch
        try:
            started = time.monotonic()
            assert errno_of(os.pread, fd, 4096, tail) == errno.EIO
            assert time.monotonic() - started < 20
            m.assert_live()
        finally:
            scan_server.thaw()
        # The thawed server first answers the requests queued while it was stopped (up to one
        # per decode thread, long abandoned), so a new 1 s request may still time out: poll.
        assert wait_until(lambda: errno_of(os.pread, fd, 4096, tail) is None, 20), "no recovery after thaw"
        assert pread_full(fd, 4096, tail) == exp[tail:tail + 4096]
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# disk cache
# --------------------------------------------------------------------------


def test_disk_cache_stays_within_its_bound(scan_server, www, remote_mount, tmp_path):
    exp = scan_expected(www)
    cache = tmp_path / "dcache"
    bound = 1 << 20
    args = [*FAST, "--disk-cache", cache, "--disk-cache-size", "1M"]
    # Two daemons share the directory; each scans 8 MiB through a 1 MiB cache.
    m1 = remote_mount(scan_server.url("scan.zarr"), *args)
    m2 = remote_mount(scan_server.url("scan.zarr"), *args)
    for m in (m1, m2):
        assert m.path("data").read_bytes() == exp
        assert du_bytes(cache) <= bound, f"disk cache uses {du_bytes(cache)} > {bound}"
    assert len(os.listdir(cache / "objects")) > 5


def test_disk_cache_serves_a_remount_while_the_server_is_down(scan_server, www, remote_mount, tmp_path,
                                                               guard_paths):
    exp = scan_expected(www)
    url = scan_server.url("scan.zarr")
    cache = tmp_path / "dcache"
    args = [*FAST, "-o", f"disk_cache={cache},disk_cache_size=64M"]
    m = remote_mount(url, *args, name="first")
    assert m.path("data").read_bytes() == exp
    m.close()
    scan_server.stop()
    # Without the cache the store cannot even be opened...
    mp = tmp_path / "nocache"
    mp.mkdir()
    guard_paths.append(str(mp))
    refused(run_zarrfs("mount", url, mp, *FAST), url)
    # ...with it, metadata and every chunk come from the disk.
    m = remote_mount(url, *args, name="second")
    assert m.path("data").read_bytes() == exp
    m.assert_live()


# --------------------------------------------------------------------------
# S3 (moto's server)
# --------------------------------------------------------------------------

BUCKET = "zarrfs-test"


@pytest.fixture(scope="module")
def s3(www, tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        server.start()
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        upload_dir(client, BUCKET, "listed/big_v3.zarr", www / "plain_v3.zarr")
        upload_dir(client, BUCKET, "consolidated/big_v2.zarr", www / "big_v2.zarr", public=True)
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("prefix,fmt", [("listed", 3), ("consolidated", 2)], ids=["listed-v3", "consolidated-v2"])
def test_s3_every_byte(s3, www, remote_mount, prefix, fmt):
    m = remote_mount(f"s3://{BUCKET}/{prefix}/big_v{fmt}.zarr", *FAST, env=s3.client_env())
    check_tree(m.path(), fmt)
    check_every_array(m, www / f"big_v{fmt}.zarr", fmt)
    m.assert_live()


def test_s3_anonymous_access(s3, www, remote_mount):
    m = remote_mount(f"s3://{BUCKET}/consolidated/big_v2.zarr", *FAST, env=s3.client_env(anonymous=True))
    exp = expected(str(www / "big_v2.zarr"), "compressors/blosc_zstd")
    assert m.path("compressors/blosc_zstd").read_bytes() == exp.tobytes()


def test_s3_missing_prefix(s3, tmp_path, guard_paths):
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    url = f"s3://{BUCKET}/nothere.zarr"
    refused(run_zarrfs("mount", url, mp, *FAST, env=clean_env(**s3.client_env())), url, "not a Zarr store")
    assert not is_mounted(mp)


# --------------------------------------------------------------------------
# writes (-o rw): S3 only
# --------------------------------------------------------------------------

RW_SHAPE, RW_CHUNKS, RW_SHARDS = (64, 64), (16, 16), (32, 32)


def _make_rw_store(path: Path) -> dict[str, np.ndarray]:
    """A v3 group with a plain and a sharded float64 array (fill value 0); returns the data."""
    rng = np.random.default_rng(11)
    data = {}
    for name, shards in [("plain", None), ("sharded", RW_SHARDS)]:
        a = rng.standard_normal(RW_SHAPE) + 10  # never the fill value
        z = zarr.create_array(str(path), name=name, shape=RW_SHAPE, chunks=RW_CHUNKS, shards=shards,
                              dtype="f8", fill_value=0.0)
        z[:] = a
        data[name] = a
    return data


def _objects(client, prefix: str) -> dict[str, str]:
    """key (relative to prefix) -> ETag of every object under prefix."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1:]] = o["ETag"]
    return out


def _download(client, prefix: str, dest: Path) -> Path:
    for key in _objects(client, prefix):
        p = dest / key
        p.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"{prefix}/{key}", str(p))
    return dest


def _edit(m: Mount, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write through the mount with np.memmap r+ and pwrite; returns the expected arrays.
    plain: chunk (0,0) rewritten, one element of chunk (1,0), chunk (1,2) set to the fill value
    (deleted), chunk (3,3) by pwrite. sharded: one element of shard (1,1), shard (0,1) all fill."""
    exp = {k: v.copy() for k, v in data.items()}
    exp["plain"][0:16, 0:16] = 7.0
    exp["plain"][20, 5] = -1.0
    exp["plain"][16:32, 32:48] = 0.0
    exp["plain"][48:64, 48:64] = np.arange(256, dtype="f8").reshape(16, 16)
    exp["sharded"][40, 40] = 123.5
    exp["sharded"][0:32, 32:64] = 0.0
    a = np.memmap(m.path("plain"), dtype="f8", mode="r+", shape=RW_SHAPE)
    a[0:16, 0:16] = 7.0
    a[20, 5] = -1.0
    a[16:32, 32:48] = 0.0
    a.flush()
    del a
    fd = os.open(m.path("plain"), os.O_RDWR)
    try:
        for r in range(48, 64):
            row = exp["plain"][r, 48:64].tobytes()
            assert os.pwrite(fd, row, (r * RW_SHAPE[1] + 48) * 8) == len(row)
        os.fsync(fd)
    finally:
        os.close(fd)
    s = np.load(m.path("sharded.npy"), mmap_mode="r+")
    s[40, 40] = 123.5
    s[0:32, 32:64] = 0.0
    s.flush()
    del s
    return exp


@pytest.mark.parametrize("cached", [False, True], ids=["direct", "disk-cache"])
def test_s3_rw_round_trip(s3, remote_mount, tmp_path, cached):
    client = s3.client()
    prefix = f"rw-{'cached' if cached else 'direct'}/data.zarr"
    data = _make_rw_store(tmp_path / "data.zarr")
    upload_dir(client, BUCKET, prefix, tmp_path / "data.zarr")
    url = f"s3://{BUCKET}/{prefix}"
    cache_args = ["--disk-cache", tmp_path / "dcache"] if cached else []
    if cached:
        # Every chunk in the disk cache first: the write must replace the cached copies.
        m = remote_mount(url, *FAST, *cache_args, env=s3.client_env(), name="warm")
        for name in data:
            assert m.path(name).read_bytes() == data[name].tobytes()
        m.close()
    before = _objects(client, prefix)

    m = remote_mount(url, *FAST, *cache_args, "-o", "rw", env=s3.client_env(), name="rw")
    exp = _edit(m, data)
    # msync / fsync returned: the objects are already in the bucket, before the unmount.
    after = _objects(client, prefix)
    for name in data:
        assert m.path(name).read_bytes() == exp[name].tobytes(), f"{name} through the rw mount"
    m.close()
    assert _objects(client, prefix) == after, "the unmount stored something the syncs had not"

    changed = {k for k in after if k in before and after[k] != before[k]}
    # Pages written back through a memmap span whole rows, so chunks beside the written ones
    # may be stored again with the same values (zarrs lays out shards unlike zarr-python, so
    # such shards get new objects); rows 32..47 were never written at all.
    assert {"plain/c/0/0", "plain/c/1/0", "plain/c/3/3", "sharded/c/1/1"} <= changed, changed
    assert not {k for k in changed if k.startswith("plain/c/2/")}, changed
    assert set(before) - set(after) == {"plain/c/1/2", "sharded/c/0/1"}, "fill-value chunks are deleted"
    assert set(after) <= set(before)

    # zarr-python reads what was written (the bucket's objects, downloaded as they are).
    local = _download(client, prefix, tmp_path / "downloaded.zarr")
    for name in data:
        assert_same_array(zarr.open_array(str(local), path=name, mode="r")[:], exp[name], f"zarr-python {name}")
    # A fresh read-only mount (with the same disk cache when there is one) sees the new data.
    m = remote_mount(url, *FAST, *cache_args, env=s3.client_env(), name="reread")
    for name in data:
        assert m.path(name).read_bytes() == exp[name].tobytes(), f"{name} after remount"


def test_http_rw_is_refused(http_server, tmp_path, guard_paths):
    url = http_server.url("big_v3.zarr")
    mp = tmp_path / "mnt"
    mp.mkdir()
    guard_paths.append(str(mp))
    for args in (["-o", "rw"], ["--rw"]):
        line = refused(run_zarrfs("mount", url, mp, *FAST, *args), url)
        assert line == f"zarrfs: {url}: writable mounts need S3; plain HTTP stores are read-only"
        assert not is_mounted(mp)
        assert not zarrfs_pids(str(mp))
