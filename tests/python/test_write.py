"""Writable mounts (``zarrfs mount -o rw``) and ``zarrfs create``, end to end.

Every test builds its own small store under tmp_path, writes through the mount with
pwrite / np.memmap / np.load(mmap_mode="r+") / dd / several processes, and checks the
result two ways: through the mount while it is live (from another process, with the
page cache dropped so the daemon answers), and with zarr-python reading the store
after the daemon has exited. A numpy byte model of the flat file is the reference.

Mounts default to ``writeback_secs=3600`` so that the only write-backs are the ones a
test asks for (fsync, msync, close, unmount, cache pressure).
"""

from __future__ import annotations

import errno
import gc
import hashlib
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

import stores
from helpers import describe_mismatch, errno_of, read_npy_header
from kit import Mount, clean_env, force_unmount, is_mounted, run, run_zarrfs, wait_until, zarrfs_pids

RW = ("-o", "rw,writeback_secs=3600")
TMP_GLOB = ".*.zarrfs-*.tmp"  # temporary files of an atomic chunk replacement


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


class Model:
    """The expected bytes of an array's flat file (C order, native endian)."""

    def __init__(self, arr: np.ndarray):
        self.dtype = arr.dtype
        self.shape = arr.shape
        self.buf = bytearray(np.ascontiguousarray(arr).tobytes())

    def write(self, offset: int, data: bytes) -> None:
        assert offset + len(data) <= len(self.buf)
        self.buf[offset:offset + len(data)] = data

    def array(self) -> np.ndarray:
        return np.frombuffer(bytes(self.buf), self.dtype).reshape(self.shape)

    def set(self, sel, values) -> None:
        a = self.array().copy()
        a[sel] = values
        self.buf = bytearray(a.tobytes())


def new_values(dtype, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` ordinary values of ``dtype`` (no NaN/inf, bools 0/1): byte-exact round trips."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(n) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, n, endpoint=True, dtype=dt)
    return (rng.standard_normal(n) * 100 + 1).astype(dt)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    n = os.pwrite(fd, data, offset)
    assert n == len(data), f"short pwrite: {n} of {len(data)} at {offset}"


def drop_cache(*paths) -> None:
    """Drop the (clean, unmapped) page-cache pages of files so the next read asks the daemon."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_READER = r"""
import hashlib, os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    h = hashlib.sha256()
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        h.update(b)
    os.close(fd)
    print(h.hexdigest())
"""


def check_other_process_sees(expected: dict) -> None:
    """Another process (page cache dropped first) reads each path and gets exactly the bytes."""
    paths = list(expected)
    r = run([sys.executable, "-c", _READER, *paths], env=clean_env())
    assert r.returncode == 0, f"reader process failed: {r.stderr}"
    got = r.stdout.split()
    for p, h in zip(paths, got):
        exp = expected[p]
        if h != hashlib.sha256(exp).hexdigest():
            drop_cache(p)
            data = Path(p).read_bytes()
            pytest.fail(f"another process reading {p} through the mount: {describe_mismatch(data, exp)}")


def zarr_array(store, path: str = "arr") -> np.ndarray:
    """The array as zarr-python reads it from the store, C order, native endian."""
    return stores.expected_array(store, path)


def assert_store_equals(store, model: Model, path: str = "arr", what: str = "store") -> None:
    got = zarr_array(store, path)
    exp = model.array()
    assert got.shape == exp.shape and got.dtype == exp.dtype, f"{what}: {got.shape} {got.dtype} vs {exp.shape} {exp.dtype}"
    gb, eb = got.tobytes(), exp.tobytes()
    if gb != eb:
        pytest.fail(f"{what}: zarr-python reads {describe_mismatch(gb, eb, exp.dtype)}")


def tmp_files(store) -> list[Path]:
    return sorted(Path(store).rglob(TMP_GLOB))


def metadata_bytes(store, path: str = "arr") -> dict:
    d = Path(store, path)
    return {n: (d / n).read_bytes() for n in ("zarr.json", ".zarray", ".zattrs") if (d / n).exists()}


def make_case_store(tmp_path, case: stores.ArrayCase) -> Path:
    store = tmp_path / f"{case.id}.zarr"
    zarr.open_group(store=str(store), mode="w", zarr_format=case.zarr_format)
    stores.write_case(store, case)
    return store


def make_store(tmp_path, name: str, data: np.ndarray | None = None, *, shape=None, dtype=None, zarr_format=3,
               path: str = "arr", **kwargs) -> Path:
    store = tmp_path / name
    zarr.open_group(store=str(store), mode="w", zarr_format=zarr_format)
    if data is not None:
        zarr.create_array(store=str(store), name=path, data=data, zarr_format=zarr_format, **kwargs)
    else:
        zarr.create_array(store=str(store), name=path, shape=shape, dtype=dtype, zarr_format=zarr_format, **kwargs)
    return store


def kill9(m: Mount) -> None:
    """SIGKILL the foreground daemon of ``m`` and reap it (the dead mount stays until unmounted)."""
    assert m.proc is not None and m.proc.poll() is None, "daemon is not running"
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait(timeout=10)


def _case(id, fmt, shape, dtype, chunks, write="full", **kw) -> stores.ArrayCase:
    return stores.ArrayCase(id, "arr", fmt, tuple(shape), dtype, tuple(chunks), kw, write, None)


# --------------------------------------------------------------------------
# 1. write patterns, every format / codec / layout / dtype
# --------------------------------------------------------------------------

PATTERN_CASES = [
    _case("v2-zstd-f4", 2, (50, 70), "<f4", (16, 20), compressors=numcodecs.Zstd(level=3)),
    _case("v2-blosc-i2", 2, (50, 70), "<i2", (16, 20),
          compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)),
    _case("v2-gzip-f8", 2, (50, 70), "<f8", (16, 20), compressors=numcodecs.GZip(level=5)),
    _case("v2-none-u1", 2, (50, 70), "|u1", (16, 20), compressors=None),
    _case("v2-bool", 2, (50, 70), "|b1", (16, 20)),
    _case("v2-orderF-i4-3d", 2, (20, 30, 40), "<i4", (8, 16, 12), order="F"),
    _case("v2-orderF-f8-nocomp", 2, (33, 47), "<f8", (10, 10), order="F", compressors=None),
    _case("v2-bigendian-i4", 2, (50, 70), ">i4", (16, 20)),
    _case("v2-missing-chunks-fill42", 2, (50, 70), "<i2", (16, 20), write="partial", fill_value=42),
    _case("v3-zstd-f4", 3, (50, 70), "float32", (16, 20), compressors=ZstdCodec(level=3)),
    _case("v3-blosc-f8", 3, (50, 70), "float64", (16, 20), compressors=BloscCodec(cname="lz4", clevel=5,
                                                                                      shuffle="shuffle")),
    _case("v3-gzip-i2", 3, (50, 70), "int16", (16, 20), compressors=GzipCodec(level=5)),
    _case("v3-none-u1", 3, (50, 70), "uint8", (16, 20), compressors=None),
    _case("v3-bool", 3, (50, 70), "bool", (16, 20)),
    _case("v3-bigendian-i4", 3, (50, 70), "int32", (16, 20), serializer=BytesCodec(endian="big")),
    _case("v3-shard-partial-f8", 3, (100, 75), "float64", (8, 6), shards=(32, 24)),
    _case("v3-shard-missing-i4", 3, (100, 75), "int32", (8, 6), write="partial", shards=(32, 24), fill_value=7),
    _case("v3-missing-chunks-nan", 3, (50, 70), "float32", (16, 20), write="partial", fill_value=np.nan),
    _case("v3-1d-u1-edge", 3, (1001,), "uint8", (300,)),
]


@pytest.mark.parametrize("case", PATTERN_CASES, ids=[c.id for c in PATTERN_CASES])
def test_write_patterns_roundtrip(mount_factory, tmp_path, case):
    store = make_case_store(tmp_path, case)
    meta_before = metadata_bytes(store)
    model = Model(zarr_array(store))
    dt, shape, itemsize = model.dtype, model.shape, model.dtype.itemsize
    chunks = case.chunks  # for a sharded array: the inner chunks
    nelem = int(np.prod(shape))
    size = len(model.buf)
    row = int(np.prod(shape[1:]))  # elements per index of axis 0
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))

    m = mount_factory(store, *RW)
    flat, npy = m.path("arr"), m.path("arr.npy")
    assert stat.S_IMODE(os.stat(flat).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(npy).st_mode) == 0o644
    hl = read_npy_header(npy)[0]
    header = npy.read_bytes()[:hl]
    drop_cache(npy)

    fd = os.open(flat, os.O_RDWR)
    nfd = os.open(npy, os.O_RDWR)
    try:
        # -- phase 1: pwrite, both files ----------------------------------
        # single bytes at unaligned offsets (byte 1 of an element: a mantissa byte for floats)
        for e in rng.choice(np.arange(16, nelem), 6, replace=False):
            off = int(e) * itemsize + (1 if itemsize > 1 else 0)
            cur = model.buf[off]
            b = 1 - cur if dt.kind == "b" else cur ^ int(rng.integers(1, 256))
            pwrite_all(fd, bytes([b]), off)
            model.write(off, bytes([b]))
        # a range crossing a chunk boundary of the last axis
        start = (min(3, shape[0] - 1) * row if len(shape) > 1 else 0) + chunks[-1] - 3
        n = min(chunks[-1] + 7, nelem - start)
        data = new_values(dt, n, rng).tobytes()
        pwrite_all(fd, data, start * itemsize)
        model.write(start * itemsize, data)
        # a range crossing a chunk boundary of axis 0 and many chunks of the other axes
        start = (chunks[0] - 1) * row + 5 if len(shape) > 1 else 2 * chunks[0] - 5
        n = min(2 * row + 11 if len(shape) > 1 else chunks[0] + 20, nelem - start)
        data = new_values(dt, n, rng).tobytes()
        pwrite_all(fd, data, start * itemsize)
        model.write(start * itemsize, data)
        # integers: an unaligned range of arbitrary bytes across a chunk boundary
        if dt.kind in "iu":
            off = (2 * chunks[-1] - 2) * itemsize + 1
            data = rng.integers(0, 256, min(3 * chunks[-1] * itemsize, size - off), dtype=np.uint8).tobytes()
            pwrite_all(fd, data, off)
            model.write(off, data)
        # the last elements (edge chunk), ending exactly at EOF, through the .npy view
        data = new_values(dt, 5, rng).tobytes()
        pwrite_all(nfd, data, hl + size - len(data))
        model.write(size - len(data), data)
        # one unaligned byte through the .npy view
        off = (nelem // 2) * itemsize + (1 if itemsize > 1 else 0)
        b = 1 - model.buf[off] if dt.kind == "b" else model.buf[off] ^ 0x5A
        pwrite_all(nfd, bytes([b]), hl + off)
        model.write(off, bytes([b]))

        # -- readers see the writes before any flush (fds still open) ----
        check_other_process_sees({str(flat): bytes(model.buf), str(npy): header + bytes(model.buf)})
        drop_cache(flat, npy)

        # -- phase 2: shared writable mappings -----------------------------
        grid = [-(-s // c) for s, c in zip(shape, chunks)]
        mm = np.memmap(flat, dtype=dt, mode="r+", shape=shape)
        for idx in {tuple(min(1, g - 1) for g in grid), tuple(g - 1 for g in grid)}:  # a whole chunk, the edge chunk
            sel = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
            vals = new_values(dt, int(np.prod([s.stop - s.start for s in sel])), rng)
            vals = vals.reshape([s.stop - s.start for s in sel])
            mm[sel] = vals
            model.set(sel, vals)
        mm.flush()
        del mm
        gc.collect()
        drop_cache(flat, npy)
        arr = np.load(npy, mmap_mode="r+")
        assert arr.shape == shape and arr.dtype == dt
        sel = tuple(slice(c // 2, min(s, c // 2 + c + 3)) for c, s in zip(chunks, shape))  # spans chunks
        vals = new_values(dt, int(np.prod([s.stop - s.start for s in sel])), rng)
        vals = vals.reshape([s.stop - s.start for s in sel])
        arr[sel] = vals
        model.set(sel, vals)
        arr.flush()
        del arr
        gc.collect()
        drop_cache(flat, npy)
        check_other_process_sees({str(flat): bytes(model.buf), str(npy): header + bytes(model.buf)})
    finally:
        os.close(fd)
        os.close(nfd)
    m.close()

    assert_store_equals(store, model, what=f"{case.id} after unmount")
    assert metadata_bytes(store) == meta_before, "a writable mount rewrote the array metadata"
    assert not tmp_files(store), f"temporary files left after a clean unmount: {tmp_files(store)}"


# --------------------------------------------------------------------------
# NAME and NAME.npy are two inodes over the same bytes: a write through one must
# show in the other even when the other's pages are already cached
# --------------------------------------------------------------------------


def _two_view_store(tmp_path) -> Path:
    return make_store(tmp_path, "views.zarr", np.arange(4096, dtype="i4"), chunks=(512,))


def test_write_through_flat_visible_in_cached_npy_view(mount_factory, tmp_path):
    store = _two_view_store(tmp_path)
    m = mount_factory(store, *RW)
    hl = read_npy_header(m.path("arr.npy"))[0]
    m.path("arr.npy").read_bytes()  # .npy pages now cached
    fd = os.open(m.path("arr"), os.O_WRONLY)
    try:
        pwrite_all(fd, np.int32(-1).tobytes(), 100 * 4)
    finally:
        os.close(fd)
    with open(m.path("arr.npy"), "rb") as f:
        f.seek(hl + 100 * 4)
        got = np.frombuffer(f.read(4), "i4")[0]
    assert got == -1, f"NAME.npy still reads element 100 as {got} after NAME was written"


def test_no_lost_update_across_views(mount_factory, tmp_path):
    store = _two_view_store(tmp_path)
    m = mount_factory(store, *RW)
    m.path("arr.npy").read_bytes()  # .npy pages now cached
    fd = os.open(m.path("arr"), os.O_WRONLY)
    try:
        pwrite_all(fd, np.int32(-1).tobytes(), 100 * 4)  # element 100, stored at close
    finally:
        os.close(fd)
    arr = np.load(m.path("arr.npy"), mmap_mode="r+")
    arr[200] = -2  # same page as element 100
    arr.flush()
    del arr
    gc.collect()
    m.close()
    z = zarr_array(store)
    assert (z[100], z[200]) == (-1, -2), f"store has element 100 = {z[100]}, element 200 = {z[200]}"


def test_open_reader_of_npy_view_sees_writes_through_flat_file(mount_factory, tmp_path):
    """A reader keeps NAME.npy open (pages cached) while another fd writes NAME: the kernel is
    told to drop the stale pages before the write returns, so the open reader's next read sees
    the new value, every time, in either direction."""
    store = _two_view_store(tmp_path)
    m = mount_factory(store, *RW)
    hl = read_npy_header(m.path("arr.npy"))[0]
    nfd = os.open(m.path("arr.npy"), os.O_RDWR)
    ffd = os.open(m.path("arr"), os.O_RDWR)
    try:
        assert np.frombuffer(os.pread(nfd, 4, hl + 300 * 4), "i4")[0] == 300
        n_elems = os.fstat(ffd).st_size // 4
        stale = []
        for i in range(1, 401):
            at = (i * 1021) % n_elems * 4
            os.pread(nfd, 4, hl + at)  # the .npy page is cached
            pwrite_all(ffd, np.int32(-i).tobytes(), at)
            if np.frombuffer(os.pread(nfd, 4, hl + at), "i4")[0] != -i:
                stale.append(f"npy after flat write {i}")
            os.pread(ffd, 4, at)  # the other way round: the flat page is cached
            pwrite_all(nfd, np.int32(i).tobytes(), hl + at)
            if np.frombuffer(os.pread(ffd, 4, at), "i4")[0] != i:
                stale.append(f"flat after npy write {i}")
        assert not stale, f"{len(stale)} of 800 reads right after a write through the other view were stale: {stale[:5]}"
    finally:
        os.close(ffd)
        os.close(nfd)


# --------------------------------------------------------------------------
# 2. dd
# --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", [2, 3])
def test_dd_notrunc_updates_array(mount_factory, tmp_path, fmt):
    rng = np.random.default_rng(fmt)
    store = make_store(tmp_path, "dd.zarr", new_values("f4", 200 * 300, rng).reshape(200, 300),
                       zarr_format=fmt, chunks=(64, 64))
    model = Model(zarr_array(store))
    payload = new_values("f4", 5 * 4096 // 4, rng).tobytes()
    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x11\x22\x33")
    m = mount_factory(store, *RW)
    r = run(["dd", f"if={src}", f"of={m.path('arr')}", "bs=4096", "seek=7", "conv=notrunc", "status=none"])
    assert r.returncode == 0, f"dd failed: {r.stderr}"
    model.write(7 * 4096, payload)
    # bs=1: three one-byte writes into bytes 0..2 of element 1001 (the sign and the upper
    # exponent bits, in byte 3, stay: the value stays finite)
    r = run(["dd", f"if={odd}", f"of={m.path('arr')}", "bs=1", f"seek={1001 * 4}", "conv=notrunc", "status=none"])
    assert r.returncode == 0, f"dd failed: {r.stderr}"
    model.write(1001 * 4, odd.read_bytes())
    check_other_process_sees({str(m.path("arr")): bytes(model.buf)})
    m.close()
    assert_store_equals(store, model, what="after dd and unmount")


# --------------------------------------------------------------------------
# 3. durability: once fsync / msync / close returned, kill -9 loses nothing
# --------------------------------------------------------------------------

SYNCS = ["fsync", "fdatasync", "close", "memmap-flush", "npy-memmap-flush"]


@pytest.mark.parametrize("fmt,how", [(3, h) for h in SYNCS] + [(2, "fsync"), (2, "memmap-flush")],
                         ids=[f"v3-{h}" for h in SYNCS] + ["v2-fsync", "v2-memmap-flush"])
def test_durable_after_sync_then_kill9(zarrfs_bin, tmp_path, fmt, how):
    rng = np.random.default_rng(len(how) + fmt)
    store = make_store(tmp_path, "dur.zarr", new_values("i4", 120 * 90, rng).reshape(120, 90),
                       zarr_format=fmt, chunks=(32, 25))
    model = Model(zarr_array(store))
    m = Mount(store, tmp_path / "mnt", *RW, foreground=True)
    with m:
        sel = (slice(10, 70), slice(20, 80))  # several chunks, partial ones
        vals = new_values("i4", 60 * 60, rng).reshape(60, 60)
        model.set(sel, vals)
        if how in ("fsync", "fdatasync", "close"):
            fd = os.open(m.path("arr"), os.O_RDWR)
            try:
                for r in range(10, 70):
                    pwrite_all(fd, vals[r - 10].tobytes(), (r * 90 + 20) * 4)
                if how == "fsync":
                    os.fsync(fd)
                elif how == "fdatasync":
                    os.fdatasync(fd)
                else:
                    os.close(fd)
                    fd = None
                kill9(m)
            finally:
                if fd is not None:
                    _close_quietly(fd)
        else:
            if how == "memmap-flush":
                mm = np.memmap(m.path("arr"), dtype="i4", mode="r+", shape=(120, 90))
            else:
                mm = np.load(m.path("arr.npy"), mmap_mode="r+")
            mm[sel] = vals
            mm.flush()
            del mm
            gc.collect()
            kill9(m)
        force_unmount(m.mp_real)
        assert not is_mounted(m.mp_real), "dead mount could not be removed"
    assert_store_equals(store, model, what=f"store after {how} then kill -9")


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # the daemon is dead: the close's FUSE flush fails


# --------------------------------------------------------------------------
# write-back triggers other than sync: interval, memory pressure, unmount
# --------------------------------------------------------------------------


def test_periodic_writeback(mount_factory, tmp_path):
    store = make_store(tmp_path, "wb.zarr", np.zeros((64, 64), "i4"), chunks=(16, 16))
    model = Model(zarr_array(store))
    m = mount_factory(store, "-o", "rw,writeback_secs=1")
    fd = os.open(m.path("arr"), os.O_RDWR)
    try:
        data = np.arange(1, 200, dtype="i4").tobytes()
        pwrite_all(fd, data, 1000)
        model.write(1000, data)
        # fd stays open, no fsync: only the 1 s write-back can store it
        ok = wait_until(lambda: zarr_array(store).tobytes() == bytes(model.buf), timeout=10, interval=0.1)
        assert ok, "writeback_secs=1: data not in the store 10 s after the write"
    finally:
        os.close(fd)


def test_cache_pressure_writes_back_during_the_write(mount_factory, tmp_path):
    n_chunks, chunk = 64, 16384  # 64 KiB chunks, 4 MiB
    rng = np.random.default_rng(5)
    store = make_store(tmp_path, "press.zarr", new_values("f4", n_chunks * chunk, rng), chunks=(chunk,))
    old = zarr_array(store)
    new = new_values("f4", n_chunks * chunk, rng)
    m = mount_factory(store, "-o", "rw,writeback_secs=3600", "--cache-size", "1M")
    fd = os.open(m.path("arr"), os.O_RDWR)
    try:
        for i in range(n_chunks):
            pwrite_all(fd, new[i * chunk:(i + 1) * chunk].tobytes(), i * chunk * 4)
        # fd still open, no fsync, no interval: only pressure (dirty > 512 KiB) stored chunks
        stored = zarr_array(store).reshape(n_chunks, chunk)
        is_new = [np.array_equal(stored[i], new[i * chunk:(i + 1) * chunk]) for i in range(n_chunks)]
        is_old = [np.array_equal(stored[i], old[i * chunk:(i + 1) * chunk]) for i in range(n_chunks)]
        assert all(a or b for a, b in zip(is_new, is_old)), "a chunk in the store is neither old nor new"
        dirty_max = (512 * 1024) // (chunk * 4) + 1
        assert sum(is_new) >= n_chunks - dirty_max, (
            f"--cache-size 1M: only {sum(is_new)}/{n_chunks} chunks stored while writing; "
            f"at most {dirty_max} may stay dirty")
    finally:
        os.close(fd)
    m.close()
    model = Model(new)
    assert_store_equals(store, model, what="after unmount")


def test_unmount_stores_munmapped_writes(mount_factory, tmp_path):
    """Pages written through a mapping that is unmapped without msync are stored at unmount."""
    store = make_store(tmp_path, "um.zarr", np.zeros((100, 100), "f8"), zarr_format=2, chunks=(30, 30))
    model = Model(zarr_array(store))
    m = mount_factory(store, *RW)
    mm = np.memmap(m.path("arr"), dtype="f8", mode="r+", shape=(100, 100))
    vals = np.linspace(-5, 5, 50 * 50).reshape(50, 50)
    mm[25:75, 25:75] = vals
    model.set((slice(25, 75), slice(25, 75)), vals)
    del mm  # no flush
    gc.collect()
    m.close()
    assert_store_equals(store, model, what="after munmap and unmount")


def test_close_stores_before_returning(mount_factory, tmp_path):
    store = make_store(tmp_path, "close.zarr", np.zeros(5000, "u2"), zarr_format=2, chunks=(1024,),
                       compressors=numcodecs.Zstd(level=1))
    model = Model(zarr_array(store))
    m = mount_factory(store, *RW)
    with open(m.path("arr"), "r+b") as f:
        f.seek(2000)
        data = np.arange(1, 3001, dtype="u2").tobytes()
        f.write(data)
        model.write(2000, data)
    # still mounted: close(2) returned, so the chunks are in the store now
    assert_store_equals(store, model, what="store right after close(2), still mounted")


# --------------------------------------------------------------------------
# 4. crash consistency: kill -9 in the middle of a large write
# --------------------------------------------------------------------------

CRASH_CASES = {
    "v3-zstd": dict(zarr_format=3, chunks=(8192,)),
    "v3-sharded": dict(zarr_format=3, chunks=(8192,), shards=(4 * 8192,)),
    "v2-blosc": dict(zarr_format=2, chunks=(8192,), compressors=numcodecs.Blosc(cname="lz4", clevel=5)),
}


@pytest.mark.parametrize("layout", list(CRASH_CASES))
def test_crash_mid_write_each_chunk_old_or_new(zarrfs_bin, tmp_path, layout):
    kw = dict(CRASH_CASES[layout])
    chunk = kw["chunks"][0]  # 8192 f4 = 32 KiB: one FUSE write per pwrite
    n_chunks = 512  # 16 MiB
    rng = np.random.default_rng(11)
    old = new_values("f4", n_chunks * chunk, rng)
    new = new_values("f4", n_chunks * chunk, rng)
    store = make_store(tmp_path, "crash.zarr", old, **kw)
    old = zarr_array(store)
    m = Mount(store, tmp_path / "mnt", "-o", "rw,writeback_secs=1", "--cache-size", "1M", foreground=True)
    progress = [0]
    errors: list[BaseException] = []

    def writer(path):
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as e:
            errors.append(e)
            return
        try:
            for i in range(n_chunks):
                pwrite_all(fd, new[i * chunk:(i + 1) * chunk].tobytes(), i * chunk * 4)
                progress[0] = i + 1
        except OSError as e:  # the daemon was killed under us
            errors.append(e)
        finally:
            _close_quietly(fd)

    with m:
        t = threading.Thread(target=writer, args=(str(m.path("arr")),), daemon=True)
        t.start()
        wait_until(lambda: progress[0] >= n_chunks // 3 or not t.is_alive(), timeout=30, interval=0.002)
        kill9(m)
        t.join(20)
        assert not t.is_alive(), "writer still blocked after the daemon was killed"
        killed_at = progress[0]  # pwrites that returned; chunk killed_at may have been in flight
        force_unmount(m.mp_real)
        assert not is_mounted(m.mp_real), "dead mount could not be removed"
    assert killed_at < n_chunks, "the write finished before the kill: nothing tested (make it larger)"
    assert errors, "writer saw no error although the daemon died mid-write"

    leftovers = tmp_files(store)
    stored = zarr_array(store).reshape(n_chunks, chunk)  # must open and read without error
    states = []
    for i in range(n_chunks):
        if np.array_equal(stored[i].view("u4"), old[i * chunk:(i + 1) * chunk].view("u4")):
            states.append("old")
        elif np.array_equal(stored[i].view("u4"), new[i * chunk:(i + 1) * chunk].view("u4")):
            states.append("new")
        else:
            states.append("torn")
    torn = [i for i, s in enumerate(states) if s == "torn"]
    assert not torn, f"chunks neither old nor new after kill -9 (killed after {killed_at} chunks): {torn[:20]}"
    assert states.count("new") > 0, f"no chunk was stored before the kill at {killed_at}/{n_chunks}"
    assert all(s == "old" for s in states[killed_at + 1:]), "chunks never written are not old"
    if leftovers:
        g = zarr.open_group(store=str(store), mode="r")  # listing copes with the leftovers
        assert [k for k, _ in g.members()] == ["arr"]
        assert g["arr"].nchunks_initialized >= 1

    # the store still mounts and reads like zarr-python says
    with Mount(store, tmp_path / "mnt2") as m2:
        data = m2.path("arr").read_bytes()
        assert data == stored.tobytes(), describe_mismatch(data, stored.tobytes(), "f4")
    if leftovers:  # the next writable mount clears what the killed daemon left
        with Mount(store, tmp_path / "mnt3", "-o", "rw"):
            assert wait_until(lambda: not tmp_files(store), timeout=10), f"still there: {tmp_files(store)}"


# --------------------------------------------------------------------------
# 5. concurrent writers (processes)
# --------------------------------------------------------------------------

_WRITER = r"""
import os, sys
import numpy as np
path, mode = sys.argv[1], sys.argv[2]
k, nw, n_elems, block, iters = map(int, sys.argv[3:])
fd = os.open(path, os.O_WRONLY)
rng = np.random.default_rng(1000 + k)
print("ready", flush=True)
sys.stdin.readline()  # start together
if mode == "disjoint":
    blocks = np.arange(k, n_elems // block, nw)
    rng.shuffle(blocks)
    for b in blocks:
        idx = np.arange(b * block, (b + 1) * block, dtype=np.int64)
        data = (((k + 1) << 40) | idx).tobytes()
        assert os.pwrite(fd, data, int(b) * block * 8) == len(data)
else:
    v = np.int64(0x0101010101010101 * (k + 1))
    data = np.full(n_elems, v).tobytes()
    assert os.pwrite(fd, data, 0) == len(data)  # every element written at least once
    for _ in range(iters):
        s = int(rng.integers(0, n_elems))
        n = int(rng.integers(1, min(block, n_elems - s) + 1))
        data = np.full(n, v).tobytes()
        assert os.pwrite(fd, data, s * 8) == len(data)
os.close(fd)
"""


@pytest.mark.parametrize("mode,opts", [
    ("disjoint", ("-o", "rw,writeback_secs=3600")),
    ("disjoint", ("-o", "rw,writeback_secs=1", "--cache-size", "64K")),
    ("overlapping", ("-o", "rw,writeback_secs=3600")),
    ("overlapping", ("-o", "rw,writeback_secs=1", "--cache-size", "64K")),
], ids=["disjoint", "disjoint-writeback-pressure", "overlapping", "overlapping-writeback-pressure"])
def test_concurrent_writer_processes(mount_factory, tmp_path, mode, opts):
    nw = 4
    if mode == "disjoint":
        block, n_elems, iters = 24, 24 * 1024, 0  # blocks straddle the 1024-element chunks
    else:
        block, n_elems, iters = 600, 8192, 400
    store = make_store(tmp_path, "conc.zarr", np.zeros(n_elems, "i8"), chunks=(1024,))
    m = mount_factory(store, *opts)
    flat = m.path("arr")
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(flat), mode, str(k), str(nw), str(n_elems),
                               str(block), str(iters)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=clean_env())
             for k in range(nw)]
    try:
        for p in procs:  # all set up (numpy imported, file open) before any writes
            assert p.stdout.readline() == b"ready\n", f"writer did not start: {p.communicate(timeout=10)[1]}"
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, f"writer failed: {err.decode()}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    m.assert_live()
    drop_cache(flat)
    through_mount = np.frombuffer(flat.read_bytes(), "i8")
    m.close()
    stored = zarr_array(store)
    assert stored.tobytes() == through_mount.tobytes(), (
        "store after unmount differs from what the mount served: "
        + describe_mismatch(stored.tobytes(), through_mount.tobytes(), "i8"))
    if mode == "disjoint":
        idx = np.arange(n_elems, dtype=np.int64)
        writer = (idx // block) % nw
        expected = ((writer + 1) << 40) | idx
        assert_store_equals(store, Model(expected), what="disjoint concurrent writers")
    else:
        b = stored.view("u1").reshape(-1, 8)
        torn = np.flatnonzero((b != b[:, :1]).any(axis=1))
        assert torn.size == 0, f"torn elements (bytes from two writers): {torn[:10]} = {stored[torn[:10]]}"
        allowed = {0x0101010101010101 * (k + 1) for k in range(nw)}
        bad = [i for i, v in enumerate(stored.tolist()) if v not in allowed]
        assert not bad, f"elements with values no writer wrote: {bad[:10]}"
        assert len(set(stored.tolist())) >= 2, "overlap test degenerated: one writer's values everywhere"


def test_sharded_write_back_beside_reads_makes_progress(zarrfs_bin, tmp_path):
    """fsync of writes that span several shards while other threads read chunks of the same
    array: storing a shard holds the array's shard lock, and a decode that needs that lock must
    never be run by a thread that holds it (it was, when stores ran on the decode pool: the
    whole mount hung within seconds)."""
    rows, width, shard_rows = 4096, 512, 256
    store = make_store(tmp_path, "sharded.zarr", np.arange(rows * width, dtype="f4").reshape(rows, width),
                       chunks=(32, width), shards=(shard_rows, width), compressors=None)
    row = width * 4
    m = Mount(store, tmp_path / "mnt", "-o", "rw,decode_threads=2,threads=4", "--cache-size", "4M", foreground=True)
    progress = {"reads": 0, "syncs": 0}
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        fd = os.open(m.path("arr"), os.O_RDONLY)
        try:
            off = 0
            while not stop.is_set():
                os.pread(fd, 1 << 17, off)  # two inner chunks
                progress["reads"] += 1
                off = (off + (96 << 10)) % (rows * row)
        except OSError as e:
            errors.append(f"reader: {e}")
        finally:
            os.close(fd)

    def writer(seed):
        rng = np.random.default_rng(seed)
        fd = os.open(m.path("arr"), os.O_RDWR)
        try:
            while not stop.is_set():
                for s in rng.choice(rows // shard_rows - 1, 4, replace=False):  # rows straddling shards
                    pwrite_all(fd, np.full(8 * width, seed, "f4").tobytes(), (shard_rows * (s + 1) - 4) * row)
                os.fsync(fd)
                progress["syncs"] += 1
        except OSError as e:
            errors.append(f"writer: {e}")
        finally:
            os.close(fd)

    with m:
        threads = [threading.Thread(target=reader, daemon=True) for _ in range(2)]
        threads += [threading.Thread(target=writer, args=(k + 1,), daemon=True) for k in range(2)]
        for t in threads:
            t.start()
        seen, still_since, started = dict(progress), time.monotonic(), time.monotonic()
        stalled = False
        while time.monotonic() - started < 5 and not errors:
            time.sleep(0.2)  # sampling progress, not synchronising
            if progress != seen:
                seen, still_since = dict(progress), time.monotonic()
            elif time.monotonic() - still_since > 10:
                stalled = True
                break
        stop.set()
        deadline = time.monotonic() + 20
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [t for t in threads if t.is_alive()]
        assert not stalled and not hung, f"no progress for 10 s: {progress}; {len(hung)} threads stuck"
        assert not errors, errors
        assert progress["syncs"] > 0 and progress["reads"] > 0, progress
        seen_through_mount = np.fromfile(m.path("arr"), dtype="f4")
    assert np.array_equal(zarr_array(store).reshape(-1), seen_through_mount), "store differs from what the mount showed"


def test_failing_write_back_holds_data_and_refuses_writes_past_the_limit(zarrfs_bin, tmp_path):
    """One array's chunks cannot be stored (its chunk directory is immutable): fsync says EIO
    and the data stays in memory, readable. Once written data passes half the budget, the next
    write, to any array, is refused with EIO before it changes anything; when the chunks can be
    stored again, writes succeed and everything reaches the store."""
    n, chunk = 64 * 1024, 1024  # f4: 4 KiB chunks; --cache-size 64K: refusals past 32 KiB written
    store = make_store(tmp_path, "wb.zarr", np.zeros(n, "f4"), chunks=(chunk,), compressors=None, fill_value=-1)
    zarr.create_array(store=str(store), name="other", data=np.zeros(n, "f4"), chunks=(chunk,), compressors=None,
                      fill_value=-1)
    cdir = store / "arr" / "c"
    if subprocess.run(["chattr", "+i", str(cdir)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    model, other = Model(zarr_array(store)), Model(zarr_array(store, "other"))
    try:
        with Mount(store, tmp_path / "mnt", "-o", "rw,writeback_secs=3600", "--cache-size", "64K",
                   foreground=True) as m:
            fd, ofd = os.open(m.path("arr"), os.O_RDWR), os.open(m.path("other"), os.O_RDWR)
            try:
                def write_chunk(k: int, value: float) -> None:
                    data = np.full(chunk, value, "f4").tobytes()
                    pwrite_all(fd, data, k * chunk * 4)
                    model.write(k * chunk * 4, data)

                for k in range(4):
                    write_chunk(k, 1.0)
                assert errno_of(os.fsync, fd) == errno.EIO, "fsync claimed chunks it could not store"
                assert os.pread(fd, 4 * chunk * 4, 0) == bytes(model.buf[:4 * chunk * 4]), "held data lost"
                for k in range(4, 9):  # 36 KiB written: past half the budget
                    write_chunk(k, 2.0)
                refused = np.full(chunk, 3.0, "f4").tobytes()
                assert errno_of(os.pwrite, ofd, refused, 0) == errno.EIO, "write past the limit accepted"
                drop_cache(m.path("other"))
                assert os.pread(ofd, chunk * 4, 0) == bytes(other.buf[:chunk * 4]), "a refused write changed data"

                subprocess.run(["chattr", "-i", str(cdir)], check=True)
                pwrite_all(ofd, refused, 0)
                other.write(0, refused)
                os.fsync(fd)
                os.fsync(ofd)
            finally:
                os.close(fd)
                os.close(ofd)
    finally:
        subprocess.run(["chattr", "-i", str(cdir)], capture_output=True)
    assert_store_equals(store, model, what="held chunks, stored once possible")
    assert_store_equals(store, other, path="other", what="the other array")


def test_flush_during_multi_chunk_write(zarrfs_bin, tmp_path):
    """One writer writes two rows at a time across 64 chunks whose first touch needs a decode
    (slow); another writer's pressure flush (flush of every array) runs meanwhile, stores the
    chunks already touched and retires them before the first writer's second row reaches them."""
    width, crow, nrows = 4096, 256, 4  # chunks (256, 64) f4 = 64 KiB, 64 across, 4 chunk rows
    rng = np.random.default_rng(3)
    store = make_store(tmp_path, "race.zarr", rng.standard_normal((crow * nrows, width)).astype("f4"),
                       chunks=(crow, 64), compressors=GzipCodec(level=1))
    ylen = 1179648  # one uncompressed 4.5 MiB chunk: every write to it exceeds half of --cache-size 8M
    zarr.create_array(store=str(store), name="y", data=np.zeros(ylen, "f4"), chunks=(ylen,), compressors=None)
    model, ymodel = Model(zarr_array(store)), Model(zarr_array(store, "y"))
    m = Mount(store, tmp_path / "mnt", "-o", "rw,writeback_secs=3600", "--cache-size", "8M", foreground=True)
    errors: list[str] = []
    done = threading.Event()

    def y_writer():
        fd = os.open(m.path("y"), os.O_WRONLY)
        try:
            n = 0
            while not done.is_set():
                off = (n * 4) % (ylen * 4)
                pwrite_all(fd, b"\x01", off)
                ymodel.write(off, b"\x01")
                n += 1
        except OSError as e:
            errors.append(f"y writer: {e}")
        finally:
            done.set()
            _close_quietly(fd)

    with m:
        t = threading.Thread(target=y_writer, daemon=True)
        t.start()
        fd = os.open(m.path("arr"), os.O_WRONLY)
        two_rows = np.ones((2, width), "f4").tobytes()
        started = time.monotonic()
        n = 0

        def more() -> bool:  # 6 s of writes, and at least two rounds of the chunk rows (60 s at most)
            elapsed = time.monotonic() - started
            return not done.is_set() and (elapsed < 6 or (n < 2 * nrows and elapsed < 60))

        try:
            while more():
                r = (n % nrows) * crow + (n // nrows) % (crow - 2)  # chunk rows in turn: evicted, decoded again
                pwrite_all(fd, two_rows, r * width * 4)
                model.write(r * width * 4, two_rows)
                n += 1
        except OSError as e:
            errors.append(f"row writer after {n} writes: {e}")
        finally:
            done.set()
            t.join(20)
            _close_quietly(fd)
        alive = m.proc.poll() is None
    log = m.log_path.read_text()
    panic = next((line for line in log.splitlines() if "panicked" in line), "")
    assert not errors and alive, f"writers failed {errors}, daemon alive={alive}; {panic}"
    # Row writes must get through while the other writer keeps storing its chunk: when every
    # write-back made the row writer reload all 64 chunks, it managed 2 writes in 90 s.
    assert n >= 2 * nrows, f"row writer starved: {n} writes in 60 s"
    assert_store_equals(store, model, what="rows written while flushes ran")
    assert_store_equals(store, ymodel, path="y", what="the other array")


def test_rw_mount_removes_temp_files_of_dead_writers(zarrfs_bin, tmp_path):
    """What kill -9 leaves (a temporary chunk file of a process that is gone) is removed by the
    next writable mount; a live writer's temporary file and a read-only mount touch nothing."""
    store = make_store(tmp_path, "left.zarr", np.arange(64, dtype="f4"), chunks=(16,))
    gone = subprocess.Popen(["true"])
    gone.wait()
    chunk_dir = next(p.parent for p in store.rglob("*") if p.is_file() and p.name == "0")
    dead = chunk_dir / f".0.zarrfs-{gone.pid}-3.tmp"
    live = chunk_dir / f".1.zarrfs-{os.getpid()}-0.tmp"
    unrelated = chunk_dir / ".0.tmp"
    for p in (dead, live, unrelated):
        p.write_bytes(b"partial")
    with Mount(store, tmp_path / "ro"):
        pass
    assert dead.exists(), "a read-only mount changed the store"
    with Mount(store, tmp_path / "rw", "-o", "rw"):
        assert wait_until(lambda: not dead.exists(), timeout=10), "the dead writer's file is still there"
        assert live.exists() and unrelated.exists(), "removed a file that is not a dead writer's"
    assert np.array_equal(zarr_array(store), np.arange(64, dtype="f4"))


# --------------------------------------------------------------------------
# 6. chunks that become entirely the fill value are deleted
# --------------------------------------------------------------------------

FILL_CASES = [
    (2, "<f4", 0.0, {}),
    (3, "int16", 0, {}),
    (2, "<f8", np.nan, {}),
    (3, "float32", np.nan, {}),
    (3, "int32", -1, {"shards": (32, 32)}),
]


@pytest.mark.parametrize("fmt,dtype,fill,kw", FILL_CASES,
                         ids=["v2-f4-0", "v3-i2-0", "v2-f8-nan", "v3-f4-nan", "v3-sharded-i4-minus1"])
def test_fill_value_chunk_deleted(mount_factory, tmp_path, fmt, dtype, fill, kw):
    shape, chunks = (64, 80), (16, 16)
    data = (np.arange(64 * 80).reshape(shape) % 1000 + 1).astype(np.dtype(dtype).newbyteorder("="))
    store = make_store(tmp_path, "fill.zarr", data, zarr_format=fmt, chunks=chunks, fill_value=fill, **kw)
    model = Model(zarr_array(store))
    ndt = model.dtype
    sharded = "shards" in kw
    # the storage object that must disappear: chunk (1,1), or shard (0,0) of a sharded array
    gone_key, gone_sel = ((0, 0), (slice(0, 32), slice(0, 32))) if sharded else ((1, 1), (slice(16, 32), slice(16, 32)))
    # a chunk only partly overwritten with fill must stay
    kept_key, kept_sel = ((0, 1), (slice(0, 16), slice(32, 40))) if sharded else ((2, 2), (slice(32, 48), slice(32, 40)))
    gone, kept = stores.chunk_file(store, "arr", gone_key), stores.chunk_file(store, "arr", kept_key)
    assert gone.exists() and kept.exists()
    m = mount_factory(store, *RW)
    mm = np.memmap(m.path("arr"), dtype=ndt, mode="r+", shape=shape)
    mm[gone_sel] = fill
    mm[kept_sel] = fill
    model.set(gone_sel, fill)
    model.set(kept_sel, fill)
    mm.flush()  # msync: stored before it returns
    del mm
    gc.collect()
    assert not gone.exists(), f"{gone.relative_to(store)} still exists although all its elements are the fill value"
    assert kept.exists(), f"{kept.relative_to(store)} was deleted although only part of it is the fill value"
    drop_cache(m.path("arr"))
    check_other_process_sees({str(m.path("arr")): bytes(model.buf)})
    m.close()
    assert not gone.exists()
    assert_store_equals(store, model, what="after filling chunks with the fill value")


# --------------------------------------------------------------------------
# 7. what a writable mount refuses, and read-only mounts
# --------------------------------------------------------------------------


@pytest.fixture
def rw_small(mount_factory, tmp_path):
    store = make_store(tmp_path, "small.zarr", np.arange(100 * 50, dtype="i4").reshape(100, 50), chunks=(30, 20))
    zarr.open_group(str(store), mode="r+").require_group("grp")
    return mount_factory(store, *RW), store


def test_npy_header_writes(rw_small):
    m, store = rw_small
    model = Model(zarr_array(store))
    npy = m.path("arr.npy")
    hl = read_npy_header(npy)[0]
    header = npy.read_bytes()[:hl]
    size = len(model.buf)
    fd = os.open(npy, os.O_RDWR)
    try:
        changed = bytearray(header)
        changed[hl // 2] ^= 0x01
        assert errno_of(os.pwrite, fd, bytes(changed[hl // 2:hl // 2 + 1]), hl // 2) == errno.EPERM
        assert errno_of(os.pwrite, fd, bytes(changed), 0) == errno.EPERM
        assert errno_of(os.pwrite, fd, b"\x93NUMPY\x02", 0) == errno.EPERM
        # changed header + data in one write: refused as a whole, data untouched
        assert errno_of(os.pwrite, fd, bytes(changed) + b"\xff" * 64, 0) == errno.EPERM
        # identical header bytes are accepted (mmap write-back of page 0 sends them), alone ...
        assert os.pwrite(fd, header, 0) == hl
        assert os.pwrite(fd, header[3:9], 3) == 6
        # ... and together with data
        data = np.arange(-1, -17, -1, dtype="i4").tobytes()
        assert os.pwrite(fd, header + data, 0) == hl + len(data)
        model.write(0, data)
    finally:
        os.close(fd)
    drop_cache(npy, m.path("arr"))
    check_other_process_sees({str(npy): header + bytes(model.buf), str(m.path("arr")): bytes(model.buf)})
    assert read_npy_header(npy)[1] == (100, 50)
    m.close()
    assert_store_equals(store, model, what="after header writes")
    assert len(model.buf) == size


def test_write_past_end_efbig(rw_small):
    m, store = rw_small
    model = Model(zarr_array(store))
    flat, npy = m.path("arr"), m.path("arr.npy")
    size = len(model.buf)
    nsize = os.stat(npy).st_size
    for path, end in ((flat, size), (npy, nsize)):
        fd = os.open(path, os.O_RDWR)
        try:
            assert errno_of(os.pwrite, fd, b"\x01", end) == errno.EFBIG
            assert errno_of(os.pwrite, fd, b"\x01" * 8, end - 4) == errno.EFBIG  # straddles EOF
            assert errno_of(os.pwrite, fd, b"\x01" * 4, end + 10**6) == errno.EFBIG
        finally:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            assert errno_of(os.write, fd, b"\x01\x02\x03\x04") == errno.EFBIG
        finally:
            os.close(fd)
    assert os.stat(flat).st_size == size and os.stat(npy).st_size == nsize, "a refused write changed the size"
    drop_cache(flat, npy)
    assert flat.read_bytes() == bytes(model.buf), "a refused write changed data"
    m.close()
    assert_store_equals(store, model, what="after refused writes")


def test_truncate_only_to_same_size(rw_small):
    m, store = rw_small
    model = Model(zarr_array(store))
    for name in ("arr", "arr.npy"):
        p = m.path(name)
        size = os.stat(p).st_size
        assert errno_of(os.truncate, p, 0) == errno.EPERM
        assert errno_of(os.truncate, p, size - 1) == errno.EPERM
        assert errno_of(os.truncate, p, size + 4096) == errno.EPERM
        assert errno_of(os.truncate, p, size) is None, "truncate to the same size must succeed"
        fd = os.open(p, os.O_RDWR)
        try:
            assert errno_of(os.ftruncate, fd, 1) == errno.EPERM
            assert errno_of(os.ftruncate, fd, size) is None
        finally:
            os.close(fd)
        assert errno_of(lambda: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))) == errno.EPERM
        assert os.stat(p).st_size == size
    m.close()
    assert_store_equals(store, model, what="after refused truncates")


RW_TREE_OPS = {
    "create": lambda mp: os.close(os.open(mp / "new_file", os.O_WRONLY | os.O_CREAT, 0o644)),
    "create-in-group": lambda mp: os.close(os.open(mp / "grp" / "x", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)),
    "unlink": lambda mp: os.unlink(mp / "arr"),
    "unlink-npy": lambda mp: os.unlink(mp / "arr.npy"),
    "rename": lambda mp: os.rename(mp / "arr", mp / "renamed"),
    "rename-over": lambda mp: os.rename(mp / "arr.npy", mp / "arr"),
    "mkdir": lambda mp: os.mkdir(mp / "newdir"),
    "rmdir": lambda mp: os.rmdir(mp / "grp"),
    "symlink": lambda mp: os.symlink("arr", mp / "link"),
    "hardlink": lambda mp: os.link(mp / "arr", mp / "grp" / "hard"),
    "chmod": lambda mp: os.chmod(mp / "arr", 0o600),
    "chown": lambda mp: os.chown(mp / "arr", 1234, 1234),
    "mknod-fifo": lambda mp: os.mkfifo(mp / "fifo"),
    "setxattr": lambda mp: os.setxattr(mp / "arr", "user.zarr.shape", b"[1]"),
}


def test_tree_changes_eperm_on_rw(rw_small):
    m, store = rw_small
    before = sorted(os.listdir(m.path()))
    wrong = {}
    for name, op in RW_TREE_OPS.items():
        e = errno_of(op, m.path())
        if e != errno.EPERM:
            wrong[name] = "success" if e is None else errno.errorcode.get(e, e)
    assert not wrong, f"expected EPERM on a rw mount, got: {wrong}"
    assert sorted(os.listdir(m.path())) == before == ["arr", "arr.npy", "grp"]
    assert os.listdir(m.path("grp")) == []
    assert stat.S_IMODE(os.stat(m.path("arr")).st_mode) == 0o644
    m.assert_live()


@pytest.mark.parametrize("args", [(), ("-o", "ro"), ("-o", "rw,ro")], ids=["default", "o-ro", "o-rw-ro"])
def test_readonly_mount_erofs(mount_factory, tmp_path, args):
    store = make_store(tmp_path, "ro.zarr", np.arange(1000, dtype="f8"), chunks=(100,))
    m = mount_factory(store, *args)
    for name in ("arr", "arr.npy"):
        p = m.path(name)
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o444
        assert errno_of(lambda: os.close(os.open(p, os.O_WRONLY))) == errno.EROFS
        assert errno_of(lambda: os.close(os.open(p, os.O_RDWR))) == errno.EROFS
        assert errno_of(os.truncate, p, os.stat(p).st_size) == errno.EROFS
        assert errno_of(np.memmap, p, dtype="u1", mode="r+") == errno.EROFS
    for name, op in (("create", RW_TREE_OPS["create"]), ("unlink", RW_TREE_OPS["unlink"]),
                     ("rename", RW_TREE_OPS["rename"]), ("mkdir", RW_TREE_OPS["mkdir"]),
                     ("chmod", RW_TREE_OPS["chmod"])):
        assert errno_of(op, m.path()) == errno.EROFS, name
    m.assert_live()


@pytest.mark.parametrize("args", [("-o", "rw"), ("--rw",), ("--read-write",), ("--rw", "--writeback-secs", "2")],
                         ids=["o-rw", "rw", "read-write", "rw-writeback-secs"])
def test_rw_flag_forms(mount_factory, tmp_path, args):
    store = make_store(tmp_path, "forms.zarr", np.zeros(100, "u1"), chunks=(10,))
    m = mount_factory(store, *args)
    assert stat.S_IMODE(os.stat(m.path("arr")).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(m.path("arr.npy")).st_mode) == 0o644
    with open(m.path("arr"), "r+b") as f:
        f.seek(42)
        f.write(b"\x07")
    m.close()
    assert zarr_array(store)[42] == 7


# --------------------------------------------------------------------------
# 8. zarrfs create
# --------------------------------------------------------------------------

CREATE_DTYPES = [("f4", "nan"), ("i2", "-1"), ("u1", "0"), ("f8", "0"), ("bool", "0")]


@pytest.mark.parametrize("fmt", [2, 3])
@pytest.mark.parametrize("codec", ["zstd", "blosc", "gzip:7", "none"])
def test_create_metadata(tmp_path, fmt, codec):
    for i, (dt, fill) in enumerate(CREATE_DTYPES):
        target = tmp_path / "c.zarr" / "grp" / f"a{i}"
        r = run_zarrfs("create", target, "--shape", "30,40", "--chunks", "16,16", "--dtype", dt,
                       "--codec", codec, "--fill", fill, "--zarr-format", str(fmt))
        assert r.returncode == 0, f"create {dt} {codec} v{fmt} failed: {r.stderr}"
        a = zarr.open_array(store=str(tmp_path / "c.zarr"), path=f"grp/a{i}", mode="r")
        assert a.metadata.zarr_format == fmt
        assert a.shape == (30, 40) and a.chunks == (16, 16)
        assert a.dtype == np.dtype(dt), f"{dt}: zarr-python sees {a.dtype}"
        exp_fill = {"nan": np.nan, "-1": -1, "0": 0}[fill]
        if fill == "nan":
            assert np.isnan(a.fill_value)
        else:
            assert a.fill_value == exp_fill, f"fill {a.fill_value!r}"
        name = codec.split(":")[0]
        comps = a.compressors
        if name == "none":
            assert comps == (), f"--codec none: compressors {comps}"
        else:
            assert len(comps) == 1, comps
            cname = type(comps[0]).__name__.lower()
            assert name in cname, f"--codec {codec}: compressor {comps[0]!r}"
            if codec == "gzip:7":
                assert comps[0].level == 7
        data = a[...]
        if fill == "nan":
            assert np.isnan(data).all()
        else:
            assert (data == exp_fill).all()
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert g.metadata.zarr_format == fmt
    assert sorted(g["grp"].array_keys()) == [f"a{i}" for i in range(len(CREATE_DTYPES))]


@pytest.mark.parametrize("fmt", [2, 3])
def test_create_mount_dd_fill(mount_factory, tmp_path, fmt):
    """zarrfs create, mount rw, fill with dd (no Python writing), read back with zarr-python."""
    store = tmp_path / "new.zarr"
    r = run_zarrfs("create", store / "g" / "temp", "--shape", "100,200", "--chunks", "32,64", "--dtype", "f4",
                   "--fill", "nan", "--zarr-format", str(fmt))
    assert r.returncode == 0, r.stderr
    rng = np.random.default_rng(fmt)
    full = new_values("f4", 100 * 200, rng).reshape(100, 200)
    src = tmp_path / "src.bin"
    src.write_bytes(full[:60].tobytes())  # rows 0..59; rows 60..99 stay unwritten (fill)
    m = mount_factory(store, "-o", "rw")
    flat = m.path("g/temp")
    r = run(["dd", f"if={src}", f"of={flat}", "bs=8000", "conv=notrunc", "status=none"])
    assert r.returncode == 0, f"dd failed: {r.stderr}"
    r = run(["dd", f"if={flat}", "bs=1M", "status=none", f"of={tmp_path / 'back.bin'}"])
    assert r.returncode == 0, r.stderr
    m.close()
    expected = full.copy()
    expected[60:] = np.nan
    back = np.frombuffer((tmp_path / "back.bin").read_bytes(), "f4").reshape(100, 200)
    assert back.tobytes() == expected.tobytes(), "dd read-back through the mount"
    got = zarr.open_array(store=str(store), path="g/temp", mode="r")[...]
    assert got.tobytes() == expected.tobytes(), describe_mismatch(got.tobytes(), expected.tobytes(), "f4")
    # chunks of never-written rows (all fill) were not stored
    assert not stores.chunk_file(store, "g/temp", (3, 0)).exists()


def test_create_root_array(mount_factory, tmp_path):
    for fmt, name in ((3, "root.zarr"), (2, "plain")):
        target = tmp_path / f"v{fmt}" / name
        r = run_zarrfs("create", target, "--shape", "10", "--chunks", "4", "--dtype", "i2", "--zarr-format",
                       str(fmt))
        assert r.returncode == 0, r.stderr
        a = zarr.open_array(store=str(target), mode="r")
        assert a.shape == (10,) and a.dtype == np.int16 and a.metadata.zarr_format == fmt
        m = mount_factory(target, "-o", "rw")
        stem = name.removesuffix(".zarr")
        assert sorted(os.listdir(m.path())) == [stem, f"{stem}.npy"]
        with open(m.path(stem), "r+b") as f:
            f.write(np.arange(10, dtype="i2").tobytes())
        m.close()
        assert zarr.open_array(store=str(target), mode="r")[...].tolist() == list(range(10))


def _one_line_error(r) -> None:
    assert r.returncode != 0, f"expected failure, got exit 0 (stdout {r.stdout!r})"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {r.stderr!r}"


def test_create_errors(tmp_path):
    store = tmp_path / "e.zarr"
    ok = run_zarrfs("create", store / "a", "--shape", "10,10", "--chunks", "5,5", "--dtype", "f4")
    assert ok.returncode == 0, ok.stderr

    def snapshot():
        return sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None)
                      for p in tmp_path.rglob("*"))

    before = snapshot()
    bad = {
        "existing-path": ["create", store / "a", "--shape", "10,10", "--chunks", "5,5", "--dtype", "f4"],
        "existing-root": ["create", store, "--shape", "10", "--chunks", "5", "--dtype", "f4"],
        "bad-dtype": ["create", store / "b", "--shape", "10,10", "--chunks", "5,5", "--dtype", "f5"],
        "bad-dtype-word": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "str"],
        "shape-chunks-mismatch": ["create", store / "b", "--shape", "10,10", "--chunks", "5", "--dtype", "f4"],
        "zero-chunk": ["create", store / "b", "--shape", "10", "--chunks", "0", "--dtype", "f4"],
        "bad-codec": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "f4", "--codec", "lzma"],
        "bad-level": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "f4", "--codec", "zstd:x"],
        "bad-fill": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "i4", "--fill", "abc"],
        "fill-out-of-range": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "u1",
                              "--fill", "-1"],
        "bad-format": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "f4",
                       "--zarr-format", "4"],
        "format-mismatch-with-group": ["create", store / "b", "--shape", "10", "--chunks", "5", "--dtype", "f4",
                                       "--zarr-format", "2"],
        "under-an-array": ["create", store / "a" / "sub", "--shape", "10", "--chunks", "5", "--dtype", "f4"],
    }
    failures = {}
    for name, args in bad.items():
        r = run_zarrfs(*args)
        try:
            _one_line_error(r)
        except AssertionError as e:
            failures[name] = str(e)
    assert not failures, "create errors:\n" + "\n".join(f"  {k}: {v}" for k, v in failures.items())
    assert snapshot() == before, "a refused create changed the store"


# --------------------------------------------------------------------------
# 9. remote stores cannot be mounted writable
# --------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("-o", "rw"), ("--rw",)], ids=["o-rw", "rw"])
def test_remote_rw_refused(zarrfs_bin, tmp_path, guard_paths, args):
    mp = tmp_path / "mnt"
    mp.mkdir()
    url = "http://127.0.0.1:9/x.zarr"
    guard_paths.append(str(mp))
    r = run_zarrfs("mount", *args, url, mp, timeout=30)
    _one_line_error(r)
    assert re.search(r"writ|read-only|\brw\b", r.stderr, re.I), f"refused for another reason: {r.stderr!r}"
    assert not is_mounted(mp), "remote store mounted although -o rw was refused"
    assert not zarrfs_pids(str(mp), str(mp.resolve())), "a daemon stayed behind"
