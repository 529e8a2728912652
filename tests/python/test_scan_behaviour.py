"""Scan behaviour through a real mount, read from the daemon's counters (not timings):
each chunk decoded once per full scan, the cache budget respected, the stripe warning."""

import subprocess

import numpy as np
import zarr

from kit import run_zarrfs


def make_store(path, shape=(512, 768), chunks=(64, 128)):
    data = np.random.default_rng(7).standard_normal(shape).astype("f4")
    z = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="f4")
    z[:] = data
    return data


def test_full_scan_decodes_each_chunk_once(tmp_path, mount_factory):
    data = make_store(tmp_path / "a.zarr")
    m = mount_factory(tmp_path / "a.zarr")
    out = subprocess.run(["dd", f"if={m.path('a')}", "bs=1M", "status=none"], capture_output=True, check=True).stdout
    assert out == data.tobytes()
    s = m.stats()
    assert s["chunks_decoded"] == (512 // 64) * (768 // 128)
    assert s["decode_errors"] == 0


def test_scan_with_a_cache_of_two_stripes_stays_in_budget(tmp_path, mount_factory):
    """A memmap scan (kernel readahead, several request threads, reads slightly out of order)
    with a cache of exactly two rows of chunks: still one decode per chunk. A row of chunks is
    16 MiB here, well past the mount's 4 MiB readahead, as for any array whose rows of chunks
    dwarf the readahead window (the case the cache sizing is about)."""
    shape, chunks = (1024, 16384), (256, 2048)
    data = make_store(tmp_path / "a.zarr", shape, chunks)
    stripe = 256 * 16384 * 4
    m = mount_factory(tmp_path / "a.zarr", "--cache-size", str(2 * stripe))
    scanned = np.memmap(m.path("a"), dtype="f4", shape=data.shape, mode="r")
    assert np.array_equal(scanned, data)
    s = m.stats()
    assert s["cached_bytes"] <= 2 * stripe
    assert s["chunks_decoded"] == (1024 // 256) * (16384 // 2048), s


def test_cache_smaller_than_a_stripe_warns_with_the_size_needed(tmp_path, zarrfs_bin):
    make_store(tmp_path / "a.zarr")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # -f would stay in the foreground; the daemon's startup warnings reach the mount command.
    r = run_zarrfs("mount", tmp_path / "a.zarr", mnt, "--cache-size", "100K")
    try:
        assert r.returncode == 0, r.stderr
        assert "warning" in r.stderr and "/a" in r.stderr, r.stderr
        assert "--cache-size 1M" in r.stderr, r.stderr  # 64*768*4 bytes = 192 KiB, rounded up
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
