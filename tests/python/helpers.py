"""Assertion helpers for the zarrfs end-to-end tests (fixtures live in conftest.py).

Mounting, /proc probes and loopback servers come from the shared kit (tests/kit, ``import
kit``), which scripts/ use too; what is here compares what a mount serves with what is expected,
the pytest way.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

TEST_TIMEOUT = float(os.environ.get("ZARRFS_TEST_TIMEOUT", "90"))  # watchdog per test
PUBLIC_TMP_PREFIX = "/tmp/zarrfs-test-"  # world-traversable temp dirs (test_allow_other)


def stored_bytes(directory: Path) -> int:
    """Bytes in the files under `directory`: what `zarrfs info` calls stored."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# comparison helpers
# --------------------------------------------------------------------------


def describe_mismatch(got: bytes, exp: bytes, dtype=None, offset: int = 0) -> str:
    if len(got) != len(exp):
        head = f"length {len(got)} != expected {len(exp)}"
    else:
        head = "same length"
    n = min(len(got), len(exp))
    g = np.frombuffer(got[:n], np.uint8)
    e = np.frombuffer(exp[:n], np.uint8)
    diff = np.flatnonzero(g != e)
    if diff.size == 0:
        return f"{head}; common prefix identical"
    first = int(diff[0])
    msg = (f"{head}; {diff.size} differing bytes, first at file offset {offset + first}: "
           f"got {got[first:first + 16].hex()} expected {exp[first:first + 16].hex()}")
    if dtype is not None:
        dt = np.dtype(dtype)
        el = (offset + first) // dt.itemsize
        s = el * dt.itemsize - offset
        if 0 <= s and s + dt.itemsize <= n:
            msg += (f"; element {el}: got {np.frombuffer(got[s:s + dt.itemsize], dt)[0]!r} "
                    f"expected {np.frombuffer(exp[s:s + dt.itemsize], dt)[0]!r}")
    return msg


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread until ``length`` bytes or EOF (a short read mid-file is retried, not trusted)."""
    parts = []
    while length > 0:
        b = os.pread(fd, length, offset)
        if not b:
            break
        parts.append(b)
        length -= len(b)
        offset += len(b)
    return b"".join(parts)


def random_ranges(size: int, chunk_bytes: int, rng: np.random.Generator, n: int = 50) -> list[tuple[int, int]]:
    """Fixed edge cases plus ``n`` random (offset, length) pairs: unaligned offsets,
    chunk-boundary offsets, ranges crossing EOF, lengths 1..3*chunk_bytes."""
    cb = max(1, chunk_bytes)
    ranges = [(0, 1), (0, min(size, 4096)), (max(0, size - 1), 1), (max(0, size - 1), 10),
              (max(0, size - 3), 100), (size, 10), (size + 12345, 7), (1, size + 10)]
    for i in range(n):
        length = int(rng.integers(1, 3 * cb + 1))
        kind = i % 4
        if kind == 0:  # anywhere
            off = int(rng.integers(0, size))
        elif kind == 1:  # just before a chunk-sized boundary
            off = max(0, (int(rng.integers(0, size)) // cb) * cb - int(rng.integers(0, 8)))
        elif kind == 2:  # crossing the end of the file
            off = int(rng.integers(max(0, size - length), size))
        else:  # odd offset: never element aligned for multi-byte dtypes
            off = int(rng.integers(0, size)) | 1
        ranges.append((off, length))
    return ranges


def check_preads(path, expected: bytes, chunk_bytes: int, rng: np.random.Generator, n: int = 50,
                 dtype=None, base: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, length in random_ranges(len(expected), chunk_bytes, rng, n):
            got = pread_full(fd, length, off)
            exp = expected[off:off + length]
            assert got == exp, (f"pread({path}, len={length}, off={off}) mismatch: "
                                f"{describe_mismatch(got, exp, dtype, off - base)}")
    finally:
        os.close(fd)


def read_npy_header(path) -> tuple[int, tuple, bool, np.dtype]:
    """Parse a .npy header with numpy's own reader: (header_len, shape, fortran, dtype)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = np.lib.format._read_array_header(f, version)
        return f.tell(), shape, fortran, dtype


def assert_same_array(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype.str} != {expected.dtype.str}"
    gb, eb = np.ascontiguousarray(got).tobytes(), expected.tobytes()
    if gb != eb:
        if expected.dtype.kind in "fc" and np.array_equal(got, expected, equal_nan=True):
            pytest.fail(f"{what}: values equal but bytes differ (NaN payload / signed zero?): "
                        f"{describe_mismatch(gb, eb, expected.dtype)}")
        pytest.fail(f"{what}: {describe_mismatch(gb, eb, expected.dtype)}")


def check_mounted_array(flat_path, expected: np.ndarray, chunk_bytes: int, seed: int, n_reads: int = 50) -> None:
    """Full comparison of ``flat_path`` and ``flat_path.npy`` against ``expected``
    (C-contiguous, native-endian), then random preads on both."""
    flat = Path(flat_path)
    npy = flat.with_name(flat.name + ".npy")
    exp_bytes = expected.tobytes()

    st = os.stat(flat)
    assert st.st_size == len(exp_bytes), f"{flat}: st_size {st.st_size} != {len(exp_bytes)}"

    _compare_memmap(flat, expected)
    data = flat.read_bytes()
    assert data == exp_bytes, f"{flat}: read() mismatch: {describe_mismatch(data, exp_bytes, expected.dtype)}"
    del data

    header_len, shape, fortran, dtype = read_npy_header(npy)
    assert tuple(shape) == expected.shape, f"{npy}: header shape {shape}"
    assert not fortran, f"{npy}: fortran_order must be False"
    assert dtype.str == expected.dtype.str, f"{npy}: header dtype {dtype.str} != native {expected.dtype.str}"
    assert os.stat(npy).st_size == header_len + len(exp_bytes), f"{npy}: size != header {header_len} + data"
    _compare_npy(npy, expected)

    rng = np.random.default_rng(seed)
    check_preads(flat, exp_bytes, chunk_bytes, rng, n_reads, expected.dtype)
    with open(npy, "rb") as f:
        header = f.read(header_len)
    check_preads(npy, header + exp_bytes, chunk_bytes, rng, max(10, n_reads // 5), expected.dtype, base=header_len)


def _compare_memmap(flat: Path, expected: np.ndarray) -> None:
    mm = np.memmap(flat, dtype=expected.dtype, shape=expected.shape, mode="r")
    try:
        assert_same_array(np.asarray(mm), expected, f"np.memmap({flat})")
    finally:
        del mm


def _compare_npy(npy: Path, expected: np.ndarray) -> None:
    arr = np.load(npy, mmap_mode="r")
    try:
        assert arr.dtype.str == expected.dtype.str, f"{npy}: np.load dtype {arr.dtype.str}"
        assert_same_array(np.asarray(arr), expected, f"np.load({npy}, mmap_mode='r')")
    finally:
        del arr


def errno_of(fn, *args, **kwargs) -> int | None:
    """Run ``fn``; return the OSError errno it raised, or None if it succeeded."""
    try:
        fn(*args, **kwargs)
    except OSError as e:
        return e.errno
    return None
